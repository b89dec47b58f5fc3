"""One memcache_table(5) table at run time: the lookup algorithm.

Theory of operation
-------------------
A lookup takes the key exactly as Postfix sent it over socketmap or tcp
and answers as Postfix's own ``memcache:`` client would (spec MC-13,
MC-16, MC-21)::

    non-UTF-8 key (smtputf8)        -> NOTFOUND              (G-6)
    fold case (fold_case)                                    (CASE-2)
    for each address-search form of the key (default: the key itself; AS-1..AS-4):
        empty key                   -> skip                  (MC-13.1)
        domain filter: no match     -> skip                  (DOM-1..6)
                       table error  -> that error, stop
        key_format / key_digest / validation: suppressed -> skip (MC-13.4-7)
        memcache get                -> value: answer it
                                    -> miss or error: ask the backup (MC-16)
        backup has it               -> refill memcache (best effort), answer it
                                       (one query and one refill for all
                                       concurrent lookups of the key)
        error (memcache without backup, or backup) -> answer the error, stop
    nothing found                   -> NOTFOUND
    found through a form without the key's extension, in an address
    mapping table               -> finish it as mail_addr_map.c would (AS-6)

"skip" is Postfix's silent suppression: the key is not sent to memcache
and the backup is not consulted (MC-14). With a backup, a memcache error
is masked exactly as Postfix masks it: the backup's answer stands.

Error handling
--------------
No exception escapes :meth:`Table.lookup` for backend trouble; the
outcome carries it. A value that is not valid UTF-8 is a configuration
error when ``smtputf8`` is on, because Postfix would reject it (G-6).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import trio

from bridge import metrics
from bridge.address_search import finish_mapped_result, search_keys
from bridge.config import BridgeConfig, ConfigError, ConfigProblem, TableConfig
from bridge.keys import fold_key, make_digest, memcache_key
from bridge.maps import (
    BackendHealth,
    HealthReporting,
    LookupMap,
    MapError,
    OpenOptions,
    SequenceMap,
    WritableMap,
    open_map,
)
from bridge.memcache import MemcacheBackend
from bridge.memcache.client import MemcacheSettings
from bridge.memcache.pool import MemcachePool
from bridge.metrics import TableHealth
from bridge.outcome import (
    NOT_FOUND,
    WRITTEN,
    ConfigFailure,
    Found,
    NotFound,
    NotWritten,
    Outcome,
    Retry,
    WriteOutcome,
    Written,
    found_value,
)
from bridge.postfix_text import is_utf8

_log = logging.getLogger("bridge.table")


class NoSequence(Exception):
    """The table cannot list its entries; the message says why."""


@dataclass(frozen=True, slots=True)
class Skipped:
    """MC-13's "skip": the key is not sent to memcache; ``reason`` is for messages."""

    reason: str


@dataclass(frozen=True, slots=True)
class PreparedKey:
    """A key ready for writing: as the backup stores it, and as memcache stores it."""

    key: bytes
    memcache_key: bytes


@dataclass(slots=True)
class BatchReport:
    """What one bulk batch did, entry by entry counted."""

    written: int = 0
    skipped: int = 0
    failed: int = 0
    #: written to the backup but not to memcache (lookups refill later)
    memcache_failed: int = 0
    #: the failures were temporary (retrying later may succeed)
    temporary: bool = False
    problems: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Flight:
    """The lookups of one key that are under way, and their backup answers.

    At most one of them queries the backup at a time (``querying``);
    ``answered`` counts the answers so far and ``outcome`` holds the
    latest; ``changed`` is set when a query ends, answered or cancelled.
    """

    interest: int = 0
    querying: bool = False
    answered: int = 0
    outcome: Outcome | None = None
    changed: trio.Event = field(default_factory=trio.Event)


class Table:
    """A configured table with its memcache client, backup and domain tables."""

    def __init__(
        self,
        config: TableConfig,
        memcache: MemcacheBackend,
        backup: LookupMap | None,
        domain_maps: Mapping[str, LookupMap],
    ) -> None:
        self.config = config
        self.name = config.name
        self._memcache = memcache
        self._backup = backup
        self._domain_maps = dict(domain_maps)
        self._digest = make_digest(config.key_digest) if config.key_digest else None
        self._delimiter = config.recipient_delimiter.encode("utf-8")
        folded_domains = (
            fold_key(d.encode("utf-8"), smtputf8=config.smtputf8) for d in config.local_domains
        )
        self._local_domains = frozenset(d for d in folded_domains if d is not None)
        # The default address search is the key alone; skip the generator then.
        self._plain_search = config.address_search == ("full",)
        # Lookups under way, by key, that may share a backup query (_from_backup).
        self._flights: dict[bytes, _Flight] = {}
        self._maps_addresses = config.address_mapping != "none"
        self._propagate = config.address_mapping in config.propagate_unmatched_extensions
        self._hot_cache = (
            # trio's clock: the daemon's time, and a test's virtual time.
            HotCache(config.hot_cache_ttl, config.hot_cache_size, clock=trio.current_time)
            if config.hot_cache_ttl > 0
            else None
        )

    @classmethod
    def open(cls, config: TableConfig) -> Table:
        """Open the backup and domain tables and create the memcache client.

        Raises:
          ConfigError: a backup or domain table cannot be opened; the
          problem names the table and the key.
        """
        problems: list[ConfigProblem] = []
        backup_options = OpenOptions(
            config.base_dir,
            smtputf8=config.smtputf8,
            writable=config.writable,
            queue_directory=config.queue_directory,
            proxymap_protocol=config.proxymap_protocol,
            # A database query gets the time memcache gets (<= 0: the type's own bound).
            timeout=config.timeout if config.timeout > 0 else None,
        )
        backup: LookupMap | None = None
        if config.backup:
            try:
                backup = open_map(config.backup, backup_options)
            except MapError as exc:
                problems.append(ConfigProblem(config.source, config.name, "backup", str(exc)))
        # DOM-6: domain tables are opened without case folding, and read-only.
        domain_options = dataclasses.replace(backup_options, fold=False, writable=False)
        domain_maps: dict[str, LookupMap] = {}
        for spec in config.domain.table_specs if config.domain else ():
            try:
                domain_maps[spec] = open_map(spec, domain_options)
            except MapError as exc:
                problems.append(ConfigProblem(config.source, config.name, "domain", str(exc)))
        if problems:
            raise ConfigError(problems)
        settings = MemcacheSettings(
            timeout=config.timeout,
            max_try=config.max_try,
            retry_pause=config.retry_pause,
            line_size_limit=config.line_size_limit,
            data_size_limit=config.data_size_limit,
            busy_poll_us=config.busy_poll_us,
        )
        memcache = MemcachePool(
            config.memcache,
            settings,
            ketama_hash=config.ketama_hash,
            eject_after=config.eject_after,
            retry_after=config.retry_after,
        )
        return cls(config, memcache, backup, domain_maps)

    async def probe(self) -> TableHealth:
        """Whether every memcache server answers within its timeout now, and the backup's parts.

        A backup that can report its hosts, sockets or files
        (:class:`~bridge.maps.base.HealthReporting`) is included; one
        part down makes the table unhealthy, as memcache does.
        """
        failures = await self._memcache.probe()
        backup: tuple[BackendHealth, ...] = (
            tuple(await self._backup.health()) if isinstance(self._backup, HealthReporting) else ()
        )
        problems = [failure.reason for failure in failures]
        problems += [f"backup {part.name}: {part.detail}" for part in backup if not part.ok]
        if problems:
            return TableHealth(False, "; ".join(problems), backup)
        return TableHealth(True, "memcache answered", backup)

    async def aclose(self) -> None:
        await self._memcache.aclose()
        if self._backup is not None:
            await self._backup.aclose()
        for table in self._domain_maps.values():
            await table.aclose()

    # --------------------------------------------------------------- lookup

    async def lookup(self, key: bytes) -> Outcome:
        """Answer one lookup as Postfix's memcache client would.

        Args:
          key: the key exactly as Postfix sent it.

        Returns:
          Found, NOT_FOUND, Retry or ConfigFailure.
        """
        cached = self.cached(key)
        if cached is not None:
            return cached
        hot = self._hot_cache
        outcome = await self._lookup(key)
        if hot is not None and isinstance(outcome, Found | NotFound):
            hot.put(key, outcome)
        return outcome

    def cached(self, key: bytes) -> Found | NotFound | None:
        """The hot cache's answer for ``key`` without waiting; None: ask :meth:`lookup`.

        The event-driven server answers these in the same pass as it read
        them, without starting a task: what :meth:`lookup` would return.
        """
        hot = self._hot_cache
        if hot is None:
            return None
        cached = hot.get(key)
        if cached is not None:
            metrics.current.cache_hit(self.name, "hot")
        return cached

    async def _lookup(self, key: bytes) -> Outcome:
        normalized = self.normalize_key(key)
        if isinstance(normalized, Skipped):
            return NOT_FOUND
        if self._plain_search:
            return await self._lookup_form(normalized)
        for candidate in search_keys(
            normalized,
            self.config.address_search,
            delimiter=self._delimiter,
            local_domains=self._local_domains,
        ):
            outcome = await self._lookup_form(candidate.key)
            if isinstance(outcome, NotFound):
                continue
            if (
                isinstance(outcome, Found)
                and candidate.unmatched_extension
                and self._maps_addresses
            ):
                finished = finish_mapped_result(
                    outcome.value, key, delimiter=self._delimiter, propagate=self._propagate
                )
                return self._found(finished)
            return outcome
        return NOT_FOUND

    async def _lookup_form(self, key: bytes) -> Outcome:
        """MC-16 for one key (already normalized)."""
        mc_key = await self._prepare(key)
        if isinstance(mc_key, Skipped):
            return NOT_FOUND
        if not isinstance(mc_key, bytes):
            return mc_key
        backup = self._backup
        if backup is None:
            cached = await self._memcache.get(mc_key)
            if isinstance(cached, Found):
                metrics.current.cache_hit(self.name, "memcache")
                return self._found(cached.value)
            return cached
        # Registered before asking memcache: a backup answer that arrives
        # while this get is under way may be shared with this lookup.
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight()
        flight.interest += 1
        seen = flight.answered
        try:
            cached = await self._memcache.get(mc_key)
            if isinstance(cached, Found):
                metrics.current.cache_hit(self.name, "memcache")
                return self._found(cached.value)
            if isinstance(cached, Retry):
                _log.info("table %s: %s; answering from backup", self.name, cached.reason)
            return await self._from_backup(flight, seen, backup, key, mc_key)
        finally:
            flight.interest -= 1
            if flight.interest == 0:
                del self._flights[key]

    async def _from_backup(
        self, flight: _Flight, seen: int, backup: LookupMap, key: bytes, mc_key: bytes
    ) -> Outcome:
        """Ask the backup for ``key`` and refill memcache, once for all concurrent askers.

        Single flight: Postfix's processes each query the database for a
        key that is missing from memcache; here, a lookup whose memcache
        get missed while another lookup's backup query of the same key
        was under way (or finished during that get) takes that query's
        answer, refilled once, instead of sending its own. A lookup that
        started after an answer came back never takes it: it found
        memcache refilled, or memcache failed and it asks the backup
        itself, so an old answer (or an old failure) is never served.

        Args:
          seen: ``flight.answered`` when the lookup began.

        Error handling: if the query under way is cancelled (its client
        went away, shutdown), a waiting lookup asks the backup itself.
        """
        while flight.answered == seen and flight.querying:
            await flight.changed.wait()
        if flight.answered > seen:
            assert flight.outcome is not None
            metrics.current.backup_shared(self.name)
            return flight.outcome
        flight.querying = True
        try:
            started = time.perf_counter()
            backed = await backup.lookup(key)
            metrics.current.backup_query(self.name, backed, time.perf_counter() - started)
            if isinstance(backed, Found):
                await self._refill(mc_key, backed.value)
                backed = self._found(backed.value)
            flight.outcome = backed
            flight.answered += 1
            return backed
        finally:
            flight.querying = False
            changed, flight.changed = flight.changed, trio.Event()
            changed.set()

    # ------------------------------------------------------------ writes

    async def update(self, key: bytes, value: bytes) -> WriteOutcome:
        """Store ``value`` under ``key`` as Postfix's memcache client does (MC-17, MC-18).

        memcache first (its failure is masked when there is a backup),
        then the backup, whose result is the result. A key that cannot be
        used is skipped with a warning naming it and the reason (MC-14).

        Returns:
          WRITTEN, NotWritten (skipped, value too large without backup,
          read-only table) or Retry/ConfigFailure.
        """
        refused = self._refuse_write()
        if refused is not None:
            return refused
        prepared = await self.prepare_key(key)
        if isinstance(prepared, Skipped):
            _log.warning("table %s: skipping update of %r: %s", self.name, key, prepared.reason)
            return NotWritten(prepared.reason)
        if not isinstance(prepared, PreparedKey):
            return prepared
        stored = await self._memcache.set(
            prepared.memcache_key, value, flags=self.config.flags, ttl=self.config.ttl
        )
        result: WriteOutcome = stored
        if isinstance(stored, NotWritten):
            result = NotWritten(f"{stored.reason} {self.config.data_size_limit}")
        backup = self._writable_backup()
        if backup is not None:
            if isinstance(stored, Retry):
                _log.warning("table %s: %s; updating the backup only", self.name, stored.reason)
            result = await backup.update(prepared.key, value)
        return result

    async def delete(self, key: bytes) -> WriteOutcome:
        """Delete ``key`` from memcache, then from the backup, whose result wins (MC-19).

        Returns:
          WRITTEN, NotWritten (absent, skipped silently, read-only table) or
          Retry/ConfigFailure.
        """
        refused = self._refuse_write()
        if refused is not None:
            return refused
        prepared = await self.prepare_key(key)
        if isinstance(prepared, Skipped):
            return NotWritten(prepared.reason)
        if not isinstance(prepared, PreparedKey):
            return prepared
        result: WriteOutcome = await self._memcache.delete(prepared.memcache_key)
        backup = self._writable_backup()
        if backup is not None:
            result = await backup.delete(prepared.key)
        return result

    async def update_batch(self, entries: Sequence[tuple[bytes, bytes]]) -> BatchReport:
        """Bulk update: MC-18 for many entries, with one backup transaction.

        The backup gets every usable entry in one transaction (durable when
        this returns, all or nothing); memcache gets them in one pipelined
        exchange. As in MC-18, a memcache failure is masked by a backup
        (counted in ``memcache_failed``), and values over
        ``data_size_limit`` go to the backup only.

        Args:
          entries: (key as given, value) pairs; keys are prepared here.

        Returns:
          The counts; ``problems`` lists skipped keys and failures.
        """
        report = BatchReport()
        refused = self._refuse_write()
        if refused is not None:
            report.failed = len(entries)
            report.problems.append(refused.reason)
            return report
        to_backup: list[tuple[bytes, bytes]] = []
        to_memcache: list[tuple[bytes, bytes]] = []
        for key, value in entries:
            prepared = await self.prepare_key(key)
            if isinstance(prepared, Skipped):
                report.skipped += 1
                report.problems.append(f"skipped {key!r}: {prepared.reason}")
            elif not isinstance(prepared, PreparedKey):
                report.failed += 1
                report.temporary |= isinstance(prepared, Retry)
                report.problems.append(f"{key!r}: {prepared.reason}")
            else:
                to_backup.append((prepared.key, value))
                if len(value) <= self.config.data_size_limit:
                    to_memcache.append((prepared.memcache_key, value))
                else:
                    report.problems.append(
                        f"{key!r}: value exceeds data_size_limit; not stored in memcache"
                    )
        backup = self._writable_backup()
        if backup is not None and to_backup:
            committed = await backup.update_many(to_backup)
            if not isinstance(committed, Written):
                # Nothing of the batch reached the backup: do not let
                # memcache hold what the persistent table does not.
                report.failed += len(to_backup)
                report.temporary |= isinstance(committed, Retry)
                report.problems.append(f"backup: {_reason(committed)}")
                return report
        stored = (
            await self._memcache.set_many(to_memcache, flags=self.config.flags, ttl=self.config.ttl)
            if to_memcache
            else WRITTEN
        )
        if isinstance(stored, Retry):
            report.temporary = True
            report.problems.append(stored.reason)
            if backup is None:
                report.failed += len(to_backup)
                return report
            report.memcache_failed += len(to_memcache)
        elif backup is None:
            # Without a backup, only what memcache stored counts.
            report.skipped += len(to_backup) - len(to_memcache)
            to_backup = to_memcache
        report.written += len(to_backup)
        return report

    def sequence(self) -> AsyncIterator[tuple[bytes, bytes]]:
        """Every entry of the backup table, in its own order (MC-20); no key_format applies.

        Raises:
          NoSequence: the table has no backup, or one that cannot list entries.
        """
        if self._backup is None:
            raise NoSequence(f"table {self.name}: sequence needs a backup table (MC-20)")
        if not isinstance(self._backup, SequenceMap):
            raise NoSequence(
                f"table {self.name}: backup {self._backup.spec} cannot list its entries"
            )
        return self._backup.sequence()

    def _refuse_write(self) -> NotWritten | None:
        if self.config.writable:
            return None
        return NotWritten(f"table {self.name} is read-only: set writable = true to change it")

    def _writable_backup(self) -> WritableMap | None:
        if self._backup is None:
            return None
        # Config validation guarantees this for writable tables.
        assert isinstance(self._backup, WritableMap), self._backup.spec
        return self._backup

    # ------------------------------------------------------ key preparation

    async def prepare_key(self, key: bytes) -> PreparedKey | Skipped | Retry | ConfigFailure:
        """The key as the backup and memcache store it (G-6, CASE-2, MC-13).

        Returns:
          The prepared key, a skip with its reason, or the failure of a
          domain table.
        """
        normalized = self.normalize_key(key)
        if isinstance(normalized, Skipped):
            return normalized
        mc_key = await self._prepare(normalized)
        if isinstance(mc_key, bytes):
            return PreparedKey(normalized, mc_key)
        return mc_key

    def normalize_key(self, key: bytes) -> bytes | Skipped:
        """The key as Postfix's memcache table would receive it (G-6, CASE-2)."""
        config = self.config
        # Postfix keys are C strings: a NUL can never be part of one, so a
        # key carrying one cannot exist in any Postfix table.
        if b"\0" in key:
            return Skipped("key contains a NUL byte")
        if config.fold_case:
            folded = fold_key(key, smtputf8=config.smtputf8)
            if folded is None:
                return Skipped("key is not valid UTF-8")
            return folded
        if config.smtputf8 and not is_utf8(key):
            return Skipped("key is not valid UTF-8")
        return key

    async def _prepare(self, key: bytes) -> bytes | Skipped | Retry | ConfigFailure:
        """MC-13: the memcache key for ``key``, a skip, or a domain-table failure."""
        config = self.config
        if not key:
            return Skipped("empty key")
        if config.domain is not None:
            eligible = await config.domain.check(key, self._domain_lookup)
            if eligible is False:
                return Skipped("not an address in a domain listed in domain")
            if eligible is not True:
                return eligible
        mc_key = memcache_key(key, config.key_format, self._digest)
        if mc_key is None:
            return Skipped(self._skip_reason(key))
        return mc_key

    def _skip_reason(self, key: bytes) -> str:
        """Why memcache_key() skipped ``key``: only computed for messages."""
        template = self.config.key_format
        if not template.is_identity and template.expand(key) is None:
            return f"key_format {template.text!r} cannot be expanded for this key"
        return "memcache key would be empty or contain whitespace or control characters"

    async def _refill(self, mc_key: bytes, value: bytes) -> None:
        """MC-16: copy a backup hit into memcache; a failure is only logged."""
        stored = await self._memcache.set(
            mc_key, value, flags=self.config.flags, ttl=self.config.ttl
        )
        if isinstance(stored, Retry):
            _log.warning("table %s: refill failed: %s", self.name, stored.reason)
        elif isinstance(stored, Written):
            metrics.current.backup_refill(self.name)

    def _found(self, value: bytes) -> Outcome:
        return found_value(value, smtputf8=self.config.smtputf8, source=self.name)

    async def _domain_lookup(self, spec: str, domain: bytes) -> Outcome:
        return await self._domain_maps[spec].lookup(domain)


class HotCache:
    """Recent answers kept in memory: a repeated key skips memcache entirely.

    Only answers (found, not found) are kept, never failures, each for
    ``ttl`` seconds: that is how stale an answer can be when memcache or
    the backup changes behind the daemon's back (a CLI update included).
    At most ``size`` keys are held; the least recently used go first.
    Keys are the bytes as Postfix sent them, so no work is repeated.
    """

    def __init__(self, ttl: float, size: int, *, clock: Callable[[], float] | None = None) -> None:
        self._ttl = ttl
        self._size = size
        self._clock = clock or time.monotonic
        self._entries: OrderedDict[bytes, tuple[float, Found | NotFound]] = OrderedDict()

    def get(self, key: bytes) -> Found | NotFound | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, outcome = entry
        if self._clock() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return outcome

    def put(self, key: bytes, outcome: Found | NotFound) -> None:
        self._entries[key] = (self._clock() + self._ttl, outcome)
        self._entries.move_to_end(key)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)


def _reason(outcome: WriteOutcome) -> str:
    return "done" if isinstance(outcome, Written) else outcome.reason


async def close_tables(tables: Mapping[str, Table]) -> None:
    """Close every table's connections and files."""
    for table in tables.values():
        await table.aclose()


def open_tables(config: BridgeConfig) -> dict[str, Table]:
    """Open every table of a configuration.

    Raises:
      ConfigError: listing every table that could not be opened.
    """
    tables: dict[str, Table] = {}
    problems: list[ConfigProblem] = []
    for name, table_config in config.tables.items():
        try:
            tables[name] = Table.open(table_config)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return tables
