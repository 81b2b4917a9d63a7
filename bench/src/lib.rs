//! `bench`: the pieces of `bdevperf`, an SPDK-compatible block-device benchmark.
//!
//! `cli` parses SPDK's flags, `config` the `--json` bdev config, `workload` draws offsets and
//! operations, `verify` stamps and checks data patterns, `stats` and `report` measure and print
//! SPDK's result table plus HDR-histogram percentiles and JSON lines, `clock` is the cheap
//! latency clock. `job` runs one (bdev, core) job on a reactor; `run` wires jobs to reactors.

pub mod cli;
pub mod clock;
pub mod config;
pub mod job;
pub mod report;
pub mod run;
pub mod stats;
pub mod verify;
pub mod workload;
