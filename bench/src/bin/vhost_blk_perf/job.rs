//! The measured loop: every queue keeps `depth` requests in flight, one thread busy-polls the
//! used rings round-robin, records each request's latency and resubmits at once.
//!
//! Request slot `i` of a queue owns descriptors `3i` (header, device-readable), `3i + 1`
//! (data: device-readable for writes, device-writable for reads) and `3i + 2` (status byte,
//! device-writable); its head is `3i`. A used element whose id is not the head of a slot in
//! flight is a backend bug and ends the run with an error.
//!
//! With `-w verify`, slot `g` of all slots only touches units `u` with `u % nr_slots == g`, so
//! no two requests in flight overlap: each write stamps its unit ([`crate::pattern`]) and is
//! followed by a read of the same unit whose data must carry that stamp.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::indexing_slicing))]

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::{VolatileRef, VolatileSlice};

use crate::cli::{Workload, DESCS_PER_IO};
use crate::pattern::{first_mismatch, stamp, Rng};
use crate::ring::{GuestMem, MemLayout, QueueLayout, Vring, HDR_BYTES};
use crate::session::Session;

/// Status byte written before submission; a completion that leaves it is reported.
const STATUS_UNSET: u8 = 0xff;
/// Longest latency the histogram holds (one hour, in ns); longer ones saturate.
const HIST_MAX_NS: u64 = 3_600_000_000_000;

/// What to run, with the device's geometry applied.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The workload.
    pub workload: Workload,
    /// Bytes per request.
    pub io_size: u64,
    /// Requests in flight per queue.
    pub depth: u32,
    /// Ring entries per queue.
    pub ring_size: u16,
    /// `io_size` units in the range the run touches.
    pub nr_units: u64,
    /// Measured time.
    pub duration: Duration,
    /// Fail when nothing completes for this long.
    pub io_timeout: Duration,
    /// Seed of offsets and stamps.
    pub seed: u64,
    /// Sequential workloads stop after one pass.
    pub one_pass: bool,
}

/// The results of a run.
#[derive(Debug)]
pub struct Stats {
    /// Requests completed inside the measured time.
    pub nr_ios: u64,
    /// Requests whose status was not VIRTIO_BLK_S_OK.
    pub nr_failed: u64,
    /// Verify reads whose data did not carry the expected stamp.
    pub nr_miscompares: u64,
    /// The first failure, for the error line.
    pub first_failure: Option<String>,
    /// Latency of every counted request, in nanoseconds.
    pub latency_ns: Histogram<u64>,
    /// Length of the measured time.
    pub runtime: Duration,
    /// Kicks written: publishes the device did not ask us to suppress (0 against a backend
    /// that polls with notifications off).
    pub nr_kicks: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

struct Slot<'m> {
    hdr_type: VolatileRef<'m, u32>,
    hdr_sector: VolatileRef<'m, u64>,
    status: VolatileRef<'m, u8>,
    data: VolatileSlice<'m>,
    data_gpa: u64,
    busy: bool,
    op: Op,
    unit: u64,
    start: Instant,
    /// Global slot number (verify partition).
    index: u64,
    /// Tag of this slot's last verify write; the read-back expects it.
    tag: u64,
    /// The last verify write completed OK, so the next request reads it back.
    read_back: bool,
}

struct QueueJob<'m> {
    ring: Vring<'m>,
    slots: Vec<Slot<'m>>,
    in_flight: u32,
}

/// Run state shared by every queue: offsets, counters, the histogram.
struct Shared {
    plan: Plan,
    rng: Rng,
    cursor: u64,
    exhausted: bool,
    nr_slots: u64,
    scratch: Vec<u8>,
    stats: Stats,
}

fn head_of(slot: usize) -> u16 {
    u16::try_from(slot * DESCS_PER_IO as usize).unwrap_or(u16::MAX)
}

fn slots_of<'m>(
    mem: &'m GuestMem,
    q: &QueueLayout,
    ring: &Vring<'m>,
    plan: &Plan,
    first_index: u64,
) -> Result<Vec<Slot<'m>>, String> {
    let mut slots = Vec::with_capacity(plan.depth as usize);
    for i in 0..plan.depth {
        let hdr = q.hdr + HDR_BYTES * u64::from(i);
        let status = q.status + u64::from(i);
        let data = q.data + plan.io_size * u64::from(i);
        let head = head_of(i as usize);
        ring.set_desc(head, GuestMem::gpa(hdr), 16, false, Some(head + 1));
        ring.set_desc(head + 2, GuestMem::gpa(status), 1, true, None);
        mem.value::<u32>(hdr + 4)?.store(0);
        let slot = Slot {
            hdr_type: mem.value(hdr)?,
            hdr_sector: mem.value(hdr + 8)?,
            status: mem.value(status)?,
            data: mem.slice(data, plan.io_size)?,
            data_gpa: GuestMem::gpa(data),
            busy: false,
            op: Op::Read,
            unit: 0,
            start: Instant::now(),
            index: first_index + u64::from(i),
            tag: 0,
            read_back: false,
        };
        slots.push(slot);
    }
    Ok(slots)
}

/// Fills every data buffer with non-zero bytes, so plain writes never write zeroes.
fn fill_buffers(slots: &[Slot<'_>], seed: u64, io_size: u64) -> Result<(), String> {
    let mut buf = vec![0u8; usize::try_from(io_size).map_err(|e| e.to_string())?];
    for s in slots {
        stamp(&mut buf, seed, s.index, u64::MAX);
        s.data.copy_from(&buf);
    }
    Ok(())
}

impl Shared {
    /// Picks the next request of `slot`; false when a one-pass run has covered its range.
    fn next_request(&mut self, slot: &mut Slot<'_>) -> bool {
        let plan = &self.plan;
        let (op, unit) = match plan.workload {
            Workload::RandRead => (Op::Read, self.rng.below(plan.nr_units)),
            Workload::RandWrite => (Op::Write, self.rng.below(plan.nr_units)),
            Workload::Read | Workload::Write => {
                if self.exhausted {
                    return false;
                }
                let unit = self.cursor;
                self.cursor += 1;
                if self.cursor == plan.nr_units {
                    self.cursor = 0;
                    self.exhausted = plan.one_pass;
                }
                let op = if plan.workload == Workload::Read {
                    Op::Read
                } else {
                    Op::Write
                };
                (op, unit)
            }
            Workload::Verify if slot.read_back => (Op::Read, slot.unit),
            Workload::Verify => {
                // Units g, g + n, g + 2n, ... belong to slot g of n.
                let mine = (plan.nr_units - slot.index).div_ceil(self.nr_slots);
                let unit = slot.index + self.nr_slots * self.rng.below(mine);
                slot.tag += 1;
                stamp(&mut self.scratch, plan.seed, unit * plan.io_size, slot.tag);
                slot.data.copy_from(&self.scratch);
                (Op::Write, unit)
            }
        };
        slot.op = op;
        slot.unit = unit;
        true
    }

    /// Accounts a completion of `slot` observed at `now`.
    fn complete(&mut self, slot: &mut Slot<'_>, now: Instant, deadline: Instant) {
        let status = slot.status.load();
        let ok = u32::from(status) == VIRTIO_BLK_S_OK;
        let sector = slot.unit * self.plan.io_size / 512;
        if !ok {
            self.stats.nr_failed += 1;
            self.note_failure(|| {
                let what = if status == STATUS_UNSET {
                    "left unset"
                } else {
                    "set"
                };
                format!("{:?} of sector {sector}: status {status} ({what})", slot.op)
            });
        }
        if self.plan.workload == Workload::Verify {
            self.check_verify(slot, ok, sector);
        }
        if now <= deadline {
            self.stats.nr_ios += 1;
            let ns = u64::try_from((now - slot.start).as_nanos()).unwrap_or(u64::MAX);
            self.stats.latency_ns.saturating_record(ns.max(1));
        }
    }

    fn check_verify(&mut self, slot: &mut Slot<'_>, ok: bool, sector: u64) {
        let was_read = slot.op == Op::Read;
        slot.read_back = ok && !was_read;
        if !ok || !was_read {
            return;
        }
        slot.data.copy_to(&mut self.scratch);
        let offset = slot.unit * self.plan.io_size;
        if let Some(at) = first_mismatch(&self.scratch, self.plan.seed, offset, slot.tag) {
            self.stats.nr_miscompares += 1;
            self.note_failure(|| {
                format!("miscompare reading back sector {sector}: byte {at} differs")
            });
        }
    }

    fn note_failure(&mut self, what: impl FnOnce() -> String) {
        if self.stats.first_failure.is_none() {
            self.stats.first_failure = Some(what());
        }
    }
}

impl QueueJob<'_> {
    /// Submits slot `i` if the workload has a request for it.
    fn submit(&mut self, i: usize, shared: &mut Shared) -> bool {
        let Some(slot) = self.slots.get_mut(i) else {
            return false;
        };
        if !shared.next_request(slot) {
            return false;
        }
        let io_size = shared.plan.io_size;
        let (t, device_writes) = match slot.op {
            Op::Read => (VIRTIO_BLK_T_IN, true),
            Op::Write => (VIRTIO_BLK_T_OUT, false),
        };
        slot.hdr_type.store(t.to_le());
        slot.hdr_sector.store((slot.unit * io_size / 512).to_le());
        slot.status.store(STATUS_UNSET);
        let head = head_of(i);
        let len = u32::try_from(io_size).unwrap_or(u32::MAX);
        self.ring
            .set_desc(head + 1, slot.data_gpa, len, device_writes, Some(head + 2));
        slot.busy = true;
        slot.start = Instant::now();
        self.ring.push(head);
        self.in_flight += 1;
        true
    }

    /// Reaps every used element; resubmits unless `stopping`. Returns how many completed.
    fn poll(
        &mut self,
        shared: &mut Shared,
        stopping: bool,
        deadline: Instant,
    ) -> Result<u32, String> {
        let n = self.ring.nr_used();
        if n == 0 {
            return Ok(0);
        }
        if n > self.ring.size() {
            return Err(format!(
                "used index moved by {n}, more than the ring's {}",
                self.ring.size()
            ));
        }
        let now = Instant::now();
        for _ in 0..n {
            let (id, _len) = self.ring.pop_used();
            let i = self.slot_of(id)?;
            let slot = self.slots.get_mut(i).ok_or("slot index")?;
            slot.busy = false;
            self.in_flight -= 1;
            shared.complete(slot, now, deadline);
            if !stopping {
                self.submit(i, shared);
            }
        }
        self.ring.push_used_event();
        Ok(u32::from(n))
    }

    fn slot_of(&self, id: u32) -> Result<usize, String> {
        let i = (id / DESCS_PER_IO) as usize;
        let busy = self.slots.get(i).is_some_and(|s| s.busy);
        if !id.is_multiple_of(DESCS_PER_IO) || !busy {
            return Err(format!(
                "backend returned used id {id}, which is not a request in flight"
            ));
        }
        Ok(i)
    }
}

/// Starts every queue of the session, runs `plan`, drains and stops the queues.
pub fn run(
    session: &mut Session,
    mem: &GuestMem,
    layout: &MemLayout,
    plan: Plan,
) -> Result<Stats, String> {
    let nr_queues = layout.queues.len();
    let mut queues = Vec::with_capacity(nr_queues);
    for (q, l) in layout.queues.iter().enumerate() {
        let ring = Vring::new(mem, l, plan.ring_size, event_idx(session))?;
        let first = u64::from(plan.depth) * q as u64;
        let slots = slots_of(mem, l, &ring, &plan, first)?;
        fill_buffers(&slots, plan.seed, plan.io_size)?;
        session.start_queue(mem, layout, q, plan.ring_size)?;
        queues.push(QueueJob {
            ring,
            slots,
            in_flight: 0,
        });
    }
    let latency_ns = Histogram::new_with_bounds(1, HIST_MAX_NS, 3).map_err(|e| e.to_string())?;
    let mut shared = Shared {
        rng: Rng::new(plan.seed),
        cursor: 0,
        exhausted: false,
        nr_slots: u64::from(plan.depth) * nr_queues as u64,
        scratch: vec![0u8; usize::try_from(plan.io_size).map_err(|e| e.to_string())?],
        stats: Stats {
            nr_ios: 0,
            nr_failed: 0,
            nr_miscompares: 0,
            first_failure: None,
            latency_ns,
            runtime: Duration::ZERO,
            nr_kicks: 0,
        },
        plan,
    };
    let runtime = drive(session, &mut queues, &mut shared)?;
    for (q, job) in queues.iter().enumerate() {
        let base = session.stop_queue(q)?;
        if base != u32::from(job.ring.next_avail()) {
            return Err(format!(
                "queue {q}: GET_VRING_BASE says {base}, the driver made {} requests available",
                job.ring.next_avail()
            ));
        }
    }
    shared.stats.runtime = runtime;
    Ok(shared.stats)
}

fn event_idx(session: &Session) -> bool {
    let bit = 1u64 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    session.device.acked_features & bit != 0
}

/// The busy-poll loop; returns the measured time.
fn drive(
    session: &Session,
    queues: &mut [QueueJob<'_>],
    shared: &mut Shared,
) -> Result<Duration, String> {
    let start = Instant::now();
    let deadline = start + shared.plan.duration;
    for (q, job) in queues.iter_mut().enumerate() {
        for i in 0..job.slots.len() {
            job.submit(i, shared);
        }
        if job.ring.publish() {
            session.kick(q)?;
            shared.stats.nr_kicks += 1;
        }
    }
    let mut last_progress = start;
    let mut stop_at = None;
    loop {
        let stopping = stop_at.is_some();
        let mut done = 0;
        for (q, job) in queues.iter_mut().enumerate() {
            done += job.poll(shared, stopping, deadline)?;
            if job.ring.publish() {
                session.kick(q)?;
                shared.stats.nr_kicks += 1;
            }
        }
        let now = Instant::now();
        let in_flight: u32 = queues.iter().map(|j| j.in_flight).sum();
        if stop_at.is_none() && (now >= deadline || in_flight == 0) {
            stop_at = Some(now.min(deadline));
        }
        if stopping && in_flight == 0 {
            break;
        }
        if done > 0 {
            last_progress = now;
        } else if now - last_progress > shared.plan.io_timeout {
            return Err(format!(
                "no completion for {:.1} s with {in_flight} requests in flight",
                shared.plan.io_timeout.as_secs_f64()
            ));
        }
    }
    Ok(stop_at.unwrap_or(deadline) - start)
}
