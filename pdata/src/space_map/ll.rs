//! The low-level space map shared by the metadata and data space maps (kernel `ll_disk`).
//!
//! Design: counts of the last commit live on disk (bitmaps + overflow ref-count tree, reached
//! through `committed_index`), and are never modified during a transaction. Every count changed
//! in the open transaction is kept in an in-memory overlay (`overlay`: block → current count).
//! At commit the overlay is applied to shadowed copies of the bitmaps and the ref-count tree
//! ([`apply`]); for the metadata space map, applying may allocate metadata blocks, whose counts
//! go into the overlay and are applied in the next round, until nothing is pending. This
//! replaces the kernel's recursion guard and deferred-op ring (spec §12.2) with the same effect:
//! no operation ever recurses into itself and no allocation needs a bitmap being modified.
//!
//! Allocation returns a block that is free both in the committed view (on-disk bitmaps) and
//! in the current view (overlay): a block freed in the open transaction is never reused before
//! commit (spec §5.7).
//!
//! Invariants: `nr_allocated` is exactly the number of blocks with a non-zero current count;
//! index hints never claim fewer free entries or a later first free entry than reality.

use std::collections::{BTreeMap, BTreeSet};

use crate::block_manager::BlockManager;
use crate::btree;
use crate::error::{err, ErrorKind, Result};
use crate::space_map::format::{
    bitmap_find_free, bitmap_get, bitmap_nr_used, bitmap_set, IndexEntry, ENTRIES_PER_BITMAP,
};
use crate::transaction_manager::TransactionManager;
use crate::validator::BITMAP_VALIDATOR;

/// Counts at or above this live in the overflow ref-count tree.
pub const OVERFLOW_COUNT: u32 = 3;
/// Value size of the ref-count tree.
pub const REF_COUNT_VALUE_SIZE: usize = 4;

/// Low-level space map state.
#[derive(Debug, Clone)]
pub struct LowLevel {
    /// Blocks managed now.
    pub nr_blocks: u64,
    /// Blocks with a non-zero current count.
    pub nr_allocated: u64,
    /// Blocks managed at the last commit.
    pub committed_nr_blocks: u64,
    /// Index (bitmap locations + hints) of the last commit.
    pub committed_index: Vec<IndexEntry>,
    /// Current index (shadowed bitmap locations, updated hints).
    pub index: Vec<IndexEntry>,
    /// Index entries changed since the last commit.
    pub dirty_index: BTreeSet<usize>,
    /// Ref-count tree root of the last commit.
    pub committed_ref_count_root: u64,
    /// Current ref-count tree root.
    pub ref_count_root: u64,
    overlay: BTreeMap<u64, u32>,
    pending: BTreeSet<u64>,
    cursor: u64,
}

/// Number of bitmaps needed for `nr_blocks`.
pub fn nr_bitmaps(nr_blocks: u64) -> usize {
    nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize
}

impl LowLevel {
    /// State of a committed space map.
    pub fn open(nr_blocks: u64, index: Vec<IndexEntry>, ref_count_root: u64) -> Result<Self> {
        if index.len() < nr_bitmaps(nr_blocks) {
            return err(
                ErrorKind::Corrupt,
                format!(
                    "space map of {nr_blocks} blocks has only {} bitmaps",
                    index.len()
                ),
            );
        }
        Ok(LowLevel {
            nr_blocks,
            nr_allocated: 0,
            committed_nr_blocks: nr_blocks,
            committed_index: index.clone(),
            index,
            dirty_index: BTreeSet::new(),
            committed_ref_count_root: ref_count_root,
            ref_count_root,
            overlay: BTreeMap::new(),
            pending: BTreeSet::new(),
            cursor: 0,
        })
    }

    /// An empty space map of zero blocks (format; grow with `extend`).
    pub fn empty(ref_count_root: u64) -> Self {
        LowLevel {
            nr_blocks: 0,
            nr_allocated: 0,
            committed_nr_blocks: 0,
            committed_index: Vec::new(),
            index: Vec::new(),
            dirty_index: BTreeSet::new(),
            committed_ref_count_root: ref_count_root,
            ref_count_root,
            overlay: BTreeMap::new(),
            pending: BTreeSet::new(),
            cursor: 0,
        }
    }

    /// Recount `nr_allocated` from the committed bitmaps (foreign images may store it wrong).
    pub fn recount_allocated(&mut self, bm: &mut BlockManager) -> Result<()> {
        assert!(self.overlay.is_empty());
        let mut n = 0;
        for (i, e) in self
            .committed_index
            .iter()
            .enumerate()
            .take(nr_bitmaps(self.nr_blocks))
        {
            let start = i as u64 * ENTRIES_PER_BITMAP;
            let limit = (self.nr_blocks - start).min(ENTRIES_PER_BITMAP);
            let buf = bm.read_lock(e.blocknr, &BITMAP_VALIDATOR)?;
            n += bitmap_nr_used(&buf, limit)?;
        }
        self.nr_allocated = n;
        Ok(())
    }

    /// Free blocks now.
    pub fn nr_free(&self) -> u64 {
        debug_assert!(self.nr_allocated <= self.nr_blocks);
        self.nr_blocks.saturating_sub(self.nr_allocated)
    }

    fn check_range(&self, b: u64) -> Result<()> {
        if b >= self.nr_blocks {
            return err(
                ErrorKind::InvalidArgument,
                format!("block {b} beyond space map end {}", self.nr_blocks),
            );
        }
        Ok(())
    }

    /// Count of `b` at the last commit.
    pub fn committed_count(&self, bm: &mut BlockManager, b: u64) -> Result<u32> {
        if b >= self.committed_nr_blocks {
            return Ok(0);
        }
        let i = (b / ENTRIES_PER_BITMAP) as usize;
        let Some(e) = self.committed_index.get(i) else {
            return err(ErrorKind::Corrupt, format!("no bitmap for block {b}"));
        };
        let buf = bm.read_lock(e.blocknr, &BITMAP_VALIDATOR)?;
        let c = bitmap_get(&buf, b % ENTRIES_PER_BITMAP)?;
        if c < OVERFLOW_COUNT {
            return Ok(c);
        }
        let root = self.committed_ref_count_root;
        match btree::lookup_u32(bm, root, b)? {
            Some(v) if v >= OVERFLOW_COUNT => Ok(v),
            Some(v) => err(
                ErrorKind::Corrupt,
                format!("ref count of {b} is {v} in overflow tree"),
            ),
            None => err(
                ErrorKind::Corrupt,
                format!("block {b} missing from ref-count tree"),
            ),
        }
    }

    /// Current count of `b`.
    pub fn count(&self, bm: &mut BlockManager, b: u64) -> Result<u32> {
        self.check_range(b)?;
        match self.overlay.get(&b) {
            Some(c) => Ok(*c),
            None => self.committed_count(bm, b),
        }
    }

    /// Set the current count of `b`.
    pub fn set_count(&mut self, bm: &mut BlockManager, b: u64, c: u32) -> Result<()> {
        let old = self.count(bm, b)?;
        self.set_count_from(b, old, c);
        Ok(())
    }

    fn set_count_from(&mut self, b: u64, old: u32, c: u32) {
        // Saturating: a foreign image may store a wrong `nr_allocated` (data space map).
        if old == 0 && c > 0 {
            self.nr_allocated = (self.nr_allocated + 1).min(self.nr_blocks);
        } else if old > 0 && c == 0 {
            self.nr_allocated = self.nr_allocated.saturating_sub(1);
        }
        debug_assert!(self.nr_allocated <= self.nr_blocks);
        self.overlay.insert(b, c);
        self.pending.insert(b);
    }

    /// Add one reference.
    pub fn inc(&mut self, bm: &mut BlockManager, b: u64) -> Result<()> {
        let old = self.count(bm, b)?;
        let Some(c) = old.checked_add(1) else {
            return err(
                ErrorKind::Limit,
                format!("ref count of block {b} overflows"),
            );
        };
        self.set_count_from(b, old, c);
        Ok(())
    }

    /// Drop one reference. `Corrupt` if the block is free.
    pub fn dec(&mut self, bm: &mut BlockManager, b: u64) -> Result<u32> {
        let old = self.count(bm, b)?;
        if old == 0 {
            return err(ErrorKind::Corrupt, format!("dec of free block {b}"));
        }
        self.set_count_from(b, old, old - 1);
        Ok(old - 1)
    }

    fn overlay_used(&self, b: u64) -> bool {
        self.overlay.get(&b).is_some_and(|c| *c > 0)
    }

    /// First block in `[from, end)` free in both the committed and the current view.
    fn find_free_in(&self, bm: &mut BlockManager, from: u64, end: u64) -> Result<Option<u64>> {
        let mut b = from;
        while b < end {
            let i = (b / ENTRIES_PER_BITMAP) as usize;
            let base = i as u64 * ENTRIES_PER_BITMAP;
            let limit = (end - base).min(ENTRIES_PER_BITMAP);
            let next_bitmap = base + ENTRIES_PER_BITMAP;
            let committed = b < self.committed_nr_blocks;
            let entry = self.committed_index.get(i).copied().filter(|_| committed);
            let Some(e) = entry else {
                // Not covered at the last commit: only the overlay can say "used".
                match (b..base + limit).find(|x| !self.overlay_used(*x)) {
                    Some(x) => return Ok(Some(x)),
                    None => {
                        b = next_bitmap;
                        continue;
                    }
                }
            };
            let committed_limit = (self.committed_nr_blocks - base).min(limit);
            if e.nr_free > 0 {
                let buf = bm.read_lock(e.blocknr, &BITMAP_VALIDATOR)?;
                let mut off = (b - base).max(u64::from(e.none_free_before));
                while let Some(x) = bitmap_find_free(&buf, off, committed_limit)? {
                    if !self.overlay_used(base + x) {
                        return Ok(Some(base + x));
                    }
                    off = x + 1;
                }
            }
            // Blocks beyond the committed end inside this bitmap (after an extend).
            let tail = (base + committed_limit).max(b);
            if let Some(x) = (tail..base + limit).find(|x| !self.overlay_used(*x)) {
                return Ok(Some(x));
            }
            b = next_bitmap;
        }
        Ok(None)
    }

    /// Allocate a block (count 0 → 1) free in both views, searching from a cursor and
    /// wrapping. `NoSpace` if none.
    pub fn alloc(&mut self, bm: &mut BlockManager) -> Result<u64> {
        let cursor = self.cursor.min(self.nr_blocks);
        let found = match self.find_free_in(bm, cursor, self.nr_blocks)? {
            Some(b) => Some(b),
            None => self.find_free_in(bm, 0, cursor)?,
        };
        let Some(b) = found else {
            return err(
                ErrorKind::NoSpace,
                format!("all {} blocks in use", self.nr_blocks),
            );
        };
        debug_assert_eq!(self.count(bm, b)?, 0);
        self.set_count_from(b, 0, 1);
        self.cursor = b + 1;
        Ok(b)
    }

    /// Grow by `extra` blocks; the caller creates the bitmaps (`new_bitmaps` returns how many).
    pub fn extend_nr_blocks(&mut self, extra: u64) -> Result<std::ops::Range<usize>> {
        let Some(new_nr) = self.nr_blocks.checked_add(extra) else {
            return err(ErrorKind::InvalidArgument, "space map size overflows");
        };
        let old_bitmaps = self.index.len();
        // The last old bitmap gains entries: raise its free hint so it is not skipped.
        let old_nr = self.nr_blocks;
        if let Some(last) = old_bitmaps.checked_sub(1) {
            let end = (last as u64 + 1) * ENTRIES_PER_BITMAP;
            let gained = new_nr.min(end).saturating_sub(old_nr);
            if let Some(e) = self.index.get_mut(last) {
                e.nr_free = (u64::from(e.nr_free) + gained).min(ENTRIES_PER_BITMAP) as u32;
                self.dirty_index.insert(last);
            }
        }
        self.nr_blocks = new_nr;
        Ok(old_bitmaps..nr_bitmaps(new_nr).max(old_bitmaps))
    }

    /// Whether counts are waiting to be applied.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The last commit is now this state (called after the superblock is durable).
    pub fn finish_commit(&mut self) {
        assert!(self.pending.is_empty(), "commit left counts unapplied");
        self.committed_index = self.index.clone();
        self.committed_ref_count_root = self.ref_count_root;
        self.committed_nr_blocks = self.nr_blocks;
        self.overlay.clear();
        self.dirty_index.clear();
    }

    /// Take the pending blocks of one bitmap (the bitmap of the lowest pending block).
    fn take_pending_bitmap(&mut self) -> Option<(usize, Vec<(u64, u32)>)> {
        let first = *self.pending.first()?;
        let i = (first / ENTRIES_PER_BITMAP) as usize;
        let end = (i as u64 + 1) * ENTRIES_PER_BITMAP;
        let blocks: Vec<u64> = self.pending.range(first..end).copied().collect();
        let mut out = Vec::with_capacity(blocks.len());
        for b in blocks {
            self.pending.remove(&b);
            let c = self.overlay.get(&b).copied().unwrap_or(0);
            out.push((b, c));
        }
        Some((i, out))
    }
}

/// Access to a low-level space map and the transaction manager during [`apply`] (the metadata
/// space map lives inside the transaction manager, the data space map beside it).
pub trait LlAccess {
    /// The transaction manager.
    fn tm(&mut self) -> &mut TransactionManager;
    /// The space map being applied.
    fn ll(&mut self) -> &mut LowLevel;
}

fn update_hints(e: &mut IndexEntry, entry: u64, old: u32, new: u32) {
    let entry = entry as u32;
    if old == 0 && new > 0 {
        e.nr_free = e.nr_free.saturating_sub(1);
        if e.none_free_before == entry {
            e.none_free_before = entry + 1;
        }
    } else if old > 0 && new == 0 {
        e.nr_free = e.nr_free.saturating_add(1);
        e.none_free_before = e.none_free_before.min(entry);
    }
}

/// Apply pending counts to shadowed bitmaps and the ref-count tree, until none are pending.
pub fn apply(acc: &mut dyn LlAccess) -> Result<()> {
    let mut rounds = 0u64;
    while let Some((i, changes)) = acc.ll().take_pending_bitmap() {
        rounds += 1;
        assert!(rounds < 1 << 32, "space map apply does not converge");
        let Some(loc) = acc.ll().index.get(i).map(|e| e.blocknr) else {
            return err(
                ErrorKind::Corrupt,
                format!("no bitmap {i} for pending counts"),
            );
        };
        let (new_loc, _) = acc.tm().shadow(loc, &BITMAP_VALIDATOR)?;
        let base = i as u64 * ENTRIES_PER_BITMAP;
        let olds = acc
            .tm()
            .bm
            .write(new_loc, &BITMAP_VALIDATOR, |buf| -> Result<Vec<u32>> {
                let mut olds = Vec::with_capacity(changes.len());
                for (b, c) in &changes {
                    let e = b - base;
                    olds.push(bitmap_get(buf, e)?);
                    bitmap_set(buf, e, (*c).min(OVERFLOW_COUNT))?;
                }
                Ok(olds)
            })??;
        {
            let ll = acc.ll();
            ll.dirty_index.insert(i);
            let Some(entry) = ll.index.get_mut(i) else {
                return err(ErrorKind::Corrupt, "index vanished");
            };
            entry.blocknr = new_loc;
            for ((b, c), old) in changes.iter().zip(&olds) {
                update_hints(entry, b - base, *old, *c);
            }
        }
        for ((b, c), old) in changes.iter().zip(&olds) {
            let root = acc.ll().ref_count_root;
            let new_root = if *c >= OVERFLOW_COUNT {
                btree::insert_plain(acc.tm(), root, *b, &c.to_le_bytes())?
            } else if *old == OVERFLOW_COUNT {
                btree::remove_plain(acc.tm(), root, *b, REF_COUNT_VALUE_SIZE)?
            } else {
                root
            };
            acc.ll().ref_count_root = new_root;
        }
    }
    Ok(())
}
