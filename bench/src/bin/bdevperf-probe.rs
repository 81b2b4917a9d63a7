//! `bdevperf-probe`: machine baselines the benchmark scripts print next to bdevperf's numbers.
//!
//! - `bdevperf-probe memcpy SIZE SECONDS`: single-thread memcpy bandwidth (bytes/s) copying
//!   SIZE-byte blocks from a source larger than the last-level cache into one destination,
//!   the shape of a malloc bdev read (bdev memory → I/O buffer).
//! - `bdevperf-probe clock`: cost of the latency clock (`ticks()`) and of `Instant::now()`.
//!
//! Output is one JSON line, so scripts parse it with `python3 -c` or `jq`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use bench::cli::parse_size;
use bench::clock;

/// Source region: well beyond a last-level cache, so copies stream from memory as a malloc
/// bdev's random reads do.
const SOURCE_BYTES: usize = 1 << 30;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    match argv.as_slice() {
        ["memcpy", size, secs] => match (parse_size(size), secs.parse::<f64>()) {
            (Ok(size), Ok(secs)) if secs > 0.0 && secs < 3600.0 => {
                memcpy(size as usize, Duration::from_secs_f64(secs));
                ExitCode::SUCCESS
            }
            _ => usage("memcpy needs SIZE (e.g. 4k) and SECONDS (> 0)"),
        },
        ["clock"] => {
            let (tick_ns, instant_ns) = clock::measure_cost_ns(10_000_000);
            println!(
                "{{\"probe\":\"clock\",\"uses_tsc\":{},\"ticks_ns\":{tick_ns:.2},\
                 \"instant_now_ns\":{instant_ns:.2}}}",
                clock::uses_tsc()
            );
            ExitCode::SUCCESS
        }
        _ => usage("usage: bdevperf-probe memcpy SIZE SECONDS | bdevperf-probe clock"),
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("bdevperf-probe: {msg}");
    ExitCode::FAILURE
}

fn memcpy(size: usize, duration: Duration) {
    let size = size.min(SOURCE_BYTES);
    let src: Vec<u8> = (0..SOURCE_BYTES)
        .map(|i| (i as u8).wrapping_mul(31))
        .collect();
    let mut dst = vec![0u8; size];
    let nr_slots = SOURCE_BYTES / size;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut nr_copies: u64 = 0;
    let start = Instant::now();
    let mut elapsed = Duration::ZERO;
    while elapsed < duration {
        for _ in 0..64 {
            // xorshift: random source offsets, as randread on a malloc bdev.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let slot = (x % nr_slots as u64) as usize;
            let from = slot * size;
            if let Some(chunk) = src.get(from..from + size) {
                dst.copy_from_slice(chunk);
            }
            std::hint::black_box(&mut dst);
        }
        nr_copies += 64;
        elapsed = start.elapsed();
    }
    let bytes = nr_copies as f64 * size as f64;
    let secs = elapsed.as_secs_f64();
    println!(
        "{{\"probe\":\"memcpy\",\"size\":{size},\"seconds\":{secs:.3},\"bytes_per_sec\":{:.0},\
         \"mib_per_sec\":{:.2},\"copies_per_sec\":{:.0}}}",
        bytes / secs,
        bytes / secs / 1048576.0,
        nr_copies as f64 / secs
    );
}
