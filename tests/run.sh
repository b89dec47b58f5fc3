#!/usr/bin/env bash
# The whole test suite: lint, types, unit and integration tests.
# Installs what the tests need when missing (memcached, Postfix's postmap,
# a venv with the project's test extras). Usage: bash tests/run.sh [pytest args]
set -euo pipefail
source "$(dirname "$0")/../.ci/setup.sh"
cd "$ROOT"

ensure_packages memcached:memcached postmap:postfix
# The man page tests render docs/man/ with every groff warning on, and through man -l.
ensure_packages groff:groff-base man:man-db
# postfix-lmdb ships no command of its own: check for its dictionary plugin.
if ! postconf -m 2>/dev/null | grep -qx lmdb; then _apt_install postfix-lmdb; fi
# Postfix's own SQL and cdb clients are the differential tests' reference;
# the tests start their own PostgreSQL and MariaDB servers.
for plugin in pgsql mysql sqlite cdb; do
    if ! postconf -m 2>/dev/null | grep -qx "$plugin"; then _apt_install "postfix-$plugin"; fi
done
ensure_packages mariadbd:mariadb-server
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then _apt_install postgresql; fi
# libmemcached computes the golden vectors of the ketama ring tests.
if ! ldconfig -p | grep -q 'libmemcached\.so\.11'; then _apt_install libmemcached11; fi
# The image test builds the Dockerfile with ../shared/container/build-image.sh
# (buildah, podman, runc) when no Docker engine runs.
if ! docker info >/dev/null 2>&1; then
    ensure_packages buildah:buildah podman:podman runc:runc debootstrap:debootstrap
fi
ensure_venv test

echo "== ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "== mypy --strict"
"$VENV/bin/mypy"
echo "== hadolint"
"$VENV/bin/hadolint" Dockerfile
echo "== pytest"
# CI=true makes any skipped test a failure (tests/conftest.py); pytest's
# exit status 5 (no tests collected) fails this script like any other.
# The reliability tests render docs/reliability.md from this run's figures.
export BRIDGE_RELIABILITY_REPORT=${BRIDGE_RELIABILITY_REPORT:-$ROOT/docs/reliability.md}
"$VENV/bin/python" -m pytest "$@"
