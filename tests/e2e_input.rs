//! End to end: what the orchestrator does with bad input, with limits and with idle sessions
//! (docs/PROTOCOL.md 1.2, 1.3): bad messages get an `error` and the socket carries on; WebSocket
//! protocol violations close with the right code; the connection cap refuses the upgrade.

mod common;

use common::*;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite;

/// Reads the next message and checks it is `error` with `code`, with a readable message.
async fn expect_error(c: &mut Client, code: &str, after: &str) -> String {
    let v = c.recv_json(WAIT).await;
    assert_eq!(
        v["type"], "error",
        "after {after}: expected an error, got {v}"
    );
    assert_eq!(v["code"], code, "after {after}: {v}");
    let message = v["message"]
        .as_str()
        .unwrap_or_else(|| panic!("error message must be a string: {v}"));
    assert!(!message.is_empty(), "error message must say something: {v}");
    message.to_string()
}

#[tokio::test]
async fn invalid_messages_get_invalid_message_and_the_socket_carries_on() {
    let stack = Stack::default().await;
    let mut c = stack.server.client("").await;

    let bad: &[&str] = &[
        "this is not JSON",
        "{\"type\":\"text\",\"text\":\"unterminated",
        "[1,2,3]",
        "\"text\"",
        "{}",
        r#"{"type":"sing","text":"hi"}"#,
        r#"{"type":"text","text":""}"#,
        r#"{"type":"text"}"#,
        r#"{"type":"control","command":"JUMP"}"#,
        r#"{"type":"control"}"#,
        r#"{"type":"text","text":42}"#,
        r#"{"type":"text","text":"hi","is_final":"yes"}"#,
        r#"{"type":"control","command":2}"#,
        r#"{"type":7}"#,
    ];
    for msg in bad {
        c.send_text(msg).await;
        expect_error(&mut c, "INVALID_MESSAGE", msg).await;
    }

    // Still the same session, still working.
    c.say("Still here.").await;
    c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);
}

#[tokio::test]
async fn bad_input_while_audio_streams_does_not_disturb_it() {
    let stack = Stack::default().await;
    let mut c = stack.server.client("").await;
    c.say("Keep playing.").await;
    let (mut frames, _) = c.read_frames(3, WAIT).await;
    c.send_text(r#"{"type":"nope"}"#).await;
    let rest = c.collect_utterance(WAIT).await;
    frames.extend(rest.frames);
    let seqs: Vec<u64> = frames.iter().map(|f| f.sequence).collect();
    assert_eq!(seqs, (1..=MOCK_FRAMES as u64).collect::<Vec<_>>());
    assert_eq!(rest.end_sequence, MOCK_FRAMES as u64 + 1);
    assert_eq!(rest.others.len(), 1, "one error: {:?}", rest.others);
    assert_eq!(rest.others[0]["code"], "INVALID_MESSAGE");
}

#[tokio::test]
async fn idle_session_gets_session_end_then_a_close_frame() {
    let stack = Stack::start(&[], &["--idle-timeout-secs", "1"]).await;
    let t0 = Instant::now();
    let mut c = stack.server.client("").await;
    let id = c.session_id();

    let end = c.recv_json(Duration::from_secs(6)).await;
    let waited = t0.elapsed();
    assert_eq!(end["type"], "session_end", "{end}");
    assert_eq!(end["reason"], "idle_timeout", "{end}");
    assert_eq!(end["session_id"], id.as_str(), "{end}");
    // Lower bound only (timers never fire early; a slow machine only makes it later).
    assert!(
        waited >= Duration::from_millis(900),
        "idle timeout of 1 s fired after {waited:?}"
    );

    match c.recv(WAIT).await {
        Incoming::Close(_) => {}
        other => panic!("expected a close frame after session_end, got {other:?}"),
    }
}

#[tokio::test]
async fn activity_keeps_an_idle_session_open() {
    let stack = Stack::start(&[], &["--idle-timeout-secs", "1"]).await;
    let mut c = stack.server.client("pacing=asap").await;
    // A short utterance every 400 ms for over 2 s: never idle for a whole second, so no
    // session_end (it would show up in `others`) and no close (collect_utterance would panic).
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        c.say("Still talking.").await;
        c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);
    }
}

#[tokio::test]
async fn max_session_duration_ends_even_a_busy_session() {
    let stack = Stack::start(&[], &["--max-session-secs", "1"]).await;
    let t0 = Instant::now();
    let mut c = stack.server.client("").await;
    let id = c.session_id();
    // Keep it busy (not idle): two utterances of 500 ms, back to back.
    c.say("One.").await;
    c.say("Two.").await;
    let (end, _audio) = c
        .recv_until(Duration::from_secs(6), |v| v["type"] == "session_end")
        .await;
    assert_eq!(end["reason"], "max_duration", "{end}");
    assert_eq!(end["session_id"], id.as_str(), "{end}");
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    loop {
        match c.recv(WAIT).await {
            Incoming::Close(_) => break,
            // Audio already queued may still be flushed (an end marker, say) before the close.
            Incoming::Json(v) if v["type"] == "audio" => continue,
            other => panic!("expected a close frame after session_end, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn oversized_message_closes_with_1009() {
    let stack = Stack::start(&[], &["--max-message-bytes", "1024"]).await;

    // Under the limit is fine.
    let mut ok = stack.server.client("").await;
    let text = "a".repeat(900);
    ok.send_json(&json!({"type": "text", "text": text})).await;
    let u = ok.collect_utterance(WAIT).await;
    assert!(!u.frames.is_empty(), "a message under the limit is spoken");
    assert!(u.others.is_empty(), "{:?}", u.others);

    let mut c = stack.server.client("").await;
    let text = "a".repeat(4096);
    c.send_json(&json!({"type": "text", "text": text})).await;
    loop {
        match c.recv(WAIT).await {
            Incoming::Close(Some((code, _))) => {
                assert_eq!(code, 1009, "oversized message: close code");
                break;
            }
            // A server-started close may be announced (docs/PROTOCOL.md 1.3).
            Incoming::Json(v) if v["type"] == "session_end" => continue,
            other => panic!("expected close 1009, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn invalid_utf8_text_closes_with_1007() {
    let stack = Stack::default().await;
    let mut c = stack.server.client("").await;
    c.send_raw_text_frame(vec![b'{', 0xff, 0xfe, 0xc3, 0x28, b'}'])
        .await;
    loop {
        match c.recv(WAIT).await {
            Incoming::Close(Some((code, _))) => {
                assert_eq!(code, 1007, "invalid UTF-8: close code");
                break;
            }
            Incoming::Json(v) if v["type"] == "session_end" => continue,
            other => panic!("expected close 1007, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn connections_beyond_the_cap_get_http_503() {
    let stack = Stack::start(&[], &["--max-connections", "2"]).await;
    let a = stack.server.client("").await;
    let mut b = stack.server.client("").await;

    let third = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(stack.server.ws_url("")),
    )
    .await
    .expect("third connect timed out");
    match third {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(
                resp.status().as_u16(),
                503,
                "third upgrade refused with 503"
            )
        }
        Err(e) => panic!("third upgrade: expected HTTP 503, got error {e}"),
        Ok(_) => panic!("third upgrade accepted beyond --max-connections 2"),
    }

    // The refused upgrade did not disturb the admitted sessions.
    b.say("Still fine.").await;
    b.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);

    // The cap counts open connections: after one closes, a new one gets in (the server may
    // need a moment to notice the close).
    a.close().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let r = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::connect_async(stack.server.ws_url("")),
        )
        .await
        .expect("connect timed out");
        match r {
            Ok(_) => break,
            Err(tungstenite::Error::Http(resp)) if resp.status().as_u16() == 503 => {
                assert!(
                    Instant::now() < deadline,
                    "a slot never freed up after a client closed"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("reconnect failed: {e}"),
        }
    }
}

#[tokio::test]
async fn a_client_vanishing_mid_utterance_is_cleaned_up() {
    let stack = Stack::default().await;
    let addr = stack.server.admin;
    let mut c = stack.server.client("").await;
    c.say("Nobody will hear the end of this.").await;
    c.read_frames(3, WAIT).await;
    drop(c); // TCP gone without a WebSocket close.

    // The server notices: the session is gone from the gauge (bounded wait) ...
    let deadline = Instant::now() + WAIT;
    loop {
        let m = http_get(addr, "/metrics").await;
        if metric_sum(&m.body, |n| n == "sessions_active") == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sessions_active never returned to 0 after the client vanished:\n{}",
            m.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... and everyone else carries on.
    let mut next = stack.server.client("").await;
    next.say("Next caller.").await;
    next.collect_utterance(WAIT)
        .await
        .assert_complete(MOCK_FRAMES);
}

#[tokio::test]
async fn ping_gets_a_pong_with_the_same_payload() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let stack = Stack::default().await;
    let mut c = stack.server.client("").await;
    c.ws()
        .send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .expect("send ping");
    // Nothing else is in flight on an idle session, so the very next message is the pong.
    let pong = match tokio::time::timeout(WAIT, c.ws().next()).await {
        Ok(Some(Ok(Message::Pong(p)))) => p.to_vec(),
        Ok(other) => panic!("expected a pong, got {other:?}"),
        Err(_) => panic!("no pong within {WAIT:?}"),
    };
    assert_eq!(pong, b"are you there");
    // Still a normal session afterwards.
    c.say("Pong received.").await;
    c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);
}

#[tokio::test]
async fn client_close_gets_a_close_reply_and_the_connection_ends() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::Message;
    let stack = Stack::default().await;
    let mut c = stack.server.client("").await;
    c.ws()
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        })))
        .await
        .expect("send close");
    let reply = tokio::time::timeout(WAIT, async {
        loop {
            match c.ws().next().await {
                Some(Ok(Message::Close(f))) => break f,
                Some(Ok(Message::Text(t))) if t.contains("session_end") => continue,
                other => panic!("expected the close reply, got {other:?}"),
            }
        }
    })
    .await
    .expect("no close reply within the bound");
    if let Some(f) = reply {
        assert_eq!(u16::from(f.code), 1000, "echoes a normal close: {f:?}");
    }
    c.wait_tcp_eof(WAIT).await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_and_others_carry_on() {
    // Frames as fast as the worker can make them, forwarded at once: a client that never
    // reads fills the kernel buffers, then the server's queue, until the server cuts it off.
    // 400 messages at once is a flood by the default rate limit; this test is about the
    // output side, so the limit is lifted for it.
    let stack = Stack::start(
        &["--mock-frame-interval-ms", "0"],
        &["--max-messages-per-sec", "100000"],
    )
    .await;
    let addr = stack.server.admin;
    let mut stuck = stack.server.client("pacing=asap").await;
    for _ in 0..399 {
        stuck
            .send_json(&serde_json::json!({"type": "text", "text": "more", "is_final": false}))
            .await;
    }
    stuck
        .send_json(&serde_json::json!({"type": "text", "text": "end", "is_final": true}))
        .await;
    // 400 chunks × 25 frames × ~2.6 KB ≈ 26 MB: far more than socket buffers plus the
    // server's 4 MiB queue limit. A healthy session works meanwhile.
    let mut ok = stack.server.client("pacing=asap").await;
    ok.say("I am still here.").await;
    ok.collect_utterance(WAIT)
        .await
        .assert_complete(MOCK_FRAMES);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = http_get(addr, "/metrics").await;
        if metric_sum(&m.body, |n| n == "sessions_active") == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the non-reading client was never dropped:\n{}",
            stack.server.proc.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(stack.server.proc.logs().contains("not reading"));
    ok.say("Still fine after the drop.").await;
    ok.collect_utterance(WAIT)
        .await
        .assert_complete(MOCK_FRAMES);
    drop(stuck);
}
