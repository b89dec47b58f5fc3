"""workers = N: a supervisor and N serving processes on the same listeners."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

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
