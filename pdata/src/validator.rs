//! Per-block-type validators: the only checksum code (STYLE rule 5). The block manager runs
//! [`Validator::check`] on every block read from the device and [`Validator::prepare_for_write`]
//! on every block written to it.
//!
//! Every checksummed block type stores `csum: u32` at offset 0 (over bytes 4..4096) and its own
//! location `blocknr: u64` at offset 8 (spec §2).
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::fmt::Debug;

use crate::block_io::BLOCK_SIZE;
use crate::checksum::block_checksum;
use crate::codec::{le32_at, le64_at};
use crate::error::{err, ErrorKind, Result};

/// Offset of the stored checksum.
pub const CSUM_OFFSET: usize = 0;
/// Offset of the stored block number.
pub const BLOCKNR_OFFSET: usize = 8;

/// A block type's validation rules.
pub trait Validator: Debug + Send + Sync {
    /// Block type name for error messages.
    fn name(&self) -> &'static str;
    /// Checksum salt of this block type.
    fn salt(&self) -> u32;
    /// Type-specific structural checks (magic, node header, ...), after blocknr and checksum.
    fn check_structure(&self, _buf: &[u8; BLOCK_SIZE], _loc: u64) -> Result<()> {
        Ok(())
    }

    /// Full check of a block read from `loc`: block number, checksum, then structure.
    fn check(&self, buf: &[u8; BLOCK_SIZE], loc: u64) -> Result<()> {
        let stored_loc = le64_at(buf, BLOCKNR_OFFSET)?;
        if stored_loc != loc {
            return err(
                ErrorKind::BlockNr,
                format!(
                    "{} block {loc}: records block number {stored_loc}",
                    self.name()
                ),
            );
        }
        let stored = le32_at(buf, CSUM_OFFSET)?;
        let computed = block_checksum(buf, self.salt());
        if stored != computed {
            return err(
                ErrorKind::Checksum,
                format!(
                    "{} block {loc}: bad checksum {stored:#010x}, wanted {computed:#010x}",
                    self.name()
                ),
            );
        }
        self.check_structure(buf, loc)
    }

    /// Stamp `loc` and the checksum into `buf` before it goes to disk.
    fn prepare_for_write(&self, buf: &mut [u8; BLOCK_SIZE], loc: u64) {
        buf[BLOCKNR_OFFSET..BLOCKNR_OFFSET + 8].copy_from_slice(&loc.to_le_bytes());
        let c = block_checksum(buf, self.salt());
        buf[CSUM_OFFSET..CSUM_OFFSET + 4].copy_from_slice(&c.to_le_bytes());
    }
}

/// A validator with only the common rules (blocknr + checksum with `salt`).
#[derive(Debug)]
pub struct SimpleValidator {
    /// Name used in errors.
    pub name: &'static str,
    /// Checksum salt.
    pub salt: u32,
}

impl Validator for SimpleValidator {
    fn name(&self) -> &'static str {
        self.name
    }
    fn salt(&self) -> u32 {
        self.salt
    }
}

/// Space-map bitmap blocks (salt 240779).
pub static BITMAP_VALIDATOR: SimpleValidator = SimpleValidator {
    name: "bitmap",
    salt: crate::checksum::BITMAP_CSUM_XOR,
};
/// Metadata space-map index block (salt 160478).
pub static INDEX_VALIDATOR: SimpleValidator = SimpleValidator {
    name: "metadata index",
    salt: crate::checksum::INDEX_CSUM_XOR,
};

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn prepare_then_check_round_trips_and_detects_damage() {
        let mut b = [0u8; BLOCK_SIZE];
        b[100] = 42;
        BITMAP_VALIDATOR.prepare_for_write(&mut b, 17);
        BITMAP_VALIDATOR.check(&b, 17).unwrap();
        assert_eq!(
            BITMAP_VALIDATOR.check(&b, 18).unwrap_err().kind(),
            ErrorKind::BlockNr
        );
        assert_eq!(
            INDEX_VALIDATOR.check(&b, 17).unwrap_err().kind(),
            ErrorKind::Checksum
        );
        b[200] ^= 1;
        assert_eq!(
            BITMAP_VALIDATOR.check(&b, 17).unwrap_err().kind(),
            ErrorKind::Checksum
        );
    }
}
