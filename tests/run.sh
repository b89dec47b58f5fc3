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
# promtool checks examples/prometheus/alerts.yml (tests/integration/test_dashboards.py).
# Debian ships it only inside the prometheus package, whose install starts a
# Prometheus server (invoke-rc.d or systemd): take the one static binary from
# the package instead, into the venv.
if ! command -v promtool >/dev/null 2>&1 && [ ! -x "$VENV/bin/promtool" ]; then
    echo "setup: extracting promtool from Debian's prometheus package" >&2
    [ -n "$_apt_updated" ] || { apt-get update -qq; _apt_updated=1; }
    promtool_dir=$(mktemp -d)
    chown _apt "$promtool_dir" 2>/dev/null || true
    (cd "$promtool_dir" && apt-get download -qq prometheus >/dev/null)
    dpkg-deb --fsys-tarfile "$promtool_dir"/prometheus_*.deb \
        | tar -x -O ./usr/bin/promtool >"$VENV/bin/promtool.part"
    chmod 755 "$VENV/bin/promtool.part"
    mv "$VENV/bin/promtool.part" "$VENV/bin/promtool"
    rm -rf "$promtool_dir"
fi

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
echo "== pytest, serving = \"tasks\": the server-facing tests again, one task per connection"
# Both ways of serving connections must pass the same tests; the default
# run above used "events". Its figures are not the report's.
BRIDGE_TEST_SERVING=tasks BRIDGE_RELIABILITY_REPORT="" "$VENV/bin/python" -m pytest "$@" \
    tests/integration/test_server.py tests/integration/test_hostile_clients.py \
    tests/integration/test_lifecycle.py tests/integration/test_unix_socket.py \
    tests/integration/test_security.py tests/integration/test_memcache_faults.py \
    tests/faults tests/mailflow
