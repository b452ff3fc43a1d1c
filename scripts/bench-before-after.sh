#!/usr/bin/env bash
# Before/after for the hot-path work (issue 4) from one command.
#
# Builds the baseline commit (default 23ce6be: the first commit where the orchestrator and the
# real worker ran together, before the hot-path work landed on top of it) in a git worktree
# under target/baseline, then runs the same scenarios against it and against this tree in one
# `duplex bench` invocation, which prints both reports and the before/after table.
#
#   scripts/bench-before-after.sh                       # ≈ 8 min on 2 cores, first build included
#   DUPLEX_BASELINE=<rev> scripts/bench-before-after.sh --json benches/before-after.json
set -euo pipefail
cd "$(dirname "$0")/.."
baseline="${DUPLEX_BASELINE:-23ce6be}"
cargo build --release
if [ ! -d target/baseline/src ]; then
    git worktree add --detach target/baseline/src "$baseline"
fi
git -C target/baseline/src checkout --quiet --detach "$baseline"
CARGO_TARGET_DIR=target/baseline/target \
    cargo build --release --manifest-path target/baseline/src/Cargo.toml
exec target/release/duplex bench \
    --only fal_single,frame_jitter,barge_in,scale,soak \
    --baseline-bin target/baseline/target/release/duplex "$@"
