//! Open descriptors (SPDK `spdk_bdev_open_ext`): claims and event delivery.
//!
//! A [`BdevDesc`] is a `Send` control-path handle. It keeps the bdev alive, may hold the
//! bdev's single exclusive claim (virtual bdevs claim their base), receives
//! [`BdevEvent`]s (resize, hot-remove) through the callback given at open, and hands out
//! the per-thread [`BdevChannel`]. Dropping it closes it; a removed bdev is destructed when
//! its last descriptor closes.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::bdev::{Bdev, BdevEvent};
use crate::error::{BdevError, ErrorKind, Result};
use crate::io::BdevChannel;
use crate::registry::registry;

/// Event callback given at open. If the descriptor was opened on a reactor, events run on
/// that reactor (sent as a message, like SPDK); otherwise on the thread that changed the bdev.
pub type EventCallback = Arc<dyn Fn(BdevEvent) + Send + Sync>;

#[derive(Clone)]
pub(crate) struct EventSink {
    cb: EventCallback,
    /// The reactor that opened the descriptor.
    target: Option<(reactor::RuntimeHandle, reactor::ReactorId)>,
}

impl EventSink {
    pub fn deliver(&self, ev: BdevEvent) {
        match &self.target {
            Some((rt, id)) => {
                let cb = self.cb.clone();
                rt.send_msg(*id, move || cb(ev));
            }
            None => (self.cb)(ev),
        }
    }
}

pub(crate) struct DescEntry {
    pub id: u64,
    pub write: bool,
    pub event_cb: EventSink,
}

static NEXT_DESC_ID: AtomicU64 = AtomicU64::new(1);

/// An open descriptor. `Send`; drop to close.
pub struct BdevDesc {
    id: u64,
    bdev: Arc<dyn Bdev>,
    write: bool,
}

impl fmt::Debug for BdevDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BdevDesc({}, write={})", self.bdev.name(), self.write)
    }
}

impl BdevDesc {
    /// Opens the registered bdev named `name` (name, alias or UUID).
    ///
    /// Errors: `ENODEV` if there is no such bdev; `EPERM` if `write` and the bdev is claimed.
    pub fn open(
        name: &str,
        write: bool,
        event_cb: impl Fn(BdevEvent) + Send + Sync + 'static,
    ) -> Result<BdevDesc> {
        let bdev = registry().lookup(name).ok_or_else(|| {
            BdevError::new(ErrorKind::NotFound, format!("no bdev named '{name}'"))
        })?;
        BdevDesc::open_bdev(bdev, write, Arc::new(event_cb))
    }

    /// Opens `bdev` directly (it need not be registered).
    pub fn open_bdev(
        bdev: Arc<dyn Bdev>,
        write: bool,
        event_cb: EventCallback,
    ) -> Result<BdevDesc> {
        let id = NEXT_DESC_ID.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = bdev.core().lock();
            if st.removed {
                return Err(BdevError::new(
                    ErrorKind::Removed,
                    format!("bdev '{}' is being removed", bdev.name()),
                ));
            }
            if let (true, Some((_, module))) = (write, &st.claim) {
                return Err(BdevError::new(
                    ErrorKind::Claimed,
                    format!(
                        "bdev '{}' is claimed by module '{module}'; cannot open it for write",
                        bdev.name()
                    ),
                ));
            }
            let target = reactor::try_current().map(|id| (reactor::runtime_handle(), id));
            st.descs.push(DescEntry {
                id,
                write,
                event_cb: EventSink {
                    cb: event_cb,
                    target,
                },
            });
        }
        Ok(BdevDesc { id, bdev, write })
    }

    /// The opened bdev.
    pub fn bdev(&self) -> &Arc<dyn Bdev> {
        &self.bdev
    }

    /// Whether the descriptor was opened for write.
    pub fn is_write(&self) -> bool {
        self.write
    }

    /// Claims the bdev exclusively for `module` (a virtual bdev claiming its base). Upgrades
    /// the descriptor to write access.
    ///
    /// Errors: `EPERM` if it is already claimed (by anyone, including this descriptor) or if
    /// another descriptor has it open for write.
    pub fn claim(&mut self, module: &str) -> Result<()> {
        let mut st = self.bdev.core().lock();
        if let Some((_, owner)) = &st.claim {
            return Err(BdevError::new(
                ErrorKind::Claimed,
                format!(
                    "bdev '{}' already claimed by module '{owner}'",
                    self.bdev.name()
                ),
            ));
        }
        if st.descs.iter().any(|d| d.write && d.id != self.id) {
            return Err(BdevError::new(
                ErrorKind::Claimed,
                format!(
                    "bdev '{}' is open for write by another descriptor; module '{module}' \
                     cannot claim it",
                    self.bdev.name()
                ),
            ));
        }
        st.claim = Some((self.id, module.to_string()));
        if let Some(d) = st.descs.iter_mut().find(|d| d.id == self.id) {
            d.write = true;
        }
        self.write = true;
        Ok(())
    }

    /// Releases this descriptor's claim (no-op if it holds none).
    pub fn release_claim(&self) {
        let mut st = self.bdev.core().lock();
        if st.claim.as_ref().is_some_and(|(id, _)| *id == self.id) {
            st.claim = None;
        }
    }

    /// The bdev's I/O channel for the calling thread (created on first use, shared by every
    /// descriptor of the bdev on this thread). Call on the reactor that will submit.
    pub fn get_io_channel(&self) -> Result<BdevChannel> {
        BdevChannel::get(&self.bdev)
    }
}

impl Drop for BdevDesc {
    fn drop(&mut self) {
        let destruct = {
            let mut st = self.bdev.core().lock();
            st.descs.retain(|d| d.id != self.id);
            if st.claim.as_ref().is_some_and(|(id, _)| *id == self.id) {
                st.claim = None;
            }
            let last = st.removed && st.descs.is_empty() && !st.destructed;
            if last {
                st.destructed = true;
            }
            last
        };
        if destruct {
            self.bdev.destruct();
        }
    }
}
