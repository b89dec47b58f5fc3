"""Postfix's table configuration files: memcache_table(5), pgsql_table(5) and kin.

Theory of operation
-------------------
Postfix configures a ``memcache:``, ``pgsql:``, ``mysql:`` or ``ldap:``
table with a file of ``name = value`` lines read by its cfg_parser. The
syntax is the same for every table type; only the set of parameter names
differs. :func:`read_cf_file` reads that syntax exactly as Postfix does
(spec CF-1 .. CF-8, on top of :func:`bridge.postfix_text.logical_lines`)
and is told by its caller which names the table type knows:

* CF-5: a logical line is ``name = value``; the name ends at whitespace
  or ``=``; a line without a name or without ``=`` is a syntax problem;
* the value is trimmed (CF-7: the CR of a CRLF file too) and otherwise
  kept: no comments after values, no quoting, no ``$name`` expansion;
* names are case-sensitive; a name the table type does not know is
  ignored with a warning, as Postfix ignores it (MC-1). A name the caller
  knows from elsewhere (a bridge-only setting) gets a warning saying
  where to set it instead;
* CF-6: the last of a repeated name wins; a warning says so when the
  values differ.

Values are never quoted in a warning or a problem, whatever the name:
a ``.cf`` file of a database table holds a ``password``, and logs are not
the place for it. :func:`shown_value` is the one way table modules quote
a value in their own messages; it hides the value of a secret name.

This module knows no table type and imports nothing from
:mod:`bridge.config`, so a table module under :mod:`bridge.maps` can read
its own Postfix file with its own names. Problems come back as
:class:`CfProblem` (file, line, name, message); the caller turns them into
its own error type. Warnings go to the ``bridge.config`` logger, like the
logical-line reader's.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from bridge.postfix_text import WHITESPACE, logical_lines

__all__ = [
    "SECRET_NAMES",
    "CfEntry",
    "CfFile",
    "CfProblem",
    "read_cf_file",
    "shown_value",
    "split_cf_line",
]

_log = logging.getLogger("bridge.config")

#: Parameter names whose values are never shown in a message (pgsql_table(5),
#: mysql_table(5) and ldap_table(5) call theirs ``password`` or ``bind_pw``).
SECRET_NAMES = frozenset({"password", "bind_pw"})


def shown_value(name: str, value: str) -> str:
    """``value`` quoted for a message about parameter ``name``; hidden for a secret."""
    return "(value not shown)" if name in SECRET_NAMES else repr(value)


@dataclass(frozen=True, slots=True)
class CfEntry:
    """A parameter's value and the line its logical line started on."""

    value: str
    line: int


@dataclass(frozen=True, slots=True)
class CfProblem:
    """Why a ``.cf`` file (or one of its lines) cannot be used.

    ``line`` is None for the whole file (unreadable); ``name`` is set when
    the problem is about one parameter's value.
    """

    file: str
    line: int | None
    name: str | None
    message: str

    def __str__(self) -> str:
        parts = [self.file if self.line is None else f"{self.file}, line {self.line}"]
        if self.name is not None:
            parts.append(self.name)
        parts.append(self.message)
        return ": ".join(parts)


@dataclass(frozen=True, slots=True)
class CfFile:
    """A ``.cf`` file, read: the known parameters it sets, and its problems."""

    path: str
    entries: Mapping[str, CfEntry]
    problems: tuple[CfProblem, ...]

    def values(self) -> dict[str, str]:
        """The parameters as plain ``name: value`` text."""
        return {name: entry.value for name, entry in self.entries.items()}


def split_cf_line(text: bytes) -> tuple[bytes, bytes] | str:
    """CF-5: split ``name = value``; returns (name, value) or an error message.

    The message names the parameter at most, never its value.
    """
    name_end = 0
    while name_end < len(text) and text[name_end] not in WHITESPACE + b"=":
        name_end += 1
    name = text[:name_end]
    rest = text[name_end:].lstrip(WHITESPACE)
    if not name:
        return "missing parameter name before '='"
    if not rest.startswith(b"="):
        shown = name.decode("utf-8", "replace")
        return f"missing '=' after parameter name {shown!r}"
    # Trailing whitespace includes the CR of a CRLF file (CF-7).
    return name, rest[1:].strip(WHITESPACE)


def read_cf_file(
    path: str,
    names: Collection[str],
    *,
    manual: str,
    elsewhere: Collection[str] = (),
) -> CfFile:
    """Read a Postfix table configuration file as Postfix does (CF-1 .. CF-8).

    Args:
      path: the file name (used as is in messages).
      names: the parameter names the table type reads from such a file.
      manual: the manual page of the format, for warnings, e.g.
        ``"memcache_table(5)"``.
      elsewhere: names the caller knows but does not take from the file
        (settings of its own); they are ignored with a warning that says
        to set them in the TOML table.

    Returns:
      The known parameters the file sets, and its syntax problems (every
      bad line, with its number). Other names are ignored with a warning.

    Raises:
      OSError: the file cannot be read.
    """
    with open(path, "rb") as stream:
        data = stream.read()
    entries: dict[str, CfEntry] = {}
    problems: list[CfProblem] = []
    for logical in logical_lines(data, source=path):
        split = split_cf_line(logical.text)
        if isinstance(split, str):
            problems.append(CfProblem(path, logical.lineno, None, split))
            continue
        raw_name, raw_value = split
        name = raw_name.decode("utf-8", "replace")
        if name not in names:
            _warn_ignored(path, logical.lineno, name, manual=manual, elsewhere=elsewhere)
            continue
        try:
            value = raw_value.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(CfProblem(path, logical.lineno, name, "value is not valid UTF-8"))
            continue
        earlier = entries.get(name)
        if earlier is not None and earlier.value != value:
            # CF-6: Postfix keeps the last value; say so, since it is rarely meant.
            _log.warning(
                "%s, line %d: %s: overrides the different value given on line %d",
                path,
                logical.lineno,
                name,
                earlier.line,
            )
        entries[name] = CfEntry(value, logical.lineno)
    return CfFile(path, MappingProxyType(entries), tuple(problems))


def _warn_ignored(
    path: str, line: int, name: str, *, manual: str, elsewhere: Collection[str]
) -> None:
    if name in elsewhere:
        _log.warning(
            "%s, line %d: %s: ignored: a bridge-only setting is not read from a "
            "%s file; set it in the TOML table",
            path,
            line,
            name,
            manual,
        )
    else:
        # MC-1: Postfix ignores names it does not know, so the bridge must too.
        _log.warning("%s, line %d: %s: unknown parameter, ignored", path, line, name)
