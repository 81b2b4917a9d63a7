//! The per-core reactor: its loop, the runtime that starts one per core, stop, interrupt mode
//! and statistics.
//!
//! State split: `Shared` is the runtime-wide, thread-safe part (message queues, stop flag,
//! wake-up eventfds, counters) and `Core` is one reactor's thread-local part (pollers,
//! timers, ring, buffer pool, channels). A thread-local pointer names the `Core` whose code
//! is running ("the current reactor"); it is set for a reactor thread's whole life, and by
//! [`crate::sim::Sim`] around each simulated step.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::{Rc, Weak};
use std::sync::atomic::{fence, AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;

use crate::buf::BufPool;
use crate::cpu::{self, CoreMask};
use crate::error::Error;
use crate::msg::{self, Msg};
use crate::poller::{self, PollerSet};
use crate::timer::{self, TimerQueue};
use crate::uring::Ring;

/// Dense index of a reactor in its runtime: `0..nr_reactors()`, in core order. Reactor 0
/// runs on the lowest core of the mask and runs the init closure.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReactorId(u32);

impl ReactorId {
    /// The reactor with dense index `index`.
    pub const fn new(index: u32) -> Self {
        ReactorId(index)
    }

    /// The dense index, for per-reactor arrays.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ReactorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// How to start a [`Runtime`].
#[derive(Clone, Debug)]
pub struct RuntimeOptions {
    /// One reactor per core.
    pub mask: CoreMask,
    /// Sleep in the ring when idle instead of spinning.
    pub interrupt_mode: bool,
    /// Pin each reactor thread to its core (and fail if a core is unavailable). Tests that
    /// want more reactors than cores turn this off.
    pub pin_threads: bool,
    /// Submission queue entries per ring (completion queue is twice that).
    pub ring_entries: u32,
    /// Maximum in-flight ring operations per reactor; more are rejected.
    pub max_in_flight: usize,
    /// Maximum messages run per tick (SPDK's `SPDK_MSG_BATCH_SIZE`).
    pub msg_batch: usize,
}

impl RuntimeOptions {
    /// Defaults for `mask`: poll mode, pinned, 256-entry rings, 64 messages per tick.
    pub fn new(mask: CoreMask) -> Self {
        RuntimeOptions {
            mask,
            interrupt_mode: false,
            pin_threads: true,
            ring_entries: 256,
            max_in_flight: 4096,
            msg_batch: 64,
        }
    }
}

impl RuntimeOptions {
    /// Largest `ring_entries` accepted (the kernel's `IORING_MAX_ENTRIES`).
    pub const MAX_RING_ENTRIES: u32 = 32768;

    /// Checks the numeric limits (the mask is valid by construction).
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |name, reason: &str| {
            Err(Error::InvalidOption {
                name,
                reason: reason.to_string(),
            })
        };
        if self.ring_entries == 0 || self.ring_entries > Self::MAX_RING_ENTRIES {
            return bad("ring_entries", "must be 1..=32768");
        }
        if self.max_in_flight == 0 || self.max_in_flight > 1 << 24 {
            return bad("max_in_flight", "must be 1..=16777216");
        }
        if self.msg_batch == 0 {
            return bad("msg_batch", "must be positive");
        }
        Ok(())
    }
}

/// Per-reactor statistics (for `framework_get_reactors`).
#[derive(Clone, Debug, PartialEq)]
pub struct ReactorStats {
    /// The reactor.
    pub id: ReactorId,
    /// Its CPU core.
    pub core: usize,
    /// Ticks in which something ran.
    pub busy_ticks: u64,
    /// Ticks in which nothing ran.
    pub idle_ticks: u64,
    /// User + system CPU time of the reactor thread (zero under the simulator or before the
    /// thread started).
    pub cpu_time: Duration,
    /// The user part of `cpu_time` (SPDK's `usr_stat`).
    pub cpu_user_time: Duration,
    /// The system part of `cpu_time` (SPDK's `sys_stat`).
    pub cpu_system_time: Duration,
    /// Time since the runtime started.
    pub uptime: Duration,
    /// Whether the reactor sleeps when idle.
    pub interrupt_mode: bool,
    /// Ring ops in flight as of the reactor's last idle tick; after the reactor stopped, the
    /// ops its shutdown drain could not complete (0 when the slab was emptied).
    pub nr_ops_in_flight: usize,
}

impl ReactorStats {
    /// CPU usage over the reactor's life, as a fraction of one core (0.0 to ~1.0).
    pub fn cpu_usage(&self) -> f64 {
        if self.uptime.is_zero() {
            0.0
        } else {
            self.cpu_time.as_secs_f64() / self.uptime.as_secs_f64()
        }
    }
}

/// Runtime-wide state shared by all reactor threads and handles.
pub(crate) struct Shared {
    pub(crate) reactors: Box<[ReactorShared]>,
    pub(crate) stop: AtomicBool,
    pub(crate) interrupt_mode: bool,
    pub(crate) started: Instant,
}

/// The thread-safe part of one reactor.
pub(crate) struct ReactorShared {
    pub(crate) core: usize,
    pub(crate) queue: SegQueue<Msg>,
    /// Set by an interrupt-mode reactor just before it sleeps.
    pub(crate) sleeping: AtomicBool,
    /// Set once the reactor's loop has exited; later messages are dropped.
    pub(crate) exited: AtomicBool,
    /// Written to wake the reactor (interrupt mode only).
    pub(crate) eventfd: Option<OwnedFd>,
    busy_ticks: AtomicU64,
    idle_ticks: AtomicU64,
    /// Ring ops in flight, published on idle ticks and after the shutdown drain.
    nr_ops_in_flight: AtomicUsize,
    tid: AtomicI32,
}

impl ReactorShared {
    fn new(core: usize, interrupt_mode: bool) -> Result<Self, Error> {
        let eventfd = if interrupt_mode {
            // SAFETY: plain syscall; the result is checked before use.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if fd < 0 {
                return Err(Error::io("eventfd", std::io::Error::last_os_error()));
            }
            // SAFETY: fd is a fresh descriptor owned by nobody else.
            Some(unsafe { OwnedFd::from_raw_fd(fd) })
        } else {
            None
        };
        Ok(ReactorShared {
            core,
            queue: SegQueue::new(),
            sleeping: AtomicBool::new(false),
            exited: AtomicBool::new(false),
            eventfd,
            busy_ticks: AtomicU64::new(0),
            idle_ticks: AtomicU64::new(0),
            nr_ops_in_flight: AtomicUsize::new(0),
            tid: AtomicI32::new(0),
        })
    }

    /// Wakes the reactor if it sleeps. Async-signal-safe (an atomic and a `write`).
    pub(crate) fn wake(&self) {
        if let Some(fd) = &self.eventfd {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid local to an eventfd we own. A failure
            // (EAGAIN when the counter is saturated) still leaves the eventfd readable.
            let _ = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }
}

impl Shared {
    pub(crate) fn new(cores: &[usize], interrupt_mode: bool) -> Result<Arc<Shared>, Error> {
        let reactors = cores
            .iter()
            .map(|&core| ReactorShared::new(core, interrupt_mode))
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Arc::new(Shared {
            reactors: reactors.into_boxed_slice(),
            stop: AtomicBool::new(false),
            interrupt_mode,
            started: Instant::now(),
        }))
    }

    pub(crate) fn reactor(&self, id: ReactorId) -> &ReactorShared {
        assert!(
            id.index() < self.reactors.len(),
            "reactor {id} does not exist ({} reactors)",
            self.reactors.len()
        );
        &self.reactors[id.index()]
    }

    /// Requests stop and wakes every reactor. Async-signal-safe.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for reactor in self.reactors.iter() {
            reactor.wake();
        }
    }

    pub(crate) fn stats(&self, id: ReactorId) -> ReactorStats {
        let reactor = self.reactor(id);
        let tid = reactor.tid.load(Ordering::Relaxed);
        let (cpu_user_time, cpu_system_time) = if tid > 0 {
            cpu::thread_cpu_times(tid).unwrap_or_default()
        } else {
            (Duration::ZERO, Duration::ZERO)
        };
        ReactorStats {
            id,
            core: reactor.core,
            busy_ticks: reactor.busy_ticks.load(Ordering::Relaxed),
            idle_ticks: reactor.idle_ticks.load(Ordering::Relaxed),
            cpu_time: cpu_user_time + cpu_system_time,
            cpu_user_time,
            cpu_system_time,
            uptime: self.started.elapsed(),
            interrupt_mode: self.interrupt_mode,
            nr_ops_in_flight: reactor.nr_ops_in_flight.load(Ordering::Relaxed),
        }
    }
}

/// A reactor's clock: real time, or the simulator's virtual time.
pub(crate) enum Clock {
    Real,
    Virtual(Rc<Cell<Instant>>),
}

/// The thread-local part of one reactor.
pub(crate) struct Core {
    pub(crate) id: ReactorId,
    pub(crate) shared: Arc<Shared>,
    pub(crate) pollers: RefCell<PollerSet>,
    pub(crate) timers: RefCell<TimerQueue>,
    pub(crate) pool: RefCell<BufPool>,
    pub(crate) channels: RefCell<HashMap<u64, Weak<dyn Any>>>,
    pub(crate) ring: Ring,
    pub(crate) clock: Clock,
    /// Messages per tick; the simulator varies it.
    pub(crate) msg_batch: Cell<usize>,
    /// Ticks to skip before reading the clock again (see `Core::timed_phase`).
    clock_skip: Cell<u32>,
    /// Current stride between clock reads, adapted to the tick length.
    clock_stride: Cell<u32>,
    /// When the clock was last read by the timed phase.
    last_clock: Cell<Instant>,
}

impl Core {
    pub(crate) fn new(
        id: ReactorId,
        shared: Arc<Shared>,
        ring: Ring,
        clock: Clock,
        msg_batch: usize,
    ) -> Core {
        assert!(id.index() < shared.reactors.len());
        assert!(msg_batch > 0, "msg_batch must be positive");
        Core {
            id,
            shared,
            pollers: RefCell::default(),
            timers: RefCell::default(),
            pool: RefCell::new(BufPool::new()),
            channels: RefCell::default(),
            ring,
            clock,
            msg_batch: Cell::new(msg_batch),
            clock_skip: Cell::new(0),
            clock_stride: Cell::new(1),
            last_clock: Cell::new(Instant::now()),
        }
    }

    pub(crate) fn me(&self) -> &ReactorShared {
        &self.shared.reactors[self.id.index()]
    }

    pub(crate) fn now(&self) -> Instant {
        match &self.clock {
            Clock::Real => Instant::now(),
            Clock::Virtual(now) => now.get(),
        }
    }

    /// Earliest timer or periodic-poller deadline.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let timer = self.timers.borrow().next_deadline();
        let poller = self.pollers.borrow().next_deadline();
        match (timer, poller) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// One loop iteration: timers, pollers, messages, ring. Returns true if busy.
    /// The clock is read only when timers or periodic pollers exist.
    pub(crate) fn tick(&self) -> bool {
        let mut busy = false;
        let timed = !self.timers.borrow().is_empty() || self.pollers.borrow().has_periodic();
        if timed {
            busy |= self.timed_phase();
        }
        busy |= poller::run_active(self);
        busy |= msg::run_batch(self);
        busy |= self.ring.poll();
        let me = self.me();
        // Single writer: a plain load/store avoids a locked instruction per tick.
        if busy {
            me.busy_ticks
                .store(me.busy_ticks.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        } else {
            me.idle_ticks
                .store(me.idle_ticks.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            me.nr_ops_in_flight
                .store(self.ring.nr_in_flight(), Ordering::Relaxed);
        }
        busy
    }

    /// Runs due timers and periodic pollers. Reading the real clock costs more than a whole
    /// tick of a fast poller (~60 ns in this VM), so the clock is read every `stride` ticks:
    /// the stride doubles (up to 32) while reads are under 2 µs apart and drops to 1 as soon
    /// as they are over 8 µs apart. A timer is thus late by at most ~8 µs on a steadily
    /// ticking reactor, or 32 ticks after the ticks suddenly get long; the clock costs a few
    /// percent of the tightest loop. The virtual clock is read every tick.
    fn timed_phase(&self) -> bool {
        const MAX_STRIDE: u32 = 32;
        const FAST: Duration = Duration::from_micros(2);
        const SLOW: Duration = Duration::from_micros(8);
        let skip = self.clock_skip.get();
        if skip > 0 {
            self.clock_skip.set(skip - 1);
            return false;
        }
        let now = self.now();
        if matches!(self.clock, Clock::Real) {
            let since = now.saturating_duration_since(self.last_clock.get());
            let stride = self.clock_stride.get();
            let stride = if since < FAST {
                (stride * 2).min(MAX_STRIDE)
            } else if since > SLOW {
                1
            } else {
                stride
            };
            self.clock_stride.set(stride);
            self.clock_skip.set(stride - 1);
            self.last_clock.set(now);
        }
        let mut busy = timer::run_due(self, now);
        busy |= poller::run_periodic(self, now);
        busy
    }

    /// Forces the next tick to read the clock (after a sleep, or a new deadline).
    pub(crate) fn reset_clock_stride(&self) {
        self.clock_skip.set(0);
        self.clock_stride.set(1);
    }

    /// Interrupt mode: sleeps in the ring until a message, completion, deadline or stop.
    fn sleep(&self) {
        let me = self.me();
        me.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if !me.queue.is_empty() || self.shared.stop.load(Ordering::SeqCst) {
            me.sleeping.store(false, Ordering::SeqCst);
            return;
        }
        let timeout = self
            .next_deadline()
            .map(|deadline| deadline.saturating_duration_since(Instant::now()));
        self.ring.wait(timeout);
        me.sleeping.store(false, Ordering::SeqCst);
        self.reset_clock_stride();
    }

    /// Tears down reactor-local state on the reactor's thread: the ring is drained first
    /// (while pollers and timers, which may own memory that raw ops use, still exist), then
    /// timers, pollers and queued messages are dropped (not run), then the buffer pool.
    pub(crate) fn shutdown(&self) {
        let me = self.me();
        me.exited.store(true, Ordering::SeqCst);
        self.ring.drain();
        me.nr_ops_in_flight
            .store(self.ring.nr_in_flight(), Ordering::SeqCst);
        msg::drop_queued(me);
        let timers = self.timers.borrow_mut().clear();
        drop(timers);
        let pollers = self.pollers.borrow_mut().clear();
        drop(pollers);
        msg::drop_queued(me);
        let bufs = self.pool.borrow_mut().close();
        drop(bufs);
    }
}

thread_local! {
    static CURRENT: Cell<*const Core> = const { Cell::new(std::ptr::null()) };
}

/// Makes `core` the current reactor until the guard drops (restoring the previous one).
pub(crate) struct EnterGuard {
    previous: *const Core,
}

pub(crate) fn enter(core: &Rc<Core>) -> EnterGuard {
    let previous = CURRENT.with(|c| c.replace(Rc::as_ptr(core)));
    EnterGuard { previous }
}

impl Drop for EnterGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.previous));
    }
}

/// Runs `f` with the current reactor, or returns None off-reactor.
pub(crate) fn try_with_core<R>(f: impl FnOnce(&Core) -> R) -> Option<R> {
    let ptr = CURRENT.with(Cell::get);
    if ptr.is_null() {
        return None;
    }
    // SAFETY: CURRENT is non-null only while an EnterGuard is alive, and the guard's owner
    // (the reactor thread or the simulator) holds an Rc<Core> for at least that long. Core is
    // only accessed through shared references and RefCell/Cell interior mutability.
    Some(f(unsafe { &*ptr }))
}

/// Runs `f` with the current reactor; panics off-reactor (a programmer error).
pub(crate) fn with_core<R>(f: impl FnOnce(&Core) -> R) -> R {
    try_with_core(f).expect("not on a reactor: call this from a reactor or Sim::enter")
}

/// The current reactor. Panics off-reactor.
pub fn current() -> ReactorId {
    with_core(|core| core.id)
}

/// The current reactor, or None off-reactor.
pub fn try_current() -> Option<ReactorId> {
    try_with_core(|core| core.id)
}

/// Number of reactors in the current runtime. Panics off-reactor.
pub fn nr_reactors() -> usize {
    with_core(|core| core.shared.reactors.len())
}

/// All reactor ids of the current runtime, in order. Panics off-reactor.
pub fn reactor_ids() -> impl Iterator<Item = ReactorId> {
    (0..nr_reactors() as u32).map(ReactorId)
}

/// The CPU core of reactor `id` (its index under the simulator). Panics off-reactor.
pub fn core_of(id: ReactorId) -> usize {
    with_core(|core| core.shared.reactor(id).core)
}

/// The current reactor's clock (virtual under the simulator). Panics off-reactor.
pub fn now() -> Instant {
    with_core(Core::now)
}

/// True if the current runtime runs in interrupt mode. Panics off-reactor.
pub fn is_interrupt_mode() -> bool {
    with_core(|core| core.shared.interrupt_mode)
}

/// Asks every reactor of the current runtime to stop after its current tick.
/// Panics off-reactor.
pub fn request_stop() {
    with_core(|core| core.shared.stop())
}

/// A handle on the current runtime, for handing to non-reactor threads. Panics off-reactor.
pub fn runtime_handle() -> RuntimeHandle {
    with_core(|core| RuntimeHandle {
        shared: core.shared.clone(),
    })
}

/// Statistics of reactor `id` of the current runtime. Reads procfs for the CPU time: a
/// control-path call (RPC), not for pollers. Panics off-reactor.
pub fn stats(id: ReactorId) -> ReactorStats {
    with_core(|core| core.shared.stats(id))
}

/// Running reactor threads. Start with [`Runtime::start`], stop with a [`StopHandle`],
/// [`RuntimeHandle::stop`] or [`request_stop`], then [`Runtime::join`].
pub struct Runtime {
    handle: RuntimeHandle,
    threads: Vec<JoinHandle<()>>,
}

/// A `Send + Sync` handle to a runtime, for non-reactor threads (main, RPC).
#[derive(Clone)]
pub struct RuntimeHandle {
    shared: Arc<Shared>,
}

/// Requests stop. `stop` only stores an atomic and writes eventfds, so it is
/// async-signal-safe and may be called from a signal handler or any thread.
#[derive(Clone)]
pub struct StopHandle {
    shared: Arc<Shared>,
}

impl StopHandle {
    /// Asks every reactor to stop after its current tick. Idempotent.
    pub fn stop(&self) {
        self.shared.stop();
    }
}

impl fmt::Debug for StopHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StopHandle").finish_non_exhaustive()
    }
}

impl fmt::Debug for RuntimeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeHandle")
            .field("nr_reactors", &self.shared.reactors.len())
            .finish_non_exhaustive()
    }
}

impl RuntimeHandle {
    /// Number of reactors.
    pub fn nr_reactors(&self) -> usize {
        self.shared.reactors.len()
    }

    /// All reactor ids, in order.
    pub fn reactor_ids(&self) -> Vec<ReactorId> {
        (0..self.nr_reactors() as u32).map(ReactorId).collect()
    }

    /// The CPU core of reactor `id`. Panics if `id` does not exist.
    pub fn core_of(&self, id: ReactorId) -> usize {
        self.shared.reactor(id).core
    }

    /// Sends `f` to run on reactor `target` (see [`crate::send_msg`]). If the runtime has
    /// stopped, `f` is dropped without running. Panics if `target` does not exist.
    pub fn send_msg(&self, target: ReactorId, f: impl FnOnce() + Send + 'static) {
        msg::send_to(&self.shared, target, Box::new(f));
    }

    /// Runs `f` on reactor `target` and blocks the calling thread until it returns its
    /// result. Errors with [`Error::Stopped`] if the runtime stops first. Must not be called
    /// on a reactor thread (it would block the reactor; panics).
    pub fn call<R: Send + 'static>(
        &self,
        target: ReactorId,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, Error> {
        assert!(
            try_current().is_none(),
            "RuntimeHandle::call blocks: use send_msg on a reactor"
        );
        let (tx, rx) = mpsc::sync_channel(1);
        self.send_msg(target, move || {
            let _ = tx.send(f());
        });
        rx.recv().map_err(|_| Error::Stopped)
    }

    /// Asks every reactor to stop after its current tick.
    pub fn stop(&self) {
        self.shared.stop();
    }

    /// True once stop was requested.
    pub fn is_stopping(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
    }

    /// A stop handle for signal handlers.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            shared: self.shared.clone(),
        }
    }

    /// Statistics of every reactor.
    pub fn stats(&self) -> Vec<ReactorStats> {
        (0..self.nr_reactors() as u32)
            .map(|i| self.shared.stats(ReactorId(i)))
            .collect()
    }
}

/// Stops the whole runtime if a reactor thread unwinds, so `join` does not hang.
struct PanicGuard(Arc<Shared>);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.stop();
        }
    }
}

impl Runtime {
    /// Starts one reactor thread per core of `opts.mask`, waits until every reactor is ready,
    /// then runs `init` on reactor 0. Errors if a core is unavailable (with pinning), or a
    /// ring or eventfd cannot be created; then no thread is left running.
    pub fn start(
        opts: RuntimeOptions,
        init: impl FnOnce() + Send + 'static,
    ) -> Result<Runtime, Error> {
        opts.validate()?;
        if opts.pin_threads {
            cpu::check_available(&opts.mask)?;
        }
        let shared = Shared::new(opts.mask.cores(), opts.interrupt_mode)?;
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), Error>>();
        let mut threads = Vec::with_capacity(opts.mask.len());
        for (index, &core) in opts.mask.cores().iter().enumerate() {
            let id = ReactorId(index as u32);
            let thread_shared = shared.clone();
            let opts = opts.clone();
            let ready = ready_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("reactor_{core}"))
                .spawn(move || reactor_thread(id, thread_shared, opts, ready));
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    shared.stop();
                    join_all(threads);
                    return Err(Error::io("spawn reactor thread", e));
                }
            }
        }
        drop(ready_tx);
        let mut failure = None;
        for _ in 0..threads.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    failure.get_or_insert(e);
                }
                Err(_) => {
                    failure.get_or_insert(Error::Stopped);
                }
            }
        }
        if let Some(e) = failure {
            shared.stop();
            join_all(threads);
            return Err(e);
        }
        let handle = RuntimeHandle { shared };
        handle.send_msg(ReactorId(0), init);
        Ok(Runtime { handle, threads })
    }

    /// Starts the runtime and waits until it stops.
    pub fn run(opts: RuntimeOptions, init: impl FnOnce() + Send + 'static) -> Result<(), Error> {
        Runtime::start(opts, init)?.join()
    }

    /// A handle for sending work and stopping.
    pub fn handle(&self) -> RuntimeHandle {
        self.handle.clone()
    }

    /// A handle for stopping (signal-safe).
    pub fn stop_handle(&self) -> StopHandle {
        self.handle.stop_handle()
    }

    /// Waits for every reactor to stop (after a stop request). Each reactor drains its ring
    /// before exiting. Errors if a reactor thread panicked.
    pub fn join(self) -> Result<(), Error> {
        let mut result = Ok(());
        for (index, thread) in self.threads.into_iter().enumerate() {
            if thread.join().is_err() && result.is_ok() {
                result = Err(Error::ReactorPanicked {
                    id: ReactorId(index as u32),
                });
            }
        }
        result
    }
}

fn join_all(threads: Vec<JoinHandle<()>>) {
    for thread in threads {
        let _ = thread.join();
    }
}

fn reactor_thread(
    id: ReactorId,
    shared: Arc<Shared>,
    opts: RuntimeOptions,
    ready: mpsc::Sender<Result<(), Error>>,
) {
    let _panic_guard = PanicGuard(shared.clone());
    let me = shared.reactor(id);
    let setup = (|| {
        if opts.pin_threads {
            cpu::pin_current_thread(me.core)?;
        }
        // SAFETY: gettid has no preconditions.
        me.tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
        let eventfd = me.eventfd.as_ref().map(AsRawFd::as_raw_fd);
        Ring::new(opts.ring_entries, opts.max_in_flight, eventfd)
    })();
    let ring = match setup {
        Ok(ring) => ring,
        Err(e) => {
            me.exited.store(true, Ordering::SeqCst);
            let _ = ready.send(Err(e));
            return;
        }
    };
    if opts.pin_threads && !opts.interrupt_mode {
        // A polling reactor never yields its core: keep the ring's io-wq workers on the
        // cores no reactor spins on (or at least off this one). Best effort: an old kernel
        // without IORING_REGISTER_IOWQ_AFF keeps the default.
        let reactor_cores = opts.mask.cores();
        let available = cpu::available_cores();
        let mut others: Vec<usize> = available
            .iter()
            .copied()
            .filter(|c| !reactor_cores.contains(c))
            .collect();
        if others.is_empty() {
            others = available.into_iter().filter(|&c| c != me.core).collect();
        }
        let _ = ring.set_worker_affinity(&others);
    }
    let core = Rc::new(Core::new(
        id,
        shared.clone(),
        ring,
        Clock::Real,
        opts.msg_batch,
    ));
    let guard = enter(&core);
    let _ = ready.send(Ok(()));
    drop(ready);
    run_loop(&core);
    core.shutdown();
    drop(guard);
}

fn run_loop(core: &Core) {
    let interrupt_mode = core.shared.interrupt_mode;
    while !core.shared.stop.load(Ordering::Relaxed) {
        let busy = core.tick();
        if !busy && interrupt_mode {
            core.sleep();
        }
    }
}
