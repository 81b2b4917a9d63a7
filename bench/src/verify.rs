//! Verify patterns: every block written by `-w verify` carries its own LBA and a seed, and the
//! read-back is checked against the pattern regenerated from them.
//!
//! Block layout (little-endian u64 words, `block_size` a multiple of 8):
//!
//! | word | value |
//! | --- | --- |
//! | 0 | the block's LBA |
//! | 1 | the seed of the write that stamped it |
//! | 2.. | `fill(lba, seed) + i * GOLDEN`, a cheap sequence distinct per (lba, seed) |
//!
//! Because the header names the LBA and seed, a mismatch report says not only where the data
//! is wrong but what it is instead: a stale write (same LBA, older seed), a misdirected write
//! (other LBA) or garbage. Before a read-back the header word of each block is poisoned, so a
//! read that does not deliver data into the buffer is caught, not passed vacuously.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::indexing_slicing))]

use std::fmt;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const WORD: usize = 8;
/// XORed into the seed to make a pattern that is valid-looking but not the one expected
/// (`--inject-corruption`).
pub const FOREIGN_SEED_XOR: u64 = 0xBAD0_BAD0_BAD0_BAD0;

#[inline]
fn fill_start(lba: u64, seed: u64) -> u64 {
    (lba ^ seed.rotate_left(29)).wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ GOLDEN
}

#[inline]
fn put_word(chunk: &mut [u8], v: u64) {
    chunk.copy_from_slice(&v.to_le_bytes());
}

#[inline]
fn get_word(chunk: &[u8]) -> u64 {
    let mut w = [0u8; WORD];
    w.copy_from_slice(chunk);
    u64::from_le_bytes(w)
}

/// Writes the pattern of blocks `first_lba..` into `buf` (a whole number of blocks).
pub fn stamp(buf: &mut [u8], block_size: usize, first_lba: u64, seed: u64) {
    assert!(
        block_size >= 2 * WORD && block_size.is_multiple_of(WORD),
        "block size {block_size}"
    );
    assert!(
        buf.len().is_multiple_of(block_size),
        "buffer is not whole blocks"
    );
    for (lba, block) in (first_lba..).zip(buf.chunks_exact_mut(block_size)) {
        let mut x = fill_start(lba, seed);
        for (i, chunk) in block.chunks_exact_mut(WORD).enumerate() {
            let v = match i {
                0 => lba,
                1 => seed,
                _ => x,
            };
            put_word(chunk, v);
            x = x.wrapping_add(GOLDEN);
        }
    }
}

/// Overwrites the LBA word of every block with a value no pattern of that LBA has, so a read
/// that leaves the buffer untouched fails the check.
pub fn poison(buf: &mut [u8], block_size: usize, first_lba: u64) {
    for (lba, block) in (first_lba..).zip(buf.chunks_exact_mut(block_size)) {
        if let Some(chunk) = block.get_mut(..WORD) {
            put_word(chunk, !lba);
        }
    }
}

/// Where and how a read-back differs from the pattern written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The block whose data is wrong.
    pub lba: u64,
    /// First differing byte within that block.
    pub byte_in_block: usize,
    /// Seed of the write that should be there.
    pub expected_seed: u64,
    /// LBA word found in the block.
    pub found_lba: u64,
    /// Seed word found in the block.
    pub found_seed: u64,
    /// Block size, to print the byte offset.
    pub block_size: usize,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let byte_offset = self.lba.saturating_mul(self.block_size as u64);
        write!(
            f,
            "miscompare at LBA {} (byte offset {byte_offset}, +{} in block): expected seed {:#x}, \
             block holds LBA {} seed {:#x}",
            self.lba, self.byte_in_block, self.expected_seed, self.found_lba, self.found_seed
        )?;
        if self.found_lba == !self.lba {
            f.write_str(" (read returned no data)")?;
        } else if self.found_lba == self.lba && self.found_seed != self.expected_seed {
            f.write_str(" (stale or foreign write)")?;
        } else if self.found_lba != self.lba {
            f.write_str(" (data of another block)")?;
        }
        Ok(())
    }
}

/// Checks that `buf` holds exactly the pattern `stamp(buf, block_size, first_lba, seed)` wrote.
pub fn check(buf: &[u8], block_size: usize, first_lba: u64, seed: u64) -> Result<(), Mismatch> {
    assert!(
        block_size >= 2 * WORD && block_size.is_multiple_of(WORD),
        "block size {block_size}"
    );
    for (lba, block) in (first_lba..).zip(buf.chunks_exact(block_size)) {
        let mut x = fill_start(lba, seed);
        for (i, chunk) in block.chunks_exact(WORD).enumerate() {
            let expected = match i {
                0 => lba,
                1 => seed,
                _ => x,
            };
            let found = get_word(chunk);
            if found != expected {
                let byte = i * WORD + first_diff_byte(found, expected);
                return Err(Mismatch {
                    lba,
                    byte_in_block: byte,
                    expected_seed: seed,
                    found_lba: block.get(..WORD).map(get_word).unwrap_or(0),
                    found_seed: block.get(WORD..2 * WORD).map(get_word).unwrap_or(0),
                    block_size,
                });
            }
            x = x.wrapping_add(GOLDEN);
        }
    }
    Ok(())
}

fn first_diff_byte(a: u64, b: u64) -> usize {
    ((a ^ b).trailing_zeros() / 8) as usize
}

#[cfg(test)]
mod tests;
