//! Notifications: a bounded ring of typed events behind `notify_get_types` and
//! `notify_get_notifications`, as SPDK's notify library keeps them.
//!
//! Event ids start at 0 and grow by one per event; the ring keeps the newest
//! [`MAX_EVENTS`]. `notify_get_notifications(id, max)` returns events with id ≥ `id` (oldest
//! first), at most `max` of them (0 or absent: no limit) — so a script polls with the id after
//! the last one it saw, as `dmsetup wait` waits for the next event.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Mutex;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::jsonrpc::RpcError;
use crate::registry::parse_params;

/// Events kept.
pub const MAX_EVENTS: usize = 1024;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its type (`bdev_register`, `thin_pool_low_water_mark`, ...).
    pub kind: String,
    /// The object it is about (a bdev or pool name).
    pub ctx: String,
    /// Its id.
    pub id: u64,
}

#[derive(Default)]
struct Ring {
    events: VecDeque<Event>,
    next_id: u64,
}

/// Registered types and the event ring. Shared by every sender (any thread).
#[derive(Default)]
pub struct Notifier {
    types: Mutex<BTreeSet<String>>,
    ring: Mutex<Ring>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier").finish_non_exhaustive()
    }
}

impl Notifier {
    /// An empty notifier.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers an event type (idempotent).
    pub fn register_type(&self, kind: &str) {
        self.types
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(kind.to_owned());
    }

    /// Records an event and returns its id. The type must be registered.
    pub fn send(&self, kind: &str, ctx: &str) -> u64 {
        debug_assert!(
            self.types
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(kind),
            "notification type {kind} not registered"
        );
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let id = ring.next_id;
        ring.next_id += 1;
        if ring.events.len() == MAX_EVENTS {
            ring.events.pop_front();
        }
        ring.events.push_back(Event {
            kind: kind.to_owned(),
            ctx: ctx.to_owned(),
            id,
        });
        id
    }

    /// Registered types, sorted.
    pub fn types(&self) -> Vec<String> {
        self.types
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Events with id ≥ `from`, at most `max` (0 = all).
    pub fn events(&self, from: u64, max: u64) -> Vec<Event> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let limit = if max == 0 {
            usize::MAX
        } else {
            usize::try_from(max).unwrap_or(usize::MAX)
        };
        ring.events
            .iter()
            .filter(|e| e.id >= from)
            .take(limit)
            .cloned()
            .collect()
    }

    /// `notify_get_types`.
    pub fn rpc_get_types(&self, params: Option<Value>) -> Result<Value, RpcError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct P {}
        let _: P = parse_params(params)?;
        Ok(json!(self.types()))
    }

    /// `notify_get_notifications`: params `id` (first id, default 0), `max` (default 0).
    pub fn rpc_get_notifications(&self, params: Option<Value>) -> Result<Value, RpcError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct P {
            #[serde(default)]
            id: u64,
            #[serde(default)]
            max: u64,
        }
        let p: P = parse_params(params)?;
        let list: Vec<Value> = self
            .events(p.id, p.max)
            .into_iter()
            .map(|e| json!({ "type": e.kind, "ctx": e.ctx, "id": e.id }))
            .collect();
        Ok(Value::Array(list))
    }
}
