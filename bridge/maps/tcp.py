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
  :data:`bridge.maps._lookup_server.DEFAULT_TIMEOUT`);
* ``2xx`` is found, ``5xx`` not found, and the connection stays open;
  ``4xx``, any other status and a malformed reply are ``Retry`` and close
  the connection (TCP-6, TCP-11: never retried);
* **deviation from TCP-10**: Postfix makes up to 10 attempts with a 1 s
  sleep between them, for any failed attempt (connect refused, reply cut
  short, reply too long). In a backup chain that is up to 10 s of stall
  per lookup. This client makes at most
  :attr:`~bridge.maps._lookup_server.LookupServerClient.max_attempts` attempts, with
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

from bridge.endpoint import EndpointError, InetEndpoint, parse_host_port
from bridge.maps._lookup_server import DEFAULT_TIMEOUT, LookupServerClient
from bridge.maps.base import MapError, OpenOptions, TableType
from bridge.outcome import Outcome, Retry
from bridge.protocol.events import NEED_DATA
from bridge.protocol.tcptable import (
    TcpReplyDecoder,
    TcpTableError,
    encode_tcp_request,
    parse_tcp_reply_line,
)

_log = logging.getLogger("bridge.maps")


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


class TcpMap(LookupServerClient):
    """A ``tcp:`` table: lookups go to a tcp_table server.

    Args:
      spec: the table as configured, e.g. ``tcp:127.0.0.1:9998``.
      endpoint: the server (:func:`parse_tcp_target`).
      smtputf8: apply the G-6 value check (non-UTF-8 value -> ConfigFailure).
      timeout: seconds for the connect and for each send or read wait.
    """

    _reply_errors = (TcpTableError,)

    def __init__(
        self,
        spec: str,
        endpoint: InetEndpoint,
        *,
        smtputf8: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(spec, endpoint, timeout=timeout)
        self._endpoint = endpoint
        self._smtputf8 = smtputf8
        self._decoder = TcpReplyDecoder()
        # Whether the server closed its side of the current connection: tells
        # a reply cut short (worth a reconnect) from an overlong one.
        self._eof_seen = False

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
        line = await self._exchange(encode_tcp_request(key), keep=_keeps_connection)
        if isinstance(line, Retry):
            return line
        outcome, _ = parse_tcp_reply_line(line, check_utf8=self._smtputf8)
        return outcome

    def _new_decoder(self) -> None:
        self._decoder = TcpReplyDecoder()
        self._eof_seen = False

    async def _read_reply(self) -> bytes:
        """Read one reply line (TCP-4), noting whether the server closed."""
        while True:
            line = self._decoder.next_line()
            if line is not NEED_DATA:
                return line
            data = await self._connection.receive_some()
            self._eof_seen = not data
            self._decoder.receive_data(data)

    def _buffered(self) -> int:
        return self._decoder.buffered_byte_count

    def _peer_closed(self, error: Exception) -> bool:
        # TCP-4/TCP-10: a reply cut short by the server closing earns the
        # reconnect; an overlong line would only come back the same.
        return self._eof_seen


def _keeps_connection(line: bytes) -> bool:
    """TCP-6: after 4xx, an unknown status or a malformed reply, Postfix disconnects."""
    return parse_tcp_reply_line(line, check_utf8=False)[1]


def _check(name: str, options: OpenOptions) -> None:
    parse_tcp_target(name)


def _open(spec: str, name: str, options: OpenOptions) -> TcpMap:
    return TcpMap(spec, parse_tcp_target(name), smtputf8=options.smtputf8)


#: ``tcp:`` in the registry: a pattern table, keys sent as given (CASE-3).
TABLE_TYPE: Final = TableType(
    "tcp", _check, _open, summary="HOST:PORT or [ADDR]:PORT, a tcp_table server"
)
