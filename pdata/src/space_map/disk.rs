//! The data space map (spec §5.5): counts of data blocks, its index a B-tree (key = bitmap
//! number, value = 16-byte index entry), bitmaps and an overflow ref-count tree, all stored in
//! metadata blocks allocated through the transaction manager. The index is also held in memory
//! (one entry per 16,320 data blocks), so counting and allocating never walk the index tree;
//! changed entries are written into the tree at commit.

use crate::block_manager::BlockManager;
use crate::btree;
use crate::codec::{pack_into, unpack_from};
use crate::error::{err, ErrorKind, Result};
use crate::space_map::format::{IndexEntry, SmRoot, ENTRIES_PER_BITMAP};
use crate::space_map::ll::{nr_bitmaps, LowLevel, REF_COUNT_VALUE_SIZE};
use crate::transaction_manager::TransactionManager;
use crate::validator::BITMAP_VALIDATOR;

/// Value size of the bitmap-index tree.
pub const INDEX_VALUE_SIZE: usize = 16;
/// Largest data space map (40-bit block numbers).
pub const MAX_DATA_BLOCKS: u64 = 1 << 40;

/// Data space map state.
#[derive(Debug, Clone)]
pub struct DataSm {
    /// The low-level map.
    pub ll: LowLevel,
    /// Current root of the bitmap-index tree.
    pub index_root: u64,
}

impl DataSm {
    /// Create an empty map and grow it to `nr_blocks` (format).
    pub fn create(tm: &mut TransactionManager, nr_blocks: u64) -> Result<DataSm> {
        let index_root = btree::new_empty(tm, INDEX_VALUE_SIZE)?;
        let rc = btree::new_empty(tm, REF_COUNT_VALUE_SIZE)?;
        let mut sm = DataSm {
            ll: LowLevel::empty(rc),
            index_root,
        };
        sm.extend(tm, nr_blocks)?;
        Ok(sm)
    }

    /// Open from a committed root: loads the index entries (O(number of bitmaps), no bitmap
    /// is read) and takes `nr_allocated` from the root.
    pub fn open(bm: &mut BlockManager, root: &SmRoot) -> Result<DataSm> {
        if root.nr_blocks > MAX_DATA_BLOCKS {
            return err(
                ErrorKind::Corrupt,
                format!("data space map of {} blocks", root.nr_blocks),
            );
        }
        let mut index: Vec<IndexEntry> = Vec::with_capacity(nr_bitmaps(root.nr_blocks));
        btree::for_each_entry(bm, root.bitmap_root, INDEX_VALUE_SIZE, &mut |k, v| {
            if k != index.len() as u64 {
                return err(
                    ErrorKind::Corrupt,
                    format!("data bitmap index key {k} out of order"),
                );
            }
            index.push(unpack_from(v)?);
            Ok(())
        })?;
        if index.len() < nr_bitmaps(root.nr_blocks) {
            return err(ErrorKind::Corrupt, "data space map index too short");
        }
        index.truncate(nr_bitmaps(root.nr_blocks));
        let mut ll = LowLevel::open(root.nr_blocks, index, root.ref_count_root)?;
        // Trust the stored count (recounting would read every bitmap: O(pool size)); clamp it
        // so a damaged value cannot underflow the free count.
        ll.nr_allocated = root.nr_allocated.min(root.nr_blocks);
        Ok(DataSm {
            ll,
            index_root: root.bitmap_root,
        })
    }

    /// Grow by `extra` blocks, creating zeroed bitmaps (kernel hints: nr_free 16320).
    pub fn extend(&mut self, tm: &mut TransactionManager, extra: u64) -> Result<()> {
        if self.ll.nr_blocks.saturating_add(extra) > MAX_DATA_BLOCKS {
            return err(
                ErrorKind::InvalidArgument,
                "data space map beyond 2^40 blocks",
            );
        }
        let range = self.ll.extend_nr_blocks(extra)?;
        for i in range {
            let b = tm.new_block(&BITMAP_VALIDATOR)?;
            assert_eq!(self.ll.index.len(), i);
            let e = IndexEntry {
                blocknr: b,
                nr_free: ENTRIES_PER_BITMAP as u32,
                none_free_before: 0,
            };
            self.ll.index.push(e);
            self.ll.dirty_index.insert(i);
        }
        assert_eq!(self.ll.index.len(), nr_bitmaps(self.ll.nr_blocks));
        Ok(())
    }

    /// Apply pending counts and write changed index entries; returns the new root.
    pub fn pre_commit(&mut self, tm: &mut TransactionManager) -> Result<SmRoot> {
        tm.apply_ll(&mut self.ll)?;
        let dirty: Vec<usize> = self.ll.dirty_index.iter().copied().collect();
        for i in dirty {
            let Some(e) = self.ll.index.get(i) else {
                return err(ErrorKind::Corrupt, format!("dirty index entry {i} missing"));
            };
            let mut v = [0u8; INDEX_VALUE_SIZE];
            pack_into(e, &mut v)?;
            self.index_root = btree::insert_plain(tm, self.index_root, i as u64, &v)?;
        }
        Ok(SmRoot {
            nr_blocks: self.ll.nr_blocks,
            nr_allocated: self.ll.nr_allocated,
            bitmap_root: self.index_root,
            ref_count_root: self.ll.ref_count_root,
        })
    }

    /// The commit is durable.
    pub fn finish_commit(&mut self) {
        self.ll.finish_commit();
    }
}
