"""tcp_table requests and replies: TCP-1 .. TCP-8 and spec vectors 12.3 / 12.4."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.outcome import NOT_FOUND, ConfigFailure, Found, Outcome, Retry
from bridge.protocol.events import NEED_DATA
from bridge.protocol.tcptable import (
    MAX_REPLY_LINE,
    MAX_REQUEST_LINE,
    BadRequest,
    ConnectionClosed,
    LookupRequest,
    TcpReplyDecoder,
    TcpTableError,
    TcpTableServerProtocol,
    encode_bad_request,
    encode_reply,
    encode_tcp_request,
    parse_tcp_reply_line,
    quote,
    quote_value,
    unquote,
)

ServerEvent = LookupRequest | BadRequest | ConnectionClosed


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets into non-empty chunks (b"" would mean EOF)."""
    points = sorted({0, len(data), *(min(cut, len(data)) for cut in cuts)})
    return [data[start:end] for start, end in itertools.pairwise(points) if start < end]


def drain(server: TcpTableServerProtocol) -> list[ServerEvent]:
    """Collect events up to NEED_DATA, or up to and including ConnectionClosed."""
    events: list[ServerEvent] = []
    while True:
        event = server.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events


def serve(*chunks: bytes, max_line: int = MAX_REQUEST_LINE) -> list[ServerEvent]:
    server = TcpTableServerProtocol(max_line)
    events: list[ServerEvent] = []
    for chunk in chunks:
        server.receive_data(chunk)
        events += drain(server)
    return events


def drain_lines(decoder: TcpReplyDecoder) -> list[bytes]:
    lines: list[bytes] = []
    while True:
        line = decoder.next_line()
        if line is NEED_DATA:
            return lines
        lines.append(line)


# ---------------------------------------------------------- 12.3 / TCP-2 ---

# Spec 12.3 (request bytes), plus the TCP-2 quoting table.
REQUEST_VECTORS = [
    (b"Foo Bar", b"get Foo%20Bar\n"),
    (b"", b"get \n"),
    (
        b"a b%c\td\x01e\x7ff~g+h/i:j@k\"l'm\\n",
        b"get a%20b%25c%09d%01e%7Ff~g+h/i:j@k\"l'm\\n\n",
    ),
    ("caf\u00e9".encode(), b"get caf%C3%A9\n"),
    (b"x\ry", b"get x%0Dy\n"),
    (b"100%", b"get 100%25\n"),
    (b"a\tb", b"get a%09b\n"),
    (b"\x01\x7f", b"get %01%7F\n"),
    (b"~g+h/i:j@k\"l'm\\n", b"get ~g+h/i:j@k\"l'm\\n\n"),
]


@pytest.mark.parametrize(("key", "line"), REQUEST_VECTORS)
def test_request_vectors_encode(key: bytes, line: bytes) -> None:
    assert encode_tcp_request(key) == line


@pytest.mark.parametrize(("key", "line"), REQUEST_VECTORS)
def test_request_vectors_decode(key: bytes, line: bytes) -> None:
    assert serve(line, b"") == [LookupRequest(None, key), ConnectionClosed()]


def test_unquote_accepts_either_hex_case() -> None:
    # TCP-3 bridge note: other clients may send lower-case hex.
    assert unquote(b"caf%c3%a9%2f%2F") == "caf\u00e9//".encode()


@pytest.mark.parametrize("quoted", [b"%zz", b"%4", b"100%", b"%", b"a%g0", b"%%41"])
def test_unquote_rejects_bad_escapes(quoted: bytes) -> None:
    with pytest.raises(TcpTableError, match="two hex digits"):
        unquote(quoted)


@given(data=st.binary())
def test_quote_round_trip(data: bytes) -> None:
    quoted = quote(data)
    assert all(0x21 <= byte <= 0x7E for byte in quoted)
    assert unquote(quoted) == data


@given(data=st.binary())
def test_value_quote_round_trip(data: bytes) -> None:
    quoted = quote_value(data)
    assert not any(byte < 0x20 or byte == 0x7F for byte in quoted)
    assert unquote(quoted) == data


# ---------------------------------------------------------------- 12.4 -----

# Spec 12.4: reply line -> (outcome, connection kept). The line is given
# without its LF, as TcpReplyDecoder hands it out. Rows about line length,
# closes and reconnects are in the decoder tests below or the client's.
REPLY_VECTORS: list[tuple[bytes, Outcome | type, bool]] = [
    (b"200 hello", Found(b"hello"), True),
    (b"200 a%20b%2fc%2Fd", Found(b"a b/c/d"), True),
    (b"200 ", Found(b""), True),
    (b"200\thello", Found(b"hello"), True),
    (b"299 x", Found(b"x"), True),
    (b"250 x", Found(b"x"), True),
    (b"200 a b", Found(b"a b"), True),
    (b"200 x\r", Found(b"x\r"), True),
    (b"200 a%00b", Found(b"a"), True),
    (b"200 %FF", ConfigFailure, True),
    (b"200", Retry, False),
    (b"200 %zz", Retry, False),
    (b"200 %4", Retry, False),
    (b"200 100%", Retry, False),
    (b"500 nope", NOT_FOUND, True),
    (b"550 x", NOT_FOUND, True),
    (b"500", Retry, False),
    (b"5xx x", Retry, False),
    (b"20 x", Retry, False),
    (b"abc", Retry, False),
    (b"400 later", Retry("later"), False),
    (b"100 x", Retry, False),
    (b"300 x", Retry, False),
    (b"600 x", Retry, False),
    (b"200 " + 4091 * b"x", Found(4091 * b"x"), True),
]


@pytest.mark.parametrize(("line", "expected", "keep"), REPLY_VECTORS)
def test_reply_vectors(line: bytes, expected: Outcome | type, keep: bool) -> None:
    outcome, keep_connection = parse_tcp_reply_line(line)
    if isinstance(expected, type):
        assert isinstance(outcome, expected)
    else:
        assert outcome == expected
    assert keep_connection is keep


@pytest.mark.parametrize("separator", [b" ", b"\t", b"\v", b"\f", b"\r"])
def test_any_whitespace_separates_status_and_text(separator: bytes) -> None:
    # TCP-5: byte 3 may be SP, HT, VT, FF or CR.
    assert parse_tcp_reply_line(b"200" + separator + b"v") == (Found(b"v"), True)


def test_non_ascii_digits_are_malformed() -> None:
    outcome, keep = parse_tcp_reply_line("2\u0663\u0660 x".encode())
    assert isinstance(outcome, Retry)
    assert not keep


def test_utf8_check_can_be_switched_off() -> None:
    assert parse_tcp_reply_line(b"200 %FF", check_utf8=False) == (Found(b"\xff"), True)


def test_reply_line_of_4095_bytes_is_read() -> None:
    # 12.4: 4095 content bytes + LF is accepted.
    decoder = TcpReplyDecoder()
    decoder.receive_data(b"200 " + 4091 * b"x" + b"\n")
    assert drain_lines(decoder) == [b"200 " + 4091 * b"x"]
    assert decoder.buffered_byte_count == 0


def test_reply_line_of_4096_bytes_fails_the_attempt() -> None:
    # 12.4 / TCP-4: 4096 content bytes + LF is "too long" (attempt fails, TCP-10).
    decoder = TcpReplyDecoder()
    decoder.receive_data(b"200 " + 4092 * b"x" + b"\n")
    with pytest.raises(TcpTableError, match="longer than 4095"):
        decoder.next_line()
    decoder.receive_data(b"200 x\n")
    with pytest.raises(TcpTableError, match="longer than 4095"):
        decoder.next_line()
    assert decoder.buffered_byte_count == 0


@pytest.mark.parametrize(
    ("wire", "message"),
    [(b"", "connection closed$"), (b"200 hel", "middle of a tcp_table reply")],
)
def test_close_before_lf_fails_the_attempt(wire: bytes, message: str) -> None:
    # TCP-10: a reply that ends before its LF is a failed attempt.
    decoder = TcpReplyDecoder()
    decoder.receive_data(wire)
    decoder.receive_data(b"")
    with pytest.raises(TcpTableError, match=message):
        decoder.next_line()


def test_reply_decoder_data_after_eof_is_a_caller_bug() -> None:
    decoder = TcpReplyDecoder()
    decoder.receive_data(b"")
    with pytest.raises(RuntimeError):
        decoder.receive_data(b"200 x\n")


REPLIES = b"500 nope\n200 a%20b\n200 x\r\n400 later\n"


@pytest.mark.parametrize("split", range(1, len(REPLIES)))
def test_reply_decoder_split_at_every_point(split: int) -> None:
    decoder = TcpReplyDecoder()
    decoder.receive_data(REPLIES[:split])
    lines = drain_lines(decoder)
    decoder.receive_data(REPLIES[split:])
    lines += drain_lines(decoder)
    assert lines == [b"500 nope", b"200 a%20b", b"200 x\r", b"400 later"]


@given(
    data=st.binary(max_size=9000)
    | st.lists(st.sampled_from([b"200 ", b"x" * 1000, b"\n", b"%"])).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=9000), max_size=12),
    eof=st.booleans(),
)
def test_reply_decoder_raises_only_its_own_error(data: bytes, cuts: list[int], eof: bool) -> None:
    decoder = TcpReplyDecoder()
    try:
        for chunk in split_at(data, cuts):
            decoder.receive_data(chunk)
            for line in drain_lines(decoder):
                assert b"\n" not in line
                assert len(line) < MAX_REPLY_LINE
                parse_tcp_reply_line(line)
            assert decoder.buffered_byte_count < MAX_REPLY_LINE
        if eof:
            decoder.receive_data(b"")
            drain_lines(decoder)
    except TcpTableError:
        pass


# ------------------------------------------------------ reply encoding ------


# TCP-6 bridge note and TCP-8: 200 value / 500 / 400 reason, minimal quoting.
@pytest.mark.parametrize(
    ("outcome", "line"),
    [
        (Found(b"hello"), b"200 hello\n"),
        (Found(b""), b"200 \n"),
        (Found(b"a b"), b"200 a b\n"),
        (Found(b" lead"), b"200  lead\n"),
        (Found(b"100%\r\n\t\x00\x7f"), b"200 100%25%0D%0A%09%00%7F\n"),
        (Found("caf\u00e9".encode()), "200 caf\u00e9\n".encode()),
        (NOT_FOUND, b"500 not found\n"),
        (Retry("later"), b"400 later\n"),
        (Retry("slow", timeout=True), b"400 slow\n"),
        (ConfigFailure("bad config"), b"400 bad config\n"),
        (Retry("100% broken\n"), b"400 100%25 broken?\n"),
    ],
)
def test_encode_reply(outcome: Outcome, line: bytes) -> None:
    assert encode_reply(outcome) == line


def test_longest_value_fits_the_line() -> None:
    value = b"x" * (MAX_REPLY_LINE - len(b"200 \n"))
    line = encode_reply(Found(value))
    assert len(line) == MAX_REPLY_LINE
    assert parse_tcp_reply_line(line[:-1]) == (Found(value), True)


@pytest.mark.parametrize(
    "value",
    [b"x" * (MAX_REPLY_LINE - len(b"200 \n") + 1), b"\x01" * 1400, b"y" * 200_000],
)
def test_oversized_value_becomes_400(value: bytes) -> None:
    line = encode_reply(Found(value))
    assert line == b"400 value too long for tcp_table reply (%d bytes)\n" % len(value)
    assert parse_tcp_reply_line(line[:-1]) == (
        Retry(f"value too long for tcp_table reply ({len(value)} bytes)"),
        False,
    )


@given(value=st.text(max_size=1300).map(lambda text: text.replace("\0", "").encode()))
def test_found_round_trip(value: bytes) -> None:
    line = encode_reply(Found(value))
    assert len(line) <= MAX_REPLY_LINE
    if line.startswith(b"200 "):
        assert parse_tcp_reply_line(line[:-1]) == (Found(value), True)
    else:
        assert len(quote_value(value)) > MAX_REPLY_LINE - len(b"200 \n")


@given(value=st.binary(max_size=1300).map(lambda data: data.replace(b"\0", b"")))
def test_found_round_trip_without_utf8_check(value: bytes) -> None:
    line = encode_reply(Found(value))
    assert line.count(b"\n") == 1
    if line.startswith(b"200 "):
        assert parse_tcp_reply_line(line[:-1], check_utf8=False) == (Found(value), True)


@given(reason=st.text(max_size=500), timeout=st.booleans())
def test_failures_always_fit_and_parse_as_retry(reason: str, timeout: bool) -> None:
    for outcome in (Retry(reason, timeout), ConfigFailure(reason)):
        line = encode_reply(outcome)
        assert len(line) <= MAX_REPLY_LINE
        parsed, keep = parse_tcp_reply_line(line[:-1])
        assert isinstance(parsed, Retry)
        assert not keep


# --------------------------------------------------------- server side -----

PIPELINE = b"get a\nget Foo%20Bar\r\nput k v\nget 100%\n\nGET x\nget \nget caf%c3%a9\n"
PIPELINE_EVENTS: list[ServerEvent] = [
    LookupRequest(None, b"a"),
    LookupRequest(None, b"Foo Bar"),
    BadRequest("unsupported request 'put': only 'get' is served", fatal=False, temporary=False),
    BadRequest(
        "malformed key in get request: '%' not followed by two hex digits at offset 3: '%'",
        fatal=False,
        temporary=True,
    ),
    BadRequest("unsupported request '': only 'get' is served", fatal=False, temporary=False),
    BadRequest("unsupported request 'GET': only 'get' is served", fatal=False, temporary=False),
    LookupRequest(None, b""),
    LookupRequest(None, "caf\u00e9".encode()),
    ConnectionClosed(),
]


@pytest.mark.parametrize("split", range(1, len(PIPELINE)))
def test_pipeline_split_at_every_point(split: int) -> None:
    assert serve(PIPELINE[:split], PIPELINE[split:], b"") == PIPELINE_EVENTS


def test_pipeline_byte_by_byte() -> None:
    assert serve(*(bytes([byte]) for byte in PIPELINE), b"") == PIPELINE_EVENTS


@pytest.mark.parametrize(
    ("bad", "line"),
    [
        (
            BadRequest("unsupported request 'put'", fatal=False, temporary=False),
            b"500 unsupported request 'put'\n",
        ),
        (
            BadRequest("malformed key: 100%", fatal=False, temporary=True),
            b"400 malformed key: 100%25\n",
        ),
        (
            BadRequest("request line too long", fatal=True, temporary=True),
            b"400 request line too long\n",
        ),
    ],
)
def test_encode_bad_request(bad: BadRequest, line: bytes) -> None:
    assert encode_bad_request(bad) == line


def test_only_one_cr_is_tolerated() -> None:
    assert serve(b"get a\r\r\n") == [LookupRequest(None, b"a\r")]


def test_line_at_the_limit_is_read_and_one_more_byte_is_fatal() -> None:
    limit = 16
    assert serve(b"get " + b"x" * 11 + b"\n", max_line=limit) == [LookupRequest(None, b"x" * 11)]
    events = serve(b"get " + b"x" * 12 + b"\nget y\n", max_line=limit)
    assert events == [
        BadRequest("request line longer than 16 bytes", fatal=True, temporary=True),
        ConnectionClosed(),
    ]


def test_a_megabyte_line_is_refused_with_a_bounded_buffer() -> None:
    server = TcpTableServerProtocol()
    chunk = b"get " + b"x" * 65_532
    fed = 0
    while True:
        server.receive_data(chunk)
        fed += len(chunk)
        assert server.buffered_byte_count <= MAX_REQUEST_LINE + len(chunk)
        event = server.next_event()
        if event is not NEED_DATA:
            break
    assert isinstance(event, BadRequest)
    assert event.fatal
    assert fed < MAX_REQUEST_LINE + len(chunk)
    assert server.buffered_byte_count == 0
    for _ in range(16):
        server.receive_data(chunk)
        assert server.next_event() == ConnectionClosed()
        assert server.buffered_byte_count == 0


@pytest.mark.parametrize(("tail", "mid_frame"), [(b"", False), (b"get", True), (b"x\r", True)])
def test_close_drops_an_unterminated_line(tail: bytes, mid_frame: bool) -> None:
    server = TcpTableServerProtocol()
    server.receive_data(b"get k\n" + tail)
    server.receive_data(b"")
    assert drain(server) == [LookupRequest(None, b"k"), ConnectionClosed(mid_frame=mid_frame)]
    assert server.next_event() == ConnectionClosed(mid_frame=mid_frame)
    with pytest.raises(RuntimeError):
        server.receive_data(b"get k\n")


def test_waits_for_the_end_of_the_line() -> None:
    server = TcpTableServerProtocol()
    server.receive_data(b"get Foo%2")
    assert server.next_event() is NEED_DATA
    server.receive_data(b"0Bar\n")
    assert server.next_event() == LookupRequest(None, b"Foo Bar")
    assert server.next_event() is NEED_DATA


@given(
    keys=st.lists(st.binary(max_size=100), max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
)
def test_request_round_trip_in_any_chunks(keys: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(encode_tcp_request(key) for key in keys)
    events = serve(*split_at(wire, cuts), b"")
    assert events == [LookupRequest(None, key) for key in keys] + [ConnectionClosed()]


@given(
    data=st.binary(max_size=400)
    | st.lists(st.sampled_from([b"get ", b"%", b"4", b"\r", b"\n", b"x"])).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    eof=st.booleans(),
)
def test_arbitrary_bytes_never_raise(data: bytes, cuts: list[int], eof: bool) -> None:
    max_line = 24
    server = TcpTableServerProtocol(max_line)
    events: list[ServerEvent] = []
    for chunk in split_at(data, cuts):
        server.receive_data(chunk)
        events += drain(server)
        assert server.buffered_byte_count < max_line
    if eof:
        server.receive_data(b"")
        events += drain(server)
        assert isinstance(events[-1], ConnectionClosed)
    for event in events:
        if isinstance(event, BadRequest):
            reply = encode_bad_request(event)
            outcome, keep = parse_tcp_reply_line(reply[:-1])
            # 400 must read as a temporary failure, 500 as a refusal.
            assert isinstance(outcome, Retry) is event.temporary
            assert keep is not event.temporary
