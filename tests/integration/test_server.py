"""The running daemon over raw sockets: framing, hostile input, connection limits.

Theory of operation
-------------------
Postfix's own client never pipelines, never sends a broken frame and never
keeps a connection open without asking, so ``postmap`` cannot reach the
server paths tested here. These tests talk to a real bridge (and a real
memcached) over plain :mod:`socket` connections instead. The netstring and
line readers below are written from the spec (SM-4..SM-6, TCP-4), not
imported from :mod:`bridge.protocol`, so that a mistake shared by the
bridge's encoder and decoder cannot hide behind itself.

One bridge per test serves every listener the tests need (socketmap on
loopback and on a unix socket in tmp_path, tcp_table, a socketmap listener
capped at two connections, one with a 1 s idle limit) and three tables:
``aliases`` (``key_format = aliases:%s``), ``raw`` (the key as is) and
``stalled`` (a memcache that accepts connections and never answers).

Every wait has a generous upper bound; nothing sleeps to wait for
readiness. The only deliberate pauses are the negative checks ("this
client has not been answered yet"), bounded by :data:`QUIET_PERIOD`.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from bridge.protocol.tcptable import MAX_REQUEST_LINE
from tests.integration.harness import (
    Bridge,
    Memcached,
    free_port,
    postmap_query,
    run_bridge,
    run_memcached,
)

#: Upper bound for any reply or close the server owes us. A correct answer
#: takes milliseconds; the bound only has to survive a loaded CI machine.
REPLY_TIMEOUT = 10.0

#: How long a client must go unanswered to count as "not served". Short,
#: because the test pays it in full every time it passes.
QUIET_PERIOD = 1.0

#: memcache ``timeout`` of the ``stalled`` table: the time one lookup on it
#: takes. Longer than the idle listener's 1 s limit, so a server that
#: applied the idle limit to a request in progress would cut it.
STALLED_LOOKUP_SECONDS = 2

#: A memcache command smuggled into a key: if the key reached memcache
#: verbatim, the text after the CRLF would run as a second command.
INJECTION_KEY = b"a\r\nset x 0 0 1\r\n"

Address = tuple[str, int] | str


# ---------------------------------------------------------------- clients


class ServerClosed(Exception):
    """The server closed the connection while a reply was still expected."""


class RawClient:
    """One client connection with a receive buffer, for either protocol."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()

    @classmethod
    def connect(cls, address: Address) -> RawClient:
        """Connect to a loopback port or a unix socket path."""
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(REPLY_TIMEOUT)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        if family == socket.AF_INET:
            # Small writes must leave one by one for the byte-split tests.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _receive_more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ServerClosed(f"server closed; unparsed bytes: {bytes(self._buffer)!r}")
        self._buffer += chunk

    def read_netstring(self) -> bytes:
        """Read one reply netstring and return its payload (SM-4, SM-6).

        Raises:
          AssertionError: the bytes are not a netstring the way Postfix
            reads one, or the payload exceeds Postfix's 100000-byte limit.
          ServerClosed: the server closed before a whole netstring arrived.
        """
        while b":" not in self._buffer:
            assert len(self._buffer) < 32, f"no ':' in {bytes(self._buffer)!r}"
            self._receive_more()
        colon = self._buffer.index(b":")
        digits = bytes(self._buffer[:colon])
        assert digits.isdigit(), f"bad netstring length {digits!r}"
        length = int(digits)
        assert length <= 100_000, f"reply of {length} bytes is a size error for Postfix"
        end = colon + 1 + length
        while len(self._buffer) < end + 1:
            self._receive_more()
        assert self._buffer[end : end + 1] == b",", f"no ',' after {bytes(self._buffer)!r}"
        payload = bytes(self._buffer[colon + 1 : end])
        del self._buffer[: end + 1]
        return payload

    def read_line(self) -> bytes:
        """Read one tcp_table reply line, LF included (TCP-4)."""
        while b"\n" not in self._buffer:
            assert len(self._buffer) < 4096, "reply line longer than Postfix reads"
            self._receive_more()
        end = self._buffer.index(b"\n") + 1
        line = bytes(self._buffer[:end])
        del self._buffer[:end]
        return line

    def ask(self, name: str, key: bytes) -> bytes:
        """One socketmap lookup, framed as Postfix frames it (SM-5, SM-8)."""
        self.send(_netstring(name.encode("ascii") + b" " + key))
        return self.read_netstring()

    def get(self, quoted_key: bytes) -> bytes:
        """One tcp_table lookup; the key must already be %XX-quoted (TCP-2)."""
        self.send(b"get " + quoted_key + b"\n")
        return self.read_line()

    def assert_closed_by_server(self) -> None:
        """Assert that the server closes the connection, sending nothing more.

        A close while our own bytes were still unread reaches us as a reset
        instead of an orderly end of stream; both mean "closed".
        """
        assert not self._buffer, f"unread reply bytes: {bytes(self._buffer)!r}"
        try:
            rest = self.sock.recv(65536)
        except ConnectionResetError:
            return
        assert rest == b"", f"expected close, got {rest!r}"


@contextlib.contextmanager
def connected(address: Address) -> Iterator[RawClient]:
    client = RawClient.connect(address)
    try:
        yield client
    finally:
        client.close()


def _netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


def _status(payload: bytes) -> bytes:
    """The status word of a socketmap reply payload (SM-9)."""
    return payload.partition(b" ")[0]


# ---------------------------------------------------------------- the server


@dataclass(frozen=True)
class Served:
    """A running bridge: its memcached and the address of every listener."""

    memcached: Memcached
    bridge: Bridge
    socketmap: tuple[str, int]
    unix: str
    tcp: tuple[str, int]
    limited: tuple[str, int]
    idle: tuple[str, int]


@contextlib.contextmanager
def _silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel backlog does) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port: int = listener.getsockname()[1]
        yield port


def _distinct_free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One memcached and one bridge for the whole module.

    Stopping memcached costs most of a second, so starting a pair per test
    would multiply the module's run time; :func:`served` gives every test
    an empty memcached instead. A test can only break its own connections,
    which is what most of them check.
    """
    tmp_path = tmp_path_factory.mktemp("server")
    sm_port, tcp_port, limited_port, idle_port = _distinct_free_ports(4)
    sock = str(tmp_path / "bridge.sock")
    config = tmp_path / "bridge.toml"
    with run_memcached() as memcached, _silent_port() as silent_port:
        config.write_text(f"""
[[listen]]
endpoint = "inet:127.0.0.1:{sm_port}"
protocol = "socketmap"

[[listen]]
endpoint = "unix:{sock}"
protocol = "socketmap"

[[listen]]
endpoint = "inet:127.0.0.1:{tcp_port}"
protocol = "tcp"
table = "aliases"

[[listen]]
endpoint = "inet:127.0.0.1:{limited_port}"
protocol = "socketmap"
max_connections = 2

[[listen]]
endpoint = "inet:127.0.0.1:{idle_port}"
protocol = "socketmap"
idle_timeout = 1

[tables.aliases]
memcache = "{memcached.endpoint}"
key_format = "aliases:%s"

[tables.raw]
memcache = "{memcached.endpoint}"

[tables.stalled]
memcache = "inet:127.0.0.1:{silent_port}"
timeout = {STALLED_LOOKUP_SECONDS}
max_try = 1
""")
        with run_bridge(config) as bridge:
            yield Served(
                memcached=memcached,
                bridge=bridge,
                socketmap=("127.0.0.1", sm_port),
                unix=sock,
                tcp=("127.0.0.1", tcp_port),
                limited=("127.0.0.1", limited_port),
                idle=("127.0.0.1", idle_port),
            )


@pytest.fixture
def served(running: Served) -> Served:
    """The module's bridge, still alive, with an empty memcached."""
    assert running.bridge.process.poll() is None, "".join(running.bridge.log)
    running.memcached.flush()
    return running


def _seed_numbered(memcached: Memcached, count: int) -> None:
    """aliases:kN -> vN for even N; odd keys stay missing, so order errors show."""
    for index in range(0, count, 2):
        memcached.set(b"aliases:k%d" % index, b"v%d" % index)


def _expected_numbered(count: int) -> list[bytes]:
    return [b"OK v%d" % i if i % 2 == 0 else b"NOTFOUND " for i in range(count)]


# ---------------------------------------------------------------- socketmap


@pytest.mark.parametrize("listener", ["socketmap", "unix"])
def test_pipelined_requests_in_one_send_are_answered_in_order(
    served: Served, listener: str
) -> None:
    count = 20
    _seed_numbered(served.memcached, count)
    requests = b"".join(_netstring(b"aliases k%d" % i) for i in range(count))
    with connected(getattr(served, listener)) as client:
        client.send(requests)
        replies = [client.read_netstring() for _ in range(count)]
    assert replies == _expected_numbered(count)


@pytest.mark.parametrize("listener", ["socketmap", "unix"])
def test_requests_sent_byte_by_byte_are_answered_in_order(served: Served, listener: str) -> None:
    count = 6
    _seed_numbered(served.memcached, count)
    requests = b"".join(_netstring(b"aliases k%d" % i) for i in range(count))
    with connected(getattr(served, listener)) as client:
        for index in range(len(requests)):
            client.send(requests[index : index + 1])
        replies = [client.read_netstring() for _ in range(count)]
    assert replies == _expected_numbered(count)


def test_unknown_map_name_is_perm_and_connection_stays_usable(served: Served) -> None:
    served.memcached.set(b"aliases:user@example.com", b"found-it")
    with connected(served.socketmap) as client:
        reply = client.ask("nosuchtable", b"user@example.com")
        assert _status(reply) == b"PERM" and b"nosuchtable" in reply, reply
        assert client.ask("aliases", b"user@example.com") == b"OK found-it"


def test_payload_without_space_is_perm_and_connection_stays_usable(served: Served) -> None:
    served.memcached.set(b"aliases:user@example.com", b"found-it")
    with connected(served.socketmap) as client:
        client.send(_netstring(b"aliases"))
        assert _status(client.read_netstring()) == b"PERM"
        assert client.ask("aliases", b"user@example.com") == b"OK found-it"


#: Frames whose framing breaks (SM-6); the server answers PERM and closes.
HOSTILE_FRAMES = {
    "length over the limit": b"999999999:",
    "letter in the length": b"12a:",
    "no comma after the payload": b"3:a b;",
    "200 kB netstring": _netstring(b"aliases " + b"x" * 200_000),
}


@pytest.mark.parametrize("frame", HOSTILE_FRAMES.values(), ids=HOSTILE_FRAMES.keys())
def test_hostile_frame_gets_perm_then_close_and_spares_other_connections(
    served: Served, frame: bytes
) -> None:
    served.memcached.set(b"aliases:user@example.com", b"bystander-answer")
    with connected(served.socketmap) as bystander:
        assert bystander.ask("aliases", b"user@example.com") == b"OK bystander-answer"
        with connected(served.socketmap) as hostile:
            # The server may close before all of 200 kB have left.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                hostile.send(frame)
            assert bystander.ask("aliases", b"user@example.com") == b"OK bystander-answer"
            assert _status(hostile.read_netstring()) == b"PERM"
            hostile.assert_closed_by_server()
        assert bystander.ask("aliases", b"user@example.com") == b"OK bystander-answer"


# ---------------------------------------------------------------- tcp_table


@pytest.mark.parametrize(
    "quoted_key",
    [b"Caf%C3%A9%40Example.com", b"caf%c3%a9%40example.com", b"CAF%c3%A9@example.com"],
)
def test_tcp_get_unquotes_upper_and_lower_case_hex(served: Served, quoted_key: bytes) -> None:
    # Spec 12.3 ("café" -> caf%C3%A9) and the TCP-3 bridge note: hex digits
    # of either case are accepted; the unquoted key is then folded (CASE-2).
    served.memcached.set("aliases:café@example.com".encode(), b"unquoted")
    with connected(served.tcp) as client:
        assert client.get(quoted_key) == b"200 unquoted\n"


def test_tcp_requests_pipelined_are_answered_in_order(served: Served) -> None:
    count = 10
    _seed_numbered(served.memcached, count)
    with connected(served.tcp) as client:
        client.send(b"".join(b"get k%d\n" % i for i in range(count)))
        replies = [client.read_line() for _ in range(count)]
    assert replies == [b"200 v%d\n" % i if i % 2 == 0 else b"500 not found\n" for i in range(count)]


def test_tcp_put_is_rejected_with_500_and_connection_kept(served: Served) -> None:
    served.memcached.set(b"aliases:k", b"v")
    with connected(served.tcp) as client:
        client.send(b"put k x\n")
        assert client.read_line().startswith(b"500 ")
        assert client.get(b"k") == b"200 v\n"
    # TCP-3: nothing may be written through tcp_table.
    assert served.memcached.get(b"aliases:k") == (0, b"v")


# The malformed escapes of spec 12.4 (there in replies), here in a request.
@pytest.mark.parametrize("quoted_key", [b"a%zz", b"a%4", b"100%"])
def test_tcp_bad_escape_is_400_and_connection_kept(served: Served, quoted_key: bytes) -> None:
    served.memcached.set(b"aliases:k", b"v")
    with connected(served.tcp) as client:
        assert client.get(quoted_key).startswith(b"400 ")
        assert client.get(b"k") == b"200 v\n"


def test_tcp_overlong_line_is_400_then_close(served: Served) -> None:
    # Exactly the longest line the server reads, still without its LF: the
    # server must give up on it, and no byte of ours is left unread.
    with connected(served.tcp) as client:
        client.send(b"get " + b"x" * (MAX_REQUEST_LINE - 4))
        assert client.read_line().startswith(b"400 ")
        client.assert_closed_by_server()


@pytest.mark.parametrize(
    ("value", "line"),
    [
        (b"50% off now", b"200 50%25 off now\n"),
        ("Grüße, 東京".encode(), "200 Grüße, 東京\n".encode()),
        (b"tab\there", b"200 tab%09here\n"),
    ],
)
def test_tcp_reply_quotes_percent_and_controls_only(
    served: Served, value: bytes, line: bytes
) -> None:
    # README "Value limits" / TCP-8: '%' and controls quoted, the rest raw.
    served.memcached.set(b"aliases:k", value)
    with connected(served.tcp) as client:
        assert client.get(b"k") == line
    # Postfix's own client must read the same value back.
    host, port = served.tcp
    result = postmap_query("k", f"tcp:{host}:{port}")
    assert result.outcome == "found:" + value.decode(), result


# ---------------------------------------------------------------- keys


def test_crlf_key_never_reaches_memcache_as_command(served: Served) -> None:
    # MC-13 step 7: whitespace or control bytes in the memcache key skip the
    # lookup, so the text after CRLF can never run as a memcache command.
    with connected(served.socketmap) as client:
        for table in ("raw", "aliases"):
            assert client.ask(table, INJECTION_KEY) == b"NOTFOUND "
    with connected(served.tcp) as client:
        assert client.get(b"a%0D%0Aset%20x%200%200%201%0D%0A") == b"500 not found\n"
    assert served.memcached.get(b"x") is None
    assert served.memcached.items() == {}


def test_nul_in_key_is_not_found(served: Served) -> None:
    # A key is a C string (conventions): "a\0b" cannot be "a" cut short.
    served.memcached.set(b"aliases:a", b"truncated-key-was-used")
    with connected(served.socketmap) as client:
        assert client.ask("aliases", b"a\x00b") == b"NOTFOUND "
        assert client.ask("aliases", b"a") == b"OK truncated-key-was-used"


def test_non_utf8_key_is_not_found(served: Served) -> None:
    # G-6 with smtputf8 on: the key never reaches memcache, though it could.
    served.memcached.set(b"aliases:caf\xe9", b"latin1-key-was-used")
    with connected(served.socketmap) as client:
        assert client.ask("aliases", b"caf\xe9") == b"NOTFOUND "
    with connected(served.tcp) as client:
        assert client.get(b"caf%E9") == b"500 not found\n"


def test_non_utf8_value_is_perm(served: Served) -> None:
    # G-6: Postfix turns a non-UTF-8 value into CONFIG; tcp can only say 400.
    served.memcached.set(b"aliases:bad", b"\xff\xfe")
    with connected(served.socketmap) as client:
        assert _status(client.ask("aliases", b"bad")) == b"PERM"
    with connected(served.tcp) as client:
        assert client.get(b"bad").startswith(b"400 ")


# ---------------------------------------------------------------- limits


def _assert_unanswered(client: RawClient) -> None:
    """Assert that no reply arrives within QUIET_PERIOD."""
    client.sock.settimeout(QUIET_PERIOD)
    try:
        with pytest.raises(TimeoutError):
            client.read_netstring()
    finally:
        client.sock.settimeout(REPLY_TIMEOUT)


def test_max_connections_queues_a_third_client_until_a_slot_frees(served: Served) -> None:
    served.memcached.set(b"aliases:k", b"v")
    with connected(served.limited) as first, connected(served.limited) as second:
        # An answer proves the server has taken the connection into a slot.
        assert first.ask("aliases", b"k") == b"OK v"
        assert second.ask("aliases", b"k") == b"OK v"
        with connected(served.limited) as third:
            # The kernel backlog completes the connect; the server must not read.
            third.send(_netstring(b"aliases k"))
            _assert_unanswered(third)
            first.close()
            assert third.read_netstring() == b"OK v"
            assert second.ask("aliases", b"k") == b"OK v"


def test_idle_connection_is_closed_by_the_server(served: Served) -> None:
    with connected(served.idle) as client:
        started = time.monotonic()
        client.assert_closed_by_server()
        # Not closed at once either: idle_timeout = 1 s.
        assert time.monotonic() - started >= 0.5


def test_slow_request_is_not_cut_by_idle_timeout(served: Served) -> None:
    served.memcached.set(b"aliases:k", b"v")
    with connected(served.idle) as client:
        started = time.monotonic()
        # The stalled memcache keeps this lookup busy past the idle limit.
        reply = client.ask("stalled", b"k")
        assert time.monotonic() - started >= STALLED_LOOKUP_SECONDS - 0.5
        assert _status(reply) == b"TIMEOUT", reply
        # Answering restarts the idle clock: the connection is still usable...
        assert client.ask("aliases", b"k") == b"OK v"
        # ...until it has been idle for idle_timeout.
        client.assert_closed_by_server()
