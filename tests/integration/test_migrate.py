"""``postfix-bridge migrate`` on a private Postfix: the same mail reaches the same recipients.

One private Postfix (tests/mailflow/harness.py) with ``memcache:`` tables
in the four places issue 13 names:

* ``virtual_alias_maps = memcache:aliases.cf`` (a list, a plain alias,
  an extension found through ``user@domain``, a catch-all ``@domain``);
* ``transport_maps = proxy:memcache:transport.cf`` (a domain and a
  ``.domain`` entry, through proxymap);
* ``check_recipient_access memcache:access.cf`` in
  ``smtpd_recipient_restrictions`` (an address and a whole domain);
* a master.cf override of the smtpd service,
  ``-o smtpd_sender_restrictions=check_sender_access,memcache:sender.cf``
  (a ``user@`` entry, matched with an extension).

Every table's entries are in its texthash backup only, so memcache is
filled by the lookups, and ``migrate --verify`` takes its keys from the
backups. The flow: mail through Postfix with memcache:, ``migrate`` writes
bridge.toml, the bridge starts with it, ``migrate --verify --apply``
compares and rewrites main.cf and master.cf, Postfix reloads, and the
same mail must get the same SMTP replies and reach the same recipients
at the same sinks.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.integration.harness import age_file, free_port, run_bridge, run_memcached
from tests.mailflow.harness import (
    POSTFIX,
    PostfixInstance,
    SmtpSink,
    run_postfix,
    run_sink,
    send_mail,
    wait_until,
)

pytestmark = pytest.mark.integration

POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"

#: (sender, recipients) of each mail, sent before and after the migration.
MAILS: Sequence[tuple[str, Sequence[str]]] = (
    (
        "someone@senders.test",
        [
            "team@alias.test",
            "bob+news@alias.test",
            "anyone@catch.test",
            "x@fast.test",
            "y@deep.sub.test",
            "blocked@plain.test",
            "w@closed.test",
            "plain@plain.test",
        ],
    ),
    ("bulk+promo@senders.test", ["plain@plain.test"]),
)


def _cf(directory: Path, name: str, memcache_port: int, backup: dict[str, str]) -> Path:
    source = directory / name
    source.write_text("".join(f"{key} {value}\n" for key, value in backup.items()))
    cf = directory / f"{name}.cf"
    cf.write_text(
        f"memcache = inet:127.0.0.1:{memcache_port}\n"
        f"key_format = {name}:%s\n"
        f"backup = texthash:{source}\n"
    )
    for path in (source, cf):
        path.chmod(0o644)
        age_file(path)
    return cf


def _run(command: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def _migrate(*args: str) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "bridge", "migrate", *args])


def _reload(postfix: PostfixInstance) -> None:
    """``postfix reload`` and wait for the master to say it re-read its files."""
    for name in ("main.cf", "master.cf"):
        age_file(postfix.config_dir / name)
    before = postfix.log().count("reload --")
    done = _run([POSTFIX, "-c", str(postfix.config_dir), "reload"])
    assert done.returncode == 0, done.stderr
    # The master logs this once it has re-read both files; every smtpd
    # after it is new (max_use=1), and the other daemons exit when idle.
    wait_until(
        lambda: postfix.log().count("reload --") > before,
        timeout=20,
        what="postfix reload",
        details=postfix.log,
    )


def _send_all(
    postfix: PostfixInstance, sinks: Sequence[SmtpSink], tag: str
) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Send every mail; per mail, its SMTP replies and ``SINK: <RECIPIENT>`` it reached."""
    results = []
    for number, (sender, recipients) in enumerate(MAILS):
        case = f"migrate-{number}"
        replies = send_mail(
            postfix.smtpd_port,
            sender,
            recipients,
            headers={"Subject": case, "X-Mailflow-Case": f"{case}-{tag}"},
        )
        wait_until(
            postfix.settled,
            timeout=30,
            what=f"{case} ({tag}) delivered",
            details=postfix.log,
        )
        reached = tuple(
            sorted(
                f"{sink.name}: <{recipient}>"
                for sink in sinks
                for message in sink.messages()
                if message.case == f"{case}-{tag}"
                for recipient in message.recipients
            )
        )
        results.append((replies.lines(), reached))
    return results


def _requests(metrics_port: int) -> dict[str, float]:
    """postfix_bridge_requests_total per table, from the bridge's /metrics."""
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    totals: dict[str, float] = {}
    for line in response.decode().splitlines():
        match = re.fullmatch(r'postfix_bridge_requests_total\{.*table="([^"]+)".*\} (\S+)', line)
        if match:
            totals[match[1]] = totals.get(match[1], 0.0) + float(match[2])
    return totals


@pytest.fixture
def root() -> Iterator[Path]:
    """A work directory Postfix daemons (user postfix) can traverse."""
    path = Path(tempfile.mkdtemp(prefix="migrate-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_migrate_verify_apply_keeps_the_mail_flow(root: Path) -> None:
    with contextlib.ExitStack() as stack:
        default = stack.enter_context(run_sink("default", free_port()))
        fast = stack.enter_context(run_sink("fast", free_port()))
        memcached = stack.enter_context(run_memcached())
        tables = root / "tables"
        tables.mkdir()
        tables.chmod(0o755)
        to_fast = f"smtp:[127.0.0.1]:{fast.port}"
        aliases = _cf(
            tables,
            "aliases",
            memcached.port,
            {
                "team@alias.test": "a@plain.test, b@plain.test",
                "bob@alias.test": "bob.real@plain.test",
                "@catch.test": "catchall@plain.test",
            },
        )
        transport = _cf(
            tables, "transport", memcached.port, {"fast.test": to_fast, ".sub.test": to_fast}
        )
        access = _cf(
            tables,
            "access",
            memcached.port,
            {"blocked@plain.test": "REJECT no thanks", "closed.test": "REJECT closed domain"},
        )
        sender = _cf(tables, "sender", memcached.port, {"bulk@": "REJECT no bulk mail"})

        smtpd_port = free_port()
        postfix = stack.enter_context(
            run_postfix(
                "migrate",
                root / "postfix",
                smtpd_port,
                {
                    "relayhost": f"[127.0.0.1]:{default.port}",
                    "virtual_alias_maps": f"memcache:{aliases}",
                    "transport_maps": f"proxy:memcache:{transport}",
                    "smtpd_recipient_restrictions": (
                        f"check_recipient_access memcache:{access},"
                        " permit_mynetworks, reject_unauth_destination"
                    ),
                },
            )
        )
        config_dir = str(postfix.config_dir)
        service = f"127.0.0.1:{smtpd_port}/inet"
        override = f"{service}/smtpd_sender_restrictions"
        done = _run(
            [
                POSTCONF,
                "-c",
                config_dir,
                "-P",
                f"{override}=check_sender_access,memcache:{sender}",
            ]
        )
        assert done.returncode == 0, done.stderr
        _reload(postfix)

        sinks = (default, fast)
        before = _send_all(postfix, sinks, "before")
        # Native Postfix does what the tables say (else the comparison proves nothing).
        replies, reached = before[0]
        assert any("RCPT <blocked@plain.test> 554" in line for line in replies), replies
        assert any("RCPT <w@closed.test> 554" in line for line in replies), replies
        assert reached == (
            "default: <a@plain.test>",
            "default: <b@plain.test>",
            "default: <bob.real+news@plain.test>",
            "default: <catchall@plain.test>",
            "default: <plain@plain.test>",
            "fast: <x@fast.test>",
            "fast: <y@deep.sub.test>",
        )
        replies, reached = before[1]
        assert any("RCPT <plain@plain.test> 554" in line for line in replies), replies
        assert reached == ()

        bridge_port = free_port()
        listen = f"inet:127.0.0.1:{bridge_port}"
        toml = root / "bridge.toml"
        planned = _migrate("-c", config_dir, "--listen", listen, "--output", str(toml))
        assert planned.returncode == 0, planned.stderr
        assert f"{override}=check_sender_access,socketmap:{listen}:sender" in planned.stdout
        checked = _run([sys.executable, "-m", "bridge", "check", "--config", str(toml)])
        assert checked.returncode == 0, checked.stderr
        # The bridge serves the generated file plus [metrics], which shows
        # that Postfix asks every table after the migration.
        metrics_port = free_port()
        served = root / "bridge-served.toml"
        served.write_text(
            toml.read_text() + f'\n[metrics]\nendpoint = "inet:127.0.0.1:{metrics_port}"\n'
        )
        bridge = contextlib.ExitStack()
        stack.enter_context(bridge)
        bridge.enter_context(run_bridge(served))

        # Postfix is untouched until migrate --verify --apply.
        assert "memcache:" in _run([POSTCONF, "-c", config_dir, "-n"]).stdout
        applied = _migrate(
            "-c", config_dir, "--listen", listen, "--output", str(toml), "--verify", "--apply"
        )
        assert applied.returncode == 0, applied.stdout + applied.stderr
        assert "verify passed" in applied.stderr
        for table in ("aliases", "transport", "access", "sender"):
            assert f"verified table {table}:" in applied.stderr

        shown = _run([POSTCONF, "-c", config_dir, "-n"]).stdout
        assert "memcache:" not in shown
        assert f"virtual_alias_maps = socketmap:{listen}:aliases\n" in shown
        assert f"transport_maps = proxy:socketmap:{listen}:transport\n" in shown
        assert f"check_recipient_access socketmap:{listen}:access," in shown
        overrides = _run([POSTCONF, "-c", config_dir, "-P"]).stdout
        assert f"{override} = check_sender_access,socketmap:{listen}:sender\n" in overrides
        assert (postfix.config_dir / "main.cf.before-migrate").exists()

        _reload(postfix)
        asked_before = _requests(metrics_port)
        after = _send_all(postfix, sinks, "after")
        assert after == before
        asked = _requests(metrics_port)
        for table in ("aliases", "transport", "access", "sender"):
            assert asked.get(table, 0) > asked_before.get(table, 0), (table, asked)
        # Postfix really asks the bridge now: without it, lookups fail (4xx).
        bridge.close()
        down = send_mail(
            postfix.smtpd_port, "bulk+promo@senders.test", ["plain@plain.test"], headers={}
        )
        assert "RCPT <plain@plain.test> 451 4.3.0" in " ".join(down.lines()), down
        # A second run finds nothing left to migrate.
        again = _migrate("-c", config_dir, "--listen", listen)
        assert again.returncode == 0, again.stderr
        assert "no memcache: table to migrate" in again.stderr


def test_verify_failure_changes_nothing_and_unusable_tables_stay(root: Path) -> None:
    """No Postfix needs to run: postconf and postmap read the files."""
    config_dir = root / "etc"
    config_dir.mkdir()
    with contextlib.ExitStack() as stack:
        memcached = stack.enter_context(run_memcached())
        good = _cf(root, "good", memcached.port, {"a@example.com": "b@example.net"})
        bad = root / "bad.cf"
        bad.write_text(f"memcache = inet:127.0.0.1:{memcached.port}\nbackup = hash:{root}/x\n")
        main_cf = (
            f"compatibility_level = 3.6\nvirtual_alias_maps = memcache:{good}, memcache:{bad}\n"
        )
        (config_dir / "main.cf").write_text(main_cf)
        shutil.copy("/etc/postfix/master.cf", config_dir / "master.cf")
        master_cf = (config_dir / "master.cf").read_text()
        listen = f"inet:127.0.0.1:{free_port()}"
        toml = root / "bridge.toml"
        common = ("-c", str(config_dir), "--listen", listen, "--output", str(toml))

        planned = _migrate(*common)
        assert planned.returncode == 3, planned.stderr
        assert f"cannot migrate {bad}" in planned.stderr
        assert "unsupported table type 'hash'" in planned.stderr
        assert f"virtual_alias_maps = socketmap:{listen}:good, memcache:{bad}" in planned.stdout

        # No bridge answers: every key differs, nothing is applied.
        failed = _migrate(*common, "--verify", "--apply")
        assert failed.returncode == 1, failed.stderr
        assert "table good: key 'a@example.com'" in failed.stderr
        assert "nothing applied" in failed.stderr
        assert (config_dir / "main.cf").read_text() == main_cf
        assert (config_dir / "master.cf").read_text() == master_cf

        stack.enter_context(run_bridge(toml))
        applied = _migrate(*common, "--verify", "--apply")
        assert applied.returncode == 3, applied.stderr
        shown = _run([POSTCONF, "-c", str(config_dir), "-n"]).stdout
        assert f"virtual_alias_maps = socketmap:{listen}:good, memcache:{bad}\n" in shown
