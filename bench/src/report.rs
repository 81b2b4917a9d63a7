//! The report: SPDK bdevperf's result table (same columns, widths and Total line, so scripts
//! written for SPDK parse it), a percentile table from the HDR histograms, and one JSON line per
//! job plus one for the total with SPDK's result keys and `p50_us`/`p99_us`/`p999_us`.

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::stats::Summary;
use crate::workload::Workload;

/// Everything printed about one job (or the total).
#[derive(Debug, Clone, PartialEq)]
pub struct JobReport {
    /// The job's name: its bdev's name, or `Total`.
    pub name: String,
    /// The job's reactor cores, SPDK's mask format without `0x`.
    pub core_mask: String,
    /// The workload.
    pub workload: Workload,
    /// `-M`, for mixed workloads.
    pub rw_read_percent: Option<u32>,
    /// `-q`.
    pub queue_depth: u32,
    /// `-o`.
    pub io_size_bytes: u64,
    /// For verify: (first I/O unit, number of I/O units).
    pub verify_range: Option<(u64, u64)>,
    /// What the job measured.
    pub summary: Summary,
    /// Why the job failed, if it did.
    pub error: Option<String>,
    /// The run was ended early by a signal.
    pub terminated: bool,
}

impl JobReport {
    /// SPDK's status word.
    pub fn status(&self) -> &'static str {
        if self.terminated {
            "terminated"
        } else if self.error.is_some() || self.summary.nr_failed > 0 {
            "failed"
        } else {
            "finished"
        }
    }
}

const RULE: &str = "====================================================================\
                    ===============================================";

/// The result table: header, each job, a rule, the Total line.
pub fn format_table(jobs: &[JobReport], total: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n{:>107}", "Latency(us)");
    let _ = writeln!(
        out,
        " {:<28}: {:>10} {:>10} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10}",
        "Device Information",
        "runtime(s)",
        "IOPS",
        "MiB/s",
        "Fail/s",
        "TO/s",
        "Average",
        "min",
        "max"
    );
    for job in jobs {
        format_job(&mut out, job);
    }
    let _ = writeln!(out, " {RULE}");
    let _ = writeln!(
        out,
        " {:<28}: {:>10} {:>10.2} {:>10.2} {:>10.2} {:>8.2} {:>10.2} {:>10.2} {:>10.2}",
        "Total",
        "",
        total.iops,
        total.mibps,
        total.fail_per_sec,
        total.timeout_per_sec,
        total.latency_avg_us,
        total.latency_min_us,
        total.latency_max_us
    );
    out
}

/// One job's block of the table: the Job line, any error, the verify range, the numbers.
fn format_job(out: &mut String, job: &JobReport) {
    let _ = write!(
        out,
        " Job: {} (Core Mask 0x{}, workload: {}",
        job.name, job.core_mask, job.workload
    );
    if let Some(p) = job.rw_read_percent.filter(|_| job.workload.is_mixed()) {
        let _ = write!(out, ", percentage: {p}");
    }
    let _ = writeln!(
        out,
        ", depth: {}, IO size: {})",
        job.queue_depth, job.io_size_bytes
    );
    if let Some(error) = &job.error {
        let _ = writeln!(
            out,
            " Job: {} ended in about {:.2} seconds with error",
            job.name, job.summary.runtime_secs
        );
        let _ = writeln!(out, "\t {error}");
    }
    if let Some((start, len)) = job.verify_range {
        let _ = writeln!(
            out,
            "\t Verification LBA range: start {start:#x} length {len:#x}"
        );
    }
    let s = &job.summary;
    let _ = writeln!(
        out,
        "\t {:<20}: {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>8.2} {:>10.2} {:>10.2} {:>10.2}",
        job.name,
        s.runtime_secs,
        s.iops,
        s.mibps,
        s.fail_per_sec,
        s.timeout_per_sec,
        s.latency_avg_us,
        s.latency_min_us,
        s.latency_max_us
    );
}

/// The latency percentile table (microseconds, from the HDR histograms).
pub fn format_percentiles(jobs: &[JobReport], total: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n {:<28}: {:>10} {:>10} {:>10}",
        "Latency percentiles(us)", "p50", "p99", "p99.9"
    );
    for job in jobs {
        let s = &job.summary;
        let _ = writeln!(
            out,
            "\t {:<20}: {:>10.2} {:>10.2} {:>10.2}",
            job.name, s.latency_p50_us, s.latency_p99_us, s.latency_p999_us
        );
    }
    let _ = writeln!(
        out,
        " {:<28}: {:>10.2} {:>10.2} {:>10.2}",
        "Total", total.latency_p50_us, total.latency_p99_us, total.latency_p999_us
    );
    out
}

/// Rounds to 2 decimals, as the table prints, so JSON and table agree.
fn r2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The JSON fields of one job (or the total when `job.name == "Total"`), in SPDK's order:
/// identity, `percentage` for mixed workloads, status, `verify_range`, then the numbers.
pub fn json_fields(job: &JobReport) -> Vec<(&'static str, Value)> {
    let s = &job.summary;
    let mut fields = vec![
        ("job", json!(job.name)),
        ("core_mask", json!(format!("0x{}", job.core_mask))),
        ("workload", json!(job.workload.name())),
    ];
    if let Some(p) = job.rw_read_percent.filter(|_| job.workload.is_mixed()) {
        fields.push(("percentage", json!(p)));
    }
    fields.push(("status", json!(job.status())));
    if let Some((start, length)) = job.verify_range {
        fields.push(("verify_range", json!({"start": start, "length": length})));
    }
    fields.extend([
        ("queue_depth", json!(job.queue_depth)),
        ("io_size", json!(job.io_size_bytes)),
        ("runtime", json!(r2(s.runtime_secs))),
        ("iops", json!(r2(s.iops))),
        ("mibps", json!(r2(s.mibps))),
        ("io_failed", json!(s.nr_failed)),
        ("io_timeout", json!(s.nr_timeout)),
        ("avg_latency_us", json!(r2(s.latency_avg_us))),
        ("min_latency_us", json!(r2(s.latency_min_us))),
        ("max_latency_us", json!(r2(s.latency_max_us))),
        ("p50_us", json!(r2(s.latency_p50_us))),
        ("p99_us", json!(r2(s.latency_p99_us))),
        ("p999_us", json!(r2(s.latency_p999_us))),
    ]);
    if let Some(e) = &job.error {
        fields.push(("error", json!(e)));
    }
    fields
}

/// The JSON object of one job, as a `Value` (keys unordered).
pub fn json_value(job: &JobReport) -> Value {
    let map = json_fields(job)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    Value::Object(map)
}

/// The JSON line of one job, keys in [`json_fields`] order, no trailing newline.
pub fn json_line(job: &JobReport) -> String {
    let fields: Vec<String> = json_fields(job)
        .into_iter()
        .map(|(k, v)| format!("{}:{v}", Value::from(k)))
        .collect();
    format!("{{{}}}", fields.join(","))
}

/// One progress line: elapsed time and the rate since the previous line.
pub fn format_progress(elapsed_secs: f64, iops: f64, io_size_bytes: u64) -> String {
    format!(
        "Progress: {elapsed_secs:>7.2} s: {iops:>12.2} IOPS, {:>10.2} MiB/s",
        iops * io_size_bytes as f64 / (1024.0 * 1024.0)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str, workload: Workload) -> JobReport {
        JobReport {
            name: name.into(),
            core_mask: "1".into(),
            workload,
            rw_read_percent: Some(70),
            queue_depth: 128,
            io_size_bytes: 4096,
            verify_range: None,
            summary: Summary {
                runtime_secs: 1.0,
                iops: 1234567.891,
                mibps: 4822.53,
                latency_avg_us: 103.456,
                latency_min_us: 1.5,
                latency_max_us: 900.0,
                latency_p50_us: 100.0,
                latency_p99_us: 300.0,
                latency_p999_us: 800.0,
                ..Summary::default()
            },
            error: None,
            terminated: false,
        }
    }

    #[test]
    fn table_has_spdk_columns_and_total() {
        let jobs = [
            job("Malloc0", Workload::RandRead),
            job("Malloc1", Workload::RandRw),
        ];
        let total = Summary {
            iops: 2469135.78,
            ..jobs[0].summary
        };
        let t = format_table(&jobs, &total);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[1].trim_start().starts_with("Latency(us)"));
        assert_eq!(
            lines[2],
            " Device Information          : runtime(s)       IOPS      MiB/s     Fail/s     \
             TO/s    Average        min        max"
        );
        assert_eq!(
            lines[3],
            " Job: Malloc0 (Core Mask 0x1, workload: randread, depth: 128, IO size: 4096)"
        );
        assert_eq!(
            lines[4],
            "\t Malloc0             :       1.00 1234567.89    4822.53       0.00     0.00     \
             103.46       1.50     900.00"
        );
        assert!(lines[5].contains("percentage: 70, depth: 128"));
        assert!(lines[7].trim_start().starts_with("===="));
        assert!(lines[8].starts_with(" Total                       :            2469135.78"));
    }

    #[test]
    fn json_has_contract_keys() {
        let mut j = job("Malloc0", Workload::Verify);
        j.verify_range = Some((0, 256));
        let v = json_value(&j);
        for key in [
            "job",
            "core_mask",
            "workload",
            "queue_depth",
            "io_size",
            "runtime",
            "iops",
            "mibps",
            "io_failed",
            "io_timeout",
            "avg_latency_us",
            "min_latency_us",
            "max_latency_us",
            "p50_us",
            "p99_us",
            "p999_us",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["core_mask"], "0x1");
        assert_eq!(v["iops"], 1234567.89);
        assert_eq!(v["verify_range"]["length"], 256);
        assert!(v.get("percentage").is_none());
        let line = json_line(&j);
        assert!(!line.contains('\n'));
        assert!(line.starts_with("{\"job\":\"Malloc0\",\"core_mask\":\"0x1\",\"workload\""));
        let reparsed: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(reparsed, v);
    }
}
