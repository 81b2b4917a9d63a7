//! NVMe-oF/TCP target.
//!
//! Ownership: the [`subsystem::Target`] (transport, subsystems, namespaces, hosts,
//! listeners) is control-path state behind a mutex, changed by the `nvmf_*` RPCs
//! ([`rpc_methods`]). Listening sockets are polled by acceptor pollers on reactor 0;
//! every accepted connection becomes a [`tcp::qpair::Qpair`] owned by one reactor
//! (round-robin over the reactors), polled by that reactor's poll group
//! ([`tcp::group`]: one poller for all its qpairs), with bdev I/O submitted on that
//! reactor's channel. A controller ([`ctrlr::Ctrlr`]) is shared by its admin and I/O
//! qpairs; teardown (keep-alive expiry, host removal, listener removal, subsystem
//! deletion) is a flag plus a wake-up message to each affected qpair's reactor.

pub mod ctrlr;
mod ctrlr_bdev;
pub mod discovery;
pub mod error;
pub mod rpc;
pub mod spec;
pub mod subsystem;
pub mod tcp;

use std::sync::{Mutex, OnceLock};

use reactor::RuntimeHandle;

pub use error::{ErrorKind, NvmfError};
pub use rpc::{config_json, rpc_methods, shutdown, NvmfRpcError, NvmfRpcHandler};

static RUNTIME: OnceLock<Mutex<Option<RuntimeHandle>>> = OnceLock::new();

/// Tells the target which reactor runtime to use when an RPC arrives off the reactors
/// (config loading at start-up). Handlers running on a reactor find it themselves.
pub fn set_runtime(handle: RuntimeHandle) {
    *RUNTIME
        .get_or_init(|| Mutex::new(None))
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(handle);
}

/// The runtime: the current reactor's, else the one given to [`set_runtime`].
pub(crate) fn runtime() -> Option<RuntimeHandle> {
    if reactor::try_current().is_some() {
        return Some(reactor::runtime_handle());
    }
    RUNTIME
        .get()?
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

static TRACE: OnceLock<bool> = OnceLock::new();

/// True if `NVMF_TRACE` is set: state transitions go to stderr.
pub fn trace_enabled() -> bool {
    *TRACE.get_or_init(|| std::env::var_os("NVMF_TRACE").is_some())
}

/// Traces a state transition or protocol event when `NVMF_TRACE` is set.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)*) => {
        if $crate::trace_enabled() {
            eprintln!("nvmf: {}", format_args!($($arg)*));
        }
    };
}
