"""The trio memcache client: real memcached, and scripted misbehaving servers (MC-11).

The scripted servers are real TCP servers on loopback that answer each
connection from a list of canned replies; they stand in for a broken
memcache the way the fault proxy does, without faking anything inside the
client.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import AsyncIterator, Sequence

import pytest
import trio

from bridge.config import PARAMETERS
from bridge.endpoint import InetEndpoint
from bridge.memcache.client import MemcacheClient, MemcacheSettings
from bridge.outcome import Retry
from tests.integration.harness import Memcached, closed_port


def memcache_settings(**overrides: int) -> MemcacheSettings:
    """memcache_table(5)'s defaults (from the parameter schema), with ``overrides``."""
    names = {field.name for field in dataclasses.fields(MemcacheSettings)}
    defaults = {p.name: int(p.default or 0) for p in PARAMETERS if p.name in names}
    return MemcacheSettings(**(defaults | overrides))


class ScriptedServer:
    """Answers the n-th connection's first command with replies[n] (None: stall forever)."""

    def __init__(self, replies: Sequence[bytes | None]) -> None:
        self.replies = list(replies)
        self.connections = 0
        self.received: list[bytes] = []
        self.accepted_at: list[float] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        index = self.connections
        self.connections += 1
        self.accepted_at.append(trio.current_time())
        data = await stream.receive_some(65536)
        self.received.append(data)
        reply = self.replies[min(index, len(self.replies) - 1)]
        if reply is None:
            await trio.sleep_forever()
        await stream.send_all(reply)
        await stream.aclose()


@pytest.fixture
async def scripted(nursery: trio.Nursery) -> AsyncIterator[tuple[ScriptedServer, int]]:
    server = ScriptedServer([])
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1")
    )
    yield server, listeners[0].socket.getsockname()[1]


async def test_real_memcached_get_set_delete(memcached: Memcached) -> None:
    client = MemcacheClient(InetEndpoint("127.0.0.1", memcached.port), memcache_settings())
    assert await client.get(b"k") is None
    assert await client.set(b"k", b"v\r\nEND\r\n", flags=5, ttl=60) is True
    assert await client.get(b"k") == b"v\r\nEND\r\n"
    assert memcached.get(b"k") == (5, b"v\r\nEND\r\n")
    assert await client.delete(b"k") is True
    assert await client.delete(b"k") is False
    await client.aclose()


async def test_concurrent_distinct_keys_never_cross(memcached: Memcached) -> None:
    client = MemcacheClient(InetEndpoint("127.0.0.1", memcached.port), memcache_settings())
    for i in range(50):
        memcached.set(b"key%d" % i, b"value%d" % i)
    results: dict[int, object] = {}

    async def one(i: int) -> None:
        results[i] = await client.get(b"key%d" % i)

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(one, i)
    assert results == {i: b"value%d" % i for i in range(50)}
    await client.aclose()


async def test_refused_connection_is_one_attempt_without_pause() -> None:
    settings = memcache_settings(max_try=3, retry_pause=5)
    client = MemcacheClient(InetEndpoint("127.0.0.1", closed_port()), settings)
    start = trio.current_time()
    result = await client.get(b"k")
    assert isinstance(result, Retry) and not result.timeout
    # No retry_pause was slept: well under one pause.
    assert trio.current_time() - start < 4


async def test_bad_reply_is_retried_on_a_new_connection(
    scripted: tuple[ScriptedServer, int],
) -> None:
    server, port = scripted
    server.replies = [b"SERVER_ERROR x\r\n", b"VALUE a 0 3\r\nxyz\r\nEND\r\n"]
    client = MemcacheClient(InetEndpoint("127.0.0.1", port), memcache_settings())
    assert await client.get(b"a") == b"xyz"
    assert server.connections == 2
    assert server.received == [b"get a\r\n", b"get a\r\n"]
    assert server.accepted_at[1] - server.accepted_at[0] >= 1  # retry_pause


async def test_persistently_bad_reply_gives_retry_after_max_try(
    scripted: tuple[ScriptedServer, int],
) -> None:
    server, port = scripted
    server.replies = [b"end\r\n"]
    settings = memcache_settings(max_try=3, retry_pause=1)
    client = MemcacheClient(InetEndpoint("127.0.0.1", port), settings)
    result = await client.get(b"a")
    assert isinstance(result, Retry)
    assert server.connections == 3


async def test_stalled_server_times_out_within_bound(
    scripted: tuple[ScriptedServer, int],
) -> None:
    server, port = scripted
    server.replies = [None]
    settings = memcache_settings(timeout=1, max_try=2, retry_pause=1)
    client = MemcacheClient(InetEndpoint("127.0.0.1", port), settings)
    start = trio.current_time()
    result = await client.get(b"a")
    elapsed = trio.current_time() - start
    assert isinstance(result, Retry) and result.timeout
    # timeout * max_try + retry_pause * (max_try - 1), plus a generous margin.
    assert 2.9 <= elapsed < 3 + 2


async def test_value_too_large_for_data_size_limit_is_not_stored(memcached: Memcached) -> None:
    settings = memcache_settings(data_size_limit=5)
    client = MemcacheClient(InetEndpoint("127.0.0.1", memcached.port), settings)
    assert await client.set(b"k", b"123456", flags=0, ttl=0) is False
    assert memcached.get(b"k") is None
    assert await client.set(b"k", b"12345", flags=0, ttl=0) is True
    await client.aclose()


async def test_cancelled_request_never_leaves_a_reply_for_the_next(
    scripted: tuple[ScriptedServer, int],
) -> None:
    server, port = scripted
    server.replies = [None, b"VALUE b 0 1\r\nB\r\nEND\r\n"]
    client = MemcacheClient(InetEndpoint("127.0.0.1", port), memcache_settings(timeout=10))
    with trio.move_on_after(0.5):
        await client.get(b"a")
    # The half-done connection was discarded, so this reads its own reply.
    assert await client.get(b"b") == b"B"
    assert server.connections == 2


# ---------------------------------------------------------------- pool sized to demand


def _stat(memcached: Memcached, name: bytes) -> int:
    reply = memcached._exchange(b"stats\r\n", [b"END\r\n"])
    for line in reply.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == name:
            return int(parts[2])
    raise AssertionError(f"no stat {name!r} in {reply!r}")


async def test_steady_concurrency_keeps_its_connections(memcached: Memcached) -> None:
    # 32 lookups at a time, round after round: the pool grows to 32 and no
    # connection is opened after the first round (no connect/close churn).
    client = MemcacheClient(InetEndpoint("127.0.0.1", memcached.port), memcache_settings())
    memcached.set(b"k", b"v")
    opened_before = _stat(memcached, b"total_connections")
    try:
        for _ in range(5):
            async with trio.open_nursery() as nursery:
                for _ in range(32):
                    nursery.start_soon(client.get, b"k")
        opened = _stat(memcached, b"total_connections") - opened_before
        # one per concurrent lookup, plus this test's own stats connections
        assert opened <= 32 + 2, opened
    finally:
        await client.aclose()


async def test_idle_connections_are_closed_after_a_while(
    memcached: Memcached, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bridge.memcache.client.IDLE_CLOSE", 0.2)
    client = MemcacheClient(InetEndpoint("127.0.0.1", memcached.port), memcache_settings())
    try:
        # Ten connections at once (concurrent gets would share one batch,
        # and so one connection), all back in the pool.
        connections = [await client._connect() for _ in range(10)]
        for connection in connections:
            client._release(connection)
        assert len(client._idle) == 10
        await trio.sleep(0.3)
        await client.get(b"k")  # reuses the newest, closes the nine that aged out
        assert len(client._idle) == 1
    finally:
        await client.aclose()
