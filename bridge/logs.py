"""Logging set-up: Postfix-like text lines or JSON, and rate-limited failure reasons.

Theory of operation
-------------------
One line per event. The text format reads like Postfix's own logs
(``postfix-bridge[PID]: warning: table aliases: memcache inet:...:
timeout after 2s``); ``--log-format json`` writes one JSON object per
line for log shippers. Nothing is logged per lookup below debug level.

A failing memcache makes every lookup fail the same way: logging each
TEMP answer would flood the log exactly when an admin needs to read it.
:class:`ReasonLog` logs each distinct cause at most once per interval
and says how many were left out in between.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

_TEXT_FORMAT = "%(asctime)s postfix-bridge[%(process)d]: %(levelname)s: %(message)s"

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


def setup_logging(level: str, *, log_format: str, stream: TextIO | None = None) -> None:
    """Configure the root logger once, for the whole process.

    Args:
      level: debug, info, warning, error or critical.
      log_format: "text" (Postfix-like lines) or "json".
      stream: where to write; stderr by default.
    """
    for number, name in (
        (logging.DEBUG, "debug"),
        (logging.INFO, "info"),
        (logging.WARNING, "warning"),
        (logging.ERROR, "error"),
        (logging.CRITICAL, "critical"),
    ):
        logging.addLevelName(number, name)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT)
    )
    root = logging.getLogger()
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
