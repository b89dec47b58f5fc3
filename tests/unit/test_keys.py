"""Tests for bridge.keys: folding, key_format, key_digest, domain filter.

Every vector of spec sections 12.6, 12.7, 12.8 and 12.13 appears below as a
parametrized case; each table cites the section it comes from.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from bridge.keys import (
    DomainFilter,
    DomainLiteral,
    DomainTable,
    KeyConfigError,
    KeyTemplate,
    fold_key,
    is_valid_memcache_key,
    make_digest,
    memcache_key,
)
from bridge.outcome import NOT_FOUND, ConfigFailure, Found, Outcome, Retry

IDENTITY = KeyTemplate.parse("%s")

# ---------------------------------------------------------------------------
# Case folding: spec 12.13 (memcache rows) and CASE-2


@pytest.mark.parametrize(
    ("key", "smtputf8", "wire"),
    [
        # spec 12.13: key given to postmap -q -> bytes of the memcache "get" line
        (b"Foo@Example.COM", True, b"get foo@example.com\r\n"),
        ("Straße".encode(), True, b"get strasse\r\n"),
        ("CAFÉ".encode(), True, b"get caf\xc3\xa9\r\n"),
        ("CAFÉ".encode(), False, b"get caf\xc3\x89\r\n"),
        (b"\xffAB", False, b"get \xffab\r\n"),
    ],
)
def test_fold_vectors_reach_the_wire_folded(key: bytes, smtputf8: bool, wire: bytes) -> None:
    folded = fold_key(key, smtputf8=smtputf8)
    assert folded is not None
    prepared = memcache_key(folded, IDENTITY, None)
    assert prepared is not None
    assert b"get " + prepared + b"\r\n" == wire


def test_fold_disabled_leaves_the_key_alone() -> None:
    # spec 12.13 "postmap -f" row: without folding the key goes out verbatim,
    # i.e. memcache_key itself never changes case.
    assert memcache_key(b"Foo@Example.COM", IDENTITY, None) == b"Foo@Example.COM"


def test_fold_rejects_non_utf8_under_smtputf8() -> None:
    # spec 12.13: key b"\xff" -> nothing sent, not found (G-6)
    assert fold_key(b"\xff") is None
    assert fold_key(b"ok\xc3") is None  # truncated sequence


@pytest.mark.parametrize(
    ("text", "folded"),
    [
        # CASE-2 examples
        ("Straße", "strasse"),
        ("ΣΑΣ", "σασ"),  # noqa: RUF001 (Greek on purpose)
        ("CAFÉ", "café"),
        ("MiXeD@ExAmPlE.CoM", "mixed@example.com"),
    ],
)
def test_fold_full_unicode(text: str, folded: str) -> None:
    assert fold_key(text.encode()) == folded.encode()


def test_fold_ascii_only_when_smtputf8_off() -> None:
    assert fold_key("ΣΑΣ Straße".encode(), smtputf8=False) == "ΣΑΣ straße".encode()


@given(st.binary())
def test_fold_never_raises_and_is_idempotent(key: bytes) -> None:
    for smtputf8 in (True, False):
        folded = fold_key(key, smtputf8=smtputf8)
        if folded is None:
            assert smtputf8
            with pytest.raises(UnicodeDecodeError):
                key.decode("utf-8")
            continue
        assert fold_key(folded, smtputf8=smtputf8) == folded


# ---------------------------------------------------------------------------
# key_digest: spec 12.6

USER = b"user@example.com"


@pytest.mark.parametrize(
    ("algorithm", "formatted", "expected"),
    [
        # spec 12.6: key_digest | key after key_format | memcache key
        ("sha256", USER, "b4c9a289323b21a01c3e940f150eb9b8c542587f1abfd8f0e1cc1ffc5e475514"),
        (
            "sha256",
            b"pfx:user@example.com",
            "fc19aea3f0fb237f3a37b5e6d8f56c96a20ee0e957829b0ed38ded21294d0907",
        ),
        ("sha1", USER, "63a710569261a24b3766275b7000ce8d7b32e2f7"),
        ("md5", USER, "b58996c504c5638798eb6b511e6f49af"),
        ("sha256", b"a b", "c8687a08aa5d6ed2044328fa6a697ab8e96dc34291e8c2034ae8c38e6fcc6d65"),
        ("sha256", b"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
        (
            "sha512",
            b"k",
            "2af8a9104b3f64ed640d8c7e298d2d480f03a3610cbc2b33474321ec59024a48"
            "592ea8545e41e09d5d1108759df48ede0054f225df39d4f0f312450e0aa9dd25",
        ),
    ],
)
def test_digest_vectors(algorithm: str, formatted: bytes, expected: str) -> None:
    assert make_digest(algorithm)(formatted) == expected.encode()


def test_digest_vector_rows_through_the_pipeline() -> None:
    # spec 12.6: "a b" (space allowed before digest) and "" (empty template)
    sha256 = make_digest("sha256")
    assert memcache_key(b"a b", IDENTITY, sha256) == hashlib.sha256(b"a b").hexdigest().encode()
    empty = KeyTemplate.parse("")
    assert memcache_key(b"k", empty, sha256) == hashlib.sha256(b"").hexdigest().encode()
    assert memcache_key(b"k", empty, None) is None  # 12.7 row 37 for contrast


def test_digest_worked_example() -> None:
    # spec 12.6 example: User@Example.com, pfx:%s, sha256 -> get fc19...0907
    folded = fold_key(b"User@Example.com")
    assert folded is not None
    prepared = memcache_key(folded, KeyTemplate.parse("pfx:%s"), make_digest("sha256"))
    assert prepared == b"fc19aea3f0fb237f3a37b5e6d8f56c96a20ee0e957829b0ed38ded21294d0907"


def test_digest_unknown_algorithm_is_a_config_error() -> None:
    # spec 12.6: nosuchdigest -> table unusable
    with pytest.raises(KeyConfigError, match="'nosuchdigest'") as caught:
        make_digest("nosuchdigest")
    assert "sha256" in str(caught.value)  # the message lists what is available


@pytest.mark.parametrize("algorithm", ["shake_128", "shake_256"])
def test_digest_shake_is_rejected(algorithm: str) -> None:
    with pytest.raises(KeyConfigError, match="SHAKE"):
        make_digest(algorithm)


def test_digest_accepts_openssl_spelling_and_returns_lower_hex() -> None:
    result = make_digest("SHA256")(USER)
    assert result == make_digest("sha256")(USER)
    assert result == result.lower()


def test_digest_function_is_reusable() -> None:
    # The prototype hash object must not accumulate input across calls.
    md5 = make_digest("md5")
    assert md5(USER) == md5(USER) == b"b58996c504c5638798eb6b511e6f49af"


# ---------------------------------------------------------------------------
# key_format: spec 12.7

KEY_FORMAT_VECTORS = [
    # spec 12.7: (# , key_format, folded input key, memcache key or None = suppressed)
    (1, "pfx:%s", b"user@example.com", b"pfx:user@example.com"),
    (2, "U=%u", b"user@example.com", b"U=user"),
    (3, "U=%u", b"user", b"U=user"),
    (4, "U=%u", b"@example.com", None),
    (5, "U=%u", b"user@", b"U=user"),
    (6, "U=%u", b"@", None),
    (7, "D=%d", b"user@example.com", b"D=example.com"),
    (8, "D=%d", b"user", None),
    (9, "D=%d", b"user@", None),
    (10, "D=%d", b"@example.com", b"D=example.com"),
    (11, "%u/%d", b"a@b@c.d", b"a@b/c.d"),
    (12, "%1", b"user@mail.example.com", b"com"),
    (13, "%2.%1", b"user@mail.example.com", b"example.com"),
    (14, "%3", b"user@example.com", None),
    (15, "%9", b"a@1.2.3.4.5.6.7.8.9", b"1"),
    (16, "%1", b"user@example.com.", b"com"),
    (17, "%2", b"user@example..com", b"example"),
    (18, "%2", b"user@.example.com", b"example"),
    (19, "%2", b"a@x..y.z", b"y"),
    (20, "%1", b"example.com", None),
    (21, "%%%s%%", b"k", b"%k%"),
    (22, "%S", b"key", b"key"),  # input "Key", folded to "key"
    (23, "%U", b"u@d", b"u"),
    (24, "%D", b"u@d", b"d"),
    (25, "%D", b"nodomain", None),
    (26, "x", b"anything", b"x"),
    (27, "%u", b"@", None),
    (28, "%1%2", b"@b.c", b"cb"),
    (29, "%s", b"@", b"@"),
    (30, "%d", b"a@b.", b"b."),
    (31, "%1", b"a@b.", b"b"),
    (32, "%1", b"user@", None),
    (33, "%u", b"a+b@c", b"a+b"),
    (34, "%d:%u", b"a@b", b"b:a"),
    (40, "%2.%1", b"user@com", None),
    (41, "%2.%1", b"user@example..com", b"example.com"),
]


@pytest.mark.parametrize(("row", "text", "key", "expected"), KEY_FORMAT_VECTORS)
def test_key_format_vectors(row: int, text: str, key: bytes, expected: bytes | None) -> None:
    template = KeyTemplate.parse(text)
    assert template.expand(key) == expected, f"spec 12.7 row {row}"
    # None of these results is empty or holds whitespace, so the full
    # pipeline agrees with the bare expansion.
    assert memcache_key(key, template, None) == expected, f"spec 12.7 row {row}"


def test_key_format_row_22_folds_first() -> None:
    # spec 12.7 row 22: "%S" with input "Key" -> "key" (folding precedes key_format)
    folded = fold_key(b"Key")
    assert folded is not None
    assert memcache_key(folded, KeyTemplate.parse("%S"), None) == b"key"


@pytest.mark.parametrize(
    ("row", "text", "key"),
    [
        # spec 12.7 rows 35-37: expansion works, the result is then skipped (KF-7)
        (35, "a b %s", b"k"),
        (36, "<%s>", b"a\tb"),
        (37, "", b"k"),
    ],
)
def test_key_format_results_that_are_skipped(row: int, text: str, key: bytes) -> None:
    template = KeyTemplate.parse(text)
    assert template.expand(key) is not None, f"spec 12.7 row {row}: not a suppression"
    assert memcache_key(key, template, None) is None, f"spec 12.7 row {row}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # spec 12.7 rows 38-39 and KF-1's other examples
        ("%x", "'%x' is not a valid expansion"),
        ("abc%", "'%' at the end"),
        ("%0", "'%0' is not a valid expansion"),
        ("%a", "'%a' is not a valid expansion"),
        ("ok%%%", "'%' at the end"),
        ("%s%é", "'%é' is not a valid expansion"),
    ],
)
def test_key_format_invalid(text: str, message: str) -> None:
    with pytest.raises(KeyConfigError, match=message) as caught:
        KeyTemplate.parse(text)
    assert f"invalid key_format {text!r}" in str(caught.value)
    assert "%1-%9" in str(caught.value)


def test_key_format_direct_construction_validates_too() -> None:
    with pytest.raises(KeyConfigError):
        KeyTemplate("%x")


def test_key_format_identity_is_exactly_percent_s() -> None:
    # KF-5: only the literal text "%s" takes the fast path.
    assert KeyTemplate.parse("%s").is_identity
    assert not KeyTemplate.parse("%S").is_identity
    assert not KeyTemplate.parse("%s%%").is_identity


@pytest.mark.parametrize(
    ("text", "needs_user", "needs_domain", "label_count"),
    [
        # KF-2
        ("%s", False, False, 0),
        ("%U", True, False, 0),
        ("%D", False, True, 0),
        ("%2.%7", False, True, 7),
        ("%u@%1", True, True, 1),
        ("%%u %%d %%1", False, False, 0),
    ],
)
def test_key_format_derived_needs(
    text: str, needs_user: bool, needs_domain: bool, label_count: int
) -> None:
    template = KeyTemplate.parse(text)
    assert (template.needs_user, template.needs_domain, template.label_count) == (
        needs_user,
        needs_domain,
        label_count,
    )


def test_key_format_templates_compare_by_text() -> None:
    assert KeyTemplate.parse("pfx:%s") == KeyTemplate.parse("pfx:%s")
    assert KeyTemplate.parse("pfx:%s") != KeyTemplate.parse("pfx:%S")


def test_key_format_non_ascii_literal_is_utf8() -> None:
    assert KeyTemplate.parse("é:%s").expand(b"k") == "é:k".encode()


def test_key_format_surrogate_escapes_carry_raw_bytes() -> None:
    raw_template = b"\xff%s".decode("utf-8", "surrogateescape")
    assert KeyTemplate.parse(raw_template).expand(b"k") == b"\xffk"
    with pytest.raises(KeyConfigError, match="is not text"):
        KeyTemplate.parse("\ud800%s")


# Configuration text: anything but '%' and lone surrogates (which no file
# decoded with surrogate escapes can produce; see the test below).
_TEXT_CHARACTERS = st.characters(blacklist_categories=["Cs"], blacklist_characters="%")
_TEMPLATE_PIECES = st.sampled_from(
    ["%%", "%s", "%S", "%u", "%U", "%d", "%D", *(f"%{n}" for n in range(1, 10))]
) | st.text(alphabet=_TEXT_CHARACTERS, max_size=4)


@given(st.lists(_TEMPLATE_PIECES, max_size=6).map("".join), st.binary(max_size=40))
def test_key_format_expand_never_raises(text: str, key: bytes) -> None:
    result = KeyTemplate.parse(text).expand(key)
    assert result is None or isinstance(result, bytes)


@given(st.lists(_TEMPLATE_PIECES, max_size=6).map("".join), st.binary(max_size=40))
def test_memcache_key_is_always_sendable(text: str, key: bytes) -> None:
    for digest in (None, make_digest("sha1")):
        result = memcache_key(key, KeyTemplate.parse(text), digest)
        if result is not None:
            assert result
            assert not any(byte <= 0x20 or byte == 0x7F for byte in result)


_LITERAL = st.text(alphabet=_TEXT_CHARACTERS, max_size=8)


@given(_LITERAL, _LITERAL, st.binary())
def test_key_format_literal_and_key_round_trip(prefix: str, suffix: str, key: bytes) -> None:
    expanded = KeyTemplate.parse(f"{prefix}%s{suffix}").expand(key)
    head, tail = prefix.encode(), suffix.encode()
    assert expanded is not None
    assert expanded.startswith(head)
    assert expanded.endswith(tail)
    assert expanded[len(head) : len(expanded) - len(tail)] == key


@given(st.text())
def test_key_format_parse_only_raises_its_own_error(text: str) -> None:
    try:
        template = KeyTemplate.parse(text)
    except KeyConfigError:
        return
    assert template.text == text


# ---------------------------------------------------------------------------
# Key validation (MC-13 steps 6-7) and the pipeline


@pytest.mark.parametrize("byte", [*range(0x21), 0x7F])
def test_whitespace_and_control_bytes_invalidate(byte: int) -> None:
    assert not is_valid_memcache_key(b"a" + bytes([byte]) + b"b")
    assert memcache_key(b"a" + bytes([byte]) + b"b", IDENTITY, None) is None


def test_high_bytes_are_valid() -> None:
    assert is_valid_memcache_key(bytes(range(0x80, 0x100)))
    assert is_valid_memcache_key(bytes(range(0x21, 0x7F)))


def test_empty_key_is_invalid_and_always_skipped() -> None:
    assert not is_valid_memcache_key(b"")
    # MC-13 step 1 comes before the digest: an empty input is skipped even
    # where an empty template would have produced a digest.
    assert memcache_key(b"", KeyTemplate.parse(""), make_digest("sha256")) is None
    assert memcache_key(b"", IDENTITY, make_digest("sha256")) is None


def test_digest_makes_spaces_usable() -> None:
    # MC-13: validation runs after the digest (spec 12.7 row 35 plus a digest)
    result = memcache_key(b"k", KeyTemplate.parse("a b %s"), make_digest("md5"))
    assert result == hashlib.md5(b"a b k").hexdigest().encode()


def test_suppressed_expansion_is_not_digested() -> None:
    assert memcache_key(b"user", KeyTemplate.parse("%d"), make_digest("sha256")) is None


# ---------------------------------------------------------------------------
# The domain filter: spec 12.8


class DictTables:
    """Lookup callback backed by plain dicts; records every lookup made."""

    def __init__(self, tables: dict[str, dict[bytes, bytes]], failing: dict[str, Outcome]) -> None:
        self.tables = tables
        self.failing = failing
        self.calls: list[tuple[str, bytes]] = []

    async def lookup(self, spec: str, key: bytes) -> Outcome:
        self.calls.append((spec, key))
        if spec in self.failing:
            return self.failing[spec]
        value = self.tables[spec].get(key)  # DOM-6: no folding on the table side
        return NOT_FOUND if value is None else Found(value)


def _read_texthash(path: Path) -> dict[bytes, bytes]:
    """Just enough texthash for the one-line table of spec 12.8."""
    entries: dict[bytes, bytes] = {}
    for line in path.read_bytes().splitlines():
        key, _, value = line.partition(b" ")
        entries[key] = value.strip()
    return entries


@pytest.fixture
def spec_12_8(tmp_path: Path) -> tuple[DomainFilter, DictTables]:
    """The list of spec 12.8: example.com, /file texthash:/tbl."""
    (tmp_path / "file").write_bytes(
        b"sub.example.org\n# a comment line\n!bad.example.net, good.example.net\n"
    )
    (tmp_path / "tbl").write_bytes(b"tbl.example.com OK\n")
    table = f"texthash:{tmp_path}/tbl"
    domain_filter = DomainFilter.parse(f"example.com, {tmp_path}/file {table}")
    tables = DictTables({table: _read_texthash(tmp_path / "tbl")}, {})
    return domain_filter, tables


@pytest.mark.parametrize(
    ("key", "eligible"),
    [
        # spec 12.8, first table
        (b"user@example.com", True),
        (b"user@EXAMPLE.COM", True),
        (b"user@sub.example.com", False),
        (b"user@other.com", False),
        (b"user", False),
        (b"@example.com", False),
        (b"user@", False),
        (b"", False),
        (b"user@x.example.net", False),
        (b"user@Good.example.net", True),
        (b"user@bad.example.net", False),
        (b"user@sub.example.org", True),
        (b"user@tbl.example.com", True),
        (b"user@TBL.example.com", True),
        (b"a@b@example.com", True),
    ],
)
async def test_domain_vectors(
    spec_12_8: tuple[DomainFilter, DictTables], key: bytes, eligible: bool
) -> None:
    domain_filter, tables = spec_12_8
    assert await domain_filter.check(key, tables.lookup) is eligible


async def test_domain_eligible_key_is_folded_for_memcache(
    spec_12_8: tuple[DomainFilter, DictTables],
) -> None:
    # spec 12.8: user@EXAMPLE.COM -> eligible, memcache key user@example.com
    domain_filter, tables = spec_12_8
    assert await domain_filter.check(b"user@EXAMPLE.COM", tables.lookup) is True
    folded = fold_key(b"user@EXAMPLE.COM")
    assert folded is not None
    assert memcache_key(folded, IDENTITY, None) == b"user@example.com"


async def test_domain_table_is_asked_for_the_folded_domain(
    spec_12_8: tuple[DomainFilter, DictTables],
) -> None:
    domain_filter, tables = spec_12_8
    await domain_filter.check(b"user@TBL.example.com", tables.lookup)
    assert [key for _, key in tables.calls] == [b"tbl.example.com"]


def test_domain_file_items_are_expanded_in_place(
    spec_12_8: tuple[DomainFilter, DictTables],
) -> None:
    domain_filter, tables = spec_12_8
    (table,) = tables.tables
    assert domain_filter.items == (
        DomainLiteral(b"example.com", negated=False),
        DomainLiteral(b"sub.example.org", negated=False),
        DomainLiteral(b"bad.example.net", negated=True),
        DomainLiteral(b"good.example.net", negated=False),
        DomainTable(table, negated=False),
    )
    assert domain_filter.table_specs == (table,)


FAILING = "texthash:/failing"
CONFIG_BROKEN = "texthash:/broken"


@pytest.mark.parametrize(
    ("setting", "key", "expected"),
    [
        # spec 12.8, "More vectors"
        ("!example.com", b"user@example.com", False),
        ("!example.com", b"user@other.com", False),
        ("!!example.com", b"user@example.com", True),
        ("!bad.com, bad.com", b"user@bad.com", False),
        (".example.com", b"user@sub.example.com", False),
        ("{example.com}", b"user@example.com", False),
        ("example.com #x other.com", b"user@other.com", False),
        ("texthash:/upper", b"user@tbl.example.com", False),
        ("inline:{tbl.example.com=x}", b"user@TBL.Example.com", True),
        (FAILING, b"user@example.com", Retry("table failed")),
        (f"!{FAILING}, example.com", b"user@example.com", Retry("table failed")),
        # and the same for a configuration failure
        (f"{CONFIG_BROKEN}, example.com", b"user@example.com", ConfigFailure("bad")),
    ],
)
async def test_domain_more_vectors(
    setting: str, key: bytes, expected: bool | Retry | ConfigFailure
) -> None:
    tables = DictTables(
        {
            "texthash:/upper": {b"TBL.Example.com": b"OK"},  # DOM-6: never matches
            "inline:{tbl.example.com=x}": {b"tbl.example.com": b"x"},
        },
        {FAILING: Retry("table failed"), CONFIG_BROKEN: ConfigFailure("bad")},
    )
    assert await DomainFilter.parse(setting).check(key, tables.lookup) == expected


def test_domain_comment_item_warns_and_ends_the_list(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bridge.keys"):
        domain_filter = DomainFilter.parse("example.com #x other.com")
    assert domain_filter.items == (DomainLiteral(b"example.com", negated=False),)
    assert "#x" in caplog.text


def test_domain_bang_alone_is_a_config_error() -> None:
    with pytest.raises(KeyConfigError, match="no pattern after '!'"):
        DomainFilter.parse("example.com, !!")


def test_domain_unreadable_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(KeyConfigError, match=str(missing)):
        DomainFilter.parse(f"example.com {missing}")


def test_domain_negated_file_negates_every_item(tmp_path: Path) -> None:
    # DOM-5: "!" before the file name; a "!" inside toggles back.
    (tmp_path / "list").write_bytes(b"a.example\n!b.example\n")
    domain_filter = DomainFilter.parse(f"!{tmp_path}/list")
    assert domain_filter.items == (
        DomainLiteral(b"a.example", negated=True),
        DomainLiteral(b"b.example", negated=False),
    )


def test_domain_file_logical_lines_and_line_local_comments(tmp_path: Path) -> None:
    # DOM-5 (3.12): continuation lines join; a '#' item ends only its line.
    (tmp_path / "list").write_bytes(
        b"a.example\n  b.example\n# comment\nc.example #x ignored.example\nd.example\n"
    )
    domain_filter = DomainFilter.parse(f"{tmp_path}/list")
    assert [item.domain for item in domain_filter.items if isinstance(item, DomainLiteral)] == [
        b"a.example",
        b"b.example",
        b"c.example",
        b"d.example",
    ]


def test_domain_self_including_file_is_refused(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.write_bytes(f"x.example {loop}\n".encode())
    with pytest.raises(KeyConfigError, match="nested"):
        DomainFilter.parse(str(loop))


def test_domain_item_kinds() -> None:
    # DOM-2: braces keep separators; '[' marks an address literal, not a table.
    domain_filter = DomainFilter.parse("inline:{ a=1, b=2 },[::1]\tExample.COM\r\nproxy:x:y")
    assert domain_filter.items == (
        DomainTable("inline:{ a=1, b=2 }", negated=False),
        DomainLiteral(b"[::1]", negated=False),
        DomainLiteral(b"example.com", negated=False),
        DomainTable("proxy:x:y", negated=False),
    )


def test_domain_table_specs_are_distinct_and_ordered() -> None:
    domain_filter = DomainFilter.parse("hash:/b, x.example, !hash:/a, hash:/b")
    assert domain_filter.table_specs == ("hash:/b", "hash:/a")


async def test_domain_literal_before_table_avoids_the_lookup() -> None:
    tables = DictTables({}, {FAILING: Retry("down")})
    domain_filter = DomainFilter.parse(f"example.com, {FAILING}")
    assert await domain_filter.check(b"u@example.com", tables.lookup) is True
    assert tables.calls == []


async def test_domain_unicode_folding_follows_smtputf8() -> None:
    tables = DictTables({}, {})
    unicode_filter = DomainFilter.parse("STRASSE.example")
    assert await unicode_filter.check("u@Straße.example".encode(), tables.lookup) is True
    ascii_filter = DomainFilter.parse("STRASSE.example", smtputf8=False)
    assert await ascii_filter.check("u@Straße.example".encode(), tables.lookup) is False
    assert await ascii_filter.check(b"u@Strasse.EXAMPLE", tables.lookup) is True


async def test_domain_non_utf8_domain_is_not_eligible() -> None:
    tables = DictTables({}, {})
    assert await DomainFilter.parse("example.com").check(b"u@\xff.com", tables.lookup) is False


def test_domain_empty_setting_matches_nothing() -> None:
    async def never(spec: str, key: bytes) -> Outcome:
        raise AssertionError("no table to ask")

    assert DomainFilter.parse(" , ").items == ()
    assert trio.run(DomainFilter.parse("").check, b"u@example.com", never) is False


_LIST_TEXT = st.text(
    alphabet=st.sampled_from(list("ab.:!#{}[], \t\r\n\x0béÉ")), max_size=30
)  # no '/': arbitrary text must not name real files (think /dev/zero)


@given(_LIST_TEXT, st.binary(max_size=20))
def test_domain_parse_and_check_raise_only_config_errors(text: str, key: bytes) -> None:
    try:
        domain_filter = DomainFilter.parse(text)
    except KeyConfigError:
        return

    async def found_everywhere(spec: str, key: bytes) -> Outcome:
        assert spec in domain_filter.table_specs
        return Found(b"")

    result = trio.run(domain_filter.check, key, found_everywhere)
    assert isinstance(result, bool)


# ---------------------------------------------------------------------------
# The pipeline as the memcache table strings it together (MC-13)


async def test_pipeline_order_domain_then_fold_then_format_then_digest() -> None:
    tables = DictTables({}, {})
    domain_filter = DomainFilter.parse("example.com")
    raw = b"User@Example.COM"
    assert await domain_filter.check(raw, tables.lookup) is True
    folded = fold_key(raw)
    assert folded is not None
    template = KeyTemplate.parse("%u:%d")
    digest: Callable[[bytes], bytes] = make_digest("sha1")
    assert (
        memcache_key(folded, template, digest)
        == hashlib.sha1(b"user:example.com").hexdigest().encode()
    )
