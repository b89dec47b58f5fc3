"""Bulk load of a Postfix source file into a table: ``postfix-bridge load``.

Theory of operation
-------------------
The input is the ``postmap`` source format: ``key whitespace value``
logical lines, ``#`` comments, continuation lines (spec CF-1..CF-4,
TH-3). Entries are handed to :meth:`bridge.table.Table.update_batch` in
batches: each batch is one backup transaction (durable when it returns)
and one pipelined memcache exchange, so a load runs at memcache's pace
rather than one round trip per key.

As postmap does, a key that appears twice keeps its first value (with a
warning). A malformed line is reported with ``file:line`` and counted as
failed; it stops nothing: what was committed stays committed and the rest
of the file is still loaded. With ``replace``, backup entries absent from
the file are deleted afterwards (from memcache too).

Error handling
--------------
Every problem is reported, none raises: the :class:`LoadReport` counts
loaded, skipped, failed and deleted entries and tells whether a failure
was temporary (exit status 75) or not (1).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

from bridge.outcome import Retry, Written
from bridge.postfix_text import logical_lines, split_source_line
from bridge.table import NoSequence, Table

_log = logging.getLogger("bridge.load")

#: Entries per backup transaction and memcache exchange. Large enough that
#: per-batch costs (an fsync, a round trip) vanish per entry; small enough
#: that a batch's pipelined sets stay well inside memcache's buffers and a
#: killed load loses little.
DEFAULT_BATCH_SIZE = 5000

#: The progress bar is redrawn at most this often (seconds).
_PROGRESS_INTERVAL = 0.1


@dataclass(frozen=True, slots=True)
class SourceEntry:
    lineno: int
    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class SourceProblem:
    lineno: int
    message: str


def read_source(data: bytes, *, source: str) -> Iterator[SourceEntry | SourceProblem]:
    """The entries of a postmap source file, and its unusable lines, in file order."""
    for line in logical_lines(data, source=source):
        split = split_source_line(line.text)
        if isinstance(split, str):
            yield SourceProblem(line.lineno, split)
        else:
            yield SourceEntry(line.lineno, *split)


@dataclass(slots=True)
class LoadReport:
    loaded: int = 0
    skipped: int = 0
    failed: int = 0
    deleted: int = 0
    #: written to the backup but not to memcache
    memcache_failed: int = 0
    temporary: bool = False
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rate = self.loaded / self.seconds if self.seconds > 0 else 0.0
        text = (
            f"loaded {self.loaded}, skipped {self.skipped}, failed {self.failed}"
            f", deleted {self.deleted} in {self.seconds:.2f}s ({rate:,.0f}/s)"
        )
        if self.memcache_failed:
            text += f"; {self.memcache_failed} not in memcache (lookups refill from the backup)"
        return text


Progress = Callable[[int, int], None]


async def load_entries(
    table: Table,
    data: bytes,
    *,
    source: str,
    replace: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> LoadReport:
    """Load a postmap source file into ``table``.

    Args:
      table: a writable table.
      data: the whole source file.
      source: its name, for ``file:line`` messages.
      replace: delete backup entries that the file does not hold.
      batch_size: entries per transaction and memcache exchange.
      progress: called with (entries done, entries in all) after each batch.

    Returns:
      The counts and problems.
    """
    started = time.monotonic()
    report = LoadReport()
    entries: list[SourceEntry] = []
    first_line: dict[bytes, int] = {}
    for item in read_source(data, source=source):
        if isinstance(item, SourceProblem):
            report.failed += 1
            report.problems.append(f"{source}:{item.lineno}: {item.message}")
            continue
        normalized = table.normalize_key(item.key)
        identity = normalized if isinstance(normalized, bytes) else item.key
        if identity in first_line:
            report.skipped += 1
            report.problems.append(
                f"{source}:{item.lineno}: duplicate key {item.key!r} "
                f"(first at line {first_line[identity]}); the first value is kept"
            )
            continue
        first_line[identity] = item.lineno
        entries.append(item)
    total = len(entries)
    for start in range(0, total, batch_size):
        batch = entries[start : start + batch_size]
        result = await table.update_batch([(e.key, e.value) for e in batch])
        report.loaded += result.written
        report.skipped += result.skipped
        report.failed += result.failed
        report.memcache_failed += result.memcache_failed
        report.temporary |= result.temporary
        report.problems.extend(f"{source}: {problem}" for problem in result.problems)
        if result.written:
            _log.info(
                "table %s: committed %s lines %d-%d (%d entries)",
                table.name,
                source,
                batch[0].lineno,
                batch[-1].lineno,
                result.written,
            )
        if progress is not None:
            progress(min(start + batch_size, total), total)
    if replace:
        await _delete_absent(table, set(first_line), report)
    report.seconds = time.monotonic() - started
    return report


async def _delete_absent(table: Table, present: set[bytes], report: LoadReport) -> None:
    """``--replace``: delete every backup entry the source file did not hold."""
    try:
        absent = [key async for key, _ in table.sequence() if key not in present]
    except NoSequence as exc:
        report.failed += 1
        report.problems.append(f"--replace: {exc}")
        return
    for key in absent:
        outcome = await table.delete(key)
        if isinstance(outcome, Written):
            report.deleted += 1
        elif isinstance(outcome, Retry):
            report.failed += 1
            report.temporary = True
            report.problems.append(f"--replace: deleting {key!r}: {outcome.reason}")


class ProgressBar:
    """A one-line progress bar with rate and ETA, for terminals."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self._stream = stream
        self._width = width
        self._started = time.monotonic()
        self._drawn = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._drawn < _PROGRESS_INTERVAL:
            return
        self._drawn = now
        elapsed = max(now - self._started, 1e-9)
        rate = done / elapsed
        fraction = done / total if total else 1.0
        filled = math.floor(fraction * self._width)
        eta = (total - done) / rate if rate > 0 else 0.0
        bar = "#" * filled + "." * (self._width - filled)
        self._stream.write(f"\r[{bar}] {fraction:4.0%} {done}/{total} {rate:,.0f}/s ETA {eta:.0f}s")
        if done >= total:
            self._stream.write("\n")
        self._stream.flush()
