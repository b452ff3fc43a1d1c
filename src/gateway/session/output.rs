//! A session's outgoing queue: what the session has decided to send and the connection's
//! writer has not written yet.
//!
//! The queue holds `Bytes` only (events, JSON frames, binary headers carved from the core's
//! arena, and the worker's PCM itself), so the writer hands them to io_uring's `writev`
//! without copying. A client that stops reading would let the queue grow without bound while
//! realtime audio keeps coming; past [`MAX_QUEUED_BYTES`] the client is cut off.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::protocol::AudioChunks;

/// Most bytes queued for a client before it counts as not reading and is dropped: ~20 s of
/// JSON audio, far beyond any network hiccup a live listener survives.
pub const MAX_QUEUED_BYTES: usize = 4 << 20;

#[derive(Default)]
struct Queue {
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks`.
    bytes: usize,
    /// No more data will be queued; the writer closes the socket once drained.
    closing: bool,
    /// The socket is gone; drop whatever is queued.
    dead: bool,
}

/// What [`Output::push`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued (or dropped because the output is closing or dead).
    Ok,
    /// The queue passed [`MAX_QUEUED_BYTES`] with this push: the output is now dead and the
    /// caller should cut the client off.
    Overflow,
}

/// The queue between a session and its connection's writer.
#[derive(Default)]
pub struct Output {
    queue: RefCell<Queue>,
    ready: Notify,
    socket: RefCell<Option<Rc<tokio_uring::net::TcpStream>>>,
}

impl Output {
    /// Gives the output its socket, so it can cut off a client that stops reading.
    pub fn attach_socket(&self, socket: Rc<tokio_uring::net::TcpStream>) {
        *self.socket.borrow_mut() = Some(socket);
    }

    /// Queues one chunk for the writer.
    pub fn push(&self, chunk: Bytes) -> Pushed {
        self.push_all([Some(chunk), None])
    }

    /// Queues an audio message (a head and, in binary mode, the PCM).
    pub fn push_audio(&self, chunks: AudioChunks) -> Pushed {
        self.push_all([Some(chunks.head), chunks.pcm])
    }

    fn push_all(&self, chunks: [Option<Bytes>; 2]) -> Pushed {
        let overflow = {
            let mut q = self.queue.borrow_mut();
            if q.dead || q.closing {
                return Pushed::Ok;
            }
            for c in chunks.into_iter().flatten() {
                q.bytes += c.len();
                q.chunks.push_back(c);
            }
            q.bytes > MAX_QUEUED_BYTES
        };
        if overflow {
            self.dead();
            if let Some(socket) = self.socket.borrow().as_ref() {
                let _ = socket.shutdown(std::net::Shutdown::Both);
            }
        }
        self.ready.notify_one();
        if overflow {
            Pushed::Overflow
        } else {
            Pushed::Ok
        }
    }

    /// Bytes waiting for the writer.
    pub fn queued_bytes(&self) -> usize {
        self.queue.borrow().bytes
    }

    /// True once [`Self::finish`] ran (a close has been queued, or the client closed).
    pub fn is_closing(&self) -> bool {
        self.queue.borrow().closing
    }

    /// Moves up to `max` queued chunks into `batch`; returns true when the writer should
    /// close the socket (closing and drained, or dead).
    pub fn take(&self, batch: &mut Vec<Bytes>, max: usize) -> bool {
        let mut q = self.queue.borrow_mut();
        if q.dead {
            return true;
        }
        let n = q.chunks.len().min(max);
        let start = batch.len();
        batch.extend(q.chunks.drain(..n));
        let taken: usize = batch[start..].iter().map(Bytes::len).sum();
        q.bytes -= taken.min(q.bytes);
        batch.is_empty() && q.closing
    }

    /// Waits until output is queued.
    pub async fn ready(&self) {
        self.ready.notified().await
    }

    /// The socket failed: stop queueing output.
    pub fn dead(&self) {
        let mut q = self.queue.borrow_mut();
        q.dead = true;
        q.chunks.clear();
        q.bytes = 0;
        drop(q);
        self.ready.notify_one();
    }

    /// No more output: the writer closes the socket once the queue is drained.
    pub fn finish(&self) {
        self.queue.borrow_mut().closing = true;
        self.ready.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_order_accounting_and_close() {
        let out = Output::default();
        assert_eq!(out.push(Bytes::from_static(b"ab")), Pushed::Ok);
        assert_eq!(out.push(Bytes::from_static(b"cde")), Pushed::Ok);
        assert_eq!(out.queued_bytes(), 5);
        let mut batch = Vec::new();
        assert!(!out.take(&mut batch, 1));
        assert_eq!(batch, vec![Bytes::from_static(b"ab")]);
        assert_eq!(out.queued_bytes(), 3);
        out.finish();
        assert_eq!(out.push(Bytes::from_static(b"late")), Pushed::Ok);
        batch.clear();
        assert!(!out.take(&mut batch, 8), "not drained yet");
        batch.clear();
        assert!(out.take(&mut batch, 8), "drained and closing");
    }

    #[test]
    fn a_client_that_does_not_read_overflows_once() {
        let out = Output::default();
        let block = Bytes::from(vec![0u8; 1 << 20]);
        for _ in 0..4 {
            assert_eq!(out.push(block.clone()), Pushed::Ok);
        }
        assert_eq!(out.push(block.clone()), Pushed::Overflow);
        assert_eq!(out.queued_bytes(), 0, "dropped");
        assert_eq!(out.push(block), Pushed::Ok, "dead output swallows");
        assert!(out.take(&mut Vec::new(), 8));
    }
}
