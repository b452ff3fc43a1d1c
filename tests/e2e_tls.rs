//! End to end: TLS on the public port (`--tls-cert`/`--tls-key`, docs/PROTOCOL.md §5). A
//! certificate made by `duplex cert`, the real `serve` and worker, real `wss://` sessions from
//! the library client and `duplex say --ca`, and a SIGHUP that swaps the certificate.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use duplex::client;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A fresh directory with `cert.pem` and `key.pem` made by `duplex cert`.
fn cert_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "duplex-tls-{tag}-{}-{}",
        std::process::id(),
        free_port()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let out = dir.to_string_lossy().to_string();
    let (status, _, err) = run_cli(&["cert", "--out-dir", &out], WAIT);
    assert!(status.success(), "duplex cert: {err}");
    dir
}

fn tls_opts(ca: &Path) -> client::Options {
    client::Options {
        tls: Some(client::tls_config(ca).expect("CA loads")),
        ..client::Options::default()
    }
}

async fn tls_stack(dir: &Path) -> Stack {
    let cert = dir.join("cert.pem").to_string_lossy().to_string();
    let key = dir.join("key.pem").to_string_lossy().to_string();
    Stack::start(&[], &["--tls-cert", &cert, "--tls-key", &key]).await
}

fn wss(stack: &Stack, host: &str, query: &str) -> String {
    format!("wss://{host}:{}/?{query}", stack.server.addr.port())
}

#[tokio::test]
async fn wss_round_trip_in_json_and_binary_and_from_the_cli() {
    let dir = cert_dir("rt");
    let stack = tls_stack(&dir).await;
    let ca = dir.join("cert.pem");

    for (host, query) in [
        ("127.0.0.1", "pacing=asap"),
        ("localhost", "pacing=asap&format=binary"),
    ] {
        let mut c = Client::connect_with(&wss(&stack, host, query), tls_opts(&ca)).await;
        c.say("Hello over TLS.").await;
        let u = if query.contains("binary") {
            c.collect_binary_utterance(WAIT).await
        } else {
            c.collect_utterance(WAIT).await
        };
        u.assert_complete(MOCK_FRAMES);
        c.close().await;
    }

    // `duplex say --ca` speaks wss:// and writes the audio.
    let wav = dir.join("out.wav").to_string_lossy().to_string();
    let url = wss(&stack, "127.0.0.1", "");
    let ca_s = ca.to_string_lossy().to_string();
    let (status, _, err) = run_cli(
        &["say", "--url", &url, "--ca", &ca_s, "--out", &wav, "Hi."],
        2 * WAIT,
    );
    assert!(status.success(), "duplex say --ca: {err}");
    let written = std::fs::metadata(&wav).expect("say wrote the WAV").len() as usize;
    assert!(
        written > 44 + MOCK_FRAMES * FRAME_BYTES / 2,
        "WAV of {written} bytes"
    );

    // Without --ca the CLI says what is missing instead of connecting in the clear.
    let (status, _, err) = run_cli(&["say", "--url", &url, "Hi."], WAIT);
    assert!(!status.success());
    assert!(err.contains("--ca"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_plaintext_or_untrusting_client_is_refused_and_others_keep_playing() {
    let dir = cert_dir("refuse");
    let stack = tls_stack(&dir).await;
    let ca = dir.join("cert.pem");
    let mut keeper = Client::connect_with(&wss(&stack, "127.0.0.1", ""), tls_opts(&ca)).await;
    keeper.say("I keep playing while others knock.").await;

    // Plain HTTP on the TLS port: no upgrade, no answer in the clear, the connection ends.
    let addr = stack.server.addr;
    let mut plain = tokio::net::TcpStream::connect(addr).await.expect("connect");
    plain
        .write_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .expect("write");
    let mut got = Vec::new();
    let read = tokio::time::timeout(WAIT, plain.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the plaintext connection was not closed");
    assert!(
        !String::from_utf8_lossy(&got).contains("101"),
        "upgraded a plaintext request on the TLS port"
    );

    // A client that trusts another certificate fails its handshake.
    let other = cert_dir("other");
    let err = client::Client::connect(
        &wss(&stack, "127.0.0.1", ""),
        &tls_opts(&other.join("cert.pem")),
    )
    .await
    .err()
    .expect("an untrusted certificate must fail");
    assert!(format!("{err}").contains("TLS"), "{err}");

    keeper
        .collect_utterance(WAIT)
        .await
        .assert_complete(MOCK_FRAMES);
    let m = http_get(stack.server.admin, "/metrics").await.body;
    let failures = metric_sum(&m, |l| l.starts_with("tls_handshake_failures_total")).unwrap_or(0.0);
    assert!(
        failures >= 2.0,
        "tls_handshake_failures_total {failures}\n{m}"
    );
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&other).ok();
}

#[tokio::test]
async fn sighup_swaps_the_certificate_without_touching_open_sessions() {
    let dir = cert_dir("reload");
    let stack = tls_stack(&dir).await;
    let old_ca = dir.join("cert.pem");
    let old_copy = dir.join("old.pem");
    std::fs::copy(&old_ca, &old_copy).expect("copy");
    let mut open = Client::connect_with(&wss(&stack, "127.0.0.1", ""), tls_opts(&old_copy)).await;

    // A new pair written over the old files, then SIGHUP.
    let fresh = cert_dir("fresh");
    std::fs::copy(fresh.join("cert.pem"), dir.join("cert.pem")).expect("copy cert");
    std::fs::copy(fresh.join("key.pem"), dir.join("key.pem")).expect("copy key");
    stack.server.proc.signal(libc::SIGHUP);
    let new_opts = tls_opts(&fresh.join("cert.pem"));
    let deadline = Instant::now() + WAIT;
    let mut c = loop {
        match client::Client::connect(&wss(&stack, "127.0.0.1", ""), &new_opts).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "the reload never took effect: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // New connections get the new certificate only...
    assert!(
        client::Client::connect(&wss(&stack, "127.0.0.1", ""), &tls_opts(&old_copy))
            .await
            .is_err(),
        "the old certificate is still served after the reload"
    );
    c.send_text("New certificate.", true).await.expect("send");
    let mut frames = 0;
    while let Some(m) = c.recv(WAIT).await.expect("recv") {
        if let client::Incoming::Audio { is_final, .. } = m {
            if is_final {
                break;
            }
            frames += 1;
        }
    }
    assert_eq!(frames, MOCK_FRAMES);
    // ...and the session opened before the reload carries on.
    open.say("Opened before the reload.").await;
    open.collect_utterance(WAIT)
        .await
        .assert_complete(MOCK_FRAMES);
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&fresh).ok();
}

#[tokio::test]
async fn a_tls_connection_that_stalls_in_the_handshake_is_closed_by_the_head_deadline() {
    let dir = cert_dir("stall");
    let cert = dir.join("cert.pem").to_string_lossy().to_string();
    let key = dir.join("key.pem").to_string_lossy().to_string();
    let stack = Stack::start(
        &[],
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--head-timeout-secs",
            "1",
        ],
    )
    .await;
    // The first bytes of a ClientHello record, then nothing.
    let mut s = tokio::net::TcpStream::connect(stack.server.addr)
        .await
        .expect("connect");
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .expect("write");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(2 * WAIT, s.read(&mut buf))
        .await
        .expect("a stalled handshake must be closed by the head deadline");
    assert!(matches!(n, Ok(0) | Err(_)), "got {n:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn workers_over_tls_with_a_token_static_and_discovered_through_redis() {
    let dir = cert_dir("worker");
    let cert = dir.join("cert.pem").to_string_lossy().to_string();
    let key = dir.join("key.pem").to_string_lossy().to_string();
    let token = dir.join("worker-token");
    std::fs::write(&token, "a-worker-secret\n").expect("token file");
    let token = token.to_string_lossy().to_string();
    let redis = common::redis::RedisServer::start();
    let worker = Worker::start(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--worker-token-file",
        &token,
        "--redis",
        &redis.url(),
        "--name",
        "tls-worker",
    ])
    .await;
    // It registers as grpcs:// so readers know to dial TLS.
    let deadline = Instant::now() + WAIT;
    let record = loop {
        if let Some(r) = redis.get("worker:tls-worker") {
            break r;
        }
        assert!(Instant::now() < deadline, "the worker never registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        record.contains(&format!("\"grpcs://{}\"", worker.addr)),
        "{record}"
    );

    // Static grpcs:// worker: audio flows.
    let tls_url = format!("grpcs://{}", worker.addr);
    let server = Server::serve(
        &tls_url,
        &["--worker-ca", &cert, "--worker-token-file", &token],
    )
    .await;
    let mut c = server.client("pacing=asap").await;
    c.say("Over TLS to the worker.").await;
    c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);

    // Discovered through Redis with --worker-ca: audio flows too.
    let admin = free_addr();
    let addr = free_addr();
    let url = redis.url();
    let args = [
        "serve",
        "--listen",
        &addr.to_string(),
        "--admin-listen",
        &admin.to_string(),
        "--redis",
        &url,
        "--worker-ca",
        &cert,
        "--worker-token-file",
        &token,
    ]
    .map(str::to_string);
    let mut proc = Proc::spawn("serve", &args);
    proc.wait_accepting(addr, WAIT).await;
    let discovered = Server { proc, addr, admin };
    let deadline = Instant::now() + 2 * WAIT;
    let want = worker.addr.to_string();
    while !http_get(discovered.admin, "/health")
        .await
        .body
        .contains(&want)
    {
        assert!(
            Instant::now() < deadline,
            "the TLS worker was never discovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut c = discovered.client("pacing=asap").await;
    c.say("Found in Redis.").await;
    c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);

    // An orchestrator speaking plaintext gRPC to the TLS worker gets no audio and the
    // client a clear WORKER_UNAVAILABLE, not a hang.
    let plain = Server::serve(&worker.url(), &["--worker-token-file", &token]).await;
    let mut c = plain.client("").await;
    c.say("Plaintext to a TLS worker.").await;
    let (err, _) = c.recv_until(WAIT, |v| v["type"] == "error").await;
    assert_eq!(err["code"], "WORKER_UNAVAILABLE", "{err}");

    // A grpcs:// worker without --worker-ca is a start-up error that says what is missing.
    let (status, _, stderr) = run_cli(
        &["serve", "--listen", "127.0.0.1:0", "--worker", &tls_url],
        WAIT,
    );
    assert!(!status.success());
    assert!(stderr.contains("--worker-ca"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}
