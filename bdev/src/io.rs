//! The data path: per-reactor [`BdevChannel`]s, pooled request slots, splitting at the
//! optimal I/O boundary, deferred completion and per-channel statistics.
//!
//! Invariants:
//! - A channel and everything in it is `!Send` and used only on the thread (reactor) that
//!   created it; completions run there, from [`BdevChannel::poll`], never inside a submit.
//! - No heap allocation per I/O in the steady state: request slots are pooled per channel
//!   (the pool grows to at most [`MAX_IOS_PER_CHANNEL`]), the completion callback is a shared
//!   `Rc` cloned per I/O, and completions queue in a reused ring buffer.
//! - A slot owns the caller's buffer until the I/O completes; modules see it through
//!   [`ModuleIo`], which they must hand back to [`Completer::complete`] exactly once.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::rc::{Rc, Weak as RcWeak};
use std::sync::Arc;

use crate::bdev::{Bdev, BdevCore, IoStatus, IoType};
use crate::buf::IoBuf;
use crate::error::{BdevError, ErrorKind, Result};
use crate::iostat::{ticks, ChannelStats};

mod reset;

/// Most requests (including split children) in flight on one channel; beyond this a submit
/// fails with `ENOMEM` until something completes.
pub const MAX_IOS_PER_CHANNEL: usize = 65536;

/// Most completions one [`BdevChannel::poll`] delivers (STYLE rule 10): everything queued
/// when it starts, which the in-flight limit bounds.
pub const MAX_COMPLETIONS_PER_POLL: usize = MAX_IOS_PER_CHANNEL;

const NO_PARENT: u32 = u32::MAX;

/// Completion callback: shared, cloned (not allocated) per I/O. Runs on the submitting
/// thread from [`BdevChannel::poll`]; it may submit new I/O on the same channel.
pub type IoCallback = Rc<dyn Fn(IoDone)>;

/// A finished I/O, handed to its [`IoCallback`].
#[derive(Debug)]
pub struct IoDone {
    /// The caller's tag from submit.
    pub tag: u64,
    /// The I/O type.
    pub io_type: IoType,
    /// First block.
    pub offset_blocks: u64,
    /// Number of blocks.
    pub num_blocks: u64,
    /// Outcome.
    pub status: IoStatus,
    /// The caller's buffer, returned (reads: filled) — `None` for I/O without data.
    pub buf: Option<IoBuf>,
    /// Submit-to-completion latency in [`crate::ticks`] units, at poll granularity (the
    /// value iostat records).
    pub latency_ticks: u64,
}

/// A submit that was refused synchronously; the buffer comes back.
pub struct SubmitError {
    /// Why (`EINVAL` bad range/length, `ENOTSUP`, `ENOMEM` pool exhausted).
    pub error: BdevError,
    /// The caller's buffer, if one was passed.
    pub buf: Option<IoBuf>,
}

impl fmt::Debug for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SubmitError({:?})", self.error)
    }
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl std::error::Error for SubmitError {}

impl SubmitError {
    /// Positive errno of the refusal.
    pub fn errno(&self) -> i32 {
        self.error.errno()
    }
}

/// An I/O on a raw buffer region, for [`BdevChannel::submit_raw`].
#[derive(Debug, Clone, Copy)]
pub struct RawIo {
    /// I/O type.
    pub io_type: IoType,
    /// Start of the data region (ignored without data).
    pub ptr: *mut u8,
    /// Length of the data region in bytes.
    pub len: usize,
    /// First block.
    pub offset_blocks: u64,
    /// Number of blocks.
    pub num_blocks: u64,
}

impl RawIo {
    /// The raw form of a module I/O, to forward it unchanged to a base bdev.
    pub fn forward(io: &mut ModuleIo) -> RawIo {
        let (ptr, len) = io.raw_buf();
        RawIo {
            io_type: io.io_type(),
            ptr,
            len,
            offset_blocks: io.offset_blocks(),
            num_blocks: io.num_blocks(),
        }
    }
}

/// One I/O as a module sees it. Not `Clone`: the module gives it back exactly once through
/// [`Completer::complete`], which ends its access to the data buffer.
pub struct ModuleIo {
    slot: u32,
    io_type: IoType,
    offset_blocks: u64,
    num_blocks: u64,
    /// The caller's buffer when this I/O owns it (not split); `ptr`/`len` point into it.
    owned: Option<IoBuf>,
    ptr: *mut u8,
    len: usize,
}

impl fmt::Debug for ModuleIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModuleIo")
            .field("slot", &self.slot)
            .field("io_type", &self.io_type)
            .field("offset_blocks", &self.offset_blocks)
            .field("num_blocks", &self.num_blocks)
            .field("len", &self.len)
            .finish()
    }
}

impl ModuleIo {
    /// The I/O type.
    pub fn io_type(&self) -> IoType {
        self.io_type
    }

    /// First block (already range-checked against the bdev size at submit).
    pub fn offset_blocks(&self) -> u64 {
        self.offset_blocks
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    /// Data length in bytes (`num_blocks * block_size` for read/write, else 0).
    pub fn len_bytes(&self) -> usize {
        self.len
    }

    /// The data buffer (empty for I/O without data).
    pub fn buf(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: ptr/len describe a live region owned by this I/O's slot (or its parent's)
        // until the ModuleIo is consumed by Completer::complete; ModuleIo is unique.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The data buffer, writable (reads fill it).
    pub fn buf_mut(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as in buf(); &mut self is the only access path to the region.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Raw pointer and length, for handing the region to the kernel or a base bdev. The
    /// region stays valid until this `ModuleIo` is completed (and while the owned buffer, if
    /// taken with [`ModuleIo::take_buf`], is not dropped).
    pub fn raw_buf(&mut self) -> (*mut u8, usize) {
        (self.ptr, self.len)
    }

    /// Takes the caller's buffer out of the I/O when the I/O owns it (an unsplit read or
    /// write submitted with an `IoBuf`), e.g. to move it into a ring op. Give it back with
    /// [`ModuleIo::restore_buf`] before completing. `None` for split children and raw
    /// submissions: use [`ModuleIo::buf_mut`] (or a bounce buffer) then.
    pub fn take_buf(&mut self) -> Option<IoBuf> {
        self.owned.take()
    }

    /// Puts back the buffer taken with [`ModuleIo::take_buf`].
    pub fn restore_buf(&mut self, buf: IoBuf) {
        self.ptr = buf.as_ptr() as *mut u8;
        self.len = buf.len();
        self.owned = Some(buf);
    }
}

type Completion = (u32, IoStatus, Option<IoBuf>);

struct CompletionQueue {
    q: RefCell<Vec<Completion>>,
}

/// How a module channel reports finished I/O. Cheap to clone; owning thread only.
/// Completions are queued and delivered by the next [`BdevChannel::poll`].
#[derive(Clone)]
pub struct Completer {
    q: Rc<CompletionQueue>,
}

impl Completer {
    /// Finishes `io` with `status`. The callback runs later, from the channel's poll.
    #[inline(always)]
    pub fn complete(&self, io: ModuleIo, status: IoStatus) {
        self.q.q.borrow_mut().push((io.slot, status, io.owned));
    }
}

/// A module's per-reactor data-path state (SPDK's channel create callback result).
pub trait ModuleChannel {
    /// Starts `io`. Never calls back into the submitter: report the result through the
    /// channel's [`Completer`] (now, or later from `poll`).
    fn submit(&mut self, io: ModuleIo);

    /// Reaps finished work (e.g. io_uring CQEs) and completes it. Returns work done.
    fn poll(&mut self) -> usize {
        0
    }

    /// Number of I/Os handed to `submit` and not yet completed, for shutdown and reset.
    fn nr_inflight(&self) -> usize {
        0
    }
}

enum Payload {
    None,
    Owned(IoBuf),
    Raw(*mut u8, usize),
}

struct Slot {
    io_type: IoType,
    offset_blocks: u64,
    num_blocks: u64,
    payload: Payload,
    tag: u64,
    cb: Option<IoCallback>,
    start_ticks: u64,
    parent: u32,
    children_left: u32,
    status: IoStatus,
}

impl Slot {
    fn empty() -> Slot {
        Slot {
            io_type: IoType::Read,
            offset_blocks: 0,
            num_blocks: 0,
            payload: Payload::None,
            tag: 0,
            cb: None,
            start_ticks: 0,
            parent: NO_PARENT,
            children_left: 0,
            status: IoStatus::Success,
        }
    }
}

struct SlotPool {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

impl SlotPool {
    fn nr_free_possible(&self) -> usize {
        self.free.len() + (MAX_IOS_PER_CHANNEL - self.slots.len())
    }

    #[inline]
    fn alloc(&mut self) -> Option<u32> {
        if let Some(i) = self.free.pop() {
            return Some(i);
        }
        if self.slots.len() >= MAX_IOS_PER_CHANNEL {
            return None;
        }
        self.slots.push(Slot::empty());
        Some((self.slots.len() - 1) as u32)
    }
}

pub(crate) struct ChannelInner {
    bdev: Arc<dyn Bdev>,
    /// `bdev.core()`, resolved once so the data path reads the size without a virtual call.
    /// SAFETY invariant: points into the allocation `bdev` keeps alive for the channel's life.
    core: *const BdevCore,
    block_size: u64,
    boundary: u64,
    supported: u8,
    /// `supported` while the channel is not frozen, 0 while a reset freezes it: the fast
    /// path checks this one mask and leaves frozen channels to the general path.
    fast_mask: Cell<u8>,
    /// The reactor that owns the channel (`None` on a non-reactor thread).
    home: Option<reactor::ReactorId>,
    module: RefCell<Box<dyn ModuleChannel>>,
    pool: RefCell<SlotPool>,
    done: Rc<CompletionQueue>,
    stats: Arc<ChannelStats>,
    nr_inflight: Cell<usize>,
    /// Resets of this channel waiting for their turn and the drain (see `reset`).
    pending_resets: RefCell<VecDeque<ModuleIo>>,
    /// Generation of the bdev-wide reset that froze the channel; 0 when not frozen.
    frozen_gen: Cell<u64>,
    /// Top-level I/O submitted while frozen (with "needs splitting"), submitted in order on
    /// unfreeze.
    frozen: RefCell<VecDeque<(ModuleIo, bool)>>,
    /// A remote reset waiting for this channel to drain.
    drain_ack: RefCell<Option<Arc<reset::ResetCtx>>>,
    /// The bdev-wide reset this channel runs as origin.
    active_reset: RefCell<Option<reset::ActiveReset>>,
    /// `drain_ack` or `active_reset` is set: `poll` has reset work to check.
    reset_busy: Cell<bool>,
    /// The reactor poller that drives this channel, when created on a reactor.
    poller: Cell<Option<reactor::PollerHandle>>,
    /// Tick count read once per poll: submissions are stamped with it and completions
    /// measured against it (as SPDK stamps with the thread's last TSC), so the data path
    /// reads the clock once per poll, not twice per I/O.
    now_ticks: Cell<u64>,
    /// The drained completion batch, kept to reuse its allocation.
    spare: RefCell<Vec<Completion>>,
}

impl ChannelInner {
    /// The bdev's current size in blocks.
    #[inline]
    fn num_blocks(&self) -> u64 {
        // SAFETY: `core` points into the bdev that `self.bdev` (an `Arc`) keeps alive and in
        // place for as long as `self` lives; `BdevCore` is `Sync`.
        unsafe { (*self.core).num_blocks() }
    }
}

impl Drop for ChannelInner {
    fn drop(&mut self) {
        if let Some(p) = self.poller.take() {
            // During a reactor thread's teardown its core (and the poller list) may already
            // be gone; unregistering is then moot, and must not panic in a TLS destructor.
            if reactor::try_current() == Some(p.reactor()) {
                p.unregister();
            }
        }
        if let Some(ctx) = self.drain_ack.get_mut().take() {
            // Do not hold up a reset running elsewhere.
            ctx.ack();
        }
        if self.nr_inflight.get() > 0 {
            // Dropped with I/O in flight (a caller bug): a module (or the kernel) may still
            // write into buffers the slots own, so leak the slots instead of freeing them.
            eprintln!(
                "bdev '{}': channel dropped with {} I/Os in flight; leaking their buffers",
                self.bdev.name(),
                self.nr_inflight.get()
            );
            let pool = std::mem::replace(
                self.pool.get_mut(),
                SlotPool {
                    slots: Vec::new(),
                    free: Vec::new(),
                },
            );
            std::mem::forget(pool);
        }
        let mut st = self.bdev.core().lock();
        st.retired.add(&self.stats.snapshot());
        let me = Arc::as_ptr(&self.stats);
        st.channels
            .retain(|w| w.as_ptr() != me && w.strong_count() > 0);
    }
}

/// Key of the per-thread channel cache: (reactor index or `u32::MAX` off-reactor, bdev id).
/// The reactor is part of the key because the simulator runs many reactors on one thread.
type ChannelKey = (u32, u64);

thread_local! {
    static CHANNELS: RefCell<HashMap<ChannelKey, RcWeak<ChannelInner>>> =
        RefCell::new(HashMap::new());
}

/// A bdev's I/O channel on the current thread (SPDK `spdk_bdev_get_io_channel`): cheap to
/// clone, `!Send`, one per (bdev, thread). Submit here; completions arrive on this thread.
///
/// On a thread that is not a reactor, call [`BdevChannel::poll`] to deliver completions.
#[derive(Clone)]
pub struct BdevChannel {
    inner: Rc<ChannelInner>,
}

impl fmt::Debug for BdevChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BdevChannel({})", self.inner.bdev.name())
    }
}

impl BdevChannel {
    /// The channel for `bdev` on this thread, created on first use.
    pub(crate) fn get(bdev: &Arc<dyn Bdev>) -> Result<BdevChannel> {
        let reactor_index = reactor::try_current().map_or(u32::MAX, |r| r.index() as u32);
        let id = (reactor_index, bdev.core().id());
        if let Some(inner) = CHANNELS.with(|c| c.borrow().get(&id).and_then(RcWeak::upgrade)) {
            return Ok(BdevChannel { inner });
        }
        let ch = BdevChannel::create(bdev)?;
        CHANNELS.with(|c| {
            let mut map = c.borrow_mut();
            map.retain(|_, w| w.strong_count() > 0);
            map.insert(id, Rc::downgrade(&ch.inner));
        });
        Ok(ch)
    }

    fn create(bdev: &Arc<dyn Bdev>) -> Result<BdevChannel> {
        let done = Rc::new(CompletionQueue {
            q: RefCell::new(Vec::with_capacity(256)),
        });
        let module = bdev.create_channel(Completer { q: done.clone() })?;
        let mut supported = 0u8;
        for t in IoType::ALL {
            if bdev.io_type_supported(t) {
                supported |= 1 << (t as u8);
            }
        }
        let stats = Arc::new(ChannelStats::default());
        let frozen_gen = {
            let mut st = bdev.core().lock();
            st.channels.push(Arc::downgrade(&stats));
            // A channel created while a reset has the bdev frozen starts frozen; the reset's
            // unfreeze reaches it like any other channel.
            st.reset_frozen.unwrap_or(0)
        };
        let home = reactor::try_current();
        let core = bdev.core();
        let inner = ChannelInner {
            bdev: bdev.clone(),
            core: core as *const BdevCore,
            block_size: u64::from(core.block_size()),
            boundary: u64::from(core.optimal_io_boundary()),
            supported,
            fast_mask: Cell::new(if frozen_gen == 0 { supported } else { 0 }),
            home,
            module: RefCell::new(module),
            pool: RefCell::new(SlotPool {
                slots: Vec::with_capacity(256),
                free: Vec::new(),
            }),
            done,
            stats,
            nr_inflight: Cell::new(0),
            pending_resets: RefCell::new(VecDeque::new()),
            frozen_gen: Cell::new(frozen_gen),
            frozen: RefCell::new(VecDeque::new()),
            drain_ack: RefCell::new(None),
            active_reset: RefCell::new(None),
            reset_busy: Cell::new(false),
            poller: Cell::new(None),
            now_ticks: Cell::new(ticks()),
            spare: RefCell::new(Vec::with_capacity(256)),
        };
        let ch = BdevChannel {
            inner: Rc::new(inner),
        };
        if home.is_some() {
            let weak = Rc::downgrade(&ch.inner);
            let name = format!("bdev_channel:{}", bdev.name());
            let handle = reactor::register_poller(&name, move || match weak.upgrade() {
                Some(inner) => BdevChannel { inner }.reactor_poll(),
                None => reactor::PollStatus::Idle,
            });
            ch.inner.poller.set(Some(handle));
        }
        Ok(ch)
    }

    /// One run of the channel's reactor poller: deliver completions; report Busy while
    /// completions are still queued so an interrupt-mode reactor does not sleep on them.
    fn reactor_poll(&self) -> reactor::PollStatus {
        let work = self.poll();
        reactor::PollStatus::from_busy(work > 0 || !self.inner.done.q.borrow().is_empty())
    }

    /// The bdev this channel submits to.
    pub fn bdev(&self) -> &Arc<dyn Bdev> {
        &self.inner.bdev
    }

    /// A zeroed buffer of `num_blocks` blocks suitably aligned for this bdev.
    pub fn alloc_buf(&self, num_blocks: u64) -> Result<IoBuf> {
        let len = num_blocks
            .checked_mul(self.inner.block_size)
            .and_then(|l| usize::try_from(l).ok())
            .ok_or_else(|| BdevError::invalid(format!("buffer of {num_blocks} blocks too big")))?;
        Ok(IoBuf::alloc(len))
    }

    /// Reads `num_blocks` blocks at `offset_blocks` into `buf` (exactly that many bytes).
    #[inline]
    pub fn read(
        &self,
        buf: IoBuf,
        offset_blocks: u64,
        num_blocks: u64,
        tag: u64,
        cb: &IoCallback,
    ) -> Result<(), SubmitError> {
        self.submit_buf(IoType::Read, buf, offset_blocks, num_blocks, tag, cb)
    }

    /// Writes `buf` (exactly `num_blocks` blocks) at `offset_blocks`.
    #[inline]
    pub fn write(
        &self,
        buf: IoBuf,
        offset_blocks: u64,
        num_blocks: u64,
        tag: u64,
        cb: &IoCallback,
    ) -> Result<(), SubmitError> {
        self.submit_buf(IoType::Write, buf, offset_blocks, num_blocks, tag, cb)
    }

    /// Reads `buf.len()` bytes at byte offset `offset_bytes`; both must be block multiples.
    pub fn read_at(
        &self,
        buf: IoBuf,
        offset_bytes: u64,
        tag: u64,
        cb: &IoCallback,
    ) -> Result<(), SubmitError> {
        match self.bytes_to_blocks(offset_bytes, buf.len() as u64) {
            Ok((off, n)) => self.read(buf, off, n, tag, cb),
            Err(error) => Err(SubmitError {
                error,
                buf: Some(buf),
            }),
        }
    }

    /// Writes `buf` at byte offset `offset_bytes`; both must be block multiples.
    pub fn write_at(
        &self,
        buf: IoBuf,
        offset_bytes: u64,
        tag: u64,
        cb: &IoCallback,
    ) -> Result<(), SubmitError> {
        match self.bytes_to_blocks(offset_bytes, buf.len() as u64) {
            Ok((off, n)) => self.write(buf, off, n, tag, cb),
            Err(error) => Err(SubmitError {
                error,
                buf: Some(buf),
            }),
        }
    }

    /// Discards `num_blocks` blocks at `offset_blocks`.
    pub fn unmap(
        &self,
        offset_blocks: u64,
        num_blocks: u64,
        tag: u64,
        cb: &IoCallback,
    ) -> Result<(), SubmitError> {
        self.submit(
            IoType::Unmap,
            Payload::None,
            offset_blocks,
            num_blocks,
            tag,
            cb,
        )
    }

    /// Writes zeroes to `num_blocks` blocks at `offset_blocks`.
    pub fn write_zeroes(
        &self,
        offset_blocks: u64,
        num_blocks: u64,
        tag: u64,
        cb: &IoCallback,
    ) -> Result<(), SubmitError> {
        self.submit(
            IoType::WriteZeroes,
            Payload::None,
            offset_blocks,
            num_blocks,
            tag,
            cb,
        )
    }

    /// Makes all completed writes durable (the range is advisory; 0 blocks allowed).
    pub fn flush(
        &self,
        offset_blocks: u64,
        num_blocks: u64,
        tag: u64,
        cb: &IoCallback,
    ) -> Result<(), SubmitError> {
        self.submit(
            IoType::Flush,
            Payload::None,
            offset_blocks,
            num_blocks,
            tag,
            cb,
        )
    }

    /// Resets the bdev (SPDK `spdk_bdev_reset`): every channel of the bdev, on every reactor,
    /// is frozen (I/O submitted meanwhile is queued, not failed), the reset waits for the I/O
    /// in flight on all of them, the module resets, the channels are unfrozen (their queued
    /// I/O goes out in order) and then the reset completes. Resets of one bdev run one at a
    /// time, in submission order. On a thread that is not a reactor, only this channel's I/O
    /// is waited for. See `io/reset.rs`.
    pub fn reset(&self, tag: u64, cb: &IoCallback) -> Result<(), SubmitError> {
        self.submit(IoType::Reset, Payload::None, 0, 0, tag, cb)
    }

    /// Submits an I/O whose data buffer (for read/write) is a raw region owned by the caller
    /// — for virtual bdevs forwarding a [`ModuleIo`]'s buffer to their base.
    ///
    /// # Safety
    /// For read/write, `io.ptr..io.ptr + io.len` must stay valid, and not be accessed by
    /// anyone else, until the completion callback runs.
    pub unsafe fn submit_raw(
        &self,
        io: RawIo,
        tag: u64,
        cb: &IoCallback,
    ) -> Result<(), SubmitError> {
        let payload = if io.io_type.has_data() {
            Payload::Raw(io.ptr, io.len)
        } else {
            Payload::None
        };
        self.submit(
            io.io_type,
            payload,
            io.offset_blocks,
            io.num_blocks,
            tag,
            cb,
        )
    }

    fn bytes_to_blocks(&self, offset_bytes: u64, len_bytes: u64) -> Result<(u64, u64)> {
        let bs = self.inner.block_size;
        if !offset_bytes.is_multiple_of(bs) || !len_bytes.is_multiple_of(bs) {
            return Err(BdevError::invalid(format!(
                "bdev '{}': offset {offset_bytes} / length {len_bytes} not a multiple of the \
                 {bs}-byte block size",
                self.inner.bdev.name()
            )));
        }
        Ok((offset_bytes / bs, len_bytes / bs))
    }

    fn validate(
        &self,
        io_type: IoType,
        payload: &Payload,
        offset_blocks: u64,
        num_blocks: u64,
    ) -> Result<()> {
        let inner = &self.inner;
        if inner.supported & (1 << io_type as u8) == 0 {
            return Err(BdevError::new(
                ErrorKind::Unsupported,
                format!(
                    "bdev '{}' does not support {}",
                    inner.bdev.name(),
                    io_type.name()
                ),
            ));
        }
        if io_type == IoType::Reset {
            return Ok(());
        }
        let size = inner.num_blocks();
        let in_range = offset_blocks
            .checked_add(num_blocks)
            .is_some_and(|end| end <= size);
        if !in_range || (num_blocks == 0 && io_type != IoType::Flush) {
            return Err(BdevError::invalid(format!(
                "bdev '{}': {} of {num_blocks} blocks at {offset_blocks} outside 0..{size}",
                inner.bdev.name(),
                io_type.name()
            )));
        }
        let want = num_blocks.checked_mul(inner.block_size);
        let have = match payload {
            Payload::None => None,
            Payload::Owned(b) => Some(b.len() as u64),
            Payload::Raw(_, l) => Some(*l as u64),
        };
        if io_type.has_data() && have != want {
            return Err(BdevError::invalid(format!(
                "bdev '{}': {} buffer of {} bytes does not match {num_blocks} blocks of {}",
                inner.bdev.name(),
                io_type.name(),
                have.unwrap_or(0),
                inner.block_size
            )));
        }
        Ok(())
    }

    /// The read/write fast path: an in-range, unsplit I/O on an owned buffer whose slot comes
    /// from the free list. Everything else (errors, splitting, a growing pool) takes the
    /// general [`BdevChannel::submit`], which re-checks and reports precisely.
    ///
    /// Free slots keep `payload = None`, `cb = None`, `parent = NO_PARENT` and
    /// `children_left = 0` (restored by `finish`), so only the per-I/O fields are written.
    #[inline(always)]
    fn submit_buf(
        &self,
        io_type: IoType,
        buf: IoBuf,
        offset_blocks: u64,
        num_blocks: u64,
        tag: u64,
        cb: &IoCallback,
    ) -> Result<(), SubmitError> {
        let inner = &*self.inner;
        let size = inner.num_blocks();
        let len = buf.len();
        // num_blocks <= size and size * block_size fits in u64 (validated geometry), so the
        // product cannot overflow once the range check passed.
        let fast = inner.boundary == 0
            && inner.fast_mask.get() & (1 << io_type as u8) != 0
            && num_blocks != 0
            && offset_blocks <= size
            && num_blocks <= size - offset_blocks
            && num_blocks * inner.block_size == len as u64;
        let mut pool = inner.pool.borrow_mut();
        let id = if fast { pool.free.pop() } else { None };
        let Some(id) = id else {
            drop(pool);
            return self.submit(
                io_type,
                Payload::Owned(buf),
                offset_blocks,
                num_blocks,
                tag,
                cb,
            );
        };
        let Some(slot) = pool.slots.get_mut(id as usize) else {
            unreachable!("free list holds slot {id} beyond the pool");
        };
        debug_assert!(matches!(slot.payload, Payload::None));
        debug_assert!(slot.parent == NO_PARENT && slot.children_left == 0);
        slot.io_type = io_type;
        slot.offset_blocks = offset_blocks;
        slot.num_blocks = num_blocks;
        slot.tag = tag;
        // A free slot holds no callback; forgetting the `None` it held skips drop glue.
        let old = slot.cb.replace(cb.clone());
        debug_assert!(old.is_none());
        std::mem::forget(old);
        slot.start_ticks = inner.now_ticks.get();
        drop(pool);
        inner.nr_inflight.set(inner.nr_inflight.get() + 1);
        let ptr = buf.as_ptr() as *mut u8;
        inner.module.borrow_mut().submit(ModuleIo {
            slot: id,
            io_type,
            offset_blocks,
            num_blocks,
            owned: Some(buf),
            ptr,
            len,
        });
        Ok(())
    }

    fn submit(
        &self,
        io_type: IoType,
        payload: Payload,
        offset_blocks: u64,
        num_blocks: u64,
        tag: u64,
        cb: &IoCallback,
    ) -> Result<(), SubmitError> {
        if let Err(error) = self.validate(io_type, &payload, offset_blocks, num_blocks) {
            return Err(SubmitError {
                error,
                buf: into_buf(payload),
            });
        }
        let inner = &self.inner;
        let b = inner.boundary;
        let splits = b > 0
            && !matches!(io_type, IoType::Flush | IoType::Reset)
            && (offset_blocks % b) + num_blocks > b;
        let nr_children = if splits {
            let first = b - offset_blocks % b;
            1 + (num_blocks - first).div_ceil(b)
        } else {
            0
        };
        let mut pool = inner.pool.borrow_mut();
        if pool.nr_free_possible() < 1 + nr_children as usize {
            drop(pool);
            return Err(pool_exhausted(inner, payload));
        }
        let Some(id) = pool.alloc() else {
            drop(pool);
            return Err(pool_exhausted(inner, payload));
        };
        let (ptr, len) = payload_region(&payload);
        let (payload, owned) = match payload {
            Payload::Owned(b) if !splits => (Payload::None, Some(b)),
            p => (p, None),
        };
        let slot = &mut pool.slots[id as usize];
        slot.io_type = io_type;
        slot.offset_blocks = offset_blocks;
        slot.num_blocks = num_blocks;
        slot.payload = payload;
        slot.tag = tag;
        slot.cb = Some(cb.clone());
        slot.start_ticks = inner.now_ticks.get();
        slot.parent = NO_PARENT;
        slot.status = IoStatus::Success;
        slot.children_left = nr_children as u32;
        drop(pool);
        inner.nr_inflight.set(inner.nr_inflight.get() + 1);
        let io = ModuleIo {
            slot: id,
            io_type,
            offset_blocks,
            num_blocks,
            owned,
            ptr,
            len,
        };
        if io_type == IoType::Reset {
            self.queue_reset(io);
        } else if self.inner.frozen_gen.get() != 0 {
            self.inner.frozen.borrow_mut().push_back((io, splits));
        } else if splits {
            self.submit_split(io);
        } else {
            self.submit_to_module(io);
        }
        Ok(())
    }

    /// Submits the children of split parent `parent` (whose slot already counts them), one
    /// per boundary segment, each pointing into the parent's buffer. Slots for all of them
    /// were reserved by the caller's free-slot check.
    fn submit_split(&self, parent: ModuleIo) {
        let inner = &self.inner;
        let b = inner.boundary;
        let end = parent.offset_blocks + parent.num_blocks;
        let mut off = parent.offset_blocks;
        while off < end {
            let n = (b - off % b).min(end - off);
            let (ptr, len) = if parent.io_type.has_data() {
                let byte_off = ((off - parent.offset_blocks) * inner.block_size) as usize;
                // SAFETY: byte_off + n * block_size <= parent.len: inside the parent's region.
                (
                    unsafe { parent.ptr.add(byte_off) },
                    (n * inner.block_size) as usize,
                )
            } else {
                (std::ptr::null_mut(), 0)
            };
            let mut pool = inner.pool.borrow_mut();
            let Some(cid) = pool.alloc() else {
                // Cannot happen (reserved); fail the missing part rather than hang.
                let p = &mut pool.slots[parent.slot as usize];
                p.status = IoStatus::Failed(libc::ENOMEM);
                p.children_left -= 1;
                off += n;
                continue;
            };
            let c = &mut pool.slots[cid as usize];
            c.io_type = parent.io_type;
            c.parent = parent.slot;
            c.payload = Payload::None;
            c.cb = None;
            drop(pool);
            self.submit_to_module(ModuleIo {
                slot: cid,
                io_type: parent.io_type,
                offset_blocks: off,
                num_blocks: n,
                owned: None,
                ptr,
                len,
            });
            off += n;
        }
    }

    #[inline]
    fn submit_to_module(&self, io: ModuleIo) {
        self.inner.module.borrow_mut().submit(io);
    }

    /// Delivers completed I/O (runs callbacks) and lets the module reap its queues. Call
    /// from the owning thread's poller; never from inside an [`IoCallback`].
    /// Returns the number of events processed (0 = idle).
    pub fn poll(&self) -> usize {
        let inner = &self.inner;
        let mut work = match inner.module.try_borrow_mut() {
            Ok(mut m) => m.poll(),
            Err(_) => 0,
        };
        let now = ticks();
        inner.now_ticks.set(now);
        // Take the queued batch (bounded by MAX_IOS_PER_CHANNEL); completions queued by the
        // callbacks below go to the fresh queue and are delivered by the next poll.
        let mut batch = inner.spare.take();
        std::mem::swap(&mut *inner.done.q.borrow_mut(), &mut batch);
        let n = batch.len();
        for (id, status, buf) in batch.drain(..) {
            self.finish(id, status, buf, now);
        }
        *inner.spare.borrow_mut() = batch;
        work += n;
        if inner.reset_busy.get() {
            self.reset_poll();
        }
        if inner.home.is_none()
            && !inner.pending_resets.borrow().is_empty()
            && inner.nr_inflight.get() <= inner.pending_resets.borrow().len()
        {
            let resets: Vec<ModuleIo> = inner.pending_resets.borrow_mut().drain(..).collect();
            for io in resets {
                inner.module.borrow_mut().submit(io);
            }
            work += 1;
        }
        work
    }

    /// The channel's clock: [`crate::ticks`] as read once at the start of the latest
    /// [`BdevChannel::poll`] (at creation before the first). Submissions are stamped with it
    /// and [`IoDone::latency_ticks`] is measured against it, so a caller that needs "now"
    /// inside a completion callback can read it here instead of the clock (as SPDK reads
    /// the TSC once per thread poll).
    #[inline]
    pub fn now_ticks(&self) -> u64 {
        self.inner.now_ticks.get()
    }

    /// Number of top-level I/Os submitted and not yet completed on this channel.
    pub fn nr_inflight(&self) -> usize {
        self.inner.nr_inflight.get()
    }

    /// Whether `poll` has something to do right now (completions queued or module work).
    pub fn has_pending(&self) -> bool {
        !self.inner.done.q.borrow().is_empty() || self.inner.nr_inflight.get() > 0
    }

    #[inline]
    fn finish(&self, id: u32, status: IoStatus, buf: Option<IoBuf>, now: u64) {
        let inner = &*self.inner;
        let mut pool = inner.pool.borrow_mut();
        let Some(slot) = pool.slots.get(id as usize) else {
            return;
        };
        let (top, status) = if slot.parent == NO_PARENT {
            (id, status)
        } else {
            match child_done(&mut pool, id, status) {
                Some(parent) => parent,
                None => return,
            }
        };
        let Some(slot) = pool.slots.get_mut(top as usize) else {
            return;
        };
        let cb = slot.cb.take();
        // An I/O that owned its buffer keeps no payload in the slot (see `submit`).
        let buf = match buf {
            Some(b) => Some(b),
            None => into_buf(std::mem::replace(&mut slot.payload, Payload::None)),
        };
        let lat = now.saturating_sub(slot.start_ticks);
        let done = IoDone {
            tag: slot.tag,
            io_type: slot.io_type,
            offset_blocks: slot.offset_blocks,
            num_blocks: slot.num_blocks,
            status,
            buf,
            latency_ticks: lat,
        };
        pool.free.push(top);
        drop(pool);
        if done.io_type == IoType::Reset {
            return self.finish_reset(done, cb);
        }
        let bytes = match done.io_type {
            IoType::Flush => 0,
            _ => done.num_blocks * inner.block_size,
        };
        inner
            .stats
            .record(done.io_type, bytes, lat, status.is_success());
        inner.nr_inflight.set(inner.nr_inflight.get() - 1);
        if let Some(cb) = cb {
            cb(done);
        }
    }

    /// `finish` of a reset: a bdev-wide reset unfreezes every channel before it completes
    /// and starts the next waiting reset after.
    #[cold]
    fn finish_reset(&self, done: IoDone, cb: Option<IoCallback>) {
        let inner = &*self.inner;
        let bdev_wide = self.reset_finished();
        inner.stats.record(
            IoType::Reset,
            0,
            done.latency_ticks,
            done.status.is_success(),
        );
        inner.nr_inflight.set(inner.nr_inflight.get() - 1);
        if let Some(cb) = cb {
            cb(done);
        }
        if bdev_wide {
            self.reset_start_next();
        }
    }
}

/// Frees split child `id` and counts it against its parent. Returns the parent and its
/// combined status once the last child is done.
#[cold]
fn child_done(pool: &mut SlotPool, id: u32, status: IoStatus) -> Option<(u32, IoStatus)> {
    let slot = pool.slots.get_mut(id as usize)?;
    let parent = std::mem::replace(&mut slot.parent, NO_PARENT);
    pool.free.push(id);
    let p = pool.slots.get_mut(parent as usize)?;
    if !status.is_success() && p.status.is_success() {
        p.status = status;
    }
    p.children_left -= 1;
    (p.children_left == 0).then_some((parent, p.status))
}

fn pool_exhausted(inner: &ChannelInner, payload: Payload) -> SubmitError {
    SubmitError {
        error: BdevError::new(
            ErrorKind::NoMemory,
            format!(
                "bdev '{}': channel request pool exhausted",
                inner.bdev.name()
            ),
        ),
        buf: into_buf(payload),
    }
}

fn into_buf(p: Payload) -> Option<IoBuf> {
    match p {
        Payload::Owned(b) => Some(b),
        Payload::None | Payload::Raw(..) => None,
    }
}

fn payload_region(p: &Payload) -> (*mut u8, usize) {
    match p {
        Payload::None => (std::ptr::null_mut(), 0),
        // The buffer's heap region never moves while the slot owns it; the pointer carries
        // the allocation's provenance (not a reference's), so writing through it is allowed.
        Payload::Owned(b) => (b.as_ptr() as *mut u8, b.len()),
        Payload::Raw(p, l) => (*p, *l),
    }
}
