"""The metrics listener: ``GET /metrics`` (Prometheus text) and ``GET /healthz``.

Theory of operation
-------------------
A deliberately small HTTP/1.0 responder under trio: read one request head
(at most :data:`_MAX_HEAD` bytes, within :data:`_READ_TIMEOUT`), answer,
close. Prometheus scrapers and health checkers need nothing more, and
prometheus_client's own server would run in a thread.

``/healthz`` answers 200 when the configuration is loaded and every
table's memcache servers answered the last probe within the table's
``timeout``, 503 otherwise, with a short JSON body saying which. The
probe runs every ``health_interval`` seconds (see :func:`probe_forever`).

With ``workers = N`` the supervisor binds the endpoint once and every
worker serves it: ``/metrics`` is the sum over all workers (see
:mod:`bridge.metrics`), ``/healthz`` the view of the worker that
accepted the connection (each probes its own tables).
"""

from __future__ import annotations

import json
import logging
import socket as stdlib_socket
from collections.abc import Callable, Mapping, Sequence

import trio
from prometheus_client import CONTENT_TYPE_LATEST

from bridge import metrics
from bridge.endpoint import InetEndpoint
from bridge.table import Table

_log = logging.getLogger("bridge.http")

#: A scrape request head is a few hundred bytes; anything bigger is not one.
_MAX_HEAD = 8192

#: A scraper sends its request at once; a slow one is dropped.
_READ_TIMEOUT = 10.0


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def respond(request_head: bytes) -> bytes:
    """The full HTTP response for one request head (pure; see the module doc)."""
    request_line = request_head.split(b"\r\n", 1)[0].split()
    if len(request_line) < 2 or request_line[0] not in (b"GET", b"HEAD"):
        return _response("405 Method Not Allowed", "text/plain", b"GET /metrics or /healthz\n")
    path = request_line[1].split(b"?", 1)[0]
    current = metrics.current
    if path == b"/metrics":
        return _response("200 OK", CONTENT_TYPE_LATEST, current.exposition())
    if path == b"/healthz":
        health = current.health
        body = json.dumps(health.as_json(), sort_keys=True).encode() + b"\n"
        status = "200 OK" if health.healthy else "503 Service Unavailable"
        return _response(status, "application/json", body)
    return _response("404 Not Found", "text/plain", b"try /metrics or /healthz\n")


async def _handle(stream: trio.SocketStream) -> None:
    async with stream:
        head = b""
        with trio.move_on_after(_READ_TIMEOUT):
            while b"\r\n\r\n" not in head and len(head) < _MAX_HEAD:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                head += chunk
        if not head:
            return
        try:
            with trio.fail_after(_READ_TIMEOUT):
                await stream.send_all(respond(head))
        except (trio.BrokenResourceError, trio.TooSlowError):
            pass


async def serve_metrics(
    endpoint: InetEndpoint,
    bound: Sequence[stdlib_socket.socket] = (),
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /metrics and /healthz on ``endpoint`` until cancelled.

    Args:
      bound: the endpoint's listening sockets when the workers' supervisor
        bound them (shared by every worker); empty: bind ``endpoint`` here.
    """
    listeners: list[trio.SocketListener]
    if bound:
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in bound]
    else:
        listeners = await trio.open_tcp_listeners(endpoint.port, host=endpoint.host)
    task_status.started()
    await trio.serve_listeners(_handle, listeners)


async def probe_forever(tables: Callable[[], Mapping[str, Table]], interval: float) -> None:
    """Probe every table's memcache servers now and every ``interval`` seconds.

    Args:
      tables: returns the tables in use now (a reload swaps them).
      interval: seconds between probes.
    """
    health = metrics.current.health
    while True:
        current = tables()
        results = {}
        for name, table in current.items():
            results[name] = await table.probe()
        health.tables = results
        metrics.current.health_probed()
        for name, table_health in results.items():
            if not table_health.ok:
                _log.warning("health: table %s: %s", name, table_health.detail)
        await trio.sleep(interval)
