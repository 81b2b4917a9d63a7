//! Offline consistency check of dm-thin metadata: everything thin_check 0.9.0 checks (spec
//! §18) and more.
//!
//! The check reads blocks straight from a [`BlockIo`] through the format codecs and
//! validators; it never trusts a count or pointer it has not verified and survives arbitrary
//! garbage: every block number is range-checked before it is read, every B-tree is walked
//! with an explicit stack bounded by [`MAX_BTREE_DEPTH`], each node is walked once (a
//! seen-set; shared nodes are counted per reference), and the number of problems recorded is
//! bounded.
//!
//! Checks, in order:
//! 1. superblock: checksum, block number, magic, feature flags, block sizes;
//! 2. device-details tree, both mapping-tree levels, and the same trees of a held root: per
//!    node checksum, block number, flags, `max_entries` (exact for the value size),
//!    `nr_entries` (≤ max, ≥ max/3 unless a root), value size, keys strictly increasing and
//!    within the parent's key range, all leaves at one depth, one tree type per block;
//! 3. details and mapping top level name the same devices; `mapped_blocks` equals the number
//!    of mappings; mapping and device times are not after the pool time; no mapping points
//!    at or past the data device's end;
//! 4. metadata space map: index block, bitmaps, overflow ref-count tree; every block's count
//!    equals the number of references to it (superblock, roots, internal-node slots, top-level
//!    values, space-map structures, held root), per §8; `nr_allocated` is not below the
//!    real number; an index entry never claims a bitmap full that is not; blocks past
//!    `nr_blocks` are zero;
//! 5. data space map: bitmap-index tree, bitmaps, overflow tree; every data block's count
//!    equals the number of values mapping it in distinct bottom-level leaves (§8: a leaf
//!    shared by several devices counts once; a leaf holds one reference per value, as the
//!    kernel's value type incs and decs each value, so a block mapped twice in one leaf —
//!    possible from XML — counts twice, as thin_restore writes it).
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::block_io::{BlockIo, BLOCK_SIZE};
use crate::btree::node::{max_entries_for, NodeRef, INTERNAL_VALUE_SIZE};
use crate::codec::{le32_at, le64_at, unpack_from};
use crate::space_map::format::{
    bitmap_get, bitmap_nr_used, unpack_index_block, IndexEntry, SmRoot, ENTRIES_PER_BITMAP,
    MAX_METADATA_BITMAPS, MAX_METADATA_BLOCKS,
};
use crate::thin::block_time::BlockTime;
use crate::thin::device_details::DeviceDetails;
use crate::thin::dump::{
    read_node, read_raw, read_superblock, DETAILS_VALUE_SIZE, MAPPING_VALUE_SIZE, MAX_BTREE_DEPTH,
};
use crate::thin::superblock::{
    Superblock, METADATA_BLOCK_SIZE_SECTORS, SUPERBLOCK_LOCATION, SUPERBLOCK_MAGIC,
};
use crate::thin::{MAX_DATA_BLOCK_SIZE_SECTORS, MIN_DATA_BLOCK_SIZE_SECTORS};
use crate::validator::{Validator, BITMAP_VALIDATOR, INDEX_VALIDATOR};

/// At most this many problems are recorded; later ones are only counted.
pub const MAX_PROBLEMS: usize = 1000;
const REFCOUNT_VALUE_SIZE: u32 = 4;
const INDEX_VALUE_SIZE: u32 = IndexEntry::SIZE as u32;

/// What to check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckOptions {
    /// Also require `nr_allocated` of both space maps to equal the real number of blocks in
    /// use (thin_restore 0.9.0 writes one too many, so this is off for foreign images).
    pub exact_nr_allocated: bool,
}

/// The outcome of a check.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// One line per problem found (at most [`MAX_PROBLEMS`]).
    pub problems: Vec<String>,
    /// Problems found beyond those recorded.
    pub nr_unrecorded: usize,
    /// Superblock transaction id (0 if the superblock is unreadable).
    pub transaction_id: u64,
    /// Devices in the live details tree.
    pub nr_devices: u64,
    /// Mappings over all live devices.
    pub nr_mappings: u64,
    /// Metadata blocks referenced.
    pub nr_metadata_blocks_used: u64,
    /// Data blocks referenced.
    pub nr_data_blocks_used: u64,
    /// Every metadata block something references, ascending.
    pub referenced_blocks: Vec<u64>,
}

impl CheckReport {
    /// True when no problem was found.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    fn problem(&mut self, msg: impl Into<String>) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(msg.into());
        } else {
            self.nr_unrecorded += 1;
        }
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.problems {
            writeln!(f, "{p}")?;
        }
        if self.nr_unrecorded > 0 {
            writeln!(f, "... and {} more problems", self.nr_unrecorded)?;
        }
        Ok(())
    }
}

/// Which tree a node belongs to (a block must never serve two trees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TreeKind {
    Details,
    MappingTop,
    MappingBottom,
    MetaRefcount,
    DataIndex,
    DataRefcount,
}

impl TreeKind {
    fn leaf_value_size(self) -> u32 {
        match self {
            TreeKind::Details => DETAILS_VALUE_SIZE,
            TreeKind::MappingTop | TreeKind::MappingBottom => MAPPING_VALUE_SIZE,
            TreeKind::MetaRefcount | TreeKind::DataRefcount => REFCOUNT_VALUE_SIZE,
            TreeKind::DataIndex => INDEX_VALUE_SIZE,
        }
    }
}

/// How a metadata block was used, to catch one block serving two purposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockUse {
    Superblock,
    Node(TreeKind),
    Index,
    Bitmap,
}

/// What the walk learned about a subtree, cached so shared subtrees are walked once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SubtreeInfo {
    /// Leaf entries in the subtree.
    nr_entries: u64,
    /// 0 for a leaf.
    height: usize,
    /// Smallest and largest leaf key (None for an empty subtree).
    keys: Option<(u64, u64)>,
}

/// Accumulates the children's [`SubtreeInfo`] of an internal node being walked.
#[derive(Debug)]
struct Frame {
    loc: u64,
    lo: u64,
    hi: u64,
    children: Vec<(u64, u64)>,
    next: usize,
    nr_entries: u64,
    child_height: Option<usize>,
    keys: Option<(u64, u64)>,
    complete: bool,
}

impl Frame {
    fn info(&self) -> Option<SubtreeInfo> {
        let height = self.child_height? + 1;
        self.complete.then_some(SubtreeInfo {
            nr_entries: self.nr_entries,
            height,
            keys: self.keys,
        })
    }
}

/// Called once per leaf block (the first time it is met) with the validated node.
type LeafFn<'f> = dyn FnMut(u64, &NodeRef<'_>, &mut CheckReport) + 'f;

/// Result of entering a node not walked before.
enum Entered {
    /// A leaf, or a node that could not be read (None).
    Done(Option<SubtreeInfo>),
    /// An internal node whose children are to be walked.
    Internal(Vec<(u64, u64)>),
}

struct Checker<'a> {
    io: &'a dyn BlockIo,
    report: CheckReport,
    /// Metadata blocks addressable (metadata sm `nr_blocks`, capped by the device).
    meta_limit: u64,
    /// Expected metadata reference counts.
    meta_refs: HashMap<u64, u32>,
    uses: HashMap<u64, BlockUse>,
    subtrees: HashMap<u64, Option<SubtreeInfo>>,
}

impl Checker<'_> {
    /// Counts one reference to metadata block `loc`; false if it is out of range.
    fn reference(&mut self, loc: u64, from: &str) -> bool {
        if loc >= self.meta_limit {
            self.report.problem(format!(
                "{from}: reference to metadata block {loc} beyond the metadata space map ({} \
                 blocks)",
                self.meta_limit
            ));
            return false;
        }
        *self.meta_refs.entry(loc).or_insert(0) += 1;
        true
    }

    /// Records that `loc` is used as `u`. Ok(true) the first time, Ok(false) when it was
    /// already used the same way, Err (and a problem) when it serves something else too.
    fn claim(&mut self, loc: u64, u: BlockUse) -> std::result::Result<bool, ()> {
        match self.uses.get(&loc).copied() {
            None => {
                self.uses.insert(loc, u);
                Ok(true)
            }
            Some(prev) if prev == u => Ok(false),
            Some(prev) => {
                self.report.problem(format!(
                    "metadata block {loc} used both as {prev:?} and {u:?}"
                ));
                Err(())
            }
        }
    }

    /// Reads a block that must be of the given validated type, reporting failures.
    fn read_checked(
        &mut self,
        loc: u64,
        v: &dyn Validator,
        buf: &mut [u8; BLOCK_SIZE],
    ) -> Option<()> {
        let res = read_raw(self.io, loc, buf).and_then(|()| v.check(buf, loc));
        match res {
            Ok(()) => Some(()),
            Err(e) => {
                self.report
                    .problem(format!("{} block {loc}: {e}", v.name()));
                None
            }
        }
    }

    /// Reads and checks node `loc` the first time it is met.
    fn enter(&mut self, loc: u64, kind: TreeKind, is_root: bool, leaf: &mut LeafFn<'_>) -> Entered {
        if self.claim(loc, BlockUse::Node(kind)).is_err() {
            return Entered::Done(None);
        }
        let mut buf = [0u8; BLOCK_SIZE];
        let node = match read_node(self.io, loc, &mut buf) {
            Ok(n) => n,
            Err(e) => {
                self.report.problem(format!("{kind:?} tree: {e}"));
                return Entered::Done(None);
            }
        };
        let h = node.header;
        let want_vs = if h.is_leaf() {
            kind.leaf_value_size()
        } else {
            INTERNAL_VALUE_SIZE as u32
        };
        if h.value_size != want_vs {
            self.report.problem(format!(
                "{kind:?} tree node {loc}: value size mismatch: expected {want_vs}, but got {}",
                h.value_size
            ));
            return Entered::Done(None);
        }
        let max = max_entries_for(want_vs as usize) as u32;
        if h.max_entries != max {
            self.report.problem(format!(
                "{kind:?} tree node {loc}: max_entries {} (expected {max})",
                h.max_entries
            ));
        }
        if !is_root && h.nr_entries < max / 3 {
            self.report.problem(format!(
                "{kind:?} tree node {loc}: too few entries in btree_node: {}, expected at least {}",
                h.nr_entries,
                max / 3
            ));
        }
        let n = node.nr_entries();
        let keys = match n.checked_sub(1).map(|last| (node.key(0), node.key(last))) {
            Some((Ok(first), Ok(last))) => Some((first, last)),
            _ => None,
        };
        if h.is_leaf() {
            leaf(loc, &node, &mut self.report);
            return Entered::Done(Some(SubtreeInfo {
                nr_entries: n as u64,
                height: 0,
                keys,
            }));
        }
        if n == 0 {
            self.report
                .problem(format!("{kind:?} tree node {loc}: empty internal node"));
            return Entered::Done(None);
        }
        let mut children = Vec::with_capacity(n);
        for i in 0..n {
            match (node.key(i), node.child(i)) {
                (Ok(k), Ok(c)) => children.push((k, c)),
                _ => return Entered::Done(None),
            }
        }
        Entered::Internal(children)
    }

    /// Checks a finished subtree against its parent's key range and folds it into the parent
    /// frame; returns the tree's info when `stack` is empty (the root finished).
    fn deliver(
        &mut self,
        stack: &mut [Frame],
        loc: u64,
        (lo, hi): (u64, u64),
        info: Option<SubtreeInfo>,
    ) -> Option<Option<SubtreeInfo>> {
        if let Some((min, max)) = info.and_then(|i| i.keys) {
            if min < lo || (hi != u64::MAX && max >= hi) {
                self.report.problem(format!(
                    "node {loc}: keys {min}..={max} outside the parent's range {lo}..{hi}"
                ));
            }
        }
        let Some(parent) = stack.last_mut() else {
            return Some(info);
        };
        let Some(info) = info else {
            parent.complete = false;
            return None;
        };
        parent.nr_entries += info.nr_entries;
        match parent.child_height {
            None => parent.child_height = Some(info.height),
            Some(h) if h != info.height => {
                self.report.problem(format!(
                    "node {}: children of different heights ({h} and {}): leaves at two depths",
                    parent.loc, info.height
                ));
                parent.complete = false;
            }
            Some(_) => {}
        }
        if let Some((min, max)) = info.keys {
            parent.keys = Some((parent.keys.map_or(min, |k| k.0), max));
        }
        None
    }

    /// Walks the tree at `root` (whose reference the caller has counted), calling `leaf` on
    /// each leaf the first time it is met. Returns what is known about the whole tree, or
    /// None if it could not be read completely.
    fn walk(&mut self, root: u64, kind: TreeKind, leaf: &mut LeafFn<'_>) -> Option<SubtreeInfo> {
        let mut stack: Vec<Frame> = Vec::with_capacity(MAX_BTREE_DEPTH);
        let mut pending = Some((root, 0u64, u64::MAX));
        loop {
            if let Some((loc, lo, hi)) = pending.take() {
                let done = if let Some(cached) = self.subtrees.get(&loc).copied() {
                    if self.uses.get(&loc) != Some(&BlockUse::Node(kind)) {
                        self.report
                            .problem(format!("node {loc} shared by trees of two kinds"));
                    }
                    Some(cached)
                } else if stack.iter().any(|f| f.loc == loc) {
                    self.report
                        .problem(format!("node {loc} is its own descendant (cycle)"));
                    Some(None)
                } else if stack.len() >= MAX_BTREE_DEPTH {
                    self.report
                        .problem(format!("{kind:?} tree {root} is deeper than the limit"));
                    Some(None)
                } else {
                    match self.enter(loc, kind, stack.is_empty(), leaf) {
                        Entered::Done(info) => {
                            self.subtrees.insert(loc, info);
                            Some(info)
                        }
                        Entered::Internal(children) => {
                            stack.push(Frame {
                                loc,
                                lo,
                                hi,
                                children,
                                next: 0,
                                nr_entries: 0,
                                child_height: None,
                                keys: None,
                                complete: true,
                            });
                            None
                        }
                    }
                };
                if let Some(info) = done {
                    if let Some(result) = self.deliver(&mut stack, loc, (lo, hi), info) {
                        return result;
                    }
                }
            }
            let top = stack.last_mut()?;
            if let Some(&(key, child)) = top.children.get(top.next) {
                if top.next == 0 && key < top.lo {
                    let (l, lo) = (top.loc, top.lo);
                    self.report
                        .problem(format!("node {l}: first key {key} below parent's {lo}"));
                }
                let hi = top.children.get(top.next + 1).map_or(top.hi, |c| c.0);
                top.next += 1;
                let from = format!("internal node {}", top.loc);
                if self.reference(child, &from) {
                    pending = Some((child, key, hi));
                } else if let Some(top) = stack.last_mut() {
                    top.complete = false;
                }
                continue;
            }
            let frame = stack.pop()?;
            let info = frame.info();
            self.subtrees.insert(frame.loc, info);
            if let Some(result) = self.deliver(&mut stack, frame.loc, (frame.lo, frame.hi), info) {
                return result;
            }
        }
    }
}

/// Devices found in one superblock's trees.
struct TreesSeen {
    details: BTreeMap<u64, DeviceDetails>,
    roots: BTreeMap<u64, u64>,
}

/// Collected space-map structure (after walking it).
struct SmSeen {
    root: SmRoot,
    /// Bitmap `i` → index entry (None where the index lacks it).
    entries: Vec<Option<IndexEntry>>,
    overflow: BTreeMap<u64, u32>,
}

impl Checker<'_> {
    /// Walks the details and mapping trees of superblock `sb` (live or held copy), counting
    /// references and data references, and cross-checks devices and their details.
    fn check_trees(
        &mut self,
        sb: &Superblock,
        what: &str,
        data_refs: &mut HashMap<u64, u32>,
        nr_data_blocks: u64,
    ) -> Option<TreesSeen> {
        let pool_time = sb.time;
        let mut ok = self.reference(sb.device_details_root, &format!("{what} superblock"));
        if ok {
            ok = self
                .walk(sb.device_details_root, TreeKind::Details, &mut |_, _, _| {})
                .is_some();
        }
        let mut subroots: Vec<(u64, u64)> = Vec::new();
        if self.reference(sb.data_mapping_root, &format!("{what} superblock")) {
            let mut top_leaf = |_: u64, n: &NodeRef<'_>, r: &mut CheckReport| {
                for i in 0..n.nr_entries() {
                    match (n.key(i), n.value(i).and_then(|v| le64_at(v, 0))) {
                        (Ok(k), Ok(v)) => subroots.push((k, v)),
                        _ => r.problem(format!("mapping top-level leaf: entry {i} unreadable")),
                    }
                }
            };
            ok &= self
                .walk(sb.data_mapping_root, TreeKind::MappingTop, &mut top_leaf)
                .is_some();
        } else {
            ok = false;
        }
        for (dev, subroot) in subroots {
            if !self.reference(subroot, &format!("mapping top level, device {dev}")) {
                continue;
            }
            let mut bottom_leaf = |loc: u64, n: &NodeRef<'_>, r: &mut CheckReport| {
                bottom_leaf_refs(loc, n, r, data_refs, nr_data_blocks, pool_time);
            };
            self.walk(subroot, TreeKind::MappingBottom, &mut bottom_leaf);
        }
        if !ok {
            return None;
        }
        let seen = self.enumerate_devices(sb, what)?;
        self.check_devices(&seen, pool_time, what);
        Some(seen)
    }

    /// Lists the devices of both trees (which walked cleanly) in full, shared nodes included.
    fn enumerate_devices(&mut self, sb: &Superblock, what: &str) -> Option<TreesSeen> {
        let mut details = BTreeMap::new();
        let mut roots = BTreeMap::new();
        let res = crate::thin::dump::for_each_entry(
            self.io,
            sb.device_details_root,
            DETAILS_VALUE_SIZE,
            &mut |k, v| {
                details.insert(k, unpack_from::<DeviceDetails>(v)?);
                Ok(())
            },
        )
        .and_then(|()| {
            crate::thin::dump::for_each_entry(
                self.io,
                sb.data_mapping_root,
                MAPPING_VALUE_SIZE,
                &mut |k, v| {
                    roots.insert(k, le64_at(v, 0)?);
                    Ok(())
                },
            )
        });
        match res {
            Ok(()) => Some(TreesSeen { details, roots }),
            Err(e) => {
                self.report.problem(format!("{what} device trees: {e}"));
                None
            }
        }
    }

    fn check_devices(&mut self, seen: &TreesSeen, pool_time: u32, what: &str) {
        for dev in seen.details.keys().filter(|d| !seen.roots.contains_key(d)) {
            self.report
                .problem(format!("{what}: device {dev} has details but no mappings"));
        }
        for dev in seen.roots.keys().filter(|d| !seen.details.contains_key(d)) {
            self.report
                .problem(format!("{what}: device {dev} has mappings but no details"));
        }
        for (dev, d) in &seen.details {
            let Some(root) = seen.roots.get(dev) else {
                continue;
            };
            if let Some(Some(info)) = self.subtrees.get(root) {
                if info.nr_entries != d.mapped_blocks {
                    self.report.problem(format!(
                        "{what}: device {dev}: mapped_blocks {} but {} mappings",
                        d.mapped_blocks, info.nr_entries
                    ));
                }
            }
            if d.creation_time > pool_time || d.snapshotted_time > pool_time {
                self.report.problem(format!(
                    "{what}: device {dev}: creation time {} / snapshot time {} after pool time \
                     {pool_time}",
                    d.creation_time, d.snapshotted_time
                ));
            }
            if d.snapshotted_time < d.creation_time {
                self.report.problem(format!(
                    "{what}: device {dev}: snapshot time {} before creation time {}",
                    d.snapshotted_time, d.creation_time
                ));
            }
        }
    }
}

/// Counts the data blocks of one bottom-level leaf (met once however many devices share it,
/// §8) and checks its values.
fn bottom_leaf_refs(
    loc: u64,
    n: &NodeRef<'_>,
    r: &mut CheckReport,
    data_refs: &mut HashMap<u64, u32>,
    nr_data_blocks: u64,
    pool_time: u32,
) {
    for i in 0..n.nr_entries() {
        let Ok(v) = n.value(i).and_then(|v| le64_at(v, 0)) else {
            r.problem(format!("mapping leaf {loc}: entry {i} unreadable"));
            continue;
        };
        let bt = BlockTime::from_u64(v);
        if bt.block >= nr_data_blocks {
            r.problem(format!(
                "mapping leaf {loc}: data block {} is past the data device end ({nr_data_blocks})",
                bt.block
            ));
        }
        if bt.time > pool_time {
            r.problem(format!(
                "mapping leaf {loc}: mapping time {} after pool time {pool_time}",
                bt.time
            ));
        }
        // One reference per value: a leaf holds a reference for each of its values (the
        // value type's inc/dec), so a leaf shared by many devices still counts once (§8).
        *data_refs.entry(bt.block).or_insert(0) += 1;
    }
}

impl Checker<'_> {
    /// Counts the metadata space map's own blocks and reads its index and overflow tree.
    fn walk_metadata_sm(&mut self, root: SmRoot) -> Option<SmSeen> {
        let nr_bitmaps = root.nr_blocks.div_ceil(ENTRIES_PER_BITMAP);
        if nr_bitmaps > MAX_METADATA_BITMAPS as u64 {
            self.report.problem(format!(
                "metadata space map: {} blocks need more than {MAX_METADATA_BITMAPS} bitmaps",
                root.nr_blocks
            ));
            return None;
        }
        let mut buf = [0u8; BLOCK_SIZE];
        let index_loc = root.bitmap_root;
        if !self.reference(index_loc, "metadata space map root") {
            return None;
        }
        self.claim(index_loc, BlockUse::Index).ok()?;
        self.read_checked(index_loc, &INDEX_VALIDATOR, &mut buf)?;
        let all = match unpack_index_block(&buf) {
            Ok(v) => v,
            Err(e) => {
                self.report
                    .problem(format!("metadata index block {index_loc}: {e}"));
                return None;
            }
        };
        let mut entries = Vec::new();
        for (i, e) in all.iter().enumerate() {
            if (i as u64) < nr_bitmaps {
                let ok = self.reference(e.blocknr, &format!("metadata index entry {i}"))
                    && self.claim(e.blocknr, BlockUse::Bitmap).is_ok();
                entries.push(ok.then_some(*e));
            } else if *e != IndexEntry::default() {
                self.report
                    .problem(format!("metadata index entry {i} in use past the end"));
            }
        }
        let overflow = self.walk_overflow(root.ref_count_root, TreeKind::MetaRefcount, "metadata");
        Some(SmSeen {
            root,
            entries,
            overflow,
        })
    }

    /// Counts the data space map's blocks and reads its index tree and overflow tree.
    fn walk_data_sm(&mut self, root: SmRoot) -> Option<SmSeen> {
        let nr_bitmaps = root.nr_blocks.div_ceil(ENTRIES_PER_BITMAP);
        let mut found: BTreeMap<u64, IndexEntry> = BTreeMap::new();
        if !self.reference(root.bitmap_root, "data space map root") {
            return None;
        }
        let mut leaf = |loc: u64, n: &NodeRef<'_>, r: &mut CheckReport| {
            for i in 0..n.nr_entries() {
                match (n.key(i), n.value(i).and_then(unpack_from::<IndexEntry>)) {
                    (Ok(k), Ok(e)) => {
                        found.insert(k, e);
                    }
                    _ => r.problem(format!("data index leaf {loc}: entry {i} unreadable")),
                }
            }
        };
        self.walk(root.bitmap_root, TreeKind::DataIndex, &mut leaf)?;
        if let Some((&k, _)) = found.range(nr_bitmaps..).next() {
            self.report.problem(format!(
                "data space map: index entry {k} past the last bitmap ({nr_bitmaps} bitmaps)"
            ));
        }
        let mut entries = Vec::new();
        for i in 0..nr_bitmaps {
            let Some(e) = found.get(&i).copied() else {
                self.report
                    .problem(format!("data space map: no index entry for bitmap {i}"));
                entries.push(None);
                continue;
            };
            let ok = self.reference(e.blocknr, &format!("data index entry {i}"))
                && self.claim(e.blocknr, BlockUse::Bitmap).is_ok();
            entries.push(ok.then_some(e));
        }
        let overflow = self.walk_overflow(root.ref_count_root, TreeKind::DataRefcount, "data");
        Some(SmSeen {
            root,
            entries,
            overflow,
        })
    }

    fn walk_overflow(&mut self, root: u64, kind: TreeKind, what: &str) -> BTreeMap<u64, u32> {
        let mut overflow = BTreeMap::new();
        if !self.reference(root, &format!("{what} space map root")) {
            return overflow;
        }
        let mut leaf = |loc: u64, n: &NodeRef<'_>, r: &mut CheckReport| {
            for i in 0..n.nr_entries() {
                match (n.key(i), n.value(i).and_then(|v| le32_at(v, 0))) {
                    (Ok(k), Ok(c)) => {
                        overflow.insert(k, c);
                    }
                    _ => r.problem(format!("{what} ref-count leaf {loc}: entry {i} unreadable")),
                }
            }
        };
        self.walk(root, kind, &mut leaf);
        overflow
    }

    /// Compares a space map's counts with `expected`, bitmap by bitmap.
    fn compare_counts(
        &mut self,
        what: &str,
        sm: &SmSeen,
        expected: &dyn Fn(u64) -> u32,
        exact_allocated: bool,
    ) {
        let nr_blocks = sm.root.nr_blocks;
        let mut nr_used = 0u64;
        let mut buf = [0u8; BLOCK_SIZE];
        for (i, entry) in sm.entries.iter().enumerate() {
            let Some(entry) = entry else { continue };
            if self
                .read_checked(entry.blocknr, &BITMAP_VALIDATOR, &mut buf)
                .is_none()
            {
                continue;
            }
            let base = i as u64 * ENTRIES_PER_BITMAP;
            let valid = (nr_blocks - base).min(ENTRIES_PER_BITMAP);
            for e in 0..ENTRIES_PER_BITMAP {
                let b = base + e;
                let Ok(bits) = bitmap_get(&buf, e) else { break };
                if e >= valid {
                    if bits != 0 {
                        self.report.problem(format!(
                            "{what} bitmap {i}: block {b} past the end is in use"
                        ));
                        break;
                    }
                    continue;
                }
                let on_disk = match (bits, sm.overflow.get(&b)) {
                    (3, Some(&c)) if c >= 3 => c,
                    (3, c) => {
                        self.report.problem(format!(
                            "{what} block {b}: bitmap says 3+ but the ref-count tree has {c:?}"
                        ));
                        continue;
                    }
                    (bits, None) => bits,
                    (bits, Some(c)) => {
                        self.report.problem(format!(
                            "{what} block {b}: bitmap count {bits} but ref-count tree entry {c}"
                        ));
                        bits
                    }
                };
                let want = expected(b);
                if on_disk != want {
                    self.report.problem(format!(
                        "{what} reference counts differ for block {b}, expected {want}, but got \
                         {on_disk}"
                    ));
                }
            }
            let used = bitmap_nr_used(&buf, valid).unwrap_or(0);
            nr_used += used;
            let free = valid - used.min(valid);
            if entry.nr_free == 0 && free > 0 {
                self.report
                    .problem(format!("{what} index entry {i}: nr_free 0 but {free} free"));
            }
        }
        if let Some((&k, _)) = sm.overflow.range(nr_blocks..).next() {
            self.report
                .problem(format!("{what} ref-count tree has block {k} past the end"));
        }
        let complete = sm.entries.iter().all(Option::is_some);
        let alloc = sm.root.nr_allocated;
        if complete && (alloc < nr_used || (exact_allocated && alloc != nr_used)) {
            self.report.problem(format!(
                "{what} space map: nr_allocated {alloc} but {nr_used} blocks in use"
            ));
        }
    }
}

/// Checks the metadata on `io`. Never panics and never fails: everything wrong is a line in
/// the report.
pub fn check(io: &dyn BlockIo, opts: &CheckOptions) -> CheckReport {
    let mut ck = Checker {
        io,
        report: CheckReport::default(),
        meta_limit: 0,
        meta_refs: HashMap::new(),
        uses: HashMap::new(),
        subtrees: HashMap::new(),
    };
    let Some(sb) = check_superblock(&mut ck) else {
        return ck.report;
    };
    let mut data_refs: HashMap<u64, u32> = HashMap::new();
    let nr_data_blocks = sb.data_sm_root.nr_blocks;
    ck.reference(SUPERBLOCK_LOCATION, "superblock");
    let _ = ck.claim(SUPERBLOCK_LOCATION, BlockUse::Superblock);
    if let Some(seen) = ck.check_trees(&sb, "live", &mut data_refs, nr_data_blocks) {
        ck.report.nr_devices = seen.details.len() as u64;
        ck.report.nr_mappings = seen
            .roots
            .values()
            .filter_map(|r| ck.subtrees.get(r).copied().flatten())
            .map(|i| i.nr_entries)
            .sum();
    }
    if sb.held_root != 0 {
        check_held_root(&mut ck, sb.held_root, &mut data_refs, nr_data_blocks);
    }
    let meta = ck.walk_metadata_sm(sb.metadata_sm_root);
    let data = ck.walk_data_sm(sb.data_sm_root);
    if let Some(data) = data {
        ck.compare_counts(
            "data",
            &data,
            &|b| data_refs.get(&b).copied().unwrap_or(0),
            opts.exact_nr_allocated,
        );
    }
    if let Some(meta) = meta {
        let refs = std::mem::take(&mut ck.meta_refs);
        ck.compare_counts(
            "metadata",
            &meta,
            &|b| refs.get(&b).copied().unwrap_or(0),
            opts.exact_nr_allocated,
        );
        ck.meta_refs = refs;
    }
    ck.report.nr_metadata_blocks_used = ck.meta_refs.len() as u64;
    ck.report.referenced_blocks = ck.meta_refs.keys().copied().collect();
    ck.report.referenced_blocks.sort_unstable();
    ck.report.nr_data_blocks_used = data_refs.len() as u64;
    ck.report
}

fn check_superblock(ck: &mut Checker<'_>) -> Option<Superblock> {
    if ck.io.nr_blocks() == 0 {
        ck.report
            .problem("metadata device is smaller than one 4 KiB block");
        return None;
    }
    let sb = match read_superblock(ck.io, SUPERBLOCK_LOCATION) {
        Ok(sb) => sb,
        Err(e) => {
            ck.report.problem(format!("superblock is corrupt: {e}"));
            return None;
        }
    };
    ck.report.transaction_id = sb.trans_id;
    debug_assert_eq!(sb.magic, SUPERBLOCK_MAGIC);
    if sb.incompat_flags != 0 || sb.compat_ro_flags != 0 {
        ck.report.problem(format!(
            "superblock: unsupported feature flags incompat {:#x} compat_ro {:#x}",
            sb.incompat_flags, sb.compat_ro_flags
        ));
    }
    if sb.metadata_block_size != METADATA_BLOCK_SIZE_SECTORS {
        ck.report.problem(format!(
            "superblock: metadata block size {}",
            sb.metadata_block_size
        ));
    }
    let dbs = sb.data_block_size;
    if !(MIN_DATA_BLOCK_SIZE_SECTORS..=MAX_DATA_BLOCK_SIZE_SECTORS).contains(&dbs)
        || !dbs.is_multiple_of(MIN_DATA_BLOCK_SIZE_SECTORS)
    {
        ck.report
            .problem(format!("superblock: invalid data block size {dbs} sectors"));
    }
    let nr = sb.metadata_sm_root.nr_blocks;
    if nr > ck.io.nr_blocks() || nr > MAX_METADATA_BLOCKS {
        ck.report.problem(format!(
            "metadata space map has {nr} blocks but the device has {} (max {MAX_METADATA_BLOCKS})",
            ck.io.nr_blocks()
        ));
    }
    ck.meta_limit = nr.min(ck.io.nr_blocks()).min(MAX_METADATA_BLOCKS);
    Some(sb)
}

fn check_held_root(ck: &mut Checker<'_>, held: u64, data_refs: &mut HashMap<u64, u32>, nr: u64) {
    if !ck.reference(held, "superblock held_root") {
        return;
    }
    if ck.claim(held, BlockUse::Superblock).is_err() {
        return;
    }
    match read_superblock(ck.io, held) {
        Ok(copy) => {
            if copy.held_root != 0 {
                ck.report
                    .problem(format!("held root {held} itself names a held root"));
            }
            ck.check_trees(&copy, "held root", data_refs, nr);
        }
        Err(e) => ck
            .report
            .problem(format!("held root superblock {held}: {e}")),
    }
}
