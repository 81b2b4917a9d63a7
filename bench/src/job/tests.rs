//! Jobs driven on the test thread (off-reactor: the test polls the channel through
//! `Job::poll`) against real malloc bdevs and the bdev crate's fault-injecting wrapper.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::testing::fault;
use bdev::{BdevDesc, IoBuf, IoCallback, IoDone, IoType};
use serde_json::json;

use super::*;

fn create_malloc(name: &str, num_blocks: u64) {
    let methods = bdev::rpc_methods();
    let create = methods
        .iter()
        .find(|(m, _)| *m == "bdev_malloc_create")
        .unwrap()
        .1;
    create(json!({"name": name, "num_blocks": num_blocks, "block_size": 512})).unwrap();
}

fn spec(name: &str, workload: Workload, nr_units: u64) -> JobSpec {
    JobSpec {
        name: name.into(),
        workload,
        read_percent: 50,
        queue_depth: 8,
        io_size_blocks: 8,
        block_size: 512,
        first_block: 0,
        nr_units,
        seed: 42,
        verify_data: true,
        inject_corruption_lba: None,
    }
}

fn clock() -> Clock {
    Clock::calibrate(Duration::from_millis(5))
}

/// Runs a job to completion on this thread.
fn run(spec: JobSpec, secs: f64, progress: Arc<Progress>) -> JobOutcome {
    let desc = BdevDesc::open(&spec.name, true, |_| {}).unwrap();
    let ch = desc.get_io_channel().unwrap();
    let out: Rc<RefCell<Option<JobOutcome>>> = Rc::default();
    let sink = out.clone();
    let job = Job::start(
        spec,
        ch,
        clock(),
        secs,
        progress,
        Box::new(move |o| *sink.borrow_mut() = Some(o)),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !job.is_done() {
        job.poll();
        assert!(Instant::now() < deadline, "job did not finish");
    }
    let outcome = out.borrow_mut().take().expect("outcome reported");
    outcome
}

/// Reads `nr_blocks` at `lba` through a fresh channel on this thread.
fn read_blocks(name: &str, lba: u64, nr_blocks: u64) -> Vec<u8> {
    let desc = BdevDesc::open(name, false, |_| {}).unwrap();
    let ch = desc.get_io_channel().unwrap();
    let got: Rc<RefCell<Option<IoBuf>>> = Rc::default();
    let sink = got.clone();
    let cb: IoCallback = Rc::new(move |done: IoDone| {
        assert!(done.status.is_success());
        *sink.borrow_mut() = done.buf;
    });
    ch.read(
        IoBuf::new((nr_blocks * 512) as usize),
        lba,
        nr_blocks,
        0,
        &cb,
    )
    .unwrap();
    while got.borrow().is_none() {
        ch.poll();
    }
    let buf = got.borrow_mut().take().unwrap();
    buf.to_vec()
}

#[test]
fn random_reads_run_for_their_duration() {
    create_malloc("JobRead0", 4096);
    let progress = Arc::new(Progress::default());
    let started = Instant::now();
    let outcome = run(
        spec("JobRead0", Workload::RandRead, 512),
        0.2,
        progress.clone(),
    );
    let elapsed = started.elapsed().as_secs_f64();
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    assert!(outcome.stats.nr_completed > 0);
    assert_eq!(outcome.stats.nr_failed, 0);
    assert_eq!(
        progress.nr_completed.load(Ordering::Relaxed),
        outcome.stats.nr_completed
    );
    let runtime = clock().to_us(outcome.runtime_ticks) / 1e6;
    assert!(
        runtime >= 0.19 && runtime <= elapsed + 0.01,
        "runtime {runtime}, wall {elapsed}"
    );
    assert_eq!(
        outcome.stats.latency_buckets.to_histogram().len(),
        outcome.stats.nr_completed
    );
}

#[test]
fn verify_stamps_only_the_jobs_range() {
    create_malloc("JobVerify0", 4096);
    let mut s = spec("JobVerify0", Workload::Verify, 256);
    s.first_block = 2048;
    let outcome = run(s, 0.2, Arc::default());
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    assert!(
        outcome.stats.nr_completed >= 256,
        "the range was not covered once"
    );
    assert!(
        read_blocks("JobVerify0", 0, 2048).iter().all(|&b| b == 0),
        "wrote outside"
    );
    let stamped = read_blocks("JobVerify0", 2048, 2048);
    for (i, block) in stamped.chunks(512).enumerate() {
        let lba = u64::from_le_bytes(block[..8].try_into().unwrap());
        assert_eq!(lba, 2048 + i as u64, "block {i} of the range");
    }
}

#[test]
fn a_failed_write_stops_the_job_with_its_error() {
    create_malloc("JobFaultBase0", 4096);
    let f = fault::create("JobFault0", "JobFaultBase0").unwrap();
    f.config().set_error_ppm(IoType::Write, 1_000_000);
    let outcome = run(
        spec("JobFault0", Workload::RandWrite, 512),
        5.0,
        Arc::default(),
    );
    let error = outcome.error.expect("the job must fail");
    assert!(
        error.contains("write at LBA") && error.contains("errno 5"),
        "{error}"
    );
    assert!(outcome.stats.nr_failed >= 1);
    assert_eq!(outcome.stats.nr_completed, 0);
}

#[test]
fn verify_catches_misdirected_writes() {
    create_malloc("JobMisBase0", 4096);
    let f = fault::create("JobMis0", "JobMisBase0").unwrap();
    f.config().misdirect_ppm.store(1_000_000, Ordering::Relaxed);
    let outcome = run(spec("JobMis0", Workload::Verify, 512), 5.0, Arc::default());
    let error = outcome.error.expect("misdirected writes must fail verify");
    assert!(
        error.contains("verify failed: miscompare at LBA"),
        "{error}"
    );
    assert!(f.config().nr_injected.load(Ordering::Relaxed) > 0);
}

#[test]
fn stop_request_drains_the_job_early() {
    create_malloc("JobStop0", 4096);
    let progress = Arc::new(Progress::default());
    progress.stop.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let outcome = run(spec("JobStop0", Workload::RandRw, 512), 100.0, progress);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(outcome.error.is_none());
}

#[test]
fn every_workload_touches_only_its_range() {
    for (i, workload) in Workload::ALL.into_iter().enumerate() {
        let name = format!("JobRange{i}");
        create_malloc(&name, 1024);
        // Stamp the upper half with verify patterns; a stray write, unmap or write-zeroes
        // from the job on the lower half would destroy some of them.
        let mut s = spec(&name, Workload::Verify, 64);
        s.first_block = 512;
        let marker = run(s.clone(), 0.05, Arc::default());
        assert!(marker.error.is_none());
        assert!(
            marker.stats.nr_completed >= 64,
            "upper half not fully stamped"
        );
        s.workload = workload;
        s.first_block = 0;
        let outcome = run(s, 0.05, Arc::default());
        assert!(outcome.error.is_none(), "{workload}: {:?}", outcome.error);
        assert!(outcome.stats.nr_completed > 0, "{workload}");
        let upper = read_blocks(&name, 512, 512);
        for (k, block) in upper.chunks(512).enumerate() {
            let lba = u64::from_le_bytes(block[..8].try_into().unwrap());
            assert_eq!(lba, 512 + k as u64, "{workload} touched block {}", 512 + k);
        }
    }
}
