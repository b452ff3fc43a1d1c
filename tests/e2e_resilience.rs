//! End to end: faults and operations that must not lose calls (docs/ARCHITECTURE.md, "Worker
//! links", "Deadlines on the worker", "Drain"): a cold burst, a STOP flood, a stalled worker,
//! idle sessions holding worker capacity, and a drain with a replacement taking over the port.
//! Real binaries on loopback; bounds are generous (a busy 2-core machine must pass).

mod common;

use common::*;
use std::time::{Duration, Instant};

/// True when a WebSocket upgrade to `addr` gets 101 (false on any error or other status).
async fn upgrades(addr: std::net::SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!(
            "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.ok()?;
        Some(buf.starts_with(b"HTTP/1.1 101"))
    };
    tokio::time::timeout(WAIT, attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

#[tokio::test]
async fn a_cold_burst_of_sessions_all_get_audio() {
    // A fresh orchestrator: no worker connection exists yet on any core when the burst comes.
    let stack = Stack::start(
        &["--max-sessions", "1000"],
        &["--max-connections-per-ip", "0"],
    )
    .await;
    let n = 300;
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(stack.server.client("pacing=asap").await);
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                c.say("All at once.").await;
                c.collect_utterance(Duration::from_secs(60)).await
            })
        })
        .collect();
    for t in tasks {
        let u = t.await.expect("task");
        assert!(u.others.is_empty(), "errors in the burst: {:?}", u.others);
        u.assert_complete(MOCK_FRAMES);
    }
}

#[tokio::test]
async fn one_client_s_stop_flood_does_not_break_the_others_on_its_core() {
    // One core: every session shares the one HTTP/2 connection to the worker. The flood gets
    // a high message rate so it really produces thousands of stream resets.
    let stack = Stack::start(&[], &["--cores", "1", "--max-messages-per-sec", "100000"]).await;
    let mut flood = stack.server.client("pacing=asap").await;
    let flooding = async {
        for _ in 0..1500 {
            flood.say("cut me off").await;
            flood.control("STOP").await;
        }
    };
    let mut other = stack.server.client("pacing=asap").await;
    let others = async {
        let mut done = 0;
        for _ in 0..5 {
            other.say("I must still be heard.").await;
            let u = other.collect_utterance(WAIT).await;
            assert!(u.others.is_empty(), "errors: {:?}", u.others);
            u.assert_complete(MOCK_FRAMES);
            done += 1;
        }
        done
    };
    let ((), done) = tokio::join!(flooding, others);
    assert_eq!(done, 5);
    // And after the flood, a new session works too (the connection survived or was rebuilt
    // without the others noticing).
    let mut late = stack.server.client("pacing=asap").await;
    late.say("After the flood.").await;
    late.collect_utterance(WAIT)
        .await
        .assert_complete(MOCK_FRAMES);
}

#[tokio::test]
async fn a_stalled_worker_fails_the_utterance_and_the_next_goes_elsewhere() {
    // The frame deadline alone (PINGs given a minute).
    stalled_worker(&[
        "--stall-timeout-secs",
        "1",
        "--worker-ping-timeout-secs",
        "60",
    ])
    .await;
}

#[tokio::test]
async fn a_frozen_worker_is_noticed_by_its_unanswered_pings() {
    // Frame deadlines of a minute, longer than this test waits for the error: only the
    // PINGs on the worker connection (answer within 1 s) can notice the SIGSTOP in time.
    stalled_worker(&[
        "--stall-timeout-secs",
        "60",
        "--first-frame-timeout-secs",
        "60",
        "--worker-ping-timeout-secs",
        "1",
    ])
    .await;
}

/// Two workers; the session's first utterance picks one, which is then stopped (SIGSTOP)
/// mid-utterance: `SYNTHESIS_FAILED` + end marker, and the next utterance plays on the other.
async fn stalled_worker(flags: &[&str]) {
    let a = Worker::start(&["--mock-frame-interval-ms", "20"]).await;
    let b = Worker::start(&["--mock-frame-interval-ms", "20"]).await;
    let b_url = b.url();
    let mut args = vec!["--worker", b_url.as_str()];
    args.extend_from_slice(flags);
    let server = Server::serve(&a.url(), &args).await;
    let mut c = server.client("pacing=asap").await;
    // Send a long utterance and stop whichever worker serves it once frames flow.
    for i in 0..8 {
        c.send_json(&serde_json::json!({"type":"text","text":"long","is_final": i == 7}))
            .await;
    }
    c.read_frames(3, WAIT).await;
    let (busy, idle) = if a.sessions().await > 0.0 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    busy.proc.signal(libc::SIGSTOP);
    let started = Instant::now();
    let (err, _) = c.recv_until(WAIT, |v| v["type"] == "error").await;
    assert_eq!(err["code"], "SYNTHESIS_FAILED", "{err}");
    // Its end marker follows.
    loop {
        match c.next_audio(WAIT).await {
            Step::End(_) => break,
            Step::Frame(_) => continue,
            Step::Other(v) => panic!("unexpected {v}"),
        }
    }
    eprintln!("stall noticed after {:?}", started.elapsed());
    // The next utterance goes to the other worker and plays in full.
    c.say("Somewhere else.").await;
    let u = c.collect_utterance(WAIT).await;
    assert!(u.others.is_empty(), "{:?}", u.others);
    u.assert_complete(MOCK_FRAMES);
    assert!(idle.sessions().await >= 1.0, "served by the other worker");
    busy.proc.signal(libc::SIGCONT);
}

#[tokio::test]
async fn idle_sessions_release_their_worker_session() {
    let stack = Stack::start(&[], &["--worker-idle-secs", "1"]).await;
    let mut c = stack.server.client("pacing=asap").await;
    c.say("Then silence.").await;
    c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);
    assert_eq!(stack.worker.sessions().await, 1.0);
    let deadline = Instant::now() + WAIT;
    while stack.worker.sessions().await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the idle session still holds the worker"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The client notices nothing: the next utterance opens a new worker session.
    c.say("And again.").await;
    c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);
}

#[tokio::test]
async fn sigterm_drains_finishing_utterances_while_a_replacement_takes_the_port() {
    let worker = Worker::start(&[]).await;
    let mut old = Server::serve(&worker.url(), &["--drain-secs", "20"]).await;
    let addr = old.addr;
    let mut c = old.client("").await;
    // A realtime utterance of 4 chunks (100 frames, 2 s) in progress at SIGTERM.
    for i in 0..4 {
        c.send_json(&serde_json::json!({"type":"text","text":"drain","is_final": i == 3}))
            .await;
    }
    c.read_frames(5, WAIT).await;
    // The rolling restart: the replacement shares the port first (--takeover), then the old
    // process gets SIGTERM.
    let new = Server::serve_on(addr, &worker.url(), &["--takeover"]).await;
    old.proc.signal(libc::SIGTERM);
    // Readiness turns 503 while the session is still playing.
    let deadline = Instant::now() + WAIT;
    loop {
        let r = http_get(old.admin, "/readiness").await;
        if r.status == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "readiness never went 503: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // New sessions reach the replacement. (A connection the kernel had queued on the old
    // listener as it closed is reset, docs/ARCHITECTURE.md "Drain"; such a client retries.)
    let deadline = Instant::now() + WAIT;
    while !upgrades(addr).await {
        assert!(Instant::now() < deadline, "no process takes new sessions");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Even after one upgrade worked, the next connection may be one the kernel queued on the
    // old listener as it closed: reset, and the client connects again (as a real one does).
    let mut attempts = 0;
    let mut fresh = loop {
        attempts += 1;
        match Client::try_connect_with(&new.ws_url("pacing=asap"), Default::default()).await {
            Ok(c) => break c,
            Err(e) if attempts < 5 => eprintln!("connect attempt {attempts} failed: {e:#}"),
            Err(e) => panic!("no process takes new sessions after {attempts} attempts: {e:#}"),
        }
    };
    fresh.say("New process.").await;
    fresh
        .collect_utterance(WAIT)
        .await
        .assert_complete(MOCK_FRAMES);
    // The old session's utterance was not cut: every frame, the end marker, then
    // session_end "shutdown" and close 1001.
    let mut last = 5;
    loop {
        match c.next_audio(WAIT).await {
            Step::Frame(f) => {
                assert_eq!(f.sequence, last + 1, "no frame lost");
                last = f.sequence;
            }
            Step::End(seq) => {
                assert_eq!(seq, 101, "end marker after all 100 frames");
                break;
            }
            Step::Other(v) => panic!("before the end marker: {v}"),
        }
    }
    let (end, before) = c.recv_until(WAIT, |v| v["type"] == "session_end").await;
    assert!(before.is_empty(), "{before:?}");
    assert_eq!(end["reason"], "shutdown");
    match c.recv(WAIT).await {
        Incoming::Close(Some((code, _))) => assert_eq!(code, 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
    let status = old.proc.wait_exit(WAIT);
    assert!(status.success(), "clean exit after the drain: {status}");
}

#[tokio::test]
async fn the_drain_deadline_cuts_what_is_left_with_interrupted_and_an_end_marker() {
    let worker = Worker::start(&[]).await;
    let mut server = Server::serve(&worker.url(), &["--drain-secs", "0.5"]).await;
    let mut c = server.client("").await;
    // 20 chunks: 10 s of realtime audio, far past the drain deadline.
    for i in 0..20 {
        c.send_json(&serde_json::json!({"type":"text","text":"long","is_final": i == 19}))
            .await;
    }
    c.read_frames(3, WAIT).await;
    server.proc.signal(libc::SIGTERM);
    let (int, _) = c.recv_until(WAIT, |v| v["type"] == "interrupted").await;
    assert_eq!(int["reason"], "shutdown", "{int}");
    let sent = int["sequence"].as_u64().expect("sequence");
    match c.next_audio(WAIT).await {
        Step::End(seq) => assert_eq!(seq, sent + 1),
        Step::Frame(_) => panic!("a frame after interrupted"),
        Step::Other(v) => panic!("before the end marker: {v}"),
    }
    let (end, _) = c.recv_until(WAIT, |v| v["type"] == "session_end").await;
    assert_eq!(end["reason"], "shutdown");
    assert!(server.proc.wait_exit(WAIT).success());
}

#[tokio::test]
async fn a_draining_worker_s_refusal_is_retried_on_another_worker() {
    // Two workers producing at real time (a long utterance keeps a draining worker open), one
    // core (every session shares that core's view of the workers).
    let worker_args = ["--mock-frame-interval-ms", "20", "--drain-secs", "60"];
    let mut a = Worker::start(&worker_args).await;
    let mut b = Worker::start(&worker_args).await;
    let server = Server::serve(&a.url(), &["--worker", &b.url(), "--cores", "1"]).await;
    // The session speaks once: it now holds a worker session on one of them, X.
    let mut c = server.client("pacing=asap").await;
    c.say("First.").await;
    c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);
    let a_has_it = a.sessions().await >= 1.0;
    let (x, y) = if a_has_it {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    // Another session plays a long utterance (20 chunks, 10 s) on X, so X stays up draining
    // after SIGTERM instead of exiting at once. Which worker a session gets is the
    // orchestrator's choice: open sessions until one lands on X.
    let mut holders = Vec::new();
    let deadline = Instant::now() + WAIT * 3;
    loop {
        let mut h = server.client("").await;
        for i in 0..20 {
            h.send_json(&serde_json::json!({"type":"text","text":"hold","is_final": i == 19}))
                .await;
        }
        h.read_frames(1, WAIT).await;
        holders.push(h);
        if x.sessions().await >= 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no session landed on the session's worker"
        );
    }
    // X drains: it refuses new sessions and new syntheses (UNAVAILABLE) while the long one
    // plays on.
    x.proc.signal(libc::SIGTERM);
    x.proc.wait_log("draining", WAIT);
    // The session's next utterance goes to X first (its worker session is there) and is
    // refused; the orchestrator retries it on Y and the client hears all of it.
    c.say("Second.").await;
    let u = c.collect_utterance(WAIT).await;
    assert!(u.others.is_empty(), "errors: {:?}", u.others);
    u.assert_complete(MOCK_FRAMES);
    assert!(y.sessions().await >= 1.0, "served by the other worker");
    // Whether the retry ran or the orchestrator's probe had already seen X draining (both
    // must give the client its audio), for the log.
    let metrics = http_get(server.admin, "/metrics").await;
    let retries: f64 = metrics
        .body
        .lines()
        .filter(|l| l.starts_with("utterance_retries_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    eprintln!("retries on another worker: {retries:?}");
    drop(holders);
}

#[tokio::test]
async fn a_draining_process_ends_a_session_between_utterances_instead_of_starting_one() {
    let worker = Worker::start(&[]).await;
    let mut server = Server::serve(&worker.url(), &["--drain-secs", "30"]).await;
    let mut c = server.client("").await;
    // A realtime utterance of 2 chunks (50 frames, 1 s) in progress at SIGTERM.
    for i in 0..2 {
        c.send_json(&serde_json::json!({"type":"text","text":"drain","is_final": i == 1}))
            .await;
    }
    c.read_frames(3, WAIT).await;
    server.proc.signal(libc::SIGTERM);
    let deadline = Instant::now() + WAIT;
    while http_get(server.admin, "/readiness").await.status != 503 {
        assert!(Instant::now() < deadline, "readiness never went 503");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The utterance in progress plays to its end marker.
    loop {
        match c.next_audio(WAIT).await {
            Step::Frame(_) => continue,
            Step::End(seq) => {
                assert_eq!(seq, 51);
                break;
            }
            Step::Other(v) => panic!("before the end marker: {v}"),
        }
    }
    // Talking on at once (as a voice agent does) must not start a new utterance the drain
    // would cut at --drain-secs: the session ends instead, with nothing of it spoken.
    c.say("One more thing.").await;
    let (end, before) = c.recv_until(WAIT, |v| v["type"] == "session_end").await;
    assert!(before.is_empty(), "nothing before session_end: {before:?}");
    assert_eq!(end["reason"], "shutdown");
    match c.recv(WAIT).await {
        Incoming::Close(Some((code, _))) => assert_eq!(code, 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
    assert!(server.proc.wait_exit(WAIT).success());
}
