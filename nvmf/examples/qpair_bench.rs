//! Quick target-side bench over loopback: `ACTIVE` host threads, each with its own
//! controller (admin + one I/O queue), run 4 KiB reads at QD 1 on a malloc namespace for
//! `SECONDS`, while `IDLE` further connections sit idle on the same reactors. Prints total
//! IOPS and the reactors' CPU time per I/O (from /proc), the figures that show what the
//! qpair polling costs.
//!
//! usage: cargo run --release -p nvmf --example qpair_bench -- ACTIVE IDLE SECONDS [interrupt]

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reactor::{CoreMask, Runtime, RuntimeOptions};
use serde_json::json;

/// CPU time (user + system) of this process's reactor threads, in clock ticks.
fn reactor_cpu_ticks() -> u64 {
    let mut total = 0;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("reactor_") {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        // Fields after the name: state is index 0, utime 11, stime 12.
        let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
        let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        total += utime + stime;
    }
    total
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let active: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(4);
    let idle: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(0);
    let secs: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(5);
    let interrupt = args.get(4).is_some_and(|a| a == "interrupt");
    let mut opts = RuntimeOptions::new(CoreMask::parse("0x3").expect("mask"));
    opts.interrupt_mode = interrupt;
    opts.pin_threads = false;
    let rt = Runtime::start(opts, || {}).expect("reactors");
    nvmf::set_runtime(rt.handle());
    std::mem::forget(rt);
    common::rpc("nvmf_create_transport", json!({"trtype": "TCP"})).expect("transport");
    bdev::malloc::create(bdev::malloc::MallocOpts {
        name: Some("BenchMalloc".into()),
        num_blocks: 4096,
        block_size: 4096,
        uuid: None,
        optimal_io_boundary: 0,
    })
    .expect("malloc");
    let nqn = "nqn.2016-06.io.bench:qpairs";
    common::rpc(
        "nvmf_create_subsystem",
        json!({"nqn": nqn, "allow_any_host": true}),
    )
    .expect("subsystem");
    common::rpc(
        "nvmf_subsystem_add_ns",
        json!({"nqn": nqn, "namespace": {"bdev_name": "BenchMalloc"}}),
    )
    .expect("ns");
    let port = common::free_port();
    common::listener(nqn, port, true).expect("listener");
    let host = "nqn.2014-08.org.nvmexpress:uuid:bench";
    let idle_conns: Vec<common::Host> = (0..idle)
        .map(|_| common::Host::connect(port, false, false))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let ios = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for t in 0..active {
        let (stop, ios) = (stop.clone(), ios.clone());
        threads.push(std::thread::spawn(move || {
            let (_a, cntlid) = common::Host::admin_init(port, nqn, host, 0, false);
            let mut q = common::Host::connect(port, false, false);
            assert_eq!(q.fabrics_connect(1, 31, 0, cntlid, nqn, host, 0).status, 0);
            let mut i = t as u64;
            while !stop.load(Ordering::Relaxed) {
                let (c, _) = q.cmd(common::rw(0x02, 1, i % 4096, 1), &[], false, 4096);
                assert_eq!(c.status, 0);
                ios.fetch_add(1, Ordering::Relaxed);
                i += 7;
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (io0, cpu0, t0) = (
        ios.load(Ordering::Relaxed),
        reactor_cpu_ticks(),
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs(secs));
    let (io1, cpu1, el) = (
        ios.load(Ordering::Relaxed),
        reactor_cpu_ticks(),
        t0.elapsed(),
    );
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("host thread");
    }
    drop(idle_conns);
    // SAFETY: sysconf takes no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let n = (io1 - io0) as f64;
    let cpu_s = (cpu1 - cpu0) as f64 / hz;
    println!(
        "{{\"active\":{active},\"idle\":{idle},\"interrupt\":{interrupt},\"iops\":{:.0},\
         \"reactor_cpu_us_per_io\":{:.2}}}",
        n / el.as_secs_f64(),
        cpu_s * 1e6 / n.max(1.0)
    );
    nvmf::shutdown();
}
