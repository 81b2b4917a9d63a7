//! The per-reactor I/O queue of a controller (an `IoDevice` channel, shared by the bdevs of
//! all its namespaces on that reactor).
//!
//! A bdev I/O becomes an [`IoCtx`]; its NVMe commands (children) are issued as command
//! slots free up, each at most `max_xfer` bytes (MDTS), 65536 blocks (NLB) or 256 DSM ranges.
//! The bdev I/O completes when every issued child completed and nothing is left to issue,
//! or as soon as a failed child has no siblings in flight.
//!
//! Connection: the queue connects lazily (when the controller is online and the association
//! generation differs from the one it is connected to). While the controller is offline,
//! new I/O waits in the issue queue; when `fail_held_io` turns true it fails with EIO.
//! A lost connection fails the commands in flight with EIO and tells the controller.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::{Completer, IoStatus, IoType, ModuleIo};
use reactor::{PollStatus, PollerHandle};
use slab::Slab;

use super::ctrlr::Ctrlr;
use super::qpair::{CmdBuf, Dir, Event, Qpair, QpairOpts, QpairState};
use super::HostError;
use crate::proto::spec::{nvm, sc, Cqe, Sqe};

/// Most blocks per Read/Write/Write Zeroes command (16-bit 0's based NLB).
const MAX_NLB: u64 = 1 << 16;
/// Most ranges per Dataset Management command.
const MAX_DSM_RANGES: u64 = 256;
/// Most blocks per DSM range (32-bit count).
const MAX_RANGE_BLOCKS: u64 = u32::MAX as u64;
/// Most children issued per poll (bounded work).
const MAX_ISSUE_PER_POLL: usize = 1024;
/// Delay before retrying an I/O queue Connect the target refused for now (`EAGAIN`: it still
/// tears down the previous queue of that id), and how many such retries in a row are allowed
/// before the refusal counts as a controller failure.
const CONNECT_RETRY_DELAY: Duration = Duration::from_millis(20);
const CONNECT_RETRIES: u32 = 100;

/// One bdev I/O in progress.
struct IoCtx {
    io: ModuleIo,
    completer: Completer,
    counter: Rc<Cell<usize>>,
    nsid: u32,
    lba_shift: u32,
    /// Blocks of the I/O already covered by issued children.
    issued: u64,
    outstanding: u32,
    status: IoStatus,
}

impl IoCtx {
    fn all_issued(&self) -> bool {
        self.issued >= self.io.num_blocks() && !(self.io.num_blocks() == 0 && self.issued == 0)
    }
}

/// The queue state (behind the channel's `RefCell`).
pub struct IoQ {
    ctrlr: Arc<Ctrlr>,
    qpair: Option<Qpair>,
    /// Generation the qpair belongs to.
    gen: u64,
    /// Generation whose connect attempt failed (no retry until it changes).
    failed_gen: Option<u64>,
    /// A transiently refused Connect is retried from this time on.
    retry_at: Option<Instant>,
    /// Transient refusals in a row.
    retries: u32,
    max_xfer: u32,
    in_capsule: u32,
    ios: Slab<IoCtx>,
    issue_q: VecDeque<usize>,
    events: Vec<Event>,
}

/// An I/O queue channel value: the state plus its poller.
pub struct IoQueue {
    inner: Rc<RefCell<IoQ>>,
    poller: Option<PollerHandle>,
}

impl std::fmt::Debug for IoQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoQueue({})", self.inner.borrow().ctrlr.opts.name)
    }
}

impl IoQueue {
    /// Creates the queue of the current reactor (connects lazily, from its poller).
    ///
    /// Panics if the controller is gone: channels are only created through a bdev, which
    /// keeps its controller alive (a programmer error otherwise).
    pub fn new(ctrlr: std::sync::Weak<Ctrlr>) -> IoQueue {
        let ctrlr = ctrlr
            .upgrade()
            .expect("nvme: I/O channel created for a controller nobody holds");
        let inner = Rc::new(RefCell::new(IoQ {
            ctrlr: ctrlr.clone(),
            qpair: None,
            gen: 0,
            failed_gen: None,
            retry_at: None,
            retries: 0,
            max_xfer: 4096,
            in_capsule: 0,
            ios: Slab::new(),
            issue_q: VecDeque::new(),
            events: Vec::new(),
        }));
        let weak: Weak<RefCell<IoQ>> = Rc::downgrade(&inner);
        let poller =
            reactor::register_poller(&format!("nvme_ioq:{}", ctrlr.opts.name), move || {
                weak.upgrade().map_or(PollStatus::Idle, |q| {
                    PollStatus::from_busy(q.borrow_mut().poll())
                })
            });
        IoQueue {
            inner,
            poller: Some(poller),
        }
    }

    /// Queues a bdev I/O for namespace `nsid`; the result goes to `completer`.
    pub fn submit(
        &self,
        io: ModuleIo,
        nsid: u32,
        lba_shift: u32,
        completer: &Completer,
        counter: &Rc<Cell<usize>>,
    ) {
        let mut q = self.inner.borrow_mut();
        counter.set(counter.get() + 1);
        if io.io_type() == IoType::Reset {
            // The generic layer hands a reset over once the channel drained: nothing left.
            counter.set(counter.get() - 1);
            completer.complete(io, IoStatus::Success);
            return;
        }
        let idx = q.ios.insert(IoCtx {
            io,
            completer: completer.clone(),
            counter: counter.clone(),
            nsid,
            lba_shift,
            issued: 0,
            outstanding: 0,
            status: IoStatus::Success,
        });
        q.issue_q.push_back(idx);
        q.pump();
        // Poll mode: the queue's poller runs every tick and sends the batch then. Interrupt
        // mode: a submission from a message or timer comes after this tick's pollers, and
        // the reactor may sleep next, so send now.
        if reactor::is_interrupt_mode() {
            if let Some(qp) = q.qpair.as_mut() {
                qp.kick();
            }
        }
    }
}

impl Drop for IoQueue {
    fn drop(&mut self) {
        if let Some(p) = self.poller.take() {
            if reactor::try_current() == Some(p.reactor()) {
                p.unregister();
            }
        }
        let mut q = self.inner.borrow_mut();
        if let Some(mut qp) = q.qpair.take() {
            qp.fail(HostError::new(libc::ENODEV, "I/O queue closed"));
        }
    }
}

impl IoQ {
    fn poll(&mut self) -> bool {
        let mut busy = false;
        let ctrlr = self.ctrlr.clone();
        if ctrlr.is_deleted() {
            if let Some(mut qp) = self.qpair.take() {
                qp.fail(HostError::new(libc::ENODEV, "controller detached"));
                qp.poll(&mut self.events);
            }
        } else if ctrlr.is_online() {
            let gen = ctrlr.generation();
            let stale = self
                .qpair
                .as_ref()
                .is_none_or(|q| q.state() == QpairState::Failed)
                || self.gen != gen;
            let waiting = self.retry_at.is_some_and(|t| Instant::now() < t);
            if stale && self.failed_gen != Some(gen) && !waiting {
                self.retry_at = None;
                busy |= self.connect(gen);
            }
        }
        if let Some(qp) = self.qpair.as_mut() {
            busy |= qp.poll(&mut self.events);
        }
        busy |= self.handle_events();
        let connected = self
            .qpair
            .as_ref()
            .is_some_and(|q| q.state() == QpairState::Ready);
        if ctrlr.fail_held_io() && !connected {
            busy |= self.fail_held();
        }
        busy |= self.pump();
        if let Some(qp) = self.qpair.as_mut() {
            qp.kick();
        }
        busy
    }

    fn connect(&mut self, gen: u64) -> bool {
        if let Some(mut old) = self.qpair.take() {
            old.fail(HostError::new(libc::EIO, "controller reconnected"));
            old.poll(&mut self.events);
        }
        let o = &self.ctrlr.opts;
        let (cntlid, entries, max_xfer, in_capsule) = {
            let i = self.ctrlr.info();
            (i.cntlid, i.io_queue_entries, i.max_xfer, i.io_in_capsule)
        };
        let qid = reactor::try_current().map_or(1, |r| r.index() as u16 + 1);
        let qo = QpairOpts {
            addr: o.addr,
            qid,
            nr_entries: entries.max(2),
            hdgst: o.hdgst,
            ddgst: o.ddgst,
            kato_ms: 0,
            cntlid,
            subnqn: o.subnqn.clone(),
            hostnqn: o.hostnqn.clone(),
            hostid: o.hostid,
            connect_timeout: o.connect_timeout,
            max_xfer,
            stats: self.ctrlr.stats.clone(),
        };
        self.gen = gen;
        self.max_xfer = max_xfer.max(4096);
        self.in_capsule = in_capsule;
        match Qpair::connect(qo) {
            Ok(q) => self.qpair = Some(q),
            Err(e) => {
                self.failed_gen = Some(gen);
                self.ctrlr.report_io_failure(gen, e);
            }
        }
        true
    }

    fn handle_events(&mut self) -> bool {
        if self.events.is_empty() {
            return false;
        }
        let mut events = std::mem::take(&mut self.events);
        for ev in events.drain(..) {
            match ev {
                Event::Connected { .. } => {
                    self.failed_gen = None;
                    self.retries = 0;
                }
                Event::Failed(e) => {
                    crate::trace!("ctrlr {}: I/O queue failed: {e}", self.ctrlr.opts.name);
                    if self
                        .qpair
                        .as_ref()
                        .is_some_and(|q| q.state() == QpairState::Failed)
                    {
                        self.qpair = None;
                    }
                    if e.errno() == libc::EAGAIN
                        && self.retries < CONNECT_RETRIES
                        && !self.ctrlr.is_deleted()
                    {
                        // Refused for now: try again shortly, the controller is fine.
                        self.retries += 1;
                        self.retry_at = Some(Instant::now() + CONNECT_RETRY_DELAY);
                    } else if !self.ctrlr.is_deleted() {
                        self.failed_gen = Some(self.gen);
                        self.ctrlr.report_io_failure(self.gen, e);
                    }
                }
                Event::Done { token, result, .. } => {
                    let status = match result {
                        Ok(cqe) => cqe_status(&cqe),
                        Err(e) => IoStatus::Failed(e.errno()),
                    };
                    self.child_done(token as usize, status);
                }
            }
        }
        self.events = events;
        true
    }

    fn child_done(&mut self, idx: usize, status: IoStatus) {
        let Some(ctx) = self.ios.get_mut(idx) else {
            return;
        };
        ctx.outstanding = ctx.outstanding.saturating_sub(1);
        if !status.is_success() && ctx.status.is_success() {
            ctx.status = status;
        }
        if ctx.outstanding == 0 && (ctx.all_issued() || !ctx.status.is_success()) {
            self.complete(idx);
        }
    }

    fn complete(&mut self, idx: usize) {
        if let Some(ctx) = self.ios.try_remove(idx) {
            ctx.counter.set(ctx.counter.get().saturating_sub(1));
            ctx.completer.complete(ctx.io, ctx.status);
        }
    }

    /// Fails every I/O that waits to be issued and has nothing in flight.
    fn fail_held(&mut self) -> bool {
        let mut busy = false;
        let errno = if self.ctrlr.is_deleted() {
            libc::ENODEV
        } else {
            libc::EIO
        };
        for idx in std::mem::take(&mut self.issue_q) {
            let Some(ctx) = self.ios.get_mut(idx) else {
                continue;
            };
            if ctx.status.is_success() {
                ctx.status = IoStatus::Failed(errno);
            }
            if ctx.outstanding == 0 {
                self.complete(idx);
            }
            busy = true;
        }
        busy
    }

    /// Issues children while command slots are free.
    fn pump(&mut self) -> bool {
        let mut issued = 0;
        while issued < MAX_ISSUE_PER_POLL {
            let Some(&idx) = self.issue_q.front() else {
                break;
            };
            let Some(qp) = self.qpair.as_mut() else {
                break;
            };
            if qp.nr_free() == 0 {
                break;
            }
            let Some(ctx) = self.ios.get_mut(idx) else {
                self.issue_q.pop_front();
                continue;
            };
            if !ctx.status.is_success() {
                self.issue_q.pop_front();
                if ctx.outstanding == 0 {
                    self.complete(idx);
                }
                continue;
            }
            let (sqe, dir, buf) = build_child(ctx, self.max_xfer);
            ctx.outstanding += 1;
            let done_now = ctx.all_issued();
            if let Err((e, _)) = qp.submit(sqe, dir, buf, self.in_capsule, idx as u64) {
                ctx.outstanding -= 1;
                ctx.status = IoStatus::Failed(e.errno());
                continue;
            }
            issued += 1;
            if done_now {
                self.issue_q.pop_front();
            }
        }
        issued > 0
    }
}

/// Builds the next child command of `ctx` and advances `ctx.issued`.
fn build_child(ctx: &mut IoCtx, max_xfer: u32) -> (Sqe, Dir, CmdBuf) {
    let shift = ctx.lba_shift;
    let start = ctx.io.offset_blocks() + ctx.issued;
    let left = ctx.io.num_blocks() - ctx.issued.min(ctx.io.num_blocks());
    let max_blocks = (u64::from(max_xfer) >> shift).clamp(1, MAX_NLB);
    match ctx.io.io_type() {
        IoType::Read | IoType::Write => {
            let n = left.min(max_blocks);
            let opc = if ctx.io.io_type() == IoType::Read {
                nvm::READ
            } else {
                nvm::WRITE
            };
            let mut sqe = Sqe::new(opc, ctx.nsid);
            sqe.set_u64(40, start);
            sqe.set_cdw(12, (n - 1) as u32);
            let (ptr, len) = ctx.io.raw_buf();
            let off = (ctx.issued << shift) as usize;
            let bytes = (n << shift) as usize;
            debug_assert!(off + bytes <= len);
            // SAFETY: off + bytes <= len (the bdev layer checked len == num_blocks << shift);
            // the region stays valid while the ModuleIo is held, i.e. until every child is done.
            let p = unsafe { ptr.add(off) };
            ctx.issued += n;
            let dir = if opc == nvm::READ {
                Dir::Read
            } else {
                Dir::Write
            };
            (sqe, dir, CmdBuf::Raw { ptr: p, len: bytes })
        }
        IoType::WriteZeroes => {
            let n = left.min(MAX_NLB);
            let mut sqe = Sqe::new(nvm::WRITE_ZEROES, ctx.nsid);
            sqe.set_u64(40, start);
            sqe.set_cdw(12, (n - 1) as u32);
            ctx.issued += n;
            (sqe, Dir::None, CmdBuf::None)
        }
        IoType::Unmap => {
            let mut ranges = Vec::new();
            let mut at = start;
            let mut rest = left;
            while rest > 0 && (ranges.len() as u64) < MAX_DSM_RANGES * 16 {
                let n = rest.min(MAX_RANGE_BLOCKS);
                ranges.extend_from_slice(&0u32.to_le_bytes());
                ranges.extend_from_slice(&(n as u32).to_le_bytes());
                ranges.extend_from_slice(&at.to_le_bytes());
                at += n;
                rest -= n;
            }
            let nr = ranges.len() / 16;
            let mut sqe = Sqe::new(nvm::DSM, ctx.nsid);
            sqe.set_cdw(10, (nr as u32).saturating_sub(1));
            sqe.set_cdw(11, 1 << 2); // AD: deallocate
            ctx.issued += left - rest;
            (sqe, Dir::Write, CmdBuf::Owned(ranges))
        }
        IoType::Flush | IoType::Reset => {
            ctx.issued = ctx.io.num_blocks().max(1);
            (Sqe::new(nvm::FLUSH, ctx.nsid), Dir::None, CmdBuf::None)
        }
    }
}

/// The bdev status of an NVMe completion.
fn cqe_status(cqe: &Cqe) -> IoStatus {
    if cqe.is_success() {
        return IoStatus::Success;
    }
    let errno = match (cqe.sct(), cqe.sc()) {
        (0, x) if x == sc::INVALID_FIELD || x == sc::INVALID_OPCODE || x == sc::LBA_RANGE => {
            libc::EINVAL
        }
        (0, x) if x == sc::CAP_EXCEEDED => libc::ENOSPC,
        (0, 0x20) => libc::EROFS,
        _ => libc::EIO,
    };
    IoStatus::Failed(errno)
}
