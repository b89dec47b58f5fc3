"""``mysql:`` tables: Postfix's mysql_table(5) files, queried with PyMySQL.

The file is read as Postfix 3.12 reads it (SQL-1, SQL-2): ``hosts``
(``inet:host:port``, ``host[:port]``, ``unix:/path/to/socket``; ``localhost``
means the server's default unix socket, as libmysqlclient has it),
``user``, ``password``, ``dbname`` (required), ``charset`` (default
``utf8mb4``), ``retry_interval``, ``idle_interval``, ``option_file`` and
``option_group``, ``require_result_set``, the ``tls_*`` settings, the
templates, ``domain``, ``expansion_limit`` and the legacy query form.

Values come back exactly as the server sends them (no type conversion,
no decoding), every column of every row, NULL skipped (SQL-5). Each
substituted piece is quoted by the connection's own escaping, which
honours the server's ``NO_BACKSLASH_ESCAPES`` mode (SQL-4). Statements
that return several result sets with data are an error, and one that
returns none is an error unless ``require_result_set = no``, as in
Postfix. The server's default autocommit mode is kept (no transaction is
held open between lookups).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from types import ModuleType
from typing import Any, Final

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
    CfValues,
    common_settings,
    read_settings,
    secrets_of,
    split_hosts,
)

__all__ = ["DEFAULT_SOCKET", "MYSQL_NAMES", "TABLE_TYPE", "MysqlDriver", "parse_mysql_host"]

#: The parameters of mysql_table(5) (Postfix 3.12).
MYSQL_NAMES: Final = (
    COMMON_NAMES
    | SERVER_NAMES
    | {
        "charset",
        "option_file",
        "option_group",
        "require_result_set",
        "tls_cert_file",
        "tls_key_file",
        "tls_CAfile",
        "tls_CApath",
        "tls_ciphers",
        "tls_verify_cert",
    }
)

#: mysql_table(5)'s ``charset`` default from Postfix 3.9 on.
DEFAULT_CHARSET: Final = "utf8mb4"

#: Where ``localhost`` connects: the socket Debian's MariaDB and MySQL
#: client libraries are built with (libmysqlclient's ``localhost`` rule).
DEFAULT_SOCKET: Final = "/run/mysqld/mysqld.sock"

_DEFAULT_PORT: Final = 3306


def parse_mysql_host(text: str) -> HostSpec:
    """One ``hosts`` item as dict_mysql reads it (SQL-2).

    ``unix:PATH`` is a socket file; otherwise an optional ``inet:``
    prefix, a host name and an optional ``:port`` (number or service
    name). ``localhost`` means the default unix socket.

    Raises:
      MapError: the port is neither a number nor a known service name.
    """
    kind = HostKind.INET
    name = text
    if name.startswith("unix:"):
        kind, name = HostKind.UNIX, name[5:]
    elif name.startswith("inet:"):
        name = name[5:]
    port: str | None = None
    head, colon, tail = name.rpartition(":")
    if colon:
        name, port = head, str(_service_port(text, tail))
    if name.lower() == "localhost":
        return HostSpec(HostKind.UNIX, text, None, port)
    return HostSpec(kind, text, name, port)


def _service_port(host: str, text: str) -> int:
    if text.isascii() and text.isdigit():
        return int(text)
    try:
        return socket.getservbyname(text, "tcp")
    except OSError:
        raise MapError(f"host {host!r}: unknown service {text}/tcp") from None


def _ssl_options(values: CfValues) -> dict[str, Any]:
    """PyMySQL's TLS arguments for the ``tls_*`` settings (mysql_table(5))."""
    options: dict[str, Any] = {}
    for name, argument in (
        ("tls_CAfile", "ssl_ca"),
        ("tls_cert_file", "ssl_cert"),
        ("tls_key_file", "ssl_key"),
    ):
        value = values.text(name, None)
        if value:
            options[argument] = value
    extra: dict[str, str] = {}
    capath = values.text("tls_CApath", None)
    if capath:
        extra["capath"] = capath
    ciphers = values.text("tls_ciphers", None)
    if ciphers:
        extra["cipher"] = ciphers
    if extra:
        options["ssl"] = extra
    if values.is_set("tls_verify_cert"):
        verify = values.boolean("tls_verify_cert", False)
        options["ssl_verify_cert"] = verify
        options["ssl_verify_identity"] = verify
    return options


class MysqlDriver:
    """The blocking MySQL/MariaDB operations of a ``mysql:`` table (run in worker threads).

    Args:
      pymysql: the imported ``pymysql`` package.
      arguments: the connection arguments shared by every host (credentials,
        database, charset, TLS, option file).
      require_result_set: a statement without a result set is an error.
    """

    def __init__(
        self,
        pymysql: ModuleType,
        arguments: Mapping[str, Any],
        *,
        require_result_set: bool,
    ) -> None:
        self._pymysql = pymysql
        self._arguments = dict(arguments)
        self._require_result_set = require_result_set

    def connect(self, host: HostSpec, timeout: float) -> Any:
        what = "cannot connect"
        arguments = dict(self._arguments)
        if host.kind is HostKind.UNIX:
            arguments["unix_socket"] = host.name or DEFAULT_SOCKET
        else:
            arguments["host"] = host.name
            arguments["port"] = int(host.port) if host.port else _DEFAULT_PORT
        try:
            return self._pymysql.connect(
                **arguments,
                # The handshake reads too are bounded by the connect budget.
                connect_timeout=max(timeout, 0.001),
                read_timeout=max(timeout, 0.001),
                write_timeout=max(timeout, 0.001),
                # Values as the server sends them: no conversion, no decoding.
                conv={},
                use_unicode=False,
                # Keep the server's autocommit: a held transaction would see
                # an old snapshot of the table.
                autocommit=None,
            )
        except Exception as exc:
            raise DriverError(f"{what}: {_message(exc)}") from None

    def quote(self, connection: Any, piece: bytes) -> bytes:
        # The escaping looks at ASCII specials only, so Latin-1 carries
        # every byte through unchanged (utf8mb4 never puts them inside a
        # multi-byte character).
        try:
            escaped: str = connection.escape(piece.decode("latin-1"))
        except Exception as exc:
            raise DriverError(f"cannot quote the key: {_message(exc)}", host_failed=False) from None
        return escaped[1:-1].encode("latin-1")

    def execute(self, connection: Any, statement: bytes, deadline: float) -> list[bytes | None]:
        # PyMySQL applies these before every socket read and write (it has no
        # public setter): each wait ends by the lookup's deadline.
        remaining = max(deadline - time.monotonic(), 0.001)
        connection._read_timeout = connection._write_timeout = remaining
        try:
            cursor = connection.cursor()
            try:
                cursor.execute(statement)
                rows: list[tuple[bytes | None, ...]] | None = None
                while True:
                    if cursor.description is not None:
                        fetched = list(cursor.fetchall())
                        if rows is not None:
                            raise DriverError(
                                "query failed: multiple result sets returning data are "
                                "not supported"
                            )
                        rows = fetched
                    if not cursor.nextset():
                        break
            finally:
                cursor.close()
        except DriverError:
            raise
        except Exception as exc:
            raise DriverError(f"query failed: {_message(exc)}") from None
        if rows is None:
            if self._require_result_set:
                raise DriverError(
                    "query failed: query returned no result set (require_result_set = yes)"
                )
            return []
        return [field for row in rows for field in row]

    def close(self, connection: Any) -> None:
        try:
            connection.close()
        except Exception:  # closing is best effort; a dead server refuses the goodbye
            return

    def interrupt(self, connection: Any) -> None:
        sock = getattr(connection, "_sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                return


def _message(exc: BaseException) -> str:
    args: tuple[object, ...] = exc.args
    if len(args) == 2 and isinstance(args[0], int):
        return f"({args[0]}) {args[1]}"
    return " ".join(str(exc).split()) or type(exc).__name__


def _check(name: str, options: OpenOptions) -> None:
    check_name("mysql", name)


def _open(spec: str, name: str, options: OpenOptions) -> LookupMap:
    check_name("mysql", name)
    path = config_path(name, options)
    with opening(spec, path):
        values = read_settings(spec, path, MYSQL_NAMES, manual="mysql_table(5)")
        settings = common_settings(values, smtputf8=options.smtputf8)
        try:
            hosts = [parse_mysql_host(h) for h in split_hosts(values.required_text("hosts", ""))]
        except MapError as exc:
            raise MapError(f"table {spec}: {path}: hosts: {exc}") from None
        arguments: dict[str, Any] = {
            "user": values.required_text("user", ""),
            "password": values.required_text("password", ""),
            "database": values.required_text("dbname", "", min_length=1),
            "charset": values.required_text("charset", DEFAULT_CHARSET, min_length=1),
            **_ssl_options(values),
        }
        option_file = values.text("option_file", None)
        if option_file:
            arguments["read_default_file"] = option_file
            group = values.required_text("option_group", "client")
            if group:
                arguments["read_default_group"] = group
        timeout = lookup_timeout(options)
        driver = MysqlDriver(
            import_driver(spec, "pymysql", "mysql"),
            arguments,
            require_result_set=values.boolean("require_result_set", True),
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
        timeout=timeout,
        smtputf8=options.smtputf8,
        domain_maps=domain_maps,
        secrets=secrets_of(values, ()),
    )


#: ``mysql:`` in the registry: read-only (SQL-7); keys used as given (the caller folds).
TABLE_TYPE: Final = TableType(
    "mysql",
    _check,
    _open,
    summary="a mysql_table(5) file: MySQL/MariaDB queries (pip install 'postfix-bridge[mysql]')",
)
