//! vhost: the vhost-user-blk target. A controller exposes one bdev to a VM (QEMU's
//! `vhost-user-blk-pci`) over a Unix socket, the way SPDK's vhost target does.
//!
//! Ownership: the vhost-user protocol is parsed by the rust-vmm `vhost` crate; everything else
//! is ours and runs on reactors. Each controller has a home reactor (first core of its
//! cpumask) that watches its socket with io_uring PollAdd and handles one message per readable
//! event ([`device`]). Its queues are spread over the cpumask's reactors, each polled there
//! ([`vring`]) and turned into bdev I/O on that reactor's channel ([`blk`]). Guest memory is
//! mapped from the frontend's fds ([`memory`]); in-flight requests are tracked in the shared
//! INFLIGHT_SHMFD area ([`inflight`]) so a reconnecting frontend loses none.
//!
//! Virtio features: VERSION_1, SEG_MAX, SIZE_MAX, BLK_SIZE, TOPOLOGY, MQ, INDIRECT_DESC,
//! EVENT_IDX, FLUSH / DISCARD / WRITE_ZEROES when the bdev supports them, RO for read-only
//! controllers. Protocol features: MQ, REPLY_ACK, CONFIG, BACKEND_REQ (resize notification),
//! INFLIGHT_SHMFD, RESET_DEVICE, CONFIGURE_MEM_SLOTS (up to [`memory::MAX_MEM_SLOTS`]
//! regions added and removed one at a time). Split rings only (packed rings are refused).
//!
//! Control API for `thind`: [`rpc_methods`], [`set_socket_dir`], [`set_runtime`],
//! [`config_json`], [`shutdown`].

pub mod blk;
pub mod device;
pub mod inflight;
pub mod memory;
pub mod rpc;
pub mod vring;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

pub use rpc::{rpc_methods, VhostRpcError, VhostRpcHandler};

static DEBUG: AtomicBool = AtomicBool::new(false);

pub(crate) fn debug() -> bool {
    static FROM_ENV: OnceLock<bool> = OnceLock::new();
    DEBUG.load(Ordering::Relaxed)
        || *FROM_ENV.get_or_init(|| std::env::var_os("THIND_VHOST_DEBUG").is_some_and(|v| v == "1"))
}

/// Enables state-transition and session tracing on stderr (also on with the environment
/// variable `THIND_VHOST_DEBUG=1`).
pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

pub(crate) fn log(msg: &str) {
    eprintln!("vhost: {msg}");
}

struct Globals {
    socket_dir: PathBuf,
    runtime: Option<reactor::RuntimeHandle>,
    ctrlrs: BTreeMap<String, Arc<device::Shared>>,
}

fn globals() -> std::sync::MutexGuard<'static, Globals> {
    static G: OnceLock<Mutex<Globals>> = OnceLock::new();
    G.get_or_init(|| {
        Mutex::new(Globals {
            socket_dir: PathBuf::from("."),
            runtime: None,
            ctrlrs: BTreeMap::new(),
        })
    })
    .lock()
    .unwrap_or_else(|e| e.into_inner())
}

/// Sets the directory controller sockets are created in (`thind -S`).
pub fn set_socket_dir(path: impl Into<PathBuf>) {
    globals().socket_dir = path.into();
}

/// Gives the target the runtime its controllers run on. Needed when RPC handlers are called
/// off the reactors (config loading); handlers called on a reactor find it themselves.
pub fn set_runtime(rt: reactor::RuntimeHandle) {
    globals().runtime = Some(rt);
}

/// `save_config` entries: one `vhost_create_blk_controller` per controller (subsystem
/// `vhost_blk`, which depends on `bdev`).
pub fn config_json() -> Vec<serde_json::Value> {
    globals()
        .ctrlrs
        .values()
        .map(|s| {
            serde_json::json!({
                "method": "vhost_create_blk_controller",
                "params": {
                    "ctrlr": s.name,
                    "dev_name": s.bdev_name,
                    "cpumask": s.cpumask,
                    "readonly": s.readonly,
                    "transport": "vhost_user_blk",
                    "packed_ring": false,
                }
            })
        })
        .collect()
}

/// Closes every controller (sessions dropped, rings drained, sockets removed). Call from a
/// plain thread before the bdev modules are finished; waits up to 5 s per controller.
pub fn shutdown() {
    let all: Vec<Arc<device::Shared>> = {
        let mut g = globals();
        std::mem::take(&mut g.ctrlrs).into_values().collect()
    };
    for s in all {
        let (tx, rx) = std::sync::mpsc::channel();
        let id = s.id;
        s.runtime.send_msg(s.home(), move || {
            device::close(
                id,
                Box::new(move || {
                    let _ = tx.send(());
                }),
            );
        });
        let _ = rx.recv_timeout(std::time::Duration::from_secs(5));
        s.desc.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}
