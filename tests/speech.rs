//! Real speech from the espeak-ng engine, through the real `duplex worker` binary (gRPC) and
//! `duplex demo` (WebSocket): the audio is speech, frames follow the rules, streaming keeps
//! first-audio latency flat, PAUSE/STOP act mid-sentence, and the model lifecycle (load,
//! list, unload, references, TTL, resident cap) behaves.
//!
//! These tests need espeak-ng (`apt-get install espeak-ng`, done by scripts/test-all.sh) and
//! fail with that message when it is missing. Every wait is bounded; children die on drop.

mod common;

use common::spawn::control;
use common::spawn::Spawned;
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use duplex::grpc::{ResponseStream, TtsClient};
use duplex::proto::{
    AudioFrame, ControlCommand, EndSessionRequest, LoadModelRequest, ModelInfo,
    StartSessionRequest, TextChunk, UnloadModelRequest,
};
use futures_util::{SinkExt, StreamExt};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Upper bound for any single wait; generous because the machine is shared and noisy.
const WAIT: Duration = Duration::from_secs(15);

const SHORT: &str = "The quick brown fox jumps over the lazy dog.";

fn require_espeak() {
    let ok = Command::new("espeak-ng")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "espeak-ng is not installed: these tests need it (apt-get install espeak-ng; \
         scripts/test-all.sh installs it)"
    );
}

/// Starts `duplex SUBCOMMAND` (see [`Spawned::start`]) once espeak-ng is known to be there.
fn start(subcommand: &str, extra: &[&str]) -> Spawned {
    require_espeak();
    Spawned::start(subcommand, extra)
}

async fn start_session(client: &TtsClient, id: &str, model: &str) -> (bool, String) {
    let r = client
        .start_session(
            &StartSessionRequest {
                session_id: id.into(),
                model_id: model.into(),
                options: HashMap::new(),
            },
            Some(WAIT),
        )
        .await
        .unwrap();
    (r.success, r.message)
}

async fn end_session(client: &TtsClient, id: &str) {
    let r = client
        .end_session(
            &EndSessionRequest {
                session_id: id.into(),
            },
            Some(WAIT),
        )
        .await
        .unwrap();
    assert!(r.success);
}

fn chunk(session: &str, text: &str, is_final: bool) -> TextChunk {
    TextChunk {
        session_id: session.into(),
        text: text.into(),
        is_final,
        sequence_number: 0,
    }
}

async fn next(rx: &mut ResponseStream<AudioFrame>, wait: Duration) -> Option<AudioFrame> {
    match timeout(wait, rx.message()).await {
        Ok(r) => r.unwrap(),
        Err(_) => panic!("no frame within {wait:?}"),
    }
}

/// Checks one frame against docs/PROTOCOL.md §2 given the frames before it.
fn check_frame(f: &AudioFrame, session: &str, seen: usize) {
    assert_eq!(f.session_id, session);
    assert_eq!(f.sequence_number, seen as i64 + 1, "sequence 1..N");
    assert_eq!((f.sample_rate, f.frame_duration_ms), (48_000, 20));
    if f.is_final {
        assert!(f.audio_data.is_empty() || f.audio_data.len() == 1920);
    } else {
        assert_eq!(
            f.audio_data.len(),
            1920,
            "a non-final frame is exactly 1920 bytes"
        );
    }
}

/// Reads the rest of a synthesis; returns every frame (the last is the only final one).
async fn collect(rx: &mut ResponseStream<AudioFrame>, session: &str) -> Vec<AudioFrame> {
    let mut frames: Vec<AudioFrame> = Vec::new();
    while let Some(f) = next(rx, WAIT).await {
        check_frame(&f, session, frames.len());
        let last = f.is_final;
        frames.push(f);
        if last {
            break;
        }
    }
    assert!(
        frames.last().is_some_and(|f| f.is_final),
        "a synthesis ends with exactly one is_final frame"
    );
    frames
}

/// Speaks `text` in one chunk and returns all frames.
async fn speak(client: &TtsClient, session: &str, text: &str) -> Vec<AudioFrame> {
    let (mut tx, mut rx) = client.synthesize(None).await.unwrap();
    tx.send(&chunk(session, text, true)).unwrap();
    collect(&mut rx, session).await
}

fn samples(frames: &[AudioFrame]) -> Vec<i16> {
    frames
        .iter()
        .flat_map(|f| f.audio_data.chunks_exact(2))
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect()
}

fn rms(s: &[i16]) -> f64 {
    if s.is_empty() {
        return 0.0;
    }
    (s.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / s.len() as f64).sqrt()
}

fn audio_frames(frames: &[AudioFrame]) -> usize {
    frames.iter().filter(|f| !f.audio_data.is_empty()).count()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Time from sending `text` to its first audio frame (the rest is drained).
async fn first_audio_latency(client: &TtsClient, session: &str, text: &str) -> Duration {
    let (mut tx, mut rx) = client.synthesize(None).await.unwrap();
    let t0 = Instant::now();
    tx.send(&chunk(session, text, true)).unwrap();
    let first = next(&mut rx, WAIT).await.expect("a frame");
    let fal = t0.elapsed();
    assert!(!first.audio_data.is_empty());
    if !first.is_final {
        collect_rest(&mut rx).await;
    }
    fal
}

async fn collect_rest(rx: &mut ResponseStream<AudioFrame>) {
    while let Some(f) = next(rx, WAIT).await {
        if f.is_final {
            break;
        }
    }
}

#[tokio::test]
async fn espeak_audio_is_real_speech_in_exact_frames() {
    let w = start("worker", &[]);
    let client = w.client().await;
    let (ok, msg) = start_session(&client, "s", "espeak-en-us").await;
    assert!(ok, "{msg}");
    assert!(msg.contains("espeak"), "{msg}");
    let frames = speak(
        &client,
        "s",
        "Hello world. This is a test of the speech engine.",
    )
    .await;
    let n = audio_frames(&frames);
    // About three seconds of speech: a generous band, not a pinned number.
    assert!((75..=300).contains(&n), "{n} frames");
    let pcm = samples(&frames);
    let level = rms(&pcm);
    assert!(level > 800.0, "speech, not silence: RMS {level:.0}");
    // Speech is not a steady tone: loud syllables and near-silent gaps between words.
    let per_frame: Vec<f64> = frames
        .iter()
        .filter(|f| !f.audio_data.is_empty())
        .map(|f| rms(&samples(std::slice::from_ref(f))))
        .collect();
    let loud = per_frame.iter().filter(|&&r| r > level).count();
    let quiet = per_frame.iter().filter(|&&r| r < level / 8.0).count();
    assert!(loud * 5 >= n, "loud frames {loud} of {n}");
    assert!(
        quiet >= 3,
        "no pauses between words? quiet frames {quiet} of {n}"
    );
    // Not clipped garbage either.
    let clipped = pcm
        .iter()
        .filter(|&&v| v == i16::MAX || v == i16::MIN)
        .count();
    assert!(clipped * 1000 < pcm.len(), "{clipped} clipped samples");
}

#[tokio::test]
async fn a_longer_text_gives_proportionally_more_frames() {
    let w = start("worker", &[]);
    let client = w.client().await;
    assert!(start_session(&client, "s", "espeak-en-gb").await.0);
    let one = audio_frames(&speak(&client, "s", SHORT).await);
    let three = audio_frames(&speak(&client, "s", &[SHORT; 3].join(" ")).await);
    let ratio = three as f64 / one as f64;
    assert!(
        (2.6..=3.4).contains(&ratio),
        "one sentence {one} frames, three {three}: ratio {ratio:.2}"
    );
    // Same text, same voice: the same audio (the engine is deterministic).
    let again = audio_frames(&speak(&client, "s", SHORT).await);
    assert_eq!(one, again);
}

#[tokio::test]
async fn first_audio_latency_does_not_grow_with_text_length() {
    let w = start("worker", &[]);
    let client = w.client().await;
    assert!(start_session(&client, "s", "espeak-en-us").await.0);
    let first = "Good morning everyone.";
    let long = format!(
        "{first} Today we will walk through the whole architecture of the gateway, from the \
         browser and its audio worklet down to the worker processes and their models. After \
         that we will look at latency, jitter, barge-in and the many ways a voice pipeline can \
         fail when the network, the machine or the people using it behave unexpectedly."
    );
    // Warm up once, then interleave the two texts so both see the same machine load. A pause
    // before each measurement lets the voice's warm process finish starting (as between real
    // utterances): this test is about text length, not about back-to-back rate.
    first_audio_latency(&client, "s", first).await;
    let (mut short_fal, mut long_fal) = (Vec::new(), Vec::new());
    for _ in 0..9 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        short_fal.push(first_audio_latency(&client, "s", first).await);
        tokio::time::sleep(Duration::from_millis(250)).await;
        long_fal.push(first_audio_latency(&client, "s", &long).await);
    }
    let (s, l) = (median(short_fal.clone()), median(long_fal.clone()));
    // ~1.5x, with 10 ms of slack for scheduling noise at these small numbers (without
    // streaming, the long text would first synthesise ~15 s of speech).
    assert!(
        l <= s.mul_f64(1.5) + Duration::from_millis(10),
        "FAL of the 3-sentence text {l:?} vs its first sentence alone {s:?}\n\
         all: {long_fal:?}\n vs {short_fal:?}"
    );
}

#[tokio::test]
async fn streamed_text_starts_speaking_when_a_clause_is_complete() {
    let w = start("worker", &[]);
    let client = w.client().await;
    assert!(start_session(&client, "s", "espeak-en-us").await.0);
    let (mut tx, mut rx) = client.synthesize(None).await.unwrap();
    for tok in ["Hello", " there", ",", " my", " friend", ".", " "] {
        tx.send(&chunk("s", tok, false)).unwrap();
    }
    // The input is still open, yet the first clause is complete: audio comes now.
    let f = next(&mut rx, WAIT)
        .await
        .expect("audio before the input ended");
    check_frame(&f, "s", 0);
    assert!(!f.is_final);
    // Nothing is final while the client may still send text.
    let mut frames = vec![f];
    // Until 500 ms of silence: the first clause is done and the input is open, so it idles.
    while let Ok(r) = timeout(Duration::from_millis(500), rx.message()).await {
        let f = r.unwrap().expect("frame");
        check_frame(&f, "s", frames.len());
        assert!(!f.is_final, "final frame while the input is open");
        frames.push(f);
    }
    let first_clause = frames.len();
    assert!(
        first_clause > 20,
        "{first_clause} frames for 'Hello there, my friend.'"
    );
    tx.send(&chunk("s", "Goodbye.", true)).unwrap();
    while let Some(f) = next(&mut rx, WAIT).await {
        check_frame(&f, "s", frames.len());
        let last = f.is_final;
        frames.push(f);
        if last {
            break;
        }
    }
    assert!(
        audio_frames(&frames) > first_clause + 10,
        "the second clause was spoken"
    );
}

#[tokio::test]
async fn pause_mid_sentence_stops_frames_and_resume_finishes_them() {
    let w = start("worker", &[]);
    let client = w.client().await;
    assert!(start_session(&client, "p", "espeak-en-us").await.0);
    // ~30 s of speech: far more than the client's 1 MiB stream window (~546 frames) holds,
    // so frames only keep coming if the worker keeps producing.
    let text =
        ["This is a long sentence that keeps going, with several clauses and many words, so that \
         a pause can land right in the middle of it while the engine is still speaking.";
            6]
            .join(" ");
    let unpaused = audio_frames(&speak(&client, "p", &text).await);
    assert!(
        unpaused > 900,
        "{unpaused} frames: text too short for this test"
    );

    let (mut tx, mut rx) = client.synthesize(None).await.unwrap();
    tx.send(&chunk("p", &text, true)).unwrap();
    let mut frames = Vec::new();
    for _ in 0..5 {
        let f = next(&mut rx, WAIT).await.unwrap();
        check_frame(&f, "p", frames.len());
        frames.push(f);
    }
    control(&client, "p", ControlCommand::Pause).await;
    // Drain what was already sent, until the stream stays silent for 700 ms.
    while let Ok(r) = timeout(Duration::from_millis(700), rx.message()).await {
        let f = r.unwrap().expect("the call must not end while paused");
        check_frame(&f, "p", frames.len());
        assert!(!f.is_final, "paused, yet the synthesis ran to its end");
        frames.push(f);
    }
    let at_pause = frames.len();
    assert!(
        at_pause < unpaused,
        "{at_pause} of {unpaused} frames arrived while paused"
    );
    control(&client, "p", ControlCommand::Resume).await;
    while let Some(f) = next(&mut rx, WAIT).await {
        check_frame(&f, "p", frames.len());
        let last = f.is_final;
        frames.push(f);
        if last {
            break;
        }
    }
    assert_eq!(
        audio_frames(&frames),
        unpaused,
        "nothing lost or repeated across PAUSE/RESUME"
    );

    // STOP mid-sentence ends the call at once with its final marker.
    let (mut tx, mut rx) = client.synthesize(None).await.unwrap();
    tx.send(&chunk("p", &text, true)).unwrap();
    let mut frames = Vec::new();
    for _ in 0..5 {
        frames.push(next(&mut rx, WAIT).await.unwrap());
    }
    control(&client, "p", ControlCommand::Stop).await;
    while let Some(f) = next(&mut rx, WAIT).await {
        check_frame(&f, "p", frames.len());
        let last = f.is_final;
        frames.push(f);
        if last {
            break;
        }
    }
    assert!(frames.len() < unpaused, "STOP ended the synthesis early");
}

// ---- model lifecycle -----------------------------------------------------------------------

async fn models(client: &TtsClient) -> HashMap<String, ModelInfo> {
    client
        .list_models(Some(WAIT))
        .await
        .unwrap()
        .models
        .into_iter()
        .map(|m| (m.model_id.clone(), m))
        .collect()
}

async fn model(client: &TtsClient, id: &str) -> ModelInfo {
    models(client)
        .await
        .remove(id)
        .unwrap_or_else(|| panic!("{id} not listed"))
}

async fn load(client: &TtsClient, id: &str) -> (bool, String, i64) {
    let r = client
        .load_model(
            &LoadModelRequest {
                model_id: id.into(),
                preload_only: false,
            },
            Some(WAIT),
        )
        .await
        .unwrap();
    (r.success, r.message, r.load_duration_ms)
}

async fn unload(client: &TtsClient, id: &str) -> (bool, String) {
    let r = client
        .unload_model(
            &UnloadModelRequest {
                model_id: id.into(),
            },
            Some(WAIT),
        )
        .await
        .unwrap();
    (r.success, r.message)
}

/// espeak-ng processes whose parent is `pid` (the warm processes of resident voices).
fn espeak_children(pid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // pid (comm) state ppid ...
            let Some(close) = stat.rfind(')') else {
                return false;
            };
            let comm = stat.split_once('(').map_or("", |(_, r)| r);
            let mut rest = stat[close + 1..].split_whitespace();
            let state = rest.next().unwrap_or("");
            let ppid = rest.next().and_then(|p| p.parse::<u32>().ok());
            comm.starts_with("espeak-ng)") && ppid == Some(pid) && state != "Z"
        })
        .count()
}

async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let t0 = Instant::now();
    while !f().await {
        assert!(t0.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn models_load_list_and_unload_with_a_warm_process() {
    let w = start("worker", &["--allow-model-management"]);
    let client = w.client().await;
    let all = models(&client).await;
    assert!(all["mock-440hz"].is_loaded, "the default model is resident");
    let us = &all["espeak-en-us"];
    assert_eq!(us.family, "espeak");
    assert!(!us.is_loaded, "voices load on demand");
    assert!(us.languages.contains(&"en".to_owned()));
    assert!(all.contains_key("espeak-de") && all.contains_key("espeak-en-gb"));
    let caps = client.get_capabilities(Some(WAIT)).await.unwrap();
    let langs = caps.capabilities.unwrap().languages;
    assert!(langs.contains(&"en".to_owned()) && langs.contains(&"de".to_owned()));
    assert_eq!(espeak_children(w.pid() as u32), 0);

    let (ok, msg, ms) = load(&client, "espeak-de").await;
    assert!(ok, "{msg}");
    assert!(ms >= 1, "warm-up time is measured: {ms} ms");
    let de = model(&client, "espeak-de").await;
    assert!(de.is_loaded);
    assert_eq!(de.metadata["load_duration_ms"], ms.to_string());
    assert!(de.languages.contains(&"de".to_owned()));
    let caps = client.get_capabilities(Some(WAIT)).await.unwrap();
    assert!(caps.resident_models.contains(&"espeak-de".to_owned()));
    assert_eq!(caps.metrics["resident_models"], 2.0);
    let pid = w.pid() as u32;
    wait_until("a warm espeak-ng process", || async move {
        espeak_children(pid) == 1
    })
    .await;

    let (ok, msg) = unload(&client, "espeak-de").await;
    assert!(ok, "{msg}");
    assert!(!model(&client, "espeak-de").await.is_loaded);
    wait_until("the warm process to end", || async move {
        espeak_children(pid) == 0
    })
    .await;
    assert!(!unload(&client, "espeak-de").await.0, "not loaded any more");
    let (ok, msg, _) = load(&client, "espeak-xx-nowhere").await;
    assert!(!ok);
    assert!(msg.contains("unknown model"), "{msg}");
}

#[tokio::test]
async fn references_are_counted_per_session() {
    let w = start("worker", &["--allow-model-management"]);
    let client = w.client().await;
    assert!(start_session(&client, "a", "espeak-en-gb").await.0);
    assert!(start_session(&client, "b", "espeak-en-gb").await.0);
    let gb = model(&client, "espeak-en-gb").await;
    assert!(gb.is_loaded, "StartSession loads the model");
    assert_eq!(gb.metadata["sessions"], "2");
    let (ok, msg) = unload(&client, "espeak-en-gb").await;
    assert!(!ok);
    assert!(msg.contains("in use by 2"), "{msg}");
    end_session(&client, "a").await;
    assert_eq!(
        model(&client, "espeak-en-gb").await.metadata["sessions"],
        "1"
    );
    // b still speaks with it.
    assert!(audio_frames(&speak(&client, "b", "Still here.").await) > 10);
    end_session(&client, "b").await;
    assert_eq!(
        model(&client, "espeak-en-gb").await.metadata["sessions"],
        "0"
    );
    assert!(unload(&client, "espeak-en-gb").await.0);
    // A session on an unknown voice is refused with the reason.
    let (ok, msg) = start_session(&client, "c", "espeak-klingon").await;
    assert!(!ok);
    assert!(msg.contains("espeak-klingon"), "{msg}");
}

#[tokio::test]
async fn idle_models_are_evicted_after_the_ttl_but_not_while_in_use() {
    let w = start(
        "worker",
        &["--model-ttl-secs", "1", "--allow-model-management"],
    );
    let client = w.client().await;
    let (ok, msg, _) = load(&client, "espeak-fr-fr").await;
    assert!(ok, "{msg}");
    assert!(start_session(&client, "s", "espeak-es").await.0);
    let c = client.clone();
    wait_until("espeak-fr-fr to be evicted", || {
        let c = c.clone();
        async move { !model(&c, "espeak-fr-fr").await.is_loaded }
    })
    .await;
    // espeak-es has been idle as long, but a session holds it; the pinned default stays too.
    let all = models(&client).await;
    assert!(all["espeak-es"].is_loaded, "in use: not evicted");
    assert!(all["mock-440hz"].is_loaded, "the default model is pinned");
    let caps = client.get_capabilities(Some(WAIT)).await.unwrap();
    assert!(caps.metrics["model_evictions_total"] >= 1.0);
    end_session(&client, "s").await;
    let c = client.clone();
    wait_until("espeak-es to be evicted once released", || {
        let c = c.clone();
        async move { !model(&c, "espeak-es").await.is_loaded }
    })
    .await;
    assert!(model(&client, "mock-440hz").await.is_loaded);
}

#[tokio::test]
async fn the_resident_cap_evicts_the_least_recently_used_model() {
    let w = start(
        "worker",
        &[
            "--max-resident-models",
            "3",
            "--preload",
            "espeak-en-us",
            "--allow-model-management",
        ],
    );
    let client = w.client().await;
    let resident = |c: TtsClient| async move {
        let mut r = c
            .get_capabilities(Some(WAIT))
            .await
            .unwrap()
            .resident_models;
        r.sort();
        r
    };
    assert_eq!(
        resident(client.clone()).await,
        vec!["espeak-en-us", "mock-440hz"]
    );
    assert_eq!(
        model(&client, "espeak-en-us").await.metadata["pinned"],
        "true"
    );
    assert!(load(&client, "espeak-de").await.0);
    assert!(load(&client, "espeak-it").await.0, "evicts espeak-de");
    assert_eq!(
        resident(client.clone()).await,
        vec!["espeak-en-us", "espeak-it", "mock-440hz"]
    );
    // espeak-it in use and the rest pinned: nothing can make room.
    assert!(start_session(&client, "s", "espeak-it").await.0);
    let (ok, msg, _) = load(&client, "espeak-nl").await;
    assert!(!ok);
    assert!(msg.contains("--max-resident-models"), "{msg}");
    let (ok, msg) = start_session(&client, "t", "espeak-nl").await;
    assert!(!ok, "a session's model must fit too");
    assert!(msg.contains("--max-resident-models"), "{msg}");
    end_session(&client, "s").await;
    assert!(
        start_session(&client, "t", "espeak-nl").await.0,
        "now espeak-it can go"
    );
    assert_eq!(
        resident(client.clone()).await,
        vec!["espeak-en-us", "espeak-nl", "mock-440hz"]
    );
}

#[tokio::test]
async fn without_espeak_the_worker_runs_with_the_mock_and_says_why() {
    let w = start("worker", &["--espeak-binary", "/nonexistent/espeak-ng"]);
    let client = w.client().await;
    let all = models(&client).await;
    assert!(
        all.keys().all(|k| !k.starts_with("espeak-")),
        "{:?}",
        all.keys()
    );
    let (ok, msg) = start_session(&client, "s", "espeak-en-us").await;
    assert!(!ok);
    assert!(msg.contains("apt-get install espeak-ng"), "{msg}");
    assert!(start_session(&client, "m", "mock-440hz").await.0);
    assert_eq!(audio_frames(&speak(&client, "m", "hi").await), 25);
}

// ---- through the orchestrator --------------------------------------------------------------

async fn recv_json(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    wait: Duration,
) -> Option<serde_json::Value> {
    loop {
        match timeout(wait, ws.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(Message::Text(t)))) => return Some(serde_json::from_str(&t).unwrap()),
            Ok(Some(Ok(_))) => continue,
            Ok(other) => panic!("websocket ended: {other:?}"),
        }
    }
}

#[tokio::test]
async fn demo_speaks_with_espeak_and_pause_mid_sentence_stops_frames() {
    let demo = start("demo", &[]);
    let (mut ws, _) = timeout(
        WAIT,
        tokio_tungstenite::connect_async(format!("ws://{}/", demo.addr)),
    )
    .await
    .unwrap()
    .unwrap();
    let start = recv_json(&mut ws, WAIT).await.unwrap();
    assert_eq!(start["type"], "session_start");
    assert_eq!(
        start["model"], "espeak-en-us",
        "demo speaks with espeak by default"
    );
    let text = "This sentence is long enough to be paused in the middle, because it goes on \
                and on for several seconds before it finally comes to an end.";
    let msg = serde_json::json!({"type": "text", "text": text});
    ws.send(Message::text(msg.to_string())).await.unwrap();
    let mut pcm = Vec::new();
    let mut seq = 0;
    let b64 = base64::engine::general_purpose::STANDARD;
    while seq < 10 {
        let m = recv_json(&mut ws, WAIT).await.expect("audio");
        if m["type"] == "audio" {
            seq += 1;
            assert_eq!(m["sequence"], seq);
            pcm.extend(b64.decode(m["pcm"].as_str().unwrap()).unwrap());
        }
    }
    let pause = serde_json::json!({"type": "control", "command": "PAUSE"});
    ws.send(Message::text(pause.to_string())).await.unwrap();
    // At most a few frames already in flight, then nothing while paused.
    let mut in_flight = 0;
    while let Some(m) = recv_json(&mut ws, Duration::from_millis(400)).await {
        assert_eq!(m["type"], "audio");
        assert_ne!(m["is_final"], true, "paused, yet the utterance ended");
        in_flight += 1;
        seq += 1;
        pcm.extend(b64.decode(m["pcm"].as_str().unwrap()).unwrap());
    }
    assert!(in_flight <= 3, "{in_flight} frames after PAUSE");
    assert!(
        recv_json(&mut ws, Duration::from_millis(500))
            .await
            .is_none(),
        "frames while paused"
    );
    let resume = serde_json::json!({"type": "control", "command": "RESUME"});
    ws.send(Message::text(resume.to_string())).await.unwrap();
    loop {
        let m = recv_json(&mut ws, WAIT).await.expect("audio after RESUME");
        assert_eq!(m["type"], "audio");
        seq += 1;
        assert_eq!(m["sequence"], seq, "contiguous across PAUSE/RESUME");
        if m["is_final"] == true {
            break;
        }
        pcm.extend(b64.decode(m["pcm"].as_str().unwrap()).unwrap());
    }
    assert!(seq > 200, "{seq}: a several-second sentence");
    let s: Vec<i16> = pcm
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect();
    assert!(
        rms(&s) > 800.0,
        "speech through the gateway: RMS {}",
        rms(&s)
    );
}
