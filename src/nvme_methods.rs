//! Registers the `bdev_nvme_*` methods (owned by the `nvme` crate: the NVMe/TCP initiator
//! and its bdev module) in the RPC registry. Their bdevs (`<name>n<nsid>`) join the bdev
//! registry, so they are announced, listed and usable like any other bdev (a thin pool's data
//! device included); the controllers are saved in the "bdev" subsystem before every bdev.

use reactor::RuntimeHandle;
use rpc::{Registry, StateMask};
use serde_json::Value;

use crate::methods::bdev_error;

/// Registers every `bdev_nvme_*` method; the initiator's reactors are `runtime`'s.
pub fn register_nvme(registry: &Registry, runtime: RuntimeHandle) {
    nvme::set_runtime(runtime);
    for (name, handler) in nvme::rpc_methods() {
        registry.register(
            name,
            StateMask::RUNTIME,
            "NVMe/TCP initiator method (SPDK parameters)",
            move |p, resp| {
                handler(
                    p.unwrap_or(Value::Null),
                    Box::new(move |r| resp.send(r.map_err(|e| bdev_error(&e)))),
                );
            },
        );
    }
}
