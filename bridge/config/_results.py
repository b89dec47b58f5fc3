"""What loading a configuration produces: frozen values, or every problem found.

Theory of operation
-------------------
:func:`bridge.config.load_config` either returns a :class:`BridgeConfig`
(with its :class:`ListenerConfig` and :class:`TableConfig` values) in
which every field is checked and converted, or raises one
:class:`ConfigError` listing every :class:`ConfigProblem` it found, so a
daemon starts fully configured or not at all.

The dataclasses have no defaults: every field is filled by the loaders,
from the user's value or from the parameter schema
(:mod:`bridge.config._schema`), which is the one place a default is
written. Their field names are the schema's key names (a test keeps the
two in step), plus ``name``, ``source`` and ``base_dir`` of a table and
``path`` and ``metrics_endpoint`` of the whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Literal

from bridge.endpoint import Endpoint, InetEndpoint
from bridge.keys import DomainFilter, KeyTemplate
from bridge.memcache.ring import PoolServer


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
    ketama_hash: str
    eject_after: int
    retry_after: float
    hot_cache_ttl: float
    hot_cache_size: int
    busy_poll_us: int
    queue_directory: str
    #: auto, 2.9 or 3.11
    proxymap_protocol: str


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One ``[[listen]]`` entry. ``table`` is set for tcp, None for socketmap.

    ``allow`` and ``reuse_port`` matter for inet endpoints, ``mode``,
    ``owner`` and ``group`` for unix ones; the others hold their defaults.
    ``owner`` and ``group`` are None for "keep the daemon's".
    """

    endpoint: Endpoint
    protocol: Literal["socketmap", "tcp"]
    table: str | None
    idle_timeout: float
    max_connections: int
    request_timeout: float
    allow: tuple[IPv4Network | IPv6Network, ...]
    reuse_port: bool
    #: "events" (one task per server multiplexes connections) or "tasks".
    serving: Literal["events", "tasks"]
    #: How long an answer task tries for the next request (serving = "events").
    busy_poll_us: int
    mode: int
    owner: int | None
    group: int | None


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    """The whole configuration. ``path`` is the absolute TOML file name."""

    path: str
    listeners: tuple[ListenerConfig, ...]
    tables: Mapping[str, TableConfig]
    log_level: str
    #: where /metrics and /healthz are served; None = no metrics listener
    metrics_endpoint: InetEndpoint | None
    health_interval: float
    #: uid and gid to switch to after binding; None = keep.
    user: int | None
    group: int | None
    workers: int
    log_format: str
    #: "stderr" or "syslog"; the facility name and socket file for syslog.
    log_target: str
    syslog_facility: str
    syslog_socket: str
