//! Model-based property test of `PoolMetadata` (acceptance test 1): random sequences of
//! create, snapshot (of snapshots too), delete, provision, share, remove, remove-range,
//! set-transaction-id, resize, reserve/release of the held root, commit, abort and reopen,
//! applied to the metadata and to an in-memory model and compared after every step through
//! the API. At every commit the image on the device is also read independently: it must pass
//! the strict checker (exact metadata and data reference counts) and dump to exactly the
//! model's committed state — and between commits the device must still dump to the last
//! commit (copy-on-write never overwrites committed blocks).
//!
//! The seed is printed; `PDATA_SEED=<n>` replays a run, `PDATA_MODEL_RUNS` /
//! `PDATA_MODEL_OPS` scale it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use pdata::testing::{Harness, Op, Rng, Workload};
use pdata::thin::check::{check, CheckOptions};
use pdata::thin::dump::{read_pool, DumpRoot};
use pdata::thin::{CacheOpts, DevId, PoolMetadata, ThinBlock};
use pdata::{BlockIo, MemBlockIo};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Reads the committed image back independently and compares it with the model.
fn verify_image(io: &MemBlockIo, h: &Harness) -> Result<(), String> {
    let report = check(
        io,
        &CheckOptions {
            exact_nr_allocated: true,
        },
    );
    if !report.is_clean() {
        return Err(format!("image fails the check:\n{report}"));
    }
    let got = read_pool(io, DumpRoot::Live).map_err(|e| format!("dump: {e}"))?;
    let want = h.committed_xml();
    if got != want {
        return Err(format!(
            "image differs from the committed model:\n{}",
            diff(&got, &want)
        ));
    }
    match (read_pool(io, DumpRoot::HeldRoot), h.held_xml()) {
        (Ok(got), Some(want)) if got == want => Ok(()),
        (Err(_), None) => Ok(()),
        (got, want) => Err(format!(
            "held root dump {:?} vs model {:?}",
            got.map(|p| p.to_xml()),
            want.map(|p| p.to_xml())
        )),
    }
}

fn diff(got: &pdata::thin::xml::PoolXml, want: &pdata::thin::xml::PoolXml) -> String {
    let (g, w) = (got.to_xml(), want.to_xml());
    let first = g
        .lines()
        .zip(w.lines())
        .position(|(a, b)| a != b)
        .unwrap_or(0);
    let gl: Vec<&str> = g.lines().skip(first).take(3).collect();
    let wl: Vec<&str> = w.lines().skip(first).take(3).collect();
    format!("line {}: got {gl:?}\n want {wl:?}", first + 1)
}

struct RunStats {
    ops: u64,
    image_checks: u64,
    mappings_max: u64,
    devices_max: usize,
}

fn run(seed: u64, nr_ops: u64, cache_blocks: usize, w: &Workload, stats: &mut RunStats) -> Harness {
    let io = MemBlockIo::new(4096);
    let dev = io.clone();
    let factory = Box::new(move || Box::new(dev.clone()) as Box<dyn BlockIo>);
    let opts = CacheOpts {
        nr_cache_blocks: cache_blocks,
    };
    let mut h = Harness::format(factory, 128, 50_000, opts).unwrap();
    let mut rng = Rng::new(seed);
    let mut history: Vec<Op> = Vec::new();
    for i in 0..nr_ops {
        let op = h.random_op(w, &mut rng);
        history.push(op.clone());
        let fail = |what: String| -> ! {
            let tail: Vec<String> = history
                .iter()
                .rev()
                .take(12)
                .rev()
                .map(|o| format!("{o:?}"))
                .collect();
            panic!(
                "seed {seed} op #{i} {op:?}: {what}\nlast ops:\n  {}",
                tail.join("\n  ")
            );
        };
        if let Err(e) = h.apply(&op) {
            fail(e);
        }
        if let Err(e) = h.verify_live(&mut rng) {
            fail(format!("after the op: {e}"));
        }
        let committing = matches!(op, Op::Commit | Op::Reopen | Op::Abort | Op::ReserveSnap);
        if committing || i % 16 == 0 {
            if let Err(e) = verify_image(&io, &h) {
                fail(e);
            }
            stats.image_checks += 1;
        }
        stats.mappings_max = stats.mappings_max.max(h.current.nr_mappings());
        stats.devices_max = stats.devices_max.max(h.current.devices.len());
    }
    stats.ops += nr_ops;
    h
}

#[test]
fn pool_metadata_matches_model() {
    let seed = Rng::seed_from_env("PDATA_SEED");
    let runs = env_or("PDATA_MODEL_RUNS", 10);
    let nr_ops = env_or("PDATA_MODEL_OPS", 500);
    println!("model_ops: seed {seed} (PDATA_SEED={seed} replays), {runs} runs x {nr_ops} ops");
    let mut stats = RunStats {
        ops: 0,
        image_checks: 0,
        mappings_max: 0,
        devices_max: 0,
    };
    let mut counts = std::collections::BTreeMap::new();
    for r in 0..runs {
        let run_seed = seed.wrapping_add(r);
        // Alternate a tiny cache (constant eviction) with a roomy one, and vary the shape.
        let cache = if r % 2 == 0 { 24 } else { 1024 };
        let w = Workload {
            vblock_space: [300, 2048, 20_000][(r % 3) as usize],
            held_roots: r % 4 != 3,
            // Every third run grows large trees (internal nodes, splits, rebalancing).
            removal_pct: if r % 3 == 2 { 15 } else { 100 },
            commit_pct: if r % 3 == 2 { 1 } else { 3 },
            ..Workload::default()
        };
        let h = run(run_seed, nr_ops, cache, &w, &mut stats);
        for (k, v) in &h.counts {
            *counts.entry(*k).or_insert(0u64) += v;
        }
    }
    // One long run that grows deep trees: several hundred mappings per device, so bottom
    // trees get internal nodes, splits across snapshots and rebalancing on removal.
    let w = Workload {
        vblock_space: 20_000,
        removal_pct: 10,
        commit_pct: 1,
        abort_pct: 0,
        reopen_pct: 0,
        max_devices: 6,
        ..Workload::default()
    };
    let h = run(seed ^ 0xB16, nr_ops * 4, 64, &w, &mut stats);
    for (k, v) in &h.counts {
        *counts.entry(*k).or_insert(0u64) += v;
    }
    println!(
        "model_ops: {} ops, {} image checks, up to {} mappings on {} devices; ops by kind: {counts:?}",
        stats.ops, stats.image_checks, stats.mappings_max, stats.devices_max
    );
    assert!(counts.get("create_snap").copied().unwrap_or(0) > 10);
    assert!(counts.get("commit").copied().unwrap_or(0) > 10);
}

/// Growth across space-map bitmap boundaries (spec §19 item 12): the data device from 16,000
/// to 40,000 blocks (one to three data bitmaps) and the metadata device from 2,000 to 17,000
/// blocks (two metadata bitmaps), with mappings before and after; the image must stay exact.
#[test]
fn growth_across_bitmap_boundaries() {
    let seed = Rng::seed_from_env("PDATA_SEED");
    println!("growth: seed {seed} (PDATA_SEED={seed} replays)");
    let mut rng = Rng::new(seed);
    let io = MemBlockIo::new(2000);
    let dev = io.clone();
    let factory = Box::new(move || Box::new(dev.clone()) as Box<dyn BlockIo>);
    let opts = CacheOpts {
        nr_cache_blocks: 128,
    };
    let mut h = Harness::format(factory, 256, 16_000, opts).unwrap();
    let w = Workload {
        removal_pct: 20,
        abort_pct: 0,
        reopen_pct: 1,
        held_roots: false,
        ..Workload::default()
    };
    let step = |h: &mut Harness, n: usize, rng: &mut Rng| {
        for i in 0..n {
            let op = h.random_op(&w, rng);
            let op = if let Op::ResizeData(_) = op {
                Op::Commit
            } else {
                op
            };
            h.apply(&op)
                .unwrap_or_else(|e| panic!("seed {seed} op #{i} {op:?}: {e}"));
        }
        h.apply(&Op::Commit).unwrap();
        h.verify_live(rng)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        verify_image(&io, h).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    };
    step(&mut h, 400, &mut rng);
    h.apply(&Op::ResizeData(40_000)).unwrap();
    io.resize(17_000);
    h.meta().resize_metadata_dev(17_000).unwrap();
    assert_eq!(h.meta().metadata_nr_blocks(), 17_000);
    // Shrinking either is refused.
    assert!(h.meta().resize_metadata_dev(16_000).is_err());
    assert!(
        h.apply(&Op::ResizeData(30_000)).is_ok(),
        "shrink must be refused as the model expects"
    );
    // Commit the growth: the random steps below may abort or reopen.
    h.apply(&Op::Commit).unwrap();
    verify_image(&io, &h).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    step(&mut h, 400, &mut rng);
    // Provision enough to land past the first data bitmap.
    let devs: Vec<u64> = h.current.devices.keys().copied().collect();
    let d = devs.first().copied().unwrap_or(0);
    if devs.is_empty() {
        h.apply(&Op::CreateThin(0)).unwrap();
    }
    // Until a block past the first data bitmap (16,320 entries) is mapped; freed blocks are
    // reused first, so how many provisions that takes depends on the workload.
    let mut v = 0;
    while h.current.mapped_data_blocks().last().copied().unwrap_or(0) < 16_400 && v < 30_000 {
        for _ in 0..500 {
            h.apply(&Op::Provision {
                dev: d,
                vblock: 100_000 + v,
            })
            .unwrap();
            v += 1;
        }
    }
    h.apply(&Op::Commit).unwrap();
    verify_image(&io, &h).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    let top = h.current.mapped_data_blocks().last().copied().unwrap_or(0);
    println!(
        "growth: {} mappings, highest data block {top}",
        h.current.nr_mappings()
    );
    assert!(top >= 16_320, "never allocated past the first data bitmap");
}

/// A pool reopened with a small cache must survive a long transaction (regression test for a
/// bug found by `growth_across_bitmap_boundaries`, see /work/notes/pdata-bugs.md #2).
#[test]
fn reopened_pool_survives_a_long_transaction() {
    let io = MemBlockIo::new(2000);
    let opts = CacheOpts {
        nr_cache_blocks: 128,
    };
    drop(PoolMetadata::format(Box::new(io.clone()), 256, 16_000, opts).unwrap());
    let mut m = PoolMetadata::open(Box::new(io.clone()), 256, opts).unwrap();
    m.commit().unwrap();
    m.create_thin(DevId(0)).unwrap();
    for v in 0..15_000u64 {
        let b = m.alloc_data_block().unwrap();
        if let Err(e) = m.insert_block(DevId(0), ThinBlock(100_000 + v), b) {
            panic!("insert #{v} (data block {}): {e}", b.0);
        }
    }
    m.commit().unwrap();
    let report = check(
        &io,
        &CheckOptions {
            exact_nr_allocated: true,
        },
    );
    assert!(report.is_clean(), "{report}");
    assert_eq!(
        read_pool(&io, DumpRoot::Live).unwrap().devices[0].nr_mappings(),
        15_000
    );
}

/// Node-occupancy stress (spec §19 item 8): > 10^4 mappings on one device inserted
/// sequentially, then removed going down, at random and in ranges, with re-inserts; after
/// each phase every non-root node must hold ≥ max/3 entries (our checker and thin_check).
#[test]
fn occupancy_holds_under_long_insert_and_remove_sequences() {
    let seed = Rng::seed_from_env("PDATA_SEED");
    println!("occupancy: seed {seed} (PDATA_SEED={seed} replays)");
    let mut rng = Rng::new(seed);
    let io = MemBlockIo::new(1500);
    let dev = io.clone();
    let factory = Box::new(move || Box::new(dev.clone()) as Box<dyn BlockIo>);
    let opts = CacheOpts {
        nr_cache_blocks: 256,
    };
    let mut h = Harness::format(factory, 128, 40_000, opts).unwrap();
    let thin_check = pdata::testing::require_tool("thin_check");
    let phase = |h: &mut Harness, name: &str| {
        h.apply(&Op::Commit).unwrap();
        verify_image(&io, h).unwrap_or_else(|e| panic!("seed {seed} after {name}: {e}"));
        if let Some(tc) = &thin_check {
            let f = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(f.path(), io.image()).unwrap();
            let out = std::process::Command::new(tc)
                .arg(f.path())
                .output()
                .unwrap();
            assert!(out.status.success(), "thin_check after {name}: {out:?}");
        }
        println!(
            "occupancy: {name}: {} mappings, image clean",
            h.current.nr_mappings()
        );
    };
    let apply = |h: &mut Harness, op: Op| {
        h.apply(&op)
            .unwrap_or_else(|e| panic!("seed {seed} {op:?}: {e}"));
    };
    apply(&mut h, Op::CreateThin(1));
    for v in 0..12_000 {
        apply(&mut h, Op::Provision { dev: 1, vblock: v });
    }
    phase(&mut h, "12,000 sequential inserts");
    for v in (0..12_000).rev().step_by(2) {
        apply(&mut h, Op::Remove { dev: 1, vblock: v });
    }
    phase(&mut h, "every other block removed going down");
    for _ in 0..6000 {
        let v = rng.below(12_000);
        let op = if rng.chance(1, 2) {
            Op::Remove { dev: 1, vblock: v }
        } else {
            Op::Provision { dev: 1, vblock: v }
        };
        apply(&mut h, op);
    }
    phase(&mut h, "6,000 random removes and inserts");
    apply(&mut h, Op::CreateSnap { dev: 2, origin: 1 });
    for begin in (0..12_000).step_by(1500) {
        apply(
            &mut h,
            Op::RemoveRange {
                dev: 1,
                begin,
                end: begin + 1100,
            },
        );
    }
    phase(&mut h, "range removes on the origin of a snapshot");
    for v in (0..12_000).rev() {
        apply(&mut h, Op::Remove { dev: 2, vblock: v });
    }
    phase(&mut h, "the snapshot emptied going down");
}
