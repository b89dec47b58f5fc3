"""Command line: ``postfix-bridge serve | check | query | update | delete | dump | load | migrate``.

Exit statuses follow postmap and sysexits(3) so that scripts can tell the
cases apart:

====  =====================================================
0     success (query: found)
1     not found (query, delete), refused (read-only table), bad input lines (load)
2     usage error (argparse)
71    serve: a listener cannot be bound (EX_OSERR: address in use, permissions)
75    query: temporary failure (EX_TEMPFAIL: memcache or backup trouble)
78    configuration error (EX_CONFIG: the file names table and key)
====  =====================================================
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence

import trio

from bridge import __version__, daemon, migrate_run
from bridge.config import BridgeConfig, ConfigError, TableConfig, load_config
from bridge.endpoint import InetEndpoint
from bridge.keys import DomainLiteral
from bridge.loader import DEFAULT_BATCH_SIZE, ProgressBar, load_entries
from bridge.logs import LOG_TARGETS, SyslogTarget, setup_logging
from bridge.maps.base import MapError
from bridge.outcome import (
    ConfigFailure,
    Found,
    NotFound,
    NotWritten,
    Outcome,
    Retry,
    WriteOutcome,
    Written,
)
from bridge.protocol import socketmap, tcptable
from bridge.protocol.events import NEED_DATA
from bridge.protocol.netstring import NetstringDecoder, NetstringError
from bridge.protocol.tcptable import TcpReplyDecoder
from bridge.table import NoSequence, Table, close_tables, open_tables

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2  # argparse's own
EXIT_OSERR = 71
EXIT_TEMPFAIL = 75
EXIT_CONFIG = 78

#: Every exit status with its meaning, as postfix-bridge(8) lists them.
EXIT_STATUSES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success; query: found; health: healthy"),
    (
        EXIT_NOT_FOUND,
        "not found (query, delete); refused (read-only table); load: bad input lines; "
        "health: not healthy",
    ),
    (EXIT_USAGE, "usage error: unknown command or option, missing argument"),
    (EXIT_OSERR, "serve: a listener cannot be bound (address in use, permissions)"),
    (EXIT_TEMPFAIL, "temporary failure: memcache or backup trouble"),
    (EXIT_CONFIG, "configuration error: the message names the file, the table and the key"),
)

#: Where the Docker image and the systemd unit put the configuration.
DEFAULT_CONFIG = "/etc/postfix-bridge/bridge.toml"


#: Table commands (query, update, ...) report problems only, as postmap
#: does; --log-level asks for more. The daemon logs at the configured level.
_COMMAND_LOG_LEVEL = "warning"


def _setup_logging(
    args: argparse.Namespace, config: BridgeConfig, *, level: str | None = None
) -> None:
    target = args.log_target or (config.log_target if args.command == "serve" else "stderr")
    setup_logging(
        args.log_level or level or config.log_level,
        log_format=args.log_format or config.log_format,
        syslog=(
            SyslogTarget(config.syslog_facility, config.syslog_socket)
            if target == "syslog"
            else None
        ),
    )


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
    _setup_logging(args, config)
    tables = _open(config)
    if tables is None:
        return EXIT_CONFIG
    try:
        return daemon.run(config, tables)
    except OSError as exc:
        # Address in use (a unix path another process answers on
        # included), permission, bad socket-activation variables:
        # nothing is served, and nothing was started.
        print(f"postfix-bridge: cannot listen: {exc}", file=sys.stderr)
        return EXIT_OSERR


#: The local part of the key the health probe looks up: any answer but a
#: failure is healthy. It is an address so that key_format's %u/%d apply.
_HEALTH_PROBE_USER = b"postfix-bridge-health-check"

#: How long the health check waits for the daemon (Docker's own default
#: HEALTHCHECK timeout is 30 s; a healthy bridge answers in milliseconds).
_HEALTH_TIMEOUT = 10.0


def _cmd_health(args: argparse.Namespace) -> int:
    """Ask the running daemon whether it is healthy (Docker HEALTHCHECK, monitoring).

    With a [metrics] endpoint: GET /healthz (memcache probes included).
    Otherwise: one probe lookup through the first listener, which fails
    when the daemon is down or its memcache is failing (TEMP/PERM).
    """
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    try:
        if config.metrics_endpoint is not None:
            healthy, report = _healthz(config.metrics_endpoint)
        else:
            healthy, report = _probe_listener(config)
    except OSError as exc:
        healthy, report = False, f"daemon not reachable: {exc}"
    print(report)
    return EXIT_OK if healthy else EXIT_NOT_FOUND


def _healthz(endpoint: InetEndpoint) -> tuple[bool, str]:
    with socket.create_connection((endpoint.host, endpoint.port), timeout=_HEALTH_TIMEOUT) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\nHost: bridge\r\n\r\n")
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1] if head.count(b" ") >= 1 else b""
    return status == b"200", body.decode("utf-8", "replace").strip()


def _probe_listener(config: BridgeConfig) -> tuple[bool, str]:
    listener = config.listeners[0]
    endpoint = listener.endpoint
    if isinstance(endpoint, InetEndpoint):
        address: tuple[str, int] | str = (endpoint.host, endpoint.port)
        family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    else:
        address, family = endpoint.path, socket.AF_UNIX
    table = listener.table or next(iter(config.tables))
    key = _health_probe_key(config.tables[table])
    if listener.protocol == "socketmap":
        request = socketmap.encode_request(table, key)
    else:
        request = tcptable.encode_tcp_request(key)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(_HEALTH_TIMEOUT)
        sock.connect(address)
        sock.sendall(request)
        outcome = _read_probe_reply(sock, listener.protocol)
    healthy = isinstance(outcome, Found | NotFound)
    return healthy, f"{endpoint} table {table}: {_describe(outcome)}"


def _read_probe_reply(sock: socket.socket, protocol: str) -> Outcome | None:
    """The daemon's answer, read with the same codecs a chained table uses; None if cut short.

    Raises:
      OSError: the daemon did not answer in time, or the connection broke.
    """
    decoder: NetstringDecoder | TcpReplyDecoder
    if protocol == "socketmap":
        decoder = NetstringDecoder(socketmap.MAX_REPLY_PAYLOAD)
    else:
        decoder = TcpReplyDecoder()
    while True:
        try:
            if isinstance(decoder, NetstringDecoder):
                payload = decoder.next_payload()
                if payload is not NEED_DATA:
                    return socketmap.parse_socketmap_reply(payload)
            else:
                line = decoder.next_line()
                if line is not NEED_DATA:
                    return tcptable.parse_tcp_reply_line(line)[0]
        except (NetstringError, tcptable.TcpTableError):
            return None
        decoder.receive_data(sock.recv(65536))


def _describe(outcome: Outcome | None) -> str:
    if outcome is None:
        return "no reply"
    if isinstance(outcome, Found):
        return "found"
    if isinstance(outcome, NotFound):
        return "not found"
    kind = "PERM" if isinstance(outcome, ConfigFailure) else "TEMP"
    return f"{kind} {outcome.reason}"


def _health_probe_key(table: TableConfig) -> bytes:
    """A key the table really sends to memcache.

    A key outside the table's domain filter would be answered "not found"
    without asking memcache (DOM-1), and the probe would say healthy while
    memcache is down: use an address in the first domain the filter lists.
    """
    domain = b"postfix-bridge.invalid"
    if table.domain is not None:
        listed = [
            item.domain
            for item in table.domain.items
            if isinstance(item, DomainLiteral) and not item.negated
        ]
        if listed:
            domain = listed[0]
    return _HEALTH_PROBE_USER + b"@" + domain


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
            f"table {name}: memcache {' '.join(str(s.endpoint) for s in table.memcache)}, "
            f"key_format {table.key_format.text!r}, "
            f"backup {backup}"
        )
    return EXIT_OK


TableCommand = Callable[[Table, argparse.Namespace], Awaitable[int]]


def _run_on_table(args: argparse.Namespace, command: TableCommand) -> int:
    """Load the configuration, open it, run ``command`` on the named table, close."""
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    _setup_logging(args, config, level=_COMMAND_LOG_LEVEL)
    if args.table not in config.tables:
        print(f"postfix-bridge: no table {args.table!r} in {config.path}", file=sys.stderr)
        return EXIT_CONFIG
    tables = _open(config)
    if tables is None:
        return EXIT_CONFIG

    async def run() -> int:
        try:
            return await command(tables[args.table], args)
        finally:
            await close_tables(tables)

    return trio.run(run)


def _key(text: str) -> bytes:
    # Keys given on the command line keep any undecodable bytes as they were.
    return text.encode("utf-8", "surrogateescape")


async def _query(table: Table, args: argparse.Namespace) -> int:
    if args.key != "-":
        return _report(await table.lookup(_key(args.key)), None)
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


async def _update(table: Table, args: argparse.Namespace) -> int:
    return _report_write(await table.update(_key(args.key), _key(args.value)), "update")


async def _delete(table: Table, args: argparse.Namespace) -> int:
    return _report_write(await table.delete(_key(args.key)), "delete")


async def _dump(table: Table, args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    try:
        async for key, value in table.sequence():
            out.write(key + b"\t" + value + b"\n")
    except NoSequence as exc:
        print(f"postfix-bridge: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except MapError as exc:
        print(f"postfix-bridge: temporary failure: {exc}", file=sys.stderr)
        return EXIT_TEMPFAIL
    out.flush()
    return EXIT_OK


async def _load_file(table: Table, args: argparse.Namespace) -> int:
    if not table.config.writable:
        print(
            f"postfix-bridge: refused: table {table.name} is read-only "
            "(set writable = true to change it)",
            file=sys.stderr,
        )
        return EXIT_NOT_FOUND
    if args.file == "-":
        data, source = await trio.to_thread.run_sync(sys.stdin.buffer.read), "stdin"
    else:
        try:
            data = await trio.Path(args.file).read_bytes()
        except OSError as exc:
            print(f"postfix-bridge: {args.file}: {exc.strerror}", file=sys.stderr)
            return EXIT_NOT_FOUND
        source = args.file
    progress = ProgressBar() if sys.stderr.isatty() else None
    report = await load_entries(
        table,
        data,
        source=source,
        replace=args.replace,
        batch_size=args.batch_size,
        progress=progress,
    )
    for problem in report.problems[:_MAX_PROBLEMS_SHOWN]:
        print(f"postfix-bridge: {problem}", file=sys.stderr)
    if len(report.problems) > _MAX_PROBLEMS_SHOWN:
        hidden = len(report.problems) - _MAX_PROBLEMS_SHOWN
        print(f"postfix-bridge: ... and {hidden} more", file=sys.stderr)
    print(f"postfix-bridge: table {table.name}: {report.summary()}", file=sys.stderr)
    if report.temporary or report.memcache_failed:
        return EXIT_TEMPFAIL
    return EXIT_NOT_FOUND if report.failed else EXIT_OK


#: A load of a broken file would otherwise print one line per entry.
_MAX_PROBLEMS_SHOWN = 20


def _report_write(outcome: WriteOutcome, operation: str) -> int:
    if isinstance(outcome, Written):
        return EXIT_OK
    if isinstance(outcome, NotWritten):
        print(f"postfix-bridge: {operation}: {outcome.reason}", file=sys.stderr)
        return EXIT_NOT_FOUND
    kind = "temporary failure" if isinstance(outcome, Retry) else "configuration failure"
    print(f"postfix-bridge: {operation}: {kind}: {outcome.reason}", file=sys.stderr)
    return EXIT_TEMPFAIL


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
            choices=["debug", "info", "warning", "error", "critical"],
            help="override the configuration's log_level",
        )
        sub.add_argument(
            "--log-format",
            choices=["text", "json"],
            help="override the configuration's log_format (json: one object per line)",
        )
        sub.add_argument(
            "--log-target",
            choices=LOG_TARGETS,
            help="override the configuration's log_target (serve; the other commands: stderr)",
        )
        return sub

    serve = command(
        "serve", "run the daemon in the foreground, logging to stderr (or syslog: log_target)"
    )
    serve.set_defaults(handler=_cmd_serve)
    check = command("check", "validate the configuration and list listeners and tables")
    check.set_defaults(handler=_cmd_check)
    query = command("query", "look a key up directly in memcache and the backup (no daemon)")
    query.add_argument("table", help="table name")
    query.add_argument("key", help="the key, or - to read keys from stdin (one per line)")
    query.set_defaults(handler=lambda args: _run_on_table(args, _query))

    update = command("update", "store KEY VALUE in memcache and the backup (writable tables)")
    update.add_argument("table", help="table name")
    update.add_argument("key")
    update.add_argument("value")
    update.set_defaults(handler=lambda args: _run_on_table(args, _update))

    delete = command("delete", "delete KEY from memcache and the backup (writable tables)")
    delete.add_argument("table", help="table name")
    delete.add_argument("key")
    delete.set_defaults(handler=lambda args: _run_on_table(args, _delete))

    dump = command("dump", "list the backup's entries as key<TAB>value lines")
    dump.add_argument("table", help="table name")
    dump.set_defaults(handler=lambda args: _run_on_table(args, _dump))

    health = command("health", "ask the running daemon whether it is healthy (exit 0 / 1)")
    health.set_defaults(handler=_cmd_health)

    load = command("load", "bulk-load a postmap source file into a writable table")
    load.add_argument("table", help="table name")
    load.add_argument("file", nargs="?", default="-", help="source file, or - for stdin")
    load.add_argument(
        "--replace", action="store_true", help="delete backup entries absent from the file"
    )
    load.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"entries per transaction (default {DEFAULT_BATCH_SIZE})",
    )
    load.set_defaults(handler=lambda args: _run_on_table(args, _load_file))

    # migrate's -c is Postfix's configuration directory (as in postconf -c).
    migrate_run.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    # argparse leaves an optional positional that follows an option
    # unassigned ("load TABLE --replace FILE"): take it here.
    if len(extras) == 1 and getattr(args, "file", None) == "-" and not extras[0].startswith("--"):
        args.file = extras.pop()
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    status: int = args.handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
