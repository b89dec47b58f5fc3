"""Listeners and connections: the only place the bridge talks to Postfix.

Theory of operation
-------------------
:class:`BridgeServer` binds every configured listener, reports readiness
through ``task_status.started()`` once all of them are bound, and runs one
accept loop per listening socket. Each accepted connection gets a task
that feeds bytes into the listener's sans-I/O protocol object
(socketmap or tcp_table) and answers requests strictly in order, one at a
time, which is all Postfix clients do (SM-13) and keeps pipelined
requests ordered.

Tables are looked up through :attr:`BridgeServer.tables` at request time,
so a reload (SIGHUP) swaps the whole set of tables between two requests
without dropping a connection.

Resource handling
-----------------
* Each listener has a connection cap; when it is reached the accept loop
  waits for a slot instead of accepting (the kernel backlog queues).
* Every read waits at most ``idle_timeout`` (socketmap default 100 s,
  tcp never: closing a tcp_table connection costs Postfix a 1 s sleep,
  TCP-12); every write at most :data:`WRITE_TIMEOUT`.
* Shutdown stops the accept loops, interrupts connections that are
  waiting for a request, lets every request already received be answered,
  and then closes the connections.

Error handling
--------------
A malformed request closes that connection only (after a PERM/400 reply
where the framing still allows one). Backend failures are outcomes
(TEMP/TIMEOUT), never exceptions. An unexpected exception in one
connection is logged and closes that connection; the server keeps going.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import pwd
import signal
import socket as stdlib_socket
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import trio

from bridge import http, metrics, netio, systemd
from bridge.config import BridgeConfig, ConfigError, ListenerConfig, load_config
from bridge.endpoint import InetEndpoint
from bridge.logs import ReasonLog
from bridge.outcome import ConfigFailure, Outcome, Retry
from bridge.protocol import socketmap, tcptable
from bridge.protocol.events import NEED_DATA, ConnectionClosed, NeedData
from bridge.table import Table, close_tables, open_tables

_log = logging.getLogger("bridge.server")

#: Every TEMP/TIMEOUT/PERM answer's reason, once per distinct cause per minute.
_reasons = ReasonLog(_log)

#: How long a reply may take to leave. Postfix waits 100 s per read
#: (SM-12, TCP-9); a client that does not read for that long is gone.
WRITE_TIMEOUT = 100.0

#: How long shutdown waits for requests already received to be answered.
#: A lookup is bounded by timeout * max_try + retry_pause * (max_try - 1)
#: (5 s with the defaults), so this leaves room for slow backends.
SHUTDOWN_GRACE = 30.0

#: How long replaced tables stay open after a reload, so that lookups
#: that started before the reload can finish with them.
RELOAD_GRACE = 60.0

#: Refused connections are logged at most once per this many seconds per listener.
_REFUSAL_LOG_INTERVAL = 60.0

#: Bytes read from a client at a time; a socketmap request is small.
_RECEIVE_SIZE = 65536


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


class BridgeServer:
    """Serve bound listeners until :meth:`shutdown` is called.

    Args:
      config: the configuration.
      tables: its opened tables.
      bound: every listener, bound by the caller (:func:`bind_listeners`),
        which also drops privileges and removes socket files at exit.
    """

    def __init__(
        self, config: BridgeConfig, tables: Mapping[str, Table], *, bound: list[BoundListener]
    ) -> None:
        self.config = config
        self._bound = bound
        self.tables: Mapping[str, Table] = tables
        self._shutting_down = False
        self._accept_scope: trio.CancelScope | None = None
        # Cancel scopes of connections that are waiting for the next
        # request: shutdown cancels these, never a request in progress.
        self._waiting: set[trio.CancelScope] = set()
        self._background: trio.Nursery | None = None
        self._next_refusal_log: dict[object, float] = {}
        # Tables replaced by a reload, closed after RELOAD_GRACE or at exit.
        self._retired: list[Mapping[str, Table]] = []

    # ------------------------------------------------------------ lifecycle

    async def serve(
        self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept on every listener, report their addresses, and serve.

        Args:
          task_status: receives the list of listening addresses once the
            accept loops run.
        """
        bound = self._bound
        async with trio.open_nursery() as background:
            self._background = background
            if self.config.metrics_endpoint is not None:
                metrics.enable()
                await background.start(http.serve_metrics, self.config.metrics_endpoint)
                background.start_soon(
                    http.probe_forever, lambda: self.tables, self.config.health_interval
                )
            async with trio.open_nursery() as connections:
                with trio.CancelScope() as accept_scope:
                    self._accept_scope = accept_scope
                    if self._shutting_down:
                        accept_scope.cancel()
                    async with trio.open_nursery() as acceptors:
                        for item in bound:
                            acceptors.start_soon(self._accept_loop, item, connections)
                        task_status.started([item.address for item in bound])
                for item in bound:
                    _close_listener(item.listener)
                # Connections finish the request in hand and return; the
                # deadline only ends those stuck on a slow backend or client.
                connections.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE
            background.cancel_scope.cancel()
        for tables in [*self._retired, self.tables]:
            await close_tables(tables)

    def shutdown(self) -> None:
        """Stop accepting, let requests already received finish, then return from serve()."""
        if self._shutting_down:
            return
        _log.info("shutting down")
        self._shutting_down = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        for scope in list(self._waiting):
            scope.cancel()

    async def reload(self) -> bool:
        """Re-read the configuration file and swap in the new tables.

        Returns:
          True if the new configuration is now in use; False if it was
          invalid (the old one keeps running; the errors are logged).
        """
        path = self.config.path
        try:
            config = load_config(path)
            tables = open_tables(config)
        except ConfigError as exc:
            _log.error("reload of %s failed, keeping the running configuration:\n%s", path, exc)
            metrics.current.reload(ok=False)
            return False
        if config.listeners != self.config.listeners:
            _log.warning("reload: listener changes take effect only after a restart")
        old_tables = self.tables
        self.config, self.tables = config, tables
        _log.info("reloaded %s: %d tables", path, len(tables))
        metrics.current.reload(ok=True)
        if self._background is not None:
            self._background.start_soon(self._close_later, old_tables)
        return True

    async def _close_later(self, tables: Mapping[str, Table]) -> None:
        self._retired.append(tables)
        await trio.sleep(RELOAD_GRACE)
        self._retired.remove(tables)
        await close_tables(tables)

    # ------------------------------------------------------------- binding

    # ----------------------------------------------------------- accepting

    async def _accept_loop(self, item: BoundListener, connections: trio.Nursery) -> None:
        slots = trio.Semaphore(item.config.max_connections)
        while True:
            await slots.acquire()
            try:
                connection = await netio.accept(item.listener)
            except OSError as exc:
                slots.release()
                if exc.errno in _TRANSIENT_ACCEPT_ERRORS:
                    _log.error("accept on %s: %s; pausing", item.address, exc)
                    await trio.sleep(0.1)
                    continue
                raise
            except BaseException:
                slots.release()
                raise
            if item.config.allow and not self._allowed(connection, item.config):
                slots.release()
                connection.close()
                continue
            connections.start_soon(self._connection, connection, item.config, slots.release)

    def _allowed(self, connection: netio.Connection, config: ListenerConfig) -> bool:
        """Whether the peer is in the listener's ``allow`` networks."""
        try:
            peer = ipaddress.ip_address(connection.sock.getpeername()[0])
        except (OSError, ValueError):
            return False
        if any(peer in network for network in config.allow):
            return True
        now = trio.current_time()
        # One line per listener per interval: a scan must not flood the log.
        if now >= self._next_refusal_log.get(config.endpoint, 0.0):
            self._next_refusal_log[config.endpoint] = now + _REFUSAL_LOG_INTERVAL
            _log.warning("%s: refused connection from %s (not in allow)", config.endpoint, peer)
        return False

    # ---------------------------------------------------------- connection

    async def _connection(
        self, connection: netio.Connection, config: ListenerConfig, release: Callable[[], None]
    ) -> None:
        listener = str(config.endpoint)
        metrics.current.connection_opened(listener)
        try:
            await _serve_connection(self, connection, config)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except trio.TooSlowError:
            _log.info("closing connection: client did not read its reply in %ss", WRITE_TIMEOUT)
        except Exception:
            _log.exception("connection on %s failed", config.endpoint)
        finally:
            metrics.current.connection_closed(listener)
            release()
            connection.close()

    async def _receive(
        self, connection: netio.Connection, idle_timeout: float, request_deadline: float | None
    ) -> bytes | None:
        """Wait for bytes from the client.

        Args:
          idle_timeout: seconds without a byte before closing; 0 = never.
          request_deadline: when the request in progress must be complete
            (None between requests).

        Returns:
          The bytes, b"" at end of stream, or None when the connection
          should close (idle timeout, request deadline or shutdown).
        """
        if self._shutting_down:
            return None
        with trio.CancelScope() as scope:
            if idle_timeout > 0:
                scope.deadline = trio.current_time() + idle_timeout
            if request_deadline is not None:
                scope.deadline = min(scope.deadline, request_deadline)
            self._waiting.add(scope)
            try:
                return await connection.receive(_RECEIVE_SIZE)
            finally:
                self._waiting.discard(scope)
        return None

    async def _send(self, connection: netio.Connection, data: bytes) -> None:
        await connection.send_all(data, stall_limit=WRITE_TIMEOUT)

    async def lookup(self, table_name: str, key: bytes) -> Outcome:
        table = self.tables.get(table_name)
        if table is None:
            return ConfigFailure(f"no table named {table_name!r}")
        return await table.lookup(key)


_TRANSIENT_ACCEPT_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


Request = socketmap.SocketmapRequest | tcptable.TcpGet
BadRequest = socketmap.BadRequest | tcptable.TcpBadRequest


class _ServerProtocol(Protocol):
    """What both sans-I/O server protocols offer."""

    @property
    def request_in_progress(self) -> bool: ...

    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> Request | BadRequest | ConnectionClosed | NeedData: ...


@dataclass(frozen=True, slots=True)
class _Dialect:
    """What differs between a socketmap and a tcp_table connection."""

    name: str
    new_protocol: Callable[[], _ServerProtocol]
    encode_reply: Callable[[Outcome], bytes]
    encode_bad_request: Callable[[BadRequest], bytes]


def _socketmap_bad_request(bad: BadRequest) -> bytes:
    return socketmap.encode_reply(ConfigFailure(bad.reason))


def _tcp_bad_request(bad: BadRequest) -> bytes:
    assert isinstance(bad, tcptable.TcpBadRequest)
    return tcptable.encode_bad_request(bad)


_DIALECTS = {
    "socketmap": _Dialect(
        "socketmap",
        socketmap.SocketmapServerProtocol,
        socketmap.encode_reply,
        _socketmap_bad_request,
    ),
    "tcp": _Dialect(
        "tcp_table", tcptable.TcpTableServerProtocol, tcptable.encode_reply, _tcp_bad_request
    ),
}


async def _serve_connection(
    server: BridgeServer, connection: netio.Connection, config: ListenerConfig
) -> None:
    """Answer one client's requests in order until it leaves or the server stops."""
    dialect = _DIALECTS[config.protocol]
    protocol = dialect.new_protocol()
    request_deadline: float | None = None
    while True:
        event = protocol.next_event()
        if event is NEED_DATA:
            if not protocol.request_in_progress:
                request_deadline = None
            elif request_deadline is None and config.request_timeout > 0:
                # Postfix writes a request with one write; a request that
                # trickles in (slowloris) must not hold its slot forever,
                # which the idle timeout alone would allow: every byte
                # restarts it.
                request_deadline = trio.current_time() + config.request_timeout
            data = await server._receive(connection, config.idle_timeout, request_deadline)
            if data is None:
                return
            protocol.receive_data(data)
        elif isinstance(event, ConnectionClosed):
            return
        elif isinstance(event, socketmap.BadRequest | tcptable.TcpBadRequest):
            _log.warning("%s request from %s: %s", dialect.name, connection.peer(), event.reason)
            await server._send(connection, dialect.encode_bad_request(event))
            if event.fatal:
                return
        else:
            # socketmap names the table in each request; a tcp listener serves one.
            name = event.name if isinstance(event, socketmap.SocketmapRequest) else config.table
            assert name is not None
            started = time.perf_counter()
            outcome = await server.lookup(name, event.key)
            metrics.current.request(name, dialect.name, outcome, time.perf_counter() - started)
            if isinstance(outcome, Retry | ConfigFailure):
                answer = (
                    "TIMEOUT"
                    if isinstance(outcome, Retry) and outcome.timeout
                    else ("TEMP" if isinstance(outcome, Retry) else "PERM")
                )
                _reasons.warning(f"table {name}: {answer}: {outcome.reason}")
            await server._send(connection, dialect.encode_reply(outcome))


# ---------------------------------------------------------------- binding


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


def _close_listener(sock: stdlib_socket.socket) -> None:
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


def drop_privileges(config: BridgeConfig) -> None:
    """Switch to ``user``/``group`` once every listener is bound.

    Raises:
      OSError: the switch failed (the daemon must not go on as root then).
    """
    if config.user is None and config.group is None:
        if os.geteuid() == 0:
            _log.warning(
                "running as root: set user = ... (and group) to drop privileges after binding"
            )
        return
    if config.user is not None and os.geteuid() == config.user:
        return  # already switched (a worker forked by the supervisor)
    if config.group is not None:
        os.setgroups([])
        os.setgid(config.group)
    if config.user is not None:
        if config.group is None:
            primary = pwd.getpwuid(config.user).pw_gid
            os.setgroups([])
            os.setgid(primary)
        os.setuid(config.user)
    _log.info("running as uid %d, gid %d", os.getuid(), os.getgid())


# ---------------------------------------------------------------- signals


async def serve_until_signalled(
    config: BridgeConfig,
    tables: Mapping[str, Table],
    bound: list[BoundListener],
) -> None:
    """Run the server; SIGHUP reloads, SIGTERM and SIGINT shut down cleanly.

    Args:
      bound: every listener, bound by the caller (the serve command or the
        workers' supervisor).
    """
    server = BridgeServer(config, tables, bound=bound)
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(server.serve)
            _log.info("ready: listening on %s", ", ".join(addresses))
            systemd.notify(systemd.ready_message(f"listening on {', '.join(addresses)}"))

            async def watch_signals() -> None:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        systemd.notify(systemd.reloading_message())
                        reloaded = await server.reload()
                        status = "reloaded" if reloaded else "reload failed, old configuration"
                        systemd.notify(systemd.ready_message(status))
                    else:
                        systemd.notify(systemd.STOPPING)
                        server.shutdown()
                        return

            nursery.start_soon(watch_signals)
