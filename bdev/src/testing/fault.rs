//! `FaultBdev`: passes I/O through to a base bdev and injects faults, for tests of the layers
//! above (STYLE rule 23). Faults are set at any time through [`FaultBdev::config`]:
//!
//! - `error_ppm[io_type]`: fail that share (parts per million) of I/Os with `EIO` without
//!   touching the base;
//! - `delay_polls`: hold each completion for that many channel polls (latency);
//! - `torn_ppm`: write only the first half of a multi-block write, then fail it with `EIO`;
//! - `misdirect_ppm`: write to another offset (the next block range, wrapping) and report
//!   success;
//! - `crash_at_flush`: the N-th flush (1-based), every I/O after it and every I/O still in
//!   flight fail with `EIO`, as if power was lost before that flush reached the media.
//!
//! Randomness is a per-channel SplitMix64 seeded from `seed` and the channel number, so a run
//! is reproducible for a given submission order.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::bdev::{Bdev, BdevCore, BdevCoreOpts, IoStatus, IoType};
use crate::desc::BdevDesc;
use crate::error::Result;
use crate::io::{BdevChannel, Completer, IoCallback, ModuleChannel, ModuleIo, RawIo};
use crate::registry::registry;

use super::{base_callback, drain_base, forward, open_and_claim, Inflight};

/// Module name.
pub const MODULE_NAME: &str = "fault";

/// Fault settings, shared by all channels; change them at any time.
#[derive(Default)]
pub struct FaultConfig {
    /// Per-I/O-type error probability in parts per million, indexed by `IoType as usize`.
    pub error_ppm: [AtomicU32; 6],
    /// Completions are held back for this many channel polls.
    pub delay_polls: AtomicU32,
    /// Probability (ppm) that a write is torn.
    pub torn_ppm: AtomicU32,
    /// Probability (ppm) that a write lands at the wrong offset.
    pub misdirect_ppm: AtomicU32,
    /// Crash at this flush number (1-based); 0 = never.
    pub crash_at_flush: AtomicU64,
    /// PRNG seed.
    pub seed: AtomicU64,
    /// Flushes seen so far (all channels).
    pub nr_flushes: AtomicU64,
    /// Set once crashed: everything fails.
    pub crashed: AtomicBool,
    /// Faults injected so far.
    pub nr_injected: AtomicU64,
    nr_channels: AtomicU64,
}

impl FaultConfig {
    /// Sets the error probability for `io_type`.
    pub fn set_error_ppm(&self, io_type: IoType, ppm: u32) {
        self.error_ppm[io_type as usize].store(ppm, Ordering::Relaxed);
    }
}

/// The fault-injecting bdev.
pub struct FaultBdev {
    core: BdevCore,
    base: Arc<dyn Bdev>,
    desc: BdevDesc,
    config: Arc<FaultConfig>,
}

impl FaultBdev {
    /// The live fault settings.
    pub fn config(&self) -> &Arc<FaultConfig> {
        &self.config
    }
}

impl Bdev for FaultBdev {
    fn core(&self) -> &BdevCore {
        &self.core
    }

    fn io_type_supported(&self, io_type: IoType) -> bool {
        self.base.io_type_supported(io_type)
    }

    fn create_channel(&self, completer: Completer) -> Result<Box<dyn ModuleChannel>> {
        let base = self.desc.get_io_channel()?;
        let inflight = Rc::new(RefCell::new(Inflight::new()));
        let held: Rc<RefCell<VecDeque<Held>>> = Rc::default();
        let nr = self.config.nr_channels.fetch_add(1, Ordering::Relaxed);
        let state = Rc::new(RefCell::new(ChanState {
            rng: self.config.seed.load(Ordering::Relaxed) ^ nr.wrapping_mul(0x9E37_79B9),
            polls: 0,
        }));
        let cfg = self.config.clone();
        let (h, st, c) = (held.clone(), state.clone(), completer.clone());
        let cb = base_callback(inflight.clone(), move |io: ModuleIo, flag, done| {
            let mut status = done.status;
            if flag == TORN || cfg.crashed.load(Ordering::Relaxed) {
                status = IoStatus::Failed(libc::EIO);
            }
            finish(&cfg, &h, &st, &c, io, status);
        });
        Ok(Box::new(FaultChannel {
            base,
            inflight,
            completer,
            cb,
            config: self.config.clone(),
            held,
            state,
            num_blocks: self.core.num_blocks(),
            block_size: self.core.block_size() as usize,
        }))
    }

    fn destruct(&self) {
        self.desc.release_claim();
    }
}

/// Flag of a forwarded write that was torn on purpose: fail it when the base completes.
const TORN: u8 = 1;

struct ChanState {
    rng: u64,
    polls: u64,
}

impl ChanState {
    fn next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn hit(&mut self, ppm: u32) -> bool {
        ppm > 0 && self.next() % 1_000_000 < u64::from(ppm)
    }
}

struct Held {
    io: ModuleIo,
    status: IoStatus,
    release_at: u64,
}

fn finish(
    cfg: &FaultConfig,
    held: &Rc<RefCell<VecDeque<Held>>>,
    state: &Rc<RefCell<ChanState>>,
    completer: &Completer,
    io: ModuleIo,
    status: IoStatus,
) {
    let delay = u64::from(cfg.delay_polls.load(Ordering::Relaxed));
    if delay == 0 {
        completer.complete(io, status);
        return;
    }
    let release_at = state.borrow().polls + delay;
    held.borrow_mut().push_back(Held {
        io,
        status,
        release_at,
    });
}

struct FaultChannel {
    base: BdevChannel,
    inflight: Rc<RefCell<Inflight>>,
    completer: Completer,
    cb: IoCallback,
    config: Arc<FaultConfig>,
    held: Rc<RefCell<VecDeque<Held>>>,
    state: Rc<RefCell<ChanState>>,
    num_blocks: u64,
    block_size: usize,
}

impl FaultChannel {
    fn inject(&mut self, io: ModuleIo, status: IoStatus) {
        self.config.nr_injected.fetch_add(1, Ordering::Relaxed);
        finish(
            &self.config,
            &self.held,
            &self.state,
            &self.completer,
            io,
            status,
        );
    }
}

impl ModuleChannel for FaultChannel {
    fn submit(&mut self, mut io: ModuleIo) {
        let cfg = self.config.clone();
        let t = io.io_type();
        if t == IoType::Flush {
            let n = cfg.nr_flushes.fetch_add(1, Ordering::Relaxed) + 1;
            let at = cfg.crash_at_flush.load(Ordering::Relaxed);
            if at != 0 && n >= at {
                cfg.crashed.store(true, Ordering::Relaxed);
            }
        }
        if cfg.crashed.load(Ordering::Relaxed) {
            return self.inject(io, IoStatus::Failed(libc::EIO));
        }
        let mut st = self.state.borrow_mut();
        if st.hit(cfg.error_ppm[t as usize].load(Ordering::Relaxed)) {
            drop(st);
            return self.inject(io, IoStatus::Failed(libc::EIO));
        }
        if t == IoType::Write && io.num_blocks() > 1 && st.hit(cfg.torn_ppm.load(Ordering::Relaxed))
        {
            drop(st);
            // Write only the first half, then fail the I/O when the base completes.
            let mut raw = RawIo::forward(&mut io);
            raw.num_blocks /= 2;
            raw.len = raw.num_blocks as usize * self.block_size;
            cfg.nr_injected.fetch_add(1, Ordering::Relaxed);
            let (base, inflight, c, cb) = (&self.base, &self.inflight, &self.completer, &self.cb);
            return forward(base, inflight, c, cb, io, Some(raw), TORN);
        }
        if t == IoType::Write && st.hit(cfg.misdirect_ppm.load(Ordering::Relaxed)) {
            drop(st);
            let mut raw = RawIo::forward(&mut io);
            let n = raw.num_blocks;
            raw.offset_blocks = (raw.offset_blocks + n) % (self.num_blocks - n + 1);
            cfg.nr_injected.fetch_add(1, Ordering::Relaxed);
            let (base, inflight, c, cb) = (&self.base, &self.inflight, &self.completer, &self.cb);
            return forward(base, inflight, c, cb, io, Some(raw), 0);
        }
        drop(st);
        forward(
            &self.base,
            &self.inflight,
            &self.completer,
            &self.cb,
            io,
            None,
            0,
        );
    }

    fn poll(&mut self) -> usize {
        let mut work = self.base.poll();
        let now = {
            let mut st = self.state.borrow_mut();
            st.polls += 1;
            st.polls
        };
        loop {
            let ready = matches!(self.held.borrow().front(), Some(h) if h.release_at <= now);
            if !ready {
                break;
            }
            if let Some(h) = self.held.borrow_mut().pop_front() {
                self.completer.complete(h.io, h.status);
                work += 1;
            }
        }
        work + usize::from(!self.held.borrow().is_empty())
    }

    fn nr_inflight(&self) -> usize {
        self.inflight.borrow().len() + self.held.borrow().len()
    }
}

impl Drop for FaultChannel {
    fn drop(&mut self) {
        drain_base(&self.base, &self.inflight);
    }
}

/// Creates and registers a fault-injecting bdev `name` over `base_name` (claimed), with no
/// faults enabled. Errors: `ENODEV` no base, `EPERM` base claimed, `EEXIST` name taken.
pub fn create(name: &str, base_name: &str) -> Result<Arc<FaultBdev>> {
    let desc = open_and_claim(base_name, MODULE_NAME)?;
    let base = desc.bdev().clone();
    let core = BdevCore::new(BdevCoreOpts {
        name: name.to_string(),
        aliases: Vec::new(),
        uuid: None,
        product_name: "Fault injection disk",
        module_name: MODULE_NAME,
        block_size: base.block_size(),
        num_blocks: base.num_blocks(),
        optimal_io_boundary: base.optimal_io_boundary(),
        write_cache: true,
    })?;
    let bdev = Arc::new(FaultBdev {
        core,
        base,
        desc,
        config: Arc::default(),
    });
    registry().register(bdev.clone())?;
    Ok(bdev)
}
