//! `reactor`: SPDK's threading model in Rust — one run-to-completion reactor per core.
//!
//! # Model
//!
//! A [`Runtime`] starts one thread per core of a [`CoreMask`], each pinned to its core and
//! running one reactor. A reactor owns all the state registered on it (pollers, timers, I/O
//! channels, its io_uring [`Ring`], its [`DmaBuf`] pool); other cores reach that state only by
//! sending it a message ([`send_msg`]), as `spdk_thread_send_msg` does. Nothing registered on a
//! reactor is `Send`: it lives and dies on that reactor's thread.
//!
//! # Tick order
//!
//! Each iteration of a reactor's loop (a *tick*) runs, in this order:
//!
//! 1. due one-shot timers ([`after`]) and due periodic pollers
//!    ([`register_periodic_poller`]);
//! 2. every active poller ([`register_poller`]) once;
//! 3. a bounded batch of cross-core messages (at most `RuntimeOptions::msg_batch`);
//! 4. the reactor's ring: one `io_uring_enter` for the SQEs queued during the tick, then a
//!    bounded batch of completions, whose callbacks run here (never inside a submit call).
//!
//! A tick is *busy* if any step did work (a poller returned [`PollStatus::Busy`], a timer or
//! message ran, a completion was reaped), *idle* otherwise. In poll mode the loop spins; in
//! interrupt mode an idle tick is followed by a sleep in `io_uring_enter` that ends on a
//! message (eventfd), a completion, the next timer/periodic-poller deadline, or stop.
//!
//! Interrupt mode sleeps in `io_uring_enter(GETEVENTS, min_complete=1)` with the next
//! deadline passed as the wait timeout (`IORING_ENTER_EXT_ARG`, Linux 5.11+, rather than a
//! timeout SQE: nothing to cancel or re-arm); a one-shot `POLL_ADD` on the reactor's eventfd,
//! re-armed after each wake-up, makes cross-core messages and stop requests complete the wait.
//! Senders write the eventfd only if the target announced it is about to sleep.
//!
//! # Affinity rules
//!
//! - Functions that act on "the current reactor" ([`current`], [`register_poller`], [`after`],
//!   [`ring`], [`IoDevice::channel`], [`DmaBuf::alloc`]'s pool) must be called from a reactor
//!   (inside a poller, timer, message, completion or the init closure) or inside
//!   [`sim::Sim::enter`]. They panic elsewhere: calling them off-reactor is a programmer error.
//! - Handles to reactor-local state ([`PollerHandle`], [`TimerHandle`], [`Ring`],
//!   [`IoChannel`], [`op::OpId`]) are used on the reactor that created them.
//! - Non-reactor threads (main, RPC, signal handlers) talk to reactors through a
//!   [`RuntimeHandle`] (send, or send and wait) and a [`StopHandle`].
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use reactor::{CoreMask, PollStatus, ReactorId, Runtime, RuntimeOptions};
//!
//! let mut opts = RuntimeOptions::new(CoreMask::parse("[0-1]").unwrap());
//! opts.interrupt_mode = true;
//! opts.pin_threads = false;
//! let runtime = Runtime::start(opts, || {
//!     // Runs on reactor 0: hand work to reactor 1, count its ticks there.
//!     reactor::send_msg(ReactorId::new(1), || {
//!         let mut n = 0;
//!         reactor::register_periodic_poller("count", Duration::from_millis(1), move || {
//!             n += 1;
//!             PollStatus::from_busy(n < 3)
//!         });
//!     });
//! })
//! .unwrap();
//! let h = runtime.handle();
//! // From this (non-reactor) thread: run a closure on reactor 1 and wait for its result.
//! assert_eq!(h.call(ReactorId::new(1), reactor::current).unwrap(), ReactorId::new(1));
//! h.stop();
//! runtime.join().unwrap();
//! ```
//!
//! # Deterministic testing
//!
//! [`sim::Sim`] steps many reactors in one thread with a virtual clock from a printed seed, so
//! cross-reactor logic can be tested reproducibly. See its module docs for what the ring does
//! there.

//! # Cost (measured, release build, shared 2-core VM)
//!
//! `cargo run --release -p reactor --example reactor_bench` prints rates per wall-second and
//! per CPU-second of the reactor thread (the latter is what a loaded machine distorts least).
//! An empty tick with one poller costs ≈ 10 ns of CPU (~100 M ticks per CPU-second; 30-35 M
//! ticks/s wall when the machine was half idle); a poller completing one fake I/O per call
//! ≈ 90 M ticks per CPU-second. The tick reads the clock only when timers or periodic pollers
//! exist, and then only every few µs. A cross-core message costs one `Box` (≈ 15 M msgs per
//! CPU-second of the sender); io_uring NOPs at depth 128 ≈ 8 M per CPU-second; cached 4 KiB
//! reads ≈ 1.8-2 M IOPS per CPU-second.

pub mod buf;
pub mod cpu;
mod error;
pub mod io_device;
pub mod msg;
pub mod op;
pub mod poller;
#[allow(clippy::module_inception)]
pub mod reactor;
pub mod sim;
pub mod timer;
pub mod uring;

pub use buf::{DmaBuf, DMA_ALIGN};
pub use cpu::CoreMask;
pub use error::Error;
pub use io_device::{IoChannel, IoDevice};
pub use msg::{for_each_reactor, send_msg};
pub use op::{Completion, CompletionHandler, Fd, OnComplete, Op, OpId, RawRegion};
pub use poller::{register_periodic_poller, register_poller, PollStatus, PollerHandle};
pub use reactor::{
    core_of, current, is_interrupt_mode, now, nr_reactors, reactor_ids, request_stop,
    runtime_handle, stats, try_current, ReactorId, ReactorStats, Runtime, RuntimeHandle,
    RuntimeOptions, StopHandle,
};
pub use timer::{after, TimerHandle};
pub use uring::{arm_readiness, ring, Rejected, Ring};
