//! Command-line flags of `vhost-blk-perf`, in bdevperf's spelling where bdevperf has the flag.
//!
//! Hand-written so that every bad input gives exactly one line of error text. Values that
//! depend on the device (I/O size against its block size, the range against its capacity) are
//! checked once the backend has answered GET_CONFIG.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::indexing_slicing))]

use std::path::PathBuf;

/// Largest queue size a split ring may have (virtio; QEMU's VIRTQUEUE_MAX_SIZE).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Descriptors per request: header, data, status.
pub const DESCS_PER_IO: u32 = 3;
/// Deepest queue: every request owns three descriptors of a ring of at most 1024.
pub const MAX_QUEUE_DEPTH: u32 = MAX_QUEUE_SIZE as u32 / DESCS_PER_IO;
/// Most queues one run drives (the rings are polled round-robin by one thread).
pub const MAX_QUEUES: u16 = 16;
/// Largest single I/O.
pub const MAX_IO_SIZE_BYTES: u64 = 16 << 20;
/// Upper bound on the guest memory the data buffers take (depth × size × queues).
pub const MAX_DATA_BYTES: u64 = 1 << 30;
/// Longest run accepted by `-t`.
pub const MAX_TIME_SECS: f64 = 24.0 * 3600.0;

/// What each request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Reads at random aligned offsets.
    RandRead,
    /// Writes at random aligned offsets.
    RandWrite,
    /// Random writes of a stamped pattern, each read back and compared.
    Verify,
}

impl Workload {
    /// The `-w` spelling.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::RandRead => "randread",
            Workload::RandWrite => "randwrite",
            Workload::Verify => "verify",
        }
    }

    fn parse(s: &str) -> Option<Workload> {
        [
            Workload::Read,
            Workload::Write,
            Workload::RandRead,
            Workload::RandWrite,
            Workload::Verify,
        ]
        .into_iter()
        .find(|w| w.name() == s)
    }

    /// Whether offsets advance sequentially.
    pub fn is_sequential(self) -> bool {
        matches!(self, Workload::Read | Workload::Write)
    }

    /// Whether the workload writes (and so needs a writable device).
    pub fn writes(self) -> bool {
        !matches!(self, Workload::Read | Workload::RandRead)
    }
}

/// Everything the command line says.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// `--socket`: the vhost-user-blk backend's Unix socket.
    pub socket: PathBuf,
    /// `-q`: requests in flight on each queue.
    pub queue_depth: u32,
    /// `-o`: bytes per request.
    pub io_size_bytes: u64,
    /// `-w`: the workload.
    pub workload: Workload,
    /// `-t`: run time in seconds.
    pub time_secs: f64,
    /// `--queues`: virtqueues driven (round-robin by one thread).
    pub nr_queues: u16,
    /// `--queue-size`: ring entries; default the smallest power of two holding 3 × depth.
    pub queue_size: Option<u16>,
    /// `--core`: CPU the driver thread is pinned to.
    pub core: Option<usize>,
    /// `--event-idx`: negotiate VIRTIO_RING_F_EVENT_IDX (an error if the backend lacks it).
    pub event_idx: bool,
    /// `--range-mib`: use only the first N MiB of the device.
    pub range_mib: Option<u64>,
    /// `--one-pass`: sequential workloads stop after covering the range once.
    pub one_pass: bool,
    /// `--seed`: seed of offsets and patterns (default: from the clock).
    pub seed: Option<u64>,
    /// `--io-timeout`: seconds without any completion after which the run fails.
    pub io_timeout_secs: f64,
}

impl Options {
    /// Ring entries per queue.
    pub fn ring_size(&self) -> u16 {
        match self.queue_size {
            Some(n) => n,
            None => {
                let need = (self.queue_depth * DESCS_PER_IO).next_power_of_two().max(8);
                u16::try_from(need).unwrap_or(MAX_QUEUE_SIZE)
            }
        }
    }
}

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Run the benchmark.
    Run(Box<Options>),
    /// Print usage and exit 0.
    Help,
}

/// The usage text printed by `-h`.
pub const USAGE: &str = "\
usage: vhost-blk-perf --socket PATH -q DEPTH -w WORKLOAD -t SECONDS [options]
  --socket PATH     vhost-user-blk backend socket (thind -S DIR: DIR/CTRLR)
  -q DEPTH          requests in flight per queue (1..=341: 3 descriptors each, ring <= 1024)
  -o SIZE           bytes per request: 4096, 4k, 128K, 1M (default 4096)
  -w WORKLOAD       read, write, randread, randwrite, verify
  -t SECONDS        run time
  --queues N        virtqueues, polled round-robin by one thread (default 1)
  --queue-size N    ring entries, a power of two (default: smallest holding 3 x DEPTH)
  --core N          pin the driver to CPU N
  --event-idx       negotiate VIRTIO_RING_F_EVENT_IDX
  --range-mib N     use only the first N MiB of the device
  --one-pass        read/write: stop once the range is covered
  --seed N          seed of random offsets and verify patterns
  --io-timeout S    fail when nothing completes for S seconds (default 10)
  -h, --help        this text";

/// A command-line error: the one-line message.
pub type CliError = String;

/// Parses the arguments after the program name.
pub fn parse_args<I, S>(args: I) -> Result<Command, CliError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let args: Vec<String> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let mut raw = RawArgs::default();
    let mut i = 0;
    while let Some(arg) = args.get(i) {
        i += 1;
        let (flag, inline) = split_flag(arg);
        let is_switch = matches!(flag, "-h" | "--help" | "--event-idx" | "--one-pass");
        if is_switch && inline.is_some() {
            return Err(format!("unknown option '{arg}' (see vhost-blk-perf -h)"));
        }
        match flag {
            "-h" | "--help" => return Ok(Command::Help),
            "--event-idx" => raw.event_idx = true,
            "--one-pass" => raw.one_pass = true,
            _ if takes_value(flag) => {
                let value = match inline {
                    Some(v) => v.to_owned(),
                    None => {
                        let v = args.get(i).ok_or_else(|| format!("{flag} needs a value"))?;
                        i += 1;
                        v.clone()
                    }
                };
                raw.set(flag, value)?;
            }
            _ => return Err(format!("unknown option '{arg}' (see vhost-blk-perf -h)")),
        }
    }
    raw.finish().map(|o| Command::Run(Box::new(o)))
}

/// Splits `-q128`, `--socket=x` into flag and inline value.
fn split_flag(arg: &str) -> (&str, Option<&str>) {
    if let Some(rest) = arg.strip_prefix("--") {
        return match rest.split_once('=') {
            Some((name, value)) => (arg.get(..name.len() + 2).unwrap_or(arg), Some(value)),
            None => (arg, None),
        };
    }
    if arg.starts_with('-') && arg.len() > 2 && arg.is_char_boundary(2) {
        if let (Some(flag), Some(value)) = (arg.get(..2), arg.get(2..)) {
            return (flag, Some(value));
        }
    }
    (arg, None)
}

fn takes_value(flag: &str) -> bool {
    matches!(
        flag,
        "-q" | "-o"
            | "-w"
            | "-t"
            | "--socket"
            | "--queues"
            | "--queue-size"
            | "--core"
            | "--range-mib"
            | "--seed"
            | "--io-timeout"
    )
}

#[derive(Default)]
struct RawArgs {
    socket: Option<String>,
    queue_depth: Option<String>,
    io_size: Option<String>,
    workload: Option<String>,
    time: Option<String>,
    queues: Option<String>,
    queue_size: Option<String>,
    core: Option<String>,
    range_mib: Option<String>,
    seed: Option<String>,
    io_timeout: Option<String>,
    event_idx: bool,
    one_pass: bool,
}

impl RawArgs {
    fn set(&mut self, flag: &str, value: String) -> Result<(), CliError> {
        let slot = match flag {
            "--socket" => &mut self.socket,
            "-q" => &mut self.queue_depth,
            "-o" => &mut self.io_size,
            "-w" => &mut self.workload,
            "-t" => &mut self.time,
            "--queues" => &mut self.queues,
            "--queue-size" => &mut self.queue_size,
            "--core" => &mut self.core,
            "--range-mib" => &mut self.range_mib,
            "--seed" => &mut self.seed,
            "--io-timeout" => &mut self.io_timeout,
            _ => return Err(format!("unknown option '{flag}' (see vhost-blk-perf -h)")),
        };
        if slot.is_some() {
            return Err(format!("{flag} given twice"));
        }
        *slot = Some(value);
        Ok(())
    }

    fn finish(self) -> Result<Options, CliError> {
        let socket = self.socket.ok_or("--socket PATH is required")?;
        if socket.is_empty() {
            return Err("--socket: empty path".into());
        }
        let queue_depth = int_in("-q", self.queue_depth.as_deref(), 1, MAX_QUEUE_DEPTH.into())?;
        let io_size_bytes = match self.io_size.as_deref() {
            Some(s) => parse_size(s).ok_or_else(|| format!("-o: bad size '{s}'"))?,
            None => 4096,
        };
        if io_size_bytes == 0
            || !io_size_bytes.is_multiple_of(512)
            || io_size_bytes > MAX_IO_SIZE_BYTES
        {
            return Err(format!(
                "-o {io_size_bytes}: must be a multiple of 512 between 512 and {MAX_IO_SIZE_BYTES}"
            ));
        }
        let workload = match self.workload.as_deref() {
            None => return Err("-w WORKLOAD is required".into()),
            Some(w) => Workload::parse(w).ok_or_else(|| {
                format!("-w: unknown workload '{w}' (read, write, randread, randwrite, verify)")
            })?,
        };
        let time_secs = secs("-t", self.time.as_deref(), None)?;
        let nr_queues = int_in(
            "--queues",
            Some(self.queues.as_deref().unwrap_or("1")),
            1,
            MAX_QUEUES.into(),
        )?;
        let queue_size = match self.queue_size.as_deref() {
            None => None,
            Some(s) => Some(int_in("--queue-size", Some(s), 1, MAX_QUEUE_SIZE.into())?),
        };
        let opts = Options {
            socket: PathBuf::from(socket),
            queue_depth: u32::try_from(queue_depth).map_err(|e| e.to_string())?,
            io_size_bytes,
            workload,
            time_secs,
            nr_queues: u16::try_from(nr_queues).map_err(|e| e.to_string())?,
            queue_size: queue_size
                .map(u16::try_from)
                .transpose()
                .map_err(|e| e.to_string())?,
            core: optional_int("--core", self.core.as_deref(), 1023)?
                .map(usize::try_from)
                .transpose()
                .map_err(|e| e.to_string())?,
            event_idx: self.event_idx,
            range_mib: optional_int("--range-mib", self.range_mib.as_deref(), u64::MAX >> 20)?,
            one_pass: self.one_pass,
            seed: optional_int("--seed", self.seed.as_deref(), u64::MAX)?,
            io_timeout_secs: secs("--io-timeout", self.io_timeout.as_deref(), Some(10.0))?,
        };
        check(&opts)?;
        Ok(opts)
    }
}

/// Cross-flag checks that need no device.
fn check(o: &Options) -> Result<(), CliError> {
    let ring = o.ring_size();
    if !ring.is_power_of_two() {
        return Err(format!("--queue-size {ring}: must be a power of two"));
    }
    if u32::from(ring) < o.queue_depth * DESCS_PER_IO {
        return Err(format!(
            "--queue-size {ring}: depth {} needs {} descriptors (3 per request)",
            o.queue_depth,
            o.queue_depth * DESCS_PER_IO
        ));
    }
    let data = o.io_size_bytes * u64::from(o.queue_depth) * u64::from(o.nr_queues);
    if data > MAX_DATA_BYTES {
        return Err(format!(
            "-q x -o x --queues = {data} bytes of buffers, above the {MAX_DATA_BYTES} limit"
        ));
    }
    if o.one_pass && !o.workload.is_sequential() {
        return Err("--one-pass needs a sequential workload (read or write)".into());
    }
    if o.range_mib == Some(0) {
        return Err("--range-mib: must be at least 1".into());
    }
    Ok(())
}

fn int_in(flag: &str, v: Option<&str>, min: u64, max: u64) -> Result<u64, CliError> {
    let s = v.ok_or_else(|| format!("{flag} is required"))?;
    let n: u64 = s
        .parse()
        .map_err(|_| format!("{flag}: '{s}' is not a number"))?;
    if n < min || n > max {
        return Err(format!("{flag} {n}: must be between {min} and {max}"));
    }
    Ok(n)
}

fn optional_int(flag: &str, v: Option<&str>, max: u64) -> Result<Option<u64>, CliError> {
    v.map(|s| int_in(flag, Some(s), 0, max)).transpose()
}

fn secs(flag: &str, v: Option<&str>, default: Option<f64>) -> Result<f64, CliError> {
    let Some(s) = v else {
        return default.ok_or_else(|| format!("{flag} SECONDS is required"));
    };
    let t: f64 = s
        .parse()
        .map_err(|_| format!("{flag}: '{s}' is not a number of seconds"))?;
    if !t.is_finite() || t <= 0.0 || t > MAX_TIME_SECS {
        return Err(format!(
            "{flag} {s}: must be above 0 and at most {MAX_TIME_SECS}"
        ));
    }
    Ok(t)
}

/// `4096`, `4k`, `4K`, `128k`, `1m`, `1M` → bytes.
fn parse_size(s: &str) -> Option<u64> {
    let (digits, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (s.get(..i)?, 1u64 << 10),
        (i, 'm' | 'M') => (s.get(..i)?, 1 << 20),
        _ => (s, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Options {
        match parse_args(args).expect("parses") {
            Command::Run(o) => *o,
            Command::Help => panic!("help"),
        }
    }

    fn fails(args: &[&str], needle: &str) {
        let e = parse_args(args).expect_err("should fail");
        assert!(e.contains(needle), "{e:?} lacks {needle:?}");
        assert!(!e.contains('\n'), "one line: {e:?}");
    }

    const BASE: [&str; 8] = ["--socket", "/s", "-q", "128", "-w", "randread", "-t", "5"];

    #[test]
    fn parses_bdevperf_style_flags() {
        let o = run(&BASE);
        assert_eq!(o.socket, PathBuf::from("/s"));
        assert_eq!(o.queue_depth, 128);
        assert_eq!(o.io_size_bytes, 4096);
        assert_eq!(o.workload, Workload::RandRead);
        assert_eq!(o.ring_size(), 512);
        assert_eq!(o.nr_queues, 1);
        assert_eq!(o.io_timeout_secs, 10.0);
        let o = run(&[
            "--socket=/x",
            "-q1",
            "-o",
            "128K",
            "-wverify",
            "-t0.5",
            "--core",
            "1",
            "--queues",
            "2",
            "--event-idx",
            "--seed",
            "7",
            "--queue-size",
            "64",
        ]);
        assert_eq!(o.io_size_bytes, 128 << 10);
        assert_eq!(o.workload, Workload::Verify);
        assert_eq!(o.time_secs, 0.5);
        assert_eq!(o.core, Some(1));
        assert_eq!(o.nr_queues, 2);
        assert!(o.event_idx);
        assert_eq!(o.seed, Some(7));
        assert_eq!(o.ring_size(), 64);
        assert_eq!(
            run(&["--socket", "/s", "-q", "1", "-w", "read", "-t", "1"]).ring_size(),
            8
        );
        assert_eq!(parse_args(["-h"]), Ok(Command::Help));
    }

    #[test]
    fn bad_flags_are_one_line_errors() {
        fails(&["-q", "1", "-w", "read", "-t", "1"], "--socket");
        fails(
            &["--socket", "/s", "-w", "read", "-t", "1"],
            "-q is required",
        );
        fails(
            &["--socket", "/s", "-q", "342", "-w", "read", "-t", "1"],
            "between 1 and 341",
        );
        fails(
            &["--socket", "/s", "-q", "0", "-w", "read", "-t", "1"],
            "between",
        );
        fails(
            &["--socket", "/s", "-q", "x", "-w", "read", "-t", "1"],
            "not a number",
        );
        fails(
            &["--socket", "/s", "-q", "1", "-w", "rw", "-t", "1"],
            "unknown workload",
        );
        fails(&["--socket", "/s", "-q", "1", "-w", "read"], "-t SECONDS");
        fails(
            &["--socket", "/s", "-q", "1", "-w", "read", "-t", "0"],
            "above 0",
        );
        fails(
            &["--socket", "/s", "-q", "1", "-w", "read", "-t", "nan"],
            "above 0",
        );
        fails(
            &[
                "--socket", "/s", "-q", "1", "-w", "read", "-t", "1", "-o", "1000",
            ],
            "512",
        );
        fails(
            &[
                "--socket", "/s", "-q", "1", "-w", "read", "-t", "1", "-o", "4q",
            ],
            "bad size",
        );
        fails(
            &[
                "--socket",
                "/s",
                "-q",
                "8",
                "-w",
                "read",
                "-t",
                "1",
                "--queue-size",
                "16",
            ],
            "needs 24 descriptors",
        );
        fails(
            &[
                "--socket",
                "/s",
                "-q",
                "1",
                "-w",
                "read",
                "-t",
                "1",
                "--queue-size",
                "12",
            ],
            "power of two",
        );
        fails(
            &[
                "--socket",
                "/s",
                "-q",
                "1",
                "-w",
                "randread",
                "-t",
                "1",
                "--one-pass",
            ],
            "sequential",
        );
        fails(
            &[
                "--socket", "/s", "-q", "300", "-w", "read", "-t", "1", "-o", "16M",
            ],
            "limit",
        );
        fails(&["--socket", "/s", "--socket", "/t"], "given twice");
        fails(&["--bogus"], "unknown option");
        fails(&["--event-idx=1"], "unknown option");
        fails(&["--socket"], "needs a value");
        fails(
            &[
                "--socket", "/s", "-q", "1", "-w", "read", "-t", "1", "--queues", "17",
            ],
            "16",
        );
    }
}
