//! A session's outgoing queue: what the session has decided to send and the connection's
//! writer has not written yet.
//!
//! The queue holds `Bytes` only (events, JSON frames, binary headers carved from the core's
//! arena, and the worker's PCM itself), so the writer hands them to io_uring's `writev`
//! without copying. A client that stops reading would let the queue grow without bound while
//! realtime audio keeps coming; past [`MAX_QUEUED_BYTES`] the client is cut off.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::gateway::metrics::FrameLateness;
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

/// Bytes queued for all the clients of one core, against the core's share of
/// `--max-queued-output-bytes`. Past the limit `over` wakes the listener's guard, which drops
/// the client with the most unread output first.
#[derive(Default)]
pub struct Budget {
    queued: Cell<usize>,
    /// 0 = no limit.
    limit: usize,
    /// Woken when `queued` passes `limit`.
    pub over: Notify,
}

impl Budget {
    /// A budget of `limit` bytes (0 = no limit).
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }

    /// Bytes queued for the core's clients.
    pub fn queued(&self) -> usize {
        self.queued.get()
    }

    /// True while the core's clients hold more than the limit.
    pub fn exceeded(&self) -> bool {
        self.limit > 0 && self.queued.get() > self.limit
    }

    fn add(&self, n: usize) {
        self.queued.set(self.queued.get() + n);
        if self.exceeded() {
            self.over.notify_one();
        }
    }

    fn sub(&self, n: usize) {
        self.queued.set(self.queued.get().saturating_sub(n));
    }
}

/// The queue between a session and its connection's writer.
#[derive(Default)]
pub struct Output {
    queue: RefCell<Queue>,
    ready: Notify,
    /// Woken once, when the connection's reader has stopped (the client closed or went away).
    reader_done: Notify,
    socket: RefCell<Option<Rc<crate::gateway::wire::Wire>>>,
    budget: Rc<Budget>,
    /// The slot of the oldest paced audio frame the writer has not taken yet.
    oldest_slot: Cell<Option<Instant>>,
    /// Where the lateness of paced frames is recorded (the histogram, this core's index).
    lateness: Option<(Arc<FrameLateness>, usize)>,
}

impl Output {
    /// An output counted against the core's `budget`.
    pub fn new(budget: Rc<Budget>) -> Self {
        Self {
            budget,
            ..Self::default()
        }
    }

    /// Records in `lateness` (as core `core`) how late paced frames leave: measured when the
    /// writer takes them for `writev`, against their slot.
    ///
    /// Why here and not when the pacer releases a frame: between the two the frame waits for
    /// the writer task, which runs after every task woken before it. When thousands of
    /// sessions on the core close at once, that wait is where a client's gap comes from, and
    /// a histogram observed at the pacer said "on time".
    pub fn with_lateness(mut self, lateness: Arc<FrameLateness>, core: usize) -> Self {
        self.lateness = Some((lateness, core));
        self
    }

    /// Gives the output its socket, so it can cut off a client that stops reading.
    pub fn attach_socket(&self, socket: Rc<crate::gateway::wire::Wire>) {
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

    /// Queues a paced audio message whose slot was `slot`; its lateness is recorded when the
    /// writer takes it (one observation per write: the oldest paced frame in it).
    pub fn push_paced_audio(&self, chunks: AudioChunks, slot: Instant) -> Pushed {
        if self.oldest_slot.get().is_none() {
            self.oldest_slot.set(Some(slot));
        }
        self.push_audio(chunks)
    }

    fn push_all(&self, chunks: [Option<Bytes>; 2]) -> Pushed {
        let overflow = {
            let mut q = self.queue.borrow_mut();
            if q.dead || q.closing {
                return Pushed::Ok;
            }
            let before = q.bytes;
            for c in chunks.into_iter().flatten() {
                q.bytes += c.len();
                q.chunks.push_back(c);
            }
            self.budget.add(q.bytes - before);
            q.bytes > MAX_QUEUED_BYTES
        };
        if overflow {
            self.cut_off();
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
        if n > 0 {
            if let Some(slot) = self.oldest_slot.take() {
                if let Some((histogram, core)) = &self.lateness {
                    histogram.observe(*core, Instant::now().saturating_duration_since(slot));
                }
            }
        }
        let taken: usize = batch[start..].iter().map(Bytes::len).sum();
        let taken = taken.min(q.bytes);
        q.bytes -= taken;
        self.budget.sub(taken);
        batch.is_empty() && q.closing
    }

    /// The connection's reader has stopped: a writer lingering for the client's close can go.
    pub fn reader_done(&self) {
        self.reader_done.notify_one();
    }

    /// Waits until [`Self::reader_done`].
    pub async fn reader_stopped(&self) {
        self.reader_done.notified().await
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
        self.budget.sub(q.bytes);
        q.bytes = 0;
        drop(q);
        self.ready.notify_one();
    }

    /// Cuts the client off (it is not reading and the core's clients together hold too
    /// much): drop the queue and shut the socket down.
    pub fn cut_off(&self) {
        self.dead();
        if let Some(socket) = self.socket.borrow().as_ref() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
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
    fn a_paced_frame_s_lateness_is_taken_when_the_writer_takes_it() {
        // The frame left the pacer on time, but the writer only took it 80 ms after its slot
        // (the core was busy with other tasks): the histogram must say 80 ms, not 0.
        let m = crate::gateway::metrics::Metrics::default();
        let out = Output::default().with_lateness(m.frame_lateness.clone(), 0);
        let slot = Instant::now() - std::time::Duration::from_millis(80);
        let frame = || AudioChunks {
            head: Bytes::from_static(b"h"),
            pcm: Some(Bytes::from_static(b"pcm")),
        };
        out.push_paced_audio(frame(), slot);
        out.push_paced_audio(frame(), slot + std::time::Duration::from_millis(20));
        let mut batch = Vec::new();
        out.take(&mut batch, 64);
        assert_eq!(batch.len(), 4);
        let text = m.render();
        // One observation per write, in the (0.05, 0.1] bucket.
        assert!(
            text.contains("frame_lateness_seconds_bucket{le=\"0.05\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("frame_lateness_seconds_bucket{le=\"0.1\"} 1"),
            "{text}"
        );
        // Nothing new queued: the next take records nothing.
        out.take(&mut batch, 64);
        let text = m.render();
        assert!(text.contains("frame_lateness_seconds_count 1"), "{text}");
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

    #[test]
    fn the_core_budget_counts_every_session_and_signals_once_over() {
        let budget = Rc::new(Budget::new(100));
        let a = Output::new(budget.clone());
        let b = Output::new(budget.clone());
        a.push(Bytes::from(vec![0u8; 60]));
        assert!(!budget.exceeded());
        b.push(Bytes::from(vec![0u8; 60]));
        assert!(budget.exceeded());
        assert_eq!(budget.queued(), 120);
        let mut batch = Vec::new();
        a.take(&mut batch, 8);
        assert_eq!(budget.queued(), 60);
        b.dead();
        assert_eq!(budget.queued(), 0);
    }
}
