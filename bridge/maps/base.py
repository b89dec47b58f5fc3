"""The interface every backup or domain table implements.

A table is opened once from its Postfix ``type:name`` text when the
configuration is loaded (so a bad table is a configuration error at start),
and then looked up from the trio event loop. Lookups never raise for
backend trouble: they return an :data:`~bridge.outcome.Outcome`, so a
failure becomes ``Retry`` and can never be mistaken for "not found".
"""

from __future__ import annotations

from typing import Protocol

from bridge.outcome import Outcome


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
