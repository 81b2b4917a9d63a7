//! Interrupt-mode measurements: an idle reactor costs (almost) no CPU and wakes quickly on a
//! message. The machine is small and shared, so the numbers are printed and the bounds are
//! those of the contract (under 1% of a core idle; median wake-up under 100 µs), with the
//! wake-up measured over several samples and retried a few rounds before failing.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use reactor::{CoreMask, PollStatus, ReactorId, Runtime, RuntimeOptions};

const R0: ReactorId = ReactorId::new(0);

fn interrupt_runtime() -> Runtime {
    let mut opts = RuntimeOptions::new(CoreMask::from_cores([0]).unwrap());
    opts.interrupt_mode = true;
    opts.pin_threads = false;
    Runtime::start(opts, || {}).expect("runtime starts")
}

/// An idle reactor — with a far timer and a 100 ms periodic poller registered — uses under
/// 1% of a core over 1.5 s, measured from /proc/self/task/<tid>/stat (utime + stime).
#[test]
fn idle_reactor_uses_under_one_percent_cpu() {
    let runtime = interrupt_runtime();
    let h = runtime.handle();
    h.call(R0, || {
        reactor::after(Duration::from_secs(3600), || panic!("far timer fired"));
        reactor::register_periodic_poller("slow", Duration::from_millis(100), || PollStatus::Idle);
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let before = h.stats()[0].clone();
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let after = h.stats()[0].clone();
    let wall = start.elapsed();
    let cpu = after.cpu_time.saturating_sub(before.cpu_time);
    let ticks = (after.busy_ticks + after.idle_ticks) - (before.busy_ticks + before.idle_ticks);
    let runs = h
        .call(R0, || reactor::poller::pollers()[0].nr_runs)
        .unwrap();
    eprintln!(
        "idle reactor: cpu {:?} over {:?} ({:.3}% of a core), {} ticks, periodic runs {}",
        cpu,
        wall,
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64(),
        ticks,
        runs
    );
    h.stop();
    runtime.join().unwrap();
    assert!(
        cpu.as_secs_f64() < 0.01 * wall.as_secs_f64(),
        "idle reactor used {cpu:?} of CPU in {wall:?}"
    );
    // It slept: a spinning loop would tick millions of times.
    assert!(ticks < 1000, "{ticks} ticks while idle");
    assert!(runs >= 5, "periodic poller ran only {runs} times in 1.6 s");
}

fn wake_latency_median(h: &reactor::RuntimeHandle, nr_samples: usize) -> (Duration, Vec<u64>) {
    let (tx, rx) = mpsc::channel();
    let mut samples = Vec::with_capacity(nr_samples);
    for _ in 0..nr_samples {
        // Let the reactor go back to sleep.
        std::thread::sleep(Duration::from_millis(3));
        let tx = tx.clone();
        let sent = Instant::now();
        h.send_msg(R0, move || tx.send(sent.elapsed()).unwrap());
        samples.push(
            rx.recv_timeout(Duration::from_secs(5))
                .expect("message ran"),
        );
    }
    samples.sort_unstable();
    let micros = samples.iter().map(|d| d.as_micros() as u64).collect();
    (samples[nr_samples / 2], micros)
}

/// A sleeping reactor runs a message within 100 µs (median of 31 samples; best of up to
/// three rounds on a noisy machine).
#[test]
fn sleeping_reactor_wakes_within_100us() {
    let runtime = interrupt_runtime();
    let h = runtime.handle();
    let mut medians = Vec::new();
    for round in 0..3 {
        let (median, micros) = wake_latency_median(&h, 31);
        eprintln!("wake-up latency round {round}: median {median:?}, sorted µs {micros:?}");
        medians.push(median);
        if median < Duration::from_micros(100) {
            break;
        }
    }
    let sleeps = h.stats()[0].idle_ticks;
    h.stop();
    runtime.join().unwrap();
    let best = *medians.iter().min().unwrap();
    assert!(
        best < Duration::from_micros(100),
        "median wake-up {medians:?}"
    );
    assert!(sleeps > 0, "the reactor never went idle");
}
