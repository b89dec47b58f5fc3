"""What differs between a socketmap and a tcp_table connection, and how an answer is sent.

Theory of operation
-------------------
Both ways of serving connections (:mod:`bridge.server`'s task per
connection, :mod:`bridge.multiplex`'s event loop) speak the same two
sans-I/O codecs, which share :mod:`bridge.protocol.events`' vocabulary.
What differs between the protocols is one :class:`Dialect` record each;
what an answer costs besides its bytes (the request metric, the
rate-limited reason of a TEMP/TIMEOUT/PERM answer) is
:func:`reply_for`, so both serving paths count and log alike.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import trio

from bridge import metrics
from bridge.config import ListenerConfig
from bridge.logs import ReasonLog
from bridge.outcome import ConfigFailure, Outcome, Retry
from bridge.protocol import socketmap, tcptable
from bridge.protocol.events import BadRequest, ConnectionClosed, LookupRequest, NeedData

_log = logging.getLogger("bridge.server")

#: How long a reply may take to leave. Postfix waits 100 s per read
#: (SM-12, TCP-9); a client that does not read for that long is gone.
WRITE_TIMEOUT = 100.0

#: Every TEMP/TIMEOUT/PERM answer's reason, once per distinct cause per minute.
_reasons = ReasonLog(_log)


class ServerCodec(Protocol):
    """What both sans-I/O server codecs offer."""

    @property
    def request_in_progress(self) -> bool: ...

    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> LookupRequest | BadRequest | ConnectionClosed | NeedData: ...


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between a socketmap and a tcp_table connection."""

    name: str
    new_codec: Callable[[], ServerCodec]
    encode_reply: Callable[[Outcome], bytes]
    encode_bad_request: Callable[[BadRequest], bytes]


#: By a listener's ``protocol`` key.
DIALECTS = {
    "socketmap": Dialect(
        "socketmap",
        socketmap.SocketmapServerProtocol,
        socketmap.encode_reply,
        socketmap.encode_bad_request,
    ),
    "tcp": Dialect(
        "tcp_table",
        tcptable.TcpTableServerProtocol,
        tcptable.encode_reply,
        tcptable.encode_bad_request,
    ),
}


def table_of(request: LookupRequest, config: ListenerConfig) -> str:
    """The table a request asks: socketmap names it in each request; a tcp listener serves one."""
    name = request.table if request.table is not None else config.table
    assert name is not None
    return name


def reply_for(dialect: Dialect, table: str, outcome: Outcome, seconds: float) -> bytes:
    """The reply bytes for ``outcome``, counted in the metrics and its failure reason logged.

    Args:
      table: the table asked.
      seconds: how long the answer took.
    """
    metrics.current.request(table, dialect.name, outcome, seconds)
    if isinstance(outcome, Retry | ConfigFailure):
        if isinstance(outcome, ConfigFailure):
            answer = "PERM"
        else:
            answer = "TIMEOUT" if outcome.timeout else "TEMP"
        _reasons.warning(f"table {table}: {answer}: {outcome.reason}")
    return dialect.encode_reply(outcome)


def log_bad_request(dialect: Dialect, peer: str, event: BadRequest) -> None:
    """One warning per malformed request (the connection usually ends with it)."""
    _log.warning("%s request from %s: %s", dialect.name, peer, event.reason)


@contextlib.contextmanager
def connection_ends(listener: str) -> Iterator[None]:
    """Swallow what ends one client connection, never the server.

    The peer going away (reset, broken pipe, closed) is silent; a client
    that does not read its reply for :data:`WRITE_TIMEOUT` is logged at
    info level; anything unexpected is logged with its traceback.
    Cancellation passes through.
    """
    try:
        yield
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    except trio.TooSlowError:
        _log.info("closing connection: client did not read its reply in %ss", WRITE_TIMEOUT)
    except Exception:
        _log.exception("connection on %s failed", listener)
