"""The bridge configuration: one TOML file, optionally pulling in memcache_table(5) files.

Theory of operation
-------------------
:func:`load_config` reads the TOML file and turns it into frozen values
(:class:`BridgeConfig`, :class:`ListenerConfig`, :class:`TableConfig`) or
raises one :class:`ConfigError` listing *every* problem it found, so a
daemon either starts fully configured or not at all.

A table's settings are layered, lowest first::

    PARAMETERS defaults  <-  the .cf file named by ``config =``  <-  keys in [tables.NAME]

Each setting remembers where it was written (file, line, directory), so a
problem names the file that holds the bad value and relative file names
resolve against the directory of the file that mentions them.

The ``.cf`` reader follows Postfix's cfg_parser exactly (spec CF-1..CF-8,
on top of :func:`bridge.postfix_text.logical_lines`): ``name = value``
lines, no comments after values, no quoting, names case-sensitive,
unknown names ignored with a warning (Postfix ignores them too), the last
of a repeated name wins. Integers follow Postfix's syntax in both files
(MC-2, :func:`parse_postfix_int`).

:data:`PARAMETERS` is the one place that lists the table keys with their
defaults, minimums and descriptions: parsing is driven from it, and the
documentation is generated from it.

Warnings (ignored names, repeated names) go to the ``bridge.config`` logger.
"""

from __future__ import annotations

import dataclasses
import difflib
import grp
import logging
import math
import os
import pwd
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network
from types import MappingProxyType
from typing import Literal, TypeVar

from bridge.address_search import (
    resolve_mapping,
    validate_address_forms,
    validate_extension_classes,
    validate_mapping,
)
from bridge.endpoint import Endpoint, EndpointError, InetEndpoint, UnixEndpoint, parse_endpoint
from bridge.keys import (
    DomainFilter,
    KeyConfigError,
    KeyTemplate,
    make_digest,
)
from bridge.maps import OpenOptions, validate_spec
from bridge.maps.base import MapError
from bridge.memcache.ring import PoolServer
from bridge.postfix_text import WHITESPACE, logical_lines

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

_log = logging.getLogger("bridge.config")

_T = TypeVar("_T")

# ---------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with the configuration.

    ``table`` and ``key`` are None where they do not apply (a TOML syntax
    error has neither). ``line`` is known for ``.cf`` files and TOML syntax
    errors; ``listener`` is the 1-based position of a ``[[listen]]`` entry.
    """

    file: str
    table: str | None
    key: str | None
    message: str
    line: int | None = None
    listener: int | None = None

    def __str__(self) -> str:
        parts = [self.file if self.line is None else f"{self.file}, line {self.line}"]
        if self.listener is not None:
            parts.append(f"listener #{self.listener}")
        if self.table is not None:
            parts.append(f"table {self.table}")
        if self.key is not None:
            parts.append(self.key)
        parts.append(self.message)
        return ": ".join(parts)


class ConfigError(Exception):
    """The configuration cannot be used; :attr:`problems` says everything that is wrong.

    ``str()`` lists the problems one per line, as
    ``FILE: table NAME: KEY: message``.
    """

    def __init__(self, problems: Iterable[ConfigProblem]) -> None:
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


class _Invalid(Exception):
    """A value failed its check; the caller knows where it came from."""


# ------------------------------------------------------------- parameters

ParameterKind = Literal[
    "endpoint",  # inet:HOST:PORT | inet:[ADDR]:PORT | unix:PATH
    "table",  # Postfix type:name, empty = none
    "integer",  # Postfix integer syntax (MC-2), optional minimum
    "template",  # key_format syntax (KF-1)
    "digest",  # hashlib algorithm name, empty = none
    "domain",  # domain list syntax (DOM-2), empty = no filter
    "path",  # a file name, relative to the TOML file's directory
    "boolean",  # TOML true / false
    "forms",  # list of address-search forms
    "address_mapping",  # auto | virtual | canonical | generic | none
    "extension_classes",  # list of propagate_unmatched_extensions classes
    "delimiter",  # recipient delimiter character set
    "domains",  # list of domain names
    "seconds",  # non-negative number of seconds, 0 = no limit
    "protocol",  # "socketmap" | "tcp"
    "name",  # a table name
    "log_level",  # a logging level name
    "networks",  # list of client addresses or networks (CIDR)
    "mode",  # octal file permissions
    "user",  # user name or uid
    "group",  # group name or gid
    "servers",  # one memcache endpoint or a pool of them
    "ketama_hash",  # one_at_a_time | md5
    "log_format",  # text | json
]


@dataclass(frozen=True, slots=True)
class Parameter:
    """One configuration key: the single source of truth for its default and its docs.

    ``default`` is the text a user would write (``""`` = empty/none), or
    None when the key is required or its default depends on other keys
    (the description then says how). ``postfix`` marks memcache_table(5)
    parameters, the only keys a ``.cf`` file may set.
    """

    name: str
    default: str | None
    minimum: int | None
    kind: ParameterKind
    description: str
    postfix: bool = False


#: Keys of a ``[tables.NAME]`` section (MC-1 for the Postfix ones).
PARAMETERS: tuple[Parameter, ...] = (
    Parameter(
        "memcache",
        "inet:localhost:11211",
        None,
        "servers",
        "The memcache server: inet:HOST:PORT, inet:[ADDR]:PORT or unix:PATH; or a pool: a "
        "list of them (TOML array; items may be {endpoint, weight} tables), placed by ketama.",
        postfix=True,
    ),
    Parameter(
        "backup",
        "",
        None,
        "table",
        "Persistent backup table (type:name) asked when memcache has no answer; empty = none.",
        postfix=True,
    ),
    Parameter("flags", "0", None, "integer", "Flags stored with memcache updates.", postfix=True),
    Parameter(
        "ttl",
        "3600",
        None,
        "integer",
        "Expiry of memcache updates in seconds (memcache rules: 0 = never).",
        postfix=True,
    ),
    Parameter(
        "key_format",
        "%s",
        None,
        "template",
        "Template of the memcache key (%%, %s, %u, %d, %1-%9 and upper-case forms).",
        postfix=True,
    ),
    Parameter(
        "key_digest",
        "",
        None,
        "digest",
        "Digest algorithm applied to the memcache key, e.g. sha256; empty = none.",
        postfix=True,
    ),
    Parameter(
        "domain",
        "",
        None,
        "domain",
        "Only user@domain keys whose domain is in this list are looked up; empty = all keys.",
        postfix=True,
    ),
    Parameter(
        "data_size_limit",
        "10240",
        1,
        "integer",
        "Maximal memcache value length in bytes.",
        postfix=True,
    ),
    Parameter(
        "line_size_limit",
        "1024",
        1,
        "integer",
        "Maximal memcache reply line length in bytes.",
        postfix=True,
    ),
    Parameter("max_try", "2", 1, "integer", "Attempts per memcache command.", postfix=True),
    Parameter(
        "retry_pause",
        "1",
        1,
        "integer",
        "Seconds between attempts of a memcache command.",
        postfix=True,
    ),
    Parameter(
        "timeout",
        "2",
        None,
        "integer",
        "Time limit in seconds for each memcache connect, send and receive; <= 0 = none.",
        postfix=True,
    ),
    Parameter(
        "config",
        "",
        None,
        "path",
        "A memcache_table(5) file read first; the other keys of the section override it.",
    ),
    Parameter(
        "fold_case",
        "true",
        None,
        "boolean",
        "Lowercase keys like a Postfix memcache: table; false for verify/postscreen caches.",
    ),
    Parameter(
        "writable",
        "false",
        None,
        "boolean",
        "Allow update, delete and load (like proxy_write_maps); needs a writable backup (lmdb).",
    ),
    Parameter(
        "smtputf8",
        "true",
        None,
        "boolean",
        "Full Unicode case folding and UTF-8 key/value checks; false = ASCII folding only.",
    ),
    Parameter(
        "address_search",
        "full",
        None,
        "forms",
        "Key forms tried in order: full, nodelim, localpart, @domain, domain, parent_domains, "
        ".parent_domains, localpart@, networks.",
    ),
    Parameter(
        "address_mapping",
        "auto",
        None,
        "address_mapping",
        "The Postfix address mapping the table serves (virtual, canonical, generic) or none; "
        "auto = virtual when address_search lists localpart or @domain, else none.",
    ),
    Parameter(
        "propagate_unmatched_extensions",
        "canonical, virtual",
        None,
        "extension_classes",
        "As Postfix's parameter: address mappings whose results get the extension a lookup "
        "without it did not match.",
    ),
    Parameter(
        "recipient_delimiter",
        "+",
        None,
        "delimiter",
        "Characters that start an address extension, for address_search.",
    ),
    Parameter(
        "local_domains",
        "",
        None,
        "domains",
        "Domains whose addresses may be searched by bare local part (address_search).",
    ),
    Parameter(
        "ketama_hash",
        "one_at_a_time",
        None,
        "ketama_hash",
        "Key hash of a pool's ketama ring: one_at_a_time (libmemcached's default, pylibmc "
        "ketama) or md5 (libketama, weighted).",
    ),
    Parameter(
        "eject_after",
        "0",
        0,
        "integer",
        "Take a pool server out of the ring after this many failures in a row (its keys move); "
        "0 = never.",
    ),
    Parameter(
        "retry_after",
        "60",
        None,
        "seconds",
        "Seconds an ejected pool server stays out of the ring.",
    ),
    Parameter(
        "hot_cache_ttl",
        "0",
        None,
        "seconds",
        "Answer repeated keys from memory for this many seconds without asking memcache "
        "(found and not-found answers; may be this stale); 0 = off.",
    ),
    Parameter(
        "hot_cache_size",
        "10000",
        1,
        "integer",
        "Most keys the hot cache holds (least recently used go first).",
    ),
)

#: Keys of a ``[[listen]]`` section.
LISTENER_PARAMETERS: tuple[Parameter, ...] = (
    Parameter(
        "endpoint",
        None,
        None,
        "endpoint",
        "Where to listen: inet:HOST:PORT, inet:[ADDR]:PORT or unix:PATH. Required.",
    ),
    Parameter(
        "protocol",
        None,
        None,
        "protocol",
        "socketmap (every table, by name) or tcp (one table). Required.",
    ),
    Parameter(
        "table",
        None,
        None,
        "name",
        "The table a tcp listener serves. Required for tcp, not allowed for socketmap.",
    ),
    Parameter(
        "idle_timeout",
        None,
        None,
        "seconds",
        "Close a connection idle this many seconds; 0 = never. "
        "Default 100 for socketmap, 0 for tcp.",
    ),
    Parameter(
        "request_timeout",
        "10",
        None,
        "seconds",
        "Close a connection whose request has started but not completed within this many "
        "seconds (slow senders); 0 = never.",
    ),
    Parameter(
        "max_connections",
        "1000",
        1,
        "integer",
        "Most concurrent connections on this listener.",
    ),
    Parameter(
        "allow",
        "",
        None,
        "networks",
        'inet only: client networks allowed to connect, e.g. ["127.0.0.0/8", "::1/128"]; '
        "empty = any. Others are closed at accept.",
    ),
    Parameter(
        "reuse_port",
        "true",
        None,
        "boolean",
        "inet only: set SO_REUSEPORT, so a second instance can take over the port "
        "(zero-downtime upgrades).",
    ),
    Parameter(
        "mode",
        "0666",
        None,
        "mode",
        "unix only: permissions of the socket file (octal), like a loopback port by default; "
        "0660 with group restricts it.",
    ),
    Parameter(
        "owner",
        "",
        None,
        "user",
        "unix only: owner of the socket file (name or uid); empty = the daemon's user.",
    ),
    Parameter(
        "group",
        "",
        None,
        "group",
        "unix only: group of the socket file (name or gid); empty = the daemon's group.",
    ),
)

#: Keys at the top of the TOML file.
TOP_LEVEL_PARAMETERS: tuple[Parameter, ...] = (
    Parameter(
        "log_level",
        "info",
        None,
        "log_level",
        "Lowest level logged: debug, info, warning, error or critical.",
    ),
    Parameter(
        "log_format",
        "text",
        None,
        "log_format",
        "text (one Postfix-like line per event) or json (one object per line, for log shippers).",
    ),
    Parameter(
        "workers",
        "1",
        1,
        "integer",
        "Serving processes sharing the listeners (one core each); above 1 a supervisor forks them.",
    ),
    Parameter(
        "user",
        "",
        None,
        "user",
        "Run as this user (name or uid) once every listener is bound; "
        "empty = stay as started (a warning when that is root).",
    ),
    Parameter(
        "group",
        "",
        None,
        "group",
        "Run with this group (name or gid) once every listener is bound; "
        "empty = the user's primary group.",
    ),
)

#: Keys of the ``[metrics]`` section (optional).
METRICS_PARAMETERS: tuple[Parameter, ...] = (
    Parameter(
        "endpoint",
        None,
        None,
        "endpoint",
        "Where /metrics (Prometheus text) and /healthz are served: inet:HOST:PORT. Required.",
    ),
    Parameter(
        "health_interval",
        "10",
        None,
        "seconds",
        "Seconds between the memcache probes that /healthz reports.",
    ),
)

_PARAMETERS_BY_NAME: Mapping[str, Parameter] = {p.name: p for p in PARAMETERS}
_LISTENER_PARAMETERS_BY_NAME: Mapping[str, Parameter] = {p.name: p for p in LISTENER_PARAMETERS}
#: The memcache_table(5) names: the only names a .cf file can set (MC-1).
_POSTFIX_NAMES = frozenset(p.name for p in PARAMETERS if p.postfix)
_TOP_LEVEL_KEYS = ("listen", "tables", "metrics", *(p.name for p in TOP_LEVEL_PARAMETERS))

#: Postfix keeps integer parameters in a C int (MC-2).
_INT_MIN = -(2**31)
_INT_MAX = 2**31 - 1
#: MC-2: optional sign, ASCII decimal digits, nothing else. Written out
#: because Python's int() also takes '_' separators and non-ASCII digits.
_POSTFIX_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
#: Socketmap names go on the wire after the last ':' of the Postfix table
#: name and end at the first space (SM-1), so neither may appear; the rest
#: is kept to characters that are safe in file names and logs.
_TABLE_NAME = re.compile(r"[A-Za-z0-9_.-]+", re.ASCII)
#: Separators of list-valued keys given as one string, as in Postfix lists (DOM-2).
_LIST_SEPARATORS = re.compile(r"[,\s]+")
#: Socketmap's idle limit in Postfix's own server skeleton; a client that
#: goes quiet longer is gone anyway.
_SOCKETMAP_IDLE_TIMEOUT = 100.0
#: Postfix's tcp_table client sleeps 1 s after the server closes on it
#: (spec TCP-12), so a tcp listener keeps idle connections open.
_TCP_IDLE_TIMEOUT = 0.0
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def parse_postfix_int(text: str) -> int:
    """Parse an integer parameter exactly as Postfix's cfg_parser does (MC-2).

    Args:
      text: the value; surrounding whitespace is ignored, as the ``.cf``
        reader trims it anyway.

    Returns:
      The number. ``010`` is ten; a leading ``+`` is allowed.

    Raises:
      ValueError: for an empty value, anything but an optional sign and
        decimal digits (``0x10``, ``1e3``, ``10s``), or a number outside
        the 32-bit signed range.
    """
    stripped = text.strip(WHITESPACE.decode("ascii"))
    if not stripped:
        raise ValueError("empty value: an integer is required")
    if not _POSTFIX_INT.fullmatch(stripped):
        raise ValueError(f"invalid integer {text!r}: use an optional sign and decimal digits only")
    number = int(stripped)
    if not _INT_MIN <= number <= _INT_MAX:
        raise ValueError(f"integer {text!r} is out of range ({_INT_MIN}..{_INT_MAX})")
    return number


# ---------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class TableConfig:
    """A table, validated: every field is ready to use.

    ``source`` names the file(s) for messages: ``FILE`` or
    ``FILE (via CFFILE)``. ``base_dir`` is the directory relative table
    names in ``backup`` and in ``domain`` table items resolve against: the
    directory of the file that set ``backup`` (else ``domain``, else the
    ``.cf`` file, else the TOML file).
    """

    name: str
    source: str
    base_dir: str
    memcache: tuple[PoolServer, ...]
    backup: str | None
    flags: int
    ttl: int
    key_format: KeyTemplate
    key_digest: str | None
    domain: DomainFilter | None
    data_size_limit: int
    line_size_limit: int
    max_try: int
    retry_pause: int
    timeout: int
    fold_case: bool
    writable: bool
    smtputf8: bool
    address_search: tuple[str, ...]
    #: virtual, canonical, generic or none ("auto" is resolved at load)
    address_mapping: str
    propagate_unmatched_extensions: tuple[str, ...]
    recipient_delimiter: str
    local_domains: tuple[str, ...]
    ketama_hash: str = "one_at_a_time"
    eject_after: int = 0
    retry_after: float = 60.0
    hot_cache_ttl: float = 0.0
    hot_cache_size: int = 10000


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One ``[[listen]]`` entry. ``table`` is set for tcp, None for socketmap."""

    endpoint: Endpoint
    protocol: Literal["socketmap", "tcp"]
    table: str | None
    idle_timeout: float
    max_connections: int
    request_timeout: float = 10.0
    allow: tuple[IPv4Network | IPv6Network, ...] = ()
    reuse_port: bool = True
    mode: int = 0o666
    owner: int | None = None
    group: int | None = None


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    """The whole configuration. ``path`` is the absolute TOML file name."""

    path: str
    listeners: tuple[ListenerConfig, ...]
    tables: Mapping[str, TableConfig]
    log_level: str
    #: where /metrics and /healthz are served; None = no metrics listener
    metrics_endpoint: InetEndpoint | None = None
    health_interval: float = 10.0
    #: uid and gid to switch to after binding; None = keep.
    user: int | None = None
    group: int | None = None
    workers: int = 1
    log_format: str = "text"


# ----------------------------------------------------------- the .cf file


@dataclass(frozen=True, slots=True)
class _CfEntry:
    value: str
    line: int


def _split_cf_line(text: bytes) -> tuple[bytes, bytes] | str:
    """CF-5: split ``name = value``; returns (name, value) or an error message."""
    name_end = 0
    while name_end < len(text) and text[name_end] not in WHITESPACE + b"=":
        name_end += 1
    name = text[:name_end]
    rest = text[name_end:].lstrip(WHITESPACE)
    if not name:
        return "missing parameter name before '='"
    if not rest.startswith(b"="):
        shown = name.decode("utf-8", "replace")
        return f"missing '=' after parameter name {shown!r}"
    # Trailing whitespace includes the CR of a CRLF file (CF-7).
    return name, rest[1:].strip(WHITESPACE)


def _read_cf(path: str) -> tuple[dict[str, _CfEntry], list[ConfigProblem]]:
    """Read a memcache_table(5) file: its known parameters, and its syntax problems.

    Raises:
      OSError: the file cannot be read.
    """
    with open(path, "rb") as stream:
        data = stream.read()
    entries: dict[str, _CfEntry] = {}
    problems: list[ConfigProblem] = []
    for logical in logical_lines(data, source=path):
        split = _split_cf_line(logical.text)
        if isinstance(split, str):
            problems.append(ConfigProblem(path, None, None, split, line=logical.lineno))
            continue
        raw_name, raw_value = split
        name = raw_name.decode("utf-8", "replace")
        if name not in _POSTFIX_NAMES:
            _warn_ignored_cf_name(path, logical.lineno, name)
            continue
        try:
            value = raw_value.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(
                ConfigProblem(path, None, name, "value is not valid UTF-8", line=logical.lineno)
            )
            continue
        earlier = entries.get(name)
        if earlier is not None and earlier.value != value:
            # CF-6: Postfix keeps the last value; say so, since it is rarely meant.
            _log.warning(
                "%s, line %d: %s: overrides the different value given on line %d",
                path,
                logical.lineno,
                name,
                earlier.line,
            )
        entries[name] = _CfEntry(value, logical.lineno)
    return entries, problems


def _warn_ignored_cf_name(path: str, line: int, name: str) -> None:
    if name in _PARAMETERS_BY_NAME:
        _log.warning(
            "%s, line %d: %s: ignored: a bridge-only setting is not read from a "
            "memcache_table(5) file; set it in the TOML table",
            path,
            line,
            name,
        )
    else:
        # MC-1: Postfix ignores names it does not know, so the bridge must too.
        _log.warning("%s, line %d: %s: unknown parameter, ignored", path, line, name)


def parse_cf_file(path: str) -> dict[str, str]:
    """Read a memcache_table(5) ``.cf`` file as Postfix does (CF-1..CF-8).

    Args:
      path: the file name.

    Returns:
      The memcache_table(5) parameters it sets (MC-1 names only; other
      names are ignored with a warning), values trimmed and otherwise
      unchanged: no comment, quote or ``$name`` processing.

    Raises:
      ConfigError: the file cannot be read, or a line has no ``=`` or no
        name (CF-5). Every bad line is listed, with its line number.
    """
    try:
        entries, problems = _read_cf(path)
    except OSError as exc:
        raise ConfigError([ConfigProblem(path, None, None, _os_reason(exc))]) from None
    if problems:
        raise ConfigError(problems)
    return {name: entry.value for name, entry in entries.items()}


def _os_reason(exc: OSError) -> str:
    return f"cannot read file: {exc.strerror or exc}"


# ------------------------------------------------------ value conversion


@dataclass(frozen=True, slots=True)
class _Setting:
    """A raw value and where it was written."""

    value: object
    file: str
    line: int | None
    base_dir: str


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, not {_toml_type(value)}")
    return value


def _integer(value: object, minimum: int | None) -> int:
    if isinstance(value, bool):
        raise _Invalid("must be an integer, not a boolean")
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise _Invalid(f"integer {value} is out of range ({_INT_MIN}..{_INT_MAX})")
        number = value
    elif isinstance(value, str):
        try:
            number = parse_postfix_int(value)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
    else:
        raise _Invalid(f"must be an integer, not {_toml_type(value)}")
    if minimum is not None and number < minimum:
        raise _Invalid(f"{number} is below the minimum {minimum}")
    return number


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise _Invalid(f"must be true or false (a TOML boolean), not {_toml_type(value)}")


def _string_list(value: object) -> list[str]:
    """A TOML array of strings, or one string separated by commas and/or whitespace."""
    if isinstance(value, str):
        return [item for item in _LIST_SEPARATORS.split(value) if item]
    if isinstance(value, list):
        items: list[str] = []
        for item in value:
            if not isinstance(item, str):
                raise _Invalid(f"list items must be strings, not {_toml_type(item)}")
            if not item or _LIST_SEPARATORS.search(item):
                raise _Invalid(f"list item {item!r} must be one non-empty word")
            items.append(item)
        return items
    raise _Invalid(f"must be a list of strings or one string, not {_toml_type(value)}")


def _endpoint(setting: _Setting) -> Endpoint:
    text = _text(setting.value)
    if not text.strip():
        # MC-3: unlike other empty values, an empty server is not "none".
        raise _Invalid("empty value: a server is required (inet:HOST:PORT or unix:PATH)")
    try:
        return parse_endpoint(text, base_dir=setting.base_dir)
    except EndpointError as exc:
        raise _Invalid(str(exc)) from None


def _servers(setting: _Setting) -> tuple[PoolServer, ...]:
    """One memcache server, or a pool: a TOML array, or endpoints separated by spaces/commas."""
    raw = setting.value
    items = raw if isinstance(raw, list) else [raw]
    servers: list[PoolServer] = []
    for item in items:
        weight, spelled = 1, item
        if isinstance(item, dict):
            unknown = set(item) - {"endpoint", "weight"}
            if unknown or "endpoint" not in item:
                raise _Invalid('a pool entry is {endpoint = "inet:HOST:PORT", weight = N}')
            weight = _integer(item.get("weight", 1), 1)
            spelled = item["endpoint"]
        for text in re.split(r"[\s,]+", _text(spelled)):
            if not text:
                continue
            endpoint = _endpoint(_Setting(text, setting.file, setting.line, setting.base_dir))
            servers.append(PoolServer(endpoint, weight))
    if not servers:
        # MC-3: unlike other empty values, an empty server is not "none".
        raise _Invalid("empty value: a server is required (inet:HOST:PORT or unix:PATH)")
    if len({server.endpoint for server in servers}) != len(servers):
        raise _Invalid("a server is listed twice")
    return tuple(servers)


def _ketama_hash(value: object) -> str:
    text = _text(value).strip()
    if text not in ("one_at_a_time", "md5"):
        raise _Invalid(f'must be "one_at_a_time" or "md5", not {value!r}')
    return text


def _table_spec(setting: _Setting, *, writable: bool = False) -> str | None:
    text = _text(setting.value).strip()
    if not text:
        return None  # MC-3: "backup =" means no backup.
    try:
        validate_spec(text, OpenOptions(setting.base_dir, writable=writable))
    except MapError as exc:
        raise _Invalid(str(exc)) from None
    return text


def _template(setting: _Setting) -> KeyTemplate:
    try:
        # MC-3: an empty template is valid (every lookup is skipped).
        return KeyTemplate.parse(_text(setting.value))
    except KeyConfigError as exc:
        raise _Invalid(str(exc)) from None


def _digest(setting: _Setting) -> str | None:
    name = _text(setting.value).strip()
    if not name:
        return None  # MC-3
    try:
        make_digest(name)
    except KeyConfigError as exc:
        # MC-6 makes this a table Postfix cannot use; the bridge refuses to start.
        raise _Invalid(str(exc)) from None
    return name


def _domain_filter(setting: _Setting, *, smtputf8: bool) -> DomainFilter | None:
    value = setting.value
    # A TOML array is the same list as its items joined by commas (DOM-2).
    text = ", ".join(_string_list(value)) if isinstance(value, list) else _text(value)
    if not text.strip(WHITESPACE.decode("ascii")):
        # MC-3: "domain =" means no filter. A list of only separators
        # ("domain = ,") is not empty to Postfix: it matches nothing.
        return None
    try:
        domain = DomainFilter.parse(text, base_dir=setting.base_dir, smtputf8=smtputf8)
    except KeyConfigError as exc:
        raise _Invalid(str(exc)) from None
    # DOM-6 tables are opened later; check their syntax now so a typo is
    # reported with everything else instead of at first use.
    for spec in domain.table_specs:
        try:
            validate_spec(spec, OpenOptions(setting.base_dir))
        except MapError as exc:
            raise _Invalid(str(exc)) from None
    return domain


def _forms(setting: _Setting) -> tuple[str, ...]:
    try:
        return validate_address_forms(_string_list(setting.value))
    except KeyConfigError as exc:
        raise _Invalid(str(exc)) from None


def _address_mapping(setting: _Setting) -> str:
    try:
        return validate_mapping(_text(setting.value).strip())
    except KeyConfigError as exc:
        raise _Invalid(str(exc)) from None


def _extension_classes(setting: _Setting) -> tuple[str, ...]:
    try:
        return validate_extension_classes(_string_list(setting.value))
    except KeyConfigError as exc:
        raise _Invalid(str(exc)) from None


def _delimiter(setting: _Setting) -> str:
    text = _text(setting.value)
    bad = [char for char in text if char == "@" or char.isspace() or not char.isprintable()]
    if bad:
        raise _Invalid(f"{text!r}: '@', whitespace and control characters cannot be delimiters")
    return text


def _domains(setting: _Setting) -> tuple[str, ...]:
    # Duplicates are harmless but dropped so the tuple reads as a set.
    return tuple(dict.fromkeys(_string_list(setting.value)))


#: How each kind of table key is checked. ``config`` is read before the
#: others, and ``domain`` needs the table's smtputf8: both are done apart.
_CONVERTERS: Mapping[str, Callable[[_Setting, Parameter], object]] = {
    "endpoint": lambda setting, param: _endpoint(setting),
    "table": lambda setting, param: _table_spec(setting),
    "integer": lambda setting, param: _integer(setting.value, param.minimum),
    "template": lambda setting, param: _template(setting),
    "digest": lambda setting, param: _digest(setting),
    "boolean": lambda setting, param: _boolean(setting.value),
    "forms": lambda setting, param: _forms(setting),
    "address_mapping": lambda setting, param: _address_mapping(setting),
    "extension_classes": lambda setting, param: _extension_classes(setting),
    "delimiter": lambda setting, param: _delimiter(setting),
    "domains": lambda setting, param: _domains(setting),
    "seconds": lambda setting, param: _seconds(setting.value),
    "servers": lambda setting, param: _servers(setting),
    "ketama_hash": lambda setting, param: _ketama_hash(setting.value),
}


def _take(values: Mapping[str, object], name: str, kind: type[_T]) -> _T:
    value = values[name]
    assert isinstance(value, kind), (name, value)
    return value


def _take_optional(values: Mapping[str, object], name: str, kind: type[_T]) -> _T | None:
    value = values[name]
    assert value is None or isinstance(value, kind), (name, value)
    return value


# ---------------------------------------------------------------- tables


@dataclass(frozen=True, slots=True)
class _TomlFile:
    path: str  # as the user gave it, for messages
    base_dir: str  # absolute directory of the file


def _unknown_keys(found: Iterable[str], known: Sequence[str]) -> Iterable[tuple[str, str]]:
    """Yield (key, message) for every key not in ``known``, with a spelling hint."""
    for key in found:
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        yield key, f"unknown key{hint}"


def _load_table(
    name: str, raw: object, toml: _TomlFile
) -> tuple[TableConfig | None, list[ConfigProblem]]:
    """Check one ``[tables.NAME]`` section, with its ``.cf`` file if it names one."""
    problems: list[ConfigProblem] = []
    if not _TABLE_NAME.fullmatch(name):
        message = (
            "invalid table name: use only letters, digits, '_', '.' and '-' "
            "(socketmap names cannot hold ':' or spaces, SM-1)"
        )
        problems.append(ConfigProblem(toml.path, name, None, message))
    if not isinstance(raw, dict):
        message = f"must be a table ([tables.{name}]), not {_toml_type(raw)}"
        problems.append(ConfigProblem(toml.path, name, None, message))
        return None, problems
    for key, message in _unknown_keys(raw, tuple(_PARAMETERS_BY_NAME)):
        problems.append(ConfigProblem(toml.path, name, key, message))

    cf, cf_problems = _table_cf_file(raw.get("config"), toml)
    problems.extend(dataclasses.replace(p, table=name) for p in cf_problems)
    settings = _layer_settings(raw, cf, toml)
    values, value_problems = _convert_settings(settings)
    problems.extend(dataclasses.replace(p, table=name) for p in value_problems)
    if problems:
        return None, problems

    # TableConfig has one base_dir for backup and for domain table items:
    # backup's own file wins, as a relative backup name is the common case.
    base_dir = cf.base_dir if cf else toml.base_dir
    if values["backup"] is not None:
        base_dir = settings["backup"].base_dir
    elif values["domain"] is not None:
        base_dir = settings["domain"].base_dir
    source = f"{toml.path} (via {cf.path})" if cf else toml.path
    return _table_config(name, source, base_dir, values), []


@dataclass(frozen=True, slots=True)
class _CfSource:
    """A memcache_table(5) file named by ``config =``, read."""

    path: str
    base_dir: str
    entries: Mapping[str, _CfEntry]


def _table_cf_file(config: object, toml: _TomlFile) -> tuple[_CfSource | None, list[ConfigProblem]]:
    """Read the ``.cf`` file of a table (None: the table has no ``config =``)."""
    if config is None:
        return None, []
    if not isinstance(config, str):
        message = f"must be a file name (a string), not {_toml_type(config)}"
        return None, [ConfigProblem(toml.path, None, "config", message)]
    if not config.strip():
        return None, [ConfigProblem(toml.path, None, "config", "empty file name")]
    path = os.path.normpath(os.path.join(toml.base_dir, config.strip()))
    try:
        entries, problems = _read_cf(path)
    except OSError as exc:
        # MC-6: Postfix cannot use a table whose .cf file it cannot read.
        return None, [ConfigProblem(toml.path, None, "config", f"{path}: {_os_reason(exc)}")]
    return _CfSource(path, os.path.dirname(path), entries), problems


def _layer_settings(
    raw: Mapping[str, object], cf: _CfSource | None, toml: _TomlFile
) -> dict[str, _Setting]:
    """Defaults, then the ``.cf`` file, then the TOML section: the last one given wins."""
    settings: dict[str, _Setting] = {}
    for param in PARAMETERS:
        assert param.default is not None  # every table key has a default
        # Booleans are spelled as in TOML in PARAMETERS, but TOML users must
        # write real booleans, so the default is converted here, not parsed.
        default: object = param.default == "true" if param.kind == "boolean" else param.default
        if cf is None:
            settings[param.name] = _Setting(default, toml.path, None, toml.base_dir)
        else:
            settings[param.name] = _Setting(default, cf.path, None, cf.base_dir)
    if cf is not None:
        for key, entry in cf.entries.items():
            settings[key] = _Setting(entry.value, cf.path, entry.line, cf.base_dir)
    for key, value in raw.items():
        if key in _PARAMETERS_BY_NAME:
            settings[key] = _Setting(value, toml.path, None, toml.base_dir)
    return settings


def _convert_settings(
    settings: Mapping[str, _Setting],
) -> tuple[dict[str, object], list[ConfigProblem]]:
    """Check and convert every setting, driven by the kinds in :data:`PARAMETERS`."""
    values: dict[str, object] = {}
    problems: list[ConfigProblem] = []

    def convert(name: str, converter: Callable[[_Setting], object]) -> None:
        setting = settings[name]
        try:
            values[name] = converter(setting)
        except _Invalid as exc:
            problems.append(ConfigProblem(setting.file, None, name, str(exc), line=setting.line))

    for param in PARAMETERS:
        converter = _CONVERTERS.get(param.kind)
        if converter is not None:
            convert(param.name, _bind(converter, param))
    # The domain list folds its literals, so it needs the table's smtputf8.
    smtputf8 = values.get("smtputf8") is not False
    convert("domain", lambda setting: _domain_filter(setting, smtputf8=smtputf8))
    # writable needs a backup type the bridge can write (like proxywrite, PX-2).
    if values.get("writable") is True and isinstance(values.get("backup"), str):
        convert("backup", lambda setting: _table_spec(setting, writable=True))
    return values, problems


def _bind(
    converter: Callable[[_Setting, Parameter], object], param: Parameter
) -> Callable[[_Setting], object]:
    return lambda setting: converter(setting, param)


def _table_config(
    name: str, source: str, base_dir: str, values: Mapping[str, object]
) -> TableConfig:
    return TableConfig(
        name=name,
        source=source,
        base_dir=base_dir,
        memcache=_take(values, "memcache", tuple),
        backup=_take_optional(values, "backup", str),
        flags=_take(values, "flags", int),
        ttl=_take(values, "ttl", int),
        key_format=_take(values, "key_format", KeyTemplate),
        key_digest=_take_optional(values, "key_digest", str),
        domain=_take_optional(values, "domain", DomainFilter),
        data_size_limit=_take(values, "data_size_limit", int),
        line_size_limit=_take(values, "line_size_limit", int),
        max_try=_take(values, "max_try", int),
        retry_pause=_take(values, "retry_pause", int),
        timeout=_take(values, "timeout", int),
        fold_case=_take(values, "fold_case", bool),
        writable=_take(values, "writable", bool),
        smtputf8=_take(values, "smtputf8", bool),
        address_search=_take(values, "address_search", tuple),
        address_mapping=resolve_mapping(
            _take(values, "address_mapping", str), _take(values, "address_search", tuple)
        ),
        propagate_unmatched_extensions=_take(values, "propagate_unmatched_extensions", tuple),
        recipient_delimiter=_take(values, "recipient_delimiter", str),
        local_domains=_take(values, "local_domains", tuple),
        ketama_hash=_take(values, "ketama_hash", str),
        eject_after=_take(values, "eject_after", int),
        retry_after=_take(values, "retry_after", float),
        hot_cache_ttl=_take(values, "hot_cache_ttl", float),
        hot_cache_size=_take(values, "hot_cache_size", int),
    )


# ------------------------------------------------------------- listeners


def _load_listener(
    index: int, raw: object, table_names: Iterable[str], toml: _TomlFile
) -> tuple[ListenerConfig | None, list[ConfigProblem]]:
    problems: list[ConfigProblem] = []

    def problem(key: str | None, message: str) -> None:
        problems.append(ConfigProblem(toml.path, None, key, message, listener=index))

    if not isinstance(raw, dict):
        problem(None, f"must be a table ([[listen]]), not {_toml_type(raw)}")
        return None, problems
    for key, message in _unknown_keys(raw, tuple(_LISTENER_PARAMETERS_BY_NAME)):
        problem(key, message)

    def setting(key: str) -> _Setting:
        return _Setting(raw[key], toml.path, None, toml.base_dir)

    endpoint: Endpoint | None = None
    if "endpoint" not in raw:
        problem("endpoint", "missing: say where to listen (inet:HOST:PORT or unix:PATH)")
    else:
        try:
            endpoint = _endpoint(setting("endpoint"))
        except _Invalid as exc:
            problem("endpoint", str(exc))

    protocol: Literal["socketmap", "tcp"] | None = None
    if "protocol" not in raw:
        problem("protocol", 'missing: use "socketmap" or "tcp"')
    elif raw["protocol"] == "socketmap":
        protocol = "socketmap"
    elif raw["protocol"] == "tcp":
        protocol = "tcp"
    else:
        problem("protocol", f'must be "socketmap" or "tcp", not {raw["protocol"]!r}')

    table: str | None = None
    if protocol == "socketmap" and "table" in raw:
        problem("table", "not allowed for socketmap: it serves every table by name")
    elif protocol == "tcp":
        if "table" not in raw:
            problem("table", "missing: a tcp listener serves exactly one table")
        else:
            try:
                table = _text(raw["table"])
            except _Invalid as exc:
                problem("table", str(exc))
            else:
                if table not in table_names:
                    problem("table", f"unknown table {table!r}: no [tables.{table}] section")

    idle_timeout = _SOCKETMAP_IDLE_TIMEOUT if protocol == "socketmap" else _TCP_IDLE_TIMEOUT
    if "idle_timeout" in raw:
        try:
            idle_timeout = _seconds(raw["idle_timeout"])
        except _Invalid as exc:
            problem("idle_timeout", str(exc))

    param = _LISTENER_PARAMETERS_BY_NAME["max_connections"]
    assert param.default is not None
    max_connections = int(param.default)
    if "max_connections" in raw:
        try:
            max_connections = _integer(raw["max_connections"], param.minimum)
        except _Invalid as exc:
            problem("max_connections", str(exc))

    extras: dict[str, object] = {}
    if "request_timeout" in raw:
        try:
            extras["request_timeout"] = _seconds(raw["request_timeout"])
        except _Invalid as exc:
            problem("request_timeout", str(exc))
    inet_only = ("allow", "reuse_port")
    unix_only = ("mode", "owner", "group")
    for key in (*inet_only, *unix_only):
        if key not in raw:
            continue
        wrong_kind = (key in inet_only and isinstance(endpoint, UnixEndpoint)) or (
            key in unix_only and isinstance(endpoint, InetEndpoint)
        )
        if wrong_kind:
            kind = "inet" if key in inet_only else "unix"
            problem(key, f"only for {kind}: listeners")
            continue
        try:
            extras[key] = _LISTENER_CONVERTERS[key](raw[key])
        except _Invalid as exc:
            problem(key, str(exc))

    if problems or endpoint is None or protocol is None:
        return None, problems
    listener = ListenerConfig(endpoint, protocol, table, idle_timeout, max_connections)
    return dataclasses.replace(listener, **extras), []  # type: ignore[arg-type]


def _networks(value: object) -> tuple[IPv4Network | IPv6Network, ...]:
    networks = []
    for item in _string_list(value):
        try:
            networks.append(ip_network(item, strict=False))
        except ValueError:
            raise _Invalid(f"{item!r} is not an address or network (e.g. 10.1.0.0/16)") from None
    return tuple(networks)


def _mode(value: object) -> int:
    text = _text(value).strip()
    if not re.fullmatch(r"0?[0-7]{3}", text):
        raise _Invalid(f'must be an octal permission string such as "0660", not {value!r}')
    return int(text, 8)


def _uid(value: object) -> int:
    text = _text(value).strip()
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise _Invalid(f"no such user {text!r}") from None


def _gid(value: object) -> int:
    text = _text(value).strip()
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise _Invalid(f"no such group {text!r}") from None


_LISTENER_CONVERTERS: Mapping[str, Callable[[object], object]] = {
    "allow": _networks,
    "reuse_port": _boolean,
    "mode": _mode,
    "owner": _uid,
    "group": _gid,
}


def _seconds(value: object) -> float:
    if isinstance(value, bool):
        raise _Invalid("must be a number of seconds, not a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(parse_postfix_int(value))
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
    else:
        raise _Invalid(f"must be a number of seconds, not {_toml_type(value)}")
    if not math.isfinite(seconds) or seconds < 0:
        raise _Invalid(f"{value!r} is not a number of seconds >= 0 (0 = never)")
    return seconds


def _load_listeners(
    raw: object, table_names: Iterable[str], toml: _TomlFile
) -> tuple[list[ListenerConfig], list[ConfigProblem]]:
    if raw is None or raw == []:
        return [], [ConfigProblem(toml.path, None, None, "no listeners: add a [[listen]] section")]
    if not isinstance(raw, list):
        message = f"must be an array of tables (write [[listen]]), not {_toml_type(raw)}"
        return [], [ConfigProblem(toml.path, None, "listen", message)]
    names = tuple(table_names)
    listeners: list[ListenerConfig] = []
    problems: list[ConfigProblem] = []
    first_use: dict[Endpoint, int] = {}
    for index, item in enumerate(raw, start=1):
        listener, listener_problems = _load_listener(index, item, names, toml)
        problems.extend(listener_problems)
        if listener is None:
            continue
        endpoint = _comparable(listener.endpoint)
        if endpoint in first_use:
            message = f"{listener.endpoint} is already used by listener #{first_use[endpoint]}"
            problems.append(ConfigProblem(toml.path, None, "endpoint", message, listener=index))
            continue
        first_use[endpoint] = index
        listeners.append(listener)
    return listeners, problems


def _comparable(endpoint: Endpoint) -> Endpoint:
    """The endpoint with its path normalised, so ``a/../s`` and ``s`` count as the same socket."""
    if isinstance(endpoint, UnixEndpoint):
        return UnixEndpoint(os.path.normpath(endpoint.path))
    return InetEndpoint(endpoint.host.lower(), endpoint.port)


# -------------------------------------------------------------- the file


def _read_toml(toml: _TomlFile) -> dict[str, object]:
    """Parse the TOML file.

    Raises:
      ConfigError: unreadable file or TOML syntax error (with its line).
    """
    try:
        with open(toml.path, "rb") as stream:
            return tomllib.load(stream)
    except OSError as exc:
        raise ConfigError([ConfigProblem(toml.path, None, None, _os_reason(exc))]) from None
    except UnicodeDecodeError:
        message = "not valid UTF-8 (TOML files must be UTF-8)"
        raise ConfigError([ConfigProblem(toml.path, None, None, message)]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_toml_syntax_problem(toml.path, exc)]) from None


#: tomllib puts the position at the end of its message; Python 3.14 also
#: has attributes for it, but 3.10-3.13 do not.
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def _toml_syntax_problem(path: str, exc: ValueError) -> ConfigProblem:
    message = str(exc)
    position = _TOML_POSITION.search(message)
    if position is None:
        return ConfigProblem(path, None, None, f"TOML syntax error: {message}")
    line, column = int(position[1]), int(position[2])
    text = message[: position.start()]
    return ConfigProblem(
        path, None, None, f"TOML syntax error: {text} (column {column})", line=line
    )


def _log_level(raw: Mapping[str, object], toml: _TomlFile) -> tuple[str, list[ConfigProblem]]:
    param = TOP_LEVEL_PARAMETERS[0]
    assert param.default is not None
    value = raw.get(param.name, param.default)
    if isinstance(value, str) and value.lower() in _LOG_LEVELS:
        return value.lower(), []
    message = f"must be one of {', '.join(_LOG_LEVELS)}, not {value!r}"
    return param.default, [ConfigProblem(toml.path, None, param.name, message)]


def _metrics_section(
    raw: object, toml: _TomlFile
) -> tuple[InetEndpoint | None, float, list[ConfigProblem]]:
    """``[metrics]``: endpoint (inet only) and health_interval."""
    if raw is None:
        return None, 10.0, []
    problems: list[ConfigProblem] = []

    def problem(key: str | None, message: str) -> None:
        problems.append(
            ConfigProblem(toml.path, None, f"metrics.{key}" if key else "metrics", message)
        )

    if not isinstance(raw, dict):
        problem(None, f"must be a table ([metrics]), not {_toml_type(raw)}")
        return None, 10.0, problems
    for key, message in _unknown_keys(raw, ("endpoint", "health_interval")):
        problem(key, message)
    endpoint: InetEndpoint | None = None
    if "endpoint" not in raw:
        problem("endpoint", 'missing: e.g. endpoint = "inet:127.0.0.1:9464"')
    else:
        try:
            parsed = _endpoint(_Setting(raw["endpoint"], toml.path, None, toml.base_dir))
        except _Invalid as exc:
            problem("endpoint", str(exc))
        else:
            if isinstance(parsed, InetEndpoint):
                endpoint = parsed
            else:
                problem("endpoint", "must be inet:HOST:PORT (HTTP for Prometheus)")
    interval = 10.0
    if "health_interval" in raw:
        try:
            interval = _seconds(raw["health_interval"])
        except _Invalid as exc:
            problem("health_interval", str(exc))
        if interval <= 0:
            problem("health_interval", "must be above 0 seconds")
    return endpoint, interval, problems


def load_config(path: str) -> BridgeConfig:
    """Read and check the whole configuration.

    Args:
      path: the TOML file. Relative file names inside it resolve against
        its directory; relative names inside a ``.cf`` file against the
        ``.cf`` file's directory.

    Returns:
      The configuration, every value checked and converted.

    Raises:
      ConfigError: listing every problem found (unknown keys, bad values,
        unreadable or malformed ``.cf`` files, listener mistakes, ...).
        Nothing is returned half-configured.
    """
    toml = _TomlFile(path, os.path.dirname(os.path.abspath(path)))
    raw = _read_toml(toml)
    problems: list[ConfigProblem] = []
    for key, message in _unknown_keys(raw, _TOP_LEVEL_KEYS):
        problems.append(ConfigProblem(toml.path, None, key, message))
    log_level, level_problems = _log_level(raw, toml)
    problems.extend(level_problems)

    raw_tables = raw.get("tables", {})
    tables: dict[str, TableConfig] = {}
    if not isinstance(raw_tables, dict):
        message = f"must be a table of tables ([tables.NAME]), not {_toml_type(raw_tables)}"
        problems.append(ConfigProblem(toml.path, None, "tables", message))
        raw_tables = {}
    elif not raw_tables:
        message = "no tables: add a [tables.NAME] section"
        problems.append(ConfigProblem(toml.path, None, None, message))
    for name, raw_table in raw_tables.items():
        table, table_problems = _load_table(name, raw_table, toml)
        problems.extend(table_problems)
        if table is not None:
            tables[name] = table

    listeners, listener_problems = _load_listeners(raw.get("listen"), raw_tables, toml)
    problems.extend(listener_problems)
    identity: dict[str, int | None] = {"user": None, "group": None}
    for key, convert in (("user", _uid), ("group", _gid)):
        if raw.get(key, "") != "":
            try:
                identity[key] = convert(raw[key])
            except _Invalid as exc:
                problems.append(ConfigProblem(toml.path, None, key, str(exc)))
    metrics_endpoint, health_interval, metrics_problems = _metrics_section(raw.get("metrics"), toml)
    problems.extend(metrics_problems)
    log_format = raw.get("log_format", "text")
    if log_format not in ("text", "json"):
        problems.append(
            ConfigProblem(
                toml.path, None, "log_format", f'must be "text" or "json", not {log_format!r}'
            )
        )
        log_format = "text"
    workers = 1
    if "workers" in raw:
        try:
            workers = _integer(raw["workers"], 1)
        except _Invalid as exc:
            problems.append(ConfigProblem(toml.path, None, "workers", str(exc)))
    if workers > 1 and metrics_endpoint is not None:
        # Each worker would count only its own lookups, and only one could
        # bind the port: /metrics would be wrong, not merely partial.
        message = "not supported together with workers > 1 (each worker counts only its own)"
        problems.append(ConfigProblem(toml.path, None, "metrics", message))
    if problems:
        raise ConfigError(problems)
    return BridgeConfig(
        path=os.path.abspath(path),
        listeners=tuple(listeners),
        tables=MappingProxyType(tables),
        log_level=log_level,
        user=identity["user"],
        group=identity["group"],
        workers=workers,
        log_format=str(log_format),
        metrics_endpoint=metrics_endpoint,
        health_interval=health_interval,
    )
