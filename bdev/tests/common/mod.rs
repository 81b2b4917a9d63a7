//! Test harness: a real reactor runtime (poll or interrupt mode) driven from the test
//! thread with messages; every bdev buffer is created and dropped on a reactor.

#![allow(dead_code)]

use std::rc::Rc;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bdev::{BdevDesc, IoBuf, IoCallback, IoDone, IoStatus};
use reactor::{CoreMask, ReactorId, Runtime, RuntimeHandle, RuntimeOptions};

/// One runtime at a time per test binary: the machine has two cores.
static SERIAL: Mutex<()> = Mutex::new(());

pub struct Rt {
    rt: Option<Runtime>,
    pub h: RuntimeHandle,
    _serial: MutexGuard<'static, ()>,
}

/// An I/O request for [`Rt::io`].
#[derive(Debug, Clone)]
pub enum Req {
    Read(u64, u64),
    Write(u64, Vec<u8>),
    Unmap(u64, u64),
    WriteZeroes(u64, u64),
    Flush(u64, u64),
    Reset,
    /// Read with a buffer of the given byte length (for length-mismatch tests).
    ReadLen(u64, u64, usize),
    ReadAt(u64, usize),
}

/// Completed: status, data read, reactor index the completion ran on.
pub type Res = Result<(IoStatus, Vec<u8>, usize), i32>;

impl Rt {
    pub fn start(nr: usize, interrupt: bool) -> Rt {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let avail = reactor::cpu::available_cores();
        let pin = avail.len() >= nr;
        let cores: Vec<usize> = if pin {
            avail[..nr].to_vec()
        } else {
            (0..nr).collect()
        };
        let mut opts = RuntimeOptions::new(CoreMask::from_cores(cores).unwrap());
        opts.interrupt_mode = interrupt;
        opts.pin_threads = pin;
        let rt = Runtime::start(opts, || {}).unwrap();
        let h = rt.handle();
        Rt {
            rt: Some(rt),
            h,
            _serial: serial,
        }
    }

    pub fn call<R: Send + 'static>(&self, r: usize, f: impl FnOnce() -> R + Send + 'static) -> R {
        self.h.call(ReactorId::new(r as u32), f).unwrap()
    }

    /// Submits `req` on reactor `r` through `desc` and waits for the completion.
    pub fn io(&self, r: usize, desc: &Arc<BdevDesc>, req: Req) -> Res {
        let rx = self.submit(r, desc, req);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("I/O did not complete in 10 s")
    }

    /// Submits without waiting; the result arrives on the returned receiver.
    pub fn submit(&self, r: usize, desc: &Arc<BdevDesc>, req: Req) -> mpsc::Receiver<Res> {
        let (tx, rx) = mpsc::channel();
        let desc = desc.clone();
        self.h.send_msg(ReactorId::new(r as u32), move || {
            submit_here(&desc, req, tx)
        });
        rx
    }
}

/// Submits `req` on the current reactor; the result goes to `tx`.
pub fn submit_here(desc: &BdevDesc, req: Req, tx: mpsc::Sender<Res>) {
    let ch = match desc.get_io_channel() {
        Ok(ch) => ch,
        Err(e) => {
            let _ = tx.send(Err(e.errno()));
            return;
        }
    };
    let keep = ch.clone();
    let tx2 = tx.clone();
    let cb: IoCallback = Rc::new(move |d: IoDone| {
        let _channel_alive_until_done = &keep;
        let data = d.buf.as_ref().map(|b| b.to_vec()).unwrap_or_default();
        let _ = tx2.send(Ok((d.status, data, reactor::current().index())));
    });
    let bs = u64::from(desc.bdev().block_size());
    let r = match req {
        Req::Read(off, n) => ch.read(IoBuf::new((n * bs) as usize), off, n, 0, &cb),
        Req::ReadLen(off, n, len) => ch.read(IoBuf::new(len), off, n, 0, &cb),
        Req::ReadAt(off_bytes, len) => ch.read_at(IoBuf::new(len), off_bytes, 0, &cb),
        Req::Write(off, data) => {
            let n = data.len() as u64 / bs;
            ch.write(IoBuf::from_slice(&data), off, n, 0, &cb)
        }
        Req::Unmap(off, n) => ch.unmap(off, n, 0, &cb),
        Req::WriteZeroes(off, n) => ch.write_zeroes(off, n, 0, &cb),
        Req::Flush(off, n) => ch.flush(off, n, 0, &cb),
        Req::Reset => ch.reset(0, &cb),
    };
    if let Err(e) = r {
        let _ = tx.send(Err(e.errno()));
    }
}

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.stop_handle().stop();
            let _ = rt.join();
        }
    }
}

/// Deterministic test data.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// Opens `name` for write with a no-op event callback.
pub fn open(name: &str) -> Arc<BdevDesc> {
    Arc::new(BdevDesc::open(name, true, |_| {}).unwrap())
}

/// Asserts a successful completion and returns its data.
pub fn ok(r: Res) -> Vec<u8> {
    match r {
        Ok((IoStatus::Success, data, _)) => data,
        other => panic!("expected success, got {other:?}"),
    }
}
