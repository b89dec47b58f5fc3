"""SQL backups against real PostgreSQL, MariaDB and sqlite: Postfix's clients vs the bridge.

Theory of operation
-------------------
The differential test runs, for every scenario of every engine, the same
memcache_table(5) file twice, with ``backup = ENGINE:/dir/NAME.sql.cf``:

* natively: ``postmap -q KEY memcache:/dir/NAME.cf`` (Postfix's own
  memcache client and its own pgsql/mysql/sqlite client) against
  memcached A;
* through the bridge: ``postmap -q KEY socketmap:inet:...:NAME``, the
  bridge reading the identical file through ``config =`` with only
  ``memcache`` pointed at its own memcached B.

Each key must get the same answer (value, not found, error) and both
memcacheds must hold the same items afterwards (the refill). The corpus
covers every SQL rule: quoting (quotes, backslashes, injections), rows
and columns, NULL and empty fields, case folding, UTF-8, suppression,
the legacy form, result_format, expansion_limit, domain, and errors.

The installed Postfix is 3.7, whose PostgreSQL client always uses the
LATIN1 client encoding; the pgsql files here say ``encoding = LATIN1``
(3.7 ignores the parameter, the bridge follows it) so that both sides
speak the same encoding. The bridge's own default, UTF8, is checked
separately, as are the fault scenarios (server stopped, frozen with
SIGSTOP, restarted, an unreachable host in the list), which go through
a running bridge with raw socketmap clients and are recorded in the
reliability report.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.maps import OpenOptions, open_map
from bridge.maps.sql.client import SqlMap
from bridge.outcome import Found, Retry
from tests.faults.proxy import FaultProxy, Stall
from tests.integration.databases import (
    DATABASE,
    PASSWORD,
    USER,
    MariaDB,
    Postgres,
    mariadb_available,
    postgres_available,
    run_mariadb,
    run_postgres,
)
from tests.integration.harness import (
    Bridge,
    Memcached,
    age_file,
    free_port,
    postmap_query,
    run_bridge,
    run_memcached,
)
from tests.integration.sql_corpus import PLAIN, ROWS, Scenario, scenarios
from tests.integration.test_memcache_faults import Answer, SocketmapClient, Tally, timed_ask
from tests.reliability import ReliabilityReport

pytestmark = pytest.mark.skipif(
    not (postgres_available() and mariadb_available()),
    reason="needs root, PostgreSQL and MariaDB (tests/run.sh installs them)",
)

AREA = "sql backups"

#: The bound on one SQL lookup: the table's ``timeout``, whose default (2 s)
#: the tables here keep; MARGIN is scheduling slack.
SQL_BOUND = 2.0
MARGIN = 2.0

# -------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with run_postgres() as server:
        server.execute(
            "CREATE TABLE aliases (address text, goto text, extra text);"
            "CREATE TABLE domains (domain text);"
            f"GRANT SELECT ON aliases, domains TO {USER};"
            "CREATE FUNCTION lookup_alias(text) RETURNS SETOF text LANGUAGE sql STABLE AS "
            "$$ SELECT goto FROM aliases WHERE address = $1 $$;"
            f"GRANT EXECUTE ON FUNCTION lookup_alias(text) TO {USER}"
        )
        with psycopg_connection(server) as connection, connection.cursor() as cursor:
            cursor.executemany("INSERT INTO aliases VALUES (%s, %s, %s)", ROWS)
            cursor.execute("INSERT INTO domains VALUES ('example.com'), ('example.org')")
        yield server


@contextlib.contextmanager
def psycopg_connection(server: Postgres) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(
        host=server.socket_directory, port=server.port, user="postgres", dbname=DATABASE,
        autocommit=True,
    ) as connection:  # fmt: skip
        yield connection


def _mysql_literal(value: str | None) -> str:
    if value is None:
        return "NULL"
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@pytest.fixture(scope="module")
def mariadb() -> Iterator[MariaDB]:
    with run_mariadb() as server:
        rows = ",\n".join("(" + ", ".join(_mysql_literal(v) for v in row) + ")" for row in ROWS)
        server.execute(
            f"USE {DATABASE};\n"
            "CREATE TABLE aliases (address VARCHAR(200), goto VARCHAR(200), extra VARCHAR(200))"
            " CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;\n"
            f"INSERT INTO aliases VALUES {rows};\n"
            "CREATE TABLE domains (domain VARCHAR(200));\n"
            "INSERT INTO domains VALUES ('example.com'), ('example.org');\n"
        )
        yield server


@pytest.fixture(scope="module")
def sqlite_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite") / "aliases.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE aliases (address TEXT, goto TEXT, extra TEXT)")
        connection.executemany("INSERT INTO aliases VALUES (?, ?, ?)", ROWS)
        connection.execute("CREATE TABLE domains (domain TEXT)")
        connection.execute("INSERT INTO domains VALUES ('example.com'), ('example.org')")
    connection.close()
    return path


def connection_lines(engine: str, server: Postgres | MariaDB | Path, *, port: int = 0) -> str:
    """The connection part of an SQL .cf file for ``engine``."""
    if isinstance(server, Path):
        return f"dbpath = {server}\n"
    host = f"hosts = {server.host}:{port or server.port}\n"
    lines = f"{host}user = {USER}\npassword = {PASSWORD}\ndbname = {DATABASE}\n"
    if engine == "pgsql":
        # Postfix 3.7 always uses LATIN1 (it ignores this line); so does the bridge here.
        lines += "encoding = LATIN1\n"
    return lines


# ---------------------------------------------------------- differential


@dataclass
class EngineRun:
    """One engine's scenarios: its memcacheds, files and answers."""

    engine: str
    connection: str
    native: Memcached
    bridged: Memcached
    scenarios: list[Scenario] = field(default_factory=list)
    compared: int = 0
    mismatches: list[str] = field(default_factory=list)
    #: how many answers of each kind (found, notfound, error) both sides gave
    kinds: dict[str, int] = field(default_factory=dict)


def _compare_items(label: str, native: Memcached, bridged: Memcached) -> list[str]:
    keys = set(native.items()) | set(bridged.items())
    return [
        f"{label}: memcache item {key!r}: postfix {native.get(key)!r} bridge {bridged.get(key)!r}"
        for key in sorted(keys)
        if native.get(key) != bridged.get(key)
    ]


def _run_engine(run: EngineRun, directory: Path, sm_port: int) -> None:
    for scenario in run.scenarios:
        name = f"{run.engine}_{scenario.name}"
        run.native.flush()
        run.bridged.flush()
        native_table = f"memcache:{directory}/{name}.cf"
        bridge_table = f"socketmap:inet:127.0.0.1:{sm_port}:{name}"
        for key in scenario.keys:
            # Both at once: a fatal postmap exit sleeps a second (PM-1).
            with ThreadPoolExecutor(max_workers=1) as pool:
                native_answer = pool.submit(postmap_query, key, native_table)
                ours = postmap_query(key, bridge_table)
                theirs = native_answer.result()
            run.compared += 1
            kind = theirs.outcome.partition(":")[0]
            run.kinds[kind] = run.kinds.get(kind, 0) + 1
            if theirs.outcome != ours.outcome:
                run.mismatches.append(
                    f"{name} key {key!r}: postfix {theirs.outcome!r} ({theirs.stderr.strip()!r})"
                    f" bridge {ours.outcome!r} ({ours.stderr.strip()!r})"
                )
        run.mismatches += _compare_items(name, run.native, run.bridged)


def test_postfix_and_bridge_agree_on_sql_backups(
    tmp_path: Path, postgres: Postgres, mariadb: MariaDB, sqlite_db: Path
) -> None:
    directory = tmp_path
    sm_port = free_port()
    engines: dict[str, Postgres | MariaDB | Path] = {
        "pgsql": postgres,
        "mysql": mariadb,
        "sqlite": sqlite_db,
    }
    with contextlib.ExitStack() as stack:
        runs = [
            EngineRun(
                engine,
                connection_lines(engine, server),
                stack.enter_context(run_memcached()),
                stack.enter_context(run_memcached()),
                scenarios(engine),
            )
            for engine, server in engines.items()
        ]
        toml = [f'[[listen]]\nendpoint = "inet:127.0.0.1:{sm_port}"\nprotocol = "socketmap"\n']
        for run in runs:
            domains = directory / f"{run.engine}_domains.sql.cf"
            domains.write_text(
                run.connection + "query = SELECT domain FROM domains WHERE domain='%s'\n"
            )
            age_file(domains)
            for scenario in run.scenarios:
                name = f"{run.engine}_{scenario.name}"
                sql_cf = directory / f"{name}.sql.cf"
                sql_cf.write_text(run.connection + scenario.sql)
                cf = directory / f"{name}.cf"
                cf.write_text(
                    f"memcache = inet:127.0.0.1:{run.native.port}\n"
                    f"backup = {run.engine}:{sql_cf}\nkey_format = {scenario.name}:%s\n"
                    + scenario.memcache.replace("@DOMAINS@", f"{run.engine}:{domains}")
                )
                age_file(sql_cf)
                age_file(cf)
                toml.append(
                    f'[tables.{name}]\nconfig = "{cf}"\n'
                    f'memcache = "inet:127.0.0.1:{run.bridged.port}"\n'
                )
        config = directory / "bridge.toml"
        config.write_text("\n".join(toml))
        with run_bridge(config), ThreadPoolExecutor(max_workers=len(runs)) as pool:
            for future in [pool.submit(_run_engine, run, directory, sm_port) for run in runs]:
                future.result()

    mismatches = [m for run in runs for m in run.mismatches]
    compared = {run.engine: run.compared for run in runs}
    assert not mismatches, f"{len(mismatches)} differ ({compared}):\n" + "\n".join(mismatches)
    kinds = {run.engine: run.kinds for run in runs}
    print(f"compared lookups: {compared}; answers: {kinds}")
    assert sum(compared.values()) >= 350, compared
    assert min(compared.values()) >= 110, compared
    for run in runs:
        # Every kind of answer is in each engine's corpus, in numbers.
        assert run.kinds.get("found", 0) >= 40, (run.engine, run.kinds)
        assert run.kinds.get("notfound", 0) >= 40, (run.engine, run.kinds)
        assert run.kinds.get("error", 0) >= 4, (run.engine, run.kinds)


# ------------------------------------------------- UTF-8 and quoting, bridge only


def open_sql(tmp_path: Path, engine: str, text: str, name: str = "t.cf") -> SqlMap[object]:
    cf = tmp_path / name
    cf.write_text(text)
    table = open_map(f"{engine}:{cf}", OpenOptions(str(tmp_path), timeout=5))
    assert isinstance(table, SqlMap)
    return table


async def test_utf8_is_the_pgsql_default_and_utf8mb4_the_mysql_one(
    tmp_path: Path, postgres: Postgres, mariadb: MariaDB
) -> None:
    # Postfix 3.8+ (encoding) and 3.9+ (charset) defaults, not 3.7's LATIN1.
    pg = open_sql(
        tmp_path,
        "pgsql",
        f"hosts = {postgres.host}:{postgres.port}\nuser = {USER}\npassword = {PASSWORD}\n"
        f"dbname = {DATABASE}\nquery = {PLAIN}\n",
        "pg.cf",
    )
    my = open_sql(tmp_path, "mysql", connection_lines("mysql", mariadb) + f"query = {PLAIN}\n")
    for table in (pg, my):
        assert await table.lookup("jürgen@example.com".encode()) == Found(
            "jürgen@example.de".encode()
        )
        assert await table.lookup(b"euro@example.com") == Found("€uro@example.eu".encode())
        assert await table.lookup("café@example.com".encode()) == Found("café@example.fr".encode())
        await table.aclose()


KEYS = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"),
    min_size=1,
    max_size=40,
)


@pytest.mark.parametrize("engine", ["pgsql", "mysql", "mysql-no-backslash", "sqlite"])
def test_a_key_never_leaves_its_literal(
    tmp_path_factory: pytest.TempPathFactory,
    engine: str,
    postgres: Postgres,
    mariadb: MariaDB,
    sqlite_db: Path,
) -> None:
    # SELECT '%s' answers the key itself, whatever it holds, when quoting is right.
    directory = tmp_path_factory.mktemp(engine)
    kind = engine.partition("-")[0]
    servers: dict[str, Postgres | MariaDB | Path] = {"pgsql": postgres, "mysql": mariadb}
    server = servers.get(kind, sqlite_db)
    lines = connection_lines(kind, server).replace("LATIN1", "UTF8")
    if engine == "mysql-no-backslash":
        mariadb.execute("SET GLOBAL sql_mode = 'NO_BACKSLASH_ESCAPES'")
    try:
        table = open_sql(directory, kind, lines + "query = SELECT '%s'\n")

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(KEYS)
        def check(key: str) -> None:
            outcome = trio.run(table.lookup, key.encode())
            assert outcome == Found(key.encode()), (key, outcome)

        check()
        trio.run(table.aclose)
    finally:
        if engine == "mysql-no-backslash":
            mariadb.execute("SET GLOBAL sql_mode = DEFAULT")


# ---------------------------------------------------------------- faults


@dataclass
class FaultRig:
    """A bridge with one table per server engine, each backed by memcached and SQL."""

    bridge: Bridge
    address: tuple[str, int]
    memcached: Memcached


@pytest.fixture
def fault_rig(tmp_path: Path, postgres: Postgres, mariadb: MariaDB) -> Iterator[FaultRig]:
    port = free_port()
    with run_memcached() as memcached:
        toml = [f'[[listen]]\nendpoint = "inet:127.0.0.1:{port}"\nprotocol = "socketmap"\n']
        for engine, server in (("pgsql", postgres), ("mysql", mariadb)):
            cf = tmp_path / f"{engine}.sql.cf"
            cf.write_text(connection_lines(engine, server) + f"query = {PLAIN}\n")
            toml.append(
                f'[tables.{engine}]\nmemcache = "{memcached.endpoint}"\n'
                f'backup = "{engine}:{cf}"\nkey_format = "{engine}:%s"\nttl = 1\n'
            )
        config = tmp_path / "bridge.toml"
        config.write_text("\n".join(toml))
        with run_bridge(config) as bridge:
            yield FaultRig(bridge, ("127.0.0.1", port), memcached)


#: (key, expected) asked during faults: found and not-found keys.
FAULT_KEYS: tuple[tuple[bytes, bytes | None], ...] = (
    (b"alice@example.com", b"one@example.net,three@example.net"),
    (b"o'brien@example.com", b"obrien@example.net"),
    (b"nobody@example.com", None),
)


def ask_all(rig: FaultRig, table: str, rounds: int = 1) -> list[Answer]:
    """Each fault key ``rounds`` times on one connection; memcache is flushed before each."""
    answers = []
    with SocketmapClient(rig.address) as client:
        for _ in range(rounds):
            for key, expected in FAULT_KEYS:
                rig.memcached.flush()
                answers.append(timed_ask(client, table, key, expected))
    return answers


def record(
    reliability: ReliabilityReport, scenario: str, answers: Sequence[Answer], bound: str
) -> Tally:
    tally = Tally.of(answers)
    reliability.record(
        AREA,
        scenario,
        requests=tally.requests,
        correct=tally.correct,
        temporary=tally.temporary,
        wrong=len(tally.wrong),
        bound=bound,
    )
    tally.assert_none_wrong()
    return tally


@pytest.mark.parametrize("engine", ["pgsql", "mysql"])
def test_stopped_then_restarted_database(
    fault_rig: FaultRig,
    engine: str,
    postgres: Postgres,
    mariadb: MariaDB,
    reliability: ReliabilityReport,
) -> None:
    server: Postgres | MariaDB = postgres if engine == "pgsql" else mariadb
    before = ask_all(fault_rig, engine)
    assert Tally.of(before).correct == len(before)
    server.stop()
    try:
        down = ask_all(fault_rig, engine, rounds=3)
    finally:
        server.start()
    slowest = max(answer.latency for answer in down)
    tally = record(reliability, f"{engine} server stopped", down, f"slowest {slowest:.2f} s")
    assert tally.temporary == len(down)  # refused at once: TEMP, never "not found"
    assert slowest < SQL_BOUND
    # Back without restarting the bridge: the dead pooled connection is
    # replaced within the first lookup (a single host is never penalised).
    after = ask_all(fault_rig, engine, rounds=2)
    tally = record(reliability, f"{engine} server restarted", after, "first lookup answers")
    assert tally.correct == len(after)


def test_frozen_databases_answer_temp_within_the_bound(
    fault_rig: FaultRig, postgres: Postgres, mariadb: MariaDB, reliability: ReliabilityReport
) -> None:
    # Warm both tables (pooled connections), then SIGSTOP both servers.
    for engine in ("pgsql", "mysql"):
        ask_all(fault_rig, engine)
    fault_rig.memcached.flush()
    postgres.pause()
    mariadb.pause()
    # Six different keys per table: more than its four worker threads, so
    # two lookups also wait for a thread, within the same bound.
    keys = [(b"frozen-%d@example.com" % index, None) for index in range(6)]
    results: dict[str, list[Answer]] = {}
    try:
        with ThreadPoolExecutor(max_workers=12) as pool:
            futures = [
                (engine, pool.submit(_ask_one, fault_rig, engine, key))
                for engine in ("pgsql", "mysql")
                for key in keys
            ]
            for engine, future in futures:
                results.setdefault(engine, []).append(future.result())
    finally:
        postgres.resume()
        mariadb.resume()
    for engine, answers in results.items():
        slowest = max(answer.latency for answer in answers)
        tally = record(
            reliability,
            f"{engine} server frozen (SIGSTOP), 6 concurrent keys",
            answers,
            f"TEMP after at most {slowest:.2f} s (time limit {SQL_BOUND:g} s)",
        )
        assert tally.temporary == len(answers)
        assert slowest < SQL_BOUND + MARGIN
    for engine in ("pgsql", "mysql"):
        after = ask_all(fault_rig, engine, rounds=2)
        tally = record(reliability, f"{engine} server thawed", after, "answers again")
        assert tally.correct == len(after)


def _ask_one(rig: FaultRig, table: str, item: tuple[bytes, bytes | None]) -> Answer:
    with SocketmapClient(rig.address) as client:
        return timed_ask(client, table, *item)


@contextlib.contextmanager
def silent_unix_listener(path: Path) -> Iterator[None]:
    """A unix socket that accepts connections (into its backlog) and never answers."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(64)
        yield
    finally:
        listener.close()


def test_unreachable_hosts_in_the_list_are_skipped(
    tmp_path: Path, postgres: Postgres, mariadb: MariaDB, reliability: ReliabilityReport
) -> None:
    # Each table lists, before the real server: a unix socket that never
    # answers (unix sockets are tried first, so it always is), a refused
    # port, and the fault proxy stalling every reply, in front of the real
    # server. A lookup gets the real server's answer or TEMP within the
    # bound, never "not found"; the dead hosts are then skipped.
    port = free_port()
    refused = free_port()
    silent = tmp_path / "silent"
    silent.mkdir()
    with contextlib.ExitStack() as stack:
        memcached = stack.enter_context(run_memcached())
        # pgsql names a socket directory (libpq's default port 5432), mysql a socket file.
        stack.enter_context(silent_unix_listener(silent / ".s.PGSQL.5432"))
        stack.enter_context(silent_unix_listener(silent / "mysqld.sock"))
        toml = [f'[[listen]]\nendpoint = "inet:127.0.0.1:{port}"\nprotocol = "socketmap"\n']
        for engine, server in (("pgsql", postgres), ("mysql", mariadb)):
            stalled = stack.enter_context(FaultProxy(server.port))
            stalled.set_fault(Stall())
            unix = f"unix:{silent}" if engine == "pgsql" else f"unix:{silent}/mysqld.sock"
            hosts = (
                f"{unix}, 127.0.0.1:{refused}, 127.0.0.1:{stalled.port}, "
                f"{server.host}:{server.port}"
            )
            cf = tmp_path / f"{engine}.sql.cf"
            cf.write_text(
                connection_lines(engine, server).replace(
                    f"hosts = {server.host}:{server.port}", f"hosts = {hosts}"
                )
                + f"query = {PLAIN}\n"
            )
            toml.append(
                f'[tables.{engine}]\nmemcache = "{memcached.endpoint}"\n'
                f'backup = "{engine}:{cf}"\nkey_format = "{engine}:%s"\n'
            )
        config = tmp_path / "bridge.toml"
        config.write_text("\n".join(toml))
        rig = FaultRig(stack.enter_context(run_bridge(config)), ("127.0.0.1", port), memcached)
        for engine in ("pgsql", "mysql"):
            answers = ask_all(rig, engine, rounds=4)
            first, slowest = answers[0].latency, max(answer.latency for answer in answers)
            tally = record(
                reliability,
                f"{engine}: silent, refused and stalled hosts listed before the server",
                answers,
                f"first lookup {first:.2f} s, slowest {slowest:.2f} s (limit {SQL_BOUND:g} s)",
            )
            assert tally.correct == len(answers), tally
            # The silent unix socket cost the first lookup a share of the
            # bound; the later ones go straight to the connected server.
            assert first < SQL_BOUND + MARGIN
            assert max(answer.latency for answer in answers[1:]) < first


def test_health_reports_hosts_without_password(
    fault_rig: FaultRig, postgres: Postgres, tmp_path: Path
) -> None:
    table = open_sql(
        tmp_path,
        "pgsql",
        f"hosts = 127.0.0.1:{free_port()}, postgresql://{USER}:{quote(PASSWORD, safe='')}"
        f"@127.0.0.1:{postgres.port}/{DATABASE}?client_encoding=UTF8\npassword = {PASSWORD}\n"
        f"dbname = {DATABASE}\nquery = {PLAIN}\n",
    )

    async def probe() -> None:
        for _ in range(3):
            outcome = await table.lookup(b"alice@example.com")
            assert not isinstance(outcome, Retry), outcome
        report = await table.health()
        assert PASSWORD not in repr(report) and "s3cr3t" not in repr(report)
        states = {part.ok for part in report}
        assert states == {True, False}, report
        await table.aclose()

    trio.run(probe)
