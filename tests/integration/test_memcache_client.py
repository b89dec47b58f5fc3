"""The trio memcache client: real memcached, and scripted misbehaving servers (MC-11).

The scripted servers are real TCP servers on loopback that answer each
connection from a list of canned replies; they stand in for a broken
memcache the way the fault proxy does, without faking anything inside the
client.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import AsyncIterator, Sequence

import pytest
import trio
import trio.testing

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


# ---------------------------------------------------------------- coalesced batches


class PipelinedServer:
    """A memcache that answers pipelined ``get``s by key and records every read.

    Attributes:
      replies: the reply to ``get KEY`` by key; any other key is a miss.
      close_after: most commands answered on the n-th connection before it
        is closed (FIN); ``default_close_after`` for connections not listed.
      stall_after: most commands answered on the n-th connection before it
        stops answering (and stays open).
      hold: keys whose reply waits until :attr:`release` is set; the
        replies behind one on its connection wait with it.
      reads: each connection's reads, in order, with the time of each.
    """

    def __init__(self) -> None:
        self.replies: dict[bytes, bytes] = {}
        self.close_after: dict[int, int | None] = {}
        self.default_close_after: int | None = None
        self.stall_after: dict[int, int] = {}
        self.hold: set[bytes] = set()
        self.release = trio.Event()
        self.reads: list[list[tuple[float, bytes]]] = []
        #: Set at the next read (then replaced by a fresh event).
        self.read = trio.Event()

    def writes(self, connection: int) -> list[bytes]:
        """What each read on the connection returned: the client's writes, normally."""
        return [data for _, data in self.reads[connection]]

    def keys(self, connection: int) -> list[bytes]:
        """The keys of the gets the connection received, in order."""
        return [line.split()[1] for line in b"".join(self.writes(connection)).splitlines()]

    def sends_of(self, key: bytes) -> int:
        return sum(self.keys(index).count(key) for index in range(len(self.reads)))

    async def handle(self, stream: trio.SocketStream) -> None:
        index = len(self.reads)
        reads: list[tuple[float, bytes]] = []
        self.reads.append(reads)
        close_after = self.close_after.get(index, self.default_close_after)
        stall_after = self.stall_after.get(index)
        answered = 0
        buffer = b""
        while data := await stream.receive_some(65536):
            reads.append((trio.current_time(), data))
            self.read.set()
            self.read = trio.Event()
            buffer += data
            out = b""
            while b"\r\n" in buffer:
                line, buffer = buffer.split(b"\r\n", 1)
                if answered == close_after:
                    await stream.send_all(out)
                    await stream.aclose()
                    return
                if answered == stall_after:
                    await stream.send_all(out)
                    await trio.sleep_forever()
                key = line.split()[1]
                if key in self.hold:
                    await self.release.wait()
                out += self.replies.get(key, b"END\r\n")
                answered += 1
            await stream.send_all(out)


async def _serve_pipelined(nursery: trio.Nursery) -> tuple[PipelinedServer, int]:
    server = PipelinedServer()
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1")
    )
    return server, listeners[0].socket.getsockname()[1]


@pytest.fixture
async def pipelined(nursery: trio.Nursery) -> AsyncIterator[tuple[PipelinedServer, int]]:
    yield await _serve_pipelined(nursery)


def _hit(key: bytes, value: bytes) -> bytes:
    return b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (key, len(value), value)


def _gets(keys: Sequence[bytes]) -> bytes:
    return b"".join(b"get %s\r\n" % key for key in keys)


async def _burst(
    client: MemcacheClient, server: PipelinedServer, keys: Sequence[bytes]
) -> dict[bytes, object]:
    """Get ``keys`` concurrently while another batch is in flight, so they form one batch.

    The other batch is a get of ``slow`` (connection 0) that the server
    holds until every key has its answer: with a batch in flight, the
    first of the burst waits for the rest (after a quiet spell it would
    go alone: test_a_burst_after_a_quiet_spell_sends_its_first_get_at_once).
    """
    server.hold.add(b"slow")
    results: dict[bytes, object] = {}

    async def one(key: bytes) -> None:
        results[key] = await client.get(key)

    async with trio.open_nursery() as outer:
        outer.start_soon(one, b"slow")
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(one, key)
        server.release.set()
    results.pop(b"slow")
    return results


async def test_concurrent_gets_go_as_one_write_with_answers_of_their_own(
    nursery: trio.Nursery,
) -> None:
    # Hits and misses around a value longer than data_size_limit: the long
    # one fails alone (max_try attempts, retry_pause apart); the commands
    # behind it are sent again at once on a new connection, uncounted.
    # trio runs the tasks of one scheduler pass in random order, and the
    # scenario wants "big" neither first nor last: run it until it is.
    keys = [b"h1", b"m1", b"h2", b"big", b"m2", b"h3", b"m3"]
    settings = memcache_settings(data_size_limit=100, max_try=2, retry_pause=1)
    for _ in range(20):
        server, port = await _serve_pipelined(nursery)
        server.replies = {
            b"h1": _hit(b"h1", b"one"),
            b"h2": _hit(b"h2", b"two"),
            b"big": _hit(b"big", b"x" * 101),
            b"h3": _hit(b"h3", b"three"),
        }
        client = MemcacheClient(InetEndpoint("127.0.0.1", port), settings)
        try:
            results = await _burst(client, server, keys)
        finally:
            await client.aclose()
        batch = server.keys(1)
        if 0 < batch.index(b"big") < len(batch) - 1:
            break
    else:
        pytest.fail("twenty batches, and never one with big in the middle")

    big = results.pop(b"big")
    assert isinstance(big, Retry) and not big.timeout
    assert big.reason == f"memcache {client.endpoint}: value length 101 outside 0..100"
    assert results == {
        b"h1": b"one",
        b"h2": b"two",
        b"h3": b"three",
        b"m1": None,
        b"m2": None,
        b"m3": None,
    }
    # The burst went out as one write on connection 1 (0 is "slow"'s).
    assert server.writes(1) == [_gets(batch)]
    assert sorted(batch) == sorted(keys)
    behind = batch[batch.index(b"big") + 1 :]
    # The ones behind "big" went again at once, on a new connection; "big"
    # itself went there after retry_pause, as attempt 2.
    assert server.writes(2) == [_gets(behind), b"get big\r\n"]
    (first, _), (resent, _), (retried, _) = server.reads[1][0], *server.reads[2]
    assert resent - first < 0.5
    assert retried - first >= 1
    assert len(server.reads) == 3
    for key in keys:
        assert server.sends_of(key) == (2 if key in (b"big", *behind) else 1), key


async def test_error_replies_in_a_batch_fail_only_their_own_lookups(
    pipelined: tuple[PipelinedServer, int],
) -> None:
    server, port = pipelined
    server.replies = {
        b"h1": _hit(b"h1", b"one"),
        b"err": b"SERVER_ERROR out of memory\r\n",
        b"h2": _hit(b"h2", b"two"),
        # A value followed by a bad trailer is still the answer (MC-9.4),
        # but the connection is finished: the ones behind go again.
        b"trailer": b"VALUE trailer 0 3\r\nabc\r\nEND junk\r\n",
        b"garbage": b"GARBAGE\r\n",
        b"h3": _hit(b"h3", b"three"),
    }
    keys = [b"h1", b"err", b"m1", b"h2", b"trailer", b"garbage", b"h3", b"m2"]
    settings = memcache_settings(max_try=2, retry_pause=1)
    client = MemcacheClient(InetEndpoint("127.0.0.1", port), settings)
    try:
        results = await _burst(client, server, keys)
    finally:
        await client.aclose()

    err = results.pop(b"err")
    garbage = results.pop(b"garbage")
    assert isinstance(err, Retry) and err.reason.endswith(": SERVER_ERROR out of memory")
    assert isinstance(garbage, Retry)
    assert garbage.reason.endswith(": unexpected reply line (7 bytes)")
    assert results == {
        b"h1": b"one",
        b"h2": b"two",
        b"h3": b"three",
        b"trailer": b"abc",
        b"m1": None,
        b"m2": None,
    }
    # Each failing lookup counted max_try attempts; sends behind a failure
    # in the same write do not count, so a key goes at most once more per
    # failing reply ahead of it (three of them), plus its retry.
    assert all(server.sends_of(key) <= 1 + 3 + 1 for key in keys)
    assert server.sends_of(b"err") >= 2 and server.sends_of(b"garbage") >= 2


async def test_connection_closed_mid_batch_gives_the_unanswered_retry(
    pipelined: tuple[PipelinedServer, int],
) -> None:
    # The batch's connection answers two commands and closes; every later
    # connection closes at once. The two keep their answers; every other
    # lookup counts a failed attempt per connection and ends in Retry.
    server, port = pipelined
    server.close_after = {0: None, 1: 2}  # 0 is "slow"'s
    server.default_close_after = 0
    server.replies = {b"k%d" % i: _hit(b"k%d" % i, b"v%d" % i) for i in range(6)}
    keys = [b"k%d" % i for i in range(6)]
    settings = memcache_settings(max_try=2, retry_pause=1)
    client = MemcacheClient(InetEndpoint("127.0.0.1", port), settings)
    start = trio.current_time()
    try:
        results = await _burst(client, server, keys)
    finally:
        await client.aclose()
    elapsed = trio.current_time() - start

    batch = server.keys(1)
    assert sorted(batch) == keys
    answered, unanswered = batch[:2], batch[2:]
    for key in answered:
        assert results[key] == b"v" + key[1:]
    for key in unanswered:
        result = results[key]
        assert isinstance(result, Retry) and not result.timeout, key
        assert result.reason == f"memcache {client.endpoint}: connection closed"
    # Attempt 2 of all four went as one batch after one retry_pause.
    assert len(server.reads) == 3
    assert server.writes(2) == [_gets(unanswered)]
    assert 1 <= server.reads[2][0][0] - server.reads[1][0][0] < 2
    assert elapsed < 3


async def test_read_timeout_mid_batch_gives_the_unanswered_timeout(
    pipelined: tuple[PipelinedServer, int],
) -> None:
    # The server stops answering after two commands of the batch: those
    # two keep their answers, the rest time out together (MC-5).
    server, port = pipelined
    server.stall_after = {1: 2}
    server.replies = {b"k%d" % i: _hit(b"k%d" % i, b"v%d" % i) for i in range(5)}
    keys = [b"k%d" % i for i in range(5)]
    settings = memcache_settings(timeout=1, max_try=1)
    client = MemcacheClient(InetEndpoint("127.0.0.1", port), settings)
    start = trio.current_time()
    try:
        results = await _burst(client, server, keys)
    finally:
        await client.aclose()
    assert trio.current_time() - start < 2

    batch = server.keys(1)
    for key in batch[:2]:
        assert results[key] == b"v" + key[1:]
    for key in batch[2:]:
        result = results[key]
        assert isinstance(result, Retry) and result.timeout, key
        assert result.reason == f"memcache {client.endpoint}: timeout after 1s waiting for reply"


async def _wait_for_batch(server: PipelinedServer, connection: int) -> list[bytes]:
    """The keys of the first write on ``connection``, once the server has it."""
    while len(server.reads) <= connection or not server.reads[connection]:
        await server.read.wait()
    return server.keys(connection)


async def _cancel_one_in_flight(
    client: MemcacheClient, server: PipelinedServer, keys: Sequence[bytes], pick: int
) -> tuple[list[bytes], dict[bytes, object], set[bytes]]:
    """Run ``keys`` as one batch held by the server; cancel the ``pick``-th lookup of it.

    The leader is the batch's first command: it enqueued first, and a
    batch is written in queue order.

    Returns:
      The batch's keys in order, the lookups' results, the cancelled keys.
    """
    server.hold.update([b"slow", *keys])
    scopes = {key: trio.CancelScope() for key in keys}
    results: dict[bytes, object] = {}
    cancelled: set[bytes] = set()

    async def one(key: bytes) -> None:
        with scopes[key]:
            results[key] = await client.get(key)
        if scopes[key].cancelled_caught:
            cancelled.add(key)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.get, b"slow")
        await trio.testing.wait_all_tasks_blocked()
        for key in keys:
            nursery.start_soon(one, key)
        batch = await _wait_for_batch(server, 1)
        scopes[batch[pick]].cancel()
        await trio.testing.wait_all_tasks_blocked()
        server.release.set()
    return batch, results, cancelled


async def test_follower_cancelled_in_flight_leaves_the_others_their_answers(
    pipelined: tuple[PipelinedServer, int],
) -> None:
    server, port = pipelined
    keys = [b"k%d" % i for i in range(4)]
    server.replies = {key: _hit(key, b"v" + key) for key in keys}
    client = MemcacheClient(InetEndpoint("127.0.0.1", port), memcache_settings())
    try:
        batch, results, cancelled = await _cancel_one_in_flight(client, server, keys, 2)
    finally:
        await client.aclose()
    victim = batch[2]
    assert cancelled == {victim}
    assert results == {key: b"v" + key for key in keys if key != victim}
    # Its reply was read and dropped, and it was not sent again.
    assert server.sends_of(victim) == 1


async def test_leader_cancelled_in_flight_still_delivers_its_followers_answers(
    pipelined: tuple[PipelinedServer, int],
) -> None:
    # One follower needs a second attempt after retry_pause: the cancelled
    # leader keeps the batch going until that follower has its Retry.
    server, port = pipelined
    keys = [b"k0", b"k1", b"err", b"k2"]
    server.replies = {key: _hit(key, b"v" + key) for key in keys}
    server.replies[b"err"] = b"SERVER_ERROR busy\r\n"
    settings = memcache_settings(max_try=2, retry_pause=1)
    client = MemcacheClient(InetEndpoint("127.0.0.1", port), settings)
    try:
        batch, results, cancelled = await _cancel_one_in_flight(client, server, keys, 0)
    finally:
        await client.aclose()
    leader = batch[0]
    # The leader raises Cancelled once its followers are served.
    assert cancelled == {leader}
    expected: dict[bytes, object] = {key: b"v" + key for key in keys if key != leader}
    if leader != b"err":
        err = results.pop(b"err")
        assert isinstance(err, Retry) and err.reason.endswith(": SERVER_ERROR busy")
        assert server.sends_of(b"err") >= 2
        del expected[b"err"]
    assert results == expected


async def test_lookup_cancelled_before_its_batch_is_taken_leaves_the_queue(
    pipelined: tuple[PipelinedServer, int],
) -> None:
    server, port = pipelined
    client = MemcacheClient(InetEndpoint("127.0.0.1", port), memcache_settings())
    try:
        # As if a leader were collecting: this lookup queues as a follower.
        client._collecting = True
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.get(b"gone")
        assert scope.cancelled_caught
        assert not client._queue
        client._collecting = False
        assert await client.get(b"k") is None
    finally:
        await client.aclose()
    assert server.keys(0) == [b"k"]


async def test_lookups_cancelled_at_once_in_a_burst_spare_their_neighbours(
    pipelined: tuple[PipelinedServer, int],
) -> None:
    # Whoever ends up leading, the cancelled ones raise and the rest answer.
    server, port = pipelined
    keys = [b"k%d" % i for i in range(6)]
    server.replies = {key: _hit(key, b"v" + key) for key in keys}
    client = MemcacheClient(InetEndpoint("127.0.0.1", port), memcache_settings())
    results: dict[bytes, object] = {}
    cancelled: set[bytes] = set()

    async def one(key: bytes, cancel: bool) -> None:
        with trio.CancelScope() as scope:
            if cancel:
                scope.cancel()
            results[key] = await client.get(key)
        if scope.cancelled_caught:
            cancelled.add(key)

    try:
        async with trio.open_nursery() as nursery:
            for index, key in enumerate(keys):
                nursery.start_soon(one, key, index % 2 == 1)
    finally:
        await client.aclose()
    assert cancelled == set(keys[1::2])
    assert results == {key: b"v" + key for key in keys[0::2]}


async def test_one_get_at_a_time_is_one_command_per_write_without_a_yield(
    pipelined: tuple[PipelinedServer, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lone lookup never waits for company: that would only add latency.
    yields = 0
    checkpoint = trio.lowlevel.cancel_shielded_checkpoint

    async def counting_checkpoint() -> None:
        nonlocal yields
        # Only the client's own: the in-process server's tasks use it too.
        if sys._getframe(1).f_globals["__name__"] == "bridge.memcache.client":
            yields += 1
        await checkpoint()

    monkeypatch.setattr(trio.lowlevel, "cancel_shielded_checkpoint", counting_checkpoint)
    server, port = pipelined
    keys = [b"k%d" % i for i in range(5)]
    server.replies = {key: _hit(key, b"v" + key) for key in keys}
    client = MemcacheClient(InetEndpoint("127.0.0.1", port), memcache_settings())
    try:
        for key in keys:
            assert await client.get(key) == b"v" + key
    finally:
        await client.aclose()
    assert server.writes(0) == [_gets([key]) for key in keys]
    assert len(server.reads) == 1
    assert yields == 0


async def test_a_burst_after_a_quiet_spell_sends_its_first_get_at_once(
    pipelined: tuple[PipelinedServer, int],
) -> None:
    # Nothing in flight: the first lookup cannot know others follow in the
    # same scheduler pass, so it goes alone; the others wait for each
    # other and go as one write.
    server, port = pipelined
    keys = [b"k%d" % i for i in range(5)]
    server.replies = {key: _hit(key, b"v" + key) for key in keys}
    client = MemcacheClient(InetEndpoint("127.0.0.1", port), memcache_settings())
    results: dict[bytes, object] = {}

    async def one(key: bytes) -> None:
        results[key] = await client.get(key)

    try:
        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(one, key)
    finally:
        await client.aclose()
    assert results == {key: b"v" + key for key in keys}
    writes = sorted(read for reads in server.reads for read in reads)
    assert [data.count(b"\r\n") for _, data in writes] == [1, 4]


async def test_concurrent_sets_and_gets_share_batches_on_real_memcached(
    memcached: Memcached,
) -> None:
    # Refills (sets) join the same batches as lookups: 40 concurrent
    # commands, each with its own answer, on a handful of connections.
    client = MemcacheClient(InetEndpoint("127.0.0.1", memcached.port), memcache_settings())
    for i in range(20):
        memcached.set(b"old%d" % i, b"o%d" % i)
    opened_before = _stat(memcached, b"total_connections")
    results: dict[bytes, object] = {}

    async def get(key: bytes) -> None:
        results[key] = await client.get(key)

    async def set_(key: bytes) -> None:
        results[key] = await client.set(key, b"n" + key, flags=0, ttl=0)

    try:
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(get, b"old%d" % i)
                nursery.start_soon(set_, b"new%d" % i)
        # the first command alone, the rest together; plus one stats connection
        assert _stat(memcached, b"total_connections") - opened_before <= 2 + 1
        for i in range(20):
            assert results[b"old%d" % i] == b"o%d" % i
            assert results[b"new%d" % i] is True
            assert memcached.get(b"new%d" % i) == (0, b"nnew%d" % i)
    finally:
        await client.aclose()


async def test_refused_connection_ends_every_lookup_of_a_batch_at_once() -> None:
    settings = memcache_settings(max_try=3, retry_pause=5)
    client = MemcacheClient(InetEndpoint("127.0.0.1", closed_port()), settings)
    results: dict[int, object] = {}

    async def one(i: int) -> None:
        results[i] = await client.get(b"k%d" % i)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(one, i)
    assert trio.current_time() - start < 4  # no retry_pause
    for result in results.values():
        assert isinstance(result, Retry) and not result.timeout
        assert result.reason.startswith(f"memcache {client.endpoint}: connect: ")
    assert len(results) == 8
