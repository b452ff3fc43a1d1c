//! Inbound side: tungstenite's protocol state machine fed from an in-memory buffer.

use std::io::{self, Read, Write};

use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
use tungstenite::Message;

/// In-memory stream handed to tungstenite: reads drain what io_uring received (or report
/// `WouldBlock` when it is empty), writes (pongs, close replies) collect in `tx` for the
/// session's writer to send.
#[derive(Default)]
pub struct Buffers {
    rx: Vec<u8>,
    rx_pos: usize,
    /// Bytes tungstenite produced (control-frame replies), taken by the connection.
    pub tx: Vec<u8>,
}

impl Read for Buffers {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = &self.rx[self.rx_pos..];
        if avail.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.rx_pos += n;
        if self.rx_pos == self.rx.len() {
            self.rx.clear();
            self.rx_pos = 0;
        }
        Ok(n)
    }
}

impl Write for Buffers {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.tx.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the connection loop should do after feeding bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// A complete client message.
    Message(Message),
    /// Everything received so far is consumed; read more from the socket.
    NeedMore,
    /// The client closed (close frame) or the protocol state ended.
    Closed,
    /// A WebSocket-level violation: send a close frame with this code and stop.
    Violation(u16, String),
}

/// Client-to-server WebSocket decoder.
pub struct Decoder {
    ctx: WebSocketContext,
    buffers: Buffers,
}

impl Decoder {
    /// `max_message` bounds a (reassembled) message; beyond it the client gets close 1009.
    /// The read buffer is kept small (4 KiB) because thousands of mostly idle sessions share
    /// the core; tungstenite's 128 KiB default would dominate a session's memory.
    pub fn new(max_message: usize, already_read: Vec<u8>) -> Self {
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        let ctx = WebSocketContext::new(Role::Server, Some(config));
        let buffers = Buffers {
            rx: already_read,
            ..Buffers::default()
        };
        Self { ctx, buffers }
    }

    /// Appends bytes read from the socket.
    pub fn feed(&mut self, data: &[u8]) {
        self.buffers.rx.extend_from_slice(data);
    }

    /// Decodes the next message, if a complete one is buffered.
    pub fn next_message(&mut self) -> Inbound {
        use tungstenite::error::{CapacityError, Error};
        match self.ctx.read(&mut self.buffers) {
            Ok(Message::Close(_)) => Inbound::Closed,
            Ok(m) => Inbound::Message(m),
            Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Inbound::NeedMore,
            Err(Error::ConnectionClosed) | Err(Error::AlreadyClosed) => Inbound::Closed,
            Err(Error::Capacity(CapacityError::MessageTooLong { size, max_size })) => {
                Inbound::Violation(1009, format!("message of {size} bytes exceeds {max_size}"))
            }
            Err(Error::Capacity(e)) => Inbound::Violation(1009, e.to_string()),
            Err(Error::Utf8(e)) => Inbound::Violation(1007, format!("invalid UTF-8: {e}")),
            Err(e) => Inbound::Violation(1002, e.to_string()),
        }
    }

    /// Control-frame replies (pong, close echo) that tungstenite queued; empty most of the time.
    pub fn take_replies(&mut self) -> Option<Vec<u8>> {
        // Flushing moves tungstenite's queued frames into `tx`; errors here mean the
        // context is closed, in which case there is nothing left to send.
        let _ = self.ctx.flush(&mut self.buffers);
        if self.buffers.tx.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.buffers.tx))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a masked client frame.
    fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![0x80 | opcode];
        if payload.len() < 126 {
            out.push(0x80 | payload.len() as u8);
        } else {
            out.push(0x80 | 126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn decodes_text_split_across_reads() {
        let mut d = Decoder::new(1 << 20, Vec::new());
        let f = client_frame(1, b"{\"type\":\"text\"}");
        d.feed(&f[..3]);
        assert_eq!(d.next_message(), Inbound::NeedMore);
        d.feed(&f[3..]);
        match d.next_message() {
            Inbound::Message(Message::Text(t)) => assert_eq!(t.as_str(), "{\"type\":\"text\"}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(d.next_message(), Inbound::NeedMore);
    }

    #[test]
    fn oversized_message_is_1009() {
        let mut d = Decoder::new(100, Vec::new());
        d.feed(&client_frame(1, &[b'a'; 200]));
        assert!(matches!(d.next_message(), Inbound::Violation(1009, _)));
    }

    #[test]
    fn invalid_utf8_is_1007() {
        let mut d = Decoder::new(100, Vec::new());
        d.feed(&client_frame(1, &[0xff, 0xfe]));
        assert!(matches!(d.next_message(), Inbound::Violation(1007, _)));
    }

    #[test]
    fn ping_queues_a_pong() {
        let mut d = Decoder::new(100, Vec::new());
        d.feed(&client_frame(9, b"hi"));
        assert!(matches!(
            d.next_message(),
            Inbound::Message(Message::Ping(_))
        ));
        let reply = d.take_replies().unwrap();
        assert_eq!(reply[0], 0x8A);
    }

    #[test]
    fn unmasked_client_frame_is_a_violation() {
        let mut d = Decoder::new(100, Vec::new());
        d.feed(&[0x81, 0x02, b'h', b'i']);
        assert!(matches!(d.next_message(), Inbound::Violation(1002, _)));
    }
}
