//! `Pack`/`Unpack` traits and a little-endian reader/writer over byte slices.
//!
//! Every on-disk type implements both, with its `DISK_SIZE`; decoding never panics: a short
//! buffer yields [`ErrorKind::Truncated`].
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use crate::error::{err, ErrorKind, Result};

/// Encode into a fixed number of bytes.
pub trait Pack {
    /// Bytes written by [`Pack::pack`].
    const DISK_SIZE: usize;
    /// Writes exactly `DISK_SIZE` bytes at the writer's position.
    fn pack(&self, w: &mut Writer<'_>) -> Result<()>;
}

/// Decode from a fixed number of bytes, validating.
pub trait Unpack: Sized {
    /// Bytes consumed by [`Unpack::unpack`].
    const DISK_SIZE: usize;
    /// Reads exactly `DISK_SIZE` bytes; Err on a short buffer or an invalid value.
    fn unpack(r: &mut Reader<'_>) -> Result<Self>;
}

/// Unpack a whole value from the start of `buf`.
pub fn unpack_from<T: Unpack>(buf: &[u8]) -> Result<T> {
    T::unpack(&mut Reader::new(buf))
}

/// Pack a value at the start of `buf`.
pub fn pack_into<T: Pack>(v: &T, buf: &mut [u8]) -> Result<()> {
    v.pack(&mut Writer::new(buf))
}

/// Little-endian cursor over a borrowed slice.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Reader at offset 0 of `buf`.
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    /// Current offset.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Next `n` bytes, or `Truncated`.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n);
        match end.and_then(|e| self.buf.get(self.pos..e)) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => err(
                ErrorKind::Truncated,
                format!(
                    "need {n} bytes at offset {}, have {}",
                    self.pos,
                    self.buf.len()
                ),
            ),
        }
    }

    /// Skip `n` bytes.
    pub fn skip(&mut self, n: usize) -> Result<()> {
        self.bytes(n).map(|_| ())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.bytes(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// Little-endian u32.
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// Little-endian u64.
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

/// Little-endian cursor over a mutable slice.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    /// Writer at offset 0 of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Writer<'a> {
        Writer { buf, pos: 0 }
    }

    /// Current offset.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Write raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> Result<()> {
        let len = self.buf.len();
        let pos = self.pos;
        match pos
            .checked_add(b.len())
            .and_then(|e| self.buf.get_mut(pos..e))
        {
            Some(dst) => {
                dst.copy_from_slice(b);
                self.pos += b.len();
                Ok(())
            }
            None => err(
                ErrorKind::Truncated,
                format!("cannot write {} bytes at offset {pos} of {len}", b.len()),
            ),
        }
    }

    /// Write `n` zero bytes.
    pub fn zeros(&mut self, n: usize) -> Result<()> {
        let pos = self.pos;
        match pos.checked_add(n).and_then(|e| self.buf.get_mut(pos..e)) {
            Some(dst) => {
                dst.fill(0);
                self.pos += n;
                Ok(())
            }
            None => err(
                ErrorKind::Truncated,
                format!("cannot zero {n} bytes at {pos}"),
            ),
        }
    }

    /// Little-endian u32.
    pub fn u32(&mut self, v: u32) -> Result<()> {
        self.bytes(&v.to_le_bytes())
    }

    /// Little-endian u64.
    pub fn u64(&mut self, v: u64) -> Result<()> {
        self.bytes(&v.to_le_bytes())
    }
}

/// Read a LE u64 at `off` of `buf` (Err if out of range).
pub fn le64_at(buf: &[u8], off: usize) -> Result<u64> {
    Reader::new(buf.get(off..).unwrap_or(&[])).u64()
}

/// Read a LE u32 at `off` of `buf` (Err if out of range).
pub fn le32_at(buf: &[u8], off: usize) -> Result<u32> {
    Reader::new(buf.get(off..).unwrap_or(&[])).u32()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn reader_writer_round_trip_and_truncation() {
        let mut buf = [0u8; 12];
        let mut w = Writer::new(&mut buf);
        w.u32(0xdead_beef).unwrap();
        w.u64(0x0123_4567_89ab_cdef).unwrap();
        assert_eq!(w.u32(1).unwrap_err().kind(), ErrorKind::Truncated);
        let mut r = Reader::new(&buf);
        assert_eq!(r.u32().unwrap(), 0xdead_beef);
        assert_eq!(r.u64().unwrap(), 0x0123_4567_89ab_cdef);
        assert_eq!(r.u32().unwrap_err().kind(), ErrorKind::Truncated);
        assert_eq!(buf[0], 0xef);
        assert_eq!(le64_at(&buf, 4).unwrap(), 0x0123_4567_89ab_cdef);
        assert!(le64_at(&buf, 5).is_err());
        assert!(le32_at(&buf, 100).is_err());
    }
}
