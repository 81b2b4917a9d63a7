//! Commit cost of a thin pool: the latency of a flush (which commits the pool metadata) against
//! the number of mappings changed since the previous commit, and the metadata blocks each
//! commit writes.
//!
//! The thin bdev first gets `--base` mappings (default 262144, at the even thin blocks), so the
//! mapping tree has a realistic size. Then, for each count N (default 0, 1, 100, 10000,
//! 100000) and each sample: provision N more data blocks (one 4 KiB write each, QD 64), flush
//! (measured: submission to completion), then unmap the N blocks and flush again (not
//! measured), so every sample starts from a clean pool with the same mappings. Sequential
//! placement puts the N blocks after the base range (they fill fresh leaves); random placement
//! scatters them over the odd blocks between the base mappings (each touches some leaf of the
//! base tree). N = 0 measures a flush with nothing dirty, which must write no metadata block.
//!
//! The data bdev is a null bdev (data contents do not matter for the commit; the pool reads
//! none). The metadata bdev is a 256 MiB malloc bdev, or a uring bdev on `--meta-file` (a
//! commit then includes the file's flushes). The pool's periodic commit is off.
//!
//! ```text
//! cargo run --release -p bdev --example thin_commit -- [--counts 0,1,100,10000,100000]
//!     [--samples N] [--base N] [--placement seq|rand] [--meta-file PATH] [--core C]
//!     [--interrupt]
//! ```
//!
//! Prints a table and one JSON line per count:
//! `{"changed":N,"samples":S,"p50_us":..,"p99_us":..,"max_us":..,"meta_blocks_per_commit":..}`.

use std::cell::{OnceCell, RefCell};
use std::error::Error;
use std::rc::{Rc, Weak};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bdev::thin::{self, PoolOpts};
use bdev::{malloc, null, uring, BdevDesc, IoBuf, IoCallback, IoDone, IoStatus};
use reactor::{CoreMask, ReactorId, Runtime, RuntimeHandle, RuntimeOptions};

type AnyResult<T> = Result<T, Box<dyn Error>>;

/// 4 KiB thin blocks per 64 KiB data block.
const BPD: u64 = 16;
/// I/Os in flight while provisioning and unmapping.
const QD: usize = 64;

struct Args {
    counts: Vec<u64>,
    samples: Option<usize>,
    base: u64,
    random: bool,
    meta_file: Option<String>,
    core: Option<usize>,
    interrupt: bool,
}

fn parse_args() -> AnyResult<Args> {
    let mut a = Args {
        counts: vec![0, 1, 100, 10_000, 100_000],
        samples: None,
        base: 1 << 18,
        random: false,
        meta_file: None,
        core: None,
        interrupt: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--counts" => {
                a.counts = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("--counts: {e}"))?
            }
            "--samples" => a.samples = Some(value()?.parse()?),
            "--base" => a.base = value()?.parse()?,
            "--placement" => {
                a.random = match value()?.as_str() {
                    "seq" => false,
                    "rand" => true,
                    other => return Err(format!("--placement {other}: seq or rand").into()),
                }
            }
            "--meta-file" => a.meta_file = Some(value()?),
            "--core" => a.core = Some(value()?.parse()?),
            "--interrupt" => a.interrupt = true,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(a)
}

/// Default samples per count: enough for a p99 on small counts, a few on large ones.
fn samples_for(n: u64) -> usize {
    match n {
        0..=100 => 200,
        101..=10_000 => 20,
        _ => 5,
    }
}

/// One kind of I/O for [`run_ios`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Write,
    Unmap,
    Flush,
}

/// Runs `ops` (offsets in 4 KiB blocks) on reactor 0 with up to [`QD`] in flight; returns the
/// number that failed.
fn run_ios(rt: &RuntimeHandle, desc: &Arc<BdevDesc>, op: Op, offsets: Vec<u64>) -> usize {
    struct Driver {
        offsets: Vec<u64>,
        next: usize,
        inflight: usize,
        failed: usize,
        tx: Option<mpsc::Sender<usize>>,
    }
    let (tx, rx) = mpsc::channel();
    let desc = desc.clone();
    rt.send_msg(ReactorId::new(0), move || {
        let ch = desc.get_io_channel().expect("io channel");
        let d = Rc::new(RefCell::new(Driver {
            offsets,
            next: 0,
            inflight: 0,
            failed: 0,
            tx: Some(tx),
        }));
        // The callback refills the queue through a weak handle to itself (no Rc cycle; the
        // channel holds it strongly while an I/O is in flight).
        type SelfRef = OnceCell<Weak<dyn Fn(IoDone)>>;
        let me: Rc<SelfRef> = Rc::default();
        let me2 = me.clone();
        let pump = Rc::new(move |d: &mut Driver, cb: &IoCallback| {
            while d.inflight < QD && d.next < d.offsets.len() {
                let off = d.offsets[d.next];
                d.next += 1;
                let r = match op {
                    Op::Write => ch.write(IoBuf::new(4096), off, 1, 0, cb),
                    Op::Unmap => ch.unmap(off, BPD, 0, cb),
                    Op::Flush => ch.flush(0, 0, 0, cb),
                };
                match r {
                    Ok(()) => d.inflight += 1,
                    Err(_) => d.failed += 1,
                }
            }
            if d.inflight == 0 && d.next == d.offsets.len() {
                if let Some(tx) = d.tx.take() {
                    let _ = tx.send(d.failed);
                }
            }
        });
        let (d2, p2) = (d.clone(), pump.clone());
        let cb: IoCallback = Rc::new(move |done: IoDone| {
            let Some(cb) = me2.get().and_then(Weak::upgrade) else {
                return;
            };
            let mut d = d2.borrow_mut();
            d.inflight -= 1;
            if done.status != IoStatus::Success {
                d.failed += 1;
            }
            p2(&mut d, &cb);
        });
        let _ = me.set(Rc::downgrade(&cb));
        pump(&mut d.borrow_mut(), &cb);
    });
    rx.recv_timeout(Duration::from_secs(600))
        .expect("I/O batch did not finish in 10 minutes")
}

/// Where the changed blocks go: the base mappings are at the even data blocks below
/// `2 * span`.
struct Layout {
    base: u64,
    /// A power of two, at least `base` and the largest count.
    span: u64,
    random: bool,
}

impl Layout {
    /// Thin blocks (4 KiB units) of the first 4 KiB of each of `n` distinct data blocks.
    fn offsets(&self, n: u64, sample: u64) -> Vec<u64> {
        if !self.random {
            return (0..n).map(|i| (2 * self.span + i) * BPD).collect();
        }
        // An odd multiplier modulo a power of two is a bijection: distinct blocks, scattered.
        let start = sample.wrapping_mul(0x9E37_79B9) % self.span;
        (0..n)
            .map(|i| {
                let j = i.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(start) % self.span;
                (2 * j + 1) * BPD
            })
            .collect()
    }

    fn base_offsets(&self) -> Vec<u64> {
        (0..self.base).map(|j| 2 * j * BPD).collect()
    }

    /// Data blocks the thin bdev spans.
    fn virtual_blocks(&self, max: u64) -> u64 {
        2 * self.span + max
    }
}
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[i - 1]
}

fn main() -> AnyResult<()> {
    let a = parse_args()?;
    let max = a.counts.iter().copied().max().unwrap_or(0).max(1);
    let core = a
        .core
        .unwrap_or_else(|| *reactor::cpu::available_cores().last().unwrap_or(&0));
    let mut opts = RuntimeOptions::new(CoreMask::from_cores([core])?);
    opts.interrupt_mode = a.interrupt;
    let rt = Runtime::start(opts, || {})?;
    let h = rt.handle();
    thin::set_runtime(h.clone());

    let layout = Layout {
        base: a.base,
        span: a.base.max(max).next_power_of_two(),
        random: a.random,
    };
    let data_blocks = (a.base + max + 1024) * BPD;
    null::create(null::NullOpts {
        name: "tc_data".into(),
        num_blocks: data_blocks,
        block_size: 4096,
        uuid: None,
    })?;
    let meta_bytes: u64 = 256 << 20;
    match &a.meta_file {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(path)?;
            f.set_len(meta_bytes)?;
            uring::create(uring::UringOpts {
                name: "tc_meta".into(),
                filename: path.clone(),
                block_size: Some(4096),
                uuid: None,
            })?;
        }
        None => {
            malloc::create(malloc::MallocOpts {
                name: Some("tc_meta".into()),
                num_blocks: meta_bytes / 4096,
                block_size: 4096,
                ..Default::default()
            })?;
        }
    }
    let meta = bdev::registry()
        .lookup("tc_meta")
        .ok_or("metadata bdev not registered")?;
    let mut po = PoolOpts::new("tc_pool", "tc_data", "tc_meta");
    po.commit_interval_ms = 24 * 3600 * 1000;
    po.zero_new_blocks = false;
    po.discard_passdown = false;
    thin::create_pool_blocking(po)?;
    let virt = layout.virtual_blocks(max) * BPD * 4096;
    thin::create_thin_blocking("tc_pool", "tc_thin", virt, 4096, None)?;
    let desc = Arc::new(BdevDesc::open("tc_thin", true, |_| {})?);
    let t0 = Instant::now();
    if run_ios(&h, &desc, Op::Write, layout.base_offsets()) + run_ios(&h, &desc, Op::Flush, vec![0])
        > 0
    {
        return Err("provisioning the base mappings failed".into());
    }
    let base_secs = t0.elapsed().as_secs_f64();

    println!(
        "# thin_commit: metadata on {}, {} base mappings ({base_secs:.1} s), {} placement, \
         reactor on core {core}{}",
        a.meta_file.as_deref().unwrap_or("malloc"),
        a.base,
        if a.random { "random" } else { "sequential" },
        if a.interrupt { " (interrupt mode)" } else { "" }
    );
    println!(
        "{:>10} {:>8} {:>12} {:>12} {:>12} {:>16}",
        "changed", "samples", "p50 us", "p99 us", "max us", "meta blocks/commit"
    );
    for &n in &a.counts {
        let samples = a.samples.unwrap_or_else(|| samples_for(n));
        let mut lat = Vec::with_capacity(samples);
        let mut meta_writes = 0u64;
        for s in 0..samples {
            let offs = layout.offsets(n, s as u64);
            let failed = run_ios(&h, &desc, Op::Write, offs.clone());
            if failed > 0 {
                return Err(format!("{failed} of {n} provisioning writes failed").into());
            }
            let before = meta.core().iostat().write.ops;
            let t0 = Instant::now();
            if run_ios(&h, &desc, Op::Flush, vec![0]) > 0 {
                return Err("flush failed".into());
            }
            lat.push(t0.elapsed());
            meta_writes += meta.core().iostat().write.ops - before;
            let unmaps = offs.iter().map(|o| o - o % BPD).collect();
            if run_ios(&h, &desc, Op::Unmap, unmaps) + run_ios(&h, &desc, Op::Flush, vec![0]) > 0 {
                return Err("cleanup unmap/flush failed".into());
            }
        }
        lat.sort();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let (p50, p99, pmax) = (
            us(percentile(&lat, 0.50)),
            us(percentile(&lat, 0.99)),
            us(percentile(&lat, 1.0)),
        );
        let per_commit = meta_writes as f64 / samples as f64;
        println!("{n:>10} {samples:>8} {p50:>12.0} {p99:>12.0} {pmax:>12.0} {per_commit:>16.1}");
        println!(
            "{{\"changed\":{n},\"samples\":{samples},\"p50_us\":{p50:.1},\"p99_us\":{p99:.1},\
             \"max_us\":{pmax:.1},\"meta_blocks_per_commit\":{per_commit:.1}}}"
        );
    }
    drop(desc);
    thin::delete_pool_blocking("tc_pool")?;
    rt.stop_handle().stop();
    rt.join()?;
    Ok(())
}
