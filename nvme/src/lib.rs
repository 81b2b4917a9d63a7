//! NVMe protocol and the NVMe/TCP host (initiator) with its bdev module.
//!
//! - [`proto`]: the wire format (NVMe queue entries, constants, NVMe/TCP PDUs), shared with
//!   the target crate `nvmf`.
//! - [`host`]: the initiator: queue pairs over non-blocking TCP polled by reactors, the
//!   controller (admin queue, keep-alive, reconnect), per-reactor I/O queues.
//! - [`bdev`]: the `nvme` bdev module, one bdev `<name>n<nsid>` per namespace.
//! - [`rpc`]: `bdev_nvme_attach_controller`, `bdev_nvme_detach_controller`,
//!   `bdev_nvme_get_controllers`, `bdev_nvme_set_options`.
//!
//! Like SPDK's `module/bdev/nvme` over `lib/nvme`, the bdev layer knows nothing of NVMe: this
//! crate plugs into it as a module.

pub mod bdev;
pub mod host;
pub mod proto;
pub mod rpc;

use std::sync::{Arc, Mutex, OnceLock};

use reactor::RuntimeHandle;

pub use rpc::{config_json, rpc_methods, shutdown, NvmeRpcDone, NvmeRpcHandler};

static RUNTIME: OnceLock<Mutex<Option<RuntimeHandle>>> = OnceLock::new();

/// Tells the module which reactor runtime to use when an RPC arrives off the reactors
/// (config loading at start-up). Handlers running on a reactor find it themselves.
pub fn set_runtime(handle: RuntimeHandle) {
    register_module();
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

/// Registers the `nvme` bdev module once.
pub(crate) fn register_module() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = ::bdev::register_module(Arc::new(bdev::NvmeModule));
    });
}

/// Whether `NVME_TRACE` is set (state transitions to stderr).
pub(crate) fn trace_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("NVME_TRACE").is_some())
}

/// Traces to stderr when `NVME_TRACE` is set.
#[macro_export]
#[doc(hidden)]
macro_rules! trace {
    ($($arg:tt)*) => {
        if $crate::trace_enabled() {
            eprintln!("nvme: {}", format_args!($($arg)*));
        }
    };
}
