//! The thin pool's model test, shared by bdev's own tests (data on a malloc bdev) and the NVMe
//! initiator's (data on a remote namespace): random writes, reads, unmaps, write zeroes,
//! flushes, snapshots, deletes and resizes on several thin bdevs from two reactors, every read
//! compared with an in-memory model; then the pool is closed, its metadata checked (pdata's
//! checker and thin_check when installed), reopened, and everything read back again.
//! Included with `#[path]` next to `mod common` (bdev/tests/common).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use bdev::thin::{self, PoolOpts};
use bdev::{malloc, BdevDesc, IoStatus};
use pdata::testing::Rng;

use crate::common::{ok, open, Req, Rt};

pub const DBS: u64 = 64 * 1024;
pub const BS: u64 = 4096;

pub fn malloc(name: &str, bytes: u64, bs: u32) {
    malloc::create(malloc::MallocOpts {
        name: Some(name.to_string()),
        num_blocks: bytes / u64::from(bs),
        block_size: bs,
        uuid: None,
        optimal_io_boundary: 0,
    })
    .unwrap();
}

/// Reads the whole bdev `name` through reactor 0.
pub fn read_all(rt: &Rt, name: &str) -> Vec<u8> {
    let d = Arc::new(BdevDesc::open(name, false, |_| {}).unwrap());
    let bs = u64::from(d.bdev().block_size());
    let n = d.bdev().num_blocks();
    let mut out = Vec::new();
    let chunk = (1 << 20) / bs;
    let mut off = 0;
    while off < n {
        let k = chunk.min(n - off);
        out.extend(ok(rt.io(0, &d, Req::Read(off, k))));
        off += k;
    }
    out
}

/// pdata's checker (and thin_check if present) on the metadata bdev's image.
pub fn check_metadata(rt: &Rt, meta: &str) {
    let image = read_all(rt, meta);
    let io = pdata::MemBlockIo::from_image(image.clone()).unwrap();
    let rep = pdata::thin::check::check(&io, &pdata::thin::check::CheckOptions::default());
    assert!(rep.is_clean(), "metadata check failed:\n{rep}");
    if let Some(tool) = pdata::testing::require_tool("thin_check") {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), &image).unwrap();
        let out = std::process::Command::new(tool)
            .arg(f.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "thin_check failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

pub fn pool_opts(name: &str, data: &str, meta: &str) -> PoolOpts {
    let mut o = PoolOpts::new(name, data, meta);
    o.commit_interval_ms = 50;
    o
}

pub fn write(rt: &Rt, r: usize, d: &Arc<BdevDesc>, off: u64, data: Vec<u8>) -> IoStatus {
    rt.io(r, d, Req::Write(off, data)).unwrap().0
}

pub fn flush(rt: &Rt, r: usize, d: &Arc<BdevDesc>) {
    assert_eq!(rt.io(r, d, Req::Flush(0, 0)).unwrap().0, IoStatus::Success);
}

/// Runs the model on a pool over the bdevs `data` (at least 32 MiB) and `meta` (at least
/// 4 MiB, first block zero), through both reactors of `rt`. The seed comes from THIN_SEED.
pub fn run_model(rt: &Rt, data: &str, meta: &str) {
    thin::set_runtime(rt.h.clone());
    thin::create_pool_blocking(pool_opts("tm_pool", data, meta)).unwrap();
    let size = 2 << 20; // 32 data blocks per thin
    let mut names = Vec::new();
    for i in 0..2 {
        let n = format!("tm_thin{i}");
        thin::create_thin_blocking("tm_pool", &n, size, 4096, None).unwrap();
        names.push(n);
    }
    let mut model: BTreeMap<String, Vec<u8>> = names
        .iter()
        .map(|n| (n.clone(), vec![0u8; size as usize]))
        .collect();
    let mut descs: BTreeMap<String, Arc<BdevDesc>> =
        names.iter().map(|n| (n.clone(), open(n))).collect();
    let seed = Rng::seed_from_env("THIN_SEED");
    let mut rng = Rng::new(seed);
    let mut nr_snaps = 0;
    for step in 0..600 {
        let keys: Vec<String> = model.keys().cloned().collect();
        let name = keys[rng.below(keys.len() as u64) as usize].clone();
        let d = descs[&name].clone();
        let r = rng.below(2) as usize;
        let nblocks = model[&name].len() as u64 / BS;
        let trace = std::env::var("THIN_TRACE").is_ok();
        let op = rng.below(100);
        if trace {
            eprintln!("step {step} op {op} on {name} via r{r}");
        }
        match op {
            0..=39 => {
                let len = 1 + rng.below(24);
                let off = rng.below(nblocks - len + 1);
                let data: Vec<u8> = (0..len * BS).map(|_| rng.below(256) as u8).collect();
                if trace {
                    eprintln!("  write {off}+{len}");
                }
                assert_eq!(
                    write(rt, r, &d, off, data.clone()),
                    IoStatus::Success,
                    "step {step}"
                );
                let m = model.get_mut(&name).unwrap();
                m[(off * BS) as usize..((off + len) * BS) as usize].copy_from_slice(&data);
            }
            40..=69 => {
                let len = 1 + rng.below(32);
                let off = rng.below(nblocks - len + 1);
                let got = ok(rt.io(r, &d, Req::Read(off, len)));
                let m = &model[&name];
                let want = &m[(off * BS) as usize..((off + len) * BS) as usize];
                let first = got.iter().zip(want).position(|(a, b)| a != b);
                assert!(
                    first.is_none(),
                    "seed {seed} step {step}: read mismatch on {name} at {off}+{len}, \
                     first differing byte {first:?} (block {:?})",
                    first.map(|f| off + f as u64 / BS)
                );
            }
            70..=77 => {
                // Unmap / write_zeroes: whole data blocks become zero; partial unmap ranges
                // are ignored; partial write_zeroes ranges are zeroed.
                let zeroes = rng.chance(1, 2);
                let len = 1 + rng.below(40);
                let off = rng.below(nblocks - len + 1);
                let req = if zeroes {
                    Req::WriteZeroes(off, len)
                } else {
                    Req::Unmap(off, len)
                };
                assert_eq!(rt.io(r, &d, req).unwrap().0, IoStatus::Success);
                let m = model.get_mut(&name).unwrap();
                let bpd = DBS / BS;
                for b in off..off + len {
                    let whole = {
                        let vb = b / bpd;
                        vb * bpd >= off && (vb + 1) * bpd <= off + len
                    };
                    if zeroes || whole {
                        m[(b * BS) as usize..((b + 1) * BS) as usize].fill(0);
                    }
                }
            }
            78..=84 => flush(rt, r, &d),
            85..=89 if nr_snaps < 4 => {
                nr_snaps += 1;
                let s = format!("{name}_s{step}");
                thin::snapshot_blocking(&name, &s).unwrap();
                let img = model[&name].clone();
                model.insert(s.clone(), img);
                descs.insert(s.clone(), open(&s));
            }
            90..=92 if model.len() > 2 => {
                descs.remove(&name);
                thin::delete_thin_blocking(&name).unwrap();
                model.remove(&name);
            }
            93..=95 => {
                // Grow a thin bdev by one data block.
                drop(descs.remove(&name));
                let m = model.get_mut(&name).unwrap();
                let new = m.len() as u64 + DBS;
                if new <= 4 << 20 {
                    thin::resize_thin_blocking(&name, new).unwrap();
                    m.resize(new as usize, 0);
                }
                descs.insert(name.clone(), open(&name));
            }
            _ => {
                let st = thin::pool_status_blocking("tm_pool").unwrap();
                assert_eq!(st["mode"], "rw");
            }
        }
    }
    // Everything reads back, then again after closing and reopening the pool.
    let verify = |model: &BTreeMap<String, Vec<u8>>| {
        for (n, m) in model {
            let d = open(n);
            let nb = m.len() as u64 / BS;
            let got = ok(rt.io(1, &d, Req::Read(0, nb)));
            assert!(got == *m, "seed {seed}: final contents of {n} differ");
        }
    };
    verify(&model);
    let st = thin::pool_status_blocking("tm_pool").unwrap();
    assert_eq!(st["thins"].as_array().unwrap().len(), model.len());
    drop(descs);
    thin::delete_pool_blocking("tm_pool").unwrap();
    assert!(bdev::registry().lookup("tm_thin0").is_none() || !model.contains_key("tm_thin0"));
    check_metadata(rt, meta);
    thin::create_pool_blocking(pool_opts("tm_pool", data, meta)).unwrap();
    for n in model.keys() {
        assert!(
            bdev::registry().lookup(n).is_some(),
            "{n} not re-registered"
        );
    }
    verify(&model);
    thin::delete_pool_blocking("tm_pool").unwrap();
    check_metadata(rt, meta);
}
