//! Registers the `nvmf_*` methods (owned by the `nvmf` crate) in the RPC registry and the
//! "nvmf" subsystem in `save_config`. To be called by thind once the reactors run:
//!
//! ```ignore
//! mod nvmf_methods;
//! // after Runtime::start, next to register_framework:
//! nvmf_methods::register_nvmf(&registry, &subsystems, handle.clone());
//! // on SIGTERM, before stopping the reactors:
//! nvmf::shutdown();
//! ```

use reactor::RuntimeHandle;
use rpc::config::Subsystems;
use rpc::{Registry, RpcError, StateMask};
use serde_json::Value;

/// Registers every `nvmf_*` method and the "nvmf" config writer (after "bdev").
pub fn register_nvmf(registry: &Registry, subsystems: &Subsystems, runtime: RuntimeHandle) {
    nvmf::set_runtime(runtime);
    for (name, handler) in nvmf::rpc_methods() {
        registry.register(
            name,
            StateMask::RUNTIME,
            "nvmf method (SPDK parameters)",
            move |params, resp| {
                handler(
                    params.unwrap_or(Value::Null),
                    Box::new(move |r| {
                        resp.send(r.map_err(|e| RpcError::new(e.code, e.message)));
                    }),
                );
            },
        );
    }
    subsystems.register("nvmf", &["bdev"], nvmf::config_json);
}
