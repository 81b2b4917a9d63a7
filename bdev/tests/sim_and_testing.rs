//! Cross-reactor logic under the deterministic simulator, and the fault-injecting and
//! recording test bdevs.

use std::rc::Rc;
use std::sync::{Arc, Mutex};

use bdev::testing::{fault, record};
use bdev::{malloc, null, BdevDesc, BdevEvent, IoBuf, IoCallback, IoDone, IoStatus, IoType};
use reactor::sim::Sim;
use reactor::ReactorId;

type Log = Arc<Mutex<Vec<(u64, IoStatus, usize, Vec<u8>)>>>;

/// A callback that logs (tag, status, completing reactor, data) and keeps `ch` alive.
fn logger(log: &Log, ch: &bdev::BdevChannel) -> IoCallback {
    let (log, keep) = (log.clone(), ch.clone());
    Rc::new(move |d: IoDone| {
        let _ = &keep;
        let data = d.buf.as_deref().map(<[u8]>::to_vec).unwrap_or_default();
        log.lock()
            .unwrap()
            .push((d.tag, d.status, reactor::current().index(), data));
    })
}

#[test]
fn sim_three_reactors_share_a_malloc_bdev() {
    malloc::create(malloc::MallocOpts {
        name: Some("sim_malloc".into()),
        num_blocks: 96,
        block_size: 512,
        optimal_io_boundary: 4,
        ..Default::default()
    })
    .unwrap();
    let mut sim = Sim::from_env(3);
    let desc = Arc::new(BdevDesc::open("sim_malloc", true, |_| {}).unwrap());
    let log: Log = Arc::default();
    // Each reactor writes its own 32-block region (split into 4-block children).
    for r in 0..3u32 {
        let (d, l) = (desc.clone(), log.clone());
        sim.enter(ReactorId::new(r), move || {
            let ch = d.get_io_channel().unwrap();
            let cb = logger(&l, &ch);
            let buf = IoBuf::from_slice(&vec![r as u8 + 1; 31 * 512]);
            ch.write(buf, u64::from(r) * 32 + 1, 31, u64::from(r), &cb)
                .unwrap();
        });
    }
    sim.run_until_idle();
    let writes = std::mem::take(&mut *log.lock().unwrap());
    assert_eq!(writes.len(), 3);
    for (tag, st, on, _) in &writes {
        assert_eq!(*st, IoStatus::Success);
        assert_eq!(*tag as usize, *on, "completion on the submitting reactor");
    }
    // Reactor 0 asks reactor 2 (by message) to read everything back.
    let (d, l) = (desc.clone(), log.clone());
    sim.enter(ReactorId::new(0), move || {
        reactor::send_msg(ReactorId::new(2), move || {
            let ch = d.get_io_channel().unwrap();
            let cb = logger(&l, &ch);
            ch.read(IoBuf::new(96 * 512), 0, 96, 7, &cb).unwrap();
        });
    });
    sim.run_until_idle();
    let reads = log.lock().unwrap().clone();
    assert_eq!(reads.len(), 1);
    let (tag, st, on, data) = &reads[0];
    assert_eq!((*tag, *st, *on), (7, IoStatus::Success, 2));
    for r in 0..3usize {
        let region = &data[r * 32 * 512..(r + 1) * 32 * 512];
        assert_eq!(region[..512], [0u8; 512], "block {} untouched", r * 32);
        assert!(
            region[512..].iter().all(|&b| b == r as u8 + 1),
            "region {r}"
        );
    }
    drop(desc);
    malloc::delete("sim_malloc").unwrap();
}

#[test]
fn sim_events_reach_the_opening_reactor() {
    null::create(null::NullOpts {
        name: "sim_null_ev".into(),
        num_blocks: 2048,
        block_size: 512,
        uuid: None,
    })
    .unwrap();
    let mut sim = Sim::from_env(2);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let desc = sim.enter(ReactorId::new(1), move || {
        BdevDesc::open("sim_null_ev", false, move |e: BdevEvent| {
            s.lock().unwrap().push((e, reactor::current().index()));
        })
        .unwrap()
    });
    null::resize("sim_null_ev", 3).unwrap();
    assert!(
        seen.lock().unwrap().is_empty(),
        "delivered by message, not inline"
    );
    sim.run_until_idle();
    null::delete("sim_null_ev").unwrap();
    sim.run_until_idle();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            (BdevEvent::Resize { num_blocks: 6144 }, 1),
            (BdevEvent::Remove, 1)
        ]
    );
    drop(desc);
}

fn base(name: &str, blocks: u64) {
    malloc::create(malloc::MallocOpts {
        name: Some(name.into()),
        num_blocks: blocks,
        block_size: 512,
        ..Default::default()
    })
    .unwrap();
}

/// Runs `f(channel, callback)` on sim reactor 0 and steps the sim until idle.
fn run(sim: &mut Sim, name: &str, log: &Log, f: impl FnOnce(&bdev::BdevChannel, &IoCallback)) {
    let desc = BdevDesc::open(name, true, |_| {}).unwrap();
    sim.enter(ReactorId::new(0), || {
        let ch = desc.get_io_channel().unwrap();
        let cb = logger(log, &ch);
        f(&ch, &cb);
    });
    sim.run_until_idle();
}

#[test]
fn fault_bdev_injects_errors_delay_torn_writes_and_crash() {
    base("ft_base", 64);
    let fb = fault::create("ft", "ft_base").unwrap();
    let mut sim = Sim::from_env(1);
    let log: Log = Arc::default();
    let cfg = fb.config().clone();

    cfg.set_error_ppm(IoType::Read, 1_000_000);
    run(&mut sim, "ft", &log, |ch, cb| {
        ch.write(IoBuf::from_slice(&[9; 1024]), 0, 2, 1, cb)
            .unwrap();
        ch.read(IoBuf::new(512), 0, 1, 2, cb).unwrap();
    });
    let mut got: Vec<_> = log.lock().unwrap().drain(..).map(|e| (e.0, e.1)).collect();
    got.sort_by_key(|e| e.0);
    assert_eq!(
        got,
        vec![(1, IoStatus::Success), (2, IoStatus::Failed(libc::EIO))]
    );
    cfg.set_error_ppm(IoType::Read, 0);

    // Latency: completion held for 5 polls.
    cfg.delay_polls
        .store(5, std::sync::atomic::Ordering::Relaxed);
    let desc = BdevDesc::open("ft", true, |_| {}).unwrap();
    let polls = sim.enter(ReactorId::new(0), || {
        let ch = desc.get_io_channel().unwrap();
        let cb = logger(&log, &ch);
        ch.read(IoBuf::new(1024), 0, 2, 3, &cb).unwrap();
        let mut polls = 0;
        while log.lock().unwrap().is_empty() {
            ch.poll();
            polls += 1;
            assert!(polls < 100);
        }
        polls
    });
    assert!(polls >= 5, "completed after {polls} polls");
    assert_eq!(
        log.lock().unwrap().drain(..).next().unwrap().3,
        vec![9; 1024]
    );
    cfg.delay_polls
        .store(0, std::sync::atomic::Ordering::Relaxed);

    // Torn write: first half lands, the I/O fails.
    cfg.torn_ppm
        .store(1_000_000, std::sync::atomic::Ordering::Relaxed);
    run(&mut sim, "ft", &log, |ch, cb| {
        ch.write(IoBuf::from_slice(&[7; 2048]), 10, 4, 4, cb)
            .unwrap();
    });
    assert_eq!(
        log.lock().unwrap().drain(..).next().unwrap().1,
        IoStatus::Failed(libc::EIO)
    );
    cfg.torn_ppm.store(0, std::sync::atomic::Ordering::Relaxed);
    run(&mut sim, "ft", &log, |ch, cb| {
        ch.read(IoBuf::new(2048), 10, 4, 5, cb).unwrap()
    });
    let data = log.lock().unwrap().drain(..).next().unwrap().3;
    assert_eq!(&data[..1024], &[7; 1024][..]);
    assert_eq!(&data[1024..], &[0; 1024][..]);

    // Crash at the 2nd flush: it and everything after fail.
    cfg.crash_at_flush
        .store(2, std::sync::atomic::Ordering::Relaxed);
    run(&mut sim, "ft", &log, |ch, cb| {
        ch.flush(0, 0, 6, cb).unwrap()
    });
    run(&mut sim, "ft", &log, |ch, cb| {
        ch.flush(0, 0, 7, cb).unwrap();
        ch.write(IoBuf::new(512), 0, 1, 8, cb).unwrap();
    });
    let mut got: Vec<_> = log.lock().unwrap().drain(..).map(|e| (e.0, e.1)).collect();
    got.sort_by_key(|e| e.0);
    let eio = IoStatus::Failed(libc::EIO);
    assert_eq!(got, vec![(6, IoStatus::Success), (7, eio), (8, eio)]);
    assert!(cfg.nr_injected.load(std::sync::atomic::Ordering::Relaxed) >= 4);
    drop(desc);
    bdev::registry().unregister("ft").unwrap();
    malloc::delete("ft_base").unwrap();
}

#[test]
fn record_bdev_materialises_every_prefix() {
    base("rec_base", 16);
    let rec = record::create("rec", "rec_base", None).unwrap();
    let mut sim = Sim::from_env(1);
    let log: Log = Arc::default();
    // Issue one at a time so the log order is the submission order.
    type Step = Box<dyn Fn(&bdev::BdevChannel, &IoCallback)>;
    let steps: Vec<Step> = vec![
        Box::new(|ch, cb| {
            ch.write(IoBuf::from_slice(&[1; 1024]), 0, 2, 0, cb)
                .unwrap()
        }),
        Box::new(|ch, cb| ch.flush(0, 0, 0, cb).unwrap()),
        Box::new(|ch, cb| ch.write(IoBuf::from_slice(&[2; 512]), 1, 1, 0, cb).unwrap()),
        Box::new(|ch, cb| ch.unmap(0, 1, 0, cb).unwrap()),
        Box::new(|ch, cb| ch.read(IoBuf::new(512), 0, 1, 0, cb).unwrap()),
        Box::new(|ch, cb| ch.flush(0, 0, 0, cb).unwrap()),
    ];
    for s in &steps {
        run(&mut sim, "rec", &log, |ch, cb| s(ch, cb));
    }
    assert!(log.lock().unwrap().iter().all(|e| e.1 == IoStatus::Success));
    assert_eq!(rec.log_len(), 5, "reads are not logged");
    assert_eq!(rec.flush_indices(), vec![1, 4]);
    let img = |n| rec.materialize(n);
    assert_eq!(img(0), vec![0; 16 * 512]);
    assert_eq!(&img(1)[..1024], &[1; 1024][..]);
    assert_eq!(img(2), img(1));
    assert_eq!(&img(3)[512..1024], &[2; 512][..]);
    assert_eq!(&img(4)[..512], &[0; 512][..]);
    assert_eq!(&img(4)[512..1024], &[2; 512][..]);
    // The full log equals the base device's real contents.
    let d = BdevDesc::open("rec", false, |_| {}).unwrap();
    let out = Arc::new(Mutex::new(Vec::new()));
    let o = out.clone();
    sim.enter(ReactorId::new(0), || {
        let ch = d.get_io_channel().unwrap();
        let keep = ch.clone();
        let cb: IoCallback = Rc::new(move |io: IoDone| {
            let _ = &keep;
            *o.lock().unwrap() = io.buf.as_deref().unwrap().to_vec();
        });
        ch.read(IoBuf::new(16 * 512), 0, 16, 0, &cb).unwrap();
    });
    sim.run_until_idle();
    assert_eq!(*out.lock().unwrap(), img(usize::MAX));
    drop(d);
    bdev::registry().unregister("rec").unwrap();
    malloc::delete("rec_base").unwrap();
}
