//! What clients send and what the server says, as JSON text, plus binary audio messages:
//! `duplex::protocol::parse` (client.rs), `ServerEvent::parse` (event.rs) and
//! `protocol::audio::parse_binary`.
//!
//! Promises checked:
//! - no panic on any input;
//! - a parsed `text` message has non-empty text; errors have a reason to send the client;
//! - a parsed `ServerEvent` serialises back to JSON that parses to the same event, and its
//!   WebSocket frame is a final text frame holding that JSON;
//! - a parsed binary frame carries `len - 8` bytes of PCM, and re-encoding it with the
//!   server's encoders (`protocol::audio::audio`, binary and JSON) decodes to the same
//!   sequence, final flag and PCM.
#![no_main]

use base64::Engine;
use bytes::{Bytes, BytesMut};
use duplex::protocol::audio::{audio, parse_binary, BINARY_HEADER_LEN};
use duplex::protocol::{ClientMessage, Format, ServerEvent};
use libfuzzer_sys::fuzz_target;

/// Payload of a complete unmasked server frame (checks the header on the way).
fn frame_payload(frame: &[u8], opcode: u8) -> &[u8] {
    assert_eq!(frame[0], 0x80 | opcode, "final frame of opcode {opcode}");
    let (len, hl) = match frame[1] {
        126 => (usize::from(u16::from_be_bytes([frame[2], frame[3]])), 4),
        127 => (
            u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize,
            10,
        ),
        n => {
            assert!(n < 126, "server frames are unmasked");
            (usize::from(n), 2)
        }
    };
    assert_eq!(frame.len(), hl + len, "frame length field");
    &frame[hl..]
}

fn check_text(raw: &str) {
    match duplex::protocol::parse(raw) {
        Ok(ClientMessage::Text { text, .. }) => assert!(!text.is_empty()),
        Ok(ClientMessage::Control(_)) => {}
        Err(reason) => assert!(!reason.is_empty()),
    }
    if let Ok(event) = ServerEvent::parse(raw) {
        let json = event.to_json();
        let back = ServerEvent::parse(&json)
            .unwrap_or_else(|e| panic!("{event:?} serialised to unparsable {json:?}: {e}"));
        assert_eq!(back, event, "round trip through {json:?}");
        let frame = event.to_frame();
        assert_eq!(frame_payload(&frame, 0x1), json.as_bytes());
    }
}

fn check_binary(payload: &[u8]) {
    let Ok(f) = parse_binary(payload) else {
        assert!(payload.len() < BINARY_HEADER_LEN || payload[0] != 1);
        return;
    };
    assert_eq!(f.pcm.len(), payload.len() - BINARY_HEADER_LEN);
    let pcm = Bytes::copy_from_slice(f.pcm);
    let pcm_arg = (!pcm.is_empty()).then_some(&pcm);
    let mut arena = BytesMut::new();

    // Binary: header chunk (WS header + 8-byte audio header) followed by the PCM itself.
    let c = audio(Format::Binary, f.sequence, pcm_arg, f.is_final, &mut arena);
    let mut wire = c.head.to_vec();
    if let Some(p) = &c.pcm {
        wire.extend_from_slice(p);
    }
    let back = parse_binary(frame_payload(&wire, 0x2)).expect("our binary frame parses");
    assert_eq!(
        (back.sequence, back.is_final, back.pcm),
        (f.sequence, f.is_final, f.pcm)
    );

    // JSON: base64 straight into the frame, parsed as the client does.
    let c = audio(Format::Json, f.sequence, pcm_arg, f.is_final, &mut arena);
    assert!(c.pcm.is_none());
    let body = frame_payload(&c.head, 0x1);
    let body = std::str::from_utf8(body).expect("JSON audio is UTF-8");
    match ServerEvent::parse(body) {
        Ok(ServerEvent::Audio {
            pcm: b64,
            sequence,
            is_final,
            sample_rate,
            frame_ms,
        }) => {
            assert_eq!((sequence, is_final), (f.sequence, f.is_final));
            assert_eq!((sample_rate, frame_ms), (48_000, 20));
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(&b64)
                .expect("valid base64");
            assert_eq!(decoded, f.pcm);
        }
        other => panic!("JSON audio {body:?} parsed as {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        check_text(s);
    }
    check_binary(data);
});
