"""bridge.postfix_cf: Postfix's table configuration files, for any table type's names.

The CF-1..CF-8 vectors run through bridge.config in test_config.py (the
memcache_table(5) names); these tests cover what the reader is told by
its caller, and that no message ever shows a secret.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bridge.config import ConfigError, load_config, parse_cf_file
from bridge.postfix_cf import CfEntry, CfProblem, read_cf_file, shown_value

#: pgsql_table(5)'s names, as a future pgsql: table module would pass them.
PGSQL_NAMES = frozenset({"hosts", "user", "password", "dbname", "query"})
SECRET = "s3cr3t-Pa55"


def write(tmp_path: Path, content: bytes, name: str = "t.cf") -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def test_the_caller_names_the_parameters(tmp_path: Path) -> None:
    path = write(tmp_path, b"hosts = db.example\nuser = postfix\nmemcache = inet:h:1\n")
    cf = read_cf_file(path, PGSQL_NAMES, manual="pgsql_table(5)")
    assert cf.entries == {"hosts": CfEntry("db.example", 1), "user": CfEntry("postfix", 2)}
    assert cf.values() == {"hosts": "db.example", "user": "postfix"}
    assert cf.problems == ()


def test_names_known_elsewhere_are_ignored_with_advice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bridge.config")
    path = write(tmp_path, b"fold_case = false\nbogus = 1\n")
    cf = read_cf_file(path, PGSQL_NAMES, manual="pgsql_table(5)", elsewhere={"fold_case"})
    assert cf.entries == {}
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        f"{path}, line 1: fold_case: ignored: a bridge-only setting is not read from a "
        "pgsql_table(5) file; set it in the TOML table",
        f"{path}, line 2: bogus: unknown parameter, ignored",
    ]


def test_problems_carry_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, b"hosts = a\nquery\n= x\nuser = \xff\n")
    cf = read_cf_file(path, PGSQL_NAMES, manual="pgsql_table(5)")
    assert cf.problems == (
        CfProblem(path, 2, None, "missing '=' after parameter name 'query'"),
        CfProblem(path, 3, None, "missing parameter name before '='"),
        CfProblem(path, 4, "user", "value is not valid UTF-8"),
    )
    assert str(cf.problems[2]) == f"{path}, line 4: user: value is not valid UTF-8"


def test_unreadable_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        read_cf_file(str(tmp_path / "absent.cf"), PGSQL_NAMES, manual="pgsql_table(5)")


# ------------------------------------------------------------------ secrets

#: Every way a .cf file can make the reader say something about a line.
SECRET_FILES = [
    # repeated with a different value (CF-6 warning)
    f"password = {SECRET}\npassword = {SECRET}x\n".encode(),
    # not UTF-8 (a problem)
    b"password = " + SECRET.encode() + b"\xff\n",
    # a leading continuation line (dropped with a warning)
    f"  password = {SECRET}\nhosts = h\n".encode(),
    # a NUL byte (the rest of the line dropped with a warning)
    f"password = {SECRET}\0{SECRET}\n".encode(),
    # the value continued onto a line that looks like a bad parameter
    f"password = {SECRET}\n {SECRET} =\nquery\n".encode(),
]


@pytest.mark.parametrize("content", SECRET_FILES)
@pytest.mark.parametrize("names", [PGSQL_NAMES, PGSQL_NAMES - {"password"}])
def test_a_password_is_never_shown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, names: frozenset[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    path = write(tmp_path, content)
    cf = read_cf_file(path, names, manual="pgsql_table(5)", elsewhere={"password"})
    said = [record.getMessage() for record in caplog.records]
    said += [str(problem) for problem in cf.problems]
    assert said or "password" in cf.entries
    assert not [message for message in said if SECRET in message]


@pytest.mark.parametrize("content", SECRET_FILES)
def test_a_password_in_a_memcache_cf_file_is_never_shown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    write(tmp_path, content)
    toml = tmp_path / "bridge.toml"
    toml.write_text(
        '[[listen]]\nendpoint = "inet:127.0.0.1:10027"\nprotocol = "socketmap"\n'
        '[tables.t]\nconfig = "t.cf"\n'
    )
    said = []
    try:
        parse_cf_file(str(tmp_path / "t.cf"))
        load_config(str(toml))
    except ConfigError as exc:
        said.append(str(exc))
    said += [record.getMessage() for record in caplog.records]
    assert not [message for message in said if SECRET in message]


def test_shown_value_hides_secrets() -> None:
    assert shown_value("hosts", "db.example") == "'db.example'"
    assert SECRET not in shown_value("password", SECRET)
    assert SECRET not in shown_value("bind_pw", SECRET)
