//! NVMe/TCP PDU codec for both ends. Target side: validation and decoding of
//! host-to-controller PDUs ([`check_header`], [`decode`]), encoding of controller-to-host
//! PDUs. Host side: encoding of ICReq, CapsuleCmd and H2CData, validation and decoding of
//! controller-to-host PDUs ([`check_ctrlr_header`], [`decode_ctrlr`]).
//!
//! Common header (8 bytes): `type u8 @0`, `flags u8 @1`, `hlen u8 @2`, `pdo u8 @3`,
//! `plen u32 @4`. A PDU is `hlen` header bytes, an optional 4-byte header digest, data
//! starting at `pdo`, and an optional 4-byte data digest at the end. Decoding never panics:
//! every inconsistency is a [`Fatal`] carrying the FES/FEI for a C2HTermReq.

use super::spec::{Cqe, Sqe};

/// PDU types.
pub mod ty {
    /// Initialize Connection Request.
    pub const IC_REQ: u8 = 0x00;
    /// Initialize Connection Response.
    pub const IC_RESP: u8 = 0x01;
    /// Host to controller termination request.
    pub const H2C_TERM_REQ: u8 = 0x02;
    /// Controller to host termination request.
    pub const C2H_TERM_REQ: u8 = 0x03;
    /// Command capsule.
    pub const CAPSULE_CMD: u8 = 0x04;
    /// Response capsule.
    pub const CAPSULE_RESP: u8 = 0x05;
    /// Host to controller data.
    pub const H2C_DATA: u8 = 0x06;
    /// Controller to host data.
    pub const C2H_DATA: u8 = 0x07;
    /// Ready to transfer.
    pub const R2T: u8 = 0x09;
}

/// Header digest present.
pub const FLAG_HDGST: u8 = 0x01;
/// Data digest present.
pub const FLAG_DDGST: u8 = 0x02;
/// Last data PDU of a transfer.
pub const FLAG_LAST_PDU: u8 = 0x04;
/// C2HData also completes the command successfully.
pub const FLAG_SUCCESS: u8 = 0x08;

/// Common header length.
pub const CH_LEN: usize = 8;
/// ICReq/ICResp length.
pub const IC_LEN: usize = 128;
/// CapsuleCmd header length (CH + SQE).
pub const CAPSULE_CMD_HLEN: usize = 72;
/// Header length of every other PDU.
pub const SHORT_HLEN: usize = 24;
/// Digest length.
pub const DIGEST_LEN: usize = 4;

/// Fatal error status (FES) values of a termination request.
pub mod fes {
    /// Invalid PDU header field.
    pub const INVALID_HEADER: u16 = 1;
    /// PDU sequence error.
    pub const SEQUENCE: u16 = 2;
    /// Header digest error.
    pub const HDGST: u16 = 3;
    /// Data transfer out of range.
    pub const OUT_OF_RANGE: u16 = 4;
    /// Data transfer limit exceeded.
    pub const LIMIT_EXCEEDED: u16 = 5;
    /// Unsupported parameter.
    pub const UNSUPPORTED: u16 = 6;
}

/// A connection-fatal protocol error: answer with a C2HTermReq, then close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fatal {
    /// Fatal error status.
    pub fes: u16,
    /// Fatal error information (offending byte offset for FES 1/6).
    pub fei: u32,
}

impl Fatal {
    /// An invalid header field at byte `fei`.
    pub fn field(fei: u32) -> Fatal {
        Fatal {
            fes: fes::INVALID_HEADER,
            fei,
        }
    }
    /// A status without a field offset.
    pub fn status(fes: u16) -> Fatal {
        Fatal { fes, fei: 0 }
    }
}

/// CRC32C as NVMe/TCP digests use it.
pub fn digest(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Parsed common header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ch {
    /// PDU type.
    pub ty: u8,
    /// Flags.
    pub flags: u8,
    /// Header length.
    pub hlen: u8,
    /// Data offset.
    pub pdo: u8,
    /// Total length.
    pub plen: u32,
}

impl Ch {
    /// Parses the first 8 bytes (`None` if shorter).
    pub fn parse(b: &[u8]) -> Option<Ch> {
        let h = b.get(..CH_LEN)?;
        Some(Ch {
            ty: h[0],
            flags: h[1],
            hlen: h[2],
            pdo: h[3],
            plen: u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
        })
    }

    fn encode(&self) -> [u8; CH_LEN] {
        let p = self.plen.to_le_bytes();
        [
            self.ty, self.flags, self.hlen, self.pdo, p[0], p[1], p[2], p[3],
        ]
    }
}

/// What the receiver accepts at this point of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvLimits {
    /// ICReq/ICResp exchange done.
    pub ic_done: bool,
    /// Header digest negotiated.
    pub hdgst: bool,
    /// Data digest negotiated.
    pub ddgst: bool,
    /// Largest in-capsule data accepted.
    pub max_capsule_data: u32,
    /// Largest H2CData payload (MAXH2CDATA).
    pub max_h2c_data: u32,
}

/// A decoded host PDU borrowing its data from the receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum HostPdu<'a> {
    /// ICReq.
    IcReq {
        /// PDU format version.
        pfv: u16,
        /// Host PDU data alignment.
        hpda: u8,
        /// Digest bits requested (bit0 header, bit1 data).
        dgst: u8,
        /// Max outstanding R2Ts (0's based).
        maxr2t: u32,
    },
    /// H2CTermReq.
    TermReq {
        /// Fatal error status.
        fes: u16,
    },
    /// CapsuleCmd with its in-capsule data.
    CapsuleCmd {
        /// The command.
        sqe: Sqe,
        /// In-capsule data (may be empty).
        data: &'a [u8],
        /// False if the data digest did not match.
        ddgst_ok: bool,
    },
    /// H2CData.
    H2CData {
        /// Command id.
        cccid: u16,
        /// Transfer tag from the R2T.
        ttag: u16,
        /// Offset of this data in the command's data.
        datao: u32,
        /// LAST_PDU flag.
        last: bool,
        /// The data (`DATAL` bytes).
        data: &'a [u8],
        /// False if the data digest did not match.
        ddgst_ok: bool,
    },
}

/// Validates a common header as soon as its 8 bytes arrived, before buffering the rest:
/// type allowed now, header length, digest flags, data offset and total length.
/// Returns the PDU's total length.
pub fn check_header(ch: &Ch, lim: &RecvLimits) -> Result<usize, Fatal> {
    let (hlen, max_data) = match ch.ty {
        ty::IC_REQ if !lim.ic_done => (IC_LEN, 0),
        ty::H2C_TERM_REQ if lim.ic_done => {
            // plen 24..152, no digests.
            if ch.hlen as usize != SHORT_HLEN || !(24..=152).contains(&ch.plen) {
                return Err(Fatal::field(2));
            }
            return Ok(ch.plen as usize);
        }
        ty::CAPSULE_CMD if lim.ic_done => (CAPSULE_CMD_HLEN, lim.max_capsule_data),
        ty::H2C_DATA if lim.ic_done => (SHORT_HLEN, lim.max_h2c_data),
        ty::IC_REQ => return Err(Fatal::status(fes::SEQUENCE)),
        _ if !lim.ic_done => return Err(Fatal::status(fes::SEQUENCE)),
        _ => return Err(Fatal::field(0)),
    };
    if ch.hlen as usize != hlen {
        return Err(Fatal::field(2));
    }
    if ch.ty == ty::IC_REQ {
        if ch.plen as usize != IC_LEN {
            return Err(Fatal::field(4));
        }
        return Ok(IC_LEN);
    }
    let has_hd = ch.flags & FLAG_HDGST != 0;
    if has_hd != lim.hdgst {
        return Err(Fatal::field(1));
    }
    let hd = if lim.hdgst { DIGEST_LEN } else { 0 };
    let plen = ch.plen as usize;
    if plen < hlen + hd {
        return Err(Fatal::field(4));
    }
    if plen == hlen + hd {
        // No data: PDO must be 0 (or pointing at the end), no data digest.
        if ch.flags & FLAG_DDGST != 0 {
            return Err(Fatal::field(1));
        }
        if ch.ty == ty::H2C_DATA {
            return Err(Fatal::status(fes::OUT_OF_RANGE));
        }
        return Ok(plen);
    }
    if ch.pdo as usize != hlen + hd {
        return Err(Fatal::field(3));
    }
    let has_dd = ch.flags & FLAG_DDGST != 0;
    if has_dd != lim.ddgst {
        return Err(Fatal::field(1));
    }
    let dd = if lim.ddgst { DIGEST_LEN } else { 0 };
    if plen < hlen + hd + dd + 1 {
        return Err(Fatal::field(4));
    }
    let data_len = plen - hlen - hd - dd;
    if data_len > max_data as usize {
        return Err(Fatal::status(fes::LIMIT_EXCEEDED));
    }
    Ok(plen)
}

/// Decodes one complete PDU (`pdu.len()` is its `plen`), checking digests.
pub fn decode<'a>(pdu: &'a [u8], lim: &RecvLimits) -> Result<HostPdu<'a>, Fatal> {
    let ch = Ch::parse(pdu).ok_or(Fatal::field(4))?;
    let plen = check_header(&ch, lim)?;
    if plen != pdu.len() {
        return Err(Fatal::field(4));
    }
    let hlen = ch.hlen as usize;
    let header = pdu.get(..hlen).ok_or(Fatal::field(4))?;
    match ch.ty {
        ty::IC_REQ => {
            return Ok(HostPdu::IcReq {
                pfv: u16::from_le_bytes([header[8], header[9]]),
                hpda: header[10],
                dgst: header[11],
                maxr2t: u32::from_le_bytes([header[12], header[13], header[14], header[15]]),
            })
        }
        ty::H2C_TERM_REQ => {
            return Ok(HostPdu::TermReq {
                fes: u16::from_le_bytes([header[8], header[9]]),
            })
        }
        _ => {}
    }
    let mut off = hlen;
    if lim.hdgst {
        let got = pdu.get(off..off + DIGEST_LEN).ok_or(Fatal::field(4))?;
        if u32::from_le_bytes([got[0], got[1], got[2], got[3]]) != digest(header) {
            return Err(Fatal::status(fes::HDGST));
        }
        off += DIGEST_LEN;
    }
    let (data, ddgst_ok) = if off < pdu.len() {
        let end = if lim.ddgst {
            pdu.len() - DIGEST_LEN
        } else {
            pdu.len()
        };
        let data = pdu.get(off..end).ok_or(Fatal::field(4))?;
        let ok = if lim.ddgst {
            let d = &pdu[end..];
            u32::from_le_bytes([d[0], d[1], d[2], d[3]]) == digest(data)
        } else {
            true
        };
        (data, ok)
    } else {
        (&pdu[pdu.len()..], true)
    };
    if ch.ty == ty::CAPSULE_CMD {
        let mut sqe = [0u8; 64];
        sqe.copy_from_slice(&header[8..72]);
        return Ok(HostPdu::CapsuleCmd {
            sqe: Sqe(sqe),
            data,
            ddgst_ok,
        });
    }
    let datal = u32::from_le_bytes([header[16], header[17], header[18], header[19]]);
    if datal as usize != data.len() {
        return Err(Fatal::field(16));
    }
    Ok(HostPdu::H2CData {
        cccid: u16::from_le_bytes([header[8], header[9]]),
        ttag: u16::from_le_bytes([header[10], header[11]]),
        datao: u32::from_le_bytes([header[12], header[13], header[14], header[15]]),
        last: ch.flags & FLAG_LAST_PDU != 0,
        data,
        ddgst_ok,
    })
}

/// Encodes an ICResp echoing the host's digest request.
pub fn ic_resp(dgst: u8, maxh2cdata: u32) -> [u8; IC_LEN] {
    let mut b = [0u8; IC_LEN];
    let ch = Ch {
        ty: ty::IC_RESP,
        flags: 0,
        hlen: IC_LEN as u8,
        pdo: 0,
        plen: IC_LEN as u32,
    };
    b[..CH_LEN].copy_from_slice(&ch.encode());
    b[11] = dgst & 0x3;
    b[12..16].copy_from_slice(&maxh2cdata.to_le_bytes());
    b
}

/// Appends a 24-byte-header PDU with no data (CapsuleResp, R2T) to `out`.
fn push_short(out: &mut Vec<u8>, ty: u8, body: &[u8; 16], hdgst: bool) {
    let hd = if hdgst { DIGEST_LEN } else { 0 };
    let ch = Ch {
        ty,
        flags: if hdgst { FLAG_HDGST } else { 0 },
        hlen: SHORT_HLEN as u8,
        pdo: 0,
        plen: (SHORT_HLEN + hd) as u32,
    };
    let start = out.len();
    out.extend_from_slice(&ch.encode());
    out.extend_from_slice(body);
    if hdgst {
        let d = digest(&out[start..start + SHORT_HLEN]);
        out.extend_from_slice(&d.to_le_bytes());
    }
}

/// Appends a CapsuleResp carrying `cqe` (16 encoded bytes).
pub fn push_capsule_resp(out: &mut Vec<u8>, cqe: &[u8; 16], hdgst: bool) {
    push_short(out, ty::CAPSULE_RESP, cqe, hdgst);
}

/// Appends an R2T for `len` bytes at `offset` of command `cid`, transfer tag `ttag`.
pub fn push_r2t(out: &mut Vec<u8>, cid: u16, ttag: u16, offset: u32, len: u32, hdgst: bool) {
    let mut body = [0u8; 16];
    body[0..2].copy_from_slice(&cid.to_le_bytes());
    body[2..4].copy_from_slice(&ttag.to_le_bytes());
    body[4..8].copy_from_slice(&offset.to_le_bytes());
    body[8..12].copy_from_slice(&len.to_le_bytes());
    push_short(out, ty::R2T, &body, hdgst);
}

/// Which trailing flags a C2HData PDU carries.
#[derive(Clone, Copy, Debug)]
pub struct C2hFlags {
    /// Last PDU of the command's data.
    pub last: bool,
    /// Completes the command (only with `last`).
    pub success: bool,
    /// Header digest.
    pub hdgst: bool,
    /// Data digest.
    pub ddgst: bool,
}

/// Appends a C2HData PDU with `data` at offset `datao` of command `cid`.
pub fn push_c2h_data(out: &mut Vec<u8>, cid: u16, datao: u32, data: &[u8], f: C2hFlags) {
    debug_assert!(!f.success || f.last);
    let hd = if f.hdgst { DIGEST_LEN } else { 0 };
    let dd = if f.ddgst { DIGEST_LEN } else { 0 };
    let mut flags = 0;
    if f.hdgst {
        flags |= FLAG_HDGST;
    }
    if f.ddgst {
        flags |= FLAG_DDGST;
    }
    if f.last {
        flags |= FLAG_LAST_PDU;
    }
    if f.success {
        flags |= FLAG_SUCCESS;
    }
    let ch = Ch {
        ty: ty::C2H_DATA,
        flags,
        hlen: SHORT_HLEN as u8,
        pdo: (SHORT_HLEN + hd) as u8,
        plen: (SHORT_HLEN + hd + data.len() + dd) as u32,
    };
    let start = out.len();
    out.extend_from_slice(&ch.encode());
    out.extend_from_slice(&cid.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&datao.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    if f.hdgst {
        let d = digest(&out[start..start + SHORT_HLEN]);
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(data);
    if f.ddgst {
        out.extend_from_slice(&digest(data).to_le_bytes());
    }
}

/// Appends a C2HTermReq with `fes`/`fei` and a copy of (up to 128 bytes of) the offending
/// header.
pub fn push_term_req(out: &mut Vec<u8>, fatal: Fatal, bad_header: &[u8]) {
    let copy = &bad_header[..bad_header.len().min(128)];
    let ch = Ch {
        ty: ty::C2H_TERM_REQ,
        flags: 0,
        hlen: SHORT_HLEN as u8,
        pdo: 0,
        plen: (SHORT_HLEN + copy.len()) as u32,
    };
    out.extend_from_slice(&ch.encode());
    out.extend_from_slice(&fatal.fes.to_le_bytes());
    out.extend_from_slice(&fatal.fei.to_le_bytes());
    out.extend_from_slice(&[0; 10]);
    out.extend_from_slice(copy);
}

// ---- host side ------------------------------------------------------------------------

/// Encodes a host ICReq: PFV 0, HPDA 0, MAXR2T 0 (one R2T per command), digests `dgst`
/// (bit0 header, bit1 data).
pub fn ic_req(dgst: u8) -> [u8; IC_LEN] {
    let mut b = [0u8; IC_LEN];
    let ch = Ch {
        ty: ty::IC_REQ,
        flags: 0,
        hlen: IC_LEN as u8,
        pdo: 0,
        plen: IC_LEN as u32,
    };
    b[..CH_LEN].copy_from_slice(&ch.encode());
    b[11] = dgst & 0x3;
    b
}

/// Appends a CapsuleCmd carrying `sqe` and `data` in-capsule (may be empty). The data
/// digest is added only when `ddgst` and there is data.
pub fn push_capsule_cmd(out: &mut Vec<u8>, sqe: &[u8; 64], data: &[u8], hdgst: bool, ddgst: bool) {
    let hd = if hdgst { DIGEST_LEN } else { 0 };
    let dd = if ddgst && !data.is_empty() {
        DIGEST_LEN
    } else {
        0
    };
    let mut flags = 0;
    if hdgst {
        flags |= FLAG_HDGST;
    }
    if dd > 0 {
        flags |= FLAG_DDGST;
    }
    let ch = Ch {
        ty: ty::CAPSULE_CMD,
        flags,
        hlen: CAPSULE_CMD_HLEN as u8,
        pdo: if data.is_empty() {
            0
        } else {
            (CAPSULE_CMD_HLEN + hd) as u8
        },
        plen: (CAPSULE_CMD_HLEN + hd + data.len() + dd) as u32,
    };
    let start = out.len();
    out.extend_from_slice(&ch.encode());
    out.extend_from_slice(sqe);
    if hdgst {
        let d = digest(&out[start..start + CAPSULE_CMD_HLEN]);
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(data);
    if dd > 0 {
        out.extend_from_slice(&digest(data).to_le_bytes());
    }
}

/// Which options an H2CData PDU carries.
#[derive(Clone, Copy, Debug)]
pub struct H2cFlags {
    /// Last PDU of the data the R2T asked for.
    pub last: bool,
    /// Header digest.
    pub hdgst: bool,
    /// Data digest.
    pub ddgst: bool,
}

/// Appends an H2CData PDU with `data` at offset `datao` of command `cccid`, answering the
/// R2T with transfer tag `ttag`.
pub fn push_h2c_data(
    out: &mut Vec<u8>,
    cccid: u16,
    ttag: u16,
    datao: u32,
    data: &[u8],
    f: H2cFlags,
) {
    let hd = if f.hdgst { DIGEST_LEN } else { 0 };
    let dd = if f.ddgst { DIGEST_LEN } else { 0 };
    let mut flags = 0;
    if f.hdgst {
        flags |= FLAG_HDGST;
    }
    if f.ddgst {
        flags |= FLAG_DDGST;
    }
    if f.last {
        flags |= FLAG_LAST_PDU;
    }
    let ch = Ch {
        ty: ty::H2C_DATA,
        flags,
        hlen: SHORT_HLEN as u8,
        pdo: (SHORT_HLEN + hd) as u8,
        plen: (SHORT_HLEN + hd + data.len() + dd) as u32,
    };
    let start = out.len();
    out.extend_from_slice(&ch.encode());
    out.extend_from_slice(&cccid.to_le_bytes());
    out.extend_from_slice(&ttag.to_le_bytes());
    out.extend_from_slice(&datao.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    if f.hdgst {
        let d = digest(&out[start..start + SHORT_HLEN]);
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(data);
    if f.ddgst {
        out.extend_from_slice(&digest(data).to_le_bytes());
    }
}

/// What the host accepts at this point of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostRecvLimits {
    /// ICReq/ICResp exchange done.
    pub ic_done: bool,
    /// Header digest negotiated.
    pub hdgst: bool,
    /// Data digest negotiated.
    pub ddgst: bool,
    /// Largest C2HData payload accepted in one PDU (the largest read the host issues).
    pub max_c2h_data: u32,
}

/// A decoded controller PDU borrowing its data from the receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum CtrlrPdu<'a> {
    /// ICResp.
    IcResp {
        /// PDU format version.
        pfv: u16,
        /// Controller PDU data alignment.
        cpda: u8,
        /// Digest bits granted (bit0 header, bit1 data).
        dgst: u8,
        /// Largest H2CData payload the controller accepts.
        maxh2cdata: u32,
    },
    /// C2HTermReq: the controller is closing the connection.
    TermReq {
        /// Fatal error status.
        fes: u16,
        /// Fatal error information.
        fei: u32,
    },
    /// CapsuleResp.
    CapsuleResp {
        /// The completion.
        cqe: Cqe,
    },
    /// C2HData.
    C2HData {
        /// Command id.
        cccid: u16,
        /// Offset of this data in the command's data.
        datao: u32,
        /// LAST_PDU flag.
        last: bool,
        /// SUCCESS flag: completes the command, no CapsuleResp follows.
        success: bool,
        /// The data.
        data: &'a [u8],
        /// False if the data digest did not match.
        ddgst_ok: bool,
    },
    /// R2T.
    R2T {
        /// Command id.
        cccid: u16,
        /// Transfer tag to echo in H2CData.
        ttag: u16,
        /// Requested offset.
        r2to: u32,
        /// Requested length.
        r2tl: u32,
    },
}

/// Validates a controller PDU's common header as soon as its 8 bytes arrived: type allowed
/// now, header length, digest flags, data offset and total length. Returns the PDU's total
/// length (bounded, so a hostile length never makes the host buffer without limit).
pub fn check_ctrlr_header(ch: &Ch, lim: &HostRecvLimits) -> Result<usize, Fatal> {
    match ch.ty {
        ty::IC_RESP if !lim.ic_done => {
            if ch.hlen as usize != IC_LEN || ch.plen as usize != IC_LEN {
                return Err(Fatal::field(if ch.hlen as usize != IC_LEN { 2 } else { 4 }));
            }
            return Ok(IC_LEN);
        }
        ty::C2H_TERM_REQ => {
            if ch.hlen as usize != SHORT_HLEN || !(24..=152).contains(&ch.plen) {
                return Err(Fatal::field(2));
            }
            return Ok(ch.plen as usize);
        }
        ty::IC_RESP => return Err(Fatal::status(fes::SEQUENCE)),
        _ if !lim.ic_done => return Err(Fatal::status(fes::SEQUENCE)),
        ty::CAPSULE_RESP | ty::R2T | ty::C2H_DATA => {}
        _ => return Err(Fatal::field(0)),
    }
    if ch.hlen as usize != SHORT_HLEN {
        return Err(Fatal::field(2));
    }
    if (ch.flags & FLAG_HDGST != 0) != lim.hdgst {
        return Err(Fatal::field(1));
    }
    let hd = if lim.hdgst { DIGEST_LEN } else { 0 };
    let plen = ch.plen as usize;
    if ch.ty != ty::C2H_DATA {
        if plen != SHORT_HLEN + hd || ch.flags & FLAG_DDGST != 0 {
            return Err(Fatal::field(4));
        }
        return Ok(plen);
    }
    if ch.pdo as usize != SHORT_HLEN + hd {
        return Err(Fatal::field(3));
    }
    if (ch.flags & FLAG_DDGST != 0) != lim.ddgst {
        return Err(Fatal::field(1));
    }
    if ch.flags & FLAG_SUCCESS != 0 && ch.flags & FLAG_LAST_PDU == 0 {
        return Err(Fatal::field(1));
    }
    let dd = if lim.ddgst { DIGEST_LEN } else { 0 };
    let Some(data_len) = plen.checked_sub(SHORT_HLEN + hd + dd).filter(|n| *n > 0) else {
        return Err(Fatal::field(4));
    };
    if data_len > lim.max_c2h_data as usize {
        return Err(Fatal::status(fes::LIMIT_EXCEEDED));
    }
    Ok(plen)
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// Decodes one complete controller PDU (`pdu.len()` is its `plen`), checking digests. A
/// header digest mismatch is fatal; a data digest mismatch is reported in `ddgst_ok`.
pub fn decode_ctrlr<'a>(pdu: &'a [u8], lim: &HostRecvLimits) -> Result<CtrlrPdu<'a>, Fatal> {
    let bad_len = Fatal::field(4);
    let ch = Ch::parse(pdu).ok_or(bad_len)?;
    let plen = check_ctrlr_header(&ch, lim)?;
    if plen != pdu.len() {
        return Err(bad_len);
    }
    let hlen = ch.hlen as usize;
    let header = pdu.get(..hlen).ok_or(bad_len)?;
    match ch.ty {
        ty::IC_RESP => {
            return Ok(CtrlrPdu::IcResp {
                pfv: u16_at(header, 8).ok_or(bad_len)?,
                cpda: *header.get(10).ok_or(bad_len)?,
                dgst: *header.get(11).ok_or(bad_len)?,
                maxh2cdata: u32_at(header, 12).ok_or(bad_len)?,
            })
        }
        ty::C2H_TERM_REQ => {
            return Ok(CtrlrPdu::TermReq {
                fes: u16_at(header, 8).ok_or(bad_len)?,
                fei: u32_at(header, 10).ok_or(bad_len)?,
            })
        }
        _ => {}
    }
    let mut off = hlen;
    if lim.hdgst {
        let got = u32_at(pdu, off).ok_or(bad_len)?;
        if got != digest(header) {
            return Err(Fatal::status(fes::HDGST));
        }
        off += DIGEST_LEN;
    }
    match ch.ty {
        ty::CAPSULE_RESP => {
            let cqe: &[u8; 16] = header
                .get(8..24)
                .ok_or(bad_len)?
                .try_into()
                .map_err(|_| bad_len)?;
            Ok(CtrlrPdu::CapsuleResp {
                cqe: Cqe::decode(cqe),
            })
        }
        ty::R2T => Ok(CtrlrPdu::R2T {
            cccid: u16_at(header, 8).ok_or(bad_len)?,
            ttag: u16_at(header, 10).ok_or(bad_len)?,
            r2to: u32_at(header, 12).ok_or(bad_len)?,
            r2tl: u32_at(header, 16).ok_or(bad_len)?,
        }),
        _ => {
            let end = pdu.len() - if lim.ddgst { DIGEST_LEN } else { 0 };
            let data = pdu.get(off..end).ok_or(bad_len)?;
            let ddgst_ok = !lim.ddgst || u32_at(pdu, end).ok_or(bad_len)? == digest(data);
            let datal = u32_at(header, 16).ok_or(bad_len)?;
            if datal as usize != data.len() {
                return Err(Fatal::field(16));
            }
            Ok(CtrlrPdu::C2HData {
                cccid: u16_at(header, 8).ok_or(bad_len)?,
                datao: u32_at(header, 12).ok_or(bad_len)?,
                last: ch.flags & FLAG_LAST_PDU != 0,
                success: ch.flags & FLAG_SUCCESS != 0,
                data,
                ddgst_ok,
            })
        }
    }
}

/// Appends an H2CTermReq (host-detected fatal error) with a copy of the offending header.
pub fn push_h2c_term_req(out: &mut Vec<u8>, fatal: Fatal, bad_header: &[u8]) {
    let start = out.len();
    push_term_req(out, fatal, bad_header);
    if let Some(t) = out.get_mut(start) {
        *t = ty::H2C_TERM_REQ;
    }
}

#[cfg(test)]
mod tests;
