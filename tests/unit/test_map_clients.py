"""Chained socketmap: and tcp: tables against tiny real servers (spec 2.4, 2.5, 3.2, 3.3).

Each test starts a scripted server on 127.0.0.1 (or a unix socket) that
reads real requests and answers with the bytes the test chose, so the
client's codecs, time limits and reconnects run for real.
"""

from __future__ import annotations

import enum
import functools
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.lowlevel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.endpoint import InetEndpoint
from bridge.maps import OpenOptions, open_map
from bridge.maps.socketmap import (
    MAX_ATTEMPTS,
    MAX_QUERY_KEY,
    SocketmapMap,
    parse_socketmap_target,
)
from bridge.maps.tcp import TcpMap
from bridge.outcome import NOT_FOUND, ConfigFailure, Found, Outcome, Retry

#: Time limit for tests that expect a timeout: short, so the suite is quick.
SHORT_TIMEOUT = 0.2
#: Upper bound on how long a timed-out lookup may take; generous, for slow CI.
TIMEOUT_BOUND = 5.0

# ------------------------------------------------------------ scripted server


class Act(enum.Enum):
    CLOSE = "close"  # close the connection instead of answering
    HANG = "hang"  # never answer


@dataclass(frozen=True, slots=True)
class SendThenClose:
    data: bytes


@dataclass(frozen=True, slots=True)
class SendInPieces:
    pieces: tuple[bytes, ...]


Step = bytes | Act | SendThenClose | SendInPieces | Callable[[bytes], bytes]


def netstring_frame(buffer: bytearray) -> bytes | None:
    """Take one whole netstring request (framing included) off ``buffer``."""
    colon = buffer.find(b":")
    if colon < 0:
        return None
    end = colon + 1 + int(buffer[:colon] or b"0") + 1
    if len(buffer) < end:
        return None
    frame = bytes(buffer[:end])
    del buffer[:end]
    return frame


def text_line(buffer: bytearray) -> bytes | None:
    """Take one request line (LF included) off ``buffer``."""
    newline = buffer.find(b"\n")
    if newline < 0:
        return None
    line = bytes(buffer[: newline + 1])
    del buffer[: newline + 1]
    return line


@dataclass
class ScriptedServer:
    """Answers request number i on connection n with ``scripts[n][i]``, else ``default``."""

    read_request: Callable[[bytearray], bytes | None]
    scripts: list[list[Step]]
    default: Step
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0

    async def handle(self, stream: trio.abc.Stream) -> None:
        index = self.connections
        self.connections += 1
        steps = iter(self.scripts[index] if index < len(self.scripts) else [])
        buffer = bytearray()
        async with stream:
            while (request := await self._next_request(stream, buffer)) is not None:
                self.requests.append(request)
                if not await self._perform(stream, next(steps, self.default), request):
                    return

    async def _perform(self, stream: trio.abc.Stream, step: Step, request: bytes) -> bool:
        """Carry out one step; False when the connection is to be closed."""
        if step is Act.CLOSE:
            return False
        if step is Act.HANG:
            await trio.sleep_forever()
        if isinstance(step, SendThenClose):
            await stream.send_all(step.data)
            return False
        if isinstance(step, SendInPieces):
            for piece in step.pieces:
                await stream.send_all(piece)
                await trio.lowlevel.checkpoint()
            return True
        await stream.send_all(step if isinstance(step, bytes) else step(request))
        return True

    async def _next_request(self, stream: trio.abc.Stream, buffer: bytearray) -> bytes | None:
        while (request := self.read_request(buffer)) is None:
            try:
                data = await stream.receive_some()
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            buffer += data
        return request


async def start_tcp(nursery: trio.Nursery, server: ScriptedServer) -> int:
    serve = functools.partial(trio.serve_tcp, host="127.0.0.1")
    listeners: list[trio.SocketListener] = await nursery.start(serve, server.handle, 0)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def start_unix(nursery: trio.Nursery, server: ScriptedServer, path: Path) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen()
    await nursery.start(trio.serve_listeners, server.handle, [trio.SocketListener(sock)])


def refused_port() -> int:
    """A local port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def assert_outcome(outcome: Outcome, expected: Outcome | type[Retry] | type[ConfigFailure]) -> None:
    if isinstance(expected, type):
        assert isinstance(outcome, expected), outcome
    else:
        assert outcome == expected


# ---------------------------------------------------------------- socketmap


def socketmap_server(*scripts: list[Step], default: Step = b"8:OK fresh,") -> ScriptedServer:
    return ScriptedServer(netstring_frame, list(scripts), default)


async def socketmap_table(
    nursery: trio.Nursery, server: ScriptedServer, *, name: str = "users", time_limit: float = 10.0
) -> SocketmapMap:
    port = await start_tcp(nursery, server)
    spec = f"socketmap:inet:127.0.0.1:{port}:{name}"
    return SocketmapMap(spec, parse_socketmap_target(spec[len("socketmap:") :]), timeout=time_limit)


# Spec 12.1 (and 12.13's socketmap row): the key goes out exactly as given.
@pytest.mark.parametrize(
    ("name", "key", "request_bytes"),
    [
        ("mymap", b"k", b"7:mymap k,"),
        ("mymap", b"", b"6:mymap ,"),
        ("mymap", b"Foo Bar", b"13:mymap Foo Bar,"),
        ("users", b"a@b", b"9:users a@b,"),
    ],
)
async def test_socketmap_request_bytes(
    nursery: trio.Nursery, name: str, key: bytes, request_bytes: bytes
) -> None:
    server = socketmap_server()
    table = await socketmap_table(nursery, server, name=name)
    await table.lookup(key)
    assert server.requests == [request_bytes]


# Spec 12.2: reply bytes -> outcome. ``kept``: whether the connection is
# reused for the next lookup. Format and size errors close it (SM-16 bridge
# deviation: Postfix would keep a possibly desynchronised stream).
@pytest.mark.parametrize(
    ("reply", "expected", "kept"),
    [
        (b"8:OK hello,", Found(b"hello"), True),
        (b"5:OK  x,", Found(b" x"), True),
        (b"3:OK ,", Found(b""), True),
        (b"2:OK,", Found(b""), True),  # the 3.12 reading
        (b"004:OK x,", Found(b"x"), True),
        (b"8:OK a\tb\nc,", Found(b"a\tb\nc"), True),
        (b"6:OK a\x00b,", Found(b"a"), True),
        (b"4:OK \xff,", ConfigFailure, True),
        (b"8:NOTFOUND,", NOT_FOUND, True),
        (b"9:NOTFOUND ,", NOT_FOUND, True),
        (b"10:NOTFOUND x,", NOT_FOUND, True),
        (b"9:TEMP oops,", Retry, True),
        (b"12:TIMEOUT slow,", Retry, True),
        (b"8:PERM bad,", ConfigFailure, True),
        (b"4:PERM,", ConfigFailure, True),
        (b"4:ok x,", Retry, True),
        (b":,", Retry, True),
        (b"0:,", Retry, True),
        (b"+4:OK x,", Retry, False),
        (b" 4:OK x,", Retry, False),
        (b"4:OK x;", Retry, False),
        (b"3:OK x,", Retry, False),
        (b"100000:OK " + 99997 * b"x" + b",", Found(99997 * b"x"), True),
        (b"100001:", Retry, False),
    ],
)
async def test_socketmap_reply_vectors(
    nursery: trio.Nursery,
    reply: bytes,
    expected: Outcome | type[Retry] | type[ConfigFailure],
    kept: bool,
) -> None:
    server = socketmap_server([reply, b"8:OK again,"])
    table = await socketmap_table(nursery, server)
    assert_outcome(await table.lookup(b"k"), expected)
    # Format and size errors are final: no second attempt (SM-16).
    assert server.connections == 1
    follow_up = await table.lookup(b"k")
    assert follow_up == (Found(b"again") if kept else Found(b"fresh"))
    assert server.connections == (1 if kept else 2)


async def test_socketmap_temp_and_timeout_reasons(nursery: trio.Nursery) -> None:
    server = socketmap_server([b"9:TEMP oops,", b"12:TIMEOUT slow,"])
    table = await socketmap_table(nursery, server)
    assert await table.lookup(b"k") == Retry("oops")
    assert await table.lookup(b"k") == Retry("slow", timeout=True)


async def test_socketmap_non_utf8_value_allowed_without_smtputf8(nursery: trio.Nursery) -> None:
    server = socketmap_server([b"4:OK \xff,"])
    port = await start_tcp(nursery, server)
    table = open_map(f"socketmap:inet:127.0.0.1:{port}:m", OpenOptions("/", smtputf8=False))
    assert await table.lookup(b"k") == Found(b"\xff")


async def test_socketmap_reuses_one_connection(nursery: trio.Nursery) -> None:
    # SM-13: the connection stays open and carries the next lookups.
    server = socketmap_server()
    table = await socketmap_table(nursery, server)
    for _ in range(3):
        assert await table.lookup(b"k") == Found(b"fresh")
    assert server.connections == 1


async def test_socketmap_transparent_reconnect_after_close(nursery: trio.Nursery) -> None:
    # 12.2: connection closed, then b"4:OK x," on the new connection -> found.
    server = socketmap_server([Act.CLOSE], [b"4:OK x,"])
    table = await socketmap_table(nursery, server)
    assert await table.lookup(b"k") == Found(b"x")
    assert server.connections == 2
    assert server.requests == [b"7:users k,", b"7:users k,"]


async def test_socketmap_truncated_payload_is_retried(nursery: trio.Nursery) -> None:
    # 12.2: b"4:OK" then close is an EOF error (SM-6 step 3): retried once.
    server = socketmap_server([SendThenClose(b"4:OK")], [b"4:OK x,"])
    table = await socketmap_table(nursery, server)
    assert await table.lookup(b"k") == Found(b"x")
    assert server.connections == 2


async def test_socketmap_missing_comma_at_eof_is_not_retried(nursery: trio.Nursery) -> None:
    # SM-6 step 4: EOF where the ',' is due is a format error, so final.
    server = socketmap_server([SendThenClose(b"4:OK x")], [b"4:OK x,"])
    table = await socketmap_table(nursery, server)
    assert isinstance(await table.lookup(b"k"), Retry)
    assert server.connections == 1


async def test_socketmap_closed_twice_is_retry(nursery: trio.Nursery) -> None:
    # 12.2 / SM-15: exactly one transparent retry; the second failure is final.
    server = socketmap_server([Act.CLOSE], [Act.CLOSE], [b"4:OK x,"])
    table = await socketmap_table(nursery, server)
    outcome = await table.lookup(b"k")
    assert isinstance(outcome, Retry)
    assert not outcome.timeout
    assert server.connections == 2


async def test_socketmap_idle_connection_closed_by_server(nursery: trio.Nursery) -> None:
    # The everyday case for SM-15: the server drops an idle connection.
    server = socketmap_server([b"4:OK a,", Act.CLOSE], [b"4:OK b,"])
    table = await socketmap_table(nursery, server)
    assert await table.lookup(b"k") == Found(b"a")
    assert await table.lookup(b"k") == Found(b"b")
    assert server.connections == 2


async def test_socketmap_connect_refused_is_retry() -> None:
    # SM-16: a connect failure is final, never retried.
    spec = f"socketmap:inet:127.0.0.1:{refused_port()}:users"
    table = open_map(spec, OpenOptions("/"))
    outcome = await table.lookup(b"k")
    assert isinstance(outcome, Retry)
    assert not outcome.timeout
    assert "cannot connect" in outcome.reason


async def test_socketmap_missing_unix_socket_is_retry(tmp_path: Path) -> None:
    table = open_map("socketmap:unix:none.sock:users", OpenOptions(str(tmp_path)))
    assert isinstance(await table.lookup(b"k"), Retry)


async def test_socketmap_over_unix_socket(nursery: trio.Nursery, tmp_path: Path) -> None:
    server = socketmap_server([b"8:OK hello,"])
    await start_unix(nursery, server, tmp_path / "s")
    table = open_map("socketmap:unix:s:users", OpenOptions(str(tmp_path)))
    assert await table.lookup(b"k") == Found(b"hello")
    assert server.requests == [b"7:users k,"]


async def test_socketmap_silent_server_times_out(nursery: trio.Nursery) -> None:
    # 12.2: b"4:OK x" then silence -> RETRY once the time limit runs out.
    server = socketmap_server([SendInPieces((b"4:OK x",))])
    table = await socketmap_table(nursery, server, time_limit=SHORT_TIMEOUT)
    started = trio.current_time()
    outcome = await table.lookup(b"k")
    assert isinstance(outcome, Retry)
    assert outcome.timeout
    assert trio.current_time() - started < TIMEOUT_BOUND
    # The half-read stream is dropped; the next lookup starts afresh.
    assert await table.lookup(b"k") == Found(b"fresh")
    assert server.connections == 2


async def test_socketmap_key_over_limit_is_not_sent(nursery: trio.Nursery) -> None:
    # 12.2 (3.12): a key of 10001 bytes is not found, nothing sent (SM-7).
    server = socketmap_server()
    table = await socketmap_table(nursery, server)
    assert await table.lookup(b"k" * (MAX_QUERY_KEY + 1)) == NOT_FOUND
    assert server.connections == 0
    assert await table.lookup(b"k" * MAX_QUERY_KEY) == Found(b"fresh")
    assert len(server.requests) == 1


async def test_socketmap_extra_reply_closes_connection(nursery: trio.Nursery) -> None:
    # A second, unasked-for reply would answer the next lookup: drop the stream.
    server = socketmap_server([b"4:OK x,4:OK y,"])
    table = await socketmap_table(nursery, server)
    assert await table.lookup(b"k") == Found(b"x")
    assert await table.lookup(b"k") == Found(b"fresh")
    assert server.connections == 2


@pytest.mark.parametrize("cut", range(1, len(b"8:OK hello,")))
async def test_socketmap_reply_split_anywhere(nursery: trio.Nursery, cut: int) -> None:
    reply = b"8:OK hello,"
    server = socketmap_server([SendInPieces((reply[:cut], reply[cut:]))])
    table = await socketmap_table(nursery, server)
    assert await table.lookup(b"k") == Found(b"hello")


def echo_socketmap(request: bytes) -> bytes:
    key = request.partition(b" ")[2][:-1]
    payload = b"OK " + key
    return b"%d:%b," % (len(payload), payload)


async def test_socketmap_concurrent_lookups_are_serialised(nursery: trio.Nursery) -> None:
    # SM-13: one request outstanding; every caller gets its own answer.
    server = socketmap_server(default=echo_socketmap)
    table = await socketmap_table(nursery, server)
    results: dict[bytes, Outcome] = {}

    async def look(key: bytes) -> None:
        results[key] = await table.lookup(key)

    keys = [b"key%d" % number for number in range(8)]
    async with trio.open_nursery() as lookups:
        for key in keys:
            lookups.start_soon(look, key)
    assert results == {key: Found(key) for key in keys}
    assert server.connections == 1


async def test_socketmap_cancelled_lookup_drops_connection(nursery: trio.Nursery) -> None:
    server = socketmap_server([Act.HANG])
    table = await socketmap_table(nursery, server)
    with trio.move_on_after(SHORT_TIMEOUT) as scope:
        await table.lookup(b"k")
    assert scope.cancelled_caught
    assert await table.lookup(b"k") == Found(b"fresh")
    assert server.connections == 2


async def test_socketmap_aclose(nursery: trio.Nursery) -> None:
    server = socketmap_server()
    table = await socketmap_table(nursery, server)
    assert await table.lookup(b"k") == Found(b"fresh")
    await table.aclose()
    await table.aclose()
    assert isinstance(await table.lookup(b"k"), Retry)
    assert server.connections == 1


# ---------------------------------------------------------------------- tcp


def tcp_server(*scripts: list[Step], default: Step = b"200 fresh\n") -> ScriptedServer:
    return ScriptedServer(text_line, list(scripts), default)


async def tcp_table(
    nursery: trio.Nursery, server: ScriptedServer, *, time_limit: float = 10.0
) -> TcpMap:
    port = await start_tcp(nursery, server)
    return TcpMap(f"tcp:127.0.0.1:{port}", InetEndpoint("127.0.0.1", port), timeout=time_limit)


# Spec 12.3 (and 12.13's tcp row): request lines, quoted per TCP-2.
@pytest.mark.parametrize(
    ("key", "request_line"),
    [
        (b"Foo Bar", b"get Foo%20Bar\n"),
        (b"", b"get \n"),
        (
            b"a b%c\td\x01e\x7ff~g+h/i:j@k\"l'm\\n",
            b"get a%20b%25c%09d%01e%7Ff~g+h/i:j@k\"l'm\\n\n",
        ),
        ("café".encode(), b"get caf%C3%A9\n"),
        (b"x\ry", b"get x%0Dy\n"),
    ],
)
async def test_tcp_request_bytes(nursery: trio.Nursery, key: bytes, request_line: bytes) -> None:
    server = tcp_server()
    table = await tcp_table(nursery, server)
    await table.lookup(key)
    assert server.requests == [request_line]


# Spec 12.4: reply -> outcome; ``kept``: connection reused (TCP-6).
@pytest.mark.parametrize(
    ("reply", "expected", "kept"),
    [
        (b"200 hello\n", Found(b"hello"), True),
        (b"200 a%20b%2fc%2Fd\n", Found(b"a b/c/d"), True),
        (b"200 \n", Found(b""), True),
        (b"200\thello\n", Found(b"hello"), True),
        (b"299 x\n", Found(b"x"), True),
        (b"250 x\n", Found(b"x"), True),
        (b"200 a b\n", Found(b"a b"), True),
        (b"200 x\r\n", Found(b"x\r"), True),
        (b"200 a%00b\n", Found(b"a"), True),
        (b"200 %FF\n", ConfigFailure, True),
        (b"200\n", Retry, False),
        (b"200 %zz\n", Retry, False),
        (b"200 %4\n", Retry, False),
        (b"200 100%\n", Retry, False),
        (b"500 nope\n", NOT_FOUND, True),
        (b"550 x\n", NOT_FOUND, True),
        (b"500\n", Retry, False),
        (b"5xx x\n", Retry, False),
        (b"20 x\n", Retry, False),
        (b"abc\n", Retry, False),
        (b"400 later\n", Retry, False),
        (b"100 x\n", Retry, False),
        (b"300 x\n", Retry, False),
        (b"600 x\n", Retry, False),
        (b"200 " + 4091 * b"x" + b"\n", Found(4091 * b"x"), True),
        # TCP-4: too long. Postfix sleeps and retries (TCP-10); we answer
        # Retry at once (documented deviation) and drop the connection.
        (b"200 " + 4092 * b"x" + b"\n", Retry, False),
    ],
)
async def test_tcp_reply_vectors(
    nursery: trio.Nursery,
    reply: bytes,
    expected: Outcome | type[Retry] | type[ConfigFailure],
    kept: bool,
) -> None:
    server = tcp_server([reply, b"200 again\n"])
    table = await tcp_table(nursery, server)
    assert_outcome(await table.lookup(b"k"), expected)
    # Status-level failures are never retried (TCP-11).
    assert server.connections == 1
    follow_up = await table.lookup(b"k")
    assert follow_up == (Found(b"again") if kept else Found(b"fresh"))
    assert server.connections == (1 if kept else 2)


async def test_tcp_close_without_reply_then_good_reply(nursery: trio.Nursery) -> None:
    # 12.4: found after one reconnect (without Postfix's 1 s sleep).
    server = tcp_server([Act.CLOSE], [b"200 x\n"])
    table = await tcp_table(nursery, server)
    assert await table.lookup(b"k") == Found(b"x")
    assert server.requests == [b"get k\n", b"get k\n"]


async def test_tcp_reply_cut_short_is_retried(nursery: trio.Nursery) -> None:
    server = tcp_server([SendThenClose(b"200 x")], [b"200 y\n"])
    table = await tcp_table(nursery, server)
    assert await table.lookup(b"k") == Found(b"y")
    assert server.connections == 2


async def test_tcp_close_always_is_retry_after_max_attempts(nursery: trio.Nursery) -> None:
    # 12.4 says 10 attempts with 1 s pauses; the bridge stops at MAX_ATTEMPTS.
    server = tcp_server(default=Act.CLOSE)
    table = await tcp_table(nursery, server)
    outcome = await table.lookup(b"k")
    assert isinstance(outcome, Retry)
    assert server.connections == MAX_ATTEMPTS


async def test_tcp_connect_refused_is_retry() -> None:
    table = open_map(f"tcp:127.0.0.1:{refused_port()}", OpenOptions("/"))
    outcome = await table.lookup(b"k")
    assert isinstance(outcome, Retry)
    assert "cannot connect" in outcome.reason


async def test_tcp_batch_shares_connection_until_400(nursery: trio.Nursery) -> None:
    # 12.4: a->500, c->200, b->400 on one connection, closed by the client after 400.
    server = tcp_server([b"500 no\n", b"200 yes\n", b"400 later\n"])
    table = await tcp_table(nursery, server)
    assert await table.lookup(b"a") == NOT_FOUND
    assert await table.lookup(b"c") == Found(b"yes")
    assert isinstance(await table.lookup(b"b"), Retry)
    assert server.connections == 1
    assert server.requests == [b"get a\n", b"get c\n", b"get b\n"]
    assert await table.lookup(b"d") == Found(b"fresh")
    assert server.connections == 2


async def test_tcp_silent_server_times_out(nursery: trio.Nursery) -> None:
    server = tcp_server([Act.HANG])
    table = await tcp_table(nursery, server, time_limit=SHORT_TIMEOUT)
    started = trio.current_time()
    outcome = await table.lookup(b"k")
    assert isinstance(outcome, Retry)
    assert outcome.timeout
    assert trio.current_time() - started < TIMEOUT_BOUND
    assert server.connections == 1


async def test_tcp_extra_reply_line_closes_connection(nursery: trio.Nursery) -> None:
    server = tcp_server([b"200 x\n200 y\n"])
    table = await tcp_table(nursery, server)
    assert await table.lookup(b"k") == Found(b"x")
    assert await table.lookup(b"k") == Found(b"fresh")
    assert server.connections == 2


@pytest.mark.parametrize("cut", range(1, len(b"200 a%20b\n")))
async def test_tcp_reply_split_anywhere(nursery: trio.Nursery, cut: int) -> None:
    reply = b"200 a%20b\n"
    server = tcp_server([SendInPieces((reply[:cut], reply[cut:]))])
    table = await tcp_table(nursery, server)
    assert await table.lookup(b"k") == Found(b"a b")


def echo_tcp(request: bytes) -> bytes:
    return b"200 " + request[len(b"get ") :]


async def test_tcp_concurrent_lookups_are_serialised(nursery: trio.Nursery) -> None:
    server = tcp_server(default=echo_tcp)
    table = await tcp_table(nursery, server)
    results: dict[bytes, Outcome] = {}

    async def look(key: bytes) -> None:
        results[key] = await table.lookup(key)

    keys = [b"key %d" % number for number in range(8)]
    async with trio.open_nursery() as lookups:
        for key in keys:
            lookups.start_soon(look, key)
    assert results == {key: Found(key) for key in keys}
    assert server.connections == 1


async def test_tcp_aclose(nursery: trio.Nursery) -> None:
    server = tcp_server()
    table = await tcp_table(nursery, server)
    assert await table.lookup(b"k") == Found(b"fresh")
    await table.aclose()
    await table.aclose()
    assert isinstance(await table.lookup(b"k"), Retry)


# ------------------------------------------------------- arbitrary replies


def lookup_against(
    server: ScriptedServer, make_table: Callable[[int], TcpMap | SocketmapMap]
) -> Outcome:
    async def main() -> Outcome:
        async with trio.open_nursery() as nursery:
            port = await start_tcp(nursery, server)
            table = make_table(port)
            outcome = await table.lookup(b"k")
            await table.aclose()
            nursery.cancel_scope.cancel()
        return outcome

    return trio.run(main)


_fuzz_settings = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@_fuzz_settings
@given(st.binary(max_size=64))
def test_socketmap_arbitrary_reply_never_raises(reply: bytes) -> None:
    server = socketmap_server(default=SendThenClose(reply))

    def make_table(port: int) -> SocketmapMap:
        spec = f"socketmap:inet:127.0.0.1:{port}:m"
        return SocketmapMap(spec, parse_socketmap_target(spec[10:]), timeout=TIMEOUT_BOUND)

    outcome = lookup_against(server, make_table)
    assert isinstance(outcome, (Found, type(NOT_FOUND), Retry, ConfigFailure))


@_fuzz_settings
@given(st.binary(max_size=64))
def test_tcp_arbitrary_reply_never_raises(reply: bytes) -> None:
    server = tcp_server(default=SendThenClose(reply))

    def make_table(port: int) -> TcpMap:
        endpoint = InetEndpoint("127.0.0.1", port)
        return TcpMap(f"tcp:127.0.0.1:{port}", endpoint, timeout=TIMEOUT_BOUND)

    outcome = lookup_against(server, make_table)
    assert isinstance(outcome, (Found, type(NOT_FOUND), Retry, ConfigFailure))
