//! End-to-end tests of the built `bdevperf` binary: every workload on malloc, verify on malloc,
//! uring and null, corruption detection, `-C`/`-T`/`-S`, and bad input (one-line error, exit 1).
//! Each run is about a second on one core.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_bdevperf");

struct Run {
    status: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON {l}: {e}")))
            .collect()
    }

    fn job(&self, name: &str) -> Value {
        self.json_lines()
            .into_iter()
            .find(|v| v["job"] == name)
            .unwrap_or_else(|| panic!("no JSON line for {name}:\n{}", self.stdout))
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

fn bdevperf(args: &[&str]) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(BIN).args(args).output().expect("run bdevperf");
    Run {
        status: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

fn write_config(dir: &Path, calls: Value) -> PathBuf {
    let path = dir.join("bdevperf.json");
    let config = json!({"subsystems": [{"subsystem": "bdev", "config": calls}]});
    std::fs::write(&path, config.to_string()).expect("write config");
    path
}

fn malloc_config(dir: &Path) -> PathBuf {
    write_config(
        dir,
        json!([{"method": "bdev_malloc_create",
                "params": {"name": "Malloc0", "num_blocks": 16384, "block_size": 512}}]),
    )
}

fn uring_config(dir: &Path, size: u64) -> PathBuf {
    let file = dir.join("uring.img");
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(size))
        .expect("backing file");
    write_config(
        dir,
        json!([{"method": "bdev_uring_create",
                "params": {"name": "Uring0", "filename": file, "block_size": 4096}}]),
    )
}

fn check_sane(run: &Run, name: &str, workload: &str) {
    assert_eq!(
        run.status, 0,
        "stdout:\n{}\nstderr:\n{}",
        run.stdout, run.stderr
    );
    assert!(run.stdout.contains("Device Information"), "{}", run.stdout);
    assert!(
        run.stdout
            .contains(&format!("Job: {name} (Core Mask 0x1, workload: {workload}")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .lines()
            .any(|l| l.trim_start().starts_with("Total ")),
        "{}",
        run.stdout
    );
    let job = run.job(name);
    assert_eq!(job["workload"], workload);
    assert_eq!(job["core_mask"], "0x1");
    assert_eq!(job["io_failed"], 0);
    assert_eq!(job["status"], "finished");
    let iops = job["iops"].as_f64().unwrap();
    assert!(iops > 100.0, "iops {iops}");
    let runtime = job["runtime"].as_f64().unwrap();
    // Loose upper bound: on a loaded machine the last I/O may complete late.
    assert!(
        (0.9..10.0).contains(&runtime),
        "runtime {runtime}\n{}",
        run.stdout
    );
    let mibps = job["mibps"].as_f64().unwrap();
    let io_size = job["io_size"].as_f64().unwrap();
    assert!(
        (mibps - iops * io_size / 1048576.0).abs() <= 0.02 + mibps * 1e-6,
        "{job}"
    );
    let lat = |k: &str| job[k].as_f64().unwrap();
    assert!(lat("min_latency_us") > 0.0, "{job}");
    assert!(
        lat("min_latency_us") <= lat("avg_latency_us") + 0.01,
        "{job}"
    );
    assert!(
        lat("avg_latency_us") <= lat("max_latency_us") + 0.01,
        "{job}"
    );
    assert!(
        lat("p50_us") <= lat("p99_us") && lat("p99_us") <= lat("p999_us"),
        "{job}"
    );
    // The histogram keeps 3 significant digits; allow its rounding above the true max.
    assert!(
        lat("p999_us") <= lat("max_latency_us") * 1.01 + 0.01,
        "{job}"
    );
    let total = run.job("Total");
    assert_eq!(total["iops"], job["iops"]);
}

macro_rules! workload_tests {
    ($($test:ident: $workload:literal $(, $extra:literal)*;)*) => {$(
        #[test]
        fn $test() {
            let dir = tempfile::tempdir().unwrap();
            let config = malloc_config(dir.path());
            let config = config.to_str().unwrap();
            let args = ["-q", "8", "-o", "4k", "-w", $workload, "-t", "1", "--json", config,
                        $($extra),*];
            let run = bdevperf(&args);
            check_sane(&run, "Malloc0", $workload);
        }
    )*};
}

workload_tests! {
    read_on_malloc: "read";
    write_on_malloc: "write";
    randread_on_malloc: "randread";
    randwrite_on_malloc: "randwrite";
    rw_on_malloc: "rw", "-M", "70";
    randrw_on_malloc: "randrw", "-M", "30";
    verify_passes_on_malloc: "verify";
    unmap_on_malloc: "unmap";
    flush_on_malloc: "flush";
    write_zeroes_on_malloc: "write_zeroes";
}

#[test]
fn mixed_workload_reports_percentage() {
    let dir = tempfile::tempdir().unwrap();
    let config = malloc_config(dir.path());
    let run = bdevperf(&[
        "-q",
        "4",
        "-o",
        "512",
        "-w",
        "randrw",
        "-M",
        "70",
        "-t",
        "1",
        "--json",
        config.to_str().unwrap(),
    ]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert!(run
        .stdout
        .contains("workload: randrw, percentage: 70, depth: 4, IO size: 512"));
    assert_eq!(run.job("Malloc0")["percentage"], 70);
}

#[test]
fn verify_passes_on_uring() {
    let dir = tempfile::tempdir().unwrap();
    let config = uring_config(dir.path(), 8 << 20);
    let run = bdevperf(&[
        "-q",
        "16",
        "-o",
        "8k",
        "-w",
        "verify",
        "-t",
        "1",
        "--json",
        config.to_str().unwrap(),
    ]);
    check_sane(&run, "Uring0", "verify");
    let job = run.job("Uring0");
    assert_eq!(job["verify_range"]["start"], 0);
    assert_eq!(job["verify_range"]["length"], 2048);
    assert!(run
        .stdout
        .contains("Verification LBA range: start 0x0 length 0x800"));
    // The pattern really reached the file: block 0 starts with its LBA (0) and a seed.
    let data = std::fs::read(dir.path().join("uring.img")).unwrap();
    let lba_of_block_5 = u64::from_le_bytes(data[5 * 4096..5 * 4096 + 8].try_into().unwrap());
    assert_eq!(lba_of_block_5, 5);
}

fn assert_detects_corruption(config: &Path, lba: u64, io_size: &str) {
    let lba_text = lba.to_string();
    let run = bdevperf(&[
        "-q",
        "4",
        "-o",
        io_size,
        "-w",
        "verify",
        "-t",
        "1",
        "--seed",
        "7",
        "--inject-corruption",
        &lba_text,
        "--json",
        config.to_str().unwrap(),
    ]);
    assert_eq!(
        run.status, 1,
        "stdout:\n{}\nstderr:\n{}",
        run.stdout, run.stderr
    );
    assert!(
        run.stderr.contains(&format!("miscompare at LBA {lba} ")),
        "stderr:\n{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("stale or foreign write"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("panicked"));
    let line = run
        .json_lines()
        .into_iter()
        .find(|v| v["job"] != "Total")
        .unwrap();
    assert_eq!(line["status"], "failed");
    assert!(line["io_failed"].as_u64().unwrap() >= 1);
    assert!(run.stdout.contains("ended in about"), "{}", run.stdout);
}

#[test]
fn verify_detects_corruption_on_malloc() {
    let dir = tempfile::tempdir().unwrap();
    assert_detects_corruption(&malloc_config(dir.path()), 37, "4k");
}

#[test]
fn verify_detects_corruption_on_uring() {
    let dir = tempfile::tempdir().unwrap();
    assert_detects_corruption(&uring_config(dir.path(), 4 << 20), 300, "16k");
}

#[test]
fn verify_on_null_checks_completion_only() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        json!([{"method": "bdev_null_create",
                "params": {"name": "Null0", "num_blocks": 8192, "block_size": 512}}]),
    );
    let run = bdevperf(&[
        "-q",
        "8",
        "-o",
        "4k",
        "-w",
        "verify",
        "-t",
        "1",
        "--json",
        config.to_str().unwrap(),
    ]);
    check_sane(&run, "Null0", "verify");
    assert!(run.stderr.contains("does not store data"), "{}", run.stderr);
}

#[test]
fn every_core_flag_and_bdev_filter() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        json!([
            {"method": "bdev_malloc_create",
             "params": {"name": "Malloc0", "num_blocks": 4096, "block_size": 512}},
            {"method": "bdev_malloc_create",
             "params": {"name": "Malloc1", "num_blocks": 4096, "block_size": 512}},
        ]),
    );
    let config = config.to_str().unwrap();
    let run = bdevperf(&[
        "-q", "4", "-o", "4k", "-w", "verify", "-t", "1", "-m", "0x3", "-C", "-T", "Malloc1",
        "--json", config,
    ]);
    assert_eq!(run.status, 0, "{}\n{}", run.stdout, run.stderr);
    let jobs: Vec<Value> = run
        .json_lines()
        .into_iter()
        .filter(|v| v["job"] != "Total")
        .collect();
    assert_eq!(jobs.len(), 2, "{}", run.stdout);
    assert!(jobs.iter().all(|j| j["job"] == "Malloc1"));
    let masks: Vec<&str> = jobs
        .iter()
        .map(|j| j["core_mask"].as_str().unwrap())
        .collect();
    assert_eq!(masks, ["0x1", "0x2"]);
    // Jobs sharing a bdev verify disjoint halves.
    assert_eq!(jobs[0]["verify_range"], json!({"start": 0, "length": 2048}));
    assert_eq!(
        jobs[1]["verify_range"],
        json!({"start": 2048, "length": 2048})
    );
    assert_eq!(run.job("Total")["core_mask"], "0x3");

    // Without -C, two bdevs are dealt to the two cores.
    let run = bdevperf(&[
        "-q", "4", "-o", "4k", "-w", "randread", "-t", "1", "-m", "0x3", "--json", config,
    ]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert_eq!(run.job("Malloc0")["core_mask"], "0x1");
    assert_eq!(run.job("Malloc1")["core_mask"], "0x2");
}

#[test]
fn progress_lines_are_printed() {
    let dir = tempfile::tempdir().unwrap();
    let config = malloc_config(dir.path());
    let run = bdevperf(&[
        "-q",
        "4",
        "-o",
        "4k",
        "-w",
        "randread",
        "-t",
        "2",
        "-S",
        "1",
        "--json",
        config.to_str().unwrap(),
    ]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    let progress: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("Progress:"))
        .collect();
    assert!(!progress.is_empty(), "{}", run.stdout);
    assert!(
        progress[0].contains("IOPS") && progress[0].contains("MiB/s"),
        "{}",
        progress[0]
    );
}

#[test]
fn bad_command_lines_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = malloc_config(dir.path());
    let c = config.to_str().unwrap();
    let cases: [(&[&str], &str); 7] = [
        (
            &[
                "-q", "1", "-o", "4k", "-w", "sideways", "-t", "1", "--json", c,
            ],
            "unknown workload",
        ),
        (
            &["-q", "0", "-o", "4k", "-w", "read", "-t", "1", "--json", c],
            "queue depth 0",
        ),
        (
            &[
                "-q", "1000000", "-o", "4k", "-w", "read", "-t", "1", "--json", c,
            ],
            "out of range",
        ),
        (
            &["-q", "1", "-o", "4x", "-w", "read", "-t", "1", "--json", c],
            "not a size",
        ),
        (
            &["-q", "1", "-o", "4k", "-w", "rw", "-t", "1", "--json", c],
            "-M",
        ),
        (
            &[
                "-q", "1", "-o", "4k", "-w", "read", "-t", "1", "-T", "Nope0", "--json", c,
            ],
            "Nope0",
        ),
        (
            &[
                "-q",
                "1",
                "-o",
                "4k",
                "-w",
                "read",
                "-t",
                "1",
                "--json",
                "/nonexistent.json",
            ],
            "/nonexistent.json",
        ),
    ];
    for (args, needle) in cases {
        bdevperf(args).assert_one_line_error(needle);
    }
}

#[test]
fn geometry_errors_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        json!([{"method": "bdev_malloc_create",
                "params": {"name": "Malloc4k", "num_blocks": 64, "block_size": 4096}}]),
    );
    let c = config.to_str().unwrap();
    bdevperf(&["-q", "1", "-o", "512", "-w", "read", "-t", "1", "--json", c])
        .assert_one_line_error("not a multiple of bdev Malloc4k's block size 4096");
    bdevperf(&["-q", "1", "-o", "1M", "-w", "read", "-t", "1", "--json", c])
        .assert_one_line_error("fewer than one 1048576-byte I/O");
    bdevperf(&[
        "-q", "128", "-o", "4k", "-w", "verify", "-t", "1", "--json", c,
    ])
    .assert_one_line_error("verify needs at least -q 128 I/O units per job");
}

#[test]
fn config_errors_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = write_config(
        dir.path(),
        json!([{"method": "bdev_uring_create",
                "params": {"name": "U0", "filename": "/nonexistent/disk.img"}}]),
    );
    bdevperf(&[
        "-q",
        "1",
        "-o",
        "4k",
        "-w",
        "read",
        "-t",
        "1",
        "--json",
        missing.to_str().unwrap(),
    ])
    .assert_one_line_error("/nonexistent/disk.img");

    let unknown = write_config(
        dir.path(),
        json!([{"method": "bdev_frobnicate", "params": {}}]),
    );
    bdevperf(&[
        "-q",
        "1",
        "-o",
        "4k",
        "-w",
        "read",
        "-t",
        "1",
        "--json",
        unknown.to_str().unwrap(),
    ])
    .assert_one_line_error("unknown method 'bdev_frobnicate'");

    std::fs::write(dir.path().join("bad.json"), "{\"subsystems\": [").unwrap();
    let bad = dir.path().join("bad.json");
    bdevperf(&[
        "-q",
        "1",
        "-o",
        "4k",
        "-w",
        "read",
        "-t",
        "1",
        "--json",
        bad.to_str().unwrap(),
    ])
    .assert_one_line_error("not valid JSON");

    let empty = write_config(dir.path(), json!([]));
    bdevperf(&[
        "-q",
        "1",
        "-o",
        "4k",
        "-w",
        "read",
        "-t",
        "1",
        "--json",
        empty.to_str().unwrap(),
    ])
    .assert_one_line_error("no bdevs");
}

#[test]
fn unsupported_workload_for_bdev_fails() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        json!([{"method": "bdev_null_create",
                "params": {"name": "Null0", "num_blocks": 1024, "block_size": 512}}]),
    );
    bdevperf(&[
        "-q",
        "1",
        "-o",
        "4k",
        "-w",
        "unmap",
        "-t",
        "1",
        "--json",
        config.to_str().unwrap(),
    ])
    .assert_one_line_error("does not support unmap");
}

#[test]
fn help_exits_zero() {
    let run = bdevperf(&["-h"]);
    assert_eq!(run.status, 0);
    assert!(run.stdout.contains("-q DEPTH") && run.stdout.contains("write_zeroes"));
}

#[test]
fn sigint_ends_the_run_early_with_a_report() {
    use std::io::{BufRead, BufReader, Read};

    let dir = tempfile::tempdir().unwrap();
    let config = malloc_config(dir.path());
    let mut child = Command::new(BIN)
        .args([
            "-q", "4", "-o", "4k", "-w", "randread", "-t", "60", "-S", "0", "--json",
        ])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn bdevperf");
    // Signal only once the jobs run (the handler is installed before they start).
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.starts_with("Running I/O for 60 seconds"), "{first}");
    std::thread::sleep(std::time::Duration::from_millis(700));
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on the pid of a child this test spawned and has not yet reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let started = std::time::Instant::now();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(started.elapsed().as_secs() < 10, "bdevperf ignored SIGINT");
    let run = Run {
        status: out.status.code().unwrap_or(-1),
        stdout: first + &rest,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_eq!(run.status, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("Received shutdown signal"),
        "{}",
        run.stdout
    );
    let job = run.job("Malloc0");
    assert_eq!(job["status"], "terminated");
    let runtime = job["runtime"].as_f64().unwrap();
    assert!(runtime > 0.5 && runtime < 10.0, "runtime {runtime}");
    assert!(job["iops"].as_f64().unwrap() > 0.0);
}

/// A config with uring data and metadata files, a thin pool on them, and (first run only)
/// the thin bdev `thin0`; on later runs the pool brings `thin0` back by itself.
fn thin_config(dir: &Path, create_thin: bool) -> PathBuf {
    let (data, meta) = (dir.join("data.img"), dir.join("meta.img"));
    for (f, len) in [(&data, 64u64 << 20), (&meta, 4 << 20)] {
        if !f.exists() {
            std::fs::File::create(f)
                .and_then(|h| h.set_len(len))
                .expect("backing file");
        }
    }
    let mut calls = vec![
        json!({"method": "bdev_uring_create",
               "params": {"name": "d0", "filename": data, "block_size": 4096}}),
        json!({"method": "bdev_uring_create",
               "params": {"name": "m0", "filename": meta, "block_size": 4096}}),
        json!({"method": "bdev_thin_pool_create",
               "params": {"name": "pool0", "data_bdev": "d0", "metadata_bdev": "m0"}}),
    ];
    if create_thin {
        calls.push(json!({"method": "bdev_thin_create",
                          "params": {"pool": "pool0", "name": "thin0", "size_in_mib": 32}}));
    }
    write_config(dir, Value::Array(calls))
}

#[test]
fn verify_passes_on_a_thin_bdev_and_its_pool_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let config = thin_config(dir.path(), true);
    let args = |c: &Path| {
        let c = c.to_str().unwrap().to_owned();
        move |w: &'static str| {
            vec![
                "-q".to_owned(),
                "16".into(),
                "-o".into(),
                "16k".into(),
                "-w".into(),
                w.into(),
                "-t".into(),
                "1".into(),
                "-T".into(),
                "thin0".into(),
                "--json".into(),
                c.clone(),
            ]
        }
    };
    let a = args(&config);
    let v = a("verify");
    let run = bdevperf(&v.iter().map(String::as_str).collect::<Vec<_>>());
    check_sane(&run, "thin0", "verify");
    assert!(run.job("thin0")["io_failed"] == 0, "{}", run.stdout);
    // The pool was committed on exit: it reopens with thin0 registered from its own metadata.
    let config = thin_config(dir.path(), false);
    let a = args(&config);
    let v = a("randread");
    let run = bdevperf(&v.iter().map(String::as_str).collect::<Vec<_>>());
    check_sane(&run, "thin0", "randread");
}
