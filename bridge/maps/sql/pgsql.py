"""``pgsql:`` tables: Postfix's pgsql_table(5) files, queried with psycopg (libpq).

The file is read as Postfix 3.12 reads it (SQL-1, SQL-2): ``hosts``
(``inet:host:port``, ``host:port``, ``unix:/socket/directory``, or a
``postgresql://`` URI whose own user, password and database win),
``user``, ``password``, ``dbname`` (required with any non-URI host),
``encoding`` (default ``UTF8``; Postfix 3.7 always used ``LATIN1``),
``retry_interval``, ``idle_interval``, the templates, ``domain``,
``expansion_limit``, and the legacy form with ``select_function``.

The driver speaks to libpq through psycopg's low-level ``pq`` layer, so
that the bytes on the wire are Postfix's: the statement is sent with the
simple query protocol, as ``PQexec`` sends it, the last result counts,
every column of every row is a field, and NULL reads as an empty field
(SQL-5). Each substituted piece is quoted by ``PQescapeStringConn`` of
the connection that runs the statement (SQL-4). Waits poll the socket
against the lookup's deadline, so a worker thread never hangs on a
stalled server for longer than the lookup may take.
"""

from __future__ import annotations

import os
import select
import socket
import time
from typing import TYPE_CHECKING, Final

from bridge.maps.base import LookupMap, MapError, OpenOptions, TableType
from bridge.maps.sql.client import DriverError, HostKind, HostSpec, SqlMap
from bridge.maps.sql.common import (
    check_name,
    config_path,
    import_driver,
    lookup_timeout,
    open_domain_maps,
    opening,
)
from bridge.maps.sql.settings import (
    COMMON_NAMES,
    DEFAULT_INTERVAL,
    SERVER_NAMES,
    common_settings,
    read_settings,
    redact,
    secrets_of,
    split_hosts,
)

if TYPE_CHECKING:
    from psycopg import pq

__all__ = ["PGSQL_NAMES", "TABLE_TYPE", "PgsqlDriver", "parse_pgsql_host"]

#: The parameters of pgsql_table(5) (Postfix 3.12).
PGSQL_NAMES: Final = COMMON_NAMES | SERVER_NAMES | {"encoding", "select_function"}

#: pgsql_table(5)'s ``encoding`` default from Postfix 3.8 on.
DEFAULT_ENCODING: Final = "UTF8"


def _uri_scheme_length(text: str) -> int:
    """Length of a leading ``scheme://`` (RFC 3986 scheme), 0 when there is none."""
    if not text[:1].isascii() or not text[:1].isalpha():
        return 0
    for index, char in enumerate(text[1:], start=1):
        if char.isascii() and (char.isalnum() or char in "+-"):
            continue
        return index + 3 if text[index : index + 3] == "://" else 0
    return 0


def parse_pgsql_host(text: str) -> HostSpec:
    """One ``hosts`` item as dict_pgsql reads it (SQL-2).

    A ``scheme://`` item is a connection URI. Otherwise ``unix:`` and
    ``inet:`` prefixes are dropped; a name starting with ``/`` (or empty)
    is a unix socket directory, anything else ``host`` or ``host:port``.
    """
    if _uri_scheme_length(text):
        return HostSpec(HostKind.URI, redact(text), text)
    name = text[5:] if text.startswith(("unix:", "inet:")) else text
    if name and not name.startswith("/"):
        host, colon, port = name.rpartition(":")
        if colon:
            return HostSpec(HostKind.INET, text, host, port)
        return HostSpec(HostKind.INET, text, name)
    return HostSpec(HostKind.UNIX, text, name)


def _wait(fd: int, *, write: bool, deadline: float, what: str) -> None:
    """Wait until ``fd`` is readable (or writable) or the deadline passes.

    Raises:
      DriverError: the deadline passed first.
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DriverError(f"{what}: timed out")
    poller = select.poll()
    poller.register(fd, select.POLLOUT if write else select.POLLIN)
    if not poller.poll(remaining * 1000):
        raise DriverError(f"{what}: timed out")


def _text(message: bytes | str | None) -> str:
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return " ".join((message or "no error message").split())


class PgsqlDriver:
    """The blocking PostgreSQL operations of a ``pgsql:`` table (run in worker threads).

    Args:
      psycopg: the imported ``psycopg`` package.
      dbname, user, password: for non-URI hosts (SQL-2).
      encoding: the client encoding (SQL-2).
    """

    def __init__(
        self, psycopg: object, *, dbname: str, user: str, password: str, encoding: str
    ) -> None:
        from psycopg import conninfo, pq  # noqa: PLC0415 - the driver is optional

        del psycopg
        self._pq = pq
        self._make_conninfo = conninfo.make_conninfo
        self._dbname = dbname
        self._user = user
        self._password = password
        self._encoding = encoding

    def conninfo(self, host: HostSpec) -> str:
        """The libpq connection string for ``host`` (not to be shown: it holds the password)."""
        if host.kind is HostKind.URI:
            return self._make_conninfo(host.name or "", client_encoding=self._encoding)
        params = {
            "dbname": self._dbname,
            "user": self._user or None,
            "password": self._password or None,
            "host": host.name or None,
            "port": host.port or None,
            "client_encoding": self._encoding,
        }
        return self._make_conninfo("", **{k: v for k, v in params.items() if v is not None})

    def connect(self, host: HostSpec, timeout: float) -> pq.abc.PGconn:
        what = "cannot connect"
        deadline = time.monotonic() + timeout
        try:
            pgconn = self._pq.PGconn.connect_start(self.conninfo(host).encode())
        except Exception as exc:
            raise DriverError(f"{what}: {_text(str(exc))}") from None
        try:
            polling = self._pq.PollingStatus
            while True:
                status = pgconn.connect_poll()
                if status == polling.OK:
                    break
                if status == polling.FAILED:
                    raise DriverError(f"{what}: {_text(pgconn.error_message)}")  # noqa: TRY301
                _wait(pgconn.socket, write=status == polling.WRITING, deadline=deadline, what=what)
            pgconn.nonblocking = 1
            # Server notices would go to libpq's default printer (stderr).
            pgconn.notice_handler = _ignore_notice
        except BaseException as exc:
            pgconn.finish()
            if isinstance(exc, DriverError) or not isinstance(exc, Exception):
                raise
            raise DriverError(f"{what}: {_text(str(exc))}") from None
        return pgconn

    def quote(self, connection: pq.abc.PGconn, piece: bytes) -> bytes:
        try:
            return bytes(self._pq.Escaping(connection).escape_string(piece))
        except Exception as exc:
            raise DriverError(
                f"cannot quote the key: {_text(str(exc))}", host_failed=False
            ) from None

    def execute(
        self, connection: pq.abc.PGconn, statement: bytes, deadline: float
    ) -> list[bytes | None]:
        what = "query failed"
        try:
            connection.send_query(statement)
            while connection.flush():
                _wait(connection.socket, write=True, deadline=deadline, what=what)
            last = None
            while True:
                while connection.is_busy():
                    _wait(connection.socket, write=False, deadline=deadline, what=what)
                    connection.consume_input()
                result = connection.get_result()
                if result is None:
                    break
                last = result  # PQexec: the last result counts
        except DriverError:
            raise
        except Exception as exc:
            raise DriverError(f"{what}: {_text(str(exc))}") from None
        status = self._pq.ExecStatus
        if last is None or last.status not in (status.TUPLES_OK, status.COMMAND_OK):
            message = "no result" if last is None else _text(last.error_message)
            raise DriverError(f"{what}: {message}")
        # SQL-5: every column of every row; NULL reads as "" (PQgetvalue).
        return [
            last.get_value(row, column) or b""
            for row in range(last.ntuples)
            for column in range(last.nfields)
        ]

    def close(self, connection: pq.abc.PGconn) -> None:
        try:
            connection.finish()
        except Exception:  # closing is best effort
            return

    def interrupt(self, connection: pq.abc.PGconn) -> None:
        _shutdown_fd(connection.socket)


def _ignore_notice(result: object) -> None:
    """Server notices (NOTICE, WARNING) are not errors and say nothing about the lookup."""


def _shutdown_fd(fd: int) -> None:
    """Shut a connected socket down, so a thread blocked on it wakes up with an error."""
    if fd < 0:
        return
    duplicate = socket.socket(fileno=os.dup(fd))
    try:
        duplicate.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        duplicate.close()


def _check(name: str, options: OpenOptions) -> None:
    check_name("pgsql", name)


def _open(spec: str, name: str, options: OpenOptions) -> LookupMap:
    check_name("pgsql", name)
    path = config_path(name, options)
    with opening(spec, path):
        values = read_settings(spec, path, PGSQL_NAMES, manual="pgsql_table(5)")
        select_function = values.text("select_function", None)
        settings = common_settings(
            values,
            smtputf8=options.smtputf8,
            query_default=f"SELECT {select_function}('%s')" if select_function else None,
        )
        hosts = [parse_pgsql_host(item) for item in split_hosts(values.required_text("hosts", ""))]
        dbname = values.required_text("dbname", "")
        non_uri = [host for host in hosts if host.kind is not HostKind.URI]
        if non_uri and not dbname:
            raise MapError(
                f"table {spec}: {path}: dbname: required for host {non_uri[0].shown} "
                "(only connection URIs name their own database)"
            )
        driver = PgsqlDriver(
            import_driver(spec, "psycopg", "pgsql"),
            dbname=dbname,
            user=values.required_text("user", ""),
            password=values.required_text("password", ""),
            encoding=values.required_text("encoding", DEFAULT_ENCODING, min_length=1),
        )
        retry_interval = values.integer("retry_interval", DEFAULT_INTERVAL, minimum=1)
        idle_interval = values.integer("idle_interval", DEFAULT_INTERVAL, minimum=1)
        domain_maps = open_domain_maps(spec, settings.domain, options)
    return SqlMap(
        spec,
        settings,
        driver,
        hosts,
        retry_interval=retry_interval,
        idle_interval=idle_interval,
        timeout=lookup_timeout(options),
        smtputf8=options.smtputf8,
        domain_maps=domain_maps,
        secrets=secrets_of(values, [host.name or "" for host in hosts]),
    )


#: ``pgsql:`` in the registry: read-only (SQL-7); keys used as given (the caller folds).
TABLE_TYPE: Final = TableType(
    "pgsql",
    _check,
    _open,
    summary="a pgsql_table(5) file: PostgreSQL queries (pip install 'postfix-bridge[pgsql]')",
)
