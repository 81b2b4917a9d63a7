//! B-tree node format (spec §6.1–6.3) and its validation.
//!
//! | off | size | field |
//! |---|---|---|
//! | 0 | 4 | csum (salt 121107) |
//! | 4 | 4 | flags: INTERNAL=1, LEAF=2 (exactly one) |
//! | 8 | 8 | blocknr |
//! | 16 | 4 | nr_entries |
//! | 20 | 4 | max_entries = 3*floor(floor(4064/(8+vs))/3) |
//! | 24 | 4 | value_size (8 for internal nodes) |
//! | 28 | 4 | padding |
//! | 32 | 8*max | keys |
//! | 32+8*max | vs*max | values |
//!
//! The value array offset depends on `max_entries`, not `nr_entries`.
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use crate::block_io::BLOCK_SIZE;
use crate::codec::{le32_at, Reader, Writer};
use crate::error::{err, ErrorKind, Result};
use crate::validator::Validator;

/// Internal node flag.
pub const INTERNAL_NODE: u32 = 1;
/// Leaf node flag.
pub const LEAF_NODE: u32 = 2;
/// Size of the node header.
pub const NODE_HEADER_SIZE: usize = 32;
/// Value size of internal nodes (child block numbers).
pub const INTERNAL_VALUE_SIZE: usize = 8;
const _: () = assert!(NODE_HEADER_SIZE == 4 + 4 + 8 + 4 + 4 + 4 + 4);

/// `max_entries` for a node with values of `value_size` bytes (multiple of 3).
pub const fn max_entries_for(value_size: usize) -> usize {
    3 * (((BLOCK_SIZE - NODE_HEADER_SIZE) / (8 + value_size)) / 3)
}
const _: () = assert!(max_entries_for(4) == 336);
const _: () = assert!(max_entries_for(8) == 252);
const _: () = assert!(max_entries_for(16) == 168);
const _: () = assert!(max_entries_for(24) == 126);

/// Decoded node header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeHeader {
    /// INTERNAL_NODE or LEAF_NODE.
    pub flags: u32,
    /// Recorded location.
    pub blocknr: u64,
    /// Used entries.
    pub nr_entries: u32,
    /// Capacity.
    pub max_entries: u32,
    /// Bytes per value.
    pub value_size: u32,
}

impl NodeHeader {
    /// Decode and validate a header (flags, max_entries rules, nr_entries ≤ max).
    pub fn unpack(buf: &[u8]) -> Result<NodeHeader> {
        let mut r = Reader::new(buf);
        r.skip(4)?;
        let flags = r.u32()?;
        let blocknr = r.u64()?;
        let nr_entries = r.u32()?;
        let max_entries = r.u32()?;
        let value_size = r.u32()?;
        let h = NodeHeader {
            flags,
            blocknr,
            nr_entries,
            max_entries,
            value_size,
        };
        h.validate()?;
        Ok(h)
    }

    fn validate(&self) -> Result<()> {
        let b = self.blocknr;
        match self.flags {
            INTERNAL_NODE | LEAF_NODE => {}
            3 => {
                return err(
                    ErrorKind::Corrupt,
                    format!("node {b}: both internal and leaf"),
                )
            }
            f => {
                return err(
                    ErrorKind::Corrupt,
                    format!("node {b}: unknown node type {f}"),
                )
            }
        }
        let (max, vs) = (self.max_entries as usize, self.value_size as usize);
        if vs == 0 || NODE_HEADER_SIZE + (8 + vs).saturating_mul(max) > BLOCK_SIZE {
            return err(
                ErrorKind::Corrupt,
                format!("node {b}: max_entries {max} too large"),
            );
        }
        if !max.is_multiple_of(3) || max == 0 {
            return err(
                ErrorKind::Corrupt,
                format!("node {b}: max entries {max} not /3"),
            );
        }
        if self.nr_entries > self.max_entries {
            return err(
                ErrorKind::Corrupt,
                format!("node {b}: nr_entries {} > max {max}", self.nr_entries),
            );
        }
        if self.flags == INTERNAL_NODE && vs != INTERNAL_VALUE_SIZE {
            return err(
                ErrorKind::Corrupt,
                format!("node {b}: internal value size {vs}"),
            );
        }
        Ok(())
    }

    /// True for leaves.
    pub fn is_leaf(&self) -> bool {
        self.flags == LEAF_NODE
    }

    /// Pack at the start of `buf` (checksum left to the validator).
    pub fn pack(&self, buf: &mut [u8]) -> Result<()> {
        let mut w = Writer::new(buf);
        w.u32(0)?;
        w.u32(self.flags)?;
        w.u64(self.blocknr)?;
        w.u32(self.nr_entries)?;
        w.u32(self.max_entries)?;
        w.u32(self.value_size)?;
        w.u32(0)
    }
}

/// Borrowed, validated view of a node block: keys and values are read in place.
#[derive(Debug, Clone, Copy)]
pub struct NodeRef<'a> {
    /// `8 * nr_entries` key bytes.
    keys: &'a [u8],
    /// `value_size * nr_entries` value bytes.
    values: &'a [u8],
    /// The header.
    pub header: NodeHeader,
}

impl<'a> NodeRef<'a> {
    /// View over `buf` (header validated; keys were validated by the block validator).
    pub fn new(buf: &'a [u8; BLOCK_SIZE]) -> Result<NodeRef<'a>> {
        let header = NodeHeader::unpack(buf)?;
        let (nr, max) = (header.nr_entries as usize, header.max_entries as usize);
        let vs = header.value_size as usize;
        let voff = NODE_HEADER_SIZE + 8 * max;
        let keys = buf.get(NODE_HEADER_SIZE..NODE_HEADER_SIZE + 8 * nr);
        let values = buf.get(voff..voff + vs * nr);
        match (keys, values) {
            (Some(keys), Some(values)) => Ok(NodeRef {
                keys,
                values,
                header,
            }),
            _ => err(
                ErrorKind::Corrupt,
                format!("node {}: entries beyond block", header.blocknr),
            ),
        }
    }

    /// Number of entries.
    pub fn nr_entries(&self) -> usize {
        self.header.nr_entries as usize
    }

    /// Key `i` (Err if out of range).
    pub fn key(&self, i: usize) -> Result<u64> {
        let range = i.checked_mul(8).map(|o| o..o.saturating_add(8));
        let bytes = range.and_then(|r| self.keys.get(r));
        match bytes.and_then(|k| <[u8; 8]>::try_from(k).ok()) {
            Some(k) => Ok(u64::from_le_bytes(k)),
            None => err(ErrorKind::Corrupt, format!("key index {i} out of range")),
        }
    }

    /// Value bytes of entry `i`.
    pub fn value(&self, i: usize) -> Result<&'a [u8]> {
        let vs = self.header.value_size as usize;
        let range = vs.checked_mul(i).map(|o| o..o.saturating_add(vs));
        match range.and_then(|r| self.values.get(r)) {
            Some(v) => Ok(v),
            None => err(ErrorKind::Corrupt, format!("value index {i} out of range")),
        }
    }

    /// Child block of internal entry `i`.
    pub fn child(&self, i: usize) -> Result<u64> {
        match <[u8; 8]>::try_from(self.value(i)?) {
            Ok(b) => Ok(u64::from_le_bytes(b)),
            Err(_) => err(ErrorKind::Corrupt, "child pointer is not 8 bytes"),
        }
    }

    /// Largest `i` with `key(i) <= k`, or None if `k < key(0)` (or empty).
    pub fn lower_bound(&self, k: u64) -> Result<Option<usize>> {
        let (mut lo, mut hi) = (0usize, self.nr_entries());
        // Invariant: keys[..lo] <= k, keys[hi..] > k.
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.key(mid)? <= k {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo.checked_sub(1))
    }

    /// Copy into an owned [`Node`].
    pub fn to_node(&self) -> Result<Node> {
        let keys = self
            .keys
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                u64::from_le_bytes(a)
            })
            .collect();
        let vs = self.header.value_size as usize;
        let (leaf, values) = (self.header.is_leaf(), self.values.to_vec());
        Ok(Node {
            leaf,
            value_size: vs,
            keys,
            values,
        })
    }
}

/// Owned, decoded node used by mutations. Values are stored as `value_size`-byte chunks.
/// Its methods index in-memory vectors whose shape is an invariant (programmer errors panic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Leaf or internal.
    pub leaf: bool,
    /// Bytes per value.
    pub value_size: usize,
    /// Keys, strictly increasing.
    pub keys: Vec<u64>,
    /// `keys.len() * value_size` value bytes.
    pub values: Vec<u8>,
}

#[allow(clippy::indexing_slicing)]
impl Node {
    /// An empty node.
    pub fn new(leaf: bool, value_size: usize) -> Node {
        Node {
            leaf,
            value_size,
            keys: Vec::new(),
            values: Vec::new(),
        }
    }

    /// Entries in use.
    pub fn nr_entries(&self) -> usize {
        self.keys.len()
    }

    /// Capacity for this node's value size.
    pub fn max_entries(&self) -> usize {
        max_entries_for(self.value_size)
    }

    /// Value bytes of entry `i` (panics if out of range: callers index validated nodes).
    pub fn value(&self, i: usize) -> &[u8] {
        &self.values[i * self.value_size..(i + 1) * self.value_size]
    }

    /// Child block of internal entry `i`.
    pub fn child(&self, i: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.value(i));
        u64::from_le_bytes(a)
    }

    /// Set the child of internal entry `i`.
    pub fn set_child(&mut self, i: usize, b: u64) {
        self.value_mut(i).copy_from_slice(&b.to_le_bytes());
    }

    /// Mutable value bytes of entry `i`.
    pub fn value_mut(&mut self, i: usize) -> &mut [u8] {
        let vs = self.value_size;
        &mut self.values[i * vs..(i + 1) * vs]
    }

    /// Insert `(k, v)` at index `i`.
    pub fn insert_at(&mut self, i: usize, k: u64, v: &[u8]) {
        assert_eq!(v.len(), self.value_size);
        assert!(self.keys.len() < self.max_entries());
        self.keys.insert(i, k);
        let off = i * self.value_size;
        self.values.splice(off..off, v.iter().copied());
    }

    /// Remove entry `i`.
    pub fn remove_at(&mut self, i: usize) {
        self.keys.remove(i);
        let off = i * self.value_size;
        self.values.drain(off..off + self.value_size);
    }

    /// Split off entries `[at..)` into a new node.
    pub fn split_off(&mut self, at: usize) -> Node {
        let keys = self.keys.split_off(at);
        let values = self.values.split_off(at * self.value_size);
        Node {
            leaf: self.leaf,
            value_size: self.value_size,
            keys,
            values,
        }
    }

    /// Append all entries of `other`.
    pub fn append(&mut self, other: &mut Node) {
        assert_eq!(self.value_size, other.value_size);
        self.keys.append(&mut other.keys);
        self.values.append(&mut other.values);
    }

    /// Largest `i` with `keys[i] <= k`.
    pub fn lower_bound(&self, k: u64) -> Option<usize> {
        self.keys.partition_point(|&x| x <= k).checked_sub(1)
    }

    /// Pack into a whole block (checksum and blocknr are stamped at write-out; `loc` is
    /// recorded now too so in-cache blocks are self-consistent).
    pub fn pack(&self, buf: &mut [u8; BLOCK_SIZE], loc: u64) -> Result<()> {
        let max = self.max_entries();
        if self.keys.len() > max || self.values.len() != self.keys.len() * self.value_size {
            return err(
                ErrorKind::Corrupt,
                format!("node {loc}: cannot pack {} entries", self.keys.len()),
            );
        }
        let h = NodeHeader {
            flags: if self.leaf { LEAF_NODE } else { INTERNAL_NODE },
            blocknr: loc,
            nr_entries: self.keys.len() as u32,
            max_entries: max as u32,
            value_size: self.value_size as u32,
        };
        h.pack(buf)?;
        let (nr, vs) = (self.keys.len(), self.value_size);
        let (keys, rest) = buf[NODE_HEADER_SIZE..].split_at_mut(8 * max);
        for (dst, k) in keys.chunks_exact_mut(8).zip(&self.keys) {
            dst.copy_from_slice(&k.to_le_bytes());
        }
        keys[8 * nr..].fill(0);
        rest[..vs * nr].copy_from_slice(&self.values);
        rest[vs * nr..].fill(0);
        Ok(())
    }

    /// Unpack from a block (header and key order validated).
    pub fn unpack(buf: &[u8; BLOCK_SIZE]) -> Result<Node> {
        let r = NodeRef::new(buf)?;
        check_keys(&r)?;
        r.to_node()
    }
}

fn check_keys(r: &NodeRef<'_>) -> Result<()> {
    let mut prev: Option<u64> = None;
    for i in 0..r.nr_entries() {
        let k = r.key(i)?;
        if prev.is_some_and(|p| p >= k) {
            return err(
                ErrorKind::Corrupt,
                format!("node {}: keys out of order at index {i}", r.header.blocknr),
            );
        }
        prev = Some(k);
    }
    Ok(())
}

/// B-tree node validator (salt 121107): checksum, blocknr, header rules and key order.
#[derive(Debug)]
pub struct BTreeValidator;

/// The B-tree node validator instance.
pub static BTREE_VALIDATOR: BTreeValidator = BTreeValidator;

impl Validator for BTreeValidator {
    fn name(&self) -> &'static str {
        "btree node"
    }
    fn salt(&self) -> u32 {
        crate::checksum::BTREE_CSUM_XOR
    }
    fn check_structure(&self, buf: &[u8; BLOCK_SIZE], _loc: u64) -> Result<()> {
        let r = NodeRef::new(buf)?;
        check_keys(&r)
    }
}

/// Read the flags word without validation (for classification).
pub fn raw_flags(buf: &[u8]) -> Result<u32> {
    le32_at(buf, 4)
}
