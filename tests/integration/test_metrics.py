"""Prometheus metrics and health checks against the running daemon."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.conftest import NextPort, StartBridge
from tests.integration.harness import (
    Memcached,
    postmap_query,
    postmap_query_many,
    run_memcached,
)


def _get(port: int, path: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _sample(exposition: bytes, name: str, **labels: str) -> float:
    """The value of one sample; 0 when it was never recorded."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in exposition.decode().splitlines():
        match = re.fullmatch(r"(\w+)\{(.*)\} (\S+)", line)
        if match and match[1] == name:
            found = ",".join(sorted(match[2].split(",")))
            if found == wanted:
                return float(match[3])
    return 0.0


def _config(path: Path, memcache: str, *, sm: int, tcp: int, metrics: int, extra: str = "") -> Path:
    path.write_text(
        f'[metrics]\nendpoint = "inet:127.0.0.1:{metrics}"\nhealth_interval = 0.2\n'
        f'[[listen]]\nendpoint = "inet:127.0.0.1:{sm}"\nprotocol = "socketmap"\n'
        f'[[listen]]\nendpoint = "inet:127.0.0.1:{tcp}"\nprotocol = "tcp"\ntable = "aliases"\n'
        f'[tables.aliases]\nmemcache = "{memcache}"\n{extra}'
    )
    return path


def test_counters_move_by_exactly_the_lookups_made(
    memcached: Memcached, tmp_path: Path, ports: NextPort, start_bridge: StartBridge
) -> None:
    sm, tcp, metrics_port = ports(), ports(), ports()
    backup = tmp_path / "backup"
    backup.write_text("b1 from-backup\nb2 from-backup\n")
    extra = f'backup = "texthash:{backup}"\n'
    start_bridge(
        _config(
            tmp_path / "bridge.toml",
            memcached.endpoint,
            sm=sm,
            tcp=tcp,
            metrics=metrics_port,
            extra=extra,
        )
    )
    _, before = _get(metrics_port, "/metrics")
    for i in range(7):
        memcached.set(b"k%d" % i, b"v")
    socketmap_table = f"socketmap:inet:127.0.0.1:{sm}:aliases"
    # socketmap: 7 found in memcache, 2 from the backup (refilled), 3 not found
    keys = [f"k{i}" for i in range(7)] + ["b1", "b2"] + ["x1", "x2", "x3"]
    assert postmap_query_many(keys, socketmap_table).returncode == 0
    # tcp: 2 found, 1 not found
    for key, outcome in (("k0", "found:v"), ("k1", "found:v"), ("nope", "notfound")):
        assert postmap_query(key, f"tcp:127.0.0.1:{tcp}").outcome == outcome
    status, after = _get(metrics_port, "/metrics")
    assert status == 200

    def moved(name: str, **labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    requests = "postfix_bridge_requests_total"
    assert moved(requests, table="aliases", protocol="socketmap", result="found") == 9
    assert moved(requests, table="aliases", protocol="socketmap", result="notfound") == 3
    assert moved(requests, table="aliases", protocol="tcp_table", result="found") == 2
    assert moved(requests, table="aliases", protocol="tcp_table", result="notfound") == 1
    assert moved(requests, table="aliases", protocol="socketmap", result="temp") == 0
    # b1 b2 x1 x2 x3 over socketmap, nope over tcp: every memcache miss.
    assert moved("postfix_bridge_backup_lookups_total", table="aliases") == 6
    assert moved("postfix_bridge_backup_refills_total", table="aliases") == 2
    server = f"inet:127.0.0.1:{memcached.port}"
    # 15 gets + 2 refill sets, plus the health probes' version commands.
    assert moved("postfix_bridge_memcache_roundtrips_total", server=server) >= 17
    assert moved("postfix_bridge_memcache_errors_total", server=server) == 0
    count = _sample(
        after, "postfix_bridge_request_seconds_count", table="aliases", protocol="socketmap"
    ) - _sample(
        before, "postfix_bridge_request_seconds_count", table="aliases", protocol="socketmap"
    )
    assert count == 12


def _health_cli(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", "health", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _wait_for_status(port: int, wanted: int) -> dict[str, object]:
    deadline = time.monotonic() + 20
    while True:
        status, body = _get(port, "/healthz")
        if status == wanted:
            parsed: dict[str, object] = json.loads(body)
            return parsed
        assert time.monotonic() < deadline, (status, body)
        time.sleep(0.1)


def test_healthz_and_the_health_command_follow_memcache(
    tmp_path: Path, ports: NextPort, start_bridge: StartBridge
) -> None:
    sm, tcp, metrics_port, mc_port = ports(), ports(), ports(), ports()
    config = _config(
        tmp_path / "bridge.toml", f"inet:127.0.0.1:{mc_port}", sm=sm, tcp=tcp, metrics=metrics_port
    )
    with run_memcached(mc_port) as memcached:
        start_bridge(config)
        body = _wait_for_status(metrics_port, 200)
        assert body["status"] == "ok"
        assert _health_cli(config).returncode == 0
        memcached.process.kill()
        memcached.process.wait()
        body = _wait_for_status(metrics_port, 503)
        tables = body["tables"]
        assert isinstance(tables, dict) and tables["aliases"]["ok"] is False
        result = _health_cli(config)
        assert result.returncode == 1
        assert "aliases" in result.stdout


def test_health_command_without_metrics_probes_a_listener(
    tmp_path: Path, ports: NextPort, start_bridge: StartBridge
) -> None:
    sm, mc_port = ports(), ports()
    config = tmp_path / "bridge.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "inet:127.0.0.1:{sm}"\nprotocol = "socketmap"\n'
        f'[tables.aliases]\nmemcache = "inet:127.0.0.1:{mc_port}"\n'
        # A filtered table: a probe key outside it would never reach memcache.
        'domain = "example.com"\n'
    )
    assert _health_cli(config).returncode == 1  # no daemon yet
    with run_memcached(mc_port):
        start_bridge(config)
        assert _health_cli(config).returncode == 0
    # memcached gone: the probe lookup is answered TEMP.
    result = _health_cli(config)
    assert result.returncode == 1
    assert "TEMP" in result.stdout


def test_cache_hits_and_the_health_gauge(
    memcached: Memcached, tmp_path: Path, ports: NextPort, start_bridge: StartBridge
) -> None:
    sm, tcp, metrics_port = ports(), ports(), ports()
    backup = tmp_path / "backup"
    backup.write_text("b1 from-backup\n")
    extra = f'backup = "texthash:{backup}"\nhot_cache_ttl = 600\n'
    config = _config(
        tmp_path / "bridge.toml",
        memcached.endpoint,
        sm=sm,
        tcp=tcp,
        metrics=metrics_port,
        extra=extra,
    )
    start_bridge(config)
    memcached.set(b"k0", b"v")
    # Each key twice: memcache, backup (found) and backup (not found) the
    # first time, the hot cache the second.
    keys = ["k0", "k0", "b1", "b1", "x1", "x1"]
    table = f"socketmap:inet:127.0.0.1:{sm}:aliases"
    assert postmap_query_many(keys, table).returncode == 0
    _, after = _get(metrics_port, "/metrics")
    hits = "postfix_bridge_cache_hits_total"
    assert _sample(after, hits, table="aliases", cache="memcache") == 1
    assert _sample(after, hits, table="aliases", cache="hot") == 3
    assert _sample(after, "postfix_bridge_backup_lookups_total", table="aliases") == 2

    def wait_for_healthy(wanted: float) -> None:
        deadline = time.monotonic() + 20
        while True:
            _, body = _get(metrics_port, "/metrics")
            match = re.search(rb"^postfix_bridge_healthy (\S+)$", body, re.MULTILINE)
            if match and float(match[1]) == wanted:
                return
            assert time.monotonic() < deadline, body
            time.sleep(0.1)

    wait_for_healthy(1)
    memcached.process.kill()
    memcached.process.wait()
    wait_for_healthy(0)
    _wait_for_status(metrics_port, 503)
