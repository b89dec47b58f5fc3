"""Listener security, privilege drop and port takeover, against the real daemon."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.conftest import NextPort, StartBridge
from tests.integration.harness import Memcached, postmap_query, run_bridge
from tests.reliability import ReliabilityReport

NOBODY = pwd.getpwnam("nobody")


def _base(memcached: Memcached) -> str:
    return f'[tables.aliases]\nmemcache = "{memcached.endpoint}"\n'


def _ask(address: tuple[str, int] | str, key: bytes) -> bytes:
    """One socketmap lookup; b"" when the server closed without answering."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(address)
        payload = b"aliases " + key
        try:
            sock.sendall(b"%d:%s," % (len(payload), payload))
            return sock.recv(65536)
        except ConnectionResetError:
            return b""


def test_allow_refuses_other_clients_at_accept(
    memcached: Memcached, tmp_path: Path, ports: NextPort, start_bridge: StartBridge
) -> None:
    open_port, closed_port = ports(), ports()
    config = tmp_path / "bridge.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "inet:127.0.0.1:{open_port}"\nprotocol = "socketmap"\n'
        'allow = ["127.0.0.0/8", "::1/128"]\n'
        f'[[listen]]\nendpoint = "inet:127.0.0.1:{closed_port}"\nprotocol = "socketmap"\n'
        'allow = ["10.1.0.0/16"]\n' + _base(memcached)
    )
    bridge = start_bridge(config)
    memcached.set(b"k", b"v")
    assert _ask(("127.0.0.1", open_port), b"k") == b"4:OK v,"
    assert _ask(("127.0.0.1", closed_port), b"k") == b""
    bridge.wait_for_log(r"refused connection from 127\.0\.0\.1 \(not in allow\)")


def test_unix_socket_mode_and_owner(
    memcached: Memcached, tmp_path: Path, start_bridge: StartBridge
) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing a socket's owner needs root (CI runs as root)")
    sock = tmp_path / "bridge.sock"
    config = tmp_path / "bridge.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "unix:{sock}"\nprotocol = "socketmap"\n'
        'mode = "0660"\nowner = "nobody"\n' + _base(memcached)
    )
    start_bridge(config)
    info = os.stat(sock)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_uid == NOBODY.pw_uid
    memcached.set(b"k", b"v")
    assert _ask(str(sock), b"k") == b"4:OK v,"


def _uids(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    gid_line = next(line for line in status.splitlines() if line.startswith("Gid:"))
    return int(uid_line.split()[2]), int(gid_line.split()[2])  # effective ids


def test_drops_privileges_after_binding_and_warns_when_root(
    memcached: Memcached, tmp_path: Path, ports: NextPort, start_bridge: StartBridge
) -> None:
    if os.geteuid() != 0:
        pytest.skip("dropping privileges needs root (CI runs as root)")
    port = ports()
    listen = f'[[listen]]\nendpoint = "inet:127.0.0.1:{port}"\nprotocol = "socketmap"\n'
    config = tmp_path / "bridge.toml"
    config.write_text('user = "nobody"\n' + listen + _base(memcached))
    bridge = start_bridge(config)
    assert _uids(bridge.process.pid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    memcached.set(b"k", b"v")
    assert postmap_query("k", f"socketmap:inet:127.0.0.1:{port}:aliases").outcome == "found:v"

    root_config = tmp_path / "root.toml"
    root_config.write_text(listen.replace(str(port), str(ports())) + _base(memcached))
    as_root = start_bridge(root_config)
    as_root.wait_for_log(r"running as root: set user")


def test_a_second_instance_takes_over_the_port_without_a_failed_lookup(
    memcached: Memcached, tmp_path: Path, ports: NextPort
) -> None:
    """Zero-downtime upgrade: start the new instance, stop the old one.

    Postfix's client is the judge: a connection still queued at the old
    listener when it closes is reset, which postmap's socketmap client
    retries once at once (SM-15), so no lookup may fail.
    """
    port = ports()
    config = tmp_path / "bridge.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "inet:127.0.0.1:{port}"\nprotocol = "socketmap"\n'
        + _base(memcached)
    )
    memcached.set(b"k", b"v")
    table = f"socketmap:inet:127.0.0.1:{port}:aliases"
    outcomes: list[str] = []
    stop = threading.Event()

    def client() -> None:
        # A new Postfix client process, so a new connection, for every lookup.
        while not stop.is_set():
            outcomes.append(postmap_query("k", table).outcome)

    with run_bridge(config) as old, run_bridge(config) as new:
        # Both instances share the port now.
        thread = threading.Thread(target=client)
        thread.start()
        try:
            while len(outcomes) < 20:
                threading.Event().wait(0.01)
            old.signal(signal.SIGTERM)
            assert old.process.wait(timeout=30) == 0
            after = len(outcomes)
            while len(outcomes) < after + 20:
                assert new.process.poll() is None
                threading.Event().wait(0.01)
        finally:
            stop.set()
            thread.join(timeout=60)
    failures = [outcome for outcome in outcomes if outcome != "found:v"]
    assert len(outcomes) >= 40
    assert not failures, failures[:5]


def test_listener_security_keys_are_checked(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(
        'user = "no-such-user-here"\n'
        '[[listen]]\nendpoint = "inet:127.0.0.1:1"\nprotocol = "socketmap"\n'
        'allow = ["not-a-network"]\nmode = "0660"\n'
        f'[[listen]]\nendpoint = "unix:{tmp_path}/s"\nprotocol = "socketmap"\n'
        'allow = ["127.0.0.1"]\nmode = "999"\nowner = "no-such-user-here"\n'
        '[tables.aliases]\nmemcache = "inet:127.0.0.1:11211"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 78
    for expected in (
        "listener #1: allow: 'not-a-network' is not an address or network",
        "listener #1: mode: only for unix: listeners",
        "listener #2: allow: only for inet: listeners",
        "listener #2: mode: must be an octal permission string",
        "listener #2: owner: no such user 'no-such-user-here'",
        "user: no such user 'no-such-user-here'",
    ):
        assert expected in result.stderr, (expected, result.stderr)


def test_a_request_that_trickles_in_is_cut_at_request_timeout(
    memcached: Memcached,
    tmp_path: Path,
    ports: NextPort,
    start_bridge: StartBridge,
    reliability: ReliabilityReport,
) -> None:
    port = ports()
    config = tmp_path / "bridge.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "inet:127.0.0.1:{port}"\nprotocol = "socketmap"\n'
        "idle_timeout = 100\nrequest_timeout = 1\n" + _base(memcached)
    )
    start_bridge(config)
    request = b"9:aliases k,"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        closed_after: float | None = None
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
                break
            time.sleep(0.2)  # a slowloris sender: each byte would restart an idle timer
        if closed_after is None:
            data = sock.recv(100)
            closed_after = time.monotonic() - started
            assert data == b"", data
    # Cut at about 1 s, long before the 100 s idle timeout or the full request.
    assert 0.9 <= closed_after < 5, closed_after
    reliability.record(
        "hostile client",
        "request sent 1 byte per 0.2 s (request_timeout = 1)",
        requests=1,
        correct=1,
        bound=f"closed after {closed_after:.1f}s",
    )
