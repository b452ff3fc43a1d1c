#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser that takes outside input (fuzz/, cargo-fuzz with
# libFuzzer): builds all targets once, then runs each for FUZZ_SECS seconds (default 20) on
# one core, starting from a copy of its committed seeds (fuzz/corpus/<target>/, never written
# to). Exits non-zero if any target crashes, hangs or runs out of memory, and prints the
# path of the input that did it (under fuzz/artifacts/<target>/, git-ignored).
#
#   scripts/fuzz-smoke.sh                  # every target, 20 s each (what CI runs)
#   FUZZ_SECS=300 scripts/fuzz-smoke.sh    # longer (`just fuzz`)
#   scripts/fuzz-smoke.sh wav clauses      # some targets only
#
# FUZZ_KEEP_CORPUS=1 keeps the grown corpus in fuzz/artifacts/corpus/<target>/ so a later
# run resumes from it. Reproduce a crash with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/crash-...
# Needs a nightly toolchain (cargo +nightly; FUZZ_TOOLCHAIN overrides the name).
set -euo pipefail

cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi

FUZZ_SECS=${FUZZ_SECS:-20}
TOOLCHAIN=${FUZZ_TOOLCHAIN:-nightly}
cargo_nightly() { cargo "+$TOOLCHAIN" "$@"; }

step() { printf '\n==> %s\n' "$*"; }

if ! cargo_nightly fuzz --version >/dev/null 2>&1; then
    step "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo_nightly fuzz list)
fi

step "building ${#targets[@]} fuzz targets (release, debug assertions, AddressSanitizer)"
build_start=$(date +%s)
cargo_nightly fuzz build
build_secs=$(($(date +%s) - build_start))

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
artifacts=$PWD/fuzz/artifacts

failed=()
summary=()
for t in "${targets[@]}"; do
    if [ "${FUZZ_KEEP_CORPUS:-0}" = 1 ]; then
        corpus=$artifacts/corpus/$t
    else
        corpus=$work/corpus/$t
    fi
    mkdir -p "$corpus" "$artifacts/$t"
    cp -n fuzz/corpus/"$t"/* "$corpus"/ 2>/dev/null || true
    log=$work/$t.log
    step "fuzzing $t for ${FUZZ_SECS}s"
    # One worker on one core; libFuzzer writes the job's output to fuzz-0.log in its cwd.
    # -timeout makes a hang a failure; -print_final_stats gives the execution count.
    extra=()
    # The WAV reader's header limit (MAX_HEADER_BYTES = 4096) is only reachable past
    # libFuzzer's default 4096-byte inputs.
    [ "$t" = wav ] && extra=(-max_len=12288)
    status=0
    (cd "$work" && cargo_nightly fuzz run --fuzz-dir "$OLDPWD/fuzz" "$t" "$corpus" -- \
        -max_total_time="$FUZZ_SECS" -workers=1 -jobs=1 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$artifacts/$t/" "${extra[@]}") >"$log" 2>&1 ||
        status=$?
    [ -f "$work/fuzz-0.log" ] && cat "$work/fuzz-0.log" >>"$log" && rm -f "$work/fuzz-0.log"
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
    speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
    crash=$(grep -oE "(crash|timeout|oom|leak|slow-unit)-[0-9a-f]+" "$log" | head -1 || true)
    if [ "$status" -ne 0 ] || [ -n "$crash" ] || [ -z "$execs" ]; then
        tail -n 60 "$log"
        failed+=("$t")
        if [ -n "$crash" ]; then
            echo "FAILED: $t crashed on input $artifacts/$t/$crash"
        else
            echo "FAILED: $t (exit $status, see the log above)"
        fi
        summary+=("$(printf '%-16s %12s %8s  FAILED' "$t" "${execs:-?}" "${speed:-?}")")
    else
        summary+=("$(printf '%-16s %12s %8s  ok' "$t" "$execs" "$speed")")
    fi
done

step "summary (${FUZZ_SECS}s per target, build ${build_secs}s)"
printf '%-16s %12s %8s  %s\n' target executions exec/s result
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: ${#failed[@]} failed: ${failed[*]}"
    exit 1
fi
echo "fuzz: ${#targets[@]} passed, 0 failed"
