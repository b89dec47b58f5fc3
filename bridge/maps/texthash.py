"""``texthash:`` tables: a Postfix source text file, looked up from memory.

Postfix's texthash (dict_thash.c) reads a ``key value`` text file once, at
open, into a hash table (spec TH-1 .. TH-6). The bridge does the same, and
adds one thing Postfix does not have: the file is re-read when it changes,
so an edited backup table takes effect without a restart.

Loading (pure, :func:`parse_texthash`):

* the file is cut into logical lines by the shared reader
  (:func:`bridge.postfix_text.logical_lines`: comments, continuation lines,
  CF-1 .. CF-4, TH-2);
* each line is split into key and value by TH-3; broken lines are skipped
  with a warning naming ``file, line N``;
* with ``fold=True`` the stored keys are case-folded exactly like lookup
  keys (TH-4 bridge note, CASE-2, G-6), see :func:`bridge.keys.fold_table_key`;
* a duplicate key keeps its first value, with a warning (TH-5, postmap's
  "warn" behaviour).

Reloading: a lookup stats the file at most once per
:data:`RELOAD_CHECK_INTERVAL` seconds. The ``stat`` itself runs inline: it
is a single cheap system call on a local file, rate-limited per table. When
the file's identity, size or times changed, the read and parse (which grow
with the file) run in a worker thread, one reload at a time process-wide.
The lookup that noticed the change waits for the new contents; lookups
that arrive meanwhile answer from the old contents instead of queueing. A
failed reload (file gone, unreadable) keeps the old contents and logs once
per change of the file's state.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Final

import trio

from bridge.keys import fold_table_key
from bridge.maps.base import FileState, MapError, OpenOptions, TableType, file_path
from bridge.outcome import NOT_FOUND, Outcome, found_value
from bridge.postfix_text import is_utf8, logical_lines, split_source_line

_log = logging.getLogger("bridge.maps")

#: Seconds between two checks of a texthash file for changes. An edit is
#: seen within about a second, which is what an operator expects, while a
#: busy table still costs at most one ``stat`` per second.
RELOAD_CHECK_INTERVAL = 1.0

#: One reload at a time for the whole process: reloads are rare, and
#: serialising them keeps a burst of edited tables from taking every worker
#: thread away from other blocking work.
_RELOAD_LIMITER = trio.CapacityLimiter(1)


def parse_texthash(
    data: bytes, *, source: str, fold: bool, smtputf8: bool = True
) -> dict[bytes, bytes]:
    """Parse the contents of a texthash file.

    Args:
      data: the whole file.
      source: the file name, for warnings (``source, line N: ...``).
      fold: case-fold stored keys like lookup keys (:func:`bridge.keys.fold_table_key`).
      smtputf8: which folding to use when ``fold`` is true.

    Returns:
      The entries, in file order of each key's first appearance. Lines that
      TH-3 rejects are left out; a repeated key keeps its first value (TH-5).
      Problems are logged as warnings, never raised.
    """
    entries: dict[bytes, bytes] = {}
    for line in logical_lines(data, source=source):
        where = f"{source}, line {line.lineno}"
        split = split_source_line(line.text)
        if isinstance(split, str):
            _log.warning("%s: %s; line ignored", where, split)
            continue
        key, value = split
        if key.endswith(b":"):
            # TH-4: stored as written; Postfix only warns about the mix-up.
            _log.warning('%s: record is in "key: value" format; is this an alias file?', where)
        if fold:
            if smtputf8 and not is_utf8(key):
                _log.warning("%s: key is not valid UTF-8 and can never be looked up", where)
            key = fold_table_key(key, smtputf8=smtputf8)
        if key in entries:
            _log.warning("%s: duplicate entry: %r; the first value is kept", where, key)
            continue
        entries[key] = value
    return entries


@dataclass(frozen=True, slots=True)
class _Snapshot:
    state: FileState
    entries: dict[bytes, bytes]


def _read_snapshot(path: str, *, fold: bool, smtputf8: bool) -> _Snapshot:
    """Read and parse the file (blocking). The state is taken from the open file,
    so an edit that lands after the read is still noticed by the next check."""
    with open(path, "rb") as file:
        state = FileState.of(os.fstat(file.fileno()))
        data = file.read()
    return _Snapshot(state, parse_texthash(data, source=path, fold=fold, smtputf8=smtputf8))


def _current_state(path: str) -> FileState | None:
    try:
        return FileState.of(os.stat(path))
    except OSError:
        return None


class TexthashMap:
    """A ``texthash:`` table (TH-1 .. TH-6), re-read when its file changes.

    Args:
      spec: the table as configured, e.g. ``texthash:/etc/postfix/backup``.
      path: the file to read (already resolved against the config directory).
      fold: case-fold stored keys (backup tables); False keeps them as
        written (domain tables, DOM-6).
      smtputf8: Unicode folding and the G-6 value check when true.

    Raises:
      MapError: if the file cannot be read at open.
    """

    def __init__(self, spec: str, path: str, *, fold: bool, smtputf8: bool = True) -> None:
        self._spec = spec
        self._path = path
        self._fold = fold
        self._smtputf8 = smtputf8
        try:
            snapshot = _read_snapshot(path, fold=fold, smtputf8=smtputf8)
        except OSError as exc:
            raise MapError(f"table {spec}: cannot open {path}: {exc.strerror or exc}") from exc
        self._entries = snapshot.entries
        # The state of the last load attempt, good or bad: a reload happens
        # only when the file differs from it, so a broken file is reported
        # once, not every second.
        self._attempted_state: FileState | None = snapshot.state
        self._next_check = -math.inf
        self._reloading = False

    @property
    def spec(self) -> str:
        """The table as written in the configuration."""
        return self._spec

    @property
    def path(self) -> str:
        """The file the table is read from."""
        return self._path

    async def lookup(self, key: bytes) -> Outcome:
        """Look up ``key`` as given (the caller folds it when the table folds).

        Args:
          key: the lookup key.

        Returns:
          ``Found(value)``, ``NOT_FOUND``, or ``ConfigFailure`` for a value
          that is not UTF-8 under SMTPUTF8 (G-6). Never raises.
        """
        await self._reload_if_changed()
        value = self._entries.get(key)
        if value is None:
            return NOT_FOUND
        return found_value(value, smtputf8=self._smtputf8, source=self._spec)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Iterate over (key, value) in file order (TH-6, for first/next).

        Keys are as stored, i.e. folded when the table folds. The iteration
        works on the contents current when it started, so a reload during
        it cannot disturb it.
        """
        return iter(list(self._entries.items()))

    async def sequence(self) -> AsyncIterator[tuple[bytes, bytes]]:
        """Yield every entry in file order, re-reading a changed file first (MC-20)."""
        await self._reload_if_changed()
        for entry in self.items():
            yield entry

    async def aclose(self) -> None:
        """Nothing to release: the file is closed right after each read."""

    async def _reload_if_changed(self) -> None:
        now = trio.current_time()
        if self._reloading or now < self._next_check:
            return
        self._next_check = now + RELOAD_CHECK_INTERVAL
        state = _current_state(self._path)
        if state == self._attempted_state:
            return
        if state is None:
            self._attempted_state = None
            _log.warning(
                "table %s: cannot stat %s; keeping the previous contents", self._spec, self._path
            )
            return
        self._reloading = True
        try:
            snapshot = await trio.to_thread.run_sync(self._read_in_thread, limiter=_RELOAD_LIMITER)
        except OSError as exc:
            self._attempted_state = state
            _log.warning(
                "table %s: cannot re-read %s: %s; keeping the previous contents",
                self._spec,
                self._path,
                exc.strerror or exc,
            )
            return
        finally:
            self._reloading = False
        self._attempted_state = snapshot.state
        self._entries = snapshot.entries
        _log.info("table %s: re-read %s (%d entries)", self._spec, self._path, len(self._entries))

    def _read_in_thread(self) -> _Snapshot:
        return _read_snapshot(self._path, fold=self._fold, smtputf8=self._smtputf8)


def _check(name: str, options: OpenOptions) -> None:
    file_path("texthash", name, options)


def _open(spec: str, name: str, options: OpenOptions) -> TexthashMap:
    path = file_path("texthash", name, options)
    return TexthashMap(spec, path, fold=options.fold, smtputf8=options.smtputf8)


#: ``texthash:`` in the registry: stored keys folded when ``options.fold``
#: (TH-4); read-only by design (TH-1).
TABLE_TYPE: Final = TableType(
    "texthash", _check, _open, summary="a 'key value' text file, re-read when it changes"
)
