//! Ring operations: what an op is, what it owns, how it completes, and its lifecycle.
//!
//! An [`Op`] owns every resource the kernel touches (buffers, iovec arrays, socket
//! addresses) from submission until its CQE, even if the caller gives up on it
//! ([`crate::Ring::abandon`]). The [`Completion`] hands the op — and so its buffers — back.
//!
//! Lifecycle of a slab entry ([`OpState`]):
//!
//! ```text
//!   submit ──► Queued ──(SQE in SQ)──► Submitted ──(io_uring_enter)──► Waiting ──CQE──► Completed
//!                 │                        │                            │
//!                 └────────── abandon ─────┴────────────────────────────┴──► Abandoned ──CQE──► freed
//! ```
//!
//! `Completed` is transient: the entry leaves the slab before its callback runs, so a callback
//! may submit new ops. An `Abandoned` op keeps its resources — and its callback, which may own
//! the memory of a raw op — until its CQE, then drops both without calling the callback.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::rc::Rc;

use crate::buf::DmaBuf;
use crate::uring::FixedBuf;

/// A file descriptor for an op: a plain fd, or an index into the ring's registered files
/// ([`crate::Ring::register_files`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Fd {
    /// A plain file descriptor.
    Raw(RawFd),
    /// Index into the files registered with the current reactor's ring.
    Fixed(u32),
}

impl From<RawFd> for Fd {
    fn from(fd: RawFd) -> Self {
        Fd::Raw(fd)
    }
}

/// Memory owned by the caller, not by the op, for [`Op::ReadRaw`]/[`Op::WriteRaw`]: lets a
/// layer forward a sub-range of a buffer it does not own as a `DmaBuf` (split I/O, virtual
/// bdevs).
#[derive(Debug)]
pub struct RawRegion {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a RawRegion is only an address range; whoever created it promised (in `new`) that
// the memory stays valid and unaliased for the op's life, wherever the op is submitted.
unsafe impl Send for RawRegion {}

impl RawRegion {
    /// A region of `len` bytes at `ptr`.
    ///
    /// # Safety
    ///
    /// From submission until the op's completion callback runs — or, if the op is abandoned
    /// or cancelled at shutdown, until that callback is dropped (which happens at the op's
    /// CQE) — the memory must stay allocated, be valid for writes (`ReadRaw`) or reads
    /// (`WriteRaw`), and not be accessed by anything else. Keeping the memory's owner inside
    /// the callback satisfies this.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        RawRegion { ptr, len }
    }

    /// Start address.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if zero-length.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One ring operation and the resources it owns.
#[derive(Debug)]
#[non_exhaustive]
pub enum Op {
    /// Does nothing; completes with 0.
    Nop,
    /// `pread`: reads `buf.len()` bytes at `offset`. Result: bytes read.
    Read {
        /// File.
        fd: Fd,
        /// Byte offset.
        offset: u64,
        /// Destination; its length is the request size.
        buf: DmaBuf,
    },
    /// `pwrite`: writes `buf.len()` bytes at `offset`. Result: bytes written.
    Write {
        /// File.
        fd: Fd,
        /// Byte offset.
        offset: u64,
        /// Source.
        buf: DmaBuf,
    },
    /// `pread` into caller-owned memory (see [`RawRegion`]). Result: bytes read.
    ReadRaw {
        /// File.
        fd: Fd,
        /// Byte offset.
        offset: u64,
        /// Destination.
        region: RawRegion,
    },
    /// `pwrite` from caller-owned memory (see [`RawRegion`]). Result: bytes written.
    WriteRaw {
        /// File.
        fd: Fd,
        /// Byte offset.
        offset: u64,
        /// Source.
        region: RawRegion,
    },
    /// `pread` into a registered buffer (`IORING_OP_READ_FIXED`: no page pinning per I/O).
    /// Result: bytes read.
    ReadFixed {
        /// File.
        fd: Fd,
        /// Byte offset.
        offset: u64,
        /// Destination, from [`crate::Ring::alloc_fixed_buf`] of the same ring.
        buf: FixedBuf,
    },
    /// `pwrite` from a registered buffer. Result: bytes written.
    WriteFixed {
        /// File.
        fd: Fd,
        /// Byte offset.
        offset: u64,
        /// Source, from [`crate::Ring::alloc_fixed_buf`] of the same ring.
        buf: FixedBuf,
    },
    /// `preadv` into each buffer's length in turn. Result: total bytes read.
    Readv {
        /// File.
        fd: Fd,
        /// Byte offset.
        offset: u64,
        /// Destinations, at most [`MAX_IOVECS`].
        bufs: Vec<DmaBuf>,
    },
    /// `pwritev`. Result: total bytes written.
    Writev {
        /// File.
        fd: Fd,
        /// Byte offset.
        offset: u64,
        /// Sources, at most [`MAX_IOVECS`].
        bufs: Vec<DmaBuf>,
    },
    /// `fsync`, or `fdatasync` if `datasync`. Result: 0.
    Fsync {
        /// File.
        fd: Fd,
        /// Data only (`fdatasync`).
        datasync: bool,
    },
    /// `fallocate(fd, mode, offset, len)`; e.g. `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`
    /// for unmap. Result: 0.
    Fallocate {
        /// File.
        fd: Fd,
        /// `FALLOC_FL_*` flags.
        mode: i32,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// `recv` into `buf` (up to its length). Result: bytes received (0 = EOF).
    Recv {
        /// Socket.
        fd: Fd,
        /// Destination.
        buf: DmaBuf,
        /// `MSG_*` flags.
        flags: i32,
    },
    /// `send` of `buf`. Result: bytes sent.
    Send {
        /// Socket.
        fd: Fd,
        /// Source.
        buf: DmaBuf,
        /// `MSG_*` flags (`MSG_NOSIGNAL` is always added).
        flags: i32,
    },
    /// `accept4(fd, NULL, NULL, SOCK_CLOEXEC)`. Result: the new socket fd.
    Accept {
        /// Listening socket.
        fd: Fd,
    },
    /// `connect`. Result: 0.
    Connect {
        /// Socket.
        fd: Fd,
        /// Peer address.
        addr: SocketAddr,
    },
    /// One-shot `poll` for `events` (`POLLIN`, ...). Result: the returned events.
    PollAdd {
        /// File.
        fd: Fd,
        /// Poll mask.
        events: u32,
    },
    /// `close(fd)`. Result: 0.
    Close {
        /// File to close.
        fd: RawFd,
    },
}

/// Most buffers in one `Readv`/`Writev` (Linux `UIO_MAXIOV`).
pub const MAX_IOVECS: usize = 1024;

impl Op {
    /// Short name of the op kind (for traces and errors).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Nop => "nop",
            Op::Read { .. } => "read",
            Op::Write { .. } => "write",
            Op::ReadRaw { .. } => "read_raw",
            Op::ReadFixed { .. } => "read_fixed",
            Op::WriteFixed { .. } => "write_fixed",
            Op::WriteRaw { .. } => "write_raw",
            Op::Readv { .. } => "readv",
            Op::Writev { .. } => "writev",
            Op::Fsync { .. } => "fsync",
            Op::Fallocate { .. } => "fallocate",
            Op::Recv { .. } => "recv",
            Op::Send { .. } => "send",
            Op::Accept { .. } => "accept",
            Op::Connect { .. } => "connect",
            Op::PollAdd { .. } => "poll_add",
            Op::Close { .. } => "close",
        }
    }
}

/// A finished op: the kernel's result and the op with its resources.
#[derive(Debug)]
pub struct Completion {
    /// Raw CQE result: `>= 0` is the op's value (bytes, fd, events), `< 0` is `-errno`.
    pub result: i32,
    /// The op as submitted, buffers included.
    pub op: Op,
}

impl Completion {
    /// The result as `io::Result`: `Ok(value)` or the OS error.
    pub fn io_result(&self) -> io::Result<usize> {
        if self.result < 0 {
            Err(io::Error::from_raw_os_error(-self.result))
        } else {
            Ok(self.result as usize)
        }
    }

    /// The single buffer of a Read/Write/Recv/Send op, else None.
    pub fn into_buf(self) -> Option<DmaBuf> {
        match self.op {
            Op::Read { buf, .. } | Op::Write { buf, .. } => Some(buf),
            Op::Recv { buf, .. } | Op::Send { buf, .. } => Some(buf),
            _ => None,
        }
    }

    /// The registered buffer of a ReadFixed/WriteFixed op, else None.
    pub fn into_fixed_buf(self) -> Option<FixedBuf> {
        match self.op {
            Op::ReadFixed { buf, .. } | Op::WriteFixed { buf, .. } => Some(buf),
            _ => None,
        }
    }

    /// The buffers of a Readv/Writev op (or the single buffer of others), else empty.
    pub fn into_bufs(self) -> Vec<DmaBuf> {
        match self.op {
            Op::Readv { bufs, .. } | Op::Writev { bufs, .. } => bufs,
            op => Completion { result: 0, op }
                .into_buf()
                .into_iter()
                .collect(),
        }
    }
}

/// A completion sink that is shared by many ops and told apart by a tag — the
/// allocation-free way to complete I/O (one `Rc` clone per op, no box).
pub trait CompletionHandler {
    /// Called on the ring's reactor, from its loop, with the `tag` given at submission.
    fn complete(&self, tag: u64, completion: Completion);
}

/// What to do when an op completes.
pub enum OnComplete {
    /// Call a closure (allocates a box unless the closure captures nothing).
    Closure(Box<dyn FnOnce(Completion)>),
    /// Call a shared handler with a tag (no allocation).
    Handler(Rc<dyn CompletionHandler>, u64),
    /// Drop the completion (and its buffers).
    Ignore,
}

impl OnComplete {
    /// Wraps a closure.
    pub fn closure(f: impl FnOnce(Completion) + 'static) -> Self {
        OnComplete::Closure(Box::new(f))
    }

    /// A shared handler with a tag.
    pub fn handler(handler: Rc<dyn CompletionHandler>, tag: u64) -> Self {
        OnComplete::Handler(handler, tag)
    }

    pub(crate) fn call(self, completion: Completion) {
        match self {
            OnComplete::Closure(f) => f(completion),
            OnComplete::Handler(handler, tag) => handler.complete(tag, completion),
            OnComplete::Ignore => drop(completion),
        }
    }
}

impl fmt::Debug for OnComplete {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OnComplete::Closure(_) => f.write_str("OnComplete::Closure"),
            OnComplete::Handler(_, tag) => write!(f, "OnComplete::Handler(tag={tag})"),
            OnComplete::Ignore => f.write_str("OnComplete::Ignore"),
        }
    }
}

/// Identifies an in-flight op on one ring (slab index + generation, so a stale id never
/// matches a reused slot).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct OpId {
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

/// Where an op is in its life (see the module docs).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum OpState {
    /// In the slab, its SQE waiting for SQ space (the SQ was full).
    Queued,
    /// Its SQE is in the SQ, not yet passed to the kernel.
    Submitted,
    /// The kernel has it.
    Waiting,
    /// The caller gave up: resources are kept until the CQE, then dropped.
    Abandoned,
}
