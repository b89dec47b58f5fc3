"""Prometheus metrics and the health state, recorded from the request path.

Theory of operation
-------------------
One :class:`Metrics` object per process holds a private
``prometheus_client`` registry. The request path calls a few small
methods (a request answered, a memcache round trip, a refill); each
method resolves its labelled child once and caches it, so recording costs
a dict lookup and an increment. When no ``[metrics]`` endpoint is
configured the process uses :data:`DISABLED`, whose methods do nothing.

The exposition (``/metrics``) and the health check (``/healthz``) are
served by :mod:`bridge.http`; the health state lives here: each table's
last memcache probe (every server answered ``version`` within the
table's timeout) and whether the configuration is loaded.

Several workers (``workers = N``)
---------------------------------
With workers the metrics are aggregated across the worker processes by
prometheus_client's multiprocess mode, chosen over the supervisor
collecting from the workers because it needs no IPC and no event loop
in the supervisor (which only forks, forwards signals and waits), and
because the library's merge is the reference implementation of summing
counters and histograms across processes:

* the supervisor creates a private temporary directory (mode 0700, as
  the unprivileged user) before forking (:func:`new_multiprocess_dir`)
  and removes it when it exits (:func:`remove_multiprocess_dir`);
* each worker, right after the fork and before :func:`enable`, switches
  the library to memory-mapped values in that directory
  (:func:`use_multiprocess_dir`): every recording writes to the worker's
  own files (``counter_PID.db``, ...);
* ``/metrics`` is answered by any worker with the merge of every file
  (``MultiProcessCollector``): counters and histograms are summed over
  all workers, including workers that died and were replaced (so they
  never go backwards), and ``open_connections`` is a ``livesum`` gauge:
  the sum over the live workers, the supervisor dropping a dead worker's
  gauge file (:func:`process_exited`);
* the metrics listener is bound once by the supervisor and all workers
  accept on it, like the lookup listeners.

The health state stays per process: each worker probes its own tables,
and ``/healthz`` reports the view of the worker that accepted the
request. ``config_reloads_total`` counts each worker's reload (one
SIGHUP counts ``workers`` reloads). Multiprocess mode exports no
``_created`` samples.

Metric names (all prefixed ``postfix_bridge_``):

* ``requests_total{table,protocol,result}`` (result: found, notfound,
  temp, timeout, perm) and ``request_seconds{table,protocol}``;
* ``memcache_roundtrips_total{server}``, ``memcache_errors_total{server}``,
  ``memcache_connects_total{server}``;
* ``backup_lookups_total{table}`` (queries sent to the backup),
  ``backup_seconds{table}``, ``backup_errors_total{table}`` (TEMP or PERM
  from the backup), ``backup_shared_total{table}`` (lookups answered by
  another lookup's query of the same key: queries saved by single
  flight), ``backup_refills_total{table}``;
* ``cache_hits_total{table,cache}``: lookups answered from the hot cache
  (``cache="hot"``, one per lookup) and memcache gets that found the key
  (``cache="memcache"``, one per key asked: an address search may ask
  several);
* ``open_connections{listener}``;
* ``config_reloads_total{result}`` (ok, failed);
* ``healthy``: 1 when the last health probe found every table healthy
  and the configuration loaded (what ``/healthz`` answers 200 for), else
  0; with workers the lowest over the live workers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import TypeVar, cast

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from bridge.maps.base import BackendHealth
from bridge.outcome import ConfigFailure, Found, NotFound, Outcome, Retry

#: Lookup latencies are mostly well under a millisecond; the upper buckets
#: catch memcache timeouts and retry pauses (seconds).
_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1, 2.5, 5, 10)


_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)


def result_label(outcome: Outcome) -> str:
    """The ``result`` label of an outcome, as the reply code says it."""
    if isinstance(outcome, Found):
        return "found"
    if isinstance(outcome, NotFound):
        return "notfound"
    if isinstance(outcome, Retry):
        return "timeout" if outcome.timeout else "temp"
    assert isinstance(outcome, ConfigFailure)
    return "perm"


@dataclass
class TableHealth:
    """The last health probe of one table: its memcache servers and its backup's parts."""

    ok: bool
    detail: str
    backup: tuple[BackendHealth, ...] = ()


@dataclass
class HealthState:
    """What /healthz and ``postfix-bridge health`` report."""

    config_loaded: bool = True
    tables: dict[str, TableHealth] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return self.config_loaded and all(table.ok for table in self.tables.values())

    def as_json(self) -> dict[str, object]:
        return {
            "status": "ok" if self.healthy else "unhealthy",
            "config_loaded": self.config_loaded,
            "tables": {
                name: {
                    "ok": table.ok,
                    "detail": table.detail,
                    "backup": [
                        {"name": part.name, "ok": part.ok, "detail": part.detail}
                        for part in table.backup
                    ],
                }
                for name, table in sorted(self.tables.items())
            },
        }


class Metrics:
    """The process's metrics; see the module docstring for the names."""

    enabled = True

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        """Create the metrics (recorded in ``multiprocess_dir`` with workers)."""
        self.registry = CollectorRegistry()
        self.health = HealthState()
        prefix = "postfix_bridge_"
        self._requests = Counter(
            prefix + "requests_total",
            "Lookups answered, by table, protocol and result.",
            ["table", "protocol", "result"],
            registry=self.registry,
        )
        self._latency = Histogram(
            prefix + "request_seconds",
            "Time from a complete request to its reply.",
            ["table", "protocol"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._roundtrips = Counter(
            prefix + "memcache_roundtrips_total",
            "Commands exchanged with a memcache server (each attempt counts).",
            ["server"],
            registry=self.registry,
        )
        self._errors = Counter(
            prefix + "memcache_errors_total",
            "Failed memcache attempts (bad reply, I/O error, timeout, refused).",
            ["server"],
            registry=self.registry,
        )
        self._connects = Counter(
            prefix + "memcache_connects_total",
            "New connections opened to a memcache server.",
            ["server"],
            registry=self.registry,
        )
        self._backup_lookups = Counter(
            prefix + "backup_lookups_total",
            "Lookups that went to the backup table.",
            ["table"],
            registry=self.registry,
        )
        self._backup_latency = Histogram(
            prefix + "backup_seconds",
            "Time a backup table took to answer one query.",
            ["table"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._backup_errors = Counter(
            prefix + "backup_errors_total",
            "Backup queries that failed (TEMP, TIMEOUT or PERM).",
            ["table"],
            registry=self.registry,
        )
        self._backup_shared = Counter(
            prefix + "backup_shared_total",
            "Lookups answered by a concurrent lookup's backup query of the same key "
            "(queries saved).",
            ["table"],
            registry=self.registry,
        )
        self._refills = Counter(
            prefix + "backup_refills_total",
            "Backup answers copied into memcache.",
            ["table"],
            registry=self.registry,
        )
        self._cache_hits = Counter(
            prefix + "cache_hits_total",
            "Answers found in a cache: the hot cache (per lookup) or memcache (per get).",
            ["table", "cache"],
            registry=self.registry,
        )
        self._healthy = Gauge(
            prefix + "healthy",
            "1 when the last health probe passed (as /healthz), else 0.",
            registry=self.registry,
            # With workers: unhealthy when any live worker is.
            multiprocess_mode="livemin",
        )
        self._connections = Gauge(
            prefix + "open_connections",
            "Client connections open now, by listener.",
            ["listener"],
            registry=self.registry,
            # With workers: the sum over the live ones (ignored otherwise).
            multiprocess_mode="livesum",
        )
        self._reloads = Counter(
            prefix + "config_reloads_total",
            "Configuration reloads (SIGHUP), by result.",
            ["result"],
            registry=self.registry,
        )
        # Labelled children, resolved once per label set.
        self._children: dict[tuple[object, ...], object] = {}
        # What /metrics shows: this process's registry, or with workers
        # the merge of every worker's files.
        self._exposed = self.registry
        if multiprocess_dir is not None:
            self._exposed = CollectorRegistry()
            multiprocess.MultiProcessCollector(self._exposed, multiprocess_dir)  # type: ignore[no-untyped-call]

    def _child(self, metric: _Metric, *labels: str) -> _Metric:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return cast(_Metric, child)

    def request(self, table: str, protocol: str, outcome: Outcome, seconds: float) -> None:
        counter = self._child(self._requests, table, protocol, result_label(outcome))
        counter.inc()
        histogram = self._child(self._latency, table, protocol)
        histogram.observe(seconds)

    def memcache_attempt(self, server: str, failed: bool) -> None:
        self._inc(self._roundtrips, server)
        if failed:
            self._inc(self._errors, server)

    def memcache_connect(self, server: str) -> None:
        self._inc(self._connects, server)

    def backup_query(self, table: str, outcome: Outcome, seconds: float) -> None:
        self._inc(self._backup_lookups, table)
        histogram = self._child(self._backup_latency, table)
        histogram.observe(seconds)
        if isinstance(outcome, Retry | ConfigFailure):
            self._inc(self._backup_errors, table)

    def backup_shared(self, table: str) -> None:
        self._inc(self._backup_shared, table)

    def backup_refill(self, table: str) -> None:
        self._inc(self._refills, table)

    def cache_hit(self, table: str, cache: str) -> None:
        counter = self._child(self._cache_hits, table, cache)
        counter.inc()

    def health_probed(self) -> None:
        """Export the health state just updated by a probe."""
        self._healthy.set(1 if self.health.healthy else 0)

    def connection_opened(self, listener: str) -> None:
        gauge = self._child(self._connections, listener)
        gauge.inc()

    def connection_closed(self, listener: str) -> None:
        gauge = self._child(self._connections, listener)
        gauge.dec()

    def reload(self, ok: bool) -> None:
        self._inc(self._reloads, "ok" if ok else "failed")
        self.health.config_loaded = self.health.config_loaded or ok

    def _inc(self, metric: Counter, label: str) -> None:
        counter = self._child(metric, label)
        counter.inc()

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (every worker's, summed)."""
        return generate_latest(self._exposed)


class _DisabledMetrics(Metrics):
    """Used when no [metrics] endpoint is configured: records nothing."""

    enabled = False

    def __init__(self) -> None:
        self.health = HealthState()

    def request(self, table: str, protocol: str, outcome: Outcome, seconds: float) -> None:
        pass

    def memcache_attempt(self, server: str, failed: bool) -> None:
        pass

    def memcache_connect(self, server: str) -> None:
        pass

    def backup_query(self, table: str, outcome: Outcome, seconds: float) -> None:
        pass

    def backup_shared(self, table: str) -> None:
        pass

    def backup_refill(self, table: str) -> None:
        pass

    def cache_hit(self, table: str, cache: str) -> None:
        pass

    def health_probed(self) -> None:
        pass

    def connection_opened(self, listener: str) -> None:
        pass

    def connection_closed(self, listener: str) -> None:
        pass

    def reload(self, ok: bool) -> None:
        pass

    def exposition(self) -> bytes:
        return b""


DISABLED: Metrics = _DisabledMetrics()

#: The process's metrics: DISABLED until the server enables them.
current: Metrics = DISABLED


#: The directory every worker records into (None: a single process).
_multiprocess_dir: str | None = None

#: The environment variable prometheus_client's multiprocess mode reads.
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def enable() -> Metrics:
    """Switch the process to recording metrics (once, at start)."""
    global current
    if not current.enabled:
        current = Metrics(_multiprocess_dir)
    return current


def new_multiprocess_dir() -> str:
    """Create the supervisor's private directory for the workers' metric files.

    Raises:
      OSError: the directory cannot be created (the message names where).
    """
    try:
        return tempfile.mkdtemp(prefix="postfix-bridge-metrics-")
    except OSError as exc:
        where = tempfile.gettempdir()
        raise OSError(exc.errno, f"metrics directory in {where}: {exc.strerror}") from exc


def use_multiprocess_dir(directory: str) -> None:
    """Record this worker's metrics in ``directory``, shared with the other workers.

    Called in a freshly forked worker, before :func:`enable` creates any
    metric: the library picks its value class when it is imported (from
    the environment), so it is switched here explicitly.
    """
    global _multiprocess_dir
    os.environ[_MULTIPROC_ENV] = directory
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _multiprocess_dir = directory


def process_exited(directory: str, pid: int) -> None:
    """Drop the live gauges of a worker that exited (its counters stay, summed)."""
    multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def remove_multiprocess_dir(directory: str) -> None:
    """Remove the workers' metric files (the supervisor, at exit)."""
    shutil.rmtree(directory, ignore_errors=True)
