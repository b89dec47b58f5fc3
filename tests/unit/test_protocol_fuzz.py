"""Fuzzing the sans-I/O protocol codecs: arbitrary bytes, arbitrary chunks.

Theory of operation
-------------------
Every codec in :mod:`bridge.protocol` that reads bytes from a peer is
checked against a *reference reader* written here from the spec: SM-4 ..
SM-8 for socketmap requests, TCP-1 .. TCP-3 plus the server choices in
:mod:`bridge.protocol.tcptable` for tcp_table requests, SM-6 and TCP-4 for
the client-side reply decoders. A reference reader sees the whole stream
at once and has no buffers, so it is short enough to check by eye. The
codec under test gets the same bytes in random chunks and is drained after
every chunk, exactly as the server's connection loop drains it, and must
produce the reference reader's events in the same order.

On every input four invariants are checked:

1. the codec raises nothing (server side) or only its module's own error
   class (client side: ``NetstringError``, ``TcpTableError``);
2. after each drain, ``buffered_byte_count`` is within the codec's
   documented bound (what keeps a hostile client's memory bounded);
3. every event is one of the documented event types;
4. the events equal the reference reader's, so requests interleaved with
   garbage are never reordered, dropped or invented.

Streams are built from pieces that matter: the spec's own vectors
(12.1 .. 12.4), encoder output, frames the server must refuse, and raw
random bytes. CI runs :data:`CI_EXAMPLES` inputs per target;
``BRIDGE_LONG=1`` runs :data:`LONG_EXAMPLES` per target, over 100,000 in
total, and each target records its count in the reliability report.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, TypeAlias

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from bridge.outcome import ConfigFailure, Found, NotFound, Outcome, Retry
from bridge.protocol.events import NEED_DATA, BadRequest, ConnectionClosed, LookupRequest
from bridge.protocol.netstring import (
    MAX_LENGTH_DIGITS,
    NetstringDecoder,
    NetstringError,
    encode_netstring,
)
from bridge.protocol.socketmap import (
    MAX_REPLY_PAYLOAD,
    MAX_REQUEST_PAYLOAD,
    SocketmapServerProtocol,
    encode_reply,
    encode_request,
    parse_socketmap_reply,
)
from bridge.protocol.tcptable import (
    MAX_REPLY_LINE,
    MAX_REQUEST_LINE,
    TcpReplyDecoder,
    TcpTableError,
    TcpTableServerProtocol,
    encode_tcp_request,
    parse_tcp_reply_line,
)
from bridge.protocol.tcptable import encode_reply as encode_tcp_reply
from tests.reliability import ReliabilityReport, long_mode

#: Inputs per fuzz target in CI: enough to reach every branch of the
#: codecs many times over, cheap enough (a few seconds per target).
CI_EXAMPLES: Final = 2_000

#: Inputs per fuzz target with BRIDGE_LONG=1. Eight targets make 160,000
#: inputs, above the 100,000 the long run promises.
LONG_EXAMPLES: Final = 20_000

#: Stateful runs are whole conversations of up to STATEFUL_STEPS steps
#: each, so fewer of them give the same coverage.
STATEFUL_SHARE: Final = 4
STATEFUL_STEPS: Final = 40

#: Small limits the fuzzers also use, so that size errors and overlong
#: lines are reached by short random inputs, not only by megabyte ones.
SMALL_LIMITS: Final = (0, 1, 8, 16, 64)

_AREA: Final = "protocol fuzzing"


def _examples(share: int = 1) -> int:
    return (LONG_EXAMPLES if long_mode() else CI_EXAMPLES) // share


def _fuzz_settings(share: int = 1) -> settings:
    return settings(
        max_examples=_examples(share),
        # Timing is not what is tested; a loaded CI machine must not fail it.
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        stateful_step_count=STATEFUL_STEPS,
    )


# ------------------------------------------------------------- tallying


@dataclass
class Tally:
    """Counts inputs of one fuzz target and records them as a reliability row.

    ``crashes`` counts inputs on which the codec raised something it must
    not; ``wrong`` counts inputs whose events differ from the reference.
    Both include the repeats Hypothesis makes while shrinking a failure.
    """

    scenario: str
    bound: str
    inputs: int = 0
    wrong: int = 0
    crashes: int = 0

    def run(self, check: Callable[[], None]) -> None:
        self.inputs += 1
        try:
            check()
        except AssertionError:
            self.wrong += 1
            raise
        except Exception:
            self.crashes += 1
            raise

    def record(self, reliability: ReliabilityReport) -> None:
        reliability.record(
            _AREA,
            self.scenario,
            requests=self.inputs,
            correct=self.inputs - self.wrong - self.crashes,
            wrong=self.wrong,
            bound=self.bound,
            crashes=self.crashes,
        )


# ---------------------------------------------------------------- events

#: Events reduced to comparable tuples: ("request", name, key),
#: ("bad", fatal), ("get", key), ("bad", fatal, temporary),
#: ("closed", mid_frame), ("payload", bytes), ("line", bytes),
#: ("error", kind).
Event: TypeAlias = tuple[object, ...]


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    """Cut ``data`` at offsets (taken modulo its length) into non-empty chunks."""
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[start:end] for start, end in itertools.pairwise(points)]


def _is_digit(byte: int) -> bool:
    return 0x30 <= byte <= 0x39


@dataclass(frozen=True, slots=True)
class _Frame:
    """What the reference netstring reader found at the start of a stream."""

    payload: bytes | None  # None: no complete frame
    consumed: int
    error: str | None  # "format", "size"; None when complete or incomplete


def _reference_frame(stream: bytes, max_length: int) -> _Frame:
    """Read one netstring from the start of ``stream`` by the SM-6 steps.

    The bridge's one addition to SM-6 is :data:`MAX_LENGTH_DIGITS`: a
    prefix of more digits is a size error.
    """
    digits_end = 0
    while digits_end < len(stream) and _is_digit(stream[digits_end]):
        digits_end += 1
    if digits_end > MAX_LENGTH_DIGITS:
        return _Frame(None, 0, "size")
    if digits_end == len(stream):
        return _Frame(None, 0, None)
    if stream[digits_end] != ord(":"):
        return _Frame(None, 0, "format")
    length = int(stream[:digits_end] or b"0")
    if length > max_length:
        return _Frame(None, 0, "size")
    start = digits_end + 1
    if len(stream) < start + length + 1:
        return _Frame(None, 0, None)
    if stream[start + length] != ord(","):
        return _Frame(None, 0, "format")
    return _Frame(stream[start : start + length], start + length + 1, None)


def reference_socketmap_server(stream: bytes, *, eof: bool, max_payload: int) -> list[Event]:
    """The events a socketmap server owes for ``stream`` (SM-6, SM-8 bridge note).

    Args:
      stream: every byte the client sent.
      eof: whether the client has closed its side after them.
      max_payload: the server's request size limit (SM-7 bridge note).

    Returns:
      ``("request", name, key)`` per request, ``("bad", fatal)`` per
      request the server refuses, and ``("closed", mid_frame)`` last once
      the connection is over (after a fatal refusal, or at EOF).
    """
    events: list[Event] = []
    while True:
        frame = _reference_frame(stream, max_payload)
        if frame.error is not None:
            return [*events, ("bad", True), ("closed", False)]
        if frame.payload is None:
            if eof:
                events.append(("closed", bool(stream)))
            return events
        name, space, key = frame.payload.partition(b" ")
        if space and name and name.isascii():
            events.append(("request", name.decode("ascii"), key))
        else:
            events.append(("bad", False))
        stream = stream[frame.consumed :]


def reference_netstring_client(stream: bytes, *, eof: bool, max_payload: int) -> list[Event]:
    """The payloads and the final error a netstring reader reports (SM-6).

    Args:
      stream: every byte the server sent.
      eof: whether the server has closed its side after them.
      max_payload: the reader's reply size limit (SM-7).

    Returns:
      ``("payload", bytes)`` per complete netstring, then
      ``("error", kind)`` with the :class:`NetstringError` kind if the
      stream breaks or ends.
    """
    events: list[Event] = []
    while True:
        frame = _reference_frame(stream, max_payload)
        if frame.error is not None:
            return [*events, ("error", frame.error)]
        if frame.payload is None:
            if eof:
                # SM-6 step 4: a missing ',' is a format error even at EOF;
                # EOF anywhere else is an EOF error.
                colon = stream.find(b":")
                complete_payload = colon >= 0 and len(stream) - colon - 1 >= int(
                    stream[:colon] or b"0"
                )
                events.append(("error", "format" if complete_payload else "eof"))
            return events
        events.append(("payload", frame.payload))
        stream = stream[frame.consumed :]


def _reference_unquote(text: bytes) -> bytes | None:
    """Undo %XX quoting (TCP-3 bridge note); None if a '%' is malformed."""
    out = bytearray()
    index = 0
    hex_digits = b"0123456789abcdefABCDEF"
    while index < len(text):
        byte = text[index]
        if byte != ord("%"):
            out.append(byte)
            index += 1
            continue
        escape = text[index + 1 : index + 3]
        if len(escape) < 2 or any(digit not in hex_digits for digit in escape):
            return None
        out.append(int(escape, 16))
        index += 3
    return bytes(out)


def reference_tcp_server(stream: bytes, *, eof: bool, max_line: int) -> list[Event]:
    """The events a tcp_table server owes for ``stream`` (TCP-1 .. TCP-3, module notes).

    Args:
      stream: every byte the client sent.
      eof: whether the client has closed its side after them.
      max_line: the server's longest request line, LF included.

    Returns:
      ``("get", key)`` per lookup, ``("bad", fatal, temporary)`` per line
      the server refuses (``temporary``: answered 400, else 500), and
      ``("closed", mid_frame)`` last once the connection is over.
    """
    events: list[Event] = []
    while True:
        newline = stream.find(b"\n", 0, max_line)
        if newline < 0:
            if len(stream) >= max_line:
                return [*events, ("bad", True, True), ("closed", False)]
            if eof:
                events.append(("closed", bool(stream)))
            return events
        line = stream[:newline]
        stream = stream[newline + 1 :]
        line = line.removesuffix(b"\r")
        if not line.startswith(b"get "):
            events.append(("bad", False, False))
            continue
        key = _reference_unquote(line[4:])
        events.append(("bad", False, True) if key is None else ("get", key))


def reference_tcp_client(stream: bytes, *, eof: bool) -> list[Event]:
    """The reply lines and the final error a tcp_table reader reports (TCP-4, TCP-10).

    Args:
      stream: every byte the server sent.
      eof: whether the server has closed its side after them.

    Returns:
      ``("line", bytes)`` per line without its LF, then ``("error",)`` if
      a line is too long or the stream ends (the attempt fails).
    """
    events: list[Event] = []
    while True:
        newline = stream.find(b"\n", 0, MAX_REPLY_LINE)
        if newline < 0:
            if len(stream) >= MAX_REPLY_LINE or eof:
                events.append(("error",))
            return events
        events.append(("line", stream[:newline]))
        stream = stream[newline + 1 :]


# ----------------------------------------------------------- the drivers


def _socketmap_event(event: object) -> Event:
    """Reduce a server event to a tuple, refusing any undocumented type (invariant 3)."""
    if type(event) is LookupRequest:
        return ("request", event.table, event.key)
    if type(event) is BadRequest:
        return ("bad", event.fatal)
    if type(event) is ConnectionClosed:
        return ("closed", event.mid_frame)
    raise AssertionError(f"undocumented socketmap event {event!r}")


def _tcp_event(event: object) -> Event:
    if type(event) is LookupRequest and event.table is None:
        return ("get", event.key)
    if type(event) is BadRequest:
        return ("bad", event.fatal, event.temporary)
    if type(event) is ConnectionClosed:
        return ("closed", event.mid_frame)
    raise AssertionError(f"undocumented tcp_table event {event!r}")


class SocketmapDriver:
    """A SocketmapServerProtocol fed and drained like the server loop does."""

    def __init__(self, max_payload: int = MAX_REQUEST_PAYLOAD) -> None:
        self.max_payload = max_payload
        self.protocol = SocketmapServerProtocol(max_payload)
        self.events: list[Event] = []
        self.closed = False
        # Invariant 2: a length prefix (MAX_LENGTH_DIGITS) or one payload
        # still missing its ',' (max_payload) is all that may wait.
        self.buffer_bound = max(max_payload, MAX_LENGTH_DIGITS)

    def feed(self, chunk: bytes) -> None:
        self.protocol.receive_data(chunk)
        while not self.closed:
            event = self.protocol.next_event()
            if event is NEED_DATA:
                break
            self.events.append(_socketmap_event(event))
            self.closed = isinstance(event, ConnectionClosed)
        assert self.protocol.buffered_byte_count <= self.buffer_bound


class TcpDriver:
    """A TcpTableServerProtocol fed and drained like the server loop does."""

    def __init__(self, max_line: int = MAX_REQUEST_LINE) -> None:
        self.max_line = max_line
        self.protocol = TcpTableServerProtocol(max_line)
        self.events: list[Event] = []
        self.closed = False
        # Invariant 2: only a line still missing its LF may wait, and it
        # is refused once it reaches max_line bytes.
        self.buffer_bound = max_line - 1

    def feed(self, chunk: bytes) -> None:
        self.protocol.receive_data(chunk)
        while not self.closed:
            event = self.protocol.next_event()
            if event is NEED_DATA:
                break
            self.events.append(_tcp_event(event))
            self.closed = isinstance(event, ConnectionClosed)
        assert self.protocol.buffered_byte_count <= self.buffer_bound


def serve_socketmap(
    chunks: list[bytes], *, eof: bool, max_payload: int = MAX_REQUEST_PAYLOAD
) -> list[Event]:
    driver = SocketmapDriver(max_payload)
    for chunk in [*chunks, *([b""] if eof else [])]:
        driver.feed(chunk)
    return driver.events


def serve_tcp(chunks: list[bytes], *, eof: bool, max_line: int = MAX_REQUEST_LINE) -> list[Event]:
    driver = TcpDriver(max_line)
    for chunk in [*chunks, *([b""] if eof else [])]:
        driver.feed(chunk)
    return driver.events


def read_netstrings(
    chunks: list[bytes], *, eof: bool, max_payload: int = MAX_REPLY_PAYLOAD
) -> list[Event]:
    """Drive the client-side NetstringDecoder; only NetstringError may escape it."""
    decoder = NetstringDecoder(max_payload)
    events: list[Event] = []
    bound = max(max_payload, MAX_LENGTH_DIGITS)
    for chunk in [*chunks, *([b""] if eof else [])]:
        decoder.receive_data(chunk)
        while True:
            try:
                payload = decoder.next_payload()
            except NetstringError as exc:
                events.append(("error", exc.kind))
                # Sticky (module contract): the same error again, never a payload.
                with pytest.raises(NetstringError) as again:
                    decoder.next_payload()
                assert again.value is exc
                return events
            if payload is NEED_DATA:
                break
            assert isinstance(payload, bytes)
            events.append(("payload", payload))
        assert decoder.buffered_byte_count <= bound
    return events


def read_tcp_lines(chunks: list[bytes], *, eof: bool) -> list[Event]:
    """Drive the client-side TcpReplyDecoder; only TcpTableError may escape it."""
    decoder = TcpReplyDecoder()
    events: list[Event] = []
    for chunk in [*chunks, *([b""] if eof else [])]:
        decoder.receive_data(chunk)
        while True:
            try:
                line = decoder.next_line()
            except TcpTableError:
                events.append(("error",))
                with pytest.raises(TcpTableError):
                    decoder.next_line()
                return events
            if line is NEED_DATA:
                break
            assert isinstance(line, bytes)
            events.append(("line", line))
        assert decoder.buffered_byte_count <= MAX_REPLY_LINE - 1
    return events


# ------------------------------------------------------ outcome checking


def _reference_socketmap_outcome(payload: bytes) -> type:
    """The outcome class Postfix gives a reply payload (SM-9, G-6 with SMTPUTF8 on)."""
    status, _, rest = payload.partition(b" ")
    if status == b"OK":
        try:
            rest.partition(b"\0")[0].decode("utf-8")
        except UnicodeDecodeError:
            return ConfigFailure
        return Found
    return {b"NOTFOUND": NotFound, b"TEMP": Retry, b"TIMEOUT": Retry, b"PERM": ConfigFailure}.get(
        status, Retry
    )


def _reference_tcp_outcome(line: bytes) -> tuple[type, bool]:
    """The outcome class and kept connection Postfix gives a reply line (TCP-5, TCP-6)."""
    well_formed = (
        len(line) >= 4
        and all(_is_digit(byte) for byte in line[:3])
        and line[3] in b" \t\v\f\r"
        and _reference_unquote(line[4:]) is not None
    )
    if not well_formed:
        return Retry, False
    if line[0] == ord("2"):
        value = (_reference_unquote(line[4:]) or b"").partition(b"\0")[0]
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return ConfigFailure, True
        return Found, True
    if line[0] == ord("5"):
        return NotFound, True
    return Retry, False


def _check_socketmap_outcomes(events: list[Event]) -> None:
    for event in events:
        if event[0] == "payload":
            payload = event[1]
            assert isinstance(payload, bytes)
            outcome = parse_socketmap_reply(payload)
            assert type(outcome) is _reference_socketmap_outcome(payload), (payload, outcome)


def _check_tcp_outcomes(events: list[Event]) -> None:
    for event in events:
        if event[0] == "line":
            line = event[1]
            assert isinstance(line, bytes)
            outcome, keep = parse_tcp_reply_line(line)
            assert (type(outcome), keep) == _reference_tcp_outcome(line), (line, outcome)


# ---------------------------------------------------------- spec vectors

# Spec 12.1: socketmap request bytes, with the request each one carries.
SOCKETMAP_REQUEST_VECTORS: Final = [
    (b"7:mymap k,", ("request", "mymap", b"k")),
    (b"6:mymap ,", ("request", "mymap", b"")),
    (b"13:mymap Foo Bar,", ("request", "mymap", b"Foo Bar")),
    (b"9:users a@b,", ("request", "users", b"a@b")),
]

# Spec 12.3: tcp_table request lines, with the key each one carries.
TCP_REQUEST_VECTORS: Final = [
    (b"get Foo%20Bar\n", ("get", b"Foo Bar")),
    (b"get \n", ("get", b"")),
    (
        b"get a%20b%25c%09d%01e%7Ff~g+h/i:j@k\"l'm\\n\n",
        ("get", b"a b%c\td\x01e\x7ff~g+h/i:j@k\"l'm\\n"),
    ),
    (b"get caf%C3%A9\n", ("get", "café".encode())),
    (b"get x%0Dy\n", ("get", b"x\ry")),
]

# Spec 12.2: reply bytes, with the outcome class the client must reach
# (a framing error is its NetstringError kind). The connection-handling
# rows (timeouts, reconnects) are not bytes and are tested with the client.
SOCKETMAP_REPLY_VECTORS: Final[list[tuple[bytes, bool, type | str]]] = [
    (b"8:OK hello,", False, Found),
    (b"5:OK  x,", False, Found),
    (b"3:OK ,", False, Found),
    (b"2:OK,", False, Found),
    (b"004:OK x,", False, Found),
    (b"8:OK a\tb\nc,", False, Found),
    (b"6:OK a\x00b,", False, Found),
    (b"4:OK \xff,", False, ConfigFailure),
    (b"8:NOTFOUND,", False, NotFound),
    (b"9:NOTFOUND ,", False, NotFound),
    (b"10:NOTFOUND x,", False, NotFound),
    (b"9:TEMP oops,", False, Retry),
    (b"12:TIMEOUT slow,", False, Retry),
    (b"8:PERM bad,", False, ConfigFailure),
    (b"4:PERM,", False, ConfigFailure),
    (b"4:ok x,", False, Retry),
    (b":,", False, Retry),
    (b"0:,", False, Retry),
    (b"+4:OK x,", False, "format"),
    (b" 4:OK x,", False, "format"),
    (b"4:OK x;", False, "format"),
    (b"3:OK x,", False, "format"),
    (b"100000:OK " + 99_997 * b"x" + b",", False, Found),
    (b"100001:", False, "size"),
    (b"4:OK", True, "eof"),
]

# Spec 12.4: reply lines, with the outcome class and whether Postfix keeps
# the connection; None marks the lines that fail the attempt (TCP-10).
TCP_REPLY_VECTORS: Final[list[tuple[bytes, tuple[type, bool] | None]]] = [
    (b"200 hello\n", (Found, True)),
    (b"200 a%20b%2fc%2Fd\n", (Found, True)),
    (b"200 \n", (Found, True)),
    (b"200\thello\n", (Found, True)),
    (b"299 x\n", (Found, True)),
    (b"250 x\n", (Found, True)),
    (b"200 a b\n", (Found, True)),
    (b"200 x\r\n", (Found, True)),
    (b"200 a%00b\n", (Found, True)),
    (b"200 %FF\n", (ConfigFailure, True)),
    (b"200\n", (Retry, False)),
    (b"200 %zz\n", (Retry, False)),
    (b"200 %4\n", (Retry, False)),
    (b"200 100%\n", (Retry, False)),
    (b"500 nope\n", (NotFound, True)),
    (b"550 x\n", (NotFound, True)),
    (b"500\n", (Retry, False)),
    (b"5xx x\n", (Retry, False)),
    (b"20 x\n", (Retry, False)),
    (b"abc\n", (Retry, False)),
    (b"400 later\n", (Retry, False)),
    (b"100 x\n", (Retry, False)),
    (b"300 x\n", (Retry, False)),
    (b"600 x\n", (Retry, False)),
    (b"200 " + 4091 * b"x" + b"\n", (Found, True)),
    (b"200 " + 4092 * b"x" + b"\n", None),
]

#: Frames and lines the servers must refuse; seeds for the stream strategies.
HOSTILE_SOCKETMAP_PIECES: Final = [
    b"999999999:",
    b"12a:",
    b"-1:",
    b" 4:m k,",
    b"3:a b;",
    b"0" * (MAX_LENGTH_DIGITS + 1),
    b"0" * MAX_LENGTH_DIGITS + b":,",
    b"004:m k,",
    b":,",
    b"5:nospc,",
    b"4: key,",
    b"8:caf\xc3\xa9 k,",
    b"7:m a\x00\r\n,",
]
HOSTILE_TCP_PIECES: Final = [
    b"put k v\n",
    b"GET k\n",
    b"\n",
    b"\r\n",
    b"get a%zz\n",
    b"get a%4\n",
    b"get 100%\n",
    b"get a\x00b\n",
    b"get caf\xe9\n",
    b"get a b\r\r\n",
    b"get k\r\n",
    b"x" * 70,
]


def _splits_to_check(length: int) -> Iterator[int]:
    """Every split point, except inside the long middle of a 100 kB vector."""
    if length <= 8_192:
        yield from range(length + 1)
        return
    yield from range(256)
    yield from range(length - 256, length + 1)
    yield from range(256, length - 256, 4_093)


@pytest.mark.parametrize(("wire", "expected"), SOCKETMAP_REQUEST_VECTORS)
def test_socketmap_request_vector_split_anywhere(wire: bytes, expected: Event) -> None:
    # Spec 12.1, each vector between two others, split at every point.
    stream = SOCKETMAP_REQUEST_VECTORS[0][0] + wire + SOCKETMAP_REQUEST_VECTORS[-1][0]
    whole = [SOCKETMAP_REQUEST_VECTORS[0][1], expected, SOCKETMAP_REQUEST_VECTORS[-1][1]]
    for split in range(len(stream) + 1):
        chunks = _chunks(stream, [split])
        assert serve_socketmap(chunks, eof=True) == [*whole, ("closed", False)], split


@pytest.mark.parametrize(("wire", "expected"), TCP_REQUEST_VECTORS)
def test_tcp_request_vector_split_anywhere(wire: bytes, expected: Event) -> None:
    # Spec 12.3, each vector between two others, split at every point.
    stream = TCP_REQUEST_VECTORS[0][0] + wire + TCP_REQUEST_VECTORS[-1][0]
    whole = [TCP_REQUEST_VECTORS[0][1], expected, TCP_REQUEST_VECTORS[-1][1]]
    for split in range(len(stream) + 1):
        chunks = _chunks(stream, [split])
        assert serve_tcp(chunks, eof=True) == [*whole, ("closed", False)], split


@pytest.mark.parametrize(("wire", "eof", "expected"), SOCKETMAP_REPLY_VECTORS)
def test_socketmap_reply_vector_split_anywhere(
    wire: bytes, eof: bool, expected: type | str
) -> None:
    # Spec 12.2 through the client-side decoder, split at every point.
    reference = reference_netstring_client(wire, eof=eof, max_payload=MAX_REPLY_PAYLOAD)
    for split in _splits_to_check(len(wire)):
        events = read_netstrings(_chunks(wire, [split]), eof=eof)
        assert events == reference, split
        if isinstance(expected, str):
            assert events == [("error", expected)], split
        else:
            assert len(events) == 1 and events[0][0] == "payload", split
            payload = events[0][1]
            assert isinstance(payload, bytes)
            assert type(parse_socketmap_reply(payload)) is expected


@pytest.mark.parametrize(("wire", "expected"), TCP_REPLY_VECTORS)
def test_tcp_reply_vector_split_anywhere(wire: bytes, expected: tuple[type, bool] | None) -> None:
    # Spec 12.4 through the client-side decoder, split at every point.
    for split in _splits_to_check(len(wire)):
        events = read_tcp_lines(_chunks(wire, [split]), eof=False)
        if expected is None:
            assert events == [("error",)], split
            continue
        assert len(events) == 1 and events[0][0] == "line", split
        line = events[0][1]
        assert isinstance(line, bytes)
        outcome, keep = parse_tcp_reply_line(line)
        assert (type(outcome), keep) == expected


# ------------------------------------------------------------ strategies

_names = st.one_of(
    st.sampled_from(["mymap", "users", "aliases"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12),
)
_keys = st.binary(max_size=40)

_socketmap_pieces = st.one_of(
    st.sampled_from([wire for wire, _ in SOCKETMAP_REQUEST_VECTORS]),
    st.builds(encode_request, _names, _keys),
    st.sampled_from(HOSTILE_SOCKETMAP_PIECES),
    # A well-framed payload that is not NAME SP KEY (non-fatal BadRequest).
    st.binary(max_size=24).map(encode_netstring),
    st.binary(max_size=24),
)
socketmap_streams = st.lists(_socketmap_pieces, max_size=12).map(b"".join)

_tcp_pieces = st.one_of(
    st.sampled_from([wire for wire, _ in TCP_REQUEST_VECTORS]),
    st.builds(encode_tcp_request, _keys),
    st.sampled_from(HOSTILE_TCP_PIECES),
    st.binary(max_size=24),
)
tcp_streams = st.lists(_tcp_pieces, max_size=12).map(b"".join)

_outcomes: st.SearchStrategy[Outcome] = st.one_of(
    st.builds(Found, st.binary(max_size=60)),
    st.just(NotFound()),
    st.builds(Retry, st.text(max_size=60), st.booleans()),
    st.builds(ConfigFailure, st.text(max_size=60)),
)

_socketmap_reply_pieces = st.one_of(
    st.sampled_from([wire for wire, _, _ in SOCKETMAP_REPLY_VECTORS if len(wire) < 100]),
    st.builds(encode_reply, _outcomes),
    st.binary(max_size=24).map(encode_netstring),
    st.binary(max_size=24),
)
socketmap_reply_streams = st.lists(_socketmap_reply_pieces, max_size=12).map(b"".join)

_tcp_reply_pieces = st.one_of(
    st.sampled_from([wire for wire, _ in TCP_REPLY_VECTORS if len(wire) < 100]),
    st.builds(encode_tcp_reply, _outcomes),
    st.binary(max_size=24),
    # Lines around the TCP-4 limit, with or without their LF.
    st.builds(
        lambda length, end: b"2" * length + end,
        st.integers(min_value=MAX_REPLY_LINE - 6, max_value=MAX_REPLY_LINE + 2),
        st.sampled_from([b"", b"\n"]),
    ),
)
tcp_reply_streams = st.lists(_tcp_reply_pieces, max_size=6).map(b"".join)

_cuts = st.lists(st.integers(min_value=0, max_value=2**20), max_size=12)
_socketmap_limits = st.sampled_from([*SMALL_LIMITS, MAX_REQUEST_PAYLOAD])
_tcp_limits = st.sampled_from([limit for limit in SMALL_LIMITS if limit > 0] + [MAX_REQUEST_LINE])


# ------------------------------------------------------- @given fuzzers


def test_socketmap_server_matches_reference(reliability: ReliabilityReport) -> None:
    tally = Tally(
        "random streams, random chunks: socketmap server",
        f"0 crashes; buffer <= max(limit, {MAX_LENGTH_DIGITS}) bytes after each drain",
    )

    @_fuzz_settings()
    @given(stream=socketmap_streams, cuts=_cuts, eof=st.booleans(), limit=_socketmap_limits)
    def check(stream: bytes, cuts: list[int], eof: bool, limit: int) -> None:
        def body() -> None:
            events = serve_socketmap(_chunks(stream, cuts), eof=eof, max_payload=limit)
            assert events == reference_socketmap_server(stream, eof=eof, max_payload=limit)

        tally.run(body)

    try:
        check()
    finally:
        tally.record(reliability)


def test_tcp_server_matches_reference(reliability: ReliabilityReport) -> None:
    tally = Tally(
        "random streams, random chunks: tcp_table server",
        "0 crashes; buffer < line limit after each drain",
    )

    @_fuzz_settings()
    @given(stream=tcp_streams, cuts=_cuts, eof=st.booleans(), limit=_tcp_limits)
    def check(stream: bytes, cuts: list[int], eof: bool, limit: int) -> None:
        def body() -> None:
            events = serve_tcp(_chunks(stream, cuts), eof=eof, max_line=limit)
            assert events == reference_tcp_server(stream, eof=eof, max_line=limit)

        tally.run(body)

    try:
        check()
    finally:
        tally.record(reliability)


def test_netstring_client_matches_reference(reliability: ReliabilityReport) -> None:
    tally = Tally(
        "random streams, random chunks: socketmap reply reader",
        "only NetstringError raised; buffer <= 100000 bytes",
    )

    @_fuzz_settings()
    @given(stream=socketmap_reply_streams, cuts=_cuts, eof=st.booleans())
    def check(stream: bytes, cuts: list[int], eof: bool) -> None:
        def body() -> None:
            events = read_netstrings(_chunks(stream, cuts), eof=eof)
            assert events == reference_netstring_client(
                stream, eof=eof, max_payload=MAX_REPLY_PAYLOAD
            )
            _check_socketmap_outcomes(events)

        tally.run(body)

    try:
        check()
    finally:
        tally.record(reliability)


def test_tcp_client_matches_reference(reliability: ReliabilityReport) -> None:
    tally = Tally(
        "random streams, random chunks: tcp_table reply reader",
        f"only TcpTableError raised; buffer <= {MAX_REPLY_LINE - 1} bytes",
    )

    @_fuzz_settings()
    @given(stream=tcp_reply_streams, cuts=_cuts, eof=st.booleans())
    def check(stream: bytes, cuts: list[int], eof: bool) -> None:
        def body() -> None:
            events = read_tcp_lines(_chunks(stream, cuts), eof=eof)
            assert events == reference_tcp_client(stream, eof=eof)
            _check_tcp_outcomes(events)

        tally.run(body)

    try:
        check()
    finally:
        tally.record(reliability)


def test_requests_and_replies_round_trip(reliability: ReliabilityReport) -> None:
    """Encoder output read back by the other side's decoder, in random chunks."""
    tally = Tally("round trip: requests and replies, both protocols", "0 mismatches")

    @_fuzz_settings()
    @given(
        requests=st.lists(st.tuples(_names, _keys), max_size=8),
        outcomes=st.lists(_outcomes, max_size=8),
        cuts=_cuts,
    )
    def check(requests: list[tuple[str, bytes]], outcomes: list[Outcome], cuts: list[int]) -> None:
        def body() -> None:
            _check_round_trip(requests, outcomes, cuts)

        tally.run(body)

    try:
        check()
    finally:
        tally.record(reliability)


def _check_round_trip(
    requests: list[tuple[str, bytes]], outcomes: list[Outcome], cuts: list[int]
) -> None:
    wire = b"".join(encode_request(name, key) for name, key in requests)
    assert serve_socketmap(_chunks(wire, cuts), eof=True) == [
        *(("request", name, key) for name, key in requests),
        ("closed", False),
    ]
    lines = b"".join(encode_tcp_request(key) for _, key in requests)
    assert serve_tcp(_chunks(lines, cuts), eof=True) == [
        *(("get", key) for _, key in requests),
        ("closed", False),
    ]
    replies = b"".join(encode_reply(outcome) for outcome in outcomes)
    payloads = read_netstrings(_chunks(replies, cuts), eof=False)
    assert [type(parse_socketmap_reply(p[1])) for p in payloads if isinstance(p[1], bytes)] == [
        _socketmap_round_trip_type(outcome) for outcome in outcomes
    ]
    tcp_replies = b"".join(encode_tcp_reply(outcome) for outcome in outcomes)
    tcp_lines = read_tcp_lines(_chunks(tcp_replies, cuts), eof=False)
    assert [type(parse_tcp_reply_line(p[1])[0]) for p in tcp_lines if isinstance(p[1], bytes)] == [
        _tcp_round_trip_type(outcome) for outcome in outcomes
    ]


def _socketmap_round_trip_type(outcome: Outcome) -> type:
    if isinstance(outcome, Found):
        # SM-11: the value is a C string; G-6: it must be UTF-8.
        return _reference_socketmap_outcome(b"OK " + outcome.value)
    return type(outcome)


def _tcp_round_trip_type(outcome: Outcome) -> type:
    if isinstance(outcome, Found):
        return _reference_socketmap_outcome(b"OK " + outcome.value)
    # TCP-6 bridge note: tcp_table has no configuration-error code.
    return NotFound if isinstance(outcome, NotFound) else Retry


# ------------------------------------------------------ stateful fuzzers


class _ConversationMachine(RuleBasedStateMachine):
    """One connection: pieces are queued, delivered in random chunks, maybe closed.

    After every step the events seen so far must equal the reference
    reader's for the bytes delivered so far: the server loop drains after
    every chunk, so the codec is never allowed to be "behind".
    """

    #: Set by the test to count this machine's runs and failures.
    tally: Tally | None = None

    def __init__(self) -> None:
        super().__init__()
        self.pending = b""
        self.delivered = b""
        self.eof = False
        if self.tally is not None:
            self.tally.inputs += 1

    def _guarded(self, check: Callable[[], None]) -> None:
        """Run a step or invariant, counting what fails in the tally."""
        try:
            check()
        except AssertionError:
            if self.tally is not None:
                self.tally.wrong += 1
            raise
        except Exception:
            if self.tally is not None:
                self.tally.crashes += 1
            raise

    def _feed(self, chunk: bytes) -> None:
        raise NotImplementedError

    def _events(self) -> list[Event]:
        raise NotImplementedError

    def _reference(self) -> list[Event]:
        raise NotImplementedError

    def _buffered(self) -> tuple[int, int]:
        raise NotImplementedError

    @precondition(lambda self: not self.eof and self.pending)
    @rule(size=st.integers(min_value=1, max_value=64))
    def deliver(self, size: int) -> None:
        chunk, self.pending = self.pending[:size], self.pending[size:]
        self.delivered += chunk
        self._guarded(lambda: self._feed(chunk))

    @precondition(lambda self: not self.eof)
    @rule()
    def close(self) -> None:
        rest, self.pending = self.pending, b""
        self.delivered += rest
        self.eof = True
        self._guarded(lambda: self._feed(rest) if rest else None)
        self._guarded(lambda: self._feed(b""))

    @precondition(lambda self: self.eof)
    @rule()
    def poll_after_close(self) -> None:
        def check() -> None:
            self._poll_again()

        self._guarded(check)

    def _poll_again(self) -> None:
        """After the close, next_event() must keep answering ConnectionClosed."""
        raise NotImplementedError

    @invariant()
    def events_match_reference(self) -> None:
        def check() -> None:
            assert self._events() == self._reference()

        self._guarded(check)

    @invariant()
    def buffer_is_bounded(self) -> None:
        def check() -> None:
            held, bound = self._buffered()
            assert held <= bound

        self._guarded(check)


class SocketmapConversation(_ConversationMachine):
    driver: SocketmapDriver

    @initialize(limit=_socketmap_limits)
    def open_connection(self, limit: int) -> None:
        self.driver = SocketmapDriver(limit)

    @precondition(lambda self: not self.eof)
    @rule(name=_names, key=_keys)
    def queue_request(self, name: str, key: bytes) -> None:
        self.pending += encode_request(name, key)

    @precondition(lambda self: not self.eof)
    @rule(piece=_socketmap_pieces)
    def queue_piece(self, piece: bytes) -> None:
        self.pending += piece

    def _feed(self, chunk: bytes) -> None:
        self.driver.feed(chunk)

    def _events(self) -> list[Event]:
        return self.driver.events

    def _reference(self) -> list[Event]:
        return reference_socketmap_server(
            self.delivered, eof=self.eof, max_payload=self.driver.max_payload
        )

    def _buffered(self) -> tuple[int, int]:
        return self.driver.protocol.buffered_byte_count, self.driver.buffer_bound

    def _poll_again(self) -> None:
        assert self.driver.events[-1][0] == "closed"
        assert isinstance(self.driver.protocol.next_event(), ConnectionClosed)


class TcpConversation(_ConversationMachine):
    driver: TcpDriver

    @initialize(limit=_tcp_limits)
    def open_connection(self, limit: int) -> None:
        self.driver = TcpDriver(limit)

    @precondition(lambda self: not self.eof)
    @rule(key=_keys)
    def queue_request(self, key: bytes) -> None:
        self.pending += encode_tcp_request(key)

    @precondition(lambda self: not self.eof)
    @rule(piece=_tcp_pieces)
    def queue_piece(self, piece: bytes) -> None:
        self.pending += piece

    def _feed(self, chunk: bytes) -> None:
        self.driver.feed(chunk)

    def _events(self) -> list[Event]:
        return self.driver.events

    def _reference(self) -> list[Event]:
        return reference_tcp_server(self.delivered, eof=self.eof, max_line=self.driver.max_line)

    def _buffered(self) -> tuple[int, int]:
        return self.driver.protocol.buffered_byte_count, self.driver.buffer_bound

    def _poll_again(self) -> None:
        assert self.driver.events[-1][0] == "closed"
        assert isinstance(self.driver.protocol.next_event(), ConnectionClosed)


@pytest.mark.parametrize(
    ("machine", "protocol"),
    [(SocketmapConversation, "socketmap"), (TcpConversation, "tcp_table")],
)
def test_conversations_match_reference(
    machine: type[_ConversationMachine], protocol: str, reliability: ReliabilityReport
) -> None:
    tally = Tally(
        f"stateful conversations (<= {STATEFUL_STEPS} steps): {protocol} server",
        "0 crashes; events equal the reference after every step",
    )
    counted = type(f"Counted{machine.__name__}", (machine,), {"tally": tally})
    try:
        run_state_machine_as_test(counted, settings=_fuzz_settings(STATEFUL_SHARE))
    finally:
        tally.record(reliability)
