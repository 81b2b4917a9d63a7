//! Control-path errors: a kind to match on, a message, and the errno RPC reports.

use std::fmt;

/// What went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad parameter (JSON-RPC -32602 when it comes from decoding).
    InvalidParams,
    /// Bad value (EINVAL).
    Invalid,
    /// No such object (ENODEV/ENOENT).
    NotFound,
    /// Already exists (EEXIST).
    Exists,
    /// No room (ENOSPC).
    NoSpace,
    /// Another errno.
    Errno(i32),
}

/// An nvmf control-path error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvmfError {
    kind: ErrorKind,
    message: String,
}

impl NvmfError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        NvmfError {
            kind,
            message: message.into(),
        }
    }
    /// Parameter decoding failed.
    pub fn invalid_params(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidParams, m)
    }
    /// EINVAL.
    pub fn invalid(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, m)
    }
    /// ENODEV.
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, m)
    }
    /// EEXIST.
    pub fn exists(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Exists, m)
    }
    /// ENOSPC.
    pub fn no_space(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::NoSpace, m)
    }
    /// Another errno (positive).
    pub fn errno(errno: i32, m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Errno(errno), m)
    }
    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
    /// Positive errno.
    pub fn to_errno(&self) -> i32 {
        match self.kind {
            ErrorKind::InvalidParams | ErrorKind::Invalid => libc::EINVAL,
            ErrorKind::NotFound => libc::ENODEV,
            ErrorKind::Exists => libc::EEXIST,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::Errno(e) => e,
        }
    }
}

impl fmt::Display for NvmfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for NvmfError {}
