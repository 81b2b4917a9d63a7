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
