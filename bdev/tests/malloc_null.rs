//! Data-path tests on null and malloc bdevs, driven by polling the channel on the test thread.

use std::cell::RefCell;
use std::rc::Rc;

use bdev::{malloc, null, BdevChannel, BdevDesc, IoBuf, IoCallback, IoDone, IoStatus};

fn collector() -> (IoCallback, Rc<RefCell<Vec<IoDone>>>) {
    let done = Rc::new(RefCell::new(Vec::new()));
    let d = done.clone();
    (Rc::new(move |io: IoDone| d.borrow_mut().push(io)), done)
}

fn wait(ch: &BdevChannel, done: &Rc<RefCell<Vec<IoDone>>>, n: usize) -> Vec<IoDone> {
    for _ in 0..10_000 {
        if done.borrow().len() >= n {
            break;
        }
        ch.poll();
    }
    std::mem::take(&mut *done.borrow_mut())
}

#[test]
fn malloc_write_read_roundtrip() {
    let b = malloc::create(malloc::MallocOpts {
        name: Some("smoke_malloc0".into()),
        num_blocks: 64,
        block_size: 512,
        ..Default::default()
    })
    .unwrap();
    let desc = BdevDesc::open("smoke_malloc0", true, |_| {}).unwrap();
    let ch = desc.get_io_channel().unwrap();
    let (cb, done) = collector();
    let data: Vec<u8> = (0..1024).map(|i| (i * 7 % 251) as u8).collect();
    ch.write(IoBuf::from_slice(&data), 3, 2, 1, &cb).unwrap();
    assert!(done.borrow().is_empty(), "completion must not run inside submit");
    let r = wait(&ch, &done, 1);
    assert_eq!(r[0].status, IoStatus::Success);
    ch.read(IoBuf::new(1024), 3, 2, 2, &cb).unwrap();
    let r = wait(&ch, &done, 1);
    assert_eq!(r[0].tag, 2);
    assert_eq!(&r[0].buf.as_ref().unwrap()[..], &data[..]);
    drop(ch);
    drop(desc);
    malloc::delete(bdev::Bdev::name(b.as_ref())).unwrap();
}

#[test]
fn null_completes() {
    null::create(null::NullOpts {
        name: "smoke_null0".into(),
        num_blocks: 1024,
        block_size: 4096,
        uuid: None,
    })
    .unwrap();
    let desc = BdevDesc::open("smoke_null0", true, |_| {}).unwrap();
    let ch = desc.get_io_channel().unwrap();
    let (cb, done) = collector();
    ch.read(IoBuf::new(4096), 0, 1, 9, &cb).unwrap();
    let r = wait(&ch, &done, 1);
    assert_eq!(r[0].status, IoStatus::Success);
    let e = ch.read(IoBuf::new(4096), 1024, 1, 9, &cb).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
}
