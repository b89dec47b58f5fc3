"""The table types the bridge can use as a backup or domain table, by name.

A table is configured as Postfix writes it, ``type:name``. Each type
describes itself in its own module with one
:class:`~bridge.maps.base.TableType` record (syntax check without I/O,
open, whether it can be written); :data:`TABLE_TYPES` maps type names to
those records, and this module is the one place that turns a spec into
a record, so an unknown type fails here and nowhere else. Adding a type
is one module plus one entry in :data:`TABLE_TYPES`.

=============  ================================  ==========================
type           name                              spec rules
=============  ================================  ==========================
``texthash``   a ``key value`` text file         TH-1 .. TH-6
``inline``     ``{ key=value, ... }``            IN-1, IN-2
``static``     any text, or ``{ text }``         ST-1
``socketmap``  ``inet:HOST:PORT:NAME`` or        SM-1, 2.4, 2.5
               ``unix:PATH:NAME``
``tcp``        ``HOST:PORT``                     3.2, 3.3
``lmdb``       a Postfix ``.lmdb`` file (name     LM-1 .. LM-8
               without the suffix)
``cdb``        a Postfix ``.cdb`` file (name      CDB-1 .. CDB-4
               without the suffix), read-only
``proxy``      ``TYPE:NAME``: any Postfix table,  PXC-1 .. PXC-10
               through Postfix's proxymap
``pgsql``      a pgsql_table(5) file             SQL-1 .. SQL-7
``mysql``      a mysql_table(5) file             SQL-1 .. SQL-7
``sqlite``     a sqlite_table(5) file            SQL-1 .. SQL-7
=============  ================================  ==========================

Writing: only a type whose record's ``writable`` rule allows it can be
opened with ``writable=True``, like Postfix's writable table types; the
others are refused at configuration time rather than failing at the
first update. A writable lmdb table is created when its file is missing,
as ``postmap`` does; a read-only one must exist. A ``proxy:`` table is
writable when proxywrite can change its inner type (PXC-7).

Case folding: with ``fold=True`` (backup tables, like Postfix's
fold-fixed) the keys stored in texthash and inline tables are folded
exactly like the lookup keys the caller folds (TH-4 bridge note, IN-2);
with ``fold=False`` (domain tables, DOM-6) they are kept as written.
socketmap and tcp are pattern tables and never fold (CASE-3). lmdb keys
are used exactly as given either way: the caller folds lookup and update
keys, and ``postmap`` folds the keys of the tables it creates (LM-4).
``proxy:`` sends keys as given too: proxymap is told no folding (PXC-8).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from bridge.maps import cdb, inline, lmdb, proxy, socketmap, static, tcp, texthash
from bridge.maps.base import (
    BackendHealth,
    HealthReporting,
    LookupMap,
    MapError,
    OpenOptions,
    SequenceMap,
    TableType,
    WritableMap,
    never_writable,
)
from bridge.maps.sql import mysql, pgsql, sqlite

__all__ = [
    "SUPPORTED_TYPES",
    "TABLE_TYPES",
    "WRITABLE_TYPES",
    "BackendHealth",
    "HealthReporting",
    "LookupMap",
    "MapError",
    "OpenOptions",
    "SequenceMap",
    "TableType",
    "WritableMap",
    "open_map",
    "open_writable_map",
    "validate_spec",
]

#: Every table type the bridge can open, by name, in the order error
#: messages list them.
TABLE_TYPES: Final[Mapping[str, TableType]] = MappingProxyType(
    {
        record.name: record
        for record in (
            texthash.TABLE_TYPE,
            inline.TABLE_TYPE,
            static.TABLE_TYPE,
            socketmap.TABLE_TYPE,
            tcp.TABLE_TYPE,
            lmdb.TABLE_TYPE,
            cdb.TABLE_TYPE,
            proxy.TABLE_TYPE,
            pgsql.TABLE_TYPE,
            mysql.TABLE_TYPE,
            sqlite.TABLE_TYPE,
        )
    }
)

#: The names of :data:`TABLE_TYPES`.
SUPPORTED_TYPES: Final = tuple(TABLE_TYPES)

#: The types that can be written, at least for some names.
WRITABLE_TYPES: Final = tuple(
    name for name, record in TABLE_TYPES.items() if record.writable is not never_writable
)


def _resolve(spec: str, options: OpenOptions) -> tuple[TableType, str]:
    """The record and name part of ``spec``, checked as :func:`validate_spec` says."""
    table_type, colon, name = spec.partition(":")
    if not colon or not table_type:
        raise MapError(f"bad table {spec!r}: expected type:name")
    record = TABLE_TYPES.get(table_type)
    if record is None:
        suggestion = proxy.proxy_suggestion(table_type, spec)
        raise MapError(
            f"unsupported table type {table_type!r} in {spec!r}: "
            f"the bridge supports {', '.join(SUPPORTED_TYPES)}"
            + (f"; {suggestion}" if suggestion else "")
        )
    if options.writable and not record.writable(name):
        writable = ", ".join(WRITABLE_TYPES)
        raise MapError(
            f"table type {table_type!r} cannot be written: writable = true needs "
            f"a writable backup type ({writable})"
        )
    try:
        record.check(name, options)
    except MapError as exc:
        raise MapError(f"table {spec}: {exc}") from None
    return record, name


def validate_spec(spec: str, options: OpenOptions) -> None:
    """Check a table specification's syntax without opening anything.

    Args:
      spec: ``type:name`` as configured.
      options: how it would be opened (``base_dir`` and ``writable``
        matter here).

    Raises:
      MapError: for an unsupported type (the message lists the supported
        ones), a type that cannot be written when ``options.writable`` is
        true, or bad syntax in the name. Files are not looked at: a
        missing texthash or lmdb file is only found by :func:`open_map`.
    """
    _resolve(spec, options)


def open_map(spec: str, options: OpenOptions) -> LookupMap:
    """Open a table.

    File-based tables are opened now, so a broken table is a configuration
    error at start; socketmap and tcp tables connect on their first lookup.

    Raises:
      MapError: everything :func:`validate_spec` refuses, or a file that
        cannot be opened.
    """
    record, name = _resolve(spec, options)
    return record.open(spec, name, options)


def open_writable_map(spec: str, options: OpenOptions) -> WritableMap:
    """Open a table for update and delete (``options.writable`` must be set).

    Raises:
      MapError: as :func:`open_map`.
    """
    assert options.writable, spec
    table = open_map(spec, options)
    # A type's writable rule promises this for the names it allows.
    assert isinstance(table, WritableMap), spec
    return table
