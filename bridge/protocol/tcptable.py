"""The tcp_table protocol (spec section 3), both ends, sans-I/O.

Postfix sends ``get SP QUOTED-KEY LF`` per lookup (TCP-1, TCP-2) and reads
one line back, ``DDD SP QUOTED-TEXT LF`` (TCP-4 .. TCP-7). Quoting is
``%XX`` hex. The bridge is normally the server:
:class:`TcpTableServerProtocol` turns received bytes into
:class:`~bridge.protocol.events.LookupRequest` events and :func:`encode_reply` turns a lookup
:data:`~bridge.outcome.Outcome` into the reply line. For chaining to
another tcp_table server the bridge is a client: :func:`encode_tcp_request`,
:class:`TcpReplyDecoder` and :func:`parse_tcp_reply_line`.

Server side choices (Postfix defines no server, so these are ours):

* ``get`` is matched case-sensitively, as Postfix sends it. One CR before
  the LF is tolerated, for people testing with telnet.
* A ``get`` whose key is badly quoted gets ``400``: we could not read the
  key, and answering ``500`` would claim it does not exist.
* Any other line (``put``, ``GET``, an empty line) gets ``500``, which
  tcp_table(5) gives as the answer to a rejected request.
* A line longer than :data:`MAX_REQUEST_LINE` gets ``400`` and the
  connection must then be closed: its end cannot be found without
  buffering it.

These are :class:`~bridge.protocol.events.BadRequest` events; :func:`encode_bad_request`
produces the reply. Nothing here raises on bytes from the peer except the
client-side :class:`TcpReplyDecoder`, whose errors are the "attempt
failed" cases of TCP-10.

Reply values are quoted minimally (TCP-8): only ``%`` and control bytes
are escaped, so spaces and UTF-8 text go out raw instead of tripling in
size. Requests are quoted exactly like Postfix does (TCP-2).
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote_to_bytes

from bridge.outcome import NOT_FOUND, ConfigFailure, Found, NotFound, Outcome, Retry
from bridge.postfix_text import is_utf8
from bridge.protocol._receive import ReceiveBuffer
from bridge.protocol.events import (
    NEED_DATA,
    BadRequest,
    ConnectionClosed,
    LookupRequest,
    NeedData,
)
from bridge.protocol.socketmap import clean_reason

__all__ = [
    "MAX_REPLY_LINE",
    "MAX_REQUEST_LINE",
    "BadRequest",
    "ConnectionClosed",
    "LookupRequest",
    "TcpReplyDecoder",
    "TcpTableError",
    "TcpTableServerProtocol",
    "encode_bad_request",
    "encode_reply",
    "encode_tcp_request",
    "parse_tcp_reply_line",
    "quote",
    "quote_value",
    "unquote",
]

#: Longest reply line Postfix reads, LF included (TCP-4): 4095 bytes of
#: content plus LF is fine, 4096 bytes without an LF is "too long".
MAX_REPLY_LINE: Final = 4096

#: Longest request line the server reads, CR and LF included. Keys are taken
#: up to the same 100000 bytes as socketmap requests (Postfix 3.7 sends long
#: keys); fully %-quoted that is 300000 bytes, plus b"get " and b"\r\n".
MAX_REQUEST_LINE: Final = 3 * 100_000 + len(b"get ") + len(b"\r\n")

_GET: Final = b"get "
_LF: Final = b"\n"
_CR: Final = b"\r"

#: TCP-2: every byte outside 0x21-0x7E, and '%' itself, is sent as %XX.
_NEEDS_QUOTING: Final = re.compile(rb"[^\x21-\x24\x26-\x7e]")
#: TCP-8: in a reply only '%' and control bytes must be quoted.
_VALUE_NEEDS_QUOTING: Final = re.compile(rb"[%\x00-\x1f\x7f]")
#: A '%' that does not start a two-hex-digit escape (TCP-3 bridge note).
_BAD_ESCAPE: Final = re.compile(rb"%(?![0-9A-Fa-f]{2})")

#: TCP-5: byte 3 of a reply must be one of these (LF cannot occur there).
_REPLY_SEPARATORS: Final = frozenset(b" \t\v\f\r")


class TcpTableError(Exception):
    """Bytes that break tcp_table's rules; the message says which."""


class TcpTableServerProtocol(ReceiveBuffer):
    """The server side of one tcp_table connection.

    Feed received bytes to :meth:`receive_data` and call :meth:`next_event`
    until it returns :data:`NEED_DATA`. Requests come out in the order they
    arrived; send one reply line for each, in the same order (TCP-12
    bridge note).

    After the peer closes, every complete line still buffered comes out
    first, then :class:`ConnectionClosed`; an unterminated last line is
    dropped (``mid_frame=True``). After a fatal :class:`BadRequest`,
    :meth:`next_event` returns :class:`ConnectionClosed` for good and later
    bytes are ignored.
    """

    def __init__(self, max_line: int = MAX_REQUEST_LINE) -> None:
        """Create the protocol state for a freshly accepted connection.

        Args:
          max_line: the longest request line accepted, LF included.
        """
        super().__init__()
        self._max_line = max_line
        # Bytes of the buffer already known to hold no LF, so bytes arriving
        # one at a time do not make us rescan the whole line each time.
        self._scanned = 0
        self._closed: ConnectionClosed | None = None

    @property
    def request_in_progress(self) -> bool:
        """Whether part of a request line has arrived."""
        return bool(self._buffer)

    def _discarding(self) -> bool:
        return self._closed is not None

    def next_event(self) -> LookupRequest | BadRequest | ConnectionClosed | NeedData:
        """Return the next thing that happened on the connection.

        Returns:
          A :class:`LookupRequest`, a :class:`BadRequest`,
          :class:`ConnectionClosed` (and again on every later call), or
          :data:`NEED_DATA` when more bytes are needed.
        """
        if self._closed is not None:
            return self._closed
        line = self._take_line()
        if line is not None:
            return _parse_request_line(line)
        if len(self._buffer) >= self._max_line:
            self._buffer.clear()
            self._closed = ConnectionClosed()
            return BadRequest(
                f"request line longer than {self._max_line} bytes", fatal=True, temporary=True
            )
        if self._eof:
            self._closed = ConnectionClosed(mid_frame=bool(self._buffer))
            self._buffer.clear()
            return self._closed
        return NEED_DATA

    def _take_line(self) -> bytes | None:
        """Remove and return the next line without its LF, or None if incomplete."""
        newline = self._buffer.find(_LF, self._scanned, self._max_line)
        if newline < 0:
            self._scanned = min(len(self._buffer), self._max_line)
            return None
        line = bytes(self._buffer[:newline])
        del self._buffer[: newline + 1]
        self._scanned = 0
        return line


def _parse_request_line(line: bytes) -> LookupRequest | BadRequest:
    if line.endswith(_CR):
        line = line[:-1]
    if not line.startswith(_GET):
        command = line.split(b" ", 1)[0]
        return BadRequest(
            f"unsupported request {clean_reason(command)!r}: only 'get' is served",
            fatal=False,
            temporary=False,
        )
    try:
        key = unquote(line[len(_GET) :])
    except TcpTableError as exc:
        return BadRequest(f"malformed key in get request: {exc}", fatal=False, temporary=True)
    return LookupRequest(None, key)


def quote(data: bytes) -> bytes:
    """Quote bytes exactly as Postfix's client quotes a key (TCP-2).

    Args:
      data: any bytes.

    Returns:
      ``data`` with every byte outside 0x21-0x7E, and every ``%``, written
      as ``%`` plus two upper-case hex digits.
    """
    return _NEEDS_QUOTING.sub(_escape, data)


def quote_value(data: bytes) -> bytes:
    """Quote a reply value minimally, as TCP-8 allows.

    Only ``%`` and control bytes (0x00-0x1F, 0x7F) are escaped: they are
    what could end the line early or be misread. Spaces and bytes from 0x80
    up go out raw, so UTF-8 values keep their size.

    Args:
      data: any bytes.

    Returns:
      The quoted bytes, readable by :func:`unquote` and by Postfix.
    """
    return _VALUE_NEEDS_QUOTING.sub(_escape, data)


def unquote(data: bytes) -> bytes:
    """Undo ``%XX`` quoting, accepting hex digits of either case (TCP-3 note, TCP-5).

    Args:
      data: quoted bytes.

    Returns:
      The original bytes.

    Raises:
      TcpTableError: if a ``%`` is not followed by two hex digits.
    """
    bad = _BAD_ESCAPE.search(data)
    if bad is not None:
        where = bad.start()
        raise TcpTableError(
            f"'%' not followed by two hex digits at offset {where}: "
            f"{clean_reason(data[where : where + 3])!r}"
        )
    return unquote_to_bytes(data)


def _escape(match: re.Match[bytes]) -> bytes:
    return b"%%%02X" % match[0][0]


def encode_tcp_request(key: bytes) -> bytes:
    """Build the request line Postfix's client sends for ``key`` (TCP-1, TCP-2).

    Args:
      key: the lookup key.

    Returns:
      ``b"get " + quote(key) + b"\\n"``.
    """
    return _GET + quote(key) + _LF


def encode_reply(outcome: Outcome) -> bytes:
    """Build the reply line for a lookup outcome (TCP-6 bridge note).

    ``Found(v)`` becomes ``200 v`` (see :func:`quote_value`), ``NOT_FOUND``
    becomes ``500 not found``, and both ``Retry`` and ``ConfigFailure``
    become ``400 reason``: tcp_table has no code for a configuration error.

    A value whose line would exceed :data:`MAX_REPLY_LINE` is answered
    ``400`` with a reason saying so. An overlong line would make Postfix
    fail the attempt and try ten times over (TCP-10), for the same result.

    Args:
      outcome: the lookup result.

    Returns:
      The reply line, LF included.
    """
    if isinstance(outcome, Found):
        line = b"200 " + quote_value(outcome.value) + _LF
        if len(line) > MAX_REPLY_LINE:
            return _temporary_failure(
                f"value too long for tcp_table reply ({len(outcome.value)} bytes)"
            )
        return line
    if isinstance(outcome, NotFound):
        return b"500 not found\n"
    return _temporary_failure(outcome.reason)


def encode_bad_request(bad: BadRequest) -> bytes:
    """Build the reply line for a request the server will not look up.

    Args:
      bad: the event from :meth:`TcpTableServerProtocol.next_event`.

    Returns:
      ``400 reason`` when ``bad.temporary`` is set, else ``500 reason``,
      LF included.
    """
    if bad.temporary:
        return _temporary_failure(bad.reason)
    return b"500 " + quote_value(clean_reason(bad.reason).encode("ascii")) + _LF


def _temporary_failure(reason: str) -> bytes:
    # clean_reason() leaves at most 200 printable ASCII bytes, none of which
    # needs quoting except '%', so the line stays far below MAX_REPLY_LINE.
    return b"400 " + quote_value(clean_reason(reason).encode("ascii")) + _LF


def parse_tcp_reply_line(line: bytes, *, check_utf8: bool = True) -> tuple[Outcome, bool]:
    """Read a reply line the way Postfix does (TCP-5 .. TCP-7).

    The syntax check comes first and covers the whole line: three digits,
    a whitespace byte, then text that unquotes cleanly. Only then does the
    first digit decide. The text is taken literally after byte 3, so a
    second space or a trailing CR is part of the value. A found value is
    cut at its first NUL.

    Args:
      line: the reply line without its LF.
      check_utf8: apply Postfix's SMTPUTF8 check (G-6, on by default in
        Postfix): a found value that is not valid UTF-8 becomes
        ``ConfigFailure``.

    Returns:
      ``(outcome, keep_connection)``: ``keep_connection`` is False when
      Postfix would disconnect after this reply (TCP-6: every status other
      than found and not found, and every malformed reply).
    """
    if len(line) < 4 or not line[:3].isdigit() or line[3] not in _REPLY_SEPARATORS:
        return Retry(f"malformed tcp_table reply {clean_reason(line)!r}"), False
    try:
        text = unquote(line[4:])
    except TcpTableError as exc:
        return Retry(f"malformed tcp_table reply: {exc}"), False
    first_digit = line[:1]
    if first_digit == b"2":
        value = text.partition(b"\0")[0]
        if check_utf8 and not is_utf8(value):
            return ConfigFailure(
                f"tcp_table server returned a value that is not valid UTF-8: "
                f"{clean_reason(value)!r}"
            ), True
        return Found(value), True
    if first_digit == b"5":
        return NOT_FOUND, True
    if first_digit == b"4":
        return Retry(clean_reason(text)), False
    return Retry(f"tcp_table server sent an unknown status {clean_reason(line[:3])!r}"), False


class TcpReplyDecoder(ReceiveBuffer):
    """Split a client connection's incoming bytes into reply lines (TCP-4).

    Feed bytes with :meth:`receive_data` and take lines with
    :meth:`next_line` until it returns :data:`NEED_DATA`; then at most
    ``MAX_REPLY_LINE - 1`` bytes stay buffered. Errors are the TCP-10 cases where the attempt fails
    and Postfix reconnects: a line that reaches :data:`MAX_REPLY_LINE`
    bytes without an LF, or the connection closing before an LF.
    """

    def __init__(self) -> None:
        super().__init__()
        self._error: TcpTableError | None = None

    def _discarding(self) -> bool:
        return self._error is not None

    def next_line(self) -> bytes | NeedData:
        """Return the next reply line without its LF.

        Returns:
          The line, or :data:`NEED_DATA` if its LF has not arrived yet.

        Raises:
          TcpTableError: if :data:`MAX_REPLY_LINE` bytes arrived without an
            LF, or the server closed the connection before one. The error
            is sticky: the connection is out of step and must be closed.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next_line()
        except TcpTableError as exc:
            self._error = exc
            self._buffer.clear()
            raise

    def _next_line(self) -> bytes | NeedData:
        newline = self._buffer.find(_LF, 0, MAX_REPLY_LINE)
        if newline >= 0:
            line = bytes(self._buffer[:newline])
            del self._buffer[: newline + 1]
            return line
        if len(self._buffer) >= MAX_REPLY_LINE:
            raise TcpTableError(f"tcp_table reply longer than {MAX_REPLY_LINE - 1} bytes")
        if self._eof:
            if self._buffer:
                raise TcpTableError("connection closed in the middle of a tcp_table reply")
            raise TcpTableError("connection closed")
        return NEED_DATA
