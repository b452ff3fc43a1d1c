//! One client session: the wiring between its playback state machine, its output queue, its
//! worker link and its microphone VAD.
//!
//! A session lives its whole life on the core that accepted it; everything here runs on that
//! core's single thread. Three kinds of events drive it: client messages (from the
//! connection's reader), audio frames (from the synthesis task reading the worker's gRPC
//! stream) and pacer wake-ups. Each goes to [`Playback`] first, which answers with what to
//! send ([`Emit`]); frames not yet due wait there with a pacer entry at their slot, so PAUSE
//! and STOP act in the same loop turn that reads them.
//!
//! Each part sits in its own `RefCell` and every borrow ends inside the method that takes it:
//! playback's emits write to the output queue and the pacer, never back into playback, so no
//! re-entrant borrow is possible.

pub mod link;
pub mod output;
pub mod playback;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::JoinHandle;

use super::config::BargeIn;
use super::core::Core;
use super::limits::{RateLimiter, Verdict};
use super::upstream;
use super::vad::{Vad, VadEvent};
use crate::protocol::event::InterruptReason;
use crate::protocol::{
    self, ClientMessage, CloseReason, Command, ErrorCode, Format, Pacing, ServerEvent,
};
use link::Link;
use output::{Output, Pushed};
use playback::{Cut, Emit, Pending, Playback, PlaybackConfig, TextRoute, MAX_AHEAD_FRAMES};

/// Per-session choices made at connect time (query parameters or server defaults).
#[derive(Debug, Clone)]
pub struct Options {
    pub format: Format,
    pub pacing: Pacing,
    pub model: String,
    /// Sample rate of the client's microphone audio (`?input_rate=`, default 16 kHz).
    pub input_rate: u32,
    /// Longest the session may last (`--max-session-secs`, narrowed by the credential).
    pub max_session: Option<Duration>,
}

/// A client session.
pub struct Session {
    pub key: usize,
    pub id: String,
    pub opts: Options,
    pub span: tracing::Span,
    core: Rc<Core>,
    playback: RefCell<Playback>,
    link: RefCell<Link>,
    /// Bytes for the connection's writer.
    pub output: Output,
    /// Woken when playback drains the frame queue below [`MAX_AHEAD_FRAMES`].
    drained: tokio::sync::Notify,
    started: Instant,
    last_activity: Cell<Instant>,
    /// Voice-activity detector over the client's microphone audio (barge-in).
    vad: RefCell<Vad>,
    /// The session's message-rate limits.
    limiter: RefCell<RateLimiter>,
}

impl Session {
    pub fn new(key: usize, id: String, opts: Options, core: Rc<Core>) -> Self {
        let span = tracing::info_span!("session", id = %id, core = core.index);
        let now = Instant::now();
        let config = &core.shared.config;
        let vad = Vad::new(opts.input_rate, config.vad);
        let playback = Playback::new(PlaybackConfig {
            pacing: opts.pacing,
            lead: config.lead,
            coalesce: core.pacer.coalesce(),
            max_queued_utterances: config.limits.max_queued_utterances,
            max_queued_text_bytes: config.limits.max_queued_text_bytes,
        });
        let limiter = RateLimiter::new(config.limits.max_messages_per_sec, opts.input_rate, now);
        Self {
            key,
            id,
            opts,
            vad: RefCell::new(vad),
            limiter: RefCell::new(limiter),
            span,
            playback: RefCell::new(playback),
            link: RefCell::new(Link::default()),
            output: Output::new(core.output_budget.clone())
                .with_lateness(core.shared.metrics.frame_lateness.clone(), core.index),
            drained: tokio::sync::Notify::new(),
            core,
            started: now,
            last_activity: Cell::new(now),
        }
    }

    // ----- output -------------------------------------------------------------------------

    /// Queues bytes for the client.
    pub fn send(&self, chunk: Bytes) {
        let pushed = self.output.push(chunk);
        self.after_push(pushed);
    }

    fn after_push(&self, pushed: Pushed) {
        if pushed == Pushed::Overflow {
            tracing::warn!(parent: &self.span, limit = output::MAX_QUEUED_BYTES,
                "client is not reading its audio; dropping the connection");
        }
    }

    /// Queues an event.
    pub fn send_event(&self, event: &ServerEvent) {
        self.send(event.to_frame());
    }

    /// The orchestrator configuration.
    pub fn config(&self) -> &super::config::Config {
        &self.core.shared.config
    }

    /// Tells the client about bad input or a failure; the session carries on.
    pub fn send_error(&self, code: ErrorCode, message: &str) {
        if code == ErrorCode::InvalidMessage {
            self.core.shared.metrics.client_errors.inc();
        }
        self.send_event(&ServerEvent::error(code, message));
    }

    /// Server-initiated end: `session_end`, a close frame, then the writer closes the socket.
    pub fn close_with(&self, reason: CloseReason) {
        if self.output.is_closing() {
            return;
        }
        tracing::info!(parent: &self.span, reason = reason.as_str(), "closing session");
        self.send_event(&ServerEvent::SessionEnd {
            session_id: self.id.clone(),
            reason,
        });
        self.send(reason.close_frame());
        self.output.finish();
    }

    /// True while an utterance plays or waits.
    pub fn busy(&self) -> bool {
        self.playback.borrow().busy()
    }

    /// Ends the session now: what plays is cut (`interrupted` + end marker), then
    /// `session_end` and the close.
    pub fn cut(&self, reason: CloseReason) {
        if self.output.is_closing() {
            return;
        }
        let why = match reason {
            CloseReason::Shutdown => InterruptReason::Shutdown,
            _ => InterruptReason::Stop,
        };
        self.stop_current(why, Instant::now());
        self.close_with(reason);
    }

    /// Time since the last client message, or zero while audio is in progress.
    pub fn idle_for(&self, now: Instant) -> Duration {
        if self.playback.borrow().busy() {
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
        self.link.borrow_mut().tasks.push(task);
    }

    // ----- client messages ----------------------------------------------------------------

    /// Handles one text message from the client.
    pub fn on_client_text(self: &Rc<Self>, raw: &str) {
        let now = Instant::now();
        self.last_activity.set(now);
        let verdict = self.limiter.borrow_mut().text(now);
        if !self.admit(verdict, "message_rate") {
            return;
        }
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
        let verdict = self.limiter.borrow_mut().audio(pcm.len(), now);
        if !self.admit(verdict, "audio_rate") {
            return;
        }
        // The detector's borrow is held while events are handled; handling them never
        // touches the detector.
        self.vad.borrow_mut().feed(pcm, |e| match e {
            VadEvent::SpeechStart => {
                self.send_event(&ServerEvent::Vad { speaking: true });
                self.barge_in(now);
            }
            VadEvent::SpeechEnd => self.send_event(&ServerEvent::Vad { speaking: false }),
        });
    }

    /// Applies the rate limiter's verdict: false when the message must be dropped (the client
    /// was told with RATE_LIMITED, or the session is being closed for flooding).
    fn admit(&self, verdict: Verdict, limit: &str) -> bool {
        if self.output.is_closing() {
            return false;
        }
        match verdict {
            Verdict::Accept => true,
            Verdict::Refuse => {
                self.core.shared.metrics.limited(limit);
                self.send_error(
                    ErrorCode::RateLimited,
                    "too many messages; slow down (this one was not processed)",
                );
                false
            }
            Verdict::Close => {
                self.core.shared.metrics.limited(limit);
                tracing::info!(parent: &self.span, limit, "closing a flooding client");
                self.close_with(CloseReason::RateLimited);
                false
            }
        }
    }

    /// The user started speaking: stop or pause what is playing, per `--barge-in`.
    fn barge_in(self: &Rc<Self>, read_at: Instant) {
        if !self.playback.borrow().playing() {
            return;
        }
        match self.core.shared.config.barge_in {
            BargeIn::Off => {}
            BargeIn::Stop => self.stop_current(InterruptReason::BargeIn, read_at),
            BargeIn::Pause => {
                self.on_control(Command::Pause, read_at);
                let sent = self.playback.borrow().sent();
                self.send_event(&ServerEvent::interrupted(InterruptReason::BargeIn, sent));
            }
        }
    }

    fn on_text(self: &Rc<Self>, text: String, is_final: bool, now: Instant) {
        let route = self.playback.borrow_mut().on_text(text, is_final, now);
        match route {
            TextRoute::Current(generation, text) => self
                .link
                .borrow_mut()
                .push_text(generation, &self.id, text, is_final),
            TextRoute::Queued => {}
            TextRoute::Start(_) if self.core.shared.is_draining() => {
                // A new utterance on a draining process would only be cut at --drain-secs:
                // a session that keeps talking never looks idle to the drain. End the
                // session between utterances instead; the client says it again on a new
                // connection, which the replacement process takes.
                self.close_with(CloseReason::Shutdown);
            }
            TextRoute::Start(pending) => self.start_utterance(pending),
            TextRoute::Refused => {
                self.core.shared.metrics.limited("queued_text");
                self.send_error(
                    ErrorCode::RateLimited,
                    "too much text waiting to be spoken; this text was not queued",
                );
            }
        }
    }

    fn on_control(self: &Rc<Self>, cmd: Command, read_at: Instant) {
        match cmd {
            // PAUSE and RESUME stay in the gateway: the worker is not told (see
            // docs/ARCHITECTURE.md, "Control stays local"). While paused, the synthesis
            // task keeps reading until MAX_AHEAD_FRAMES wait, then HTTP/2 flow control holds
            // the worker back on this stream alone.
            Command::Pause => {
                self.playback.borrow_mut().pause();
                self.core
                    .shared
                    .metrics
                    .barge_in_latency
                    .observe(read_at.elapsed().as_secs_f64());
            }
            Command::Resume => {
                let now = Instant::now();
                if self.playback.borrow_mut().resume(now).is_some() {
                    self.advance(now);
                }
            }
            Command::Stop => self.stop_current(InterruptReason::Stop, read_at),
        }
    }

    /// STOP: ends the current utterance (its end marker follows `interrupted`), drops the
    /// queued ones.
    fn stop_current(&self, reason: InterruptReason, read_at: Instant) {
        let cut = self.playback.borrow_mut().stop();
        let Some(Cut { sent, .. }) = cut else {
            return;
        };
        // Dropping the stream resets it on the wire: the worker stops generating.
        // (A Control STOP is not sent: it could race with the next utterance's stream
        // and stop that one instead.)
        self.link.borrow_mut().cancel();
        self.send_event(&ServerEvent::interrupted(reason, sent));
        self.send_end_marker(sent + 1);
        self.core
            .shared
            .metrics
            .barge_in_latency
            .observe(read_at.elapsed().as_secs_f64());
    }

    // ----- utterances ---------------------------------------------------------------------

    fn start_utterance(self: &Rc<Self>, pending: Pending) {
        let started = self.playback.borrow_mut().start(pending);
        let Some((generation, chunks)) = started else {
            return;
        };
        let task = tokio_uring::spawn(synthesis_task(self.clone(), generation));
        self.link.borrow_mut().begin(generation, chunks, task);
        self.core.shared.metrics.synthesis.inc();
    }

    /// Frames of utterance `generation` waiting to be played.
    fn frames_ahead(&self, generation: u64) -> usize {
        self.playback.borrow().frames_ahead(generation)
    }

    /// A PCM frame from the worker for utterance `generation` (called by the synthesis task;
    /// public so the zero-allocation test can drive the forwarding path directly).
    pub fn deliver_frame(self: &Rc<Self>, generation: u64, pcm: Bytes) {
        let now = Instant::now();
        let underrun = self.playback.borrow_mut().on_frame(generation, pcm, now);
        match underrun {
            None => return,
            Some(true) => {
                self.core.shared.metrics.underruns.inc();
            }
            Some(false) => {}
        }
        self.advance(now);
    }

    fn on_worker_done(self: &Rc<Self>, generation: u64) {
        self.link.borrow_mut().finished(generation);
        if self.playback.borrow_mut().on_worker_done(generation) {
            self.advance(Instant::now());
        }
    }

    fn fail_utterance(self: &Rc<Self>, generation: u64, code: ErrorCode, message: &str) {
        let cut = self.playback.borrow_mut().fail(generation);
        let Some(Cut { sent, .. }) = cut else {
            return;
        };
        {
            let mut link = self.link.borrow_mut();
            link.finished(generation);
            link.cancel();
        }
        tracing::warn!(parent: &self.span, code = code.as_str(), %message, "utterance failed");
        self.core.shared.metrics.synthesis_errors.inc();
        self.send_error(code, message);
        self.send_end_marker(sent + 1);
        self.start_next();
    }

    /// A pacer wake-up for `generation`.
    pub fn on_timer(self: &Rc<Self>, generation: u64, now: Instant) {
        if self.playback.borrow_mut().on_timer(generation) {
            self.advance(now);
        }
    }

    /// Sends what is due, finishes the utterance when everything is out, starts the next.
    fn advance(self: &Rc<Self>, now: Instant) {
        if self.pump(now) {
            self.start_next();
        }
    }

    /// Sends every frame due at `now`; returns true when the utterance just finished.
    fn pump(&self, now: Instant) -> bool {
        let core = &self.core;
        let metrics = &core.shared.metrics;
        let mut playback = self.playback.borrow_mut();
        // The slot of the frame that follows an `Emit::Late`: its lateness is recorded when
        // the writer takes it (see `Output::with_lateness`).
        let mut slot = None;
        playback.pump(now, &mut |emit| match emit {
            Emit::Frame { sequence, pcm } => {
                let chunks = protocol::audio::audio(
                    self.opts.format,
                    sequence,
                    Some(&pcm),
                    false,
                    &mut core.json_arena.borrow_mut(),
                );
                let pushed = match slot.take() {
                    Some(s) => self.output.push_paced_audio(chunks, s),
                    None => self.output.push_audio(chunks),
                };
                self.after_push(pushed);
                metrics.frames_sent.inc();
            }
            Emit::EndMarker { sequence } => self.send_end_marker(sequence),
            Emit::Schedule { due, generation } => core.pacer.schedule(due, self.key, generation),
            Emit::Late(late) => slot = Some(now.checked_sub(late).unwrap_or(now)),
            Emit::FirstAudio(latency) => metrics.first_audio_latency.observe(latency.as_secs_f64()),
            Emit::Drained => self.drained.notify_one(),
        })
    }

    fn send_end_marker(&self, sequence: u32) {
        let chunks = protocol::audio::audio(
            self.opts.format,
            sequence,
            None,
            true,
            &mut self.core.json_arena.borrow_mut(),
        );
        let pushed = self.output.push_audio(chunks);
        self.after_push(pushed);
    }

    fn start_next(self: &Rc<Self>) {
        let next = self.playback.borrow_mut().next_pending();
        if let Some(p) = next {
            self.start_utterance(p);
        }
    }

    /// The connection ended: cancel everything and release the worker session.
    pub fn close(self: &Rc<Self>) {
        if self.playback.borrow().is_closed() {
            return;
        }
        self.playback.borrow_mut().close();
        let (worker, opened) = {
            let mut link = self.link.borrow_mut();
            link.cancel();
            for t in link.tasks.drain(..) {
                t.abort();
            }
            (link.worker, link.opened)
        };
        if let Some(w) = worker {
            self.core.upstream.release(w);
        }
        if let Some(worker) = worker.filter(|_| opened) {
            end_worker_session_later(&self.core, worker, self.id.clone());
        }
    }

    // ----- the worker ---------------------------------------------------------------------

    /// Ends the worker session of a session that has been idle `--worker-idle-secs`: an idle
    /// client must not hold worker capacity. The next utterance opens a new one.
    pub fn release_idle_worker(self: &Rc<Self>) {
        if self.busy() {
            return;
        }
        self.end_worker_session();
        tracing::debug!(parent: &self.span, "idle: worker session released");
    }

    /// Lets go of the session's worker: the binding is forgotten (the next utterance chooses
    /// again) and the worker session is ended in the background, best effort.
    fn end_worker_session(&self) {
        let (released, opened) = {
            let mut link = self.link.borrow_mut();
            let opened = link.opened;
            (link.forget(), opened)
        };
        let Some(worker) = released else {
            return;
        };
        self.core.upstream.release(worker);
        if !opened {
            return;
        }
        end_worker_session_later(&self.core, worker, self.id.clone());
    }

    /// True while the worker session is open.
    pub fn holds_worker(&self) -> bool {
        self.link.borrow().opened
    }

    /// After a worker failure the next utterance chooses again and re-registers the session.
    fn forget_worker(&self) {
        let released = self.link.borrow_mut().forget();
        if let Some(w) = released {
            self.core.upstream.release(w);
        }
    }

    /// Synthesizes utterance `generation` and plays it. A worker that refuses the utterance
    /// or is unreachable before it produced any audio of it (a draining worker answers
    /// UNAVAILABLE to StartSession and Synthesize; one that just exited refuses the connect)
    /// costs one retry on another worker instead of the utterance: the client has heard
    /// nothing yet, so the other worker gets the whole text again. Errors carry the code and
    /// the message for the client; details (addresses, OS errors) go to the log.
    async fn synthesize(self: &Rc<Self>, generation: u64) -> Result<(), (ErrorCode, String)> {
        let (refused_by, first) = match self.synthesize_on(generation, None).await {
            Ok(()) => return Ok(()),
            Err(Failure::Final(e) | Failure::NoOther(e)) => return Err(e),
            Err(Failure::Elsewhere(worker, e)) => (worker, e),
        };
        if !self.link.borrow_mut().rewind(generation) {
            // The utterance was stopped or replaced meanwhile: nothing to retry.
            return Err(first);
        }
        tracing::info!(parent: &self.span, worker = %self.core.upstream.addr(refused_by),
            "no audio from the worker; retrying the utterance on another one");
        self.core.shared.metrics.utterance_retries.inc();
        match self.synthesize_on(generation, Some(refused_by)).await {
            Ok(()) => Ok(()),
            Err(Failure::NoOther(_)) => Err(first),
            Err(Failure::Final(e) | Failure::Elsewhere(_, e)) => Err(e),
        }
    }

    /// One attempt at utterance `generation` on the session's worker (chosen now if it has
    /// none, never `avoid`): opens the worker stream and reads frames until the end of the
    /// synthesis.
    async fn synthesize_on(
        self: &Rc<Self>,
        generation: u64,
        avoid: Option<usize>,
    ) -> Result<(), Failure> {
        let upstream = &self.core.upstream;
        // A worker that failed since this session last used it (other sessions saw it die
        // while this one was idle) is dropped now: choose again instead of failing once more.
        let stale = self
            .link
            .borrow()
            .worker
            .filter(|&w| upstream.recently_failed(w));
        if stale.is_some() {
            self.end_worker_session();
        }
        let chosen = {
            let link = self.link.borrow();
            link.worker.map(|w| (w, !link.opened))
        };
        let (worker, needs_start) = match chosen {
            Some(c) => c,
            None => {
                let w = upstream.pick(&self.opts.model).ok_or(Failure::Final((
                    ErrorCode::WorkerUnavailable,
                    "no TTS worker is available".to_string(),
                )))?;
                self.link.borrow_mut().worker = Some(w);
                if Some(w) == avoid {
                    self.forget_worker();
                    return Err(Failure::NoOther((
                        ErrorCode::WorkerUnavailable,
                        "no other TTS worker is available".to_string(),
                    )));
                }
                (w, true)
            }
        };
        let unavailable = |e: crate::grpc::Status| {
            tracing::warn!(parent: &self.span, worker = %upstream.addr(worker), error = %e,
                "worker unavailable");
            self.forget_worker();
            Failure::Elsewhere(
                worker,
                (
                    ErrorCode::WorkerUnavailable,
                    "the TTS worker is unavailable; try again".to_string(),
                ),
            )
        };
        let client = upstream.client(worker).await.map_err(unavailable)?;
        // After a reconnect the worker no longer has the session (it lives and dies with the
        // connection that opened it): open it again.
        let needs_start = needs_start || !self.link.borrow().is_open_on(&client);
        if needs_start {
            match upstream::start_session(&client, &self.id, &self.opts.model).await {
                Ok(()) => {
                    upstream.mark_accepting(worker);
                    self.link.borrow_mut().opened_on(&client);
                }
                Err(upstream::StartError::UnknownModel) => {
                    self.forget_worker();
                    return Err(Failure::Final((
                        ErrorCode::WorkerUnavailable,
                        format!("no TTS worker offers the model {:?}", self.opts.model),
                    )));
                }
                Err(upstream::StartError::Refused(reason)) => {
                    upstream.mark_refusing(worker);
                    tracing::warn!(parent: &self.span, worker = %upstream.addr(worker),
                        %reason, "worker refused the session");
                    self.forget_worker();
                    return Err(Failure::Elsewhere(
                        worker,
                        (
                            ErrorCode::WorkerUnavailable,
                            "the TTS workers are at capacity; try again".to_string(),
                        ),
                    ));
                }
                Err(upstream::StartError::Failed(e)) => {
                    if e.code == crate::grpc::Code::Unavailable {
                        // Draining (or going away): no new sessions there for a while.
                        upstream.mark_failed(worker);
                    }
                    return Err(unavailable(e));
                }
            }
        }
        let (sink, mut stream) = upstream::synthesize(&client).await.map_err(unavailable)?;
        if !self.link.borrow_mut().attach(generation, &self.id, sink) {
            return Ok(());
        }
        let config = &self.core.shared.config;
        let mut frames = 0u64;
        loop {
            while self.frames_ahead(generation) >= MAX_AHEAD_FRAMES {
                self.drained.notified().await;
            }
            // The worker owes the first frame within --first-frame-timeout-secs and each next
            // one within --stall-timeout-secs (not counted while the client has paused). A
            // stalled worker (SIGSTOP, a hung model) is noticed as fast as a dead one.
            let limit = if frames == 0 {
                config.first_frame_timeout
            } else {
                config.stall_timeout
            };
            let next = loop {
                match tokio::time::timeout(limit, stream.message()).await {
                    Ok(next) => break next,
                    // `message` is cancel-safe: nothing is lost by waiting again.
                    Err(_) if self.playback.borrow().is_paused() => continue,
                    Err(_) => {
                        tracing::warn!(parent: &self.span, worker = %upstream.addr(worker),
                            frames, ?limit, "worker stalled");
                        self.core.shared.metrics.limited("worker_stall");
                        upstream.mark_failed(worker);
                        self.forget_worker();
                        return Err(Failure::Final((
                            ErrorCode::SynthesisFailed,
                            "the TTS worker stopped producing audio".into(),
                        )));
                    }
                }
            };
            match next {
                Ok(Some(frame)) => {
                    if frame.audio_data.is_empty() && !frame.is_final {
                        return Err(Failure::Final((
                            ErrorCode::SynthesisFailed,
                            "the TTS worker sent an invalid frame".into(),
                        )));
                    }
                    if !frame.audio_data.is_empty() {
                        if frames == 0 {
                            self.link.borrow_mut().first_frame(generation);
                        }
                        frames += 1;
                        self.deliver_frame(generation, frame.audio_data);
                    }
                    if frame.is_final {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(parent: &self.span, worker = %upstream.addr(worker),
                        error = %e, "synthesis failed");
                    upstream.mark_failed(worker);
                    self.forget_worker();
                    let failed = (
                        ErrorCode::SynthesisFailed,
                        "synthesis failed on the TTS worker".to_string(),
                    );
                    // Refused (draining) or gone before any audio: another worker may take
                    // the whole utterance. After audio, the client has heard part of it.
                    return Err(if frames == 0 && e.code == crate::grpc::Code::Unavailable {
                        Failure::Elsewhere(worker, failed)
                    } else {
                        Failure::Final(failed)
                    });
                }
            }
        }
        if frames == 0 {
            return Err(Failure::Final((
                ErrorCode::SynthesisFailed,
                "the TTS worker produced no audio for this text".into(),
            )));
        }
        self.on_worker_done(generation);
        // Read the trailers so the stream ends cleanly instead of with a RST_STREAM (bounded:
        // a worker that never sends them must not keep this task alive).
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.message()).await;
        Ok(())
    }
}

/// How an attempt at an utterance failed.
enum Failure {
    /// Tell the client (code, message).
    Final((ErrorCode, String)),
    /// Worker `.0` refused the utterance or could not be reached, and no audio of it left:
    /// another worker may take it.
    Elsewhere(usize, (ErrorCode, String)),
    /// The retry found no worker other than the one that refused.
    NoOther((ErrorCode, String)),
}

/// Sessions of one core doing their closing work at the same time (see [`close_turn`]).
const CLOSING_AT_ONCE: usize = 16;

thread_local! {
    /// Turns to close on this thread's core (one thread per core, so per core).
    static CLOSING: Arc<tokio::sync::Semaphore> =
        Arc::new(tokio::sync::Semaphore::new(CLOSING_AT_ONCE));
}

/// Waits for a turn to do a connection's closing work on this core; the turn lasts until
/// the returned permit is dropped (hold it only across work that doesn't wait on the peer).
///
/// Why: when thousands of clients on a core go at once (a mass disconnect), every connection
/// task wakes in the same loop turn and the core's scheduler runs them first-in first-out,
/// several hops each (reader, writer, teardown: syscalls, frees). A session still playing
/// had its frame's writer queued behind all of them: a 100–220 ms gap with 2,000 sessions
/// closing. A connection waiting for its turn is not in the run queue, so a playing
/// session's pacer and writer wait behind at most `CLOSING_AT_ONCE` closes. A lone close
/// gets its turn at once (the permit is ready on the first poll).
pub async fn close_turn() -> Option<tokio::sync::OwnedSemaphorePermit> {
    let gate = CLOSING.with(Arc::clone);
    gate.acquire_owned().await.ok()
}

/// Most EndSession calls in flight per core at once (see [`Upstream::queue_end_session`]).
const END_SESSION_BATCH: usize = 16;
/// Pause between two batches of EndSession calls.
const END_SESSION_PAUSE: Duration = Duration::from_millis(5);

/// Ends worker session `id` on `worker` in the background, best effort: queued on the core
/// and sent by one task, [`END_SESSION_BATCH`] at a time, yielding between batches.
///
/// [`Upstream::queue_end_session`]: upstream::Upstream::queue_end_session
fn end_worker_session_later(core: &Rc<Core>, worker: usize, id: String) {
    if core.upstream.queue_end_session(worker, id) {
        tokio_uring::spawn(send_end_sessions(core.clone()));
    }
}

async fn send_end_sessions(core: Rc<Core>) {
    loop {
        let batch = core.upstream.next_end_batch(END_SESSION_BATCH);
        if batch.is_empty() {
            return;
        }
        let calls = batch.into_iter().map(|(worker, id)| {
            let core = &core;
            async move {
                if let Ok(client) = core.upstream.client(worker).await {
                    let _ = upstream::end_session(&client, &id).await;
                }
            }
        });
        futures_util::future::join_all(calls).await;
        // A pause between batches (not only a yield): the worker ending thousands of
        // sessions back to back takes CPU the cores pacing audio need on a small machine;
        // at most ~3,000 calls a second per core still frees 1,000 worker sessions in 0.3 s.
        tokio::time::sleep(END_SESSION_PAUSE).await;
    }
}

async fn synthesis_task(session: Rc<Session>, generation: u64) {
    if let Err((code, message)) = session.synthesize(generation).await {
        session.fail_utterance(generation, code, &message);
    }
}
