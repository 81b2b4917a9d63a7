//! `PoolMetadata`: the dm-thin pool metadata (spec §3, §7, §10, §11, §13, §14) on top of the
//! transaction manager, the two space maps and the copy-on-write B-trees.
//!
//! One `PoolMetadata` owns the metadata device. It is `Send` (it may move to a metadata
//! worker) but not shared: every operation takes `&mut self`. Changes are in memory / in
//! shadowed blocks until [`PoolMetadata::commit`]; [`PoolMetadata::abort`] returns to the last
//! commit.

pub mod block_time;
pub mod check;
pub mod device_details;
pub mod dump;
pub mod restore;
pub mod superblock;
pub mod xml;

use crate::block_io::BlockIo;
use crate::error::Result;
pub use device_details::DeviceDetails;

/// Thin device id (kernel accepts 0..2^24-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevId(pub u64);

/// Virtual block number within a thin device (in data blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ThinBlock(pub u64);

/// Data block number within the pool's data device (40 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DataBlock(pub u64);

/// Metadata block number (4 KiB blocks of the metadata device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MetaBlock(pub u64);

/// Largest thin device id (`MAX_DEV_ID`, 2^24-1).
pub const MAX_DEV_ID: u64 = (1 << 24) - 1;
/// Smallest data block size in sectors (64 KiB).
pub const MIN_DATA_BLOCK_SIZE_SECTORS: u32 = 128;
/// Largest data block size in sectors (1 GiB).
pub const MAX_DATA_BLOCK_SIZE_SECTORS: u32 = 2_097_152;

/// Metadata cache options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheOpts {
    /// Capacity of the block cache in 4 KiB blocks (memory ≈ 4 KiB × this).
    pub nr_cache_blocks: usize,
}

impl Default for CacheOpts {
    fn default() -> CacheOpts {
        CacheOpts {
            nr_cache_blocks: 4096,
        }
    }
}

/// Result of a mapping lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lookup {
    /// The mapped data block.
    pub data_block: DataBlock,
    /// Pool time when the mapping was written (24 bits).
    pub time: u32,
    /// True if the mapping may be shared with a snapshot (`snapshotted_time > time`, §11).
    pub shared: bool,
}

/// The pool metadata.
pub struct PoolMetadata {
    _todo: (),
}

impl std::fmt::Debug for PoolMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolMetadata").finish_non_exhaustive()
    }
}

impl PoolMetadata {
    /// Format `io` as empty pool metadata and commit it. The metadata space map covers
    /// `min(io.nr_blocks(), 4,161,600)` blocks. Errors: `InvalidArgument` for a data block size
    /// outside 128..=2,097,152 sectors or not a multiple of 128, or a device too small; `Io`.
    pub fn format(
        io: Box<dyn BlockIo>,
        data_block_size_sectors: u32,
        nr_data_blocks: u64,
        opts: CacheOpts,
    ) -> Result<PoolMetadata> {
        let _ = (io, data_block_size_sectors, nr_data_blocks, opts);
        todo!()
    }

    /// Open existing metadata. Errors: `BadMagic`, `Checksum`, `BlockNr` for a damaged
    /// superblock; `Incompatible` for incompat or compat-ro feature bits;
    /// `DataBlockSizeMismatch` if `data_block_size_sectors` differs from the superblock;
    /// `Corrupt`/`Checksum` if the space maps cannot be read; `Io`.
    pub fn open(
        io: Box<dyn BlockIo>,
        data_block_size_sectors: u32,
        opts: CacheOpts,
    ) -> Result<PoolMetadata> {
        let _ = (io, data_block_size_sectors, opts);
        todo!()
    }

    /// Format if block 0 is all zero, else [`PoolMetadata::open`].
    pub fn open_or_format(
        io: Box<dyn BlockIo>,
        data_block_size_sectors: u32,
        nr_data_blocks: u64,
        opts: CacheOpts,
    ) -> Result<PoolMetadata> {
        let _ = (io, data_block_size_sectors, nr_data_blocks, opts);
        todo!()
    }

    /// Make every change since the last commit durable (spec §13 order: details, data sm,
    /// metadata sm, all dirty blocks + flush, superblock + flush).
    pub fn commit(&mut self) -> Result<()> {
        todo!()
    }

    /// Drop every change since the last commit (reopen from the on-disk superblock).
    pub fn abort(&mut self) -> Result<()> {
        todo!()
    }

    /// Create an empty thin device. Errors: `Exists`, `InvalidArgument` (id > 2^24-1).
    pub fn create_thin(&mut self, dev: DevId) -> Result<()> {
        let _ = dev;
        todo!()
    }

    /// Create `dev` as a snapshot of `origin` (shares the origin's tree; pool time += 1).
    /// Errors: `Exists`, `NotFound` (origin), `Limit` (time would exceed 2^24-1).
    pub fn create_snap(&mut self, dev: DevId, origin: DevId) -> Result<()> {
        let _ = (dev, origin);
        todo!()
    }

    /// Delete a thin device and release its mappings. Errors: `NotFound`.
    pub fn delete_thin(&mut self, dev: DevId) -> Result<()> {
        let _ = dev;
        todo!()
    }

    /// Look up a mapping (may read metadata blocks). Errors: `NotFound` (device).
    pub fn find_block(&mut self, dev: DevId, block: ThinBlock) -> Result<Option<Lookup>> {
        let _ = (dev, block);
        todo!()
    }

    /// Like [`PoolMetadata::find_block`] but never does I/O: `WouldBlock` if a needed metadata
    /// block is not cached (call [`PoolMetadata::prefetch_block`] elsewhere, then retry).
    pub fn try_find_block(&mut self, dev: DevId, block: ThinBlock) -> Result<Option<Lookup>> {
        let _ = (dev, block);
        todo!()
    }

    /// Load into the cache every metadata block a lookup of `(dev, block)` needs.
    pub fn prefetch_block(&mut self, dev: DevId, block: ThinBlock) -> Result<()> {
        let _ = (dev, block);
        todo!()
    }

    /// Allocate a free data block (count 1). Never returns a block freed in the open
    /// transaction. Errors: `NoSpace`.
    pub fn alloc_data_block(&mut self) -> Result<DataBlock> {
        todo!()
    }

    /// Map `(dev, block) -> data` at the current time. The caller already holds the data
    /// block's reference (as from `alloc_data_block`); an overwritten different block is
    /// dec'd. Errors: `NotFound` (device), `InvalidArgument` (data block ≥ 2^40), `NoSpace`.
    pub fn insert_block(&mut self, dev: DevId, block: ThinBlock, data: DataBlock) -> Result<()> {
        let _ = (dev, block, data);
        todo!()
    }

    /// Unmap one block (decs its data block). Returns whether it was mapped.
    pub fn remove_block(&mut self, dev: DevId, block: ThinBlock) -> Result<bool> {
        let _ = (dev, block);
        todo!()
    }

    /// Unmap `[begin, end)`; returns the number of mappings removed.
    pub fn remove_range(&mut self, dev: DevId, begin: ThinBlock, end: ThinBlock) -> Result<u64> {
        let _ = (dev, begin, end);
        todo!()
    }

    /// The first mapping at or after `from`.
    pub fn next_mapped(
        &mut self,
        dev: DevId,
        from: ThinBlock,
    ) -> Result<Option<(ThinBlock, Lookup)>> {
        let _ = (dev, from);
        todo!()
    }

    /// Details of a device (including uncommitted changes), or None.
    pub fn device_details(&mut self, dev: DevId) -> Result<Option<DeviceDetails>> {
        let _ = dev;
        todo!()
    }

    /// All device ids, ascending.
    pub fn devices(&mut self) -> Result<Vec<DevId>> {
        todo!()
    }

    /// Current pool time.
    pub fn time(&self) -> u32 {
        todo!()
    }

    /// Current (possibly uncommitted) transaction id.
    pub fn transaction_id(&self) -> u64 {
        todo!()
    }

    /// Compare-and-swap the transaction id. Errors: `InvalidArgument` if `old` ≠ current.
    pub fn set_transaction_id(&mut self, old: u64, new: u64) -> Result<()> {
        let _ = (old, new);
        todo!()
    }

    /// Commit, then take a metadata snapshot (held root, spec §14); returns its block.
    /// Errors: `Busy` if one is already held.
    pub fn reserve_metadata_snap(&mut self) -> Result<MetaBlock> {
        todo!()
    }

    /// Release the held metadata snapshot. Errors: `InvalidArgument` if none.
    pub fn release_metadata_snap(&mut self) -> Result<()> {
        todo!()
    }

    /// The held metadata snapshot block, if any.
    pub fn held_root(&self) -> Option<MetaBlock> {
        todo!()
    }

    /// Grow the data space map. Errors: `InvalidArgument` when shrinking.
    pub fn resize_data_dev(&mut self, new_nr_blocks: u64) -> Result<()> {
        let _ = new_nr_blocks;
        todo!()
    }

    /// Grow the metadata space map (capped at 4,161,600 blocks and at the device size).
    /// Errors: `InvalidArgument` when shrinking or beyond the device.
    pub fn resize_metadata_dev(&mut self, new_nr_blocks: u64) -> Result<()> {
        let _ = new_nr_blocks;
        todo!()
    }

    /// Data blocks in the pool.
    pub fn data_nr_blocks(&self) -> u64 {
        todo!()
    }

    /// Free data blocks (blocks freed in the open transaction count as free).
    pub fn data_nr_free(&self) -> u64 {
        todo!()
    }

    /// Metadata blocks managed.
    pub fn metadata_nr_blocks(&self) -> u64 {
        todo!()
    }

    /// Free metadata blocks.
    pub fn metadata_nr_free(&self) -> u64 {
        todo!()
    }

    /// Reference count of a data block.
    pub fn data_block_count(&mut self, block: DataBlock) -> Result<u32> {
        let _ = block;
        todo!()
    }

    /// Take an extra reference on a data block (discard passdown).
    pub fn inc_data_block(&mut self, block: DataBlock) -> Result<()> {
        let _ = block;
        todo!()
    }

    /// Drop a reference on a data block.
    pub fn dec_data_block(&mut self, block: DataBlock) -> Result<()> {
        let _ = block;
        todo!()
    }

    /// Whether the superblock NEEDS_CHECK flag is set.
    pub fn needs_check(&self) -> bool {
        todo!()
    }

    /// Set NEEDS_CHECK and write it to the superblock of the last commit immediately.
    pub fn set_needs_check(&mut self) -> Result<()> {
        todo!()
    }

    /// Data block size in sectors.
    pub fn data_block_size_sectors(&self) -> u32 {
        todo!()
    }
}
