"""Tests for bridge.table.Table: the lookup algorithm with in-memory memcache and backups.

The table is built from a real configuration (TOML through load_config)
and in-memory fakes of its backends: :class:`FakeMemcache` implements
:class:`bridge.memcache.MemcacheBackend` over a dict with failures to
order, :class:`FakeBackup` a backup table. The same behaviour is
exercised against real memcached and postmap in tests/integration; here
each rule is pinned down alone, quickly, with trio's autojump clock for
the hot cache's time-to-live.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from bridge.config import TableConfig, load_config
from bridge.maps import BackendHealth, LookupMap
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
)
from bridge.table import Table

TEMP = Retry("memcache is down")


@dataclass
class FakeMemcache:
    """memcache as a dict; ``failing`` keys (or every key) answer Retry."""

    items: dict[bytes, bytes] = field(default_factory=dict)
    failing: set[bytes] = field(default_factory=set)
    down: bool = False
    gets: list[bytes] = field(default_factory=list)
    sets: list[bytes] = field(default_factory=list)

    def _fails(self, key: bytes) -> bool:
        return self.down or key in self.failing

    async def get(self, key: bytes) -> Found | NotFound | Retry:
        self.gets.append(key)
        if self._fails(key):
            return TEMP
        value = self.items.get(key)
        return NOT_FOUND if value is None else Found(value)

    async def set(
        self, key: bytes, value: bytes, *, flags: int, ttl: int
    ) -> Written | NotWritten | Retry:
        self.sets.append(key)
        if self._fails(key):
            return TEMP
        self.items[key] = value
        return WRITTEN

    async def delete(self, key: bytes) -> Written | NotWritten | Retry:
        if self._fails(key):
            return TEMP
        return WRITTEN if self.items.pop(key, None) is not None else NotWritten("not found")

    async def set_many(
        self, items: Sequence[tuple[bytes, bytes]], *, flags: int, ttl: int
    ) -> Written | Retry:
        if self.down:
            return TEMP
        self.items.update(items)
        self.sets.extend(key for key, _ in items)
        return WRITTEN

    async def probe(self) -> list[Retry]:
        return [TEMP] if self.down else []

    async def aclose(self) -> None:
        pass


@dataclass
class FakeBackup:
    """A writable backup table as a dict; ``outcome`` overrides every lookup."""

    entries: dict[bytes, bytes] = field(default_factory=dict)
    outcome: Outcome | None = None
    write_failure: WriteOutcome | None = None
    lookups: list[bytes] = field(default_factory=list)
    spec: str = "fake:backup"

    async def lookup(self, key: bytes) -> Outcome:
        self.lookups.append(key)
        if self.outcome is not None:
            return self.outcome
        value = self.entries.get(key)
        return NOT_FOUND if value is None else Found(value)

    async def sequence(self) -> AsyncIterator[tuple[bytes, bytes]]:
        for entry in list(self.entries.items()):
            yield entry

    async def update(self, key: bytes, value: bytes) -> WriteOutcome:
        if self.write_failure is not None:
            return self.write_failure
        self.entries[key] = value
        return WRITTEN

    async def update_many(self, items: Sequence[tuple[bytes, bytes]]) -> WriteOutcome:
        if self.write_failure is not None:
            return self.write_failure
        self.entries.update(items)
        return WRITTEN

    async def delete(self, key: bytes) -> WriteOutcome:
        return WRITTEN if self.entries.pop(key, None) is not None else NotWritten("absent")

    async def aclose(self) -> None:
        pass


def table_config(tmp_path: Path, body: str) -> TableConfig:
    """The [tables.t] section ``body``, loaded as the daemon would load it."""
    path = tmp_path / "bridge.toml"
    path.write_text(
        '[[listen]]\nendpoint = "inet:127.0.0.1:10027"\nprotocol = "socketmap"\n'
        f"[tables.t]\n{body}\n"
    )
    return load_config(str(path)).tables["t"]


def make_table(
    tmp_path: Path,
    body: str = "",
    *,
    memcache: FakeMemcache | None = None,
    backup: FakeBackup | None = None,
    domain_maps: dict[str, LookupMap] | None = None,
) -> tuple[Table, FakeMemcache]:
    memcache = memcache if memcache is not None else FakeMemcache()
    config = table_config(tmp_path, body)
    return Table(config, memcache, backup, domain_maps or {}), memcache


# ---------------------------------------------------------------- MC-16


async def test_memcache_hit_is_answered_without_the_backup(tmp_path: Path) -> None:
    backup = FakeBackup({b"k": b"from-backup"})
    table, memcache = make_table(tmp_path, 'backup = "inline:{k=x}"', backup=backup)
    memcache.items[b"k"] = b"cached"
    assert await table.lookup(b"K") == Found(b"cached")  # folded (CASE-2)
    assert backup.lookups == []


async def test_backup_hit_is_refilled(tmp_path: Path) -> None:
    backup = FakeBackup({b"k": b"v"})
    table, memcache = make_table(tmp_path, 'key_format = "p:%s"', backup=backup)
    assert await table.lookup(b"k") == Found(b"v")
    assert memcache.items == {b"p:k": b"v"}
    assert backup.lookups == [b"k"]  # the backup gets the key, not key_format's


async def test_memcache_failure_is_masked_by_the_backup(tmp_path: Path) -> None:
    backup = FakeBackup({b"k": b"v"})
    table, memcache = make_table(tmp_path, backup=backup)
    memcache.down = True
    assert await table.lookup(b"k") == Found(b"v")
    # ... including the backup's "not found": Postfix answers it too.
    assert await table.lookup(b"missing") == NOT_FOUND


async def test_memcache_failure_without_backup_is_temp(tmp_path: Path) -> None:
    table, memcache = make_table(tmp_path)
    memcache.down = True
    assert await table.lookup(b"k") == TEMP


async def test_backup_failure_is_answered_never_not_found(tmp_path: Path) -> None:
    backup = FakeBackup(outcome=Retry("database down"))
    table, _ = make_table(tmp_path, backup=backup)
    assert await table.lookup(b"k") == Retry("database down")


async def test_refill_failure_is_only_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backup = FakeBackup({b"k": b"v"})
    table, memcache = make_table(tmp_path, backup=backup)
    memcache.failing.add(b"k")
    with caplog.at_level(logging.WARNING, logger="bridge.table"):
        assert await table.lookup(b"k") == Found(b"v")
    assert "refill failed" in caplog.text
    assert memcache.sets == [b"k"]


async def test_value_that_is_not_utf8_is_a_configuration_failure(tmp_path: Path) -> None:
    table, memcache = make_table(tmp_path)
    memcache.items[b"k"] = b"\xff"
    assert isinstance(await table.lookup(b"k"), ConfigFailure)


# ---------------------------------------------------------------- suppression (MC-13)


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("", b""),  # empty key
        ('key_format = "%u"', b"@example.com"),  # %u cannot expand
        ("", b"a b"),  # whitespace in the memcache key
        ('domain = "example.com"', b"user@example.org"),  # domain filter
        ("", b"nul\0key"),
    ],
)
async def test_suppressed_keys_reach_neither_memcache_nor_backup(
    tmp_path: Path, body: str, key: bytes
) -> None:
    backup = FakeBackup({key: b"v"})
    table, memcache = make_table(tmp_path, body, backup=backup)
    assert await table.lookup(key) == NOT_FOUND
    assert memcache.gets == []
    assert backup.lookups == []


# ---------------------------------------------------------------- address search (AS-1..AS-6)

VIRTUAL = 'address_search = ["full", "nodelim", "localpart", "@domain"]'


async def test_address_search_first_hit_wins(tmp_path: Path) -> None:
    table, memcache = make_table(tmp_path, VIRTUAL)
    memcache.items[b"@example.com"] = b"catchall@x.test"
    memcache.items[b"user@example.com"] = b"user@x.test"
    assert await table.lookup(b"user@example.com") == Found(b"user@x.test")
    assert memcache.gets == [b"user@example.com"]


async def test_address_search_stops_at_the_first_error(tmp_path: Path) -> None:
    table, memcache = make_table(tmp_path, VIRTUAL)
    memcache.items[b"@example.com"] = b"catchall@x.test"
    memcache.failing.add(b"user@example.com")
    assert await table.lookup(b"user+ext@example.com") == TEMP
    assert memcache.gets == [b"user+ext@example.com", b"user@example.com"]


async def test_address_search_finishes_a_hit_without_the_extension(tmp_path: Path) -> None:
    table, memcache = make_table(tmp_path, VIRTUAL)
    memcache.items[b"bob@alias.test"] = b"bob.real@plain.test"
    memcache.items[b"moved@alias.test"] = b"@b.test"
    assert await table.lookup(b"Bob+News@alias.test") == Found(b"bob.real+News@plain.test")
    assert await table.lookup(b"moved+tag@alias.test") == Found(b"moved+tag@b.test")


async def test_access_tables_are_answered_as_stored(tmp_path: Path) -> None:
    body = 'address_search = ["full", "nodelim", "domain", "parent_domains", "localpart@"]'
    table, memcache = make_table(tmp_path, body)
    memcache.items[b"user@example.com"] = b"REJECT no"
    memcache.items[b"example.com"] = b"OK"
    assert await table.lookup(b"user+x@example.com") == Found(b"REJECT no")
    assert await table.lookup(b"other@mail.example.com") == Found(b"OK")


async def test_domain_table_error_stops_the_search(tmp_path: Path) -> None:
    spec = "socketmap:inet:127.0.0.1:1:domains"
    domains = FakeBackup(outcome=Retry("domain table down"), spec=spec)
    table, memcache = make_table(
        tmp_path, f'domain = "{spec}"\n{VIRTUAL}', domain_maps={spec: domains}
    )
    assert await table.lookup(b"user+x@example.com") == Retry("domain table down")
    assert domains.lookups == [b"example.com"]
    assert memcache.gets == []


# ---------------------------------------------------------------- hot cache


async def test_hot_cache_keeps_answers_for_ttl(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    table, memcache = make_table(tmp_path, "hot_cache_ttl = 10")
    memcache.items[b"k"] = b"v"
    assert await table.lookup(b"k") == Found(b"v")
    assert await table.lookup(b"missing") == NOT_FOUND
    memcache.items[b"k"] = b"new"
    memcache.items[b"missing"] = b"now here"
    await trio.sleep(9.9)
    assert await table.lookup(b"k") == Found(b"v")
    assert await table.lookup(b"missing") == NOT_FOUND
    await trio.sleep(0.2)
    assert await table.lookup(b"k") == Found(b"new")
    assert await table.lookup(b"missing") == Found(b"now here")


async def test_hot_cache_never_keeps_failures(tmp_path: Path) -> None:
    table, memcache = make_table(tmp_path, "hot_cache_ttl = 10")
    memcache.down = True
    assert await table.lookup(b"k") == TEMP
    memcache.down = False
    memcache.items[b"k"] = b"v"
    assert await table.lookup(b"k") == Found(b"v")


# ---------------------------------------------------------------- writes (MC-17 .. MC-19)


async def test_batch_writes_nothing_to_memcache_when_the_backup_fails(tmp_path: Path) -> None:
    backup = FakeBackup(write_failure=Retry("disk full"))
    table, memcache = make_table(tmp_path, "writable = true", backup=backup)
    report = await table.update_batch([(b"a", b"1"), (b"b", b"2")])
    assert (report.written, report.failed, report.temporary) == (0, 2, True)
    assert memcache.items == {}


async def test_batch_writes_both_and_masks_a_memcache_failure(tmp_path: Path) -> None:
    backup = FakeBackup()
    table, memcache = make_table(tmp_path, "writable = true", backup=backup)
    memcache.down = True
    report = await table.update_batch([(b"A", b"1")])
    assert (report.written, report.memcache_failed) == (1, 1)
    assert backup.entries == {b"a": b"1"}


async def test_update_and_delete_go_to_memcache_then_the_backup(tmp_path: Path) -> None:
    backup = FakeBackup()
    table, memcache = make_table(tmp_path, "writable = true", backup=backup)
    assert await table.update(b"K", b"v") == WRITTEN
    assert memcache.items == {b"k": b"v"}
    assert backup.entries == {b"k": b"v"}
    assert await table.delete(b"k") == WRITTEN
    assert memcache.items == {} and backup.entries == {}
    assert await table.delete(b"k") == NotWritten("absent")  # the backup's answer wins


async def test_read_only_table_refuses_writes(tmp_path: Path) -> None:
    table, memcache = make_table(tmp_path)
    assert isinstance(await table.update(b"k", b"v"), NotWritten)
    assert memcache.sets == []


# ---------------------------------------------------------------- single flight


@dataclass
class GatedBackup(FakeBackup):
    """A backup whose lookups wait until ``gate`` is set."""

    gate: trio.Event = field(default_factory=trio.Event)

    async def lookup(self, key: bytes) -> Outcome:
        await self.gate.wait()
        return await super().lookup(key)


async def test_concurrent_misses_share_one_backup_query_and_one_refill(tmp_path: Path) -> None:
    backup = GatedBackup({b"k": b"v", b"other": b"w"})
    table, memcache = make_table(tmp_path, backup=backup)
    answers: list[Outcome] = []

    async def ask(key: bytes) -> None:
        answers.append(await table.lookup(key))

    async with trio.open_nursery() as nursery:
        for _ in range(32):
            nursery.start_soon(ask, b"k")
        nursery.start_soon(ask, b"other")
        await trio.testing.wait_all_tasks_blocked()
        backup.gate.set()
    assert answers.count(Found(b"v")) == 32 and Found(b"w") in answers
    assert sorted(backup.lookups) == [b"k", b"other"]
    assert sorted(memcache.sets) == [b"k", b"other"]


async def test_a_shared_failure_is_every_waiters_answer(tmp_path: Path) -> None:
    backup = GatedBackup(outcome=Retry("database down"))
    backup.gate.set()
    table, _ = make_table(tmp_path, backup=backup)
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(table.lookup, b"k")
    assert await table.lookup(b"k") == Retry("database down")


async def test_waiters_ask_themselves_when_the_query_in_flight_is_cancelled(
    tmp_path: Path,
) -> None:
    backup = GatedBackup({b"k": b"v"})
    table, _ = make_table(tmp_path, backup=backup)
    answers: list[Outcome] = []

    async def ask() -> None:
        answers.append(await table.lookup(b"k"))

    leader = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_in, leader, table.lookup, b"k")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        leader.cancel()
        await trio.testing.wait_all_tasks_blocked()
        backup.gate.set()
    assert answers == [Found(b"v")]
    assert backup.lookups == [b"k"]  # the cancelled leader never reached the backup


async def _run_in(
    scope: trio.CancelScope, function: Callable[[bytes], Awaitable[Outcome]], key: bytes
) -> None:
    with scope:
        await function(key)


# ---------------------------------------------------------------- health


@dataclass
class ReportingBackup(FakeBackup):
    parts: list[BackendHealth] = field(default_factory=list)

    async def health(self) -> list[BackendHealth]:
        return self.parts


async def test_probe_reports_the_backups_parts(tmp_path: Path) -> None:
    backup = ReportingBackup(
        parts=[BackendHealth("host a", True, "up"), BackendHealth("host b", False, "refused")]
    )
    table, _ = make_table(tmp_path, backup=backup)
    health = await table.probe()
    assert not health.ok
    assert "backup host b: refused" in health.detail
    assert health.backup == tuple(backup.parts)
    backup.parts = [BackendHealth("host a", True, "up")]
    assert (await table.probe()).ok


@dataclass
class HeldMemcache(FakeMemcache):
    """memcache whose first get waits for ``hold`` (keeps a lookup under way)."""

    hold: trio.Event = field(default_factory=trio.Event)
    held: bool = False

    async def get(self, key: bytes) -> Found | NotFound | Retry:
        if not self.held:
            self.held = True
            await self.hold.wait()
        return await super().get(key)


async def test_a_lookup_after_an_answer_never_reuses_it(tmp_path: Path) -> None:
    # memcache is down, so every lookup asks the backup. A lookup that
    # starts after the backup answered (a failure here) must ask again,
    # even while older lookups of the key are still under way.
    memcache = HeldMemcache(down=True)
    backup = FakeBackup({b"k": b"v"}, outcome=Retry("database down"))
    table, _ = make_table(tmp_path, memcache=memcache, backup=backup)
    async with trio.open_nursery() as nursery:
        holder: list[Outcome] = []

        async def hold() -> None:
            holder.append(await table.lookup(b"k"))

        nursery.start_soon(hold)
        await trio.testing.wait_all_tasks_blocked()
        assert await table.lookup(b"k") == Retry("database down")
        backup.outcome = None  # the database is back
        assert await table.lookup(b"k") == Found(b"v")
        memcache.hold.set()
    assert holder == [Found(b"v")]  # it began before both answers: it takes the latest
    assert backup.lookups == [b"k", b"k"]
