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
fn bdev_error(e: &bdev::BdevError) -> RpcError {
    if e.kind() == bdev::ErrorKind::InvalidParams {
        RpcError::invalid_params(e.to_string())
    } else {
        RpcError::errno(e.errno(), e.to_string())
    }
}

/// Registers the bdev methods (`bdev_*_create/delete/resize/rescan`, `bdev_get_bdevs`,
/// `bdev_get_iostat`, `bdev_wait_for_examine`).
pub fn register_bdev(registry: &Registry, notifier: &Arc<Notifier>) {
    for (name, handler) in bdev::rpc_methods() {
        let notifier = notifier.clone();
        registry.register_sync(
            name,
            StateMask::RUNTIME,
            "bdev method (SPDK parameters)",
            move |p| {
                let before: Vec<String> = if name.ends_with("_create") || name.ends_with("_delete")
                {
                    bdev::registry()
                        .list()
                        .iter()
                        .map(|b| b.name().to_owned())
                        .collect()
                } else {
                    Vec::new()
                };
                let result = handler(p.unwrap_or(Value::Null)).map_err(|e| bdev_error(&e))?;
                if name.ends_with("_create") {
                    if let Some(created) = result.as_str() {
                        if !before.iter().any(|b| b == created) {
                            notifier.send("bdev_register", created);
                        }
                    }
                } else if name.ends_with("_delete") {
                    let after: Vec<String> = bdev::registry()
                        .list()
                        .iter()
                        .map(|b| b.name().to_owned())
                        .collect();
                    for gone in before.iter().filter(|b| !after.contains(b)) {
                        notifier.send("bdev_unregister", gone);
                    }
                }
                Ok(result)
            },
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
        let mut cfg = bdev::registry().config_json();
        cfg.push(json!({ "method": "bdev_wait_for_examine" }));
        cfg
    });
}

/// Registers the asynchronous `bdev_thin_*` methods and forwards the pools' events
/// (low water mark, out of data space, read-only) to the notification ring.
pub fn register_thin(registry: &Registry, notifier: &Arc<Notifier>) {
    for (name, handler) in bdev::thin::rpc::rpc_methods() {
        let notifier = notifier.clone();
        registry.register(
            name,
            StateMask::RUNTIME,
            "thin pool method (see README)",
            move |params, resp| {
                let notifier = notifier.clone();
                let creates = name == "bdev_thin_create" || name == "bdev_thin_snapshot";
                let deletes = name == "bdev_thin_delete";
                let target = params
                    .as_ref()
                    .and_then(|p| p.get("name"))
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                handler(
                    params.unwrap_or(Value::Null),
                    Box::new(move |r| {
                        if let Ok(v) = &r {
                            if creates {
                                if let Some(created) = v.as_str() {
                                    notifier.send("bdev_register", created);
                                }
                            } else if deletes {
                                if let Some(gone) = &target {
                                    notifier.send("bdev_unregister", gone);
                                }
                            }
                        }
                        resp.send(r.map_err(|e| bdev_error(&e)));
                    }),
                );
            },
        );
    }
    let notifier = notifier.clone();
    bdev::thin::subscribe(move |kind, pool| {
        notifier.send(kind, pool);
    });
}
