"""The client base that ``socketmap:`` and ``tcp:`` tables share (and later lookup servers).

Theory of operation
-------------------
A chained lookup server gets one request at a time over one persistent
connection (SM-13), opened on the first lookup. :class:`ServerConnection`
owns that connection and puts the time limit on the connect and on each
send or read wait separately (SM-12, TCP-9); every failure surfaces as
:class:`AttemptFailed`. :class:`LookupServerClient` strings attempts
together under its retry policy (class attributes, so a protocol changes
them by subclassing) and leaves the codec to the subclass: a reply
decoder, how to read one reply, and which decoder errors mean the peer
went away. A server that announces itself on connect (Postfix's
proxymap) overrides :meth:`LookupServerClient._on_connect`.

Resource handling
-----------------
Any failure, and any cancellation in the middle of an exchange, closes
the connection: a stream that may be mid-reply is never read again.
:meth:`LookupServerClient.aclose` closes it for good.

Error handling
--------------
Nothing here raises for server trouble: an exchange returns the reply
bytes or the :class:`~bridge.outcome.Retry` the lookup answers
(``timeout=True`` for time limits).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import ClassVar, Final

import trio

from bridge.endpoint import Endpoint, InetEndpoint
from bridge.outcome import Retry

_log = logging.getLogger("bridge.maps")

#: Seconds allowed for the connect and for each send or read wait. Postfix
#: waits 100 s (SM-12), but this client sits in a backup chain behind a
#: Postfix lookup that is itself waiting: failing after 10 s answers
#: ``Retry`` while Postfix is still listening.
DEFAULT_TIMEOUT: Final = 10.0

#: Bytes asked of the socket per read; replies are usually a few dozen
#: bytes, and the decoder bounds the total at MAX_REPLY_PAYLOAD anyway.
_RECEIVE_SIZE: Final = 65_536


#: Attempts per lookup on a chained server: the first, and one more on a
#: fresh connection when the server had closed the old one (SM-15). Postfix's
#: tcp client makes up to ten with 1 s pauses (TCP-10); for a backup chain a
#: dead server must answer TEMP in seconds, so tcp gets the same two.
MAX_ATTEMPTS: Final = 2


async def open_endpoint_stream(endpoint: Endpoint) -> trio.abc.Stream:
    """Connect to an endpoint (no time limit of its own; the caller sets one).

    Args:
      endpoint: a TCP host and port, or a unix socket path.

    Returns:
      The connected stream.

    Raises:
      OSError: if the connection cannot be made (refused, no such host or
        socket).
    """
    if isinstance(endpoint, InetEndpoint):
        return await trio.open_tcp_stream(endpoint.host, endpoint.port)
    return await trio.open_unix_socket(endpoint.path)


class AttemptFailed(Exception):
    """One request/reply attempt failed; ``outcome`` is what the lookup answers.

    ``peer_closed`` marks the failures where the server closed or reset the
    connection (SM-15's EOF errors), the only kind worth one transparent
    reconnect. Connect failures and time limits are never retried.
    """

    def __init__(self, outcome: Retry, *, peer_closed: bool) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome
        self.peer_closed = peer_closed


class ServerConnection:
    """The persistent connection from one chained table to its server.

    It connects on demand and puts the time limit on the connect and on each
    send or read wait separately (SM-12, TCP-9). Every failure surfaces as
    :class:`AttemptFailed`, so the protocol clients only decide what to do
    about their own codec errors. The caller serialises use (one request
    outstanding, SM-13).

    Args:
      spec: the table, for failure reasons.
      endpoint: the server.
      timeout: seconds for the connect and for each send or read wait.
    """

    def __init__(self, spec: str, endpoint: Endpoint, *, timeout: float) -> None:
        self._spec = spec
        self._endpoint = endpoint
        self._timeout = timeout
        self._stream: trio.abc.Stream | None = None

    @property
    def connected(self) -> bool:
        """Whether a connection is open (it may still turn out to be dead)."""
        return self._stream is not None

    async def connect(self) -> None:
        """Open the connection.

        Raises:
          AttemptFailed: the connect failed or timed out (``peer_closed``
            is False: SM-16 makes this final).
        """
        try:
            with trio.fail_after(self._timeout):
                self._stream = await open_endpoint_stream(self._endpoint)
        except trio.TooSlowError:
            reason = f"table {self._spec}: connect to {self._endpoint} timed out"
            raise AttemptFailed(Retry(reason, timeout=True), peer_closed=False) from None
        except OSError as exc:
            reason = f"table {self._spec}: cannot connect to {self._endpoint}: {exc}"
            raise AttemptFailed(Retry(reason), peer_closed=False) from None

    async def send_all(self, data: bytes) -> None:
        """Send ``data``.

        Raises:
          AttemptFailed: not connected, the connection broke, or the send
            timed out.
        """
        stream = self._require_stream()
        try:
            with trio.fail_after(self._timeout):
                await stream.send_all(data)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._failure(exc, "cannot send") from None

    async def receive_some(self) -> bytes:
        """Wait for bytes from the server.

        Returns:
          The bytes; ``b""`` when the server closed its side.

        Raises:
          AttemptFailed: not connected, the connection broke, or nothing
            arrived within the time limit.
        """
        stream = self._require_stream()
        try:
            with trio.fail_after(self._timeout):
                return bytes(await stream.receive_some(_RECEIVE_SIZE))
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._failure(exc, "no reply") from None

    async def close(self) -> None:
        """Drop the connection, if any, without waiting for the server. Idempotent."""
        stream, self._stream = self._stream, None
        if stream is not None:
            await trio.aclose_forcefully(stream)

    def _require_stream(self) -> trio.abc.Stream:
        if self._stream is None:
            # Another task closed the table while this one waited its turn.
            reason = f"table {self._spec}: connection is closed"
            raise AttemptFailed(Retry(reason), peer_closed=False)
        return self._stream

    def _failure(self, exc: Exception, doing: str) -> AttemptFailed:
        if isinstance(exc, trio.TooSlowError):
            reason = f"table {self._spec}: {doing} within {self._timeout:g} s"
            return AttemptFailed(Retry(reason, timeout=True), peer_closed=False)
        reason = f"table {self._spec}: connection lost: {exc or type(exc).__name__}"
        return AttemptFailed(Retry(reason), peer_closed=True)


class LookupServerClient:
    """One request, one reply, over a persistent connection to a lookup server.

    The part that socketmap: and tcp: tables share: one request at a time
    (SM-13), a fresh connection when there is none, and at most one more
    attempt, only when the server closed or reset the connection (SM-15;
    TCP-10 as the bridge applies it). Any failure closes the connection,
    so a stream can never be read out of step.

    Subclasses supply the reply decoder: :meth:`_new_decoder`,
    :meth:`_read_reply`, :meth:`_buffered` and the error classes.
    """

    #: Decoder errors that fail an attempt (the stream is closed after them).
    _reply_errors: tuple[type[Exception], ...] = ()

    #: Attempts per lookup; only a peer that closed the connection earns
    #: another one, on a fresh connection.
    max_attempts: ClassVar[int] = MAX_ATTEMPTS

    def __init__(self, spec: str, endpoint: Endpoint, *, timeout: float) -> None:
        self._spec = spec
        self._lock = trio.Lock()
        self._connection = ServerConnection(spec, endpoint, timeout=timeout)
        self._closed = False

    @property
    def spec(self) -> str:
        """The table as written in the configuration."""
        return self._spec

    async def aclose(self) -> None:
        """Close the connection; later lookups answer ``Retry``. Idempotent."""
        self._closed = True
        await self._connection.close()

    async def _exchange(
        self, request: bytes, keep: Callable[[bytes], bool] | None = None
    ) -> bytes | Retry:
        """Send ``request``, return its reply, or the Retry the lookup answers.

        Args:
          keep: judges the reply; False closes the connection (tcp's 4xx,
            TCP-6) before the next request can use it.
        """
        async with self._lock:
            for attempt in range(1, self.max_attempts + 1):
                try:
                    reply = await self._attempt(request)
                except AttemptFailed as failure:
                    if not failure.peer_closed or self._closed or attempt == self.max_attempts:
                        return failure.outcome
                    # The server dropped the (probably idle) connection: a
                    # fresh connection gets one more try, and that is final.
                    _log.debug("table %s: %s; reconnecting once", self._spec, failure)
                    continue
                if keep is not None and not keep(reply):
                    await self._connection.close()
                return reply
        raise AssertionError("unreachable: the last attempt always returns")

    async def _attempt(self, request: bytes) -> bytes:
        """Send ``request`` and read one reply, connecting first if needed.

        Raises:
          AttemptFailed: for any failure; the connection is closed by then.
        """
        if self._closed:
            raise AttemptFailed(Retry(f"table {self._spec} is closed"), peer_closed=False)
        try:
            if not self._connection.connected:
                await self._connection.connect()
                self._new_decoder()
                await self._on_connect()
            await self._connection.send_all(request)
            reply = await self._read_reply()
        except self._reply_errors as exc:
            await self._connection.close()
            reason = f"table {self._spec}: bad reply: {exc}"
            raise AttemptFailed(Retry(reason), peer_closed=self._peer_closed(exc)) from None
        except BaseException:
            # Including cancellation: the stream may be mid-reply, so it can
            # never be trusted again.
            await self._connection.close()
            raise
        if self._buffered():
            _log.warning(
                "table %s: server sent more than one reply; closing the connection", self._spec
            )
            await self._connection.close()
        return reply

    async def _on_connect(self) -> None:
        """Read what the server says before the first request; nothing by default.

        Raises:
          AttemptFailed or one of :attr:`_reply_errors`: the greeting was
          wrong or did not come (the connection is then closed).
        """

    def _new_decoder(self) -> None:
        raise NotImplementedError

    async def _read_reply(self) -> bytes:
        raise NotImplementedError

    def _buffered(self) -> int:
        raise NotImplementedError

    def _peer_closed(self, error: Exception) -> bool:
        """Whether a decoder error means the server went away (worth the reconnect)."""
        raise NotImplementedError
