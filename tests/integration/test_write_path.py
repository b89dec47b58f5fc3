"""The write path end to end: CLI writes, lmdb backups, the daemon and postmap.

Real memcached, real LMDB files, the real daemon, and Postfix's own
postmap reading the same lmdb file.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import NextPort, StartBridge
from tests.integration.harness import POSTMAP, Memcached, postmap_query


def _write_config(
    path: Path, memcached: Memcached, sm_port: int, *, writable: bool = True, extra: str = ""
) -> Path:
    path.write_text(
        f'[[listen]]\nendpoint = "inet:127.0.0.1:{sm_port}"\nprotocol = "socketmap"\n\n'
        f"[tables.aliases]\n"
        f'memcache = "{memcached.endpoint}"\n'
        f'key_format = "aliases:%s"\n'
        f'backup = "lmdb:{path.parent / "aliases"}"\n'
        f"writable = {'true' if writable else 'false'}\n"
        f"{extra}"
    )
    return path


def _cli(
    config: Path, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args, "--config", str(config)],
        input=stdin,
        capture_output=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
def config(memcached: Memcached, tmp_path: Path, ports: NextPort) -> Path:
    return _write_config(tmp_path / "bridge.toml", memcached, ports())


def _socketmap(config: Path) -> str:
    port = config.read_text().split("inet:127.0.0.1:", 1)[1].split('"', 1)[0]
    return f"socketmap:inet:127.0.0.1:{port}:aliases"


def test_update_then_lookup_through_the_daemon_and_postmap_lmdb(
    config: Path, memcached: Memcached, start_bridge: StartBridge
) -> None:
    start_bridge(config)
    assert (
        _cli(config, "update", "aliases", "User@Example.com", "u@mail.example.net").returncode == 0
    )
    table = _socketmap(config)
    assert postmap_query("user@example.com", table).outcome == "found:u@mail.example.net"
    assert memcached.get(b"aliases:user@example.com") == (0, b"u@mail.example.net")
    # The backup is Postfix's own lmdb format: postmap reads it directly.
    lmdb_table = f"lmdb:{config.parent / 'aliases'}"
    assert postmap_query("user@example.com", lmdb_table).outcome == "found:u@mail.example.net"

    # Evicted from memcache: the daemon answers from the backup and refills.
    memcached.flush()
    assert postmap_query("user@example.com", table).outcome == "found:u@mail.example.net"
    assert memcached.get(b"aliases:user@example.com") == (0, b"u@mail.example.net")

    assert _cli(config, "delete", "aliases", "user@example.com").returncode == 0
    assert postmap_query("user@example.com", table).outcome == "notfound"
    assert _cli(config, "delete", "aliases", "user@example.com").returncode == 1


def test_load_then_dump_round_trips_byte_for_byte(config: Path, memcached: Memcached) -> None:
    # Keys already folded and in LMDB's byte order, one TAB: dump gives back the file.
    source = b"".join(b"key%06d\tvalue %d with spaces\n" % (i, i) for i in range(100_000))
    (config.parent / "source").write_bytes(source)
    loaded = _cli(config, "load", "aliases", str(config.parent / "source"))
    assert loaded.returncode == 0, loaded.stderr
    assert b"loaded 100000, skipped 0, failed 0" in loaded.stderr
    dumped = _cli(config, "dump", "aliases")
    assert dumped.returncode == 0
    assert dumped.stdout == source
    assert memcached.get(b"aliases:key099999") == (0, b"value 99999 with spaces")


def test_sequence_returns_each_of_10000_entries_once(config: Path) -> None:
    source = b"".join(b"k%d v%d\n" % (i, i) for i in range(10_000))
    assert _cli(config, "load", "aliases", "-", stdin=source).returncode == 0
    lines = _cli(config, "dump", "aliases").stdout.splitlines()
    assert len(lines) == 10_000
    assert sorted(lines) == sorted(b"k%d\tv%d" % (i, i) for i in range(10_000))


def test_load_reports_bad_lines_and_keeps_going_and_replace(config: Path) -> None:
    first = b"a 1\nlonely\nb 2\nA again\n"
    result = _cli(config, "load", "aliases", "-", stdin=first)
    assert result.returncode == 1  # a bad line
    assert b"stdin:2: expected format: key whitespace value" in result.stderr
    assert b"duplicate key" in result.stderr
    assert _cli(config, "dump", "aliases").stdout == b"a\t1\nb\t2\n"
    replaced = _cli(config, "load", "aliases", "--replace", "-", stdin=b"b 3\nc 4\n")
    assert replaced.returncode == 0, replaced.stderr
    assert b"deleted 1" in replaced.stderr
    assert _cli(config, "dump", "aliases").stdout == b"b\t3\nc\t4\n"


def test_postmap_made_lmdb_is_read_and_extended(config: Path) -> None:
    source = config.parent / "aliases"
    source.write_text("Alpha@Example.com first\nbeta@example.com second value\n")
    subprocess.run([POSTMAP, f"lmdb:{source}"], check=True, timeout=60)
    assert _cli(config, "query", "aliases", "ALPHA@example.com").stdout == b"first\n"
    assert _cli(config, "update", "aliases", "gamma@example.com", "third").returncode == 0
    listed = subprocess.run(
        [POSTMAP, "-s", f"lmdb:{source}"], capture_output=True, check=True, timeout=60
    ).stdout
    assert sorted(listed.splitlines()) == [
        b"alpha@example.com\tfirst",
        b"beta@example.com\tsecond value",
        b"gamma@example.com\tthird",
    ]


def test_writes_to_a_read_only_table_change_nothing(
    memcached: Memcached, tmp_path: Path, ports: NextPort
) -> None:
    writable = _write_config(tmp_path / "w.toml", memcached, ports())
    assert _cli(writable, "update", "aliases", "k", "original").returncode == 0
    read_only = _write_config(tmp_path / "ro.toml", memcached, ports(), writable=False)
    before = (tmp_path / "aliases.lmdb").read_bytes()
    for args, stdin in (
        (("update", "aliases", "k", "changed"), None),
        (("delete", "aliases", "k"), None),
        (("load", "aliases", "-"), b"k changed\nother value\n"),
    ):
        result = _cli(read_only, *args, stdin=stdin)
        assert result.returncode == 1, (args, result)
        assert b"read-only" in result.stderr
    assert (tmp_path / "aliases.lmdb").read_bytes() == before
    assert memcached.get(b"aliases:k") == (0, b"original")
    assert _cli(read_only, "query", "aliases", "k").stdout == b"original\n"


def test_writable_with_a_read_only_backup_type_is_a_config_error(
    memcached: Memcached, tmp_path: Path
) -> None:
    (tmp_path / "aliases").write_text("k v\n")
    path = tmp_path / "bridge.toml"
    path.write_text(
        '[[listen]]\nendpoint = "inet:127.0.0.1:1"\nprotocol = "socketmap"\n'
        f'[tables.aliases]\nmemcache = "{memcached.endpoint}"\n'
        f'backup = "texthash:{tmp_path / "aliases"}"\nwritable = true\n'
    )
    result = _cli(path, "check")
    assert result.returncode == 78
    assert b"aliases" in result.stderr and b"texthash" in result.stderr


def test_killed_load_keeps_every_committed_batch(config: Path, memcached: Memcached) -> None:
    count = 200_000
    source = b"".join(b"key%07d value%d\n" % (i, i) for i in range(count))
    (config.parent / "source").write_bytes(source)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bridge",
            "load",
            "--config",
            str(config),
            "--log-level",
            "info",
            "--batch-size",
            "2000",
            "aliases",
            str(config.parent / "source"),
        ],
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    committed_up_to = 0
    for line in process.stderr:
        if b"committed" in line:
            # "... lines FIRST-LAST (N entries)": the last line committed.
            committed_up_to = int(line.split(b"lines ")[1].split(b"-")[1].split(b" ")[0])
            if committed_up_to >= 20_000:
                process.send_signal(signal.SIGKILL)
                break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert committed_up_to >= 20_000
    dumped = _cli(config, "dump", "aliases")
    assert dumped.returncode == 0
    held = dumped.stdout.splitlines()
    # Every entry of every reported batch is there (lines are 1-based).
    assert len(held) >= committed_up_to
    assert held[:committed_up_to] == [b"key%07d\tvalue%d" % (i, i) for i in range(committed_up_to)]
    # And Postfix itself can still open it.
    listed = subprocess.run(
        [POSTMAP, "-s", f"lmdb:{config.parent / 'aliases'}"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == len(held)


def test_daemon_rereads_an_edited_texthash_backup(
    memcached: Memcached, tmp_path: Path, ports: NextPort, start_bridge: StartBridge
) -> None:
    backup = tmp_path / "aliases"
    backup.write_text("k before\n")
    sm_port = ports()
    config = tmp_path / "bridge.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "inet:127.0.0.1:{sm_port}"\nprotocol = "socketmap"\n'
        f'[tables.aliases]\nmemcache = "{memcached.endpoint}"\nbackup = "texthash:{backup}"\n'
    )
    start_bridge(config)
    table = f"socketmap:inet:127.0.0.1:{sm_port}:aliases"
    assert postmap_query("k", table).outcome == "found:before"
    backup.write_text("k before\nnew added\n")
    # The file is checked at most once a second: poll the condition, bounded.
    deadline = time.monotonic() + 20
    while postmap_query("new", table).outcome != "found:added":
        assert time.monotonic() < deadline, "edited texthash file never re-read"
        time.sleep(0.2)
