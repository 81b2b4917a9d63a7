//! The dm-thin superblock (block 0; also held-root copies), spec §3.
//!
//! | off | size | field |
//! |---|---|---|
//! | 0 | 4 | csum (salt 160774) |
//! | 4 | 4 | flags (bit 0 NEEDS_CHECK) |
//! | 8 | 8 | blocknr |
//! | 16 | 16 | uuid (zero) |
//! | 32 | 8 | magic 27022010 |
//! | 40 | 4 | version 2 |
//! | 44 | 4 | time |
//! | 48 | 8 | trans_id |
//! | 56 | 8 | held_root |
//! | 64 | 128 | data sm root (32 bytes + zero) |
//! | 192 | 128 | metadata sm root (32 bytes + zero) |
//! | 320 | 8 | data_mapping_root |
//! | 328 | 8 | device_details_root |
//! | 336 | 4 | data_block_size (sectors) |
//! | 340 | 4 | metadata_block_size = 8 |
//! | 344 | 8 | metadata_nr_blocks (at format) |
//! | 352 | 4 | compat_flags |
//! | 356 | 4 | compat_ro_flags |
//! | 360 | 4 | incompat_flags |
//! | 364 | .. | zero |
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use crate::block_io::BLOCK_SIZE;
use crate::codec::{Pack, Reader, Unpack, Writer};
use crate::error::{err, ErrorKind, Result};
use crate::space_map::format::{SmRoot, SM_ROOT_AREA_SIZE, SM_ROOT_SIZE};
use crate::validator::Validator;

/// `THIN_SUPERBLOCK_MAGIC` (dm-thin-metadata.c).
pub const SUPERBLOCK_MAGIC: u64 = 27_022_010;
/// `THIN_VERSION`.
pub const SUPERBLOCK_VERSION: u32 = 2;
/// Superblock location.
pub const SUPERBLOCK_LOCATION: u64 = 0;
/// `THIN_METADATA_NEEDS_CHECK_FLAG`.
pub const NEEDS_CHECK_FLAG: u32 = 1;
/// Metadata block size in sectors.
pub const METADATA_BLOCK_SIZE_SECTORS: u32 = 8;
/// Packed size of the meaningful part.
pub const SUPERBLOCK_PACKED_SIZE: usize = 364;
const MAGIC_OFFSET: usize = 32;
const _: () = assert!(64 + 2 * SM_ROOT_AREA_SIZE == 320);
const _: () = assert!(320 + 8 + 8 + 4 + 4 + 8 + 4 + 4 + 4 == SUPERBLOCK_PACKED_SIZE);

/// Decoded superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Superblock {
    /// Flags (NEEDS_CHECK).
    pub flags: u32,
    /// Location recorded in the block.
    pub blocknr: u64,
    /// UUID bytes (always zero when written by us).
    pub uuid: [u8; 16],
    /// Magic.
    pub magic: u64,
    /// Version.
    pub version: u32,
    /// Pool time.
    pub time: u32,
    /// Userspace transaction id.
    pub trans_id: u64,
    /// Held metadata snapshot block, 0 = none.
    pub held_root: u64,
    /// Data space map root.
    pub data_sm_root: SmRoot,
    /// Metadata space map root.
    pub metadata_sm_root: SmRoot,
    /// Two-level mapping tree root.
    pub data_mapping_root: u64,
    /// Device details tree root.
    pub device_details_root: u64,
    /// Data block size in 512-byte sectors.
    pub data_block_size: u32,
    /// Metadata block size in sectors (8).
    pub metadata_block_size: u32,
    /// Metadata device size at format time.
    pub metadata_nr_blocks: u64,
    /// Compatible feature flags.
    pub compat_flags: u32,
    /// Read-only-compatible feature flags.
    pub compat_ro_flags: u32,
    /// Incompatible feature flags.
    pub incompat_flags: u32,
}

fn sm_root_area(r: &mut Reader<'_>) -> Result<SmRoot> {
    let root = SmRoot::unpack(r)?;
    r.skip(SM_ROOT_AREA_SIZE - SM_ROOT_SIZE)?;
    Ok(root)
}

impl Unpack for Superblock {
    const DISK_SIZE: usize = SUPERBLOCK_PACKED_SIZE;
    fn unpack(r: &mut Reader<'_>) -> Result<Self> {
        r.skip(4)?;
        let flags = r.u32()?;
        let blocknr = r.u64()?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(r.bytes(16)?);
        Ok(Superblock {
            flags,
            blocknr,
            uuid,
            magic: r.u64()?,
            version: r.u32()?,
            time: r.u32()?,
            trans_id: r.u64()?,
            held_root: r.u64()?,
            data_sm_root: sm_root_area(r)?,
            metadata_sm_root: sm_root_area(r)?,
            data_mapping_root: r.u64()?,
            device_details_root: r.u64()?,
            data_block_size: r.u32()?,
            metadata_block_size: r.u32()?,
            metadata_nr_blocks: r.u64()?,
            compat_flags: r.u32()?,
            compat_ro_flags: r.u32()?,
            incompat_flags: r.u32()?,
        })
    }
}

impl Pack for Superblock {
    const DISK_SIZE: usize = SUPERBLOCK_PACKED_SIZE;
    fn pack(&self, w: &mut Writer<'_>) -> Result<()> {
        w.u32(0)?;
        w.u32(self.flags)?;
        w.u64(self.blocknr)?;
        w.bytes(&self.uuid)?;
        w.u64(self.magic)?;
        w.u32(self.version)?;
        w.u32(self.time)?;
        w.u64(self.trans_id)?;
        w.u64(self.held_root)?;
        self.data_sm_root.pack(w)?;
        w.zeros(SM_ROOT_AREA_SIZE - SM_ROOT_SIZE)?;
        self.metadata_sm_root.pack(w)?;
        w.zeros(SM_ROOT_AREA_SIZE - SM_ROOT_SIZE)?;
        w.u64(self.data_mapping_root)?;
        w.u64(self.device_details_root)?;
        w.u32(self.data_block_size)?;
        w.u32(self.metadata_block_size)?;
        w.u64(self.metadata_nr_blocks)?;
        w.u32(self.compat_flags)?;
        w.u32(self.compat_ro_flags)?;
        w.u32(self.incompat_flags)
    }
}

impl Superblock {
    /// Pack into a whole zero-padded block (checksum stamped by the validator at write-out).
    pub fn pack_block(&self, buf: &mut [u8; BLOCK_SIZE]) -> Result<()> {
        buf.fill(0);
        self.pack(&mut Writer::new(buf))
    }

    /// Decode from a whole block.
    pub fn unpack_block(buf: &[u8; BLOCK_SIZE]) -> Result<Superblock> {
        Superblock::unpack(&mut Reader::new(buf))
    }
}

/// Superblock validator: blocknr, checksum (salt 160774) and magic.
#[derive(Debug)]
pub struct SuperblockValidator;

/// The superblock validator instance.
pub static SUPERBLOCK_VALIDATOR: SuperblockValidator = SuperblockValidator;

impl Validator for SuperblockValidator {
    fn name(&self) -> &'static str {
        "superblock"
    }
    fn salt(&self) -> u32 {
        crate::checksum::SUPERBLOCK_CSUM_XOR
    }
    fn check_structure(&self, buf: &[u8; BLOCK_SIZE], loc: u64) -> Result<()> {
        let magic = crate::codec::le64_at(buf, MAGIC_OFFSET)?;
        if magic != SUPERBLOCK_MAGIC {
            return err(
                ErrorKind::BadMagic,
                format!("superblock {loc}: bad magic {magic}"),
            );
        }
        Ok(())
    }
}
