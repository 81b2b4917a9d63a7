//! Scale benchmark of `pdata::thin::PoolMetadata` (not a test): builds a pool with N mappings
//! (default 10 million) on a metadata file and prints insert rate, lookup rate for cache hits
//! and misses, commit time, open time and peak RSS (`VmHWM`).
//!
//! ```text
//! cargo run --release -p pdata --example scale -- [--mappings N] [--cache-blocks C]
//!     [--devices D] [--commit-every N] [--file PATH]
//! ```
//!
//! Open time is measured on the full pool and on a small pool in the same run (it must not
//! grow with the number of mappings); run once per cache size to see memory follow the cache
//! (peak RSS is per process).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pdata::thin::{CacheOpts, DevId, PoolMetadata, ThinBlock};
use pdata::FileBlockIo;

struct Args {
    mappings: u64,
    commit_every: u64,
    cache_blocks: usize,
    devices: u64,
    file: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        mappings: 10_000_000,
        commit_every: 1_000_000,
        cache_blocks: 4096,
        devices: 4,
        file: std::env::temp_dir().join("pdata-scale.meta"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let val = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = || val.parse::<u64>().map_err(|e| format!("{flag} {val}: {e}"));
        match flag.as_str() {
            "--mappings" => a.mappings = num()?,
            "--commit-every" => a.commit_every = num()?.max(1),
            "--cache-blocks" => a.cache_blocks = num()? as usize,
            "--devices" => a.devices = num()?.max(1),
            "--file" => a.file = PathBuf::from(&val),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

/// splitmix64: reproducible random lookups without the `testing` feature.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n.max(1)
    }
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn open_file(path: &PathBuf, nr_blocks: u64, create: bool) -> Res<Box<FileBlockIo>> {
    if create {
        let f = std::fs::File::create(path)?;
        f.set_len(nr_blocks * 4096)?;
    }
    Ok(Box::new(FileBlockIo::open(path)?))
}

/// Builds a pool of `mappings` mappings over `devices` devices; returns insert and final
/// commit durations.
fn build(a: &Args, path: &PathBuf, mappings: u64, opts: CacheOpts) -> Res<(Duration, Duration)> {
    // Device sizes depend on the full run's mapping count only, so the small pool used as
    // the open-time baseline has the same metadata and data devices as the big one.
    let meta_blocks = (a.mappings / 60).max(4096);
    let nr_data_blocks = a.mappings + a.mappings / 4 + 1024;
    let io = open_file(path, meta_blocks, true)?;
    let mut m = PoolMetadata::format(io, 128, nr_data_blocks, opts)?;
    let per_dev = mappings.div_ceil(a.devices);
    let t = Instant::now();
    let mut done = 0u64;
    for d in 0..a.devices {
        m.create_thin(DevId(d))?;
        for v in 0..per_dev.min(mappings - done) {
            let b = m.alloc_data_block()?;
            m.insert_block(DevId(d), ThinBlock(v), b)?;
            done += 1;
            if done.is_multiple_of(a.commit_every) {
                m.commit()?;
                eprintln!("  {done} mappings, peak RSS {} MiB", peak_rss_kib() / 1024);
            }
        }
    }
    let inserts = t.elapsed();
    let t = Instant::now();
    m.commit()?;
    Ok((inserts, t.elapsed()))
}

/// Opens the pool five times and returns the fastest open (warm page cache) and the pool.
fn time_open(path: &PathBuf, opts: CacheOpts) -> Res<(Duration, PoolMetadata)> {
    let mut best = Duration::MAX;
    for _ in 0..4 {
        let io = open_file(path, 0, false)?;
        let t = Instant::now();
        drop(PoolMetadata::open(io, 128, opts)?);
        best = best.min(t.elapsed());
    }
    let io = open_file(path, 0, false)?;
    let t = Instant::now();
    let m = PoolMetadata::open(io, 128, opts)?;
    Ok((best.min(t.elapsed()), m))
}

fn lookups(m: &mut PoolMetadata, a: &Args, per_dev: u64, hot: bool, n: u64) -> Res<Duration> {
    let mut rng = Rng(7);
    // Hot: 256 blocks of one device, far fewer metadata blocks than the cache holds.
    let t = Instant::now();
    for _ in 0..n {
        let (d, v) = if hot {
            (0, rng.below(256))
        } else {
            (rng.below(a.devices), rng.below(per_dev))
        };
        let got = m.find_block(DevId(d), ThinBlock(v))?;
        if got.is_none() {
            return Err(format!("mapping {d}/{v} missing").into());
        }
    }
    Ok(t.elapsed())
}

fn main() -> Res<()> {
    let a = parse_args()?;
    let opts = CacheOpts {
        nr_cache_blocks: a.cache_blocks,
    };
    println!(
        "pdata scale: {} mappings on {} devices, cache {} blocks ({} MiB), file {}",
        a.mappings,
        a.devices,
        a.cache_blocks,
        (a.cache_blocks * 4096) >> 20,
        a.file.display()
    );
    // A small pool first: its open time is the baseline.
    let small = a.file.with_extension("small");
    build(&a, &small, 100_000, opts)?;
    let (open_small, _) = time_open(&small, opts)?;
    std::fs::remove_file(&small)?;
    let rss_small = peak_rss_kib();

    let (inserts, commit) = build(&a, &a.file, a.mappings, opts)?;
    let rss_build = peak_rss_kib();
    let (open_big, mut m) = time_open(&a.file, opts)?;
    let per_dev = a.mappings.div_ceil(a.devices);
    let n_miss = 200_000;
    let miss = lookups(&mut m, &a, per_dev, false, n_miss)?;
    let n_hit = 2_000_000;
    let hit = lookups(&mut m, &a, per_dev, true, n_hit)?;
    let size = std::fs::metadata(&a.file)?.len();
    drop(m);
    std::fs::remove_file(&a.file)?;
    println!(
        "inserts/s (alloc + insert):        {:>12.0}",
        rate(a.mappings, inserts)
    );
    println!(
        "final commit:                      {:>12.3} ms",
        commit.as_secs_f64() * 1e3
    );
    println!(
        "lookups/s, cache hit:              {:>12.0}",
        rate(n_hit, hit)
    );
    println!(
        "lookups/s, cache miss (random):    {:>12.0}",
        rate(n_miss, miss)
    );
    println!(
        "open, 100k-mapping pool:           {:>12.3} ms",
        open_small.as_secs_f64() * 1e3
    );
    println!(
        "open, {}-mapping pool:       {:>12.3} ms",
        a.mappings,
        open_big.as_secs_f64() * 1e3
    );
    println!(
        "peak RSS after the 100k pool:      {:>12} MiB",
        rss_small / 1024
    );
    println!(
        "peak RSS after build:              {:>12} MiB",
        rss_build / 1024
    );
    println!(
        "peak RSS at end:                   {:>12} MiB",
        peak_rss_kib() / 1024
    );
    println!("metadata file size:                {:>12} MiB", size >> 20);
    Ok(())
}
