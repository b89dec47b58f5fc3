"""``backup = proxy:TYPE:NAME`` against a real Postfix proxymap (PXC-1 .. PXC-10).

Every test runs a private Postfix instance (``tests/mailflow/harness.py``'s
:func:`run_postfix`: its own configuration, queue and data directories
under a temporary root, smtpd on a free loopback port) with
``proxy_read_maps``/``proxy_write_maps`` listing the tables the test
uses; table files live in a world-readable directory, as proxymap reads
them as user postfix.

* **Differential**: Postfix's own ``postmap -q KEY memcache:NATIVE.cf``
  (``backup = proxy:hash:...`` and the other types) against the bridge
  reading the same kind of ``.cf`` file through ``config =``, each on its
  own empty memcached: the same answers, and the same memcache items
  afterwards. Both ask the same proxymap.
* **Faults**: proxymap restarting after a table change (the next lookup
  reconnects and answers the new value), Postfix stopped (TEMP within
  the time limit, never NOTFOUND), a table proxymap does not list (PERM
  with the main.cf line), a forced protocol form the server does not
  speak. Each records its row in the reliability report.
* **Writes and listing**: ``postfix-bridge update/delete/dump`` through
  proxywrite, checked in the table file once Postfix has stopped.
* **Access to private/**: the daemon running as ``postfix``, and as an
  unprivileged user given search permission on ``private/`` by an ACL.

Installed Postfix is 3.7, which speaks the 2.9-3.10 request form; the
3.11 form is covered by tests/unit/test_proxy_map.py.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.harness import (
    POSTMAP,
    Memcached,
    PostmapResult,
    age_file,
    free_port,
    run_bridge,
    run_memcached,
)
from tests.mailflow.harness import POSTFIX, PostfixInstance, run_postfix, wait_until
from tests.reliability import ReliabilityReport

pytestmark = pytest.mark.integration

POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"

if not (shutil.which("postfix") or os.path.exists(POSTFIX)) or os.geteuid() != 0:
    pytest.skip("needs Postfix and root (a private Postfix instance)", allow_module_level=True)

#: The backup tables' source, in postmap(1) format: addresses, an
#: extension key, a catch-all, UTF-8 keys and values, values with spaces
#: and commas, a bare domain, a key with upper case (postmap folds it).
SOURCE = """\
alice@example.com alice@mail.example.net
bob@example.com bob@example.net, carol@example.net
user+ext@example.com ext@example.net
user@example.com plain@example.net
@example.org catchall@example.net
straße@example.com strasse-value
café@example.com café@example.net
spaced@example.com a value  with   spaces
comma@example.com x, y,z
example.com domain-entry
postmaster root@example.net
émile@exämple.com émile-value
Upper@Example.COM upper-value
"""

#: Keys asked of every scenario: case variants, extensions, misses, UTF-8.
KEYS = (
    "alice@example.com",
    "Alice@Example.COM",
    "ALICE@EXAMPLE.COM",
    "bob@example.com",
    "user+ext@example.com",
    "user+other@example.com",
    "User@Example.com",
    "@example.org",
    "someone@example.org",
    "straße@example.com",
    "STRASSE@example.com",
    "Café@Example.com",
    "CAFÉ@EXAMPLE.COM",
    "spaced@example.com",
    "comma@example.com",
    "missing@example.com",
    "example.com",
    "postmaster",
    "Émile@Exämple.com",
    "upper@example.com",
    "a b@example.com",
    "",
)

#: Inner table types and the memcache_table(5) variants each is asked under.
VARIANTS = {
    "plain": "",
    "format": "key_format = alias:%s\nttl = 120\nflags = 7\n",
    "domain": "domain = example.com, example.org\n",
    "parts": "key_format = %d/%u\nttl = 30\n",
}
TYPES = {
    "hash": tuple(VARIANTS),
    "btree": tuple(VARIANTS),
    "lmdb": ("plain", "domain"),
    "cdb": ("plain", "format"),
    "texthash": ("plain", "parts"),
}

#: A lookup through a working proxymap takes milliseconds; a failure must
#: come within the client's time limit (DEFAULT_TIMEOUT, 10 s) plus slack.
FAILURE_BOUND = 12.0


# --------------------------------------------------------------- the parts


@dataclass
class ProxyPostfix:
    """A private Postfix and the table directory its proxymap reads."""

    instance: PostfixInstance
    root: Path
    tables: Path

    @property
    def queue(self) -> Path:
        return self.root / "queue"

    @property
    def private(self) -> Path:
        return self.queue / "private"

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """A Postfix command (postmap, postconf ...) with this instance's configuration."""
        completed = subprocess.run(
            [command[0], "-c", str(self.instance.config_dir), *command[1:]],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if check:
            assert completed.returncode == 0, completed
        return completed

    def query(self, key: str, table: str) -> PostmapResult:
        """``postmap -q KEY TABLE`` as Postfix's own client, with this instance's main.cf."""
        completed = self.run(POSTMAP, "-q", key, table, check=False)
        return PostmapResult(
            completed.returncode,
            completed.stdout.decode("utf-8", "surrogateescape"),
            completed.stderr.decode("utf-8", "surrogateescape"),
        )

    def build(self, table_type: str, name: str, source: str = SOURCE) -> str:
        """Write ``source`` and build it as ``table_type``; returns ``TYPE:PATH``."""
        path = self.tables / name
        path.write_text(source, encoding="utf-8")
        path.chmod(0o644)
        if table_type != "texthash":
            subprocess.run([POSTMAP, f"{table_type}:{path}"], check=True, capture_output=True)
        return f"{table_type}:{path}"

    def restarts(self) -> int:
        """How often proxymap has exited because a table changed (PXC-9)."""
        return self.instance.log().count("has changed -- restarting")


def make_root(prefix: str) -> Path:
    """A directory user postfix can traverse (pytest's tmp_path is under a 0700 one)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    return root


@contextlib.contextmanager
def proxy_postfix(
    name: str, *, read_maps: Sequence[str], write_maps: Sequence[str] = ()
) -> Iterator[ProxyPostfix]:
    """A private Postfix listing ``read_maps``/``write_maps`` (``TYPE:PATH``, no ``proxy:``).

    ``@TABLES@`` in a name stands for the table directory, where the test
    builds the files (:meth:`ProxyPostfix.build`); proxymap opens a table
    at its first request, so files may come after the start.
    """
    root = make_root(f"px-{name}-")
    tables = root / "tables"
    tables.mkdir()
    tables.chmod(0o755)
    try:
        main_cf = {
            "proxy_read_maps": " ".join(f"proxy:{t}" for t in read_maps),
            "proxy_write_maps": " ".join(f"proxy:{t}" for t in write_maps),
        }
        resolved = {key: value.replace("@TABLES@", str(tables)) for key, value in main_cf.items()}
        with run_postfix(name, root, free_port(), resolved) as instance:
            yield ProxyPostfix(instance, root, tables)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def one_proxymap_process(postfix: ProxyPostfix) -> None:
    """Let master run at most one proxymap process, so a table change restarts *the* one."""
    offset = postfix.instance.log_offset()
    postfix.run(POSTCONF, "-F", "-e", "proxymap/unix/process_limit=1")
    age_file(postfix.instance.config_dir / "master.cf")
    postfix.run(POSTFIX, "reload")
    wait_until(
        lambda: "reload" in postfix.instance.log(offset),
        timeout=20,
        what="postfix reload",
        details=lambda: postfix.instance.log(offset),
    )


def socketmap_ask(port: int, name: str, key: str, *, timeout: float = 30) -> str:
    """One socketmap request to the bridge; the reply payload (``OK v``, ``TEMP ...``)."""
    payload = f"{name} {key}".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"%d:%s," % (len(payload), payload))
        reply = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
            colon = reply.find(b":")
            if colon > 0 and len(reply) >= colon + 1 + int(reply[:colon]) + 1:
                break
    length, _, rest = reply.partition(b":")
    return rest[: int(length)].decode("utf-8", "replace")


def bridge_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args[:1], "--config", str(config), *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _listener(port: int) -> str:
    return f'[[listen]]\nendpoint = "inet:127.0.0.1:{port}"\nprotocol = "socketmap"\n'


# ------------------------------------------------------------ differential

#: Every table the module's Postfix serves read-only, by file name.
DIFF_TABLES = [f"{t}:@TABLES@/{t}-aliases" for t in TYPES]
FAULT_TABLES = ["hash:@TABLES@/restart", "hash:@TABLES@/dump"]


@pytest.fixture(scope="module")
def postfix() -> Iterator[ProxyPostfix]:
    with proxy_postfix("pxdiff", read_maps=[*DIFF_TABLES, *FAULT_TABLES]) as started:
        for table_type in TYPES:
            started.build(table_type, f"{table_type}-aliases")
        yield started


@dataclass
class Scenario:
    name: str
    backup: str
    cf: str
    keys: Sequence[str] = KEYS


def _scenarios(postfix: ProxyPostfix) -> list[Scenario]:
    return [
        Scenario(
            f"{table_type}_{variant}",
            f"proxy:{table_type}:{postfix.tables}/{table_type}-aliases",
            VARIANTS[variant],
        )
        for table_type, variants in TYPES.items()
        for variant in variants
    ]


def _compare_items(name: str, native: Memcached, bridged: Memcached) -> list[str]:
    """Both memcacheds hold the same items; listing only nominates keys (see test_differential)."""
    keys = set(native.items()) | set(bridged.items())
    return [
        f"{name}: memcache item {key!r}: postfix {native.get(key)!r} bridge {bridged.get(key)!r}"
        for key in sorted(keys)
        if native.get(key) != bridged.get(key)
    ]


def test_postfix_and_bridge_agree_through_proxymap(postfix: ProxyPostfix) -> None:
    scenarios = _scenarios(postfix)
    port = free_port()
    work = postfix.root / "diff"
    work.mkdir()
    with run_memcached() as native, run_memcached() as bridged:
        toml = [_listener(port)]
        for scenario in scenarios:
            for side, server in (("native", native), ("bridge", bridged)):
                cf = work / f"{scenario.name}-{side}.cf"
                cf.write_text(
                    f"memcache = inet:127.0.0.1:{server.port}\nbackup = {scenario.backup}\n"
                    + scenario.cf,
                    encoding="utf-8",
                )
                age_file(cf)
            toml.append(
                f'[tables.{scenario.name}]\nconfig = "{work}/{scenario.name}-bridge.cf"\n'
                f'queue_directory = "{postfix.queue}"\n'
            )
        config = work / "bridge.toml"
        config.write_text("\n".join(toml), encoding="utf-8")

        compared = 0
        mismatches: list[str] = []
        answers: dict[str, int] = {}
        with run_bridge(config), ThreadPoolExecutor(max_workers=1) as pool:
            for scenario in scenarios:
                native.flush()
                bridged.flush()
                for key in scenario.keys:
                    theirs_future = pool.submit(
                        postfix.query, key, f"memcache:{work}/{scenario.name}-native.cf"
                    )
                    ours = postfix.query(key, f"socketmap:inet:127.0.0.1:{port}:{scenario.name}")
                    theirs = theirs_future.result()
                    compared += 1
                    kind = theirs.outcome.partition(":")[0]
                    answers[kind] = answers.get(kind, 0) + 1
                    if ours.outcome != theirs.outcome:
                        mismatches.append(
                            f"{scenario.name} key {key!r}: postfix {theirs.outcome!r} "
                            f"bridge {ours.outcome!r} ({ours.stderr.strip()})"
                        )
                mismatches.extend(_compare_items(scenario.name, native, bridged))

    assert not mismatches, f"{len(mismatches)} of {compared} differ:\n" + "\n".join(mismatches)
    assert compared >= 100, compared
    # The corpus must really reach the backups: plenty of hits and misses.
    assert answers.get("found", 0) >= 50, answers
    assert answers.get("notfound", 0) >= 50, answers
    assert "error" not in answers, answers


# ----------------------------------------------------------------- faults


@pytest.fixture(scope="module")
def bridged() -> Iterator[Memcached]:
    with run_memcached() as server:
        yield server


def _fault_bridge(postfix: ProxyPostfix, memcache: Memcached, tables: str) -> tuple[Path, int]:
    port = free_port()
    directory = postfix.root / f"bridge-{port}"
    directory.mkdir()
    config = directory / "bridge.toml"
    config.write_text(
        _listener(port)
        + tables.replace("@MEMCACHE@", memcache.endpoint).replace("@QUEUE@", str(postfix.queue)),
        encoding="utf-8",
    )
    return config, port


def test_proxymap_restart_is_transparent(
    postfix: ProxyPostfix, bridged: Memcached, reliability: ReliabilityReport
) -> None:
    # PXC-9: proxymap exits when a table it has open changes, at its next
    # accept; the bridge's open connection then ends, and its next lookup
    # must reconnect and answer from the new file.
    one_proxymap_process(postfix)
    table = postfix.build("hash", "restart", "k value-0\n")
    config, port = _fault_bridge(
        postfix,
        bridged,
        f'[tables.restart]\nmemcache = "@MEMCACHE@"\nbackup = "proxy:{table}"\n'
        'queue_directory = "@QUEUE@"\n',
    )
    # Postfix compares modification times in whole seconds: each version of
    # the file gets its own (in the past, so nothing waits for it to settle).
    base = time.time() - 1000

    def stamp(version: int) -> None:
        os.utime(postfix.tables / "restart.db", (base + 10 * version, base + 10 * version))

    stamp(0)
    rounds, correct, temporary, wrong = 6, 0, 0, 0
    with run_bridge(config) as bridge:
        assert socketmap_ask(port, "restart", "k") == "OK value-0"
        for number in range(1, rounds + 1):
            before = postfix.restarts()
            postfix.build("hash", "restart", f"k value-{number}\n")
            if number % 2:
                stamp(number)
            else:
                # Rebuilt with the old time, then touched: the touch is the change.
                stamp(number - 1)
                os.utime(postfix.tables / "restart.db")
            # Another client's connect makes the (only) proxymap process
            # notice the change and exit.
            assert postfix.query("k", f"proxy:{table}").outcome == f"found:value-{number}"
            restarted = functools.partial(lambda since: postfix.restarts() > since, before)
            wait_until(
                restarted,
                timeout=20,
                what="proxymap to restart",
                details=postfix.instance.log,
            )
            bridged.flush()
            reply = socketmap_ask(port, "restart", "k")
            if reply == f"OK value-{number}":
                correct += 1
            elif reply.startswith(("TEMP", "TIMEOUT")):
                temporary += 1
            else:
                wrong += 1
        log = "".join(bridge.log)
    reliability.record(
        "proxy: backup",
        "proxymap restarted after each table change (rebuild, touch)",
        requests=rounds,
        correct=correct,
        temporary=temporary,
        wrong=wrong,
        bound="new value on the next lookup, no error",
    )
    assert (correct, temporary, wrong) == (rounds, 0, 0), log
    assert postfix.restarts() >= rounds


def test_table_not_approved_is_perm_with_the_fix(
    postfix: ProxyPostfix, bridged: Memcached, reliability: ReliabilityReport
) -> None:
    table = postfix.build("hash", "unlisted")
    config, port = _fault_bridge(
        postfix,
        bridged,
        f'[tables.unlisted]\nmemcache = "@MEMCACHE@"\nbackup = "proxy:{table}"\n'
        'queue_directory = "@QUEUE@"\n',
    )
    hint = f"add proxy:{table} to proxy_read_maps in main.cf and run postfix reload"
    with run_bridge(config) as bridge:
        replies = [socketmap_ask(port, "unlisted", key) for key in ("alice@example.com", "x")]
        log = "".join(bridge.log)
    assert all(reply.startswith("PERM ") and hint in reply for reply in replies), replies
    assert hint in log
    # The CLI says the same, and exits with a temporary-failure status.
    completed = bridge_cli(config, "query", "unlisted", "alice@example.com")
    assert completed.returncode == 75, completed
    assert hint in completed.stderr
    # proxymap logged its own side of it (PXC-7).
    assert f'request for unapproved table: "{table}"' in postfix.instance.log()
    reliability.record(
        "proxy: backup",
        "table not listed in proxy_read_maps",
        requests=len(replies) + 1,
        correct=len(replies) + 1,
        bound="PERM naming the proxy_read_maps entry to add",
    )


def test_forced_protocol_forms(postfix: ProxyPostfix, bridged: Memcached) -> None:
    # Postfix 3.7 speaks the 2.9-3.10 form: forcing it works, forcing 3.11
    # is a configuration failure that says which setting to change (PXC-5).
    table = f"proxy:hash:{postfix.tables}/hash-aliases"
    config, port = _fault_bridge(
        postfix,
        bridged,
        "".join(
            f'[tables.{name}]\nmemcache = "@MEMCACHE@"\nbackup = "{table}"\n'
            f'queue_directory = "@QUEUE@"\nproxymap_protocol = "{form}"\n'
            for name, form in (("old", "2.9"), ("new", "3.11"), ("auto", "auto"))
        ),
    )
    with run_bridge(config):
        bridged.flush()
        assert socketmap_ask(port, "old", "alice@example.com") == "OK alice@mail.example.net"
        assert socketmap_ask(port, "auto", "bob@example.com") == (
            "OK bob@example.net, carol@example.net"
        )
        reply = socketmap_ask(port, "new", "user@example.com")
    assert reply.startswith("PERM "), reply
    assert "in the 3.11 protocol form: set proxymap_protocol" in reply


def test_dump_lists_the_table_through_proxymap(postfix: ProxyPostfix, bridged: Memcached) -> None:
    # MC-20 through PXC-4's sequence request: the same entries, in the same
    # order, as postmap -s reading the file itself.
    table = postfix.build("hash", "dump")
    config, _ = _fault_bridge(
        postfix,
        bridged,
        f'[tables.dump]\nmemcache = "@MEMCACHE@"\nbackup = "proxy:{table}"\n'
        'queue_directory = "@QUEUE@"\n',
    )
    completed = bridge_cli(config, "dump", "dump")
    assert completed.returncode == 0, completed.stderr
    direct = subprocess.run(
        [POSTMAP, "-s", table], capture_output=True, text=True, check=True, timeout=60
    )
    assert completed.stdout == direct.stdout
    assert len(completed.stdout.splitlines()) == len(SOURCE.splitlines())


def test_postfix_stopped_is_temp_within_the_bound(reliability: ReliabilityReport) -> None:
    with contextlib.ExitStack() as stack:
        postfix = stack.enter_context(proxy_postfix("pxstop", read_maps=["hash:@TABLES@/stop"]))
        memcache = stack.enter_context(run_memcached())
        table = postfix.build("hash", "stop")
        config, port = _fault_bridge(
            postfix,
            memcache,
            f'[tables.stop]\nmemcache = "@MEMCACHE@"\nbackup = "proxy:{table}"\n'
            'queue_directory = "@QUEUE@"\n',
        )
        bridge = stack.enter_context(run_bridge(config))
        # Connected and answering, then Postfix goes away under it.
        assert socketmap_ask(port, "stop", "alice@example.com") == "OK alice@mail.example.net"
        postfix.instance.request_stop()
        postfix.instance.wait_stopped()
        # Keys memcache cannot answer: every one needs the backup.
        keys = [k for k in KEYS if k and " " not in k and k.casefold() != "alice@example.com"]
        temporary = wrong = 0
        slowest = 0.0
        for key in keys:
            started = time.monotonic()
            reply = socketmap_ask(port, "stop", key)
            slowest = max(slowest, time.monotonic() - started)
            if reply.startswith(("TEMP ", "TIMEOUT ")):
                temporary += 1
            else:
                wrong += 1
        # A key memcache holds is still answered (MC-16: memcache first).
        cached = socketmap_ask(port, "stop", "alice@example.com")
        log = "".join(bridge.log)
    reliability.record(
        "proxy: backup",
        "Postfix stopped (proxymap gone, stale socket file)",
        requests=len(keys) + 1,
        correct=1 if cached == "OK alice@mail.example.net" else 0,
        temporary=temporary,
        wrong=wrong,
        bound=f"TEMP within {slowest:.3f} s (limit {FAILURE_BOUND:g} s)",
    )
    assert wrong == 0, log
    assert temporary == len(keys)
    assert slowest < FAILURE_BOUND
    assert cached == "OK alice@mail.example.net"
    assert "Postfix is not running" in log, log


# ------------------------------------------------------------------ writes


def test_writes_through_proxywrite(reliability: ReliabilityReport) -> None:
    with contextlib.ExitStack() as stack:
        postfix = stack.enter_context(
            proxy_postfix(
                "pxwrite",
                read_maps=["hash:@TABLES@/ro"],
                write_maps=["btree:@TABLES@/rw"],
            )
        )
        memcache = stack.enter_context(run_memcached())
        rw = postfix.build("btree", "rw", "existing value-0\n")
        postfix_user = pwd.getpwnam("postfix")
        os.chown(postfix.tables / "rw.db", postfix_user.pw_uid, postfix_user.pw_gid)
        unlisted = postfix.build("btree", "unlisted", "existing value-0\n")
        config, _ = _fault_bridge(
            postfix,
            memcache,
            f'[tables.w]\nmemcache = "@MEMCACHE@"\nbackup = "proxy:{rw}"\n'
            'key_format = "w:%s"\nwritable = true\nqueue_directory = "@QUEUE@"\n'
            f'[tables.u]\nmemcache = "@MEMCACHE@"\nbackup = "proxy:{unlisted}"\n'
            'writable = true\nqueue_directory = "@QUEUE@"\n',
        )
        steps: list[tuple[tuple[str, ...], int, str]] = [
            (("update", "w", "Alice@Example.com", "alice value"), 0, ""),
            (("update", "w", "bob@example.com", "bob, value"), 0, ""),
            (("update", "w", "bob@example.com", "bob replaced"), 0, ""),
            (("update", "w", "café@example.com", "café"), 0, ""),
            (("delete", "w", "alice@example.com"), 0, ""),
            (("delete", "w", "alice@example.com"), 1, ""),
            (("query", "w", "bob@example.com"), 0, "bob replaced"),
            (("query", "w", "Existing"), 0, "value-0"),
            (("query", "w", "alice@example.com"), 1, ""),
        ]
        results = []
        for args, status, output in steps:
            completed = bridge_cli(config, *args)
            results.append((args, completed.returncode, completed.stdout, completed.stderr))
            assert completed.returncode == status, completed
            assert output in completed.stdout
        dump = bridge_cli(config, "dump", "w")
        assert dump.returncode == 0, dump.stderr
        listed = dict(line.split("\t", 1) for line in dump.stdout.splitlines())
        assert listed == {
            "existing": "value-0",
            "bob@example.com": "bob replaced",
            "café@example.com": "café",
        }
        # memcache got the writes too, under key_format (MC-17).
        assert memcache.get(b"w:bob@example.com") == (0, b"bob replaced")
        # A table proxywrite does not list: CONFIG, with the line to add.
        refused = bridge_cli(config, "update", "u", "k", "v")
        assert refused.returncode != 0
        assert (
            f"add proxy:{unlisted} to proxy_write_maps in main.cf and run postfix reload"
            in refused.stderr
        )
        # proxywrite holds the file under its lock until it exits: read the
        # file itself once Postfix has stopped.
        postfix.instance.request_stop()
        postfix.instance.wait_stopped()
        direct = subprocess.run(
            [POSTMAP, "-s", rw], capture_output=True, text=True, check=True, timeout=60
        )
    assert dict(line.split("\t", 1) for line in direct.stdout.splitlines()) == listed
    reliability.record(
        "proxy: backup",
        "writes through proxywrite (update, replace, delete, dump)",
        requests=len(steps) + 2,
        correct=len(steps) + 2,
        bound="file holds exactly the writes once Postfix stopped",
    )


def test_memcache_table_postscreen_example_passes_check(tmp_path: Path) -> None:
    # memcache_table(5)'s own example: a syntax check only, no Postfix needed.
    cf = tmp_path / "postscreen_cache.cf"
    cf.write_text(
        "memcache = inet:127.0.0.1:11211\n"
        "key_format = postscreen:%s\n"
        "backup = proxy:btree:/var/lib/postfix/postscreen_cache_map\n"
    )
    config = tmp_path / "bridge.toml"
    config.write_text(
        _listener(free_port())
        + f'[tables.postscreen]\nconfig = "{cf}"\nfold_case = false\nwritable = true\n'
    )
    completed = bridge_cli(config, "check")
    assert completed.returncode == 0, completed.stderr
    assert "backup proxy:btree:/var/lib/postfix/postscreen_cache_map" in completed.stdout
    # A bare hash: backup is refused, with the proxy: spelling to use.
    cf.write_text("backup = hash:/etc/postfix/x\n")
    completed = bridge_cli(config, "check")
    assert completed.returncode == 78
    assert "serve it through Postfix's proxymap instead: proxy:hash:/etc/postfix/x" in (
        completed.stderr
    )


# ---------------------------------------------------------- access to private/

#: POSIX ACL extended attribute (the format setfacl writes): version 2,
#: then (tag, permissions, id) entries sorted by tag.
_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_UNDEFINED_ID = 0xFFFFFFFF


def grant_search(directory: Path, uid: int) -> None:
    """``setfacl -m u:UID:x DIRECTORY`` for a 0700 directory, without needing setfacl."""
    entries = [
        (_ACL_USER_OBJ, 7, _ACL_UNDEFINED_ID),
        (_ACL_USER, 1, uid),
        (_ACL_GROUP_OBJ, 0, _ACL_UNDEFINED_ID),
        (_ACL_MASK, 1, _ACL_UNDEFINED_ID),
        (_ACL_OTHER, 0, _ACL_UNDEFINED_ID),
    ]
    data = struct.pack("<I", _ACL_VERSION) + b"".join(
        struct.pack("<HHI", tag, permissions, ident) for tag, permissions, ident in entries
    )
    os.setxattr(directory, "system.posix_acl_access", data)


@dataclass
class AccessCase:
    user: str
    acl: bool
    expected: str
    notes: list[str] = field(default_factory=list)


@pytest.mark.parametrize(
    "case",
    [
        AccessCase("postfix", False, "OK alice@mail.example.net"),
        AccessCase("nobody", False, "TEMP "),
        AccessCase("nobody", True, "OK alice@mail.example.net"),
    ],
    ids=["as-postfix", "unprivileged", "unprivileged-with-acl"],
)
def test_daemon_user_and_private_directory(
    postfix: ProxyPostfix, case: AccessCase, reliability: ReliabilityReport
) -> None:
    # PXC-1: private/ is 0700 postfix. The daemon gets in as user postfix,
    # or as its own user with search permission granted by an ACL.
    uid = pwd.getpwnam(case.user).pw_uid
    table = f"proxy:hash:{postfix.tables}/hash-aliases"
    with run_memcached() as memcache:
        config, port = _fault_bridge(
            postfix,
            memcache,
            f'[tables.a]\nmemcache = "@MEMCACHE@"\nbackup = "{table}"\n'
            'queue_directory = "@QUEUE@"\n',
        )
        text = config.read_text()
        config.write_text(f'user = "{case.user}"\n' + text)
        config.parent.chmod(0o755)
        config.chmod(0o644)
        if case.acl:
            try:
                grant_search(postfix.private, uid)
            except OSError as exc:  # pragma: no cover - a file system without ACLs
                pytest.fail(f"cannot set an ACL on {postfix.private}: {exc}")
        try:
            with run_bridge(config) as bridge:
                reply = socketmap_ask(port, "a", "alice@example.com")
                log = "".join(bridge.log)
        finally:
            if case.acl:
                os.removexattr(postfix.private, "system.posix_acl_access")
                postfix.private.chmod(0o700)
    assert reply.startswith(case.expected), (reply, log)
    if case.expected == "TEMP ":
        assert "Permission denied" in reply
        assert "run the bridge as user postfix" in reply
    assert re.fullmatch(r"0o700", oct(postfix.private.stat().st_mode & 0o777))
    reliability.record(
        "proxy: backup",
        f"daemon as {case.user}{' with an ACL on private/' if case.acl else ''}",
        requests=1,
        correct=1 if reply.startswith(case.expected) and not reply.startswith("TEMP") else 0,
        temporary=1 if reply.startswith("TEMP") else 0,
        bound="EACCES is TEMP with the fix; never NOTFOUND",
    )
