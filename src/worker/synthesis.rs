//! One Synthesize call: text chunks in, 20 ms audio frames out, as they are produced.
//!
//! [`prepare`] validates the call (first chunk, session of this connection) and registers it
//! for Control; it runs in the handler, so a refused call is a plain error status before any
//! response header. [`run`] then hands it to the session model's engine: the mock loop below,
//! or [`super::speech`] for espeak-ng.
//!
//! The mock loop multiplexes three event sources with `select!`: new text chunks (synthesis
//! starts on each as it arrives, no waiting for `is_final`), control changes (PAUSE / RESUME /
//! STOP of this call), and the frame clock. Because the response stream owns this future (see
//! [`super::stream`]), a call the client resets or whose deadline passes stops producing at
//! once.
//!
//! Frame rules (docs/PROTOCOL.md §2): `sequence_number` 1..N, `session_id` echoed, exactly one
//! `is_final` frame, the last: it carries audio when we know it is the last frame (input
//! closed and one frame left), otherwise it is an empty end marker. Never an empty non-final
//! frame.

use tokio::time::Instant;

use super::metrics::WorkerMetrics;
use super::mock::{frames_for_text, MockTiming, SineGenerator};
use super::models::{EngineHandle, ModelManager};
use super::session::{ConnId, ControlState, SessionRegistry, SynthesisRegistration};
use super::stamp::FrameStamp;
use super::stream::{RequestStream, ResponseSender};
use crate::proto::{AudioFrame, TextChunk};
use tonic::Status;

/// What a synthesis needs from the worker.
pub struct SynthesisContext<'a> {
    /// Sessions (to validate the id and register for control).
    pub sessions: &'a std::sync::Arc<SessionRegistry>,
    /// Load counters.
    pub metrics: &'a WorkerMetrics,
    /// Which engine speaks the session's model.
    pub models: &'a ModelManager,
    /// Mock model timing.
    pub timing: MockTiming,
}

/// A validated call, registered with its session, waiting to run.
pub struct Prepared {
    first: TextChunk,
    registration: SynthesisRegistration,
    engine: EngineHandle,
}

/// Reads the first chunk and checks the call: a session id (INVALID_ARGUMENT without), a
/// session of *this* connection (NOT_FOUND otherwise), a model that can speak.
pub async fn prepare(
    ctx: &SynthesisContext<'_>,
    conn: ConnId,
    requests: &mut RequestStream,
) -> Result<Prepared, Status> {
    let first: TextChunk = requests.message().await?.ok_or_else(|| {
        Status::invalid_argument("Synthesize: the stream ended before the first TextChunk")
    })?;
    if first.session_id.is_empty() {
        return Err(Status::invalid_argument(
            "Synthesize: the first TextChunk must carry a session_id",
        ));
    }
    let registration = ctx
        .sessions
        .begin_synthesis(conn, &first.session_id)
        .ok_or_else(|| {
            Status::not_found(format!(
                "Synthesize: unknown session {:?} (call StartSession first)",
                first.session_id
            ))
        })?;
    let engine = ctx
        .models
        .handle(&registration.model_id)
        .map_err(|e| Status::failed_precondition(format!("Synthesize: {e}")))?;
    Ok(Prepared {
        first,
        registration,
        engine,
    })
}

/// Runs a prepared Synthesize call to completion.
pub async fn run(
    ctx: SynthesisContext<'_>,
    prepared: Prepared,
    mut requests: RequestStream,
    mut responses: ResponseSender,
) -> Result<(), Status> {
    let Prepared {
        first,
        mut registration,
        engine,
    } = prepared;
    let mut active = ctx.metrics.synthesis_started();
    tracing::debug!(
        session = %registration.session_id,
        model = %registration.model_id,
        "synthesis started"
    );
    let (frames, stopped) = match engine {
        EngineHandle::Mock => {
            run_mock(
                &ctx,
                &first,
                &mut registration,
                &mut requests,
                &mut responses,
            )
            .await?
        }
        EngineHandle::Espeak(voice) => {
            super::speech::run(
                &voice,
                &first,
                &mut registration,
                &mut requests,
                &mut responses,
                ctx.metrics,
            )
            .await?
        }
    };
    active.completed();
    tracing::debug!(
        session = %registration.session_id,
        frames,
        stopped,
        "synthesis ended"
    );
    Ok(())
}

/// The mock model's frame loop; returns (frames sent, stopped).
async fn run_mock(
    ctx: &SynthesisContext<'_>,
    first: &TextChunk,
    registration: &mut SynthesisRegistration,
    requests: &mut RequestStream,
    responses: &mut ResponseSender,
) -> Result<(i64, bool), Status> {
    let mut synth = Synthesis {
        stamp: FrameStamp::new(first.session_id.clone(), ctx.metrics),
        generator: SineGenerator::new(),
        pending: 0,
        input_open: true,
        next_due: Instant::now() + ctx.timing.first_frame,
        produced_any: false,
    };
    synth.add_chunk(first);
    let mut control = ControlState::default();
    let interval = ctx.timing.frame_interval;

    loop {
        if control.stopped {
            synth.stamp.idle();
            responses.send(synth.stamp.end_marker()).await?;
            break;
        }
        if !synth.input_open && synth.pending == 0 {
            synth.stamp.idle();
            // The last frame went out before we knew it was last: close with a marker.
            responses.send(synth.stamp.end_marker()).await?;
            break;
        }
        let producing = synth.pending > 0 && !control.paused;
        if producing {
            synth.stamp.busy();
        } else {
            synth.stamp.idle();
        }
        let due = synth.next_due;
        tokio::select! {
            biased;
            changed = registration.control.changed() => {
                if changed.is_err() {
                    // Cannot happen (the registration holds a sender); treat as a stop
                    // rather than spinning.
                    control.stopped = true;
                    continue;
                }
                let was_paused = control.paused;
                control = *registration.control.borrow_and_update();
                if was_paused && !control.paused {
                    // Resume on a fresh schedule rather than bursting the paused time.
                    synth.next_due = synth.next_due.max(Instant::now());
                }
            }
            chunk = requests.message(), if synth.input_open => match chunk? {
                Some(chunk) => synth.add_chunk(&chunk),
                None => synth.input_open = false,
            },
            () = wait_until(due), if producing => {
                let frame = synth.next_frame();
                let last = frame.is_final;
                responses.send(frame).await?;
                if last {
                    synth.stamp.idle();
                    break;
                }
                synth.next_due = due + interval;
            }
        }
    }
    Ok((synth.stamp.sequence(), control.stopped))
}

/// Resolves at `due` (immediately if it has passed: with `--mock-frame-interval-ms 0` frames
/// go out back to back without touching the timer).
async fn wait_until(due: Instant) {
    if due > Instant::now() {
        tokio::time::sleep_until(due).await;
    }
}

/// State of one call's frame production.
struct Synthesis<'a> {
    stamp: FrameStamp<'a>,
    generator: SineGenerator,
    /// Frames still to produce for the text received so far.
    pending: u64,
    /// False once a chunk with `is_final` arrived or the client half-closed.
    input_open: bool,
    /// When the next frame is due.
    next_due: Instant,
    produced_any: bool,
}

impl Synthesis<'_> {
    fn add_chunk(&mut self, chunk: &TextChunk) {
        let frames = frames_for_text(&chunk.text);
        if frames > 0 && self.pending == 0 && self.produced_any {
            // Text after an idle gap starts now, not in the past.
            self.next_due = self.next_due.max(Instant::now());
        }
        self.pending += frames;
        if chunk.is_final {
            self.input_open = false;
        }
    }

    fn next_frame(&mut self) -> AudioFrame {
        self.pending -= 1;
        self.produced_any = true;
        let is_final = self.pending == 0 && !self.input_open;
        self.stamp.frame(self.generator.next_frame(), is_final)
    }
}
