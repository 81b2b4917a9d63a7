//! One-shot timers: a deadline-ordered queue per reactor.
//!
//! A timer fires on its reactor in the first tick at or after its deadline (on the reactor's
//! clock: real, or virtual under [`crate::sim`]). Timers that become due while the timer phase
//! runs (e.g. re-armed with a zero delay) wait for the next tick, so the phase is bounded.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::reactor::{self, Core, ReactorId};

/// Identifies a pending timer; `Copy`, and dropping it does not cancel.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct TimerHandle {
    reactor: ReactorId,
    deadline: Instant,
    seq: u64,
}

impl TimerHandle {
    /// Cancels the timer. Returns true if it had not fired yet. On a reactor it must be the
    /// timer's own (panics otherwise); off-reactor (after the reactor stopped, e.g. in a
    /// thread-local destructor) it does nothing and returns false.
    pub fn cancel(&self) -> bool {
        let removed = reactor::try_with_core(|core| {
            assert_eq!(
                core.id, self.reactor,
                "timer cancelled from another reactor"
            );
            core.timers
                .borrow_mut()
                .queue
                .remove(&(self.deadline, self.seq))
        });
        removed.flatten().is_some()
    }

    /// When the timer fires.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

/// Runs `f` once on the current reactor after `delay`. Panics off-reactor.
pub fn after(delay: Duration, f: impl FnOnce() + 'static) -> TimerHandle {
    reactor::with_core(|core| {
        let deadline = core.now() + delay;
        let mut timers = core.timers.borrow_mut();
        timers.next_seq += 1;
        let seq = timers.next_seq;
        timers.queue.insert((deadline, seq), Box::new(f));
        TimerHandle {
            reactor: core.id,
            deadline,
            seq,
        }
    })
}

type TimerFn = Box<dyn FnOnce()>;

#[derive(Default)]
pub(crate) struct TimerQueue {
    queue: BTreeMap<(Instant, u64), TimerFn>,
    next_seq: u64,
}

impl TimerQueue {
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.queue.keys().next().map(|&(deadline, _)| deadline)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub(crate) fn clear(&mut self) -> Vec<TimerFn> {
        std::mem::take(&mut self.queue).into_values().collect()
    }
}

/// Runs the timers due at `now` that existed when the phase began. Returns true if any ran.
pub(crate) fn run_due(core: &Core, now: Instant) -> bool {
    let limit = core.timers.borrow().next_seq;
    let mut ran = false;
    loop {
        let next = {
            let mut timers = core.timers.borrow_mut();
            match timers.queue.first_key_value() {
                Some((&(deadline, seq), _)) if deadline <= now && seq <= limit => {
                    timers.queue.pop_first()
                }
                _ => None,
            }
        };
        let Some((_, fire)) = next else { break };
        fire();
        ran = true;
    }
    ran
}
