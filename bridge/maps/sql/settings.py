"""Reading an SQL table's Postfix ``.cf`` file: parameters, defaults, hosts (SQL-1 .. SQL-3).

Theory of operation
-------------------
``pgsql:/etc/postfix/x.cf`` names a file in main.cf syntax, read by the
same reader as memcache_table(5) files (:func:`bridge.postfix_cf.read_cf_file`,
CF rules), told the names of the engine's manual page (SQL-1, SQL-2).
:class:`CfValues` then reads each parameter as Postfix's cfg_parser does:

* strings with a minimum length (``dbname`` of mysql, ``encoding``,
  ``result_format`` ... must not be empty), and "unset" for an empty value
  of a parameter without default (an empty ``query`` selects the legacy
  form, as in Postfix);
* integers in Postfix's syntax (MC-2) with a minimum;
* booleans spelled ``yes`` or ``no``, in any case.

Every problem is a :class:`~bridge.maps.base.MapError` naming the file,
the line and the parameter. A value is never quoted in a message
(:func:`bridge.postfix_cf.shown_value` hides secrets anyway): a ``.cf``
file of a database table holds a password.

:func:`common_settings` reads what all three engines share (templates,
the legacy query form SQL-3, ``domain``, ``expansion_limit``);
:func:`split_hosts` splits a ``hosts`` list; :func:`redact` hides the
password of a ``postgresql://user:secret@host`` URI wherever a host is
shown.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from bridge.keys import DomainFilter, KeyConfigError
from bridge.maps.base import MapError
from bridge.maps.sql.templates import SqlTemplates, TemplateError
from bridge.postfix_cf import CfFile, read_cf_file

__all__ = [
    "COMMON_NAMES",
    "DEFAULT_INTERVAL",
    "SERVER_NAMES",
    "CfValues",
    "CommonSettings",
    "common_settings",
    "legacy_query",
    "read_settings",
    "redact",
    "scrub",
    "secrets_of",
    "split_hosts",
]

#: Parameters every SQL engine reads (SQL-2).
COMMON_NAMES: Final = frozenset(
    {
        "query",
        "result_format",
        "domain",
        "expansion_limit",
        # the legacy query form (SQL-3)
        "table",
        "select_field",
        "where_field",
        "additional_conditions",
    }
)

#: Parameters of the two server engines, pgsql and mysql (SQL-2).
SERVER_NAMES: Final = frozenset(
    {"hosts", "user", "password", "dbname", "retry_interval", "idle_interval"}
)

#: Default of ``retry_interval`` and ``idle_interval``, in seconds (SQL-2).
DEFAULT_INTERVAL: Final = 60

_INT_MIN = -(2**31)
_INT_MAX = 2**31 - 1
_POSTFIX_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
#: Postfix splits a hosts list at commas and whitespace (CHARS_COMMA_SP).
_HOST_SEPARATORS = re.compile(r"[,\s]+")


class CfValues:
    """The parameters of one ``.cf`` file, read with Postfix's cfg_parser rules (SQL-2).

    Args:
      spec: the table as configured, for messages.
      cf: the file as read.
    """

    def __init__(self, spec: str, cf: CfFile) -> None:
        self.spec = spec
        self.cf = cf

    def error(self, name: str, message: str) -> MapError:
        entry = self.cf.entries.get(name)
        where = self.cf.path if entry is None else f"{self.cf.path}, line {entry.line}"
        return MapError(f"table {self.spec}: {where}: {name}: {message}")

    def is_set(self, name: str) -> bool:
        """Whether the file sets ``name`` at all."""
        return name in self.cf.entries

    def text(self, name: str, default: str | None, *, min_length: int = 0) -> str | None:
        """A string parameter: the value, or ``default`` when unset.

        As cfg_get_str: the minimum length applies to the default too
        (a required parameter is one whose default is too short), and a
        parameter without default whose value is empty counts as unset.

        Raises:
          MapError: the value (or default) is shorter than ``min_length``.
        """
        entry = self.cf.entries.get(name)
        value = entry.value if entry is not None else (default or "")
        if len(value) < min_length:
            if entry is None:
                raise self.error(name, "required parameter is not set")
            raise self.error(name, f"must not be shorter than {min_length} character(s)")
        if default is None and not value:
            return None
        return value

    def required_text(self, name: str, default: str, *, min_length: int = 0) -> str:
        """A string parameter that always has a value (a non-None default)."""
        value = self.text(name, default, min_length=min_length)
        assert value is not None, name
        return value

    def integer(self, name: str, default: int, *, minimum: int = 0) -> int:
        """An integer parameter in Postfix's syntax (MC-2), at least ``minimum`` when that is set.

        Raises:
          MapError: not an integer, out of the C int range, or below ``minimum``.
        """
        entry = self.cf.entries.get(name)
        if entry is None:
            number = default
        else:
            if not _POSTFIX_INT.fullmatch(entry.value):
                raise self.error(name, "bad numerical configuration: expected an integer")
            number = int(entry.value)
            if not _INT_MIN <= number <= _INT_MAX:
                raise self.error(name, f"integer out of range ({_INT_MIN}..{_INT_MAX})")
        if minimum and number < minimum:
            raise self.error(name, f"invalid value {number}: the minimum is {minimum}")
        return number

    def boolean(self, name: str, default: bool) -> bool:
        """A ``yes``/``no`` parameter (any case), as cfg_get_bool reads it.

        Raises:
          MapError: any other spelling.
        """
        entry = self.cf.entries.get(name)
        if entry is None:
            return default
        spelled = entry.value.lower()
        if spelled in ("yes", "no"):
            return spelled == "yes"
        raise self.error(name, "bad boolean configuration: use yes or no")


def read_settings(spec: str, path: str, names: Collection[str], *, manual: str) -> CfValues:
    """Read an SQL table's ``.cf`` file (SQL-1) with the names its engine knows.

    Raises:
      MapError: the file cannot be read, or it has syntax problems (each
        named with its line).
    """
    try:
        cf = read_cf_file(path, names, manual=manual)
    except OSError as exc:
        raise MapError(f"table {spec}: cannot read {path}: {exc.strerror or exc}") from None
    if cf.problems:
        raise MapError(f"table {spec}: " + "; ".join(str(problem) for problem in cf.problems))
    return CfValues(spec, cf)


@dataclass(frozen=True, slots=True)
class CommonSettings:
    """What every SQL engine reads from its file (SQL-2 .. SQL-5).

    Attributes:
      templates: ``query`` (or the legacy form) and ``result_format``.
      domain: the ``domain`` filter, None when unset or empty.
      expansion_limit: 0 or less = no limit.
    """

    templates: SqlTemplates
    domain: DomainFilter | None
    expansion_limit: int


def legacy_query(values: CfValues) -> str:
    """The query Postfix builds from ``table``, ``select_field`` ... (SQL-3).

    The result is a template like any other: a ``%`` in these parameters
    is a directive there, as in Postfix.

    Raises:
      MapError: ``table``, ``select_field`` or ``where_field`` is unset or empty.
    """
    parts = {}
    for name in ("table", "select_field", "where_field"):
        if not values.is_set(name):
            raise values.error(
                name, "not set: either query or table, select_field and where_field are required"
            )
        parts[name] = values.required_text(name, "", min_length=1)
    conditions = values.required_text("additional_conditions", "")
    return (
        f"SELECT {parts['select_field']} FROM {parts['table']} "
        f"WHERE {parts['where_field']}='%s' {conditions}"
    )


def common_settings(
    values: CfValues, *, smtputf8: bool, query_default: str | None = None
) -> CommonSettings:
    """Read the shared parameters of an SQL table (SQL-2 .. SQL-5).

    Args:
      values: the file.
      smtputf8: fold the ``domain`` literals with full Unicode folding.
      query_default: the query to use when ``query`` is unset, before
        the legacy form is tried (pgsql's ``select_function``).

    Raises:
      MapError: a bad template, a missing legacy parameter, a bad
        ``domain`` list or a bad ``expansion_limit``.
    """
    query = values.text("query", None) or query_default or legacy_query(values)
    result_format = values.required_text("result_format", "%s", min_length=1)
    try:
        templates = SqlTemplates(query, result_format, source=values.spec)
    except TemplateError as exc:
        raise MapError(f"table {values.spec}: {values.cf.path}: {exc}") from None
    expansion_limit = values.integer("expansion_limit", 0)
    domain_text = values.required_text("domain", "")
    domain: DomainFilter | None = None
    if domain_text.strip():
        try:
            domain = DomainFilter.parse(domain_text, smtputf8=smtputf8)
        except KeyConfigError as exc:
            raise values.error("domain", str(exc)) from None
    return CommonSettings(templates, domain, expansion_limit)


def split_hosts(text: str) -> list[str]:
    """A ``hosts`` list split as Postfix splits it; ``localhost`` when empty (SQL-2)."""
    hosts = [host for host in _HOST_SEPARATORS.split(text) if host]
    return hosts or ["localhost"]


def redact(host: str) -> str:
    """``host`` as it may be shown: a URI's password replaced by ``***``.

    Covers ``postgresql://user:secret@host/db`` and a ``password=`` query
    parameter; other host forms hold no secret and come back unchanged.
    """
    if "://" not in host:
        return host
    try:
        parts = urlsplit(host)
    except ValueError:
        return "(a connection URI that cannot be parsed)"
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(name == "password" for name, _ in pairs):
            query = urlencode([(n, "***" if n == "password" else v) for n, v in pairs])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def secrets_of(values: CfValues, hosts: Collection[str]) -> tuple[str, ...]:
    """Every secret text that must never reach a message: the password, URI passwords."""
    secrets = []
    password = values.text("password", "")
    if password:
        secrets.append(password)
    for host in hosts:
        if "://" not in host:
            continue
        try:
            parts = urlsplit(host)
            if parts.password:
                secrets.append(parts.password)
            secrets.extend(v for n, v in parse_qsl(parts.query) if n == "password" and v)
        except ValueError:
            secrets.append(host)
    return tuple(secrets)


def scrub(text: str, secrets: Collection[str]) -> str:
    """``text`` with every secret in it replaced (a driver message may quote one)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "(secret not shown)")
    return text
