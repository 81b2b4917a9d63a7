//! The crate's error type. Operating errors (bad mask, unavailable core, ring setup failure,
//! a stopped runtime) are values; misuse (off-reactor calls, bad reactor ids) panics.

use std::fmt;
use std::io;

use crate::reactor::ReactorId;

/// Errors returned by the reactor crate.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A core mask string could not be parsed.
    BadCoreMask {
        /// The input as given.
        input: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A core in the mask does not exist or is not usable by this process.
    CoreUnavailable {
        /// The core number.
        core: usize,
    },
    /// A system call failed (ring setup, eventfd, thread spawn).
    Io {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// A [`crate::RuntimeOptions`] field is out of range.
    InvalidOption {
        /// The field.
        name: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// The runtime stopped before the request could run.
    Stopped,
    /// A reactor thread panicked.
    ReactorPanicked {
        /// The reactor whose thread panicked.
        id: ReactorId,
    },
}

impl Error {
    /// The errno that best describes this error (for RPC error codes).
    pub fn errno(&self) -> i32 {
        match self {
            Error::BadCoreMask { .. }
            | Error::CoreUnavailable { .. }
            | Error::InvalidOption { .. } => libc::EINVAL,
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Stopped => libc::ESHUTDOWN,
            Error::ReactorPanicked { .. } => libc::EIO,
        }
    }

    pub(crate) fn io(context: &'static str, source: io::Error) -> Self {
        Error::Io { context, source }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadCoreMask { input, reason } => {
                write!(f, "invalid core mask {input:?}: {reason}")
            }
            Error::CoreUnavailable { core } => {
                write!(f, "core {core} is not available to this process")
            }
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::InvalidOption { name, reason } => write!(f, "invalid {name}: {reason}"),
            Error::Stopped => write!(f, "the reactor runtime has stopped"),
            Error::ReactorPanicked { id } => write!(f, "reactor {id} panicked"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
