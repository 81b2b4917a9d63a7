//! Command-line flags of `bdevperf`, parsed the way SPDK's bdevperf takes them.
//!
//! The parser is hand-written rather than derived so that every bad input produces exactly one
//! line of error text (the contract: one line on stderr, exit status 1, never a panic).
//! Values that depend on the bdevs (I/O size against block size, `-T` against the bdev list)
//! are checked later, once the config has created the bdevs.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::indexing_slicing))]

use std::fmt;
use std::path::PathBuf;

use crate::workload::Workload;

/// Largest queue depth a job accepts. Each slot owns one (two for verify) I/O buffers, so the
/// bound also bounds memory together with [`MAX_JOB_BUFFER_BYTES`].
pub const MAX_QUEUE_DEPTH: u32 = 4096;
/// Largest single I/O.
pub const MAX_IO_SIZE_BYTES: u64 = 64 * 1024 * 1024;
/// Upper bound on the buffer memory one job may pin (depth × size × buffers per slot).
pub const MAX_JOB_BUFFER_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// Longest run accepted by `-t`.
pub const MAX_TIME_SECS: f64 = 7.0 * 24.0 * 3600.0;
/// Runs at least this long print a progress line each second even without `-S`.
pub const AUTO_PROGRESS_MIN_SECS: f64 = 3.0;

/// Everything the command line says.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// `-q`: I/Os each job keeps in flight.
    pub queue_depth: u32,
    /// `-o`: bytes per I/O.
    pub io_size_bytes: u64,
    /// `-w`: the workload.
    pub workload: Workload,
    /// `-t`: run time in seconds.
    pub time_secs: f64,
    /// `-M`: percentage of reads for `rw`/`randrw`.
    pub rw_read_percent: Option<u32>,
    /// `-m`: reactor cores, ascending.
    pub cores: Vec<usize>,
    /// `-T`: run only on this bdev.
    pub only_bdev: Option<String>,
    /// `-C`: every core submits to every bdev (otherwise bdevs are dealt round-robin to cores).
    pub every_core_every_bdev: bool,
    /// `--json`: the JSON config that creates the bdevs.
    pub json_config: Option<PathBuf>,
    /// `-S`: progress interval in seconds; `None` means the default (each second on runs of
    /// [`AUTO_PROGRESS_MIN_SECS`] or more), `Some(0)` disables it.
    pub progress_interval_secs: Option<u64>,
    /// `--seed`: seed for random offsets and verify patterns (default: from the clock).
    pub seed: Option<u64>,
    /// Test-only (`--inject-corruption LBA`): in verify, after the write that covers LBA
    /// completes, overwrite that block with a foreign pattern before the read-back.
    pub inject_corruption_lba: Option<u64>,
}

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Run the benchmark.
    Run(Box<Options>),
    /// Print usage and exit 0.
    Help,
}

/// A command-line error; `Display` is the one-line message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError(pub String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CliError {}

fn err<T>(msg: impl Into<String>) -> Result<T, CliError> {
    Err(CliError(msg.into()))
}

/// The usage text printed by `-h`.
pub const USAGE: &str = "\
usage: bdevperf -q DEPTH -o SIZE -w WORKLOAD -t SECONDS [options]
  -q DEPTH      I/Os in flight per job (1..=4096)
  -o SIZE       bytes per I/O: 4096, 4k, 128K, 1M
  -w WORKLOAD   read, write, randread, randwrite, rw, randrw, verify, unmap, flush,
                write_zeroes
  -t SECONDS    run time
  -M PERCENT    reads in percent of all I/O, required for rw and randrw
  -m MASK       reactor core mask: 0x3, 3 or a list [0,1] (default 0x1)
  -T BDEV       run only on BDEV (default: every bdev in the config)
  -C            every core submits to every bdev (default: bdevs dealt to cores)
  -S SECONDS    print progress every SECONDS (0: never; default each second on runs >= 3 s)
  --json FILE   JSON config: {\"subsystems\":[{\"subsystem\":\"bdev\",\"config\":[...]}]}
  --seed N      seed of random offsets and verify patterns
  -h, --help    this text";

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
        if matches!(flag, "-h" | "--help" | "-C") && inline.is_some() {
            return err(format!("unknown option '{arg}' (see bdevperf -h)"));
        }
        if matches!(flag, "-h" | "--help") {
            return Ok(Command::Help);
        }
        if flag == "-C" {
            raw.every_core_every_bdev = true;
            continue;
        }
        if !takes_value(flag) {
            return err(format!("unknown option '{arg}' (see bdevperf -h)"));
        }
        let value = match inline {
            Some(v) => v.to_owned(),
            None => {
                let v = args
                    .get(i)
                    .ok_or_else(|| CliError(format!("{flag} needs a value")))?;
                i += 1;
                v.clone()
            }
        };
        raw.set(flag, value)?;
    }
    raw.finish().map(|o| Command::Run(Box::new(o)))
}

/// Splits `-q128`, `--json=x` into flag and inline value.
fn split_flag(arg: &str) -> (&str, Option<&str>) {
    if let Some(rest) = arg.strip_prefix("--") {
        return match rest.split_once('=') {
            Some((name, value)) => (&arg[..name.len() + 2], Some(value)),
            None => (arg, None),
        };
    }
    if arg.starts_with('-') && arg.len() > 2 && arg.is_char_boundary(2) {
        return (&arg[..2], Some(&arg[2..]));
    }
    (arg, None)
}

fn takes_value(flag: &str) -> bool {
    matches!(
        flag,
        "-q" | "-o"
            | "-w"
            | "-t"
            | "-M"
            | "-m"
            | "-T"
            | "-S"
            | "--json"
            | "-c"
            | "--seed"
            | "--inject-corruption"
    )
}

#[derive(Default)]
struct RawArgs {
    queue_depth: Option<String>,
    io_size: Option<String>,
    workload: Option<String>,
    time: Option<String>,
    rwmix: Option<String>,
    mask: Option<String>,
    only_bdev: Option<String>,
    every_core_every_bdev: bool,
    json: Option<String>,
    progress: Option<String>,
    seed: Option<String>,
    inject: Option<String>,
}

impl RawArgs {
    fn set(&mut self, flag: &str, value: String) -> Result<(), CliError> {
        let slot = match flag {
            "-q" => &mut self.queue_depth,
            "-o" => &mut self.io_size,
            "-w" => &mut self.workload,
            "-t" => &mut self.time,
            "-M" => &mut self.rwmix,
            "-m" => &mut self.mask,
            "-T" => &mut self.only_bdev,
            "-S" => &mut self.progress,
            // `-c` is SPDK's older spelling of the config file flag.
            "--json" | "-c" => &mut self.json,
            "--seed" => &mut self.seed,
            "--inject-corruption" => &mut self.inject,
            _ => return err(format!("unknown option '{flag}' (see bdevperf -h)")),
        };
        if slot.is_some() {
            return err(format!("{flag} given twice"));
        }
        *slot = Some(value);
        Ok(())
    }

    fn finish(self) -> Result<Options, CliError> {
        let queue_depth = parse_queue_depth(&required(self.queue_depth, "-q DEPTH")?)?;
        let io_size_bytes = parse_size(&required(self.io_size, "-o SIZE")?)?;
        let workload: Workload = required(self.workload, "-w WORKLOAD")?.parse()?;
        let time_secs = parse_time(&required(self.time, "-t SECONDS")?)?;
        let rw_read_percent = self.rwmix.as_deref().map(parse_percent).transpose()?;
        if workload.is_mixed() && rw_read_percent.is_none() {
            return err(format!(
                "-M PERCENT (0..=100) is required for -w {workload}"
            ));
        }
        let cores = match self.mask.as_deref() {
            Some(m) => parse_core_mask(m)?,
            None => vec![0],
        };
        let progress_interval_secs = self
            .progress
            .as_deref()
            .map(|s| parse_u64(s, "-S"))
            .transpose()?;
        let seed = self
            .seed
            .as_deref()
            .map(|s| parse_u64(s, "--seed"))
            .transpose()?;
        let inject_corruption_lba = self
            .inject
            .as_deref()
            .map(|s| parse_u64(s, "--inject-corruption"))
            .transpose()?;
        if inject_corruption_lba.is_some() && workload != Workload::Verify {
            return err("--inject-corruption needs -w verify");
        }
        let buffers = if workload == Workload::Verify { 2 } else { 1 };
        let pinned = u64::from(queue_depth) * io_size_bytes * buffers;
        if pinned > MAX_JOB_BUFFER_BYTES {
            return err(format!(
                "-q {queue_depth} x -o {io_size_bytes} needs {pinned} bytes of buffers per job; \
                 the limit is {MAX_JOB_BUFFER_BYTES}"
            ));
        }
        Ok(Options {
            queue_depth,
            io_size_bytes,
            workload,
            time_secs,
            rw_read_percent,
            cores,
            only_bdev: self.only_bdev,
            every_core_every_bdev: self.every_core_every_bdev,
            json_config: self.json.map(PathBuf::from),
            progress_interval_secs,
            seed,
            inject_corruption_lba,
        })
    }
}

fn required(value: Option<String>, what: &str) -> Result<String, CliError> {
    value.ok_or_else(|| CliError(format!("missing {what} (see bdevperf -h)")))
}

fn parse_u64(s: &str, flag: &str) -> Result<u64, CliError> {
    let t = s.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse::<u64>(),
    };
    parsed.map_err(|_| CliError(format!("{flag}: '{s}' is not a non-negative integer")))
}

fn parse_queue_depth(s: &str) -> Result<u32, CliError> {
    let depth = parse_u64(s, "-q")?;
    if depth == 0 || depth > u64::from(MAX_QUEUE_DEPTH) {
        return err(format!(
            "-q: queue depth {depth} is out of range 1..={MAX_QUEUE_DEPTH}"
        ));
    }
    u32::try_from(depth).map_err(|_| CliError(format!("-q: {depth} is too large")))
}

/// Parses an I/O size: plain bytes or a number with a binary suffix (k/K, m/M, g/G, optional
/// trailing `iB`/`B`).
pub fn parse_size(s: &str) -> Result<u64, CliError> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(digits_end);
    let bad = || {
        CliError(format!(
            "-o: '{s}' is not a size (examples: 4096, 4k, 128K, 1M)"
        ))
    };
    let number: u64 = digits.parse().map_err(|_| bad())?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(bad()),
    };
    let bytes = number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| CliError(format!("-o: '{s}' is too large")))?;
    if bytes == 0 {
        return err("-o: I/O size must be greater than zero");
    }
    if bytes > MAX_IO_SIZE_BYTES {
        return err(format!(
            "-o: {bytes} bytes exceeds the limit of {MAX_IO_SIZE_BYTES}"
        ));
    }
    Ok(bytes)
}

fn parse_time(s: &str) -> Result<f64, CliError> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| CliError(format!("-t: '{s}' is not a number of seconds")))?;
    if !secs.is_finite() || secs <= 0.0 || secs > MAX_TIME_SECS {
        return err(format!("-t: {s} is out of range (0, {MAX_TIME_SECS}]"));
    }
    Ok(secs)
}

fn parse_percent(s: &str) -> Result<u32, CliError> {
    let p = parse_u64(s, "-M")?;
    if p > 100 {
        return err(format!("-M: {p} is not a percentage (0..=100)"));
    }
    u32::try_from(p).map_err(|_| CliError(format!("-M: {p} is too large")))
}

/// Largest core number a mask may name.
pub const MAX_CORE: usize = 1023;

/// Parses a core mask: hex with or without `0x` (`0x3`, `3`) or a list `[0,2-3]`.
pub fn parse_core_mask(s: &str) -> Result<Vec<usize>, CliError> {
    let t = s.trim();
    let mut cores = Vec::new();
    if let Some(list) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        for part in list.split(',') {
            let bad = || CliError(format!("-m: '{part}' in '{s}' is not a core or range"));
            let (lo, hi) = match part.trim().split_once('-') {
                Some((a, b)) => (a.trim().parse::<usize>(), b.trim().parse::<usize>()),
                None => (part.trim().parse::<usize>(), part.trim().parse::<usize>()),
            };
            let (lo, hi) = (lo.map_err(|_| bad())?, hi.map_err(|_| bad())?);
            if lo > hi || hi > MAX_CORE {
                return Err(bad());
            }
            cores.extend(lo..=hi);
        }
    } else {
        let hex = t
            .strip_prefix("0x")
            .or_else(|| t.strip_prefix("0X"))
            .unwrap_or(t);
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return err(format!(
                "-m: '{s}' is not a core mask (examples: 0x3, [0,1])"
            ));
        }
        for (nibble_index, c) in hex.chars().rev().enumerate() {
            let nibble = c.to_digit(16).unwrap_or(0);
            for bit in 0..4 {
                if nibble & (1 << bit) != 0 {
                    let core = nibble_index * 4 + bit;
                    if core > MAX_CORE {
                        return err(format!("-m: core {core} in '{s}' is beyond {MAX_CORE}"));
                    }
                    cores.push(core);
                }
            }
        }
    }
    cores.sort_unstable();
    cores.dedup();
    if cores.is_empty() {
        return err(format!("-m: '{s}' selects no core"));
    }
    Ok(cores)
}

/// Formats cores as SPDK prints a mask: lowercase hex without `0x`.
pub fn format_core_mask(cores: &[usize]) -> String {
    let Some(&max) = cores.iter().max() else {
        return "0".to_owned();
    };
    let mut nibbles = vec![0u8; max / 4 + 1];
    for &c in cores {
        if let Some(n) = nibbles.get_mut(c / 4) {
            *n |= 1 << (c % 4);
        }
    }
    nibbles
        .iter()
        .rev()
        .map(|n| char::from_digit(u32::from(*n), 16).unwrap_or('0'))
        .collect()
}

#[cfg(test)]
mod tests;
