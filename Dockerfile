# Multi-stage build: compile in the full Rust image, ship only the `duplex` binary on a slim
# Debian (same release as the builder, so glibc matches). One image serves every role: the
# command (`worker`, `serve`, `demo`) picks it.

FROM rust:1-bookworm AS builder
WORKDIR /src
# The whole context (see .dockerignore): every target Cargo.toml declares must be present.
# protox compiles proto/ in build.rs, so no protoc is needed.
COPY . .
RUN cargo build --release --locked --bin duplex

FROM debian:bookworm-slim
# espeak-ng: the worker's offline voice (without it the worker has the mock voice only).
RUN apt-get update \
    && apt-get install -y --no-install-recommends espeak-ng \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --no-create-home --shell /usr/sbin/nologin duplex
COPY --from=builder /src/target/release/duplex /usr/local/bin/duplex
USER duplex
# 8080: orchestrator (WebSocket + HTTP); 7001: worker (gRPC).
EXPOSE 8080 7001
ENTRYPOINT ["/usr/local/bin/duplex"]
CMD ["demo", "--listen", "0.0.0.0:8080"]
