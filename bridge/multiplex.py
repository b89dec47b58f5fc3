"""Serving many connections from one task: the event-driven hot path (``serving = "events"``).

Theory of operation
-------------------
Every Postfix daemon keeps its own connection and asks one key at a
time, so a busy Postfix means many connections with one request each in
flight. Serving each from its own task (:mod:`bridge.server`'s
``serving = "tasks"``) costs a trip through trio's scheduler and an
epoll registration per request and connection. Here one task owns an
``epoll`` holding every client socket of the server (edge-triggered),
waits for it with ``trio.lowlevel.wait_readable`` like for any socket,
and then, in one pass, reads every connection that became readable,
parses every complete request, and:

* answers at once what needs no waiting: a hot-cache hit
  (:meth:`bridge.table.Table.cached`), an unknown table, a malformed
  request; the reply is written with one non-blocking ``send``;
* starts one task per request that needs memcache or the backup. All
  lookups started in one pass run in the same scheduler round, so the
  memcache client can send their keys together (one pipelined batch).
  The task answers, then goes on with requests the client already
  pipelined behind it, and hands the connection back to the loop.

After answering, the task tries the client's socket for its next
request for up to the listener's ``busy_poll_us`` (only while no other
task is ready): with few clients the next request arrives within
microseconds, and serving it from the same task saves the loop's epoll
round and a new task. Such a task yields to the others after each
request it took this way (every :data:`_SPUN_REQUESTS_PER_TURN` when its
connection is the only one).

A connection that is being answered ("busy") is not read: requests are
answered one at a time and in order (SM-13), and a client that pipelines
without reading cannot make the bridge buffer without bound. An edge
that arrives meanwhile is remembered (``unread``) and served when the
answer is out.

Deadlines are a heap with at most one live entry per connection: the
idle timeout from the last byte in or out, and ``request_timeout`` from
the first byte of a request that has not completed (slow senders). An
entry that falls due for a connection whose deadline moved later is
pushed again, so a busy connection costs no heap work per request. A
timer task sleeps until the earliest entry (and is woken to re-arm when
an earlier one is pushed), so the serving loop's wait needs no time
limit: a pass costs no cancel scope.

Resource handling
-----------------
The loop runs in the server's connection nursery, and so do the answer
tasks: shutdown (:meth:`Multiplexer.stop`) ends the loop, which closes
every connection waiting for a request; a busy connection finishes the
requests it already received and closes itself. Each connection's slot
(``max_connections``) is released when it closes. The epoll object is
closed when the loop ends; closing a socket removes it from the epoll.

Error handling
--------------
Whatever goes wrong with one connection (a reset, a client that does not
read its replies for :data:`bridge.server.WRITE_TIMEOUT`, an unexpected
exception) closes that connection only. Backend failures are outcomes,
answered TEMP/TIMEOUT like everywhere else.
"""

from __future__ import annotations

import heapq
import itertools
import math
import select
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol, TypeAlias

import trio

from bridge import metrics, netio
from bridge.config import ListenerConfig
from bridge.dialect import (
    DIALECTS,
    WRITE_TIMEOUT,
    Dialect,
    ServerCodec,
    connection_ends,
    log_bad_request,
    reply_for,
    table_of,
)
from bridge.outcome import ConfigFailure, Outcome
from bridge.protocol.events import NEED_DATA, BadRequest, ConnectionClosed, LookupRequest
from bridge.table import Table

#: Whether this platform can multiplex (Linux); elsewhere "events" listeners use tasks.
AVAILABLE: Final = hasattr(select, "epoll")

#: Bytes read from a client at a time; a socketmap request is small, and
#: a read that fills this means more may be waiting.
_RECEIVE_SIZE: Final = 65536

#: Reads of one connection per pass before others get their turn: a client
#: that floods pipelined requests must not hold the loop.
_READS_PER_TURN: Final = 4

#: Stale deadline entries tolerated before the heap is rebuilt without them
#: (when they are also half of it): rebuilding costs a pass over the heap,
#: keeping them costs the closed connections' memory until they fall due.
_STALE_ENTRIES_KEPT: Final = 256

#: Requests an answer task serving the only connection may take from its
#: client's socket by busy-polling before it yields: a scheduler round per
#: request costs about as much as the request, and nothing but accepts and
#: timers waits. With other connections it yields after every request:
#: holding the loop for several raises their tail latency.
_SPUN_REQUESTS_PER_TURN: Final = 8

#: Events taken from the epoll per pass; the rest stay ready for the next.
_MAX_EVENTS: Final = 1024

#: Epoll flags saying the peer closed its side or the connection failed.
_HANGUP: Final = (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR) if AVAILABLE else 0

#: Edge-triggered: a connection is reported when bytes arrive, not while
#: they wait, so a busy connection costs nothing until it is served again.
_EPOLL_EVENTS: Final = (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET) if AVAILABLE else 0


class _Host(Protocol):
    """What the multiplexer needs of :class:`bridge.server.BridgeServer`."""

    @property
    def tables(self) -> Mapping[str, Table]: ...

    async def lookup(self, table_name: str, key: bytes) -> Outcome: ...


@dataclass(frozen=True, slots=True)
class _Unsent:
    """A reply that did not fit the socket buffer: a task waits to write the rest."""

    data: bytes
    then_close: bool = False


class _Close:
    """The connection is done: end of stream, a fatal bad request, or shutdown."""


_CLOSE: Final = _Close()

#: What a connection needs next: nothing (wait for bytes), a lookup, a write, or closing.
_Work: TypeAlias = LookupRequest | _Unsent | _Close | None


class _Client:
    """One client connection served by the loop."""

    __slots__ = (
        "busy",
        "closed",
        "codec",
        "config",
        "connection",
        "deadline",
        "dialect",
        "due",
        "fd",
        "hangup",
        "last_active",
        "listener",
        "release",
        "request_started",
        "scheduled",
        "sock",
        "unread",
    )

    def __init__(
        self,
        connection: netio.Connection,
        config: ListenerConfig,
        release: Callable[[], None],
        now: float,
    ) -> None:
        self.connection = connection
        self.sock: socket.socket = connection.sock
        self.fd = connection.sock.fileno()
        self.config = config
        self.listener = str(config.endpoint)
        self.dialect: Dialect = DIALECTS[config.protocol]
        self.codec: ServerCodec = self.dialect.new_codec()
        self.release = release
        #: A task is answering (or writing): the loop does not read.
        self.busy = False
        #: Bytes may be waiting that nobody has read yet.
        self.unread = False
        #: The peer closed or reset: read until end of stream, edges or not.
        self.hangup = False
        self.closed = False
        self.last_active = now
        #: When the request in progress started; None between requests.
        self.request_started: float | None = None
        #: When the connection must close unless something happens.
        self.deadline = math.inf
        #: Sequence number of the connection's live heap entry (0 = none),
        #: and when that entry falls due.
        self.scheduled = 0
        self.due = math.inf


class Multiplexer:
    """Serve connections of ``serving = "events"`` listeners from one task.

    Args:
      host: the server: its tables (looked up at request time, so a reload
        swaps them between two requests) and its lookup.
    """

    def __init__(self, host: _Host) -> None:
        self._host = host
        self._epoll = select.epoll()
        self._clients: dict[int, _Client] = {}
        self._heap: list[tuple[float, int, _Client]] = []
        self._sequence = itertools.count(1)
        #: Heap entries of closed connections or superseded by an earlier one.
        self._stale_entries = 0
        #: Connections with bytes left to read after their turn in a pass.
        self._again: list[_Client] = []
        self._stopping = False
        #: Ends the loop at shutdown.
        self._stop_scope: trio.CancelScope | None = None
        #: The deadline timer's sleep, and when it wakes.
        self._timer_scope: trio.CancelScope | None = None
        self._timer_at = math.inf
        # Every read lands here first: recv() of a fresh 64 KiB object per
        # read costs a large allocation each time, for a request of ~50 bytes.
        self._buffer = bytearray(_RECEIVE_SIZE)
        self._view = memoryview(self._buffer)

    # ------------------------------------------------------------ lifecycle

    def add(
        self, connection: netio.Connection, config: ListenerConfig, release: Callable[[], None]
    ) -> None:
        """Serve an accepted connection; ``release`` frees its slot when it closes."""
        metrics.current.connection_opened(str(config.endpoint))
        client = _Client(connection, config, release, trio.current_time())
        if self._stopping:
            self._close(client)
            return
        self._clients[client.fd] = client
        # Bytes that arrived before this are reported at once (EPOLL_CTL_ADD
        # checks readiness), so nothing is missed between accept and here.
        self._epoll.register(client.fd, _EPOLL_EVENTS)
        self._schedule(client)

    def stop(self) -> None:
        """Shutdown: stop serving; connections waiting for a request close now."""
        self._stopping = True
        if self._stop_scope is not None:
            self._stop_scope.cancel()

    async def run(self, nursery: trio.Nursery) -> None:
        """The serving loop, until :meth:`stop`; answer tasks are started in ``nursery``."""
        epoll = self._epoll
        try:
            with trio.CancelScope() as stop_scope:
                self._stop_scope = stop_scope
                if self._stopping:
                    stop_scope.cancel()
                async with trio.open_nursery() as timer:
                    timer.start_soon(self._expire_when_due)
                    await self._serve_forever(epoll, nursery)
        finally:
            for client in list(self._clients.values()):
                if not client.busy:
                    self._close(client)
            epoll.close()

    async def _serve_forever(self, epoll: select.epoll, nursery: trio.Nursery) -> None:
        # No time limit on the wait: deadlines are _expire_when_due's, so a
        # pass costs no cancel scope (a deadline registered and removed).
        while True:
            again, self._again = self._again, []
            if again:
                # Someone still has bytes to read: look at the others, but do not sleep.
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.wait_readable(epoll.fileno())
            for fd, mask in epoll.poll(0, _MAX_EVENTS):
                client = self._clients.get(fd)
                if client is None:
                    continue
                if mask & _HANGUP:
                    client.hangup = True
                if client.busy:
                    client.unread = True
                else:
                    self._serve(client, nursery, read=True)
            for client in again:
                if not client.busy and not client.closed and client.unread:
                    self._serve(client, nursery, read=True)

    async def _expire_when_due(self) -> None:
        """Close connections at their deadlines; woken early when an earlier one is pushed."""
        while True:
            with trio.CancelScope() as scope:
                self._timer_scope = scope
                self._timer_at = self._next_deadline()
                await trio.sleep_until(self._timer_at)
            self._timer_scope = None
            self._expire(trio.current_time())

    # ------------------------------------------------------------- serving

    def _serve(self, client: _Client, nursery: trio.Nursery, *, read: bool) -> None:
        """Read and answer what can be answered now; start a task for the rest."""
        work: _Work = _CLOSE  # unless the connection survives the pass
        with connection_ends(client.listener):
            work = self._progress(client, read=read)
        if work is None:
            self._schedule(client)
        elif isinstance(work, _Close):
            self._close(client)
        else:
            client.busy = True
            nursery.start_soon(self._answer, client, work)

    def _progress(self, client: _Client, *, read: bool) -> _Work:
        """Handle what the codec holds, reading more (if asked or bytes wait) until work comes up.

        Requests already buffered come first: reading ahead could take in
        the end of stream, and a request parsed after it is answered
        differently (nobody is left to send a PERM reply to).
        """
        for _ in range(_READS_PER_TURN):
            work = self._advance(client)
            if work is not None or not (read or client.unread):
                return work
            read = False
            client.unread = False
            self._receive(client)
        work = self._advance(client)
        if work is None and client.unread:
            self._again.append(client)
        return work

    def _receive(self, client: _Client) -> None:
        """One non-blocking read into the codec; end of stream and resets feed b""."""
        try:
            size = client.sock.recv_into(self._buffer)
        except BlockingIOError:
            return
        except OSError:
            size = 0
        self._take(client, size)

    def _take(self, client: _Client, size: int) -> None:
        """Feed the ``size`` bytes just read into the buffer (0: end of stream) to the codec."""
        data = self._view[:size].tobytes()
        if size == _RECEIVE_SIZE or (size and client.hangup):
            # A short read usually drained the socket, but an end of stream
            # queued behind the bytes raises no new edge.
            client.unread = True
        client.last_active = trio.current_time()
        client.codec.receive_data(data)

    def _advance(self, client: _Client) -> _Work:
        """Handle the codec's events until one needs waiting (or there are none)."""
        codec = client.codec
        dialect = client.dialect
        while True:
            event = codec.next_event()
            if event is NEED_DATA:
                return _CLOSE if self._stopping else None
            if isinstance(event, ConnectionClosed):
                return _CLOSE
            if isinstance(event, BadRequest):
                log_bad_request(dialect, client.connection.peer(), event)
                unsent = self._send_now(client, dialect.encode_bad_request(event))
                if unsent or event.fatal:
                    return _Unsent(unsent, then_close=event.fatal)
                continue
            assert isinstance(event, LookupRequest)
            started = time.perf_counter()
            name = table_of(event, client.config)
            table = self._host.tables.get(name)
            outcome: Outcome | None
            if table is None:
                outcome = ConfigFailure(f"no table named {name!r}")
            else:
                outcome = table.cached(event.key)
            if outcome is None:
                return event
            reply = reply_for(dialect, name, outcome, time.perf_counter() - started)
            unsent = self._send_now(client, reply)
            if unsent:
                return _Unsent(unsent)

    def _spin_for_request(self, client: _Client) -> bool:
        """Try the client's socket for up to ``busy_poll_us`` before handing it back to the loop.

        Only while no other task is ready (asked once: nothing can become
        ready while this runs). A Postfix client sends its next request
        right after reading a reply, so with few clients the request often
        arrives within microseconds, and catching it here saves the loop's
        epoll round and a new task. True when bytes (or the end of stream)
        were read into the codec.
        """
        spin = client.config.busy_poll_us
        if not spin or self._stopping or netio.others_ready():
            return False
        deadline = time.perf_counter() + spin / 1_000_000
        sock = client.sock
        while True:
            try:
                size = sock.recv_into(self._buffer)
            except BlockingIOError:
                if time.perf_counter() >= deadline:
                    return False
                continue
            except OSError:
                size = 0
            self._take(client, size)
            return True

    def _send_now(self, client: _Client, data: bytes) -> bytes:
        """Write what fits the socket buffer now; the rest is returned."""
        try:
            sent = client.sock.send(data)
        except BlockingIOError:
            return data
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise trio.BrokenResourceError(str(exc)) from None
        client.last_active = trio.current_time()
        return data[sent:]

    async def _answer(self, client: _Client, work: _Work) -> None:
        """Do a connection's waiting work, and what follows it, then give it back to the loop."""
        done = False
        spun = 0
        try:
            with connection_ends(client.listener):
                while work is not None:
                    if isinstance(work, _Close):
                        break
                    if isinstance(work, LookupRequest):
                        name = table_of(work, client.config)
                        started = time.perf_counter()
                        outcome = await self._host.lookup(name, work.key)
                        data = reply_for(
                            client.dialect, name, outcome, time.perf_counter() - started
                        )
                        await client.connection.send_all(data, stall_limit=WRITE_TIMEOUT)
                    else:
                        await client.connection.send_all(work.data, stall_limit=WRITE_TIMEOUT)
                        if work.then_close:
                            break
                    client.last_active = trio.current_time()
                    work = self._progress(client, read=client.unread)
                    if work is None and self._spin_for_request(client):
                        # The next request came while spinning: serve it from this
                        # task, letting the others have their turn (their sockets'
                        # readiness is only seen when trio polls) after each
                        # request, or every few when this is the only connection.
                        spun += 1
                        if len(self._clients) > 1 or spun % _SPUN_REQUESTS_PER_TURN == 0:
                            await trio.lowlevel.checkpoint()
                        work = self._progress(client, read=False)
                else:
                    done = True
        finally:
            client.busy = False
            if done and not client.closed:
                self._schedule(client)
            else:
                self._close(client)

    # ----------------------------------------------------------- deadlines

    def _schedule(self, client: _Client) -> None:
        """Work out when the connection must close, and make sure the heap knows in time."""
        config = client.config
        deadline = math.inf
        if config.idle_timeout > 0:
            deadline = client.last_active + config.idle_timeout
        if client.codec.request_in_progress:
            if client.request_started is None:
                client.request_started = trio.current_time()
            if config.request_timeout > 0:
                deadline = min(deadline, client.request_started + config.request_timeout)
        else:
            client.request_started = None
        client.deadline = deadline
        # A later deadline reuses the entry already in the heap (_expire pushes
        # it again when it falls due); only an earlier one needs a new entry.
        if deadline < client.due:
            self._push(client, deadline)

    def _push(self, client: _Client, when: float) -> None:
        if client.scheduled:
            self._stale_entries += 1
        client.scheduled = next(self._sequence)
        client.due = when
        heapq.heappush(self._heap, (when, client.scheduled, client))
        if when < self._timer_at and self._timer_scope is not None:
            self._timer_scope.cancel()  # re-arm the timer for the earlier deadline

    def _compact(self) -> None:
        """Drop the entries of closed connections: a closed connection must not stay in memory."""
        self._heap = [
            entry for entry in self._heap if not entry[2].closed and entry[1] == entry[2].scheduled
        ]
        heapq.heapify(self._heap)
        self._stale_entries = 0

    def _next_deadline(self) -> float:
        return self._heap[0][0] if self._heap else math.inf

    def _expire(self, now: float) -> None:
        """Close connections whose deadline passed; re-queue those whose deadline moved."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, sequence, client = heapq.heappop(heap)
            if client.closed or sequence != client.scheduled:
                self._stale_entries -= 1
                continue  # closed, or superseded by an earlier entry
            client.scheduled = 0
            client.due = math.inf
            if client.busy:
                continue  # its task reschedules it when it hands the connection back
            if client.deadline <= now:
                self._close(client)
            elif client.deadline < math.inf:
                self._push(client, client.deadline)

    def _close(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        if self._clients.get(client.fd) is client:
            del self._clients[client.fd]
        if client.scheduled:
            self._stale_entries += 1
            if self._stale_entries > _STALE_ENTRIES_KEPT and self._stale_entries * 2 > len(
                self._heap
            ):
                self._compact()
        metrics.current.connection_closed(client.listener)
        client.release()
        # Closing the socket also removes it from the epoll.
        client.connection.close()
