//! Removal with top-down rebalancing (spec §6.4): before descending into child `i`, it is
//! rebalanced with its siblings so that it holds more than `max/3` entries; the deletion
//! below can then never leave a non-root node under-full.

use super::node::{Node, INTERNAL_VALUE_SIZE};
use super::walk::next_entry;
use super::{read_node, shadow_node, write_node, NoRefs, ValueRefs, MAX_DEPTH};
use crate::error::{err, ErrorKind, Result};
use crate::transaction_manager::TransactionManager;

/// Child `i` of `parent`, shadowed (pointer updated in `parent`), and its decoded node.
fn shadow_child(
    tm: &mut TransactionManager,
    parent: &mut Node,
    i: usize,
    vs: usize,
    refs: &mut dyn ValueRefs,
) -> Result<(u64, Node)> {
    let c = shadow_node(tm, parent.child(i), vs, refs)?;
    parent.set_child(i, c);
    let node = read_node(tm, c, vs)?;
    Ok((c, node))
}

/// Move entries so that `l` ends with `target_l` of the combined entries.
fn redistribute2(l: &mut Node, r: &mut Node, target_l: usize) {
    if l.nr_entries() > target_l {
        let mut moved = l.split_off(target_l);
        moved.append(r);
        *r = moved;
    } else {
        let take = target_l - l.nr_entries();
        let mut rest = r.split_off(take);
        l.append(r);
        std::mem::swap(r, &mut rest);
    }
}

fn rebalance2(
    tm: &mut TransactionManager,
    parent: &mut Node,
    li: usize,
    vs: usize,
    refs: &mut dyn ValueRefs,
) -> Result<()> {
    let (l, mut ln) = shadow_child(tm, parent, li, vs, refs)?;
    let (r, mut rn) = shadow_child(tm, parent, li + 1, vs, refs)?;
    if ln.leaf != rn.leaf {
        return err(
            ErrorKind::Corrupt,
            format!("siblings {l} and {r} at different levels"),
        );
    }
    let max = ln.max_entries();
    let total = ln.nr_entries() + rn.nr_entries();
    if total < 2 * (max / 3 + 1) {
        ln.append(&mut rn);
        write_node(tm, l, &ln)?;
        parent.remove_at(li + 1);
        tm.dec(r)?;
    } else {
        redistribute2(&mut ln, &mut rn, total / 2);
        write_node(tm, l, &ln)?;
        write_node(tm, r, &rn)?;
        parent.keys[li + 1] = rn.keys[0];
    }
    Ok(())
}

fn rebalance3(
    tm: &mut TransactionManager,
    parent: &mut Node,
    li: usize,
    vs: usize,
    refs: &mut dyn ValueRefs,
) -> Result<()> {
    let (l, mut ln) = shadow_child(tm, parent, li, vs, refs)?;
    let (c, mut cn) = shadow_child(tm, parent, li + 1, vs, refs)?;
    let (r, mut rn) = shadow_child(tm, parent, li + 2, vs, refs)?;
    if ln.leaf != cn.leaf || cn.leaf != rn.leaf {
        return err(
            ErrorKind::Corrupt,
            format!("siblings {l}, {c}, {r} at different levels"),
        );
    }
    let max = ln.max_entries();
    let total = ln.nr_entries() + cn.nr_entries() + rn.nr_entries();
    if total < 4 * (max / 3) + 1 {
        // Delete the centre node: spill everything into left and right.
        ln.append(&mut cn);
        redistribute2(&mut ln, &mut rn, total / 2);
        write_node(tm, l, &ln)?;
        write_node(tm, r, &rn)?;
        parent.remove_at(li + 1);
        parent.keys[li + 1] = rn.keys[0];
        tm.dec(c)?;
    } else {
        // Sizes differ by at most one, so none exceeds ceil(total/3) <= max.
        let nr_left = total / 3;
        let nr_centre = (total - nr_left) / 2;
        ln.append(&mut cn);
        ln.append(&mut rn);
        let mut rest = ln.split_off(nr_left);
        let mut right = rest.split_off(nr_centre);
        assert!(right.nr_entries() <= max && right.nr_entries() >= nr_centre);
        std::mem::swap(&mut cn, &mut rest);
        std::mem::swap(&mut rn, &mut right);
        write_node(tm, l, &ln)?;
        write_node(tm, c, &cn)?;
        write_node(tm, r, &rn)?;
        parent.keys[li + 1] = cn.keys[0];
        parent.keys[li + 2] = rn.keys[0];
    }
    Ok(())
}

fn rebalance_child(
    tm: &mut TransactionManager,
    parent: &mut Node,
    i: usize,
    vs: usize,
    refs: &mut dyn ValueRefs,
) -> Result<()> {
    let n = parent.nr_entries();
    assert!(n >= 2);
    if i == 0 {
        rebalance2(tm, parent, 0, vs, refs)
    } else if i == n - 1 {
        rebalance2(tm, parent, i - 1, vs, refs)
    } else {
        rebalance3(tm, parent, i - 1, vs, refs)
    }
}

/// The leaf reached by a rebalancing descent towards `key`: its location, decoded node and
/// whether it is the root (exempt from the occupancy rule).
struct RemoveLeaf {
    root: u64,
    loc: u64,
    node: Node,
    is_root: bool,
}

/// Shadow and rebalance the spine towards `key` (spec §6.4). Returns None if `key` is below
/// every key of an internal node on the way (it cannot be in the tree).
fn descend_for_remove(
    tm: &mut TransactionManager,
    root: u64,
    key: u64,
    vs: usize,
    refs: &mut dyn ValueRefs,
) -> Result<(u64, Option<RemoveLeaf>)> {
    let root = shadow_node(tm, root, vs, refs)?;
    let mut loc = root;
    let mut node = read_node(tm, root, vs)?;
    for _ in 0..2 * MAX_DEPTH {
        if node.leaf {
            let is_root = loc == root;
            return Ok((
                root,
                Some(RemoveLeaf {
                    root,
                    loc,
                    node,
                    is_root,
                }),
            ));
        }
        assert_eq!(node.value_size, INTERNAL_VALUE_SIZE);
        if node.nr_entries() == 1 {
            // Only a root can have a single child: pull the child up (height shrinks).
            if loc != root {
                return err(
                    ErrorKind::Corrupt,
                    format!("non-root node {loc} has one entry"),
                );
            }
            let (c, cnode) = shadow_child(tm, &mut node, 0, vs, refs)?;
            write_node(tm, loc, &cnode)?;
            tm.dec(c)?;
            node = cnode;
            continue;
        }
        let Some(i) = node.lower_bound(key) else {
            return Ok((root, None));
        };
        rebalance_child(tm, &mut node, i, vs, refs)?;
        let Some(i) = node.lower_bound(key) else {
            write_node(tm, loc, &node)?;
            return Ok((root, None));
        };
        let (c, cnode) = shadow_child(tm, &mut node, i, vs, refs)?;
        write_node(tm, loc, &node)?;
        loc = c;
        node = cnode;
    }
    err(
        ErrorKind::Limit,
        format!("tree at {root} deeper than {MAX_DEPTH}"),
    )
}

/// Remove `key` (its value dec'd through `refs`). Returns (new root, whether it was present).
pub fn remove(
    tm: &mut TransactionManager,
    root: u64,
    key: u64,
    vs: usize,
    refs: &mut dyn ValueRefs,
) -> Result<(u64, bool)> {
    let (root, leaf) = descend_for_remove(tm, root, key, vs, refs)?;
    let Some(RemoveLeaf {
        root,
        loc,
        mut node,
        ..
    }) = leaf
    else {
        return Ok((root, false));
    };
    let Ok(i) = node.keys.binary_search(&key) else {
        return Ok((root, false));
    };
    let old = node.value(i).to_vec();
    refs.dec(tm, &old)?;
    node.remove_at(i);
    write_node(tm, loc, &node)?;
    Ok((root, true))
}

/// Remove every key in `[begin, end)` (values dec'd through `refs`); returns (new root,
/// number removed). Each descent empties as much of one leaf as the occupancy rule allows.
pub fn remove_range(
    tm: &mut TransactionManager,
    root: u64,
    begin: u64,
    end: u64,
    vs: usize,
    refs: &mut dyn ValueRefs,
) -> Result<(u64, u64)> {
    let mut root = root;
    let mut removed = 0u64;
    let mut from = begin;
    while from < end {
        let Some((k, _)) = next_entry(&mut tm.bm, root, from, vs, false)? else {
            break;
        };
        if k >= end {
            break;
        }
        let (r, leaf) = descend_for_remove(tm, root, k, vs, refs)?;
        root = r;
        let Some(RemoveLeaf {
            loc,
            mut node,
            is_root,
            ..
        }) = leaf
        else {
            return err(
                ErrorKind::Corrupt,
                format!("key {k} unreachable in tree {root}"),
            );
        };
        let start = node.keys.partition_point(|x| *x < k);
        let stop = node.keys.partition_point(|x| *x < end);
        let keep_min = if is_root { 0 } else { node.max_entries() / 3 };
        let room = node.nr_entries().saturating_sub(keep_min);
        let stop = stop.min(start + room);
        if stop <= start {
            return err(
                ErrorKind::Corrupt,
                format!("leaf {loc}: nothing removable at {k}"),
            );
        }
        for i in start..stop {
            let v = node.value(i).to_vec();
            refs.dec(tm, &v)?;
        }
        let mut tail = node.split_off(stop);
        node.keys.truncate(start);
        node.values.truncate(start * node.value_size);
        node.append(&mut tail);
        assert!(is_root || node.nr_entries() >= node.max_entries() / 3);
        write_node(tm, loc, &node)?;
        removed += (stop - start) as u64;
        from = k;
    }
    Ok((root, removed))
}

/// Remove from a plain tree (no reference semantics); returns the new root.
pub fn remove_plain(tm: &mut TransactionManager, root: u64, key: u64, vs: usize) -> Result<u64> {
    remove(tm, root, key, vs, &mut NoRefs).map(|(r, _)| r)
}
