"""``socketmap:`` tables: chained lookups on another socketmap server (spec 2.4, 2.5).

The table name is ``socketmap:inet:HOST:PORT:NAME`` or
``socketmap:unix:PATH:NAME``, split at the *last* colon into endpoint and
socketmap name (SM-1). The client behaves like Postfix's dict_sockmap.c,
with a few deliberate differences noted below:

* one persistent connection per table, opened on the first lookup and
  reused (SM-13); a :class:`trio.Lock` keeps one request outstanding;
* a time limit on the connect and on every send and read wait (SM-12).
  Postfix uses a fixed 100 s; here it is the ``timeout`` argument,
  :data:`DEFAULT_TIMEOUT` by default, because a backup chain that stalls
  for 100 s defers mail no better than one that gives up sooner;
* exactly one transparent reconnect-and-resend when the first attempt
  fails because the peer closed or reset the connection (SM-15): that is
  how an idle connection the server has dropped gets replaced;
* connect failure, timeout, or a format or size error in the reply ends
  the lookup as ``Retry`` at once (SM-16). Unlike Postfix, the connection
  is closed then, so a desynchronised stream is never reused; for the
  same reason, bytes left over after a reply close the connection too;
* a key longer than :data:`MAX_QUERY_KEY` is answered ``NOT_FOUND``
  without asking the server (3.12's ``socketmap_max_query_size``, SM-7).

The reply is turned into an outcome by
:func:`bridge.protocol.socketmap.parse_socketmap_reply` (SM-9 .. SM-11,
G-6): ``PERM`` is ``ConfigFailure``; ``TEMP``, ``TIMEOUT`` and unknown
replies are ``Retry``. Lookups never raise for server trouble.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import trio

from bridge.endpoint import Endpoint, EndpointError, InetEndpoint, parse_endpoint
from bridge.maps.base import MapError
from bridge.outcome import NOT_FOUND, Outcome, Retry
from bridge.protocol.events import NEED_DATA
from bridge.protocol.netstring import NetstringDecoder, NetstringError
from bridge.protocol.socketmap import MAX_REPLY_PAYLOAD, encode_request, parse_socketmap_reply

_log = logging.getLogger("bridge.maps")

#: Seconds allowed for the connect and for each send or read wait. Postfix
#: waits 100 s (SM-12), but this client sits in a backup chain behind a
#: Postfix lookup that is itself waiting: failing after 10 s answers
#: ``Retry`` while Postfix is still listening.
DEFAULT_TIMEOUT: Final = 10.0

#: Longest key sent to the server; longer keys are answered "not found"
#: locally, as Postfix 3.12 does (``socketmap_max_query_size``, SM-7).
MAX_QUERY_KEY: Final = 10_000

#: Bytes asked of the socket per read; replies are usually a few dozen
#: bytes, and the decoder bounds the total at MAX_REPLY_PAYLOAD anyway.
_RECEIVE_SIZE: Final = 65_536


@dataclass(frozen=True, slots=True)
class SocketmapTarget:
    """Where a ``socketmap:`` table sends its lookups (SM-1)."""

    endpoint: Endpoint
    name: str


def parse_socketmap_target(text: str, *, base_dir: str | None = None) -> SocketmapTarget:
    """Parse what follows ``socketmap:``.

    Args:
      text: ``inet:HOST:PORT:NAME`` or ``unix:PATH:NAME``.
      base_dir: a relative unix socket path is taken relative to it.

    Returns:
      The endpoint and the socketmap name (split at the last colon, SM-1).

    Raises:
      MapError: for a missing or unusable name, or a bad endpoint.
    """
    endpoint_text, colon, name = text.rpartition(":")
    if not colon or not endpoint_text:
        raise MapError(
            f"missing socketmap name in {text!r}: use inet:HOST:PORT:NAME or unix:PATH:NAME"
        )
    if not name or not name.isascii() or any(char.isspace() for char in name):
        # The server splits its request at the first space (SM-8), so a name
        # with whitespace could never be understood.
        raise MapError(f"invalid socketmap name {name!r} in {text!r}: need ASCII without spaces")
    try:
        endpoint = parse_endpoint(endpoint_text, base_dir=base_dir)
    except EndpointError as exc:
        raise MapError(f"bad socketmap endpoint in {text!r}: {exc}") from None
    return SocketmapTarget(endpoint, name)


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


#: Attempts per lookup on a chained server: the first, and one more on a
#: fresh connection when the server had closed the old one (SM-15). Postfix's
#: tcp client makes up to ten with 1 s pauses (TCP-10); for a backup chain a
#: dead server must answer TEMP in seconds, so tcp gets the same two.
MAX_ATTEMPTS: Final = 2


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
            for attempt in range(1, MAX_ATTEMPTS + 1):
                try:
                    reply = await self._attempt(request)
                except AttemptFailed as failure:
                    if not failure.peer_closed or self._closed or attempt == MAX_ATTEMPTS:
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
        if not self._connection.connected:
            await self._connection.connect()
            self._new_decoder()
        try:
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

    def _new_decoder(self) -> None:
        raise NotImplementedError

    async def _read_reply(self) -> bytes:
        raise NotImplementedError

    def _buffered(self) -> int:
        raise NotImplementedError

    def _peer_closed(self, error: Exception) -> bool:
        """Whether a decoder error means the server went away (worth the reconnect)."""
        raise NotImplementedError


class SocketmapMap(LookupServerClient):
    """A ``socketmap:`` table: lookups go to another socketmap server.

    Args:
      spec: the table as configured, e.g. ``socketmap:inet:127.0.0.1:9999:users``.
      target: the endpoint and socketmap name (:func:`parse_socketmap_target`).
      smtputf8: apply the G-6 value check (non-UTF-8 value -> ConfigFailure).
      timeout: seconds for the connect and for each send or read wait.
    """

    _reply_errors = (NetstringError,)

    def __init__(
        self,
        spec: str,
        target: SocketmapTarget,
        *,
        smtputf8: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(spec, target.endpoint, timeout=timeout)
        self._target = target
        self._smtputf8 = smtputf8
        self._decoder = NetstringDecoder(MAX_REPLY_PAYLOAD)

    @property
    def target(self) -> SocketmapTarget:
        """The server endpoint and socketmap name."""
        return self._target

    async def lookup(self, key: bytes) -> Outcome:
        """Ask the server for ``key``, sent exactly as given (CASE-3).

        Args:
          key: the lookup key.

        Returns:
          The server's answer as an outcome; ``Retry`` for any connection,
          time-limit or protocol trouble (``timeout=True`` for time limits).
          Never raises for server trouble.
        """
        if len(key) > MAX_QUERY_KEY:
            _log.warning(
                "table %s: key of %d bytes exceeds the %d-byte limit; answering not found",
                self._spec,
                len(key),
                MAX_QUERY_KEY,
            )
            return NOT_FOUND
        reply = await self._exchange(encode_request(self._target.name, key))
        if isinstance(reply, Retry):
            return reply
        return parse_socketmap_reply(reply, check_utf8=self._smtputf8)

    def _new_decoder(self) -> None:
        self._decoder = NetstringDecoder(MAX_REPLY_PAYLOAD)

    async def _read_reply(self) -> bytes:
        while True:
            payload = self._decoder.next_payload()
            if payload is not NEED_DATA:
                return payload
            self._decoder.receive_data(await self._connection.receive_some())

    def _buffered(self) -> int:
        return self._decoder.buffered_byte_count

    def _peer_closed(self, error: Exception) -> bool:
        # SM-6: only an "eof" error means the server went away; format and
        # size errors are final (SM-16).
        return isinstance(error, NetstringError) and error.kind == "eof"
