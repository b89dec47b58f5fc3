"""``workers = N``: several serving processes behind the same listeners.

Theory of operation
-------------------
One Python process uses one core. With ``workers`` above 1 the bridge
starts as a small supervisor that binds every listener (as root if a
port or socket needs it), drops privileges, and forks the workers. Each
worker inherits the listening sockets, opens its own tables (LMDB
environments, connections and hot caches must not cross a fork), and
runs the ordinary trio server; the kernel hands each new connection to
one of the workers waiting in accept.

The supervisor forwards SIGHUP (each worker reloads its configuration)
and SIGTERM/SIGINT (each worker finishes the requests it holds and
exits), restarts a worker that dies unexpectedly, and exits 0 once every
worker has exited after a stop.

With ``[metrics]`` the supervisor also binds the metrics endpoint once
(every worker serves it) and owns a private temporary directory where
each worker records its metrics, so that ``/metrics`` shows the sum over
the workers (see :mod:`bridge.metrics`): it creates the directory before
the first fork, drops a dead worker's live gauges, and removes the
directory when it exits.

Structured concurrency holds inside each worker; the supervisor runs no
trio loop and no threads, only fork, signals and wait.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket as stdlib_socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

import trio

from bridge import metrics, systemd
from bridge.config import BridgeConfig
from bridge.listeners import BoundListener
from bridge.table import Table, open_tables

#: What a worker runs: :func:`bridge.daemon.serve_until_signalled`, passed
#: in by the daemon (which starts the supervisor) rather than imported.
#: Its last argument is the ``[metrics]`` endpoint's sockets (empty without).
ServeForever = Callable[
    [BridgeConfig, Mapping[str, Table], list[BoundListener], Sequence[stdlib_socket.socket]],
    Awaitable[None],
]

_log = logging.getLogger("bridge.workers")

#: A worker that dies within this many seconds of starting is restarted
#: only after this pause, so a worker that cannot start does not spin.
_RESTART_PAUSE = 1.0

_FORWARDED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True, slots=True)
class _Shared:
    """What every worker shares besides the lookup listeners: the metrics."""

    #: The ``[metrics]`` endpoint's listening sockets (empty without).
    metrics_listeners: Sequence[stdlib_socket.socket] = ()
    #: Where every worker records its metrics (None without ``[metrics]``).
    metrics_dir: str | None = None


def _worker(
    config: BridgeConfig, bound: list[BoundListener], serve: ServeForever, shared: _Shared
) -> int:
    """The body of one forked worker; returns its exit status."""
    for signum in _FORWARDED:
        signal.signal(signum, signal.SIG_DFL)
    # Only the main pid may notify (NotifyAccess=main); the supervisor does.
    os.environ.pop("NOTIFY_SOCKET", None)
    # The unix socket files stay the supervisor's: a worker leaves through
    # os._exit, never through the serve command's cleanup, and even if it
    # called unlink_unix_sockets, SocketFile.remove skips another pid's file
    # (a worker stopping must not unlink the path the others still serve).
    try:
        if shared.metrics_dir is not None:
            metrics.use_multiprocess_dir(shared.metrics_dir)
        tables = open_tables(config)
        trio.run(serve, config, tables, bound, shared.metrics_listeners)
    except Exception:
        _log.exception("worker %d failed", os.getpid())
        return 1
    return 0


def _spawn(
    config: BridgeConfig, bound: list[BoundListener], serve: ServeForever, shared: _Shared
) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns here
        status = 1
        try:
            status = _worker(config, bound, serve, shared)
        finally:
            logging.shutdown()
            os._exit(status)
    return pid


def run_workers(
    config: BridgeConfig,
    count: int,
    bound: list[BoundListener],
    serve: ServeForever,
    metrics_listeners: Sequence[stdlib_socket.socket] = (),
) -> int:
    """Supervise ``count`` worker processes until SIGTERM/SIGINT.

    Args:
      bound: every listener, bound (and privileges dropped) by the caller.
      serve: what each worker runs with its own tables.
      metrics_listeners: the ``[metrics]`` endpoint's sockets, bound by the
        caller; closed here at exit.

    Returns:
      0 after a clean stop, 1 if a worker could not be kept running.

    Raises:
      OSError: the metrics directory cannot be created (nothing forked).
    """
    stopping = False
    metrics_dir: str | None = None

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
            systemd.notify(systemd.STOPPING)
        else:
            systemd.notify(systemd.reloading_message())
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        if signum == signal.SIGHUP:
            systemd.notify(systemd.ready_message(f"reload forwarded to {len(workers)} workers"))

    workers: dict[int, float] = {}
    for signum in _FORWARDED:
        signal.signal(signum, forward)
    try:
        if config.metrics_endpoint is not None:
            metrics_dir = metrics.new_multiprocess_dir()
        shared = _Shared(metrics_listeners, metrics_dir)
        for _ in range(count):
            workers[_spawn(config, bound, serve, shared)] = time.monotonic()
        _log.info("supervising %d workers: %s", count, ", ".join(map(str, workers)))
        systemd.notify(systemd.ready_message(f"{count} workers"))
        while workers:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            started = workers.pop(pid, None)
            if metrics_dir is not None and started is not None:
                metrics.process_exited(metrics_dir, pid)
            if started is None or stopping:
                continue
            _log.error("worker %d exited (status %d); restarting it", pid, status)
            if time.monotonic() - started < _RESTART_PAUSE:
                time.sleep(_RESTART_PAUSE)
            if not stopping:
                workers[_spawn(config, bound, serve, shared)] = time.monotonic()
    finally:
        # The socket files are the caller's to remove, after this returns;
        # this process bound them, so their SocketFile records say so.
        for item in bound:
            item.listener.close()
        for sock in metrics_listeners:
            sock.close()
        if metrics_dir is not None:
            metrics.remove_multiprocess_dir(metrics_dir)
    return 0
