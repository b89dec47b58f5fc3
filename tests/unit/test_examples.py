"""The example configuration shows every key the code knows."""

from __future__ import annotations

import re
from pathlib import Path

from bridge.config import (
    LISTENER_PARAMETERS,
    METRICS_PARAMETERS,
    PARAMETERS,
    TOP_LEVEL_PARAMETERS,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "bridge.toml"


def test_example_names_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    # A key counts when a line (commented out or not) sets it.
    written = set(re.findall(r"^#?\s*([a-z_0-9]+)\s*=", text, re.MULTILINE))
    for parameter in (
        *TOP_LEVEL_PARAMETERS,
        *LISTENER_PARAMETERS,
        *METRICS_PARAMETERS,
        *PARAMETERS,
    ):
        assert parameter.name in written, f"examples/bridge.toml does not show {parameter.name}"
