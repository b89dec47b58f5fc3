"""Real mail through private Postfix instances: native ``memcache:`` vs the bridge.

The parts, each started on loopback and stopped when its context manager
exits (also when a test fails):

* :class:`SmtpSink`: an in-process SMTP server on a free port that records
  every message it receives (envelope sender and recipients, a few
  headers). Postfix delivers everything to sinks; nothing leaves the
  machine.
* :class:`PostfixInstance`: a private Postfix (``postfix -c DIR start``)
  with its own configuration, queue and data directories and its own
  maillog, smtpd on ``127.0.0.1:PORT`` with ``max_use=1`` (smtpd caches
  lookups per process), no chroot, every transport going to a sink.
* :class:`Scenario`: two Postfix instances side by side. NATIVE names the
  tables ``memcache:/path/NAME.cf`` (Postfix's own client); BRIDGE names
  them ``socketmap:inet:127.0.0.1:PORT:NAME`` or ``tcp:127.0.0.1:PORT``
  through one bridge daemon that reads the SAME ``NAME.cf`` files
  (``config =``) and only points ``memcache`` at its own memcached. Both
  memcacheds are seeded identically; backups are shared texthash files.
  :meth:`Scenario.send` sends the same mail to both and returns what each
  answered at SMTP, delivered to which sink, and left in its queue.

memcached and the bridge daemon come from :mod:`tests.integration.harness`.
Readiness and delivery are waited for on conditions with a deadline,
never with a fixed sleep.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import json
import os
import pwd
import re
import shutil
import signal
import smtplib
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tests.integration.harness import (
    Bridge,
    Memcached,
    age_file,
    free_port,
    run_bridge,
    run_memcached,
    wait_for_connect,
)

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTQUEUE = shutil.which("postqueue") or "/usr/sbin/postqueue"
POSTSUPER = shutil.which("postsuper") or "/usr/sbin/postsuper"

#: Upper bound for mail to be delivered or deferred after it was accepted.
SETTLE_TIMEOUT = 30.0
#: Upper bound for a Postfix instance to start or stop.
POSTFIX_TIMEOUT = 20.0
#: Domain of every host name in the tests (none of it exists).
TEST_DOMAIN = "mailflow.test"
#: The address the test client connects from unless a test says otherwise.
#: Not 127.0.0.1: the client-access tests reject the network 127.0.0.
DEFAULT_CLIENT_IP = "127.1.0.1"
DEFAULT_HELO = f"client.{TEST_DOMAIN}"


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    details: Callable[[], str] = lambda: "",
    interval: float = 0.05,
) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{details()}")
        time.sleep(interval)


class Ports:
    """Hands out distinct free loopback ports for the whole session."""

    def __init__(self) -> None:
        self._handed: set[int] = set()

    def __call__(self) -> int:
        while True:
            port = free_port()
            if port not in self._handed:
                self._handed.add(port)
                return port


# ---------------------------------------------------------------------------
# SMTP sinks


@dataclass(frozen=True)
class Received:
    """One message as a sink received it."""

    sink: str
    sender: str
    recipients: tuple[str, ...]
    headers: Mapping[str, str]

    @property
    def case(self) -> str:
        return self.headers.get("x-mailflow-case", "")

    @property
    def side(self) -> str:
        """The instance that sent it: our header, else the host in From (bounces)."""
        side = self.headers.get("x-mailflow-side", "")
        if side:
            return side
        match = re.search(rf"@([a-z0-9-]+)\.{re.escape(TEST_DOMAIN)}", self.headers.get("from", ""))
        return match.group(1) if match else ""


class _SinkServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    sink: SmtpSink


class _SinkHandler(socketserver.StreamRequestHandler):
    """A minimal ESMTP server: EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT."""

    timeout = 120

    def _reply(self, text: str) -> None:
        self.wfile.write(text.encode() + b"\r\n")

    def handle(self) -> None:
        server = self.server
        assert isinstance(server, _SinkServer)
        sink = server.sink
        self._reply(f"220 {sink.hostname} ESMTP sink")
        sender: str | None = None
        recipients: list[str] = []
        while True:
            line = self.rfile.readline()
            if not line:
                return
            command = line.decode("utf-8", "surrogateescape").rstrip("\r\n")
            verb = command[:4].upper()
            if verb == "EHLO":
                self._reply(f"250-{sink.hostname}\r\n250 8BITMIME")
            elif verb == "HELO":
                self._reply(f"250 {sink.hostname}")
            elif verb == "MAIL":
                sender, recipients = _angle_address(command), []
                self._reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                if sender is None:
                    self._reply("503 5.5.1 need MAIL first")
                else:
                    recipients.append(_angle_address(command))
                    self._reply("250 2.1.5 Ok")
            elif verb == "DATA":
                if sender is None or not recipients:
                    self._reply("503 5.5.1 need RCPT first")
                    continue
                self._reply("354 go ahead")
                sink.record(sender, recipients, self._read_data())
                sender, recipients = None, []
                self._reply("250 2.0.0 Ok: stored")
            elif verb == "RSET":
                sender, recipients = None, []
                self._reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                self._reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                self._reply("221 2.0.0 Bye")
                return
            else:
                self._reply("502 5.5.2 command not recognized")

    def _read_data(self) -> bytes:
        lines: list[bytes] = []
        while True:
            line = self.rfile.readline()
            if not line or line in (b".\r\n", b".\n"):
                return b"".join(lines)
            lines.append(line[1:] if line.startswith(b"..") else line)


def _angle_address(command: str) -> str:
    """The address between the first ``<`` and ``>`` of MAIL FROM / RCPT TO."""
    match = re.search(r"<([^>]*)>", command)
    return match.group(1) if match else command.partition(":")[2].strip()


class SmtpSink:
    """An SMTP server in this process that records what it receives."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port
        self.hostname = f"sink-{name}.{TEST_DOMAIN}"
        self._lock = threading.Lock()
        self._messages: list[Received] = []

    @property
    def nexthop(self) -> str:
        return f"[127.0.0.1]:{self.port}"

    def record(self, sender: str, recipients: Sequence[str], data: bytes) -> None:
        parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
        headers = {
            name: str(parsed.get(name, "")).strip()
            for name in ("subject", "message-id", "from", "x-mailflow-case", "x-mailflow-side")
        }
        with self._lock:
            self._messages.append(Received(self.name, sender, tuple(recipients), headers))

    def messages(self) -> list[Received]:
        with self._lock:
            return list(self._messages)


@contextlib.contextmanager
def run_sink(name: str, port: int) -> Iterator[SmtpSink]:
    """Serve an :class:`SmtpSink` on 127.0.0.1:port until the block exits."""
    sink = SmtpSink(name, port)
    server = _SinkServer(("127.0.0.1", port), _SinkHandler)
    server.sink = sink
    thread = threading.Thread(target=server.serve_forever, name=f"sink-{name}", daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# ---------------------------------------------------------------------------
# SMTP client


@dataclass(frozen=True)
class SmtpReplies:
    """What the SMTP server answered to one session, step by step.

    Each reply is ``CODE TEXT`` with the queue id in ``queued as ID``
    replaced by ``QUEUEID``, so that two instances can be compared; a
    positive greeting or EHLO reply is only its code (its text is the
    instance's host name). None: the command was not sent.
    """

    connect: str
    helo: str | None = None
    mail: str | None = None
    rcpt: Mapping[str, str] = field(default_factory=dict)
    data: str | None = None

    def lines(self) -> tuple[str, ...]:
        def line(step: str, reply: str | None) -> str:
            return f"{step} {reply}" if reply is not None else f"{step} not sent"

        lines = [line("CONNECT", self.connect), line("HELO", self.helo), line("MAIL", self.mail)]
        lines += [f"RCPT <{address}> {reply}" for address, reply in self.rcpt.items()]
        lines.append(line("DATA", self.data))
        return tuple(lines)


def _reply(code: int, text: bytes | str, *, positive_code_only: bool = False) -> str:
    if positive_code_only and 200 <= code < 300:
        return str(code)
    message = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    message = re.sub(r"queued as [0-9A-Za-z]+", "queued as QUEUEID", message)
    return f"{code} {' '.join(message.split())}"


def send_mail(
    port: int,
    sender: str,
    recipients: Sequence[str],
    *,
    headers: Mapping[str, str],
    helo: str = DEFAULT_HELO,
    client_ip: str = DEFAULT_CLIENT_IP,
) -> SmtpReplies:
    """Send one message over SMTP; return every reply, 4xx/5xx included.

    Every command is sent whatever the reply to the one before (the
    server's answer to that is part of the comparison), except DATA,
    which is sent only when a recipient was accepted.
    """
    body = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    body += f"From: <{sender}>\r\nTo: undisclosed-recipients:;\r\n\r\nmail flow test\r\n"
    client = smtplib.SMTP(local_hostname=helo, source_address=(client_ip, 0), timeout=60)
    try:
        code, text = client.connect("127.0.0.1", port)
        connect_reply = _reply(code, text, positive_code_only=True)
        if code != 220:  # rejected in the greeting (smtpd_delay_reject = no)
            with contextlib.suppress(smtplib.SMTPException, OSError):
                client.quit()
            return SmtpReplies(connect_reply)
        helo_reply = _reply(*client.ehlo(helo), positive_code_only=True)
        mail_reply = _reply(*client.mail(sender))
        rcpt_replies = {address: _reply(*client.rcpt(address)) for address in recipients}
        data_reply: str | None = None
        if any(reply.startswith("2") for reply in rcpt_replies.values()):
            try:
                data_reply = _reply(*client.data(body.encode()))
            except smtplib.SMTPDataError as exc:  # no 354
                data_reply = _reply(exc.smtp_code, exc.smtp_error)
        with contextlib.suppress(smtplib.SMTPServerDisconnected):
            client.quit()
    finally:
        client.close()
    return SmtpReplies(connect_reply, helo_reply, mail_reply, rcpt_replies, data_reply)


# ---------------------------------------------------------------------------
# Private Postfix instances


def _master_cf(smtpd_port: int, smtpd_max_use: int | None = 1) -> str:
    """The system master.cf without chroot, smtpd moved to 127.0.0.1:PORT.

    No chroot: the daemons read table files and reach loopback servers
    directly, and nothing needs copying into a jail. ``smtpd_max_use``
    (default 1: no lookup cached from one test's session to the next)
    sets smtpd's max_use; None leaves Postfix's own.
    """
    lines: list[str] = []
    for line in Path("/etc/postfix/master.cf").read_text().splitlines():
        fields = line.split()
        if line.startswith(("#", " ", "\t")) or len(fields) < 8:
            lines.append(line)
            continue
        if fields[0] == "smtp" and fields[1] == "inet":
            fields[0] = f"127.0.0.1:{smtpd_port}"
            if smtpd_max_use is not None:
                fields.append(f"-o max_use={smtpd_max_use}")
        fields[4] = "n"
        lines.append("  ".join(fields))
    return "\n".join(lines) + "\n"


def base_main_cf(name: str, root: Path) -> dict[str, str]:
    """main.cf settings every instance gets; a scenario may override any."""
    return {
        "compatibility_level": "3.6",
        "queue_directory": str(root / "queue"),
        "data_directory": str(root / "data"),
        "maillog_file": str(root / "maillog"),
        "maillog_file_prefixes": str(root),
        "syslog_name": f"postfix-{name}",
        "myhostname": f"{name}.{TEST_DOMAIN}",
        "mydomain": TEST_DOMAIN,
        "myorigin": "$myhostname",
        "mydestination": "",
        "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "alias_maps": "",
        "alias_database": "",
        "local_recipient_maps": "",
        "relay_domains": "",
        "recipient_delimiter": "+",
        "biff": "no",
        "append_dot_mydomain": "no",
        "smtp_dns_support_level": "disabled",
        "smtp_host_lookup": "native",
        "smtpd_peername_lookup": "no",
        "queue_run_delay": "1s",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "2s",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtpd_recipient_restrictions": "permit_mynetworks, reject_unauth_destination",
    }


@dataclass
class PostfixInstance:
    """A private Postfix: every file of it lives under ``root``."""

    name: str
    root: Path
    smtpd_port: int
    master_pid: int = 0
    _stopped: bool = field(default=False, repr=False)

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"

    def log_offset(self) -> int:
        try:
            return self.maillog.stat().st_size
        except FileNotFoundError:
            return 0

    def log(self, since: int = 0) -> str:
        try:
            with self.maillog.open("rb") as stream:
                stream.seek(since)
                return stream.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _run(self, command: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [command[0], "-c", str(self.config_dir), *command[1:]],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def queue(self) -> list[dict[str, object]]:
        """``postqueue -j``: one object per queued message."""
        completed = self._run([POSTQUEUE, "-j"])
        assert completed.returncode == 0, completed.stderr
        return [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]

    def settled(self) -> bool:
        """Nothing waits for its first delivery attempt: every queued message is deferred."""
        return all(entry.get("queue_name") in ("deferred", "hold") for entry in self.queue())

    def flush(self) -> None:
        """``postqueue -f``: attempt to deliver every queued message now."""
        completed = self._run([POSTQUEUE, "-f"])
        assert completed.returncode == 0, completed.stderr

    def release_held(self) -> None:
        """``postsuper -H ALL``: release every message on hold."""
        completed = self._run([POSTSUPER, "-H", "ALL"])
        assert completed.returncode == 0, completed.stderr

    def purge(self) -> None:
        """``postsuper -d ALL``: delete every queued message."""
        completed = self._run([POSTSUPER, "-d", "ALL"])
        assert completed.returncode == 0, completed.stderr

    def request_stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._run([POSTFIX, "stop"])

    def wait_stopped(self, timeout: float = POSTFIX_TIMEOUT) -> None:
        """Wait for the master to exit; SIGKILL its process group when it does not."""
        if not self.master_pid:
            return
        deadline = time.monotonic() + timeout
        while _alive(self.master_pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.master_pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.master_pid, signal.SIGKILL)
                break
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (the master is not our child,
    # but be safe).
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


@contextlib.contextmanager
def run_postfix(
    name: str,
    root: Path,
    smtpd_port: int,
    main_cf: Mapping[str, str],
    *,
    smtpd_max_use: int | None = 1,
) -> Iterator[PostfixInstance]:
    """Start a private Postfix under ``root``; always stop it afterwards.

    ``smtpd_max_use``: as :func:`_master_cf` (a benchmark passes None to
    run Postfix as deployed).

    ``main_cf`` is applied over :func:`base_main_cf`. The directories are
    world-readable (Postfix daemons read table files after dropping to
    user postfix); data_directory belongs to postfix, as Postfix requires.
    """
    instance = PostfixInstance(name, root, smtpd_port)
    for directory in (root, instance.config_dir, root / "queue", root / "data"):
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
    postfix_user = pwd.getpwnam("postfix")
    os.chown(root / "data", postfix_user.pw_uid, postfix_user.pw_gid)
    settings = {**base_main_cf(name, root), **main_cf}
    (instance.config_dir / "main.cf").write_text(
        "".join(f"{key} = {value}\n" for key, value in settings.items())
    )
    (instance.config_dir / "master.cf").write_text(_master_cf(smtpd_port, smtpd_max_use))
    # Postfix waits up to ~2 s for a just-written main.cf to settle.
    age_file(instance.config_dir / "main.cf")
    age_file(instance.config_dir / "master.cf")
    try:
        started = instance._run([POSTFIX, "start"])
        pid_file = root / "queue" / "pid" / "master.pid"
        if pid_file.exists():
            instance.master_pid = int(pid_file.read_text().split()[0])
        if started.returncode != 0:
            raise AssertionError(
                f"postfix {name} did not start: {started.stdout}{started.stderr}\n"
                f"maillog:\n{instance.log()}"
            )
        wait_for_connect("127.0.0.1", smtpd_port, timeout=POSTFIX_TIMEOUT)
        yield instance
    finally:
        try:
            instance.request_stop()
        finally:
            instance.wait_stopped()


# ---------------------------------------------------------------------------
# The differential scenario

TomlValue = str | int | bool | Sequence[str]

#: ``<table:NAME>`` and ``<sink:NAME>`` in main.cf values and table data.
_PLACEHOLDER = re.compile(r"<(table|sink):([A-Za-z0-9_-]+)>")


@dataclass(frozen=True)
class Table:
    """One lookup table, the same on both sides.

    ``entries`` are seeded into both memcacheds (through ``key_format =
    NAME:%s``); ``backup`` becomes a texthash file named in the .cf that
    both sides read; ``cf`` adds memcache_table(5) parameters; ``bridge``
    adds bridge-only keys to ``[tables.NAME]``. Values may name sinks as
    ``<sink:NAME>`` (replaced by the sink's port).
    """

    name: str
    entries: Mapping[str, str] = field(default_factory=dict)
    backup: Mapping[str, str] | None = None
    cf: Mapping[str, str] = field(default_factory=dict)
    bridge: Mapping[str, TomlValue] = field(default_factory=dict)
    protocol: Literal["socketmap", "tcp"] = "socketmap"
    memcached: str = "main"

    def memcache_key(self, key: str) -> bytes:
        return f"{self.name}:{key}".encode()


@dataclass(frozen=True)
class ScenarioSpec:
    """Two Postfix instances, their tables and sinks.

    ``main_cf`` applies to both instances, with ``<table:NAME>`` replaced
    by ``memcache:/path/NAME.cf`` on the native side and by the bridge's
    socketmap or tcp address on the other; ``native_main_cf`` and
    ``bridge_main_cf`` apply to one side only. The relayhost is the
    ``default`` sink unless main_cf says otherwise.
    """

    name: str
    tables: Sequence[Table]
    main_cf: Mapping[str, str]
    native_main_cf: Mapping[str, str] = field(default_factory=dict)
    bridge_main_cf: Mapping[str, str] = field(default_factory=dict)
    sinks: Sequence[str] = ("default",)


@dataclass(frozen=True)
class SideOutcome:
    """What one Postfix instance did with one test mail."""

    replies: tuple[str, ...]
    delivered: tuple[str, ...]
    queued: tuple[str, ...]

    def summary(self, sender: str) -> str:
        """One line for the closing table: refusals, deliveries, what is still queued."""
        parts = [
            line
            for line in self.replies
            if not line.endswith(" not sent")
            and not re.match(r"(CONNECT|HELO|MAIL|RCPT <[^>]*>|DATA) 2\d\d\b", line)
        ]
        parts += [line.replace(f"<{sender}> -> ", "") for line in self.delivered]
        parts += [f"queued {entry}" for entry in self.queued]
        return "; ".join(parts) or "nothing"


@dataclass(frozen=True)
class CaseResult:
    case: str
    sender: str
    native: SideOutcome
    bridge: SideOutcome
    #: Where each instance's maillog stood when the case began (for failure messages).
    log_offsets: Mapping[str, int] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ResultRow:
    """One line of the native-vs-bridge table printed at the end of the run."""

    scenario: str
    case: str
    native: str
    bridge: str
    same: bool


#: Every compared case of the session, for the closing table.
RESULTS: list[ResultRow] = []


@dataclass
class Side:
    name: str
    postfix: PostfixInstance
    memcached: dict[str, Memcached]


def _toml(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(json.dumps(item) for item in value) + "]"


class Scenario:
    """A running differential scenario; built by :func:`run_scenario`."""

    def __init__(self, spec: ScenarioSpec, root: Path, ports: Ports, stack: contextlib.ExitStack):
        self.spec = spec
        self.root = root
        self._ports = ports
        self._stack = stack
        self.sinks: dict[str, SmtpSink] = {}
        self.sides: dict[str, Side] = {}
        self.bridge: Bridge | None = None
        self._memcached: dict[tuple[str, str], Memcached] = {}
        self._memcached_stacks: dict[tuple[str, str], contextlib.ExitStack] = {}
        self._memcached_ports: dict[tuple[str, str], int] = {}

    # -- set-up ------------------------------------------------------------

    def _expand(self, text: str, table_spec: Callable[[str], str] | None = None) -> str:
        def replace(match: re.Match[str]) -> str:
            kind, name = match.groups()
            if kind == "sink":
                return str(self.sinks[name].port)
            assert table_spec is not None, f"{match.group(0)} outside main.cf"
            return table_spec(name)

        return _PLACEHOLDER.sub(replace, text)

    def _start(self) -> None:
        spec = self.spec
        for name in spec.sinks:
            self.sinks[name] = self._stack.enter_context(run_sink(name, self._ports()))
        groups = sorted({table.memcached for table in spec.tables})
        for side in ("native", "bridge"):
            for group in groups:
                self._memcached_ports[side, group] = self._ports()
                self.start_memcached(group, sides=(side,), seed=False)

        cf_dir = self.root / "tables"
        cf_dir.mkdir()
        cf_dir.chmod(0o755)
        socketmap_port = self._ports()
        listen = [
            f'[[listen]]\nendpoint = "inet:127.0.0.1:{socketmap_port}"\nprotocol = "socketmap"\n'
        ]
        bridge_specs: dict[str, str] = {}
        sections: list[str] = []
        for table in spec.tables:
            native_port = self._memcached_ports["native", table.memcached]
            bridge_port = self._memcached_ports["bridge", table.memcached]
            cf = {
                "memcache": f"inet:127.0.0.1:{native_port}",
                "key_format": f"{table.name}:%s",
                **{key: self._expand(value) for key, value in table.cf.items()},
            }
            if table.backup is not None:
                backup = cf_dir / f"{table.name}.backup"
                backup.write_text(
                    "".join(f"{k} {self._expand(v)}\n" for k, v in table.backup.items())
                )
                backup.chmod(0o644)
                age_file(backup)
                cf["backup"] = f"texthash:{backup}"
            cf_path = cf_dir / f"{table.name}.cf"
            cf_path.write_text("".join(f"{key} = {value}\n" for key, value in cf.items()))
            cf_path.chmod(0o644)
            age_file(cf_path)
            section = [
                f"[tables.{table.name}]",
                f"config = {_toml(str(cf_path))}",
                f'memcache = "inet:127.0.0.1:{bridge_port}"',
            ]
            section += [f"{key} = {_toml(value)}" for key, value in table.bridge.items()]
            sections.append("\n".join(section) + "\n")
            if table.protocol == "tcp":
                port = self._ports()
                listen.append(
                    f'[[listen]]\nendpoint = "inet:127.0.0.1:{port}"\nprotocol = "tcp"\n'
                    f"table = {_toml(table.name)}\n"
                )
                bridge_specs[table.name] = f"tcp:127.0.0.1:{port}"
            else:
                bridge_specs[table.name] = f"socketmap:inet:127.0.0.1:{socketmap_port}:{table.name}"
        config = self.root / "bridge.toml"
        config.write_text("\n".join(listen + sections))
        for group in groups:
            self.seed(group)
        self.bridge = self._stack.enter_context(run_bridge(config))

        smtpd_ports = {side: self._ports() for side in ("native", "bridge")}
        for side, extra in (("native", spec.native_main_cf), ("bridge", spec.bridge_main_cf)):

            def table_spec(name: str, side: str = side) -> str:
                if side == "native":
                    return f"memcache:{cf_dir / name}.cf"
                return bridge_specs[name]

            settings = {"relayhost": "[127.0.0.1]:<sink:default>", **spec.main_cf, **extra}
            main_cf = {key: self._expand(value, table_spec) for key, value in settings.items()}
            instance = self._stack.enter_context(
                run_postfix(side, self.root / side, smtpd_ports[side], main_cf)
            )
            self.sides[side] = Side(
                side,
                instance,
                {group: self._memcached[side, group] for group in groups},
            )
        # Stop both instances at once at the end (a master takes ~1 s to exit).
        self._stack.callback(self._request_stop_all)

    def _request_stop_all(self) -> None:
        for side in self.sides.values():
            side.postfix.request_stop()

    # -- memcached ---------------------------------------------------------

    def start_memcached(
        self, group: str, *, sides: Sequence[str] = ("native", "bridge"), seed: bool = True
    ) -> None:
        """(Re)start the memcached of ``group`` on its port, empty; seed it."""
        for side in sides:
            stack = contextlib.ExitStack()
            server = stack.enter_context(run_memcached(self._memcached_ports[side, group]))
            self._stack.callback(stack.close)
            self._memcached_stacks[side, group] = stack
            self._memcached[side, group] = server
            if side in self.sides:
                self.sides[side].memcached[group] = server
        if seed:
            self.seed(group, sides=sides)

    def stop_memcached(self, group: str, *, sides: Sequence[str] = ("native", "bridge")) -> None:
        """Kill the memcached of ``group``: an outage."""
        for side in sides:
            self._memcached_stacks.pop((side, group)).close()

    def memcached_running(self, group: str) -> bool:
        return all((side, group) in self._memcached_stacks for side in ("native", "bridge"))

    def seed(self, group: str, *, sides: Sequence[str] = ("native", "bridge")) -> None:
        """Store every table entry of ``group`` in its memcacheds."""
        for side in sides:
            server = self._memcached[side, group]
            for table in self.spec.tables:
                if table.memcached == group:
                    for key, value in table.entries.items():
                        server.set(table.memcache_key(key), self._expand(value).encode())

    def items(self, side: str) -> dict[str, dict[bytes, tuple[int, bytes]]]:
        """Per memcached group: every item (flags, value) of that side.

        ``Memcached.items()`` (``lru_crawler metadump``) misses items that
        were just read (memcached is moving them between LRU segments), so
        every key any table could hold (seeded or in a backup, which is
        all a refill can store) and every key either side's dump lists is
        asked with ``get``.
        """
        result: dict[str, dict[bytes, tuple[int, bytes]]] = {}
        for group, server in self.sides[side].memcached.items():
            if not self.memcached_running(group):
                continue
            keys: set[bytes] = set()
            for table in self.spec.tables:
                if table.memcached == group:
                    known = [*table.entries, *(table.backup or {})]
                    keys.update(table.memcache_key(key.lower()) for key in known)
            for other in self.sides.values():
                keys.update(other.memcached[group].items())
            found = {key: server.get(key) for key in sorted(keys)}
            result[group] = {key: item for key, item in found.items() if item is not None}
        return result

    # -- mail --------------------------------------------------------------

    def send(
        self,
        case: str,
        sender: str,
        recipients: Sequence[str],
        *,
        helo: str = DEFAULT_HELO,
        client_ip: str = DEFAULT_CLIENT_IP,
    ) -> CaseResult:
        """Send the same mail to both instances; wait until each delivered or deferred it.

        ``case`` must be unique in the session: the sinks find the mail by it.
        """
        replies: dict[str, SmtpReplies] = {}
        offsets = {name: side.postfix.log_offset() for name, side in self.sides.items()}
        for name, side in self.sides.items():
            replies[name] = send_mail(
                side.postfix.smtpd_port,
                sender,
                recipients,
                headers={
                    "Subject": f"{case} via {name}",
                    "Message-ID": f"<{case}.{name}@{TEST_DOMAIN}>",
                    "X-Mailflow-Case": case,
                    "X-Mailflow-Side": name,
                },
                helo=helo,
                client_ip=client_ip,
            )
        self.wait_settled(f"case {case}", offsets)
        return CaseResult(
            case,
            sender,
            self.outcome("native", case, sender, replies["native"]),
            self.outcome("bridge", case, sender, replies["bridge"]),
            offsets,
        )

    def wait_settled(self, what: str, offsets: Mapping[str, int] | None = None) -> None:
        """Wait until neither instance has mail that was not yet tried."""
        wait_until(
            lambda: all(side.postfix.settled() for side in self.sides.values()),
            timeout=SETTLE_TIMEOUT,
            what=f"{what}: both queues delivered or deferred",
            details=lambda: self.diagnostics(offsets),
        )

    def wait_deferred(self, what: str) -> None:
        """Wait until every queued recipient on both sides was tried and deferred."""

        def deferred(side: Side) -> bool:
            entries = side.postfix.queue()
            for entry in entries:
                recipients = entry.get("recipients")
                if entry.get("queue_name") != "deferred" or not isinstance(recipients, list):
                    return False
                if not all(isinstance(r, dict) and r.get("delay_reason") for r in recipients):
                    return False
            return bool(entries)

        wait_until(
            lambda: all(deferred(side) for side in self.sides.values()),
            timeout=SETTLE_TIMEOUT,
            what=f"{what}: queued mail tried and deferred on both sides",
            details=self.diagnostics,
        )

    def delivered(self, side: str, case: str, sender: str) -> tuple[str, ...]:
        """Per recipient: ``SINK: <SENDER> -> <RECIPIENT>``, sorted; bounces included."""
        lines: list[str] = []
        for sink in self.sinks.values():
            for message in sink.messages():
                ours = message.case == case or (
                    message.sender == "" and sender in message.recipients
                )
                if ours and message.side == side:
                    lines += [
                        f"{sink.name}: <{message.sender}> -> <{r}>" for r in message.recipients
                    ]
        return tuple(sorted(lines))

    def queued(self, side: str, sender: str) -> tuple[str, ...]:
        lines: list[str] = []
        for entry in self.sides[side].postfix.queue():
            if entry.get("sender") != sender:
                continue
            recipients = entry.get("recipients")
            assert isinstance(recipients, list)
            for recipient in recipients:
                assert isinstance(recipient, dict)
                line = f"<{recipient.get('address')}> ({entry.get('queue_name')}"
                reason = recipient.get("delay_reason")
                lines.append(f"{line}: {reason})" if reason else f"{line})")
        return tuple(sorted(lines))

    def recheck(self, result: CaseResult) -> CaseResult:
        """The same case (same SMTP replies) with what the sinks and queues hold now."""
        return CaseResult(
            result.case,
            result.sender,
            SideOutcome(
                result.native.replies,
                self.delivered("native", result.case, result.sender),
                self.queued("native", result.sender),
            ),
            SideOutcome(
                result.bridge.replies,
                self.delivered("bridge", result.case, result.sender),
                self.queued("bridge", result.sender),
            ),
            result.log_offsets,
        )

    def outcome(self, side: str, case: str, sender: str, replies: SmtpReplies) -> SideOutcome:
        return SideOutcome(
            replies.lines(), self.delivered(side, case, sender), self.queued(side, sender)
        )

    def diagnostics(self, offsets: Mapping[str, int] | None = None) -> str:
        parts: list[str] = []
        for name, side in self.sides.items():
            since = offsets.get(name, 0) if offsets else 0
            parts.append(f"--- {name} maillog ---\n{side.postfix.log(since)}")
            parts.append(f"--- {name} queue ---\n{side.postfix.queue()}")
        if self.bridge is not None:
            parts.append("--- bridge log (last 40 lines) ---\n" + "".join(self.bridge.log[-40:]))
        return "\n".join(parts)

    # -- checks ------------------------------------------------------------

    def check(
        self,
        result: CaseResult,
        *,
        delivered: Mapping[str, Sequence[str]] | None = None,
        rcpt: Mapping[str, int] | None = None,
        connect: int | None = None,
        helo: int | None = None,
        mail: int | None = None,
        data: int | None = None,
        queued: Sequence[str] = (),
        bounced: bool = False,
    ) -> None:
        """Assert native Postfix did what the test expects, then that the bridge did the same.

        ``delivered`` maps sink name to the recipients it must have received
        from the case's sender; ``bounced``: one bounce (sender ``<>``) to
        the case's sender must have reached the default sink, and none
        must otherwise; ``rcpt`` maps recipient to its RCPT reply code;
        ``connect``, ``helo``, ``mail``, ``data`` are the codes of those
        steps; ``queued`` lists recipients that must still be in the queue.
        Afterwards both memcacheds must hold the same items.
        """
        RESULTS.append(
            ResultRow(
                self.spec.name,
                result.case,
                result.native.summary(result.sender),
                result.bridge.summary(result.sender),
                result.native == result.bridge,
            )
        )
        native = result.native
        problems: list[str] = []
        if delivered is not None:
            expected = sorted(
                [
                    f"{sink}: <{result.sender}> -> <{address}>"
                    for sink, addresses in delivered.items()
                    for address in addresses
                ]
                + ([f"default: <> -> <{result.sender}>"] if bounced else [])
            )
            if list(native.delivered) != expected:
                problems.append(f"delivered {list(native.delivered)}, expected {expected}")
        expected_codes = {f"RCPT <{address}>": code for address, code in (rcpt or {}).items()}
        for step, code in (("CONNECT", connect), ("HELO", helo), ("MAIL", mail), ("DATA", data)):
            if code is not None:
                expected_codes[step] = code
        for step, code in expected_codes.items():
            line = next((x for x in native.replies if x.startswith(f"{step} ")), "")
            if not re.match(rf"{re.escape(step)} {code}\b", line):
                problems.append(f"{line!r}, expected {step} {code}")
        expected_queued = sorted(f"<{address}>" for address in queued)
        actual_queued = sorted(entry.split(" ")[0] for entry in native.queued)
        if actual_queued != expected_queued:
            problems.append(f"queued {list(native.queued)}, expected {expected_queued}")
        details = self.diagnostics(result.log_offsets)
        assert not problems, (
            f"native Postfix ({result.case}) did not do what the test expects "
            f"(the test is wrong, not the bridge): {problems}\n{native}\n{details}"
        )
        assert result.bridge == native, (
            f"{result.case}: the bridge side differs from native memcache:\n"
            f"native: {native}\nbridge: {result.bridge}\n{details}"
        )
        self.check_items()

    def check_items(self) -> None:
        native, bridge = self.items("native"), self.items("bridge")
        assert bridge == native, f"memcache items differ:\nnative: {native}\nbridge: {bridge}"


@contextlib.contextmanager
def run_scenario(spec: ScenarioSpec, root: Path, ports: Ports) -> Iterator[Scenario]:
    """Start sinks, memcacheds, the bridge and both Postfix instances; stop them all after."""
    root.mkdir()
    root.chmod(0o755)
    with contextlib.ExitStack() as stack:
        scenario = Scenario(spec, root, ports, stack)
        scenario._start()
        yield scenario
