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
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import trio

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

#: Idle connections kept per server. Lookups are short, so a few
#: connections carry the load of many Postfix processes (as proxymap
#: consolidates connections); more would only hold server slots.
DEFAULT_POOL_SIZE = 8

#: Bytes asked of the socket per read: a whole default-limit value
#: (10240 bytes) plus its header arrives in one or two reads.
_RECEIVE_SIZE = 16384

#: Turns a command into bytes on a given connection's protocol state.
_Encoder = Callable[[MemcacheClientProtocol], bytes]


@dataclass(frozen=True, slots=True)
class MemcacheSettings:
    """The memcache_table(5) parameters that shape the wire exchange."""

    timeout: int = 2
    max_try: int = 2
    retry_pause: int = 1
    line_size_limit: int = 1024
    data_size_limit: int = 10240


class _Failure(Exception):
    """One attempt failed; ``connect`` marks failures that end the retry loop (MC-11)."""

    def __init__(self, reason: str, *, timeout: bool = False, connect: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timeout = timeout
        self.connect = connect


class _Connection:
    """One socket plus its protocol state."""

    def __init__(self, stream: trio.abc.Stream, settings: MemcacheSettings) -> None:
        self.stream = stream
        self.protocol = MemcacheClientProtocol(
            line_size_limit=settings.line_size_limit,
            data_size_limit=settings.data_size_limit,
        )

    @property
    def reusable(self) -> bool:
        return not self.protocol.broken and self.protocol.pending == 0

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)


def _deadline_scope(seconds: int) -> contextlib.AbstractContextManager[object]:
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
        pool_size: int = DEFAULT_POOL_SIZE,
    ) -> None:
        self.endpoint = endpoint
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

    async def aclose(self) -> None:
        """Close every pooled connection."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.aclose()

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
                # Postfix logs only from the second failure on: a single
                # dropped connection is routine and is retried silently.
                if attempt > 1:
                    _log.warning("memcache %s: %s", self.endpoint, failure.reason)
                if failure.connect:
                    break
        assert last is not None
        return Retry(f"memcache {self.endpoint}: {last.reason}", timeout=last.timeout)

    async def _attempt(
        self, encode: _Encoder, definitive: tuple[type[MemcacheEvent], ...]
    ) -> MemcacheEvent:
        async with self._connection() as connection:
            data = encode(connection.protocol)
            try:
                with _deadline_scope(self.settings.timeout):
                    await connection.stream.send_all(data)
            except trio.TooSlowError:
                raise _Failure(
                    f"timeout after {self.settings.timeout}s sending command", timeout=True
                ) from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise _Failure(f"write error: {exc or type(exc).__name__}") from None
            event, timed_out = await self._read_event(connection)
            if isinstance(event, CommandFailed):
                if event.detail:
                    # May hold table values: only at debug level.
                    _log.debug("memcache %s: %s: %s", self.endpoint, event.reason, event.detail)
                raise _Failure(event.reason, timeout=timed_out)
            if not isinstance(event, definitive):
                raise _Failure(f"unexpected reply {type(event).__name__}")
            return event

    async def _read_event(self, connection: _Connection) -> tuple[MemcacheEvent, bool]:
        """Read until the protocol yields the reply's event.

        Returns:
          The event and whether a time limit expired while reading.
        """
        protocol = connection.protocol
        timed_out = False
        while True:
            event = protocol.next_event()
            if event is not NEED_DATA:
                if timed_out and isinstance(event, CommandFailed):
                    event = CommandFailed(
                        f"timeout after {self.settings.timeout}s waiting for reply"
                    )
                return event, timed_out
            try:
                with _deadline_scope(self.settings.timeout):
                    chunk = await connection.stream.receive_some(_RECEIVE_SIZE)
            except trio.TooSlowError:
                # Treated like EOF: a value read completely before the
                # deadline is still returned (MC-9 step 4).
                timed_out = True
                chunk = b""
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                chunk = b""
            protocol.receive_data(chunk)

    # ------------------------------------------------------ connections

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[_Connection]:
        connection = self._idle.pop() if self._idle else await self._connect()
        try:
            yield connection
        except BaseException:
            await connection.aclose()
            raise
        if connection.reusable and not self._closed and len(self._idle) < self._pool_size:
            self._idle.append(connection)
        else:
            await connection.aclose()

    async def _connect(self) -> _Connection:
        endpoint = self.endpoint
        try:
            with _deadline_scope(self.settings.timeout):
                if isinstance(endpoint, InetEndpoint):
                    stream: trio.abc.Stream = await trio.open_tcp_stream(
                        endpoint.host, endpoint.port
                    )
                else:
                    stream = await trio.open_unix_socket(endpoint.path)
        except trio.TooSlowError:
            raise _Failure(
                f"timeout after {self.settings.timeout}s connecting", timeout=True, connect=True
            ) from None
        except OSError as exc:
            raise _Failure(f"connect: {exc.strerror or exc}", connect=True) from None
        return _Connection(stream, self.settings)
