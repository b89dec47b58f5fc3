"""Suite-wide rules and the reliability report.

In CI (``CI`` set), a skipped test is a failure: every tool a test needs is
installed by tests/run.sh, so a skip can only mean a broken set-up.

Tests that inject faults or hostile input record their figures through
the ``reliability`` fixture; at the end of the run the rows are written
to the file named by BRIDGE_RELIABILITY_REPORT (see tests/reliability.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.reliability import REPORT_ENV, ReliabilityReport, long_mode

_REPORT = ReliabilityReport(long_mode=long_mode())


@pytest.fixture(scope="session")
def reliability() -> ReliabilityReport:
    """The run's reliability report; tests add rows with ``record(...)``."""
    return _REPORT


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    target = os.environ.get(REPORT_ENV)
    if target and _REPORT.rows and exitstatus == 0:
        Path(target).write_text(_REPORT.render(), encoding="utf-8")
    if not os.environ.get("CI"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped:
        print(f"\nCI: {skipped} test(s) skipped; every test must run in CI")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
