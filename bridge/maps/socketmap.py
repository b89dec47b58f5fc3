"""``socketmap:`` tables: chained lookups on another socketmap server (spec 2.4, 2.5).

The table name is ``socketmap:inet:HOST:PORT:NAME`` or
``socketmap:unix:PATH:NAME``, split at the *last* colon into endpoint and
socketmap name (SM-1). The client behaves like Postfix's dict_sockmap.c,
with a few deliberate differences noted below:

* one persistent connection per table, opened on the first lookup and
  reused (SM-13); a :class:`trio.Lock` keeps one request outstanding;
* a time limit on the connect and on every send and read wait (SM-12).
  Postfix uses a fixed 100 s; here it is the ``timeout`` argument,
  :data:`~bridge.maps._lookup_server.DEFAULT_TIMEOUT` by default, because a backup chain that stalls
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
from dataclasses import dataclass
from typing import Final

from bridge.endpoint import Endpoint, EndpointError, parse_endpoint
from bridge.maps._lookup_server import DEFAULT_TIMEOUT, MAX_ATTEMPTS, LookupServerClient
from bridge.maps.base import MapError, OpenOptions, TableType
from bridge.outcome import NOT_FOUND, Outcome, Retry
from bridge.protocol.events import NEED_DATA
from bridge.protocol.netstring import NetstringDecoder, NetstringError
from bridge.protocol.socketmap import MAX_REPLY_PAYLOAD, encode_request, parse_socketmap_reply

_log = logging.getLogger("bridge.maps")

#: Longest key sent to the server; longer keys are answered "not found"
#: locally, as Postfix 3.12 does (``socketmap_max_query_size``, SM-7).
MAX_QUERY_KEY: Final = 10_000


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


def _check(name: str, options: OpenOptions) -> None:
    parse_socketmap_target(name, base_dir=options.base_dir)


def _open(spec: str, name: str, options: OpenOptions) -> SocketmapMap:
    target = parse_socketmap_target(name, base_dir=options.base_dir)
    return SocketmapMap(spec, target, smtputf8=options.smtputf8)


#: ``socketmap:`` in the registry: a pattern table, keys sent as given (CASE-3).
TABLE_TYPE: Final = TableType(
    "socketmap",
    _check,
    _open,
    summary="inet:HOST:PORT:NAME or unix:PATH:NAME, another socketmap server",
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_ATTEMPTS",
    "MAX_QUERY_KEY",
    "TABLE_TYPE",
    "SocketmapMap",
    "SocketmapTarget",
    "parse_socketmap_target",
]
