//! The mock TTS model: a 440 Hz sine, 500 ms (25 frames) per text chunk.
//!
//! It stands in for a real model in tests, benchmarks and `duplex demo`: audible, trivially
//! recognisable, and with configurable latency (delay before the first frame, interval between
//! frames) so the orchestrator's pacing and barge-in can be exercised without a GPU.
//!
//! Cost matters because benchmarks run thousands of sessions against one worker: 440 Hz at
//! 48 kHz repeats exactly every 1200 samples (11 periods), so every frame is a slice of one
//! precomputed table (`Bytes::slice`, no allocation, no `sin` per sample) and the phase stays
//! continuous across frames.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use crate::audio::{FRAME_BYTES, FRAME_SAMPLES, SAMPLE_RATE};

/// Tone of the mock voice.
pub const FREQUENCY_HZ: u32 = 440;
/// Peak amplitude as a fraction of full scale (loud enough to hear, far from clipping).
pub const AMPLITUDE: f64 = 0.3;
/// Frames produced per non-empty text chunk (25 × 20 ms = 500 ms, docs/PROTOCOL.md §2).
pub const FRAMES_PER_CHUNK: u64 = 25;

/// Samples after which the sine repeats exactly: 48000 / gcd(48000, 440) = 1200.
const PERIOD_SAMPLES: usize = (SAMPLE_RATE / gcd(SAMPLE_RATE, FREQUENCY_HZ)) as usize;

const fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Timing of the mock model, from the worker's `--mock-*` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MockTiming {
    /// Delay before the first frame of a Synthesize call (simulated model latency).
    pub first_frame: Duration,
    /// Delay between consecutive frames (`ZERO` = as fast as possible).
    pub frame_interval: Duration,
}

impl Default for MockTiming {
    fn default() -> Self {
        MockTiming {
            first_frame: Duration::ZERO,
            frame_interval: Duration::from_millis(5),
        }
    }
}

/// How many frames the mock produces for a text chunk: 25, or none for empty text (there is
/// nothing to say).
pub fn frames_for_text(text: &str) -> u64 {
    if text.trim().is_empty() {
        0
    } else {
        FRAMES_PER_CHUNK
    }
}

/// One period of the sine plus one frame of wrap-around, as s16le, so any frame starting
/// inside the period is a contiguous slice.
fn table() -> &'static Bytes {
    static TABLE: OnceLock<Bytes> = OnceLock::new();
    TABLE.get_or_init(|| {
        let samples = PERIOD_SAMPLES + FRAME_SAMPLES;
        let mut buf = BytesMut::with_capacity(samples * 2);
        let peak = AMPLITUDE * f64::from(i16::MAX);
        for n in 0..samples {
            let t = (n % PERIOD_SAMPLES) as f64 / f64::from(SAMPLE_RATE);
            let v = (2.0 * std::f64::consts::PI * f64::from(FREQUENCY_HZ) * t).sin() * peak;
            buf.put_i16_le(v.round() as i16);
        }
        buf.freeze()
    })
}

/// Phase-continuous sine frame source; one per Synthesize call.
#[derive(Debug, Clone, Default)]
pub struct SineGenerator {
    /// Position of the next sample within the period.
    position: usize,
}

impl SineGenerator {
    /// A generator starting at phase 0.
    pub fn new() -> SineGenerator {
        SineGenerator::default()
    }

    /// The next 20 ms frame (1920 bytes of s16le), a zero-copy slice of the shared table.
    pub fn next_frame(&mut self) -> Bytes {
        let start = self.position * 2;
        self.position = (self.position + FRAME_SAMPLES) % PERIOD_SAMPLES;
        table().slice(start..start + FRAME_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(frame: &[u8]) -> Vec<i16> {
        frame
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect()
    }

    #[test]
    fn period_is_1200_samples() {
        assert_eq!(PERIOD_SAMPLES, 1200);
    }

    #[test]
    fn frames_are_1920_bytes_of_sine_not_silence() {
        let mut g = SineGenerator::new();
        for _ in 0..30 {
            let f = g.next_frame();
            assert_eq!(f.len(), FRAME_BYTES);
            let s = samples(&f);
            let peak = s.iter().map(|v| v.unsigned_abs()).max().unwrap();
            let expected_peak = (AMPLITUDE * f64::from(i16::MAX)) as u16;
            assert!(
                peak > expected_peak - 100 && peak <= expected_peak + 1,
                "{peak}"
            );
            let rms =
                (s.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / s.len() as f64).sqrt();
            let expected_rms = AMPLITUDE * f64::from(i16::MAX) / 2f64.sqrt();
            assert!(
                (rms - expected_rms).abs() < expected_rms * 0.02,
                "rms {rms}"
            );
        }
    }

    #[test]
    fn sine_has_440_zero_crossings_per_second() {
        let mut g = SineGenerator::new();
        let mut all = Vec::new();
        for _ in 0..50 {
            all.extend(samples(&g.next_frame()));
        }
        // Count upward crossings over 1 s (50 frames): one per period.
        let ups = all.windows(2).filter(|w| w[0] < 0 && w[1] >= 0).count();
        assert!((439..=441).contains(&ups), "{ups} upward zero crossings");
    }

    #[test]
    fn phase_is_continuous_across_frames() {
        // Every sample must match the ideal sine at its absolute index, also across
        // frame boundaries.
        let mut g = SineGenerator::new();
        let peak = AMPLITUDE * f64::from(i16::MAX);
        let mut n = 0usize;
        for _ in 0..12 {
            for v in samples(&g.next_frame()) {
                let ideal = (2.0 * std::f64::consts::PI * 440.0 * n as f64 / 48_000.0).sin() * peak;
                assert!(
                    (f64::from(v) - ideal).abs() <= 1.0,
                    "sample {n}: {v} vs {ideal}"
                );
                n += 1;
            }
        }
    }

    #[test]
    fn frames_share_the_table() {
        let mut g = SineGenerator::new();
        let a = g.next_frame();
        let t = table();
        let range = t.as_ptr() as usize..t.as_ptr() as usize + t.len();
        assert!(range.contains(&(a.as_ptr() as usize)));
    }

    #[test]
    fn empty_text_has_no_frames() {
        assert_eq!(frames_for_text(""), 0);
        assert_eq!(frames_for_text("  \n"), 0);
        assert_eq!(frames_for_text("Hello."), 25);
    }
}
