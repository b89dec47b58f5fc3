"""trio memcache client with Postfix's retry loop (spec MC-5, MC-11, MC-17).

Theory of operation
-------------------
One :class:`MemcacheClient` serves one table's memcache server. It keeps a
small pool of persistent connections, each driven by a sans-I/O
:class:`~bridge.protocol.memcache.MemcacheClientProtocol`; this module only
moves bytes and applies time limits.

Every command runs Postfix's retry loop (MC-11)::

    for attempt in 1 .. max_try:
        if attempt > 1: sleep(retry_pause)
        connect if needed; a failed connect ends the loop at once
        send, read and interpret the reply
        definitive answer -> return it
        otherwise close the connection and go round again

Coalescing
----------
Under load, many lookups are ready at the same moment: the Postfix
connections whose requests arrived together are woken in one scheduler
pass. Sending each ``get`` on its own connection costs a write, a read
and an event-loop wake-up per lookup; memcache answers pipelined commands
strictly in order, so the lookups that are ready together go to the
server as one batch instead: one write, and as few reads as the replies
need. ``get``, ``set`` and ``delete`` all join the same queue (so
backup refills travel with lookups); ``set_many`` (bulk load) and
``ping`` run alone, outside it.

The first command to arrive while no batch is being collected becomes its
*leader*. Under load (a batch of this client is in flight, or other tasks
are queued to run) the leader yields once, so that the tasks woken in the
same scheduler pass can join. Otherwise (a single client) it does not
yield, and one lookup costs what it did without coalescing; the price is
that in a burst after a quiet spell, the first command goes alone and the
rest follow as one batch. (trio's count of runnable tasks leaves out the
tasks still to run in the current pass, so it cannot tell a lone lookup
from the first of a burst.) The leader then takes the queue (at most
:data:`BATCH_COMMANDS` commands or about :data:`BATCH_BYTES` bytes; the
rest form the next batch, led by the first of them) and runs it on one
connection, idle or new, exactly as a single command would run. Commands
arriving meanwhile form the next batch, which may be in flight on
another connection at the same time. The other commands' tasks
(*followers*) sleep until the leader hands them their answer, which it
does as soon as that answer is known, not at the end of the batch.

The leader runs the batch shielded from its own cancellation while any
follower still waits: a cancelled leader would otherwise strand its
followers, with their commands already on the wire. The shield costs
nothing unbounded, since every read is bounded by ``timeout`` and every
command by ``max_try``; once no follower waits any more, the shield is
lifted and the leader's own cancellation takes effect (a leader cancelled
while shielded raises Cancelled once its batch is done). A follower that is
cancelled before its batch is taken leaves the queue; one cancelled while
its batch is in flight is abandoned: its reply is still read (it is in
the stream) and then dropped, and it is not sent again.

Error rules inside a batch
--------------------------
Order, time limits and the retry loop stay per command; one command's
failure never costs its neighbours their answers unless the connection
itself failed:

* an answer that arrives is definitive for its own command (a hit, a
  miss, ``STORED`` ...); a reply of a type the command does not expect
  fails that command's attempt only;
* a reply whose *content* breaks the protocol (a value longer than
  ``data_size_limit``, an unexpected or over-long line) while the stream
  itself is fine fails that command's attempt only; the commands queued
  behind it on the connection (which the protocol can no longer read)
  are sent again at once on a fresh connection, without counting an
  attempt and without ``retry_pause``. The same goes for the commands
  behind a value whose trailer is not ``END``: that value is still the
  answer (MC-9 step 4), but the connection is finished;
* when the *stream* fails (end of stream, a reset, a read running out of
  ``timeout``, a write error), every command still unanswered on that
  connection counts a failed attempt: after a write error all with that
  error; otherwise the first with the reason it saw, the others with
  "connection closed" (or the timeout);
* a failed connect ends the loop of every unfinished command of the
  batch at once (MC-11).

Commands with attempts left go round again after ``retry_pause`` (one
sleep per round, for all of them); those out of attempts get
:class:`~bridge.outcome.Retry` with the reason of their last failure.

Resource handling
-----------------
A connection goes back to the pool only when its protocol state is clean
(no pending reply, not broken). A batch cancelled half-way, a timeout or
a protocol error closes the connection, so a reply can never be read by
the wrong request: there is no way for key A's reply to answer key B.

Error handling
--------------
Nothing here raises for server trouble. Results are plain values or a
:class:`~bridge.outcome.Retry` carrying the reason (and whether it was a
time limit), which the table layer turns into TEMP/TIMEOUT. A command the
protocol refuses to encode (an unusable key) raises in its own caller's
task only.
"""

from __future__ import annotations

import contextlib
import logging
import socket as stdlib_socket
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import outcome
import trio

from bridge import metrics, netio
from bridge.endpoint import Endpoint, InetEndpoint
from bridge.outcome import Retry
from bridge.protocol.memcache import (
    CONNECTION_CLOSED_AFTER_ERROR,
    NEED_DATA,
    CommandFailed,
    Deleted,
    DeleteNotFound,
    GetHit,
    GetMiss,
    MemcacheClientProtocol,
    MemcacheEvent,
    Stored,
    Version,
)

_log = logging.getLogger("bridge.memcache")

#: Most idle connections kept per server. A connection is opened only
#: when no idle one is free, so the pool grows to the number of batches
#: actually in flight at once (at most one per concurrent lookup) and stays there
#: under steady load instead of opening and closing connections; this
#: caps it below memcached's default of 1024 connections for all clients.
MAX_IDLE_CONNECTIONS = 256

#: An idle connection unused this long is closed: after a burst the pool
#: shrinks back to what the load needs. Idle connections are reused most
#: recently used first, so the ones beyond the steady need age out.
IDLE_CLOSE = 60.0

#: Bytes asked of the socket per read: a whole value of the default
#: data_size_limit plus its header arrives in one or two reads.
_RECEIVE_SIZE = 16384

#: Turns a command into bytes on a given connection's protocol state.
_Encoder = Callable[[MemcacheClientProtocol], bytes]


@dataclass(frozen=True, slots=True)
class MemcacheSettings:
    """The memcache_table(5) parameters that shape the wire exchange.

    No defaults here: a table's values (bridge.config) are passed in, and
    the parameter schema is the one place their defaults are written.
    """

    timeout: int
    max_try: int
    retry_pause: int
    line_size_limit: int
    data_size_limit: int
    #: How long a read tries the socket before parking in trio (netio).
    busy_poll_us: int


class _Failure(Exception):
    """One attempt failed; ``connect`` marks failures that end the retry loop (MC-11)."""

    def __init__(self, reason: str, *, timeout: bool = False, connect: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timeout = timeout
        self.connect = connect


class _Connection:
    """One socket plus its protocol state."""

    def __init__(self, stream: netio.Connection, settings: MemcacheSettings) -> None:
        self.stream = stream
        #: trio time when the connection last went back to the pool.
        self.idle_since = 0.0
        self.protocol = MemcacheClientProtocol(
            line_size_limit=settings.line_size_limit,
            data_size_limit=settings.data_size_limit,
        )

    @property
    def reusable(self) -> bool:
        return not self.protocol.broken and self.protocol.pending == 0

    def still_open(self) -> bool:
        """Whether an idle connection can be used: the server has not closed it.

        memcache sends nothing unasked, so an idle connection with anything
        to read has been closed, reset or garbled by the server (after a
        memcached restart, say). Finding that out now costs one syscall;
        finding it out by using the connection costs an attempt and a
        retry_pause (MC-11).
        """
        try:
            self.stream.sock.recv(1, stdlib_socket.MSG_PEEK | stdlib_socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def close(self) -> None:
        self.stream.close()


def _deadline_scope(seconds: float) -> contextlib.AbstractContextManager[object]:
    """A ``fail_after`` for ``timeout`` seconds; <= 0 disables the limit (MC-1)."""
    if seconds > 0:
        return trio.fail_after(seconds)
    return contextlib.nullcontext()


#: Most commands in one coalesced batch; the rest form the next batch.
BATCH_COMMANDS = 64

#: Most bytes (as estimated before encoding) in one coalesced batch; a
#: single larger command still goes, alone.
BATCH_BYTES = 65536

#: What a waiting follower is woken with when it is to lead the next batch.
_LEAD: Final = "lead"

#: Bytes of a command besides its key and value, for the batch size estimate.
_COMMAND_OVERHEAD = 40


class _Command:
    """One get/set/delete/version on its way through the retry loop (MC-11).

    Attributes:
      encode: puts the command on a connection's protocol state, returning its bytes.
      definitive: the reply event types that answer it.
      size: estimated encoded size, for the batch cap.
      max_try: most attempts it may count.
      attempts: attempts counted so far.
      done: it has its result (an event, a Retry, or an encoding error).
      result: the result, once done.
      task: the follower task sleeping until ``done``; None for the leader.
      batch: the batch it belongs to, once taken from the queue.
      abandoned: its follower was cancelled while the batch was in flight.
    """

    __slots__ = (
        "abandoned",
        "attempts",
        "batch",
        "definitive",
        "done",
        "encode",
        "max_try",
        "result",
        "size",
        "task",
    )

    def __init__(
        self,
        encode: _Encoder,
        definitive: tuple[type[MemcacheEvent], ...],
        size: int,
        max_try: int,
    ) -> None:
        self.encode = encode
        self.definitive = definitive
        self.size = size
        self.max_try = max_try
        self.attempts = 0
        self.done = False
        self.result: MemcacheEvent | Retry | Exception | None = None
        self.task: trio.lowlevel.Task | None = None
        self.batch: _Batch | None = None
        self.abandoned = False

    def outcome(self) -> MemcacheEvent | Retry:
        """The result for the caller; an encoding error is raised here, in its own task."""
        result = self.result
        if isinstance(result, Exception):
            raise result
        assert result is not None
        return result


class _Batch:
    """The commands one leader runs together, and the shield that keeps it going."""

    __slots__ = ("commands", "scope", "waiting")

    def __init__(self, commands: list[_Command]) -> None:
        self.commands = commands
        #: Followers still sleeping on an answer from this batch.
        self.waiting = 0
        #: The leader's shield while followers wait; None when it has none.
        self.scope: trio.CancelScope | None = None

    def follower_gone(self) -> None:
        """One follower was answered or abandoned; lift the shield when none waits."""
        self.waiting -= 1
        if self.waiting == 0 and self.scope is not None:
            self.scope.shield = False


def _finish(command: _Command, result: MemcacheEvent | Retry | Exception) -> None:
    """Give ``command`` its result and wake its follower, if one still waits."""
    command.done = True
    command.result = result
    task = command.task
    if task is not None:
        command.task = None
        trio.lowlevel.reschedule(task)
        assert command.batch is not None
        command.batch.follower_gone()


class MemcacheClient:
    """Commands against one memcache server, with Postfix's retry semantics."""

    def __init__(
        self,
        endpoint: Endpoint,
        settings: MemcacheSettings,
        *,
        pool_size: int = MAX_IDLE_CONNECTIONS,
    ) -> None:
        self.endpoint = endpoint
        self._name = str(endpoint)
        self.settings = settings
        self._idle: list[_Connection] = []
        self._pool_size = pool_size
        self._closed = False
        #: Commands waiting to be taken into a batch.
        self._queue: deque[_Command] = deque()
        #: A leader is collecting the queue (or has been picked to).
        self._collecting = False
        #: Batches running now: the sign of load that makes a new leader
        #: wait one scheduler pass for company (see the module docstring).
        self._in_flight = 0

    # ------------------------------------------------------------------ API

    async def get(self, key: bytes) -> bytes | Retry | None:
        """Look ``key`` up.

        Returns:
          The value bytes, ``None`` on a miss, or :class:`Retry` after
          ``max_try`` failed attempts or a refused connection.
        """
        result = await self._run(
            lambda p: p.send_get(key), (GetHit, GetMiss), len(key) + _COMMAND_OVERHEAD
        )
        if isinstance(result, GetHit):
            return result.value
        if isinstance(result, Retry):
            return result
        return None

    async def set(self, key: bytes, value: bytes, *, flags: int, ttl: int) -> bool | Retry:
        """Store ``value`` (MC-17). Values over ``data_size_limit`` are not sent.

        Returns:
          True when stored, False when the value was too large (a warning
          is logged), or :class:`Retry`.
        """
        if len(value) > self.settings.data_size_limit:
            _log.warning(
                "memcache %s: not storing %d-byte value: data_size_limit is %d",
                self.endpoint,
                len(value),
                self.settings.data_size_limit,
            )
            return False
        result = await self._run(
            lambda p: p.send_set(key, value, flags=flags, ttl=ttl),
            (Stored,),
            len(key) + len(value) + _COMMAND_OVERHEAD,
        )
        return result if isinstance(result, Retry) else True

    async def set_many(
        self, items: Sequence[tuple[bytes, bytes]], *, flags: int, ttl: int
    ) -> bool | Retry:
        """Store many values in one pipelined exchange (bulk load).

        Every ``set`` goes out with ``noreply``, followed by one
        ``version``: its reply proves that memcache processed the batch,
        and an error line from any set takes its place and fails the
        attempt. The whole batch then goes round MC-11's loop again (sets
        are idempotent). Values over ``data_size_limit`` must have been
        left out by the caller. It is not coalesced with other commands:
        a bulk load has a connection to itself.

        Returns:
          True when memcache processed every set, or :class:`Retry`.
        """
        limit = self.settings.data_size_limit
        assert all(len(value) <= limit for _, value in items), "oversized value in batch"

        def encode(protocol: MemcacheClientProtocol) -> bytes:
            parts = [
                protocol.send_set(key, value, flags=flags, ttl=ttl, noreply=True)
                for key, value in items
            ]
            parts.append(protocol.send_version())
            return b"".join(parts)

        result = await self._run_alone(_Command(encode, (Version,), 0, self.settings.max_try))
        return result if isinstance(result, Retry) else True

    async def delete(self, key: bytes) -> bool | Retry:
        """Delete ``key``. Returns True if deleted, False if absent, or Retry."""
        result = await self._run(
            lambda p: p.send_delete(key), (Deleted, DeleteNotFound), len(key) + _COMMAND_OVERHEAD
        )
        if isinstance(result, Retry):
            return result
        return isinstance(result, Deleted)

    async def ping(self) -> Retry | None:
        """One ``version`` exchange, no retries: None when the server answered in time."""
        command = _Command(lambda protocol: protocol.send_version(), (Version,), 0, 1)
        result = await self._run_alone(command)
        return result if isinstance(result, Retry) else None

    async def aclose(self) -> None:
        """Close every pooled connection."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    # ------------------------------------------------------- coalescing

    async def _run(
        self,
        encode: _Encoder,
        definitive: tuple[type[MemcacheEvent], ...],
        size: int,
    ) -> MemcacheEvent | Retry:
        """Run one command, coalesced with the others ready now; its event or Retry."""
        command = _Command(encode, definitive, size, self.settings.max_try)
        self._queue.append(command)
        if self._collecting:
            if await self._follow(command) != _LEAD:
                return command.outcome()
        else:
            self._collecting = True
            if self._in_flight or netio.others_ready():
                # Let the tasks woken in this scheduler pass join the batch.
                # Never raises Cancelled: the queue must not lose its leader.
                await trio.lowlevel.cancel_shielded_checkpoint()
        await self._lead(command, self._take_batch())
        return command.outcome()

    async def _run_alone(self, command: _Command) -> MemcacheEvent | Retry:
        """Run one command in a batch of its own, outside the queue."""
        await self._lead(command, [command])
        return command.outcome()

    async def _follow(self, command: _Command) -> object:
        """Sleep until the leader answers ``command`` (None) or picks it to lead (_LEAD)."""
        command.task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            command.task = None
            batch = command.batch
            if batch is None:
                self._queue.remove(command)
            else:
                command.abandoned = True
                batch.follower_gone()
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def _take_batch(self) -> list[_Command]:
        """Take the next batch off the queue; wake the first command left over to lead the rest."""
        queue = self._queue
        batch = [queue.popleft()]
        size = batch[0].size
        while queue and len(batch) < BATCH_COMMANDS and size + queue[0].size <= BATCH_BYTES:
            command = queue.popleft()
            batch.append(command)
            size += command.size
        if queue:
            successor = queue[0]
            task = successor.task
            assert task is not None
            successor.task = None
            trio.lowlevel.reschedule(task, outcome.Value(_LEAD))
        else:
            self._collecting = False
        return batch

    async def _lead(self, leader: _Command, commands: list[_Command]) -> None:
        """Run a batch to the end, shielded while any follower waits on it."""
        batch = _Batch(commands)
        for command in commands:
            command.batch = batch
            if command.task is not None:
                batch.waiting += 1
        self._in_flight += 1
        try:
            if not batch.waiting:
                await self._run_rounds(batch)
                return
            with trio.CancelScope(shield=True) as scope:
                batch.scope = scope
                try:
                    await self._run_rounds(batch)
                finally:
                    # Only reached with followers waiting if something
                    # unforeseen raised: they must not sleep forever.
                    for command in commands:
                        if command.task is not None and not command.done:
                            retry = Retry(f"memcache {self.endpoint}: batch interrupted")
                            _finish(command, retry)
            # A leader cancelled while it was shielded raises now, as any
            # cancelled call does, even if its own answer arrived.
            await trio.lowlevel.checkpoint_if_cancelled()
        finally:
            self._in_flight -= 1

    # ------------------------------------------------------- retry loop

    async def _run_rounds(self, batch: _Batch) -> None:
        """MC-11's loop for a whole batch: rounds of attempts, retry_pause between them."""
        active = batch.commands
        while True:
            await self._round(batch, active)
            active = [c for c in active if not c.done and not c.abandoned]
            if not active:
                return
            # Every command left counted a failed attempt in this round.
            await trio.sleep(self.settings.retry_pause)

    async def _round(self, batch: _Batch, commands: list[_Command]) -> None:
        """One attempt of each command; the ones behind a bad reply are sent again at once."""
        todo = commands
        while todo:
            try:
                connection = await self._acquire()
            except _Failure as failure:
                # MC-11: a failed connect ends the loop at once, for the
                # whole batch: the commands that tried it, and those
                # waiting for the next round.
                for command in todo:
                    if not failure.timeout:
                        metrics.current.memcache_attempt(self._name, failed=True)
                    self._fail(command, failure, final=True)
                retry = Retry(
                    f"memcache {self.endpoint}: {failure.reason}", timeout=failure.timeout
                )
                for command in batch.commands:
                    if not command.done and not command.abandoned:
                        _finish(command, retry)
                return
            todo = await self._exchange(connection, todo)
            todo = [c for c in todo if not c.abandoned]

    def _fail(self, command: _Command, failure: _Failure, *, final: bool = False) -> None:
        """Count a failed attempt of ``command``; out of attempts (or final), it gets Retry."""
        command.attempts += 1
        # The answer's reason is logged where it is answered (rate-limited);
        # each attempt only at debug level.
        _log.debug("memcache %s: attempt %d: %s", self.endpoint, command.attempts, failure.reason)
        if final or command.attempts >= command.max_try:
            retry = Retry(f"memcache {self.endpoint}: {failure.reason}", timeout=failure.timeout)
            _finish(command, retry)

    async def _exchange(self, connection: _Connection, commands: list[_Command]) -> list[_Command]:
        """Send the commands' bytes in one write and read until each has its event.

        ``timeout`` bounds the send and each read (MC-5). A read that runs
        out of time counts as end of stream: a value already read
        completely is still returned (MC-9 step 4). The connection goes
        back to the pool if its state is clean, and is closed otherwise.

        Returns:
          The commands that sat behind a reply whose content broke the
          protocol: not answered, no attempt counted, to be sent again.
        """
        protocol = connection.protocol
        sent: list[_Command] = []
        parts: list[bytes] = []
        for command in commands:
            try:
                parts.append(command.encode(protocol))
            except Exception as exc:  # an unusable key: its own caller's error
                _finish(command, exc)
            else:
                sent.append(command)
        if not sent:
            self._release(connection)
            return []
        try:
            return await self._send_and_read(connection, sent, b"".join(parts))
        finally:
            self._release(connection)

    async def _send_and_read(
        self, connection: _Connection, sent: list[_Command], data: bytes
    ) -> list[_Command]:
        timeout = self.settings.timeout
        name = self._name
        try:
            await connection.stream.send_all(data, stall_limit=timeout)
        except trio.TooSlowError:
            failure = _Failure(f"timeout after {timeout}s sending command", timeout=True)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            failure = _Failure(f"write error: {exc or type(exc).__name__}")
        else:
            return await self._read_replies(connection, sent)
        for command in sent:
            metrics.current.memcache_attempt(name, failed=True)
            self._fail(command, failure)
        return []

    async def _read_replies(self, connection: _Connection, sent: list[_Command]) -> list[_Command]:
        timeout = self.settings.timeout
        name = self._name
        protocol = connection.protocol
        spin = self.settings.busy_poll_us / 1_000_000
        resend: list[_Command] = []
        # Set once end of stream (or a read timeout) was fed to the protocol:
        # from then on a failure is the stream's, shared by all still waiting.
        ended = False
        timed_out = False
        stream_failure: _Failure | None = None
        for command in sent:
            while (event := protocol.next_event()) is NEED_DATA:
                # A reply caught by the busy-poll needs no time limit (nor a
                # trip through the scheduler); only a read that waits does.
                try:
                    caught = connection.stream.try_receive(_RECEIVE_SIZE, spin)
                except OSError:
                    caught = b""
                if caught is not None:
                    chunk = caught
                    await trio.lowlevel.checkpoint_if_cancelled()
                else:
                    # A class-based cancel scope: fail_after's generator-based context
                    # manager costs more than the rest of this loop (docs/performance.md).
                    with trio.CancelScope() as scope:
                        if timeout > 0:
                            scope.deadline = trio.current_time() + timeout
                        try:
                            chunk = await connection.stream.receive(_RECEIVE_SIZE)
                        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                            chunk = b""
                    if scope.cancelled_caught:
                        timed_out = True
                        chunk = b""
                ended = not chunk
                protocol.receive_data(chunk)
            if not isinstance(event, CommandFailed):
                metrics.current.memcache_attempt(name, failed=False)
                if isinstance(event, command.definitive):
                    _finish(command, event)
                else:
                    self._fail(command, _Failure(f"unexpected reply {type(event).__name__}"))
                continue
            if event.detail:
                # May hold table values: only at debug level.
                _log.debug("memcache %s: %s: %s", self.endpoint, event.reason, event.detail)
            if ended:
                # The stream failed: this command and every one behind it
                # count a failed attempt. The first names what it saw
                # ("connection closed while reading value"), the others
                # that the connection is gone.
                if stream_failure is not None:
                    failure = stream_failure
                elif timed_out:
                    failure = _Failure(f"timeout after {timeout}s waiting for reply", timeout=True)
                    stream_failure = failure
                else:
                    failure = _Failure(event.reason)
                    if event.reason == CONNECTION_CLOSED_AFTER_ERROR:
                        # behind a value whose trailer never came
                        failure = _Failure("connection closed")
                    stream_failure = _Failure("connection closed")
                metrics.current.memcache_attempt(name, failed=True)
                self._fail(command, failure)
            elif event.reason == CONNECTION_CLOSED_AFTER_ERROR:
                resend.append(command)
            else:
                metrics.current.memcache_attempt(name, failed=True)
                self._fail(command, _Failure(event.reason))
        return resend

    # ------------------------------------------------------ connections

    async def _acquire(self) -> _Connection:
        """The most recently used idle connection that is still open, or a new one."""
        while self._idle:
            candidate = self._idle.pop()
            if candidate.still_open():
                return candidate
            candidate.close()
        return await self._connect()

    def _release(self, connection: _Connection) -> None:
        """Pool a connection whose protocol state is clean; close any other.

        Also closes the idle connections unused for :data:`IDLE_CLOSE`:
        they sit at the bottom of the list, since reuse takes from the top.
        """
        now = trio.current_time()
        idle = self._idle
        expired = 0
        while expired < len(idle) and now - idle[expired].idle_since >= IDLE_CLOSE:
            idle[expired].close()
            expired += 1
        del idle[:expired]
        if connection.reusable and not self._closed and len(idle) < self._pool_size:
            connection.idle_since = now
            idle.append(connection)
        else:
            connection.close()

    async def _connect(self) -> _Connection:
        endpoint = self.endpoint
        try:
            with _deadline_scope(self.settings.timeout):
                if isinstance(endpoint, InetEndpoint):
                    stream: trio.SocketStream = await trio.open_tcp_stream(
                        endpoint.host, endpoint.port
                    )
                else:
                    stream = await trio.open_unix_socket(endpoint.path)
        except trio.TooSlowError:
            raise _Failure(
                f"timeout after {self.settings.timeout}s connecting", timeout=True, connect=True
            ) from None
        except OSError as exc:
            raise _Failure(f"connect: {exc.strerror or exc}", connect=True) from None
        metrics.current.memcache_connect(self._name)
        return _Connection(netio.Connection.from_trio_stream(stream), self.settings)
