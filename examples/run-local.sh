#!/usr/bin/env bash
# Run the bridge with examples/bridge.toml against a local memcached on
# 127.0.0.1:11211: installs memcached (and a venv with the project) when
# missing, starts memcached when nothing answers on that port, then runs
# the daemon in the foreground (Ctrl-C or SIGTERM stops it).
set -euo pipefail
source "$(dirname "$0")/../.ci/setup.sh"
cd "$ROOT"

ensure_packages memcached:memcached
ensure_venv

if ! (exec 3<>/dev/tcp/127.0.0.1/11211) 2>/dev/null; then
    echo "run-local: starting memcached on 127.0.0.1:11211" >&2
    user_args=()
    [ "$(id -u)" = 0 ] && user_args=(-u memcache)
    id memcache >/dev/null 2>&1 || user_args=(-u root)
    memcached -d -l 127.0.0.1 -p 11211 -U 0 -m 64 "${user_args[@]}"
    for _ in $(seq 100); do
        (exec 3<>/dev/tcp/127.0.0.1/11211) 2>/dev/null && break
        sleep 0.1
    done
fi

exec "$VENV/bin/postfix-bridge" serve --config "$ROOT/examples/bridge.toml" "$@"
