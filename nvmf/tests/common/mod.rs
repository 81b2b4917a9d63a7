//! Test harness: one in-process reactor runtime (2 reactors, interrupt mode) shared by the
//! tests of a binary, RPC calls straight into `nvmf::rpc_methods()`, and a small host-side
//! NVMe/TCP initiator over loopback TCP.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use nvmf::spec::Cqe;
use nvmf::tcp::pdu::{self, Ch};
use reactor::{CoreMask, Runtime, RuntimeHandle, RuntimeOptions};
use serde_json::{json, Value};

static RT: OnceLock<RuntimeHandle> = OnceLock::new();

/// Starts (once) the shared runtime and the TCP transport.
pub fn runtime() -> RuntimeHandle {
    RT.get_or_init(|| {
        let mut opts = RuntimeOptions::new(CoreMask::parse("0x3").expect("mask"));
        opts.interrupt_mode = true;
        opts.pin_threads = false;
        let rt = Runtime::start(opts, || {}).expect("start reactors");
        let h = rt.handle();
        std::mem::forget(rt);
        nvmf::set_runtime(h.clone());
        rpc(
            "nvmf_create_transport",
            json!({"trtype": "TCP", "max_io_size": 131072,
            "in_capsule_data_size": 8192}),
        )
        .expect("transport");
        h
    })
    .clone()
}

/// Calls an nvmf RPC.
pub fn rpc(method: &str, params: Value) -> Result<Value, nvmf::NvmfRpcError> {
    let (_, h) = nvmf::rpc_methods()
        .into_iter()
        .find(|(m, _)| *m == method)
        .unwrap_or_else(|| panic!("no method {method}"));
    let (tx, rx) = mpsc::channel();
    h(params, Box::new(move |r| tx.send(r).expect("send")));
    rx.recv_timeout(Duration::from_secs(10))
        .expect("rpc answered")
}

/// A free loopback port.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Creates malloc bdev `name` (4 KiB blocks) and a subsystem exporting it on a new port.
pub fn export(nqn: &str, bdev: &str, num_blocks: u64, allow_any: bool) -> u16 {
    runtime();
    bdev::malloc::create(bdev::malloc::MallocOpts {
        name: Some(bdev.to_owned()),
        num_blocks,
        block_size: 4096,
        uuid: None,
        optimal_io_boundary: 0,
    })
    .expect("malloc");
    rpc(
        "nvmf_create_subsystem",
        json!({"nqn": nqn, "serial_number": "SN123", "allow_any_host": allow_any}),
    )
    .expect("subsystem");
    rpc(
        "nvmf_subsystem_add_ns",
        json!({"nqn": nqn, "namespace": {"bdev_name": bdev}}),
    )
    .expect("ns");
    let port = free_port();
    rpc(
        "nvmf_subsystem_add_listener",
        json!({"nqn": nqn, "listen_address":
        {"trtype": "tcp", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    )
    .expect("listener");
    port
}

/// Status helpers (shifted-down form).
pub const DNR: u16 = 0x4000;

/// One received PDU.
#[derive(Debug)]
pub struct Pdu {
    pub ch: Ch,
    pub header: Vec<u8>,
    pub data: Vec<u8>,
}

/// Host-side initiator for one queue.
pub struct Host {
    pub s: TcpStream,
    pub hdgst: bool,
    pub ddgst: bool,
    pub maxh2c: u32,
    pub next_cid: u16,
    /// Split H2C data into PDUs of at most this many bytes.
    pub h2c_chunk: usize,
}

/// Builds an SQE.
pub fn sqe(opc: u8, nsid: u32) -> [u8; 64] {
    let mut s = [0u8; 64];
    s[0] = opc;
    s[1] = 0x40;
    s[4..8].copy_from_slice(&nsid.to_le_bytes());
    s
}

pub fn set_u32(s: &mut [u8; 64], off: usize, v: u32) {
    s[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn set_u64(s: &mut [u8; 64], off: usize, v: u64) {
    s[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// SGL: in-capsule (offset) or transport data block.
pub fn set_sgl(s: &mut [u8; 64], len: u32, in_capsule: bool) {
    set_u64(s, 24, 0);
    set_u32(s, 32, len);
    s[39] = if in_capsule { 0x01 } else { 0x5A };
}

impl Host {
    /// TCP connect + ICReq/ICResp.
    pub fn connect(port: u16, hdgst: bool, ddgst: bool) -> Host {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("tcp connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        let mut h = Host {
            s,
            hdgst,
            ddgst,
            maxh2c: 0,
            next_cid: 1,
            h2c_chunk: usize::MAX,
        };
        let mut ic = [0u8; 128];
        ic[0] = 0;
        ic[2] = 128;
        ic[4..8].copy_from_slice(&128u32.to_le_bytes());
        ic[11] = u8::from(hdgst) | (u8::from(ddgst) << 1);
        h.s.write_all(&ic).expect("icreq");
        let p = h.recv_raw().expect("icresp");
        assert_eq!(p.ch.ty, 1, "ICResp type");
        assert_eq!(p.ch.plen, 128);
        assert_eq!(p.header[11], ic[11], "digests echoed");
        assert_eq!(p.header[10], 0, "CPDA 0");
        h.maxh2c = u32::from_le_bytes(p.header[12..16].try_into().unwrap());
        assert!(h.maxh2c >= 4096 && h.maxh2c & 3 == 0);
        h
    }

    /// Reads one PDU without interpreting digests flags of IC PDUs. None on EOF.
    pub fn recv_raw(&mut self) -> Option<Pdu> {
        let mut chb = [0u8; 8];
        if self.s.read_exact(&mut chb).is_err() {
            return None;
        }
        let ch = Ch::parse(&chb).unwrap();
        assert!(ch.plen >= 8 && ch.plen < 16 << 20, "sane plen {}", ch.plen);
        let mut rest = vec![0u8; ch.plen as usize - 8];
        self.s.read_exact(&mut rest).ok()?;
        let mut all = chb.to_vec();
        all.extend_from_slice(&rest);
        let hlen = ch.hlen as usize;
        let header = all[..hlen].to_vec();
        let mut off = hlen;
        let typed = ch.ty != 1 && ch.ty != 3;
        if typed && self.hdgst {
            assert_ne!(ch.flags & pdu::FLAG_HDGST, 0, "HDGSTF set");
            let d = u32::from_le_bytes(all[off..off + 4].try_into().unwrap());
            assert_eq!(d, pdu::digest(&header), "header digest");
            off += 4;
        }
        let mut end = all.len();
        let mut data = Vec::new();
        if ch.ty == 3 {
            data = all[hlen..].to_vec();
        } else if off < end {
            if self.ddgst {
                assert_ne!(ch.flags & pdu::FLAG_DDGST, 0, "DDGSTF set");
                end -= 4;
                let d = u32::from_le_bytes(all[end..].try_into().unwrap());
                assert_eq!(d, pdu::digest(&all[off..end]), "data digest");
            }
            assert_eq!(ch.pdo as usize, off, "pdo");
            data = all[off..end].to_vec();
        }
        Some(Pdu { ch, header, data })
    }

    /// Sends raw bytes.
    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    /// Encodes a CapsuleCmd.
    pub fn capsule(&self, sqe: &[u8; 64], data: &[u8]) -> Vec<u8> {
        let hd = if self.hdgst { 4 } else { 0 };
        let dd = if self.ddgst && !data.is_empty() { 4 } else { 0 };
        let mut flags = 0;
        if self.hdgst {
            flags |= pdu::FLAG_HDGST;
        }
        if dd > 0 {
            flags |= pdu::FLAG_DDGST;
        }
        let plen = 72 + hd + data.len() + dd;
        let pdo = if data.is_empty() { 0 } else { 72 + hd };
        let mut v = vec![4, flags, 72, pdo as u8];
        v.extend_from_slice(&(plen as u32).to_le_bytes());
        v.extend_from_slice(sqe);
        if self.hdgst {
            let d = pdu::digest(&v[..72]);
            v.extend_from_slice(&d.to_le_bytes());
        }
        v.extend_from_slice(data);
        if dd > 0 {
            v.extend_from_slice(&pdu::digest(data).to_le_bytes());
        }
        v
    }

    /// Encodes an H2CData PDU.
    pub fn h2c(&self, cid: u16, ttag: u16, datao: u32, data: &[u8], last: bool) -> Vec<u8> {
        let hd = if self.hdgst { 4 } else { 0 };
        let dd = if self.ddgst { 4 } else { 0 };
        let mut flags = if last { pdu::FLAG_LAST_PDU } else { 0 };
        if self.hdgst {
            flags |= pdu::FLAG_HDGST;
        }
        if self.ddgst {
            flags |= pdu::FLAG_DDGST;
        }
        let plen = 24 + hd + data.len() + dd;
        let mut v = vec![6, flags, 24, (24 + hd) as u8];
        v.extend_from_slice(&(plen as u32).to_le_bytes());
        v.extend_from_slice(&cid.to_le_bytes());
        v.extend_from_slice(&ttag.to_le_bytes());
        v.extend_from_slice(&datao.to_le_bytes());
        v.extend_from_slice(&(data.len() as u32).to_le_bytes());
        v.extend_from_slice(&[0; 4]);
        if self.hdgst {
            let d = pdu::digest(&v[..24]);
            v.extend_from_slice(&d.to_le_bytes());
        }
        v.extend_from_slice(data);
        if self.ddgst {
            v.extend_from_slice(&pdu::digest(data).to_le_bytes());
        }
        v
    }

    /// Runs one command: in-capsule data if `in_capsule`, else R2T/H2CData for `out`;
    /// collects C2H data. Returns the completion and the data read.
    pub fn cmd(
        &mut self,
        mut sqe: [u8; 64],
        out: &[u8],
        in_capsule: bool,
        read_len: u32,
    ) -> (Cqe, Vec<u8>) {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1).max(1);
        sqe[2..4].copy_from_slice(&cid.to_le_bytes());
        let len = if out.is_empty() {
            read_len
        } else {
            out.len() as u32
        };
        set_sgl(&mut sqe, len, in_capsule && !out.is_empty());
        let pdu = self.capsule(&sqe, if in_capsule { out } else { &[] });
        self.send(&pdu);
        let mut data = Vec::new();
        loop {
            let p = self.recv_raw().expect("response PDU");
            match p.ch.ty {
                5 => {
                    let cqe = Cqe::decode(p.header[8..24].try_into().unwrap());
                    assert_eq!(cqe.cid, cid, "cid echoed");
                    return (cqe, data);
                }
                7 => {
                    assert!(out.is_empty(), "C2HData for a command that sent data");
                    let datao = u32::from_le_bytes(p.header[12..16].try_into().unwrap());
                    assert_eq!(datao as usize, data.len(), "C2H in order");
                    data.extend_from_slice(&p.data);
                    if p.ch.flags & pdu::FLAG_SUCCESS != 0 {
                        assert_ne!(p.ch.flags & pdu::FLAG_LAST_PDU, 0);
                        return (
                            Cqe {
                                cid,
                                ..Default::default()
                            },
                            data,
                        );
                    }
                }
                9 => {
                    let ttag = u16::from_le_bytes(p.header[10..12].try_into().unwrap());
                    let r2to = u32::from_le_bytes(p.header[12..16].try_into().unwrap()) as usize;
                    let r2tl = u32::from_le_bytes(p.header[16..20].try_into().unwrap()) as usize;
                    assert_eq!(r2to, 0);
                    assert_eq!(r2tl, out.len());
                    let chunk = self.h2c_chunk.min(self.maxh2c as usize);
                    let mut off = 0;
                    while off < r2tl {
                        let n = chunk.min(r2tl - off);
                        let pdu =
                            self.h2c(cid, ttag, off as u32, &out[off..off + n], off + n == r2tl);
                        self.send(&pdu);
                        off += n;
                    }
                }
                t => panic!("unexpected PDU type {t}: {p:?}"),
            }
        }
    }

    /// Fabrics Connect.
    #[allow(clippy::too_many_arguments)]
    pub fn fabrics_connect(
        &mut self,
        qid: u16,
        sqsize: u16,
        kato_ms: u32,
        cntlid: u16,
        subnqn: &str,
        hostnqn: &str,
        cattr: u8,
    ) -> Cqe {
        let mut s = sqe(0x7F, 0);
        s[4] = 0x01;
        s[42..44].copy_from_slice(&qid.to_le_bytes());
        s[44..46].copy_from_slice(&sqsize.to_le_bytes());
        s[46] = cattr;
        set_u32(&mut s, 48, kato_ms);
        let mut d = vec![0u8; 1024];
        d[0..16].copy_from_slice(&[7u8; 16]);
        d[16..18].copy_from_slice(&cntlid.to_le_bytes());
        d[256..256 + subnqn.len()].copy_from_slice(subnqn.as_bytes());
        d[512..512 + hostnqn.len()].copy_from_slice(hostnqn.as_bytes());
        self.cmd(s, &d, true, 0).0
    }

    /// Property Get.
    pub fn prop_get(&mut self, ofst: u32, size8: bool) -> u64 {
        let mut s = sqe(0x7F, 0);
        s[4] = 0x04;
        s[40] = u8::from(size8);
        set_u32(&mut s, 44, ofst);
        let (c, _) = self.cmd(s, &[], false, 0);
        assert_eq!(c.status, 0, "property get {ofst:#x}");
        u64::from(c.dw0) | (u64::from(c.dw1) << 32)
    }

    /// Property Set (4 bytes).
    pub fn prop_set(&mut self, ofst: u32, v: u32) -> Cqe {
        let mut s = sqe(0x7F, 0);
        s[4] = 0x00;
        set_u32(&mut s, 44, ofst);
        set_u32(&mut s, 48, v);
        self.cmd(s, &[], false, 0).0
    }

    /// Admin connect + CC.EN=1 + wait RDY; returns cntlid.
    pub fn admin_init(
        port: u16,
        subnqn: &str,
        hostnqn: &str,
        kato_ms: u32,
        dg: bool,
    ) -> (Host, u16) {
        let mut h = Host::connect(port, dg, dg);
        let c = h.fabrics_connect(0, 31, kato_ms, 0xFFFF, subnqn, hostnqn, 0);
        assert_eq!(c.status, 0, "admin connect status {:#x}", c.status);
        let cntlid = c.dw0 as u16;
        let cap = h.prop_get(0x00, true);
        assert_eq!((cap >> 48) & 0xF, 0, "MPSMIN 0");
        assert_ne!(cap & (1 << 37), 0, "CSS NVM");
        let c = h.prop_set(0x14, (6 << 16) | (4 << 20) | 1);
        assert_eq!(c.status, 0);
        assert_eq!(h.prop_get(0x1C, false) & 1, 1, "CSTS.RDY");
        (h, cntlid)
    }

    /// Identify.
    pub fn identify(&mut self, cns: u8, nsid: u32) -> (Cqe, Vec<u8>) {
        let mut s = sqe(0x06, nsid);
        set_u32(&mut s, 40, u32::from(cns));
        self.cmd(s, &[], false, 4096)
    }

    /// Set Features `fid` = `value` (no data); returns the completion.
    pub fn set_features(&mut self, fid: u8, value: u32) -> Cqe {
        let mut s = sqe(0x09, 0);
        set_u32(&mut s, 40, u32::from(fid));
        set_u32(&mut s, 44, value);
        self.cmd(s, &[], false, 0).0
    }

    /// Keep Alive; asserts success (and, through `cmd`, that the next response is its own:
    /// nothing else, such as an async event, was queued before it).
    pub fn keep_alive(&mut self) {
        assert_eq!(
            self.cmd(sqe(0x18, 0), &[], false, 0).0.status,
            0,
            "keep alive"
        );
    }

    /// Sends an Asynchronous Event Request with command id `cid` and leaves it parked.
    pub fn park_aer(&mut self, cid: u16) {
        let mut aer = sqe(0x0C, 0);
        aer[2..4].copy_from_slice(&cid.to_le_bytes());
        set_sgl(&mut aer, 0, false);
        let p = self.capsule(&aer, &[]);
        self.send(&p);
    }

    /// Reads the next PDU, which must be a CapsuleResp; returns its CQE.
    pub fn recv_cqe(&mut self) -> Cqe {
        let p = self.recv_raw().expect("CapsuleResp");
        assert_eq!(p.ch.ty, 5, "CapsuleResp expected: {p:?}");
        Cqe::decode(p.header[8..24].try_into().unwrap())
    }

    /// Get Log Page `lid`: `len` bytes (a multiple of 4) at offset `lpo`, RAE as given.
    pub fn get_log(&mut self, lid: u8, lpo: u64, len: u32, rae: bool) -> (Cqe, Vec<u8>) {
        let mut s = sqe(0x02, 0);
        let numd = len / 4 - 1;
        let cdw10 = u32::from(lid) | (u32::from(rae) << 15) | ((numd & 0xFFFF) << 16);
        set_u32(&mut s, 40, cdw10);
        set_u32(&mut s, 44, numd >> 16);
        set_u64(&mut s, 48, lpo);
        self.cmd(s, &[], false, len)
    }

    /// The discovery log as libnvme reads it: header, entries, header again, retried while
    /// GENCTR moves; the last read has RAE 0 (clearing the change notice). Returns
    /// (GENCTR, entries).
    pub fn discovery_log(&mut self) -> (u64, Vec<Vec<u8>>) {
        for _ in 0..20 {
            let (c, hdr) = self.get_log(0x70, 0, 1024, true);
            assert_eq!(c.status, 0, "discovery log header");
            let genctr = u64::from_le_bytes(hdr[0..8].try_into().unwrap());
            let numrec = u64::from_le_bytes(hdr[8..16].try_into().unwrap()) as usize;
            let mut entries = Vec::new();
            if numrec > 0 {
                let (c, e) = self.get_log(0x70, 1024, (numrec * 1024) as u32, true);
                assert_eq!(c.status, 0, "discovery log entries");
                entries = e.chunks(1024).map(<[u8]>::to_vec).collect();
            }
            let (c, hdr) = self.get_log(0x70, 0, 1024, false);
            assert_eq!(c.status, 0, "discovery log header");
            if u64::from_le_bytes(hdr[0..8].try_into().unwrap()) == genctr {
                return (genctr, entries);
            }
        }
        panic!("discovery log kept changing");
    }

    /// Abort (admin queue): command `cid` of queue `sqid`. Returns the completion.
    pub fn abort(&mut self, sqid: u16, cid: u16) -> Cqe {
        let mut s = sqe(0x08, 0);
        set_u32(&mut s, 40, u32::from(sqid) | (u32::from(cid) << 16));
        self.cmd(s, &[], false, 0).0
    }

    /// True once the peer closed the connection (EOF or reset) within 10 s; PDUs that
    /// arrive first are skipped.
    pub fn closed_by_target(&mut self) -> bool {
        self.s
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// The entries of a discovery log for subsystem `nqn` on port `port`.
pub fn disc_entries_for(entries: &[Vec<u8>], nqn: &str, port: u16) -> usize {
    entries
        .iter()
        .filter(|e| {
            e[0] == 3
                && e[2] == 2
                && e[256..].starts_with(nqn.as_bytes())
                && e[256 + nqn.len()] == 0
                && e[32..].starts_with(port.to_string().as_bytes())
        })
        .count()
}

/// Waits up to 10 s for `f` to hold.
pub fn wait_for(mut f: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "condition not reached in 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Adds a TCP listener on 127.0.0.1:`port` to `nqn` (or removes it).
pub fn listener(nqn: &str, port: u16, add: bool) -> Result<Value, nvmf::NvmfRpcError> {
    let method = if add {
        "nvmf_subsystem_add_listener"
    } else {
        "nvmf_subsystem_remove_listener"
    };
    rpc(
        method,
        json!({"nqn": nqn, "listen_address": {"trtype": "tcp", "adrfam": "IPv4",
            "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    )
}

/// Read/write SQE.
pub fn rw(opc: u8, nsid: u32, slba: u64, nlb: u32) -> [u8; 64] {
    let mut s = sqe(opc, nsid);
    set_u64(&mut s, 40, slba);
    set_u32(&mut s, 48, nlb - 1);
    s
}
