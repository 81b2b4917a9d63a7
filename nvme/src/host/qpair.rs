//! One NVMe/TCP host queue pair: a non-blocking TCP connection owned by one reactor.
//!
//! Connection setup is a state machine driven by [`Qpair::poll`] (STYLE rule 16): TCP
//! connect, ICReq/ICResp (digest and MAXH2CDATA negotiation), Fabrics Connect; then
//! commands flow. Each outstanding command has a slot whose index is its CID; the target's
//! PDUs are checked against that table (unknown CID, data out of range, an R2T for a read,
//! a bad digest...) and any violation is fatal for the connection: every outstanding command
//! then fails with `EIO` and the owner decides what happens next. Nothing here blocks, and
//! nothing trusts the peer: decoding never panics, lengths are bounded before buffering.
//!
//! Events (connected, failed, command done) are returned to the owner from `poll` rather
//! than called back, so the owner's callbacks never run while the qpair is borrowed.

use std::cell::Cell;
use std::io::{ErrorKind as IoKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use super::sock;
use super::{HostError, HostStats};
use crate::proto::pdu::{self, CtrlrPdu, Fatal, H2cFlags, HostRecvLimits};
use crate::proto::spec::{fabrics, Cqe, Sqe};

/// Bytes read from the socket per `read` call.
const RECV_CHUNK: usize = 64 * 1024;
/// Most socket reads per poll (bounded work per tick).
const MAX_READS_PER_POLL: usize = 8;
/// In-capsule data limit on the admin queue and for Fabrics commands (what Linux and SPDK
/// hosts assume every target accepts).
pub const ADMIN_IN_CAPSULE: u32 = 8192;
/// Connect data length.
const CONNECT_DATA_LEN: usize = 1024;

/// Connection parameters of one queue.
#[derive(Clone, Debug)]
pub struct QpairOpts {
    /// Target address.
    pub addr: SocketAddr,
    /// Queue id: 0 admin, 1.. I/O.
    pub qid: u16,
    /// Queue entries (Connect SQSIZE + 1), >= 2.
    pub nr_entries: u16,
    /// Ask for header digests.
    pub hdgst: bool,
    /// Ask for data digests.
    pub ddgst: bool,
    /// Keep-alive timeout for the admin Connect (ms; 0 on I/O queues).
    pub kato_ms: u32,
    /// Controller id: 0xFFFF on the admin Connect, the admin's answer on I/O queues.
    pub cntlid: u16,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
    /// Host identifier.
    pub hostid: [u8; 16],
    /// Whole setup (TCP, ICReq, Connect) must finish within this.
    pub connect_timeout: Duration,
    /// Largest read the owner issues (bounds C2HData PDUs).
    pub max_xfer: u32,
    /// The controller's counters.
    pub stats: Arc<HostStats>,
}

/// Connection states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QpairState {
    /// TCP connect in progress.
    TcpConnecting,
    /// ICReq sent; waiting for ICResp.
    AwaitIcResp,
    /// Fabrics Connect sent; waiting for its response.
    AwaitConnect,
    /// Commands flow.
    Ready,
    /// Closed after an error; every command has been failed.
    Failed,
}

/// Where a command's data lives.
pub enum CmdBuf {
    /// No data.
    None,
    /// Owned bytes: the data to write, or room for the data read.
    Owned(Vec<u8>),
    /// A region of a bdev I/O buffer that stays valid until the command is done.
    Raw {
        /// Start of the region.
        ptr: *mut u8,
        /// Length in bytes.
        len: usize,
    },
}

impl CmdBuf {
    fn len(&self) -> usize {
        match self {
            CmdBuf::None => 0,
            CmdBuf::Owned(v) => v.len(),
            CmdBuf::Raw { len, .. } => *len,
        }
    }

    fn slice(&self) -> &[u8] {
        match self {
            CmdBuf::None => &[],
            CmdBuf::Owned(v) => v,
            CmdBuf::Raw { len: 0, .. } => &[],
            // SAFETY: the owner guarantees the region is valid and not otherwise accessed
            // until the command completes (a bdev ModuleIo held until then).
            CmdBuf::Raw { ptr, len } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
        }
    }

    fn slice_mut(&mut self) -> &mut [u8] {
        match self {
            CmdBuf::None => &mut [],
            CmdBuf::Owned(v) => v,
            CmdBuf::Raw { len: 0, .. } => &mut [],
            // SAFETY: as in slice(); &mut self is the only access path while in flight.
            CmdBuf::Raw { ptr, len } => unsafe { std::slice::from_raw_parts_mut(*ptr, *len) },
        }
    }
}

/// Data direction of a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// No data.
    None,
    /// Controller to host (the buffer receives).
    Read,
    /// Host to controller (the buffer is sent).
    Write,
}

/// The owner's token for a command, handed back when it completes.
pub type Token = u64;

/// Token of the qpair's own Fabrics Connect.
const CONNECT_TOKEN: Token = u64::MAX;

/// Something the owner must act on, returned by [`Qpair::poll`].
pub enum Event {
    /// Fabrics Connect succeeded; `dw0` of its completion (the CNTLID on the admin queue).
    Connected {
        /// Completion DW0.
        dw0: u32,
    },
    /// The connection is gone (every outstanding command came back as `Done` first).
    Failed(HostError),
    /// A command finished: its completion, or a transport error.
    Done {
        /// The owner's token.
        token: Token,
        /// Completion, or why there is none.
        result: Result<Cqe, HostError>,
        /// The command's buffer (read data filled in).
        buf: CmdBuf,
    },
}

struct Cmd {
    token: Token,
    dir: Dir,
    buf: CmdBuf,
    /// C2H bytes received, or H2C bytes sent.
    xferred: usize,
    /// Data arrived with a bad data digest: fail the command when it completes.
    data_error: bool,
}

/// One queue pair.
pub struct Qpair {
    opts: QpairOpts,
    state: QpairState,
    sock: TcpStream,
    /// Receive buffer: bytes `rstart..rend` are received and not yet consumed. Allocated
    /// (and zeroed) once; grows only for a PDU larger than it.
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    wbuf: Vec<u8>,
    wpos: usize,
    lim: HostRecvLimits,
    cmds: Slab<Cmd>,
    /// Commands the target may have outstanding (SQSIZE + 1, minus nothing: Connect uses
    /// a slot only before Ready).
    depth: usize,
    max_h2c_data: u32,
    deadline: Instant,
    armed_in: Rc<Cell<bool>>,
    armed_out: Rc<Cell<bool>>,
    events: Vec<Event>,
}

impl std::fmt::Debug for Qpair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Qpair(qid={} {:?} {})",
            self.opts.qid, self.state, self.opts.addr
        )
    }
}

impl Qpair {
    /// Starts connecting (non-blocking). Errors: the socket could not be created.
    pub fn connect(opts: QpairOpts) -> Result<Qpair, HostError> {
        let sock = sock::connect_nonblocking(opts.addr)
            .map_err(|e| HostError::from_io(format!("connect to {}", opts.addr), e))?;
        let deadline = Instant::now() + opts.connect_timeout;
        // A timer at the deadline wakes an interrupt-mode reactor to notice it.
        if reactor::try_current().is_some() {
            let _ = reactor::after(opts.connect_timeout, || {});
        }
        let depth = opts.nr_entries.max(2) as usize;
        Ok(Qpair {
            lim: HostRecvLimits {
                ic_done: false,
                hdgst: false,
                ddgst: false,
                max_c2h_data: opts.max_xfer.max(4096),
            },
            opts,
            state: QpairState::TcpConnecting,
            sock,
            rbuf: vec![0; 2 * RECV_CHUNK],
            rstart: 0,
            rend: 0,
            wbuf: Vec::new(),
            wpos: 0,
            cmds: Slab::with_capacity(depth),
            depth,
            max_h2c_data: 0,
            deadline,
            armed_in: Rc::new(Cell::new(false)),
            armed_out: Rc::new(Cell::new(false)),
            events: Vec::new(),
        })
    }

    /// Current state.
    pub fn state(&self) -> QpairState {
        self.state
    }

    /// Queue id.
    pub fn qid(&self) -> u16 {
        self.opts.qid
    }

    /// Commands that can be submitted now.
    pub fn nr_free(&self) -> usize {
        if self.state != QpairState::Ready {
            return 0;
        }
        self.depth.saturating_sub(self.cmds.len())
    }

    /// Commands outstanding.
    pub fn nr_outstanding(&self) -> usize {
        self.cmds.len()
    }

    fn set_state(&mut self, state: QpairState, why: &str) {
        crate::trace!(
            "qpair {} qid {}: {:?} -> {:?} ({why})",
            self.opts.addr,
            self.opts.qid,
            self.state,
            state
        );
        self.state = state;
    }

    /// Submits a command. `sqe`'s CID is assigned here; data goes in-capsule when `dir` is
    /// Write and it fits `in_capsule_max`, else the target asks for it with R2T.
    /// Errors (the buffer comes back): not ready or no free slot.
    pub fn submit(
        &mut self,
        mut sqe: Sqe,
        dir: Dir,
        buf: CmdBuf,
        in_capsule_max: u32,
        token: Token,
    ) -> Result<(), (HostError, CmdBuf)> {
        if self.nr_free() == 0 {
            return Err((HostError::busy("no free command slot"), buf));
        }
        self.queue_cmd(&mut sqe, dir, buf, in_capsule_max, token);
        Ok(())
    }

    fn queue_cmd(&mut self, sqe: &mut Sqe, dir: Dir, buf: CmdBuf, icmax: u32, token: Token) {
        let len = buf.len();
        let entry = self.cmds.vacant_entry();
        let cid = entry.key() as u16;
        sqe.set_cid(cid);
        let in_capsule = dir == Dir::Write && len > 0 && len <= icmax as usize;
        sqe.set_sgl(len as u32, in_capsule);
        if dir == Dir::None {
            sqe.set_sgl(0, false);
        }
        let capsule_data: &[u8] = if in_capsule { buf.slice() } else { &[] };
        HostStats::inc(&self.opts.stats.nr_commands);
        if in_capsule {
            HostStats::inc(&self.opts.stats.nr_in_capsule);
        }
        pdu::push_capsule_cmd(
            &mut self.wbuf,
            &sqe.0,
            capsule_data,
            self.lim.hdgst,
            self.lim.ddgst,
        );
        entry.insert(Cmd {
            token,
            dir,
            xferred: if in_capsule { len } else { 0 },
            buf,
            data_error: false,
        });
    }

    /// One poll: connection setup, input, output. Returns events for the owner and whether
    /// anything happened.
    pub fn poll(&mut self, events: &mut Vec<Event>) -> bool {
        let mut busy = false;
        match self.state {
            QpairState::Failed => return false,
            QpairState::TcpConnecting => busy |= self.poll_tcp_connect(),
            _ => {}
        }
        if self.state != QpairState::Ready
            && self.state != QpairState::Failed
            && Instant::now() >= self.deadline
        {
            self.fail(HostError::new(
                libc::ETIMEDOUT,
                format!(
                    "connection to {} (qid {}) not established within {:?}",
                    self.opts.addr, self.opts.qid, self.opts.connect_timeout
                ),
            ));
        }
        if !matches!(self.state, QpairState::TcpConnecting | QpairState::Failed) {
            busy |= self.recv();
            busy |= self.flush_out();
        }
        if !busy && self.state != QpairState::Failed {
            self.arm_wakeups();
        }
        busy |= !self.events.is_empty();
        events.append(&mut self.events);
        busy
    }

    fn poll_tcp_connect(&mut self) -> bool {
        match sock::connect_result(&self.sock) {
            Ok(None) => false,
            Ok(Some(())) => {
                let dgst = u8::from(self.opts.hdgst) | (u8::from(self.opts.ddgst) << 1);
                self.wbuf.extend_from_slice(&pdu::ic_req(dgst));
                self.set_state(QpairState::AwaitIcResp, "TCP connected");
                true
            }
            Err(e) => {
                self.fail(HostError::from_io(
                    format!("connect to {}", self.opts.addr),
                    e,
                ));
                true
            }
        }
    }

    /// Closes the connection and fails every outstanding command with `err` (`EIO` for
    /// commands). Idempotent.
    pub fn fail(&mut self, err: HostError) {
        if self.state == QpairState::Failed {
            return;
        }
        self.set_state(QpairState::Failed, &err.to_string());
        HostStats::inc(&self.opts.stats.nr_connection_failures);
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        for (_, cmd) in std::mem::take(&mut self.cmds) {
            if cmd.token == CONNECT_TOKEN {
                continue;
            }
            self.events.push(Event::Done {
                token: cmd.token,
                result: Err(HostError::new(
                    libc::EIO,
                    format!("connection lost: {}", err.message()),
                )),
                buf: cmd.buf,
            });
        }
        self.wbuf.clear();
        self.wpos = 0;
        self.rstart = 0;
        self.rend = 0;
        self.events.push(Event::Failed(err));
    }

    fn fatal(&mut self, f: Fatal, what: &str) {
        // Tell the target why (best effort), then drop the connection.
        let hdr_end = (self.rstart + 128).min(self.rend);
        let hdr = self.rbuf.get(self.rstart..hdr_end).unwrap_or(&[]).to_vec();
        let mut term = Vec::new();
        pdu::push_h2c_term_req(&mut term, f, &hdr);
        let _ = self.sock.write(&term);
        HostStats::inc(&self.opts.stats.nr_protocol_errors);
        self.fail(HostError::new(
            libc::EPROTO,
            format!(
                "protocol error from {} (qid {}): {what} (FES {}, FEI {})",
                self.opts.addr, self.opts.qid, f.fes, f.fei
            ),
        ));
    }

    fn recv(&mut self) -> bool {
        let mut busy = false;
        for _ in 0..MAX_READS_PER_POLL {
            if self.state == QpairState::Failed {
                return true;
            }
            self.make_room();
            let r = self.sock.read(&mut self.rbuf[self.rend..]);
            match r {
                Ok(0) => {
                    self.fail(HostError::new(
                        libc::ECONNRESET,
                        format!(
                            "{} closed the connection (qid {})",
                            self.opts.addr, self.opts.qid
                        ),
                    ));
                    return true;
                }
                Ok(n) => {
                    self.rend += n;
                    busy = true;
                    if let Err((f, what)) = self.process_input() {
                        self.fatal(f, &what);
                        return true;
                    }
                    if self.rend < self.rbuf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == IoKind::WouldBlock => break,
                Err(e) if e.kind() == IoKind::Interrupted => {}
                Err(e) => {
                    self.fail(HostError::from_io(
                        format!("recv from {}", self.opts.addr),
                        e,
                    ));
                    return true;
                }
            }
        }
        busy
    }

    /// Ensures at least `RECV_CHUNK` free bytes after `rend`: moves unconsumed bytes to the
    /// front, grows the buffer only when a partial PDU fills it.
    fn make_room(&mut self) {
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        }
        if self.rbuf.len() - self.rend >= RECV_CHUNK {
            return;
        }
        self.rbuf.copy_within(self.rstart..self.rend, 0);
        self.rend -= self.rstart;
        self.rstart = 0;
        if self.rbuf.len() - self.rend < RECV_CHUNK {
            self.rbuf.resize(self.rend + RECV_CHUNK, 0);
        }
    }

    fn process_input(&mut self) -> Result<(), (Fatal, String)> {
        let rbuf = std::mem::take(&mut self.rbuf);
        let mut start = self.rstart;
        let result = loop {
            if self.state == QpairState::Failed {
                break Ok(());
            }
            let avail = rbuf.get(start..self.rend).unwrap_or(&[]);
            let Some(ch) = pdu::Ch::parse(avail) else {
                break Ok(());
            };
            let plen = match pdu::check_ctrlr_header(&ch, &self.lim) {
                Ok(p) => p,
                Err(f) => break Err((f, format!("bad PDU header {ch:?}"), start)),
            };
            let Some(bytes) = avail.get(..plen) else {
                break Ok(());
            };
            let res = match pdu::decode_ctrlr(bytes, &self.lim) {
                Ok(p) => self.on_pdu(p),
                Err(f) => Err((f, format!("undecodable PDU {ch:?}"))),
            };
            if let Err((f, what)) = res {
                break Err((f, what, start));
            }
            start += plen;
        };
        self.rbuf = rbuf;
        if self.state == QpairState::Failed {
            // fail() already dropped the input.
            return result.map_err(|(f, what, _)| (f, what));
        }
        self.rstart = start;
        result.map_err(|(f, what, at)| {
            self.rstart = at;
            (f, what)
        })
    }

    fn on_pdu(&mut self, p: CtrlrPdu<'_>) -> Result<(), (Fatal, String)> {
        match p {
            CtrlrPdu::IcResp {
                pfv,
                cpda,
                dgst,
                maxh2cdata,
            } => self.on_ic_resp(pfv, cpda, dgst, maxh2cdata),
            CtrlrPdu::TermReq { fes, fei } => {
                self.fail(HostError::new(
                    libc::ECONNRESET,
                    format!(
                        "{} terminated the connection (qid {}): FES {fes}, FEI {fei}",
                        self.opts.addr, self.opts.qid
                    ),
                ));
                Ok(())
            }
            CtrlrPdu::CapsuleResp { cqe } => self.on_capsule_resp(cqe),
            CtrlrPdu::C2HData {
                cccid,
                datao,
                last,
                success,
                data,
                ddgst_ok,
            } => self.on_c2h_data(cccid, datao, last, success, data, ddgst_ok),
            CtrlrPdu::R2T {
                cccid,
                ttag,
                r2to,
                r2tl,
            } => self.on_r2t(cccid, ttag, r2to, r2tl),
        }
    }

    fn on_ic_resp(&mut self, pfv: u16, cpda: u8, dgst: u8, maxh2c: u32) -> PduResult {
        let want = u8::from(self.opts.hdgst) | (u8::from(self.opts.ddgst) << 1);
        if self.state != QpairState::AwaitIcResp {
            return Err((
                Fatal::status(pdu::fes::SEQUENCE),
                "unexpected ICResp".into(),
            ));
        }
        if pfv != 0 || cpda != 0 {
            return Err((
                Fatal::field(8),
                format!("ICResp PFV {pfv} CPDA {cpda} unsupported"),
            ));
        }
        if dgst & 0x3 != want {
            return Err((
                Fatal::field(11),
                format!("ICResp digests {dgst:#x} differ from the requested {want:#x}"),
            ));
        }
        if maxh2c < 4096 || !maxh2c.is_multiple_of(4) {
            return Err((
                Fatal::field(12),
                format!("ICResp MAXH2CDATA {maxh2c} invalid"),
            ));
        }
        self.max_h2c_data = maxh2c;
        self.lim.ic_done = true;
        self.lim.hdgst = self.opts.hdgst;
        self.lim.ddgst = self.opts.ddgst;
        self.send_connect();
        self.set_state(QpairState::AwaitConnect, "ICResp received");
        Ok(())
    }

    fn send_connect(&mut self) {
        let mut sqe = Sqe::new(fabrics::OPCODE, 0);
        sqe.set_byte(4, fabrics::CONNECT);
        sqe.set_u16(40, 0); // RECFMT
        sqe.set_u16(42, self.opts.qid);
        sqe.set_u16(44, self.opts.nr_entries.saturating_sub(1));
        sqe.set_byte(46, 0);
        sqe.set_u32(48, self.opts.kato_ms);
        let mut data = vec![0u8; CONNECT_DATA_LEN];
        data[..16].copy_from_slice(&self.opts.hostid);
        data[16..18].copy_from_slice(&self.opts.cntlid.to_le_bytes());
        crate::proto::spec::put_str(&mut data[256..512], &self.opts.subnqn, 0);
        crate::proto::spec::put_str(&mut data[512..768], &self.opts.hostnqn, 0);
        self.queue_cmd(
            &mut sqe,
            Dir::Write,
            CmdBuf::Owned(data),
            ADMIN_IN_CAPSULE,
            CONNECT_TOKEN,
        );
    }

    fn cmd_mut(&mut self, cid: u16, what: &str) -> Result<&mut Cmd, (Fatal, String)> {
        self.cmds.get_mut(cid as usize).ok_or_else(|| {
            (
                Fatal::field(8),
                format!("{what} for unknown command id {cid}"),
            )
        })
    }

    fn on_capsule_resp(&mut self, cqe: Cqe) -> PduResult {
        let cmd = self.cmd_mut(cqe.cid, "CapsuleResp")?;
        let mut result = Ok(cqe);
        if cqe.is_success() {
            if cmd.dir == Dir::Read && cmd.xferred != cmd.buf.len() {
                let msg = format!(
                    "read completed with {} of {} bytes",
                    cmd.xferred,
                    cmd.buf.len()
                );
                return Err((Fatal::status(pdu::fes::OUT_OF_RANGE), msg));
            }
            if cmd.data_error {
                result = Err(HostError::new(libc::EIO, "data digest mismatch"));
            }
        }
        self.finish(cqe.cid, result);
        Ok(())
    }

    fn finish(&mut self, cid: u16, result: Result<Cqe, HostError>) {
        let Some(cmd) = self.cmds.try_remove(cid as usize) else {
            return;
        };
        if cmd.token == CONNECT_TOKEN {
            match result {
                Ok(cqe) if cqe.is_success() => {
                    self.set_state(QpairState::Ready, "Fabrics Connect succeeded");
                    self.events.push(Event::Connected { dw0: cqe.dw0 });
                }
                Ok(cqe) => self.fail(HostError::new(
                    connect_rejection_errno(self.opts.qid, &cqe),
                    format!(
                        "Fabrics Connect (qid {}) to {} rejected: status {:#x} (SCT {} SC {:#x}), dw0 {:#x}",
                        self.opts.qid,
                        self.opts.subnqn,
                        cqe.status,
                        cqe.sct(),
                        cqe.sc(),
                        cqe.dw0
                    ),
                )),
                Err(e) => self.fail(e),
            }
            return;
        }
        self.events.push(Event::Done {
            token: cmd.token,
            result,
            buf: cmd.buf,
        });
    }

    fn on_c2h_data(
        &mut self,
        cid: u16,
        datao: u32,
        last: bool,
        success: bool,
        data: &[u8],
        ddgst_ok: bool,
    ) -> PduResult {
        HostStats::inc(&self.opts.stats.nr_c2h_data);
        let cmd = self.cmd_mut(cid, "C2HData")?;
        if cmd.dir != Dir::Read {
            return Err((
                Fatal::field(8),
                format!("C2HData for command {cid}, not a read"),
            ));
        }
        let off = datao as usize;
        let end = off + data.len();
        if off != cmd.xferred || end > cmd.buf.len() {
            let msg = format!(
                "C2HData [{off}, {end}) for command {cid} out of order or beyond its {} bytes",
                cmd.buf.len()
            );
            return Err((Fatal::status(pdu::fes::OUT_OF_RANGE), msg));
        }
        if let Some(dst) = cmd.buf.slice_mut().get_mut(off..end) {
            dst.copy_from_slice(data);
        }
        cmd.xferred = end;
        if !ddgst_ok {
            cmd.data_error = true;
        }
        if success {
            if !last || cmd.xferred != cmd.buf.len() {
                return Err((Fatal::field(1), "SUCCESS flag before all data".into()));
            }
            let result = if cmd.data_error {
                Err(HostError::new(libc::EIO, "data digest mismatch"))
            } else {
                Ok(Cqe {
                    cid,
                    ..Cqe::default()
                })
            };
            self.finish(cid, result);
        }
        Ok(())
    }

    fn on_r2t(&mut self, cid: u16, ttag: u16, r2to: u32, r2tl: u32) -> PduResult {
        HostStats::inc(&self.opts.stats.nr_r2t);
        let stats = self.opts.stats.clone();
        let maxh2c = self.max_h2c_data as usize;
        let (hdgst, ddgst) = (self.lim.hdgst, self.lim.ddgst);
        let cmd = self
            .cmds
            .get_mut(cid as usize)
            .ok_or_else(|| (Fatal::field(8), format!("R2T for unknown command id {cid}")))?;
        let total = cmd.buf.len();
        let (off, len) = (r2to as usize, r2tl as usize);
        if cmd.dir != Dir::Write || len == 0 || off != cmd.xferred || off + len > total {
            let msg = format!(
                "unexpected R2T [{off}, +{len}) for command {cid} ({:?}, {} of {total} sent)",
                cmd.dir, cmd.xferred
            );
            return Err((Fatal::status(pdu::fes::OUT_OF_RANGE), msg));
        }
        let data = cmd.buf.slice();
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(maxh2c);
            let f = H2cFlags {
                last: pos + n == off + len,
                hdgst,
                ddgst,
            };
            let chunk = data.get(pos..pos + n).unwrap_or(&[]);
            pdu::push_h2c_data(&mut self.wbuf, cid, ttag, pos as u32, chunk, f);
            HostStats::inc(&stats.nr_h2c_data);
            pos += n;
        }
        cmd.xferred = off + len;
        Ok(())
    }

    fn flush_out(&mut self) -> bool {
        let mut moved = false;
        while self.wpos < self.wbuf.len() {
            match self.sock.write(&self.wbuf[self.wpos..]) {
                Ok(0) => break,
                Ok(n) => {
                    self.wpos += n;
                    moved = true;
                }
                Err(e) if e.kind() == IoKind::WouldBlock => break,
                Err(e) if e.kind() == IoKind::Interrupted => {}
                Err(e) => {
                    self.fail(HostError::from_io(format!("send to {}", self.opts.addr), e));
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

    /// Sends what is queued now (after submissions outside `poll`).
    pub fn kick(&mut self) {
        if matches!(self.state, QpairState::Ready | QpairState::AwaitConnect) {
            self.flush_out();
        }
    }

    /// Interrupt mode: arm one-shot polls so socket readiness wakes the reactor.
    fn arm_wakeups(&mut self) {
        if reactor::try_current().is_none() || !reactor::is_interrupt_mode() {
            return;
        }
        let fd = self.sock.as_raw_fd();
        let want_out = self.state == QpairState::TcpConnecting || self.wpos < self.wbuf.len();
        let want_in = self.state != QpairState::TcpConnecting;
        if want_in {
            reactor::arm_readiness(fd, (libc::POLLIN | libc::POLLRDHUP) as u32, &self.armed_in);
        }
        if want_out {
            reactor::arm_readiness(fd, libc::POLLOUT as u32, &self.armed_out);
        }
    }
}

impl Drop for Qpair {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

type PduResult = Result<(), (Fatal, String)>;

#[cfg(test)]
mod tests;

/// The errno for a refused Fabrics Connect. `EAGAIN` marks a refusal that goes away by itself
/// for an I/O queue: Command Sequence Error (the target still holds a queue of that id: Linux
/// nvmet tears a closed queue down asynchronously, so a queue reopened at once is refused) and
/// Connect Controller Busy. Otherwise `EPERM` if the target said not to retry, else
/// `ECONNREFUSED`.
fn connect_rejection_errno(qid: u16, cqe: &Cqe) -> i32 {
    const SC_COMMAND_SEQUENCE_ERROR: u16 = 0x0c;
    const SCT_COMMAND_SPECIFIC: u16 = 1;
    const SC_CONNECT_CTRL_BUSY: u16 = 0x82;
    let transient = (cqe.sct() == 0 && cqe.sc() == SC_COMMAND_SEQUENCE_ERROR)
        || (cqe.sct() == SCT_COMMAND_SPECIFIC && cqe.sc() == SC_CONNECT_CTRL_BUSY);
    if qid != 0 && transient {
        libc::EAGAIN
    } else if cqe.dnr() {
        libc::EPERM
    } else {
        libc::ECONNREFUSED
    }
}
