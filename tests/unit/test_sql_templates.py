"""SQL tables: query and result expansion, quoting, joins (SQL-3 .. SQL-5).

The vectors of the SQL section of the backups specification are here,
row by row, plus the union rule of db_common.c (a ``result_format`` that
needs the key's domain suppresses the query too), sqlite quoting checked
by sqlite itself (a key never leaves its string literal), and the
``.cf`` reading rules: defaults, minimums, the legacy query form.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.maps.base import MapError
from bridge.maps.sql.settings import (
    CfValues,
    common_settings,
    legacy_query,
    read_settings,
    redact,
    scrub,
    secrets_of,
    split_hosts,
)
from bridge.maps.sql.sqlite import first_statement
from bridge.maps.sql.templates import SqlTemplates, TemplateError, join_results
from bridge.outcome import Retry


def pg_quote(piece: bytes) -> bytes:
    """PQescapeStringConn with standard_conforming_strings on: double ``'``."""
    return piece.replace(b"'", b"''")


def mysql_quote(piece: bytes) -> bytes:
    """mysql_real_escape_string's byte rules."""
    table = {0: b"\\0", 10: b"\\n", 13: b"\\r", 92: b"\\\\", 39: b"\\'", 34: b'\\"', 26: b"\\Z"}
    return b"".join(table.get(byte, bytes([byte])) for byte in piece)


# ------------------------------------------------------------ query vectors

QUERY = "SELECT goto FROM aliases WHERE address='%s'"


@pytest.mark.parametrize(
    ("template", "key", "statement"),
    [
        (QUERY, b"o'brien@example.com", b"address='o''brien@example.com'"),
        (QUERY, b"back\\slash@example.com", b"address='back\\slash@example.com'"),
        # folded by the caller, then quoted: the injection stays inside the literal
        (QUERY, b"x'; drop table aliases; --", b"address='x''; drop table aliases; --'"),
        (
            "SELECT g FROM a WHERE address='%u@%d' AND '%1'='com' AND '%2'<>'%%'",
            b"alice@example.com",
            b"address='alice@example.com' AND 'com'='com' AND 'example'<>'%'",
        ),
        ("SELECT '%S' '%U' '%D'", b"a@b.c", b"'a@b.c' 'a' 'b.c'"),
        ("SELECT '%u'", b"nodomain", b"'nodomain'"),  # no @: the whole key is %u
        ("SELECT '%u'", b"user@", b"'user'"),  # %u needs no domain
        ("SELECT '%s' LIKE '%%%s'", b"k", b"'k' LIKE '%k'"),
        ("SELECT '%1'", b"a@x..y.", b"'y'"),  # empty labels vanish
        ("SELECT '%s'", b"a@b@c.d", b"'a@b@c.d'"),
        ("SELECT '%u' '%d'", b"a@b@c.d", b"'a@b' 'c.d'"),  # the last @ splits
    ],
)
def test_query_vectors(template: str, key: bytes, statement: bytes) -> None:
    expanded = SqlTemplates(template).expand_query(key, pg_quote)
    assert expanded is not None
    assert expanded.endswith(statement) or expanded == statement


@pytest.mark.parametrize(
    ("template", "result_format", "key"),
    [
        ("SELECT '%u'", "%s", b"@example.org"),  # needs a local part, has none
        ("SELECT '%2'", "%s", b"alice@localhost"),  # needs two labels, has one
        ("SELECT '%d'", "%s", b"alice"),  # needs a domain, has no @
        ("SELECT '%d'", "%s", b"alice@"),  # nothing after the @
        ("SELECT '%s'", "%D", b"alice"),  # the result format's needs suppress too
        ("SELECT '%s'", "%3", b"a@b.c"),
        ("SELECT '%s'", "%U", b"@b.c"),
        ("SELECT '%s'", "%s", b""),  # empty key: "empty query string"
    ],
)
def test_suppressed_keys_send_no_query(template: str, result_format: str, key: bytes) -> None:
    assert SqlTemplates(template, result_format).expand_query(key, pg_quote) is None


def test_value_needs_do_not_suppress_the_query() -> None:
    # %u/%d of result_format are the field's, not the key's.
    assert SqlTemplates("SELECT '%s'", "%u at %d").expand_query(b"nodomain") == b"SELECT 'nodomain'"


def test_quoting_applies_to_pieces_never_to_the_template() -> None:
    expanded = SqlTemplates("SELECT 'it''s %s' -- \\").expand_query(b"a'b\\c", mysql_quote)
    assert expanded == b"SELECT 'it''s a\\'b\\\\c' -- \\"


@pytest.mark.parametrize("bad", ["SELECT %x", "SELECT %", "SELECT %0", "%s %"])
def test_bad_templates(bad: str) -> None:
    with pytest.raises(TemplateError, match="not a valid expansion"):
        SqlTemplates(bad)
    with pytest.raises(TemplateError, match="result_format"):
        SqlTemplates("SELECT 1", bad)


# ----------------------------------------------------------- result vectors


def join(fields: list[bytes | None], key: bytes = b"k@example.com", **kwargs: object) -> object:
    templates = SqlTemplates("SELECT 1", str(kwargs.pop("result_format", "%s")))
    limit = kwargs.pop("expansion_limit", 0)
    assert isinstance(limit, int)
    return join_results(templates, fields, key, expansion_limit=limit)


def test_rows_are_joined_with_a_comma() -> None:
    assert join([b"one@example.net", b"three@example.net"]) == b"one@example.net,three@example.net"


def test_rows_times_columns_skip_empty_and_null() -> None:
    # two columns x two rows, one field empty (pgsql NULL reads as ""), one NULL
    fields = [b"one@example.net", b"two@example.net", b"", b"three@example.net", None]
    assert join(fields) == b"one@example.net,two@example.net,three@example.net"


def test_result_format_uses_value_and_key_parts() -> None:
    assert (
        join([b"x@mail.example.net"], b"alice@example.com", result_format="smtp:[%d] for %U at %D")
        == b"smtp:[mail.example.net] for alice at example.com"
    )


@pytest.mark.parametrize(
    ("result_format", "value", "expected"),
    [
        ("%u", b"@example.com", b""),  # needs the value's local part
        ("%d", b"user", b""),  # needs the value's domain
        ("%d", b"user@", b""),
        ("%u", b"plain", b"plain"),  # no @: the whole value
        ("%S/%1/%2", b"v", b"k@example.com/com/example"),
        ("%%%s%%", b"v", b"%v%"),
    ],
)
def test_result_format_rules(result_format: str, value: bytes, expected: bytes) -> None:
    assert join([value], result_format=result_format) == expected


def test_values_are_cut_at_nul_and_never_quoted() -> None:
    assert join([b"a'b\\c\0hidden", b"\0"]) == b"a'b\\c"


def test_all_null_or_empty_is_not_found() -> None:
    assert join([None, b"", None]) == b""


def test_expansion_limit() -> None:
    assert join([b"a", b"b"], expansion_limit=2) == b"a,b"
    # skipped values do not count
    assert join([b"a", None, b"", b"b"], expansion_limit=2) == b"a,b"
    over = join([b"a", b"b", b"c"], expansion_limit=2)
    assert isinstance(over, Retry) and "expansion limit" in over.reason
    assert join([b"a", b"b", b"c"], expansion_limit=-1) == b"a,b,c"


# -------------------------------------------------------- quoting, by sqlite


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\0")))
def test_sqlite_quoting_keeps_any_key_inside_its_literal(key: str) -> None:
    # The statement sqlite runs returns the key itself: it never leaves its literal.
    statement = SqlTemplates("SELECT '%s', 'end'").expand_query(
        key.encode(), lambda piece: piece.replace(b"'", b"''")
    )
    if not key:
        assert statement is None
        return
    assert statement is not None
    with sqlite3.connect(":memory:") as connection:
        row = connection.execute(first_statement(statement.decode())).fetchall()
    assert row == [(key, "end")]


@pytest.mark.parametrize(
    ("text", "first"),
    [
        ("SELECT 1; DROP TABLE t", "SELECT 1;"),
        ("SELECT ';'; SELECT 2", "SELECT ';';"),
        ("SELECT 1 -- ; x\n; SELECT 2", "SELECT 1 -- ; x\n;"),
        ("SELECT 1", "SELECT 1"),
    ],
)
def test_only_the_first_statement_runs(text: str, first: str) -> None:
    assert first_statement(text) == first


# ------------------------------------------------------------- .cf reading


def values(tmp_path: Path, text: str, names: set[str] | None = None) -> CfValues:
    path = tmp_path / "t.cf"
    path.write_text(text)
    known = names or {
        "query", "result_format", "domain", "expansion_limit", "table", "select_field",
        "where_field", "additional_conditions", "password", "hosts", "retry_interval", "flag",
    }  # fmt: skip
    return read_settings("pgsql:" + str(path), str(path), known, manual="pgsql_table(5)")


def test_legacy_query_form(tmp_path: Path) -> None:
    cf = values(
        tmp_path,
        "table = aliases\nselect_field = goto\nwhere_field = address\n"
        "additional_conditions = AND goto IS NOT NULL\n",
    )
    assert legacy_query(cf) == ("SELECT goto FROM aliases WHERE address='%s' AND goto IS NOT NULL")
    templates = common_settings(cf, smtputf8=True).templates
    assert templates.expand_query(b"alice@example.com", pg_quote) == (
        b"SELECT goto FROM aliases WHERE address='alice@example.com' AND goto IS NOT NULL"
    )
    # An empty query is unset, as in Postfix: the legacy form is used.
    legacy = values(tmp_path, "query =\ntable = t\nselect_field = s\nwhere_field = w\n")
    assert common_settings(legacy, smtputf8=True).templates.query == "SELECT s FROM t WHERE w='%s' "


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("select_field = g\nwhere_field = a\n", "table: not set"),
        ("table =\nselect_field = g\nwhere_field = a\n", "table: must not be shorter"),
        ("query = SELECT %x\n", "not a valid expansion"),
        ("query = SELECT 1\nresult_format =\n", "line 2: result_format"),
        ("query = SELECT 1\nexpansion_limit = 1e3\n", "line 2: expansion_limit: bad numerical"),
        ("query = SELECT 1\ndomain = !\n", "domain"),
    ],
)
def test_cf_problems_name_file_line_and_parameter(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(MapError, match=message):
        common_settings(values(tmp_path, text), smtputf8=True)


def test_integer_and_boolean_rules(tmp_path: Path) -> None:
    cf = values(tmp_path, "retry_interval = 010\nflag = YES\n")
    assert cf.integer("retry_interval", 60, minimum=1) == 10
    assert cf.integer("idle_interval", 60, minimum=1) == 60
    assert cf.boolean("flag", False) is True
    with pytest.raises(MapError, match="minimum is 1"):
        values(tmp_path, "retry_interval = 0\n").integer("retry_interval", 60, minimum=1)
    with pytest.raises(MapError, match="yes or no"):
        values(tmp_path, "flag = true\n").boolean("flag", False)


def test_a_password_is_never_shown(tmp_path: Path) -> None:
    cf = values(tmp_path, "password = hunter2\nretry_interval = x hunter2\n")
    with pytest.raises(MapError) as caught:
        cf.integer("retry_interval", 60)
    assert "hunter2" not in str(caught.value)
    secrets = secrets_of(cf, ["postgresql://u:uri-secret@h/db?password=qs-secret"])
    assert set(secrets) == {"hunter2", "uri-secret", "qs-secret"}
    assert scrub("failed: hunter2 and uri-secret", secrets) == (
        "failed: (secret not shown) and (secret not shown)"
    )


@pytest.mark.parametrize(
    ("host", "shown"),
    [
        ("postgresql://u:secret@db.example/mail", "postgresql://u:***@db.example/mail"),
        ("postgres://db/mail?password=x&sslmode=require", "postgres://db/mail?password=%2A%2A%2A&sslmode=require"),
        ("inet:db.example:5432", "inet:db.example:5432"),
        ("postgresql://db.example/mail", "postgresql://db.example/mail"),
    ],
)  # fmt: skip
def test_uri_passwords_are_redacted(host: str, shown: str) -> None:
    assert redact(host) == shown


def test_hosts_split_at_commas_and_spaces_default_localhost() -> None:
    assert split_hosts("a, b\tc,,d") == ["a", "b", "c", "d"]
    assert split_hosts(" ") == ["localhost"]
