//! B-tree tests against a `BTreeMap` model, with a structural checker (key order, parent
//! bounds, equal leaf depth, occupancy ≥ max/3 for non-roots) and exact reference counts
//! recomputed from reachability (spec §8): metadata counts against the metadata space map,
//! value counts against the refs the tree took through `ValueRefs`.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::node::{NodeRef, BTREE_VALIDATOR};
use super::*;
use crate::block_io::MemBlockIo;
use crate::space_map::format::unpack_index_block;
use crate::space_map::ll::{nr_bitmaps, REF_COUNT_VALUE_SIZE};
use crate::space_map::metadata::MetadataSm;
use crate::thin::tests::TestRng;
use crate::validator::INDEX_VALIDATOR;

pub(crate) fn new_tm(nr_blocks: u64, cache: usize) -> TransactionManager {
    let io = MemBlockIo::new(nr_blocks);
    let bm = BlockManager::new(Box::new(io), cache);
    let mut tm = TransactionManager::new(bm, MetadataSm::bootstrap());
    let range = tm.sm.ll.extend_nr_blocks(nr_blocks).unwrap();
    tm.sm.ll.set_count(&mut tm.bm, 0, 1).unwrap();
    tm.create_metadata_bitmaps(range, nr_bitmaps(nr_blocks))
        .unwrap();
    let rc = new_empty(&mut tm, REF_COUNT_VALUE_SIZE).unwrap();
    tm.sm.ll.ref_count_root = rc;
    commit(&mut tm);
    tm
}

pub(crate) fn commit(tm: &mut TransactionManager) {
    tm.pre_commit().unwrap();
    tm.bm.flush().unwrap();
    tm.finish_commit();
}

/// Value refs that count references per u64 value, to check value inc/dec exactly.
#[derive(Default)]
struct CountingRefs(HashMap<u64, i64>);

impl ValueRefs for CountingRefs {
    fn inc(&mut self, _tm: &mut TransactionManager, v: &[u8]) -> Result<()> {
        *self.0.entry(value_u64(v)?).or_default() += 1;
        Ok(())
    }
    fn dec(&mut self, _tm: &mut TransactionManager, v: &[u8]) -> Result<()> {
        let c = self.0.entry(value_u64(v)?).or_default();
        *c -= 1;
        assert!(*c >= 0, "value dec below zero");
        Ok(())
    }
}

#[derive(Default)]
struct Reach {
    meta: HashMap<u64, u32>,
    values: HashMap<u64, i64>,
    walked: HashSet<u64>,
}

impl Reach {
    /// Walk the tree at `root` (its root reference counted by the caller); returns entries.
    fn walk(&mut self, tm: &mut TransactionManager, root: u64, vs: usize) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut stack = vec![(root, 0usize, 0u64, true)];
        let mut leaf_depth = None;
        while let Some((b, depth, lower, is_root)) = stack.pop() {
            let r = tm.bm.read_lock(b, &BTREE_VALIDATOR).unwrap();
            let n = NodeRef::new(&r).unwrap();
            let nr = n.nr_entries();
            let max = n.header.max_entries as usize;
            assert!(is_root || nr >= max / 3, "node {b}: {nr} entries < {max}/3");
            let first = self.walked.insert(b);
            for i in 0..nr {
                let k = n.key(i).unwrap();
                assert!(k >= lower);
                assert!(i == 0 || k > n.key(i - 1).unwrap());
            }
            if n.header.is_leaf() {
                assert_eq!(*leaf_depth.get_or_insert(depth), depth);
                assert_eq!(n.header.value_size as usize, vs);
                for i in 0..nr {
                    let v = n.value(i).unwrap();
                    let v = if vs == 8 {
                        value_u64(v).unwrap()
                    } else {
                        v[0] as u64
                    };
                    if first {
                        *self.values.entry(v).or_default() += 1;
                    }
                    out.push((n.key(i).unwrap(), v));
                }
            } else {
                assert!(nr >= 2 || is_root);
                for i in (0..nr).rev() {
                    let c = n.child(i).unwrap();
                    if first {
                        *self.meta.entry(c).or_default() += 1;
                    }
                    stack.push((c, depth + 1, n.key(i).unwrap(), false));
                }
            }
        }
        for w in out.windows(2) {
            assert!(w[0].0 < w[1].0, "keys not ascending across leaves");
        }
        out
    }

    /// Add the metadata space map's own blocks and block 0.
    fn space_map(&mut self, tm: &mut TransactionManager) {
        *self.meta.entry(0).or_default() += 1;
        let idx = tm.sm.index_block.unwrap();
        *self.meta.entry(idx).or_default() += 1;
        let r = tm.bm.read_lock(idx, &INDEX_VALIDATOR).unwrap();
        let index = unpack_index_block(&r).unwrap();
        drop(r);
        for e in index.iter().take(nr_bitmaps(tm.sm.ll.nr_blocks)) {
            *self.meta.entry(e.blocknr).or_default() += 1;
        }
        let rc = tm.sm.ll.ref_count_root;
        *self.meta.entry(rc).or_default() += 1;
        self.walk(tm, rc, 4);
    }

    fn compare_meta(&self, tm: &mut TransactionManager) {
        let mut allocated = 0;
        for b in 0..tm.sm.ll.nr_blocks {
            let want = self.meta.get(&b).copied().unwrap_or(0);
            assert_eq!(tm.ref_count(b).unwrap(), want, "metadata block {b}");
            allocated += u64::from(want > 0);
        }
        assert_eq!(tm.sm.ll.nr_allocated, allocated);
    }
}

/// Commit, then check structure, model equality and exact counts for trees at `roots`.
fn check_trees(
    tm: &mut TransactionManager,
    roots: &[(u64, &BTreeMap<u64, u64>)],
    refs: &CountingRefs,
) {
    commit(tm);
    let mut reach = Reach::default();
    for (root, model) in roots {
        *reach.meta.entry(*root).or_default() += 1;
        let got = reach.walk(tm, *root, 8);
        let want: Vec<(u64, u64)> = model.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(got, want);
    }
    reach.space_map(tm);
    reach.compare_meta(tm);
    for (v, c) in &refs.0 {
        assert_eq!(
            reach.values.get(v).copied().unwrap_or(0),
            *c,
            "value {v} references"
        );
    }
    for (v, c) in &reach.values {
        assert_eq!(
            refs.0.get(v).copied().unwrap_or(0),
            *c,
            "value {v} references"
        );
    }
}

fn ins(tm: &mut TransactionManager, root: u64, k: u64, v: u64, refs: &mut CountingRefs) -> u64 {
    // The caller takes the value reference, as the kernel's callers do, except when the key
    // already holds an equal value (the tree then keeps the old reference and decs nothing).
    if lookup_u64(&mut tm.bm, root, k).unwrap() != Some(v) {
        *refs.0.entry(v).or_default() += 1;
    }
    insert(tm, root, k, &v.to_le_bytes(), refs).unwrap().0
}

#[test]
fn sequential_up_then_down_keeps_occupancy() {
    let mut tm = new_tm(4096, 128);
    let mut refs = CountingRefs::default();
    let mut root = new_empty(&mut tm, 8).unwrap();
    let mut model = BTreeMap::new();
    for k in 0..20_000u64 {
        root = ins(&mut tm, root, k, k + 1, &mut refs);
        model.insert(k, k + 1);
        if k % 5000 == 4999 {
            check_trees(&mut tm, &[(root, &model)], &refs);
        }
    }
    for k in (0..20_000u64).rev() {
        let (r, present) = remove(&mut tm, root, k, 8, &mut refs).unwrap();
        assert!(present);
        root = r;
        model.remove(&k);
        if k % 3000 == 0 {
            check_trees(&mut tm, &[(root, &model)], &refs);
        }
    }
    check_trees(&mut tm, &[(root, &model)], &refs);
}

#[test]
fn random_ops_with_shared_clone_match_model() {
    let mut rng = TestRng::new(7);
    let mut tm = new_tm(8192, 256);
    let mut refs = CountingRefs::default();
    let mut root = new_empty(&mut tm, 8).unwrap();
    let mut model = BTreeMap::new();
    let mut clone: Option<(u64, BTreeMap<u64, u64>)> = None;
    for step in 0..40_000u64 {
        let k = rng.below(15_000);
        match rng.below(10) {
            0..=5 => {
                let v = rng.below(1000);
                root = ins(&mut tm, root, k, v, &mut refs);
                model.insert(k, v);
            }
            6 if step % 7 == 0 => {
                let end = k + rng.below(3000);
                let (r, n) = remove_range(&mut tm, root, k, end, 8, &mut refs).unwrap();
                root = r;
                let keys: Vec<u64> = model.range(k..end).map(|e| *e.0).collect();
                assert_eq!(n, keys.len() as u64);
                for key in keys {
                    model.remove(&key);
                }
            }
            6..=8 => {
                let (r, present) = remove(&mut tm, root, k, 8, &mut refs).unwrap();
                root = r;
                assert_eq!(present, model.remove(&k).is_some());
            }
            _ => {
                let got = lookup_u64(&mut tm.bm, root, k).unwrap();
                assert_eq!(got, model.get(&k).copied());
                let next = next_entry(&mut tm.bm, root, k, 8, false)
                    .unwrap()
                    .map(|e| e.0);
                assert_eq!(next, model.range(k..).next().map(|e| *e.0));
            }
        }
        if step % 10_000 == 9_999 {
            let mut roots = vec![(root, &model)];
            if let Some((r, m)) = &clone {
                roots.push((*r, m));
            }
            check_trees(&mut tm, &roots, &refs);
            // Snapshot-style clone of the whole tree: the clone shares every node.
            if let Some((r, _)) = clone.take() {
                delete_tree(&mut tm, r, 8, &mut refs).unwrap();
            }
            tm.inc(root).unwrap();
            clone = Some((root, model.clone()));
        }
    }
    let (r, m) = clone.unwrap();
    check_trees(&mut tm, &[(root, &model), (r, &m)], &refs);
    delete_tree(&mut tm, r, 8, &mut refs).unwrap();
    check_trees(&mut tm, &[(root, &model)], &refs);
    delete_tree(&mut tm, root, 8, &mut refs).unwrap();
    check_trees(&mut tm, &[], &refs);
    assert!(refs.0.values().all(|c| *c == 0));
}

#[test]
fn every_value_size_splits_and_merges() {
    for vs in [4usize, 16, 24] {
        let mut tm = new_tm(2048, 64);
        let mut root = new_empty(&mut tm, vs).unwrap();
        let n = 3000u64;
        for k in 0..n {
            let v = vec![(k % 251) as u8; vs];
            root = insert(&mut tm, root, k * 7 % n, &v, &mut NoRefs).unwrap().0;
        }
        commit(&mut tm);
        let mut reach = Reach::default();
        *reach.meta.entry(root).or_default() += 1;
        assert_eq!(reach.walk(&mut tm, root, vs).len() as u64, n);
        reach.space_map(&mut tm);
        reach.compare_meta(&mut tm);
        for k in 0..n - 10 {
            root = remove(&mut tm, root, (k * 13) % n, vs, &mut NoRefs)
                .unwrap()
                .0;
        }
        commit(&mut tm);
        let mut reach = Reach::default();
        *reach.meta.entry(root).or_default() += 1;
        assert_eq!(reach.walk(&mut tm, root, vs).len(), 10);
        reach.space_map(&mut tm);
        reach.compare_meta(&mut tm);
    }
}

#[test]
fn value_size_mismatch_is_an_error_not_a_panic() {
    let mut tm = new_tm(256, 64);
    let root = new_empty(&mut tm, 8).unwrap();
    let e = insert(&mut tm, root, 1, &[0u8; 16], &mut NoRefs).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert_eq!(
        lookup_u32(&mut tm.bm, root, 1).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
}

#[test]
fn nonblocking_lookup_reports_would_block() {
    let mut tm = new_tm(2048, 64);
    let mut root = new_empty(&mut tm, 8).unwrap();
    for k in 0..2000u64 {
        root = insert(&mut tm, root, k, &k.to_le_bytes(), &mut NoRefs)
            .unwrap()
            .0;
    }
    commit(&mut tm);
    tm.bm.invalidate_all();
    let e = lookup_with(&mut tm.bm, root, 5, 8, true, value_u64).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldBlock);
    assert_eq!(lookup_u64(&mut tm.bm, root, 5).unwrap(), Some(5));
    assert_eq!(
        lookup_with(&mut tm.bm, root, 5, 8, true, value_u64).unwrap(),
        Some(5)
    );
}

#[test]
fn remove_range_keeps_occupancy_and_counts() {
    let mut tm = new_tm(4096, 128);
    let mut refs = CountingRefs::default();
    let mut root = new_empty(&mut tm, 8).unwrap();
    let mut model = BTreeMap::new();
    for k in 0..30_000u64 {
        root = ins(&mut tm, root, k * 2, k % 500, &mut refs);
        model.insert(k * 2, k % 500);
    }
    check_trees(&mut tm, &[(root, &model)], &refs);
    tm.inc(root).unwrap();
    let (clone, clone_model) = (root, model.clone());
    for (b, e) in [
        (1000u64, 1001u64),
        (5, 20_000),
        (40_000, 40_001),
        (59_000, u64::MAX),
        (0, 7),
    ] {
        let (r, n) = remove_range(&mut tm, root, b, e, 8, &mut refs).unwrap();
        root = r;
        let keys: Vec<u64> = model.range(b..e).map(|x| *x.0).collect();
        assert_eq!(n, keys.len() as u64, "range {b}..{e}");
        for k in keys {
            model.remove(&k);
        }
        check_trees(&mut tm, &[(root, &model), (clone, &clone_model)], &refs);
    }
    let (r, n) = remove_range(&mut tm, root, 0, u64::MAX, 8, &mut refs).unwrap();
    assert_eq!(n, model.len() as u64);
    model.clear();
    check_trees(&mut tm, &[(r, &model), (clone, &clone_model)], &refs);
}

#[test]
fn a_node_reached_twice_is_corruption_not_a_loop() {
    let mut tm = new_tm(1024, 64);
    let mut root = new_empty(&mut tm, 8).unwrap();
    for k in 0..1000u64 {
        root = insert(&mut tm, root, k, &k.to_le_bytes(), &mut NoRefs)
            .unwrap()
            .0;
    }
    commit(&mut tm);
    let mut node = read_node(&mut tm, root, 8).unwrap();
    assert!(!node.leaf && node.nr_entries() >= 2);
    let first = node.child(0);
    node.set_child(1, first);
    tm.bm
        .write(root, &BTREE_VALIDATOR, |buf| node.pack(buf, root))
        .unwrap()
        .unwrap();
    let e = for_each_entry(&mut tm.bm, root, 8, &mut |_, _| Ok(())).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
}
