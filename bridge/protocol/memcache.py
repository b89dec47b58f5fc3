"""Client side of the memcache text protocol, without I/O (spec MC-7 .. MC-10).

Theory of operation
-------------------

One :class:`MemcacheClientProtocol` object stands for one connection to a
memcache server, in the style of h11's ``Connection``. It never touches a
socket. The I/O layer asks it for the bytes of a command
(:meth:`~MemcacheClientProtocol.send_get`, ``send_set``, ``send_delete``),
writes them, and feeds whatever the server sends back into
:meth:`~MemcacheClientProtocol.receive_data`. It then calls
:meth:`~MemcacheClientProtocol.next_event` until that returns
:data:`NEED_DATA`; each other return value is the reply to the oldest
command still outstanding. Memcache answers commands strictly in order,
so several commands may be outstanding at once (pipelining).

The reply parser reproduces Postfix's reading of the stream
(memcache_proto.c, dict_memcache.c), not the memcache specification:

* a reply line ends at LF, one CR before it is dropped, and it may not
  exceed ``line_size_limit`` bytes including its LF (MC-8);
* a line is compared the way C compares strings, so it ends at its first
  NUL byte (``END\\0junk`` is ``END``);
* a ``get`` header is read the way ``sscanf(line, "VALUE %*s %*s %ld")``
  reads it (MC-9), see :func:`_scan_value_length`;
* the value is exactly the announced number of bytes followed by exactly
  CRLF, and the value is cut at its first NUL (MC-9 step 4).

Any failure leaves the byte stream at an unknown position, so the
connection is finished: the failing command gets a :class:`CommandFailed`
naming the cause, every command queued behind it gets
``CommandFailed("connection closed after error")``, and new commands
raise :class:`MemcacheProtocolError`. :attr:`~MemcacheClientProtocol.broken`
tells the I/O layer to close the connection and open a new one, which is
what Postfix does after every failure (MC-11). The retry loop itself lives
in the I/O layer.

Memory is bounded: the parser holds at most ``line_size_limit`` bytes of
an unfinished line and at most ``data_size_limit + 2`` bytes of an
unfinished value, plus whatever the last :meth:`receive_data` call added,
as long as the caller feeds data only after :data:`NEED_DATA`.
"""

from __future__ import annotations

import enum
import operator
import re
from collections import deque
from dataclasses import dataclass
from typing import Final, TypeAlias

from bridge.protocol.events import NEED_DATA, NeedData

__all__ = [
    "CONNECTION_CLOSED_AFTER_ERROR",
    "NEED_DATA",
    "CommandFailed",
    "DeleteNotFound",
    "Deleted",
    "GetHit",
    "GetMiss",
    "MemcacheClientProtocol",
    "MemcacheEvent",
    "MemcacheProtocolError",
    "NeedData",
    "Stored",
    "Version",
    "escape_for_log",
]

#: The reason given to commands queued behind a failure; their replies can
#: no longer be told apart from the rest of the stream.
CONNECTION_CLOSED_AFTER_ERROR: Final = "connection closed after error"

# Bounds of a C ``long`` on the LP64 systems Postfix runs on: ``%ld`` of an
# over-long digit string saturates to these, like strtol().
_C_LONG_MAX: Final = 2**63 - 1
_C_LONG_MIN: Final = -(2**63)

# A longer digit string cannot fit a C long (19 digits do), so it saturates
# without being converted; this also keeps int() clear of Python's limit on
# converting huge digit strings.
_C_LONG_MAX_DIGITS: Final = 19

# What ``sscanf(line, "VALUE %*s %*s %ld")`` accepts (MC-9 step 2). The
# literal must open the line; each ``%*s`` skips C whitespace and takes a
# maximal run of non-whitespace (so "VALUEk 0 3" parses, with key "k");
# ``%ld`` skips whitespace, takes an optional sign and at least one decimal
# digit, and ignores whatever follows ("3abc" is 3, "0x10" is 0). The
# whitespace set is C isspace() in the C locale.
_VALUE_HEADER: Final = re.compile(
    rb"VALUE[ \t\n\v\f\r]*"
    rb"[^ \t\n\v\f\r]+[ \t\n\v\f\r]+"
    rb"[^ \t\n\v\f\r]+[ \t\n\v\f\r]+"
    rb"([+-]?[0-9]+)"
)

# A key or command token that could end or split the command line: C
# whitespace, SP, control bytes and DEL. A CR or LF here would let a key
# inject a second command.
_UNSAFE_TOKEN_BYTE: Final = re.compile(rb"[\x00-\x20\x7f]")

_CR: Final = 0x0D
_LF: Final = 0x0A

# One log-safe rendering per byte value, so escaping is a table lookup.
_LOG_ESCAPES: Final = tuple(
    "\\\\" if byte == 0x5C else chr(byte) if 0x20 <= byte <= 0x7E else f"\\x{byte:02x}"
    for byte in range(256)
)


class MemcacheProtocolError(Exception):
    """The caller used the protocol object in a way its state forbids.

    Raised for sending a command on a broken connection and for feeding
    data after end of stream. Server misbehaviour never raises: it becomes
    a :class:`CommandFailed` event.
    """


@dataclass(frozen=True, slots=True)
class GetHit:
    """A ``get`` found a value (MC-9 step 4).

    Attributes:
      value: the value bytes, cut at the first NUL.
      reusable: False when the line after the value was not exactly ``END``
        or could not be read; the value still counts, but the connection
        must be closed (it is then :attr:`~MemcacheClientProtocol.broken`).
    """

    value: bytes
    reusable: bool


@dataclass(frozen=True, slots=True)
class GetMiss:
    """A ``get`` was answered with the line ``END``: the key is absent (MC-9 step 1)."""


@dataclass(frozen=True, slots=True)
class Stored:
    """A ``set`` was answered with ``STORED`` (MC-10)."""


@dataclass(frozen=True, slots=True)
class Deleted:
    """A ``delete`` was answered with ``DELETED`` (MC-10)."""


@dataclass(frozen=True, slots=True)
class DeleteNotFound:
    """A ``delete`` was answered with ``NOT_FOUND``: Postfix FAIL without error (MC-10)."""


@dataclass(frozen=True, slots=True)
class CommandFailed:
    """The command failed in one of the ways of MC-8 .. MC-10; the connection is finished.

    Attributes:
      reason: what went wrong, safe to log and to send to Postfix: it never
        holds bytes that could belong to a stored value (memcache's own
        status lines, such as ``SERVER_ERROR ...``, are quoted; any other
        unexpected line is described by its length).
      detail: the offending bytes, escaped, for debug logging only.
    """

    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Version:
    """A ``version`` was answered with ``VERSION text``.

    Bulk loads send their ``set ... noreply`` commands followed by one
    ``version``: memcache answers commands in order, so this reply proves
    that every set before it was processed, and any error line a set
    produced arrives in its place and fails the barrier.
    """

    text: bytes


MemcacheEvent: TypeAlias = (
    GetHit | GetMiss | Stored | Deleted | DeleteNotFound | Version | CommandFailed
)


class _Command(enum.Enum):
    GET = enum.auto()
    SET = enum.auto()
    DELETE = enum.auto()
    VERSION = enum.auto()


class _Stage(enum.Enum):
    """Where the parser is inside the reply to the oldest outstanding command."""

    # The first line of any reply.
    REPLY_LINE = enum.auto()
    # A get's value bytes and the CRLF after them.
    VALUE_DATA = enum.auto()
    # The line after a get's value, which should be END.
    TRAILER_LINE = enum.auto()


class _ReplyError(Exception):
    """The reply cannot be read; carries the log-safe reason and the raw detail."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


#: First words of the lines memcache itself writes. Such a line is the
#: server's own message and safe to log; any other line may be part of a
#: stored value (a stream out of step), so only its length is logged.
_STATUS_WORDS = frozenset(
    {
        b"SERVER_ERROR",
        b"CLIENT_ERROR",
        b"ERROR",
        b"END",
        b"STORED",
        b"NOT_STORED",
        b"EXISTS",
        b"NOT_FOUND",
        b"DELETED",
        b"VERSION",
        b"VALUE",
    }
)


def _unexpected_line(line: bytes) -> _ReplyError:
    """A failure for an unexpected reply line that never puts table values in the reason."""
    words = line.split(None, 1)
    if words and words[0] in _STATUS_WORDS:
        return _ReplyError(escape_for_log(line))
    return _ReplyError(f"unexpected reply line ({len(line)} bytes)", escape_for_log(line))


def escape_for_log(data: bytes, limit: int = 100) -> str:
    """Render server bytes as printable ASCII, safe to put in a log line.

    Printable ASCII is kept (backslash doubled, so the output is
    unambiguous), every other byte becomes ``\\xNN``.

    Args:
      data: the bytes to show.
      limit: show at most this many bytes; if ``data`` is longer, ``...``
        is appended.

    Returns:
      The escaped text.
    """
    shown = "".join(_LOG_ESCAPES[byte] for byte in data[:limit])
    return shown + "..." if len(data) > limit else shown


def _c_string(line: bytes) -> bytes:
    """The line as C's strcmp()/sscanf() see it: up to its first NUL."""
    return line.partition(b"\0")[0]


def _scan_value_length(line: bytes) -> int | None:
    """Read the length of a ``get`` header as Postfix's sscanf() does (MC-9 step 2).

    Args:
      line: the reply line, already cut at NUL.

    Returns:
      The length, saturated to the range of a C long like ``%ld``, or None
      when the line is not a ``VALUE`` header at all.
    """
    match = _VALUE_HEADER.match(line)
    if match is None:
        return None
    token = match.group(1)
    negative = token.startswith(b"-")
    digits = token.lstrip(b"+-").lstrip(b"0")
    if len(digits) > _C_LONG_MAX_DIGITS:
        return _C_LONG_MIN if negative else _C_LONG_MAX
    magnitude = int(digits) if digits else 0
    value = -magnitude if negative else magnitude
    return max(_C_LONG_MIN, min(_C_LONG_MAX, value))


def _check_token(token: bytes, what: str) -> None:
    """Refuse a key that would not travel as exactly one command-line token.

    Raises:
      ValueError: ``token`` is empty or holds a byte <= 0x20 or 0x7F.
    """
    if not token:
        raise ValueError(f"memcache {what} is empty")
    if _UNSAFE_TOKEN_BYTE.search(token):
        raise ValueError(
            f"memcache {what} contains whitespace or a control byte: {escape_for_log(token)}"
        )


class MemcacheClientProtocol:
    """The client half of one memcache connection (MC-7 .. MC-10), without I/O.

    Args:
      line_size_limit: memcache_table(5) ``line_size_limit``: a reply line
        of N bytes (without CR/LF) is accepted iff N + 1 <= this (MC-8).
      data_size_limit: memcache_table(5) ``data_size_limit``: the largest
        value length a ``get`` reply may announce (MC-9).

    Raises:
      ValueError: a limit is below 1 (Postfix requires >= 1, MC-1).
    """

    def __init__(
        self,
        *,
        line_size_limit: int,
        data_size_limit: int,
    ) -> None:
        if line_size_limit < 1:
            raise ValueError(f"line_size_limit must be >= 1, not {line_size_limit}")
        if data_size_limit < 1:
            raise ValueError(f"data_size_limit must be >= 1, not {data_size_limit}")
        self._line_size_limit = line_size_limit
        self._data_size_limit = data_size_limit
        self._buffer = bytearray()
        self._outstanding: deque[_Command] = deque()
        self._stage = _Stage.REPLY_LINE
        # Set while reading a get's value: its announced length, then its bytes.
        self._value_length = 0
        self._value = b""
        self._end_of_stream = False
        # Why the stream can no longer be trusted; None while it can.
        self._dead_reason: str | None = None

    # ----------------------------------------------------------------- state

    @property
    def pending(self) -> int:
        """Commands sent whose reply has not yet been returned by :meth:`next_event`."""
        return len(self._outstanding)

    @property
    def broken(self) -> bool:
        """True once the connection cannot carry further commands.

        That is after any failure, after a :class:`GetHit` with
        ``reusable=False``, after end of stream, and after bytes that no
        outstanding command accounts for. The I/O layer should then close
        the connection (after collecting the events still pending) and
        open a new one for the next command (MC-11).
        """
        return self._end_of_stream or self._dead_reason is not None

    # -------------------------------------------------------------- commands

    def send_get(self, key: bytes) -> bytes:
        """Start a ``get`` (MC-7).

        Args:
          key: the prepared memcache key (MC-13).

        Returns:
          The bytes to write: ``get KEY\\r\\n``.

        Raises:
          ValueError: the key is empty or contains whitespace/control bytes.
          MemcacheProtocolError: the connection is :attr:`broken`.
        """
        _check_token(key, "key")
        self._check_usable()
        self._outstanding.append(_Command.GET)
        return b"get " + key + b"\r\n"

    def send_set(
        self, key: bytes, value: bytes, *, flags: int, ttl: int, noreply: bool = False
    ) -> bytes:
        """Start a ``set`` (MC-7).

        The value is sent as it is, whatever bytes it holds: its length is
        announced, so it needs no escaping. Checking it against
        ``data_size_limit`` before sending (MC-17) is the caller's business.

        Args:
          key: the prepared memcache key (MC-13).
          value: the value bytes.
          flags: the ``flags`` parameter, sent as a plain decimal (may be negative, MC-4).
          ttl: the ``ttl`` parameter, sent as a plain decimal (may be negative, MC-4).
          noreply: ask the server not to answer (bulk loads only; follow the
            batch with :meth:`send_version` to learn whether it went through).

        Returns:
          The bytes to write: ``set KEY FLAGS TTL LEN\\r\\n`` + value + ``\\r\\n``.

        Raises:
          ValueError: the key is empty or contains whitespace/control bytes.
          TypeError: ``flags`` or ``ttl`` is not an integer.
          MemcacheProtocolError: the connection is :attr:`broken`.
        """
        _check_token(key, "key")
        # operator.index() refuses floats, which %d would silently truncate.
        header = b"set %s %d %d %d%s\r\n" % (
            key,
            operator.index(flags),
            operator.index(ttl),
            len(value),
            b" noreply" if noreply else b"",
        )
        self._check_usable()
        if not noreply:
            self._outstanding.append(_Command.SET)
        return header + value + b"\r\n"

    def send_version(self) -> bytes:
        """Start a ``version`` command: the barrier after ``noreply`` sets.

        Returns:
          The bytes to write: ``version\\r\\n``.

        Raises:
          MemcacheProtocolError: the connection is :attr:`broken`.
        """
        self._check_usable()
        self._outstanding.append(_Command.VERSION)
        return b"version\r\n"

    def send_delete(self, key: bytes) -> bytes:
        """Start a ``delete`` (MC-7).

        Args:
          key: the prepared memcache key (MC-13).

        Returns:
          The bytes to write: ``delete KEY\\r\\n``.

        Raises:
          ValueError: the key is empty or contains whitespace/control bytes.
          MemcacheProtocolError: the connection is :attr:`broken`.
        """
        _check_token(key, "key")
        self._check_usable()
        self._outstanding.append(_Command.DELETE)
        return b"delete " + key + b"\r\n"

    def _check_usable(self) -> None:
        if self._end_of_stream:
            raise MemcacheProtocolError("memcache connection closed by the server")
        if self._dead_reason is not None:
            raise MemcacheProtocolError(f"memcache connection unusable: {self._dead_reason}")

    # ---------------------------------------------------------------- replies

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes received from the server.

        Args:
          data: the bytes (as trio's ``receive_some`` returns them), or
            ``b""`` for end of stream. A read timeout is also reported as
            ``b""``: Postfix treats both alike (MC-8), and a value already
            read completely still comes out, as a :class:`GetHit` with
            ``reusable=False`` (MC-9 step 4).

        Raises:
          MemcacheProtocolError: non-empty data after end of stream.
        """
        if self._end_of_stream:
            if data:
                raise MemcacheProtocolError("data received after end of stream")
            return
        if not data:
            self._end_of_stream = True
        elif self._dead_reason is not None:
            # Nothing more is read from a finished connection; dropping the
            # bytes keeps memory bounded while the I/O layer closes it.
            pass
        elif not self._outstanding:
            self._die("unsolicited data from server")
        else:
            self._buffer += data

    def next_event(self) -> MemcacheEvent | NeedData:
        """Return the reply to the oldest outstanding command, if it is complete.

        Returns:
          The event for the oldest outstanding command, or
          :data:`NEED_DATA` when more bytes are needed or no command is
          outstanding (check :attr:`pending`).
        """
        if not self._outstanding:
            return NEED_DATA
        if self._dead_reason is not None:
            event: MemcacheEvent | NeedData = CommandFailed(CONNECTION_CLOSED_AFTER_ERROR)
        else:
            try:
                event = self._advance(self._outstanding[0])
            except _ReplyError as error:
                event = CommandFailed(error.reason, error.detail)
                self._die(error.reason)
        if event is NEED_DATA:
            return NEED_DATA
        self._outstanding.popleft()
        self._stage = _Stage.REPLY_LINE
        self._value = b""
        if not self._outstanding and self._buffer:
            # Memcache sends nothing unasked, so these bytes mean the stream
            # is not where we think it is; better a new connection than
            # reading them as the answer to the next command.
            self._die(f"unexpected data after reply ({len(self._buffer)} bytes)")
        return event

    def _die(self, reason: str) -> None:
        if self._dead_reason is None:
            self._dead_reason = reason
        self._buffer.clear()

    def _advance(self, command: _Command) -> MemcacheEvent | NeedData:
        """Parse as far as the buffer allows into the reply to ``command``.

        Raises:
          _ReplyError: the reply is a failure (MC-8 .. MC-10).
        """
        if command is _Command.GET:
            return self._advance_get()
        line = self._read_line()
        if line is NEED_DATA:
            return NEED_DATA
        text = _c_string(line)
        if command is _Command.SET:
            if text == b"STORED":
                return Stored()
        elif command is _Command.VERSION:
            if text.startswith(b"VERSION "):
                return Version(text[len(b"VERSION ") :])
        elif text == b"DELETED":
            return Deleted()
        elif text == b"NOT_FOUND":
            return DeleteNotFound()
        raise _unexpected_line(line)

    def _advance_get(self) -> MemcacheEvent | NeedData:
        """Parse a ``get`` reply (MC-9), resuming at the current stage."""
        if self._stage is _Stage.REPLY_LINE:
            line = self._read_line()
            if line is NEED_DATA:
                return NEED_DATA
            text = _c_string(line)
            if text == b"END":
                return GetMiss()
            length = _scan_value_length(text)
            if length is None:
                raise _unexpected_line(line)
            if not 0 <= length <= self._data_size_limit:
                raise _ReplyError(
                    f"value length {length} outside 0..{self._data_size_limit}",
                    escape_for_log(line),
                )
            self._value_length = length
            self._stage = _Stage.VALUE_DATA
        if self._stage is _Stage.VALUE_DATA:
            value = self._read_value()
            if value is NEED_DATA:
                return NEED_DATA
            self._value = value.partition(b"\0")[0]
            self._stage = _Stage.TRAILER_LINE
        return self._read_trailer()

    def _read_value(self) -> bytes | NeedData:
        """Take the value bytes and the exact CRLF after them (MC-9 step 3).

        Like memcache_fread(), a wrong byte where CR or LF belongs fails at
        once, even before the rest arrives.

        Raises:
          _ReplyError: wrong terminator, or end of stream before it.
        """
        length = self._value_length
        buffer = self._buffer
        if len(buffer) > length and buffer[length] != _CR:
            raise _ReplyError("value not followed by CRLF")
        if len(buffer) > length + 1 and buffer[length + 1] != _LF:
            raise _ReplyError("value not followed by CRLF")
        if len(buffer) < length + 2:
            if self._end_of_stream:
                raise _ReplyError("connection closed while reading value")
            return NEED_DATA
        value = bytes(buffer[:length])
        del buffer[: length + 2]
        return value

    def _read_trailer(self) -> MemcacheEvent | NeedData:
        """Read the line after a value; all but ``END`` retires the connection (MC-9 step 4)."""
        try:
            line = self._read_line()
        except _ReplyError as error:
            self._die(f"after value: {error}")
            return GetHit(self._value, reusable=False)
        if line is NEED_DATA:
            return NEED_DATA
        if _c_string(line) == b"END":
            return GetHit(self._value, reusable=True)
        self._die("after value, expected END: " + _unexpected_line(line).reason)
        return GetHit(self._value, reusable=False)

    def _read_line(self) -> bytes | NeedData:
        """Take one reply line, without its LF and one CR before it (MC-8).

        Postfix reads at most ``line_size_limit`` bytes looking for LF. If
        the last of those is CR it reads one more byte and accepts it if
        it is LF, so CRLF and bare-LF lines obey the same limit.

        Raises:
          _ReplyError: the line is too long, or the stream ends before its LF.
        """
        limit = self._line_size_limit
        buffer = self._buffer
        newline = buffer.find(b"\n", 0, limit)
        if newline >= 0:
            line = bytes(buffer[:newline])
            del buffer[: newline + 1]
            return line.removesuffix(b"\r")
        if len(buffer) < limit:
            if self._end_of_stream:
                raise _ReplyError(
                    "connection closed in mid-line" if buffer else "connection closed"
                )
            return NEED_DATA
        if buffer[limit - 1] == _CR:
            if len(buffer) == limit:
                if self._end_of_stream:
                    raise _ReplyError("connection closed in mid-line")
                return NEED_DATA
            if buffer[limit] == _LF:
                line = bytes(buffer[: limit - 1])
                del buffer[: limit + 1]
                return line
        raise _ReplyError(f"reply line longer than line_size_limit={limit}")
