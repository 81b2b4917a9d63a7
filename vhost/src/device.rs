//! A vhost-user-blk controller: its socket, its session state and the lifecycle of its rings.
//!
//! Ownership: a controller lives on its home reactor (the first of its cpumask). The listening
//! socket and the connection are watched there with io_uring PollAdd (never a blocking read);
//! the rust-vmm `vhost` crate's [`BackendReqHandler`] parses one message per readable event
//! into calls on [`DevState`]. Rings run on the reactors of the cpumask (queue i on reactor
//! i mod n) and own their queue state while running.
//!
//! Before any message is handled every running ring is stopped (drained, its next avail index
//! reported back), and after it the rings that are ready are started again. So a message never
//! races the data path, GET_VRING_BASE always sees a quiesced ring, and a new memory table or
//! feature set reaches the rings on restart.
//!
//! Sessions: one frontend at a time; the listener is watched only while none is connected.
//! When the connection ends (frontend gone, or a malformed message) the rings are drained —
//! their in-flight requests complete into guest memory — and the whole session (memory,
//! features, rings, broken marks, in-flight area) is dropped, so the next frontend starts
//! clean. A reconnecting QEMU hands its in-flight area back (SET_INFLIGHT_FD) and resumes at
//! its used index; a ring resubmits the heads the area still marks, so requests taken by a
//! backend that died are neither lost nor completed twice ([`crate::vring`]). RESET_DEVICE
//! resets only the rings: memory, protocol features and the backend channel stay, as QEMU
//! does not send them again.
//!
//! Home states ([`Phase`]): `Waiting` (a PollAdd is armed on the listener or connection),
//! `Quiescing` (stops sent, `pending` to come back, then `next`), `Closed`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bdev::{BdevChannel, BdevDesc};
use reactor::{OnComplete, Op, OpId, ReactorId, RuntimeHandle};
use vhost_user::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost_user::vhost_user::{
    Backend, BackendReqHandler, Error as VuError, GpuBackend, Listener, Result as VuResult,
    VhostUserBackendReqHandlerMut,
};
use vhost_user::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_blk as vb;
use virtio_queue::{Queue, QueueT};

use crate::blk::{self, BlkGeometry, Limits};
use crate::inflight::{InflightArea, InflightRegion};
use crate::memory::GuestMem;
use crate::vring::{self, VringStart, VringStopped};

/// Largest ring size accepted (QEMU's VIRTQUEUE_MAX_SIZE).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Most request queues per controller.
pub const MAX_QUEUES: u16 = 16;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Controller-wide state shared by the home reactor, the rings and the control path.
#[derive(Debug)]
pub struct Shared {
    /// Instance id (unique per process).
    pub id: u64,
    /// Controller name.
    pub name: String,
    /// Bdev name as given.
    pub bdev_name: String,
    /// Read-only controller.
    pub readonly: bool,
    /// Logical block size of the bdev.
    pub block_size: u32,
    /// Current size in blocks (updated by resize events).
    pub num_blocks: Arc<AtomicU64>,
    /// The open descriptor; `None` once the bdev was removed.
    pub desc: Mutex<Option<BdevDesc>>,
    /// Request queues offered.
    pub num_queues: u16,
    /// Bdev supports flush / unmap / write-zeroes.
    pub io: (bool, bool, bool),
    /// Optimal I/O size in blocks.
    pub opt_io_blocks: u32,
    /// Reactors of the cpumask; the first is home.
    pub reactors: Vec<ReactorId>,
    /// The cpumask as given (normalised).
    pub cpumask: String,
    /// Socket path.
    pub socket: PathBuf,
    /// Runtime to send messages through.
    pub runtime: RuntimeHandle,
}

impl Shared {
    /// This reactor's channel to the bdev (`None` if removed).
    pub fn channel(&self) -> Option<BdevChannel> {
        let d = self.desc.lock().unwrap_or_else(|e| e.into_inner());
        d.as_ref()?.get_io_channel().ok()
    }

    /// Limits requests are checked against.
    pub fn limits(&self) -> Limits {
        Limits {
            block_size: self.block_size,
            capacity_bytes: self
                .num_blocks
                .load(Ordering::Relaxed)
                .saturating_mul(u64::from(self.block_size)),
            readonly: self.readonly,
            flush: self.io.0,
            discard: self.io.1 && !self.readonly,
            write_zeroes: self.io.2 && !self.readonly,
        }
    }

    /// GET_ID serial: the bdev name, NUL padded to 20 bytes.
    pub fn serial(&self) -> [u8; blk::ID_BYTES] {
        let mut s = [0u8; blk::ID_BYTES];
        let n = self.bdev_name.len().min(blk::ID_BYTES);
        s[..n].copy_from_slice(&self.bdev_name.as_bytes()[..n]);
        s
    }

    /// Home reactor.
    pub fn home(&self) -> ReactorId {
        self.reactors[0]
    }

    /// Reactor running queue `i`.
    pub fn reactor_of(&self, i: u16) -> ReactorId {
        self.reactors[usize::from(i) % self.reactors.len()]
    }

    /// Virtio features offered.
    pub fn features(&self) -> u64 {
        let l = self.limits();
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
            | VHOST_USER_F_PROTOCOL_FEATURES
            | 1 << vb::VIRTIO_BLK_F_SIZE_MAX
            | 1 << vb::VIRTIO_BLK_F_SEG_MAX
            | 1 << vb::VIRTIO_BLK_F_BLK_SIZE
            | 1 << vb::VIRTIO_BLK_F_TOPOLOGY
            | 1 << vb::VIRTIO_BLK_F_MQ;
        if l.flush {
            f |= 1 << vb::VIRTIO_BLK_F_FLUSH;
        }
        if l.discard {
            f |= 1 << vb::VIRTIO_BLK_F_DISCARD;
        }
        if l.write_zeroes {
            f |= 1 << vb::VIRTIO_BLK_F_WRITE_ZEROES;
        }
        if self.readonly {
            f |= 1 << vb::VIRTIO_BLK_F_RO;
        }
        f
    }

    fn config(&self) -> Vec<u8> {
        blk::config_space(&BlkGeometry {
            block_size: self.block_size,
            num_blocks: self.num_blocks.load(Ordering::Relaxed),
            opt_io_blocks: self.opt_io_blocks,
            num_queues: self.num_queues,
        })
    }
}

/// Per-ring configuration collected from the frontend's messages.
#[derive(Debug, Default)]
struct VringCfg {
    size: u16,
    /// Frontend virtual addresses of descriptor table, avail and used ring.
    addrs: Option<(u64, u64, u64)>,
    next_avail: u16,
    kick: Option<File>,
    call: Option<File>,
    err: Option<File>,
    started: bool,
    enabled: bool,
    broken: bool,
    /// The ring addresses were found outside guest memory (logged once).
    unmapped_logged: bool,
}

/// Session state of one connection; the `vhost` crate's handler calls into it.
pub struct DevState {
    shared: Arc<Shared>,
    acked_features: u64,
    acked_protocol: u64,
    mem: Option<Arc<GuestMem>>,
    vrings: Vec<VringCfg>,
    inflight: Option<Arc<InflightArea>>,
    backend: Option<Backend>,
}

fn inval(why: &str) -> VuError {
    crate::log(why);
    VuError::InvalidParam
}

impl DevState {
    fn new(shared: Arc<Shared>) -> Self {
        let n = shared.num_queues;
        DevState {
            shared,
            acked_features: 0,
            acked_protocol: 0,
            mem: None,
            vrings: (0..n).map(|_| VringCfg::default()).collect(),
            inflight: None,
            backend: None,
        }
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut VringCfg> {
        let n = self.vrings.len();
        self.vrings
            .get_mut(index as usize)
            .ok_or_else(|| inval(&format!("vring index {index} >= {n}")))
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    /// The connection ended: everything of the session goes.
    fn end_session(&mut self) {
        let shared = self.shared.clone();
        *self = DevState::new(shared);
    }

    /// RESET_DEVICE (or the older RESET_OWNER): every ring back to its initial state (stopped,
    /// disabled, no size, addresses or kick fd, index 0, not broken) and the virtio features
    /// unacked. What belongs to the connection stays: the memory table (QEMU keeps its
    /// memory-slot table across a reset and does not send it again), the protocol features,
    /// the backend channel, and the call and error fds (QEMU sends SET_VRING_ERR only once per
    /// connection). The in-flight area is dropped: it describes the rings before the reset,
    /// and QEMU hands one over again (SET_INFLIGHT_FD) every time it starts the device.
    fn reset_device_state(&mut self) {
        for v in &mut self.vrings {
            let (call, err) = (v.call.take(), v.err.take());
            *v = VringCfg {
                call,
                err,
                ..VringCfg::default()
            };
        }
        self.acked_features = 0;
        self.inflight = None;
    }

    /// Builds the start message of ring `i` if it is ready to run.
    fn ring_start(&mut self, i: u16) -> Option<VringStart> {
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mem = self.mem.clone()?;
        let inflight = self
            .inflight
            .as_ref()
            .and_then(|a| InflightRegion::new(a, i));
        let v = self.vrings.get_mut(usize::from(i))?;
        if !(v.started && v.enabled && !v.broken && v.size > 0) {
            return None;
        }
        let (d, a, u) = v.addrs?;
        let sz = u64::from(v.size);
        let gpas = (
            mem.va_to_gpa(d, 16 * sz),
            mem.va_to_gpa(a, 6 + 2 * sz),
            mem.va_to_gpa(u, 6 + 8 * sz),
        );
        let (Some(d), Some(a), Some(u)) = gpas else {
            // Not broken: with ADD/REM_MEM_REG the region holding the ring may be replaced in
            // two steps; the ring starts once memory covers it again.
            if !v.unmapped_logged {
                crate::log(&format!(
                    "vring {i}: ring addresses outside guest memory; not started"
                ));
                v.unmapped_logged = true;
            }
            return None;
        };
        v.unmapped_logged = false;
        let mut q = Queue::new(MAX_QUEUE_SIZE).ok()?;
        q.set_size(v.size);
        q.set_desc_table_address(Some(d as u32), Some((d >> 32) as u32));
        q.set_avail_ring_address(Some(a as u32), Some((a >> 32) as u32));
        q.set_used_ring_address(Some(u as u32), Some((u >> 32) as u32));
        q.set_event_idx(event_idx);
        q.set_next_avail(v.next_avail);
        q.set_ready(true);
        if !q.is_valid(&mem.mem) {
            crate::log(&format!(
                "vring {i}: misaligned ring or outside guest memory"
            ));
            v.broken = true;
            return None;
        }
        let used = q.used_idx(&mem.mem, Ordering::Acquire).ok()?;
        q.set_next_used(used.0);
        let dup = |f: &Option<File>| f.as_ref().and_then(|f| f.try_clone().ok());
        Some(VringStart {
            ctrlr_id: self.shared.id,
            index: i,
            mem,
            queue: q,
            kick: dup(&v.kick),
            call: dup(&v.call),
            err: dup(&v.err),
            inflight: inflight.filter(|r| r.capacity() >= v.size),
            shared: self.shared.clone(),
        })
    }
}

impl VhostUserBackendReqHandlerMut for DevState {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }
    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset_device_state();
        Ok(())
    }
    fn reset_device(&mut self) -> VuResult<()> {
        self.reset_device_state();
        Ok(())
    }
    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.shared.features())
    }
    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.shared.features() != 0 {
            return Err(inval(&format!("features {features:#x} not offered")));
        }
        self.acked_features = features;
        if features & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
            for v in &mut self.vrings {
                v.enabled = true;
            }
        }
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let mem = GuestMem::map(ctx, files).map_err(|e| inval(&format!("SET_MEM_TABLE: {e}")))?;
        self.mem = Some(mem);
        Ok(None)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        if num == 0 || num > u32::from(MAX_QUEUE_SIZE) || !num.is_power_of_two() {
            return Err(inval(&format!("vring {index}: size {num}")));
        }
        self.vring(index)?.size = num as u16;
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        if !flags.is_empty() {
            return Err(inval("vring address logging not supported"));
        }
        self.vring(index)?.addrs = Some((descriptor, available, used));
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let base = u16::try_from(base).map_err(|_| inval("vring base > 65535"))?;
        self.vring(index)?.next_avail = base;
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let v = self.vring(index)?;
        v.started = false;
        v.kick = None;
        v.call = None;
        v.broken = false;
        Ok(VhostUserVringState::new(index, u32::from(v.next_avail)))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let v = self.vring(u32::from(index))?;
        v.kick = fd;
        v.started = true;
        Ok(())
    }
    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.vring(u32::from(index))?.call = fd;
        Ok(())
    }
    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.vring(u32::from(index))?.err = fd;
        Ok(())
    }
    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(self.protocol_features())
    }
    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        if crate::debug() {
            let f = VhostUserProtocolFeatures::from_bits_truncate(features);
            crate::log(&format!("{}: protocol features {f:?}", self.shared.name));
        }
        self.acked_protocol = features;
        Ok(())
    }
    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.shared.num_queues))
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.vring(index)?.enabled = enable;
        Ok(())
    }
    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let cfg = self.shared.config();
        let (off, size) = (offset as usize, size as usize);
        if off.checked_add(size).is_none_or(|e| e > 4096) {
            return Err(inval("GET_CONFIG beyond 4096 bytes"));
        }
        let mut out = vec![0u8; size];
        for (i, b) in out.iter_mut().enumerate() {
            *b = cfg.get(off + i).copied().unwrap_or(0);
        }
        Ok(out)
    }
    fn set_config(&mut self, offset: u32, buf: &[u8], _f: VhostUserConfigFlags) -> VuResult<()> {
        // Only `wce` (offset 32) is writable in virtio-blk; CONFIG_WCE is not offered, and
        // the cache is always write-back with FLUSH, so the write is accepted and ignored.
        if offset == 32 && buf.len() == 1 {
            return Ok(());
        }
        Err(inval("SET_CONFIG outside wce"))
    }
    fn set_backend_req_fd(&mut self, backend: Backend) {
        backend.set_reply_ack_flag(false);
        self.backend = Some(backend);
    }
    fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU device"))
    }
    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation("shared objects not supported"))
    }
    fn get_inflight_fd(&mut self, req: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        if req.num_queues == 0 || req.num_queues > self.shared.num_queues {
            return Err(inval(&format!(
                "GET_INFLIGHT_FD: {} queues",
                req.num_queues
            )));
        }
        if req.queue_size == 0 || req.queue_size > MAX_QUEUE_SIZE {
            return Err(inval(&format!(
                "GET_INFLIGHT_FD: queue size {}",
                req.queue_size
            )));
        }
        let area = InflightArea::create(req.num_queues, req.queue_size)
            .map_err(|e| inval(&format!("GET_INFLIGHT_FD: {e}")))?;
        let file = area
            .file
            .try_clone()
            .map_err(|e| inval(&format!("GET_INFLIGHT_FD: {e}")))?;
        let reply =
            VhostUserInflight::new(area.len_bytes() as u64, 0, req.num_queues, req.queue_size);
        self.inflight = Some(area);
        Ok((reply, file))
    }
    fn set_inflight_fd(&mut self, req: &VhostUserInflight, file: File) -> VuResult<()> {
        let len = usize::try_from(req.mmap_size).map_err(|_| inval("inflight size"))?;
        let area = InflightArea::map(file, req.mmap_offset, len, req.num_queues, req.queue_size)
            .map_err(|e| inval(&format!("SET_INFLIGHT_FD: {e}")))?;
        self.inflight = Some(area);
        Ok(())
    }
    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(crate::memory::MAX_MEM_SLOTS as u64)
    }
    fn add_mem_region(
        &mut self,
        r: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        let mem = GuestMem::with_region(self.mem.as_deref(), r, fd)
            .map_err(|e| inval(&format!("ADD_MEM_REG: {e}")))?;
        if crate::debug() {
            crate::log(&format!(
                "{}: ADD_MEM_REG gpa {:#x} size {:#x}: {} region(s)",
                self.shared.name,
                { r.guest_phys_addr },
                { r.memory_size },
                mem.nr_regions()
            ));
        }
        self.mem = Some(mem);
        Ok(None)
    }
    fn remove_mem_region(&mut self, r: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let Some(mem) = &self.mem else {
            return Err(inval("REM_MEM_REG: no memory regions"));
        };
        self.mem = mem
            .without_region(r)
            .map_err(|e| inval(&format!("REM_MEM_REG: {e}")))?;
        Ok(())
    }
    fn set_device_state_fd(
        &mut self,
        _d: VhostTransferStateDirection,
        _p: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(VuError::InvalidOperation(
            "device state transfer not supported",
        ))
    }
    fn check_device_state(&mut self) -> VuResult<()> {
        Err(VuError::InvalidOperation(
            "device state transfer not supported",
        ))
    }
    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("no shared memory regions"))
    }
    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(VuError::InvalidOperation("dirty logging not supported"))
    }
}

/// What to do once every running ring has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Handle the message waiting on the socket.
    HandleMessage,
    /// Send a config-change notification (resize), then restart the rings.
    ConfigChanged,
    /// Drop the bdev descriptor (bdev removed), then restart the rings.
    DropBdev,
    /// Close the controller.
    Close,
}

/// Home states (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A PollAdd is armed (or about to be).
    Waiting,
    /// Stops sent; `pending` replies to come.
    Quiescing { pending: usize, next: Next },
    /// Controller closed.
    Closed,
}

struct Home {
    shared: Arc<Shared>,
    listener: Listener,
    conn: Option<BackendReqHandler<Mutex<DevState>>>,
    dev: Arc<Mutex<DevState>>,
    running: Vec<bool>,
    phase: Phase,
    op: Option<OpId>,
    on_close: Vec<Box<dyn FnOnce() + Send>>,
    /// A config change arrived while quiescing for something else.
    config_dirty: bool,
    /// Our copy of the backend-request channel (SET_BACKEND_REQ_FD), for CONFIG_CHANGE_MSG:
    /// the `vhost` crate's `Backend` cannot send that message.
    config_chan: Option<UnixStream>,
}

thread_local! {
    static HOMES: RefCell<HashMap<u64, Rc<RefCell<Home>>>> = RefCell::new(HashMap::new());
}

fn home(id: u64) -> Option<Rc<RefCell<Home>>> {
    HOMES.with(|h| h.borrow().get(&id).cloned())
}

impl Home {
    fn set_phase(&mut self, phase: Phase) {
        if crate::debug() {
            crate::log(&format!(
                "{}: {:?} -> {:?}",
                self.shared.name, self.phase, phase
            ));
        }
        self.phase = phase;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DevState> {
        self.dev.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Starts serving controller `shared` from the current (home) reactor.
pub fn home_start(shared: Arc<Shared>, listener: Listener) {
    let id = shared.id;
    let h = Home {
        dev: Arc::new(Mutex::new(DevState::new(shared.clone()))),
        running: vec![false; usize::from(shared.num_queues)],
        shared,
        listener,
        conn: None,
        phase: Phase::Waiting,
        op: None,
        on_close: Vec::new(),
        config_dirty: false,
        config_chan: None,
    };
    HOMES.with(|m| m.borrow_mut().insert(id, Rc::new(RefCell::new(h))));
    arm(id);
}

fn arm(id: u64) {
    let Some(h) = home(id) else { return };
    let mut h = h.borrow_mut();
    if h.phase != Phase::Waiting || h.op.is_some() {
        return;
    }
    let fd = match &h.conn {
        Some(c) => c.as_raw_fd(),
        None => h.listener.as_raw_fd(),
    };
    let op = Op::PollAdd {
        fd: fd.into(),
        events: (libc::POLLIN | libc::POLLHUP) as u32,
    };
    match reactor::ring().submit(op, OnComplete::closure(move |_| on_ready(id))) {
        Ok(op) => h.op = Some(op),
        Err(_) => {
            // Ring full: retry on the next tick.
            reactor::send_msg(reactor::current(), move || arm(id));
        }
    }
}

fn on_ready(id: u64) {
    let Some(hr) = home(id) else { return };
    let mut h = hr.borrow_mut();
    h.op = None;
    if h.phase != Phase::Waiting {
        return;
    }
    if h.conn.is_none() {
        match h.listener.accept() {
            Ok(Some(stream)) => {
                if stream.set_nonblocking(true).is_ok() {
                    crate::log(&format!("{}: frontend connected", h.shared.name));
                    let dev = h.dev.clone();
                    h.conn = Some(BackendReqHandler::from_stream(stream, dev));
                }
            }
            Ok(None) => {}
            Err(e) => crate::log(&format!("{}: accept: {e}", h.shared.name)),
        }
        drop(h);
        arm(id);
        return;
    }
    if let Some(c) = &h.conn {
        if crate::debug() {
            trace_next_message(&h.shared.name, c.as_raw_fd());
        }
        if let Some(chan) = peek_backend_req_fd(c.as_raw_fd()) {
            h.config_chan = Some(chan);
        }
    }
    drop(h);
    quiesce(id, Next::HandleMessage);
}

/// `FrontendReq::SET_BACKEND_REQ_FD`.
const SET_BACKEND_REQ_FD: u32 = 21;
/// `BackendReq::CONFIG_CHANGE_MSG`.
const CONFIG_CHANGE_MSG: u32 = 2;

/// Logs the request code and payload size of the next message on `sock` (peeked, not read).
fn trace_next_message(name: &str, sock: RawFd) {
    let mut hdr = [0u8; 12];
    // SAFETY: recv into a local 12-byte buffer; MSG_PEEK leaves the message queued.
    let n = unsafe {
        libc::recv(
            sock,
            hdr.as_mut_ptr().cast(),
            hdr.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n == 12 {
        let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        crate::log(&format!(
            "{name}: message {} (flags {:#x}, {} bytes)",
            word(0),
            word(4),
            word(8)
        ));
    }
}

/// If the next message on `sock` is SET_BACKEND_REQ_FD, returns a duplicate of its fd
/// (taken with MSG_PEEK, so the `vhost` crate still reads the message and its own copy).
fn peek_backend_req_fd(sock: RawFd) -> Option<UnixStream> {
    let mut hdr = [0u8; 12];
    // SAFETY: recv into a local 12-byte buffer; MSG_PEEK leaves the message (and its fds)
    // queued; without a control buffer no fd is installed.
    let n = unsafe {
        libc::recv(
            sock,
            hdr.as_mut_ptr().cast(),
            hdr.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n != 12 || u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) != SET_BACKEND_REQ_FD {
        return None;
    }
    let mut iov = libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: hdr.len(),
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr is plain data, zeroed then pointed at our iovec and control buffer, which
    // outlive the call; CMSG_* walk only inside `cbuf` as sized by msg_controllen.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        if libc::recvmsg(sock, &mut msg, libc::MSG_PEEK | libc::MSG_DONTWAIT) != 12 {
            return None;
        }
        let mut found = None;
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let nfds = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for k in 0..nfds {
                    let fd = std::ptr::read_unaligned(data.add(k));
                    if found.is_none() {
                        found = Some(UnixStream::from_raw_fd(fd));
                    } else {
                        libc::close(fd);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        found
    }
}

fn send_config_change(chan: &UnixStream) -> std::io::Result<()> {
    use std::io::Write;
    let mut m = [0u8; 12];
    m[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
    m[4..8].copy_from_slice(&1u32.to_le_bytes());
    chan.set_nonblocking(true)?;
    (&*chan).write_all(&m)
}

/// Stops every running ring, then runs `next`.
fn quiesce(id: u64, next: Next) {
    let Some(hr) = home(id) else { return };
    let mut h = hr.borrow_mut();
    let running: Vec<u16> = (0..h.shared.num_queues)
        .filter(|i| h.running[usize::from(*i)])
        .collect();
    h.set_phase(Phase::Quiescing {
        pending: running.len(),
        next,
    });
    let shared = h.shared.clone();
    drop(h);
    if running.is_empty() {
        after_quiesce(id, next);
        return;
    }
    for i in running {
        let home_r = shared.home();
        let rt = shared.runtime.clone();
        shared.runtime.send_msg(shared.reactor_of(i), move || {
            vring::stop(
                id,
                i,
                Box::new(move |st| rt.send_msg(home_r, move || on_stopped(id, st))),
            );
        });
    }
}

fn on_stopped(id: u64, st: VringStopped) {
    let Some(hr) = home(id) else { return };
    let mut h = hr.borrow_mut();
    if let Some(r) = h.running.get_mut(usize::from(st.index)) {
        *r = false;
    }
    {
        let mut d = h.lock();
        if let Some(v) = d.vrings.get_mut(usize::from(st.index)) {
            v.next_avail = st.next_avail;
            v.broken |= st.broken;
        }
    }
    if let Phase::Quiescing { pending, next } = h.phase {
        let pending = pending.saturating_sub(1);
        h.set_phase(Phase::Quiescing { pending, next });
        if pending == 0 {
            drop(h);
            after_quiesce(id, next);
        }
    }
}

fn after_quiesce(id: u64, next: Next) {
    let Some(hr) = home(id) else { return };
    let mut h = hr.borrow_mut();
    match next {
        Next::HandleMessage => {
            let res = match h.conn.as_mut() {
                Some(c) => c.handle_request(),
                None => Ok(()),
            };
            if let Err(VuError::InvalidParam | VuError::InvalidOperation(_)) = &res {
                // Our handler refused the request (already answered with a NACK when the
                // frontend asked for one); the message was consumed whole, the session goes on.
            } else if let Err(e) = res {
                match e {
                    VuError::Disconnected | VuError::PartialMessage => {
                        crate::log(&format!("{}: frontend disconnected", h.shared.name));
                    }
                    e => crate::log(&format!("{}: closing session: {e}", h.shared.name)),
                }
                h.conn = None;
                h.config_chan = None;
                h.lock().end_session();
            }
        }
        Next::ConfigChanged => {
            h.config_dirty = false;
            let acked = h.lock().acked_protocol & VhostUserProtocolFeatures::BACKEND_REQ.bits();
            if let (Some(chan), true) = (&h.config_chan, acked != 0 && h.conn.is_some()) {
                if let Err(e) = send_config_change(chan) {
                    crate::log(&format!("{}: config change notify: {e}", h.shared.name));
                }
            }
        }
        Next::DropBdev => {
            let d = h
                .shared
                .desc
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            drop(d);
        }
        Next::Close => {
            h.conn = None;
            h.config_chan = None;
            h.set_phase(Phase::Closed);
            let _ = std::fs::remove_file(&h.shared.socket);
            let cbs = std::mem::take(&mut h.on_close);
            drop(h);
            HOMES.with(|m| m.borrow_mut().remove(&id));
            for cb in cbs {
                cb();
            }
            return;
        }
    }
    h.set_phase(Phase::Waiting);
    start_rings(&mut h);
    let dirty = h.config_dirty;
    drop(h);
    if dirty {
        quiesce(id, Next::ConfigChanged);
    } else {
        arm(id);
    }
}

fn start_rings(h: &mut Home) {
    if h.conn.is_none() {
        return;
    }
    let starts: Vec<VringStart> = {
        let mut d = h.lock();
        (0..h.shared.num_queues)
            .filter_map(|i| d.ring_start(i))
            .collect()
    };
    for s in starts {
        let i = s.index;
        h.running[usize::from(i)] = true;
        h.shared
            .runtime
            .send_msg(h.shared.reactor_of(i), move || vring::start(s));
    }
}

/// On the home reactor: the bdev was resized; tell the frontend.
pub fn config_changed(id: u64) {
    let Some(hr) = home(id) else { return };
    let mut h = hr.borrow_mut();
    if h.phase == Phase::Waiting && h.op.is_none() {
        // Between events (should not happen): just notify on the next pass.
        h.config_dirty = true;
        return;
    }
    if h.phase == Phase::Waiting {
        let op = h.op.take();
        if let Some(op) = op {
            reactor::ring().abandon(op);
        }
        drop(h);
        quiesce(id, Next::ConfigChanged);
    } else {
        h.config_dirty = true;
    }
}

/// On the home reactor: the bdev is going away; stop the rings and close the descriptor.
pub fn bdev_removed(id: u64) {
    let Some(hr) = home(id) else { return };
    let mut h = hr.borrow_mut();
    if h.phase != Phase::Waiting {
        // Mid-transition: drop the descriptor once the rings are stopped next time.
        drop(h);
        let rt = reactor::runtime_handle();
        rt.send_msg(reactor::current(), move || bdev_removed(id));
        return;
    }
    if let Some(op) = h.op.take() {
        reactor::ring().abandon(op);
    }
    drop(h);
    quiesce(id, Next::DropBdev);
}

/// Whether a frontend is connected (home reactor only).
pub fn is_connected(id: u64) -> bool {
    home(id).is_some_and(|h| h.borrow().conn.is_some())
}

/// On the home reactor: closes the controller (stops rings, drops the session, removes the
/// socket); `done` runs after.
pub fn close(id: u64, done: Box<dyn FnOnce() + Send>) {
    let Some(hr) = home(id) else {
        done();
        return;
    };
    let mut h = hr.borrow_mut();
    h.on_close.push(done);
    if h.phase != Phase::Waiting {
        if let Phase::Quiescing { pending, .. } = h.phase {
            h.set_phase(Phase::Quiescing {
                pending,
                next: Next::Close,
            });
        }
        return;
    }
    if let Some(op) = h.op.take() {
        reactor::ring().abandon(op);
    }
    drop(h);
    quiesce(id, Next::Close);
}
