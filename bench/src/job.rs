//! One bdevperf job: a (bdev, core) pair that keeps `queue_depth` I/Os in flight through the
//! bdev's channel on its reactor until the time limit, then drains and hands back its stats.
//!
//! Each queue slot is a small state machine:
//!
//! | phase | next |
//! | --- | --- |
//! | `Io` (read/write/unmap/…) | submit the next I/O, or go idle when the job is draining |
//! | `VerifyWrite` | `VerifyCorrupt` if the corruption hook covers this I/O, else `VerifyRead` |
//! | `VerifyCorrupt` (test hook) | `VerifyRead` |
//! | `VerifyRead` | check the pattern; the next write |
//!
//! All of it is `!Send` and runs on the job's reactor: the completion callback borrows the job
//! mutably, submits the slot's next I/O and returns; a channel never calls back inside submit.
//! The job never reads the clock per I/O: "now" is the channel's tick count of the poll that
//! delivers the completion ([`BdevChannel::now_ticks`]) and an I/O's latency is the channel's
//! [`IoDone::latency_ticks`] (submit poll to completion poll), as SPDK's bdevperf takes both
//! from the thread's once-per-poll TSC reading. A null bdev completes every I/O in the poll
//! after its submit, so latencies are never zero. The completion → next-submit path is
//! inlined into the callback (no calls but the channel's submit and the statistics).

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bdev::{BdevChannel, IoBuf, IoCallback, IoDone, IoType, SubmitError};

use crate::clock::{self, Clock};
use crate::stats::JobStats;
use crate::verify;
use crate::workload::{Generator, Op, Workload};

/// Everything a job needs to know before it starts.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Bdev (and job) name.
    pub name: String,
    /// The workload.
    pub workload: Workload,
    /// `-M` (reads in percent) for mixed workloads.
    pub read_percent: u32,
    /// I/Os in flight.
    pub queue_depth: u32,
    /// Blocks per I/O.
    pub io_size_blocks: u64,
    /// Block size in bytes.
    pub block_size: u64,
    /// First block of the job's range (jobs sharing a bdev get disjoint ranges).
    pub first_block: u64,
    /// I/O units (of `io_size_blocks`) in the job's range; > 0.
    pub nr_units: u64,
    /// Seed for offsets and verify patterns.
    pub seed: u64,
    /// Whether verify compares data (false on bdevs that do not store data, e.g. null).
    pub verify_data: bool,
    /// Test hook: corrupt this LBA between a verify write and its read-back.
    pub inject_corruption_lba: Option<u64>,
}

/// What a finished job reports.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    /// Measured statistics.
    pub stats: JobStats,
    /// Ticks from start to the last completion.
    pub runtime_ticks: u64,
    /// The first error (failed I/O, refused submit, verify mismatch), which stopped the job.
    pub error: Option<String>,
}

/// What a job shares with the main thread: its completion counter for the progress line
/// (single writer, relaxed stores) and a stop request (checked once per poll).
#[derive(Debug, Default)]
pub struct Progress {
    /// I/Os completed so far.
    pub nr_completed: AtomicU64,
    /// Set by the main thread to end the job early (SIGINT/SIGTERM): it drains and reports.
    pub stop: AtomicBool,
}

enum Refusal {
    Channel(SubmitError),
    NoBuffer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Io,
    VerifyWrite,
    VerifyCorrupt,
    VerifyRead,
}

struct Slot {
    phase: Phase,
    buf: Option<IoBuf>,
    unit: u64,
    seed: u64,
}

struct State {
    spec: JobSpec,
    ch: BdevChannel,
    gen: Generator,
    slots: Vec<Slot>,
    stats: JobStats,
    progress: Arc<Progress>,
    start_ticks: u64,
    end_ticks: u64,
    last_ticks: u64,
    draining: bool,
    nr_inflight: u32,
    /// Slots whose submit was refused with ENOMEM; retried from `poll`.
    retry: Vec<u32>,
    /// Verify: units with an I/O in flight (bitmap), so no two slots touch one unit.
    busy_units: Vec<u64>,
    nr_writes: u64,
    corruption_pending: bool,
    error: Option<String>,
    on_done: Option<Box<dyn FnOnce(JobOutcome)>>,
    cb: Option<IoCallback>,
}

/// A running job; clone-free handle owned by its reactor's poller.
pub struct Job {
    state: Rc<RefCell<State>>,
}

impl Job {
    /// Starts the job on the calling thread: allocates its buffers, submits `queue_depth`
    /// I/Os and returns. `on_done` runs (on this thread, from [`Job::poll`]) once the job has
    /// drained after `duration_secs`, after its first error, or after `progress.stop` is set.
    pub fn start(
        spec: JobSpec,
        ch: BdevChannel,
        clock: Clock,
        duration_secs: f64,
        progress: Arc<Progress>,
        on_done: Box<dyn FnOnce(JobOutcome)>,
    ) -> Job {
        assert!(spec.queue_depth > 0 && spec.nr_units > 0 && spec.io_size_blocks > 0);
        let gen = Generator::new(spec.workload, spec.read_percent, spec.nr_units, spec.seed);
        let io_bytes = (spec.io_size_blocks * spec.block_size) as usize;
        let slots = (0..spec.queue_depth)
            .map(|_| Slot {
                phase: Phase::Idle,
                buf: spec.workload.needs_buffers().then(|| IoBuf::new(io_bytes)),
                unit: 0,
                seed: 0,
            })
            .collect();
        let now = clock::ticks();
        let busy_words = if spec.workload == Workload::Verify {
            spec.nr_units.div_ceil(64)
        } else {
            0
        };
        let state = Rc::new(RefCell::new(State {
            corruption_pending: spec.inject_corruption_lba.is_some(),
            gen,
            slots,
            stats: JobStats::new(),
            progress,
            start_ticks: now,
            end_ticks: now.saturating_add(clock.from_secs(duration_secs)),
            last_ticks: now,
            draining: false,
            nr_inflight: 0,
            retry: Vec::new(),
            busy_units: vec![0; busy_words as usize],
            nr_writes: 0,
            error: None,
            on_done: Some(on_done),
            cb: None,
            ch,
            spec,
        }));
        let weak: Weak<RefCell<State>> = Rc::downgrade(&state);
        let cb: IoCallback = Rc::new(move |done: IoDone| {
            if let Some(state) = weak.upgrade() {
                state.borrow_mut().complete(done);
            }
        });
        {
            let mut st = state.borrow_mut();
            st.cb = Some(cb);
            for tag in 0..st.spec.queue_depth {
                st.start_next(tag, now);
            }
            st.maybe_finish();
        }
        Job { state }
    }

    /// Delivers completions and retries refused submits. Returns work done (0 = idle).
    pub fn poll(&self) -> usize {
        let ch = {
            let mut st = self.state.borrow_mut();
            if st.progress.stop.load(Ordering::Relaxed) {
                st.draining = true;
            }
            st.ch.clone()
        };
        let mut work = ch.poll();
        let mut st = self.state.borrow_mut();
        if !st.retry.is_empty() {
            let retry = std::mem::take(&mut st.retry);
            work += retry.len();
            for tag in retry {
                st.resubmit(tag);
            }
        }
        st.maybe_finish();
        work
    }

    /// Whether the job has finished and reported.
    pub fn is_done(&self) -> bool {
        self.state.borrow().on_done.is_none()
    }
}

impl State {
    fn fail(&mut self, msg: String) {
        if self.error.is_none() {
            self.error = Some(format!("bdev {}: {msg}", self.spec.name));
        }
        self.draining = true;
    }

    fn unit_first_block(&self, unit: u64) -> u64 {
        self.spec.first_block + unit * self.spec.io_size_blocks
    }

    /// Picks the next unit, for verify one with no I/O in flight.
    #[inline(always)]
    fn pick_unit(&mut self) -> u64 {
        if self.busy_units.is_empty() {
            return self.gen.next_unit();
        }
        // queue_depth <= nr_units is enforced at setup, so a free unit turns up within
        // queue_depth + 1 draws of the sequential generator.
        loop {
            let unit = self.gen.next_unit();
            let (word, bit) = ((unit / 64) as usize, unit % 64);
            if let Some(w) = self.busy_units.get_mut(word) {
                if *w & (1 << bit) == 0 {
                    *w |= 1 << bit;
                    return unit;
                }
            }
        }
    }

    fn release_unit(&mut self, unit: u64) {
        if let Some(w) = self.busy_units.get_mut((unit / 64) as usize) {
            *w &= !(1 << (unit % 64));
        }
    }

    /// Starts the slot's next I/O (a new unit), or idles it when draining.
    #[inline(always)]
    fn start_next(&mut self, tag: u32, now: u64) {
        if self.draining || now >= self.end_ticks {
            self.draining = true;
            if let Some(slot) = self.slots.get_mut(tag as usize) {
                slot.phase = Phase::Idle;
            }
            return;
        }
        let unit = self.pick_unit();
        let op = self.gen.next_op();
        let first_block = self.unit_first_block(unit);
        let phase = if self.spec.workload == Workload::Verify {
            Phase::VerifyWrite
        } else {
            Phase::Io
        };
        let seed = if phase == Phase::VerifyWrite {
            self.nr_writes += 1;
            self.spec.seed ^ self.nr_writes.rotate_left(32)
        } else {
            0
        };
        let (block_size, verify_data) = (self.spec.block_size as usize, self.spec.verify_data);
        let Some(slot) = self.slots.get_mut(tag as usize) else {
            return;
        };
        slot.phase = phase;
        slot.unit = unit;
        slot.seed = seed;
        if phase == Phase::VerifyWrite && verify_data {
            if let Some(buf) = slot.buf.as_mut() {
                verify::stamp(buf, block_size, first_block, seed);
            }
        }
        self.submit(tag, op);
    }

    /// Resubmits the slot's current I/O (after ENOMEM).
    fn resubmit(&mut self, tag: u32) {
        let Some(slot) = self.slots.get(tag as usize) else {
            return;
        };
        let op = match slot.phase {
            Phase::Idle => return,
            Phase::VerifyWrite | Phase::VerifyCorrupt => Op::Write,
            Phase::VerifyRead => Op::Read,
            Phase::Io => self.gen.next_op(),
        };
        self.submit(tag, op);
    }

    #[inline(always)]
    fn submit(&mut self, tag: u32, op: Op) {
        match self.submit_to_channel(tag, op) {
            Ok(true) => self.nr_inflight += 1,
            Ok(false) => {}
            Err(Refusal::Channel(e)) => self.submit_failed(tag, op, e),
            Err(Refusal::NoBuffer) => self.fail(format!("{} without a buffer", op.name())),
        }
    }

    /// Hands the slot's I/O to the channel; `Ok(false)` when the job has already finished.
    /// Borrows the fields it needs one by one, so the callback is passed without cloning.
    #[inline(always)]
    fn submit_to_channel(&mut self, tag: u32, op: Op) -> Result<bool, Refusal> {
        let State {
            cb,
            slots,
            spec,
            ch,
            ..
        } = self;
        let (Some(cb), Some(slot)) = (cb.as_ref(), slots.get_mut(tag as usize)) else {
            return Ok(false);
        };
        let mut offset = spec.first_block + slot.unit * spec.io_size_blocks;
        let mut nr_blocks = spec.io_size_blocks;
        let tag64 = u64::from(tag);
        let result = match op {
            Op::Read | Op::Write => {
                let Some(mut buf) = slot.buf.take() else {
                    return Err(Refusal::NoBuffer);
                };
                if slot.phase == Phase::VerifyCorrupt {
                    // Overwrite one block of the unit with a foreign but well-formed pattern.
                    let lba = spec.inject_corruption_lba.unwrap_or(offset);
                    let bs = spec.block_size as usize;
                    buf.set_len(bs);
                    verify::stamp(&mut buf, bs, lba, slot.seed ^ verify::FOREIGN_SEED_XOR);
                    offset = lba;
                    nr_blocks = 1;
                } else if slot.phase == Phase::VerifyRead && spec.verify_data {
                    verify::poison(&mut buf, spec.block_size as usize, offset);
                }
                if op == Op::Read {
                    ch.read(buf, offset, nr_blocks, tag64, cb)
                } else {
                    ch.write(buf, offset, nr_blocks, tag64, cb)
                }
            }
            Op::Unmap => ch.unmap(offset, nr_blocks, tag64, cb),
            Op::Flush => ch.flush(offset, nr_blocks, tag64, cb),
            Op::WriteZeroes => ch.write_zeroes(offset, nr_blocks, tag64, cb),
        };
        result.map(|()| true).map_err(Refusal::Channel)
    }

    fn submit_failed(&mut self, tag: u32, op: Op, e: SubmitError) {
        let errno = e.errno();
        if let (Some(buf), Some(slot)) = (e.buf, self.slots.get_mut(tag as usize)) {
            slot.buf = Some(buf);
        }
        if errno == libc::ENOMEM {
            self.retry.push(tag);
            return;
        }
        self.fail(format!("{} submit refused: {}", op.name(), e.error));
        if let Some(slot) = self.slots.get_mut(tag as usize) {
            let unit = slot.unit;
            slot.phase = Phase::Idle;
            self.release_unit(unit);
        }
    }

    #[inline]
    fn complete(&mut self, done: IoDone) {
        let now = self.ch.now_ticks();
        self.last_ticks = now;
        self.nr_inflight = self.nr_inflight.saturating_sub(1);
        let tag = done.tag as u32;
        let Some(slot) = self.slots.get_mut(tag as usize) else {
            return;
        };
        if let Some(mut buf) = done.buf {
            let full = (self.spec.io_size_blocks * self.spec.block_size) as usize;
            if buf.len() != full {
                buf.set_len(full);
            }
            slot.buf = Some(buf);
        }
        let latency = done.latency_ticks;
        let (phase, unit, seed) = (slot.phase, slot.unit, slot.seed);
        if !done.status.is_success() {
            self.stats.record_failed();
            let (what, at) = (done.io_type.name(), done.offset_blocks);
            let errno = done.status.errno();
            self.stop_slot(
                tag,
                unit,
                format!("{what} at LBA {at} failed: errno {errno}"),
            );
        } else {
            match phase {
                Phase::Io => {
                    self.record_ok(latency);
                    self.start_next(tag, now);
                }
                Phase::VerifyWrite => self.after_verify_write(tag),
                Phase::VerifyCorrupt => self.set_phase_and_submit(tag, Phase::VerifyRead, Op::Read),
                Phase::VerifyRead => self.after_verify_read(tag, unit, seed, latency, now),
                Phase::Idle => {}
            }
        }
        self.maybe_finish();
    }

    /// Ends the slot's work with an error that stops the job.
    fn stop_slot(&mut self, tag: u32, unit: u64, error: String) {
        self.release_unit(unit);
        if let Some(slot) = self.slots.get_mut(tag as usize) {
            slot.phase = Phase::Idle;
        }
        self.fail(error);
    }

    fn after_verify_read(&mut self, tag: u32, unit: u64, seed: u64, latency: u64, now: u64) {
        self.release_unit(unit);
        let first = self.unit_first_block(unit);
        let bs = self.spec.block_size as usize;
        let checked = match (self.spec.verify_data, self.slots.get(tag as usize)) {
            (true, Some(Slot { buf: Some(buf), .. })) => verify::check(buf, bs, first, seed),
            _ => Ok(()),
        };
        match checked {
            Ok(()) => {
                self.record_ok(latency);
                self.start_next(tag, now);
            }
            Err(m) => {
                self.stats.record_failed();
                self.stop_slot(tag, unit, format!("verify failed: {m}"));
            }
        }
    }

    #[inline]
    fn record_ok(&mut self, latency: u64) {
        self.stats.record_ok(latency);
        self.progress
            .nr_completed
            .store(self.stats.nr_completed, Ordering::Relaxed);
    }

    fn after_verify_write(&mut self, tag: u32) {
        let Some(slot) = self.slots.get(tag as usize) else {
            return;
        };
        let first = self.unit_first_block(slot.unit);
        let covers = |lba: u64| (first..first + self.spec.io_size_blocks).contains(&lba);
        let corrupt =
            self.corruption_pending && self.spec.inject_corruption_lba.is_some_and(covers);
        if corrupt {
            self.corruption_pending = false;
            self.set_phase_and_submit(tag, Phase::VerifyCorrupt, Op::Write);
        } else {
            self.set_phase_and_submit(tag, Phase::VerifyRead, Op::Read);
        }
    }

    fn set_phase_and_submit(&mut self, tag: u32, phase: Phase, op: Op) {
        if let Some(slot) = self.slots.get_mut(tag as usize) {
            slot.phase = phase;
        }
        self.submit(tag, op);
    }

    /// Reports the outcome once nothing is in flight and the job is draining (or every slot
    /// went idle). Called after every completion, so the common case is one inlined compare.
    #[inline]
    fn maybe_finish(&mut self) {
        if self.nr_inflight == 0 && self.retry.is_empty() {
            self.finish_if_idle();
        }
    }

    #[cold]
    fn finish_if_idle(&mut self) {
        let any_active = self.slots.iter().any(|s| s.phase != Phase::Idle);
        if any_active && !self.draining {
            return;
        }
        let Some(on_done) = self.on_done.take() else {
            return;
        };
        self.cb = None;
        let outcome = JobOutcome {
            stats: std::mem::take(&mut self.stats),
            runtime_ticks: self.last_ticks.saturating_sub(self.start_ticks),
            error: self.error.take(),
        };
        on_done(outcome);
    }
}

/// Maps a workload's operations to the bdev I/O types it needs.
pub fn io_type_of(op: Op) -> IoType {
    match op {
        Op::Read => IoType::Read,
        Op::Write => IoType::Write,
        Op::Unmap => IoType::Unmap,
        Op::Flush => IoType::Flush,
        Op::WriteZeroes => IoType::WriteZeroes,
    }
}

#[cfg(test)]
mod tests;
