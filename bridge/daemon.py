"""The daemon as a process: privileges, resource limits, signals, and the serve command.

Theory of operation
-------------------
:func:`run` is ``postfix-bridge serve`` once the configuration is loaded
and its tables open: it raises the open-files limit, binds every
listener (:mod:`bridge.listeners`), drops privileges, and then either
serves in this process (:func:`serve_until_signalled`) or supervises
``workers`` forked processes (:mod:`bridge.workers`), each serving the
same listeners. The connection loop itself is :mod:`bridge.server`'s.

Signals: SIGHUP reloads the configuration, SIGTERM and SIGINT shut down
cleanly (requests already received are answered). systemd is told
READY, RELOADING and STOPPING as they happen.

Resource handling
-----------------
The unix socket files this process bound are removed when :func:`run`
returns, whatever the way out; tables are closed by the server or, when
nothing could be bound, here.

Error handling
--------------
:func:`run` raises ``OSError`` when a listener cannot be bound (nothing
was served); everything after that is the server's to report.
"""

from __future__ import annotations

import logging
import os
import pwd
import resource
import signal
import socket as stdlib_socket
from collections.abc import Mapping, Sequence

import trio

from bridge import systemd
from bridge.config import BridgeConfig
from bridge.listeners import (
    BoundListener,
    bind_listeners,
    bind_metrics_listeners,
    unlink_unix_sockets,
)
from bridge.server import BridgeServer
from bridge.table import Table, close_tables
from bridge.workers import run_workers

_log = logging.getLogger("bridge.daemon")

#: The signals serve handles and what each does, as postfix-bridge(8) lists them.
SIGNALS: tuple[tuple[signal.Signals, str], ...] = (
    (
        signal.SIGHUP,
        "Re-read the configuration. A valid one replaces the running tables between two "
        "requests without dropping a connection; an invalid one is logged and the old one "
        "kept. Listener changes need a restart. With workers, each worker reloads.",
    ),
    (
        signal.SIGTERM,
        "Stop accepting connections, answer every request already received, and exit 0.",
    ),
    (signal.SIGINT, "As SIGTERM."),
)


def run(config: BridgeConfig, tables: Mapping[str, Table]) -> int:
    """Serve ``config`` with its opened ``tables`` until SIGTERM/SIGINT.

    Returns:
      The exit status: 0 after a clean stop (the workers' supervisor's
      status with ``workers`` above 1).

    Raises:
      OSError: a listener cannot be bound (address in use, a unix path
        another process answers on, permissions); ``tables`` are closed
        and nothing was served.
    """
    raise_open_files_limit()
    try:
        bound = bind_listeners(config)
        try:
            # With workers, the [metrics] endpoint is bound once, here, and
            # served by every worker (a single process binds it in the server).
            metrics_listeners = bind_metrics_listeners(config) if config.workers > 1 else []
        except OSError:
            for item in bound:
                item.listener.close()
            unlink_unix_sockets(bound)
            raise
    except OSError:
        trio.run(close_tables, tables)
        raise
    try:
        drop_privileges(config)
        if config.workers > 1:
            # Each worker opens its own tables after the fork.
            trio.run(close_tables, tables)
            return run_workers(
                config, config.workers, bound, serve_until_signalled, metrics_listeners
            )
        trio.run(serve_until_signalled, config, tables, bound)
    finally:
        unlink_unix_sockets(bound)
    return 0


def raise_open_files_limit() -> None:
    """Raise the soft open-files limit to the hard one.

    Each connection is a file descriptor, and the usual soft limit (1024)
    is below the default max_connections of a single listener.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            _log.warning("cannot raise the open-files limit: %s", exc)


def drop_privileges(config: BridgeConfig) -> None:
    """Switch to ``user``/``group`` once every listener is bound.

    Raises:
      OSError: the switch failed (the daemon must not go on as root then).
    """
    if config.user is None and config.group is None:
        if os.geteuid() == 0:
            _log.warning(
                "running as root: set user = ... (and group) to drop privileges after binding"
            )
        return
    if config.user is not None and os.geteuid() == config.user:
        return  # already switched (a worker forked by the supervisor)
    if config.group is not None:
        os.setgroups([])
        os.setgid(config.group)
    if config.user is not None:
        if config.group is None:
            primary = pwd.getpwuid(config.user).pw_gid
            os.setgroups([])
            os.setgid(primary)
        os.setuid(config.user)
    _log.info("running as uid %d, gid %d", os.getuid(), os.getgid())


# ---------------------------------------------------------------- signals


async def serve_until_signalled(
    config: BridgeConfig,
    tables: Mapping[str, Table],
    bound: list[BoundListener],
    metrics_listeners: Sequence[stdlib_socket.socket] = (),
) -> None:
    """Run the server; SIGHUP reloads, SIGTERM and SIGINT shut down cleanly.

    Args:
      bound: every listener, bound by the caller (the serve command or the
        workers' supervisor).
      metrics_listeners: the ``[metrics]`` endpoint's sockets, bound by the
        workers' supervisor; empty in a single process (the server binds it).
    """
    server = BridgeServer(config, tables, bound=bound, metrics_listeners=metrics_listeners)
    with trio.open_signal_receiver(*(signum for signum, _ in SIGNALS)) as signals:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(server.serve)
            _log.info("ready: listening on %s", ", ".join(addresses))
            systemd.notify(systemd.ready_message(f"listening on {', '.join(addresses)}"))

            async def watch_signals() -> None:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        systemd.notify(systemd.reloading_message())
                        reloaded = await server.reload()
                        status = "reloaded" if reloaded else "reload failed, old configuration"
                        systemd.notify(systemd.ready_message(status))
                    else:
                        systemd.notify(systemd.STOPPING)
                        server.shutdown()
                        return

            nursery.start_soon(watch_signals)
