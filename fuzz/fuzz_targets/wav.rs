//! The incremental WAV reader the espeak worker reads `espeak-ng --stdout` with
//! (`duplex::worker::wav::WavReader`).
//!
//! Promises checked:
//! - no panic (short chunks, odd sizes, huge or odd chunk sizes, a sample split across reads);
//! - the outcome (sample rate, samples, or the error) does not depend on how the stream was
//!   cut into reads (whole, byte by byte, random pieces);
//! - the header buffer stays bounded: an error or a sample rate by `MAX_HEADER_BYTES` plus
//!   the read that crossed it;
//! - the samples are the little-endian 16-bit words at the end of the stream (the data chunk
//!   runs to the end, whatever its header says), at most one odd byte held back.
#![no_main]

use duplex::worker::wav::{WavError, WavReader, MAX_HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq)]
struct Outcome {
    rate: Option<u32>,
    samples: Vec<i16>,
    error: Option<WavError>,
}

fn read(pieces: &[&[u8]]) -> Outcome {
    let mut r = WavReader::new();
    let mut samples = Vec::new();
    let mut fed = 0;
    for p in pieces {
        fed += p.len();
        match r.push(p, &mut samples) {
            Ok(()) => {
                if r.sample_rate().is_none() {
                    assert!(samples.is_empty());
                    assert!(
                        fed <= MAX_HEADER_BYTES,
                        "still reading a header after {fed} bytes"
                    );
                }
            }
            Err(error) => {
                return Outcome {
                    rate: r.sample_rate(),
                    samples,
                    error: Some(error),
                };
            }
        }
    }
    Outcome {
        rate: r.sample_rate(),
        samples,
        error: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let whole = read(&[data]);
    if let Some(rate) = whole.rate {
        assert_ne!(rate, 0);
        assert!(whole.error.is_none());
        let n = whole.samples.len() * 2;
        let ok = (0..=1).any(|odd| {
            data.len() >= n + odd
                && data[data.len() - odd - n..data.len() - odd]
                    .chunks_exact(2)
                    .map(|p| i16::from_le_bytes([p[0], p[1]]))
                    .eq(whole.samples.iter().copied())
        });
        assert!(ok, "samples are not the tail of the stream");
    } else {
        assert!(whole.samples.is_empty());
    }

    if data.len() <= 2 * MAX_HEADER_BYTES {
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(read(&bytes), whole, "byte by byte");
    }
    for variant in 0..2 {
        let pieces = duplex_fuzz::split(data, variant);
        assert_eq!(read(&pieces), whole, "cut {variant}");
    }
});
