"""Rate-limited failure reasons and the JSON log format."""

from __future__ import annotations

import io
import json
import logging
import time

import pytest

from bridge.logs import ReasonLog, setup_logging


def test_each_reason_once_per_interval_with_a_count_of_the_rest(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    reasons = ReasonLog(logging.getLogger("test.reasons"), interval=60)
    with caplog.at_level(logging.WARNING, logger="test.reasons"):
        for _ in range(50):
            reasons.warning("table a: TEMP: memcache down")
        reasons.warning("table b: PERM: no table")
        now[0] += 61
        reasons.warning("table a: TEMP: memcache down")
    assert [record.getMessage() for record in caplog.records] == [
        "table a: TEMP: memcache down",
        "table b: PERM: no table",
        "table a: TEMP: memcache down (and 49 more in the last 60s)",
    ]


def test_json_format_is_one_object_per_line() -> None:
    stream = io.StringIO()
    setup_logging("info", log_format="json", stream=stream)
    try:
        logging.getLogger("bridge.test").warning("table %s: TEMP", "aliases")
    finally:
        setup_logging("warning", log_format="text")
    [line] = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "warning"
    assert entry["logger"] == "bridge.test"
    assert entry["message"] == "table aliases: TEMP"
    assert isinstance(entry["pid"], int)
