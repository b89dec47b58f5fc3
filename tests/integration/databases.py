"""Real database servers for the SQL tests: PostgreSQL 15 and MariaDB, throwaway instances.

Each server lives in its own temporary directory (data, unix socket, log)
and listens on 127.0.0.1 on a port the kernel just handed out. The
directory is made traversable and owned by the server's system user
(``postgres``, ``mysql``): ``mkdtemp`` creates it 0700 for root, and
neither server runs as root. Readiness is a condition (``pg_ctl -w``,
``mariadb-admin ping``), never a fixed sleep. The context managers stop
the server whatever happens, also when start-up or the test fails.

A test can stop and start a server again on the same port and
directory (:meth:`Server.restart` in two halves), or freeze it with
SIGSTOP (:meth:`Server.pause`) to make every query hang.

Set-up SQL runs as the superuser over the unix socket; the tables the
tests query are reached by an ordinary user with a password over TCP,
as Postfix's clients reach them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.harness import STARTUP_TIMEOUT, free_port

#: The login the tests' tables are read with, and its password (with
#: characters that need quoting in a conninfo string and a URI).
USER = "pf"
PASSWORD = "s3cr3t 'pw'\\x"
#: The database holding the tables.
DATABASE = "mail"


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


PG_BIN = _postgres_bin()
MARIADBD = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin")
MARIADB = shutil.which("mariadb")
MARIADB_ADMIN = shutil.which("mariadb-admin")
MARIADB_INSTALL_DB = shutil.which("mariadb-install-db")


def postgres_available() -> bool:
    return PG_BIN is not None and os.geteuid() == 0 and _has_user("postgres")


def mariadb_available() -> bool:
    tools = (MARIADBD, MARIADB, MARIADB_ADMIN, MARIADB_INSTALL_DB)
    return all(tools) and os.geteuid() == 0 and _has_user("mysql")


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _owned_tempdir(user: str, prefix: str) -> Path:
    """A fresh directory owned by ``user``, traversable by everyone (mkdtemp makes it 0700)."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    entry = pwd.getpwnam(user)
    os.chown(directory, entry.pw_uid, entry.pw_gid)
    directory.chmod(0o755)
    return directory


def _run(args: list[str], *, input_text: str | None = None, timeout: float = 60) -> str:
    completed = subprocess.run(
        args, input=input_text, capture_output=True, text=True, timeout=timeout, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args[:4])} ... failed ({completed.returncode}):\n"
            f"{completed.stdout}\n{completed.stderr}"
        )
    return completed.stdout


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ')'.
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue.extend(children.get(current, []))
    return found


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


@dataclass
class Server:
    """A running database server: where it listens and how to stop, start and freeze it."""

    directory: Path
    port: int
    host: str = "127.0.0.1"
    paused: list[int] = field(default_factory=list)

    def main_pid(self) -> int:
        raise NotImplementedError

    def pause(self) -> None:
        """SIGSTOP the server and all its processes: every query hangs until :meth:`resume`."""
        self.paused = _descendants(self.main_pid())
        _signal_all(self.paused, signal.SIGSTOP)

    def resume(self) -> None:
        _signal_all(self.paused, signal.SIGCONT)
        self.paused = []

    def stop(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError


@dataclass
class Postgres(Server):
    """A PostgreSQL cluster in ``directory/data``; the socket is in ``directory``."""

    def _as_postgres(self, *args: str, timeout: float = 60) -> str:
        assert PG_BIN is not None
        return _run(
            ["runuser", "-u", "postgres", "--", str(PG_BIN / args[0]), *args[1:]], timeout=timeout
        )

    def main_pid(self) -> int:
        return int((self.directory / "data" / "postmaster.pid").read_text().split()[0])

    def start(self) -> None:
        options = (
            f"-c listen_addresses={self.host} -p {self.port} -k {self.directory} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._as_postgres(
            "pg_ctl", "-D", str(self.directory / "data"), "-l", str(self.directory / "log"),
            "-w", "-t", str(int(STARTUP_TIMEOUT)), "-o", options, "start",
        )  # fmt: skip

    def stop(self) -> None:
        self.resume()
        self._as_postgres("pg_ctl", "-D", str(self.directory / "data"), "-m", "fast", "-w", "stop")

    def execute(self, sql: str, *, database: str = DATABASE) -> None:
        """Run set-up SQL as the superuser over the unix socket."""
        import psycopg  # noqa: PLC0415 - only where PostgreSQL tests run

        with psycopg.connect(
            host=str(self.directory), port=self.port, user="postgres", dbname=database,
            autocommit=True,
        ) as connection:  # fmt: skip
            connection.execute(sql.encode())

    @property
    def socket_directory(self) -> str:
        return str(self.directory)


@contextlib.contextmanager
def run_postgres() -> Iterator[Postgres]:
    """Initialise and start a PostgreSQL cluster; create the ``pf`` user and ``mail`` database."""
    assert PG_BIN is not None
    directory = _owned_tempdir("postgres", "bridge-pg-")
    server = Postgres(directory, free_port())
    started = False
    try:
        server._as_postgres(
            "initdb", "-D", str(directory / "data"), "-U", "postgres", "-E", "UTF8",
            "--locale=C.UTF-8", "--no-sync", "--auth-local=trust", "--auth-host=scram-sha-256",
        )  # fmt: skip
        server.start()
        started = True
        quoted = PASSWORD.replace("'", "''")
        server.execute(f"CREATE ROLE {USER} LOGIN PASSWORD '{quoted}'", database="postgres")
        server.execute(f"CREATE DATABASE {DATABASE} OWNER postgres", database="postgres")
        yield server
    finally:
        try:
            if started:
                server.stop()
        finally:
            _kill_leftovers(directory)
            shutil.rmtree(directory, ignore_errors=True)


def _kill_leftovers(directory: Path) -> None:
    """Kill a server that would not stop (its pid file names it)."""
    for pid_file in (directory / "data" / "postmaster.pid", directory / "pid"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pid_file.read_text().split()[0])
            _signal_all(_descendants(pid), signal.SIGCONT)
            _signal_all(_descendants(pid), signal.SIGKILL)


@dataclass
class MariaDB(Server):
    """A MariaDB server with its data in ``directory/data`` and its socket ``directory/sock``."""

    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return str(self.directory / "sock")

    def main_pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _client(self, program: str | None, *args: str) -> list[str]:
        assert program is not None
        return [program, "--no-defaults", f"--socket={self.socket}", "--user=root", *args]

    def start(self) -> None:
        assert MARIADBD is not None
        log = open(self.directory / "log", "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                MARIADBD, "--no-defaults", "--user=mysql", f"--datadir={self.directory / 'data'}",
                f"--socket={self.socket}", f"--port={self.port}", f"--bind-address={self.host}",
                f"--pid-file={self.directory / 'pid'}", "--skip-log-bin",
                "--innodb-flush-log-at-trx-commit=0", "--innodb-buffer-pool-size=16M",
                "--skip-name-resolve",
            ],
            stdout=log,
            stderr=log,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            ping = subprocess.run(
                self._client(MARIADB_ADMIN, "--connect-timeout=1", "ping"),
                capture_output=True,
                check=False,
            )
            if ping.returncode == 0:
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "mariadbd did not start:\n" + (self.directory / "log").read_text()
                )
            time.sleep(0.05)  # polling a condition (the ping), not waiting a fixed time

    def stop(self) -> None:
        self.resume()
        if self.process is None:
            return
        subprocess.run(self._client(MARIADB_ADMIN, "shutdown"), capture_output=True, check=False)
        try:
            self.process.wait(timeout=STARTUP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def execute(self, sql: str) -> None:
        """Run set-up SQL as root over the unix socket."""
        _run(self._client(MARIADB, "--default-character-set=utf8mb4"), input_text=sql)


@contextlib.contextmanager
def run_mariadb() -> Iterator[MariaDB]:
    """Install and start a MariaDB server; create the ``pf`` user and ``mail`` database."""
    assert MARIADB_INSTALL_DB is not None
    directory = _owned_tempdir("mysql", "bridge-mariadb-")
    server = MariaDB(directory, free_port())
    try:
        _run(
            [
                MARIADB_INSTALL_DB, "--no-defaults", "--user=mysql",
                f"--datadir={directory / 'data'}", "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ]
        )  # fmt: skip
        server.start()
        quoted = PASSWORD.replace("\\", "\\\\").replace("'", "\\'")
        server.execute(
            f"CREATE DATABASE {DATABASE} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;\n"
            f"CREATE USER '{USER}'@'127.0.0.1' IDENTIFIED BY '{quoted}';\n"
            f"CREATE USER '{USER}'@'localhost' IDENTIFIED BY '{quoted}';\n"
            f"GRANT SELECT, EXECUTE ON {DATABASE}.* TO '{USER}'@'127.0.0.1';\n"
            f"GRANT SELECT, EXECUTE ON {DATABASE}.* TO '{USER}'@'localhost';\n"
        )
        yield server
    finally:
        try:
            server.stop()
        finally:
            _kill_leftovers(directory)
            shutil.rmtree(directory, ignore_errors=True)
