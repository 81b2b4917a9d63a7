//! Wires a bdevperf run together: config → bdevs → jobs on reactors → report.
//!
//! The main thread is not a reactor. It starts one reactor per core of `-m`, runs the config's
//! RPC calls on reactor 0, lays out jobs (one per bdev dealt round-robin to cores, or one per
//! (bdev, core) with `-C`; jobs on one bdev get disjoint ranges), starts each job on its
//! reactor with a message, then waits for the jobs' outcomes on a channel while printing
//! progress from their counters. Everything after the config is read-only on the main thread.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::{Bdev, BdevDesc, BdevEvent, IoType};
use reactor::{CoreMask, PollStatus, ReactorId, Runtime, RuntimeHandle, RuntimeOptions};

use crate::cli::{format_core_mask, Options, AUTO_PROGRESS_MIN_SECS};
use crate::clock::Clock;
use crate::config::{self, ConfigCall};
use crate::job::{io_type_of, Job, JobOutcome, JobSpec, Progress};
use crate::report::{self, JobReport};
use crate::stats::{JobStats, Summary};
use crate::workload::Workload;

/// Config methods accepted and ignored: they only wait for or tune things this implementation
/// does synchronously or not at all.
const NOOP_METHODS: &[&str] = &["bdev_wait_for_examine"];

/// The result of a run that got as far as running jobs.
#[derive(Debug)]
pub struct RunOutput {
    /// The text to print (table, percentiles, JSON lines).
    pub text: String,
    /// Whether any job failed (I/O error or verify mismatch).
    pub failed: bool,
    /// Each failed job's error, one line each.
    pub errors: Vec<String>,
    /// The run was cut short by SIGINT or SIGTERM.
    pub interrupted: bool,
}

/// How often the main thread checks for SIGINT/SIGTERM while jobs run.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

struct PlannedJob {
    spec: JobSpec,
    reactor: ReactorId,
    core: usize,
}

/// Runs the benchmark. Setup errors (bad config, unknown bdev, size mismatch, …) are `Err`
/// with a one-line message; a run whose jobs failed is `Ok` with `failed` set.
pub fn run(opts: &Options) -> Result<RunOutput, String> {
    let calls = match &opts.json_config {
        Some(path) => config::load(path).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let mask = CoreMask::from_cores(opts.cores.iter().copied()).map_err(|e| format!("-m: {e}"))?;
    let clock = Clock::calibrate(Duration::from_millis(20));
    let runtime = Runtime::start(RuntimeOptions::new(mask), || {})
        .map_err(|e| format!("cannot start reactors on cores {:?}: {e}", opts.cores))?;
    let handle = runtime.handle();
    signal::install();
    let result = run_on(opts, &handle, calls, clock);
    // Close remote controllers (their sockets) while the reactors still run.
    nvme::shutdown();
    handle.stop();
    let joined = runtime.join();
    let output = result?;
    joined.map_err(|e| format!("reactor failed: {e}"))?;
    Ok(output)
}

fn run_on(
    opts: &Options,
    handle: &RuntimeHandle,
    calls: Vec<ConfigCall>,
    clock: Clock,
) -> Result<RunOutput, String> {
    apply_config(handle, calls)?;
    let bdevs = select_bdevs(opts)?;
    let plan = plan_jobs(opts, handle, &bdevs)?;
    println!("Running I/O for {} seconds...", opts.time_secs);
    let (tx, rx) = mpsc::channel::<(usize, JobOutcome)>();
    let mut progress = Vec::with_capacity(plan.len());
    for (index, job) in plan.iter().enumerate() {
        let counters = Arc::new(Progress::default());
        progress.push(counters.clone());
        let tx = tx.clone();
        let spec = job.spec.clone();
        let secs = opts.time_secs;
        let writes = !opts.workload.is_read_only();
        handle.send_msg(job.reactor, move || {
            start_job(spec, writes, clock, secs, counters, move |outcome| {
                let _ = tx.send((index, outcome));
            });
        });
    }
    drop(tx);
    let outcomes = collect(opts, &rx, &progress, plan.len())?;
    Ok(build_report(opts, &plan, outcomes, clock))
}

/// Runs each config call through the RPC handler of the same name: the base-bdev methods on
/// the first reactor; the thin pool methods and the NVMe/TCP initiator's
/// (`bdev_nvme_attach_controller`, …), which answer asynchronously and need the reactors to do
/// their I/O, from this thread, waiting for each answer.
///
/// Only the `bdev` subsystem is loaded: bdevperf has no NVMe-oF or vhost targets, so the
/// entries of other subsystems (as in a config saved from `thind`) are skipped with a note.
fn apply_config(handle: &RuntimeHandle, calls: Vec<ConfigCall>) -> Result<(), String> {
    let reactor0 = *handle.reactor_ids().first().ok_or("no reactor started")?;
    bdev::thin::set_runtime(handle.clone());
    let methods = bdev::rpc_methods();
    nvme::set_runtime(handle.clone());
    let mut thin_methods = bdev::thin::rpc::rpc_methods();
    thin_methods.extend(nvme::rpc_methods());
    let mut skipped: Vec<String> = Vec::new();
    for call in calls {
        if call.subsystem != "bdev" {
            if !skipped.contains(&call.subsystem) {
                eprintln!(
                    "bdevperf: note: skipping subsystem '{}' of the config (bdevperf loads \
                     only 'bdev')",
                    call.subsystem
                );
                skipped.push(call.subsystem);
            }
            continue;
        }
        if NOOP_METHODS.contains(&call.method.as_str()) {
            continue;
        }
        if let Some((_, handler)) = thin_methods.iter().find(|(name, _)| *name == call.method) {
            let (tx, rx) = mpsc::channel();
            handler(
                call.params,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            );
            rx.recv()
                .map_err(|_| format!("--json: {}: no answer", call.method))?
                .map_err(|e| format!("--json: {}: {e}", call.method))?;
            continue;
        }
        let Some(&(_, handler)) = methods.iter().find(|(name, _)| *name == call.method) else {
            let known: Vec<&str> = methods
                .iter()
                .map(|(n, _)| *n)
                .chain(thin_methods.iter().map(|(n, _)| *n))
                .filter(|n| n.ends_with("_create"))
                .collect();
            return Err(format!(
                "--json: unknown method '{}' in subsystem '{}' (supported: {})",
                call.method,
                call.subsystem,
                known.join(", ")
            ));
        };
        let params = call.params;
        handle
            .call(reactor0, move || handler(params))
            .map_err(|e| format!("reactor stopped during config: {e}"))?
            .map_err(|e| format!("--json: {}: {e}", call.method))?;
    }
    Ok(())
}

/// The bdevs to run on: `-T`'s, or every leaf bdev (one no virtual bdev has claimed, as
/// SPDK's bdevperf walks `spdk_bdev_first_leaf`), so the base of a pool or wrapper is skipped.
fn select_bdevs(opts: &Options) -> Result<Vec<Arc<dyn Bdev>>, String> {
    let registry = bdev::registry();
    if let Some(name) = &opts.only_bdev {
        let bdev = registry
            .lookup(name)
            .ok_or_else(|| format!("-T: no bdev named '{name}'"))?;
        if let Some(owner) = bdev.core().claimed_by() {
            if !opts.workload.is_read_only() {
                return Err(format!(
                    "-T: bdev {name} is claimed by module {owner}; -w {} would write to it",
                    opts.workload
                ));
            }
        }
        return Ok(vec![bdev]);
    }
    // Bdevs that take no reads or writes at all (a thin pool's control-only bdev, registered so
    // that save_config orders the pool after its base bdevs) are not I/O targets.
    let bdevs: Vec<Arc<dyn Bdev>> = registry
        .list()
        .into_iter()
        .filter(|b| b.core().claimed_by().is_none())
        .filter(|b| b.io_type_supported(IoType::Read) || b.io_type_supported(IoType::Write))
        .collect();
    if bdevs.is_empty() {
        return Err("no bdevs to run on: give a --json config that creates some".into());
    }
    Ok(bdevs)
}

fn plan_jobs(
    opts: &Options,
    handle: &RuntimeHandle,
    bdevs: &[Arc<dyn Bdev>],
) -> Result<Vec<PlannedJob>, String> {
    let reactors = handle.reactor_ids();
    let mut plan = Vec::new();
    for (bdev_index, bdev) in bdevs.iter().enumerate() {
        check_bdev(opts, bdev.as_ref())?;
        let placed: Vec<ReactorId> = if opts.every_core_every_bdev {
            reactors.clone()
        } else {
            reactors
                .get(bdev_index % reactors.len())
                .copied()
                .into_iter()
                .collect()
        };
        let units_per_job = units_per_job(opts, bdev.as_ref(), placed.len() as u64)?;
        let verify_data = opts.workload != Workload::Verify || stores_data(bdev.as_ref());
        if !verify_data {
            eprintln!(
                "bdevperf: note: bdev {} (module {}) does not store data; verify checks I/O \
                 completion only",
                bdev.name(),
                bdev.core().module_name()
            );
        }
        let block_size = u64::from(bdev.block_size());
        let io_size_blocks = opts.io_size_bytes / block_size;
        let range_blocks = units_per_job * io_size_blocks;
        for (k, &reactor) in placed.iter().enumerate() {
            let first_block = k as u64 * range_blocks;
            let seed = opts.seed.unwrap_or_else(time_seed)
                ^ ((bdev_index as u64) << 48)
                ^ ((k as u64) << 40);
            let in_range = |lba: &u64| (first_block..first_block + range_blocks).contains(lba);
            let spec = JobSpec {
                name: bdev.name().to_owned(),
                workload: opts.workload,
                read_percent: opts.rw_read_percent.unwrap_or(100),
                queue_depth: opts.queue_depth,
                io_size_blocks,
                block_size,
                first_block,
                nr_units: units_per_job,
                seed,
                verify_data,
                inject_corruption_lba: opts.inject_corruption_lba.filter(in_range),
            };
            let core = handle.core_of(reactor);
            plan.push(PlannedJob {
                spec,
                reactor,
                core,
            });
        }
    }
    Ok(plan)
}

/// I/O units in each of `nr_jobs` equal ranges of `bdev`; errors if a job would get too few.
fn units_per_job(opts: &Options, bdev: &dyn Bdev, nr_jobs: u64) -> Result<u64, String> {
    let io_size_blocks = opts.io_size_bytes / u64::from(bdev.block_size());
    let units = bdev.num_blocks() / io_size_blocks / nr_jobs.max(1);
    if units == 0 {
        return Err(format!(
            "bdev {}: {} blocks hold fewer than one {}-byte I/O per job",
            bdev.name(),
            bdev.num_blocks(),
            opts.io_size_bytes
        ));
    }
    if opts.workload == Workload::Verify && units < u64::from(opts.queue_depth) {
        return Err(format!(
            "bdev {}: verify needs at least -q {} I/O units per job, the range has {units}",
            bdev.name(),
            opts.queue_depth
        ));
    }
    Ok(units)
}

fn check_bdev(opts: &Options, bdev: &dyn Bdev) -> Result<(), String> {
    let block_size = u64::from(bdev.block_size());
    if !opts.io_size_bytes.is_multiple_of(block_size) {
        return Err(format!(
            "-o {}: not a multiple of bdev {}'s block size {block_size}",
            opts.io_size_bytes,
            bdev.name()
        ));
    }
    for op in opts.workload.needed_ops() {
        let io_type = io_type_of(*op);
        if !bdev.io_type_supported(io_type) {
            return Err(format!(
                "bdev {} does not support {} (needed by -w {})",
                bdev.name(),
                io_type.name(),
                opts.workload
            ));
        }
    }
    if let Some(lba) = opts.inject_corruption_lba {
        if lba >= bdev.num_blocks() {
            return Err(format!(
                "--inject-corruption: LBA {lba} is beyond bdev {}",
                bdev.name()
            ));
        }
    }
    Ok(())
}

/// Whether reads return what was written. The null bdev discards writes and leaves read
/// buffers untouched (as SPDK's does), so verify there can only check that I/O completes.
fn stores_data(bdev: &dyn Bdev) -> bool {
    bdev.core().module_name() != "null" && bdev.io_type_supported(IoType::Read)
}

fn time_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x5EED)
}

/// On the job's reactor: opens the bdev, gets its channel, starts the job and polls it.
/// The job's poller is registered before the channel (whose own poller the bdev layer adds),
/// so each tick the job reaps its completions first and resubmits in the same tick.
fn start_job(
    spec: JobSpec,
    write: bool,
    clock: Clock,
    secs: f64,
    progress: Arc<Progress>,
    report: impl FnOnce(JobOutcome) + 'static,
) {
    let name = spec.name.clone();
    let fail = |msg: String| JobOutcome {
        stats: JobStats::new(),
        runtime_ticks: 0,
        error: Some(msg),
    };
    // Hot removal drains the job, as in SPDK's bdevperf; the event may come from any thread.
    let on_event = {
        let progress = progress.clone();
        move |ev: BdevEvent| {
            if ev == BdevEvent::Remove {
                progress.stop.store(true, Ordering::Relaxed);
            }
        }
    };
    let desc = match BdevDesc::open(&name, write, on_event) {
        Ok(d) => d,
        Err(e) => return report(fail(format!("bdev {name}: cannot open: {e}"))),
    };
    let slot: Rc<RefCell<Option<(Job, BdevDesc)>>> = Rc::default();
    let handle: Rc<Cell<Option<reactor::PollerHandle>>> = Rc::default();
    let (slot_in, handle_in) = (slot.clone(), handle.clone());
    let poller = reactor::register_poller("bdevperf_job", move || {
        let mut running = slot_in.borrow_mut();
        let Some((job, _)) = running.as_ref() else {
            return PollStatus::Idle;
        };
        let work = job.poll();
        if job.is_done() {
            if let Some(p) = handle_in.take() {
                p.unregister();
            }
            running.take();
        }
        PollStatus::from_busy(work > 0)
    });
    let ch = match desc.get_io_channel() {
        Ok(c) => c,
        Err(e) => {
            poller.unregister();
            return report(fail(format!("bdev {name}: cannot get an I/O channel: {e}")));
        }
    };
    handle.set(Some(poller));
    let job = Job::start(spec, ch, clock, secs, progress, Box::new(report));
    *slot.borrow_mut() = Some((job, desc));
}

fn collect(
    opts: &Options,
    rx: &mpsc::Receiver<(usize, JobOutcome)>,
    progress: &[Arc<Progress>],
    nr_jobs: usize,
) -> Result<Vec<Option<JobOutcome>>, String> {
    // A job that does not finish long after its time limit means a lost completion.
    let deadline = Instant::now() + Duration::from_secs_f64(opts.time_secs + 30.0);
    let mut printer = ProgressPrinter::new(opts, progress);
    let mut outcomes: Vec<Option<JobOutcome>> = (0..nr_jobs).map(|_| None).collect();
    let mut nr_done = 0;
    let mut stop_sent = false;
    while nr_done < nr_jobs {
        let now = Instant::now();
        if !stop_sent && signal::received() {
            stop_sent = true;
            println!(
                "Received shutdown signal, test time was about {:.6} seconds",
                (now - printer.start).as_secs_f64()
            );
            for p in progress {
                p.stop.store(true, Ordering::Relaxed);
            }
        }
        if now >= deadline {
            let nr_left = nr_jobs - nr_done;
            return Err(format!(
                "{nr_left} job(s) did not finish within 30 s of the time limit"
            ));
        }
        // Wake at least every 100 ms to notice a signal.
        let wake = printer
            .next
            .unwrap_or(deadline)
            .min(deadline)
            .min(now + SIGNAL_POLL);
        match rx.recv_timeout(wake.saturating_duration_since(now)) {
            Ok((i, outcome)) => {
                if let Some(slot) = outcomes.get_mut(i) {
                    if slot.replace(outcome).is_none() {
                        nr_done += 1;
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        printer.print_if_due(Instant::now());
    }
    Ok(outcomes)
}

/// Prints the progress line: the rate since the previous line, summed over all jobs.
struct ProgressPrinter<'a> {
    progress: &'a [Arc<Progress>],
    io_size_bytes: u64,
    interval: Option<Duration>,
    start: Instant,
    next: Option<Instant>,
    last: (Instant, u64),
}

impl<'a> ProgressPrinter<'a> {
    fn new(opts: &Options, progress: &'a [Arc<Progress>]) -> Self {
        let interval = match opts.progress_interval_secs {
            Some(0) => None,
            Some(n) => Some(Duration::from_secs(n)),
            None if opts.time_secs >= AUTO_PROGRESS_MIN_SECS => Some(Duration::from_secs(1)),
            None => None,
        };
        let start = Instant::now();
        ProgressPrinter {
            progress,
            io_size_bytes: opts.io_size_bytes,
            interval,
            start,
            next: interval.map(|i| start + i),
            last: (start, 0),
        }
    }

    fn print_if_due(&mut self, now: Instant) {
        let (Some(due), Some(interval)) = (self.next, self.interval) else {
            return;
        };
        if now < due {
            return;
        }
        let total: u64 = self
            .progress
            .iter()
            .map(|p| p.nr_completed.load(Ordering::Relaxed))
            .sum();
        let secs = (now - self.last.0).as_secs_f64().max(1e-9);
        let rate = total.saturating_sub(self.last.1) as f64 / secs;
        let elapsed = (now - self.start).as_secs_f64();
        println!(
            "{}",
            report::format_progress(elapsed, rate, self.io_size_bytes)
        );
        self.last = (now, total);
        self.next = Some(due + interval);
    }
}

fn build_report(
    opts: &Options,
    plan: &[PlannedJob],
    outcomes: Vec<Option<JobOutcome>>,
    clock: Clock,
) -> RunOutput {
    let mut reports = Vec::with_capacity(plan.len());
    let mut merged = JobStats::new();
    let mut max_runtime = 0.0f64;
    for (job, outcome) in plan.iter().zip(outcomes) {
        let outcome = outcome.unwrap_or_else(|| JobOutcome {
            stats: JobStats::new(),
            runtime_ticks: 0,
            error: Some("job never reported".into()),
        });
        let runtime = clock.to_us(outcome.runtime_ticks) / 1e6;
        merged.merge(&outcome.stats);
        max_runtime = max_runtime.max(runtime);
        let spec = &job.spec;
        reports.push(JobReport {
            name: spec.name.clone(),
            core_mask: format_core_mask(&[job.core]),
            workload: opts.workload,
            rw_read_percent: opts.rw_read_percent,
            queue_depth: opts.queue_depth,
            io_size_bytes: opts.io_size_bytes,
            verify_range: (opts.workload == Workload::Verify)
                .then_some((spec.first_block, spec.nr_units * spec.io_size_blocks)),
            summary: outcome.stats.summarize(clock, runtime, opts.io_size_bytes),
            error: outcome.error,
            terminated: signal::received(),
        });
    }
    // As SPDK: rates add up over jobs; latencies come from all I/Os together.
    let total = Summary {
        iops: reports.iter().map(|r| r.summary.iops).sum(),
        mibps: reports.iter().map(|r| r.summary.mibps).sum(),
        fail_per_sec: reports.iter().map(|r| r.summary.fail_per_sec).sum(),
        timeout_per_sec: reports.iter().map(|r| r.summary.timeout_per_sec).sum(),
        ..merged.summarize(clock, max_runtime, opts.io_size_bytes)
    };
    let cores: Vec<usize> = plan.iter().map(|j| j.core).collect();
    let total_report = JobReport {
        name: "Total".into(),
        core_mask: format_core_mask(&cores),
        verify_range: None,
        summary: total,
        error: reports.iter().find_map(|r| r.error.clone()),
        ..reports
            .first()
            .cloned()
            .unwrap_or_else(|| empty_report(opts))
    };
    RunOutput {
        text: render(&reports, &total_report),
        failed: reports
            .iter()
            .any(|r| r.error.is_some() || r.summary.nr_failed > 0),
        errors: reports.iter().filter_map(|r| r.error.clone()).collect(),
        interrupted: signal::received(),
    }
}

/// A report with the run's common fields and nothing measured.
fn empty_report(opts: &Options) -> JobReport {
    JobReport {
        name: String::new(),
        core_mask: String::new(),
        workload: opts.workload,
        rw_read_percent: opts.rw_read_percent,
        queue_depth: opts.queue_depth,
        io_size_bytes: opts.io_size_bytes,
        verify_range: None,
        summary: Summary::default(),
        error: None,
        terminated: signal::received(),
    }
}

/// The printed report: table, percentiles, a JSON line per job, the total's JSON line.
fn render(reports: &[JobReport], total: &JobReport) -> String {
    let mut text = report::format_table(reports, &total.summary);
    text.push_str(&report::format_percentiles(reports, &total.summary));
    for r in reports.iter().chain(std::iter::once(total)) {
        text.push_str(&report::json_line(r));
        text.push('\n');
    }
    text
}

/// SIGINT/SIGTERM: recorded in an atomic by an async-signal-safe handler; the main thread
/// then asks every job to drain, and the report covers the time actually run (as SPDK's
/// bdevperf does on a shutdown signal).
mod signal {
    use std::sync::atomic::{AtomicBool, Ordering};

    static RECEIVED: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_signal(_signo: libc::c_int) {
        RECEIVED.store(true, Ordering::Relaxed);
    }

    /// Installs the handler for SIGINT and SIGTERM.
    pub fn install() {
        for signo in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: `sigaction` is called with a zero-initialised struct whose handler is an
            // `extern "C"` function that only stores to an atomic (async-signal-safe); the mask
            // is emptied with sigemptyset before use.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(signo, &action, std::ptr::null_mut());
            }
        }
    }

    /// Whether a signal arrived.
    pub fn received() -> bool {
        RECEIVED.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use bdev::testing::fault;
    use serde_json::json;

    use super::*;
    use crate::cli::{parse_args, Command};

    /// Applies config calls with a shared test runtime (one reactor, interrupt mode).
    fn apply(calls: Vec<ConfigCall>) -> Result<(), String> {
        static RT: std::sync::OnceLock<RuntimeHandle> = std::sync::OnceLock::new();
        let h = RT.get_or_init(|| {
            let mut o = RuntimeOptions::new(CoreMask::parse("0x1").unwrap());
            o.interrupt_mode = true;
            o.pin_threads = false;
            let rt = Runtime::start(o, || {}).unwrap();
            let h = rt.handle();
            std::mem::forget(rt);
            h
        });
        apply_config(h, calls)
    }

    fn options(args: &[&str]) -> Options {
        match parse_args(args) {
            Ok(Command::Run(o)) => *o,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn claimed_bdevs_are_skipped_unless_named_for_reading() {
        apply(vec![ConfigCall {
            subsystem: "bdev".into(),
            method: "bdev_malloc_create".into(),
            params: json!({"name": "SelBase0", "num_blocks": 1024, "block_size": 512}),
        }])
        .unwrap();
        fault::create("SelFault0", "SelBase0").unwrap();
        let all = options(&["-q", "1", "-o", "4k", "-w", "randwrite", "-t", "1"]);
        let names: Vec<String> = select_bdevs(&all)
            .unwrap()
            .iter()
            .map(|b| b.name().to_owned())
            .collect();
        assert!(names.iter().any(|n| n == "SelFault0"), "{names:?}");
        assert!(!names.iter().any(|n| n == "SelBase0"), "{names:?}");

        let write_base = options(&[
            "-q",
            "1",
            "-o",
            "4k",
            "-w",
            "randwrite",
            "-t",
            "1",
            "-T",
            "SelBase0",
        ]);
        let e = select_bdevs(&write_base).err().unwrap();
        assert!(e.contains("claimed by module fault"), "{e}");
        let read_base = options(&[
            "-q", "1", "-o", "4k", "-w", "randread", "-t", "1", "-T", "SelBase0",
        ]);
        assert_eq!(select_bdevs(&read_base).unwrap().len(), 1);
    }

    #[test]
    fn hot_removal_drains_the_job() {
        apply(vec![ConfigCall {
            subsystem: "bdev".into(),
            method: "bdev_malloc_create".into(),
            params: json!({"name": "RmMalloc0", "num_blocks": 2048, "block_size": 512}),
        }])
        .unwrap();
        let mut opts = RuntimeOptions::new(CoreMask::from_cores([0]).unwrap());
        opts.pin_threads = false;
        let runtime = Runtime::start(opts, || {}).unwrap();
        let handle = runtime.handle();
        let spec = JobSpec {
            name: "RmMalloc0".into(),
            workload: Workload::RandRead,
            read_percent: 100,
            queue_depth: 4,
            io_size_blocks: 8,
            block_size: 512,
            first_block: 0,
            nr_units: 256,
            seed: 1,
            verify_data: true,
            inject_corruption_lba: None,
        };
        let (tx, rx) = mpsc::channel();
        let clock = Clock::calibrate(Duration::from_millis(5));
        let progress = Arc::new(Progress::default());
        let counters = progress.clone();
        handle.send_msg(handle.reactor_ids()[0], move || {
            start_job(spec, false, clock, 600.0, counters, move |o| {
                let _ = tx.send(o);
            });
        });
        let started = Instant::now();
        while progress.nr_completed.load(Ordering::Relaxed) == 0 {
            assert!(started.elapsed() < Duration::from_secs(10), "job never ran");
            std::thread::sleep(Duration::from_millis(10));
        }
        let methods = bdev::rpc_methods();
        let delete = methods
            .iter()
            .find(|(m, _)| *m == "bdev_malloc_delete")
            .unwrap()
            .1;
        delete(json!({"name": "RmMalloc0"})).unwrap();
        let outcome = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("job drained on removal");
        handle.stop();
        runtime.join().unwrap();
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert!(outcome.stats.nr_completed > 0);
    }

    #[test]
    fn unknown_config_method_names_the_supported_ones() {
        let e = apply(vec![ConfigCall {
            subsystem: "bdev".into(),
            method: "bdev_nope_create".into(),
            params: json!({}),
        }])
        .unwrap_err();
        assert!(e.contains("unknown method 'bdev_nope_create'"), "{e}");
        assert!(e.contains("bdev_malloc_create"), "{e}");
        let e = apply(vec![ConfigCall {
            subsystem: "bdev".into(),
            method: "bdev_malloc_create".into(),
            params: json!({"name": "BadParams0", "num_blocks": 8, "block_size": 512, "x": 1}),
        }])
        .unwrap_err();
        assert!(e.starts_with("--json: bdev_malloc_create: "), "{e}");
        // Other subsystems' entries are not bdevperf's business.
        apply(vec![ConfigCall {
            subsystem: "nvmf".into(),
            method: "nvmf_create_transport".into(),
            params: json!({"trtype": "TCP"}),
        }])
        .unwrap();
    }
}
