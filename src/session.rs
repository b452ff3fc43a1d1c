//! One client session: its utterance queue, playback state and pacing.
//!
//! A session lives its whole life on the core that accepted it. Everything here runs on that
//! core's single thread, so state is `RefCell`, not locked. Three kinds of events drive it:
//! client messages (from the connection's reader), audio frames (from the synthesis task
//! reading the worker's gRPC stream) and pacer wake-ups. Each event ends in [`Session::pump`],
//! which sends every frame that is due *now*; a frame that is not yet due is left in the
//! queue with a pacer entry at its slot. Because frames wait in the session's own queue until
//! their slot, PAUSE and STOP act in the same loop turn that reads them: nothing more leaves.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::audio::FRAME_MS;
use crate::config::{BargeIn, Pacing};
use crate::grpc::RequestSink;
use crate::proto;
use crate::protocol::{self, ClientMessage, Command, ErrorCode, Format};
use crate::runtime::Core;
use crate::upstream;
use crate::vad::{Vad, VadEvent};
use crate::ws::chunk::Chunk;

/// Most bytes queued for a client before it counts as not reading and is dropped: ~20 s of
/// JSON audio, far beyond any network hiccup a live listener survives.
pub const MAX_QUEUED_BYTES: usize = 4 << 20;

/// Most frames buffered ahead of playback before the synthesis task stops reading the
/// worker's stream (10 s of audio). HTTP/2 flow control then holds the worker back, so a
/// worker far faster than real time, or one that ignores PAUSE, can't grow a session's memory
/// without bound.
pub const MAX_AHEAD_FRAMES: usize = 500;

/// Length of one frame's slot.
const FRAME: Duration = Duration::from_millis(FRAME_MS as u64);

/// Per-session choices made at connect time (query parameters or server defaults).
#[derive(Debug, Clone)]
pub struct Options {
    pub format: Format,
    pub pacing: Pacing,
    pub model: String,
    /// Sample rate of the client's microphone audio (`?input_rate=`, default 16 kHz).
    pub input_rate: u32,
}

/// Text waiting for the current utterance to finish (utterances of a session play in order).
struct Pending {
    chunks: Vec<String>,
    closed: bool,
    received: Instant,
}

/// The utterance being synthesized and played.
struct Utterance {
    generation: u64,
    /// Frames received from the worker and not yet sent.
    frames: VecDeque<Bytes>,
    /// The worker ended the stream (`is_final` seen).
    worker_done: bool,
    /// The client has not sent `is_final:true` yet: more text chunks may come.
    text_open: bool,
    /// Request half of the worker stream, once open.
    sink: Option<RequestSink<proto::TextChunk>>,
    /// Chunks received before the worker stream opened.
    unsent: Vec<(String, bool)>,
    chunk_seq: i64,
    /// Frames sent to the client (the last sequence number used).
    sent: u32,
    /// Slot of frame `k` (0-based) is `anchor + k × 20 ms`.
    anchor: Option<Instant>,
    /// Pacer entry already waiting for this utterance.
    scheduled: Option<Instant>,
    task: Option<JoinHandle<()>>,
    received: Instant,
}

impl Utterance {
    fn due(&self, lead: Duration) -> Option<Instant> {
        self.anchor
            .map(|a| (a + FRAME * self.sent).checked_sub(lead).unwrap_or(a))
    }

    /// Forwards a text chunk to the worker, or keeps it until the stream is open.
    fn push_text(&mut self, session_id: &str, text: String, is_final: bool) {
        self.text_open = !is_final;
        match self.sink.as_mut() {
            Some(sink) => {
                self.chunk_seq += 1;
                let chunk = proto::TextChunk {
                    session_id: session_id.to_string(),
                    text,
                    is_final,
                    sequence_number: self.chunk_seq,
                };
                // A send error means the stream is gone; the synthesis task reports it.
                let _ = sink.send(&chunk);
                if is_final {
                    let _ = sink.finish();
                }
            }
            None => self.unsent.push((text, is_final)),
        }
    }

    /// Cancels the worker stream (dropping it resets the HTTP/2 stream).
    fn cancel(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.sink = None;
    }
}

#[derive(Default)]
struct State {
    paused: bool,
    pending: VecDeque<Pending>,
    current: Option<Utterance>,
    /// Worker chosen for this session, and whether StartSession succeeded on it.
    worker: Option<usize>,
    worker_session: bool,
    next_generation: u64,
    closed: bool,
    tasks: Vec<JoinHandle<()>>,
    control: Option<tokio::sync::mpsc::UnboundedSender<proto::ControlCommand>>,
}

/// Bytes waiting for the connection's writer.
#[derive(Default)]
struct Out {
    chunks: VecDeque<Chunk>,
    /// Bytes in `chunks`.
    bytes: usize,
    /// No more data will be queued; the writer closes the socket once drained.
    closing: bool,
    /// The socket is gone; drop whatever is queued.
    dead: bool,
}

/// A client session.
pub struct Session {
    pub key: usize,
    pub id: String,
    pub opts: Options,
    pub span: tracing::Span,
    core: Rc<Core>,
    state: RefCell<State>,
    out: RefCell<Out>,
    out_ready: Notify,
    /// Woken when playback drains the frame queue below [`MAX_AHEAD_FRAMES`].
    drained: Notify,
    socket: RefCell<Option<Rc<tokio_uring::net::TcpStream>>>,
    started: Instant,
    last_activity: std::cell::Cell<Instant>,
    /// Voice-activity detector over the client's microphone audio (barge-in).
    vad: RefCell<Vad>,
}

impl Session {
    pub fn new(key: usize, id: String, opts: Options, core: Rc<Core>) -> Self {
        let span = tracing::info_span!("session", id = %id, core = core.index);
        let now = Instant::now();
        let vad = Vad::new(opts.input_rate, core.shared.config.vad);
        Self {
            key,
            id,
            opts,
            vad: RefCell::new(vad),
            span,
            core,
            state: RefCell::new(State::default()),
            out: RefCell::new(Out::default()),
            out_ready: Notify::new(),
            drained: Notify::new(),
            socket: RefCell::new(None),
            started: now,
            last_activity: std::cell::Cell::new(now),
        }
    }

    // ----- output -------------------------------------------------------------------------

    /// Queues bytes for the client.
    pub fn send(&self, chunk: Bytes) {
        let mut out = self.out.borrow_mut();
        if out.dead || out.closing {
            return;
        }
        out.bytes += chunk.len();
        out.chunks.push_back(Chunk::Shared(chunk));
        self.after_queue(out);
    }

    /// Wakes the writer, or drops a client that stopped reading: its queue would otherwise
    /// grow without bound (realtime audio keeps coming) and eat memory every other session
    /// needs.
    fn after_queue(&self, out: std::cell::RefMut<'_, Out>) {
        let too_much = out.bytes > MAX_QUEUED_BYTES;
        drop(out);
        if too_much {
            tracing::warn!(parent: &self.span, limit = MAX_QUEUED_BYTES,
                "client is not reading its audio; dropping the connection");
            self.output_dead();
            if let Some(socket) = self.socket.borrow().as_ref() {
                let _ = socket.shutdown(std::net::Shutdown::Both);
            }
        }
        self.out_ready.notify_one();
    }

    /// Gives the session its socket, so it can cut off a client that stops reading.
    pub fn attach_socket(&self, socket: Rc<tokio_uring::net::TcpStream>) {
        *self.socket.borrow_mut() = Some(socket);
    }

    /// Queues a JSON event (session_start, interrupted, ...).
    pub fn send_event(&self, value: &serde_json::Value) {
        self.send(protocol::event(value));
    }

    /// The orchestrator configuration.
    pub fn config(&self) -> &crate::config::Config {
        &self.core.shared.config
    }

    /// Tells the client about bad input or a failure; the session carries on.
    pub fn send_error(&self, code: ErrorCode, message: &str) {
        if code == ErrorCode::InvalidMessage {
            self.core.shared.metrics.client_errors.inc();
        }
        self.send(protocol::error(code, message));
    }

    /// Moves up to `max` queued chunks into `batch`; returns true when the writer should
    /// close the socket (closing and drained, or dead).
    pub fn take_output(&self, batch: &mut Vec<Chunk>, max: usize) -> bool {
        let mut out = self.out.borrow_mut();
        if out.dead {
            return true;
        }
        let n = out.chunks.len().min(max);
        let start = batch.len();
        batch.extend(out.chunks.drain(..n));
        let taken: usize = batch[start..].iter().map(Chunk::len).sum();
        out.bytes -= taken.min(out.bytes);
        batch.is_empty() && out.closing
    }

    /// Waits until output is queued.
    pub async fn output_ready(&self) {
        self.out_ready.notified().await
    }

    /// The socket failed: stop queueing output.
    pub fn output_dead(&self) {
        let mut out = self.out.borrow_mut();
        out.dead = true;
        out.chunks.clear();
        out.bytes = 0;
    }

    /// Server-initiated end: `session_end`, a close frame, then the writer closes the socket.
    pub fn close_with(&self, reason: &str, close_code: u16) {
        if self.out.borrow().closing {
            return;
        }
        tracing::info!(parent: &self.span, reason, "closing session");
        self.send_event(&json!({"type": "session_end", "session_id": self.id, "reason": reason}));
        self.send(crate::ws::frame::close(close_code, reason));
        self.finish_output();
    }

    /// No more output: the writer closes the socket once the queue is drained.
    pub fn finish_output(&self) {
        self.out.borrow_mut().closing = true;
        self.out_ready.notify_one();
    }

    /// Time since the last client message, or zero while audio is in progress.
    pub fn idle_for(&self, now: Instant) -> Duration {
        let st = self.state.borrow();
        if st.current.is_some() || !st.pending.is_empty() {
            return Duration::ZERO;
        }
        now.saturating_duration_since(self.last_activity.get())
    }

    /// Age of the session.
    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    /// Remembers a task to abort when the session ends.
    pub fn own_task(&self, task: JoinHandle<()>) {
        self.state.borrow_mut().tasks.push(task);
    }

    // ----- client messages ----------------------------------------------------------------

    /// Handles one text message from the client.
    pub fn on_client_text(self: &Rc<Self>, raw: &str) {
        let now = Instant::now();
        self.last_activity.set(now);
        match protocol::parse(raw) {
            Ok(ClientMessage::Text { text, is_final }) => self.on_text(text, is_final, now),
            Ok(ClientMessage::Control(cmd)) => self.on_control(cmd, now),
            Err(reason) => {
                tracing::debug!(parent: &self.span, %reason, "invalid client message");
                self.send_error(ErrorCode::InvalidMessage, &reason);
            }
        }
    }

    /// Handles one binary message from the client: microphone audio (s16le mono at
    /// `input_rate`). Speech is reported as `vad` events; speech while audio plays is a
    /// barge-in (`--barge-in`), acted on in this same loop turn like a PAUSE/STOP.
    pub fn on_client_binary(self: &Rc<Self>, pcm: &[u8]) {
        let now = Instant::now();
        self.last_activity.set(now);
        // The detector's borrow is held while events are handled; handling them never
        // touches the detector.
        self.vad.borrow_mut().feed(pcm, |e| match e {
            VadEvent::SpeechStart => {
                self.send_event(&json!({"type": "vad", "speaking": true}));
                self.barge_in(now);
            }
            VadEvent::SpeechEnd => self.send_event(&json!({"type": "vad", "speaking": false})),
        });
    }

    /// The user started speaking: stop or pause what is playing, per `--barge-in`.
    fn barge_in(self: &Rc<Self>, read_at: Instant) {
        let playing = {
            let st = self.state.borrow();
            st.current.is_some() && !st.paused
        };
        if !playing {
            return;
        }
        match self.core.shared.config.barge_in {
            BargeIn::Off => {}
            BargeIn::Stop => self.stop_current("barge_in", read_at),
            BargeIn::Pause => {
                self.on_control(Command::Pause, read_at);
                let sent = self.state.borrow().current.as_ref().map_or(0, |u| u.sent);
                self.send_event(&json!({
                    "type": "interrupted",
                    "reason": "barge_in",
                    "played_ms": sent * FRAME_MS,
                    "sequence": sent,
                }));
            }
        }
    }

    fn on_text(self: &Rc<Self>, text: String, is_final: bool, now: Instant) {
        let mut st = self.state.borrow_mut();
        if let Some(u) = st.current.as_mut().filter(|u| u.text_open) {
            u.push_text(&self.id, text, is_final);
            return;
        }
        if st.current.is_some() || !st.pending.is_empty() {
            match st.pending.back_mut() {
                Some(p) if !p.closed => {
                    p.chunks.push(text);
                    p.closed = is_final;
                }
                _ => st.pending.push_back(Pending {
                    chunks: vec![text],
                    closed: is_final,
                    received: now,
                }),
            }
            return;
        }
        drop(st);
        self.start_utterance(Pending {
            chunks: vec![text],
            closed: is_final,
            received: now,
        });
    }

    fn on_control(self: &Rc<Self>, cmd: Command, read_at: Instant) {
        let metrics = &self.core.shared.metrics;
        match cmd {
            Command::Pause => {
                let mut st = self.state.borrow_mut();
                st.paused = true;
                let active = st.current.is_some();
                drop(st);
                metrics
                    .barge_in_latency
                    .observe(read_at.elapsed().as_secs_f64());
                if active {
                    self.tell_worker(proto::ControlCommand::Pause);
                }
            }
            Command::Resume => {
                let mut st = self.state.borrow_mut();
                if !st.paused {
                    return;
                }
                st.paused = false;
                let now = Instant::now();
                let active = if let Some(u) = st.current.as_mut() {
                    // Re-anchor so the next frame's slot is now: nothing is skipped or bunched.
                    if u.anchor.is_some() {
                        u.anchor = Some(now.checked_sub(FRAME * u.sent).unwrap_or(now));
                    }
                    u.scheduled = None;
                    true
                } else {
                    false
                };
                drop(st);
                if active {
                    self.tell_worker(proto::ControlCommand::Resume);
                }
                self.advance(now);
            }
            Command::Stop => self.stop_current("stop", read_at),
        }
    }

    /// STOP: ends the current utterance (its end marker follows `interrupted`), drops the
    /// queued ones. `reason` is `stop` for the command, `barge_in` for detected speech.
    fn stop_current(&self, reason: &str, read_at: Instant) {
        let mut st = self.state.borrow_mut();
        st.paused = false;
        st.pending.clear();
        let Some(mut u) = st.current.take() else {
            return;
        };
        drop(st);
        // Dropping the stream resets it on the wire: the worker stops generating.
        // (A Control STOP is not sent: it could race with the next utterance's stream
        // and stop that one instead.)
        u.cancel();
        self.send_event(&json!({
            "type": "interrupted",
            "reason": reason,
            "played_ms": u.sent * FRAME_MS,
            "sequence": u.sent,
        }));
        self.send_end_marker(u.sent + 1);
        self.core
            .shared
            .metrics
            .barge_in_latency
            .observe(read_at.elapsed().as_secs_f64());
    }

    /// Sends playback commands to the worker in order (one at a time, each awaited), so a
    /// quick PAUSE/RESUME pair can never arrive swapped.
    fn tell_worker(self: &Rc<Self>, cmd: proto::ControlCommand) {
        let mut st = self.state.borrow_mut();
        let Some(worker) = st.worker.filter(|_| st.worker_session) else {
            return;
        };
        if st.control.is_none() {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let core = self.core.clone();
            let id = self.id.clone();
            let span = self.span.clone();
            let task = tokio_uring::spawn(async move {
                while let Some(cmd) = rx.recv().await {
                    let result = match core.upstream.client(worker).await {
                        Ok(client) => upstream::control(&client, &id, cmd).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = result {
                        tracing::debug!(parent: &span, error = %e, "control not delivered");
                    }
                }
            });
            st.tasks.push(task);
            st.control = Some(tx);
        }
        if let Some(tx) = &st.control {
            let _ = tx.send(cmd);
        }
    }

    // ----- utterances ---------------------------------------------------------------------

    fn start_utterance(self: &Rc<Self>, pending: Pending) {
        let mut st = self.state.borrow_mut();
        if st.closed {
            return;
        }
        let generation = st.next_generation;
        st.next_generation += 1;
        let n = pending.chunks.len();
        let unsent = pending
            .chunks
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, pending.closed && i + 1 == n))
            .collect();
        let task = tokio_uring::spawn(synthesis_task(self.clone(), generation));
        st.current = Some(Utterance {
            generation,
            frames: VecDeque::new(),
            worker_done: false,
            text_open: !pending.closed,
            sink: None,
            unsent,
            chunk_seq: 0,
            sent: 0,
            anchor: None,
            scheduled: None,
            task: Some(task),
            received: pending.received,
        });
        self.core.shared.metrics.synthesis.inc();
    }

    /// Opens the worker stream and reads frames until the end of the synthesis.
    async fn synthesize(self: &Rc<Self>, generation: u64) -> Result<(), (ErrorCode, String)> {
        let upstream = &self.core.upstream;
        let (worker, needs_start) = {
            let mut st = self.state.borrow_mut();
            let worker = match st.worker {
                Some(w) => w,
                None => {
                    let w = upstream.pick(&self.opts.model).ok_or((
                        ErrorCode::WorkerUnavailable,
                        "no TTS worker is configured".to_string(),
                    ))?;
                    st.worker = Some(w);
                    w
                }
            };
            (worker, !st.worker_session)
        };
        let unavailable = |e: crate::grpc::Status| {
            self.forget_worker();
            (
                ErrorCode::WorkerUnavailable,
                format!("TTS worker {} unavailable: {e}", upstream.addr(worker)),
            )
        };
        let client = upstream.client(worker).await.map_err(unavailable)?;
        if needs_start {
            upstream::start_session(&client, &self.id, &self.opts.model)
                .await
                .map_err(unavailable)?;
            self.state.borrow_mut().worker_session = true;
        }
        let (sink, mut stream) = upstream::synthesize(&client).await.map_err(unavailable)?;
        if !self.attach_sink(generation, sink) {
            return Ok(());
        }
        loop {
            while self.frames_ahead(generation) >= MAX_AHEAD_FRAMES {
                self.drained.notified().await;
            }
            match stream.message().await {
                Ok(Some(frame)) => {
                    if frame.audio_data.is_empty() && !frame.is_final {
                        return Err((
                            ErrorCode::SynthesisFailed,
                            "worker sent an empty non-final frame".into(),
                        ));
                    }
                    if !frame.audio_data.is_empty() {
                        self.deliver_frame(generation, frame.audio_data);
                    }
                    if frame.is_final {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    upstream.mark_failed(worker);
                    self.forget_worker();
                    return Err((
                        ErrorCode::SynthesisFailed,
                        format!("synthesis failed on worker {}: {e}", upstream.addr(worker)),
                    ));
                }
            }
        }
        self.on_worker_done(generation);
        // Read the trailers so the stream ends cleanly instead of with a RST_STREAM (bounded:
        // a worker that never sends them must not keep this task alive).
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.message()).await;
        Ok(())
    }

    /// Frames of utterance `generation` waiting to be played.
    fn frames_ahead(&self, generation: u64) -> usize {
        self.state
            .borrow()
            .current
            .as_ref()
            .filter(|u| u.generation == generation)
            .map_or(0, |u| u.frames.len())
    }

    /// After a worker failure the next utterance chooses again and re-registers the session.
    fn forget_worker(&self) {
        let mut st = self.state.borrow_mut();
        if let Some(w) = st.worker.take() {
            self.core.upstream.release(w);
        }
        st.worker_session = false;
        st.control = None;
    }

    fn attach_sink(&self, generation: u64, mut sink: RequestSink<proto::TextChunk>) -> bool {
        let mut st = self.state.borrow_mut();
        let Some(u) = st.current.as_mut().filter(|u| u.generation == generation) else {
            return false;
        };
        for (text, is_final) in std::mem::take(&mut u.unsent) {
            u.chunk_seq += 1;
            let _ = sink.send(&proto::TextChunk {
                session_id: self.id.clone(),
                text,
                is_final,
                sequence_number: u.chunk_seq,
            });
            if is_final {
                let _ = sink.finish();
            }
        }
        u.sink = Some(sink);
        true
    }

    /// A PCM frame from the worker for utterance `generation` (called by the synthesis task;
    /// public so the zero-allocation test can drive the forwarding path directly).
    pub fn deliver_frame(self: &Rc<Self>, generation: u64, pcm: Bytes) {
        let now = Instant::now();
        let mut st = self.state.borrow_mut();
        let paused = st.paused;
        let Some(u) = st.current.as_mut().filter(|u| u.generation == generation) else {
            return;
        };
        let was_empty = u.frames.is_empty();
        u.frames.push_back(pcm);
        if self.opts.pacing == Pacing::Realtime && was_empty && !paused {
            // Late means after the frame's own slot; `--lead-ms` only lets frames go early.
            if let Some(due) = u.due(Duration::ZERO) {
                if now > due {
                    // Late: send at once and re-anchor so the lateness doesn't bunch the next
                    // frames together.
                    u.anchor = Some(now.checked_sub(FRAME * u.sent).unwrap_or(now));
                    if now - due > Duration::from_millis(1) {
                        self.core.shared.metrics.underruns.inc();
                    }
                }
            }
        }
        drop(st);
        self.advance(now);
    }

    fn on_worker_done(self: &Rc<Self>, generation: u64) {
        let mut st = self.state.borrow_mut();
        if let Some(u) = st.current.as_mut().filter(|u| u.generation == generation) {
            u.worker_done = true;
            u.task = None;
        }
        drop(st);
        self.advance(Instant::now());
    }

    fn fail_utterance(self: &Rc<Self>, generation: u64, code: ErrorCode, message: &str) {
        let mut st = self.state.borrow_mut();
        if st.current.as_ref().map(|u| u.generation) != Some(generation) {
            return;
        }
        let Some(mut u) = st.current.take() else {
            return;
        };
        drop(st);
        u.task = None;
        u.cancel();
        tracing::warn!(parent: &self.span, code = code.as_str(), %message, "utterance failed");
        self.core.shared.metrics.synthesis_errors.inc();
        self.send_error(code, message);
        self.send_end_marker(u.sent + 1);
        self.start_next();
    }

    /// A pacer wake-up for `generation`.
    pub fn on_timer(self: &Rc<Self>, generation: u64, now: Instant) {
        {
            let mut st = self.state.borrow_mut();
            match st.current.as_mut() {
                Some(u) if u.generation == generation => u.scheduled = None,
                _ => return,
            }
        }
        self.advance(now);
    }

    /// Sends what is due, finishes the utterance when everything is out, starts the next.
    fn advance(self: &Rc<Self>, now: Instant) {
        if self.pump(now) {
            self.start_next();
        }
    }

    /// Sends every frame due at `now`; returns true when the utterance just finished.
    fn pump(&self, now: Instant) -> bool {
        let mut st = self.state.borrow_mut();
        if st.paused || st.closed {
            return false;
        }
        let Some(u) = st.current.as_mut() else {
            return false;
        };
        let lead = self.core.shared.config.lead;
        while !u.frames.is_empty() {
            if self.opts.pacing == Pacing::Realtime {
                match u.due(lead) {
                    None => u.anchor = Some(now),
                    Some(due) if due > now + self.core.pacer.coalesce() => {
                        if u.scheduled.is_none_or(|s| due < s) {
                            u.scheduled = Some(due);
                            self.core.pacer.schedule(due, self.key, u.generation);
                        }
                        break;
                    }
                    Some(due) => {
                        if u.sent > 0 {
                            self.core
                                .shared
                                .metrics
                                .frame_lateness
                                .observe(self.core.index, now.saturating_duration_since(due));
                        }
                    }
                }
            }
            let Some(pcm) = u.frames.pop_front() else {
                break;
            };
            if u.frames.len() + 1 == MAX_AHEAD_FRAMES {
                self.drained.notify_one();
            }
            u.sent += 1;
            let chunks = protocol::audio(
                self.opts.format,
                u.sent,
                Some(&pcm),
                false,
                &mut self.core.json_arena.borrow_mut(),
            );
            self.send_chunks(chunks);
            self.core.shared.metrics.frames_sent.inc();
            if u.sent == 1 {
                self.core
                    .shared
                    .metrics
                    .first_audio_latency
                    .observe(now.saturating_duration_since(u.received).as_secs_f64());
            }
        }
        if u.frames.is_empty() && u.worker_done {
            // Everything the worker made has been sent. (If the client still had text open,
            // the worker ended first; the client's later chunks start a new utterance.)
            let sent = u.sent;
            st.current = None;
            drop(st);
            self.send_end_marker(sent + 1);
            return true;
        }
        false
    }

    fn send_chunks(&self, chunks: protocol::AudioChunks) {
        let mut out = self.out.borrow_mut();
        if out.dead || out.closing {
            return;
        }
        out.bytes += chunks.head.len();
        out.chunks.push_back(chunks.head);
        if let Some(pcm) = chunks.pcm {
            out.bytes += pcm.len();
            out.chunks.push_back(Chunk::Shared(pcm));
        }
        self.after_queue(out);
    }

    fn send_end_marker(&self, sequence: u32) {
        self.send_chunks(protocol::audio(
            self.opts.format,
            sequence,
            None,
            true,
            &mut self.core.json_arena.borrow_mut(),
        ));
    }

    fn start_next(self: &Rc<Self>) {
        let next = self.state.borrow_mut().pending.pop_front();
        if let Some(p) = next {
            self.start_utterance(p);
        }
    }

    /// The connection ended: cancel everything and release the worker session.
    pub fn close(self: &Rc<Self>) {
        let mut st = self.state.borrow_mut();
        if st.closed {
            return;
        }
        st.closed = true;
        st.pending.clear();
        if let Some(mut u) = st.current.take() {
            u.cancel();
        }
        for t in st.tasks.drain(..) {
            t.abort();
        }
        st.control = None;
        if let Some(w) = st.worker {
            self.core.upstream.release(w);
        }
        let worker = st.worker.filter(|_| st.worker_session);
        drop(st);
        if let Some(worker) = worker {
            let core = self.core.clone();
            let id = self.id.clone();
            tokio_uring::spawn(async move {
                if let Ok(client) = core.upstream.client(worker).await {
                    let _ = upstream::end_session(&client, &id).await;
                }
            });
        }
    }
}

async fn synthesis_task(session: Rc<Session>, generation: u64) {
    if let Err((code, message)) = session.synthesize(generation).await {
        session.fail_utterance(generation, code, &message);
    }
}
