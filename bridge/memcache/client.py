"""trio memcache client with Postfix's retry loop (spec MC-5, MC-11, MC-17).

Theory of operation
-------------------
One :class:`MemcacheClient` serves one table's memcache server. It keeps a
small pool of persistent connections, each driven by a sans-I/O
:class:`~bridge.protocol.memcache.MemcacheClientProtocol`; this module only
moves bytes and applies time limits.

Every command runs Postfix's retry loop (MC-11)::

    for attempt in 1 .. max_try:
        if attempt > 1: sleep(retry_pause)
        connect if needed; a failed connect ends the loop at once
        send, read and interpret the reply
        definitive answer -> return it
        otherwise close the connection and go round again

Resource handling
-----------------
A connection goes back to the pool only when its protocol state is clean
(no pending reply, not broken). A command cancelled half-way, a timeout or
a protocol error closes the connection, so a reply can never be read by
the wrong request: there is no way for key A's reply to answer key B.

Error handling
--------------
Nothing here raises for server trouble. Results are plain values or a
:class:`~bridge.outcome.Retry` carrying the reason (and whether it was a
time limit), which the table layer turns into TEMP/TIMEOUT.
"""

from __future__ import annotations

import contextlib
import logging
import socket as stdlib_socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from bridge import metrics, netio
from bridge.endpoint import Endpoint, InetEndpoint
from bridge.outcome import Retry
from bridge.protocol.memcache import (
    NEED_DATA,
    CommandFailed,
    Deleted,
    DeleteNotFound,
    GetHit,
    GetMiss,
    MemcacheClientProtocol,
    MemcacheEvent,
    Stored,
    Version,
)

_log = logging.getLogger("bridge.memcache")

#: Most idle connections kept per server. A connection is opened only
#: when no idle one is free, so the pool grows to the concurrency actually
#: seen (32 busy Postfix processes: about 32 connections) and stays there
#: under steady load instead of opening and closing connections; this
#: caps it below memcached's default of 1024 connections for all clients.
MAX_IDLE_CONNECTIONS = 256

#: An idle connection unused this long is closed: after a burst the pool
#: shrinks back to what the load needs. Idle connections are reused most
#: recently used first, so the ones beyond the steady need age out.
IDLE_CLOSE = 60.0

#: Bytes asked of the socket per read: a whole value of the default
#: data_size_limit plus its header arrives in one or two reads.
_RECEIVE_SIZE = 16384

#: Turns a command into bytes on a given connection's protocol state.
_Encoder = Callable[[MemcacheClientProtocol], bytes]


@dataclass(frozen=True, slots=True)
class MemcacheSettings:
    """The memcache_table(5) parameters that shape the wire exchange.

    No defaults here: a table's values (bridge.config) are passed in, and
    the parameter schema is the one place their defaults are written.
    """

    timeout: int
    max_try: int
    retry_pause: int
    line_size_limit: int
    data_size_limit: int
    #: How long a read tries the socket before parking in trio (netio).
    busy_poll_us: int


class _Failure(Exception):
    """One attempt failed; ``connect`` marks failures that end the retry loop (MC-11)."""

    def __init__(self, reason: str, *, timeout: bool = False, connect: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timeout = timeout
        self.connect = connect


class _Connection:
    """One socket plus its protocol state."""

    def __init__(self, stream: netio.Connection, settings: MemcacheSettings) -> None:
        self.stream = stream
        #: trio time when the connection last went back to the pool.
        self.idle_since = 0.0
        self.protocol = MemcacheClientProtocol(
            line_size_limit=settings.line_size_limit,
            data_size_limit=settings.data_size_limit,
        )

    @property
    def reusable(self) -> bool:
        return not self.protocol.broken and self.protocol.pending == 0

    def still_open(self) -> bool:
        """Whether an idle connection can be used: the server has not closed it.

        memcache sends nothing unasked, so an idle connection with anything
        to read has been closed, reset or garbled by the server (after a
        memcached restart, say). Finding that out now costs one syscall;
        finding it out by using the connection costs an attempt and a
        retry_pause (MC-11).
        """
        try:
            self.stream.sock.recv(1, stdlib_socket.MSG_PEEK | stdlib_socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def close(self) -> None:
        self.stream.close()


def _deadline_scope(seconds: float) -> contextlib.AbstractContextManager[object]:
    """A ``fail_after`` for ``timeout`` seconds; <= 0 disables the limit (MC-1)."""
    if seconds > 0:
        return trio.fail_after(seconds)
    return contextlib.nullcontext()


class MemcacheClient:
    """Commands against one memcache server, with Postfix's retry semantics."""

    def __init__(
        self,
        endpoint: Endpoint,
        settings: MemcacheSettings,
        *,
        pool_size: int = MAX_IDLE_CONNECTIONS,
    ) -> None:
        self.endpoint = endpoint
        self._name = str(endpoint)
        self.settings = settings
        self._idle: list[_Connection] = []
        self._pool_size = pool_size
        self._closed = False

    # ------------------------------------------------------------------ API

    async def get(self, key: bytes) -> bytes | Retry | None:
        """Look ``key`` up.

        Returns:
          The value bytes, ``None`` on a miss, or :class:`Retry` after
          ``max_try`` failed attempts or a refused connection.
        """
        result = await self._run(lambda p: p.send_get(key), (GetHit, GetMiss))
        if isinstance(result, GetHit):
            return result.value
        if isinstance(result, Retry):
            return result
        return None

    async def set(self, key: bytes, value: bytes, *, flags: int, ttl: int) -> bool | Retry:
        """Store ``value`` (MC-17). Values over ``data_size_limit`` are not sent.

        Returns:
          True when stored, False when the value was too large (a warning
          is logged), or :class:`Retry`.
        """
        if len(value) > self.settings.data_size_limit:
            _log.warning(
                "memcache %s: not storing %d-byte value: data_size_limit is %d",
                self.endpoint,
                len(value),
                self.settings.data_size_limit,
            )
            return False
        result = await self._run(lambda p: p.send_set(key, value, flags=flags, ttl=ttl), (Stored,))
        return result if isinstance(result, Retry) else True

    async def set_many(
        self, items: Sequence[tuple[bytes, bytes]], *, flags: int, ttl: int
    ) -> bool | Retry:
        """Store many values in one pipelined exchange (bulk load).

        Every ``set`` goes out with ``noreply``, followed by one
        ``version``: its reply proves that memcache processed the batch,
        and an error line from any set takes its place and fails the
        attempt. The whole batch then goes round MC-11's loop again (sets
        are idempotent). Values over ``data_size_limit`` must have been
        left out by the caller.

        Returns:
          True when memcache processed every set, or :class:`Retry`.
        """
        limit = self.settings.data_size_limit
        assert all(len(value) <= limit for _, value in items), "oversized value in batch"

        def encode(protocol: MemcacheClientProtocol) -> bytes:
            parts = [
                protocol.send_set(key, value, flags=flags, ttl=ttl, noreply=True)
                for key, value in items
            ]
            parts.append(protocol.send_version())
            return b"".join(parts)

        result = await self._run(encode, (Version,))
        return result if isinstance(result, Retry) else True

    async def delete(self, key: bytes) -> bool | Retry:
        """Delete ``key``. Returns True if deleted, False if absent, or Retry."""
        result = await self._run(lambda p: p.send_delete(key), (Deleted, DeleteNotFound))
        if isinstance(result, Retry):
            return result
        return isinstance(result, Deleted)

    async def ping(self) -> Retry | None:
        """One ``version`` exchange, no retries: None when the server answered in time."""
        try:
            await self._attempt(lambda protocol: protocol.send_version(), (Version,))
        except _Failure as failure:
            return Retry(f"memcache {self.endpoint}: {failure.reason}", timeout=failure.timeout)
        return None

    async def aclose(self) -> None:
        """Close every pooled connection."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    # ------------------------------------------------------- retry loop

    async def _run(
        self,
        encode: _Encoder,
        definitive: tuple[type[MemcacheEvent], ...],
    ) -> MemcacheEvent | Retry:
        """Run one command through MC-11's loop and return its definitive event or Retry."""
        last: _Failure | None = None
        for attempt in range(1, self.settings.max_try + 1):
            if attempt > 1:
                await trio.sleep(self.settings.retry_pause)
            try:
                return await self._attempt(encode, definitive)
            except _Failure as failure:
                last = failure
                # The answer's reason is logged where it is answered
                # (rate-limited); each attempt only at debug level.
                _log.debug("memcache %s: attempt %d: %s", self.endpoint, attempt, failure.reason)
                if failure.connect:
                    break
        assert last is not None
        return Retry(f"memcache {self.endpoint}: {last.reason}", timeout=last.timeout)

    async def _attempt(
        self, encode: _Encoder, definitive: tuple[type[MemcacheEvent], ...]
    ) -> MemcacheEvent:
        connection = await self._acquire()
        try:
            event = await self._exchange(connection, encode(connection.protocol))
        except _Failure:
            metrics.current.memcache_attempt(self._name, failed=True)
            connection.close()
            raise
        except BaseException:
            connection.close()
            raise
        metrics.current.memcache_attempt(self._name, failed=False)
        self._release(connection)
        if not isinstance(event, definitive):
            raise _Failure(f"unexpected reply {type(event).__name__}")
        return event

    async def _exchange(self, connection: _Connection, data: bytes) -> MemcacheEvent:
        """Send one command's bytes and read until the protocol yields its event.

        ``timeout`` bounds the send and each read (MC-5). A read that runs
        out of time counts as end of stream: a value already read
        completely is still returned (MC-9 step 4).

        Raises:
          _Failure: the command failed (the connection must be closed).
        """
        timeout = self.settings.timeout
        try:
            await connection.stream.send_all(data, stall_limit=timeout)
        except trio.TooSlowError:
            raise _Failure(f"timeout after {timeout}s sending command", timeout=True) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _Failure(f"write error: {exc or type(exc).__name__}") from None
        protocol = connection.protocol
        spin = self.settings.busy_poll_us / 1_000_000
        timed_out = False
        while (event := protocol.next_event()) is NEED_DATA:
            # A class-based cancel scope: fail_after's generator-based context
            # manager costs more than the rest of this loop (docs/performance.md).
            with trio.CancelScope() as scope:
                if timeout > 0:
                    scope.deadline = trio.current_time() + timeout
                try:
                    chunk = await connection.stream.receive(_RECEIVE_SIZE, spin=spin)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    chunk = b""
            if scope.cancelled_caught:
                timed_out = True
                chunk = b""
            protocol.receive_data(chunk)
        if isinstance(event, CommandFailed):
            if event.detail:
                # May hold table values: only at debug level.
                _log.debug("memcache %s: %s: %s", self.endpoint, event.reason, event.detail)
            reason = f"timeout after {timeout}s waiting for reply" if timed_out else event.reason
            raise _Failure(reason, timeout=timed_out)
        return event

    # ------------------------------------------------------ connections

    async def _acquire(self) -> _Connection:
        """The most recently used idle connection that is still open, or a new one."""
        while self._idle:
            candidate = self._idle.pop()
            if candidate.still_open():
                return candidate
            candidate.close()
        return await self._connect()

    def _release(self, connection: _Connection) -> None:
        """Pool a connection whose protocol state is clean; close any other.

        Also closes the idle connections unused for :data:`IDLE_CLOSE`:
        they sit at the bottom of the list, since reuse takes from the top.
        """
        now = trio.current_time()
        idle = self._idle
        expired = 0
        while expired < len(idle) and now - idle[expired].idle_since >= IDLE_CLOSE:
            idle[expired].close()
            expired += 1
        del idle[:expired]
        if connection.reusable and not self._closed and len(idle) < self._pool_size:
            connection.idle_since = now
            idle.append(connection)
        else:
            connection.close()

    async def _connect(self) -> _Connection:
        endpoint = self.endpoint
        try:
            with _deadline_scope(self.settings.timeout):
                if isinstance(endpoint, InetEndpoint):
                    stream: trio.SocketStream = await trio.open_tcp_stream(
                        endpoint.host, endpoint.port
                    )
                else:
                    stream = await trio.open_unix_socket(endpoint.path)
        except trio.TooSlowError:
            raise _Failure(
                f"timeout after {self.settings.timeout}s connecting", timeout=True, connect=True
            ) from None
        except OSError as exc:
            metrics.current.memcache_attempt(self._name, failed=True)
            raise _Failure(f"connect: {exc.strerror or exc}", connect=True) from None
        metrics.current.memcache_connect(self._name)
        return _Connection(netio.Connection.from_trio_stream(stream), self.settings)
