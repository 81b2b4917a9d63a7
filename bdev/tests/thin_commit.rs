//! Commit cost contract: a flush (or a periodic commit) with nothing dirty writes no metadata
//! block, whatever clean work came before it; a flush after a mapping change writes exactly one
//! commit (shadowed blocks, then the superblock). Recording bdevs under the metadata and data
//! devices count the writes and flushes each reaches.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bdev::testing::record::{self, LogEntry, RecordBdev};
use bdev::thin::{self, PoolOpts};
use bdev::{malloc, BdevDesc, IoStatus};
use common::{ok, open, Req, Rt};

const DBS: u64 = 64 * 1024;
const BS: u64 = 4096;
const BPD: u64 = DBS / BS;

fn malloc(name: &str, bytes: u64) {
    malloc::create(malloc::MallocOpts {
        name: Some(name.to_string()),
        num_blocks: bytes / 4096,
        block_size: 4096,
        uuid: None,
        optimal_io_boundary: 0,
    })
    .unwrap();
}

/// (writes, flushes) in the log of `r` from entry `from` on.
fn counts(r: &RecordBdev, from: usize) -> (usize, usize) {
    let log = r.log();
    let tail = log.get(from..).unwrap_or_default();
    let writes = tail
        .iter()
        .filter(|e| matches!(e, LogEntry::Write { .. }))
        .count();
    let flushes = tail.iter().filter(|e| **e == LogEntry::Flush).count();
    (writes, flushes)
}

fn io_ok(rt: &Rt, r: usize, d: &Arc<BdevDesc>, req: Req) {
    assert_eq!(rt.io(r, d, req).unwrap().0, IoStatus::Success);
}

/// Flushes through `d` and asserts that the metadata device got no write and no flush while
/// the data device got its flush.
fn assert_clean_flush(rt: &Rt, d: &Arc<BdevDesc>, meta: &RecordBdev, data: &RecordBdev, why: &str) {
    let (m0, d0) = (meta.log_len(), data.log_len());
    io_ok(rt, 1, d, Req::Flush(0, 0));
    assert_eq!(counts(meta, m0), (0, 0), "{why}: metadata written");
    let (_, data_flushes) = counts(data, d0);
    assert!(data_flushes >= 1, "{why}: the data bdev was not flushed");
}

#[test]
fn thin_clean_flush_and_idle_commit_write_no_metadata() {
    let rt = Rt::start(2, true);
    thin::set_runtime(rt.h.clone());
    malloc("cm_data_base", 16 << 20);
    malloc("cm_meta_base", 2 << 20);
    let data = record::create("cm_data", "cm_data_base", None).unwrap();
    let meta = record::create("cm_meta", "cm_meta_base", None).unwrap();
    let opts = |interval_ms| {
        let mut o = PoolOpts::new("cm_pool", "cm_data", "cm_meta");
        o.commit_interval_ms = interval_ms;
        o
    };
    thin::create_pool_blocking(opts(3_600_000)).unwrap();
    thin::create_thin_blocking("cm_pool", "cm_thin", 4 << 20, 4096, None).unwrap();
    let d = open("cm_thin");
    // Creating the thin bdev committed; nothing is dirty now.
    assert_clean_flush(&rt, &d, &meta, &data, "after create");

    // One new mapping: the flush commits once, the superblock (block 0) last.
    let m0 = meta.log_len();
    io_ok(&rt, 0, &d, Req::Write(3, vec![1; BS as usize]));
    io_ok(&rt, 1, &d, Req::Flush(0, 0));
    let log = meta.log();
    let tail = &log[m0..];
    let (writes, flushes) = counts(&meta, m0);
    assert!(writes >= 2, "a commit wrote {writes} metadata blocks");
    assert_eq!(flushes, 2, "one commit = two metadata flushes: {tail:?}");
    let last_write = tail
        .iter()
        .rev()
        .find_map(|e| match e {
            LogEntry::Write { offset_blocks, .. } => Some(*offset_blocks),
            _ => None,
        })
        .unwrap();
    assert_eq!(last_write, 0, "the superblock is the commit's last write");
    assert_clean_flush(&rt, &d, &meta, &data, "second flush");

    // Clean work: reads (mapped and unmapped), overwrites of a mapped block, unmap and
    // write_zeroes of unmapped data blocks, from both reactors.
    for r in 0..2 {
        assert_eq!(ok(rt.io(r, &d, Req::Read(3, 1))), vec![1; BS as usize]);
        assert_eq!(
            ok(rt.io(r, &d, Req::Read(BPD * 5, 2))),
            vec![0; 2 * BS as usize]
        );
        io_ok(&rt, r, &d, Req::Write(4, vec![2; BS as usize]));
        io_ok(&rt, r, &d, Req::Unmap(BPD * 7, BPD));
        io_ok(&rt, r, &d, Req::WriteZeroes(BPD * 9, BPD));
    }
    assert_clean_flush(
        &rt,
        &d,
        &meta,
        &data,
        "after reads, overwrites, no-op unmaps",
    );

    // Reopen with a short commit interval: cold-cache lookups and idle periodic commits write
    // nothing either.
    drop(d);
    thin::delete_pool_blocking("cm_pool").unwrap();
    thin::create_pool_blocking(opts(20)).unwrap();
    let d = open("cm_thin");
    let m0 = meta.log_len();
    for r in 0..2 {
        assert_eq!(ok(rt.io(r, &d, Req::Read(0, BPD))).len(), DBS as usize);
        io_ok(&rt, r, &d, Req::Write(5, vec![3; BS as usize]));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        counts(&meta, m0),
        (0, 0),
        "idle periodic commits wrote metadata"
    );
    assert_clean_flush(&rt, &d, &meta, &data, "after a reopen");

    // A change is committed by the periodic commit, then nothing more.
    let m0 = meta.log_len();
    io_ok(&rt, 0, &d, Req::Write(BPD * 11, vec![4; BS as usize]));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while counts(&meta, m0).1 < 2 {
        assert!(std::time::Instant::now() < deadline, "no periodic commit");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    let (_, flushes) = counts(&meta, m0);
    assert_eq!(flushes, 2, "more than one commit for one change");
    assert_clean_flush(&rt, &d, &meta, &data, "after the periodic commit");
    drop(d);
    thin::delete_pool_blocking("cm_pool").unwrap();
}
