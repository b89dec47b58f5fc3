"""Tests for bridge.config: the TOML file, memcache_table(5) .cf files, validation."""

from __future__ import annotations

import dataclasses
import logging
import os
import string
import tempfile
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.config import (
    LISTENER_PARAMETERS,
    PARAMETERS,
    TOP_LEVEL_PARAMETERS,
    BridgeConfig,
    ConfigError,
    ConfigProblem,
    ListenerConfig,
    TableConfig,
    load_config,
    parse_cf_file,
    parse_postfix_int,
)
from bridge.endpoint import InetEndpoint, UnixEndpoint
from bridge.keys import DomainFilter, DomainLiteral, KeyTemplate
from bridge.memcache.ring import PoolServer

SOCKETMAP_LISTENER = """
[[listen]]
endpoint = "inet:127.0.0.1:10027"
protocol = "socketmap"
"""

MEMCACHE_LINE = b"memcache = inet:127.0.0.1:11211\n"


def write(directory: Path, name: str, content: str | bytes) -> str:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return str(path)


def load(tmp_path: Path, toml_text: str) -> BridgeConfig:
    return load_config(write(tmp_path, "bridge.toml", toml_text))


def load_table(tmp_path: Path, table_body: str, name: str = "t") -> TableConfig:
    config = load(tmp_path, f"{SOCKETMAP_LISTENER}\n[tables.{name}]\n{table_body}\n")
    return config.tables[name]


def problems_of(tmp_path: Path, toml_text: str) -> tuple[ConfigProblem, ...]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, toml_text)
    return info.value.problems


def only_problem(tmp_path: Path, toml_text: str) -> ConfigProblem:
    problems = problems_of(tmp_path, toml_text)
    assert len(problems) == 1, problems
    return problems[0]


def table_problem(tmp_path: Path, table_body: str, name: str = "t") -> ConfigProblem:
    return only_problem(tmp_path, f"{SOCKETMAP_LISTENER}\n[tables.{name}]\n{table_body}\n")


def listener(
    endpoint: InetEndpoint | UnixEndpoint,
    protocol: Literal["socketmap", "tcp"],
    table: str | None,
    idle_timeout: float,
    max_connections: int,
) -> ListenerConfig:
    """A listener with the documented defaults of the keys not given."""
    return ListenerConfig(
        endpoint,
        protocol,
        table,
        idle_timeout,
        max_connections,
        request_timeout=10.0,
        allow=(),
        reuse_port=True,
        serving="events",
        busy_poll_us=50,
        mode=0o666,
        owner=None,
        group=None,
    )


def cf_table(tmp_path: Path, cf_text: bytes) -> TableConfig:
    write(tmp_path, "t.cf", cf_text)
    return load_table(tmp_path, 'config = "t.cf"')


def cf_table_problem(tmp_path: Path, cf_text: bytes) -> ConfigProblem:
    write(tmp_path, "t.cf", cf_text)
    return table_problem(tmp_path, 'config = "t.cf"')


# ----------------------------------------------------------- integers (MC-2)

# Spec 12.9 "Numeric parameters", and more MC-2 cases.
GOOD_INTEGERS = [
    ("60", 60),
    ("+60", 60),
    ("-5", -5),
    ("010", 10),
    ("0", 0),
    (" 60 ", 60),
    ("2147483647", 2**31 - 1),
    ("-2147483648", -(2**31)),
]
BAD_INTEGERS = [
    "",
    "   ",
    "0x10",
    "10s",
    "1e3",
    "99999999999",
    "2147483648",
    "-2147483649",
    "+",
    "-",
    "--1",
    "1_000",
    "1 000",
    "\u0661\u0662",  # Arabic-Indic digits: Python's int() takes them, Postfix does not
    "6.0",
]


@pytest.mark.parametrize(("text", "expected"), GOOD_INTEGERS)
def test_parse_postfix_int_accepts(text: str, expected: int) -> None:
    assert parse_postfix_int(text) == expected


@pytest.mark.parametrize("text", BAD_INTEGERS)
def test_parse_postfix_int_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="integer"):
        parse_postfix_int(text)


@given(
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
    st.sampled_from(["", "+"]),
    st.integers(min_value=0, max_value=5),
)
def test_parse_postfix_int_round_trip(number: int, plus: str, zeros: int) -> None:
    sign = "-" if number < 0 else plus
    assert parse_postfix_int(f"{sign}{'0' * zeros}{abs(number)}") == number


@given(st.text())
def test_parse_postfix_int_raises_only_value_error(text: str) -> None:
    try:
        number = parse_postfix_int(text)
    except ValueError:
        return
    assert -(2**31) <= number < 2**31


# ------------------------------------------------------------ .cf (CF-1..8)

# Spec 12.9 ".cf parsing": file text after the memcache line -> key_format
# (None = not set, so the default %s applies).
CF_VECTORS = [
    (b"key_format=x%s\n", "x%s"),
    (b"key_format   =   y%s   \n", "y%s"),
    (b"key_format = z%s # not a comment\n", "z%s # not a comment"),
    (b"key_format = 1%s\nkey_format = 2%s\n", "2%s"),
    (b"foo = bar\nkey_format = $foo%s\n", "$foo%s"),
    (b"Key_Format = q%s\n", None),
    (b"key_format = a\n  b\n", "a  b"),
    (b"key_format = a\n\n  b\n", "a  b"),
    (b"key_format = a\n# c\n  b\n", "a  b"),
    (b"key_format = a\n  # c\n\tb\n", "a\tb"),
    (b"key_format = a\\\n b\n", "a\\ b"),
    (b"key_format = a=b%s\n", "a=b%s"),
    (b'key_format = "q%s"\n', '"q%s"'),
    (b"key_format = w%s\r\n", "w%s"),
]


@pytest.mark.parametrize(("text", "expected"), CF_VECTORS)
def test_cf_vectors_parse(tmp_path: Path, text: bytes, expected: str | None) -> None:
    values = parse_cf_file(write(tmp_path, "t.cf", MEMCACHE_LINE + text))
    assert values.get("key_format") == expected
    assert values["memcache"] == "inet:127.0.0.1:11211"


@pytest.mark.parametrize(("text", "expected"), CF_VECTORS)
def test_cf_vectors_through_load_config(tmp_path: Path, text: bytes, expected: str | None) -> None:
    table = cf_table(tmp_path, MEMCACHE_LINE + text)
    assert table.key_format == KeyTemplate.parse("%s" if expected is None else expected)


def test_cf_continuation_joins_memcache_line(tmp_path: Path) -> None:
    # Spec 12.9 last row: a continuation line swallows the next "parameter".
    values = parse_cf_file(write(tmp_path, "t.cf", b"memcache = inet:h:1\n  key_format = k%s\n"))
    assert values == {"memcache": "inet:h:1  key_format = k%s"}


def test_cf_carriage_return_inside_continued_line_stays(tmp_path: Path) -> None:
    # CF-7: only the trailing CR is whitespace to strip.
    values = parse_cf_file(write(tmp_path, "t.cf", b"key_format = a\r\n b\r\n"))
    assert values == {"key_format": "a\r b"}


def test_cf_nul_ends_the_line(tmp_path: Path) -> None:
    # CF-8
    values = parse_cf_file(write(tmp_path, "t.cf", b"key_format = a%s\0junk\nttl = 5\n"))
    assert values == {"key_format": "a%s", "ttl": "5"}


def test_cf_leading_continuation_line_is_dropped(tmp_path: Path) -> None:
    # CF-4
    values = parse_cf_file(write(tmp_path, "t.cf", b"  ttl = 5\nflags = 1\n"))
    assert values == {"flags": "1"}


def test_cf_empty_values_are_kept(tmp_path: Path) -> None:
    values = parse_cf_file(write(tmp_path, "t.cf", b"backup =\ndomain =\nkey_format =\n"))
    assert values == {"backup": "", "domain": "", "key_format": ""}


def test_cf_duplicate_warns_only_when_values_differ(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bridge.config")
    parse_cf_file(write(tmp_path, "same.cf", b"ttl = 5\nttl = 5\n"))
    assert not caplog.records
    path = write(tmp_path, "differ.cf", b"ttl = 5\nttl = 6\n")
    assert parse_cf_file(path) == {"ttl": "6"}
    assert len(caplog.records) == 1
    assert f"{path}, line 2: ttl" in caplog.records[0].getMessage()


def test_cf_unknown_and_bridge_only_names_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bridge.config")
    path = write(tmp_path, "t.cf", b"Key_Format = q%s\nfold_case = false\n")
    assert parse_cf_file(path) == {}
    messages = [record.getMessage() for record in caplog.records]
    assert any("line 1: Key_Format: unknown parameter" in m for m in messages)
    assert any("line 2: fold_case" in m and "TOML" in m for m in messages)


# Spec 12.9 fatal rows: (text, line, message fragment).
CF_SYNTAX_ERRORS = [
    (b"key_format\n", 2, "missing '=' after parameter name 'key_format'"),
    (b"= x\n", 2, "missing parameter name"),
    (b"key format = x\n", 2, "missing '=' after parameter name 'key'"),
]


@pytest.mark.parametrize(("text", "line", "fragment"), CF_SYNTAX_ERRORS)
def test_cf_syntax_errors(tmp_path: Path, text: bytes, line: int, fragment: str) -> None:
    path = write(tmp_path, "t.cf", MEMCACHE_LINE + text)
    with pytest.raises(ConfigError) as info:
        parse_cf_file(path)
    (problem,) = info.value.problems
    assert (problem.file, problem.line) == (path, line)
    assert fragment in problem.message
    assert str(problem).startswith(f"{path}, line {line}: ")


@pytest.mark.parametrize(("text", "line", "fragment"), CF_SYNTAX_ERRORS)
def test_cf_syntax_errors_through_load_config(
    tmp_path: Path, text: bytes, line: int, fragment: str
) -> None:
    problem = cf_table_problem(tmp_path, MEMCACHE_LINE + text)
    assert (problem.file, problem.table, problem.line) == (str(tmp_path / "t.cf"), "t", line)
    assert fragment in problem.message


def test_cf_every_bad_line_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "t.cf", b"a\nttl = 1\n= b\nc d\n")
    with pytest.raises(ConfigError) as info:
        parse_cf_file(path)
    assert [p.line for p in info.value.problems] == [1, 3, 4]
    assert str(info.value).count("\n") == 2


def test_cf_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.cf")
    with pytest.raises(ConfigError) as info:
        parse_cf_file(path)
    (problem,) = info.value.problems
    assert problem.file == path
    assert "cannot read" in problem.message


def test_cf_value_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, "t.cf", b"key_format = \xff%s\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        parse_cf_file(path)


_CF_VALUE = st.text(
    alphabet=st.characters(blacklist_categories=["Cc", "Cs", "Zs", "Zl", "Zp"]), max_size=20
).filter(lambda value: not value[:1].isspace() and not value[-1:].isspace())


@given(
    st.dictionaries(
        st.sampled_from([p.name for p in PARAMETERS if p.postfix]), _CF_VALUE, max_size=12
    )
)
def test_cf_round_trip(values: dict[str, str]) -> None:
    text = "".join(f"{name} = {value}\n" for name, value in values.items())
    with tempfile.TemporaryDirectory() as directory:
        path = write(Path(directory), "t.cf", text)
        assert parse_cf_file(path) == values


@given(st.binary(max_size=200))
def test_cf_arbitrary_bytes_raise_only_config_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = write(Path(directory), "t.cf", data)
        try:
            values = parse_cf_file(path)
        except ConfigError as exc:
            assert exc.problems
            return
        assert set(values) <= {p.name for p in PARAMETERS if p.postfix}


# ---------------------------------------------- numeric parameters (12.9)

# Spec 12.9 "Numeric parameters", read from a .cf file.
CF_NUMERIC_GOOD = [
    (b"ttl = 60", "ttl", 60),
    (b"ttl = +60", "ttl", 60),
    (b"ttl = -5", "ttl", -5),
    (b"ttl = 010", "ttl", 10),
    (b"timeout = 0", "timeout", 0),
    (b"timeout = -1", "timeout", -1),
    (b"flags = -7", "flags", -7),
    (b"max_try = 1", "max_try", 1),
]
CF_NUMERIC_BAD = [
    (b"ttl =", "ttl"),
    (b"ttl = 0x10", "ttl"),
    (b"ttl = 10s", "ttl"),
    (b"ttl = 99999999999", "ttl"),
    (b"max_try = 0", "max_try"),
    (b"retry_pause = 0", "retry_pause"),
    (b"line_size_limit = 0", "line_size_limit"),
    (b"data_size_limit = -1", "data_size_limit"),
    (b"flags = 1e3", "flags"),
    (b"memcache =", "memcache"),
    (b"memcache = bogus:x", "memcache"),
]


@pytest.mark.parametrize(("line", "key", "expected"), CF_NUMERIC_GOOD)
def test_cf_numeric_vectors(tmp_path: Path, line: bytes, key: str, expected: int) -> None:
    table = cf_table(tmp_path, MEMCACHE_LINE + line + b"\n")
    assert getattr(table, key) == expected


@pytest.mark.parametrize(("line", "key"), CF_NUMERIC_BAD)
def test_cf_numeric_vectors_fatal(tmp_path: Path, line: bytes, key: str) -> None:
    problem = cf_table_problem(tmp_path, b"flags = 0\n" + line + b"\n")
    assert problem == dataclasses.replace(
        problem, file=str(tmp_path / "t.cf"), table="t", key=key, line=2
    )


def test_bogus_memcache_transport_is_named(tmp_path: Path) -> None:
    problem = cf_table_problem(tmp_path, b"memcache = bogus:x\n")
    assert "invalid transport 'bogus'" in problem.message


@pytest.mark.parametrize(("text", "expected"), GOOD_INTEGERS[:4])
def test_toml_integer_strings_follow_postfix_syntax(
    tmp_path: Path, text: str, expected: int
) -> None:
    assert load_table(tmp_path, f'ttl = "{text}"').ttl == expected


@pytest.mark.parametrize("text", ["0x10", "10s", "1e3", "", "99999999999"])
def test_toml_bad_integer_strings(tmp_path: Path, text: str) -> None:
    problem = table_problem(tmp_path, f'ttl = "{text}"')
    assert (problem.table, problem.key) == ("t", "ttl")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("1.5", "not a float"),
        ("true", "not a boolean"),
        ("[1]", "not an array"),
        ("4294967296", "out of range"),
    ],
)
def test_toml_integer_wrong_types(tmp_path: Path, value: str, fragment: str) -> None:
    problem = table_problem(tmp_path, f"ttl = {value}")
    assert (problem.table, problem.key) == ("t", "ttl")
    assert fragment in problem.message


@pytest.mark.parametrize("key", ["data_size_limit", "line_size_limit", "max_try", "retry_pause"])
def test_minimum_one(tmp_path: Path, key: str) -> None:
    assert getattr(load_table(tmp_path, f"{key} = 1"), key) == 1
    problem = table_problem(tmp_path, f"{key} = 0")
    assert (problem.file, problem.table, problem.key) == (str(tmp_path / "bridge.toml"), "t", key)
    assert "below the minimum 1" in problem.message


@pytest.mark.parametrize("key", ["flags", "ttl", "timeout"])
def test_no_minimum(tmp_path: Path, key: str) -> None:
    # MC-2: "no minimum" really means no check.
    assert getattr(load_table(tmp_path, f"{key} = -2147483648"), key) == -(2**31)


# ------------------------------------------------------------- PARAMETERS

# Spec MC-1 table: name, default, minimum.
MC1_ROWS = [
    ("memcache", "inet:localhost:11211", None),
    ("backup", "", None),
    ("flags", "0", None),
    ("ttl", "3600", None),
    ("key_format", "%s", None),
    ("key_digest", "", None),
    ("domain", "", None),
    ("data_size_limit", "10240", 1),
    ("line_size_limit", "1024", 1),
    ("max_try", "2", 1),
    ("retry_pause", "1", 1),
    ("timeout", "2", None),
]


def test_parameters_match_mc1() -> None:
    postfix = [(p.name, p.default, p.minimum) for p in PARAMETERS if p.postfix]
    assert postfix == MC1_ROWS


def test_parameters_cover_table_config_fields() -> None:
    fields = {f.name for f in dataclasses.fields(TableConfig)} - {"name", "source", "base_dir"}
    assert {p.name for p in PARAMETERS} == fields | {"config"}
    assert {p.name for p in LISTENER_PARAMETERS} == {
        f.name for f in dataclasses.fields(ListenerConfig)
    }
    assert [p.name for p in TOP_LEVEL_PARAMETERS] == [
        "log_level",
        "log_format",
        "log_target",
        "syslog_facility",
        "syslog_socket",
        "workers",
        "user",
        "group",
    ]


def test_every_parameter_is_documented() -> None:
    for param in (*PARAMETERS, *LISTENER_PARAMETERS, *TOP_LEVEL_PARAMETERS):
        assert param.description.endswith("."), param.name
        assert "\n" not in param.description


def test_defaults(tmp_path: Path) -> None:
    table = load_table(tmp_path, "")
    assert table == TableConfig(
        name="t",
        source=str(tmp_path / "bridge.toml"),
        base_dir=str(tmp_path),
        memcache=(PoolServer(InetEndpoint("localhost", 11211)),),
        backup=None,
        flags=0,
        ttl=3600,
        key_format=KeyTemplate.parse("%s"),
        key_digest=None,
        domain=None,
        data_size_limit=10240,
        line_size_limit=1024,
        max_try=2,
        retry_pause=1,
        timeout=2,
        fold_case=True,
        writable=False,
        smtputf8=True,
        address_search=("full",),
        address_mapping="none",
        propagate_unmatched_extensions=("canonical", "virtual"),
        recipient_delimiter="+",
        local_domains=(),
        ketama_hash="one_at_a_time",
        eject_after=0,
        retry_after=60.0,
        hot_cache_ttl=0.0,
        hot_cache_size=10000,
        busy_poll_us=50,
        queue_directory="/var/spool/postfix",
        proxymap_protocol="auto",
    )


# ---------------------------------------------------------- whole files

EXAMPLE = """
log_level = "info"

[[listen]]
endpoint = "inet:127.0.0.1:10027"
protocol = "socketmap"
idle_timeout = 100
max_connections = 1000

[[listen]]
endpoint = "inet:127.0.0.1:10028"
protocol = "tcp"
table = "aliases"

[[listen]]
endpoint = "unix:run/bridge.sock"
protocol = "socketmap"

[tables.aliases]
memcache = "inet:127.0.0.1:11211"
key_format = "aliases:%s"
domain = "example.com, example.net"
backup = "texthash:/etc/postfix/aliases"

[tables.verify]
config = "cf/memcache-verify.cf"
memcache = "inet:127.0.0.1:11212"
fold_case = false
"""

VERIFY_CF = b"""\
# verify cache, as Postfix reads it
memcache = inet:127.0.0.1:9999
key_format = verify:%s
ttl = 600
backup = texthash:verify-backup
"""


def test_example_configuration(tmp_path: Path) -> None:
    write(tmp_path, "cf/memcache-verify.cf", VERIFY_CF)
    config = load(tmp_path, EXAMPLE)
    toml_path = str(tmp_path / "bridge.toml")
    assert config.path == toml_path
    assert config.log_level == "info"
    assert config.listeners == (
        listener(InetEndpoint("127.0.0.1", 10027), "socketmap", None, 100.0, 1000),
        listener(InetEndpoint("127.0.0.1", 10028), "tcp", "aliases", 0.0, 1000),
        listener(UnixEndpoint(str(tmp_path / "run/bridge.sock")), "socketmap", None, 100, 1000),
    )
    assert list(config.tables) == ["aliases", "verify"]
    aliases = config.tables["aliases"]
    assert aliases.key_format == KeyTemplate.parse("aliases:%s")
    assert aliases.domain == DomainFilter(
        (DomainLiteral(b"example.com", False), DomainLiteral(b"example.net", False))
    )
    assert aliases.backup == "texthash:/etc/postfix/aliases"
    assert aliases.source == toml_path

    verify = config.tables["verify"]
    cf_path = str(tmp_path / "cf" / "memcache-verify.cf")
    assert verify.source == f"{toml_path} (via {cf_path})"
    # The TOML key overrides the .cf value; the rest comes from the .cf.
    assert verify.memcache == (PoolServer(InetEndpoint("127.0.0.1", 11212)),)
    assert verify.key_format == KeyTemplate.parse("verify:%s")
    assert verify.ttl == 600
    assert verify.fold_case is False
    # backup came from the .cf: its relative name resolves there.
    assert verify.backup == "texthash:verify-backup"
    assert verify.base_dir == str(tmp_path / "cf")


def test_toml_overrides_every_cf_value(tmp_path: Path) -> None:
    write(tmp_path, "t.cf", b"ttl = 1\nflags = 2\nkey_format = cf:%s\nkey_digest = md5\n")
    table = load_table(
        tmp_path, 'config = "t.cf"\nttl = 10\nflags = "20"\nkey_format = "toml:%s"\nkey_digest = ""'
    )
    assert (table.ttl, table.flags, table.key_format, table.key_digest) == (
        10,
        20,
        KeyTemplate.parse("toml:%s"),
        None,
    )


def test_toml_override_hides_bad_cf_value(tmp_path: Path) -> None:
    # The overridden .cf value is never used, so it is not an error.
    write(tmp_path, "t.cf", b"ttl = 0x10\n")
    assert load_table(tmp_path, 'config = "t.cf"\nttl = 5').ttl == 5


def test_relative_paths(tmp_path: Path) -> None:
    write(tmp_path, "etc/t.cf", b"memcache = unix:mc.sock\n")
    table = load_table(tmp_path, 'config = "etc/t.cf"\nbackup = "texthash:aliases"')
    assert table.memcache == (PoolServer(UnixEndpoint(str(tmp_path / "etc" / "mc.sock"))),)
    # backup came from the TOML: it resolves against the TOML's directory.
    assert table.base_dir == str(tmp_path)


def test_relative_config_path_is_relative_to_the_toml_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "conf/t.cf", b"ttl = 7\n")
    toml_path = write(
        tmp_path, "conf/bridge.toml", f'{SOCKETMAP_LISTENER}[tables.t]\nconfig = "t.cf"\n'
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(os.path.relpath(toml_path))
    assert config.tables["t"].ttl == 7
    assert config.path == toml_path


def test_empty_string_values(tmp_path: Path) -> None:
    # MC-3
    write(tmp_path, "t.cf", b"backup =\ndomain =\nkey_digest =\nkey_format =\n")
    table = load_table(tmp_path, 'config = "t.cf"')
    assert (table.backup, table.domain, table.key_digest) == (None, None, None)
    assert table.key_format == KeyTemplate.parse("")


def test_separator_only_domain_is_a_filter(tmp_path: Path) -> None:
    # Postfix treats "domain = ," as a (useless) list, not as "no filter".
    assert load_table(tmp_path, 'domain = ","').domain == DomainFilter(())


def test_bridge_only_keys(tmp_path: Path) -> None:
    table = load_table(
        tmp_path,
        'fold_case = false\nsmtputf8 = false\naddress_search = ["full", "@domain"]\n'
        'recipient_delimiter = "+-"\nlocal_domains = "example.com, example.net example.com"',
    )
    assert (table.fold_case, table.smtputf8) == (False, False)
    assert table.address_search == ("full", "@domain")
    assert table.recipient_delimiter == "+-"
    assert table.local_domains == ("example.com", "example.net")
    listed = load_table(tmp_path, 'local_domains = ["a.example"]\naddress_search = "full nodelim"')
    assert listed.local_domains == ("a.example",)
    assert listed.address_search == ("full", "nodelim")


def test_domain_as_toml_list(tmp_path: Path) -> None:
    table = load_table(tmp_path, 'domain = ["Example.com", "!bad.example"]')
    assert table.domain == DomainFilter.parse("example.com, !bad.example")


def test_key_digest_accepted(tmp_path: Path) -> None:
    assert load_table(tmp_path, 'key_digest = "sha256"').key_digest == "sha256"


def test_log_level_is_case_insensitive(tmp_path: Path) -> None:
    config = load(tmp_path, f'log_level = "DEBUG"\n{SOCKETMAP_LISTENER}[tables.t]\n')
    assert config.log_level == "debug"


def test_listener_values(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
[[listen]]
endpoint = "inet:[::1]:10027"
protocol = "tcp"
table = "t"
idle_timeout = 2.5
max_connections = "10"
[tables.t]
""",
    )
    assert config.listeners == (listener(InetEndpoint("::1", 10027), "tcp", "t", 2.5, 10),)


def test_results_are_immutable(tmp_path: Path) -> None:
    config = load(tmp_path, f"{SOCKETMAP_LISTENER}[tables.t]\n")
    with pytest.raises(TypeError):
        config.tables["x"] = config.tables["t"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.tables["t"].ttl = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listeners[0].max_connections = 1  # type: ignore[misc]


# ---------------------------------------------------------------- errors


def test_problem_format() -> None:
    assert str(ConfigProblem("b.toml", "t", "ttl", "bad")) == "b.toml: table t: ttl: bad"
    assert str(ConfigProblem("b.toml", None, None, "bad")) == "b.toml: bad"
    assert str(ConfigProblem("x.cf", "t", None, "bad", line=3)) == "x.cf, line 3: table t: bad"
    assert str(ConfigProblem("b.toml", None, "table", "bad", listener=2)) == (
        "b.toml: listener #2: table: bad"
    )


def test_unknown_top_level_key(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, f'log_levle = "info"\n{SOCKETMAP_LISTENER}[tables.t]\n')
    assert (problem.table, problem.key) == (None, "log_levle")
    assert "did you mean 'log_level'" in problem.message


def test_unknown_listener_key(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, f"{SOCKETMAP_LISTENER}idle_timout = 5\n[tables.t]\n")
    assert (problem.listener, problem.key) == (1, "idle_timout")
    assert str(problem).startswith(f"{tmp_path / 'bridge.toml'}: listener #1: idle_timout: ")


def test_unknown_table_key(tmp_path: Path) -> None:
    problem = table_problem(tmp_path, 'key_fromat = "x"')
    assert str(problem) == (
        f"{tmp_path / 'bridge.toml'}: table t: key_fromat: unknown key (did you mean 'key_format'?)"
    )


@pytest.mark.parametrize(
    ("body", "key", "fragment"),
    [
        ('key_format = "%x"', "key_format", "%x"),
        ('key_format = "abc%"', "key_format", "abc%"),
        ('key_digest = "nosuchdigest"', "key_digest", "nosuchdigest"),
        ('memcache = "inet:localhost"', "memcache", "PORT"),
        ('memcache = ""', "memcache", "empty"),
        ("memcache = 11211", "memcache", "string"),
        ('backup = "hash:/etc/aliases"', "backup", "hash"),
        ('domain = "example.com, /nonexistent/domains"', "domain", "/nonexistent/domains"),
        ('domain = "example.com, btree:/x"', "domain", "btree"),
        ('fold_case = "no"', "fold_case", "TOML boolean"),
        ("smtputf8 = 1", "smtputf8", "TOML boolean"),
        ('address_search = ["full", "bogus"]', "address_search", "bogus"),
        ("address_search = []", "address_search", "no forms"),
        ("local_domains = [1]", "local_domains", "strings"),
        ('recipient_delimiter = "@"', "recipient_delimiter", "delimiter"),
        ("config = 5", "config", "string"),
        ('config = " "', "config", "empty file name"),
    ],
)
def test_bad_table_values(tmp_path: Path, body: str, key: str, fragment: str) -> None:
    problem = table_problem(tmp_path, body)
    assert (problem.file, problem.table, problem.key) == (str(tmp_path / "bridge.toml"), "t", key)
    assert fragment in problem.message


@pytest.mark.parametrize(
    ("cf_text", "key", "fragment"),
    [
        (b"key_format = %x\n", "key_format", "%x"),
        (b"key_digest = nosuchdigest\n", "key_digest", "nosuchdigest"),
        (b"backup = hash:/etc/aliases\n", "backup", "hash"),
    ],
)
def test_bad_cf_values_name_cf_file_and_line(
    tmp_path: Path, cf_text: bytes, key: str, fragment: str
) -> None:
    problem = cf_table_problem(tmp_path, b"ttl = 1\n" + cf_text)
    assert problem == dataclasses.replace(
        problem, file=str(tmp_path / "t.cf"), table="t", key=key, line=2
    )
    assert fragment in problem.message


def test_missing_cf_file(tmp_path: Path) -> None:
    problem = table_problem(tmp_path, 'config = "absent.cf"')
    assert (problem.file, problem.table, problem.key) == (
        str(tmp_path / "bridge.toml"),
        "t",
        "config",
    )
    assert str(tmp_path / "absent.cf") in problem.message


@pytest.mark.parametrize("name", ['"a:b"', '"a b"', '""', '"caf\u00e9"'])
def test_bad_table_names(tmp_path: Path, name: str) -> None:
    problem = only_problem(tmp_path, f"{SOCKETMAP_LISTENER}\n[tables.{name}]\n")
    assert problem.table == name.strip('"')
    assert problem.key is None
    assert "invalid table name" in problem.message


def test_good_table_names(tmp_path: Path) -> None:
    config = load(tmp_path, f"{SOCKETMAP_LISTENER}\n[tables.a-b_c]\n[tables.'x.y']\n")
    assert list(config.tables) == ["a-b_c", "x.y"]


def listener_problem(tmp_path: Path, listener: str) -> ConfigProblem:
    return only_problem(tmp_path, f"[[listen]]\n{listener}\n[tables.t]\n")


@pytest.mark.parametrize(
    ("listener", "key", "fragment"),
    [
        ('endpoint = "inet:127.0.0.1:1"\nprotocol = "tcp"', "table", "exactly one table"),
        ('endpoint = "inet:127.0.0.1:1"\nprotocol = "tcp"\ntable = "x"', "table", "unknown table"),
        ('endpoint = "inet:127.0.0.1:1"\nprotocol = "socketmap"\ntable = "t"', "table", "every"),
        ('endpoint = "bogus:1"\nprotocol = "socketmap"', "endpoint", "invalid transport"),
        ('endpoint = "inet:127.0.0.1:99999"\nprotocol = "socketmap"', "endpoint", "range"),
        ('protocol = "socketmap"', "endpoint", "missing"),
        ('endpoint = "inet:127.0.0.1:1"', "protocol", "missing"),
        ('endpoint = "inet:127.0.0.1:1"\nprotocol = "http"', "protocol", "'http'"),
        ('endpoint = "inet:127.0.0.1:1"\nprotocol = "tcp"\ntable = 1', "table", "string"),
        (
            'endpoint = "inet:127.0.0.1:1"\nprotocol = "socketmap"\nidle_timeout = -1',
            "idle_timeout",
            ">= 0",
        ),
        (
            'endpoint = "inet:127.0.0.1:1"\nprotocol = "socketmap"\nidle_timeout = inf',
            "idle_timeout",
            ">= 0",
        ),
        (
            'endpoint = "inet:127.0.0.1:1"\nprotocol = "socketmap"\nmax_connections = 0',
            "max_connections",
            "minimum 1",
        ),
    ],
)
def test_bad_listeners(tmp_path: Path, listener: str, key: str, fragment: str) -> None:
    problem = listener_problem(tmp_path, listener)
    assert (problem.file, problem.listener, problem.key) == (str(tmp_path / "bridge.toml"), 1, key)
    assert fragment in problem.message


def test_tcp_listener_may_name_a_table_that_has_problems(tmp_path: Path) -> None:
    # Only the table's own problem is reported, not a second "unknown table".
    problems = problems_of(
        tmp_path,
        '[[listen]]\nendpoint = "inet:127.0.0.1:1"\nprotocol = "tcp"\ntable = "t"\n'
        "[tables.t]\nttl = 0.5\n",
    )
    assert [(p.table, p.key) for p in problems] == [("t", "ttl")]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("inet:127.0.0.1:10027", "inet:127.0.0.1:10027"),
        ("unix:/tmp/x/../s", "unix:/tmp/s"),
        ("unix:s", "unix:./s"),
    ],
)
def test_duplicate_listener_endpoint(tmp_path: Path, first: str, second: str) -> None:
    problem = only_problem(
        tmp_path,
        f'[[listen]]\nendpoint = "{first}"\nprotocol = "socketmap"\n'
        f'[[listen]]\nendpoint = "{second}"\nprotocol = "tcp"\ntable = "t"\n[tables.t]\n',
    )
    assert (problem.listener, problem.key) == (2, "endpoint")
    assert "already used by listener #1" in problem.message


def test_no_listeners(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, "[tables.t]\n")
    assert "no listeners" in problem.message


def test_listen_must_be_an_array(tmp_path: Path) -> None:
    problem = only_problem(
        tmp_path, '[listen]\nendpoint = "inet:127.0.0.1:1"\nprotocol = "socketmap"\n[tables.t]\n'
    )
    assert problem.key == "listen"
    assert "[[listen]]" in problem.message


def test_no_tables(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, SOCKETMAP_LISTENER)
    assert "no tables" in problem.message


def test_tables_must_be_tables(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, f'{SOCKETMAP_LISTENER}[tables]\nt = "x"\n')
    assert problem.table == "t"
    assert "must be a table" in problem.message


def test_bad_log_level(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, f'log_level = "loud"\n{SOCKETMAP_LISTENER}[tables.t]\n')
    assert problem.key == "log_level"


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, 'log_level = "info"\n[[listen]\n')
    assert (problem.file, problem.line) == (str(tmp_path / "bridge.toml"), 2)
    assert str(problem).startswith(f"{tmp_path / 'bridge.toml'}, line 2: TOML syntax error: ")


def test_toml_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(write(tmp_path, "bridge.toml", b'log_level = "\xff"\n'))


def test_missing_toml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "absent.toml"))


def test_all_problems_are_collected(tmp_path: Path) -> None:
    write(tmp_path, "t.cf", b"key_format\n")
    problems = problems_of(
        tmp_path,
        """
bogus = 1
[[listen]]
endpoint = "inet:127.0.0.1:1"
protocol = "tcp"
[[listen]]
endpoint = "inet:127.0.0.1:1"
protocol = "socketmap"
[tables.a]
config = "t.cf"
[tables.b]
ttl = "x"
max_try = 0
""",
    )
    assert [(p.listener, p.table, p.key) for p in problems] == [
        (None, None, "bogus"),
        (None, "a", None),
        (None, "b", "ttl"),
        (None, "b", "max_try"),
        (1, None, "table"),
    ]


@given(st.binary(max_size=300))
def test_arbitrary_toml_bytes_raise_only_config_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = write(Path(directory), "bridge.toml", data)
        try:
            load_config(path)
        except ConfigError as exc:
            assert exc.problems


_TOML_KEY_TEXT = st.text(alphabet=string.printable, max_size=12)


@given(st.sampled_from([p.name for p in PARAMETERS if p.name != "config"]), _TOML_KEY_TEXT)
def test_arbitrary_table_strings_raise_only_config_error(key: str, value: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = write(Path(directory), "bridge.toml", f"{SOCKETMAP_LISTENER}[tables.t]\n")
        with open(path, "a", encoding="utf-8") as stream:
            stream.write(f"{key} = {_toml_string(value)}\n")
        try:
            load_config(path)
        except ConfigError as exc:
            assert all(p.table == "t" and p.key == key for p in exc.problems), exc.problems


def _toml_string(value: str) -> str:
    """A TOML basic string holding ``value`` exactly."""
    escaped = "".join(
        f"\\u{ord(char):04x}" if char in '"\\' or not char.isprintable() else char for char in value
    )
    return f'"{escaped}"'


def test_metrics_with_several_workers_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(
        'workers = 2\n[metrics]\nendpoint = "inet:127.0.0.1:9464"\n'
        '[[listen]]\nendpoint = "inet:127.0.0.1:1"\nprotocol = "socketmap"\n'
        '[tables.t]\nmemcache = "inet:127.0.0.1:11211"\n'
    )
    config = load_config(str(path))
    assert config.workers == 2
    assert config.metrics_endpoint is not None and config.metrics_endpoint.port == 9464


def test_log_target_defaults_to_stderr_with_mail_facility_and_dev_log(tmp_path: Path) -> None:
    config = load(tmp_path, f"{SOCKETMAP_LISTENER}[tables.t]\n")
    assert (config.log_target, config.syslog_facility, config.syslog_socket) == (
        "stderr",
        "mail",
        "/dev/log",
    )


def test_syslog_settings(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        'log_target = "syslog"\nsyslog_facility = "Local3"\nsyslog_socket = "run/log"\n'
        f"{SOCKETMAP_LISTENER}[tables.t]\n",
    )
    assert config.log_target == "syslog"
    assert config.syslog_facility == "local3"
    # A relative socket name is relative to the TOML file, like every file name.
    assert config.syslog_socket == str(tmp_path / "run" / "log")


@pytest.mark.parametrize(
    ("line", "key", "message"),
    [
        (
            'syslog_facility = "mial"',
            "syslog_facility",
            "must be a syslog facility (auth, authpriv, cron, daemon, ftp, kern, lpr, mail, "
            "news, syslog, user, uucp, local0, local1, local2, local3, local4, local5, local6, "
            "local7), not 'mial' (did you mean 'mail'?)",
        ),
        ("syslog_facility = 2", "syslog_facility", "must be a syslog facility"),
        ('syslog_facility = "security"', "syslog_facility", "not 'security'"),
        ('log_target = "journal"', "log_target", 'must be "stderr" or "syslog", not \'journal\''),
        ('syslog_socket = ""', "syslog_socket", "empty value: a socket file name is required"),
    ],
)
def test_bad_syslog_settings(tmp_path: Path, line: str, key: str, message: str) -> None:
    problem = only_problem(tmp_path, f"{line}\n{SOCKETMAP_LISTENER}[tables.t]\n")
    assert problem.key == key
    assert message in problem.message
    assert str(problem).startswith(f"{tmp_path / 'bridge.toml'}: ")
