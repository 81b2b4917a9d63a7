//! The NVMe/TCP host (initiator), SPDK's `lib/nvme` for TCP.
//!
//! - [`qpair`]: one queue pair (TCP connection), owned by one reactor, connection setup as a
//!   polled state machine, commands with CIDs, R2T/H2CData, C2HData, digests.
//! - [`ctrlr`]: a controller: the admin queue on the admin reactor (enable, identify,
//!   keep-alive, reconnect with back-off) and the shared state I/O queues read.
//! - [`ioq`]: the per-reactor I/O queue of a controller: splits bdev I/O into NVMe
//!   commands (MDTS, NLB and DSM limits), queues I/O while disconnected, fails it per policy.
//!
//! Ownership: a [`ctrlr::Ctrlr`] is `Send + Sync` (atomics plus a control-path mutex); the
//! admin queue state lives only on the admin reactor; each I/O queue only on its reactor.
//! Reactors learn about controller state changes by reading the atomics when woken by a
//! message.

pub mod ctrlr;
pub mod ioq;
pub mod qpair;
pub mod sock;

use std::fmt;

/// An error of the host: errno plus a message that says what failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostError {
    errno: i32,
    msg: String,
}

impl HostError {
    /// A new error.
    pub fn new(errno: i32, msg: impl Into<String>) -> HostError {
        HostError {
            errno,
            msg: msg.into(),
        }
    }

    /// An OS error while doing `what`.
    pub fn from_io(what: impl Into<String>, e: std::io::Error) -> HostError {
        HostError {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            msg: format!("{}: {e}", what.into()),
        }
    }

    /// No command slot free.
    pub fn busy(msg: impl Into<String>) -> HostError {
        HostError::new(libc::EBUSY, msg)
    }

    /// Positive errno.
    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.msg
    }

    /// As a bdev error (for RPC answers).
    pub fn to_bdev(&self) -> bdev::BdevError {
        let kind = match self.errno {
            libc::EINVAL => bdev::ErrorKind::InvalidArgument,
            libc::ENODEV => bdev::ErrorKind::NotFound,
            libc::EEXIST => bdev::ErrorKind::AlreadyExists,
            e => bdev::ErrorKind::Io(e),
        };
        bdev::BdevError::new(kind, self.msg.clone())
    }
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for HostError {}
