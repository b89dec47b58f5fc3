"""Postfix's logical-line reader, shared by every file format the bridge reads.

Postfix reads main.cf-style files (memcache_table(5) ``.cf`` files),
``texthash:`` source files and ``domain`` list files with one routine
(readlline.c). Its rules (spec CF-1 .. CF-4, CF-8):

* a physical line that starts with a non-whitespace byte starts a new
  logical line; each following line that starts with whitespace is
  appended to it, keeping its leading whitespace (only the LF goes);
* empty lines, whitespace-only lines and lines whose first non-whitespace
  byte is ``#`` are dropped, and do not end the logical line before them;
* a first logical line that starts with whitespace is discarded with a
  warning;
* a NUL byte ends the physical line's text.

``#`` elsewhere, quotes and backslashes are ordinary characters here; the
formats built on top decide what they mean. Trailing whitespace (including
the CR of a CRLF file) is left for the caller to strip.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

_log = logging.getLogger("bridge.config")

#: Postfix's whitespace set (spec conventions); bytes >= 0x80 never count.
WHITESPACE = b" \t\n\v\f\r"

_QUOTE = ord('"')
_BACKSLASH = ord("\\")


@dataclass(frozen=True, slots=True)
class LogicalLine:
    """One logical line and the physical line number where it started (1-based)."""

    lineno: int
    text: bytes


def is_utf8(data: bytes) -> bool:
    """Whether ``data`` is valid UTF-8: what Postfix's SMTPUTF8 checks demand (G-6)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _is_blank_or_comment(line: bytes) -> bool:
    stripped = line.lstrip(WHITESPACE)
    return not stripped or stripped.startswith(b"#")


def logical_lines(data: bytes, *, source: str = "<text>") -> Iterator[LogicalLine]:
    """Split file contents into Postfix logical lines.

    Args:
      data: the whole file.
      source: the file name, for the warning about a leading continuation line.

    Returns:
      An iterator of :class:`LogicalLine`, in file order, without the LF
      that ended each physical line.
    """
    current: bytearray | None = None
    start = 0
    for index, raw in enumerate(data.split(b"\n"), start=1):
        physical, nul, _ = raw.partition(b"\0")
        if nul:
            _log.warning("%s, line %d: text after a NUL byte is ignored", source, index)
        if _is_blank_or_comment(physical):
            continue
        if physical[:1] in (b" ", b"\t", b"\v", b"\f", b"\r"):
            if current is None:
                _log.warning(
                    "%s, line %d: logical line must not start with whitespace; ignored",
                    source,
                    index,
                )
                continue
            current += physical
            continue
        if current is not None:
            yield LogicalLine(start, bytes(current))
        current = bytearray(physical)
        start = index
    if current is not None:
        yield LogicalLine(start, bytes(current))


def _key_end(text: bytes) -> int | None:
    """Where the key of a source line ends (TH-3), or None for an open quote.

    The key ends at the first whitespace byte that is outside double quotes;
    a backslash makes the byte after it ordinary, quote or whitespace alike.
    """
    in_quotes = False
    index = 0
    while index < len(text):
        byte = text[index]
        if byte == _BACKSLASH:
            index += 2
            continue
        if byte in WHITESPACE and not in_quotes:
            return index
        if byte == _QUOTE:
            in_quotes = not in_quotes
        index += 1
    return None if in_quotes else len(text)


def split_source_line(text: bytes) -> tuple[bytes, bytes] | str:
    """Split one logical line of a Postfix source file into key and value (TH-3).

    This is the ``key whitespace value`` format that postmap and texthash
    read. Quotes and backslashes stay part of the key.

    Returns:
      ``(key, value)``, or a message saying why the line is unusable.
    """
    end = _key_end(text)
    if end is None:
        return "unbalanced '\"' in key"
    key = text[:end].rstrip(WHITESPACE)
    value = text[end:].strip(WHITESPACE)
    if not key or not value:
        return "expected format: key whitespace value"
    return key, value
