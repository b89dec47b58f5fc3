"""Every default is written once: in the parameter schema (bridge/config/_schema.py).

The loaders take every value the user left out from the schema, the
reference is rendered from it, and nothing else in ``bridge/`` may write
a default again: a second copy is how documented and effective defaults
drift apart.
"""

from __future__ import annotations

import ast
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.config import (
    LISTENER_PARAMETERS,
    METRICS_PARAMETERS,
    PARAMETERS,
    TOP_LEVEL_PARAMETERS,
    Parameter,
    load_config,
)
from bridge.reference import render_reference

ROOT = Path(__file__).resolve().parents[2]
BRIDGE = ROOT / "bridge"
SCHEMA = BRIDGE / "config" / "_schema.py"
SECTIONS: dict[str, tuple[Parameter, ...]] = {
    "Top level:": TOP_LEVEL_PARAMETERS,
    "Each `[[listen]]` section:": LISTENER_PARAMETERS,
    "The optional `[metrics]` section:": METRICS_PARAMETERS,
    "Each `[tables.NAME]` section": PARAMETERS,
}
ALL_PARAMETERS = (*TOP_LEVEL_PARAMETERS, *LISTENER_PARAMETERS, *METRICS_PARAMETERS, *PARAMETERS)


# ------------------------------------------------- no second copy in bridge/


def _default_texts(parameter: Parameter) -> list[str]:
    texts = [] if parameter.default is None else [parameter.default]
    if parameter.by is not None:
        texts += [default for _, default in parameter.by.defaults if default is not None]
    return texts


def _literals(parameter: Parameter) -> list[object]:
    """How a default could be spelled as a Python literal.

    Empty and boolean defaults are trivial: ``""``, ``True`` and ``False``
    are everywhere under the same names with other meanings (a map's
    ``writable`` open mode, a function's ``smtputf8`` switch), so a text
    search for them would only cry wolf.
    """
    if parameter.kind == "boolean":
        return []
    literals: list[object] = []
    for text in _default_texts(parameter):
        if not text:
            continue
        literals.append(text)
        with contextlib.suppress(ValueError):
            literals.append(int(text, 8) if parameter.kind == "mode" else int(text))
    return literals


def _same(value: object, literal: object) -> bool:
    if isinstance(value, bool) or isinstance(literal, bool):
        return False
    if isinstance(literal, int):
        return isinstance(value, int | float) and value == literal
    return isinstance(value, str) and value == literal


def _names_parameter(name: str, parameter: Parameter) -> bool:
    """``retry_after``, ``_retry_after``, ``self.retry_after``, ``_TCP_IDLE_TIMEOUT``, ..."""
    name = name.lower().lstrip("_")
    if name == parameter.name:
        return True
    # A prefixed constant names a parameter only when the parameter's own
    # name is specific (NOTIFY_TIMEOUT is not memcache's timeout).
    return "_" in parameter.name and name.endswith(f"_{parameter.name}")


def _target_name(target: ast.expr) -> str | None:
    if isinstance(target, ast.Name):
        return target.id
    if isinstance(target, ast.Attribute):
        return target.attr
    return None


def _named_values(tree: ast.AST) -> Iterator[tuple[str, ast.expr]]:
    """(name, value) for parameter defaults, assignments and keyword arguments."""
    for node in ast.walk(tree):
        if isinstance(node, ast.arguments):
            positional = [*node.posonlyargs, *node.args]
            with_default = positional[len(positional) - len(node.defaults) :]
            yield from (
                (arg.arg, value) for arg, value in zip(with_default, node.defaults, strict=True)
            )
            for arg, default in zip(node.kwonlyargs, node.kw_defaults, strict=True):
                if default is not None:
                    yield arg.arg, default
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            name = _target_name(node.target)
            if name is not None:
                yield name, node.value
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                name = _target_name(target)
                if name is not None:
                    yield name, node.value
        elif isinstance(node, ast.keyword) and node.arg is not None:
            yield node.arg, node.value


def second_copies(path: Path, root: Path = ROOT) -> list[str]:
    """Where ``path`` writes a parameter's default literal under the parameter's name."""
    found: list[tuple[int, str]] = []
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for name, value in _named_values(tree):
        if not isinstance(value, ast.Constant):
            continue
        for parameter in ALL_PARAMETERS:
            if not _names_parameter(name, parameter):
                continue
            if any(_same(value.value, literal) for literal in _literals(parameter)):
                where = f"{path.relative_to(root)}:{value.lineno}"
                copy = f"{where}: {name} = {value.value!r} ({parameter.name})"
                found.append((value.lineno, copy))
    return [copy for _, copy in sorted(found, key=lambda item: item[0])]


def test_no_default_is_written_a_second_time_in_bridge() -> None:
    found = [
        copy
        for path in sorted(BRIDGE.rglob("*.py"))
        if path != SCHEMA
        for copy in second_copies(path)
    ]
    assert not found, "defaults belong in bridge/config/_schema.py only:\n" + "\n".join(found)


def test_the_heuristic_finds_second_copies(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from dataclasses import dataclass\n"
        "def ring(*, retry_after: float = 60.0, eject_after: int = 0) -> None: ...\n"
        "@dataclass\n"
        "class Listener:\n"
        "    request_timeout: float = 10.0\n"
        "    mode: int = 0o666\n"
        "_SOCKETMAP_IDLE_TIMEOUT = 100.0\n"
        "NOTIFY_TIMEOUT = 2.0\n"
        "writable: bool = False\n"
        "setup(log_format='text', health_interval=10)\n"
    )
    assert second_copies(probe, root=tmp_path) == [
        "probe.py:2: retry_after = 60.0 (retry_after)",
        "probe.py:2: eject_after = 0 (eject_after)",
        "probe.py:5: request_timeout = 10.0 (request_timeout)",
        "probe.py:6: mode = 438 (mode)",
        "probe.py:7: _SOCKETMAP_IDLE_TIMEOUT = 100.0 (idle_timeout)",
        "probe.py:10: log_format = 'text' (log_format)",
        "probe.py:10: health_interval = 10 (health_interval)",
    ]


# ------------------------------------------------------- the schema itself


@pytest.mark.parametrize("parameter", ALL_PARAMETERS, ids=lambda p: p.name)
def test_each_key_has_exactly_one_kind_of_default(parameter: Parameter) -> None:
    kinds = [parameter.default is not None, parameter.required, parameter.by is not None]
    assert kinds.count(True) == 1
    required_somewhere = parameter.required or (
        parameter.by is not None and any(default is None for _, default in parameter.by.defaults)
    )
    if required_somewhere:
        assert parameter.missing, f"{parameter.name}: say what to write when it is missing"


def test_a_default_that_depends_on_a_key_depends_on_an_earlier_key() -> None:
    # The loader converts a section's keys in schema order.
    for parameters in SECTIONS.values():
        names = [parameter.name for parameter in parameters]
        for index, parameter in enumerate(parameters):
            if parameter.by is not None:
                assert parameter.by.key in names[:index], parameter.name


# ------------------------------------------------------------ the reference


def _rendered_defaults() -> dict[tuple[str, str], str]:
    """(section heading, key) -> the default column of the rendered reference."""
    cells: dict[tuple[str, str], str] = {}
    heading = ""
    for line in render_reference().splitlines():
        for title in SECTIONS:
            if line.startswith(title):
                heading = title
        if line.startswith("| `"):
            key, default = (cell.strip() for cell in line.split(" | ")[:2])
            cells[heading, key.strip("|` ")] = default
    return cells


def test_reference_says_required_only_for_required_keys() -> None:
    cells = _rendered_defaults()
    for heading, parameters in SECTIONS.items():
        for parameter in parameters:
            cell = cells[heading, parameter.name]
            if parameter.required:
                assert cell == "(required)", parameter.name
            else:
                # A key with a default, or one that depends on another key,
                # is never documented as simply required.
                assert "(required)" not in cell, (parameter.name, cell)


def test_reference_shows_each_context_dependent_default() -> None:
    cells = _rendered_defaults()
    for heading, parameters in SECTIONS.items():
        for parameter in parameters:
            if parameter.by is None:
                continue
            cell = cells[heading, parameter.name]
            for context, default in parameter.by.defaults:
                expected = f"required for {context}" if default is None else f"`{default}`"
                assert expected in cell and context in cell, (parameter.name, cell)


# ------------------------------------ documented defaults are the effective ones


def _toml(parameter: Parameter, text: str) -> str:
    """``parameter = DEFAULT`` as a user would write it in TOML."""
    if parameter.kind == "boolean":
        return f"{parameter.name} = {text}"
    return f'{parameter.name} = "{text}"'


def _written(parameters: tuple[Parameter, ...], skip: tuple[str, ...] = ()) -> str:
    return "\n".join(
        _toml(parameter, parameter.default)
        for parameter in parameters
        if parameter.default is not None and parameter.name not in skip
    )


def test_every_documented_default_is_the_one_in_effect(tmp_path: Path) -> None:
    """A file that writes every default out loads exactly like one that leaves them out."""
    inet_only = ("allow", "reuse_port")
    unix_only = ("mode", "owner", "group")
    idle_timeout = next(p.by for p in LISTENER_PARAMETERS if p.name == "idle_timeout")
    assert idle_timeout is not None
    idle = dict(idle_timeout.defaults)
    left_out = (
        '[[listen]]\nendpoint = "inet:127.0.0.1:10027"\nprotocol = "socketmap"\n'
        '[[listen]]\nendpoint = "inet:127.0.0.1:10028"\nprotocol = "tcp"\ntable = "t"\n'
        '[[listen]]\nendpoint = "unix:bridge.sock"\nprotocol = "socketmap"\n'
        '[metrics]\nendpoint = "inet:127.0.0.1:9464"\n'
        "[tables.t]\n"
    )
    # ``config = ""`` is refused (an empty file name): its empty default
    # means the key is left out.
    written_out = (
        f"{_written(TOP_LEVEL_PARAMETERS)}\n"
        '[[listen]]\nendpoint = "inet:127.0.0.1:10027"\nprotocol = "socketmap"\n'
        f'idle_timeout = "{idle["socketmap"]}"\n'
        f"{_written(LISTENER_PARAMETERS, skip=unix_only)}\n"
        '[[listen]]\nendpoint = "inet:127.0.0.1:10028"\nprotocol = "tcp"\ntable = "t"\n'
        f'idle_timeout = "{idle["tcp"]}"\n'
        f"{_written(LISTENER_PARAMETERS, skip=unix_only)}\n"
        '[[listen]]\nendpoint = "unix:bridge.sock"\nprotocol = "socketmap"\n'
        f"{_written(LISTENER_PARAMETERS, skip=inet_only)}\n"
        '[metrics]\nendpoint = "inet:127.0.0.1:9464"\n'
        f"{_written(METRICS_PARAMETERS)}\n"
        "[tables.t]\n"
        f"{_written(PARAMETERS, skip=('config',))}\n"
    )
    path = tmp_path / "bridge.toml"
    path.write_text(left_out)
    implicit = load_config(str(path))
    path.write_text(written_out)
    assert load_config(str(path)) == implicit
