//! One NVMe/TCP connection (queue pair), owned by one reactor: the receive state machine
//! (ICReq, CapsuleCmd, H2CData), the per-command table, and the send path (CapsuleResp,
//! C2HData, R2T, C2HTermReq).
//!
//! The socket is non-blocking and polled by its reactor's poll group ([`super::group`]).
//! A qpair with nothing to do arms a one-shot io_uring `PollAdd` for readability (and
//! writability while output is queued): in interrupt mode at once, so socket readiness
//! wakes the reactor; in polling mode once it has been idle for
//! [`IDLE_POLLS_BEFORE_ARMING`] polls. A qpair idle that long is not read while its
//! readability poll is armed (nothing arrived since), so idle connections cost no `read`
//! per tick; a busy one is read on every poll, without waiting a tick for the poll's
//! completion to be reaped. Commands
//! complete out of order. The qpair lives until its socket is closed *and* no bdev I/O is
//! in flight (a bdev channel must outlive its I/O).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{ErrorKind as IoKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bdev::{BdevChannel, IoBuf, IoCallback, IoDone};
use reactor::{PollStatus, PollerHandle};
use slab::Slab;

use super::pdu::{self, C2hFlags, Fatal, HostPdu, RecvLimits};
use super::QpairShared;
use crate::ctrlr::Ctrlr;
use crate::spec::{self, sc, Cqe, Sqe, DNR};
use crate::subsystem::{ListenAddr, Namespace, TransportOpts, ADMIN_IN_CAPSULE};
use crate::trace;

/// Bytes read from the socket per `read` call.
const RECV_CHUNK: usize = 64 * 1024;
/// Most socket reads per poll (bounded work per tick).
const MAX_READS_PER_POLL: usize = 8;
/// Stop reading new commands while this much output is queued.
const MAX_QUEUED_OUTPUT: usize = 8 * 1024 * 1024;
/// Extra command slots beyond SQSIZE+1 (parked AERs on the admin queue).
const EXTRA_SLOTS: usize = 8;
/// Consecutive idle polls after which a qpair waits for readiness instead of reading.
const IDLE_POLLS_BEFORE_ARMING: u32 = 256;

/// Connection states (STYLE rule 16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QpairState {
    /// Connected; waiting for the host's ICReq.
    AwaitIcReq,
    /// ICResp sent; commands flow.
    Running,
    /// Fatal error, host disconnect, controller teardown or shutdown: read nothing more,
    /// flush queued output, wait for in-flight bdev I/O, then close.
    Closing,
    /// Socket closed; its poll group drops it.
    Closed,
}

/// Command states (STYLE rule 16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReqState {
    /// R2T sent; collecting H2CData.
    AwaitH2c,
    /// Submitted to the bdev (or parked, for AERs); completes by callback.
    Executing,
}

/// One outstanding command.
pub struct Req {
    /// The command.
    pub sqe: Sqe,
    /// Where it is.
    pub state: ReqState,
    /// Host-to-controller data (complete once `received == xfer_len`).
    pub data: Option<IoBuf>,
    /// SGL length: bytes to transfer.
    pub xfer_len: u32,
    /// H2C bytes received so far.
    pub received: u32,
    /// A data digest failed: finish the transfer, then fail the command.
    pub ddgst_failed: bool,
    /// Aborted while its data was still coming: finish the transfer, then complete it with
    /// Command Abort Requested instead of executing it.
    pub aborted: bool,
    /// Bdev operations still in flight.
    pub nr_pending: u32,
    /// First failing status of a multi-op command.
    pub status: u16,
    /// FUA write waiting for its flush.
    pub fua: bool,
    /// The bdev channel the I/O went to (kept alive until completion).
    pub ch: Option<BdevChannel>,
    /// Namespace (kept alive until completion).
    pub ns: Option<Arc<Namespace>>,
}

/// Result of executing a command synchronously.
pub enum Outcome {
    /// Complete now with status, DW0, DW1 and controller-to-host data.
    Done {
        /// Status (shifted-down form).
        status: u16,
        /// DW0.
        dw0: u32,
        /// DW1.
        dw1: u32,
        /// Data for the host.
        data: Option<Vec<u8>>,
    },
    /// Completes later (bdev callback, parked AER).
    Pending,
}

impl Outcome {
    /// Status only.
    pub fn status(status: u16) -> Outcome {
        Outcome::Done {
            status,
            dw0: 0,
            dw1: 0,
            data: None,
        }
    }
    /// Success with DW0.
    pub fn dw0(dw0: u32) -> Outcome {
        Outcome::Done {
            status: sc::SUCCESS,
            dw0,
            dw1: 0,
            data: None,
        }
    }
    /// Success with data.
    pub fn data(data: Vec<u8>) -> Outcome {
        Outcome::Done {
            status: sc::SUCCESS,
            dw0: 0,
            dw1: 0,
            data: Some(data),
        }
    }
}

/// The connection.
pub struct Qpair {
    /// Target-unique id (for traces and RPC listings).
    pub id: u64,
    pub(crate) sock: TcpStream,
    pub(crate) state: QpairState,
    pub(crate) lim: RecvLimits,
    rbuf: Vec<u8>,
    rstart: usize,
    wbuf: Vec<u8>,
    wpos: usize,
    /// Queue id (valid after Connect).
    pub qid: u16,
    /// SQSIZE (0's based) from Connect.
    pub sqsize: u16,
    sqhd: u16,
    /// Host disabled SQ flow control (Connect CATTR bit 2).
    pub sq_flow_disabled: bool,
    /// The controller, after Connect.
    pub ctrlr: Option<Arc<Ctrlr>>,
    pub(crate) reqs: Slab<Req>,
    ns_cache: HashMap<u32, (Arc<Namespace>, BdevChannel)>,
    ns_gen: u64,
    pub(crate) cb: Option<IoCallback>,
    weak: Weak<RefCell<Qpair>>,
    pub(crate) ka_poller: Option<PollerHandle>,
    /// Consecutive polls that found nothing to do.
    idle_polls: u32,
    armed_in: Rc<Cell<bool>>,
    armed_out: Rc<Cell<bool>>,
    /// Parked AER slots (admin queue).
    pub(crate) aers: Vec<usize>,
    /// Peer address.
    pub peer: SocketAddr,
    /// Local address.
    pub local: SocketAddr,
    /// Transport options at accept time.
    pub opts: TransportOpts,
    /// The listener the connection came in through.
    pub listen: ListenAddr,
    shared: Arc<QpairShared>,
    /// Abort commands of this (admin) queue waiting for another queue's answer.
    pub(crate) nr_aborts: u8,
    nr_bdev_inflight: usize,
}

impl Qpair {
    /// Creates the qpair for a socket accepted through listener `listen` on the current
    /// reactor and starts polling. A connection whose listener went away meanwhile is
    /// dropped.
    pub fn spawn(sock: TcpStream, opts: TransportOpts, listen: ListenAddr) {
        let (Ok(peer), Ok(local)) = (sock.peer_addr(), sock.local_addr()) else {
            return;
        };
        let bound = crate::subsystem::target()
            .listeners
            .iter()
            .any(|l| l.addr == listen);
        if !bound {
            trace!("connection from {peer}: listener {listen:?} is gone");
            return;
        }
        let (id, shared) = super::register_qpair(listen.clone());
        let lim = RecvLimits {
            ic_done: false,
            hdgst: false,
            ddgst: false,
            max_capsule_data: opts.in_capsule_data_size.max(ADMIN_IN_CAPSULE),
            max_h2c_data: opts.max_io_size,
        };
        let q = Rc::new(RefCell::new(Qpair {
            id,
            sock,
            state: QpairState::AwaitIcReq,
            lim,
            rbuf: Vec::with_capacity(RECV_CHUNK),
            rstart: 0,
            wbuf: Vec::new(),
            wpos: 0,
            qid: 0,
            sqsize: 0,
            sqhd: 0,
            sq_flow_disabled: false,
            ctrlr: None,
            reqs: Slab::new(),
            ns_cache: HashMap::new(),
            ns_gen: 0,
            cb: None,
            weak: Weak::new(),
            ka_poller: None,
            idle_polls: 0,
            armed_in: Rc::new(Cell::new(false)),
            armed_out: Rc::new(Cell::new(false)),
            aers: Vec::new(),
            peer,
            local,
            opts,
            listen,
            shared,
            nr_aborts: 0,
            nr_bdev_inflight: 0,
        }));
        super::register_local(id, &q);
        let weak = Rc::downgrade(&q);
        let cb_weak = weak.clone();
        let cb: IoCallback = Rc::new(move |done: IoDone| {
            if let Some(q) = cb_weak.upgrade() {
                q.borrow_mut().on_bdev_done(done);
            }
        });
        {
            let mut g = q.borrow_mut();
            g.weak = weak;
            g.cb = Some(cb);
        }
        super::group::add(q);
        trace!("qpair {id}: accepted from {peer} on {local}");
    }

    /// One poll: socket input, controller signals, output, interrupt-mode wake-ups.
    pub fn poll(&mut self) -> PollStatus {
        if self.state == QpairState::Closed {
            return PollStatus::Idle;
        }
        let mut busy = self.check_signals();
        // An armed readability poll means the socket had nothing to read since it was
        // armed (its completion clears the flag): a long-idle qpair skips the read.
        let dormant = self.armed_in.get() && self.idle_polls >= IDLE_POLLS_BEFORE_ARMING;
        if self.state != QpairState::Closing && self.wbuf.len() < MAX_QUEUED_OUTPUT && !dormant {
            busy |= self.recv();
        }
        busy |= self.flush_out();
        if self.state == QpairState::Closing {
            // Output that the socket did not take now (a host that stopped reading) is
            // dropped; a TermReq is small enough to always fit the socket buffer.
            if self.nr_bdev_inflight == 0 {
                self.close_now();
                return PollStatus::Idle;
            }
            return PollStatus::from_busy(busy);
        }
        if busy {
            self.idle_polls = 0;
        } else {
            self.idle_polls = self.idle_polls.saturating_add(1);
            if reactor::is_interrupt_mode() || self.idle_polls >= IDLE_POLLS_BEFORE_ARMING {
                self.arm_wakeups();
            }
        }
        PollStatus::from_busy(busy)
    }

    /// Controller teardown, target shutdown, namespace changes and AENs.
    fn check_signals(&mut self) -> bool {
        if super::is_shutdown() && self.state != QpairState::Closing {
            self.set_state(QpairState::Closing, "target shutdown");
            return true;
        }
        if self.shared.close.load(Ordering::Acquire) && self.state != QpairState::Closing {
            self.set_state(QpairState::Closing, "close requested");
            return true;
        }
        let Some(c) = self.ctrlr.clone() else {
            return false;
        };
        if c.is_dead() && self.state != QpairState::Closing {
            self.set_state(QpairState::Closing, "controller torn down");
            return true;
        }
        let gen = c.subsys.ns_gen.load(Ordering::Acquire);
        if gen != self.ns_gen {
            self.ns_gen = gen;
            self.ns_cache.clear();
        }
        if self.qid == 0 && c.aen_flag.swap(false, Ordering::AcqRel) {
            self.deliver_aens(&c);
            return true;
        }
        false
    }

    /// Traced state transition.
    pub(crate) fn set_state(&mut self, state: QpairState, why: &str) {
        trace!(
            "qpair {} qid {}: {:?} -> {:?} ({why})",
            self.id,
            self.qid,
            self.state,
            state
        );
        self.state = state;
    }

    /// Reads and processes what the socket has; true if anything happened.
    fn recv(&mut self) -> bool {
        let mut busy = false;
        for _ in 0..MAX_READS_PER_POLL {
            if self.rstart > 0 {
                self.rbuf.drain(..self.rstart);
                self.rstart = 0;
            }
            let old = self.rbuf.len();
            self.rbuf.resize(old + RECV_CHUNK, 0);
            let r = self.sock.read(&mut self.rbuf[old..]);
            match r {
                Ok(0) => {
                    self.rbuf.truncate(old);
                    self.set_state(QpairState::Closing, "host closed the connection");
                    return true;
                }
                Ok(n) => {
                    self.rbuf.truncate(old + n);
                    busy = true;
                    if let Err(f) = self.process_input() {
                        self.fatal(f);
                        return true;
                    }
                    if self.state == QpairState::Closing {
                        return true;
                    }
                    if n < RECV_CHUNK {
                        break;
                    }
                }
                Err(e) if e.kind() == IoKind::WouldBlock => {
                    self.rbuf.truncate(old);
                    break;
                }
                Err(e) if e.kind() == IoKind::Interrupted => self.rbuf.truncate(old),
                Err(e) => {
                    self.rbuf.truncate(old);
                    self.set_state(QpairState::Closing, &format!("recv: {e}"));
                    return true;
                }
            }
        }
        busy
    }

    /// Decodes and handles every complete PDU in the receive buffer.
    fn process_input(&mut self) -> Result<(), Fatal> {
        let rbuf = std::mem::take(&mut self.rbuf);
        let mut start = self.rstart;
        let result = loop {
            if self.state == QpairState::Closing {
                break Ok(());
            }
            let avail = &rbuf[start..];
            let Some(ch) = pdu::Ch::parse(avail) else {
                break Ok(());
            };
            let plen = match pdu::check_header(&ch, &self.lim) {
                Ok(p) => p,
                Err(f) => break Err((f, start)),
            };
            if avail.len() < plen {
                break Ok(());
            }
            let res = pdu::decode(&avail[..plen], &self.lim).and_then(|p| self.on_pdu(p));
            if let Err(f) = res {
                break Err((f, start));
            }
            start += plen;
        };
        self.rbuf = rbuf;
        self.rstart = start;
        result.map_err(|(f, at)| {
            // Keep the offending header for the TermReq copy.
            self.rstart = at;
            f
        })
    }

    /// Sends a C2HTermReq for `f` and starts closing.
    pub(crate) fn fatal(&mut self, f: Fatal) {
        let hdr_end = (self.rstart + 128).min(self.rbuf.len());
        let hdr = self.rbuf.get(self.rstart..hdr_end).unwrap_or(&[]).to_vec();
        let hlen = pdu::Ch::parse(&hdr).map_or(hdr.len(), |c| (c.hlen as usize).min(hdr.len()));
        pdu::push_term_req(&mut self.wbuf, f, &hdr[..hlen]);
        self.rbuf.clear();
        self.rstart = 0;
        self.set_state(
            QpairState::Closing,
            &format!("fatal: fes {} fei {}", f.fes, f.fei),
        );
    }

    fn on_pdu(&mut self, p: HostPdu<'_>) -> Result<(), Fatal> {
        match p {
            HostPdu::IcReq {
                pfv,
                hpda,
                dgst,
                maxr2t: _,
            } => {
                if pfv != 0 {
                    return Err(Fatal::field(8));
                }
                if hpda > 31 {
                    return Err(Fatal::field(10));
                }
                self.lim.ic_done = true;
                self.lim.hdgst = dgst & 1 != 0;
                self.lim.ddgst = dgst & 2 != 0;
                self.wbuf
                    .extend_from_slice(&pdu::ic_resp(dgst, self.opts.max_io_size));
                self.set_state(QpairState::Running, "ICReq");
                Ok(())
            }
            HostPdu::TermReq { fes } => {
                self.set_state(QpairState::Closing, &format!("H2CTermReq fes {fes}"));
                Ok(())
            }
            HostPdu::CapsuleCmd {
                sqe,
                data,
                ddgst_ok,
            } => self.on_capsule(sqe, data, ddgst_ok),
            HostPdu::H2CData {
                cccid,
                ttag,
                datao,
                last,
                data,
                ddgst_ok,
            } => self.on_h2c(cccid, ttag, datao, last, data, ddgst_ok),
        }
    }

    /// Largest in-capsule data this queue takes.
    fn in_capsule_limit(&self, sqe: &Sqe) -> u32 {
        if self.qid == 0 || sqe.opc() == spec::fabrics::OPCODE || self.ctrlr.is_none() {
            ADMIN_IN_CAPSULE.max(self.opts.in_capsule_data_size)
        } else {
            self.opts.in_capsule_data_size
        }
    }

    fn on_capsule(&mut self, sqe: Sqe, data: &[u8], ddgst_ok: bool) -> Result<(), Fatal> {
        if self.ctrlr.is_some() && !self.sq_flow_disabled {
            self.sqhd = (self.sqhd + 1) % (self.sqsize.max(1) + 1);
        }
        if data.len() as u32 > self.in_capsule_limit(&sqe) {
            return Err(Fatal::status(pdu::fes::LIMIT_EXCEEDED));
        }
        let max_slots = usize::from(self.sqsize.max(31)) + 1 + EXTRA_SLOTS;
        if self.reqs.len() >= max_slots {
            self.send_resp(sqe.cid(), sc::INTERNAL, 0, 0);
            return Ok(());
        }
        if !ddgst_ok {
            self.send_resp(sqe.cid(), sc::DATA_XFER_ERROR, 0, 0);
            return Ok(());
        }
        if let Err(status) = check_sqe_flags(&sqe) {
            self.send_resp(sqe.cid(), status, 0, 0);
            return Ok(());
        }
        let xfer_len = sqe.sgl_len();
        let (in_data, need_r2t) = match self.capsule_data(&sqe, data) {
            Ok(d) => d,
            Err(status) => {
                self.send_resp(sqe.cid(), status, 0, 0);
                return Ok(());
            }
        };
        let slot = self.reqs.insert(Req {
            sqe,
            state: ReqState::Executing,
            data: in_data,
            xfer_len,
            received: 0,
            ddgst_failed: false,
            aborted: false,
            nr_pending: 0,
            status: sc::SUCCESS,
            fua: false,
            ch: None,
            ns: None,
        });
        if need_r2t {
            // One R2T for the whole transfer (MAXR2T = 1); TTAG = slot + 1.
            let r = &mut self.reqs[slot];
            r.state = ReqState::AwaitH2c;
            r.data = Some(IoBuf::alloc(xfer_len as usize));
            let ttag =
                u16::try_from(slot + 1).map_err(|_| Fatal::status(pdu::fes::LIMIT_EXCEEDED))?;
            pdu::push_r2t(&mut self.wbuf, sqe.cid(), ttag, 0, xfer_len, self.lim.hdgst);
            return Ok(());
        }
        self.execute(slot);
        Ok(())
    }

    /// Checks SGL1 against the capsule: in-capsule data (returned), or a transport data
    /// block (`true` if the host's data must be solicited with an R2T).
    fn capsule_data(&self, sqe: &Sqe, data: &[u8]) -> Result<(Option<IoBuf>, bool), u16> {
        let xfer_len = sqe.sgl_len();
        match sqe.sgl_id() {
            spec::SGL_DATA_BLOCK_OFFSET => {
                if sqe.sgl_addr() != 0 || xfer_len as usize > data.len() {
                    return Err(sc::SGL_OFFSET_INVALID | DNR);
                }
                Ok((Some(IoBuf::from_slice(&data[..xfer_len as usize])), false))
            }
            spec::SGL_TRANSPORT_DATA_BLOCK => {
                if !data.is_empty() {
                    return Err(sc::SGL_OFFSET_INVALID | DNR);
                }
                if xfer_len > self.opts.max_io_size {
                    return Err(sc::SGL_LEN_INVALID | DNR);
                }
                Ok((None, sqe.is_h2c() && xfer_len > 0))
            }
            _ => Err(sc::SGL_TYPE_INVALID | DNR),
        }
    }

    fn on_h2c(
        &mut self,
        cccid: u16,
        ttag: u16,
        datao: u32,
        last: bool,
        data: &[u8],
        ddgst_ok: bool,
    ) -> Result<(), Fatal> {
        let slot = usize::from(ttag).wrapping_sub(1);
        let Some(r) = self.reqs.get_mut(slot) else {
            return Err(Fatal::field(10));
        };
        if r.state != ReqState::AwaitH2c || r.sqe.cid() != cccid {
            return Err(Fatal::field(10));
        }
        if datao != r.received {
            return Err(Fatal::status(pdu::fes::OUT_OF_RANGE));
        }
        let end = u64::from(datao) + data.len() as u64;
        if end > u64::from(r.xfer_len) {
            return Err(Fatal::status(pdu::fes::OUT_OF_RANGE));
        }
        if let Some(buf) = r.data.as_mut() {
            buf[datao as usize..end as usize].copy_from_slice(data);
        }
        r.received = end as u32;
        r.ddgst_failed |= !ddgst_ok;
        if r.received < r.xfer_len {
            if last {
                // LAST_PDU before all requested data arrived.
                return Err(Fatal::status(pdu::fes::SEQUENCE));
            }
            return Ok(());
        }
        r.state = ReqState::Executing;
        if r.ddgst_failed || r.aborted {
            let status = if r.ddgst_failed {
                sc::DATA_XFER_ERROR
            } else {
                sc::ABORT_REQ
            };
            let cid = r.sqe.cid();
            self.reqs.remove(slot);
            self.send_resp(cid, status, 0, 0);
            return Ok(());
        }
        self.execute(slot);
        Ok(())
    }

    /// Aborts command `cid` of this queue if it has not reached the bdev (other than the
    /// Abort itself, `except`): a parked AER completes now with Command Abort Requested; a
    /// command still receiving its data does when the transfer ends (the host is already
    /// sending it) and is never executed. True if aborted.
    pub(crate) fn abort_local(&mut self, cid: u16, except: Option<usize>) -> bool {
        let Some(slot) = self
            .reqs
            .iter()
            .find(|(i, r)| r.sqe.cid() == cid && Some(*i) != except)
            .map(|(i, _)| i)
        else {
            return false;
        };
        if let Some(i) = self.aers.iter().position(|&a| a == slot) {
            self.aers.remove(i);
            self.complete(slot, sc::ABORT_REQ, 0, 0, None);
            return true;
        }
        let r = &mut self.reqs[slot];
        if r.state == ReqState::AwaitH2c {
            r.aborted = true;
            return true;
        }
        false
    }

    /// Runs command `slot` (all its host data present).
    fn execute(&mut self, slot: usize) {
        let sqe = self.reqs[slot].sqe;
        let outcome = if sqe.opc() == spec::fabrics::OPCODE {
            self.exec_fabrics(slot)
        } else if self.ctrlr.is_none() {
            Outcome::status(sc::CMD_SEQ_ERROR | DNR)
        } else if self.qid == 0 {
            self.exec_admin(slot)
        } else {
            self.exec_io(slot)
        };
        if let Outcome::Done {
            status,
            dw0,
            dw1,
            data,
        } = outcome
        {
            self.complete(slot, status, dw0, dw1, data.as_deref());
        }
    }

    /// Completes command `slot`: data (if successful), then the response.
    pub(crate) fn complete(
        &mut self,
        slot: usize,
        status: u16,
        dw0: u32,
        dw1: u32,
        data: Option<&[u8]>,
    ) {
        if !self.reqs.contains(slot) {
            return;
        }
        let r = self.reqs.remove(slot);
        let cid = r.sqe.cid();
        let xfer = r.xfer_len as usize;
        if status == sc::SUCCESS && xfer > 0 && r.sqe.is_c2h() {
            let data = data.unwrap_or(&[]);
            let success = self.sq_flow_disabled && self.opts.c2h_success && dw0 == 0 && dw1 == 0;
            self.send_data(cid, data, xfer, success);
            if success {
                return;
            }
        }
        self.send_resp(cid, status, dw0, dw1);
    }

    /// Queues C2HData PDUs carrying exactly `xfer` bytes (zero-padded past `data`).
    fn send_data(&mut self, cid: u16, data: &[u8], xfer: usize, success: bool) {
        let chunk = (self.opts.max_io_size as usize).max(4096);
        let padded;
        let data = if data.len() >= xfer {
            &data[..xfer]
        } else {
            let mut v = data.to_vec();
            v.resize(xfer, 0);
            padded = v;
            &padded[..]
        };
        let mut off = 0;
        while off < xfer {
            let n = chunk.min(xfer - off);
            let last = off + n == xfer;
            let f = C2hFlags {
                last,
                success: last && success,
                hdgst: self.lim.hdgst,
                ddgst: self.lim.ddgst,
            };
            pdu::push_c2h_data(&mut self.wbuf, cid, off as u32, &data[off..off + n], f);
            off += n;
        }
    }

    /// Queues a CapsuleResp.
    pub(crate) fn send_resp(&mut self, cid: u16, status: u16, dw0: u32, dw1: u32) {
        let cqe = Cqe {
            dw0,
            dw1,
            sqhd: if self.sq_flow_disabled { 0 } else { self.sqhd },
            sqid: self.qid,
            cid,
            status,
        };
        pdu::push_capsule_resp(&mut self.wbuf, &cqe.encode(), self.lim.hdgst);
    }

    /// Writes queued output; true if bytes moved.
    pub(crate) fn flush_out(&mut self) -> bool {
        let mut moved = false;
        while self.wpos < self.wbuf.len() {
            match self.sock.write(&self.wbuf[self.wpos..]) {
                Ok(0) => {
                    self.wbuf.clear();
                    self.wpos = 0;
                    self.state = QpairState::Closing;
                    return true;
                }
                Ok(n) => {
                    self.wpos += n;
                    moved = true;
                }
                Err(e) if e.kind() == IoKind::WouldBlock => break,
                Err(e) if e.kind() == IoKind::Interrupted => {}
                Err(e) => {
                    trace!("qpair {}: send: {e}", self.id);
                    self.wbuf.clear();
                    self.wpos = 0;
                    self.state = QpairState::Closing;
                    return true;
                }
            }
        }
        if self.wpos >= self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        } else if self.wpos > 1024 * 1024 {
            self.wbuf.drain(..self.wpos);
            self.wpos = 0;
        }
        moved
    }

    /// Arms one-shot polls so socket readiness wakes the reactor (interrupt mode) and so
    /// an idle socket is not read until it has something.
    fn arm_wakeups(&mut self) {
        let fd = self.sock.as_raw_fd();
        let want_out = self.wpos < self.wbuf.len();
        // While output is backed up, input is not read: waking for it would spin.
        let want_in = self.wbuf.len() < MAX_QUEUED_OUTPUT;
        if want_in {
            reactor::arm_readiness(fd, (libc::POLLIN | libc::POLLRDHUP) as u32, &self.armed_in);
        }
        if want_out {
            reactor::arm_readiness(fd, libc::POLLOUT as u32, &self.armed_out);
        }
    }

    /// Closes the socket and stops polling; detaches from the controller.
    fn close_now(&mut self) {
        let _ = self.flush_out();
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        self.set_state(QpairState::Closed, "closed");
        if let Some(p) = self.ka_poller.take() {
            p.unregister();
        }
        self.ns_cache.clear();
        self.reqs.clear();
        self.aers.clear();
        if let Some(c) = self.ctrlr.take() {
            c.qpair_closed(self.qid, self.id);
        }
        super::unregister_qpair(self.id);
        // The poll group holds the last strong reference and drops it after this pass.
        // Pending PollAdd ops hold only Cell flags.
        self.cb = None;
    }

    /// The namespace `nsid` and this reactor's channel for it.
    pub(crate) fn ns_lookup(&mut self, nsid: u32) -> Option<(Arc<Namespace>, BdevChannel)> {
        if let Some((ns, ch)) = self.ns_cache.get(&nsid) {
            return Some((ns.clone(), ch.clone()));
        }
        let c = self.ctrlr.as_ref()?;
        let ns = c.subsys.namespace(nsid)?;
        let ch = ns.desc.get_io_channel().ok()?;
        self.ns_cache.insert(nsid, (ns.clone(), ch.clone()));
        Some((ns, ch))
    }

    /// Counts a bdev submission for `slot`.
    pub(crate) fn bdev_submitted(&mut self, slot: usize) {
        self.nr_bdev_inflight += 1;
        if let Some(r) = self.reqs.get_mut(slot) {
            r.nr_pending += 1;
        }
    }

    /// While other I/O of this qpair is still in the bdev, the response is only queued: the
    /// poll group polls every qpair each tick and `poll` sends what the tick's completions
    /// queued in one write (a write per completion was one `sendto` per I/O, a third of the
    /// QD128 throughput). The last one out sends at once, so a lone I/O (QD1) does not wait
    /// for the next tick.
    fn on_bdev_done(&mut self, done: IoDone) {
        self.nr_bdev_inflight = self.nr_bdev_inflight.saturating_sub(1);
        let slot = done.tag as usize;
        self.io_done(slot, done);
        if self.nr_bdev_inflight == 0 {
            let _ = self.flush_out();
        }
    }
}

/// PSDT must be 01b (SGL), FUSE 0.
fn check_sqe_flags(sqe: &Sqe) -> Result<(), u16> {
    if sqe.flags() & 0x03 != 0 || sqe.flags() & 0xC0 != 0x40 {
        return Err(sc::INVALID_FIELD | DNR);
    }
    Ok(())
}
