"""``postfix-bridge migrate``: the command around :mod:`bridge.migrate`'s plan.

Theory of operation
-------------------
Everything that touches the outside world is here; the decisions are in
:mod:`bridge.migrate`::

    postconf -c DIR -n / -P / -x      read with Postfix's own tool
      ──► make_plan()                 (pure)
      ──► each table loaded by the bridge's own loader; a .cf file it
          cannot use (unreadable, syntax, unsupported backup) is refused
          and the plan made again without it
      ──► bridge.toml (--output), the postconf commands
      ──► --verify: postmap -q KEY memcache:FILE vs socketmap:...:NAME,
          keys from --keys or from the table's backup (the bridge's dump)
      ──► --apply (only after --verify passed): main.cf and master.cf
          copied first; every command run and its result read back with
          postconf; on any failure both files are restored.

Exit statuses (:data:`EXIT_STATUSES`, README *Migrating from memcache:*):
0 everything migrated; 1 --verify found a difference (nothing applied);
2 usage; 3 some tables left alone (reported on stderr; the rest was
done); 71 --apply failed and main.cf/master.cf were restored; 78 the
Postfix configuration cannot be read, or the output file differs from
the plan under --verify.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from bridge.config import ConfigError, load_config
from bridge.endpoint import EndpointError, parse_endpoint
from bridge.maps.base import MapError
from bridge.migrate import (
    SETTINGS_PARAMETERS,
    Location,
    Plan,
    PlannedTable,
    PostfixSettings,
    make_plan,
    parse_postconf,
    parse_postconf_master,
    postfix_spec,
    render_toml,
)
from bridge.table import NoSequence, close_tables, open_tables

EXIT_OK = 0
EXIT_DIFFERENT = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_APPLY_FAILED = 71
EXIT_CONFIG = 78

EXIT_STATUSES = {
    EXIT_OK: "every memcache: table migrated (and verified, applied, as asked)",
    EXIT_DIFFERENT: "--verify found a difference, or a table with no keys to compare; "
    "nothing applied",
    EXIT_USAGE: "usage error (--apply without --verify, bad option)",
    EXIT_REFUSED: "some tables cannot be migrated: named on stderr and left unchanged; "
    "the others were planned, verified and applied as asked",
    EXIT_APPLY_FAILED: "a postconf command of --apply failed: main.cf and master.cf restored",
    EXIT_CONFIG: "the Postfix configuration cannot be read, or --output differs from the "
    "plan under --verify",
}

DEFAULT_POSTFIX_DIR = "/etc/postfix"
DEFAULT_LISTEN = "inet:127.0.0.1:10027"
#: Suffix of the copies of main.cf and master.cf --apply takes first.
BACKUP_SUFFIX = ".before-migrate"
#: Upper bound for one postconf or postmap run.
COMMAND_TIMEOUT = 120.0


class MigrateError(Exception):
    """A step failed; the message says which, ``status`` is the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _say(message: str) -> None:
    print(f"postfix-bridge: migrate: {message}", file=sys.stderr)


def _postconf(config_dir: str, *args: str) -> str:
    try:
        completed = subprocess.run(
            [_tool("postconf"), "-c", config_dir, *args],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MigrateError(f"postconf: {exc}", EXIT_CONFIG) from None
    if completed.returncode != 0:
        raise MigrateError(
            f"postconf -c {config_dir} {' '.join(args)}: {completed.stderr.strip()}", EXIT_CONFIG
        )
    return completed.stdout


@dataclass(frozen=True)
class PostfixConfig:
    """What postconf says about one configuration directory."""

    config_dir: str
    main: dict[str, str]
    master: dict[Location, str]
    settings: PostfixSettings


def read_postfix(config_dir: str) -> PostfixConfig:
    main = parse_postconf(_postconf(config_dir, "-n"))
    master = parse_postconf_master(_postconf(config_dir, "-P"))
    settings = parse_postconf(_postconf(config_dir, "-x", *SETTINGS_PARAMETERS))
    return PostfixConfig(config_dir, main, master, PostfixSettings.from_postconf(settings))


# ---------------------------------------------------------------- planning


@contextlib.contextmanager
def _temporary_toml(text: str) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="postfix-bridge-migrate-") as directory:
        path = os.path.join(directory, "bridge.toml")
        Path(path).write_text(text)
        yield path


def _loads(text: str) -> ConfigError | None:
    """Whether the bridge can load and open a configuration (as ``check`` does)."""
    with _temporary_toml(text) as path:
        try:
            config = load_config(path)
            tables = open_tables(config)
        except ConfigError as exc:
            return exc
        trio.run(close_tables, tables)
    return None


def _one_table(plan: Plan, table: PlannedTable) -> str:
    single = Plan(plan.listen, plan.config_dir, (table,), {}, {})
    return render_toml(single)


def plan_migration(postfix: PostfixConfig, listen: str) -> Plan:
    """The plan, without the tables the bridge cannot load (refused, with the reason)."""
    unusable: dict[str, str] = {}
    while True:
        plan = make_plan(
            postfix.main,
            postfix.master,
            postfix.settings,
            listen=listen,
            config_dir=postfix.config_dir,
            unusable=unusable,
        )
        found = False
        for table in plan.tables:
            problem = _loads(_one_table(plan, table))
            if problem is not None and table.file not in unusable:
                reasons = "; ".join(str(p) for p in problem.problems)
                unusable[table.file] = f"the bridge cannot load it: {reasons}"
                found = True
        if not found:
            return plan


# ------------------------------------------------------------------ verify


def _keys_from_file(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise MigrateError(f"--keys {path}: {exc.strerror or exc}", EXIT_CONFIG) from None
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


async def _backup_keys(config_path: str) -> dict[str, list[str] | str]:
    """Per table: the keys of its backup (the bridge's own ``dump``), or why there are none."""
    config = load_config(config_path)
    tables = open_tables(config)
    keys: dict[str, list[str] | str] = {}
    try:
        for name, table in tables.items():
            try:
                keys[name] = [
                    key.decode("utf-8", "surrogateescape") async for key, _ in table.sequence()
                ]
            except (NoSequence, MapError) as exc:
                keys[name] = str(exc)
    finally:
        await close_tables(tables)
    return keys


@dataclass(frozen=True)
class Answer:
    status: int
    output: str
    error: str


def _postmap(config_dir: str, table: str, keys: Sequence[str]) -> Answer:
    """``postmap -c DIR -q - TABLE``: one run for all keys."""
    completed = subprocess.run(
        [_tool("postmap"), "-c", config_dir, "-q", "-", table],
        input="".join(key + "\n" for key in keys).encode("utf-8", "surrogateescape"),
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    return Answer(
        completed.returncode,
        completed.stdout.decode("utf-8", "surrogateescape"),
        completed.stderr.decode("utf-8", "surrogateescape"),
    )


def _postmap_one(config_dir: str, table: str, key: str) -> Answer:
    completed = subprocess.run(
        [_tool("postmap"), "-c", config_dir, "-q", key, table],
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    return Answer(
        completed.returncode,
        completed.stdout.decode("utf-8", "surrogateescape"),
        # The last line says why (postmap: fatal: ...); the warnings before repeat it.
        (completed.stderr.decode("utf-8", "surrogateescape").strip().splitlines() or [""])[-1],
    )


def _fatal(answer: Answer) -> bool:
    return "fatal:" in answer.error


def compare_table(plan: Plan, table: PlannedTable, keys: Sequence[str]) -> list[str]:
    """The keys whose ``postmap -q`` answers differ between memcache: and the bridge."""
    native = f"memcache:{table.file}"
    bridged = postfix_spec(plan.listen, table.name, proxied=False)
    config_dir = plan.config_dir
    first, second = _postmap(config_dir, native, keys), _postmap(config_dir, bridged, keys)
    if (first.status, first.output) == (second.status, second.output) and not (
        _fatal(first) or _fatal(second)
    ):
        return []
    differences: list[str] = []
    for key in keys:
        one, other = _postmap_one(config_dir, native, key), _postmap_one(config_dir, bridged, key)
        if (one.status, one.output) != (other.status, other.output) or _fatal(one) != _fatal(other):
            differences.append(
                f"table {table.name}: key {key!r}: {native}: exit {one.status} "
                f"{one.output.strip()!r} {one.error!r}; {bridged}: exit {other.status} "
                f"{other.output.strip()!r} {other.error!r}"
            )
    return differences


def verify(plan: Plan, config_path: str, keys_file: str | None) -> list[str]:
    """Every difference between Postfix's memcache: client and the running bridge."""
    given = _keys_from_file(keys_file) if keys_file is not None else None
    backup_keys = {} if given is not None else trio.run(_backup_keys, config_path)
    problems: list[str] = []
    for table in plan.tables:
        keys = given if given is not None else backup_keys.get(table.name, "no backup")
        if isinstance(keys, str):
            problems.append(
                f"table {table.name}: no keys to compare ({keys}); give them with --keys FILE"
            )
            continue
        if not keys:
            problems.append(f"table {table.name}: no keys to compare (the backup is empty)")
            continue
        table_problems = compare_table(plan, table, keys)
        problems += table_problems
        if not table_problems:
            _say(f"verified table {table.name}: {len(keys)} keys answer alike")
    return problems


# ------------------------------------------------------------------- apply


def _read_back(postfix_dir: str) -> tuple[dict[str, str], dict[Location, str]]:
    return (
        parse_postconf(_postconf(postfix_dir, "-n")),
        parse_postconf_master(_postconf(postfix_dir, "-P")),
    )


def _run_commands(plan: Plan) -> None:
    """Run each postconf command, then check that postconf reads every change back."""
    for command in plan.commands(_tool("postconf")):
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
        # postconf -P only warns about a service it cannot find: the read-back catches it.
        if completed.returncode != 0:
            raise MigrateError(
                f"{shlex.join(command)}: exit {completed.returncode}: {completed.stderr.strip()}",
                EXIT_APPLY_FAILED,
            )
    main, master = _read_back(plan.config_dir)
    for location, value in plan.changes.items():
        now = master.get(location) if location.in_master else main.get(location.parameter)
        if now != value:
            message = f"{location} reads back as {now!r}, not {value!r}"
            raise MigrateError(message, EXIT_APPLY_FAILED)


def apply(plan: Plan) -> None:
    """Run the plan's postconf commands; all or nothing.

    Raises:
      MigrateError: a command failed or its result did not read back;
        main.cf and master.cf were restored from the copies taken first.
    """
    directory = Path(plan.config_dir)
    files = [directory / "main.cf", directory / "master.cf"]
    for path in files:
        shutil.copy2(path, path.with_name(path.name + BACKUP_SUFFIX))
    try:
        _run_commands(plan)
    except (MigrateError, OSError, subprocess.TimeoutExpired) as exc:
        for path in files:
            shutil.copyfile(path.with_name(path.name + BACKUP_SUFFIX), path)
        status = exc.status if isinstance(exc, MigrateError) else EXIT_APPLY_FAILED
        raise MigrateError(f"{exc}; main.cf and master.cf restored", status) from None


# --------------------------------------------------------------- command


def run(args: argparse.Namespace) -> int:
    if args.apply and not args.verify:
        _say("--apply needs --verify: nothing is changed before the bridge was compared")
        return EXIT_USAGE
    try:
        parse_endpoint(args.listen)
    except EndpointError as exc:
        _say(f"--listen {args.listen}: {exc}")
        return EXIT_USAGE
    try:
        return _run(args)
    except MigrateError as exc:
        _say(str(exc))
        return exc.status


def _run(args: argparse.Namespace) -> int:
    postfix = read_postfix(args.postfix_config)
    plan = plan_migration(postfix, args.listen)
    for refused in plan.refused:
        _say(f"cannot migrate {refused.file} ({refused.location}): {refused.reason}")
    for note in plan.notes:
        _say(f"note: {note}")
    status = EXIT_REFUSED if plan.refused else EXIT_OK
    if not plan.tables:
        _say(f"no memcache: table to migrate in {postfix.config_dir}")
        return status
    text = render_toml(plan)
    problem = _loads(text)
    if problem is not None:  # every table loaded alone: a bug if this happens
        raise MigrateError(f"the generated configuration does not load: {problem}", EXIT_CONFIG)

    if args.output is None or args.output == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        commands_out = sys.stderr
    else:
        output = Path(args.output)
        current = output.read_text() if output.exists() else None
        if current != text:
            if args.verify:
                raise MigrateError(
                    f"{output} differs from the plan: run migrate without --verify to "
                    "write it, (re)start the bridge with it, then verify",
                    EXIT_CONFIG,
                )
            output.write_text(text)
        commands_out = sys.stdout
    prefix = "# " if commands_out is sys.stderr else ""
    print("# main.cf and master.cf changes:", file=commands_out)
    for command in plan.shell_commands():
        print(prefix + command, file=commands_out)

    if args.verify:
        with contextlib.ExitStack() as stack:
            config_path = args.output
            if config_path is None or config_path == "-":
                config_path = stack.enter_context(_temporary_toml(text))
            differences = verify(plan, config_path, args.keys)
        for difference in differences:
            _say(difference)
        if differences:
            _say(f"verify failed: {len(differences)} differences; nothing applied")
            return EXIT_DIFFERENT
        _say("verify passed")
    if args.apply:
        apply(plan)
        _say(
            f"applied {len(plan.changes)} changes in {plan.config_dir} (copies of the old "
            f"files: main.cf{BACKUP_SUFFIX}, master.cf{BACKUP_SUFFIX}); run "
            f"postfix -c {plan.config_dir} reload"
        )
    return status


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``migrate`` (its -c is Postfix's configuration directory, as in postconf)."""
    help_text = "generate a bridge.toml from a Postfix configuration with memcache: tables"
    migrate = commands.add_parser("migrate", help=help_text, description=help_text)
    migrate.add_argument(
        "-c",
        "--postfix-config",
        default=DEFAULT_POSTFIX_DIR,
        metavar="POSTFIX_CONFIG_DIR",
        help=f"Postfix's configuration directory, as postconf -c (default {DEFAULT_POSTFIX_DIR})",
    )
    migrate.add_argument(
        "--output", metavar="FILE", help="write bridge.toml here (default: stdout)"
    )
    migrate.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="ENDPOINT",
        help=f"the bridge's socketmap listener (default {DEFAULT_LISTEN})",
    )
    migrate.add_argument(
        "--keys", metavar="FILE", help="--verify these keys (one a line) instead of the backups'"
    )
    migrate.add_argument(
        "--verify",
        action="store_true",
        help="compare postmap -q on memcache: and on the running bridge, key by key",
    )
    migrate.add_argument(
        "--apply",
        action="store_true",
        help="after --verify passed, run the postconf commands (all or nothing)",
    )
    migrate.set_defaults(handler=run)
