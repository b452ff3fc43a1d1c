//! gRPC message framing: a 5-byte prefix (compressed flag, big-endian u32 length) before each
//! protobuf message, carried in HTTP/2 DATA frames that may split or pack messages anywhere.
//!
//! The decoder is built for the audio path: when a whole message lies inside one received
//! chunk it is returned as a slice of that chunk (`Bytes::slice`, no copy), and prost decodes
//! `bytes` fields from a `Bytes` buffer as further slices, so `AudioFrame.audio_data` points
//! into the HTTP/2 receive buffer. Only a message that straddles chunks is copied (once) into
//! an assembly buffer.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use super::status::Status;

/// Size of the length-prefix header in front of every message.
pub const HEADER_LEN: usize = 5;

/// Default cap on one received message. Audio frames are ~2 KB; 4 MiB (the gRPC default)
/// protects us from a corrupt length field making us allocate gigabytes.
pub const DEFAULT_MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// Encodes `msg` with its 5-byte prefix into one contiguous buffer (one DATA frame's worth).
pub fn encode<M: Message>(msg: &M) -> Result<Bytes, Status> {
    let len = msg.encoded_len();
    let len32 = u32::try_from(len)
        .map_err(|_| Status::resource_exhausted(format!("message of {len} bytes is too large")))?;
    let mut buf = BytesMut::with_capacity(HEADER_LEN + len);
    buf.put_u8(0);
    buf.put_u32(len32);
    msg.encode(&mut buf)
        .map_err(|e| Status::internal(format!("cannot encode message: {e}")))?;
    Ok(buf.freeze())
}

/// Decodes one protobuf message from its payload (the bytes after the prefix). Taking `Bytes`
/// makes prost's `bytes` fields zero-copy slices of `payload`.
pub fn decode<M: Message + Default>(payload: Bytes) -> Result<M, Status> {
    M::decode(payload).map_err(|e| Status::internal(format!("cannot decode message: {e}")))
}

/// Incremental decoder of length-prefixed messages from a sequence of received chunks.
///
/// Feed chunks with [`Decoder::push`], pull complete message payloads with
/// [`Decoder::next_message`] until it returns `None`, and call [`Decoder::finish`] at end of
/// stream to detect truncation.
#[derive(Debug)]
pub struct Decoder {
    /// Unconsumed rest of the most recent chunk; messages wholly inside it are sliced out.
    current: Bytes,
    /// Assembly buffer for a message (or header) that straddles chunk boundaries.
    partial: BytesMut,
    /// Largest accepted message payload.
    max_message: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_MAX_MESSAGE)
    }
}

impl Decoder {
    /// A decoder that rejects messages longer than `max_message` bytes.
    pub fn new(max_message: usize) -> Decoder {
        Decoder {
            current: Bytes::new(),
            partial: BytesMut::new(),
            max_message,
        }
    }

    /// Adds a received chunk. Call [`Decoder::next_message`] until it returns `None` before
    /// pushing the next chunk, so whole messages stay zero-copy slices.
    pub fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        if self.current.is_empty() {
            self.current = chunk;
        } else {
            // The caller pushed without draining: fold the old rest into the assembly buffer
            // (a copy, but still correct).
            self.partial.extend_from_slice(&self.current);
            self.current = chunk;
        }
    }

    /// True when no bytes are buffered (the stream is at a message boundary).
    pub fn is_empty(&self) -> bool {
        self.current.is_empty() && self.partial.is_empty()
    }

    /// Returns the payload of the next complete message, `Ok(None)` if more data is needed,
    /// or an error for a compressed message (we never negotiate compression), an unknown flag
    /// value, or a length above the maximum (RESOURCE_EXHAUSTED).
    pub fn next_message(&mut self) -> Result<Option<Bytes>, Status> {
        if self.partial.is_empty() {
            if self.current.len() < HEADER_LEN {
                // Not even a header: start assembling.
                self.partial.extend_from_slice(&self.current);
                self.current.clear();
                return Ok(None);
            }
            let len = self.check_header(&self.current[..HEADER_LEN])?;
            if self.current.len() >= HEADER_LEN + len {
                let msg = self.current.slice(HEADER_LEN..HEADER_LEN + len);
                self.current.advance(HEADER_LEN + len);
                return Ok(Some(msg));
            }
            self.partial.reserve(HEADER_LEN + len);
            self.partial.extend_from_slice(&self.current);
            self.current.clear();
            return Ok(None);
        }

        // Assembling a message that straddles chunks: first complete the header...
        if self.partial.len() < HEADER_LEN {
            let take = (HEADER_LEN - self.partial.len()).min(self.current.len());
            self.partial.extend_from_slice(&self.current[..take]);
            self.current.advance(take);
            if self.partial.len() < HEADER_LEN {
                return Ok(None);
            }
        }
        let len = self.check_header(&self.partial[..HEADER_LEN])?;
        // ...then copy only what this message still needs, leaving later messages in
        // `current` for the zero-copy path. The assembly buffer may already hold more than
        // this message (a push without draining folds a whole chunk into it): then the rest
        // stays there, ahead of `current`, for the next call.
        let total = HEADER_LEN + len;
        if self.partial.len() < total {
            let take = (total - self.partial.len()).min(self.current.len());
            self.partial.reserve(take);
            self.partial.extend_from_slice(&self.current[..take]);
            self.current.advance(take);
            if self.partial.len() < total {
                return Ok(None);
            }
        }
        let mut whole = self.partial.split_to(total).freeze();
        whole.advance(HEADER_LEN);
        Ok(Some(whole))
    }

    /// Call at end of stream: an error if a message was cut short.
    pub fn finish(&self) -> Result<(), Status> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(Status::internal(format!(
                "stream ended inside a message ({} bytes left over)",
                self.current.len() + self.partial.len()
            )))
        }
    }

    /// Validates a 5-byte header and returns the payload length.
    fn check_header(&self, header: &[u8]) -> Result<usize, Status> {
        match header[0] {
            0 => {}
            1 => {
                return Err(Status::internal(
                    "received a compressed message but no compression was negotiated",
                ))
            }
            flag => {
                return Err(Status::internal(format!(
                    "invalid message compression flag {flag}"
                )))
            }
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len > self.max_message {
            return Err(Status::resource_exhausted(format!(
                "received message of {len} bytes, larger than the limit of {} bytes",
                self.max_message
            )));
        }
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::status::Code;
    use crate::proto::{AudioFrame, TextChunk};

    fn frame(seq: i64) -> AudioFrame {
        AudioFrame {
            session_id: "s1".into(),
            audio_data: Bytes::from(vec![seq as u8; 1920]),
            sample_rate: 48_000,
            frame_duration_ms: 20,
            sequence_number: seq,
            is_final: false,
        }
    }

    fn drain(dec: &mut Decoder) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some(m) = dec.next_message().unwrap() {
            out.push(m);
        }
        out
    }

    #[test]
    fn encode_writes_prefix() {
        let chunk = TextChunk {
            text: "hi".into(),
            ..Default::default()
        };
        let b = encode(&chunk).unwrap();
        assert_eq!(b[0], 0);
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        assert_eq!(len, chunk.encoded_len());
        assert_eq!(b.len(), HEADER_LEN + len);
    }

    #[test]
    fn several_messages_in_one_chunk() {
        let mut wire = BytesMut::new();
        for i in 1..=3 {
            wire.extend_from_slice(&encode(&frame(i)).unwrap());
        }
        let mut dec = Decoder::default();
        dec.push(wire.freeze());
        let msgs = drain(&mut dec);
        assert_eq!(msgs.len(), 3);
        for (i, m) in msgs.into_iter().enumerate() {
            let f: AudioFrame = decode(m).unwrap();
            assert_eq!(f.sequence_number, i as i64 + 1);
            assert_eq!(f.audio_data.len(), 1920);
        }
        dec.finish().unwrap();
    }

    #[test]
    fn messages_split_at_every_possible_point() {
        let mut wire = BytesMut::new();
        for i in 1..=2 {
            wire.extend_from_slice(&encode(&frame(i)).unwrap());
        }
        // an empty message too: zero-length payloads are legal
        wire.extend_from_slice(&encode(&TextChunk::default()).unwrap());
        let wire = wire.freeze();
        for split in 0..=wire.len() {
            for second in [split, (split + 7).min(wire.len())] {
                let mut dec = Decoder::default();
                let mut got = Vec::new();
                for part in [
                    wire.slice(..split),
                    wire.slice(split..second),
                    wire.slice(second..),
                ] {
                    dec.push(part);
                    got.extend(drain(&mut dec));
                }
                dec.finish().unwrap();
                assert_eq!(got.len(), 3, "split at {split}/{second}");
                let f1: AudioFrame = decode(got[0].clone()).unwrap();
                let f2: AudioFrame = decode(got[1].clone()).unwrap();
                assert_eq!((f1.sequence_number, f2.sequence_number), (1, 2));
                assert_eq!(f2.audio_data, Bytes::from(vec![2u8; 1920]));
                assert!(got[2].is_empty());
            }
        }
    }

    #[test]
    fn one_byte_at_a_time() {
        let wire = encode(&frame(9)).unwrap();
        let mut dec = Decoder::default();
        let mut got = Vec::new();
        for i in 0..wire.len() {
            dec.push(wire.slice(i..i + 1));
            got.extend(drain(&mut dec));
        }
        assert_eq!(got.len(), 1);
        let f: AudioFrame = decode(got.remove(0)).unwrap();
        assert_eq!(f, frame(9));
    }

    #[test]
    fn whole_message_in_one_chunk_is_zero_copy() {
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&encode(&frame(1)).unwrap());
        wire.extend_from_slice(&encode(&frame(2)).unwrap());
        let chunk = wire.freeze();
        let range = chunk.as_ptr() as usize..chunk.as_ptr() as usize + chunk.len();
        let mut dec = Decoder::default();
        dec.push(chunk.clone());
        for m in drain(&mut dec) {
            let f: AudioFrame = decode(m).unwrap();
            let p = f.audio_data.as_ptr() as usize;
            assert!(
                range.contains(&p) && range.contains(&(p + f.audio_data.len() - 1)),
                "audio_data must point into the received chunk"
            );
        }
    }

    #[test]
    fn compressed_flag_is_rejected() {
        let mut wire = BytesMut::from(&encode(&frame(1)).unwrap()[..]);
        wire[0] = 1;
        let mut dec = Decoder::default();
        dec.push(wire.freeze());
        let err = dec.next_message().unwrap_err();
        assert_eq!(err.code, Code::Internal);
        assert!(err.message.contains("compress"), "{err}");

        let mut dec = Decoder::default();
        dec.push(Bytes::from_static(&[7, 0, 0, 0, 0]));
        assert_eq!(dec.next_message().unwrap_err().code, Code::Internal);
    }

    #[test]
    fn oversize_is_resource_exhausted_even_before_the_body_arrives() {
        let mut dec = Decoder::new(100);
        dec.push(Bytes::from_static(&[0, 0, 0, 0, 101, 1, 2]));
        assert_eq!(
            dec.next_message().unwrap_err().code,
            Code::ResourceExhausted
        );

        // header split across chunks
        let mut dec = Decoder::new(100);
        dec.push(Bytes::from_static(&[0, 0xFF]));
        assert!(dec.next_message().unwrap().is_none());
        dec.push(Bytes::from_static(&[0xFF, 0xFF, 0xFF]));
        assert_eq!(
            dec.next_message().unwrap_err().code,
            Code::ResourceExhausted
        );

        // exactly at the limit is fine
        let mut dec = Decoder::new(3);
        dec.push(Bytes::from_static(&[0, 0, 0, 0, 3, 1, 2, 3]));
        assert_eq!(
            dec.next_message().unwrap().unwrap(),
            Bytes::from_static(&[1, 2, 3])
        );
    }

    #[test]
    fn truncated_stream_is_an_error() {
        let wire = encode(&frame(1)).unwrap();
        for cut in [1, HEADER_LEN, wire.len() - 1] {
            let mut dec = Decoder::default();
            dec.push(wire.slice(..cut));
            assert!(dec.next_message().unwrap().is_none());
            assert_eq!(dec.finish().unwrap_err().code, Code::Internal);
        }
        Decoder::default().finish().unwrap();
    }

    #[test]
    fn push_without_drain_is_still_correct() {
        let a = encode(&frame(1)).unwrap();
        let b = encode(&frame(2)).unwrap();
        let mut dec = Decoder::default();
        dec.push(a);
        dec.push(b);
        let got = drain(&mut dec);
        assert_eq!(got.len(), 2);
        let f: AudioFrame = decode(got[1].clone()).unwrap();
        assert_eq!(f.sequence_number, 2);
    }

    #[test]
    fn push_without_drain_of_a_chunk_holding_several_messages() {
        // Found by fuzz/fuzz_targets/grpc_codec.rs: the folded chunk held more than one
        // message, so `total - partial.len()` underflowed (a panic with overflow checks; in
        // release the messages came out merged into one).
        let mut two = BytesMut::new();
        two.extend_from_slice(&encode(&frame(1)).unwrap());
        two.extend_from_slice(&encode(&frame(2)).unwrap());
        let third = encode(&frame(3)).unwrap();
        for cut in [0, 3, HEADER_LEN + 7] {
            let mut dec = Decoder::default();
            let mut first = two.clone();
            first.extend_from_slice(&third[..cut]);
            dec.push(first.freeze());
            dec.push(third.slice(cut..));
            let got = drain(&mut dec);
            assert_eq!(got.len(), 3, "cut {cut}");
            for (i, m) in got.into_iter().enumerate() {
                let f: AudioFrame = decode(m).unwrap();
                assert_eq!(f, frame(i as i64 + 1));
            }
            dec.finish().unwrap();
        }
    }

    #[test]
    fn garbage_payload_is_an_error_not_a_panic() {
        let r: Result<AudioFrame, _> = decode(Bytes::from_static(&[0xFF, 0xFF, 0xFF]));
        assert_eq!(r.unwrap_err().code, Code::Internal);
    }
}
