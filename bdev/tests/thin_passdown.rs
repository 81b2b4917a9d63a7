//! Discard passdown is asynchronous and safe: the unmap of a thin block is acknowledged while
//! the discard of its freed data block is still held by the data bdev, the pool keeps
//! committing meanwhile, and the freed block is not handed out again before the discard
//! completed (a write needing space waits for it, then gets it).
//!
//! The data bdev is a "gate" bdev (memory-backed, defined here) that parks every unmap until
//! the test opens the gate on reactor 0, where the pool's worker issues passdowns.

mod common;

use std::cell::RefCell;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bdev::thin::{self, PoolOpts};
use bdev::{
    malloc, registry, Bdev, BdevCore, BdevCoreOpts, Completer, IoStatus, IoType, ModuleChannel,
    ModuleIo,
};
use common::{ok, open, Req, Rt};

const DBS: u64 = 64 * 1024;
const BS: u64 = 4096;
const BPD: u64 = DBS / BS;

/// What reached the gate bdev, in completion order (offsets in 4 KiB blocks).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Write(u64, u64),
    UnmapParked(u64, u64),
    UnmapDone(u64, u64),
}

struct GateBdev {
    core: BdevCore,
    mem: Arc<Mutex<Vec<u8>>>,
    events: Arc<Mutex<Vec<Event>>>,
}

thread_local! {
    /// Unmaps parked on this reactor, with the completer of their channel.
    static PARKED: RefCell<Vec<(ModuleIo, Completer)>> = const { RefCell::new(Vec::new()) };
}

struct GateChannel {
    completer: Completer,
    mem: Arc<Mutex<Vec<u8>>>,
    events: Arc<Mutex<Vec<Event>>>,
}

impl ModuleChannel for GateChannel {
    fn submit(&mut self, mut io: ModuleIo) {
        let off = (io.offset_blocks() * BS) as usize;
        let (first, n) = (io.offset_blocks(), io.num_blocks());
        match io.io_type() {
            IoType::Read => {
                let len = io.len_bytes();
                let mem = self.mem.lock().unwrap();
                io.buf_mut().copy_from_slice(&mem[off..off + len]);
            }
            IoType::Write => {
                let len = io.len_bytes();
                self.mem.lock().unwrap()[off..off + len].copy_from_slice(io.buf());
                self.events.lock().unwrap().push(Event::Write(first, n));
            }
            IoType::Unmap => {
                self.events
                    .lock()
                    .unwrap()
                    .push(Event::UnmapParked(first, n));
                PARKED.with(|p| p.borrow_mut().push((io, self.completer.clone())));
                return;
            }
            _ => {}
        }
        self.completer.complete(io, IoStatus::Success);
    }
}

impl Bdev for GateBdev {
    fn core(&self) -> &BdevCore {
        &self.core
    }

    fn io_type_supported(&self, io_type: IoType) -> bool {
        matches!(
            io_type,
            IoType::Read | IoType::Write | IoType::Unmap | IoType::Flush | IoType::Reset
        )
    }

    fn create_channel(&self, completer: Completer) -> bdev::Result<Box<dyn ModuleChannel>> {
        Ok(Box::new(GateChannel {
            completer,
            mem: self.mem.clone(),
            events: self.events.clone(),
        }))
    }
}

/// On the current reactor: zero and complete every parked unmap.
fn open_gate(mem: &Mutex<Vec<u8>>, events: &Mutex<Vec<Event>>) -> usize {
    let parked = PARKED.with(|p| std::mem::take(&mut *p.borrow_mut()));
    let n = parked.len();
    for (io, c) in parked {
        let (first, nr) = (io.offset_blocks(), io.num_blocks());
        let off = (first * BS) as usize;
        mem.lock().unwrap()[off..off + (nr * BS) as usize].fill(0);
        events.lock().unwrap().push(Event::UnmapDone(first, nr));
        c.complete(io, IoStatus::Success);
    }
    n
}

#[test]
fn thin_discard_passdown_is_async_and_holds_the_block() {
    let rt = Rt::start(2, true);
    thin::set_runtime(rt.h.clone());
    // 8 data blocks: the label table takes one, thin blocks 0..7 take the rest.
    let mem = Arc::new(Mutex::new(vec![0u8; (8 * DBS) as usize]));
    let events = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(GateBdev {
        core: BdevCore::new(BdevCoreOpts {
            name: "pd_data".into(),
            aliases: Vec::new(),
            uuid: None,
            product_name: "Gate disk",
            module_name: "gate",
            block_size: BS as u32,
            num_blocks: 8 * BPD,
            optimal_io_boundary: 0,
            write_cache: false,
        })
        .unwrap(),
        mem: mem.clone(),
        events: events.clone(),
    });
    registry().register(gate).unwrap();
    malloc::create(malloc::MallocOpts {
        name: Some("pd_meta".into()),
        num_blocks: 256,
        block_size: 4096,
        uuid: None,
        optimal_io_boundary: 0,
    })
    .unwrap();
    let mut o = PoolOpts::new("pd_pool", "pd_data", "pd_meta");
    o.commit_interval_ms = 3_600_000;
    o.no_space_timeout = Duration::from_secs(20);
    thin::create_pool_blocking(o).unwrap();
    thin::create_thin_blocking("pd_pool", "pd_thin", 16 * DBS, 4096, None).unwrap();
    let d = open("pd_thin");
    for vb in 0..7u8 {
        let w = rt.io(
            1,
            &d,
            Req::Write(u64::from(vb) * BPD, vec![vb + 1; DBS as usize]),
        );
        assert_eq!(w.unwrap().0, IoStatus::Success, "write {vb}");
    }
    assert_eq!(rt.io(0, &d, Req::Flush(0, 0)).unwrap().0, IoStatus::Success);

    // The unmap is acknowledged while its passdown is parked.
    let e0 = events.lock().unwrap().len();
    let r = rt.io(1, &d, Req::Unmap(2 * BPD, BPD)).unwrap();
    assert_eq!(r.0, IoStatus::Success);
    let parked: Vec<Event> = events.lock().unwrap()[e0..].to_vec();
    let [Event::UnmapParked(first, nr)] = parked[..] else {
        panic!("expected one parked passdown, got {parked:?}");
    };
    assert_eq!(
        (first % BPD, nr),
        (0, BPD),
        "passdown of a whole data block"
    );
    let freed = first / BPD;
    // The worker is not blocked: a commit goes through with the discard in flight.
    assert_eq!(rt.io(0, &d, Req::Flush(0, 0)).unwrap().0, IoStatus::Success);

    // The only free block is the one being discarded: a write needing space waits for it.
    let rx = rt.submit(1, &d, Req::Write(9 * BPD, vec![0xee; DBS as usize]));
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "a write took a block whose discard is in flight"
    );
    let released = rt.call(0, {
        let (m, e) = (mem.clone(), events.clone());
        move || open_gate(&m, &e)
    });
    assert_eq!(released, 1);
    let (st, _, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(st, IoStatus::Success);

    // The new write landed in the freed block, after its discard completed.
    let ev = events.lock().unwrap().clone();
    let done_at = ev
        .iter()
        .position(|e| *e == Event::UnmapDone(first, nr))
        .unwrap();
    let reuse_at = ev
        .iter()
        .rposition(|e| matches!(e, Event::Write(o, _) if o / BPD == freed))
        .unwrap();
    assert!(
        reuse_at > done_at,
        "block {freed} reused before its discard: {ev:?}"
    );
    let reads = [(2, 0u8), (9, 0xee), (0, 1), (6, 7)];
    for (vb, byte) in reads {
        let got = ok(rt.io(0, &d, Req::Read(vb * BPD, BPD)));
        assert!(got.iter().all(|b| *b == byte), "thin block {vb}");
    }
    drop(d);
    thin::delete_pool_blocking("pd_pool").unwrap();
    let meta = bdev::BdevDesc::open("pd_meta", false, |_| {}).unwrap();
    let image = ok(rt.io(0, &Arc::new(meta), Req::Read(0, 256)));
    let io = pdata::MemBlockIo::from_image(image).unwrap();
    let rep = pdata::thin::check::check(&io, &pdata::thin::check::CheckOptions::default());
    assert!(rep.is_clean(), "metadata check failed:\n{rep}");
}
