"""log_target = "syslog": the real daemon's lines reach a syslog socket as Postfix's would.

The test plays the syslog daemon: it binds a unix datagram socket in a
temporary directory (what rsyslog or journald do at /dev/log) and points
``syslog_socket`` at it.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.protocol import socketmap
from tests.integration.conftest import NextPort
from tests.integration.harness import STARTUP_TIMEOUT, closed_port, run_bridge

#: ``<PRI>Mmm dd hh:mm:ss postfix-bridge[PID]: text``, as glibc's syslog(3) sends it.
LINE = re.compile(rb"<(\d+)>[A-Z][a-z]{2} [ 123]\d \d\d:\d\d:\d\d postfix-bridge\[(\d+)\]: (.*)")
MAIL = 2  # LOG_MAIL >> 3
WARNING, INFO = 4, 6


class SyslogReceiver:
    """A unix datagram socket collecting (priority, pid, text) lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.lines: list[tuple[int, int, str]] = []

    def wait_for(self, pattern: str, timeout: float = STARTUP_TIMEOUT) -> tuple[int, int, str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                if regex.search(line[2]):
                    return line
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no syslog line matching {pattern!r}: {self.lines}"
            self.sock.settimeout(remaining)
            with contextlib.suppress(TimeoutError):
                datagram = self.sock.recv(65536)
                match = LINE.fullmatch(datagram)
                assert match, f"not an RFC 3164 line: {datagram!r}"
                self.lines.append((int(match[1]), int(match[2]), match[3].decode()))


@contextlib.contextmanager
def serve(config: Path, receiver: SyslogReceiver) -> Iterator[subprocess.Popen[str]]:
    """``postfix-bridge serve``, ready once its "ready" line reached the receiver."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bridge", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        receiver.wait_for(r"^info: ready: listening on ")
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _lookup(port: int, table: str, key: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(socketmap.encode_request(table, key))
        return sock.recv(65536)


def _children(pid: int) -> set[int]:
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        children.update(int(child) for child in (task / "children").read_text().split())
    return children


@pytest.mark.parametrize("workers", [1, 2])
def test_warnings_reach_syslog_with_mail_facility_ident_and_pid(
    tmp_path: Path, ports: NextPort, workers: int
) -> None:
    receiver = SyslogReceiver(tmp_path / "log")
    port = ports()
    down = closed_port()
    config = tmp_path / "bridge.toml"
    config.write_text(
        f'log_target = "syslog"\nsyslog_socket = "{receiver.path}"\nworkers = {workers}\n'
        f'[[listen]]\nendpoint = "inet:127.0.0.1:{port}"\nprotocol = "socketmap"\n'
        f'[tables.aliases]\nmemcache = "inet:127.0.0.1:{down}"\n'
    )
    with serve(config, receiver) as process:
        priority, pid, _ = receiver.wait_for(r"^info: ready: ")
        assert priority == MAIL * 8 + INFO
        serving = {process.pid} if workers == 1 else _children(process.pid)
        assert pid in serving
        if workers > 1:
            # The supervisor logs too, with its own pid.
            priority, pid, _ = receiver.wait_for(r"^info: supervising 2 workers")
            assert (priority, pid) == (MAIL * 8 + INFO, process.pid)

        reply = _lookup(port, "aliases", b"user@example.com")
        assert reply.split(b":", 1)[1].startswith(b"TEMP "), reply
        priority, pid, text = receiver.wait_for(r"^warning: table aliases: TEMP")
        assert priority == MAIL * 8 + WARNING
        assert pid in serving
        assert f"127.0.0.1:{down}" in text, text
    assert process.stderr is not None
    # Nothing fell back to stderr: every line went to syslog.
    assert process.stderr.read() == ""


def test_facility_is_configurable(tmp_path: Path, ports: NextPort) -> None:
    receiver = SyslogReceiver(tmp_path / "log")
    config = tmp_path / "bridge.toml"
    config.write_text(
        f'log_target = "syslog"\nsyslog_facility = "local5"\nsyslog_socket = "{receiver.path}"\n'
        f'[[listen]]\nendpoint = "inet:127.0.0.1:{ports()}"\nprotocol = "socketmap"\n'
        "[tables.aliases]\n"
    )
    with serve(config, receiver) as process:
        assert receiver.wait_for(r"^info: ready: ")[:2] == (21 * 8 + INFO, process.pid)


def test_without_a_syslog_daemon_lines_go_to_stderr(tmp_path: Path, ports: NextPort) -> None:
    missing = tmp_path / "no-syslog-here"
    config = tmp_path / "bridge.toml"
    config.write_text(
        f'log_target = "syslog"\nsyslog_socket = "{missing}"\n'
        f'[[listen]]\nendpoint = "inet:127.0.0.1:{ports()}"\nprotocol = "socketmap"\n'
        "[tables.aliases]\n"
    )
    # run_bridge waits for the "ready" line on stderr.
    with run_bridge(config) as bridge:
        first = bridge.wait_for_log(r"warning: syslog socket .*: No such file or directory")
        assert first < bridge.wait_for_log(r"info: ready: listening on ")
    warnings = [line for line in bridge.log if "syslog socket" in line]
    assert len(warnings) == 1, bridge.log
