//! Shared test frontend: guest memory in a memfd, split rings we fill, the rust-vmm frontend
//! for the protocol, and helpers to create bdevs and controllers.

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost_user::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost_user::vhost_user::{Frontend, VhostUserFrontend};
use vhost_user::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub const MEM_SIZE: usize = 4 << 20;
pub const UVA_BASE: u64 = 0x7f00_0000_0000;
pub const QSIZE: u16 = 16;
pub const DESC: u64 = 0x0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;
pub const HDR: u64 = 0x3000;
pub const STATUS: u64 = 0x3100;
pub const DATA: u64 = 0x10_0000;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

static DIR: OnceLock<PathBuf> = OnceLock::new();

/// Starts the test process's runtime (reactors on `mask`, interrupt or poll mode) and the
/// socket directory; later calls return the first result.
pub fn setup_runtime(mask: &str, interrupt: bool) -> PathBuf {
    setup_runtime_in(mask, interrupt, None)
}

/// As [`setup_runtime`], with controller sockets in `dir` (a fresh temp dir if `None`).
pub fn setup_runtime_in(mask: &str, interrupt: bool, dir: Option<PathBuf>) -> PathBuf {
    DIR.get_or_init(|| {
        let dir = dir.unwrap_or_else(|| tempfile::tempdir().expect("tempdir").keep());
        let mut opts = reactor::RuntimeOptions::new(reactor::CoreMask::parse(mask).unwrap());
        opts.interrupt_mode = interrupt;
        opts.pin_threads = false;
        let rt = reactor::Runtime::start(opts, || {}).expect("runtime");
        vhost::set_runtime(rt.handle());
        bdev::thin::set_runtime(rt.handle());
        vhost::set_socket_dir(&dir);
        std::mem::forget(rt);
        dir
    })
    .clone()
}

/// The socket directory (after [`setup_runtime`]).
pub fn setup() -> PathBuf {
    DIR.get().expect("setup_runtime first").clone()
}

pub fn call(method: &str, params: Value) -> Result<Value, vhost::VhostRpcError> {
    let (_, h) = vhost::rpc_methods()
        .into_iter()
        .find(|(m, _)| *m == method)
        .expect("method");
    let (tx, rx) = mpsc::channel();
    h(params, Box::new(move |r| tx.send(r).unwrap()));
    rx.recv_timeout(Duration::from_secs(10))
        .expect("rpc answer")
}

/// Calls a `bdev_thin_*` RPC handler and waits for its answer.
pub fn thin_call(method: &str, params: Value) -> Value {
    let (_, h) = bdev::thin::rpc::rpc_methods()
        .into_iter()
        .find(|(m, _)| *m == method)
        .expect("thin method");
    let (tx, rx) = mpsc::channel();
    h(params, Box::new(move |r| tx.send(r).unwrap()));
    rx.recv_timeout(Duration::from_secs(20))
        .expect("thin rpc answer")
        .unwrap_or_else(|e| panic!("{method}: {e}"))
}

pub fn malloc(name: &str, num_blocks: u64, block_size: u32) {
    bdev::malloc::create(bdev::malloc::MallocOpts {
        name: Some(name.into()),
        num_blocks,
        block_size,
        uuid: None,
        optimal_io_boundary: 0,
    })
    .expect("malloc");
}

pub fn controller(name: &str, bdev: &str, readonly: bool) -> PathBuf {
    let dir = setup();
    call(
        "vhost_create_blk_controller",
        json!({"ctrlr": name, "dev_name": bdev, "readonly": readonly}),
    )
    .expect("create controller");
    dir.join(name)
}

/// Guest memory: a memfd mapped here and handed to the backend.
pub struct Mem {
    pub file: File,
    pub ptr: *mut u8,
}

impl Mem {
    pub fn new() -> Mem {
        // SAFETY: memfd_create with a NUL-terminated name; the fd is owned by File.
        let file = unsafe { File::from_raw_fd(libc::memfd_create(c"guest".as_ptr(), 0)) };
        file.set_len(MEM_SIZE as u64).unwrap();
        // SAFETY: mapping the whole memfd we just sized; checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Mem {
            file,
            ptr: ptr.cast(),
        }
    }
    pub fn slice(&self, gpa: u64, len: usize) -> &[u8] {
        assert!(gpa as usize + len <= MEM_SIZE);
        // SAFETY: in bounds of our mapping; the backend writes only to buffers of requests we
        // are waiting for, and we read them after the used index moved.
        unsafe { std::slice::from_raw_parts(self.ptr.add(gpa as usize), len) }
    }
    pub fn put(&self, gpa: u64, b: &[u8]) {
        assert!(gpa as usize + b.len() <= MEM_SIZE);
        // SAFETY: in bounds of our mapping (asserted); `b` is a separate allocation.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.ptr.add(gpa as usize), b.len()) };
    }
    pub fn u16_at(&self, gpa: u64) -> u16 {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        u16::from_le_bytes(self.slice(gpa, 2).try_into().unwrap())
    }
    pub fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: UVA_BASE,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }
}

/// Opens a session: features (EVENT_IDX only if `event_idx`), protocol features CONFIG, MQ,
/// REPLY_ACK and `extra`, NEED_REPLY on every message.
pub fn handshake(path: &PathBuf, extra: VhostUserProtocolFeatures, event_idx: bool) -> Frontend {
    let mut fe = Frontend::connect(path, 16).expect("connect");
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    assert_ne!(features & (1 << 32), 0, "VERSION_1 offered");
    assert_ne!(features & (1 << 30), 0, "PROTOCOL_FEATURES offered");
    let features = if event_idx {
        features
    } else {
        features & !(1 << 29)
    };
    fe.set_features(features).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    assert!(pf.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
    fe.set_protocol_features(
        pf & (VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | extra),
    )
    .unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert!(fe.get_queue_num().unwrap() >= 2);
    fe
}

/// One connected test frontend with queue 0 running.
pub struct Fe {
    pub fe: Frontend,
    pub mem: Mem,
    pub kick: EventFd,
    pub _call: EventFd,
    pub avail_idx: u16,
    pub used_seen: u16,
    /// Offset of the current queue's ring and buffers (queue q uses q * QUEUE_STRIDE).
    pub off: u64,
    /// Kick eventfds of queues 1.. (queue 0 uses `kick`).
    pub more_kicks: Vec<EventFd>,
}

/// Distance between the rings and buffers of consecutive queues in guest memory.
pub const QUEUE_STRIDE: u64 = 0x8000;

impl Fe {
    pub fn connect(path: &PathBuf) -> Fe {
        Fe::connect_with(
            path,
            Mem::new(),
            None,
            0,
            VhostUserProtocolFeatures::empty(),
            false,
        )
    }

    /// Connects with `mem` as guest memory, optionally handing over an in-flight area, and
    /// starts queue 0 at avail index `base`.
    pub fn connect_with(
        path: &PathBuf,
        mem: Mem,
        inflight: Option<(&VhostUserInflight, &File)>,
        base: u16,
        extra: VhostUserProtocolFeatures,
        event_idx: bool,
    ) -> Fe {
        let mut fe = handshake(path, extra, event_idx);
        if let Some((desc, file)) = inflight {
            fe.set_inflight_fd(desc, file.as_raw_fd())
                .expect("SET_INFLIGHT_FD");
        }
        Fe::finish_connect(fe, mem, base)
    }

    /// Connects with INFLIGHT_SHMFD and asks for a fresh in-flight area for one queue on this
    /// connection, as QEMU does on a device's first start; queue 0 starts at `base`.
    pub fn connect_new_inflight(
        path: &PathBuf,
        mem: Mem,
        base: u16,
    ) -> (Fe, VhostUserInflight, File) {
        let mut fe = handshake(path, VhostUserProtocolFeatures::INFLIGHT_SHMFD, false);
        let (area, file) = fe
            .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QSIZE))
            .expect("GET_INFLIGHT_FD");
        (Fe::finish_connect(fe, mem, base), area, file)
    }

    /// A frontend with no session (the backend is gone or not yet reconnected), for laying
    /// out requests in `mem`; its `fe` is an unconnected placeholder.
    pub fn detached(mem: Mem) -> Fe {
        let (a, _b) = UnixStream::pair().unwrap();
        Fe {
            fe: Frontend::from_stream(a, 16),
            mem,
            kick: EventFd::new(0).unwrap(),
            _call: EventFd::new(0).unwrap(),
            avail_idx: 0,
            used_seen: 0,
            off: 0,
            more_kicks: Vec::new(),
        }
    }

    /// Completes a session opened with [`handshake`]: memory table, queue 0 started at `base`.
    pub fn finish_connect(fe: Frontend, mem: Mem, base: u16) -> Fe {
        fe.set_mem_table(&[mem.region()]).unwrap();
        let kick = EventFd::new(0).unwrap();
        let call = EventFd::new(0).unwrap();
        let fe = Fe {
            fe,
            mem,
            kick,
            _call: call,
            avail_idx: base,
            used_seen: base,
            off: 0,
            more_kicks: Vec::new(),
        };
        fe.start_queue_at(0, DESC, AVAIL, USED, base);
        fe
    }

    pub fn start_queue(&self, q: usize, desc: u64, avail: u64, used: u64) {
        self.start_queue_at(q, desc, avail, used, 0);
    }

    /// Starts queue `q` (>= 1) with its own kick and ring at `q * QUEUE_STRIDE`, and makes it
    /// the queue requests go to.
    pub fn use_queue(&mut self, q: usize) {
        while self.more_kicks.len() < q {
            self.more_kicks.push(EventFd::new(0).unwrap());
        }
        let off = q as u64 * QUEUE_STRIDE;
        self.fe.set_vring_num(q, QSIZE).unwrap();
        let cfg = VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: UVA_BASE + off + DESC,
            used_ring_addr: UVA_BASE + off + USED,
            avail_ring_addr: UVA_BASE + off + AVAIL,
            log_addr: None,
        };
        self.fe.set_vring_addr(q, &cfg).unwrap();
        self.fe.set_vring_base(q, 0).unwrap();
        self.fe.set_vring_call(q, &self._call).unwrap();
        self.fe.set_vring_kick(q, &self.more_kicks[q - 1]).unwrap();
        let mut fe = self.fe.clone();
        fe.set_vring_enable(q, true).unwrap();
        self.off = off;
        self.avail_idx = 0;
        self.used_seen = 0;
    }

    pub fn start_queue_at(&self, q: usize, desc: u64, avail: u64, used: u64, base: u16) {
        self.fe.set_vring_num(q, QSIZE).unwrap();
        let cfg = VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: UVA_BASE + desc,
            used_ring_addr: UVA_BASE + used,
            avail_ring_addr: UVA_BASE + avail,
            log_addr: None,
        };
        self.fe.set_vring_addr(q, &cfg).unwrap();
        self.fe.set_vring_base(q, base).unwrap();
        self.fe.set_vring_call(q, &self._call).unwrap();
        self.fe.set_vring_kick(q, &self.kick).unwrap();
        let mut fe = self.fe.clone();
        fe.set_vring_enable(q, true).unwrap();
    }

    pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&addr.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&next.to_le_bytes());
        self.mem.put((self.off + DESC) + u64::from(i) * 16, &b);
    }

    /// Publishes `head` in the avail ring and kicks.
    pub fn publish(&mut self, head: u16) {
        let slot = (self.off + AVAIL) + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem.put(slot, &head.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .put((self.off + AVAIL) + 2, &self.avail_idx.to_le_bytes());
        let q = (self.off / QUEUE_STRIDE) as usize;
        if q == 0 {
            self.kick.write(1).unwrap();
        } else {
            self.more_kicks[q - 1].write(1).unwrap();
        }
    }

    /// Waits for the next used entry; returns (id, len), or None after `limit`.
    pub fn wait_used(&mut self, limit: Duration) -> Option<(u32, u32)> {
        let deadline = Instant::now() + limit;
        while self.mem.u16_at((self.off + USED) + 2) == self.used_seen {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let e = self.mem.slice(
            (self.off + USED) + 4 + 8 * u64::from(self.used_seen % QSIZE),
            8,
        );
        let id = u32::from_le_bytes(e[0..4].try_into().unwrap());
        let len = u32::from_le_bytes(e[4..8].try_into().unwrap());
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id, len))
    }

    /// Runs one request: header, optional data (readable or writable), status.
    pub fn request(&mut self, t: u32, sector: u64, data: &[u8], data_writable: bool) -> (u8, u32) {
        let mut hdr = Vec::new();
        hdr.extend_from_slice(&t.to_le_bytes());
        hdr.extend_from_slice(&0u32.to_le_bytes());
        hdr.extend_from_slice(&sector.to_le_bytes());
        self.mem.put(self.off + HDR, &hdr);
        self.mem.put(self.off + STATUS, &[0xff]);
        self.desc(0, self.off + HDR, 16, 1, 1);
        if data.is_empty() {
            self.desc(1, self.off + STATUS, 1, 2, 0);
        } else {
            self.mem.put(self.off * 8 + DATA, data);
            self.desc(
                1,
                self.off * 8 + DATA,
                data.len() as u32,
                1 | if data_writable { 2 } else { 0 },
                2,
            );
            self.desc(2, self.off + STATUS, 1, 2, 0);
        }
        self.publish(0);
        let (id, len) = self.wait_used(Duration::from_secs(10)).expect("completion");
        assert_eq!(id, 0);
        (self.mem.slice(self.off + STATUS, 1)[0], len)
    }

    pub fn read(&mut self, sector: u64, len: usize) -> (u8, Vec<u8>) {
        let (st, used) = self.request(T_IN, sector, &vec![0u8; len], true);
        if st == S_OK {
            assert_eq!(used as usize, len + 1);
        }
        (st, self.mem.slice(self.off * 8 + DATA, len).to_vec())
    }

    pub fn dwz(&mut self, t: u32, sector: u64, n: u32, flags: u32) -> u8 {
        let mut seg = Vec::new();
        seg.extend_from_slice(&sector.to_le_bytes());
        seg.extend_from_slice(&n.to_le_bytes());
        seg.extend_from_slice(&flags.to_le_bytes());
        self.request(t, sector, &seg, false).0
    }
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

pub fn delete_when_idle(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match call("vhost_delete_controller", json!({"ctrlr": name})) {
            Ok(_) => return,
            Err(e) if e.code == -libc::EBUSY && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("delete {name}: {e:?}"),
        }
    }
}

/// Sends one hand-built message (with fds) on a raw socket.
pub fn raw_msg(s: &UnixStream, req: u32, flags: u32, payload: &[u8], fds: &[i32]) {
    let mut m = Vec::new();
    m.extend_from_slice(&req.to_le_bytes());
    m.extend_from_slice(&(flags | 1).to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    s.send_with_fds(&[&m[..]], fds).unwrap();
}
