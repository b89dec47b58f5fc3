"""Reload, shutdown and idle close under load, judged as Postfix's client judges them.

Clients here behave like Postfix's socketmap client (SM-13, SM-15): one
request at a time per connection, and exactly one transparent reconnect
when the connection fails with end-of-stream before the reply. A lookup
"fails" only when that client would report an error.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.integration.conftest import NextPort
from tests.integration.harness import Memcached, run_bridge
from tests.reliability import ReliabilityReport, long_mode

CLIENTS = 32


class PostfixLikeClient:
    """A socketmap client with Postfix's connection rules."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.reconnects = 0

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        self.sock = sock
        return sock

    def _exchange(self, sock: socket.socket, request: bytes) -> bytes | None:
        """The reply payload, or None on end-of-stream / reset (an SM-15 EOF error)."""
        try:
            sock.sendall(request)
            data = b""
            while True:
                head, colon, rest = data.partition(b":")
                if colon and len(rest) >= int(head) + 1:
                    return rest[: int(head)]
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                data += chunk
        except (ConnectionResetError, BrokenPipeError):
            return None

    def ask(self, name: str, key: bytes) -> bytes:
        payload = name.encode() + b" " + key
        request = b"%d:%s," % (len(payload), payload)
        for attempt in (1, 2):
            sock = self.sock or self._connect()
            reply = self._exchange(sock, request)
            if reply is not None:
                return reply
            self.close()
            if attempt == 1:
                self.reconnects += 1
        return b"EOF twice"

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _config(path: Path, port: int, memcached: Memcached, extra: str = "") -> Path:
    path.write_text(
        f'[[listen]]\nendpoint = "inet:127.0.0.1:{port}"\nprotocol = "socketmap"\n{extra}\n'
        f'[tables.aliases]\nmemcache = "{memcached.endpoint}"\nkey_format = "a:%s"\n'
    )
    return path


def test_sighup_under_load_never_fails_a_lookup(
    memcached: Memcached, tmp_path: Path, ports: NextPort, reliability: ReliabilityReport
) -> None:
    port = ports()
    config = _config(tmp_path / "bridge.toml", port, memcached)
    keys = [b"user%d@example.com" % i for i in range(CLIENTS * 4)]
    for key in keys:
        memcached.set(b"a:" + key, b"value-of-" + key)
    reloads = 20 if long_mode() else 5
    answers: list[tuple[bytes, bytes]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(index: int) -> None:
        postfix = PostfixLikeClient(port)
        mine = keys[index::CLIENTS]
        turn = 0
        while not stop.is_set():
            key = mine[turn % len(mine)]
            reply = postfix.ask("aliases", key)
            with lock:
                answers.append((key, reply))
            turn += 1
        postfix.close()

    with run_bridge(config) as bridge:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        try:
            for round_number in range(reloads):
                # A valid change that keeps every answer the same.
                text = config.read_text().split("ttl = ")[0]
                config.write_text(text + f"ttl = {100 + round_number}\n")
                mark = len(bridge.log)
                bridge.signal(signal.SIGHUP)
                bridge.wait_for_log(r"reloaded", start=mark)
                with lock:
                    seen = len(answers)
                while len(answers) < seen + 100:
                    time.sleep(0.01)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
    wrong = [(key, reply) for key, reply in answers if reply != b"OK value-of-" + key]
    reliability.record(
        "reload",
        f"SIGHUP x{reloads} with {CLIENTS} clients looking up",
        requests=len(answers),
        correct=len(answers) - len(wrong),
        wrong=len(wrong),
        bound="no failed lookup across reloads",
    )
    assert len(answers) > reloads * 100
    assert not wrong, wrong[:5]


class SlowMemcache:
    """A memcache stand-in that answers every get after a delay, counting gets received."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.gets = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while b"\r\n" in buffer:
                    line, buffer = buffer.split(b"\r\n", 1)
                    key = line.split()[1]
                    with self._lock:
                        self.gets += 1
                    time.sleep(self.delay)
                    value = b"slow-" + key
                    conn.sendall(b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (key, len(value), value))

    def close(self) -> None:
        self._server.close()


@contextlib.contextmanager
def slow_memcache(delay: float) -> Iterator[SlowMemcache]:
    server = SlowMemcache(delay)
    try:
        yield server
    finally:
        server.close()


def test_sigterm_answers_every_request_already_received(
    tmp_path: Path, ports: NextPort, reliability: ReliabilityReport
) -> None:
    port = ports()
    with slow_memcache(delay=1.0) as slow:
        config = tmp_path / "bridge.toml"
        config.write_text(
            f'[[listen]]\nendpoint = "inet:127.0.0.1:{port}"\nprotocol = "socketmap"\n'
            f'[tables.aliases]\nmemcache = "inet:127.0.0.1:{slow.port}"\ntimeout = 10\n'
        )
        with run_bridge(config) as bridge:
            replies: dict[int, bytes] = {}

            def client(index: int) -> None:
                with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                    payload = b"aliases k%d" % index
                    sock.sendall(b"%d:%s," % (len(payload), payload))
                    data = b""
                    while chunk := sock.recv(65536):
                        data += chunk
                    replies[index] = data

            threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
            for thread in threads:
                thread.start()
            # Every request has reached memcache: the bridge holds them all.
            deadline = time.monotonic() + 30
            while slow.gets < CLIENTS:
                assert time.monotonic() < deadline, f"only {slow.gets} gets arrived"
                time.sleep(0.01)
            started = time.monotonic()
            bridge.signal(signal.SIGTERM)
            for thread in threads:
                thread.join(timeout=60)
            assert bridge.process.wait(timeout=60) == 0
            elapsed = time.monotonic() - started
    expected = {i: b"%d:OK slow-k%d," % (len(b"OK slow-k%d" % i), i) for i in range(CLIENTS)}
    wrong = [i for i in range(CLIENTS) if replies.get(i) != expected[i]]
    reliability.record(
        "shutdown",
        f"SIGTERM with {CLIENTS} requests in flight (memcache answering in 1 s)",
        requests=CLIENTS,
        correct=CLIENTS - len(wrong),
        wrong=len(wrong),
        bound=f"all answered, exit 0 after {elapsed:.1f}s",
    )
    assert not wrong, {i: replies.get(i) for i in wrong[:5]}


def test_idle_close_racing_a_request_never_fails_a_lookup(
    memcached: Memcached, tmp_path: Path, ports: NextPort, reliability: ReliabilityReport
) -> None:
    idle = 0.3
    port = ports()
    config = _config(tmp_path / "bridge.toml", port, memcached, f"idle_timeout = {idle}")
    memcached.set(b"a:k", b"v")
    rounds = 400 if long_mode() else 26
    failures: list[bytes] = []
    reconnects = 0
    with run_bridge(config):
        for round_number in range(rounds):
            client = PostfixLikeClient(port)
            assert client.ask("aliases", b"k") == b"OK v"
            # Send the next request right around the server's idle deadline:
            # spread over idle +- 30 ms so some land on each side of it.
            time.sleep(idle - 0.03 + 0.06 * (round_number % 13) / 12)
            reply = client.ask("aliases", b"k")
            if reply != b"OK v":
                failures.append(reply)
            reconnects += client.reconnects
            client.close()
    reliability.record(
        "idle close",
        f"request sent at the idle deadline ({idle}s), Postfix retry-once client",
        requests=rounds * 2,
        correct=rounds * 2 - len(failures),
        wrong=len(failures),
        bound=f"{reconnects} transparent reconnects (SM-15), 0 failed lookups",
    )
    assert not failures, failures[:5]
