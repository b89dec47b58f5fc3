"""The README's configuration reference is the one the code renders."""

from __future__ import annotations

from pathlib import Path

from bridge.config import LISTENER_PARAMETERS, PARAMETERS, TOP_LEVEL_PARAMETERS
from bridge.reference import (
    BEGIN_MARKER,
    END_MARKER,
    configuration_page,
    render_reference,
    replace_reference,
)

README = Path(__file__).resolve().parents[2] / "README.md"
PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_readme_reference_matches_the_parameter_tables() -> None:
    document = README.read_text(encoding="utf-8")
    assert BEGIN_MARKER in document and END_MARKER in document
    assert replace_reference(document) == document, (
        "README.md configuration reference is stale: "
        "run python -m bridge.reference --write README.md"
    )


def test_every_parameter_is_rendered_with_its_default() -> None:
    rendered = render_reference()
    for parameter in (*TOP_LEVEL_PARAMETERS, *LISTENER_PARAMETERS, *PARAMETERS):
        row = next(
            line for line in rendered.splitlines() if line.startswith(f"| `{parameter.name}` |")
        )
        if parameter.default:
            assert f"`{parameter.default}`" in row
        if parameter.minimum is not None:
            assert f"| {parameter.minimum} |" in row


def test_configuration_page_matches_the_parameter_tables() -> None:
    assert PAGE.read_text(encoding="utf-8") == configuration_page(), (
        "docs/configuration.md is stale: run "
        "python -m bridge.reference --write README.md --page docs/configuration.md"
    )
