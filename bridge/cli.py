"""Command line: ``postfix-bridge serve | check | query``.

Exit statuses follow postmap and sysexits(3) so that scripts can tell the
cases apart:

====  =====================================================
0     success (query: found)
1     query: not found
2     usage error (argparse)
75    query: temporary failure (EX_TEMPFAIL: memcache or backup trouble)
78    configuration error (EX_CONFIG: the file names table and key)
====  =====================================================
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import trio

from bridge import __version__
from bridge.config import BridgeConfig, ConfigError, load_config
from bridge.outcome import ConfigFailure, Found, NotFound, Retry
from bridge.server import serve_until_signalled
from bridge.table import Table, close_tables, open_tables

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_TEMPFAIL = 75
EXIT_CONFIG = 78

#: Where the Docker image and the systemd unit put the configuration.
DEFAULT_CONFIG = "/etc/postfix-bridge/bridge.toml"

_LOG_FORMAT = "%(asctime)s postfix-bridge[%(process)d]: %(levelname)s: %(message)s"


def _setup_logging(level: str) -> None:
    logging.addLevelName(logging.WARNING, "warning")
    logging.addLevelName(logging.ERROR, "error")
    logging.addLevelName(logging.INFO, "info")
    logging.addLevelName(logging.DEBUG, "debug")
    logging.basicConfig(stream=sys.stderr, format=_LOG_FORMAT, level=level.upper(), force=True)


def _load(path: str) -> BridgeConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"postfix-bridge: configuration error:\n{exc}", file=sys.stderr)
        return None


def _open(config: BridgeConfig) -> dict[str, Table] | None:
    try:
        return open_tables(config)
    except ConfigError as exc:
        print(f"postfix-bridge: configuration error:\n{exc}", file=sys.stderr)
        return None


# ---------------------------------------------------------------- commands


def _cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    _setup_logging(args.log_level or config.log_level)
    tables = _open(config)
    if tables is None:
        return EXIT_CONFIG
    trio.run(serve_until_signalled, config, tables)
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    tables = _open(config)
    if tables is None:
        return EXIT_CONFIG
    trio.run(close_tables, tables)
    print(f"{config.path}: configuration OK")
    for listener in config.listeners:
        served = listener.table if listener.protocol == "tcp" else "every table by name"
        print(f"listen {listener.endpoint} {listener.protocol}: {served}")
    for name, table in config.tables.items():
        backup = table.backup or "none"
        print(
            f"table {name}: memcache {table.memcache}, key_format {table.key_format.text!r}, "
            f"backup {backup}"
        )
    return EXIT_OK


def _cmd_query(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    _setup_logging(args.log_level or "warning")
    if args.table not in config.tables:
        print(f"postfix-bridge: no table {args.table!r} in {config.path}", file=sys.stderr)
        return EXIT_CONFIG
    tables = _open(config)
    if tables is None:
        return EXIT_CONFIG
    return trio.run(_query, tables, args.table, args.key)


async def _query(tables: dict[str, Table], name: str, key: str) -> int:
    table = tables[name]
    try:
        if key != "-":
            return _report(await table.lookup(key.encode("utf-8", "surrogateescape")), None)
        # Like ``postmap -q -``: key<TAB>value for each hit, the first
        # failure ends the run, success when at least one key was found.
        status = EXIT_NOT_FOUND
        for line in sys.stdin.buffer:
            lookup_key = line.rstrip(b"\r\n")
            result = _report(await table.lookup(lookup_key), lookup_key)
            if result == EXIT_OK:
                status = EXIT_OK
            elif result != EXIT_NOT_FOUND:
                return result
        return status
    finally:
        await close_tables(tables)


def _report(outcome: object, key: bytes | None) -> int:
    out = sys.stdout.buffer
    if isinstance(outcome, Found):
        out.write((key + b"\t" if key is not None else b"") + outcome.value + b"\n")
        out.flush()
        return EXIT_OK
    if isinstance(outcome, NotFound):
        return EXIT_NOT_FOUND
    assert isinstance(outcome, Retry | ConfigFailure)
    kind = "temporary failure" if isinstance(outcome, Retry) else "configuration failure"
    print(f"postfix-bridge: {kind}: {outcome.reason}", file=sys.stderr)
    return EXIT_TEMPFAIL


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="postfix-bridge",
        description="Answer Postfix socketmap: and tcp: lookups from memcache tables.",
    )
    parser.add_argument("--version", action="version", version=f"postfix-bridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--config", "-c", default=DEFAULT_CONFIG, help=f"TOML file (default {DEFAULT_CONFIG})"
        )
        sub.add_argument(
            "--log-level",
            choices=["debug", "info", "warning", "error"],
            help="override the configuration's log_level",
        )
        return sub

    serve = command("serve", "run the daemon in the foreground, logging to stderr")
    serve.set_defaults(handler=_cmd_serve)
    check = command("check", "validate the configuration and list listeners and tables")
    check.set_defaults(handler=_cmd_check)
    query = command("query", "look a key up directly in memcache and the backup (no daemon)")
    query.add_argument("table", help="table name")
    query.add_argument("key", help="the key, or - to read keys from stdin (one per line)")
    query.set_defaults(handler=_cmd_query)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status: int = args.handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
