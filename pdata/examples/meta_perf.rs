//! Rough metadata throughput numbers on an in-memory device:
//! `cargo run --release -p pdata --example meta_perf -- [nr_mappings] [cache_blocks]`.
//! Prints insert, commit, reopen and lookup timings.

use std::time::Instant;

use pdata::thin::{CacheOpts, DevId, PoolMetadata, ThinBlock};
use pdata::MemBlockIo;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let cache: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(16_384);
    let opts = CacheOpts {
        nr_cache_blocks: cache,
    };
    let meta_blocks = (n / 100 + 4096).min(4_161_600);
    let io = MemBlockIo::new(meta_blocks);
    let mut pmd = PoolMetadata::format(Box::new(io.clone()), 128, n + 1000, opts)?;
    pmd.create_thin(DevId(1))?;
    let t = Instant::now();
    let mut last_commit = Instant::now();
    let mut commit_time = 0.0;
    for v in 0..n {
        let d = pmd.alloc_data_block()?;
        pmd.insert_block(DevId(1), ThinBlock(v), d)?;
        if v % 100_000 == 99_999 {
            let c = Instant::now();
            pmd.commit()?;
            commit_time += c.elapsed().as_secs_f64();
            last_commit = Instant::now();
        }
    }
    let _ = last_commit;
    let c = Instant::now();
    pmd.commit()?;
    commit_time += c.elapsed().as_secs_f64();
    let ins = t.elapsed().as_secs_f64();
    println!(
        "insert {n} sequential mappings: {:.2} s ({:.0} ns/mapping, of which commits {:.2} s)",
        ins,
        ins * 1e9 / n as f64,
        commit_time
    );
    println!(
        "metadata used: {} blocks",
        pmd.metadata_nr_blocks() - pmd.metadata_nr_free()
    );
    drop(pmd);
    let t = Instant::now();
    let mut pmd = PoolMetadata::open(Box::new(io.clone()), 128, opts)?;
    println!(
        "open: {:.3} ms, {:?}",
        t.elapsed().as_secs_f64() * 1e3,
        pmd.cache_stats()
    );
    let t = Instant::now();
    let mut x = 0x9E37_79B9u64;
    let nr_lookups = 1_000_000u64;
    for _ in 0..nr_lookups {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = x % n;
        if pmd.find_block(DevId(1), ThinBlock(v))?.is_none() {
            return Err(format!("block {v} unmapped").into());
        }
    }
    let lk = t.elapsed().as_secs_f64();
    println!(
        "random lookups: {:.0} ns/lookup, {:?}",
        lk * 1e9 / nr_lookups as f64,
        pmd.cache_stats()
    );
    let t = Instant::now();
    let removed = pmd.remove_range(DevId(1), ThinBlock(0), ThinBlock(n / 10))?;
    pmd.commit()?;
    println!(
        "remove_range of {removed}: {:.0} ns/mapping",
        t.elapsed().as_secs_f64() * 1e9 / removed as f64
    );
    let t = Instant::now();
    pmd.create_snap(DevId(2), DevId(1))?;
    pmd.delete_thin(DevId(1))?;
    pmd.commit()?;
    println!(
        "snapshot + delete origin: {:.3} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    pmd.delete_thin(DevId(2))?;
    pmd.commit()?;
    println!(
        "delete {} mappings: {:.2} s",
        n - removed,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
