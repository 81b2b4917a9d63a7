//! The latency clock: the CPU's time-stamp counter where it is invariant (x86_64 with
//! `constant_tsc`), calibrated once against `Instant`; elsewhere `Instant` itself.
//!
//! Reading the TSC costs a few nanoseconds, against ~20-25 ns for `Instant::now()` (a vDSO
//! `clock_gettime`); at 10 M IOPS per core the I/O budget is 100 ns, so the clock is read once
//! per I/O: a completion's timestamp doubles as the submit timestamp of the I/O that reuses
//! the slot. `bench::clock::measure_cost_ns` reports the cost on this machine.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Whether `ticks()` reads the TSC.
pub fn uses_tsc() -> bool {
    static TSC: OnceLock<bool> = OnceLock::new();
    *TSC.get_or_init(|| {
        cfg!(target_arch = "x86_64")
            && std::fs::read_to_string("/proc/cpuinfo")
                .map(|s| {
                    s.lines()
                        .filter(|l| l.starts_with("flags"))
                        .take(1)
                        .any(|l| {
                            l.split_whitespace().any(|f| f == "constant_tsc")
                                && l.split_whitespace().any(|f| f == "nonstop_tsc")
                        })
                })
                .unwrap_or(false)
    })
}

/// The current time in ticks of an unspecified, monotonic, per-machine clock.
#[inline]
pub fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if uses_tsc_fast() {
            // SAFETY: RDTSC has no memory effects and exists on every x86_64 CPU.
            return unsafe { std::arch::x86_64::_rdtsc() };
        }
    }
    instant_ticks()
}

#[inline]
fn uses_tsc_fast() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    // 0 = unknown, 1 = no, 2 = yes; a relaxed byte load instead of OnceLock's acquire path.
    static STATE: AtomicU8 = AtomicU8::new(0);
    match STATE.load(Ordering::Relaxed) {
        2 => true,
        1 => false,
        _ => {
            let yes = uses_tsc();
            STATE.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
            yes
        }
    }
}

fn instant_ticks() -> u64 {
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Converts ticks to time; made once per run by [`Clock::calibrate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clock {
    /// Ticks per microsecond.
    pub ticks_per_us: f64,
}

impl Clock {
    /// Measures the tick rate against `Instant` over `window` (20 ms is plenty for 4
    /// significant digits on an invariant TSC). Each end of the window is the tightest of a
    /// few (Instant, ticks, Instant) brackets, so a preemption between two reads on a busy
    /// machine does not skew the rate.
    pub fn calibrate(window: Duration) -> Clock {
        if !uses_tsc() {
            return Clock {
                ticks_per_us: 1000.0,
            };
        }
        let (i0, t0) = paired_reading();
        std::thread::sleep(window);
        let (i1, t1) = paired_reading();
        let us = (i1 - i0).as_secs_f64() * 1e6;
        let rate = t1.wrapping_sub(t0) as f64 / us;
        Clock {
            ticks_per_us: if rate.is_finite() && rate > 0.0 {
                rate
            } else {
                1000.0
            },
        }
    }

    /// Ticks in microseconds.
    pub fn to_us(self, ticks: u64) -> f64 {
        ticks as f64 / self.ticks_per_us
    }

    /// Seconds in ticks.
    pub fn from_secs(self, secs: f64) -> u64 {
        (secs * 1e6 * self.ticks_per_us) as u64
    }
}

/// An `Instant` and a tick count taken together: the bracket (Instant, ticks, Instant) with
/// the shortest span out of a few, reported at its midpoint.
fn paired_reading() -> (Instant, u64) {
    let mut best: Option<(Duration, Instant, u64)> = None;
    for _ in 0..16 {
        let a = Instant::now();
        let t = ticks();
        let b = Instant::now();
        let span = b - a;
        if best.is_none_or(|(s, _, _)| span < s) {
            best = Some((span, a + span / 2, t));
        }
    }
    match best {
        Some((_, at, t)) => (at, t),
        None => (Instant::now(), ticks()),
    }
}

/// Measures the cost of `ticks()` and of `Instant::now()` in nanoseconds per call.
pub fn measure_cost_ns(nr_calls: u32) -> (f64, f64) {
    let start = Instant::now();
    let mut acc = 0u64;
    for _ in 0..nr_calls {
        acc = acc.wrapping_add(std::hint::black_box(ticks()));
    }
    let tick_ns = start.elapsed().as_nanos() as f64 / f64::from(nr_calls.max(1));
    let start = Instant::now();
    for _ in 0..nr_calls {
        std::hint::black_box(Instant::now());
    }
    let instant_ns = start.elapsed().as_nanos() as f64 / f64::from(nr_calls.max(1));
    std::hint::black_box(acc);
    (tick_ns, instant_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_monotonic_and_calibration_matches_instant() {
        let clock = Clock::calibrate(Duration::from_millis(20));
        let (i0, t0) = paired_reading();
        std::thread::sleep(Duration::from_millis(30));
        let (i1, t1) = paired_reading();
        assert!(t1 > t0);
        let measured_us = clock.to_us(t1 - t0);
        let real_us = (i1 - i0).as_secs_f64() * 1e6;
        let error = (measured_us - real_us).abs() / real_us;
        assert!(
            error < 0.05,
            "clock off by {:.2}% ({measured_us} vs {real_us})",
            error * 100.0
        );
    }

    #[test]
    fn reading_the_clock_is_cheap() {
        // Best of several rounds, so a preemption on a busy machine does not count.
        let tick_ns = (0..10)
            .map(|_| measure_cost_ns(20_000).0)
            .fold(f64::INFINITY, f64::min);
        // Generous for a loaded shared machine and the unoptimised test profile.
        assert!(tick_ns < 200.0, "ticks() costs {tick_ns} ns");
    }
}
