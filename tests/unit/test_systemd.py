"""bridge.systemd: sd_notify datagrams, sd_listen_fds hand-over, listener matching.

The notification tests send to real AF_UNIX datagram sockets (a path in
tmp_path and an abstract name); the hand-over tests run a real child
process with descriptors 3.. passed the way systemd passes them. The
matching tests use real bound sockets. No systemd is needed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import textwrap
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.endpoint import Endpoint, InetEndpoint, UnixEndpoint
from bridge.systemd import (
    READY,
    SD_LISTEN_FDS_START,
    STOPPING,
    UNKNOWN_FD_NAME,
    ActivationError,
    InetAddress,
    InheritedSocket,
    ListenFd,
    assign_inherited,
    covers,
    describe_socket,
    inet_address,
    inherited_sockets,
    match_listener,
    notify,
    notify_address,
    parse_listen_fds,
    ready_message,
    reloading_message,
    unix_path_matches,
)
from tests.activation import NotifyReceiver, listening_unix_socket, spawn_activated

# ------------------------------------------------------------- notification


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@/org/freedesktop/systemd1/notify/42", "\0/org/freedesktop/systemd1/notify/42"),
        ("@x", "\0x"),
        ("", None),
        ("@", None),  # an empty abstract name names nothing
        ("run/systemd/notify", None),  # sd_notify(3) refuses relative paths
        ("vsock:2:1234", None),  # systemd 254+ only; the bridge speaks AF_UNIX
    ],
)
def test_notify_address(value: str, address: str | None) -> None:
    assert notify_address(value) == address


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[NotifyReceiver]:
    notify_socket = NotifyReceiver(str(tmp_path / "notify"))
    yield notify_socket
    notify_socket.close()


@pytest.fixture
def abstract_receiver() -> Iterator[NotifyReceiver]:
    # The pid and a clock keep parallel test runs from colliding on the name.
    notify_socket = NotifyReceiver(f"\0postfix-bridge-test/{os.getpid()}/{time.monotonic_ns()}")
    yield notify_socket
    notify_socket.close()


def test_notify_sends_one_datagram_to_a_path(
    receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.environment_value)
    assert notify("READY=1\nSTATUS=serving") is True
    message = receiver.receive(timeout=5)
    assert message.text == "READY=1\nSTATUS=serving"
    assert message.fields == {"READY": "1", "STATUS": "serving"}
    # systemd's NotifyAccess=main checks the kernel's idea of the sender.
    assert message.pid == os.getpid()


def test_notify_sends_to_an_abstract_socket(
    abstract_receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", abstract_receiver.environment_value)
    assert abstract_receiver.environment_value.startswith("@")
    assert notify(STOPPING) is True
    assert abstract_receiver.receive(timeout=5).text == "STOPPING=1"


def test_notify_keeps_utf8_status(
    receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.environment_value)
    assert notify(ready_message("tables: adresses, übersetzung"))
    assert receiver.receive(timeout=5).fields["STATUS"] == "tables: adresses, übersetzung"


def test_notify_without_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify(READY) is False


def test_notify_to_a_missing_socket_fails_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="bridge.systemd"):
        assert notify(READY) is False
    assert "cannot notify the service manager" in caplog.text


def test_notify_to_an_unsupported_address_fails_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    with caplog.at_level(logging.WARNING, logger="bridge.systemd"):
        assert notify(READY) is False
    assert "vsock:2:1234" in caplog.text


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (None, "READY=1"),
        ("listening on unix:/run/b.sock", "READY=1\nSTATUS=listening on unix:/run/b.sock"),
        # A newline would start a second assignment (here a forged READY).
        ("bad\nREADY=0", "READY=1\nSTATUS=bad READY=0"),
        ("a\r\nb", "READY=1\nSTATUS=a b"),
    ],
)
def test_ready_message(status: str | None, message: str) -> None:
    assert ready_message(status) == message


def test_reloading_message_carries_the_given_timestamp() -> None:
    assert reloading_message(123456789) == "RELOADING=1\nMONOTONIC_USEC=123456789"


def test_reloading_message_defaults_to_clock_monotonic_now() -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = dict(line.split("=", 1) for line in reloading_message().split("\n"))
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


# -------------------------------------------------- sd_listen_fds(3) variables

PID = 4242

# The rules of sd_listen_fds(3) / sd_listen_fds_with_names(3), as vectors:
# environment -> descriptors passed to PID (or the error).
LISTEN_FDS_VECTORS: list[tuple[dict[str, str], list[ListenFd] | None]] = [
    ({}, []),
    ({"LISTEN_FDS": "2"}, []),  # no LISTEN_PID: not for us
    ({"LISTEN_PID": "4243", "LISTEN_FDS": "2"}, []),  # leaked from a parent
    ({"LISTEN_PID": "4243", "LISTEN_FDS": "junk"}, []),  # another's junk is not ours
    ({"LISTEN_PID": str(PID)}, []),  # no LISTEN_FDS: nothing passed
    ({"LISTEN_PID": str(PID), "LISTEN_FDS": "0"}, []),
    ({"LISTEN_PID": str(PID), "LISTEN_FDS": "1"}, [ListenFd(3, UNKNOWN_FD_NAME)]),
    (
        {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "bridge.socket:metrics"},
        [ListenFd(3, "bridge.socket"), ListenFd(4, "metrics")],
    ),
    ({"LISTEN_PID": str(PID), "LISTEN_FDS": "0", "LISTEN_FDNAMES": ""}, []),
    ({"LISTEN_PID": str(PID), "LISTEN_FDS": "1", "LISTEN_FDNAMES": ""}, [ListenFd(3, "")]),
    ({"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "one"}, None),
    ({"LISTEN_PID": str(PID), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"}, None),
    ({"LISTEN_PID": str(PID), "LISTEN_FDS": "-1"}, None),
    ({"LISTEN_PID": str(PID), "LISTEN_FDS": "two"}, None),
    ({"LISTEN_PID": str(PID), "LISTEN_FDS": "4097"}, None),  # above MAX_LISTEN_FDS
    ({"LISTEN_PID": str(PID), "LISTEN_FDS": "\u0661"}, None),  # Arabic-Indic one
    ({"LISTEN_PID": " 4242", "LISTEN_FDS": "1"}, None),
    ({"LISTEN_PID": "", "LISTEN_FDS": "1"}, None),
]


@pytest.mark.parametrize(("environ", "expected"), LISTEN_FDS_VECTORS)
def test_parse_listen_fds(environ: dict[str, str], expected: list[ListenFd] | None) -> None:
    if expected is None:
        with pytest.raises(ActivationError):
            parse_listen_fds(environ, PID)
    else:
        assert parse_listen_fds(environ, PID) == expected


_NAME = st.text(st.characters(exclude_characters=":", codec="utf-8"), max_size=8)


@given(st.lists(_NAME, max_size=20))
def test_listen_fds_round_trip(names: list[str]) -> None:
    environ = {"LISTEN_PID": str(PID), "LISTEN_FDS": str(len(names))}
    if names:
        environ["LISTEN_FDNAMES"] = ":".join(names)
    expected = [ListenFd(SD_LISTEN_FDS_START + i, name) for i, name in enumerate(names)]
    assert parse_listen_fds(environ, PID) == expected


_ENV_TEXT = st.text(st.characters(codec="utf-8"), max_size=12)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "LISTEN_PID": st.one_of(_ENV_TEXT, st.just(str(PID))),
            "LISTEN_FDS": st.one_of(_ENV_TEXT, st.integers(-3, 50).map(str)),
            "LISTEN_FDNAMES": _ENV_TEXT,
        },
    )
)
def test_parse_listen_fds_raises_only_activation_error(environ: dict[str, str]) -> None:
    try:
        passed = parse_listen_fds(environ, PID)
    except ActivationError:
        return
    assert [item.fd for item in passed] == list(range(3, 3 + len(passed)))


def test_inherited_sockets_removes_the_variables_when_they_are_not_ours() -> None:
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "PATH": "/bin"}
    assert inherited_sockets(environ) == []
    assert environ == {"PATH": "/bin"}


def test_inherited_sockets_removes_the_variables_when_they_are_malformed() -> None:
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x", "HOME": "/root"}
    with pytest.raises(ActivationError):
        inherited_sockets(environ)
    assert environ == {"HOME": "/root"}


# ------------------------------------------- the hand-over, in a real process

#: Runs as the activated process: reports what inherited_sockets() made of
#: the descriptors, and what is left of the environment and descriptor 5.
_REPORT_CHILD = textwrap.dedent(
    """
    import json, os, sys
    from bridge.systemd import inherited_sockets
    found = inherited_sockets()
    try:
        os.fstat(5)
        fd5_open = True
    except OSError:
        fd5_open = False
    print(json.dumps({
        "sockets": [
            {
                "name": item.name,
                "fd": item.sock.fileno(),
                "family": int(item.sock.family),
                "sockname": repr(item.sock.getsockname()),
                "inheritable": item.sock.get_inheritable(),
                "blocking": item.sock.getblocking(),
            }
            for item in found
        ],
        "variables": sorted(k for k in os.environ if k.startswith("LISTEN_")),
        "again": len(inherited_sockets()),
        "fd5_open": fd5_open,
    }), file=sys.stderr)
    """
)


def _run_activated_child(
    passed: list[socket.socket | int], names: list[str] | None
) -> dict[str, object]:
    process = spawn_activated([sys.executable, "-c", _REPORT_CHILD], passed, names=names)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    report: dict[str, object] = json.loads(stderr.strip().splitlines()[-1])
    return report


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    os.close(read_end)
    os.close(write_end)


def test_inherited_sockets_takes_over_passed_descriptors(
    tmp_path: Path, pipe: tuple[int, int]
) -> None:
    unix = listening_unix_socket(tmp_path / "bridge.sock")
    inet = socket.create_server(("127.0.0.1", 0))
    inet_sockname = inet.getsockname()
    try:
        report = _run_activated_child(
            [unix, inet, pipe[0]], names=["bridge.socket", "inet", "fifo"]
        )
    finally:
        unix.close()
        inet.close()
    sockets = report["sockets"]
    assert isinstance(sockets, list)
    assert [s["name"] for s in sockets] == ["bridge.socket", "inet"]
    assert [s["fd"] for s in sockets] == [3, 4]
    assert [s["family"] for s in sockets] == [int(socket.AF_UNIX), int(socket.AF_INET)]
    assert sockets[0]["sockname"] == repr(str(tmp_path / "bridge.sock"))
    assert sockets[1]["sockname"] == repr(inet_sockname)
    # close-on-exec and non-blocking, like the bridge's own listeners
    assert [s["inheritable"] for s in sockets] == [False, False]
    assert [s["blocking"] for s in sockets] == [False, False]
    assert report["variables"] == []
    assert report["again"] == 0
    # The pipe (a ListenFIFO=) is not a socket: closed, not leaked.
    assert report["fd5_open"] is False


def test_inherited_sockets_without_names_reports_unknown(tmp_path: Path) -> None:
    unix = listening_unix_socket(tmp_path / "bridge.sock")
    try:
        report = _run_activated_child([unix], names=None)
    finally:
        unix.close()
    sockets = report["sockets"]
    assert isinstance(sockets, list)
    assert [s["name"] for s in sockets] == [UNKNOWN_FD_NAME]


# ----------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("host", "port", "scope_id", "expected"),
    [
        ("127.0.0.1", 25, 0, InetAddress(IPv4Address("127.0.0.1"), 25)),
        ("0.0.0.0", 25, 0, InetAddress(IPv4Address("0.0.0.0"), 25)),
        ("::1", 25, 0, InetAddress(IPv6Address("::1"), 25)),
        ("::", 25, 0, InetAddress(IPv6Address("::"), 25)),
        # getsockname() of an IPv6 socket bound to an IPv4-mapped address
        ("::ffff:127.0.0.1", 25, 0, InetAddress(IPv4Address("127.0.0.1"), 25)),
        # the %scope text is replaced by the numeric scope of the tuple
        ("fe80::1%eth0", 25, 2, InetAddress(IPv6Address("fe80::1"), 25, 2)),
        ("fe80::1", 25, 2, InetAddress(IPv6Address("fe80::1"), 25, 2)),
        ("2001:DB8::1", 25, 0, InetAddress(IPv6Address("2001:db8::1"), 25)),
    ],
)
def test_inet_address(host: str, port: int, scope_id: int, expected: InetAddress) -> None:
    assert inet_address(host, port, scope_id) == expected


@pytest.mark.parametrize("host", ["localhost", "", "1.2.3", "::g", "[::1]", "1.2.3.4.5"])
def test_inet_address_rejects_non_numeric_hosts(host: str) -> None:
    with pytest.raises(ValueError):
        inet_address(host, 25)


@given(st.text(max_size=40), st.integers(0, 65535), st.integers(0, 2**32 - 1))
def test_inet_address_raises_only_value_error(host: str, port: int, scope_id: int) -> None:
    try:
        address = inet_address(host, port, scope_id)
    except ValueError:
        return
    assert address.port == port


def _a(text: str, port: int = 10027, scope_id: int = 0) -> InetAddress:
    return inet_address(text, port, scope_id)


# bound (inherited socket), wanted (configured), dual_stack -> covers?
COVERS_VECTORS = [
    (_a("127.0.0.1"), _a("127.0.0.1"), False, True),
    (_a("127.0.0.1"), _a("127.0.0.1", 10028), False, False),
    (_a("127.0.0.1"), _a("127.0.0.2"), False, False),
    # a wildcard never stands in for a configured specific address
    (_a("0.0.0.0"), _a("127.0.0.1"), False, False),
    (_a("::"), _a("::1"), True, False),
    (_a("::"), _a("127.0.0.1"), True, False),
    (_a("0.0.0.0"), _a("0.0.0.0"), False, True),
    (_a("::"), _a("::"), False, True),
    (_a("::"), _a("::"), True, True),
    # systemd's ListenStream=PORT: one dual-stack [::] socket serves 0.0.0.0 too
    (_a("::"), _a("0.0.0.0"), True, True),
    (_a("::"), _a("0.0.0.0"), False, False),
    (_a("0.0.0.0"), _a("::"), False, False),
    (_a("::1"), _a("127.0.0.1"), True, False),
    # IPv6 scope: the same link-local address on another interface is another address
    (_a("fe80::1", scope_id=2), _a("fe80::1", scope_id=2), False, True),
    (_a("fe80::1", scope_id=2), _a("fe80::1", scope_id=3), False, False),
    (_a("fe80::1", scope_id=2), _a("fe80::1"), False, False),
    # IPv4-mapped form of a configured IPv4 address
    (_a("::ffff:127.0.0.1"), _a("127.0.0.1"), False, True),
]


@pytest.mark.parametrize(("bound", "wanted", "dual_stack", "expected"), COVERS_VECTORS)
def test_covers(bound: InetAddress, wanted: InetAddress, dual_stack: bool, expected: bool) -> None:
    assert covers(bound, wanted, dual_stack=dual_stack) is expected


@pytest.mark.parametrize(
    ("sockname", "path", "expected"),
    [
        ("/run/postfix-bridge/bridge.sock", "/run/postfix-bridge/bridge.sock", True),
        ("/run/postfix-bridge/bridge.sock", "/run//postfix-bridge/./bridge.sock", True),
        ("/run/postfix-bridge/bridge.sock", "/run/postfix-bridge/other.sock", False),
        ("/run/postfix-bridge/bridge.sock", "/run/postfix-bridge", False),
        (b"\0/run/postfix-bridge/bridge.sock", "/run/postfix-bridge/bridge.sock", False),
        ("", "/run/postfix-bridge/bridge.sock", False),
    ],
)
def test_unix_path_matches(sockname: str | bytes, path: str, expected: bool) -> None:
    assert unix_path_matches(sockname, path) is expected


@pytest.fixture
def closing() -> Iterator[list[socket.socket]]:
    """Sockets to close after the test."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def _inet_listener(host: str, port: int = 0, *, v6only: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    sock.bind((host, port))
    sock.listen(4)
    return sock


def _port(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_match_listener_unix_by_path(tmp_path: Path, closing: list[socket.socket]) -> None:
    sock = listening_unix_socket(tmp_path / "bridge.sock")
    other = listening_unix_socket(tmp_path / "other.sock")
    closing += [sock, other]
    assert match_listener(UnixEndpoint(str(tmp_path / "bridge.sock")), [other, sock]) == [sock]
    assert match_listener(UnixEndpoint(str(tmp_path / "missing.sock")), [sock, other]) == []


def test_match_listener_unix_through_a_symlinked_directory(
    tmp_path: Path, closing: list[socket.socket]
) -> None:
    # Like /var/run -> /run: the configured path names the same file.
    (tmp_path / "run").mkdir()
    (tmp_path / "var-run").symlink_to(tmp_path / "run")
    sock = listening_unix_socket(tmp_path / "run" / "bridge.sock")
    closing.append(sock)
    assert match_listener(UnixEndpoint(str(tmp_path / "var-run" / "bridge.sock")), [sock]) == [sock]


def test_match_listener_inet(closing: list[socket.socket]) -> None:
    loopback = _inet_listener("127.0.0.1")
    wildcard = _inet_listener("0.0.0.0")
    closing += [loopback, wildcard]
    port = _port(loopback)
    assert match_listener(InetEndpoint("127.0.0.1", port), [wildcard, loopback]) == [loopback]
    # a host name matches what it resolves to, as the bridge's own bind does
    assert match_listener(InetEndpoint("localhost", port), [loopback]) == [loopback]
    assert match_listener(InetEndpoint("127.0.0.1", port + 1), [loopback]) == []
    # inherited 0.0.0.0 must not serve a configured loopback listener
    assert match_listener(InetEndpoint("127.0.0.1", _port(wildcard)), [wildcard]) == []
    assert match_listener(InetEndpoint("0.0.0.0", _port(wildcard)), [wildcard]) == [wildcard]


def test_match_listener_never_matches_unix_to_inet(
    tmp_path: Path, closing: list[socket.socket]
) -> None:
    unix = listening_unix_socket(tmp_path / "bridge.sock")
    inet = _inet_listener("127.0.0.1")
    closing += [unix, inet]
    assert match_listener(UnixEndpoint(str(tmp_path / "bridge.sock")), [inet]) == []
    assert match_listener(InetEndpoint("127.0.0.1", _port(inet)), [unix]) == []


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 on this host")
def test_match_listener_ipv6(closing: list[socket.socket]) -> None:
    dual = _inet_listener("::", v6only=False)
    v6only = _inet_listener("::", v6only=True)
    loopback6 = _inet_listener("::1")
    closing += [dual, v6only, loopback6]
    assert match_listener(InetEndpoint("0.0.0.0", _port(dual)), [dual]) == [dual]
    assert match_listener(InetEndpoint("0.0.0.0", _port(v6only)), [v6only]) == []
    assert match_listener(InetEndpoint("::", _port(v6only)), [v6only]) == [v6only]
    assert match_listener(InetEndpoint("::1", _port(loopback6)), [loopback6]) == [loopback6]
    assert match_listener(InetEndpoint("::1", _port(dual)), [dual]) == []


def test_assign_inherited(
    tmp_path: Path, closing: list[socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    unix = listening_unix_socket(tmp_path / "bridge.sock")
    inet = _inet_listener("127.0.0.1")
    stray = _inet_listener("127.0.0.1")
    not_listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    datagram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    datagram.bind(str(tmp_path / "datagram.sock"))
    closing += [unix, inet, stray, not_listening, datagram]
    inherited = [
        InheritedSocket(stray, "stray.socket"),
        InheritedSocket(unix, "bridge.socket"),
        InheritedSocket(not_listening, "accept.socket"),
        InheritedSocket(datagram, "datagram.socket"),
        InheritedSocket(inet, "inet.socket"),
    ]
    unix_endpoint = UnixEndpoint(str(tmp_path / "bridge.sock"))
    inet_endpoint = InetEndpoint("127.0.0.1", _port(inet))
    unbound_endpoint = InetEndpoint("127.0.0.1", 1)
    endpoints: list[Endpoint] = [unbound_endpoint, inet_endpoint, unix_endpoint]
    with caplog.at_level(logging.INFO, logger="bridge.systemd"):
        assigned = assign_inherited(endpoints, inherited)
    assert assigned == {inet_endpoint: [inet], unix_endpoint: [unix]}
    # Every inherited socket is either handed out or closed, never left open.
    assert unix.fileno() >= 0 and inet.fileno() >= 0
    assert stray.fileno() == -1
    assert not_listening.fileno() == -1
    assert datagram.fileno() == -1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("stray.socket" in w and "matches no [[listen]]" in w for w in warnings)
    assert any("accept.socket" in w and "not listening" in w for w in warnings)
    assert any("datagram.socket" in w and "not a stream socket" in w for w in warnings)
    assert len(warnings) == 3


def test_assign_inherited_gives_a_socket_to_the_first_matching_endpoint(
    closing: list[socket.socket],
) -> None:
    inet = _inet_listener("127.0.0.1")
    closing.append(inet)
    first, second = InetEndpoint("localhost", _port(inet)), InetEndpoint("127.0.0.1", _port(inet))
    assert assign_inherited([first, second], [InheritedSocket(inet, "x")]) == {first: [inet]}


def test_assign_inherited_with_nothing_inherited() -> None:
    assert assign_inherited([InetEndpoint("127.0.0.1", 10027)], []) == {}


def test_describe_socket(tmp_path: Path, closing: list[socket.socket]) -> None:
    unix = listening_unix_socket(tmp_path / "b.sock")
    unnamed = socket.socket(socket.AF_UNIX)
    inet = _inet_listener("127.0.0.1")
    closing += [unix, unnamed, inet]
    assert describe_socket(unix) == f"unix:{tmp_path}/b.sock"
    assert describe_socket(unnamed) == "unix:(unnamed)"
    assert describe_socket(inet) == f"inet:127.0.0.1:{_port(inet)}"


def test_describe_abstract_socket(closing: list[socket.socket]) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(f"\0postfix-bridge-describe-{os.getpid()}")
    closing.append(sock)
    assert describe_socket(sock) == f"unix:@postfix-bridge-describe-{os.getpid()}"


def test_ready_and_stopping_constants() -> None:
    assert READY == "READY=1"
    assert STOPPING == "STOPPING=1"


def test_spawn_activated_keeps_the_pid(tmp_path: Path) -> None:
    """The launcher execs in place: LISTEN_PID names the final program's pid."""
    unix = listening_unix_socket(tmp_path / "bridge.sock")
    try:
        process = spawn_activated(
            [
                sys.executable,
                "-c",
                "import os, sys; print(os.environ['LISTEN_PID'], file=sys.stderr)",
            ],
            [unix],
        )
        _, stderr = process.communicate(timeout=30)
    finally:
        unix.close()
    assert int(stderr.strip()) == process.pid
    assert process.returncode == 0
