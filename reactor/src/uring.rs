//! The per-reactor ring: an io_uring, a slab of in-flight ops, batched submission and
//! completion dispatch (STYLE rule 12).
//!
//! - `user_data` is the op's slab index; values from [`SENTINEL_BASE`] up are internal ops
//!   (the interrupt-mode eventfd poll, cancellations).
//! - [`Ring::submit`] only queues an SQE; the reactor enters the kernel once per tick (or
//!   earlier if the SQ fills up: then it submits and retries the push; if the kernel cannot
//!   take more either, the SQE waits in a backlog for the next tick).
//! - Completions are reaped and their callbacks run only from the reactor loop
//!   (`Ring::poll`), never inside `submit`, at most [`REAP_BATCH`] per tick.
//! - An op owns its buffers until its CQE even if abandoned ([`Ring::abandon`]).
//! - At shutdown `Ring::drain` cancels everything in flight and waits until the slab is
//!   empty; callbacks of ops still in flight then are dropped at their CQE without being
//!   called.
//!
//! Under [`crate::sim`] the ring runs a synchronous backend: file ops (read, write, readv,
//! writev, fsync, fallocate, close, nop) are executed with plain syscalls at submit time and
//! their completions delivered from later ticks, in an order and over a number of ticks drawn
//! from the simulation's seed (never inside submit), so simulations stay deterministic. Socket ops (recv, send, accept, connect, poll_add) and registered files
//! complete with `-EOPNOTSUPP` there. Raw-region reads/writes run like read/write.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::os::fd::RawFd;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;

use crate::buf::DmaBuf;
use crate::op::{Completion, Fd, OnComplete, Op, OpId, OpState, MAX_IOVECS};
use crate::reactor;

/// First `user_data` value reserved for internal ops.
pub const SENTINEL_BASE: u64 = u64::MAX - 15;
const EVENTFD_POLL: u64 = u64::MAX;
const CANCEL: u64 = u64::MAX - 1;
/// Most completions handled per tick.
pub const REAP_BATCH: usize = 256;
/// How long shutdown waits for cancelled ops before leaking their resources.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The current reactor's ring (a cheap `Rc` clone; keep it in your channel to avoid the
/// thread-local lookup per I/O). Panics off-reactor.
pub fn ring() -> Ring {
    reactor::with_core(|core| core.ring.clone())
}

/// A submission the ring refused because `max_in_flight` ops are already in flight (retry
/// after some complete) or because the reactor is shutting down. The op and its callback are
/// handed back untouched.
#[derive(Debug)]
pub struct Rejected {
    /// The op, with its buffers.
    pub op: Op,
    /// Its callback.
    pub on_complete: OnComplete,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} rejected: ring full or shutting down", self.op.name())
    }
}

impl std::error::Error for Rejected {}

struct InFlight {
    op: Op,
    on_complete: OnComplete,
    generation: u32,
    state: OpState,
    /// iovec array for readv/writev (heap, so stable while the entry moves).
    iovecs: Vec<libc::iovec>,
    /// Socket address for connect (boxed for a stable address).
    addr: Option<Box<SockAddr>>,
}

struct SockAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

enum Backend {
    Uring {
        ring: Box<IoUring>,
        /// SQEs that found the SQ full even after a submit.
        backlog: VecDeque<squeue::Entry>,
    },
    Sync {
        done: VecDeque<(u64, i32)>,
        /// Completions the next reap may deliver (the simulator lowers it).
        reap_limit: usize,
    },
}

struct RingInner {
    backend: RefCell<Backend>,
    ops: RefCell<Slab<InFlight>>,
    max_in_flight: usize,
    next_generation: Cell<u32>,
    eventfd: Option<RawFd>,
    eventfd_armed: Cell<bool>,
    nr_cancels: Cell<usize>,
    closing: Cell<bool>,
    nr_enters: Cell<u64>,
    nr_completed: Cell<u64>,
    /// SQEs were pushed since the last enter (skips touching the SQ on idle ticks).
    sq_dirty: Cell<bool>,
    /// Registered buffers by index: `None` while lent out as a [`FixedBuf`]. Declared after
    /// `backend` so the ring (and its registration) is gone before the memory is freed.
    fixed: RefCell<Vec<Option<DmaBuf>>>,
    fixed_free: RefCell<Vec<u16>>,
}

/// Most registered buffers per ring.
pub const MAX_FIXED_BUFS: usize = 16384;

/// A buffer registered with one reactor's ring ([`Ring::register_buffers`]), for
/// [`Op::ReadFixed`]/[`Op::WriteFixed`]. `!Send`; dropping it returns it to its ring.
pub struct FixedBuf {
    buf: Option<DmaBuf>,
    index: u16,
    home: Weak<RingInner>,
}

impl FixedBuf {
    fn dma(&self) -> &DmaBuf {
        self.buf
            .as_ref()
            .expect("FixedBuf holds its buffer until dropped")
    }

    fn dma_mut(&mut self) -> &mut DmaBuf {
        self.buf
            .as_mut()
            .expect("FixedBuf holds its buffer until dropped")
    }

    /// Index in the ring's registered-buffer table.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Length in bytes (what a read fills and a write sends).
    pub fn len(&self) -> usize {
        self.dma().len()
    }

    /// True if the length is zero.
    pub fn is_empty(&self) -> bool {
        self.dma().is_empty()
    }

    /// Capacity (the registered size).
    pub fn capacity(&self) -> usize {
        self.dma().capacity()
    }

    /// Sets the length; panics past the capacity.
    pub fn set_len(&mut self, len: usize) {
        self.dma_mut().set_len(len);
    }

    fn ptr(&mut self) -> *mut u8 {
        self.dma_mut().as_mut_ptr()
    }
}

impl Deref for FixedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.dma()
    }
}

impl DerefMut for FixedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.dma_mut()
    }
}

impl fmt::Debug for FixedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FixedBuf")
            .field("index", &self.index)
            .field("len", &self.buf.as_ref().map(|b| b.len()))
            .finish()
    }
}

impl Drop for FixedBuf {
    fn drop(&mut self) {
        let Some(buf) = self.buf.take() else { return };
        match self.home.upgrade() {
            Some(ring) => {
                ring.fixed.borrow_mut()[usize::from(self.index)] = Some(buf);
                ring.fixed_free.borrow_mut().push(self.index);
            }
            // The ring (and so the registration) is gone: the memory is ordinary now.
            None => drop(buf),
        }
    }
}

/// Handle on one reactor's ring. `!Send`: use it on its reactor only.
#[derive(Clone)]
pub struct Ring {
    inner: Rc<RingInner>,
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("in_flight", &self.nr_in_flight())
            .finish_non_exhaustive()
    }
}

/// Counters of one ring.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    /// `io_uring_enter` calls made.
    pub nr_enters: u64,
    /// Ops completed (including abandoned ones).
    pub nr_completed: u64,
    /// Ops in flight now.
    pub nr_in_flight: usize,
}

impl Ring {
    /// A ring with `entries` SQEs (CQ twice that), refusing more than `max_in_flight` ops.
    /// With `eventfd`, a poll on it is kept armed so that writes to it wake a sleeping
    /// reactor (interrupt mode).
    pub(crate) fn new(
        entries: u32,
        max_in_flight: usize,
        eventfd: Option<RawFd>,
    ) -> Result<Ring, crate::Error> {
        let ring = build_ring(entries).map_err(|e| crate::Error::io("io_uring_setup", e))?;
        if eventfd.is_some() && !ring.params().is_feature_ext_arg() {
            return Err(crate::Error::io(
                "interrupt mode needs IORING_FEAT_EXT_ARG (Linux 5.11+)",
                io::Error::from_raw_os_error(libc::EOPNOTSUPP),
            ));
        }
        let backend = Backend::Uring {
            ring: Box::new(ring),
            backlog: VecDeque::new(),
        };
        let ring = Ring::with_backend(backend, max_in_flight, eventfd);
        ring.arm_eventfd();
        Ok(ring)
    }

    /// Lets the kernel's io-wq workers of this ring (which run the operations that cannot
    /// complete inline, such as writes to tmpfs) run only on `cores`. They inherit the
    /// reactor thread's affinity otherwise, and a spinning reactor leaves them no time on
    /// its own core. Empty `cores`, or the simulator's ring: nothing to do.
    pub(crate) fn set_worker_affinity(&self, cores: &[usize]) -> io::Result<()> {
        if cores.is_empty() {
            return Ok(());
        }
        let backend = self.inner.backend.borrow();
        let Backend::Uring { ring, .. } = &*backend else {
            return Ok(());
        };
        // SAFETY: cpu_set_t is a plain bit array; all-zero is the valid empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &c in cores {
            // SAFETY: CPU_SET only writes bit `c` of `set`; the ids come from the kernel's
            // list of this process's CPUs, below CPU_SETSIZE.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
        ring.submitter().register_iowq_aff(&set)
    }

    /// The simulator's synchronous ring.
    pub(crate) fn new_sync(max_in_flight: usize) -> Ring {
        Ring::with_backend(
            Backend::Sync {
                done: VecDeque::new(),
                reap_limit: usize::MAX,
            },
            max_in_flight,
            None,
        )
    }

    fn with_backend(backend: Backend, max_in_flight: usize, eventfd: Option<RawFd>) -> Ring {
        assert!(max_in_flight > 0 && max_in_flight < SENTINEL_BASE as usize);
        Ring {
            inner: Rc::new(RingInner {
                backend: RefCell::new(backend),
                ops: RefCell::new(Slab::with_capacity(max_in_flight.min(4096))),
                max_in_flight,
                next_generation: Cell::new(0),
                eventfd,
                eventfd_armed: Cell::new(false),
                nr_cancels: Cell::new(0),
                closing: Cell::new(false),
                nr_enters: Cell::new(0),
                nr_completed: Cell::new(0),
                sq_dirty: Cell::new(false),
                fixed: RefCell::new(Vec::new()),
                fixed_free: RefCell::new(Vec::new()),
            }),
        }
    }

    /// Queues `op`; `on_complete` runs from the reactor loop when it finishes (never inside
    /// this call). The SQE reaches the kernel at the end of the current tick. Errors with
    /// [`Rejected`] (handing everything back) if `max_in_flight` ops are in flight or the
    /// reactor is shutting down.
    ///
    /// Panics if a buffer is longer than `u32::MAX` or a vectored op has more than
    /// [`MAX_IOVECS`] buffers (programmer errors).
    pub fn submit(&self, op: Op, on_complete: OnComplete) -> Result<OpId, Rejected> {
        let inner = &*self.inner;
        if inner.closing.get() || inner.ops.borrow().len() >= inner.max_in_flight {
            return Err(Rejected { op, on_complete });
        }
        let generation = inner.next_generation.get().wrapping_add(1);
        inner.next_generation.set(generation);
        let mut entry = InFlight {
            op,
            on_complete,
            generation,
            state: OpState::Queued,
            iovecs: Vec::new(),
            addr: None,
        };
        let mut backend = inner.backend.borrow_mut();
        let mut ops = inner.ops.borrow_mut();
        let index = ops.vacant_key();
        let user_data = index as u64;
        match &mut *backend {
            Backend::Uring { ring, backlog } => {
                let sqe = build_sqe(&mut entry).user_data(user_data);
                entry.state = push_sqe(ring, backlog, sqe, &inner.nr_enters);
                inner.sq_dirty.set(true);
            }
            Backend::Sync { done, .. } => {
                let result = execute_sync(&mut entry.op);
                entry.state = OpState::Waiting;
                done.push_back((user_data, result));
                inner.sq_dirty.set(true);
            }
        }
        let key = ops.insert(entry);
        debug_assert_eq!(key, index);
        Ok(OpId {
            index: index as u32,
            generation,
        })
    }

    /// Gives up on an op: its callback will never be called, and cancellation is requested.
    /// The op keeps its buffers and its callback until its CQE arrives, then drops both
    /// (so memory a raw op's callback owns stays valid until the kernel is done). Returns
    /// false if `id` is not in flight (already completed or stale) or already abandoned.
    pub fn abandon(&self, id: OpId) -> bool {
        let inner = &*self.inner;
        {
            let mut ops = inner.ops.borrow_mut();
            let Some(entry) = ops.get_mut(id.index as usize) else {
                return false;
            };
            if entry.generation != id.generation || entry.state == OpState::Abandoned {
                return false;
            }
            entry.state = OpState::Abandoned;
        }
        self.cancel_user_data(u64::from(id.index));
        true
    }

    /// The state of an op, or None if it is no longer in flight. Release builds skip the
    /// per-enter bookkeeping, so there an entered op still reads `Submitted`.
    pub fn op_state(&self, id: OpId) -> Option<OpState> {
        let ops = self.inner.ops.borrow();
        let entry = ops.get(id.index as usize)?;
        (entry.generation == id.generation).then_some(entry.state)
    }

    /// Ops submitted and not yet completed (abandoned ones included).
    pub fn nr_in_flight(&self) -> usize {
        self.inner.ops.borrow().len()
    }

    /// Counters.
    pub fn stats(&self) -> RingStats {
        RingStats {
            nr_enters: self.inner.nr_enters.get(),
            nr_completed: self.inner.nr_completed.get(),
            nr_in_flight: self.nr_in_flight(),
        }
    }

    /// Registers `fds` as the ring's fixed files; op `Fd::Fixed(i)` then means `fds[i]`.
    /// Saves the kernel's per-op fd lookup (`fdget`/`fdput`). Errors from the kernel (e.g.
    /// EBUSY if files are already registered), or EOPNOTSUPP under the simulator.
    pub fn register_files(&self, fds: &[RawFd]) -> io::Result<()> {
        match &*self.inner.backend.borrow() {
            Backend::Uring { ring, .. } => ring.submitter().register_files(fds),
            Backend::Sync { .. } => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        }
    }

    /// Allocates `nr` buffers of `len` bytes and registers them with the kernel, so reads
    /// and writes through them ([`Op::ReadFixed`], [`Op::WriteFixed`]) skip the per-I/O page
    /// pinning — which matters for `O_DIRECT`. Once per ring. Errors: EINVAL for `nr` of 0 or
    /// over [`MAX_FIXED_BUFS`], EBUSY if already registered, or the kernel's error (e.g.
    /// ENOMEM under `RLIMIT_MEMLOCK`). Under the simulator the buffers exist but are not
    /// registered (fixed ops run as plain reads/writes).
    pub fn register_buffers(&self, nr: usize, len: usize) -> io::Result<()> {
        let inner = &*self.inner;
        if nr == 0 || nr > MAX_FIXED_BUFS {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if !inner.fixed.borrow().is_empty() {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        let mut bufs: Vec<DmaBuf> = (0..nr).map(|_| DmaBuf::new(len)).collect();
        let iovecs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.capacity(),
            })
            .collect();
        if let Backend::Uring { ring, .. } = &*inner.backend.borrow() {
            // SAFETY: the buffers are kept in `inner.fixed` (or lent out as FixedBufs that
            // return there) until the ring is dropped, which unregisters them first.
            unsafe { ring.submitter().register_buffers(&iovecs) }?;
        }
        *inner.fixed.borrow_mut() = bufs.into_iter().map(Some).collect();
        *inner.fixed_free.borrow_mut() = (0..nr as u16).rev().collect();
        Ok(())
    }

    /// A free registered buffer, with its length set to its capacity; None if all are in use
    /// (or none are registered).
    pub fn alloc_fixed_buf(&self) -> Option<FixedBuf> {
        let inner = &*self.inner;
        let index = inner.fixed_free.borrow_mut().pop()?;
        let mut buf = inner.fixed.borrow_mut()[usize::from(index)].take()?;
        let capacity = buf.capacity();
        buf.set_len(capacity);
        Some(FixedBuf {
            buf: Some(buf),
            index,
            home: Rc::downgrade(&self.inner),
        })
    }

    /// Registered buffers not lent out.
    pub fn nr_free_fixed_bufs(&self) -> usize {
        self.inner.fixed_free.borrow().len()
    }

    /// Removes the registered files (only when no op using them is in flight).
    pub fn unregister_files(&self) -> io::Result<()> {
        match &*self.inner.backend.borrow() {
            Backend::Uring { ring, .. } => ring.submitter().unregister_files(),
            Backend::Sync { .. } => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        }
    }

    /// Reads `buf.len()` bytes at `offset`; `done` gets the byte count and the buffer back.
    pub fn read_at(
        &self,
        fd: impl Into<Fd>,
        offset: u64,
        buf: DmaBuf,
        done: impl FnOnce(io::Result<usize>, DmaBuf) + 'static,
    ) -> Result<OpId, Rejected> {
        let op = Op::Read {
            fd: fd.into(),
            offset,
            buf,
        };
        self.submit(op, buf_callback(done))
    }

    /// Writes `buf` at `offset`; `done` gets the byte count and the buffer back.
    pub fn write_at(
        &self,
        fd: impl Into<Fd>,
        offset: u64,
        buf: DmaBuf,
        done: impl FnOnce(io::Result<usize>, DmaBuf) + 'static,
    ) -> Result<OpId, Rejected> {
        let op = Op::Write {
            fd: fd.into(),
            offset,
            buf,
        };
        self.submit(op, buf_callback(done))
    }

    /// `fsync` (or `fdatasync` if `datasync`).
    pub fn fsync(
        &self,
        fd: impl Into<Fd>,
        datasync: bool,
        done: impl FnOnce(io::Result<()>) + 'static,
    ) -> Result<OpId, Rejected> {
        let op = Op::Fsync {
            fd: fd.into(),
            datasync,
        };
        self.submit(op, unit_callback(done))
    }

    /// `fallocate(fd, mode, offset, len)`.
    pub fn fallocate(
        &self,
        fd: impl Into<Fd>,
        mode: i32,
        offset: u64,
        len: u64,
        done: impl FnOnce(io::Result<()>) + 'static,
    ) -> Result<OpId, Rejected> {
        let op = Op::Fallocate {
            fd: fd.into(),
            mode,
            offset,
            len,
        };
        self.submit(op, unit_callback(done))
    }

    /// Simulator: shuffles the pending completions and limits how many the next tick
    /// delivers, both from the seeded PRNG, so completion order and timing vary by seed.
    pub(crate) fn sim_perturb(&self, rng: &mut crate::sim::SimRng) {
        let mut backend = self.inner.backend.borrow_mut();
        let Backend::Sync { done, reap_limit } = &mut *backend else {
            return;
        };
        let n = done.len();
        for i in (1..n).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            done.swap(i, j);
        }
        *reap_limit = if n == 0 {
            usize::MAX
        } else {
            1 + rng.below(n as u64) as usize
        };
    }

    /// Enters the kernel for queued SQEs (once) and runs up to [`REAP_BATCH`] completion
    /// callbacks. Called by the reactor loop every tick. Returns true if anything completed.
    #[inline]
    pub(crate) fn poll(&self) -> bool {
        let inner = &*self.inner;
        // Fast path for the common idle tick: nothing queued, nothing the kernel could post.
        if !inner.sq_dirty.get()
            && inner.ops.borrow().is_empty()
            && inner.nr_cancels.get() == 0
            && !inner.eventfd_armed.get()
        {
            return false;
        }
        self.poll_slow()
    }

    #[inline(never)]
    fn poll_slow(&self) -> bool {
        self.submit_pending();
        self.reap() > 0
    }

    /// Interrupt mode: submits pending SQEs and sleeps until a CQE arrives (an op, or the
    /// eventfd poll) or `timeout` passes.
    pub(crate) fn wait(&self, timeout: Option<Duration>) {
        let inner = &*self.inner;
        if timeout.is_some_and(|t| t.is_zero()) {
            return;
        }
        let mut backend = inner.backend.borrow_mut();
        let Backend::Uring { ring, backlog } = &mut *backend else {
            return;
        };
        flush_backlog(ring, backlog);
        inner.sq_dirty.set(!backlog.is_empty());
        inner.nr_enters.set(inner.nr_enters.get() + 1);
        let result = match timeout {
            Some(t) => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                ring.submitter().submit_with_args(1, &args)
            }
            None => ring.submit_and_wait(1),
        };
        if let Err(e) = result {
            // ETIME: the timeout passed; EINTR: a signal; EBUSY: CQ overflow to reap first.
            let expected = [libc::ETIME, libc::EINTR, libc::EBUSY, libc::EAGAIN];
            debug_assert!(expected.contains(&e.raw_os_error().unwrap_or(0)), "{e}");
        }
        mark_waiting(&inner.ops);
    }

    fn submit_pending(&self) {
        let inner = &*self.inner;
        let mut backend = inner.backend.borrow_mut();
        let Backend::Uring { ring, backlog } = &mut *backend else {
            inner.sq_dirty.set(false);
            return;
        };
        flush_backlog(ring, backlog);
        inner.sq_dirty.set(!backlog.is_empty());
        let idle = {
            let sq = ring.submission();
            // Overflowed CQEs (kept by the kernel when the CQ was full) are flushed only by
            // an enter: do one even with nothing to submit.
            sq.is_empty() && !sq.cq_overflow() && !sq.taskrun()
        };
        if idle {
            return;
        }
        inner.nr_enters.set(inner.nr_enters.get() + 1);
        // Errors: EBUSY/EAGAIN mean the kernel is short of resources (or the CQ is full):
        // the SQEs stay queued and go in a later tick, after completions are reaped.
        let _ = ring.submit();
        mark_waiting(&inner.ops);
    }

    /// Reaps up to REAP_BATCH completions and runs their callbacks, each outside any borrow.
    fn reap(&self) -> usize {
        const CHUNK: usize = 32;
        let inner = &*self.inner;
        let mut total = 0;
        while total < REAP_BATCH {
            let mut batch = [(0u64, 0i32); CHUNK];
            let mut n = 0;
            {
                let mut backend = inner.backend.borrow_mut();
                match &mut *backend {
                    Backend::Uring { ring, .. } => {
                        for cqe in ring.completion().take(CHUNK) {
                            batch[n] = (cqe.user_data(), cqe.result());
                            n += 1;
                        }
                    }
                    Backend::Sync { done, reap_limit } => {
                        while n < CHUNK && *reap_limit > 0 {
                            let Some(item) = done.pop_front() else { break };
                            batch[n] = item;
                            n += 1;
                            *reap_limit -= 1;
                        }
                    }
                }
            }
            for &(user_data, result) in &batch[..n] {
                self.complete(user_data, result);
            }
            total += n;
            if n < CHUNK {
                break;
            }
        }
        total
    }

    fn complete(&self, user_data: u64, result: i32) {
        let inner = &*self.inner;
        if user_data >= SENTINEL_BASE {
            match user_data {
                EVENTFD_POLL => {
                    inner.eventfd_armed.set(false);
                    drain_eventfd(inner.eventfd);
                    self.arm_eventfd();
                }
                CANCEL => inner.nr_cancels.set(inner.nr_cancels.get() - 1),
                _ => debug_assert!(false, "unknown sentinel {user_data:#x}"),
            }
            return;
        }
        let entry = inner.ops.borrow_mut().try_remove(user_data as usize);
        let Some(entry) = entry else {
            debug_assert!(false, "CQE for unknown op {user_data}");
            return;
        };
        inner.nr_completed.set(inner.nr_completed.get() + 1);
        let InFlight {
            op,
            on_complete,
            state,
            ..
        } = entry;
        if state == OpState::Abandoned {
            // Resources first (the callback may own a raw op's memory), then the callback.
            drop(op);
            drop(on_complete);
            return;
        }
        on_complete.call(Completion { result, op });
    }

    fn arm_eventfd(&self) {
        let inner = &*self.inner;
        let Some(fd) = inner.eventfd else { return };
        if inner.eventfd_armed.get() || inner.closing.get() {
            return;
        }
        let mut backend = inner.backend.borrow_mut();
        if let Backend::Uring { ring, backlog } = &mut *backend {
            let sqe = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
                .build()
                .user_data(EVENTFD_POLL);
            push_sqe(ring, backlog, sqe, &inner.nr_enters);
            inner.sq_dirty.set(true);
            inner.eventfd_armed.set(true);
        }
    }

    fn cancel_user_data(&self, target: u64) {
        let inner = &*self.inner;
        let mut backend = inner.backend.borrow_mut();
        if let Backend::Uring { ring, backlog } = &mut *backend {
            let sqe = opcode::AsyncCancel::new(target).build().user_data(CANCEL);
            push_sqe(ring, backlog, sqe, &inner.nr_enters);
            inner.sq_dirty.set(true);
            inner.nr_cancels.set(inner.nr_cancels.get() + 1);
        }
    }

    fn is_drained(&self) -> bool {
        let inner = &*self.inner;
        let backlog_empty = match &*inner.backend.borrow() {
            Backend::Uring { backlog, .. } => backlog.is_empty(),
            Backend::Sync { done, .. } => done.is_empty(),
        };
        inner.ops.borrow().is_empty()
            && inner.nr_cancels.get() == 0
            && !inner.eventfd_armed.get()
            && backlog_empty
    }

    /// Shutdown: abandons and cancels every op (and the eventfd poll), then waits for all
    /// their CQEs so no buffer is freed while the kernel may use it. After
    /// [`DRAIN_TIMEOUT`] the remaining ops' resources are leaked rather than freed.
    pub(crate) fn drain(&self) {
        let inner = &*self.inner;
        inner.closing.set(true);
        if let Backend::Sync { reap_limit, .. } = &mut *inner.backend.borrow_mut() {
            *reap_limit = usize::MAX;
        }
        let live: Vec<OpId> = inner
            .ops
            .borrow()
            .iter()
            .map(|(index, e)| OpId {
                index: index as u32,
                generation: e.generation,
            })
            .collect();
        for id in live {
            self.abandon(id);
        }
        if inner.eventfd_armed.get() {
            self.cancel_user_data(EVENTFD_POLL);
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !self.is_drained() && Instant::now() < deadline {
            self.poll();
            if !self.is_drained() {
                self.wait(Some(Duration::from_millis(10)));
            }
        }
        if !self.is_drained() {
            // Keep them in the slab (so nr_in_flight reports them); RingInner's Drop leaks
            // them instead of freeing memory the kernel may still write.
            eprintln!(
                "reactor: {} ring ops did not complete at shutdown; leaking their buffers",
                inner.ops.borrow().len()
            );
        }
    }
}

impl Drop for RingInner {
    fn drop(&mut self) {
        // Normally drained at reactor shutdown. If not (a reactor thread unwinding), never
        // free memory the kernel may still write: leak what is left.
        let ops = std::mem::take(self.ops.get_mut());
        if !ops.is_empty() {
            std::mem::forget(ops);
        }
    }
}

/// Arms a one-shot readiness poll (`PollAdd`) of `fd` for `events` on the current reactor's
/// ring, unless `armed` says one is pending already; `armed` turns false again when the poll
/// completes. Sockets use it so that readiness wakes a sleeping reactor (interrupt mode) and
/// so that an idle socket is not read every tick. Returns whether a poll is pending now.
pub fn arm_readiness(fd: RawFd, events: u32, armed: &Rc<Cell<bool>>) -> bool {
    if armed.get() {
        return true;
    }
    let op = Op::PollAdd {
        fd: Fd::Raw(fd),
        events,
    };
    let flag = armed.clone();
    let cb = OnComplete::closure(move |_| flag.set(false));
    let ok = ring().submit(op, cb).is_ok();
    armed.set(ok);
    ok
}

/// A ring owned by the calling thread alone: completions run as task work only when this
/// thread enters the kernel (`DEFER_TASKRUN`, with the `SQ_TASKRUN` flag telling the poll
/// loop when an enter is due), so the kernel never interrupts a spinning reactor to post a
/// CQE. Kernels before 6.1 reject those flags; then a plain ring is used.
fn build_ring(entries: u32) -> io::Result<IoUring> {
    let cq_entries = entries.saturating_mul(2);
    let owned = IoUring::builder()
        .setup_cqsize(cq_entries)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .build(entries);
    match owned {
        Ok(ring) => Ok(ring),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            IoUring::builder().setup_cqsize(cq_entries).build(entries)
        }
        Err(e) => Err(e),
    }
}

fn buf_callback(done: impl FnOnce(io::Result<usize>, DmaBuf) + 'static) -> OnComplete {
    OnComplete::closure(move |completion: Completion| {
        let result = completion.io_result();
        match completion.into_buf() {
            Some(buf) => done(result, buf),
            None => unreachable!("single-buffer op completed without its buffer"),
        }
    })
}

fn unit_callback(done: impl FnOnce(io::Result<()>) + 'static) -> OnComplete {
    OnComplete::closure(move |completion: Completion| done(completion.io_result().map(drop)))
}

fn mark_waiting(ops: &RefCell<Slab<InFlight>>) {
    // Cheap enough only because it is skipped on the common path: states are tracked
    // for introspection in debug builds.
    if cfg!(debug_assertions) {
        for (_, entry) in ops.borrow_mut().iter_mut() {
            if entry.state == OpState::Submitted {
                entry.state = OpState::Waiting;
            }
        }
    }
}

/// Pushes an SQE; if the SQ is full, submits and retries once; else appends to the backlog.
fn push_sqe(
    ring: &mut IoUring,
    backlog: &mut VecDeque<squeue::Entry>,
    sqe: squeue::Entry,
    nr_enters: &Cell<u64>,
) -> OpState {
    if backlog.is_empty() {
        // SAFETY: every pointer in the SQE refers to heap memory owned by the op's slab entry
        // (buffers, iovecs, address) or the ring, which lives until the op's CQE.
        if unsafe { ring.submission().push(&sqe) }.is_ok() {
            return OpState::Submitted;
        }
        nr_enters.set(nr_enters.get() + 1);
        let _ = ring.submit();
        // SAFETY: as above.
        if unsafe { ring.submission().push(&sqe) }.is_ok() {
            return OpState::Submitted;
        }
    }
    backlog.push_back(sqe);
    OpState::Queued
}

fn flush_backlog(ring: &mut IoUring, backlog: &mut VecDeque<squeue::Entry>) {
    while let Some(sqe) = backlog.front() {
        // SAFETY: see push_sqe; backlogged SQEs point into live slab entries.
        if unsafe { ring.submission().push(sqe) }.is_err() {
            break;
        }
        backlog.pop_front();
    }
}

macro_rules! with_fd {
    ($fd:expr, $t:ident => $e:expr) => {
        match $fd {
            Fd::Raw(raw) => {
                let $t = types::Fd(raw);
                $e
            }
            Fd::Fixed(index) => {
                let $t = types::Fixed(index);
                $e
            }
        }
    };
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).expect("ring op buffer longer than u32::MAX")
}

fn iovecs_of(bufs: &mut [DmaBuf]) -> Vec<libc::iovec> {
    assert!(bufs.len() <= MAX_IOVECS, "more than {MAX_IOVECS} iovecs");
    bufs.iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect()
}

/// Builds the SQE for an entry; stores iovecs/addresses in the entry so they outlive the op.
fn build_sqe(entry: &mut InFlight) -> squeue::Entry {
    match &mut entry.op {
        Op::Nop => opcode::Nop::new().build(),
        Op::Read { fd, offset, buf } => {
            let (ptr, len) = (buf.as_mut_ptr(), len_u32(buf.len()));
            with_fd!(*fd, t => opcode::Read::new(t, ptr, len).offset(*offset).build())
        }
        Op::Write { fd, offset, buf } => {
            let (ptr, len) = (buf.as_ptr(), len_u32(buf.len()));
            with_fd!(*fd, t => opcode::Write::new(t, ptr, len).offset(*offset).build())
        }
        Op::ReadFixed { fd, offset, buf } => {
            let (ptr, len, index) = (buf.ptr(), len_u32(buf.len()), buf.index());
            with_fd!(*fd, t => opcode::ReadFixed::new(t, ptr, len, index)
                .offset(*offset)
                .build())
        }
        Op::WriteFixed { fd, offset, buf } => {
            let (ptr, len, index) = (buf.ptr().cast_const(), len_u32(buf.len()), buf.index());
            with_fd!(*fd, t => opcode::WriteFixed::new(t, ptr, len, index)
                .offset(*offset)
                .build())
        }
        Op::ReadRaw { fd, offset, region } => {
            let (ptr, len) = (region.as_ptr(), len_u32(region.len()));
            with_fd!(*fd, t => opcode::Read::new(t, ptr, len).offset(*offset).build())
        }
        Op::WriteRaw { fd, offset, region } => {
            let (ptr, len) = (region.as_ptr().cast_const(), len_u32(region.len()));
            with_fd!(*fd, t => opcode::Write::new(t, ptr, len).offset(*offset).build())
        }
        Op::Readv { fd, offset, bufs } => {
            entry.iovecs = iovecs_of(bufs);
            let (ptr, n) = (entry.iovecs.as_ptr(), entry.iovecs.len() as u32);
            with_fd!(*fd, t => opcode::Readv::new(t, ptr, n).offset(*offset).build())
        }
        Op::Writev { fd, offset, bufs } => {
            entry.iovecs = iovecs_of(bufs);
            let (ptr, n) = (entry.iovecs.as_ptr(), entry.iovecs.len() as u32);
            with_fd!(*fd, t => opcode::Writev::new(t, ptr, n).offset(*offset).build())
        }
        Op::Fsync { fd, datasync } => {
            let flags = if *datasync {
                types::FsyncFlags::DATASYNC
            } else {
                types::FsyncFlags::empty()
            };
            with_fd!(*fd, t => opcode::Fsync::new(t).flags(flags).build())
        }
        Op::Fallocate {
            fd,
            mode,
            offset,
            len,
        } => with_fd!(*fd, t => opcode::Fallocate::new(t, *len)
            .offset(*offset)
            .mode(*mode)
            .build()),
        Op::Recv { .. }
        | Op::Send { .. }
        | Op::Accept { .. }
        | Op::Connect { .. }
        | Op::PollAdd { .. } => build_socket_sqe(entry),
        Op::Close { fd } => opcode::Close::new(types::Fd(*fd)).build(),
    }
}

/// The socket half of [`build_sqe`].
fn build_socket_sqe(entry: &mut InFlight) -> squeue::Entry {
    match &mut entry.op {
        Op::Recv { fd, buf, flags } => {
            let (ptr, len) = (buf.as_mut_ptr(), len_u32(buf.len()));
            with_fd!(*fd, t => opcode::Recv::new(t, ptr, len).flags(*flags).build())
        }
        Op::Send { fd, buf, flags } => {
            let (ptr, len) = (buf.as_ptr(), len_u32(buf.len()));
            let flags = *flags | libc::MSG_NOSIGNAL;
            with_fd!(*fd, t => opcode::Send::new(t, ptr, len).flags(flags).build())
        }
        Op::Accept { fd } => with_fd!(*fd, t => opcode::Accept::new(
            t,
            std::ptr::null_mut(),
            std::ptr::null_mut()
        )
        .flags(libc::SOCK_CLOEXEC)
        .build()),
        Op::Connect { fd, addr } => {
            let sockaddr = Box::new(sockaddr_of(addr));
            let (ptr, len) = (
                (&sockaddr.storage as *const libc::sockaddr_storage).cast::<libc::sockaddr>(),
                sockaddr.len,
            );
            entry.addr = Some(sockaddr);
            with_fd!(*fd, t => opcode::Connect::new(t, ptr, len).build())
        }
        Op::PollAdd { fd, events } => {
            with_fd!(*fd, t => opcode::PollAdd::new(t, *events).build())
        }
        _ => unreachable!("build_socket_sqe called for {}", entry.op.name()),
    }
}

fn sockaddr_of(addr: &SocketAddr) -> SockAddr {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    SockAddr {
        storage,
        len: len as libc::socklen_t,
    }
}

fn drain_eventfd(eventfd: Option<RawFd>) {
    if let Some(fd) = eventfd {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a valid local from a non-blocking eventfd we own.
        let _ = unsafe { libc::read(fd, (&mut value as *mut u64).cast(), 8) };
    }
}

fn errno_result(ret: isize) -> i32 {
    if ret < 0 {
        -io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        i32::try_from(ret).unwrap_or(i32::MAX)
    }
}

/// The simulator's backend: runs file ops with blocking syscalls. Returns the result as a
/// CQE would carry it.
fn execute_sync(op: &mut Op) -> i32 {
    let fd = match op {
        Op::Nop => return 0,
        Op::Close { fd } => *fd,
        Op::Read { fd, .. }
        | Op::Write { fd, .. }
        | Op::ReadRaw { fd, .. }
        | Op::WriteRaw { fd, .. }
        | Op::ReadFixed { fd, .. }
        | Op::WriteFixed { fd, .. }
        | Op::Readv { fd, .. }
        | Op::Writev { fd, .. }
        | Op::Fsync { fd, .. }
        | Op::Fallocate { fd, .. } => match fd {
            Fd::Raw(raw) => *raw,
            Fd::Fixed(_) => return -libc::EOPNOTSUPP,
        },
        _ => return -libc::EOPNOTSUPP,
    };
    let iovecs = match op {
        Op::Readv { bufs, .. } | Op::Writev { bufs, .. } => iovecs_of(bufs),
        _ => Vec::new(),
    };
    let nr_iovecs = iovecs.len() as i32;
    // SAFETY: each call gets an fd number (checked by the kernel) and pointers/lengths that
    // describe memory owned by `op` (or `iovecs`, pointing into op's buffers), alive and not
    // otherwise borrowed for the duration of the call.
    let ret: isize = unsafe {
        match op {
            Op::Read { offset, buf, .. } => libc::pread(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                *offset as libc::off_t,
            ),
            Op::Write { offset, buf, .. } => {
                libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), *offset as libc::off_t)
            }
            Op::ReadFixed { offset, buf, .. } => {
                libc::pread(fd, buf.ptr().cast(), buf.len(), *offset as libc::off_t)
            }
            Op::WriteFixed { offset, buf, .. } => {
                libc::pwrite(fd, buf.ptr().cast(), buf.len(), *offset as libc::off_t)
            }
            Op::ReadRaw { offset, region, .. } => libc::pread(
                fd,
                region.as_ptr().cast(),
                region.len(),
                *offset as libc::off_t,
            ),
            Op::WriteRaw { offset, region, .. } => libc::pwrite(
                fd,
                region.as_ptr().cast(),
                region.len(),
                *offset as libc::off_t,
            ),
            Op::Readv { offset, .. } => {
                libc::preadv(fd, iovecs.as_ptr(), nr_iovecs, *offset as libc::off_t)
            }
            Op::Writev { offset, .. } => {
                libc::pwritev(fd, iovecs.as_ptr(), nr_iovecs, *offset as libc::off_t)
            }
            Op::Fsync { datasync: true, .. } => libc::fdatasync(fd) as isize,
            Op::Fsync { .. } => libc::fsync(fd) as isize,
            Op::Fallocate {
                mode, offset, len, ..
            } => libc::fallocate(fd, *mode, *offset as libc::off_t, *len as libc::off_t) as isize,
            Op::Close { .. } => libc::close(fd) as isize,
            _ => return -libc::EOPNOTSUPP,
        }
    };
    errno_result(ret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_are_encoded_in_network_order() {
        let v4: SocketAddr = "127.0.0.1:4420".parse().unwrap();
        let a = sockaddr_of(&v4);
        assert_eq!(a.len as usize, std::mem::size_of::<libc::sockaddr_in>());
        // SAFETY: sockaddr_of wrote a sockaddr_in at the start of the storage.
        let sin =
            unsafe { &*(&a.storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
        assert_eq!(sin.sin_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(u16::from_be(sin.sin_port), 4420);
        assert_eq!(sin.sin_addr.s_addr.to_ne_bytes(), [127, 0, 0, 1]);

        let v6: SocketAddr = "[::1]:8009".parse().unwrap();
        let a = sockaddr_of(&v6);
        assert_eq!(a.len as usize, std::mem::size_of::<libc::sockaddr_in6>());
        // SAFETY: sockaddr_of wrote a sockaddr_in6 at the start of the storage.
        let sin6 =
            unsafe { &*(&a.storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
        assert_eq!(sin6.sin6_family, libc::AF_INET6 as libc::sa_family_t);
        assert_eq!(u16::from_be(sin6.sin6_port), 8009);
        assert_eq!(
            sin6.sin6_addr.s6_addr,
            std::net::Ipv6Addr::LOCALHOST.octets()
        );
    }
}
