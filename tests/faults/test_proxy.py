"""The fault proxy itself: command framing and checking, and each fault against a real memcached.

The live tests talk to the proxy over plain blocking sockets, as the
bridge would, with a real memcached behind it. Every wait is bounded by
:data:`REPLY_TIMEOUT`; the only deliberate pause is :data:`QUIET_PERIOD`,
the time a stalled reply must stay away to count as held back.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from bridge.protocol.memcache import CommandFailed, MemcacheClientProtocol
from tests.faults.proxy import (
    GARBAGE_LINES,
    CloseMidReply,
    CommandSplitter,
    Delay,
    FaultProxy,
    Garbage,
    Pass,
    Refuse,
    Reset,
    Stall,
    assert_well_formed,
    command_problem,
)
from tests.integration.harness import Memcached, run_memcached

#: Upper bound for any reply the proxy owes; a loaded CI machine stays far below.
REPLY_TIMEOUT = 10.0

#: How long a held-back reply must stay away. Short: the test pays it in full.
QUIET_PERIOD = 0.3

HIT = b"VALUE k 0 5\r\nhello\r\nEND\r\n"

# ------------------------------------------------------ framing and checking

# Commands of the wire exchanges in spec 12.5 (and the bulk-load set/version
# of MC-17's pipelined form), each well formed.
WELL_FORMED = [
    b"get foo@example.com\r\n",
    b"get Foo@Example.COM\r\n",
    b"set p:bk1 7 100 11\r\nbackupvalue\r\n",
    b"set bk1 0 2592001 11\r\nbackupvalue\r\n",
    b"set bk1 -3 -5 11\r\nbackupvalue\r\n",
    b"delete p:key\r\n",
    b"set k 0 0 0\r\n\r\n",
    b"set k 0 0 8 noreply\r\nv\r\nEND\r\n\r\n",
    b"version\r\n",
    b"get " + b"k" * 250 + b"\r\n",
]

# Commands a client must never send, with the word the problem names.
MALFORMED = {
    "251-byte key (spec 12.5, MC-12)": (b"get " + b"k" * 251 + b"\r\n", "251 bytes"),
    "control byte in key (spec 12.5, 3.7 only)": (b"get a\x01b\r\n", "control byte"),
    "empty key": (b"get \r\n", "0 bytes"),
    "two spaces": (b"set k  0 0 1\r\nv\r\n", "set needs"),
    "two keys": (b"get a b\r\n", "exactly one key"),
    "byte 0x7F in key": (b"delete a\x7f\r\n", "control byte"),
    "byte 0x80 in key": (b"get a\x80\r\n", "outside 0x21..0x7E"),
    "bare LF": (b"get a\n", "CRLF"),
    "no line end": (b"get a", "CRLF"),
    "CR inside the line": (b"get a\rb\r\n", "control byte"),
    "unknown verb": (b"gets a\r\n", "unknown command"),
    "add is not sent": (b"add k 0 0 1\r\nv\r\n", "unknown command"),
    "set too short": (b"set k 0 0\r\n", "set needs"),
    "set bad option": (b"set k 0 0 1 quiet\r\nv\r\n", "set needs"),
    "set data longer": (b"set k 0 0 1\r\nvv\r\n", "announces 1 bytes"),
    "set data without CRLF": (b"set k 0 0 1\r\nvxx", "announces 1 bytes"),
    "set negative length": (b"set k 0 0 -1\r\n\r\n", "length"),
    "set flags not a number": (b"set k x 0 1\r\nv\r\n", "flags"),
    "set ttl over 32 bits": (b"set k 0 4294967296 1\r\nv\r\n", "ttl"),
    "get followed by bytes": (b"get a\r\nget b\r\n", "followed by"),
    "version with argument": (b"version 1\r\n", "no argument"),
}


def split_all(chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    """Feed ``chunks`` one by one, taking commands after each, as the proxy does."""
    splitter = CommandSplitter()
    commands: list[bytes] = []
    for chunk in chunks:
        splitter.receive_data(chunk)
        while (command := splitter.next_command()) is not None:
            commands.append(command)
    return commands, splitter.pending


@pytest.mark.parametrize("command", WELL_FORMED)
def test_well_formed_commands_pass(command: bytes) -> None:
    assert command_problem(command) is None
    assert_well_formed([command])


@pytest.mark.parametrize(("command", "problem"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_commands_are_named(command: bytes, problem: str) -> None:
    reported = command_problem(command)
    assert reported is not None and problem in reported, reported
    with pytest.raises(AssertionError, match="command 1: "):
        assert_well_formed([b"version\r\n", command])


def test_every_split_point_gives_the_same_commands() -> None:
    stream = b"".join(WELL_FORMED)
    for cut in range(len(stream) + 1):
        assert split_all([stream[:cut], stream[cut:]]) == (WELL_FORMED, b""), cut
    assert split_all([bytes([byte]) for byte in stream]) == (WELL_FORMED, b"")


def test_set_data_holding_crlf_is_one_command() -> None:
    # The data block is framed by its length, not by line ends (MC-7).
    command = b"set k 0 0 12\r\nget x\r\nEND\r\n\r\n"
    assert split_all([command + b"version\r\n"]) == ([command, b"version\r\n"], b"")


def test_unfinished_command_stays_pending() -> None:
    assert split_all([b"get a\r\nset k 0 0 5\r\nabc"]) == ([b"get a\r\n"], b"set k 0 0 5\r\nabc")


keys = st.binary(min_size=1, max_size=250).map(
    lambda raw: bytes(0x21 + byte % (0x7F - 0x21) for byte in raw)
)
int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
commands = st.one_of(
    keys.map(lambda key: b"get %s\r\n" % key),
    keys.map(lambda key: b"delete %s\r\n" % key),
    st.just(b"version\r\n"),
    st.builds(
        lambda key, flags, ttl, value, noreply: (
            b"set %s %d %d %d%s\r\n%s\r\n"
            % (key, flags, ttl, len(value), b" noreply" if noreply else b"", value)
        ),
        keys,
        int32,
        int32,
        st.binary(max_size=300),
        st.booleans(),
    ),
)


@given(st.lists(commands, max_size=8), st.lists(st.integers(min_value=0), max_size=8))
def test_round_trip_through_any_chunking(sent: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(sent)
    points = sorted({cut % (len(stream) + 1) for cut in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    received, pending = split_all(chunks)
    assert (received, pending) == (sent, b"")
    assert_well_formed(received)


@given(st.lists(st.binary(max_size=64), max_size=8))
def test_arbitrary_bytes_are_framed_losslessly_and_never_raise(chunks: list[bytes]) -> None:
    received, pending = split_all(chunks)
    assert b"".join(received) + pending == b"".join(chunks)
    for command in [*received, pending]:
        problem = command_problem(command)
        assert problem is None or isinstance(problem, str)
        try:
            assert_well_formed([command])
        except AssertionError:
            assert problem is not None


@pytest.mark.parametrize("line", GARBAGE_LINES)
def test_garbage_lines_fail_every_reply_they_precede(line: bytes) -> None:
    # MC-8/MC-9: the client must reject the reply; a line read as a miss or
    # a value would make the proxy a liar instead of a broken server.
    for reply in (HIT, b"END\r\n"):
        protocol = MemcacheClientProtocol(line_size_limit=1024, data_size_limit=10240)
        protocol.send_get(b"k")
        protocol.receive_data(line + reply)
        assert isinstance(protocol.next_event(), CommandFailed), (line, reply)


def test_negative_delay_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        Delay(-1)


# ------------------------------------------------------------- live proxy


@pytest.fixture(scope="module")
def memcached() -> Iterator[Memcached]:
    with run_memcached() as server:
        server.set(b"k", b"hello")
        yield server


@pytest.fixture
def proxy(memcached: Memcached) -> Iterator[FaultProxy]:
    with FaultProxy(memcached.port, record=True) as running:
        yield running


def connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=REPLY_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_close(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def read_reply(sock: socket.socket, end: bytes = b"END\r\n") -> bytes:
    received = b""
    while not received.endswith(end):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {received!r}"
        received += chunk
    return received


def test_pass_forwards_both_ways(proxy: FaultProxy) -> None:
    assert proxy.endpoint == f"inet:127.0.0.1:{proxy.port}"
    with connect(proxy) as sock:
        sock.sendall(b"get k\r\n")
        assert read_reply(sock) == HIT
        sock.sendall(b"set n 3 0 2\r\nhi\r\n")
        assert read_reply(sock, b"\r\n") == b"STORED\r\n"
    assert isinstance(proxy.fault, Pass) and proxy.accepted == 1


def test_delay_holds_each_reply_back(proxy: FaultProxy) -> None:
    proxy.set_fault(Delay(300))
    with connect(proxy) as sock:
        start = time.monotonic()
        sock.sendall(b"get k\r\n")
        assert read_reply(sock) == HIT
        assert time.monotonic() - start >= 0.3


def test_stall_holds_replies_until_the_fault_changes(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        proxy.set_fault(Stall())
        sock.sendall(b"get k\r\n")
        sock.settimeout(QUIET_PERIOD)
        with pytest.raises(TimeoutError):
            sock.recv(65536)
        sock.settimeout(REPLY_TIMEOUT)
        proxy.set_fault(Pass())
        assert read_reply(sock) == HIT


def test_reset_resets_open_and_new_connections(proxy: FaultProxy) -> None:
    with connect(proxy) as open_before:
        open_before.sendall(b"get k\r\n")
        assert read_reply(open_before) == HIT
        proxy.set_fault(Reset())
        with pytest.raises(ConnectionResetError):
            open_before.recv(65536)
    # The reset may even beat connect() back to user space.
    with pytest.raises(ConnectionResetError), connect(proxy) as opened_during:
        opened_during.recv(65536)
    proxy.set_fault(Pass())
    with connect(proxy) as sock:
        sock.sendall(b"get k\r\n")
        assert read_reply(sock) == HIT


def test_close_mid_reply_delivers_half_then_closes(proxy: FaultProxy) -> None:
    proxy.set_fault(CloseMidReply())
    with connect(proxy) as sock:
        sock.sendall(b"get k\r\n")
        assert read_until_close(sock) == HIT[: len(HIT) // 2]


def test_garbage_goes_in_front_of_each_reply(proxy: FaultProxy) -> None:
    proxy.set_fault(Garbage())
    with connect(proxy) as sock:
        for line in GARBAGE_LINES[:2]:
            sock.sendall(b"get k\r\n")
            assert read_reply(sock) == line + HIT


def test_refuse_then_pass_listens_again_on_the_same_port(proxy: FaultProxy) -> None:
    port = proxy.port
    with connect(proxy) as open_before:
        # A round trip first: a connection still in the kernel's accept
        # queue would be reset when the port closes, not closed.
        open_before.sendall(b"get k\r\n")
        assert read_reply(open_before) == HIT
        proxy.set_fault(Refuse())
        assert read_until_close(open_before) == b""
    with pytest.raises(ConnectionRefusedError):
        connect(proxy).close()
    proxy.set_fault(Pass())
    assert proxy.port == port
    with connect(proxy) as sock:
        sock.sendall(b"get k\r\n")
        assert read_reply(sock) == HIT


def test_recording_returns_every_command_in_accept_order(proxy: FaultProxy) -> None:
    with connect(proxy) as first, connect(proxy) as second:
        first.sendall(b"get k\r\n")
        read_reply(first)
        # Split mid-command and mid-data: recording must not care.
        second.sendall(b"set r 0 0 4\r\nab")
        second.sendall(b"\r\n\r\n")
        read_reply(second, b"\r\n")
        first.sendall(b"version\r\n")
        read_reply(first, b"\r\n")
    commands = proxy.received_commands()
    assert commands == [b"get k\r\n", b"version\r\n", b"set r 0 0 4\r\nab\r\n\r\n"]
    assert_well_formed(commands)


def test_abandoned_command_on_a_closed_connection_is_reported(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"get k\r\nset x 0 0 9\r\nabc")
        read_reply(sock)
    deadline = time.monotonic() + REPLY_TIMEOUT
    while len(commands := proxy.received_commands()) < 2:
        assert time.monotonic() < deadline, commands
        time.sleep(0.01)
    with pytest.raises(AssertionError, match="command 1"):
        assert_well_formed(commands)


def test_recording_needs_record_mode(memcached: Memcached) -> None:
    with FaultProxy(memcached.port) as plain, pytest.raises(RuntimeError, match="record"):
        plain.received_commands()


async def test_faults_switch_from_inside_a_trio_task(proxy: FaultProxy) -> None:
    # The control call blocks only for the proxy thread's microseconds.
    proxy.set_fault(Refuse())
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", proxy.port)
    proxy.set_fault(Pass())
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    async with stream:
        await stream.send_all(b"get k\r\n")
        received = b""
        with trio.fail_after(REPLY_TIMEOUT):
            while not received.endswith(b"END\r\n"):
                received += await stream.receive_some(65536)
    assert received == HIT


def test_closing_stops_listening_and_ends_connections(memcached: Memcached) -> None:
    proxy = FaultProxy(memcached.port)
    proxy.start()
    sock = connect(proxy)
    proxy.close()
    with sock:
        assert read_until_close(sock) == b""
    with pytest.raises(ConnectionRefusedError):
        connect(proxy).close()
    with pytest.raises(RuntimeError, match="not running"):
        proxy.set_fault(Pass())


def test_upstream_down_closes_the_client_connection() -> None:
    with run_memcached() as doomed:
        port = doomed.port
    with FaultProxy(port) as proxy, connect(proxy) as sock:
        assert read_until_close(sock) == b""
