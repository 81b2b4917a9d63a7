//! Round trips, range checks, splitting and completion affinity on malloc and null, in
//! reactor poll mode and interrupt mode.

mod common;

use bdev::{malloc, null, testing::record, IoStatus};
use common::{ok, open, pattern, Req, Rt};

fn malloc_bdev(name: &str, blocks: u64, bs: u32, boundary: u32) {
    malloc::create(malloc::MallocOpts {
        name: Some(name.into()),
        num_blocks: blocks,
        block_size: bs,
        uuid: None,
        optimal_io_boundary: boundary,
    })
    .unwrap();
}

fn malloc_roundtrip(interrupt: bool) {
    let name = format!("dp_malloc_rt_{interrupt}");
    malloc_bdev(&name, 256, 512, 0);
    let rt = Rt::start(2, interrupt);
    let d = open(&name);
    let data = pattern(8 * 512, 7);
    ok(rt.io(0, &d, Req::Write(10, data.clone())));
    assert_eq!(
        ok(rt.io(1, &d, Req::Read(10, 8))),
        data,
        "read back on the other reactor"
    );
    ok(rt.io(0, &d, Req::Unmap(11, 2)));
    let mut expect = data.clone();
    expect[512..1536].fill(0);
    assert_eq!(
        ok(rt.io(0, &d, Req::Read(10, 8))),
        expect,
        "unmap zeroes on malloc"
    );
    ok(rt.io(1, &d, Req::WriteZeroes(16, 2)));
    expect[6 * 512..].fill(0);
    assert_eq!(
        ok(rt.io(0, &d, Req::Read(10, 8))),
        expect,
        "write_zeroes zeroes"
    );
    ok(rt.io(0, &d, Req::Flush(0, 0)));
    ok(rt.io(0, &d, Req::Flush(0, 256)));
    ok(rt.io(1, &d, Req::Reset));
    drop(d);
    drop(rt);
    malloc::delete(&name).unwrap();
}

#[test]
fn malloc_roundtrip_poll_mode() {
    malloc_roundtrip(false);
}

#[test]
fn malloc_roundtrip_interrupt_mode() {
    malloc_roundtrip(true);
}

#[test]
fn bad_ranges_and_lengths_fail_with_einval() {
    let name = "dp_malloc_einval";
    malloc_bdev(name, 64, 4096, 0);
    let rt = Rt::start(1, true);
    let d = open(name);
    let e = libc::EINVAL;
    assert_eq!(
        rt.io(0, &d, Req::Read(64, 1)).unwrap_err(),
        e,
        "first block past the end"
    );
    assert_eq!(
        rt.io(0, &d, Req::Read(60, 8)).unwrap_err(),
        e,
        "range crossing the end"
    );
    assert_eq!(rt.io(0, &d, Req::Read(0, 0)).unwrap_err(), e, "zero blocks");
    assert_eq!(
        rt.io(0, &d, Req::Unmap(u64::MAX, 2)).unwrap_err(),
        e,
        "offset overflow"
    );
    assert_eq!(
        rt.io(0, &d, Req::WriteZeroes(1, u64::MAX)).unwrap_err(),
        e,
        "len overflow"
    );
    assert_eq!(
        rt.io(0, &d, Req::Flush(65, 0)).unwrap_err(),
        e,
        "flush past the end"
    );
    assert_eq!(
        rt.io(0, &d, Req::ReadLen(0, 2, 4096)).unwrap_err(),
        e,
        "short buffer"
    );
    assert_eq!(
        rt.io(0, &d, Req::ReadLen(0, 1, 5000)).unwrap_err(),
        e,
        "long buffer"
    );
    assert_eq!(
        rt.io(0, &d, Req::Write(0, vec![1; 100])).unwrap_err(),
        e,
        "partial block"
    );
    assert_eq!(
        rt.io(0, &d, Req::ReadAt(512, 4096)).unwrap_err(),
        e,
        "misaligned offset"
    );
    assert_eq!(
        rt.io(0, &d, Req::ReadAt(4096, 1000)).unwrap_err(),
        e,
        "misaligned length"
    );
    assert_eq!(
        ok(rt.io(0, &d, Req::ReadAt(4096, 8192))).len(),
        8192,
        "aligned byte API"
    );
    drop(d);
    drop(rt);
    malloc::delete(name).unwrap();
}

#[test]
fn null_reads_writes_and_refuses_unmap() {
    null::create(null::NullOpts {
        name: "dp_null".into(),
        num_blocks: 1 << 20,
        block_size: 4096,
        uuid: None,
    })
    .unwrap();
    let rt = Rt::start(1, false);
    let d = open("dp_null");
    ok(rt.io(0, &d, Req::Write(5, pattern(4096, 1))));
    assert_eq!(ok(rt.io(0, &d, Req::Read(5, 1))).len(), 4096);
    ok(rt.io(0, &d, Req::WriteZeroes(0, 100)));
    assert_eq!(rt.io(0, &d, Req::Unmap(0, 1)).unwrap_err(), libc::ENOTSUP);
    assert_eq!(rt.io(0, &d, Req::Flush(0, 1)).unwrap_err(), libc::ENOTSUP);
    drop(d);
    drop(rt);
    null::delete("dp_null").unwrap();
}

#[test]
fn io_crossing_the_optimal_boundary_is_split() {
    malloc_bdev("dp_split_base", 64, 512, 8);
    let rec = record::create("dp_split_rec", "dp_split_base", None).unwrap();
    let rt = Rt::start(1, true);
    let d = open("dp_split_rec");
    let data = pattern(20 * 512, 3);
    // One completion for the whole I/O; the base sees one write per boundary segment.
    ok(rt.io(0, &d, Req::Write(5, data.clone())));
    let offsets: Vec<(u64, usize)> = rec
        .log()
        .iter()
        .map(|e| match e {
            record::LogEntry::Write {
                offset_blocks,
                data,
            } => (*offset_blocks, data.len() / 512),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(offsets, vec![(5, 3), (8, 8), (16, 8), (24, 1)]);
    assert_eq!(
        ok(rt.io(0, &d, Req::Read(5, 20))),
        data,
        "split read reassembles"
    );
    // Inside one segment: no split.
    ok(rt.io(0, &d, Req::Write(16, pattern(8 * 512, 9))));
    assert_eq!(rec.log_len(), 5);
    // Unmap crossing boundaries is split too.
    ok(rt.io(0, &d, Req::Unmap(6, 4)));
    assert_eq!(rec.log_len(), 7);
    drop(d);
    drop(rt);
    bdev::registry().unregister("dp_split_rec").unwrap();
    malloc::delete("dp_split_base").unwrap();
}

#[test]
fn completion_runs_on_the_submitting_reactor() {
    malloc_bdev("dp_affinity", 128, 512, 4);
    let rt = Rt::start(2, true);
    let d = open("dp_affinity");
    for r in [0usize, 1, 1, 0] {
        let (st, _, on) = rt
            .io(r, &d, Req::Write(2, pattern(16 * 512, r as u8)))
            .unwrap();
        assert_eq!(st, IoStatus::Success);
        assert_eq!(on, r, "completion ran on reactor {on}, submitted on {r}");
        let (_, _, on) = rt.io(r, &d, Req::Read(0, 9)).unwrap();
        assert_eq!(on, r);
    }
    drop(d);
    drop(rt);
    malloc::delete("dp_affinity").unwrap();
}

#[test]
fn reset_completes_after_inflight_io() {
    malloc_bdev("dp_reset", 64, 512, 0);
    let rt = Rt::start(1, true);
    let d = open("dp_reset");
    let d2 = d.clone();
    // Submit writes and a reset in one reactor turn: the reset must complete last.
    let order = rt.call(0, move || {
        use std::cell::RefCell;
        use std::rc::Rc;
        let ch = d2.get_io_channel().unwrap();
        let order = Rc::new(RefCell::new(Vec::new()));
        let o = order.clone();
        let keep = ch.clone();
        let cb: bdev::IoCallback = Rc::new(move |io: bdev::IoDone| {
            let _ = &keep;
            o.borrow_mut().push(io.tag);
        });
        for i in 0..4 {
            ch.write(bdev::IoBuf::new(512), i, 1, i, &cb).unwrap();
        }
        ch.reset(99, &cb).unwrap();
        assert_eq!(ch.nr_inflight(), 5);
        while ch.nr_inflight() > 0 {
            ch.poll();
        }
        let v = order.borrow().clone();
        v
    });
    assert_eq!(
        order.last(),
        Some(&99),
        "reset completed before earlier I/O: {order:?}"
    );
    assert_eq!(order.len(), 5);
    drop(d);
    drop(rt);
    malloc::delete("dp_reset").unwrap();
}

mod never_panics {
    use std::cell::Cell;
    use std::rc::Rc;

    use bdev::{null, BdevDesc, IoBuf, IoCallback, IoDone};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Any (offset, length, buffer size) either completes successfully or is refused
        /// with EINVAL at submit; nothing panics and nothing is half-submitted.
        #[test]
        fn random_requests_complete_or_einval(
            kind in 0u8..4,
            off in prop_oneof![0u64..80, Just(u64::MAX), Just(u64::MAX - 3)],
            n in prop_oneof![0u64..80, Just(u64::MAX)],
            len in 0usize..(80 * 512 + 3),
        ) {
            let name = "dp_prop_null";
            if bdev::registry().lookup(name).is_none() {
                let _ = null::create(null::NullOpts {
                    name: name.into(), num_blocks: 64, block_size: 512, uuid: None,
                });
            }
            let desc = BdevDesc::open(name, true, |_| {}).unwrap();
            let ch = desc.get_io_channel().unwrap();
            let done = Rc::new(Cell::new(0));
            let d = done.clone();
            let cb: IoCallback = Rc::new(move |io: IoDone| {
                assert!(io.status.is_success());
                d.set(d.get() + 1);
            });
            let r = match kind {
                0 => ch.read(IoBuf::new(len), off, n, 0, &cb),
                1 => ch.write(IoBuf::new(len), off, n, 0, &cb),
                2 => ch.read_at(IoBuf::new(len), off, 0, &cb),
                _ => ch.write_zeroes(off, n, 0, &cb),
            };
            let valid_range = off.checked_add(n).is_some_and(|e| e <= 64) && n > 0;
            match r {
                Ok(()) => {
                    while ch.nr_inflight() > 0 {
                        ch.poll();
                    }
                    prop_assert_eq!(done.get(), 1);
                    if kind < 2 {
                        prop_assert!(valid_range && len as u64 == n * 512);
                    }
                }
                Err(e) => {
                    prop_assert_eq!(e.errno(), libc::EINVAL);
                    prop_assert_eq!(done.get(), 0);
                    if kind < 3 {
                        prop_assert_eq!(e.buf.map(|b| b.len()), Some(len));
                    }
                }
            }
        }
    }
}
