//! Crash consistency of the thin pool at the bdev level: the pool runs on recording bdevs
//! (metadata and data); for every prefix of the metadata log — and subsets/torn variants of
//! the unflushed metadata writes after the last flush in it — the metadata opens, passes
//! pdata's checker (and /usr/sbin/thin_check on a sample), its label table names the thin
//! bdev, and every block acknowledged before the last completed flush reads back its data.
//! A sample of crash images is also reopened as a live pool through the bdev layer.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use bdev::testing::record::{self, LogEntry, RecordBdev};
use bdev::thin::{self, PoolOpts, LABEL_DEV};
use bdev::{malloc, IoStatus};
use common::{ok, open, Req, Rt};
use pdata::testing::Rng;
use pdata::thin::{CacheOpts, DevId, PoolMetadata, ThinBlock};

const DBS: u64 = 64 * 1024;
const BS: u64 = 4096;
const BPD: u64 = DBS / BS;
const THIN_BYTES: u64 = 1 << 20;
const NR_THIN_BLOCKS: u64 = THIN_BYTES / BS;

fn malloc(name: &str, bytes: u64) {
    malloc::create(malloc::MallocOpts {
        name: Some(name.to_string()),
        num_blocks: bytes / BS,
        block_size: BS as u32,
        uuid: None,
        optimal_io_boundary: 0,
    })
    .unwrap();
}

/// One workload step, as seen by the crash checker.
struct Step {
    meta_len: usize,
    data_len: usize,
    /// A flush or control operation: everything before it is committed when it completes.
    durable: bool,
    /// Thin blocks written or unmapped by this step.
    touched: Vec<u64>,
}

/// Metadata crash image after `prefix` log entries; `variant` picks unflushed writes:
/// 0 = all, 1 = none, 2.. = random subset, u32::MAX = torn (a random non-superblock write
/// keeps its first sectors; the superblock is assumed written atomically, as dm-thin does).
fn meta_image(
    log: &[LogEntry],
    base: &[u8],
    prefix: usize,
    variant: u32,
    rng: &mut Rng,
) -> Vec<u8> {
    let head = &log[..prefix];
    let synced = head
        .iter()
        .rposition(|e| *e == LogEntry::Flush)
        .map_or(0, |i| i + 1);
    let mut img = base.to_vec();
    let apply = |img: &mut Vec<u8>, e: &LogEntry, limit: Option<usize>| {
        if let LogEntry::Write {
            offset_blocks,
            data,
        } = e
        {
            let off = (*offset_blocks * BS) as usize;
            let n = limit.unwrap_or(data.len()).min(data.len());
            img[off..off + n].copy_from_slice(&data[..n]);
        }
    };
    for e in &head[..synced] {
        apply(&mut img, e, None);
    }
    let torn_at = if variant == u32::MAX {
        let n = head.len() - synced;
        (n > 0).then(|| synced + rng.below(n as u64) as usize)
    } else {
        None
    };
    for (i, e) in head.iter().enumerate().skip(synced) {
        let is_sb = matches!(
            e,
            LogEntry::Write {
                offset_blocks: 0,
                ..
            }
        );
        match variant {
            0 => apply(&mut img, e, None),
            1 => {}
            u32::MAX => match torn_at {
                Some(t) if i < t => apply(&mut img, e, None),
                Some(t) if i == t && !is_sb => {
                    apply(&mut img, e, Some(512 * (1 + rng.below(7) as usize)))
                }
                Some(t) if i == t => apply(&mut img, e, None),
                _ => {}
            },
            _ => {
                if rng.chance(1, 2) {
                    apply(&mut img, e, None)
                }
            }
        }
    }
    img
}

/// Checks one crash image pair; returns the problem, if any.
fn check_crash(
    meta: Vec<u8>,
    data: &[u8],
    expect: &[u8],
    skip: &BTreeSet<u64>,
    run_thin_check: bool,
) -> Result<(), String> {
    let io = pdata::MemBlockIo::from_image(meta.clone()).map_err(|e| e.to_string())?;
    let rep = pdata::thin::check::check(&io, &pdata::thin::check::CheckOptions::default());
    if !rep.is_clean() {
        return Err(format!("pdata check: {rep}"));
    }
    if run_thin_check {
        if let Some(tool) = pdata::testing::require_tool("thin_check") {
            let f = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(f.path(), &meta).unwrap();
            let out = std::process::Command::new(tool)
                .arg(f.path())
                .output()
                .unwrap();
            if !out.status.success() {
                return Err(format!(
                    "thin_check: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
    }
    let mut pmd = PoolMetadata::open(Box::new(io), (DBS / 512) as u32, CacheOpts::default())
        .map_err(|e| format!("open: {e}"))?;
    let l = pmd
        .find_block(DevId(LABEL_DEV), ThinBlock(0))
        .map_err(|e| e.to_string())?
        .ok_or("no label block")?;
    let off = (l.data_block.0 * DBS) as usize;
    let labels = thin::parse_label_block(&data[off..off + DBS as usize])?;
    let (&id, _) = labels
        .iter()
        .find(|(_, (n, _, _))| n == "ct_thin")
        .ok_or("ct_thin missing from the label table")?;
    for b in 0..NR_THIN_BLOCKS {
        if skip.contains(&b) {
            continue;
        }
        let want = &expect[(b * BS) as usize..((b + 1) * BS) as usize];
        let got = match pmd
            .find_block(DevId(id), ThinBlock(b / BPD))
            .map_err(|e| e.to_string())?
        {
            None => vec![0u8; BS as usize],
            Some(l) => {
                let o = (l.data_block.0 * DBS + (b % BPD) * BS) as usize;
                data[o..o + BS as usize].to_vec()
            }
        };
        if got != want {
            return Err(format!("thin block {b} does not read back"));
        }
    }
    Ok(())
}

#[test]
fn thin_crash_consistency_every_metadata_prefix() {
    let rt = Rt::start(2, true);
    thin::set_runtime(rt.h.clone());
    malloc("ct_meta_base", 1 << 20);
    malloc("ct_data_base", 192 * DBS); // above the reserve floor: shards get batches
    let meta: Arc<RecordBdev> = record::create("ct_meta", "ct_meta_base", None).unwrap();
    let data: Arc<RecordBdev> = record::create("ct_data", "ct_data_base", None).unwrap();
    let mut o = PoolOpts::new("ct_pool", "ct_data", "ct_meta");
    o.commit_interval_ms = 3_600_000; // commits only on flush / control operations
    thin::create_pool_blocking(o).unwrap();
    thin::create_thin_blocking("ct_pool", "ct_thin", THIN_BYTES, BS as u32, None).unwrap();
    let d = open("ct_thin");
    let seed = Rng::seed_from_env("THIN_CRASH_SEED");
    let mut rng = Rng::new(seed);
    let mut model = vec![0u8; THIN_BYTES as usize];
    let mut steps = vec![Step {
        meta_len: meta.log_len(),
        data_len: data.log_len(),
        durable: true,
        touched: Vec::new(),
    }];
    let mut models = vec![model.clone()];
    let mut nr_snaps = 0;
    // At least 160 operations, and on until the metadata log holds 260 entries (5 images each:
    // comfortably over the 1,000 crash points asked for, whatever the seed), 800 at most.
    for i in 0..800 {
        if i >= 160 && meta.log_len() - steps[0].meta_len >= 260 {
            break;
        }
        let r = rng.below(2) as usize;
        let mut touched = Vec::new();
        let mut durable = false;
        match rng.below(10) {
            0..=5 => {
                let len = if rng.chance(1, 3) {
                    BPD
                } else {
                    1 + rng.below(6)
                };
                let off = if len == BPD {
                    rng.below(NR_THIN_BLOCKS / BPD) * BPD
                } else {
                    rng.below(NR_THIN_BLOCKS - len + 1)
                };
                let buf: Vec<u8> = (0..len * BS).map(|_| rng.below(256) as u8).collect();
                let st = rt.io(r, &d, Req::Write(off, buf.clone())).unwrap().0;
                assert_eq!(st, IoStatus::Success);
                model[(off * BS) as usize..((off + len) * BS) as usize].copy_from_slice(&buf);
                touched.extend(off..off + len);
            }
            6 => {
                let vb = rng.below(NR_THIN_BLOCKS / BPD);
                let st = rt.io(r, &d, Req::Unmap(vb * BPD, BPD)).unwrap().0;
                assert_eq!(st, IoStatus::Success);
                model[(vb * DBS) as usize..((vb + 1) * DBS) as usize].fill(0);
                touched.extend(vb * BPD..(vb + 1) * BPD);
            }
            7 if nr_snaps < 3 => {
                nr_snaps += 1;
                thin::snapshot_blocking("ct_thin", &format!("ct_snap{nr_snaps}")).unwrap();
                durable = true;
            }
            _ => {
                assert_eq!(rt.io(r, &d, Req::Flush(0, 0)).unwrap().0, IoStatus::Success);
                durable = true;
            }
        }
        steps.push(Step {
            meta_len: meta.log_len(),
            data_len: data.log_len(),
            durable,
            touched,
        });
        models.push(model.clone());
    }
    assert_eq!(rt.io(0, &d, Req::Flush(0, 0)).unwrap().0, IoStatus::Success);
    steps.push(Step {
        meta_len: meta.log_len(),
        data_len: data.log_len(),
        durable: true,
        touched: Vec::new(),
    });
    models.push(model.clone());
    drop(d);

    let meta_log = meta.log();
    let data_log = data.log();
    let base = vec![0u8; 1 << 20];
    let first = steps[0].meta_len;
    let mut nr_checked = 0;
    let mut data_cache: Option<(usize, Vec<u8>, Vec<u8>)> = None;
    let mut samples = Vec::new();
    for p in first..=meta_log.len() {
        // The step during which the crash happens, and the last completed durable step.
        let s = steps.iter().position(|st| st.meta_len >= p).unwrap();
        let f = (0..=s)
            .rev()
            .find(|&i| steps[i].durable && steps[i].meta_len <= p)
            .unwrap();
        let skip: BTreeSet<u64> = steps[f + 1..=s]
            .iter()
            .flat_map(|st| st.touched.iter().copied())
            .collect();
        if data_cache
            .as_ref()
            .is_none_or(|(n, _, _)| *n != steps[s].data_len)
        {
            let n = steps[s].data_len;
            let synced = data_log[..n]
                .iter()
                .rposition(|e| *e == LogEntry::Flush)
                .map_or(0, |i| i + 1);
            data_cache = Some((n, data.materialize(n), data.materialize(synced)));
        }
        let (_, data_all, data_synced) = data_cache.as_ref().unwrap();
        for variant in [0, 1, 2, 3, u32::MAX] {
            let img = meta_image(&meta_log, &base, p, variant, &mut rng);
            // Unflushed data writes all persisted, or all lost.
            let data_img = if variant == 1 || variant == u32::MAX {
                data_synced
            } else {
                data_all
            };
            let sample = nr_checked % 250 == 0;
            if let Err(e) = check_crash(img.clone(), data_img, &models[f], &skip, sample) {
                panic!("seed {seed}: crash after metadata entry {p} (variant {variant}): {e}");
            }
            if sample && samples.len() < 3 && skip.is_empty() {
                samples.push((img, data_img.clone(), models[f].clone()));
            }
            nr_checked += 1;
        }
    }
    println!("thin crash consistency: {nr_checked} crash images checked (seed {seed})");
    assert!(nr_checked >= 1000, "only {nr_checked} crash points");
    thin::delete_pool_blocking("ct_pool").unwrap();

    // A sample of crash images reopened as live pools.
    for (i, (m, dimg, expect)) in samples.into_iter().enumerate() {
        let (mn, dn) = (format!("ctr_meta{i}"), format!("ctr_data{i}"));
        malloc(&mn, m.len() as u64);
        malloc(&dn, dimg.len() as u64);
        let (md, dd) = (open(&mn), open(&dn));
        for (desc, img) in [(&md, &m), (&dd, &dimg)] {
            for (j, chunk) in img.chunks(1 << 20).enumerate() {
                let off = j as u64 * (1 << 20) / BS;
                assert_eq!(
                    rt.io(0, desc, Req::Write(off, chunk.to_vec())).unwrap().0,
                    IoStatus::Success
                );
            }
        }
        drop((md, dd));
        let pool = format!("ctr_pool{i}");
        thin::create_pool_blocking(PoolOpts::new(&pool, &dn, &mn)).unwrap();
        let t = open("ct_thin");
        assert!(
            ok(rt.io(1, &t, Req::Read(0, NR_THIN_BLOCKS))) == expect,
            "sample {i} differs"
        );
        drop(t);
        thin::delete_pool_blocking(&pool).unwrap();
    }
}
