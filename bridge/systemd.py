"""systemd integration: readiness notification and socket activation.

Theory of operation
-------------------
Both systemd protocols are small enough to speak without libsystemd:

* **Notification** (sd_notify(3)). ``$NOTIFY_SOCKET`` names an AF_UNIX
  datagram socket, a path (``/run/systemd/notify``) or an abstract name
  (``@name``). Each datagram is newline-separated ``VAR=value``
  assignments. The bridge sends ``READY=1`` once every listener is bound
  and accepting (``Type=notify``), ``RELOADING=1`` (with
  ``MONOTONIC_USEC=``) then ``READY=1`` around a SIGHUP reload, and
  ``STOPPING=1`` when it starts shutting down. :func:`notify` is a no-op
  returning False when the variable is unset, so the daemon runs the same
  way by hand, in Docker or under systemd.

* **Socket activation** (sd_listen_fds(3)). The service manager binds the
  listening sockets itself (as root, with the ``SocketUser=`` and
  ``SocketMode=`` of the .socket unit) and passes them as file descriptors
  3, 4, ... with ``LISTEN_FDS=n`` and ``LISTEN_PID=`` the pid they are
  meant for. :func:`inherited_sockets` takes them over, once, and removes
  the variables so that no child process takes them for its own.

The bridge's configuration stays the single description of what it serves:
each inherited socket is matched to a configured ``[[listen]]`` endpoint
by the address it is bound to (:func:`match_listener`,
:func:`assign_inherited`); such a listener uses the inherited socket and
is neither bound, chmod'ed, chown'ed nor unlinked by the bridge. A
configured listener without an inherited socket is bound as usual. An
inherited socket that matches no listener is closed with a warning: it
would otherwise accept connections that nobody answers.

Matching rules (why they are strict): an inherited wildcard socket
(``0.0.0.0``) never stands in for a configured specific address, because
adopting it would expose the service on every interface while the
configuration says, e.g., loopback. The one wildcard equivalence is a
dual-stack ``[::]`` socket (systemd's ``ListenStream=PORT``), which does
serve a configured ``0.0.0.0``. IPv6 addresses match only with the same
scope (interface), and IPv4-mapped IPv6 addresses match their IPv4 form.

Nothing here uses trio: these functions run before the event loop starts
(activation) or take microseconds (one datagram to a local socket).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from bridge.endpoint import Endpoint, InetEndpoint, UnixEndpoint

_log = logging.getLogger("bridge.systemd")

#: The first passed file descriptor: 0-2 are stdin, stdout and stderr
#: (SD_LISTEN_FDS_START in sd-daemon.h).
SD_LISTEN_FDS_START = 3

#: The name systemd reports for a descriptor when LISTEN_FDNAMES is unset,
#: as sd_listen_fds_with_names(3) does.
UNKNOWN_FD_NAME = "unknown"

#: The variables of socket activation; removed after reading so that
#: forked workers and any program the bridge runs do not inherit them.
_ACTIVATION_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

#: Most descriptors accepted from LISTEN_FDS: far above any real .socket
#: unit, and it keeps a corrupt value from allocating millions of entries.
MAX_LISTEN_FDS = 4096

#: Longest wait to hand a datagram to the service manager. systemd reads
#: its notification socket promptly; a full queue this long means it is
#: stuck, and the event loop must not stall behind it.
NOTIFY_TIMEOUT = 2.0

#: The service is ready: every listener accepts (Type=notify startup ends).
READY = "READY=1"

#: The service is shutting down (systemd shows "deactivating").
STOPPING = "STOPPING=1"

_IPV6_ANY = IPv6Address("::")
_IPV4_ANY = IPv4Address("0.0.0.0")


class ActivationError(OSError):
    """The socket-activation variables are malformed or name unusable descriptors.

    A subclass of OSError so that callers treating a failed bind as fatal
    treat a broken hand-over from the service manager the same way.
    """


# --------------------------------------------------------------- notification


def notify_address(value: str) -> str | None:
    """Where a ``$NOTIFY_SOCKET`` value points, as an AF_UNIX address.

    Args:
      value: the variable's value.

    Returns:
      The filesystem path, or the abstract name with its leading NUL
      (``@name`` -> ``"\\0name"``); None for an empty value or a form the
      bridge does not speak (``vsock:``, relative paths), which
      sd_notify(3) also refuses apart from vsock.
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def notify(message: str) -> bool:
    """Send one notification datagram to the service manager.

    Args:
      message: newline-separated assignments, e.g. :data:`READY`,
        ``ready_message(...)``, :data:`STOPPING`.

    Returns:
      True if the datagram was handed over; False when ``$NOTIFY_SOCKET``
      is unset (not started by systemd with Type=notify) or sending failed
      (logged: a lost READY=1 makes systemd time the start out, and the
      log says why).
    """
    value = os.environ.get("NOTIFY_SOCKET", "")
    address = notify_address(value)
    if address is None:
        if value:
            _log.warning("NOTIFY_SOCKET=%r is not a unix socket address; not notifying", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(NOTIFY_TIMEOUT)
            sock.sendto(message.encode("utf-8"), address)
    except OSError as exc:
        _log.warning("cannot notify the service manager at %s: %s", value, exc)
        return False
    return True


def ready_message(status: str | None = None) -> str:
    """``READY=1``, with a ``STATUS=`` line that ``systemctl status`` shows.

    Args:
      status: one line of free text; newlines (which would start another
        assignment) become spaces.

    Returns:
      The message for :func:`notify`.
    """
    if status is None:
        return READY
    return f"{READY}\nSTATUS={_one_line(status)}"


def reloading_message(monotonic_usec: int | None = None) -> str:
    """``RELOADING=1`` with the ``MONOTONIC_USEC=`` that systemd 253+ expects.

    systemd matches the reload to the time it sent SIGHUP
    (Type=notify-reload needs the timestamp; older versions ignore it).
    After the reload, success or not, the daemon sends :func:`ready_message`
    again: the old configuration keeps serving when the new one is invalid.

    Args:
      monotonic_usec: CLOCK_MONOTONIC in microseconds; None = now.

    Returns:
      The message for :func:`notify`.
    """
    if monotonic_usec is None:
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}"


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


# ---------------------------------------------------------- socket activation


@dataclass(frozen=True, slots=True)
class ListenFd:
    """One descriptor passed by the service manager, with its LISTEN_FDNAMES name."""

    fd: int
    name: str


@dataclass(frozen=True, slots=True)
class InheritedSocket:
    """A socket taken over from the service manager."""

    sock: socket.socket
    #: FileDescriptorName= of the .socket unit (default: the unit's name).
    name: str


def parse_listen_fds(environ: Mapping[str, str], pid: int) -> list[ListenFd]:
    """Which descriptors the service manager passed to process ``pid``.

    The rules of sd_listen_fds(3): no ``LISTEN_PID``, or one naming another
    process (the variables leaked from a parent), means nothing was passed
    to us; ``LISTEN_FDS=n`` means descriptors 3 .. 3+n-1; the optional
    ``LISTEN_FDNAMES`` holds one colon-separated name per descriptor.

    Args:
      environ: the environment to read (not changed).
      pid: this process's pid.

    Returns:
      The passed descriptors, in order; empty when none were passed.

    Raises:
      ActivationError: LISTEN_PID or LISTEN_FDS is not a number, LISTEN_FDS
        is negative or above :data:`MAX_LISTEN_FDS`, or LISTEN_FDNAMES has a
        different number of names.
    """
    pid_text = environ.get("LISTEN_PID")
    if pid_text is None:
        return []
    if _parse_decimal(pid_text, "LISTEN_PID") != pid:
        return []
    count_text = environ.get("LISTEN_FDS")
    if count_text is None:
        return []
    count = _parse_decimal(count_text, "LISTEN_FDS")
    if count > MAX_LISTEN_FDS:
        raise ActivationError(f"LISTEN_FDS={count} is more than {MAX_LISTEN_FDS} descriptors")
    names_text = environ.get("LISTEN_FDNAMES")
    if names_text is None:
        names = [UNKNOWN_FD_NAME] * count
    else:
        names = names_text.split(":") if count else []
        if len(names) != count:
            raise ActivationError(
                f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count} descriptors"
            )
    return [ListenFd(SD_LISTEN_FDS_START + index, name) for index, name in enumerate(names)]


def _parse_decimal(text: str, variable: str) -> int:
    # isdigit() alone accepts non-ASCII digits; the service manager writes ASCII.
    if not (text.isascii() and text.isdigit()):
        raise ActivationError(f"{variable}={text!r} is not a non-negative decimal number")
    return int(text)


def inherited_sockets(environ: MutableMapping[str, str] | None = None) -> list[InheritedSocket]:
    """Take over the sockets the service manager passed, once.

    The activation variables are removed from ``environ`` in every case
    (also when they name another process or are malformed), so forked
    workers and later calls see nothing. Each descriptor is made
    close-on-exec and non-blocking. A passed descriptor that is not a
    socket (ListenFIFO=, ListenSpecial=) is closed with a warning.

    Args:
      environ: the environment holding the variables; None = os.environ.

    Returns:
      The inherited sockets, in descriptor order; empty when the process
      was not socket-activated.

    Raises:
      ActivationError: the variables are malformed (see
        :func:`parse_listen_fds`) or name a descriptor that is not open.
    """
    if environ is None:
        environ = os.environ
    try:
        passed = parse_listen_fds(environ, os.getpid())
    finally:
        for variable in _ACTIVATION_VARIABLES:
            environ.pop(variable, None)
    inherited: list[InheritedSocket] = []
    for item in passed:
        sock = _adopt_fd(item)
        if sock is not None:
            inherited.append(InheritedSocket(sock, item.name))
    if inherited:
        _log.info(
            "socket activation: %d inherited socket(s): %s",
            len(inherited),
            ", ".join(f"{describe_socket(i.sock)} ({i.name})" for i in inherited),
        )
    return inherited


def _adopt_fd(item: ListenFd) -> socket.socket | None:
    try:
        # The manager clears close-on-exec so that the descriptor survives
        # its exec; we set it again so that ours do not leak further.
        os.set_inheritable(item.fd, False)
    except OSError as exc:
        raise ActivationError(f"passed descriptor {item.fd} ({item.name}): {exc}") from exc
    try:
        sock = socket.socket(fileno=item.fd)
    except OSError as exc:
        _log.warning(
            "passed descriptor %d (%s) is not a socket (%s); closing it",
            item.fd,
            item.name,
            exc.strerror or exc,
        )
        os.close(item.fd)
        return None
    sock.setblocking(False)
    return sock


# ------------------------------------------------------------------ matching


@dataclass(frozen=True, slots=True)
class InetAddress:
    """An IP listening address in comparable form (scope as an interface index)."""

    ip: IPv4Address | IPv6Address
    port: int
    scope_id: int = 0


def inet_address(host: str, port: int, scope_id: int = 0) -> InetAddress:
    """Normalize a socket address for comparison.

    Args:
      host: a numeric IPv4 or IPv6 address as getsockname() or
        getaddrinfo() report it; an IPv6 ``%scope`` suffix is dropped in
        favour of ``scope_id``.
      port: the port.
      scope_id: the IPv6 scope (interface index) from the address tuple.

    Returns:
      The address; an IPv4-mapped IPv6 address becomes its IPv4 form
      (the socket accepts exactly those IPv4 connections).

    Raises:
      ValueError: ``host`` is not a numeric address.
    """
    if ":" not in host:
        return InetAddress(IPv4Address(host), port)
    ip = IPv6Address(host.partition("%")[0])
    if ip.ipv4_mapped is not None:
        return InetAddress(ip.ipv4_mapped, port)
    return InetAddress(ip, port, scope_id)


def covers(bound: InetAddress, wanted: InetAddress, *, dual_stack: bool = False) -> bool:
    """Whether a socket bound to ``bound`` serves exactly the configured ``wanted``.

    Args:
      bound: the inherited socket's address.
      wanted: one address the configured endpoint resolves to.
      dual_stack: ``bound`` is an IPv6 socket without IPV6_V6ONLY, which
        also accepts IPv4 connections.

    Returns:
      True for the same address, port and scope; and for a dual-stack
      ``[::]`` socket standing in for a configured ``0.0.0.0``. A wildcard
      never covers a specific address (it would listen wider than the
      configuration allows).
    """
    if bound.port != wanted.port:
        return False
    if bound.ip == wanted.ip:
        return bound.scope_id == wanted.scope_id
    return dual_stack and bound.ip == _IPV6_ANY and wanted.ip == _IPV4_ANY


def unix_path_matches(sockname: str | bytes, path: str) -> bool:
    """Whether a unix socket's bound name is the configured path, by text.

    Args:
      sockname: getsockname() of the socket (bytes for abstract names,
        which never match a configured path).
      path: the configured socket path.
    """
    if not isinstance(sockname, str) or not sockname.startswith("/"):
        return False
    return os.path.normpath(sockname) == os.path.normpath(os.path.abspath(path))


def match_listener(endpoint: Endpoint, sockets: Sequence[socket.socket]) -> list[socket.socket]:
    """The inherited sockets that serve a configured endpoint.

    A unix endpoint matches a socket bound to the same path, by text or,
    failing that, by being the same file (``/var/run`` is usually a
    symlink to ``/run``). An inet endpoint resolves like the bridge's own
    bind does (every address of a host name) and matches each socket that
    :func:`covers` one of those addresses; a name such as ``localhost``
    can therefore match two sockets.

    Args:
      endpoint: a configured listener endpoint.
      sockets: candidate inherited sockets.

    Returns:
      The matching sockets (possibly several for an inet endpoint), in the
      order given; empty when none matches.
    """
    matched, _ = _match(endpoint, sockets)
    return matched


def _match(
    endpoint: Endpoint, sockets: Sequence[socket.socket]
) -> tuple[list[socket.socket], list[InetAddress]]:
    """The matching sockets and the endpoint's addresses none of them covers."""
    if isinstance(endpoint, UnixEndpoint):
        unix = [s for s in sockets if s.family == socket.AF_UNIX]
        return [s for s in unix if _same_unix_socket(s, endpoint.path)], []
    wanted = _resolve(endpoint)
    matched: list[socket.socket] = []
    uncovered = set(wanted)
    for sock in sockets:
        bound = _bound_inet_address(sock)
        if bound is None:
            continue
        dual_stack = sock.family == socket.AF_INET6 and not sock.getsockopt(
            socket.IPPROTO_IPV6, socket.IPV6_V6ONLY
        )
        hits = {w for w in wanted if covers(bound, w, dual_stack=dual_stack)}
        if hits:
            matched.append(sock)
            uncovered -= hits
    return matched, [w for w in wanted if w in uncovered]


def _same_unix_socket(sock: socket.socket, path: str) -> bool:
    sockname = sock.getsockname()
    if unix_path_matches(sockname, path):
        return True
    if not isinstance(sockname, str) or not sockname.startswith("/"):
        return False
    try:
        return os.path.samefile(sockname, path)
    except OSError:
        return False


def _bound_inet_address(sock: socket.socket) -> InetAddress | None:
    if sock.family == socket.AF_INET:
        host, port = sock.getsockname()
        return inet_address(host, port)
    if sock.family == socket.AF_INET6:
        host, port, _flowinfo, scope_id = sock.getsockname()
        return inet_address(host, port, scope_id)
    return None


def _resolve(endpoint: InetEndpoint) -> list[InetAddress]:
    """Every address the bridge itself would bind for ``endpoint``."""
    try:
        infos = socket.getaddrinfo(
            endpoint.host, endpoint.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError:
        # The bind that follows reports the resolution error properly.
        return []
    addresses: list[InetAddress] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        scope_id = int(sockaddr[3]) if len(sockaddr) == 4 else 0
        address = inet_address(str(sockaddr[0]), int(sockaddr[1]), scope_id)
        if address not in addresses:
            addresses.append(address)
    return addresses


def assign_inherited(
    endpoints: Sequence[Endpoint], inherited: Sequence[InheritedSocket]
) -> dict[Endpoint, list[socket.socket]]:
    """Give each configured endpoint its inherited sockets; close the rest.

    Every inherited socket ends up either in the result or closed: one
    that is not a listening stream socket (``Accept=yes``,
    ``ListenDatagram=``), or that matches no endpoint, is closed with a
    warning naming its address and FileDescriptorName.

    Args:
      endpoints: the configured listener endpoints, in configuration order
        (an inherited socket goes to the first endpoint it matches).
      inherited: the sockets from :func:`inherited_sockets`.

    Returns:
      For each endpoint served by inherited sockets, those sockets. An
      endpoint not in the result must be bound as usual.
    """
    names = {id(item.sock): item.name for item in inherited}
    candidates: list[socket.socket] = []
    for item in inherited:
        problem = _listening_stream_problem(item.sock)
        if problem is None:
            candidates.append(item.sock)
        else:
            _log.warning(
                "inherited socket %s (%s) %s; closing it",
                describe_socket(item.sock),
                item.name,
                problem,
            )
            item.sock.close()
    assigned: dict[Endpoint, list[socket.socket]] = {}
    for endpoint in endpoints:
        if endpoint in assigned:
            continue
        matched, uncovered = _match(endpoint, candidates)
        if not matched:
            continue
        assigned[endpoint] = matched
        candidates = [sock for sock in candidates if sock not in matched]
        for sock in matched:
            _log.info(
                "listener %s: using inherited socket %s (%s)",
                endpoint,
                describe_socket(sock),
                names[id(sock)],
            )
        if uncovered:
            _log.warning(
                "listener %s: the service manager passed no socket for %s; not listening there",
                endpoint,
                ", ".join(str(InetEndpoint(str(a.ip), a.port)) for a in uncovered),
            )
    for sock in candidates:
        _log.warning(
            "inherited socket %s (%s) matches no [[listen]] endpoint of the configuration; "
            "closing it",
            describe_socket(sock),
            names[id(sock)],
        )
        sock.close()
    return assigned


def _listening_stream_problem(sock: socket.socket) -> str | None:
    if sock.type != socket.SOCK_STREAM:
        return "is not a stream socket"
    if sock.family not in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
        return "is not a unix, IPv4 or IPv6 socket"
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return "is not listening (Accept=yes passes connections, which the bridge does not take)"
    return None


def describe_socket(sock: socket.socket) -> str:
    """A socket's bound address in the configuration's endpoint syntax, for logs."""
    with contextlib.suppress(OSError):
        if sock.family == socket.AF_UNIX:
            sockname = sock.getsockname()
            if isinstance(sockname, bytes):
                return "unix:@" + sockname[1:].decode("utf-8", "replace")
            return f"unix:{sockname}" if sockname else "unix:(unnamed)"
        address = _bound_inet_address(sock)
        if address is not None:
            return str(InetEndpoint(str(address.ip), address.port))
    return f"fd {sock.fileno()}"
