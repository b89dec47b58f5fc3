"""``proxy:`` tables against an in-process proxymap of either generation (PXC-1 .. PXC-9).

:class:`FakeProxymap` serves a unix socket with the bridge's own codec
(its server half: :func:`parse_request`, :func:`encode_reply`) and
behaves as proxymap.c does where the client can tell: the announcement on
accept (3.6 and later), BAD for a request of the other generation, DENY
for a table it does not list, ``flags`` echoed in 3.11 replies. Tests
turn on the faults: forced statuses, a close after every reply, silence.

The installed Postfix (3.7) speaks the 2.9-3.10 form, which
tests/integration/test_proxy_backup.py checks against the real proxymap;
the 3.11 form and the switch between the two are checked here only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from bridge.config import BridgeConfig, ConfigError, load_config
from bridge.maps import OpenOptions, open_map, open_writable_map, validate_spec
from bridge.maps.base import HealthReporting, MapError, SequenceMap, WritableMap
from bridge.maps.proxy import (
    PROXYWRITE_TYPES,
    ProxyMap,
    forget_generations,
    parse_proxy_target,
)
from bridge.outcome import NOT_FOUND, WRITTEN, ConfigFailure, Found, NotWritten, Retry
from bridge.protocol.proxymap import (
    ANNOUNCEMENT,
    FLAG_DUP_REPLACE,
    FLAG_LOCK,
    FLAG_OPEN_LOCK,
    FLAG_SYNC_UPDATE,
    FLAG_UTF8_REQUEST,
    NEED_DATA,
    AttrDecoder,
    Generation,
    ProxyDelete,
    ProxyLookup,
    ProxymapError,
    ProxyOpen,
    ProxyReply,
    ProxySequence,
    ProxyUpdate,
    RequestFrame,
    RequestKind,
    Status,
    encode_reply,
    parse_request,
    request_kind,
)
from bridge.table import Table

V29, V311 = Generation.V2_9, Generation.V3_11
READ_FLAGS = FLAG_LOCK | FLAG_UTF8_REQUEST
#: Postfix's caches behind proxywrite: 65920 (PXC-8).
WRITE_FLAGS = FLAG_OPEN_LOCK | FLAG_SYNC_UPDATE | FLAG_DUP_REPLACE
#: What a 3.11 server might hand back as the table instance's flags.
SERVER_FLAGS = FLAG_LOCK | FLAG_UTF8_REQUEST | 16 | 8


@dataclass
class FakeProxymap:
    """A proxymap (or proxywrite) on ``socket`` (see the module docstring)."""

    socket: str
    generation: Generation = V29
    announce: bool = True
    approved: set[bytes] = field(default_factory=lambda: {b"hash:/x"})
    entries: dict[bytes, bytes] = field(default_factory=dict)
    writer: bool = False
    #: statuses to answer instead of the real one, request by request
    forced: list[int] = field(default_factory=list)
    close_after_reply: bool = False
    silent: bool = False
    #: seconds to wait before each reply
    delay: float = 0.0
    frames: list[tuple[int, RequestFrame]] = field(default_factory=list)
    connections: int = 0
    closed: trio.Event = field(default_factory=trio.Event)
    _cursor: list[bytes] = field(default_factory=list)

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(self.socket)
        sock.listen()
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(self.handle, [listener])

    async def handle(self, stream: trio.SocketStream) -> None:
        number = self.connections
        self.connections += 1
        decoder = AttrDecoder()
        try:
            async with stream:
                if self.announce:
                    await stream.send_all(ANNOUNCEMENT)
                while True:
                    attributes = decoder.next_list()
                    if attributes is NEED_DATA:
                        data = await stream.receive_some()
                        decoder.receive_data(data)
                        if not data:
                            return
                        continue
                    frame = parse_request(attributes)
                    self.frames.append((number, frame))
                    if self.silent:
                        await trio.sleep_forever()
                    await trio.sleep(self.delay)
                    await stream.send_all(self.answer(frame))
                    if self.close_after_reply:
                        return
        except (trio.BrokenResourceError, ProxymapError):
            return
        finally:
            self.closed.set()

    def answer(self, frame: RequestFrame) -> bytes:
        kind = request_kind(frame.request)
        if frame.generation is not self.generation:
            # The server reads the request in its own form, fails, answers BAD.
            return encode_reply(ProxyReply(Status.BAD, 0), kind, self.generation)
        reply = self.reply(frame)
        if self.forced:
            reply = ProxyReply(self.forced.pop(0), reply.flags, reply.key, reply.value)
        return encode_reply(reply, kind, self.generation)

    def reply(self, frame: RequestFrame) -> ProxyReply:
        request = frame.request
        flags = SERVER_FLAGS
        if request.table not in self.approved:
            return ProxyReply(Status.DENY, 0)
        if isinstance(request, ProxyOpen):
            return ProxyReply(Status.OK, flags)
        if isinstance(request, ProxyLookup):
            value = self.entries.get(request.key)
            if value is None:
                return ProxyReply(Status.NOKEY, flags, value=b"")
            return ProxyReply(Status.OK, flags, value=value)
        if isinstance(request, ProxyUpdate | ProxyDelete) and not self.writer:
            return ProxyReply(Status.DENY, flags)
        if isinstance(request, ProxyUpdate):
            self.entries[request.key] = request.value
            return ProxyReply(Status.OK, flags)
        if isinstance(request, ProxyDelete):
            if self.entries.pop(request.key, None) is None:
                return ProxyReply(Status.NOKEY, flags)
            return ProxyReply(Status.OK, flags)
        assert isinstance(request, ProxySequence)
        if request.function == 0:
            self._cursor = sorted(self.entries)
        if not self._cursor:
            return ProxyReply(Status.NOKEY, flags, key=b"", value=b"")
        key = self._cursor.pop(0)
        return ProxyReply(Status.OK, flags, key=key, value=self.entries[key])

    def requests(self) -> list[tuple[int, RequestKind, Generation]]:
        """(connection, request kind, generation) of every request received."""
        return [(n, request_kind(f.request), f.generation) for n, f in self.frames]


@pytest.fixture
def queue_dir() -> Iterator[Path]:
    """A short queue directory with private/ (unix socket paths are limited to 108 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="pxq", dir="/tmp"))
    (root / "private").mkdir()
    forget_generations()
    try:
        yield root
    finally:
        forget_generations()
        shutil.rmtree(root, ignore_errors=True)


async def start(
    nursery: trio.Nursery, queue_dir: Path, *, writer: bool = False, **settings: object
) -> FakeProxymap:
    service = "proxywrite" if writer else "proxymap"
    server = FakeProxymap(str(queue_dir / "private" / service), writer=writer, **settings)  # type: ignore[arg-type]
    await nursery.start(server.serve)
    return server


def table(
    queue_dir: Path,
    spec: str = "proxy:hash:/x",
    *,
    writable: bool = False,
    protocol: str | None = None,
    **settings: float,
) -> ProxyMap:
    target = parse_proxy_target(
        spec.removeprefix("proxy:"), queue_directory=str(queue_dir), writable=writable
    )
    generation = Generation(protocol) if protocol else None
    return ProxyMap(spec, target, generation=generation, **settings)  # type: ignore[arg-type]


# ------------------------------------------------------------- 2.9 to 3.10


async def test_lookups_in_the_2_9_form(nursery: trio.Nursery, queue_dir: Path) -> None:
    server = await start(nursery, queue_dir, entries={b"alice@example.com": b"alice@mail"})
    proxy = table(queue_dir)
    assert await proxy.lookup(b"alice@example.com") == Found(b"alice@mail")
    assert await proxy.lookup(b"bob@example.com") == NOT_FOUND
    assert proxy.generation is V29
    # One open (flags 0), then lookups with LOCK | UTF8_REQUEST (PXC-8), on one connection.
    assert [frame for _, frame in server.frames] == [
        RequestFrame(ProxyOpen(b"hash:/x"), V29, 0),
        RequestFrame(ProxyLookup(b"hash:/x", READ_FLAGS, b"alice@example.com"), V29, None),
        RequestFrame(ProxyLookup(b"hash:/x", READ_FLAGS, b"bob@example.com"), V29, None),
    ]
    assert server.connections == 1
    # Only the table's own bits of the open reply are kept (PXC-8).
    assert proxy.table_flags == 16


async def test_servers_before_3_6_send_no_announcement(
    nursery: trio.Nursery, queue_dir: Path
) -> None:
    server = await start(nursery, queue_dir, announce=False, entries={b"k": b"v"})
    proxy = table(queue_dir)
    assert await proxy.lookup(b"k") == Found(b"v")
    assert server.connections == 1


async def test_keys_are_sent_as_given(nursery: trio.Nursery, queue_dir: Path) -> None:
    # The table folds (or not); FOLD_FIX never reaches the wire (PXC-8).
    server = await start(nursery, queue_dir, entries={b"User@Example.COM": b"v"})
    proxy = table(queue_dir)
    assert await proxy.lookup(b"User@Example.COM") == Found(b"v")
    assert await proxy.lookup(b"user@example.com") == NOT_FOUND
    sent = [f.request for _, f in server.frames if isinstance(f.request, ProxyLookup)]
    assert [r.key for r in sent] == [b"User@Example.COM", b"user@example.com"]


async def test_smtputf8_off_drops_utf8_request(nursery: trio.Nursery, queue_dir: Path) -> None:
    server = await start(nursery, queue_dir, entries={b"k": b"\xff"})
    proxy = table(queue_dir)
    assert isinstance(await proxy.lookup(b"k"), ConfigFailure)  # G-6
    plain = ProxyMap(
        "proxy:hash:/x",
        parse_proxy_target("hash:/x", queue_directory=str(queue_dir), writable=False),
        smtputf8=False,
    )
    assert await plain.lookup(b"k") == Found(b"\xff")
    lookup = server.frames[-1][1].request
    assert isinstance(lookup, ProxyLookup)
    assert lookup.flags == FLAG_LOCK


async def test_key_with_nul_is_not_sent(nursery: trio.Nursery, queue_dir: Path) -> None:
    server = await start(nursery, queue_dir)
    assert await table(queue_dir).lookup(b"a\x00b") == NOT_FOUND
    assert server.frames == []


# ----------------------------------------------------------------- 3.11+


async def test_3_11_server_is_detected_and_remembered(
    nursery: trio.Nursery, queue_dir: Path
) -> None:
    server = await start(nursery, queue_dir, generation=V311, entries={b"k": b"v"})
    proxy = table(queue_dir)
    assert await proxy.lookup(b"k") == Found(b"v")
    assert await proxy.lookup(b"k") == Found(b"v")
    assert proxy.generation is V311
    # 2.9 open -> BAD; a fresh connection, the 3.11 open, then 3.11 lookups.
    assert server.requests() == [
        (0, RequestKind.OPEN, V29),
        (1, RequestKind.OPEN, V311),
        (1, RequestKind.LOOKUP, V311),
        (1, RequestKind.LOOKUP, V311),
    ]
    # instance_flags carry the request set; flags echo the server's (PXC-5).
    assert server.frames[1][1] == RequestFrame(ProxyOpen(b"hash:/x"), V311, READ_FLAGS)
    assert server.frames[2][1] == RequestFrame(
        ProxyLookup(b"hash:/x", SERVER_FLAGS, b"k"), V311, READ_FLAGS
    )
    # Another table on the same socket starts in the remembered form.
    other = table(queue_dir)
    assert await other.lookup(b"k") == Found(b"v")
    assert server.requests()[4:] == [(2, RequestKind.OPEN, V311), (2, RequestKind.LOOKUP, V311)]


async def test_3_11_write_flags(nursery: trio.Nursery, queue_dir: Path) -> None:
    server = await start(nursery, queue_dir, generation=V311, writer=True)
    proxy = table(queue_dir, writable=True, protocol="3.11")
    assert await proxy.update(b"k", b"v") == WRITTEN
    assert server.frames == [
        (0, RequestFrame(ProxyOpen(b"hash:/x"), V311, WRITE_FLAGS)),
        (0, RequestFrame(ProxyUpdate(b"hash:/x", SERVER_FLAGS, b"k", b"v"), V311, WRITE_FLAGS)),
    ]


async def test_forced_form_is_not_probed(nursery: trio.Nursery, queue_dir: Path) -> None:
    server = await start(nursery, queue_dir, generation=V311, entries={b"k": b"v"})
    proxy = table(queue_dir, protocol="3.11")
    assert await proxy.lookup(b"k") == Found(b"v")
    assert server.requests() == [(0, RequestKind.OPEN, V311), (0, RequestKind.LOOKUP, V311)]


@pytest.mark.parametrize(("server_form", "forced"), [(V29, "3.11"), (V311, "2.9")])
async def test_wrong_forced_form_is_a_config_failure(
    nursery: trio.Nursery, queue_dir: Path, server_form: Generation, forced: str
) -> None:
    server = await start(nursery, queue_dir, generation=server_form, entries={b"k": b"v"})
    outcome = await table(queue_dir, protocol=forced).lookup(b"k")
    assert isinstance(outcome, ConfigFailure)
    assert f"in the {forced} protocol form: set proxymap_protocol" in outcome.reason
    assert len(server.frames) == 1


async def test_bad_to_both_forms_is_a_config_failure(
    nursery: trio.Nursery, queue_dir: Path
) -> None:
    server = await start(nursery, queue_dir, forced=[Status.BAD, Status.BAD])
    outcome = await table(queue_dir).lookup(b"k")
    assert isinstance(outcome, ConfigFailure)
    assert "in the 2.9 and 3.11 protocol form" in outcome.reason
    assert server.connections == 2


async def test_upgrade_under_a_running_bridge(nursery: trio.Nursery, queue_dir: Path) -> None:
    # Opened in the 2.9 form; then Postfix 3.11 answers BAD to a lookup: the
    # table opens again (detecting 3.11) and the lookup is sent once more.
    server = await start(nursery, queue_dir, entries={b"k": b"v"})
    proxy = table(queue_dir)
    assert await proxy.lookup(b"k") == Found(b"v")
    server.generation = V311
    assert await proxy.lookup(b"k") == Found(b"v")
    assert proxy.generation is V311
    assert server.requests()[2:] == [
        (0, RequestKind.LOOKUP, V29),  # BAD; the connection is dropped
        (1, RequestKind.OPEN, V29),  # BAD again
        (2, RequestKind.OPEN, V311),
        (2, RequestKind.LOOKUP, V311),
    ]


# ------------------------------------------------------------- statuses


async def test_deny_names_the_main_cf_line(nursery: trio.Nursery, queue_dir: Path) -> None:
    server = await start(nursery, queue_dir, approved=set(), entries={b"k": b"v"})
    proxy = table(queue_dir)
    outcome = await proxy.lookup(b"k")
    assert outcome == ConfigFailure(
        "proxymap refused proxy:hash:/x: add proxy:hash:/x to "
        "proxy_read_maps in main.cf and run postfix reload"
    )
    [report] = await proxy.health()
    assert not report.ok
    assert "proxy_read_maps" in report.detail
    # Approved and reloaded: the next lookup opens again and works.
    server.approved.add(b"hash:/x")
    assert await proxy.lookup(b"k") == Found(b"v")
    [report] = await proxy.health()
    assert report.ok


async def test_deny_on_proxywrite_names_proxy_write_maps(
    nursery: trio.Nursery, queue_dir: Path
) -> None:
    await start(nursery, queue_dir, writer=True, approved=set())
    outcome = await table(queue_dir, "proxy:btree:/x/rw", writable=True).update(b"k", b"v")
    assert isinstance(outcome, ConfigFailure)
    assert outcome.reason.endswith(
        "add proxy:btree:/x/rw to proxy_write_maps in main.cf and run postfix reload"
    )


@pytest.mark.parametrize(
    ("status", "expected"),
    [(Status.RETRY, Retry), (Status.CONFIG, ConfigFailure), (Status.DENY, ConfigFailure)],
)
async def test_lookup_statuses(
    nursery: trio.Nursery, queue_dir: Path, status: int, expected: type[object]
) -> None:
    # PXC-6: only OK and NOKEY are answers; nothing is ever "not found" by mistake.
    await start(nursery, queue_dir, forced=[Status.OK, status])
    outcome = await table(queue_dir).lookup(b"k")
    assert isinstance(outcome, expected)


async def test_unknown_status_is_asked_again_on_a_fresh_connection(
    nursery: trio.Nursery, queue_dir: Path
) -> None:
    server = await start(nursery, queue_dir, forced=[Status.OK, 9], entries={b"k": b"v"})
    proxy = table(queue_dir)
    assert await proxy.lookup(b"k") == Found(b"v")
    assert server.connections == 2
    server.forced = [9, 9]
    outcome = await proxy.lookup(b"k")
    assert isinstance(outcome, Retry)
    assert "unknown status 9" in outcome.reason
    assert server.connections == 3  # each unknown status closed its connection


# ---------------------------------------------------------- connections


async def test_proxymap_restarts_are_transparent(nursery: trio.Nursery, queue_dir: Path) -> None:
    # proxymap exits when a table changes (PXC-9): every reply here is the
    # server's last on its connection.
    server = await start(nursery, queue_dir, close_after_reply=True, entries={b"k": b"v"})
    proxy = table(queue_dir)
    for _ in range(5):
        assert await proxy.lookup(b"k") == Found(b"v")
    assert server.connections == 6  # open, then one per lookup


async def test_silent_server_is_a_timeout(nursery: trio.Nursery, queue_dir: Path) -> None:
    await start(nursery, queue_dir, silent=True)
    proxy = table(queue_dir, timeout=0.2)
    started = trio.current_time()
    outcome = await proxy.lookup(b"k")
    assert isinstance(outcome, Retry)
    assert outcome.timeout
    assert trio.current_time() - started < 5


async def test_whole_request_is_bounded(nursery: trio.Nursery, queue_dir: Path) -> None:
    # Each reply comes within the time limit, but open OK, lookup BAD, then
    # BAD to both opens add up to more than CALL_TIMEOUTS limits: RETRY.
    await start(nursery, queue_dir, delay=0.15, forced=[Status.OK, Status.BAD, Status.BAD])
    proxy = table(queue_dir, timeout=0.2)
    started = trio.current_time()
    outcome = await proxy.lookup(b"k")
    assert isinstance(outcome, Retry)
    assert outcome.timeout
    assert "within 0.6 s" in outcome.reason
    assert trio.current_time() - started < 5


async def test_no_socket(queue_dir: Path) -> None:
    proxy = table(queue_dir)
    outcome = await proxy.lookup(b"k")
    assert isinstance(outcome, Retry)
    assert f"no socket {queue_dir}/private/proxymap" in outcome.reason
    [report] = await proxy.health()
    assert not report.ok
    assert report.name == f"proxymap {queue_dir}/private/proxymap"


async def test_refused_connection_says_postfix_is_down(queue_dir: Path) -> None:
    # A socket file nobody listens on: what a stopped Postfix leaves behind.
    stale = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await stale.bind(str(queue_dir / "private" / "proxymap"))
    stale.close()
    outcome = await table(queue_dir).lookup(b"k")
    assert isinstance(outcome, Retry)
    assert "Postfix is not running" in outcome.reason


async def test_idle_connection_is_closed(nursery: trio.Nursery, queue_dir: Path) -> None:
    server = await start(nursery, queue_dir, entries={b"k": b"v"})
    proxy = table(queue_dir, idle=0.05)
    assert await proxy.lookup(b"k") == Found(b"v")
    # The watcher closes it without another lookup (ipc_idle, PXC-9).
    with trio.fail_after(5):
        await server.closed.wait()
    assert await proxy.lookup(b"k") == Found(b"v")
    assert server.connections == 2


async def test_old_connection_is_replaced(nursery: trio.Nursery, queue_dir: Path) -> None:
    server = await start(nursery, queue_dir, entries={b"k": b"v"})
    proxy = table(queue_dir, ttl=0)
    for _ in range(3):
        assert await proxy.lookup(b"k") == Found(b"v")
    assert server.connections == 4  # ipc_ttl: every use finds it too old


async def test_aclose(nursery: trio.Nursery, queue_dir: Path) -> None:
    await start(nursery, queue_dir, entries={b"k": b"v"})
    proxy = table(queue_dir)
    assert await proxy.lookup(b"k") == Found(b"v")
    await proxy.aclose()
    await proxy.aclose()
    assert isinstance(await proxy.lookup(b"k"), Retry)


# ------------------------------------------------------- writes, listing


async def test_writes_through_proxywrite(nursery: trio.Nursery, queue_dir: Path) -> None:
    server = await start(nursery, queue_dir, writer=True, approved={b"btree:/x/rw"})
    proxy = open_writable_map(
        "proxy:btree:/x/rw",
        OpenOptions("/", writable=True, queue_directory=str(queue_dir)),
    )
    assert isinstance(proxy, ProxyMap)
    assert proxy.target.socket == f"{queue_dir}/private/proxywrite"
    assert await proxy.update(b"k", b"v") == WRITTEN
    assert await proxy.update_many([(b"a", b"1"), (b"b", b"2")]) == WRITTEN
    assert await proxy.lookup(b"k") == Found(b"v")
    assert await proxy.delete(b"k") == WRITTEN
    assert await proxy.delete(b"k") == NotWritten("not found")
    assert server.entries == {b"a": b"1", b"b": b"2"}
    # Postfix's cache flags (PXC-8): OPEN_LOCK at open, then SYNC_UPDATE | DUP_REPLACE.
    assert server.frames[0][1] == RequestFrame(ProxyOpen(b"btree:/x/rw"), V29, FLAG_OPEN_LOCK)
    assert server.frames[1][1].request == ProxyUpdate(b"btree:/x/rw", WRITE_FLAGS, b"k", b"v")
    assert WRITE_FLAGS == 65920
    assert await proxy.update(b"a\x00", b"v") == NotWritten(
        "a key or value with a NUL byte cannot be sent to proxywrite"
    )


async def test_update_many_stops_at_the_first_failure(
    nursery: trio.Nursery, queue_dir: Path
) -> None:
    server = await start(
        nursery, queue_dir, writer=True, forced=[Status.OK, Status.OK, Status.RETRY]
    )
    proxy = table(queue_dir, writable=True)
    outcome = await proxy.update_many([(b"a", b"1"), (b"b", b"2"), (b"c", b"3")])
    assert isinstance(outcome, Retry)
    assert len(server.frames) == 3  # open, a, b: c was not sent


@pytest.mark.parametrize("generation", list(Generation))
async def test_sequence(nursery: trio.Nursery, queue_dir: Path, generation: Generation) -> None:
    entries = {b"a": b"1", b"b": b"2", b"c": b"3"}
    await start(nursery, queue_dir, generation=generation, entries=entries)
    proxy = table(queue_dir)
    assert isinstance(proxy, SequenceMap)
    assert [item async for item in proxy.sequence()] == sorted(entries.items())
    assert [item async for item in proxy.sequence()] == sorted(entries.items())


async def test_sequence_fails_when_proxymap_restarts(
    nursery: trio.Nursery, queue_dir: Path
) -> None:
    await start(nursery, queue_dir, close_after_reply=True, entries={b"a": b"1", b"b": b"2"})
    with pytest.raises(MapError, match="restarted during the listing"):
        async for _ in table(queue_dir).sequence():
            pass


async def test_sequence_failure_raises(nursery: trio.Nursery, queue_dir: Path) -> None:
    await start(nursery, queue_dir, approved=set())
    with pytest.raises(MapError, match="proxy_read_maps"):
        async for _ in table(queue_dir).sequence():
            pass


# ------------------------------------------------------------- registry


def test_proxy_specs() -> None:
    options = OpenOptions("/")
    for spec in ("proxy:hash:/x", "proxy:btree:/var/lib/postfix/postscreen_cache_map"):
        validate_spec(spec, options)
        validate_spec(spec, OpenOptions("/", writable=True))
    validate_spec("proxy:texthash:/x", options)
    validate_spec("proxy:proxy:hash:/x", options)
    with pytest.raises(MapError, match="cannot be written"):
        validate_spec("proxy:texthash:/x", OpenOptions("/", writable=True))
    with pytest.raises(MapError, match="cannot be written"):
        validate_spec("proxy:cdb:/x", OpenOptions("/", writable=True))
    assert {"btree", "hash", "lmdb"} <= PROXYWRITE_TYPES


def test_open_needs_the_queue_directory() -> None:
    with pytest.raises(MapError, match="queue_directory"):
        open_map("proxy:hash:/x", OpenOptions("/"))


def test_targets() -> None:
    target = parse_proxy_target("proxy:hash:/x", queue_directory="/q", writable=False)
    # Sent as configured after the first proxy:; listed with one proxy: (PXC-7).
    assert target.table == "proxy:hash:/x"
    assert target.listed_as == "proxy:hash:/x"
    assert target.socket == "/q/private/proxymap"
    assert target.parameter == "proxy_read_maps"
    writer = parse_proxy_target("btree:/y", queue_directory="/q", writable=True)
    assert writer.socket == "/q/private/proxywrite"
    assert writer.parameter == "proxy_write_maps"
    assert writer.inner_type == "btree"


async def test_opened_through_the_registry(nursery: trio.Nursery, queue_dir: Path) -> None:
    await start(nursery, queue_dir, generation=V311, entries={b"k": b"v"})
    options = OpenOptions("/", queue_directory=str(queue_dir), proxymap_protocol="3.11")
    proxy = open_map("proxy:hash:/x", options)
    assert isinstance(proxy, HealthReporting)
    assert isinstance(proxy, SequenceMap)
    assert await proxy.lookup(b"k") == Found(b"v")
    assert isinstance(proxy, ProxyMap)
    assert proxy.generation is V311
    auto = open_map("proxy:hash:/x", OpenOptions("/", queue_directory=str(queue_dir)))
    assert await auto.lookup(b"k") == Found(b"v")
    writable = open_map(
        "proxy:hash:/x", OpenOptions("/", writable=True, queue_directory=str(queue_dir))
    )
    assert isinstance(writable, WritableMap)


def test_socket_paths_fit() -> None:
    # A reminder for the fixture: AF_UNIX paths hold 107 bytes.
    assert len(os.path.join("/tmp/pxqXXXXXXXX", "private", "proxywrite")) < 107


# ---------------------------------------------------------- configuration


def _load(tmp_path: Path, body: str) -> BridgeConfig:
    path = tmp_path / "bridge.toml"
    path.write_text(
        '[[listen]]\nendpoint = "inet:127.0.0.1:10027"\nprotocol = "socketmap"\n'
        f"[tables.t]\n{body}\n"
    )
    return load_config(str(path))


async def test_table_settings_reach_the_map(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        'backup = "proxy:btree:/var/lib/postfix/postscreen_cache_map"\n'
        'queue_directory = "spool"\nproxymap_protocol = "3.11"\nwritable = true\n',
    )
    settings = config.tables["t"]
    # A relative queue_directory is relative to the file that names it.
    assert settings.queue_directory == str(tmp_path / "spool")
    assert settings.proxymap_protocol == "3.11"
    opened = Table.open(settings)
    try:
        health = await opened.probe()
        [backup] = health.backup
        assert backup.name == f"proxywrite {tmp_path}/spool/private/proxywrite"
        assert not backup.ok
    finally:
        await opened.aclose()


def test_defaults_and_bad_values(tmp_path: Path) -> None:
    settings = _load(tmp_path, 'backup = "proxy:hash:/etc/postfix/x"\n').tables["t"]
    assert settings.queue_directory == "/var/spool/postfix"
    assert settings.proxymap_protocol == "auto"
    with pytest.raises(ConfigError, match="proxymap_protocol: must be"):
        _load(tmp_path, 'proxymap_protocol = "3.7"\n')
    with pytest.raises(ConfigError, match="queue_directory: empty value"):
        _load(tmp_path, 'queue_directory = ""\n')
    with pytest.raises(ConfigError, match="proxy_read_maps"):
        _load(tmp_path, 'backup = "hash:/etc/postfix/x"\n')
    with pytest.raises(ConfigError, match="cannot be written"):
        _load(tmp_path, 'backup = "proxy:texthash:/etc/postfix/x"\nwritable = true\n')
