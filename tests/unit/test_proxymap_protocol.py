"""The proxymap codec (bridge.protocol.proxymap): PXC-2 .. PXC-8 and the PXC vectors.

Every byte string observed between Postfix 3.7's ``postmap`` and its
proxymap is here, checked three ways: encoded by the bridge byte for byte,
decoded back to the same value, and decoded from every split of the
stream into two chunks (and one byte at a time). The 3.11 forms, which
the installed Postfix does not speak, are written out from
``global/dict_proxy.c`` and ``proxymap/proxymap.c`` of 3.12.

Hypothesis then checks that every request and reply survives a round
trip in either generation, and that arbitrary bytes in arbitrary chunks
raise nothing but :class:`ProxymapError`, with the decoder's buffer
within its bound after every drain (the codec's row of the reliability
report).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Final

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.protocol.proxymap import (
    ANNOUNCEMENT,
    FLAG_IMPL_MASK,
    FLAG_LOCK,
    FLAG_OPEN_LOCK,
    FLAG_UTF8_REQUEST,
    MAX_UINT,
    NEED_DATA,
    AttrDecoder,
    AttrList,
    Generation,
    ProxyDelete,
    ProxyLookup,
    ProxymapError,
    ProxyOpen,
    ProxyReply,
    ProxyRequest,
    ProxySequence,
    ProxyUpdate,
    RequestFrame,
    RequestKind,
    Status,
    decode_attributes,
    encode_attributes,
    encode_reply,
    encode_request,
    is_announcement,
    parse_reply,
    parse_request,
    reply_names,
    request_kind,
)
from tests.reliability import ReliabilityReport, long_mode

V29, V311 = Generation.V2_9, Generation.V3_11
TABLE: Final = b"hash:/x/ro"
#: LOCK | UTF8_REQUEST: what postmap -q sends (PXC-8).
REQUEST_FLAGS: Final = 524352


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets into non-empty chunks (b"" would mean EOF)."""
    points = sorted({0, len(data), *(min(cut, len(data)) for cut in cuts)})
    return [data[start:end] for start, end in itertools.pairwise(points) if start < end]


def drain(decoder: AttrDecoder, into: list[AttrList]) -> None:
    """Append every complete list to ``into`` (kept when next_list raises)."""
    while (attributes := decoder.next_list()) is not NEED_DATA:
        into.append(attributes)


def decode_chunks(chunks: list[bytes], *, eof: bool = False) -> list[AttrList]:
    """The lists in ``chunks``; with ``eof``, the stream must end between lists."""
    decoder = AttrDecoder()
    lists: list[AttrList] = []
    for chunk in chunks:
        if chunk:
            decoder.receive_data(chunk)
            drain(decoder, lists)
    if eof:
        decoder.receive_data(b"")
        with pytest.raises(ProxymapError, match=r"^connection closed$"):
            drain(decoder, lists)
    return lists


# ------------------------------------------------------------ the vectors


@dataclass(frozen=True)
class RequestVector:
    wire: bytes
    request: ProxyRequest
    generation: Generation
    instance_flags: int


@dataclass(frozen=True)
class ReplyVector:
    wire: bytes
    kind: RequestKind
    generation: Generation
    reply: ProxyReply


#: Client to server, observed from Postfix 3.7 (PXC-4), then the 3.11
#: forms of the same requests (PXC-5, from the 3.12 source).
REQUESTS: Final = (
    RequestVector(
        b"request\x00open\x00table\x00hash:/x/ro\x00flags\x000\x00\x00",
        ProxyOpen(TABLE),
        V29,
        0,
    ),
    RequestVector(
        b"request\x00lookup\x00table\x00hash:/x/ro\x00flags\x00524352\x00"
        b"key\x00alice@example.com\x00\x00",
        ProxyLookup(TABLE, REQUEST_FLAGS, b"alice@example.com"),
        V29,
        0,
    ),
    RequestVector(
        b"request\x00lookup\x00table\x00hash:/x/ro\x00flags\x00524352\x00"
        b"key\x00nobody@example.com\x00\x00",
        ProxyLookup(TABLE, REQUEST_FLAGS, b"nobody@example.com"),
        V29,
        0,
    ),
    RequestVector(
        b"request\x00sequence\x00table\x00hash:/x/ro\x00flags\x00524352\x00function\x000\x00\x00",
        ProxySequence(TABLE, REQUEST_FLAGS, 0),
        V29,
        0,
    ),
    RequestVector(
        b"request\x00update\x00table\x00hash:/x/ro\x00flags\x00524352\x00key\x00k\x00value\x00v"
        b"\x00\x00",
        ProxyUpdate(TABLE, REQUEST_FLAGS, b"k", b"v"),
        V29,
        0,
    ),
    RequestVector(
        b"request\x00delete\x00table\x00hash:/x/ro\x00flags\x00524352\x00key\x00k\x00\x00",
        ProxyDelete(TABLE, REQUEST_FLAGS, b"k"),
        V29,
        0,
    ),
    RequestVector(
        b"request\x00open\x00table\x00hash:/x/ro\x00instance_flags\x00524352\x00\x00",
        ProxyOpen(TABLE),
        V311,
        REQUEST_FLAGS,
    ),
    RequestVector(
        b"request\x00lookup\x00table\x00hash:/x/ro\x00instance_flags\x00524352\x00"
        b"flags\x0028\x00key\x00alice@example.com\x00\x00",
        ProxyLookup(TABLE, 28, b"alice@example.com"),
        V311,
        REQUEST_FLAGS,
    ),
    RequestVector(
        b"request\x00update\x00table\x00btree:/x/rw\x00instance_flags\x0065536\x00"
        b"flags\x0065920\x00key\x00k\x00value\x00v\x00\x00",
        ProxyUpdate(b"btree:/x/rw", 65920, b"k", b"v"),
        V311,
        FLAG_OPEN_LOCK,
    ),
    RequestVector(
        b"request\x00delete\x00table\x00btree:/x/rw\x00instance_flags\x0065536\x00"
        b"flags\x0065920\x00key\x00k\x00\x00",
        ProxyDelete(b"btree:/x/rw", 65920, b"k"),
        V311,
        FLAG_OPEN_LOCK,
    ),
    RequestVector(
        b"request\x00sequence\x00table\x00hash:/x/ro\x00instance_flags\x00524352\x00"
        b"flags\x0028\x00function\x001\x00\x00",
        ProxySequence(TABLE, 28, 1),
        V311,
        REQUEST_FLAGS,
    ),
)

#: Server to client: every reply observed from 3.7 (PXC-4, PXC-6), then
#: 3.11 replies, which carry flags after status (PXC-5).
REPLIES: Final = (
    ReplyVector(b"status\x000\x00flags\x0028\x00\x00", RequestKind.OPEN, V29, ProxyReply(0, 28)),
    ReplyVector(
        b"status\x000\x00value\x00alice@mail.example.net\x00\x00",
        RequestKind.LOOKUP,
        V29,
        ProxyReply(0, value=b"alice@mail.example.net"),
    ),
    ReplyVector(
        b"status\x001\x00value\x00\x00\x00", RequestKind.LOOKUP, V29, ProxyReply(1, value=b"")
    ),
    ReplyVector(
        b"status\x000\x00key\x00@example.org\x00value\x00catchall@example.net\x00\x00",
        RequestKind.SEQUENCE,
        V29,
        ProxyReply(0, key=b"@example.org", value=b"catchall@example.net"),
    ),
    # DENY: update sent to the read-only proxymap.
    ReplyVector(b"status\x004\x00\x00", RequestKind.UPDATE, V29, ProxyReply(4)),
    # proxywrite: update, delete, the same delete again.
    ReplyVector(b"status\x000\x00\x00", RequestKind.UPDATE, V29, ProxyReply(0)),
    ReplyVector(b"status\x000\x00\x00", RequestKind.DELETE, V29, ProxyReply(0)),
    ReplyVector(b"status\x001\x00\x00", RequestKind.DELETE, V29, ProxyReply(1)),
    # A missing hash: file opens (a surrogate, flags 32); its lookups RETRY.
    ReplyVector(b"status\x000\x00flags\x0032\x00\x00", RequestKind.OPEN, V29, ProxyReply(0, 32)),
    ReplyVector(
        b"status\x002\x00value\x00\x00\x00", RequestKind.LOOKUP, V29, ProxyReply(2, value=b"")
    ),
    # The open reply of a busy 3.7 server leaks request bits (PXC-8).
    ReplyVector(
        b"status\x000\x00flags\x00524376\x00\x00", RequestKind.OPEN, V29, ProxyReply(0, 524376)
    ),
    ReplyVector(
        b"status\x000\x00flags\x00524376\x00value\x00v\x00\x00",
        RequestKind.LOOKUP,
        V311,
        ProxyReply(0, 524376, value=b"v"),
    ),
    ReplyVector(
        b"status\x001\x00flags\x0028\x00key\x00\x00value\x00\x00\x00",
        RequestKind.SEQUENCE,
        V311,
        ProxyReply(1, 28, key=b"", value=b""),
    ),
    ReplyVector(b"status\x000\x00flags\x0028\x00\x00", RequestKind.UPDATE, V311, ProxyReply(0, 28)),
    ReplyVector(b"status\x001\x00flags\x0028\x00\x00", RequestKind.DELETE, V311, ProxyReply(1, 28)),
)

#: BAD replies, accepted whatever their form (PXC-5): a 3.7 server's
#: answer to a 3.11 open (observed) and to a 3.11 lookup (observed), a
#: 3.11 server's answer to a 2.9 lookup, and the "unknown request" answer.
BAD_REPLIES: Final = (
    (b"status\x003\x00flags\x000\x00\x00", RequestKind.OPEN, V311),
    (b"status\x003\x00value\x00\x00\x00", RequestKind.LOOKUP, V311),
    (b"status\x003\x00flags\x000\x00value\x00\x00\x00", RequestKind.LOOKUP, V29),
    (b"status\x003\x00\x00", RequestKind.SEQUENCE, V29),
    (b"status\x003\x00\x00", RequestKind.OPEN, V311),
)


@pytest.mark.parametrize("vector", REQUESTS, ids=lambda v: v.wire[8:30].decode())
def test_request_vectors(vector: RequestVector) -> None:
    assert (
        encode_request(vector.request, vector.generation, instance_flags=vector.instance_flags)
        == vector.wire
    )
    expected_instance = (
        None
        if vector.generation is V29 and not isinstance(vector.request, ProxyOpen)
        else vector.instance_flags
    )
    assert parse_request(decode_attributes(vector.wire)) == RequestFrame(
        vector.request, vector.generation, expected_instance
    )


@pytest.mark.parametrize("vector", REPLIES, ids=lambda v: f"{v.kind.name}-{v.wire[:20]!r}")
def test_reply_vectors(vector: ReplyVector) -> None:
    assert parse_reply(decode_attributes(vector.wire), vector.kind, vector.generation) == (
        vector.reply
    )
    assert encode_reply(vector.reply, vector.kind, vector.generation) == vector.wire


@pytest.mark.parametrize(("wire", "kind", "generation"), BAD_REPLIES)
def test_bad_is_accepted_in_any_form(
    wire: bytes, kind: RequestKind, generation: Generation
) -> None:
    assert parse_reply(decode_attributes(wire), kind, generation) == ProxyReply(Status.BAD)


def test_announcement() -> None:
    # PXC-3: sent on accept from 3.6 on.
    assert ANNOUNCEMENT == b"protocol\x00proxymap_protocol\x00\x00"
    assert is_announcement(decode_attributes(ANNOUNCEMENT))
    assert not is_announcement(decode_attributes(b"protocol\x00other\x00\x00"))
    assert not is_announcement(decode_attributes(b"status\x000\x00flags\x0028\x00\x00"))
    assert not is_announcement(
        decode_attributes(b"protocol\x00proxymap_protocol\x00x\x00y\x00\x00")
    )


def test_flag_values() -> None:
    # PXC-8, util/dict.h.
    assert FLAG_LOCK | FLAG_UTF8_REQUEST == REQUEST_FLAGS
    assert FLAG_IMPL_MASK == 16 | 32 | 262144
    assert 524376 & FLAG_IMPL_MASK == 16  # the leaked bits go
    assert [int(status) for status in Status] == [0, 1, 2, 3, 4, 5]


#: A whole 3.7 conversation as the client reads it, and as the server does.
SERVER_STREAM: Final = (
    ANNOUNCEMENT + b"".join(v.wire for v in REPLIES) + b"".join(wire for wire, _, _ in BAD_REPLIES)
)
CLIENT_STREAM: Final = b"".join(v.wire for v in REQUESTS)


def _expected_lists(stream: bytes) -> list[AttrList]:
    return decode_chunks([stream])


@pytest.mark.parametrize("stream", [SERVER_STREAM, CLIENT_STREAM], ids=["replies", "requests"])
def test_every_split_gives_the_same_lists(stream: bytes) -> None:
    whole = _expected_lists(stream)
    assert len(whole) == (
        1 + len(REPLIES) + len(BAD_REPLIES) if stream is SERVER_STREAM else len(REQUESTS)
    )
    for cut in range(1, len(stream)):
        assert decode_chunks([stream[:cut], stream[cut:]], eof=True) == whole, cut
    assert decode_chunks([bytes([byte]) for byte in stream], eof=True) == whole


def test_the_vectors_decode_in_order() -> None:
    lists = decode_chunks([SERVER_STREAM])
    assert is_announcement(lists[0])
    for attributes, vector in zip(lists[1:], REPLIES, strict=False):
        assert parse_reply(attributes, vector.kind, vector.generation) == vector.reply
    requests = decode_chunks([CLIENT_STREAM])
    assert [parse_request(a).request for a in requests] == [v.request for v in REQUESTS]


# ------------------------------------------------------- reply and request forms


def test_reply_names() -> None:
    # PXC-4 and PXC-5: 3.11 puts flags after status in every reply.
    assert reply_names(RequestKind.OPEN, V29) == (b"status", b"flags")
    assert reply_names(RequestKind.OPEN, V311) == (b"status", b"flags")
    assert reply_names(RequestKind.LOOKUP, V29) == (b"status", b"value")
    assert reply_names(RequestKind.LOOKUP, V311) == (b"status", b"flags", b"value")
    assert reply_names(RequestKind.UPDATE, V29) == (b"status",)
    assert reply_names(RequestKind.DELETE, V311) == (b"status", b"flags")
    assert reply_names(RequestKind.SEQUENCE, V29) == (b"status", b"key", b"value")
    assert reply_names(RequestKind.SEQUENCE, V311) == (b"status", b"flags", b"key", b"value")


@pytest.mark.parametrize(
    ("wire", "kind", "generation"),
    [
        (b"status\x000\x00\x00", RequestKind.LOOKUP, V29),  # value missing
        (b"status\x000\x00value\x00v\x00\x00", RequestKind.LOOKUP, V311),  # flags missing
        (b"status\x000\x00flags\x000\x00value\x00v\x00\x00", RequestKind.LOOKUP, V29),  # extra
        (b"value\x00v\x00status\x000\x00\x00", RequestKind.LOOKUP, V29),  # order
        (b"status\x000\x00status\x000\x00\x00", RequestKind.UPDATE, V29),
        (b"\x00", RequestKind.UPDATE, V29),  # empty list
        (b"status\x00\x00\x00", RequestKind.UPDATE, V29),
        (b"status\x00-1\x00\x00", RequestKind.UPDATE, V29),
        (b"status\x00+1\x00\x00", RequestKind.UPDATE, V29),
        (b"status\x00 1\x00\x00", RequestKind.UPDATE, V29),
        (b"status\x001a\x00\x00", RequestKind.UPDATE, V29),
        (b"status\x004294967296\x00\x00", RequestKind.UPDATE, V29),
        (b"status\x00\xd9\xa1\x00\x00", RequestKind.UPDATE, V29),  # a non-ASCII digit
        (b"status\x000\x00flags\x00x\x00\x00", RequestKind.OPEN, V29),
        (b"status\x00x3\x00\x00", RequestKind.OPEN, V29),
    ],
)
def test_malformed_replies(wire: bytes, kind: RequestKind, generation: Generation) -> None:
    with pytest.raises(ProxymapError) as info:
        parse_reply(decode_attributes(wire), kind, generation)
    assert info.value.kind == "format"


def test_unknown_statuses_are_read_as_numbers() -> None:
    # The client decides what to do about them (PXC-6).
    wire = b"status\x009\x00value\x00\x00\x00"
    assert parse_reply(decode_attributes(wire), RequestKind.LOOKUP, V29) == ProxyReply(9, value=b"")
    wire = b"status\x004294967295\x00\x00"
    assert parse_reply(decode_attributes(wire), RequestKind.UPDATE, V29).status == MAX_UINT


@pytest.mark.parametrize(
    "wire",
    [
        b"\x00",
        b"table\x00hash:/x\x00flags\x000\x00\x00",  # no request first
        b"request\x00close\x00table\x00hash:/x\x00\x00",  # unknown request
        b"request\x00open\x00table\x00hash:/x\x00\x00",  # flags missing
        b"request\x00open\x00table\x00hash:/x\x00flags\x000\x00instance_flags\x000\x00\x00",
        b"request\x00lookup\x00table\x00t\x00flags\x000\x00instance_flags\x000\x00key\x00k\x00\x00",
        b"request\x00lookup\x00table\x00t\x00flags\x00x\x00key\x00k\x00\x00",
        b"request\x00sequence\x00table\x00t\x00flags\x000\x00function\x00first\x00\x00",
    ],
)
def test_malformed_requests(wire: bytes) -> None:
    with pytest.raises(ProxymapError) as info:
        parse_request(decode_attributes(wire))
    assert info.value.kind == "format"


@pytest.mark.parametrize(
    ("request_", "instance_flags"),
    [
        (ProxyLookup(b"hash:/x", 0, b"a\x00b"), 0),
        (ProxyUpdate(b"hash:/x", 0, b"k", b"v\x00"), 0),
        (ProxyOpen(b"hash:\x00/x"), 0),
        (ProxyLookup(b"hash:/x", -1, b"k"), 0),
        (ProxyLookup(b"hash:/x", 2**32, b"k"), 0),
        (ProxyOpen(b"hash:/x"), -1),
        (ProxySequence(b"hash:/x", 0, -1), 0),
    ],
)
def test_unsendable_requests(request_: ProxyRequest, instance_flags: int) -> None:
    for generation in Generation:
        with pytest.raises(ValueError):
            encode_request(request_, generation, instance_flags=instance_flags)


def test_encode_attributes_refuses_what_attr0_cannot_carry() -> None:
    assert encode_attributes([]) == b"\x00"
    assert encode_attributes([(b"a", b"")]) == b"a\x00\x00\x00"
    with pytest.raises(ValueError):
        encode_attributes([(b"", b"v")])
    with pytest.raises(ValueError):
        encode_attributes([(b"a\x00", b"v")])


def test_request_kinds() -> None:
    assert request_kind(ProxyOpen(b"t")) is RequestKind.OPEN
    assert request_kind(ProxySequence(b"t", 0, 1)) is RequestKind.SEQUENCE


# ---------------------------------------------------------------- the decoder


def test_size_error_for_a_long_string_before_its_end_arrives() -> None:
    decoder = AttrDecoder(max_string=10)
    decoder.receive_data(b"status\x00" + b"x" * 10)
    assert decoder.next_list() is NEED_DATA
    assert decoder.buffered_byte_count == 10
    decoder.receive_data(b"x")
    with pytest.raises(ProxymapError) as info:
        decoder.next_list()
    assert info.value.kind == "size"
    assert "value" in str(info.value)
    # A name is bounded the same way.
    decoder = AttrDecoder(max_string=10)
    decoder.receive_data(b"n" * 11)
    with pytest.raises(ProxymapError, match="name"):
        decoder.next_list()


def test_a_string_of_exactly_the_limit_is_fine() -> None:
    decoder = AttrDecoder(max_string=5)
    decoder.receive_data(b"value\x00" + b"x" * 5 + b"\x00\x00")
    lists: list[AttrList] = []
    drain(decoder, lists)
    assert lists == [AttrList(((b"value", b"xxxxx"),))]


def test_a_megabyte_without_nul_fails_after_the_first_chunk() -> None:
    decoder = AttrDecoder()
    decoder.receive_data(b"x" * 65536)
    assert decoder.next_list() is NEED_DATA
    decoder.receive_data(b"x" * 65536)
    with pytest.raises(ProxymapError):
        decoder.next_list()
    # Bytes after an error are dropped, not buffered.
    decoder.receive_data(b"x" * 1_000_000)
    assert decoder.buffered_byte_count == 0


def test_too_many_attributes() -> None:
    decoder = AttrDecoder(max_attributes=2)
    decoder.receive_data(b"a\x001\x00b\x002\x00\x00")
    lists: list[AttrList] = []
    drain(decoder, lists)
    assert lists == [AttrList(((b"a", b"1"), (b"b", b"2")))]
    decoder.receive_data(b"a\x001\x00b\x002\x00c\x00")
    with pytest.raises(ProxymapError) as info:
        decoder.next_list()
    assert info.value.kind == "size"


def test_trickled_string_is_not_rescanned_quadratically() -> None:
    # One byte at a time, 100000 bytes: finishes fast only if each byte
    # is looked at a bounded number of times.
    decoder = AttrDecoder()
    decoder.receive_data(b"value\x00")
    for _ in range(100_000):
        decoder.receive_data(b"x")
        assert decoder.next_list() is NEED_DATA
    decoder.receive_data(b"\x00\x00")
    assert decoder.next_list() == AttrList(((b"value", b"x" * 100_000),))


@pytest.mark.parametrize(
    ("wire", "in_list"),
    [
        (b"", False),
        (b"status", True),
        (b"status\x00", True),
        (b"status\x000", True),
        (b"status\x000\x00", True),
    ],
)
def test_eof(wire: bytes, in_list: bool) -> None:
    decoder = AttrDecoder()
    decoder.receive_data(wire)
    assert decoder.in_list is in_list
    decoder.receive_data(b"")
    with pytest.raises(ProxymapError) as info:
        decoder.next_list()
    assert info.value.kind == "eof"
    assert ("inside" in str(info.value)) is in_list


def test_errors_are_sticky() -> None:
    decoder = AttrDecoder(max_string=1)
    decoder.receive_data(b"xyz")
    with pytest.raises(ProxymapError) as first:
        decoder.next_list()
    with pytest.raises(ProxymapError) as again:
        decoder.next_list()
    assert again.value is first.value


def test_lists_after_eof_are_still_returned() -> None:
    decoder = AttrDecoder()
    decoder.receive_data(b"status\x000\x00\x00")
    decoder.receive_data(b"")
    assert decoder.next_list() == AttrList(((b"status", b"0"),))
    with pytest.raises(ProxymapError):
        decoder.next_list()


def test_decode_attributes_wants_exactly_one_list() -> None:
    assert decode_attributes(b"a\x00b\x00\x00") == AttrList(((b"a", b"b"),))
    with pytest.raises(ProxymapError) as info:
        decode_attributes(b"a\x00b\x00\x00x")
    assert info.value.kind == "format"
    with pytest.raises(ProxymapError) as info:
        decode_attributes(b"a\x00b\x00")
    assert info.value.kind == "eof"


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        AttrDecoder(max_string=0)
    with pytest.raises(ValueError):
        AttrDecoder(max_attributes=0)


def test_data_after_eof_is_a_caller_bug() -> None:
    decoder = AttrDecoder()
    decoder.receive_data(b"")
    with pytest.raises(RuntimeError):
        decoder.receive_data(b"x")


# ------------------------------------------------------------------ hypothesis

#: Inputs of the fuzz target in CI (its reliability row); round trips,
#: whose inputs are all alike, get fewer. BRIDGE_LONG=1 runs ten times as many.
EXAMPLES: Final = 2_000 * (10 if long_mode() else 1)
ROUND_TRIPS: Final = EXAMPLES // 8


def _settings_for(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


_settings = _settings_for(EXAMPLES)
_round_trip_settings = _settings_for(ROUND_TRIPS)

_text = st.binary(max_size=40).map(lambda b: b.replace(b"\x00", b""))
_numbers = st.integers(min_value=0, max_value=MAX_UINT)
_cuts = st.lists(st.integers(min_value=0, max_value=400), max_size=12)

_requests: st.SearchStrategy[ProxyRequest] = st.one_of(
    st.builds(ProxyOpen, _text),
    st.builds(ProxyLookup, _text, _numbers, _text),
    st.builds(ProxyUpdate, _text, _numbers, _text, _text),
    st.builds(ProxyDelete, _text, _numbers, _text),
    st.builds(ProxySequence, _text, _numbers, st.integers(min_value=0, max_value=1)),
)


@_round_trip_settings
@given(
    request_=_requests,
    generation=st.sampled_from(Generation),
    instance_flags=_numbers,
    cuts=_cuts,
)
def test_requests_round_trip(
    request_: ProxyRequest, generation: Generation, instance_flags: int, cuts: list[int]
) -> None:
    wire = encode_request(request_, generation, instance_flags=instance_flags)
    [attributes] = decode_chunks(split_at(wire, cuts))
    frame = parse_request(attributes)
    assert frame.request == request_
    assert frame.generation is generation
    sends_instance = generation is V311 or isinstance(request_, ProxyOpen)
    assert frame.instance_flags == (instance_flags if sends_instance else None)


@st.composite
def _replies(draw: st.DrawFn) -> tuple[ProxyReply, RequestKind, Generation]:
    kind = draw(st.sampled_from(RequestKind))
    generation = draw(st.sampled_from(Generation))
    names = reply_names(kind, generation)
    status = draw(st.sampled_from([s for s in (*Status, 6, 99, MAX_UINT) if s != Status.BAD]))
    reply = ProxyReply(
        int(status),
        draw(_numbers) if b"flags" in names else None,
        draw(_text) if b"key" in names else None,
        draw(_text) if b"value" in names else None,
    )
    return reply, kind, generation


@_round_trip_settings
@given(case=_replies(), cuts=_cuts)
def test_replies_round_trip(
    case: tuple[ProxyReply, RequestKind, Generation], cuts: list[int]
) -> None:
    reply, kind, generation = case
    wire = encode_reply(reply, kind, generation)
    [attributes] = decode_chunks(split_at(wire, cuts))
    assert parse_reply(attributes, kind, generation) == reply


@_round_trip_settings
@given(
    lists=st.lists(st.lists(st.tuples(_text.filter(bool), _text), max_size=8), max_size=6),
    cuts=_cuts,
)
def test_attribute_lists_round_trip(
    lists: list[list[tuple[bytes, bytes]]], cuts: list[int]
) -> None:
    wire = b"".join(encode_attributes(items) for items in lists)
    decoded = decode_chunks(split_at(wire, cuts), eof=False)
    assert decoded == [AttrList(tuple(items)) for items in lists]


def reference_lists(stream: bytes, *, eof: bool) -> tuple[list[AttrList], str | None]:
    """What the decoder must return for a whole stream: lists, then the error kind if any.

    Written from PXC-2 alone: split at NUL; strings alternate name and
    value; an empty name ends a list; default bounds.
    """
    lists: list[AttrList] = []
    items: list[tuple[bytes, bytes]] = []
    strings = stream.split(b"\x00")
    *complete, tail = strings
    name: bytes | None = None
    for string in complete:
        if len(string) > 100_000:
            return lists, "size"
        if name is not None:
            items.append((name, string))
            name = None
        elif string:
            if len(items) >= 8:
                return lists, "size"
            name = string
        else:
            lists.append(AttrList(tuple(items)))
            items = []
    if len(tail) > 100_000:
        return lists, "size"
    if eof:
        return lists, "eof"
    return lists, None


# Streams built from pieces that matter: the vectors, encoded lists, and noise.
_pieces = st.one_of(
    st.sampled_from([v.wire for v in REPLIES] + [v.wire for v in REQUESTS] + [ANNOUNCEMENT]),
    st.binary(max_size=30),
    st.sampled_from([b"\x00", b"\x00\x00", b"status\x00", b"x" * 100_001]),
)
_streams = st.lists(_pieces, max_size=10).map(b"".join)


def test_arbitrary_bytes_raise_only_proxymap_error(reliability: ReliabilityReport) -> None:
    inputs = crashes = wrong = 0

    @_settings
    @given(stream=_streams, cuts=_cuts, eof=st.booleans())
    def check(stream: bytes, cuts: list[int], eof: bool) -> None:
        nonlocal inputs, crashes, wrong
        inputs += 1
        decoder = AttrDecoder()
        lists: list[AttrList] = []
        error: str | None = None
        try:
            try:
                for chunk in split_at(stream, cuts):
                    decoder.receive_data(chunk)
                    drain(decoder, lists)
                    # The documented bound on what stays buffered.
                    assert decoder.buffered_byte_count <= 100_000
                if eof:
                    decoder.receive_data(b"")
                    drain(decoder, lists)
            except ProxymapError as exc:
                error = exc.kind
            # Whatever came out, every reader of it fails only with ProxymapError.
            for attributes in lists:
                _parse_everything(attributes)
        except AssertionError:
            wrong += 1
            raise
        except Exception:
            crashes += 1
            raise
        expected = reference_lists(stream, eof=eof)
        if (lists, error) != expected:
            wrong += 1
        assert (lists, error) == expected

    try:
        check()
    finally:
        reliability.record(
            "protocol fuzzing",
            "random streams, random chunks: proxymap attribute reader",
            requests=inputs,
            correct=inputs - wrong - crashes,
            wrong=wrong,
            crashes=crashes,
            bound="only ProxymapError raised; buffer <= 100000 bytes",
        )


def _parse_everything(attributes: AttrList) -> None:
    """Read ``attributes`` as every request and reply; only ProxymapError may come out."""
    is_announcement(attributes)
    with contextlib.suppress(ProxymapError):
        parse_request(attributes)
    for kind in RequestKind:
        for generation in Generation:
            with contextlib.suppress(ProxymapError):
                parse_reply(attributes, kind, generation)


@_round_trip_settings
@given(stream=st.binary(max_size=200))
def test_parsers_raise_only_proxymap_error_on_random_lists(stream: bytes) -> None:
    for attributes in decode_chunks([stream]):
        _parse_everything(attributes)
