//! Test harness: one in-process runtime (2 reactors, interrupt mode) running our own
//! NVMe-oF/TCP target (`nvmf`) on loopback and the host under test; RPC calls straight
//! into the handlers; bdev I/O submitted on a chosen reactor; a TCP proxy that can stall,
//! drop and restore the connection between host and target.
#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use bdev::{BdevChannel, BdevDesc, IoBuf, IoCallback, IoDone, IoStatus};
use reactor::{CoreMask, ReactorId, Runtime, RuntimeHandle, RuntimeOptions};
use serde_json::{json, Value};

static RT: OnceLock<RuntimeHandle> = OnceLock::new();

/// Starts (once) the shared runtime and the target's TCP transport (MDTS 128 KiB,
/// 8 KiB in-capsule data: larger writes take the R2T path).
pub fn runtime() -> RuntimeHandle {
    RT.get_or_init(|| {
        let mut opts = RuntimeOptions::new(CoreMask::parse("0x3").expect("mask"));
        opts.interrupt_mode = true;
        opts.pin_threads = false;
        let rt = Runtime::start(opts, || {}).expect("start reactors");
        let h = rt.handle();
        std::mem::forget(rt);
        nvmf::set_runtime(h.clone());
        nvme::set_runtime(h.clone());
        nvmf_rpc(
            "nvmf_create_transport",
            json!({"trtype": "TCP", "max_io_size": 131072, "in_capsule_data_size": 8192}),
        )
        .expect("transport");
        h
    })
    .clone()
}

/// Calls an nvmf (target) RPC.
pub fn nvmf_rpc(method: &str, params: Value) -> Result<Value, String> {
    let (_, h) = nvmf::rpc_methods()
        .into_iter()
        .find(|(m, _)| *m == method)
        .unwrap_or_else(|| panic!("no method {method}"));
    let (tx, rx) = mpsc::channel();
    h(params, Box::new(move |r| tx.send(r).expect("send")));
    rx.recv_timeout(Duration::from_secs(10))
        .expect("rpc answered")
        .map_err(|e| format!("{e:?}"))
}

/// Calls an nvme (host) RPC: `Err((errno, message))`.
pub fn rpc(method: &str, params: Value) -> Result<Value, (i32, String)> {
    runtime();
    let (_, h) = nvme::rpc_methods()
        .into_iter()
        .find(|(m, _)| *m == method)
        .unwrap_or_else(|| panic!("no method {method}"));
    let (tx, rx) = mpsc::channel();
    h(params, Box::new(move |r| tx.send(r).expect("send")));
    rx.recv_timeout(Duration::from_secs(30))
        .expect("rpc answered")
        .map_err(|e| (e.errno(), e.to_string()))
}

/// A free loopback port.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Creates malloc bdev `bdev` (`block_size`-byte blocks) and a subsystem exporting it on a
/// new port; returns the port.
pub fn export(nqn: &str, bdev: &str, num_blocks: u64, block_size: u32) -> u16 {
    runtime();
    bdev::malloc::create(bdev::malloc::MallocOpts {
        name: Some(bdev.to_owned()),
        num_blocks,
        block_size,
        uuid: None,
        optimal_io_boundary: 0,
    })
    .expect("malloc");
    nvmf_rpc(
        "nvmf_create_subsystem",
        json!({"nqn": nqn, "serial_number": "SN0001", "allow_any_host": true}),
    )
    .expect("subsystem");
    nvmf_rpc(
        "nvmf_subsystem_add_ns",
        json!({"nqn": nqn, "namespace": {"bdev_name": bdev}}),
    )
    .expect("ns");
    let port = free_port();
    nvmf_rpc(
        "nvmf_subsystem_add_listener",
        json!({"nqn": nqn, "listen_address":
        {"trtype": "tcp", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    )
    .expect("listener");
    port
}

/// Attaches controller `name` to `port`/`nqn` with extra params; returns the bdev names.
pub fn attach(
    name: &str,
    port: u16,
    nqn: &str,
    extra: Value,
) -> Result<Vec<String>, (i32, String)> {
    let mut p = json!({"name": name, "trtype": "tcp", "adrfam": "IPv4",
        "traddr": "127.0.0.1", "trsvcid": port.to_string(), "subnqn": nqn});
    if let (Some(o), Some(e)) = (p.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    let v = rpc("bdev_nvme_attach_controller", p)?;
    Ok(serde_json::from_value(v).expect("names"))
}

/// Detaches controller `name` after dropping the test's channels to its bdevs.
pub fn detach(name: &str) -> Result<Value, (i32, String)> {
    close_channels();
    rpc("bdev_nvme_detach_controller", json!({"name": name}))
}

thread_local! {
    /// Per reactor: open descriptors and channels of the bdevs the tests use.
    static CHANNELS: RefCell<HashMap<String, (BdevDesc, BdevChannel)>> = RefCell::new(HashMap::new());
}

/// Drops the cached descriptors/channels on every reactor.
pub fn close_channels() {
    let rt = runtime();
    for r in rt.reactor_ids() {
        rt.call(r, || CHANNELS.with(|c| c.borrow_mut().clear()))
            .expect("call");
    }
}

fn channel(bdev: &str) -> BdevChannel {
    CHANNELS.with(|c| {
        let mut c = c.borrow_mut();
        if let Some((_, ch)) = c.get(bdev) {
            return ch.clone();
        }
        let desc = BdevDesc::open(bdev, true, |_| {}).expect("open bdev");
        let ch = desc.get_io_channel().expect("channel");
        c.insert(bdev.to_owned(), (desc, ch.clone()));
        ch
    })
}

/// One I/O to submit.
#[derive(Clone, Debug)]
pub enum Op {
    /// Read `n` blocks at `lba`.
    Read(u64, u64),
    /// Write the data at `lba`.
    Write(u64, Vec<u8>),
    /// Unmap `n` blocks at `lba`.
    Unmap(u64, u64),
    /// Write zeroes to `n` blocks at `lba`.
    WriteZeroes(u64, u64),
    /// Flush.
    Flush,
}

/// Submits every op at once on reactor `r`; returns each op's status and read data, in order.
pub fn run_ops(r: u32, bdev: &str, ops: Vec<Op>) -> Vec<(IoStatus, Option<Vec<u8>>)> {
    run_ops_async(r, bdev, ops)
        .recv_timeout(Duration::from_secs(60))
        .expect("I/O completed")
}

/// Like [`run_ops`] but returns at once; the results arrive on the receiver.
pub fn run_ops_async(
    r: u32,
    bdev: &str,
    ops: Vec<Op>,
) -> mpsc::Receiver<Vec<(IoStatus, Option<Vec<u8>>)>> {
    let rt = runtime();
    let (tx, rx) = mpsc::channel();
    let bdev = bdev.to_owned();
    rt.send_msg(ReactorId::new(r), move || {
        let ch = channel(&bdev);
        let bs = u64::from(ch.bdev().block_size());
        let n = ops.len();
        let results = Rc::new(RefCell::new(vec![None; n]));
        let left = Rc::new(RefCell::new(n));
        let res2 = results.clone();
        let keep = RefCell::new(Some(ch.clone()));
        let cb: IoCallback = Rc::new(move |d: IoDone| {
            let data = d.buf.map(|b: IoBuf| b.to_vec());
            res2.borrow_mut()[d.tag as usize] = Some((d.status, data));
            *left.borrow_mut() -= 1;
            if *left.borrow() == 0 {
                let out = res2
                    .borrow_mut()
                    .drain(..)
                    .map(|x| x.expect("result"))
                    .collect();
                let _ = tx.send(out);
                keep.borrow_mut().take();
            }
        });
        for (i, op) in ops.into_iter().enumerate() {
            let tag = i as u64;
            let r = match op {
                Op::Read(lba, nb) => ch.read(IoBuf::alloc((nb * bs) as usize), lba, nb, tag, &cb),
                Op::Write(lba, data) => {
                    let mut b = IoBuf::alloc(data.len());
                    b.copy_from_slice(&data);
                    ch.write(b, lba, data.len() as u64 / bs, tag, &cb)
                }
                Op::Unmap(lba, nb) => ch.unmap(lba, nb, tag, &cb),
                Op::WriteZeroes(lba, nb) => ch.write_zeroes(lba, nb, tag, &cb),
                Op::Flush => ch.flush(0, 0, tag, &cb),
            };
            if let Err(e) = r {
                panic!("submit {i}: {e}");
            }
        }
    });
    rx
}

/// Deterministic pattern for (seed, len).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A TCP proxy between the host and the target that can stall and drop connections.
pub struct Proxy {
    pub port: u16,
    target: u16,
    stop: Arc<AtomicBool>,
    pub paused: Arc<AtomicBool>,
    /// Replace the next target-to-host chunk with garbage.
    pub corrupt: Arc<AtomicBool>,
    socks: Arc<Mutex<Vec<TcpStream>>>,
    pub nr_accepted: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Proxy {
    /// Listens on `port` (0 = any) and forwards to `target`.
    pub fn start(port: u16, target: u16) -> Proxy {
        let l = TcpListener::bind(("127.0.0.1", port)).expect("proxy bind");
        let port = l.local_addr().expect("addr").port();
        l.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let corrupt = Arc::new(AtomicBool::new(false));
        let c2 = corrupt.clone();
        let socks: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let nr = Arc::new(AtomicU64::new(0));
        let (s2, p2, k2, n2) = (stop.clone(), paused.clone(), socks.clone(), nr.clone());
        let thread = thread::spawn(move || {
            while !s2.load(Ordering::Acquire) {
                match l.accept() {
                    Ok((c, _)) => {
                        n2.fetch_add(1, Ordering::Relaxed);
                        c.set_nonblocking(false).expect("blocking");
                        let Ok(t) = TcpStream::connect(("127.0.0.1", target)) else {
                            continue;
                        };
                        let mut k = k2.lock().expect("socks");
                        k.push(c.try_clone().expect("clone"));
                        k.push(t.try_clone().expect("clone"));
                        drop(k);
                        for (mut from, mut to, to_host) in [
                            (
                                c.try_clone().expect("clone"),
                                t.try_clone().expect("clone"),
                                false,
                            ),
                            (t, c, true),
                        ] {
                            let (s3, p3, c3) = (s2.clone(), p2.clone(), c2.clone());
                            thread::spawn(move || {
                                let mut buf = vec![0u8; 65536];
                                loop {
                                    let n = match from.read(&mut buf) {
                                        Ok(0) | Err(_) => break,
                                        Ok(n) => n,
                                    };
                                    while p3.load(Ordering::Acquire) && !s3.load(Ordering::Acquire)
                                    {
                                        thread::sleep(Duration::from_millis(2));
                                    }
                                    if to_host && c3.swap(false, Ordering::AcqRel) {
                                        buf[..n].fill(0xFF);
                                    }
                                    if s3.load(Ordering::Acquire)
                                        || to.write_all(&buf[..n]).is_err()
                                    {
                                        break;
                                    }
                                }
                                let _ = to.shutdown(Shutdown::Both);
                                let _ = from.shutdown(Shutdown::Both);
                            });
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy {
            port,
            target,
            stop,
            paused,
            corrupt,
            socks,
            nr_accepted: nr,
            thread: Some(thread),
        }
    }

    /// Drops every connection and stops listening (the port refuses connections).
    pub fn kill(&mut self) {
        self.stop.store(true, Ordering::Release);
        for s in self.socks.lock().expect("socks").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Counter `key` of controller `name` (from `bdev_nvme_get_controllers`).
pub fn stat(name: &str, key: &str) -> u64 {
    let c = rpc("bdev_nvme_get_controllers", json!({"name": name})).expect("get");
    c[0]["ctrlrs"][0]["stats"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no stat {key}: {c}"))
}
