"""``lmdb:`` tables: Postfix's own LMDB files, read and written in place.

A Postfix ``lmdb:/path/name`` table is the single file ``/path/name.lmdb``
in LMDB's "no subdirectory" mode, with only the unnamed default database
(spec LM-1). This module reads and writes such files so that Postfix's
``postmap`` and the bridge can share one file at the same time, both ways.

Locking (LM-2). Postfix opens the environment with LMDB's own lock file
turned off and serialises processes itself, with POSIX ``fcntl`` locks on
the ``.lmdb`` file: shared around each read, exclusive around each write.
The bridge takes the same locks, so neither side ever reads pages the other
is rewriting. Two properties of POSIX locks shape the code:

* they belong to the (process, file) pair, so two threads of one process
  never exclude each other, and
* closing *any* descriptor of the file drops *all* of the process's locks
  on it.

Hence each file is opened once per process (:class:`_SharedFile`, in a
module-level registry keyed by real path): one LMDB environment, one lock
descriptor, and one ``trio.CapacityLimiter(1)`` through which every piece
of blocking LMDB work for that file runs (``trio.to_thread.run_sync``), so
lock and unlock of different tasks never interleave. Several
:class:`LmdbMap` objects on one file share that state; what is per object
is only the NUL-form decision below.

Transactions. Every lookup, write and sequence batch uses its own short
transaction under its own lock, as Postfix's slmdb does with external
locks. A new read transaction sees the newest commit of any process, so
writes by ``postmap`` or the bridge's CLI are seen on the next lookup
without a restart. Writes commit with LMDB's default synchronous flush, so
a write that returned ``WRITTEN`` survives a crash.

Map size (LM-3). The memory map starts at Postfix's default 16 MiB, or the
file's size if that is larger. A write that fills it doubles the map and
runs the whole transaction again; a reader or writer that finds the file
grown by another process adopts the new size and retries.

NUL forms (LM-4 .. LM-8). Postfix writes keys and values with one trailing
NUL by default, but files without it exist (``postmap -n``, other tools).
An open table tries ``key + NUL`` first, then ``key``; the first hit
decides the form for the rest of that open table, and writes use the
decided form (NUL while undecided). Values are returned cut at the first
NUL, like the C strings Postfix hands around.

Errors never escape a lookup: an LMDB or lock failure is ``Retry`` with the
reason (never ``NOT_FOUND``, which would bounce mail).
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, TypeVar

import lmdb
import trio

from bridge.maps.base import MapError, OpenOptions, TableType, always_writable, file_path
from bridge.outcome import (
    NOT_FOUND,
    WRITTEN,
    ConfigFailure,
    NotWritten,
    Outcome,
    Retry,
    WriteOutcome,
    found_value,
)

__all__ = [
    "DEFAULT_MAP_SIZE",
    "LMDB_SUFFIX",
    "LOCK_TIMEOUT",
    "LmdbMap",
]

#: Postfix appends this to the table name to get the file name (LM-1).
LMDB_SUFFIX: Final = ".lmdb"

#: Postfix's ``lmdb_map_size`` default (LM-3). Starting where Postfix
#: starts keeps the two sides' map sizes in step for ordinary tables.
DEFAULT_MAP_SIZE: Final = 16 * 1024 * 1024

#: Seconds to wait for the file lock before a lookup or write gives up
#: with Retry. Postfix waits forever, but a worker thread stuck behind a
#: long ``postmap`` bulk load would hold every lookup of the file hostage;
#: a temporary failure after a bounded wait only defers mail (G-5).
LOCK_TIMEOUT: Final = 10.0

#: Entries read per read transaction by :meth:`LmdbMap.sequence`. The
#: shared lock is released between batches (as Postfix's cursor does
#: between steps), so a long listing cannot block writers for long, while
#: batching keeps the per-entry cost of a thread hop and a lock low.
SEQUENCE_BATCH: Final = 1000

#: Times a transaction is retried after "map full" or "map resized".
#: Doubling from 16 MiB, 30 growths pass any address space there is; the
#: bound only stops a pathological loop (slmdb's per-call limit is also 30).
MAX_RECOVERIES: Final = 30

#: The file mode of a newly created table: what ``postmap`` uses.
NEW_FILE_MODE: Final = 0o644

# First and longest pause while polling for a busy lock. Commits take a
# few milliseconds (one fsync), so short pauses keep waits close to the
# holder's real hold time; the cap keeps a long wait from spinning.
_LOCK_POLL_FIRST = 0.0005
_LOCK_POLL_MAX = 0.02

_NUL = b"\0"

_T = TypeVar("_T")
_U = TypeVar("_U")


class _LockTimeout(Exception):
    """The file lock stayed busy for longer than the table's lock timeout."""


class _Form(enum.Enum):
    """Which key form an open table uses (LM-5): Postfix's TRY1NULL/TRY0NULL."""

    UNDECIDED = enum.auto()
    NUL = enum.auto()
    PLAIN = enum.auto()


@dataclass(frozen=True, slots=True)
class _Rejected:
    """A write refused before any change: the item can never be stored."""

    reason: str


def _cut_at_nul(data: bytes) -> bytes:
    """The C string Postfix sees: everything before the first NUL (LM-5, LM-8)."""
    return data.partition(_NUL)[0]


def _candidates(key: bytes, form: _Form) -> list[tuple[bytes, _Form]]:
    """The stored keys to try for ``key``, in Postfix's order (LM-5, LM-7).

    An empty plain key is left out: LMDB cannot store a zero-length key, so
    it can never be present.
    """
    tries: list[tuple[bytes, _Form]] = []
    if form is not _Form.PLAIN:
        tries.append((key + _NUL, _Form.NUL))
    if form is not _Form.NUL and key:
        tries.append((key, _Form.PLAIN))
    return tries


def _lock_wait(fd: int, operation: int, timeout: float) -> None:
    """Take an fcntl lock, polling until ``timeout`` seconds have passed.

    Raises:
      _LockTimeout: the lock stayed busy.
      OSError: the lock cannot be taken at all (e.g. no locking on the file system).
    """
    deadline = time.monotonic() + timeout
    pause = _LOCK_POLL_FIRST
    while True:
        try:
            fcntl.lockf(fd, operation | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
        else:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _LockTimeout(f"lock wait timed out after {timeout:g} s")
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, _LOCK_POLL_MAX)


@contextmanager
def _file_lock(fd: int, *, exclusive: bool, timeout: float) -> Iterator[None]:
    """Hold Postfix's whole-file fcntl lock (LM-2): exclusive to write, shared to read."""
    _lock_wait(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, timeout)
    try:
        yield
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN)


def _open_environment(path: str, *, writable: bool, lock_fd: int) -> lmdb.Environment:
    """Open the LMDB environment like Postfix does (LM-1 .. LM-3)."""
    size = max(DEFAULT_MAP_SIZE, os.fstat(lock_fd).st_size)
    return lmdb.Environment(
        path,
        map_size=size,
        subdir=False,
        readonly=not writable,
        lock=False,
        create=writable,
        mode=NEW_FILE_MODE,
        max_dbs=0,
    )


class _SharedFile:
    """One ``.lmdb`` file as this process has it open: environment, lock fd, limiter.

    Owned by the registry; each :class:`LmdbMap` holds a reference. Every
    method that touches the environment or the lock descriptor runs with
    :attr:`mutex` held, in a worker thread admitted by :attr:`limiter`.
    """

    def __init__(self, path: str, *, writable: bool, lock_fd: int) -> None:
        self.path = path
        self.writable = writable
        self.lock_fd = lock_fd
        self.users = 0
        # Admits one worker thread at a time for this file: the trio side
        # of the serialisation, so waiting tasks queue in trio, not in threads.
        self.limiter = trio.CapacityLimiter(1)
        # The thread side: also guards the rare upgrade to a writable
        # environment, which happens outside any worker thread.
        self.mutex = threading.Lock()
        self.env = self._open_env_locked()

    def _open_env_locked(self) -> lmdb.Environment:
        # Creating a file writes its first meta pages: keep readers out.
        with _file_lock(self.lock_fd, exclusive=self.writable, timeout=LOCK_TIMEOUT):
            return _open_environment(self.path, writable=self.writable, lock_fd=self.lock_fd)

    def upgrade_to_writable(self) -> None:
        """Reopen read-write for a writable opener of a file open read-only."""
        with self.mutex:
            if self.writable:
                return
            new_fd = _open_lock_fd(self.path, writable=True)
            # No lock is held under the mutex, so closing the old descriptor
            # (which drops this process's locks) loses nothing.
            self.env.close()
            os.close(self.lock_fd)
            self.lock_fd = new_fd
            self.writable = True
            try:
                self.env = self._open_env_locked()
            except BaseException:
                # Keep serving the read-only users that were here first.
                self.writable = False
                self.env = self._open_env_locked()
                raise

    def close(self) -> None:
        with self.mutex:
            self.env.close()
            os.close(self.lock_fd)

    def begin(self, *, write: bool) -> lmdb.Transaction[bytes]:
        """Start a transaction, adopting a map grown by another process (LM-3)."""
        for _ in range(MAX_RECOVERIES):
            try:
                return self.env.begin(write=write)
            except lmdb.MapResizedError:
                # Size 0 makes LMDB take the size the other writer recorded.
                self.env.set_mapsize(0)
        return self.env.begin(write=write)

    def grow(self) -> None:
        """Double the map after "map full" (LM-3); only with no transaction open."""
        self.env.set_mapsize(self.env.info()["map_size"] * 2)


_registry: dict[str, _SharedFile] = {}
_registry_lock = threading.Lock()


def _open_lock_fd(path: str, *, writable: bool) -> int:
    # O_CLOEXEC: a child process must not inherit the descriptor, or its
    # exit would close a descriptor of the file and drop our locks.
    flags = (os.O_RDWR | os.O_CREAT if writable else os.O_RDONLY) | os.O_CLOEXEC
    return os.open(path, flags, NEW_FILE_MODE)


def _acquire(path: str, *, writable: bool) -> _SharedFile:
    """The shared state for ``path``, opened (or upgraded) as needed.

    Raises:
      OSError, lmdb.Error, _LockTimeout: the file cannot be opened.
    """
    with _registry_lock:
        real = os.path.realpath(path)
        shared = _registry.get(real)
        if shared is None:
            lock_fd = _open_lock_fd(real, writable=writable)
            try:
                shared = _SharedFile(real, writable=writable, lock_fd=lock_fd)
            except BaseException:
                os.close(lock_fd)
                raise
            _registry[real] = shared
        elif writable and not shared.writable:
            shared.upgrade_to_writable()
        shared.users += 1
        return shared


def _release(shared: _SharedFile) -> None:
    """Drop one reference; the last one closes the environment and the descriptor."""
    with _registry_lock:
        shared.users -= 1
        if shared.users == 0:
            # Closed under the registry lock: the binding refuses a second
            # environment on a file that is still open in this process.
            del _registry[shared.path]
            shared.close()


def _reason(exc: BaseException, file: str) -> str:
    """The error text for a message that already names ``file``."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    # The binding's messages start with the file name; say it only once.
    return str(exc).removeprefix(f"{file}: ") or type(exc).__name__


class LmdbMap:
    """An ``lmdb:`` table (LM-1 .. LM-8), shared safely with Postfix's own tools.

    Keys are used exactly as given: the caller folds them when the table
    folds (CASE-2), the way ``postmap`` folds keys when it creates a table.

    Args:
      spec: the table as configured, e.g. ``lmdb:/etc/postfix/backup``.
      path: the table name resolved against the configuration directory,
        *without* the ``.lmdb`` suffix (LM-1 adds it).
      writable: open read-write, creating a missing file (like ``postmap``);
        otherwise read-only (LMDB read-only mode), lookups and sequence only.
      smtputf8: apply the G-6 UTF-8 value check to lookups.
      lock_timeout: seconds to wait for the file lock before answering Retry.

    Raises:
      MapError: the file cannot be opened; the message names the file.
    """

    def __init__(
        self,
        spec: str,
        path: str,
        *,
        writable: bool = False,
        smtputf8: bool = True,
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        self._spec = spec
        self._file = path + LMDB_SUFFIX
        self._writable = writable
        self._smtputf8 = smtputf8
        self._lock_timeout = lock_timeout
        self._form = _Form.UNDECIDED
        try:
            self._shared: _SharedFile | None = _acquire(self._file, writable=writable)
        except (OSError, lmdb.Error, _LockTimeout) as exc:
            raise MapError(
                f"table {spec}: cannot open {self._file}: {_reason(exc, self._file)}"
            ) from exc

    @property
    def spec(self) -> str:
        """The table as written in the configuration."""
        return self._spec

    @property
    def file(self) -> str:
        """The ``.lmdb`` file the table lives in."""
        return self._file

    @property
    def writable(self) -> bool:
        """Whether update, update_many and delete are allowed."""
        return self._writable

    # ------------------------------------------------------------ lookups

    async def lookup(self, key: bytes) -> Outcome:
        """Look up ``key`` as given, NUL form first, then plain (LM-5).

        Args:
          key: the lookup key (already folded by the caller where due).

        Returns:
          ``Found(value)`` with the value cut at its first NUL, ``NOT_FOUND``,
          ``Retry`` for any LMDB or lock failure, or ``ConfigFailure`` for a
          non-UTF-8 value under SMTPUTF8 (G-6). Never raises.
        """
        result = await self._run(self._lookup_in_thread, key)
        if isinstance(result, Retry):
            return result
        if result is None:
            return NOT_FOUND
        return found_value(result, smtputf8=self._smtputf8, source=self._spec)

    def _lookup_in_thread(self, shared: _SharedFile, key: bytes) -> bytes | None:
        with _file_lock(shared.lock_fd, exclusive=False, timeout=self._lock_timeout):
            txn = shared.begin(write=False)
            try:
                for stored_key, form in _candidates(key, self._form):
                    if len(stored_key) > shared.env.max_key_size():
                        continue  # LMDB cannot hold it, so it is not there.
                    value = txn.get(stored_key)
                    if value is not None:
                        self._form = form  # LM-5: the first hit decides.
                        return _cut_at_nul(value)
                return None
            finally:
                txn.abort()

    # ----------------------------------------------------------- sequence

    async def sequence(self) -> AsyncIterator[tuple[bytes, bytes]]:
        """Yield every (key, value) in LMDB byte order (LM-1, LM-8, MC-20).

        Keys and values are cut at their first NUL, which removes the
        trailing NUL of Postfix's default form. Entries are read in batches,
        each in its own read transaction, so the listing continues after
        changes made meanwhile (each key still comes at most once).

        Raises:
          MapError: the file cannot be read, or the table is closed.
        """
        after: bytes | None = None
        while True:
            batch = await self._run(self._batch_in_thread, after)
            if isinstance(batch, Retry):
                raise MapError(f"table {self._spec}: cannot list {self._file}: {batch.reason}")
            for stored_key, value in batch:
                yield _cut_at_nul(stored_key), _cut_at_nul(value)
            if len(batch) < SEQUENCE_BATCH:
                return
            after = batch[-1][0]

    def _batch_in_thread(
        self, shared: _SharedFile, after: bytes | None
    ) -> list[tuple[bytes, bytes]]:
        """Up to SEQUENCE_BATCH raw entries following the stored key ``after``."""
        with _file_lock(shared.lock_fd, exclusive=False, timeout=self._lock_timeout):
            txn = shared.begin(write=False)
            try:
                cursor = txn.cursor()
                positioned = cursor.first() if after is None else cursor.set_range(after)
                if positioned and after is not None and cursor.key() == after:
                    positioned = cursor.next()
                batch: list[tuple[bytes, bytes]] = []
                while positioned and len(batch) < SEQUENCE_BATCH:
                    batch.append(cursor.item())
                    positioned = cursor.next()
                return batch
            finally:
                txn.abort()

    # ------------------------------------------------------------- writes

    async def update(self, key: bytes, value: bytes) -> WriteOutcome:
        """Store ``value`` under ``key``, replacing any old value (LM-6, PX-3).

        Args:
          key: the key as given (the caller folds where due).
          value: the value.

        Returns:
          ``WRITTEN`` once committed (durable), ``NotWritten`` for a key LMDB
          cannot hold, ``Retry`` for LMDB or lock trouble, ``ConfigFailure``
          when the table is read-only.
        """
        return await self.update_many([(key, value)])

    async def update_many(self, items: Sequence[tuple[bytes, bytes]]) -> WriteOutcome:
        """Store many entries in ONE write transaction: all of them, or none.

        Args:
          items: (key, value) pairs; a later pair for the same key wins.

        Returns:
          ``WRITTEN`` once all are committed (durable); ``NotWritten`` naming
          the first key LMDB cannot hold, with nothing written; ``Retry``
          for LMDB or lock trouble (nothing written); ``ConfigFailure`` when
          the table is read-only.
        """
        if not self._writable:
            return self._read_only()
        if not items:
            return WRITTEN
        result = await self._run(self._write_in_thread, items)
        if isinstance(result, _Rejected):
            return NotWritten(result.reason)
        return result

    def _write_in_thread(
        self, shared: _SharedFile, items: Sequence[tuple[bytes, bytes]]
    ) -> WriteOutcome | _Rejected:
        # LM-6: NUL form unless this table already settled on plain keys.
        form = _Form.PLAIN if self._form is _Form.PLAIN else _Form.NUL
        suffix = _NUL if form is _Form.NUL else b""
        stored = [(key + suffix, value + suffix) for key, value in items]
        max_key = shared.env.max_key_size()
        for stored_key, _ in stored:
            if not stored_key or len(stored_key) > max_key:
                return _Rejected(
                    f"key of {len(stored_key)} bytes cannot be stored in lmdb "
                    f"(1 to {max_key} bytes): {stored_key[:40]!r}"
                )
        with _file_lock(shared.lock_fd, exclusive=True, timeout=self._lock_timeout):
            for _ in range(MAX_RECOVERIES):
                txn = shared.begin(write=True)
                try:
                    for stored_key, stored_value in stored:
                        txn.put(stored_key, stored_value)
                    txn.commit()
                except lmdb.MapFullError:
                    txn.abort()
                    shared.grow()  # LM-3, then run the whole transaction again.
                    continue
                except BaseException:
                    txn.abort()
                    raise
                self._form = form
                return WRITTEN
        return Retry(f"table {self._spec}: {self._file}: map still full after growing it")

    async def delete(self, key: bytes) -> WriteOutcome:
        """Remove ``key``, trying the NUL form first, then plain (LM-7).

        Args:
          key: the key as given.

        Returns:
          ``WRITTEN`` once the removal is committed, ``NotWritten("not found")``
          when neither form is present, ``Retry`` for LMDB or lock trouble,
          ``ConfigFailure`` when the table is read-only.
        """
        if not self._writable:
            return self._read_only()
        return await self._run(self._delete_in_thread, key)

    def _delete_in_thread(self, shared: _SharedFile, key: bytes) -> WriteOutcome:
        with _file_lock(shared.lock_fd, exclusive=True, timeout=self._lock_timeout):
            txn = shared.begin(write=True)
            try:
                for stored_key, form in _candidates(key, self._form):
                    if len(stored_key) <= shared.env.max_key_size() and txn.delete(stored_key):
                        txn.commit()
                        self._form = form  # LM-7: same stickiness as lookups.
                        return WRITTEN
            except BaseException:
                txn.abort()
                raise
            txn.abort()
            return NotWritten("not found")

    def _read_only(self) -> ConfigFailure:
        return ConfigFailure(f"table {self._spec} is open read-only: writing needs writable = true")

    # ------------------------------------------------------------ plumbing

    async def _run(self, work: Callable[[_SharedFile, _T], _U], argument: _T) -> _U | Retry:
        """Run ``work`` in this file's worker slot; LMDB and lock errors become Retry."""
        shared = self._shared
        if shared is None:
            return Retry(f"table {self._spec} is closed")

        def guarded() -> _U | Retry:
            with shared.mutex:
                try:
                    return work(shared, argument)
                except (lmdb.Error, OSError, _LockTimeout) as exc:
                    return Retry(f"table {self._spec}: {self._file}: {_reason(exc, shared.path)}")

        return await trio.to_thread.run_sync(guarded, limiter=shared.limiter)

    async def aclose(self) -> None:
        """Release this table's share of the file; the last one closes it. Idempotent."""
        shared, self._shared = self._shared, None
        if shared is not None:
            await trio.to_thread.run_sync(_release, shared, limiter=shared.limiter)


def _check(name: str, options: OpenOptions) -> None:
    file_path("lmdb", name, options)


def _open(spec: str, name: str, options: OpenOptions) -> LmdbMap:
    path = file_path("lmdb", name, options)
    return LmdbMap(spec, path, writable=options.writable, smtputf8=options.smtputf8)


#: ``lmdb:`` in the registry: keys used as given (the caller folds, as
#: postmap folds when it builds the file, LM-4); writable like Postfix's.
TABLE_TYPE: Final = TableType(
    "lmdb",
    _check,
    _open,
    writable=always_writable,
    summary="a Postfix .lmdb file (name without the suffix)",
)
