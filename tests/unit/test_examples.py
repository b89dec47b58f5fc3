"""The example configuration shows every key the code knows, with its default."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from bridge.config import (
    LISTENER_PARAMETERS,
    METRICS_PARAMETERS,
    PARAMETERS,
    TOP_LEVEL_PARAMETERS,
    Parameter,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "bridge.toml"
ALL_PARAMETERS = (*TOP_LEVEL_PARAMETERS, *LISTENER_PARAMETERS, *METRICS_PARAMETERS, *PARAMETERS)
#: A line that sets a key, commented out or not: key, value, comment.
KEY_LINE = re.compile(
    r"^#?[ \t]*([a-z_0-9]+)[ \t]*=[ \t]*(.*?)[ \t]*(?:#[ \t]*(.*))?$", re.MULTILINE
)


def test_example_names_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    # A key counts when a line (commented out or not) sets it.
    written = set(re.findall(r"^#?\s*([a-z_0-9]+)\s*=", text, re.MULTILINE))
    for parameter in ALL_PARAMETERS:
        assert parameter.name in written, f"examples/bridge.toml does not show {parameter.name}"


def _as_schema_text(value: object) -> str:
    """A TOML value spelled as the schema spells defaults."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return ", ".join(_as_schema_text(item) for item in value)
    return str(value)


def _shows(default: str, value: str, comment: str) -> bool:
    """Whether a ``key = value  # comment`` line shows ``default``.

    Either the value is the default, or the comment gives it:
    ``default X`` / ``default "X"``, and ``default: none`` for an empty one.
    """
    if _as_schema_text(tomllib.loads(f"v = {value}")["v"]) == default:
        return True
    spellings = ["none", '""'] if default == "" else [default, f'"{default}"']
    return any(
        re.search(rf"\bdefault:? {re.escape(spelling)}(?![\w.:%])", comment)
        for spelling in spellings
    )


def _lines_for(parameter: Parameter, text: str) -> list[tuple[str, str]]:
    return [
        (value, comment or "")
        for name, value, comment in KEY_LINE.findall(text)
        if name == parameter.name
    ]


def test_example_shows_every_default() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for parameter in ALL_PARAMETERS:
        lines = _lines_for(parameter, text)
        defaults = [] if parameter.default is None else [parameter.default]
        if parameter.by is not None:
            defaults += [default for _, default in parameter.by.defaults if default is not None]
        for default in defaults:
            assert any(_shows(default, value, comment) for value, comment in lines), (
                f"examples/bridge.toml does not show {parameter.name}'s default {default!r}"
            )
