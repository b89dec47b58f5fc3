"""The parameter schema: every configuration key, its kind, default and documentation.

Theory of operation
-------------------
A configuration has four sections: the top level of the TOML file,
each ``[[listen]]`` entry, the optional ``[metrics]`` table and each
``[tables.NAME]`` table. Each has one tuple of :class:`Parameter` records
here (:data:`TOP_LEVEL_PARAMETERS`, :data:`LISTENER_PARAMETERS`,
:data:`METRICS_PARAMETERS`, :data:`PARAMETERS`), and those tuples are the
single place a key's default is written:

* the loaders (:mod:`bridge.config._load`, :mod:`bridge.config._tables`)
  take every value the user did not write from here, converted by the
  same converter as a written value, so a default is checked like any
  other value and the result dataclasses have no defaults of their own;
* the reference (:mod:`bridge.reference`: README.md's generated block and
  docs/configuration.md) is rendered from here;
* tests compare the tables with the spec (MC-1), the result dataclasses,
  examples/bridge.toml and the rest of the source (a default written a
  second time anywhere in ``bridge/`` fails ``tests/unit/test_defaults.py``).

A key has exactly one of three kinds of default: a text ``default`` (what
a user would write; ``""`` = empty/none), ``required``, or a default that
depends on another key of the same section (:class:`ByKey`, e.g. a
listener's ``idle_timeout`` by its ``protocol``). :class:`Parameter`
refuses any other combination when the module is imported.

This module imports nothing from the rest of the bridge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

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
    "serving",  # events | tasks
    "ketama_hash",  # one_at_a_time | md5
    "log_format",  # text | json
    "directory",  # a directory name, relative to the file that names it
    "proxymap_protocol",  # auto | 2.9 | 3.11
    "log_target",  # stderr | syslog
    "syslog_facility",  # a syslog facility name (mail, daemon, local0 ...)
    "socket_file",  # a unix socket file name, relative to the TOML file's directory
]


@dataclass(frozen=True, slots=True)
class ByKey:
    """A default chosen by the value of another key of the same section.

    ``defaults`` pairs a value of ``key`` with the default for it: a text
    default, or None when the key is required for that value. For a value
    not listed the key does not apply: leaving it out gives None, writing
    it is a problem (``not allowed for VALUE: {otherwise}``).
    """

    key: str
    defaults: tuple[tuple[str, str | None], ...]
    otherwise: str = ""

    def applies(self, value: str) -> bool:
        """Whether the key may be written when ``key`` is ``value``."""
        return any(context == value for context, _ in self.defaults)

    def default_for(self, value: str) -> str | None:
        """The default when ``key`` is ``value``; None = required (or not applicable)."""
        for context, default in self.defaults:
            if context == value:
                return default
        return None


@dataclass(frozen=True, slots=True)
class Parameter:
    """One configuration key: the single source of truth for its default and its docs.

    Exactly one of these says what happens when the key is left out:

    * ``default``: the text a user would write (``""`` = empty/none),
      converted like a written value;
    * ``required``: a problem, ``missing: {missing}``;
    * ``by``: the default depends on another key of the section.

    ``postfix`` marks memcache_table(5) parameters, the only keys a ``.cf``
    file may set. ``minimum`` is the smallest value of an integer key.

    Raises:
      ValueError: for a record that says none or several of the above.
    """

    name: str
    default: str | None
    minimum: int | None
    kind: ParameterKind
    description: str
    postfix: bool = False
    required: bool = False
    by: ByKey | None = None
    #: What to write, told when the key is missing where it is required.
    missing: str = ""

    def __post_init__(self) -> None:
        ways = (self.default is not None) + self.required + (self.by is not None)
        if ways != 1:
            raise ValueError(f"parameter {self.name}: give exactly one of default, required and by")


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
        "Allow update, delete and load (like proxy_write_maps); needs a writable backup: lmdb, "
        "or proxy: with a type proxywrite can write (btree, hash, lmdb ...).",
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
    Parameter(
        "busy_poll_us",
        "50",
        0,
        "integer",
        "Microseconds to keep trying for a memcache reply before waiting in the event loop, "
        "only while no other work is ready; 0 = off.",
    ),
    Parameter(
        "queue_directory",
        "/var/spool/postfix",
        None,
        "directory",
        "Postfix's queue_directory: proxy: backups reach proxymap (or proxywrite) through "
        "its private/ sockets.",
    ),
    Parameter(
        "proxymap_protocol",
        "auto",
        None,
        "proxymap_protocol",
        "Request form of proxy: backups: 2.9 (Postfix 2.9 to 3.10), 3.11 (3.11 and later) "
        "or auto (try 2.9, then 3.11, and remember).",
    ),
)


#: Keys of a ``[[listen]]`` section.
LISTENER_PARAMETERS: tuple[Parameter, ...] = (
    Parameter(
        "endpoint",
        None,
        None,
        "endpoint",
        "Where to listen: inet:HOST:PORT, inet:[ADDR]:PORT or unix:PATH.",
        required=True,
        missing="say where to listen (inet:HOST:PORT or unix:PATH)",
    ),
    Parameter(
        "protocol",
        None,
        None,
        "protocol",
        "socketmap (every table, by name) or tcp (one table).",
        required=True,
        missing='use "socketmap" or "tcp"',
    ),
    Parameter(
        "table",
        None,
        None,
        "name",
        "The table a tcp listener serves; not allowed for socketmap.",
        by=ByKey("protocol", (("tcp", None),), otherwise="it serves every table by name"),
        missing="a tcp listener serves exactly one table",
    ),
    Parameter(
        "idle_timeout",
        None,
        None,
        "seconds",
        "Close a connection idle this many seconds; 0 = never.",
        # Socketmap's idle limit in Postfix's own server skeleton: a client
        # that goes quiet longer is gone anyway. Postfix's tcp_table client
        # sleeps 1 s after the server closes on it (spec TCP-12).
        by=ByKey("protocol", (("socketmap", "100"), ("tcp", "0"))),
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
        "busy_poll_us",
        "50",
        0,
        "integer",
        'serving = "events": microseconds a connection\'s answer task keeps trying for the '
        "client's next request before handing the connection back to the event loop, only "
        "while no other work is ready; 0 = off.",
    ),
    Parameter(
        "serving",
        "events",
        None,
        "serving",
        "How connections are served: events (one task reads every ready connection per "
        "wake-up and answers hot-cache hits at once; Linux epoll) or tasks (one trio task "
        "per connection, the portable way). Both answer the same.",
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

#: Keys at the top of the TOML file (besides the sections listen, tables, metrics).
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
        "log_target",
        "stderr",
        None,
        "log_target",
        "Where serve logs: stderr, or syslog (lines like Postfix's own, through syslog_socket, "
        "so they land in mail.log); the other commands write to stderr unless --log-target.",
    ),
    Parameter(
        "syslog_facility",
        "mail",
        None,
        "syslog_facility",
        "Syslog facility with log_target = syslog: mail (as Postfix), daemon, user, local0 to "
        "local7, or another syslog(3) facility name.",
    ),
    Parameter(
        "syslog_socket",
        "/dev/log",
        None,
        "socket_file",
        "The syslog daemon's unix datagram socket with log_target = syslog; when it is absent or "
        "refuses, lines go to stderr after one warning, until it answers again.",
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
        "Where /metrics (Prometheus text) and /healthz are served: inet:HOST:PORT.",
        required=True,
        missing='e.g. endpoint = "inet:127.0.0.1:9464"',
    ),
    Parameter(
        "health_interval",
        "10",
        None,
        "seconds",
        "Seconds between the memcache probes that /healthz reports; above 0.",
    ),
)


def by_name(parameters: tuple[Parameter, ...]) -> Mapping[str, Parameter]:
    """A section's parameters by key name, in schema order."""
    return MappingProxyType({parameter.name: parameter for parameter in parameters})


#: The memcache_table(5) names: the only names a .cf file can set (MC-1).
POSTFIX_NAMES = frozenset(p.name for p in PARAMETERS if p.postfix)
#: The bridge-only table keys: known, but never read from a .cf file.
BRIDGE_ONLY_NAMES = frozenset(p.name for p in PARAMETERS if not p.postfix)
