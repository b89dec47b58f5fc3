"""Events shared by every sans-I/O codec in bridge.protocol.

Each codec is fed bytes with ``receive_data`` and asked for its next event
with ``next_event`` (or ``next_payload``/``next_line``); these two values
mean the same thing in all of them, so the I/O layer treats the codecs
alike.
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
