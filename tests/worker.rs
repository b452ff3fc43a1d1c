//! Behaviour of the real `duplex worker` binary, driven through our own `TtsClient`.
//!
//! Every test spawns its own worker on a free loopback port (killed on drop) and bounds every
//! wait with a timeout, so a broken worker fails a test instead of hanging it.

mod common;

use common::spawn::control;
use common::spawn::Spawned as Worker;
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use duplex::grpc::{ClientOptions, Code, Status, TtsClient};
use duplex::proto::{
    AudioFrame, ControlCommand, ControlRequest, EndSessionRequest, LoadModelRequest,
    StartSessionRequest, TextChunk, UnloadModelRequest,
};
use tokio::time::{timeout, Instant};

/// Upper bound for any single wait; generous because the machine is shared and noisy.
const WAIT: Duration = Duration::from_secs(10);

async fn start_session(client: &TtsClient, id: &str) {
    let r = client
        .start_session(
            &StartSessionRequest {
                session_id: id.into(),
                model_id: "mock-440hz".into(),
                options: HashMap::new(),
            },
            Some(WAIT),
        )
        .await
        .unwrap();
    assert!(r.success, "{}", r.message);
}

fn text(session: &str, text: &str, is_final: bool) -> TextChunk {
    TextChunk {
        session_id: session.into(),
        text: text.into(),
        is_final,
        sequence_number: 0,
    }
}

async fn next(rx: &mut duplex::grpc::ResponseStream<AudioFrame>) -> Option<AudioFrame> {
    timeout(WAIT, rx.message())
        .await
        .expect("frame timed out")
        .unwrap()
}

/// Reads frames until the final one (or the end of the call); checks the frame rules.
async fn collect(
    rx: &mut duplex::grpc::ResponseStream<AudioFrame>,
    session: &str,
) -> Vec<AudioFrame> {
    let mut frames: Vec<AudioFrame> = Vec::new();
    while let Some(f) = next(rx).await {
        assert_eq!(f.session_id, session);
        assert_eq!(f.sequence_number, frames.len() as i64 + 1);
        assert_eq!(f.sample_rate, 48_000);
        assert_eq!(f.frame_duration_ms, 20);
        if !f.is_final {
            assert_eq!(
                f.audio_data.len(),
                1920,
                "non-final frames carry one 20 ms frame"
            );
        } else {
            assert!(f.audio_data.is_empty() || f.audio_data.len() == 1920);
        }
        assert!(frames.iter().all(|p| !p.is_final), "frame after is_final");
        frames.push(f);
    }
    assert!(
        frames.last().is_some_and(|f| f.is_final),
        "a synthesis must end with exactly one is_final frame"
    );
    frames
}

fn audio_frames(frames: &[AudioFrame]) -> usize {
    frames.iter().filter(|f| !f.audio_data.is_empty()).count()
}

async fn metric(client: &TtsClient, key: &str) -> f64 {
    let caps = client.get_capabilities(Some(WAIT)).await.unwrap();
    *caps
        .metrics
        .get(key)
        .unwrap_or_else(|| panic!("metric {key} missing"))
}

async fn wait_metric(client: &TtsClient, key: &str, want: impl Fn(f64) -> bool) -> f64 {
    let t0 = Instant::now();
    loop {
        let v = metric(client, key).await;
        if want(v) {
            return v;
        }
        assert!(t0.elapsed() < WAIT, "metric {key} stuck at {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn one_chunk_gives_25_frames_of_sine_with_data_on_the_final_one() {
    let w = Worker::worker(&[]);
    let client = w.client().await;
    start_session(&client, "s1").await;
    let (mut tx, mut rx) = client.synthesize(Some(WAIT)).await.unwrap();
    tx.send(&text("s1", "Hello there.", true)).unwrap();
    let frames = collect(&mut rx, "s1").await;
    assert_eq!(frames.len(), 25);
    assert_eq!(audio_frames(&frames), 25, "the last frame carries audio");
    // A 440 Hz sine at 0.3 full scale, not silence.
    let pcm = &frames[3].audio_data;
    let peak = pcm
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]).unsigned_abs())
        .max()
        .unwrap();
    assert!((9000..11000).contains(&peak), "peak {peak}");
    // The call then ends cleanly.
    assert!(next(&mut rx).await.is_none());
    assert!(metric(&client, "frames_total").await >= 25.0);
}

#[tokio::test]
async fn unknown_session_is_not_found_and_missing_id_is_invalid_argument() {
    let w = Worker::worker(&[]);
    let client = w.client().await;
    let (mut tx, mut rx) = client.synthesize(Some(WAIT)).await.unwrap();
    tx.send(&text("nobody", "hi", true)).unwrap();
    let err = timeout(WAIT, rx.message()).await.unwrap().unwrap_err();
    assert_eq!(err.code, Code::NotFound, "{err}");

    let (mut tx, mut rx) = client.synthesize(Some(WAIT)).await.unwrap();
    tx.send(&text("", "hi", true)).unwrap();
    let err = timeout(WAIT, rx.message()).await.unwrap().unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument, "{err}");

    // Half-closing without any chunk is invalid too.
    let (mut tx, mut rx) = client.synthesize(Some(WAIT)).await.unwrap();
    tx.finish().unwrap();
    let err = timeout(WAIT, rx.message()).await.unwrap().unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument, "{err}");
}

#[tokio::test]
async fn stop_in_one_session_leaves_the_other_untouched_and_resets_for_the_next_call() {
    // 25 frames take ~1.25 s at 50 ms per frame: room to STOP in the middle.
    let w = Worker::worker(&["--mock-frame-interval-ms", "50"]);
    let client = w.client().await;
    start_session(&client, "A").await;
    start_session(&client, "B").await;

    let (mut tx_a, mut rx_a) = client.synthesize(Some(WAIT)).await.unwrap();
    let (mut tx_b, mut rx_b) = client.synthesize(Some(WAIT)).await.unwrap();
    tx_a.send(&text("A", "first utterance", true)).unwrap();
    tx_b.send(&text("B", "other session", true)).unwrap();

    // Let A play a little, then stop it.
    for _ in 0..3 {
        assert!(!next(&mut rx_a).await.unwrap().is_final);
    }
    control(&client, "A", ControlCommand::Stop).await;
    let mut a_frames = 3;
    let marker = loop {
        let f = next(&mut rx_a).await.unwrap();
        if f.is_final {
            break f;
        }
        a_frames += 1;
    };
    assert!(
        marker.audio_data.is_empty(),
        "STOP ends with an empty end marker"
    );
    assert_eq!(marker.sequence_number, a_frames + 1);
    assert!(a_frames < 25, "A was not stopped ({a_frames} frames)");
    assert!(next(&mut rx_a).await.is_none());

    let b = collect(&mut rx_b, "B").await;
    assert_eq!(audio_frames(&b), 25, "STOP of A must not touch B");

    // The next Synthesize of A starts with fresh control state.
    let (mut tx_a2, mut rx_a2) = client.synthesize(Some(WAIT)).await.unwrap();
    tx_a2.send(&text("A", "second utterance", true)).unwrap();
    let a2 = collect(&mut rx_a2, "A").await;
    assert_eq!(audio_frames(&a2), 25);
}

#[tokio::test]
async fn pause_holds_frames_and_resume_completes_them() {
    let w = Worker::worker(&["--mock-frame-interval-ms", "50"]);
    let client = w.client().await;
    start_session(&client, "p").await;
    let (mut tx, mut rx) = client.synthesize(Some(WAIT)).await.unwrap();
    tx.send(&text("p", "pause me", true)).unwrap();
    let mut frames = Vec::new();
    for _ in 0..3 {
        frames.push(next(&mut rx).await.unwrap());
    }
    control(&client, "p", ControlCommand::Pause).await;
    // Frames produced before PAUSE was applied may still be on the wire: drain them.
    while let Ok(r) = timeout(Duration::from_millis(200), rx.message()).await {
        frames.push(r.unwrap().expect("call ended while paused"));
    }
    assert!(frames.len() < 25, "PAUSE had no effect");
    // Then nothing while paused (unpaused, 400 ms would bring about 8 more frames).
    assert!(
        timeout(Duration::from_millis(400), rx.message())
            .await
            .is_err(),
        "a frame arrived while paused"
    );
    control(&client, "p", ControlCommand::Resume).await;
    while let Some(f) = next(&mut rx).await {
        frames.push(f);
    }
    assert_eq!(frames.len(), 25);
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f.sequence_number, i as i64 + 1);
        assert_eq!(f.is_final, i == 24);
        assert_eq!(f.audio_data.len(), 1920);
    }
}

#[tokio::test]
async fn streamed_chunks_synthesise_as_they_arrive() {
    let w = Worker::worker(&["--mock-frame-interval-ms", "0"]);
    let client = w.client().await;
    start_session(&client, "st").await;
    let (mut tx, mut rx) = client.synthesize(Some(WAIT)).await.unwrap();
    // First chunk is not final: its 25 frames must come without waiting for more text.
    tx.send(&text("st", "Once upon a time,", false)).unwrap();
    for i in 1..=25 {
        let f = next(&mut rx).await.unwrap();
        assert_eq!(f.sequence_number, i);
        assert!(!f.is_final, "input still open: frame {i} cannot be final");
    }
    // Later chunks may omit the session id; empty text adds no frames.
    tx.send(&text("", "", false)).unwrap();
    tx.send(&text("", "there was a worker.", true)).unwrap();
    let mut rest = Vec::new();
    while let Some(f) = next(&mut rx).await {
        rest.push(f);
    }
    assert_eq!(rest.len(), 25);
    assert_eq!(rest[0].sequence_number, 26);
    let last = rest.last().unwrap();
    assert!(last.is_final && last.audio_data.len() == 1920 && last.sequence_number == 50);

    // Half-close instead of is_final, after the audio was already sent: empty end marker.
    let (mut tx, mut rx) = client.synthesize(Some(WAIT)).await.unwrap();
    tx.send(&text("st", "and then", false)).unwrap();
    for _ in 0..25 {
        assert!(!next(&mut rx).await.unwrap().is_final);
    }
    tx.finish().unwrap();
    let marker = next(&mut rx).await.unwrap();
    assert!(marker.is_final && marker.audio_data.is_empty());
    assert_eq!(marker.sequence_number, 26);
    assert!(next(&mut rx).await.is_none());

    // Empty text only: no audio, just the end marker.
    let (mut tx, mut rx) = client.synthesize(Some(WAIT)).await.unwrap();
    tx.send(&text("st", "", true)).unwrap();
    let frames = collect(&mut rx, "st").await;
    assert_eq!(frames.len(), 1);
    assert!(frames[0].audio_data.is_empty());
}

#[tokio::test]
async fn unknown_method_is_unimplemented() {
    let w = Worker::worker(&[]);
    let client = w.client().await;
    let err = client
        .client()
        .unary::<_, EndSessionRequest>(
            "/tts.TTSService/Nope",
            &EndSessionRequest::default(),
            Some(WAIT),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::Unimplemented, "{err}");
    let err = client
        .client()
        .unary::<_, EndSessionRequest>(
            "/other.Service/EndSession",
            &EndSessionRequest::default(),
            Some(WAIT),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::Unimplemented, "{err}");
    // The connection is still usable.
    assert!(client.get_capabilities(Some(WAIT)).await.is_ok());
}

#[tokio::test]
async fn sessions_models_and_capabilities() {
    let w = Worker::worker(&["--max-sessions", "2", "--allow-model-management"]);
    let client = w.client().await;
    let caps = client.get_capabilities(Some(WAIT)).await.unwrap();
    let c = caps.capabilities.unwrap();
    assert!(c.streaming && c.cpu_ok);
    assert!(c.languages.contains(&"en".to_owned()), "{:?}", c.languages);
    assert_eq!(c.max_concurrent_sessions, 2);
    assert_eq!(caps.resident_models, vec!["mock-440hz".to_owned()]);
    assert_eq!(caps.metrics["queue_depth"], 0.0);
    assert!(caps.metrics.contains_key("rtf"));

    start_session(&client, "x").await;
    start_session(&client, "y").await;
    let refused = client
        .start_session(
            &StartSessionRequest {
                session_id: "z".into(),
                model_id: "mock-440hz".into(),
                options: HashMap::new(),
            },
            Some(WAIT),
        )
        .await
        .unwrap();
    assert!(!refused.success);
    assert!(!refused.message.is_empty());
    assert_eq!(metric(&client, "queue_depth").await, 2.0);
    let ended = client
        .end_session(
            &EndSessionRequest {
                session_id: "x".into(),
            },
            Some(WAIT),
        )
        .await
        .unwrap();
    assert!(ended.success);
    let unknown = client
        .end_session(
            &EndSessionRequest {
                session_id: "never".into(),
            },
            Some(WAIT),
        )
        .await
        .unwrap();
    assert!(unknown.success, "EndSession of an unknown id succeeds");
    assert_eq!(metric(&client, "queue_depth").await, 1.0);

    let loaded = client
        .load_model(
            &LoadModelRequest {
                model_id: "mock-fast".into(),
                preload_only: false,
            },
            Some(WAIT),
        )
        .await
        .unwrap();
    assert!(loaded.success, "{}", loaded.message);
    assert!(loaded.load_duration_ms >= 0);
    let models = client.list_models(Some(WAIT)).await.unwrap().models;
    // One mock model, whatever alias was loaded; espeak voices, when installed, are listed
    // too (tests/speech.rs).
    let ids: Vec<_> = models
        .iter()
        .filter(|m| m.family == "mock")
        .map(|m| (m.model_id.as_str(), m.is_loaded))
        .collect();
    assert_eq!(ids, vec![("mock-440hz", true)]);
    let caps = client.get_capabilities(Some(WAIT)).await.unwrap();
    assert_eq!(caps.resident_models, vec!["mock-440hz".to_owned()]);
    let un = client
        .unload_model(
            &UnloadModelRequest {
                model_id: "mock-fast".into(),
            },
            Some(WAIT),
        )
        .await
        .unwrap();
    assert!(!un.success, "session y still uses the mock");
    assert!(un.message.contains("in use"), "{}", un.message);
    let un = client
        .unload_model(
            &UnloadModelRequest {
                model_id: "no-such-model".into(),
            },
            Some(WAIT),
        )
        .await
        .unwrap();
    assert!(!un.success, "unloading an unknown model fails");

    // Control answers for unknown sessions too, with an epoch-ms timestamp.
    let r = client
        .control(
            &ControlRequest {
                session_id: "ghost".into(),
                command: ControlCommand::Stop as i32,
            },
            Some(WAIT),
        )
        .await
        .unwrap();
    assert!(r.success);
    assert!(r.timestamp_ms > 1_600_000_000_000);
}

#[tokio::test]
async fn dropping_the_call_cancels_the_synthesis_on_the_worker() {
    // 25 frames at 200 ms each would take 5 s: the cancel must end it long before.
    let w = Worker::worker(&["--mock-frame-interval-ms", "200"]);
    let client = w.client().await;
    start_session(&client, "c").await;
    let (mut tx, mut rx) = client.synthesize(None).await.unwrap();
    tx.send(&text("c", "long", true)).unwrap();
    next(&mut rx).await.unwrap();
    assert_eq!(metric(&client, "active_syntheses").await, 1.0);
    drop(rx);
    drop(tx);
    wait_metric(&client, "active_syntheses", |v| v == 0.0).await;
    assert_eq!(metric(&client, "syntheses_aborted").await, 1.0);
    // Fewer frames than the full utterance were generated.
    assert!(metric(&client, "frames_total").await < 25.0);
}

#[tokio::test]
async fn deadline_shorter_than_the_first_frame_is_deadline_exceeded() {
    let w = Worker::worker(&["--mock-first-frame-ms", "2000"]);
    let client = w.client().await;
    start_session(&client, "d").await;
    let (mut tx, mut rx) = client
        .synthesize(Some(Duration::from_millis(300)))
        .await
        .unwrap();
    tx.send(&text("d", "slow model", true)).unwrap();
    let err = timeout(WAIT, rx.message()).await.unwrap().unwrap_err();
    assert_eq!(err.code, Code::DeadlineExceeded, "{err}");
    // The worker gave up too.
    wait_metric(&client, "active_syntheses", |v| v == 0.0).await;
}

#[tokio::test]
async fn killed_worker_fails_open_calls_with_unavailable() {
    let w = Worker::worker(&["--mock-frame-interval-ms", "100"]);
    let client = w.client().await;
    start_session(&client, "k").await;
    let (mut tx, mut rx) = client.synthesize(None).await.unwrap();
    tx.send(&text("k", "about to die", true)).unwrap();
    next(&mut rx).await.unwrap();
    unsafe { libc::kill(w.pid(), libc::SIGKILL) };
    let err = loop {
        match timeout(WAIT, rx.message())
            .await
            .expect("call did not fail")
        {
            Ok(Some(_)) => continue, // frames already in flight
            Ok(None) => panic!("call ended cleanly after the worker died"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code, Code::Unavailable, "{err}");
    let t0 = Instant::now();
    while !client.is_closed() {
        assert!(t0.elapsed() < WAIT);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err: Status = client.get_capabilities(Some(WAIT)).await.unwrap_err();
    assert_eq!(err.code, Code::Unavailable);
}

#[tokio::test]
async fn stopped_worker_is_detected_by_keepalive() {
    let w = Worker::worker(&["--mock-frame-interval-ms", "100"]);
    let opts = ClientOptions {
        connect_timeout: Duration::from_secs(2),
        keepalive_interval: Duration::from_millis(200),
        keepalive_timeout: Duration::from_millis(500),
        ..ClientOptions::default()
    };
    let client = TtsClient::connect(&w.addr, &opts).await.unwrap();
    start_session(&client, "z").await;
    let (mut tx, mut rx) = client.synthesize(None).await.unwrap();
    tx.send(&text("z", "freeze", true)).unwrap();
    next(&mut rx).await.unwrap();
    // SIGSTOP: the socket stays open, nothing answers. Only keepalive can tell.
    unsafe { libc::kill(w.pid(), libc::SIGSTOP) };
    let err = loop {
        match timeout(WAIT, rx.message())
            .await
            .expect("keepalive did not fire")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("call ended cleanly"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code, Code::Unavailable, "{err}");
    assert!(client.is_closed());
}

#[test]
fn sigterm_exits_zero() {
    let mut w = Worker::worker(&[]);
    unsafe { libc::kill(w.pid(), libc::SIGTERM) };
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = w.child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < WAIT, "worker ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn busy_port_is_an_error_not_a_panic() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args(["worker", "--listen", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > WAIT {
            let _ = child.kill();
            panic!("worker started on a busy port");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(1));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
}
