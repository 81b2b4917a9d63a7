//! Mapping value (spec §7.1): `(data_block << 24) | (time & 0xFFFFFF)` as a LE u64.
//! Data blocks are 40 bits; times are masked to 24 bits when packed (§11).
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use crate::codec::{Pack, Reader, Unpack, Writer};
use crate::error::{err, ErrorKind, Result};

/// Bits of the time field.
pub const TIME_BITS: u32 = 24;
/// Largest time value.
pub const TIME_MASK: u64 = (1 << TIME_BITS) - 1;
/// Largest data block number (40 bits).
pub const MAX_DATA_BLOCK: u64 = (1 << 40) - 1;

/// A mapping's data block and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockTime {
    /// Data block (< 2^40).
    pub block: u64,
    /// Pool time of the write (< 2^24).
    pub time: u32,
}

impl BlockTime {
    /// Encode to the on-disk u64; Err if the block does not fit 40 bits.
    pub fn to_u64(self) -> Result<u64> {
        if self.block > MAX_DATA_BLOCK {
            return err(
                ErrorKind::InvalidArgument,
                format!("data block {} > 2^40-1", self.block),
            );
        }
        Ok((self.block << TIME_BITS) | (u64::from(self.time) & TIME_MASK))
    }

    /// Decode the on-disk u64.
    pub fn from_u64(v: u64) -> BlockTime {
        BlockTime {
            block: v >> TIME_BITS,
            time: (v & TIME_MASK) as u32,
        }
    }
}

impl Pack for BlockTime {
    const DISK_SIZE: usize = 8;
    fn pack(&self, w: &mut Writer<'_>) -> Result<()> {
        w.u64(self.to_u64()?)
    }
}

impl Unpack for BlockTime {
    const DISK_SIZE: usize = 8;
    fn unpack(r: &mut Reader<'_>) -> Result<Self> {
        Ok(BlockTime::from_u64(r.u64()?))
    }
}
