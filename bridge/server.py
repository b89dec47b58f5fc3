"""Accepting and serving connections: the only place the bridge talks to Postfix.

Theory of operation
-------------------
:class:`BridgeServer` runs one accept loop per listening socket (bound
beforehand by :mod:`bridge.listeners`) and reports readiness through
``task_status.started()`` once they all run. An accepted connection is
served one of two ways, by its listener's ``serving`` key:

* ``events`` (the default): handed to :class:`bridge.multiplex.Multiplexer`,
  one task that reads every ready connection per wake-up and starts a
  task only for a lookup that has to wait for memcache or the backup;
* ``tasks``: a :class:`_Connection` and a task of its own, which feeds
  bytes into the listener's sans-I/O codec and answers requests strictly
  in order, one at a time (SM-13). Portable, and the reference the
  event loop is tested against (tests/run.sh runs the server-facing tests
  both ways).

Both speak :mod:`bridge.protocol.events`' vocabulary through the codecs
of :mod:`bridge.dialect`, and answer through its ``reply_for``.

Tables are looked up through :attr:`BridgeServer.tables` at request time,
so a reload (SIGHUP) swaps the whole set of tables between two requests
without dropping a connection.

Resource handling
-----------------
* Each listener has a connection cap; when it is reached the accept loop
  waits for a slot instead of accepting (the kernel backlog queues).
* Every read waits at most the listener's ``idle_timeout`` (its default
  depends on the protocol: a tcp_table connection is never closed idle,
  because closing it costs Postfix a 1 s sleep, TCP-12); every write at
  most :data:`WRITE_TIMEOUT`.
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

import errno
import ipaddress
import logging
import socket as stdlib_socket
import time
from collections.abc import Callable, Mapping, Sequence

import trio

from bridge import http, metrics, multiplex, netio
from bridge.config import BridgeConfig, ConfigError, ListenerConfig, load_config
from bridge.dialect import (
    DIALECTS,
    WRITE_TIMEOUT,
    connection_ends,
    log_bad_request,
    reply_for,
    table_of,
)
from bridge.listeners import BoundListener, close_listener
from bridge.multiplex import Multiplexer
from bridge.outcome import ConfigFailure, Outcome
from bridge.protocol.events import NEED_DATA, BadRequest, ConnectionClosed, LookupRequest
from bridge.table import Table, close_tables, open_tables

_log = logging.getLogger("bridge.server")

#: How long shutdown waits for requests already received to be answered.
#: A lookup is bounded by timeout * max_try + retry_pause * (max_try - 1)
#: (a few seconds with the default table settings), so this leaves room
#: for slow backends.
SHUTDOWN_GRACE = 30.0

#: How long replaced tables stay open after a reload, so that lookups
#: that started before the reload can finish with them.
RELOAD_GRACE = 60.0

#: Refused connections are logged at most once per this many seconds per listener.
_REFUSAL_LOG_INTERVAL = 60.0

#: Bytes read from a client at a time; a socketmap request is small.
_RECEIVE_SIZE = 65536


class BridgeServer:
    """Serve bound listeners until :meth:`shutdown` is called.

    Args:
      config: the configuration.
      tables: its opened tables.
      bound: every listener, bound by the caller
        (:func:`bridge.listeners.bind_listeners`), which also drops
        privileges and removes socket files at exit.
      metrics_listeners: the ``[metrics]`` endpoint's sockets when the
        workers' supervisor bound them; empty: the server binds it.
    """

    def __init__(
        self,
        config: BridgeConfig,
        tables: Mapping[str, Table],
        *,
        bound: list[BoundListener],
        metrics_listeners: Sequence[stdlib_socket.socket] = (),
    ) -> None:
        self.config = config
        self._bound = bound
        self._metrics_listeners = metrics_listeners
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
        # Serves the connections of "events" listeners (None: every
        # listener serves a task per connection).
        self._multiplexer: Multiplexer | None = None
        if multiplex.AVAILABLE and any(item.config.serving == "events" for item in bound):
            self._multiplexer = Multiplexer(self)

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
                await background.start(
                    http.serve_metrics, self.config.metrics_endpoint, self._metrics_listeners
                )
                background.start_soon(
                    http.probe_forever, lambda: self.tables, self.config.health_interval
                )
            async with trio.open_nursery() as connections:
                if self._multiplexer is not None:
                    connections.start_soon(self._multiplexer.run, connections)
                with trio.CancelScope() as accept_scope:
                    self._accept_scope = accept_scope
                    if self._shutting_down:
                        accept_scope.cancel()
                    async with trio.open_nursery() as acceptors:
                        for item in bound:
                            acceptors.start_soon(self._accept_loop, item, connections)
                        task_status.started([item.address for item in bound])
                for item in bound:
                    close_listener(item.listener)
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
        if self._multiplexer is not None:
            self._multiplexer.stop()

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
            if self._multiplexer is not None and item.config.serving == "events":
                self._multiplexer.add(connection, item.config, slots.release)
            else:
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
            with connection_ends(listener):
                await _Connection(self, connection, config).serve()
        finally:
            metrics.current.connection_closed(listener)
            release()
            connection.close()

    async def receive(
        self, connection: netio.Connection, idle_timeout: float, request_deadline: float | None
    ) -> bytes | None:
        """Wait for bytes from a client, as long as the server is not shutting down.

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

    async def lookup(self, table_name: str, key: bytes) -> Outcome:
        """Look ``key`` up in the table called ``table_name`` now (a reload may swap tables)."""
        table = self.tables.get(table_name)
        if table is None:
            return ConfigFailure(f"no table named {table_name!r}")
        return await table.lookup(key)


#: accept() errors that mean "out of resources for now", not "listener broken".
#: Like trio's own accept loop: pause and try again rather than crash.
_TRANSIENT_ACCEPT_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class _Connection:
    """One client connection: its codec, its deadlines, its requests answered in order.

    Resource handling: the socket is the server's (closed by
    :meth:`BridgeServer._connection`); this object only reads and writes.

    Error handling: a bad request is answered and, when its framing is
    broken, ends the connection; backend failures are outcomes. I/O errors
    propagate to the server, which closes the connection.
    """

    def __init__(
        self, server: BridgeServer, connection: netio.Connection, config: ListenerConfig
    ) -> None:
        self._server = server
        self._connection = connection
        self._config = config
        self._dialect = DIALECTS[config.protocol]
        self._codec = self._dialect.new_codec()
        self._request_deadline: float | None = None

    async def serve(self) -> None:
        """Answer the client's requests in order until it leaves or the server stops."""
        while True:
            event = self._codec.next_event()
            if event is NEED_DATA:
                data = await self._receive()
                if data is None:
                    return
                self._codec.receive_data(data)
            elif isinstance(event, ConnectionClosed):
                return
            elif isinstance(event, BadRequest):
                log_bad_request(self._dialect, self._connection.peer(), event)
                await self._send(self._dialect.encode_bad_request(event))
                if event.fatal:
                    return
            else:
                await self._answer(event)

    async def _receive(self) -> bytes | None:
        config = self._config
        if not self._codec.request_in_progress:
            self._request_deadline = None
        elif self._request_deadline is None and config.request_timeout > 0:
            # Postfix writes a request with one write; a request that
            # trickles in (slowloris) must not hold its slot forever,
            # which the idle timeout alone would allow: every byte
            # restarts it.
            self._request_deadline = trio.current_time() + config.request_timeout
        return await self._server.receive(
            self._connection, config.idle_timeout, self._request_deadline
        )

    async def _answer(self, request: LookupRequest) -> None:
        name = table_of(request, self._config)
        started = time.perf_counter()
        outcome = await self._server.lookup(name, request.key)
        await self._send(reply_for(self._dialect, name, outcome, time.perf_counter() - started))

    async def _send(self, data: bytes) -> None:
        await self._connection.send_all(data, stall_limit=WRITE_TIMEOUT)
