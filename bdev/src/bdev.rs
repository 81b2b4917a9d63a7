//! The `Bdev` trait every block device implements, the generic per-bdev state (`BdevCore`)
//! every implementation embeds, I/O types and statuses, and UUIDs.
//!
//! A bdev is shared (`Arc<dyn Bdev>`, `Send + Sync`): its geometry and control-path state
//! may be read from any thread. Its data path lives in per-reactor [`ModuleChannel`]s that
//! the generic layer creates through [`Bdev::create_channel`] on the reactor that will use
//! them. Control-path state (descriptors, claim, channel statistics list) sits behind one
//! mutex that the data path never takes.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use serde_json::{json, Value};

use crate::desc::DescEntry;
use crate::error::{BdevError, ErrorKind, Result};
use crate::io::{Completer, ModuleChannel};
use crate::iostat::{ChannelStats, IoStatSnapshot};

/// The kinds of bdev I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IoType {
    /// Read blocks into the caller's buffer.
    Read = 0,
    /// Write blocks from the caller's buffer.
    Write = 1,
    /// Discard (deallocate) blocks; contents afterwards are bdev-defined.
    Unmap = 2,
    /// Make every write completed before this flush durable.
    Flush = 3,
    /// Reset the bdev: freezes every channel, waits for the I/O in flight on all of them,
    /// resets the module, unfreezes and completes (see [`crate::BdevChannel::reset`]).
    Reset = 4,
    /// Write zeroes to blocks without a data buffer.
    WriteZeroes = 5,
}

impl IoType {
    /// All I/O types, in `supported_io_types` order.
    pub const ALL: [IoType; 6] = [
        IoType::Read,
        IoType::Write,
        IoType::Unmap,
        IoType::Flush,
        IoType::Reset,
        IoType::WriteZeroes,
    ];

    /// SPDK's name of the I/O type in `supported_io_types`.
    pub fn name(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::Unmap => "unmap",
            IoType::Flush => "flush",
            IoType::Reset => "reset",
            IoType::WriteZeroes => "write_zeroes",
        }
    }

    /// Whether this I/O type carries a data buffer.
    pub fn has_data(self) -> bool {
        matches!(self, IoType::Read | IoType::Write)
    }
}

/// The outcome of one I/O, delivered in [`crate::IoDone`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    /// The I/O succeeded.
    Success,
    /// The I/O failed with this positive errno (`EIO`, `ENOSPC`, `EINVAL`, …).
    Failed(i32),
    /// The I/O was aborted (e.g. by a reset or a channel shutdown).
    Aborted,
}

impl IoStatus {
    /// True for [`IoStatus::Success`].
    pub fn is_success(self) -> bool {
        self == IoStatus::Success
    }

    /// Positive errno, 0 on success.
    pub fn errno(self) -> i32 {
        match self {
            IoStatus::Success => 0,
            IoStatus::Failed(e) => e,
            IoStatus::Aborted => libc::ECANCELED,
        }
    }
}

/// A 128-bit UUID, printed in the canonical lower-case 8-4-4-4-12 form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// A random (version 4) UUID from the kernel's random source.
    pub fn new_v4() -> Uuid {
        let mut b = [0u8; 16];
        let mut filled = 0;
        while filled < b.len() {
            let rest = &mut b[filled..];
            // SAFETY: rest is a valid writable buffer of rest.len() bytes.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if n > 0 {
                filled += n as usize;
            }
        }
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Uuid(b)
    }

    /// Parses the canonical 36-character form (case-insensitive).
    pub fn parse(s: &str) -> Result<Uuid> {
        let bad = || BdevError::invalid(format!("invalid UUID '{s}'"));
        let bytes = s.as_bytes();
        if bytes.len() != 36 {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        let mut nibbles = 0usize;
        for (i, &c) in bytes.iter().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                if c != b'-' {
                    return Err(bad());
                }
                continue;
            }
            let v = (c as char).to_digit(16).ok_or_else(bad)? as u8;
            let byte = out.get_mut(nibbles / 2).ok_or_else(bad)?;
            *byte = (*byte << 4) | v;
            nibbles += 1;
        }
        Ok(Uuid(out))
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uuid({self})")
    }
}

/// Events delivered to open descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BdevEvent {
    /// The bdev changed size; `num_blocks` is the new size.
    Resize {
        /// New number of blocks.
        num_blocks: u64,
    },
    /// The bdev is being deleted: close the descriptor (drop it and its channels) soon.
    Remove,
}

/// Everything needed to build a [`BdevCore`].
#[derive(Debug, Clone)]
pub struct BdevCoreOpts {
    /// Unique bdev name.
    pub name: String,
    /// Extra names; each unique across names and aliases.
    pub aliases: Vec<String>,
    /// UUID; a random one if `None`.
    pub uuid: Option<Uuid>,
    /// `product_name` in `bdev_get_bdevs` (SPDK: "Null disk", "Malloc disk", "URING bdev").
    pub product_name: &'static str,
    /// Name of the [`crate::BdevModule`] that owns the bdev.
    pub module_name: &'static str,
    /// Logical block size in bytes: a multiple of 512.
    pub block_size: u32,
    /// Size in blocks; > 0.
    pub num_blocks: u64,
    /// I/Os crossing a multiple of this many blocks are split (0 = never).
    pub optimal_io_boundary: u32,
    /// Whether the device has a volatile write cache (flush matters).
    pub write_cache: bool,
}

/// Generic state every bdev embeds and returns from [`Bdev::core`].
pub struct BdevCore {
    name: String,
    uuid: Uuid,
    product_name: &'static str,
    module_name: &'static str,
    block_size: u32,
    num_blocks: AtomicU64,
    optimal_io_boundary: u32,
    write_cache: bool,
    id: u64,
    pub(crate) state: Mutex<CoreState>,
}

/// Control-path state (behind `BdevCore::state`).
#[derive(Default)]
pub(crate) struct CoreState {
    pub aliases: Vec<String>,
    pub descs: Vec<DescEntry>,
    /// (descriptor id, module name) of the exclusive claim.
    pub claim: Option<(u64, String)>,
    pub registered: bool,
    pub removed: bool,
    pub destructed: bool,
    pub channels: Vec<Weak<ChannelStats>>,
    pub retired: IoStatSnapshot,
    /// Generations of bdev-wide resets (`io/reset.rs`), counted from 1.
    pub reset_gen: u64,
    /// The generation of the reset that has every channel frozen now, if any.
    pub reset_frozen: Option<u64>,
    /// Reactors with a reset waiting (one entry per reset, FIFO); the head is running.
    pub reset_waiting: std::collections::VecDeque<reactor::ReactorId>,
}

static NEXT_BDEV_ID: AtomicU64 = AtomicU64::new(1);

impl BdevCore {
    /// Validates `opts` and builds the generic state.
    ///
    /// Errors (`EINVAL`): empty name, block size not a non-zero multiple of 512, zero blocks,
    /// size in bytes overflowing u64.
    pub fn new(opts: BdevCoreOpts) -> Result<BdevCore> {
        if opts.name.is_empty() {
            return Err(BdevError::invalid("bdev name must not be empty"));
        }
        validate_geometry(&opts.name, opts.block_size, opts.num_blocks)?;
        Ok(BdevCore {
            name: opts.name,
            uuid: opts.uuid.unwrap_or_else(Uuid::new_v4),
            product_name: opts.product_name,
            module_name: opts.module_name,
            block_size: opts.block_size,
            num_blocks: AtomicU64::new(opts.num_blocks),
            optimal_io_boundary: opts.optimal_io_boundary,
            write_cache: opts.write_cache,
            id: NEXT_BDEV_ID.fetch_add(1, Ordering::Relaxed),
            state: Mutex::new(CoreState {
                aliases: opts.aliases,
                ..CoreState::default()
            }),
        })
    }

    /// Unique name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// UUID.
    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    /// Product name for `bdev_get_bdevs`.
    pub fn product_name(&self) -> &'static str {
        self.product_name
    }

    /// Owning module name.
    pub fn module_name(&self) -> &'static str {
        self.module_name
    }

    /// Logical block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Current size in blocks (changes on resize).
    pub fn num_blocks(&self) -> u64 {
        self.num_blocks.load(Ordering::Acquire)
    }

    /// Split boundary in blocks (0 = none).
    pub fn optimal_io_boundary(&self) -> u32 {
        self.optimal_io_boundary
    }

    /// Whether the device has a volatile write cache.
    pub fn write_cache(&self) -> bool {
        self.write_cache
    }

    /// Process-unique id (keys per-thread channel caches).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Current aliases.
    pub fn aliases(&self) -> Vec<String> {
        self.lock().aliases.clone()
    }

    /// Module name of the current claim, if any.
    pub fn claimed_by(&self) -> Option<String> {
        self.lock().claim.as_ref().map(|(_, m)| m.clone())
    }

    /// Number of open descriptors.
    pub fn nr_open_descs(&self) -> usize {
        self.lock().descs.len()
    }

    /// Changes the size and sends [`BdevEvent::Resize`] to every open descriptor (SPDK's
    /// `spdk_bdev_notify_blockcnt_change`). Control path; any thread.
    ///
    /// Errors: `EINVAL` for 0 blocks, `EBUSY` when shrinking while descriptors are open.
    pub fn notify_resize(&self, num_blocks: u64) -> Result<()> {
        validate_geometry(&self.name, self.block_size, num_blocks)?;
        let callbacks = {
            let st = self.lock();
            let old = self.num_blocks();
            if num_blocks < old && !st.descs.is_empty() {
                return Err(BdevError::new(
                    ErrorKind::Busy,
                    format!(
                        "cannot shrink bdev '{}' from {old} to {num_blocks} blocks while it is open",
                        self.name
                    ),
                ));
            }
            self.num_blocks.store(num_blocks, Ordering::Release);
            if num_blocks == old {
                return Ok(());
            }
            st.descs
                .iter()
                .map(|d| d.event_cb.clone())
                .collect::<Vec<_>>()
        };
        for cb in callbacks {
            cb.deliver(BdevEvent::Resize { num_blocks });
        }
        Ok(())
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, CoreState> {
        // A panic while holding this lock cannot leave the state half-updated in a way that
        // matters more than losing the bdev; keep going with the inner value.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sums the per-channel statistics (live channels plus retired ones).
    pub fn iostat(&self) -> IoStatSnapshot {
        let mut st = self.lock();
        let mut total = st.retired;
        st.channels.retain(|w| match w.upgrade() {
            Some(ch) => {
                total.add(&ch.snapshot());
                true
            }
            None => false,
        });
        total
    }
}

fn validate_geometry(name: &str, block_size: u32, num_blocks: u64) -> Result<()> {
    if block_size == 0 || !block_size.is_multiple_of(512) {
        return Err(BdevError::invalid(format!(
            "bdev '{name}': block size {block_size} is not a non-zero multiple of 512"
        )));
    }
    if num_blocks == 0 {
        return Err(BdevError::invalid(format!(
            "bdev '{name}': num_blocks must be > 0"
        )));
    }
    if num_blocks.checked_mul(u64::from(block_size)).is_none() {
        return Err(BdevError::invalid(format!(
            "bdev '{name}': size overflows 64 bits"
        )));
    }
    Ok(())
}

/// A block device (STYLE rule 14). Implemented by each module; shared as `Arc<dyn Bdev>`.
///
/// I/O (read, write, flush, unmap, write_zeroes, reset) is not called on the trait: open a
/// [`crate::BdevDesc`], get a [`crate::BdevChannel`] on your reactor and submit there. The
/// generic layer validates ranges, splits at [`BdevCore::optimal_io_boundary`], keeps
/// statistics and then hands each I/O to the module's per-reactor [`ModuleChannel`].
pub trait Bdev: Send + Sync + 'static {
    /// The embedded generic state.
    fn core(&self) -> &BdevCore;

    /// Whether the module implements `io_type`. Unsupported I/O fails with `ENOTSUP` at submit.
    fn io_type_supported(&self, io_type: IoType) -> bool;

    /// Creates this bdev's data-path state for the calling reactor. `completer` is how the
    /// channel reports finished I/O. Called on the reactor that will submit.
    fn create_channel(&self, completer: Completer) -> Result<Box<dyn ModuleChannel>>;

    /// `driver_specific` entry for `bdev_get_bdevs`: `(key, object)`, e.g. `("uring", {...})`.
    fn driver_specific(&self) -> Option<(&'static str, Value)> {
        None
    }

    /// The RPC `{"method": ..., "params": ...}` that recreates this bdev (for save_config),
    /// or `None` if it is not created by RPC.
    fn write_config_json(&self) -> Option<Value> {
        None
    }

    /// Called once after the bdev was unregistered and its last descriptor closed.
    fn destruct(&self) {}

    /// Name.
    fn name(&self) -> &str {
        self.core().name()
    }

    /// Aliases.
    fn aliases(&self) -> Vec<String> {
        self.core().aliases()
    }

    /// UUID.
    fn uuid(&self) -> Uuid {
        self.core().uuid()
    }

    /// Block size in bytes.
    fn block_size(&self) -> u32 {
        self.core().block_size()
    }

    /// Number of blocks.
    fn num_blocks(&self) -> u64 {
        self.core().num_blocks()
    }

    /// Optimal I/O boundary in blocks (0 = none).
    fn optimal_io_boundary(&self) -> u32 {
        self.core().optimal_io_boundary()
    }
}

/// `bdev_get_bdevs` description of one bdev, in SPDK's field names.
pub fn bdev_info_json(bdev: &dyn Bdev) -> Value {
    let core = bdev.core();
    let mut supported = serde_json::Map::new();
    for t in IoType::ALL {
        supported.insert(t.name().to_string(), Value::Bool(bdev.io_type_supported(t)));
    }
    for other in [
        "nvme_admin",
        "nvme_io",
        "zcopy",
        "compare",
        "compare_and_write",
        "abort",
    ] {
        supported.insert(other.to_string(), Value::Bool(false));
    }
    let mut driver_specific = serde_json::Map::new();
    if let Some((key, v)) = bdev.driver_specific() {
        driver_specific.insert(key.to_string(), v);
    }
    let claimed_by = core.claimed_by();
    let mut info = json!({
        "name": core.name(),
        "aliases": core.aliases(),
        "product_name": core.product_name(),
        "block_size": core.block_size(),
        "num_blocks": core.num_blocks(),
        "uuid": core.uuid().to_string(),
        "assigned_rate_limits": {
            "rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0,
            "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0
        },
        "claimed": claimed_by.is_some(),
        "zoned": false,
        "supported_io_types": supported,
        "driver_specific": driver_specific,
    });
    if core.optimal_io_boundary() > 0 {
        info["optimal_io_boundary"] = json!(core.optimal_io_boundary());
    }
    if let Some(module) = claimed_by {
        info["claim_type"] = json!("exclusive_write");
        info["claimed_by"] = json!(module);
    }
    info
}

/// Helper for modules: a shared handle type.
pub type BdevRef = Arc<dyn Bdev>;
