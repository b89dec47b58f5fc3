"""Mail through a private Postfix: native ``memcache:``, ``proxy:memcache:`` and the bridge.

Not a test: it measures and prints. Run from the repository root, as root
(Postfix starts as root and drops to user postfix):

    .venv/bin/python -m bench.mailbench [--messages 1000] [--recipients 4] [--sessions 10]
                                        [--rounds 5]

Theory of operation
-------------------
One memcached holds three tables, each under its own ``key_format``
prefix, each described by a memcache_table(5) ``.cf`` file:

* ``aliases`` (virtual_alias_maps): ``Nrcpt@bench.example`` ->
  ``userN@dest.example``, for the recipients ``smtp-source -r`` makes
  (``rcpt``, ``2rcpt``, ``3rcpt``, ...);
* ``transport`` (transport_maps): ``dest.example`` -> the sink;
* ``access`` (check_recipient_access): every ``Nrcpt@bench.example`` -> OK.

Three private Postfix instances (own configuration, queue, data
directories and maillog; smtpd on a free loopback port; no chroot;
``inet_interfaces = loopback-only``) name the same tables three ways, one
*variant* each:

* ``native``: ``memcache:/.../NAME.cf`` (Postfix's own client in every
  daemon that looks up);
* ``proxy``: ``proxy:memcache:/.../NAME.cf`` (every lookup through
  proxymap; ``proxy_read_maps`` lists the three tables);
* ``bridge``: ``socketmap:inet:127.0.0.1:PORT:NAME``, one bridge daemon
  reading the same ``.cf`` files (``config =``), with the table's
  ``address_search`` (virtual's for aliases, transport(5)'s for
  transport, access(5)'s for access) done inside the bridge.

smtpd accepts a recipient only when the access table says OK
(``check_recipient_access T, reject``); nothing but the transport table
routes mail (``default_transport = error:...``), so a lookup that fails
turns into a rejection or a bounce, never into a fast delivery. Mail
goes to an in-process SMTP sink (:class:`tests.mailflow.harness.SmtpSink`)
that records every envelope; after each run every message must have
reached exactly ``user1..userR@dest.example`` from the benchmark's
sender, and nothing else may have arrived.

A *run* is one variant: ``smtp-source -s SESSIONS -m MESSAGES -r
RECIPIENTS`` against its smtpd, timed from starting smtp-source until the
sink holds every expected recipient and the instance's queue is empty
(polled, bounded by ``--timeout``). Each round runs every variant, in
rotating order. Per run, memcached's ``get_hits + get_misses`` before and
after give the memcache gets per message (the bridge's own gets on the
bridge variant), memcached's ``rusage_user + rusage_system`` its CPU, the
bridge's ``requests_total`` (its ``[metrics]`` endpoint) the lookups
Postfix sent it, and the bridge process's utime+stime from
``/proc/PID/stat`` (clock tick 10 ms) the bridge's CPU per message. smtpd processes are reused (the
system master.cf without chroot and without the test harness's
``max_use=1``); a short untimed run per variant first starts each
instance's daemons and opens their connections.

Every server (sink, memcached, bridge, the Postfix instances) is stopped
when the benchmark ends, also when it fails.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.compare import print_machine, process_cpu_seconds, rotated
from tests.integration.harness import (
    Bridge,
    Memcached,
    age_file,
    free_port,
    run_bridge,
    run_memcached,
)
from tests.mailflow.harness import (
    PostfixInstance,
    Received,
    SmtpSink,
    run_postfix,
    run_sink,
)

SMTP_SOURCE: Final = shutil.which("smtp-source") or "/usr/sbin/smtp-source"

#: Variants in their base order; each round rotates it by one.
VARIANTS: Final = ("native", "proxy", "bridge")

SENDER: Final = "sender@src.example"
#: smtp-source's ``-t``: recipient i (from 1) is ``{i}rcpt@...``, the first plain ``rcpt@...``.
RECIPIENT: Final = "rcpt@bench.example"
DEST_DOMAIN: Final = "dest.example"

#: Per table: bridge-side ``address_search`` (what Postfix itself searches
#: in a native memcache: table of that kind; it asks a socketmap table
#: only for the full key).
ADDRESS_SEARCH: Final[Mapping[str, Sequence[str]]] = {
    "aliases": ("full", "nodelim", "localpart", "@domain"),
    "transport": ("full", "nodelim", "domain", ".parent_domains"),
    "access": ("full", "nodelim", "domain", "parent_domains", "localpart@"),
}

#: Messages sent per variant, untimed, before the first round.
_WARMUP_MESSAGES: Final = 20


def recipients(count: int) -> list[str]:
    """The recipients ``smtp-source -r COUNT -t RECIPIENT`` sends to."""
    return [RECIPIENT if i == 1 else f"{i}{RECIPIENT}" for i in range(1, count + 1)]


def alias_target(index: int) -> str:
    """Where recipient number ``index`` (from 1) is aliased to."""
    return f"user{index}@{DEST_DOMAIN}"


# ---------------------------------------------------------------------------
# Servers


def _memcached_stats(server: Memcached) -> dict[str, str]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"stats\r\n")
        reply = b""
        while not reply.endswith(b"END\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    stats: dict[str, str] = {}
    for line in reply.decode().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "STAT":
            stats[parts[1]] = parts[2]
    return stats


@dataclass(frozen=True, slots=True)
class Counters:
    """What one run is charged with: memcache gets, CPU seconds."""

    gets: int
    memcached_cpu: float
    bridge_cpu: float
    bridge_requests: int


def read_counters(server: Memcached, bridge: Bridge, metrics_port: int) -> Counters:
    stats = _memcached_stats(server)
    return Counters(
        int(stats["get_hits"]) + int(stats["get_misses"]),
        float(stats["rusage_user"]) + float(stats["rusage_system"]),
        process_cpu_seconds(bridge.process.pid),
        _bridge_requests(metrics_port),
    )


def _bridge_requests(port: int) -> int:
    """The bridge's ``requests_total``, summed over tables, protocols and results."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return round(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("postfix_bridge_requests_total{")
        )
    )


def _write_cf(path: Path, lines: Mapping[str, str]) -> None:
    path.write_text("".join(f"{key} = {value}\n" for key, value in lines.items()))
    path.chmod(0o644)
    age_file(path)  # CF-9: Postfix would wait for a just-written file to settle


@dataclass
class Bench:
    """The running servers: one sink, one memcached, one bridge, a Postfix per variant."""

    sink: SmtpSink
    memcached: Memcached
    bridge: Bridge
    metrics_port: int
    postfix: dict[str, PostfixInstance]
    recipient_count: int


@contextlib.contextmanager
def bench_setup(
    root: Path,
    variants: Sequence[str],
    recipient_count: int,
    *,
    listen_extra: Sequence[str] = (),
    table_extra: Sequence[str] = (),
) -> Iterator[Bench]:
    """Start everything; stop everything when the block exits, however it exits."""
    # Postfix daemons (user postfix) read the .cf files: no 0700 directory on the way.
    root.chmod(0o755)
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(run_sink("bench", free_port()))
        memcached = stack.enter_context(run_memcached())
        transport = f"smtp:[127.0.0.1]:{sink.port}"
        entries = {
            "aliases": {
                address: alias_target(index)
                for index, address in enumerate(recipients(recipient_count), start=1)
            },
            "transport": {DEST_DOMAIN: transport},
            "access": {address: "OK" for address in recipients(recipient_count)},
        }
        for table, items in entries.items():
            for key, value in items.items():
                memcached.set(f"{table}:{key}".encode(), value.encode())

        tables = root / "tables"
        tables.mkdir()
        tables.chmod(0o755)
        socketmap_port = free_port()
        metrics_port = free_port()
        toml = [
            'log_level = "info"\n',
            f'[[listen]]\nendpoint = "inet:127.0.0.1:{socketmap_port}"\nprotocol = "socketmap"\n',
            *(f"{line}\n" for line in listen_extra),
            f'[metrics]\nendpoint = "inet:127.0.0.1:{metrics_port}"\n',
        ]
        for table in entries:
            cf = tables / f"{table}.cf"
            _write_cf(cf, {"memcache": memcached.endpoint, "key_format": f"{table}:%s"})
            search = ", ".join(f'"{form}"' for form in ADDRESS_SEARCH[table])
            toml.append(
                f'[tables.{table}]\nconfig = "{cf}"\nmemcache = "{memcached.endpoint}"\n'
                f"address_search = [{search}]\n" + "".join(f"{line}\n" for line in table_extra)
            )
        config = root / "bridge.toml"
        config.write_text("".join(toml))
        bridge = stack.enter_context(run_bridge(config))

        def spec(variant: str, table: str) -> str:
            if variant == "native":
                return f"memcache:{tables / table}.cf"
            if variant == "proxy":
                return f"proxy:memcache:{tables / table}.cf"
            return f"socketmap:inet:127.0.0.1:{socketmap_port}:{table}"

        instances: dict[str, PostfixInstance] = {}
        for variant in variants:
            main_cf = {
                "virtual_alias_maps": spec(variant, "aliases"),
                "transport_maps": spec(variant, "transport"),
                "smtpd_relay_restrictions": "permit_mynetworks, reject",
                "smtpd_recipient_restrictions": (
                    f"check_recipient_access {spec(variant, 'access')}, reject"
                ),
                "relayhost": "",
                "default_transport": "error:5.3.0 no transport_maps entry",
                # The sink is one destination: let all sessions' mail go at once.
                "smtp_destination_concurrency_limit": "20",
            }
            if variant == "proxy":
                main_cf["proxy_read_maps"] = " ".join(spec(variant, t) for t in entries)
            instances[variant] = stack.enter_context(
                run_postfix(variant, root / variant, free_port(), main_cf, smtpd_max_use=None)
            )
        yield Bench(sink, memcached, bridge, metrics_port, instances, recipient_count)


# ---------------------------------------------------------------------------
# Runs


@dataclass(frozen=True, slots=True)
class RunResult:
    """One timed run of one variant."""

    variant: str
    messages: int
    seconds: float
    gets: int
    memcached_cpu: float
    bridge_cpu: float
    bridge_requests: int

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def _smtp_source(
    bench: Bench, instance: PostfixInstance, messages: int, sessions: int, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run smtp-source against the instance's smtpd; return when it exits."""
    return subprocess.run(
        [
            SMTP_SOURCE,
            "-s",
            str(sessions),
            "-m",
            str(messages),
            "-r",
            str(bench.recipient_count),
            "-f",
            SENDER,
            "-t",
            RECIPIENT,
            "-M",
            "client.src.example",
            f"127.0.0.1:{instance.smtpd_port}",
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_once(
    bench: Bench, variant: str, *, messages: int, sessions: int, timeout: float
) -> RunResult:
    """Send ``messages`` through one variant; wait for all of it at the sink; check it.

    Raises:
      RuntimeError: smtp-source failed, mail did not all arrive (or not
        to the expected recipients) within ``timeout``, or something stayed
        in the queue.
    """
    instance = bench.postfix[variant]
    already = len(bench.sink.messages())
    expected_recipients = messages * bench.recipient_count
    before = read_counters(bench.memcached, bench.bridge, bench.metrics_port)
    started = time.monotonic()
    try:
        source = _smtp_source(bench, instance, messages, sessions, timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{variant}: smtp-source still running after {timeout:g} s") from None
    if source.returncode != 0 or source.stderr.strip():
        raise RuntimeError(
            f"{variant}: smtp-source exited {source.returncode}: {source.stderr[-2000:]}\n"
            f"maillog tail:\n{instance.log()[-3000:]}"
        )
    deadline = started + timeout
    while True:
        arrived = bench.sink.messages()[already:]
        delivered = sum(len(message.recipients) for message in arrived)
        if delivered >= expected_recipients and not instance.queue():
            break
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{variant}: after {timeout:g} s the sink holds {delivered} of "
                f"{expected_recipients} recipients; queue: {instance.queue()[:5]}\n"
                f"maillog tail:\n{instance.log()[-3000:]}"
            )
        time.sleep(0.02)
    elapsed = time.monotonic() - started
    after = read_counters(bench.memcached, bench.bridge, bench.metrics_port)
    _check_delivered(variant, arrived, messages, bench.recipient_count)
    return RunResult(
        variant,
        messages,
        elapsed,
        after.gets - before.gets,
        after.memcached_cpu - before.memcached_cpu,
        after.bridge_cpu - before.bridge_cpu,
        after.bridge_requests - before.bridge_requests,
    )


def _check_delivered(
    variant: str, arrived: Sequence[Received], messages: int, recipient_count: int
) -> None:
    """Every message reached exactly its aliased recipients, each once; nothing else arrived."""
    counts: Counter[str] = Counter()
    problems: list[str] = []
    for message in arrived:
        if message.sender != SENDER:
            problems.append(f"from <{message.sender}> to {message.recipients}")
        counts.update(message.recipients)
    expected = Counter({alias_target(i): messages for i in range(1, recipient_count + 1)})
    if counts != expected:
        problems.append(f"recipients {dict(counts)}, expected {dict(expected)}")
    if problems:
        raise RuntimeError(f"{variant}: wrong deliveries: {problems[:5]}")


# ---------------------------------------------------------------------------
# Report


def summarize(results: Sequence[RunResult], variants: Sequence[str]) -> str:
    """The per-variant table: medians over rounds."""
    lines = [
        f"{'variant':<8}  {'runs':>4}  {'msg/s':>7}  {'min':>7}  {'max':>7}  {'vs native':>9}  "
        f"{'gets/msg':>8}  {'bridge req/msg':>14}  {'bridge CPU ms/msg':>17}  "
        f"{'memcached CPU ms/msg':>20}"
    ]
    rates = {
        variant: statistics.median(r.rate for r in results if r.variant == variant)
        for variant in variants
        if any(r.variant == variant for r in results)
    }
    native = rates.get("native")
    for variant, rate in rates.items():
        runs = [r for r in results if r.variant == variant]
        gets = statistics.median(r.gets / r.messages for r in runs)
        requests = statistics.median(r.bridge_requests / r.messages for r in runs)
        bridge_cpu = statistics.median(1000 * r.bridge_cpu / r.messages for r in runs)
        memcached_cpu = statistics.median(1000 * r.memcached_cpu / r.messages for r in runs)
        ratio = f"{rate / native:9.2f}" if native else f"{'-':>9}"
        lines.append(
            f"{variant:<8}  {len(runs):>4}  {rate:>7.1f}  {min(r.rate for r in runs):>7.1f}  "
            f"{max(r.rate for r in runs):>7.1f}  {ratio}  {gets:>8.2f}  {requests:>14.2f}  "
            f"{bridge_cpu:>17.3f}  {memcached_cpu:>20.3f}"
        )
    return "\n".join(lines)


def _parse_variants(text: str) -> list[str]:
    variants = [part.strip() for part in text.split(",") if part.strip()]
    if not variants or any(variant not in VARIANTS for variant in variants):
        raise argparse.ArgumentTypeError(f"variants must be among {', '.join(VARIANTS)}: {text!r}")
    return variants


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Mail through a private Postfix whose virtual_alias_maps, transport_maps "
        "and check_recipient_access are memcache:, proxy:memcache: or the bridge; "
        "interleaved rounds, medians and ratios to native."
    )
    parser.add_argument("--messages", type=int, default=1000, help="messages per run")
    parser.add_argument("--recipients", type=int, default=4, help="recipients per message")
    parser.add_argument("--sessions", type=int, default=10, help="parallel SMTP sessions")
    parser.add_argument("--rounds", type=int, default=5, help="runs per variant")
    parser.add_argument(
        "--variants",
        type=_parse_variants,
        default=list(VARIANTS),
        help="comma-separated subset of native,proxy,bridge (default: all)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="most seconds one run may take"
    )
    parser.add_argument(
        "--listen-extra",
        action="append",
        default=[],
        metavar="TOML",
        help="a TOML line added to the bridge's listener section (repeatable)",
    )
    parser.add_argument(
        "--table-extra",
        action="append",
        default=[],
        metavar="TOML",
        help="a TOML line added to each of the bridge's table sections (repeatable), "
        "e.g. 'busy_poll_us = 0'",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the results; 1 when a run failed (the message says why)."""
    args = build_parser().parse_args(argv)
    if min(args.messages, args.recipients, args.sessions, args.rounds) < 1:
        raise SystemExit("--messages, --recipients, --sessions and --rounds must be >= 1")
    if os.geteuid() != 0:
        raise SystemExit("run as root: Postfix starts as root")
    variants: list[str] = args.variants
    print_machine()
    print(
        f"messages: {args.messages}, recipients/message: {args.recipients}, "
        f"sessions: {args.sessions}, rounds: {args.rounds}, variants: {variants}"
    )
    # Anything else busy on the machine skews every figure: say so.
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="bench-mail-") as scratch,
            bench_setup(
                Path(scratch),
                variants,
                args.recipients,
                listen_extra=args.listen_extra,
                table_extra=args.table_extra,
            ) as bench,
        ):
            for variant in variants:
                run_once(
                    bench,
                    variant,
                    messages=_WARMUP_MESSAGES,
                    sessions=min(args.sessions, _WARMUP_MESSAGES),
                    timeout=args.timeout,
                )
            results: list[RunResult] = []
            for round_number in range(args.rounds):
                figures = []
                for variant in rotated(variants, round_number):
                    result = run_once(
                        bench,
                        variant,
                        messages=args.messages,
                        sessions=args.sessions,
                        timeout=args.timeout,
                    )
                    results.append(result)
                    figures.append(f"{variant} {result.seconds:.2f}s ({result.rate:.0f}/s)")
                print(f"round {round_number + 1}: " + ", ".join(figures), flush=True)
    except RuntimeError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print()
    print(summarize(results, variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
