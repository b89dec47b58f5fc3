"""``sqlite:`` tables: Postfix's sqlite_table(5) files, queried with Python's sqlite3.

The file is read as Postfix 3.12 reads it (SQL-1, SQL-2): ``dbpath``
(required), the templates, ``domain``, ``expansion_limit`` and the legacy
query form. The database is opened read-only (``mode=ro``), as Postfix
3.10 and later open it, so a missing file is an error at start instead
of an empty database created on the spot.

Quoting doubles ``'`` (sqlite's ``%q``, SQL-4). As with
``sqlite3_prepare_v2``, only the first statement of the expanded query
runs and anything after it is ignored. Only the first column of each
row is a field (SQL-5); it is read as sqlite's text conversion gives it:
text and blobs as stored, integers in decimal, reals as sqlite's own
``CAST(x AS TEXT)``, NULL skipped.

Errors (SQL-6): a statement that sqlite cannot prepare (syntax error,
unknown table or column: result code ``SQLITE_ERROR``) makes Postfix
exit; the bridge answers PERM and keeps serving. Any other failure
(locked or busy database, I/O error, the deadline) is TEMP. A key that
is not UTF-8 is never looked up (Postfix skips it too).
"""

from __future__ import annotations

import sqlite3
import time
import urllib.parse
from typing import Final

from bridge.maps.base import LookupMap, MapError, OpenOptions, TableType
from bridge.maps.sql.client import DriverError, HostKind, HostSpec, SqlMap
from bridge.maps.sql.common import (
    check_name,
    config_path,
    lookup_timeout,
    open_domain_maps,
    opening,
)
from bridge.maps.sql.settings import COMMON_NAMES, common_settings, read_settings

__all__ = ["SQLITE_NAMES", "TABLE_TYPE", "SqliteDriver", "first_statement"]

#: The parameters of sqlite_table(5) (Postfix 3.12).
SQLITE_NAMES: Final = COMMON_NAMES | {"dbpath"}

#: sqlite's primary result code for a statement that cannot be prepared.
_SQLITE_ERROR: Final = 1

#: Virtual machine steps between two checks of the lookup's deadline.
_PROGRESS_STEPS: Final = 1000


def first_statement(statement: str) -> str:
    """The first complete SQL statement of ``statement``, as sqlite3_prepare_v2 takes it.

    A ``;`` inside a string literal or a comment does not end a statement;
    text without any complete statement is returned whole.
    """
    position = statement.find(";")
    while position >= 0:
        candidate = statement[: position + 1]
        if sqlite3.complete_statement(candidate):
            return candidate
        position = statement.find(";", position + 1)
    return statement


def _is_prepare_error(exc: sqlite3.Error) -> bool:
    """Whether sqlite refused the statement itself (SQLITE_ERROR), not the database."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (int(code) & 0xFF) == _SQLITE_ERROR
    # Python 3.10 has no result codes on exceptions: go by the usual messages.
    message = str(exc)
    return message.startswith(("near ", "no such ", "unrecognized token")) or "syntax" in message


class SqliteDriver:
    """The blocking sqlite operations of an ``sqlite:`` table (run in worker threads).

    Args:
      path: the database file (``dbpath``, resolved).
    """

    def __init__(self, path: str) -> None:
        self._path = path

    def connect(self, host: HostSpec, timeout: float) -> sqlite3.Connection:
        uri = f"file:{urllib.parse.quote(self._path)}?mode=ro"
        try:
            connection = sqlite3.connect(
                uri,
                uri=True,
                timeout=timeout,
                check_same_thread=False,  # used by one worker thread at a time
                isolation_level=None,
            )
        except sqlite3.Error as exc:
            raise DriverError(f"cannot open {self._path}: {exc}") from None
        connection.text_factory = bytes
        try:
            # Read the schema now: a file that is no database fails here.
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            connection.close()
            raise DriverError(f"cannot read {self._path}: {exc}") from None
        return connection

    def quote(self, connection: sqlite3.Connection, piece: bytes) -> bytes:
        return piece.replace(b"'", b"''")

    def execute(
        self, connection: sqlite3.Connection, statement: bytes, deadline: float
    ) -> list[bytes | None]:
        try:
            text = statement.decode("utf-8")
        except UnicodeDecodeError:
            return []  # dict_sqlite skips keys that are not UTF-8
        connection.set_progress_handler(lambda: int(time.monotonic() > deadline), _PROGRESS_STEPS)
        try:
            fields: list[bytes | None] = []
            for row in connection.execute(first_statement(text)):
                fields.append(self._text(connection, row[0]))
        except sqlite3.Error as exc:
            if _is_prepare_error(exc):
                raise DriverError(f"SQL prepare failed: {exc}", permanent=True) from None
            raise DriverError(f"SQL step failed: {exc}") from None
        finally:
            connection.set_progress_handler(None, 0)
        return fields

    @staticmethod
    def _text(connection: sqlite3.Connection, value: object) -> bytes | None:
        """A column value as ``sqlite3_column_text`` gives it."""
        if value is None or isinstance(value, bytes):
            return value
        if isinstance(value, int):
            return str(value).encode("ascii")
        text = connection.execute("SELECT CAST(? AS TEXT)", (value,)).fetchone()[0]
        return text if isinstance(text, bytes) else str(text).encode("utf-8")

    def close(self, connection: sqlite3.Connection) -> None:
        try:
            connection.close()
        except sqlite3.Error:
            return

    def interrupt(self, connection: sqlite3.Connection) -> None:
        connection.interrupt()


def _check(name: str, options: OpenOptions) -> None:
    check_name("sqlite", name)


def _open(spec: str, name: str, options: OpenOptions) -> LookupMap:
    check_name("sqlite", name)
    path = config_path(name, options)
    with opening(spec, path):
        values = read_settings(spec, path, SQLITE_NAMES, manual="sqlite_table(5)")
        dbpath = config_path(values.required_text("dbpath", "", min_length=1), options)
        settings = common_settings(values, smtputf8=options.smtputf8)
        domain_maps = open_domain_maps(spec, settings.domain, options)
    driver = SqliteDriver(dbpath)
    timeout = lookup_timeout(options)
    # Open the database now, so a missing or broken file stops the start (G-7).
    try:
        first = driver.connect(HostSpec(HostKind.UNIX, dbpath, dbpath), timeout)
    except DriverError as exc:
        raise MapError(f"table {spec}: {exc.reason}") from None
    table = SqlMap(
        spec,
        settings,
        driver,
        [HostSpec(HostKind.UNIX, dbpath, dbpath)],
        retry_interval=0,
        idle_interval=0,
        timeout=timeout,
        smtputf8=options.smtputf8,
        domain_maps=domain_maps,
        single_host_attempts=1,
        what="file",
    )
    table.adopt(first)
    return table


#: ``sqlite:`` in the registry: read-only (SQL-7); keys used as given (the caller folds).
TABLE_TYPE: Final = TableType(
    "sqlite", _check, _open, summary="an sqlite_table(5) file: queries of an SQLite database"
)
