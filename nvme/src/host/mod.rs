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
use std::sync::atomic::{AtomicU64, Ordering};

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

/// Counters of one controller's queues (all reactors), for `bdev_nvme_get_controllers` and
/// tests. Relaxed atomics: one increment per PDU on the reactor that handles it.
#[derive(Debug, Default)]
pub struct HostStats {
    /// Commands sent (all queues, including Connect and Keep Alive).
    pub nr_commands: AtomicU64,
    /// Commands sent with in-capsule data.
    pub nr_in_capsule: AtomicU64,
    /// R2T PDUs received.
    pub nr_r2t: AtomicU64,
    /// H2CData PDUs sent.
    pub nr_h2c_data: AtomicU64,
    /// C2HData PDUs received.
    pub nr_c2h_data: AtomicU64,
    /// Keep Alive commands completed.
    pub nr_keep_alive: AtomicU64,
    /// Connections that failed (lost, refused, protocol errors).
    pub nr_connection_failures: AtomicU64,
    /// Protocol errors (the peer was disconnected for breaking the rules).
    pub nr_protocol_errors: AtomicU64,
    /// Successful admin (re)connects.
    pub nr_connects: AtomicU64,
}

impl HostStats {
    /// Adds one to `c`.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters as JSON.
    pub fn json(&self) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "nr_commands": g(&self.nr_commands),
            "nr_in_capsule": g(&self.nr_in_capsule),
            "nr_r2t": g(&self.nr_r2t),
            "nr_h2c_data": g(&self.nr_h2c_data),
            "nr_c2h_data": g(&self.nr_c2h_data),
            "nr_keep_alive": g(&self.nr_keep_alive),
            "nr_connection_failures": g(&self.nr_connection_failures),
            "nr_protocol_errors": g(&self.nr_protocol_errors),
            "nr_connects": g(&self.nr_connects),
        })
    }
}
