//! virtio-blk: the config space, descriptor-chain walking and request decoding.
//!
//! Everything the guest supplies is untrusted: descriptor indexes are checked against the ring
//! (or indirect table) size, every buffer against guest memory, chains are bounded in length
//! (no loops) and in bytes, and a request's sectors against the capacity. A structurally bad
//! chain is a [`ChainError`] (the ring is then marked broken); a well-formed chain with a bad
//! request gets `VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP`.

use std::fmt;

use virtio_bindings::virtio_blk;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

/// Bytes in a virtio-blk sector (capacity and request offsets are always in these units).
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of `virtio_blk_outhdr`.
pub const HEADER_LEN: u64 = 16;
/// Bytes of one `virtio_blk_discard_write_zeroes` segment.
pub const DWZ_SEG_LEN: u64 = 16;
/// Advertised `seg_max`: data segments per request (SPDK's 126 keeps header + status in 128).
pub const SEG_MAX: u32 = 126;
/// Advertised `size_max`: bytes per data segment.
pub const SIZE_MAX: u32 = 128 * 1024;
/// Largest data transfer of one read/write request; larger ones get IOERR.
pub const MAX_IO_BYTES: u64 = 4 * 1024 * 1024;
/// Advertised `max_discard_sectors` and `max_write_zeroes_sectors` (16 MiB).
pub const MAX_DWZ_SECTORS: u32 = 32768;
/// Descriptors one chain may have, direct plus indirect (header + SEG_MAX + status, rounded).
pub const MAX_CHAIN_DESCS: usize = 256;
/// `VIRTIO_BLK_ID_BYTES`: the serial returned by GET_ID.
pub const ID_BYTES: usize = 20;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;

/// What the device reports in `virtio_blk_config`.
#[derive(Debug, Clone, Copy)]
pub struct BlkGeometry {
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Capacity in logical blocks.
    pub num_blocks: u64,
    /// Optimal I/O size in logical blocks (0 = none).
    pub opt_io_blocks: u32,
    /// Number of request queues.
    pub num_queues: u16,
}

/// Builds the 60-byte `virtio_blk_config` (through `write_zeroes_may_unmap` + padding).
pub fn config_space(g: &BlkGeometry) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    let capacity = g.num_blocks.saturating_mul(u64::from(g.block_size)) / SECTOR_SIZE;
    let put = |c: &mut Vec<u8>, off: usize, v: &[u8]| c[off..off + v.len()].copy_from_slice(v);
    put(&mut c, 0, &capacity.to_le_bytes());
    put(&mut c, 8, &SIZE_MAX.to_le_bytes());
    put(&mut c, 12, &SEG_MAX.to_le_bytes());
    put(&mut c, 20, &g.block_size.to_le_bytes());
    // physical_block_exp 0, alignment_offset 0, min_io_size 1 block.
    put(&mut c, 26, &1u16.to_le_bytes());
    put(&mut c, 28, &g.opt_io_blocks.to_le_bytes());
    put(&mut c, 34, &g.num_queues.to_le_bytes());
    put(&mut c, 36, &MAX_DWZ_SECTORS.to_le_bytes());
    put(&mut c, 40, &1u32.to_le_bytes());
    let align = g.block_size / 512;
    put(&mut c, 44, &align.to_le_bytes());
    put(&mut c, 48, &MAX_DWZ_SECTORS.to_le_bytes());
    put(&mut c, 52, &1u32.to_le_bytes());
    c
}

/// One guest buffer of a chain, already checked to lie inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u32,
}

/// A walked descriptor chain: device-readable then device-writable buffers.
#[derive(Debug, Default)]
pub struct Chain {
    /// Device-readable buffers, in order.
    pub readable: Vec<Segment>,
    /// Device-writable buffers, in order.
    pub writable: Vec<Segment>,
}

/// Why a descriptor chain cannot be used at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainError {
    /// A descriptor index is outside its table.
    IndexOutOfRange(u16),
    /// The descriptor (or indirect) table is not in guest memory.
    TableOutsideMemory(u64),
    /// A buffer is not wholly inside guest memory.
    BufferOutsideMemory { gpa: u64, len: u32 },
    /// More descriptors than the table holds (a loop) or than [`MAX_CHAIN_DESCS`].
    TooLong,
    /// An indirect descriptor inside an indirect table, with NEXT, or with a bad length.
    BadIndirect,
    /// A readable buffer after a writable one.
    BadOrder,
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainError::IndexOutOfRange(i) => write!(f, "descriptor index {i} out of range"),
            ChainError::TableOutsideMemory(a) => write!(f, "descriptor table {a:#x} not in memory"),
            ChainError::BufferOutsideMemory { gpa, len } => {
                write!(f, "buffer {gpa:#x}+{len} not in guest memory")
            }
            ChainError::TooLong => write!(f, "descriptor chain too long or looped"),
            ChainError::BadIndirect => write!(f, "bad indirect descriptor"),
            ChainError::BadOrder => write!(f, "readable descriptor after a writable one"),
        }
    }
}

#[derive(Clone, Copy)]
#[repr(C)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_desc(mem: &GuestMemoryMmap<()>, table: u64, index: u16) -> Result<RawDesc, ChainError> {
    let mut b = [0u8; 16];
    let at = table
        .checked_add(u64::from(index) * 16)
        .ok_or(ChainError::TableOutsideMemory(table))?;
    mem.read_slice(&mut b, GuestAddress(at))
        .map_err(|_| ChainError::TableOutsideMemory(table))?;
    let (a, rest) = b.split_at(8);
    let (l, rest) = rest.split_at(4);
    let (fl, n) = rest.split_at(2);
    Ok(RawDesc {
        addr: u64::from_le_bytes(a.try_into().unwrap_or_default()),
        len: u32::from_le_bytes(l.try_into().unwrap_or_default()),
        flags: u16::from_le_bytes(fl.try_into().unwrap_or_default()),
        next: u16::from_le_bytes(n.try_into().unwrap_or_default()),
    })
}

/// Walks the chain starting at `head` of a split ring with `queue_size` descriptors at
/// guest-physical `desc_table`, following NEXT and one level of INDIRECT.
pub fn walk_chain(
    mem: &GuestMemoryMmap<()>,
    desc_table: u64,
    queue_size: u16,
    head: u16,
) -> Result<Chain, ChainError> {
    let mut chain = Chain::default();
    let (mut table, mut table_len, mut index) = (desc_table, queue_size, head);
    let mut indirect = false;
    let mut nr_descs = 0usize;
    loop {
        if index >= table_len {
            return Err(ChainError::IndexOutOfRange(index));
        }
        nr_descs += 1;
        if nr_descs > MAX_CHAIN_DESCS
            || nr_descs > usize::from(table_len) + usize::from(indirect) * usize::from(queue_size)
        {
            return Err(ChainError::TooLong);
        }
        let d = read_desc(mem, table, index)?;
        if d.flags & VRING_DESC_F_INDIRECT != 0 {
            let n = d.len / 16;
            if indirect || d.flags & VRING_DESC_F_NEXT != 0 || d.len % 16 != 0 || n == 0 || n > 1024
            {
                return Err(ChainError::BadIndirect);
            }
            if !mem.check_range(GuestAddress(d.addr), d.len as usize, Permissions::ReadWrite) {
                return Err(ChainError::TableOutsideMemory(d.addr));
            }
            (table, table_len, index, indirect) = (d.addr, n as u16, 0, true);
            continue;
        }
        if d.len > 0 {
            if !mem.check_range(GuestAddress(d.addr), d.len as usize, Permissions::ReadWrite) {
                return Err(ChainError::BufferOutsideMemory {
                    gpa: d.addr,
                    len: d.len,
                });
            }
            let seg = Segment {
                gpa: d.addr,
                len: d.len,
            };
            if d.flags & VRING_DESC_F_WRITE != 0 {
                chain.writable.push(seg);
            } else if chain.writable.is_empty() {
                chain.readable.push(seg);
            } else {
                return Err(ChainError::BadOrder);
            }
        }
        if d.flags & VRING_DESC_F_NEXT == 0 {
            return Ok(chain);
        }
        index = d.next;
    }
}

/// Total bytes of `segs`.
pub fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Copies `out.len()` bytes starting `skip` bytes into `segs` out of guest memory.
pub fn gather(mem: &GuestMemoryMmap<()>, segs: &[Segment], skip: u64, out: &mut [u8]) -> bool {
    let mut skip = skip;
    let mut done = 0usize;
    for s in segs {
        if done == out.len() {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(out.len() - done);
        if mem
            .read_slice(&mut out[done..done + n], GuestAddress(s.gpa + skip))
            .is_err()
        {
            return false;
        }
        done += n;
        skip = 0;
    }
    done == out.len()
}

/// Copies `data` into guest memory starting `skip` bytes into `segs`.
pub fn scatter(mem: &GuestMemoryMmap<()>, segs: &[Segment], skip: u64, data: &[u8]) -> bool {
    let mut skip = skip;
    let mut done = 0usize;
    for s in segs {
        if done == data.len() {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(data.len() - done);
        if mem
            .write_slice(&data[done..done + n], GuestAddress(s.gpa + skip))
            .is_err()
        {
            return false;
        }
        done += n;
        skip = 0;
    }
    done == data.len()
}

/// A decoded request, before it reaches the bdev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlkOp {
    /// Read `len` bytes at byte `offset` into the writable data.
    Read { offset: u64, len: u64 },
    /// Write the readable data (`len` bytes after the header) at byte `offset`.
    Write { offset: u64, len: u64 },
    /// Flush the volatile cache.
    Flush,
    /// Return the serial.
    GetId,
    /// Unmap `len` bytes at `offset`.
    Discard { offset: u64, len: u64 },
    /// Zero `len` bytes at `offset`.
    WriteZeroes { offset: u64, len: u64 },
}

/// How a request's status ends when decoding fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// `VIRTIO_BLK_S_IOERR`.
    IoErr,
    /// `VIRTIO_BLK_S_UNSUPP`.
    Unsupp,
}

impl Reject {
    /// The status byte.
    pub fn status(self) -> u8 {
        match self {
            Reject::IoErr => virtio_blk::VIRTIO_BLK_S_IOERR as u8,
            Reject::Unsupp => virtio_blk::VIRTIO_BLK_S_UNSUPP as u8,
        }
    }
}

/// Device limits a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Logical block size.
    pub block_size: u32,
    /// Capacity in bytes.
    pub capacity_bytes: u64,
    /// Writes, discards and write-zeroes refused.
    pub readonly: bool,
    /// FLUSH offered.
    pub flush: bool,
    /// DISCARD offered.
    pub discard: bool,
    /// WRITE_ZEROES offered.
    pub write_zeroes: bool,
}

fn check_range(l: &Limits, sector: u64, len: u64) -> Result<u64, Reject> {
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or(Reject::IoErr)?;
    let bs = u64::from(l.block_size);
    if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
        return Err(Reject::IoErr);
    }
    match offset.checked_add(len) {
        Some(end) if end <= l.capacity_bytes => Ok(offset),
        _ => Err(Reject::IoErr),
    }
}

/// Decodes the single segment of a DISCARD (`discard`) or WRITE_ZEROES request.
fn decode_dwz(
    mem: &GuestMemoryMmap<()>,
    chain: &Chain,
    l: &Limits,
    discard: bool,
) -> Result<BlkOp, Reject> {
    if (discard && !l.discard) || (!discard && !l.write_zeroes) {
        return Err(Reject::Unsupp);
    }
    if l.readonly || total_len(&chain.readable) - HEADER_LEN != DWZ_SEG_LEN {
        return Err(Reject::IoErr);
    }
    let mut seg = [0u8; 16];
    if !gather(mem, &chain.readable, HEADER_LEN, &mut seg) {
        return Err(Reject::IoErr);
    }
    let (s, rest) = seg.split_at(8);
    let (n, f) = rest.split_at(4);
    let sector = u64::from_le_bytes(s.try_into().unwrap_or_default());
    let n = u32::from_le_bytes(n.try_into().unwrap_or_default());
    let flags = u32::from_le_bytes(f.try_into().unwrap_or_default());
    if flags & !virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && flags != 0) {
        return Err(Reject::Unsupp);
    }
    if n > MAX_DWZ_SECTORS {
        return Err(Reject::IoErr);
    }
    let len = u64::from(n) * SECTOR_SIZE;
    let offset = check_range(l, sector, len)?;
    Ok(if discard {
        BlkOp::Discard { offset, len }
    } else {
        BlkOp::WriteZeroes { offset, len }
    })
}

/// Decodes a chain into a [`BlkOp`]. The chain must have at least a 16-byte readable header
/// and a writable status byte (checked by the caller).
pub fn decode(mem: &GuestMemoryMmap<()>, chain: &Chain, l: &Limits) -> Result<BlkOp, Reject> {
    let mut hdr = [0u8; 16];
    if !gather(mem, &chain.readable, 0, &mut hdr) {
        return Err(Reject::IoErr);
    }
    let (t, rest) = hdr.split_at(4);
    let req_type =
        u32::from_le_bytes(t.try_into().unwrap_or_default()) & !virtio_blk::VIRTIO_BLK_T_BARRIER;
    let sector = u64::from_le_bytes(rest[4..12].try_into().unwrap_or_default());
    let readable_data = total_len(&chain.readable) - HEADER_LEN;
    let writable_data = total_len(&chain.writable) - 1;
    match req_type {
        virtio_blk::VIRTIO_BLK_T_IN => {
            if writable_data > MAX_IO_BYTES {
                return Err(Reject::IoErr);
            }
            let offset = check_range(l, sector, writable_data)?;
            Ok(BlkOp::Read {
                offset,
                len: writable_data,
            })
        }
        virtio_blk::VIRTIO_BLK_T_OUT => {
            if l.readonly || readable_data > MAX_IO_BYTES {
                return Err(Reject::IoErr);
            }
            let offset = check_range(l, sector, readable_data)?;
            Ok(BlkOp::Write {
                offset,
                len: readable_data,
            })
        }
        virtio_blk::VIRTIO_BLK_T_FLUSH if l.flush => {
            if sector != 0 {
                return Err(Reject::IoErr);
            }
            Ok(BlkOp::Flush)
        }
        virtio_blk::VIRTIO_BLK_T_GET_ID => Ok(BlkOp::GetId),
        virtio_blk::VIRTIO_BLK_T_DISCARD | virtio_blk::VIRTIO_BLK_T_WRITE_ZEROES => {
            decode_dwz(mem, chain, l, req_type == virtio_blk::VIRTIO_BLK_T_DISCARD)
        }
        _ => Err(Reject::Unsupp),
    }
}

#[cfg(test)]
mod tests;
