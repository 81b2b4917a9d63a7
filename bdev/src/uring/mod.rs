//! The uring bdev: a regular file or block device driven through io_uring.
//!
//! Each reactor's channel submits through that reactor's ring (`reactor::ring()`), so
//! completions run on the submitting reactor, interrupt mode wakes on them, and the
//! simulator runs them deterministically. Reads and writes go straight from the caller's
//! buffer as raw-region ops, no copy (O_DIRECT when the file system allows it; otherwise
//! buffered, noted in `driver_specific`). Channels must be created on a reactor. Flush is `fdatasync`,
//! unmap is `fallocate(PUNCH_HOLE|KEEP_SIZE)`, write_zeroes is `fallocate(ZERO_RANGE)` with a
//! punch-hole fallback where ZERO_RANGE is not supported.
//!
//! Invariants: an op's buffer belongs to its `ModuleIo`, which stays in the channel's op slab
//! until the CQE arrives — even when the channel is dropped: every in-flight op holds an `Rc`
//! of the slab as its completion handler.

pub mod rpc;

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::cell::RefCell;
use std::rc::{Rc, Weak};

use reactor::{Completion, CompletionHandler, Fd, OnComplete, Op, RawRegion};
use serde_json::{json, Value};

use crate::bdev::{Bdev, BdevCore, BdevCoreOpts, IoStatus, IoType, Uuid};
use crate::error::{BdevError, ErrorKind, Result};
use crate::io::{Completer, ModuleChannel, ModuleIo};
use crate::module::BdevModule;
use crate::registry::registry;

/// Module name.
pub const MODULE_NAME: &str = "uring";

/// Options of [`create`].
#[derive(Debug, Clone)]
pub struct UringOpts {
    /// Bdev name.
    pub name: String,
    /// Path of the file or block device.
    pub filename: String,
    /// Block size; detected if `None` (logical sector size of a block device, 512 for a
    /// file, raised to 4096 if O_DIRECT refuses 512-byte I/O).
    pub block_size: Option<u32>,
    /// UUID (random if `None`).
    pub uuid: Option<Uuid>,
}

/// A uring bdev.
pub struct UringBdev {
    core: BdevCore,
    file: Arc<File>,
    filename: String,
    o_direct: bool,
    block_size_given: Option<u32>,
    is_blockdev: bool,
    /// Cleared once an fallocate ZERO_RANGE failed with EOPNOTSUPP/EINVAL: punch holes then.
    zero_range_ok: Arc<AtomicBool>,
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

fn open_file(path: &str, direct: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

fn size_bytes(file: &File, is_blockdev: bool) -> std::io::Result<u64> {
    if !is_blockdev {
        return Ok(file.metadata()?.len());
    }
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

fn logical_block_size(file: &File) -> Option<u32> {
    let mut bs: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which is valid.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut bs as *mut libc::c_int) };
    (rc == 0 && bs > 0).then_some(bs as u32)
}

/// Whether an aligned O_DIRECT read of `bs` bytes at offset 0 is accepted.
fn direct_io_accepts(file: &File, bs: u32, size: u64) -> bool {
    if size < u64::from(bs) {
        return true;
    }
    // A plain aligned allocation: this runs on the control path, possibly off-reactor.
    let Ok(layout) = std::alloc::Layout::from_size_align(bs as usize, 4096) else {
        return false;
    };
    // SAFETY: layout has non-zero size (bs >= 512).
    let ptr = unsafe { std::alloc::alloc(layout) };
    if ptr.is_null() {
        return false;
    }
    // SAFETY: ptr is a live, writable, 4096-aligned allocation of bs bytes.
    let rc = unsafe { libc::pread(file.as_raw_fd(), ptr.cast(), bs as usize, 0) };
    let errno = std::io::Error::last_os_error().raw_os_error();
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(ptr, layout) };
    !(rc < 0 && errno == Some(libc::EINVAL))
}

struct Opened {
    file: File,
    o_direct: bool,
    block_size: u32,
    size: u64,
    is_blockdev: bool,
}

type Opener = fn(&str, bool) -> std::io::Result<File>;

fn open_backing(filename: &str, block_size: Option<u32>, open_file: Opener) -> Result<Opened> {
    let ctx = |what: &str| format!("uring bdev: cannot {what} '{filename}'");
    let (file, mut o_direct) = match open_file(filename, true) {
        Ok(f) => (f, true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (
            open_file(filename, false).map_err(|e| BdevError::from_io(ctx("open"), e))?,
            false,
        ),
        Err(e) => return Err(BdevError::from_io(ctx("open"), e)),
    };
    let meta = file
        .metadata()
        .map_err(|e| BdevError::from_io(ctx("stat"), e))?;
    let is_blockdev = meta.file_type().is_block_device();
    if !is_blockdev && !meta.is_file() {
        return Err(BdevError::invalid(format!(
            "uring bdev: '{filename}' is neither a regular file nor a block device"
        )));
    }
    let size = size_bytes(&file, is_blockdev).map_err(|e| BdevError::from_io(ctx("size"), e))?;
    let detected = if is_blockdev {
        logical_block_size(&file)
    } else {
        None
    };
    let mut bs = block_size.or(detected).unwrap_or(512);
    let mut file = file;
    if o_direct && !direct_io_accepts(&file, bs, size) {
        if block_size.is_none() && direct_io_accepts(&file, 4096, size) {
            bs = 4096;
        } else {
            eprintln!(
                "uring bdev: O_DIRECT refuses {bs}-byte I/O on '{filename}'; using buffered I/O"
            );
            file = open_file(filename, false).map_err(|e| BdevError::from_io(ctx("open"), e))?;
            o_direct = false;
        }
    }
    if !o_direct {
        eprintln!("uring bdev: '{filename}' does not support O_DIRECT; using buffered I/O");
    }
    Ok(Opened {
        file,
        o_direct,
        block_size: bs,
        size,
        is_blockdev,
    })
}

impl UringBdev {
    /// Whether the file was opened with O_DIRECT.
    pub fn o_direct(&self) -> bool {
        self.o_direct
    }

    /// Backing path.
    pub fn filename(&self) -> &str {
        &self.filename
    }
}

impl Bdev for UringBdev {
    fn core(&self) -> &BdevCore {
        &self.core
    }

    fn io_type_supported(&self, _io_type: IoType) -> bool {
        true
    }

    fn create_channel(&self, completer: Completer) -> Result<Box<dyn ModuleChannel>> {
        if reactor::try_current().is_none() {
            return Err(BdevError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "uring bdev '{}': I/O channels must be created on a reactor",
                    self.core.name()
                ),
            ));
        }
        let shared = Rc::new_cyclic(|me| UringShared {
            me: me.clone(),
            ring: reactor::ring(),
            file: self.file.clone(),
            block_size: u64::from(self.core.block_size()),
            completer,
            ops: RefCell::new(OpSlab {
                ops: Vec::new(),
                free: Vec::new(),
            }),
            backlog: RefCell::new(VecDeque::new()),
            zero_range_ok: self.zero_range_ok.clone(),
        });
        Ok(Box::new(UringChannel { shared }))
    }

    fn driver_specific(&self) -> Option<(&'static str, Value)> {
        Some((
            "uring",
            json!({ "filename": self.filename, "o_direct": self.o_direct }),
        ))
    }

    fn write_config_json(&self) -> Option<Value> {
        let mut params = json!({
            "name": self.core.name(),
            "filename": self.filename,
            "uuid": self.core.uuid().to_string(),
        });
        if let Some(bs) = self.block_size_given {
            params["block_size"] = json!(bs);
        }
        Some(json!({ "method": "bdev_uring_create", "params": params }))
    }
}

/// Largest byte count of one ring op; longer transfers continue in further ops.
const MAX_OP_BYTES: usize = 1 << 30;

struct OpEntry {
    io: ModuleIo,
    /// Bytes of a read/write already done (short transfers are resubmitted).
    done_bytes: usize,
    /// A write_zeroes retried as punch-hole.
    punch_fallback: bool,
}

struct OpSlab {
    ops: Vec<Option<OpEntry>>,
    free: Vec<u32>,
}

/// State shared by a channel and its in-flight ring ops. The ring holds an `Rc` of it per
/// op (the op's completion handler), so the I/Os and their buffers outlive the channel
/// until their CQEs arrive.
struct UringShared {
    me: Weak<UringShared>,
    ring: reactor::Ring,
    file: Arc<File>,
    block_size: u64,
    completer: Completer,
    ops: RefCell<OpSlab>,
    /// Ops the ring refused (`max_in_flight` reached), retried from `poll`.
    backlog: RefCell<VecDeque<u32>>,
    zero_range_ok: Arc<AtomicBool>,
}

const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

impl UringShared {
    /// The ring op for slab entry `idx` in its current state.
    fn op_for(&self, idx: u32) -> Option<Op> {
        let fd = Fd::Raw(self.file.as_raw_fd());
        let bs = self.block_size;
        let zero_ok = self.zero_range_ok.load(Ordering::Relaxed);
        let mut slab = self.ops.borrow_mut();
        let e = slab.ops.get_mut(idx as usize)?.as_mut()?;
        let offset = e.io.offset_blocks() * bs;
        let len = e.io.num_blocks() * bs;
        Some(match e.io.io_type() {
            IoType::Read | IoType::Write => {
                let (ptr, total) = e.io.raw_buf();
                let n = (total - e.done_bytes).min(MAX_OP_BYTES);
                // SAFETY: done_bytes < total, so the range stays inside the I/O's buffer,
                // which its ModuleIo owns (or borrows from its parent) and which stays in
                // this slab until the op's CQE reaches `complete` below.
                let region = unsafe { RawRegion::new(ptr.add(e.done_bytes), n) };
                let offset = offset + e.done_bytes as u64;
                if e.io.io_type() == IoType::Read {
                    Op::ReadRaw { fd, offset, region }
                } else {
                    Op::WriteRaw { fd, offset, region }
                }
            }
            IoType::Flush => Op::Fsync { fd, datasync: true },
            IoType::Unmap => Op::Fallocate {
                fd,
                mode: PUNCH,
                offset,
                len,
            },
            IoType::WriteZeroes => {
                let mode = if e.punch_fallback || !zero_ok {
                    PUNCH
                } else {
                    ZERO
                };
                Op::Fallocate {
                    fd,
                    mode,
                    offset,
                    len,
                }
            }
            IoType::Reset => Op::Nop,
        })
    }

    /// Submits entry `idx` to the ring, or parks it in the backlog if the ring is full.
    fn issue(self: &Rc<Self>, idx: u32) {
        let Some(op) = self.op_for(idx) else { return };
        let handler: Rc<dyn CompletionHandler> = self.clone();
        if self
            .ring
            .submit(op, OnComplete::handler(handler, u64::from(idx)))
            .is_err()
        {
            self.backlog.borrow_mut().push_back(idx);
        }
    }

    fn on_cqe(self: &Rc<Self>, idx: u32, res: i32) {
        let mut slab = self.ops.borrow_mut();
        let Some(entry) = slab.ops.get_mut(idx as usize).and_then(|e| e.as_mut()) else {
            return;
        };
        let io_type = entry.io.io_type();
        if res > 0 && io_type.has_data() {
            entry.done_bytes += res as usize;
            if entry.done_bytes < entry.io.len_bytes() {
                drop(slab);
                return self.issue(idx);
            }
        }
        if io_type == IoType::WriteZeroes
            && (res == -libc::EOPNOTSUPP || res == -libc::EINVAL)
            && !entry.punch_fallback
        {
            entry.punch_fallback = true;
            self.zero_range_ok.store(false, Ordering::Relaxed);
            drop(slab);
            return self.issue(idx);
        }
        let Some(entry) = slab.ops.get_mut(idx as usize).and_then(Option::take) else {
            return;
        };
        slab.free.push(idx);
        drop(slab);
        let status = if res < 0 {
            IoStatus::Failed(-res)
        } else if io_type.has_data() && entry.done_bytes < entry.io.len_bytes() {
            // Transfer ended early (EOF: the file shrank under us).
            IoStatus::Failed(libc::EIO)
        } else {
            IoStatus::Success
        };
        self.completer.complete(entry.io, status);
    }
}

/// One handler serves every op of a channel; the tag is the slab index.
impl CompletionHandler for UringShared {
    fn complete(&self, tag: u64, completion: Completion) {
        // The ring holds an Rc of us for this op, so the upgrade succeeds; resubmission
        // (short transfers, fallbacks) needs the Rc.
        if let Some(me) = self.me.upgrade() {
            me.on_cqe(tag as u32, completion.result);
        }
    }
}

struct UringChannel {
    shared: Rc<UringShared>,
}

impl ModuleChannel for UringChannel {
    fn submit(&mut self, io: ModuleIo) {
        if io.io_type() == IoType::Reset {
            // The generic layer holds a reset until the channel has drained.
            self.shared.completer.complete(io, IoStatus::Success);
            return;
        }
        let entry = OpEntry {
            io,
            done_bytes: 0,
            punch_fallback: false,
        };
        let idx = {
            let mut slab = self.shared.ops.borrow_mut();
            match slab.free.pop() {
                Some(i) => {
                    slab.ops[i as usize] = Some(entry);
                    i
                }
                None => {
                    slab.ops.push(Some(entry));
                    (slab.ops.len() - 1) as u32
                }
            }
        };
        if self.shared.backlog.borrow().is_empty() {
            self.shared.issue(idx);
        } else {
            self.shared.backlog.borrow_mut().push_back(idx);
        }
    }

    fn poll(&mut self) -> usize {
        let mut n = 0;
        while n < 256 {
            let Some(idx) = self.shared.backlog.borrow_mut().pop_front() else {
                break;
            };
            let before = self.shared.backlog.borrow().len();
            self.shared.issue(idx);
            if self.shared.backlog.borrow().len() > before {
                // Still full: it went back to the end; keep FIFO order by rotating it first.
                if let Some(i) = self.shared.backlog.borrow_mut().pop_back() {
                    self.shared.backlog.borrow_mut().push_front(i);
                }
                break;
            }
            n += 1;
        }
        n
    }

    fn nr_inflight(&self) -> usize {
        let slab = self.shared.ops.borrow();
        slab.ops.len() - slab.free.len()
    }
}

/// Creates and registers a uring bdev on `filename`.
///
/// Errors: the OS error of open/stat; `EINVAL` if the file is smaller than one block or the
/// block size is bad; `EEXIST` for a taken name.
pub fn create(opts: UringOpts) -> Result<Arc<UringBdev>> {
    create_with(opts, open_file)
}

fn create_with(opts: UringOpts, opener: Opener) -> Result<Arc<UringBdev>> {
    let o = open_backing(&opts.filename, opts.block_size, opener)?;
    let core = BdevCore::new(BdevCoreOpts {
        name: opts.name,
        aliases: Vec::new(),
        uuid: opts.uuid,
        product_name: "URING bdev",
        module_name: MODULE_NAME,
        block_size: o.block_size,
        num_blocks: o.size / u64::from(o.block_size),
        optimal_io_boundary: 0,
        write_cache: true,
    })?;
    let bdev = Arc::new(UringBdev {
        core,
        file: Arc::new(o.file),
        filename: opts.filename,
        o_direct: o.o_direct,
        block_size_given: opts.block_size,
        is_blockdev: o.is_blockdev,
        zero_range_ok: Arc::new(AtomicBool::new(true)),
    });
    registry().register(bdev.clone())?;
    let mut l = URING_BDEVS.lock().unwrap_or_else(|e| e.into_inner());
    l.retain(|w| w.strong_count() > 0);
    l.push(Arc::downgrade(&bdev));
    Ok(bdev)
}

fn lookup_uring(name: &str) -> Result<Arc<dyn Bdev>> {
    match registry().lookup(name) {
        Some(b) if b.core().module_name() == MODULE_NAME => Ok(b),
        _ => Err(BdevError::new(
            ErrorKind::NotFound,
            format!("no uring bdev named '{name}'"),
        )),
    }
}

/// Deletes (hot-removes) the uring bdev `name`. Errors: `ENODEV`.
pub fn delete(name: &str) -> Result<()> {
    lookup_uring(name)?;
    registry().unregister(name).map(|_| ())
}

/// Re-reads the backing size of the uring bdev `name` and, if it changed, resizes the bdev
/// and sends a resize event to open descriptors. Returns the new number of blocks.
///
/// Errors: `ENODEV`; the OS error of stat; `EBUSY` if it shrank while open.
pub fn rescan(name: &str) -> Result<u64> {
    let uring = registry_uring(name)?;
    let core = uring.core();
    let size = size_bytes(&uring.file, uring.is_blockdev)
        .map_err(|e| BdevError::from_io(format!("uring bdev '{name}': size"), e))?;
    let blocks = size / u64::from(core.block_size());
    if blocks != core.num_blocks() {
        core.notify_resize(blocks)?;
    }
    Ok(blocks)
}

static URING_BDEVS: std::sync::Mutex<Vec<std::sync::Weak<UringBdev>>> =
    std::sync::Mutex::new(Vec::new());

fn registry_uring(name: &str) -> Result<Arc<UringBdev>> {
    let l = URING_BDEVS.lock().unwrap_or_else(|e| e.into_inner());
    l.iter()
        .filter_map(std::sync::Weak::upgrade)
        .find(|b| b.core.name() == name && b.core.lock().registered)
        .ok_or_else(|| BdevError::new(ErrorKind::NotFound, format!("no uring bdev named '{name}'")))
}

#[cfg(test)]
mod tests;

/// The uring module.
pub struct UringModule;

impl BdevModule for UringModule {
    fn name(&self) -> &'static str {
        MODULE_NAME
    }
}
