//! The client protocol's messages (PROTOCOL.md §1): parsing what clients send and building
//! what the server sends. Audio frames have their own fast encoders that write straight into
//! the outgoing WebSocket frame.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{json, Value};

use crate::audio::{FRAME_MS, SAMPLE_RATE};
use crate::ws::chunk::Chunk;
use crate::ws::frame::{self, Opcode};

/// Error codes of the `error` message (a fixed set clients switch on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidMessage,
    WorkerUnavailable,
    SynthesisFailed,
    RateLimited,
    Unauthorized,
    InternalError,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidMessage => "INVALID_MESSAGE",
            ErrorCode::WorkerUnavailable => "WORKER_UNAVAILABLE",
            ErrorCode::SynthesisFailed => "SYNTHESIS_FAILED",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::InternalError => "INTERNAL_ERROR",
        }
    }
}

/// Playback commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Stop,
}

/// A message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    Text { text: String, is_final: bool },
    Control(Command),
}

/// Parses one client text message; the error string is what the client is told.
pub fn parse(raw: &str) -> Result<ClientMessage, String> {
    let value: Value = serde_json::from_str(raw).map_err(|e| format!("not valid JSON: {e}"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| "message must be a JSON object".to_string())?;
    let kind = match obj.get("type") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err("field 'type' must be a string".into()),
        None => return Err("missing field 'type'".into()),
    };
    match kind {
        "text" => {
            let text = match obj.get("text") {
                Some(Value::String(s)) => s,
                Some(_) => return Err("field 'text' must be a string".into()),
                None => return Err("missing field 'text'".into()),
            };
            if text.is_empty() {
                return Err("field 'text' must not be empty".into());
            }
            let is_final = match obj.get("is_final") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err("field 'is_final' must be a boolean".into()),
            };
            Ok(ClientMessage::Text {
                text: text.clone(),
                is_final,
            })
        }
        "control" => {
            let command = match obj.get("command") {
                Some(Value::String(s)) => s.as_str(),
                Some(_) => return Err("field 'command' must be a string".into()),
                None => return Err("missing field 'command'".into()),
            };
            match command {
                "PAUSE" => Ok(ClientMessage::Control(Command::Pause)),
                "RESUME" => Ok(ClientMessage::Control(Command::Resume)),
                "STOP" => Ok(ClientMessage::Control(Command::Stop)),
                other => Err(format!(
                    "unknown command '{other}' (expected PAUSE, RESUME or STOP)"
                )),
            }
        }
        other => Err(format!("unknown message type '{other}'")),
    }
}

/// A JSON event as a complete WebSocket text frame.
pub fn event(value: &Value) -> Bytes {
    frame::text(value.to_string().as_bytes())
}

/// `error` event.
pub fn error(code: ErrorCode, message: &str) -> Bytes {
    event(&json!({"type": "error", "message": message, "code": code.as_str()}))
}

/// How audio frames are put on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `audio` JSON messages with base64 PCM (compatible with the Python system's clients).
    Json,
    /// Binary messages: [`BINARY_HEADER_LEN`]-byte header + raw PCM.
    Binary,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Binary => "binary",
        }
    }
}

/// Binary audio header: `version u8 = 1 | flags u8 (bit 0 = final) | reserved u16 = 0 |
/// sequence u32 little-endian`.
pub const BINARY_HEADER_LEN: usize = 8;
/// Version byte of the binary header.
pub const BINARY_VERSION: u8 = 1;
/// Flag bit of the end marker.
pub const FLAG_FINAL: u8 = 1;

const JSON_PREFIX: &[u8] = b"{\"type\":\"audio\",\"pcm\":\"";
const JSON_MID: &[u8] = b"\",\"sample_rate\":48000,\"frame_ms\":20,\"sequence\":";

/// Size of the per-core buffer JSON audio frames are carved from (about 24 frames).
pub const JSON_ARENA: usize = 64 * 1024;

/// Encodes one audio frame (or, with `pcm` empty and `is_final`, the end marker) as the
/// chunks to write. Binary mode returns the header (inline) and the PCM `Bytes` itself (no
/// copy, no allocation); JSON mode base64-encodes straight into a frame carved from `arena`,
/// the core's reused buffer, which is replaced only when full (one allocation per ~24 frames).
pub fn audio(
    format: Format,
    sequence: u32,
    pcm: Option<&Bytes>,
    is_final: bool,
    arena: &mut BytesMut,
) -> AudioChunks {
    debug_assert_eq!(SAMPLE_RATE, 48_000);
    debug_assert_eq!(FRAME_MS, 20);
    match format {
        Format::Binary => {
            let payload_len = pcm.map_or(0, |p| p.len());
            let total = BINARY_HEADER_LEN + payload_len;
            // Built on the stack and stored inline in the output queue: no allocation.
            let mut head = [0u8; 10 + BINARY_HEADER_LEN];
            let ws_len = frame::write_header(&mut head, Opcode::Binary, total);
            head[ws_len] = BINARY_VERSION;
            head[ws_len + 1] = if is_final { FLAG_FINAL } else { 0 };
            head[ws_len + 4..ws_len + 8].copy_from_slice(&sequence.to_le_bytes());
            let head = &head[..ws_len + BINARY_HEADER_LEN];
            AudioChunks {
                head: Chunk::inline(head)
                    .unwrap_or_else(|| Chunk::Shared(Bytes::copy_from_slice(head))),
                pcm: pcm.cloned(),
            }
        }
        Format::Json => {
            let seq = itoa_buf(sequence);
            let seq = seq.as_str();
            let b64_len = pcm.map_or(0, |p| base64::encoded_len(p.len(), true).unwrap_or(0));
            let tail: &[u8] = if is_final {
                b",\"is_final\":true}"
            } else {
                b"}"
            };
            let len = JSON_PREFIX.len() + b64_len + JSON_MID.len() + seq.len() + tail.len();
            let total = frame::header_len(len) + len;
            if arena.capacity() - arena.len() < total {
                *arena = BytesMut::with_capacity(JSON_ARENA.max(total));
            }
            let mut buf = arena.split_off(arena.len());
            frame::put_header(&mut buf, Opcode::Text, len);
            buf.put_slice(JSON_PREFIX);
            if let Some(p) = pcm {
                let start = buf.len();
                buf.resize(start + b64_len, 0);
                // SIMD base64 (several times faster than a scalar encoder on 1920 bytes);
                // the slice has exactly the encoded length.
                let _ = base64_simd::STANDARD
                    .encode(p, base64_simd::Out::from_slice(&mut buf[start..]));
            }
            buf.put_slice(JSON_MID);
            buf.put_slice(seq.as_bytes());
            buf.put_slice(tail);
            // Give the unused tail back to the arena for the next frame.
            let rest = buf.split_off(total);
            *arena = rest;
            AudioChunks {
                head: Chunk::Shared(buf.freeze()),
                pcm: None,
            }
        }
    }
}

/// The wire chunks of one audio message: a head and, in binary mode, the PCM itself.
pub struct AudioChunks {
    pub head: Chunk,
    pub pcm: Option<Bytes>,
}

/// Decimal formatting without allocation.
struct ItoaBuf {
    buf: [u8; 10],
    start: usize,
}

impl ItoaBuf {
    fn as_str(&self) -> &str {
        // Only ASCII digits are ever written.
        std::str::from_utf8(&self.buf[self.start..]).unwrap_or("0")
    }
}

fn itoa_buf(mut n: u32) -> ItoaBuf {
    let mut buf = [0u8; 10];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    ItoaBuf { buf, start: i }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    #[test]
    fn parses_text_and_defaults_is_final() {
        assert_eq!(
            parse(r#"{"type":"text","text":"hi"}"#),
            Ok(ClientMessage::Text {
                text: "hi".into(),
                is_final: true
            })
        );
        assert_eq!(
            parse(r#"{"type":"text","text":"hi","is_final":false,"extra":1}"#),
            Ok(ClientMessage::Text {
                text: "hi".into(),
                is_final: false
            })
        );
    }

    #[test]
    fn rejects_bad_shapes_with_reasons() {
        for (raw, needle) in [
            ("nope", "JSON"),
            ("[]", "object"),
            (r#"{"text":"x"}"#, "type"),
            (r#"{"type":"bogus"}"#, "unknown message type"),
            (r#"{"type":"text","text":""}"#, "empty"),
            (r#"{"type":"text","text":5}"#, "string"),
            (r#"{"type":"text","text":"a","is_final":"yes"}"#, "boolean"),
            (r#"{"type":"control","command":"JUMP"}"#, "unknown command"),
            (r#"{"type":"control"}"#, "command"),
        ] {
            let err = parse(raw).unwrap_err();
            assert!(err.contains(needle), "{raw}: {err}");
        }
    }

    fn payload(chunks: &AudioChunks) -> Vec<u8> {
        let head = chunks.head.as_slice();
        let hl = match head[1] & 0x7f {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        let mut out = head[hl..].to_vec();
        if let Some(p) = &chunks.pcm {
            out.extend_from_slice(p);
        }
        out
    }

    #[test]
    fn json_audio_matches_serde_encoding() {
        let pcm = Bytes::from((0..1920u32).map(|i| i as u8).collect::<Vec<_>>());
        let c = audio(Format::Json, 17, Some(&pcm), false, &mut BytesMut::new());
        // Header of a 2.6 KB text frame is 4 bytes.
        let body = &c.head.as_slice()[4..];
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["type"], "audio");
        assert_eq!(v["sequence"], 17);
        assert_eq!(v["sample_rate"], 48000);
        assert_eq!(v["frame_ms"], 20);
        assert_eq!(v["pcm"].as_str().unwrap().len(), 2560);
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(v["pcm"].as_str().unwrap())
            .unwrap();
        assert_eq!(decoded, pcm.to_vec());
        assert!(v.get("is_final").is_none());
    }

    #[test]
    fn json_frames_from_one_arena_stay_intact() {
        let mut arena = BytesMut::new();
        let frames: Vec<_> = (0..100u32)
            .map(|i| {
                let pcm = Bytes::from(vec![i as u8; 1920]);
                audio(Format::Json, i + 1, Some(&pcm), false, &mut arena)
            })
            .collect();
        for (i, c) in frames.iter().enumerate() {
            let v: Value = serde_json::from_slice(&c.head.as_slice()[4..]).unwrap();
            assert_eq!(v["sequence"], i as u64 + 1);
            let pcm = base64::engine::general_purpose::STANDARD
                .decode(v["pcm"].as_str().unwrap())
                .unwrap();
            assert!(
                pcm.iter().all(|&b| b == i as u8),
                "frame {i} was overwritten"
            );
        }
    }

    #[test]
    fn json_end_marker() {
        let c = audio(Format::Json, 26, None, true, &mut BytesMut::new());
        let v: Value = serde_json::from_slice(&c.head.as_slice()[2..]).unwrap();
        assert_eq!(v["pcm"], "");
        assert_eq!(v["sequence"], 26);
        assert_eq!(v["is_final"], true);
    }

    #[test]
    fn binary_audio_reuses_the_pcm_buffer() {
        let pcm = Bytes::from(vec![7u8; 1920]);
        let c = audio(
            Format::Binary,
            0x01020304,
            Some(&pcm),
            false,
            &mut BytesMut::new(),
        );
        let sent = c.pcm.as_ref().unwrap();
        assert_eq!(sent.as_ptr(), pcm.as_ptr(), "PCM must not be copied");
        let p = payload(&c);
        assert_eq!(p.len(), 8 + 1920);
        assert_eq!(&p[..8], &[1, 0, 0, 0, 4, 3, 2, 1]);
        let end = audio(Format::Binary, 5, None, true, &mut BytesMut::new());
        assert_eq!(payload(&end), vec![1, 1, 0, 0, 5, 0, 0, 0]);
    }

    #[test]
    fn itoa_matches_display() {
        for n in [0u32, 9, 10, 12345, u32::MAX] {
            assert_eq!(itoa_buf(n).as_str(), n.to_string());
        }
    }
}
