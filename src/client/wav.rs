//! A WAV file writer for 48 kHz mono s16le, streamed as frames arrive.
//!
//! Why hand-written: the format is a 44-byte header, and writing it ourselves lets the file
//! grow frame by frame (a long interactive session never sits in memory) with the sizes
//! patched in at the end. Players read the result as a normal PCM WAV.

use std::io::{self, Seek, SeekFrom, Write};

use crate::audio::SAMPLE_RATE;

/// Bytes before the first sample.
pub const HEADER_BYTES: usize = 44;

/// The canonical 44-byte header for `data_bytes` of 16-bit mono PCM at `rate`.
pub fn header(rate: u32, data_bytes: u32) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[0..4].copy_from_slice(b"RIFF");
    h[4..8].copy_from_slice(&data_bytes.saturating_add(36).to_le_bytes());
    h[8..16].copy_from_slice(b"WAVEfmt ");
    h[16..20].copy_from_slice(&16u32.to_le_bytes()); // fmt chunk size
    h[20..22].copy_from_slice(&1u16.to_le_bytes()); // PCM
    h[22..24].copy_from_slice(&1u16.to_le_bytes()); // mono
    h[24..28].copy_from_slice(&rate.to_le_bytes());
    h[28..32].copy_from_slice(&(rate * 2).to_le_bytes()); // byte rate
    h[32..34].copy_from_slice(&2u16.to_le_bytes()); // block align
    h[34..36].copy_from_slice(&16u16.to_le_bytes()); // bits per sample
    h[36..40].copy_from_slice(b"data");
    h[40..44].copy_from_slice(&data_bytes.to_le_bytes());
    h
}

/// Writes PCM after a header and fixes the header's sizes on [`WavWriter::finish`].
#[derive(Debug)]
pub struct WavWriter<W: Write + Seek> {
    out: W,
    data_bytes: u64,
}

impl<W: Write + Seek> WavWriter<W> {
    /// Writes a provisional header (sizes 0) to `out`.
    pub fn new(mut out: W) -> io::Result<WavWriter<W>> {
        out.write_all(&header(SAMPLE_RATE, 0))?;
        Ok(WavWriter { out, data_bytes: 0 })
    }

    /// Appends s16le samples.
    pub fn write(&mut self, pcm: &[u8]) -> io::Result<()> {
        self.out.write_all(pcm)?;
        self.data_bytes += pcm.len() as u64;
        Ok(())
    }

    /// Bytes of PCM written so far.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Patches the sizes into the header and flushes; returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        let data = u32::try_from(self.data_bytes).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "more than 4 GiB of audio for one WAV",
            )
        })?;
        self.out.seek(SeekFrom::Start(0))?;
        self.out.write_all(&header(SAMPLE_RATE, data))?;
        self.out.seek(SeekFrom::End(0))?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn hound_reads_what_we_write() {
        let mut w = WavWriter::new(Cursor::new(Vec::new())).unwrap();
        let samples: Vec<i16> = (0..4800)
            .map(|i| ((i % 200) * 100 - 10000) as i16)
            .collect();
        let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        w.write(&bytes[..1000]).unwrap();
        w.write(&bytes[1000..]).unwrap();
        assert_eq!(w.data_bytes(), 9600);
        let file = w.finish().unwrap().into_inner();
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
        let file = WavWriter::new(Cursor::new(Vec::new()))
            .unwrap()
            .finish()
            .unwrap()
            .into_inner();
        let r = hound::WavReader::new(Cursor::new(file)).unwrap();
        assert_eq!(r.len(), 0);
    }
}
