//! Transaction manager (spec §9.1, §13): the shadow set, `new_block`, `shadow` with
//! inc-children semantics, inc/dec of metadata blocks, and the metadata space map commit.
//!
//! Invariants:
//! * A block in the shadow set was allocated in this transaction; only such blocks are written.
//! * A block freed in the open transaction is not reused before commit (allocation searches
//!   blocks free in both the committed and the current view, see `space_map::ll`).

use std::collections::HashSet;

use crate::block_manager::BlockManager;
use crate::error::{err, ErrorKind, Result};
use crate::space_map::format::{IndexEntry, SmRoot, ENTRIES_PER_BITMAP, MAX_METADATA_BITMAPS};
use crate::space_map::ll::{apply, LlAccess, LowLevel};
use crate::space_map::metadata::MetadataSm;
use crate::validator::{Validator, BITMAP_VALIDATOR};

/// The transaction manager: block manager + metadata space map + shadow set.
#[derive(Debug)]
pub struct TransactionManager {
    /// The block manager.
    pub bm: BlockManager,
    /// The metadata space map.
    pub sm: MetadataSm,
    shadows: HashSet<u64>,
}

struct MetaAccess<'a>(&'a mut TransactionManager);

impl LlAccess for MetaAccess<'_> {
    fn tm(&mut self) -> &mut TransactionManager {
        self.0
    }
    fn ll(&mut self) -> &mut LowLevel {
        &mut self.0.sm.ll
    }
}

impl TransactionManager {
    /// A transaction manager over `bm` with metadata space map `sm`.
    pub fn new(bm: BlockManager, sm: MetadataSm) -> TransactionManager {
        TransactionManager {
            bm,
            sm,
            shadows: HashSet::new(),
        }
    }

    /// Replace the metadata space map and forget the shadow set (abort).
    pub fn reset(&mut self, sm: MetadataSm) {
        self.sm = sm;
        self.shadows.clear();
    }

    /// Whether `b` was allocated in this transaction (may be written in place).
    pub fn is_shadow(&self, b: u64) -> bool {
        self.shadows.contains(&b)
    }

    /// Number of blocks in the shadow set.
    pub fn nr_shadows(&self) -> usize {
        self.shadows.len()
    }

    /// Allocate a zeroed block of type `v` (count 1), in the shadow set. Only for block types
    /// whose all-zero body is valid (bitmaps, index); others use [`Self::new_block_with`].
    pub fn new_block(&mut self, v: &'static dyn Validator) -> Result<u64> {
        self.new_block_with(v, |_, _| Ok(()))
    }

    /// Allocate a block of type `v` (count 1, in the shadow set) and fill it with `f(buf, loc)`
    /// in one step, so the block is valid whenever it is written back.
    pub fn new_block_with(
        &mut self,
        v: &'static dyn Validator,
        f: impl FnOnce(&mut crate::block_manager::Block, u64) -> Result<()>,
    ) -> Result<u64> {
        let b = self.sm.ll.alloc(&mut self.bm)?;
        let fresh = self.shadows.insert(b);
        assert!(fresh, "allocated block {b} is already a live shadow");
        self.bm.write_zero(b, v, |buf| f(buf, b))??;
        debug_assert_eq!(self.sm.ll.count(&mut self.bm, b)?, 1);
        Ok(b)
    }

    /// Shadow `orig` for writing (spec §9.1): returns the block to write and whether the
    /// caller must inc the children of the copy (the original was shared).
    pub fn shadow(&mut self, orig: u64, v: &'static dyn Validator) -> Result<(u64, bool)> {
        let count = self.sm.ll.count(&mut self.bm, orig)?;
        if count == 0 {
            return err(
                ErrorKind::Corrupt,
                format!("shadow of free metadata block {orig}"),
            );
        }
        let inc_children = count > 1;
        if self.shadows.contains(&orig) && !inc_children {
            return Ok((orig, false));
        }
        let new = self.sm.ll.alloc(&mut self.bm)?;
        self.sm.ll.dec(&mut self.bm, orig)?;
        let src = self.bm.read_lock(orig, v)?;
        self.bm.write_copy(new, v, &src, |_| ())?;
        drop(src);
        self.shadows.insert(new);
        debug_assert_ne!(new, orig);
        Ok((new, inc_children))
    }

    /// Add a reference to metadata block `b`.
    pub fn inc(&mut self, b: u64) -> Result<()> {
        self.sm.ll.inc(&mut self.bm, b)
    }

    /// Drop a reference to metadata block `b`; at zero it is free (reusable after commit).
    pub fn dec(&mut self, b: u64) -> Result<()> {
        if self.sm.ll.dec(&mut self.bm, b)? == 0 && self.shadows.remove(&b) {
            // Allocated and freed in this transaction: its contents are dead.
            self.bm.forget(b);
        }
        Ok(())
    }

    /// Current reference count of metadata block `b`.
    pub fn ref_count(&mut self, b: u64) -> Result<u32> {
        self.sm.ll.count(&mut self.bm, b)
    }

    /// Grow the metadata space map to `new_nr_blocks` (spec §5.8, §12.3): new bitmaps are
    /// allocated (possibly from the new area) and their counts applied at commit.
    pub fn extend_metadata(&mut self, new_nr_blocks: u64) -> Result<()> {
        let old = self.sm.ll.nr_blocks;
        if new_nr_blocks < old {
            return err(
                ErrorKind::InvalidArgument,
                "cannot reduce size of metadata space map",
            );
        }
        let needed = crate::space_map::ll::nr_bitmaps(new_nr_blocks);
        if needed > MAX_METADATA_BITMAPS {
            return err(
                ErrorKind::NoSpace,
                format!("{new_nr_blocks} metadata blocks > max"),
            );
        }
        let range = self.sm.ll.extend_nr_blocks(new_nr_blocks - old)?;
        self.create_metadata_bitmaps(range, needed)
    }

    /// Create zeroed bitmaps for index entries `range` (format and extend).
    pub fn create_metadata_bitmaps(
        &mut self,
        range: std::ops::Range<usize>,
        needed: usize,
    ) -> Result<()> {
        for i in range {
            let b = self.new_block(&BITMAP_VALIDATOR)?;
            assert_eq!(self.sm.ll.index.len(), i);
            let entry = IndexEntry {
                blocknr: b,
                nr_free: ENTRIES_PER_BITMAP as u32,
                none_free_before: 0,
            };
            self.sm.ll.index.push(entry);
            self.sm.ll.dirty_index.insert(i);
        }
        assert_eq!(self.sm.ll.index.len(), needed);
        Ok(())
    }

    /// First half of a commit for the metadata space map: shadow (or create) the index block,
    /// apply all pending counts until none remain, write the index. Returns the new sm root.
    pub fn pre_commit(&mut self) -> Result<SmRoot> {
        let idx = match self.sm.index_block {
            Some(b) => self.shadow(b, &crate::validator::INDEX_VALIDATOR)?.0,
            None => self.new_block(&crate::validator::INDEX_VALIDATOR)?,
        };
        apply(&mut MetaAccess(self))?;
        assert!(!self.sm.ll.has_pending());
        let entries = self.sm.ll.index.clone();
        self.bm
            .write(idx, &crate::validator::INDEX_VALIDATOR, |buf| {
                crate::space_map::format::pack_index_block(&entries, buf)
            })??;
        self.sm.new_index_block = Some(idx);
        Ok(SmRoot {
            nr_blocks: self.sm.ll.nr_blocks,
            nr_allocated: self.sm.ll.nr_allocated,
            bitmap_root: idx,
            ref_count_root: self.sm.ll.ref_count_root,
        })
    }

    /// Second half of a commit, after the superblock is durable: the new state becomes the
    /// committed state and the shadow set is cleared.
    pub fn finish_commit(&mut self) {
        self.sm.finish_commit();
        self.shadows.clear();
    }

    /// Access for applying the data space map (which lives outside the transaction manager).
    pub fn apply_ll(&mut self, ll: &mut LowLevel) -> Result<()> {
        struct DataAccess<'a> {
            tm: &'a mut TransactionManager,
            ll: &'a mut LowLevel,
        }
        impl LlAccess for DataAccess<'_> {
            fn tm(&mut self) -> &mut TransactionManager {
                self.tm
            }
            fn ll(&mut self) -> &mut LowLevel {
                self.ll
            }
        }
        apply(&mut DataAccess { tm: self, ll })
    }
}
