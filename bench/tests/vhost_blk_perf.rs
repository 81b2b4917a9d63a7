//! End-to-end tests of `vhost-blk-perf` against thind's vhost-user-blk controllers: random
//! writes, random reads and verify on a malloc bdev (several queues, with and without
//! EVENT_IDX), a verify run that must catch another frontend's writes, and bad setups (one
//! line on stderr, exit status 1).
//!
//! thind is another package's binary, so it is found next to this test's profile directory
//! (target/<profile>/thind) and built there with `cargo build --bin thind` when missing. It
//! runs in interrupt mode on one core, so the driver's kicks are what wakes it. Under
//! `CI=true` a thind that cannot be found or built fails the test instead of skipping it.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const DRIVER: &str = env!("CARGO_BIN_EXE_vhost-blk-perf");

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// target/<profile>/ of this test binary (it runs from target/<profile>/deps/).
fn profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.to_owned())
}

/// The thind binary of this build, built if missing; `None` (after a loud skip message) when it
/// cannot be had outside CI.
fn thind_bin() -> Option<PathBuf> {
    let dir = profile_dir().expect("test binary location");
    let bin = dir.join("thind");
    if !bin.exists() {
        build_thind(&dir);
    }
    if bin.exists() {
        return Some(bin);
    }
    let msg = format!(
        "prerequisite missing: {} (build it with `cargo build --bin thind`)",
        bin.display()
    );
    assert!(!in_ci(), "{msg}");
    eprintln!("SKIPPING: {msg}");
    None
}

fn build_thind(profile_dir: &Path) {
    let Some(target) = profile_dir.parent() else {
        return;
    };
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(p) => p,
        None => return,
    };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--bin", "thind", "--profile", profile])
        .env("CARGO_TARGET_DIR", target)
        .current_dir(workspace)
        .status();
    eprintln!("cargo build --bin thind --profile {profile}: {status:?}");
}

/// thind on core 0 in interrupt mode, with the config `config`; killed on drop.
struct Thind {
    child: Child,
    dir: tempfile::TempDir,
}

impl Thind {
    /// Starts thind and waits until every controller in `ctrlrs` has its socket.
    fn start(bin: &Path, config: &Value, ctrlrs: &[&str]) -> Thind {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("config.json");
        std::fs::write(&cfg, config.to_string()).expect("write config");
        let child = Command::new(bin)
            .args(["-m", "0x1", "--interrupt-mode", "-r"])
            .arg(dir.path().join("spdk.sock"))
            .arg("-S")
            .arg(dir.path())
            .arg("--json")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn thind");
        let mut t = Thind { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ctrlrs.iter().all(|c| t.socket(c).exists()) {
            if let Some(st) = t.child.try_wait().expect("try_wait") {
                panic!("thind exited during startup: {st}");
            }
            assert!(
                Instant::now() < deadline,
                "controllers {ctrlrs:?} did not appear"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        t
    }

    fn socket(&self, ctrlr: &str) -> PathBuf {
        self.dir.path().join(ctrlr)
    }
}

impl Drop for Thind {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A malloc bdev of `nr_blocks` 4 KiB blocks exported by the controllers `ctrlrs`.
fn malloc_config(nr_blocks: u64, ctrlrs: &[&str]) -> Value {
    let ctrls: Vec<Value> = ctrlrs
        .iter()
        .map(|c| {
            json!({"method": "vhost_create_blk_controller",
                   "params": {"ctrlr": c, "dev_name": "Malloc0"}})
        })
        .collect();
    json!({"subsystems": [
        {"subsystem": "bdev", "config": [{"method": "bdev_malloc_create",
            "params": {"name": "Malloc0", "num_blocks": nr_blocks, "block_size": 4096}}]},
        {"subsystem": "vhost_blk", "config": ctrls}
    ]})
}

struct Run {
    status: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        let line = self
            .stdout
            .lines()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("no JSON line:\n{}\n{}", self.stdout, self.stderr));
        serde_json::from_str(line).expect("JSON line")
    }

    /// Exit 0, requests completed, none failed or miscompared; returns the JSON line.
    fn assert_clean(&self) -> Value {
        assert_eq!(
            self.status, 0,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        let j = self.json();
        assert!(j["ios"].as_u64().unwrap() > 0, "{j}");
        assert!(j["iops"].as_f64().unwrap() > 0.0, "{j}");
        assert_eq!(j["io_failed"], 0, "{j}");
        assert_eq!(j["miscompares"], 0, "{j}");
        let (p50, p99, max) = (&j["p50_us"], &j["p99_us"], &j["max_latency_us"]);
        assert!(
            p50.as_f64() <= p99.as_f64() && p99.as_f64() <= max.as_f64(),
            "{j}"
        );
        j
    }

    fn assert_one_line_error(&self, needle: &str) {
        assert_eq!(
            self.status, 1,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(lines.len(), 1, "want one error line, got:\n{}", self.stderr);
        assert!(
            lines[0].contains(needle),
            "error {:?} lacks {needle:?}",
            lines[0]
        );
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
    }
}

fn driver(socket: &Path, args: &[&str]) -> Run {
    let out = Command::new(DRIVER)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run vhost-blk-perf");
    Run {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn randwrite_randread_and_verify_on_a_malloc_controller() {
    let Some(bin) = thind_bin() else { return };
    let t = Thind::start(&bin, &malloc_config(16384, &["vhost.0"]), &["vhost.0"]);
    let s = t.socket("vhost.0");
    let j = driver(
        &s,
        &[
            "-q",
            "8",
            "-w",
            "randwrite",
            "-t",
            "1",
            "--event-idx",
            "--seed",
            "3",
        ],
    )
    .assert_clean();
    assert_eq!(j["workload"], "randwrite");
    assert_eq!(j["queue_depth"], 8);
    // In interrupt mode the controller leaves kicks on: the driver had to notify it.
    assert!(j["kicks"].as_u64().unwrap() > 0, "{j}");
    driver(&s, &["-q", "32", "-w", "randread", "-t", "1"]).assert_clean();
    // Verify over two queues, 16 KiB requests; then 4 KiB with EVENT_IDX on one queue.
    let j = driver(
        &s,
        &[
            "-q", "16", "-o", "16k", "-w", "verify", "-t", "1", "--queues", "2",
        ],
    )
    .assert_clean();
    assert_eq!(j["queues"], 2);
    driver(&s, &["-q", "4", "-w", "verify", "-t", "0.5", "--event-idx"]).assert_clean();
    // A sequential one-pass write of a 1 MiB range ends early, after exactly 256 requests.
    let j = driver(
        &s,
        &[
            "-q",
            "4",
            "-w",
            "write",
            "-t",
            "30",
            "--one-pass",
            "--range-mib",
            "1",
        ],
    )
    .assert_clean();
    assert_eq!(j["ios"], 256, "{j}");
    assert!(j["runtime"].as_f64().unwrap() < 30.0, "{j}");
}

#[test]
fn verify_catches_writes_of_another_frontend() {
    let Some(bin) = thind_bin() else { return };
    let both = ["vhost.0", "vhost.1"];
    let t = Thind::start(&bin, &malloc_config(1024, &both), &both);
    // Random writes through the second controller land on the blocks the first one verifies.
    let mut writer = Command::new(DRIVER)
        .arg("--socket")
        .arg(t.socket("vhost.1"))
        .args(["-q", "8", "-w", "randwrite", "-t", "3", "--range-mib", "1"])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn writer");
    std::thread::sleep(Duration::from_millis(300));
    let r = driver(
        &t.socket("vhost.0"),
        &["-q", "1", "-w", "verify", "-t", "1.5", "--range-mib", "1"],
    );
    assert!(writer.wait().expect("writer").success());
    r.assert_one_line_error("miscompare reading back sector");
    assert!(r.json()["miscompares"].as_u64().unwrap() > 0);
}

#[test]
fn bad_setups_are_one_line_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    driver(
        &dir.path().join("nope"),
        &["-q", "1", "-w", "read", "-t", "1"],
    )
    .assert_one_line_error("connect");
    driver(
        dir.path(),
        &["-q", "1", "-w", "read", "-t", "1", "-o", "1000"],
    )
    .assert_one_line_error("multiple of 512");
    driver(
        dir.path(),
        &["-q", "1", "-w", "read", "-t", "1", "--core", "1023"],
    )
    .assert_one_line_error("--core 1023");
    // A socket that accepts and hangs up at once: the first message fails.
    let path = dir.path().join("closer");
    let listener = UnixListener::bind(&path).expect("bind");
    let closer = std::thread::spawn(move || drop(listener.accept()));
    driver(&path, &["-q", "1", "-w", "read", "-t", "1"]).assert_one_line_error("GET_FEATURES");
    closer.join().expect("closer");

    let Some(bin) = thind_bin() else { return };
    let t = Thind::start(&bin, &malloc_config(256, &["vhost.0"]), &["vhost.0"]);
    let s = t.socket("vhost.0");
    driver(&s, &["-q", "1", "-w", "read", "-t", "1", "-o", "512"])
        .assert_one_line_error("block size 4096");
    driver(
        &s,
        &["-q", "1", "-w", "read", "-t", "1", "--range-mib", "2"],
    )
    .assert_one_line_error("the device has 1 MiB");
    driver(&s, &["-q", "64", "-w", "verify", "-t", "1", "-o", "64k"])
        .assert_one_line_error("the range has 16");
    driver(&s, &["-q", "1", "-w", "read", "-t", "1", "--queues", "17"])
        .assert_one_line_error("--queues");
    // The controller still serves a well-formed run afterwards.
    driver(&s, &["-q", "2", "-w", "randread", "-t", "0.3"]).assert_clean();
}
