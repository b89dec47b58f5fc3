"""workers = N: a supervisor and N serving processes on the same listeners."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from tests.integration.conftest import NextPort
from tests.integration.harness import Memcached, postmap_query, postmap_query_many, run_bridge


def _children(pid: int) -> set[int]:
    tasks = Path(f"/proc/{pid}/task")
    children: set[int] = set()
    for task in tasks.iterdir():
        text = (task / "children").read_text().split()
        children.update(int(child) for child in text)
    return children


def _wait_for(condition: object, what: str, timeout: float = 20) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_workers_serve_reload_survive_a_crash_and_stop(
    memcached: Memcached, tmp_path: Path, ports: NextPort
) -> None:
    port = ports()
    sock = tmp_path / "bridge.sock"
    config = tmp_path / "bridge.toml"
    config.write_text(
        "workers = 2\n"
        f'[[listen]]\nendpoint = "inet:127.0.0.1:{port}"\nprotocol = "socketmap"\n'
        f'[[listen]]\nendpoint = "unix:{sock}"\nprotocol = "socketmap"\n'
        f'[tables.aliases]\nmemcache = "{memcached.endpoint}"\n'
    )
    keys = [f"k{i}" for i in range(200)]
    for key in keys:
        memcached.set(key.encode(), b"v-" + key.encode())
    expected = "".join(f"{key}\tv-{key}\n" for key in keys)
    with run_bridge(config) as bridge:
        supervisor = bridge.process.pid
        _wait_for(lambda: len(_children(supervisor)) == 2, "two workers")
        bridge.wait_for_log(r"supervising 2 workers")
        for table in (f"socketmap:inet:127.0.0.1:{port}:aliases", f"socketmap:unix:{sock}:aliases"):
            result = postmap_query_many(keys, table)
            assert result.stdout == expected, result

        # SIGHUP reaches every worker: each reloads.
        mark = len(bridge.log)
        bridge.signal(signal.SIGHUP)
        _wait_for(lambda: sum("reloaded" in line for line in bridge.log[mark:]) == 2, "two reloads")

        # A worker that dies is replaced; lookups keep working.
        victim = min(_children(supervisor))
        os.kill(victim, signal.SIGKILL)
        _wait_for(
            lambda: len(_children(supervisor)) == 2 and victim not in _children(supervisor),
            "a replacement worker",
        )
        bridge.wait_for_log(r"worker \d+ exited .*restarting")
        table = f"socketmap:inet:127.0.0.1:{port}:aliases"
        for key in keys[:20]:
            assert postmap_query(key, table).outcome == f"found:v-{key}"

        bridge.signal(signal.SIGTERM)
        assert bridge.process.wait(timeout=60) == 0
    assert not sock.exists()


def _get(port: int, path: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _sample_sum(exposition: bytes, name: str) -> float:
    """The sum of one metric's samples over every label set."""
    total = 0.0
    for line in exposition.decode().splitlines():
        match = re.fullmatch(r"(\w+)(?:\{.*\})? (\S+)", line)
        if match and match[1] == name:
            total += float(match[2])
    return total


def _served_by(directory: Path, pid: int) -> float:
    """Lookups answered by one worker, from its own counter file."""
    path = directory / f"counter_{pid}.db"
    if not path.exists():
        return 0.0
    merged: list[Metric] = list(
        MultiProcessCollector.merge([str(path)])  # type: ignore[no-untyped-call]
    )
    return sum(
        float(sample.value)
        for metric in merged
        if metric.name == "postfix_bridge_requests"
        for sample in metric.samples
        if sample.name == "postfix_bridge_requests_total"
    )


def test_metrics_are_summed_over_the_workers(
    memcached: Memcached, tmp_path: Path, ports: NextPort, monkeypatch: pytest.MonkeyPatch
) -> None:
    port, metrics_port = ports(), ports()
    run_dir = tmp_path / "tmp"
    run_dir.mkdir()
    monkeypatch.setenv("TMPDIR", str(run_dir))
    config = tmp_path / "bridge.toml"
    config.write_text(
        "workers = 2\n"
        f'[metrics]\nendpoint = "inet:127.0.0.1:{metrics_port}"\nhealth_interval = 0.2\n'
        f'[[listen]]\nendpoint = "inet:127.0.0.1:{port}"\nprotocol = "socketmap"\n'
        f'[tables.aliases]\nmemcache = "{memcached.endpoint}"\n'
    )
    keys = [f"k{i}" for i in range(5)]
    for key in keys:
        memcached.set(key.encode(), b"v")
    table = f"socketmap:inet:127.0.0.1:{port}:aliases"
    with run_bridge(config) as bridge:
        supervisor = bridge.process.pid
        _wait_for(lambda: len(_children(supervisor)) == 2, "two workers")
        _wait_for(lambda: sum("ready: listening" in line for line in bridge.log) == 2, "ready")
        (directory,) = run_dir.glob("postfix-bridge-metrics-*")
        workers = sorted(_children(supervisor))

        # One connection per postmap run: go on until both workers served some.
        made = 0
        while made < 1000 and not all(_served_by(directory, pid) > 0 for pid in workers):
            assert postmap_query_many(keys, table).returncode == 0
            made += len(keys)
        assert all(_served_by(directory, pid) > 0 for pid in workers), made
        assert sum(_served_by(directory, pid) for pid in workers) == made
        # Whichever worker answers the scrape reports the sum.
        for _ in range(10):
            status, body = _get(metrics_port, "/metrics")
            assert status == 200
            assert _sample_sum(body, "postfix_bridge_requests_total") == made
            assert _sample_sum(body, "postfix_bridge_request_seconds_count") == made
        status, health = _get(metrics_port, "/healthz")
        assert status == 200 and json.loads(health)["status"] == "ok"
        # The health gauge: the lowest over the live workers (each probes).
        _wait_for(
            lambda: _sample_sum(_get(metrics_port, "/metrics")[1], "postfix_bridge_healthy") == 1,
            "healthy gauge",
        )

        # A worker killed and replaced: its lookups stay counted, its live
        # gauge (open connections) goes.
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        _wait_for(
            lambda: len(_children(supervisor)) == 2 and victim not in _children(supervisor),
            "a replacement worker",
        )
        _wait_for(
            lambda: not (directory / f"gauge_livesum_{victim}.db").exists(), "dead worker's gauge"
        )
        assert (directory / f"counter_{victim}.db").exists()
        assert postmap_query_many(keys, table).returncode == 0
        made += len(keys)
        for _ in range(10):
            _, body = _get(metrics_port, "/metrics")
            assert _sample_sum(body, "postfix_bridge_requests_total") == made
            assert _sample_sum(body, "postfix_bridge_open_connections") == 0

        bridge.signal(signal.SIGTERM)
        assert bridge.process.wait(timeout=60) == 0
    assert not directory.exists()
    assert list(run_dir.iterdir()) == []
