//! The TCP transport: listeners (acceptor pollers on reactor 0) and qpairs (one per
//! connection, spread round-robin over the reactors).

pub mod listener;
pub mod pdu;
pub mod qpair;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};

use reactor::ReactorId;

static NEXT_QPAIR_ID: AtomicU64 = AtomicU64::new(1);
static SHUTDOWN: AtomicBool = AtomicBool::new(false);
/// Live qpairs and their reactors (for shutdown wake-ups).
static QPAIRS: LazyLock<Mutex<HashMap<u64, ReactorId>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

pub(crate) fn next_qpair_id() -> u64 {
    let id = NEXT_QPAIR_ID.fetch_add(1, Ordering::Relaxed);
    if let Some(r) = reactor::try_current() {
        QPAIRS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, r);
    }
    id
}

pub(crate) fn unregister_qpair(id: u64) {
    QPAIRS.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
}

/// Number of live qpairs (all reactors).
pub fn nr_qpairs() -> usize {
    QPAIRS.lock().unwrap_or_else(|e| e.into_inner()).len()
}

pub(crate) fn is_shutdown() -> bool {
    SHUTDOWN.load(Ordering::Relaxed)
}

/// Clears the shutdown latch (a new target life, e.g. in tests).
pub(crate) fn reset_shutdown() {
    SHUTDOWN.store(false, Ordering::SeqCst);
}

/// Closes every qpair: sets the latch and wakes their reactors.
pub(crate) fn shutdown_qpairs() {
    SHUTDOWN.store(true, Ordering::SeqCst);
    let reactors: Vec<ReactorId> = QPAIRS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .copied()
        .collect();
    if let Some(rt) = crate::runtime() {
        for r in reactors {
            rt.send_msg(r, || {});
        }
    }
}
