//! Audio frames on the wire (docs/PROTOCOL.md §1.3): the fast encoders the server uses for
//! every 20 ms frame, and the decoder clients use for the binary format.
//!
//! Encoding never goes through serde: binary frames are a header carved from the core's
//! arena plus the worker's own PCM `Bytes` (no copy), and JSON frames are base64-encoded
//! straight into a WebSocket frame carved from the same arena.

use bytes::{BufMut, Bytes, BytesMut};

use crate::audio::{FRAME_MS, SAMPLE_RATE};
use crate::ws::frame::{self, Opcode};

/// How audio frames are put on the wire (`?format=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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

/// Pacing of audio towards the client (`?pacing=`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Pacing {
    /// Absolute 20 ms schedule from the first frame (what a listener needs).
    Realtime,
    /// Forward each frame the moment it arrives (offline rendering, clients that buffer).
    Asap,
}

impl Pacing {
    pub fn as_str(self) -> &'static str {
        match self {
            Pacing::Realtime => "realtime",
            Pacing::Asap => "asap",
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

/// Size of the per-core buffer audio frames are carved from (about 24 JSON frames, or the
/// headers of about 4,000 binary frames).
pub const ARENA: usize = 64 * 1024;

/// Copies `bytes` to the end of `arena` and splits them off as their own `Bytes`. A fresh
/// block replaces the arena when it is full; the old block lives on in the chunks carved
/// from it until the last is written. One allocation per block, none per frame.
pub fn carve(arena: &mut BytesMut, bytes: &[u8]) -> Bytes {
    if arena.capacity() - arena.len() < bytes.len() {
        *arena = BytesMut::with_capacity(ARENA.max(bytes.len()));
    }
    arena.extend_from_slice(bytes);
    arena.split().freeze()
}

/// Encodes one audio frame (or, with `pcm` empty and `is_final`, the end marker) as the
/// chunks to write. Binary mode returns the header (carved from `arena`) and the PCM `Bytes`
/// itself (no copy); JSON mode base64-encodes straight into a frame carved from `arena`. The
/// arena is the core's reused buffer, replaced only when full (see [`carve`]).
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
            // Built on the stack, then carved from the arena: no allocation per frame.
            let mut head = [0u8; 10 + BINARY_HEADER_LEN];
            let ws_len = frame::write_header(&mut head, Opcode::Binary, total);
            head[ws_len] = BINARY_VERSION;
            head[ws_len + 1] = if is_final { FLAG_FINAL } else { 0 };
            head[ws_len + 4..ws_len + 8].copy_from_slice(&sequence.to_le_bytes());
            AudioChunks {
                head: carve(arena, &head[..ws_len + BINARY_HEADER_LEN]),
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
                *arena = BytesMut::with_capacity(ARENA.max(total));
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
                head: buf.freeze(),
                pcm: None,
            }
        }
    }
}

/// The wire chunks of one audio message: a head and, in binary mode, the PCM itself.
pub struct AudioChunks {
    pub head: Bytes,
    pub pcm: Option<Bytes>,
}

/// A binary audio message as a client receives it (the payload of one binary WebSocket
/// message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BinaryFrame<'a> {
    /// Sequence number (1 for the first frame of each utterance).
    pub sequence: u32,
    /// The end marker (final bit set; no PCM).
    pub is_final: bool,
    /// The PCM (s16le mono 48 kHz), empty for the end marker.
    pub pcm: &'a [u8],
}

/// Parses a binary audio message; the error says what is wrong with it.
pub fn parse_binary(payload: &[u8]) -> Result<BinaryFrame<'_>, String> {
    if payload.len() < BINARY_HEADER_LEN {
        return Err(format!(
            "binary audio message of {} bytes is shorter than its {BINARY_HEADER_LEN}-byte header",
            payload.len()
        ));
    }
    if payload[0] != BINARY_VERSION {
        return Err(format!("unknown binary audio version {}", payload[0]));
    }
    let mut seq = [0u8; 4];
    seq.copy_from_slice(&payload[4..8]);
    Ok(BinaryFrame {
        sequence: u32::from_le_bytes(seq),
        is_final: payload[1] & FLAG_FINAL != 0,
        pcm: &payload[BINARY_HEADER_LEN..],
    })
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
    use serde_json::Value;

    fn payload(chunks: &AudioChunks) -> Vec<u8> {
        let head = &chunks.head[..];
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
        let body = &c.head[4..];
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
        // Clients parse the same bytes as the protocol's typed event.
        let event = crate::protocol::ServerEvent::parse(std::str::from_utf8(body).unwrap());
        assert!(matches!(
            event,
            Ok(crate::protocol::ServerEvent::Audio {
                sequence: 17,
                is_final: false,
                ..
            })
        ));
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
            let v: Value = serde_json::from_slice(&c.head[4..]).unwrap();
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
        let v: Value = serde_json::from_slice(&c.head[2..]).unwrap();
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
        let parsed = parse_binary(&p).unwrap();
        assert_eq!(
            (parsed.sequence, parsed.is_final, parsed.pcm.len()),
            (0x01020304, false, 1920)
        );
        let end = payload(&end);
        let parsed = parse_binary(&end).unwrap();
        assert_eq!(
            (parsed.sequence, parsed.is_final, parsed.pcm.len()),
            (5, true, 0)
        );
        assert!(parse_binary(&[1, 0, 0]).is_err());
        assert!(parse_binary(&[9, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn itoa_matches_display() {
        for n in [0u32, 9, 10, 12345, u32::MAX] {
            assert_eq!(itoa_buf(n).as_str(), n.to_string());
        }
    }
}
