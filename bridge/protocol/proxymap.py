"""Postfix's proxymap protocol, both ends, sans-I/O (PXC-2 .. PXC-8).

Theory of operation
-------------------
Postfix programs reach tables through ``proxymap(8)`` over a unix socket,
with Postfix's "attr0" encoding (PXC-2): a message is a list of
attributes, each written as its name, a NUL, its value and a NUL, and the
list ends with one more NUL (an empty name). Numbers are decimal ASCII.
Nothing is length-prefixed, so neither names nor values can hold a NUL.

A connection carries, in this order:

* from proxymap 3.6 on, an announcement the server sends as soon as it
  accepts, ``protocol = proxymap_protocol`` (PXC-3); older servers send
  nothing, so a client does not wait for it: it sends its first request
  at once and drops the announcement when it is the first list read
  (:func:`is_announcement`);
* then strictly one request and one reply at a time. Each request names
  its table and flags again: there is no per-connection state.

The requests come in two incompatible generations (PXC-4, PXC-5), chosen
by :class:`Generation`: Postfix 2.9 to 3.10 send ``flags`` only; 3.11 and
later add ``instance_flags`` after ``table`` (in ``open`` instead of
``flags``), and every 3.11 reply has ``flags`` right after ``status``.
A server answers the other generation's request with status BAD.

What this module offers, for the client (the bridge) and for test
servers alike:

* :class:`AttrDecoder` turns received bytes into :class:`AttrList`
  values; it bounds every name or value (``max_string``) and the number
  of attributes in one list (``max_attributes``), since nothing in the
  encoding does (PXC-2 bridge note);
* :func:`encode_request` / :func:`parse_request` and
  :func:`encode_reply` / :func:`parse_reply` turn the request and reply
  values (:class:`ProxyOpen` ... :class:`ProxySequence`,
  :class:`ProxyReply`) into attribute lists of either generation and back;
* :data:`ANNOUNCEMENT` is the server's greeting.

Error handling
--------------
Everything a peer can send is either decoded or refused with
:class:`ProxymapError`, whose ``kind`` says what went wrong: ``"size"``
(a limit was hit), ``"format"`` (the attributes are not what the request
calls for, or a number is malformed) or ``"eof"`` (the peer closed before
a list was complete: the only kind where a reconnect may help). No other
exception escapes the decoder or the parsers, whatever the input.

A reply with status BAD is accepted whatever else it carries: a server of
the other generation answers BAD in its own reply form (PXC-5), and its
minimal "unknown request" answer carries the status alone.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from bridge.protocol._receive import ReceiveBuffer
from bridge.protocol.events import NEED_DATA, NeedData

__all__ = [
    "ANNOUNCEMENT",
    "FLAG_DUP_REPLACE",
    "FLAG_FIXED",
    "FLAG_FOLD_FIX",
    "FLAG_IMPL_MASK",
    "FLAG_LOCK",
    "FLAG_MULTI_WRITER",
    "FLAG_OPEN_LOCK",
    "FLAG_PATTERN",
    "FLAG_SYNC_UPDATE",
    "FLAG_UTF8_REQUEST",
    "MAX_ATTRIBUTES",
    "MAX_STRING",
    "MAX_UINT",
    "NEED_DATA",
    "AttrDecoder",
    "AttrList",
    "Generation",
    "ProxyDelete",
    "ProxyLookup",
    "ProxyOpen",
    "ProxyReply",
    "ProxyRequest",
    "ProxySequence",
    "ProxyUpdate",
    "ProxymapError",
    "RequestFrame",
    "RequestKind",
    "SequenceFunction",
    "Status",
    "decode_attributes",
    "encode_attributes",
    "encode_reply",
    "encode_request",
    "is_announcement",
    "parse_reply",
    "parse_request",
    "reply_names",
    "request_kind",
]


class Generation(enum.Enum):
    """The two incompatible request forms (PXC-4, PXC-5); values as configured."""

    #: Postfix 2.9 to 3.10: ``flags`` only.
    V2_9 = "2.9"
    #: Postfix 3.11 and later: ``instance_flags`` too, and ``flags`` in every reply.
    V3_11 = "3.11"


class Status(enum.IntEnum):
    """proxymap's reply status (PXC-6)."""

    OK = 0
    NOKEY = 1
    RETRY = 2
    BAD = 3
    DENY = 4
    CONFIG = 5


class RequestKind(enum.Enum):
    """The ``request`` attribute of each request."""

    OPEN = b"open"
    LOOKUP = b"lookup"
    UPDATE = b"update"
    DELETE = b"delete"
    SEQUENCE = b"sequence"


class SequenceFunction(enum.IntEnum):
    """The ``function`` of a sequence request: start over, or continue."""

    FIRST = 0
    NEXT = 1


# Table flags (PXC-8), as Postfix's dict layer numbers them.
FLAG_FIXED: Final = 1 << 4
FLAG_PATTERN: Final = 1 << 5
FLAG_LOCK: Final = 1 << 6
FLAG_DUP_REPLACE: Final = 1 << 7
FLAG_SYNC_UPDATE: Final = 1 << 8
FLAG_FOLD_FIX: Final = 1 << 14
FLAG_OPEN_LOCK: Final = 1 << 16
FLAG_MULTI_WRITER: Final = 1 << 18
FLAG_UTF8_REQUEST: Final = 1 << 19
#: The bits of an open reply that describe the table itself; the rest of
#: a 3.7 server's open reply may be another client's request bits (PXC-8).
FLAG_IMPL_MASK: Final = FLAG_FIXED | FLAG_PATTERN | FLAG_MULTI_WRITER

#: Numbers are C ``unsigned int`` on the wire.
MAX_UINT: Final = 2**32 - 1
#: Digits of the largest number, the longest number text accepted.
_MAX_DIGITS: Final = len(str(MAX_UINT))

#: Default bound on one name or value, in bytes: the largest value the
#: bridge could pass on (a socketmap reply holds 100000 bytes, SM-7).
MAX_STRING: Final = 100_000
#: Default bound on the attributes of one list: the largest request has
#: six (a 3.11 update), the largest reply four.
MAX_ATTRIBUTES: Final = 8

_NUL: Final = 0


class ProxymapError(Exception):
    """Bytes from a proxymap peer cannot be used; the message says why.

    Attributes:
      kind: ``"size"`` (a name, value or list over its bound),
        ``"format"`` (missing, extra or misplaced attributes, a bad number,
        an unknown request) or ``"eof"`` (the peer closed before a list
        was complete).
    """

    def __init__(self, kind: Literal["format", "size", "eof"], message: str) -> None:
        super().__init__(message)
        self.kind: Literal["format", "size", "eof"] = kind


# ------------------------------------------------------------ attributes


@dataclass(frozen=True, slots=True)
class AttrList:
    """One attribute list, in wire order; names are never empty."""

    items: tuple[tuple[bytes, bytes], ...]

    @property
    def names(self) -> tuple[bytes, ...]:
        """The attribute names, in order."""
        return tuple(name for name, _ in self.items)

    def value(self, name: bytes) -> bytes | None:
        """The value of the first attribute called ``name``, or None."""
        for item_name, item_value in self.items:
            if item_name == name:
                return item_value
        return None


def encode_attributes(items: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Write an attribute list in attr0 form (PXC-2).

    Raises:
      ValueError: a name is empty, or a name or value holds a NUL byte
        (neither can be represented).
    """
    parts: list[bytes] = []
    for name, value in items:
        if not name:
            raise ValueError("an attribute name cannot be empty")
        if b"\0" in name or b"\0" in value:
            raise ValueError(f"attribute {name!r}: NUL bytes cannot be sent")
        parts += (name, b"\0", value, b"\0")
    parts.append(b"\0")
    return b"".join(parts)


#: The server's greeting, sent on accept from Postfix 3.6 on (PXC-3).
ANNOUNCEMENT: Final = encode_attributes([(b"protocol", b"proxymap_protocol")])


def is_announcement(attributes: AttrList) -> bool:
    """Whether ``attributes`` is proxymap's greeting (PXC-3)."""
    return attributes.items == ((b"protocol", b"proxymap_protocol"),)


class AttrDecoder(ReceiveBuffer):
    """Turn a byte stream into attribute lists (PXC-2).

    Feed bytes with :meth:`receive_data`, then call :meth:`next_list`
    until it returns :data:`NEED_DATA`. Finished names and values move
    out of the buffer as they complete, so once :meth:`next_list` has
    returned :data:`NEED_DATA`, ``buffered_byte_count`` is at most
    ``max_string`` (the unfinished string), and the list being built holds
    at most ``max_attributes`` pairs. Errors are sticky, as in
    :class:`~bridge.protocol.netstring.NetstringDecoder`: a broken stream
    has no next list.

    Args:
      max_string: longest name or value accepted, in bytes.
      max_attributes: most attributes in one list.

    Raises:
      ValueError: a bound below 1.
    """

    def __init__(self, max_string: int = MAX_STRING, max_attributes: int = MAX_ATTRIBUTES) -> None:
        if max_string < 1 or max_attributes < 1:
            raise ValueError("max_string and max_attributes must be at least 1")
        super().__init__()
        self._max_string = max_string
        self._max_attributes = max_attributes
        self._items: list[tuple[bytes, bytes]] = []
        # A name read, its value not yet complete.
        self._name: bytes | None = None
        # Bytes at the start of the buffer already searched for a NUL.
        self._searched = 0
        self._error: ProxymapError | None = None

    @property
    def in_list(self) -> bool:
        """Whether part of a list has arrived but not all of it."""
        return bool(self._items) or self._name is not None or bool(self._buffer)

    def _discarding(self) -> bool:
        return self._error is not None

    def next_list(self) -> AttrList | NeedData:
        """Return the next complete list, if there is one.

        Returns:
          The list, or :data:`NEED_DATA` when more bytes are needed.

        Raises:
          ProxymapError: a string or list over its bound (``"size"``), or
            EOF before a list was complete (``"eof"``).
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next_list()
        except ProxymapError as exc:
            self._error = exc
            if exc.kind != "eof":
                self._buffer.clear()
            raise

    def _next_list(self) -> AttrList | NeedData:
        while True:
            string = self._next_string()
            if string is None:
                if self._eof:
                    raise self._eof_error()
                return NEED_DATA
            if self._name is not None:
                self._items.append((self._name, string))
                self._name = None
            elif string:
                if len(self._items) >= self._max_attributes:
                    raise ProxymapError(
                        "size", f"more than {self._max_attributes} attributes in one list"
                    )
                self._name = string
            else:
                attributes = AttrList(tuple(self._items))
                self._items = []
                return attributes

    def _next_string(self) -> bytes | None:
        """Take one NUL-terminated string off the buffer, or None if it is incomplete."""
        end = self._buffer.find(b"\0", self._searched, self._max_string + 1)
        if end < 0:
            self._searched = min(len(self._buffer), self._max_string + 1)
            if self._searched > self._max_string:
                what = "value" if self._name is not None else "name"
                raise ProxymapError(
                    "size", f"attribute {what} longer than {self._max_string} bytes"
                )
            return None
        string = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        self._searched = 0
        return string

    def _eof_error(self) -> ProxymapError:
        if not self.in_list:
            return ProxymapError("eof", "connection closed")
        return ProxymapError("eof", "connection closed inside an attribute list")


def decode_attributes(
    data: bytes, *, max_string: int = MAX_STRING, max_attributes: int = MAX_ATTRIBUTES
) -> AttrList:
    """Decode ``data``, which must be exactly one attribute list.

    Raises:
      ProxymapError: as :meth:`AttrDecoder.next_list`; ``"format"`` when
        bytes follow the list, ``"eof"`` when the list is incomplete.
    """
    decoder = AttrDecoder(max_string, max_attributes)
    decoder.receive_data(data)
    decoder.receive_data(b"")
    attributes = decoder.next_list()
    assert attributes is not NEED_DATA  # EOF was given: complete or an error
    if decoder.buffered_byte_count:
        raise ProxymapError("format", f"{decoder.buffered_byte_count} bytes after the list")
    return attributes


def _number(name: bytes, value: bytes) -> int:
    """A decimal number as Postfix writes one: ASCII digits, at most 2**32 - 1."""
    if not value or len(value) > _MAX_DIGITS or not value.isdigit():
        raise ProxymapError("format", f"attribute {name.decode('ascii', 'replace')}: {value!r}")
    number = int(value)
    if number > MAX_UINT:
        raise ProxymapError("format", f"attribute {name.decode('ascii', 'replace')}: {value!r}")
    return number


def _text(number: int) -> bytes:
    if not 0 <= number <= MAX_UINT:
        raise ValueError(f"{number} is not an unsigned 32-bit number")
    return b"%d" % number


# -------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class ProxyOpen:
    """Open ``table`` (``TYPE:NAME``, without ``proxy:``); the flags go with the frame."""

    table: bytes


@dataclass(frozen=True, slots=True)
class ProxyLookup:
    """Look ``key`` up in ``table`` with the request ``flags``."""

    table: bytes
    flags: int
    key: bytes


@dataclass(frozen=True, slots=True)
class ProxyUpdate:
    """Store ``value`` under ``key`` (proxywrite only)."""

    table: bytes
    flags: int
    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class ProxyDelete:
    """Remove ``key`` (proxywrite only)."""

    table: bytes
    flags: int
    key: bytes


@dataclass(frozen=True, slots=True)
class ProxySequence:
    """The first entry of ``table`` (``function`` 0) or the next one (1)."""

    table: bytes
    flags: int
    function: int


ProxyRequest: TypeAlias = ProxyOpen | ProxyLookup | ProxyUpdate | ProxyDelete | ProxySequence

_KIND_OF: Final[Mapping[type[ProxyRequest], RequestKind]] = {
    ProxyOpen: RequestKind.OPEN,
    ProxyLookup: RequestKind.LOOKUP,
    ProxyUpdate: RequestKind.UPDATE,
    ProxyDelete: RequestKind.DELETE,
    ProxySequence: RequestKind.SEQUENCE,
}


def request_kind(request: ProxyRequest) -> RequestKind:
    """The ``request`` attribute ``request`` goes out with."""
    return _KIND_OF[type(request)]


@dataclass(frozen=True, slots=True)
class RequestFrame:
    """A request as a server reads it: which generation sent it, with which instance flags.

    ``instance_flags`` is what the request carries for opening the table:
    the ``flags`` of a 2.9 open, the ``instance_flags`` of any 3.11
    request, and None for the other 2.9 requests, which carry none.
    """

    request: ProxyRequest
    generation: Generation
    instance_flags: int | None


def _request_tail(request: ProxyRequest) -> list[tuple[bytes, bytes]]:
    """The attributes after ``flags``."""
    if isinstance(request, ProxyLookup | ProxyDelete):
        return [(b"key", request.key)]
    if isinstance(request, ProxyUpdate):
        return [(b"key", request.key), (b"value", request.value)]
    if isinstance(request, ProxySequence):
        return [(b"function", _text(request.function))]
    return []


def encode_request(request: ProxyRequest, generation: Generation, *, instance_flags: int) -> bytes:
    """The bytes of ``request`` in ``generation``'s form (PXC-4, PXC-5).

    Args:
      request: what to ask.
      generation: the request form the server speaks.
      instance_flags: how the server is to open the table: sent as the
        ``flags`` of a 2.9 open, as ``instance_flags`` in every 3.11
        request, and not at all in the other 2.9 requests.

    Raises:
      ValueError: a table, key or value holds NUL, or a number does not
        fit an unsigned 32-bit integer.
    """
    items = [(b"request", request_kind(request).value), (b"table", request.table)]
    if isinstance(request, ProxyOpen):
        name = b"flags" if generation is Generation.V2_9 else b"instance_flags"
        items.append((name, _text(instance_flags)))
    else:
        if generation is Generation.V3_11:
            items.append((b"instance_flags", _text(instance_flags)))
        items.append((b"flags", _text(request.flags)))
        items += _request_tail(request)
    return encode_attributes(items)


#: The attributes of each request after ``request``, by generation.
_REQUEST_NAMES: Final[Mapping[tuple[RequestKind, Generation], tuple[bytes, ...]]] = {
    (RequestKind.OPEN, Generation.V2_9): (b"table", b"flags"),
    (RequestKind.OPEN, Generation.V3_11): (b"table", b"instance_flags"),
    (RequestKind.LOOKUP, Generation.V2_9): (b"table", b"flags", b"key"),
    (RequestKind.LOOKUP, Generation.V3_11): (b"table", b"instance_flags", b"flags", b"key"),
    (RequestKind.UPDATE, Generation.V2_9): (b"table", b"flags", b"key", b"value"),
    (RequestKind.UPDATE, Generation.V3_11): (
        b"table",
        b"instance_flags",
        b"flags",
        b"key",
        b"value",
    ),
    (RequestKind.DELETE, Generation.V2_9): (b"table", b"flags", b"key"),
    (RequestKind.DELETE, Generation.V3_11): (b"table", b"instance_flags", b"flags", b"key"),
    (RequestKind.SEQUENCE, Generation.V2_9): (b"table", b"flags", b"function"),
    (RequestKind.SEQUENCE, Generation.V3_11): (
        b"table",
        b"instance_flags",
        b"flags",
        b"function",
    ),
}


def parse_request(attributes: AttrList) -> RequestFrame:
    """Read a request as a proxymap server of either generation would (PXC-4, PXC-5).

    Raises:
      ProxymapError: ``"format"``: no ``request`` first, an unknown
        request, attributes that fit neither generation, a bad number.
    """
    if not attributes.items or attributes.items[0][0] != b"request":
        raise ProxymapError("format", "a request starts with the request attribute")
    try:
        kind = RequestKind(attributes.items[0][1])
    except ValueError:
        raise ProxymapError("format", f"unknown request {attributes.items[0][1]!r}") from None
    names = attributes.names[1:]
    for generation in Generation:
        if names == _REQUEST_NAMES[kind, generation]:
            break
    else:
        raise ProxymapError("format", f"{kind.value.decode()} request with attributes {names!r}")
    values = dict(attributes.items[1:])
    table = values[b"table"]
    if kind is RequestKind.OPEN:
        flags_name = b"flags" if generation is Generation.V2_9 else b"instance_flags"
        instance = _number(flags_name, values[flags_name])
        return RequestFrame(ProxyOpen(table), generation, instance)
    flags = _number(b"flags", values[b"flags"])
    instance_flags = (
        _number(b"instance_flags", values[b"instance_flags"])
        if generation is Generation.V3_11
        else None
    )
    request: ProxyRequest
    if kind is RequestKind.LOOKUP:
        request = ProxyLookup(table, flags, values[b"key"])
    elif kind is RequestKind.UPDATE:
        request = ProxyUpdate(table, flags, values[b"key"], values[b"value"])
    elif kind is RequestKind.DELETE:
        request = ProxyDelete(table, flags, values[b"key"])
    else:
        request = ProxySequence(table, flags, _number(b"function", values[b"function"]))
    return RequestFrame(request, generation, instance_flags)


# --------------------------------------------------------------- replies


@dataclass(frozen=True, slots=True)
class ProxyReply:
    """proxymap's answer to one request.

    ``status`` is kept as a number: a value outside :class:`Status` is
    the client's to judge (PXC-6). The other fields are None where the
    reply form has no such attribute (:func:`reply_names`); a BAD reply
    may lack any of them.
    """

    status: int
    flags: int | None = None
    key: bytes | None = None
    value: bytes | None = None


def reply_names(kind: RequestKind, generation: Generation) -> tuple[bytes, ...]:
    """The attributes of the reply to a ``kind`` request, in order (PXC-4, PXC-5)."""
    rest: tuple[bytes, ...] = {
        RequestKind.OPEN: (),
        RequestKind.LOOKUP: (b"value",),
        RequestKind.UPDATE: (),
        RequestKind.DELETE: (),
        RequestKind.SEQUENCE: (b"key", b"value"),
    }[kind]
    if kind is RequestKind.OPEN or generation is Generation.V3_11:
        return (b"status", b"flags", *rest)
    return (b"status", *rest)


def encode_reply(reply: ProxyReply, kind: RequestKind, generation: Generation) -> bytes:
    """The bytes a server sends for ``reply`` (fields it lacks go out as 0 or empty).

    Raises:
      ValueError: a key or value holds NUL, or a number is out of range.
    """
    fields: dict[bytes, bytes] = {
        b"status": _text(reply.status),
        b"flags": _text(reply.flags or 0),
        b"key": reply.key or b"",
        b"value": reply.value or b"",
    }
    return encode_attributes((name, fields[name]) for name in reply_names(kind, generation))


def parse_reply(attributes: AttrList, kind: RequestKind, generation: Generation) -> ProxyReply:
    """Read the reply to a ``kind`` request sent in ``generation``'s form.

    A BAD reply is taken whatever follows its status (see the module
    docstring); every other reply must have exactly the attributes of
    :func:`reply_names`.

    Raises:
      ProxymapError: ``"format"``: other attributes, or a bad number.
    """
    items = attributes.items
    if items and items[0][0] == b"status" and _number(b"status", items[0][1]) == Status.BAD:
        return ProxyReply(Status.BAD)
    expected = reply_names(kind, generation)
    if attributes.names != expected:
        raise ProxymapError(
            "format",
            f"reply to {kind.value.decode()} has attributes {attributes.names!r}, "
            f"expected {expected!r}",
        )
    values = dict(items)
    flags = values.get(b"flags")
    return ProxyReply(
        _number(b"status", values[b"status"]),
        None if flags is None else _number(b"flags", flags),
        values.get(b"key"),
        values.get(b"value"),
    )
