//! Per-job I/O statistics: counters, latency sum/min/max and the latency distribution, all in
//! clock ticks on the data path and converted to microseconds only for the report.
//!
//! The distribution is recorded on the data path into [`LatencyBuckets`], a flat log-linear
//! counter array with the layout of an HDR histogram of 3 significant digits (exact below
//! 2048 ticks, then 1024 sub-buckets per power of two: ≤ 0.1 % relative error). Recording is a
//! leading-zero count, a shift and an increment (~10 instructions, against ~60 for
//! `hdrhistogram::Histogram::record`, measured with callgrind); the percentiles are computed by
//! `hdrhistogram` from the buckets when the report is made.

use hdrhistogram::Histogram;

use crate::clock::Clock;

/// Significant decimal digits the report's histogram keeps (0.1 % relative error).
const HIST_SIGFIG: u8 = 3;

/// Values below this are counted exactly (one bucket each).
const EXACT_LIMIT: u64 = 2048;
/// Sub-buckets per power of two above [`EXACT_LIMIT`].
const SUB_BUCKETS: u64 = 1024;
/// Highest power of two with its own buckets: 2^48 ticks is more than a day at 3 GHz; larger
/// values land in the last bucket (the exact maximum is kept separately).
const MAX_EXPONENT: u64 = 47;
/// Number of buckets.
const NR_BUCKETS: usize = (EXACT_LIMIT + (MAX_EXPONENT - 10) * SUB_BUCKETS) as usize;

const _: () = assert!(EXACT_LIMIT == 2 * SUB_BUCKETS);

/// Latency counts in HDR-compatible log-linear buckets (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyBuckets {
    counts: Vec<u64>,
}

impl Default for LatencyBuckets {
    fn default() -> Self {
        LatencyBuckets {
            counts: vec![0; NR_BUCKETS],
        }
    }
}

impl LatencyBuckets {
    /// The bucket of `value`.
    #[inline]
    pub fn index(value: u64) -> usize {
        if value < EXACT_LIMIT {
            return value as usize;
        }
        let exponent = u64::from(63 - value.leading_zeros()).min(MAX_EXPONENT);
        let shift = exponent - 10;
        let sub = (value >> shift).min(2 * SUB_BUCKETS - 1) - SUB_BUCKETS;
        (EXACT_LIMIT + (exponent - 11) * SUB_BUCKETS + sub) as usize
    }

    /// The smallest value of bucket `index`.
    pub fn lower_bound(index: usize) -> u64 {
        let index = index as u64;
        if index < EXACT_LIMIT {
            return index;
        }
        let k = index - EXACT_LIMIT;
        let exponent = 11 + k / SUB_BUCKETS;
        (SUB_BUCKETS + k % SUB_BUCKETS) << (exponent - 10)
    }

    /// Counts one value.
    #[inline]
    pub fn record(&mut self, value: u64) {
        if let Some(c) = self.counts.get_mut(Self::index(value)) {
            *c += 1;
        }
    }

    /// Adds `other`'s counts.
    pub fn merge(&mut self, other: &LatencyBuckets) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
    }

    /// The counts as an HDR histogram (each bucket recorded at its lower bound).
    pub fn to_histogram(&self) -> Histogram<u64> {
        let mut h = Histogram::new(HIST_SIGFIG).expect("3 significant digits is a valid precision");
        h.auto(true);
        for (i, &n) in self.counts.iter().enumerate().filter(|(_, &n)| n > 0) {
            // Auto-resizing makes every value recordable.
            let _ = h.record_n(Self::lower_bound(i), n);
        }
        h
    }
}

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
    pub latency_buckets: LatencyBuckets,
}

impl Default for JobStats {
    fn default() -> Self {
        JobStats::new()
    }
}

impl JobStats {
    /// Empty statistics.
    pub fn new() -> JobStats {
        JobStats {
            nr_completed: 0,
            nr_failed: 0,
            nr_timeout: 0,
            latency_sum_ticks: 0,
            latency_min_ticks: u64::MAX,
            latency_max_ticks: 0,
            latency_buckets: LatencyBuckets::default(),
        }
    }

    /// Records one successful I/O that took `ticks`.
    #[inline]
    pub fn record_ok(&mut self, ticks: u64) {
        self.nr_completed += 1;
        self.latency_sum_ticks += u128::from(ticks);
        self.latency_min_ticks = self.latency_min_ticks.min(ticks);
        self.latency_max_ticks = self.latency_max_ticks.max(ticks);
        self.latency_buckets.record(ticks);
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
        self.latency_buckets.merge(&other.latency_buckets);
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
        let histogram = self.latency_buckets.to_histogram();
        // A bucket's lower bound may sit below the exact minimum; never report less.
        let pct = |q: f64| {
            let v = histogram.value_at_quantile(q);
            us(v.max(self.latency_min_ticks).min(self.latency_max_ticks))
        };
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
        assert_eq!(a.latency_buckets.to_histogram().len(), 3);
    }

    #[test]
    fn bucket_bounds_bracket_every_value() {
        let mut values: Vec<u64> = (0..5000).collect();
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push(x >> (x % 60));
        }
        values.extend([u64::MAX, 1 << 47, (1 << 48) - 1, 1 << 48]);
        for v in values {
            let i = LatencyBuckets::index(v);
            assert!(i < NR_BUCKETS, "{v}");
            let lo = LatencyBuckets::lower_bound(i);
            assert!(lo <= v, "{v} below its bucket {i} ({lo})");
            if v < 1 << 48 {
                let hi = LatencyBuckets::lower_bound(i + 1);
                assert!(v < hi, "{v} above its bucket {i} ({hi})");
                // 3 significant digits: the bucket is at most 1/1024 of its value wide.
                assert!(
                    (hi - lo) as f64 <= (lo as f64 / 1024.0).max(1.0),
                    "{v}: {lo}..{hi}"
                );
            }
        }
    }

    #[test]
    fn percentiles_match_a_direct_hdr_histogram() {
        let mut s = JobStats::new();
        let mut direct = Histogram::<u64>::new(HIST_SIGFIG).unwrap();
        direct.auto(true);
        let mut x = 42u64;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Log-uniform from 100 ticks to ~100 M ticks.
            let v = 100 + (x % 1_000_000) * ((x >> 40) % 100 + 1);
            s.record_ok(v);
            direct.record(v).unwrap();
        }
        let ours = s.latency_buckets.to_histogram();
        for q in [0.5, 0.9, 0.99, 0.999] {
            let (a, b) = (
                ours.value_at_quantile(q) as f64,
                direct.value_at_quantile(q) as f64,
            );
            assert!((a - b).abs() / b < 0.002, "q {q}: {a} vs {b}");
        }
    }

    #[test]
    fn empty_stats_report_zeroes() {
        let sum = JobStats::new().summarize(Clock { ticks_per_us: 1.0 }, 1.0, 4096);
        assert_eq!(sum.iops, 0.0);
        assert_eq!(sum.latency_min_us, 0.0);
        assert_eq!(sum.latency_p99_us, 0.0);
    }
}
