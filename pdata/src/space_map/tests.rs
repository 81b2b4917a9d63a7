//! One conformance suite, `fn(&mut dyn SpaceMap)`, run on every space map against a `Vec<u32>`
//! model (STYLE rule 22), plus persistence, overflow and extend tests of the on-disk maps.

use super::core::CoreSpaceMap;
use super::disk::DataSm;
use super::*;
use crate::btree::tests::{commit, new_tm};
use crate::error::ErrorKind;
use crate::space_map::format::{SmRoot, ENTRIES_PER_BITMAP};
use crate::thin::tests::TestRng;

/// Blocks the suite may use in `sm`, and whether the map's own structures also live in it
/// (metadata map: counts of blocks the suite did not allocate are not predictable).
struct Suite {
    seed: u64,
    self_hosted: bool,
}

impl Suite {
    fn run(&self, sm: &mut dyn SpaceMap) {
        let mut rng = TestRng::new(self.seed);
        let n = sm.nr_blocks();
        // model[b] = count the suite put on b; `owned`: blocks the suite allocated.
        let mut model = vec![0u32; n as usize];
        let mut committed = model.clone();
        let mut owned: Vec<u64> = Vec::new();
        let base_free = sm.nr_free();
        for _ in 0..3000 {
            match rng.below(10) {
                0..=3 => match sm.alloc() {
                    Ok(b) => {
                        assert!(b < sm.nr_blocks());
                        assert_eq!(model[b as usize], 0, "alloc returned a used block {b}");
                        assert_eq!(committed[b as usize], 0, "reused {b} before commit");
                        assert_eq!(sm.count(b).unwrap(), 1);
                        model[b as usize] = 1;
                        owned.push(b);
                    }
                    Err(e) => {
                        assert_eq!(e.kind(), ErrorKind::NoSpace);
                        assert!(
                            self.self_hosted
                                || sm.nr_free() == 0
                                || committed.iter().any(|c| *c > 0)
                        );
                    }
                },
                4..=5 if !owned.is_empty() => {
                    let b = owned[rng.below(owned.len() as u64) as usize];
                    sm.inc(b).unwrap();
                    model[b as usize] += 1;
                }
                6..=7 if !owned.is_empty() => {
                    let i = rng.below(owned.len() as u64) as usize;
                    let b = owned[i];
                    sm.dec(b).unwrap();
                    model[b as usize] -= 1;
                    if model[b as usize] == 0 {
                        owned.swap_remove(i);
                    }
                }
                8 => {
                    sm.commit().unwrap();
                    committed = model.clone();
                }
                _ => {
                    for &b in owned.iter().take(50) {
                        assert_eq!(sm.count(b).unwrap(), model[b as usize], "count of {b}");
                    }
                }
            }
            if !self.self_hosted {
                let used = model.iter().filter(|c| **c > 0).count() as u64;
                assert_eq!(sm.nr_free(), base_free - used);
            }
        }
        for (b, c) in model.iter().enumerate() {
            if *c > 0 || !self.self_hosted {
                assert_eq!(sm.count(b as u64).unwrap(), *c, "final count of {b}");
            }
        }
        assert_eq!(sm.count(n).unwrap_err().kind(), ErrorKind::InvalidArgument);
        // Free blocks cannot be dec'd.
        if let Some(b) = (0..n).find(|b| model[*b as usize] == 0 && !self.self_hosted) {
            assert_eq!(sm.dec(b).unwrap_err().kind(), ErrorKind::Corrupt);
        }
        // Extend: the new blocks are free and allocatable.
        let before = sm.nr_free();
        sm.extend(100).unwrap();
        assert_eq!(sm.nr_blocks(), n + 100);
        assert!(sm.nr_free() >= before + 100 - 1);
        // Exhaust the map: every block ends up allocated, then NoSpace.
        sm.commit().unwrap();
        let mut got = 0u64;
        loop {
            match sm.alloc() {
                Ok(_) => got += 1,
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::NoSpace);
                    break;
                }
            }
            assert!(got <= n + 100);
        }
        assert_eq!(sm.nr_free(), 0);
    }
}

#[test]
fn conformance_core() {
    let mut sm = CoreSpaceMap::new(700);
    Suite {
        seed: 1,
        self_hosted: false,
    }
    .run(&mut sm);
}

#[test]
fn conformance_data_sm() {
    let mut tm = new_tm(1024, 128);
    let mut sm = DataSm::create(&mut tm, 700).unwrap();
    commit(&mut tm);
    Suite {
        seed: 2,
        self_hosted: false,
    }
    .run(&mut DataSpaceMap {
        sm: &mut sm,
        tm: &mut tm,
    });
}

#[test]
fn conformance_metadata_sm() {
    let mut tm = new_tm(900, 128);
    Suite {
        seed: 3,
        self_hosted: true,
    }
    .run(&mut MetadataSpaceMap(&mut tm));
}

#[test]
fn data_sm_overflow_counts_persist_across_reopen_and_bitmaps() {
    let mut tm = new_tm(1024, 64);
    let nr = 2 * ENTRIES_PER_BITMAP + 77;
    let mut sm = DataSm::create(&mut tm, nr).unwrap();
    let blocks = [0, 5, ENTRIES_PER_BITMAP - 1, ENTRIES_PER_BITMAP, nr - 1];
    for (i, &b) in blocks.iter().enumerate() {
        for _ in 0..(i as u32 * 3 + 1) {
            sm.ll.inc(&mut tm.bm, b).unwrap();
        }
    }
    let root = sm.pre_commit(&mut tm).unwrap();
    commit(&mut tm);
    sm.finish_commit();
    assert_eq!(root.nr_allocated, blocks.len() as u64);
    tm.bm.invalidate_all();
    let mut sm2 = DataSm::open(&mut tm.bm, &root).unwrap();
    for (i, &b) in blocks.iter().enumerate() {
        assert_eq!(
            sm2.ll.count(&mut tm.bm, b).unwrap(),
            i as u32 * 3 + 1,
            "block {b}"
        );
    }
    assert_eq!(sm2.ll.nr_allocated, blocks.len() as u64);
    // Drop the overflowed counts back under 3: the ref-count tree must lose them.
    for &b in &blocks[1..] {
        while sm2.ll.count(&mut tm.bm, b).unwrap() > 1 {
            sm2.ll.dec(&mut tm.bm, b).unwrap();
        }
    }
    let root2 = sm2.pre_commit(&mut tm).unwrap();
    commit(&mut tm);
    let mut n = 0;
    crate::btree::for_each_entry(&mut tm.bm, root2.ref_count_root, 4, &mut |_, _| {
        n += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(n, 0, "ref-count tree keeps only counts >= 3");
    let _ = SmRoot::default();
}
