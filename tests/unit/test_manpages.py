"""The man pages in docs/man/ are the ones the code renders, and groff and man take them cleanly."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bridge import cli, manpages
from bridge.config import LISTENER_PARAMETERS, METRICS_PARAMETERS, PARAMETERS, TOP_LEVEL_PARAMETERS
from bridge.daemon import SIGNALS

MAN_DIR = Path(__file__).resolve().parents[2] / "docs" / "man"
PAGES = sorted(manpages.PAGES)


@pytest.mark.parametrize("name", PAGES)
def test_committed_page_matches_the_code(name: str) -> None:
    assert (MAN_DIR / name).read_text(encoding="utf-8") == manpages.PAGES[name](), (
        f"docs/man/{name} is stale: run python -m bridge.manpages --write docs/man"
    )


def _tool(name: str) -> str:
    path = shutil.which(name)
    # tests/run.sh installs groff-base and man-db: a missing tool is a failure, never a skip.
    assert path, f"{name} is not installed (tests/run.sh installs it)"
    return path


@pytest.mark.parametrize("name", PAGES)
@pytest.mark.parametrize("device", ["-z", "-Tutf8", "-Tascii"])
def test_groff_renders_without_a_warning(name: str, device: str) -> None:
    completed = subprocess.run(
        [_tool("groff"), "-ww", "-man", "-t", device, str(MAN_DIR / name)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""


@pytest.mark.parametrize("name", PAGES)
def test_man_renders_without_a_warning(name: str) -> None:
    environment = {**os.environ, "MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "80"}
    completed = subprocess.run(
        [_tool("man"), "--warnings=w", "-l", str(MAN_DIR / name)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=environment,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    assert "postfix-bridge" in completed.stdout


def _rendered(name: str) -> str:
    """The page as text, for reading what a user sees."""
    return subprocess.run(
        [_tool("groff"), "-man", "-Tascii", "-P-cbou", str(MAN_DIR / name)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def test_configuration_page_lists_every_key_with_its_default() -> None:
    text = " ".join(_rendered(manpages.CONFIGURATION_PAGE).split())
    for parameter in (
        *TOP_LEVEL_PARAMETERS,
        *LISTENER_PARAMETERS,
        *METRICS_PARAMETERS,
        *PARAMETERS,
    ):
        marked = f"{parameter.name} (memcache_table(5))"
        if parameter.postfix:
            assert marked in text
        else:
            assert marked not in text
            assert f" {parameter.name} " in text
        if parameter.default:
            assert f"Default: {parameter.default}." in text, parameter.name
    for key in ("log_target", "syslog_facility", "syslog_socket"):
        assert key in text


def test_command_page_lists_commands_options_exit_statuses_and_signals() -> None:
    text = " ".join(_rendered(manpages.COMMAND_PAGE).split())
    for command in ("serve", "check", "query", "update", "delete", "dump", "health", "load"):
        assert f"postfix-bridge {command} [options]" in text
    for option in ("--config", "--log-level", "--log-format", "--log-target", "--batch-size"):
        assert option in text
    for status, _ in cli.EXIT_STATUSES:
        assert f" {status} " in text
    for signum, _ in SIGNALS:
        assert signum.name in text
    assert "/etc/postfix-bridge/bridge.toml" in text


def test_a_new_subcommand_is_picked_up_without_change(monkeypatch: pytest.MonkeyPatch) -> None:
    def with_rehash() -> argparse.ArgumentParser:
        parser = cli.build_parser()
        [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        rehash = commands.add_parser("rehash", help="convert a memcache_table(5) file")
        rehash.add_argument("cf_file", metavar="FILE", help="the .cf file")
        rehash.add_argument("--dry-run", action="store_true", help="print, do not write")
        return parser

    monkeypatch.setattr(manpages, "build_parser", with_rehash)
    page = manpages.command_page()
    assert r"\fBpostfix\-bridge\fR \fBrehash\fR" in page
    assert r"[\fB\-\-dry\-run\fR] \fIFILE\fR" in page
    assert "print, do not write" in page.lower()


@pytest.mark.parametrize(
    ("text", "roff"),
    [
        ("a-b", r"a\-b"),
        ("C:\\dir", r"C:\edir"),
        ("it's", r"it\(aqs"),
        ('say "x"', r"say \(dqx\(dq"),
        ("café", r"caf\[u00E9]"),
    ],
)
def test_escape(text: str, roff: str) -> None:
    assert manpages.escape(text) == roff


def test_a_text_line_never_starts_a_request() -> None:
    assert manpages._text(".cf files") == r"\&.cf files"
    assert manpages._text("'quoted'") == r"\&'quoted'"
