//! dm-persistent-data block checksums: CRC32C (Castagnoli), initial value !0, **no** final
//! inversion, over bytes 4..4096 of a block, XORed with a per-block-type salt; stored LE at
//! offset 0 (spec §2).
//!
//! `crc32c::crc32c` computes the standard CRC (init !0, final xor !0), so the dm checksum is
//! `standard ^ !0 ^ salt`.

/// Superblock salt (`SUPERBLOCK_CSUM_XOR`, linux dm-thin-metadata.c).
pub const SUPERBLOCK_CSUM_XOR: u32 = 160774;
/// B-tree node salt (`BTREE_CSUM_XOR`, linux persistent-data/dm-btree-spine.c).
pub const BTREE_CSUM_XOR: u32 = 121107;
/// Metadata space-map index block salt (`INDEX_CSUM_XOR`, dm-space-map-common.c).
pub const INDEX_CSUM_XOR: u32 = 160478;
/// Space-map bitmap block salt (`BITMAP_CSUM_XOR`, dm-space-map-common.c).
pub const BITMAP_CSUM_XOR: u32 = 240779;

/// Offset of the checksummed area within a block.
pub const CSUM_START: usize = 4;

/// dm checksum of `data` (the bytes after the checksum field) with `salt`.
pub fn dm_checksum(data: &[u8], salt: u32) -> u32 {
    crc32c::crc32c(data) ^ 0xFFFF_FFFF ^ salt
}

/// dm checksum of a whole block (bytes 4.. of `block`).
pub fn block_checksum(block: &[u8], salt: u32) -> u32 {
    dm_checksum(block.get(CSUM_START..).unwrap_or(&[]), salt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_block_checksums_match_spec_table() {
        let block = [0u8; 4096];
        assert_eq!(block_checksum(&block, 0), 0x58CD_A791);
        assert_eq!(block_checksum(&block, SUPERBLOCK_CSUM_XOR), 0x58CF_D397);
        assert_eq!(block_checksum(&block, BTREE_CSUM_XOR), 0x58CC_7E82);
        assert_eq!(block_checksum(&block, INDEX_CSUM_XOR), 0x58CF_D54F);
        assert_eq!(block_checksum(&block, BITMAP_CSUM_XOR), 0x58CE_0B1A);
    }

    #[test]
    fn checksum_ignores_first_four_bytes_and_sees_the_rest() {
        let mut a = [0u8; 4096];
        let c0 = block_checksum(&a, BTREE_CSUM_XOR);
        a[0] = 9;
        a[3] = 9;
        assert_eq!(block_checksum(&a, BTREE_CSUM_XOR), c0);
        a[4095] = 1;
        assert_ne!(block_checksum(&a, BTREE_CSUM_XOR), c0);
    }
}
