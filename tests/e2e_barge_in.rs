//! End to end: microphone audio (binary client messages, docs/PROTOCOL.md 1.2) and voice-activity
//! barge-in. Speech while audio plays interrupts it in the loop turn that reads it (`--barge-in
//! stop`, the default), holds it (`pause`) or is only reported (`off`); silence changes
//! nothing; every change of speech state is a `vad` event.

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

/// `ms` of a 300 Hz tone at 30 % of full scale (well above the -35 dBFS threshold), s16le.
fn speech(rate: u32, ms: u32) -> Vec<u8> {
    (0..rate * ms / 1000)
        .flat_map(|i| {
            let t = f64::from(i) / f64::from(rate);
            let v = (2.0 * std::f64::consts::PI * 300.0 * t).sin() * 0.3 * 32767.0;
            (v.round() as i16).to_le_bytes()
        })
        .collect()
}

fn silence(rate: u32, ms: u32) -> Vec<u8> {
    vec![0u8; (rate * ms / 1000 * 2) as usize]
}

fn events<'a>(others: &'a [Value], ty: &str) -> Vec<&'a Value> {
    others.iter().filter(|v| v["type"] == ty).collect()
}

#[tokio::test]
async fn silence_is_accepted_quietly_and_text_still_works() {
    let stack = Stack::default().await;
    let mut c = stack.server.client("").await;
    c.send_binary(silence(16_000, 200)).await;
    c.send_binary(vec![0u8; 3]).await; // odd length: the last byte waits for the next message
    c.say("Text still works.").await;
    let u = c.collect_utterance(WAIT).await;
    u.assert_complete(MOCK_FRAMES);
    assert!(
        u.others.is_empty(),
        "silence must cause nothing: {:?}",
        u.others
    );
}

#[tokio::test]
async fn speech_while_audio_plays_stops_it_and_says_how_much_was_heard() {
    let stack = Stack::default().await;
    let mut c = stack.server.client("").await;
    c.say("Interrupt me.").await;
    let (mut frames, _) = c.read_frames(3, WAIT).await;
    c.send_binary(speech(16_000, 100)).await;
    let rest = c.collect_utterance(WAIT).await;
    frames.extend(rest.frames.iter().cloned());

    let vad = events(&rest.others, "vad");
    assert_eq!(vad.len(), 1, "{:?}", rest.others);
    assert_eq!(vad[0]["speaking"], true);
    let interrupted = events(&rest.others, "interrupted");
    assert_eq!(interrupted.len(), 1, "{:?}", rest.others);
    let ev = interrupted[0];
    assert_eq!(ev["reason"], "barge_in", "{ev}");
    let n = frames.len() as u64;
    assert!(n < MOCK_FRAMES as u64, "the utterance was cut: {n} frames");
    assert_eq!(ev["sequence"], n, "sequence = last frame sent: {ev}");
    assert_eq!(ev["played_ms"], n * 20, "{ev}");
    assert_eq!(rest.end_sequence, n + 1, "end marker = last + 1");
    // Nothing after the end marker.
    assert!(
        c.try_recv(Duration::from_millis(300)).await.is_none(),
        "no audio after a barge-in"
    );

    // The user stops talking: one `vad` event, and the session speaks again.
    c.send_binary(silence(16_000, 500)).await;
    let v = c.recv_json(WAIT).await;
    assert_eq!(v["type"], "vad", "{v}");
    assert_eq!(v["speaking"], false, "{v}");
    c.say("Your turn is over.").await;
    c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);
}

#[tokio::test]
async fn speech_with_nothing_playing_is_only_reported() {
    let stack = Stack::default().await;
    let mut c = stack.server.client("input_rate=48000").await;
    c.send_binary(speech(48_000, 100)).await;
    let v = c.recv_json(WAIT).await;
    assert_eq!(
        (v["type"].as_str(), v["speaking"].as_bool()),
        (Some("vad"), Some(true)),
        "{v}"
    );
    // Speech started before the text: it is not a barge-in of what follows.
    c.say("Play anyway.").await;
    let u = c.collect_utterance(WAIT).await;
    u.assert_complete(MOCK_FRAMES);
    assert!(u.others.is_empty(), "{:?}", u.others);
}

#[tokio::test]
async fn barge_in_pause_holds_the_audio_until_resume() {
    let stack = Stack::start(&[], &["--barge-in", "pause"]).await;
    let mut c = stack.server.client("").await;
    c.say("Hold on.").await;
    let (mut frames, _) = c.read_frames(3, WAIT).await;
    c.send_binary(speech(16_000, 100)).await;
    // Frames already on the wire may arrive before the events; then nothing.
    let mut seen_interrupted = false;
    while !seen_interrupted {
        match c.next_audio(WAIT).await {
            Step::Frame(f) => frames.push(f),
            Step::Other(v) if v["type"] == "interrupted" => {
                assert_eq!(v["reason"], "barge_in", "{v}");
                assert_eq!(v["sequence"], frames.len() as u64, "{v}");
                seen_interrupted = true;
            }
            Step::Other(v) => assert_eq!(v["type"], "vad", "{v}"),
            Step::End(s) => panic!("pause must not end the utterance (end marker {s})"),
        }
    }
    assert!(
        c.try_recv(Duration::from_millis(300)).await.is_none(),
        "paused: no audio"
    );
    c.control("RESUME").await;
    let rest = c.collect_utterance(WAIT).await;
    frames.extend(rest.frames);
    let seqs: Vec<u64> = frames.iter().map(|f| f.sequence).collect();
    assert_eq!(
        seqs,
        (1..=MOCK_FRAMES as u64).collect::<Vec<_>>(),
        "nothing lost"
    );
}

#[tokio::test]
async fn barge_in_off_lets_the_audio_play() {
    let stack = Stack::start(&[], &["--barge-in", "off"]).await;
    let mut c = stack.server.client("").await;
    c.say("Keep going.").await;
    let (mut frames, _) = c.read_frames(3, WAIT).await;
    c.send_binary(speech(16_000, 100)).await;
    let rest = c.collect_utterance(WAIT).await;
    frames.extend(rest.frames.iter().cloned());
    assert_eq!(frames.len(), MOCK_FRAMES);
    assert_eq!(events(&rest.others, "vad").len(), 1, "{:?}", rest.others);
    assert!(
        events(&rest.others, "interrupted").is_empty(),
        "{:?}",
        rest.others
    );
}

#[tokio::test]
async fn an_unsupported_input_rate_is_refused_at_the_upgrade() {
    let stack = Stack::default().await;
    let url = stack.server.ws_url("input_rate=44100");
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), 400);
            let body = String::from_utf8_lossy(r.body().as_deref().unwrap_or_default());
            assert!(body.contains("input_rate"), "{body}");
        }
        other => panic!("expected HTTP 400, got {other:?}"),
    }
}
