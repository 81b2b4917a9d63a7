//! Offsets and verify patterns: a small seeded generator, and the stamp written by `-w verify`
//! and checked on read-back.
//!
//! A stamp is a function of (seed, byte offset, tag), word by word, so a read that returns data
//! of another offset, an older write of the same offset (another tag), zeroes, or a torn mix
//! of two writes does not match.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::indexing_slicing))]

/// splitmix64: a full-period mixer, good enough for offsets and stamps.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seeded generator of uniform indices.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `0..n` (`n` > 0), by multiply-shift.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// The first word of the stamp of (`seed`, `offset_bytes`, `tag`).
fn stamp_base(seed: u64, offset_bytes: u64, tag: u64) -> u64 {
    mix(seed ^ mix(offset_bytes) ^ tag.rotate_left(32))
}

const STRIDE: u64 = 0xD1B5_4A32_D192_ED03;

/// Fills `buf` (a multiple of 8 bytes) with the stamp of (`seed`, `offset_bytes`, `tag`).
pub fn stamp(buf: &mut [u8], seed: u64, offset_bytes: u64, tag: u64) {
    let mut w = stamp_base(seed, offset_bytes, tag);
    for chunk in buf.chunks_exact_mut(8) {
        chunk.copy_from_slice(&w.to_le_bytes());
        w = w.wrapping_add(STRIDE);
    }
}

/// The byte index of the first word of `buf` that differs from the stamp, if any.
pub fn first_mismatch(buf: &[u8], seed: u64, offset_bytes: u64, tag: u64) -> Option<usize> {
    let mut w = stamp_base(seed, offset_bytes, tag);
    for (i, chunk) in buf.chunks_exact(8).enumerate() {
        if chunk != w.to_le_bytes() {
            return Some(i * 8);
        }
        w = w.wrapping_add(STRIDE);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips_and_catches_wrong_data() {
        let mut b = vec![0u8; 4096];
        stamp(&mut b, 1, 8192, 5);
        assert_eq!(first_mismatch(&b, 1, 8192, 5), None);
        assert_eq!(first_mismatch(&b, 1, 4096, 5), Some(0), "other offset");
        assert_eq!(first_mismatch(&b, 1, 8192, 6), Some(0), "older write");
        assert_eq!(first_mismatch(&b, 2, 8192, 5), Some(0), "other seed");
        assert_eq!(first_mismatch(&[0u8; 4096], 1, 8192, 5), Some(0), "zeroes");
        let mut torn = b.clone();
        let mut other = vec![0u8; 4096];
        stamp(&mut other, 1, 8192, 4);
        torn[2048..].copy_from_slice(&other[2048..]);
        assert_eq!(first_mismatch(&torn, 1, 8192, 5), Some(2048), "torn");
        b[4095] ^= 1;
        assert_eq!(first_mismatch(&b, 1, 8192, 5), Some(4088), "one bit");
    }

    #[test]
    fn rng_is_seeded_and_in_range() {
        let a: Vec<u64> = {
            let mut r = Rng::new(9);
            (0..100).map(|_| r.below(10)).collect()
        };
        let mut r = Rng::new(9);
        let b: Vec<u64> = (0..100).map(|_| r.below(10)).collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|&v| v < 10));
        let mut seen = [false; 10];
        for v in a {
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|&s| s), "all of 0..10 hit in 100 draws");
        assert_eq!(Rng::new(1).below(1), 0);
    }
}
