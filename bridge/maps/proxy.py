"""``proxy:`` tables: Postfix's own tables, through Postfix's proxymap(8) (PXC-1 .. PXC-10).

``backup = proxy:TYPE:NAME`` reaches any table Postfix can open
(``hash:``, ``btree:``, ``cdb:``, ``ldap:`` ...) the way Postfix's own
daemons do: over the unix socket ``$queue_directory/private/proxymap``,
or ``private/proxywrite`` when the table is opened writable (PXC-1).
Postfix must run on the same host, the table must be listed in
``proxy_read_maps`` (``proxy_write_maps`` for proxywrite) as
``proxy:TYPE:NAME`` (PXC-7), and the bridge's user must be able to enter
``private/``, which is Postfix's alone by default (see README).

Theory of operation
-------------------
:class:`ProxyMap` is a :class:`~bridge.maps._lookup_server.LookupServerClient`:
one connection, one request at a time, each send and read wait bounded
(``timeout``), one transparent reconnect when proxymap went away. That is
common: the read-only proxymap exits when a table file changes (PXC-9),
the next time it accepts a connection. The codec is
:mod:`bridge.protocol.proxymap`.

* **Open and protocol generation** (PXC-5). Before its first request a
  table sends ``open``: in the 2.9-3.10 form, or in the form remembered
  for the socket, or the one forced by ``proxymap_protocol``. An open
  answered BAD is tried once more in the other form, on a fresh
  connection; the form that worked is remembered for the socket, so other
  tables on it start right. A BAD later on (Postfix was upgraded under a
  running bridge) forgets it, and the request is sent once more after a
  new open. Only OK marks the table open: after a DENY the next request
  opens again, so adding the table to ``proxy_read_maps`` and ``postfix
  reload`` are enough, without restarting the bridge.
* **Flags** (PXC-8). Keys arrive folded (or not, per ``fold_case``):
  FOLD_FIX is never sent. Read-only tables open with flags 0 and send
  LOCK | UTF8_REQUEST (UTF8_REQUEST only with ``smtputf8``), as
  ``postmap -q`` does; writable ones open with OPEN_LOCK and send
  OPEN_LOCK | SYNC_UPDATE | DUP_REPLACE, exactly as Postfix's own caches
  behind proxywrite do, so that proxywrite opens the table once for both
  (a second open of a table it holds with OPEN_LOCK would be fatal to
  it). In the 3.11 form, ``instance_flags`` is that request set, and
  ``flags`` echoes the last reply's, as the 3.11 client does.
* **Connections** (PXC-3, PXC-9). An announcement, when the server sends
  one, is dropped before the first reply. A connection idle for
  :data:`IDLE_SECONDS` is closed (a watcher task closes it even when no
  lookup follows, as Postfix's ``ipc_idle`` does), one older than
  :data:`TTL_SECONDS` is replaced before its next use (``ipc_ttl``), and
  one with bytes waiting before a request is sent (the server closed it,
  or sent something unasked) is replaced too.
* **Statuses** (PXC-6). OK is found, NOKEY not found; RETRY is
  ``Retry``; DENY, CONFIG and BAD are ``ConfigFailure``, DENY with the
  exact main.cf line to add. A status outside the six is worth one more
  try on a fresh connection, then ``Retry``. Nothing is retried forever.

Error handling
--------------
Lookups, updates and deletes never raise for proxymap trouble; they
return ``Retry`` or ``ConfigFailure``, never "not found". ``sequence``
raises :class:`~bridge.maps.base.MapError`, also when proxymap was
restarted in the middle of a listing (its position is lost with it).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import select
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Final

import trio
import trio.lowlevel

from bridge.endpoint import UnixEndpoint
from bridge.maps._lookup_server import (
    DEFAULT_TIMEOUT,
    AttemptFailed,
    LookupServerClient,
    ServerConnection,
)
from bridge.maps.base import BackendHealth, MapError, OpenOptions, TableType
from bridge.outcome import (
    NOT_FOUND,
    WRITTEN,
    ConfigFailure,
    NotWritten,
    Outcome,
    Retry,
    WriteOutcome,
    found_value,
)
from bridge.protocol.events import NEED_DATA
from bridge.protocol.proxymap import (
    FLAG_DUP_REPLACE,
    FLAG_IMPL_MASK,
    FLAG_LOCK,
    FLAG_OPEN_LOCK,
    FLAG_SYNC_UPDATE,
    FLAG_UTF8_REQUEST,
    AttrDecoder,
    AttrList,
    Generation,
    ProxyDelete,
    ProxyLookup,
    ProxymapError,
    ProxyOpen,
    ProxyReply,
    ProxyRequest,
    ProxySequence,
    ProxyUpdate,
    RequestKind,
    SequenceFunction,
    Status,
    decode_attributes,
    encode_attributes,
    encode_request,
    is_announcement,
    parse_reply,
    request_kind,
)

__all__ = [
    "CALL_TIMEOUTS",
    "IDLE_SECONDS",
    "PROXYWRITE_TYPES",
    "TABLE_TYPE",
    "TTL_SECONDS",
    "ProxyMap",
    "ProxyTarget",
    "forget_generations",
    "parse_proxy_target",
    "proxy_suggestion",
]

_log = logging.getLogger("bridge.maps")

_PREFIX: Final = "proxy:"

#: Postfix closes a proxymap connection idle this long (``ipc_idle``, PXC-9).
IDLE_SECONDS: Final = 5.0
#: ... and replaces one this old (``ipc_ttl``).
TTL_SECONDS: Final = 1000.0

#: A request, with the open before it and any retries, takes at most this
#: many time limits in all (each connect, send and read has one of its own).
CALL_TIMEOUTS: Final = 3

#: Table types Postfix can change through proxywrite: those whose update
#: works on a table opened read-write without truncation (``dict_db.c``,
#: ``dict_dbm.c``, ``dict_sdbm.c``, ``dict_lmdb.c``, ``dict_memcache.c``).
#: cdb is not among them: Postfix writes a cdb only by rebuilding it.
PROXYWRITE_TYPES: Final = frozenset({"btree", "hash", "lmdb", "sdbm", "dbm", "memcache"})

#: Postfix table types the bridge does not read itself but proxymap can
#: serve: an unsupported type among these gets a ``proxy:`` suggestion.
_PROXIABLE_TYPES: Final = frozenset(
    {
        "btree",
        "hash",
        "dbm",
        "sdbm",
        "cdb",
        "lmdb",
        "cidr",
        "regexp",
        "pcre",
        "ldap",
        "mysql",
        "pgsql",
        "sqlite",
        "memcache",
        "nis",
        "nisplus",
        "unix",
        "unionmap",
        "pipemap",
        "randmap",
        "environ",
    }
)

#: Postfix type names: lower-case letters and digits.
_TYPE_NAME: Final = re.compile(r"[a-z][a-z0-9_]*", re.ASCII)

#: Where the 2.9-3.10 and 3.11 forms are remembered, by socket path (PXC-5
#: bridge note): every table on one proxymap service speaks its form.
_GENERATIONS: dict[str, Generation] = {}

#: Statuses that end an exchange; anything else earns one more try (PXC-6).
_KNOWN_STATUSES: Final = frozenset(int(status) for status in Status)


def forget_generations() -> None:
    """Forget every remembered protocol form (for tests that start new servers)."""
    _GENERATIONS.clear()


# ------------------------------------------------------------ table names


@dataclass(frozen=True, slots=True)
class ProxyTarget:
    """Where a ``proxy:`` table's requests go, and what they name.

    Attributes:
      table: the ``table`` attribute sent: the configured name after
        ``proxy:``, as Postfix's client sends it (PXC-7).
      listed_as: the entry ``proxy_read_maps``/``proxy_write_maps`` must
        hold: every ``proxy:`` removed, then one put back.
      inner_type: the table type proxymap opens (``hash``, ``btree`` ...).
      service: ``proxymap`` (read-only) or ``proxywrite``.
      socket: the service's socket, ``$queue_directory/private/SERVICE``.
    """

    table: str
    listed_as: str
    inner_type: str
    service: str
    socket: str

    @property
    def parameter(self) -> str:
        """The main.cf parameter that must list the table."""
        return "proxy_write_maps" if self.service == "proxywrite" else "proxy_read_maps"

    @property
    def approval_hint(self) -> str:
        """What to do when proxymap refuses the table."""
        return f"add {self.listed_as} to {self.parameter} in main.cf and run postfix reload"


def _strip_proxy(name: str) -> str:
    while name.startswith(_PREFIX):
        name = name[len(_PREFIX) :]
    return name


def _check_name(name: str) -> tuple[str, str]:
    """The inner type and the inner ``TYPE:NAME`` of a ``proxy:`` name part.

    Raises:
      MapError: what is wrong with it.
    """
    inner = _strip_proxy(name)
    inner_type, colon, inner_name = inner.partition(":")
    if not colon or not inner_type or not inner_name:
        raise MapError(
            f"missing table after 'proxy:' in {name!r}: use proxy:TYPE:NAME, "
            "e.g. proxy:hash:/etc/postfix/aliases"
        )
    if not _TYPE_NAME.fullmatch(inner_type):
        raise MapError(f"invalid table type {inner_type!r} in proxy:{name}")
    if any(char.isspace() or char == "," or not char.isprintable() for char in inner):
        # proxy_read_maps is split at whitespace and commas: such a name
        # could never be approved (PXC-7), and NUL cannot be sent (PXC-2).
        raise MapError(
            f"table name proxy:{name!r} holds whitespace, a comma or a control character: "
            "Postfix cannot list it in proxy_read_maps"
        )
    return inner_type, inner


def parse_proxy_target(name: str, *, queue_directory: str, writable: bool) -> ProxyTarget:
    """Parse what follows ``proxy:`` and find the socket to use (PXC-1, PXC-7).

    Args:
      name: ``TYPE:NAME``; further ``proxy:`` prefixes are allowed, as in
        Postfix.
      queue_directory: Postfix's ``queue_directory``.
      writable: use proxywrite instead of proxymap.

    Raises:
      MapError: the name is not ``TYPE:NAME``, or cannot be listed in main.cf.
    """
    inner_type, inner = _check_name(name)
    service = "proxywrite" if writable else "proxymap"
    return ProxyTarget(
        table=name,
        listed_as=_PREFIX + inner,
        inner_type=inner_type,
        service=service,
        socket=os.path.join(queue_directory, "private", service),
    )


def proxy_suggestion(table_type: str, spec: str) -> str | None:
    """How to reach an unsupported Postfix table type through proxymap, or None.

    For the registry's "unsupported table type" error: ``hash:``,
    ``btree:`` and the other Postfix types the bridge does not read itself
    can be served by proxymap (PXC-7).
    """
    if table_type not in _PROXIABLE_TYPES:
        return None
    proxied = _PREFIX + spec
    return (
        f"serve it through Postfix's proxymap instead: {proxied} (and list {proxied} "
        "in proxy_read_maps, or in proxy_write_maps for a writable table)"
    )


def _writable(name: str) -> bool:
    inner_type = _strip_proxy(name).partition(":")[0]
    return inner_type in PROXYWRITE_TYPES


# ------------------------------------------------------------ connection


def _connect_hint(error: int | None, target: ProxyTarget) -> str:
    """Why a connect to the service may have failed, and what to do (short: replies cut at 200)."""
    if error in (errno.EACCES, errno.EPERM):
        return (
            ": run the bridge as user postfix, or let its user search "
            f"{os.path.dirname(target.socket)} (see README)"
        )
    if error == errno.ENOENT:
        return f": no socket {target.socket}: check queue_directory; does Postfix run here?"
    if error == errno.ECONNREFUSED:
        return ": Postfix is not running"
    return ""


class _ProxymapConnection(ServerConnection):
    """The base connection, plus its age and a check for bytes nobody asked for."""

    def __init__(self, spec: str, target: ProxyTarget, *, timeout: float) -> None:
        super().__init__(spec, UnixEndpoint(target.socket), timeout=timeout)
        self._target = target
        #: trio time of the last connect
        self.connected_at = 0.0
        #: connections made so far; a listing must stay on one (PXC-9)
        self.serial = 0

    async def connect(self) -> None:
        """Connect to the service; failures name the likely cause (PXC-1).

        Raises:
          AttemptFailed: the connect failed or timed out.
        """
        try:
            with trio.fail_after(self._timeout):
                self._stream = await trio.open_unix_socket(self._target.socket)
        except trio.TooSlowError:
            reason = f"table {self._spec}: connect to {self._target.socket} timed out"
            raise AttemptFailed(Retry(reason, timeout=True), peer_closed=False) from None
        except OSError as exc:
            reason = (
                f"table {self._spec}: cannot connect to {self._target.service}: "
                f"{exc.strerror or exc}{_connect_hint(exc.errno, self._target)}"
            )
            raise AttemptFailed(Retry(reason), peer_closed=False) from None
        self.connected_at = trio.current_time()
        self.serial += 1

    def readable(self) -> bool:
        """Whether the server sent something (EOF included) while nothing was asked.

        Postfix's client checks the same before reusing a connection
        (``clnt_stream.c``): such a connection is replaced.
        """
        stream = self._stream
        if not isinstance(stream, trio.SocketStream):
            return False
        try:
            ready, _, _ = select.select([stream.socket.fileno()], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(ready)


# ------------------------------------------------------------------ table


class ProxyMap(LookupServerClient):
    """A ``proxy:TYPE:NAME`` table (see the module docstring).

    Args:
      spec: the table as configured, e.g. ``proxy:hash:/etc/postfix/aliases``.
      target: where requests go and what they name (:func:`parse_proxy_target`).
      generation: force a protocol form; None detects it (PXC-5).
      smtputf8: apply the G-6 value check, and send UTF8_REQUEST (read-only
        tables; writable ones send Postfix's cache flags, PXC-8).
      timeout: seconds for the connect and for each send or read wait.
      idle: close the connection after this many idle seconds.
      ttl: replace the connection once it is this old.
    """

    _reply_errors = (ProxymapError,)

    def __init__(
        self,
        spec: str,
        target: ProxyTarget,
        *,
        generation: Generation | None = None,
        smtputf8: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        idle: float = IDLE_SECONDS,
        ttl: float = TTL_SECONDS,
    ) -> None:
        super().__init__(spec, UnixEndpoint(target.socket), timeout=timeout)
        self._proxy_connection = _ProxymapConnection(spec, target, timeout=timeout)
        self._connection = self._proxy_connection
        self._target = target
        self._table = target.table.encode("utf-8", "surrogateescape")
        self._forced = generation
        self._smtputf8 = smtputf8
        self._timeout = timeout
        self._idle = idle
        self._ttl = ttl
        self._decoder = AttrDecoder()
        self._greeting_due = False
        self._open_lock = trio.Lock()
        #: the form the table was opened in; None = open before the next request
        self._opened: Generation | None = None
        #: the table's own flags from the open reply (FIXED, PATTERN, MULTI_WRITER)
        self.table_flags = 0
        #: 3.11: the flags of the last reply, sent back with the next request
        self._echo_flags = 0
        #: why the last open was refused, for health(); None once it worked
        self._refusal: str | None = None
        self._last_used = 0.0
        self._watching = False
        if target.service == "proxywrite":
            # Exactly Postfix's caches' flags (dict_cache.c): proxywrite then
            # shares one open table with postscreen or verify on the same file.
            self._request_base = FLAG_OPEN_LOCK | FLAG_SYNC_UPDATE | FLAG_DUP_REPLACE
            self._open_base = FLAG_OPEN_LOCK
        else:
            self._request_base = FLAG_LOCK | (FLAG_UTF8_REQUEST if smtputf8 else 0)
            self._open_base = 0

    @property
    def target(self) -> ProxyTarget:
        """The socket, service and table name."""
        return self._target

    @property
    def generation(self) -> Generation | None:
        """The protocol form the table is open in; None before the first open worked."""
        return self._opened

    # ------------------------------------------------------------ requests

    async def lookup(self, key: bytes) -> Outcome:
        """Ask proxymap for ``key``, sent exactly as given (the table folded it).

        Returns:
          ``Found``, ``NOT_FOUND``, ``Retry`` (RETRY, connection or time
          trouble) or ``ConfigFailure`` (DENY, CONFIG, BAD). Never raises
          for proxymap trouble.
        """
        if b"\0" in key:
            # A Postfix key is a C string; one with NUL cannot be asked (PXC-2).
            _log.warning("table %s: key %r holds a NUL byte; answering not found", self._spec, key)
            return NOT_FOUND
        reply = await self._call(lambda flags: ProxyLookup(self._table, flags, key))
        if not isinstance(reply, ProxyReply):
            return reply
        if reply.status == Status.OK:
            return found_value(reply.value or b"", smtputf8=self._smtputf8, source=self._spec)
        if reply.status == Status.NOKEY:
            return NOT_FOUND
        return self._failure(reply.status, "look up the key")

    async def update(self, key: bytes, value: bytes) -> WriteOutcome:
        """Store ``value`` under ``key`` through proxywrite (replacing, PX-3).

        Returns:
          ``WRITTEN`` once proxywrite has stored it (synchronously), or
          ``NotWritten``/``Retry``/``ConfigFailure``.
        """
        if b"\0" in key or b"\0" in value:
            return NotWritten("a key or value with a NUL byte cannot be sent to proxywrite")
        reply = await self._call(lambda flags: ProxyUpdate(self._table, flags, key, value))
        if not isinstance(reply, ProxyReply):
            return reply
        if reply.status == Status.OK:
            return WRITTEN
        if reply.status == Status.NOKEY:
            return NotWritten(f"{self._target.service} did not store it")
        return self._failure(reply.status, "store the key")

    async def update_many(self, items: Sequence[tuple[bytes, bytes]]) -> WriteOutcome:
        """Store many entries, one request each, stopping at the first failure.

        proxywrite has no transactions: entries before a failure stay
        stored (each one synchronously), the failing one and those after
        it are not sent.
        """
        for key, value in items:
            outcome = await self.update(key, value)
            if outcome is not WRITTEN:
                return outcome
        return WRITTEN

    async def delete(self, key: bytes) -> WriteOutcome:
        """Remove ``key`` through proxywrite.

        Returns:
          ``WRITTEN``, ``NotWritten("not found")`` when it was absent, or
          ``Retry``/``ConfigFailure``.
        """
        if b"\0" in key:
            return NotWritten("not found")
        reply = await self._call(lambda flags: ProxyDelete(self._table, flags, key))
        if not isinstance(reply, ProxyReply):
            return reply
        if reply.status == Status.OK:
            return WRITTEN
        if reply.status == Status.NOKEY:
            return NotWritten("not found")
        return self._failure(reply.status, "delete the key")

    async def sequence(self) -> AsyncIterator[tuple[bytes, bytes]]:
        """Yield every entry, in the table's own order, through first/next (MC-20).

        The position lives in the proxymap process (PXC-9): two listings
        of one table at once disturb each other, and a listing cannot go
        on when proxymap restarted meanwhile.

        Raises:
          MapError: proxymap refused or failed, or restarted mid-listing.
        """
        function = SequenceFunction.FIRST
        serial: int | None = None
        while True:
            reply = await self._call(
                functools.partial(ProxySequence, self._table, function=function)
            )
            if not isinstance(reply, ProxyReply):
                raise MapError(f"cannot list the table: {reply.reason}")
            if serial is None:
                serial = self._proxy_connection.serial
            elif serial != self._proxy_connection.serial:
                raise MapError(
                    f"table {self._spec}: {self._target.service} restarted during the "
                    "listing, which lost its place: list it again"
                )
            if reply.status == Status.NOKEY:
                return
            if reply.status != Status.OK:
                failure = self._failure(reply.status, "list the table")
                raise MapError(f"cannot list the table: {failure.reason}")
            yield reply.key or b"", reply.value or b""
            function = SequenceFunction.NEXT

    async def health(self) -> list[BackendHealth]:
        """Whether the service's socket accepts a connection now, within the time limit.

        A table proxymap refused at its last open is reported too, with
        the main.cf line to add.
        """
        name = f"{self._target.service} {self._target.socket}"
        try:
            with trio.fail_after(self._timeout):
                stream = await trio.open_unix_socket(self._target.socket)
        except trio.TooSlowError:
            return [BackendHealth(name, False, "connect timed out")]
        except OSError as exc:
            detail = f"cannot connect: {exc.strerror or exc}"
            return [BackendHealth(name, False, detail + _connect_hint(exc.errno, self._target))]
        await trio.aclose_forcefully(stream)
        if self._refusal is not None:
            return [BackendHealth(name, False, self._refusal)]
        return [BackendHealth(name, True, "accepts connections")]

    # ------------------------------------------------------- the exchange

    def _flags(self, generation: Generation) -> int:
        """The ``flags`` of a request other than open."""
        return self._request_base if generation is Generation.V2_9 else self._echo_flags

    def _instance_flags(self, generation: Generation) -> int:
        """How proxymap is to open the table: a 2.9 open's flags, or 3.11's instance_flags."""
        return self._open_base if generation is Generation.V2_9 else self._request_base

    async def _call(
        self, make: Callable[[int], ProxyRequest]
    ) -> ProxyReply | Retry | ConfigFailure:
        """Open the table if due, then send ``make(flags)``, within :data:`CALL_TIMEOUTS` limits.

        Each wait has its own limit; this bounds the whole, whatever mix of
        reopens, retries and slow replies a misbehaving server causes.
        """
        with trio.move_on_after(self._timeout * CALL_TIMEOUTS):
            return await self._call_once(make)
        return Retry(
            f"table {self._spec}: no answer from {self._target.service} within "
            f"{self._timeout * CALL_TIMEOUTS:g} s",
            timeout=True,
        )

    async def _call_once(
        self, make: Callable[[int], ProxyRequest]
    ) -> ProxyReply | Retry | ConfigFailure:
        """Open the table if due, then send ``make(flags)``; a BAD reply earns one new open."""
        for attempt in (1, 2):
            generation = await self._ensure_open()
            if not isinstance(generation, Generation):
                return generation
            reply = await self._ask(make(self._flags(generation)), generation)
            if not isinstance(reply, ProxyReply):
                return reply
            if reply.status == Status.BAD and self._forced is None and attempt == 1:
                # Postfix may have been upgraded under us: open (and detect) again.
                _log.info(
                    "table %s: %s answered BAD; opening the table again",
                    self._spec,
                    self._target.service,
                )
                self._opened = None
                _GENERATIONS.pop(self._target.socket, None)
                continue
            if reply.status in (Status.OK, Status.NOKEY):
                self._refusal = None
            return reply
        raise AssertionError("unreachable: the second attempt always returns")

    async def _ensure_open(self) -> Generation | Retry | ConfigFailure:
        """Send ``open`` unless the table is open; find the protocol form (PXC-5)."""
        async with self._open_lock:
            if self._opened is not None:
                return self._opened
            first = self._forced or _GENERATIONS.get(self._target.socket, Generation.V2_9)
            forms = [first] if self._forced else [first, *(g for g in Generation if g != first)]
            for generation in forms:
                open_request = ProxyOpen(self._table)
                reply = await self._ask(open_request, generation)
                if not isinstance(reply, ProxyReply):
                    return reply
                if reply.status == Status.OK:
                    self._opened_in(generation, reply.flags or 0)
                    return generation
                if reply.status != Status.BAD:
                    failure = self._failure(reply.status, "open the table")
                    if isinstance(failure, ConfigFailure):
                        self._refusal = failure.reason
                    return failure
            tried = " and ".join(g.value for g in forms)
            hint = (
                "set proxymap_protocol to match Postfix's version"
                if self._forced
                else "is this a Postfix proxymap?"
            )
            reason = (
                f"table {self._spec}: {self._target.service} answered BAD to the open "
                f"request in the {tried} protocol form: {hint}"
            )
            self._refusal = reason
            return ConfigFailure(reason)

    def _opened_in(self, generation: Generation, flags: int) -> None:
        if _GENERATIONS.get(self._target.socket) is not generation:
            _log.info(
                "table %s: %s speaks the Postfix %s protocol",
                self._spec,
                self._target.service,
                "3.11+" if generation is Generation.V3_11 else "2.9-3.10",
            )
        _GENERATIONS[self._target.socket] = generation
        self._opened = generation
        self._refusal = None
        # A 3.7 open reply can hold other clients' request bits (PXC-8).
        self.table_flags = flags & FLAG_IMPL_MASK
        self._echo_flags = flags

    async def _ask(
        self, request: ProxyRequest, generation: Generation
    ) -> ProxyReply | Retry | ConfigFailure:
        """One request and its reply; a status outside the six is asked once more (PXC-6)."""
        kind = request_kind(request)
        try:
            data = encode_request(
                request, generation, instance_flags=self._instance_flags(generation)
            )
        except ValueError as exc:
            return ConfigFailure(
                f"table {self._spec}: cannot send the {kind.value.decode()}: {exc}"
            )
        status = -1
        for attempt in (1, 2):
            replies: list[ProxyReply | ProxymapError] = []
            keep = functools.partial(self._keep, kind=kind, generation=generation, replies=replies)
            raw = await self._exchange(data, keep)
            if isinstance(raw, Retry):
                return raw
            reply = replies[0]
            if isinstance(reply, ProxymapError):
                return Retry(f"table {self._spec}: bad reply from {self._target.service}: {reply}")
            if reply.status in _KNOWN_STATUSES:
                if generation is Generation.V3_11 and reply.flags is not None:
                    self._echo_flags = reply.flags
                return reply
            status = reply.status
            if attempt == 1:
                _log.warning(
                    "table %s: %s answered unknown status %d; asking again",
                    self._spec,
                    self._target.service,
                    status,
                )
        return Retry(f"table {self._spec}: {self._target.service} answered unknown status {status}")

    def _keep(
        self,
        raw: bytes,
        kind: RequestKind,
        generation: Generation,
        replies: list[ProxyReply | ProxymapError],
    ) -> bool:
        """Parse ``raw`` into ``replies``; False (close the connection) unless it is a good reply.

        After BAD the server may not have read the whole request, and an
        unknown status says nothing about the stream: neither connection
        is used again.
        """
        try:
            reply = parse_reply(decode_attributes(raw), kind, generation)
        except ProxymapError as exc:
            replies.append(exc)
            return False
        replies.append(reply)
        return reply.status in _KNOWN_STATUSES and reply.status != Status.BAD

    def _failure(self, status: int, what: str) -> Retry | ConfigFailure:
        """The outcome of a status that is neither OK nor NOKEY (PXC-6)."""
        service, table = self._target.service, self._target.listed_as
        if status == Status.RETRY:
            return Retry(
                f"table {self._spec}: {service} could not {what} (RETRY): see Postfix's log"
            )
        if status == Status.DENY:
            # Postfix cuts reasons at 200 characters: the fix comes early.
            reason = f"{service} refused {self._spec}: {self._target.approval_hint}"
            if reason != self._refusal:
                _log.warning("table %s: %s", self._spec, reason)
            self._refusal = reason
            return ConfigFailure(reason)
        if status == Status.CONFIG:
            return ConfigFailure(
                f"table {self._spec}: Postfix cannot use {table} (CONFIG): see Postfix's log"
            )
        if status == Status.BAD:
            return ConfigFailure(
                f"table {self._spec}: {service} found the request to {what} invalid (BAD)"
            )
        return Retry(f"table {self._spec}: {service} answered unknown status {status}")

    # -------------------------------------------- LookupServerClient hooks

    async def _attempt(self, request: bytes) -> bytes:
        """Replace a stale connection, then do the base attempt (called under the lock)."""
        connection = self._proxy_connection
        if connection.connected:
            now = trio.current_time()
            if (
                now - self._last_used >= self._idle
                or now - connection.connected_at >= self._ttl
                or connection.readable()
            ):
                await connection.close()
        try:
            return await super()._attempt(request)
        finally:
            self._last_used = trio.current_time()

    async def _on_connect(self) -> None:
        # The announcement, if any, is read with the first reply (PXC-3):
        # waiting for it here would hang on servers older than 3.6.
        self._greeting_due = True
        self._last_used = trio.current_time()
        if not self._watching:
            self._watching = True
            trio.lowlevel.spawn_system_task(self._close_when_idle, name=f"idle close {self._spec}")

    async def _close_when_idle(self) -> None:
        """Close the connection once idle or old (PXC-9); ends when it is closed."""
        connection = self._proxy_connection
        try:
            while connection.connected and not self._closed:
                deadline = min(self._last_used + self._idle, connection.connected_at + self._ttl)
                await trio.sleep_until(deadline)
                async with self._lock:
                    now = trio.current_time()
                    if connection.connected and (
                        now >= self._last_used + self._idle
                        or now >= connection.connected_at + self._ttl
                    ):
                        _log.debug("table %s: closing the idle connection", self._spec)
                        await connection.close()
        finally:
            self._watching = False

    def _new_decoder(self) -> None:
        self._decoder = AttrDecoder()

    async def _read_reply(self) -> bytes:
        while True:
            attributes = await self._next_list()
            if self._greeting_due:
                self._greeting_due = False
                if is_announcement(attributes):
                    continue
            # The attr0 form is canonical: this is the list as received.
            return encode_attributes(attributes.items)

    async def _next_list(self) -> AttrList:
        while True:
            attributes = self._decoder.next_list()
            if attributes is not NEED_DATA:
                return attributes
            self._decoder.receive_data(await self._connection.receive_some())

    def _buffered(self) -> int:
        return self._decoder.buffered_byte_count

    def _peer_closed(self, error: Exception) -> bool:
        # Only a connection that ended early is worth the reconnect.
        return isinstance(error, ProxymapError) and error.kind == "eof"


# --------------------------------------------------------------- registry


def _check(name: str, options: OpenOptions) -> None:
    _check_name(name)


def _open(spec: str, name: str, options: OpenOptions) -> ProxyMap:
    if options.queue_directory is None:
        raise MapError("proxy: tables need Postfix's queue_directory (a table setting)")
    target = parse_proxy_target(
        name, queue_directory=options.queue_directory, writable=options.writable
    )
    forced = (
        Generation(options.proxymap_protocol)
        if options.proxymap_protocol in {g.value for g in Generation}
        else None
    )
    return ProxyMap(spec, target, generation=forced, smtputf8=options.smtputf8)


#: ``proxy:`` in the registry: writable when proxywrite can write the inner type.
TABLE_TYPE: Final = TableType(
    "proxy",
    _check,
    _open,
    writable=_writable,
    summary="TYPE:NAME, any Postfix table, through Postfix's proxymap on this host",
)
