//! The metadata space map (spec §5.4, §12): counts of metadata blocks, indexed by a single
//! index block of 255 entries held in memory and written (by shadowing) only at commit.
//!
//! Bootstrap: at format the map has no committed state, so every block reads as free and
//! allocation is linear from block 1 after block 0 (the superblock) is given count 1; bitmaps
//! and the ref-count root are allocated through the map itself and their counts applied at the
//! first commit. See `space_map::ll` for how recursion is avoided.

use crate::block_manager::BlockManager;
use crate::error::{err, ErrorKind, Result};
use crate::space_map::format::{unpack_index_block, SmRoot, MAX_METADATA_BLOCKS};
use crate::space_map::ll::{nr_bitmaps, LowLevel};
use crate::validator::INDEX_VALIDATOR;

/// Metadata space map state.
#[derive(Debug, Clone)]
pub struct MetadataSm {
    /// The low-level map.
    pub ll: LowLevel,
    /// Committed location of the index block (None before the first commit).
    pub index_block: Option<u64>,
    /// Index block written by the commit in progress.
    pub new_index_block: Option<u64>,
}

impl MetadataSm {
    /// Open from a committed root.
    pub fn open(bm: &mut BlockManager, root: &SmRoot) -> Result<MetadataSm> {
        if root.nr_blocks > MAX_METADATA_BLOCKS || root.nr_blocks > bm.nr_blocks() {
            return err(
                ErrorKind::Corrupt,
                format!(
                    "metadata space map of {} blocks, device has {} (max {MAX_METADATA_BLOCKS})",
                    root.nr_blocks,
                    bm.nr_blocks()
                ),
            );
        }
        let buf = bm.read_lock(root.bitmap_root, &INDEX_VALIDATOR)?;
        let mut index = unpack_index_block(&buf)?;
        index.truncate(nr_bitmaps(root.nr_blocks));
        for (i, e) in index.iter().enumerate() {
            if e.blocknr == 0 || e.blocknr >= root.nr_blocks {
                return err(
                    ErrorKind::Corrupt,
                    format!("metadata bitmap {i} at {}", e.blocknr),
                );
            }
        }
        let mut ll = LowLevel::open(root.nr_blocks, index, root.ref_count_root)?;
        ll.recount_allocated(bm)?;
        Ok(MetadataSm {
            ll,
            index_block: Some(root.bitmap_root),
            new_index_block: None,
        })
    }

    /// A map with no committed state and zero blocks (format).
    pub fn bootstrap() -> MetadataSm {
        MetadataSm {
            ll: LowLevel::empty(0),
            index_block: None,
            new_index_block: None,
        }
    }

    /// The commit is durable.
    pub fn finish_commit(&mut self) {
        if let Some(b) = self.new_index_block.take() {
            self.index_block = Some(b);
        }
        self.ll.finish_commit();
    }
}
