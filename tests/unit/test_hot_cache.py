"""The hot cache: answers kept for ttl seconds, at most size keys, failures never."""

from __future__ import annotations

import time

import pytest

from bridge.outcome import NOT_FOUND, Found
from bridge.table import HotCache


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    # bridge.table reads the clock through the time module.
    monkeypatch.setattr(time, "monotonic", fake)
    return fake


def test_answers_expire_after_ttl(clock: FakeClock) -> None:
    cache = HotCache(ttl=5, size=10)
    cache.put(b"k", Found(b"v"))
    cache.put(b"missing", NOT_FOUND)
    clock.now += 4.9
    assert cache.get(b"k") == Found(b"v")
    assert cache.get(b"missing") == NOT_FOUND
    clock.now += 0.2
    assert cache.get(b"k") is None
    assert cache.get(b"missing") is None


def test_least_recently_used_goes_first(clock: FakeClock) -> None:
    cache = HotCache(ttl=60, size=2)
    cache.put(b"a", Found(b"1"))
    cache.put(b"b", Found(b"2"))
    assert cache.get(b"a") == Found(b"1")  # a is now the most recent
    cache.put(b"c", Found(b"3"))
    assert cache.get(b"b") is None
    assert cache.get(b"a") == Found(b"1")
    assert cache.get(b"c") == Found(b"3")
