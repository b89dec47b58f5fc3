"""socketmap requests and replies: SM-7 .. SM-11 and spec vectors 12.1 / 12.2."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.outcome import NOT_FOUND, ConfigFailure, Found, Outcome, Retry
from bridge.protocol.netstring import (
    NEED_DATA,
    NetstringDecoder,
    NetstringError,
    encode_netstring,
)
from bridge.protocol.socketmap import (
    MAX_REASON_LENGTH,
    MAX_REPLY_PAYLOAD,
    MAX_REQUEST_PAYLOAD,
    BadRequest,
    ConnectionClosed,
    LookupRequest,
    SocketmapServerProtocol,
    clean_reason,
    encode_reply,
    encode_request,
    parse_socketmap_reply,
)

ServerEvent = LookupRequest | BadRequest | ConnectionClosed


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets into non-empty chunks (b"" would mean EOF)."""
    points = sorted({0, len(data), *(min(cut, len(data)) for cut in cuts)})
    return [data[start:end] for start, end in itertools.pairwise(points) if start < end]


def drain(server: SocketmapServerProtocol) -> list[ServerEvent]:
    """Collect events up to NEED_DATA, or up to and including ConnectionClosed."""
    events: list[ServerEvent] = []
    while True:
        event = server.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events


def serve(*chunks: bytes) -> list[ServerEvent]:
    server = SocketmapServerProtocol()
    events: list[ServerEvent] = []
    for chunk in chunks:
        server.receive_data(chunk)
        events += drain(server)
    return events


def client_reads(wire: bytes, *, eof: bool = False) -> Outcome | str:
    """What the bridge's socketmap client gets from ``wire``: an outcome or a framing error."""
    decoder = NetstringDecoder(MAX_REPLY_PAYLOAD)
    decoder.receive_data(wire)
    if eof:
        decoder.receive_data(b"")
    try:
        payload = decoder.next_payload()
    except NetstringError as exc:
        return exc.kind
    if payload is NEED_DATA:
        return "need data"
    return parse_socketmap_reply(payload)


# ---------------------------------------------------------------- 12.1 ------

# Spec 12.1: socketmap request bytes (and the SM-8 examples).
REQUEST_VECTORS = [
    ("mymap", b"k", b"7:mymap k,"),
    ("mymap", b"", b"6:mymap ,"),
    ("mymap", b"Foo Bar", b"13:mymap Foo Bar,"),
    ("users", b"a@b", b"9:users a@b,"),
]


@pytest.mark.parametrize(("name", "key", "wire"), REQUEST_VECTORS)
def test_request_vectors_encode(name: str, key: bytes, wire: bytes) -> None:
    assert encode_request(name, key) == wire


@pytest.mark.parametrize(("name", "key", "wire"), REQUEST_VECTORS)
def test_request_vectors_decode(name: str, key: bytes, wire: bytes) -> None:
    assert serve(wire, b"") == [LookupRequest(name, key), ConnectionClosed()]


@pytest.mark.parametrize("name", ["", "my map", "caf\u00e9"])
def test_encode_request_refuses_names_the_server_could_not_split(name: str) -> None:
    with pytest.raises(ValueError, match="socketmap name"):
        encode_request(name, b"k")


# ---------------------------------------------------------------- 12.2 ------

# Spec 12.2: reply bytes -> outcome, client side (3.12 semantics). Framing
# errors appear as the NetstringError kind; the client turns them into
# Retry (SM-16), and "eof" into its one reconnect (SM-15). The rows about
# reconnecting, refused connections and 10001-byte keys are connection
# handling, tested with the client.
REPLY_VECTORS: list[tuple[bytes, bool, Outcome | type | str]] = [
    (b"8:OK hello,", False, Found(b"hello")),
    (b"5:OK  x,", False, Found(b" x")),
    (b"3:OK ,", False, Found(b"")),
    (b"2:OK,", False, Found(b"")),
    (b"004:OK x,", False, Found(b"x")),
    (b"8:OK a\tb\nc,", False, Found(b"a\tb\nc")),
    (b"6:OK a\x00b,", False, Found(b"a")),
    (b"4:OK \xff,", False, ConfigFailure),
    (b"8:NOTFOUND,", False, NOT_FOUND),
    (b"9:NOTFOUND ,", False, NOT_FOUND),
    (b"10:NOTFOUND x,", False, NOT_FOUND),
    (b"9:TEMP oops,", False, Retry("oops")),
    (b"12:TIMEOUT slow,", False, Retry("slow", timeout=True)),
    (b"8:PERM bad,", False, ConfigFailure("bad")),
    (b"4:PERM,", False, ConfigFailure("")),
    (b"4:ok x,", False, Retry),
    (b":,", False, Retry),
    (b"0:,", False, Retry),
    (b"+4:OK x,", False, "format"),
    (b" 4:OK x,", False, "format"),
    (b"4:OK x;", False, "format"),
    (b"3:OK x,", False, "format"),
    (b"4:OK x", False, "need data"),
    (b"100000:OK " + 99_997 * b"x" + b",", False, Found(99_997 * b"x")),
    (b"100001:", False, "size"),
    (b"4:OK", True, "eof"),
]


@pytest.mark.parametrize(("wire", "eof", "expected"), REPLY_VECTORS)
def test_reply_vectors(wire: bytes, eof: bool, expected: Outcome | type | str) -> None:
    got = client_reads(wire, eof=eof)
    if isinstance(expected, type):
        assert isinstance(got, expected)
    else:
        assert got == expected


def test_unknown_status_reason_names_the_reply() -> None:
    outcome = parse_socketmap_reply(b"FOUND x")
    assert isinstance(outcome, Retry)
    assert "FOUND x" in outcome.reason


def test_reply_reasons_are_cleaned_up() -> None:
    # SM-10: leading whitespace dropped, non-printables replaced, 200 bytes at most.
    assert parse_socketmap_reply(b"TEMP  \tdisk\x00full\xff") == Retry("disk?full?")
    long_reason = parse_socketmap_reply(b"PERM " + b"y" * 500)
    assert long_reason == ConfigFailure("y" * MAX_REASON_LENGTH)


def test_utf8_check_can_be_switched_off() -> None:
    assert parse_socketmap_reply(b"OK \xff", check_utf8=False) == Found(b"\xff")


# ------------------------------------------------------ reply encoding ------


# SM-9 bridge note: canonical replies; "OK" always has its space (section 0).
@pytest.mark.parametrize(
    ("outcome", "wire"),
    [
        (Found(b"hello"), b"8:OK hello,"),
        (Found(b""), b"3:OK ,"),
        (Found(b" x"), b"5:OK  x,"),
        (Found(b"a\tb\nc"), b"8:OK a\tb\nc,"),
        (NOT_FOUND, b"9:NOTFOUND ,"),
        (Retry("oops"), b"9:TEMP oops,"),
        (Retry(""), b"5:TEMP ,"),
        (Retry("slow", timeout=True), b"12:TIMEOUT slow,"),
        (ConfigFailure("bad"), b"8:PERM bad,"),
        (Retry("  caf\u00e9\n"), b"10:TEMP caf??,"),
    ],
)
def test_encode_reply(outcome: Outcome, wire: bytes) -> None:
    assert encode_reply(outcome) == wire


def test_reason_is_truncated_to_200_bytes() -> None:
    wire = encode_reply(ConfigFailure("z" * 1000))
    assert wire == encode_netstring(b"PERM " + b"z" * 200)


def test_largest_value_fits_exactly() -> None:
    value = b"v" * (MAX_REPLY_PAYLOAD - len(b"OK "))
    wire = encode_reply(Found(value))
    assert client_reads(wire) == Found(value)


def test_oversized_value_becomes_perm_not_an_oversized_netstring() -> None:
    value = b"v" * (MAX_REPLY_PAYLOAD - len(b"OK ") + 1)
    wire = encode_reply(Found(value))
    assert wire == encode_netstring(b"PERM value too long for socketmap reply (99998 bytes)")
    assert isinstance(client_reads(wire), ConfigFailure)


@given(value=st.text().map(lambda text: text.replace("\0", "").encode()))
def test_found_round_trip(value: bytes) -> None:
    if len(value) + 3 <= MAX_REPLY_PAYLOAD:
        assert client_reads(encode_reply(Found(value))) == Found(value)


@given(value=st.binary().map(lambda data: data.replace(b"\0", b"")))
def test_found_round_trip_without_utf8_check(value: bytes) -> None:
    payload = encode_reply(Found(value))[len(b"%d:" % (len(value) + 3)) : -1]
    assert parse_socketmap_reply(payload, check_utf8=False) == Found(value)


@given(reason=st.text(max_size=300), timeout=st.booleans())
def test_failure_round_trip_keeps_the_class(reason: str, timeout: bool) -> None:
    assert client_reads(encode_reply(Retry(reason, timeout))) == Retry(
        clean_reason(reason), timeout
    )
    assert client_reads(encode_reply(ConfigFailure(reason))) == ConfigFailure(clean_reason(reason))


@given(text=st.text() | st.binary())
def test_clean_reason_is_short_printable_ascii(text: str | bytes) -> None:
    cleaned = clean_reason(text)
    assert len(cleaned) <= MAX_REASON_LENGTH
    assert all(" " <= char <= "~" for char in cleaned)
    assert not cleaned.startswith((" ", "\t"))


# -------------------------------------------------------- server side ------

PIPELINE = b"".join(
    [
        encode_request("mymap", b"k"),
        encode_netstring(b"nospace"),
        encode_request("users", b"a@b c"),
        encode_netstring(b" orphan-key"),
        encode_request("mymap", b""),
        encode_netstring(b"caf\xc3\xa9 k"),
        encode_request("x", b"  lead"),
    ]
)
PIPELINE_EVENTS: list[ServerEvent] = [
    LookupRequest("mymap", b"k"),
    BadRequest("socketmap request 'nospace' has no space after the map name", fatal=False),
    LookupRequest("users", b"a@b c"),
    BadRequest("socketmap request has an empty map name", fatal=False),
    LookupRequest("mymap", b""),
    BadRequest("socketmap map name 'caf??' is not ASCII", fatal=False),
    LookupRequest("x", b"  lead"),
    ConnectionClosed(mid_frame=False),
]


@pytest.mark.parametrize("split", range(1, len(PIPELINE)))
def test_pipeline_split_at_every_point(split: int) -> None:
    assert serve(PIPELINE[:split], PIPELINE[split:], b"") == PIPELINE_EVENTS


def test_pipeline_byte_by_byte() -> None:
    assert serve(*(bytes([byte]) for byte in PIPELINE), b"") == PIPELINE_EVENTS


def test_requests_for_different_names_share_a_connection() -> None:
    # SM-2: one connection carries every map name.
    events = serve(encode_request("a", b"1") + encode_request("b", b"2"))
    assert events == [LookupRequest("a", b"1"), LookupRequest("b", b"2")]


@pytest.mark.parametrize(
    "wire",
    [b"+4:OK x,", b" 4:OK x,", b"-1:", b"12a:", b"4:OK x;", b"999999999:", b"1x"],
)
def test_broken_framing_is_fatal(wire: bytes) -> None:
    server = SocketmapServerProtocol()
    server.receive_data(encode_request("m", b"before") + wire)
    events = drain(server)
    assert events[0] == LookupRequest("m", b"before")
    assert isinstance(events[1], BadRequest)
    assert events[1].fatal
    assert events[1].reason.startswith("malformed socketmap request")
    assert events[2:] == [ConnectionClosed()]
    # Dead for good: later requests are ignored.
    server.receive_data(encode_request("m", b"after"))
    assert server.next_event() == ConnectionClosed()
    assert server.buffered_byte_count == 0


def test_fatal_reason_makes_a_valid_perm_reply() -> None:
    bad = serve(b"999999999:")[0]
    assert isinstance(bad, BadRequest)
    outcome = client_reads(encode_reply(ConfigFailure(bad.reason)))
    assert isinstance(outcome, ConfigFailure)
    assert "999999999" in outcome.reason


def test_oversized_request_fails_before_its_payload() -> None:
    server = SocketmapServerProtocol()
    server.receive_data(b"%d:" % (MAX_REQUEST_PAYLOAD + 1))
    event = server.next_event()
    assert isinstance(event, BadRequest)
    assert event.fatal
    assert server.buffered_byte_count == 0


def test_largest_request_is_accepted() -> None:
    key = b"k" * (MAX_REQUEST_PAYLOAD - len(b"m "))
    assert serve(encode_request("m", key)) == [LookupRequest("m", key)]


def test_a_megabyte_of_digits_is_refused_fast() -> None:
    server = SocketmapServerProtocol()
    chunk = b"1" * 65_536
    server.receive_data(chunk)
    event = server.next_event()
    assert isinstance(event, BadRequest)
    assert event.fatal
    for _ in range(15):
        server.receive_data(chunk)
        assert server.next_event() == ConnectionClosed()
        assert server.buffered_byte_count == 0


@pytest.mark.parametrize(
    ("tail", "mid_frame"),
    [
        (b"", False),
        (b"7", True),
        (b"7:", True),
        (b"7:mymap", True),
        (b"7:mymap k", True),
        (b"x", True),
    ],
)
def test_close_drops_a_partial_request(tail: bytes, mid_frame: bool) -> None:
    server = SocketmapServerProtocol()
    server.receive_data(encode_request("m", b"k") + tail)
    server.receive_data(b"")
    events = drain(server)
    assert events == [LookupRequest("m", b"k"), ConnectionClosed(mid_frame=mid_frame)]


def test_closed_stays_closed() -> None:
    server = SocketmapServerProtocol()
    server.receive_data(b"")
    assert server.next_event() == ConnectionClosed()
    assert server.next_event() == ConnectionClosed()
    with pytest.raises(RuntimeError):
        server.receive_data(b"1:x,")


def test_waits_for_the_rest_of_a_request() -> None:
    server = SocketmapServerProtocol()
    server.receive_data(b"7:mymap")
    assert server.next_event() is NEED_DATA
    server.receive_data(b" k,")
    assert server.next_event() == LookupRequest("mymap", b"k")
    assert server.next_event() is NEED_DATA


name_text = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20
)


@given(
    requests=st.lists(st.tuples(name_text, st.binary(max_size=200)), max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=1500), max_size=10),
)
def test_request_round_trip_in_any_chunks(
    requests: list[tuple[str, bytes]], cuts: list[int]
) -> None:
    wire = b"".join(encode_request(name, key) for name, key in requests)
    events = serve(*split_at(wire, cuts), b"")
    assert events == [LookupRequest(name, key) for name, key in requests] + [ConnectionClosed()]


@given(
    data=st.binary(max_size=400)
    | st.lists(st.sampled_from([b"1", b"0", b":", b",", b" ", b"m", b"\xff"])).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    eof=st.booleans(),
)
def test_arbitrary_bytes_never_raise(data: bytes, cuts: list[int], eof: bool) -> None:
    max_payload = 16
    server = SocketmapServerProtocol(max_payload)
    events: list[ServerEvent] = []
    for chunk in split_at(data, cuts):
        server.receive_data(chunk)
        events += drain(server)
        assert server.buffered_byte_count <= max_payload + 32
    if eof:
        server.receive_data(b"")
        events += drain(server)
        assert isinstance(events[-1], ConnectionClosed)
    fatal = [event for event in events if isinstance(event, BadRequest) and event.fatal]
    if fatal:
        assert events[-1] == ConnectionClosed()
    for event in events:
        if isinstance(event, BadRequest):
            # Every bad request must be answerable with a well-formed reply.
            assert isinstance(
                client_reads(encode_reply(ConfigFailure(event.reason))), ConfigFailure
            )
