//! Per-job I/O statistics: counters, latency sum/min/max and an HDR histogram, all in clock
//! ticks on the data path and converted to microseconds only for the report.

use hdrhistogram::Histogram;

use crate::clock::Clock;

/// Significant decimal digits the histogram keeps (0.1 % relative error).
const HIST_SIGFIG: u8 = 3;

/// What one job measured.
#[derive(Debug, Clone)]
pub struct JobStats {
    /// I/Os completed successfully.
    pub nr_completed: u64,
    /// I/Os completed with an error.
    pub nr_failed: u64,
    /// I/Os that timed out (none are timed out by this implementation; kept for the table).
    pub nr_timeout: u64,
    /// Sum of successful I/O latencies in ticks.
    pub latency_sum_ticks: u128,
    /// Smallest successful latency in ticks (`u64::MAX` when none).
    pub latency_min_ticks: u64,
    /// Largest successful latency in ticks.
    pub latency_max_ticks: u64,
    /// Latency distribution in ticks.
    pub histogram: Histogram<u64>,
}

impl Default for JobStats {
    fn default() -> Self {
        JobStats::new()
    }
}

impl JobStats {
    /// Empty statistics.
    pub fn new() -> JobStats {
        // Auto-resizing from a small range: values up to ~2^25 ticks (~10 ms) need no growth,
        // longer latencies grow the histogram once, off the hot path of a healthy run.
        let mut histogram = Histogram::new_with_max(1 << 25, HIST_SIGFIG)
            .expect("a histogram with 3 significant digits is always valid");
        histogram.auto(true);
        JobStats {
            nr_completed: 0,
            nr_failed: 0,
            nr_timeout: 0,
            latency_sum_ticks: 0,
            latency_min_ticks: u64::MAX,
            latency_max_ticks: 0,
            histogram,
        }
    }

    /// Records one successful I/O that took `ticks`.
    #[inline]
    pub fn record_ok(&mut self, ticks: u64) {
        self.nr_completed += 1;
        self.latency_sum_ticks += u128::from(ticks);
        self.latency_min_ticks = self.latency_min_ticks.min(ticks);
        self.latency_max_ticks = self.latency_max_ticks.max(ticks);
        // `auto(true)` makes recording infallible for any u64; saturate regardless.
        self.histogram.saturating_record(ticks.max(1));
    }

    /// Records one failed I/O.
    #[inline]
    pub fn record_failed(&mut self) {
        self.nr_failed += 1;
    }

    /// Adds `other` into `self` (for the Total line).
    pub fn merge(&mut self, other: &JobStats) {
        self.nr_completed += other.nr_completed;
        self.nr_failed += other.nr_failed;
        self.nr_timeout += other.nr_timeout;
        self.latency_sum_ticks += other.latency_sum_ticks;
        self.latency_min_ticks = self.latency_min_ticks.min(other.latency_min_ticks);
        self.latency_max_ticks = self.latency_max_ticks.max(other.latency_max_ticks);
        // Both histograms auto-resize, so adding cannot run out of range.
        let _ = self.histogram.add(&other.histogram);
    }

    /// Converts to per-second rates and microseconds over `runtime_secs`.
    pub fn summarize(&self, clock: Clock, runtime_secs: f64, io_size_bytes: u64) -> Summary {
        let per_sec = |n: u64| {
            if runtime_secs > 0.0 {
                n as f64 / runtime_secs
            } else {
                0.0
            }
        };
        let iops = per_sec(self.nr_completed);
        let has_latency = self.nr_completed > 0;
        let us = |ticks: u64| if has_latency { clock.to_us(ticks) } else { 0.0 };
        let avg_ticks = if has_latency {
            (self.latency_sum_ticks / u128::from(self.nr_completed)) as u64
        } else {
            0
        };
        let pct = |q: f64| us(self.histogram.value_at_quantile(q));
        Summary {
            runtime_secs,
            iops,
            mibps: iops * io_size_bytes as f64 / (1024.0 * 1024.0),
            fail_per_sec: per_sec(self.nr_failed),
            timeout_per_sec: per_sec(self.nr_timeout),
            nr_failed: self.nr_failed,
            nr_timeout: self.nr_timeout,
            latency_avg_us: us(avg_ticks),
            latency_min_us: us(self.latency_min_ticks),
            latency_max_us: us(self.latency_max_ticks),
            latency_p50_us: pct(0.50),
            latency_p99_us: pct(0.99),
            latency_p999_us: pct(0.999),
        }
    }
}

/// A job's (or the total's) numbers as the report prints them.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Summary {
    /// Seconds the job ran.
    pub runtime_secs: f64,
    /// Completed I/Os per second.
    pub iops: f64,
    /// MiB per second.
    pub mibps: f64,
    /// Failed I/Os per second.
    pub fail_per_sec: f64,
    /// Timed-out I/Os per second.
    pub timeout_per_sec: f64,
    /// Failed I/Os.
    pub nr_failed: u64,
    /// Timed-out I/Os.
    pub nr_timeout: u64,
    /// Mean latency.
    pub latency_avg_us: f64,
    /// Smallest latency.
    pub latency_min_us: f64,
    /// Largest latency.
    pub latency_max_us: f64,
    /// Median latency.
    pub latency_p50_us: f64,
    /// 99th percentile latency.
    pub latency_p99_us: f64,
    /// 99.9th percentile latency.
    pub latency_p999_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_known_latencies() {
        let clock = Clock { ticks_per_us: 2.0 };
        let mut s = JobStats::new();
        for t in 1..=1000u64 {
            s.record_ok(t * 2); // 1..=1000 us
        }
        s.record_failed();
        let sum = s.summarize(clock, 2.0, 4096);
        assert_eq!(sum.iops, 500.0);
        assert!((sum.mibps - 500.0 * 4096.0 / 1048576.0).abs() < 1e-9);
        assert_eq!(sum.fail_per_sec, 0.5);
        assert_eq!(sum.latency_min_us, 1.0);
        assert_eq!(sum.latency_max_us, 1000.0);
        assert!((sum.latency_avg_us - 500.5).abs() < 0.51);
        assert!(
            (sum.latency_p50_us - 500.0).abs() <= 1.0,
            "{}",
            sum.latency_p50_us
        );
        assert!(
            (sum.latency_p99_us - 990.0).abs() <= 1.5,
            "{}",
            sum.latency_p99_us
        );
        assert!(
            (sum.latency_p999_us - 999.0).abs() <= 1.5,
            "{}",
            sum.latency_p999_us
        );
    }

    #[test]
    fn merge_adds_counts_and_keeps_extremes() {
        let mut a = JobStats::new();
        let mut b = JobStats::new();
        a.record_ok(10);
        b.record_ok(5);
        b.record_ok(1 << 40); // beyond the initial histogram range: must auto-resize
        a.merge(&b);
        assert_eq!(a.nr_completed, 3);
        assert_eq!(a.latency_min_ticks, 5);
        assert_eq!(a.latency_max_ticks, 1 << 40);
        assert_eq!(a.histogram.len(), 3);
    }

    #[test]
    fn empty_stats_report_zeroes() {
        let sum = JobStats::new().summarize(Clock { ticks_per_us: 1.0 }, 1.0, 4096);
        assert_eq!(sum.iops, 0.0);
        assert_eq!(sum.latency_min_us, 0.0);
        assert_eq!(sum.latency_p99_us, 0.0);
    }
}
