"""Bulk-load throughput: ``postfix-bridge load`` into a real memcached (and lmdb).

Not a test: it measures and prints. Run from the repository root:

    .venv/bin/python -m bench.load_bench [--entries 200000] [--runs 3]

It starts a private memcached on a free loopback port, writes a source
file of N entries, and loads it with the real command line, with and
without an lmdb backup. The rate printed is the load phase as reported by
the command itself (entries per second, interpreter start-up excluded),
and the wall time of the whole command beside it.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.integration.harness import run_memcached


def _load(config: Path, source: Path) -> tuple[float, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "load", "--config", str(config), "bench", str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"load failed ({result.returncode}):\n{result.stderr}")
    match = re.search(r"\(([\d,]+)/s\)", result.stderr)
    assert match, result.stderr
    return float(match.group(1).replace(",", "")), wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, run_memcached() as memcached:
        directory = Path(scratch)
        source = directory / "source"
        source.write_bytes(
            b"".join(
                b"user%d@example.com alias%d@mail.example.net\n" % (i, i)
                for i in range(args.entries)
            )
        )
        print(f"entries: {args.entries}, runs: {args.runs}, memcached on port {memcached.port}")
        for label, backup in (("memcache only", ""), ("memcache + lmdb", "lmdb")):
            rates, walls = [], []
            for run in range(args.runs):
                config = directory / f"bench-{run}.toml"
                backup_line = f'backup = "lmdb:{directory}/backup-{run}"\n' if backup else ""
                config.write_text(
                    '[[listen]]\nendpoint = "inet:127.0.0.1:1"\nprotocol = "socketmap"\n'
                    f'[tables.bench]\nmemcache = "{memcached.endpoint}"\n'
                    f'key_format = "bench:%s"\nwritable = true\n{backup_line}'
                )
                memcached.flush()
                rate, wall = _load(config, source)
                rates.append(rate)
                walls.append(wall)
            print(
                f"{label:16s} median {statistics.median(rates):>9,.0f} entries/s "
                f"(runs: {', '.join(f'{r:,.0f}' for r in rates)}); "
                f"median wall {statistics.median(walls):.2f}s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
