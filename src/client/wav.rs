//! A WAV file writer for 48 kHz mono s16le, streamed as frames arrive.
//!
//! Why `hound`: it writes the header, streams the samples to the file as they come (a long
//! interactive session never sits in memory) and patches the sizes in on finish; players read
//! the result as a normal 16-bit PCM WAV. This wrapper takes the protocol's byte frames.

use std::io::{self, Seek, Write};

use crate::audio::SAMPLE_RATE;

/// Bytes before the first sample (hound's canonical PCM header for 16-bit mono).
pub const HEADER_BYTES: usize = 44;

fn io_err(e: hound::Error) -> io::Error {
    match e {
        hound::Error::IoError(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

/// Writes s16le PCM into a WAV stream; [`WavWriter::finish`] finalises the sizes.
pub struct WavWriter<W: Write + Seek> {
    out: hound::WavWriter<W>,
    data_bytes: u64,
    /// The first byte of a sample split across two writes.
    carry: Option<u8>,
}

impl<W: Write + Seek> WavWriter<W> {
    /// Writes a provisional header to `out` (pass `&mut w` to keep `w` after finishing).
    pub fn new(out: W) -> io::Result<WavWriter<W>> {
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: SAMPLE_RATE,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        Ok(WavWriter {
            out: hound::WavWriter::new(out, spec).map_err(io_err)?,
            data_bytes: 0,
            carry: None,
        })
    }

    /// Appends s16le samples (a sample may be split across calls).
    pub fn write(&mut self, mut pcm: &[u8]) -> io::Result<()> {
        self.data_bytes += pcm.len() as u64;
        if let Some(lo) = self.carry.take() {
            let Some((&hi, rest)) = pcm.split_first() else {
                self.carry = Some(lo);
                return Ok(());
            };
            self.out
                .write_sample(i16::from_le_bytes([lo, hi]))
                .map_err(io_err)?;
            pcm = rest;
        }
        let mut samples = pcm.chunks_exact(2);
        for s in &mut samples {
            self.out
                .write_sample(i16::from_le_bytes([s[0], s[1]]))
                .map_err(io_err)?;
        }
        self.carry = samples.remainder().first().copied();
        Ok(())
    }

    /// Bytes of PCM written so far.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Writes the final sizes into the header and flushes. A trailing half sample is dropped.
    pub fn finish(self) -> io::Result<()> {
        self.out.finalize().map_err(io_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn hound_reads_what_we_write() {
        let mut file = Cursor::new(Vec::new());
        let mut w = WavWriter::new(&mut file).unwrap();
        let samples: Vec<i16> = (0..4800)
            .map(|i| ((i % 200) * 100 - 10000) as i16)
            .collect();
        let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        // Split mid-sample on purpose.
        w.write(&bytes[..1001]).unwrap();
        w.write(&bytes[1001..]).unwrap();
        assert_eq!(w.data_bytes(), 9600);
        w.finish().unwrap();
        let file = file.into_inner();
        assert_eq!(file.len(), HEADER_BYTES + 9600);
        let mut r = hound::WavReader::new(Cursor::new(file)).unwrap();
        let spec = r.spec();
        assert_eq!(spec.sample_rate, 48_000);
        assert_eq!(spec.channels, 1);
        assert_eq!(spec.bits_per_sample, 16);
        assert_eq!(spec.sample_format, hound::SampleFormat::Int);
        let back: Vec<i16> = r.samples::<i16>().map(Result::unwrap).collect();
        assert_eq!(back, samples);
    }

    #[test]
    fn an_empty_file_is_still_valid() {
        let mut file = Cursor::new(Vec::new());
        WavWriter::new(&mut file).unwrap().finish().unwrap();
        let file = file.into_inner();
        assert_eq!(file.len(), HEADER_BYTES);
        let r = hound::WavReader::new(Cursor::new(file)).unwrap();
        assert_eq!(r.len(), 0);
    }
}
