//! Bdev-wide reset across reactors (SPDK `spdk_bdev_reset` semantics): a reset submitted on
//! one reactor waits for the I/O in flight on every reactor's channel, I/O submitted on any
//! reactor meanwhile is held back (not failed) until the module has reset, and resets of one
//! bdev run one after another.
//!
//! The bdev under the generic layer is a "gate": it holds every read/write until the test
//! opens the gate and logs, in one global order, what its channels were handed and when they
//! completed it — which is what the generic layer's reset must order.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bdev::{
    Bdev, BdevCore, BdevCoreOpts, Completer, IoStatus, IoType, ModuleChannel, ModuleIo, Result,
};
use common::{open, Req, Rt};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// The module was handed this I/O (type, first block) on this reactor.
    Submit(IoType, u64, usize),
    /// The module completed the read/write at this block.
    Complete(u64),
}

#[derive(Default)]
struct Gate {
    open: AtomicBool,
    log: Mutex<Vec<Event>>,
}

impl Gate {
    fn push(&self, e: Event) {
        self.log.lock().unwrap().push(e);
    }

    fn log(&self) -> Vec<Event> {
        self.log.lock().unwrap().clone()
    }
}

struct GateBdev {
    core: BdevCore,
    gate: Arc<Gate>,
}

impl Bdev for GateBdev {
    fn core(&self) -> &BdevCore {
        &self.core
    }

    fn io_type_supported(&self, io_type: IoType) -> bool {
        matches!(io_type, IoType::Read | IoType::Write | IoType::Reset)
    }

    fn create_channel(&self, completer: Completer) -> Result<Box<dyn ModuleChannel>> {
        Ok(Box::new(GateChannel {
            completer,
            held: Vec::new(),
            gate: self.gate.clone(),
        }))
    }
}

struct GateChannel {
    completer: Completer,
    held: Vec<ModuleIo>,
    gate: Arc<Gate>,
}

impl ModuleChannel for GateChannel {
    fn submit(&mut self, io: ModuleIo) {
        let r = reactor::current().index();
        self.gate
            .push(Event::Submit(io.io_type(), io.offset_blocks(), r));
        if io.io_type() == IoType::Reset {
            self.completer.complete(io, IoStatus::Success);
        } else {
            self.held.push(io);
        }
    }

    fn poll(&mut self) -> usize {
        if !self.gate.open.load(Ordering::Acquire) {
            return 0;
        }
        let n = self.held.len();
        for io in self.held.drain(..) {
            self.gate.push(Event::Complete(io.offset_blocks()));
            self.completer.complete(io, IoStatus::Success);
        }
        n
    }

    fn nr_inflight(&self) -> usize {
        self.held.len()
    }
}

fn gate_bdev(name: &str) -> Arc<Gate> {
    let gate = Arc::new(Gate::default());
    let core = BdevCore::new(BdevCoreOpts {
        name: name.into(),
        aliases: Vec::new(),
        uuid: None,
        product_name: "Gate disk",
        module_name: "gate_test",
        block_size: 512,
        num_blocks: 1024,
        optimal_io_boundary: 0,
        write_cache: false,
    })
    .unwrap();
    bdev::registry()
        .register(Arc::new(GateBdev {
            core,
            gate: gate.clone(),
        }))
        .unwrap();
    gate
}

fn position(log: &[Event], e: Event) -> usize {
    log.iter()
        .position(|x| *x == e)
        .unwrap_or_else(|| panic!("{e:?} missing from {log:?}"))
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Opens the gate and wakes both reactors: in interrupt mode an idle reactor polls its
/// channels only after something (here a message) wakes it.
fn open_gate(rt: &Rt, gate: &Gate) {
    gate.open.store(true, Ordering::Release);
    for r in 0..2 {
        rt.call(r, || ());
    }
}

#[test]
fn reset_freezes_and_drains_every_reactor_poll_mode() {
    reset_freezes_and_drains_every_reactor(false);
}

#[test]
fn reset_freezes_and_drains_every_reactor_interrupt_mode() {
    reset_freezes_and_drains_every_reactor(true);
}

fn reset_freezes_and_drains_every_reactor(interrupt: bool) {
    let name = format!("rst_gate_two_reactors_{interrupt}");
    let name = name.as_str();
    let gate = gate_bdev(name);
    let rt = Rt::start(2, interrupt);
    let d = open(name);
    let sub = |r: usize, req: Req| rt.submit(r, &d, req);
    let write = |off: u64| Req::Write(off, vec![off as u8; 512]);

    // In flight before the reset: a write on reactor 1, a read on reactor 0.
    let a = sub(1, write(1));
    let b = sub(0, Req::Read(2, 1));
    wait_for("both I/Os at the module", || gate.log().len() == 2);

    let reset0 = sub(0, Req::Reset);
    // When this returns, reactor 0 has run the reset's submit, and so has queued the freeze
    // message for reactor 1 ahead of anything the test sends there next.
    rt.call(0, || ());
    let c = sub(1, write(3));
    let reset1 = sub(1, Req::Reset);
    rt.call(1, || ());
    std::thread::sleep(Duration::from_millis(50));
    let log = gate.log();
    assert_eq!(
        log.len(),
        2,
        "nothing may reach the module while I/O is in flight and the bdev is frozen: {log:?}"
    );
    for (what, rx) in [("reset", &reset0), ("write after the reset", &c)] {
        assert!(rx.try_recv().is_err(), "{what} completed before the drain");
    }

    open_gate(&rt, &gate);
    for (what, rx) in [
        ("write 1", a),
        ("read 2", b),
        ("reset on reactor 0", reset0),
        ("write 3", c),
        ("reset on reactor 1", reset1),
    ] {
        let res = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("{what} did not complete"));
        assert_eq!(res.unwrap().0, IoStatus::Success, "{what}");
    }

    let log = gate.log();
    let reset_r0 = position(&log, Event::Submit(IoType::Reset, 0, 0));
    let reset_r1 = position(&log, Event::Submit(IoType::Reset, 0, 1));
    assert!(
        position(&log, Event::Complete(1)) < reset_r0,
        "the reset waited for reactor 1's write: {log:?}"
    );
    assert!(
        position(&log, Event::Complete(2)) < reset_r0,
        "the reset waited for reactor 0's read: {log:?}"
    );
    let write3 = position(&log, Event::Submit(IoType::Write, 3, 1));
    assert!(
        reset_r0 < write3,
        "a write submitted during the reset reached the module first: {log:?}"
    );
    assert!(
        reset_r0 < reset_r1 && position(&log, Event::Complete(3)) < reset_r1,
        "the second reset ran after the first and after the write in flight: {log:?}"
    );
    assert_eq!(log.len(), 8, "each I/O reached the module once: {log:?}");

    // Unfrozen everywhere: plain I/O flows again on both reactors.
    for r in 0..2 {
        let res = rt.io(r, &d, write(10 + r as u64)).unwrap();
        assert_eq!(res.0, IoStatus::Success);
    }
    drop(d);
    drop(rt);
    bdev::registry().unregister(name).unwrap();
}

#[test]
fn channel_created_during_a_reset_starts_frozen() {
    let name = "rst_gate_new_channel";
    let gate = gate_bdev(name);
    let rt = Rt::start(2, false);
    let d = open(name);
    // Only reactor 0 has a channel; its write holds the reset open.
    let a = rt.submit(0, &d, Req::Write(5, vec![5; 512]));
    wait_for("the write at the module", || gate.log().len() == 1);
    let reset = rt.submit(0, &d, Req::Reset);
    rt.call(0, || ());
    // Reactor 1 gets its first channel of the bdev now, while the bdev is frozen.
    let b = rt.submit(1, &d, Req::Read(6, 1));
    rt.call(1, || ());
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(gate.log().len(), 1, "{:?}", gate.log());

    open_gate(&rt, &gate);
    for (what, rx) in [("write", a), ("reset", reset), ("read", b)] {
        let res = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("{what} did not complete"));
        assert_eq!(res.unwrap().0, IoStatus::Success, "{what}");
    }
    let log = gate.log();
    assert!(
        position(&log, Event::Submit(IoType::Reset, 0, 0))
            < position(&log, Event::Submit(IoType::Read, 6, 1)),
        "{log:?}"
    );
    drop(d);
    drop(rt);
    bdev::registry().unregister(name).unwrap();
}
