//! Functional tests of real reactor threads. Every test in `suite` runs twice: in poll mode
//! (`poll::*`) and in interrupt mode (`interrupt::*`).
//!
//! Runtime tests are serialized with a lock: the machine has two cores, and several
//! poll-mode runtimes spinning at once would only measure the scheduler.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use reactor::{CoreMask, PollStatus, Runtime, RuntimeHandle, RuntimeOptions};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn options(nr_reactors: usize, interrupt_mode: bool) -> RuntimeOptions {
    let mut opts = RuntimeOptions::new(CoreMask::from_cores(0..nr_reactors).unwrap());
    opts.interrupt_mode = interrupt_mode;
    // Tests must not depend on how many cores the machine has.
    opts.pin_threads = false;
    opts
}

/// Starts a runtime, runs `test` on this (non-reactor) thread with its handle, stops, joins.
fn with_runtime<R>(opts: RuntimeOptions, test: impl FnOnce(&RuntimeHandle) -> R) -> R {
    let _serial = serial();
    let runtime = Runtime::start(opts, || {}).expect("runtime starts");
    let handle = runtime.handle();
    let result = test(&handle);
    handle.stop();
    runtime.join().expect("reactors exit cleanly");
    result
}

/// Polls `cond` on this thread until true or `timeout`; panics with `what` on timeout.
fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

mod suite {
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;
    use std::os::fd::AsRawFd;
    use std::rc::Rc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use reactor::{
        Completion, CompletionHandler, DmaBuf, Fd, IoDevice, OnComplete, Op, PollStatus, ReactorId,
    };

    use super::{options, wait_until, with_runtime};

    const R0: ReactorId = ReactorId::new(0);
    const R1: ReactorId = ReactorId::new(1);

    thread_local! {
        /// Per reactor thread: sender -> next expected sequence number.
        static EXPECTED: RefCell<HashMap<u32, u64>> = RefCell::new(HashMap::new());
        static RECEIVED: Cell<u64> = const { Cell::new(0) };
    }

    fn receive(sender: u32, seq: u64) {
        EXPECTED.with(|e| {
            let mut e = e.borrow_mut();
            let next = e.entry(sender).or_insert(0);
            assert_eq!(
                seq, *next,
                "message from {sender} out of order or duplicated"
            );
            *next += 1;
        });
        RECEIVED.with(|r| r.set(r.get() + 1));
    }

    /// Both reactors stream numbered messages to each other and to themselves from a poller
    /// (100 per tick), while the main thread streams to both: every message arrives exactly
    /// once and in order per sender.
    pub fn messages_exactly_once_in_order(interrupt_mode: bool) {
        const N: u64 = 20_000;
        with_runtime(options(2, interrupt_mode), |h| {
            for id in [R0, R1] {
                h.call(id, move || {
                    let me = reactor::current();
                    let other = ReactorId::new(1 - me.index() as u32);
                    let sent = Rc::new(Cell::new(0u64));
                    let handle = Rc::new(Cell::new(None));
                    let handle2 = handle.clone();
                    let p = reactor::register_poller("sender", move || {
                        for _ in 0..100 {
                            let seq = sent.get();
                            if seq == N {
                                let h: Option<reactor::PollerHandle> = handle2.get();
                                h.expect("handle set").unregister();
                                return PollStatus::Idle;
                            }
                            let from = me.index() as u32;
                            reactor::send_msg(other, move || receive(from, seq));
                            reactor::send_msg(me, move || receive(from + 10, seq));
                            sent.set(seq + 1);
                        }
                        PollStatus::Busy
                    });
                    handle.set(Some(p));
                })
                .unwrap();
            }
            for seq in 0..N {
                h.send_msg(R0, move || receive(99, seq));
                h.send_msg(R1, move || receive(99, seq));
            }
            let expected_total = 3 * N;
            for id in [R0, R1] {
                wait_until("all messages", Duration::from_secs(30), || {
                    h.call(id, || RECEIVED.with(Cell::get)).unwrap() == expected_total
                });
                let per_sender = h
                    .call(id, || EXPECTED.with(|e| e.borrow().clone()))
                    .unwrap();
                assert_eq!(per_sender.len(), 3);
                assert!(per_sender.values().all(|&n| n == N), "{per_sender:?}");
            }
        });
    }

    /// `call` runs on the target reactor and returns its value; the context functions work.
    pub fn call_and_context(interrupt_mode: bool) {
        with_runtime(options(2, interrupt_mode), |h| {
            assert_eq!(h.nr_reactors(), 2);
            assert_eq!(h.call(R1, reactor::current).unwrap(), R1);
            assert_eq!(h.call(R0, reactor::nr_reactors).unwrap(), 2);
            assert_eq!(h.call(R1, || reactor::core_of(R1)).unwrap(), 1);
            assert_eq!(
                h.call(R0, reactor::is_interrupt_mode).unwrap(),
                interrupt_mode
            );
            assert!(reactor::try_current().is_none());
        });
    }

    /// An active poller runs every tick; a periodic one at its period; a timer after its
    /// delay and not before; a cancelled timer never.
    pub fn pollers_periodic_pollers_and_timers(interrupt_mode: bool) {
        let fired = Arc::new(Mutex::new(Vec::<(&str, Duration)>::new()));
        let log = fired.clone();
        with_runtime(options(1, interrupt_mode), |h| {
            let a_count = Arc::new(AtomicUsize::new(0));
            let a = a_count.clone();
            let registered = Instant::now();
            h.call(R0, move || {
                let start = Instant::now();
                let p = Rc::new(Cell::new(0u32));
                let me: Rc<Cell<Option<reactor::PollerHandle>>> = Rc::default();
                let me2 = me.clone();
                me.set(Some(reactor::register_poller("count", move || {
                    if a.fetch_add(1, Ordering::SeqCst) + 1 == 1000 {
                        me2.get().unwrap().unregister();
                    }
                    PollStatus::Busy
                })));
                reactor::register_periodic_poller("tick", Duration::from_millis(5), move || {
                    p.set(p.get() + 1);
                    PollStatus::Busy
                });
                let l = log.clone();
                reactor::after(Duration::from_millis(30), move || {
                    l.lock().unwrap().push(("timer", start.elapsed()));
                });
                let l = log.clone();
                let cancelled = reactor::after(Duration::from_millis(10), move || {
                    l.lock().unwrap().push(("cancelled", start.elapsed()));
                });
                assert!(cancelled.cancel());
                assert!(!cancelled.cancel());
            })
            .unwrap();
            std::thread::sleep(Duration::from_millis(200));
            let (active, periodic, elapsed) = h
                .call(R0, move || {
                    let infos = reactor::poller::pollers();
                    let active = infos.iter().find(|i| i.name == "count").map(|i| i.nr_runs);
                    let periodic = infos.iter().find(|i| i.name == "tick").map(|i| i.nr_runs);
                    (active, periodic, registered.elapsed())
                })
                .unwrap();
            assert_eq!(active, None, "the self-unregistered poller is gone");
            assert_eq!(a_count.load(Ordering::SeqCst), 1000);
            let periodic = periodic.expect("periodic poller still registered");
            // A 5 ms period: at most one run per full period since registration; at least a
            // couple in 200+ ms even when the machine is loaded.
            let most = (elapsed.as_millis() / 5) as u64;
            assert!(
                (2..=most).contains(&periodic),
                "periodic poller ran {periodic} times in {elapsed:?}"
            );
        });
        let fired = fired.lock().unwrap();
        assert_eq!(fired.len(), 1, "{fired:?}");
        assert_eq!(fired[0].0, "timer");
        assert!(fired[0].1 >= Duration::from_millis(30), "{fired:?}");
    }

    /// A poller unregisters itself and a poller that runs after it in the same tick; neither
    /// runs again, not even later in that tick. A poller registered from inside a poller runs
    /// from the next tick on, and may unregister itself on its first run.
    pub fn deferred_unregistration(interrupt_mode: bool) {
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let l0 = log.clone();
        with_runtime(options(1, interrupt_mode), |h| {
            h.call(R0, move || {
                let hb: Rc<Cell<Option<reactor::PollerHandle>>> = Rc::default();
                let ha: Rc<Cell<Option<reactor::PollerHandle>>> = Rc::default();
                let n = Rc::new(Cell::new(0));
                let (l, hb2, ha2, n2) = (l0.clone(), hb.clone(), ha.clone(), n.clone());
                ha.set(Some(reactor::register_poller("a", move || {
                    n2.set(n2.get() + 1);
                    l.lock().unwrap().push(format!("a{}", n2.get()));
                    if n2.get() == 2 {
                        hb2.get().unwrap().unregister();
                        ha2.get().unwrap().unregister();
                        ha2.get().unwrap().unregister(); // idempotent
                        let hc: Rc<Cell<Option<reactor::PollerHandle>>> = Rc::default();
                        let (l2, hc2) = (l.clone(), hc.clone());
                        hc.set(Some(reactor::register_poller("c", move || {
                            l2.lock().unwrap().push("c".into());
                            hc2.get().unwrap().unregister();
                            PollStatus::Busy
                        })));
                        l.lock().unwrap().push("registered c".into());
                    }
                    PollStatus::Busy
                })));
                let (l, n3) = (l0.clone(), n.clone());
                hb.set(Some(reactor::register_poller("b", move || {
                    l.lock().unwrap().push(format!("b{}", n3.get()));
                    PollStatus::Busy
                })));
            })
            .unwrap();
            wait_until("pollers gone", Duration::from_secs(5), || {
                h.call(R0, || reactor::poller::pollers().is_empty())
                    .unwrap()
            });
        });
        assert_eq!(
            *log.lock().unwrap(),
            ["a1", "b1", "a2", "registered c", "c"]
        );
    }

    /// Write, read back, vectored I/O, fsync, punch hole, and an error result, on a temp file
    /// through the reactor's io_uring.
    pub fn uring_file_round_trip(interrupt_mode: bool) {
        let file = tempfile::tempfile().unwrap();
        file.set_len(64 * 1024).unwrap();
        let fd = file.as_raw_fd();
        let results = Arc::new(Mutex::new(Vec::<String>::new()));
        let out = results.clone();
        with_runtime(options(1, interrupt_mode), |h| {
            h.call(R0, move || {
                let ring = reactor::ring();
                let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
                let buf = DmaBuf::from_slice(&pattern);
                assert_eq!(buf.as_ptr() as usize % reactor::DMA_ALIGN, 0);
                let ring2 = ring.clone();
                let out2 = out.clone();
                ring.write_at(fd, 4096, buf, move |res, buf| {
                    assert_eq!(res.unwrap(), 8192);
                    drop(buf);
                    let ring3 = ring2.clone();
                    ring2
                        .fsync(fd, true, move |res| {
                            res.unwrap();
                            ring3
                                .read_at(fd, 4096, DmaBuf::alloc(8192), move |res, buf| {
                                    assert_eq!(res.unwrap(), 8192);
                                    assert_eq!(&buf[..], &pattern[..]);
                                    out2.lock().unwrap().push("read".into());
                                })
                                .unwrap();
                        })
                        .unwrap();
                })
                .unwrap();
            })
            .unwrap();
            wait_until("read back", Duration::from_secs(5), || {
                !results.lock().unwrap().is_empty()
            });
            let out = results.clone();
            h.call(R0, move || {
                let ring = reactor::ring();
                let bufs = vec![
                    DmaBuf::from_slice(&[1u8; 4096]),
                    DmaBuf::from_slice(&[2u8; 4096]),
                ];
                let ring2 = ring.clone();
                let op = Op::Writev {
                    fd: Fd::Raw(fd),
                    offset: 32768,
                    bufs,
                };
                ring.submit(
                    op,
                    OnComplete::closure(move |c: Completion| {
                        assert_eq!(c.io_result().unwrap(), 8192);
                        let bufs = vec![DmaBuf::alloc(4096), DmaBuf::alloc(4096)];
                        let op = Op::Readv {
                            fd: Fd::Raw(fd),
                            offset: 32768,
                            bufs,
                        };
                        ring2
                            .submit(
                                op,
                                OnComplete::closure(move |c: Completion| {
                                    assert_eq!(c.io_result().unwrap(), 8192);
                                    let bufs = c.into_bufs();
                                    assert!(bufs[0].iter().all(|&b| b == 1));
                                    assert!(bufs[1].iter().all(|&b| b == 2));
                                    out.lock().unwrap().push("vectored".into());
                                }),
                            )
                            .unwrap();
                    }),
                )
                .unwrap();
            })
            .unwrap();
            wait_until("vectored", Duration::from_secs(5), || {
                results.lock().unwrap().len() == 2
            });
            let out = results.clone();
            h.call(R0, move || {
                let ring = reactor::ring();
                let ring2 = ring.clone();
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                let out2 = out.clone();
                ring.fallocate(fd, mode, 4096, 4096, move |res| {
                    res.unwrap();
                    ring2
                        .read_at(fd, 4096, DmaBuf::alloc(8192), move |res, buf| {
                            assert_eq!(res.unwrap(), 8192);
                            assert!(buf[..4096].iter().all(|&b| b == 0), "hole reads zeros");
                            assert!(buf[4096..].iter().any(|&b| b != 0), "rest untouched");
                            out2.lock().unwrap().push("punched".into());
                        })
                        .unwrap();
                })
                .unwrap();
                ring.read_at(-1, 0, DmaBuf::alloc(512), move |res, _buf| {
                    assert_eq!(res.unwrap_err().raw_os_error(), Some(libc::EBADF));
                    out.lock().unwrap().push("ebadf".into());
                })
                .unwrap();
            })
            .unwrap();
            wait_until("punch + ebadf", Duration::from_secs(5), || {
                results.lock().unwrap().len() == 4
            });
            // Raw regions: memory owned by the callback, not by the op.
            let out = results.clone();
            h.call(R0, move || {
                let ring = reactor::ring();
                let mut src = vec![0x5Au8; 4096].into_boxed_slice();
                // SAFETY: `src` moves into the callback, which lives until the CQE.
                let region = unsafe { reactor::RawRegion::new(src.as_mut_ptr(), src.len()) };
                let ring2 = ring.clone();
                let op = Op::WriteRaw {
                    fd: Fd::Raw(fd),
                    offset: 49152,
                    region,
                };
                ring.submit(
                    op,
                    OnComplete::closure(move |c: Completion| {
                        assert_eq!(c.io_result().unwrap(), 4096);
                        drop(src);
                        let mut dst = vec![0u8; 4096].into_boxed_slice();
                        // SAFETY: `dst` moves into the callback below.
                        let region =
                            unsafe { reactor::RawRegion::new(dst.as_mut_ptr(), dst.len()) };
                        let op = Op::ReadRaw {
                            fd: Fd::Raw(fd),
                            offset: 49152,
                            region,
                        };
                        ring2
                            .submit(
                                op,
                                OnComplete::closure(move |c: Completion| {
                                    assert_eq!(c.io_result().unwrap(), 4096);
                                    assert!(dst.iter().all(|&b| b == 0x5A));
                                    out.lock().unwrap().push("raw".into());
                                }),
                            )
                            .unwrap();
                    }),
                )
                .unwrap();
            })
            .unwrap();
            wait_until("raw", Duration::from_secs(5), || {
                results.lock().unwrap().len() == 5
            });
            let in_flight = h.call(R0, || reactor::ring().nr_in_flight()).unwrap();
            assert_eq!(in_flight, 0);
        });
        drop(file);
    }

    /// Registered buffers: write and read back through READ_FIXED/WRITE_FIXED; the buffers
    /// return to the ring when dropped; the table is bounded and registered once.
    pub fn registered_buffers(interrupt_mode: bool) {
        let file = tempfile::tempfile().unwrap();
        let fd = file.as_raw_fd();
        with_runtime(options(1, interrupt_mode), |h| {
            h.call(R0, || {
                let ring = reactor::ring();
                assert!(ring.alloc_fixed_buf().is_none(), "nothing registered yet");
                assert_eq!(
                    ring.register_buffers(0, 4096).unwrap_err().raw_os_error(),
                    Some(libc::EINVAL)
                );
                ring.register_buffers(4, 4096).unwrap();
                assert_eq!(
                    ring.register_buffers(4, 4096).unwrap_err().raw_os_error(),
                    Some(libc::EBUSY)
                );
                let held: Vec<_> = (0..4).map(|_| ring.alloc_fixed_buf().unwrap()).collect();
                assert!(ring.alloc_fixed_buf().is_none(), "all four lent out");
                drop(held);
                assert_eq!(ring.nr_free_fixed_bufs(), 4);
            })
            .unwrap();
            let ok = Arc::new(AtomicUsize::new(0));
            let ok2 = ok.clone();
            h.call(R0, move || {
                let ring = reactor::ring();
                let mut buf = ring.alloc_fixed_buf().unwrap();
                assert_eq!(buf.len(), 4096);
                buf.fill(0xC3);
                let ring2 = ring.clone();
                let op = Op::WriteFixed {
                    fd: Fd::Raw(fd),
                    offset: 8192,
                    buf,
                };
                ring.submit(
                    op,
                    OnComplete::closure(move |c: Completion| {
                        assert_eq!(c.io_result().unwrap(), 4096);
                        let mut buf = c.into_fixed_buf().unwrap();
                        buf.fill(0);
                        let op = Op::ReadFixed {
                            fd: Fd::Raw(fd),
                            offset: 8192,
                            buf,
                        };
                        ring2
                            .submit(
                                op,
                                OnComplete::closure(move |c: Completion| {
                                    assert_eq!(c.io_result().unwrap(), 4096);
                                    let buf = c.into_fixed_buf().unwrap();
                                    assert!(buf.iter().all(|&b| b == 0xC3));
                                    ok2.fetch_add(1, Ordering::SeqCst);
                                }),
                            )
                            .unwrap();
                    }),
                )
                .unwrap();
            })
            .unwrap();
            wait_until("fixed round trip", Duration::from_secs(5), || {
                ok.load(Ordering::SeqCst) == 1
            });
            let free = h.call(R0, || reactor::ring().nr_free_fixed_bufs()).unwrap();
            assert_eq!(free, 4, "buffer returned to the ring after its completion");
        });
        drop(file);
    }

    struct Counter {
        total: Cell<u64>,
        tags: RefCell<Vec<u64>>,
    }

    impl CompletionHandler for Counter {
        fn complete(&self, tag: u64, completion: Completion) {
            assert_eq!(completion.result, 0);
            self.total.set(self.total.get() + 1);
            self.tags.borrow_mut().push(tag);
        }
    }

    /// Ops completing through a shared handler get their tags; more submissions than SQ
    /// entries go through (full SQ is submitted and retried); past max_in_flight the ring
    /// hands the op back.
    pub fn handler_batching_and_limits(interrupt_mode: bool) {
        let mut opts = options(1, interrupt_mode);
        opts.ring_entries = 8;
        opts.max_in_flight = 64;
        with_runtime(opts, |h| {
            h.call(R0, || {
                let counter = Rc::new(Counter {
                    total: Cell::new(0),
                    tags: RefCell::new(Vec::new()),
                });
                let ring = reactor::ring();
                for tag in 0..64 {
                    ring.submit(Op::Nop, OnComplete::handler(counter.clone(), tag))
                        .unwrap();
                }
                let rejected = ring.submit(Op::Nop, OnComplete::Ignore).unwrap_err();
                assert!(matches!(rejected.op, Op::Nop));
                let c = counter.clone();
                reactor::register_poller("wait", move || {
                    if c.total.get() == 64 {
                        let mut tags = c.tags.borrow().clone();
                        tags.sort_unstable();
                        assert_eq!(tags, (0..64).collect::<Vec<_>>());
                        c.total.set(1000);
                    }
                    PollStatus::Idle
                });
            })
            .unwrap();
            wait_until("64 nops", Duration::from_secs(5), || {
                h.call(R0, || reactor::ring().nr_in_flight()).unwrap() == 0
            });
        });
    }

    /// Submissions are batched: 100 ops queued in one tick reach the kernel in one
    /// `io_uring_enter`, and their completions are reaped without further enters.
    pub fn one_enter_per_tick(interrupt_mode: bool) {
        let enters = Arc::new(AtomicUsize::new(usize::MAX));
        let e = enters.clone();
        with_runtime(options(1, interrupt_mode), |h| {
            h.call(R0, move || {
                let ring = reactor::ring();
                let before = ring.stats().nr_enters;
                let left = Rc::new(Cell::new(100));
                for _ in 0..100 {
                    let (ring2, left, e) = (ring.clone(), left.clone(), e.clone());
                    ring.submit(
                        Op::Nop,
                        OnComplete::closure(move |c: Completion| {
                            assert_eq!(c.result, 0);
                            left.set(left.get() - 1);
                            if left.get() == 0 {
                                let used = ring2.stats().nr_enters - before;
                                e.store(used as usize, Ordering::SeqCst);
                            }
                        }),
                    )
                    .unwrap();
                }
                assert_eq!(
                    ring.stats().nr_enters,
                    before,
                    "submit itself does not enter"
                );
            })
            .unwrap();
            wait_until("100 nops", Duration::from_secs(5), || {
                enters.load(Ordering::SeqCst) != usize::MAX
            });
        });
        let used = enters.load(Ordering::SeqCst);
        assert!(
            (1..=2).contains(&used),
            "{used} io_uring_enter calls for 100 ops"
        );
    }

    /// A completion that arrives while the reactor is idle (asleep in interrupt mode) runs
    /// its callback promptly: a pipe read completes when another thread writes the pipe.
    pub fn idle_reactor_runs_late_completion(interrupt_mode: bool) {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 writes two fds into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let [rd, wr] = fds;
        let got = Arc::new(Mutex::new(None));
        let g = got.clone();
        with_runtime(options(1, interrupt_mode), |h| {
            h.call(R0, move || {
                reactor::ring()
                    .read_at(rd, 0, DmaBuf::alloc(3), move |res, buf| {
                        *g.lock().unwrap() = Some((res.unwrap(), buf.to_vec(), Instant::now()));
                    })
                    .unwrap();
            })
            .unwrap();
            std::thread::sleep(Duration::from_millis(30));
            assert!(got.lock().unwrap().is_none());
            let written = Instant::now();
            // SAFETY: writes 3 bytes from a valid array to our pipe.
            assert_eq!(unsafe { libc::write(wr, b"abc".as_ptr().cast(), 3) }, 3);
            wait_until("late completion", Duration::from_secs(2), || {
                got.lock().unwrap().is_some()
            });
            let (n, data, at) = got.lock().unwrap().take().unwrap();
            assert_eq!((n, data.as_slice()), (3, &b"abc"[..]));
            let latency = at.duration_since(written);
            assert!(
                latency < Duration::from_millis(500),
                "woke after {latency:?}"
            );
        });
        // SAFETY: closing fds we own.
        unsafe {
            libc::close(rd);
            libc::close(wr);
        }
    }

    fn on(f: impl FnOnce(Completion) + 'static) -> OnComplete {
        OnComplete::closure(f)
    }

    /// Socket ops over loopback: accept + connect, send, poll for readability, recv, echo.
    pub fn loopback_socket_ops(interrupt_mode: bool) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let lfd = listener.as_raw_fd();
        // SAFETY: plain socket(2) call; the fd is closed below.
        let cfd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(cfd >= 0);
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let l = log.clone();
        with_runtime(options(1, interrupt_mode), |h| {
            h.call(R0, move || {
                let ring = reactor::ring();
                let (r, l1) = (ring.clone(), l.clone());
                // Server: accept, wait until readable, recv, send the bytes back reversed.
                ring.submit(
                    Op::Accept { fd: Fd::Raw(lfd) },
                    on(move |c| {
                        let sfd = Fd::Raw(c.io_result().unwrap() as i32);
                        l1.lock().unwrap().push("accepted".into());
                        let (r2, l2) = (r.clone(), l1.clone());
                        let events = libc::POLLIN as u32;
                        let poll = Op::PollAdd { fd: sfd, events };
                        r.submit(
                            poll,
                            on(move |c| {
                                assert_ne!(c.io_result().unwrap() as u32 & events, 0);
                                let (r3, l3) = (r2.clone(), l2.clone());
                                let recv = Op::Recv {
                                    fd: sfd,
                                    buf: DmaBuf::alloc(5),
                                    flags: 0,
                                };
                                r2.submit(
                                    recv,
                                    on(move |c| {
                                        assert_eq!(c.io_result().unwrap(), 5);
                                        let mut buf = c.into_buf().unwrap();
                                        l3.lock()
                                            .unwrap()
                                            .push(String::from_utf8(buf.to_vec()).unwrap());
                                        buf.reverse();
                                        let send = Op::Send {
                                            fd: sfd,
                                            buf,
                                            flags: 0,
                                        };
                                        r3.submit(
                                            send,
                                            on(move |c| {
                                                assert_eq!(c.io_result().unwrap(), 5);
                                                let Fd::Raw(raw) = sfd else { unreachable!() };
                                                // SAFETY: closing the accepted fd we own.
                                                unsafe { libc::close(raw) };
                                            }),
                                        )
                                        .unwrap();
                                    }),
                                )
                                .unwrap();
                            }),
                        )
                        .unwrap();
                    }),
                )
                .unwrap();
                // Client: connect, send, receive the echo.
                let (r, l1) = (ring.clone(), l.clone());
                ring.submit(
                    Op::Connect {
                        fd: Fd::Raw(cfd),
                        addr,
                    },
                    on(move |c| {
                        c.io_result().unwrap();
                        let (r2, l2) = (r.clone(), l1.clone());
                        let buf = DmaBuf::from_slice(b"hello");
                        r.submit(
                            Op::Send {
                                fd: Fd::Raw(cfd),
                                buf,
                                flags: 0,
                            },
                            on(move |c| {
                                assert_eq!(c.io_result().unwrap(), 5);
                                let recv = Op::Recv {
                                    fd: Fd::Raw(cfd),
                                    buf: DmaBuf::alloc(5),
                                    flags: libc::MSG_WAITALL,
                                };
                                r2.submit(
                                    recv,
                                    on(move |c| {
                                        assert_eq!(c.io_result().unwrap(), 5);
                                        let buf = c.into_buf().unwrap();
                                        l2.lock().unwrap().push(format!(
                                            "echo {}",
                                            String::from_utf8_lossy(&buf)
                                        ));
                                    }),
                                )
                                .unwrap();
                            }),
                        )
                        .unwrap();
                    }),
                )
                .unwrap();
            })
            .unwrap();
            wait_until("echo", Duration::from_secs(5), || {
                log.lock().unwrap().len() == 3
            });
        });
        let mut log = log.lock().unwrap().clone();
        log.sort();
        assert_eq!(log, ["accepted", "echo olleh", "hello"]);
        // SAFETY: closing the client fd we own.
        unsafe { libc::close(cfd) };
        drop(listener);
    }

    /// An abandoned read keeps its buffer until its CQE: the buffer goes back to the pool only
    /// then, and holds what the kernel wrote if the read won the race with the cancel.
    pub fn abandoned_op_keeps_buffer_until_cqe(interrupt_mode: bool) {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 writes two fds into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let [rd, wr] = fds;
        with_runtime(options(1, interrupt_mode), |h| {
            let (id, ptr) = h
                .call(R0, move || {
                    let mut buf = DmaBuf::new(512);
                    buf.fill(0);
                    let ptr = buf.as_ptr() as usize;
                    let guard = DropFlag(DROPPED.with(|d| d.clone()));
                    let id = reactor::ring()
                        .read_at(rd, 0, buf, move |_, _| {
                            let _keep = &guard;
                            panic!("abandoned callback must not run")
                        })
                        .unwrap();
                    (id, ptr)
                })
                .unwrap();
            // Let the reactor enter the read into the kernel.
            wait_until("read in kernel", Duration::from_secs(5), || {
                h.call(R0, move || reactor::ring().op_state(id))
                    .unwrap()
                    .is_some_and(|s| s == reactor::op::OpState::Waiting)
                    || !cfg!(debug_assertions)
            });
            std::thread::sleep(Duration::from_millis(5));
            let pooled_before = h
                .call(R0, move || {
                    let ring = reactor::ring();
                    // SAFETY: writes 512 bytes from a valid array to our pipe.
                    let n = unsafe { libc::write(wr, [0xABu8; 512].as_ptr().cast(), 512) };
                    assert_eq!(n, 512);
                    assert!(ring.abandon(id));
                    assert!(!ring.abandon(id), "second abandon is a no-op");
                    assert_eq!(ring.nr_in_flight(), 1, "op stays in the slab until its CQE");
                    assert!(!DROPPED.with(|d| d.get()), "callback kept until the CQE");
                    reactor::buf::pool_nr_free()
                })
                .unwrap();
            wait_until("abandoned CQE", Duration::from_secs(5), || {
                h.call(R0, || reactor::ring().nr_in_flight()).unwrap() == 0
            });
            let (same_ptr, contents, pooled_after) = h
                .call(R0, move || {
                    assert!(DROPPED.with(|d| d.get()), "callback dropped at the CQE");
                    let after = reactor::buf::pool_nr_free();
                    let buf = DmaBuf::alloc(512);
                    (buf.as_ptr() as usize == ptr, buf.to_vec(), after)
                })
                .unwrap();
            assert_eq!(
                pooled_after,
                pooled_before + 1,
                "buffer returned at the CQE"
            );
            assert!(same_ptr, "the pool got the op's own buffer back");
            let mut rest = [0u8; 512];
            // SAFETY: nonblocking read into a valid local buffer.
            let left = unsafe {
                libc::fcntl(rd, libc::F_SETFL, libc::O_NONBLOCK);
                libc::read(rd, rest.as_mut_ptr().cast(), 512)
            };
            if left == 512 {
                assert!(
                    contents.iter().all(|&b| b == 0),
                    "cancelled read left buffer alone"
                );
            } else {
                assert!(
                    contents.iter().all(|&b| b == 0xAB),
                    "kernel wrote into the buffer"
                );
            }
        });
        // SAFETY: closing fds we own.
        unsafe {
            libc::close(rd);
            libc::close(wr);
        }
    }

    thread_local! {
        static DROPPED: Rc<Cell<bool>> = Rc::new(Cell::new(false));
    }

    struct DropFlag(Rc<Cell<bool>>);

    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.set(true);
        }
    }

    /// A read that never completes is cancelled and reaped at shutdown: the slab is empty.
    pub fn slab_empty_at_shutdown(interrupt_mode: bool) {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 writes two fds into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let rd = fds[0];
        let handle = with_runtime(options(1, interrupt_mode), |h| {
            h.call(R0, move || {
                for _ in 0..4 {
                    reactor::ring()
                        .read_at(rd, 0, DmaBuf::alloc(64), |_, _| {})
                        .unwrap();
                }
            })
            .unwrap();
            wait_until("ops in flight", Duration::from_secs(5), || {
                h.stats()[0].nr_ops_in_flight == 4
            });
            h.clone()
        });
        assert_eq!(handle.stats()[0].nr_ops_in_flight, 0, "drained at shutdown");
        // After the runtime stopped, calls fail instead of hanging.
        assert!(matches!(
            handle.call(R0, || 1),
            Err(reactor::Error::Stopped)
        ));
        // SAFETY: closing fds we own.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }

    /// Channels are created lazily per reactor, shared by clones, destroyed with the last
    /// reference; for_each_channel visits reactors that have one; for_each_reactor visits all
    /// in order and completes on the caller.
    pub fn io_channels_and_for_each(interrupt_mode: bool) {
        let created = Arc::new(AtomicUsize::new(0));
        let destroyed = Arc::new(AtomicUsize::new(0));
        struct Chan {
            destroyed: Arc<AtomicUsize>,
            hits: Cell<u32>,
        }
        impl Drop for Chan {
            fn drop(&mut self) {
                self.destroyed.fetch_add(1, Ordering::SeqCst);
            }
        }
        let (c, d) = (created.clone(), destroyed.clone());
        let dev = IoDevice::new("test_dev", move || {
            c.fetch_add(1, Ordering::SeqCst);
            Chan {
                destroyed: d.clone(),
                hits: Cell::new(0),
            }
        });
        let visits = Arc::new(Mutex::new(Vec::new()));
        with_runtime(options(2, interrupt_mode), |h| {
            let dev1 = dev.clone();
            h.call(R1, move || {
                let a = dev1.channel();
                let b = dev1.channel();
                assert!(a.ptr_eq(&b));
                assert_eq!(a.reactor(), R1);
                // Keep one reference alive on reactor 1 in a thread local.
                KEEP.with(|k| *k.borrow_mut() = Some(Box::new(a)));
            })
            .unwrap();
            assert_eq!(created.load(Ordering::SeqCst), 1);
            let (dev0, v) = (dev.clone(), visits.clone());
            h.call(R0, move || {
                let done_on = Arc::new(Mutex::new(None));
                let d2 = done_on.clone();
                let v2 = v.clone();
                dev0.for_each_channel(
                    move |ch| {
                        ch.hits.set(ch.hits.get() + 1);
                        v2.lock().unwrap().push(("chan", reactor::current()));
                    },
                    move || *d2.lock().unwrap() = Some(reactor::current()),
                );
                let _ = done_on;
                let v3 = v.clone();
                reactor::for_each_reactor(
                    move || v3.lock().unwrap().push(("reactor", reactor::current())),
                    move || v.lock().unwrap().push(("done", reactor::current())),
                );
            })
            .unwrap();
            wait_until("for_each done", Duration::from_secs(5), || {
                visits.lock().unwrap().iter().any(|(k, _)| *k == "done")
            });
            let dev1 = dev.clone();
            h.call(R1, move || {
                assert_eq!(dev1.existing_channel().unwrap().hits.get(), 1);
                KEEP.with(|k| k.borrow_mut().take());
                assert!(dev1.existing_channel().is_none(), "last reference dropped");
            })
            .unwrap();
            assert_eq!(destroyed.load(Ordering::SeqCst), 1);
        });
        // The two walks run concurrently; each is ordered.
        let visits = visits.lock().unwrap();
        let of = |kind: &str| -> Vec<ReactorId> {
            visits
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|&(_, r)| r)
                .collect()
        };
        assert_eq!(of("chan"), [R1], "only reactor 1 has a channel");
        assert_eq!(of("reactor"), [R0, R1]);
        assert_eq!(of("done"), [R0]);
        assert_eq!(visits.last(), Some(&("done", R0)), "{visits:?}");
    }

    thread_local! {
        static KEEP: RefCell<Option<Box<dyn std::any::Any>>> = RefCell::new(None);
    }

    /// The DmaBuf pool recycles buffers on the reactor.
    pub fn dma_buf_pool(interrupt_mode: bool) {
        with_runtime(options(1, interrupt_mode), |h| {
            h.call(R0, || {
                let base = reactor::buf::pool_nr_free();
                let a = DmaBuf::alloc(5000);
                assert_eq!(a.len(), 5000);
                assert_eq!(a.capacity(), 8192);
                let ptr = a.as_ptr();
                drop(a);
                assert_eq!(reactor::buf::pool_nr_free(), base + 1);
                let b = DmaBuf::alloc(8192);
                assert_eq!(b.as_ptr(), ptr, "recycled");
                assert_eq!(reactor::buf::pool_nr_free(), base);
            })
            .unwrap();
            // A reactor's buffer dropped on another thread is simply freed.
            let moved = h.call(R0, || DmaBuf::from_slice(&[5u8; 4096])).unwrap();
            assert!(moved.iter().all(|&b| b == 5));
            drop(moved);
        });
    }
}

macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {
        mod poll {
            $(#[test] fn $name() { super::suite::$name(false) })*
        }
        mod interrupt {
            $(#[test] fn $name() { super::suite::$name(true) })*
        }
    };
}

both_modes!(
    messages_exactly_once_in_order,
    call_and_context,
    pollers_periodic_pollers_and_timers,
    deferred_unregistration,
    uring_file_round_trip,
    handler_batching_and_limits,
    registered_buffers,
    one_enter_per_tick,
    idle_reactor_runs_late_completion,
    loopback_socket_ops,
    abandoned_op_keeps_buffer_until_cqe,
    slab_empty_at_shutdown,
    io_channels_and_for_each,
    dma_buf_pool,
);

#[test]
fn unavailable_core_is_an_error() {
    let opts = RuntimeOptions::new(CoreMask::parse("[1000]").unwrap());
    match Runtime::start(opts, || {}) {
        Err(reactor::Error::CoreUnavailable { core: 1000 }) => {}
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("started on a core that does not exist"),
    }
}

#[test]
fn invalid_options_are_errors() {
    for (field, set) in [
        (
            "ring_entries",
            (|o: &mut RuntimeOptions| o.ring_entries = 0) as fn(&mut _),
        ),
        ("ring_entries", |o| o.ring_entries = 65536),
        ("max_in_flight", |o| o.max_in_flight = 0),
        ("msg_batch", |o| o.msg_batch = 0),
    ] {
        let mut opts = options(1, false);
        set(&mut opts);
        match Runtime::start(opts, || {}) {
            Err(reactor::Error::InvalidOption { name, .. }) => assert_eq!(name, field),
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("started with a bad {field}"),
        }
    }
}

#[test]
fn pinned_reactor_runs_on_its_core() {
    let core = *reactor::cpu::available_cores().last().expect("some core");
    let mut opts = RuntimeOptions::new(CoreMask::from_cores([core]).unwrap());
    opts.interrupt_mode = true;
    let on = with_runtime(opts, |h| {
        // SAFETY: sched_getcpu has no preconditions.
        h.call(reactor::ReactorId::new(0), || unsafe {
            libc::sched_getcpu()
        })
        .unwrap()
    });
    assert_eq!(on, core as i32);
}

#[test]
fn reactor_panic_stops_runtime_and_join_reports_it() {
    let _serial = serial();
    let runtime = Runtime::start(options(2, true), || {}).unwrap();
    let h = runtime.handle();
    h.send_msg(reactor::ReactorId::new(1), || {
        panic!("injected reactor panic")
    });
    wait_until("stop after panic", Duration::from_secs(5), || {
        h.is_stopping()
    });
    match runtime.join() {
        Err(reactor::Error::ReactorPanicked { id }) => assert_eq!(id.index(), 1),
        other => panic!("expected ReactorPanicked, got {other:?}"),
    }
}

#[test]
fn init_runs_on_first_reactor_and_stop_from_reactor() {
    let _serial = serial();
    let (tx, rx) = std::sync::mpsc::channel();
    let runtime = Runtime::start(options(2, true), move || {
        tx.send(reactor::current()).unwrap();
        reactor::after(Duration::from_millis(10), reactor::request_stop);
    })
    .unwrap();
    assert_eq!(rx.recv().unwrap(), reactor::ReactorId::new(0));
    runtime.join().unwrap();
}

#[test]
fn poll_mode_stats_count_ticks_and_cpu() {
    let stats = with_runtime(options(1, false), |h| {
        h.call(reactor::ReactorId::new(0), || {
            reactor::register_poller("busy", || PollStatus::Busy);
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        h.stats().remove(0)
    });
    eprintln!("{stats:?}");
    assert_eq!(stats.core, 0);
    assert!(!stats.interrupt_mode);
    assert!(stats.busy_ticks > 1000, "{stats:?}");
    // A spinning thread is charged CPU time (procfs counts in 10 ms ticks); the machine is
    // shared, so only require one tick's worth.
    assert!(stats.cpu_time >= Duration::from_millis(10), "{stats:?}");
    assert_eq!(stats.cpu_time, stats.cpu_user_time + stats.cpu_system_time);
    assert!(
        stats.cpu_usage() > 0.0 && stats.cpu_usage() <= 1.5,
        "{stats:?}"
    );
}
