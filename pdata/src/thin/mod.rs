//! `PoolMetadata`: the dm-thin pool metadata (spec §3, §7, §10, §11, §13, §14) on top of the
//! transaction manager, the two space maps and the copy-on-write B-trees.
//!
//! One `PoolMetadata` owns the metadata device. It is `Send` (it may move to a metadata
//! worker) but not shared: every operation takes `&mut self`. Changes live in shadowed blocks
//! and in memory until [`PoolMetadata::commit`] (order: device details, data space map,
//! metadata space map, every dirty block + FLUSH, superblock + FLUSH);
//! [`PoolMetadata::abort`] returns to the last commit.
//!
//! Errors: argument and state errors (`NotFound`, `Exists`, `InvalidArgument`, `Busy`,
//! `Limit` for the snapshot-time bound, `NoSpace` from `alloc_data_block`) leave everything
//! unchanged. Any other failure of a mutation (I/O, corrupt metadata, metadata `NoSpace`)
//! may leave it half applied, so the metadata latches read-only (`ReadOnly` for every later
//! mutation, [`PoolMetadata::is_failed`]) until `abort` or a reopen; the caller should then
//! [`PoolMetadata::set_needs_check`] as dm-thin does.
//!
//! Reference semantics follow the kernel: `insert_block` takes over a data reference the
//! caller already holds (`alloc_data_block`, or `inc_data_block` for an existing block);
//! snapshots share the origin's subtree (metadata `inc` of its root, no data count change);
//! a lookup reports `shared` when the device was snapshotted after the mapping was written.

pub mod block_time;
pub mod check;
pub mod device_details;
pub mod dump;
pub mod restore;
pub mod superblock;
pub mod xml;

mod mapping;

#[cfg(test)]
pub(crate) mod tests;

use std::collections::BTreeMap;

use crate::block_io::BlockIo;
use crate::block_manager::BlockManager;
use crate::btree::{self, BlockRefs, NoRefs};
use crate::codec::{pack_into, unpack_from};
use crate::error::{err, ErrorKind, Result};
use crate::space_map::disk::DataSm;
use crate::space_map::format::{SmRoot, MAX_METADATA_BLOCKS};
use crate::space_map::metadata::MetadataSm;
use crate::transaction_manager::TransactionManager;
use block_time::{BlockTime, TIME_MASK};
pub use device_details::DeviceDetails;
use mapping::{DataRefs, SubtreeRefs};
use superblock::{
    Superblock, METADATA_BLOCK_SIZE_SECTORS, NEEDS_CHECK_FLAG, SUPERBLOCK_LOCATION,
    SUPERBLOCK_MAGIC, SUPERBLOCK_VALIDATOR, SUPERBLOCK_VERSION,
};

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

/// Value size of the mapping tree (both levels) and of internal nodes.
pub const MAPPING_VALUE_SIZE: usize = 8;
/// Value size of the device-details tree.
pub const DETAILS_VALUE_SIZE: usize = 24;
/// Smallest metadata device accepted by `format`, in blocks.
pub const MIN_METADATA_BLOCKS: u64 = 16;

#[derive(Debug, Clone, Copy)]
struct CachedDetails {
    details: DeviceDetails,
    dirty: bool,
    /// The device's current subtree root, when known (saves the top-level descent on the
    /// data path). Kept exact by every operation that changes it; cleared by abort.
    sub_root: Option<u64>,
}

/// The pool metadata.
pub struct PoolMetadata {
    tm: TransactionManager,
    data_sm: DataSm,
    /// The superblock of the last commit.
    committed_sb: Superblock,
    time: u32,
    trans_id: u64,
    flags: u32,
    held_root: u64,
    mapping_root: u64,
    details_root: u64,
    /// Details of devices touched since open: written to the details tree at commit.
    details: BTreeMap<u64, CachedDetails>,
    data_block_size: u32,
    /// Set when a mutation failed after it began changing state: further mutations are
    /// refused (`ReadOnly`) until `abort` (or reopen) restores the last commit.
    failed: Option<String>,
}

const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<PoolMetadata>();
};

impl std::fmt::Debug for PoolMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolMetadata")
            .field("time", &self.time)
            .field("trans_id", &self.trans_id)
            .field("mapping_root", &self.mapping_root)
            .field("details_root", &self.details_root)
            .field("data_nr_blocks", &self.data_sm.ll.nr_blocks)
            .field("metadata_nr_blocks", &self.tm.sm.ll.nr_blocks)
            .finish_non_exhaustive()
    }
}

fn check_data_block_size(dbs: u32) -> Result<()> {
    let ok = (MIN_DATA_BLOCK_SIZE_SECTORS..=MAX_DATA_BLOCK_SIZE_SECTORS).contains(&dbs)
        && dbs.is_multiple_of(MIN_DATA_BLOCK_SIZE_SECTORS);
    if !ok {
        return err(
            ErrorKind::InvalidArgument,
            format!("data block size {dbs} sectors: must be 128..=2097152 and a multiple of 128"),
        );
    }
    Ok(())
}

fn check_dev_id(dev: DevId) -> Result<()> {
    if dev.0 > MAX_DEV_ID {
        return err(
            ErrorKind::InvalidArgument,
            format!("device id {} > 2^24-1", dev.0),
        );
    }
    Ok(())
}

/// Everything loaded from a committed superblock.
struct Loaded {
    sb: Superblock,
    msm: MetadataSm,
    data_sm: DataSm,
}

fn load(bm: &mut BlockManager, data_block_size: u32) -> Result<Loaded> {
    let r = bm.read_lock(SUPERBLOCK_LOCATION, &SUPERBLOCK_VALIDATOR)?;
    let sb = Superblock::unpack_block(&r)?;
    drop(r);
    bm.forget(SUPERBLOCK_LOCATION);
    debug_assert_eq!(sb.magic, SUPERBLOCK_MAGIC);
    if sb.incompat_flags != 0 {
        let f = sb.incompat_flags;
        return err(
            ErrorKind::Incompatible,
            format!("unsupported incompat features {f:#x}"),
        );
    }
    if sb.compat_ro_flags != 0 {
        let f = sb.compat_ro_flags;
        return err(
            ErrorKind::Incompatible,
            format!("unsupported compat-ro features {f:#x}"),
        );
    }
    if sb.data_block_size != data_block_size {
        return err(
            ErrorKind::DataBlockSizeMismatch,
            format!(
                "data block size {data_block_size} sectors does not match the superblock's {}",
                sb.data_block_size
            ),
        );
    }
    if sb.metadata_block_size != METADATA_BLOCK_SIZE_SECTORS {
        let m = sb.metadata_block_size;
        return err(
            ErrorKind::Corrupt,
            format!("metadata block size {m} sectors, expected 8"),
        );
    }
    let msm = MetadataSm::open(bm, &sb.metadata_sm_root)
        .map_err(|e| e.with_context("metadata space map"))?;
    let data_sm =
        DataSm::open(bm, &sb.data_sm_root).map_err(|e| e.with_context("data space map"))?;
    Ok(Loaded { sb, msm, data_sm })
}

impl PoolMetadata {
    fn from_loaded(tm: TransactionManager, l: Loaded) -> PoolMetadata {
        PoolMetadata {
            tm,
            data_sm: l.data_sm,
            committed_sb: l.sb,
            time: l.sb.time,
            trans_id: l.sb.trans_id,
            flags: l.sb.flags,
            held_root: l.sb.held_root,
            mapping_root: l.sb.data_mapping_root,
            details_root: l.sb.device_details_root,
            details: BTreeMap::new(),
            data_block_size: l.sb.data_block_size,
            failed: None,
        }
    }

    /// Format `io` as empty pool metadata and commit it. The metadata space map covers
    /// `min(io.nr_blocks(), 4,161,600)` blocks. Errors: `InvalidArgument` for a data block size
    /// outside 128..=2,097,152 sectors or not a multiple of 128, more than 2^40 data blocks, or
    /// a device smaller than [`MIN_METADATA_BLOCKS`]; `NoSpace`; `Io`.
    pub fn format(
        io: Box<dyn BlockIo>,
        data_block_size_sectors: u32,
        nr_data_blocks: u64,
        opts: CacheOpts,
    ) -> Result<PoolMetadata> {
        check_data_block_size(data_block_size_sectors)?;
        let nr_meta = io.nr_blocks().min(MAX_METADATA_BLOCKS);
        if nr_meta < MIN_METADATA_BLOCKS {
            return err(
                ErrorKind::InvalidArgument,
                format!("metadata device of {nr_meta} blocks is too small"),
            );
        }
        let bm = BlockManager::new(io, opts.nr_cache_blocks);
        let mut tm = TransactionManager::new(bm, MetadataSm::bootstrap());
        let range = tm.sm.ll.extend_nr_blocks(nr_meta)?;
        tm.sm.ll.set_count(&mut tm.bm, SUPERBLOCK_LOCATION, 1)?;
        let needed = crate::space_map::ll::nr_bitmaps(nr_meta);
        tm.create_metadata_bitmaps(range, needed)?;
        let rc = btree::new_empty(&mut tm, crate::space_map::ll::REF_COUNT_VALUE_SIZE)?;
        tm.sm.ll.ref_count_root = rc;
        let data_sm = DataSm::create(&mut tm, nr_data_blocks)?;
        let mapping_root = btree::new_empty(&mut tm, MAPPING_VALUE_SIZE)?;
        let details_root = btree::new_empty(&mut tm, DETAILS_VALUE_SIZE)?;
        let sb = Superblock {
            magic: SUPERBLOCK_MAGIC,
            version: SUPERBLOCK_VERSION,
            data_block_size: data_block_size_sectors,
            metadata_block_size: METADATA_BLOCK_SIZE_SECTORS,
            metadata_nr_blocks: nr_meta,
            data_mapping_root: mapping_root,
            device_details_root: details_root,
            ..Superblock::default()
        };
        let loaded = Loaded {
            sb,
            msm: MetadataSm::bootstrap(),
            data_sm,
        };
        let mut pmd = PoolMetadata::from_loaded(tm, loaded);
        pmd.commit()?;
        debug_assert_eq!(pmd.tm.ref_count(SUPERBLOCK_LOCATION)?, 1);
        Ok(pmd)
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
        let mut bm = BlockManager::new(io, opts.nr_cache_blocks);
        let mut l = load(&mut bm, data_block_size_sectors)?;
        let msm = std::mem::replace(&mut l.msm, MetadataSm::bootstrap());
        let tm = TransactionManager::new(bm, msm);
        Ok(PoolMetadata::from_loaded(tm, l))
    }

    /// Format if block 0 is all zero, else [`PoolMetadata::open`].
    pub fn open_or_format(
        io: Box<dyn BlockIo>,
        data_block_size_sectors: u32,
        nr_data_blocks: u64,
        opts: CacheOpts,
    ) -> Result<PoolMetadata> {
        let mut buf = [0u8; crate::BLOCK_SIZE];
        io.read_block(SUPERBLOCK_LOCATION, &mut buf)
            .map_err(|e| crate::Error::io("reading superblock", e))?;
        if buf.iter().all(|b| *b == 0) {
            PoolMetadata::format(io, data_block_size_sectors, nr_data_blocks, opts)
        } else {
            PoolMetadata::open(io, data_block_size_sectors, opts)
        }
    }

    /// Write the changed device details into the details tree (commit step 2).
    fn commit_write_details(&mut self) -> Result<()> {
        let dirty: Vec<(u64, DeviceDetails)> = self
            .details
            .iter()
            .filter(|(_, c)| c.dirty)
            .map(|(id, c)| (*id, c.details))
            .collect();
        for (id, d) in dirty {
            let mut v = [0u8; DETAILS_VALUE_SIZE];
            pack_into(&d, &mut v)?;
            self.details_root = btree::insert_plain(&mut self.tm, self.details_root, id, &v)?;
            if let Some(c) = self.details.get_mut(&id) {
                c.dirty = false;
            }
        }
        Ok(())
    }

    fn current_superblock(&self, data_root: SmRoot, meta_root: SmRoot) -> Superblock {
        Superblock {
            flags: self.flags,
            blocknr: SUPERBLOCK_LOCATION,
            time: self.time,
            trans_id: self.trans_id,
            held_root: self.held_root,
            data_sm_root: data_root,
            metadata_sm_root: meta_root,
            data_mapping_root: self.mapping_root,
            device_details_root: self.details_root,
            ..self.committed_sb
        }
    }

    /// Make every change since the last commit durable (spec §13 order: details, data sm,
    /// metadata sm, all dirty blocks + flush, superblock + flush). On error the in-memory state
    /// is unusable: call [`PoolMetadata::abort`].
    pub fn commit(&mut self) -> Result<()> {
        self.guarded("commit", |s| s.commit_inner())
    }

    fn commit_inner(&mut self) -> Result<()> {
        self.commit_write_details()?;
        let data_root = self.data_sm.pre_commit(&mut self.tm)?;
        let meta_root = self.tm.pre_commit()?;
        assert!(!self.data_sm.ll.has_pending());
        self.tm.bm.flush()?;
        let sb = self.current_superblock(data_root, meta_root);
        self.tm
            .bm
            .write_zero(SUPERBLOCK_LOCATION, &SUPERBLOCK_VALIDATOR, |buf| {
                sb.pack_block(buf)
            })??;
        self.tm.bm.flush()?;
        self.tm.bm.forget(SUPERBLOCK_LOCATION);
        self.tm.finish_commit();
        self.data_sm.finish_commit();
        self.committed_sb = sb;
        assert_eq!(sb.metadata_sm_root.nr_allocated, self.tm.sm.ll.nr_allocated);
        assert_eq!(sb.data_sm_root.nr_allocated, self.data_sm.ll.nr_allocated);
        debug_assert!(self.details.values().all(|c| !c.dirty));
        debug_assert_eq!(self.tm.nr_shadows(), 0);
        Ok(())
    }

    /// Drop every change since the last commit: discard the cache and reload all state from
    /// the on-disk superblock.
    pub fn abort(&mut self) -> Result<()> {
        self.tm.bm.invalidate_all();
        // Until the reload succeeds the in-memory state matches nothing on disk.
        self.failed = Some("abort in progress".to_string());
        let mut l = load(&mut self.tm.bm, self.data_block_size)?;
        let msm = std::mem::replace(&mut l.msm, MetadataSm::bootstrap());
        self.tm.reset(msm);
        self.data_sm = l.data_sm;
        self.committed_sb = l.sb;
        self.time = l.sb.time;
        self.trans_id = l.sb.trans_id;
        self.flags = l.sb.flags;
        self.held_root = l.sb.held_root;
        self.mapping_root = l.sb.data_mapping_root;
        self.details_root = l.sb.device_details_root;
        self.details.clear();
        self.failed = None;
        Ok(())
    }

    /// Run a mutation: refused after an earlier failure; an error that may have left
    /// partial changes latches the metadata read-only until [`PoolMetadata::abort`].
    fn guarded<T>(&mut self, op: &str, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.check_writable()?;
        let r = f(self);
        if let Err(e) = &r {
            let clean = matches!(
                e.kind(),
                ErrorKind::NotFound
                    | ErrorKind::Exists
                    | ErrorKind::InvalidArgument
                    | ErrorKind::Busy
                    | ErrorKind::WouldBlock
            );
            if !clean {
                self.failed = Some(format!("{op} failed: {e}"));
            }
        }
        r
    }

    fn check_writable(&self) -> Result<()> {
        match &self.failed {
            Some(why) => err(
                ErrorKind::ReadOnly,
                format!("metadata is read-only until abort or reopen ({why})"),
            ),
            None => Ok(()),
        }
    }

    /// Whether an earlier failure latched the metadata read-only (cleared by `abort`).
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }

    fn cached_details(&mut self, dev: DevId, nonblocking: bool) -> Result<Option<DeviceDetails>> {
        if let Some(c) = self.details.get(&dev.0) {
            return Ok(Some(c.details));
        }
        let found = btree::lookup_with(
            &mut self.tm.bm,
            self.details_root,
            dev.0,
            DETAILS_VALUE_SIZE,
            nonblocking,
            unpack_from::<DeviceDetails>,
        )?;
        if let Some(d) = found {
            self.details.insert(
                dev.0,
                CachedDetails {
                    details: d,
                    dirty: false,
                    sub_root: None,
                },
            );
        }
        Ok(found)
    }

    fn details_or_not_found(&mut self, dev: DevId) -> Result<DeviceDetails> {
        match self.cached_details(dev, false)? {
            Some(d) => Ok(d),
            None => err(
                ErrorKind::NotFound,
                format!("thin device {} does not exist", dev.0),
            ),
        }
    }

    fn set_details(&mut self, dev: DevId, details: DeviceDetails) {
        let sub_root = self.details.get(&dev.0).and_then(|c| c.sub_root);
        let c = CachedDetails {
            details,
            dirty: true,
            sub_root,
        };
        self.details.insert(dev.0, c);
    }

    fn set_sub_root(&mut self, dev: DevId, root: u64) {
        if let Some(c) = self.details.get_mut(&dev.0) {
            c.sub_root = Some(root);
        }
    }

    fn subtree_root(&mut self, dev: DevId, nonblocking: bool) -> Result<u64> {
        if let Some(r) = self.details.get(&dev.0).and_then(|c| c.sub_root) {
            debug_assert!(
                nonblocking
                    || btree::lookup_u64(&mut self.tm.bm, self.mapping_root, dev.0).ok()
                        == Some(Some(r)),
                "cached subtree root of device {} is stale",
                dev.0
            );
            return Ok(r);
        }
        let root = btree::lookup_with(
            &mut self.tm.bm,
            self.mapping_root,
            dev.0,
            MAPPING_VALUE_SIZE,
            nonblocking,
            btree::value_u64,
        )?;
        match root {
            Some(r) => {
                self.set_sub_root(dev, r);
                Ok(r)
            }
            None => err(
                ErrorKind::Corrupt,
                format!("thin device {} has details but no mapping tree", dev.0),
            ),
        }
    }

    /// Create an empty thin device. Errors: `Exists`, `InvalidArgument` (id > 2^24-1).
    pub fn create_thin(&mut self, dev: DevId) -> Result<()> {
        self.guarded("create_thin", |s| s.create_thin_inner(dev))
    }

    fn create_thin_inner(&mut self, dev: DevId) -> Result<()> {
        check_dev_id(dev)?;
        if self.cached_details(dev, false)?.is_some() {
            return err(
                ErrorKind::Exists,
                format!("thin device {} already exists", dev.0),
            );
        }
        let in_top = btree::lookup_u64(&mut self.tm.bm, self.mapping_root, dev.0)?;
        if in_top.is_some() {
            return err(
                ErrorKind::Corrupt,
                format!("device {} has a tree but no details", dev.0),
            );
        }
        let sub = btree::new_empty(&mut self.tm, MAPPING_VALUE_SIZE)?;
        let (root, inserted) = btree::insert(
            &mut self.tm,
            self.mapping_root,
            dev.0,
            &sub.to_le_bytes(),
            &mut BlockRefs,
        )?;
        assert_eq!(inserted, btree::Inserted::New);
        self.mapping_root = root;
        let d = DeviceDetails {
            mapped_blocks: 0,
            transaction_id: self.trans_id,
            creation_time: self.time,
            snapshotted_time: self.time,
        };
        self.set_details(dev, d);
        Ok(())
    }

    /// Create `dev` as a snapshot of `origin` (shares the origin's tree; pool time += 1).
    /// Errors: `Exists`, `NotFound` (origin), `InvalidArgument` (id), `Limit` (the pool time
    /// would exceed 2^24-1, the width of a mapping's time).
    pub fn create_snap(&mut self, dev: DevId, origin: DevId) -> Result<()> {
        if u64::from(self.time) >= TIME_MASK {
            return err(ErrorKind::Limit, "pool time would exceed 2^24-1 snapshots");
        }
        self.guarded("create_snap", |s| s.create_snap_inner(dev, origin))
    }

    fn create_snap_inner(&mut self, dev: DevId, origin: DevId) -> Result<()> {
        check_dev_id(dev)?;
        if self.cached_details(dev, false)?.is_some() {
            return err(
                ErrorKind::Exists,
                format!("thin device {} already exists", dev.0),
            );
        }
        let mut od = self.details_or_not_found(origin)?;
        if u64::from(self.time) >= TIME_MASK {
            return err(ErrorKind::Limit, "pool time would exceed 2^24-1 snapshots");
        }
        let root = self.subtree_root(origin, false)?;
        if btree::lookup_u64(&mut self.tm.bm, self.mapping_root, dev.0)?.is_some() {
            return err(
                ErrorKind::Corrupt,
                format!("device {} has a tree but no details", dev.0),
            );
        }
        self.tm.inc(root)?;
        let (top, inserted) = btree::insert(
            &mut self.tm,
            self.mapping_root,
            dev.0,
            &root.to_le_bytes(),
            &mut BlockRefs,
        )?;
        assert_eq!(
            inserted,
            btree::Inserted::New,
            "snapshot id already in the top level"
        );
        self.mapping_root = top;
        self.time += 1;
        od.snapshotted_time = self.time;
        self.set_details(origin, od);
        let d = DeviceDetails {
            mapped_blocks: od.mapped_blocks,
            transaction_id: self.trans_id,
            creation_time: self.time,
            snapshotted_time: self.time,
        };
        self.set_details(dev, d);
        Ok(())
    }

    /// Delete a thin device and release its mappings (unshared nodes freed, data blocks of
    /// freed leaves dec'd). Errors: `NotFound`.
    pub fn delete_thin(&mut self, dev: DevId) -> Result<()> {
        self.guarded("delete_thin", |s| s.delete_thin_inner(dev))
    }

    fn delete_thin_inner(&mut self, dev: DevId) -> Result<()> {
        self.details_or_not_found(dev)?;
        let (droot, _) = btree::remove(
            &mut self.tm,
            self.details_root,
            dev.0,
            DETAILS_VALUE_SIZE,
            &mut NoRefs,
        )?;
        self.details_root = droot;
        self.details.remove(&dev.0);
        let mut refs = SubtreeRefs {
            data_sm: &mut self.data_sm,
        };
        let (root, present) = btree::remove(
            &mut self.tm,
            self.mapping_root,
            dev.0,
            MAPPING_VALUE_SIZE,
            &mut refs,
        )?;
        self.mapping_root = root;
        if !present {
            return err(
                ErrorKind::Corrupt,
                format!("device {} had no mapping tree", dev.0),
            );
        }
        Ok(())
    }

    fn lookup(&mut self, dev: DevId, block: ThinBlock, nb: bool) -> Result<Option<Lookup>> {
        let Some(d) = self.cached_details(dev, nb)? else {
            return err(
                ErrorKind::NotFound,
                format!("thin device {} does not exist", dev.0),
            );
        };
        let sub = self.subtree_root(dev, nb)?;
        let v = btree::lookup_with(
            &mut self.tm.bm,
            sub,
            block.0,
            MAPPING_VALUE_SIZE,
            nb,
            btree::value_u64,
        )?;
        Ok(v.map(|v| {
            let bt = BlockTime::from_u64(v);
            Lookup {
                data_block: DataBlock(bt.block),
                time: bt.time,
                shared: d.snapshotted_time > bt.time,
            }
        }))
    }

    /// Look up a mapping (may read metadata blocks). Errors: `NotFound` (device).
    pub fn find_block(&mut self, dev: DevId, block: ThinBlock) -> Result<Option<Lookup>> {
        self.lookup(dev, block, false)
    }

    /// Like [`PoolMetadata::find_block`] but never does I/O: `WouldBlock` if a needed metadata
    /// block is not cached (call [`PoolMetadata::prefetch_block`] elsewhere, then retry).
    pub fn try_find_block(&mut self, dev: DevId, block: ThinBlock) -> Result<Option<Lookup>> {
        self.lookup(dev, block, true)
    }

    /// Load into the cache every metadata block a lookup of `(dev, block)` needs.
    pub fn prefetch_block(&mut self, dev: DevId, block: ThinBlock) -> Result<()> {
        self.lookup(dev, block, false).map(|_| ())
    }

    /// Allocate a free data block (count 1). Never returns a block freed in the open
    /// transaction. Errors: `NoSpace`.
    pub fn alloc_data_block(&mut self) -> Result<DataBlock> {
        self.check_writable()?;
        let b = self.data_sm.ll.alloc(&mut self.tm.bm)?;
        assert!(b < self.data_sm.ll.nr_blocks);
        debug_assert_eq!(self.data_sm.ll.count(&mut self.tm.bm, b)?, 1);
        Ok(DataBlock(b))
    }

    /// Map `(dev, block) -> data` at the current time. The caller already holds the data
    /// block's reference (as from `alloc_data_block`); an overwritten different block is
    /// dec'd; re-mapping the same block drops the surplus reference. Errors: `NotFound`
    /// (device), `InvalidArgument` (data block beyond the pool, or free: no reference held),
    /// `NoSpace` (metadata).
    pub fn insert_block(&mut self, dev: DevId, block: ThinBlock, data: DataBlock) -> Result<()> {
        self.guarded("insert_block", |s| s.insert_block_inner(dev, block, data))
    }

    fn insert_block_inner(&mut self, dev: DevId, block: ThinBlock, data: DataBlock) -> Result<()> {
        let mut d = self.details_or_not_found(dev)?;
        if data.0 >= self.data_sm.ll.nr_blocks {
            return err(
                ErrorKind::InvalidArgument,
                format!(
                    "data block {} beyond pool of {} blocks",
                    data.0, self.data_sm.ll.nr_blocks
                ),
            );
        }
        if self.data_sm.ll.count(&mut self.tm.bm, data.0)? == 0 {
            return err(
                ErrorKind::InvalidArgument,
                format!(
                    "data block {} is free: the caller must hold a reference",
                    data.0
                ),
            );
        }
        let value = BlockTime {
            block: data.0,
            time: self.time,
        }
        .to_u64()?
        .to_le_bytes();
        let data_sm = &mut self.data_sm;
        let (root, inserted) = btree::update(
            &mut self.tm,
            self.mapping_root,
            dev.0,
            MAPPING_VALUE_SIZE,
            &mut BlockRefs,
            |tm, v| {
                let sub = btree::value_u64(v)?;
                let mut refs = DataRefs {
                    data_sm: &mut *data_sm,
                };
                let (nsub, what) = btree::insert(tm, sub, block.0, &value, &mut refs)?;
                v.copy_from_slice(&nsub.to_le_bytes());
                if what == btree::Inserted::ReplacedEqual {
                    // Re-mapping the same block: the tree kept its reference (values are
                    // `equal`), so the caller's reference is surplus.
                    data_sm.ll.dec(&mut tm.bm, data.0)?;
                }
                Ok((what == btree::Inserted::New, nsub))
            },
        )?;
        let (inserted, nsub) = inserted;
        self.mapping_root = root;
        self.set_sub_root(dev, nsub);
        if inserted {
            d.mapped_blocks += 1;
            self.set_details(dev, d);
        }
        Ok(())
    }

    /// Unmap one block (decs its data block). Returns whether it was mapped.
    pub fn remove_block(&mut self, dev: DevId, block: ThinBlock) -> Result<bool> {
        self.remove_range(dev, block, ThinBlock(block.0.saturating_add(1)))
            .map(|n| n == 1)
    }

    /// Unmap `[begin, end)` (decs the data blocks); returns the number of mappings removed.
    pub fn remove_range(&mut self, dev: DevId, begin: ThinBlock, end: ThinBlock) -> Result<u64> {
        self.guarded("remove_range", |s| s.remove_range_inner(dev, begin, end))
    }

    fn remove_range_inner(&mut self, dev: DevId, begin: ThinBlock, end: ThinBlock) -> Result<u64> {
        let mut d = self.details_or_not_found(dev)?;
        if begin >= end {
            return Ok(0);
        }
        let data_sm = &mut self.data_sm;
        let (root, removed) = btree::update(
            &mut self.tm,
            self.mapping_root,
            dev.0,
            MAPPING_VALUE_SIZE,
            &mut BlockRefs,
            |tm, v| {
                let sub = btree::value_u64(v)?;
                let mut refs = DataRefs { data_sm };
                let (sub, removed) =
                    btree::remove_range(tm, sub, begin.0, end.0, MAPPING_VALUE_SIZE, &mut refs)?;
                v.copy_from_slice(&sub.to_le_bytes());
                Ok((removed, sub))
            },
        )?;
        let (removed, nsub) = removed;
        self.mapping_root = root;
        self.set_sub_root(dev, nsub);
        if removed > 0 {
            // Foreign images may carry a wrong count (thin_check does not verify it).
            d.mapped_blocks = d.mapped_blocks.saturating_sub(removed);
            self.set_details(dev, d);
        }
        Ok(removed)
    }

    /// The first mapping at or after `from`. Errors: `NotFound` (device).
    pub fn next_mapped(
        &mut self,
        dev: DevId,
        from: ThinBlock,
    ) -> Result<Option<(ThinBlock, Lookup)>> {
        let d = self.details_or_not_found(dev)?;
        let sub = self.subtree_root(dev, false)?;
        let e = btree::next_entry(&mut self.tm.bm, sub, from.0, MAPPING_VALUE_SIZE, false)?;
        match e {
            None => Ok(None),
            Some((k, v)) => {
                let bt = BlockTime::from_u64(btree::value_u64(&v)?);
                let l = Lookup {
                    data_block: DataBlock(bt.block),
                    time: bt.time,
                    shared: d.snapshotted_time > bt.time,
                };
                Ok(Some((ThinBlock(k), l)))
            }
        }
    }

    /// Iterate the mappings of `dev` in `[begin, end)` in order (each step is a
    /// [`PoolMetadata::next_mapped`]).
    pub fn mappings(&mut self, dev: DevId, begin: ThinBlock, end: ThinBlock) -> Mappings<'_> {
        Mappings {
            pmd: self,
            dev,
            next: begin.0,
            end: end.0,
            done: false,
        }
    }

    /// Details of a device (including uncommitted changes), or None.
    pub fn device_details(&mut self, dev: DevId) -> Result<Option<DeviceDetails>> {
        self.cached_details(dev, false)
    }

    /// All device ids, ascending.
    pub fn devices(&mut self) -> Result<Vec<DevId>> {
        let mut ids: std::collections::BTreeSet<u64> = self.details.keys().copied().collect();
        btree::for_each_entry(
            &mut self.tm.bm,
            self.details_root,
            DETAILS_VALUE_SIZE,
            &mut |k, _| {
                ids.insert(k);
                Ok(())
            },
        )?;
        Ok(ids.into_iter().map(DevId).collect())
    }

    /// Current pool time.
    pub fn time(&self) -> u32 {
        self.time
    }

    /// Current (possibly uncommitted) transaction id.
    pub fn transaction_id(&self) -> u64 {
        self.trans_id
    }

    /// Compare-and-swap the transaction id (persisted at commit). Errors: `InvalidArgument` if
    /// `old` ≠ current.
    pub fn set_transaction_id(&mut self, old: u64, new: u64) -> Result<()> {
        if old != self.trans_id {
            return err(
                ErrorKind::InvalidArgument,
                format!(
                    "transaction id {old} does not match current {}",
                    self.trans_id
                ),
            );
        }
        self.trans_id = new;
        Ok(())
    }

    /// Commit, then take a metadata snapshot (held root, spec §14): a copy of the superblock
    /// at a new block sharing the live mapping and details trees. Persisted by the next commit.
    /// Returns its block. Errors: `Busy` if one is already held.
    pub fn reserve_metadata_snap(&mut self) -> Result<MetaBlock> {
        self.guarded("reserve_metadata_snap", |s| s.reserve_metadata_snap_inner())
    }

    fn reserve_metadata_snap_inner(&mut self) -> Result<MetaBlock> {
        if self.held_root != 0 {
            return err(
                ErrorKind::Busy,
                format!("metadata snapshot {} already held", self.held_root),
            );
        }
        self.commit()?;
        let live = self.committed_sb;
        let n = self.tm.new_block_with(&SUPERBLOCK_VALIDATOR, |buf, n| {
            let copy = Superblock {
                blocknr: n,
                data_sm_root: SmRoot::default(),
                metadata_sm_root: SmRoot::default(),
                held_root: 0,
                ..live
            };
            copy.pack_block(buf)
        })?;
        let copy = live;
        self.tm.inc(copy.data_mapping_root)?;
        self.tm.inc(copy.device_details_root)?;
        self.held_root = n;
        Ok(MetaBlock(n))
    }

    /// Release the held metadata snapshot: delete its trees (shared parts are only dec'd) and
    /// free its superblock copy. Errors: `InvalidArgument` if none is held.
    pub fn release_metadata_snap(&mut self) -> Result<()> {
        self.guarded("release_metadata_snap", |s| s.release_metadata_snap_inner())
    }

    fn release_metadata_snap_inner(&mut self) -> Result<()> {
        if self.held_root == 0 {
            return err(ErrorKind::InvalidArgument, "no metadata snapshot is held");
        }
        let n = self.held_root;
        let r = self.tm.bm.read_lock(n, &SUPERBLOCK_VALIDATOR)?;
        let copy = Superblock::unpack_block(&r)?;
        drop(r);
        let mut refs = SubtreeRefs {
            data_sm: &mut self.data_sm,
        };
        btree::delete_tree(
            &mut self.tm,
            copy.data_mapping_root,
            MAPPING_VALUE_SIZE,
            &mut refs,
        )?;
        btree::delete_tree(
            &mut self.tm,
            copy.device_details_root,
            DETAILS_VALUE_SIZE,
            &mut NoRefs,
        )?;
        self.tm.dec(n)?;
        self.held_root = 0;
        Ok(())
    }

    /// The held metadata snapshot block, if any.
    pub fn held_root(&self) -> Option<MetaBlock> {
        (self.held_root != 0).then_some(MetaBlock(self.held_root))
    }

    /// Grow the data space map to `new_nr_blocks`. Errors: `InvalidArgument` when shrinking or
    /// beyond 2^40 blocks; `NoSpace` (metadata).
    pub fn resize_data_dev(&mut self, new_nr_blocks: u64) -> Result<()> {
        self.guarded("resize_data_dev", |s| {
            s.resize_data_dev_inner(new_nr_blocks)
        })
    }

    fn resize_data_dev_inner(&mut self, new_nr_blocks: u64) -> Result<()> {
        let old = self.data_sm.ll.nr_blocks;
        if new_nr_blocks < old {
            return err(
                ErrorKind::InvalidArgument,
                format!("cannot shrink data device from {old} to {new_nr_blocks} blocks"),
            );
        }
        self.data_sm.extend(&mut self.tm, new_nr_blocks - old)
    }

    /// Grow the metadata space map to `min(new_nr_blocks, 4,161,600)` blocks. Errors:
    /// `InvalidArgument` when shrinking or beyond the device.
    pub fn resize_metadata_dev(&mut self, new_nr_blocks: u64) -> Result<()> {
        self.guarded("resize_metadata_dev", |s| {
            s.resize_metadata_dev_inner(new_nr_blocks)
        })
    }

    fn resize_metadata_dev_inner(&mut self, new_nr_blocks: u64) -> Result<()> {
        if new_nr_blocks > self.tm.bm.nr_blocks() {
            return err(
                ErrorKind::InvalidArgument,
                format!("metadata device has only {} blocks", self.tm.bm.nr_blocks()),
            );
        }
        let new = new_nr_blocks.min(MAX_METADATA_BLOCKS);
        let old = self.tm.sm.ll.nr_blocks;
        if new < old {
            return err(
                ErrorKind::InvalidArgument,
                format!("cannot shrink metadata from {old} to {new} blocks"),
            );
        }
        self.tm.extend_metadata(new)
    }

    /// Data blocks in the pool.
    pub fn data_nr_blocks(&self) -> u64 {
        self.data_sm.ll.nr_blocks
    }

    /// Free data blocks (blocks freed in the open transaction count as free although they
    /// are reusable only after commit).
    pub fn data_nr_free(&self) -> u64 {
        self.data_sm.ll.nr_free()
    }

    /// Metadata blocks managed.
    pub fn metadata_nr_blocks(&self) -> u64 {
        self.tm.sm.ll.nr_blocks
    }

    /// Free metadata blocks.
    pub fn metadata_nr_free(&self) -> u64 {
        self.tm.sm.ll.nr_free()
    }

    /// Reference count of a data block. Errors: `InvalidArgument` beyond the pool.
    pub fn data_block_count(&mut self, block: DataBlock) -> Result<u32> {
        self.data_sm.ll.count(&mut self.tm.bm, block.0)
    }

    /// Take an extra reference on a data block (discard passdown).
    pub fn inc_data_block(&mut self, block: DataBlock) -> Result<()> {
        self.guarded("inc_data_block", |s| {
            s.data_sm.ll.inc(&mut s.tm.bm, block.0)
        })
    }

    /// Drop a reference on a data block. Errors: `Corrupt` if it is free.
    pub fn dec_data_block(&mut self, block: DataBlock) -> Result<()> {
        self.guarded("dec_data_block", |s| {
            s.data_sm.ll.dec(&mut s.tm.bm, block.0).map(|_| ())
        })
    }

    /// Whether the superblock NEEDS_CHECK flag is set.
    pub fn needs_check(&self) -> bool {
        self.flags & NEEDS_CHECK_FLAG != 0
    }

    /// Set NEEDS_CHECK: written immediately into the superblock of the last commit (the other
    /// fields unchanged), and kept by later commits.
    pub fn set_needs_check(&mut self) -> Result<()> {
        self.flags |= NEEDS_CHECK_FLAG;
        let mut sb = self.committed_sb;
        sb.flags |= NEEDS_CHECK_FLAG;
        let mut buf = [0u8; crate::BLOCK_SIZE];
        sb.pack_block(&mut buf)?;
        self.tm
            .bm
            .write_direct(SUPERBLOCK_LOCATION, &SUPERBLOCK_VALIDATOR, &mut buf)?;
        self.committed_sb = sb;
        Ok(())
    }

    /// Whether anything changed since the last commit (for periodic commits that skip idle
    /// pools).
    pub fn has_uncommitted_changes(&self) -> bool {
        let sb = &self.committed_sb;
        self.tm.nr_shadows() > 0
            || self.tm.sm.ll.has_pending()
            || self.data_sm.ll.has_pending()
            || self.details.values().any(|c| c.dirty)
            || (self.time, self.trans_id, self.held_root) != (sb.time, sb.trans_id, sb.held_root)
            || self.flags != sb.flags
    }

    /// Data block size in sectors.
    pub fn data_block_size_sectors(&self) -> u32 {
        self.data_block_size
    }

    /// Cache statistics of the block manager.
    pub fn cache_stats(&self) -> crate::block_manager::CacheStats {
        self.tm.bm.stats()
    }

    /// The superblock of the last commit.
    pub fn committed_superblock(&self) -> Superblock {
        self.committed_sb
    }
}

/// Iterator over a device's mappings (see [`PoolMetadata::mappings`]).
#[derive(Debug)]
pub struct Mappings<'a> {
    pmd: &'a mut PoolMetadata,
    dev: DevId,
    next: u64,
    end: u64,
    done: bool,
}

impl Iterator for Mappings<'_> {
    type Item = Result<(ThinBlock, Lookup)>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.next >= self.end {
            return None;
        }
        match self.pmd.next_mapped(self.dev, ThinBlock(self.next)) {
            Ok(Some((b, l))) if b.0 < self.end => {
                self.next = b.0.saturating_add(1);
                self.done = b.0 == u64::MAX;
                Some(Ok((b, l)))
            }
            Ok(_) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}
