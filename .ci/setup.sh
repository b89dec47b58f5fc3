# Shared set-up for the README's two commands; sourced, not run.
# Installs what is missing (Debian packages, a venv with the project) and
# nothing else. Must work on a fresh Debian machine as root.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${POSTFIX_BRIDGE_VENV:-$ROOT/.venv}
_apt_updated=

_apt_install() {
    if [ -z "$_apt_updated" ]; then
        apt-get update -qq
        _apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# ensure_packages CMD:PACKAGE ... installs PACKAGE when CMD is not found.
ensure_packages() {
    local missing=() pair
    for pair in "$@"; do
        if ! command -v "${pair%%:*}" >/dev/null 2>&1 && [ ! -x "/usr/sbin/${pair%%:*}" ]; then
            missing+=("${pair#*:}")
        fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup: installing ${missing[*]}" >&2
        _apt_install "${missing[@]}"
    fi
}

# ensure_venv [EXTRAS]: a venv with the project installed (editable).
ensure_venv() {
    local extras=${1:-}
    if ! command -v python3 >/dev/null 2>&1; then
        _apt_install python3 python3-venv python3-pip
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        if ! python3 -m venv "$VENV" 2>/dev/null; then
            rm -rf "$VENV"
            _apt_install python3-venv
            python3 -m venv "$VENV"
        fi
    fi
    local spec="$ROOT"
    [ -n "$extras" ] && spec="$ROOT[$extras]"
    # pip's build backend prints advice about editable installs on every
    # run; show its output only when the install fails.
    local log
    log=$(mktemp)
    if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$spec" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}
