//! The latency clock: the bdev layer's tick counter (the CPU's time-stamp counter on x86_64,
//! nanoseconds elsewhere), calibrated once against `Instant`.
//!
//! Reading the TSC costs ~10 ns here, against ~20-25 ns for `Instant::now()` (a vDSO
//! `clock_gettime`); at 15 M IOPS per core the I/O budget is under 70 ns, so a job does not
//! read the clock per I/O at all: as in SPDK, the channel reads it once per poll
//! ([`bdev::BdevChannel::now_ticks`]) and reports each I/O's latency against that reading.
//! [`uses_tsc`] says whether the TSC is invariant (`constant_tsc` and `nonstop_tsc`), i.e.
//! whether tick intervals are exact; `bench::clock::measure_cost_ns` reports the cost.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Whether `ticks()` reads an invariant TSC (exact intervals across frequency changes).
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

/// The current time in ticks of an unspecified, monotonic, per-machine clock: the bdev
/// layer's clock ([`bdev::ticks`], the TSC on x86_64), so a job can take "now" and I/O
/// latencies from its channel ([`bdev::BdevChannel::now_ticks`],
/// [`bdev::IoDone::latency_ticks`]) without reading the clock per I/O.
#[inline]
pub fn ticks() -> u64 {
    bdev::ticks()
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
