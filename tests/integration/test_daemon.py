"""The daemon end to end: Postfix's postmap -> bridge -> real memcached.

Each test starts its own memcached and bridge on free loopback ports (or
unix sockets in tmp_path) and asks with Postfix's own client.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import NextPort, StartBridge, WriteConfig
from tests.integration.harness import (
    Memcached,
    age_file,
    closed_port,
    postmap_query,
    postmap_query_many,
    run_memcached,
)


def _config(sm_port: int, tcp_port: int, memcache: str, extra: str = "", sock: str = "") -> str:
    unix = f'\n[[listen]]\nendpoint = "unix:{sock}"\nprotocol = "socketmap"\n' if sock else ""
    return f"""
[[listen]]
endpoint = "inet:127.0.0.1:{sm_port}"
protocol = "socketmap"

[[listen]]
endpoint = "inet:127.0.0.1:{tcp_port}"
protocol = "tcp"
table = "aliases"
{unix}
[tables.aliases]
memcache = "{memcache}"
key_format = "aliases:%s"
{extra}
"""


@pytest.fixture
def served(
    memcached: Memcached,
    write_config: WriteConfig,
    start_bridge: StartBridge,
    ports: NextPort,
    tmp_path: Path,
) -> tuple[Memcached, int, int, str]:
    next_port = ports
    sm_port, tcp_port = next_port(), next_port()
    sock = str(tmp_path / "bridge.sock")
    start_bridge(write_config(_config(sm_port, tcp_port, memcached.endpoint, sock=sock)))
    return memcached, sm_port, tcp_port, sock


def test_found_over_socketmap_tcp_and_unix(served: tuple[Memcached, int, int, str]) -> None:
    memcached, sm_port, tcp_port, sock = served
    memcached.set(b"aliases:user@example.com", b"user@mail.example.net")
    for table in (
        f"socketmap:inet:127.0.0.1:{sm_port}:aliases",
        f"socketmap:unix:{sock}:aliases",
        f"tcp:127.0.0.1:{tcp_port}",
    ):
        result = postmap_query("User@Example.COM", table)
        assert result.outcome == "found:user@mail.example.net", (table, result)


def test_not_found_and_unknown_table(served: tuple[Memcached, int, int, str]) -> None:
    _, sm_port, tcp_port, _ = served
    missing = postmap_query("nobody@example.com", f"socketmap:inet:127.0.0.1:{sm_port}:aliases")
    assert (missing.returncode, missing.fatal) == (1, False)
    assert postmap_query("nobody@example.com", f"tcp:127.0.0.1:{tcp_port}").outcome == "notfound"
    unknown = postmap_query("x", f"socketmap:inet:127.0.0.1:{sm_port}:nosuchtable")
    # PERM -> Postfix CONFIG: "query error" with no reason after it (PM-1).
    assert unknown.fatal and unknown.returncode == 1


def test_many_keys_on_one_connection(served: tuple[Memcached, int, int, str]) -> None:
    memcached, sm_port, tcp_port, _ = served
    keys = [f"u{i}@example.com" for i in range(200)]
    for i, key in enumerate(keys):
        if i % 2 == 0:
            memcached.set(b"aliases:" + key.encode(), f"v{i}".encode())
    expected = "".join(f"{key}\tv{i}\n" for i, key in enumerate(keys) if i % 2 == 0)
    for table in (f"socketmap:inet:127.0.0.1:{sm_port}:aliases", f"tcp:127.0.0.1:{tcp_port}"):
        result = postmap_query_many(keys, table)
        assert result.returncode == 0 and not result.fatal, result
        assert result.stdout == expected


def test_memcache_down_is_an_error_then_recovers(
    write_config: WriteConfig, start_bridge: StartBridge, ports: NextPort
) -> None:
    next_port = ports
    mc_port, sm_port, tcp_port = next_port(), next_port(), next_port()
    start_bridge(write_config(_config(sm_port, tcp_port, f"inet:127.0.0.1:{mc_port}")))
    socketmap_table = f"socketmap:inet:127.0.0.1:{sm_port}:aliases"
    # Nothing listens on mc_port: a refused connection is TEMP, never NOTFOUND.
    down = postmap_query("user@example.com", socketmap_table)
    assert down.fatal, down
    assert postmap_query("user@example.com", f"tcp:127.0.0.1:{tcp_port}").fatal
    with run_memcached(mc_port) as memcached:
        memcached.set(b"aliases:user@example.com", b"back")
        # The same bridge process answers again, without a restart.
        assert postmap_query("user@example.com", socketmap_table).outcome == "found:back"
        assert postmap_query("user@example.com", f"tcp:127.0.0.1:{tcp_port}").outcome == (
            "found:back"
        )


def test_backup_answers_and_refills(
    memcached: Memcached,
    write_config: WriteConfig,
    start_bridge: StartBridge,
    ports: NextPort,
    tmp_path: Path,
) -> None:
    next_port = ports
    backup = tmp_path / "aliases"
    backup.write_text("BK1@example.com backupvalue\n")
    sm_port, tcp_port = next_port(), next_port()
    extra = f'backup = "texthash:{backup}"\nflags = 7\nttl = 100\n'
    start_bridge(write_config(_config(sm_port, tcp_port, memcached.endpoint, extra)))
    table = f"socketmap:inet:127.0.0.1:{sm_port}:aliases"
    assert postmap_query("bk1@example.com", table).outcome == "found:backupvalue"
    assert memcached.get(b"aliases:bk1@example.com") == (7, b"backupvalue")
    assert postmap_query("zz@example.com", table).outcome == "notfound"


def test_sigterm_exits_zero_and_sighup_reloads(
    memcached: Memcached, write_config: WriteConfig, start_bridge: StartBridge, ports: NextPort
) -> None:
    next_port = ports
    sm_port, tcp_port = next_port(), next_port()
    path = write_config(_config(sm_port, tcp_port, memcached.endpoint))
    bridge = start_bridge(path)
    table = f"socketmap:inet:127.0.0.1:{sm_port}:aliases"
    memcached.set(b"aliases:a@example.com", b"old-format")
    memcached.set(b"new:a@example.com", b"new-format")
    assert postmap_query("a@example.com", table).outcome == "found:old-format"

    # An invalid new configuration is logged and the old one keeps serving.
    path.write_text(path.read_text().replace('key_format = "aliases:%s"', 'key_format = "%x"'))
    mark = len(bridge.log)
    bridge.signal(signal.SIGHUP)
    bridge.wait_for_log(r"reload of .* failed", start=mark)
    assert postmap_query("a@example.com", table).outcome == "found:old-format"

    path.write_text(path.read_text().replace('key_format = "%x"', 'key_format = "new:%s"'))
    mark = len(bridge.log)
    bridge.signal(signal.SIGHUP)
    bridge.wait_for_log(r"reloaded", start=mark)
    assert postmap_query("a@example.com", table).outcome == "found:new-format"

    bridge.signal(signal.SIGTERM)
    assert bridge.process.wait(timeout=30) == 0


def test_bad_config_names_file_table_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[[listen]]\nendpoint = "inet:127.0.0.1:1"\nprotocol = "socketmap"\n'
        "[tables.aliases]\nmax_try = 0\n"
    )
    for command in ("serve", "check"):
        completed = subprocess.run(
            [sys.executable, "-m", "bridge", command, "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert completed.returncode == 78, completed
        assert str(path) in completed.stderr
        assert "aliases" in completed.stderr and "max_try" in completed.stderr


def test_query_command_exit_statuses(memcached: Memcached, tmp_path: Path) -> None:
    cf = tmp_path / "t.cf"
    cf.write_text(f"memcache = {memcached.endpoint}\nkey_format = t:%s\n")
    age_file(cf)
    path = tmp_path / "bridge.toml"
    path.write_text(
        '[[listen]]\nendpoint = "inet:127.0.0.1:1"\nprotocol = "socketmap"\n'
        f'[tables.t]\nconfig = "{cf}"\n'
        f'[tables.down]\nmemcache = "inet:127.0.0.1:{closed_port()}"\n'
    )
    memcached.set(b"t:k", b"value")

    def query(table: str, key: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bridge", "query", "--config", str(path), table, key],
            capture_output=True,
            text=True,
            input=stdin,
            timeout=60,
            check=False,
        )

    found = query("t", "K")
    assert (found.returncode, found.stdout) == (0, "value\n")
    assert query("t", "other").returncode == 1
    assert query("down", "k").returncode == 75
    many = query("t", "-", stdin="k\nother\n")
    assert (many.returncode, many.stdout) == (0, "k\tvalue\n")


def test_memcached_restart_under_a_running_bridge(
    write_config: WriteConfig, start_bridge: StartBridge, ports: NextPort
) -> None:
    mc_port, sm_port, tcp_port = ports(), ports(), ports()
    start_bridge(write_config(_config(sm_port, tcp_port, f"inet:127.0.0.1:{mc_port}")))
    tables = (f"socketmap:inet:127.0.0.1:{sm_port}:aliases", f"tcp:127.0.0.1:{tcp_port}")
    with run_memcached(mc_port) as memcached:
        memcached.set(b"aliases:user@example.com", b"first")
        for table in tables:
            # Leaves pooled connections to this memcached in the bridge.
            assert postmap_query("user@example.com", table).outcome == "found:first"
    # memcached is gone; the pooled connections are dead: TEMP, never NOTFOUND.
    for table in tables:
        assert postmap_query("user@example.com", table).outcome == "error"
    with run_memcached(mc_port) as memcached:
        memcached.set(b"aliases:user@example.com", b"second")
        for table in tables:
            assert postmap_query("user@example.com", table).outcome == "found:second"
