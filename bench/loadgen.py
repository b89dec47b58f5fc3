"""A trio load generator for the bridge's socketmap listener.

Not a test: it measures and prints. Run from the repository root:

    .venv/bin/python -m bench.loadgen [--connections 32] [--pipeline 8] [--seconds 10]
                                      [--idle 2000]

Without ``--port`` it starts its own seeded memcached and bridge exactly as
``bench/compare.py`` does (same key scheme, same table) and stops them at
the end; with ``--port`` it drives a bridge that is already running, whose
table must hold :func:`~bench.compare.bench_key` / :func:`~bench.compare.bench_value`
entries (``--seed-memcache`` stores them first).

Theory of operation
-------------------
Each of ``--connections`` connections is one trio task that keeps up to
``--pipeline`` requests in flight: it tops the window up with one write of
as many netstrings as there are free slots, reads whatever replies have
arrived, and repeats. Postfix itself never pipelines (SM-13), but the
bridge answers pipelined requests in order, so the window is how one
process stands in for many Postfix clients without paying for many
processes. A request's latency runs from the moment its write is issued to
the moment the read that completes its reply returns, so it includes the
time spent queued behind the requests ahead of it in the window, as a
client would see. Every reply is checked against the expected ``OK
value``; anything else is counted as an error, never as a lookup.

The first ``--warmup`` seconds are driven but not counted. Throughput is
the replies received in the measured window divided by its length.

``--idle N`` then opens N more connections, each doing one lookup (so the
bridge has allocated whatever a used connection holds) and then staying
idle, and reports the bridge's memory with them open: VmRSS and VmHWM from
``/proc/PID/status`` for the bridge and every process under it (a bridge
with worker processes is reported per process). CPU seconds used during
the measured window are reported for the load generator, the bridge and
memcached, to show which one was the bottleneck.

The load generator runs in its own process, apart from the bridge, and
only ever connects to loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from bench.compare import (
    DEFAULT_KEY_FORMAT,
    TABLE_NAME,
    bench_key,
    bench_servers,
    bench_value,
    print_machine,
    process_cpu_seconds,
    seed_memcache,
)
from bridge.protocol.netstring import NEED_DATA, NetstringDecoder, NetstringError, encode_netstring

__all__ = [
    "LoadResult",
    "MemorySample",
    "Workload",
    "main",
    "memory_of_tree",
    "percentile",
    "run_load",
]

#: Largest reply accepted: Postfix's own socketmap reply limit (SM-7).
#: Benchmark values are ~30 bytes, so anything near it is an error anyway.
_MAX_REPLY: Final = 100_000

#: Bytes read per receive: a window of 8 replies is ~400 bytes, so one read
#: normally drains everything that has arrived.
_RECEIVE_SIZE: Final = 65536

#: Connections opened at once while setting up idle connections. The
#: bridge's listen backlog is finite; more in flight only produces SYN
#: retries that add a second each.
_IDLE_CONNECT_CONCURRENCY: Final = 64

#: Time allowed for setting up or tearing down idle connections, and for a
#: connection to notice the end of the run. Bounds the script's run time
#: when the bridge stops answering.
_PHASE_TIMEOUT: Final = 120.0

#: Settling time after the idle connections are open and before memory is
#: read, so the bridge has finished its per-connection work.
_IDLE_SETTLE: Final = 1.0

#: Extra listener slots beyond what the load needs when we start our own
#: bridge: a little room for a reconnect or two.
_CONNECTION_SLACK: Final = 100


@dataclass(frozen=True, slots=True)
class Workload:
    """What to send and what must come back.

    Attributes:
      requests: request ``i`` as a socketmap netstring (``TABLE KEY``).
      replies: the payload request ``i`` must be answered with.
    """

    requests: tuple[bytes, ...]
    replies: tuple[bytes, ...]

    @classmethod
    def for_keys(cls, table: str, key_count: int, key_prefix: str) -> Workload:
        """Build the workload for the benchmark key scheme of ``bench/compare.py``.

        Args:
          table: the socketmap name.
          key_count: keys 0 .. N-1.
          key_prefix: the keys' local-part prefix.

        Returns:
          The workload, requests and replies pre-encoded so that the load
          loop does no per-request formatting.
        """
        requests = tuple(
            encode_netstring(f"{table} {bench_key(index, key_prefix)}".encode())
            for index in range(key_count)
        )
        replies = tuple(b"OK " + bench_value(index).encode() for index in range(key_count))
        return cls(requests, replies)


@dataclass(slots=True)
class _Tally:
    """Counts shared by every connection task (one trio thread: no locks)."""

    measure_from: float
    measure_until: float
    latencies: list[float] = field(default_factory=list)
    completed: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors += 1
        # A few examples say what went wrong; thousands would bury it.
        if len(self.error_samples) < 5:
            self.error_samples.append(message)


@dataclass(frozen=True, slots=True)
class LoadResult:
    """The measured window of a load run.

    Attributes:
      seconds: length of the measured window.
      lookups: replies received in the window that were correct.
      errors: wrong replies, broken frames and connection failures.
      latencies: per-request latency in seconds, sorted, for requests sent
        and answered within the window.
      error_samples: the first few error messages.
    """

    seconds: float
    lookups: int
    errors: int
    latencies: tuple[float, ...]
    error_samples: tuple[str, ...]

    @property
    def throughput(self) -> float:
        """Correct lookups per second."""
        return self.lookups / self.seconds if self.seconds > 0 else 0.0


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile: the smallest value with ``fraction`` at or below it.

    Args:
      sorted_values: ascending values.
      fraction: in (0, 1], e.g. 0.99.

    Returns:
      The value, or NaN when there are none.
    """
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


async def _drive_connection(
    stream: trio.SocketStream,
    workload: Workload,
    pipeline: int,
    first_index: int,
    tally: _Tally,
) -> None:
    """Keep ``pipeline`` requests in flight on one connection until the window ends."""
    decoder = NetstringDecoder(_MAX_REPLY)
    # (send time, request index) of each request awaiting its reply, in the
    # order sent: the bridge answers in order (SM-13).
    in_flight: deque[tuple[float, int]] = deque()
    key_count = len(workload.requests)
    next_index = first_index
    while True:
        now = time.perf_counter()
        if now < tally.measure_until and len(in_flight) < pipeline:
            batch = []
            while len(in_flight) < pipeline:
                batch.append(workload.requests[next_index])
                in_flight.append((now, next_index))
                next_index = (next_index + 1) % key_count
            await stream.send_all(b"".join(batch))
        if not in_flight:
            return
        data = await stream.receive_some(_RECEIVE_SIZE)
        received_at = time.perf_counter()
        decoder.receive_data(data)
        try:
            while (payload := decoder.next_payload()) is not NEED_DATA:
                sent_at, index = in_flight.popleft()
                if payload != workload.replies[index]:
                    tally.error(f"key #{index}: got {payload[:100]!r}")
                elif sent_at >= tally.measure_from and received_at <= tally.measure_until:
                    tally.completed += 1
                    tally.latencies.append(received_at - sent_at)
        except NetstringError as exc:
            tally.error(f"reply framing: {exc}")
            return
        except IndexError:
            tally.error("a reply nobody asked for")
            return


async def _run_connection(
    address: tuple[str, int], workload: Workload, pipeline: int, first_index: int, tally: _Tally
) -> None:
    try:
        stream = await trio.open_tcp_stream(*address)
    except OSError as exc:
        tally.error(f"connect: {exc}")
        return
    async with stream:
        try:
            await _drive_connection(stream, workload, pipeline, first_index, tally)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            tally.error(f"connection: {exc!r}")


async def run_load(
    host: str,
    port: int,
    workload: Workload,
    *,
    connections: int,
    pipeline: int,
    seconds: float,
    warmup: float,
) -> LoadResult:
    """Drive the socketmap listener and measure it.

    Args:
      host: the listener's address (loopback).
      port: the listener's port.
      workload: requests and expected replies.
      connections: concurrent connections.
      pipeline: requests in flight per connection.
      seconds: length of the measured window.
      warmup: seconds driven before the window opens, not counted.

    Returns:
      The window's figures.
    """
    started = time.perf_counter()
    tally = _Tally(measure_from=started + warmup, measure_until=started + warmup + seconds)
    key_count = len(workload.requests)
    with trio.move_on_after(warmup + seconds + _PHASE_TIMEOUT) as scope:
        async with trio.open_nursery() as nursery:
            for number in range(connections):
                # Spread the connections' starting keys over the key space.
                first_index = number * key_count // connections
                nursery.start_soon(
                    _run_connection, (host, port), workload, pipeline, first_index, tally
                )
    if scope.cancelled_caught:
        tally.error("the run did not end in time: the bridge stopped answering")
    tally.latencies.sort()
    return LoadResult(
        seconds=seconds,
        lookups=tally.completed,
        errors=tally.errors,
        latencies=tuple(tally.latencies),
        error_samples=tuple(tally.error_samples),
    )


async def open_idle_connections(
    host: str, port: int, workload: Workload, count: int
) -> tuple[list[trio.SocketStream], int]:
    """Open ``count`` connections, do one checked lookup on each, keep them open.

    Args:
      host: the listener's address.
      port: the listener's port.
      workload: requests and expected replies (request ``i mod N`` on connection i).
      count: how many connections.

    Returns:
      The open streams (the caller closes them) and how many failed.
    """
    streams: list[trio.SocketStream] = []
    failures = 0
    limiter = trio.CapacityLimiter(_IDLE_CONNECT_CONCURRENCY)

    async def open_one(number: int) -> None:
        nonlocal failures
        async with limiter:
            index = number % len(workload.requests)
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError:
                failures += 1
                return
            streams.append(stream)
            try:
                await stream.send_all(workload.requests[index])
                if await _read_one_reply(stream) != workload.replies[index]:
                    failures += 1
            except (OSError, trio.BrokenResourceError, NetstringError):
                failures += 1

    with trio.move_on_after(_PHASE_TIMEOUT) as scope:
        async with trio.open_nursery() as nursery:
            for number in range(count):
                nursery.start_soon(open_one, number)
    if scope.cancelled_caught:
        failures += count - len(streams)
    return streams, failures


async def _read_one_reply(stream: trio.SocketStream) -> bytes:
    decoder = NetstringDecoder(_MAX_REPLY)
    while True:
        data = await stream.receive_some(_RECEIVE_SIZE)
        decoder.receive_data(data)
        payload = decoder.next_payload()
        if payload is not NEED_DATA:
            return payload


@dataclass(frozen=True, slots=True)
class MemorySample:
    """One process's memory, from ``/proc/PID/status``, in kB.

    Attributes:
      pid: the process.
      rss_kb: VmRSS, resident now.
      hwm_kb: VmHWM, the peak resident size since the process started.
    """

    pid: int
    rss_kb: int
    hwm_kb: int


def memory_of_tree(pid: int) -> list[MemorySample]:
    """Memory of ``pid`` and every process under it (a bridge may fork workers).

    Args:
      pid: the root process.

    Returns:
      One sample per process still alive, the root first.
    """
    samples = []
    for member in _process_tree(pid):
        status = _read_status(member)
        if status is not None:
            samples.append(MemorySample(member, status.get("VmRSS", 0), status.get("VmHWM", 0)))
    return samples


def _process_tree(pid: int) -> Iterator[int]:
    yield pid
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as listing:
                children.extend(int(child) for child in listing.read().split())
    for child in children:
        yield from _process_tree(child)


def _read_status(pid: int) -> dict[str, int] | None:
    """The ``kB`` fields of /proc/PID/status, or None when the process is gone."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB":
                    fields[name] = int(parts[0])
    except OSError:
        return None
    return fields


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _format_memory(samples: Sequence[MemorySample]) -> str:
    if not samples:
        return "(process gone)"
    return "; ".join(
        f"pid {s.pid}: VmRSS {s.rss_kb / 1024:.1f} MB, VmHWM {s.hwm_kb / 1024:.1f} MB"
        for s in samples
    )


def report_load(result: LoadResult, connections: int, pipeline: int) -> str:
    """Format a load run's figures, latencies in milliseconds."""
    lat = result.latencies
    lines = [
        f"load: {connections} connections x pipeline {pipeline}, {result.seconds:g} s measured",
        f"throughput: {result.throughput:,.0f} lookups/s ({result.lookups:,} lookups)",
        f"latency ms: p50 {percentile(lat, 0.50) * 1e3:.3f}, "
        f"p99 {percentile(lat, 0.99) * 1e3:.3f}, "
        f"p999 {percentile(lat, 0.999) * 1e3:.3f}, "
        f"max {(lat[-1] if lat else math.nan) * 1e3:.3f}",
        f"errors: {result.errors}",
    ]
    lines.extend(f"  error: {sample}" for sample in result.error_samples)
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class _Target:
    """Where the load goes, and which processes to watch."""

    host: str
    port: int
    table: str
    bridge_pid: int | None
    memcached_pid: int | None


async def _measure(target: _Target, args: argparse.Namespace) -> int:
    """Run the load phase, then the idle phase; print everything; 0 if no errors."""
    workload = Workload.for_keys(target.table, args.keys, args.keys_prefix)
    pids = {"bridge": target.bridge_pid, "memcached": target.memcached_pid}
    if target.bridge_pid is not None:
        print("bridge memory at start:", _format_memory(memory_of_tree(target.bridge_pid)))
    cpu_before = {name: process_cpu_seconds(pid) for name, pid in pids.items() if pid}
    own_before = _own_cpu_seconds()
    wall_before = time.perf_counter()
    result = await run_load(
        target.host,
        target.port,
        workload,
        connections=args.connections,
        pipeline=args.pipeline,
        seconds=args.seconds,
        warmup=args.warmup,
    )
    wall = time.perf_counter() - wall_before
    print(report_load(result, args.connections, args.pipeline))
    cpu_used = {"loadgen": _own_cpu_seconds() - own_before}
    cpu_used.update(
        (name, process_cpu_seconds(pid) - cpu_before[name]) for name, pid in pids.items() if pid
    )
    print(
        f"cpu over {wall:.1f} s (warm-up included): "
        + ", ".join(f"{name} {used:.1f} s ({used / wall:.0%})" for name, used in cpu_used.items())
    )
    errors = result.errors
    if target.bridge_pid is not None:
        print("bridge memory after load:", _format_memory(memory_of_tree(target.bridge_pid)))
    if args.idle > 0:
        streams, failures = await open_idle_connections(
            target.host, target.port, workload, args.idle
        )
        try:
            await trio.sleep(_IDLE_SETTLE)
            print(f"idle: {len(streams)} connections open ({failures} failed)")
            if target.bridge_pid is not None:
                print(
                    f"bridge memory holding {len(streams)} idle connections:",
                    _format_memory(memory_of_tree(target.bridge_pid)),
                )
        finally:
            with trio.move_on_after(_PHASE_TIMEOUT):
                for stream in streams:
                    await stream.aclose()
        errors += failures
    return 0 if errors == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    parser = argparse.ArgumentParser(
        description="Pipelined socketmap load on the bridge: throughput, p50/p99/p999 "
        "latency, errors, and the bridge's memory with idle connections."
    )
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections")
    parser.add_argument("--pipeline", type=int, default=8, help="requests in flight each")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds first")
    parser.add_argument("--idle", type=int, default=0, help="idle connections to open after")
    parser.add_argument("--keys", type=int, default=20_000, help="distinct keys cycled through")
    parser.add_argument("--keys-prefix", default="user", help="local-part prefix of the keys")
    parser.add_argument(
        "--port", type=int, help="a running bridge's socketmap port (default: start our own)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="with --port: its loopback address")
    parser.add_argument("--table", default=TABLE_NAME, help="with --port: the socketmap name")
    parser.add_argument("--bridge-pid", type=int, help="with --port: report this PID's memory")
    parser.add_argument(
        "--seed-memcache",
        type=int,
        metavar="PORT",
        help="with --port: first store the keys in memcached on 127.0.0.1:PORT",
    )
    parser.add_argument(
        "--key-format",
        default=DEFAULT_KEY_FORMAT,
        help="the table's key_format, for seeding (default %(default)s)",
    )
    parser.add_argument(
        "--bridge-extra",
        action="append",
        default=[],
        metavar="TOML",
        help="own bridge: a TOML line for the table section (repeatable)",
    )
    parser.add_argument(
        "--listen-extra",
        action="append",
        default=[],
        metavar="TOML",
        help="own bridge: a TOML line for each listener section (repeatable)",
    )
    parser.add_argument(
        "--top-extra",
        action="append",
        default=[],
        metavar="TOML",
        help="own bridge: a TOML line at the top of its file, e.g. 'workers = 2'",
    )
    parser.add_argument("--label", default="", help="a name for this configuration, printed")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    if args.connections < 1 or args.pipeline < 1 or args.keys < 1:
        raise SystemExit("--connections, --pipeline and --keys must be >= 1")
    if not 0 < args.seconds <= 3600 or not 0 <= args.warmup <= 600:
        raise SystemExit("--seconds must be in (0, 3600] and --warmup in [0, 600]")
    if args.idle < 0:
        raise SystemExit("--idle must be >= 0")
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        raise SystemExit("only loopback is driven: --host must be 127.0.0.1, ::1 or localhost")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load generator and print the results; 0 if there were no errors."""
    args = build_parser().parse_args(argv)
    _check_arguments(args)
    print(f"label: {args.label or '(none)'}")
    print_machine()
    if args.port is not None:
        if args.seed_memcache is not None:
            seed_memcache(
                args.seed_memcache,
                (
                    (
                        args.key_format.replace("%s", bench_key(i, args.keys_prefix)).encode(),
                        bench_value(i).encode(),
                    )
                    for i in range(args.keys)
                ),
            )
        target = _Target(args.host, args.port, args.table, args.bridge_pid, None)
        return trio.run(_measure, target, args)
    listen_extra = list(args.listen_extra)
    if not any(line.split("=")[0].strip() == "max_connections" for line in listen_extra):
        # The default cap (1000) would queue the idle connections unaccepted.
        needed = args.connections + args.idle + _CONNECTION_SLACK
        listen_extra.append(f"max_connections = {needed}")
    with (
        tempfile.TemporaryDirectory(prefix="bench-loadgen-") as scratch,
        bench_servers(
            Path(scratch),
            args.keys,
            key_prefix=args.keys_prefix,
            key_format=args.key_format,
            table_extra=args.bridge_extra,
            listen_extra=listen_extra,
            top_extra=args.top_extra,
        ) as servers,
    ):
        print(f"own bridge: pid {servers.bridge.process.pid}, {args.keys} keys seeded")
        target = _Target(
            "127.0.0.1",
            servers.socketmap_port,
            TABLE_NAME,
            servers.bridge.process.pid,
            servers.memcached.process.pid,
        )
        return trio.run(_measure, target, args)


if __name__ == "__main__":
    sys.exit(main())
