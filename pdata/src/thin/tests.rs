//! PoolMetadata tests: smoke, reopen, snapshots, held root, resize, errors, and a quick
//! interop check of written images with the installed `thin_check` / `thin_dump`.

use std::collections::BTreeMap;

use super::*;
use crate::block_io::MemBlockIo;
use crate::space_map::format::ENTRIES_PER_BITMAP;

fn opts() -> CacheOpts {
    CacheOpts {
        nr_cache_blocks: 256,
    }
}

fn new_pool(nr_meta: u64, nr_data: u64) -> (MemBlockIo, PoolMetadata) {
    let io = MemBlockIo::new(nr_meta);
    let pmd = PoolMetadata::format(Box::new(io.clone()), 128, nr_data, opts()).unwrap();
    (io, pmd)
}

#[test]
fn format_then_open_empty_pool() {
    let (io, pmd) = new_pool(1024, 40_000);
    assert_eq!(pmd.data_nr_blocks(), 40_000);
    assert_eq!(pmd.data_nr_free(), 40_000);
    assert_eq!(pmd.metadata_nr_blocks(), 1024);
    let used = pmd.metadata_nr_blocks() - pmd.metadata_nr_free();
    drop(pmd);
    let mut pmd = PoolMetadata::open(Box::new(io.clone()), 128, opts()).unwrap();
    assert_eq!(pmd.devices().unwrap(), vec![]);
    assert_eq!(pmd.metadata_nr_blocks() - pmd.metadata_nr_free(), used);
    assert_eq!(pmd.data_nr_free(), 40_000);
}

#[test]
fn smoke_thins_snapshots_inserts_reopen() {
    let (io, mut pmd) = new_pool(2048, 100_000);
    for id in 0..3 {
        pmd.create_thin(DevId(id)).unwrap();
    }
    let mut model: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    for id in 0..3u64 {
        for v in 0..700u64 {
            let d = pmd.alloc_data_block().unwrap();
            pmd.insert_block(DevId(id), ThinBlock(v * 3 + id), d)
                .unwrap();
            model.insert((id, v * 3 + id), d.0);
        }
    }
    pmd.commit().unwrap();
    pmd.create_snap(DevId(10), DevId(1)).unwrap();
    pmd.create_snap(DevId(11), DevId(10)).unwrap();
    for ((id, v), d) in model.clone() {
        if id == 1 {
            model.insert((10, v), d);
            model.insert((11, v), d);
        }
    }
    assert_eq!(pmd.time(), 2);
    // Break sharing in the snapshot of the snapshot and remove some mappings of the origin.
    for v in (1..300u64).step_by(3) {
        let d = pmd.alloc_data_block().unwrap();
        pmd.insert_block(DevId(11), ThinBlock(v), d).unwrap();
        model.insert((11, v), d.0);
    }
    for v in (1..600u64).step_by(6) {
        assert!(pmd.remove_block(DevId(1), ThinBlock(v)).unwrap());
        model.remove(&(1, v));
    }
    pmd.commit().unwrap();
    let check = |pmd: &mut PoolMetadata, model: &BTreeMap<(u64, u64), u64>| {
        for (&(id, v), &d) in model {
            let l = pmd.find_block(DevId(id), ThinBlock(v)).unwrap().unwrap();
            assert_eq!(l.data_block, DataBlock(d), "dev {id} block {v}");
        }
        for id in [0u64, 1, 2, 10, 11] {
            let n = model.keys().filter(|(i, _)| *i == id).count() as u64;
            assert_eq!(
                pmd.device_details(DevId(id))
                    .unwrap()
                    .unwrap()
                    .mapped_blocks,
                n
            );
            let got: Vec<u64> = pmd
                .mappings(DevId(id), ThinBlock(0), ThinBlock(u64::MAX))
                .map(|r| r.unwrap().0 .0)
                .collect();
            let want: Vec<u64> = model
                .keys()
                .filter(|(i, _)| *i == id)
                .map(|k| k.1)
                .collect();
            assert_eq!(got, want, "dev {id}");
        }
    };
    check(&mut pmd, &model);
    let l = pmd.find_block(DevId(10), ThinBlock(4)).unwrap().unwrap();
    assert!(l.shared);
    let l = pmd.find_block(DevId(11), ThinBlock(1)).unwrap().unwrap();
    assert!(!l.shared);
    drop(pmd);
    let mut pmd = PoolMetadata::open(Box::new(io.clone()), 128, opts()).unwrap();
    check(&mut pmd, &model);
    assert_eq!(
        pmd.devices().unwrap(),
        [0, 1, 2, 10, 11].map(DevId).to_vec()
    );
    assert_eq!(pmd.time(), 2);
}

/// Run the installed `thin_check` on the image (must exit 0 with no complaints) and return
/// `thin_dump` output. A missing tool is a failure (STYLE rule 24).
pub(crate) fn thin_check_and_dump(io: &MemBlockIo) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.img");
    std::fs::write(&path, io.image()).unwrap();
    let out = std::process::Command::new("thin_check")
        .arg(&path)
        .output()
        .expect("thin_check (thin-provisioning-tools) must be installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "thin_check failed: {stderr}");
    let out = std::process::Command::new("thin_dump")
        .arg(&path)
        .output()
        .expect("thin_dump");
    assert!(out.status.success(), "thin_dump failed");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn written_images_pass_thin_check() {
    let (io, mut pmd) = new_pool(1024, 40_000);
    let dump = thin_check_and_dump(&io);
    assert!(dump.contains("nr_data_blocks=\"40000\""), "{dump}");
    pmd.create_thin(DevId(1)).unwrap();
    pmd.create_thin(DevId(2)).unwrap();
    for v in 0..2000u64 {
        let d = pmd.alloc_data_block().unwrap();
        pmd.insert_block(DevId(1), ThinBlock(v * 7 % 2003), d)
            .unwrap();
    }
    pmd.set_transaction_id(0, 5).unwrap();
    pmd.commit().unwrap();
    thin_check_and_dump(&io);
    pmd.create_snap(DevId(3), DevId(1)).unwrap();
    for v in 0..300u64 {
        let d = pmd.alloc_data_block().unwrap();
        pmd.insert_block(DevId(3), ThinBlock(v), d).unwrap();
    }
    pmd.remove_range(DevId(1), ThinBlock(500), ThinBlock(1500))
        .unwrap();
    pmd.commit().unwrap();
    let dump = thin_check_and_dump(&io);
    assert!(dump.contains("transaction=\"5\""), "{dump}");
    pmd.reserve_metadata_snap().unwrap();
    pmd.delete_thin(DevId(2)).unwrap();
    for v in 0..100u64 {
        let d = pmd.alloc_data_block().unwrap();
        pmd.insert_block(DevId(1), ThinBlock(v), d).unwrap();
    }
    pmd.commit().unwrap();
    thin_check_and_dump(&io);
    pmd.release_metadata_snap().unwrap();
    pmd.delete_thin(DevId(1)).unwrap();
    pmd.commit().unwrap();
    thin_check_and_dump(&io);
}

/// Small deterministic PRNG (xorshift64*) for the model tests; the seed is printed.
pub(crate) struct TestRng(u64);

impl TestRng {
    pub(crate) fn new(seed: u64) -> TestRng {
        TestRng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Independent checker of a committed pool (spec §6.4, §8): walks every tree from the
/// superblock (and the held root), checks node structure (key order, parent key bounds,
/// occupancy ≥ max/3 for non-roots, equal leaf depth), recomputes metadata and data reference
/// counts from reachability and compares them with both space maps, including `nr_allocated`.
pub(crate) mod checker {
    use std::collections::{BTreeMap, HashMap, HashSet};

    use super::super::*;
    use crate::btree::node::{NodeRef, BTREE_VALIDATOR};
    use crate::space_map::format::{unpack_index_block, ENTRIES_PER_BITMAP};
    use crate::space_map::ll::nr_bitmaps;
    use crate::validator::INDEX_VALIDATOR;

    #[derive(Default)]
    struct Counts {
        meta: HashMap<u64, u32>,
        data: HashMap<u64, u32>,
        /// Nodes whose outgoing references were already counted.
        walked: HashSet<u64>,
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Leaf {
        Plain(usize),
        TopLevel,
        Mapping,
    }

    impl Counts {
        fn add(&mut self, b: u64) {
            *self.meta.entry(b).or_default() += 1;
        }

        /// Walk a tree whose root reference was already counted.
        fn tree(&mut self, pmd: &mut PoolMetadata, root: u64, leaf: Leaf) -> Vec<(u64, Vec<u8>)> {
            let mut entries = Vec::new();
            // (block, depth, lower bound from the parent key, is root)
            let mut stack = vec![(root, 0usize, 0u64, true)];
            let mut leaf_depth = None;
            let mut last_key: Option<u64> = None;
            let mut subtrees = Vec::new();
            while let Some((b, depth, lower, is_root)) = stack.pop() {
                let r = pmd.tm.bm.read_lock(b, &BTREE_VALIDATOR).unwrap();
                let n = NodeRef::new(&r).unwrap();
                let nr = n.nr_entries();
                let max = n.header.max_entries as usize;
                assert!(is_root || nr >= max / 3, "node {b}: {nr} entries < {max}/3");
                for i in 0..nr {
                    let k = n.key(i).unwrap();
                    assert!(k >= lower, "node {b}: key {k} below parent key {lower}");
                    if i > 0 {
                        assert!(k > n.key(i - 1).unwrap(), "node {b}: keys out of order");
                    }
                }
                let first_walk = self.walked.insert(b);
                if n.header.is_leaf() {
                    assert_eq!(
                        *leaf_depth.get_or_insert(depth),
                        depth,
                        "leaves at different depths"
                    );
                    let vs = match leaf {
                        Leaf::Plain(vs) => vs,
                        _ => 8,
                    };
                    assert_eq!(n.header.value_size as usize, vs, "node {b}: value size");
                    for i in 0..nr {
                        let k = n.key(i).unwrap();
                        assert!(
                            last_key.is_none_or(|l| k > l),
                            "leaf {b}: key {k} not ascending"
                        );
                        last_key = Some(k);
                        let v = n.value(i).unwrap().to_vec();
                        if first_walk {
                            match leaf {
                                Leaf::TopLevel => {
                                    let sub = btree::value_u64(&v).unwrap();
                                    self.add(sub);
                                    subtrees.push(sub);
                                }
                                Leaf::Mapping => {
                                    let d = BlockTime::from_u64(btree::value_u64(&v).unwrap());
                                    *self.data.entry(d.block).or_default() += 1;
                                }
                                Leaf::Plain(_) => {}
                            }
                        }
                        entries.push((k, v));
                    }
                } else {
                    assert!(nr > 0, "empty internal node {b}");
                    for i in (0..nr).rev() {
                        let c = n.child(i).unwrap();
                        if first_walk {
                            self.add(c);
                        }
                        stack.push((c, depth + 1, n.key(i).unwrap(), false));
                    }
                }
            }
            for sub in subtrees {
                if self.walked.contains(&sub) {
                    continue;
                }
                self.tree(pmd, sub, Leaf::Mapping);
            }
            entries
        }

        fn sm(&mut self, pmd: &mut PoolMetadata, root: &SmRoot, metadata: bool) {
            let index: Vec<_> = if metadata {
                self.add(root.bitmap_root);
                let r = pmd
                    .tm
                    .bm
                    .read_lock(root.bitmap_root, &INDEX_VALIDATOR)
                    .unwrap();
                unpack_index_block(&r).unwrap()
            } else {
                self.add(root.bitmap_root);
                let e = self.tree(pmd, root.bitmap_root, Leaf::Plain(16));
                e.iter().map(|(_, v)| unpack_from(v).unwrap()).collect()
            };
            for e in index.iter().take(nr_bitmaps(root.nr_blocks)) {
                self.add(e.blocknr);
            }
            self.add(root.ref_count_root);
            self.tree(pmd, root.ref_count_root, Leaf::Plain(4));
        }
    }

    /// Check the committed state of `pmd` (call right after a commit).
    pub(crate) fn check(pmd: &mut PoolMetadata) {
        assert_eq!(pmd.tm.nr_shadows(), 0, "check runs on committed state");
        let sb = pmd.committed_sb;
        let mut c = Counts::default();
        c.add(0);
        let mut roots = vec![(sb.data_mapping_root, sb.device_details_root)];
        if sb.held_root != 0 {
            c.add(sb.held_root);
            let r = pmd
                .tm
                .bm
                .read_lock(sb.held_root, &SUPERBLOCK_VALIDATOR)
                .unwrap();
            let copy = Superblock::unpack_block(&r).unwrap();
            roots.push((copy.data_mapping_root, copy.device_details_root));
        }
        let mut live = None;
        for (m, d) in roots {
            c.add(m);
            c.add(d);
            let top = c.tree(pmd, m, Leaf::TopLevel);
            let details = c.tree(pmd, d, Leaf::Plain(DETAILS_VALUE_SIZE));
            let ids: Vec<u64> = top.iter().map(|e| e.0).collect();
            let dids: Vec<u64> = details.iter().map(|e| e.0).collect();
            assert_eq!(ids, dids, "devices in mapping tree vs details tree");
            live.get_or_insert((top, details));
        }
        // mapped_blocks of every live device equals its tree's entry count.
        let (top, details) = live.unwrap();
        for ((id, root), (_, dv)) in top.iter().zip(&details) {
            let d: DeviceDetails = unpack_from(dv).unwrap();
            let mut n = 0u64;
            btree::for_each_entry(
                &mut pmd.tm.bm,
                btree::value_u64(root).unwrap(),
                8,
                &mut |_, _| {
                    n += 1;
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(d.mapped_blocks, n, "mapped_blocks of device {id}");
        }
        c.sm(pmd, &sb.metadata_sm_root, true);
        c.sm(pmd, &sb.data_sm_root, false);
        let nr_meta = sb.metadata_sm_root.nr_blocks;
        let mut allocated = 0;
        for b in 0..nr_meta {
            let want = c.meta.get(&b).copied().unwrap_or(0);
            let got = pmd.tm.ref_count(b).unwrap();
            assert_eq!(
                got, want,
                "metadata block {b}: count {got}, expected {want}"
            );
            allocated += u64::from(want > 0);
        }
        assert!(
            c.meta.keys().all(|b| *b < nr_meta),
            "reference beyond the metadata device"
        );
        // In-memory counts (written to the superblock at commit; foreign images may carry a
        // wrong on-disk value, which open recounts).
        assert_eq!(
            pmd.tm.sm.ll.nr_allocated, allocated,
            "metadata nr_allocated"
        );
        let nr_data = sb.data_sm_root.nr_blocks;
        let mut allocated = 0;
        let extra: BTreeMap<u64, u32> = BTreeMap::new();
        for d in 0..nr_data {
            let want = c.data.get(&d).copied().unwrap_or(0) + extra.get(&d).copied().unwrap_or(0);
            let got = pmd.data_block_count(DataBlock(d)).unwrap();
            assert_eq!(got, want, "data block {d}: count {got}, expected {want}");
            allocated += u64::from(want > 0);
        }
        assert_eq!(pmd.data_sm.ll.nr_allocated, allocated, "data nr_allocated");
        let _ = ENTRIES_PER_BITMAP;
    }
}

#[test]
fn checker_accepts_smoke_pool_and_detects_a_leak() {
    let (_io, mut pmd) = new_pool(1024, 20_000);
    pmd.create_thin(DevId(1)).unwrap();
    for v in 0..1000 {
        let d = pmd.alloc_data_block().unwrap();
        pmd.insert_block(DevId(1), ThinBlock(v), d).unwrap();
    }
    pmd.create_snap(DevId(2), DevId(1)).unwrap();
    pmd.commit().unwrap();
    checker::check(&mut pmd);
    // A leaked data reference must be caught.
    pmd.inc_data_block(DataBlock(5)).unwrap();
    pmd.commit().unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| checker::check(&mut pmd)));
    assert!(r.is_err(), "checker missed a leaked data reference");
}

type Model = BTreeMap<u64, BTreeMap<u64, u64>>;

fn compare_with_model(pmd: &mut PoolMetadata, model: &Model) {
    let devs: Vec<DevId> = model.keys().map(|d| DevId(*d)).collect();
    assert_eq!(pmd.devices().unwrap(), devs);
    for (dev, maps) in model {
        let got: Vec<(u64, u64)> = pmd
            .mappings(DevId(*dev), ThinBlock(0), ThinBlock(u64::MAX))
            .map(|r| r.map(|(b, l)| (b.0, l.data_block.0)).unwrap())
            .collect();
        let want: Vec<(u64, u64)> = maps.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(got, want, "mappings of device {dev}");
        let d = pmd.device_details(DevId(*dev)).unwrap().unwrap();
        assert_eq!(d.mapped_blocks, maps.len() as u64, "mapped_blocks of {dev}");
    }
}

/// Random operations on several devices (with snapshots) against a model, across commit,
/// abort and reopen; the independent checker runs after commits.
fn random_pool_ops(seed: u64, nr_ops: usize, cache: CacheOpts) {
    eprintln!("random_pool_ops seed {seed}, {cache:?}");
    let mut rng = TestRng::new(seed);
    let io = MemBlockIo::new(4096);
    let mut pmd = PoolMetadata::format(Box::new(io.clone()), 128, 30_000, cache).unwrap();
    let mut model: Model = BTreeMap::new();
    let mut committed = model.clone();
    let mut next_id = 0u64;
    let mut nr_commits = 0;
    for step in 0..nr_ops {
        let ids: Vec<u64> = model.keys().copied().collect();
        let pick = |rng: &mut TestRng| ids[rng.below(ids.len() as u64) as usize];
        let op = rng.below(100);
        match op {
            _ if ids.is_empty() || (op < 3 && ids.len() < 6) => {
                pmd.create_thin(DevId(next_id)).unwrap();
                model.insert(next_id, BTreeMap::new());
                next_id += 1;
            }
            0..=2 if ids.len() < 8 => {
                let origin = pick(&mut rng);
                pmd.create_snap(DevId(next_id), DevId(origin)).unwrap();
                let m = model[&origin].clone();
                model.insert(next_id, m);
                next_id += 1;
            }
            3 if ids.len() > 1 => {
                let id = pick(&mut rng);
                pmd.delete_thin(DevId(id)).unwrap();
                model.remove(&id);
            }
            4..=59 => {
                let id = pick(&mut rng);
                let v = rng.below(5000);
                let d = match pmd.alloc_data_block() {
                    Ok(d) => d,
                    Err(e) => {
                        assert_eq!(e.kind(), ErrorKind::NoSpace);
                        continue;
                    }
                };
                pmd.insert_block(DevId(id), ThinBlock(v), d).unwrap();
                model.get_mut(&id).unwrap().insert(v, d.0);
            }
            60..=79 => {
                let id = pick(&mut rng);
                let v = rng.below(5000);
                let was = pmd.remove_block(DevId(id), ThinBlock(v)).unwrap();
                assert_eq!(was, model.get_mut(&id).unwrap().remove(&v).is_some());
            }
            80..=84 => {
                let id = pick(&mut rng);
                let b = rng.below(5000);
                let e = b + rng.below(400);
                let n = pmd
                    .remove_range(DevId(id), ThinBlock(b), ThinBlock(e))
                    .unwrap();
                let m = model.get_mut(&id).unwrap();
                let keys: Vec<u64> = m.range(b..e).map(|(k, _)| *k).collect();
                assert_eq!(n, keys.len() as u64);
                for k in keys {
                    m.remove(&k);
                }
            }
            85..=93 => {
                pmd.commit().unwrap();
                committed = model.clone();
                nr_commits += 1;
                if nr_commits % 4 == 0 {
                    checker::check(&mut pmd);
                }
                compare_with_model(&mut pmd, &model);
            }
            94..=95 => {
                pmd.abort().unwrap();
                model = committed.clone();
                compare_with_model(&mut pmd, &model);
            }
            96 => {
                drop(pmd);
                pmd = PoolMetadata::open(Box::new(io.clone()), 128, cache).unwrap();
                model = committed.clone();
                compare_with_model(&mut pmd, &model);
            }
            97 => match pmd.held_root() {
                Some(_) => pmd.release_metadata_snap().unwrap(),
                None => {
                    pmd.reserve_metadata_snap().unwrap();
                    committed = model.clone();
                }
            },
            98 => {
                // Re-map a mapped block to the same data block, holding a reference first
                // as every caller of insert_block does.
                let id = pick(&mut rng);
                let Some((&v, &d)) = model[&id].iter().next() else {
                    continue;
                };
                pmd.inc_data_block(DataBlock(d)).unwrap();
                pmd.insert_block(DevId(id), ThinBlock(v), DataBlock(d))
                    .unwrap();
            }
            _ => {
                let id = pick(&mut rng);
                let v = rng.below(5000);
                let got = pmd
                    .find_block(DevId(id), ThinBlock(v))
                    .unwrap()
                    .map(|l| l.data_block.0);
                assert_eq!(got, model[&id].get(&v).copied(), "step {step}");
            }
        }
    }
    pmd.commit().unwrap();
    checker::check(&mut pmd);
    compare_with_model(&mut pmd, &model);
    thin_check_and_dump(&io);
}

#[test]
fn random_pool_ops_match_model_seed_1() {
    random_pool_ops(1, 6000, opts());
}

#[test]
fn random_pool_ops_with_the_smallest_cache() {
    let tiny = CacheOpts {
        nr_cache_blocks: crate::block_manager::MIN_CACHE_BLOCKS,
    };
    random_pool_ops(3, 6000, tiny);
}

#[test]
fn random_pool_ops_match_model_seed_env() {
    let seed = std::env::var("PDATA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xC0FFEE);
    let cache = std::env::var("PDATA_CACHE_BLOCKS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(opts(), |n| CacheOpts { nr_cache_blocks: n });
    random_pool_ops(seed, 6000, cache);
}

#[test]
fn metadata_resize_across_a_bitmap_boundary_passes_thin_check() {
    let nr = ENTRIES_PER_BITMAP - 8;
    let (io, mut pmd) = new_pool(nr, 1000);
    pmd.create_thin(DevId(1)).unwrap();
    pmd.commit().unwrap();
    let big = ENTRIES_PER_BITMAP + 600;
    assert_eq!(
        pmd.resize_metadata_dev(big).unwrap_err().kind(),
        ErrorKind::InvalidArgument,
        "beyond the device"
    );
    io.resize(big);
    let free_before = pmd.metadata_nr_free();
    pmd.resize_metadata_dev(big).unwrap();
    assert_eq!(pmd.metadata_nr_blocks(), big);
    pmd.commit().unwrap();
    checker::check(&mut pmd);
    // 608 more blocks, minus the new bitmap and the commit's shadows, are free.
    assert!(
        pmd.metadata_nr_free() > free_before + 590,
        "{}",
        pmd.metadata_nr_free()
    );
    assert_eq!(
        pmd.resize_metadata_dev(nr).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    // Fill metadata until it must use blocks of the new bitmap.
    for v in 0..1000u64 {
        let d = pmd.alloc_data_block().unwrap();
        pmd.insert_block(DevId(1), ThinBlock(v * 1000), d).unwrap();
    }
    pmd.commit().unwrap();
    checker::check(&mut pmd);
    drop(pmd);
    let mut pmd = PoolMetadata::open(Box::new(io.clone()), 128, opts()).unwrap();
    assert_eq!(pmd.metadata_nr_blocks(), big);
    checker::check(&mut pmd);
    thin_check_and_dump(&io);
}

#[test]
fn metadata_device_is_capped_at_the_format_maximum() {
    let pmd_io = MemBlockIo::new(MAX_METADATA_BLOCKS + 100);
    let pmd = PoolMetadata::format(Box::new(pmd_io), 128, 10, opts()).unwrap();
    assert_eq!(pmd.metadata_nr_blocks(), MAX_METADATA_BLOCKS);
    assert_eq!(
        pmd.committed_superblock().metadata_nr_blocks,
        MAX_METADATA_BLOCKS
    );
}

#[test]
fn data_resize_across_bitmaps_and_enospc_until_commit() {
    let (io, mut pmd) = new_pool(1024, 100);
    pmd.create_thin(DevId(7)).unwrap();
    for v in 0..100u64 {
        let d = pmd.alloc_data_block().unwrap();
        pmd.insert_block(DevId(7), ThinBlock(v), d).unwrap();
    }
    assert_eq!(pmd.data_nr_free(), 0);
    assert_eq!(
        pmd.alloc_data_block().unwrap_err().kind(),
        ErrorKind::NoSpace
    );
    pmd.commit().unwrap();
    assert!(pmd.remove_block(DevId(7), ThinBlock(3)).unwrap());
    assert_eq!(pmd.data_nr_free(), 1);
    // Freed in this transaction: not reusable before commit.
    assert_eq!(
        pmd.alloc_data_block().unwrap_err().kind(),
        ErrorKind::NoSpace
    );
    pmd.commit().unwrap();
    let d = pmd.alloc_data_block().unwrap();
    assert_eq!(
        d,
        DataBlock(
            pmd.find_block(DevId(7), ThinBlock(2))
                .unwrap()
                .unwrap()
                .data_block
                .0
                + 1
        )
    );
    pmd.insert_block(DevId(7), ThinBlock(3), d).unwrap();
    assert_eq!(
        pmd.resize_data_dev(50).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    let big = 2 * ENTRIES_PER_BITMAP + 5;
    pmd.resize_data_dev(big).unwrap();
    assert_eq!(pmd.data_nr_free(), big - 100);
    for v in 100..ENTRIES_PER_BITMAP + 300 {
        let d = pmd.alloc_data_block().unwrap();
        pmd.insert_block(DevId(7), ThinBlock(v), d).unwrap();
    }
    pmd.commit().unwrap();
    checker::check(&mut pmd);
    thin_check_and_dump(&io);
    assert_eq!(
        pmd.insert_block(DevId(7), ThinBlock(1), DataBlock(big))
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidArgument
    );
}

fn corrupt_block0(io: &MemBlockIo, f: impl FnOnce(&mut [u8; crate::BLOCK_SIZE]), fix_csum: bool) {
    let mut b = [0u8; crate::BLOCK_SIZE];
    io.read_block(0, &mut b).unwrap();
    f(&mut b);
    if fix_csum {
        let c = crate::checksum::block_checksum(&b, crate::checksum::SUPERBLOCK_CSUM_XOR);
        b[0..4].copy_from_slice(&c.to_le_bytes());
    }
    io.write_block(0, &b).unwrap();
}

#[test]
fn open_refuses_damaged_or_incompatible_superblocks() {
    type Mutation = Box<dyn Fn(&mut [u8; crate::BLOCK_SIZE])>;
    let cases: Vec<(Mutation, bool, ErrorKind)> = vec![
        (Box::new(|b| b[100] ^= 1), false, ErrorKind::Checksum),
        (Box::new(|b| b[8] = 5), true, ErrorKind::BlockNr),
        (Box::new(|b| b[32] = 1), true, ErrorKind::BadMagic),
        (Box::new(|b| b[360] = 1), true, ErrorKind::Incompatible),
        (Box::new(|b| b[356] = 2), true, ErrorKind::Incompatible),
        (Box::new(|b| b[64 + 16] ^= 0x40), true, ErrorKind::BlockNr),
    ];
    for (mutate, fix, kind) in cases {
        let (io, pmd) = new_pool(256, 1000);
        drop(pmd);
        corrupt_block0(&io, |b| mutate(b), fix);
        let e = PoolMetadata::open(Box::new(io.clone()), 128, opts()).unwrap_err();
        assert_eq!(e.kind(), kind, "{e}");
    }
    let (io, pmd) = new_pool(256, 1000);
    drop(pmd);
    let e = PoolMetadata::open(Box::new(io.clone()), 256, opts()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DataBlockSizeMismatch);
    // A corrupt tree node is a typed error naming the block, never a panic.
    let pmd = PoolMetadata::open(Box::new(io.clone()), 128, opts()).unwrap();
    let root = pmd.committed_superblock().device_details_root;
    drop(pmd);
    let mut b = [0u8; crate::BLOCK_SIZE];
    io.read_block(root, &mut b).unwrap();
    b[200] ^= 1;
    io.write_block(root, &b).unwrap();
    let mut pmd = PoolMetadata::open(Box::new(io.clone()), 128, opts()).unwrap();
    let e = pmd.create_thin(DevId(1)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Checksum);
    assert!(e.to_string().contains(&format!("block {root}")), "{e}");
}

#[test]
fn format_validates_arguments_and_open_or_format_detects_zero_block() {
    for dbs in [64, 130, 4_194_304] {
        let e = PoolMetadata::format(Box::new(MemBlockIo::new(256)), dbs, 10, opts()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }
    let e = PoolMetadata::format(Box::new(MemBlockIo::new(4)), 128, 10, opts()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    for dbs in [128, 384, 2_097_152] {
        let io = MemBlockIo::new(256);
        let mut pmd = PoolMetadata::open_or_format(Box::new(io.clone()), dbs, 77, opts()).unwrap();
        pmd.create_thin(DevId(3)).unwrap();
        pmd.commit().unwrap();
        drop(pmd);
        let mut pmd = PoolMetadata::open_or_format(Box::new(io.clone()), dbs, 1, opts()).unwrap();
        assert_eq!(pmd.devices().unwrap(), vec![DevId(3)]);
        assert_eq!(pmd.data_nr_blocks(), 77);
        assert_eq!(pmd.data_block_size_sectors(), dbs);
    }
}

#[test]
fn device_errors_and_id_limits() {
    let (_io, mut pmd) = new_pool(256, 1000);
    assert_eq!(
        pmd.create_thin(DevId(MAX_DEV_ID + 1)).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    pmd.create_thin(DevId(MAX_DEV_ID)).unwrap();
    assert_eq!(
        pmd.create_thin(DevId(MAX_DEV_ID)).unwrap_err().kind(),
        ErrorKind::Exists
    );
    assert_eq!(
        pmd.create_snap(DevId(1), DevId(2)).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        pmd.create_snap(DevId(MAX_DEV_ID), DevId(MAX_DEV_ID))
            .unwrap_err()
            .kind(),
        ErrorKind::Exists
    );
    assert_eq!(
        pmd.delete_thin(DevId(9)).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        pmd.find_block(DevId(9), ThinBlock(0)).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        pmd.insert_block(DevId(9), ThinBlock(0), DataBlock(0))
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        pmd.set_transaction_id(1, 2).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    pmd.set_transaction_id(0, 2).unwrap();
    assert_eq!(pmd.transaction_id(), 2);
    pmd.abort().unwrap();
    assert_eq!(pmd.transaction_id(), 0);
    assert_eq!(pmd.devices().unwrap(), vec![]);
    assert_eq!(
        pmd.release_metadata_snap().unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    let held = pmd.reserve_metadata_snap().unwrap();
    assert_eq!(pmd.held_root(), Some(held));
    assert_eq!(
        pmd.reserve_metadata_snap().unwrap_err().kind(),
        ErrorKind::Busy
    );
}

#[test]
fn snapshot_time_is_limited_to_24_bits() {
    let (_io, mut pmd) = new_pool(256, 1000);
    pmd.create_thin(DevId(1)).unwrap();
    pmd.time = (TIME_MASK - 1) as u32;
    pmd.create_snap(DevId(2), DevId(1)).unwrap();
    assert_eq!(pmd.time(), TIME_MASK as u32);
    let d = pmd.alloc_data_block().unwrap();
    pmd.insert_block(DevId(2), ThinBlock(0), d).unwrap();
    let l = pmd.find_block(DevId(2), ThinBlock(0)).unwrap().unwrap();
    assert_eq!(l.time, TIME_MASK as u32);
    assert!(!l.shared);
    assert_eq!(
        pmd.create_snap(DevId(3), DevId(1)).unwrap_err().kind(),
        ErrorKind::Limit
    );
}

#[test]
fn snapshot_details_and_sharing_follow_the_kernel() {
    let (io, mut pmd) = new_pool(512, 1000);
    pmd.set_transaction_id(0, 9).unwrap();
    pmd.create_thin(DevId(1)).unwrap();
    let d = pmd.alloc_data_block().unwrap();
    pmd.insert_block(DevId(1), ThinBlock(4), d).unwrap();
    pmd.commit().unwrap();
    let root_before = pmd.subtree_root(DevId(1), false).unwrap();
    pmd.create_snap(DevId(5), DevId(1)).unwrap();
    assert_eq!(pmd.subtree_root(DevId(5), false).unwrap(), root_before);
    assert_eq!(pmd.tm.ref_count(root_before).unwrap(), 2);
    assert_eq!(
        pmd.data_block_count(d).unwrap(),
        1,
        "snapshot does not touch data counts"
    );
    let o = pmd.device_details(DevId(1)).unwrap().unwrap();
    let s = pmd.device_details(DevId(5)).unwrap().unwrap();
    assert_eq!(
        (o.creation_time, o.snapshotted_time, o.transaction_id),
        (0, 1, 9)
    );
    assert_eq!(
        (s.creation_time, s.snapshotted_time, s.mapped_blocks),
        (1, 1, 1)
    );
    assert!(
        pmd.find_block(DevId(1), ThinBlock(4))
            .unwrap()
            .unwrap()
            .shared
    );
    // Break sharing in the origin: the leaf is copied and the old block gains the snapshot's
    // leaf as its only reference.
    let d2 = pmd.alloc_data_block().unwrap();
    pmd.insert_block(DevId(1), ThinBlock(4), d2).unwrap();
    assert_eq!(pmd.data_block_count(d).unwrap(), 1);
    assert!(
        !pmd.find_block(DevId(1), ThinBlock(4))
            .unwrap()
            .unwrap()
            .shared
    );
    assert_eq!(
        pmd.find_block(DevId(5), ThinBlock(4))
            .unwrap()
            .unwrap()
            .data_block,
        d
    );
    pmd.commit().unwrap();
    checker::check(&mut pmd);
    let dump = thin_check_and_dump(&io);
    assert!(dump.contains("dev_id=\"5\" mapped_blocks=\"1\" transaction=\"9\" creation_time=\"1\" snap_time=\"1\""), "{dump}");
}

#[test]
fn try_find_block_never_does_io() {
    let (io, mut pmd) = new_pool(1024, 10_000);
    pmd.create_thin(DevId(1)).unwrap();
    for v in 0..3000u64 {
        let d = pmd.alloc_data_block().unwrap();
        pmd.insert_block(DevId(1), ThinBlock(v), d).unwrap();
    }
    pmd.commit().unwrap();
    drop(pmd);
    let mut pmd = PoolMetadata::open(Box::new(io.clone()), 128, opts()).unwrap();
    let reads = pmd.cache_stats().nr_reads;
    let e = pmd.try_find_block(DevId(1), ThinBlock(2000)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldBlock);
    assert_eq!(pmd.cache_stats().nr_reads, reads);
    pmd.prefetch_block(DevId(1), ThinBlock(2000)).unwrap();
    let l = pmd
        .try_find_block(DevId(1), ThinBlock(2000))
        .unwrap()
        .unwrap();
    assert_eq!(Some(l), pmd.find_block(DevId(1), ThinBlock(2000)).unwrap());
    let e = pmd.try_find_block(DevId(1), ThinBlock(9999)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldBlock, "another leaf");
    pmd.prefetch_block(DevId(1), ThinBlock(9999)).unwrap();
    assert_eq!(pmd.try_find_block(DevId(1), ThinBlock(9999)).unwrap(), None);
}

#[test]
fn needs_check_is_written_immediately_and_survives_commits() {
    let (io, mut pmd) = new_pool(256, 100);
    assert!(!pmd.needs_check());
    pmd.create_thin(DevId(1)).unwrap();
    pmd.set_needs_check().unwrap();
    drop(pmd);
    let mut pmd = PoolMetadata::open(Box::new(io.clone()), 128, opts()).unwrap();
    assert!(pmd.needs_check());
    assert_eq!(
        pmd.devices().unwrap(),
        vec![],
        "uncommitted changes are not written"
    );
    pmd.commit().unwrap();
    drop(pmd);
    let pmd = PoolMetadata::open(Box::new(io.clone()), 128, opts()).unwrap();
    assert!(pmd.needs_check());
}

#[test]
fn open_time_and_memory_do_not_depend_on_mapping_count() {
    let (io, mut pmd) = new_pool(8192, 200_000);
    pmd.create_thin(DevId(1)).unwrap();
    for v in 0..150_000u64 {
        let d = pmd.alloc_data_block().unwrap();
        pmd.insert_block(DevId(1), ThinBlock(v), d).unwrap();
    }
    pmd.commit().unwrap();
    drop(pmd);
    let small = CacheOpts {
        nr_cache_blocks: 64,
    };
    let mut pmd = PoolMetadata::open(Box::new(io.clone()), 128, small).unwrap();
    // Open reads the superblock, the metadata index and bitmaps, the data index and bitmaps.
    assert!(pmd.cache_stats().nr_reads < 30, "{:?}", pmd.cache_stats());
    for v in (0..150_000u64).step_by(997) {
        assert!(pmd.find_block(DevId(1), ThinBlock(v)).unwrap().is_some());
    }
    assert!(pmd.tm.bm.nr_cached() <= 64);
}

#[test]
fn io_failure_latches_read_only_until_abort_restores_the_last_commit() {
    use crate::testing::{FaultPlan, FaultyBlockIo};
    for fail_at in 1..12u64 {
        let mem = MemBlockIo::new(512);
        let io = FaultyBlockIo::new(mem.clone());
        let mut pmd = PoolMetadata::format(Box::new(io.clone()), 128, 5000, opts()).unwrap();
        pmd.create_thin(DevId(1)).unwrap();
        for v in 0..500u64 {
            let d = pmd.alloc_data_block().unwrap();
            pmd.insert_block(DevId(1), ThinBlock(v), d).unwrap();
        }
        pmd.commit().unwrap();
        for v in 500..900u64 {
            let d = pmd.alloc_data_block().unwrap();
            pmd.insert_block(DevId(1), ThinBlock(v), d).unwrap();
        }
        let plan = if fail_at % 2 == 0 {
            FaultPlan {
                fail_write: Some(fail_at),
                ..FaultPlan::default()
            }
        } else {
            FaultPlan {
                fail_flush: Some(fail_at.div_ceil(2).min(2)),
                ..FaultPlan::default()
            }
        };
        io.set_plan(plan);
        let e = pmd.commit().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "fail_at {fail_at}: {e}");
        assert!(pmd.is_failed());
        let e = pmd
            .insert_block(DevId(1), ThinBlock(1), DataBlock(1))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
        assert_eq!(
            pmd.create_thin(DevId(2)).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
        io.set_plan(FaultPlan::default());
        pmd.abort().unwrap();
        assert!(!pmd.is_failed());
        // The failed commit either reached the superblock or not: both states are valid.
        let n = pmd.device_details(DevId(1)).unwrap().unwrap().mapped_blocks;
        assert!(n == 500 || n == 900, "fail_at {fail_at}: {n} mappings");
        pmd.create_thin(DevId(2)).unwrap();
        pmd.commit().unwrap();
        checker::check(&mut pmd);
        thin_check_and_dump(&mem);
    }
}

/// Regression (reported by pdata-tools, /work/notes/pdata-bugs.md #2): a long transaction
/// after reopening with a small cache.
#[test]
fn reopened_small_cache_long_transaction() {
    let io = MemBlockIo::new(2000);
    let small = CacheOpts {
        nr_cache_blocks: 128,
    };
    drop(PoolMetadata::format(Box::new(io.clone()), 256, 16_000, small).unwrap());
    let mut m = PoolMetadata::open(Box::new(io.clone()), 256, small).unwrap();
    m.commit().unwrap();
    m.create_thin(DevId(0)).unwrap();
    for v in 0..15_000u64 {
        let b = m.alloc_data_block().unwrap();
        if let Err(e) = m.insert_block(DevId(0), ThinBlock(100_000 + v), b) {
            panic!("insert #{v} (data block {}): {e}", b.0);
        }
    }
    m.commit().unwrap();
    checker::check(&mut m);
    thin_check_and_dump(&io);
}

/// Spec §19 item 10: an image written by `thin_restore` (foreign block placement, unshared
/// leaves, counts of 3 in the ref-count tree, its `nr_allocated` quirks) opens with the same
/// mappings, takes mutations, and still passes our checker and `thin_check`.
#[test]
fn thin_restore_image_opens_mutates_and_checks() {
    let mut xml = String::from(
        "<superblock uuid=\"\" time=\"1\" transaction=\"3\" flags=\"0\" version=\"2\" \
         data_block_size=\"128\" nr_data_blocks=\"40000\">\n",
    );
    let devs: [(u64, u64, u64); 3] = [(1, 0, 1000), (2, 0, 600), (3, 0, 300)];
    for (id, begin, len) in devs {
        xml += &format!(
            "  <device dev_id=\"{id}\" mapped_blocks=\"{}\" transaction=\"0\" \
             creation_time=\"0\" snap_time=\"1\">\n",
            len + 200
        );
        xml += &format!(
            "    <range_mapping origin_begin=\"{begin}\" data_begin=\"{begin}\" length=\"{len}\" \
             time=\"0\"/>\n"
        );
        for v in 0..200u64 {
            let d = 20_000 + id * 1000 + v;
            xml += &format!(
                "    <single_mapping origin_block=\"{}\" data_block=\"{d}\" time=\"1\"/>\n",
                5000 + v * 3
            );
        }
        xml += "  </device>\n";
    }
    xml += "</superblock>\n";
    let dir = tempfile::tempdir().unwrap();
    let (xml_path, img) = (dir.path().join("in.xml"), dir.path().join("meta.img"));
    std::fs::write(&xml_path, &xml).unwrap();
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let st = std::process::Command::new("thin_restore")
        .args([
            "-i".as_ref(),
            xml_path.as_os_str(),
            "-o".as_ref(),
            img.as_os_str(),
        ])
        .output()
        .expect("thin_restore (thin-provisioning-tools) must be installed");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let io = MemBlockIo::from_image(std::fs::read(&img).unwrap()).unwrap();
    let mut pmd = PoolMetadata::open(Box::new(io.clone()), 128, opts()).unwrap();
    assert_eq!((pmd.time(), pmd.transaction_id()), (1, 3));
    assert_eq!(pmd.devices().unwrap(), [1, 2, 3].map(DevId).to_vec());
    assert_eq!(pmd.data_block_count(DataBlock(10)).unwrap(), 3);
    assert_eq!(pmd.data_block_count(DataBlock(400)).unwrap(), 2);
    assert_eq!(pmd.data_block_count(DataBlock(900)).unwrap(), 1);
    let l = pmd.find_block(DevId(2), ThinBlock(5003)).unwrap().unwrap();
    assert_eq!(
        (l.data_block, l.time, l.shared),
        (DataBlock(22_001), 1, false)
    );
    assert!(
        pmd.find_block(DevId(1), ThinBlock(7))
            .unwrap()
            .unwrap()
            .shared
    );
    checker::check(&mut pmd);
    // Mutate: overwrite shared blocks, discard, snapshot, delete.
    for v in 0..400u64 {
        let d = pmd.alloc_data_block().unwrap();
        assert!(d.0 >= 1000, "allocated an in-use block {}", d.0);
        pmd.insert_block(DevId(3), ThinBlock(v), d).unwrap();
    }
    assert_eq!(pmd.data_block_count(DataBlock(10)).unwrap(), 2);
    assert_eq!(
        pmd.remove_range(DevId(1), ThinBlock(100), ThinBlock(5300))
            .unwrap(),
        900 + 100
    );
    pmd.create_snap(DevId(4), DevId(2)).unwrap();
    pmd.delete_thin(DevId(2)).unwrap();
    pmd.commit().unwrap();
    checker::check(&mut pmd);
    let dump = thin_check_and_dump(&io);
    assert!(
        dump.contains("dev_id=\"4\" mapped_blocks=\"800\""),
        "{dump}"
    );
    assert!(!dump.contains("dev_id=\"2\""));
}

#[test]
fn uncommitted_changes_are_reported() {
    let (_io, mut pmd) = new_pool(256, 100);
    assert!(!pmd.has_uncommitted_changes());
    pmd.create_thin(DevId(1)).unwrap();
    assert!(pmd.has_uncommitted_changes());
    pmd.commit().unwrap();
    assert!(!pmd.has_uncommitted_changes());
    pmd.set_transaction_id(0, 1).unwrap();
    assert!(pmd.has_uncommitted_changes());
    pmd.commit().unwrap();
    let d = pmd.alloc_data_block().unwrap();
    assert!(
        pmd.has_uncommitted_changes(),
        "a data allocation is a change"
    );
    pmd.dec_data_block(d).unwrap();
    pmd.abort().unwrap();
    assert!(!pmd.has_uncommitted_changes());
}
