//! `BdevError`: the one error type of the block-device layer (STYLE rule 7).
//!
//! An error is a small [`ErrorKind`] to match on, a context string naming the bdev and the
//! operation, and an optional OS source. [`BdevError::errno`] maps the kind to the positive
//! errno that RPC handlers return as `-errno` and that I/O completions carry.

use std::fmt;

/// What went wrong, coarse enough to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad parameter: out-of-range LBA, misaligned length, bad block size (`EINVAL`).
    InvalidArgument,
    /// RPC parameters that do not decode: missing, wrong-typed or unknown (`EINVAL`; JSON-RPC
    /// reports it as `-32602`).
    InvalidParams,
    /// No bdev (or module) with that name (`ENODEV`).
    NotFound,
    /// A bdev, alias or UUID with that name already exists (`EEXIST`).
    AlreadyExists,
    /// The bdev is claimed by another module, or opened for write by someone else (`EPERM`).
    Claimed,
    /// The operation needs no open descriptors, e.g. shrinking a bdev (`EBUSY`).
    Busy,
    /// The bdev does not support this I/O type (`ENOTSUP`).
    Unsupported,
    /// Out of request slots or memory (`ENOMEM`); retry after a completion.
    NoMemory,
    /// The bdev was removed (`ENODEV`).
    Removed,
    /// Underlying I/O failed; `errno` carries the OS code.
    Io(i32),
}

/// The block-device layer's error: kind + context + optional source.
#[derive(Debug)]
pub struct BdevError {
    kind: ErrorKind,
    context: String,
    source: Option<std::io::Error>,
}

impl BdevError {
    /// A new error of `kind` with a message that says exactly what was wrong.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        BdevError {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// An error caused by an OS error; the errno comes from `source`.
    pub fn from_io(context: impl Into<String>, source: std::io::Error) -> Self {
        let errno = source.raw_os_error().unwrap_or(libc::EIO);
        BdevError {
            kind: ErrorKind::Io(errno),
            context: context.into(),
            source: Some(source),
        }
    }

    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn invalid(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, context)
    }

    /// The kind to match on.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The context message (without the kind).
    pub fn context(&self) -> &str {
        &self.context
    }

    /// Positive errno for RPC (`-errno`) and I/O status.
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::InvalidArgument | ErrorKind::InvalidParams => libc::EINVAL,
            ErrorKind::NotFound | ErrorKind::Removed => libc::ENODEV,
            ErrorKind::AlreadyExists => libc::EEXIST,
            ErrorKind::Claimed => libc::EPERM,
            ErrorKind::Busy => libc::EBUSY,
            ErrorKind::Unsupported => libc::ENOTSUP,
            ErrorKind::NoMemory => libc::ENOMEM,
            ErrorKind::Io(errno) => errno,
        }
    }
}

impl fmt::Display for BdevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.context)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for BdevError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// Result alias for the crate.
pub type Result<T, E = BdevError> = std::result::Result<T, E>;
