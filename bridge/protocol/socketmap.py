"""The socketmap protocol (spec section 2), both ends, sans-I/O.

Postfix sends one netstring per lookup, ``NAME SP KEY`` (SM-8), and reads
one netstring back, ``STATUS SP TEXT`` (SM-9). The bridge is normally the
server: :class:`SocketmapServerProtocol` turns received bytes into
:class:`~bridge.protocol.events.LookupRequest` events and :func:`encode_reply` turns the
lookup's :data:`~bridge.outcome.Outcome` into the reply bytes. For chaining
to another socketmap server the bridge is a client: :func:`encode_request`
and :func:`parse_socketmap_reply`, with a
:class:`~bridge.protocol.netstring.NetstringDecoder` sized by
:data:`MAX_REPLY_PAYLOAD` in between.

Nothing here raises on bytes from the peer. A request the server cannot
use becomes a :class:`~bridge.protocol.events.BadRequest` event, to be
answered with :func:`encode_bad_request`. If the framing itself is
broken the event is *fatal*: after answering, close the connection, since
there is no way to find where the next request starts. A client that is
sent garbage gets a ``Retry`` outcome (SM-9's "unknown" class).

Replies are built so that both the 3.12 source and the 3.7 ``postmap``
read them the same way (spec section 0): ``OK`` is always followed by a
space, even before an empty value.
"""

from __future__ import annotations

from typing import Final

from bridge.outcome import NOT_FOUND, ConfigFailure, Found, NotFound, Outcome, Retry
from bridge.postfix_text import is_utf8
from bridge.protocol.events import BadRequest, LookupRequest
from bridge.protocol.netstring import (
    NEED_DATA,
    ConnectionClosed,
    NeedData,
    NetstringDecoder,
    NetstringError,
    encode_netstring,
)

__all__ = [
    "MAX_REASON_LENGTH",
    "MAX_REPLY_PAYLOAD",
    "MAX_REQUEST_PAYLOAD",
    "BadRequest",
    "ConnectionClosed",
    "LookupRequest",
    "SocketmapServerProtocol",
    "clean_reason",
    "encode_bad_request",
    "encode_reply",
    "encode_request",
    "parse_socketmap_reply",
]

#: Largest request payload the server reads. Postfix 3.12 caps keys at
#: 10000 bytes (SM-7), but 3.7 clients send keys of any length, so we take
#: keys up to the size Postfix accepts for a whole reply (100000) plus 256
#: bytes of room for the map name and the separating space.
MAX_REQUEST_PAYLOAD: Final = 100_000 + 256

#: Largest reply payload Postfix reads by default; 100000 is accepted and
#: 100001 is a size error (SM-7). Used both to never send more and to bound
#: what the client side reads.
MAX_REPLY_PAYLOAD: Final = 100_000

#: Longest reason text put into or taken from a reply: Postfix shows at most
#: 200 bytes of it (SM-10), so more would only be thrown away.
MAX_REASON_LENGTH: Final = 200

_OK: Final = b"OK"
_NOTFOUND: Final = b"NOTFOUND"
_TEMP: Final = b"TEMP"
_TIMEOUT: Final = b"TIMEOUT"
_PERM: Final = b"PERM"


class SocketmapServerProtocol:
    """The server side of one socketmap connection.

    Feed received bytes to :meth:`receive_data` and call :meth:`next_event`
    until it returns :data:`NEED_DATA`. Requests come out in the order they
    arrived, even when a client pipelines several (Postfix itself never
    does, SM-13). Answer each with exactly one reply, in order.

    After the peer closes, every complete request still buffered comes out
    first, then :class:`ConnectionClosed`. A request cut short by the close
    is dropped (``ConnectionClosed(mid_frame=True)``): nobody is left to
    read its answer. After a fatal :class:`BadRequest`, :meth:`next_event`
    returns :class:`ConnectionClosed` for good and later bytes are ignored.
    """

    def __init__(self, max_request_payload: int = MAX_REQUEST_PAYLOAD) -> None:
        """Create the protocol state for a freshly accepted connection.

        Args:
          max_request_payload: the largest request payload accepted; a
            longer one is a fatal :class:`BadRequest` (SM-7 bridge note).
        """
        self._decoder = NetstringDecoder(max_request_payload)
        self._eof_received = False
        self._closed: ConnectionClosed | None = None

    @property
    def buffered_byte_count(self) -> int:
        """How many received bytes are held, not yet returned as a request."""
        return self._decoder.buffered_byte_count

    @property
    def request_in_progress(self) -> bool:
        """Whether part of a request has arrived (the length prefix counts).

        The decoder drops a length prefix once it has read it, so the byte
        count alone reads 0 in the middle of a request.
        """
        return self._decoder.in_frame or self._decoder.buffered_byte_count > 0

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the client.

        Args:
          data: the bytes; ``b""`` means the client closed its side.

        Raises:
          RuntimeError: if non-empty data follows EOF (a caller bug).
        """
        if not data:
            self._eof_received = True
        elif self._eof_received:
            raise RuntimeError("received data after EOF")
        if self._closed is None:
            self._decoder.receive_data(data)

    def next_event(self) -> LookupRequest | BadRequest | ConnectionClosed | NeedData:
        """Return the next thing that happened on the connection.

        Returns:
          A :class:`LookupRequest`, a :class:`BadRequest`,
          :class:`ConnectionClosed` (and again on every later call), or
          :data:`NEED_DATA` when more bytes are needed.
        """
        if self._closed is not None:
            return self._closed
        try:
            payload = self._decoder.next_payload()
        except NetstringError as exc:
            # The decoder keeps the error to raise it again; its traceback
            # would keep this call's frames (and a cycle back to the decoder)
            # alive after the connection is gone.
            exc.__traceback__ = None
            if self._eof_received:
                # Whatever is wrong with the tail, the client has gone: there
                # is no one to send a PERM reply to.
                self._closed = ConnectionClosed(
                    mid_frame=exc.kind != "eof" or self._decoder.in_frame
                )
                return self._closed
            self._closed = ConnectionClosed()
            return BadRequest(f"malformed socketmap request: {exc}", fatal=True)
        if payload is NEED_DATA:
            return NEED_DATA
        return _parse_request(payload)


def _parse_request(payload: bytes) -> LookupRequest | BadRequest:
    """Split a request payload at its first space (SM-8 bridge note)."""
    name, space, key = payload.partition(b" ")
    if not space:
        return BadRequest(
            f"socketmap request {clean_reason(payload)!r} has no space after the map name",
            fatal=False,
        )
    if not name:
        return BadRequest("socketmap request has an empty map name", fatal=False)
    if not name.isascii():
        return BadRequest(
            f"socketmap map name {clean_reason(name)!r} is not ASCII",
            fatal=False,
        )
    return LookupRequest(name.decode("ascii"), key)


def encode_request(name: str, key: bytes) -> bytes:
    """Build the request a Postfix client would send (SM-5, SM-8).

    Args:
      name: the socketmap name.
      key: the lookup key, sent as is.

    Returns:
      The netstring ``NAME SP KEY``.

    Raises:
      ValueError: if ``name`` is empty, not ASCII or contains a space (the
        server could not split the payload back apart).
    """
    if not name or not name.isascii() or " " in name:
        raise ValueError(f"invalid socketmap name {name!r}: need non-empty ASCII without spaces")
    return encode_netstring(name.encode("ascii") + b" " + key)


def encode_reply(outcome: Outcome) -> bytes:
    """Build the reply netstring for a lookup outcome (SM-9 bridge note).

    ``Found(v)`` becomes ``OK v`` (the space is always there, spec section
    0), ``NOT_FOUND`` becomes ``NOTFOUND``, ``Retry`` becomes ``TEMP`` or
    (when it marks a timeout) ``TIMEOUT``, ``ConfigFailure`` becomes
    ``PERM``. Reasons are cleaned up with :func:`clean_reason`.

    A value too long for Postfix to read (SM-7) is answered ``PERM`` with a
    reason saying so, because an oversized netstring would be a size error
    on the client and could leave its stream out of step (SM-16).

    Args:
      outcome: the lookup result.

    Returns:
      The complete netstring to send.
    """
    if isinstance(outcome, Found):
        payload = _OK + b" " + outcome.value
        if len(payload) > MAX_REPLY_PAYLOAD:
            reason = f"value too long for socketmap reply ({len(outcome.value)} bytes)"
            return encode_reply(ConfigFailure(reason))
        return encode_netstring(payload)
    if isinstance(outcome, NotFound):
        return encode_netstring(_NOTFOUND + b" ")
    if isinstance(outcome, Retry):
        status = _TIMEOUT if outcome.timeout else _TEMP
        return encode_netstring(status + b" " + clean_reason(outcome.reason).encode("ascii"))
    return encode_netstring(_PERM + b" " + clean_reason(outcome.reason).encode("ascii"))


def encode_bad_request(bad: BadRequest) -> bytes:
    """The reply to a request the server will not look up: ``PERM reason`` (SM-9)."""
    return encode_reply(ConfigFailure(bad.reason))


def parse_socketmap_reply(payload: bytes, *, check_utf8: bool = True) -> Outcome:
    """Read a reply payload the way Postfix 3.12 does (SM-9, SM-11).

    The payload is split at its first space; the word before it is matched
    case-sensitively. ``OK`` with no space at all is found with an empty
    value (the 3.12 reading; 3.7 says not found). A found value is cut at
    its first NUL, as Postfix treats it as a C string.

    Args:
      payload: the reply netstring's payload.
      check_utf8: apply Postfix's SMTPUTF8 check (G-6, on by default in
        Postfix): a found value that is not valid UTF-8 becomes
        ``ConfigFailure``.

    Returns:
      The outcome. Unknown status words, including an empty payload, are
      ``Retry``.
    """
    status, _, rest = payload.partition(b" ")
    if status == _OK:
        value = rest.partition(b"\0")[0]
        if check_utf8 and not is_utf8(value):
            return ConfigFailure(
                f"socketmap server returned a value that is not valid UTF-8: "
                f"{clean_reason(value)!r}"
            )
        return Found(value)
    if status == _NOTFOUND:
        return NOT_FOUND
    if status == _TEMP:
        return Retry(clean_reason(rest))
    if status == _TIMEOUT:
        return Retry(clean_reason(rest), timeout=True)
    if status == _PERM:
        return ConfigFailure(clean_reason(rest))
    return Retry(f"socketmap server sent an unknown reply: {clean_reason(payload)!r}")


def clean_reason(text: str | bytes) -> str:
    """Make a reason text safe to send or log, as Postfix shows it (SM-10).

    Leading whitespace is dropped, every character outside printable ASCII
    becomes ``?``, and the result is cut to :data:`MAX_REASON_LENGTH`.

    Args:
      text: the reason, as text or as raw bytes from the wire.

    Returns:
      Printable ASCII of at most :data:`MAX_REASON_LENGTH` characters.
    """
    raw = text.decode("latin-1") if isinstance(text, bytes) else text
    # Postfix's whitespace set (spec conventions); str.lstrip() alone would
    # also strip Unicode spaces.
    stripped = raw.lstrip(" \t\n\v\f\r")[:MAX_REASON_LENGTH]
    return "".join(char if " " <= char <= "~" else "?" for char in stripped)
