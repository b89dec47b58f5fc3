"""Logging set-up: Postfix-like text lines or JSON, and rate-limited failure reasons.

Theory of operation
-------------------
One line per event. The text format reads like Postfix's own logs
(``postfix-bridge[PID]: warning: table aliases: memcache inet:...:
timeout after 2s``); ``--log-format json`` writes one JSON object per
line for log shippers. Nothing is logged per lookup below debug level.

Syslog
------
With ``log_target = "syslog"`` each line goes as one datagram to the
syslog daemon's unix socket (``syslog_socket``, /dev/log), in the form
glibc's syslog(3) sends and Postfix itself therefore uses::

    <PRI>Nov 30 16:20:01 postfix-bridge[PID]: warning: table aliases: ...

PRI is facility * 8 + severity (``syslog_facility``, mail by default,
so the lines land in mail.log beside Postfix's). After the ident comes
the same text as on stderr: the level word and the message. Postfix
writes no level word for its informational lines; the bridge keeps
``info:`` (and ``debug:``, ``critical:``) so that a line reads the same
on stderr and in syslog, and so that ``grep 'postfix-bridge.*warning:'``
works as it does for Postfix. Python's own SysLogHandler is not used: it
sends no timestamp (rsyslog then cannot tell the ident from a host
name), maps lower-case level names to ``warning``, appends a NUL, and
prints a traceback per line while the socket is gone.

When the socket is absent or refuses (no syslog daemon, a container
without /dev/log), a line is written to stderr instead, after one
warning saying so; every line tries the socket again (a connect on a
local socket costs microseconds), so lines go back to syslog as soon
as the daemon is back, e.g. after a restart of rsyslog. A syslog daemon
that does not keep up (its socket's queue full) gets the same treatment
instead of stalling the event loop: the socket never blocks. Forked
workers inherit the handler and log with their own pid.

Rate limiting
-------------
A failing memcache makes every lookup fail the same way: logging each
TEMP answer would flood the log exactly when an admin needs to read it.
:class:`ReasonLog` logs each distinct cause at most once per interval
and says how many were left out in between.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TextIO

#: What follows the ident on every text line, on stderr and in syslog.
_BODY_FORMAT = "%(levelname)s: %(message)s"
_TEXT_FORMAT = "%(asctime)s postfix-bridge[%(process)d]: " + _BODY_FORMAT

#: The ident Postfix's syslog lines would carry for this program.
SYSLOG_IDENT = "postfix-bridge"

#: The values of ``log_target``.
LOG_TARGETS = ("stderr", "syslog")

#: Facility names and codes as syslog.h spells them (the names Postfix's
#: own syslog_facility takes), without the internal "mark" and the
#: "security" alias of auth.
SYSLOG_FACILITIES: Mapping[str, int] = MappingProxyType(
    {
        "auth": 4,
        "authpriv": 10,
        "cron": 9,
        "daemon": 3,
        "ftp": 11,
        "kern": 0,
        "lpr": 6,
        "mail": 2,
        "news": 7,
        "syslog": 5,
        "user": 1,
        "uucp": 8,
        **{f"local{number}": 16 + number for number in range(8)},
    }
)

#: Syslog severities (RFC 5424 section 6.2.1) of the logging levels.
_SEVERITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
_DEBUG_SEVERITY = 7

#: RFC 3164 timestamps use English month abbreviations whatever the locale.
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

#: A distinct failure reason is logged at most once per this many seconds.
REASON_INTERVAL = 60.0


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, message."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class SyslogTarget:
    """Where syslog lines go: a facility name and the syslog daemon's socket file."""

    facility: str
    socket: str


def syslog_severity(levelno: int) -> int:
    """The syslog severity of a logging level (warning = 4, info = 6, ...)."""
    for threshold, severity in _SEVERITIES:
        if levelno >= threshold:
            return severity
    return _DEBUG_SEVERITY


def syslog_timestamp(created: float) -> str:
    """``Mmm dd hh:mm:ss`` in local time, as glibc's syslog(3) writes it (``Nov  3 ...``)."""
    local = time.localtime(created)
    clock = time.strftime("%H:%M:%S", local)
    return f"{_MONTHS[local.tm_mon - 1]} {local.tm_mday:2d} {clock}"


class SyslogHandler(logging.Handler):
    """Send each record as one RFC 3164 datagram to a local syslog socket.

    Falls back to ``fallback`` (the stderr handler) while the socket is
    absent or refuses, with one warning per outage.

    Args:
      facility: a name of :data:`SYSLOG_FACILITIES`.
      address: the syslog daemon's unix datagram socket (/dev/log).
      fallback: where lines go while syslog does not take them.
    """

    def __init__(self, facility: str, address: str, fallback: logging.Handler) -> None:
        super().__init__()
        self._facility = SYSLOG_FACILITIES[facility]
        self._address = address
        self._fallback = fallback
        self._socket: socket.socket | None = None
        self._failing = False
        self._socket_lock = threading.Lock()
        try:
            self._connect()
        except OSError as exc:
            self._unavailable(exc)

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # Never wait for a syslog daemon that does not keep up: the line
        # goes to stderr instead of stalling every lookup of this process.
        sock.setblocking(False)
        try:
            sock.connect(self._address)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        return sock

    def _send(self, datagrams: list[bytes]) -> None:
        """Send on the socket; once more on a fresh connection (syslog restarted)."""
        with self._socket_lock:
            sock = self._socket or self._connect()
            try:
                for datagram in datagrams:
                    sock.send(datagram)
            except OSError:
                sock.close()
                self._socket = None
                sock = self._connect()
                for datagram in datagrams:
                    sock.send(datagram)

    def _unavailable(self, exc: OSError) -> None:
        if self._failing:
            return
        self._failing = True
        reason = exc.strerror or str(exc)
        record = logging.LogRecord(
            "bridge.logs",
            logging.WARNING,
            __file__,
            0,
            "syslog socket %s: %s; logging to stderr until it answers",
            (self._address, reason),
            None,
        )
        self._fallback.handle(record)

    def datagrams(self, record: logging.LogRecord) -> list[bytes]:
        """The datagrams for ``record``: one per line of its text (a traceback has several)."""
        priority = self._facility * 8 + syslog_severity(record.levelno)
        head = f"<{priority}>{syslog_timestamp(record.created)} {SYSLOG_IDENT}[{record.process}]: "
        return [
            (head + line).encode("utf-8", "replace") for line in self.format(record).split("\n")
        ]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            datagrams = self.datagrams(record)
        except Exception:
            self.handleError(record)
            return
        try:
            self._send(datagrams)
        except OSError as exc:
            self._unavailable(exc)
            self._fallback.handle(record)
            return
        self._failing = False

    def close(self) -> None:
        with self._socket_lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None
        super().close()


def setup_logging(
    level: str,
    *,
    log_format: str,
    stream: TextIO | None = None,
    syslog: SyslogTarget | None = None,
) -> None:
    """Configure the root logger once, for the whole process.

    Args:
      level: debug, info, warning, error or critical.
      log_format: "text" (Postfix-like lines) or "json".
      stream: where to write; stderr by default.
      syslog: log to syslog instead; ``stream`` only while the syslog
        socket does not take the lines.
    """
    for number, name in (
        (logging.DEBUG, "debug"),
        (logging.INFO, "info"),
        (logging.WARNING, "warning"),
        (logging.ERROR, "error"),
        (logging.CRITICAL, "critical"),
    ):
        logging.addLevelName(number, name)
    json_format = log_format == "json"
    handler: logging.Handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter(_TEXT_FORMAT))
    if syslog is not None:
        handler = SyslogHandler(syslog.facility, syslog.socket, fallback=handler)
        handler.setFormatter(JsonFormatter() if json_format else logging.Formatter(_BODY_FORMAT))
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, SyslogHandler):
            old.close()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class ReasonLog:
    """Log each distinct failure reason at most once per ``interval`` seconds.

    Args:
      logger: where the lines go.
      interval: seconds between two lines for the same reason.
    """

    def __init__(self, logger: logging.Logger, interval: float = REASON_INTERVAL) -> None:
        self._logger = logger
        self._interval = interval
        # reason -> (when it may be logged again, how many were left out)
        self._seen: dict[str, tuple[float, int]] = {}

    def warning(self, reason: str) -> None:
        now = time.monotonic()
        next_time, left_out = self._seen.get(reason, (0.0, 0))
        if now < next_time:
            self._seen[reason] = (next_time, left_out + 1)
            return
        if len(self._seen) > 1000:
            # Bounded: forget reasons that are due again anyway.
            self._seen = {key: value for key, value in self._seen.items() if value[0] > now}
        self._seen[reason] = (now + self._interval, 0)
        if left_out:
            self._logger.warning(
                "%s (and %d more in the last %.0fs)", reason, left_out, self._interval
            )
        else:
            self._logger.warning("%s", reason)
