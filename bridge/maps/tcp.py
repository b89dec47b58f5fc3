"""``tcp:`` tables: chained lookups on a tcp_table server (spec 3.2, 3.3).

The table name is ``tcp:HOST:PORT`` (TCP-1). Each lookup sends
``get QUOTED-KEY LF`` and reads one reply line, using the codec in
:mod:`bridge.protocol.tcptable`. Connection handling follows Postfix's
dict_tcp.c, except for the retry schedule:

* one persistent connection per table, opened on the first lookup and
  kept until an error (TCP-12); a :class:`trio.Lock` keeps one request
  outstanding;
* a time limit on the connect and on each send or read wait (TCP-9),
  the ``timeout`` argument rather than Postfix's 100 s (see
  :data:`bridge.maps.socketmap.DEFAULT_TIMEOUT`);
* ``2xx`` is found, ``5xx`` not found, and the connection stays open;
  ``4xx``, any other status and a malformed reply are ``Retry`` and close
  the connection (TCP-6, TCP-11: never retried);
* **deviation from TCP-10**: Postfix makes up to 10 attempts with a 1 s
  sleep between them, for any failed attempt (connect refused, reply cut
  short, reply too long). In a backup chain that is up to 10 s of stall
  per lookup. This client makes at most :data:`MAX_ATTEMPTS` attempts, with
  no sleep, and only when the server closed or reset the connection (the
  case a stale idle connection produces, and the one a reconnect fixes).
  A connect failure, a time limit or an overlong reply line answers
  ``Retry`` at once: trying again immediately would meet the same server
  in the same state.

Bytes left over after a reply line close the connection: the stream is
out of step and its next line would answer the wrong lookup.
"""

from __future__ import annotations

import logging
from typing import Final

import trio

from bridge.endpoint import EndpointError, InetEndpoint, parse_host_port
from bridge.maps.base import MapError
from bridge.maps.socketmap import DEFAULT_TIMEOUT, AttemptFailed, ServerConnection
from bridge.outcome import Outcome, Retry
from bridge.protocol.events import NEED_DATA
from bridge.protocol.tcptable import (
    TcpReplyDecoder,
    TcpTableError,
    encode_tcp_request,
    parse_tcp_reply_line,
)

_log = logging.getLogger("bridge.maps")

#: Attempts per lookup when the server drops the connection: the first may
#: hit a connection the server closed while idle, the second runs on a
#: fresh one. More attempts would only stall the backup chain (TCP-10
#: deviation, see the module docstring).
MAX_ATTEMPTS: Final = 2


def parse_tcp_target(text: str) -> InetEndpoint:
    """Parse what follows ``tcp:``.

    Args:
      text: ``HOST:PORT`` or ``[ADDR]:PORT``.

    Returns:
      The server endpoint.

    Raises:
      MapError: for a bad host or port.
    """
    try:
        return parse_host_port(text)
    except EndpointError as exc:
        raise MapError(f"bad tcp table address {text!r}: {exc}") from None


class TcpMap:
    """A ``tcp:`` table: lookups go to a tcp_table server.

    Args:
      spec: the table as configured, e.g. ``tcp:127.0.0.1:9998``.
      endpoint: the server (:func:`parse_tcp_target`).
      smtputf8: apply the G-6 value check (non-UTF-8 value -> ConfigFailure).
      timeout: seconds for the connect and for each send or read wait.
    """

    def __init__(
        self,
        spec: str,
        endpoint: InetEndpoint,
        *,
        smtputf8: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._spec = spec
        self._endpoint = endpoint
        self._smtputf8 = smtputf8
        self._lock = trio.Lock()
        self._connection = ServerConnection(spec, endpoint, timeout=timeout)
        self._decoder = TcpReplyDecoder()
        # Whether the server closed its side of the current connection: tells
        # a reply cut short (worth a reconnect) from an overlong one.
        self._peer_closed = False
        self._closed = False

    @property
    def spec(self) -> str:
        """The table as written in the configuration."""
        return self._spec

    @property
    def endpoint(self) -> InetEndpoint:
        """The server."""
        return self._endpoint

    async def lookup(self, key: bytes) -> Outcome:
        """Ask the server for ``key`` (quoted per TCP-2, otherwise as given, CASE-3).

        Args:
          key: the lookup key.

        Returns:
          The server's answer as an outcome; ``Retry`` for any connection,
          time-limit or protocol trouble (``timeout=True`` for time limits).
          Never raises for server trouble.
        """
        request = encode_tcp_request(key)
        async with self._lock:
            for attempt in range(1, MAX_ATTEMPTS + 1):
                try:
                    line = await self._attempt(request)
                except AttemptFailed as failure:
                    if not failure.peer_closed or self._closed or attempt == MAX_ATTEMPTS:
                        return failure.outcome
                    _log.debug("table %s: %s; reconnecting", self._spec, failure)
                    continue
                outcome, keep_connection = parse_tcp_reply_line(line, check_utf8=self._smtputf8)
                if not keep_connection:
                    # TCP-6: after 4xx, an unknown status or a malformed
                    # reply Postfix disconnects, and so do we.
                    await self._connection.close()
                return outcome
        raise AssertionError("unreachable: the last attempt always returns")

    async def aclose(self) -> None:
        """Close the connection; later lookups answer ``Retry``. Idempotent."""
        self._closed = True
        await self._connection.close()

    async def _attempt(self, request: bytes) -> bytes:
        """Send ``request`` and read one reply line, connecting first if needed.

        Raises:
          AttemptFailed: for any failure; the connection is closed by then.
        """
        if self._closed:
            raise AttemptFailed(Retry(f"table {self._spec} is closed"), peer_closed=False)
        if not self._connection.connected:
            await self._connection.connect()
            self._decoder = TcpReplyDecoder()
            self._peer_closed = False
        try:
            await self._connection.send_all(request)
            line = await self._receive_line()
        except TcpTableError as exc:
            await self._connection.close()
            reason = f"table {self._spec}: bad reply: {exc}"
            # TCP-4/TCP-10: a reply cut short by the server closing earns the
            # reconnect; an overlong line would only come back the same.
            raise AttemptFailed(Retry(reason), peer_closed=self._peer_closed) from None
        except BaseException:
            # Including cancellation: the stream may be mid-reply, so it can
            # never be trusted again.
            await self._connection.close()
            raise
        if self._decoder.buffered_byte_count:
            _log.warning(
                "table %s: server sent more than one reply line; closing the connection",
                self._spec,
            )
            await self._connection.close()
        return line

    async def _receive_line(self) -> bytes:
        """Read one reply line (TCP-4), noting whether the server closed.

        Raises:
          TcpTableError: the line was cut short or too long.
          AttemptFailed: the connection failed or timed out.
        """
        while True:
            line = self._decoder.next_line()
            if line is not NEED_DATA:
                return line
            data = await self._connection.receive_some()
            self._peer_closed = not data
            self._decoder.receive_data(data)
