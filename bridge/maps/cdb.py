"""``cdb:`` tables: Postfix's constant database files, read in place.

A Postfix ``cdb:/path/name`` table is the file ``/path/name.cdb`` in D. J.
Bernstein's cdb format (32-bit offsets), built in one go by ``postmap
cdb:/path/name`` and never changed afterwards (CDB-1, CDB-3). The bridge
reads such files with the ``pure-cdb`` library (``cdblib``) and never
writes them: a cdb table is read-only, so ``writable = true`` with a cdb
backup is a configuration error, and a file missing or broken at open is
one too (CDB-4).

Theory of operation
-------------------
Key forms (CDB-1). ``postmap`` writes keys and values without a trailing
NUL (``postmap -N`` adds one). An open table that has not had a hit yet
tries each key with a trailing NUL first, then without, in Postfix's own
order; the first hit settles the form for the rest of that open file.
Values are cut at their first NUL, like the C strings Postfix hands
around, and go through the G-6 UTF-8 check. Keys are used exactly as
given: the caller folds them, as ``postmap`` folded the keys it stored.

Rebuilds (CDB-2). ``postmap`` writes ``name.cdb.tmp`` and renames it over
``name.cdb``; readers take no lock. A lookup checks the file at most once
per :data:`RELOAD_CHECK_INTERVAL` seconds and opens the new file when the
name points at another inode (or the same inode changed size or times,
which catches tools that rewrite the file in place). Lookups that arrive
while the new file is being opened keep answering from the old one, whose
descriptor stays open until the last lookup using it is done; the new
file starts undecided about its key form, as a freshly started Postfix
daemon does. A new file that cannot be opened (gone, unreadable, not a
cdb file) leaves the old one in service, with one warning per change of
the file.

Listing (CDB-3). :meth:`CdbMap.sequence` yields every record in file
order, keys and values cut at NUL, as Postfix 3.12 does with tinycdb;
Postfix 3.7 refuses to list cdb tables, but reading the entries changes
nothing, and the CLI's ``dump`` is useful. A record whose key appears
twice is listed twice; a lookup finds the first.

Blocking. A lookup in a page-cached file costs under ten microseconds,
less than a tenth of a trip through a worker thread (``trio.to_thread``,
about 100 us on the same machine), and backup lookups are on the path of
every memcache miss: a thread per lookup would be the larger cost. But a
read can block: on a page that is not cached, on a slow disk, or forever
on a network file system whose server is gone, and a blocked event loop
stops every table. So the file is read with ``pread`` (never ``mmap``:
a file truncated in place would kill the daemon with SIGBUS) and each
lookup first runs on the event loop with ``RWF_NOWAIT`` reads, which the
kernel answers from the page cache or refuses at once. A refused read (a
page not cached, or a file system without ``RWF_NOWAIT``, after which the
file always goes to the thread) moves the lookup to a worker thread, at
most :data:`THREADS_PER_TABLE` at a time per table, bounded by
:data:`READ_TIMEOUT`: a file that does not answer in time gives
``Retry(timeout=True)`` and its thread is abandoned. The once-a-second
``stat``, opening a new file and listing run in the worker threads too.

Error handling
--------------
Nothing escapes a lookup: a read error, a short read or a malformed record
is ``Retry`` naming the file (Postfix's cdb reader exits with a fatal error
instead, and its master restarts the process; a wrong "not found" would
bounce mail). :meth:`CdbMap.sequence` raises :class:`MapError` instead.
One limit is cdblib's: its probe loop ends at an empty hash slot, which
every cdb writer leaves; a hand-crafted file without one would make a
lookup of a missing key loop for ever. Whoever can write the file decides
every answer anyway.
"""

from __future__ import annotations

import enum
import errno
import logging
import math
import os
import struct
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from itertools import islice
from typing import Final, TypeVar

import cdblib
import trio

from bridge.maps.base import BackendHealth, FileState, MapError, OpenOptions, TableType, file_path
from bridge.outcome import NOT_FOUND, Outcome, Retry, found_value

__all__ = [
    "CDB_SUFFIX",
    "READ_TIMEOUT",
    "RELOAD_CHECK_INTERVAL",
    "THREADS_PER_TABLE",
    "CdbMap",
]

_log = logging.getLogger("bridge.maps")

#: Postfix appends this to the table name to get the file name (CDB-1).
CDB_SUFFIX: Final = ".cdb"

#: Seconds between two checks of the file for a rebuild (CDB-2), as for
#: texthash: a rebuild is seen within about a second, and a busy table
#: costs at most one ``stat`` per second.
RELOAD_CHECK_INTERVAL: Final = 1.0

#: Seconds a read in a worker thread may take before the lookup answers
#: ``Retry(timeout=True)``: a chained lookup server's limit, so that a
#: hung file system defers mail in seconds instead of holding Postfix.
READ_TIMEOUT: Final = 10.0

#: Worker threads one table may use at a time: enough for a few reads of
#: uncached pages to wait for the disk together, few enough that a hung
#: file system ties up only these (lookups beyond them wait in trio).
THREADS_PER_TABLE: Final = 4

#: Records read per worker-thread trip by :meth:`CdbMap.sequence`.
SEQUENCE_BATCH: Final = 1000

# The cdb header: 256 (position, length) pairs of 32-bit little-endian
# numbers, the index of the hash tables. Every cdb file starts with it.
_HEADER_SIZE: Final = 256 * 8

_NUL: Final = b"\0"

# RWF_NOWAIT is Linux's (4.14 and later); elsewhere every read goes to a thread.
_RWF_NOWAIT: Final[int | None] = getattr(os, "RWF_NOWAIT", None)

_T = TypeVar("_T")


class _WouldBlock(Exception):
    """A read that cannot be answered from the page cache at once."""


class _Damaged(Exception):
    """The file is shorter than its own index says, or not a cdb file."""


#: What reading a damaged, truncated or unreadable file can raise: cdblib
#: unpacks short reads with ``struct``, and ``pread`` fails with OSError.
_READ_ERRORS: Final = (OSError, ValueError, struct.error, _Damaged)


class _Form(enum.Enum):
    """Which key form an open file uses (CDB-1): Postfix's TRY1NULL/TRY0NULL."""

    UNDECIDED = enum.auto()
    NUL = enum.auto()
    PLAIN = enum.auto()


def _cut_at_nul(data: bytes) -> bytes:
    """The C string Postfix sees: everything before the first NUL (CDB-1)."""
    return data.partition(_NUL)[0]


def _candidates(key: bytes, form: _Form) -> list[tuple[bytes, _Form]]:
    """The stored keys to try for ``key``, in Postfix's order (CDB-1)."""
    tries: list[tuple[bytes, _Form]] = []
    if form is not _Form.PLAIN:
        tries.append((key + _NUL, _Form.NUL))
    if form is not _Form.NUL:
        tries.append((key, _Form.PLAIN))
    return tries


def _read_header(fd: int) -> tuple[FileState, bytes]:
    """The identity and the header of an open file (blocking).

    Raises:
      OSError, _Damaged: the file cannot be read or is too short for a cdb file.
    """
    state = FileState.of(os.fstat(fd))
    if state.size < _HEADER_SIZE:
        raise _Damaged(
            f"not a cdb file: {state.size} bytes, less than the {_HEADER_SIZE}-byte header"
        )
    header = os.pread(fd, _HEADER_SIZE, 0)
    if len(header) < _HEADER_SIZE:
        raise _Damaged("not a cdb file: the header is cut short")
    return state, header


class _Descriptor:
    """An open descriptor of one version of the file, with its size and header.

    Raises:
      OSError, _Damaged: the file cannot be opened or is not a cdb file.
    """

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.state, self.header = _read_header(self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        self.size = self.state.size
        # False once the file system refused RWF_NOWAIT: threads only.
        self.nowait_works = _RWF_NOWAIT is not None

    def read(self, offset: int, length: int) -> bytes:
        """Read, waiting for the disk if need be (worker threads only)."""
        return os.pread(self.fd, length, offset)

    def read_nowait(self, offset: int, length: int) -> bytes:
        """Read from the page cache only; :class:`_WouldBlock` when it cannot."""
        if _RWF_NOWAIT is None or not self.nowait_works:
            raise _WouldBlock
        buffer = bytearray(length)
        try:
            count = os.preadv(self.fd, [buffer], offset, _RWF_NOWAIT)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                raise _WouldBlock from None
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self.nowait_works = False  # this file system: threads from now on
                raise _WouldBlock from None
            raise
        if count < length and offset + count < self.size:
            raise _WouldBlock  # partly cached: the rest needs the disk
        return bytes(buffer[:count])


class _FileBytes:
    """The file as cdblib's reader reads it: ``len()`` and slices.

    The header comes from memory, everything else from ``pread``; with
    ``nowait``, from the page cache only (:class:`_WouldBlock` otherwise).
    Deliberately without a ``close`` method: cdblib's reader calls one when
    it is collected, and the descriptor belongs to :class:`_OpenFile`.
    """

    def __init__(self, descriptor: _Descriptor, *, nowait: bool) -> None:
        self._descriptor = descriptor
        self._read = descriptor.read_nowait if nowait else descriptor.read

    def __len__(self) -> int:
        return self._descriptor.size

    def __getitem__(self, index: slice) -> bytes:
        header = self._descriptor.header
        start, stop, _ = index.indices(self._descriptor.size)
        if stop <= start:
            return b""
        if stop <= len(header):
            return header[start:stop]
        data = self._read(start, stop - start)
        if len(data) < stop - start:
            raise _Damaged(f"unexpected end of file at byte {start + len(data)}")
        return data


class _OpenFile:
    """One version of the cdb file, open: descriptor, readers, key form, users.

    The descriptor is closed when the file has been replaced (or the table
    closed) *and* no worker thread uses it any more, so a thread never
    reads a descriptor that was closed, let alone reused for another file.

    Raises:
      OSError, _Damaged: the file cannot be opened or is not a cdb file.
    """

    def __init__(self, path: str) -> None:
        self._descriptor = _Descriptor(path)
        self.state = self._descriptor.state
        self.size = self._descriptor.size
        # Two readers of the same bytes: one for the event loop, one for threads.
        self._inline_reader = cdblib.Reader(data=_FileBytes(self._descriptor, nowait=True))
        self.thread_reader = cdblib.Reader(data=_FileBytes(self._descriptor, nowait=False))
        self.form = _Form.UNDECIDED
        self._lock = threading.Lock()
        self._users = 0
        self._retired = False

    def find(self, key: bytes, *, inline: bool) -> bytes | None:
        """The value of ``key`` cut at NUL, or None; settles the key form (CDB-1).

        Raises:
          _WouldBlock: ``inline`` and a read would wait for the disk.
          OSError, struct.error, _Damaged: the file cannot be read.
        """
        reader = self._inline_reader if inline else self.thread_reader
        form = self.form
        for stored_key, tried in _candidates(key, form):
            value: bytes | None = reader.get(stored_key)
            if value is None:
                continue
            if form is _Form.UNDECIDED:
                with self._lock:
                    if self.form is _Form.UNDECIDED:
                        self.form = tried  # CDB-1: the first hit decides.
                    elif self.form is not tried:
                        # A concurrent lookup settled the other form first:
                        # answer as that form says, like a serial Postfix.
                        return self.find(key, inline=inline)
            return _cut_at_nul(value)
        return None

    def enter(self) -> None:
        """Count one more user of the descriptor."""
        with self._lock:
            assert not self._closed_locked(), "entering a closed file"
            self._users += 1

    def leave(self) -> None:
        """One user is done; the last one of a retired file closes it. Any thread."""
        with self._lock:
            self._users -= 1
            if self._closed_locked():
                os.close(self._descriptor.fd)

    def retire(self) -> None:
        """The file is out of service: close it now or when its last user leaves."""
        with self._lock:
            if self._retired:
                return
            self._retired = True
            if self._closed_locked():
                os.close(self._descriptor.fd)

    def _closed_locked(self) -> bool:
        return self._retired and self._users == 0


class _ThreadUse:
    """One use of an open file by one worker thread, released exactly once.

    trio gives up on a thread in two ways: before it started (cancelled
    while waiting for the limiter: the thread never runs) and while it runs
    (abandoned on timeout: it finishes on its own). Whoever is last to
    touch the file releases it: trio in the first case, the thread in the
    second and in the ordinary one.
    """

    def __init__(self, file: _OpenFile) -> None:
        self._file = file
        self._lock = threading.Lock()
        self._started = False
        self._dropped = False
        file.enter()

    def start(self) -> bool:
        """In the thread: whether to go on (False: trio gave up already)."""
        with self._lock:
            if self._dropped:
                return False
            self._started = True
            return True

    def finish(self) -> None:
        """In the thread, when done with the file."""
        self._file.leave()

    def give_up(self) -> None:
        """In trio, when the thread call ended in an exception."""
        with self._lock:
            if self._started or self._dropped:
                return
            self._dropped = True
        self._file.leave()


@dataclass(frozen=True, slots=True)
class _Unchanged:
    """The file is still the version last tried."""


@dataclass(frozen=True, slots=True)
class _Failed:
    """The file changed but cannot be used: ``state`` None when stat failed."""

    state: FileState | None
    reason: str


_UNCHANGED: Final = _Unchanged()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, struct.error):
        return "malformed record (file damaged or changed in place?)"
    return str(exc) or type(exc).__name__


class _Check:
    """One check of the file for a newer version, run in a worker thread (CDB-2).

    trio may give up on the thread (a hung file system): a file the thread
    opens after that is closed again instead of being left open for good.
    """

    def __init__(self, path: str, last: FileState | None) -> None:
        self._path = path
        self._last = last
        self._lock = threading.Lock()
        self._abandoned = False
        self._opened: _OpenFile | None = None

    def run(self) -> _Unchanged | _OpenFile | _Failed:
        """In the thread: the newer version of the file, if there is one."""
        try:
            state = FileState.of(os.stat(self._path))
        except OSError as exc:
            return _Failed(None, f"cannot stat: {_reason(exc)}")
        if state == self._last:
            return _UNCHANGED
        try:
            opened = _OpenFile(self._path)
        except (OSError, _Damaged) as exc:
            return _Failed(state, f"cannot open: {_reason(exc)}")
        with self._lock:
            if not self._abandoned:
                self._opened = opened
                return opened
        opened.retire()
        return _UNCHANGED

    def abandon(self) -> None:
        """In trio, after giving up on the thread."""
        with self._lock:
            self._abandoned = True
            opened, self._opened = self._opened, None
        if opened is not None:
            opened.retire()


class CdbMap:
    """A ``cdb:`` table (CDB-1 .. CDB-4), opened again when ``postmap`` rebuilds it.

    Keys are used exactly as given: the caller folds them when the table
    folds (CASE-2), the way ``postmap`` folded the keys it stored.

    Args:
      spec: the table as configured, e.g. ``cdb:/etc/postfix/backup``.
      path: the table name resolved against the configuration directory,
        *without* the ``.cdb`` suffix (CDB-1 adds it).
      smtputf8: apply the G-6 UTF-8 value check to lookups.
      read_timeout: seconds a read in a worker thread may take.

    Raises:
      MapError: the file cannot be opened or is not a cdb file (CDB-4);
        the message names the file.
    """

    def __init__(
        self,
        spec: str,
        path: str,
        *,
        smtputf8: bool = True,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self._spec = spec
        self._file = path + CDB_SUFFIX
        self._smtputf8 = smtputf8
        self._read_timeout = read_timeout
        try:
            self._current: _OpenFile | None = _OpenFile(self._file)
        except (OSError, _Damaged) as exc:
            raise MapError(f"table {spec}: cannot open {self._file}: {_reason(exc)}") from exc
        # The state of the last open attempt, good or bad: the file is
        # opened again only when it differs, so a broken file is reported
        # once, not every second.
        self._attempted: FileState | None = self._current.state
        self._failure: str | None = None
        self._next_check = -math.inf
        self._checking = False
        self._limiter = trio.CapacityLimiter(THREADS_PER_TABLE)

    @property
    def spec(self) -> str:
        """The table as written in the configuration."""
        return self._spec

    @property
    def file(self) -> str:
        """The ``.cdb`` file the table is read from."""
        return self._file

    # ------------------------------------------------------------ lookups

    async def lookup(self, key: bytes) -> Outcome:
        """Look up ``key`` as given, NUL form first, then plain (CDB-1).

        Args:
          key: the lookup key (already folded by the caller where due).

        Returns:
          ``Found(value)`` with the value cut at its first NUL, ``NOT_FOUND``,
          ``Retry`` for a read failure or a damaged file (``timeout=True``
          after :data:`READ_TIMEOUT`), or ``ConfigFailure`` for a non-UTF-8
          value under SMTPUTF8 (G-6). Never raises.
        """
        await self._check_file()
        file = self._current
        if file is None:
            return Retry(f"table {self._spec} is closed")
        value: bytes | None
        try:
            # From the page cache on the event loop, or _WouldBlock at once.
            value = file.find(key, inline=True)
        except _WouldBlock:
            result = await self._in_thread(file, lambda: file.find(key, inline=False))
            if isinstance(result, Retry):
                return result
            value = result
        except _READ_ERRORS as exc:
            return self._read_failure(exc)
        if value is None:
            return NOT_FOUND
        return found_value(value, smtputf8=self._smtputf8, source=self._spec)

    # ----------------------------------------------------------- sequence

    async def sequence(self) -> AsyncIterator[tuple[bytes, bytes]]:
        """Yield every record in file order, keys and values cut at NUL (CDB-3, MC-20).

        The whole listing reads one version of the file, even if it is
        rebuilt meanwhile.

        Raises:
          MapError: the file cannot be read, or the table is closed.
        """
        await self._check_file()
        file = self._current
        if file is None:
            raise MapError(f"table {self._spec} is closed")
        file.enter()
        try:
            records = file.thread_reader.iteritems()
            while True:
                batch = await self._in_thread(file, lambda: list(islice(records, SEQUENCE_BATCH)))
                if isinstance(batch, Retry):
                    raise MapError(f"cannot list {self._file}: {batch.reason}")
                for key, value in batch:
                    yield _cut_at_nul(key), _cut_at_nul(value)
                if len(batch) < SEQUENCE_BATCH:
                    return
        finally:
            file.leave()

    # ------------------------------------------------------------- health

    async def health(self) -> list[BackendHealth]:
        """The file: whether it is there and readable now (HealthReporting).

        Never raises. A file that was removed or became unreadable, or whose
        newer version could not be opened, is reported with ``ok=False``
        even though lookups still answer from the version opened earlier:
        the next start would fail, or the table is out of date.
        """
        name = f"file {self._file}"

        def check() -> tuple[bool, str]:
            try:
                fd = os.open(self._file, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                return False, f"cannot open: {_reason(exc)}"
            try:
                state = FileState.of(os.fstat(fd))
            finally:
                os.close(fd)
            if self._failure is not None and state == self._attempted:
                return False, self._failure
            return True, f"readable, {state.size} bytes"

        try:
            with trio.fail_after(self._read_timeout):
                ok, detail = await trio.to_thread.run_sync(
                    check, limiter=self._limiter, abandon_on_cancel=True
                )
        except trio.TooSlowError:
            ok, detail = False, f"no answer from the file system within {self._read_timeout:g} s"
        if not ok and self._current is not None:
            detail += "; lookups use the version opened before"
        return [BackendHealth(name, ok, detail)]

    # ------------------------------------------------------------ reopen

    async def _check_file(self) -> None:
        """Open a rebuilt file, at most once per RELOAD_CHECK_INTERVAL (CDB-2)."""
        now = trio.current_time()
        if self._checking or now < self._next_check or self._current is None:
            return
        self._next_check = now + RELOAD_CHECK_INTERVAL
        self._checking = True
        check = _Check(self._file, self._attempted)
        found: _Unchanged | _OpenFile | _Failed
        try:
            with trio.fail_after(self._read_timeout):
                found = await trio.to_thread.run_sync(
                    check.run, limiter=self._limiter, abandon_on_cancel=True
                )
        except trio.TooSlowError:
            check.abandon()
            found = _Failed(self._attempted, f"no answer within {self._read_timeout:g} s")
        except BaseException:
            check.abandon()
            raise
        finally:
            self._checking = False
        if isinstance(found, _Unchanged):
            return
        if isinstance(found, _Failed):
            if found.state != self._attempted or self._failure is None:
                _log.warning(
                    "table %s: %s: %s; keeping the version opened before",
                    self._spec,
                    self._file,
                    found.reason,
                )
            self._attempted = found.state
            self._failure = found.reason
            return
        old, self._current = self._current, found
        self._attempted = found.state
        self._failure = None
        if old is None:  # closed meanwhile
            self._current = None
            found.retire()
            return
        old.retire()
        _log.info("table %s: opened the new %s (%d bytes)", self._spec, self._file, found.size)

    # ------------------------------------------------------------ plumbing

    async def _in_thread(self, file: _OpenFile, work: Callable[[], _T]) -> _T | Retry:
        """Run ``work`` on ``file`` in a worker thread, bounded by the read timeout."""
        use = _ThreadUse(file)

        def guarded() -> _T | Retry:
            if not use.start():
                return Retry(f"table {self._spec}: abandoned")
            try:
                return work()
            except _READ_ERRORS as exc:
                return self._read_failure(exc)
            finally:
                use.finish()

        try:
            with trio.fail_after(self._read_timeout):
                return await trio.to_thread.run_sync(
                    guarded, limiter=self._limiter, abandon_on_cancel=True
                )
        except trio.TooSlowError:
            use.give_up()
            return Retry(
                f"table {self._spec}: {self._file}: no answer within {self._read_timeout:g} s",
                timeout=True,
            )
        except BaseException:
            use.give_up()
            raise

    def _read_failure(self, exc: BaseException) -> Retry:
        return Retry(f"table {self._spec}: {self._file}: {_reason(exc)}")

    async def aclose(self) -> None:
        """Take the file out of service; its descriptor closes when the last read ends."""
        current, self._current = self._current, None
        if current is not None:
            current.retire()


def _check(name: str, options: OpenOptions) -> None:
    file_path("cdb", name, options)


def _open(spec: str, name: str, options: OpenOptions) -> CdbMap:
    path = file_path("cdb", name, options)
    return CdbMap(spec, path, smtputf8=options.smtputf8)


#: ``cdb:`` in the registry: keys used as given (the caller folds, as
#: postmap folded when it built the file); read-only (CDB-3).
TABLE_TYPE: Final = TableType(
    "cdb", _check, _open, summary="a Postfix .cdb file (name without the suffix), read-only"
)
