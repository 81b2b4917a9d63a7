//! Data-path cost of a provisioned thin bdev over malloc against the malloc bdev alone, for
//! instruction counting: one reactor keeps QD 128 random 4 KiB reads or writes in flight until
//! `COUNT` I/Os completed, then prints the rate.
//!
//! ```text
//! cargo build --release -p bdev --example thin_iops
//! valgrind --tool=callgrind target/release/examples/thin_iops thin randwrite 200000
//! ```
//!
//! Arguments: `malloc|thin` (default thin), `randread|randwrite` (default randwrite), `COUNT`
//! (default 1,000,000), `poll|interrupt` (reactor mode, default poll; valgrind cannot run
//! interrupt mode's ring waits). Under callgrind, compare the inclusive cost of the data-path
//! entry points (the bdev channel's submit and poll) per I/O between `malloc` and `thin`: the
//! idle ticks a polling reactor spins while setup waits are not part of them.

use std::cell::{Cell, OnceCell};
use std::rc::{Rc, Weak};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bdev::thin::{self, PoolOpts};
use bdev::{malloc, BdevDesc, IoBuf, IoCallback, IoDone, IoStatus};
use reactor::{CoreMask, ReactorId, Runtime, RuntimeOptions};

const BS: u64 = 4096;
const QD: u64 = 128;
const SIZE: u64 = 64 << 20;

fn malloc_bdev(name: &str, bytes: u64) {
    malloc::create(malloc::MallocOpts {
        name: Some(name.into()),
        num_blocks: bytes / BS,
        block_size: BS as u32,
        uuid: None,
        optimal_io_boundary: 0,
    })
    .expect("malloc bdev");
}

/// Runs `count` I/Os at QD 128 from the current reactor; `tx` gets the rate.
fn run(desc: &BdevDesc, write: bool, count: u64, tx: mpsc::Sender<f64>) {
    let ch = desc.get_io_channel().expect("channel");
    let nb = desc.bdev().num_blocks();
    let submitted = Rc::new(Cell::new(0u64));
    let completed = Rc::new(Cell::new(0u64));
    let seed = Rc::new(Cell::new(0x9e37_79b9_7f4a_7c15u64));
    let start = Instant::now();
    let next = move || {
        let mut x = seed.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        seed.set(x);
        x % nb
    };
    type SelfRef = OnceCell<Weak<dyn Fn(IoDone)>>;
    let me: Rc<SelfRef> = Rc::default();
    let (me2, ch2, s2, c2) = (me.clone(), ch.clone(), submitted.clone(), completed.clone());
    let submit = Rc::new(move |buf: IoBuf, cb: &IoCallback| {
        s2.set(s2.get() + 1);
        let off = next();
        let r = if write {
            ch2.write(buf, off, 1, 0, cb)
        } else {
            ch2.read(buf, off, 1, 0, cb)
        };
        assert!(r.is_ok(), "submit failed");
    });
    let submit2 = submit.clone();
    let cb: IoCallback = Rc::new(move |d: IoDone| {
        assert_eq!(d.status, IoStatus::Success);
        c2.set(c2.get() + 1);
        if c2.get() == count {
            let _ = tx.send(count as f64 / start.elapsed().as_secs_f64());
        }
        let Some(cb) = me2.get().and_then(Weak::upgrade) else {
            return;
        };
        if submitted.get() < count {
            submit2(d.buf.expect("buffer back"), &cb);
        }
    });
    let _ = me.set(Rc::downgrade(&cb));
    for _ in 0..QD.min(count) {
        submit(IoBuf::alloc(BS as usize), &cb);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let kind = args.get(1).map_or("thin", String::as_str).to_string();
    let write = args.get(2).map_or("randwrite", String::as_str) != "randread";
    let count: u64 = args
        .get(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let core = *reactor::cpu::available_cores().last().expect("a core");
    let mut opts = RuntimeOptions::new(CoreMask::from_cores([core]).expect("core mask"));
    opts.interrupt_mode = args.get(4).is_some_and(|m| m == "interrupt");
    let rt = Runtime::start(opts, || {}).expect("runtime");
    let h = rt.handle();
    thin::set_runtime(h.clone());
    let name = if kind == "malloc" {
        malloc_bdev("ti_base", SIZE);
        "ti_base"
    } else {
        malloc_bdev("ti_data", SIZE + (4 << 20));
        malloc_bdev("ti_meta", 4 << 20);
        thin::create_pool_blocking(PoolOpts::new("ti_pool", "ti_data", "ti_meta")).expect("pool");
        thin::create_thin_blocking("ti_pool", "ti_thin", SIZE, BS as u32, None).expect("thin");
        "ti_thin"
    };
    let desc = Arc::new(BdevDesc::open(name, true, |_| {}).expect("open"));
    // Write everything once: thin blocks provisioned, malloc pages touched.
    let d2 = desc.clone();
    let (ptx, prx) = mpsc::channel();
    h.send_msg(ReactorId::new(0), move || {
        let ch = d2.get_io_channel().expect("channel");
        let left = Rc::new(Cell::new(SIZE / (256 * BS)));
        let keep = ch.clone();
        let cb: IoCallback = Rc::new(move |d: IoDone| {
            let _channel_alive_until_done = &keep;
            assert_eq!(d.status, IoStatus::Success);
            left.set(left.get() - 1);
            if left.get() == 0 {
                let _ = ptx.send(());
            }
        });
        for off in (0..SIZE / BS).step_by(256) {
            let buf = IoBuf::from_slice(&vec![1u8; (256 * BS) as usize]);
            ch.write(buf, off, 256, 0, &cb).expect("provisioning write");
        }
    });
    prx.recv_timeout(Duration::from_secs(120))
        .expect("provisioning");
    let (tx, rx) = mpsc::channel();
    let d3 = desc.clone();
    h.send_msg(ReactorId::new(0), move || run(&d3, write, count, tx));
    let iops = rx.recv_timeout(Duration::from_secs(600)).expect("run");
    println!(
        "{kind} {} 4KiB QD{QD}: {count} I/Os, {iops:.0} IOPS",
        if write { "randwrite" } else { "randread" }
    );
    std::thread::sleep(Duration::from_millis(50));
    drop(desc);
    if kind != "malloc" {
        thin::delete_pool_blocking("ti_pool").expect("close pool");
    }
    rt.stop_handle().stop();
    rt.join().expect("join");
}
