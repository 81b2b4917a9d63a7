//! Poll groups: one poller per reactor drives every qpair that reactor owns (SPDK's
//! `nvmf_tgt_poll_group`), instead of one poller per connection.
//!
//! The group owns its qpairs (the strong references); a qpair that closed is dropped from
//! the group after the pass that saw it close. Qpairs join only from messages (never while
//! the group's poller runs), so the list is never changed during a pass.

use std::cell::RefCell;
use std::rc::{Rc, Weak};

use reactor::PollStatus;

use super::qpair::{Qpair, QpairState};

/// One reactor's qpairs. Owned by its poller (so it lives exactly as long as the poller,
/// as the reactor's other pollers do); the thread-local only points at it.
struct PollGroup {
    qpairs: RefCell<Vec<Rc<RefCell<Qpair>>>>,
}

thread_local! {
    static GROUP: RefCell<Weak<PollGroup>> = const { RefCell::new(Weak::new()) };
}

/// Adds `q` to the current reactor's group, creating the group (and its poller) on first
/// use. Call on a reactor, outside the group's poller (from a message).
pub(crate) fn add(q: Rc<RefCell<Qpair>>) {
    let group = GROUP.with(|g| g.borrow().upgrade()).unwrap_or_else(create);
    group.qpairs.borrow_mut().push(q);
}

/// Number of qpairs in the current reactor's group (0 off the reactors).
pub fn nr_local_qpairs() -> usize {
    GROUP.with(|g| g.borrow().upgrade().map_or(0, |g| g.qpairs.borrow().len()))
}

fn create() -> Rc<PollGroup> {
    let group = Rc::new(PollGroup {
        qpairs: RefCell::new(Vec::new()),
    });
    let owner = group.clone();
    reactor::register_poller("nvmf_poll_group", move || owner.poll());
    GROUP.with(|g| *g.borrow_mut() = Rc::downgrade(&group));
    group
}

impl PollGroup {
    /// One pass over every qpair; drops the ones that closed.
    fn poll(&self) -> PollStatus {
        let mut busy = false;
        let mut closed = false;
        {
            let list = self.qpairs.borrow();
            for q in list.iter() {
                let mut q = q.borrow_mut();
                busy |= q.poll() == PollStatus::Busy;
                closed |= q.state == QpairState::Closed;
            }
        }
        if closed {
            self.qpairs
                .borrow_mut()
                .retain(|q| q.borrow().state != QpairState::Closed);
        }
        PollStatus::from_busy(busy)
    }
}
