//! Cross-core messages: boxed closures on lock-free per-reactor queues.
//!
//! Each reactor has one unbounded multi-producer queue (`crossbeam_queue::SegQueue`). A
//! message runs exactly once, on its target reactor, and messages from one sender to one
//! target run in send order (the queue is FIFO and a sender's pushes are ordered). A tick runs
//! at most `msg_batch` messages (STYLE rule 10); the rest wait for the next tick.
//!
//! Interrupt mode: after pushing, a sender checks the target's `sleeping` flag (with a
//! SeqCst fence pairing with the one the target issues before it re-checks its queue and
//! sleeps) and writes the target's eventfd if it was set; so a message is never left
//! unnoticed in the queue of a sleeping reactor.
//!
//! After a reactor has exited, messages sent to it are dropped (their destructors run on the
//! sender's thread), so a blocked [`crate::RuntimeHandle::call`] returns `Stopped`.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use crate::reactor::{self, Core, ReactorId, ReactorShared, Shared};

/// A cross-core message.
pub(crate) type Msg = Box<dyn FnOnce() + Send>;

/// Sends `f` to run on reactor `target` (which may be the current one; it then runs in a later
/// phase of this or the next tick, never inline). Allocates one box per message.
/// Panics off-reactor (use [`crate::RuntimeHandle::send_msg`] there) or if `target` does not
/// exist.
pub fn send_msg(target: ReactorId, f: impl FnOnce() + Send + 'static) {
    let msg: Msg = Box::new(f);
    reactor::with_core(|core| send_to(&core.shared, target, msg));
}

pub(crate) fn send_to(shared: &Shared, target: ReactorId, msg: Msg) {
    let reactor = shared.reactor(target);
    reactor.queue.push(msg);
    if shared.interrupt_mode {
        fence(Ordering::SeqCst);
        if reactor.sleeping.swap(false, Ordering::SeqCst) {
            reactor.wake();
        }
    }
    if reactor.exited.load(Ordering::SeqCst) {
        drop_queued(reactor);
    }
}

/// Drops every queued message without running it.
pub(crate) fn drop_queued(reactor: &ReactorShared) {
    while let Some(msg) = reactor.queue.pop() {
        drop(msg);
    }
}

/// Runs up to `msg_batch` queued messages. Returns true if any ran.
#[inline]
pub(crate) fn run_batch(core: &Core) -> bool {
    // `is_empty` is two plain loads; `pop` on an empty SegQueue issues a SeqCst fence, which
    // would dominate an otherwise idle tick.
    if core.me().queue.is_empty() {
        return false;
    }
    run_batch_slow(core)
}

#[inline(never)]
fn run_batch_slow(core: &Core) -> bool {
    let queue = &core.me().queue;
    let batch = core.msg_batch.get();
    let mut ran = 0;
    while ran < batch {
        let Some(msg) = queue.pop() else { break };
        msg();
        ran += 1;
    }
    ran > 0
}

type EachFn = Arc<dyn Fn() + Send + Sync>;
type DoneFn = Box<dyn FnOnce() + Send>;

/// Runs `f` on every reactor, one after another in id order (each visit is a message to the
/// next reactor), then runs `done` on the calling reactor — SPDK's `spdk_for_each_thread`.
/// Panics off-reactor.
pub fn for_each_reactor(
    f: impl Fn() + Send + Sync + 'static,
    done: impl FnOnce() + Send + 'static,
) {
    let origin = reactor::current();
    visit(ReactorId::new(0), origin, Arc::new(f), Box::new(done));
}

fn visit(at: ReactorId, origin: ReactorId, f: EachFn, done: DoneFn) {
    send_msg(at, move || {
        f();
        let next = ReactorId::new(at.index() as u32 + 1);
        if next.index() < reactor::nr_reactors() {
            visit(next, origin, f, done);
        } else {
            send_msg(origin, done);
        }
    });
}
