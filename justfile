# duplex task runner (https://github.com/casey/just). Every recipe is a plain command you can
# also copy into a shell; `just --list` shows them with these comments.

set shell := ["bash", "-euo", "pipefail", "-c"]

# The worker `just serve` talks to; override with DUPLEX_WORKER=grpc://host:port.
worker_url := env_var_or_default("DUPLEX_WORKER", "grpc://127.0.0.1:7001")

# Show the recipes.
default:
    @just --list

# Orchestrator + mock worker in one process on 127.0.0.1:8080: hear audio with one command.
demo *ARGS:
    cargo run --release -- demo {{ARGS}}

# Orchestrator on 0.0.0.0:8080 in front of a worker (start one with `just worker`).
serve *ARGS:
    cargo run --release -- serve --listen 0.0.0.0:8080 --worker {{worker_url}} {{ARGS}}

# Mock TTS worker (gRPC) on 0.0.0.0:7001.
worker *ARGS:
    cargo run --release -- worker --listen 0.0.0.0:7001 {{ARGS}}

# Fast feedback: unit tests only (library and binary), no processes spawned.
test:
    cargo test --lib --bins

# End-to-end tests in tests/: spawn the real binary on loopback.
test-integration:
    cargo test --tests

# The performance suite (load generator + report).
test-performance *ARGS:
    cargo run --release -- bench {{ARGS}}

# Same as test-performance.
bench *ARGS:
    cargo run --release -- bench {{ARGS}}

# Before/after for issue 4 from one command: builds the baseline commit (DUPLEX_BASELINE,
# default 23ce6be) in a worktree under target/baseline and compares it with this tree.
bench-before-after *ARGS:
    scripts/bench-before-after.sh {{ARGS}}

# A throwaway local Redis on port 6380 (for registry/discovery work).
redis:
    redis-server --port 6380 --save "" --appendonly no --daemonize yes

# Stop the local Redis started by `just redis`.
redis-stop:
    redis-cli -p 6380 shutdown nosave

# Worker + orchestrator + Redis in containers (docker-compose.yml).
docker-up:
    docker compose up --build -d

# Stop and remove the containers.
docker-down:
    docker compose down

# Formatting and lints, exactly as CI checks them.
lint:
    cargo fmt --all -- --check
    cargo clippy --all-targets -- -D warnings

# Everything CI runs: lint, build, all tests, benchmark smoke test.
ci:
    scripts/test-all.sh

# Per-frame micro-benchmarks of the hot path (gRPC decode, binary and JSON frame encoding).
bench-micro:
    cargo bench --bench hot_path

# Load-balancer test on loopback: Redis, 3 workers, 2 orchestrators behind haproxy, ~200
# sessions speaking while each orchestrator is restarted with --takeover and a worker is
# SIGKILLed; report table + target/lb-test.json (installs haproxy/redis as root if missing).
lb-test:
    cargo build --release
    scripts/lb-test.sh

# Coverage-guided fuzzing of every parser of outside input (fuzz/, cargo-fuzz on nightly):
# FUZZ_SECS per target (default 300), grown corpus kept in fuzz/artifacts/corpus. Pass target
# names to run only those; `scripts/fuzz-smoke.sh` alone is the 20 s-per-target CI smoke run.
fuzz *TARGETS:
    FUZZ_SECS="${FUZZ_SECS:-300}" FUZZ_KEEP_CORPUS=1 scripts/fuzz-smoke.sh {{TARGETS}}
