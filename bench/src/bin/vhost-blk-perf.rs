//! `vhost-blk-perf`: a vhost-user-blk frontend that measures a backend from the host.
//!
//! It plays the guest's part: guest memory in a shared memfd, split virtqueues, virtio-blk
//! requests (header, data, status descriptors) kept at a given depth, on one thread pinned to
//! a core that busy-polls the used rings and never waits on call eventfds. The vhost-user
//! protocol goes through the rust-vmm `vhost` crate's frontend side, so any backend QEMU can
//! use (thind's controllers, qemu-storage-daemon's `vhost-user-blk` export) can be measured
//! by the same driver in the same run.
//!
//! Output: one summary line (IOPS, MiB/s, average / p50 / p99 / max latency) and one JSON line
//! with bdevperf's field names. A bad setup is one line on stderr and exit status 1; so are
//! failed requests and verify miscompares (after the summary).

#[path = "vhost_blk_perf/cli.rs"]
mod cli;
#[path = "vhost_blk_perf/job.rs"]
mod job;
#[path = "vhost_blk_perf/pattern.rs"]
mod pattern;
#[path = "vhost_blk_perf/ring.rs"]
mod ring;
#[path = "vhost_blk_perf/session.rs"]
mod session;

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use cli::{Command, Options, Workload};
use job::{Plan, Stats};
use ring::{GuestMem, MemLayout};

fn main() -> ExitCode {
    let opts = match cli::parse_args(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            return match writeln!(std::io::stdout(), "{}", cli::USAGE) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("writing usage: {e}")),
            };
        }
        Ok(Command::Run(o)) => o,
        Err(e) => return fail(&e),
    };
    match run(&opts) {
        Ok(stats) => report(&opts, &stats),
        Err(e) => fail(&e),
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("vhost-blk-perf: {msg}");
    ExitCode::FAILURE
}

fn run(opts: &Options) -> Result<Stats, String> {
    if let Some(core) = opts.core {
        pin(core)?;
    }
    let socket = opts.socket.display();
    let mut session = session::connect(&opts.socket, opts.nr_queues, opts.event_idx)
        .map_err(|e| format!("{socket}: {e}"))?;
    let plan = plan(opts, &session.device)?;
    let layout = MemLayout::new(opts.nr_queues, plan.ring_size, plan.depth, plan.io_size);
    let mem = GuestMem::new(layout.len_bytes)?;
    session
        .set_mem_table(&mem)
        .map_err(|e| format!("{socket}: {e}"))?;
    job::run(&mut session, &mem, &layout, plan).map_err(|e| format!("{socket}: {e}"))
}

fn pin(core: usize) -> Result<(), String> {
    let known = core_affinity::get_core_ids().unwrap_or_default();
    if !known.iter().any(|c| c.id == core) {
        return Err(format!(
            "--core {core}: no such CPU in this process's affinity mask"
        ));
    }
    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        return Err(format!("--core {core}: cannot pin the driver thread"));
    }
    Ok(())
}

/// Applies the device's geometry to the options.
fn plan(opts: &Options, dev: &session::Device) -> Result<Plan, String> {
    if opts.workload.writes() && dev.read_only {
        return Err(format!(
            "-w {}: the device is read-only",
            opts.workload.name()
        ));
    }
    if !opts.io_size_bytes.is_multiple_of(u64::from(dev.blk_size)) {
        return Err(format!(
            "-o {}: not a multiple of the device's block size {}",
            opts.io_size_bytes, dev.blk_size
        ));
    }
    let capacity = dev.capacity_sectors.saturating_mul(512);
    let range = match opts.range_mib {
        Some(mib) if mib << 20 > capacity => {
            return Err(format!(
                "--range-mib {mib}: the device has {} MiB",
                capacity >> 20
            ));
        }
        Some(mib) => mib << 20,
        None => capacity,
    };
    let nr_units = range / opts.io_size_bytes;
    let nr_slots = u64::from(opts.queue_depth) * u64::from(opts.nr_queues);
    if nr_units == 0 {
        return Err(format!(
            "device of {capacity} bytes is smaller than one I/O"
        ));
    }
    if opts.workload == Workload::Verify && nr_units < nr_slots {
        return Err(format!(
            "-w verify: {nr_slots} requests in flight need as many I/O-sized units, the range has {nr_units}"
        ));
    }
    let seed = opts.seed.unwrap_or_else(|| {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        pattern::mix(u64::try_from(t.as_nanos()).unwrap_or(u64::MAX))
    });
    Ok(Plan {
        workload: opts.workload,
        io_size: opts.io_size_bytes,
        depth: opts.queue_depth,
        ring_size: opts.ring_size(),
        nr_units,
        duration: Duration::from_secs_f64(opts.time_secs),
        io_timeout: Duration::from_secs_f64(opts.io_timeout_secs),
        seed,
        one_pass: opts.one_pass,
    })
}

fn report(opts: &Options, s: &Stats) -> ExitCode {
    let secs = s.runtime.as_secs_f64().max(1e-9);
    let iops = s.nr_ios as f64 / secs;
    let mibps = iops * opts.io_size_bytes as f64 / f64::from(1 << 20);
    let h = &s.latency_ns;
    let us = |ns: u64| ns as f64 / 1000.0;
    let (avg, p50, p99, p999) = if h.is_empty() {
        (0.0, 0.0, 0.0, 0.0)
    } else {
        let q = |p: f64| us(h.value_at_quantile(p));
        (h.mean() / 1000.0, q(0.5), q(0.99), q(0.999))
    };
    let (min, max) = if h.is_empty() {
        (0.0, 0.0)
    } else {
        (us(h.min()), us(h.max()))
    };
    let summary = format!(
        "{} {} q={} o={} queues={}: {:.0} IOPS {:.2} MiB/s latency us avg {:.2} p50 {:.2} \
         p99 {:.2} max {:.2} failed {} miscompares {}",
        opts.socket.display(),
        opts.workload.name(),
        opts.queue_depth,
        opts.io_size_bytes,
        opts.nr_queues,
        iops,
        mibps,
        avg,
        p50,
        p99,
        max,
        s.nr_failed,
        s.nr_miscompares
    );
    let r2 = |v: f64| (v * 100.0).round() / 100.0;
    let line = json!({
        "job": "vhost-blk-perf",
        "socket": opts.socket.display().to_string(),
        "workload": opts.workload.name(),
        "queue_depth": opts.queue_depth,
        "io_size": opts.io_size_bytes,
        "queues": opts.nr_queues,
        "core": opts.core,
        "runtime": r2(secs),
        "ios": s.nr_ios,
        "iops": r2(iops),
        "mibps": r2(mibps),
        "io_failed": s.nr_failed,
        "miscompares": s.nr_miscompares,
        "kicks": s.nr_kicks,
        "avg_latency_us": r2(avg),
        "min_latency_us": r2(min),
        "max_latency_us": r2(max),
        "p50_us": r2(p50),
        "p99_us": r2(p99),
        "p999_us": r2(p999),
    });
    // A closed stdout (`| head -1`) is an error line, not a panic.
    if let Err(e) = writeln!(std::io::stdout(), "{summary}\n{line}") {
        return fail(&format!("writing results: {e}"));
    }
    match &s.first_failure {
        None => ExitCode::SUCCESS,
        Some(first) => fail(&format!(
            "{} failed requests, {} miscompares; first: {first}",
            s.nr_failed, s.nr_miscompares
        )),
    }
}
