//! io_devices and per-reactor I/O channels (SPDK's `spdk_io_device_register` /
//! `spdk_get_io_channel` / `spdk_for_each_channel`).
//!
//! An [`IoDevice<C>`] is a `Send + Sync` handle naming a device and holding a constructor for
//! its per-reactor channel state `C`. [`IoDevice::channel`] returns the current reactor's
//! channel, creating it on first use; all [`IoChannel`] clones on a reactor share one `C`,
//! which is destroyed (dropped, on that reactor) when the last clone is dropped. A later
//! `channel()` call creates a fresh one. Channels are `!Send`: data-path state stays on its
//! reactor (STYLE rule 1); put `Cell`/`RefCell` inside `C` for mutation.

use std::any::Any;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::reactor::{self, ReactorId};

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

type CreateFn<C> = dyn Fn() -> C + Send + Sync;

struct DeviceInner<C> {
    key: u64,
    name: String,
    create: Box<CreateFn<C>>,
}

/// A registered I/O device: clone it freely, send it anywhere.
pub struct IoDevice<C: 'static> {
    inner: Arc<DeviceInner<C>>,
    _channel: PhantomData<fn() -> C>,
}

impl<C: 'static> Clone for IoDevice<C> {
    fn clone(&self) -> Self {
        IoDevice {
            inner: self.inner.clone(),
            _channel: PhantomData,
        }
    }
}

impl<C: 'static> fmt::Debug for IoDevice<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoDevice")
            .field("name", &self.inner.name)
            .field("key", &self.inner.key)
            .finish()
    }
}

impl<C: 'static> IoDevice<C> {
    /// Registers a device whose channels are made by `create`, called on the reactor that
    /// first asks for a channel (it may call [`reactor::current`]).
    pub fn new(name: &str, create: impl Fn() -> C + Send + Sync + 'static) -> Self {
        IoDevice {
            inner: Arc::new(DeviceInner {
                key: NEXT_KEY.fetch_add(1, Ordering::Relaxed),
                name: name.to_string(),
                create: Box::new(create),
            }),
            _channel: PhantomData,
        }
    }

    /// The name given at registration.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The current reactor's channel, created if it has none. Panics off-reactor.
    pub fn channel(&self) -> IoChannel<C> {
        if let Some(existing) = self.existing_channel() {
            return existing;
        }
        let value = (self.inner.create)();
        reactor::with_core(|core| {
            let cell = Rc::new(ChannelCell {
                key: self.inner.key,
                reactor: core.id,
                value,
            });
            let weak: std::rc::Weak<dyn Any> = Rc::downgrade(&cell) as std::rc::Weak<dyn Any>;
            core.channels.borrow_mut().insert(self.inner.key, weak);
            IoChannel { cell }
        })
    }

    /// The current reactor's channel if one exists. Panics off-reactor.
    pub fn existing_channel(&self) -> Option<IoChannel<C>> {
        reactor::with_core(|core| {
            let any = core.channels.borrow().get(&self.inner.key)?.upgrade()?;
            let cell = any.downcast::<ChannelCell<C>>().ok()?;
            Some(IoChannel { cell })
        })
    }

    /// Calls `f` with each reactor's channel, reactor by reactor in id order (skipping
    /// reactors without a channel), then runs `done` on the calling reactor
    /// (SPDK's `spdk_for_each_channel`). Panics off-reactor.
    pub fn for_each_channel(
        &self,
        f: impl Fn(&IoChannel<C>) + Send + Sync + 'static,
        done: impl FnOnce() + Send + 'static,
    ) {
        let device = self.clone();
        crate::msg::for_each_reactor(
            move || {
                if let Some(channel) = device.existing_channel() {
                    f(&channel);
                }
            },
            done,
        );
    }
}

struct ChannelCell<C> {
    key: u64,
    reactor: ReactorId,
    value: C,
}

impl<C> Drop for ChannelCell<C> {
    fn drop(&mut self) {
        // The last reference is gone: forget the registry entry (if we are still on a
        // reactor; at teardown the registry may already be gone).
        reactor::try_with_core(|core| {
            let mut channels = core.channels.borrow_mut();
            if channels
                .get(&self.key)
                .is_some_and(|w| w.strong_count() == 0)
            {
                channels.remove(&self.key);
            }
        });
    }
}

/// A reference to one reactor's channel of an [`IoDevice`]. `!Send`; cloning shares it.
pub struct IoChannel<C: 'static> {
    cell: Rc<ChannelCell<C>>,
}

impl<C: 'static> Clone for IoChannel<C> {
    fn clone(&self) -> Self {
        IoChannel {
            cell: self.cell.clone(),
        }
    }
}

impl<C: 'static> IoChannel<C> {
    /// The reactor this channel belongs to.
    pub fn reactor(&self) -> ReactorId {
        self.cell.reactor
    }

    /// True if both are the same channel.
    pub fn ptr_eq(&self, other: &Self) -> bool {
        Rc::ptr_eq(&self.cell, &other.cell)
    }
}

impl<C: 'static> Deref for IoChannel<C> {
    type Target = C;
    fn deref(&self) -> &C {
        &self.cell.value
    }
}

impl<C: 'static> fmt::Debug for IoChannel<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoChannel")
            .field("reactor", &self.cell.reactor)
            .finish_non_exhaustive()
    }
}
