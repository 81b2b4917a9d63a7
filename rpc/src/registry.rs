//! The method table.
//!
//! Each method has a name, a mask of the application states in which it may be called (as
//! SPDK's `SPDK_RPC_STARTUP`/`SPDK_RPC_RUNTIME`) and a handler. Handlers are asynchronous:
//! they receive a [`Responder`] and complete it once, from any thread. A responder dropped
//! without an answer answers with an internal error, so a client never waits forever.
//!
//! The table is read on every request and written only when `thind` registers methods, so a
//! reader-writer lock on this control path is fine (no data path ever touches it).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::jsonrpc::{RpcError, INVALID_STATE};

/// Application states in which a method may run (bit mask).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateMask(pub u32);

impl StateMask {
    /// Before `framework_start_init` (only with `--wait-for-rpc`).
    pub const STARTUP: StateMask = StateMask(1);
    /// After the framework is initialised.
    pub const RUNTIME: StateMask = StateMask(2);
    /// Both.
    pub const ALWAYS: StateMask = StateMask(3);

    /// True if `state` is in the mask.
    pub fn allows(self, state: StateMask) -> bool {
        self.0 & state.0 != 0
    }
}

type Sink = Box<dyn FnOnce(Result<Value, RpcError>) + Send>;

/// The one-shot answer to a request. Complete it with [`Responder::send`] (or `ok`/`err`)
/// exactly once, from any thread.
pub struct Responder {
    sink: Option<Sink>,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("answered", &self.sink.is_none())
            .finish()
    }
}

impl Responder {
    /// A responder that hands the result to `sink`.
    pub fn new(sink: impl FnOnce(Result<Value, RpcError>) + Send + 'static) -> Self {
        Self {
            sink: Some(Box::new(sink)),
        }
    }

    /// Answers the request.
    pub fn send(mut self, result: Result<Value, RpcError>) {
        if let Some(sink) = self.sink.take() {
            sink(result);
        }
    }

    /// Answers with a result.
    pub fn ok(self, value: Value) {
        self.send(Ok(value));
    }

    /// Answers with an error.
    pub fn err(self, err: RpcError) {
        self.send(Err(err));
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.take() {
            sink(Err(RpcError::internal(
                "the handler dropped the request without an answer",
            )));
        }
    }
}

/// A method handler: params (absent, an object or an array) and the responder.
pub type Handler = Arc<dyn Fn(Option<Value>, Responder) + Send + Sync>;

/// One registered method.
#[derive(Clone)]
pub struct Method {
    /// States in which it may be called.
    pub allowed: StateMask,
    /// The handler.
    pub handler: Handler,
    /// One-line description for `rpc_get_methods`-style help.
    pub help: &'static str,
}

/// The method table and the application state.
pub struct Registry {
    methods: RwLock<BTreeMap<String, Method>>,
    aliases: RwLock<BTreeMap<String, String>>,
    state: AtomicU32,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new(StateMask::RUNTIME)
    }
}

impl Registry {
    /// An empty table in `state`.
    pub fn new(state: StateMask) -> Self {
        Self {
            methods: RwLock::new(BTreeMap::new()),
            aliases: RwLock::new(BTreeMap::new()),
            state: AtomicU32::new(state.0),
        }
    }

    /// Registers an asynchronous method. Registering a name twice is a programming error.
    pub fn register(
        &self,
        name: &str,
        allowed: StateMask,
        help: &'static str,
        handler: impl Fn(Option<Value>, Responder) + Send + Sync + 'static,
    ) {
        let mut methods = self.methods.write().unwrap_or_else(|e| e.into_inner());
        let prev = methods.insert(
            name.to_owned(),
            Method {
                allowed,
                handler: Arc::new(handler),
                help,
            },
        );
        assert!(prev.is_none(), "RPC method {name} registered twice");
    }

    /// Registers a synchronous method: the closure's result is the answer.
    pub fn register_sync(
        &self,
        name: &str,
        allowed: StateMask,
        help: &'static str,
        handler: impl Fn(Option<Value>) -> Result<Value, RpcError> + Send + Sync + 'static,
    ) {
        self.register(name, allowed, help, move |params, resp| {
            resp.send(handler(params))
        });
    }

    /// Registers `alias` as another name of `name` (SPDK's deprecated method names).
    pub fn register_alias(&self, alias: &str, name: &str) {
        let mut aliases = self.aliases.write().unwrap_or_else(|e| e.into_inner());
        aliases.insert(alias.to_owned(), name.to_owned());
    }

    /// The current state.
    pub fn state(&self) -> StateMask {
        StateMask(self.state.load(Ordering::Acquire))
    }

    /// Moves to `state` (framework_start_init moves STARTUP → RUNTIME).
    pub fn set_state(&self, state: StateMask) {
        self.state.store(state.0, Ordering::Release);
    }

    /// Names of the methods, optionally only those allowed now, optionally with aliases.
    pub fn method_names(&self, current_only: bool, include_aliases: bool) -> Vec<String> {
        let state = self.state();
        let methods = self.methods.read().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<String> = methods
            .iter()
            .filter(|(_, m)| !current_only || m.allowed.allows(state))
            .map(|(n, _)| n.clone())
            .collect();
        if include_aliases {
            let aliases = self.aliases.read().unwrap_or_else(|e| e.into_inner());
            for (alias, target) in aliases.iter() {
                let ok = methods
                    .get(target)
                    .is_some_and(|m| !current_only || m.allowed.allows(state));
                if ok {
                    names.push(alias.clone());
                }
            }
            names.sort();
        }
        names
    }

    /// The help line of a method, if registered.
    pub fn help(&self, name: &str) -> Option<&'static str> {
        let methods = self.methods.read().unwrap_or_else(|e| e.into_inner());
        methods.get(name).map(|m| m.help)
    }

    /// Runs `method`: checks that it exists and is allowed now, then calls its handler. The
    /// responder is always answered (by the handler or here).
    pub fn dispatch(&self, method: &str, params: Option<Value>, resp: Responder) {
        let found = {
            let methods = self.methods.read().unwrap_or_else(|e| e.into_inner());
            let target = {
                let aliases = self.aliases.read().unwrap_or_else(|e| e.into_inner());
                aliases.get(method).cloned()
            };
            methods.get(target.as_deref().unwrap_or(method)).cloned()
        };
        let Some(m) = found else {
            resp.err(RpcError::method_not_found(method));
            return;
        };
        let state = self.state();
        if !m.allowed.allows(state) {
            let msg = if state == StateMask::STARTUP {
                format!(
                    "Method {method} may only be called after the framework is initialized \
                     using framework_start_init"
                )
            } else {
                format!("Method {method} may only be called at startup (with --wait-for-rpc)")
            };
            resp.err(RpcError::new(INVALID_STATE, msg));
            return;
        }
        (m.handler)(params, resp);
    }

    /// Runs `method` and waits for its answer. For callers off the reactors (config loading
    /// at start-up, tests); never call it on a reactor whose work the handler needs.
    pub fn call_blocking(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.dispatch(
            method,
            params,
            Responder::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv()
            .unwrap_or_else(|_| Err(RpcError::internal("handler vanished")))
    }
}

/// Decodes `params` into `T`; absent params decode as an empty object, so structs whose fields
/// are all optional accept no params. Errors name the bad, missing or unknown parameter.
/// Use `#[serde(deny_unknown_fields)]` on `T`.
pub fn parse_params<T: DeserializeOwned>(params: Option<Value>) -> Result<T, RpcError> {
    let v = params.unwrap_or_else(|| Value::Object(Default::default()));
    if v.is_array() {
        return Err(RpcError::invalid_params(
            "Invalid parameters: expected an object, got an array",
        ));
    }
    serde_json::from_value(v)
        .map_err(|e| RpcError::invalid_params(format!("Invalid parameters: {e}")))
}
