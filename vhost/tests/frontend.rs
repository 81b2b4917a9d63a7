//! The vhost-user-blk backend driven in-process by a test frontend: the rust-vmm `vhost`
//! crate's frontend side (or hand-built messages) over the controller's socket, guest memory in
//! a memfd we map too, and split rings we fill ourselves. Requests go to a malloc bdev.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost_user::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost_user::vhost_user::{Frontend, VhostUserFrontend};
use vhost_user::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const MEM_SIZE: usize = 4 << 20;
const UVA_BASE: u64 = 0x7f00_0000_0000;
const QSIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x3000;
const STATUS: u64 = 0x3100;
const DATA: u64 = 0x10_0000;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

fn setup() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir").keep();
        let mut opts = reactor::RuntimeOptions::new(reactor::CoreMask::parse("0x1").unwrap());
        opts.interrupt_mode = true;
        opts.pin_threads = false;
        let rt = reactor::Runtime::start(opts, || {}).expect("runtime");
        vhost::set_runtime(rt.handle());
        vhost::set_socket_dir(&dir);
        std::mem::forget(rt);
        dir
    })
    .clone()
}

fn call(method: &str, params: Value) -> Result<Value, vhost::VhostRpcError> {
    let (_, h) = vhost::rpc_methods()
        .into_iter()
        .find(|(m, _)| *m == method)
        .expect("method");
    let (tx, rx) = mpsc::channel();
    h(params, Box::new(move |r| tx.send(r).unwrap()));
    rx.recv_timeout(Duration::from_secs(10))
        .expect("rpc answer")
}

fn malloc(name: &str, num_blocks: u64, block_size: u32) {
    bdev::malloc::create(bdev::malloc::MallocOpts {
        name: Some(name.into()),
        num_blocks,
        block_size,
        uuid: None,
        optimal_io_boundary: 0,
    })
    .expect("malloc");
}

fn controller(name: &str, bdev: &str, readonly: bool) -> PathBuf {
    let dir = setup();
    call(
        "vhost_create_blk_controller",
        json!({"ctrlr": name, "dev_name": bdev, "readonly": readonly}),
    )
    .expect("create controller");
    dir.join(name)
}

/// Guest memory: a memfd mapped here and handed to the backend.
struct Mem {
    file: File,
    ptr: *mut u8,
}

impl Mem {
    fn new() -> Mem {
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
    fn slice(&self, gpa: u64, len: usize) -> &[u8] {
        assert!(gpa as usize + len <= MEM_SIZE);
        // SAFETY: in bounds of our mapping; the backend writes only to buffers of requests we
        // are waiting for, and we read them after the used index moved.
        unsafe { std::slice::from_raw_parts(self.ptr.add(gpa as usize), len) }
    }
    fn put(&self, gpa: u64, b: &[u8]) {
        assert!(gpa as usize + b.len() <= MEM_SIZE);
        // SAFETY: in bounds of our mapping (asserted); `b` is a separate allocation.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.ptr.add(gpa as usize), b.len()) };
    }
    fn u16_at(&self, gpa: u64) -> u16 {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        u16::from_le_bytes(self.slice(gpa, 2).try_into().unwrap())
    }
    fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: UVA_BASE,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }
}

/// One connected test frontend with queue 0 running.
struct Fe {
    fe: Frontend,
    mem: Mem,
    kick: EventFd,
    _call: EventFd,
    avail_idx: u16,
    used_seen: u16,
}

impl Fe {
    fn connect(path: &PathBuf) -> Fe {
        Fe::connect_with(
            path,
            Mem::new(),
            None,
            0,
            VhostUserProtocolFeatures::empty(),
        )
    }

    /// Connects with `mem` as guest memory, optionally handing over an in-flight area, and
    /// starts queue 0 at avail index `base`.
    fn connect_with(
        path: &PathBuf,
        mem: Mem,
        inflight: Option<(&VhostUserInflight, &File)>,
        base: u16,
        extra: VhostUserProtocolFeatures,
    ) -> Fe {
        let mut fe = Frontend::connect(path, 16).expect("connect");
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        assert_ne!(features & (1 << 32), 0, "VERSION_1 offered");
        assert_ne!(features & (1 << 30), 0, "PROTOCOL_FEATURES offered");
        fe.set_features(features & !(1 << 29)).unwrap();
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
        if let Some((desc, file)) = inflight {
            fe.set_inflight_fd(desc, file.as_raw_fd())
                .expect("SET_INFLIGHT_FD");
        }
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
        };
        fe.start_queue_at(0, DESC, AVAIL, USED, base);
        fe
    }

    fn start_queue(&self, q: usize, desc: u64, avail: u64, used: u64) {
        self.start_queue_at(q, desc, avail, used, 0);
    }

    fn start_queue_at(&self, q: usize, desc: u64, avail: u64, used: u64, base: u16) {
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

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&addr.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&next.to_le_bytes());
        self.mem.put(DESC + u64::from(i) * 16, &b);
    }

    /// Publishes `head` in the avail ring and kicks.
    fn publish(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem.put(slot, &head.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem.put(AVAIL + 2, &self.avail_idx.to_le_bytes());
        self.kick.write(1).unwrap();
    }

    /// Waits for the next used entry; returns (id, len), or None after `limit`.
    fn wait_used(&mut self, limit: Duration) -> Option<(u32, u32)> {
        let deadline = Instant::now() + limit;
        while self.mem.u16_at(USED + 2) == self.used_seen {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let e = self
            .mem
            .slice(USED + 4 + 8 * u64::from(self.used_seen % QSIZE), 8);
        let id = u32::from_le_bytes(e[0..4].try_into().unwrap());
        let len = u32::from_le_bytes(e[4..8].try_into().unwrap());
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id, len))
    }

    /// Runs one request: header, optional data (readable or writable), status.
    fn request(&mut self, t: u32, sector: u64, data: &[u8], data_writable: bool) -> (u8, u32) {
        let mut hdr = Vec::new();
        hdr.extend_from_slice(&t.to_le_bytes());
        hdr.extend_from_slice(&0u32.to_le_bytes());
        hdr.extend_from_slice(&sector.to_le_bytes());
        self.mem.put(HDR, &hdr);
        self.mem.put(STATUS, &[0xff]);
        self.desc(0, HDR, 16, 1, 1);
        if data.is_empty() {
            self.desc(1, STATUS, 1, 2, 0);
        } else {
            self.mem.put(DATA, data);
            self.desc(
                1,
                DATA,
                data.len() as u32,
                1 | if data_writable { 2 } else { 0 },
                2,
            );
            self.desc(2, STATUS, 1, 2, 0);
        }
        self.publish(0);
        let (id, len) = self.wait_used(Duration::from_secs(10)).expect("completion");
        assert_eq!(id, 0);
        (self.mem.slice(STATUS, 1)[0], len)
    }

    fn read(&mut self, sector: u64, len: usize) -> (u8, Vec<u8>) {
        let (st, used) = self.request(T_IN, sector, &vec![0u8; len], true);
        if st == S_OK {
            assert_eq!(used as usize, len + 1);
        }
        (st, self.mem.slice(DATA, len).to_vec())
    }

    fn dwz(&mut self, t: u32, sector: u64, n: u32, flags: u32) -> u8 {
        let mut seg = Vec::new();
        seg.extend_from_slice(&sector.to_le_bytes());
        seg.extend_from_slice(&n.to_le_bytes());
        seg.extend_from_slice(&flags.to_le_bytes());
        self.request(t, sector, &seg, false).0
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn blk_round_trips() {
    malloc("VhMalloc0", 2048, 4096);
    let path = controller("vrt.0", "VhMalloc0", false);
    let mut fe = Fe::connect(&path);

    let cfg = fe
        .fe
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0; 60])
        .unwrap()
        .1;
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        2048 * 8,
        "capacity"
    );
    assert_eq!(
        u32::from_le_bytes(cfg[20..24].try_into().unwrap()),
        4096,
        "blk_size"
    );

    let data = pattern(16384, 7);
    assert_eq!(fe.request(T_OUT, 64, &data, false).0, S_OK);
    let (st, back) = fe.read(64, 16384);
    assert_eq!(st, S_OK);
    assert_eq!(back, data);
    // A read of other sectors does not see the data.
    let (st, other) = fe.read(128, 4096);
    assert_eq!(st, S_OK);
    assert_ne!(&other[..], &data[..4096]);

    assert_eq!(fe.request(T_FLUSH, 0, &[], false).0, S_OK);
    assert_eq!(
        fe.request(T_FLUSH, 8, &[], false).0,
        S_IOERR,
        "flush needs sector 0"
    );

    let (st, used) = fe.request(T_GET_ID, 0, &[0u8; 20], true);
    assert_eq!(st, S_OK);
    assert_eq!(used, 21);
    assert_eq!(&fe.mem.slice(DATA, 20)[..9], b"VhMalloc0");
    assert!(fe.mem.slice(DATA, 20)[9..].iter().all(|b| *b == 0));

    assert_eq!(fe.dwz(T_WRITE_ZEROES, 64, 8, 0), S_OK);
    let (st, z) = fe.read(64, 8192);
    assert_eq!(st, S_OK);
    assert!(
        z[..4096].iter().all(|b| *b == 0),
        "write_zeroes zeroed the first block"
    );
    assert_eq!(&z[4096..], &data[4096..8192], "only 8 sectors zeroed");

    assert_eq!(fe.dwz(T_DISCARD, 72, 8, 0), S_OK);
    assert_eq!(
        fe.dwz(T_DISCARD, 72, 8, 1),
        S_UNSUPP,
        "discard with UNMAP flag"
    );
    assert_eq!(
        fe.dwz(T_DISCARD, 3, 8, 0),
        S_IOERR,
        "discard not block aligned"
    );

    // Out of range, misaligned, unknown type.
    assert_eq!(fe.read(2048 * 8, 4096).0, S_IOERR);
    assert_eq!(fe.read(2048 * 8 - 8, 8192).0, S_IOERR);
    assert_eq!(fe.read(1, 4096).0, S_IOERR);
    assert_eq!(fe.request(T_OUT, 0, &[1u8; 1000], false).0, S_IOERR);
    assert_eq!(fe.request(99, 0, &[], false).0, S_UNSUPP);

    // Ring still healthy.
    let (st, back) = fe.read(72, 4096);
    assert_eq!(st, S_OK);
    assert_eq!(back.len(), 4096);
    drop(fe);
    delete_when_idle("vrt.0");
}

fn delete_when_idle(name: &str) {
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

#[test]
fn readonly_controller_refuses_writes() {
    malloc("VhMallocRo", 256, 512);
    let path = controller("vro.0", "VhMallocRo", true);
    let mut fe = Fe::connect(&path);
    assert_ne!(fe.fe.get_features().unwrap() & (1 << 5), 0, "RO offered");
    assert_eq!(fe.request(T_OUT, 0, &[1u8; 512], false).0, S_IOERR);
    assert_eq!(fe.read(0, 512).0, S_OK);
    assert_eq!(fe.dwz(T_WRITE_ZEROES, 0, 1, 0), S_UNSUPP);
    drop(fe);
    delete_when_idle("vro.0");
}

#[test]
fn rpc_params_are_checked() {
    malloc("VhMallocRpc", 256, 512);
    setup();
    let e = call(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vrpc.0", "dev_name": "VhMallocRpc", "packed_ring": true}),
    )
    .unwrap_err();
    assert_eq!(e.code, -libc::ENOTSUP);
    let e = call(
        "vhost_create_blk_controller",
        json!({"ctrlr": "x", "bogus": 1}),
    )
    .unwrap_err();
    assert_eq!(e.code, -32602);
    let e = call(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vrpc.0", "dev_name": "NoSuchBdev"}),
    )
    .unwrap_err();
    assert_eq!(e.code, -libc::ENODEV);
    controller("vrpc.0", "VhMallocRpc", false);
    let e = call(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vrpc.0", "dev_name": "VhMallocRpc"}),
    )
    .unwrap_err();
    assert_eq!(e.code, -libc::EEXIST);
    let list = call("vhost_get_controllers", json!({"name": "vrpc.0"})).unwrap();
    assert_eq!(list[0]["backend_specific"]["block"]["bdev"], "VhMallocRpc");
    assert!(vhost::config_json()
        .iter()
        .any(|c| c["params"]["ctrlr"] == "vrpc.0" && c["params"]["dev_name"] == "VhMallocRpc"));
    call("vhost_delete_controller", json!({"ctrlr": "vrpc.0"})).unwrap();
    let e = call("vhost_get_controllers", json!({"name": "vrpc.0"})).unwrap_err();
    assert_eq!(e.code, -libc::ENODEV);
    assert!(!setup().join("vrpc.0").exists(), "socket removed");
}

/// Sends one hand-built message (with fds) on a raw socket.
fn raw_msg(s: &UnixStream, req: u32, flags: u32, payload: &[u8], fds: &[i32]) {
    let mut m = Vec::new();
    m.extend_from_slice(&req.to_le_bytes());
    m.extend_from_slice(&(flags | 1).to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    s.send_with_fds(&[&m[..]], fds).unwrap();
}

#[test]
fn bad_input_is_refused_without_harm() {
    malloc("VhMallocBad", 1024, 4096);
    malloc("VhMallocGood", 1024, 4096);
    let bad_path = controller("vbad.0", "VhMallocBad", false);
    let good_path = controller("vgood.0", "VhMallocGood", false);
    let mut good = Fe::connect(&good_path);
    let data = pattern(4096, 3);
    assert_eq!(good.request(T_OUT, 0, &data, false).0, S_OK);

    // 1. Memory table whose region lies past the end of its file: refused (REPLY_ACK nack).
    {
        let fe = Frontend::connect(&bad_path, 16).unwrap();
        fe.set_owner().unwrap();
        let f = fe.get_features().unwrap();
        fe.set_features(f).unwrap();
        let mut fe2 = fe.clone();
        let pf = fe2.get_protocol_features().unwrap();
        fe2.set_protocol_features(pf & VhostUserProtocolFeatures::REPLY_ACK)
            .unwrap();
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let mem = Mem::new();
        let mut r = mem.region();
        r.memory_size = (MEM_SIZE as u64) * 2;
        assert!(
            fe.set_mem_table(&[r]).is_err(),
            "region past end of file refused"
        );
        let mut r = mem.region();
        r.memory_size = 0;
        assert!(fe.set_mem_table(&[r]).is_err(), "empty region refused");
        let r1 = mem.region();
        let mut r2 = mem.region();
        r2.userspace_addr = UVA_BASE + (1 << 30);
        assert!(
            fe.set_mem_table(&[r1, r2]).is_err(),
            "overlapping GPAs refused"
        );
        assert!(
            fe.set_vring_num(0, 3).is_err(),
            "ring size not a power of two"
        );
        assert!(
            fe.set_vring_num(99, 16).is_err(),
            "queue index out of range"
        );
        assert!(fe.get_features().is_ok(), "refusals keep the session");
        fe.set_mem_table(&[mem.region()])
            .expect("a valid table after the bad ones");
    }

    // 2. Rings outside guest memory, descriptor loop, buffer outside memory, long chain.
    let mut fe = Fe::connect(&bad_path);
    fe.start_queue(1, 0x3f_0000, MEM_SIZE as u64 - 2, USED);
    // Queue 1's avail ring straddles the end of memory: it never starts, queue 0 still works.
    assert_eq!(fe.request(T_OUT, 8, &data, false).0, S_OK);
    // A descriptor loop: 0 -> 1 -> 0.
    fe.desc(0, HDR, 16, 1, 1);
    fe.desc(1, DATA, 512, 1, 0);
    fe.publish(0);
    assert!(
        fe.wait_used(Duration::from_millis(300)).is_none(),
        "looped chain not completed"
    );
    // The broken ring takes nothing more; the session and other controllers are fine.
    fe.desc(0, HDR, 16, 1, 1);
    fe.desc(1, STATUS, 1, 2, 0);
    fe.publish(0);
    assert!(
        fe.wait_used(Duration::from_millis(300)).is_none(),
        "broken ring stays stopped"
    );
    assert!(fe.fe.get_features().is_ok(), "session still answers");
    assert_eq!(good.read(0, 4096), (S_OK, data.clone()));
    drop(fe);

    // A fresh session resets the ring: a buffer outside guest memory breaks it again.
    let mut fe = Fe::connect(&bad_path);
    fe.desc(0, HDR, 16, 1, 1);
    fe.desc(1, MEM_SIZE as u64 - 8, 4096, 1 | 2, 2);
    fe.desc(2, STATUS, 1, 2, 0);
    fe.publish(0);
    assert!(fe.wait_used(Duration::from_millis(300)).is_none());
    drop(fe);

    // An indirect table claiming more entries than memory holds, and a chain of 16 next
    // pointers in a 16-entry ring that never ends (every descriptor has NEXT).
    let mut fe = Fe::connect(&bad_path);
    for i in 0..QSIZE {
        fe.desc(i, DATA, 16, 1, (i + 1) % QSIZE);
    }
    fe.publish(0);
    assert!(fe.wait_used(Duration::from_millis(300)).is_none());
    drop(fe);
    let mut fe = Fe::connect(&bad_path);
    fe.desc(0, MEM_SIZE as u64 - 64, 16 * 64, 4, 0);
    fe.publish(0);
    assert!(fe.wait_used(Duration::from_millis(300)).is_none());
    drop(fe);

    // 3. Truncated and garbage messages on a raw socket: the session is closed, nothing else.
    for junk in [
        &[1u8, 0, 0][..],
        &[0xffu8; 12][..],
        &[5u8, 0, 0, 0, 1, 0, 0, 0, 200, 0, 0, 0][..],
    ] {
        let s = UnixStream::connect(&bad_path).unwrap();
        (&s).write_all(junk).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(s);
    }
    // SET_MEM_TABLE claiming 9 regions with no fds.
    {
        let s = UnixStream::connect(&bad_path).unwrap();
        let mut p = vec![0u8; 8 + 32 * 9];
        p[0] = 9;
        raw_msg(&s, 5, 0, &p, &[]);
        std::thread::sleep(Duration::from_millis(50));
    }
    // GET_INFLIGHT_FD for an absurd queue count.
    {
        let s = UnixStream::connect(&bad_path).unwrap();
        let mut p = Vec::new();
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&5000u16.to_le_bytes());
        p.extend_from_slice(&128u16.to_le_bytes());
        p.extend_from_slice(&[0u8; 4]);
        raw_msg(&s, 31, 0, &p, &[]);
        std::thread::sleep(Duration::from_millis(50));
    }

    // The controller still serves a well-behaved frontend, and so does the other one.
    let mut fe = Fe::connect(&bad_path);
    assert_eq!(fe.read(8, 4096), (S_OK, data.clone()));
    assert_eq!(good.read(0, 4096), (S_OK, data));
    drop(fe);
    drop(good);
    delete_when_idle("vbad.0");
    delete_when_idle("vgood.0");
}

/// A request the backend took from the avail ring but never completed (it crashed, or the
/// session died) is resubmitted from the in-flight area on reconnect, and not lost.
#[test]
fn inflight_requests_survive_reconnect() {
    malloc("VhMallocInfl", 1024, 4096);
    let path = controller("vinfl.0", "VhMallocInfl", false);
    let extra = VhostUserProtocolFeatures::INFLIGHT_SHMFD;

    // Session 1: get the in-flight area, complete one request (initialises the region).
    let mut fe = Frontend::connect(&path, 16).unwrap();
    fe.set_owner().unwrap();
    let f = fe.get_features().unwrap();
    fe.set_features(f).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(pf & (extra | VhostUserProtocolFeatures::REPLY_ACK))
        .unwrap();
    let (area, area_file) = fe
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QSIZE))
        .expect("GET_INFLIGHT_FD");
    assert!(area.mmap_size >= 16 + 16 * u64::from(QSIZE));
    drop(fe);
    let mem = Mem::new();
    let mut fe = Fe::connect_with(&path, mem, Some((&area, &area_file)), 0, extra);
    assert_eq!(fe.request(T_OUT, 8, &[0u8; 4096], false).0, S_OK);
    // Stop the ring (GET_VRING_BASE waits until it is quiesced); the session stays open so
    // nothing runs the ring while we forge the crash state.
    assert_eq!(fe.fe.get_vring_base(0).unwrap(), 1);
    let Fe { fe: conn, mem, .. } = fe;

    // Simulate a crash after the backend popped head 4 (a write) but before it completed:
    // the chain and avail entry are in guest memory, the area marks head 4 in flight.
    let data = pattern(4096, 99);
    let hdr: Vec<u8> = [T_OUT.to_le_bytes(), 0u32.to_le_bytes()]
        .concat()
        .into_iter()
        .chain(200u64.to_le_bytes())
        .collect();
    mem.put(HDR + 0x40, &hdr);
    mem.put(DATA + 0x10000, &data);
    mem.put(STATUS + 1, &[0xff]);
    let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let b: Vec<u8> = [
            &addr.to_le_bytes()[..],
            &len.to_le_bytes(),
            &flags.to_le_bytes(),
            &next.to_le_bytes(),
        ]
        .concat();
        mem.put(DESC + i * 16, &b);
    };
    desc(4, HDR + 0x40, 16, 1, 5);
    desc(5, DATA + 0x10000, 4096, 1, 6);
    desc(6, STATUS + 1, 1, 2, 0);
    mem.put(AVAIL + 4 + 2, &4u16.to_le_bytes());
    mem.put(AVAIL + 2, &2u16.to_le_bytes());
    // SAFETY: mapping the in-flight memfd the backend gave us, checked against MAP_FAILED.
    let region = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            area.mmap_size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            area_file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(region, libc::MAP_FAILED);
    // SAFETY: the region holds 16 + 16 * QSIZE bytes (asserted above); no session runs now.
    let r = unsafe { std::slice::from_raw_parts_mut(region.cast::<u8>(), area.mmap_size as usize) };
    assert_eq!(
        u16::from_le_bytes([r[8], r[9]]),
        1,
        "region initialised (version 1)"
    );
    assert_eq!(u16::from_le_bytes([r[14], r[15]]), 1, "used_idx recorded");
    let d4 = 16 + 16 * 4;
    r[d4] = 1;
    r[d4 + 8..d4 + 16].copy_from_slice(&7u64.to_le_bytes());

    // Session 2, as QEMU reconnects after a backend crash: same area, base = used->idx.
    drop(conn);
    let mut fe = Fe::connect_with(&path, mem, Some((&area, &area_file)), 1, extra);
    fe.avail_idx = 2;
    let (id, len) = fe
        .wait_used(Duration::from_secs(10))
        .expect("resubmitted request done");
    assert_eq!((id, len), (4, 1));
    assert_eq!(fe.mem.slice(STATUS + 1, 1)[0], S_OK);
    assert_eq!(r[d4], 0, "no longer in flight");
    // The next request continues after it, and the data of the resubmitted write is there.
    let (st, back) = fe.read(200 * 512 / 512, 4096);
    assert_eq!(st, S_OK);
    assert_eq!(back, data);
    drop(fe);
    // SAFETY: unmapping what we mapped above.
    unsafe { libc::munmap(region, area.mmap_size as usize) };
    delete_when_idle("vinfl.0");
}

/// A resized bdev changes the capacity in GET_CONFIG and sends CONFIG_CHANGE_MSG on the
/// backend request channel.
#[test]
fn resize_notifies_the_frontend() {
    bdev::null::create(bdev::null::NullOpts {
        name: "VhNullResize".into(),
        num_blocks: 2048,
        block_size: 512,
        uuid: None,
    })
    .expect("null bdev");
    let path = controller("vresize.0", "VhNullResize", false);
    let mut fe = Fe::connect_with(
        &path,
        Mem::new(),
        None,
        0,
        VhostUserProtocolFeatures::BACKEND_REQ,
    );
    let (ours, theirs) = UnixStream::pair().unwrap();
    fe.fe.set_backend_request_fd(&theirs).unwrap();
    assert_eq!(fe.read(0, 512).0, S_OK);
    let (_, resize) = bdev::rpc_methods()
        .into_iter()
        .find(|(m, _)| *m == "bdev_null_resize")
        .unwrap();
    resize(json!({"name": "VhNullResize", "new_size": 4})).expect("resize");
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut hdr = [0u8; 12];
    std::io::Read::read_exact(&mut &ours, &mut hdr).expect("config change message");
    assert_eq!(
        u32::from_le_bytes(hdr[0..4].try_into().unwrap()),
        2,
        "CONFIG_CHANGE_MSG"
    );
    let cfg = fe
        .fe
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0; 8])
        .unwrap()
        .1;
    assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), 4 * 2048);
    // I/O beyond the old end now works.
    assert_eq!(fe.read(4000, 512).0, S_OK);
    drop(fe);
    delete_when_idle("vresize.0");
}
