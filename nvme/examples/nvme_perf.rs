//! Protocol cost of the NVMe/TCP host + target pair: 4 KiB random reads (or writes) at a
//! queue depth for a few seconds on one reactor, once straight on a malloc bdev and once on
//! the same bdev through our target and host over loopback; prints both IOPS and the ratio.
//!
//! `cargo run --release -p nvme --example nvme_perf -- [randread|randwrite|verify] [QD] [SECONDS]`
//!
//! `verify` runs on both reactors at once over NVMe/TCP only: each of the QD slots of a
//! reactor owns its own blocks, writes a fresh pattern, reads it back and compares.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bdev::{BdevDesc, IoBuf, IoCallback, IoDone, IoStatus};
use reactor::{CoreMask, ReactorId, Runtime, RuntimeOptions};
use serde_json::{json, Value};

const NUM_BLOCKS: u64 = 65536;

fn call<H>(
    methods: Vec<(&'static str, H)>,
    method: &str,
    params: Value,
    f: impl Fn(&H, Value, mpsc::Sender<String>),
) -> String {
    let (_, h) = methods
        .into_iter()
        .find(|(m, _)| *m == method)
        .expect("method");
    let (tx, rx) = mpsc::channel();
    f(&h, params, tx);
    rx.recv_timeout(Duration::from_secs(30))
        .expect("rpc answered")
}

fn nvmf(method: &str, params: Value) {
    let r = call(nvmf::rpc_methods(), method, params, |h, p, tx| {
        h(
            p,
            Box::new(move |r| tx.send(format!("{r:?}")).expect("send")),
        )
    });
    assert!(r.starts_with("Ok"), "{method}: {r}");
}

/// Runs the workload on reactor 1; returns IOPS.
fn run(rt: &reactor::RuntimeHandle, bdev: &str, write: bool, qd: u64, secs: u64) -> f64 {
    let (tx, rx) = mpsc::channel();
    let bdev = bdev.to_owned();
    rt.send_msg(ReactorId::new(1), move || {
        let desc = BdevDesc::open(&bdev, true, |_| {}).expect("open");
        let ch = desc.get_io_channel().expect("channel");
        let done = Rc::new(Cell::new(0u64));
        let seed = Rc::new(Cell::new(12345u64));
        let end = Instant::now() + Duration::from_secs(secs);
        let start = Instant::now();
        let left = Rc::new(Cell::new(qd));
        let tx = RefCell::new(Some(tx));
        let keep = Rc::new(RefCell::new(Some((desc, ch.clone()))));
        let ch2 = ch.clone();
        let cb: Rc<RefCell<Option<IoCallback>>> = Rc::new(RefCell::new(None));
        let cb2 = cb.clone();
        let next = move || {
            let mut x = seed.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            seed.set(x);
            x % NUM_BLOCKS
        };
        let f: IoCallback = Rc::new(move |d: IoDone| {
            assert_eq!(d.status, IoStatus::Success);
            done.set(done.get() + 1);
            let buf = d.buf.expect("buf");
            if Instant::now() < end {
                let cb = cb2.borrow().clone().expect("cb");
                let lba = next();
                let r = if write {
                    ch2.write(buf, lba, 1, 0, &cb)
                } else {
                    ch2.read(buf, lba, 1, 0, &cb)
                };
                r.expect("submit");
                return;
            }
            left.set(left.get() - 1);
            if left.get() == 0 {
                let iops = done.get() as f64 / start.elapsed().as_secs_f64();
                if let Some(tx) = tx.borrow_mut().take() {
                    let _ = tx.send(iops);
                }
                cb2.borrow_mut().take();
                keep.borrow_mut().take();
            }
        });
        *cb.borrow_mut() = Some(f.clone());
        for i in 0..qd {
            let buf = IoBuf::alloc(4096);
            let lba = (i * 7919) % NUM_BLOCKS;
            let r = if write {
                ch.write(buf, lba, 1, 0, &f)
            } else {
                ch.read(buf, lba, 1, 0, &f)
            };
            r.expect("submit");
        }
    });
    rx.recv_timeout(Duration::from_secs(secs + 30))
        .expect("workload finished")
}

/// Verify workload on reactor `r`: returns the number of verified write+read pairs.
fn verify(rt: &reactor::RuntimeHandle, r: u32, bdev: &str, qd: u64, secs: u64) -> u64 {
    let (tx, rx) = mpsc::channel();
    let bdev = bdev.to_owned();
    rt.send_msg(ReactorId::new(r), move || {
        let desc = BdevDesc::open(&bdev, true, |_| {}).expect("open");
        let ch = desc.get_io_channel().expect("channel");
        let end = Instant::now() + Duration::from_secs(secs);
        // Per slot: generation counter; tag = slot * 2 + (0 write, 1 read).
        let gens = Rc::new(RefCell::new(vec![0u64; qd as usize]));
        let done = Rc::new(Cell::new(0u64));
        let left = Rc::new(Cell::new(qd));
        let tx = RefCell::new(Some(tx));
        let keep = Rc::new(RefCell::new(Some((desc, ch.clone()))));
        let ch2 = ch.clone();
        let cb: Rc<RefCell<Option<IoCallback>>> = Rc::new(RefCell::new(None));
        let cb2 = cb.clone();
        let region = NUM_BLOCKS / 2 * u64::from(r);
        let lba_of = move |slot: u64, gen: u64| region + slot + (gen % 64) * qd;
        let fill = move |slot: u64, gen: u64, b: &mut [u8]| {
            for (i, x) in b.iter_mut().enumerate() {
                *x = (slot as u8) ^ (gen as u8).wrapping_mul(31) ^ (i as u8);
            }
        };
        let f: IoCallback = Rc::new(move |d: IoDone| {
            assert_eq!(d.status, IoStatus::Success, "verify I/O failed");
            let slot = d.tag / 2;
            let gen = gens.borrow()[slot as usize];
            let mut buf = d.buf.expect("buf");
            let cb = cb2.borrow().clone().expect("cb");
            if d.tag.is_multiple_of(2) {
                ch2.read(buf, lba_of(slot, gen), 1, slot * 2 + 1, &cb)
                    .expect("read");
                return;
            }
            let mut want = vec![0u8; buf.len()];
            fill(slot, gen, &mut want);
            assert!(buf[..] == want[..], "slot {slot} gen {gen}: data mismatch");
            done.set(done.get() + 1);
            if Instant::now() < end {
                let gen = gen + 1;
                gens.borrow_mut()[slot as usize] = gen;
                fill(slot, gen, &mut buf);
                ch2.write(buf, lba_of(slot, gen), 1, slot * 2, &cb)
                    .expect("write");
                return;
            }
            left.set(left.get() - 1);
            if left.get() == 0 {
                if let Some(tx) = tx.borrow_mut().take() {
                    let _ = tx.send(done.get());
                }
                cb2.borrow_mut().take();
                keep.borrow_mut().take();
            }
        });
        *cb.borrow_mut() = Some(f.clone());
        for slot in 0..qd {
            let mut buf = IoBuf::alloc(4096);
            fill(slot, 0, &mut buf);
            ch.write(buf, lba_of(slot, 0), 1, slot * 2, &f)
                .expect("write");
        }
    });
    rx.recv_timeout(Duration::from_secs(secs + 30))
        .expect("verify finished")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let write = args.get(1).is_some_and(|w| w == "randwrite");
    let qd: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(128);
    let secs: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    let mut opts = RuntimeOptions::new(CoreMask::parse("0x3").expect("mask"));
    opts.pin_threads = false;
    let rt = Runtime::start(opts, || {}).expect("reactors");
    let h = rt.handle();
    nvmf::set_runtime(h.clone());
    nvme::set_runtime(h.clone());
    bdev::malloc::create(bdev::malloc::MallocOpts {
        name: Some("Malloc0".into()),
        num_blocks: NUM_BLOCKS,
        block_size: 4096,
        uuid: None,
        optimal_io_boundary: 0,
    })
    .expect("malloc");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    nvmf("nvmf_create_transport", json!({"trtype": "TCP"}));
    let nqn = "nqn.2026-01.io.thinbdev:perf";
    nvmf(
        "nvmf_create_subsystem",
        json!({"nqn": nqn, "allow_any_host": true}),
    );
    nvmf(
        "nvmf_subsystem_add_ns",
        json!({"nqn": nqn, "namespace": {"bdev_name": "Malloc0"}}),
    );
    nvmf(
        "nvmf_subsystem_add_listener",
        json!({"nqn": nqn, "listen_address":
        {"trtype": "tcp", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    );
    let r = call(
        nvme::rpc_methods(),
        "bdev_nvme_attach_controller",
        json!({"name": "Nvme0",
        "trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": port.to_string(), "subnqn": nqn}),
        |h, p, tx| {
            h(
                p,
                Box::new(move |r| tx.send(format!("{r:?}")).expect("send")),
            )
        },
    );
    assert!(r.contains("Nvme0n1"), "attach: {r}");
    if args.get(1).is_some_and(|w| w == "verify") {
        let r0 = std::thread::scope(|sc| {
            let a = sc.spawn(|| verify(&h, 0, "Nvme0n1", qd, secs));
            let b = verify(&h, 1, "Nvme0n1", qd, secs);
            (a.join().expect("reactor 0"), b)
        });
        println!("verify 4KiB qd {qd} x 2 reactors {secs}s over NVMe/TCP: {} + {} write/read pairs verified", r0.0, r0.1);
        rt.stop_handle().stop();
        let _ = rt.join();
        return;
    }
    let wl = if write { "randwrite" } else { "randread" };
    let local = run(&h, "Malloc0", write, qd, secs);
    let remote = run(&h, "Nvme0n1", write, qd, secs);
    println!("{wl} 4KiB qd {qd} {secs}s: local malloc {local:.0} IOPS, NVMe/TCP loopback {remote:.0} IOPS, ratio {:.3}", remote / local);
    rt.stop_handle().stop();
    let _ = rt.join();
}
