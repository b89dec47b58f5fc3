"""The query and result templates of an SQL table, and the joined answer (SQL-4, SQL-5).

Theory of operation
-------------------
Postfix's SQL clients share one expansion routine (``db_common.c``) for
two templates: ``query``, expanded with the lookup key, and
``result_format``, expanded with each field the database returned. Both
are parsed when the table opens, into one context whose "needs" flags
are the union of what the two templates use. The union matters: a
``result_format`` with ``%D`` (the key's domain) suppresses the query for
keys without a domain, exactly as a ``%d`` in the query would (SQL-4).

:class:`SqlTemplates` holds the parsed pair:

* :meth:`SqlTemplates.expand_query` builds the statement for a key, or
  says the key is suppressed (None). Each substituted piece goes through
  the engine's quoting function, never the template text (SQL-4);
* :meth:`SqlTemplates.expand_result` expands one field: lower-case
  ``%s %u %d`` refer to the field, upper-case ``%S %U %D`` and ``%1``-``%9``
  to the key (SQL-5);
* :func:`join_results` expands every field in order, joins them with
  ``,``, and enforces ``expansion_limit``.

Everything here is pure and I/O-free apart from warnings.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from bridge.logs import ReasonLog
from bridge.outcome import Retry

__all__ = [
    "QuoteFunction",
    "SqlTemplates",
    "TemplateError",
    "join_results",
]

_log = logging.getLogger("bridge.maps")
_warnings = ReasonLog(_log)

#: Quotes one substituted piece for the engine's string literals (SQL-4).
QuoteFunction = Callable[[bytes], bytes]

_DIRECTIVES = frozenset("%sSuUdD123456789")


class TemplateError(ValueError):
    """A query or result_format template has a bad ``%`` directive."""


class _Need(enum.IntFlag):
    """What the templates need of the key and of each result field (db_common.c's flags)."""

    KEY_DOMAIN = 1
    KEY_USER = 2
    VALUE_DOMAIN = 4
    VALUE_USER = 8


@dataclass(frozen=True, slots=True)
class _Part:
    """One piece of a template: literal bytes, or a directive letter or digit."""

    literal: bytes = b""
    directive: str = ""


def _parse(text: str, *, query: bool) -> tuple[tuple[_Part, ...], _Need, int]:
    """Split a template and say what it needs (SQL-4): parts, flags, label count."""
    what = "query" if query else "result_format"
    parts: list[_Part] = []
    needs = _Need(0)
    labels = 0
    literal = bytearray()
    position = 0
    while position < len(text):
        char = text[position]
        if char != "%":
            literal += char.encode("utf-8")
            position += 1
            continue
        directive = text[position + 1 : position + 2]
        if directive not in _DIRECTIVES or not directive:
            shown = f"'%{directive}'" if directive else "a '%' at the end"
            raise TemplateError(
                f"invalid {what} template {text!r}: {shown} is not a valid expansion "
                "(use %%, %s, %S, %u, %U, %d, %D, %1-%9)"
            )
        position += 2
        if directive == "%":
            literal += b"%"
            continue
        if literal:
            parts.append(_Part(literal=bytes(literal)))
            literal.clear()
        parts.append(_Part(directive=directive))
        if directive == "u":
            needs |= _Need.KEY_USER if query else _Need.VALUE_USER
        elif directive == "d":
            needs |= _Need.KEY_DOMAIN if query else _Need.VALUE_DOMAIN
        elif directive == "U":
            needs |= _Need.KEY_USER
        elif directive == "D":
            needs |= _Need.KEY_DOMAIN
        elif directive.isdigit():
            needs |= _Need.KEY_DOMAIN
            labels = max(labels, int(directive))
    if literal:
        parts.append(_Part(literal=bytes(literal)))
    return tuple(parts), needs, labels


def _no_quote(piece: bytes) -> bytes:
    return piece


@dataclass(frozen=True, slots=True)
class SqlTemplates:
    """A table's ``query`` and ``result_format``, parsed together (SQL-4, SQL-5).

    Attributes:
      query: the query template as configured (or built by the legacy form, SQL-3).
      result_format: the result template (``%s`` by default).
      source: the table, for warnings.

    Raises:
      TemplateError: either template has a bad ``%`` directive.
    """

    query: str
    result_format: str = "%s"
    source: str = ""
    _query_parts: tuple[_Part, ...] = field(init=False, repr=False, compare=False)
    _result_parts: tuple[_Part, ...] = field(init=False, repr=False, compare=False)
    _needs: _Need = field(init=False, repr=False, compare=False)
    _labels: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        query_parts, query_needs, query_labels = _parse(self.query, query=True)
        result_parts, result_needs, result_labels = _parse(self.result_format, query=False)
        object.__setattr__(self, "_query_parts", query_parts)
        object.__setattr__(self, "_result_parts", result_parts)
        # One context for both templates, as in db_common.c: the key's
        # needs of either template suppress the query.
        object.__setattr__(self, "_needs", query_needs | result_needs)
        object.__setattr__(self, "_labels", max(query_labels, result_labels))

    def _split_key(self, key: bytes) -> tuple[int, list[bytes]] | None:
        """The key's last ``@`` (-1: none) and domain labels, or None when suppressed."""
        needs = self._needs
        at = key.rfind(b"@") if needs & (_Need.KEY_DOMAIN | _Need.KEY_USER) else -1
        if needs & _Need.KEY_DOMAIN and (at < 0 or at == len(key) - 1):
            return None
        if needs & _Need.KEY_USER and at == 0:
            return None
        labels: list[bytes] = []
        if self._labels:
            # Empty labels vanish (leading, trailing or doubled dots).
            labels = [label for label in key[at + 1 :].split(b".") if label]
            if len(labels) < self._labels:
                return None
        return at, labels

    def expand_query(self, key: bytes, quote: QuoteFunction | None = None) -> bytes | None:
        """The statement for ``key``, or None when the key is suppressed (SQL-4).

        Args:
          key: the (folded) lookup key.
          quote: the engine's quoting of one substituted piece; None leaves
            pieces as they are (used to check suppression before any
            connection exists).

        Returns:
          The statement bytes, or None: the key is empty (Postfix warns
          "empty query string"), or the templates need a domain, a local
          part or more domain labels than the key has.
        """
        if not key:
            _warnings.warning(f"table {self.source}: empty query string -- ignored")
            return None
        split = self._split_key(key)
        if split is None:
            return None
        at, labels = split
        quote = quote or _no_quote
        pieces: list[bytes] = []
        for part in self._query_parts:
            directive = part.directive
            if not directive:
                pieces.append(part.literal)
            elif directive in "sS":
                pieces.append(quote(key))
            elif directive in "uU":
                pieces.append(quote(key[:at] if at >= 0 else key))
            elif directive in "dD":
                pieces.append(quote(key[at + 1 :]))
            else:
                pieces.append(quote(labels[-int(directive)]))
        return b"".join(pieces)

    def expand_result(self, value: bytes | None, key: bytes) -> bytes | None:
        """One field expanded through ``result_format``, or None when it is skipped (SQL-5).

        Args:
          value: the field (None for SQL NULL), already cut at any NUL.
          key: the lookup key, for ``%S %U %D %1``-``%9``.

        Returns:
          The expansion; None for NULL (silently), for an empty field (with
          Postfix's warning), and for a field without the local part or
          domain that ``%u``/``%d`` need.
        """
        if value is None:
            return None
        if not value:
            _warnings.warning(
                f'table {self.source}: empty lookup result for: "'
                f'{key.decode("utf-8", "backslashreplace")}" -- ignored'
            )
            return None
        needs = self._needs
        value_at = value.rfind(b"@") if needs & (_Need.VALUE_DOMAIN | _Need.VALUE_USER) else -1
        if needs & _Need.VALUE_DOMAIN and (value_at < 0 or value_at == len(value) - 1):
            return None
        if needs & _Need.VALUE_USER and value_at == 0:
            return None
        split = self._split_key(key)
        if split is None:  # cannot happen: the same key passed expand_query
            return None
        key_at, labels = split
        pieces: list[bytes] = []
        for part in self._result_parts:
            directive = part.directive
            if not directive:
                pieces.append(part.literal)
            elif directive == "s":
                pieces.append(value)
            elif directive == "u":
                pieces.append(value[:value_at] if value_at >= 0 else value)
            elif directive == "d":
                pieces.append(value[value_at + 1 :])
            elif directive == "S":
                pieces.append(key)
            elif directive == "U":
                pieces.append(key[:key_at] if key_at >= 0 else key)
            elif directive == "D":
                pieces.append(key[key_at + 1 :])
            else:
                pieces.append(labels[-int(directive)])
        return b"".join(pieces)


def join_results(
    templates: SqlTemplates,
    fields: Iterable[bytes | None],
    key: bytes,
    *,
    expansion_limit: int,
) -> bytes | Retry:
    """Expand every field, in order, and join the expansions with ``,`` (SQL-5).

    Args:
      templates: the table's templates.
      fields: the fields in Postfix's order: every column of every row
        (pgsql, mysql) or the first column of every row (sqlite); None for
        NULL. Values are cut at their first NUL here, as C strings are.
      key: the lookup key.
      expansion_limit: above 0, more expansions than this are a temporary
        error, as in Postfix.

    Returns:
      The joined answer (empty: nothing to answer, i.e. not found), or
      Retry when the expansion limit was exceeded.
    """
    joined = bytearray()
    count = 0
    for field_value in fields:
        value = None if field_value is None else field_value.partition(b"\0")[0]
        expanded = templates.expand_result(value, key)
        if expanded is None:
            continue
        count += 1
        if 0 < expansion_limit < count:
            reason = (
                f"table {templates.source}: expansion limit {expansion_limit} exceeded "
                f"for key {key.decode('utf-8', 'backslashreplace')!r}"
            )
            _warnings.warning(reason)
            return Retry(reason)
        if joined:
            joined += b","
        joined += expanded
    return bytes(joined)
