#!/usr/bin/env bash
# The one command that runs every check of the project on a fresh Debian machine (as root):
# installs what the tests need if it is missing, then lint, release build, all tests and the
# benchmark smoke test. CI runs it through .ci/run; `just ci` runs it locally.
#
# Tests run in the release profile on purpose: `cargo build --release` is needed anyway (for
# the benchmark), and `cargo test --release` reuses those compiled dependencies, while a debug
# `cargo test` would compile every dependency a second time. On 2 cores that second build
# costs more than release codegen of the few test crates, and the end-to-end tests then drive
# an optimised binary, so pacing is less disturbed by a busy machine. `--no-fail-fast` runs
# every test binary even after one fails, so one run reports every failure.
set -euo pipefail

cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# cargo may not be on PATH in a non-login shell (rustup installs into ~/.cargo/bin).
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi

# --- what the tests need --------------------------------------------------------------------
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if ! command -v redis-server >/dev/null 2>&1; then
    step "installing redis-server"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

# [speech] The espeak-ng voice (tests/speech.rs, tests/say.rs, the demo's default voice) and
# headless Chromium with its WebDriver for the web page test (tests/browser.rs).
missing=()
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ "${#missing[@]}" -gt 0 ]; then
    step "installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        step "installing rustup component $component"
        rustup component add "$component"
    fi
done

# --- checks ---------------------------------------------------------------------------------
step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --all-targets -- -D warnings

step "cargo build --release"
cargo build --release

step "cargo test --release --no-fail-fast"
cargo test --release --no-fail-fast

step "benchmark smoke test"
bin=target/release/duplex
if "$bin" bench --help >/dev/null 2>&1; then
    "$bin" bench --quick
else
    echo "skipped: this build of duplex has no 'bench' subcommand"
fi

step "Python client and Pipecat service (clients/python, against the release binary)"
DUPLEX_BIN="$PWD/$bin" scripts/test-python.sh

step "deployment artefacts (promtool, kubernetes-validate, haproxy/nginx, a real Prometheus scraping the gateway)"
DUPLEX_BIN="$PWD/$bin" scripts/check-deploy.sh

step "fuzz smoke run (every parser of outside input, 20 s per target; needs nightly + cargo-fuzz)"
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    step "installing the nightly toolchain (cargo-fuzz needs it)"
    rustup toolchain install nightly --profile minimal
fi
scripts/fuzz-smoke.sh

step "all checks passed"
