"""The four outcomes of a Postfix table lookup (spec G-1).

Every lookup in the bridge, whether it goes to memcache, a backup table or
a chained lookup server, ends in exactly one of these values. The protocol
encoders turn them into wire replies; nothing else decides reply codes.

    Found(value)     -> socketmap "OK value",      tcp "200 value"
    NOT_FOUND        -> socketmap "NOTFOUND ",     tcp "500 ..."
    Retry(reason)    -> socketmap "TEMP reason" (or "TIMEOUT reason"), tcp "400 reason"
    ConfigFailure    -> socketmap "PERM reason",   tcp "400 reason"

A backend failure is always Retry, never NOT_FOUND: a wrong "not found"
bounces or misroutes mail, while a temporary failure only defers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Found:
    """The key exists; ``value`` is the raw value bytes (already cut at NUL)."""

    value: bytes


@dataclass(frozen=True, slots=True)
class NotFound:
    """The key does not exist, and nothing went wrong finding that out."""


@dataclass(frozen=True, slots=True)
class Retry:
    """A temporary failure (Postfix RETRY). ``timeout`` marks time-limit failures."""

    reason: str
    timeout: bool = False


@dataclass(frozen=True, slots=True)
class ConfigFailure:
    """The table cannot work as configured (Postfix CONFIG)."""

    reason: str


NOT_FOUND: Final = NotFound()

Outcome = Found | NotFound | Retry | ConfigFailure

#: Outcomes that are failures: the caller must not treat them as an answer.
Failure = Retry | ConfigFailure


# Update, delete and sequence report a status instead of a value (G-2):
# SUCCESS, FAIL (nothing went wrong, but nothing was done: key absent,
# value not stored, key skipped) or ERROR (Retry / ConfigFailure).


@dataclass(frozen=True, slots=True)
class Written:
    """The update or delete was done (Postfix SUCCESS)."""


@dataclass(frozen=True, slots=True)
class NotWritten:
    """Nothing was done and nothing failed (Postfix FAIL): ``reason`` says why."""

    reason: str


WRITTEN: Final = Written()

WriteOutcome = Written | NotWritten | Retry | ConfigFailure


def found_value(value: bytes, *, smtputf8: bool, source: str) -> Found | ConfigFailure:
    """``Found(value)``, or ConfigFailure for a non-UTF-8 value under SMTPUTF8 (G-6).

    Postfix turns such a found result into a configuration error, so the
    bridge says so itself, naming where the value came from.

    Args:
      value: the value bytes, already cut at any NUL.
      smtputf8: whether SMTPUTF8 checks are on.
      source: the table, for the failure reason.
    """
    if smtputf8:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return ConfigFailure(f"table {source}: value is not valid UTF-8")
    return Found(value)
