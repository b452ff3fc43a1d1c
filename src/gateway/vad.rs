//! Voice-activity detection on the client's microphone audio (binary WebSocket messages:
//! s16le mono PCM, 16 kHz unless the session asked for another rate with `?input_rate=`), so
//! that speech while audio plays is a barge-in (docs/PROTOCOL.md §1.2).
//!
//! Why an energy detector with hysteresis rather than a model: it decides per 20 ms window in
//! a few hundred nanoseconds on the core thread, allocates nothing, and needs no model file;
//! a barge-in has to be decided within tens of milliseconds of the user starting to talk.
//! Speech starts after [`VadConfig::speech_ms`] of consecutive windows above the threshold
//! (a cough or a click is shorter) and ends after [`VadConfig::silence_ms`] below it (the
//! pauses inside a sentence are shorter). Clients with echo (a speaker next to the microphone)
//! should cancel it before sending, as browsers do with `echoCancellation`.

/// Sample rates accepted for microphone audio.
pub const INPUT_RATES: [u32; 4] = [8_000, 16_000, 24_000, 48_000];
/// Default microphone sample rate (docs/PROTOCOL.md §1.2).
pub const DEFAULT_INPUT_RATE: u32 = 16_000;
/// Window the energy is measured over.
const WINDOW_MS: u32 = 20;

/// Detector settings (`duplex serve --vad-threshold-dbfs`, fixed timings).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VadConfig {
    /// RMS level, in dB relative to full scale, above which a window counts as speech.
    pub threshold_dbfs: f64,
    /// Consecutive speech needed to start (ms, multiple of 20).
    pub speech_ms: u32,
    /// Consecutive silence needed to end (ms, multiple of 20).
    pub silence_ms: u32,
}

impl Default for VadConfig {
    fn default() -> Self {
        VadConfig {
            threshold_dbfs: -35.0,
            speech_ms: 60,
            silence_ms: 400,
        }
    }
}

/// A change of state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VadEvent {
    /// The user started speaking.
    SpeechStart,
    /// The user stopped speaking.
    SpeechEnd,
}

/// The detector of one session.
#[derive(Debug, Clone)]
pub struct Vad {
    cfg: VadConfig,
    /// Samples per window.
    window: u32,
    /// Mean square (of samples scaled to ±1) at the threshold.
    threshold_ms: f64,
    /// Sum of squares and sample count of the window being filled.
    acc: f64,
    filled: u32,
    /// A byte left over from a message of odd length (the low byte of the next sample).
    carry: Option<u8>,
    /// Consecutive windows above / below the threshold.
    loud: u32,
    quiet: u32,
    speaking: bool,
}

impl Vad {
    /// A detector for `rate` Hz audio (one of [`INPUT_RATES`]; others are refused before).
    pub fn new(rate: u32, cfg: VadConfig) -> Vad {
        let amplitude = 10f64.powf(cfg.threshold_dbfs / 20.0);
        Vad {
            cfg,
            window: (rate * WINDOW_MS / 1000).max(1),
            threshold_ms: amplitude * amplitude,
            acc: 0.0,
            filled: 0,
            carry: None,
            loud: 0,
            quiet: 0,
            speaking: false,
        }
    }

    /// Whether the user is speaking now.
    pub fn speaking(&self) -> bool {
        self.speaking
    }

    /// Feeds PCM bytes (any length: a sample split across messages is joined) and calls `on`
    /// for every change of state, in order.
    pub fn feed(&mut self, pcm: &[u8], mut on: impl FnMut(VadEvent)) {
        let mut bytes = pcm;
        if let Some(lo) = self.carry.take() {
            match bytes.split_first() {
                Some((&hi, rest)) => {
                    self.sample(i16::from_le_bytes([lo, hi]), &mut on);
                    bytes = rest;
                }
                None => {
                    self.carry = Some(lo);
                    return;
                }
            }
        }
        let mut pairs = bytes.chunks_exact(2);
        for p in &mut pairs {
            self.sample(i16::from_le_bytes([p[0], p[1]]), &mut on);
        }
        if let [last] = pairs.remainder() {
            self.carry = Some(*last);
        }
    }

    fn sample(&mut self, s: i16, on: &mut impl FnMut(VadEvent)) {
        let x = f64::from(s) / 32768.0;
        self.acc += x * x;
        self.filled += 1;
        if self.filled < self.window {
            return;
        }
        let loud = self.acc / f64::from(self.window) >= self.threshold_ms;
        self.acc = 0.0;
        self.filled = 0;
        if loud {
            self.loud += 1;
            self.quiet = 0;
        } else {
            self.quiet += 1;
            self.loud = 0;
        }
        if !self.speaking && self.loud * WINDOW_MS >= self.cfg.speech_ms {
            self.speaking = true;
            on(VadEvent::SpeechStart);
        } else if self.speaking && self.quiet * WINDOW_MS >= self.cfg.silence_ms {
            self.speaking = false;
            on(VadEvent::SpeechEnd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ms` of a 300 Hz tone at `amplitude` (fraction of full scale), s16le at `rate`.
    fn tone(rate: u32, ms: u32, amplitude: f64) -> Vec<u8> {
        let n = rate * ms / 1000;
        (0..n)
            .flat_map(|i| {
                let t = f64::from(i) / f64::from(rate);
                let v = (2.0 * std::f64::consts::PI * 300.0 * t).sin() * amplitude * 32767.0;
                (v.round() as i16).to_le_bytes()
            })
            .collect()
    }

    fn events(vad: &mut Vad, pcm: &[u8]) -> Vec<VadEvent> {
        let mut v = Vec::new();
        vad.feed(pcm, |e| v.push(e));
        v
    }

    #[test]
    fn silence_and_quiet_noise_are_not_speech() {
        let mut vad = Vad::new(16_000, VadConfig::default());
        assert!(events(&mut vad, &vec![0u8; 32_000]).is_empty());
        // -50 dBFS is below the -35 dBFS threshold.
        assert!(events(&mut vad, &tone(16_000, 1000, 0.003)).is_empty());
        assert!(!vad.speaking());
    }

    #[test]
    fn speech_starts_after_60_ms_and_ends_after_400_ms_of_silence() {
        let mut vad = Vad::new(16_000, VadConfig::default());
        // 40 ms of voice is a click, not speech.
        assert!(events(&mut vad, &tone(16_000, 40, 0.3)).is_empty());
        assert!(events(&mut vad, &vec![0u8; 640]).is_empty());
        assert!(events(&mut vad, &tone(16_000, 60, 0.3)) == [VadEvent::SpeechStart]);
        assert!(vad.speaking());
        // A 200 ms pause inside a sentence keeps it going.
        assert!(events(&mut vad, &vec![0u8; 6400]).is_empty());
        assert!(events(&mut vad, &tone(16_000, 100, 0.3)).is_empty());
        assert_eq!(events(&mut vad, &vec![0u8; 12_800]), [VadEvent::SpeechEnd]);
        assert!(!vad.speaking());
    }

    #[test]
    fn samples_split_across_messages_of_odd_length_are_joined() {
        let pcm = tone(48_000, 100, 0.3);
        let mut whole = Vad::new(48_000, VadConfig::default());
        let mut split = Vad::new(48_000, VadConfig::default());
        let a = events(&mut whole, &pcm);
        let mut b = Vec::new();
        for chunk in pcm.chunks(333) {
            split.feed(chunk, |e| b.push(e));
        }
        split.feed(&[], |e| b.push(e));
        assert_eq!(a, [VadEvent::SpeechStart]);
        assert_eq!(a, b);
    }

    #[test]
    fn the_threshold_is_configurable() {
        let quiet = tone(16_000, 200, 0.003); // ≈ -53 dBFS RMS
        let cfg = VadConfig {
            threshold_dbfs: -60.0,
            ..VadConfig::default()
        };
        assert_eq!(
            events(&mut Vad::new(16_000, cfg), &quiet),
            [VadEvent::SpeechStart]
        );
    }
}
