"""Rate-limited failure reasons and the JSON log format."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.logs import ReasonLog, SyslogTarget, setup_logging, syslog_timestamp


def test_each_reason_once_per_interval_with_a_count_of_the_rest(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    reasons = ReasonLog(logging.getLogger("test.reasons"), interval=60)
    with caplog.at_level(logging.WARNING, logger="test.reasons"):
        for _ in range(50):
            reasons.warning("table a: TEMP: memcache down")
        reasons.warning("table b: PERM: no table")
        now[0] += 61
        reasons.warning("table a: TEMP: memcache down")
    assert [record.getMessage() for record in caplog.records] == [
        "table a: TEMP: memcache down",
        "table b: PERM: no table",
        "table a: TEMP: memcache down (and 49 more in the last 60s)",
    ]


def test_json_format_is_one_object_per_line() -> None:
    stream = io.StringIO()
    setup_logging("info", log_format="json", stream=stream)
    try:
        logging.getLogger("bridge.test").warning("table %s: TEMP", "aliases")
    finally:
        setup_logging("warning", log_format="text")
    [line] = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "warning"
    assert entry["logger"] == "bridge.test"
    assert entry["message"] == "table aliases: TEMP"
    assert isinstance(entry["pid"], int)


# ------------------------------------------------------------------ syslog

SYSLOG_LINE = re.compile(
    rb"<(\d+)>([A-Z][a-z]{2} [ 123]\d \d\d:\d\d:\d\d) postfix-bridge\[(\d+)\]: (.*)"
)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A syslog daemon's socket: a unix datagram socket bound in a temporary directory."""
    path = str(tmp_path / "log")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()
        setup_logging("warning", log_format="text")


def _received(sock: socket.socket) -> tuple[int, str, int, str]:
    match = SYSLOG_LINE.fullmatch(sock.recv(65536))
    assert match, "not an RFC 3164 line"
    return int(match[1]), match[2].decode(), int(match[3]), match[4].decode()


def test_syslog_lines_read_like_postfix_lines(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    stream = io.StringIO()
    setup_logging("debug", log_format="text", stream=stream, syslog=SyslogTarget("mail", path))
    log = logging.getLogger("bridge.test")
    log.warning("table %s: TEMP: memcache down", "aliases")
    log.info("ready")
    log.error("oops")
    log.critical("gone")
    log.debug("detail")
    mail = 2 * 8
    assert [_received(sock)[::3] for _ in range(5)] == [
        (mail + 4, "warning: table aliases: TEMP: memcache down"),
        (mail + 6, "info: ready"),
        (mail + 3, "error: oops"),
        (mail + 2, "critical: gone"),
        (mail + 7, "debug: detail"),
    ]
    assert stream.getvalue() == ""


def test_syslog_pid_facility_and_timestamp(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    setup_logging("info", log_format="text", syslog=SyslogTarget("local7", path))
    logging.getLogger("bridge.test").warning("x")
    priority, stamp, pid, text = _received(sock)
    assert (priority, pid, text) == (23 * 8 + 4, os.getpid(), "warning: x")
    month, day, _clock = stamp.split()
    assert month in {"Jan", "Feb", "Mar", "Apr", "May", "Jun"} | {
        "Jul",
        "Aug",
        "Sep",
        "Oct",
        "Nov",
        "Dec",
    }
    assert 1 <= int(day) <= 31


def test_syslog_timestamp_pads_the_day_with_a_space_like_glibc() -> None:
    when = time.mktime((2026, 11, 3, 9, 5, 7, 0, 0, -1))
    assert syslog_timestamp(when) == "Nov  3 09:05:07"


def test_a_traceback_is_sent_one_line_per_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    setup_logging("info", log_format="text", syslog=SyslogTarget("mail", path))
    try:
        int("bad")
    except ValueError:
        logging.getLogger("bridge.test").exception("failed")
    assert _received(sock)[3] == "error: failed"
    assert _received(sock)[3] == "Traceback (most recent call last):"


def test_json_lines_go_to_syslog_after_the_ident(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    setup_logging("info", log_format="json", syslog=SyslogTarget("daemon", path))
    logging.getLogger("bridge.test").warning("w")
    priority, _, _, text = _received(sock)
    assert priority == 3 * 8 + 4
    assert json.loads(text)["message"] == "w"


def test_without_a_syslog_socket_lines_go_to_stderr_after_one_warning(tmp_path: Path) -> None:
    stream = io.StringIO()
    missing = str(tmp_path / "no-such-log")
    try:
        setup_logging(
            "info", log_format="text", stream=stream, syslog=SyslogTarget("mail", missing)
        )
        logging.getLogger("bridge.test").warning("first")
        logging.getLogger("bridge.test").warning("second")
    finally:
        setup_logging("warning", log_format="text")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].endswith(
        f"warning: syslog socket {missing}: No such file or directory; "
        "logging to stderr until it answers"
    )
    assert lines[1].endswith(f"postfix-bridge[{os.getpid()}]: warning: first")
    assert lines[2].endswith("warning: second")


def test_lines_go_back_to_syslog_when_it_restarts(tmp_path: Path) -> None:
    path = str(tmp_path / "log")
    stream = io.StringIO()
    log = logging.getLogger("bridge.test")

    def bind() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(5)
        return sock

    first = bind()
    try:
        setup_logging("info", log_format="text", stream=stream, syslog=SyslogTarget("mail", path))
        log.warning("before")
        assert _received(first)[3] == "warning: before"
        # The syslog daemon stops (its socket file stays: connections are refused) ...
        first.close()
        log.warning("while down")
        log.warning("still down")
        # ... and starts again on a new socket at the same path.
        os.unlink(path)
        with bind() as second:
            log.warning("after")
            assert _received(second)[3] == "warning: after"
            first_outage = stream.getvalue().splitlines()
            second.close()
            os.unlink(path)
            log.warning("down again")
    finally:
        setup_logging("warning", log_format="text")
    assert [line.split(": ", 1)[1] for line in first_outage] == [
        f"warning: syslog socket {path}: Connection refused; logging to stderr until it answers",
        "warning: while down",
        "warning: still down",
    ]
    # A second outage is told again.
    assert "logging to stderr until it answers" in stream.getvalue().splitlines()[3]


def test_a_syslog_daemon_that_does_not_keep_up_never_blocks(
    receiver: tuple[socket.socket, str],
) -> None:
    _, path = receiver  # bound, but nobody reads: its queue fills up
    stream = io.StringIO()
    setup_logging("info", log_format="text", stream=stream, syslog=SyslogTarget("mail", path))
    started = time.monotonic()
    for number in range(5000):
        logging.getLogger("bridge.test").warning("line %d", number)
    assert time.monotonic() - started < 10
    lines = stream.getvalue().splitlines()
    assert "Resource temporarily unavailable; logging to stderr until it answers" in lines[0]
    assert lines[-1].endswith("warning: line 4999")
