//! Helpers shared by the fuzz targets: deterministic, input-derived ways to cut a byte stream
//! into the pieces a socket or a pipe might deliver.
//!
//! The split points are drawn from a small PRNG seeded with a hash of the input, so the seed
//! files stay real protocol bytes (no control prefix) while every input is still fed in many
//! different shapes, and a crash reproduces from the input file alone.

/// FNV-1a of `data`: the seed of the split PRNG.
pub fn hash(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// xorshift64* (no dependency, identical on every platform).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }
}

/// Cuts `data` into consecutive pieces (some empty, some a single byte, some large) whose
/// concatenation is `data`. `variant` picks a different cut of the same input.
pub fn split(data: &[u8], variant: u64) -> Vec<&[u8]> {
    let mut rng = Rng::new(hash(data) ^ variant.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = match rng.below(8) {
            0 => 0,
            1 | 2 => 1,
            3 => 2 + rng.below(4),
            4 | 5 => rng.below(64),
            _ => rng.below(rest.len() + 1),
        }
        .min(rest.len());
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
    }
    out
}

/// Like [`split`] but cuts only on `char` boundaries of `s` (a cut inside a character moves
/// to the character's end). The pieces concatenate to `s`; some may be empty.
pub fn split_str(s: &str, variant: u64) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for mut end in cut_points(s.as_bytes(), variant) {
        while !s.is_char_boundary(end) {
            end += 1;
        }
        let end = end.max(start);
        out.push(&s[start..end]);
        start = end;
    }
    out
}

/// The pieces `split` would produce, as byte offsets of their ends (for feeding a buffer that
/// grows, like a request head read from a socket).
pub fn cut_points(data: &[u8], variant: u64) -> Vec<usize> {
    let mut at = 0;
    split(data, variant)
        .into_iter()
        .map(|p| {
            at += p.len();
            at
        })
        .collect()
}
