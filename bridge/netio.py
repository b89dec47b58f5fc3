"""Socket I/O for the hot path: non-blocking stdlib sockets driven by trio's low-level waits.

Theory of operation
-------------------
A lookup is a short request/response exchange, and a Postfix client
sends the next request only after the previous reply. trio's stream layer
(SocketStream) makes every receive try the syscall, then yield to the
scheduler, then wait: on a request-response connection that is two
``recv`` calls and two trips through the scheduler per request. Here a
receive waits for readability first (one trip, which also keeps the
scheduler fair) and then reads once; a send writes at once and waits only
when the kernel buffer is full. Measured on the bench in
docs/performance.md, this halves the cost of the I/O layer.

Everything stays inside trio's structured concurrency: waits are
``trio.lowlevel.wait_readable``/``wait_writable``, which are cancellable
and honour the enclosing cancel scopes and deadlines.

Resource handling
-----------------
:meth:`Connection.close` tells trio the socket is closing before closing
it, so a task still waiting on it is woken (with ClosedResourceError)
instead of waiting forever on a reused file descriptor.
"""

from __future__ import annotations

import socket
import time

import trio

_RUN_CONTEXT: object
try:
    from trio._core._run import GLOBAL_RUN_CONTEXT as _RUN_CONTEXT
except ImportError:  # pragma: no cover - a trio that moved its internals
    _RUN_CONTEXT = None


def others_ready() -> bool:
    """Whether other trio tasks are queued to run (the busy-polls' "only while idle").

    ``trio.lowlevel.current_statistics()`` answers this too, but builds a
    whole statistics object (the I/O backend's included) each time, which
    costs more than the recv attempt the answer decides about; the run
    queue's length is what it reports as ``tasks_runnable``. Falls back to
    the public call where trio's internals differ.
    """
    runner = getattr(_RUN_CONTEXT, "runner", None)
    runq = getattr(runner, "runq", None)
    if runq is None:
        return trio.lowlevel.current_statistics().tasks_runnable > 0
    return bool(runq)


class Connection:
    """A connected, non-blocking socket.

    Args:
      sock: a connected stdlib socket; it is switched to non-blocking mode
        and owned (closed) by this object from now on.
    """

    __slots__ = ("_closed", "_waited", "sock")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # One write per request or reply: Nagle would only add delay.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._closed = False
        # Whether trio was ever asked to wait on the socket: only then can a
        # task be waiting on it at close (connections served by
        # bridge.multiplex usually never are).
        self._waited = False

    @classmethod
    def from_trio_stream(cls, stream: trio.SocketStream) -> Connection:
        """Take over the socket of a trio stream (made by trio's connect helpers)."""
        trio_sock = stream.socket
        fd = trio_sock.detach()
        return cls(socket.socket(trio_sock.family, trio_sock.type, trio_sock.proto, fileno=fd))

    async def receive(self, max_bytes: int, *, spin: float = 0.0) -> bytes:
        """Wait until the peer sent something and return it; b"" at end of stream.

        Args:
          spin: seconds to keep trying the socket before parking in trio,
            but only while no other task is ready to run: memcache on
            loopback answers within microseconds, and a reply caught while
            spinning saves a trip through the scheduler (the cost of one
            lookup at one client). 0 = park at once.

        Raises:
          trio.ClosedResourceError: the connection was closed meanwhile.
          OSError: a socket error other than a reset (a reset reads as b"").
        """
        if spin > 0:
            data = self._spin(max_bytes, spin)
            if data is not None:
                # Still a cancellation point, without the scheduling round.
                await trio.lowlevel.checkpoint_if_cancelled()
                return data
        self._waited = True
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                return self.sock.recv(max_bytes)
            except BlockingIOError:
                continue  # spurious wake-up
            except (ConnectionResetError, ConnectionAbortedError):
                return b""

    def try_receive(self, max_bytes: int, spin: float) -> bytes | None:
        """What :meth:`receive` gets without waiting in trio: its busy-poll alone.

        Lets a caller skip setting up a time limit for a read that the
        busy-poll answers. None: nothing came within ``spin`` (or other
        tasks are ready); call :meth:`receive`. Not a checkpoint.
        """
        return self._spin(max_bytes, spin) if spin > 0 else None

    def _spin(self, max_bytes: int, spin: float) -> bytes | None:
        """Non-blocking reads for up to ``spin`` seconds; None if nothing came (or others wait)."""
        # Asked once: while this loop runs no other task can become ready
        # (only I/O and other threads wake tasks, and trio sees those when
        # it next polls), and building the statistics costs more than a
        # recv attempt.
        if others_ready():
            return None
        deadline = time.perf_counter() + spin
        while True:
            try:
                return self.sock.recv(max_bytes)
            except BlockingIOError:
                if time.perf_counter() >= deadline:
                    return None
            except (ConnectionResetError, ConnectionAbortedError):
                return b""

    async def send_all(self, data: bytes, stall_limit: float = 0) -> None:
        """Send every byte, waiting only while the kernel buffer is full.

        Args:
          data: the bytes.
          stall_limit: most seconds to wait for buffer space at a time; 0 = no limit.
            A send that fits the kernel buffer (nearly all) never waits.

        Raises:
          trio.BrokenResourceError: the peer is gone.
          trio.TooSlowError: the peer did not read for ``stall_limit`` seconds.
        """
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                self._waited = True
                with trio.CancelScope() as scope:
                    if stall_limit > 0:
                        scope.deadline = trio.current_time() + stall_limit
                    await trio.lowlevel.wait_writable(self.sock)
                if scope.cancelled_caught:
                    raise trio.TooSlowError from None
                continue
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise trio.BrokenResourceError(str(exc)) from None
            view = view[sent:]

    def peer(self) -> str:
        """The peer's address for log lines."""
        try:
            address = self.sock.getpeername()
        except OSError:
            return "?"
        if isinstance(address, tuple):
            return f"{address[0]}:{address[1]}"
        return "unix socket"

    def close(self) -> None:
        """Close now; idempotent. Tasks waiting on the socket are woken."""
        if self._closed:
            return
        self._closed = True
        if self._waited:
            trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


async def accept(listener: socket.socket) -> Connection:
    """Accept one connection from a non-blocking listening socket."""
    while True:
        await trio.lowlevel.wait_readable(listener)
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            continue  # another process sharing the port (SO_REUSEPORT) took it
        return Connection(sock)
