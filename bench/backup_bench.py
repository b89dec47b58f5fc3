"""Memcache in front of PostgreSQL: Postfix's native ``memcache:`` against the bridge.

Not a test: it measures and prints. Run from the repository root, as root
(PostgreSQL is started as user postgres):

    .venv/bin/python -m bench.backup_bench [--keys 20000] [--clients 32] [--rounds 3]

Theory of operation
-------------------
One throwaway PostgreSQL holds ``--keys`` aliases; one ``pgsql_table(5)``
file describes them. Two empty memcacheds stand in front of it: NATIVE is
Postfix's own ``memcache:`` table (``backup = pgsql:...``), BRIDGE the
bridge reading an identical memcache_table(5) file, asked over socketmap.
Each round empties both memcacheds and times, for each side in turn,
``--clients`` concurrent ``postmap -q -`` processes over disjoint slices
of every key twice:

* first pass: every key misses memcache, is read from PostgreSQL and
  refilled;
* second pass: every key is in memcache.

Every client's output is checked against the expected values. Then the
single-flight check: memcache emptied, ``--clients`` clients each ask for
the same ``--hot-keys`` keys at once; PostgreSQL logs every statement
(``log_statement = all``), and the statements counted in its log say how
many queries each side sent (the bridge should send one per key).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.compare import (
    bench_key,
    bench_value,
    print_machine,
    rotated,
    time_postmap_clients,
    write_slices,
)
from tests.integration.databases import DATABASE, PASSWORD, USER, Postgres, run_postgres
from tests.integration.harness import Memcached, age_file, free_port, run_bridge, run_memcached

TABLE: Final = "aliases"

#: The statement both sides send; counted in PostgreSQL's log.
_QUERY: Final = "SELECT goto FROM aliases WHERE address='%s'"

SIDES: Final = ("native", "bridge")


@dataclass(frozen=True, slots=True)
class Setup:
    """The running servers and the table names each side's clients use."""

    postgres: Postgres
    memcacheds: dict[str, Memcached]
    tables: dict[str, str]
    keys: tuple[str, ...]


def _pgsql_cf(postgres: Postgres) -> str:
    return (
        f"hosts = inet:127.0.0.1:{postgres.port}\n"
        f"user = {USER}\npassword = {PASSWORD}\ndbname = {DATABASE}\n"
        f"query = {_QUERY}\n"
    )


def _load_aliases(postgres: Postgres, keys: Sequence[str]) -> None:
    rows = ",".join(f"('{key}', '{bench_value(index)}')" for index, key in enumerate(keys))
    postgres.execute(
        f"CREATE TABLE {TABLE} (address text PRIMARY KEY, goto text);"
        f"INSERT INTO {TABLE} VALUES {rows};"
        f"GRANT SELECT ON {TABLE} TO {USER};"
    )
    # Every statement in the log: how the single-flight check counts queries.
    postgres.execute("ALTER SYSTEM SET log_statement = 'all'", database="postgres")
    postgres.execute("SELECT pg_reload_conf()", database="postgres")


@contextlib.contextmanager
def setup(directory: Path, key_count: int) -> Iterator[Setup]:
    """Start PostgreSQL with the aliases, two memcacheds, the bridge; write the .cf files."""
    keys = tuple(bench_key(index) for index in range(key_count))
    directory.chmod(0o755)  # Postfix's pgsql client runs as root here, the bridge too
    with (
        run_postgres() as postgres,
        run_memcached() as native_memcached,
        run_memcached() as bridge_memcached,
    ):
        _load_aliases(postgres, keys)
        pgsql_cf = directory / "pgsql-aliases.cf"
        pgsql_cf.write_text(_pgsql_cf(postgres))
        cf_files = {}
        for side, memcached in (("native", native_memcached), ("bridge", bridge_memcached)):
            cf = directory / f"memcache-{side}.cf"
            cf.write_text(f"memcache = {memcached.endpoint}\nbackup = pgsql:{pgsql_cf}\n")
            # Postfix waits for a .cf file changed within the last second.
            age_file(cf)
            cf_files[side] = cf
        age_file(pgsql_cf)
        port = free_port()
        config = directory / "bridge.toml"
        config.write_text(
            f'[[listen]]\nendpoint = "inet:127.0.0.1:{port}"\nprotocol = "socketmap"\n'
            f'[tables.{TABLE}]\nconfig = "{cf_files["bridge"]}"\n'
        )
        with run_bridge(config):
            yield Setup(
                postgres,
                {"native": native_memcached, "bridge": bridge_memcached},
                {
                    "native": f"memcache:{cf_files['native']}",
                    "bridge": f"socketmap:inet:127.0.0.1:{port}:{TABLE}",
                },
                keys,
            )


def _statements_logged(postgres: Postgres) -> int:
    log = (postgres.directory / "log").read_text(errors="replace")
    return log.count("statement: SELECT goto FROM aliases WHERE address=")


@dataclass
class Figures:
    first: dict[str, list[float]]
    second: dict[str, list[float]]
    hot_queries: dict[str, int]


def run(setup_: Setup, scratch: Path, clients: int, rounds: int, hot_keys: int) -> Figures:
    slices = write_slices(scratch, setup_.keys, clients)
    figures = Figures({side: [] for side in SIDES}, {side: [] for side in SIDES}, {})
    for round_number in range(rounds):
        for side in rotated(SIDES, round_number):
            setup_.memcacheds[side].flush()
            table = setup_.tables[side]
            figures.first[side].append(time_postmap_clients(table, side, slices, scratch))
            figures.second[side].append(time_postmap_clients(table, side, slices, scratch))
    hot_dir = scratch / "hot"
    hot_dir.mkdir()
    hot = write_slices(hot_dir, setup_.keys[:hot_keys], 1)[0]
    same_keys = [hot] * clients
    for side in SIDES:
        setup_.memcacheds[side].flush()
        before = _statements_logged(setup_.postgres)
        time_postmap_clients(setup_.tables[side], side, same_keys, scratch)
        figures.hot_queries[side] = _statements_logged(setup_.postgres) - before
    return figures


def report(figures: Figures, key_count: int, clients: int, hot_keys: int) -> str:
    lines = [f"{key_count} keys, {clients} clients, medians of {len(figures.first['native'])}"]
    lines.append(f"{'pass':<24}{'native s':>10}{'bridge s':>10}{'ratio':>8}")
    for name, runs in (
        ("first (from PostgreSQL)", figures.first),
        ("second (memcache)", figures.second),
    ):
        native = statistics.median(runs["native"])
        bridge = statistics.median(runs["bridge"])
        lines.append(f"{name:<24}{native:>10.2f}{bridge:>10.2f}{bridge / native:>8.2f}")
    lines.append(
        f"{clients} clients x the same {hot_keys} missing keys: PostgreSQL queries "
        + ", ".join(f"{side} {figures.hot_queries[side]}" for side in SIDES)
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hot-keys", type=int, default=100)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print_machine()
    with tempfile.TemporaryDirectory(prefix="bridge-backup-bench-") as raw:
        directory = Path(raw)
        scratch = directory / "scratch"
        scratch.mkdir()
        with setup(directory, args.keys) as running:
            figures = run(running, scratch, args.clients, args.rounds, args.hot_keys)
    print(report(figures, args.keys, args.clients, args.hot_keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
