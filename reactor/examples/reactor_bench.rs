//! Micro-benchmarks of the reactor's hot paths. Run in release:
//!
//! ```text
//! cargo run --release -p reactor --example reactor_bench [seconds] [case-prefix]
//! ```
//!
//! - `tick`: one poller doing nothing but returning Busy: raw tick rate.
//! - `fake_io1` / `fake_io32`: one poller completing and resubmitting fake I/Os from a fixed
//!   ring of 128 slots (what a null bdev does at queue depth 128), 1 or 32 per call.
//! - `ping_pong`: two reactors bouncing one message: round trips per second.
//! - `msg_stream`: reactor 0 streams messages to reactor 1 (256 per tick, at most 65536
//!   queued).
//! - `nop_handler` / `nop_closure`: io_uring NOPs at queue depth 128, completing through a
//!   shared `CompletionHandler` (no allocation) or a boxed closure per op.
//! - `read4k_raw` / `read4k_fixed`: 4 KiB reads from a cached temp file at depth 32, with a
//!   plain fd or a registered (fixed) file.
//! - `dio4k_dmabuf` / `dio4k_fixedbuf`: 4 KiB `O_DIRECT` reads at depth 32 from a tmpfs file
//!   into pooled `DmaBuf`s or registered buffers.

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reactor::{
    Completion, CompletionHandler, CoreMask, DmaBuf, Fd, OnComplete, Op, PollStatus, ReactorId,
    Ring, Runtime, RuntimeOptions,
};

fn cores(n: usize) -> CoreMask {
    let available = reactor::cpu::available_cores();
    let pinned: Vec<usize> = available.iter().copied().take(n).collect();
    CoreMask::from_cores(if pinned.len() == n {
        pinned
    } else {
        (0..n).collect()
    })
    .unwrap()
}

/// What one case measured on reactor 0.
struct Measured {
    work: u64,
    ticks: u64,
    elapsed: Duration,
    /// CPU time of reactor 0's thread (user + system), so rates can be given per CPU-second,
    /// which a loaded, shared machine distorts far less than per wall-second.
    cpu: Duration,
}

/// Runs `setup` on reactor 0 of an `n`-reactor poll-mode runtime for `secs`.
fn run(n: usize, secs: f64, setup: impl FnOnce(Arc<AtomicU64>) + Send + 'static) -> Measured {
    let mut opts = RuntimeOptions::new(cores(n));
    opts.pin_threads = reactor::cpu::available_cores().len() >= n;
    let counter = Arc::new(AtomicU64::new(0));
    let c = counter.clone();
    let at_stop = Arc::new(std::sync::Mutex::new(None));
    let s = at_stop.clone();
    let start = Instant::now();
    let runtime = Runtime::start(opts, move || {
        setup(c.clone());
        reactor::after(Duration::from_secs_f64(secs), move || {
            // Read while the thread is alive: its /proc entry goes away with it.
            let stats = reactor::stats(ReactorId::new(0));
            *s.lock().unwrap() = Some((c.load(Ordering::Relaxed), stats, start.elapsed()));
            reactor::request_stop();
        });
    })
    .unwrap();
    runtime.join().unwrap();
    let (work, stats, elapsed) = at_stop.lock().unwrap().take().expect("stop timer ran");
    Measured {
        work,
        ticks: stats.busy_ticks + stats.idle_ticks,
        elapsed,
        cpu: stats.cpu_time,
    }
}

fn report(name: &str, m: Measured, unit: &str) {
    let secs = m.elapsed.as_secs_f64();
    let cpu = m.cpu.as_secs_f64().max(1e-3);
    println!(
        "{name:<14} {:>8.2} M{unit}/s {:>7.2} M ticks/s | per CPU-s of reactor 0: {:>8.2} M{unit} \
         {:>7.2} M ticks ({:.0}% CPU)",
        m.work as f64 / secs / 1e6,
        m.ticks as f64 / secs / 1e6,
        m.work as f64 / cpu / 1e6,
        m.ticks as f64 / cpu / 1e6,
        100.0 * cpu / secs,
    );
}

fn bench_tick(secs: f64) {
    let m = run(1, secs, |c| {
        let n = Rc::new(Cell::new(0u64));
        reactor::register_poller("tick", move || {
            n.set(n.get() + 1);
            if n.get().is_multiple_of(4096) {
                c.store(n.get(), Ordering::Relaxed);
            }
            PollStatus::Busy
        });
    });
    report("tick", m, "polls");
}

fn bench_fake_io(secs: f64, batch: usize) {
    const DEPTH: usize = 128;
    let m = run(1, secs, move |c| {
        // A fixed ring of outstanding fake I/Os: complete BATCH, resubmit them.
        let mut slots = [0u64; DEPTH];
        let mut head = 0usize;
        let mut done = 0u64;
        reactor::register_poller("fake_io", move || {
            for _ in 0..batch {
                let io = &mut slots[head % DEPTH];
                *io = io.wrapping_add(1); // "complete" and resubmit
                head = head.wrapping_add(1);
            }
            done += batch as u64;
            c.store(done, Ordering::Relaxed);
            PollStatus::Busy
        });
    });
    report(&format!("fake_io{batch}"), m, "IOs");
}

fn bench_ping_pong(secs: f64) {
    fn ping(count: Arc<AtomicU64>) {
        reactor::send_msg(ReactorId::new(1), move || {
            reactor::send_msg(ReactorId::new(0), move || {
                count.fetch_add(1, Ordering::Relaxed);
                ping(count);
            })
        });
    }
    let m = run(2, secs, ping);
    report("ping_pong", m, "round trips");
}

fn bench_msg_stream(secs: f64) {
    thread_local! {
        static RECEIVED: Cell<u64> = const { Cell::new(0) };
    }
    let m = run(2, secs, |c| {
        let mut sent = 0u64;
        reactor::register_poller("stream", move || {
            // Bound the queue so the receiver keeps up (STYLE rule 10); the receiver publishes
            // its count every 256 messages, so shared cache lines are touched rarely.
            if sent - c.load(Ordering::Relaxed) < 65536 {
                for _ in 0..256 {
                    let c = c.clone();
                    reactor::send_msg(ReactorId::new(1), move || {
                        let n = RECEIVED.with(|r| {
                            r.set(r.get() + 1);
                            r.get()
                        });
                        if n.is_multiple_of(256) {
                            c.store(n, Ordering::Relaxed);
                        }
                    });
                }
                sent += 256;
            }
            PollStatus::Busy
        });
    });
    report("msg_stream", m, "msgs");
}

struct Resubmit {
    ring: Ring,
    done: Cell<u64>,
    counter: Arc<AtomicU64>,
    me: Cell<Option<Rc<Resubmit>>>,
    op: fn() -> Op,
}

impl CompletionHandler for Resubmit {
    fn complete(&self, tag: u64, completion: Completion) {
        assert!(completion.result >= 0, "op failed: {}", completion.result);
        self.done.set(self.done.get() + 1);
        if self.done.get().is_multiple_of(1024) {
            self.counter.store(self.done.get(), Ordering::Relaxed);
        }
        let me = self.me.take().expect("self reference");
        let op = match completion.op {
            Op::Nop => Op::Nop,
            Op::Read { fd, offset, buf } => Op::Read { fd, offset, buf },
            Op::ReadFixed { fd, offset, buf } => Op::ReadFixed { fd, offset, buf },
            _ => (self.op)(),
        };
        self.ring
            .submit(op, OnComplete::handler(me.clone(), tag))
            .unwrap();
        self.me.set(Some(me));
    }
}

fn nop() -> Op {
    Op::Nop
}

fn bench_nop(secs: f64, closures: bool) {
    const DEPTH: u64 = 128;
    let m = run(1, secs, move |c| {
        let ring = reactor::ring();
        if closures {
            fn resubmit(ring: Ring, c: Arc<AtomicU64>, n: Rc<Cell<u64>>) {
                let r = ring.clone();
                ring.submit(
                    Op::Nop,
                    OnComplete::closure(move |_| {
                        n.set(n.get() + 1);
                        if n.get().is_multiple_of(1024) {
                            c.store(n.get(), Ordering::Relaxed);
                        }
                        resubmit(r, c, n)
                    }),
                )
                .unwrap();
            }
            let n = Rc::new(Cell::new(0));
            for _ in 0..DEPTH {
                resubmit(ring.clone(), c.clone(), n.clone());
            }
        } else {
            let handler = Rc::new(Resubmit {
                ring: ring.clone(),
                done: Cell::new(0),
                counter: c,
                me: Cell::new(None),
                op: nop,
            });
            handler.me.set(Some(handler.clone()));
            for tag in 0..DEPTH {
                ring.submit(Op::Nop, OnComplete::handler(handler.clone(), tag))
                    .unwrap();
            }
        }
    });
    let name = if closures {
        "nop_closure"
    } else {
        "nop_handler"
    };
    report(name, m, "ops");
}

fn bench_read(secs: f64, fixed: bool) {
    const DEPTH: u64 = 32;
    let file = tempfile::tempfile().unwrap();
    file.set_len(64 << 20).unwrap();
    let raw = file.as_raw_fd();
    // Populate the page cache so reads measure the ring, not the disk.
    let mut opts_fill = vec![0u8; 1 << 20];
    opts_fill
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = i as u8);
    for i in 0..64u64 {
        std::os::unix::fs::FileExt::write_all_at(&file, &opts_fill, i << 20).unwrap();
    }
    let m = run(1, secs, move |c| {
        let ring = reactor::ring();
        let fd = if fixed {
            ring.register_files(&[raw]).unwrap();
            Fd::Fixed(0)
        } else {
            Fd::Raw(raw)
        };
        let handler = Rc::new(Resubmit {
            ring: ring.clone(),
            done: Cell::new(0),
            counter: c,
            me: Cell::new(None),
            op: nop,
        });
        handler.me.set(Some(handler.clone()));
        for tag in 0..DEPTH {
            let op = Op::Read {
                fd,
                offset: (tag * 4096 * 97) % (64 << 20),
                buf: DmaBuf::alloc(4096),
            };
            ring.submit(op, OnComplete::handler(handler.clone(), tag))
                .unwrap();
        }
    });
    drop(file);
    let name = if fixed { "read4k_fixed" } else { "read4k_raw" };
    report(name, m, "IOs");
}

/// 4 KiB `O_DIRECT` reads at depth 32 from a file in /dev/shm (tmpfs), into pooled
/// `DmaBuf`s or into registered `FixedBuf`s: what registered buffers save is the per-I/O
/// page pinning that `O_DIRECT` does.
fn bench_direct_read(secs: f64, fixed: bool) {
    use std::os::unix::fs::OpenOptionsExt;
    const DEPTH: u64 = 32;
    const SIZE: u64 = 64 << 20;
    let path = format!("/dev/shm/reactor_bench_{}", std::process::id());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path);
    let file = match file {
        Ok(file) => file,
        Err(e) => {
            println!("dio4k: skipped, cannot open {path} with O_DIRECT: {e}");
            return;
        }
    };
    std::fs::remove_file(&path).unwrap();
    file.set_len(SIZE).unwrap();
    let raw = file.as_raw_fd();
    let m = run(1, secs, move |c| {
        let ring = reactor::ring();
        if fixed {
            ring.register_buffers(DEPTH as usize, 4096).unwrap();
        }
        let handler = Rc::new(Resubmit {
            ring: ring.clone(),
            done: Cell::new(0),
            counter: c,
            me: Cell::new(None),
            op: nop,
        });
        handler.me.set(Some(handler.clone()));
        for tag in 0..DEPTH {
            let (fd, offset) = (Fd::Raw(raw), (tag * 4096 * 97) % SIZE);
            let op = if fixed {
                let buf = ring.alloc_fixed_buf().unwrap();
                Op::ReadFixed { fd, offset, buf }
            } else {
                Op::Read {
                    fd,
                    offset,
                    buf: DmaBuf::alloc(4096),
                }
            };
            ring.submit(op, OnComplete::handler(handler.clone(), tag))
                .unwrap();
        }
    });
    drop(file);
    let name = if fixed {
        "dio4k_fixedbuf"
    } else {
        "dio4k_dmabuf"
    };
    report(name, m, "IOs");
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let only = std::env::args().nth(2);
    let want = |name: &str| only.as_deref().is_none_or(|o| name.starts_with(o));
    println!("reactor_bench: {secs} s per case, poll mode");
    if want("tick") {
        bench_tick(secs);
    }
    if want("fake_io") {
        bench_fake_io(secs, 1);
        bench_fake_io(secs, 32);
    }
    if want("ping_pong") {
        bench_ping_pong(secs);
    }
    if want("msg_stream") {
        bench_msg_stream(secs);
    }
    if want("nop_handler") {
        bench_nop(secs, false);
    }
    if want("nop_closure") {
        bench_nop(secs, true);
    }
    if want("read4k_raw") {
        bench_read(secs, false);
    }
    if want("read4k_fixed") {
        bench_read(secs, true);
    }
    if want("dio4k_dmabuf") {
        bench_direct_read(secs, false);
    }
    if want("dio4k_fixedbuf") {
        bench_direct_read(secs, true);
    }
}
