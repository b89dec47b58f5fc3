"""Unix listener ownership: never take a live socket, never remove another's.

Real daemons on a unix socket in tmp_path, asked with Postfix's own
client: a second instance on the same path must refuse to start and
leave the first one reachable; a stale socket file (its process gone) is
replaced; and an instance removes at exit only the socket file it bound.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bridge.listeners import probe_unix_socket
from tests.faults.proxy import FaultProxy, Pass, Stall
from tests.integration.harness import Memcached, postmap_query, run_bridge

#: What the serve command exits with when a listener cannot be bound (EX_OSERR).
EXIT_OSERR = 71


def _write_config(path: Path, sock: Path, memcached: Memcached, *, workers: int = 1) -> Path:
    path.write_text(
        f"workers = {workers}\n"
        f'[[listen]]\nendpoint = "unix:{sock}"\nprotocol = "socketmap"\n'
        f'[tables.aliases]\nmemcache = "{memcached.endpoint}"\nkey_format = "aliases:%s"\n'
    )
    return path


def _serve_once(config: Path) -> subprocess.CompletedProcess[str]:
    """Run ``postfix-bridge serve`` expecting it to give up at start."""
    return subprocess.run(
        [sys.executable, "-m", "bridge", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _inode(path: Path) -> tuple[int, int]:
    info = os.lstat(path)
    return info.st_dev, info.st_ino


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _stale_socket(path: Path) -> None:
    """Leave a socket file whose process is gone: bound, closed, never unlinked."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen()


@pytest.mark.parametrize("workers", [1, 2])
def test_second_instance_refuses_a_live_socket(
    memcached: Memcached, tmp_path: Path, workers: int
) -> None:
    sock = tmp_path / "bridge.sock"
    table = f"socketmap:unix:{sock}:aliases"
    memcached.set(b"aliases:user@example.com", b"first-instance")
    first_config = _write_config(tmp_path / "first.toml", sock, memcached, workers=workers)
    with run_bridge(first_config) as first:
        assert postmap_query("user@example.com", table).outcome == "found:first-instance"
        served = _inode(sock)

        second = _serve_once(_write_config(tmp_path / "second.toml", sock, memcached))
        assert second.returncode == EXIT_OSERR, second
        assert (
            f"cannot listen: unix:{sock}: address in use: another process answers on this socket"
            in second.stderr
        ), second.stderr

        # The first instance's socket is untouched and still answers.
        assert _inode(sock) == served
        assert postmap_query("user@example.com", table).outcome == "found:first-instance"
        assert first.process.poll() is None

        first.signal(signal.SIGTERM)
        assert first.process.wait(timeout=60) == 0
    # Its own socket file: removed at exit.
    assert not sock.exists()


def test_a_stale_socket_is_replaced_and_served(memcached: Memcached, tmp_path: Path) -> None:
    sock = tmp_path / "bridge.sock"
    _stale_socket(sock)
    memcached.set(b"aliases:user@example.com", b"after-stale")
    with run_bridge(_write_config(tmp_path / "bridge.toml", sock, memcached)) as bridge:
        # Not compared by inode: ext4 may give the new file the stale one's number.
        bridge.wait_for_log(r"replacing a stale socket")
        table = f"socketmap:unix:{sock}:aliases"
        assert postmap_query("user@example.com", table).outcome == "found:after-stale"
        bridge.signal(signal.SIGTERM)
        assert bridge.process.wait(timeout=60) == 0
    assert not sock.exists()


def test_a_path_that_is_not_a_socket_is_refused_and_left_alone(
    memcached: Memcached, tmp_path: Path
) -> None:
    path = tmp_path / "bridge.sock"
    path.write_text("not a socket\n")
    completed = _serve_once(_write_config(tmp_path / "bridge.toml", path, memcached))
    assert completed.returncode == EXIT_OSERR, completed
    assert f"cannot listen: unix:{path}: address in use: not a socket" in completed.stderr
    assert path.read_text() == "not a socket\n"


@pytest.mark.parametrize("workers", [1, 2])
def test_exit_leaves_a_socket_that_replaced_ours(
    memcached: Memcached, tmp_path: Path, workers: int
) -> None:
    sock = tmp_path / "bridge.sock"
    config = _write_config(tmp_path / "bridge.toml", sock, memcached, workers=workers)
    with run_bridge(config) as bridge:
        assert postmap_query("nobody@example.com", f"socketmap:unix:{sock}:aliases").returncode == 1
        # What the old "steal the path" behaviour did: unlink the live
        # socket file and bind a new one in its place.
        os.unlink(sock)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as replacement:
            replacement.bind(str(sock))
            replacement.listen()
            replaced = _inode(sock)

            bridge.signal(signal.SIGTERM)
            assert bridge.process.wait(timeout=60) == 0
            bridge.wait_for_log(r"left in place: the socket there is no longer ours")

            assert _inode(sock) == replaced
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(5)
                client.connect(str(sock))
            replacement.accept()[0].close()


def test_a_successor_started_while_draining_keeps_its_socket(
    memcached: Memcached, tmp_path: Path
) -> None:
    """The upgrade path: stop A, start B on the path while A finishes a request.

    A closes its listener at SIGTERM but removes its socket file only after
    its last request is answered. B, started in between, finds A's file
    stale (connections refused) and replaces it; A's exit must leave B's
    socket in place, and the request A held is still answered.
    """
    sock = tmp_path / "bridge.sock"
    table = f"socketmap:unix:{sock}:aliases"
    memcached.set(b"aliases:held@example.com", b"answered-while-draining")
    memcached.set(b"aliases:user@example.com", b"from-successor")
    with FaultProxy(memcached.port, record=True) as proxy:
        first_config = tmp_path / "first.toml"
        first_config.write_text(
            f'[[listen]]\nendpoint = "unix:{sock}"\nprotocol = "socketmap"\n'
            f'[tables.aliases]\nmemcache = "{proxy.endpoint}"\nkey_format = "aliases:%s"\n'
            "timeout = 30\nmax_try = 1\n"
        )
        with run_bridge(first_config) as first:
            proxy.set_fault(Stall())
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as held:
                held.settimeout(60)
                held.connect(str(sock))
                payload = b"aliases held@example.com"
                held.sendall(b"%d:%s," % (len(payload), payload))
                _wait_for(lambda: bool(proxy.received_commands()), "the held request at memcache")

                first.signal(signal.SIGTERM)
                # Listener closed, request still in hand, socket file still there.
                _wait_for(lambda: not probe_unix_socket(str(sock)), "the first listener closed")
                assert first.process.poll() is None and sock.exists()

                second_config = _write_config(tmp_path / "second.toml", sock, memcached)
                with run_bridge(second_config) as second:
                    second.wait_for_log(r"replacing a stale socket")
                    successor = _inode(sock)

                    proxy.set_fault(Pass())
                    reply = b""
                    while chunk := held.recv(65536):
                        reply += chunk
                    value = b"OK answered-while-draining"
                    assert reply == b"%d:%s," % (len(value), value)
                    assert first.process.wait(timeout=60) == 0
                    first.wait_for_log(r"left in place: the socket there is no longer ours")

                    assert _inode(sock) == successor
                    assert postmap_query("user@example.com", table).outcome == (
                        "found:from-successor"
                    )
