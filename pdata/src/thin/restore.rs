//! Bulk loader: writes a [`PoolXml`] as fresh dm-thin metadata (what `thin_restore` does).
//!
//! The image is built bottom-up without the transaction manager: every block is allocated
//! once, in increasing order from block 1, so each metadata block has reference count 1 and
//! the metadata space map is simply "blocks `0..end` in use". Each device gets its own
//! bottom-level tree (nothing is shared between devices, as with thin_restore), so a data
//! block's count is the number of distinct leaves mapping it (§8). Nodes are filled evenly so
//! that every non-root node holds at least `max/3` entries.
//!
//! Write order: every non-superblock block, flush, superblock, flush — an interrupted restore
//! leaves the old superblock (or none) in place.
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;

use crate::block_io::{BlockIo, BLOCK_SIZE};
use crate::btree::node::{max_entries_for, Node, BTREE_VALIDATOR, INTERNAL_VALUE_SIZE};
use crate::codec::{pack_into, Pack};
use crate::error::{err, Error, ErrorKind, Result};
use crate::space_map::format::{
    bitmap_set, pack_index_block, IndexEntry, SmRoot, ENTRIES_PER_BITMAP, MAX_METADATA_BITMAPS,
    MAX_METADATA_BLOCKS,
};
use crate::thin::block_time::BlockTime;
use crate::thin::device_details::DeviceDetails;
use crate::thin::superblock::{
    Superblock, METADATA_BLOCK_SIZE_SECTORS, SUPERBLOCK_LOCATION, SUPERBLOCK_MAGIC,
    SUPERBLOCK_VERSION,
};
use crate::thin::xml::PoolXml;
use crate::thin::{MAX_DATA_BLOCK_SIZE_SECTORS, MAX_DEV_ID, MIN_DATA_BLOCK_SIZE_SECTORS};
use crate::validator::{Validator, BITMAP_VALIDATOR, INDEX_VALIDATOR};

const REFCOUNT_VALUE_SIZE: usize = 4;

/// Sequential block writer: allocates `1, 2, ...` and writes each block as it is finished.
struct Loader<'a> {
    io: &'a dyn BlockIo,
    next: u64,
    limit: u64,
    buf: Box<[u8; BLOCK_SIZE]>,
}

impl Loader<'_> {
    fn alloc(&mut self) -> Result<u64> {
        if self.next >= self.limit {
            return err(
                ErrorKind::NoSpace,
                format!(
                    "metadata device too small: {} blocks are not enough",
                    self.limit
                ),
            );
        }
        self.next += 1;
        Ok(self.next - 1)
    }

    fn write(&mut self, loc: u64, v: &dyn Validator) -> Result<()> {
        v.prepare_for_write(&mut self.buf, loc);
        self.io
            .write_block(loc, &self.buf)
            .map_err(|e| Error::io(format!("writing block {loc}"), e))
    }

    fn write_node(&mut self, node: &Node) -> Result<u64> {
        let loc = self.alloc()?;
        node.pack(&mut self.buf, loc)?;
        self.write(loc, &BTREE_VALIDATOR)?;
        Ok(loc)
    }

    /// Builds a B-tree from sorted `(key, value)` entries; returns its root.
    fn build_tree(
        &mut self,
        n: u64,
        value_size: usize,
        entries: &mut dyn Iterator<Item = Result<(u64, Vec<u8>)>>,
        on_leaf: &mut dyn FnMut(&Node),
    ) -> Result<u64> {
        let mut level: Vec<(u64, u64)> = Vec::new();
        let mut sizes = even_split(n, max_entries_for(value_size) as u64);
        let mut node = Node::new(true, value_size);
        let mut target = sizes.next().unwrap_or(0);
        for e in entries {
            let (k, v) = e?;
            node.keys.push(k);
            node.values.extend_from_slice(&v);
            if node.keys.len() as u64 == target {
                on_leaf(&node);
                let first = node.keys.first().copied().unwrap_or(0);
                level.push((first, self.write_node(&node)?));
                node = Node::new(true, value_size);
                target = sizes.next().unwrap_or(0);
            }
        }
        if level.is_empty() || !node.keys.is_empty() {
            if node.keys.len() as u64 != target && !(level.is_empty() && n == 0) {
                return err(ErrorKind::InvalidArgument, "entry count does not match");
            }
            on_leaf(&node);
            let first = node.keys.first().copied().unwrap_or(0);
            level.push((first, self.write_node(&node)?));
        }
        while level.len() > 1 {
            let mut upper = Vec::new();
            let mut it = level.into_iter();
            for size in even_split(upper_len(&it), max_entries_for(INTERNAL_VALUE_SIZE) as u64) {
                let mut node = Node::new(false, INTERNAL_VALUE_SIZE);
                for (k, child) in it.by_ref().take(size as usize) {
                    node.keys.push(k);
                    node.values.extend_from_slice(&child.to_le_bytes());
                }
                let first = node.keys.first().copied().unwrap_or(0);
                upper.push((first, self.write_node(&node)?));
            }
            level = upper;
        }
        level
            .first()
            .map(|l| l.1)
            .ok_or_else(|| Error::new(ErrorKind::Corrupt, "empty tree"))
    }
}

fn upper_len<I: ExactSizeIterator>(it: &I) -> u64 {
    it.len() as u64
}

/// Sizes of `ceil(n / max)` nodes holding `n` entries as evenly as possible (one empty node
/// for `n == 0`).
fn even_split(n: u64, max: u64) -> impl Iterator<Item = u64> {
    let nodes = n.div_ceil(max).max(1);
    (0..nodes).map(move |i| n / nodes + u64::from(i < n % nodes))
}

fn validate(pool: &PoolXml) -> Result<()> {
    pool.validate()
        .map_err(|e| Error::new(ErrorKind::InvalidArgument, e.to_string()))?;
    let dbs = pool.data_block_size;
    if !(MIN_DATA_BLOCK_SIZE_SECTORS..=MAX_DATA_BLOCK_SIZE_SECTORS).contains(&dbs)
        || !dbs.is_multiple_of(MIN_DATA_BLOCK_SIZE_SECTORS)
    {
        return err(
            ErrorKind::InvalidArgument,
            format!("invalid data_block_size {dbs}"),
        );
    }
    for dev in &pool.devices {
        if dev.dev_id > MAX_DEV_ID {
            return err(
                ErrorKind::InvalidArgument,
                format!("dev_id {} > 2^24-1", dev.dev_id),
            );
        }
        if let Some(run) = dev
            .mappings
            .iter()
            .find(|r| r.data_begin + r.length > pool.nr_data_blocks)
        {
            return err(
                ErrorKind::InvalidArgument,
                format!(
                    "device {}: mapping {} -> {} past nr_data_blocks {}",
                    dev.dev_id, run.origin_begin, run.data_begin, pool.nr_data_blocks
                ),
            );
        }
    }
    Ok(())
}

/// Writes `pool` to `io` as fresh metadata over the whole device (capped at 4,161,600
/// blocks). `mapped_blocks` is recomputed from the mappings, as thin_restore does.
/// Errors: `InvalidArgument` for XML the kernel could not use (bad block size, dev id past
/// 2^24-1, mapping past `nr_data_blocks`), `NoSpace` if the device is too small, `Io`.
pub fn restore(pool: &PoolXml, io: &dyn BlockIo) -> Result<()> {
    validate(pool)?;
    let nr_meta = io.nr_blocks().min(MAX_METADATA_BLOCKS);
    let mut ld = Loader {
        io,
        next: 1,
        limit: nr_meta,
        buf: Box::new([0u8; BLOCK_SIZE]),
    };
    let mut data_refs: BTreeMap<u64, u32> = BTreeMap::new();
    let mut top: Vec<(u64, u64, u64)> = Vec::with_capacity(pool.devices.len());
    for dev in &pool.devices {
        let n = dev.nr_mappings();
        let mut entries = dev.singles().map(|(o, d, t)| {
            let v = BlockTime { block: d, time: t }.to_u64()?;
            Ok((o, v.to_le_bytes().to_vec()))
        });
        let mut count_leaf = |leaf: &Node| {
            let blocks: Vec<u64> = (0..leaf.nr_entries())
                .filter_map(|i| leaf.values.get(8 * i..8 * i + 8))
                .filter_map(|v| v.try_into().ok().map(u64::from_le_bytes))
                .map(|v| BlockTime::from_u64(v).block)
                .collect();
            for b in blocks {
                *data_refs.entry(b).or_insert(0) += 1;
            }
        };
        let root = ld.build_tree(n, 8, &mut entries, &mut count_leaf)?;
        top.push((dev.dev_id, root, n));
    }
    let mut entries = top
        .iter()
        .map(|&(dev, root, _)| Ok((dev, root.to_le_bytes().to_vec())));
    let mapping_root = ld.build_tree(top.len() as u64, 8, &mut entries, &mut |_| {})?;
    let mut entries = pool.devices.iter().zip(&top).map(|(dev, &(_, _, n))| {
        let d = DeviceDetails {
            mapped_blocks: n,
            transaction_id: dev.transaction,
            creation_time: dev.creation_time,
            snapshotted_time: dev.snap_time,
        };
        Ok((dev.dev_id, packed(&d)?))
    });
    let details_root = ld.build_tree(top.len() as u64, 24, &mut entries, &mut |_| {})?;
    let data_sm = write_data_sm(&mut ld, pool.nr_data_blocks, &data_refs)?;
    let metadata_sm = write_metadata_sm(&mut ld, nr_meta)?;
    io.flush()
        .map_err(|e| Error::io("flushing restored metadata", e))?;
    let sb = Superblock {
        flags: pool.flags,
        blocknr: SUPERBLOCK_LOCATION,
        uuid: [0; 16],
        magic: SUPERBLOCK_MAGIC,
        version: SUPERBLOCK_VERSION,
        time: pool.time,
        trans_id: pool.transaction,
        held_root: 0,
        data_sm_root: data_sm,
        metadata_sm_root: metadata_sm,
        data_mapping_root: mapping_root,
        device_details_root: details_root,
        data_block_size: pool.data_block_size,
        metadata_block_size: METADATA_BLOCK_SIZE_SECTORS,
        metadata_nr_blocks: nr_meta,
        compat_flags: 0,
        compat_ro_flags: 0,
        incompat_flags: 0,
    };
    sb.pack_block(&mut ld.buf)?;
    ld.write(
        SUPERBLOCK_LOCATION,
        &crate::thin::superblock::SUPERBLOCK_VALIDATOR,
    )?;
    io.flush()
        .map_err(|e| Error::io("flushing the superblock", e))
}

fn packed<T: Pack>(v: &T) -> Result<Vec<u8>> {
    let mut out = vec![0u8; T::DISK_SIZE];
    pack_into(v, &mut out)?;
    Ok(out)
}

/// Writes one bitmap block covering `valid` entries whose counts `count(e)` gives; returns
/// its index entry (exact hints).
fn write_bitmap(ld: &mut Loader<'_>, valid: u64, count: &dyn Fn(u64) -> u32) -> Result<IndexEntry> {
    let loc = ld.alloc()?;
    ld.buf.fill(0);
    let mut used = 0u32;
    let mut first_free = None;
    for e in 0..valid {
        let c = count(e);
        if c == 0 {
            first_free.get_or_insert(e as u32);
        } else {
            bitmap_set(&mut ld.buf, e, c.min(3))?;
            used += 1;
        }
    }
    ld.write(loc, &BITMAP_VALIDATOR)?;
    Ok(IndexEntry {
        blocknr: loc,
        nr_free: valid as u32 - used,
        none_free_before: first_free.unwrap_or(valid as u32),
    })
}

fn write_data_sm(ld: &mut Loader<'_>, nr_blocks: u64, refs: &BTreeMap<u64, u32>) -> Result<SmRoot> {
    let nr_bitmaps = nr_blocks.div_ceil(ENTRIES_PER_BITMAP);
    let mut index = Vec::new();
    for i in 0..nr_bitmaps {
        let base = i * ENTRIES_PER_BITMAP;
        let valid = (nr_blocks - base).min(ENTRIES_PER_BITMAP);
        let counts: BTreeMap<u64, u32> = refs
            .range(base..base + valid)
            .map(|(&b, &c)| (b - base, c))
            .collect();
        let entry = write_bitmap(ld, valid, &|e| counts.get(&e).copied().unwrap_or(0))?;
        index.push((i, packed(&entry)?));
    }
    let mut entries = index.into_iter().map(Ok);
    let bitmap_root = ld.build_tree(nr_bitmaps, IndexEntry::SIZE, &mut entries, &mut |_| {})?;
    let overflow: Vec<(u64, Vec<u8>)> = refs
        .iter()
        .filter(|(_, &c)| c >= 3)
        .map(|(&b, &c)| (b, c.to_le_bytes().to_vec()))
        .collect();
    let n = overflow.len() as u64;
    let mut entries = overflow.into_iter().map(Ok);
    let ref_count_root = ld.build_tree(n, REFCOUNT_VALUE_SIZE, &mut entries, &mut |_| {})?;
    Ok(SmRoot {
        nr_blocks,
        nr_allocated: refs.len() as u64,
        bitmap_root,
        ref_count_root,
    })
}

/// Writes the metadata space map last: every block allocated so far, plus the space map's
/// own blocks, has count 1 and they are exactly `0..end`.
fn write_metadata_sm(ld: &mut Loader<'_>, nr_blocks: u64) -> Result<SmRoot> {
    let nr_bitmaps = nr_blocks.div_ceil(ENTRIES_PER_BITMAP);
    if nr_bitmaps > MAX_METADATA_BITMAPS as u64 {
        return err(ErrorKind::Limit, "metadata device too large");
    }
    let ref_count_root =
        ld.build_tree(0, REFCOUNT_VALUE_SIZE, &mut std::iter::empty(), &mut |_| {})?;
    let index_loc = ld.alloc()?;
    // Bitmaps are allocated as they are written; the final end is known in advance.
    let end = ld.next + nr_bitmaps;
    if end > ld.limit {
        return err(
            ErrorKind::NoSpace,
            "metadata device too small for its space map",
        );
    }
    let mut index = Vec::new();
    for i in 0..nr_bitmaps {
        let base = i * ENTRIES_PER_BITMAP;
        let valid = (nr_blocks - base).min(ENTRIES_PER_BITMAP);
        index.push(write_bitmap(ld, valid, &|e| u32::from(base + e < end))?);
    }
    debug_assert_eq!(ld.next, end);
    pack_index_block(&index, &mut ld.buf)?;
    ld.write(index_loc, &INDEX_VALIDATOR)?;
    Ok(SmRoot {
        nr_blocks,
        nr_allocated: end,
        bitmap_root: index_loc,
        ref_count_root,
    })
}
