//! Polling one split virtqueue from the reactor that owns it.
//!
//! A [`VringStart`] is built by the controller's home reactor when a ring is started and
//! enabled, and sent to the ring's reactor, which registers a poller. The poller takes new
//! heads from the avail ring (bounded per tick), turns them into bdev I/O on this reactor's
//! channel, and on completion writes data and status to guest memory, publishes the used entry
//! and signals the call eventfd (batched, honouring NO_INTERRUPT / used_event).
//!
//! Notifications: in poll mode guest kicks are suppressed (`used.flags = NO_NOTIFY`, or a stale
//! `avail_event` with EVENT_IDX). In interrupt mode notifications stay on and the kick eventfd
//! is watched with an io_uring PollAdd, so an idle reactor sleeps.
//!
//! Stopping: the home reactor sends a stop; the worker takes no new heads, waits for its
//! in-flight bdev I/O, then reports the next avail index back and drops its channel here.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bdev::{BdevChannel, IoBuf, IoCallback, IoDone, IoStatus};
use reactor::{OnComplete, Op, OpId, PollStatus, PollerHandle};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use crate::blk::{self, BlkOp, Segment};
use crate::device::Shared;
use crate::inflight::InflightRegion;
use crate::memory::GuestMem;

/// Heads taken from the avail ring per poll.
const BATCH: usize = 32;

/// Everything a ring needs to run, moved to its reactor.
pub struct VringStart {
    /// Controller instance id.
    pub ctrlr_id: u64,
    /// Queue index.
    pub index: u16,
    /// Guest memory.
    pub mem: Arc<GuestMem>,
    /// The configured ring (addresses, size, next avail, event idx), ready.
    pub queue: Queue,
    /// Kick eventfd (watched in interrupt mode).
    pub kick: Option<File>,
    /// Call eventfd.
    pub call: Option<File>,
    /// Error eventfd, signalled when the ring breaks.
    pub err: Option<File>,
    /// In-flight tracking region.
    pub inflight: Option<InflightRegion>,
    /// Controller-wide state (bdev, limits, serial).
    pub shared: Arc<Shared>,
}

/// What a stopped ring reports back.
#[derive(Debug, Clone, Copy)]
pub struct VringStopped {
    /// Queue index.
    pub index: u16,
    /// Next avail index to process.
    pub next_avail: u16,
    /// The ring hit a malformed chain and stopped processing.
    pub broken: bool,
}

/// Callback for a finished stop.
pub type StopDone = Box<dyn FnOnce(VringStopped) + Send>;

struct Req {
    op: BlkOp,
    data: Vec<Segment>,
    status_gpa: u64,
}

struct Worker {
    index: u16,
    key: (u64, u16),
    mem: Arc<GuestMem>,
    queue: Queue,
    desc_table: u64,
    size: u16,
    ch: Option<BdevChannel>,
    cb: IoCallback,
    done_q: Rc<RefCell<VecDeque<IoDone>>>,
    reqs: Vec<Option<Req>>,
    nr_inflight: usize,
    call: Option<File>,
    err: Option<File>,
    kick: Option<Rc<File>>,
    kick_armed: Rc<Cell<bool>>,
    kick_op: Option<OpId>,
    inflight: Option<InflightRegion>,
    counter: u64,
    resubmit: VecDeque<u16>,
    stopping: Option<StopDone>,
    broken: bool,
    need_signal: bool,
    interrupt: bool,
    shared: Arc<Shared>,
    poller: Option<PollerHandle>,
}

type WorkerMap = HashMap<(u64, u16), Rc<RefCell<Worker>>>;

thread_local! {
    static WORKERS: RefCell<WorkerMap> = RefCell::new(HashMap::new());
}

/// Starts a ring on the current reactor.
pub fn start(s: VringStart) {
    let done_q: Rc<RefCell<VecDeque<IoDone>>> = Rc::new(RefCell::new(VecDeque::new()));
    let q2 = done_q.clone();
    // A completion may be delivered by the channel's own poller after ours ran in this tick:
    // the first one queued sends a no-op message so the reactor ticks again (and our poller
    // runs) instead of going idle in interrupt mode.
    let cb: IoCallback = Rc::new(move |d: IoDone| {
        let mut q = q2.borrow_mut();
        if q.is_empty() {
            reactor::send_msg(reactor::current(), || {});
        }
        q.push_back(d);
    });
    let ch = s.shared.channel();
    let size = s.queue.size();
    let mut w = Worker {
        index: s.index,
        key: (s.ctrlr_id, s.index),
        desc_table: s.queue.desc_table(),
        size,
        mem: s.mem,
        queue: s.queue,
        ch,
        cb,
        done_q,
        reqs: (0..size).map(|_| None).collect(),
        nr_inflight: 0,
        call: s.call,
        err: s.err,
        kick: s.kick.map(Rc::new),
        kick_armed: Rc::new(Cell::new(false)),
        kick_op: None,
        inflight: s.inflight,
        counter: 0,
        resubmit: VecDeque::new(),
        stopping: None,
        broken: false,
        need_signal: false,
        interrupt: reactor::is_interrupt_mode(),
        shared: s.shared,
        poller: None,
    };
    w.recover_inflight();
    if !w.interrupt {
        let _ = w.queue.disable_notification(&w.mem.mem);
    }
    let key = w.key;
    let w = Rc::new(RefCell::new(w));
    let w2 = w.clone();
    let poller = reactor::register_poller("vhost_vring", move || w2.borrow_mut().poll());
    w.borrow_mut().poller = Some(poller);
    WORKERS.with(|m| m.borrow_mut().insert(key, w));
}

/// Stops ring `(ctrlr_id, index)` on the current reactor; `done` runs once it has drained.
pub fn stop(ctrlr_id: u64, index: u16, done: StopDone) {
    let w = WORKERS.with(|m| m.borrow().get(&(ctrlr_id, index)).cloned());
    match w {
        Some(w) => w.borrow_mut().stopping = Some(done),
        None => done(VringStopped {
            index,
            next_avail: 0,
            broken: true,
        }),
    }
}

impl Worker {
    fn recover_inflight(&mut self) {
        let Some(region) = self.inflight.clone() else {
            return;
        };
        let used_idx = self
            .queue
            .used_idx(&self.mem.mem, Ordering::Acquire)
            .map(|w| w.0)
            .unwrap_or(0);
        if region.version() != crate::inflight::VERSION || region.desc_num() != self.size {
            region.init(self.size, used_idx);
            return;
        }
        let (last_batch_head, recorded_used) = region.batch();
        if recorded_used != used_idx {
            // The last batch reached the used ring but not the region: it is complete.
            region.clear(last_batch_head);
            region.set_used_idx(used_idx);
        }
        let pending = region.pending(self.size);
        if pending.is_empty() {
            return;
        }
        self.counter = pending.iter().map(|p| p.0).max().unwrap_or(0);
        self.resubmit = pending.iter().map(|p| p.1).collect();
        let n = u16::try_from(pending.len()).unwrap_or(u16::MAX);
        self.queue.set_next_avail(used_idx.wrapping_add(n));
        crate::log(&format!(
            "vring {}: resubmitting {} in-flight request(s) after reconnect",
            self.index, n
        ));
    }

    fn poll(&mut self) -> PollStatus {
        let mut work = 0usize;
        if let Some(ch) = &self.ch {
            work += ch.poll();
        }
        loop {
            let d = self.done_q.borrow_mut().pop_front();
            let Some(d) = d else { break };
            self.complete_io(d);
            work += 1;
        }
        if self.stopping.is_none() && !self.broken {
            work += self.process_avail();
        }
        self.signal();
        if self.stopping.is_some() && self.nr_inflight == 0 {
            self.finish_stop();
            return PollStatus::Busy;
        }
        if work > 0 || (self.nr_inflight > 0 && !self.interrupt) {
            return PollStatus::Busy;
        }
        if self.interrupt && self.stopping.is_none() && !self.broken {
            match self.queue.enable_notification(&self.mem.mem) {
                Ok(true) => return PollStatus::Busy,
                Ok(false) => self.arm_kick(),
                Err(_) => self.set_broken("ring not in guest memory"),
            }
        }
        PollStatus::Idle
    }

    fn arm_kick(&mut self) {
        let Some(kick) = self.kick.clone() else {
            return;
        };
        if self.kick_armed.get() {
            return;
        }
        let armed = self.kick_armed.clone();
        let fd = kick.as_raw_fd();
        let on = OnComplete::closure(move |_c| {
            armed.set(false);
            let mut v = [0u8; 8];
            // SAFETY: reading 8 bytes into a local buffer from the kick eventfd, which `kick`
            // (captured) keeps open; POLLIN said it is readable, so this does not block.
            unsafe { libc::read(kick.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
        });
        let op = Op::PollAdd {
            fd: fd.into(),
            events: libc::POLLIN as u32,
        };
        if let Ok(id) = reactor::ring().submit(op, on) {
            self.kick_armed.set(true);
            self.kick_op = Some(id);
        }
    }

    fn set_broken(&mut self, why: &str) {
        if !self.broken {
            crate::log(&format!(
                "vring {}: broken ({why}); needs reset",
                self.index
            ));
            self.broken = true;
            if let Some(mut e) = self.err.as_ref() {
                let _ = e.write_all(&1u64.to_ne_bytes());
            }
        }
    }

    fn process_avail(&mut self) -> usize {
        let mut n = 0;
        while n < BATCH {
            let Some(head) = self.resubmit.pop_front() else {
                break;
            };
            self.start_req(head, false);
            n += 1;
        }
        let mem = self.mem.clone();
        let mut heads = Vec::with_capacity(BATCH);
        match self.queue.iter(&mem.mem) {
            Ok(iter) => {
                for chain in iter.take(BATCH - n) {
                    heads.push(chain.head_index());
                }
            }
            Err(e) => {
                self.set_broken(&format!("avail ring: {e}"));
                return n;
            }
        }
        for head in heads {
            if self.broken {
                break;
            }
            self.start_req(head, true);
            n += 1;
        }
        n
    }

    fn start_req(&mut self, head: u16, track: bool) {
        if usize::from(head) >= self.reqs.len() || self.reqs[usize::from(head)].is_some() {
            self.set_broken(&format!("head {head} reused while in flight"));
            return;
        }
        let chain = match blk::walk_chain(&self.mem.mem, self.desc_table, self.size, head) {
            Ok(c) => c,
            Err(e) => {
                self.set_broken(&format!("head {head}: {e}"));
                return;
            }
        };
        let Some(last) = chain.writable.last().copied() else {
            self.set_broken(&format!("head {head}: no writable status byte"));
            return;
        };
        if track {
            if let Some(r) = &self.inflight {
                self.counter += 1;
                r.set_inflight(head, self.counter);
            }
        }
        let status_gpa = last.gpa + u64::from(last.len) - 1;
        let mut data = chain.writable.clone();
        if let Some(l) = data.last_mut() {
            l.len -= 1;
            if l.len == 0 {
                data.pop();
            }
        }
        self.nr_inflight += 1;
        let hdr_ok = blk::total_len(&chain.readable) >= blk::HEADER_LEN;
        let limits = self.shared.limits();
        let op = if hdr_ok {
            blk::decode(&self.mem.mem, &chain, &limits)
        } else {
            Err(blk::Reject::IoErr)
        };
        let op = match op {
            Ok(op) => op,
            Err(r) => {
                self.reqs[usize::from(head)] = Some(Req {
                    op: BlkOp::Flush,
                    data,
                    status_gpa,
                });
                self.finish(head, r.status(), 1);
                return;
            }
        };
        self.reqs[usize::from(head)] = Some(Req {
            op: op.clone(),
            data,
            status_gpa,
        });
        self.submit(head, &op, &chain.readable);
    }

    fn submit(&mut self, head: u16, op: &BlkOp, readable: &[Segment]) {
        const OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
        const IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
        let tag = u64::from(head);
        let bs = u64::from(self.shared.block_size);
        let res = match (op, &self.ch) {
            (BlkOp::GetId, _) => {
                let serial = self.shared.serial();
                let data = &self.reqs[usize::from(head)]
                    .as_ref()
                    .map(|r| r.data.clone());
                let data = data.as_deref().unwrap_or(&[]);
                let n = (blk::total_len(data) as usize).min(blk::ID_BYTES);
                let ok = blk::scatter(&self.mem.mem, data, 0, &serial[..n]);
                let used = u32::try_from(n).unwrap_or(0) + 1;
                self.finish(head, if ok { OK } else { IOERR }, used);
                return;
            }
            (BlkOp::Read { len: 0, .. } | BlkOp::Write { len: 0, .. }, _)
            | (BlkOp::Discard { len: 0, .. } | BlkOp::WriteZeroes { len: 0, .. }, _) => {
                self.finish(head, OK, 1);
                return;
            }
            (_, None) => Err(()),
            (BlkOp::Read { offset, len }, Some(ch)) => {
                let buf = IoBuf::alloc(*len as usize);
                ch.read_at(buf, *offset, tag, &self.cb).map_err(|_| ())
            }
            (BlkOp::Write { offset, len }, Some(ch)) => {
                let mut buf = IoBuf::alloc(*len as usize);
                if !blk::gather(&self.mem.mem, readable, blk::HEADER_LEN, &mut buf[..]) {
                    Err(())
                } else {
                    ch.write_at(buf, *offset, tag, &self.cb).map_err(|_| ())
                }
            }
            (BlkOp::Flush, Some(ch)) => ch.flush(0, 0, tag, &self.cb).map_err(|_| ()),
            (BlkOp::Discard { offset, len }, Some(ch)) => ch
                .unmap(offset / bs, len / bs, tag, &self.cb)
                .map_err(|_| ()),
            (BlkOp::WriteZeroes { offset, len }, Some(ch)) => ch
                .write_zeroes(offset / bs, len / bs, tag, &self.cb)
                .map_err(|_| ()),
        };
        if res.is_err() {
            self.finish(head, IOERR, 1);
        }
    }

    fn complete_io(&mut self, d: IoDone) {
        const OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
        const IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
        let Ok(head) = u16::try_from(d.tag) else {
            return;
        };
        let Some(req) = self.reqs.get(usize::from(head)).and_then(|r| r.as_ref()) else {
            return;
        };
        if d.status != IoStatus::Success {
            self.finish(head, IOERR, 1);
            return;
        }
        if let (BlkOp::Read { len, .. }, Some(buf)) = (&req.op, &d.buf) {
            let len = *len;
            let ok = blk::scatter(&self.mem.mem, &req.data, 0, &buf[..len as usize]);
            let used = u32::try_from(len).unwrap_or(u32::MAX).saturating_add(1);
            self.finish(head, if ok { OK } else { IOERR }, used);
            return;
        }
        self.finish(head, OK, 1);
    }

    fn finish(&mut self, head: u16, status: u8, used_len: u32) {
        let Some(req) = self.reqs.get_mut(usize::from(head)).and_then(Option::take) else {
            return;
        };
        self.nr_inflight -= 1;
        let mem = &self.mem.mem;
        let _ = vm_memory::Bytes::write_obj(mem, status, vm_memory::GuestAddress(req.status_gpa));
        if let Some(r) = &self.inflight {
            r.begin_complete(head);
        }
        if self.queue.add_used(mem, head, used_len).is_err() {
            self.set_broken("used ring not in guest memory");
            return;
        }
        if let Some(r) = &self.inflight {
            r.end_complete(head, self.queue.next_used());
        }
        self.need_signal = true;
    }

    fn signal(&mut self) {
        if !self.need_signal {
            return;
        }
        self.need_signal = false;
        if self.queue.needs_notification(&self.mem.mem).unwrap_or(true) {
            if let Some(mut call) = self.call.as_ref() {
                let _ = call.write_all(&1u64.to_ne_bytes());
            }
        }
    }

    fn finish_stop(&mut self) {
        if let Some(p) = self.poller.take() {
            p.unregister();
        }
        if let Some(id) = self.kick_op.take() {
            if self.kick_armed.get() {
                reactor::ring().abandon(id);
            }
        }
        self.ch = None;
        let report = VringStopped {
            index: self.index,
            next_avail: self.queue.next_avail(),
            broken: self.broken,
        };
        // Leave the map now, before `done` lets the home reactor restart this ring: a
        // deferred removal could race with the new worker's insertion. The poller closure
        // still holds a reference, so `self` stays alive until the poller is dropped.
        let removed = WORKERS.with(|m| m.borrow_mut().remove(&self.key));
        drop(removed);
        if let Some(done) = self.stopping.take() {
            done(report);
        }
    }
}
