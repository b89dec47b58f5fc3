"""memcache: the wire protocol's client, the ketama ring, and a table's pool of servers.

:class:`MemcacheBackend` is what a table needs from memcache, in the
project's outcome vocabulary; :class:`~bridge.memcache.pool.MemcachePool`
is the real one, and tests build tables with in-memory fakes of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from bridge.outcome import Found, NotFound, NotWritten, Retry, Written

__all__ = ["MemcacheBackend"]


class MemcacheBackend(Protocol):
    """The memcache commands a table uses (MC-11 .. MC-19), each answered as an outcome.

    No method raises for server trouble: failures are :class:`Retry`.
    """

    async def get(self, key: bytes) -> Found | NotFound | Retry:
        """The value stored under ``key`` exactly as stored, or a miss."""
        ...

    async def set(
        self, key: bytes, value: bytes, *, flags: int, ttl: int
    ) -> Written | NotWritten | Retry:
        """Store ``value``; NotWritten when it exceeds ``data_size_limit``."""
        ...

    async def delete(self, key: bytes) -> Written | NotWritten | Retry:
        """Delete ``key``; NotWritten when it was not there."""
        ...

    async def set_many(
        self, items: Sequence[tuple[bytes, bytes]], *, flags: int, ttl: int
    ) -> Written | Retry:
        """Store many values (each within ``data_size_limit``) in as few exchanges as possible."""
        ...

    async def probe(self) -> list[Retry]:
        """Ask every server once; the failures, if any."""
        ...

    async def aclose(self) -> None:
        """Close every connection. Idempotent."""
        ...
