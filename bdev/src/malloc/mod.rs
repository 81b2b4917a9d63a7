//! The malloc bdev: a RAM disk. Unmap and write_zeroes zero the range; flush is a no-op.
//! I/O runs in submit and completes from the channel's next poll (as SPDK's malloc does).
//!
//! The memory is shared by every reactor's channel. It is stored as `AtomicU64` words so
//! that concurrent overlapping I/O from two reactors (whose result a block device leaves
//! undefined) is still not a data race in Rust terms; relaxed word loads and stores compile
//! to plain moves.

pub mod rpc;

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

/// Zeroed, word-addressed backing memory.
struct Memory {
    ptr: NonNull<AtomicU64>,
    nr_words: usize,
}

// SAFETY: the memory is only accessed through &AtomicU64, which is Send + Sync.
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
        let nr_words = usize::try_from(len_bytes / 8).map_err(|_| nomem())?;
        let layout = Layout::array::<AtomicU64>(nr_words).map_err(|_| nomem())?;
        // SAFETY: nr_words > 0 (num_blocks and block_size are > 0), so the size is non-zero.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw.cast::<AtomicU64>()).ok_or_else(nomem)?;
        let mem = Memory { ptr, nr_words };
        // Fault every page in now (SPDK's malloc memory is pinned and touched): otherwise a
        // large zeroed allocation is a lazy mapping of the shared zero page, and reads of a
        // fresh bdev would measure one cache-hot page instead of memory.
        for w in mem.words().iter().step_by(4096 / 8) {
            w.store(0, Ordering::Relaxed);
        }
        Ok(mem)
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: ptr is a live zeroed allocation of nr_words AtomicU64 (all-zero is a valid
        // AtomicU64), freed only in Drop.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.nr_words) }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        if let Ok(layout) = Layout::array::<AtomicU64>(self.nr_words) {
            // SAFETY: allocated in new() with this very layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr().cast(), layout) }
        }
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
        let start = (io.offset_blocks() * self.block_size / 8) as usize;
        let n = (io.num_blocks() * self.block_size / 8) as usize;
        // The generic layer checked the range against the bdev size, which equals the
        // allocation (malloc bdevs do not resize); a miss here is a bug, reported as EIO.
        let Some(words) = self.mem.words().get(start..start + n) else {
            return IoStatus::Failed(libc::EIO);
        };
        match io.io_type() {
            IoType::Read => {
                for (chunk, w) in io.buf_mut().chunks_exact_mut(8).zip(words) {
                    chunk.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
                }
            }
            IoType::Write => {
                for (chunk, w) in io.buf().chunks_exact(8).zip(words) {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(chunk);
                    w.store(u64::from_ne_bytes(b), Ordering::Relaxed);
                }
            }
            IoType::Unmap | IoType::WriteZeroes => {
                for w in words {
                    w.store(0, Ordering::Relaxed);
                }
            }
            IoType::Flush | IoType::Reset => {}
        }
        IoStatus::Success
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
