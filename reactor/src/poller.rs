//! Pollers: closures a reactor calls every tick (active) or every `period` (periodic).
//!
//! A poller does bounded work and returns [`PollStatus::Busy`] if it did any, `Idle` if not;
//! it never blocks, sleeps or takes a lock (STYLE rule 11). Registration and unregistration
//! are deferred: a poller registered during a tick first runs in the next poller phase, and
//! an unregistered poller is never called again but is dropped only after the phase in which
//! it was unregistered (so a poller may unregister itself or others from inside a poll).
//!
//! Running the active pollers costs two `RefCell` borrows per poller and no allocation.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use crate::reactor::{self, Core, ReactorId};

/// What a poller did in one call.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum PollStatus {
    /// It did work: the reactor must not sleep after this tick.
    Busy,
    /// It found nothing to do.
    Idle,
}

impl PollStatus {
    /// `Busy` if `busy`, else `Idle`.
    pub fn from_busy(busy: bool) -> Self {
        if busy {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }

    /// True for `Busy`.
    pub fn is_busy(self) -> bool {
        self == PollStatus::Busy
    }
}

/// Identifies a registered poller. `Copy`: keep as many as you like; dropping one does not
/// unregister.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct PollerHandle {
    reactor: ReactorId,
    id: u64,
}

impl PollerHandle {
    /// The reactor the poller runs on.
    pub fn reactor(&self) -> ReactorId {
        self.reactor
    }

    /// Unregisters the poller (deferred, idempotent): it is not called again after the current
    /// call returns. On a reactor it must be the poller's own (panics otherwise). Off-reactor
    /// it does nothing: that happens when state owning the handle is dropped after its reactor
    /// stopped (e.g. in a thread-local destructor), when the poller is already gone.
    pub fn unregister(&self) {
        reactor::try_with_core(|core| {
            assert_eq!(
                core.id, self.reactor,
                "poller unregistered from another reactor"
            );
            core.pollers.borrow_mut().unregister(self.id);
        });
    }
}

/// Registers an active poller on the current reactor: called once per tick.
/// Panics off-reactor.
pub fn register_poller(name: &str, poll: impl FnMut() -> PollStatus + 'static) -> PollerHandle {
    register(name, Duration::ZERO, Box::new(poll))
}

/// Registers a periodic poller on the current reactor: called at most once per `period`
/// (first after one period). A zero period makes it an active poller. Panics off-reactor.
pub fn register_periodic_poller(
    name: &str,
    period: Duration,
    poll: impl FnMut() -> PollStatus + 'static,
) -> PollerHandle {
    register(name, period, Box::new(poll))
}

fn register(name: &str, period: Duration, poll: Box<PollFn>) -> PollerHandle {
    reactor::with_core(|core| {
        let next_run = (!period.is_zero()).then(|| core.now() + period);
        let id = core.pollers.borrow_mut().add(Entry {
            id: 0,
            name: name.into(),
            poll: Some(poll),
            period,
            next_run,
            dead: false,
            nr_runs: 0,
            nr_busy: 0,
        });
        PollerHandle {
            reactor: core.id,
            id,
        }
    })
}

type PollFn = dyn FnMut() -> PollStatus;

pub(crate) struct Entry {
    id: u64,
    name: Box<str>,
    /// Taken out while the poller runs, so the set can be borrowed by the poller itself.
    poll: Option<Box<PollFn>>,
    period: Duration,
    next_run: Option<Instant>,
    dead: bool,
    nr_runs: u64,
    nr_busy: u64,
}

/// Description of a poller for introspection (`thread_get_pollers`-style RPCs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PollerInfo {
    /// Name given at registration.
    pub name: String,
    /// Zero for active pollers.
    pub period: Duration,
    /// Times called.
    pub nr_runs: u64,
    /// Times it returned `Busy`.
    pub nr_busy: u64,
}

/// A reactor's pollers. Structural changes happen only in `maintain`, between phases.
#[derive(Default)]
pub(crate) struct PollerSet {
    active: Vec<Entry>,
    periodic: Vec<Entry>,
    added: Vec<Entry>,
    nr_dead: usize,
    next_id: u64,
}

impl PollerSet {
    fn add(&mut self, mut entry: Entry) -> u64 {
        self.next_id += 1;
        entry.id = self.next_id;
        self.added.push(entry);
        self.next_id
    }

    fn unregister(&mut self, id: u64) {
        let all = self
            .active
            .iter_mut()
            .chain(self.periodic.iter_mut())
            .chain(self.added.iter_mut());
        for entry in all {
            if entry.id == id && !entry.dead {
                entry.dead = true;
                self.nr_dead += 1;
            }
        }
    }

    /// Earliest run time of a live periodic poller.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.periodic
            .iter()
            .chain(&self.added)
            .filter(|e| !e.dead)
            .filter_map(|e| e.next_run)
            .min()
    }

    pub(crate) fn has_periodic(&self) -> bool {
        !self.periodic.is_empty()
    }

    pub(crate) fn info(&self) -> Vec<PollerInfo> {
        self.active
            .iter()
            .chain(&self.periodic)
            .chain(&self.added)
            .filter(|e| !e.dead)
            .map(|e| PollerInfo {
                name: e.name.to_string(),
                period: e.period,
                nr_runs: e.nr_runs,
                nr_busy: e.nr_busy,
            })
            .collect()
    }

    /// Applies deferred adds and removes; returns the removed closures so the caller can drop
    /// them after releasing the borrow (their destructors may call back into the reactor).
    fn maintain(&mut self) -> Vec<Entry> {
        let mut removed = Vec::new();
        if self.nr_dead > 0 {
            for list in [&mut self.active, &mut self.periodic, &mut self.added] {
                let mut i = 0;
                while i < list.len() {
                    if list[i].dead && list[i].poll.is_some() {
                        removed.push(list.swap_remove(i));
                    } else {
                        i += 1;
                    }
                }
            }
            self.nr_dead -= removed.len();
        }
        for entry in self.added.drain(..) {
            if entry.period.is_zero() {
                self.active.push(entry);
            } else {
                self.periodic.push(entry);
            }
        }
        removed
    }

    pub(crate) fn clear(&mut self) -> Vec<Entry> {
        let mut all = std::mem::take(&mut self.active);
        all.append(&mut self.periodic);
        all.append(&mut self.added);
        self.nr_dead = 0;
        all
    }
}

#[inline]
fn maintain(pollers: &RefCell<PollerSet>) {
    let needs = {
        let set = pollers.borrow();
        set.nr_dead > 0 || !set.added.is_empty()
    };
    if needs {
        maintain_slow(pollers);
    }
}

#[inline(never)]
fn maintain_slow(pollers: &RefCell<PollerSet>) {
    let removed = pollers.borrow_mut().maintain();
    drop(removed);
}

/// Runs each active poller once. Returns true if any was busy.
#[inline]
pub(crate) fn run_active(core: &Core) -> bool {
    maintain(&core.pollers);
    let n = core.pollers.borrow().active.len();
    let mut busy = false;
    for i in 0..n {
        let taken = {
            let mut set = core.pollers.borrow_mut();
            let entry = &mut set.active[i];
            if entry.dead {
                None
            } else {
                entry.poll.take()
            }
        };
        let Some(mut poll) = taken else { continue };
        let status = poll();
        busy |= status.is_busy();
        let mut set = core.pollers.borrow_mut();
        let entry = &mut set.active[i];
        entry.poll = Some(poll);
        entry.nr_runs += 1;
        entry.nr_busy += u64::from(status.is_busy());
    }
    busy
}

/// Runs each periodic poller whose time has come. Returns true if any was busy.
pub(crate) fn run_periodic(core: &Core, now: Instant) -> bool {
    maintain(&core.pollers);
    let n = core.pollers.borrow().periodic.len();
    let mut busy = false;
    for i in 0..n {
        let taken = {
            let mut set = core.pollers.borrow_mut();
            let entry = &mut set.periodic[i];
            let due = entry.next_run.is_some_and(|t| t <= now);
            if entry.dead || !due {
                None
            } else {
                entry.poll.take()
            }
        };
        let Some(mut poll) = taken else { continue };
        let status = poll();
        busy |= status.is_busy();
        let mut set = core.pollers.borrow_mut();
        let entry = &mut set.periodic[i];
        entry.poll = Some(poll);
        entry.next_run = Some(now + entry.period);
        entry.nr_runs += 1;
        entry.nr_busy += u64::from(status.is_busy());
    }
    busy
}

/// Pollers registered on the current reactor (for introspection). Panics off-reactor.
pub fn pollers() -> Vec<PollerInfo> {
    reactor::with_core(|core| core.pollers.borrow().info())
}
