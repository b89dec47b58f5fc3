"""Lookup time through the bridge versus Postfix's own ``memcache:`` client.

Not a test: it measures and prints. Run from the repository root:

    .venv/bin/python -m bench.compare [--keys 20000] [--rounds 5] [--clients 1,32]

Theory of operation
-------------------
One private memcached and one bridge daemon are started on free loopback
ports. memcached is seeded with ``--keys`` entries under the table's
``key_format``; the bridge serves that table over a socketmap listener and
a tcp listener, and a memcache_table(5) ``.cf`` file describes the same
table to Postfix's native client. Four *paths* then answer the same keys
with Postfix's own client, ``postmap -q -``:

* ``native``:    ``memcache:/.../perf.cf`` (Postfix talks to memcached),
* ``proxymap``:  ``proxy:memcache:/.../perf.cf`` (Postfix's proxymap(8)
  daemon of a private Postfix instance talks to memcached; ``postmap -c
  DIR`` reaches it through that instance's queue directory),
* ``socketmap``: ``socketmap:inet:127.0.0.1:PORT:perf`` (through the bridge),
* ``tcp``:       ``tcp:127.0.0.1:PORT`` (through the bridge).

``proxymap`` is the fair comparison for the bridge: both add one process
and one socket hop between Postfix's client and memcached. The private
Postfix (``inet_interfaces = loopback-only``, its own config, queue and
data directories under the scratch directory) is started only when the
path is selected and is always stopped with ``postfix -c DIR stop``.

A *run* is one path at one client count: with 1 client a single ``postmap
-q -`` reads every key; with N clients, N ``postmap -q -`` processes read
disjoint slices of the keys, started together and timed until the last one
exits. Keys are fed from files, so the measuring process does no work
while the clock runs. Each round runs every path at every client count,
the paths in rotating order so that none always runs first or last (a
machine warming up or slowing down is spread over all of them). Every
run's output is compared byte for byte with the expected ``key<TAB>value``
lines, so a path that fails fast cannot look fast.

The figures are the median and minimum wall time per path and client
count, the ratio of the path's median to the native median, and for the
bridge's paths its CPU time per lookup: the bridge process's (and any
worker children's) utime+stime from ``/proc/PID/stat`` before and after
each run, divided by the run's lookups (the clock tick is usually 10 ms:
0.5 us per lookup at 20,000 keys). ``--hot-cache`` adds ``hot_cache_ttl =
60`` and ``hot_cache_size`` = ``--keys`` to the bridge's table. The
bridge's table takes extra TOML lines verbatim (``--bridge-extra``), and
its listeners too (``--listen-extra``), so the effect of a setting is
measured by running the script twice with different ``--label``\\ s.

:func:`bench_servers` and the key scheme (:func:`bench_key`,
:func:`bench_value`) are shared with ``bench/loadgen.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

from tests.integration.harness import (
    MEMCACHED,
    POSTMAP,
    Bridge,
    Memcached,
    age_file,
    free_port,
    run_bridge,
    run_memcached,
)
from tests.mailflow.harness import run_postfix

__all__ = [
    "DEFAULT_KEY_FORMAT",
    "PATHS",
    "TABLE_NAME",
    "BenchServers",
    "RunResult",
    "bench_key",
    "bench_servers",
    "bench_value",
    "build_parser",
    "describe_machine",
    "main",
    "print_machine",
    "process_cpu_seconds",
    "proxymap_postfix",
    "rotated",
    "run_postmap_clients",
    "seed_memcache",
    "summarize",
    "time_postmap_clients",
    "write_slices",
]

#: The socketmap name of the benchmark table; also the .cf file's stem.
TABLE_NAME: Final = "perf"

#: Template of the memcache key. A prefix (rather than plain %s) makes the
#: bridge and Postfix expand key_format on every lookup, as a real table does.
DEFAULT_KEY_FORMAT: Final = "perf:%s"

#: Paths in their base order; each round rotates it by one.
PATHS: Final = ("native", "proxymap", "socketmap", "tcp")

#: Paths served by the bridge, whose CPU time is measured per run.
BRIDGE_PATHS: Final = ("socketmap", "tcp")

#: Entries per pipelined write while seeding. Large enough that seeding
#: 20,000 keys takes a handful of round trips, small enough that one batch
#: (~1 MB) never strains memcached's read buffer.
_SEED_BATCH: Final = 10_000

#: Longest one run may take before its clients are killed and the benchmark
#: fails: 20,000 lookups take a few seconds even on the slowest path, so
#: this only ever fires on a hang.
_RUN_TIMEOUT: Final = 300.0

#: Keys read once per path before the first round, untimed: it loads
#: postmap and the shared libraries into the page cache and opens the
#: bridge's memcache connections, costs that are not per-lookup.
_WARMUP_KEYS: Final = 200

#: Longest the private Postfix's proxymap may take to answer its first lookup.
_PROXYMAP_READY_TIMEOUT: Final = 30.0


def bench_key(index: int, prefix: str = "user") -> str:
    """The lookup key number ``index``: lower case, so no path folds it differently."""
    return f"{prefix}{index}@bench.example"


def bench_value(index: int) -> str:
    """The value stored for key number ``index``: unique, so a mixed-up reply is caught."""
    return f"dest{index}@mail.bench.example"


def seed_memcache(port: int, items: Iterable[tuple[bytes, bytes]]) -> int:
    """Store items in memcached on 127.0.0.1, pipelined.

    Each batch is a run of ``set ... noreply`` commands closed by
    ``version``: memcached answers in order, so its VERSION line proves
    every set before it was processed.

    Args:
      port: memcached's loopback port.
      items: (memcache key, value) pairs; stored with flags 0, no expiry.

    Returns:
      How many items were stored.

    Raises:
      RuntimeError: if memcached answers anything but VERSION, which means
        a set was rejected.
    """
    stored = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        batch: list[bytes] = []
        for key, value in items:
            batch.append(b"set %b 0 0 %d noreply\r\n%b\r\n" % (key, len(value), value))
            if len(batch) >= _SEED_BATCH:
                stored += _send_seed_batch(sock, batch)
                batch = []
        if batch:
            stored += _send_seed_batch(sock, batch)
    return stored


def _send_seed_batch(sock: socket.socket, batch: list[bytes]) -> int:
    sock.sendall(b"".join(batch) + b"version\r\n")
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    if not reply.startswith(b"VERSION "):
        # With noreply, only a failed set says anything; quote the start.
        raise RuntimeError(f"memcached rejected a seed batch: {reply[:200]!r}")
    return len(batch)


@dataclass(frozen=True, slots=True)
class BenchServers:
    """A running memcached and bridge serving the benchmark table three ways.

    Attributes:
      memcached: the seeded memcached.
      bridge: the bridge daemon (``bridge.process.pid`` is its PID).
      socketmap_port: the bridge's socketmap listener on 127.0.0.1.
      tcp_port: the bridge's tcp listener on 127.0.0.1, serving the table.
      native_cf: a memcache_table(5) file for the same table.
      keys: the seeded lookup keys, in order.
      postfix_config: the config_directory of a private Postfix whose
        proxymap serves ``proxy:memcache:`` + ``native_cf``, or None when
        none runs (then the ``proxymap`` path is unavailable).
    """

    memcached: Memcached
    bridge: Bridge
    socketmap_port: int
    tcp_port: int
    native_cf: Path
    keys: tuple[str, ...]
    postfix_config: Path | None = None

    def table_for(self, path: str) -> str:
        """The Postfix table argument (``type:name``) that reaches the table by ``path``."""
        if path == "native":
            return f"memcache:{self.native_cf}"
        if path == "proxymap":
            return f"proxy:memcache:{self.native_cf}"
        if path == "socketmap":
            return f"socketmap:inet:127.0.0.1:{self.socketmap_port}:{TABLE_NAME}"
        if path == "tcp":
            return f"tcp:127.0.0.1:{self.tcp_port}"
        raise ValueError(f"unknown path {path!r}; known: {', '.join(PATHS)}")

    def config_dir_for(self, path: str) -> Path | None:
        """The ``postmap -c`` directory the path needs, or None for the default."""
        if path != "proxymap":
            return None
        if self.postfix_config is None:
            raise RuntimeError("proxymap: no private Postfix is running (see proxymap_postfix)")
        return self.postfix_config


@contextlib.contextmanager
def bench_servers(
    directory: Path,
    key_count: int,
    *,
    key_prefix: str = "user",
    key_format: str = DEFAULT_KEY_FORMAT,
    table_extra: Sequence[str] = (),
    listen_extra: Sequence[str] = (),
    top_extra: Sequence[str] = (),
) -> Iterator[BenchServers]:
    """Start and seed memcached, start the bridge, write the native ``.cf``.

    Both servers are stopped when the context exits, however it exits.

    Args:
      directory: where the bridge's TOML and the ``.cf`` file are written.
      key_count: how many keys to seed (:func:`bench_key` 0 .. N-1).
      key_prefix: the keys' local-part prefix.
      key_format: the table's key_format, for the bridge and the ``.cf``.
        Seeding expands only ``%s`` (the whole key), so use a template
        built from ``%s`` and literal text.
      table_extra: TOML lines added verbatim to the bridge's table section.
      listen_extra: TOML lines added verbatim to each listener section.
      top_extra: TOML lines added verbatim at the top (e.g. ``workers = 2``).

    Yields:
      The running servers.
    """
    keys = tuple(bench_key(index, key_prefix) for index in range(key_count))
    with run_memcached() as memcached:
        seed_memcache(
            memcached.port,
            (
                (key_format.replace("%s", key).encode(), bench_value(index).encode())
                for index, key in enumerate(keys)
            ),
        )
        native_cf = directory / f"{TABLE_NAME}.cf"
        native_cf.write_text(f"memcache = {memcached.endpoint}\nkey_format = {key_format}\n")
        # CF-9: Postfix waits for a .cf modified within the last second to
        # settle, which would be charged to the first native run.
        age_file(native_cf)
        socketmap_port, tcp_port = _two_free_ports()
        config = directory / "bridge.toml"
        config.write_text(
            _bridge_toml(
                memcached.endpoint,
                socketmap_port,
                tcp_port,
                key_format=key_format,
                table_extra=table_extra,
                listen_extra=listen_extra,
                top_extra=top_extra,
            )
        )
        with run_bridge(config) as bridge:
            yield BenchServers(memcached, bridge, socketmap_port, tcp_port, native_cf, keys)


@contextlib.contextmanager
def proxymap_postfix(
    root: Path, native_cf: Path, probe_key: str, probe_value: str
) -> Iterator[Path]:
    """Start a private Postfix whose proxymap serves ``proxy:memcache:native_cf``.

    The instance lives under ``root`` (config, queue and data directories;
    ``inet_interfaces = loopback-only``) and is always stopped with
    ``postfix -c DIR stop`` when the context exits, however it exits. Every
    directory from ``/`` down to ``native_cf`` must be traversable, and the
    file readable, by user postfix: proxymap opens it after dropping
    privileges.

    Args:
      root: an empty or missing directory for the instance.
      native_cf: the memcache_table(5) file proxymap is allowed to open.
      probe_key: a seeded key; the instance is ready once ``postmap -c DIR
        -q probe_key proxy:memcache:native_cf`` prints ``probe_value``.
      probe_value: the value stored for ``probe_key``.

    Yields:
      The instance's config_directory, for ``postmap -c``.

    Raises:
      RuntimeError: if Postfix does not start or proxymap does not answer
        within the time limit.
    """
    table = f"proxy:memcache:{native_cf}"
    # run_postfix asserts; the benchmark reports failures as RuntimeError.
    with contextlib.ExitStack() as stack:
        try:
            instance = stack.enter_context(
                run_postfix("bench", root, free_port(), {"proxy_read_maps": table})
            )
        except AssertionError as exc:
            raise RuntimeError(f"proxymap: {exc}") from None
        _wait_proxymap_ready(instance.config_dir, table, probe_key, probe_value)
        yield instance.config_dir


def _wait_proxymap_ready(config_dir: Path, table: str, key: str, value: str) -> None:
    deadline = time.monotonic() + _PROXYMAP_READY_TIMEOUT
    last = ""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(
                f"proxymap: no answer for {key!r} within {_PROXYMAP_READY_TIMEOUT:g} s: {last}"
            )
        try:
            completed = subprocess.run(
                [POSTMAP, "-c", str(config_dir), "-q", key, table],
                capture_output=True,
                text=True,
                timeout=max(1.0, remaining),
                check=False,
            )
        except subprocess.TimeoutExpired:
            last = "postmap timed out"
            continue
        if completed.returncode == 0 and completed.stdout.strip() == value:
            return
        output = f"{completed.stdout.strip()!r} {completed.stderr.strip()!r}"
        last = f"exit {completed.returncode}, {output}"
        time.sleep(0.05)


def _two_free_ports() -> tuple[int, int]:
    first = free_port()
    second = free_port()
    while second == first:
        second = free_port()
    return first, second


def _bridge_toml(
    memcache_endpoint: str,
    socketmap_port: int,
    tcp_port: int,
    *,
    key_format: str,
    table_extra: Sequence[str],
    listen_extra: Sequence[str],
    top_extra: Sequence[str] = (),
) -> str:
    top_lines = "".join(line + "\n" for line in top_extra)
    listen_lines = "".join(line + "\n" for line in listen_extra)
    table_lines = "".join(line + "\n" for line in table_extra)
    return (
        # info, not warning: the harness waits for the "ready" info line.
        # Nothing is logged per lookup at info, so logging costs no time.
        'log_level = "info"\n'
        f"{top_lines}"
        "[[listen]]\n"
        f'endpoint = "inet:127.0.0.1:{socketmap_port}"\n'
        'protocol = "socketmap"\n'
        f"{listen_lines}"
        "[[listen]]\n"
        f'endpoint = "inet:127.0.0.1:{tcp_port}"\n'
        'protocol = "tcp"\n'
        f'table = "{TABLE_NAME}"\n'
        f"{listen_lines}"
        f"[tables.{TABLE_NAME}]\n"
        f'memcache = "{memcache_endpoint}"\n'
        f'key_format = "{key_format}"\n'
        f"{table_lines}"
    )


@dataclass(frozen=True, slots=True)
class RunResult:
    """One timed run: a path at a client count, over every key.

    Attributes:
      path: one of :data:`PATHS`.
      clients: how many ``postmap -q -`` processes shared the keys.
      seconds: wall time from starting the first client to the last exit.
      bridge_cpu: the bridge's CPU seconds (user + system) during the run,
        or None when the path does not go through the bridge.
    """

    path: str
    clients: int
    seconds: float
    bridge_cpu: float | None = None


def run_postmap_clients(
    servers: BenchServers, path: str, slices: Sequence[Path], scratch: Path
) -> float:
    """Time ``postmap -q -`` processes on one path, one per key slice, started together.

    Args:
      servers: the running servers.
      path: which path the clients use.
      slices: key files written by :func:`write_slices`; one client each.
      scratch: where the clients' output goes.

    Returns:
      Wall seconds from the first start to the last exit.

    Raises:
      RuntimeError: as :func:`time_postmap_clients`.
    """
    return time_postmap_clients(
        servers.table_for(path), path, slices, scratch, config_dir=servers.config_dir_for(path)
    )


def time_postmap_clients(
    table: str,
    path: str,
    slices: Sequence[Path],
    scratch: Path,
    *,
    config_dir: Path | None = None,
) -> float:
    """Time ``postmap -q - TABLE`` processes, one per key slice, started together.

    Args:
      table: the Postfix table argument (``type:name``).
      path: a name for the clients' output files and error messages.
      slices: key files written by :func:`write_slices`; one client each
        (the same file may serve several clients).
      scratch: where the clients' output goes.
      config_dir: passed to ``postmap -c`` (needed for ``proxy:`` tables of
        a private instance), or None for Postfix's default.

    Returns:
      Wall seconds from the first start to the last exit.

    Raises:
      RuntimeError: if a client fails, hangs past the run time limit, or
        prints anything but the expected ``key<TAB>value`` lines.
    """
    outputs = [scratch / f"{path}-{index}.out" for index in range(len(slices))]
    errors = [scratch / f"{path}-{index}.err" for index in range(len(slices))]
    argv = [POSTMAP, *(["-c", str(config_dir)] if config_dir else []), "-q", "-", table]
    with contextlib.ExitStack() as files:
        processes: list[subprocess.Popen[bytes]] = []
        try:
            started = time.monotonic()
            for key_file, output, error in zip(slices, outputs, errors, strict=True):
                processes.append(
                    subprocess.Popen(
                        argv,
                        stdin=files.enter_context(key_file.open("rb")),
                        stdout=files.enter_context(output.open("wb")),
                        stderr=files.enter_context(error.open("wb")),
                    )
                )
            deadline = started + _RUN_TIMEOUT
            for process in processes:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            elapsed = time.monotonic() - started
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"{path}: {len(slices)} postmap clients still running after {_RUN_TIMEOUT:g} s"
            ) from None
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
    for process, key_file, output, error in zip(processes, slices, outputs, errors, strict=True):
        _check_output(path, process.returncode, key_file, output, error)
    return elapsed


def _check_output(path: str, returncode: int, key_file: Path, output: Path, error: Path) -> None:
    expected = key_file.with_suffix(".expected").read_bytes()
    got = output.read_bytes()
    stderr = error.read_bytes().decode("utf-8", "replace")
    if returncode != 0 or got != expected or stderr:
        raise RuntimeError(
            f"{path}: postmap over {key_file.name} exited {returncode}, "
            f"{len(got.splitlines())} of {len(expected.splitlines())} lines, "
            f"output {'matches' if got == expected else 'differs'}; stderr: {stderr[:500]!r}"
        )


def write_slices(directory: Path, keys: Sequence[str], clients: int) -> list[Path]:
    """Split keys into ``clients`` disjoint, near-equal slices, one file each.

    Each ``NAME.keys`` file (the client's stdin) gets a ``NAME.expected``
    twin holding the exact output ``postmap -q -`` must print for it.

    Args:
      directory: where the files go.
      keys: every key, in order; key i has value :func:`bench_value` (i).
      clients: the number of slices.

    Returns:
      The ``.keys`` files, one per client.
    """
    files: list[Path] = []
    for client in range(clients):
        indexes = range(client, len(keys), clients)
        key_file = directory / f"c{clients}-{client}.keys"
        key_file.write_text("".join(keys[i] + "\n" for i in indexes))
        key_file.with_suffix(".expected").write_text(
            "".join(f"{keys[i]}\t{bench_value(i)}\n" for i in indexes)
        )
        files.append(key_file)
    return files


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (utime + stime) of a process and its live descendants, from ``/proc``.

    Descendants count so that ``workers = N`` children are included; a
    child that exited during a run loses its share, which cannot happen
    while the bridge runs normally.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesized command: state is field 3, so
        # utime (14) and stime (15) are at offsets 11 and 12.
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    pending.extend(int(child) for child in (task / "children").read_text().split())
    return total / ticks


def rotated(paths: Sequence[str], round_number: int) -> list[str]:
    """The paths in this round's order: rotated by one per round."""
    shift = round_number % len(paths)
    return [*paths[shift:], *paths[:shift]]


def describe_machine() -> list[tuple[str, str]]:
    """What a reader needs to compare figures: CPU, memory, kernel, versions.

    Returns:
      (name, description) pairs, in display order.
    """
    return [
        ("cpus", str(len(os.sched_getaffinity(0)))),
        ("cpu model", _proc_field("/proc/cpuinfo", "model name") or platform.processor()),
        ("memory", _proc_field("/proc/meminfo", "MemTotal") or "?"),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("python", platform.python_version()),
        ("memcached", _command_output([MEMCACHED, "-V"])),
        (
            "postfix",
            _command_output([shutil.which("postconf") or "postconf", "-h", "mail_version"]),
        ),
    ]


def _proc_field(path: str, name: str) -> str | None:
    with contextlib.suppress(OSError), open(path) as lines:
        for line in lines:
            field_name, _, value = line.partition(":")
            if field_name.strip() == name:
                return value.strip()
    return None


def _command_output(argv: list[str]) -> str:
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"? ({exc})"
    return completed.stdout.strip() or completed.stderr.strip() or "?"


def print_machine(out: TextIO = sys.stdout) -> None:
    """Print :func:`describe_machine` and the date, one ``name: value`` per line."""
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %z')}", file=out)
    for name, value in describe_machine():
        print(f"{name}: {value}", file=out)


def summarize(
    results: Sequence[RunResult], paths: Sequence[str], clients: Sequence[int], key_count: int
) -> str:
    """Format the per-path table: median, min, max, ratio to native, bridge CPU per lookup.

    Args:
      results: every timed run.
      key_count: keys looked up per run, for the lookups/s column.
      paths: paths in display order.
      clients: client counts in display order.

    Returns:
      The table, one line per (clients, path), with a header.
    """
    lines = [
        f"{'clients':>7}  {'path':<9}  {'median s':>9}  {'min s':>7}  {'max s':>7}  "
        f"{'vs native':>9}  {'lookups/s':>10}  {'bridge us/lookup':>16}"
    ]
    for client_count in clients:
        medians: dict[str, float] = {}
        for path in paths:
            times = [r.seconds for r in results if r.path == path and r.clients == client_count]
            if times:
                medians[path] = statistics.median(times)
        for path, median in medians.items():
            times = [r.seconds for r in results if r.path == path and r.clients == client_count]
            native = medians.get("native")
            ratio = f"{median / native:9.2f}" if native else f"{'-':>9}"
            cpu = [
                r.bridge_cpu
                for r in results
                if r.path == path and r.clients == client_count and r.bridge_cpu is not None
            ]
            cpu_text = f"{statistics.median(cpu) / key_count * 1e6:>16.1f}" if cpu else f"{'-':>16}"
            lines.append(
                f"{client_count:>7}  {path:<9}  {median:>9.3f}  {min(times):>7.3f}  "
                f"{max(times):>7.3f}  {ratio}  {key_count / median:>10,.0f}  {cpu_text}"
            )
    return "\n".join(lines)


def _parse_clients(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"client counts must be >= 1: {text!r}")
    return counts


def _parse_paths(text: str) -> list[str]:
    paths = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [path for path in paths if path not in PATHS]
    if not paths or unknown:
        raise argparse.ArgumentTypeError(f"paths must be among {', '.join(PATHS)}: {text!r}")
    return paths


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    parser = argparse.ArgumentParser(
        description="Time postmap -q - through memcache: (native), proxy:memcache: "
        "(proxymap), the bridge's socketmap and tcp listeners, interleaved; print medians, "
        "ratios to native and the bridge's CPU time per lookup."
    )
    parser.add_argument("--keys", type=int, default=20_000, help="keys seeded and looked up")
    parser.add_argument("--rounds", type=int, default=5, help="runs per path and client count")
    parser.add_argument(
        "--clients",
        type=_parse_clients,
        default=[1, 32],
        help="comma-separated client counts (concurrent postmap processes), default 1,32",
    )
    parser.add_argument(
        "--paths",
        type=_parse_paths,
        default=list(PATHS),
        help="comma-separated subset of native,proxymap,socketmap,tcp (default: all)",
    )
    parser.add_argument(
        "--bridge-extra",
        action="append",
        default=[],
        metavar="TOML",
        help="a TOML line added verbatim to the bridge's table section (repeatable), "
        "e.g. 'hot_cache_ttl = 5'",
    )
    parser.add_argument(
        "--listen-extra",
        action="append",
        default=[],
        metavar="TOML",
        help="a TOML line added verbatim to each bridge listener section (repeatable)",
    )
    parser.add_argument(
        "--top-extra",
        action="append",
        default=[],
        metavar="TOML",
        help="a TOML line added verbatim at the top of the bridge's file, e.g. 'workers = 2'",
    )
    parser.add_argument(
        "--hot-cache",
        action="store_true",
        help="add 'hot_cache_ttl = 60' and 'hot_cache_size = KEYS' to the bridge's table",
    )
    parser.add_argument("--label", default="", help="a name for this configuration, printed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the results.

    Returns:
      0 on success; 1 when a run failed its output check or hung (the
      message says which path and client).
    """
    try:
        return _run(build_parser().parse_args(argv))
    except RuntimeError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.keys < 1 or args.rounds < 1:
        raise SystemExit("--keys and --rounds must be >= 1")
    clients: list[int] = args.clients
    paths: list[str] = args.paths
    if max(clients) > args.keys:
        raise SystemExit("every client needs at least one key: --clients above --keys")
    print(f"label: {args.label or '(none)'}")
    print_machine()
    print(f"keys: {args.keys}, rounds: {args.rounds}, clients: {clients}, paths: {paths}")
    table_extra: list[str] = list(args.bridge_extra)
    if args.hot_cache:
        table_extra += ["hot_cache_ttl = 60", f"hot_cache_size = {args.keys}"]
    for line in table_extra:
        print(f"table extra: {line}")
    for line in args.listen_extra:
        print(f"listen extra: {line}")
    for line in args.top_extra:
        print(f"top extra: {line}")
    with (
        tempfile.TemporaryDirectory(prefix="bench-compare-") as scratch_name,
        contextlib.ExitStack() as stack,
    ):
        scratch = Path(scratch_name)
        # proxymap runs as user postfix and opens perf.cf in here.
        scratch.chmod(0o755)
        servers = stack.enter_context(
            bench_servers(
                scratch,
                args.keys,
                table_extra=table_extra,
                listen_extra=args.listen_extra,
                top_extra=args.top_extra,
            )
        )
        servers.native_cf.chmod(0o644)
        if "proxymap" in paths:
            postfix_config = stack.enter_context(
                proxymap_postfix(
                    scratch / "postfix", servers.native_cf, servers.keys[0], bench_value(0)
                )
            )
            servers = dataclasses.replace(servers, postfix_config=postfix_config)
        slices = {count: write_slices(scratch, servers.keys, count) for count in clients}
        warmup_dir = scratch / "warmup"
        warmup_dir.mkdir()
        warmup_slices = write_slices(warmup_dir, servers.keys[: min(_WARMUP_KEYS, args.keys)], 1)
        for path in paths:
            run_postmap_clients(servers, path, warmup_slices, warmup_dir)
        results: list[RunResult] = []
        for round_number in range(args.rounds):
            order = rotated(paths, round_number)
            figures = []
            for client_count in clients:
                for path in order:
                    bridged = path in BRIDGE_PATHS
                    pid = servers.bridge.process.pid
                    cpu_before = process_cpu_seconds(pid) if bridged else 0.0
                    seconds = run_postmap_clients(servers, path, slices[client_count], scratch)
                    cpu = process_cpu_seconds(pid) - cpu_before if bridged else None
                    results.append(RunResult(path, client_count, seconds, cpu))
                    figures.append(f"{path}x{client_count} {seconds:.3f}s")
            print(f"round {round_number + 1}: " + ", ".join(figures), flush=True)
    print()
    print(summarize(results, paths, clients, args.keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
