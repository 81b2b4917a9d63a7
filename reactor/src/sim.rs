//! `Sim`: a deterministic harness that steps many reactors in one thread (STYLE rule 23).
//!
//! A simulation has N reactors sharing one virtual clock. Each [`Sim::step`] picks a reactor
//! with a seeded PRNG and runs one tick of it (with a randomly chosen message batch size, so
//! message interleavings vary too); everything a test registers — pollers, timers, messages,
//! I/O channels, `for_each_reactor` — behaves as on real reactors, but the schedule is a pure
//! function of the seed. The seed is printed at creation (`REACTOR_SIM_SEED=<seed>` reruns
//! a failure; [`Sim::from_env`] reads it).
//!
//! Time moves only when the test says so ([`Sim::advance`], [`Sim::run_for`],
//! [`Sim::run_until`]); a tick never sleeps. Ring ops use a synchronous backend: file ops
//! (read/write/readv/writev/fsync/fallocate/close/nop, raw and fixed variants) run at submit
//! time with plain syscalls; their completions are delivered from the reactor's later ticks
//! in a seeded random order, a random number per tick (so completion reordering is tested
//! too). Socket ops (recv/send/accept/connect/poll_add) and registered files complete with
//! `-EOPNOTSUPP`.
//! [`crate::request_stop`] only sets a flag ([`Sim::stop_requested`]).
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use reactor::{sim::Sim, ReactorId};
//!
//! let mut sim = Sim::new(3, 42); // or Sim::from_env(3): seed from REACTOR_SIM_SEED
//! let log = Arc::new(Mutex::new(Vec::new()));
//! let l = log.clone();
//! sim.enter(ReactorId::new(0), move || {
//!     let l2 = l.clone();
//!     reactor::send_msg(ReactorId::new(2), move || l2.lock().unwrap().push(reactor::current()));
//!     reactor::after(Duration::from_secs(5), move || l.lock().unwrap().push(reactor::current()));
//! });
//! sim.run_for(Duration::from_secs(10)); // virtual time: returns at once
//! assert_eq!(*log.lock().unwrap(), [ReactorId::new(2), ReactorId::new(0)]);
//! ```

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::reactor::{self, Clock, Core, ReactorId, ReactorStats, Shared};
use crate::uring::Ring;

/// Steps before [`Sim::run_until_idle`] declares a livelock.
pub const MAX_STEPS: u64 = 10_000_000;
/// Largest message batch the simulator picks per tick.
pub const MAX_MSG_BATCH: usize = 16;
const SIM_MAX_IN_FLIGHT: usize = 4096;

/// A small, fast, seedable PRNG (SplitMix64): good enough for schedules, not for secrets.
#[derive(Clone, Debug)]
pub struct SimRng {
    state: u64,
}

impl SimRng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        SimRng { state: seed }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`. Panics if `n == 0`.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "SimRng::below(0)");
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// True with probability `p` (0.0..=1.0).
    pub fn chance(&mut self, p: f64) -> bool {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        unit < p
    }
}

/// N simulated reactors in one thread. Dropping it shuts every reactor down.
pub struct Sim {
    seed: u64,
    rng: SimRng,
    shared: Arc<Shared>,
    cores: Vec<Rc<Core>>,
    clock: Rc<Cell<Instant>>,
    last_busy: Vec<bool>,
    nr_steps: u64,
}

impl Sim {
    /// `nr_reactors` simulated reactors, scheduled from `seed` (printed to stderr).
    /// Panics if `nr_reactors` is zero.
    pub fn new(nr_reactors: usize, seed: u64) -> Sim {
        assert!(nr_reactors > 0, "a simulation needs at least one reactor");
        eprintln!("reactor::sim: seed {seed} (rerun with REACTOR_SIM_SEED={seed})");
        let indices: Vec<usize> = (0..nr_reactors).collect();
        let shared = Shared::new(&indices, false).expect("poll-mode shared state never fails");
        let clock = Rc::new(Cell::new(Instant::now()));
        let cores = (0..nr_reactors)
            .map(|i| {
                Rc::new(Core::new(
                    ReactorId::new(i as u32),
                    shared.clone(),
                    Ring::new_sync(SIM_MAX_IN_FLIGHT),
                    Clock::Virtual(clock.clone()),
                    MAX_MSG_BATCH,
                ))
            })
            .collect();
        Sim {
            seed,
            rng: SimRng::new(seed),
            shared,
            cores,
            clock,
            last_busy: vec![true; nr_reactors],
            nr_steps: 0,
        }
    }

    /// Like [`Sim::new`], with the seed from `REACTOR_SIM_SEED` if set, else from the clock.
    pub fn from_env(nr_reactors: usize) -> Sim {
        let seed = std::env::var("REACTOR_SIM_SEED")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                t.as_nanos() as u64 ^ u64::from(std::process::id())
            });
        Sim::new(nr_reactors, seed)
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Number of simulated reactors.
    pub fn nr_reactors(&self) -> usize {
        self.cores.len()
    }

    /// Steps taken so far.
    pub fn nr_steps(&self) -> u64 {
        self.nr_steps
    }

    /// The simulation's PRNG, for tests that want seeded choices of their own.
    pub fn rng(&mut self) -> &mut SimRng {
        &mut self.rng
    }

    /// Runs `f` as if on reactor `id` (registering pollers, sending messages, ...).
    /// Panics if `id` does not exist.
    pub fn enter<R>(&self, id: ReactorId, f: impl FnOnce() -> R) -> R {
        let core = &self.cores[id.index()];
        let _guard = reactor::enter(core);
        f()
    }

    /// Runs one tick of reactor `id`. Returns true if it was busy.
    pub fn step_reactor(&mut self, id: ReactorId) -> bool {
        let batch = 1 + self.rng.below(MAX_MSG_BATCH as u64) as usize;
        let core = self.cores[id.index()].clone();
        core.msg_batch.set(batch);
        core.ring.sim_perturb(&mut self.rng);
        let busy = {
            let _guard = reactor::enter(&core);
            core.tick()
        };
        self.last_busy[id.index()] = busy;
        self.nr_steps += 1;
        busy
    }

    /// Runs one tick of a randomly chosen reactor. Returns true if it was busy.
    pub fn step(&mut self) -> bool {
        let id = ReactorId::new(self.rng.below(self.cores.len() as u64) as u32);
        self.step_reactor(id)
    }

    /// True if no reactor has work now: each one's last tick was idle, no message is queued
    /// and no ring op is in flight. (Future timers do not count.)
    pub fn is_idle(&self) -> bool {
        self.last_busy.iter().all(|busy| !busy)
            && self.shared.reactors.iter().all(|r| r.queue.is_empty())
            && self.cores.iter().all(|c| c.ring.nr_in_flight() == 0)
    }

    /// Steps random reactors until [`Sim::is_idle`]. Returns the number of steps. Panics
    /// (naming the seed) after [`MAX_STEPS`]: a poller that is always busy is a livelock.
    pub fn run_until_idle(&mut self) -> u64 {
        self.last_busy.iter_mut().for_each(|b| *b = true);
        let mut steps = 0;
        while !self.is_idle() {
            assert!(
                steps < MAX_STEPS,
                "sim (seed {}) not idle after {MAX_STEPS} steps",
                self.seed
            );
            self.step();
            steps += 1;
        }
        steps
    }

    /// The virtual clock.
    pub fn now(&self) -> Instant {
        self.clock.get()
    }

    /// Moves the virtual clock forward without running anything.
    pub fn advance(&mut self, by: Duration) {
        self.clock.set(self.clock.get() + by);
    }

    /// Earliest timer or periodic-poller deadline over all reactors.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.cores.iter().filter_map(|c| c.next_deadline()).min()
    }

    /// Runs for `span` of virtual time: runs until idle, jumps the clock to the next deadline
    /// (if within the span), and repeats; ends at `now + span`, idle.
    pub fn run_for(&mut self, span: Duration) {
        let end = self.now() + span;
        loop {
            self.run_until_idle();
            match self.next_deadline() {
                Some(deadline) if deadline <= end => {
                    self.clock.set(deadline.max(self.now()));
                }
                _ => break,
            }
        }
        self.clock.set(end);
        self.run_until_idle();
    }

    /// Steps until `done()` holds, jumping the virtual clock to the next deadline whenever
    /// everything is idle. Returns false if everything is idle with no deadline left and
    /// `done()` still false. Panics (naming the seed) after [`MAX_STEPS`] steps.
    pub fn run_until(&mut self, mut done: impl FnMut() -> bool) -> bool {
        self.last_busy.iter_mut().for_each(|b| *b = true);
        let mut steps = 0;
        while !done() {
            assert!(
                steps < MAX_STEPS,
                "sim (seed {}) condition not reached after {MAX_STEPS} steps",
                self.seed
            );
            if self.is_idle() {
                match self.next_deadline() {
                    Some(deadline) => self.clock.set(deadline.max(self.now())),
                    None => return false,
                }
                self.last_busy.iter_mut().for_each(|b| *b = true);
            }
            self.step();
            steps += 1;
        }
        true
    }

    /// True once a reactor called [`crate::request_stop`].
    pub fn stop_requested(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
    }

    /// Statistics of reactor `id` (CPU time is zero under the simulator).
    pub fn stats(&self, id: ReactorId) -> ReactorStats {
        self.shared.stats(id)
    }

    /// Ring ops in flight on reactor `id`.
    pub fn nr_in_flight(&self, id: ReactorId) -> usize {
        self.cores[id.index()].ring.nr_in_flight()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        for core in &self.cores {
            let _guard = reactor::enter(core);
            core.shutdown();
        }
    }
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("seed", &self.seed)
            .field("nr_reactors", &self.cores.len())
            .field("nr_steps", &self.nr_steps)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
