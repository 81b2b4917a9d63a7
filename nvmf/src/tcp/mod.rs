//! The TCP transport: listeners (acceptor pollers on reactor 0) and qpairs (one per
//! connection, spread round-robin over the reactors).
//!
//! Two registries track live qpairs: a global one ([`QPAIRS`]: reactor, listen address and
//! a close request per qpair, for shutdown and listener removal, which run off the
//! owning reactor) and a per-reactor one ([`LOCAL`]: the qpair objects themselves, for
//! messages that must reach one qpair, such as an Abort aimed at another queue).

pub mod group;
pub mod listener;
pub mod pdu;
pub mod qpair;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use reactor::ReactorId;

use crate::subsystem::ListenAddr;
use qpair::Qpair;

static NEXT_QPAIR_ID: AtomicU64 = AtomicU64::new(1);
static SHUTDOWN: AtomicBool = AtomicBool::new(false);

/// What other threads know of a live qpair.
#[derive(Debug)]
pub(crate) struct QpairShared {
    /// The owning reactor.
    pub reactor: ReactorId,
    /// The listen address the connection came in through.
    pub listen: ListenAddr,
    /// Set to make the qpair close itself (checked on its next poll).
    pub close: AtomicBool,
}

/// Live qpairs (all reactors).
static QPAIRS: LazyLock<Mutex<HashMap<u64, Arc<QpairShared>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

thread_local! {
    /// This reactor's live qpairs.
    static LOCAL: RefCell<HashMap<u64, Weak<RefCell<Qpair>>>> = RefCell::new(HashMap::new());
}

/// Registers a new qpair of the current reactor; returns its id and shared part.
pub(crate) fn register_qpair(listen: ListenAddr) -> (u64, Arc<QpairShared>) {
    let id = NEXT_QPAIR_ID.fetch_add(1, Ordering::Relaxed);
    let shared = Arc::new(QpairShared {
        reactor: reactor::current(),
        listen,
        close: AtomicBool::new(false),
    });
    QPAIRS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, shared.clone());
    (id, shared)
}

/// Makes qpair `id` reachable by [`with_local_qpair`] on its reactor.
pub(crate) fn register_local(id: u64, q: &Rc<RefCell<Qpair>>) {
    LOCAL.with(|l| l.borrow_mut().insert(id, Rc::downgrade(q)));
}

/// Forgets a closed qpair.
pub(crate) fn unregister_qpair(id: u64) {
    QPAIRS.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    LOCAL.with(|l| l.borrow_mut().remove(&id));
}

/// Runs `f` on qpair `id` if it lives on the current reactor; None if it is gone (or
/// busy: never the case from a message, which runs outside every poller).
pub(crate) fn with_local_qpair<R>(id: u64, f: impl FnOnce(&mut Qpair) -> R) -> Option<R> {
    let q = LOCAL.with(|l| l.borrow().get(&id).and_then(Weak::upgrade))?;
    let mut g = q.try_borrow_mut().ok()?;
    Some(f(&mut g))
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

/// Asks every qpair matching `pred` to close; wakes their reactors.
fn close_qpairs_where(why: &str, pred: impl Fn(u64, &QpairShared) -> bool) {
    let reactors: Vec<ReactorId> = QPAIRS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(id, q)| pred(**id, q))
        .map(|(id, q)| {
            crate::trace!("qpair {id}: close requested ({why})");
            q.close.store(true, Ordering::SeqCst);
            q.reactor
        })
        .collect();
    wake(reactors);
}

/// Wakes each of `reactors` (once) so their qpairs look at their signals.
pub(crate) fn wake(mut reactors: Vec<ReactorId>) {
    reactors.sort();
    reactors.dedup();
    if let Some(rt) = crate::runtime() {
        for r in reactors {
            rt.send_msg(r, || {});
        }
    }
}

/// Closes qpair `id` (one I/O queue whose listener went away).
pub(crate) fn close_qpair(id: u64, why: &str) {
    close_qpairs_where(why, |q, _| q == id);
}

/// Closes every connection that came in through `addr` (its socket was unbound): as the
/// transport's stop-listen does, whatever subsystem (or none yet) they belong to.
pub(crate) fn close_listener_qpairs(addr: &ListenAddr) {
    close_qpairs_where("listener removed", |_, q| q.listen == *addr);
}

/// Closes every qpair: sets the latch and wakes their reactors.
pub(crate) fn shutdown_qpairs() {
    SHUTDOWN.store(true, Ordering::SeqCst);
    let reactors: Vec<ReactorId> = QPAIRS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .map(|q| q.reactor)
        .collect();
    wake(reactors);
}
