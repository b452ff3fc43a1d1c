//! A Synthesize call spoken by espeak-ng: clause by clause, streamed as it is produced.
//!
//! Text chunks go through a [`ClauseSplitter`]; each complete clause is one espeak-ng process
//! (see [`super::espeak`]), started as soon as the clause is complete — while earlier
//! clauses are still being sent, and before later text has even arrived. Its WAV is read as
//! the engine writes it, resampled to 48 kHz and cut into 1920-byte frames (the clause's last
//! frame zero-padded), so the first frame leaves after the first clause's first ~20 ms of
//! audio are synthesised, however long the text.
//!
//! One `select!` loop, in priority order: control changes (PAUSE / RESUME / STOP), new text,
//! sending a ready frame, reading more engine output. PAUSE stops sending before the next
//! frame and lets the engine run at most [`AHEAD`] frames ahead before it stops reading (the
//! process then blocks on its pipe); STOP ends the call with its end marker at once and
//! drops (kills) the process. A cancelled call (stream reset, deadline) drops this future,
//! which kills the process the same way.
//!
//! Frame rules (docs/PROTOCOL.md §2): sequence 1..N, one `is_final` frame last. The final frame
//! carries audio when we know it is the last one; to know, the last frame of a clause is held
//! back while the clause's process is still running (it may yet produce more). When the
//! input is still open after the last clause, that frame goes out as non-final and the call
//! later ends with an empty end marker.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::clauses::ClauseSplitter;
use super::espeak::{ClauseProcess, VoiceRuntime};
use super::metrics::WorkerMetrics;
use super::resample::{Framer, StreamResampler};
use super::session::{ControlState, SynthesisRegistration};
use super::stamp::FrameStamp;
use super::stream::{RequestStream, ResponseSender};
use super::wav::WavReader;
use crate::proto::{AudioFrame, TextChunk};
use tonic::Status;

/// Frames the engine may run ahead of what was sent (0.5 s): bounds memory per call and how
/// much is already synthesised when a PAUSE arrives.
pub const AHEAD: usize = 25;
/// Bytes read from the engine per read (~190 ms of 22 kHz audio).
const READ_BYTES: usize = 8192;

/// Runs the call to its end; returns (frames sent, stopped).
pub async fn run(
    voice: &Arc<VoiceRuntime>,
    first: &TextChunk,
    registration: &mut SynthesisRegistration,
    requests: &mut RequestStream,
    responses: &mut ResponseSender,
    metrics: &WorkerMetrics,
) -> Result<(i64, bool), Status> {
    let mut s = Speech {
        voice: voice.clone(),
        stamp: FrameStamp::new(first.session_id.clone(), metrics),
        splitter: ClauseSplitter::new(),
        clauses: VecDeque::new(),
        job: None,
        ready: VecDeque::new(),
        input_open: true,
        resampler: None,
        framer: Framer::new(),
        samples: Vec::new(),
        resampled: Vec::new(),
        call_started: Instant::now(),
        first_frame_after: None,
    };
    s.add_chunk(first);
    let mut control = ControlState::default();
    let mut buf = vec![0u8; READ_BYTES];

    loop {
        if control.stopped {
            s.stamp.idle();
            responses.send(s.stamp.end_marker()).await?;
            break;
        }
        if s.job.is_none() {
            if let Some(clause) = s.clauses.pop_front() {
                s.start(&clause).await?;
            }
        }
        let more_coming = s.more_coming();
        if !more_coming && s.ready.is_empty() {
            s.stamp.idle();
            // The last frame went out before we knew it was last: close with a marker.
            responses.send(s.stamp.end_marker()).await?;
            break;
        }
        // Hold a clause's last frame while its process may still add to it.
        let sendable =
            !control.paused && (s.ready.len() >= 2 || (!s.ready.is_empty() && s.job.is_none()));
        let reading = s.job.is_some() && s.ready.len() < AHEAD;
        if (sendable || reading) && !control.paused {
            s.stamp.busy();
        } else {
            s.stamp.idle();
        }
        tokio::select! {
            biased;
            changed = registration.control.changed() => {
                if changed.is_err() {
                    // Cannot happen (the registration holds a sender); stop rather than spin.
                    control.stopped = true;
                    continue;
                }
                control = *registration.control.borrow_and_update();
            }
            chunk = requests.message(), if s.input_open => match chunk? {
                Some(chunk) => s.add_chunk(&chunk),
                None => s.close_input(),
            },
            () = std::future::ready(()), if sendable => {
                let frame = s.next_frame();
                let last = frame.is_final;
                responses.send(frame).await?;
                if last {
                    s.stamp.idle();
                    break;
                }
            }
            n = read(&mut s.job, &mut buf), if reading => {
                let n = n.map_err(|e| Status::internal(e.to_string()))?;
                if n == 0 {
                    s.end_clause().await?;
                } else {
                    s.audio(&buf[..n])?;
                }
            }
        }
    }
    tracing::debug!(
        session = %s.stamp.session_id(),
        first_frame_ms = s.first_frame_after.map(|d| d.as_secs_f64() * 1000.0),
        frames = s.stamp.sequence(),
        "speech ended"
    );
    Ok((s.stamp.sequence(), control.stopped))
}

/// Reads from the current clause's process (only polled when there is one).
async fn read(job: &mut Option<Job>, buf: &mut [u8]) -> Result<usize, super::espeak::EspeakError> {
    match job {
        Some(j) => j.process.read(buf).await,
        None => std::future::pending().await,
    }
}

/// One clause being synthesised.
struct Job {
    process: ClauseProcess,
    wav: WavReader,
    clause_chars: usize,
    started: Instant,
}

struct Speech<'a> {
    voice: Arc<VoiceRuntime>,
    stamp: FrameStamp<'a>,
    splitter: ClauseSplitter,
    /// Complete clauses not started yet.
    clauses: VecDeque<String>,
    job: Option<Job>,
    /// Frames produced, not yet sent.
    ready: VecDeque<Bytes>,
    input_open: bool,
    /// Created from the first WAV header (the voice's native rate), reused per clause.
    resampler: Option<StreamResampler>,
    framer: Framer,
    samples: Vec<i16>,
    resampled: Vec<i16>,
    call_started: Instant,
    /// When the first frame left (first-audio latency inside the worker).
    first_frame_after: Option<Duration>,
}

impl Speech<'_> {
    fn add_chunk(&mut self, chunk: &TextChunk) {
        let done = self.splitter.push(&chunk.text);
        self.clauses.extend(done);
        if chunk.is_final {
            self.close_input();
        }
    }

    fn close_input(&mut self) {
        self.input_open = false;
        self.clauses.extend(self.splitter.finish());
    }

    /// More frames may still be produced (a clause running or waiting, or more text).
    fn more_coming(&self) -> bool {
        self.job.is_some() || !self.clauses.is_empty() || self.input_open
    }

    async fn start(&mut self, clause: &str) -> Result<(), Status> {
        let process = self
            .voice
            .speak(clause)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        self.job = Some(Job {
            process,
            wav: WavReader::new(),
            clause_chars: clause.chars().count(),
            started: Instant::now(),
        });
        Ok(())
    }

    /// New engine output: WAV bytes → samples → 48 kHz → frames.
    fn audio(&mut self, bytes: &[u8]) -> Result<(), Status> {
        let Some(job) = self.job.as_mut() else {
            return Ok(());
        };
        self.samples.clear();
        job.wav
            .push(bytes, &mut self.samples)
            .map_err(|e| Status::internal(format!("espeak-ng output: {e}")))?;
        let Some(rate) = job.wav.sample_rate() else {
            return Ok(()); // header not complete yet
        };
        if self.resampler.as_ref().is_none_or(|r| r.rate() != rate) {
            self.resampler =
                Some(StreamResampler::new(rate).map_err(|e| Status::internal(e.to_string()))?);
        }
        self.resampled.clear();
        if let Some(r) = self.resampler.as_mut() {
            r.push(&self.samples, &mut self.resampled);
        }
        self.framer.push(&self.resampled, &mut self.ready);
        Ok(())
    }

    /// The clause's output ended: flush the resampler and the framer, check the exit.
    async fn end_clause(&mut self) -> Result<(), Status> {
        let Some(job) = self.job.take() else {
            return Ok(());
        };
        self.resampled.clear();
        if let Some(r) = self.resampler.as_mut() {
            r.finish(&mut self.resampled);
        }
        self.framer.push(&self.resampled, &mut self.ready);
        self.framer.flush(&mut self.ready);
        tracing::trace!(
            session = %self.stamp.session_id(),
            chars = job.clause_chars,
            ms = job.started.elapsed().as_secs_f64() * 1000.0,
            "clause synthesised"
        );
        job.process
            .finish()
            .await
            .map_err(|e| Status::internal(e.to_string()))
    }

    fn next_frame(&mut self) -> AudioFrame {
        let audio = self.ready.pop_front().unwrap_or_default();
        if self.first_frame_after.is_none() {
            self.first_frame_after = Some(self.call_started.elapsed());
        }
        let is_final = self.ready.is_empty() && !self.more_coming();
        self.stamp.frame(audio, is_final)
    }
}
