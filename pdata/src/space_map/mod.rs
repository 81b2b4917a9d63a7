//! Space maps: reference counts of metadata and data blocks (spec §5, §8, §12).
//!
//! [`SpaceMap`] is the common interface; the on-disk maps (`metadata`, `disk`) share the
//! low-level overlay design of [`ll`], and [`core::CoreSpaceMap`] is the in-memory model.
//! [`MetadataSpaceMap`] and [`DataSpaceMap`] adapt the on-disk maps to the trait (they need the
//! transaction manager for I/O).

pub mod core;
pub mod disk;
pub mod format;
pub mod ll;
pub mod metadata;

#[cfg(test)]
mod tests;

use crate::error::Result;
use crate::transaction_manager::TransactionManager;

/// Reference counts of a range of blocks `[0, nr_blocks)`.
pub trait SpaceMap {
    /// Blocks managed.
    fn nr_blocks(&self) -> u64;
    /// Blocks with count 0.
    fn nr_free(&self) -> u64;
    /// Count of `b` (`InvalidArgument` beyond the end).
    fn count(&mut self, b: u64) -> Result<u32>;
    /// Add a reference.
    fn inc(&mut self, b: u64) -> Result<()>;
    /// Drop a reference (`Corrupt` if already free).
    fn dec(&mut self, b: u64) -> Result<()>;
    /// Allocate a block free now and at the last commit (count → 1); `NoSpace` if none.
    fn alloc(&mut self) -> Result<u64>;
    /// Grow by `extra` blocks.
    fn extend(&mut self, extra: u64) -> Result<()>;
    /// Make the current counts the committed state (durable for on-disk maps).
    fn commit(&mut self) -> Result<()>;
}

/// The metadata space map of a transaction manager as a [`SpaceMap`]. `commit` writes and
/// flushes the map's own blocks (not a superblock).
#[derive(Debug)]
pub struct MetadataSpaceMap<'a>(pub &'a mut TransactionManager);

impl SpaceMap for MetadataSpaceMap<'_> {
    fn nr_blocks(&self) -> u64 {
        self.0.sm.ll.nr_blocks
    }
    fn nr_free(&self) -> u64 {
        self.0.sm.ll.nr_free()
    }
    fn count(&mut self, b: u64) -> Result<u32> {
        self.0.ref_count(b)
    }
    fn inc(&mut self, b: u64) -> Result<()> {
        self.0.inc(b)
    }
    fn dec(&mut self, b: u64) -> Result<()> {
        self.0.dec(b)
    }
    fn alloc(&mut self) -> Result<u64> {
        let tm = &mut *self.0;
        tm.sm.ll.alloc(&mut tm.bm)
    }
    fn extend(&mut self, extra: u64) -> Result<()> {
        let n = self.0.sm.ll.nr_blocks + extra;
        self.0.extend_metadata(n)
    }
    fn commit(&mut self) -> Result<()> {
        self.0.pre_commit()?;
        self.0.bm.flush()?;
        self.0.finish_commit();
        Ok(())
    }
}

/// A data space map with its transaction manager as a [`SpaceMap`].
#[derive(Debug)]
pub struct DataSpaceMap<'a> {
    /// The map.
    pub sm: &'a mut disk::DataSm,
    /// Its transaction manager.
    pub tm: &'a mut TransactionManager,
}

impl SpaceMap for DataSpaceMap<'_> {
    fn nr_blocks(&self) -> u64 {
        self.sm.ll.nr_blocks
    }
    fn nr_free(&self) -> u64 {
        self.sm.ll.nr_free()
    }
    fn count(&mut self, b: u64) -> Result<u32> {
        self.sm.ll.count(&mut self.tm.bm, b)
    }
    fn inc(&mut self, b: u64) -> Result<()> {
        self.sm.ll.inc(&mut self.tm.bm, b)
    }
    fn dec(&mut self, b: u64) -> Result<()> {
        self.sm.ll.dec(&mut self.tm.bm, b).map(|_| ())
    }
    fn alloc(&mut self) -> Result<u64> {
        self.sm.ll.alloc(&mut self.tm.bm)
    }
    fn extend(&mut self, extra: u64) -> Result<()> {
        self.sm.extend(self.tm, extra)
    }
    fn commit(&mut self) -> Result<()> {
        self.sm.pre_commit(self.tm)?;
        self.tm.pre_commit()?;
        self.tm.bm.flush()?;
        self.tm.finish_commit();
        self.sm.finish_commit();
        Ok(())
    }
}
