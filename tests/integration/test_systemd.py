"""The daemon under systemd's protocols, without systemd: Type=notify and socket activation.

The test plays the service manager (tests/activation.py): it owns the
notification socket and reads what the daemon reports, with the sender's
pid from the kernel; and for socket activation it binds the listening
socket itself (unix, mode 0600, owned by another user when run as root),
passes it as descriptor 3 with LISTEN_FDS=1 and LISTEN_PID set to the
daemon's own pid, and checks that the daemon serves through it without
binding, chmod'ing, chown'ing or unlinking it.

What the daemon must send (bridge/systemd.py): READY=1 once every
listener accepts; RELOADING=1 (with MONOTONIC_USEC) then READY=1 around
each SIGHUP, also when the new configuration is rejected; STOPPING=1 on
SIGTERM. With ``workers`` every message comes from the main pid, the
only one systemd listens to with NotifyAccess=main.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bridge.protocol import socketmap
from tests.activation import (
    REPO_ROOT,
    NotifyReceiver,
    listening_unix_socket,
    spawn_activated,
)
from tests.integration.conftest import NextPort
from tests.integration.harness import STARTUP_TIMEOUT, Memcached

#: The uid the test gives the activated socket when it runs as root: not
#: the daemon's, so a chown by the daemon would show.
NOBODY = 65534


@dataclass
class Daemon:
    """A ``postfix-bridge serve`` process and its stderr lines."""

    process: subprocess.Popen[str]
    log: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.log)


@contextlib.contextmanager
def run_daemon(
    config: Path, receiver: NotifyReceiver, passed: Sequence[socket.socket] | None = None
) -> Iterator[Daemon]:
    """Start the daemon with NOTIFY_SOCKET (and ``passed`` as descriptors 3..); always stop it."""
    command = [sys.executable, "-m", "bridge", "serve", "--config", str(config)]
    env = {**os.environ, "NOTIFY_SOCKET": receiver.environment_value}
    if passed is None:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    else:
        process = spawn_activated(command, passed, names=["postfix-bridge.socket"], env=env)
    daemon = Daemon(process)

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            daemon.log.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        yield daemon
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        reader.join(timeout=5)


def _config(tmp_path: Path, memcache: str, listeners: str, extra: str = "") -> Path:
    path = tmp_path / "bridge.toml"
    path.write_text(
        f"""
{extra}
{listeners}
[tables.aliases]
memcache = "{memcache}"
key_format = "aliases:%s"
"""
    )
    return path


def _socketmap_listener(endpoint: str, extra: str = "") -> str:
    return f'[[listen]]\nendpoint = "{endpoint}"\nprotocol = "socketmap"\n{extra}\n'


def _lookup(address: str | tuple[str, int], key: bytes) -> bytes:
    """One socketmap lookup on a fresh connection, without retrying the connect."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(address)
        sock.sendall(socketmap.encode_request("aliases", key))
        reply = b""
        while not reply.endswith(b","):
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {reply!r}"
            reply += chunk
    return reply


def _found(value: bytes) -> bytes:
    payload = b"OK " + value
    return b"%d:%s," % (len(payload), payload)


def _count(receiver: NotifyReceiver, assignment: str) -> int:
    """How many received datagrams hold ``assignment`` as one of their lines."""
    return sum(assignment in n.text.split("\n") for n in receiver.received)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[NotifyReceiver]:
    notify_socket = NotifyReceiver(str(tmp_path / "notify"))
    yield notify_socket
    notify_socket.close()


def test_ready_is_sent_only_once_every_listener_accepts(
    tmp_path: Path, memcached: Memcached, ports: NextPort, receiver: NotifyReceiver
) -> None:
    memcached.set(b"aliases:user@example.com", b"user@mail.example.net")
    port, sock_path = ports(), str(tmp_path / "bridge.sock")
    listeners = _socketmap_listener(f"inet:127.0.0.1:{port}") + _socketmap_listener(
        f"unix:{sock_path}"
    )
    with run_daemon(_config(tmp_path, memcached.endpoint, listeners), receiver) as daemon:
        ready = receiver.wait_for("READY=1", timeout=STARTUP_TIMEOUT)
        # No retry: a READY=1 sent before the bind would make these refuse.
        assert _lookup(("127.0.0.1", port), b"user@example.com") == _found(b"user@mail.example.net")
        assert _lookup(sock_path, b"user@example.com") == _found(b"user@mail.example.net")
        assert ready.pid == daemon.process.pid
        assert _count(receiver, "READY=1") == 1


def test_socket_activated_unix_listener_is_used_as_passed(
    tmp_path: Path, memcached: Memcached, receiver: NotifyReceiver
) -> None:
    memcached.set(b"aliases:user@example.com", b"user@mail.example.net")
    sock_path = tmp_path / "bridge.sock"
    # The .socket unit's SocketMode=0600 / SocketUser=; the configuration
    # asks for something else, so any chmod or chown by the daemon shows.
    passed = listening_unix_socket(sock_path, mode=0o600)
    if os.geteuid() == 0:
        os.chown(sock_path, NOBODY, NOBODY)
        ownership = 'mode = "0666"\nowner = "0"\ngroup = "0"'
    else:
        ownership = 'mode = "0666"'
    before = os.stat(sock_path)
    config = _config(
        tmp_path, memcached.endpoint, _socketmap_listener(f"unix:{sock_path}", ownership)
    )
    with run_daemon(config, receiver, [passed]) as daemon:
        # Only the daemon holds the listening socket now, as under systemd
        # (where the manager's copy never accepts).
        passed.close()
        ready = receiver.wait_for("READY=1", timeout=STARTUP_TIMEOUT)
        assert ready.pid == daemon.process.pid
        assert _lookup(str(sock_path), b"user@example.com") == _found(b"user@mail.example.net")
        after = os.stat(sock_path)
        assert (after.st_ino, after.st_dev) == (before.st_ino, before.st_dev), "re-bound"
        assert oct(after.st_mode & 0o7777) == "0o600", "chmod'ed"
        assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid), "chown'ed"

        daemon.process.send_signal(signal.SIGTERM)
        stopping = receiver.wait_for("STOPPING=1")
        assert stopping.pid == daemon.process.pid
        assert daemon.process.wait(timeout=30) == 0, daemon.text
    # The socket file belongs to the service manager: the next start of
    # the service gets the same socket, so the daemon must not unlink it.
    assert sock_path.exists()
    assert os.stat(sock_path).st_ino == before.st_ino


def test_reload_sends_reloading_then_ready(
    tmp_path: Path, memcached: Memcached, ports: NextPort, receiver: NotifyReceiver
) -> None:
    port = ports()
    listeners = _socketmap_listener(f"inet:127.0.0.1:{port}")
    config = _config(tmp_path, memcached.endpoint, listeners)
    with run_daemon(config, receiver) as daemon:
        receiver.wait_for("READY=1", timeout=STARTUP_TIMEOUT)
        before_reload = len(receiver.received)

        daemon.process.send_signal(signal.SIGHUP)
        reloading = receiver.wait_for("RELOADING=1")
        assert int(reloading.fields["MONOTONIC_USEC"]) > 0
        receiver.wait_for("READY=1")
        assert daemon.process.poll() is None

        # A rejected configuration: the old one keeps serving, and systemd
        # must still leave the "reloading" state.
        config.write_text(config.read_text() + "\nno_such_key = 1\n")
        daemon.process.send_signal(signal.SIGHUP)
        receiver.wait_for("RELOADING=1")
        receiver.wait_for("READY=1")
        assert _lookup(("127.0.0.1", port), b"nobody@example.com") == b"9:NOTFOUND ,"
        texts = [n.text.split("\n")[0] for n in receiver.received[before_reload:]]
        assert texts == ["RELOADING=1", "READY=1", "RELOADING=1", "READY=1"]
        assert {n.pid for n in receiver.received} == {daemon.process.pid}


def test_inherited_socket_without_a_listener_is_closed(
    tmp_path: Path, memcached: Memcached, ports: NextPort, receiver: NotifyReceiver
) -> None:
    memcached.set(b"aliases:user@example.com", b"user@mail.example.net")
    port = ports()
    stray = socket.create_server(("127.0.0.1", 0))
    stray_port = stray.getsockname()[1]
    config = _config(tmp_path, memcached.endpoint, _socketmap_listener(f"inet:127.0.0.1:{port}"))
    with run_daemon(config, receiver, [stray]) as daemon:
        stray.close()
        receiver.wait_for("READY=1", timeout=STARTUP_TIMEOUT)
        # The configured listener, not passed, was bound as usual.
        assert _lookup(("127.0.0.1", port), b"user@example.com") == _found(b"user@mail.example.net")
        assert f"127.0.0.1:{stray_port}" in daemon.text
        assert "matches no [[listen]]" in daemon.text
        # Closed by the daemon: nobody holds it any more.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", stray_port), timeout=5).close()


def test_workers_notify_from_the_main_pid_only(
    tmp_path: Path, memcached: Memcached, receiver: NotifyReceiver
) -> None:
    memcached.set(b"aliases:user@example.com", b"user@mail.example.net")
    sock_path = tmp_path / "bridge.sock"
    passed = listening_unix_socket(sock_path, mode=0o600)
    config = _config(
        tmp_path,
        memcached.endpoint,
        _socketmap_listener(f"unix:{sock_path}"),
        extra="workers = 2",
    )
    with run_daemon(config, receiver, [passed]) as daemon:
        passed.close()
        receiver.wait_for("READY=1", timeout=STARTUP_TIMEOUT)
        for _ in range(8):
            assert _lookup(str(sock_path), b"user@example.com") == _found(b"user@mail.example.net")
        daemon.process.send_signal(signal.SIGTERM)
        receiver.wait_for("STOPPING=1")
        assert daemon.process.wait(timeout=30) == 0, daemon.text
    # systemd (NotifyAccess=main) would drop a worker's message with a warning.
    assert {n.pid for n in receiver.received} == {daemon.process.pid}
    assert _count(receiver, "READY=1") == 1
    assert sock_path.exists()
