//! `bench`: the pieces of `bdevperf`, an SPDK-compatible block-device benchmark.
//!
//! ```text
//! bdevperf -q DEPTH -o SIZE -w WORKLOAD -t SECONDS [-M RWMIX] [-m MASK] [-T BDEV] [-C] [-S N]
//!          --json CONFIG
//! ```
//!
//! # Behaviour (the contract the end-to-end tests check)
//!
//! - `--json` takes SPDK's config shape; each `{"method", "params"}` entry is run through the
//!   bdev crate's RPC handler of that name, so params are exactly the RPC's. An unknown method,
//!   bad params or a missing file is a one-line error. `bdev_wait_for_examine` is accepted and
//!   ignored (bdevs are ready when their create call returns); subsystems other than `bdev`
//!   (e.g. `nvmf` in a config saved from `thind`) are skipped with a note on stderr.
//! - Jobs: without `-C` each bdev gets one job, bdevs dealt round-robin to the cores of `-m`;
//!   with `-C` every core runs a job on every bdev. Jobs on one bdev get disjoint, equal LBA
//!   ranges. Each job keeps `-q` I/Os in flight through the bdev's channel on its reactor.
//! - `verify` writes each I/O unit with a pattern holding every block's LBA and a per-write
//!   seed ([`verify`]), reads it back and compares; sequential offsets, never two I/Os in
//!   flight on one unit. The first mismatch stops the job and is reported with its LBA and
//!   byte offset, and what the block holds instead. **On a null bdev** (which discards
//!   writes and leaves read buffers untouched, as SPDK's does) the data compare is skipped:
//!   verify then checks only that every write and read completes, and says so on stderr.
//!   (SPDK's bdevperf reads back into the buffer it wrote from, so on null its compare passes
//!   without checking anything; we poison the buffer before each read-back, which would make
//!   null fail, and skip the compare openly instead.)
//!   The test-only `--inject-corruption LBA` overwrites that block with a foreign pattern
//!   between a verify write and its read-back, to prove detection end to end.
//! - Output: SPDK's result table, a p50/p99/p99.9 table from HDR histograms, then one JSON
//!   line per job and one for the total (SPDK's result keys plus `p50_us`, `p99_us`,
//!   `p999_us`, `status`). A progress line each second on runs of 3 s or more (`-S N`:
//!   every N s, `-S 0`: never). SIGINT/SIGTERM, or the bdev's hot removal, end the run (or
//!   that bdev's jobs) early with a full report.
//! - Exit status: 0 when every job finished cleanly; 1 on bad input (one line on stderr, no
//!   table) or when any I/O failed or verify found a mismatch (table printed, each job's
//!   error repeated on stderr).
//!
//! # Modules
//!
//! `cli` parses SPDK's flags, `config` the `--json` bdev config, `workload` draws offsets and
//! operations, `verify` stamps and checks data patterns, `stats` and `report` measure and print,
//! `clock` is the cheap latency clock (TSC, read once per I/O). `job` runs one
//! (bdev, core) job on a reactor; `run` wires config, bdevs, jobs and reactors together.

pub mod cli;
pub mod clock;
pub mod config;
pub mod job;
pub mod report;
pub mod run;
pub mod stats;
pub mod verify;
pub mod workload;
