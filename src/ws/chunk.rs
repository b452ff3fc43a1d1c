//! Outgoing data as the writer hands it to `writev`.
//!
//! Most of what a session sends is either shared bytes (JSON frames, the PCM `Bytes` received
//! from the worker) or a tiny header (a binary audio frame's 12 bytes). Storing the header
//! inline in the queue entry, instead of in its own heap buffer, is what makes forwarding a
//! binary frame allocation-free: the queue and the iovec array are reused vectors, and the
//! PCM is the worker's buffer.

use bytes::{Buf, Bytes};

/// Largest inline header: a 4-byte WebSocket header plus our 8-byte audio header, with room.
pub const INLINE_CAP: usize = 14;

/// One piece of output.
#[derive(Debug, Clone)]
pub enum Chunk {
    /// Reference-counted bytes (no copy).
    Shared(Bytes),
    /// A few bytes stored in place; `start..len` is still to be written.
    Inline {
        buf: [u8; INLINE_CAP],
        start: u8,
        len: u8,
    },
}

impl Chunk {
    /// An inline chunk; `None` if `data` is longer than [`INLINE_CAP`].
    pub fn inline(data: &[u8]) -> Option<Chunk> {
        if data.len() > INLINE_CAP {
            return None;
        }
        let mut buf = [0u8; INLINE_CAP];
        buf[..data.len()].copy_from_slice(data);
        Some(Chunk::Inline {
            buf,
            start: 0,
            len: data.len() as u8,
        })
    }

    /// Bytes still to be written.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Chunk::Shared(b) => b,
            Chunk::Inline { buf, start, len } => &buf[*start as usize..*len as usize],
        }
    }

    /// Bytes still to be written.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// True when nothing is left to write.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the first `n` bytes (after a partial write).
    pub fn advance(&mut self, n: usize) {
        match self {
            Chunk::Shared(b) => b.advance(n.min(b.len())),
            Chunk::Inline { start, len, .. } => {
                *start = (*start as usize + n).min(*len as usize) as u8;
            }
        }
    }
}

impl From<Bytes> for Chunk {
    fn from(b: Bytes) -> Self {
        Chunk::Shared(b)
    }
}

// SAFETY: the pointer is into the chunk itself (inline) or its `Bytes`; both stay valid and
// unmoved while the chunk sits in the `Vec` that io_uring's writev owns during the operation
// (moving a `Vec` does not move its elements). Length is exactly the initialised bytes.
unsafe impl tokio_uring::buf::IoBuf for Chunk {
    fn stable_ptr(&self) -> *const u8 {
        self.as_slice().as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
    fn bytes_total(&self) -> usize {
        self.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_advance_and_limits() {
        let mut c = Chunk::inline(b"hello").unwrap();
        assert_eq!(c.as_slice(), b"hello");
        c.advance(2);
        assert_eq!(c.as_slice(), b"llo");
        c.advance(10);
        assert!(c.is_empty());
        assert!(Chunk::inline(&[0; INLINE_CAP + 1]).is_none());
    }

    #[test]
    fn shared_advance_keeps_the_buffer() {
        let b = Bytes::from(vec![1u8, 2, 3, 4]);
        let mut c = Chunk::from(b.clone());
        c.advance(1);
        assert_eq!(c.as_slice().as_ptr(), b[1..].as_ptr());
    }
}
