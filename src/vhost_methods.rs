//! Registers the vhost target's RPC methods (`vhost_create_blk_controller`,
//! `vhost_get_controllers`, `vhost_delete_controller`) and its `save_config` subsystem.
//!
//! Wiring in `main.rs` (owned by the integrator):
//! - `mod vhost_methods;`
//! - before the registry is used: `vhost::set_socket_dir(&args.vhost_sock_dir);`
//! - after `methods::register_subsystems(&subsystems)`: `vhost_methods::register_subsystem(&subsystems);`
//! - after `Runtime::start` (the handlers need the runtime when called off the reactors, as
//!   `--json` loading does): `vhost_methods::register_vhost(&registry, runtime.handle());`
//!   — before `load_config`, so a saved config with controllers loads.
//! - in `shutdown`, before `bdev::fini_modules()`: `vhost::shutdown();`

use reactor::RuntimeHandle;
use rpc::config::Subsystems;
use rpc::{Registry, Responder, RpcError, StateMask};
use serde_json::Value;

/// Registers every `vhost_*` method on `registry` (runtime state only, as in SPDK).
pub fn register_vhost(registry: &Registry, runtime: RuntimeHandle) {
    vhost::set_runtime(runtime);
    for (name, handler) in vhost::rpc_methods() {
        registry.register(
            name,
            StateMask::RUNTIME,
            "vhost method (SPDK parameters)",
            move |params: Option<Value>, resp: Responder| {
                handler(
                    params.unwrap_or(Value::Null),
                    Box::new(move |r| resp.send(r.map_err(|e| RpcError::new(e.code, e.message)))),
                );
            },
        );
    }
}

/// Registers the `vhost_blk` subsystem (after `bdev`) so `save_config` writes the controllers.
pub fn register_subsystem(subsystems: &Subsystems) {
    subsystems.register("vhost_blk", &["bdev"], vhost::config_json);
}
