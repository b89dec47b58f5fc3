"""``lmdb:`` tables shared with Postfix's own ``postmap`` (spec 10.1, 12.11).

Theory of operation
-------------------
The bridge's :class:`~bridge.maps.lmdb.LmdbMap` and Postfix 3.7's
``postmap`` (with the postfix-lmdb plugin) work on the same ``.lmdb``
files, each in its own process, and must agree both ways:

* files made by ``postmap`` are read by the bridge, including the keys
  ``postmap`` folded when it created them;
* entries the bridge writes are what ``postmap -q`` / ``-s`` / ``-d`` see;
* the NUL-form vectors of 12.11 give the same answers from both;
* concurrent readers and writers in different processes never see an
  error or a half-written state, because both sides take Postfix's fcntl
  locks (LM-2);
* a writer killed with SIGKILL leaves a file that holds every batch it had
  reported committed.

"The bridge" in another process is a small Python script using LmdbMap,
run from the repository root; the table code that would call it in the
daemon is not needed to test the file sharing itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import trio

from bridge.keys import fold_table_key
from bridge.maps.lmdb import LMDB_SUFFIX, LmdbMap
from bridge.outcome import NOT_FOUND, WRITTEN, Found, NotWritten
from tests.integration.harness import POSTMAP, postmap_query, postmap_query_many

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Seconds any helper process may take before the test fails instead of hanging.
PROCESS_TIMEOUT = 30


def postmap(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [POSTMAP, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )


def postmap_listing(table: str) -> dict[str, str]:
    """``postmap -s``: every entry, as Postfix sees it."""
    result = postmap("-s", table)
    assert result.returncode == 0, result.stderr
    assert "fatal:" not in result.stderr
    pairs = (line.split("\t", 1) for line in result.stdout.splitlines())
    return {key: value for key, value in pairs}


def python_process(code: str, *args: str) -> subprocess.Popen[str]:
    """Start a Python snippet with the bridge importable; stdout is a text pipe."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def open_lmdb(base: Path, *, writable: bool = False) -> LmdbMap:
    return LmdbMap(f"lmdb:{base}", str(base), writable=writable)


# ------------------------------------------------ postmap-made tables


SOURCE = """\
# comments and blank lines are postmap's business
Key1        value1
MiXeD@Example.COM   value with  inner   spaces
Straße      Grüß Gott
lower       a "quoted" value
"""

# What postmap stores for SOURCE: keys folded (LM-4, CASE-2), values trimmed.
SOURCE_ENTRIES = {
    "Key1": "value1",
    "MiXeD@Example.COM": "value with  inner   spaces",
    "Straße": "Grüß Gott",
    "lower": 'a "quoted" value',
}


async def test_bridge_reads_every_key_postmap_stored(tmp_path: Path) -> None:
    base = tmp_path / "table"
    base.write_text(SOURCE)
    created = postmap(f"lmdb:{base}")
    assert created.returncode == 0, created.stderr

    table = open_lmdb(base)
    for key, value in SOURCE_ENTRIES.items():
        # The bridge's caller folds lookup keys just as postmap folded these.
        assert await table.lookup(fold_table_key(key.encode())) == Found(value.encode())
    assert await table.lookup(b"Key1") == NOT_FOUND  # stored folded, looked up as given
    listed = [(k.decode(), v.decode()) async for k, v in table.sequence()]
    assert dict(listed) == postmap_listing(f"lmdb:{base}")
    assert [k for k, _ in listed] == sorted(k for k, _ in listed)  # LMDB byte order
    await table.aclose()


async def test_bridge_sees_postmap_rebuild_without_reopening(tmp_path: Path) -> None:
    # postmap rebuilds the file in place (drop + load), so a long-running
    # bridge sees the new contents on its next lookup.
    base = tmp_path / "table"
    base.write_text("old value1\n")
    assert postmap(f"lmdb:{base}").returncode == 0
    table = open_lmdb(base)
    assert await table.lookup(b"old") == Found(b"value1")

    base.write_text("new value2\n")
    assert postmap(f"lmdb:{base}").returncode == 0
    assert await table.lookup(b"old") == NOT_FOUND
    assert await table.lookup(b"new") == Found(b"value2")
    await table.aclose()


# ------------------------------------------------------ 12.11 vectors


def make_mixed_file(base: Path) -> None:
    """The 12.11 mixed file: ``xx`` without NUL, ``yy`` with (written by the bridge)."""
    # A file in plain form first, then add a NUL-form entry with a fresh
    # open (undecided writes use the NUL form, LM-6).
    plain = subprocess.run(
        [POSTMAP, "-n", "-i", f"lmdb:{base}"],
        input="xx X1\n",
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )
    assert plain.returncode == 0, plain.stderr

    async def add_nul_entry() -> None:
        table = open_lmdb(base, writable=True)
        assert await table.update(b"yy", b"Y1") == WRITTEN
        await table.aclose()

    trio.run(add_nul_entry)


def test_vectors_12_11_agree_with_postmap(tmp_path: Path) -> None:
    base = tmp_path / "mixed"
    make_mixed_file(base)
    table = f"lmdb:{base}"

    async def bridge_answers(keys: list[bytes]) -> list[object]:
        lmdb_table = open_lmdb(base)
        answers: list[object] = [await lmdb_table.lookup(key) for key in keys]
        await lmdb_table.aclose()
        return answers

    # One process, xx then yy: the first hit decides the plain form.
    assert postmap_query_many(["xx", "yy"], table).stdout == "xx\tX1\n"
    assert trio.run(bridge_answers, [b"xx", b"yy"]) == [Found(b"X1"), NOT_FOUND]
    # One process, yy then xx: the NUL form.
    assert postmap_query_many(["yy", "xx"], table).stdout == "yy\tY1\n"
    assert trio.run(bridge_answers, [b"yy", b"xx"]) == [Found(b"Y1"), NOT_FOUND]
    # Separate processes each decide for themselves.
    assert postmap_query("yy", table).outcome == "found:Y1"
    assert postmap_query("xx", table).outcome == "found:X1"


def test_vectors_12_11_case(tmp_path: Path) -> None:
    base = tmp_path / "case"
    made = postmap("-f", "-n", "-i", f"lmdb:{base}", stdin="Beta B1\n")
    assert made.returncode == 0, made.stderr

    async def bridge_answers() -> list[object]:
        lmdb_table = open_lmdb(base)
        answers: list[object] = [
            await lmdb_table.lookup(fold_table_key(b"beta")),
            await lmdb_table.lookup(b"Beta"),
        ]
        await lmdb_table.aclose()
        return answers

    assert postmap_query("beta", f"lmdb:{base}").outcome == "notfound"
    assert postmap("-f", "-q", "Beta", f"lmdb:{base}").stdout == "B1\n"
    assert trio.run(bridge_answers) == [NOT_FOUND, Found(b"B1")]


# ------------------------------------------------ bridge-made tables


BRIDGE_ENTRIES = {
    "alpha": "one",
    "Beta@Example.com": "two words",
    "gamma": "replaced later",
    "Straße": "Grüß Gott",
}


def folded(key: str) -> str:
    """The key as the bridge's caller hands it to a backup table (CASE-2)."""
    return fold_table_key(key.encode()).decode()


async def test_postmap_sees_exactly_what_the_bridge_wrote(tmp_path: Path) -> None:
    base = tmp_path / "written"
    table = open_lmdb(base, writable=True)
    assert await table.update(b"alpha", b"one") == WRITTEN
    batch = [(folded(k).encode(), v.encode()) for k, v in BRIDGE_ENTRIES.items() if k != "alpha"]
    assert await table.update_many(batch) == WRITTEN
    assert await table.update(b"gamma", b"final value") == WRITTEN
    expected = {**BRIDGE_ENTRIES, "gamma": "final value"}

    # Asked while the bridge still has the table open; postmap folds the
    # query key itself, so the original spelling finds the folded entry.
    for key, value in expected.items():
        assert postmap_query(key, f"lmdb:{base}").outcome == f"found:{value}"
    listing = {folded(k): v for k, v in expected.items()}
    assert postmap_listing(f"lmdb:{base}") == listing
    await table.aclose()
    assert postmap_listing(f"lmdb:{base}") == listing


async def test_postmap_delete_after_bridge_writes(tmp_path: Path) -> None:
    base = tmp_path / "written"
    table = open_lmdb(base, writable=True)
    assert await table.update_many([(b"keep", b"1"), (b"drop", b"2")]) == WRITTEN

    deleted = postmap("-d", "drop", f"lmdb:{base}")
    assert deleted.returncode == 0, deleted.stderr
    assert await table.lookup(b"drop") == NOT_FOUND  # seen without reopening
    assert postmap("-d", "drop", f"lmdb:{base}").returncode == 1  # now absent
    assert await table.delete(b"drop") == NotWritten("not found")
    assert postmap_listing(f"lmdb:{base}") == {"keep": "1"}
    await table.aclose()


# ------------------------------------------------------- concurrency


CONCURRENT_WRITER = """
import sys, trio
from bridge.maps.lmdb import LmdbMap

async def main():
    table = LmdbMap("lmdb:x", sys.argv[1], writable=True)
    keys, rounds = int(sys.argv[2]), int(sys.argv[3])
    for round_ in range(1, rounds + 1):
        items = [(b"k%05d" % i, b"%d" % round_) for i in range(keys)]
        result = await table.update_many(items)
        if str(result) != "Written()":
            print("write failed:", result, flush=True)
            sys.exit(1)
    await table.aclose()
    print("writer done", flush=True)

trio.run(main)
"""

# Reads while the writer writes: sample lookups, each of which must see a
# committed round, never going back; and full listings, each batch of
# which is one read transaction and so must show a single round. Without
# the fcntl locks, the writer reuses pages under a running read
# transaction and the listings come out torn.
CONCURRENT_READER = """
import sys, time, trio
from bridge.maps.lmdb import SEQUENCE_BATCH, LmdbMap
from bridge.outcome import Found

def fail(*what):
    print(*what, flush=True)
    sys.exit(1)

async def main():
    table = LmdbMap("lmdb:x", sys.argv[1])
    keys, rounds = int(sys.argv[2]), int(sys.argv[3])
    samples = range(0, keys, keys // 20)
    last = dict.fromkeys(samples, 0)
    lookups = listings = 0
    deadline = time.monotonic() + 25
    while min(last.values()) < rounds and time.monotonic() < deadline:
        for i in samples:
            outcome = await table.lookup(b"k%05d" % i)
            lookups += 1
            if not isinstance(outcome, Found):
                fail("bad outcome", i, outcome)
            value = int(outcome.value)
            if not last[i] <= value <= rounds:
                fail("went back", i, last[i], value)
            last[i] = value
        entries = [entry async for entry in table.sequence()]
        listings += 1
        if len(entries) != keys:
            fail("listing has", len(entries), "entries")
        for start in range(0, keys, SEQUENCE_BATCH):
            values = {value for _, value in entries[start : start + SEQUENCE_BATCH]}
            if len(values) != 1:
                fail("torn snapshot", sorted(values))
    await table.aclose()
    print("reader saw", min(last.values()), "after", lookups, "lookups", listings, "listings")

trio.run(main)
"""


def test_concurrent_bridge_reader_writer_and_postmap(tmp_path: Path) -> None:
    keys, rounds = 3000, 300
    base = tmp_path / "busy"

    async def seed() -> None:
        table = open_lmdb(base, writable=True)
        assert await table.update_many([(b"k%05d" % i, b"0") for i in range(keys)]) == WRITTEN
        await table.aclose()

    trio.run(seed)
    reader = python_process(CONCURRENT_READER, str(base), str(keys), str(rounds))
    writer = python_process(CONCURRENT_WRITER, str(base), str(keys), str(rounds))
    # Postfix reads the same file meanwhile, each run a fresh process.
    postmap_values: list[int] = []
    while writer.poll() is None:
        result = postmap_query_many([f"k{i:05d}" for i in range(0, keys, 300)], f"lmdb:{base}")
        assert result.returncode == 0, result.stderr
        assert "fatal:" not in result.stderr
        postmap_values += [int(line.split("\t")[1]) for line in result.stdout.splitlines()]
    writer_out, writer_err = writer.communicate(timeout=PROCESS_TIMEOUT)
    reader_out, reader_err = reader.communicate(timeout=PROCESS_TIMEOUT)
    assert writer.returncode == 0, writer_out + writer_err
    assert writer_out == "writer done\n"
    assert reader.returncode == 0, reader_out + reader_err
    assert reader_out.startswith(f"reader saw {rounds} after ")
    assert postmap_values
    assert all(0 <= value <= rounds for value in postmap_values)
    assert postmap_listing(f"lmdb:{base}") == {f"k{i:05d}": str(rounds) for i in range(keys)}


# -------------------------------------------------------- durability


DURABLE_WRITER = """
import sys, trio
from bridge.maps.lmdb import LmdbMap

async def main():
    table = LmdbMap("lmdb:x", sys.argv[1], writable=True)
    batch = 0
    while True:
        items = [(b"b%05d-%03d" % (batch, i), b"v%d" % batch) for i in range(200)]
        assert str(await table.update_many(items)) == "Written()"
        print("committed", batch, flush=True)
        batch += 1

trio.run(main)
"""


def test_sigkilled_writer_loses_no_reported_batch(tmp_path: Path) -> None:
    base = tmp_path / "durable"
    writer = python_process(DURABLE_WRITER, str(base))
    assert writer.stdout is not None
    reported = -1
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while reported < 30 and time.monotonic() < deadline:
        line = writer.stdout.readline()
        assert line.startswith("committed "), line + writer.stderr.read()  # type: ignore[union-attr]
        reported = int(line.split()[1])
    os.kill(writer.pid, signal.SIGKILL)  # most likely in the middle of a commit
    rest, _ = writer.communicate(timeout=PROCESS_TIMEOUT)
    for line in rest.splitlines():
        reported = int(line.split()[1])
    assert writer.returncode == -signal.SIGKILL

    listing = postmap_listing(f"lmdb:{base}")
    batches: dict[int, int] = {}
    for key in listing:
        batch = int(key[1:6])
        batches[batch] = batches.get(batch, 0) + 1
    # Every reported batch is there in full; at most one more (committed
    # but killed before it was reported), also in full: never a partial one.
    assert set(range(reported + 1)) <= set(batches)
    assert set(batches) <= set(range(reported + 2))
    assert all(count == 200 for count in batches.values())

    async def reopen() -> None:
        table = open_lmdb(base, writable=True)
        assert await table.lookup(b"b%05d-199" % reported) == Found(b"v%d" % reported)
        assert await table.update(b"after", b"restart") == WRITTEN
        await table.aclose()

    trio.run(reopen)
    assert postmap_query("after", f"lmdb:{base}").outcome == "found:restart"
    assert (tmp_path / ("durable" + LMDB_SUFFIX)).exists()
