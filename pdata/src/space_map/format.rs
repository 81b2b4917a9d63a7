//! Space-map on-disk structures (spec §4, §5.2, §5.4, §5.6).
//!
//! Space-map root blob (first 32 bytes of a 128-byte superblock area):
//! `nr_blocks u64 | nr_allocated u64 | bitmap_root u64 | ref_count_root u64`.
//!
//! Index entry (16 bytes): `blocknr u64 | nr_free u32 | none_free_before u32`.
//!
//! Bitmap block: `csum u32 | not_used u32 | blocknr u64 | 510 LE u64 words`; entry `e` is in
//! word `e/32`; with `j = e%32`, bit `2j` is the HIGH bit and bit `2j+1` the LOW bit of the
//! 2-bit count (3 = look in the overflow ref-count tree).
//!
//! Metadata index block: `csum u32 | padding u32 | blocknr u64 | 255 index entries`.
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use crate::block_io::BLOCK_SIZE;
use crate::codec::{Pack, Reader, Unpack, Writer};
use crate::error::{err, ErrorKind, Result};

/// Bitmap block header size.
pub const BITMAP_HEADER_SIZE: usize = 16;
/// Entries per bitmap block: (4096 − 16) × 4.
pub const ENTRIES_PER_BITMAP: u64 = ((BLOCK_SIZE - BITMAP_HEADER_SIZE) * 4) as u64;
const _: () = assert!(ENTRIES_PER_BITMAP == 16320);
/// Entries per bitmap u64 word.
pub const ENTRIES_PER_WORD: u64 = 32;
/// Index entries in the metadata index block.
pub const MAX_METADATA_BITMAPS: usize = 255;
/// Index block header size.
pub const INDEX_HEADER_SIZE: usize = 16;
const _: () = assert!(INDEX_HEADER_SIZE + MAX_METADATA_BITMAPS * IndexEntry::SIZE == BLOCK_SIZE);
/// Largest metadata device (`DM_SM_METADATA_MAX_BLOCKS`).
pub const MAX_METADATA_BLOCKS: u64 = MAX_METADATA_BITMAPS as u64 * ENTRIES_PER_BITMAP;
const _: () = assert!(MAX_METADATA_BLOCKS == 4_161_600);
/// Size of the sm root blob.
pub const SM_ROOT_SIZE: usize = 32;
/// Size of the superblock area that holds a root blob.
pub const SM_ROOT_AREA_SIZE: usize = 128;

/// Index entry: where a bitmap lives and its free-space hints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexEntry {
    /// Location of the bitmap block.
    pub blocknr: u64,
    /// Free (zero) entries in the bitmap (hint; never an underestimate).
    pub nr_free: u32,
    /// Every entry below this is known in use (hint; never too late).
    pub none_free_before: u32,
}

impl IndexEntry {
    /// Packed size.
    pub const SIZE: usize = 16;
}

impl Pack for IndexEntry {
    const DISK_SIZE: usize = 16;
    fn pack(&self, w: &mut Writer<'_>) -> Result<()> {
        w.u64(self.blocknr)?;
        w.u32(self.nr_free)?;
        w.u32(self.none_free_before)
    }
}

impl Unpack for IndexEntry {
    const DISK_SIZE: usize = 16;
    fn unpack(r: &mut Reader<'_>) -> Result<Self> {
        Ok(IndexEntry {
            blocknr: r.u64()?,
            nr_free: r.u32()?,
            none_free_before: r.u32()?,
        })
    }
}

/// Space-map root blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SmRoot {
    /// Blocks managed.
    pub nr_blocks: u64,
    /// Blocks with a non-zero count.
    pub nr_allocated: u64,
    /// Metadata sm: index block; data sm: bitmap-index B-tree root.
    pub bitmap_root: u64,
    /// Overflow ref-count B-tree root.
    pub ref_count_root: u64,
}

impl Pack for SmRoot {
    const DISK_SIZE: usize = SM_ROOT_SIZE;
    fn pack(&self, w: &mut Writer<'_>) -> Result<()> {
        w.u64(self.nr_blocks)?;
        w.u64(self.nr_allocated)?;
        w.u64(self.bitmap_root)?;
        w.u64(self.ref_count_root)
    }
}

impl Unpack for SmRoot {
    const DISK_SIZE: usize = SM_ROOT_SIZE;
    fn unpack(r: &mut Reader<'_>) -> Result<Self> {
        let root = SmRoot {
            nr_blocks: r.u64()?,
            nr_allocated: r.u64()?,
            bitmap_root: r.u64()?,
            ref_count_root: r.u64()?,
        };
        Ok(root)
    }
}

/// Byte offset and bit shift of bitmap entry `e` (< ENTRIES_PER_BITMAP).
fn entry_pos(e: u64) -> (usize, u32) {
    let word = (e / ENTRIES_PER_WORD) as usize;
    (
        BITMAP_HEADER_SIZE + 8 * word,
        2 * (e % ENTRIES_PER_WORD) as u32,
    )
}

fn word_at(buf: &[u8; BLOCK_SIZE], off: usize) -> Result<u64> {
    crate::codec::le64_at(buf, off)
}

/// 2-bit count of entry `e` in a bitmap block.
pub fn bitmap_get(buf: &[u8; BLOCK_SIZE], e: u64) -> Result<u32> {
    if e >= ENTRIES_PER_BITMAP {
        return err(
            ErrorKind::InvalidArgument,
            format!("bitmap entry {e} out of range"),
        );
    }
    let (off, j) = entry_pos(e);
    let w = word_at(buf, off)?;
    let hi = ((w >> j) & 1) as u32;
    let lo = ((w >> (j + 1)) & 1) as u32;
    Ok((hi << 1) | lo)
}

/// Set the 2-bit count (0..=3) of entry `e`.
pub fn bitmap_set(buf: &mut [u8; BLOCK_SIZE], e: u64, v: u32) -> Result<()> {
    if e >= ENTRIES_PER_BITMAP || v > 3 {
        return err(
            ErrorKind::InvalidArgument,
            format!("bitmap set {e}={v} out of range"),
        );
    }
    let (off, j) = entry_pos(e);
    let mut w = word_at(buf, off)?;
    w &= !(0b11u64 << j);
    w |= u64::from(v >> 1) << j;
    w |= u64::from(v & 1) << (j + 1);
    match buf.get_mut(off..off + 8) {
        Some(dst) => {
            dst.copy_from_slice(&w.to_le_bytes());
            Ok(())
        }
        None => err(ErrorKind::InvalidArgument, "bitmap word out of range"),
    }
}

/// First entry `>= from` with count 0 among the first `limit` entries, if any.
pub fn bitmap_find_free(buf: &[u8; BLOCK_SIZE], from: u64, limit: u64) -> Result<Option<u64>> {
    let limit = limit.min(ENTRIES_PER_BITMAP);
    let mut e = from;
    while e < limit {
        let (off, j) = entry_pos(e);
        let w = word_at(buf, off)?;
        // Both bits of an entry zero <=> free. Fold pairs: bit 2j set if entry j non-zero.
        let used = (w | (w >> 1)) & 0x5555_5555_5555_5555;
        let free_mask = !used & 0x5555_5555_5555_5555 & (u64::MAX << j);
        if free_mask != 0 {
            let cand = e - (e % ENTRIES_PER_WORD) + u64::from(free_mask.trailing_zeros() / 2);
            return Ok((cand < limit).then_some(cand));
        }
        e = e - (e % ENTRIES_PER_WORD) + ENTRIES_PER_WORD;
    }
    Ok(None)
}

/// Number of non-zero entries among the first `limit`.
pub fn bitmap_nr_used(buf: &[u8; BLOCK_SIZE], limit: u64) -> Result<u64> {
    let limit = limit.min(ENTRIES_PER_BITMAP);
    let mut n = 0u64;
    let words = limit.div_ceil(ENTRIES_PER_WORD);
    for wi in 0..words {
        let w = word_at(buf, BITMAP_HEADER_SIZE + 8 * wi as usize)?;
        let mut used = (w | (w >> 1)) & 0x5555_5555_5555_5555;
        let valid = limit - wi * ENTRIES_PER_WORD;
        if valid < ENTRIES_PER_WORD {
            used &= (1u64 << (2 * valid)) - 1;
        }
        n += u64::from(used.count_ones());
    }
    Ok(n)
}

/// Decode the 255 entries of a metadata index block.
pub fn unpack_index_block(buf: &[u8; BLOCK_SIZE]) -> Result<Vec<IndexEntry>> {
    let mut r = Reader::new(buf);
    r.skip(INDEX_HEADER_SIZE)?;
    let mut v = Vec::with_capacity(MAX_METADATA_BITMAPS);
    for _ in 0..MAX_METADATA_BITMAPS {
        v.push(IndexEntry::unpack(&mut r)?);
    }
    Ok(v)
}

/// Encode index entries into a metadata index block (unused slots zero).
pub fn pack_index_block(entries: &[IndexEntry], buf: &mut [u8; BLOCK_SIZE]) -> Result<()> {
    if entries.len() > MAX_METADATA_BITMAPS {
        return err(
            ErrorKind::Limit,
            format!("{} metadata bitmaps > 255", entries.len()),
        );
    }
    buf.fill(0);
    let mut w = Writer::new(buf);
    w.zeros(INDEX_HEADER_SIZE)?;
    for e in entries {
        e.pack(&mut w)?;
    }
    Ok(())
}
