"""Real parts for integration tests: memcached, the bridge daemon, postmap.

Every server started here listens on loopback or a unix socket in a
temporary directory, on a port the kernel just handed out, and is stopped
when its context manager exits. Readiness is waited for on a condition
(a successful connect, the bridge's "ready" log line), never with a fixed
sleep.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote_to_bytes

#: Upper bound for a server to come up. Generous: CI machines are shared.
STARTUP_TIMEOUT = 20.0

POSTMAP = shutil.which("postmap") or "/usr/sbin/postmap"
MEMCACHED = shutil.which("memcached") or "/usr/bin/memcached"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def closed_port() -> int:
    """A loopback port where connections are refused."""
    return free_port()


def wait_for_connect(host: str, port: int, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@dataclass
class Memcached:
    """A running memcached with a minimal text-protocol client for seeding and inspection."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def endpoint(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def _exchange(self, command: bytes, terminators: Sequence[bytes]) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(command)
            reply = b""
            while not any(reply.endswith(t) for t in terminators):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
            return reply

    def set(self, key: bytes, value: bytes, *, flags: int = 0, ttl: int = 0) -> None:
        command = b"set %s %d %d %d\r\n%s\r\n" % (key, flags, ttl, len(value), value)
        reply = self._exchange(command, [b"\r\n"])
        assert reply == b"STORED\r\n", reply

    def get(self, key: bytes) -> tuple[int, bytes] | None:
        """Return (flags, value) or None."""
        reply = self._exchange(b"get %s\r\n" % key, [b"END\r\n"])
        if reply == b"END\r\n":
            return None
        header, _, rest = reply.partition(b"\r\n")
        _, _, flags, length = header.split()[:4]
        return int(flags), rest[: int(length)]

    def items(self) -> dict[bytes, tuple[int, bytes]]:
        """Every live item: key -> (flags, value)."""
        dump = self._exchange(b"lru_crawler metadump all\r\n", [b"END\r\n"])
        keys = re.findall(rb"^key=(\S+)", dump, re.MULTILINE)
        result: dict[bytes, tuple[int, bytes]] = {}
        for quoted in keys:
            key = unquote_to_bytes(quoted)
            item = self.get(key)
            if item is not None:
                result[key] = item
        return result

    def flush(self) -> None:
        assert self._exchange(b"flush_all\r\n", [b"\r\n"]) == b"OK\r\n"


@contextlib.contextmanager
def run_memcached(port: int | None = None) -> Iterator[Memcached]:
    """Start memcached on 127.0.0.1 (a free port unless given) and stop it afterwards."""
    port = port or free_port()
    args = [MEMCACHED, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64", "-t", "1"]
    if os.geteuid() == 0:
        args += ["-u", "root"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_connect("127.0.0.1", port)
        yield Memcached(port, process)
    finally:
        # Its contents are throwaway: SIGKILL ends it at once, where
        # SIGTERM costs ~0.7 s of memcached's own shutdown per server.
        process.kill()
        process.wait()
        if process.stderr:
            process.stderr.close()


@dataclass
class Bridge:
    """A running ``postfix-bridge serve`` process."""

    process: subprocess.Popen[str]
    config_path: Path
    log: list[str] = field(default_factory=list)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait_for_log(self, pattern: str, timeout: float = STARTUP_TIMEOUT, start: int = 0) -> int:
        """Wait until a log line (from index ``start``) matches; return its index."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for index in range(start, len(self.log)):
                if regex.search(self.log[index]):
                    return index
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.01)
        raise AssertionError(f"no log line matching {pattern!r}; log:\n" + "".join(self.log))

    _reader: threading.Thread = field(init=False)


#: Set to "tasks" (or "events") to serve every listener of every test
#: that way: tests/run.sh runs the server-facing tests once more with
#: "tasks", so both ways of serving pass the same tests.
SERVING_OVERRIDE = os.environ.get("BRIDGE_TEST_SERVING", "")


def _force_serving(config_path: Path, serving: str) -> None:
    """Write ``serving = ...`` into each ``[[listen]]`` section that does not set it."""
    lines = config_path.read_text().splitlines()
    out: list[str] = []
    for line in lines:
        out.append(line)
        if line.strip() == "[[listen]]":
            out.append(f'serving = "{serving}"')
    text = "\n".join(out) + "\n"
    # A test that sets the key itself keeps its own choice.
    if not re.search(r"^serving\s*=", config_path.read_text(), re.MULTILINE):
        config_path.write_text(text)


@contextlib.contextmanager
def run_bridge(config_path: Path, *extra: str) -> Iterator[Bridge]:
    """Start the bridge daemon and wait until it says every listener is bound."""
    if SERVING_OVERRIDE:
        _force_serving(config_path, SERVING_OVERRIDE)
    process = subprocess.Popen(
        [sys.executable, "-m", "bridge", "serve", "--config", str(config_path), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    bridge = Bridge(process, config_path)

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            bridge.log.append(line)

    bridge._reader = threading.Thread(target=pump, daemon=True)
    bridge._reader.start()
    try:
        bridge.wait_for_log(r"ready")
        yield bridge
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        bridge._reader.join(timeout=5)


@dataclass(frozen=True)
class PostmapResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def fatal(self) -> bool:
        return "fatal:" in self.stderr

    @property
    def outcome(self) -> str:
        """A comparable summary: ``found:VALUE``, ``notfound``, ``error``."""
        if self.fatal:
            return "error"
        if self.returncode == 0:
            return "found:" + self.stdout.removesuffix("\n")
        return "notfound"


def postmap_query(key: str | bytes, table: str, *, timeout: float = 60) -> PostmapResult:
    """``postmap -q KEY TABLE`` with Postfix's own client."""
    completed = subprocess.run(
        [POSTMAP, "-q", key, table],
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return PostmapResult(
        completed.returncode,
        completed.stdout.decode("utf-8", "surrogateescape"),
        completed.stderr.decode("utf-8", "surrogateescape"),
    )


def postmap_query_many(keys: Sequence[str], table: str, *, timeout: float = 120) -> PostmapResult:
    """``postmap -q - TABLE`` with one key per line (one connection for all keys)."""
    completed = subprocess.run(
        [POSTMAP, "-q", "-", table],
        input="".join(k + "\n" for k in keys).encode("utf-8"),
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return PostmapResult(
        completed.returncode,
        completed.stdout.decode("utf-8", "surrogateescape"),
        completed.stderr.decode("utf-8", "surrogateescape"),
    )


def age_file(path: Path) -> None:
    """Put a file's mtime in the past so Postfix does not wait for it to settle (CF-9)."""
    past = time.time() - 60
    os.utime(path, (past, past))
