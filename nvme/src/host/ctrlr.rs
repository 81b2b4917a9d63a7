//! A controller: shared state ([`Ctrlr`]) and its admin queue ([`Admin`], admin reactor only).
//!
//! Admin bring-up (also on every reconnect): Fabrics Connect (qid 0) → Property Get CAP →
//! Property Get CC (disable first if enabled) → Property Set CC.EN → poll CSTS.RDY →
//! Identify Controller → Set Features Number of Queues → (first time) Identify active
//! namespace list and each namespace. Then Keep Alive every KATO/2.
//!
//! Faults: when the admin connection or any I/O queue fails, the controller goes offline
//! (`online` false: I/O queues fail in-flight commands with EIO and hold new I/O), and the
//! admin reconnects every `reconnect_delay_sec` until `ctrlr_loss_timeout_sec` (-1 forever,
//! 0 never); `fast_io_fail_timeout_sec` after the loss held I/O fails. A reconnect bumps
//! the generation so every I/O queue reconnects too.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use reactor::{IoDevice, PollStatus, PollerHandle, ReactorId, RuntimeHandle};
use slab::Slab;

use super::ioq::IoQueue;
use super::qpair::{CmdBuf, Dir, Event, Qpair, QpairOpts, QpairState, ADMIN_IN_CAPSULE};
use super::{HostError, HostStats};
use crate::proto::spec::{admin, cns, fabrics, feat, get_str, reg, Cqe, Sqe};

/// Admin queue entries (Connect SQSIZE 31), as Linux and SPDK hosts use.
const ADMIN_QUEUE_ENTRIES: u16 = 32;
/// How often the admin timer checks keep-alive, reconnect and loss deadlines.
const ADMIN_TICK: Duration = Duration::from_millis(100);
/// Most namespaces taken from one active namespace list.
const MAX_NAMESPACES: usize = 1024;
/// Cap on one command's transfer when MDTS is 0 (unlimited).
const MAX_XFER_UNLIMITED: u32 = 1 << 20;

/// Everything `bdev_nvme_attach_controller` sets.
#[derive(Clone, Debug)]
pub struct CtrlrOpts {
    /// Controller name (bdevs are `<name>n<nsid>`).
    pub name: String,
    /// Target address.
    pub addr: SocketAddr,
    /// `adrfam` as given ("IPv4"/"IPv6").
    pub adrfam: String,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
    /// Host identifier.
    pub hostid: [u8; 16],
    /// Header digest.
    pub hdgst: bool,
    /// Data digest.
    pub ddgst: bool,
    /// I/O queues wanted (one per reactor is used).
    pub num_io_queues: u32,
    /// Entries per I/O queue (clamped to CAP.MQES+1 and MAXCMD).
    pub io_queue_size: u32,
    /// Keep-alive timeout in ms (0 = none).
    pub kato_ms: u32,
    /// -1 reconnect forever, 0 never, N give up N seconds after the loss.
    pub ctrlr_loss_timeout_sec: i64,
    /// Delay between reconnect attempts.
    pub reconnect_delay_sec: u64,
    /// Fail held I/O this long after the loss (0 = hold until reconnect or loss).
    pub fast_io_fail_timeout_sec: u64,
    /// Connection setup limit per queue.
    pub connect_timeout: Duration,
}

/// One namespace as identified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NsInfo {
    /// Namespace id.
    pub nsid: u32,
    /// Size in blocks.
    pub nsze: u64,
    /// log2 of the block size.
    pub lba_shift: u32,
    /// NGUID (zero if none).
    pub nguid: [u8; 16],
}

/// Identify Controller facts the host uses.
#[derive(Clone, Debug, Default)]
pub struct CtrlrInfo {
    /// Controller id from Connect.
    pub cntlid: u16,
    /// Largest transfer per command in bytes.
    pub max_xfer: u32,
    /// In-capsule data limit of I/O queues in bytes.
    pub io_in_capsule: u32,
    /// I/O queue entries to ask for.
    pub io_queue_entries: u16,
    /// Optional NVM command support.
    pub oncs: u16,
    /// Volatile write cache present.
    pub vwc: bool,
    /// Model number.
    pub model: String,
    /// Serial number.
    pub serial: String,
    /// Firmware revision.
    pub firmware: String,
    /// I/O queues granted.
    pub nr_io_queues: u32,
    /// Namespaces.
    pub namespaces: Vec<NsInfo>,
    /// Bdev names made from the namespaces.
    pub bdevs: Vec<String>,
    /// Last error seen (for get_controllers).
    pub last_error: Option<String>,
}

/// Controller states reported by `bdev_nvme_get_controllers`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Admin queue connecting (first attach or reconnect).
    Connecting,
    /// Admin queue up; enabling and identifying.
    Initializing,
    /// Enabled; I/O flows.
    Ready,
    /// Connection lost; waiting to reconnect.
    Resetting,
    /// Gave up (ctrlr_loss_timeout_sec): I/O fails.
    Failed,
    /// Detached.
    Deleted,
}

impl Phase {
    /// SPDK's state name.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Connecting | Phase::Initializing => "connecting",
            Phase::Ready => "enabled",
            Phase::Resetting => "resetting",
            Phase::Failed => "failed",
            Phase::Deleted => "deleting",
        }
    }
}

/// A controller, shared by its admin queue, its I/O queues and its bdevs.
pub struct Ctrlr {
    /// Attach options.
    pub opts: CtrlrOpts,
    runtime: RuntimeHandle,
    admin_reactor: ReactorId,
    info: Mutex<CtrlrInfo>,
    phase: Mutex<Phase>,
    generation: AtomicU64,
    online: AtomicBool,
    failed: AtomicBool,
    fast_fail: AtomicBool,
    deleted: AtomicBool,
    io_device: OnceLock<IoDevice<IoQueue>>,
    /// Counters of all its queues.
    pub stats: Arc<HostStats>,
}

impl std::fmt::Debug for Ctrlr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ctrlr({})", self.opts.name)
    }
}

impl Ctrlr {
    /// Locks the control-path info.
    pub fn info(&self) -> MutexGuard<'_, CtrlrInfo> {
        self.info.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Current phase.
    pub fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_phase(&self, p: Phase, why: &str) {
        let mut g = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        crate::trace!("ctrlr {}: {:?} -> {p:?} ({why})", self.opts.name, *g);
        *g = p;
    }

    /// Association generation: changes on every (re)connect of the admin queue.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Connected and enabled.
    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    /// Held I/O must fail now (fast_io_fail timeout passed, controller lost or deleted).
    pub fn fail_held_io(&self) -> bool {
        self.fast_fail.load(Ordering::Acquire)
            || self.failed.load(Ordering::Acquire)
            || self.deleted.load(Ordering::Acquire)
    }

    /// Detached.
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// The per-reactor I/O queues.
    pub fn io_device(&self) -> Option<&IoDevice<IoQueue>> {
        self.io_device.get()
    }

    /// Wakes every reactor so its I/O queue re-reads the controller state.
    fn wake_all(&self) {
        for r in self.runtime.reactor_ids() {
            self.runtime.send_msg(r, || {});
        }
    }

    /// An I/O queue of generation `gen` failed: reset the controller (once per generation).
    pub fn report_io_failure(self: &Arc<Self>, gen: u64, err: HostError) {
        let c = self.clone();
        self.runtime.send_msg(self.admin_reactor, move || {
            if c.generation() != gen || !c.is_online() {
                return;
            }
            let admin = ADMINS.with(|m| m.borrow().get(&c.opts.name).cloned());
            if let Some(a) = admin {
                connection_failed(&a, HostError::new(err.errno(), format!("I/O queue: {err}")));
            }
        });
    }

    /// `bdev_nvme_get_controllers` entry.
    pub fn json(&self) -> serde_json::Value {
        let info = self.info();
        serde_json::json!({
            "name": self.opts.name,
            "ctrlrs": [{
                "state": self.phase().name(),
                "cntlid": info.cntlid,
                "trid": {
                    "trtype": "TCP",
                    "adrfam": self.opts.adrfam,
                    "traddr": self.opts.addr.ip().to_string(),
                    "trsvcid": self.opts.addr.port().to_string(),
                    "subnqn": self.opts.subnqn,
                },
                "host": {"nqn": self.opts.hostnqn, "addr": "", "svcid": ""},
                "model_number": info.model,
                "serial_number": info.serial,
                "firmware_revision": info.firmware,
                "num_io_queues": info.nr_io_queues,
                "bdevs": info.bdevs,
                "last_error": info.last_error,
                "stats": self.stats.json(),
            }]
        })
    }

    /// The `bdev_nvme_attach_controller` call that recreates this controller.
    pub fn config_json(&self) -> serde_json::Value {
        let o = &self.opts;
        serde_json::json!({"method": "bdev_nvme_attach_controller", "params": {
            "name": o.name, "trtype": "TCP", "adrfam": o.adrfam,
            "traddr": o.addr.ip().to_string(), "trsvcid": o.addr.port().to_string(),
            "subnqn": o.subnqn, "hostnqn": o.hostnqn, "hdgst": o.hdgst, "ddgst": o.ddgst,
            "num_io_queues": o.num_io_queues, "io_queue_size": o.io_queue_size,
            "ctrlr_loss_timeout_sec": o.ctrlr_loss_timeout_sec,
            "reconnect_delay_sec": o.reconnect_delay_sec,
            "fast_io_fail_timeout_sec": o.fast_io_fail_timeout_sec,
        }})
    }
}

/// Every attached (or attaching) controller, by name.
pub fn controllers() -> MutexGuard<'static, BTreeMap<String, Arc<Ctrlr>>> {
    static C: OnceLock<Mutex<BTreeMap<String, Arc<Ctrlr>>>> = OnceLock::new();
    C.get_or_init(|| Mutex::new(BTreeMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Called once when the first bring-up ends: the bdev names, or why it failed.
pub type AttachDone = Box<dyn FnOnce(Result<Vec<String>, HostError>) + Send>;

type AdminCb = Box<dyn FnOnce(&Rc<RefCell<Admin>>, Result<(Cqe, Vec<u8>), HostError>)>;

thread_local! {
    /// Admin queues on this reactor, by controller name.
    static ADMINS: RefCell<HashMap<String, Rc<RefCell<Admin>>>> = RefCell::new(HashMap::new());
}

/// The admin queue of one controller (admin reactor only).
pub struct Admin {
    ctrlr: Arc<Ctrlr>,
    qpair: Option<Qpair>,
    handlers: Slab<AdminCb>,
    attach_done: Option<AttachDone>,
    /// When the connection was lost (None while connected).
    lost_at: Option<Instant>,
    next_reconnect: Option<Instant>,
    ka_due: Option<Instant>,
    ka_sent: Option<Instant>,
    ready_deadline: Option<Instant>,
    /// Bring-up (after Connect) must finish by then.
    init_deadline: Option<Instant>,
    poller: Option<PollerHandle>,
    timer: Option<PollerHandle>,
    weak: Weak<RefCell<Admin>>,
}

/// Starts attaching a controller on the current (admin) reactor. `done` runs once bring-up
/// succeeded (bdevs registered) or failed (controller forgotten).
pub fn attach(opts: CtrlrOpts, runtime: RuntimeHandle, done: AttachDone) {
    let name = opts.name.clone();
    let ctrlr = Arc::new(Ctrlr {
        opts,
        runtime,
        admin_reactor: reactor::current(),
        info: Mutex::new(CtrlrInfo::default()),
        phase: Mutex::new(Phase::Connecting),
        generation: AtomicU64::new(0),
        online: AtomicBool::new(false),
        failed: AtomicBool::new(false),
        fast_fail: AtomicBool::new(false),
        deleted: AtomicBool::new(false),
        io_device: OnceLock::new(),
        stats: Arc::new(HostStats::default()),
    });
    {
        let mut all = controllers();
        if all.contains_key(&name) {
            drop(all);
            return done(Err(HostError::new(
                libc::EEXIST,
                format!("NVMe controller '{name}' already exists"),
            )));
        }
        all.insert(name.clone(), ctrlr.clone());
    }
    // The channel constructor holds the controller weakly (no cycle through io_device);
    // channels are only made through a bdev, which holds the controller.
    let weak_ctrlr = Arc::downgrade(&ctrlr);
    let _ = ctrlr
        .io_device
        .set(IoDevice::new(&format!("nvme:{name}"), move || {
            IoQueue::new(weak_ctrlr.clone())
        }));
    let a = Rc::new(RefCell::new(Admin {
        ctrlr,
        qpair: None,
        handlers: Slab::new(),
        attach_done: Some(done),
        lost_at: None,
        next_reconnect: None,
        ka_due: None,
        ka_sent: None,
        ready_deadline: None,
        init_deadline: None,
        poller: None,
        timer: None,
        weak: Weak::new(),
    }));
    let weak = Rc::downgrade(&a);
    let w1 = weak.clone();
    let poller = reactor::register_poller(&format!("nvme_admin:{name}"), move || {
        w1.upgrade().map_or(PollStatus::Idle, |a| admin_poll(&a))
    });
    let w2 = weak.clone();
    let timer =
        reactor::register_periodic_poller(&format!("nvme_timer:{name}"), ADMIN_TICK, move || {
            if let Some(a) = w2.upgrade() {
                admin_timer(&a);
            }
            PollStatus::Idle
        });
    {
        let mut g = a.borrow_mut();
        g.weak = weak;
        g.poller = Some(poller);
        g.timer = Some(timer);
    }
    ADMINS.with(|m| m.borrow_mut().insert(name, a.clone()));
    start_connect(&a);
}

fn start_connect(a: &Rc<RefCell<Admin>>) {
    let mut g = a.borrow_mut();
    let o = &g.ctrlr.opts;
    let qo = QpairOpts {
        addr: o.addr,
        qid: 0,
        nr_entries: ADMIN_QUEUE_ENTRIES,
        hdgst: o.hdgst,
        ddgst: o.ddgst,
        kato_ms: o.kato_ms,
        cntlid: 0xFFFF,
        subnqn: o.subnqn.clone(),
        hostnqn: o.hostnqn.clone(),
        hostid: o.hostid,
        connect_timeout: o.connect_timeout,
        max_xfer: 8192,
        stats: g.ctrlr.stats.clone(),
    };
    g.ctrlr
        .set_phase(Phase::Connecting, "connecting the admin queue");
    match Qpair::connect(qo) {
        Ok(q) => g.qpair = Some(q),
        Err(e) => {
            drop(g);
            connection_failed(a, e);
        }
    }
}

fn admin_poll(a: &Rc<RefCell<Admin>>) -> PollStatus {
    let mut events = Vec::new();
    let busy = {
        let mut g = a.borrow_mut();
        match g.qpair.as_mut() {
            Some(q) => q.poll(&mut events),
            None => false,
        }
    };
    for ev in events {
        match ev {
            Event::Connected { dw0 } => {
                {
                    let mut g = a.borrow_mut();
                    g.ctrlr.info().cntlid = (dw0 & 0xFFFF) as u16;
                    // CSTS.RDY may take up to CAP.TO (checked separately); the rest is
                    // bounded by the connect timeout.
                    g.init_deadline = Some(Instant::now() + g.ctrlr.opts.connect_timeout * 2);
                }
                a.borrow()
                    .ctrlr
                    .set_phase(Phase::Initializing, "admin queue connected");
                read_cap(a);
            }
            Event::Failed(e) => connection_failed(a, e),
            Event::Done { token, result, buf } => {
                let f = a.borrow_mut().handlers.try_remove(token as usize);
                if let Some(f) = f {
                    let data = match buf {
                        CmdBuf::Owned(v) => v,
                        _ => Vec::new(),
                    };
                    f(a, result.map(|c| (c, data)));
                }
            }
        }
    }
    PollStatus::from_busy(busy)
}

/// Submits an admin command; `f` gets the completion (any status) or a transport error.
fn admin_cmd(a: &Rc<RefCell<Admin>>, sqe: Sqe, dir: Dir, buf: CmdBuf, f: AdminCb) {
    let failed = {
        let mut g = a.borrow_mut();
        let token = g.handlers.insert(f);
        let r = match g.qpair.as_mut() {
            Some(q) if q.state() == QpairState::Ready => q
                .submit(sqe, dir, buf, ADMIN_IN_CAPSULE, token as u64)
                .map(|()| q.kick())
                .map_err(|(e, _)| e),
            _ => Err(HostError::new(libc::ENOTCONN, "admin queue not connected")),
        };
        r.err().map(|e| (token, e))
    };
    if let Some((token, e)) = failed {
        let f = a.borrow_mut().handlers.try_remove(token);
        if let Some(f) = f {
            f(a, Err(e));
        }
    }
}

/// Like [`admin_cmd`] but a failed status is an error too; `f` runs only on success.
fn admin_ok(
    a: &Rc<RefCell<Admin>>,
    what: &'static str,
    sqe: Sqe,
    read_len: usize,
    f: impl FnOnce(&Rc<RefCell<Admin>>, Cqe, Vec<u8>) + 'static,
) {
    let (dir, buf) = if read_len > 0 {
        (Dir::Read, CmdBuf::Owned(vec![0; read_len]))
    } else {
        (Dir::None, CmdBuf::None)
    };
    admin_cmd(
        a,
        sqe,
        dir,
        buf,
        Box::new(move |a, r| match r {
            Ok((cqe, data)) if cqe.is_success() => f(a, cqe, data),
            Ok((cqe, _)) => bring_up_failed(
                a,
                HostError::new(
                    libc::EIO,
                    format!(
                        "{what} failed: status {:#x} (SCT {} SC {:#x})",
                        cqe.status,
                        cqe.sct(),
                        cqe.sc()
                    ),
                ),
            ),
            Err(e) => connection_failed(a, e),
        }),
    );
}

fn prop_get(offset: u32, eight: bool) -> Sqe {
    let mut s = Sqe::new(fabrics::OPCODE, 0);
    s.set_byte(4, fabrics::PROPERTY_GET);
    s.set_byte(40, u8::from(eight));
    s.set_u32(44, offset);
    s
}

fn prop_set(offset: u32, value: u32) -> Sqe {
    let mut s = Sqe::new(fabrics::OPCODE, 0);
    s.set_byte(4, fabrics::PROPERTY_SET);
    s.set_byte(40, 0);
    s.set_u32(44, offset);
    s.set_u64(48, u64::from(value));
    s
}

fn identify(cns_value: u8, nsid: u32) -> Sqe {
    let mut s = Sqe::new(admin::IDENTIFY, nsid);
    s.set_cdw(10, u32::from(cns_value));
    s
}

fn read_cap(a: &Rc<RefCell<Admin>>) {
    admin_ok(
        a,
        "Property Get CAP",
        prop_get(reg::CAP, true),
        0,
        |a, cqe, _| {
            let cap = u64::from(cqe.dw0) | (u64::from(cqe.dw1) << 32);
            let mqes = (cap & 0xFFFF) as u32 + 1;
            let to_ms = ((cap >> 24) & 0xFF).max(1) * 500;
            {
                let mut g = a.borrow_mut();
                g.ready_deadline = Some(Instant::now() + Duration::from_millis(to_ms));
                let want = g.ctrlr.opts.io_queue_size.clamp(2, mqes.max(2));
                g.ctrlr.info().io_queue_entries = want.min(u32::from(u16::MAX)) as u16;
            }
            admin_ok(
                a,
                "Property Get CC",
                prop_get(reg::CC, false),
                0,
                |a, cqe, _| {
                    if cqe.dw0 & 1 != 0 {
                        // Enabled by a previous association: disable, wait for RDY=0, then enable.
                        admin_ok(a, "Property Set CC", prop_set(reg::CC, 0), 0, |a, _, _| {
                            wait_ready(a, false)
                        });
                    } else {
                        enable(a);
                    }
                },
            );
        },
    );
}

fn enable(a: &Rc<RefCell<Admin>>) {
    // EN, CSS NVM (0), MPS 4 KiB (0), AMS round robin, IOSQES 6, IOCQES 4.
    let cc = 1 | (6 << 16) | (4 << 20);
    admin_ok(
        a,
        "Property Set CC.EN",
        prop_set(reg::CC, cc),
        0,
        |a, _, _| wait_ready(a, true),
    );
}

fn wait_ready(a: &Rc<RefCell<Admin>>, want: bool) {
    admin_ok(
        a,
        "Property Get CSTS",
        prop_get(reg::CSTS, false),
        0,
        move |a, cqe, _| {
            let csts = cqe.dw0;
            if csts == u32::MAX || csts & 0x2 != 0 {
                return bring_up_failed(
                    a,
                    HostError::new(
                        libc::EIO,
                        format!("controller fatal status (CSTS {csts:#x})"),
                    ),
                );
            }
            if (csts & 1 != 0) == want {
                return if want { identify_ctrlr(a) } else { enable(a) };
            }
            let late = a
                .borrow()
                .ready_deadline
                .is_some_and(|d| Instant::now() > d);
            if late {
                return bring_up_failed(
                    a,
                    HostError::new(
                        libc::ETIMEDOUT,
                        format!("CSTS.RDY did not become {} in time", u8::from(want)),
                    ),
                );
            }
            let w = a.borrow().weak.clone();
            let _ = reactor::after(Duration::from_millis(1), move || {
                if let Some(a) = w.upgrade() {
                    wait_ready(&a, want);
                }
            });
        },
    );
}

fn le_u16(d: &[u8], off: usize) -> u16 {
    d.get(off..off + 2)
        .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
}

fn le_u32(d: &[u8], off: usize) -> u32 {
    d.get(off..off + 4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn le_u64(d: &[u8], off: usize) -> u64 {
    d.get(off..off + 8).map_or(0, |b| {
        let mut x = [0u8; 8];
        x.copy_from_slice(b);
        u64::from_le_bytes(x)
    })
}

fn ascii(d: &[u8], range: std::ops::Range<usize>) -> String {
    get_str(d.get(range).unwrap_or(&[])).trim().to_string()
}

fn identify_ctrlr(a: &Rc<RefCell<Admin>>) {
    admin_ok(
        a,
        "Identify Controller",
        identify(cns::CONTROLLER, 0),
        4096,
        |a, _, d| {
            let mdts = d.get(77).copied().unwrap_or(0);
            let max_xfer = if mdts == 0 || mdts > 20 {
                MAX_XFER_UNLIMITED
            } else {
                (4096u64 << mdts).min(u64::from(MAX_XFER_UNLIMITED) * 16) as u32
            };
            let ioccsz = le_u32(&d, 1792);
            let maxcmd = le_u16(&d, 514);
            let icdoff = le_u16(&d, 1800);
            let cntlid = le_u16(&d, 78);
            {
                let g = a.borrow();
                let mut info = g.ctrlr.info();
                if cntlid != info.cntlid {
                    let msg = format!(
                        "Identify CNTLID {cntlid} differs from Connect's {}",
                        info.cntlid
                    );
                    drop(info);
                    drop(g);
                    return bring_up_failed(a, HostError::new(libc::EPROTO, msg));
                }
                info.max_xfer = max_xfer;
                info.io_in_capsule = if ioccsz >= 4 && icdoff == 0 {
                    ioccsz.saturating_mul(16).saturating_sub(64)
                } else {
                    0
                };
                if maxcmd > 0 {
                    info.io_queue_entries = info.io_queue_entries.min(maxcmd).max(2);
                }
                info.oncs = le_u16(&d, 520);
                info.vwc = d.get(525).is_some_and(|v| v & 1 != 0);
                info.serial = ascii(&d, 4..24);
                info.model = ascii(&d, 24..64);
                info.firmware = ascii(&d, 64..72);
            }
            set_queues(a);
        },
    );
}

fn set_queues(a: &Rc<RefCell<Admin>>) {
    let want = {
        let g = a.borrow();
        let nr = g.ctrlr.runtime.nr_reactors() as u32;
        g.ctrlr
            .opts
            .num_io_queues
            .clamp(1, 0xFFFF)
            .max(nr.min(0xFFFF))
    };
    let mut s = Sqe::new(admin::SET_FEATURES, 0);
    s.set_cdw(10, u32::from(feat::NUMBER_OF_QUEUES));
    s.set_cdw(11, (want - 1) | ((want - 1) << 16));
    admin_ok(a, "Set Features Number of Queues", s, 0, |a, cqe, _| {
        let granted = (cqe.dw0 & 0xFFFF).min(cqe.dw0 >> 16) + 1;
        a.borrow().ctrlr.info().nr_io_queues = granted;
        let first = a.borrow().attach_done.is_some();
        if first {
            list_namespaces(a);
        } else {
            bring_up_done(a);
        }
    });
}

fn list_namespaces(a: &Rc<RefCell<Admin>>) {
    admin_ok(
        a,
        "Identify active namespace list",
        identify(cns::ACTIVE_NS_LIST, 0),
        4096,
        |a, _, d| {
            let nsids: Vec<u32> = d
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .take_while(|n| *n != 0)
                .take(MAX_NAMESPACES)
                .collect();
            identify_namespaces(a, nsids, 0);
        },
    );
}

fn identify_namespaces(a: &Rc<RefCell<Admin>>, nsids: Vec<u32>, i: usize) {
    let Some(&nsid) = nsids.get(i) else {
        return bring_up_done(a);
    };
    admin_ok(
        a,
        "Identify Namespace",
        identify(cns::NAMESPACE, nsid),
        4096,
        move |a, _, d| {
            let nsze = le_u64(&d, 0);
            let flbas = d.get(26).copied().unwrap_or(0);
            let fmt = usize::from((flbas & 0xF) | ((flbas >> 1) & 0x30));
            let lbaf = le_u32(&d, 128 + fmt * 4);
            let ms = lbaf & 0xFFFF;
            let lbads = (lbaf >> 16) & 0xFF;
            let mut nguid = [0u8; 16];
            if let Some(g) = d.get(104..120) {
                nguid.copy_from_slice(g);
            }
            if nsze > 0 && ms == 0 && (9..=16).contains(&lbads) {
                a.borrow().ctrlr.info().namespaces.push(NsInfo {
                    nsid,
                    nsze,
                    lba_shift: lbads,
                    nguid,
                });
            } else {
                crate::trace!("nsid {nsid}: skipped (nsze {nsze}, ms {ms}, lbads {lbads})");
            }
            identify_namespaces(a, nsids, i + 1);
        },
    );
}

/// Bring-up finished: go online; the first time, make the bdevs and answer the attach.
fn bring_up_done(a: &Rc<RefCell<Admin>>) {
    let (ctrlr, done) = {
        let mut g = a.borrow_mut();
        g.lost_at = None;
        g.next_reconnect = None;
        g.ka_sent = None;
        let kato = g.ctrlr.opts.kato_ms;
        g.ka_due = (kato > 0).then(|| Instant::now() + Duration::from_millis(u64::from(kato / 2)));
        (g.ctrlr.clone(), g.attach_done.take())
    };
    ctrlr.generation.fetch_add(1, Ordering::AcqRel);
    HostStats::inc(&ctrlr.stats.nr_connects);
    ctrlr.fast_fail.store(false, Ordering::Release);
    ctrlr.online.store(true, Ordering::Release);
    ctrlr.info().last_error = None;
    ctrlr.set_phase(Phase::Ready, "enabled");
    ctrlr.wake_all();
    if let Some(done) = done {
        match crate::bdev::register_namespaces(&ctrlr) {
            Ok(names) => done(Ok(names)),
            Err(e) => {
                detach_now(a);
                done(Err(e));
            }
        }
    }
}

/// A command of the bring-up failed with a status: the controller is unusable as is.
fn bring_up_failed(a: &Rc<RefCell<Admin>>, e: HostError) {
    if let Some(q) = a.borrow_mut().qpair.as_mut() {
        q.fail(e.clone());
    }
    connection_failed(a, e);
}

/// The admin connection failed (or a queue reported failure): offline, then reconnect per
/// policy. Idempotent while already handling a loss.
fn connection_failed(a: &Rc<RefCell<Admin>>, e: HostError) {
    let ctrlr = a.borrow().ctrlr.clone();
    if matches!(
        ctrlr.phase(),
        Phase::Resetting | Phase::Failed | Phase::Deleted
    ) {
        return;
    }
    crate::trace!("ctrlr {}: connection lost: {e}", ctrlr.opts.name);
    ctrlr.info().last_error = Some(e.to_string());
    let first = a.borrow_mut().attach_done.take();
    if let Some(done) = first {
        // The first bring-up failed: forget the controller, report why.
        detach_now(a);
        return done(Err(e));
    }
    ctrlr.online.store(false, Ordering::Release);
    {
        let mut g = a.borrow_mut();
        if let Some(mut q) = g.qpair.take() {
            q.fail(e.clone());
        }
        let now = Instant::now();
        let lost_at = *g.lost_at.get_or_insert(now);
        let o = &ctrlr.opts;
        let give_up = o.ctrlr_loss_timeout_sec == 0
            || (o.ctrlr_loss_timeout_sec > 0
                && now >= lost_at + Duration::from_secs(o.ctrlr_loss_timeout_sec as u64));
        if give_up {
            ctrlr.failed.store(true, Ordering::Release);
            ctrlr.set_phase(Phase::Failed, "ctrlr_loss_timeout_sec reached");
            g.next_reconnect = None;
        } else {
            ctrlr.set_phase(Phase::Resetting, "waiting to reconnect");
            g.next_reconnect = Some(now + Duration::from_secs(o.reconnect_delay_sec));
        }
    }
    ctrlr.wake_all();
}

/// Periodic: keep-alive, reconnect and timeout deadlines.
fn admin_timer(a: &Rc<RefCell<Admin>>) {
    let now = Instant::now();
    let ctrlr = a.borrow().ctrlr.clone();
    match ctrlr.phase() {
        Phase::Ready => keep_alive(a, now),
        Phase::Initializing => {
            let (init, ready) = {
                let g = a.borrow();
                (g.init_deadline, g.ready_deadline)
            };
            let deadline = match (init, ready) {
                (Some(i), Some(r)) => Some(i.max(r)),
                (i, r) => i.or(r),
            };
            if deadline.is_some_and(|d| now > d) {
                bring_up_failed(
                    a,
                    HostError::new(
                        libc::ETIMEDOUT,
                        "controller bring-up did not finish in time",
                    ),
                );
            }
        }
        Phase::Resetting => {
            let (lost_at, due) = {
                let g = a.borrow();
                (g.lost_at, g.next_reconnect)
            };
            let o = &ctrlr.opts;
            if let Some(lost) = lost_at {
                if o.fast_io_fail_timeout_sec > 0
                    && now >= lost + Duration::from_secs(o.fast_io_fail_timeout_sec)
                    && !ctrlr.fast_fail.swap(true, Ordering::AcqRel)
                {
                    ctrlr.wake_all();
                }
            }
            if due.is_some_and(|d| now >= d) {
                a.borrow_mut().next_reconnect = None;
                start_connect(a);
            }
        }
        _ => {}
    }
}

fn keep_alive(a: &Rc<RefCell<Admin>>, now: Instant) {
    let kato = Duration::from_millis(u64::from(a.borrow().ctrlr.opts.kato_ms));
    if kato.is_zero() {
        return;
    }
    let (sent, due) = {
        let g = a.borrow();
        (g.ka_sent, g.ka_due)
    };
    if let Some(sent) = sent {
        if now > sent + kato {
            return bring_up_failed(
                a,
                HostError::new(libc::ETIMEDOUT, "keep alive not answered within KATO"),
            );
        }
        return;
    }
    if due.is_some_and(|d| now >= d) {
        {
            let mut g = a.borrow_mut();
            g.ka_sent = Some(now);
            g.ka_due = Some(now + kato / 2);
        }
        admin_ok(
            a,
            "Keep Alive",
            Sqe::new(admin::KEEP_ALIVE, 0),
            0,
            |a, _, _| {
                let mut g = a.borrow_mut();
                g.ka_sent = None;
                HostStats::inc(&g.ctrlr.stats.nr_keep_alive);
            },
        );
    }
}

/// Tears the controller down on the admin reactor: bdevs unregistered, sockets closed,
/// I/O queues told (held and in-flight I/O fails).
fn detach_now(a: &Rc<RefCell<Admin>>) {
    let ctrlr = a.borrow().ctrlr.clone();
    ctrlr.deleted.store(true, Ordering::Release);
    ctrlr.online.store(false, Ordering::Release);
    ctrlr.set_phase(Phase::Deleted, "detached");
    crate::bdev::unregister_namespaces(&ctrlr);
    {
        let mut g = a.borrow_mut();
        if let Some(mut q) = g.qpair.take() {
            q.fail(HostError::new(libc::ENODEV, "controller detached"));
        }
        if let Some(p) = g.poller.take() {
            p.unregister();
        }
        if let Some(p) = g.timer.take() {
            p.unregister();
        }
        g.handlers.clear();
    }
    ADMINS.with(|m| m.borrow_mut().remove(&ctrlr.opts.name));
    let mut all = controllers();
    if all
        .get(&ctrlr.opts.name)
        .is_some_and(|c| Arc::ptr_eq(c, &ctrlr))
    {
        all.remove(&ctrlr.opts.name);
    }
    drop(all);
    ctrlr.wake_all();
}

/// Detaches controller `name`; runs on its admin reactor, `done` gets the outcome.
pub fn detach(name: &str, done: Box<dyn FnOnce(Result<(), HostError>) + Send>) {
    let Some(ctrlr) = controllers().get(name).cloned() else {
        return done(Err(HostError::new(
            libc::ENODEV,
            format!("NVMe controller '{name}' does not exist"),
        )));
    };
    let name = name.to_string();
    ctrlr
        .runtime
        .clone()
        .send_msg(ctrlr.admin_reactor, move || {
            let admin = ADMINS.with(|m| m.borrow().get(&name).cloned());
            match admin {
                Some(a) => {
                    let first = a.borrow_mut().attach_done.take();
                    detach_now(&a);
                    if let Some(f) = first {
                        f(Err(HostError::new(
                            libc::ENODEV,
                            "controller detached while attaching",
                        )));
                    }
                    done(Ok(()))
                }
                None => done(Err(HostError::new(
                    libc::ENODEV,
                    format!("NVMe controller '{name}' does not exist"),
                ))),
            }
        });
}
