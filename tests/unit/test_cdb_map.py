"""``cdb:`` tables on real cdb files (CDB-1 .. CDB-4).

Files come from two writers: Postfix's own ``postmap cdb:`` (plain form,
and ``postmap -N`` for the NUL form), and cdblib's writer, which stores
bytes exactly as given, for the mixed forms and odd values ``postmap``
cannot make. Where Postfix's behaviour is the question, ``postmap -q``
answers it on the very same file (a fresh process each time, so each run
starts with an undecided key form, as a fresh open table does).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Iterable
from pathlib import Path

import cdblib
import pytest
import trio
import trio.testing

from bridge.keys import fold_table_key
from bridge.maps import SUPPORTED_TYPES, WRITABLE_TYPES, MapError, OpenOptions, open_map
from bridge.maps import cdb as cdb_module
from bridge.maps.base import BackendHealth, HealthReporting, SequenceMap
from bridge.maps.cdb import CDB_SUFFIX, RELOAD_CHECK_INTERVAL, SEQUENCE_BATCH, CdbMap
from bridge.outcome import NOT_FOUND, ConfigFailure, Found, Outcome, Retry

POSTMAP = shutil.which("postmap") or "/usr/sbin/postmap"


def _postmap_has_cdb() -> bool:
    try:
        listed = subprocess.run(
            ["postconf", "-m"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError:
        return False
    return "cdb" in listed.stdout.split()


needs_postmap = pytest.mark.skipif(
    not _postmap_has_cdb(), reason="needs Postfix's postmap with cdb support"
)

# ----------------------------------------------------------------- helpers


def cdb_file(base: Path) -> Path:
    return base.with_name(base.name + CDB_SUFFIX)


def write_cdb(base: Path, entries: Iterable[tuple[bytes, bytes]]) -> Path:
    """Store entries exactly as given with cdblib's writer, renamed into place; return ``base``."""
    temporary = base.with_name(base.name + ".cdb.tmp")
    with temporary.open("wb") as file:
        writer = cdblib.Writer(file)
        for key, value in entries:
            writer.put(key, value)
        writer.finalize()
    os.replace(temporary, cdb_file(base))
    return base


def postmap_build(base: Path, source: str, *options: str) -> Path:
    """``postmap [options] cdb:base`` from ``source``; return ``base``."""
    base.write_text(source, encoding="utf-8")
    built = subprocess.run(
        [POSTMAP, *options, f"cdb:{base}"], capture_output=True, text=True, timeout=60, check=False
    )
    assert built.returncode == 0, built.stderr
    return base


def postmap_answers(base: Path, keys: list[bytes]) -> list[Outcome]:
    """What ``postmap -q -`` answers for ``keys``, asked in order of one fresh table.

    Found values are read from ``key TAB value`` lines; a fatal error
    (a CONFIG answer: the G-6 check) ends the run, so it must be last.
    """
    completed = subprocess.run(
        [POSTMAP, "-q", "-", f"cdb:{base}"],
        input=b"".join(key + b"\n" for key in keys),
        capture_output=True,
        timeout=60,
        check=False,
    )
    found = dict(line.split(b"\t", 1) for line in completed.stdout.splitlines())
    answers: list[Outcome] = [Found(found[key]) if key in found else NOT_FOUND for key in keys]
    if b"fatal:" in completed.stderr:
        answers[-1] = ConfigFailure("postmap: query error")
    return answers


def open_cdb(base: Path, *, smtputf8: bool = True, read_timeout: float = 10.0) -> CdbMap:
    return CdbMap(f"cdb:{base}", str(base), smtputf8=smtputf8, read_timeout=read_timeout)


async def listing(table: CdbMap) -> list[tuple[bytes, bytes]]:
    return [entry async for entry in table.sequence()]


def open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# What postmap stores for SOURCE: keys folded, values trimmed (CDB-1).
SOURCE = """\
# comments and blank lines are postmap's business
Key1                 value1
MiXeD@Example.COM    value with  inner   spaces
list@example.com     a@example.net, b@example.net,c@example.net
user+ext@example.com with-extension
Straße@example.com   Grüß Gott
CAFÉ@example.com     café
empty-looking        ""
"""

SOURCE_ENTRIES = [
    (b"key1", b"value1"),
    (b"mixed@example.com", b"value with  inner   spaces"),
    (b"list@example.com", b"a@example.net, b@example.net,c@example.net"),
    (b"user+ext@example.com", b"with-extension"),
    # Folded as Postfix folds under SMTPUTF8: full Unicode case folding.
    (b"strasse@example.com", "Grüß Gott".encode()),
    ("café@example.com".encode(), "café".encode()),
    (b"empty-looking", b'""'),
]


# --------------------------------------------------- files made by postmap


@needs_postmap
@pytest.mark.parametrize("options", [(), ("-N",)], ids=["plain", "nul"])
async def test_postmap_made_file_answers_like_postmap(
    tmp_path: Path, options: tuple[str, ...]
) -> None:
    base = postmap_build(tmp_path / "aliases", SOURCE, *options)
    keys = [
        *(key for key, _ in SOURCE_ENTRIES),
        b"Key1",
        b"MIXED@example.com",
        b"STRASSE@EXAMPLE.COM",
        "Straße@Example.com".encode(),
        "CAFÉ@Example.com".encode(),
        b"user@example.com",
        b"user+other@example.com",
        b"nobody@example.com",
    ]
    table = open_cdb(base)
    # The caller folds lookup keys (CASE-2); postmap -q folds them itself.
    ours = [await table.lookup(fold_table_key(key)) for key in keys]
    assert ours == postmap_answers(base, keys)
    assert ours[: len(SOURCE_ENTRIES)] == [Found(value) for _, value in SOURCE_ENTRIES]
    assert ours[-3:] == [NOT_FOUND] * 3
    # Stored folded: an unfolded key is not there.
    assert await table.lookup(b"Key1") == NOT_FOUND
    await table.aclose()


@needs_postmap
async def test_postmap_forms_are_what_cdb1_says(tmp_path: Path) -> None:
    # postmap writes no NUL by default and one with -N; cdblib sees the raw bytes.
    plain = postmap_build(tmp_path / "plain", "k v\n")
    nul = postmap_build(tmp_path / "nul", "k v\n", "-N")
    with cdblib.Reader.from_file_path(str(cdb_file(plain))) as reader:
        assert reader.items() == [(b"k", b"v")]
    with cdblib.Reader.from_file_path(str(cdb_file(nul))) as reader:
        assert reader.items() == [(b"k\0", b"v\0")]


@needs_postmap
async def test_sequence_of_postmap_files_in_file_order_without_nul(tmp_path: Path) -> None:
    for options in ((), ("-N",)):
        base = postmap_build(tmp_path / f"t{len(options)}", SOURCE, *options)
        table = open_cdb(base)
        assert isinstance(table, SequenceMap)
        assert await listing(table) == SOURCE_ENTRIES
        await table.aclose()


@needs_postmap
async def test_empty_postmap_file(tmp_path: Path) -> None:
    base = postmap_build(tmp_path / "empty", "# nothing\n")
    table = open_cdb(base)
    assert await table.lookup(b"k") == NOT_FOUND
    assert await listing(table) == []
    await table.aclose()


# ------------------------------------------- NUL forms (cdblib-made files)


# A file holding both forms of "k" with different values, and one key in
# each form only; Postfix tries the NUL form first (dict_cdb.c, observed).
BOTH_FORMS = [
    (b"k", b"plain"),
    (b"k\0", b"nul\0"),
    (b"p", b"only-plain"),
    (b"n\0", b"only-nul\0"),
]


@needs_postmap
@pytest.mark.parametrize(
    "keys",
    [
        [b"k", b"p", b"n"],
        [b"p", b"k", b"n"],
        [b"n", b"p", b"k"],
        [b"zz", b"p", b"n", b"k"],
        [b"zz", b"n", b"k", b"p"],
    ],
)
async def test_first_hit_decides_the_form_like_postmap(tmp_path: Path, keys: list[bytes]) -> None:
    base = write_cdb(tmp_path / "mixed", BOTH_FORMS)
    table = open_cdb(base)
    ours = [await table.lookup(key) for key in keys]
    await table.aclose()
    assert ours == postmap_answers(base, keys)


async def test_nul_form_first_then_sticky(tmp_path: Path) -> None:
    table = open_cdb(write_cdb(tmp_path / "mixed", BOTH_FORMS))
    assert await table.lookup(b"k") == Found(b"nul")  # NUL form tried first
    assert await table.lookup(b"p") == NOT_FOUND  # settled: NUL form only
    assert await table.lookup(b"n") == Found(b"only-nul")
    await table.aclose()
    table = open_cdb(tmp_path / "mixed")
    assert await table.lookup(b"p") == Found(b"only-plain")
    assert await table.lookup(b"k") == Found(b"plain")  # settled: plain only
    assert await table.lookup(b"n") == NOT_FOUND
    await table.aclose()


@needs_postmap
async def test_values_cut_at_nul_empty_values_and_empty_keys(tmp_path: Path) -> None:
    base = write_cdb(
        tmp_path / "odd",
        [(b"cut", b"before\0after"), (b"empty", b""), (b"", b"empty key"), (b"sp ace", b"v v")],
    )
    keys = [b"cut", b"empty", b"", b"sp ace"]
    table = open_cdb(base)
    ours = [await table.lookup(key) for key in keys]
    assert ours == [Found(b"before"), Found(b""), Found(b"empty key"), Found(b"v v")]
    # postmap -q - cannot ask for the empty key; the rest agree.
    assert ours[:2] + ours[3:] == postmap_answers(base, [b"cut", b"empty", b"sp ace"])
    await table.aclose()


@needs_postmap
async def test_non_utf8_value_is_a_config_failure_like_postmap(tmp_path: Path) -> None:
    base = write_cdb(tmp_path / "latin1", [(b"ok", "grüß".encode()), (b"bad", b"gr\xfc\xdf")])
    table = open_cdb(base)
    assert await table.lookup(b"ok") == Found("grüß".encode())
    bad = await table.lookup(b"bad")
    assert isinstance(bad, ConfigFailure)
    assert "not valid UTF-8" in bad.reason
    assert f"cdb:{base}" in bad.reason
    await table.aclose()
    assert isinstance(postmap_answers(base, [b"ok", b"bad"])[1], ConfigFailure)
    # Without SMTPUTF8 the bytes are the value (G-6 off).
    table = open_cdb(base, smtputf8=False)
    assert await table.lookup(b"bad") == Found(b"gr\xfc\xdf")
    await table.aclose()


async def test_sequence_cuts_at_nul_and_keeps_duplicates(tmp_path: Path) -> None:
    entries = [(b"a\0", b"1\0"), (b"b", b"x\0y"), (b"a\0", b"2\0"), (b"c", b"")]
    table = open_cdb(write_cdb(tmp_path / "dup", entries))
    assert await listing(table) == [(b"a", b"1"), (b"b", b"x"), (b"a", b"2"), (b"c", b"")]
    assert await table.lookup(b"a") == Found(b"1")  # the first record of a key
    await table.aclose()


async def test_sequence_lists_every_entry_once_across_batches(tmp_path: Path) -> None:
    count = SEQUENCE_BATCH * 2 + 7
    entries = [(b"key%05d" % i, b"value %d" % i) for i in range(count)]
    table = open_cdb(write_cdb(tmp_path / "big", entries))
    assert await listing(table) == entries
    await table.aclose()


# ------------------------------------------------------ opening, registry


def test_missing_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(MapError) as info:
        open_map(f"cdb:{tmp_path}/missing", OpenOptions(str(tmp_path)))
    message = str(info.value)
    assert f"{tmp_path}/missing.cdb" in message
    assert "No such file or directory" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"", "not a cdb file: 0 bytes"), (b"x" * 2047, "not a cdb file: 2047 bytes")],
)
def test_file_too_short_for_a_cdb_header_is_a_configuration_error(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    cdb_file(tmp_path / "short").write_bytes(content)
    with pytest.raises(MapError, match=expected):
        open_cdb(tmp_path / "short")


def test_directory_is_a_configuration_error(tmp_path: Path) -> None:
    cdb_file(tmp_path / "dir").mkdir()
    with pytest.raises(MapError, match=r"dir\.cdb"):
        open_cdb(tmp_path / "dir")


async def test_registry_relative_name_and_read_only(tmp_path: Path) -> None:
    write_cdb(tmp_path / "rel", [(b"k", b"v")])
    table = open_map("cdb:rel", OpenOptions(str(tmp_path)))
    assert isinstance(table, CdbMap)
    assert table.file == f"{tmp_path}/rel.cdb"
    assert table.spec == "cdb:rel"
    assert await table.lookup(b"k") == Found(b"v")
    await table.aclose()
    await table.aclose()  # idempotent
    assert isinstance(await table.lookup(b"k"), Retry)
    assert "cdb" in SUPPORTED_TYPES
    assert "cdb" not in WRITABLE_TYPES
    with pytest.raises(MapError, match="'cdb' cannot be written"):
        open_map("cdb:rel", OpenOptions(str(tmp_path), writable=True))
    with pytest.raises(MapError, match="missing file name after 'cdb:'"):
        open_map("cdb:", OpenOptions(str(tmp_path)))


# ------------------------------------------------- rebuilds (CDB-2)


@needs_postmap
async def test_postmap_rebuild_is_seen_after_the_check_interval(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    base = postmap_build(tmp_path / "t", "k old\ngone x\n")
    table = open_cdb(base)
    assert await table.lookup(b"k") == Found(b"old")  # settles the plain form
    old_inode = cdb_file(base).stat().st_ino
    postmap_build(base, "k new\nadded yes\n", "-N")  # new inode, other NUL form
    assert cdb_file(base).stat().st_ino != old_inode
    # Within the check interval the old file answers.
    assert await table.lookup(b"k") == Found(b"old")
    assert await table.lookup(b"gone") == Found(b"x")
    mock_clock.jump(RELOAD_CHECK_INTERVAL)
    # The new file starts undecided: its NUL form is found (CDB-2).
    assert await table.lookup(b"k") == Found(b"new")
    assert await table.lookup(b"added") == Found(b"yes")
    assert await table.lookup(b"gone") == NOT_FOUND
    assert [k async for k, _ in table.sequence()] == [b"k", b"added"]
    await table.aclose()


async def test_in_place_rewrite_is_noticed_too(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    # Not postmap's way, but cp(1) over the file keeps the inode.
    base = write_cdb(tmp_path / "t", [(b"k", b"one")])
    table = open_cdb(base)
    assert await table.lookup(b"k") == Found(b"one")
    write_cdb(tmp_path / "other", [(b"k", b"two"), (b"more", b"entries")])
    inode = cdb_file(base).stat().st_ino
    shutil.copyfile(cdb_file(tmp_path / "other"), cdb_file(base))
    assert cdb_file(base).stat().st_ino == inode
    mock_clock.jump(RELOAD_CHECK_INTERVAL)
    assert await table.lookup(b"k") == Found(b"two")
    await table.aclose()


async def test_broken_or_missing_new_file_keeps_the_old_one(
    tmp_path: Path, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    base = write_cdb(tmp_path / "t", [(b"k", b"v1")])
    table = open_cdb(base)
    assert isinstance(table, HealthReporting)
    assert await table.health() == [
        BackendHealth(
            f"file {cdb_file(base)}", True, f"readable, {cdb_file(base).stat().st_size} bytes"
        )
    ]
    # A broken file renamed into place: lookups go on with the old one.
    broken = tmp_path / "broken"
    broken.write_bytes(b"not a cdb file")
    os.replace(broken, cdb_file(base))
    with caplog.at_level(logging.WARNING, logger="bridge.maps"):
        for _ in range(3):
            mock_clock.jump(RELOAD_CHECK_INTERVAL)
            assert await table.lookup(b"k") == Found(b"v1")
    assert caplog.text.count("keeping the version opened before") == 1
    assert "not a cdb file: 14 bytes" in caplog.text
    [part] = await table.health()
    assert not part.ok
    assert "not a cdb file" in part.detail
    assert "lookups use the version opened before" in part.detail

    # Removed: still the old contents, and health says why not ok.
    cdb_file(base).unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bridge.maps"):
        mock_clock.jump(RELOAD_CHECK_INTERVAL)
        assert await table.lookup(b"k") == Found(b"v1")
        mock_clock.jump(RELOAD_CHECK_INTERVAL)
        assert await table.lookup(b"k") == Found(b"v1")
    assert caplog.text.count("cannot stat: No such file or directory") == 1
    [part] = await table.health()
    assert not part.ok
    assert part.detail.startswith("cannot open: No such file or directory")

    # A good file again: opened, healthy.
    write_cdb(base, [(b"k", b"v2")])
    mock_clock.jump(RELOAD_CHECK_INTERVAL)
    assert await table.lookup(b"k") == Found(b"v2")
    [part] = await table.health()
    assert part.ok
    await table.aclose()


@needs_postmap
@pytest.mark.parametrize("reads", ["page-cache-first", "threads-only"])
async def test_lookups_run_on_while_postmap_rebuilds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads: str
) -> None:
    # Every lookup checks the file; readers never see an error, a miss, or
    # an older generation than they saw before; old files are all closed.
    monkeypatch.setattr(cdb_module, "RELOAD_CHECK_INTERVAL", 0.0)
    if reads == "threads-only":
        monkeypatch.setattr(cdb_module, "_RWF_NOWAIT", None)
    keys = 300
    generations = 8
    base = tmp_path / "t"

    def source(generation: int) -> str:
        return "".join(f"key{i} gen{generation} value {i}\n" for i in range(keys))

    before = open_descriptors()
    postmap_build(base, source(0))
    table = open_cdb(base)
    rng = random.Random(7)
    lookups = 0
    done = False

    async def reader() -> None:
        nonlocal lookups
        newest = 0
        while not done:
            i = rng.randrange(keys)
            outcome = await table.lookup(b"key%d" % i)
            assert isinstance(outcome, Found), outcome
            generation, _, rest = outcome.value.removeprefix(b"gen").partition(b" ")
            assert rest == b"value %d" % i
            assert int(generation) >= newest
            newest = int(generation)
            lookups += 1
            await trio.lowlevel.checkpoint()

    async def rebuilder() -> None:
        nonlocal done
        for generation in range(1, generations + 1):
            # Alternate the NUL form: each new file must be settled afresh.
            options = ["-N"] if generation % 2 else []
            base.write_text(source(generation), encoding="utf-8")
            await trio.run_process([POSTMAP, *options, f"cdb:{base}"])
            wanted = Found(b"gen%d value 0" % generation)
            with trio.fail_after(10):
                while await table.lookup(b"key0") != wanted:
                    await trio.lowlevel.checkpoint()
        done = True

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(reader)
        nursery.start_soon(rebuilder)
    await table.aclose()
    assert lookups > generations * 10
    assert open_descriptors() == before


# ------------------------------------------------ blocking and damage


async def test_uncached_pages_are_read_in_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = [(b"key%d" % i, b"value %d" % i) for i in range(5000)]
    base = write_cdb(tmp_path / "cold", entries)
    threaded_reads = 0
    original = cdb_module._Descriptor.read

    def counting_read(self: cdb_module._Descriptor, offset: int, length: int) -> bytes:
        nonlocal threaded_reads
        assert threading.current_thread() is not threading.main_thread()
        threaded_reads += 1
        return original(self, offset, length)

    monkeypatch.setattr(cdb_module._Descriptor, "read", counting_read)
    table = open_cdb(base)
    # Drop the file's pages from the page cache (fsync first: dirty pages stay).
    fd = os.open(cdb_file(base), os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert await table.lookup(b"key4321") == Found(b"value 4321")
    assert threaded_reads > 0
    # The thread's reads cached the pages: the same lookup stays on the loop
    # (where RWF_NOWAIT exists and the file system supports it).
    before = threaded_reads
    assert await table.lookup(b"key4321") == Found(b"value 4321")
    current = table._current
    if cdb_module._RWF_NOWAIT is not None and current and current._descriptor.nowait_works:
        assert threaded_reads == before
    await table.aclose()


async def test_without_rwf_nowait_every_lookup_uses_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cdb_module, "_RWF_NOWAIT", None)
    table = open_cdb(write_cdb(tmp_path / "t", [(b"k\0", b"v\0"), (b"bad\0", b"\xff\0")]))
    assert await table.lookup(b"k") == Found(b"v")
    assert await table.lookup(b"x") == NOT_FOUND
    assert isinstance(await table.lookup(b"bad"), ConfigFailure)
    assert [entry async for entry in table.sequence()] == [(b"k", b"v"), (b"bad", b"\xff")]
    await table.aclose()


@pytest.mark.parametrize("reads", ["page-cache-first", "threads-only"])
async def test_file_truncated_in_place_answers_retry_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads: str
) -> None:
    # With mmap this would be SIGBUS; with pread it is a short read: Retry.
    if reads == "threads-only":
        monkeypatch.setattr(cdb_module, "_RWF_NOWAIT", None)
    entries = [(b"key%d" % i, b"value %d" % i) for i in range(100)]
    base = write_cdb(tmp_path / "t", entries)
    table = open_cdb(base)
    assert await table.lookup(b"key1") == Found(b"value 1")
    os.truncate(cdb_file(base), 2048 + 16)
    outcome = await table.lookup(b"key99")
    assert isinstance(outcome, Retry), outcome
    assert str(cdb_file(base)) in outcome.reason
    assert not outcome.timeout
    with pytest.raises(MapError, match="cannot list"):
        await listing(table)
    await table.aclose()


async def test_hung_read_times_out_and_its_file_is_closed_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file system that stops answering: Retry(timeout) in time, the thread
    # is abandoned, and the descriptor is closed once that thread finishes.
    monkeypatch.setattr(cdb_module, "_RWF_NOWAIT", None)
    release = threading.Event()
    finished = threading.Event()
    original = cdb_module._Descriptor.read

    def hanging_read(self: cdb_module._Descriptor, offset: int, length: int) -> bytes:
        release.wait(30)
        try:
            return original(self, offset, length)
        finally:
            finished.set()

    monkeypatch.setattr(cdb_module._Descriptor, "read", hanging_read)
    before = open_descriptors()
    table = open_cdb(write_cdb(tmp_path / "t", [(b"k", b"v")]), read_timeout=0.2)
    outcome = await table.lookup(b"k")
    assert outcome == Retry(
        f"table cdb:{tmp_path}/t: {tmp_path}/t.cdb: no answer within 0.2 s", timeout=True
    )
    await table.aclose()
    # The abandoned thread still reads the file: its descriptor stays open.
    assert open_descriptors() != before
    release.set()
    await trio.to_thread.run_sync(finished.wait, 10)
    # The thread closes the descriptor right after its read returned.
    with trio.fail_after(10):
        while open_descriptors() != before:  # noqa: ASYNC110 (no event to wait for)
            await trio.sleep(0.01)


async def test_health_of_an_unreadable_file(tmp_path: Path) -> None:
    base = write_cdb(tmp_path / "t", [(b"k", b"v")])
    table = open_cdb(base)
    if os.geteuid() != 0:
        cdb_file(base).chmod(0)
        [part] = await table.health()
        assert not part.ok
        assert "Permission denied" in part.detail
        cdb_file(base).chmod(0o644)
    [part] = await table.health()
    assert part.ok
    assert part.name == f"file {cdb_file(base)}"
    await table.aclose()
