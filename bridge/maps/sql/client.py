"""The lookup side every SQL table shares: hosts, connections, threads, deadlines (SQL-4 .. SQL-6).

Theory of operation
-------------------
A lookup (:meth:`SqlMap.lookup`) runs in two places:

* in the trio task: the ``domain`` filter (its table items are other
  maps), the suppression check of the query template, and, once the
  rows are back, the result expansion and join (SQL-5);
* in a worker thread (``trio.to_thread.run_sync`` behind the table's
  :class:`trio.CapacityLimiter`): everything that blocks. The thread
  picks a host as Postfix does, takes an idle connection or opens one,
  quotes the key through that connection, runs the statement and
  returns the fields.

Host choice (SQL-6): a host with an open connection first, otherwise a
host that was never tried or whose penalty has run out; unix sockets
before inet, inet before connection URIs; at random among equals. A
failed connect or statement closes that connection, puts the host in
the penalty box for ``retry_interval`` seconds and tries the next host
in the same lookup. A table with a single host is never penalised
(Postfix 3.10+ takes it for a load balancer) and is tried twice per
lookup, so a connection the server dropped is replaced at once. When no
host is left the answer is TEMP, never "not found".

Deadline: the whole lookup, the wait for the limiter included, has
``timeout`` seconds (the driver bounds its connects and waits by the
same deadline). When the trio side gives up first, the lookup answers
TEMP (``timeout=True``) and the call is *abandoned*: its connection is
interrupted (socket shut down, or sqlite's interrupt) and closed by the
worker thread when it returns, never put back for reuse.

Connections: at most ``max_connections`` threads work for one table at
once, each on its own connection. Idle connections are kept per host and
closed when unused for ``idle_interval`` seconds (checked at each lookup).

Health (:meth:`SqlMap.health`): every host that is not in the penalty
box runs ``SELECT 1`` within the same deadline, so ``/healthz`` sees a
host recover (or die) without waiting for a lookup; a host in the box is
reported with the time it leaves it and the failure that put it there.

Errors: nothing raises out of a lookup for backend trouble. Connect,
quoting and statement failures are TEMP; an sqlite statement that cannot
be prepared is PERM (Postfix would exit); no message ever holds a
password (``scrub``).
"""

from __future__ import annotations

import enum
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Generic, Protocol, TypeVar

import trio

from bridge.keys import DomainFilter
from bridge.logs import ReasonLog
from bridge.maps.base import BackendHealth, LookupMap
from bridge.maps.sql.settings import CommonSettings, scrub
from bridge.maps.sql.templates import join_results
from bridge.outcome import NOT_FOUND, ConfigFailure, Outcome, Retry, found_value

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_TIMEOUT",
    "Driver",
    "DriverError",
    "HostKind",
    "HostSpec",
    "SqlMap",
]

_log = logging.getLogger("bridge.maps")

#: Seconds a lookup may take, limiter wait, connects and statement
#: included, when the table is opened without a time limit of its own.
#: Postfix's SQL clients have no statement time limit; the bridge's
#: chained socketmap and tcp backups allow 10 s, and so does this.
DEFAULT_TIMEOUT: Final = 10.0

#: Worker threads (and so connections) working for one table at once.
#: Postfix has one connection per process and table; the bridge serves
#: every Postfix process, so it keeps a few.
DEFAULT_MAX_CONNECTIONS: Final = 4

#: Attempts per lookup on a table with a single host (3.10+: "reconnect
#: immediately after a single failure").
SINGLE_HOST_ATTEMPTS: Final = 2

_C = TypeVar("_C")
_A = TypeVar("_A")
_R = TypeVar("_R")

#: What a health probe runs on each host: valid in every engine, reads nothing.
PROBE_STATEMENT: Final = b"SELECT 1"


class HostKind(enum.IntEnum):
    """How a host is reached; lower values are preferred (SQL-6)."""

    UNIX = 0
    INET = 1
    URI = 2


@dataclass(frozen=True, slots=True)
class HostSpec:
    """One item of a ``hosts`` list (or an sqlite file), parsed by its engine.

    Attributes:
      kind: unix socket, inet, or connection URI.
      shown: the item as it may be shown (a URI's password replaced).
      name: the engine's address: socket path or directory, host name, URI.
      port: the port text when one was given.
    """

    kind: HostKind
    shown: str
    name: str | None
    port: str | None = None


class DriverError(Exception):
    """One attempt on one host failed.

    Attributes:
      reason: what happened, without any secret.
      host_failed: the host (or its connection) is at fault: close the
        connection and penalise the host. False for a problem of the key
        itself (quoting), which only fails the lookup.
      permanent: the statement can never work (sqlite prepare error): PERM.
    """

    def __init__(self, reason: str, *, host_failed: bool = True, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.host_failed = host_failed
        self.permanent = permanent


class Driver(Protocol[_C]):
    """One database engine's blocking operations; all but ``interrupt`` run in worker threads."""

    def connect(self, host: HostSpec, timeout: float) -> _C:
        """Open a connection within ``timeout`` seconds.

        Raises:
          DriverError: it cannot be opened.
        """
        ...

    def quote(self, connection: _C, piece: bytes) -> bytes:
        """Quote one substituted piece of the query for a string literal (SQL-4).

        Raises:
          DriverError: the piece cannot be quoted (``host_failed=False``).
        """
        ...

    def execute(self, connection: _C, statement: bytes, deadline: float) -> list[bytes | None]:
        """Run the statement; return the fields in Postfix's order (SQL-5), None for NULL.

        Args:
          connection: an open connection.
          statement: the expanded, quoted query.
          deadline: ``time.monotonic()`` value after which to give up.

        Raises:
          DriverError: the statement failed.
        """
        ...

    def close(self, connection: _C) -> None:
        """Close a connection; never raises."""
        ...

    def interrupt(self, connection: _C) -> None:
        """Make a blocked ``execute`` on ``connection`` return soon (called from another thread)."""
        ...


@dataclass(eq=False)
class _Connection(Generic[_C]):
    handle: _C
    generation: int
    last_used: float


@dataclass(eq=False)
class _Host(Generic[_C]):
    """A host's state, guarded by the map's lock."""

    spec: HostSpec
    idle: list[_Connection[_C]] = field(default_factory=list)
    open: int = 0
    #: bumped when the host fails: older connections are not reused
    generation: int = 0
    penalised_until: float = 0.0  # time.monotonic()
    penalised_until_wall: float = 0.0
    last_error: str = ""
    last_error_wall: float = 0.0
    last_ok_wall: float = 0.0


@dataclass(eq=False)
class _Call(Generic[_C]):
    """One lookup's claim on a worker thread; ``lock`` guards the two fields."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    abandoned: bool = False
    connection: _Connection[_C] | None = None


def _clock_text(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall))


class SqlMap(Generic[_C]):
    """An SQL table (``pgsql:``, ``mysql:``, ``sqlite:``), read-only (SQL-7).

    Args:
      spec: the table as configured.
      settings: templates, ``domain``, ``expansion_limit``.
      driver: the engine's blocking operations.
      hosts: the hosts in configuration order (sqlite: its file).
      retry_interval: seconds a failed host is skipped (hosts lists of two or more).
      idle_interval: seconds after which an idle connection is closed; 0 = never.
      timeout: seconds for a whole lookup.
      smtputf8: apply the G-6 check to answers.
      domain_maps: the opened ``type:name`` items of ``domain``.
      secrets: texts to scrub from every message.
      single_host_attempts: attempts per lookup with a single host.
      max_connections: worker threads (and connections) at once.
      what: ``host`` or ``file``, how health reports name a host.
    """

    def __init__(
        self,
        spec: str,
        settings: CommonSettings,
        driver: Driver[_C],
        hosts: Sequence[HostSpec],
        *,
        retry_interval: float,
        idle_interval: float,
        timeout: float = DEFAULT_TIMEOUT,
        smtputf8: bool = True,
        domain_maps: Mapping[str, LookupMap] | None = None,
        secrets: Sequence[str] = (),
        single_host_attempts: int = SINGLE_HOST_ATTEMPTS,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        what: str = "host",
    ) -> None:
        assert hosts, spec
        self._spec = spec
        self._templates = settings.templates
        self._domain: DomainFilter | None = settings.domain
        self._expansion_limit = settings.expansion_limit
        self._driver = driver
        self._hosts: list[_Host[_C]] = [_Host(host) for host in hosts]
        self._retry_interval = retry_interval
        self._idle_interval = idle_interval
        self._timeout = timeout
        self._smtputf8 = smtputf8
        self._domain_maps = dict(domain_maps or {})
        self._secrets = tuple(secrets)
        self._single_host_attempts = single_host_attempts
        self._what = what
        self._limiter = trio.CapacityLimiter(max_connections)
        self._lock = threading.Lock()
        self._closed = False
        self._reasons = ReasonLog(_log)
        self._reasons_lock = threading.Lock()

    @property
    def spec(self) -> str:
        """The table as written in the configuration."""
        return self._spec

    @property
    def timeout(self) -> float:
        """Seconds a lookup may take."""
        return self._timeout

    def adopt(self, handle: _C) -> None:
        """Keep an already open connection to the first host for the next lookup."""
        host = self._hosts[0]
        with self._lock:
            host.open += 1
            host.idle.append(_Connection(handle, host.generation, time.monotonic()))

    def _warn(self, reason: str) -> None:
        """Log a failure, each distinct one at most once a minute (from any thread)."""
        with self._reasons_lock:
            self._reasons.warning(reason)

    # ------------------------------------------------------------ lookups

    async def lookup(self, key: bytes) -> Outcome:
        """Look up ``key`` as given (the caller folds where due).

        Returns:
          Found with the joined results; NOT_FOUND when the key is skipped
          (domain filter, suppressed expansion) or nothing came back;
          Retry for any failure (``timeout=True`` when the deadline
          passed); ConfigFailure for an sqlite statement that cannot be
          prepared or a value that is not UTF-8 under SMTPUTF8. Never raises.
        """
        if b"\0" in key:
            return NOT_FOUND  # no Postfix key holds a NUL
        if self._domain is not None:
            verdict = await self._domain.check(key, self._domain_lookup)
            if verdict is False:
                return NOT_FOUND
            if verdict is not True:
                return verdict
        if self._templates.expand_query(key) is None:
            return NOT_FOUND  # suppressed: no query is sent (SQL-4)
        fields = await self._run(key)
        if isinstance(fields, Retry | ConfigFailure):
            return fields
        joined = join_results(self._templates, fields, key, expansion_limit=self._expansion_limit)
        if isinstance(joined, Retry):
            return joined
        if not joined:
            return NOT_FOUND
        return found_value(joined, smtputf8=self._smtputf8, source=self._spec)

    async def _domain_lookup(self, spec: str, domain: bytes) -> Outcome:
        return await self._domain_maps[spec].lookup(domain)

    async def _run(self, key: bytes) -> list[bytes | None] | Retry | ConfigFailure:
        """Run the query in a worker thread within the deadline; abandon it when late."""
        if self._closed:
            return Retry(f"table {self._spec} is closed")
        result = await self._in_worker(self._work, key)
        if result is None:
            reason = f"table {self._spec}: no answer within {self._timeout:g} s"
            self._warn(reason)
            return Retry(reason, timeout=True)
        return result

    async def _in_worker(
        self, work: Callable[[_Call[_C], _A, float], _R], argument: _A
    ) -> _R | None:
        """``work(call, argument, deadline)`` in a worker thread; None when the deadline passed.

        A call that is late (or cancelled) is abandoned: its connection is
        interrupted, and the worker closes it instead of keeping it.
        """
        call: _Call[_C] = _Call()
        deadline = time.monotonic() + self._timeout
        done = False
        result: _R | None = None
        try:
            with trio.move_on_after(self._timeout):
                result = await trio.to_thread.run_sync(
                    work, call, argument, deadline, abandon_on_cancel=True, limiter=self._limiter
                )
                done = True
        finally:
            if not done:
                self._abandon(call)
        return result

    def _abandon(self, call: _Call[_C]) -> None:
        """The trio side gave up: the worker must not reuse its connection (trio thread)."""
        with call.lock:
            call.abandoned = True
            connection = call.connection
            if connection is not None:
                try:
                    self._driver.interrupt(connection.handle)
                except Exception as exc:  # an interrupt is best effort
                    _log.debug("table %s: interrupt failed: %s", self._spec, exc)

    # ------------------------------------------------- the worker thread

    def _work(
        self, call: _Call[_C], key: bytes, deadline: float
    ) -> list[bytes | None] | Retry | ConfigFailure:
        """Postfix's host loop (SQL-6), in a worker thread."""
        self._close_idle()
        attempts: dict[int, int] = {}
        errors: list[str] = []
        while True:
            if call.abandoned:
                return Retry(f"table {self._spec}: abandoned")
            index = self._choose(attempts)
            if index is None:
                break
            attempts[index] = attempts.get(index, 0) + 1
            host = self._hosts[index]
            connection = self._checkout(host)
            if connection is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    errors.append("no time left to connect")
                    break
                # Leave time for the hosts after this one (SQL-6 within a bound).
                budget = remaining / max(1, self._candidates(attempts) + 1)
                try:
                    handle = self._driver.connect(host.spec, budget)
                except DriverError as exc:
                    errors.append(self._failed(host, exc.reason))
                    continue
                connection = self._opened(host, handle)
            outcome = self._attempt(call, host, connection, key, deadline)
            if isinstance(outcome, DriverError):
                errors.append(self._failed(host, outcome.reason))
                continue
            return outcome
        if not errors:
            errors.append(self._penalty_summary())
        return Retry(f"table {self._spec}: " + "; ".join(dict.fromkeys(errors)))

    def _attempt(
        self,
        call: _Call[_C],
        host: _Host[_C],
        connection: _Connection[_C],
        key: bytes | None,
        deadline: float,
    ) -> list[bytes | None] | Retry | ConfigFailure | DriverError:
        """Quote, expand and run on one connection; DriverError means "try the next host".

        ``key`` None runs the health probe's statement instead of the query.
        """
        with call.lock:
            abandoned = call.abandoned
            if not abandoned:
                call.connection = connection
        if abandoned:
            self._release(host, connection, reuse=False)
            return Retry(f"table {self._spec}: abandoned")
        reuse = False
        try:
            handle = connection.handle
            if key is None:
                statement: bytes | None = PROBE_STATEMENT
            else:
                statement = self._templates.expand_query(
                    key, lambda piece: self._driver.quote(handle, piece)
                )
            fields = [] if statement is None else self._driver.execute(handle, statement, deadline)
            reuse = True
        except DriverError as exc:
            reason = scrub(exc.reason, self._secrets)
            if exc.permanent:
                reuse = True
                self._warn(f"table {self._spec}: {reason}")
                return ConfigFailure(f"table {self._spec}: {reason}")
            if not exc.host_failed:
                reuse = True
                self._warn(f"table {self._spec}: {reason}")
                return Retry(f"table {self._spec}: {reason}")
            return DriverError(reason)
        finally:
            with call.lock:
                call.connection = None
                reuse = reuse and not call.abandoned
            self._release(host, connection, reuse=reuse)
        with self._lock:
            host.last_ok_wall = time.time()
        return fields

    def _choose(self, attempts: Mapping[int, int]) -> int | None:
        """The next host to try, as Postfix picks it (SQL-6); None when none is left."""
        now = time.monotonic()
        single = len(self._hosts) == 1
        with self._lock:
            eligible = [
                index
                for index, host in enumerate(self._hosts)
                if (
                    attempts.get(index, 0) < self._single_host_attempts
                    if single
                    else index not in attempts and host.penalised_until <= now
                )
            ]
            if not eligible:
                return None
            connected = [index for index in eligible if self._hosts[index].open > 0]
            pool = connected or eligible
            best = min(self._hosts[index].spec.kind for index in pool)
            return random.choice([i for i in pool if self._hosts[i].spec.kind == best])

    def _candidates(self, attempts: Mapping[int, int]) -> int:
        """How many other hosts this lookup may still try after the current one."""
        if len(self._hosts) == 1:
            return 0
        now = time.monotonic()
        with self._lock:
            return sum(
                1
                for index, host in enumerate(self._hosts)
                if index not in attempts and host.penalised_until <= now
            )

    def _checkout(self, host: _Host[_C]) -> _Connection[_C] | None:
        """An idle connection of ``host`` (most recently used first), or None."""
        with self._lock:
            if host.idle:
                return host.idle.pop()
        return None

    def _opened(self, host: _Host[_C], handle: _C) -> _Connection[_C]:
        with self._lock:
            host.open += 1
            return _Connection(handle, host.generation, time.monotonic())

    def _release(self, host: _Host[_C], connection: _Connection[_C], *, reuse: bool) -> None:
        """Put a connection back for reuse, or close it (failed, abandoned, stale, closed map)."""
        with self._lock:
            keep = reuse and not self._closed and connection.generation == host.generation
            if keep:
                connection.last_used = time.monotonic()
                host.idle.append(connection)
                return
            host.open -= 1
        self._driver.close(connection.handle)

    def _failed(self, host: _Host[_C], reason: str) -> str:
        """Record a failure of ``host``; penalise it unless it is the only one (SQL-6)."""
        reason = scrub(reason, self._secrets)
        stale: list[_Connection[_C]] = []
        with self._lock:
            host.last_error = reason
            host.last_error_wall = time.time()
            host.generation += 1
            stale, host.idle = host.idle, []
            host.open -= len(stale)
            if len(self._hosts) > 1:
                host.penalised_until = time.monotonic() + self._retry_interval
                host.penalised_until_wall = time.time() + self._retry_interval
        for connection in stale:
            self._driver.close(connection.handle)
        message = f"{self._what} {host.spec.shown}: {reason}"
        self._warn(f"table {self._spec}: {message}")
        return message

    def _penalty_summary(self) -> str:
        with self._lock:
            parts = [
                f"{self._what} {host.spec.shown} skipped until "
                f"{_clock_text(host.penalised_until_wall)} after: {host.last_error}"
                for host in self._hosts
            ]
        return "no host available (" + "; ".join(parts) + ")"

    def _close_idle(self) -> None:
        """Close connections idle longer than ``idle_interval`` (Postfix's idle timer)."""
        if self._idle_interval <= 0:
            return
        limit = time.monotonic() - self._idle_interval
        expired: list[_Connection[_C]] = []
        with self._lock:
            for host in self._hosts:
                keep = [c for c in host.idle if c.last_used >= limit]
                if len(keep) != len(host.idle):
                    expired += [c for c in host.idle if c.last_used < limit]
                    host.open -= len(host.idle) - len(keep)
                    host.idle = keep
        for connection in expired:
            self._driver.close(connection.handle)

    # ------------------------------------------------------ health, close

    async def health(self) -> list[BackendHealth]:
        """Each host, asked once within the table's time limit (HealthReporting).

        Hosts in the penalty box are reported as skipped (until when, and
        why) without being asked; every other host runs a trivial statement
        on a pooled or new connection, so a recovered host shows as up
        without waiting for a lookup, and a dead one as down. A failed probe
        counts like a failed lookup (SQL-6).
        """
        if not self._closed and await self._in_worker(self._probe, None) is None:
            self._warn(f"table {self._spec}: health probe: no answer within {self._timeout:g} s")
        now = time.monotonic()
        report: list[BackendHealth] = []
        with self._lock:
            for host in self._hosts:
                name = f"{self._what} {host.spec.shown}"
                if host.penalised_until > now:
                    detail = (
                        f"skipped until {_clock_text(host.penalised_until_wall)} "
                        f"({host.penalised_until - now:.0f} s more) after: {host.last_error}"
                    )
                    report.append(BackendHealth(name, False, detail))
                elif host.last_error_wall > host.last_ok_wall:
                    detail = (
                        f"last attempt failed at {_clock_text(host.last_error_wall)}: "
                        f"{host.last_error}"
                    )
                    report.append(BackendHealth(name, False, detail))
                else:
                    detail = f"answered at {_clock_text(host.last_ok_wall)}"
                    report.append(BackendHealth(name, True, f"{detail}; {host.open} open"))
        return report

    def _probe(self, call: _Call[_C], unused: None, deadline: float) -> bool:
        """Ask every host that is not in the penalty box once (worker thread)."""
        now = time.monotonic()
        with self._lock:
            due = [host for host in self._hosts if host.penalised_until <= now]
        for position, host in enumerate(due):
            if call.abandoned:
                break
            connection = self._checkout(host)
            if connection is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    handle = self._driver.connect(host.spec, remaining / (len(due) - position))
                except DriverError as exc:
                    self._failed(host, exc.reason)
                    continue
                connection = self._opened(host, handle)
            outcome = self._attempt(call, host, connection, None, deadline)
            if isinstance(outcome, DriverError):
                self._failed(host, outcome.reason)
        return True

    async def aclose(self) -> None:
        """Close idle connections now and busy ones when their threads return. Idempotent."""
        with self._lock:
            self._closed = True
            idle: list[_Connection[_C]] = []
            for host in self._hosts:
                idle += host.idle
                host.open -= len(host.idle)
                host.idle = []
        if idle:
            await trio.to_thread.run_sync(self._close_all, idle, abandon_on_cancel=True)
        for table in self._domain_maps.values():
            await table.aclose()

    def _close_all(self, connections: Sequence[_Connection[_C]]) -> None:
        for connection in connections:
            self._driver.close(connection.handle)
