//! The narrow I/O trait every metadata access goes through (STYLE rule 2): whole, aligned
//! 4 KiB blocks, plus a device flush. [`FileBlockIo`] serves files and block devices,
//! [`MemBlockIo`] is the shareable in-memory implementation used by tests.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

/// Metadata block size in bytes (`THIN_METADATA_BLOCK_SIZE` = 8 sectors).
pub const BLOCK_SIZE: usize = 4096;

/// Block-granular device access. Implementations must be `Send` so the metadata can move to a
/// worker thread.
pub trait BlockIo: Send {
    /// Device size in whole 4 KiB blocks.
    fn nr_blocks(&self) -> u64;
    /// Read block `loc` into `buf`. Err if `loc >= nr_blocks()` or on device failure.
    fn read_block(&self, loc: u64, buf: &mut [u8; BLOCK_SIZE]) -> io::Result<()>;
    /// Write `buf` to block `loc` (not durable until [`BlockIo::flush`]).
    fn write_block(&self, loc: u64, buf: &[u8; BLOCK_SIZE]) -> io::Result<()>;
    /// Make every completed write durable (device cache FLUSH).
    fn flush(&self) -> io::Result<()>;
}

fn out_of_range(loc: u64, nr: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("block {loc} beyond device end ({nr} blocks)"),
    )
}

/// [`BlockIo`] over a file or block device (positional reads/writes, `fsync` as flush).
#[derive(Debug)]
pub struct FileBlockIo {
    file: File,
    nr_blocks: u64,
}

impl FileBlockIo {
    /// Open `path` read-write; its size (rounded down to 4 KiB) is the device size.
    pub fn open(path: &Path) -> io::Result<FileBlockIo> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        FileBlockIo::from_file(file)
    }

    /// Wrap an open file.
    pub fn from_file(file: File) -> io::Result<FileBlockIo> {
        let len = file.metadata()?.len();
        let len = if len == 0 {
            // Block devices report 0 in metadata; ask for the end offset instead.
            use std::io::Seek;
            let mut f = &file;
            f.seek(io::SeekFrom::End(0))?
        } else {
            len
        };
        Ok(FileBlockIo {
            file,
            nr_blocks: len / BLOCK_SIZE as u64,
        })
    }
}

impl BlockIo for FileBlockIo {
    fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    fn read_block(&self, loc: u64, buf: &mut [u8; BLOCK_SIZE]) -> io::Result<()> {
        if loc >= self.nr_blocks {
            return Err(out_of_range(loc, self.nr_blocks));
        }
        self.file.read_exact_at(buf, loc * BLOCK_SIZE as u64)
    }

    fn write_block(&self, loc: u64, buf: &[u8; BLOCK_SIZE]) -> io::Result<()> {
        if loc >= self.nr_blocks {
            return Err(out_of_range(loc, self.nr_blocks));
        }
        self.file.write_all_at(buf, loc * BLOCK_SIZE as u64)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// In-memory device. Clones share the same blocks, so a test can drop the metadata and reopen
/// the same image; [`MemBlockIo::resize`] grows it.
#[derive(Debug, Clone)]
pub struct MemBlockIo {
    inner: Arc<Mutex<MemInner>>,
}

#[derive(Debug)]
struct MemInner {
    data: Vec<u8>,
    nr_writes: u64,
    nr_flushes: u64,
}

impl MemBlockIo {
    /// A zero-filled device of `nr_blocks` blocks.
    pub fn new(nr_blocks: u64) -> MemBlockIo {
        let inner = MemInner {
            data: vec![0; nr_blocks as usize * BLOCK_SIZE],
            nr_writes: 0,
            nr_flushes: 0,
        };
        MemBlockIo {
            inner: Arc::new(Mutex::new(inner)),
        }
    }

    /// A device holding `image` (its length must be a multiple of 4096).
    pub fn from_image(image: Vec<u8>) -> io::Result<MemBlockIo> {
        if !image.len().is_multiple_of(BLOCK_SIZE) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "image not 4 KiB aligned",
            ));
        }
        let inner = MemInner {
            data: image,
            nr_writes: 0,
            nr_flushes: 0,
        };
        Ok(MemBlockIo {
            inner: Arc::new(Mutex::new(inner)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, MemInner> {
        // A poisoned lock only means a panicking test thread; the bytes are still valid.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Grow (or shrink) the device to `nr_blocks`, zero-filling new space.
    pub fn resize(&self, nr_blocks: u64) {
        self.lock().data.resize(nr_blocks as usize * BLOCK_SIZE, 0);
    }

    /// A copy of the whole image.
    pub fn image(&self) -> Vec<u8> {
        self.lock().data.clone()
    }

    /// Number of block writes so far.
    pub fn nr_writes(&self) -> u64 {
        self.lock().nr_writes
    }

    /// Number of flushes so far.
    pub fn nr_flushes(&self) -> u64 {
        self.lock().nr_flushes
    }
}

impl BlockIo for MemBlockIo {
    fn nr_blocks(&self) -> u64 {
        (self.lock().data.len() / BLOCK_SIZE) as u64
    }

    fn read_block(&self, loc: u64, buf: &mut [u8; BLOCK_SIZE]) -> io::Result<()> {
        let g = self.lock();
        let nr = (g.data.len() / BLOCK_SIZE) as u64;
        let off = loc as usize * BLOCK_SIZE;
        match g.data.get(off..off + BLOCK_SIZE) {
            Some(src) if loc < nr => {
                buf.copy_from_slice(src);
                Ok(())
            }
            _ => Err(out_of_range(loc, nr)),
        }
    }

    fn write_block(&self, loc: u64, buf: &[u8; BLOCK_SIZE]) -> io::Result<()> {
        let mut g = self.lock();
        let nr = (g.data.len() / BLOCK_SIZE) as u64;
        let off = loc as usize * BLOCK_SIZE;
        g.nr_writes += 1;
        match g.data.get_mut(off..off + BLOCK_SIZE) {
            Some(dst) if loc < nr => {
                dst.copy_from_slice(buf);
                Ok(())
            }
            _ => Err(out_of_range(loc, nr)),
        }
    }

    fn flush(&self) -> io::Result<()> {
        self.lock().nr_flushes += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(io: &dyn BlockIo) {
        let mut b = [7u8; BLOCK_SIZE];
        io.write_block(3, &b).unwrap();
        b.fill(0);
        io.read_block(3, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 7));
        assert!(io.read_block(io.nr_blocks(), &mut b).is_err());
        assert!(io.write_block(io.nr_blocks(), &b).is_err());
        io.flush().unwrap();
    }

    #[test]
    fn mem_block_io_shares_and_resizes() {
        let m = MemBlockIo::new(4);
        exercise(&m);
        let m2 = m.clone();
        let mut b = [0u8; BLOCK_SIZE];
        m2.read_block(3, &mut b).unwrap();
        assert_eq!(b[0], 7);
        m.resize(8);
        assert_eq!(m2.nr_blocks(), 8);
        assert_eq!(m.nr_flushes(), 1);
    }

    #[test]
    fn file_block_io_round_trip() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4 * BLOCK_SIZE as u64 + 100).unwrap();
        let io = FileBlockIo::from_file(f).unwrap();
        assert_eq!(io.nr_blocks(), 4);
        exercise(&io);
    }
}
