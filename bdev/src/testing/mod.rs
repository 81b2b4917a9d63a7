//! Test bdevs that wrap any bdev: [`fault`] injects errors, latency, torn and misdirected
//! writes and a crash at the N-th flush; [`record`] logs every write and flush in order and
//! materialises the device contents at any prefix of that log (for crash-consistency tests).
//!
//! Both are virtual bdevs: they open their base for write, claim it, and forward each I/O's
//! buffer region to the base channel on the same reactor (`BdevChannel::submit_raw`), so a
//! wrapped I/O completes on the submitting reactor like any other.

pub mod fault;
pub mod record;

use crate::bdev::{BdevEvent, IoStatus};
use crate::desc::BdevDesc;
use crate::error::Result;
use crate::io::{BdevChannel, Completer, IoCallback, IoDone, ModuleIo, RawIo};
use std::cell::RefCell;
use std::rc::Rc;

/// Opens `base_name` for write and claims it for `module`.
pub(crate) fn open_and_claim(base_name: &str, module: &str) -> Result<BdevDesc> {
    let mut desc = BdevDesc::open(base_name, true, |_ev: BdevEvent| {})?;
    desc.claim(module)?;
    Ok(desc)
}

/// In-flight forwarded I/Os of one wrapper channel, indexed by the tag given to the base.
pub(crate) struct Inflight {
    ios: Vec<Option<(ModuleIo, u8)>>,
    free: Vec<u32>,
}

impl Inflight {
    pub fn new() -> Self {
        Inflight {
            ios: Vec::new(),
            free: Vec::new(),
        }
    }

    pub fn insert(&mut self, io: ModuleIo, flag: u8) -> u64 {
        match self.free.pop() {
            Some(i) => {
                self.ios[i as usize] = Some((io, flag));
                u64::from(i)
            }
            None => {
                self.ios.push(Some((io, flag)));
                (self.ios.len() - 1) as u64
            }
        }
    }

    pub fn remove(&mut self, tag: u64) -> Option<(ModuleIo, u8)> {
        let io = self.ios.get_mut(tag as usize)?.take()?;
        self.free.push(tag as u32);
        Some(io)
    }

    pub fn len(&self) -> usize {
        self.ios.len() - self.free.len()
    }
}

/// Forwards `io` (possibly rewritten as `raw`) to `base`, remembering `flag` for the
/// completion; on refusal completes it at once.
pub(crate) fn forward(
    base: &BdevChannel,
    inflight: &Rc<RefCell<Inflight>>,
    completer: &Completer,
    cb: &IoCallback,
    mut io: ModuleIo,
    raw: Option<RawIo>,
    flag: u8,
) {
    let raw = raw.unwrap_or_else(|| RawIo::forward(&mut io));
    let tag = inflight.borrow_mut().insert(io, flag);
    // SAFETY: the region belongs to `io`, which stays in `inflight` (not completed, buffer
    // not dropped) until the base completes this submission and the callback removes it.
    let r = unsafe { base.submit_raw(raw, tag, cb) };
    if let Err(e) = r {
        let removed = inflight.borrow_mut().remove(tag);
        if let Some((io, _)) = removed {
            completer.complete(io, IoStatus::Failed(e.errno()));
        }
    }
}

/// Polls `base` until every I/O forwarded by a wrapper channel came back (teardown only):
/// the base may still be writing into those I/Os' buffers.
pub(crate) fn drain_base(base: &BdevChannel, inflight: &Rc<RefCell<Inflight>>) {
    let mut spins = 0u64;
    while inflight.borrow().len() > 0 && spins < 100_000_000 {
        if base.poll() == 0 {
            std::thread::yield_now();
        }
        spins += 1;
    }
}

/// Builds the shared base-completion callback of a wrapper channel: it looks the forwarded
/// I/O up by tag and hands it, its flag and the base's result to `on_done`.
pub(crate) fn base_callback(
    inflight: Rc<RefCell<Inflight>>,
    on_done: impl Fn(ModuleIo, u8, &IoDone) + 'static,
) -> IoCallback {
    Rc::new(move |done: IoDone| {
        let entry = inflight.borrow_mut().remove(done.tag);
        if let Some((io, flag)) = entry {
            on_done(io, flag, &done);
        }
    })
}
