//! A session's outgoing queue: what the session has decided to send and the connection's
//! writer has not written yet.
//!
//! The queue holds `Bytes` only (events, JSON frames, binary headers carved from the core's
//! arena, and the worker's PCM itself), so the writer hands them to io_uring's `writev`
//! without copying. A client that stops reading would let the queue grow without bound while
//! realtime audio keeps coming; past [`MAX_QUEUED_BYTES`] the client is cut off.
//!
//! Two writers drain it, never both at once ([`Writing`]): the core's batch sender takes what
//! a pacer tick queued and sends it with the tick's other frames in one io_uring submission
//! (see [`crate::gateway::batch_send`]); the connection's writer task writes everything else
//! (events, TLS, what a short send left). During a tick the output is *held*: pushes don't wake
//! the writer task, so a frame the batch sender takes costs no task wake-up at all.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::gateway::batch_send::{BatchSender, Completion, MAX_CHUNKS};

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

/// Who is writing the socket now (one at a time, so bytes never interleave).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Writing {
    #[default]
    Nobody,
    /// The writer task has a write in flight.
    Task,
    /// The core's batch sender has a send in flight.
    Batch,
}

/// The core's batch sender, as outputs use it.
pub type Sender = BatchSender<Rc<Output>>;

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
    writing: Cell<Writing>,
    /// Inside a pacer tick: pushes don't wake the writer task (see the module documentation).
    held: Cell<bool>,
    /// Something was queued while held.
    pushed_while_held: Cell<bool>,
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
        if self.held.get() {
            self.pushed_while_held.set(true);
        } else {
            self.ready.notify_one();
        }
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

    /// Starts a pacer tick's hold: until [`Self::release`], pushes don't wake the writer task.
    pub fn hold(&self) {
        self.held.set(true);
    }

    /// Ends the hold; true when something was queued during it (the tick then hands the
    /// output to [`Self::send_batched`]).
    pub fn release(&self) -> bool {
        self.held.set(false);
        self.pushed_while_held.replace(false)
    }

    /// True while the batch sender has a send of this output in flight: the writer task
    /// waits (it is woken when the send completes and something is left to write).
    pub fn batch_in_flight(&self) -> bool {
        self.writing.get() == Writing::Batch
    }

    /// The writer task starts (`true`) or ends a write.
    pub fn task_writing(&self, on: bool) {
        self.writing
            .set(if on { Writing::Task } else { Writing::Nobody });
    }

    /// Hands what is queued to the core's batch sender, which sends it at the end of the
    /// tick; wakes the writer task instead when the batch sender can't take it (the task is
    /// writing, the connection is TLS). True when a send was queued.
    pub fn send_batched(self: &Rc<Self>, sender: &Sender) -> bool {
        let fd = self.socket.borrow().as_ref().and_then(|s| s.plain_fd());
        let Some(fd) = fd.filter(|_| self.writing.get() == Writing::Nobody) else {
            self.ready.notify_one();
            return false;
        };
        let mut chunks = sender.chunk_vec();
        let done = self.take(&mut chunks, MAX_CHUNKS);
        if chunks.is_empty() {
            sender.recycle(chunks);
            if done {
                self.ready.notify_one();
            }
            return false;
        }
        // More queued than one send carries: `batch_done` wakes the writer task for the rest.
        match sender.push(fd, chunks, self.clone()) {
            Ok(()) => {
                self.writing.set(Writing::Batch);
                true
            }
            Err((e, chunks)) => {
                tracing::debug!(error = %e, "batch send refused; the writer task takes over");
                self.requeue_front(chunks, 0);
                self.ready.notify_one();
                false
            }
        }
    }

    /// A batched send of this output completed: requeues what it didn't send (a short send),
    /// and wakes the writer task if there is anything for it to do.
    pub fn batch_done(&self, done: Completion<Rc<Output>>, sender: &Sender) {
        self.writing.set(Writing::Nobody);
        let Completion { chunks, result, .. } = done;
        match result {
            Ok(n) => {
                let total: usize = chunks.iter().map(Bytes::len).sum();
                if n < total {
                    self.requeue_front(chunks.clone(), n);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "batched send failed");
                self.dead();
                if let Some(socket) = self.socket.borrow().as_ref() {
                    let _ = socket.shutdown(std::net::Shutdown::Both);
                }
            }
        }
        sender.recycle(chunks);
        let q = self.queue.borrow();
        let work = !q.chunks.is_empty() || q.closing || q.dead;
        drop(q);
        if work {
            self.ready.notify_one();
        }
    }

    /// Puts back, at the front of the queue, what of `chunks` is left after the first `sent`
    /// bytes of them were written.
    fn requeue_front(&self, mut chunks: Vec<Bytes>, mut sent: usize) {
        let mut q = self.queue.borrow_mut();
        if q.dead {
            return;
        }
        let mut skip = 0;
        for c in chunks.iter_mut() {
            if sent >= c.len() {
                sent -= c.len();
                skip += 1;
            } else {
                bytes::Buf::advance(c, sent);
                break;
            }
        }
        let mut back = 0;
        for c in chunks.drain(skip..).rev() {
            back += c.len();
            q.chunks.push_front(c);
        }
        q.bytes += back;
        self.budget.add(back);
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

    /// An output attached to a real socket, and the socket's peer.
    async fn attached() -> (Rc<Output>, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = std::thread::spawn(move || listener.accept().unwrap().0);
        let tcp = tokio_uring::net::TcpStream::connect(addr).await.unwrap();
        let peer = accept.join().unwrap();
        let out = Rc::new(Output::default());
        out.attach_socket(Rc::new(crate::gateway::wire::Wire::plain(tcp)));
        (out, peer)
    }

    fn frame(tag: u8) -> AudioChunks {
        AudioChunks {
            head: Bytes::from(vec![tag; 4]),
            pcm: Some(Bytes::from(vec![tag; 16])),
        }
    }

    #[test]
    fn a_tick_s_frames_go_out_through_the_batch_sender_in_order() {
        use std::io::Read as _;
        tokio_uring::start(async {
            let (out, mut peer) = attached().await;
            let sender = Sender::new().unwrap();
            out.hold();
            out.push_audio(frame(1));
            out.push_audio(frame(2));
            assert!(out.release(), "pushes during the hold are reported");
            assert!(!out.release(), "once");
            out.send_batched(&sender);
            assert!(out.batch_in_flight());
            assert_eq!(out.queued_bytes(), 0);
            sender.submit().unwrap();
            while sender.in_flight() > 0 {
                sender.reap(|c| c.owner.clone().batch_done(c, &sender));
                if sender.in_flight() > 0 {
                    sender.reap_later().await.unwrap();
                }
            }
            assert!(!out.batch_in_flight());
            let mut got = [0u8; 40];
            peer.read_exact(&mut got).unwrap();
            assert_eq!(&got[..20], &[1u8; 20]);
            assert_eq!(&got[20..], &[2u8; 20]);
        });
    }

    #[test]
    fn the_batch_sender_leaves_a_socket_the_writer_task_is_writing() {
        tokio_uring::start(async {
            let (out, _peer) = attached().await;
            let sender = Sender::new().unwrap();
            out.task_writing(true);
            out.push_audio(frame(1));
            out.send_batched(&sender);
            assert_eq!(sender.in_flight(), 0);
            assert!(!out.batch_in_flight());
            assert_eq!(out.queued_bytes(), 20, "left for the writer task");
        });
    }

    #[test]
    fn a_short_batched_send_requeues_the_rest_in_order_and_wakes_the_writer() {
        tokio_uring::start(async {
            let out = Rc::new(Output::default());
            let sender = Sender::new().unwrap();
            out.push(Bytes::from_static(b"later"));
            let chunks = vec![
                Bytes::from_static(b"head"),
                Bytes::from_static(b"pcm-bytes"),
            ];
            // The kernel took "head" and "pcm": "-bytes" goes back in front of "later".
            out.batch_done(
                Completion {
                    owner: out.clone(),
                    chunks,
                    result: Ok(7),
                },
                &sender,
            );
            let mut batch = Vec::new();
            out.take(&mut batch, 8);
            assert_eq!(
                batch,
                vec![Bytes::from_static(b"-bytes"), Bytes::from_static(b"later")]
            );
            // The writer task was woken (a permit is stored).
            tokio::time::timeout(std::time::Duration::from_secs(5), out.ready())
                .await
                .expect("the writer task must be woken to write the rest");
        });
    }

    #[test]
    fn a_failed_batched_send_kills_the_output() {
        tokio_uring::start(async {
            let out = Rc::new(Output::default());
            let sender = Sender::new().unwrap();
            out.push(Bytes::from_static(b"queued"));
            out.batch_done(
                Completion {
                    owner: out.clone(),
                    chunks: vec![Bytes::from_static(b"x")],
                    result: Err(std::io::ErrorKind::BrokenPipe.into()),
                },
                &sender,
            );
            assert_eq!(out.queued_bytes(), 0);
            assert!(out.take(&mut Vec::new(), 8), "the writer task closes");
        });
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
