"""``inline:`` tables: ``key=value`` pairs written in the table name (spec IN-1, IN-2).

``inline:{ a=1, b=2, { c = three words } }`` is parsed once, at open:

* the text after ``inline:`` must be one balanced ``{ ... }`` with nothing
  after it (:func:`bridge.maps.static.strip_braces`);
* inside, items are separated by runs of commas and whitespace, except
  inside braces;
* an item is ``key=value``; an item in braces has them stripped, so its
  value may contain spaces and the ``=`` may have spaces around it;
* a repeated key: the last value wins; an empty value is allowed.

Any syntax error, or a table without items, makes the whole table unusable
(:class:`~bridge.maps.base.MapError`), as in Postfix. Keys are case-folded
at load for backup tables, exactly like lookup keys (IN-2, TH-4 bridge
note).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Final

from bridge.keys import fold_table_key
from bridge.maps.base import MapError, OpenOptions, TableType
from bridge.maps.static import WHITESPACE_TEXT, strip_braces
from bridge.outcome import NOT_FOUND, Outcome, found_value

#: Item separators (Postfix's CHARS_COMMA_SP). Only these split items; VT
#: and FF do not, although they count as whitespace around ``=``.
_ITEM_SEPARATORS = ", \t\r\n"


def _split_items(text: str) -> list[str]:
    """Cut ``text`` at separator runs that are outside braces."""
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "{":
            depth += 1
        elif char == "}" and depth > 0:
            depth -= 1
        elif depth == 0 and char in _ITEM_SEPARATORS:
            if current:
                items.append("".join(current))
                current = []
            continue
        current.append(char)
    if current:
        items.append("".join(current))
    return items


def _split_name_value(item: str) -> tuple[str, str]:
    """Split ``name = value`` (whitespace around ``=`` allowed) into its parts.

    Raises:
      MapError: for a missing name or a missing ``=`` right after the name.
    """
    text = item.lstrip(WHITESPACE_TEXT)
    name_end = 0
    while name_end < len(text) and text[name_end] not in WHITESPACE_TEXT + "=":
        name_end += 1
    name = text[:name_end]
    if not name:
        raise MapError(f"missing attribute name in {item!r}")
    rest = text[name_end:].lstrip(WHITESPACE_TEXT)
    if not rest.startswith("="):
        raise MapError(f"missing '=' after attribute name {name!r} in {item!r}")
    return name, rest[1:].strip(WHITESPACE_TEXT)


def parse_inline(text: str) -> dict[str, str]:
    """Parse what follows ``inline:`` (IN-1, IN-2).

    Args:
      text: e.g. ``{Foo=Bar, {baz = x y}}``.

    Returns:
      The pairs, keys as written (not folded); a repeated key keeps its
      last value.

    Raises:
      MapError: for any syntax error or an empty table.
    """
    pairs: dict[str, str] = {}
    for item in _split_items(strip_braces(text)):
        name_value = strip_braces(item) if item.startswith("{") else item
        name, value = _split_name_value(name_value)
        pairs[name] = value
    if not pairs:
        raise MapError("empty table")
    return pairs


def _to_bytes(text: str) -> bytes:
    # surrogateescape round-trips configuration bytes that were not UTF-8;
    # the cut at NUL keeps Postfix's C-string view of values.
    return text.encode("utf-8", "surrogateescape").partition(b"\0")[0]


class InlineMap:
    """An ``inline:`` table.

    Args:
      spec: the table as configured, e.g. ``inline:{a=1, b=2}``.
      text: what follows ``inline:``.
      fold: case-fold the keys like lookup keys (backup tables); False keeps
        them as written (domain tables, DOM-6).
      smtputf8: Unicode folding and the G-6 value check when true.

    Raises:
      MapError: for a syntax error or an empty table.
    """

    def __init__(self, spec: str, text: str, *, fold: bool, smtputf8: bool = True) -> None:
        self._spec = spec
        self._smtputf8 = smtputf8
        try:
            pairs = parse_inline(text)
        except MapError as exc:
            raise MapError(f"table {spec}: {exc}; need inline:{{name=value...}}") from None
        self._entries: dict[bytes, bytes] = {}
        for name, value in pairs.items():
            key = _to_bytes(name)
            if fold:
                key = fold_table_key(key, smtputf8=smtputf8)
            # Folding can merge keys that differed in case: the later one
            # wins, as for any repeated key (IN-2).
            self._entries[key] = _to_bytes(value)

    @property
    def spec(self) -> str:
        """The table as written in the configuration."""
        return self._spec

    async def lookup(self, key: bytes) -> Outcome:
        """Look up ``key`` as given (the caller folds it when the table folds).

        Args:
          key: the lookup key.

        Returns:
          ``Found(value)`` or ``NOT_FOUND`` (``ConfigFailure`` per G-6).
          Never raises.
        """
        value = self._entries.get(key)
        if value is None:
            return NOT_FOUND
        return found_value(value, smtputf8=self._smtputf8, source=self._spec)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Iterate over (key, value) in the order written, keys as stored."""
        return iter(list(self._entries.items()))

    async def sequence(self) -> AsyncIterator[tuple[bytes, bytes]]:
        """Yield every entry in the order written (MC-20)."""
        for entry in self.items():
            yield entry

    async def aclose(self) -> None:
        """Nothing to release."""


def _check(name: str, options: OpenOptions) -> None:
    parse_inline(name)


def _open(spec: str, name: str, options: OpenOptions) -> InlineMap:
    return InlineMap(spec, name, fold=options.fold, smtputf8=options.smtputf8)


#: ``inline:`` in the registry: stored keys folded when ``options.fold`` (IN-2).
TABLE_TYPE: Final = TableType("inline", _check, _open, summary="{ key=value, ... }")
