//! NVMe and NVMe-oF constants and the two queue-entry formats (SQE, CQE).
//!
//! All multi-byte fields are little-endian. Status values are kept in the "shifted-down"
//! form `SCT << 8 | SC` (plus [`DNR`]); the CQE encoder shifts them left by one.

/// Well-known discovery subsystem NQN.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// Do Not Retry bit in the shifted-down status form.
pub const DNR: u16 = 0x4000;

/// Generic status codes (SCT 0).
pub mod sc {
    /// Success.
    pub const SUCCESS: u16 = 0x00;
    /// Invalid Command Opcode.
    pub const INVALID_OPCODE: u16 = 0x01;
    /// Invalid Field in Command.
    pub const INVALID_FIELD: u16 = 0x02;
    /// Data Transfer Error.
    pub const DATA_XFER_ERROR: u16 = 0x04;
    /// Internal Error.
    pub const INTERNAL: u16 = 0x06;
    /// Command Abort Requested.
    pub const ABORT_REQ: u16 = 0x07;
    /// Invalid Namespace or Format.
    pub const INVALID_NS: u16 = 0x0B;
    /// Command Sequence Error.
    pub const CMD_SEQ_ERROR: u16 = 0x0C;
    /// Data SGL Length Invalid.
    pub const SGL_LEN_INVALID: u16 = 0x0F;
    /// SGL Descriptor Type Invalid.
    pub const SGL_TYPE_INVALID: u16 = 0x11;
    /// SGL Offset Invalid.
    pub const SGL_OFFSET_INVALID: u16 = 0x16;
    /// Keep Alive Timer Invalid.
    pub const KAT_INVALID: u16 = 0x1A;
    /// LBA Out of Range.
    pub const LBA_RANGE: u16 = 0x80;
    /// Capacity Exceeded.
    pub const CAP_EXCEEDED: u16 = 0x81;
    /// Async Event Request Limit Exceeded (SCT 1).
    pub const AER_LIMIT: u16 = 0x105;
    /// Invalid Log Page (SCT 1).
    pub const INVALID_LOG_PAGE: u16 = 0x109;
    /// Connect: Incompatible Format (SCT 1).
    pub const CONNECT_FORMAT: u16 = 0x180;
    /// Connect: Controller Busy (SCT 1).
    pub const CONNECT_CTRL_BUSY: u16 = 0x181;
    /// Connect: Invalid Parameters (SCT 1).
    pub const CONNECT_INVALID_PARAM: u16 = 0x182;
    /// Connect: Invalid Host (SCT 1).
    pub const CONNECT_INVALID_HOST: u16 = 0x184;
}

/// Admin opcodes.
pub mod admin {
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0A;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT: u8 = 0x0C;
    /// Keep Alive.
    pub const KEEP_ALIVE: u8 = 0x18;
}

/// NVM I/O opcodes.
pub mod nvm {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DSM: u8 = 0x09;
}

/// Fabrics opcode and command types.
pub mod fabrics {
    /// Fabrics command opcode.
    pub const OPCODE: u8 = 0x7F;
    /// Property Set.
    pub const PROPERTY_SET: u8 = 0x00;
    /// Connect.
    pub const CONNECT: u8 = 0x01;
    /// Property Get.
    pub const PROPERTY_GET: u8 = 0x04;
}

/// Controller register offsets (Property Get/Set).
pub mod reg {
    /// Capabilities (8 bytes).
    pub const CAP: u32 = 0x00;
    /// Version.
    pub const VS: u32 = 0x08;
    /// Controller Configuration.
    pub const CC: u32 = 0x14;
    /// Controller Status.
    pub const CSTS: u32 = 0x1C;
}

/// Identify CNS values.
pub mod cns {
    /// Identify Namespace.
    pub const NAMESPACE: u8 = 0x00;
    /// Identify Controller.
    pub const CONTROLLER: u8 = 0x01;
    /// Active Namespace ID list.
    pub const ACTIVE_NS_LIST: u8 = 0x02;
}

/// Feature identifiers.
pub mod feat {
    /// Number of Queues.
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    /// Keep Alive Timer.
    pub const KEEP_ALIVE_TIMER: u8 = 0x0F;
}

/// SGL descriptor identifier: data block, offset subtype (in-capsule data).
pub const SGL_DATA_BLOCK_OFFSET: u8 = 0x01;
/// SGL descriptor identifier: transport data block (data via R2T/H2CData or C2HData).
pub const SGL_TRANSPORT_DATA_BLOCK: u8 = 0x5A;

/// Reads a little-endian integer at `off`; the caller guarantees the range (fixed-size
/// structures only).
fn le<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[off..off + N]);
    out
}

/// A 64-byte submission queue entry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sqe(pub [u8; 64]);

impl std::fmt::Debug for Sqe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Sqe(opc={:#x} cid={} nsid={})",
            self.opc(),
            self.cid(),
            self.nsid()
        )
    }
}

impl Sqe {
    /// Opcode.
    pub fn opc(&self) -> u8 {
        self.0[0]
    }
    /// FUSE (bits 1:0) and PSDT (bits 7:6).
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    /// Command identifier (echoed verbatim).
    pub fn cid(&self) -> u16 {
        u16::from_le_bytes(le(&self.0, 2))
    }
    /// Namespace id (for Fabrics commands byte 4 is FCTYPE).
    pub fn nsid(&self) -> u32 {
        u32::from_le_bytes(le(&self.0, 4))
    }
    /// Fabrics command type.
    pub fn fctype(&self) -> u8 {
        self.0[4]
    }
    /// SGL1 address.
    pub fn sgl_addr(&self) -> u64 {
        u64::from_le_bytes(le(&self.0, 24))
    }
    /// SGL1 length in bytes.
    pub fn sgl_len(&self) -> u32 {
        u32::from_le_bytes(le(&self.0, 32))
    }
    /// SGL1 identifier (type << 4 | subtype).
    pub fn sgl_id(&self) -> u8 {
        self.0[39]
    }
    /// Command dword `n` (10..=15).
    pub fn cdw(&self, n: usize) -> u32 {
        debug_assert!((10..=15).contains(&n));
        u32::from_le_bytes(le(&self.0, 40 + (n - 10) * 4))
    }
    /// CDW10..11 as one u64 (starting LBA, log page offset, property value).
    pub fn cdw10_11(&self) -> u64 {
        u64::from_le_bytes(le(&self.0, 40))
    }
    /// CDW12..13 as one u64.
    pub fn cdw12_13(&self) -> u64 {
        u64::from_le_bytes(le(&self.0, 48))
    }
    /// Byte `off` of the SQE.
    pub fn byte(&self, off: usize) -> u8 {
        self.0[off % 64]
    }
    /// Little-endian u16 at `off` (< 63).
    pub fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes(le(&self.0, off.min(62)))
    }
    /// Little-endian u32 at `off` (< 61).
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes(le(&self.0, off.min(60)))
    }
    /// Data direction from the opcode's low bits: host-to-controller (01b, or 11b
    /// bidirectional as the Fabrics opcode is; its Connect data is host-to-controller).
    pub fn is_h2c(&self) -> bool {
        self.opc() & 0x1 == 0x1
    }

    /// Data direction from the opcode's low bits: controller-to-host only (10b).
    pub fn is_c2h(&self) -> bool {
        self.opc() & 0x3 == 0x2
    }
}

impl Sqe {
    /// A zeroed SQE with opcode `opc`, PSDT 01b (SGL) and namespace `nsid`.
    pub fn new(opc: u8, nsid: u32) -> Sqe {
        let mut b = [0u8; 64];
        b[0] = opc;
        b[1] = 0x40;
        b[4..8].copy_from_slice(&nsid.to_le_bytes());
        Sqe(b)
    }
    /// Sets the command identifier.
    pub fn set_cid(&mut self, cid: u16) {
        self.0[2..4].copy_from_slice(&cid.to_le_bytes());
    }
    /// Sets byte `off` (< 64).
    pub fn set_byte(&mut self, off: usize, v: u8) {
        if let Some(b) = self.0.get_mut(off) {
            *b = v;
        }
    }
    /// Sets the little-endian u16 at `off` (<= 62).
    pub fn set_u16(&mut self, off: usize, v: u16) {
        if let Some(b) = self.0.get_mut(off..off + 2) {
            b.copy_from_slice(&v.to_le_bytes());
        }
    }
    /// Sets the little-endian u32 at `off` (<= 60).
    pub fn set_u32(&mut self, off: usize, v: u32) {
        if let Some(b) = self.0.get_mut(off..off + 4) {
            b.copy_from_slice(&v.to_le_bytes());
        }
    }
    /// Sets the little-endian u64 at `off` (<= 56).
    pub fn set_u64(&mut self, off: usize, v: u64) {
        if let Some(b) = self.0.get_mut(off..off + 8) {
            b.copy_from_slice(&v.to_le_bytes());
        }
    }
    /// Sets command dword `n` (10..=15).
    pub fn set_cdw(&mut self, n: usize, v: u32) {
        debug_assert!((10..=15).contains(&n));
        self.set_u32(40 + n.saturating_sub(10) * 4, v);
    }
    /// Sets SGL1: `len` bytes, in-capsule (offset 0) or transport data block.
    pub fn set_sgl(&mut self, len: u32, in_capsule: bool) {
        self.set_u64(24, 0);
        self.set_u32(32, len);
        self.0[36..39].fill(0);
        self.0[39] = if in_capsule {
            SGL_DATA_BLOCK_OFFSET
        } else {
            SGL_TRANSPORT_DATA_BLOCK
        };
    }
}

/// A completion queue entry (before encoding).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cqe {
    /// Command-specific DW0.
    pub dw0: u32,
    /// DW1.
    pub dw1: u32,
    /// SQ head pointer.
    pub sqhd: u16,
    /// SQ id.
    pub sqid: u16,
    /// Command id.
    pub cid: u16,
    /// Status in shifted-down form (`SCT << 8 | SC | DNR`).
    pub status: u16,
}

impl Cqe {
    /// The 16 wire bytes.
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.dw0.to_le_bytes());
        b[4..8].copy_from_slice(&self.dw1.to_le_bytes());
        b[8..10].copy_from_slice(&self.sqhd.to_le_bytes());
        b[10..12].copy_from_slice(&self.sqid.to_le_bytes());
        b[12..14].copy_from_slice(&self.cid.to_le_bytes());
        b[14..16].copy_from_slice(&(self.status << 1).to_le_bytes());
        b
    }

    /// Decodes 16 wire bytes (used by tests and initiators).
    pub fn decode(b: &[u8; 16]) -> Cqe {
        Cqe {
            dw0: u32::from_le_bytes(le(b, 0)),
            dw1: u32::from_le_bytes(le(b, 4)),
            sqhd: u16::from_le_bytes(le(b, 8)),
            sqid: u16::from_le_bytes(le(b, 10)),
            cid: u16::from_le_bytes(le(b, 12)),
            status: u16::from_le_bytes(le(b, 14)) >> 1,
        }
    }
}

/// Writes `s` into `dst`, padded with `pad` (ASCII fields use spaces, NQNs NUL).
pub fn put_str(dst: &mut [u8], s: &str, pad: u8) {
    dst.fill(pad);
    let n = s.len().min(dst.len());
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}

impl Cqe {
    /// Status code type (bits 10:8 of the shifted-down status).
    pub fn sct(&self) -> u16 {
        (self.status >> 8) & 0x7
    }
    /// Status code.
    pub fn sc(&self) -> u16 {
        self.status & 0xFF
    }
    /// True for a successful completion.
    pub fn is_success(&self) -> bool {
        self.status & 0x7FF == 0
    }
    /// Do Not Retry.
    pub fn dnr(&self) -> bool {
        self.status & DNR != 0
    }
}

/// Reads a NUL-terminated ASCII string field.
pub fn get_str(src: &[u8]) -> String {
    let end = src.iter().position(|&c| c == 0).unwrap_or(src.len());
    String::from_utf8_lossy(&src[..end]).into_owned()
}
