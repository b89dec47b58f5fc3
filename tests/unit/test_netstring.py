"""Netstring framing: SM-4 .. SM-6 and the netstring rows of spec 12.1 / 12.2."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.protocol.netstring import (
    MAX_LENGTH_DIGITS,
    NEED_DATA,
    NetstringDecoder,
    NetstringError,
    encode_netstring,
)

#: Postfix's default reply limit (SM-7); small enough to test at the edge.
LIMIT = 100_000


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets into non-empty chunks (b"" would mean EOF)."""
    points = sorted({0, len(data), *(min(cut, len(data)) for cut in cuts)})
    return [data[start:end] for start, end in itertools.pairwise(points) if start < end]


def drain(decoder: NetstringDecoder) -> list[bytes]:
    payloads: list[bytes] = []
    while True:
        payload = decoder.next_payload()
        if payload is NEED_DATA:
            return payloads
        payloads.append(payload)


def decode_all(data: bytes, *, max_length: int = LIMIT) -> list[bytes]:
    decoder = NetstringDecoder(max_length)
    decoder.receive_data(data)
    return drain(decoder)


def error_kind(data: bytes, *, eof: bool = False, max_length: int = LIMIT) -> str:
    decoder = NetstringDecoder(max_length)
    decoder.receive_data(data)
    if eof:
        decoder.receive_data(b"")
    with pytest.raises(NetstringError) as info:
        drain(decoder)
    return info.value.kind


# Spec 12.1 (request bytes) and SM-5: Postfix writes plain decimal lengths.
@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"mymap k", b"7:mymap k,"),
        (b"mymap ", b"6:mymap ,"),
        (b"mymap Foo Bar", b"13:mymap Foo Bar,"),
        (b"users a@b", b"9:users a@b,"),
        (b"", b"0:,"),
        (b"a,b:c", b"5:a,b:c,"),
    ],
)
def test_encode_matches_postfix(payload: bytes, expected: bytes) -> None:
    assert encode_netstring(payload) == expected
    assert decode_all(expected) == [payload]


# Spec 12.2, the rows whose framing is valid (SM-6: leading zeros, ':,').
@pytest.mark.parametrize(
    ("wire", "payload"),
    [
        (b"8:OK hello,", b"OK hello"),
        (b"5:OK  x,", b"OK  x"),
        (b"3:OK ,", b"OK "),
        (b"2:OK,", b"OK"),
        (b"004:OK x,", b"OK x"),
        (b"8:OK a\tb\nc,", b"OK a\tb\nc"),
        (b"6:OK a\x00b,", b"OK a\x00b"),
        (b":,", b""),
        (b"0:,", b""),
        (b"000:,", b""),
    ],
)
def test_decode_valid_frames(wire: bytes, payload: bytes) -> None:
    assert decode_all(wire) == [payload]


# Spec 12.2, the rows that are framing errors (SM-6 steps 1, 2 and 4).
@pytest.mark.parametrize(
    ("wire", "kind"),
    [
        (b"+4:OK x,", "format"),
        (b" 4:OK x,", "format"),
        (b"-1:", "format"),
        (b"12a:", "format"),
        (b"4:OK x;", "format"),
        (b"3:OK x,", "format"),
        (b"100001:", "size"),
        (b"999999999:", "size"),
        (b"9" * (MAX_LENGTH_DIGITS + 1), "size"),
        (b"0" * (MAX_LENGTH_DIGITS + 1) + b":,", "size"),
    ],
)
def test_decode_errors(wire: bytes, kind: str) -> None:
    assert error_kind(wire) == kind


def test_limit_is_inclusive() -> None:
    # 12.2: a 100000-byte payload is read, 100001 is a size error.
    payload = b"OK " + b"x" * 99_997
    assert decode_all(b"100000:" + payload + b",") == [payload]
    assert error_kind(b"100001:" + payload + b"x,") == "size"


def test_leading_zeros_up_to_the_digit_cap_are_accepted() -> None:
    wire = b"0" * (MAX_LENGTH_DIGITS - 1) + b"4:OK x,"
    assert decode_all(wire) == [b"OK x"]


def test_size_error_comes_before_any_payload() -> None:
    # SM-6 step 2: the limit is checked when ':' arrives, nothing else needed.
    decoder = NetstringDecoder(LIMIT)
    decoder.receive_data(b"999999999:")
    with pytest.raises(NetstringError) as info:
        decoder.next_payload()
    assert info.value.kind == "size"
    assert "999999999" in str(info.value)
    assert decoder.buffered_byte_count == 0


def test_a_megabyte_of_digits_fails_after_the_first_chunk() -> None:
    decoder = NetstringDecoder(LIMIT)
    chunk = b"7" * 4096
    decoder.receive_data(chunk)
    with pytest.raises(NetstringError) as info:
        decoder.next_payload()
    assert info.value.kind == "size"
    for _ in range(255):
        decoder.receive_data(chunk)
        assert decoder.buffered_byte_count == 0


def test_digit_prefix_is_rejected_while_it_trickles_in() -> None:
    decoder = NetstringDecoder(LIMIT)
    for _ in range(MAX_LENGTH_DIGITS):
        decoder.receive_data(b"1")
        assert decoder.next_payload() is NEED_DATA
        assert decoder.buffered_byte_count <= MAX_LENGTH_DIGITS
    decoder.receive_data(b"1")
    with pytest.raises(NetstringError):
        decoder.next_payload()


def test_errors_are_sticky() -> None:
    decoder = NetstringDecoder(LIMIT)
    decoder.receive_data(b"x:")
    with pytest.raises(NetstringError) as first:
        decoder.next_payload()
    decoder.receive_data(b"4:OK x,")
    with pytest.raises(NetstringError) as second:
        decoder.next_payload()
    assert second.value is first.value
    assert decoder.buffered_byte_count == 0


# SM-6: EOF before or inside length/payload is an "eof" error; EOF where
# the ',' belongs is a format error (step 4). 12.2: b"4:OK" then close.
@pytest.mark.parametrize(
    ("wire", "kind", "in_frame"),
    [
        (b"", "eof", False),
        (b"8:OK hello,", "eof", False),
        (b"4", "eof", True),
        (b"4:", "eof", True),
        (b"4:OK", "eof", True),
        (b"4:OK x", "format", True),
    ],
)
def test_eof(wire: bytes, kind: str, in_frame: bool) -> None:
    decoder = NetstringDecoder(LIMIT)
    decoder.receive_data(wire)
    decoder.receive_data(b"")
    with pytest.raises(NetstringError) as info:
        drain(decoder)
    assert info.value.kind == kind
    assert decoder.in_frame is in_frame


def test_incomplete_frame_without_eof_waits() -> None:
    # 12.2 "b'4:OK x' then silence": the decoder waits; timing out is the caller's job.
    decoder = NetstringDecoder(LIMIT)
    decoder.receive_data(b"4:OK x")
    assert decoder.next_payload() is NEED_DATA
    assert decoder.in_frame
    decoder.receive_data(b",")
    assert decoder.next_payload() == b"OK x"
    assert not decoder.in_frame


def test_data_after_eof_is_a_caller_bug() -> None:
    decoder = NetstringDecoder(LIMIT)
    decoder.receive_data(b"")
    decoder.receive_data(b"")
    with pytest.raises(RuntimeError):
        decoder.receive_data(b"0:,")


def test_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        NetstringDecoder(-1)


PIPELINE = b"7:mymap k,6:mymap ,:,13:mymap Foo Bar,004:OK x,9:users a@b,"
PIPELINE_PAYLOADS = [b"mymap k", b"mymap ", b"", b"mymap Foo Bar", b"OK x", b"users a@b"]


@pytest.mark.parametrize("split", range(1, len(PIPELINE)))
def test_pipeline_split_at_every_point(split: int) -> None:
    decoder = NetstringDecoder(LIMIT)
    decoder.receive_data(PIPELINE[:split])
    got = drain(decoder)
    assert got == PIPELINE_PAYLOADS[: len(got)]
    decoder.receive_data(PIPELINE[split:])
    got += drain(decoder)
    assert got == PIPELINE_PAYLOADS
    assert not decoder.in_frame


def test_pipeline_byte_by_byte() -> None:
    decoder = NetstringDecoder(LIMIT)
    got: list[bytes] = []
    for byte in PIPELINE:
        decoder.receive_data(bytes([byte]))
        got += drain(decoder)
    assert got == PIPELINE_PAYLOADS


@given(
    payloads=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=12),
)
def test_round_trip_in_any_chunks(payloads: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(encode_netstring(payload) for payload in payloads)
    decoder = NetstringDecoder(300)
    got: list[bytes] = []
    for chunk in split_at(wire, cuts):
        decoder.receive_data(chunk)
        got += drain(decoder)
    assert got == payloads
    decoder.receive_data(b"")
    with pytest.raises(NetstringError) as info:
        decoder.next_payload()
    assert info.value.kind == "eof"
    assert not decoder.in_frame


@given(
    data=st.binary(max_size=400)
    | st.lists(st.sampled_from([b"1", b"0", b":", b",", b"x"])).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    eof=st.booleans(),
)
def test_arbitrary_bytes_raise_only_netstring_error(
    data: bytes, cuts: list[int], eof: bool
) -> None:
    max_length = 20
    decoder = NetstringDecoder(max_length)
    try:
        for chunk in split_at(data, cuts):
            decoder.receive_data(chunk)
            drain(decoder)
            assert decoder.buffered_byte_count <= max(max_length + 1, MAX_LENGTH_DIGITS)
        if eof:
            decoder.receive_data(b"")
            drain(decoder)
    except NetstringError as exc:
        assert exc.kind in ("format", "size", "eof")
