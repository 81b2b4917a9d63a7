//! Per-channel I/O statistics, summed on request like SPDK's `bdev_get_iostat`.
//!
//! Each [`ChannelStats`] has exactly one writer, the reactor that owns the channel, which
//! updates fields with a relaxed load + store (no read-modify-write, no lock). Readers on the
//! control path see each counter atomically, possibly a few I/Os behind. When a channel is
//! destroyed its counters are folded into the bdev's retired totals so nothing is lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::bdev::IoType;

/// Current tick count (TSC on x86_64, nanoseconds elsewhere). Cheap enough per I/O.
#[inline]
pub fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc has no preconditions on x86_64.
        unsafe { std::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static BASE: OnceLock<Instant> = OnceLock::new();
        BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

/// Ticks per second (`tick_rate` in `bdev_get_iostat`); calibrated once, ~10 ms.
pub fn tick_rate() -> u64 {
    static RATE: OnceLock<u64> = OnceLock::new();
    *RATE.get_or_init(|| {
        if !cfg!(target_arch = "x86_64") {
            return 1_000_000_000;
        }
        let t0 = Instant::now();
        let c0 = ticks();
        std::thread::sleep(Duration::from_millis(10));
        let c1 = ticks();
        let ns = t0.elapsed().as_nanos().max(1) as u64;
        ((c1.wrapping_sub(c0) as u128 * 1_000_000_000) / u128::from(ns)) as u64
    })
}

/// Counters for one I/O kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OpStat {
    /// Bytes moved (or unmapped / zeroed).
    pub bytes: u64,
    /// Completed operations.
    pub ops: u64,
    /// Sum of latencies in ticks.
    pub latency_ticks: u64,
    /// Largest latency in ticks.
    pub max_latency_ticks: u64,
    /// Smallest latency in ticks (0 if `ops` is 0).
    pub min_latency_ticks: u64,
}

impl OpStat {
    fn add(&mut self, o: &OpStat) {
        self.bytes += o.bytes;
        self.ops += o.ops;
        self.latency_ticks += o.latency_ticks;
        self.max_latency_ticks = self.max_latency_ticks.max(o.max_latency_ticks);
        if o.ops > 0
            && (self.min_latency_ticks == 0 || o.min_latency_ticks < self.min_latency_ticks)
        {
            self.min_latency_ticks = o.min_latency_ticks;
        }
    }
}

/// A point-in-time sum of statistics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoStatSnapshot {
    /// Reads.
    pub read: OpStat,
    /// Writes.
    pub write: OpStat,
    /// Unmaps.
    pub unmap: OpStat,
    /// Write-zeroes (SPDK counts them as writes in `bytes_written`; kept apart here and
    /// folded into the write fields of the JSON).
    pub write_zeroes: OpStat,
    /// Flushes (bytes = 0).
    pub flush: OpStat,
    /// Resets.
    pub reset: OpStat,
    /// Failed top-level I/Os of any kind.
    pub num_errors: u64,
}

impl IoStatSnapshot {
    /// Adds `o` into `self`.
    pub fn add(&mut self, o: &IoStatSnapshot) {
        self.read.add(&o.read);
        self.write.add(&o.write);
        self.unmap.add(&o.unmap);
        self.write_zeroes.add(&o.write_zeroes);
        self.flush.add(&o.flush);
        self.reset.add(&o.reset);
        self.num_errors += o.num_errors;
    }

    /// One `bdevs[]` entry of `bdev_get_iostat`, in SPDK's field names.
    pub fn to_json(&self, name: &str) -> Value {
        let mut write = self.write;
        write.add(&self.write_zeroes);
        json!({
            "name": name,
            "bytes_read": self.read.bytes,
            "num_read_ops": self.read.ops,
            "bytes_written": write.bytes,
            "num_write_ops": write.ops,
            "bytes_unmapped": self.unmap.bytes,
            "num_unmap_ops": self.unmap.ops,
            "bytes_copied": 0,
            "num_copy_ops": 0,
            "read_latency_ticks": self.read.latency_ticks,
            "max_read_latency_ticks": self.read.max_latency_ticks,
            "min_read_latency_ticks": self.read.min_latency_ticks,
            "write_latency_ticks": write.latency_ticks,
            "max_write_latency_ticks": write.max_latency_ticks,
            "min_write_latency_ticks": write.min_latency_ticks,
            "unmap_latency_ticks": self.unmap.latency_ticks,
            "max_unmap_latency_ticks": self.unmap.max_latency_ticks,
            "min_unmap_latency_ticks": self.unmap.min_latency_ticks,
            "copy_latency_ticks": 0,
            "max_copy_latency_ticks": 0,
            "min_copy_latency_ticks": 0,
            "io_error": {},
        })
    }
}

#[derive(Default)]
struct AtomicOpStat {
    bytes: AtomicU64,
    ops: AtomicU64,
    latency_ticks: AtomicU64,
    max_latency_ticks: AtomicU64,
    min_latency_ticks: AtomicU64,
}

#[inline]
fn bump(a: &AtomicU64, v: u64) {
    // Single writer: load + store is enough and avoids a locked RMW.
    a.store(a.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
}

impl AtomicOpStat {
    #[inline]
    fn record(&self, bytes: u64, lat: u64) {
        bump(&self.bytes, bytes);
        bump(&self.ops, 1);
        bump(&self.latency_ticks, lat);
        if lat > self.max_latency_ticks.load(Ordering::Relaxed) {
            self.max_latency_ticks.store(lat, Ordering::Relaxed);
        }
        let min = self.min_latency_ticks.load(Ordering::Relaxed);
        if min == 0 || lat < min {
            self.min_latency_ticks.store(lat.max(1), Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> OpStat {
        OpStat {
            bytes: self.bytes.load(Ordering::Relaxed),
            ops: self.ops.load(Ordering::Relaxed),
            latency_ticks: self.latency_ticks.load(Ordering::Relaxed),
            max_latency_ticks: self.max_latency_ticks.load(Ordering::Relaxed),
            min_latency_ticks: self.min_latency_ticks.load(Ordering::Relaxed),
        }
    }
}

/// Statistics of one channel; written only by the owning reactor.
#[derive(Default)]
pub struct ChannelStats {
    /// Counters per I/O type, indexed by `IoType as usize` (read, write, unmap, flush, reset,
    /// write_zeroes), so recording is an index, not a match.
    by_type: [AtomicOpStat; 6],
    num_errors: AtomicU64,
}

const _: () = assert!(IoType::ALL.len() == 6);

impl ChannelStats {
    /// Records one completed top-level I/O. Owning reactor only.
    #[inline]
    pub(crate) fn record(&self, io_type: IoType, bytes: u64, lat: u64, ok: bool) {
        if !ok {
            bump(&self.num_errors, 1);
            return;
        }
        if let Some(s) = self.by_type.get(io_type as usize) {
            s.record(bytes, lat);
        }
    }

    fn op(&self, io_type: IoType) -> OpStat {
        self.by_type
            .get(io_type as usize)
            .map_or_else(OpStat::default, AtomicOpStat::snapshot)
    }

    /// A consistent-enough copy of the counters. Any thread.
    pub fn snapshot(&self) -> IoStatSnapshot {
        IoStatSnapshot {
            read: self.op(IoType::Read),
            write: self.op(IoType::Write),
            unmap: self.op(IoType::Unmap),
            write_zeroes: self.op(IoType::WriteZeroes),
            flush: self.op(IoType::Flush),
            reset: self.op(IoType::Reset),
            num_errors: self.num_errors.load(Ordering::Relaxed),
        }
    }
}
