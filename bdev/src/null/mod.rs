//! The null bdev: writes are discarded, reads complete without touching the buffer (as
//! SPDK's null bdev), and every I/O completes from the channel's next poll. Supports read,
//! write, write_zeroes and reset (SPDK's set). Control path: [`create`], [`delete`],
//! [`resize`].

pub mod rpc;

use std::sync::Arc;

use serde_json::{json, Value};

use crate::bdev::{Bdev, BdevCore, BdevCoreOpts, IoStatus, IoType, Uuid};
use crate::error::{BdevError, ErrorKind, Result};
use crate::io::{Completer, ModuleChannel, ModuleIo};
use crate::module::BdevModule;
use crate::registry::registry;

/// Module name.
pub const MODULE_NAME: &str = "null";

/// Options of [`create`].
#[derive(Debug, Clone)]
pub struct NullOpts {
    /// Bdev name.
    pub name: String,
    /// Size in blocks.
    pub num_blocks: u64,
    /// Block size in bytes (multiple of 512).
    pub block_size: u32,
    /// UUID (random if `None`).
    pub uuid: Option<Uuid>,
}

/// A null bdev.
pub struct NullBdev {
    core: BdevCore,
}

impl Bdev for NullBdev {
    fn core(&self) -> &BdevCore {
        &self.core
    }

    fn io_type_supported(&self, io_type: IoType) -> bool {
        matches!(
            io_type,
            IoType::Read | IoType::Write | IoType::WriteZeroes | IoType::Reset
        )
    }

    fn create_channel(&self, completer: Completer) -> Result<Box<dyn ModuleChannel>> {
        Ok(Box::new(NullChannel { completer }))
    }

    fn write_config_json(&self) -> Option<Value> {
        Some(json!({
            "method": "bdev_null_create",
            "params": {
                "name": self.core.name(),
                "num_blocks": self.core.num_blocks(),
                "block_size": self.core.block_size(),
                "uuid": self.core.uuid().to_string(),
            }
        }))
    }
}

struct NullChannel {
    completer: Completer,
}

impl ModuleChannel for NullChannel {
    #[inline]
    fn submit(&mut self, io: ModuleIo) {
        self.completer.complete(io, IoStatus::Success);
    }
}

/// Creates and registers a null bdev. Errors: `EINVAL` (geometry), `EEXIST` (name/UUID).
pub fn create(opts: NullOpts) -> Result<Arc<NullBdev>> {
    let core = BdevCore::new(BdevCoreOpts {
        name: opts.name,
        aliases: Vec::new(),
        uuid: opts.uuid,
        product_name: "Null disk",
        module_name: MODULE_NAME,
        block_size: opts.block_size,
        num_blocks: opts.num_blocks,
        optimal_io_boundary: 0,
        write_cache: false,
    })?;
    let bdev = Arc::new(NullBdev { core });
    registry().register(bdev.clone())?;
    Ok(bdev)
}

fn lookup_null(name: &str) -> Result<Arc<dyn Bdev>> {
    match registry().lookup(name) {
        Some(b) if b.core().module_name() == MODULE_NAME => Ok(b),
        _ => Err(BdevError::new(
            ErrorKind::NotFound,
            format!("no null bdev named '{name}'"),
        )),
    }
}

/// Deletes (hot-removes) the null bdev `name`. Errors: `ENODEV`.
pub fn delete(name: &str) -> Result<()> {
    lookup_null(name)?;
    registry().unregister(name).map(|_| ())
}

/// Resizes the null bdev `name` to `new_size_mib` MiB and notifies open descriptors.
///
/// Errors: `ENODEV`; `EINVAL` if the size is 0 or not a block multiple; `EBUSY` if
/// shrinking while open.
pub fn resize(name: &str, new_size_mib: u64) -> Result<()> {
    let bdev = lookup_null(name)?;
    let bs = u64::from(bdev.block_size());
    let bytes = new_size_mib
        .checked_mul(1 << 20)
        .ok_or_else(|| BdevError::invalid(format!("new_size {new_size_mib} MiB too large")))?;
    if bytes % bs != 0 {
        return Err(BdevError::invalid(format!(
            "new_size {new_size_mib} MiB is not a multiple of the {bs}-byte block size"
        )));
    }
    bdev.core().notify_resize(bytes / bs)
}

/// The null module.
pub struct NullModule;

impl BdevModule for NullModule {
    fn name(&self) -> &'static str {
        MODULE_NAME
    }
}
