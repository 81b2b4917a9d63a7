//! Controllers: Fabrics commands (Connect, Property Get/Set), admin commands (Identify,
//! Get Log Page, features, AER, Keep Alive, Abort) and keep-alive expiry.
//!
//! A controller is created by an admin-queue Connect on the reactor of that connection;
//! its I/O qpairs may live on other reactors. Its shared state is control path only (a
//! mutex); teardown sets `dead` and wakes every reactor holding one of its qpairs, which
//! then close themselves.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use reactor::{PollStatus, ReactorId, RuntimeHandle};

use crate::spec::{self, admin, fabrics, reg, sc, DNR};
use crate::subsystem::{self, ListenAddr, Subsystem};
use crate::tcp::qpair::{Outcome, Qpair};
use crate::trace;

/// Controller register defaults.
const VS_1_3: u32 = 0x0001_0300;
/// AERL (0's based): 4 outstanding AERs.
const AERL: u8 = 3;
/// Keep-alive granularity (KAS) in 100 ms units.
const KAS: u16 = 10;
/// Reap discovery controllers that connected with KATO 0 after this long.
const DISCOVERY_KATO_MS: u32 = 120_000;
/// Most changed-namespace list entries before reporting overflow.
const MAX_CHANGED_NS: usize = 1024;
/// ACL (0's based): 4 outstanding Abort commands.
const ACL: u8 = 3;
/// Abort Command Limit Exceeded (SCT 1, SC 03h), shifted-down form.
const SC_ABORT_LIMIT: u16 = 0x103;

/// Asynchronous event notices this target raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    /// Namespace Attribute Changed (log page 04h), for I/O controllers.
    NsAttrChanged,
    /// Discovery Log Page Change (log page 70h), for discovery controllers.
    DiscoveryLogChanged,
}

impl Notice {
    /// The AER completion DW0: type 2 (notice), the event information, the log page.
    fn dw0(self) -> u32 {
        match self {
            Notice::NsAttrChanged => 0x02 | (0x04 << 16),
            Notice::DiscoveryLogChanged => 0x02 | (0xF0 << 8) | (0x70 << 16),
        }
    }
    /// The Asynchronous Event Configuration bit (feature 0Bh) that enables it.
    fn aec_bit(self) -> u32 {
        match self {
            Notice::NsAttrChanged => 1 << 8,
            Notice::DiscoveryLogChanged => 1 << 31,
        }
    }
    /// Its bit in [`CtrlrState::masked_notices`].
    fn mask_bit(self) -> u8 {
        match self {
            Notice::NsAttrChanged => 1,
            Notice::DiscoveryLogChanged => 2,
        }
    }
}

/// Controller state behind the mutex.
#[derive(Debug)]
pub struct CtrlrState {
    /// CC register.
    pub cc: u32,
    /// CSTS register.
    pub csts: u32,
    /// Keep-alive timeout, ms (0 = none).
    pub kato_ms: u32,
    /// Async event configuration (feature 0Bh).
    pub aec: u32,
    /// Granted I/O queues (0's based, NSQA = NCQA).
    pub nr_io_queues: u16,
    /// Connected I/O queues: qid → (reactor, qpair id, peer, local).
    pub io_qpairs: BTreeMap<u16, QpairInfo>,
    /// The admin qpair.
    pub admin: Option<QpairInfo>,
    /// Changed namespace list (log page 04h).
    pub changed_ns: Vec<u32>,
    /// AEN completions waiting for an AER.
    pub pending_aens: VecDeque<u32>,
    /// Notices already raised, masked until the host reads their log page with RAE 0
    /// (bits of [`Notice::mask_bit`]).
    pub masked_notices: u8,
    /// Volatile write cache enabled (feature 06h).
    pub vwc: bool,
}

/// Where a qpair of the controller lives.
#[derive(Clone, Debug)]
pub struct QpairInfo {
    /// Reactor.
    pub reactor: ReactorId,
    /// Qpair id.
    pub id: u64,
    /// Host address.
    pub peer: std::net::SocketAddr,
    /// Our address.
    pub local: std::net::SocketAddr,
    /// The listener the connection came in through.
    pub listen: ListenAddr,
}

/// An NVMe controller (dynamic model).
#[derive(Debug)]
pub struct Ctrlr {
    /// Controller id.
    pub cntlid: u16,
    /// Its subsystem.
    pub subsys: Arc<Subsystem>,
    /// Host NQN from Connect.
    pub hostnqn: String,
    /// Host identifier from Connect.
    pub hostid: [u8; 16],
    /// Torn down: its qpairs close.
    dead: AtomicBool,
    /// AENs are pending for the admin qpair.
    pub aen_flag: AtomicBool,
    /// CSTS.RDY mirrored for the data path (no mutex per I/O).
    ready: AtomicBool,
    /// Last keep-alive (ms since `epoch`).
    last_ka_ms: AtomicU64,
    epoch: Instant,
    runtime: RuntimeHandle,
    /// The rest.
    pub state: Mutex<CtrlrState>,
}

impl Ctrlr {
    /// Locks the state.
    pub fn lock(&self) -> MutexGuard<'_, CtrlrState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True while CC.EN = 1 and CSTS.RDY = 1 (commands other than Fabrics allowed).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// True once torn down.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Tears the controller down: unlist it, close all its qpairs.
    pub fn fail(&self, why: &str) {
        if self.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        trace!(
            "ctrlr {} ({}): torn down: {why}",
            self.cntlid,
            self.subsys.nqn
        );
        self.subsys
            .lock()
            .ctrlrs
            .retain(|c| c.cntlid != self.cntlid);
        let reactors: Vec<ReactorId> = {
            let mut st = self.lock();
            st.csts |= 0x2; // CFS
            st.admin
                .iter()
                .chain(st.io_qpairs.values())
                .map(|q| q.reactor)
                .collect()
        };
        for r in reactors {
            self.runtime.send_msg(r, || {});
        }
    }

    /// A qpair of this controller closed.
    pub fn qpair_closed(&self, qid: u16, id: u64) {
        if qid == 0 {
            let is_admin = self.lock().admin.as_ref().is_some_and(|a| a.id == id);
            if is_admin {
                self.fail("admin queue closed");
            }
            return;
        }
        let mut st = self.lock();
        if st.io_qpairs.get(&qid).is_some_and(|q| q.id == id) {
            st.io_qpairs.remove(&qid);
        }
    }

    /// Listener `addr` was removed from the subsystem: if the admin queue came in through
    /// it the controller goes; else each I/O queue that did closes.
    pub fn disconnect_listener(&self, addr: &ListenAddr) {
        let io: Vec<u64> = {
            let st = self.lock();
            if st.admin.as_ref().is_some_and(|a| a.listen == *addr) {
                drop(st);
                self.fail("listener removed");
                return;
            }
            st.io_qpairs
                .values()
                .filter(|q| q.listen == *addr)
                .map(|q| q.id)
                .collect()
        };
        for id in io {
            crate::tcp::close_qpair(id, "listener removed");
        }
    }

    /// Queues `notice` for the admin queue's AERs if the host enabled it and the same kind
    /// is not masked (raised and its log page not yet read); true if queued.
    fn queue_notice(st: &mut CtrlrState, notice: Notice) -> bool {
        if st.aec & notice.aec_bit() == 0 || st.masked_notices & notice.mask_bit() != 0 {
            return false;
        }
        st.masked_notices |= notice.mask_bit();
        st.pending_aens.push_back(notice.dw0());
        true
    }

    /// The discovery log changed: a Discovery Log Change notice if the host asked for it.
    pub fn discovery_log_changed(&self) {
        let admin = {
            let mut st = self.lock();
            if !Self::queue_notice(&mut st, Notice::DiscoveryLogChanged) {
                return;
            }
            st.admin.as_ref().map(|a| a.reactor)
        };
        self.aen_flag.store(true, Ordering::Release);
        if let Some(r) = admin {
            self.runtime.send_msg(r, || {});
        }
    }

    /// Namespace `nsid` was added, removed or resized: log it, raise a notice, and wake
    /// every qpair so it drops cached namespace handles (a removed namespace's descriptor
    /// must close even on idle queues).
    pub fn ns_changed(&self, nsid: u32) {
        let (reactors, aen) = {
            let mut st = self.lock();
            if st.changed_ns.len() < MAX_CHANGED_NS {
                if !st.changed_ns.contains(&nsid) {
                    st.changed_ns.push(nsid);
                }
            } else {
                st.changed_ns = vec![0xFFFF_FFFF];
            }
            let aen = Self::queue_notice(&mut st, Notice::NsAttrChanged);
            let reactors: Vec<ReactorId> = st
                .admin
                .iter()
                .chain(st.io_qpairs.values())
                .map(|q| q.reactor)
                .collect();
            (reactors, aen)
        };
        if aen {
            self.aen_flag.store(true, Ordering::Release);
        }
        for r in reactors {
            self.runtime.send_msg(r, || {});
        }
    }

    fn touch_keep_alive(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ka_ms.store(ms, Ordering::Relaxed);
    }

    /// True if the keep-alive timer expired (KATO rounded up to whole seconds).
    fn keep_alive_expired(&self) -> bool {
        let kato = self.lock().kato_ms;
        let kato = if kato == 0 && self.subsys.is_discovery {
            DISCOVERY_KATO_MS
        } else {
            kato
        };
        if kato == 0 {
            return false;
        }
        // Whole seconds as the Linux target counts, plus a grace of half that (at least
        // 1 s) for hosts whose keep-alive work runs late (hosts send one every KATO/2).
        let rounded = u64::from(kato).div_ceil(1000) * 1000;
        let limit = rounded + (rounded / 2).max(1000);
        let now = self.epoch.elapsed().as_millis() as u64;
        now.saturating_sub(self.last_ka_ms.load(Ordering::Relaxed)) > limit
    }

    /// JSON for `nvmf_subsystem_get_controllers`.
    pub fn to_json(&self) -> serde_json::Value {
        let st = self.lock();
        serde_json::json!({
            "cntlid": self.cntlid,
            "hostnqn": self.hostnqn,
            "hostid": format_uuid(&self.hostid),
            "num_io_qpairs": st.io_qpairs.len(),
        })
    }
}

/// Formats 16 bytes as a UUID string.
pub fn format_uuid(b: &[u8; 16]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl Qpair {
    /// Fabrics commands.
    pub(crate) fn exec_fabrics(&mut self, slot: usize) -> Outcome {
        let sqe = self.reqs[slot].sqe;
        match sqe.fctype() {
            fabrics::CONNECT => self.connect(slot),
            _ if self.ctrlr.is_none() => Outcome::status(sc::CMD_SEQ_ERROR | DNR),
            fabrics::PROPERTY_GET if self.qid == 0 => self.property_get(slot),
            fabrics::PROPERTY_SET if self.qid == 0 => self.property_set(slot),
            _ => Outcome::status(sc::INVALID_OPCODE | DNR),
        }
    }

    fn connect(&mut self, slot: usize) -> Outcome {
        let r = &self.reqs[slot];
        let sqe = r.sqe;
        if self.ctrlr.is_some() {
            return Outcome::status(sc::CMD_SEQ_ERROR | DNR);
        }
        let Some(data) = r.data.as_ref().filter(|d| d.len() >= 1024) else {
            return Outcome::status(sc::SGL_LEN_INVALID | DNR);
        };
        let recfmt = sqe.u16_at(40);
        let qid = sqe.u16_at(42);
        let sqsize = sqe.u16_at(44);
        let cattr = sqe.byte(46);
        let kato = sqe.u32_at(48);
        let mut hostid = [0u8; 16];
        hostid.copy_from_slice(&data[0..16]);
        let cntlid = u16::from_le_bytes([data[16], data[17]]);
        let subnqn = spec::get_str(&data[256..512]);
        let hostnqn = spec::get_str(&data[512..768]);
        let invalid = |ipo: u32, in_data: bool| Outcome::Done {
            status: sc::CONNECT_INVALID_PARAM | DNR,
            dw0: ipo | if in_data { 1 << 16 } else { 0 },
            dw1: 0,
            data: None,
        };
        if recfmt != 0 {
            return Outcome::status(sc::CONNECT_FORMAT | DNR);
        }
        let Some(subsys) = subsystem::find_subsystem(&subnqn) else {
            return invalid(256, true);
        };
        if subsys.deleted.load(Ordering::Acquire) {
            return invalid(256, true);
        }
        if !subsys.is_discovery && !subsys.host_allowed(&hostnqn) {
            trace!("connect: host {hostnqn} not allowed on {subnqn}");
            return Outcome::status(sc::CONNECT_INVALID_HOST | DNR);
        }
        if !subsys.listener_allowed(&self.listen) {
            trace!(
                "connect: {subnqn} does not listen on {}:{}",
                self.listen.traddr,
                self.listen.trsvcid
            );
            return Outcome::status(sc::CONNECT_INVALID_HOST | DNR);
        }
        let max_sq = if qid == 0 {
            self.opts.max_aq_depth
        } else {
            self.opts.max_queue_depth
        };
        if sqsize == 0 || u32::from(sqsize) >= max_sq {
            return invalid(44, false);
        }
        self.sq_flow_disabled = cattr & 0x4 != 0;
        if qid == 0 {
            self.connect_admin(subsys, cntlid, hostid, hostnqn, kato, sqsize)
        } else {
            self.connect_io(subsys, qid, cntlid, hostnqn, sqsize)
        }
    }

    fn info(&self) -> QpairInfo {
        QpairInfo {
            reactor: reactor::current(),
            id: self.id,
            peer: self.peer,
            local: self.local,
            listen: self.listen.clone(),
        }
    }

    fn connect_admin(
        &mut self,
        subsys: Arc<Subsystem>,
        cntlid: u16,
        hostid: [u8; 16],
        hostnqn: String,
        kato: u32,
        sqsize: u16,
    ) -> Outcome {
        if cntlid != 0xFFFF {
            return Outcome::Done {
                status: sc::CONNECT_INVALID_PARAM | DNR,
                dw0: 16 | (1 << 16),
                dw1: 0,
                data: None,
            };
        }
        let ctrlr = {
            let mut st = subsys.lock();
            let mut id = st.next_cntlid;
            for _ in 0..0xFFF0 {
                if !st.ctrlrs.iter().any(|c| c.cntlid == id) {
                    break;
                }
                id = if id >= 0xFFEF { 1 } else { id + 1 };
            }
            if st.ctrlrs.iter().any(|c| c.cntlid == id) {
                return Outcome::status(sc::CONNECT_CTRL_BUSY);
            }
            st.next_cntlid = if id >= 0xFFEF { 1 } else { id + 1 };
            let c = Arc::new(Ctrlr {
                cntlid: id,
                subsys: subsys.clone(),
                hostnqn,
                hostid,
                dead: AtomicBool::new(false),
                aen_flag: AtomicBool::new(false),
                ready: AtomicBool::new(false),
                last_ka_ms: AtomicU64::new(0),
                epoch: Instant::now(),
                runtime: reactor::runtime_handle(),
                state: Mutex::new(CtrlrState {
                    cc: 0,
                    csts: 0,
                    kato_ms: kato,
                    aec: 0,
                    nr_io_queues: 0,
                    io_qpairs: BTreeMap::new(),
                    admin: Some(self.info()),
                    changed_ns: Vec::new(),
                    pending_aens: VecDeque::new(),
                    masked_notices: 0,
                    vwc: true,
                }),
            });
            st.ctrlrs.push(c.clone());
            c
        };
        trace!(
            "ctrlr {} on {}: admin connect from {} (kato {kato} ms)",
            ctrlr.cntlid,
            subsys.nqn,
            ctrlr.hostnqn
        );
        self.qid = 0;
        self.sqsize = sqsize;
        self.ctrlr = Some(ctrlr.clone());
        self.start_keep_alive(&ctrlr);
        Outcome::Done {
            status: sc::SUCCESS,
            dw0: u32::from(ctrlr.cntlid),
            dw1: 0,
            data: None,
        }
    }

    fn start_keep_alive(&mut self, ctrlr: &Arc<Ctrlr>) {
        ctrlr.touch_keep_alive();
        let c = Arc::downgrade(ctrlr);
        let p = reactor::register_periodic_poller(
            "nvmf_keep_alive",
            Duration::from_millis(200),
            move || {
                if let Some(c) = c.upgrade() {
                    if !c.is_dead() && c.keep_alive_expired() {
                        c.fail("keep-alive timer expired");
                        return PollStatus::Busy;
                    }
                }
                PollStatus::Idle
            },
        );
        self.ka_poller = Some(p);
    }

    fn connect_io(
        &mut self,
        subsys: Arc<Subsystem>,
        qid: u16,
        cntlid: u16,
        hostnqn: String,
        sqsize: u16,
    ) -> Outcome {
        let ctrlr = subsys
            .lock()
            .ctrlrs
            .iter()
            .find(|c| c.cntlid == cntlid && c.hostnqn == hostnqn)
            .cloned();
        let Some(ctrlr) = ctrlr.filter(|c| !c.is_dead()) else {
            return Outcome::Done {
                status: sc::CONNECT_INVALID_PARAM | DNR,
                dw0: 16 | (1 << 16),
                dw1: 0,
                data: None,
            };
        };
        if subsys.is_discovery || u32::from(qid) >= self.opts.max_qpairs_per_ctrlr {
            return Outcome::Done {
                status: sc::CONNECT_INVALID_PARAM | DNR,
                dw0: 42,
                dw1: 0,
                data: None,
            };
        }
        {
            let mut st = ctrlr.lock();
            if st.cc & 1 == 0 || st.csts & 1 == 0 {
                return Outcome::status(sc::CMD_SEQ_ERROR | DNR);
            }
            if st.io_qpairs.contains_key(&qid) {
                return Outcome::status(sc::CMD_SEQ_ERROR | DNR);
            }
            st.io_qpairs.insert(qid, self.info());
        }
        self.qid = qid;
        self.sqsize = sqsize;
        self.ctrlr = Some(ctrlr.clone());
        Outcome::Done {
            status: sc::SUCCESS,
            dw0: u32::from(ctrlr.cntlid),
            dw1: 0,
            data: None,
        }
    }

    fn cap(&self) -> u64 {
        let mqes = u64::from(self.opts.max_queue_depth.saturating_sub(1).min(0xFFFF));
        mqes | (1 << 16) | (15 << 24) | (1 << 37)
    }

    fn property_get(&mut self, slot: usize) -> Outcome {
        let sqe = self.reqs[slot].sqe;
        let size8 = sqe.byte(40) & 1 != 0;
        let ofst = sqe.u32_at(44);
        let Some(c) = self.ctrlr.clone() else {
            return Outcome::status(sc::CMD_SEQ_ERROR | DNR);
        };
        let st = c.lock();
        let value: u64 = match (ofst, size8) {
            (reg::CAP, true) => self.cap(),
            (reg::VS, false) => u64::from(VS_1_3),
            (reg::CC, false) => u64::from(st.cc),
            (reg::CSTS, false) => u64::from(st.csts),
            _ => return Outcome::status(sc::INVALID_FIELD | DNR),
        };
        Outcome::Done {
            status: sc::SUCCESS,
            dw0: value as u32,
            dw1: (value >> 32) as u32,
            data: None,
        }
    }

    fn property_set(&mut self, slot: usize) -> Outcome {
        let sqe = self.reqs[slot].sqe;
        let size8 = sqe.byte(40) & 1 != 0;
        let ofst = sqe.u32_at(44);
        let value = sqe.u32_at(48);
        let Some(c) = self.ctrlr.clone() else {
            return Outcome::status(sc::CMD_SEQ_ERROR | DNR);
        };
        if ofst != reg::CC || size8 {
            return Outcome::status(sc::INVALID_FIELD | DNR);
        }
        let mut st = c.lock();
        let old = st.cc;
        st.cc = value;
        if value & 1 == 1 && old & 1 == 0 {
            let iosqes = (value >> 16) & 0xF;
            let iocqes = (value >> 20) & 0xF;
            let mps = (value >> 7) & 0xF;
            let ams = (value >> 11) & 0x7;
            let css = (value >> 4) & 0x7;
            let io_ok = c.subsys.is_discovery || (iosqes == 6 && iocqes == 4);
            if io_ok && mps == 0 && ams == 0 && (css == 0 || css == 6) {
                st.csts |= 1;
            } else {
                st.csts |= 2;
            }
        } else if value & 1 == 0 && old & 1 == 1 {
            st.csts &= !1;
        }
        c.ready.store(st.csts & 1 == 1, Ordering::Release);
        let shn = (value >> 14) & 0x3;
        if shn != 0 {
            st.csts = (st.csts & !0xC) | (0x2 << 2);
        } else if (old >> 14) & 0x3 != 0 {
            st.csts &= !0xC;
        }
        Outcome::status(sc::SUCCESS)
    }

    /// Admin commands (qid 0, controller connected).
    pub(crate) fn exec_admin(&mut self, slot: usize) -> Outcome {
        let Some(c) = self.ctrlr.clone() else {
            return Outcome::status(sc::CMD_SEQ_ERROR | DNR);
        };
        c.touch_keep_alive();
        if !c.is_ready() {
            return Outcome::status(sc::CMD_SEQ_ERROR | DNR);
        }
        let sqe = self.reqs[slot].sqe;
        let disc = c.subsys.is_discovery;
        match sqe.opc() {
            admin::IDENTIFY => self.identify(slot, &c),
            admin::GET_LOG_PAGE => self.get_log_page(slot, &c),
            admin::SET_FEATURES => self.set_features(slot, &c),
            admin::GET_FEATURES => self.get_features(slot, &c),
            admin::ASYNC_EVENT => self.async_event(slot, &c),
            admin::KEEP_ALIVE => Outcome::status(sc::SUCCESS),
            admin::ABORT if !disc => self.abort(slot, &c),
            _ => Outcome::status(sc::INVALID_OPCODE | DNR),
        }
    }

    /// Abort (CDW10: SQID 15:0, CID 31:16). DW0 bit 0 is 0 if the command was aborted, 1
    /// if not (unknown, or already executing in the bdev). A command on an I/O queue is
    /// looked up on that queue's reactor; the answer comes back by message.
    fn abort(&mut self, slot: usize, c: &Arc<Ctrlr>) -> Outcome {
        let cdw10 = self.reqs[slot].sqe.cdw(10);
        let sqid = (cdw10 & 0xFFFF) as u16;
        let cid = (cdw10 >> 16) as u16;
        if self.nr_aborts > ACL {
            return Outcome::status(SC_ABORT_LIMIT);
        }
        if sqid == 0 {
            let aborted = self.abort_local(cid, Some(slot));
            return Outcome::dw0(u32::from(!aborted));
        }
        let Some(target) = c.lock().io_qpairs.get(&sqid).cloned() else {
            return Outcome::dw0(1);
        };
        self.nr_aborts += 1;
        let admin_id = self.id;
        let admin_reactor = reactor::current();
        let rt = reactor::runtime_handle();
        let rt2 = rt.clone();
        rt.send_msg(target.reactor, move || {
            let aborted = crate::tcp::with_local_qpair(target.id, |q| q.abort_local(cid, None))
                .unwrap_or(false);
            trace!("abort sqid {sqid} cid {cid}: aborted {aborted}");
            rt2.send_msg(admin_reactor, move || {
                crate::tcp::with_local_qpair(admin_id, |q| {
                    q.nr_aborts = q.nr_aborts.saturating_sub(1);
                    q.complete(slot, sc::SUCCESS, u32::from(!aborted), 0, None);
                    q.flush_out();
                });
            });
        });
        Outcome::Pending
    }

    fn async_event(&mut self, slot: usize, c: &Arc<Ctrlr>) -> Outcome {
        if self.aers.len() > usize::from(AERL) {
            return Outcome::status(sc::AER_LIMIT | DNR);
        }
        self.aers.push(slot);
        if !c.lock().pending_aens.is_empty() {
            c.aen_flag.store(true, Ordering::Release);
        }
        Outcome::Pending
    }

    /// Completes parked AERs with pending events.
    pub(crate) fn deliver_aens(&mut self, c: &Arc<Ctrlr>) {
        loop {
            if self.aers.is_empty() {
                return;
            }
            let Some(dw0) = c.lock().pending_aens.pop_front() else {
                return;
            };
            let slot = self.aers.remove(0);
            self.complete(slot, sc::SUCCESS, dw0, 0, None);
        }
    }

    fn set_features(&mut self, slot: usize, c: &Arc<Ctrlr>) -> Outcome {
        let sqe = self.reqs[slot].sqe;
        let fid = sqe.cdw(10) & 0xFF;
        let v = sqe.cdw(11);
        let mut st = c.lock();
        match fid {
            0x07 if !c.subsys.is_discovery => {
                let (nsqr, ncqr) = (v & 0xFFFF, v >> 16);
                if nsqr == 0xFFFF || ncqr == 0xFFFF {
                    return Outcome::status(sc::INVALID_FIELD | DNR);
                }
                let max = self.opts.max_qpairs_per_ctrlr.saturating_sub(2);
                let n = nsqr.min(ncqr).min(max) as u16;
                st.nr_io_queues = n;
                Outcome::dw0(u32::from(n) | (u32::from(n) << 16))
            }
            0x0B => {
                st.aec = v;
                Outcome::status(sc::SUCCESS)
            }
            0x0F => {
                st.kato_ms = v;
                drop(st);
                c.touch_keep_alive();
                Outcome::status(sc::SUCCESS)
            }
            0x06 if !c.subsys.is_discovery => {
                st.vwc = v & 1 != 0;
                Outcome::status(sc::SUCCESS)
            }
            _ => Outcome::status(sc::INVALID_FIELD | DNR),
        }
    }

    fn get_features(&mut self, slot: usize, c: &Arc<Ctrlr>) -> Outcome {
        let sqe = self.reqs[slot].sqe;
        let fid = sqe.cdw(10) & 0xFF;
        let st = c.lock();
        match fid {
            0x07 if !c.subsys.is_discovery => {
                let n = u32::from(st.nr_io_queues);
                Outcome::dw0(n | (n << 16))
            }
            0x0B => Outcome::dw0(st.aec),
            0x0F => Outcome::dw0(st.kato_ms),
            0x06 if !c.subsys.is_discovery => Outcome::dw0(u32::from(st.vwc)),
            _ => Outcome::status(sc::INVALID_FIELD | DNR),
        }
    }

    fn identify(&mut self, slot: usize, c: &Arc<Ctrlr>) -> Outcome {
        let sqe = self.reqs[slot].sqe;
        if self.reqs[slot].xfer_len != 4096 {
            return Outcome::status(sc::SGL_LEN_INVALID | DNR);
        }
        let cns = sqe.cdw(10) & 0xFF;
        let nsid = sqe.nsid();
        if c.subsys.is_discovery && cns != 1 {
            return Outcome::status(sc::INVALID_FIELD | DNR);
        }
        match cns {
            0x01 => Outcome::data(self.identify_ctrlr(c)),
            0x00 => {
                if nsid == 0 || nsid == 0xFFFF_FFFF {
                    return Outcome::status(sc::INVALID_NS | DNR);
                }
                let page = c
                    .subsys
                    .namespace(nsid)
                    .map_or_else(|| vec![0; 4096], |ns| identify_ns(&ns));
                Outcome::data(page)
            }
            0x02 => {
                if nsid >= 0xFFFF_FFFE {
                    return Outcome::status(sc::INVALID_NS | DNR);
                }
                let mut page = vec![0u8; 4096];
                let st = c.subsys.lock();
                for (i, id) in st
                    .namespaces
                    .keys()
                    .filter(|&&n| n > nsid)
                    .take(1024)
                    .enumerate()
                {
                    page[i * 4..i * 4 + 4].copy_from_slice(&id.to_le_bytes());
                }
                Outcome::data(page)
            }
            0x03 => match c.subsys.namespace(nsid) {
                Some(ns) => Outcome::data(ns_descriptors(&ns)),
                None => Outcome::status(sc::INVALID_NS | DNR),
            },
            0x05 | 0x06 if sqe.byte(47) == 0 => Outcome::data(vec![0; 4096]),
            0x08 => match c.subsys.namespace(nsid) {
                Some(_) => {
                    let mut page = vec![0u8; 4096];
                    page[1] = 1; // NMIC: may be shared
                    page[14] = 1; // NSTAT: ready
                    Outcome::data(page)
                }
                None => Outcome::status(sc::INVALID_NS | DNR),
            },
            _ => Outcome::status(sc::INVALID_FIELD | DNR),
        }
    }

    fn identify_ctrlr(&self, c: &Arc<Ctrlr>) -> Vec<u8> {
        let mut p = vec![0u8; 4096];
        let st = c.subsys.lock();
        let disc = c.subsys.is_discovery;
        p[0..2].copy_from_slice(&0x4e58u16.to_le_bytes());
        p[2..4].copy_from_slice(&0x4e58u16.to_le_bytes());
        spec::put_str(&mut p[4..24], if disc { "" } else { &st.serial }, b' ');
        spec::put_str(
            &mut p[24..64],
            if disc {
                "thinbdev discovery"
            } else {
                &st.model
            },
            b' ',
        );
        spec::put_str(&mut p[64..72], env!("CARGO_PKG_VERSION"), b' ');
        p[72] = 6; // RAB
        p[76] = if disc { 0 } else { 0x02 }; // CMIC: multi-controller
        let mdts = (self.opts.max_io_size / 4096).max(1).ilog2() as u8;
        p[77] = if disc { 0 } else { mdts };
        p[78..80].copy_from_slice(&c.cntlid.to_le_bytes());
        p[80..84].copy_from_slice(&VS_1_3.to_le_bytes());
        let oaes: u32 = if disc { 1 << 31 } else { 1 << 8 };
        p[92..96].copy_from_slice(&oaes.to_le_bytes());
        p[96..100].copy_from_slice(&1u32.to_le_bytes()); // CTRATT: 128-bit host id
        p[111] = if disc { 2 } else { 1 }; // CNTRLTYPE
        p[258] = 3; // ACL
        p[259] = AERL;
        p[260] = 0x03; // FRMW
        p[261] = if disc { 0x04 } else { 0 }; // LPA
        p[262] = 0; // ELPE
        p[320..322].copy_from_slice(&KAS.to_le_bytes());
        p[512] = 0x66;
        p[513] = 0x44;
        let maxcmd = self.opts.max_queue_depth.min(0xFFFF) as u16;
        p[514..516].copy_from_slice(&maxcmd.to_le_bytes());
        let nn = st
            .max_namespaces
            .max(st.namespaces.keys().last().copied().unwrap_or(0));
        if !disc {
            p[516..520].copy_from_slice(&nn.to_le_bytes());
            p[520..522].copy_from_slice(&0x000Cu16.to_le_bytes()); // ONCS: DSM, WZ
            p[525] = 1; // VWC present
            p[540..544].copy_from_slice(&nn.to_le_bytes()); // MNAN
        }
        p[536..540].copy_from_slice(&0x0010_0001u32.to_le_bytes()); // SGLS
        let nqn = if disc {
            spec::DISCOVERY_NQN
        } else {
            &c.subsys.nqn
        };
        spec::put_str(&mut p[768..1024], nqn, 0);
        let ioccsz = (64 + self.opts.in_capsule_data_size) / 16;
        p[1792..1796].copy_from_slice(&ioccsz.to_le_bytes());
        p[1796..1800].copy_from_slice(&1u32.to_le_bytes()); // IORCSZ
        p[1803] = 1; // MSDBD
        p[1806] = if disc { 1 } else { 0 }; // DCTYPE
        p
    }

    fn get_log_page(&mut self, slot: usize, c: &Arc<Ctrlr>) -> Outcome {
        let r = &self.reqs[slot];
        let sqe = r.sqe;
        let lid = sqe.cdw(10) & 0xFF;
        let rae = sqe.cdw(10) & (1 << 15) != 0;
        let numd = ((sqe.cdw(11) & 0xFFFF) << 16 | sqe.cdw(10) >> 16) as u64 + 1;
        let len = numd * 4;
        let lpo = sqe.cdw12_13();
        if len != u64::from(r.xfer_len) {
            return Outcome::status(sc::SGL_LEN_INVALID | DNR);
        }
        if lpo & 3 != 0 {
            return Outcome::status(sc::INVALID_FIELD | DNR);
        }
        let disc = c.subsys.is_discovery;
        let image = match lid {
            0x70 if disc => {
                if !rae {
                    c.lock().masked_notices &= !Notice::DiscoveryLogChanged.mask_bit();
                }
                let hostnqn = c.hostnqn.clone();
                crate::discovery::log_page(&hostnqn, self.local)
            }
            0x01 if !disc => vec![0u8; 64],
            0x02 if !disc => smart_log(),
            0x03 if !disc => vec![0u8; 512],
            0x04 if !disc => {
                let mut st = c.lock();
                let mut page = vec![0u8; 4096];
                for (i, n) in st.changed_ns.iter().enumerate().take(1024) {
                    page[i * 4..i * 4 + 4].copy_from_slice(&n.to_le_bytes());
                }
                if !rae {
                    st.changed_ns.clear();
                    st.masked_notices &= !Notice::NsAttrChanged.mask_bit();
                }
                page
            }
            _ => return Outcome::status(sc::INVALID_FIELD | DNR),
        };
        if lpo > image.len() as u64 {
            return Outcome::status(sc::INVALID_FIELD | DNR);
        }
        let start = lpo as usize;
        let end = (start as u64 + len).min(image.len() as u64) as usize;
        let mut out = image[start..end].to_vec();
        out.resize(len as usize, 0);
        Outcome::data(out)
    }
}

/// SMART / Health log: zeros except a nominal temperature and spare.
fn smart_log() -> Vec<u8> {
    let mut p = vec![0u8; 512];
    p[1..3].copy_from_slice(&298u16.to_le_bytes()); // 25 °C in kelvin
    p[3] = 100; // available spare
    p[4] = 10; // threshold
    p
}

/// Identify Namespace (CNS 00h).
pub fn identify_ns(ns: &subsystem::Namespace) -> Vec<u8> {
    let mut p = vec![0u8; 4096];
    let nsze = ns.num_blocks();
    p[0..8].copy_from_slice(&nsze.to_le_bytes());
    p[8..16].copy_from_slice(&nsze.to_le_bytes());
    p[16..24].copy_from_slice(&nsze.to_le_bytes());
    p[30] = 1; // NMIC shared
    p[104..120].copy_from_slice(&ns.nguid);
    let lbads = ns.block_size().max(512).ilog2() as u8;
    p[128 + 2] = lbads;
    let boundary = ns.desc.bdev().optimal_io_boundary();
    if boundary > 0 && boundary <= 0xFFFF && boundary.is_power_of_two() {
        p[46..48].copy_from_slice(&(boundary as u16).to_le_bytes());
    }
    p
}

/// Namespace identification descriptors (CNS 03h): NGUID, UUID, CSI.
fn ns_descriptors(ns: &subsystem::Namespace) -> Vec<u8> {
    let mut p = vec![0u8; 4096];
    let mut off = 0;
    for (nidt, id) in [(2u8, &ns.nguid[..]), (3u8, &ns.uuid[..]), (4u8, &[0u8][..])] {
        p[off] = nidt;
        p[off + 1] = id.len() as u8;
        p[off + 4..off + 4 + id.len()].copy_from_slice(id);
        off += 4 + id.len();
    }
    p
}
