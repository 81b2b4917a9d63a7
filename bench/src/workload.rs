//! Workloads and the offset/operation generator each job draws its next I/O from.
//!
//! Offsets are in I/O units (`io_size` blocks) within the job's range, as SPDK's bdevperf
//! counts them: sequential workloads walk the range and wrap, random ones draw uniformly.
//! The generator is deterministic for a given seed so a failing run can be replayed.

use std::fmt;
use std::str::FromStr;

use crate::cli::CliError;

/// A `-w` workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Uniformly random reads.
    RandRead,
    /// Uniformly random writes.
    RandWrite,
    /// Sequential offsets, each I/O a read with probability `-M`%.
    Rw,
    /// Random offsets, each I/O a read with probability `-M`%.
    RandRw,
    /// Sequential write of a pattern, read back and compared.
    Verify,
    /// Sequential unmaps.
    Unmap,
    /// Flushes (of the I/O unit range, as SPDK issues them).
    Flush,
    /// Sequential write-zeroes.
    WriteZeroes,
}

impl Workload {
    /// Every workload, in `-h` order.
    pub const ALL: [Workload; 10] = [
        Workload::Read,
        Workload::Write,
        Workload::RandRead,
        Workload::RandWrite,
        Workload::Rw,
        Workload::RandRw,
        Workload::Verify,
        Workload::Unmap,
        Workload::Flush,
        Workload::WriteZeroes,
    ];

    /// The name `-w` takes and the report prints.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::RandRead => "randread",
            Workload::RandWrite => "randwrite",
            Workload::Rw => "rw",
            Workload::RandRw => "randrw",
            Workload::Verify => "verify",
            Workload::Unmap => "unmap",
            Workload::Flush => "flush",
            Workload::WriteZeroes => "write_zeroes",
        }
    }

    /// Whether `-M` applies.
    pub fn is_mixed(self) -> bool {
        matches!(self, Workload::Rw | Workload::RandRw)
    }

    /// Whether offsets are drawn at random.
    pub fn is_random(self) -> bool {
        matches!(
            self,
            Workload::RandRead | Workload::RandWrite | Workload::RandRw
        )
    }

    /// The I/O types a bdev must support for this workload.
    pub fn needed_ops(self) -> &'static [Op] {
        match self {
            Workload::Read | Workload::RandRead => &[Op::Read],
            Workload::Write | Workload::RandWrite => &[Op::Write],
            Workload::Rw | Workload::RandRw | Workload::Verify => &[Op::Read, Op::Write],
            Workload::Unmap => &[Op::Unmap],
            Workload::Flush => &[Op::Flush],
            Workload::WriteZeroes => &[Op::WriteZeroes],
        }
    }

    /// Whether the workload only reads (a read-only descriptor suffices).
    pub fn is_read_only(self) -> bool {
        matches!(self, Workload::Read | Workload::RandRead)
    }

    /// Whether I/Os of this workload carry a data buffer.
    pub fn needs_buffers(self) -> bool {
        !matches!(
            self,
            Workload::Unmap | Workload::Flush | Workload::WriteZeroes
        )
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Workload {
    type Err = CliError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Workload::ALL.iter().map(|w| w.name()).collect();
                CliError(format!(
                    "-w: unknown workload '{s}' (one of: {})",
                    names.join(", ")
                ))
            })
    }
}

/// The operation of one I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Read into the slot's buffer.
    Read,
    /// Write the slot's buffer.
    Write,
    /// Unmap (discard) the range.
    Unmap,
    /// Flush the range.
    Flush,
    /// Write zeroes to the range.
    WriteZeroes,
}

impl Op {
    /// SPDK's name of the I/O type.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Unmap => "unmap",
            Op::Flush => "flush",
            Op::WriteZeroes => "write_zeroes",
        }
    }
}

/// A small, fast PRNG (xorshift64*): good enough for offsets and mix decisions, one multiply
/// per draw, which matters at tens of millions of I/Os per second.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`; any seed (zero included) gives a full-period stream.
    pub fn new(seed: u64) -> Rng {
        // splitmix64 of the seed: spreads nearby seeds and never yields the zero state.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-32 for any n that fits
    /// a bdev). `n` must be non-zero.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Draws (operation, I/O unit) pairs for a job.
#[derive(Debug, Clone)]
pub struct Generator {
    workload: Workload,
    read_percent: u32,
    nr_units: u64,
    next_unit: u64,
    rng: Rng,
}

impl Generator {
    /// A generator over `nr_units` I/O units (must be non-zero). `read_percent` matters only for
    /// mixed workloads.
    pub fn new(workload: Workload, read_percent: u32, nr_units: u64, seed: u64) -> Generator {
        assert!(nr_units > 0, "a job needs at least one I/O unit");
        assert!(read_percent <= 100);
        Generator {
            workload,
            read_percent,
            nr_units,
            next_unit: 0,
            rng: Rng::new(seed),
        }
    }

    /// The number of I/O units in range.
    pub fn nr_units(&self) -> u64 {
        self.nr_units
    }

    /// The next I/O unit: sequential with wrap, or uniformly random.
    #[inline(always)]
    pub fn next_unit(&mut self) -> u64 {
        if self.workload.is_random() {
            self.rng.below(self.nr_units)
        } else {
            let unit = self.next_unit;
            self.next_unit += 1;
            if self.next_unit == self.nr_units {
                self.next_unit = 0;
            }
            unit
        }
    }

    /// The operation of the next I/O. Verify always starts with a write; its read-back is
    /// issued by the job, not drawn here.
    #[inline(always)]
    pub fn next_op(&mut self) -> Op {
        match self.workload {
            Workload::Read | Workload::RandRead => Op::Read,
            Workload::Write | Workload::RandWrite | Workload::Verify => Op::Write,
            Workload::Rw | Workload::RandRw => {
                if self.rng.below(100) < u64::from(self.read_percent) {
                    Op::Read
                } else {
                    Op::Write
                }
            }
            Workload::Unmap => Op::Unmap,
            Workload::Flush => Op::Flush,
            Workload::WriteZeroes => Op::WriteZeroes,
        }
    }
}

#[cfg(test)]
mod tests;
