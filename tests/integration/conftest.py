"""Fixtures: a real memcached, a config writer, the running bridge."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Bridge, Memcached, free_port, run_bridge, run_memcached


@pytest.fixture
def memcached() -> Iterator[Memcached]:
    with run_memcached() as server:
        yield server


NextPort = Callable[[], int]


@pytest.fixture
def ports() -> NextPort:
    """Hands out distinct free loopback ports."""
    handed: set[int] = set()

    def next_port() -> int:
        while True:
            port = free_port()
            if port not in handed:
                handed.add(port)
                return port

    return next_port


WriteConfig = Callable[[str], Path]


@pytest.fixture
def write_config(tmp_path: Path) -> WriteConfig:
    """Write a bridge TOML file into tmp_path and return its path."""

    def write(text: str) -> Path:
        path = tmp_path / "bridge.toml"
        path.write_text(text)
        return path

    return write


StartBridge = Callable[[Path], Bridge]


@pytest.fixture
def start_bridge() -> Iterator[StartBridge]:
    """Start bridge daemons; every one is stopped at the end of the test."""
    stack: list[object] = []
    started: list[Bridge] = []

    def start(config: Path) -> Bridge:
        manager = run_bridge(config)
        bridge = manager.__enter__()
        stack.append(manager)
        started.append(bridge)
        return bridge

    yield start
    for manager in reversed(stack):
        manager.__exit__(None, None, None)  # type: ignore[attr-defined]
