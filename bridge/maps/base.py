"""The interface every backup or domain table implements, and the record of a table type.

A table is opened once from its Postfix ``type:name`` text when the
configuration is loaded (so a bad table is a configuration error at start),
and then looked up from the trio event loop. Lookups never raise for
backend trouble: they return an :data:`~bridge.outcome.Outcome`, so a
failure becomes ``Retry`` and can never be mistaken for "not found".

Each table type describes itself with one :class:`TableType` record in
its own module; :mod:`bridge.maps` maps type names to those records.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from bridge.outcome import Outcome, WriteOutcome


class MapError(ValueError):
    """A table specification cannot be opened; the message names the table and the cause."""


class LookupMap(Protocol):
    """A read-only Postfix lookup table."""

    @property
    def spec(self) -> str:
        """The table as written in the configuration, e.g. ``texthash:/etc/postfix/aliases``."""
        ...

    async def lookup(self, key: bytes) -> Outcome:
        """Look up ``key`` exactly as given (the caller has already folded case where due)."""
        ...

    async def aclose(self) -> None:
        """Release connections or files. Idempotent."""
        ...


@runtime_checkable
class SequenceMap(LookupMap, Protocol):
    """A table that can list its entries (Postfix first/next, MC-20)."""

    def sequence(self) -> AsyncIterator[tuple[bytes, bytes]]:
        """Yield every (key, value) in the table's own order, values cut at NUL.

        Raises:
          MapError: the table cannot be read (the message says why).
        """
        ...


@runtime_checkable
class WritableMap(SequenceMap, Protocol):
    """A table the bridge can change (only ``lmdb:`` today, like Postfix's writable types)."""

    async def update(self, key: bytes, value: bytes) -> WriteOutcome:
        """Store ``value`` under ``key``, replacing any old value (proxywrite semantics, PX-3).

        Returns ``WRITTEN`` once the change is durable, or Retry/ConfigFailure.
        """
        ...

    async def update_many(self, items: Sequence[tuple[bytes, bytes]]) -> WriteOutcome:
        """Store many entries in one transaction: all of them are durable, or none."""
        ...

    async def delete(self, key: bytes) -> WriteOutcome:
        """Remove ``key``: ``WRITTEN``, ``NotWritten`` when absent, or Retry/ConfigFailure."""
        ...


@dataclass(frozen=True, slots=True)
class BackendHealth:
    """One part of a backup table, as a health report sees it.

    Attributes:
      name: what it is, for people: ``host 127.0.0.1:5432``,
        ``proxymap /var/spool/postfix/private/proxymap``, ``file /x.cdb``.
      ok: whether lookups can use it now.
      detail: why not, or what is known (``penalised for 42 s: ...``).
    """

    name: str
    ok: bool
    detail: str


@runtime_checkable
class HealthReporting(Protocol):
    """A table that can say how its backends are (``/healthz``, ``postfix-bridge health``)."""

    async def health(self) -> list[BackendHealth]:
        """Each backend of the table as of now.

        May ask a backend once, bounded by the table's own time limit;
        never raises for backend trouble (that is an ``ok=False`` entry).
        """
        ...


@dataclass(frozen=True, slots=True)
class OpenOptions:
    """How a table is to be opened; the same record for every type.

    Attributes:
      base_dir: relative file and socket names resolve against it.
      fold: fold stored keys like lookup keys (backup tables); False keeps
        them as written (domain tables, DOM-6). Types whose keys are not
        stored by the bridge (pattern tables, lmdb) ignore it.
      smtputf8: full Unicode case folding and the G-6 UTF-8 value check
        when true; ASCII folding and no value check when false.
      writable: open for update and delete (a :class:`WritableMap`).
      timeout: seconds one lookup of a database backup may take (the
        table's ``timeout``); None = the type's own default. Types that
        do not wait on a server ignore it.
      queue_directory: Postfix's queue directory, where ``proxy:`` tables
        find proxymap's socket; None = not known (``proxy:`` cannot open).
      proxymap_protocol: the proxymap protocol form a ``proxy:`` table
        speaks, ``"2.9"`` or ``"3.11"``; None or ``"auto"`` = detect it.
    """

    base_dir: str
    fold: bool = True
    smtputf8: bool = True
    writable: bool = False
    timeout: float | None = None
    queue_directory: str | None = None
    proxymap_protocol: str | None = None


@dataclass(frozen=True, slots=True)
class FileState:
    """What identifies one version of a table file; any change means "read it again".

    The inode changes when postmap renames a rebuilt file into place, size
    and mtime when a file is written in place, and ctime also on chmod, so
    fixing an unreadable file's permissions is noticed too.
    """

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, result: os.stat_result) -> FileState:
        return cls(
            result.st_dev, result.st_ino, result.st_size, result.st_mtime_ns, result.st_ctime_ns
        )


def file_path(table_type: str, name: str, options: OpenOptions) -> str:
    """Resolve a file-based table's name against ``options.base_dir``.

    Raises:
      MapError: the name is empty.
    """
    if not name:
        raise MapError(f"missing file name after '{table_type}:'")
    return name if os.path.isabs(name) else os.path.join(options.base_dir, name)


def never_writable(name: str) -> bool:
    """The ``writable`` rule of a read-only table type."""
    return False


def always_writable(name: str) -> bool:
    """The ``writable`` rule of a table type that can always be written."""
    return True


@dataclass(frozen=True, slots=True)
class TableType:
    """Everything the registry knows about one table type.

    Attributes:
      name: the Postfix type name, as in ``name:...``.
      check: checks what follows ``name:`` without any I/O, raising
        :class:`MapError` with what is wrong; takes (name part, options).
      open: opens the table; takes (whole spec, name part, options) and
        raises :class:`MapError`. Called only after ``check`` passed and
        only with ``options.writable`` when ``writable`` allows it.
      writable: whether a table of this type with this name part can be
        written (proxywrite-style types decide by the table they wrap).
      summary: one line for the documentation and error messages.
    """

    name: str
    check: Callable[[str, OpenOptions], None]
    open: Callable[[str, str, OpenOptions], LookupMap]
    writable: Callable[[str], bool] = never_writable
    summary: str = ""
