//! A host that dies mid-I/O, end to end: a QEMU guest (../shared/guest, `guest-run --fwd`)
//! connects the stock Linux NVMe/TCP initiator to the target served from this process
//! (reactors + malloc bdevs + the `nvmf_*` RPC handlers) with a 5 s keep-alive and runs
//! fio. The test freezes the guest (SIGSTOP on QEMU: a powered-off host, whose connections
//! go silent without a FIN) while fio's I/O is in flight. Meanwhile a second host in this
//! process keeps writing and verifying on the same subsystem through its own controller.
//! The target must keep serving it, and tear the dead host's controller down once its
//! keep-alive timer expires (gone from `nvmf_subsystem_get_controllers`, its qpairs gone).

mod common;
#[path = "../nvmf/tests/common/mod.rs"]
mod host;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const NQN: &str = "nqn.2016-06.io.thinbdev:guest-fault";
const LOCAL_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:fault-local-host";
/// The guest's keep-alive timeout (`nvme connect -k 5`).
const GUEST_KATO: Duration = Duration::from_secs(5);

fn rpc(method: &str, params: Value) -> Value {
    host::rpc(method, params).unwrap_or_else(|e| panic!("{method}: {} ({})", e.message, e.code))
}

fn guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/guest")
}

/// The target: two reactors, namespace 1 for the guest, namespace 2 for the local host.
fn start_target() -> u16 {
    let mut opts = reactor::RuntimeOptions::new(reactor::CoreMask::parse("0x3").expect("mask"));
    opts.interrupt_mode = true;
    opts.pin_threads = false;
    let rt = reactor::Runtime::start(opts, || {}).expect("reactors");
    nvmf::set_runtime(rt.handle());
    std::mem::forget(rt);
    for (name, blocks) in [("FaultGuest0", 16384), ("FaultLocal1", 1024)] {
        bdev::malloc::create(bdev::malloc::MallocOpts {
            name: Some(name.into()),
            num_blocks: blocks,
            block_size: 4096,
            uuid: None,
            optimal_io_boundary: 0,
        })
        .expect("malloc");
    }
    rpc("nvmf_create_transport", json!({"trtype": "TCP"}));
    rpc(
        "nvmf_create_subsystem",
        json!({"nqn": NQN, "allow_any_host": true, "serial_number": "FAULT0001"}),
    );
    for b in ["FaultGuest0", "FaultLocal1"] {
        rpc(
            "nvmf_subsystem_add_ns",
            json!({"nqn": NQN, "namespace": {"bdev_name": b}}),
        );
    }
    let port = host::free_port();
    host::listener(NQN, port, true).expect("listener");
    port
}

fn guest_ops() -> u64 {
    let s = bdev::registry()
        .lookup("FaultGuest0")
        .expect("bdev")
        .core()
        .iostat();
    s.read.ops + s.write.ops
}

/// (hostnqn, cntlid) of every controller of the subsystem.
fn controllers() -> Vec<(String, u64)> {
    rpc("nvmf_subsystem_get_controllers", json!({"nqn": NQN}))
        .as_array()
        .expect("array")
        .iter()
        .map(|c| {
            (
                c["hostnqn"].as_str().expect("hostnqn").to_owned(),
                c["cntlid"].as_u64().expect("cntlid"),
            )
        })
        .collect()
}

/// Cntlids of the qpairs of the subsystem.
fn qpair_cntlids() -> Vec<u64> {
    rpc("nvmf_subsystem_get_qpairs", json!({"nqn": NQN}))
        .as_array()
        .expect("array")
        .iter()
        .map(|q| q["cntlid"].as_u64().expect("cntlid"))
        .collect()
}

/// The guest: guest-run and (once found) its QEMU. Dropping it kills both, so a failing
/// test never leaves a frozen QEMU behind.
struct Guest {
    run: Child,
    qemu: Option<i32>,
    lines: mpsc::Receiver<String>,
}

impl Guest {
    fn start(port: u16) -> Guest {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nvmf_guest_fault.sh");
        let mut run = Command::new(guest_dir().join("guest-run"))
            .arg("--fwd")
            .arg(format!("4420:{port}"))
            .args(["--timeout", "240", "--mem", "512"])
            .arg(&script)
            .arg(NQN)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("guest-run");
        let out = run.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                println!("{line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Guest {
            run,
            qemu: None,
            lines,
        }
    }

    /// Waits for a payload line containing `marker`; panics on guest exit or timeout.
    fn wait_marker(&mut self, marker: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(marker) => return,
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("no {marker} within {limit:?}"),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = self.run.wait().expect("wait guest-run");
                    panic!("guest ended before {marker}: {st}");
                }
            }
        }
    }

    /// The QEMU process guest-run started (its child).
    fn find_qemu(&mut self) -> i32 {
        let parent = self.run.id();
        let found = std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .find(|&pid| child_of(pid, parent, "qemu-system"));
        let pid = found.expect("QEMU child of guest-run");
        self.qemu = Some(pid);
        pid
    }

    /// Sends `sig` to QEMU if it is still guest-run's child (never to a reused pid).
    fn signal_qemu(&self, sig: i32) {
        let Some(pid) = self.qemu else { return };
        if child_of(pid, self.run.id(), "qemu-system") {
            // SAFETY: kill(2) on the QEMU process our guest-run child started, checked
            // just above to still be that process.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.signal_qemu(libc::SIGKILL);
        let _ = self.run.kill();
        let _ = self.run.wait();
    }
}

/// True if `pid` is a child of `parent` whose command name starts with `comm`.
fn child_of(pid: i32, parent: u32, comm: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) state ppid ...": the name may hold spaces, so split at the last ')'.
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let name = &stat[open + 1..close];
    let ppid = stat[close + 1..].split_whitespace().nth(1);
    name.starts_with(comm) && ppid == Some(parent.to_string().as_str())
}

/// The local host: admin queue (10 s keep-alive, sent every second) and one I/O queue,
/// writing and verifying 8 KiB blocks on namespace 2 until told to stop. Counts its I/Os.
fn local_host(
    port: u16,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
) -> (u16, std::thread::JoinHandle<()>) {
    let (mut a, cntlid) = host::Host::admin_init(port, NQN, LOCAL_HOST, 10_000, false);
    let mut q = host::Host::connect(port, false, false);
    assert_eq!(
        q.fabrics_connect(1, 63, 0, cntlid, NQN, LOCAL_HOST, 0)
            .status,
        0
    );
    let t = std::thread::spawn(move || {
        let mut last_ka = Instant::now();
        let mut i: u64 = 0;
        while !stop.load(Ordering::Relaxed) {
            let lba = (i % 256) * 2;
            let data: Vec<u8> = (0..8192u64).map(|b| (b ^ i) as u8).collect();
            let c = q.cmd(host::rw(0x01, 2, lba, 2), &data, false, 0).0;
            assert_eq!(c.status, 0, "local write {i}");
            let (c, back) = q.cmd(host::rw(0x02, 2, lba, 2), &[], false, 8192);
            assert_eq!(c.status, 0, "local read {i}");
            assert!(back == data, "local data {i} verifies");
            ops.fetch_add(2, Ordering::Relaxed);
            if last_ka.elapsed() > Duration::from_secs(1) {
                a.keep_alive();
                last_ka = Instant::now();
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    (cntlid, t)
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

#[test]
fn guest_frozen_mid_io_is_reaped_by_keep_alive_while_others_are_served() {
    if !common::require(
        "qemu-system-x86_64",
        "guest for the Linux NVMe/TCP initiator",
    ) {
        return;
    }
    let guest_run = guest_dir().join("guest-run");
    if !guest_run.exists() {
        assert!(!common::in_ci(), "missing {}", guest_run.display());
        eprintln!("SKIPPING: missing {}", guest_run.display());
        return;
    }
    let t0 = Instant::now();
    let port = start_target();
    let stop = Arc::new(AtomicBool::new(false));
    let local_ops = Arc::new(AtomicU64::new(0));
    let (local_id, local) = local_host(port, stop.clone(), local_ops.clone());

    let mut guest = Guest::start(port);
    guest.wait_marker("GUEST: FIO-RUNNING", Duration::from_secs(120));
    // The guest's controller: admin + 2 I/O queues, and its I/O reaching the bdev.
    let ctrlrs = controllers();
    assert_eq!(ctrlrs.len(), 2, "guest and local host: {ctrlrs:?}");
    let guest_id = ctrlrs
        .iter()
        .find(|(h, _)| h != LOCAL_HOST)
        .expect("guest controller")
        .1;
    let guest_qpairs = || qpair_cntlids().iter().filter(|&&c| c == guest_id).count();
    assert_eq!(guest_qpairs(), 3, "guest admin + 2 I/O qpairs");
    let before = guest_ops();
    assert!(
        wait_until(Duration::from_secs(20), || guest_ops() > before + 16),
        "guest I/O flowing"
    );

    // Power the guest off mid-I/O: frozen, its connections stay open and go silent.
    let qemu = guest.find_qemu();
    guest.signal_qemu(libc::SIGSTOP);
    let frozen = Instant::now();
    eprintln!("froze QEMU {qemu} at {:?}", t0.elapsed());
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        guest_qpairs(),
        3,
        "nothing told the target yet: the frozen guest's qpairs are still there"
    );
    // Keep-alive expiry (KATO rounded to whole seconds plus grace) tears it down.
    assert!(
        wait_until(GUEST_KATO * 3, || controllers().len() == 1),
        "frozen guest's controller torn down within {:?}",
        GUEST_KATO * 3
    );
    let reaped_after = frozen.elapsed();
    eprintln!("guest controller reaped {reaped_after:?} after the freeze");
    // The host sends a keep-alive every KATO/2, so the timer (KATO plus grace after the
    // last one) cannot run out much before KATO after the freeze; allow for a late one.
    assert!(
        reaped_after >= Duration::from_secs(2),
        "reaped by the keep-alive timer, not earlier ({reaped_after:?})"
    );
    assert_eq!(
        controllers(),
        [(LOCAL_HOST.to_owned(), u64::from(local_id))]
    );
    assert!(
        wait_until(Duration::from_secs(5), || guest_qpairs() == 0),
        "the guest's qpairs are gone"
    );

    // The local host was served throughout and still is.
    let at_reap = local_ops.load(Ordering::Relaxed);
    assert!(
        wait_until(Duration::from_secs(10), || local_ops
            .load(Ordering::Relaxed)
            > at_reap + 20),
        "local host keeps doing I/O after the teardown"
    );
    // Pull the plug for good: the guest's socat relays drop their connections; the
    // target has nothing of that host left to lose.
    guest.signal_qemu(libc::SIGKILL);
    let st = common::wait_timeout(&mut guest.run, Duration::from_secs(30));
    eprintln!("guest-run ended: {st}");
    let at_kill = local_ops.load(Ordering::Relaxed);
    assert!(
        wait_until(Duration::from_secs(10), || local_ops
            .load(Ordering::Relaxed)
            > at_kill + 20),
        "local host keeps doing I/O after the guest is gone"
    );
    assert_eq!(
        controllers(),
        [(LOCAL_HOST.to_owned(), u64::from(local_id))]
    );
    stop.store(true, Ordering::Relaxed);
    local.join().expect("local host thread");
    // Its connections closed with the thread: the local controller goes too.
    assert!(wait_until(Duration::from_secs(10), || controllers().is_empty()));
    eprintln!(
        "total {:?}; local host did {} I/Os",
        t0.elapsed(),
        local_ops.load(Ordering::Relaxed)
    );
    nvmf::shutdown();
}
