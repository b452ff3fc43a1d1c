//! End to end: one utterance through the real orchestrator and mock worker, in both output
//! formats (docs/PROTOCOL.md 1.1, 1.3): the greeting, frame numbering, the end marker, streamed
//! text and the binary frame header.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn session_start_then_one_text_gives_25_frames_and_an_end_marker() {
    let stack = Stack::default().await;
    let mut c = stack.server.client("").await;

    let start = &c.start;
    let id = start["session_id"].as_str().expect("session_id string");
    assert!(
        is_session_id(id),
        "session_id must be ws- + 12 lowercase hex, got {id:?}"
    );
    assert_eq!(start["sample_rate"], 48_000, "session_start: {start}");
    assert_eq!(start["frame_ms"], 20, "session_start: {start}");
    assert_eq!(start["format"], "json", "default format: {start}");
    assert_eq!(start["pacing"], "realtime", "default pacing: {start}");

    // `is_final` omitted: defaults to true, so this text is a whole utterance.
    c.say("Hello world.").await;
    let u = c.collect_utterance(WAIT).await;
    u.assert_complete(MOCK_FRAMES);
    assert!(
        u.frames.iter().all(|f| is_audible(&f.pcm)),
        "the mock's 440 Hz sine must come through, not silence"
    );
    let pcm: Vec<u8> = u.frames.iter().flat_map(|f| f.pcm.clone()).collect();
    let hz = estimate_hz(&pcm);
    assert!(
        (430.0..450.0).contains(&hz),
        "mock-440hz must sound at 440 Hz, measured {hz:.1} Hz"
    );

    // Nothing more for this utterance: exactly one end marker.
    c.assert_silent(Duration::from_millis(300)).await;

    // A second text on the same socket numbers from 1 again.
    c.say("And again.").await;
    let u2 = c.collect_utterance(WAIT).await;
    u2.assert_complete(MOCK_FRAMES);
}

#[tokio::test]
async fn every_session_gets_its_own_id() {
    let stack = Stack::default().await;
    let a = stack.server.client("").await;
    let b = stack.server.client("").await;
    assert!(is_session_id(&a.session_id()));
    assert!(is_session_id(&b.session_id()));
    assert_ne!(a.session_id(), b.session_id(), "session ids must be unique");
}

#[tokio::test]
async fn any_request_path_is_accepted() {
    let stack = Stack::default().await;
    let url = format!(
        "ws://{}/some/other/path?model=mock-440hz",
        stack.server.addr
    );
    let mut c = Client::connect(&url).await;
    c.say("Path does not matter.").await;
    c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);
}

#[tokio::test]
async fn streamed_text_chunks_make_one_utterance() {
    let stack = Stack::default().await;
    let mut c = stack.server.client("").await;

    // Like LLM tokens: three open chunks, then the closing one. Each chunk is a whole clause so
    // the count does not depend on how the orchestrator groups text: 4 chunks x 25 frames.
    for chunk in ["First part, ", "second part, ", "third part, "] {
        c.send_json(&json!({"type": "text", "text": chunk, "is_final": false}))
            .await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    c.send_json(&json!({"type": "text", "text": "and the end.", "is_final": true}))
        .await;

    let u = c.collect_utterance(Duration::from_secs(15)).await;
    u.assert_complete(4 * MOCK_FRAMES);
    // Exactly one end marker: nothing else follows.
    c.assert_silent(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn binary_format_sends_header_plus_pcm_and_a_header_only_end_marker() {
    let stack = Stack::default().await;
    let mut c = stack.server.client("format=binary").await;
    assert_eq!(c.start["format"], "binary", "session_start: {}", c.start);

    c.say("Binary please.").await;
    let u = c.collect_binary_utterance(WAIT).await;
    // collect_binary_utterance checked every header (version 1, flags, reserved zero) and
    // size (8 + 1920; end marker 8 bytes with the final bit).
    u.assert_complete(MOCK_FRAMES);
    assert!(u.frames.iter().all(|f| is_audible(&f.pcm)));

    // JSON messages stay text frames in binary mode: an error comes back as JSON text.
    c.send_text("{not json").await;
    let err = c.recv_json(WAIT).await;
    assert_eq!(err["type"], "error", "{err}");
    assert_eq!(err["code"], "INVALID_MESSAGE", "{err}");

    // And the next utterance numbers from 1 again.
    c.say("Once more.").await;
    c.collect_binary_utterance(WAIT)
        .await
        .assert_complete(MOCK_FRAMES);
}

#[tokio::test]
async fn binary_and_json_formats_carry_the_same_audio() {
    let stack = Stack::default().await;
    let mut j = stack.server.client("format=json&pacing=asap").await;
    let mut b = stack.server.client("format=binary&pacing=asap").await;
    j.say("Same text.").await;
    b.say("Same text.").await;
    let uj = j.collect_utterance(WAIT).await;
    let ub = b.collect_binary_utterance(WAIT).await;
    uj.assert_complete(MOCK_FRAMES);
    ub.assert_complete(MOCK_FRAMES);
    let pj: Vec<u8> = uj.frames.iter().flat_map(|f| f.pcm.clone()).collect();
    let pb: Vec<u8> = ub.frames.iter().flat_map(|f| f.pcm.clone()).collect();
    assert_eq!(
        pj, pb,
        "the deterministic mock must produce identical PCM in both formats"
    );
}

#[tokio::test]
async fn texts_sent_together_play_in_order_each_numbered_from_1() {
    let stack = Stack::default().await;
    let mut c = stack.server.client("").await;
    // The second text arrives while the first is still playing: it waits its turn.
    c.say("First.").await;
    c.say("Second.").await;
    c.say("Third.").await;
    for _ in 0..3 {
        c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);
    }
    c.assert_silent(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_single_core_orchestrator_serves_several_sessions() {
    let stack = Stack::start(&[], &["--cores", "1"]).await;
    let mut a = stack.server.client("").await;
    let mut b = stack.server.client("format=binary").await;
    a.say("Core one, session A.").await;
    b.say("Core one, session B.").await;
    let (ua, ub) = tokio::join!(a.collect_utterance(WAIT), b.collect_binary_utterance(WAIT));
    ua.assert_complete(MOCK_FRAMES);
    ub.assert_complete(MOCK_FRAMES);
}
