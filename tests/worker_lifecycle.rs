//! The real `duplex worker` binary keeps what clients give it bounded and private: sessions
//! leased to their connection and expiring when idle, a fixed model catalogue, model
//! management and the worker token as opt-ins, and a SIGTERM drain that lets open syntheses
//! finish. Every wait is bounded; nothing sleeps to synchronise.

mod common;

use common::spawn::Spawned as Worker;
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use duplex::grpc::tts::WorkerAuth;
use duplex::grpc::{ClientOptions, Code, ResponseStream, TtsClient};
use duplex::proto::{
    AudioFrame, ControlCommand, ControlRequest, EndSessionRequest, LoadModelRequest,
    StartSessionRequest, StartSessionResponse, TextChunk, UnloadModelRequest,
};
use tokio::time::{timeout, Instant};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Upper bound for any single wait; generous because the machine is shared and noisy.
const WAIT: Duration = Duration::from_secs(10);

async fn try_start(client: &TtsClient, id: &str, model: &str) -> StartSessionResponse {
    client
        .start_session(
            &StartSessionRequest {
                session_id: id.into(),
                model_id: model.into(),
                options: HashMap::new(),
            },
            Some(WAIT),
        )
        .await
        .expect("StartSession")
}

async fn start(client: &TtsClient, id: &str, model: &str) {
    let r = try_start(client, id, model).await;
    assert!(r.success, "{}", r.message);
}

fn text(session: &str, text: &str) -> TextChunk {
    TextChunk {
        session_id: session.into(),
        text: text.into(),
        is_final: true,
        sequence_number: 1,
    }
}

/// Opens a Synthesize call with one final chunk.
async fn synthesize(client: &TtsClient, session: &str, words: &str) -> ResponseStream<AudioFrame> {
    let (mut tx, rx) = client.synthesize(None).await.expect("Synthesize");
    tx.send(&text(session, words)).expect("send chunk");
    rx
}

/// Reads to the end of the call; checks it ends with exactly one final frame.
async fn collect(rx: &mut ResponseStream<AudioFrame>) -> Vec<AudioFrame> {
    let mut frames: Vec<AudioFrame> = Vec::new();
    while let Some(f) = timeout(WAIT, rx.message())
        .await
        .expect("frame timed out")
        .expect("synthesis failed")
    {
        assert!(frames.iter().all(|p| !p.is_final), "frame after is_final");
        assert!(
            f.is_final || f.audio_data.len() == 1920,
            "empty non-final frame"
        );
        frames.push(f);
    }
    assert!(
        frames.last().is_some_and(|f| f.is_final),
        "a synthesis must end with exactly one is_final frame"
    );
    frames
}

async fn first_error(rx: &mut ResponseStream<AudioFrame>) -> duplex::grpc::Status {
    loop {
        match timeout(WAIT, rx.message()).await.expect("call did not end") {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the call ended without an error"),
            Err(e) => return e,
        }
    }
}

async fn metric(client: &TtsClient, key: &str) -> f64 {
    let caps = client.get_capabilities(Some(WAIT)).await.unwrap();
    caps.metrics[key]
}

async fn wait_metric(client: &TtsClient, key: &str, want: f64) {
    let t0 = Instant::now();
    loop {
        let v = metric(client, key).await;
        if v == want {
            return;
        }
        assert!(
            t0.elapsed() < WAIT,
            "metric {key} stuck at {v}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn connect(w: &Worker, auth: Option<&str>) -> TtsClient {
    let opts = ClientOptions {
        connect_timeout: WAIT,
        authorization: auth.map(|t| WorkerAuth::bearer(t).unwrap()),
        ..ClientOptions::default()
    };
    TtsClient::connect(&w.addr, &opts).await.expect("connect")
}

async fn health(addr: &str, service: &str) -> Result<i32, tonic::Status> {
    let channel = timeout(
        WAIT,
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect(),
    )
    .await
    .expect("connect timed out")
    .expect("connect");
    let mut client = HealthClient::new(channel);
    timeout(
        WAIT,
        client.check(HealthCheckRequest {
            service: service.into(),
        }),
    )
    .await
    .expect("health check timed out")
    .map(|r| r.into_inner().status)
}

#[tokio::test]
async fn sessions_belong_to_their_connection_and_end_with_it() {
    let w = Worker::worker(&[]);
    let a = connect(&w, None).await;
    let b = connect(&w, None).await;
    start(&a, "s", "mock-440hz").await;

    // Connection B cannot use, control or end A's session; to B it does not exist.
    let mut rx = synthesize(&b, "s", "hijack").await;
    assert_eq!(first_error(&mut rx).await.code, Code::NotFound);
    let r = b
        .control(
            &ControlRequest {
                session_id: "s".into(),
                command: ControlCommand::Stop as i32,
            },
            Some(WAIT),
        )
        .await
        .unwrap();
    assert!(r.success, "Control of an unknown session succeeds");
    assert!(r.message.contains("unknown"), "{}", r.message);
    let r = b
        .end_session(
            &EndSessionRequest {
                session_id: "s".into(),
            },
            Some(WAIT),
        )
        .await
        .unwrap();
    assert!(r.success);
    // A's session is intact and still speaks.
    let frames = collect(&mut synthesize(&a, "s", "still mine").await).await;
    assert_eq!(frames.len(), 25);
    // B may use the same id for a session of its own.
    start(&b, "s", "mock-440hz").await;
    assert_eq!(metric(&b, "queue_depth").await, 2.0);

    // Closing A's connection ends A's sessions, not B's.
    drop(a);
    wait_metric(&b, "queue_depth", 1.0).await;
    let frames = collect(&mut synthesize(&b, "s", "B speaks").await).await;
    assert_eq!(frames.len(), 25);
}

#[tokio::test]
async fn idle_sessions_expire_but_not_during_a_synthesis() {
    // 25 frames at 60 ms: 1.5 s of synthesis, three idle periods long.
    let w = Worker::worker(&[
        "--session-idle-secs",
        "0.5",
        "--mock-frame-interval-ms",
        "60",
    ]);
    let c = connect(&w, None).await;
    start(&c, "busy", "mock-440hz").await;
    let mut rx = synthesize(&c, "busy", "a long one").await;
    start(&c, "idle", "mock-440hz").await;
    let frames = collect(&mut rx).await;
    assert_eq!(frames.len(), 25, "the open call kept its session");
    // With nothing open, both sessions expire.
    wait_metric(&c, "queue_depth", 0.0).await;
    let mut rx = synthesize(&c, "busy", "too late").await;
    assert_eq!(first_error(&mut rx).await.code, Code::NotFound);
}

async fn model_ids(c: &TtsClient) -> Vec<String> {
    let models = c.list_models(Some(WAIT)).await.unwrap().models;
    models.into_iter().map(|m| m.model_id).collect()
}

#[tokio::test]
async fn unknown_and_oversized_model_ids_are_refused_and_never_listed() {
    let w = Worker::worker(&[]);
    let c = connect(&w, None).await;
    let before = model_ids(&c).await;
    for i in 0..10 {
        let r = try_start(&c, &format!("u{i}"), &format!("made-up-voice-{i}")).await;
        assert!(!r.success);
        assert!(
            r.message.starts_with("unknown model \"made-up-voice-"),
            "{}",
            r.message
        );
    }
    let huge = "v".repeat(12 * 1024);
    let r = try_start(&c, "big", &huge).await;
    assert!(!r.success);
    assert!(r.message.contains("at most 128 bytes"), "{}", r.message);
    assert!(r.message.len() < 200, "the id is not echoed");
    // Any mock-* id is the one mock model: usable, but nothing new is listed or resident.
    for i in 0..10 {
        start(&c, &format!("m{i}"), &format!("mock-{i}")).await;
    }
    assert_eq!(model_ids(&c).await, before, "the catalogue is fixed");
    let caps = c.get_capabilities(Some(WAIT)).await.unwrap();
    assert_eq!(caps.resident_models, vec!["mock-440hz".to_owned()]);
    assert_eq!(caps.metrics["queue_depth"], 10.0);

    // --mock-any-model: unknown ids speak with the same mock, still listed nowhere.
    let w = Worker::worker(&["--mock-any-model"]);
    let c = connect(&w, None).await;
    start(&c, "p", "piper-en-us").await;
    let frames = collect(&mut synthesize(&c, "p", "beep").await).await;
    assert_eq!(frames.len(), 25);
    assert_eq!(model_ids(&c).await, before);
    assert!(!try_start(&c, "q", &"x".repeat(129)).await.success);
}

#[tokio::test]
async fn model_management_needs_the_flag() {
    let w = Worker::worker(&[]);
    let c = connect(&w, None).await;
    let e = c
        .load_model(
            &LoadModelRequest {
                model_id: "mock-440hz".into(),
                preload_only: false,
            },
            Some(WAIT),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::PermissionDenied, "{e}");
    assert!(e.message.contains("--allow-model-management"), "{e}");
    let e = c
        .unload_model(
            &UnloadModelRequest {
                model_id: "mock-440hz".into(),
            },
            Some(WAIT),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::PermissionDenied, "{e}");
    // Everything else is unaffected.
    start(&c, "s", "").await;
}

fn token_file(name: &str, content: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, content).unwrap();
    path.to_string_lossy().into_owned()
}

#[tokio::test]
async fn the_worker_token_guards_every_call_but_health() {
    let file = token_file("worker-token-guards", "s3cret-token\n");
    let w = Worker::worker(&["--worker-token-file", &file]);

    let anonymous = connect(&w, None).await;
    let e = anonymous.get_capabilities(Some(WAIT)).await.unwrap_err();
    assert_eq!(e.code, Code::Unauthenticated, "{e}");
    let e = anonymous
        .start_session(&StartSessionRequest::default(), Some(WAIT))
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::Unauthenticated, "{e}");
    let wrong = connect(&w, Some("s3cret-tokem")).await;
    let e = wrong.get_capabilities(Some(WAIT)).await.unwrap_err();
    assert_eq!(e.code, Code::Unauthenticated, "{e}");
    assert!(!e.message.contains("s3cret"), "{e}");

    let ok = connect(&w, Some("s3cret-token")).await;
    start(&ok, "s", "mock-440hz").await;
    let frames = collect(&mut synthesize(&ok, "s", "authorised").await).await;
    assert_eq!(frames.len(), 25);

    // Health needs no token (Kubernetes probes cannot send one).
    assert_eq!(
        health(&w.addr, "").await.unwrap(),
        ServingStatus::Serving as i32
    );
}

#[test]
fn a_bad_token_file_is_a_clear_start_up_error() {
    for (file, want) in [
        (
            "/nonexistent/duplex-token".to_owned(),
            "cannot read --worker-token-file /nonexistent/duplex-token",
        ),
        (
            token_file("worker-token-empty", "\n"),
            "the worker token is empty",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_duplex"))
            .args([
                "worker",
                "--listen",
                "127.0.0.1:0",
                "--worker-token-file",
                &file,
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "stderr: {stderr}");
        assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    }
}

/// Waits (bounded) for the worker process to exit.
fn wait_exit(w: &mut Worker) -> std::process::ExitStatus {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(s) = w.child.try_wait().unwrap() {
            return s;
        }
        assert!(t0.elapsed() < WAIT * 2, "worker did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_syntheses_then_exits_zero() {
    // 25 frames at 150 ms: the synthesis outlives the SIGTERM by seconds.
    let mut w = Worker::worker(&["--mock-frame-interval-ms", "150"]);
    let c = connect(&w, None).await;
    start(&c, "long", "mock-440hz").await;
    start(&c, "other", "mock-440hz").await;
    let mut rx = synthesize(&c, "long", "a long sentence").await;
    let first = timeout(WAIT, rx.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.sequence_number, 1);
    assert_eq!(health(&w.addr, "tts.TTSService").await.unwrap(), 1);

    // SAFETY: signalling our own child process.
    unsafe { libc::kill(w.pid(), libc::SIGTERM) };

    // Health turns NOT_SERVING at once (the worker still answers during the drain).
    let t0 = Instant::now();
    while health(&w.addr, "").await.unwrap() != ServingStatus::NotServing as i32 {
        assert!(t0.elapsed() < WAIT, "health never turned NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // New sessions and new calls are refused so the orchestrator goes elsewhere.
    let e = c
        .start_session(
            &StartSessionRequest {
                session_id: "new".into(),
                ..StartSessionRequest::default()
            },
            Some(WAIT),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::Unavailable, "{e}");
    let mut refused = synthesize(&c, "other", "too late").await;
    assert_eq!(first_error(&mut refused).await.code, Code::Unavailable);
    // Control still answers for the open call.
    let r = c
        .control(
            &ControlRequest {
                session_id: "long".into(),
                command: ControlCommand::Resume as i32,
            },
            Some(WAIT),
        )
        .await
        .unwrap();
    assert!(r.success);

    // The open synthesis completes with its final frame.
    let mut frames = vec![first];
    frames.extend(collect(&mut rx).await);
    assert_eq!(frames.len(), 25);
    assert!(frames[24].is_final && frames[24].audio_data.len() == 1920);

    let status = tokio::task::block_in_place(|| wait_exit(&mut w));
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_is_bounded_by_drain_secs() {
    // 25 frames at 400 ms = 10 s; the drain gives up after 0.3 s.
    let mut w = Worker::worker(&["--mock-frame-interval-ms", "400", "--drain-secs", "0.3"]);
    let c = connect(&w, None).await;
    start(&c, "long", "mock-440hz").await;
    let mut rx = synthesize(&c, "long", "never finished").await;
    timeout(WAIT, rx.message()).await.unwrap().unwrap().unwrap();
    let t0 = Instant::now();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(w.pid(), libc::SIGTERM) };
    let status = tokio::task::block_in_place(|| wait_exit(&mut w));
    assert!(status.success(), "{status:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "exited after {:?}, before the synthesis could have finished",
        t0.elapsed()
    );
    // The cut call fails; it never looks complete.
    let e = first_error(&mut rx).await;
    assert_ne!(e.code, Code::Ok);
}

#[tokio::test]
async fn espeak_text_without_audio_still_ends_with_one_final_frame() {
    let ok = Command::new("espeak-ng")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "espeak-ng is not installed: this test needs it (apt-get install espeak-ng; \
         scripts/test-all.sh installs it)"
    );
    let w = Worker::worker(&[]);
    let c = connect(&w, None).await;
    start(&c, "e", "espeak-en-us").await;
    // Clauses that speak nothing (punctuation, whitespace, nothing at all): the call still
    // ends by the rules, with one final frame (an empty end marker or the last audio).
    for words in ["...", "", "   ", "?!", "\u{2014}"] {
        let frames = collect(&mut synthesize(&c, "e", words).await).await;
        assert!(!frames.is_empty(), "{words:?}");
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(f.sequence_number, i as i64 + 1, "{words:?}");
        }
    }
    // And real text after them still speaks on the same session.
    let frames = collect(&mut synthesize(&c, "e", "Hello.").await).await;
    assert!(frames.len() > 5, "{} frames", frames.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_deregisters_from_redis_before_the_open_synthesis_ends() {
    let redis = common::redis::RedisServer::start();
    let url = redis.url();
    let mut w = Worker::worker(&[
        "--mock-frame-interval-ms",
        "150",
        "--redis",
        &url,
        "--name",
        "draining",
    ]);
    let t0 = Instant::now();
    while redis.get("worker:draining").is_none() {
        assert!(t0.elapsed() < WAIT, "the worker never registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = connect(&w, None).await;
    start(&c, "long", "mock-440hz").await;
    let mut rx = synthesize(&c, "long", "a long sentence").await;
    timeout(WAIT, rx.message()).await.unwrap().unwrap().unwrap();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(w.pid(), libc::SIGTERM) };
    // The record goes while the synthesis (about 3.6 s more) is still streaming.
    let t0 = Instant::now();
    while redis.get("worker:draining").is_some() {
        assert!(t0.elapsed() < WAIT, "the record was not deleted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let next = timeout(WAIT, rx.message()).await.unwrap().unwrap().unwrap();
    assert!(!next.is_final, "deleted before the synthesis ended");
    let frames = collect(&mut rx).await;
    assert_eq!(frames.last().map(|f| f.sequence_number), Some(25));
    let status = tokio::task::block_in_place(|| wait_exit(&mut w));
    assert!(status.success(), "{status:?}");
}
