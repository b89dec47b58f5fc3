"""The SQL differential test's data: rows, keys and scenarios, the same for every engine.

tests/integration/test_sql_backup.py stores :data:`ROWS` in PostgreSQL,
MariaDB and sqlite and asks each scenario's keys of Postfix's own clients
and of the bridge. Together the scenarios cover every SQL rule of
docs/behaviour.md (SQL-2 .. SQL-5): quoting (quotes, backslashes,
injections), rows times columns, NULL and empty fields, case folding,
UTF-8, suppression by %u, %d and %N, the legacy form, result_format,
expansion_limit, domain (the SQL table's own, and an SQL table in the
memcache table's domain list), and errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: (address, goto, extra): the same rows in every engine.
ROWS: tuple[tuple[str, str | None, str | None], ...] = (
    ("alice@example.com", "one@example.net", "two@example.net"),
    ("alice@example.com", "three@example.net", None),
    ("o'brien@example.com", "obrien@example.net", None),
    ("back\\slash@example.com", "backslash@example.net", None),
    ('quote"d@example.com', "dq@example.net", None),
    # Stored injection strings: found only when the key is taken literally.
    ("x';drop/**/table/**/aliases;--", "injected@example.net", None),
    ("x'or'1'='1", "or@example.net", None),
    ("null@example.com", None, None),
    ("empty@example.com", "", None),
    ("empty2@example.com", "", "second@example.net"),
    ("strasse@example.com", "strasse@example.de", None),
    ("café@example.com", "café@example.fr", None),
    ("jürgen@example.com", "jürgen@example.de", None),
    ("euro@example.com", "€uro@example.eu", None),
    ("many@example.com", "m1@example.net", None),
    ("many@example.com", "m2@example.net", None),
    ("many@example.com", "m3@example.net", None),
    ("user@example.org", "org@example.net", None),
    ("percent%@example.com", "pct@example.net", None),
    ("a@b@c.d", "at@example.net", None),
    ("@example.com", "catchall@example.net", None),
    ("user", "bare@example.net", None),
    ("mixed@example.com", "Mixed@Example.NET", "x"),
    ("comma@example.com", "a@x.example, b@y.example", None),
    ("user@x.y", "labels@example.net", None),
)

#: Keys for the plain query: every quoting, folding, NULL and odd-key case.
BASIC_KEYS = (
    "alice@example.com",
    "ALICE@Example.COM",
    "o'brien@example.com",
    "O'Brien@Example.com",
    "back\\slash@example.com",
    'quote"d@example.com',
    # Memcache never sees keys with whitespace (MC-13.7), so the injections
    # that reach the database are written without spaces.
    "X';DROP/**/TABLE/**/aliases;--",
    "x'or'1'='1",
    "y'or'1'='1",
    "';select/**/1;--",
    "\\'or/**/1=1#",
    "\\'or'1'='1",
    "X'; DROP TABLE aliases; --",
    "\\",
    "'",
    "null@example.com",
    "empty@example.com",
    "empty2@example.com",
    "Straße@example.com",
    "café@example.com",
    "CAFÉ@example.com",
    "jürgen@example.com",
    "euro@example.com",
    "many@example.com",
    "user@example.org",
    "percent%@example.com",
    "percent_@example.com",
    "a@b@c.d",
    "@example.com",
    "user",
    "user@",
    "@",
    "",
    "mixed@example.com",
    "comma@example.com",
    "nobody@example.com",
    "a b@example.com",
)

PART_KEYS = (
    "alice@example.com",
    "Alice@Example.com",
    "@example.com",
    "user",
    "user@",
    "a@b@c.d",
    "user@example.org",
    "o'brien@example.com",
    "nobody@example.com",
    "user@x.y",
    "user@localhost",
    "user@x..y",
)

FEW_KEYS = (
    "alice@example.com",
    "o'brien@example.com",
    "many@example.com",
    "null@example.com",
    "empty2@example.com",
    "mixed@example.com",
    "comma@example.com",
    "nobody@example.com",
    "user",
    "",
)

DOMAIN_KEYS = (
    "alice@example.com",
    "alice@EXAMPLE.com",
    "user@example.org",
    "user@other.net",
    "user",
    "@example.com",
    "user@",
    "a@b@c.d",
    "o'brien@example.com",
)

PLAIN = "SELECT goto FROM aliases WHERE address='%s'"


@dataclass(frozen=True)
class Scenario:
    """One SQL .cf (and the memcache .cf around it) and the keys asked of it."""

    name: str
    sql: str
    keys: Sequence[str]
    memcache: str = ""


def scenarios(engine: str) -> list[Scenario]:
    """Every scenario of one engine; the common ones first."""
    common = [
        Scenario("basic", f"query = {PLAIN}\n", BASIC_KEYS),
        Scenario("flags", f"query = {PLAIN}\n", BASIC_KEYS[:24], "ttl = 100\nflags = 7\n"),
        Scenario(
            "columns", "query = SELECT goto, extra FROM aliases WHERE address='%s'\n", FEW_KEYS
        ),
        Scenario("parts", "query = SELECT goto FROM aliases WHERE address='%u@%d'\n", PART_KEYS),
        Scenario(
            "labels",
            "query = SELECT goto FROM aliases WHERE address='%U@%2.%1' AND '%1'<>'%%'\n",
            PART_KEYS,
        ),
        Scenario(
            "result",
            f"query = {PLAIN}\nresult_format = smtp:[%d] for %U at %D\n",
            (*FEW_KEYS, "user@example.org", "a@b@c.d", "@example.com"),
        ),
        Scenario("resultuser", f"query = {PLAIN}\nresult_format = <%u>\n", FEW_KEYS),
        Scenario("limit", f"query = {PLAIN}\nexpansion_limit = 2\n", FEW_KEYS),
        Scenario(
            "limitcols",
            "query = SELECT goto, extra FROM aliases WHERE address='%s'\nexpansion_limit = 2\n",
            FEW_KEYS,
        ),
        Scenario(
            "domain",
            f"query = {PLAIN}\ndomain = example.org, inline:{{example.com=yes}}\n",
            DOMAIN_KEYS,
        ),
        Scenario(
            "legacy",
            "table = aliases\nselect_field = goto\nwhere_field = address\n"
            "additional_conditions = AND goto <> 'two@example.net'\n",
            (*FEW_KEYS, "O'Brien@Example.com", "X'; DROP TABLE aliases; --"),
        ),
        # An SQL table as an item of the memcache table's own domain list (DOM-6).
        Scenario("memdomain", f"query = {PLAIN}\n", DOMAIN_KEYS, "domain = @DOMAINS@\n"),
        Scenario(
            "badcolumn",
            "query = SELECT nosuchcolumn FROM aliases WHERE address='%s'\n",
            ("alice@example.com", "nobody@example.com", "", "a b@example.com"),
        ),
    ]
    extra: list[Scenario] = []
    if engine == "pgsql":
        extra = [
            Scenario("function", "select_function = lookup_alias\n", FEW_KEYS),
            Scenario("lastresult", f"query = SELECT 'first'; {PLAIN}\n", FEW_KEYS[:5]),
        ]
    elif engine == "mysql":
        extra = [
            Scenario("noresult", "query = DO '%s'\nrequire_result_set = no\n", FEW_KEYS[:3]),
            Scenario("needresult", "query = DO '%s'\n", FEW_KEYS[:3]),
        ]
    else:
        extra = [Scenario("firststmt", f"query = {PLAIN}; SELECT 'x'\n", FEW_KEYS[:5])]
    return common + extra
