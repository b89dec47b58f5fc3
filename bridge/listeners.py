"""Listening sockets: binding them, and owning their unix socket files.

Theory of operation
-------------------
:func:`bind_listeners` binds every configured ``[[listen]]`` endpoint
before anything is served, or none: the serve command (or the workers'
supervisor) binds as root if it must, then drops privileges, and the
server only accepts. Sockets passed by systemd (socket activation) are
adopted instead of bound.

inet listeners set ``SO_REUSEPORT`` so a new instance can bind the same
port while the old one drains (upgrades without refusing a connection).
unix listeners never take a path over: a socket file where another
process answers is refused, only a stale one (connections refused) is
replaced, and at exit only the file this process bound (same inode) is
removed (:class:`SocketFile`).

Error handling
--------------
A listener that cannot be bound raises ``OSError``
(:class:`ListenerUnavailable` for a taken unix path, naming it); every
listener bound before it is closed again and its socket file removed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket as stdlib_socket
import stat
from dataclasses import dataclass

import trio

from bridge import systemd
from bridge.config import BridgeConfig, ListenerConfig
from bridge.endpoint import InetEndpoint

_log = logging.getLogger("bridge.listeners")


class ListenerUnavailable(OSError):
    """A listener's address is taken; the message names the address and why.

    Raised by :func:`bind_listeners` like any other bind failure (an
    ``OSError``), so the serve command reports it and exits 71.
    """

    def __str__(self) -> str:
        # The message already names the address: no "[Errno 98]" prefix.
        return str(self.strerror)


class SocketFile:
    """The unix socket file one process bound, told apart by its inode.

    The path alone does not say whose socket is there: another instance
    may have replaced a stale one after this process closed its listener,
    or someone may have bound a new socket there by hand. Only the file
    with this (device, inode) is this process's to remove.

    An inode number is free for reuse as soon as its file is unlinked and
    closed, and filesystems such as ext4 hand it to the next file at once:
    a replacement bound while this process drains its last requests (its
    listener closed) would look like ours. So the file stays open (see
    :func:`_hold_inode`) until :meth:`remove`, keeping its number taken.
    """

    __slots__ = ("_pin", "_spent", "device", "inode", "path", "pid")

    def __init__(self, path: str) -> None:
        """Record the socket file a bind() in this process has just created.

        Raises:
          OSError: the file cannot be opened or stat'ed.
        """
        self.path = path
        self._pin = _hold_inode(path)
        self._spent = False
        try:
            info = os.lstat(path) if self._pin is None else os.fstat(self._pin)
        except BaseException:
            if self._pin is not None:
                os.close(self._pin)
            raise
        self.device, self.inode = info.st_dev, info.st_ino
        #: Forked workers share the listening socket, and with it this
        #: record, but only the process that bound the file may remove it.
        self.pid = os.getpid()

    def remove(self) -> bool:
        """Unlink the file if it is still this one and this process bound it.

        Once called in the process that bound it, the record is spent: a
        second call removes nothing.

        Returns:
          Whether the file was removed. Errors (the path is gone, or the
          directory is not writable once privileges were dropped) leave
          it in place and are not raised: this runs at exit.
        """
        if self._spent or os.getpid() != self.pid:
            return False
        self._spent = True
        try:
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) != (self.device, self.inode):
                _log.info("unix:%s: left in place: the socket there is no longer ours", self.path)
                return False
            # POSIX has no unlink-if-inode: a file put in place between
            # lstat and unlink would go, a window of microseconds.
            os.unlink(self.path)
        except OSError:
            return False
        finally:
            if self._pin is not None:
                os.close(self._pin)
                self._pin = None
        return True


def _hold_inode(path: str) -> int | None:
    """Open the file at ``path`` itself, so that its inode number stays taken.

    O_PATH opens a socket file without connecting to it (and O_NOFOLLOW a
    symlink as itself). Where O_PATH is missing (not Linux), returns None
    and inode comparisons rely on the file still being linked.

    Raises:
      OSError: the path cannot be opened.
    """
    o_path: int | None = getattr(os, "O_PATH", None)
    if o_path is None:
        return None
    return os.open(path, o_path | os.O_NOFOLLOW)


@dataclass(frozen=True, slots=True)
class BoundListener:
    """One listening socket and the configuration it came from."""

    config: ListenerConfig
    listener: stdlib_socket.socket
    #: Passed by the service manager (socket activation): its socket file
    #: is the manager's, never chmod'ed, chown'ed or unlinked here.
    inherited: bool = False
    #: The socket file bound here for a unix listener (None for inet and
    #: inherited sockets): removed at exit if it is still this one.
    socket_file: SocketFile | None = None

    @property
    def address(self) -> str:
        sockname = self.listener.getsockname()
        if isinstance(sockname, tuple):
            host, port = sockname[0], sockname[1]
            return str(InetEndpoint(host, port))
        return f"unix:{sockname}"


def bind_listeners(config: BridgeConfig) -> list[BoundListener]:
    """Bind every configured listener, or none.

    A unix listener's path may hold a stale socket (replaced) but not a
    live one or another kind of file (refused, see :func:`_bind_unix`).

    Raises:
      ListenerUnavailable: a unix listener's path is taken.
      OSError: a listener cannot be bound (those already bound are closed,
        and the socket files bound for them removed).
    """
    inherited = systemd.assign_inherited(
        [listener.endpoint for listener in config.listeners], systemd.inherited_sockets()
    )
    bound: list[BoundListener] = []
    try:
        for listener in config.listeners:
            endpoint = listener.endpoint
            adopted = inherited.pop(endpoint, [])
            if adopted:
                bound.extend(BoundListener(listener, sock, inherited=True) for sock in adopted)
                continue
            if isinstance(endpoint, InetEndpoint):
                sockets = _bind_inet(endpoint, reuse_port=listener.reuse_port)
                bound.extend(BoundListener(listener, sock) for sock in sockets)
            else:
                sock, socket_file = _bind_unix(endpoint.path, listener)
                bound.append(BoundListener(listener, sock, socket_file=socket_file))
    except BaseException:
        for item in bound:
            item.listener.close()
        unlink_unix_sockets(bound)
        for sockets in inherited.values():
            for sock in sockets:
                sock.close()
        raise
    return bound


def bind_metrics_listeners(config: BridgeConfig) -> list[stdlib_socket.socket]:
    """Bind the ``[metrics]`` endpoint once for every worker (none without ``[metrics]``).

    Only the workers' supervisor does this: a single process binds it in
    the server (:func:`bridge.http.serve_metrics`).

    Raises:
      OSError: the endpoint cannot be bound.
    """
    if config.metrics_endpoint is None:
        return []
    return _bind_inet(config.metrics_endpoint, reuse_port=False)


def unlink_unix_sockets(bound: list[BoundListener]) -> None:
    """Remove the socket files of the unix listeners bound here (at exit).

    Only files that are still the ones this process bound (same inode) are
    removed, and only by that process, never by a forked worker; inherited
    sockets are the service manager's. Errors are ignored (see
    :meth:`SocketFile.remove`).
    """
    for item in bound:
        if item.socket_file is not None:
            item.socket_file.remove()


def close_listener(sock: stdlib_socket.socket) -> None:
    """Close a listening socket, waking any task that waits to accept on it."""
    trio.lowlevel.notify_closing(sock)
    sock.close()


def _bind_inet(endpoint: InetEndpoint, *, reuse_port: bool) -> list[stdlib_socket.socket]:
    """Bind every address the host name resolves to.

    Like trio.open_tcp_listeners, plus SO_REUSEPORT: a new instance can bind
    the same port while the old one drains, for upgrades without refusing
    a single connection.
    """
    infos = stdlib_socket.getaddrinfo(
        endpoint.host,
        endpoint.port,
        type=stdlib_socket.SOCK_STREAM,
        flags=stdlib_socket.AI_PASSIVE,
    )
    listeners: list[stdlib_socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = stdlib_socket.socket(family, kind, proto)
            try:
                sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEPORT, 1)
                if family == stdlib_socket.AF_INET6:
                    # One socket per family, as trio does: no v4-mapped surprises.
                    sock.setsockopt(stdlib_socket.IPPROTO_IPV6, stdlib_socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(stdlib_socket.SOMAXCONN)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            listeners.append(sock)
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def _bind_unix(path: str, config: ListenerConfig) -> tuple[stdlib_socket.socket, SocketFile]:
    """Bind a unix socket, replacing a stale socket file but never another file.

    The socket file gets the listener's ``mode`` (and ``owner``/``group``)
    before the first connection can be accepted.

    Returns:
      The listening socket and the socket file it is bound to.

    Raises:
      ListenerUnavailable: another process answers on the socket at
        ``path``, or ``path`` is not a socket (both left alone), or
        whether that socket is stale cannot be told.
      OSError: the bind, chmod or chown failed (the file bound here, if
        any, is removed).
    """
    _remove_stale_socket(path)
    sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    socket_file: SocketFile | None = None
    try:
        sock.bind(path)
        socket_file = SocketFile(path)
        os.chmod(path, config.mode)
        if config.owner is not None or config.group is not None:
            uid = -1 if config.owner is None else config.owner
            gid = -1 if config.group is None else config.group
            os.chown(path, uid, gid)
        sock.listen(stdlib_socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        if socket_file is not None:
            socket_file.remove()
        raise
    return sock, socket_file


def _remove_stale_socket(path: str) -> None:
    """Make way for a bind at ``path``: remove a stale socket file there, nothing else.

    Raises:
      ListenerUnavailable: a process answers on the socket at ``path``, or
        ``path`` is not a socket, or another socket took the stale one's
        place while it was probed, or the probe could not tell whether
        the socket is stale.
      OSError: the path cannot be opened or the stale file unlinked.
    """
    try:
        pin = _hold_inode(path)
        before = os.lstat(path) if pin is None else os.fstat(pin)
    except FileNotFoundError:
        return
    try:
        if not stat.S_ISSOCK(before.st_mode):
            # Most likely a configuration mistake pointing at a real file.
            raise ListenerUnavailable(
                errno.EADDRINUSE, f"unix:{path}: address in use: not a socket, left alone"
            )
        if probe_unix_socket(path):
            # Unlinking it would leave that process serving a socket nobody
            # can reach any more.
            raise ListenerUnavailable(
                errno.EADDRINUSE,
                f"unix:{path}: address in use: another process answers on this socket",
            )
        try:
            after = os.lstat(path)
        except FileNotFoundError:
            return
        # The pin keeps the probed file's inode number from being reused,
        # so a socket bound there meanwhile cannot pass for the stale one.
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            raise ListenerUnavailable(
                errno.EADDRINUSE,
                f"unix:{path}: address in use: another process bound a new socket there",
            )
        _log.info("unix:%s: replacing a stale socket file (nothing answers on it)", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    finally:
        if pin is not None:
            os.close(pin)


#: connect() results that mean a process holds a listening socket there.
#: EAGAIN: its backlog is full, it is busy, not gone. EPROTOTYPE: it is a
#: live socket of another type (a stale one refuses whatever the type).
_LIVE_CONNECT_RESULTS = {0, errno.EAGAIN, errno.EWOULDBLOCK, errno.EINPROGRESS, errno.EPROTOTYPE}


def probe_unix_socket(path: str) -> bool:
    """Whether a process listens on the unix socket at ``path``.

    The connect is non-blocking, so the probe returns at once: a unix
    connect succeeds, is refused or finds the backlog full, and never
    waits for the peer. A process that listens there sees a connection
    that closes without a request.

    Returns:
      True if a process holds a socket there; False if the socket is
      stale (ECONNREFUSED: its process is gone) or the path is gone.

    Raises:
      ListenerUnavailable: any other connect error (its errno), e.g.
        EACCES when the socket file is not writable for this user: that
        socket may be live, so it is not known to be stale.
    """
    probe = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        result = probe.connect_ex(path)
    finally:
        probe.close()
    if result in _LIVE_CONNECT_RESULTS:
        return True
    if result in (errno.ECONNREFUSED, errno.ENOENT):
        return False
    raise ListenerUnavailable(
        result,
        f"unix:{path}: cannot tell whether the socket there is stale: {os.strerror(result)}",
    )
