"""``lmdb:`` tables on real LMDB files (spec 10.1 LM-1 .. LM-8, vectors 12.11).

Fixture files are written with the ``lmdb`` binding directly, byte for
byte, so the NUL forms under test are exactly the ones named in the spec.
Other processes (readers, writers, lock holders) are real subprocesses:
POSIX locks and map growth only show their behaviour across processes.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path

import lmdb
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.keys import fold_table_key
from bridge.maps import (
    SUPPORTED_TYPES,
    WRITABLE_TYPES,
    MapError,
    OpenOptions,
    open_map,
    validate_spec,
)
from bridge.maps.base import WritableMap
from bridge.maps.lmdb import DEFAULT_MAP_SIZE, LMDB_SUFFIX, SEQUENCE_BATCH, LmdbMap
from bridge.outcome import (
    NOT_FOUND,
    WRITTEN,
    ConfigFailure,
    Found,
    NotFound,
    NotWritten,
    Outcome,
    Retry,
    Written,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------- helpers


def lmdb_file(base: Path) -> Path:
    return base.with_name(base.name + LMDB_SUFFIX)


def write_raw(base: Path, entries: Iterable[tuple[bytes, bytes]]) -> Path:
    """Store entries exactly as given (no NUL added) in ``base.lmdb``; return ``base``."""
    with (
        lmdb.Environment(
            str(lmdb_file(base)), subdir=False, lock=False, map_size=DEFAULT_MAP_SIZE
        ) as env,
        env.begin(write=True) as txn,
    ):
        for key, value in entries:
            txn.put(key, value)
    return base


def read_raw(base: Path) -> dict[bytes, bytes]:
    """Every stored (key, value), exactly as stored."""
    with (
        lmdb.Environment(str(lmdb_file(base)), subdir=False, lock=False, readonly=True) as env,
        env.begin() as txn,
    ):
        return dict(txn.cursor())


def open_lmdb(base: Path, *, writable: bool = False, smtputf8: bool = True) -> LmdbMap:
    return LmdbMap(f"lmdb:{base}", str(base), writable=writable, smtputf8=smtputf8)


async def listing(table: LmdbMap) -> list[tuple[bytes, bytes]]:
    return [entry async for entry in table.sequence()]


def run_python(code: str, *args: str) -> str:
    """Run a Python snippet in a fresh process (the bridge importable); return stdout."""
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


# A separate process that looks keys up through LmdbMap and prints the outcomes.
LOOKUP_SCRIPT = """
import sys, trio
from bridge.maps.lmdb import LmdbMap

async def main():
    table = LmdbMap("lmdb:x", sys.argv[1])
    for key in sys.argv[2:]:
        print(key, await table.lookup(key.encode()))
    await table.aclose()

trio.run(main)
"""

# A separate process that writes key=value pairs (one transaction) through LmdbMap.
WRITE_SCRIPT = """
import sys, trio
from bridge.maps.lmdb import LmdbMap

async def main():
    table = LmdbMap("lmdb:x", sys.argv[1], writable=True)
    pairs = [arg.encode().split(b"=", 1) for arg in sys.argv[2:]]
    print(await table.update_many([(k, v) for k, v in pairs]))
    await table.aclose()

trio.run(main)
"""

# Holds Postfix's fcntl lock on a file until stdin closes.
LOCK_HOLDER_SCRIPT = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX if sys.argv[2] == "exclusive" else fcntl.LOCK_SH)
print("locked", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def lock_held_elsewhere(file: Path, *, exclusive: bool) -> Iterator[None]:
    """Another process holds the whole-file fcntl lock for the duration (LM-2)."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            LOCK_HOLDER_SCRIPT,
            str(file),
            "exclusive" if exclusive else "shared",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        yield
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
        holder.stdout.close()  # type: ignore[union-attr]


# ------------------------------------------------------- vectors 12.11


# Spec 12.11, rows 1-5: one fresh table, one lookup. The lookup key is what
# the caller passes: "(folded)" rows fold it first, as the bridge's table
# code does for backup tables (CASE-2); the "postmap -f" row does not.
@pytest.mark.parametrize(
    ("stored", "key", "expected"),
    [
        ((b"key1\0", b"value1\0"), fold_table_key(b"KEY1"), Found(b"value1")),
        ((b"alpha", b"A1"), b"alpha", Found(b"A1")),
        ((b"alpha", b"A1"), fold_table_key(b"ALPHA"), Found(b"A1")),
        ((b"Beta", b"B1"), fold_table_key(b"beta"), NOT_FOUND),
        ((b"Beta", b"B1"), b"Beta", Found(b"B1")),
        ((b"gamma\0", b"G1\0"), b"gamma", Found(b"G1")),
    ],
)
async def test_vectors_12_11_single_lookups(
    tmp_path: Path, stored: tuple[bytes, bytes], key: bytes, expected: Outcome
) -> None:
    table = open_lmdb(write_raw(tmp_path / "t", [stored]))
    assert await table.lookup(key) == expected
    await table.aclose()


# Spec 12.11, rows 6-7: the file mixes both forms; the first hit decides
# the form for the rest of the open table (LM-5).
MIXED = [(b"xx", b"X1"), (b"yy\0", b"Y1\0")]


@pytest.mark.parametrize(
    "steps",
    [
        [(b"xx", Found(b"X1")), (b"yy", NOT_FOUND)],
        [(b"yy", Found(b"Y1")), (b"xx", NOT_FOUND)],
    ],
)
async def test_vectors_12_11_first_hit_decides(
    tmp_path: Path, steps: list[tuple[bytes, Outcome]]
) -> None:
    table = open_lmdb(write_raw(tmp_path / "t", MIXED))
    for key, expected in steps:
        assert await table.lookup(key) == expected
    await table.aclose()


# Spec 12.11, row 8: separate opens decide separately.
async def test_vectors_12_11_separate_opens(tmp_path: Path) -> None:
    base = write_raw(tmp_path / "t", MIXED)
    for key, expected in [(b"yy", Found(b"Y1")), (b"xx", Found(b"X1"))]:
        table = open_lmdb(base)
        assert await table.lookup(key) == expected
        await table.aclose()


async def test_form_is_per_instance_even_when_open_together(tmp_path: Path) -> None:
    base = write_raw(tmp_path / "t", MIXED)
    first, second = open_lmdb(base), open_lmdb(base)
    assert await first.lookup(b"xx") == Found(b"X1")
    assert await second.lookup(b"yy") == Found(b"Y1")
    assert await first.lookup(b"yy") == NOT_FOUND
    assert await second.lookup(b"xx") == NOT_FOUND
    await first.aclose()
    await second.aclose()


async def test_a_miss_leaves_the_form_undecided(tmp_path: Path) -> None:
    table = open_lmdb(write_raw(tmp_path / "t", MIXED))
    assert await table.lookup(b"absent") == NOT_FOUND
    assert await table.lookup(b"xx") == Found(b"X1")
    await table.aclose()


# ------------------------------------------------------------ lookups


async def test_value_is_cut_at_first_nul(tmp_path: Path) -> None:
    table = open_lmdb(write_raw(tmp_path / "t", [(b"k\0", b"ab\0cd\0")]))
    assert await table.lookup(b"k") == Found(b"ab")
    await table.aclose()


async def test_empty_value_is_found_empty(tmp_path: Path) -> None:
    table = open_lmdb(write_raw(tmp_path / "t", [(b"k\0", b"\0")]))
    assert await table.lookup(b"k") == Found(b"")
    await table.aclose()


async def test_non_utf8_value_is_a_config_failure_under_smtputf8(tmp_path: Path) -> None:
    # G-6: Postfix turns a found non-UTF-8 value into CONFIG.
    base = write_raw(tmp_path / "t", [(b"k\0", b"\xff\0")])
    table = open_lmdb(base, smtputf8=True)
    assert await table.lookup(b"k") == ConfigFailure(f"table lmdb:{base}: value is not valid UTF-8")
    await table.aclose()


async def test_non_utf8_value_is_found_without_smtputf8(tmp_path: Path) -> None:
    table = open_lmdb(write_raw(tmp_path / "t", [(b"k\0", b"\xff\0")]), smtputf8=False)
    assert await table.lookup(b"k") == Found(b"\xff")
    await table.aclose()


@pytest.mark.parametrize("key", [b"", b"k" * 600, b"\0", b"a\0b"])
async def test_odd_keys_are_simply_not_found(tmp_path: Path, key: bytes) -> None:
    table = open_lmdb(write_raw(tmp_path / "t", [(b"k\0", b"v\0")]))
    assert await table.lookup(key) == NOT_FOUND
    await table.aclose()


async def test_utf8_keys_and_values(tmp_path: Path) -> None:
    key, value = "straße".encode(), "grüß gott".encode()
    table = open_lmdb(write_raw(tmp_path / "t", [(key + b"\0", value + b"\0")]))
    assert await table.lookup(key) == Found(value)
    await table.aclose()


# ------------------------------------------------------------- writes


async def test_update_writes_nul_form_when_undecided(tmp_path: Path) -> None:
    # LM-4 / LM-6: one NUL appended to key and value, as postmap writes.
    base = tmp_path / "t"
    table = open_lmdb(base, writable=True)
    assert await table.update(b"key1", b"value 1") == WRITTEN
    await table.aclose()
    assert read_raw(base) == {b"key1\0": b"value 1\0"}


async def test_update_keeps_a_decided_plain_form(tmp_path: Path) -> None:
    base = write_raw(tmp_path / "t", [(b"alpha", b"A1")])
    table = open_lmdb(base, writable=True)
    assert await table.lookup(b"alpha") == Found(b"A1")
    assert await table.update(b"beta", b"B1") == WRITTEN
    await table.aclose()
    assert read_raw(base) == {b"alpha": b"A1", b"beta": b"B1"}


async def test_update_decides_the_nul_form(tmp_path: Path) -> None:
    # After writing in NUL form, a plain-form entry is no longer looked at.
    base = write_raw(tmp_path / "t", [(b"alpha", b"A1")])
    table = open_lmdb(base, writable=True)
    assert await table.update(b"beta", b"B1") == WRITTEN
    assert await table.lookup(b"alpha") == NOT_FOUND
    assert await table.lookup(b"beta") == Found(b"B1")
    await table.aclose()


async def test_update_replaces_existing_value(tmp_path: Path) -> None:
    base = tmp_path / "t"
    table = open_lmdb(base, writable=True)
    assert await table.update(b"k", b"old") == WRITTEN
    assert await table.update(b"k", b"new") == WRITTEN
    assert await table.lookup(b"k") == Found(b"new")
    await table.aclose()
    assert read_raw(base) == {b"k\0": b"new\0"}


async def test_update_many_writes_all_and_later_duplicates_win(tmp_path: Path) -> None:
    base = write_raw(tmp_path / "t", [(b"a\0", b"old\0")])
    table = open_lmdb(base, writable=True)
    result = await table.update_many([(b"a", b"1"), (b"b", b"2"), (b"a", b"3")])
    assert result == WRITTEN
    await table.aclose()
    assert read_raw(base) == {b"a\0": b"3\0", b"b\0": b"2\0"}


async def test_update_many_empty_is_a_no_op(tmp_path: Path) -> None:
    table = open_lmdb(tmp_path / "t", writable=True)
    assert await table.update_many([]) == WRITTEN
    assert await listing(table) == []
    await table.aclose()


async def test_update_many_is_all_or_nothing(tmp_path: Path) -> None:
    base = write_raw(tmp_path / "t", [(b"keep\0", b"1\0")])
    table = open_lmdb(base, writable=True)
    too_long = b"x" * 1000  # beyond LMDB's key size limit
    result = await table.update_many([(b"a", b"1"), (too_long, b"2"), (b"c", b"3")])
    assert isinstance(result, NotWritten)
    assert "cannot be stored" in result.reason
    assert await table.lookup(b"a") == NOT_FOUND
    await table.aclose()
    assert read_raw(base) == {b"keep\0": b"1\0"}


async def test_update_of_an_empty_plain_key_is_refused(tmp_path: Path) -> None:
    base = write_raw(tmp_path / "t", [(b"alpha", b"A1")])
    table = open_lmdb(base, writable=True)
    assert await table.lookup(b"alpha") == Found(b"A1")  # decides "plain"
    assert isinstance(await table.update(b"", b"v"), NotWritten)
    await table.aclose()
    assert read_raw(base) == {b"alpha": b"A1"}


async def test_delete_nul_form(tmp_path: Path) -> None:
    base = write_raw(tmp_path / "t", [(b"k\0", b"v\0"), (b"j\0", b"w\0")])
    table = open_lmdb(base, writable=True)
    assert await table.delete(b"k") == WRITTEN
    assert await table.lookup(b"k") == NOT_FOUND
    await table.aclose()
    assert read_raw(base) == {b"j\0": b"w\0"}


async def test_delete_plain_form(tmp_path: Path) -> None:
    base = write_raw(tmp_path / "t", [(b"k", b"v")])
    table = open_lmdb(base, writable=True)
    assert await table.delete(b"k") == WRITTEN
    await table.aclose()
    assert read_raw(base) == {}


async def test_delete_absent_key(tmp_path: Path) -> None:
    base = write_raw(tmp_path / "t", [(b"k\0", b"v\0")])
    table = open_lmdb(base, writable=True)
    assert await table.delete(b"nope") == NotWritten("not found")
    await table.aclose()
    assert read_raw(base) == {b"k\0": b"v\0"}


@pytest.mark.parametrize(
    ("first", "then", "left"),
    [
        (b"yy", b"xx", {b"xx": b"X1"}),  # NUL form decided: plain xx is not seen
        (b"xx", b"yy", {b"yy\0": b"Y1\0"}),  # plain form decided: yy\0 is not seen
    ],
)
async def test_delete_is_sticky_like_lookups(
    tmp_path: Path, first: bytes, then: bytes, left: dict[bytes, bytes]
) -> None:
    # LM-7 on the 12.11 mixed file.
    base = write_raw(tmp_path / "t", MIXED)
    table = open_lmdb(base, writable=True)
    assert await table.delete(first) == WRITTEN
    assert await table.delete(then) == NotWritten("not found")
    await table.aclose()
    assert read_raw(base) == left


async def test_delete_after_lookup_decided(tmp_path: Path) -> None:
    base = write_raw(tmp_path / "t", MIXED)
    table = open_lmdb(base, writable=True)
    assert await table.lookup(b"xx") == Found(b"X1")
    assert await table.delete(b"yy") == NotWritten("not found")
    await table.aclose()
    assert read_raw(base) == dict(MIXED)


# ----------------------------------------------------------- sequence


async def test_sequence_strips_nul_in_byte_order(tmp_path: Path) -> None:
    # LM-1 order (bytewise), LM-8 trailing NUL removed, empty value "".
    base = write_raw(
        tmp_path / "t",
        [
            (b"b\0", b"2\0"),
            (b"a", b"1"),
            (b"c\0", b"\0"),
            (b"B\0", b"upper\0"),
            (b"\xc3\xa9\0", b"e\0"),
        ],
    )
    table = open_lmdb(base)
    assert await listing(table) == [
        (b"B", b"upper"),
        (b"a", b"1"),
        (b"b", b"2"),
        (b"c", b""),
        (b"\xc3\xa9", b"e"),
    ]
    await table.aclose()


async def test_sequence_of_an_empty_table(tmp_path: Path) -> None:
    table = open_lmdb(tmp_path / "t", writable=True)
    assert await listing(table) == []
    await table.aclose()


async def test_sequence_of_10000_entries_yields_each_once(tmp_path: Path) -> None:
    entries = [(b"key%05d" % n, b"value %d" % n) for n in range(10_000)]
    table = open_lmdb(tmp_path / "t", writable=True)
    assert await table.update_many(entries) == WRITTEN
    assert await listing(table) == entries  # also sorted: the keys are zero-padded
    await table.aclose()


async def test_sequence_survives_writes_between_batches(tmp_path: Path) -> None:
    entries = [(b"key%05d" % n, b"v") for n in range(0, 3 * SEQUENCE_BATCH, 2)]
    table = open_lmdb(tmp_path / "t", writable=True)
    assert await table.update_many(entries) == WRITTEN
    seen: list[bytes] = []
    async for key, _ in table.sequence():
        seen.append(key)
        if len(seen) == SEQUENCE_BATCH:
            # Keys behind and ahead of the position, and the position itself.
            changes = [(b"key%05d" % n, b"new") for n in (1, 2 * SEQUENCE_BATCH + 1)]
            assert await table.update_many([*changes, (seen[-1], b"changed")]) == WRITTEN
            assert await table.delete(entries[SEQUENCE_BATCH + 5][0]) == WRITTEN
    assert seen == sorted(set(seen))  # each key at most once, in order
    assert b"key%05d" % (2 * SEQUENCE_BATCH + 1) in seen
    assert b"key00001" not in seen
    assert entries[SEQUENCE_BATCH + 5][0] not in seen
    await table.aclose()


# ----------------------------------------------- growth and visibility


async def test_writes_beyond_the_initial_map_grow_it(tmp_path: Path) -> None:
    # LM-3: 24 MiB in one transaction hits "map full" at 16 MiB mid-way;
    # the map doubles and the whole transaction runs again.
    base = tmp_path / "t"
    table = open_lmdb(base, writable=True)
    chunk = os.urandom(1024 * 1024).hex().encode()[: 1024 * 1024]
    items = [(b"big%02d" % n, chunk) for n in range(24)]
    assert await table.update_many(items) == WRITTEN
    assert lmdb_file(base).stat().st_size > DEFAULT_MAP_SIZE
    assert await table.update(b"after", b"growth") == WRITTEN
    assert await table.lookup(b"big23") == Found(chunk)
    assert await table.lookup(b"after") == Found(b"growth")
    await table.aclose()


async def test_reader_copes_with_a_file_grown_by_another_process(tmp_path: Path) -> None:
    base = tmp_path / "t"
    reader = open_lmdb(write_raw(base, [(b"k\0", b"v\0")]))
    assert await reader.lookup(b"k") == Found(b"v")
    run_python(
        """
        import sys, trio
        from bridge.maps.lmdb import LmdbMap
        async def main():
            table = LmdbMap("lmdb:x", sys.argv[1], writable=True)
            chunk = b"z" * (1024 * 1024)
            for n in range(24):
                assert str(await table.update(b"big%02d" % n, chunk)) == "Written()"
            await table.aclose()
        trio.run(main)
        """,
        str(base),
    )
    assert lmdb_file(base).stat().st_size > DEFAULT_MAP_SIZE
    assert await reader.lookup(b"big23") == Found(b"z" * (1024 * 1024))
    assert await reader.lookup(b"k") == Found(b"v")
    await reader.aclose()


async def test_second_instance_in_process_sees_writes(tmp_path: Path) -> None:
    base = tmp_path / "t"
    writer = open_lmdb(base, writable=True)
    reader = open_lmdb(base)
    assert await reader.lookup(b"k") == NOT_FOUND
    assert await writer.update(b"k", b"v1") == WRITTEN
    assert await reader.lookup(b"k") == Found(b"v1")
    assert await writer.delete(b"k") == WRITTEN
    assert await reader.lookup(b"k") == NOT_FOUND
    await writer.aclose()
    assert await reader.lookup(b"k") == NOT_FOUND  # still open after the other closed
    await reader.aclose()


async def test_other_processes_see_commits_both_ways(tmp_path: Path) -> None:
    base = tmp_path / "t"
    table = open_lmdb(base, writable=True)
    assert await table.update(b"mine", b"from bridge") == WRITTEN
    out = run_python(LOOKUP_SCRIPT, str(base), "mine")
    assert out == "mine Found(value=b'from bridge')\n"

    assert await table.lookup(b"theirs") == NOT_FOUND
    assert run_python(WRITE_SCRIPT, str(base), "theirs=from cli") == "Written()\n"
    # Same open table, no restart: the next lookup sees the other commit.
    assert await table.lookup(b"theirs") == Found(b"from cli")
    await table.aclose()


async def test_read_only_table_opened_before_a_writable_one(tmp_path: Path) -> None:
    # Two instances on one file share one environment; the second, writable,
    # reopens it read-write without disturbing the first.
    base = write_raw(tmp_path / "t", [(b"k\0", b"v\0")])
    reader = open_lmdb(base)
    assert await reader.lookup(b"k") == Found(b"v")
    writer = open_lmdb(base, writable=True)
    assert await writer.update(b"k", b"w") == WRITTEN
    assert await reader.lookup(b"k") == Found(b"w")
    assert isinstance(await reader.update(b"k", b"x"), ConfigFailure)
    await reader.aclose()
    await writer.aclose()


async def test_aclose_releases_the_file(tmp_path: Path) -> None:
    base = write_raw(tmp_path / "t", [(b"k\0", b"v\0")])
    tables = [open_lmdb(base), open_lmdb(base, writable=True)]
    for table in tables:
        await table.aclose()
        await table.aclose()  # idempotent
    # The binding refuses a file still open in this process.
    assert read_raw(base) == {b"k\0": b"v\0"}
    assert isinstance(await tables[0].lookup(b"k"), Retry)
    assert isinstance(await tables[1].update(b"k", b"v"), Retry)


# -------------------------------------------------------------- locks


async def test_lookup_waits_for_exclusive_lock_then_retries(tmp_path: Path) -> None:
    # LM-2: a lookup takes the shared lock, which an exclusive holder blocks.
    base = write_raw(tmp_path / "t", [(b"k\0", b"v\0")])
    table = LmdbMap(f"lmdb:{base}", str(base), lock_timeout=0.2)
    with lock_held_elsewhere(lmdb_file(base), exclusive=True):
        outcome = await table.lookup(b"k")
        assert isinstance(outcome, Retry)
        assert "lock" in outcome.reason
    assert await table.lookup(b"k") == Found(b"v")
    await table.aclose()


async def test_writes_need_the_exclusive_lock(tmp_path: Path) -> None:
    base = write_raw(tmp_path / "t", [(b"k\0", b"v\0")])
    table = LmdbMap(f"lmdb:{base}", str(base), writable=True, lock_timeout=0.2)
    with lock_held_elsewhere(lmdb_file(base), exclusive=False):
        assert await table.lookup(b"k") == Found(b"v")  # shared locks coexist
        assert isinstance(await table.update(b"k", b"w"), Retry)
        assert isinstance(await table.delete(b"k"), Retry)
    assert await table.lookup(b"k") == Found(b"v")
    assert await table.update(b"k", b"w") == WRITTEN
    await table.aclose()


async def test_sequence_lock_timeout_is_a_map_error(tmp_path: Path) -> None:
    base = write_raw(tmp_path / "t", [(b"k\0", b"v\0")])
    table = LmdbMap(f"lmdb:{base}", str(base), lock_timeout=0.2)
    with lock_held_elsewhere(lmdb_file(base), exclusive=True), pytest.raises(MapError):
        await listing(table)
    await table.aclose()


async def test_concurrent_tasks_share_one_file_safely(tmp_path: Path) -> None:
    # Many tasks, one process: the per-file limiter keeps lock/unlock of
    # different threads from interleaving, so nothing fails.
    base = tmp_path / "t"
    writer = open_lmdb(base, writable=True)
    reader = open_lmdb(base)
    failures: list[object] = []

    async def write(n: int) -> None:
        result = await writer.update_many([(b"k%d" % i, b"%d" % n) for i in range(20)])
        if result != WRITTEN:
            failures.append(result)

    async def read() -> None:
        for _ in range(20):
            outcome = await reader.lookup(b"k5")
            if not isinstance(outcome, (Found, NotFound)):
                failures.append(outcome)

    async with trio.open_nursery() as nursery:
        for n in range(10):
            nursery.start_soon(write, n)
            nursery.start_soon(read)
    assert failures == []
    await writer.aclose()
    await reader.aclose()


# ------------------------------------------------------ open and modes


async def test_read_only_open_of_missing_file_names_it(tmp_path: Path) -> None:
    base = tmp_path / "missing"
    with pytest.raises(MapError, match=re.escape(str(lmdb_file(base)))):
        open_lmdb(base)
    assert not lmdb_file(base).exists()


async def test_writable_open_creates_the_file(tmp_path: Path) -> None:
    base = tmp_path / "new"
    table = open_lmdb(base, writable=True)
    assert lmdb_file(base).exists()
    assert await table.lookup(b"k") == NOT_FOUND
    await table.aclose()
    assert read_raw(base) == {}


async def test_writable_open_in_missing_directory_fails(tmp_path: Path) -> None:
    with pytest.raises(MapError, match="cannot open"):
        open_lmdb(tmp_path / "no" / "dir", writable=True)


@pytest.mark.parametrize("content", [b"this is not an lmdb file" * 1000, b""])
async def test_garbage_file_is_a_map_error(tmp_path: Path, content: bytes) -> None:
    base = tmp_path / "t"
    lmdb_file(base).write_bytes(content)
    with pytest.raises(MapError, match="cannot open"):
        open_lmdb(base)


async def test_read_only_table_refuses_writes(tmp_path: Path) -> None:
    base = write_raw(tmp_path / "t", [(b"k\0", b"v\0")])
    table = open_lmdb(base)
    assert isinstance(await table.update(b"k", b"w"), ConfigFailure)
    assert isinstance(await table.update_many([(b"k", b"w")]), ConfigFailure)
    assert isinstance(await table.delete(b"k"), ConfigFailure)
    await table.aclose()
    assert read_raw(base) == {b"k\0": b"v\0"}


async def test_lmdb_map_is_a_writable_map(tmp_path: Path) -> None:
    table: WritableMap = open_lmdb(tmp_path / "t", writable=True)
    assert table.spec == f"lmdb:{tmp_path / 't'}"
    await table.aclose()


# ------------------------------------------------------------ registry


def test_lmdb_is_supported_and_writable() -> None:
    assert "lmdb" in SUPPORTED_TYPES
    # proxy: is writable for some inner types (PXC-7).
    assert WRITABLE_TYPES == ("lmdb", "proxy")


@pytest.mark.parametrize(
    "spec",
    ["texthash:/x", "inline:{a=1}", "static:x", "socketmap:inet:127.0.0.1:9999:m", "tcp:h:25"],
)
def test_writable_needs_a_writable_type(spec: str) -> None:
    table_type = spec.partition(":")[0]
    message = (
        f"table type '{table_type}' cannot be written: "
        "writable = true needs a writable backup type (lmdb, proxy)"
    )
    with pytest.raises(MapError) as info:
        validate_spec(spec, OpenOptions("/", writable=True))
    assert str(info.value) == message
    with pytest.raises(MapError) as info:
        open_map(spec, OpenOptions("/", writable=True))
    assert str(info.value) == message


def test_validate_lmdb_spec_touches_no_file() -> None:
    validate_spec("lmdb:/no/such/table", OpenOptions("/nonexistent"))
    validate_spec("lmdb:relative", OpenOptions("/nonexistent", writable=True))
    with pytest.raises(MapError, match="missing file name after 'lmdb:'"):
        validate_spec("lmdb:", OpenOptions("/"))


async def test_open_map_resolves_relative_names(tmp_path: Path) -> None:
    table = open_map("lmdb:sub", OpenOptions(str(tmp_path), writable=True))
    assert isinstance(table, LmdbMap)
    assert table.file == str(tmp_path / "sub.lmdb")
    assert await table.update(b"k", b"v") == WRITTEN
    await table.aclose()
    reader = open_map("lmdb:sub", OpenOptions(str(tmp_path), fold=False))
    assert await reader.lookup(b"k") == Found(b"v")
    await reader.aclose()


def test_open_map_read_only_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MapError, match=re.escape("sub.lmdb")):
        open_map("lmdb:sub", OpenOptions(str(tmp_path)))


# ---------------------------------------------------------- properties

_property_settings = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_c_strings = st.binary(min_size=1, max_size=80).filter(lambda data: b"\0" not in data)


@_property_settings
@given(st.dictionaries(_c_strings, st.binary(max_size=200), max_size=30))
def test_round_trip(entries: dict[bytes, bytes]) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as directory:
            table = open_lmdb(Path(directory) / "t", writable=True, smtputf8=False)
            assert await table.update_many(list(entries.items())) == WRITTEN
            for key, value in entries.items():
                assert await table.lookup(key) == Found(value.partition(b"\0")[0])
            expected = sorted((k, v.partition(b"\0")[0]) for k, v in entries.items())
            assert await listing(table) == expected
            await table.aclose()

    trio.run(main)


@_property_settings
@given(st.lists(st.binary(max_size=600), max_size=20))
def test_arbitrary_lookup_keys_never_raise(keys: list[bytes]) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as directory:
            base = write_raw(Path(directory) / "t", [(b"k\0", b"v\0"), (b"plain", b"p")])
            table = open_lmdb(base, smtputf8=False)
            for key in keys:
                assert isinstance(await table.lookup(key), (Found, NotFound))
            await table.aclose()

    trio.run(main)


@_property_settings
@given(st.binary(max_size=600), st.binary(max_size=200))
def test_arbitrary_updates_never_raise(key: bytes, value: bytes) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as directory:
            table = open_lmdb(Path(directory) / "t", writable=True, smtputf8=False)
            result = await table.update(key, value)
            assert isinstance(result, (Written, NotWritten))
            if isinstance(result, Written):
                assert await table.lookup(key) == Found(value.partition(b"\0")[0])
                assert await table.delete(key) == WRITTEN
            assert await listing(table) == []
            await table.aclose()

    trio.run(main)
