//! Bdev-wide reset, as SPDK's `spdk_bdev_reset` does it: every channel of the bdev is frozen
//! (new I/O is queued, not failed), the reset waits until the I/O in flight on all channels
//! has completed, the module's reset runs on the submitting channel, then every channel is
//! unfrozen (its queued I/O submitted in order) and the reset completes.
//!
//! Protocol (one reset at a time per bdev; later ones wait in the bdev's FIFO):
//!
//! | step | where | what |
//! | --- | --- | --- |
//! | queue | submitting reactor | the reset's slot waits in the channel's `pending_resets`; its reactor joins the bdev's `reset_waiting`; the head of that list starts |
//! | begin | origin | new generation `g`; `reset_frozen = g` (channels created from now on start frozen); freeze the local channel; message every other reactor |
//! | freeze | each other reactor | freeze its channel of the bdev (if any) for `g`; ack once it holds no I/O but queued ones |
//! | submit | origin | once the local channel has drained and every reactor acked (the last ack sends a message to the origin), hand the reset to the module |
//! | finish | origin | the module completed the reset: clear `reset_frozen`, unfreeze locally, message the other reactors to unfreeze, complete the reset, start the next waiting reset |
//!
//! Generations make unfreezing idempotent and order-proof: a channel only unfreezes for the
//! generation that froze it, so a late "unfreeze `g`" message cannot thaw a channel that a
//! later reset `g + 1` (begun on another reactor) has already frozen.
//!
//! Channels on threads that are not reactors cannot be reached by messages; a reset submitted
//! there waits only for the I/O of its own channel (no freeze), as before.

use std::sync::atomic::{AtomicUsize, Ordering};

use reactor::{ReactorId, RuntimeHandle};

use super::*;

/// One reset in progress, shared with the reactors that take part.
pub(super) struct ResetCtx {
    gen: u64,
    bdev: Arc<dyn Bdev>,
    origin: ReactorId,
    rt: RuntimeHandle,
    /// Other reactors that have not yet reported their channel drained.
    nr_pending: AtomicUsize,
}

impl ResetCtx {
    /// One reactor's channel holds no more I/O in flight. The last ack wakes the origin.
    pub(super) fn ack(&self) {
        if self.nr_pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            let (origin, bdev_id) = (self.origin, self.bdev.core().id());
            self.rt.send_msg(origin, move || {
                if let Some(ch) = channel_on(origin, bdev_id) {
                    ch.reset_progress();
                }
            });
        }
    }
}

/// The reset a channel is running as origin.
pub(super) struct ActiveReset {
    ctx: Arc<ResetCtx>,
    others: Vec<ReactorId>,
    /// Handed to the module (after the drain).
    submitted: bool,
}

/// The existing channel of bdev `bdev_id` on reactor `r` (call on `r`).
fn channel_on(r: ReactorId, bdev_id: u64) -> Option<BdevChannel> {
    let key = (r.index() as u32, bdev_id);
    CHANNELS
        .with(|c| c.borrow().get(&key).and_then(RcWeak::upgrade))
        .map(|inner| BdevChannel { inner })
}

/// Starts the reset at the head of `bdev`'s waiting list, on its reactor. Runs on any
/// reactor of the runtime; skips entries whose channel has gone (a caller bug: a channel
/// must not be dropped with I/O in flight), so the list never stalls.
fn start_head_reset(bdev: Arc<dyn Bdev>) {
    loop {
        let Some(head) = bdev.core().lock().reset_waiting.front().copied() else {
            return;
        };
        if reactor::try_current() != Some(head) {
            reactor::send_msg(head, move || start_head_reset(bdev));
            return;
        }
        match channel_on(head, bdev.core().id()) {
            Some(ch) if !ch.inner.pending_resets.borrow().is_empty() => {
                ch.reset_begin();
                return;
            }
            _ => {
                bdev.core().lock().reset_waiting.pop_front();
            }
        }
    }
}

impl BdevChannel {
    /// Takes a reset I/O (its slot counted in flight): queues it and, on a reactor, starts
    /// the bdev-wide reset if none is running.
    pub(super) fn queue_reset(&self, io: ModuleIo) {
        let inner = &self.inner;
        inner.pending_resets.borrow_mut().push_back(io);
        let Some(me) = inner.home else {
            // Off-reactor: `poll` submits it once the channel has drained.
            return;
        };
        let first = {
            let mut st = inner.bdev.core().lock();
            st.reset_waiting.push_back(me);
            st.reset_waiting.len() == 1
        };
        if first {
            self.reset_begin();
        }
    }

    /// Begins the reset at the front of this channel's `pending_resets` (this reactor heads
    /// the bdev's waiting list): freeze here and everywhere, then wait for the drain.
    fn reset_begin(&self) {
        let inner = &self.inner;
        let Some(me) = inner.home else {
            return;
        };
        debug_assert!(!inner.pending_resets.borrow().is_empty());
        debug_assert!(inner.active_reset.borrow().is_none());
        let gen = {
            let mut st = inner.bdev.core().lock();
            st.reset_gen += 1;
            st.reset_frozen = Some(st.reset_gen);
            st.reset_gen
        };
        let others: Vec<ReactorId> = reactor::reactor_ids().filter(|&r| r != me).collect();
        let ctx = Arc::new(ResetCtx {
            gen,
            bdev: inner.bdev.clone(),
            origin: me,
            rt: reactor::runtime_handle(),
            nr_pending: AtomicUsize::new(others.len()),
        });
        self.freeze(gen);
        let bdev_id = inner.bdev.core().id();
        for &r in &others {
            let ctx = ctx.clone();
            reactor::send_msg(r, move || match channel_on(r, bdev_id) {
                Some(ch) => ch.remote_freeze(ctx),
                None => ctx.ack(),
            });
        }
        *inner.active_reset.borrow_mut() = Some(ActiveReset {
            ctx,
            others,
            submitted: false,
        });
        inner.reset_busy.set(true);
        self.reset_progress();
    }

    /// On another reactor: freeze for the origin's reset and ack once drained.
    fn remote_freeze(&self, ctx: Arc<ResetCtx>) {
        self.freeze(ctx.gen);
        if self.drained() {
            ctx.ack();
        } else {
            *self.inner.drain_ack.borrow_mut() = Some(ctx);
            self.inner.reset_busy.set(true);
        }
    }

    pub(super) fn freeze(&self, gen: u64) {
        self.inner.frozen_gen.set(gen);
        self.inner.fast_mask.set(0);
    }

    /// Unfreezes (if frozen for `gen`) and submits the I/O queued meanwhile, in order.
    fn unfreeze(&self, gen: u64) {
        let inner = &self.inner;
        if inner.frozen_gen.get() != gen {
            return;
        }
        inner.frozen_gen.set(0);
        inner.fast_mask.set(inner.supported);
        let queued = std::mem::take(&mut *inner.frozen.borrow_mut());
        for (io, splits) in queued {
            if splits {
                self.submit_split(io);
            } else {
                self.submit_to_module(io);
            }
        }
    }

    /// Whether every top-level I/O of this channel is either queued by the freeze or a
    /// waiting reset, i.e. nothing is at the module.
    fn drained(&self) -> bool {
        let inner = &self.inner;
        inner.nr_inflight.get() == inner.frozen.borrow().len() + inner.pending_resets.borrow().len()
    }

    /// From `poll` while a reset involves this channel: ack a drain, advance the origin.
    pub(super) fn reset_poll(&self) {
        let inner = &self.inner;
        if inner.drain_ack.borrow().is_some() && self.drained() {
            if let Some(ctx) = inner.drain_ack.borrow_mut().take() {
                ctx.ack();
            }
        }
        self.reset_progress();
        self.update_reset_busy();
    }

    fn update_reset_busy(&self) {
        let inner = &self.inner;
        inner
            .reset_busy
            .set(inner.drain_ack.borrow().is_some() || inner.active_reset.borrow().is_some());
    }

    /// Origin: once drained everywhere, hand the reset to the module.
    fn reset_progress(&self) {
        let inner = &self.inner;
        {
            let active = inner.active_reset.borrow();
            let Some(a) = active.as_ref() else {
                return;
            };
            if a.submitted || a.ctx.nr_pending.load(Ordering::Acquire) != 0 || !self.drained() {
                return;
            }
        }
        let Some(io) = inner.pending_resets.borrow_mut().pop_front() else {
            return;
        };
        if let Some(a) = inner.active_reset.borrow_mut().as_mut() {
            a.submitted = true;
        }
        inner.module.borrow_mut().submit(io);
    }

    /// Origin, from `finish` of a reset I/O: if it is the bdev-wide reset this channel runs,
    /// unfreeze every channel and return true (the caller then completes it and calls
    /// [`BdevChannel::reset_start_next`]).
    pub(super) fn reset_finished(&self) -> bool {
        let inner = &self.inner;
        let active = {
            let mut slot = inner.active_reset.borrow_mut();
            match slot.as_ref() {
                Some(a) if a.submitted => slot.take(),
                _ => None,
            }
        };
        let Some(a) = active else {
            return false;
        };
        let gen = a.ctx.gen;
        {
            let mut st = inner.bdev.core().lock();
            if st.reset_frozen == Some(gen) {
                st.reset_frozen = None;
            }
            let head = st.reset_waiting.pop_front();
            debug_assert_eq!(head, inner.home);
        }
        self.unfreeze(gen);
        let bdev_id = inner.bdev.core().id();
        for r in a.others {
            reactor::send_msg(r, move || {
                if let Some(ch) = channel_on(r, bdev_id) {
                    ch.unfreeze(gen);
                }
            });
        }
        self.update_reset_busy();
        true
    }

    /// After a bdev-wide reset completed: start the next waiting one, if any.
    pub(super) fn reset_start_next(&self) {
        start_head_reset(self.inner.bdev.clone());
    }
}
