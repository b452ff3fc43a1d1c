//! Worker load metrics, reported by GetCapabilities (and, later, the Redis record).
//!
//! Lock-free counters: the synthesis loops update them per frame and the liveness probe reads
//! them without waiting on anything.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::audio::FRAME_MS;

/// Counters shared by every synthesis of the worker.
#[derive(Debug, Default)]
pub struct WorkerMetrics {
    frames: AtomicU64,
    busy_ns: AtomicU64,
    active: AtomicI64,
    started: AtomicU64,
    aborted: AtomicU64,
}

impl WorkerMetrics {
    /// Records one produced frame and the wall time spent producing it.
    pub fn frame_produced(&self, busy: Duration) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.add_busy(busy);
    }

    /// Adds wall time spent generating (while not paused, with text to speak).
    pub fn add_busy(&self, busy: Duration) {
        let ns = u64::try_from(busy.as_nanos()).unwrap_or(u64::MAX);
        self.busy_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Marks a Synthesize call as started; the returned guard marks it finished on drop, as
    /// aborted unless [`ActiveSynthesis::completed`] was called (a cancelled call's future is
    /// dropped, so only a guard can count it).
    pub fn synthesis_started(&self) -> ActiveSynthesis<'_> {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveSynthesis {
            metrics: self,
            completed: false,
        }
    }

    /// Real-time factor: wall time spent generating divided by the duration of the audio
    /// generated (0.25 = four times faster than real time; above 1 the worker cannot keep
    /// up). 0 before any audio.
    pub fn rtf(&self) -> f64 {
        let frames = self.frames.load(Ordering::Relaxed);
        if frames == 0 {
            return 0.0;
        }
        let audio_ns = frames as f64 * f64::from(FRAME_MS) * 1e6;
        self.busy_ns.load(Ordering::Relaxed) as f64 / audio_ns
    }

    /// Synthesize calls running right now.
    pub fn active(&self) -> i64 {
        self.active.load(Ordering::Relaxed)
    }

    /// The `metrics` map of GetCapabilities.
    pub fn snapshot(&self, open_sessions: usize, max_sessions: usize) -> HashMap<String, f64> {
        let frames = self.frames.load(Ordering::Relaxed);
        HashMap::from([
            ("rtf".to_owned(), self.rtf()),
            ("queue_depth".to_owned(), open_sessions as f64),
            ("max_sessions".to_owned(), max_sessions as f64),
            ("active_syntheses".to_owned(), self.active() as f64),
            (
                "syntheses_total".to_owned(),
                self.started.load(Ordering::Relaxed) as f64,
            ),
            (
                "syntheses_aborted".to_owned(),
                self.aborted.load(Ordering::Relaxed) as f64,
            ),
            ("frames_total".to_owned(), frames as f64),
            (
                "audio_seconds_total".to_owned(),
                frames as f64 * f64::from(FRAME_MS) / 1000.0,
            ),
        ])
    }
}

/// Marks one Synthesize call as running (see [`WorkerMetrics::synthesis_started`]).
#[derive(Debug)]
pub struct ActiveSynthesis<'a> {
    metrics: &'a WorkerMetrics,
    completed: bool,
}

impl ActiveSynthesis<'_> {
    /// The call ran to its end (final frame sent).
    pub fn completed(&mut self) {
        self.completed = true;
    }
}

impl Drop for ActiveSynthesis<'_> {
    fn drop(&mut self) {
        self.metrics.active.fetch_sub(1, Ordering::Relaxed);
        if !self.completed {
            self.metrics.aborted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtf_is_busy_time_over_audio_time() {
        let m = WorkerMetrics::default();
        assert_eq!(m.rtf(), 0.0);
        for _ in 0..10 {
            m.frame_produced(Duration::from_millis(5));
        }
        assert!((m.rtf() - 0.25).abs() < 1e-9);
    }

    #[test]
    fn guard_counts_active_and_aborted() {
        let m = WorkerMetrics::default();
        {
            let _a = m.synthesis_started();
            let mut b = m.synthesis_started();
            assert_eq!(m.active(), 2);
            b.completed();
        }
        assert_eq!(m.active(), 0);
        let s = m.snapshot(3, 10);
        assert_eq!(s["syntheses_total"], 2.0);
        assert_eq!(s["syntheses_aborted"], 1.0);
        assert_eq!(s["queue_depth"], 3.0);
        assert_eq!(s["max_sessions"], 10.0);
    }
}
