//! Built-in methods: `spdk_get_version`, `rpc_get_methods`, `framework_start_init`,
//! `framework_wait_init`, `framework_get_subsystems`, `framework_get_config`, `save_config`,
//! `notify_get_types`, `notify_get_notifications`. Methods that need the reactors
//! (`framework_get_reactors`) are registered by `thind`.

use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::Subsystems;
use crate::jsonrpc::RpcError;
use crate::notify::Notifier;
use crate::registry::{parse_params, Registry, Responder, StateMask};

/// Moves the application from STARTUP to RUNTIME (creates what `--wait-for-rpc` deferred).
pub type StartInit = Box<dyn Fn() -> Result<(), RpcError> + Send + Sync>;

/// What the built-in methods share.
pub struct Framework {
    /// The method table.
    pub registry: Arc<Registry>,
    /// Config writers per subsystem.
    pub subsystems: Arc<Subsystems>,
    /// Notifications.
    pub notifier: Arc<Notifier>,
    start_init: StartInit,
    waiters: Mutex<Vec<Responder>>,
}

impl std::fmt::Debug for Framework {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Framework").finish_non_exhaustive()
    }
}

/// The version string `spdk_get_version` reports.
pub const VERSION: &str = concat!("thinbdev v", env!("CARGO_PKG_VERSION"));

impl Framework {
    /// Creates the framework and registers the built-in methods on `registry`.
    pub fn install(
        registry: Arc<Registry>,
        subsystems: Arc<Subsystems>,
        notifier: Arc<Notifier>,
        start_init: StartInit,
    ) -> Arc<Self> {
        let fw = Arc::new(Self {
            registry: registry.clone(),
            subsystems,
            notifier,
            start_init,
            waiters: Mutex::new(Vec::new()),
        });
        let r = &registry;
        r.register_sync(
            "spdk_get_version",
            StateMask::ALWAYS,
            "Get the version",
            |p| {
                no_params(p)?;
                let major: u32 = env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap_or(0);
                let minor: u32 = env!("CARGO_PKG_VERSION_MINOR").parse().unwrap_or(0);
                let patch: u32 = env!("CARGO_PKG_VERSION_PATCH").parse().unwrap_or(0);
                Ok(json!({ "version": VERSION,
                "fields": { "major": major, "minor": minor, "patch": patch, "suffix": "" } }))
            },
        );
        let f = fw.clone();
        r.register_sync(
            "rpc_get_methods",
            StateMask::ALWAYS,
            "List RPC methods",
            move |p| {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct P {
                    #[serde(default)]
                    current: bool,
                    #[serde(default)]
                    include_aliases: bool,
                }
                let p: P = parse_params(p)?;
                Ok(json!(f.registry.method_names(p.current, p.include_aliases)))
            },
        );
        let f = fw.clone();
        r.register_sync(
            "framework_start_init",
            StateMask::STARTUP,
            "Start initialization of subsystems (after --wait-for-rpc)",
            move |p| {
                no_params(p)?;
                f.start()?;
                Ok(json!(true))
            },
        );
        let f = fw.clone();
        r.register(
            "framework_wait_init",
            StateMask::ALWAYS,
            "Block until subsystems have been initialized",
            move |p, resp| {
                if let Err(e) = no_params(p) {
                    return resp.err(e);
                }
                let mut waiters = f.waiters.lock().unwrap_or_else(|e| e.into_inner());
                if f.registry.state() == StateMask::RUNTIME {
                    drop(waiters);
                    resp.ok(json!(true));
                } else {
                    waiters.push(resp);
                }
            },
        );
        let f = fw.clone();
        r.register_sync(
            "framework_get_subsystems",
            StateMask::ALWAYS,
            "List subsystems and their dependencies",
            move |p| f.subsystems.rpc_get_subsystems(p),
        );
        let f = fw.clone();
        r.register_sync(
            "framework_get_config",
            StateMask::RUNTIME,
            "Get the configuration of one subsystem",
            move |p| f.subsystems.rpc_get_config(p),
        );
        let f = fw.clone();
        r.register_sync(
            "save_config",
            StateMask::RUNTIME,
            "Get the whole configuration",
            move |p| {
                no_params(p)?;
                Ok(f.subsystems.save())
            },
        );
        let f = fw.clone();
        r.register_sync(
            "notify_get_types",
            StateMask::ALWAYS,
            "List notification types",
            move |p| f.notifier.rpc_get_types(p),
        );
        let f = fw.clone();
        r.register_sync(
            "notify_get_notifications",
            StateMask::ALWAYS,
            "Get notifications (params: id, max)",
            move |p| f.notifier.rpc_get_notifications(p),
        );
        fw
    }

    /// Runs the start-init hook once and moves to RUNTIME, answering `framework_wait_init`
    /// waiters. Used by `framework_start_init` and by `thind` when not waiting for RPC.
    pub fn start(&self) -> Result<(), RpcError> {
        if self.registry.state() == StateMask::RUNTIME {
            return Ok(());
        }
        (self.start_init)()?;
        self.registry.set_state(StateMask::RUNTIME);
        let waiters = std::mem::take(&mut *self.waiters.lock().unwrap_or_else(|e| e.into_inner()));
        for w in waiters {
            w.ok(json!(true));
        }
        Ok(())
    }
}

/// Refuses any params (methods that take none).
pub fn no_params(p: Option<Value>) -> Result<(), RpcError> {
    match p {
        None => Ok(()),
        Some(Value::Object(m)) if m.is_empty() => Ok(()),
        Some(Value::Object(m)) => Err(RpcError::invalid_params(format!(
            "Invalid parameters: this method takes none, got '{}'",
            m.keys().next().map(String::as_str).unwrap_or("")
        ))),
        Some(_) => Err(RpcError::invalid_params(
            "Invalid parameters: this method takes none",
        )),
    }
}
