//! Typed errors of the `pdata` crate: an [`ErrorKind`] to match on, a context string that names
//! the block / tree / operation, and `errno()` for RPC and NVMe status mapping.
//!
//! Operating errors (ENOSPC, EIO, corrupt metadata, bad input) are values of this type;
//! programmer errors are assertions (STYLE rule 8).

use std::fmt;

/// What went wrong, coarse enough to match on.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The underlying block device failed (read, write or flush).
    Io,
    /// A block's checksum does not match its contents (kernel -EILSEQ).
    Checksum,
    /// A block's self-recorded block number differs from its location (kernel -ENOTBLK).
    BlockNr,
    /// The superblock magic is wrong.
    BadMagic,
    /// A structural invariant of an on-disk structure is broken (node header, key order, ...).
    Corrupt,
    /// A buffer is too short for the structure being decoded.
    Truncated,
    /// The superblock has incompatible (or, for read-write open, compat-ro) feature bits.
    Incompatible,
    /// The pool was formatted with another data block size.
    DataBlockSizeMismatch,
    /// Out of space (data or metadata).
    NoSpace,
    /// The object already exists (e.g. a thin device id).
    Exists,
    /// The object does not exist (e.g. a thin device id, a key).
    NotFound,
    /// Invalid argument (bad id, shrinking resize, transaction id mismatch, ...).
    InvalidArgument,
    /// The resource is busy (a metadata snapshot is already held).
    Busy,
    /// A non-blocking operation needs a metadata block that is not cached.
    WouldBlock,
    /// An internal limit was hit (B-tree depth, recursion queue, snapshot time wrap).
    Limit,
    /// The metadata is latched read-only after a failure until it is reopened.
    ReadOnly,
}

impl ErrorKind {
    /// The Linux errno this kind maps to (positive value).
    pub fn errno(self) -> i32 {
        match self {
            ErrorKind::Io => 5,                     // EIO
            ErrorKind::Checksum => 84,              // EILSEQ
            ErrorKind::BlockNr => 15,               // ENOTBLK
            ErrorKind::BadMagic => 22,              // EINVAL
            ErrorKind::Corrupt => 117,              // EUCLEAN
            ErrorKind::Truncated => 117,            // EUCLEAN
            ErrorKind::Incompatible => 22,          // EINVAL
            ErrorKind::DataBlockSizeMismatch => 22, // EINVAL
            ErrorKind::NoSpace => 28,               // ENOSPC
            ErrorKind::Exists => 17,                // EEXIST
            ErrorKind::NotFound => 61,              // ENODATA
            ErrorKind::InvalidArgument => 22,       // EINVAL
            ErrorKind::Busy => 16,                  // EBUSY
            ErrorKind::WouldBlock => 11,            // EWOULDBLOCK
            ErrorKind::Limit => 12,                 // ENOMEM
            ErrorKind::ReadOnly => 30,              // EROFS
        }
    }
}

/// A `pdata` error: kind, human context and an optional I/O source.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    context: String,
    source: Option<std::io::Error>,
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error of `kind` with `context` (what was being done, which block, ...).
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Error {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// An I/O error with its source.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error {
            kind: ErrorKind::Io,
            context: context.into(),
            source: Some(source),
        }
    }

    /// The kind to match on.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The context message.
    pub fn context(&self) -> &str {
        &self.context
    }

    /// Positive Linux errno for this error.
    pub fn errno(&self) -> i32 {
        self.kind.errno()
    }

    /// Prefix more context (outer operation) to this error.
    pub fn with_context(mut self, outer: impl fmt::Display) -> Error {
        self.context = format!("{outer}: {}", self.context);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.context)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Shorthand: `Err(Error::new(kind, msg))`.
pub(crate) fn err<T>(kind: ErrorKind, msg: impl Into<String>) -> Result<T> {
    Err(Error::new(kind, msg))
}
