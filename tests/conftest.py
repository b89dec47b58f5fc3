"""Suite-wide rules.

In CI (``CI`` set), a skipped test is a failure: every tool a test needs is
installed by tests/run.sh, so a skip can only mean a broken set-up.
"""

from __future__ import annotations

import os

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not os.environ.get("CI"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped:
        print(f"\nCI: {skipped} test(s) skipped; every test must run in CI")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
