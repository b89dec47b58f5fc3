"""A fault-injection TCP proxy to put between the bridge and memcached.

Theory of operation
-------------------
:class:`FaultProxy` listens on a free loopback port and forwards every
connection it accepts to an upstream memcached over a connection of its
own. The bridge is configured with ``memcache = proxy.endpoint`` and
cannot tell the proxy from the server, so a test can make "memcached"
misbehave at will while the bridge (a separate process) keeps running.

The proxy runs its own ``trio.run`` in a background thread. That keeps it
independent of the test's own threads or event loop: synchronous tests
that drive many blocking client sockets and async trio tests use it the
same way. It is a context manager; leaving the ``with`` block stops the
thread and closes every socket, whatever the test did.

A test switches the behaviour at run time with :meth:`FaultProxy.set_fault`,
from any thread (also from inside a trio task). The call returns once the
change is in force: after ``set_fault(Refuse())`` the port refuses
connections, after ``set_fault(Reset())`` every open connection has been
reset. Faults act on connections already open as well as on new ones:

==================  ======================================================
fault               what the client sees
==================  ======================================================
:class:`Pass`       a plain memcached (also: listen again after Refuse)
:class:`Delay`      every server-to-client chunk arrives ``ms`` later
:class:`Stall`      connections are accepted and commands forwarded, but no
                    reply is delivered until the fault changes (replies
                    held back then arrive late, like a very slow server)
:class:`Reset`      open connections are reset (RST, ``SO_LINGER`` 0); new
                    ones are accepted and reset at once
:class:`CloseMidReply`  the next chunk of every reply is cut in half, the
                    first half delivered, then the connection closed (FIN)
:class:`Garbage`    a line that is no valid memcache reply is injected at
                    the start of every reply (see :data:`GARBAGE_LINES`)
:class:`Refuse`     the listening socket is closed, so connections are
                    refused, and open connections are closed (FIN), as
                    when memcached is stopped (ones still in the kernel's
                    accept queue are reset by the kernel); ``Pass``
                    re-listens on the same port
==================  ======================================================

Garbage goes only where a reply starts (the first chunk after the client
sent something), never inside a value: garbage inside a value's bytes can
form a different, well-framed value, which no client could detect. The
proxy simulates a broken server, not a lying one.

Recording
---------
With ``record=True`` the proxy keeps every byte each client sent toward
memcached, split into commands by the sans-I/O :class:`CommandSplitter`.
:meth:`FaultProxy.received_commands` returns them and
:func:`assert_well_formed` checks each against the memcache text commands
the bridge may send (spec MC-7, plus ``noreply`` sets and ``version`` of
bulk load).
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, TypeAlias, TypeVar

import trio

_T = TypeVar("_T")

#: How long a control call waits for the proxy thread. A change takes
#: microseconds; the bound only turns a dead proxy thread into an error
#: instead of a hung test.
CONTROL_TIMEOUT: Final = 10.0

#: Bytes read per receive: more than any reply the bridge's tests provoke,
#: so a reply normally crosses the proxy as one chunk.
_RECEIVE_SIZE: Final = 65536

#: Listen backlog: the tests open a few dozen connections at once.
_BACKLOG: Final = 128

#: memcached's key length limit (memcached protocol.txt; spec MC-12).
MAX_KEY_LENGTH: Final = 250

#: Lines that no memcache client may take for a reply, one per way of
#: failing MC-8/MC-9. None starts with ``END``: the bridge, like Postfix,
#: compares lines as C strings, so ``END`` followed by a NUL would read as
#: a miss, a lie rather than garbage.
GARBAGE_LINES: Final[tuple[bytes, ...]] = (
    b"GARBAGE\r\n",  # neither END nor VALUE (MC-9.2)
    b"\x00\xff\xfe binary noise\r\n",  # a C string compare sees an empty line
    b"VALUE\r\n",  # header without key, flags and length
    b"VALUE key 0 -1\r\n",  # negative length (MC-9.2)
    b"VALUE key 0 99999999\r\n",  # over every data_size_limit the tests use
    b"END \r\n",  # END with a trailing space is not END (MC-9.1)
    b"SERVER_ERROR injected by the fault proxy\r\n",
    b"X" * 2000 + b"\r\n",  # over the default line_size_limit of 1024 (MC-8)
)


# ------------------------------------------------------------------ faults


@dataclass(frozen=True, slots=True)
class Pass:
    """Forward everything unchanged."""


@dataclass(frozen=True, slots=True)
class Delay:
    """Deliver every server-to-client chunk ``ms`` milliseconds late."""

    ms: int

    def __post_init__(self) -> None:
        if self.ms < 0:
            raise ValueError(f"negative delay {self.ms} ms")


@dataclass(frozen=True, slots=True)
class Stall:
    """Accept and forward commands, but hold every reply back."""


@dataclass(frozen=True, slots=True)
class Reset:
    """Reset every open connection and each new one (RST)."""


@dataclass(frozen=True, slots=True)
class CloseMidReply:
    """Deliver half of the next reply chunk, then close the connection."""


@dataclass(frozen=True, slots=True)
class Garbage:
    """Put one of :data:`GARBAGE_LINES` in front of every reply."""


@dataclass(frozen=True, slots=True)
class Refuse:
    """Stop listening (connections refused) and close open connections."""


Fault: TypeAlias = Pass | Delay | Stall | Reset | CloseMidReply | Garbage | Refuse


# ------------------------------------------------------- command recording


def _data_block_length(line: bytes) -> int:
    """Bytes that follow ``line`` as its data block: LEN + CRLF for ``set`` (MC-7)."""
    tokens = line.rstrip(b"\r\n").split(b" ")
    if tokens[0] == b"set" and len(tokens) >= 5 and tokens[4].isdigit():
        return int(tokens[4]) + 2
    return 0


class CommandSplitter:
    """Sans-I/O splitter of a client-to-memcached byte stream into commands.

    A command is one line up to and including its LF, plus, for a ``set``
    whose length field is a number, the data block that follows (LEN bytes
    and two more for its CRLF). Bytes are never judged here, only framed:
    :func:`command_problem` judges them.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def pending(self) -> bytes:
        """The bytes of a command not yet complete."""
        return bytes(self._buffer)

    def receive_data(self, data: bytes) -> None:
        """Append bytes received from the client."""
        self._buffer += data

    def next_command(self) -> bytes | None:
        """Return the next complete command, or None when more bytes are needed."""
        line_end = self._buffer.find(b"\n")
        if line_end < 0:
            return None
        line_length = line_end + 1
        total = line_length + _data_block_length(bytes(self._buffer[:line_length]))
        if len(self._buffer) < total:
            return None
        command = bytes(self._buffer[:total])
        del self._buffer[:total]
        return command


_NUMBER = re.compile(rb"-?[0-9]+")
_LENGTH = re.compile(rb"[0-9]+")

# Postfix parameters are C ints (MC-2), and MC-4 sends flags and ttl verbatim.
_INT32_MIN: Final = -(2**31)
_INT32_MAX: Final = 2**31 - 1


def _key_problem(key: bytes) -> str | None:
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        return f"key of {len(key)} bytes (memcached takes 1..{MAX_KEY_LENGTH})"
    if any(not 0x21 <= byte <= 0x7E for byte in key):
        return f"key {key!r} has a byte outside 0x21..0x7E"
    return None


def _int32_problem(name: str, token: bytes) -> str | None:
    if not _NUMBER.fullmatch(token) or not _INT32_MIN <= int(token) <= _INT32_MAX:
        return f"{name} {token!r} is not a 32-bit decimal integer"
    return None


def _set_problem(tokens: list[bytes], data: bytes) -> str | None:
    if len(tokens) not in (5, 6) or (len(tokens) == 6 and tokens[5] != b"noreply"):
        return "set needs: set KEY FLAGS TTL LEN[ noreply]"
    problem = (
        _key_problem(tokens[1])
        or _int32_problem("flags", tokens[2])
        or _int32_problem("ttl", tokens[3])
    )
    if problem:
        return problem
    if not _LENGTH.fullmatch(tokens[4]):
        return f"length {tokens[4]!r} is not a decimal number"
    length = int(tokens[4])
    if len(data) != length + 2 or not data.endswith(b"\r\n"):
        return f"set announces {length} bytes but the data block is {data!r}"
    return None


def command_problem(command: bytes) -> str | None:
    """What makes ``command`` not a well-formed memcache text command, or None.

    Well-formed (memcached protocol.txt, spec MC-7): ``get KEY``,
    ``delete KEY``, ``version``, or ``set KEY FLAGS TTL LEN[ noreply]``
    followed by exactly LEN data bytes and CRLF. Every line ends in CRLF,
    tokens are separated by one space, and a key is 1..250 bytes of
    0x21..0x7E. FLAGS and TTL may be negative: Postfix sends them verbatim
    (MC-4, vector ``set bk1 -3 -5 11`` of spec 12.5).

    Args:
      command: one command as :class:`CommandSplitter` frames it.

    Returns:
      A message naming the problem, or None if the command is well formed.
    """
    line, crlf, data = command.partition(b"\r\n")
    if not crlf:
        return f"{command[:80]!r} does not end in CRLF"
    if any(byte < 0x20 or byte == 0x7F for byte in line):
        return f"command line {line[:80]!r} holds a control byte"
    tokens = line.split(b" ")
    verb = tokens[0]
    if verb not in (b"get", b"delete", b"version", b"set"):
        return f"unknown command {line[:80]!r}"
    if verb == b"set":
        return _set_problem(tokens, data)
    if data:
        return f"{verb!r} command followed by {data[:80]!r}"
    if verb in (b"get", b"delete"):
        if len(tokens) != 2:
            return f"{verb.decode()} takes exactly one key: {line[:80]!r}"
        return _key_problem(tokens[1])
    return None if len(tokens) == 1 else f"version takes no argument: {line[:80]!r}"


def assert_well_formed(commands: Iterable[bytes]) -> None:
    """Assert that every command is well formed (see :func:`command_problem`).

    Raises:
      AssertionError: naming the first bad command and its problem.
    """
    for index, command in enumerate(commands):
        problem = command_problem(command)
        assert problem is None, f"command {index}: {problem}"


# ------------------------------------------------------------------ proxy


@dataclass(eq=False)
class _Link:
    """One client connection and the proxy's connection to memcached for it."""

    downstream: trio.SocketStream
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    upstream: trio.SocketStream | None = None
    # True from a client write until the next reply chunk: that chunk
    # starts a reply, the only place garbage may go.
    reply_due: bool = False
    recording: _Recording | None = None


@dataclass(eq=False)
class _Recording:
    splitter: CommandSplitter = field(default_factory=CommandSplitter)
    commands: list[bytes] = field(default_factory=list)
    closed: bool = False

    def add(self, data: bytes) -> None:
        self.splitter.receive_data(data)
        while (command := self.splitter.next_command()) is not None:
            self.commands.append(command)


def _close_socket(stream: trio.SocketStream, *, reset: bool) -> None:
    """Close now, from synchronous code; ``reset`` sends RST instead of FIN."""
    sock = stream.socket
    if sock.fileno() == -1:
        return
    if reset:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Core:
    """The proxy's state; used only from the proxy's trio thread."""

    def __init__(self, upstream: tuple[str, int], *, record: bool) -> None:
        self.upstream = upstream
        self.record = record
        self.fault: Fault = Pass()
        self.port = 0
        self.accepted = 0
        self.recordings: list[_Recording] = []
        self._listener: trio.SocketListener | None = None
        self._links: set[_Link] = set()
        self._changed = trio.Event()
        self._garbage_index = 0
        self._nursery: trio.Nursery | None = None

    async def run(self, started: Callable[[], None], stop: trio.Event) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._listen()
            started()
            await stop.wait()
            self._close_listener()
            for link in list(self._links):
                self._close_link(link, reset=False)
            nursery.cancel_scope.cancel()

    # ------------------------------------------------------------ control

    def apply(self, fault: Fault) -> None:
        self.fault = fault
        if isinstance(fault, Refuse):
            self._close_listener()
            for link in list(self._links):
                self._close_link(link, reset=False)
        elif self._listener is None:
            self._listen()
        if isinstance(fault, Reset):
            for link in list(self._links):
                self._close_link(link, reset=True)
        # Wake stalled reply pumps; an Event fires once, so take a new one.
        self._changed.set()
        self._changed = trio.Event()

    def received_commands(self) -> list[bytes]:
        commands: list[bytes] = []
        for recording in self.recordings:
            commands += recording.commands
            # What a client sent and then abandoned is part of the stream;
            # on an open link it is just a command still arriving.
            if recording.closed and recording.splitter.pending:
                commands.append(recording.splitter.pending)
        return commands

    # -------------------------------------------------------- listening

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # Re-listening after Refuse needs the port back while the
            # connections closed then sit in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(_BACKLOG)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        self._listener = listener
        assert self._nursery is not None
        self._nursery.start_soon(self._accept_loop, listener)

    def _close_listener(self) -> None:
        if self._listener is not None:
            # Synchronous close: the port refuses connections when apply() returns.
            self._listener.socket.close()
            self._listener = None

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        assert self._nursery is not None
        while True:
            try:
                stream = await listener.accept()
            except (trio.ClosedResourceError, OSError):
                return
            self.accepted += 1
            if listener is not self._listener:
                # Refuse (or stop) came between the accept call and here
                # (trio checkpoints after a successful accept): the
                # connection belongs to a closed port, so it goes too.
                _close_socket(stream, reset=False)
                return
            if isinstance(self.fault, Reset):
                _close_socket(stream, reset=True)
                continue
            # Registered before its task runs, so that a fault applied in
            # between finds it: set_fault() promises to act on every
            # connection accepted so far.
            link = _Link(stream)
            if self.record:
                link.recording = _Recording()
                self.recordings.append(link.recording)
            self._links.add(link)
            self._nursery.start_soon(self._serve_link, link)

    # -------------------------------------------------------- forwarding

    async def _serve_link(self, link: _Link) -> None:
        try:
            with link.cancel_scope:
                try:
                    link.upstream = await trio.open_tcp_stream(*self.upstream)
                except OSError:
                    return  # memcached is down: the client sees a close
                async with trio.open_nursery() as pumps:
                    pumps.start_soon(self._pump_commands, link)
                    pumps.start_soon(self._pump_replies, link)
        finally:
            self._links.discard(link)
            if link.recording is not None:
                link.recording.closed = True
            self._close_link(link, reset=False)

    def _close_link(self, link: _Link, *, reset: bool) -> None:
        _close_socket(link.downstream, reset=reset)
        if link.upstream is not None:
            _close_socket(link.upstream, reset=False)
        link.cancel_scope.cancel()

    async def _pump_commands(self, link: _Link) -> None:
        assert link.upstream is not None
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            while data := await link.downstream.receive_some(_RECEIVE_SIZE):
                if link.recording is not None:
                    link.recording.add(data)
                link.reply_due = True
                await link.upstream.send_all(data)
        # Either side gone ends the link: memcache clients never half-close.
        link.cancel_scope.cancel()

    async def _pump_replies(self, link: _Link) -> None:
        assert link.upstream is not None
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            while data := await link.upstream.receive_some(_RECEIVE_SIZE):
                if not await self._deliver(link, data):
                    break
        link.cancel_scope.cancel()

    async def _deliver(self, link: _Link, data: bytes) -> bool:
        """Send one reply chunk to the client under the current fault.

        Returns:
          False when the fault ended the link.
        """
        while isinstance(self.fault, Stall):
            await self._changed.wait()
        fault = self.fault
        if isinstance(fault, Delay):
            await trio.sleep(fault.ms / 1000)
        if isinstance(fault, CloseMidReply):
            await link.downstream.send_all(data[: len(data) // 2])
            self._close_link(link, reset=False)
            return False
        if isinstance(fault, Garbage) and link.reply_due:
            data = self._next_garbage_line() + data
        link.reply_due = False
        await link.downstream.send_all(data)
        return True

    def _next_garbage_line(self) -> bytes:
        line = GARBAGE_LINES[self._garbage_index % len(GARBAGE_LINES)]
        self._garbage_index += 1
        return line


class FaultProxy:
    """A TCP proxy in front of one memcached whose faults a test switches at run time.

    Use it as a context manager; see the module docstring for the faults.
    Every public method may be called from any thread.

    Args:
      upstream_port: the memcached port to forward to.
      upstream_host: the memcached address.
      record: keep every command clients send (:meth:`received_commands`).
    """

    def __init__(
        self, upstream_port: int, *, upstream_host: str = "127.0.0.1", record: bool = False
    ) -> None:
        self._core = _Core((upstream_host, upstream_port), record=record)
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._crash: BaseException | None = None

    @property
    def port(self) -> int:
        """The loopback port the proxy listens on (the same across Refuse/Pass)."""
        return self._core.port

    @property
    def endpoint(self) -> str:
        """The proxy's address as a bridge ``memcache =`` value."""
        return f"inet:127.0.0.1:{self.port}"

    @property
    def fault(self) -> Fault:
        """The fault in force."""
        return self._core.fault

    @property
    def accepted(self) -> int:
        """Connections accepted so far."""
        return self._core.accepted

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start the proxy thread and return once the port listens.

        Raises:
          RuntimeError: the proxy did not come up.
        """
        ready = threading.Event()

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            await self._core.run(ready.set, self._stop)

        def thread_main() -> None:
            try:
                trio.run(main)
            except BaseException as exc:
                self._crash = exc
                ready.set()

        self._thread = threading.Thread(target=thread_main, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(CONTROL_TIMEOUT) or self._crash is not None:
            raise RuntimeError("fault proxy did not start") from self._crash

    def close(self) -> None:
        """Stop the proxy: close the listener and every connection, end the thread.

        Raises:
          RuntimeError: the proxy thread had crashed (its exception chained).
        """
        if self._thread is None:
            return
        stop = self._stop
        if stop is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                self._call(stop.set)
        self._thread.join(CONTROL_TIMEOUT)
        self._thread = None
        if self._crash is not None:
            raise RuntimeError("fault proxy crashed") from self._crash

    def set_fault(self, fault: Fault) -> None:
        """Switch to ``fault``; returns once it is in force.

        Raises:
          OSError: Pass after Refuse could not listen on the port again.
          RuntimeError: the proxy is not running.
        """
        self._call(lambda: self._core.apply(fault))

    def received_commands(self) -> list[bytes]:
        """Every command clients sent, per connection in accept order.

        Needs ``record=True``. Bytes of an unfinished command on a closed
        connection are returned as a last, malformed command; on an open
        connection they are not returned (the rest may still be coming).

        Raises:
          RuntimeError: the proxy was not started with ``record=True``.
        """
        if not self._core.record:
            raise RuntimeError("the proxy records commands only with record=True")
        return self._call(self._core.received_commands)

    def _call(self, function: Callable[[], _T]) -> _T:
        """Run ``function`` in the proxy's trio thread and return its result."""
        if self._token is None or self._thread is None or not self._thread.is_alive():
            raise RuntimeError("fault proxy is not running") from self._crash
        done = threading.Event()
        results: list[_T] = []
        errors: list[BaseException] = []

        def call() -> None:
            try:
                results.append(function())
            except BaseException as exc:
                errors.append(exc)
            finally:
                done.set()

        self._token.run_sync_soon(call)
        if not done.wait(CONTROL_TIMEOUT):
            raise RuntimeError("fault proxy did not answer") from self._crash
        if errors:
            raise errors[0]
        return results[0]
