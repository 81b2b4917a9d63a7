//! Simulator tests: cross-reactor messages, pollers, timers, channels and ring ops, under
//! seeded random schedules. Seeds are printed; `REACTOR_SIM_SEED=<n>` pins the base seed.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Sim, SimRng};
use crate::{DmaBuf, IoDevice, PollStatus, ReactorId};

fn base_seed() -> u64 {
    std::env::var("REACTOR_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_0001)
}

type Trace = Arc<Mutex<Vec<(u32, u32, u64)>>>;

/// Every reactor runs a poller that sends 1-4 numbered messages per call to random targets
/// (itself included) until its quota is spent. Returns the delivery trace
/// (sender, receiver, seq-per-pair).
fn message_storm(seed: u64, nr_reactors: usize, quota: u64) -> Vec<(u32, u32, u64)> {
    let mut sim = Sim::new(nr_reactors, seed);
    let trace: Trace = Arc::default();
    for r in 0..nr_reactors as u32 {
        let trace = trace.clone();
        sim.enter(ReactorId::new(r), move || {
            let mut rng = SimRng::new(seed ^ (u64::from(r) << 32));
            let mut next_seq: HashMap<u32, u64> = HashMap::new();
            let mut sent = 0;
            let n = crate::nr_reactors() as u64;
            crate::register_poller("storm", move || {
                if sent == quota {
                    return PollStatus::Idle;
                }
                for _ in 0..=rng.below(4) {
                    let to = rng.below(n) as u32;
                    let seq = next_seq.entry(to).or_insert(0);
                    let (s, trace) = (*seq, trace.clone());
                    *seq += 1;
                    crate::send_msg(ReactorId::new(to), move || {
                        assert_eq!(crate::current().index() as u32, to);
                        trace.lock().unwrap().push((r, to, s));
                    });
                    sent += 1;
                    if sent == quota {
                        break;
                    }
                }
                PollStatus::Busy
            });
        });
    }
    sim.run_until_idle();
    let trace = trace.lock().unwrap().clone();
    trace
}

fn check_exactly_once_in_order(trace: &[(u32, u32, u64)], nr_reactors: usize, quota: u64) {
    let mut next: HashMap<(u32, u32), u64> = HashMap::new();
    let mut per_sender = vec![0u64; nr_reactors];
    for &(from, to, seq) in trace {
        let expected = next.entry((from, to)).or_insert(0);
        assert_eq!(
            seq, *expected,
            "{from}->{to}: got #{seq}, expected #{expected}"
        );
        *expected += 1;
        per_sender[from as usize] += 1;
    }
    assert!(per_sender.iter().all(|&n| n == quota), "{per_sender:?}");
}

#[test]
fn messages_exactly_once_in_order_under_random_schedules() {
    for i in 0..8 {
        let seed = base_seed().wrapping_add(i);
        let nr_reactors = 2 + (i as usize % 7);
        let trace = message_storm(seed, nr_reactors, 500);
        check_exactly_once_in_order(&trace, nr_reactors, 500);
    }
}

#[test]
fn same_seed_same_schedule() {
    let seed = base_seed();
    let a = message_storm(seed, 6, 300);
    let b = message_storm(seed, 6, 300);
    assert_eq!(a, b, "a seed must reproduce its schedule exactly");
    let c = message_storm(seed.wrapping_add(1), 6, 300);
    assert_ne!(a, c, "different seeds should interleave differently");
}

#[test]
fn timers_and_periodic_pollers_follow_the_virtual_clock() {
    let mut sim = Sim::new(3, base_seed());
    let start = sim.now();
    let fired = Rc::new(RefCell::new(Vec::new()));
    let runs = Rc::new(Cell::new(0u32));
    let (f, r) = (fired.clone(), runs.clone());
    sim.enter(ReactorId::new(1), move || {
        let f2 = f.clone();
        crate::after(Duration::from_secs(5), move || {
            f2.borrow_mut().push(crate::now())
        });
        let f3 = f.clone();
        let cancelled = crate::after(Duration::from_secs(2), move || {
            f3.borrow_mut().push(crate::now())
        });
        assert!(cancelled.cancel());
        crate::register_periodic_poller("p", Duration::from_millis(10), move || {
            r.set(r.get() + 1);
            PollStatus::Busy
        });
    });
    sim.run_for(Duration::from_millis(4999));
    assert!(fired.borrow().is_empty(), "timer fired early");
    assert_eq!(runs.get(), 499);
    sim.run_for(Duration::from_millis(1));
    assert_eq!(*fired.borrow(), [start + Duration::from_secs(5)]);
    assert_eq!(runs.get(), 500);
    sim.run_for(Duration::from_secs(10));
    assert_eq!(fired.borrow().len(), 1, "a one-shot timer fires once");
    assert_eq!(runs.get(), 1500);
}

#[test]
fn deferred_unregistration_in_sim() {
    let mut sim = Sim::new(1, base_seed());
    let log = Rc::new(RefCell::new(Vec::<String>::new()));
    let l = log.clone();
    sim.enter(ReactorId::new(0), move || {
        let hb: Rc<Cell<Option<crate::PollerHandle>>> = Rc::default();
        let (l1, hb1) = (l.clone(), hb.clone());
        let mut n = 0;
        crate::register_poller("a", move || {
            n += 1;
            l1.borrow_mut().push(format!("a{n}"));
            if n == 2 {
                hb1.get().unwrap().unregister();
            }
            PollStatus::from_busy(n <= 3)
        });
        let l2 = l.clone();
        hb.set(Some(crate::register_poller("b", move || {
            l2.borrow_mut().push("b".into());
            PollStatus::Busy
        })));
    });
    sim.run_until_idle();
    assert_eq!(*log.borrow(), ["a1", "b", "a2", "a3", "a4"]);
}

#[test]
fn for_each_reactor_and_channels() {
    let mut sim = Sim::new(6, base_seed());
    let created = Arc::new(Mutex::new(Vec::new()));
    let c = created.clone();
    let dev = IoDevice::new("simdev", move || {
        c.lock().unwrap().push(crate::current());
        Cell::new(0u32)
    });
    let keep: Rc<RefCell<Vec<crate::IoChannel<Cell<u32>>>>> = Rc::default();
    for r in [1u32, 3] {
        let (dev, keep) = (dev.clone(), keep.clone());
        sim.enter(ReactorId::new(r), move || {
            keep.borrow_mut().push(dev.channel())
        });
    }
    assert_eq!(
        *created.lock().unwrap(),
        [ReactorId::new(1), ReactorId::new(3)]
    );
    let visits = Arc::new(Mutex::new(Vec::new()));
    let (v1, v2, v3) = (visits.clone(), visits.clone(), visits.clone());
    sim.enter(ReactorId::new(4), move || {
        crate::for_each_reactor(
            move || v1.lock().unwrap().push(("each", crate::current())),
            move || v2.lock().unwrap().push(("done", crate::current())),
        );
    });
    sim.run_until_idle();
    let dev2 = dev.clone();
    sim.enter(ReactorId::new(0), move || {
        dev2.for_each_channel(
            move |ch| {
                ch.set(ch.get() + 1);
                v3.lock().unwrap().push(("chan", crate::current()));
            },
            || {},
        );
    });
    sim.run_until_idle();
    let ids = |k: &str| -> Vec<usize> {
        visits
            .lock()
            .unwrap()
            .iter()
            .filter(|(kind, _)| *kind == k)
            .map(|(_, r)| r.index())
            .collect()
    };
    assert_eq!(ids("each"), [0, 1, 2, 3, 4, 5]);
    assert_eq!(ids("done"), [4]);
    assert_eq!(ids("chan"), [1, 3]);
    assert!(keep.borrow().iter().all(|ch| ch.get() == 1));
    // Dropping the last references destroys the channels; a new request creates a new one.
    keep.borrow_mut().clear();
    let dev3 = dev.clone();
    let fresh = sim.enter(ReactorId::new(1), move || {
        assert!(dev3.existing_channel().is_none());
        dev3.channel().get()
    });
    assert_eq!(fresh, 0);
    assert_eq!(created.lock().unwrap().len(), 3);
}

#[test]
fn sim_ring_runs_file_ops_synchronously_and_completes_next_tick() {
    use std::os::fd::AsRawFd;
    let mut sim = Sim::new(2, base_seed());
    let file = tempfile_in_tmp();
    let fd = file.as_raw_fd();
    let done = Rc::new(RefCell::new(Vec::new()));
    let d = done.clone();
    sim.enter(ReactorId::new(1), move || {
        let ring = crate::ring();
        let d2 = d.clone();
        ring.write_at(fd, 8192, DmaBuf::from_slice(&[7u8; 4096]), move |res, _| {
            assert_eq!(res.unwrap(), 4096);
            d2.borrow_mut().push("write");
            let d3 = d2.clone();
            crate::ring()
                .read_at(fd, 8192, DmaBuf::alloc(4096), move |res, buf| {
                    assert_eq!(res.unwrap(), 4096);
                    assert!(buf.iter().all(|&b| b == 7));
                    d3.borrow_mut().push("read");
                })
                .unwrap();
        })
        .unwrap();
        let d4 = d.clone();
        let op = crate::Op::Recv {
            fd: crate::Fd::Raw(fd),
            buf: DmaBuf::alloc(16),
            flags: 0,
        };
        ring.submit(
            op,
            crate::OnComplete::closure(move |c| {
                assert_eq!(c.result, -libc::EOPNOTSUPP);
                d4.borrow_mut().push("recv unsupported");
            }),
        )
        .unwrap();
        assert!(d.borrow().is_empty(), "completions never run inside submit");
    });
    assert_eq!(sim.nr_in_flight(ReactorId::new(1)), 2);
    sim.run_until_idle();
    let done = done.borrow();
    assert_eq!(done.len(), 3, "{done:?}");
    assert!(done.contains(&"recv unsupported"));
    let pos = |what| done.iter().position(|d| *d == what).unwrap();
    assert!(pos("write") < pos("read"), "{done:?}");
    assert_eq!(sim.nr_in_flight(ReactorId::new(1)), 0);
}

fn tempfile_in_tmp() -> std::fs::File {
    let path = std::env::temp_dir().join(format!(
        "reactor-sim-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    file
}

#[test]
fn request_stop_sets_the_flag() {
    let mut sim = Sim::new(2, base_seed());
    sim.enter(ReactorId::new(0), || {
        crate::send_msg(ReactorId::new(1), crate::request_stop);
    });
    assert!(!sim.stop_requested());
    sim.run_until_idle();
    assert!(sim.stop_requested());
}

#[test]
fn rng_is_uniform_enough_and_seeded() {
    let mut a = SimRng::new(42);
    let mut b = SimRng::new(42);
    let mut counts = [0u32; 8];
    for _ in 0..80_000 {
        let x = a.below(8);
        assert_eq!(x, b.below(8));
        counts[x as usize] += 1;
    }
    assert!(
        counts.iter().all(|&c| (9000..11000).contains(&c)),
        "{counts:?}"
    );
}

#[test]
fn sim_reorders_completions_by_seed() {
    let orders: Vec<Vec<u64>> = (0..6)
        .map(|i| {
            let mut sim = Sim::new(1, base_seed().wrapping_add(i));
            let order = Rc::new(RefCell::new(Vec::new()));
            let o = order.clone();
            sim.enter(ReactorId::new(0), move || {
                let ring = crate::ring();
                for tag in 0..8u64 {
                    let o = o.clone();
                    ring.submit(
                        crate::Op::Nop,
                        crate::OnComplete::closure(move |c| {
                            assert_eq!(c.result, 0);
                            o.borrow_mut().push(tag);
                        }),
                    )
                    .unwrap();
                }
            });
            sim.run_until_idle();
            let order = order.borrow().clone();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..8).collect::<Vec<_>>(), "each op completes once");
            order
        })
        .collect();
    assert!(
        orders.iter().any(|o| *o != orders[0]),
        "completion order should vary with the seed: {orders:?}"
    );
}

#[test]
fn run_until_jumps_to_deadlines() {
    let mut sim = Sim::new(2, base_seed());
    let start = sim.now();
    let fired = Rc::new(Cell::new(false));
    let f = fired.clone();
    sim.enter(ReactorId::new(1), move || {
        crate::after(Duration::from_secs(30), move || f.set(true));
    });
    let f = fired.clone();
    assert!(sim.run_until(|| f.get()));
    assert_eq!(sim.now(), start + Duration::from_secs(30));
    assert!(!sim.run_until(|| false), "idle with nothing scheduled");
}

#[test]
fn dropping_a_sim_drains_its_rings() {
    let start = std::time::Instant::now();
    let mut sim = Sim::new(1, base_seed());
    let completed = Rc::new(Cell::new(0));
    let c = completed.clone();
    sim.enter(ReactorId::new(0), move || {
        for _ in 0..16 {
            let c = c.clone();
            crate::ring()
                .submit(
                    crate::Op::Nop,
                    crate::OnComplete::closure(move |_| c.set(c.get() + 1)),
                )
                .unwrap();
        }
    });
    sim.step();
    assert!(sim.nr_in_flight(ReactorId::new(0)) > 0 || completed.get() == 16);
    drop(sim);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(2),
        "drain was quick"
    );
}

#[test]
fn handles_used_after_their_reactor_are_inert() {
    let sim = Sim::new(1, base_seed());
    let (poller, timer) = sim.enter(ReactorId::new(0), || {
        let p = crate::register_poller("p", || PollStatus::Idle);
        let t = crate::after(Duration::from_secs(1), || {});
        (p, t)
    });
    drop(sim);
    // As in a thread-local destructor running after the reactor stopped.
    poller.unregister();
    assert!(!timer.cancel());
}
