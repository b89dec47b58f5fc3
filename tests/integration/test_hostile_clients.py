"""Hostile clients against the running bridge: answers, bounds, fairness, memory.

Theory of operation
-------------------
One bridge process and one memcached serve the whole module. Each test
plays one kind of hostile client against it over real sockets (broken
frames, thousands of idle connections, slowloris senders, clients that
never read, random bytes) and checks three things:

* **each hostile connection** gets the answer the README promises (PERM,
  ``400``/``500`` or NOTFOUND) or is closed, within a stated bound;
* **a well-behaved client is unaffected**: a *latency probe* (a separate
  Python process, so the hostile threads of this process cannot steal its
  interpreter lock) sends a few hundred paced lookups on one connection,
  first with no load and then alongside the hostile clients; the loaded
  p99 must stay under :data:`LATENCY_FACTOR` times the unloaded p99, and
  every answer must be right;
* **the bridge's memory stays bounded**: its RSS (``VmRSS`` in
  ``/proc/PID/status``) is sampled before, throughout and after the
  scenario, and the growth per hostile connection is asserted and
  reported.

What the bridge holds is read from the kernel, not guessed from timing:
its open descriptors (``/proc/PID/fd``) and, per connection, the state
and queue sizes of its sockets (``/proc/net/tcp``). Every wait polls one
of these conditions with an upper bound; the only deliberate pauses are
the slowloris senders' own one byte per second.

Each scenario records one row in the reliability report with the bound it
measured. The bridge's own bounds are its settings: ``idle_timeout``
(socketmap 100 s, tcp never), ``request_timeout`` (10 s from a request's
first byte) and the fixed ``WRITE_TIMEOUT`` (100 s). CI checks the first
two on listeners configured with short values; the long run
(``BRIDGE_LONG=1``) also waits out the defaults and WRITE_TIMEOUT.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

import pytest

from bridge.dialect import WRITE_TIMEOUT
from bridge.protocol.socketmap import MAX_REQUEST_PAYLOAD
from bridge.protocol.tcptable import MAX_REQUEST_LINE, quote
from tests.integration.harness import Bridge, Memcached, free_port, run_bridge, run_memcached
from tests.integration.test_server import RawClient, ServerClosed
from tests.reliability import ReliabilityReport, long_mode
from tests.unit.test_protocol_fuzz import (
    HOSTILE_SOCKETMAP_PIECES,
    HOSTILE_TCP_PIECES,
    Event,
    reference_socketmap_server,
    reference_tcp_server,
)

#: Upper bound for any reply or close the bridge owes a client. A correct
#: answer takes milliseconds; the bound only has to survive a loaded CI box.
REPLY_TIMEOUT: Final = 10.0

#: The loaded p99 of the well-behaved client must stay below this multiple
#: of its unloaded p99: generous for a shared 2-core machine, yet a bridge
#: that let one hostile client stall the event loop fails it at once.
LATENCY_FACTOR: Final = 3.0

#: Loaded measurements allowed per scenario before the p99 rule fails
#: (see :class:`Fairness`).
LATENCY_ATTEMPTS: Final = 3

#: Lookups per latency probe, after LATENCY_WARMUP unmeasured ones. A few
#: hundred make p99 a real percentile (the 3rd-slowest of 300), not the max.
LATENCY_REQUESTS: Final = 1_000 if long_mode() else 300
LATENCY_WARMUP: Final = 50

#: Pause between probe lookups: Postfix asks one lookup at a time, and a
#: paced probe stays alongside the hostile load instead of racing past it.
LATENCY_PACING: Final = 0.002

#: How often the RSS sampler looks at the bridge. Connections are opened
#: and closed over seconds, so 10 ms catches the peak.
RSS_SAMPLE_INTERVAL: Final = 0.01

#: Idle connections held at once (half socketmap, half tcp).
IDLE_CONNECTIONS: Final = 5_000

#: Descriptors wanted beyond the idle connections, for the test process
#: (pytest, memcached clients, probes) and for the bridge (listeners,
#: memcache pool, log pipe) alike.
FD_HEADROOM: Final = 1_000

#: RSS the bridge may add per idle connection: a trio task, a socket
#: object and an empty protocol buffer are a few KiB; this is generous.
IDLE_RSS_PER_CONNECTION: Final = 64 * 1024

#: Slowloris senders and the pause between their bytes.
SLOWLORIS_CLIENTS: Final = 200 if long_mode() else 50
SLOW_BYTE_INTERVAL: Final = 1.0

#: idle_timeout of the "idle" listener, in seconds (integer, as configured).
SHORT_IDLE_TIMEOUT: Final = 1

#: request_timeout of the "trickle" listeners: short, so that CI sees a
#: slowloris cut in seconds. The long run checks the default instead.
SHORT_REQUEST_TIMEOUT: Final = 2

#: The bridge's default request_timeout (README configuration reference),
#: which the main listeners keep.
DEFAULT_REQUEST_TIMEOUT: Final = 10

#: Clients that send lookups for large values and never read the replies.
NON_READERS: Final = 20

#: A socketmap value close to the 100000-byte reply limit, so a few
#: unread replies fill any socket buffer; and the tcp_table equivalent
#: (a reply line holds at most 4095 bytes).
BIG_SOCKETMAP_VALUE: Final = b"b" * 90_000
BIG_TCP_VALUE: Final = b"t" * 4_000

#: Pipelined lookups each non-reader sends: far more replies than the
#: kernel buffers on both ends hold (tcp_wmem's 4 MiB maximum included).
NON_READER_REQUESTS: Final = 2_000

#: Receive buffer of a non-reader: small, so its window closes at once.
NON_READER_RCVBUF: Final = 4_096

#: RSS the bridge may add per non-reading connection: the reply it cannot
#: send (at most 100 kB) plus one receive chunk (64 KiB) and change.
NON_READER_RSS_PER_CONNECTION: Final = 1024 * 1024

#: Connections of the end-to-end fuzzer.
E2E_FUZZ_CONNECTIONS: Final = 5_000 if long_mode() else 300

#: The value every well-behaved lookup must get back.
GOOD_VALUE: Final = b"well-behaved"

_AREA: Final = "hostile clients"

Address = tuple[str, int]


# ------------------------------------------------------------ the bridge


@dataclass(frozen=True)
class Hostile:
    """The module's bridge, its memcached and its listeners."""

    bridge: Bridge
    memcached: Memcached
    socketmap: Address
    tcp: Address
    idle: Address
    trickle_socketmap: Address
    trickle_tcp: Address

    @property
    def pid(self) -> int:
        return self.bridge.process.pid

    @property
    def ports(self) -> frozenset[int]:
        addresses = (self.socketmap, self.tcp, self.idle, self.trickle_socketmap, self.trickle_tcp)
        return frozenset(address[1] for address in addresses)


def _raise_fd_limit(wanted: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted``, at most to the hard limit.

    The bridge started afterwards inherits it: the bridge does not raise
    its own limit, so this is what lets it hold thousands of connections.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _distinct_free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    """Start memcached and a bridge sized for thousands of connections.

    The listeners' ``max_connections`` is above :data:`IDLE_CONNECTIONS`,
    so the tests measure what the bridge does with that many clients, not
    its connection cap (test_server.py covers the cap).
    """
    original_limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    _raise_fd_limit(IDLE_CONNECTIONS + FD_HEADROOM)
    try:
        yield from _serve_hostile(tmp_path_factory)
    finally:
        # The bridge keeps the raised limit it inherited; pytest gets its own back.
        resource.setrlimit(resource.RLIMIT_NOFILE, original_limit)


def _serve_hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    tmp_path = tmp_path_factory.mktemp("hostile")
    sm_port, tcp_port, idle_port, trickle_sm_port, trickle_tcp_port = _distinct_free_ports(5)
    cap = IDLE_CONNECTIONS + FD_HEADROOM
    config = tmp_path / "bridge.toml"
    with run_memcached() as memcached:
        memcached.set(b"aliases:k", GOOD_VALUE)
        memcached.set(b"aliases:big", BIG_SOCKETMAP_VALUE)
        memcached.set(b"aliases:bigtcp", BIG_TCP_VALUE)
        table = f"""memcache = "{memcached.endpoint}"
key_format = "aliases:%s"
data_size_limit = {len(BIG_SOCKETMAP_VALUE)}
"""
        config.write_text(f"""
[[listen]]
endpoint = "inet:127.0.0.1:{sm_port}"
protocol = "socketmap"
max_connections = {cap}

[[listen]]
endpoint = "inet:127.0.0.1:{tcp_port}"
protocol = "tcp"
table = "aliases"
max_connections = {cap}

[[listen]]
endpoint = "inet:127.0.0.1:{idle_port}"
protocol = "socketmap"
idle_timeout = {SHORT_IDLE_TIMEOUT}

[[listen]]
endpoint = "inet:127.0.0.1:{trickle_sm_port}"
protocol = "socketmap"
request_timeout = {SHORT_REQUEST_TIMEOUT}

[[listen]]
endpoint = "inet:127.0.0.1:{trickle_tcp_port}"
protocol = "tcp"
table = "aliases"
request_timeout = {SHORT_REQUEST_TIMEOUT}

[tables.aliases]
{table}
# A one-letter name keeps slowloris requests short: 6 bytes take 5 s at
# 1 byte/s, inside the default request_timeout.
[tables.a]
{table}""")
        with run_bridge(config) as bridge:
            yield Hostile(
                bridge=bridge,
                memcached=memcached,
                socketmap=("127.0.0.1", sm_port),
                tcp=("127.0.0.1", tcp_port),
                idle=("127.0.0.1", idle_port),
                trickle_socketmap=("127.0.0.1", trickle_sm_port),
                trickle_tcp=("127.0.0.1", trickle_tcp_port),
            )


@pytest.fixture
def served(hostile: Hostile) -> Hostile:
    """The module's bridge, alive and holding no client connection."""
    _assert_alive(hostile)
    _wait_until_released(hostile)
    return hostile


def _assert_alive(hostile: Hostile) -> None:
    assert hostile.bridge.process.poll() is None, "".join(hostile.bridge.log)


# ------------------------------------------------ what the kernel says


def rss_bytes(pid: int) -> int:
    """The process's resident set size, from VmRSS in /proc/PID/status."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_files_limit(pid: int) -> int:
    """The soft RLIMIT_NOFILE of a process, from /proc/PID/limits."""
    with open(f"/proc/{pid}/limits", encoding="ascii") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return sys.maxsize if soft == "unlimited" else int(soft)
    raise AssertionError(f"no open files limit for process {pid}")


@dataclass(frozen=True, slots=True)
class SocketState:
    """One line of /proc/net/tcp, seen from the bridge's side."""

    local_port: int
    remote_port: int
    state: int
    send_queue: int
    receive_queue: int


#: /proc/net/tcp state codes (include/net/tcp_states.h).
_ESTABLISHED: Final = 0x01
_CLOSE_WAIT: Final = 0x08


def bridge_side_sockets(ports: frozenset[int]) -> list[SocketState]:
    """Sockets whose local port is one of the bridge's listeners (IPv4 loopback)."""
    found: list[SocketState] = []
    with open("/proc/net/tcp", encoding="ascii") as table:
        next(table)
        for line in table:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port not in ports:
                continue
            tx_queue, rx_queue = (int(part, 16) for part in fields[4].split(":"))
            found.append(
                SocketState(
                    local_port,
                    int(fields[2].rsplit(":", 1)[1], 16),
                    int(fields[3], 16),
                    tx_queue,
                    rx_queue,
                )
            )
    return found


def _client_connections(hostile: Hostile) -> int:
    """Client connections the bridge still has: established, or closed by the client only."""
    return sum(
        1
        for sock in bridge_side_sockets(hostile.ports)
        if sock.state in (_ESTABLISHED, _CLOSE_WAIT)
    )


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` until it holds; return the seconds it took.

    Raises:
      AssertionError: naming ``what`` if it does not hold within ``timeout``.
    """
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.01)
    return time.monotonic() - started


def _wait_until_released(hostile: Hostile, timeout: float = REPLY_TIMEOUT) -> float:
    return wait_until(
        lambda: _client_connections(hostile) == 0,
        timeout,
        "the bridge closes every client connection",
    )


class RssSampler:
    """Samples a process's RSS in a thread and keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = rss_bytes(pid)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_INTERVAL):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))

    def growth_per(self, connections: int) -> int:
        return (self.peak - self.before) // max(connections, 1)


# -------------------------------------------------------- latency probe

# The probe runs in its own interpreter, from the spec's framing alone
# (SM-5, SM-9; TCP-1, TCP-4), and prints its latencies as JSON.
_PROBE_SCRIPT: Final = r"""
import json, socket, sys, time
host, port, protocol = sys.argv[1], int(sys.argv[2]), sys.argv[3]
count, warmup, pacing = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
value = sys.argv[7].encode()
if protocol == "socketmap":
    request = b"9:aliases k,"
    expected = b"%d:OK %s," % (3 + len(value), value)
else:
    request = b"get k\n"
    expected = b"200 " + value + b"\n"
sock = socket.create_connection((host, port), timeout=10)
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
latencies, wrong = [], 0
for index in range(warmup + count):
    started = time.perf_counter()
    sock.sendall(request)
    reply = b""
    while len(reply) < len(expected):
        chunk = sock.recv(len(expected) - len(reply))
        if not chunk:
            break
        reply += chunk
    elapsed = time.perf_counter() - started
    wrong += reply != expected
    if index >= warmup:
        latencies.append(elapsed)
    time.sleep(pacing)
print(json.dumps({"latencies": latencies, "wrong": wrong}))
"""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one latency probe measured."""

    latencies: list[float]
    wrong: int

    @property
    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[math.ceil(0.99 * len(ordered)) - 1]


def probe(address: Address, protocol: str) -> ProbeResult:
    """Run the well-behaved client once and return its latencies."""
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            _PROBE_SCRIPT,
            address[0],
            str(address[1]),
            protocol,
            str(LATENCY_REQUESTS),
            str(LATENCY_WARMUP),
            str(LATENCY_PACING),
            GOOD_VALUE.decode(),
        ],
        capture_output=True,
        text=True,
        timeout=60 + LATENCY_REQUESTS * (LATENCY_PACING + REPLY_TIMEOUT / 100),
        check=True,
    )
    data = json.loads(completed.stdout)
    return ProbeResult([float(x) for x in data["latencies"]], int(data["wrong"]))


@dataclass
class Fairness:
    """The well-behaved client's latency without and with the hostile load.

    The loaded measurement may be repeated, while the load is still on, up
    to :data:`LATENCY_ATTEMPTS` times: other work on a shared CI machine
    can spoil one p99 of a few hundred samples, but a bridge that really
    stalls its other clients under this load is slow on every attempt.
    Every attempt's samples count in the totals and the report.
    """

    unloaded: dict[str, ProbeResult] = field(default_factory=dict)
    loaded: dict[str, ProbeResult] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    wrong: int = 0

    def _probe(self, hostile: Hostile, protocol: str) -> ProbeResult:
        result = probe(_address_of(hostile, protocol), protocol)
        self.requests += len(result.latencies)
        self.wrong += result.wrong
        return result

    def measure_unloaded(self, hostile: Hostile, *protocols: str) -> None:
        for protocol in protocols:
            self.unloaded[protocol] = self._probe(hostile, protocol)

    def measure_loaded(self, hostile: Hostile) -> None:
        for protocol in self.unloaded:
            for attempt in range(1, LATENCY_ATTEMPTS + 1):
                self.loaded[protocol] = self._probe(hostile, protocol)
                self.attempts[protocol] = attempt
                if self._fair(protocol):
                    break

    def _fair(self, protocol: str) -> bool:
        return self.loaded[protocol].p99 < LATENCY_FACTOR * self.unloaded[protocol].p99

    def summary(self) -> str:
        return ", ".join(
            f"{protocol} p99 {self.loaded[protocol].p99 * 1000:.2f} ms "
            f"(unloaded {self.unloaded[protocol].p99 * 1000:.2f} ms"
            + (f", attempt {self.attempts[protocol]}" if self.attempts[protocol] > 1 else "")
            + ")"
            for protocol in self.unloaded
        )

    def check(self) -> None:
        assert self.wrong == 0, "the well-behaved client got a wrong answer"
        for protocol, unloaded in self.unloaded.items():
            loaded = self.loaded[protocol]
            assert self._fair(protocol), (
                f"{protocol}: well-behaved p99 {loaded.p99 * 1000:.2f} ms under load on "
                f"{LATENCY_ATTEMPTS} attempts, over {LATENCY_FACTOR} x unloaded "
                f"{unloaded.p99 * 1000:.2f} ms"
            )


def _address_of(hostile: Hostile, protocol: str) -> Address:
    return hostile.socketmap if protocol == "socketmap" else hostile.tcp


def _kib(size: int) -> str:
    return f"{size / 1024:.0f} KiB"


def _mib(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MiB"


def _memory_summary(sampler: RssSampler, after: int, connections: int) -> str:
    return (
        f"RSS {_mib(sampler.before)} -> peak {_mib(sampler.peak)} -> {_mib(after)} "
        f"({_kib(sampler.growth_per(connections))}/connection)"
    )


# ---------------------------------------------------------------- clients


def _netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


def _connect(address: Address, *, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            # Set before connect, so the advertised window is small from the start.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(REPLY_TIMEOUT)
        sock.connect(address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def _many(sockets: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def _send_ignoring_close(sock: socket.socket, data: bytes) -> None:
    """Send what the server takes; it may close before reading everything."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset counts as closed)."""
    received = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(received)
        if not chunk:
            return bytes(received)
        received += chunk


# ------------------------------------------------------ malformed input


@dataclass(frozen=True, slots=True)
class HostileInput:
    """Bytes a hostile client sends, and what the README says it gets back.

    ``reply`` is the expected reply's start (status word or code), None
    when nothing may be sent. ``closes`` says whether the bridge must then
    close the connection (a broken frame, README "Malformed requests") or
    keep serving it. ``half_close`` makes the client shut its sending side
    after the bytes, for inputs that only end at the client's EOF.
    """

    protocol: str
    name: str
    data: bytes
    reply: bytes | None
    closes: bool
    half_close: bool = False


# README "Reply codes" and "Malformed requests"; SM-6, SM-8; TCP-2, TCP-3.
HOSTILE_INPUTS: Final = [
    HostileInput("socketmap", "length 999999999", b"999999999:", b"PERM", closes=True),
    HostileInput("socketmap", "letter in the length", b"12a:", b"PERM", closes=True),
    HostileInput("socketmap", "signed length", b"-5:", b"PERM", closes=True),
    HostileInput("socketmap", "33-digit length", b"1" * 33, b"PERM", closes=True),
    HostileInput("socketmap", "missing comma", b"9:aliases k;", b"PERM", closes=True),
    HostileInput(
        "socketmap",
        "1 MB netstring",
        _netstring(b"aliases " + b"x" * 1_000_000),
        b"PERM",
        closes=True,
    ),
    HostileInput(
        "socketmap",
        "truncated frame, then EOF",
        b"9:aliases",
        None,
        closes=True,
        half_close=True,
    ),
    HostileInput("socketmap", "payload without space", _netstring(b"aliases"), b"PERM", False),
    HostileInput("socketmap", "empty map name", _netstring(b" k"), b"PERM", False),
    HostileInput("socketmap", "non-ASCII map name", _netstring(b"caf\xc3\xa9 k"), b"PERM", False),
    HostileInput("socketmap", "unknown map name", _netstring(b"nosuch k"), b"PERM", False),
    HostileInput(
        "socketmap", "invalid UTF-8 key", _netstring(b"aliases caf\xe9"), b"NOTFOUND", False
    ),
    HostileInput("socketmap", "NUL in key", _netstring(b"aliases k\x00x"), b"NOTFOUND", False),
    HostileInput("socketmap", "CR LF in key", _netstring(b"aliases k\r\nx"), b"NOTFOUND", False),
    HostileInput("socketmap", "space in key", _netstring(b"aliases k x"), b"NOTFOUND", False),
    HostileInput("socketmap", "empty key", _netstring(b"aliases "), b"NOTFOUND", False),
    HostileInput("tcp", "1 MB line without LF", b"get " + b"x" * 1_000_000, b"400", True),
    HostileInput(
        "tcp", "unterminated line, then EOF", b"get k", None, closes=True, half_close=True
    ),
    HostileInput("tcp", "bad %-escape", b"get k%zz\n", b"400", False),
    HostileInput("tcp", "put command", b"put k v\n", b"500", False),
    HostileInput("tcp", "upper-case GET", b"GET k\n", b"500", False),
    HostileInput("tcp", "empty line", b"\n", b"500", False),
    HostileInput("tcp", "raw NUL byte", b"get k\x00x\n", b"500", False),
    HostileInput("tcp", "raw invalid UTF-8", b"get caf\xe9\n", b"500", False),
    HostileInput("tcp", "quoted invalid UTF-8", b"get caf%E9\n", b"500", False),
    HostileInput("tcp", "quoted CR LF", b"get k%0D%0Ax\n", b"500", False),
    HostileInput("tcp", "raw space", b"get k x\n", b"500", False),
    HostileInput("tcp", "raw CR inside the key", b"get k\rx\n", b"500", False),
]


def _expected_good_reply(protocol: str) -> bytes:
    if protocol == "socketmap":
        return _netstring(b"OK " + GOOD_VALUE)
    return b"200 " + GOOD_VALUE + b"\n"


def _good_request(protocol: str) -> bytes:
    return _netstring(b"aliases k") if protocol == "socketmap" else b"get k\n"


def _read_reply(client: RawClient, protocol: str) -> bytes:
    return client.read_netstring() if protocol == "socketmap" else client.read_line()


def _play(hostile: Hostile, case: HostileInput) -> float:
    """Play one hostile input on a fresh connection; return seconds to the verdict.

    Raises:
      AssertionError: the bridge answered otherwise than the README says,
        or did not close (or kept serving) as it should.
    """
    client = RawClient(_connect(_address_of(hostile, case.protocol)))
    try:
        started = time.monotonic()
        _send_ignoring_close(client.sock, case.data)
        if case.half_close:
            client.sock.shutdown(socket.SHUT_WR)
        if case.reply is not None:
            reply = _read_reply(client, case.protocol)
            assert reply.startswith(case.reply), (case.name, reply)
        if case.closes:
            client.assert_closed_by_server()
        else:
            client.send(_good_request(case.protocol))
            good = _read_reply(client, case.protocol)
            wire = _netstring(good) if case.protocol == "socketmap" else good
            assert wire == _expected_good_reply(case.protocol), (case.name, good)
        return time.monotonic() - started
    finally:
        client.close()


@pytest.mark.parametrize(
    "case", HOSTILE_INPUTS, ids=[f"{c.protocol}: {c.name}" for c in HOSTILE_INPUTS]
)
def test_malformed_input_is_answered_or_closed_within_bound(
    served: Hostile, case: HostileInput, reliability: ReliabilityReport
) -> None:
    bystander = RawClient(_connect(_address_of(served, case.protocol)))
    try:
        _assert_served(bystander.sock, served)
        elapsed = _play(served, case)
        # The bridge keeps serving the others, on an older connection too.
        _assert_served(bystander.sock, served)
    finally:
        bystander.close()
    _assert_alive(served)
    assert elapsed < REPLY_TIMEOUT
    verdict = case.reply.decode() if case.reply else "no reply"
    ending = "then closed" if case.closes else "connection kept"
    reliability.record(
        _AREA,
        f"{case.protocol}: {case.name}",
        requests=1,
        correct=1,
        bound=f"{verdict}, {ending}, in {elapsed * 1000:.0f} ms (bound {REPLY_TIMEOUT:.0f} s)",
    )


def test_malformed_storm_spares_the_well_behaved_client(
    served: Hostile, reliability: ReliabilityReport
) -> None:
    """Every hostile input, over and over on fresh connections, alongside the probe."""
    fairness = Fairness()
    fairness.measure_unloaded(served, "socketmap", "tcp")
    stop = threading.Event()
    played: list[float] = []
    failures: list[BaseException] = []

    def storm() -> None:
        for case in _cycle_until(stop, HOSTILE_INPUTS):
            try:
                played.append(_play(served, case))
            except (AssertionError, OSError, ServerClosed) as exc:
                failures.append(exc)
            # One hostile connection every 10 ms: a steady storm that
            # overlaps the whole probe without saturating a CI core.
            stop.wait(0.01)

    with RssSampler(served.pid) as sampler:
        thread = threading.Thread(target=storm, daemon=True)
        thread.start()
        try:
            wait_until(lambda: len(played) + len(failures) > 0, REPLY_TIMEOUT, "storm started")
            fairness.measure_loaded(served)
        finally:
            stop.set()
            thread.join()
    _wait_until_released(served)
    after = rss_bytes(served.pid)
    reliability.record(
        _AREA,
        "storm of malformed inputs (every input above, one connection per 10 ms)",
        requests=len(played) + len(failures) + fairness.requests,
        correct=len(played) + fairness.requests - fairness.wrong,
        wrong=len(failures) + fairness.wrong,
        bound=f"{len(played)} hostile connections, slowest {max(played, default=0) * 1000:.0f}"
        f" ms; {fairness.summary()}; {_memory_summary(sampler, after, len(played))}",
    )
    assert not failures, failures[:3]
    fairness.check()


def _cycle_until(stop: threading.Event, items: list[HostileInput]) -> Iterator[HostileInput]:
    while not stop.is_set():
        yield from items


# ----------------------------------------------------- idle connections


def test_thousands_of_idle_connections(served: Hostile, reliability: ReliabilityReport) -> None:
    wanted = IDLE_CONNECTIONS + FD_HEADROOM
    ours, bridge_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0], open_files_limit(served.pid)
    assert ours >= wanted and bridge_limit >= wanted, (
        f"{IDLE_CONNECTIONS} idle connections need {wanted} descriptors on both ends; "
        f"the test process may open {ours}, the bridge {bridge_limit} (raise the hard "
        f"RLIMIT_NOFILE, e.g. ulimit -Hn)"
    )
    fairness = Fairness()
    fairness.measure_unloaded(served, "socketmap", "tcp")
    _wait_until_released(served)
    base_fds = open_fds(served.pid)
    peaks: list[RssSampler] = []
    afters: list[int] = []
    held_for = 0.0
    # Twice: the second round shows the memory of closed connections is reused.
    for round_number in range(2):
        with RssSampler(served.pid) as sampler:
            with _many(_open_idle(served)) as idle:
                held_for = wait_until(
                    lambda: open_fds(served.pid) >= base_fds + len(idle),
                    REPLY_TIMEOUT * 3,
                    f"the bridge holds {len(idle)} idle connections",
                )
                if round_number == 0:
                    fairness.measure_loaded(served)
                # Every one of them is still served, not merely accepted.
                for sock in (idle[0], idle[-1]):
                    _assert_served(sock, served)
            closed_in = _wait_until_released(served, REPLY_TIMEOUT * 3)
        peaks.append(sampler)
        afters.append(rss_bytes(served.pid))
    first, second = peaks
    per_connection = first.growth_per(IDLE_CONNECTIONS)
    reliability.record(
        _AREA,
        f"{IDLE_CONNECTIONS} idle connections at once (half socketmap, half tcp)",
        requests=fairness.requests + 4,
        correct=fairness.requests - fairness.wrong + 4,
        wrong=fairness.wrong,
        bound=f"all held in {held_for:.1f} s, released {closed_in:.1f} s after close; "
        f"{fairness.summary()}; {_memory_summary(first, afters[0], IDLE_CONNECTIONS)}; "
        f"second round peak {_mib(second.peak)}; bridge fd limit {bridge_limit}",
    )
    fairness.check()
    assert per_connection <= IDLE_RSS_PER_CONNECTION, _kib(per_connection)
    # Closed connections' memory is reused: a second round does not grow
    # the bridge by another round's worth (10% slack for allocator noise).
    assert second.peak <= first.peak + (first.peak - first.before) // 10 + 2 * 1024 * 1024


def _open_idle(hostile: Hostile) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    try:
        for index in range(IDLE_CONNECTIONS):
            sockets.append(_connect(hostile.socketmap if index % 2 else hostile.tcp))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _assert_served(sock: socket.socket, hostile: Hostile) -> None:
    protocol = "socketmap" if sock.getpeername()[1] == hostile.socketmap[1] else "tcp"
    client = RawClient(sock)
    client.send(_good_request(protocol))
    reply = _read_reply(client, protocol)
    wire = _netstring(reply) if protocol == "socketmap" else reply
    assert wire == _expected_good_reply(protocol)


# ---------------------------------------------------------------- slowloris


@dataclass(frozen=True, slots=True)
class SlowRequest:
    protocol: str
    data: bytes
    expected: bytes


def _slow_requests() -> list[SlowRequest]:
    """Valid requests that take 5 s at 1 byte/s: inside the default request_timeout."""
    socketmap = SlowRequest("socketmap", b"3:a k,", _expected_good_reply("socketmap"))
    tcp = SlowRequest("tcp", b"get k\n", _expected_good_reply("tcp"))
    return [socketmap if index % 2 else tcp for index in range(SLOWLORIS_CLIENTS)]


def test_slowloris_senders_are_answered_once_complete(
    served: Hostile, reliability: ReliabilityReport
) -> None:
    """One byte per second each, finishing within request_timeout: the bridge waits and answers."""
    fairness = Fairness()
    fairness.measure_unloaded(served, "socketmap", "tcp")
    requests = _slow_requests()
    with RssSampler(served.pid) as sampler, _many([]) as sockets:
        for request in requests:
            sockets.append(_connect(_address_of(served, request.protocol)))
        longest = max(len(request.data) for request in requests)
        failures: list[BaseException] = []

        def dribble() -> None:
            try:
                for offset in range(longest):
                    for sock, request in zip(sockets, requests, strict=True):
                        sock.sendall(request.data[offset : offset + 1])
                    if offset < longest - 1:
                        time.sleep(SLOW_BYTE_INTERVAL)
            except OSError as exc:
                failures.append(exc)

        sender = threading.Thread(target=dribble, daemon=True)
        started = time.monotonic()
        sender.start()
        fairness.measure_loaded(served)
        alongside = sender.is_alive()
        sender.join()
        last_byte = time.monotonic()
        assert not failures, failures
        answered_after = 0.0
        correct = 0
        for sock, request in zip(sockets, requests, strict=True):
            reply = _receive_exactly(sock, len(request.expected))
            answered_after = max(answered_after, time.monotonic() - last_byte)
            correct += reply == request.expected
    _wait_until_released(served)
    after = rss_bytes(served.pid)
    reliability.record(
        _AREA,
        f"{SLOWLORIS_CLIENTS} slowloris senders, 1 byte/s, requests done within request_timeout",
        requests=len(requests) + fairness.requests,
        correct=correct + fairness.requests - fairness.wrong,
        wrong=len(requests) - correct + fairness.wrong,
        bound=f"held {last_byte - started:.0f} s while sending, all answered "
        f"{answered_after * 1000:.0f} ms after their last byte; {fairness.summary()}; "
        f"{_memory_summary(sampler, after, len(requests))}",
    )
    assert correct == len(requests)
    assert answered_after < REPLY_TIMEOUT
    assert alongside, "the probe outlasted the slowloris senders; lengthen their requests"
    fairness.check()


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    received = b""
    while len(received) < size:
        chunk = sock.recv(size - len(received))
        if not chunk:
            break
        received += chunk
    return received


def test_slowloris_slower_than_request_timeout_is_cut(
    served: Hostile, reliability: ReliabilityReport
) -> None:
    """A request still trickling in at request_timeout is cut, unanswered (README request_timeout).

    The limit runs from the request's first byte, whatever part of the
    frame the later bytes belong to. CI uses the "trickle" listeners
    (request_timeout = 2 s); the long run uses the main listeners and
    their default of 10 s.
    """
    if long_mode():
        addresses, limit = [served.socketmap, served.tcp], DEFAULT_REQUEST_TIMEOUT
    else:
        addresses, limit = [served.trickle_socketmap, served.trickle_tcp], SHORT_REQUEST_TIMEOUT
    # Valid requests, but too long to finish at 1 byte/s before the limit.
    endless = {
        addresses[0]: _netstring(b"aliases " + b"k" * 2 * limit),
        addresses[1]: b"get " + b"k" * 2 * limit + b"\n",
    }
    targets = [addresses[index % 2] for index in range(SLOWLORIS_CLIENTS)]
    with _many([_connect(address) for address in targets]) as sockets:
        stop = threading.Event()
        first_byte = time.monotonic()
        sender = threading.Thread(
            target=_dribble_until_cut,
            args=(sockets, [endless[address] for address in targets], stop),
            daemon=True,
        )
        sender.start()
        try:
            closes = _watch_closes(sockets, limit + REPLY_TIMEOUT)
        finally:
            stop.set()
            sender.join()
    _wait_until_released(served)
    cut_after = {
        protocol: [
            closes[sock].at - first_byte
            for sock, target in zip(sockets, targets, strict=True)
            if target == address
        ]
        for protocol, address in zip(("socketmap", "tcp"), addresses, strict=True)
    }
    replied = sum(1 for close in closes.values() if close.received)
    reliability.record(
        _AREA,
        f"{SLOWLORIS_CLIENTS} slowloris senders, 1 byte/s, requests longer than "
        f"request_timeout = {limit} s",
        requests=len(sockets),
        correct=sum(1 for times in cut_after.values() for cut in times if _cut_in_time(cut, limit)),
        wrong=replied,
        bound=", ".join(
            f"{protocol} cut {min(times):.2f}-{max(times):.2f} s after the first byte"
            for protocol, times in cut_after.items()
        )
        + f"; {replied} replies",
    )
    assert replied == 0, "a cut request must get no reply"
    for protocol, times in cut_after.items():
        assert all(_cut_in_time(cut, limit) for cut in times), (
            f"{protocol}: cut {min(times):.2f}-{max(times):.2f} s after the first byte, "
            f"request_timeout is {limit} s"
        )


#: How late after request_timeout a cut may come: the bridge's deadline is
#: exact, so this only absorbs scheduling on a loaded machine.
CUT_SLACK: Final = 1.0


def _cut_in_time(cut: float, limit: float) -> bool:
    # The first byte leaves just after first_byte is taken, hence 0.2 s of
    # slack below the limit.
    return limit - 0.2 <= cut <= limit + CUT_SLACK


@dataclass(frozen=True, slots=True)
class Close:
    """When the bridge closed a connection, and whether it sent anything first."""

    at: float
    received: bytes


def _watch_closes(sockets: list[socket.socket], timeout: float) -> dict[socket.socket, Close]:
    """Wait for the bridge to close every socket, noting each close as it happens.

    Raises:
      AssertionError: if some socket is still open after ``timeout``.
    """
    closes: dict[socket.socket, Close] = {}
    received: dict[socket.socket, bytes] = dict.fromkeys(sockets, b"")
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            selector.register(sock, selectors.EVENT_READ, data=sock)
        while len(closes) < len(sockets):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{len(sockets) - len(closes)} connections still open"
            for key, _ in selector.select(remaining):
                sock = key.data
                assert isinstance(sock, socket.socket)
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    received[sock] += chunk
                    continue
                closes[sock] = Close(time.monotonic(), received[sock])
                selector.unregister(sock)
    return closes


def _dribble_until_cut(
    sockets: list[socket.socket], requests: list[bytes], stop: threading.Event
) -> None:
    """Send each socket its request one byte per second until the bridge closes it."""
    open_sockets = set(range(len(sockets)))
    offset = 0
    while open_sockets and not stop.is_set():
        for index in sorted(open_sockets):
            try:
                sockets[index].send(requests[index][offset : offset + 1])
            except OSError:
                open_sockets.discard(index)
        offset += 1
        stop.wait(SLOW_BYTE_INTERVAL)


def test_slowloris_slower_than_idle_timeout_is_closed(
    served: Hostile, reliability: ReliabilityReport
) -> None:
    """A sender that pauses longer than idle_timeout is closed that long after its last byte."""
    with _many([_connect(served.idle) for _ in range(SLOWLORIS_CLIENTS)]) as sockets:
        for sock in sockets:
            sock.sendall(b"9:al")
        last_byte = time.monotonic()
        closes = _watch_closes(sockets, SHORT_IDLE_TIMEOUT + REPLY_TIMEOUT)
    closed_after = [close.at - last_byte for close in closes.values()]
    replied = sum(1 for close in closes.values() if close.received)
    reliability.record(
        _AREA,
        f"{SLOWLORIS_CLIENTS} slowloris senders pausing past idle_timeout = {SHORT_IDLE_TIMEOUT} s",
        requests=len(sockets),
        correct=len(sockets) - replied,
        wrong=replied,
        bound=f"closed {min(closed_after):.2f}-{max(closed_after):.2f} s after the last byte, "
        f"{replied} replies",
    )
    assert replied == 0, "a partial request must get no reply"
    # Not before the idle limit (a little slack for clock granularity)...
    assert min(closed_after) >= SHORT_IDLE_TIMEOUT - 0.2
    # ...and not long after it.
    assert max(closed_after) <= SHORT_IDLE_TIMEOUT + CUT_SLACK


# -------------------------------------------------------------- non-readers


@dataclass(frozen=True, slots=True)
class NonReader:
    sock: socket.socket
    protocol: str

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port


def _open_non_readers(hostile: Hostile) -> list[NonReader]:
    readers: list[NonReader] = []
    for index in range(NON_READERS):
        protocol = "socketmap" if index % 2 else "tcp"
        sock = _connect(_address_of(hostile, protocol), rcvbuf=NON_READER_RCVBUF)
        readers.append(NonReader(sock, protocol))
        request = _netstring(b"aliases big") if protocol == "socketmap" else b"get bigtcp\n"
        # A few kilobytes: they fit the bridge's receive buffer, so this
        # send completes even though the bridge soon stops reading.
        sock.sendall(request * NON_READER_REQUESTS)
    return readers


def _stuck(hostile: Hostile, readers: list[NonReader]) -> bool:
    """True when the bridge has reply bytes it cannot send on every non-reader."""
    by_port = {sock.remote_port: sock for sock in bridge_side_sockets(hostile.ports)}
    return all(
        reader.port in by_port and by_port[reader.port].send_queue > NON_READER_RCVBUF
        for reader in readers
    )


def test_clients_that_never_read_do_not_block_others(
    served: Hostile, reliability: ReliabilityReport
) -> None:
    fairness = Fairness()
    fairness.measure_unloaded(served, "socketmap", "tcp")
    with RssSampler(served.pid) as sampler:
        readers = _open_non_readers(served)
        with _many([reader.sock for reader in readers]):
            stuck_in = wait_until(
                lambda: _stuck(served, readers),
                REPLY_TIMEOUT,
                "the bridge's replies pile up unsent on every non-reading connection",
            )
            stalled_at = time.monotonic()
            fairness.measure_loaded(served)
            still_stuck = _stuck(served, readers)
            # WRITE_TIMEOUT is the bridge's bound; only the long run waits it out.
            closed_by_bridge = (
                _wait_for_write_timeout(served, readers, stalled_at) if long_mode() else None
            )
        released_in = _wait_until_released(served)
    after = rss_bytes(served.pid)
    per_connection = sampler.growth_per(NON_READERS)
    if closed_by_bridge is None:
        verdict = (
            f"released {released_in * 1000:.0f} ms after the clients closed; the bridge's "
            f"own bound WRITE_TIMEOUT = {WRITE_TIMEOUT:.0f} s is checked with BRIDGE_LONG=1"
        )
    else:
        verdict = f"closed by the bridge {closed_by_bridge:.0f} s after they stalled"
    reliability.record(
        _AREA,
        f"{NON_READERS} clients pipelining {NON_READER_REQUESTS} lookups of large values, "
        "never reading",
        requests=fairness.requests + NON_READERS,
        correct=fairness.requests - fairness.wrong + NON_READERS,
        wrong=fairness.wrong,
        bound=f"stalled in {stuck_in * 1000:.0f} ms; {verdict}; {fairness.summary()}; "
        f"{_memory_summary(sampler, after, NON_READERS)}",
    )
    assert still_stuck, "the non-readers were drained while the probe ran"
    fairness.check()
    assert per_connection <= NON_READER_RSS_PER_CONNECTION, _kib(per_connection)
    if closed_by_bridge is not None:
        # Each send stalled at most stuck_in before we saw it; the bridge
        # gives it WRITE_TIMEOUT from then, not less and not much more.
        assert WRITE_TIMEOUT - stuck_in - 1 <= closed_by_bridge <= WRITE_TIMEOUT + REPLY_TIMEOUT


def _wait_for_write_timeout(hostile: Hostile, readers: list[NonReader], stalled_at: float) -> float:
    """Keep the non-readers open until the bridge closes them.

    Returns:
      Seconds from ``stalled_at`` (when the stall was seen) to the close.
    """
    wait_until(
        lambda: not {reader.port for reader in readers} & _established_ports(hostile),
        WRITE_TIMEOUT + REPLY_TIMEOUT * 3,
        "the bridge closes connections whose replies are not read",
    )
    return time.monotonic() - stalled_at


def _established_ports(hostile: Hostile) -> set[int]:
    return {
        sock.remote_port
        for sock in bridge_side_sockets(hostile.ports)
        if sock.state in (_ESTABLISHED, _CLOSE_WAIT)
    }


# ---------------------------------------------------------- end-to-end fuzz


def _fuzz_stream(rng: random.Random, protocol: str) -> bytes:
    """Valid lookups, hostile frames and raw random bytes, in random order."""
    pieces: list[bytes] = []
    for _ in range(rng.randint(1, 8)):
        roll = rng.random()
        key = rng.choice([b"k", b"K", b"nosuch", rng.randbytes(rng.randint(0, 30))])
        if protocol == "socketmap":
            name = rng.choice([b"aliases", b"a", b"nosuch"])
            if roll < 0.5:
                pieces.append(_netstring(name + b" " + key))
            elif roll < 0.7:
                pieces.append(rng.choice(HOSTILE_SOCKETMAP_PIECES))
            elif roll < 0.85:
                pieces.append(_netstring(rng.randbytes(rng.randint(0, 20))))
            else:
                pieces.append(rng.randbytes(rng.randint(1, 20)))
        elif roll < 0.5:
            pieces.append(b"get " + quote(key) + b"\n")
        elif roll < 0.7:
            pieces.append(rng.choice(HOSTILE_TCP_PIECES))
        else:
            pieces.append(rng.randbytes(rng.randint(1, 20)))
    return b"".join(pieces)


def _check_fuzz_replies(protocol: str, events: list[Event], replies: list[bytes]) -> None:
    """Each owed event got one reply, in order, of the kind the README promises."""
    owed = [event for event in events if event[0] != "closed"]
    assert len(replies) == len(owed), (events, replies)
    for event, reply in zip(owed, replies, strict=True):
        if protocol == "socketmap":
            status = reply.partition(b" ")[0]
            if event[0] == "request" and event[1] in ("aliases", "a"):
                assert status in (b"OK", b"NOTFOUND"), (event, reply)
                if event[2] == b"k":
                    assert reply == b"OK " + GOOD_VALUE, (event, reply)
            else:
                assert status == b"PERM", (event, reply)
        elif event[0] == "get":
            assert reply[:1] in (b"2", b"5"), (event, reply)
            if event[1] == b"k":
                assert reply == b"200 " + GOOD_VALUE + b"\n", (event, reply)
        else:
            assert reply.startswith(b"400 " if event[2] else b"500 "), (event, reply)


def _fuzz_one(hostile: Hostile, protocol: str, stream: bytes) -> int:
    """Send one random stream, half-close, and check every reply; return the replies."""
    if protocol == "socketmap":
        events = reference_socketmap_server(stream, eof=True, max_payload=MAX_REQUEST_PAYLOAD)
    else:
        events = reference_tcp_server(stream, eof=True, max_line=MAX_REQUEST_LINE)
    owed = sum(1 for event in events if event[0] != "closed")
    client = RawClient(_connect(_address_of(hostile, protocol)))
    try:
        _send_ignoring_close(client.sock, stream)
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_WR)
        replies = [_read_reply(client, protocol) for _ in range(owed)]
        client.assert_closed_by_server()
    finally:
        client.close()
    _check_fuzz_replies(protocol, events, replies)
    return owed


def test_random_bytes_over_real_sockets(served: Hostile, reliability: ReliabilityReport) -> None:
    rng = random.Random(20261122)
    replies = 0
    with RssSampler(served.pid) as sampler:
        for index in range(E2E_FUZZ_CONNECTIONS):
            protocol = "socketmap" if index % 2 else "tcp"
            stream = _fuzz_stream(rng, protocol)
            try:
                replies += _fuzz_one(served, protocol, stream)
            except (AssertionError, OSError, ServerClosed) as exc:
                raise AssertionError(f"connection {index}, {protocol}, sent {stream!r}") from exc
    _assert_alive(served)
    _wait_until_released(served)
    after = rss_bytes(served.pid)
    reliability.record(
        _AREA,
        f"end-to-end fuzz: {E2E_FUZZ_CONNECTIONS} connections of random frames and bytes",
        requests=replies,
        correct=replies,
        bound=f"every owed reply in order, then closed; 0 crashes; "
        f"{_memory_summary(sampler, after, E2E_FUZZ_CONNECTIONS)}",
    )
