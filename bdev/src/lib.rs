//! `bdev`: the block-device layer, built the way SPDK's bdev layer is.
//!
//! - [`Bdev`] — the trait every block device implements, embedding a [`BdevCore`] (name,
//!   aliases, UUID, geometry, descriptors, claim, statistics).
//! - [`BdevDesc`] — an open descriptor: claims, resize/hot-remove events, and the per-thread
//!   [`BdevChannel`] through which I/O (read, write, flush, unmap, write_zeroes, reset) is
//!   submitted and completed on the submitting reactor.
//! - [`BdevModule`] and the [`registry`] of bdevs by name, alias and UUID (control path).
//! - Base bdevs: [`null`], [`malloc`], [`uring`]; fault-injecting and recording wrappers in
//!   [`testing`].
//!
//! Threading: bdevs, descriptors and the registry are `Send + Sync` control-path objects;
//! channels, requests and completions are `!Send` and live on one reactor. The data path takes
//! no lock and allocates nothing per I/O once a channel's request pool has warmed up.
//!
//! See `/work/notes/bdev-api.md` for a usage guide.

pub mod bdev;
pub mod buf;
pub mod desc;
pub mod error;
pub mod io;
pub mod iostat;
pub mod malloc;
pub mod module;
pub mod null;
pub mod registry;
pub mod rpc_util;
pub mod testing;
pub mod thin;
pub mod uring;

pub use crate::bdev::{
    bdev_info_json, Bdev, BdevCore, BdevCoreOpts, BdevEvent, BdevRef, IoStatus, IoType, Uuid,
};
pub use crate::buf::IoBuf;
pub use crate::desc::{BdevDesc, EventCallback};
pub use crate::error::{BdevError, ErrorKind, Result};
pub use crate::io::{
    BdevChannel, Completer, IoCallback, IoDone, ModuleChannel, ModuleIo, RawIo, SubmitError,
};
pub use crate::iostat::{tick_rate, ticks, IoStatSnapshot, OpStat};
pub use crate::module::{fini_modules, init_modules, modules, register_module, BdevModule};
pub use crate::registry::{registry, BdevRegistry};
pub use crate::rpc_util::{rpc_methods, RpcHandler};
