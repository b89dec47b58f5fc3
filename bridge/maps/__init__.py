"""The table types the bridge can use as a backup or domain table, by name.

A table is configured as Postfix writes it, ``type:name``. The registry
checks the syntax (:func:`validate_spec`, no file access, for configuration
checks) and opens tables (:func:`open_map`). Supported types:

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
=============  ================================  ==========================

Anything else (``hash:``, ``proxy:`` ...) is refused with a message
listing these types, since the bridge has no reader for it.

Writing: only the types in :data:`WRITABLE_TYPES` (``lmdb``) can be
opened with ``writable=True``, like Postfix's writable table types; the
others are refused at configuration time rather than failing at the
first update. A writable lmdb table is created when its file is missing,
as ``postmap`` does; a read-only one must exist.

Case folding: with ``fold=True`` (backup tables, like Postfix's
fold-fixed) the keys stored in texthash and inline tables are folded
exactly like the lookup keys the caller folds (TH-4 bridge note, IN-2);
with ``fold=False`` (domain tables, DOM-6) they are kept as written.
socketmap and tcp are pattern tables and never fold (CASE-3). lmdb keys
are used exactly as given either way: the caller folds lookup and update
keys, and ``postmap`` folds the keys of the tables it creates (LM-4).
"""

from __future__ import annotations

import os
from typing import Final, Literal, overload

from bridge.maps.base import LookupMap, MapError, WritableMap
from bridge.maps.inline import InlineMap, parse_inline
from bridge.maps.lmdb import LmdbMap
from bridge.maps.socketmap import SocketmapMap, parse_socketmap_target
from bridge.maps.static import StaticMap, parse_static
from bridge.maps.tcp import TcpMap, parse_tcp_target
from bridge.maps.texthash import TexthashMap

__all__ = [
    "SUPPORTED_TYPES",
    "WRITABLE_TYPES",
    "LookupMap",
    "MapError",
    "WritableMap",
    "open_map",
    "validate_spec",
]

#: The table types :func:`open_map` knows, in the order error messages list them.
SUPPORTED_TYPES: Final = ("texthash", "inline", "static", "socketmap", "tcp", "lmdb")

#: The types that can be opened with ``writable=True`` (Postfix's writable
#: types among ours; texthash is read-only by design, TH-1).
WRITABLE_TYPES: Final = ("lmdb",)


def _split_spec(spec: str) -> tuple[str, str]:
    """Split ``type:name`` at the first colon and check the type is supported."""
    table_type, colon, name = spec.partition(":")
    if not colon or not table_type:
        raise MapError(f"bad table {spec!r}: expected type:name")
    if table_type not in SUPPORTED_TYPES:
        raise MapError(
            f"unsupported table type {table_type!r} in {spec!r}: "
            f"the bridge supports {', '.join(SUPPORTED_TYPES)}"
        )
    return table_type, name


def _file_path(table_type: str, name: str, base_dir: str) -> str:
    """Resolve a file-based table's name against ``base_dir`` (texthash, lmdb)."""
    if not name:
        raise MapError(f"missing file name after '{table_type}:'")
    return name if os.path.isabs(name) else os.path.join(base_dir, name)


def _check_writable(table_type: str, writable: bool) -> None:
    if writable and table_type not in WRITABLE_TYPES:
        raise MapError(
            f"table type {table_type!r} cannot be written: writable = true needs "
            f"a writable backup type ({', '.join(WRITABLE_TYPES)})"
        )


def _check_syntax(spec: str, table_type: str, name: str, base_dir: str) -> None:
    """Parse ``name`` for its type, raising what opening would raise (minus I/O)."""
    try:
        if table_type in ("texthash", "lmdb"):
            _file_path(table_type, name, base_dir)
        elif table_type == "inline":
            parse_inline(name)
        elif table_type == "static":
            parse_static(name)
        elif table_type == "socketmap":
            parse_socketmap_target(name, base_dir=base_dir)
        else:
            parse_tcp_target(name)
    except MapError as exc:
        raise MapError(f"table {spec}: {exc}") from None


def validate_spec(spec: str, *, base_dir: str, writable: bool = False) -> None:
    """Check a table specification's syntax without opening anything.

    Args:
      spec: ``type:name`` as configured.
      base_dir: the directory relative file names would resolve against.
      writable: the table will be opened for writing; only
        :data:`WRITABLE_TYPES` allow that.

    Raises:
      MapError: for an unsupported type (the message lists the supported
        ones), a type that cannot be written when ``writable`` is true, or
        bad syntax in the name. Files are not looked at: a missing texthash
        or lmdb file is only found by :func:`open_map`.
    """
    table_type, name = _split_spec(spec)
    _check_writable(table_type, writable)
    _check_syntax(spec, table_type, name, base_dir)


@overload
def open_map(
    spec: str, *, fold: bool, smtputf8: bool = ..., base_dir: str, writable: Literal[True]
) -> WritableMap: ...


@overload
def open_map(
    spec: str, *, fold: bool, smtputf8: bool = ..., base_dir: str, writable: bool = ...
) -> LookupMap: ...


def open_map(
    spec: str, *, fold: bool, smtputf8: bool = True, base_dir: str, writable: bool = False
) -> LookupMap | WritableMap:
    """Open a table.

    File-based tables are opened now, so a broken table is a configuration
    error at start; socketmap and tcp tables connect on their first lookup.

    Args:
      spec: ``type:name`` as configured.
      fold: fold stored keys like lookup keys (backup tables); False keeps
        them as written (domain tables).
      smtputf8: full Unicode case folding and the G-6 UTF-8 value check
        when true; ASCII folding and no value check when false.
      base_dir: relative file and socket names resolve against it.
      writable: open for update and delete (a :class:`WritableMap`); only
        :data:`WRITABLE_TYPES` allow it. A missing lmdb file is then created.

    Returns:
      The open table.

    Raises:
      MapError: unsupported type, a type that cannot be written when
        ``writable`` is true, bad syntax, or a file that cannot be opened.
    """
    table_type, name = _split_spec(spec)
    _check_writable(table_type, writable)
    _check_syntax(spec, table_type, name, base_dir)
    if table_type == "texthash":
        path = _file_path(table_type, name, base_dir)
        return TexthashMap(spec, path, fold=fold, smtputf8=smtputf8)
    if table_type == "lmdb":
        path = _file_path(table_type, name, base_dir)
        return LmdbMap(spec, path, writable=writable, smtputf8=smtputf8)
    if table_type == "inline":
        return InlineMap(spec, name, fold=fold, smtputf8=smtputf8)
    if table_type == "static":
        return StaticMap(spec, name, smtputf8=smtputf8)
    if table_type == "socketmap":
        target = parse_socketmap_target(name, base_dir=base_dir)
        return SocketmapMap(spec, target, smtputf8=smtputf8)
    return TcpMap(spec, parse_tcp_target(name), smtputf8=smtputf8)
