//! Copy-on-write B+tree in the dm-btree on-disk format (spec §6, §7, §9).
//!
//! * Read-only operations take the [`BlockManager`] (and can run non-blocking: a cache miss is
//!   `WouldBlock`); mutations take the [`TransactionManager`] and return the new root, which
//!   the caller must store.
//! * Every mutation shadows the root-to-leaf spine (spec §9.1). Shadowing a shared node
//!   (count > 1) incs every child reference of the copy: child blocks of internal nodes, and
//!   the values of leaves through the tree's [`ValueRefs`].
//! * Insert splits full nodes top-down before descending (a full root is split beneath
//!   itself); remove rebalances top-down before descending (rebalance2 with the newer
//!   threshold `2*(max/3 + 1)`, rebalance3 with `4*(max/3) + 1`, spec §6.4), so every non-root
//!   node keeps at least `max/3` entries.
//! * No recursion: descents walk an explicit path bounded by [`MAX_DEPTH`].

pub mod node;
mod remove;
mod walk;

#[cfg(test)]
pub(crate) mod tests;

pub use remove::{remove, remove_plain, remove_range};
pub use walk::{for_each_entry, next_entry};

use crate::block_manager::{BlockManager, ReadRef};
use crate::error::{err, ErrorKind, Result};
use crate::transaction_manager::TransactionManager;
use node::{max_entries_for, Node, NodeRef, BTREE_VALIDATOR, INTERNAL_VALUE_SIZE};

/// Deepest tree accepted (a 252-way tree of depth 12 exceeds any 40-bit key space).
pub const MAX_DEPTH: usize = 12;

/// Reference-count effects of a tree's leaf values (spec §7): what happens when a leaf holding
/// a value gains (`inc`) or loses (`dec`) a referencing copy, and when two values are the same.
pub trait ValueRefs {
    /// The value gained a referencing leaf.
    fn inc(&mut self, tm: &mut TransactionManager, value: &[u8]) -> Result<()>;
    /// The value lost a referencing leaf.
    fn dec(&mut self, tm: &mut TransactionManager, value: &[u8]) -> Result<()>;
    /// Whether overwriting `a` by `b` keeps the same reference (no dec).
    fn equal(&self, a: &[u8], b: &[u8]) -> bool {
        a == b
    }
}

/// Plain values without reference semantics (details, ref counts, bitmap index).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoRefs;

impl ValueRefs for NoRefs {
    fn inc(&mut self, _tm: &mut TransactionManager, _v: &[u8]) -> Result<()> {
        Ok(())
    }
    fn dec(&mut self, _tm: &mut TransactionManager, _v: &[u8]) -> Result<()> {
        Ok(())
    }
}

/// Values that are metadata block numbers (u64): inc/dec their metadata counts.
#[derive(Debug, Default, Clone, Copy)]
pub struct BlockRefs;

/// Decode a u64 value.
pub fn value_u64(v: &[u8]) -> Result<u64> {
    crate::codec::le64_at(v, 0)
}

impl ValueRefs for BlockRefs {
    fn inc(&mut self, tm: &mut TransactionManager, v: &[u8]) -> Result<()> {
        tm.inc(value_u64(v)?)
    }
    fn dec(&mut self, tm: &mut TransactionManager, v: &[u8]) -> Result<()> {
        tm.dec(value_u64(v)?)
    }
}

/// Read a node: blocking (may do I/O) or not (`WouldBlock` on a cache miss).
pub(crate) fn read_ref(bm: &mut BlockManager, loc: u64, nonblocking: bool) -> Result<ReadRef> {
    if nonblocking {
        bm.try_read_lock(loc, &BTREE_VALIDATOR)
    } else {
        bm.read_lock(loc, &BTREE_VALIDATOR)
    }
}

fn check_leaf_vs(r: &NodeRef<'_>, loc: u64, vs: usize) -> Result<()> {
    if r.header.is_leaf() && r.header.value_size as usize != vs {
        return err(
            ErrorKind::Corrupt,
            format!(
                "node {loc}: value size mismatch: expected {vs}, got {}",
                r.header.value_size
            ),
        );
    }
    Ok(())
}

/// Read and decode a node for mutation, checking the leaf value size.
pub(crate) fn read_node(tm: &mut TransactionManager, loc: u64, vs: usize) -> Result<Node> {
    let r = tm.bm.read_lock(loc, &BTREE_VALIDATOR)?;
    let nr = NodeRef::new(&r)?;
    check_leaf_vs(&nr, loc, vs)?;
    if !nr.header.is_leaf() && nr.nr_entries() == 0 {
        return err(
            ErrorKind::Corrupt,
            format!("node {loc}: internal node without entries"),
        );
    }
    nr.to_node()
}

/// Pack `node` into block `loc` (which must be a shadow of this transaction).
pub(crate) fn write_node(tm: &mut TransactionManager, loc: u64, node: &Node) -> Result<()> {
    debug_assert!(tm.is_shadow(loc), "writing node {loc} that is not a shadow");
    assert!(node.nr_entries() <= node.max_entries());
    tm.bm
        .write(loc, &BTREE_VALIDATOR, |buf| node.pack(buf, loc))?
}

/// Allocate a new node block holding `node`.
pub(crate) fn new_node(tm: &mut TransactionManager, node: &Node) -> Result<u64> {
    assert!(node.nr_entries() <= node.max_entries());
    tm.new_block_with(&BTREE_VALIDATOR, |buf, loc| node.pack(buf, loc))
}

/// Create an empty tree (a leaf with no entries) for values of `value_size` bytes.
pub fn new_empty(tm: &mut TransactionManager, value_size: usize) -> Result<u64> {
    assert!(value_size > 0 && max_entries_for(value_size) >= 3);
    new_node(tm, &Node::new(true, value_size))
}

/// Shadow node `loc`; if it was shared, inc every child reference of the copy.
pub(crate) fn shadow_node(
    tm: &mut TransactionManager,
    loc: u64,
    vs: usize,
    refs: &mut dyn ValueRefs,
) -> Result<u64> {
    let (new, inc_children) = tm.shadow(loc, &BTREE_VALIDATOR)?;
    if inc_children {
        let node = read_node(tm, new, vs)?;
        for i in 0..node.nr_entries() {
            if node.leaf {
                refs.inc(tm, node.value(i))?;
            } else {
                tm.inc(node.child(i))?;
            }
        }
    }
    debug_assert!(tm.is_shadow(new));
    Ok(new)
}

/// Look up `key`; `f` sees the value bytes in place.
pub fn lookup_with<R>(
    bm: &mut BlockManager,
    root: u64,
    key: u64,
    vs: usize,
    nonblocking: bool,
    f: impl FnOnce(&[u8]) -> Result<R>,
) -> Result<Option<R>> {
    let mut loc = root;
    for _ in 0..MAX_DEPTH {
        let r = read_ref(bm, loc, nonblocking)?;
        let n = NodeRef::new(&r)?;
        check_leaf_vs(&n, loc, vs)?;
        let Some(i) = n.lower_bound(key)? else {
            return Ok(None);
        };
        if n.header.is_leaf() {
            if n.key(i)? != key {
                return Ok(None);
            }
            return f(n.value(i)?).map(Some);
        }
        loc = n.child(i)?;
    }
    err(
        ErrorKind::Limit,
        format!("tree at {root} deeper than {MAX_DEPTH}"),
    )
}

/// Look up a u64 value.
pub fn lookup_u64(bm: &mut BlockManager, root: u64, key: u64) -> Result<Option<u64>> {
    lookup_with(bm, root, key, 8, false, value_u64)
}

/// Look up a u32 value (ref-count trees).
pub fn lookup_u32(bm: &mut BlockManager, root: u64, key: u64) -> Result<Option<u32>> {
    lookup_with(bm, root, key, 4, false, |v| crate::codec::le32_at(v, 0))
}

/// Split the full root `loc` beneath itself: its entries move into two new children and the
/// root becomes an internal node with two entries.
fn split_beneath(tm: &mut TransactionManager, loc: u64, node: Node) -> Result<Node> {
    let mut left = node;
    let right = left.split_off(left.nr_entries() / 2);
    let (lk, rk) = (left.keys[0], right.keys[0]);
    let l = new_node(tm, &left)?;
    let r = new_node(tm, &right)?;
    let mut root = Node::new(false, INTERNAL_VALUE_SIZE);
    root.insert_at(0, lk, &l.to_le_bytes());
    root.insert_at(1, rk, &r.to_le_bytes());
    write_node(tm, loc, &root)?;
    Ok(root)
}

/// Shadow the spine towards `key` for an insertion, splitting full nodes on the way; returns
/// the new root, the leaf's location and the decoded leaf (which has room for one more entry).
fn prepare_leaf(
    tm: &mut TransactionManager,
    root: u64,
    key: u64,
    vs: usize,
    refs: &mut dyn ValueRefs,
) -> Result<(u64, u64, Node)> {
    let root = shadow_node(tm, root, vs, refs)?;
    let mut node = read_node(tm, root, vs)?;
    if node.nr_entries() == node.max_entries() {
        node = split_beneath(tm, root, node)?;
    }
    let mut loc = root;
    for _ in 0..MAX_DEPTH {
        if node.leaf {
            return Ok((root, loc, node));
        }
        assert!(node.nr_entries() < node.max_entries());
        assert!(node.nr_entries() > 0);
        let i = match node.lower_bound(key) {
            Some(i) => i,
            None => {
                node.keys[0] = key;
                0
            }
        };
        let child = shadow_node(tm, node.child(i), vs, refs)?;
        node.set_child(i, child);
        let mut cnode = read_node(tm, child, vs)?;
        let mut next = child;
        if cnode.nr_entries() == cnode.max_entries() {
            let right = cnode.split_off(cnode.nr_entries() / 2);
            let rk = right.keys[0];
            write_node(tm, child, &cnode)?;
            let r = new_node(tm, &right)?;
            node.insert_at(i + 1, rk, &r.to_le_bytes());
            if key >= rk {
                next = r;
                cnode = right;
            }
        }
        write_node(tm, loc, &node)?;
        loc = next;
        node = cnode;
    }
    err(
        ErrorKind::Limit,
        format!("tree at {root} deeper than {MAX_DEPTH}"),
    )
}

/// What [`insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// A new key.
    New,
    /// An existing key whose old value was dec'd and replaced.
    Replaced,
    /// An existing key whose old value was `equal` to the new one: replaced without a dec, so
    /// a reference the caller took for the new value is surplus.
    ReplacedEqual,
}

/// Insert or overwrite `key → value`. Overwriting decs the old value unless `equal`; a new
/// value is not inc'd (the caller holds its reference). Returns (new root, what happened).
pub fn insert(
    tm: &mut TransactionManager,
    root: u64,
    key: u64,
    value: &[u8],
    refs: &mut dyn ValueRefs,
) -> Result<(u64, Inserted)> {
    let vs = value.len();
    let (root, loc, mut leaf) = prepare_leaf(tm, root, key, vs, refs)?;
    let what = match leaf.keys.binary_search(&key) {
        Ok(i) => {
            let old = leaf.value(i);
            let what = if refs.equal(old, value) {
                Inserted::ReplacedEqual
            } else {
                let old = old.to_vec();
                refs.dec(tm, &old)?;
                Inserted::Replaced
            };
            leaf.value_mut(i).copy_from_slice(value);
            what
        }
        Err(i) => {
            leaf.insert_at(i, key, value);
            Inserted::New
        }
    };
    write_node(tm, loc, &leaf)?;
    Ok((root, what))
}

/// Insert a plain value (no reference semantics).
pub fn insert_plain(tm: &mut TransactionManager, root: u64, key: u64, value: &[u8]) -> Result<u64> {
    insert(tm, root, key, value, &mut NoRefs).map(|(r, _)| r)
}

/// Modify the value of an existing `key` in place through `f` (no inc/dec of the value by the
/// tree): used for the top level of the mapping tree, whose value is a subtree root that `f`
/// updates. The spine is shadowed first, so a shared leaf's values are inc'd before `f` runs.
/// Returns (new root, `f`'s result), or `NotFound` if the key is absent.
pub fn update<R>(
    tm: &mut TransactionManager,
    root: u64,
    key: u64,
    vs: usize,
    refs: &mut dyn ValueRefs,
    f: impl FnOnce(&mut TransactionManager, &mut [u8]) -> Result<R>,
) -> Result<(u64, R)> {
    let (root, loc, mut leaf) = prepare_leaf(tm, root, key, vs, refs)?;
    let Ok(i) = leaf.keys.binary_search(&key) else {
        return err(ErrorKind::NotFound, format!("key {key} not in tree"));
    };
    let r = f(tm, leaf.value_mut(i))?;
    write_node(tm, loc, &leaf)?;
    Ok((root, r))
}

/// Delete a whole tree: nodes still shared elsewhere are only dec'd; exclusively owned nodes
/// are walked (explicit stack) and their leaf values dec'd through `refs` (spec §9.1).
pub fn delete_tree(
    tm: &mut TransactionManager,
    root: u64,
    vs: usize,
    refs: &mut dyn ValueRefs,
) -> Result<()> {
    let mut stack = vec![(root, 0usize)];
    while let Some((loc, depth)) = stack.pop() {
        if depth >= MAX_DEPTH {
            return err(
                ErrorKind::Limit,
                format!("tree at {root} deeper than {MAX_DEPTH}"),
            );
        }
        if tm.ref_count(loc)? > 1 {
            tm.dec(loc)?;
            continue;
        }
        let node = read_node(tm, loc, vs)?;
        for i in 0..node.nr_entries() {
            if node.leaf {
                refs.dec(tm, node.value(i))?;
            } else {
                stack.push((node.child(i), depth + 1));
            }
        }
        tm.dec(loc)?;
    }
    Ok(())
}
