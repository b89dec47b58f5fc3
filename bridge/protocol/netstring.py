"""Netstring framing for the socketmap protocol (spec SM-4 .. SM-6), sans-I/O.

A netstring is ``LENGTH ":" PAYLOAD ","`` where LENGTH is ASCII decimal.
Both directions of a socketmap connection are a plain sequence of them, so
the same :class:`NetstringDecoder` serves the bridge's server side (reading
requests) and its chained-lookup client side (reading replies); only the
``max_length`` differs.

The decoder is fed raw bytes with :meth:`NetstringDecoder.receive_data` and
hands out whole payloads from :meth:`NetstringDecoder.next_payload`. It
never touches a socket. It reads exactly as Postfix's netstring.c does
(SM-6):

* every byte before ``:`` must be an ASCII digit; leading zeros are fine
  and no digits at all (``:,``) is an empty netstring;
* a length above ``max_length`` is a size error, raised as soon as the
  ``:`` arrives, before any payload byte is buffered;
* the byte after the payload must be ``,``.

Postfix's only bound on the length prefix is integer overflow; ours is
:data:`MAX_LENGTH_DIGITS`, so a peer streaming digits forever fails fast
with a size error instead of being buffered. Together these keep the
buffer, once :meth:`~NetstringDecoder.next_payload` has returned
:data:`NEED_DATA`, at most ``max_length + 1`` bytes (or
:data:`MAX_LENGTH_DIGITS` bytes while a prefix is being read).

End of stream is reported as a :class:`NetstringError` of kind ``"eof"``
(SM-6 step 1 and 3: "EOF error"), whether it falls between frames or inside
a length or payload; :attr:`NetstringDecoder.in_frame` tells the two apart.
The one exception is an EOF where the ``,`` should be: SM-6 step 4 calls
that a *format* error. The distinction matters to a client: only an EOF
error earns Postfix's one transparent retry (SM-15).

:data:`NEED_DATA` and :class:`ConnectionClosed` are shared with the
tcp_table codec, which has the same receive/next-event shape.
"""

from __future__ import annotations

from typing import Final, Literal

from bridge.protocol._receive import ReceiveBuffer
from bridge.protocol.events import NEED_DATA, ConnectionClosed, NeedData

__all__ = [
    "MAX_LENGTH_DIGITS",
    "NEED_DATA",
    "ConnectionClosed",
    "NeedData",
    "NetstringDecoder",
    "NetstringError",
    "encode_netstring",
]

#: Longest length prefix accepted, in digits. 20 digits already hold any
#: 64-bit size (Postfix's own overflow point); the rest is slack for the
#: leading zeros SM-6 allows. Nobody honest sends more, and a bound here is
#: what stops a stream of digits from being buffered without end.
MAX_LENGTH_DIGITS: Final = 32

_COMMA: Final = ord(",")


class NetstringError(Exception):
    """A netstring cannot be read (SM-6); the message says what was wrong.

    Attributes:
      kind: ``"format"`` (bad prefix byte, missing ``,``), ``"size"``
        (length above the limit, or a prefix longer than
        :data:`MAX_LENGTH_DIGITS`) or ``"eof"`` (stream ended before a
        complete netstring).
    """

    def __init__(self, kind: Literal["format", "size", "eof"], message: str) -> None:
        super().__init__(message)
        self.kind: Literal["format", "size", "eof"] = kind


def encode_netstring(payload: bytes) -> bytes:
    """Frame ``payload`` as a netstring, the way Postfix writes one (SM-5).

    Args:
      payload: any bytes.

    Returns:
      ``b"<len>:<payload>,"`` with the length in plain decimal, no sign and
      no leading zeros.
    """
    return b"%d:%b," % (len(payload), payload)


class NetstringDecoder(ReceiveBuffer):
    """Turn a byte stream into netstring payloads (SM-6).

    Feed bytes with :meth:`receive_data`, then call :meth:`next_payload`
    until it returns :data:`NEED_DATA`. Errors are sticky: once
    :meth:`next_payload` has raised, it raises the same error on every
    later call, and bytes received afterwards are discarded, because a
    broken frame leaves no way to find the start of the next one.
    """

    def __init__(self, max_length: int) -> None:
        """Create a decoder.

        Args:
          max_length: the largest payload accepted; longer ones are a size
            error (SM-6 step 2, SM-7).

        Raises:
          ValueError: if ``max_length`` is negative.
        """
        if max_length < 0:
            raise ValueError(f"max_length must not be negative, got {max_length}")
        super().__init__()
        self._max_length = max_length
        # Payload length of the frame being read, once its ':' has been
        # seen; None while the length prefix is still being read.
        self._length: int | None = None
        self._error: NetstringError | None = None

    @property
    def max_length(self) -> int:
        """The largest payload this decoder accepts."""
        return self._max_length

    @property
    def in_frame(self) -> bool:
        """True when part of a netstring has arrived but not all of it."""
        return self._length is not None or bool(self._buffer)

    def _discarding(self) -> bool:
        return self._error is not None

    def next_payload(self) -> bytes | NeedData:
        """Return the next complete payload, if there is one.

        Returns:
          The payload bytes, or :data:`NEED_DATA` if more bytes are needed.

        Raises:
          NetstringError: for a malformed or oversized netstring, or when
            EOF has been received and no complete netstring is left (kind
            ``"eof"``; but ``"format"`` when only the ``,`` is missing).
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next_payload()
        except NetstringError as exc:
            self._error = exc
            # After an EOF nothing more can arrive, so the leftover bytes
            # stay for in_frame/buffered_byte_count; otherwise let them go.
            if exc.kind != "eof":
                self._buffer.clear()
            raise

    def _next_payload(self) -> bytes | NeedData:
        if self._length is None:
            length = self._read_length()
            if length is None:
                return NEED_DATA
            self._length = length
        # Payload plus the ',' must be buffered before anything is returned.
        frame_end = self._length + 1
        if len(self._buffer) < frame_end:
            if self._eof:
                raise self._eof_error()
            return NEED_DATA
        if self._buffer[self._length] != _COMMA:
            raise NetstringError(
                "format",
                f"netstring of length {self._length} ends in "
                f"{bytes(self._buffer[self._length : frame_end])!r}, expected b','",
            )
        payload = bytes(self._buffer[: self._length])
        del self._buffer[:frame_end]
        self._length = None
        return payload

    def _read_length(self) -> int | None:
        """Consume a complete ``DIGITS:`` prefix, or return None if incomplete."""
        # Only the first MAX_LENGTH_DIGITS + 1 bytes can hold the ':', so a
        # long buffer is never scanned again and again while bytes trickle in.
        window = bytes(self._buffer[: MAX_LENGTH_DIGITS + 1])
        colon = window.find(b":")
        digits = window if colon < 0 else window[:colon]
        _check_digits(digits)
        if colon < 0:
            if len(window) > MAX_LENGTH_DIGITS:
                raise NetstringError(
                    "size", f"netstring length prefix longer than {MAX_LENGTH_DIGITS} digits"
                )
            if self._eof:
                raise self._eof_error()
            return None
        length = int(digits) if digits else 0
        if length > self._max_length:
            raise NetstringError(
                "size", f"netstring length {length} exceeds the limit of {self._max_length}"
            )
        del self._buffer[: colon + 1]
        return length

    def _eof_error(self) -> NetstringError:
        if self._length is None:
            if not self._buffer:
                return NetstringError("eof", "connection closed")
            return NetstringError("eof", "connection closed inside a netstring length")
        if len(self._buffer) < self._length:
            return NetstringError(
                "eof",
                f"connection closed after {len(self._buffer)} of {self._length} payload bytes",
            )
        # SM-6 step 4: whatever stands where the ',' should be, EOF included,
        # is a format error.
        return NetstringError("format", "connection closed where the netstring ',' was due")


def _check_digits(prefix: bytes) -> None:
    """Raise the SM-6 format error unless ``prefix`` is all ASCII digits."""
    # bytes.isdigit() is ASCII-only, which is exactly SM-6's '0'-'9'.
    if prefix and not prefix.isdigit():
        bad = next(byte for byte in prefix if not 0x30 <= byte <= 0x39)
        raise NetstringError(
            "format", f"netstring length contains {bytes([bad])!r}; only digits may precede ':'"
        )
