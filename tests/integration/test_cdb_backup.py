"""``cdb:`` backups, differential: Postfix's own memcache client vs the bridge.

Theory of operation
-------------------
Every scenario is one memcache_table(5) file with a ``backup = cdb:...``
table, used twice, as in test_differential.py:

* natively, ``postmap -q KEY memcache:FILE.cf`` against memcached A (a
  fresh Postfix process per key, which opens the cdb file itself);
* through the bridge, ``postmap -q KEY socketmap:inet:...:NAME``, where the
  bridge reads the same FILE.cf through ``config =`` and only ``memcache``
  points elsewhere: at memcached B, empty but for the same seed items.

Both sides read the very same ``.cdb`` files, made by Postfix's ``postmap
cdb:`` (plain and ``-N`` NUL form) and by cdblib's writer (values postmap
cannot make). Each lookup must give the same answer, and afterwards both
memcacheds must hold the same items (the refills, their flags and their
absence). Then the cdb file is rebuilt with ``postmap`` while the bridge
runs, in the other NUL form (CDB-2): after the bridge has noticed (it
checks once a second; the test waits for a key that only the new file
has), both sides must again agree, with no restart.

Files in a memcache key are skipped alike (MC-13); keys are folded by both
(CASE-2), so the corpus mixes case, extensions, UTF-8 and values with
spaces and commas. A file with both NUL forms of one key is left out on
purpose: Postfix's per-process table and the bridge's long-lived one would
settle the form differently (CDB-1), which the unit tests check against
``postmap -q -`` instead.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cdblib

from tests.integration.conftest import NextPort
from tests.integration.harness import (
    POSTMAP,
    Memcached,
    age_file,
    postmap_query,
    run_bridge,
    run_memcached,
)

#: Seconds the bridge may take to notice a rebuilt file: it checks once a
#: second (RELOAD_CHECK_INTERVAL); the rest is slack for a busy machine.
REBUILD_DEADLINE = 15.0

SOURCE = """\
# virtual(5)-style aliases; postmap folds the keys, trims the values
user@example.com          user@mail.example.net
User.Name@Example.COM     First Last <user.name@example.net>
list@example.com          a@example.net, b@example.net,c@example.net
user+ext@example.com      extension@example.net
user+@example.com         empty-extension@example.net
@example.com              catchall@example.net
postmaster@example.net    root@example.net
Straße@example.com        strasse@example.net
CAFÉ@example.com          café@example.net
ünïcödé@example.org       Grüß Gott, 日本語
example.com               OK
.example.org              REJECT no mail, from here
key                       value
KEY2                      value2
spaces                    a  b   c
percent                   100% sure
short@example.com         tiny
gone@example.com          only in the first file
"""

# The rebuilt file: one value changed, one key gone, one key new.
REBUILT_SOURCE = (
    SOURCE.replace("user@mail.example.net", "user@new.example.net")
    .replace("gone@example.com          only in the first file\n", "")
    .replace("key                       value\n", "key                       new value, rebuilt\n")
    + "marker@example.com        rebuilt@example.net\n"
)

KEYS = (
    "user@example.com",
    "USER@EXAMPLE.COM",
    "User.Name@example.com",
    "user.name@EXAMPLE.com",
    "list@example.com",
    "user+ext@example.com",
    "User+Ext@Example.com",
    "user+other@example.com",
    "user+@example.com",
    "@example.com",
    "@EXAMPLE.COM",
    "nobody@example.com",
    "postmaster@example.net",
    "Straße@example.com",
    "STRASSE@example.com",
    "café@example.com",
    "CAFÉ@EXAMPLE.COM",
    "ünïcödé@example.org",
    "ÜNÏCÖDÉ@EXAMPLE.ORG",
    "example.com",
    "EXAMPLE.COM",
    ".example.org",
    "key",
    "KEY",
    "key2",
    "spaces",
    "percent",
    "short@example.com",
    "gone@example.com",
    "marker@example.com",
    "missing",
    "a b@example.com",
)

# cdblib-made (plain form): values Postfix's postmap would not write.
RAW_ENTRIES = (
    (b"latin1", b"caf\xe9"),  # not UTF-8: CONFIG on both sides, no refill (G-6)
    (b"nulcut", b"before\0after"),  # cut at the NUL (CDB-1)
    (b"k", b"v"),
    (b"with space", b"x"),  # a key memcache cannot hold (MC-13)
)
RAW_KEYS = ("latin1", "nulcut", "k", "K", "with space", "missing")

#: Seeded in both memcacheds before each scenario: memcache answers first.
SEED = {
    b"user@example.com": b"from-memcache",
    b"aliases:list@example.com": b"from-memcache-fmt",
    b"example.net/postmaster": b"mc-parts",
    # Longer than the "parts" scenario's data_size_limit: its memcache
    # reply is refused, and the backup answers.
    b"example.com/user": b"too long for the limit",
}


@dataclass
class Scenario:
    """One memcache_table(5) file and the keys asked of it."""

    name: str
    cf: str
    keys: Sequence[str]
    seed: dict[bytes, bytes] = field(default_factory=lambda: dict(SEED))


def scenarios(directory: Path) -> list[Scenario]:
    aliases = f"backup = cdb:{directory}/aliases\n"
    return [
        Scenario("plain", aliases, KEYS),
        Scenario("nul", f"backup = cdb:{directory}/aliases_nul\nttl = 100\nflags = 7\n", KEYS),
        Scenario(
            "fmt",
            aliases + "key_format = aliases:%s\ndomain = example.com, example.org\n",
            KEYS,
        ),
        Scenario("parts", aliases + "key_format = %d/%u\ndata_size_limit = 12\n", KEYS),
        Scenario("raw", f"backup = cdb:{directory}/raw\nflags = 3\n", RAW_KEYS),
    ]


def write_raw_cdb(base: Path, entries: Iterable[tuple[bytes, bytes]]) -> None:
    temporary = base.with_name(base.name + ".cdb.tmp")
    with temporary.open("wb") as file:
        writer = cdblib.Writer(file)
        for key, value in entries:
            writer.put(key, value)
        writer.finalize()
    temporary.rename(base.with_name(base.name + ".cdb"))


def postmap_cdb(base: Path, source: str, *options: str) -> None:
    base.write_text(source, encoding="utf-8")
    age_file(base)
    subprocess.run([POSTMAP, *options, f"cdb:{base}"], check=True, timeout=60)


def _seed(server: Memcached, items: dict[bytes, bytes]) -> None:
    server.flush()
    for key, value in items.items():
        server.set(key, value)


def _compare_items(
    name: str, keys: Iterable[bytes], native: Memcached, bridged: Memcached
) -> list[str]:
    """Both memcacheds hold the same items (value and flags); see test_differential.py."""
    candidates = set(keys) | set(native.items()) | set(bridged.items())
    differences = []
    for key in sorted(candidates):
        theirs, ours = native.get(key), bridged.get(key)
        if theirs != ours:
            differences.append(f"{name}: memcache item {key!r}: postfix {theirs!r} bridge {ours!r}")
    return differences


@dataclass
class Sides:
    """The two clients of one test run and what they found so far."""

    directory: Path
    sm_port: int
    native: Memcached
    bridged: Memcached
    pool: ThreadPoolExecutor
    compared: int = 0
    mismatches: list[str] = field(default_factory=list)
    #: Postfix's answers, by label, scenario and key
    answers: dict[tuple[str, str, str], str] = field(default_factory=dict)

    def tables(self, scenario: Scenario) -> tuple[str, str]:
        return (
            f"memcache:{self.directory}/{scenario.name}.cf",
            f"socketmap:inet:127.0.0.1:{self.sm_port}:{scenario.name}",
        )

    def compare(self, scenario: Scenario, keys: Iterable[str], label: str) -> None:
        """Ask both sides each key (one key at a time, both at once) and note differences."""
        cf_table, sm_table = self.tables(scenario)
        for key in keys:
            native_answer = self.pool.submit(postmap_query, key, cf_table)
            ours = postmap_query(key, sm_table)
            theirs = native_answer.result()
            self.compared += 1
            self.answers[label, scenario.name, key] = theirs.outcome
            if ours.outcome != theirs.outcome:
                self.mismatches.append(
                    f"{label} {scenario.name} key {key!r}: "
                    f"postfix {theirs.outcome!r} bridge {ours.outcome!r}"
                )

    def compare_items(self, scenario: Scenario, label: str) -> None:
        self.mismatches.extend(
            _compare_items(f"{label} {scenario.name}", scenario.seed, self.native, self.bridged)
        )


def wait_for_rebuild(sides: Sides, scenario: Scenario) -> str:
    """Ask the bridge for the key only the rebuilt file has until it answers; return that.

    Not-found answers refill nothing, so the wait leaves memcache B as it
    was; the native side is then asked once, to keep the two in step.
    """
    _, sm_table = sides.tables(scenario)
    deadline = time.monotonic() + REBUILD_DEADLINE
    while True:
        answer = postmap_query("marker@example.com", sm_table)
        if answer.outcome != "notfound" or time.monotonic() > deadline:
            break
    sides.compare(scenario, ["marker@example.com"], "rebuilt")
    return answer.outcome


def test_postfix_and_bridge_agree_on_cdb_backups(tmp_path: Path, ports: NextPort) -> None:
    directory = tmp_path
    postmap_cdb(directory / "aliases", SOURCE)
    postmap_cdb(directory / "aliases_nul", SOURCE, "-N")
    write_raw_cdb(directory / "raw", RAW_ENTRIES)
    sm_port = ports()
    all_scenarios = scenarios(directory)

    with run_memcached() as native, run_memcached() as bridged:
        toml = [f'[[listen]]\nendpoint = "inet:127.0.0.1:{sm_port}"\nprotocol = "socketmap"\n']
        for scenario in all_scenarios:
            cf = directory / f"{scenario.name}.cf"
            cf.write_text(f"memcache = {native.endpoint}\n{scenario.cf}", encoding="utf-8")
            age_file(cf)
            toml.append(
                f'[tables.{scenario.name}]\nconfig = "{cf}"\nmemcache = "{bridged.endpoint}"\n'
            )
        config = directory / "bridge.toml"
        config.write_text("\n".join(toml), encoding="utf-8")

        with run_bridge(config) as bridge, ThreadPoolExecutor(max_workers=1) as pool:
            sides = Sides(directory, sm_port, native, bridged, pool)
            for scenario in all_scenarios:
                _seed(native, scenario.seed)
                _seed(bridged, scenario.seed)
                sides.compare(scenario, scenario.keys, "first")
                sides.compare_items(scenario, "first")

            # postmap rebuilds the file (new inode, other NUL form) under
            # the running bridge; the tables that read it see the new one.
            postmap_cdb(directory / "aliases", REBUILT_SOURCE, "-N")
            rebuilt = [s for s in all_scenarios if f"cdb:{directory}/aliases\n" in s.cf]
            assert {s.name for s in rebuilt} == {"plain", "fmt", "parts"}
            for scenario in rebuilt:
                _seed(native, scenario.seed)
                _seed(bridged, scenario.seed)
                marker = wait_for_rebuild(sides, scenario)
                assert marker == "found:rebuilt@example.net", (scenario.name, marker)
                sides.compare(scenario, scenario.keys, "rebuilt")
                sides.compare_items(scenario, "rebuilt")
            assert bridge.process.poll() is None  # the same process all along
            assert any("opened the new" in line for line in bridge.log), "".join(bridge.log)

    assert not sides.mismatches, (
        f"{len(sides.mismatches)} of {sides.compared} differ:\n" + "\n".join(sides.mismatches)
    )
    assert sides.compared >= 80, sides.compared
    # The comparison saw every kind of answer, and the rebuild changed some.
    answers = sides.answers
    assert {"error", "notfound"} <= set(answers.values())
    assert answers["first", "parts", "postmaster@example.net"] == "found:mc-parts"
    assert answers["first", "parts", "user@example.com"] == "found:user@mail.example.net"
    assert answers["first", "plain", "gone@example.com"] == "found:only in the first file"
    assert answers["rebuilt", "plain", "gone@example.com"] == "notfound"
    assert answers["first", "plain", "key"] == "found:value"
    assert answers["rebuilt", "plain", "key"] == "found:new value, rebuilt"
    assert answers["rebuilt", "fmt", "user@example.com"] == "found:user@new.example.net"


# ------------------------------------------------------------- the CLI


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args, "--config", str(config)],
        capture_output=True,
        timeout=120,
        check=False,
    )


def _config(directory: Path, backup: str, *, extra: str = "") -> Path:
    config = directory / "bridge.toml"
    config.write_text(
        '[[listen]]\nendpoint = "inet:127.0.0.1:1"\nprotocol = "socketmap"\n\n'
        f'[tables.aliases]\nmemcache = "inet:127.0.0.1:1"\nbackup = "{backup}"\n{extra}',
        encoding="utf-8",
    )
    return config


def test_dump_lists_a_cdb_backup_in_file_order(tmp_path: Path) -> None:
    # Postfix 3.7 cannot list cdb tables (postmap -s refuses); the bridge
    # lists them like 3.12 does: every record, in file order, without NULs.
    for options in ((), ("-N",)):
        postmap_cdb(tmp_path / "aliases", SOURCE, *options)
        with cdblib.Reader.from_file_path(str(tmp_path / "aliases.cdb")) as reader:
            expected = b"".join(
                key.rstrip(b"\0") + b"\t" + value.rstrip(b"\0") + b"\n"
                for key, value in reader.iteritems()
            )
        dumped = _cli(_config(tmp_path, f"cdb:{tmp_path}/aliases"), "dump", "aliases")
        assert dumped.returncode == 0, dumped.stderr
        assert dumped.stdout == expected
        lines = dumped.stdout.decode().splitlines()
        assert lines[0] == "user@example.com\tuser@mail.example.net"
        assert "strasse@example.com\tstrasse@example.net" in lines  # folded by postmap
        assert "list@example.com\ta@example.net, b@example.net,c@example.net" in lines
        assert len(lines) == 18
    refused = subprocess.run(
        [POSTMAP, "-s", f"cdb:{tmp_path}/aliases"], capture_output=True, text=True, check=False
    )
    assert "sequence operation is not supported" in refused.stderr  # CDB-3, 3.7


def test_cdb_backup_cannot_be_writable_and_must_exist(tmp_path: Path) -> None:
    postmap_cdb(tmp_path / "aliases", SOURCE)
    writable = _cli(
        _config(tmp_path, f"cdb:{tmp_path}/aliases", extra="writable = true\n"), "check"
    )
    assert writable.returncode == 78, writable.stderr
    assert b"table type 'cdb' cannot be written" in writable.stderr
    missing = _cli(_config(tmp_path, f"cdb:{tmp_path}/missing"), "check")
    assert missing.returncode == 78, missing.stderr
    assert f"cannot open {tmp_path}/missing.cdb".encode() in missing.stderr
