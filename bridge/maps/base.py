"""The interface every backup or domain table implements.

A table is opened once from its Postfix ``type:name`` text when the
configuration is loaded (so a bad table is a configuration error at start),
and then looked up from the trio event loop. Lookups never raise for
backend trouble: they return an :data:`~bridge.outcome.Outcome`, so a
failure becomes ``Retry`` and can never be mistaken for "not found".
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from bridge.outcome import Outcome, WriteOutcome


class MapError(ValueError):
    """A table specification cannot be opened; the message names the table and the cause."""


class LookupMap(Protocol):
    """A read-only Postfix lookup table."""

    @property
    def spec(self) -> str:
        """The table as written in the configuration, e.g. ``texthash:/etc/postfix/aliases``."""
        ...

    async def lookup(self, key: bytes) -> Outcome:
        """Look up ``key`` exactly as given (the caller has already folded case where due)."""
        ...

    async def aclose(self) -> None:
        """Release connections or files. Idempotent."""
        ...


@runtime_checkable
class SequenceMap(LookupMap, Protocol):
    """A table that can list its entries (Postfix first/next, MC-20)."""

    def sequence(self) -> AsyncIterator[tuple[bytes, bytes]]:
        """Yield every (key, value) in the table's own order, values cut at NUL.

        Raises:
          MapError: the table cannot be read (the message says why).
        """
        ...


@runtime_checkable
class WritableMap(SequenceMap, Protocol):
    """A table the bridge can change (only ``lmdb:`` today, like Postfix's writable types)."""

    async def update(self, key: bytes, value: bytes) -> WriteOutcome:
        """Store ``value`` under ``key``, replacing any old value (proxywrite semantics, PX-3).

        Returns ``WRITTEN`` once the change is durable, or Retry/ConfigFailure.
        """
        ...

    async def update_many(self, items: Sequence[tuple[bytes, bytes]]) -> WriteOutcome:
        """Store many entries in one transaction: all of them are durable, or none."""
        ...

    async def delete(self, key: bytes) -> WriteOutcome:
        """Remove ``key``: ``WRITTEN``, ``NotWritten`` when absent, or Retry/ConfigFailure."""
        ...
