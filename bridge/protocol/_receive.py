"""The receiving half every byte-stream codec in bridge.protocol shares.

A codec is fed whatever the socket returned, ``b""`` meaning the peer
closed its side; it keeps the bytes until they make a whole frame, line
or request. After a fatal error or a close the codec has nothing more to
say, so later bytes are not worth keeping: a subclass says when through
:meth:`ReceiveBuffer._discarding`.
"""

from __future__ import annotations


class ReceiveBuffer:
    """Received bytes not yet consumed (``_buffer``) and whether the peer closed (``_eof``)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._eof = False

    @property
    def buffered_byte_count(self) -> int:
        """How many received bytes are held, not yet returned."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the peer.

        Args:
          data: the bytes; ``b""`` means the peer closed its side (EOF).

        Raises:
          RuntimeError: if non-empty data follows EOF (a caller bug).
        """
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("received data after EOF")
        if not self._discarding():
            self._buffer += data

    def _discarding(self) -> bool:
        """Whether new bytes are dropped (the codec has failed or closed)."""
        return False
