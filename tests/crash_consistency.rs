//! Crash safety of `pdata::thin::PoolMetadata` (acceptance test 3).
//!
//! A random workload runs on a write-recording device. Then the power is cut at every write
//! and flush point of its log; the writes after the last completed flush are all lost, all
//! kept, a random subset kept (reordering), or one of them torn at a sector boundary. Every
//! resulting image must pass the strict checker, dump to exactly the state of the last
//! committed transaction (or, while a commit's superblock write is in flight, of that commit),
//! open in pdata with that state visible through the API, and take a further commit. A sample
//! is also checked by the real `thin_check`. Seeds are printed; `PDATA_SEED=<n>` replays.

use std::path::PathBuf;
use std::process::Command;

use pdata::testing::{
    require_tool, CrashVariant, Harness, ModelState, Op, RecordingBlockIo, Rng, Workload,
};
use pdata::thin::check::{check, CheckOptions};
use pdata::thin::dump::{read_pool, DumpRoot};
use pdata::thin::xml::PoolXml;
use pdata::thin::{CacheOpts, PoolMetadata};
use pdata::{BlockIo, MemBlockIo};

const DATA_BLOCK_SIZE: u32 = 128;

/// The committed states of the workload, with the log position where each commit began and
/// where it was durable (its final flush).
struct Commit {
    begin: usize,
    end: usize,
    xml: PoolXml,
    state: ModelState,
    held: Option<ModelState>,
    held_xml: Option<PoolXml>,
}

fn record_workload(seed: u64, nr_ops: usize) -> (RecordingBlockIo, Vec<Commit>) {
    let rec = RecordingBlockIo::new(320);
    let r2 = rec.clone();
    let factory = Box::new(move || Box::new(r2.clone()) as Box<dyn BlockIo>);
    let opts = CacheOpts {
        nr_cache_blocks: 48,
    };
    let mut h = Harness::format(factory, DATA_BLOCK_SIZE, 5000, opts).unwrap();
    rec.reset_log();
    let snapshot = |h: &Harness, begin: usize, end: usize| Commit {
        begin,
        end,
        xml: h.committed_xml(),
        state: h.committed.clone(),
        held: h.held.1.clone(),
        held_xml: h.held_xml(),
    };
    let mut commits = vec![snapshot(&h, 0, 0)];
    let w = Workload {
        max_devices: 6,
        vblock_space: 1500,
        commit_pct: 8,
        abort_pct: 2,
        reopen_pct: 2,
        held_roots: true,
        ..Workload::default()
    };
    let mut rng = Rng::new(seed);
    for i in 0..nr_ops {
        let op = h.random_op(&w, &mut rng);
        let begin = rec.nr_events();
        if let Err(e) = h.apply(&op) {
            panic!("seed {seed} op #{i} {op:?}: {e}");
        }
        if matches!(op, Op::Commit | Op::ReserveSnap) {
            commits.push(snapshot(&h, begin, rec.nr_events()));
        }
    }
    h.apply(&Op::Commit).unwrap();
    let (begin, end) = (commits.last().map_or(0, |c| c.end), rec.nr_events());
    commits.push(snapshot(&h, begin, end));
    (rec, commits)
}

/// The states a crash after `prefix` events may legitimately leave: the last durable commit,
/// and the one in progress if its superblock write may have landed.
fn candidates(commits: &[Commit], prefix: usize) -> Vec<&Commit> {
    let durable = commits.iter().rposition(|c| c.end <= prefix).unwrap_or(0);
    let mut out = vec![&commits[durable]];
    if let Some(next) = commits.get(durable + 1) {
        if next.begin < prefix {
            out.push(next);
        }
    }
    out
}

struct Tally {
    points: usize,
    images: usize,
    reopened: usize,
    thin_check: usize,
    newer: usize,
}

fn verify_crash_image(
    img: Vec<u8>,
    cands: &[&Commit],
    rng: &mut Rng,
    thin_check: Option<&PathBuf>,
    t: &mut Tally,
) -> Result<(), String> {
    let io = MemBlockIo::from_image(img).unwrap();
    let report = check(
        &io,
        &CheckOptions {
            exact_nr_allocated: true,
        },
    );
    if !report.is_clean() {
        return Err(format!("checker:\n{report}"));
    }
    let got = read_pool(&io, DumpRoot::Live).map_err(|e| format!("dump: {e}"))?;
    let held = read_pool(&io, DumpRoot::HeldRoot).ok();
    // Consecutive commits may differ only in the held root, so match both.
    let matches = |c: &&&Commit| c.xml == got && c.held_xml == held;
    let Some(which) = cands.iter().position(|c| matches(&c)) else {
        return Err(format!(
            "image is not a committed state:\n{}\nheld {held:?}\nexpected one of\n{}",
            got.to_xml(),
            cands
                .iter()
                .map(|c| format!("{}held {:?}", c.xml.to_xml(), c.held_xml))
                .collect::<Vec<_>>()
                .join("\n")
        ));
    };
    t.newer += usize::from(which == 1);
    if let Some(tc) = thin_check {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), io.image()).unwrap();
        let out = Command::new(tc).arg(f.path()).output().unwrap();
        if !out.status.success() {
            return Err(format!(
                "thin_check: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        t.thin_check += 1;
    }
    // Open it in pdata: the API shows that state, and the pool takes another commit.
    if rng.chance(1, 3) {
        let dev = io.clone();
        let factory = Box::new(move || Box::new(dev.clone()) as Box<dyn BlockIo>);
        let (state, held) = (cands[which].state.clone(), cands[which].held.clone());
        let opts = CacheOpts {
            nr_cache_blocks: 32,
        };
        let mut h = Harness::open(factory, DATA_BLOCK_SIZE, state, held, opts)
            .map_err(|e| format!("open: {e}"))?;
        h.verify_live(rng)?;
        let w = Workload::default();
        for _ in 0..5 {
            let op = h.random_op(&w, rng);
            h.apply(&op)
                .map_err(|e| format!("after reopen, {op:?}: {e}"))?;
        }
        h.apply(&Op::Commit)?;
        let report = check(
            &io,
            &CheckOptions {
                exact_nr_allocated: true,
            },
        );
        if !report.is_clean() {
            return Err(format!("after reopen and commit:\n{report}"));
        }
        t.reopened += 1;
    }
    t.images += 1;
    Ok(())
}

#[test]
fn every_crash_point_opens_at_the_last_commit() {
    let thin_check = require_tool("thin_check");
    let seed = Rng::seed_from_env("PDATA_SEED");
    println!("crash: seed {seed} (PDATA_SEED={seed} replays)");
    let mut t = Tally {
        points: 0,
        images: 0,
        reopened: 0,
        thin_check: 0,
        newer: 0,
    };
    let mut nr_commits = 0;
    for run in 0..3u64 {
        let run_seed = seed.wrapping_add(run);
        let (rec, commits) = record_workload(run_seed, 300);
        nr_commits += commits.len() - 1;
        let mut rng = Rng::new(run_seed ^ 0xC0FFEE);
        for prefix in rec.cut_points() {
            t.points += 1;
            let cands = candidates(&commits, prefix);
            for variant in rec.crash_variants(prefix, 1, &mut rng) {
                let img = rec.crash_image(prefix, &variant);
                let tc = thin_check.as_ref().filter(|_| rng.chance(1, 40));
                if let Err(e) = verify_crash_image(img, &cands, &mut rng, tc, &mut t) {
                    panic!(
                        "seed {run_seed}: crash after {prefix} of {} events, {variant:?}: {e}",
                        rec.nr_events()
                    );
                }
            }
        }
    }
    println!(
        "crash: {} crash points, {} images ({} committed transactions): all clean and at a \
         committed state ({} at the in-flight commit), {} reopened and committed again, {} \
         checked by thin_check",
        t.points, t.images, nr_commits, t.newer, t.reopened, t.thin_check
    );
    assert!(
        t.points > 200,
        "workload too small: {} crash points",
        t.points
    );
    assert!(
        t.newer > 0,
        "no crash landed inside a commit's superblock window"
    );
}

#[test]
fn crash_during_format_leaves_nothing_or_an_empty_pool() {
    let rec = RecordingBlockIo::new(128);
    let dev = rec.clone();
    let meta =
        PoolMetadata::format(Box::new(dev), DATA_BLOCK_SIZE, 1000, CacheOpts::default()).unwrap();
    drop(meta);
    let mut rng = Rng::new(1);
    let (mut opened, mut refused) = (0, 0);
    for prefix in rec.cut_points() {
        for variant in rec.crash_variants(prefix, 2, &mut rng) {
            let img = rec.crash_image(prefix, &variant);
            let io = MemBlockIo::from_image(img).unwrap();
            match PoolMetadata::open(Box::new(io.clone()), DATA_BLOCK_SIZE, CacheOpts::default()) {
                Ok(mut m) => {
                    assert!(m.devices().unwrap().is_empty());
                    assert_eq!(m.data_nr_blocks(), 1000);
                    assert!(check(
                        &io,
                        &CheckOptions {
                            exact_nr_allocated: true
                        }
                    )
                    .is_clean());
                    opened += 1;
                }
                Err(e) => {
                    // Only an image whose superblock never landed may be refused.
                    assert!(
                        !matches!(variant, CrashVariant::AllPersisted) || prefix < rec.nr_events(),
                        "{e}"
                    );
                    refused += 1;
                }
            }
        }
    }
    println!("crash during format: {opened} images opened empty, {refused} refused cleanly");
    assert!(opened > 0 && refused > 0);
}
