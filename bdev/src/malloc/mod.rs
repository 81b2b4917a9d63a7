//! The malloc bdev: a RAM disk. Unmap and write_zeroes zero the range; flush is a no-op.
//! I/O runs in submit and completes from the channel's next poll (as SPDK's malloc does).
//!
//! The memory is shared by every reactor's channel, and nothing stops two reactors from
//! reading and writing overlapping blocks at the same time (a block device leaves the data
//! of such I/O undefined). In Rust terms that must still not be a data race, so a plain
//! `memcpy` (`copy_nonoverlapping`) between the bdev memory and an I/O buffer is unsound:
//! its SAFETY argument would need "no other thread accesses these bytes meanwhile", which
//! the bdev layer does not guarantee across channels. Instead every access to the bdev
//! memory after creation is a byte-wise atomic copy (C++ P1478's
//! `atomic_load_per_byte_memcpy` / `atomic_store_per_byte_memcpy`):
//!
//! - x86_64: `rep movsb` / `rep stosb` in inline assembly. The hardware performs it as a
//!   sequence of byte-or-wider accesses that each read or write whole bytes, i.e. exactly what
//!   a loop of relaxed `AtomicU8` loads/stores may do, which is allowed to race. With ERMSB /
//!   FSRM (every current x86 server core) it runs at `memcpy` speed, where the previous
//!   `AtomicU64` word loop could not be vectorised.
//! - elsewhere: relaxed `AtomicU8` loads and stores, byte by byte (correct but slow; the
//!   project's targets are x86_64).
//!
//! One access kind per platform, used for every access after creation, so racing accesses
//! never mix atomic and non-atomic or differently sized atomic operations.

pub mod rpc;

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::bdev::{Bdev, BdevCore, BdevCoreOpts, IoStatus, IoType, Uuid};
use crate::error::{BdevError, ErrorKind, Result};
use crate::io::{Completer, ModuleChannel, ModuleIo};
use crate::module::BdevModule;
use crate::registry::registry;

/// Module name.
pub const MODULE_NAME: &str = "malloc";

/// Options of [`create`].
#[derive(Debug, Clone, Default)]
pub struct MallocOpts {
    /// Bdev name; `MallocN` if `None`.
    pub name: Option<String>,
    /// Size in blocks.
    pub num_blocks: u64,
    /// Block size in bytes (multiple of 512).
    pub block_size: u32,
    /// UUID (random if `None`).
    pub uuid: Option<Uuid>,
    /// Split I/O crossing multiples of this many blocks (0 = never).
    pub optimal_io_boundary: u32,
}

/// Alignment of the backing memory: a cache line.
const MEM_ALIGN: usize = 64;

/// Zeroed backing memory, accessed only through [`Memory::read`], [`Memory::write`] and
/// [`Memory::zero`] (byte-wise atomic copies, see the module docs).
struct Memory {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the memory is shared only through the byte-wise atomic accessors below, which may
// run concurrently from any thread (see the module docs).
unsafe impl Send for Memory {}
// SAFETY: as above.
unsafe impl Sync for Memory {}

impl Memory {
    fn new(len_bytes: u64) -> Result<Memory> {
        let nomem = || {
            BdevError::new(
                ErrorKind::NoMemory,
                format!("cannot allocate {len_bytes} bytes"),
            )
        };
        let len = usize::try_from(len_bytes).map_err(|_| nomem())?;
        let layout = Layout::from_size_align(len, MEM_ALIGN).map_err(|_| nomem())?;
        // SAFETY: len > 0 (num_blocks and block_size are > 0), so the size is non-zero.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(nomem)?;
        let mem = Memory { ptr, len };
        // Fault every page in now (SPDK's malloc memory is pinned and touched): otherwise a
        // large zeroed allocation is a lazy mapping of the shared zero page, and reads of a
        // fresh bdev would measure one cache-hot page instead of memory.
        for page in (0..len).step_by(4096) {
            mem.zero(page, 1);
        }
        Ok(mem)
    }

    /// Whether `offset..offset + len` lies inside the memory.
    fn contains(&self, offset: usize, len: usize) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.len)
    }

    /// Copies `dst.len()` bytes at `offset` into `dst`. False if out of range.
    fn read(&self, offset: usize, dst: &mut [u8]) -> bool {
        if !self.contains(offset, dst.len()) {
            return false;
        }
        // SAFETY: the source range is inside the allocation (checked above), which lives as
        // long as `self`; `dst` is exclusively borrowed; the two do not overlap (`dst` is not
        // part of the bdev memory, which is never handed out as a slice).
        unsafe { copy_per_byte(dst.as_mut_ptr(), self.ptr.as_ptr().add(offset), dst.len()) };
        true
    }

    /// Copies `src` to `offset`. False if out of range.
    fn write(&self, offset: usize, src: &[u8]) -> bool {
        if !self.contains(offset, src.len()) {
            return false;
        }
        // SAFETY: as in `read`, with the roles swapped; `src` is borrowed for the copy.
        unsafe { copy_per_byte(self.ptr.as_ptr().add(offset), src.as_ptr(), src.len()) };
        true
    }

    /// Zeroes `len` bytes at `offset`. False if out of range.
    fn zero(&self, offset: usize, len: usize) -> bool {
        if !self.contains(offset, len) {
            return false;
        }
        // SAFETY: the range is inside the allocation (checked above).
        unsafe { zero_per_byte(self.ptr.as_ptr().add(offset), len) };
        true
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        if let Ok(layout) = Layout::from_size_align(self.len, MEM_ALIGN) {
            // SAFETY: allocated in new() with this very layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
        }
    }
}

/// Byte-wise atomic copy of `len` bytes from `src` to `dst` (see the module docs).
///
/// # Safety
/// Both ranges must be valid for `len` bytes and must not overlap. Bytes of either range that
/// other threads access concurrently must be accessed only through this function or
/// [`zero_per_byte`].
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn copy_per_byte(dst: *mut u8, src: *const u8, len: usize) {
    // SAFETY: the caller guarantees both ranges are valid and disjoint. `rep movsb` reads
    // and writes only those bytes, with the direction flag clear (guaranteed on entry to
    // asm!, and the instruction leaves it so); it touches no stack and no flags. Each of its
    // memory accesses reads or writes whole bytes without tearing them, as a sequence of
    // relaxed byte atomics would, so racing with other such copies on the bdev memory is not
    // a data race (only the bytes observed are unspecified).
    unsafe {
        std::arch::asm!(
            "rep movsb",
            inout("rcx") len => _,
            inout("rdi") dst => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        );
    }
}

/// Byte-wise atomic zeroing of `len` bytes at `dst` (see [`copy_per_byte`]).
///
/// # Safety
/// As for [`copy_per_byte`].
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn zero_per_byte(dst: *mut u8, len: usize) {
    // SAFETY: as in copy_per_byte: `rep stosb` writes exactly `len` bytes from `dst` upward
    // (direction flag clear), whole bytes at a time.
    unsafe {
        std::arch::asm!(
            "rep stosb",
            inout("rcx") len => _,
            inout("rdi") dst => _,
            in("al") 0u8,
            options(nostack, preserves_flags)
        );
    }
}

/// Portable fallback: relaxed `AtomicU8` loads and stores.
///
/// # Safety
/// As for the x86_64 version; every access to the bdev memory goes through these functions,
/// so its bytes are always accessed atomically and at one size.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn copy_per_byte(dst: *mut u8, src: *const u8, len: usize) {
    use std::sync::atomic::AtomicU8;
    for i in 0..len {
        // SAFETY: i < len: inside both valid ranges; AtomicU8 has the size and alignment of
        // u8, and concurrently accessed bytes are only ever accessed as AtomicU8.
        unsafe {
            let v = AtomicU8::from_ptr(src.add(i) as *mut u8).load(Ordering::Relaxed);
            AtomicU8::from_ptr(dst.add(i)).store(v, Ordering::Relaxed);
        }
    }
}

/// Portable fallback of [`zero_per_byte`].
///
/// # Safety
/// As for [`copy_per_byte`].
#[cfg(not(target_arch = "x86_64"))]
unsafe fn zero_per_byte(dst: *mut u8, len: usize) {
    use std::sync::atomic::AtomicU8;
    for i in 0..len {
        // SAFETY: as in copy_per_byte.
        unsafe { AtomicU8::from_ptr(dst.add(i)).store(0, Ordering::Relaxed) };
    }
}

/// A malloc bdev.
pub struct MallocBdev {
    core: BdevCore,
    mem: Arc<Memory>,
}

impl Bdev for MallocBdev {
    fn core(&self) -> &BdevCore {
        &self.core
    }

    fn io_type_supported(&self, _io_type: IoType) -> bool {
        true
    }

    fn create_channel(&self, completer: Completer) -> Result<Box<dyn ModuleChannel>> {
        Ok(Box::new(MallocChannel {
            mem: self.mem.clone(),
            block_size: u64::from(self.core.block_size()),
            completer,
        }))
    }

    fn write_config_json(&self) -> Option<Value> {
        let mut params = json!({
            "name": self.core.name(),
            "num_blocks": self.core.num_blocks(),
            "block_size": self.core.block_size(),
            "uuid": self.core.uuid().to_string(),
        });
        if self.core.optimal_io_boundary() > 0 {
            params["optimal_io_boundary"] = json!(self.core.optimal_io_boundary());
        }
        Some(json!({ "method": "bdev_malloc_create", "params": params }))
    }
}

struct MallocChannel {
    mem: Arc<Memory>,
    block_size: u64,
    completer: Completer,
}

impl MallocChannel {
    fn execute(&self, io: &mut ModuleIo) -> IoStatus {
        // The generic layer checked the range against the bdev size, which equals the
        // allocation (malloc bdevs do not resize); a miss here is a bug, reported as EIO.
        let range = (
            usize::try_from(io.offset_blocks() * self.block_size),
            usize::try_from(io.num_blocks() * self.block_size),
        );
        let (Ok(offset), Ok(len)) = range else {
            return IoStatus::Failed(libc::EIO);
        };
        let in_range = match io.io_type() {
            IoType::Read => self.mem.read(offset, io.buf_mut()),
            IoType::Write => self.mem.write(offset, io.buf()),
            IoType::Unmap | IoType::WriteZeroes => self.mem.zero(offset, len),
            IoType::Flush | IoType::Reset => true,
        };
        if in_range {
            IoStatus::Success
        } else {
            IoStatus::Failed(libc::EIO)
        }
    }
}

impl ModuleChannel for MallocChannel {
    fn submit(&mut self, mut io: ModuleIo) {
        let status = self.execute(&mut io);
        self.completer.complete(io, status);
    }
}

static NEXT_MALLOC: AtomicUsize = AtomicUsize::new(0);

/// Creates and registers a malloc bdev. Errors: `EINVAL`, `ENOMEM`, `EEXIST`.
pub fn create(opts: MallocOpts) -> Result<Arc<MallocBdev>> {
    let name = match opts.name {
        Some(n) => n,
        None => loop {
            let n = format!("Malloc{}", NEXT_MALLOC.fetch_add(1, Ordering::Relaxed));
            if registry().lookup(&n).is_none() {
                break n;
            }
        },
    };
    let core = BdevCore::new(BdevCoreOpts {
        name,
        aliases: Vec::new(),
        uuid: opts.uuid,
        product_name: "Malloc disk",
        module_name: MODULE_NAME,
        block_size: opts.block_size,
        num_blocks: opts.num_blocks,
        optimal_io_boundary: opts.optimal_io_boundary,
        write_cache: false,
    })?;
    let mem = Memory::new(opts.num_blocks * u64::from(opts.block_size))?;
    let bdev = Arc::new(MallocBdev {
        core,
        mem: Arc::new(mem),
    });
    registry().register(bdev.clone())?;
    Ok(bdev)
}

/// Deletes (hot-removes) the malloc bdev `name`. Errors: `ENODEV`.
pub fn delete(name: &str) -> Result<()> {
    match registry().lookup(name) {
        Some(b) if b.core().module_name() == MODULE_NAME => registry().unregister(name).map(|_| ()),
        _ => Err(BdevError::new(
            ErrorKind::NotFound,
            format!("no malloc bdev named '{name}'"),
        )),
    }
}

/// The malloc module.
pub struct MallocModule;

impl BdevModule for MallocModule {
    fn name(&self) -> &'static str {
        MODULE_NAME
    }
}
