//! Configuration as JSON: what `framework_get_subsystems` / `framework_get_config` (and so
//! `spdk-rpc save_config`) report, and the loader behind `thind --json`.
//!
//! A config is `{"subsystems":[{"subsystem":NAME,"config":[{"method":M,"params":P}, ...]}]}`,
//! where each entry is the RPC call that recreates one object; an entry may also be a batch
//! (a list of calls). Subsystems are listed after those they depend on, so loading them in
//! order recreates base bdevs before the pools on them and pools before their exports.

use std::sync::{Arc, RwLock};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::jsonrpc::RpcError;
use crate::registry::{parse_params, Registry, StateMask};

/// Produces the config entries of one subsystem (each `{"method", "params"}`).
pub type ConfigWriter = Arc<dyn Fn() -> Vec<Value> + Send + Sync>;

struct Subsystem {
    name: String,
    depends_on: Vec<String>,
    writer: ConfigWriter,
}

/// The subsystems in dependency order.
#[derive(Default)]
pub struct Subsystems {
    list: RwLock<Vec<Subsystem>>,
}

impl std::fmt::Debug for Subsystems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subsystems").finish_non_exhaustive()
    }
}

impl Subsystems {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a subsystem; every name in `depends_on` must already be registered.
    pub fn register(
        &self,
        name: &str,
        depends_on: &[&str],
        writer: impl Fn() -> Vec<Value> + Send + Sync + 'static,
    ) {
        let mut list = self.list.write().unwrap_or_else(|e| e.into_inner());
        for d in depends_on {
            assert!(
                list.iter().any(|s| s.name == *d),
                "subsystem {name} depends on unknown {d}"
            );
        }
        assert!(
            !list.iter().any(|s| s.name == name),
            "subsystem {name} registered twice"
        );
        list.push(Subsystem {
            name: name.to_owned(),
            depends_on: depends_on.iter().map(|s| (*s).to_owned()).collect(),
            writer: Arc::new(writer),
        });
    }

    /// `framework_get_subsystems`.
    pub fn rpc_get_subsystems(&self, params: Option<Value>) -> Result<Value, RpcError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct P {}
        let _: P = parse_params(params)?;
        let list = self.list.read().unwrap_or_else(|e| e.into_inner());
        Ok(Value::Array(
            list.iter()
                .map(|s| json!({ "subsystem": s.name, "depends_on": s.depends_on }))
                .collect(),
        ))
    }

    /// `framework_get_config`: params `name`, optional `with_batches` (accepted; we write no
    /// batches).
    pub fn rpc_get_config(&self, params: Option<Value>) -> Result<Value, RpcError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct P {
            name: String,
            #[serde(default)]
            #[allow(dead_code)]
            with_batches: bool,
        }
        let p: P = parse_params(params)?;
        let writer = {
            let list = self.list.read().unwrap_or_else(|e| e.into_inner());
            list.iter()
                .find(|s| s.name == p.name)
                .map(|s| s.writer.clone())
        };
        match writer {
            Some(w) => Ok(Value::Array(w())),
            None => Err(RpcError::errno(
                libc::ENOENT,
                format!("Subsystem '{}' not found", p.name),
            )),
        }
    }

    /// The whole config (`save_config` done on the server side).
    pub fn save(&self) -> Value {
        let writers: Vec<(String, ConfigWriter)> = {
            let list = self.list.read().unwrap_or_else(|e| e.into_inner());
            list.iter()
                .map(|s| (s.name.clone(), s.writer.clone()))
                .collect()
        };
        let subsystems: Vec<Value> = writers
            .into_iter()
            .map(|(name, w)| json!({ "subsystem": name, "config": w() }))
            .collect();
        json!({ "subsystems": subsystems })
    }
}

/// One call of a config: method and params.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigCall {
    /// Subsystem it came from.
    pub subsystem: String,
    /// Method name.
    pub method: String,
    /// Params, if any.
    pub params: Option<Value>,
}

/// Parses a config file's JSON into the ordered list of calls; the error names what is wrong.
pub fn parse_config(cfg: &Value) -> Result<Vec<ConfigCall>, String> {
    let subsystems = cfg
        .get("subsystems")
        .and_then(Value::as_array)
        .ok_or_else(|| "config: expected an object with a \"subsystems\" array".to_owned())?;
    let mut calls = Vec::new();
    for (i, s) in subsystems.iter().enumerate() {
        let name = s
            .get("subsystem")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("config: subsystems[{i}] has no \"subsystem\" name"))?;
        let entries = match s.get("config") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(a)) => a,
            Some(_) => {
                return Err(format!(
                    "config: subsystem {name}: \"config\" is not an array"
                ))
            }
        };
        for (j, e) in entries.iter().enumerate() {
            let items: Vec<&Value> = match e {
                Value::Array(batch) => batch.iter().collect(),
                other => vec![other],
            };
            for item in items {
                let method = item.get("method").and_then(Value::as_str).ok_or_else(|| {
                    format!("config: subsystem {name}: entry {j} has no \"method\" string")
                })?;
                calls.push(ConfigCall {
                    subsystem: name.to_owned(),
                    method: method.to_owned(),
                    params: item.get("params").cloned(),
                });
            }
        }
    }
    Ok(calls)
}

/// Runs a config's calls through `registry`, as `spdk_tgt --json` does: first, while the state
/// is STARTUP, the calls allowed at startup; then `start_init` (which moves the registry to
/// RUNTIME); then the remaining calls in order. Stops at the first failure, naming the call.
pub fn load_config(
    registry: &Registry,
    cfg: &Value,
    start_init: impl FnOnce() -> Result<(), String>,
) -> Result<(), String> {
    let calls = parse_config(cfg)?;
    for c in &calls {
        if registry.help(&c.method).is_none() {
            return Err(format!(
                "config: unknown method {} (subsystem {})",
                c.method, c.subsystem
            ));
        }
    }
    let mut done = vec![false; calls.len()];
    if registry.state() == StateMask::STARTUP {
        for (c, d) in calls.iter().zip(done.iter_mut()) {
            if registry.method_names(true, false).contains(&c.method) {
                run_call(registry, c)?;
                *d = true;
            }
        }
    }
    start_init()?;
    for (c, d) in calls.iter().zip(done.iter()) {
        if !*d {
            run_call(registry, c)?;
        }
    }
    Ok(())
}

fn run_call(registry: &Registry, c: &ConfigCall) -> Result<(), String> {
    registry
        .call_blocking(&c.method, c.params.clone())
        .map(|_| ())
        .map_err(|e| {
            format!(
                "config: {} failed: {} (code {})",
                c.method, e.message, e.code
            )
        })
}
