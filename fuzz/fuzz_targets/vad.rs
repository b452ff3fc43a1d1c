//! Microphone audio through the voice-activity detector (`duplex::gateway::vad::Vad`) at every
//! accepted input rate: arbitrary bytes, odd lengths, any cut.
//!
//! Promises checked:
//! - no panic (no overflow, no out-of-bounds on a sample split across messages);
//! - events alternate, starting with `SpeechStart`, and `speaking()` matches the last one;
//! - at most one event per 20 ms window of samples;
//! - the events do not depend on how the bytes were cut into messages ("any length: a
//!   sample split across messages is joined").
#![no_main]

use duplex::gateway::vad::{Vad, VadConfig, VadEvent, INPUT_RATES};
use libfuzzer_sys::fuzz_target;

fn events(rate: u32, cfg: VadConfig, pieces: &[&[u8]]) -> (Vec<VadEvent>, bool) {
    let mut vad = Vad::new(rate, cfg);
    let mut out = Vec::new();
    for p in pieces {
        vad.feed(p, |e| out.push(e));
        let expect = out.last() == Some(&VadEvent::SpeechStart);
        assert_eq!(
            vad.speaking(),
            expect,
            "speaking() disagrees with the events"
        );
    }
    (out, vad.speaking())
}

fuzz_target!(|data: &[u8]| {
    let configs = [
        VadConfig::default(),
        // Hair-trigger: every window can change the state.
        VadConfig {
            threshold_dbfs: -40.0,
            speech_ms: 20,
            silence_ms: 20,
        },
    ];
    for rate in INPUT_RATES {
        let window = (rate * 20 / 1000) as usize;
        for cfg in configs {
            let (whole, speaking) = events(rate, cfg, &[data]);
            for (i, e) in whole.iter().enumerate() {
                let want = if i % 2 == 0 {
                    VadEvent::SpeechStart
                } else {
                    VadEvent::SpeechEnd
                };
                assert_eq!(*e, want, "events must alternate: {whole:?}");
            }
            assert!(whole.len() <= data.len() / 2 / window + 1);
            for variant in 0..2 {
                let pieces = duplex_fuzz::split(data, variant);
                let (cut, speaking2) = events(rate, cfg, &pieces);
                assert_eq!(whole, cut, "events depend on the cut");
                assert_eq!(speaking, speaking2);
            }
        }
    }
});
