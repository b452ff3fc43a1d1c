#!/usr/bin/env bash
# Tests of the Python client (clients/python): a fresh-enough venv at target/py-venv with
# the package installed the way users install it (not editable) plus its pipecat and test
# extras, then pytest against the release binary. Run from anywhere, as root on a fresh
# Debian machine, after `cargo build --release`.
#
#   DUPLEX_BIN=/path/to/duplex scripts/test-python.sh     # another binary
#   PY_VENV_FRESH=1 scripts/test-python.sh                # rebuild the venv from scratch
#   scripts/test-python.sh -k pause                       # extra arguments go to pytest
set -euo pipefail

cd "$(dirname "$0")/.."
root=$PWD
start=$SECONDS
step() { printf '\n==> %s\n' "$*"; }
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

export DUPLEX_BIN="${DUPLEX_BIN:-$root/target/release/duplex}"
if [ ! -x "$DUPLEX_BIN" ]; then
    echo "error: $DUPLEX_BIN is missing: run 'cargo build --release' first (or set DUPLEX_BIN)" >&2
    exit 1
fi

# Debian splits venv/ensurepip out of python3 (package python3-venv).
if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    step "installing python3-venv"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
fi

venv=$root/target/py-venv
if [ "${PY_VENV_FRESH:-0}" = 1 ] || [ ! -x "$venv/bin/python" ]; then
    step "creating $venv ($(python3 --version))"
    rm -rf "$venv"
    mkdir -p "$root/target"
    python3 -m venv "$venv"
fi

step "installing clients/python[pipecat,test]"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
# Not editable, so the tests run against what a user's `pip install` gets; --force-reinstall
# of the package alone (no deps) picks up source changes in a reused venv.
"$venv/bin/python" -m pip install -q --disable-pip-version-check "$root/clients/python[pipecat,test]"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$root/clients/python"
"$venv/bin/python" -m pip list 2>/dev/null | grep -iE '^(duplex-client|pipecat-ai|websockets|pytest|pytest-asyncio) '
echo "install took $((SECONDS - start)) s"

step "pytest clients/python/tests (DUPLEX_BIN=$DUPLEX_BIN)"
cd "$root/clients/python"
status=0
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@" || status=$?
echo "scripts/test-python.sh took $((SECONDS - start)) s"
exit "$status"
