//! Server-to-client WebSocket framing (RFC 6455 §5.2). Server frames are never masked, so a
//! frame is a 2–10 byte header followed by the payload; building it by hand lets the payload
//! stay a separate `Bytes` (no copy) and lets JSON audio be encoded straight into the frame.

use bytes::{BufMut, Bytes, BytesMut};

/// Frame opcodes the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
}

/// Length of the header for a payload of `len` bytes.
pub fn header_len(len: usize) -> usize {
    if len < 126 {
        2
    } else if len <= u16::MAX as usize {
        4
    } else {
        10
    }
}

/// Appends a final (FIN) unmasked frame header for a payload of `len` bytes.
pub fn put_header(buf: &mut BytesMut, opcode: Opcode, len: usize) {
    buf.put_u8(0x80 | opcode as u8);
    if len < 126 {
        buf.put_u8(len as u8);
    } else if len <= u16::MAX as usize {
        buf.put_u8(126);
        buf.put_u16(len as u16);
    } else {
        buf.put_u8(127);
        buf.put_u64(len as u64);
    }
}

/// Writes a final unmasked frame header into `out` (at least 10 bytes); returns its length.
pub fn write_header(out: &mut [u8], opcode: Opcode, len: usize) -> usize {
    out[0] = 0x80 | opcode as u8;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// A complete text frame carrying `payload` (already valid UTF-8 JSON).
pub fn text(payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(header_len(payload.len()) + payload.len());
    put_header(&mut buf, Opcode::Text, payload.len());
    buf.put_slice(payload);
    buf.freeze()
}

/// A close frame with a status code and a short reason (truncated to fit the 125-byte limit of
/// control frames).
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut reason = reason.as_bytes();
    if reason.len() > 123 {
        reason = &reason[..123];
    }
    let mut buf = BytesMut::with_capacity(4 + reason.len());
    put_header(&mut buf, Opcode::Close, 2 + reason.len());
    buf.put_u16(code);
    buf.put_slice(reason);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses our frames back with tungstenite (an independent implementation).
    fn parse(bytes: &[u8]) -> tungstenite::protocol::frame::Frame {
        let mut cursor = std::io::Cursor::new(bytes.to_vec());
        let (header, len) = tungstenite::protocol::frame::FrameHeader::parse(&mut cursor)
            .unwrap()
            .unwrap();
        let start = cursor.position() as usize;
        assert_eq!(bytes.len() - start, len as usize);
        tungstenite::protocol::frame::Frame::from_payload(header, bytes[start..].to_vec().into())
    }

    #[test]
    fn header_lengths_switch_at_126_and_65536() {
        for (len, expect) in [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let mut b = BytesMut::new();
            put_header(&mut b, Opcode::Binary, len);
            assert_eq!(b.len(), expect, "len {len}");
            assert_eq!(header_len(len), expect);
            let mut arr = [0u8; 10];
            let n = write_header(&mut arr, Opcode::Binary, len);
            assert_eq!(&arr[..n], &b[..], "write_header == put_header for {len}");
        }
    }

    #[test]
    fn text_frame_round_trips_through_tungstenite() {
        for size in [0usize, 5, 125, 126, 3000, 70_000] {
            let payload = "x".repeat(size);
            let f = parse(&text(payload.as_bytes()));
            assert!(f.header().is_final);
            assert_eq!(
                f.header().opcode,
                tungstenite::protocol::frame::coding::OpCode::Data(
                    tungstenite::protocol::frame::coding::Data::Text
                )
            );
            assert_eq!(f.payload().len(), size);
        }
    }

    #[test]
    fn close_frame_carries_code_and_bounded_reason() {
        let f = parse(&close(1009, &"r".repeat(300)));
        let p = f.payload();
        assert_eq!(u16::from_be_bytes([p[0], p[1]]), 1009);
        assert!(p.len() <= 125);
    }
}
