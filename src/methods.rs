//! Adapts every crate's RPC handlers into the `rpc` registry and describes the subsystems
//! whose configuration `save_config` writes.

use std::sync::Arc;

use reactor::RuntimeHandle;
use rpc::config::Subsystems;
use rpc::framework::no_params;
use rpc::notify::Notifier;
use rpc::{Registry, RpcError, StateMask};
use serde_json::{json, Value};

/// Notification types thind sends.
pub const NOTIFY_TYPES: &[&str] = &[
    "bdev_register",
    "bdev_unregister",
    "thin_pool_low_water_mark",
    "thin_pool_out_of_data_space",
    "thin_pool_read_only",
];

/// Converts a bdev-layer error into SPDK's JSON-RPC error: parameter decoding failures are
/// `-32602`, everything else `-errno` with the layer's message.
pub(crate) fn bdev_error(e: &bdev::BdevError) -> RpcError {
    if e.kind() == bdev::ErrorKind::InvalidParams {
        RpcError::invalid_params(e.to_string())
    } else {
        RpcError::errno(e.errno(), e.to_string())
    }
}

/// Registers the bdev methods (`bdev_*_create/delete/resize/rescan`, `bdev_get_bdevs`,
/// `bdev_get_iostat`, `bdev_wait_for_examine`) and forwards every bdev registration and
/// unregistration (base bdevs, thin bdevs, those a reopened pool brings back) to the
/// notification ring.
pub fn register_bdev(registry: &Registry, notifier: &Arc<Notifier>) {
    let n = notifier.clone();
    bdev::registry().subscribe(move |event, name| {
        n.send(event, name);
    });
    for (name, handler) in bdev::rpc_methods() {
        registry.register_sync(
            name,
            StateMask::RUNTIME,
            "bdev method (SPDK parameters)",
            move |p| handler(p.unwrap_or(Value::Null)).map_err(|e| bdev_error(&e)),
        );
    }
    registry.register_sync(
        "bdev_wait_for_examine",
        StateMask::RUNTIME,
        "Wait until every bdev has been examined (immediate: examine is synchronous)",
        |p| {
            no_params(p)?;
            Ok(json!(true))
        },
    );
}

/// Registers `framework_get_reactors`.
pub fn register_framework(registry: &Registry, runtime: RuntimeHandle) {
    registry.register_sync(
        "framework_get_reactors",
        StateMask::RUNTIME,
        "Show reactors: core, busy/idle ticks, interrupt mode, CPU time",
        move |p| {
            no_params(p)?;
            let reactors: Vec<Value> = runtime
                .stats()
                .into_iter()
                .map(|s| {
                    json!({
                        "lcore": s.core,
                        "busy": s.busy_ticks,
                        "idle": s.idle_ticks,
                        "in_interrupt": s.interrupt_mode,
                        "cpu_time_us": u64::try_from(s.cpu_time.as_micros()).unwrap_or(u64::MAX),
                        "cpu_usage": s.cpu_usage(),
                        "lw_threads": [],
                    })
                })
                .collect();
            Ok(json!({ "tick_rate": bdev::tick_rate(), "reactors": reactors }))
        },
    );
}

/// Registers the subsystems in dependency order with their config writers.
pub fn register_subsystems(subsystems: &Subsystems) {
    subsystems.register("bdev", &[], || {
        // Remote controllers first: their namespaces may be a pool's data or metadata bdev.
        let mut cfg = nvme::config_json();
        cfg.extend(bdev::registry().config_json());
        cfg.push(json!({ "method": "bdev_wait_for_examine" }));
        cfg
    });
}

/// Registers the asynchronous `bdev_thin_*` methods and forwards the pools' events
/// (low water mark, out of data space, read-only) to the notification ring.
pub fn register_thin(registry: &Registry, notifier: &Arc<Notifier>) {
    for (name, handler) in bdev::thin::rpc::rpc_methods() {
        registry.register(
            name,
            StateMask::RUNTIME,
            "thin pool method (see README)",
            move |p, resp| {
                handler(
                    p.unwrap_or(Value::Null),
                    Box::new(move |r| resp.send(r.map_err(|e| bdev_error(&e)))),
                );
            },
        );
    }
    let notifier = notifier.clone();
    bdev::thin::subscribe(move |kind, pool| {
        notifier.send(kind, pool);
    });
}
