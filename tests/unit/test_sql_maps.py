"""SQL tables: host choice, the penalty box, deadlines, the registry, sqlite files (SQL-1 .. SQL-7).

:class:`SqlMap` is driven here by a fake driver whose hosts refuse, fail,
hang or answer on command, so the host loop of SQL-6 is checked without
servers: unix before inet, random choice, failover, the penalty box and
its end, the single host that is never penalised, abandoned calls whose
connections are never reused. sqlite tables run on real files. The real
PostgreSQL and MariaDB are in tests/integration/test_sql_backup.py.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from bridge.keys import DomainFilter
from bridge.maps import MapError, OpenOptions, open_map, validate_spec
from bridge.maps.base import HealthReporting
from bridge.maps.sql.client import DriverError, HostKind, HostSpec, SqlMap
from bridge.maps.sql.mysql import DEFAULT_SOCKET, parse_mysql_host
from bridge.maps.sql.pgsql import PgsqlDriver, parse_pgsql_host
from bridge.maps.sql.settings import CommonSettings
from bridge.maps.sql.templates import SqlTemplates
from bridge.outcome import NOT_FOUND, ConfigFailure, Found, Retry

# ------------------------------------------------------------ a fake driver


@dataclass(eq=False)
class FakeConnection:
    host: str
    closed: bool = False
    interrupted: bool = False
    release: threading.Event = field(default_factory=threading.Event)
    closed_event: threading.Event = field(default_factory=threading.Event)


@dataclass
class FakeDriver:
    """Hosts by their shown name -> behaviour: ok, refuse, sqlerror, hang."""

    behaviour: dict[str, str]
    fields: list[bytes | None] = field(default_factory=lambda: [b"v1", None, b"v2"])
    connects: list[str] = field(default_factory=list)
    statements: list[tuple[str, bytes]] = field(default_factory=list)
    connections: list[FakeConnection] = field(default_factory=list)
    message: str = "refused"

    def connect(self, host: HostSpec, timeout: float) -> FakeConnection:
        self.connects.append(host.shown)
        if self.behaviour[host.shown] == "refuse":
            raise DriverError(f"connect to {host.shown}: {self.message}")
        connection = FakeConnection(host.shown)
        self.connections.append(connection)
        return connection

    def quote(self, connection: FakeConnection, piece: bytes) -> bytes:
        if b"\xff" in piece:
            raise DriverError("cannot quote the key", host_failed=False)
        return piece.replace(b"'", b"''")

    def execute(
        self, connection: FakeConnection, statement: bytes, deadline: float
    ) -> list[bytes | None]:
        assert not connection.closed
        self.statements.append((connection.host, statement))
        behaviour = self.behaviour[connection.host]
        if behaviour == "sqlerror":
            raise DriverError("query failed: column does not exist")
        if behaviour == "prepare":
            raise DriverError("SQL prepare failed", permanent=True)
        if behaviour == "hang":
            connection.release.wait(10)
            raise DriverError("interrupted")
        return list(self.fields)

    def close(self, connection: FakeConnection) -> None:
        connection.closed = True
        connection.closed_event.set()

    def interrupt(self, connection: FakeConnection) -> None:
        connection.interrupted = True
        connection.release.set()


def inet(name: str) -> HostSpec:
    return HostSpec(HostKind.INET, name, name)


def unix(name: str) -> HostSpec:
    return HostSpec(HostKind.UNIX, name, name)


def make_map(
    driver: FakeDriver,
    hosts: list[HostSpec],
    *,
    retry_interval: float = 60,
    idle_interval: float = 60,
    timeout: float = 5,
    domain: DomainFilter | None = None,
    secrets: tuple[str, ...] = (),
) -> SqlMap[FakeConnection]:
    settings = CommonSettings(SqlTemplates("SELECT g FROM t WHERE k='%s'", source="t"), domain, 0)
    return SqlMap(
        "pgsql:/t.cf",
        settings,
        driver,
        hosts,
        retry_interval=retry_interval,
        idle_interval=idle_interval,
        timeout=timeout,
        secrets=secrets,
    )


# ------------------------------------------------------------ the host loop


async def test_found_fields_are_joined_and_quoting_is_per_piece() -> None:
    driver = FakeDriver({"a": "ok"})
    table = make_map(driver, [inet("a")])
    assert await table.lookup(b"o'brien@example.com") == Found(b"v1,v2")
    assert driver.statements == [("a", b"SELECT g FROM t WHERE k='o''brien@example.com'")]


async def test_nothing_found_is_not_found() -> None:
    driver = FakeDriver({"a": "ok"}, fields=[None, b""])
    assert await make_map(driver, [inet("a")]).lookup(b"k") == NOT_FOUND


async def test_keys_with_nul_or_suppressed_send_no_query() -> None:
    driver = FakeDriver({"a": "ok"})
    table = make_map(driver, [inet("a")])
    assert await table.lookup(b"k\0x") == NOT_FOUND
    assert await table.lookup(b"") == NOT_FOUND
    assert driver.connects == []


async def test_unix_sockets_before_inet_and_connected_hosts_first() -> None:
    driver = FakeDriver({"i1": "ok", "u1": "ok", "i2": "ok"})
    table = make_map(driver, [inet("i1"), unix("u1"), inet("i2")])
    for _ in range(5):
        assert isinstance(await table.lookup(b"k"), Found)
    assert driver.connects == ["u1"]  # one connection, reused


async def test_hosts_are_chosen_at_random() -> None:
    random.seed(7)
    chosen = set()
    for _ in range(40):
        driver = FakeDriver({"a": "ok", "b": "ok", "c": "ok"})
        await make_map(driver, [inet("a"), inet("b"), inet("c")]).lookup(b"k")
        chosen.add(driver.connects[0])
    assert chosen == {"a", "b", "c"}


async def test_a_failed_host_is_skipped_until_retry_interval_passes() -> None:
    driver = FakeDriver({"bad": "refuse", "good": "ok"})
    table = make_map(driver, [unix("bad"), inet("good")], retry_interval=0.3)
    assert await table.lookup(b"k") == Found(b"v1,v2")  # bad first (unix), then good
    assert driver.connects == ["bad", "good"]
    health = {part.name: part for part in await table.health()}
    assert not health["host bad"].ok and "skipped until" in health["host bad"].detail
    assert "refused" in health["host bad"].detail
    assert health["host good"].ok
    await table.lookup(b"k")
    assert driver.connects == ["bad", "good"]  # penalised: not tried again
    await trio.sleep(0.35)
    driver.behaviour["bad"] = "ok"
    table._hosts[1].idle.clear()  # forget good's connection so the choice is free again
    table._hosts[1].open = 0
    await table.lookup(b"k")
    assert driver.connects[-1] == "bad"  # back after its penalty


async def test_all_hosts_down_is_temp_never_not_found() -> None:
    driver = FakeDriver({"a": "refuse", "b": "sqlerror"})
    table = make_map(driver, [inet("a"), inet("b")])
    outcome = await table.lookup(b"k")
    assert isinstance(outcome, Retry)
    assert "host a" in outcome.reason and "host b" in outcome.reason
    again = await table.lookup(b"k")  # both penalised now: no attempt at all
    assert isinstance(again, Retry) and "no host available" in again.reason
    assert sorted(driver.connects) == ["a", "b"]


async def test_an_sql_error_closes_the_connection_and_penalises_the_host() -> None:
    driver = FakeDriver({"a": "sqlerror", "b": "ok"})
    table = make_map(driver, [unix("a"), inet("b")])
    assert await table.lookup(b"k") == Found(b"v1,v2")
    assert driver.connections[0].closed


async def test_a_single_host_is_retried_at_once_and_never_penalised() -> None:
    driver = FakeDriver({"lb": "refuse"})
    table = make_map(driver, [inet("lb")])
    assert isinstance(await table.lookup(b"k"), Retry)
    assert driver.connects == ["lb", "lb"]  # "reconnect immediately after a single failure"
    (part,) = await table.health()
    assert not part.ok and "last attempt failed" in part.detail
    driver.behaviour["lb"] = "ok"
    assert await table.lookup(b"k") == Found(b"v1,v2")  # no penalty to wait out
    (part,) = await table.health()
    assert part.ok


async def test_health_asks_hosts_not_in_the_penalty_box() -> None:
    driver = FakeDriver({"a": "ok", "b": "ok"})
    table = make_map(driver, [inet("a"), inet("b")])
    assert all(part.ok for part in await table.health())  # both asked, both answer
    assert sorted(host for host, statement in driver.statements) == ["a", "b"]
    driver.behaviour["b"] = "sqlerror"
    health = {part.name: part for part in await table.health()}
    assert health["host a"].ok and not health["host b"].ok
    assert "skipped until" in health["host b"].detail
    asked = len(driver.statements)
    await table.health()
    assert len(driver.statements) == asked + 1  # b is in the penalty box: not asked


async def test_health_sees_a_single_host_recover_without_a_lookup() -> None:
    driver = FakeDriver({"lb": "refuse"})
    table = make_map(driver, [inet("lb")])
    (part,) = await table.health()
    assert not part.ok and "refused" in part.detail
    driver.behaviour["lb"] = "ok"
    (part,) = await table.health()
    assert part.ok


async def test_a_dropped_connection_is_replaced_within_the_lookup() -> None:
    driver = FakeDriver({"lb": "ok"})
    table = make_map(driver, [inet("lb")])
    await table.lookup(b"k")
    driver.behaviour["lb"] = "sqlerror"
    first = driver.connections[0]
    outcome = await table.lookup(b"k")
    assert isinstance(outcome, Retry) and first.closed
    assert len(driver.connections) == 2


async def test_quoting_failure_fails_the_lookup_only() -> None:
    driver = FakeDriver({"a": "ok", "b": "ok"})
    table = make_map(driver, [inet("a"), inet("b")])
    outcome = await table.lookup(b"\xffkey")
    assert isinstance(outcome, Retry) and "quote" in outcome.reason
    assert all(part.ok for part in await table.health())
    assert await table.lookup(b"key") == Found(b"v1,v2")


async def test_prepare_errors_are_perm() -> None:
    table = make_map(FakeDriver({"f": "prepare"}), [inet("f")])
    assert isinstance(await table.lookup(b"k"), ConfigFailure)


async def test_a_late_answer_is_temp_and_its_connection_never_reused() -> None:
    driver = FakeDriver({"a": "hang"})
    table = make_map(driver, [inet("a")], timeout=0.3)
    started = time.monotonic()
    outcome = await table.lookup(b"k")
    assert isinstance(outcome, Retry) and outcome.timeout
    assert time.monotonic() - started < 1.0
    hung = driver.connections[0]
    assert hung.interrupted
    # The worker closes the abandoned connection when it returns.
    assert await trio.to_thread.run_sync(hung.closed_event.wait, 5)
    driver.behaviour["a"] = "ok"
    assert await table.lookup(b"k") == Found(b"v1,v2")
    assert driver.connections[1] is not hung


async def test_idle_connections_are_closed_after_idle_interval() -> None:
    driver = FakeDriver({"a": "ok"})
    table = make_map(driver, [inet("a")], idle_interval=0.1)
    await table.lookup(b"k")
    await trio.sleep(0.15)
    await table.lookup(b"k")
    assert driver.connections[0].closed and len(driver.connections) == 2


async def test_aclose_closes_idle_connections() -> None:
    driver = FakeDriver({"a": "ok"})
    table = make_map(driver, [inet("a")])
    await table.lookup(b"k")
    await table.aclose()
    assert driver.connections[0].closed
    assert isinstance(await table.lookup(b"k"), Retry)


async def test_secrets_never_reach_a_reason_a_log_line_or_the_health_report(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    driver = FakeDriver({"a": "refuse", "b": "refuse"}, message="password hunter2 rejected")
    table = make_map(driver, [inet("a"), inet("b")], secrets=("hunter2",))
    outcome = await table.lookup(b"k")
    assert isinstance(outcome, Retry) and "hunter2" not in outcome.reason
    assert "hunter2" not in repr(await table.health())
    assert caplog.records and "hunter2" not in caplog.text


async def test_the_domain_filter_runs_first() -> None:
    driver = FakeDriver({"a": "ok"})
    domain = DomainFilter.parse("example.com")
    table = make_map(driver, [inet("a")], domain=domain)
    assert await table.lookup(b"user@other.com") == NOT_FOUND
    assert await table.lookup(b"user") == NOT_FOUND
    assert driver.connects == []
    assert await table.lookup(b"user@example.com") == Found(b"v1,v2")


# ------------------------------------------------------------ hosts parsing


@pytest.mark.parametrize(
    ("text", "kind", "name", "port"),
    [
        ("db.example.com", HostKind.INET, "db.example.com", None),
        ("inet:db.example.com:5433", HostKind.INET, "db.example.com", "5433"),
        ("127.0.0.1:5432", HostKind.INET, "127.0.0.1", "5432"),
        ("unix:/var/run/postgresql", HostKind.UNIX, "/var/run/postgresql", None),
        ("/tmp", HostKind.UNIX, "/tmp", None),
        ("postgresql://u:pw@db/mail", HostKind.URI, "postgresql://u:pw@db/mail", None),
    ],
)
def test_pgsql_hosts(text: str, kind: HostKind, name: str, port: str | None) -> None:
    host = parse_pgsql_host(text)
    assert (host.kind, host.name, host.port) == (kind, name, port)


def test_pgsql_uri_hosts_are_shown_without_password() -> None:
    assert parse_pgsql_host("postgresql://u:pw@db/mail").shown == "postgresql://u:***@db/mail"


def test_pgsql_conninfo() -> None:
    pytest.importorskip("psycopg")
    driver = PgsqlDriver(None, dbname="mail", user="pf", password="p w", encoding="UTF8")
    conninfo = driver.conninfo(parse_pgsql_host("db:5433"))
    assert "host=db" in conninfo and "port=5433" in conninfo and "password='p w'" in conninfo
    assert "client_encoding=UTF8" in conninfo
    uri = driver.conninfo(parse_pgsql_host("postgresql://x:y@h/other"))
    assert "dbname=other" in uri and "password=y" in uri and "user=x" in uri


@pytest.mark.parametrize(
    ("text", "kind", "name", "port"),
    [
        ("db.example.com", HostKind.INET, "db.example.com", None),
        ("inet:db:3307", HostKind.INET, "db", "3307"),
        ("db:mysql", HostKind.INET, "db", "3306"),  # a service name
        ("unix:/run/mysqld/other.sock", HostKind.UNIX, "/run/mysqld/other.sock", None),
        ("localhost", HostKind.UNIX, None, None),  # the default socket
        ("LOCALHOST:3306", HostKind.UNIX, None, "3306"),
    ],
)
def test_mysql_hosts(text: str, kind: HostKind, name: str | None, port: str | None) -> None:
    host = parse_mysql_host(text)
    assert (host.kind, host.name, host.port) == (kind, name, port)
    assert DEFAULT_SOCKET.startswith("/")


def test_mysql_unknown_service_is_an_error() -> None:
    with pytest.raises(MapError, match="unknown service"):
        parse_mysql_host("db:no-such-service-here")


# ------------------------------------------------------------ the registry


@pytest.mark.parametrize("table_type", ["pgsql", "mysql", "sqlite"])
def test_obsolete_main_cf_form_is_refused(table_type: str) -> None:
    with pytest.raises(MapError, match="obsolete form"):
        validate_spec(f"{table_type}:aliases", OpenOptions("/"))
    with pytest.raises(MapError, match="missing configuration file"):
        validate_spec(f"{table_type}:", OpenOptions("/"))
    validate_spec(f"{table_type}:/etc/postfix/x.cf", OpenOptions("/"))
    validate_spec(f"{table_type}:./x.cf", OpenOptions("/"))


@pytest.mark.parametrize("table_type", ["pgsql", "mysql", "sqlite"])
def test_sql_tables_cannot_be_written(table_type: str) -> None:
    with pytest.raises(MapError, match="cannot be written"):
        validate_spec(f"{table_type}:/x.cf", OpenOptions("/", writable=True))


def test_a_missing_driver_says_which_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes the import fail, as a missing package does.
    monkeypatch.setitem(sys.modules, "pymysql", None)
    cf = tmp_path / "my.cf"
    cf.write_text("dbname = mail\nquery = SELECT 1\n")
    with pytest.raises(MapError, match=r"pip install 'postfix-bridge\[mysql\]'"):
        open_map(f"mysql:{cf}", OpenOptions(str(tmp_path)))


def test_pgsql_needs_dbname_for_non_uri_hosts(tmp_path: Path) -> None:
    cf = tmp_path / "pg.cf"
    cf.write_text("hosts = db\nquery = SELECT 1\n")
    with pytest.raises(MapError, match="dbname: required for host db"):
        open_map(f"pgsql:{cf}", OpenOptions(str(tmp_path)))
    cf.write_text("hosts = postgresql://db/mail\nquery = SELECT 1\n")
    table = open_map(f"pgsql:{cf}", OpenOptions(str(tmp_path)))
    assert isinstance(table, HealthReporting)


def test_mysql_needs_dbname(tmp_path: Path) -> None:
    cf = tmp_path / "my.cf"
    cf.write_text("hosts = db\nquery = SELECT 1\n")
    with pytest.raises(MapError, match="dbname: required parameter"):
        open_map(f"mysql:{cf}", OpenOptions(str(tmp_path)))


def test_the_table_timeout_is_the_lookup_bound(tmp_path: Path) -> None:
    cf = tmp_path / "pg.cf"
    cf.write_text("hosts = db\ndbname = mail\nquery = SELECT 1\n")
    table = open_map(f"pgsql:{cf}", OpenOptions(str(tmp_path), timeout=3))
    assert isinstance(table, SqlMap) and table.timeout == 3
    default = open_map(f"pgsql:{cf}", OpenOptions(str(tmp_path)))
    assert isinstance(default, SqlMap) and default.timeout == 10


# ------------------------------------------------------------ sqlite files


def make_db(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE aliases (address TEXT, goto TEXT, extra TEXT)")
        connection.executemany(
            "INSERT INTO aliases VALUES (?, ?, ?)",
            [
                ("alice@example.com", "a1@example.net", "x"),
                ("alice@example.com", "a2@example.net", None),
                ("o'brien@example.com", "ob@example.net", None),
                ("null@example.com", None, "x"),
                ("empty@example.com", "", None),
                ("int@example.com", 42, None),
                ("real@example.com", 1e20, None),
                ("blob@example.com", b"bl\0ob", None),
                ("utf8@example.com", "Jürgen@example.net", None),
            ],
        )
        connection.execute("CREATE TABLE domains (domain TEXT)")
        connection.execute("INSERT INTO domains VALUES ('example.com')")


def sqlite_table(tmp_path: Path, query: str, extra: str = "", name: str = "t.cf") -> Any:
    db = tmp_path / "a.db"
    if not db.exists():
        make_db(db)
    cf = tmp_path / name
    cf.write_text(f"dbpath = {db}\nquery = {query}\n{extra}")
    return open_map(f"sqlite:{cf}", OpenOptions(str(tmp_path)))


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (b"alice@example.com", Found(b"a1@example.net,a2@example.net")),  # first column only
        (b"o'brien@example.com", Found(b"ob@example.net")),
        (b"null@example.com", NOT_FOUND),
        (b"empty@example.com", NOT_FOUND),
        (b"int@example.com", Found(b"42")),
        (b"real@example.com", Found(b"1.0e+20")),  # sqlite's own text conversion
        (b"blob@example.com", Found(b"bl")),  # cut at NUL
        (b"utf8@example.com", Found("Jürgen@example.net".encode())),
        (b"x'; DROP TABLE aliases; --", NOT_FOUND),
        (b"\xff@example.com", NOT_FOUND),  # not UTF-8: skipped, as dict_sqlite does
    ],
)
async def test_sqlite_lookups(tmp_path: Path, key: bytes, expected: object) -> None:
    table = sqlite_table(tmp_path, "SELECT goto, extra FROM aliases WHERE address='%s'; DELETE")
    assert await table.lookup(key) == expected
    await table.aclose()
    with sqlite3.connect(tmp_path / "a.db") as connection:
        assert connection.execute("SELECT count(*) FROM aliases").fetchone() == (9,)


async def test_sqlite_prepare_error_is_perm_and_the_table_keeps_working(tmp_path: Path) -> None:
    table = sqlite_table(tmp_path, "SELECT nosuchcolumn FROM aliases WHERE address='%s'")
    outcome = await table.lookup(b"alice@example.com")
    assert isinstance(outcome, ConfigFailure) and "prepare" in outcome.reason
    assert isinstance(await table.lookup(b"alice@example.com"), ConfigFailure)


async def test_sqlite_is_opened_read_only(tmp_path: Path) -> None:
    table = sqlite_table(tmp_path, "DELETE FROM aliases WHERE address='%s'")
    outcome = await table.lookup(b"alice@example.com")
    assert isinstance(outcome, Retry) and "readonly" in outcome.reason
    with sqlite3.connect(tmp_path / "a.db") as connection:
        assert connection.execute("SELECT count(*) FROM aliases").fetchone() == (9,)


def test_sqlite_missing_or_broken_file_is_a_configuration_error(tmp_path: Path) -> None:
    cf = tmp_path / "t.cf"
    cf.write_text(f"dbpath = {tmp_path}/missing.db\nquery = SELECT 1\n")
    with pytest.raises(MapError, match="cannot open"):
        open_map(f"sqlite:{cf}", OpenOptions(str(tmp_path)))
    assert not (tmp_path / "missing.db").exists()  # 3.10+: never created
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    cf.write_text(f"dbpath = {tmp_path}/junk.db\nquery = SELECT 1\n")
    with pytest.raises(MapError, match="cannot read"):
        open_map(f"sqlite:{cf}", OpenOptions(str(tmp_path)))
    cf.write_text("query = SELECT 1\n")
    with pytest.raises(MapError, match="dbpath: required"):
        open_map(f"sqlite:{cf}", OpenOptions(str(tmp_path)))


async def test_sqlite_domain_items_and_sql_as_a_domain_table(tmp_path: Path) -> None:
    # An SQL table inside an SQL table's domain list, and an inline one.
    sqlite_table(tmp_path, "SELECT 1", name="unused.cf")
    domains = tmp_path / "domains.cf"
    domains.write_text(
        f"dbpath = {tmp_path}/a.db\nquery = SELECT domain FROM domains WHERE domain='%s'\n"
    )
    table = sqlite_table(
        tmp_path,
        "SELECT goto FROM aliases WHERE address='%s'",
        f"domain = sqlite:{domains}, inline:{{other.example=x}}\n",
    )
    assert await table.lookup(b"alice@example.com") == Found(b"a1@example.net,a2@example.net")
    assert await table.lookup(b"alice@example.org") == NOT_FOUND
    await table.aclose()


def test_a_domain_list_that_leads_back_to_its_table_is_refused(tmp_path: Path) -> None:
    make_db(tmp_path / "a.db")
    cf = tmp_path / "loop.cf"
    cf.write_text(f"dbpath = {tmp_path}/a.db\nquery = SELECT 1\ndomain = sqlite:{cf}\n")
    with pytest.raises(MapError, match="leads back"):
        open_map(f"sqlite:{cf}", OpenOptions(str(tmp_path)))


async def test_sqlite_health_names_the_file(tmp_path: Path) -> None:
    table = sqlite_table(tmp_path, "SELECT goto FROM aliases WHERE address='%s'")
    (part,) = await table.health()
    assert part.name == f"file {tmp_path}/a.db" and part.ok


async def test_sqlite_expansion_limit_and_result_format(tmp_path: Path) -> None:
    table = sqlite_table(
        tmp_path,
        "SELECT goto FROM aliases WHERE address='%s'",
        "expansion_limit = 1\nresult_format = <%s> for %U\n",
    )
    assert await table.lookup(b"o'brien@example.com") == Found(b"<ob@example.net> for o'brien")
    assert isinstance(await table.lookup(b"alice@example.com"), Retry)
