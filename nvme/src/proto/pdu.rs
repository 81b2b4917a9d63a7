//! NVMe/TCP PDU codec: validation and decoding of host-to-controller PDUs, encoding of
//! controller-to-host PDUs.
//!
//! Common header (8 bytes): `type u8 @0`, `flags u8 @1`, `hlen u8 @2`, `pdo u8 @3`,
//! `plen u32 @4`. A PDU is `hlen` header bytes, an optional 4-byte header digest, data
//! starting at `pdo`, and an optional 4-byte data digest at the end. Decoding never panics:
//! every inconsistency is a [`Fatal`] carrying the FES/FEI for a C2HTermReq.

use super::spec::Sqe;

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

#[cfg(test)]
mod tests;
