"""systemd's side of the two protocols, for tests: socket activation and sd_notify.

:func:`spawn_activated` does what systemd does for a socket-activated
service, without systemd: the test binds the listening sockets (with the
mode and owner a .socket unit would give them), and a tiny launcher moves
them to descriptors 3, 4, ..., sets ``LISTEN_FDS``, ``LISTEN_FDNAMES`` and
``LISTEN_PID`` to its own pid, and execs the command in place, so the pid
stays and the exec'd program finds ``LISTEN_PID == getpid()``.

:class:`NotifyReceiver` is the service manager's notification socket: a
datagram socket with SO_PASSCRED, so each message carries the sender's
pid as the kernel saw it (systemd's NotifyAccess=main accepts messages
from the main pid only).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Runs in the child between fork and the exec of the real command.
#: Sources are first moved above the target range so that moving one to
#: 3 + i never overwrites another that is still to be moved.
LAUNCHER = r"""
import fcntl, os, sys
count = int(sys.argv[1])
names = sys.argv[2]
sources = [int(arg) for arg in sys.argv[3 : 3 + count]]
command = sys.argv[3 + count + 1 :]
parked = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in sources]
for fd in sources:
    os.close(fd)
for index, fd in enumerate(parked):
    os.dup2(fd, 3 + index, inheritable=True)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(count)
os.environ["LISTEN_PID"] = str(os.getpid())
if names != "-":
    os.environ["LISTEN_FDNAMES"] = names
os.execv(command[0], command)
"""

#: Where the bridge package lives, for children that import it.
REPO_ROOT = Path(__file__).resolve().parent.parent


def spawn_activated(
    command: Sequence[str],
    sockets: Sequence[socket.socket | int],
    *,
    names: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[str]:
    """Start ``command`` with ``sockets`` passed as descriptors 3, 4, ....

    Args:
      command: the program and its arguments (argv[0] is a path).
      sockets: the sockets (or raw descriptors) to pass, in order.
      names: LISTEN_FDNAMES entries; None = leave the variable unset.
      env: the child's environment (the activation variables are added).

    Returns:
      The process, whose pid is the activated program's pid; stdout is
      discarded and stderr is a text pipe.
    """
    fds = [item if isinstance(item, int) else item.fileno() for item in sockets]
    names_arg = "-" if names is None else ":".join(names)
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            LAUNCHER,
            str(len(fds)),
            names_arg,
            *map(str, fds),
            "--",
            *command,
        ],
        pass_fds=fds,
        env=dict(os.environ if env is None else env),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def listening_unix_socket(path: Path, *, mode: int = 0o600) -> socket.socket:
    """Bind and listen on a unix socket with ``mode``, as a .socket unit does."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, mode)
    sock.listen(16)
    return sock


@dataclass(frozen=True, slots=True)
class Notification:
    """One datagram received on the notification socket."""

    #: The sender's pid, from the kernel (SCM_CREDENTIALS), not from the text.
    pid: int
    text: str

    @property
    def fields(self) -> dict[str, str]:
        fields: dict[str, str] = {}
        for line in self.text.split("\n"):
            name, _, value = line.partition("=")
            if name:
                fields[name] = value
        return fields


_UCRED = struct.Struct("=iII")


class NotifyReceiver:
    """A service manager's notification socket at ``address`` (path or ``\\0abstract``)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.received: list[Notification] = []

    @property
    def environment_value(self) -> str:
        """The ``NOTIFY_SOCKET`` value naming this socket."""
        if self.address.startswith("\0"):
            return "@" + self.address[1:]
        return self.address

    def receive(self, timeout: float) -> Notification:
        """The next datagram.

        Raises:
          TimeoutError: none arrived within ``timeout`` seconds.
        """
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(_UCRED.size))
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(payload[: _UCRED.size])[0]
        notification = Notification(pid, data.decode("utf-8"))
        self.received.append(notification)
        return notification

    def wait_for(self, assignment: str, timeout: float = 20.0) -> Notification:
        """Receive until a datagram holds ``assignment`` (e.g. ``READY=1``) as a line.

        Raises:
          AssertionError: it did not arrive in time (the message lists what did).
        """
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                notification = self.receive(remaining)
            except TimeoutError:
                break
            if assignment in notification.text.split("\n"):
                return notification
        seen = [n.text for n in self.received]
        raise AssertionError(f"no {assignment!r} within {timeout}s; got {seen}")

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("\0"):
            Path(self.address).unlink(missing_ok=True)
