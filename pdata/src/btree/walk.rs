//! Ordered walks: the next entry at or after a key, and a visit of every entry.

use super::node::NodeRef;
use super::{read_ref, MAX_DEPTH};
use crate::block_manager::BlockManager;
use crate::error::{err, ErrorKind, Result};

/// The smallest key `>= key` and its value bytes, or None. `nonblocking`: `WouldBlock` on a
/// cache miss instead of I/O.
pub fn next_entry(
    bm: &mut BlockManager,
    root: u64,
    key: u64,
    vs: usize,
    nonblocking: bool,
) -> Result<Option<(u64, Vec<u8>)>> {
    // Path of (node, index of the child taken); bounded by MAX_DEPTH.
    let mut path: Vec<(u64, usize)> = Vec::with_capacity(MAX_DEPTH);
    let mut loc = root;
    let mut leftmost = false;
    loop {
        if path.len() >= MAX_DEPTH {
            return err(
                ErrorKind::Limit,
                format!("tree at {root} deeper than {MAX_DEPTH}"),
            );
        }
        let r = read_ref(bm, loc, nonblocking)?;
        let n = NodeRef::new(&r)?;
        if n.header.is_leaf() {
            if n.header.value_size as usize != vs {
                return err(
                    ErrorKind::Corrupt,
                    format!("node {loc}: value size mismatch"),
                );
            }
            let start = if leftmost {
                0
            } else {
                match n.lower_bound(key)? {
                    Some(i) if n.key(i)? == key => i,
                    Some(i) => i + 1,
                    None => 0,
                }
            };
            if start < n.nr_entries() {
                return Ok(Some((n.key(start)?, n.value(start)?.to_vec())));
            }
        } else if n.nr_entries() > 0 {
            let i = if leftmost {
                0
            } else {
                n.lower_bound(key)?.unwrap_or(0)
            };
            path.push((loc, i));
            loc = n.child(i)?;
            continue;
        }
        // Exhausted this subtree: go to the next sibling of the deepest ancestor that has one.
        loop {
            let Some((ploc, i)) = path.pop() else {
                return Ok(None);
            };
            let r = read_ref(bm, ploc, nonblocking)?;
            let n = NodeRef::new(&r)?;
            if i + 1 < n.nr_entries() {
                path.push((ploc, i + 1));
                loc = n.child(i + 1)?;
                leftmost = true;
                break;
            }
        }
    }
}

/// Visit every entry in key order (explicit stack, depth-bounded). A node reached twice
/// within one tree (a cycle or DAG in corrupt metadata) is an error, so the walk is linear.
pub fn for_each_entry(
    bm: &mut BlockManager,
    root: u64,
    vs: usize,
    f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let mut stack: Vec<(u64, usize)> = vec![(root, 0)];
    let mut seen = std::collections::HashSet::new();
    while let Some((loc, depth)) = stack.pop() {
        if !seen.insert(loc) {
            return err(
                ErrorKind::Corrupt,
                format!("node {loc} reached twice in tree {root}"),
            );
        }
        if depth >= MAX_DEPTH {
            return err(
                ErrorKind::Limit,
                format!("tree at {root} deeper than {MAX_DEPTH}"),
            );
        }
        let r = bm.read_lock(loc, &super::node::BTREE_VALIDATOR)?;
        let n = NodeRef::new(&r)?;
        if n.header.is_leaf() {
            if n.header.value_size as usize != vs {
                return err(
                    ErrorKind::Corrupt,
                    format!("node {loc}: value size mismatch"),
                );
            }
            for i in 0..n.nr_entries() {
                f(n.key(i)?, n.value(i)?)?;
            }
        } else {
            for i in (0..n.nr_entries()).rev() {
                stack.push((n.child(i)?, depth + 1));
            }
        }
    }
    Ok(())
}
