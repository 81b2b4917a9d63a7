//! End to end against an NVMe/TCP target written elsewhere: the Linux kernel's `nvmet-tcp`,
//! served from a QEMU guest (../shared/guest, `guest-run --hostfwd`) with a file-backed
//! namespace. Our initiator (`nvme` crate, `bdev_nvme_attach_controller`) attaches it from
//! this process; data written through one reactor's queue pair reads back through the
//! other's; deallocate (unmap) and write zeroes read back as zeroes; a thin pool keeps its
//! data on the remote namespace; detach removes the bdev; then `bdevperf` (its own process)
//! attaches the same target from a JSON config and its verify workload passes.

mod common;
#[path = "../bdev/tests/common/mod.rs"]
mod rt;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bdev::thin::{self, PoolOpts};
use bdev::IoStatus;
use rt::{ok, open, pattern, Req, Rt};
use serde_json::{json, Value};

const NQN: &str = "nqn.2024-01.io.thinbdev:guest-target";
const NS_MB: u64 = 128;

fn guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/guest")
}

fn nvme_rpc(method: &str, params: Value) -> Result<Value, bdev::BdevError> {
    let (_, h) = nvme::rpc_methods()
        .into_iter()
        .find(|(m, _)| *m == method)
        .expect("method");
    let (tx, rx) = mpsc::channel();
    h(params, Box::new(move |r| tx.send(r).expect("answer")));
    rx.recv_timeout(Duration::from_secs(60))
        .expect("rpc answered")
}

/// The guest serving nvmet-tcp; killed (with its QEMU) on drop.
struct Guest {
    child: Child,
    lines: mpsc::Receiver<String>,
    transcript: String,
}

impl Guest {
    fn start(port: u16) -> Guest {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nvme_guest_target.sh");
        let mut child = Command::new(guest_dir().join("guest-run"))
            .arg("--hostfwd")
            .arg(format!("{port}:4420"))
            .args(["--timeout", "480", "--mem", "512"])
            .arg(&script)
            .args(["420", NQN, &NS_MB.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("guest-run");
        let out = child.stdout.take().expect("stdout");
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
            child,
            lines,
            transcript: String::new(),
        }
    }

    /// Waits for the target's NVMET-READY line; panics with the transcript if the guest ends.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(240);
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_secs(1)) {
                Ok(line) => {
                    self.transcript.push_str(&line);
                    self.transcript.push('\n');
                    if line.starts_with("NVMET-READY") {
                        return;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!(
            "the guest's nvmet target never became ready; transcript:\n{}",
            self.transcript
        );
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // The target's last kernel messages (it prints them every second) before it goes.
        let until = Instant::now() + Duration::from_secs(3);
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            if self.lines.recv_timeout(left).is_err() {
                break;
            }
        }
        // SAFETY: plain libc call with the PID of our own child; SIGTERM lets guest-run's
        // trap kill the QEMU process it started.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn malloc(name: &str, bytes: u64) {
    bdev::malloc::create(bdev::malloc::MallocOpts {
        name: Some(name.into()),
        num_blocks: bytes / 4096,
        block_size: 4096,
        uuid: None,
        optimal_io_boundary: 0,
    })
    .expect("malloc");
}

/// The bdevperf binary of this build (target/<profile>/bdevperf), built if missing.
fn bdevperf_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("bdevperf");
    if !bin.exists() {
        let release = dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "-p", "bench", "--bin", "bdevperf"]);
        if release {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().expect("cargo build").success(),
            "building bdevperf"
        );
    }
    bin
}

/// One I/O through reactor `r`, waited for up to a minute (the target runs under emulation).
fn io(rt: &Rt, r: usize, d: &std::sync::Arc<bdev::BdevDesc>, req: Req) -> rt::Res {
    rt.submit(r, d, req)
        .recv_timeout(Duration::from_secs(60))
        .expect("I/O did not complete in 60 s")
}

fn attach_params(name: &str, port: u16) -> Value {
    json!({"name": name, "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
           "trsvcid": port.to_string(), "subnqn": NQN})
}

/// Our initiator inside this process: I/O across both reactors' queue pairs, deallocate and
/// write zeroes, a thin pool whose data device is the remote namespace, detach.
fn in_process_checks(port: u16) {
    let rt = Rt::start(2, true);
    nvme::set_runtime(rt.h.clone());
    thin::set_runtime(rt.h.clone());
    let names = nvme_rpc("bdev_nvme_attach_controller", attach_params("Guest0", port))
        .unwrap_or_else(|e| panic!("attach to the guest's nvmet: {e}"));
    assert_eq!(names, json!(["Guest0n1"]));
    let b = bdev::registry().lookup("Guest0n1").expect("bdev Guest0n1");
    let bs = u64::from(b.block_size());
    assert_eq!(b.num_blocks() * bs, NS_MB << 20, "namespace size");
    let ctrlrs = nvme_rpc("bdev_nvme_get_controllers", json!({"name": "Guest0"})).unwrap();
    assert_eq!(ctrlrs[0]["name"], "Guest0", "{ctrlrs}");

    let d = open("Guest0n1");
    let blocks = (256 * 1024) / bs; // 256 KiB
    let data = pattern((blocks * bs) as usize, 7);
    assert_eq!(
        io(&rt, 0, &d, Req::Write(0, data.clone())).unwrap().0,
        IoStatus::Success
    );
    assert_eq!(
        ok(io(&rt, 1, &d, Req::Read(0, blocks))),
        data,
        "read back through reactor 1"
    );
    // A 2 MiB write and read (split at the target's MDTS if it has one).
    let big_blocks = (2 << 20) / bs;
    let big = pattern((big_blocks * bs) as usize, 9);
    assert_eq!(
        io(&rt, 1, &d, Req::Write(blocks, big.clone())).unwrap().0,
        IoStatus::Success
    );
    assert_eq!(ok(io(&rt, 0, &d, Req::Read(blocks, big_blocks))), big);
    // Deallocate the first quarter, write zeroes over the third: both read back as zeroes.
    let q = blocks / 4;
    assert_eq!(
        io(&rt, 0, &d, Req::Unmap(0, q)).unwrap().0,
        IoStatus::Success
    );
    assert_eq!(
        io(&rt, 1, &d, Req::WriteZeroes(2 * q, q)).unwrap().0,
        IoStatus::Success
    );
    assert_eq!(
        io(&rt, 0, &d, Req::Flush(0, 0)).unwrap().0,
        IoStatus::Success
    );
    let got = ok(io(&rt, 1, &d, Req::Read(0, blocks)));
    let qb = (q * bs) as usize;
    assert!(
        got[..qb].iter().all(|&x| x == 0),
        "deallocated range reads zeroes"
    );
    assert_eq!(got[qb..2 * qb], data[qb..2 * qb]);
    assert!(
        got[2 * qb..3 * qb].iter().all(|&x| x == 0),
        "write zeroes range reads zeroes"
    );
    assert_eq!(got[3 * qb..], data[3 * qb..]);
    // Out of range: refused at submit, nothing sent.
    assert!(io(&rt, 0, &d, Req::Read(b.num_blocks(), 1)).is_err());
    drop(d);

    // A thin pool whose data device is the remote namespace (metadata local).
    malloc("GuestMeta", 4 << 20);
    let mut o = PoolOpts::new("gpool", "Guest0n1", "GuestMeta");
    o.commit_interval_ms = 100;
    thin::create_pool_blocking(o).expect("pool on the remote namespace");
    thin::create_thin_blocking("gpool", "gthin", 8 << 20, 4096, None).expect("thin");
    let used = |st: &Value| {
        st["used_data_blocks"]
            .as_u64()
            .unwrap_or_else(|| panic!("{st}"))
    };
    // The label table (names, sizes, UUIDs) takes a data block of its own.
    let baseline = used(&thin::pool_status_blocking("gpool").unwrap());
    let t = open("gthin");
    let tdata = pattern(64 * 1024 * 3, 3); // three 64 KiB data blocks
    assert_eq!(
        io(&rt, 1, &t, Req::Write(16, tdata.clone())).unwrap().0,
        IoStatus::Success
    );
    assert_eq!(
        io(&rt, 0, &t, Req::Flush(0, 0)).unwrap().0,
        IoStatus::Success
    );
    assert_eq!(ok(io(&rt, 0, &t, Req::Read(16, 48))), tdata);
    assert_eq!(ok(io(&rt, 1, &t, Req::Read(0, 16))), vec![0u8; 16 * 4096]);
    let st = thin::pool_status_blocking("gpool").unwrap();
    assert_eq!(used(&st), baseline + 3, "{st}");
    assert_eq!(
        io(&rt, 0, &t, Req::Unmap(0, 2048)).unwrap().0,
        IoStatus::Success
    );
    assert_eq!(
        io(&rt, 0, &t, Req::Flush(0, 0)).unwrap().0,
        IoStatus::Success
    );
    // Freed blocks count as used until their unmap (passed down to the remote namespace)
    // completes and a commit follows.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st2 = thin::pool_status_blocking("gpool").unwrap();
        if used(&st2) == baseline {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "unmap did not free the thin blocks: {st2}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(t);
    thin::delete_pool_blocking("gpool").unwrap();

    assert_eq!(
        nvme_rpc("bdev_nvme_detach_controller", json!({"name": "Guest0"})).unwrap(),
        json!(true)
    );
    assert!(
        bdev::registry().lookup("Guest0n1").is_none(),
        "detach removed the bdev"
    );
}

#[test]
fn initiator_against_linux_nvmet() {
    if !common::require("qemu-system-x86_64", "guest for the kernel nvmet target") {
        return;
    }
    let guest_run = guest_dir().join("guest-run");
    if !guest_run.exists() {
        assert!(!common::in_ci(), "{} missing", guest_run.display());
        eprintln!("SKIPPING: {} missing", guest_run.display());
        return;
    }
    let port = free_port();
    let mut guest = Guest::start(port);
    guest.wait_ready();

    in_process_checks(port);

    // bdevperf, its own process: attach from a JSON config, verify for a few seconds.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("nvme.json");
    let config = json!({"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_nvme_attach_controller", "params": attach_params("Nvme0", port)}]}]});
    std::fs::write(&cfg, config.to_string()).unwrap();
    let out = Command::new(bdevperf_bin())
        .args([
            "-m", "0x1", "-q", "32", "-o", "4096", "-w", "verify", "-t", "5", "--json",
        ])
        .arg(&cfg)
        .output()
        .expect("bdevperf");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "bdevperf verify over NVMe/TCP failed ({}): {stderr}",
        out.status
    );
    let total: Value = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["job"] == "Total")
        .expect("Total line");
    assert!(total["iops"].as_f64().unwrap_or(0.0) > 0.0, "{total}");
    drop(guest);
}
