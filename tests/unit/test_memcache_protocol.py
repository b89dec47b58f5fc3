"""Tests for the sans-I/O memcache client protocol (spec MC-7 .. MC-10, vectors 12.5)."""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.config import PARAMETERS
from bridge.protocol.memcache import (
    CONNECTION_CLOSED_AFTER_ERROR,
    NEED_DATA,
    CommandFailed,
    Deleted,
    DeleteNotFound,
    GetHit,
    GetMiss,
    MemcacheClientProtocol,
    MemcacheEvent,
    MemcacheProtocolError,
    Stored,
    Version,
    _scan_value_length,
    escape_for_log,
)

if TYPE_CHECKING:
    from typing import Unpack

# ---------------------------------------------------------------- helpers


class _Limits(TypedDict, total=False):
    """memcache_table(5) size limits for one test connection (MC-1)."""

    line_size_limit: int
    data_size_limit: int


#: memcache_table(5)'s defaults for the two limits, from the parameter schema.
_DEFAULT_LIMITS = {
    p.name: int(p.default or 0) for p in PARAMETERS if p.name in _Limits.__annotations__
}


def client_protocol(**limits: Unpack[_Limits]) -> MemcacheClientProtocol:
    """A client protocol with the given limits, memcache_table(5)'s defaults for the others."""
    return MemcacheClientProtocol(
        line_size_limit=limits.get("line_size_limit", _DEFAULT_LIMITS["line_size_limit"]),
        data_size_limit=limits.get("data_size_limit", _DEFAULT_LIMITS["data_size_limit"]),
    )


def drain(protocol: MemcacheClientProtocol) -> list[MemcacheEvent]:
    """Every event the protocol can produce from what it has received so far."""
    events: list[MemcacheEvent] = []
    while True:
        event = protocol.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)


def feed_in_chunks(
    protocol: MemcacheClientProtocol, data: bytes, cuts: Sequence[int]
) -> list[MemcacheEvent]:
    """Feed ``data`` cut at ``cuts``, draining events after every chunk as an I/O loop would."""
    events: list[MemcacheEvent] = []
    start = 0
    for end in [*sorted(cuts), len(data)]:
        if end > start:
            protocol.receive_data(data[start:end])
            start = end
        events.extend(drain(protocol))
    return events


def send(protocol: MemcacheClientProtocol, command: str, key: bytes = b"a") -> bytes:
    if command == "get":
        return protocol.send_get(key)
    if command == "set":
        return protocol.send_set(key, b"value", flags=0, ttl=3600)
    assert command == "delete"
    return protocol.send_delete(key)


def exchange(
    reply: bytes,
    command: str = "get",
    *,
    eof: bool = False,
    **limits: Unpack[_Limits],
) -> list[MemcacheEvent]:
    """One command on a fresh connection, the whole reply fed at once."""
    protocol = client_protocol(**limits)
    send(protocol, command)
    protocol.receive_data(reply)
    if eof:
        protocol.receive_data(b"")
    return drain(protocol)


def is_failure(events: list[MemcacheEvent]) -> bool:
    return len(events) == 1 and isinstance(events[0], CommandFailed)


# ------------------------------------------------------------ commands (MC-7)


@dataclass(frozen=True, slots=True)
class _CommandVector:
    command: str
    key: bytes
    expected: bytes
    value: bytes = b""
    flags: int = 0
    ttl: int = 0


# Spec 12.5: the client-to-server bytes of the wire-exchange tables.
COMMAND_VECTORS = [
    _CommandVector("get", b"foo@example.com", b"get foo@example.com\r\n"),
    _CommandVector("get", b"Foo@Example.COM", b"get Foo@Example.COM\r\n"),
    _CommandVector("get", b"p:bk1", b"get p:bk1\r\n"),
    _CommandVector(
        "set", b"p:bk1", b"set p:bk1 7 100 11\r\nbackupvalue\r\n", b"backupvalue", 7, 100
    ),
    _CommandVector(
        "set", b"bk1", b"set bk1 0 2592001 11\r\nbackupvalue\r\n", b"backupvalue", 0, 2592001
    ),
    _CommandVector("set", b"bk1", b"set bk1 -3 -5 11\r\nbackupvalue\r\n", b"backupvalue", -3, -5),
    _CommandVector("delete", b"p:key", b"delete p:key\r\n"),
]


@pytest.mark.parametrize("vector", COMMAND_VECTORS, ids=lambda vector: vector.expected.decode())
def test_command_bytes(vector: _CommandVector) -> None:
    protocol = client_protocol()
    if vector.command == "get":
        wire = protocol.send_get(vector.key)
    elif vector.command == "set":
        wire = protocol.send_set(vector.key, vector.value, flags=vector.flags, ttl=vector.ttl)
    else:
        wire = protocol.send_delete(vector.key)
    assert wire == vector.expected
    assert protocol.pending == 1


def test_set_value_is_sent_verbatim_with_its_length() -> None:
    # The value is length-prefixed, so reply-like bytes inside it need no escaping.
    value = b"x\r\nEND\r\n\x00\xff"
    wire = client_protocol().send_set(b"k", value, flags=1, ttl=0)
    assert wire == b"set k 1 0 %d\r\n" % len(value) + value + b"\r\n"


def test_set_refuses_non_integer_flags_and_ttl() -> None:
    protocol = client_protocol()
    with pytest.raises(TypeError):
        protocol.send_set(b"k", b"v", flags=1.5, ttl=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        protocol.send_set(b"k", b"v", flags=0, ttl=2.0)  # type: ignore[arg-type]
    assert protocol.pending == 0


BAD_KEYS = [
    b"",
    b"a b",  # spec 12.5: "a b" must never reach the wire
    b"a\x01b",  # spec 12.5 (3.12): control byte
    b"a\r\nget x",  # would inject a second command
    b"a\nb",
    b"a\rb",
    b"a\tb",
    b"a\x00b",
    b"a\x7fb",
    b" ",
]


@pytest.mark.parametrize("key", BAD_KEYS)
@pytest.mark.parametrize("command", ["get", "set", "delete"])
def test_malformed_key_is_refused(command: str, key: bytes) -> None:
    protocol = client_protocol()
    with pytest.raises(ValueError, match="memcache key"):
        send(protocol, command, key)
    assert protocol.pending == 0
    assert not protocol.broken


def test_high_bytes_are_allowed_in_keys() -> None:
    # Bytes >= 0x80 are neither whitespace nor control (spec conventions).
    assert client_protocol().send_get(b"\xc3\xa9t\xc3\xa9") == b"get \xc3\xa9t\xc3\xa9\r\n"


@pytest.mark.parametrize(
    "limits", [{"line_size_limit": 0}, {"data_size_limit": 0}, {"line_size_limit": -1}]
)
def test_limits_below_one_are_refused(limits: _Limits) -> None:
    # MC-1: both limits are integers >= 1.
    with pytest.raises(ValueError, match="must be >= 1"):
        client_protocol(**limits)


# ------------------------------------------------------- get replies (MC-8, MC-9)

# Spec 12.5 "memcache: wire exchanges": every server-reply row of a get,
# plus the sscanf() and C-string readings that MC-9 implies.
GET_VECTORS: list[tuple[str, bytes, _Limits, MemcacheEvent | type[CommandFailed]]] = [
    ("12.5 miss", b"END\r\n", {}, GetMiss()),
    ("12.5 hello", b"VALUE k1 0 5\r\nhello\r\nEND\r\n", {}, GetHit(b"hello", True)),
    ("12.5 empty value", b"VALUE k2 0 0\r\n\r\nEND\r\n", {}, GetHit(b"", True)),
    ("12.5 cas ignored", b"VALUE a 0 3 99\r\nxyz\r\nEND\r\n", {}, GetHit(b"xyz", True)),
    ("12.5 key not compared", b"VALUE b 5 3\r\nxyz\r\nEND\r\n", {}, GetHit(b"xyz", True)),
    ("12.5 bare LF lines", b"VALUE a 0 3\nxyz\r\nEND\n", {}, GetHit(b"xyz", True)),
    ("12.5 FOO after value", b"VALUE a 0 3\r\nxyz\r\nFOO\r\n", {}, GetHit(b"xyz", False)),
    ("12.5 NUL cuts value", b"VALUE a 0 3\r\nx\x00z\r\nEND\r\n", {}, GetHit(b"x", True)),
    ("12.5 bare LF after data", b"VALUE a 0 3\r\nxyz\nEND\r\n", {}, CommandFailed),
    ("12.5 negative length", b"VALUE a 0 -1\r\n", {}, CommandFailed),
    ("12.5 lower-case end", b"end\r\n", {}, CommandFailed),
    ("12.5 END with space", b"END \r\n", {}, CommandFailed),
    ("12.5 SERVER_ERROR", b"SERVER_ERROR x\r\n", {}, CommandFailed),
    (
        "12.5 CLIENT_ERROR",
        b"CLIENT_ERROR bad command line format\r\n",
        {},
        CommandFailed,
    ),
    ("12.5 bk1 hit", b"VALUE bk1 0 2\r\nmc\r\nEND\r\n", {}, GetHit(b"mc", True)),
    (
        "12.5 data_size_limit 19",
        b"VALUE big 0 20\r\n" + b"0123456789" * 2 + b"\r\nEND\r\n",
        {"data_size_limit": 19},
        CommandFailed,
    ),
    (
        "12.5 data_size_limit 20",
        b"VALUE big 0 20\r\n" + b"0123456789" * 2 + b"\r\nEND\r\n",
        {"data_size_limit": 20},
        GetHit(b"0123456789" * 2, True),
    ),
    ("12.5 line_size_limit 3 CRLF", b"END\r\n", {"line_size_limit": 3}, CommandFailed),
    ("12.5 line_size_limit 3 LF", b"END\n", {"line_size_limit": 3}, CommandFailed),
    ("12.5 line_size_limit 4 CRLF", b"END\r\n", {"line_size_limit": 4}, GetMiss()),
    ("12.5 line_size_limit 4 LF", b"END\n", {"line_size_limit": 4}, GetMiss()),
    # sscanf("VALUE %*s %*s %ld"): what C accepts around the length token.
    ("sscanf: no space after VALUE", b"VALUEk 0 3\r\nxyz\r\nEND\r\n", {}, GetHit(b"xyz", True)),
    ("sscanf: plus sign", b"VALUE a 0 +3\r\nxyz\r\nEND\r\n", {}, GetHit(b"xyz", True)),
    ("sscanf: minus zero", b"VALUE a 0 -0\r\n\r\nEND\r\n", {}, GetHit(b"", True)),
    ("sscanf: trailing garbage", b"VALUE a 0 3abc\r\nxyz\r\nEND\r\n", {}, GetHit(b"xyz", True)),
    ("sscanf: hex reads as 0", b"VALUE a 0 0x10\r\n\r\nEND\r\n", {}, GetHit(b"", True)),
    ("sscanf: tabs", b"VALUE\ta\t0\t3\r\nxyz\r\nEND\r\n", {}, GetHit(b"xyz", True)),
    ("sscanf: leading zeros", b"VALUE a 0 003\r\nxyz\r\nEND\r\n", {}, GetHit(b"xyz", True)),
    ("sscanf: leading space", b" VALUE a 0 3\r\nxyz\r\nEND\r\n", {}, CommandFailed),
    ("sscanf: no length", b"VALUE a 0\r\n", {}, CommandFailed),
    ("sscanf: length not a number", b"VALUE a 0 x\r\n", {}, CommandFailed),
    ("sscanf: sign without digits", b"VALUE a 0 - 3\r\n", {}, CommandFailed),
    ("sscanf: overflow saturates", b"VALUE a 0 99999999999999999999999\r\n", {}, CommandFailed),
    ("sscanf: negative overflow", b"VALUE a 0 -99999999999999999999999\r\n", {}, CommandFailed),
    ("lower-case value", b"value a 0 3\r\nxyz\r\nEND\r\n", {}, CommandFailed),
    # C strings: strcmp() and sscanf() stop at a NUL inside the line.
    ("NUL ends the END line", b"END\x00junk\r\n", {}, GetMiss()),
    ("NUL after END trailer", b"VALUE a 0 3\r\nxyz\r\nEND\x00x\r\n", {}, GetHit(b"xyz", True)),
    ("NUL before length", b"VALUE a 0\x003\r\n", {}, CommandFailed),
    # Only one CR is stripped; a second one is part of the line.
    ("END CR CR LF", b"END\r\r\n", {}, CommandFailed),
    # The data terminator is checked byte by byte, like memcache_fread().
    ("CR then junk after data", b"VALUE a 0 3\r\nxyz\rX", {}, CommandFailed),
    ("junk after data", b"VALUE a 0 3\r\nxyzX", {}, CommandFailed),
    ("value longer than announced", b"VALUE a 0 2\r\nxyz\r\nEND\r\n", {}, CommandFailed),
    ("END with space after value", b"VALUE a 0 3\r\nxyz\r\nEND \r\n", {}, GetHit(b"xyz", False)),
    (
        "value holding a whole reply",
        b"VALUE a 0 7\r\n\r\nEND\r\n\r\nEND\r\n",
        {},
        GetHit(b"\r\nEND\r\n", True),
    ),
]


@pytest.mark.parametrize(
    ("reply", "limits", "expected"),
    [
        pytest.param(reply, limits, expected, id=name)
        for name, reply, limits, expected in GET_VECTORS
    ],
)
def test_get_reply_vectors(
    reply: bytes, limits: _Limits, expected: MemcacheEvent | type[CommandFailed]
) -> None:
    events = exchange(reply, "get", **limits)
    if expected is CommandFailed:
        assert is_failure(events), events
    else:
        assert events == [expected]


@pytest.mark.parametrize(
    ("reply", "limits", "expected"),
    [
        pytest.param(reply, limits, expected, id=name)
        for name, reply, limits, expected in GET_VECTORS
    ],
)
def test_get_reply_vectors_fed_at_every_split_point(
    reply: bytes, limits: _Limits, expected: MemcacheEvent | type[CommandFailed]
) -> None:
    whole = exchange(reply, "get", **limits)
    for cut in range(1, len(reply)):
        protocol = client_protocol(**limits)
        protocol.send_get(b"a")
        assert feed_in_chunks(protocol, reply, [cut]) == whole, cut
    protocol = client_protocol(**limits)
    protocol.send_get(b"a")
    assert feed_in_chunks(protocol, reply, range(1, len(reply))) == whole


def test_reply_line_failure_reason_never_holds_possible_value_bytes() -> None:
    # memcache's own status lines are quoted in the reason ...
    assert exchange(b"SERVER_ERROR x\r\n") == [CommandFailed("SERVER_ERROR x")]
    assert exchange(b"END \r\n") == [CommandFailed("END ")]
    # ... any other line may be part of a stored value: only its length,
    # with the bytes kept apart for debug logging.
    assert exchange(b"ERR\x01\\\r\n") == [
        CommandFailed("unexpected reply line (5 bytes)", "ERR\\x01\\\\")
    ]
    assert exchange(b"secret alias value\r\n") == [
        CommandFailed("unexpected reply line (18 bytes)", "secret alias value")
    ]


def test_out_of_range_length_reason_names_the_limit() -> None:
    [event] = exchange(b"VALUE a 0 -1\r\n")
    assert event == CommandFailed("value length -1 outside 0..10240", "VALUE a 0 -1")


@pytest.mark.parametrize("sign", [b"", b"-", b"+"])
def test_huge_length_token_is_a_failure_not_a_crash(sign: bytes) -> None:
    # Python refuses int() of very long digit strings; %ld just saturates.
    line = b"VALUE a 0 " + sign + b"9" * 5000 + b"\r\n"
    assert is_failure(exchange(line, line_size_limit=10000))


def test_get_hit_waits_for_the_end_line() -> None:
    # The reusable flag depends on the END line, so no event before it.
    protocol = client_protocol()
    protocol.send_get(b"a")
    protocol.receive_data(b"VALUE a 0 3\r\nxyz\r\n")
    assert protocol.next_event() is NEED_DATA
    protocol.receive_data(b"EN")
    assert protocol.next_event() is NEED_DATA
    protocol.receive_data(b"D\r\n")
    assert protocol.next_event() == GetHit(b"xyz", True)
    assert protocol.pending == 0
    assert not protocol.broken


def test_wrong_data_terminator_fails_without_waiting() -> None:
    # memcache_fread() gives up at the first wrong byte.
    protocol = client_protocol()
    protocol.send_get(b"a")
    protocol.receive_data(b"VALUE a 0 3\r\nxyz\n")
    assert protocol.next_event() == CommandFailed("value not followed by CRLF")
    assert protocol.broken


# ------------------------------------------------------ line length (MC-8)


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
@pytest.mark.parametrize("limit", [12, 13, 14, 15, 20, 1024])
@pytest.mark.parametrize("length", [12, 13, 14, 15, 1023, 1024])
def test_line_of_n_bytes_is_accepted_iff_n_plus_one_fits(
    ending: bytes, limit: int, length: int
) -> None:
    # "VALUE a 0 0" padded with ignored text after the length, to `length` bytes.
    header = b"VALUE a 0 0".ljust(length, b" ")
    events = exchange(header + ending + b"\r\nEND\r\n", line_size_limit=limit)
    if length + 1 <= limit:
        assert events == [GetHit(b"", True)]
    else:
        assert is_failure(events)


def test_over_long_line_fails_before_its_end_arrives() -> None:
    # The parser must not buffer an unterminated line past line_size_limit.
    protocol = client_protocol(line_size_limit=8)
    protocol.send_get(b"a")
    protocol.receive_data(b"X" * 7)
    assert protocol.next_event() is NEED_DATA
    protocol.receive_data(b"X")
    assert protocol.next_event() == CommandFailed("reply line longer than line_size_limit=8")


def test_cr_at_the_limit_waits_for_one_more_byte() -> None:
    # memcache_get() reads one byte past the bound when the bound falls inside CRLF.
    protocol = client_protocol(line_size_limit=4)
    protocol.send_get(b"a")
    protocol.receive_data(b"END\r")
    assert protocol.next_event() is NEED_DATA
    protocol.receive_data(b"\n")
    assert protocol.next_event() == GetMiss()


def test_cr_at_the_limit_followed_by_other_byte_fails() -> None:
    assert is_failure(exchange(b"END\rX\n", line_size_limit=4))
    assert is_failure(exchange(b"END\r", line_size_limit=4, eof=True))


def test_over_long_end_line_after_value_still_returns_the_value() -> None:
    events = exchange(b"VALUE a 0 1\r\nx\r\nEND-AND-MORE\r\n", line_size_limit=12)
    assert events == [GetHit(b"x", False)]


# ---------------------------------------------------- set and delete (MC-10)

SET_VECTORS: list[tuple[bytes, MemcacheEvent]] = [
    (b"STORED\r\n", Stored()),  # 12.5 backup refill
    (b"STORED\n", Stored()),
    (b"STORED\x00junk\r\n", Stored()),  # strcmp() stops at NUL
    (b"NOT_STORED\r\n", CommandFailed("NOT_STORED")),
    (b"EXISTS\r\n", CommandFailed("EXISTS")),
    (b"SERVER_ERROR out of memory\r\n", CommandFailed("SERVER_ERROR out of memory")),
    (b"ERROR\r\n", CommandFailed("ERROR")),
    (b"CLIENT_ERROR bad data chunk\r\n", CommandFailed("CLIENT_ERROR bad data chunk")),
    (b"stored\r\n", CommandFailed("unexpected reply line (6 bytes)", "stored")),
    (b"STORED \r\n", CommandFailed("STORED ")),
]

# Spec 12.5 "Delete (postmap -d)" rows.
DELETE_VECTORS: list[tuple[bytes, MemcacheEvent]] = [
    (b"DELETED\r\n", Deleted()),
    (b"NOT_FOUND\r\n", DeleteNotFound()),
    (b"SERVER_ERROR\r\n", CommandFailed("SERVER_ERROR")),
    (b"DELETED\n", Deleted()),
    (b"NOT_FOUND\x00\r\n", DeleteNotFound()),
    (b"END\r\n", CommandFailed("END")),
    (b"deleted\r\n", CommandFailed("unexpected reply line (7 bytes)", "deleted")),
]


@pytest.mark.parametrize(("reply", "expected"), SET_VECTORS)
def test_set_replies(reply: bytes, expected: MemcacheEvent) -> None:
    assert exchange(reply, "set") == [expected]
    for cut in range(1, len(reply)):
        protocol = client_protocol()
        protocol.send_set(b"a", b"v", flags=0, ttl=0)
        assert feed_in_chunks(protocol, reply, [cut]) == [expected]


@pytest.mark.parametrize(("reply", "expected"), DELETE_VECTORS)
def test_delete_replies(reply: bytes, expected: MemcacheEvent) -> None:
    assert exchange(reply, "delete") == [expected]
    for cut in range(1, len(reply)):
        protocol = client_protocol()
        protocol.send_delete(b"a")
        assert feed_in_chunks(protocol, reply, [cut]) == [expected]


def test_set_reply_limited_by_line_size_limit() -> None:
    # "STORED" is 6 bytes: it needs line_size_limit >= 7 (MC-8).
    assert is_failure(exchange(b"STORED\r\n", "set", line_size_limit=6))
    assert exchange(b"STORED\r\n", "set", line_size_limit=7) == [Stored()]


# ----------------------------------------------------- end of stream (MC-8)

HIT_REPLY = b"VALUE a 0 3\r\nxyz\r\nEND\r\n"
VALUE_COMPLETE_AT = len(b"VALUE a 0 3\r\nxyz\r\n")


@pytest.mark.parametrize("cut", range(len(HIT_REPLY) + 1))
def test_eof_at_each_point_of_a_hit(cut: int) -> None:
    events = exchange(HIT_REPLY[:cut], eof=True)
    if cut == len(HIT_REPLY):
        assert events == [GetHit(b"xyz", True)]
    elif cut >= VALUE_COMPLETE_AT:
        # MC-9 step 4: the value was read; only the END line is missing.
        assert events == [GetHit(b"xyz", False)]
    else:
        assert is_failure(events)


@pytest.mark.parametrize(
    ("command", "reply", "expected"),
    [
        ("get", b"END\r\n", GetMiss()),
        ("set", b"STORED\r\n", Stored()),
        ("delete", b"DELETED\r\n", Deleted()),
    ],
)
def test_eof_at_each_point_of_a_one_line_reply(
    command: str, reply: bytes, expected: MemcacheEvent
) -> None:
    for cut in range(len(reply) + 1):
        events = exchange(reply[:cut], command, eof=True)
        if cut == len(reply):
            assert events == [expected]
        else:
            assert is_failure(events), cut


def test_server_closes_without_reply() -> None:
    # 12.5: "server closes without reply" and "server never answers" (timeout = EOF).
    protocol = client_protocol()
    protocol.send_get(b"a")
    assert protocol.next_event() is NEED_DATA
    protocol.receive_data(b"")
    assert protocol.broken
    assert protocol.next_event() == CommandFailed("connection closed")
    assert protocol.pending == 0
    with pytest.raises(MemcacheProtocolError):
        protocol.send_get(b"a")


def test_complete_replies_survive_a_later_eof() -> None:
    protocol = client_protocol()
    protocol.send_get(b"a")
    protocol.send_get(b"b")
    protocol.send_get(b"c")
    protocol.receive_data(b"END\r\nVALUE b 0 1\r\n")
    protocol.receive_data(b"")
    assert drain(protocol) == [
        GetMiss(),
        CommandFailed("connection closed while reading value"),
        CommandFailed(CONNECTION_CLOSED_AFTER_ERROR),
    ]


def test_bytearray_chunks_are_accepted() -> None:
    # trio's receive_some() may hand over a bytearray.
    protocol = client_protocol()
    protocol.send_get(b"a")
    protocol.receive_data(bytearray(b"VALUE a 0 1\r\nx\r\n"))
    protocol.receive_data(bytearray(b"END\r\n"))
    assert protocol.next_event() == GetHit(b"x", True)


def test_data_after_eof_is_a_caller_error() -> None:
    protocol = client_protocol()
    protocol.send_get(b"a")
    protocol.receive_data(b"")
    protocol.receive_data(b"")  # a second EOF (timeout, then close) is harmless
    with pytest.raises(MemcacheProtocolError):
        protocol.receive_data(b"END\r\n")


def test_idle_connection_closed_by_server_is_broken() -> None:
    protocol = client_protocol()
    protocol.receive_data(b"")
    assert protocol.broken
    assert protocol.next_event() is NEED_DATA
    with pytest.raises(MemcacheProtocolError, match="closed"):
        protocol.send_delete(b"a")


# ------------------------------------------------------ pipelining and death


def test_pipelined_commands_get_replies_in_order() -> None:
    protocol = client_protocol()
    wire = (
        protocol.send_get(b"a")
        + protocol.send_set(b"b", b"12", flags=0, ttl=60)
        + protocol.send_delete(b"c")
        + protocol.send_get(b"d")
        + protocol.send_delete(b"e")
        + protocol.send_get(b"f")
    )
    assert wire == (b"get a\r\nset b 0 60 2\r\n12\r\ndelete c\r\nget d\r\ndelete e\r\nget f\r\n")
    assert protocol.pending == 6
    reply = (
        b"VALUE a 0 5\r\nhello\r\nEND\r\n"
        b"STORED\r\n"
        b"DELETED\r\n"
        b"END\r\n"
        b"NOT_FOUND\r\n"
        b"VALUE f 1 3 77\r\nS\r\n\r\nEND\r\n"
    )
    expected = [
        GetHit(b"hello", True),
        Stored(),
        Deleted(),
        GetMiss(),
        DeleteNotFound(),
        GetHit(b"S\r\n", True),
    ]
    protocol.receive_data(reply)
    assert protocol.next_event() == expected[0]
    assert protocol.pending == 5
    assert drain(protocol) == expected[1:]
    assert protocol.pending == 0
    assert not protocol.broken


def test_pipelined_replies_at_every_split_point() -> None:
    reply = b"END\r\nSTORED\r\nVALUE x 0 2\r\nhi\r\nEND\r\nNOT_FOUND\r\n"
    expected = [GetMiss(), Stored(), GetHit(b"hi", True), DeleteNotFound()]
    for cut in range(len(reply) + 1):
        protocol = client_protocol()
        for command in ["get", "set", "get", "delete"]:
            send(protocol, command)
        assert feed_in_chunks(protocol, reply, [cut]) == expected, cut
        assert protocol.pending == 0


def test_failure_fails_every_command_behind_it() -> None:
    protocol = client_protocol()
    for command in ["get", "set", "delete"]:
        send(protocol, command)
    # The replies to set and delete are there, but cannot be trusted any more.
    protocol.receive_data(b"SERVER_ERROR x\r\nSTORED\r\nDELETED\r\n")
    assert drain(protocol) == [
        CommandFailed("SERVER_ERROR x"),
        CommandFailed(CONNECTION_CLOSED_AFTER_ERROR),
        CommandFailed(CONNECTION_CLOSED_AFTER_ERROR),
    ]
    assert protocol.pending == 0
    assert protocol.broken
    with pytest.raises(MemcacheProtocolError, match="SERVER_ERROR x"):
        protocol.send_get(b"a")


def test_unreusable_hit_fails_every_command_behind_it() -> None:
    # 12.5 "FOO" row: the value counts, the connection does not.
    protocol = client_protocol()
    protocol.send_get(b"a")
    protocol.send_get(b"b")
    protocol.receive_data(b"VALUE a 0 3\r\nxyz\r\nFOO\r\nEND\r\n")
    assert drain(protocol) == [
        GetHit(b"xyz", False),
        CommandFailed(CONNECTION_CLOSED_AFTER_ERROR),
    ]
    assert protocol.broken


def test_broken_connection_drops_further_data() -> None:
    protocol = client_protocol()
    protocol.send_get(b"a")
    protocol.send_get(b"b")
    protocol.receive_data(b"ERROR\r\n")
    assert protocol.next_event() == CommandFailed("ERROR")
    protocol.receive_data(b"END\r\n")
    assert protocol.next_event() == CommandFailed(CONNECTION_CLOSED_AFTER_ERROR)


def test_server_error_then_fresh_connection_succeeds() -> None:
    # 12.5: SERVER_ERROR, then a new connection answers the same get.
    first = client_protocol()
    first.send_get(b"a")
    first.receive_data(b"SERVER_ERROR x\r\n")
    assert first.next_event() == CommandFailed("SERVER_ERROR x")
    assert first.broken
    second = client_protocol()
    second.send_get(b"a")
    second.receive_data(b"VALUE a 0 3\r\nxyz\r\nEND\r\n")
    assert second.next_event() == GetHit(b"xyz", True)
    assert not second.broken


def test_unsolicited_data_breaks_the_connection() -> None:
    protocol = client_protocol()
    protocol.receive_data(b"END\r\n")
    assert protocol.broken
    assert protocol.next_event() is NEED_DATA
    with pytest.raises(MemcacheProtocolError, match="unsolicited"):
        protocol.send_get(b"a")


def test_bytes_left_after_the_last_reply_break_the_connection() -> None:
    # The reply itself is fine; what follows would be misread as the next reply.
    protocol = client_protocol()
    protocol.send_get(b"a")
    protocol.receive_data(b"END\r\nEND\r\n")
    assert protocol.next_event() == GetMiss()
    assert protocol.broken


def test_no_command_means_need_data() -> None:
    protocol = client_protocol()
    assert protocol.next_event() is NEED_DATA
    assert protocol.pending == 0
    assert not protocol.broken


def test_need_data_repr() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"


# ------------------------------------------------------------ escape_for_log


@pytest.mark.parametrize(
    ("data", "limit", "expected"),
    [
        (b"SERVER_ERROR x", 100, "SERVER_ERROR x"),
        (b"a\r\n\x00\x7f\xff", 100, "a\\x0d\\x0a\\x00\\x7f\\xff"),
        (b"back\\slash", 100, "back\\\\slash"),
        (b"abcdef", 3, "abc..."),
        (b"abc", 3, "abc"),
        (b"", 100, ""),
    ],
)
def test_escape_for_log(data: bytes, limit: int, expected: str) -> None:
    assert escape_for_log(data, limit) == expected


@given(st.binary(), st.integers(min_value=0, max_value=50))
def test_escape_for_log_is_printable_and_bounded(data: bytes, limit: int) -> None:
    text = escape_for_log(data, limit)
    assert all(0x20 <= ord(char) <= 0x7E for char in text)
    assert len(text) <= 4 * limit + 3


# ---------------------------------------------- sscanf model against libc


def _libc_sscanf() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


_LIBC = _libc_sscanf()

# Lines made mostly of the bytes that matter to the header grammar.
_header_lines = st.one_of(
    st.binary(max_size=40).filter(lambda line: b"\0" not in line),
    st.lists(
        st.sampled_from(
            [
                b"VALUE",
                b"VALUEx",
                b" ",
                b"\t",
                b"\v",
                b"\r",
                b"\n",
                b"k",
                b"0",
                b"3",
                b"-",
                b"+",
                b"99999999999999999999",
                b"x",
                b"\xa0",
                b"\x1c",
                b"0x1",
            ]
        ),
        max_size=12,
    ).map(b"".join),
)


@pytest.mark.skipif(_LIBC is None, reason="no C library to compare with")
@settings(max_examples=500)
@given(_header_lines)
def test_value_header_reading_matches_c_sscanf(line: bytes) -> None:
    assert _LIBC is not None
    length = ctypes.c_long(0)
    assigned = _LIBC.sscanf(line, b"VALUE %*s %*s %ld", ctypes.byref(length))
    expected = length.value if assigned == 1 else None
    assert _scan_value_length(line) == expected


# --------------------------------------------------------- property tests


@st.composite
def _cut_points(draw: st.DrawFn, data: bytes) -> list[int]:
    if not data:
        return []
    return draw(st.lists(st.integers(min_value=0, max_value=len(data)), max_size=8))


@settings(max_examples=300)
@given(
    commands=st.lists(st.sampled_from(["get", "set", "delete"]), min_size=1, max_size=4),
    reply=st.one_of(
        st.binary(max_size=200),
        st.lists(
            st.sampled_from(
                [
                    b"END",
                    b"VALUE a 0 3",
                    b"VALUE a 0 -1",
                    b"xyz",
                    b"\r\n",
                    b"\n",
                    b"\r",
                    b"STORED",
                    b"DELETED",
                    b"NOT_FOUND",
                    b"\x00",
                    b"SERVER_ERROR",
                    b" 9",
                ]
            ),
            max_size=20,
        ).map(b"".join),
    ),
    line_size_limit=st.integers(min_value=1, max_value=20),
    data_size_limit=st.integers(min_value=1, max_value=20),
    data=st.data(),
)
def test_arbitrary_replies_only_produce_events(
    commands: list[str],
    reply: bytes,
    line_size_limit: int,
    data_size_limit: int,
    data: st.DataObject,
) -> None:
    protocol = client_protocol(line_size_limit=line_size_limit, data_size_limit=data_size_limit)
    for command in commands:
        send(protocol, command)
    events = feed_in_chunks(protocol, reply, data.draw(_cut_points(reply)))
    assert len(events) + protocol.pending == len(commands)
    protocol.receive_data(b"")
    events += drain(protocol)
    # End of stream settles every outstanding command, one event each, in order.
    assert len(events) == len(commands)
    assert protocol.pending == 0
    assert protocol.broken
    allowed: dict[str, tuple[type, ...]] = {
        "get": (GetHit, GetMiss, CommandFailed),
        "set": (Stored, CommandFailed),
        "delete": (Deleted, DeleteNotFound, CommandFailed),
    }
    for command, event in zip(commands, events, strict=True):
        assert isinstance(event, allowed[command])
        if isinstance(event, CommandFailed):
            assert re.fullmatch(r"[\x20-\x7e]*", event.reason)
        if isinstance(event, GetHit):
            assert len(event.value) <= data_size_limit
            assert b"\0" not in event.value


@dataclass(frozen=True, slots=True)
class _Step:
    """One command of a generated conversation, with the server's well-formed answer."""

    command: str
    key: bytes
    value: bytes
    reply: bytes
    event: MemcacheEvent


_keys = st.binary(min_size=1, max_size=12).map(
    lambda raw: bytes(byte for byte in raw if 0x20 < byte != 0x7F) or b"k"
)
_values = st.one_of(
    st.binary(max_size=40),
    st.lists(
        st.sampled_from([b"\r\nEND\r\n", b"END", b"\r", b"\n", b"VALUE a 0 3\r\n", b"x"]),
        max_size=6,
    ).map(b"".join),
)
_tokens = st.binary(min_size=1, max_size=8).map(
    lambda raw: bytes(byte for byte in raw if byte > 0x20 and byte != 0x7F) or b"0"
)


@st.composite
def _steps(draw: st.DrawFn) -> _Step:
    key = draw(_keys)
    kind = draw(st.sampled_from(["hit", "miss", "stored", "deleted", "not_found"]))
    if kind == "hit":
        value = draw(_values)
        cas = draw(st.one_of(st.just(b""), _tokens.map(lambda token: b" " + token)))
        # The echoed key and flags are never compared with anything (MC-9).
        header = b"VALUE %s %s %d%s" % (draw(_tokens), draw(_tokens), len(value), cas)
        reply = header + b"\r\n" + value + b"\r\nEND\r\n"
        return _Step("get", key, b"", reply, GetHit(value.partition(b"\0")[0], True))
    if kind == "miss":
        return _Step("get", key, b"", b"END\r\n", GetMiss())
    if kind == "stored":
        return _Step("set", key, draw(_values), b"STORED\r\n", Stored())
    if kind == "deleted":
        return _Step("delete", key, b"", b"DELETED\r\n", Deleted())
    return _Step("delete", key, b"", b"NOT_FOUND\r\n", DeleteNotFound())


@settings(max_examples=300)
@given(steps=st.lists(_steps(), min_size=1, max_size=6), data=st.data())
def test_well_formed_conversation_round_trips(steps: list[_Step], data: st.DataObject) -> None:
    protocol = client_protocol(line_size_limit=64, data_size_limit=1000)
    for step in steps:
        if step.command == "get":
            assert protocol.send_get(step.key) == b"get " + step.key + b"\r\n"
        elif step.command == "set":
            wire = protocol.send_set(step.key, step.value, flags=0, ttl=0)
            assert wire == b"set %s 0 0 %d\r\n%s\r\n" % (step.key, len(step.value), step.value)
        else:
            assert protocol.send_delete(step.key) == b"delete " + step.key + b"\r\n"
    reply = b"".join(step.reply for step in steps)
    events = feed_in_chunks(protocol, reply, data.draw(_cut_points(reply)))
    assert events == [step.event for step in steps]
    assert protocol.pending == 0
    assert not protocol.broken


# ------------------------------------------------- bulk: noreply + barrier


def test_noreply_sets_expect_no_reply_and_version_is_the_barrier() -> None:
    protocol = client_protocol()
    sent = protocol.send_set(b"a", b"1", flags=0, ttl=0, noreply=True)
    sent += protocol.send_set(b"b", b"22", flags=3, ttl=-1, noreply=True)
    assert sent == b"set a 0 0 1 noreply\r\n1\r\nset b 3 -1 2 noreply\r\n22\r\n"
    assert protocol.pending == 0
    assert protocol.send_version() == b"version\r\n"
    assert protocol.pending == 1
    protocol.receive_data(b"VERSION 1.6.18\r\n")
    assert protocol.next_event() == Version(b"1.6.18")
    assert not protocol.broken


def test_an_error_from_a_noreply_set_fails_the_barrier() -> None:
    protocol = client_protocol()
    protocol.send_set(b"a", b"1", flags=0, ttl=0, noreply=True)
    protocol.send_version()
    protocol.receive_data(b"SERVER_ERROR out of memory storing object\r\nVERSION 1.6\r\n")
    event = protocol.next_event()
    assert isinstance(event, CommandFailed)
    assert "SERVER_ERROR" in event.reason
    assert protocol.broken
