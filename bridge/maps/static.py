"""``static:`` tables: the same value for every key (spec ST-1).

``static:TEXT`` answers ``TEXT`` whatever the key. ``static:{ text }``
strips the braces and the whitespace inside them, which is how a value with
spaces is written; ``static:{}`` answers the empty string.

This module also holds :func:`strip_braces`, Postfix's ``{ ... }`` rule
(extpar with stripping), which ``inline:`` uses too.
"""

from __future__ import annotations

from typing import Final

from bridge.maps.base import MapError, OpenOptions, TableType
from bridge.outcome import Outcome, found_value

#: Postfix's whitespace (ISSPACE); ``str.strip()`` without arguments would
#: also strip Unicode spaces, which Postfix keeps.
WHITESPACE_TEXT = " \t\n\v\f\r"


def strip_braces(text: str) -> str:
    """Remove one balanced ``{ ... }`` and the whitespace just inside it.

    Args:
      text: text starting with ``{``.

    Returns:
      The inside of the braces, stripped of surrounding whitespace. Inner
      braces are kept as written.

    Raises:
      MapError: if the braces do not balance, or anything follows the
        closing brace.
    """
    if not text.startswith("{"):
        raise MapError(f"missing '{{' in {text!r}")
    depth = 0
    for index, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                if index != len(text) - 1:
                    raise MapError(f"syntax error after '}}' in {text!r}")
                return text[1:index].strip(WHITESPACE_TEXT)
    raise MapError(f"missing '}}' in {text!r}")


def parse_static(text: str) -> bytes:
    """The value a ``static:`` table answers (ST-1).

    Args:
      text: what follows ``static:``.

    Returns:
      The value as UTF-8 bytes, cut at any NUL (Postfix values are C strings).

    Raises:
      MapError: if ``text`` starts with ``{`` but is not one balanced
        ``{ ... }``.
    """
    if text.startswith("{"):
        text = strip_braces(text)
    return text.encode("utf-8", "surrogateescape").partition(b"\0")[0]


class StaticMap:
    """A ``static:`` table.

    Args:
      spec: the table as configured, e.g. ``static:{ hello world }``.
      text: what follows ``static:``.
      smtputf8: apply the G-6 value check (only matters for text that came
        from undecodable configuration bytes).

    Raises:
      MapError: for bad brace syntax.
    """

    def __init__(self, spec: str, text: str, *, smtputf8: bool = True) -> None:
        self._spec = spec
        self._value = parse_static(text)
        self._smtputf8 = smtputf8

    @property
    def spec(self) -> str:
        """The table as written in the configuration."""
        return self._spec

    async def lookup(self, key: bytes) -> Outcome:
        """Answer the table's value for any ``key``.

        Args:
          key: ignored.

        Returns:
          ``Found(value)`` (or ``ConfigFailure`` per G-6). Never raises.
        """
        return found_value(self._value, smtputf8=self._smtputf8, source=self._spec)

    async def aclose(self) -> None:
        """Nothing to release."""


def _check(name: str, options: OpenOptions) -> None:
    parse_static(name)


def _open(spec: str, name: str, options: OpenOptions) -> StaticMap:
    return StaticMap(spec, name, smtputf8=options.smtputf8)


#: ``static:`` in the registry: every key gets the same value, so nothing folds.
TABLE_TYPE: Final = TableType("static", _check, _open, summary="any text, or { text }")
