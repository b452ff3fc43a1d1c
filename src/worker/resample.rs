//! From an engine's native PCM to the gateway's 20 ms / 48 kHz frames.
//!
//! [`StreamResampler`] converts a stream of samples at the engine's rate (espeak-ng: 22 050 Hz)
//! to 48 kHz with rubato's synchronous FFT resampler (band-limited, no aliasing, and fast: a
//! fixed ratio is exactly its case). It works on the samples as they arrive, drops the
//! resampler's start-up delay so speech is not shifted, and on [`StreamResampler::finish`]
//! flushes the tail so the output has exactly `ceil(n · 48000 / rate)` samples.
//! [`Framer`] cuts samples into exact 1920-byte frames and zero-pads the last one.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};
use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Indexing, Resampler};

use crate::audio::{FRAME_BYTES, FRAME_SAMPLES, SAMPLE_RATE};

/// Input frames per resampler call: small enough that the first output comes after ~23 ms
/// of engine audio, large enough to keep the FFT efficient.
const CHUNK: usize = 512;

/// Why a resampler could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot resample from {rate} Hz: {reason}")]
pub struct ResampleError {
    rate: u32,
    reason: String,
}

/// Streaming mono resampler from `rate` to 48 kHz, reusable clause after clause.
pub struct StreamResampler {
    /// `None` when the engine already speaks 48 kHz (samples pass through).
    fft: Option<Fft<f32>>,
    rate: u32,
    input: Vec<f32>,
    output: Vec<f32>,
    /// Leading output samples still to drop (the resampler's delay).
    skip: usize,
    in_total: u64,
    out_total: u64,
}

impl std::fmt::Debug for StreamResampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamResampler")
            .field("rate", &self.rate)
            .field("in_total", &self.in_total)
            .field("out_total", &self.out_total)
            .finish()
    }
}

fn to_f32(s: i16) -> f32 {
    f32::from(s) / 32768.0
}

fn to_i16(v: f32) -> i16 {
    // Saturating float-to-int cast: out-of-range (and NaN → 0) cannot wrap.
    (v * 32768.0).round().clamp(-32768.0, 32767.0) as i16
}

impl StreamResampler {
    /// A resampler from `rate` Hz to 48 kHz.
    pub fn new(rate: u32) -> Result<StreamResampler, ResampleError> {
        let fft = if rate == SAMPLE_RATE {
            None
        } else {
            if !(1000..=384_000).contains(&rate) {
                return Err(ResampleError {
                    rate,
                    reason: "rate out of range".into(),
                });
            }
            Some(
                Fft::<f32>::new(
                    rate as usize,
                    SAMPLE_RATE as usize,
                    CHUNK,
                    1,
                    FixedSync::Input,
                )
                .map_err(|e| ResampleError {
                    rate,
                    reason: e.to_string(),
                })?,
            )
        };
        let (out_max, skip) = fft
            .as_ref()
            .map_or((0, 0), |f| (f.output_frames_max(), f.output_delay()));
        Ok(StreamResampler {
            fft,
            rate,
            input: Vec::with_capacity(CHUNK * 2),
            output: vec![0.0; out_max],
            skip,
            in_total: 0,
            out_total: 0,
        })
    }

    /// The input rate.
    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Resamples what it can of `samples`; appends the 48 kHz result to `out`.
    pub fn push(&mut self, samples: &[i16], out: &mut Vec<i16>) {
        self.in_total += samples.len() as u64;
        if self.fft.is_none() {
            out.extend_from_slice(samples);
            self.out_total += samples.len() as u64;
            return;
        }
        self.input.extend(samples.iter().copied().map(to_f32));
        let mut consumed = 0;
        while self.input.len() - consumed >= self.next_input() {
            consumed += self.process(consumed, None, out);
        }
        self.input.drain(..consumed);
    }

    /// The clause ended: flushes everything still inside the resampler into `out` (exactly
    /// `ceil(n · 48000 / rate)` samples in all for the `n` input samples since the last
    /// finish) and resets for the next clause.
    pub fn finish(&mut self, out: &mut Vec<i16>) {
        if self.fft.is_some() {
            let expected = (self.in_total * u64::from(SAMPLE_RATE)).div_ceil(u64::from(self.rate));
            let left = self.input.len();
            let mut calls = 0;
            while self.out_total < expected && calls < 64 {
                let partial = if calls == 0 { left } else { 0 };
                self.process(0, Some(partial), out);
                calls += 1;
            }
            if self.out_total > expected {
                let extra = (self.out_total - expected) as usize;
                out.truncate(out.len().saturating_sub(extra));
            }
            if let Some(f) = self.fft.as_mut() {
                f.reset();
                self.skip = f.output_delay();
            }
        }
        self.input.clear();
        self.in_total = 0;
        self.out_total = 0;
    }

    fn next_input(&self) -> usize {
        self.fft.as_ref().map_or(1, |f| f.input_frames_next())
    }

    /// One resampler call on `input[from..]` (or a silence-padded partial chunk); returns the
    /// input frames it consumed.
    fn process(&mut self, from: usize, partial: Option<usize>, out: &mut Vec<i16>) -> usize {
        let Some(fft) = self.fft.as_mut() else {
            return 0;
        };
        let need = fft.input_frames_next();
        // A partial chunk still needs a full-size input buffer (the tail is read as silence).
        let padded;
        let input: &[f32] = match partial {
            Some(n) => {
                let mut v = vec![0.0; need];
                let n = n.min(self.input.len() - from).min(need);
                v[..n].copy_from_slice(&self.input[from..from + n]);
                padded = v;
                &padded
            }
            None => &self.input[from..from + need],
        };
        let frames_in = input.len();
        let indexing = Indexing {
            partial_len: partial,
            ..Indexing::default()
        };
        let out_cap = self.output.len();
        let result = match (
            InterleavedSlice::new(input, 1, frames_in),
            InterleavedSlice::new_mut(&mut self.output, 1, out_cap),
        ) {
            (Ok(i), Ok(mut o)) => fft.process_into_buffer(&i, &mut o, Some(&indexing)),
            _ => return need, // cannot happen: sizes come from the resampler itself
        };
        let Ok((used, written)) = result else {
            return need;
        };
        let drop = self.skip.min(written);
        self.skip -= drop;
        out.extend(self.output[drop..written].iter().copied().map(to_i16));
        self.out_total += (written - drop) as u64;
        if partial.is_some() {
            0
        } else {
            used
        }
    }
}

/// Cuts a stream of 48 kHz samples into 20 ms frames of s16le (1920 bytes).
#[derive(Debug)]
pub struct Framer {
    current: BytesMut,
}

impl Default for Framer {
    fn default() -> Self {
        Framer::new()
    }
}

impl Framer {
    /// An empty framer.
    pub fn new() -> Framer {
        Framer {
            current: BytesMut::with_capacity(FRAME_BYTES),
        }
    }

    /// Appends samples; every completed frame is pushed to `out`.
    pub fn push(&mut self, samples: &[i16], out: &mut VecDeque<Bytes>) {
        for &s in samples {
            self.current.put_i16_le(s);
            if self.current.len() == FRAME_BYTES {
                let full =
                    std::mem::replace(&mut self.current, BytesMut::with_capacity(FRAME_BYTES));
                out.push_back(full.freeze());
            }
        }
    }

    /// Zero-pads a partly filled frame to 1920 bytes and pushes it (nothing if empty).
    pub fn flush(&mut self, out: &mut VecDeque<Bytes>) {
        if !self.current.is_empty() {
            self.current.resize(FRAME_BYTES, 0);
            let full = std::mem::replace(&mut self.current, BytesMut::with_capacity(FRAME_BYTES));
            out.push_back(full.freeze());
        }
    }

    /// Samples waiting for a full frame.
    pub fn buffered_samples(&self) -> usize {
        self.current.len() / 2
    }
}

/// Frames needed for `samples` samples at 48 kHz (the last one padded).
pub fn frames_for_samples(samples: usize) -> usize {
    samples.div_ceil(FRAME_SAMPLES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(rate: u32, freq: f64, secs: f64, amp: f64) -> Vec<i16> {
        let n = (f64::from(rate) * secs) as usize;
        (0..n)
            .map(|i| {
                ((2.0 * std::f64::consts::PI * freq * i as f64 / f64::from(rate)).sin()
                    * amp
                    * 32767.0) as i16
            })
            .collect()
    }

    fn resample_all(rate: u32, input: &[i16], piece: usize) -> Vec<i16> {
        let mut r = StreamResampler::new(rate).unwrap();
        let mut out = Vec::new();
        for p in input.chunks(piece) {
            r.push(p, &mut out);
        }
        r.finish(&mut out);
        out
    }

    fn upward_crossings(s: &[i16]) -> usize {
        s.windows(2).filter(|w| w[0] < 0 && w[1] >= 0).count()
    }

    #[test]
    fn output_length_is_exact_for_any_piece_size() {
        for &n in &[0usize, 1, 100, 441, 511, 512, 513, 22050, 22051] {
            let input = vec![1000i16; n];
            for &piece in &[1usize, 37, 512, 4096] {
                let out = resample_all(22050, &input, piece);
                let expected = (n as u64 * 48000).div_ceil(22050) as usize;
                assert_eq!(out.len(), expected, "n={n} piece={piece}");
            }
        }
    }

    #[test]
    fn a_tone_keeps_its_pitch_and_level_and_is_not_delayed() {
        let input = sine(22050, 300.0, 1.0, 0.5);
        let out = resample_all(22050, &input, 1000);
        assert_eq!(out.len(), 48000);
        // 300 Hz → 300 upward zero crossings per second at the new rate too.
        let ups = upward_crossings(&out);
        assert!((298..=302).contains(&ups), "{ups}");
        let peak = out[2000..46000]
            .iter()
            .map(|v| v.unsigned_abs())
            .max()
            .unwrap();
        assert!((15_500..=17_000).contains(&peak), "peak {peak}");
        // Start-up delay removed: the tone is already there in the first 5 ms.
        let early = out[..240].iter().map(|v| v.unsigned_abs()).max().unwrap();
        assert!(
            early > 5_000,
            "leading silence: max {early} in the first 5 ms"
        );
    }

    #[test]
    fn the_resampler_is_reusable_after_finish() {
        let input = sine(22050, 500.0, 0.3, 0.4);
        let mut r = StreamResampler::new(22050).unwrap();
        let mut a = Vec::new();
        r.push(&input, &mut a);
        r.finish(&mut a);
        let mut b = Vec::new();
        r.push(&input, &mut b);
        r.finish(&mut b);
        assert_eq!(a, b, "same input after finish() gives the same output");
    }

    #[test]
    fn native_48k_passes_through_and_bad_rates_are_errors() {
        let input: Vec<i16> = (0..1000).map(|i| i as i16).collect();
        assert_eq!(resample_all(48000, &input, 333), input);
        assert!(StreamResampler::new(0).is_err());
        assert!(StreamResampler::new(10_000_000).is_err());
        assert!(StreamResampler::new(16000).is_ok());
    }

    #[test]
    fn framer_cuts_exact_frames_and_pads_the_last() {
        let mut f = Framer::new();
        let mut out = VecDeque::new();
        f.push(&vec![7i16; FRAME_SAMPLES * 2 + 10], &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(f.buffered_samples(), 10);
        f.flush(&mut out);
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|fr| fr.len() == FRAME_BYTES));
        let last = &out[2];
        assert_eq!(i16::from_le_bytes([last[18], last[19]]), 7);
        assert!(last[20..].iter().all(|&b| b == 0), "zero padded");
        f.flush(&mut out);
        assert_eq!(out.len(), 3, "flushing an empty framer adds nothing");
        assert_eq!(frames_for_samples(0), 0);
        assert_eq!(frames_for_samples(961), 2);
    }
}
