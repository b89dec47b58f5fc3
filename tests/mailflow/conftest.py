"""Fixtures of the mail-flow tests: a world-readable work directory, ports, scenarios.

Every scenario fixture is module-scoped (a Postfix instance takes about a
second to start and stop); tests stay independent by using their own
addresses and senders. The closing table of every compared case is
printed at the end of the run.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests.mailflow.harness import RESULTS, Ports, Scenario, ScenarioSpec, run_scenario

StartScenario = Callable[[ScenarioSpec], AbstractContextManager[Scenario]]


@pytest.fixture(scope="session")
def mailflow_root() -> Iterator[Path]:
    """A work directory that Postfix daemons (user postfix) can traverse.

    Not pytest's tmp_path: its parent /tmp/pytest-of-root is mode 0700.
    """
    root = Path(tempfile.mkdtemp(prefix="mailflow-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mailflow_ports() -> Ports:
    return Ports()


@pytest.fixture(scope="session")
def mailflow(mailflow_root: Path, mailflow_ports: Ports) -> StartScenario:
    """Start a scenario by its spec (as a context manager), in its own directory."""

    @contextlib.contextmanager
    def start(spec: ScenarioSpec) -> Iterator[Scenario]:
        with run_scenario(spec, mailflow_root / spec.name, mailflow_ports) as scenario:
            yield scenario

    return start


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    terminalreporter.section("mail flow: native memcache: vs bridge")
    for row in RESULTS:
        verdict = "same" if row.same else "DIFFERENT"
        terminalreporter.write_line(f"[{verdict}] {row.scenario} / {row.case}")
        terminalreporter.write_line(f"    native: {row.native}")
        if not row.same:
            terminalreporter.write_line(f"    bridge: {row.bridge}")
