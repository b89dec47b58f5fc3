"""bridge.multiplex: one task serving many connections, with in-memory tables.

Real socket pairs carry the bytes; the tables are fakes whose answers
(and how long they take) each test decides. Deadlines run on trio's
autojump clock, so an idle timeout of 100 s takes no time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from bridge import netio
from bridge.config import ListenerConfig
from bridge.endpoint import InetEndpoint
from bridge.multiplex import Multiplexer
from bridge.outcome import NOT_FOUND, Found, NotFound, Outcome
from bridge.protocol.netstring import encode_netstring as encode
from bridge.table import Table


@dataclass
class FakeTable:
    """What the multiplexer uses of a table: the hot cache and the lookup."""

    hot: dict[bytes, Found | NotFound] = field(default_factory=dict)
    values: dict[bytes, bytes] = field(default_factory=dict)
    #: Keys whose lookup waits until the event is set.
    gates: dict[bytes, trio.Event] = field(default_factory=dict)
    looked_up: list[bytes] = field(default_factory=list)

    def cached(self, key: bytes) -> Found | NotFound | None:
        return self.hot.get(key)

    async def lookup(self, key: bytes) -> Outcome:
        self.looked_up.append(key)
        gate = self.gates.get(key)
        if gate is not None:
            await gate.wait()
        await trio.lowlevel.checkpoint()
        value = self.values.get(key)
        return NOT_FOUND if value is None else Found(value)


@dataclass
class FakeHost:
    table: FakeTable

    @property
    def tables(self) -> Mapping[str, Table]:
        return {"t": self.table}  # type: ignore[dict-item]

    async def lookup(self, table_name: str, key: bytes) -> Outcome:
        assert table_name == "t"
        return await self.table.lookup(key)


def listener_config(
    *, idle_timeout: float = 100.0, request_timeout: float = 10.0
) -> ListenerConfig:
    return ListenerConfig(
        endpoint=InetEndpoint("127.0.0.1", 1),
        protocol="socketmap",
        table=None,
        idle_timeout=idle_timeout,
        max_connections=1000,
        request_timeout=request_timeout,
        allow=(),
        reuse_port=True,
        serving="events",
        busy_poll_us=50,
        mode=0o666,
        owner=None,
        group=None,
    )


@dataclass
class Served:
    multiplexer: Multiplexer
    config: ListenerConfig
    released: list[int] = field(default_factory=list)

    def connect(self) -> socket.socket:
        """A client socket whose server end the multiplexer serves."""
        ours, theirs = socket.socketpair()
        index = len(self.released)
        self.released.append(0)

        def release() -> None:
            self.released[index] += 1

        self.multiplexer.add(netio.Connection(ours), self.config, release)
        theirs.setblocking(False)
        return theirs


@contextlib.asynccontextmanager
async def serving(table: FakeTable, config: ListenerConfig | None = None) -> AsyncIterator[Served]:
    multiplexer = Multiplexer(FakeHost(table))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(multiplexer.run, nursery)
        yield Served(multiplexer, config or listener_config())
        multiplexer.stop()


def request(key: bytes) -> bytes:
    return encode(b"t " + key)


async def read_reply(sock: socket.socket, size: int = 1 << 20) -> bytes:
    """Every reply byte that arrives until the socket has been quiet for a moment."""
    data = b""
    while True:
        with trio.move_on_after(0.05):
            await trio.lowlevel.wait_readable(sock)
            chunk = sock.recv(size)
            if not chunk:
                return data
            data += chunk
            continue
        return data


async def wait_for(condition: Callable[[], bool]) -> None:
    """Poll a condition on state the fakes and the multiplexer change (no event to wait on)."""
    while not condition():  # noqa: ASYNC110
        await trio.sleep(0.001)


async def test_hot_cache_hits_are_answered_in_the_pass_without_a_lookup() -> None:
    table = FakeTable(hot={b"a": Found(b"1"), b"b": NOT_FOUND})
    async with serving(table) as served:
        clients = [served.connect() for _ in range(3)]
        for client in clients:
            client.send(request(b"a") + request(b"b"))
        for client in clients:
            assert await read_reply(client) == encode(b"OK 1") + encode(b"NOTFOUND ")
    assert table.looked_up == []


async def test_a_slow_lookup_does_not_delay_another_connection() -> None:
    table = FakeTable(values={b"slow": b"s", b"fast": b"f"}, gates={b"slow": trio.Event()})
    async with serving(table) as served:
        waiting, other = served.connect(), served.connect()
        waiting.send(request(b"slow"))
        await wait_for(lambda: table.looked_up == [b"slow"])
        other.send(request(b"fast"))
        assert await read_reply(other) == encode(b"OK f")
        assert await read_reply(waiting) == b""
        table.gates[b"slow"].set()
        assert await read_reply(waiting) == encode(b"OK s")


async def test_pipelined_requests_are_answered_one_at_a_time_in_order() -> None:
    table = FakeTable(
        hot={b"h": Found(b"hot")},
        values={b"x": b"1", b"y": b"2"},
        gates={b"x": trio.Event()},
    )
    async with serving(table) as served:
        client = served.connect()
        client.send(request(b"x") + request(b"h") + request(b"y"))
        await wait_for(lambda: table.looked_up == [b"x"])
        # y waits behind x: one request in progress per connection.
        assert await read_reply(client) == b""
        assert table.looked_up == [b"x"]
        table.gates[b"x"].set()
        assert await read_reply(client) == encode(b"OK 1") + encode(b"OK hot") + encode(b"OK 2")


async def test_a_client_that_does_not_read_never_delays_another() -> None:
    big = b"v" * 60000
    table = FakeTable(hot={b"big": Found(big)}, values={b"k": b"small"})
    async with serving(table) as served:
        stuck, other = served.connect(), served.connect()
        # Pipeline far more reply bytes than the socket buffers hold, never reading.
        for _ in range(200):
            with contextlib.suppress(BlockingIOError):
                stuck.send(request(b"big"))
        for _ in range(5):
            other.send(request(b"k"))
            assert await read_reply(other) == encode(b"OK small")
        # The stuck client still gets everything once it reads.
        received = b""
        with trio.move_on_after(5):
            while len(received) < 10 * len(encode(b"OK " + big)):
                await trio.lowlevel.wait_readable(stuck)
                received += stuck.recv(1 << 20)
        assert received.startswith(encode(b"OK " + big) * 10)
        # Gone for good: its answer task fails to write and closes the connection.
        stuck.close()
        await wait_for(lambda: served.released[0] == 1)


async def test_idle_and_unfinished_requests_close_at_their_deadlines(
    autojump_clock: trio.testing.MockClock,
) -> None:
    table = FakeTable(hot={b"a": Found(b"1")})
    config = listener_config(idle_timeout=100, request_timeout=10)
    async with serving(table, config) as served:
        idle, trickle, active = served.connect(), served.connect(), served.connect()
        trickle.send(b"7:t")  # a request that never completes
        start = trio.current_time()
        closed_at: dict[str, float] = {}

        async def watch(name: str, sock: socket.socket) -> None:
            while True:
                await trio.lowlevel.wait_readable(sock)
                if not sock.recv(1024):
                    closed_at[name] = trio.current_time() - start
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, "idle", idle)
            nursery.start_soon(watch, "trickle", trickle)
            # Active every 60 s: the idle timeout restarts with each request.
            for _ in range(3):
                await trio.sleep(60)
                active.send(request(b"a"))
                await trio.lowlevel.checkpoint()
        assert closed_at["trickle"] == pytest.approx(10, abs=0.01)
        assert closed_at["idle"] == pytest.approx(100, abs=0.01)
        assert await read_reply(active) == encode(b"OK 1") * 3
        assert served.released[:2] == [1, 1]
        assert served.released[2] == 0


async def test_stop_closes_waiting_connections_and_finishes_busy_ones() -> None:
    table = FakeTable(values={b"x": b"1"}, gates={b"x": trio.Event()})
    async with serving(table) as served:
        waiting, busy = served.connect(), served.connect()
        busy.send(request(b"x"))
        await wait_for(lambda: table.looked_up == [b"x"])
        served.multiplexer.stop()
        # The waiting connection closes at once; the busy one gets its answer first.
        assert await read_reply(waiting) == b""
        assert served.released[0] == 1
        table.gates[b"x"].set()
        assert await read_reply(busy) == encode(b"OK 1")
        await wait_for(lambda: served.released[1] == 1)


async def test_closed_connections_leave_the_deadline_heap() -> None:
    table = FakeTable()
    async with serving(table) as served:
        for _ in range(5):
            clients = [served.connect() for _ in range(400)]
            for client in clients:
                client.close()
            await wait_for(lambda: sum(served.released) == len(served.released))
        # At most the tolerated stale entries remain, not one per connection ever opened.
        assert len(served.multiplexer._heap) <= 512


async def test_the_client_busy_poll_stays_within_its_bound() -> None:
    # The answer task tries the client's socket for at most busy_poll_us
    # (here 2 ms) after a reply, then hands the connection back to the
    # loop: a client that waits 200 ms before its next request costs no
    # more than the bound in CPU, and is still answered.
    table = FakeTable(values={b"k": b"v"})
    config = dataclasses.replace(listener_config(), busy_poll_us=2000)
    async with serving(table, config) as served:
        client = served.connect()
        cpu_before = time.process_time()
        client.send(request(b"k"))
        assert await read_reply(client) == encode(b"OK v")
        await trio.sleep(0.2)
        spent = time.process_time() - cpu_before
        client.send(request(b"k"))
        assert await read_reply(client) == encode(b"OK v")
    # generous: the event loop's own work plus one 2 ms spin
    assert spent < 0.05
