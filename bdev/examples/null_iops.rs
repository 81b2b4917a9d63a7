//! Measures the bdev layer's per-I/O cost: one reactor (poll mode) keeps `QD` I/Os in flight
//! on a null (or malloc) bdev for a few seconds and prints IOPS.
//!
//! `cargo run --release -p bdev --example null_iops -- [null|malloc] [seconds] [qd] [io_kib]`

use std::cell::{Cell, OnceCell};
use std::rc::{Rc, Weak};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bdev::{malloc, null, BdevDesc, IoBuf, IoCallback, IoDone};
use reactor::{CoreMask, Runtime, RuntimeOptions};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let kind = args.get(1).map_or("null", String::as_str).to_string();
    let secs: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let qd: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(128);
    let io_kib: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(4);
    let bs = 4096u32;
    let blocks_per_io = io_kib * 1024 / u64::from(bs);
    let num_blocks = 1u64 << 18; // 1 GiB of 4 KiB blocks
    match kind.as_str() {
        "malloc" => malloc::create(malloc::MallocOpts {
            name: Some("bench0".into()),
            num_blocks,
            block_size: bs,
            ..Default::default()
        })
        .map(|_| ()),
        _ => null::create(null::NullOpts {
            name: "bench0".into(),
            num_blocks,
            block_size: bs,
            uuid: None,
        })
        .map(|_| ()),
    }
    .expect("create bdev");
    let core = *reactor::cpu::available_cores().last().expect("a core");
    let opts = RuntimeOptions::new(CoreMask::from_cores([core]).unwrap());
    let (tx, rx) = mpsc::channel();
    let rt = Runtime::start(opts, move || {
        let desc = BdevDesc::open("bench0", true, |_| {}).unwrap();
        let ch = desc.get_io_channel().unwrap();
        let done = Rc::new(Cell::new(0u64));
        let stop = Rc::new(Cell::new(false));
        let start = Instant::now();
        let (d, s, c) = (done.clone(), stop.clone(), ch.clone());
        let span = num_blocks / blocks_per_io;
        // The callback resubmits through a weak handle to itself (no Rc cycle).
        type SelfRef = OnceCell<Weak<dyn Fn(IoDone)>>;
        let me: Rc<SelfRef> = Rc::default();
        let me2 = me.clone();
        let cb: IoCallback = Rc::new(move |io: IoDone| {
            let n = d.get() + 1;
            d.set(n);
            if s.get() {
                return;
            }
            let Some(cb) = me2.get().and_then(Weak::upgrade) else {
                return;
            };
            let off = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20) % span * blocks_per_io;
            let buf = io.buf.expect("read returns its buffer");
            c.read(buf, off, blocks_per_io, 0, &cb).expect("resubmit");
        });
        let _ = me.set(Rc::downgrade(&cb));
        for i in 0..qd {
            let buf = IoBuf::alloc((blocks_per_io * u64::from(bs)) as usize);
            ch.read(buf, i * blocks_per_io, blocks_per_io, 0, &cb)
                .unwrap();
        }
        let cb_keep = cb.clone();
        reactor::after(Duration::from_secs(secs), move || {
            stop.set(true);
            let elapsed = start.elapsed().as_secs_f64();
            let iops = done.get() as f64 / elapsed;
            // CPU time of this reactor thread: on a shared machine the wall-clock rate
            // understates what one dedicated core does.
            let cpu = reactor::stats(reactor::current()).cpu_time.as_secs_f64();
            tx.send((iops, elapsed, done.get() as f64 / cpu.max(1e-9)))
                .unwrap();
            drop(cb_keep);
            drop(desc);
            reactor::request_stop();
        });
    })
    .expect("start reactor");
    let (iops, elapsed, per_cpu) = rx.recv().unwrap();
    println!(
        "{kind}: {:.2} M IOPS wall, {:.2} M IOPS per reactor CPU-second \
         ({io_kib} KiB reads, qd {qd}, 1 reactor on core {core}, {elapsed:.1} s)",
        iops / 1e6,
        per_cpu / 1e6,
    );
    rt.join().unwrap();
}
