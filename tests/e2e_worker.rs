//! End to end: the orchestrator when its TTS worker is missing or dies (docs/PROTOCOL.md 1.2, 1.3):
//! the client gets a precise error code, every started utterance still ends with its end
//! marker, the process does not crash, and a restarted worker is picked up again.

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// How long the orchestrator may take to give up on an unreachable worker.
const UNAVAILABLE_WITHIN: Duration = Duration::from_secs(10);

fn is_error(v: &Value, code: &str) -> bool {
    v["type"] == "error" && v["code"] == code
}

#[tokio::test]
async fn dead_worker_gives_worker_unavailable_and_the_socket_still_answers() {
    // Nothing listens on this port.
    let dead = format!("grpc://{}", free_addr());
    let mut server = Server::serve(&dead, &[]).await;
    let mut c = server.client("").await;

    c.say("Anyone there?").await;
    let (_err, before) = c
        .recv_until(UNAVAILABLE_WITHIN, |v| is_error(v, "WORKER_UNAVAILABLE"))
        .await;
    for v in &before {
        assert!(
            !matches!(parse_audio(v), Some(Audio::Frame(_))),
            "no audio can come without a worker: {v}"
        );
    }

    // No crash: the process is alive and the same socket answers.
    assert!(
        server.proc.try_wait().is_none(),
        "orchestrator exited after a worker failure"
    );
    c.send_text(r#"{"type":"nope"}"#).await;
    c.recv_until(WAIT, |v| is_error(v, "INVALID_MESSAGE")).await;

    // A second attempt fails the same way (no hang, no stale state).
    c.say("Still nobody?").await;
    c.recv_until(UNAVAILABLE_WITHIN, |v| is_error(v, "WORKER_UNAVAILABLE"))
        .await;

    // New sessions are still accepted.
    let _other = server.client("").await;
}

#[tokio::test]
async fn worker_killed_mid_utterance_then_restarted_on_the_same_port() {
    // A slow worker (100 ms per frame) so the kill lands while it is still synthesising.
    let mut worker = Worker::start(&["--mock-frame-interval-ms", "100"]).await;
    let addr = worker.addr;
    let mut server = Server::serve(&worker.url(), &[]).await;
    let mut c = server.client("").await;

    c.say("This worker is about to die.").await;
    let (frames, _) = c.read_frames(2, WAIT).await;
    worker.proc.kill(); // SIGKILL: no goodbye on the HTTP/2 connection.

    // SYNTHESIS_FAILED and the end marker, in either order, with the sequence contiguous.
    let deadline = Instant::now() + WAIT;
    let mut got_error = false;
    let mut end = None;
    let mut n = frames.len() as u64;
    while !(got_error && end.is_some()) {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next_audio(left).await {
            Step::Frame(f) => {
                assert!(end.is_none(), "audio after the end marker");
                n += 1;
                assert_eq!(f.sequence, n, "contiguous sequences");
            }
            Step::End(seq) => {
                assert!(end.is_none(), "two end markers for one utterance");
                end = Some(seq);
            }
            Step::Other(v) => {
                assert!(
                    is_error(&v, "SYNTHESIS_FAILED"),
                    "expected SYNTHESIS_FAILED, got {v}"
                );
                assert!(!got_error, "one error per failure: {v}");
                got_error = true;
            }
        }
    }
    assert!(
        (n as usize) < MOCK_FRAMES,
        "the worker died early, so the utterance must be short"
    );
    assert_eq!(end, Some(n + 1), "end marker = last + 1");
    assert!(
        server.proc.try_wait().is_none(),
        "orchestrator exited after the worker died"
    );

    // Restart on the same port; the same session recovers (reconnect may take a moment, so
    // retry for a few seconds while the orchestrator still reports the worker as unavailable).
    let _worker2 = Worker::start_on(addr, &[]).await;
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        c.say("Back again?").await;
        match attempt(&mut c).await {
            Ok(u) => {
                u.assert_complete(MOCK_FRAMES);
                break;
            }
            Err(why) => assert!(
                Instant::now() < deadline,
                "the session did not recover after the worker restarted: {why}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Reads the answer to one text while the worker may still be coming back: `Ok` with a
/// complete utterance, or `Err` after a worker error (draining the end marker that may follow).
async fn attempt(c: &mut Client) -> Result<Utterance, String> {
    let deadline = Instant::now() + WAIT;
    let mut frames = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next_audio(left).await {
            Step::Frame(f) => frames.push(f),
            Step::End(seq) if frames.is_empty() => {
                // A stray end marker of the previous failed attempt.
                return Err(format!("empty utterance (end marker {seq})"));
            }
            Step::End(seq) => {
                return Ok(Utterance {
                    frames,
                    end_sequence: seq,
                    others: Vec::new(),
                })
            }
            Step::Other(v)
                if is_error(&v, "WORKER_UNAVAILABLE") || is_error(&v, "SYNTHESIS_FAILED") =>
            {
                assert!(frames.is_empty(), "a failed attempt carries no audio: {v}");
                // A failed utterance may still be closed with an end marker.
                if let Some(m) = c.try_recv(Duration::from_millis(300)).await {
                    match m {
                        Incoming::Json(e) if matches!(parse_audio(&e), Some(Audio::End(_))) => {}
                        other => panic!("unexpected {other:?} after {v}"),
                    }
                }
                return Err(v.to_string());
            }
            Step::Other(v) => panic!("unexpected message while the worker comes back: {v}"),
        }
    }
}

#[tokio::test]
async fn worker_address_may_be_a_host_name() {
    // docker-compose.yml points the orchestrator at `grpc://worker:7001`: names must resolve.
    let worker = Worker::start(&[]).await;
    let url = format!("grpc://localhost:{}", worker.addr.port());
    let server = Server::serve(&url, &[]).await;
    let mut c = server.client("pacing=asap").await;
    c.say("Found by name.").await;
    c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);
}
