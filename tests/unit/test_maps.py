"""texthash, inline and static tables and the map registry (spec 10.2 - 10.4, 12.12)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from bridge.keys import fold_table_key as fold_key
from bridge.maps import (
    SUPPORTED_TYPES,
    TABLE_TYPES,
    MapError,
    OpenOptions,
    SequenceMap,
    open_map,
    validate_spec,
)
from bridge.maps.inline import InlineMap, parse_inline
from bridge.maps.socketmap import SocketmapMap
from bridge.maps.static import StaticMap, parse_static, strip_braces
from bridge.maps.tcp import TcpMap
from bridge.maps.texthash import (
    RELOAD_CHECK_INTERVAL,
    TexthashMap,
    parse_texthash,
)
from bridge.outcome import NOT_FOUND, ConfigFailure, Found, Outcome, found_value
from bridge.postfix_text import WHITESPACE

# ----------------------------------------------------------------- helpers


def write_table(directory: Path, text: bytes, name: str = "table") -> Path:
    path = directory / name
    path.write_bytes(text)
    return path


def open_texthash(path: Path, *, fold: bool = True, smtputf8: bool = True) -> TexthashMap:
    table = open_map(f"texthash:{path}", OpenOptions("/nonexistent", fold=fold, smtputf8=smtputf8))
    assert isinstance(table, TexthashMap)
    return table


async def folded_lookup(table: TexthashMap | InlineMap, key: str) -> Outcome:
    """Look up as the bridge's caller does for a backup table: fold first (CASE-2)."""
    return await table.lookup(fold_key(key.encode(), smtputf8=True))


# ------------------------------------------------------------------ fold_key


# Spec 8 (CASE-2) and 12.13: full Unicode folding with SMTPUTF8, ASCII otherwise.
@pytest.mark.parametrize(
    ("key", "smtputf8", "folded"),
    [
        ("Foo@Example.COM", True, "foo@example.com"),
        ("Straße", True, "strasse"),
        (
            "\u03a3\u0391\u03a3",
            True,
            "\u03c3\u03b1\u03c3",
        ),  # Greek capital SIGMA ALPHA SIGMA, folded
        ("CAFÉ", True, "café"),
        ("CAFÉ", False, "cafÉ"),
    ],
)
def test_fold_key(key: str, smtputf8: bool, folded: str) -> None:
    assert fold_key(key.encode(), smtputf8=smtputf8) == folded.encode()


def test_fold_key_non_utf8_falls_back_to_ascii() -> None:
    # 12.13: with SMTPUTF8 off, b"\xffAB" is folded to b"\xffab"; with it on
    # the key never reaches a table, so ASCII folding is as good as any.
    assert fold_key(b"\xffAB", smtputf8=False) == b"\xffab"
    assert fold_key(b"\xffAB", smtputf8=True) == b"\xffab"


def test_found_value_checks_utf8_only_with_smtputf8() -> None:
    # G-6: a non-UTF-8 value turns a found result into CONFIG.
    assert isinstance(found_value(b"\xff", smtputf8=True, source="t:x"), ConfigFailure)
    assert found_value(b"\xff", smtputf8=False, source="t:x") == Found(b"\xff")
    assert found_value("é".encode(), smtputf8=True, source="t:x") == Found("é".encode())


# ------------------------------------------------------------------ texthash

# Every texthash row of spec 12.12, in one file.
VECTOR_FILE = (
    b"Plain value1\n"
    b'"quoted key" value2\n'
    b"back\\ slash value3\n"
    b"spaced     value   with   spaces   \n"
    b"dup first\n"
    b"dup second\n"
    b"novalue\n"
    b"  continued\n"
    b"cont line1\n"
    b"  line2\n"
    b"utf\xc3\x89 v\n"
)


# Spec 12.12, texthash rows (keys are folded by the caller, as postmap does).
@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("plain", Found(b"value1")),
        ("PLAIN", Found(b"value1")),
        ('"quoted key"', Found(b"value2")),
        ("quoted key", NOT_FOUND),
        ("back\\ slash", Found(b"value3")),
        ("spaced", Found(b"value   with   spaces")),
        ("dup", Found(b"first")),
        ("novalue", Found(b"continued")),
        ("cont", Found(b"line1  line2")),
        ("utfé", Found(b"v")),
        ("utfÉ", Found(b"v")),
    ],
)
async def test_texthash_vectors(tmp_path: Path, key: str, expected: Outcome) -> None:
    table = open_texthash(write_table(tmp_path, VECTOR_FILE))
    assert await folded_lookup(table, key) == expected


def test_texthash_duplicate_warns_with_file_and_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # TH-5, postmap's "warn": the first value stays, the repeat is reported.
    path = write_table(tmp_path, b"dup first\ndup second\n")
    with caplog.at_level(logging.WARNING):
        table = open_texthash(path)
    assert list(table.items()) == [(b"dup", b"first")]
    assert f"{path}, line 2: duplicate entry" in caplog.text


def test_texthash_keys_differing_in_case_are_duplicates_when_folded(tmp_path: Path) -> None:
    table = open_texthash(write_table(tmp_path, b"Key one\nKEY two\n"))
    assert list(table.items()) == [(b"key", b"one")]


@pytest.mark.parametrize(
    ("line", "warning"),
    [
        (b'"open quote value', "unbalanced"),
        (b'a"b c', "unbalanced"),
        (b"lonely", "expected format"),
        (b"lonely   \t", "expected format"),
    ],
)
def test_texthash_broken_lines_are_ignored_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, line: bytes, warning: str
) -> None:
    # TH-3: unbalanced quotes or an empty value: line ignored, file:line named.
    path = write_table(tmp_path, b"good 1\n" + line + b"\nafter 2\n")
    with caplog.at_level(logging.WARNING):
        table = open_texthash(path)
    assert list(table.items()) == [(b"good", b"1"), (b"after", b"2")]
    assert f"{path}, line 2: " in caplog.text
    assert warning in caplog.text


def test_texthash_quotes_and_backslashes_stay_in_key() -> None:
    # TH-3: quotes group whitespace into the key; a backslash makes the next
    # byte (quote or whitespace) ordinary; both stay in the key.
    entries = parse_texthash(
        b'"a b" 1\nx"y z"w 2\nq\\" 3\nt\\\tu 4\n',
        source="t",
        fold=False,
    )
    assert entries == {b'"a b"': b"1", b'x"y z"w': b"2", b'q\\"': b"3", b"t\\\tu": b"4"}


def test_texthash_alias_style_key_is_kept_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    # TH-4: a key ending in ':' is stored as written; Postfix only warns.
    with caplog.at_level(logging.WARNING):
        entries = parse_texthash(b"postmaster: root\n", source="aliases", fold=True)
    assert entries == {b"postmaster:": b"root"}
    assert "aliases, line 1" in caplog.text
    assert "alias file" in caplog.text


def test_texthash_comments_blank_lines_and_crlf() -> None:
    # TH-2 via CF-1 .. CF-4: comments and blank lines vanish; a CRLF line's CR
    # is trailing whitespace of the value.
    data = b"# comment\n\n   \nk1 v1\r\n  # indented comment\nk2 v2 # not a comment\n"
    entries = parse_texthash(data, source="t", fold=True)
    assert entries == {b"k1": b"v1", b"k2": b"v2 # not a comment"}


async def test_texthash_without_fold_keeps_stored_case(tmp_path: Path) -> None:
    # DOM-6 / 12.8: a domain table with key TBL.Example.com never matches the
    # folded domain.
    table = open_texthash(write_table(tmp_path, b"TBL.Example.com OK\n"), fold=False)
    assert await table.lookup(b"tbl.example.com") == NOT_FOUND
    assert await table.lookup(b"TBL.Example.com") == Found(b"OK")


async def test_texthash_ascii_folding_without_smtputf8(tmp_path: Path) -> None:
    # CASE-2: SMTPUTF8 off lowers ASCII letters only.
    table = open_texthash(write_table(tmp_path, "CAFÉ v\n".encode()), smtputf8=False)
    assert list(table.items()) == [("cafÉ".encode(), b"v")]
    assert await table.lookup("cafÉ".encode()) == Found(b"v")


async def test_texthash_unicode_folding_of_stored_keys(tmp_path: Path) -> None:
    table = open_texthash(write_table(tmp_path, "Straße v\n".encode()))
    assert await table.lookup(b"strasse") == Found(b"v")


async def test_texthash_non_utf8_value(tmp_path: Path) -> None:
    # G-6: with SMTPUTF8 a non-UTF-8 value is a configuration failure.
    path = write_table(tmp_path, b"k \xff\n")
    assert isinstance(await open_texthash(path).lookup(b"k"), ConfigFailure)
    assert await open_texthash(path, smtputf8=False).lookup(b"k") == Found(b"\xff")


def test_texthash_non_utf8_key_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        entries = parse_texthash(b"\xffK v\n", source="t", fold=True, smtputf8=True)
    assert entries == {b"\xffk": b"v"}
    assert "not valid UTF-8" in caplog.text


def test_texthash_items_in_file_order(tmp_path: Path) -> None:
    # TH-6: first/next walks the table; file order, first value of a duplicate.
    table = open_texthash(write_table(tmp_path, b"b 2\na 1\nB 3\nc 4\n"))
    assert list(table.items()) == [(b"b", b"2"), (b"a", b"1"), (b"c", b"4")]


def test_texthash_missing_file_is_map_error(tmp_path: Path) -> None:
    with pytest.raises(MapError, match="cannot open"):
        open_map(f"texthash:{tmp_path}/missing", OpenOptions(str(tmp_path)))


async def test_texthash_relative_path_uses_base_dir(tmp_path: Path) -> None:
    write_table(tmp_path, b"k v\n", name="rel")
    table = open_map("texthash:rel", OpenOptions(str(tmp_path)))
    assert isinstance(table, TexthashMap)
    assert table.path == os.path.join(str(tmp_path), "rel")
    assert await table.lookup(b"k") == Found(b"v")


async def test_texthash_aclose_is_idempotent(tmp_path: Path) -> None:
    table = open_texthash(write_table(tmp_path, b"k v\n"))
    await table.aclose()
    await table.aclose()


# ----------------------------------------------------------- texthash reload


async def test_texthash_reloads_changed_file_after_interval(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    path = write_table(tmp_path, b"k old\n")
    table = open_texthash(path)
    assert await table.lookup(b"k") == Found(b"old")
    path.write_bytes(b"k newer\nadded yes\n")
    # Within the check interval the old contents answer.
    assert await table.lookup(b"k") == Found(b"old")
    mock_clock.jump(RELOAD_CHECK_INTERVAL)
    assert await table.lookup(b"k") == Found(b"newer")
    assert await table.lookup(b"added") == Found(b"yes")


async def test_texthash_reload_notices_same_size_rewrite(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    path = write_table(tmp_path, b"k aaa\n")
    table = open_texthash(path)
    assert await table.lookup(b"k") == Found(b"aaa")
    path.write_bytes(b"k bbb\n")
    # Same size; force a different mtime so coarse timestamps cannot hide it.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    mock_clock.jump(RELOAD_CHECK_INTERVAL)
    assert await table.lookup(b"k") == Found(b"bbb")


async def test_texthash_reload_failure_keeps_old_contents_and_logs_once(
    tmp_path: Path, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_table(tmp_path, b"k v1\n")
    table = open_texthash(path)
    path.unlink()
    with caplog.at_level(logging.WARNING):
        mock_clock.jump(RELOAD_CHECK_INTERVAL)
        assert await table.lookup(b"k") == Found(b"v1")
        mock_clock.jump(RELOAD_CHECK_INTERVAL)
        assert await table.lookup(b"k") == Found(b"v1")
    assert caplog.text.count("keeping the previous contents") == 1
    path.write_bytes(b"k v2\n")
    mock_clock.jump(RELOAD_CHECK_INTERVAL)
    assert await table.lookup(b"k") == Found(b"v2")


async def test_texthash_unreadable_replacement_keeps_old_contents(
    tmp_path: Path, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # A directory where the file was: stat works, the read fails.
    path = write_table(tmp_path, b"k v1\n")
    table = open_texthash(path)
    path.unlink()
    path.mkdir()
    with caplog.at_level(logging.WARNING):
        mock_clock.jump(RELOAD_CHECK_INTERVAL)
        assert await table.lookup(b"k") == Found(b"v1")
    assert "cannot re-read" in caplog.text


# -------------------------------------------------------- texthash properties


@given(st.binary(max_size=300))
def test_texthash_parse_never_raises(data: bytes) -> None:
    entries = parse_texthash(data, source="fuzz", fold=True)
    for key, value in entries.items():
        assert key
        assert value
        assert value.strip(WHITESPACE) == value
        assert b"\n" not in key
        assert b"\0" not in value


_plain_key = st.binary(min_size=1, max_size=20).filter(
    lambda key: (
        not any(byte in WHITESPACE or byte in b'"\\\0' for byte in key)
        and not key.startswith(b"#")
        and not key.endswith(b":")
    )
)
_plain_value = st.binary(min_size=1, max_size=30).filter(
    lambda value: b"\n" not in value and b"\0" not in value and value.strip(WHITESPACE) == value
)


@given(st.lists(st.tuples(_plain_key, _plain_value), max_size=10))
def test_texthash_round_trip(pairs: list[tuple[bytes, bytes]]) -> None:
    text = b"".join(key + b" \t " + value + b"\n" for key, value in pairs)
    expected: dict[bytes, bytes] = {}
    for key, value in pairs:
        expected.setdefault(key, value)
    assert parse_texthash(text, source="t", fold=False) == expected


# -------------------------------------------------------------------- inline


def open_inline(spec: str, *, fold: bool = True) -> InlineMap:
    table = open_map(spec, OpenOptions("/nonexistent", fold=fold))
    assert isinstance(table, InlineMap)
    return table


# Spec 12.12, inline rows that open.
@pytest.mark.parametrize(
    ("spec", "key", "expected"),
    [
        ("inline:{Foo=Bar, {baz = x y}}", "foo", Found(b"Bar")),
        ("inline:{Foo=Bar, {baz = x y}}", "baz", Found(b"x y")),
        ("inline:{Foo=Bar, {baz = x y}}", "FOO", Found(b"Bar")),
        ("inline:{Foo=Bar, {baz = x y}}", "bar", NOT_FOUND),
        ("inline:{a=1,a=2}", "a", Found(b"2")),
        ("inline:{k=}", "k", Found(b"")),
        # 12.8: a domain table written inline.
        ("inline:{tbl.example.com=x}", "TBL.Example.com", Found(b"x")),
    ],
)
async def test_inline_vectors(spec: str, key: str, expected: Outcome) -> None:
    assert await folded_lookup(open_inline(spec), key) == expected


# Spec 12.12, inline rows that make the table unusable (IN-1, IN-2).
@pytest.mark.parametrize(
    "spec",
    [
        "inline:{Foo=Bar, baz = x}",
        "inline:{ }",
        "inline:{}",
        "inline:",
        "inline:a=1",
        "inline:{a=1",
        "inline:{a=1}}",
        "inline:{a=1} x",
        "inline:{ =x }",
        "inline:{ {=x} }",
        "inline:{ {a=1}x }",
        "inline:{ {a 1} }",
        "inline:{ , , }",
    ],
)
def test_inline_syntax_errors(spec: str) -> None:
    with pytest.raises(MapError, match="inline"):
        open_map(spec, OpenOptions("/"))
    with pytest.raises(MapError):
        validate_spec(spec, OpenOptions("/"))


def test_inline_item_details() -> None:
    assert parse_inline("{ a=b=c , {x=}, { k = v w } ,\tz=1 }") == {
        "a": "b=c",
        "x": "",
        "k": "v w",
        "z": "1",
    }
    # Braces inside a value are kept, and separators inside them do not split.
    assert parse_inline("{a={b, c}}") == {"a": "{b, c}"}


async def test_inline_without_fold_keeps_case() -> None:
    table = open_inline("inline:{Foo=Bar}", fold=False)
    assert await table.lookup(b"foo") == NOT_FOUND
    assert await table.lookup(b"Foo") == Found(b"Bar")


async def test_inline_folded_duplicates_last_wins() -> None:
    table = open_inline("inline:{Key=1, KEY=2}")
    assert await table.lookup(b"key") == Found(b"2")
    assert list(table.items()) == [(b"key", b"2")]


def test_inline_direct_construction_names_the_table() -> None:
    with pytest.raises(MapError, match=r"table inline:\{\}: empty table"):
        InlineMap("inline:{}", "{}", fold=True)


@given(st.text(max_size=60))
def test_inline_parse_raises_only_map_error(text: str) -> None:
    try:
        pairs = parse_inline(text)
    except MapError:
        return
    assert pairs
    for name in pairs:
        assert name
        assert "=" not in name


_inline_name = st.text(min_size=1, max_size=10).filter(
    lambda name: not any(char in " \t\n\v\f\r={}," for char in name)
)
_inline_value = st.text(max_size=15).filter(
    lambda value: not any(char in "{}\n\r\t\v\f" for char in value) and value.strip(" ") == value
)


@given(st.lists(st.tuples(_inline_name, _inline_value), min_size=1, max_size=8))
def test_inline_round_trip(pairs: list[tuple[str, str]]) -> None:
    text = "{ " + ", ".join("{ " + name + " = " + value + " }" for name, value in pairs) + " }"
    assert parse_inline(text) == dict(pairs)


# -------------------------------------------------------------------- static


# Spec 12.12, static rows (ST-1).
@pytest.mark.parametrize(
    ("spec", "value"),
    [
        ("static:hello", b"hello"),
        ("static:{ hello world }", b"hello world"),
        ("static:{}", b""),
        ("static:{ }", b""),
        ("static:", b""),
        ("static:{ a {b} }", b"a {b}"),
        ("static:héllo", "héllo".encode()),
    ],
)
@pytest.mark.parametrize("key", [b"", b"any", b"ANY key"])
async def test_static_vectors(spec: str, value: bytes, key: bytes) -> None:
    table = open_map(spec, OpenOptions("/"))
    assert isinstance(table, StaticMap)
    assert await table.lookup(key) == Found(value)


@pytest.mark.parametrize("spec", ["static:{ a", "static:{a} b", "static:{a}}"])
def test_static_brace_errors(spec: str) -> None:
    with pytest.raises(MapError):
        open_map(spec, OpenOptions("/"))


@given(st.text(max_size=40))
def test_strip_braces_raises_only_map_error(text: str) -> None:
    try:
        inner = strip_braces(text)
    except MapError:
        return
    assert len(inner) <= len(text) - 2


@given(st.text(max_size=40).filter(lambda text: "{" not in text and "}" not in text))
def test_static_braces_round_trip(text: str) -> None:
    assert (
        parse_static("{" + text + "}")
        == text.strip(" \t\n\v\f\r").encode("utf-8", "surrogateescape").partition(b"\0")[0]
    )


# ------------------------------------------------------------------ registry


def test_supported_types() -> None:
    # The first types keep their order; later ones are appended.
    assert SUPPORTED_TYPES[:6] == ("texthash", "inline", "static", "socketmap", "tcp", "lmdb")
    assert "proxy" in SUPPORTED_TYPES


def test_unsupported_type_message() -> None:
    # A Postfix type the bridge does not read gets the proxy: way to it
    # (PXC-7).
    with pytest.raises(MapError) as info:
        validate_spec("hash:/etc/x", OpenOptions("/"))
    assert str(info.value) == (
        "unsupported table type 'hash' in 'hash:/etc/x': "
        f"the bridge supports {', '.join(SUPPORTED_TYPES)}; "
        "serve it through Postfix's proxymap instead: proxy:hash:/etc/x "
        "(and list proxy:hash:/etc/x in proxy_read_maps, or in proxy_write_maps "
        "for a writable table)"
    )
    with pytest.raises(MapError) as info:
        validate_spec("nosuch:/etc/x", OpenOptions("/"))
    assert str(info.value) == (
        "unsupported table type 'nosuch' in 'nosuch:/etc/x': "
        f"the bridge supports {', '.join(SUPPORTED_TYPES)}"
    )


@pytest.mark.parametrize(
    "spec",
    [
        "btree:/x",
        "proxy:",
        "proxy:hash",
        "proxy:hash:",
        "proxy:proxy:",
        "proxy:Hash:/x",
        "proxy:hash:/x y",
        "proxy:hash:/x,y",
        "TEXTHASH:/x",
        "nocolon",
        ":x",
        "",
        "texthash:",
        "socketmap:inet:127.0.0.1:9999",
        "socketmap:inet:127.0.0.1:9999:",
        "socketmap:inet:127.0.0.1:9999:two words",
        "socketmap:bogus:x:name",
        "socketmap:unix::name",
        "socketmap:users",
        "tcp:localhost",
        "tcp:localhost:0",
        "tcp:localhost:99999",
        "tcp::25",
        "tcp:::1:25",
    ],
)
def test_invalid_specs(spec: str) -> None:
    with pytest.raises(MapError):
        validate_spec(spec, OpenOptions("/"))
    with pytest.raises(MapError):
        open_map(spec, OpenOptions("/"))


@pytest.mark.parametrize(
    "spec",
    [
        "texthash:/no/such/file",
        "texthash:relative",
        "inline:{a=1}",
        "static:x",
        "socketmap:inet:127.0.0.1:9999:users",
        "socketmap:inet:[::1]:9999:users",
        "socketmap:unix:/run/x.sock:users",
        "tcp:127.0.0.1:9998",
        "tcp:[::1]:9998",
    ],
)
def test_validate_spec_accepts_without_touching_files(spec: str) -> None:
    validate_spec(spec, OpenOptions("/nonexistent"))


def test_open_map_builds_clients_without_connecting(tmp_path: Path) -> None:
    # SM-1: split at the last colon; a relative socket resolves like a file.
    table = open_map("socketmap:unix:sock:users", OpenOptions(str(tmp_path)))
    assert isinstance(table, SocketmapMap)
    assert str(table.target.endpoint) == f"unix:{tmp_path}/sock"
    assert table.target.name == "users"
    inet = open_map("socketmap:inet:127.0.0.1:9999:users", OpenOptions("/"))
    assert isinstance(inet, SocketmapMap)
    assert str(inet.target.endpoint) == "inet:127.0.0.1:9999"
    tcp = open_map("tcp:[::1]:9998", OpenOptions("/"))
    assert isinstance(tcp, TcpMap)
    assert str(tcp.endpoint) == "inet:[::1]:9998"
    assert tcp.spec == "tcp:[::1]:9998"


def test_errors_name_the_table() -> None:
    with pytest.raises(MapError, match=r"table socketmap:inet:h:1:: "):
        validate_spec("socketmap:inet:h:1:", OpenOptions("/"))


# ---------------------------------------------------------------- the registry


def test_registry_records_are_named_by_their_key() -> None:
    assert all(name == record.name for name, record in TABLE_TYPES.items())
    assert tuple(TABLE_TYPES) == SUPPORTED_TYPES


async def test_texthash_and_inline_list_their_entries_in_written_order(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("b 2\nA 1\n")
    texthash = open_map("texthash:t", OpenOptions(str(tmp_path)))
    inline = open_map("inline:{b=2, A=1}", OpenOptions("/"))
    for table in (texthash, inline):
        assert isinstance(table, SequenceMap)
        assert [entry async for entry in table.sequence()] == [(b"b", b"2"), (b"a", b"1")]


async def test_texthash_sequence_sees_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_text("a 1\n")
    table = open_map("texthash:t", OpenOptions(str(tmp_path)))
    assert isinstance(table, SequenceMap)
    path.write_text("a 1\nb 2\n")
    os.utime(path, (1, 1))  # a different mtime, whatever the clock's resolution
    assert [entry async for entry in table.sequence()] == [(b"a", b"1"), (b"b", b"2")]
