"""Events shared by every sans-I/O codec in bridge.protocol.

Each codec is fed bytes with ``receive_data`` and asked for its next event
with ``next_event`` (or ``next_payload``/``next_line``); these values mean
the same thing in all of them, so the I/O layer treats the codecs alike.
Both server codecs (socketmap, tcp_table) speak one vocabulary:
:class:`LookupRequest`, :class:`BadRequest`, :class:`ConnectionClosed`
and :data:`NEED_DATA`; each has its own ``encode_reply`` and
``encode_bad_request`` for the answers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias


class _NeedDataType(enum.Enum):
    NEED_DATA = enum.auto()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by a codec when the bytes received so far do not yet complete
#: the next frame, line or reply: the I/O layer must read more.
NEED_DATA: Final = _NeedDataType.NEED_DATA

#: The type of :data:`NEED_DATA`, for annotations (``bytes | NeedData``).
NeedData: TypeAlias = Literal[_NeedDataType.NEED_DATA]


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer has closed its side of the connection; no more events follow.

    ``mid_frame`` is True when the close cut a request short: the bytes of
    that partial request are dropped unanswered (there is nobody left to
    read an answer).
    """

    mid_frame: bool = False


@dataclass(frozen=True, slots=True)
class LookupRequest:
    """One lookup of ``key``, exactly as the client sent it (no folding).

    ``table`` is the socketmap name the request carries (SM-8), or None
    for tcp_table, whose listener serves one table.
    """

    table: str | None
    key: bytes


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A request the server will not look up; answer with the codec's ``encode_bad_request``.

    ``fatal``: the framing is broken, so there is no telling where the
    next request starts: answer, then close the connection. ``temporary``
    (tcp_table only): the request might have been a valid lookup (badly
    quoted key, overlong line), answered ``400``; otherwise ``500``.
    socketmap answers every bad request ``PERM``.
    """

    reason: str
    fatal: bool
    temporary: bool = True
