//! End to end: what a hostile or careless client can and cannot do (docs/PROTOCOL.md §1.2,
//! §4, §5): credentials and the Origin policy checked before the upgrade, the admin endpoints
//! off the public port, the abuse limits, and error messages that say what happened but not
//! where. Real binaries on loopback.

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends a WebSocket upgrade for `target` with extra header lines and returns the HTTP status
/// (101 on success; the connection is then dropped).
async fn upgrade_status(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> u16 {
    let mut req = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    tokio::time::timeout(WAIT, async {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut head = Vec::new();
        let mut buf = [0u8; 512];
        while !head.windows(2).any(|w| w == b"\r\n") {
            let n = s.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before a status line: {head:?}");
            head.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&head);
        line.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status in {line:?}"))
    })
    .await
    .expect("an answer to the upgrade within the bound")
}

/// A file under the test's temp dir with `body`.
fn file(tag: &str, body: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("duplex-sec-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let p = dir.join(tag);
    std::fs::write(&p, body).expect("write");
    p
}

/// The value of `NAME_total{KEY="LABEL"}` in a Prometheus text scrape (0 when absent).
fn counter(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(&format!("{name}_total{{")) && l.contains(&format!("=\"{label}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn credentials_are_checked_before_the_upgrade_and_reloaded_on_sighup() {
    let tokens = file("tokens", "# the team\nalpha-token\n");
    let path = tokens.to_string_lossy().to_string();
    let stack = Stack::start(&[], &["--auth-tokens-file", &path]).await;
    let addr = stack.server.addr;

    // Refused attempts: no credential, a wrong one, a wrong scheme.
    assert_eq!(upgrade_status(addr, "/", &[]).await, 401);
    assert_eq!(upgrade_status(addr, "/?token=nope", &[]).await, 401);
    assert_eq!(
        upgrade_status(addr, "/", &[("Authorization", "Bearer nope")]).await,
        401
    );
    assert_eq!(
        upgrade_status(addr, "/", &[("Authorization", "Basic alpha-token")]).await,
        401
    );
    // None of them reached the worker.
    assert_eq!(stack.worker.sessions().await, 0.0, "no worker session");
    let m = http_get(stack.server.admin, "/metrics").await.body;
    assert!(counter(&m, "auth_failures", "missing") >= 2.0, "{m}");
    assert!(counter(&m, "auth_failures", "invalid") >= 2.0, "{m}");
    // The token never reaches the log.
    assert!(!stack.server.proc.logs().contains("nope"));

    // Accepted: header or query, and the session works.
    assert_eq!(
        upgrade_status(addr, "/", &[("Authorization", "Bearer alpha-token")]).await,
        101
    );
    let mut c = stack.server.client("pacing=asap&token=alpha-token").await;
    c.say("Let me in.").await;
    c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);

    // SIGHUP reload: the new token works, the old one no longer does, the open session stays.
    std::fs::write(&tokens, "beta-token\n").expect("rewrite");
    stack.server.proc.signal(libc::SIGHUP);
    let deadline = Instant::now() + WAIT;
    while upgrade_status(addr, "/?token=beta-token", &[]).await != 101 {
        assert!(Instant::now() < deadline, "the reload never took effect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(upgrade_status(addr, "/?token=alpha-token", &[]).await, 401);
    c.say("Still here.").await;
    c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);
}

#[tokio::test]
async fn jwts_are_checked_for_signature_expiry_algorithm_and_model() {
    let secret = file("jwt-secret", "a-long-enough-shared-secret\n");
    let s = secret.to_string_lossy().to_string();
    let stack = Stack::start(&[], &["--jwt-secret-file", &s]).await;
    let addr = stack.server.addr;
    let mint = |extra: &[&str]| {
        let mut args = vec!["token", "--secret-file", &s, "--sub", "tester"];
        args.extend_from_slice(extra);
        let (status, out, err) = run_cli(&args, WAIT);
        assert!(status.success(), "duplex token: {err}");
        out.trim().to_string()
    };
    let good = mint(&[]);
    assert_eq!(
        upgrade_status(addr, &format!("/?token={good}"), &[]).await,
        101
    );

    let other = file("other-secret", "some-other-secret");
    let (_, forged, _) = run_cli(
        &[
            "token",
            "--secret-file",
            &other.to_string_lossy(),
            "--sub",
            "mallory",
        ],
        WAIT,
    );
    assert_eq!(
        upgrade_status(addr, &format!("/?token={}", forged.trim()), &[]).await,
        401,
        "wrong signature"
    );
    // alg:none with the good token's claims.
    let claims = good.split('.').nth(1).expect("claims");
    let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{claims}.");
    assert_eq!(
        upgrade_status(addr, &format!("/?token={none}"), &[]).await,
        401
    );
    // Expired: a token minted with a 1 s lifetime, checked after it (plus the 5 s leeway).
    let short = mint(&["--ttl", "1s"]);
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(
        upgrade_status(addr, &format!("/?token={short}"), &[]).await,
        401
    );
    let m = http_get(stack.server.admin, "/metrics").await.body;
    assert!(counter(&m, "auth_failures", "expired") >= 1.0, "{m}");

    // A token limited to one model opens sessions for it, not for another.
    let narrow = mint(&["--model", "mock-440hz"]);
    assert_eq!(
        upgrade_status(addr, &format!("/?token={narrow}&model=mock-440hz"), &[]).await,
        101
    );
    assert_eq!(
        upgrade_status(addr, &format!("/?token={narrow}&model=mock-other"), &[]).await,
        403
    );
    assert_eq!(stack.worker.sessions().await, 0.0);
}

#[tokio::test]
async fn cross_site_origins_are_refused_and_the_page_s_own_is_not() {
    let stack = Stack::start(&[], &["--allowed-origin", "https://app.example"]).await;
    let addr = stack.server.addr;
    let own = format!("http://{addr}");
    assert_eq!(
        upgrade_status(addr, "/", &[("Origin", "https://evil.example")]).await,
        403
    );
    assert_eq!(upgrade_status(addr, "/", &[("Origin", "null")]).await, 403);
    assert_eq!(upgrade_status(addr, "/", &[("Origin", &own)]).await, 101);
    assert_eq!(
        upgrade_status(addr, "/", &[("Origin", "https://app.example")]).await,
        101
    );
    assert_eq!(upgrade_status(addr, "/", &[]).await, 101, "not a browser");
    let m = http_get(stack.server.admin, "/metrics").await.body;
    assert!(counter(&m, "auth_failures", "origin") >= 2.0, "{m}");
}

#[tokio::test]
async fn the_public_port_tells_nothing_the_admin_port_does() {
    let stack = Stack::default().await;
    let public = http_get(stack.server.addr, "/metrics").await;
    assert_eq!(public.status, 404, "no metrics on the public port");
    let admin = http_get(stack.server.admin, "/metrics").await;
    assert_eq!(admin.status, 200);
    let worker = stack.worker.addr.to_string();
    let deadline = Instant::now() + WAIT;
    loop {
        let h = http_get(stack.server.addr, "/health").await;
        assert!(
            !h.body.contains(&worker),
            "public /health leaks: {}",
            h.body
        );
        if h.status == 200 {
            assert_eq!(h.json()["status"], "ok");
            break;
        }
        assert!(Instant::now() < deadline, "never healthy: {h:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let h = http_get(stack.server.admin, "/health").await.json();
    assert!(h["uptime_seconds"].as_f64().is_some(), "{h}");
    assert_eq!(h["checks"]["workers"]["ok"], true, "{h}");
    assert_eq!(h["worker"]["ok"], true, "{h}");
    assert!(h["redis"].is_object(), "{h}");
    let s = http_get(stack.server.admin, "/metrics/summary")
        .await
        .json();
    assert!(s["sessions_active"].is_number(), "{s}");
}

#[tokio::test]
async fn bad_model_ids_are_refused_at_the_door() {
    let stack = Stack::default().await;
    let addr = stack.server.addr;
    // A newline and an ANSI escape would forge log lines.
    assert_eq!(
        upgrade_status(addr, "/?model=x%0aforged%1b[31m", &[]).await,
        400
    );
    let long = "m".repeat(200);
    assert_eq!(
        upgrade_status(addr, &format!("/?model={long}"), &[]).await,
        400
    );
    assert!(!stack.server.proc.logs().contains("forged"));
}

/// A realtime canary session that keeps playing while `attack` runs: every one of its frames
/// arrives, in order. Returns the largest gap between two frames (printed, not asserted:
/// `cargo test` asserts behaviour, the bench measures time).
async fn canary_during(server: &Server, attack: impl std::future::Future<Output = ()>) -> Duration {
    let mut canary = server.client("").await;
    // Four chunks of one utterance: 100 frames, 2 s of realtime audio.
    for i in 0..4 {
        canary
            .send_json(&serde_json::json!({"type":"text","text":"canary","is_final": i == 3}))
            .await;
    }
    let listen = async {
        let mut frames = Vec::new();
        let mut gap = Duration::ZERO;
        let mut last: Option<Instant> = None;
        loop {
            match canary.next_audio(WAIT).await {
                Step::Frame(f) => {
                    let now = Instant::now();
                    if let Some(l) = last {
                        gap = gap.max(now - l);
                    }
                    last = Some(now);
                    frames.push(f.sequence);
                }
                Step::End(_) => break,
                other => panic!("canary: {other:?}"),
            }
        }
        (frames, gap)
    };
    let ((frames, gap), ()) = tokio::join!(listen, attack);
    assert_eq!(
        frames,
        (1..=100).collect::<Vec<u64>>(),
        "the canary lost frames"
    );
    eprintln!("canary's largest gap between frames: {gap:?}");
    gap
}

#[tokio::test]
async fn abuse_limits_answer_rate_limited_while_others_keep_playing() {
    let stack = Stack::start(
        &[],
        &[
            "--max-queued-utterances",
            "4",
            "--max-messages-per-sec",
            "20",
            "--max-connections-per-ip",
            "3",
            "--head-timeout-secs",
            "1",
        ],
    )
    .await;
    let server = &stack.server;
    canary_during(server, async {
        // Queued text: the 5th waiting utterance is refused, nothing of it queued.
        let mut q = server.client("pacing=asap").await;
        for _ in 0..6 {
            q.say("queue me").await;
        }
        let (err, _) = q.recv_until(WAIT, |v| v["type"] == "error").await;
        assert_eq!(err["code"], "RATE_LIMITED", "{err}");
        assert!(
            !err["message"].as_str().unwrap_or("").contains("16"),
            "no limits leaked"
        );

        // A flood: RATE_LIMITED, then session_end rate_limited and close 1008.
        let mut f = server.client("").await;
        for _ in 0..400 {
            f.send_json(&serde_json::json!({"type":"control","command":"PAUSE"}))
                .await;
        }
        let (err, _) = f.recv_until(WAIT, |v| v["type"] == "error").await;
        assert_eq!(err["code"], "RATE_LIMITED", "{err}");
        let (end, _) = f.recv_until(WAIT, |v| v["type"] == "session_end").await;
        assert_eq!(end["reason"], "rate_limited", "{end}");
        loop {
            match f.recv(WAIT).await {
                Incoming::Close(Some((code, reason))) => {
                    assert_eq!(code, 1008, "{reason}");
                    break;
                }
                Incoming::Json(_) => continue,
                other => panic!("expected close 1008, got {other:?}"),
            }
        }
    })
    .await;

    // Sessions per IP: once the attack's sessions are gone, three fill the three slots.
    let deadline = Instant::now() + WAIT;
    loop {
        let m = http_get(server.admin, "/metrics").await.body;
        if metric_sum(&m, |n| n == "sessions_active") == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sessions never went back to 0:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _a = server.client("").await;
    let _b = server.client("").await;
    let _c = server.client("").await;
    assert_eq!(upgrade_status(server.addr, "/", &[]).await, 429);

    // A connection that sends nothing is closed after the head deadline, bytes or not.
    let mut silent = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, silent.read(&mut buf))
        .await
        .expect("closed within the bound")
        .unwrap_or(0);
    assert_eq!(n, 0, "EOF, not data");

    let m = http_get(server.admin, "/metrics").await.body;
    for limit in [
        "queued_text",
        "message_rate",
        "connections_per_ip",
        "head_timeout",
    ] {
        assert!(counter(&m, "rate_limited", limit) >= 1.0, "{limit}:\n{m}");
    }
}

#[tokio::test]
async fn client_errors_say_what_not_where() {
    let mut stack = Stack::default().await;
    let mut c = stack.server.client("pacing=asap").await;
    c.say("Warm up.").await;
    c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);
    stack.worker.proc.kill();
    c.say("Into the void.").await;
    let (err, _) = c.recv_until(WAIT, |v| v["type"] == "error").await;
    let msg = err["message"].as_str().unwrap_or("").to_string();
    let worker = stack.worker.addr.to_string();
    assert!(!msg.contains(&worker), "address leaked: {msg}");
    assert!(!msg.contains("os error"), "OS error leaked: {msg}");
    assert!(!msg.contains("127.0.0.1"), "address leaked: {msg}");
    // The details are in the operator's log instead.
    assert!(
        stack
            .server
            .proc
            .logs()
            .contains(&stack.worker.addr.port().to_string()),
        "the log names the worker"
    );
}
