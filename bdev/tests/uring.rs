//! The uring bdev on a temp file and on /dev/shm (tmpfs; it accepts O_DIRECT only since Linux
//! 6.6 — the buffered fallback itself is unit-tested in `uring::tests`), in poll and
//! interrupt mode; rescan after growth sends a resize event.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use bdev::{uring, Bdev, BdevDesc, BdevEvent};
use common::{ok, pattern, Req, Rt};

fn temp_file_in(dir: &str, len: u64) -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new()
        .prefix("bdev-uring-")
        .tempfile_in(dir)
        .unwrap();
    f.as_file().set_len(len).unwrap();
    f
}

fn roundtrip(dir: &str, name: &str, interrupt: bool, expect_direct: Option<bool>) {
    let f = temp_file_in(dir, 1 << 20);
    let path = f.path().to_str().unwrap().to_string();
    let b = uring::create(uring::UringOpts {
        name: name.into(),
        filename: path.clone(),
        block_size: None,
        uuid: None,
    })
    .unwrap();
    if let Some(direct) = expect_direct {
        assert_eq!(b.o_direct(), direct, "O_DIRECT on {dir}");
    }
    let bs = b.block_size() as usize;
    assert_eq!(b.num_blocks(), (1 << 20) / bs as u64);
    let rt = Rt::start(2, interrupt);
    let d = common::open(name);
    let data = pattern(16 * bs, 5);
    ok(rt.io(0, &d, Req::Write(3, data.clone())));
    ok(rt.io(0, &d, Req::Flush(0, 0)));
    assert_eq!(ok(rt.io(1, &d, Req::Read(3, 16))), data);
    // The bytes are really in the file.
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[3 * bs..19 * bs], &data[..]);
    ok(rt.io(1, &d, Req::Unmap(4, 2)));
    ok(rt.io(0, &d, Req::WriteZeroes(10, 3)));
    let mut expect = data.clone();
    expect[bs..3 * bs].fill(0);
    expect[7 * bs..10 * bs].fill(0);
    assert_eq!(
        ok(rt.io(0, &d, Req::Read(3, 16))),
        expect,
        "unmap/write_zeroes read as zeroes"
    );
    // Many concurrent I/Os (more than the ring holds) on one reactor.
    let rxs: Vec<_> = (0..600u64)
        .map(|i| rt.submit(0, &d, Req::Write(i % 200, pattern(bs, i as u8))))
        .collect();
    for rx in rxs {
        ok(rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap());
    }
    let end = b.num_blocks();
    assert_eq!(rt.io(0, &d, Req::Read(end, 1)).unwrap_err(), libc::EINVAL);
    drop(d);
    drop(rt);
    uring::delete(name).unwrap();
}

#[test]
fn uring_file_roundtrip_poll_mode() {
    roundtrip(env!("CARGO_TARGET_TMPDIR"), "ur_file_poll", false, None);
}

#[test]
fn uring_file_roundtrip_interrupt_mode() {
    roundtrip(env!("CARGO_TARGET_TMPDIR"), "ur_file_intr", true, None);
}

#[test]
fn uring_on_dev_shm() {
    assert!(
        std::path::Path::new("/dev/shm").is_dir(),
        "/dev/shm is required"
    );
    roundtrip("/dev/shm", "ur_shm", true, None);
}

#[test]
fn uring_file_uses_o_direct_on_ext4_or_xfs() {
    // The target dir is on the project's disk file system, which supports O_DIRECT.
    roundtrip(env!("CARGO_TARGET_TMPDIR"), "ur_direct", false, Some(true));
}

#[test]
fn rescan_after_growth_sends_resize() {
    let mut f = temp_file_in(env!("CARGO_TARGET_TMPDIR"), 64 * 4096);
    let b = uring::create(uring::UringOpts {
        name: "ur_rescan".into(),
        filename: f.path().to_str().unwrap().into(),
        block_size: Some(4096),
        uuid: None,
    })
    .unwrap();
    assert_eq!(b.num_blocks(), 64);
    let rt = Rt::start(1, true);
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    // Opened on reactor 0: the event must be delivered there.
    let desc = rt.call(0, move || {
        Arc::new(
            BdevDesc::open("ur_rescan", true, move |e: BdevEvent| {
                ev.lock()
                    .unwrap()
                    .push((e, reactor::try_current().map(|r| r.index())));
            })
            .unwrap(),
        )
    });
    f.as_file_mut().set_len(100 * 4096).unwrap();
    f.flush().unwrap();
    let rpc = bdev::rpc_methods()
        .into_iter()
        .find(|(m, _)| *m == "bdev_uring_rescan")
        .unwrap()
        .1;
    rpc(serde_json::json!({"name": "ur_rescan"})).unwrap();
    assert_eq!(b.num_blocks(), 100);
    rt.call(0, || ()); // the event message was queued before this one
    assert_eq!(
        *events.lock().unwrap(),
        vec![(BdevEvent::Resize { num_blocks: 100 }, Some(0))]
    );
    // The new blocks are usable.
    ok(rt.io(0, &desc, Req::Write(99, pattern(4096, 1))));
    // Rescan without change: no event.
    uring::rescan("ur_rescan").unwrap();
    rt.call(0, || ());
    assert_eq!(events.lock().unwrap().len(), 1);
    drop(desc);
    drop(rt);
    uring::delete("ur_rescan").unwrap();
}

#[test]
fn uring_create_errors() {
    let e = uring::create(uring::UringOpts {
        name: "ur_missing".into(),
        filename: "/nonexistent/dir/file".into(),
        block_size: None,
        uuid: None,
    })
    .err()
    .unwrap();
    assert_eq!(e.errno(), libc::ENOENT);
    assert!(e.to_string().contains("/nonexistent/dir/file"), "{e}");
    let f = temp_file_in(env!("CARGO_TARGET_TMPDIR"), 100);
    let e = uring::create(uring::UringOpts {
        name: "ur_tiny".into(),
        filename: f.path().to_str().unwrap().into(),
        block_size: Some(512),
        uuid: None,
    })
    .err()
    .unwrap();
    assert_eq!(e.errno(), libc::EINVAL, "file smaller than a block: {e}");
    assert!(bdev::registry().lookup("ur_tiny").is_none());
}

#[test]
fn uring_under_the_simulator_is_deterministic_per_reactor() {
    use std::cell::RefCell;
    use std::rc::Rc;

    use bdev::{IoBuf, IoCallback, IoDone, IoStatus};
    use reactor::ReactorId;

    let f = temp_file_in(env!("CARGO_TARGET_TMPDIR"), 256 * 4096);
    uring::create(uring::UringOpts {
        name: "ur_sim".into(),
        filename: f.path().to_str().unwrap().into(),
        block_size: Some(4096),
        uuid: None,
    })
    .unwrap();
    let desc = Arc::new(BdevDesc::open("ur_sim", true, |_| {}).unwrap());
    let mut sim = reactor::sim::Sim::from_env(2);
    type Done = Vec<(u64, IoStatus, usize, u8)>;
    let done: Rc<RefCell<Done>> = Rc::default();
    let mut keep = Vec::new();
    for r in 0..2u32 {
        let d = done.clone();
        let desc = desc.clone();
        keep.push(sim.enter(ReactorId::new(r), move || {
            let ch = desc.get_io_channel().unwrap();
            let cb: IoCallback = Rc::new(move |io: IoDone| {
                let first = io.buf.as_deref().map_or(0, |b| b[0]);
                d.borrow_mut()
                    .push((io.tag, io.status, reactor::current().index(), first));
            });
            for i in 0..64u64 {
                let buf = IoBuf::from_slice(&[r as u8 + 1; 4096]);
                ch.write(buf, u64::from(r) * 128 + i, 1, i, &cb).unwrap();
            }
            ch.flush(0, 0, 100, &cb).unwrap();
            (ch, cb)
        }));
    }
    sim.run_until_idle();
    {
        let v = done.borrow();
        assert_eq!(v.len(), 130);
        assert!(v.iter().all(|e| e.1 == IoStatus::Success), "{v:?}");
    }
    done.borrow_mut().clear();
    // Reactor 1 reads what reactor 0 wrote, and vice versa.
    for r in 0..2u32 {
        let (ch, cb) = keep[r as usize].clone();
        sim.enter(ReactorId::new(r), move || {
            let other = 1 - u64::from(r);
            ch.read(IoBuf::new(4096), other * 128 + 5, 1, u64::from(r), &cb)
                .unwrap();
        });
    }
    sim.run_until_idle();
    let mut v = done.borrow().clone();
    v.sort_by_key(|e| e.0);
    assert_eq!(
        v,
        vec![(0, IoStatus::Success, 0, 2), (1, IoStatus::Success, 1, 1)]
    );
    for (r, k) in keep.into_iter().enumerate() {
        sim.enter(ReactorId::new(r as u32), move || drop(k));
    }
    drop(desc);
    uring::delete("ur_sim").unwrap();
}
