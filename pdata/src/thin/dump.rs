//! Read-only walk of dm-thin metadata into thin_dump XML (or an in-memory [`PoolXml`]).
//!
//! Everything is read straight from a [`BlockIo`] through the format codecs and validators
//! (checksum, block number, node header, key order), never through the block manager, so the
//! dumper works on images nobody has opened and on a live pool's held root. Trees are walked
//! in key order with an explicit stack bounded by [`MAX_BTREE_DEPTH`]; a node met twice in
//! one tree, leaves at different depths, keys out of order across nodes, or a device present
//! in only one of the details and mapping trees are errors, never loops or panics.
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Write};

use crate::block_io::{BlockIo, BLOCK_SIZE};
use crate::btree::node::{NodeRef, BTREE_VALIDATOR, INTERNAL_VALUE_SIZE};
use crate::codec::{le64_at, unpack_from};
use crate::error::{err, Error, ErrorKind, Result};
use crate::thin::block_time::BlockTime;
use crate::thin::device_details::DeviceDetails;
use crate::thin::superblock::{Superblock, SUPERBLOCK_LOCATION, SUPERBLOCK_VALIDATOR};
use crate::thin::xml::{write_run, DeviceXml, MappingRun, PoolXml};
use crate::validator::Validator;

/// Deepest B-tree the walkers accept. A tree of 252-way internal nodes this deep could index
/// far more than 2^64 keys, so anything deeper is corrupt (or a pointer cycle).
pub const MAX_BTREE_DEPTH: usize = 16;
/// Value size of device-details leaves.
pub const DETAILS_VALUE_SIZE: u32 = 24;
/// Value size of mapping-tree leaves (both levels).
pub const MAPPING_VALUE_SIZE: u32 = 8;

/// Which superblock to dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DumpRoot {
    /// The live superblock (block 0).
    Live,
    /// The held metadata snapshot named by the live superblock (`thin_dump -m`).
    HeldRoot,
    /// A superblock copy at this block (`thin_dump -m BLOCK`).
    Block(u64),
}

/// Reads block `loc` into `buf`, mapping device errors to [`ErrorKind::Io`].
pub(crate) fn read_raw(io: &dyn BlockIo, loc: u64, buf: &mut [u8; BLOCK_SIZE]) -> Result<()> {
    if loc >= io.nr_blocks() {
        return err(
            ErrorKind::Corrupt,
            format!(
                "reference to block {loc} beyond the metadata device ({})",
                io.nr_blocks()
            ),
        );
    }
    io.read_block(loc, buf)
        .map_err(|e| Error::io(format!("reading metadata block {loc}"), e))
}

/// Reads and validates the superblock (or a held-root copy) at `loc`.
pub fn read_superblock(io: &dyn BlockIo, loc: u64) -> Result<Superblock> {
    let mut buf = [0u8; BLOCK_SIZE];
    read_raw(io, loc, &mut buf)?;
    SUPERBLOCK_VALIDATOR.check(&buf, loc)?;
    Superblock::unpack_block(&buf)
}

/// Reads and validates B-tree node `loc` (checksum, block number, header, key order).
pub(crate) fn read_node<'a>(
    io: &dyn BlockIo,
    loc: u64,
    buf: &'a mut [u8; BLOCK_SIZE],
) -> Result<NodeRef<'a>> {
    read_raw(io, loc, buf)?;
    BTREE_VALIDATOR.check(buf, loc)?;
    NodeRef::new(buf)
}

/// Checks a node's value size against what its place in the tree requires.
pub(crate) fn check_value_size(node: &NodeRef<'_>, loc: u64, leaf_vs: u32) -> Result<()> {
    let want = if node.header.is_leaf() {
        leaf_vs
    } else {
        INTERNAL_VALUE_SIZE as u32
    };
    if node.header.value_size != want {
        return err(
            ErrorKind::Corrupt,
            format!(
                "node {loc}: value size mismatch: expected {want}, but got {}",
                node.header.value_size
            ),
        );
    }
    Ok(())
}

/// Calls `f(key, value)` for every leaf entry of the single-level tree at `root`, in key order.
pub(crate) fn for_each_entry(
    io: &dyn BlockIo,
    root: u64,
    leaf_vs: u32,
    f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    // Stack of internal nodes being iterated: (children (key, block), next index, depth).
    let mut stack: Vec<(Vec<(u64, u64)>, usize)> = Vec::with_capacity(MAX_BTREE_DEPTH);
    let mut seen: HashSet<u64> = HashSet::new();
    let mut buf = [0u8; BLOCK_SIZE];
    let mut next = Some(root);
    let mut leaf_depth: Option<usize> = None;
    let mut last_key: Option<u64> = None;
    loop {
        if let Some(loc) = next.take() {
            if !seen.insert(loc) {
                return err(
                    ErrorKind::Corrupt,
                    format!("node {loc} appears twice in tree {root}"),
                );
            }
            let depth = stack.len();
            let node = read_node(io, loc, &mut buf)?;
            check_value_size(&node, loc, leaf_vs)?;
            if node.header.is_leaf() {
                if leaf_depth.is_some_and(|d| d != depth) {
                    return err(
                        ErrorKind::Corrupt,
                        format!("tree {root}: leaves at two depths"),
                    );
                }
                leaf_depth = Some(depth);
                for i in 0..node.nr_entries() {
                    let k = node.key(i)?;
                    if last_key.is_some_and(|l| l >= k) {
                        return err(
                            ErrorKind::Corrupt,
                            format!("tree {root}: key {k} in node {loc} out of order"),
                        );
                    }
                    last_key = Some(k);
                    f(k, node.value(i)?)?;
                }
            } else {
                if depth + 1 >= MAX_BTREE_DEPTH {
                    return err(
                        ErrorKind::Limit,
                        format!("tree {root} deeper than the limit"),
                    );
                }
                if node.nr_entries() == 0 {
                    return err(ErrorKind::Corrupt, format!("internal node {loc} is empty"));
                }
                let mut children = Vec::with_capacity(node.nr_entries());
                for i in 0..node.nr_entries() {
                    children.push((node.key(i)?, node.child(i)?));
                }
                if last_key.is_some_and(|l| children.first().is_some_and(|c| c.0 <= l)) {
                    return err(
                        ErrorKind::Corrupt,
                        format!("node {loc}: keys overlap a sibling"),
                    );
                }
                stack.push((children, 0));
            }
        }
        // Pick the next child of the deepest unfinished internal node.
        let Some((children, idx)) = stack.last_mut() else {
            return Ok(());
        };
        match children.get(*idx) {
            Some(&(_, child)) => {
                *idx += 1;
                next = Some(child);
            }
            None => {
                stack.pop();
            }
        }
    }
}

/// Receives the parts of a dump in order.
pub(crate) trait DumpSink {
    fn begin(&mut self, pool: &PoolXml) -> Result<()>;
    fn device(&mut self, dev: &DeviceXml) -> Result<()>;
    fn run(&mut self, run: &MappingRun) -> Result<()>;
    fn end_device(&mut self) -> Result<()>;
    fn end(&mut self) -> Result<()>;
}

/// Resolves which superblock a dump starts from.
pub(crate) fn dump_superblock(io: &dyn BlockIo, root: DumpRoot) -> Result<Superblock> {
    let live = read_superblock(io, SUPERBLOCK_LOCATION)?;
    let loc = match root {
        DumpRoot::Live => return Ok(live),
        DumpRoot::HeldRoot if live.held_root == 0 => {
            return err(ErrorKind::NotFound, "no current metadata snap");
        }
        DumpRoot::HeldRoot => live.held_root,
        DumpRoot::Block(b) => b,
    };
    read_superblock(io, loc)
}

fn walk_dump(io: &dyn BlockIo, root: DumpRoot, sink: &mut dyn DumpSink) -> Result<()> {
    let sb = dump_superblock(io, root)?;
    let mut details: BTreeMap<u64, DeviceDetails> = BTreeMap::new();
    for_each_entry(
        io,
        sb.device_details_root,
        DETAILS_VALUE_SIZE,
        &mut |k, v| {
            details.insert(k, unpack_from(v)?);
            Ok(())
        },
    )
    .map_err(|e| e.with_context("device details tree"))?;
    let mut roots: BTreeMap<u64, u64> = BTreeMap::new();
    for_each_entry(io, sb.data_mapping_root, MAPPING_VALUE_SIZE, &mut |k, v| {
        roots.insert(k, le64_at(v, 0)?);
        Ok(())
    })
    .map_err(|e| e.with_context("mapping tree top level"))?;
    if let Some(d) = details.keys().find(|d| !roots.contains_key(d)) {
        return err(
            ErrorKind::Corrupt,
            format!("device {d} has details but no mapping tree"),
        );
    }
    if let Some(d) = roots.keys().find(|d| !details.contains_key(d)) {
        return err(
            ErrorKind::Corrupt,
            format!("device {d} has a mapping tree but no details"),
        );
    }
    let pool = PoolXml {
        uuid: String::new(),
        time: sb.time,
        transaction: sb.trans_id,
        flags: sb.flags,
        version: sb.version,
        data_block_size: sb.data_block_size,
        nr_data_blocks: sb.data_sm_root.nr_blocks,
        devices: Vec::new(),
    };
    sink.begin(&pool)?;
    for (dev_id, d) in &details {
        let dev = DeviceXml {
            dev_id: *dev_id,
            mapped_blocks: d.mapped_blocks,
            transaction: d.transaction_id,
            creation_time: d.creation_time,
            snap_time: d.snapshotted_time,
            mappings: Vec::new(),
        };
        sink.device(&dev)?;
        let root = roots.get(dev_id).copied().unwrap_or_default();
        dump_mappings(io, root, sink)
            .map_err(|e| e.with_context(format!("mapping tree of device {dev_id}")))?;
        sink.end_device()?;
    }
    sink.end()
}

/// Streams one device's mappings to `sink` as maximal runs (thin_dump's rule).
fn dump_mappings(io: &dyn BlockIo, root: u64, sink: &mut dyn DumpSink) -> Result<()> {
    let mut cur: Option<MappingRun> = None;
    for_each_entry(io, root, MAPPING_VALUE_SIZE, &mut |vblock, v| {
        let bt = BlockTime::from_u64(le64_at(v, 0)?);
        let single = MappingRun::single(vblock, bt.block, bt.time);
        match cur.as_mut() {
            Some(run)
                if run.time == bt.time
                    && run.origin_begin.checked_add(run.length) == Some(vblock)
                    && run.data_begin.checked_add(run.length) == Some(bt.block) =>
            {
                run.length += 1;
            }
            Some(run) => {
                sink.run(run)?;
                cur = Some(single);
            }
            None => cur = Some(single),
        }
        Ok(())
    })?;
    match cur {
        Some(run) => sink.run(&run),
        None => Ok(()),
    }
}

struct XmlSink<W: Write> {
    out: W,
    line: String,
}

impl<W: Write> XmlSink<W> {
    fn flush_line(&mut self) -> Result<()> {
        self.out
            .write_all(self.line.as_bytes())
            .map_err(|e| Error::io("writing the dump", e))?;
        self.line.clear();
        Ok(())
    }
}

impl<W: Write> DumpSink for XmlSink<W> {
    fn begin(&mut self, pool: &PoolXml) -> Result<()> {
        let text = pool.to_xml();
        // The header is everything up to the closing tag of an empty pool.
        self.line
            .push_str(text.strip_suffix("</superblock>\n").unwrap_or(&text));
        self.flush_line()
    }

    fn device(&mut self, dev: &DeviceXml) -> Result<()> {
        let text = PoolXml {
            devices: vec![dev.clone()],
            ..PoolXml::default()
        }
        .to_xml();
        // Keep only the device's opening line.
        if let Some(line) = text.lines().nth(1) {
            self.line.push_str(line);
            self.line.push('\n');
        }
        self.flush_line()
    }

    fn run(&mut self, run: &MappingRun) -> Result<()> {
        // Writing into a String cannot fail.
        let _ = write_run(&mut self.line, run);
        if self.line.len() > 1 << 16 {
            self.flush_line()?;
        }
        Ok(())
    }

    fn end_device(&mut self) -> Result<()> {
        self.line.push_str("  </device>\n");
        self.flush_line()
    }

    fn end(&mut self) -> Result<()> {
        self.line.push_str("</superblock>\n");
        self.flush_line()?;
        self.out
            .flush()
            .map_err(|e| Error::io("writing the dump", e))
    }
}

struct PoolSink {
    pool: PoolXml,
}

impl DumpSink for PoolSink {
    fn begin(&mut self, pool: &PoolXml) -> Result<()> {
        self.pool = pool.clone();
        Ok(())
    }
    fn device(&mut self, dev: &DeviceXml) -> Result<()> {
        self.pool.devices.push(dev.clone());
        Ok(())
    }
    fn run(&mut self, run: &MappingRun) -> Result<()> {
        if let Some(dev) = self.pool.devices.last_mut() {
            dev.mappings.push(*run);
        }
        Ok(())
    }
    fn end_device(&mut self) -> Result<()> {
        Ok(())
    }
    fn end(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Writes the thin_dump XML of the metadata on `io` to `out`, streaming (memory does not grow
/// with the number of mappings). Errors name the block and tree that could not be read.
pub fn dump(io: &dyn BlockIo, root: DumpRoot, out: impl Write) -> Result<()> {
    let mut sink = XmlSink {
        out: io::BufWriter::new(out),
        line: String::new(),
    };
    walk_dump(io, root, &mut sink)
}

/// Reads the whole metadata on `io` into a [`PoolXml`] (for tests and small pools).
pub fn read_pool(io: &dyn BlockIo, root: DumpRoot) -> Result<PoolXml> {
    let mut sink = PoolSink {
        pool: PoolXml::default(),
    };
    walk_dump(io, root, &mut sink)?;
    Ok(sink.pool)
}

/// The dump as a string (for tests and small pools).
pub fn dump_to_string(io: &dyn BlockIo, root: DumpRoot) -> Result<String> {
    let mut out = Vec::new();
    dump(io, root, &mut out)?;
    String::from_utf8(out).map_err(|_| Error::new(ErrorKind::Corrupt, "dump is not UTF-8"))
}
