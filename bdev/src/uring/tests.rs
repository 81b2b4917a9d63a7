//! Unit tests of the uring bdev's control path: the buffered fallback when a file system
//! refuses O_DIRECT, driven off-reactor by polling the channel directly.

use std::cell::RefCell;
use std::fs::File;
use std::rc::Rc;

use super::*;
use crate::{BdevDesc, IoBuf, IoCallback, IoDone};

/// Behaves like a file system without O_DIRECT support (tmpfs before Linux 6.6).
fn refuse_direct(path: &str, direct: bool) -> std::io::Result<File> {
    if direct {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    open_file(path, false)
}

#[test]
fn falls_back_to_buffered_io_when_o_direct_is_refused() {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(64 * 512).unwrap();
    let opts = UringOpts {
        name: "uring_unit_fallback".into(),
        filename: f.path().to_str().unwrap().into(),
        block_size: None,
        uuid: None,
    };
    let b = create_with(opts, refuse_direct).unwrap();
    assert!(!b.o_direct());
    let info = crate::bdev_info_json(b.as_ref());
    assert_eq!(info["driver_specific"]["uring"]["o_direct"], false);
    assert_eq!(b.core().block_size(), 512);

    let desc = BdevDesc::open("uring_unit_fallback", true, |_| {}).unwrap();
    // A simulated reactor owns the channel, the ring and the buffers.
    let mut sim = reactor::sim::Sim::new(1, 1);
    let r0 = reactor::ReactorId::new(0);
    let got = Rc::new(RefCell::new(Vec::new()));
    let (ch, cb) = sim.enter(r0, || {
        let ch = desc.get_io_channel().unwrap();
        let g = got.clone();
        let cb: IoCallback = Rc::new(move |d: IoDone| {
            assert!(d.status.is_success(), "{:?}", d.status);
            g.borrow_mut().push(d.buf.as_deref().map(<[u8]>::to_vec));
        });
        let mut buf = IoBuf::new(1024);
        buf.fill(0xa5);
        ch.write(buf, 7, 2, 1, &cb).unwrap();
        (ch, cb)
    });
    sim.run_until_idle();
    assert_eq!(got.borrow().len(), 1);
    sim.enter(r0, || ch.read(IoBuf::new(1024), 7, 2, 2, &cb).unwrap());
    sim.run_until_idle();
    sim.enter(r0, move || drop((ch, cb)));
    let got = got.borrow().clone();
    assert_eq!(got[1].as_deref(), Some(&[0xa5u8; 1024][..]));
    let on_disk = std::fs::read(f.path()).unwrap();
    assert_eq!(&on_disk[7 * 512..9 * 512], &[0xa5u8; 1024][..]);
    drop(desc);
    delete("uring_unit_fallback").unwrap();
}
