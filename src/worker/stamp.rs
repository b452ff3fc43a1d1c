//! What every engine's Synthesize loop shares: numbering and stamping the frames of one call
//! (docs/PROTOCOL.md §2: `sequence_number` 1..N, `session_id` echoed, 48 kHz / 20 ms) and
//! accounting the time spent producing them, for the `rtf` metric.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::metrics::WorkerMetrics;
use crate::audio::{FRAME_MS, SAMPLE_RATE};
use crate::proto::AudioFrame;

/// Frame numbering and busy-time clock of one Synthesize call. Dropping it ends the busy
/// period, so an aborted call still accounts its time.
pub struct FrameStamp<'a> {
    session_id: String,
    /// Sequence number of the last frame made.
    sequence: i64,
    /// Start of the current busy period (producing, not paused or waiting for text).
    busy_since: Option<Instant>,
    metrics: &'a WorkerMetrics,
}

impl<'a> FrameStamp<'a> {
    pub fn new(session_id: String, metrics: &'a WorkerMetrics) -> Self {
        Self {
            session_id,
            sequence: 0,
            busy_since: None,
            metrics,
        }
    }

    /// The session this call belongs to.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// Frames made so far (the last sequence number).
    pub fn sequence(&self) -> i64 {
        self.sequence
    }

    /// The next data frame; the busy time since the previous frame is counted with it.
    pub fn frame(&mut self, audio: Bytes, is_final: bool) -> AudioFrame {
        let now = Instant::now();
        let busy = self.busy_since.map_or(Duration::ZERO, |t| now - t);
        self.busy_since = self.busy_since.map(|_| now);
        self.metrics.frame_produced(busy);
        self.stamp(audio, is_final)
    }

    /// The empty `is_final` frame that closes a call whose last data frame went out before
    /// the engine knew it was the last.
    pub fn end_marker(&mut self) -> AudioFrame {
        self.stamp(Bytes::new(), true)
    }

    fn stamp(&mut self, audio_data: Bytes, is_final: bool) -> AudioFrame {
        self.sequence += 1;
        AudioFrame {
            session_id: self.session_id.clone(),
            audio_data,
            sample_rate: SAMPLE_RATE as i32,
            frame_duration_ms: FRAME_MS as i32,
            sequence_number: self.sequence,
            is_final,
        }
    }

    /// Producing audio from now on.
    pub fn busy(&mut self) {
        if self.busy_since.is_none() {
            self.busy_since = Some(Instant::now());
        }
    }

    /// Not producing (paused, waiting for text, done).
    pub fn idle(&mut self) {
        if let Some(t) = self.busy_since.take() {
            self.metrics.add_busy(t.elapsed());
        }
    }
}

impl Drop for FrameStamp<'_> {
    fn drop(&mut self) {
        self.idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_frames_from_one_and_ends_with_a_final_marker() {
        let metrics = WorkerMetrics::default();
        let mut s = FrameStamp::new("ws-1".into(), &metrics);
        let a = s.frame(Bytes::from_static(&[0; 4]), false);
        let b = s.end_marker();
        assert_eq!((a.sequence_number, a.is_final), (1, false));
        assert_eq!((b.sequence_number, b.is_final), (2, true));
        assert!(b.audio_data.is_empty());
        assert_eq!(b.session_id, "ws-1");
        assert_eq!((a.sample_rate, a.frame_duration_ms), (48_000, 20));
        assert_eq!(s.sequence(), 2);
    }
}
