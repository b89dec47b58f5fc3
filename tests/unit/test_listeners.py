"""bridge.listeners: unix socket probes and socket file ownership.

Real AF_UNIX sockets in tmp_path: a live listener, a stale socket file (its
socket closed, the file left behind), a socket of another type, a regular
file. Ownership is checked the way it matters: a file that replaced ours,
possibly with our old inode number, and a forked child, must be left alone.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.config import load_config
from bridge.listeners import (
    ListenerUnavailable,
    SocketFile,
    bind_listeners,
    probe_unix_socket,
    unlink_unix_sockets,
)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Path]:
    """A path where a process listens."""
    path = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen()
        yield path


def _stale(path: Path) -> Path:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen()
    return path


def _inode(path: Path) -> tuple[int, int]:
    info = os.lstat(path)
    return info.st_dev, info.st_ino


def test_probe_tells_live_from_stale_and_missing(live: Path, tmp_path: Path) -> None:
    assert probe_unix_socket(str(live)) is True
    assert probe_unix_socket(str(_stale(tmp_path / "stale.sock"))) is False
    assert probe_unix_socket(str(tmp_path / "missing.sock")) is False


def test_probe_counts_a_full_backlog_and_another_socket_type_as_live(tmp_path: Path) -> None:
    busy = tmp_path / "busy.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(busy))
        server.listen(0)
        queued: list[socket.socket] = []
        try:
            # Fill the backlog until a non-blocking connect would wait.
            while True:
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.setblocking(False)
                queued.append(client)
                if client.connect_ex(str(busy)) == errno.EAGAIN:
                    break
                assert len(queued) < 100
            assert probe_unix_socket(str(busy)) is True
        finally:
            for client in queued:
                client.close()
    datagram = tmp_path / "datagram.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(datagram))
        assert probe_unix_socket(str(datagram)) is True


def test_socket_file_removes_its_own_file_once(tmp_path: Path) -> None:
    path = tmp_path / "own.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        owned = SocketFile(str(path))
        assert (owned.device, owned.inode) == _inode(path)
    assert owned.remove() is True
    assert not path.exists()
    # Spent: a file bound there later is not ours, whatever its inode.
    _stale(path)
    assert owned.remove() is False
    assert path.exists()


def test_socket_file_leaves_a_replacement_even_on_a_reused_inode(tmp_path: Path) -> None:
    path = tmp_path / "bridge.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        owned = SocketFile(str(path))
    # Our listener is closed (draining), and a successor replaced the stale
    # file: without the held inode, ext4 would hand it our old number.
    os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as successor:
        successor.bind(str(path))
        successor.listen()
        assert _inode(path) != (owned.device, owned.inode)
        assert owned.remove() is False
        assert probe_unix_socket(str(path)) is True


def test_a_forked_child_never_removes_the_parents_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "bridge.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen()
        owned = SocketFile(str(path))
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            os._exit(3 if owned.remove() else 0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert path.exists()
        assert owned.remove() is True
    assert not path.exists()


def test_bind_listeners_refuses_a_live_path_and_rolls_back(live: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.sock"
    config_path = tmp_path / "bridge.toml"
    config_path.write_text(
        f'[[listen]]\nendpoint = "unix:{fresh}"\nprotocol = "socketmap"\n'
        f'[[listen]]\nendpoint = "unix:{live}"\nprotocol = "socketmap"\n'
        '[tables.t]\nmemcache = "inet:127.0.0.1:11211"\n'
    )
    live_inode = _inode(live)
    with pytest.raises(ListenerUnavailable) as raised:
        bind_listeners(load_config(str(config_path)))
    assert raised.value.errno == errno.EADDRINUSE
    assert str(raised.value) == (
        f"unix:{live}: address in use: another process answers on this socket"
    )
    # The listener bound before the failure took its socket file with it.
    assert not fresh.exists()
    assert _inode(live) == live_inode


def test_bind_listeners_replaces_a_stale_file_but_not_another_file(tmp_path: Path) -> None:
    stale = _stale(tmp_path / "stale.sock")
    config_path = tmp_path / "bridge.toml"
    config_path.write_text(
        f'[[listen]]\nendpoint = "unix:{stale}"\nprotocol = "socketmap"\n'
        '[tables.t]\nmemcache = "inet:127.0.0.1:11211"\n'
    )
    bound = bind_listeners(load_config(str(config_path)))
    try:
        assert probe_unix_socket(str(stale)) is True
    finally:
        for item in bound:
            item.listener.close()
        unlink_unix_sockets(bound)
    assert not stale.exists()

    stale.write_text("a regular file\n")
    with pytest.raises(ListenerUnavailable, match="not a socket, left alone"):
        bind_listeners(load_config(str(config_path)))
    assert stale.read_text() == "a regular file\n"
