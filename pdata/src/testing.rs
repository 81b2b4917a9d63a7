//! Test doubles for [`BlockIo`] (feature `testing`): a write-recording device that can
//! rebuild the image as it would be after a power cut at any point of its write log, and a
//! fault-injecting wrapper that fails the N-th read, write or flush or flips bytes on read.
//!
//! Crash model of [`RecordingBlockIo`]: a write is durable once a later flush has completed.
//! When the power is cut after `prefix` events of the log, every write before the last flush
//! in that prefix is on disk; each write after it ("unsynced") may be lost, may land while an
//! earlier unsynced one is lost (reordering), or may be torn at a 512-byte sector boundary.
//! [`RecordingBlockIo::crash_image`] materialises one such outcome, chosen by a
//! [`CrashVariant`].
//!
//! [`Harness`] drives [`PoolMetadata`] and an in-memory model ([`ModelState`]) with the same
//! random operations ([`Op`], drawn by [`Harness::random_op`]) and reports the first
//! divergence; [`ModelState::to_xml`] gives the thin_dump XML the committed image must have.
//!
//! Both I/O types are cheap to clone; clones share state, so a test keeps a handle while the
//! metadata under test owns another.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::block_io::{BlockIo, BLOCK_SIZE};
use crate::error::{ErrorKind, Result};
use crate::thin::xml::{DeviceXml, PoolXml};
use crate::thin::{CacheOpts, DataBlock, DevId, DeviceDetails, PoolMetadata, ThinBlock};

/// Bytes per sector: the unit a torn write is cut at.
pub const SECTOR_SIZE: usize = 512;
const SECTORS_PER_BLOCK: usize = BLOCK_SIZE / SECTOR_SIZE;

/// A small deterministic PRNG (splitmix64) so tests can print and replay their seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Seed from the environment variable `name` if set (decimal), otherwise from the clock.
    pub fn seed_from_env(name: &str) -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0x5eed)
            })
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        self.next_u64() % n
    }

    /// True with probability `num/den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

/// One entry of the write log.
#[derive(Clone, Debug)]
pub enum IoEvent {
    /// A block write (completed, not yet durable).
    Write {
        /// Block number.
        loc: u64,
        /// The 4 KiB written.
        data: Box<[u8; BLOCK_SIZE]>,
    },
    /// A completed flush: every earlier write is durable.
    Flush,
}

/// Which of the possible on-disk states after a power cut to materialise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CrashVariant {
    /// Every unsynced write reached the disk.
    AllPersisted,
    /// No unsynced write reached the disk.
    NonePersisted,
    /// Only the unsynced writes whose index (0-based, among the unsynced) is in the set
    /// reached the disk, in log order: models reordering and loss.
    Subset(BTreeSet<usize>),
    /// Unsynced writes before `index` reached the disk; write `index` reached it only in its
    /// first `sectors` sectors (a torn write); later ones were lost.
    Torn {
        /// Index among the unsynced writes.
        index: usize,
        /// Sectors of that write that reached the disk (1..=7).
        sectors: usize,
    },
}

#[derive(Debug)]
struct RecInner {
    base: Vec<u8>,
    current: Vec<u8>,
    log: Vec<IoEvent>,
}

/// A [`BlockIo`] that behaves like a memory device and logs every write and flush in order.
#[derive(Debug, Clone)]
pub struct RecordingBlockIo {
    inner: Arc<Mutex<RecInner>>,
}

impl RecordingBlockIo {
    /// A zero-filled device of `nr_blocks` blocks with an empty log.
    pub fn new(nr_blocks: u64) -> RecordingBlockIo {
        RecordingBlockIo::from_image(vec![0; nr_blocks as usize * BLOCK_SIZE])
    }

    /// A device starting from `image` (truncated to whole blocks) with an empty log.
    pub fn from_image(mut image: Vec<u8>) -> RecordingBlockIo {
        image.truncate(image.len() / BLOCK_SIZE * BLOCK_SIZE);
        let inner = RecInner {
            base: image.clone(),
            current: image,
            log: Vec::new(),
        };
        RecordingBlockIo {
            inner: Arc::new(Mutex::new(inner)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, RecInner> {
        // A poisoned lock only means a panicking test thread; the bytes are still valid.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the current image the new base and clears the log (e.g. after formatting).
    pub fn reset_log(&self) {
        let mut g = self.lock();
        g.base = g.current.clone();
        g.log.clear();
    }

    /// Number of events logged.
    pub fn nr_events(&self) -> usize {
        self.lock().log.len()
    }

    /// A copy of the log.
    pub fn events(&self) -> Vec<IoEvent> {
        self.lock().log.clone()
    }

    /// Number of flushes in the first `prefix` events.
    pub fn nr_flushes_in(&self, prefix: usize) -> usize {
        self.lock()
            .log
            .iter()
            .take(prefix)
            .filter(|e| matches!(e, IoEvent::Flush))
            .count()
    }

    /// The current image (every write applied).
    pub fn image(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    /// Number of unsynced writes (after the last flush) within the first `prefix` events.
    pub fn nr_unsynced(&self, prefix: usize) -> usize {
        let g = self.lock();
        let prefix = prefix.min(g.log.len());
        let head = g.log.get(..prefix).unwrap_or_default();
        head.iter()
            .rev()
            .take_while(|e| !matches!(e, IoEvent::Flush))
            .count()
    }

    /// The image after the first `prefix` events when every logged write reached the disk.
    pub fn image_at(&self, prefix: usize) -> Vec<u8> {
        self.crash_image(prefix, &CrashVariant::AllPersisted)
    }

    /// The image after a power cut following the first `prefix` events, with the unsynced
    /// writes handled as `variant` says.
    pub fn crash_image(&self, prefix: usize, variant: &CrashVariant) -> Vec<u8> {
        let g = self.lock();
        let prefix = prefix.min(g.log.len());
        let head = g.log.get(..prefix).unwrap_or_default();
        let synced = head
            .iter()
            .rposition(|e| matches!(e, IoEvent::Flush))
            .map_or(0, |i| i + 1);
        let mut img = g.base.clone();
        for ev in head.get(..synced).unwrap_or_default() {
            if let IoEvent::Write { loc, data } = ev {
                apply(&mut img, *loc, data.as_slice());
            }
        }
        let unsynced = head.get(synced..).unwrap_or_default();
        for (i, ev) in unsynced.iter().enumerate() {
            let IoEvent::Write { loc, data } = ev else {
                continue;
            };
            match variant {
                CrashVariant::AllPersisted => apply(&mut img, *loc, data.as_slice()),
                CrashVariant::NonePersisted => {}
                CrashVariant::Subset(set) if set.contains(&i) => {
                    apply(&mut img, *loc, data.as_slice())
                }
                CrashVariant::Subset(_) => {}
                CrashVariant::Torn { index, .. } if i < *index => {
                    apply(&mut img, *loc, data.as_slice())
                }
                CrashVariant::Torn { index, sectors } if i == *index => {
                    let n = (*sectors).min(SECTORS_PER_BLOCK) * SECTOR_SIZE;
                    apply(&mut img, *loc, data.get(..n).unwrap_or_default());
                }
                CrashVariant::Torn { .. } => {}
            }
        }
        img
    }

    /// Every prefix worth cutting at: after each event (and 0), in order.
    pub fn cut_points(&self) -> std::ops::RangeInclusive<usize> {
        0..=self.nr_events()
    }

    /// Crash variants for a cut after `prefix` events: all/none persisted and, when there are
    /// unsynced writes, `nr_random` random subsets and one torn write, drawn from `rng`.
    pub fn crash_variants(
        &self,
        prefix: usize,
        nr_random: usize,
        rng: &mut Rng,
    ) -> Vec<CrashVariant> {
        let n = self.nr_unsynced(prefix);
        let mut out = vec![CrashVariant::AllPersisted];
        if n == 0 {
            return out;
        }
        out.push(CrashVariant::NonePersisted);
        for _ in 0..nr_random {
            let set = (0..n).filter(|_| rng.chance(1, 2)).collect();
            out.push(CrashVariant::Subset(set));
        }
        out.push(CrashVariant::Torn {
            index: rng.below(n as u64) as usize,
            sectors: 1 + rng.below(SECTORS_PER_BLOCK as u64 - 1) as usize,
        });
        out
    }
}

fn apply(img: &mut [u8], loc: u64, data: &[u8]) {
    let off = loc as usize * BLOCK_SIZE;
    if let Some(dst) = img.get_mut(off..off + data.len()) {
        dst.copy_from_slice(data);
    }
}

fn out_of_range(loc: u64, nr: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("block {loc} beyond device end ({nr})"),
    )
}

impl BlockIo for RecordingBlockIo {
    fn nr_blocks(&self) -> u64 {
        (self.lock().current.len() / BLOCK_SIZE) as u64
    }

    fn read_block(&self, loc: u64, buf: &mut [u8; BLOCK_SIZE]) -> io::Result<()> {
        let g = self.lock();
        let nr = (g.current.len() / BLOCK_SIZE) as u64;
        let off = (loc as usize).wrapping_mul(BLOCK_SIZE);
        match g.current.get(off..off.wrapping_add(BLOCK_SIZE)) {
            Some(src) if loc < nr => {
                buf.copy_from_slice(src);
                Ok(())
            }
            _ => Err(out_of_range(loc, nr)),
        }
    }

    fn write_block(&self, loc: u64, buf: &[u8; BLOCK_SIZE]) -> io::Result<()> {
        let mut g = self.lock();
        let nr = (g.current.len() / BLOCK_SIZE) as u64;
        if loc >= nr {
            return Err(out_of_range(loc, nr));
        }
        apply(&mut g.current, loc, buf);
        g.log.push(IoEvent::Write {
            loc,
            data: Box::new(*buf),
        });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.lock().log.push(IoEvent::Flush);
        Ok(())
    }
}

/// What [`FaultyBlockIo`] does wrong, changeable while the device is in use.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    /// Fail the N-th read (1-based, counted from the last [`FaultyBlockIo::set_plan`]).
    pub fail_read: Option<u64>,
    /// Fail the N-th write.
    pub fail_write: Option<u64>,
    /// Fail the N-th flush.
    pub fail_flush: Option<u64>,
    /// Once one fault fired, fail every later operation too (a device that died).
    pub sticky: bool,
    /// On every read of block `.0`, XOR byte `.1` with `.2` (silent corruption).
    pub flips: Vec<(u64, usize, u8)>,
}

#[derive(Debug, Default)]
struct FaultState {
    plan: FaultPlan,
    nr_reads: u64,
    nr_writes: u64,
    nr_flushes: u64,
    nr_faults: u64,
}

/// A [`BlockIo`] wrapper that injects failures and corruption according to a [`FaultPlan`].
#[derive(Clone)]
pub struct FaultyBlockIo<B> {
    inner: Arc<B>,
    state: Arc<Mutex<FaultState>>,
}

impl<B> std::fmt::Debug for FaultyBlockIo<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyBlockIo")
            .field("state", &self.lock())
            .finish()
    }
}

impl<B: BlockIo + Sync> FaultyBlockIo<B> {
    /// Wraps `inner` with an empty plan (no faults).
    pub fn new(inner: B) -> FaultyBlockIo<B> {
        FaultyBlockIo {
            inner: Arc::new(inner),
            state: Arc::default(),
        }
    }

    /// Replaces the plan and restarts the operation counters.
    pub fn set_plan(&self, plan: FaultPlan) {
        let mut g = self.lock();
        *g = FaultState {
            plan,
            ..FaultState::default()
        };
    }

    /// Reads, writes and flushes since the last `set_plan`, and faults injected.
    pub fn counts(&self) -> (u64, u64, u64, u64) {
        let g = self.lock();
        (g.nr_reads, g.nr_writes, g.nr_flushes, g.nr_faults)
    }

    /// The wrapped device.
    pub fn inner(&self) -> &B {
        &self.inner
    }
}

impl<B> FaultyBlockIo<B> {
    fn lock(&self) -> MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn injected(what: &str, n: u64) -> io::Error {
    io::Error::other(format!("injected fault: {what} #{n}"))
}

/// Counts one operation and decides whether it fails.
fn should_fail(st: &mut FaultState, which: u8) -> Option<u64> {
    let (count, target) = match which {
        b'r' => (&mut st.nr_reads, st.plan.fail_read),
        b'w' => (&mut st.nr_writes, st.plan.fail_write),
        _ => (&mut st.nr_flushes, st.plan.fail_flush),
    };
    *count += 1;
    let n = *count;
    if target == Some(n) || (st.plan.sticky && st.nr_faults > 0) {
        st.nr_faults += 1;
        return Some(n);
    }
    None
}

impl<B: BlockIo + Sync> BlockIo for FaultyBlockIo<B> {
    fn nr_blocks(&self) -> u64 {
        self.inner.nr_blocks()
    }

    fn read_block(&self, loc: u64, buf: &mut [u8; BLOCK_SIZE]) -> io::Result<()> {
        let flips = {
            let mut g = self.lock();
            if let Some(n) = should_fail(&mut g, b'r') {
                return Err(injected("read", n));
            }
            g.plan
                .flips
                .iter()
                .filter(|f| f.0 == loc)
                .copied()
                .collect::<Vec<_>>()
        };
        self.inner.read_block(loc, buf)?;
        for (_, off, xor) in flips {
            if let Some(b) = buf.get_mut(off) {
                *b ^= xor;
            }
        }
        Ok(())
    }

    fn write_block(&self, loc: u64, buf: &[u8; BLOCK_SIZE]) -> io::Result<()> {
        if let Some(n) = should_fail(&mut self.lock(), b'w') {
            return Err(injected("write", n));
        }
        self.inner.write_block(loc, buf)
    }

    fn flush(&self) -> io::Result<()> {
        if let Some(n) = should_fail(&mut self.lock(), b'f') {
            return Err(injected("flush", n));
        }
        self.inner.flush()
    }
}

// ------------------------------------------------------------------------------------------
// External tools
// ------------------------------------------------------------------------------------------

/// Finds an external tool (thin-provisioning-tools) in `PATH`, `/usr/sbin` or `/sbin`.
///
/// When it is missing: under `CI=true` this panics (a missing prerequisite is a failure);
/// otherwise it prints a loud SKIP line and returns None so the caller can skip.
pub fn require_tool(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]);
    for dir in dirs {
        let cand = dir.join(name);
        if cand.is_file() {
            return Some(cand);
        }
    }
    let msg = format!(
        "{name} not found (install the Debian package thin-provisioning-tools 0.9.0, e.g. with \
         scripts/install-prereqs.sh)"
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("missing prerequisite under CI=true: {msg}");
    }
    eprintln!("!!!!!!!! SKIPPED: {msg} !!!!!!!!");
    None
}

// ------------------------------------------------------------------------------------------
// Reference model of the pool metadata and a random workload against it
// ------------------------------------------------------------------------------------------

/// One thin device in the model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelDevice {
    /// Pool transaction id when created.
    pub transaction_id: u64,
    /// Pool time when created.
    pub creation_time: u32,
    /// Pool time of the latest snapshot of (or as) this device.
    pub snapshotted_time: u32,
    /// Virtual block → (data block, time).
    pub mappings: BTreeMap<u64, (u64, u32)>,
}

/// The whole metadata state at one point in time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelState {
    /// Pool time.
    pub time: u32,
    /// Userspace transaction id.
    pub transaction_id: u64,
    /// Data blocks in the pool.
    pub nr_data_blocks: u64,
    /// Devices by id.
    pub devices: BTreeMap<u64, ModelDevice>,
}

impl ModelState {
    /// The thin_dump XML of this state.
    pub fn to_xml(&self, data_block_size: u32) -> PoolXml {
        let devices = self
            .devices
            .iter()
            .map(|(&id, d)| {
                let mut dev = DeviceXml {
                    dev_id: id,
                    mapped_blocks: d.mappings.len() as u64,
                    transaction: d.transaction_id,
                    creation_time: d.creation_time,
                    snap_time: d.snapshotted_time,
                    mappings: Vec::new(),
                };
                dev.set_singles(d.mappings.iter().map(|(&v, &(b, t))| (v, b, t)));
                dev
            })
            .collect();
        PoolXml {
            uuid: String::new(),
            time: self.time,
            transaction: self.transaction_id,
            flags: 0,
            version: 2,
            data_block_size,
            nr_data_blocks: self.nr_data_blocks,
            devices,
        }
    }

    /// The state a thin_dump XML describes (`mapped_blocks` is taken from the mappings).
    pub fn from_xml(x: &PoolXml) -> ModelState {
        let devices = x
            .devices
            .iter()
            .map(|d| {
                let dev = ModelDevice {
                    transaction_id: d.transaction,
                    creation_time: d.creation_time,
                    snapshotted_time: d.snap_time,
                    mappings: d.singles().map(|(v, b, t)| (v, (b, t))).collect(),
                };
                (d.dev_id, dev)
            })
            .collect();
        ModelState {
            time: x.time,
            transaction_id: x.transaction,
            nr_data_blocks: x.nr_data_blocks,
            devices,
        }
    }

    /// Every data block some device maps.
    pub fn mapped_data_blocks(&self) -> BTreeSet<u64> {
        self.devices
            .values()
            .flat_map(|d| d.mappings.values().map(|m| m.0))
            .collect()
    }

    /// Total number of mappings.
    pub fn nr_mappings(&self) -> u64 {
        self.devices.values().map(|d| d.mappings.len() as u64).sum()
    }
}

/// One operation of the random workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `create_thin`.
    CreateThin(u64),
    /// `create_snap(dev, origin)`.
    CreateSnap {
        /// New device.
        dev: u64,
        /// Its origin.
        origin: u64,
    },
    /// `delete_thin`.
    Delete(u64),
    /// Allocate a data block and map `(dev, vblock)` to it (overwriting any mapping).
    Provision {
        /// Device.
        dev: u64,
        /// Virtual block.
        vblock: u64,
    },
    /// Map `(dev, vblock)` to the data block `(from_dev, from_vblock)` maps (inc + insert).
    Share {
        /// Device.
        dev: u64,
        /// Virtual block.
        vblock: u64,
        /// Device whose mapping is shared.
        from_dev: u64,
        /// Its virtual block.
        from_vblock: u64,
    },
    /// `remove_block`.
    Remove {
        /// Device.
        dev: u64,
        /// Virtual block.
        vblock: u64,
    },
    /// `remove_range(dev, begin, end)`.
    RemoveRange {
        /// Device.
        dev: u64,
        /// First block.
        begin: u64,
        /// One past the last block.
        end: u64,
    },
    /// `set_transaction_id(current, new)`.
    SetTransactionId(u64),
    /// `commit`.
    Commit,
    /// `abort`.
    Abort,
    /// Drop the metadata without committing and open the device again.
    Reopen,
    /// `reserve_metadata_snap`.
    ReserveSnap,
    /// `release_metadata_snap`.
    ReleaseSnap,
    /// `resize_data_dev` to this many blocks.
    ResizeData(u64),
}

impl Op {
    /// Short name for statistics.
    pub fn name(&self) -> &'static str {
        match self {
            Op::CreateThin(_) => "create_thin",
            Op::CreateSnap { .. } => "create_snap",
            Op::Delete(_) => "delete",
            Op::Provision { .. } => "provision",
            Op::Share { .. } => "share",
            Op::Remove { .. } => "remove",
            Op::RemoveRange { .. } => "remove_range",
            Op::SetTransactionId(_) => "set_transaction_id",
            Op::Commit => "commit",
            Op::Abort => "abort",
            Op::Reopen => "reopen",
            Op::ReserveSnap => "reserve_snap",
            Op::ReleaseSnap => "release_snap",
            Op::ResizeData(_) => "resize_data",
        }
    }
}

/// Shape of a random workload.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Device ids are drawn from `0..max_dev_id_pool` (plus, rarely, 2^24-1).
    pub dev_id_pool: u64,
    /// Soft cap on live devices.
    pub max_devices: usize,
    /// Virtual blocks are drawn from `0..vblock_space`.
    pub vblock_space: u64,
    /// Percent chance that an op is commit / abort / reopen (each).
    pub commit_pct: u64,
    /// See `commit_pct`.
    pub abort_pct: u64,
    /// See `commit_pct`.
    pub reopen_pct: u64,
    /// Include held-root reserve/release ops.
    pub held_roots: bool,
    /// Percent of the removal ops kept (the rest become provisions): lower grows bigger trees.
    pub removal_pct: u64,
}

impl Default for Workload {
    fn default() -> Workload {
        Workload {
            dev_id_pool: 24,
            max_devices: 10,
            vblock_space: 2048,
            commit_pct: 3,
            abort_pct: 1,
            reopen_pct: 1,
            held_roots: true,
            removal_pct: 100,
        }
    }
}

/// Opens a fresh view of the device under test (for reopen).
pub type IoFactory = Box<dyn FnMut() -> Box<dyn BlockIo> + Send>;

/// [`PoolMetadata`] and a model driven by the same operations, compared as they go.
pub struct Harness {
    meta: Option<PoolMetadata>,
    factory: IoFactory,
    opts: CacheOpts,
    data_block_size: u32,
    /// The state with uncommitted changes.
    pub current: ModelState,
    /// The state at the last commit.
    pub committed: ModelState,
    /// The held metadata snapshot (current view, committed view).
    pub held: (Option<ModelState>, Option<ModelState>),
    allocated_in_txn: BTreeSet<u64>,
    /// Operations applied, by name.
    pub counts: BTreeMap<&'static str, u64>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

fn kind_is(r: &Result<impl std::fmt::Debug>, kind: ErrorKind) -> bool {
    matches!(r, Err(e) if e.kind() == kind)
}

fn want<T: std::fmt::Debug>(
    what: &str,
    r: Result<T>,
    kind: ErrorKind,
) -> std::result::Result<(), String> {
    if kind_is(&r, kind) {
        Ok(())
    } else {
        Err(format!("{what}: expected {kind:?}, got {r:?}"))
    }
}

fn ok<T>(what: &str, r: Result<T>) -> std::result::Result<T, String> {
    r.map_err(|e| format!("{what}: unexpected error {e}"))
}

impl Harness {
    /// Formats a fresh pool on the device `factory` opens.
    pub fn format(
        mut factory: IoFactory,
        data_block_size: u32,
        nr_data_blocks: u64,
        opts: CacheOpts,
    ) -> Result<Harness> {
        let meta = PoolMetadata::format(factory(), data_block_size, nr_data_blocks, opts)?;
        let state = ModelState {
            nr_data_blocks,
            ..ModelState::default()
        };
        Ok(Harness {
            meta: Some(meta),
            factory,
            opts,
            data_block_size,
            current: state.clone(),
            committed: state,
            held: (None, None),
            allocated_in_txn: BTreeSet::new(),
            counts: BTreeMap::new(),
        })
    }

    /// Opens existing metadata whose committed contents are `state` (and `held`, the state
    /// of its held metadata snapshot, if one is held).
    pub fn open(
        mut factory: IoFactory,
        data_block_size: u32,
        state: ModelState,
        held: Option<ModelState>,
        opts: CacheOpts,
    ) -> Result<Harness> {
        let meta = PoolMetadata::open(factory(), data_block_size, opts)?;
        Ok(Harness {
            meta: Some(meta),
            factory,
            opts,
            data_block_size,
            current: state.clone(),
            committed: state,
            held: (held.clone(), held),
            allocated_in_txn: BTreeSet::new(),
            counts: BTreeMap::new(),
        })
    }

    /// The metadata under test.
    pub fn meta(&mut self) -> &mut PoolMetadata {
        self.meta
            .as_mut()
            .expect("metadata is open between operations")
    }

    /// Data block size the pool was formatted with.
    pub fn data_block_size(&self) -> u32 {
        self.data_block_size
    }

    /// The XML thin_dump must print for the committed state.
    pub fn committed_xml(&self) -> PoolXml {
        self.committed.to_xml(self.data_block_size)
    }

    /// The XML `thin_dump -m` must print for the committed held snapshot, if any.
    pub fn held_xml(&self) -> Option<PoolXml> {
        self.held.1.as_ref().map(|s| {
            let mut x = s.to_xml(self.data_block_size);
            x.nr_data_blocks = 0;
            x
        })
    }

    fn pick_dev(&self, rng: &mut Rng) -> u64 {
        let n = self.current.devices.len() as u64;
        if n == 0 || rng.chance(1, 20) {
            return rng.below(24);
        }
        self.current
            .devices
            .keys()
            .nth(rng.below(n) as usize)
            .copied()
            .unwrap_or(0)
    }

    fn new_dev_id(&self, w: &Workload, rng: &mut Rng) -> u64 {
        if rng.chance(1, 30) {
            crate::thin::MAX_DEV_ID
        } else {
            rng.below(w.dev_id_pool)
        }
    }

    fn pick_mapping(&self, rng: &mut Rng) -> Option<(u64, u64)> {
        let devs: Vec<(&u64, &ModelDevice)> = self
            .current
            .devices
            .iter()
            .filter(|(_, d)| !d.mappings.is_empty())
            .collect();
        let (&dev, d) = *devs.get(rng.below(devs.len().max(1) as u64) as usize)?;
        let v = d
            .mappings
            .keys()
            .nth(rng.below(d.mappings.len() as u64) as usize)?;
        Some((dev, *v))
    }

    /// Draws the next operation.
    pub fn random_op(&self, w: &Workload, rng: &mut Rng) -> Op {
        let roll = rng.below(100);
        let (c, a, r) = (w.commit_pct, w.abort_pct, w.reopen_pct);
        if roll < c {
            return Op::Commit;
        } else if roll < c + a {
            return Op::Abort;
        } else if roll < c + a + r {
            return Op::Reopen;
        }
        let few = self.current.devices.len() < 2;
        let full = self.current.devices.len() >= w.max_devices;
        match rng.below(100) {
            0..=3 if !full || few => Op::CreateThin(self.new_dev_id(w, rng)),
            4..=7 if !full => Op::CreateSnap {
                dev: self.new_dev_id(w, rng),
                origin: self.pick_dev(rng),
            },
            8..=9 if !few => Op::Delete(self.pick_dev(rng)),
            10..=54 => Op::Provision {
                dev: self.pick_dev(rng),
                vblock: rng.below(w.vblock_space),
            },
            55..=59 => match self.pick_mapping(rng) {
                Some((from_dev, from_vblock)) => Op::Share {
                    dev: self.pick_dev(rng),
                    vblock: rng.below(w.vblock_space),
                    from_dev,
                    from_vblock,
                },
                None => Op::Commit,
            },
            60..=84 if !rng.chance(w.removal_pct, 100) => Op::Provision {
                dev: self.pick_dev(rng),
                vblock: rng.below(w.vblock_space),
            },
            60..=79 => match self.pick_mapping(rng) {
                Some((dev, vblock)) if rng.chance(3, 4) => Op::Remove { dev, vblock },
                _ => Op::Remove {
                    dev: self.pick_dev(rng),
                    vblock: rng.below(w.vblock_space),
                },
            },
            80..=84 => {
                let begin = rng.below(w.vblock_space);
                Op::RemoveRange {
                    dev: self.pick_dev(rng),
                    begin,
                    end: begin + rng.below(400),
                }
            }
            85..=86 => Op::SetTransactionId(rng.below(1000)),
            87 if w.held_roots => Op::ReserveSnap,
            88 if w.held_roots => Op::ReleaseSnap,
            89 => Op::ResizeData(self.current.nr_data_blocks + rng.below(20_000)),
            _ => Op::Provision {
                dev: self.pick_dev(rng),
                vblock: rng.below(w.vblock_space),
            },
        }
    }

    /// Applies `op` to both the metadata and the model; Err describes a divergence (or an
    /// unexpected error).
    pub fn apply(&mut self, op: &Op) -> std::result::Result<(), String> {
        *self.counts.entry(op.name()).or_insert(0) += 1;
        match op {
            Op::CreateThin(_) | Op::CreateSnap { .. } | Op::Delete(_) => self.apply_device_op(op),
            Op::Provision { .. }
            | Op::Share { .. }
            | Op::Remove { .. }
            | Op::RemoveRange { .. } => self.apply_mapping_op(op),
            _ => self.apply_pool_op(op),
        }
    }

    fn apply_device_op(&mut self, op: &Op) -> std::result::Result<(), String> {
        match *op {
            Op::CreateThin(dev) => {
                let r = self.meta().create_thin(DevId(dev));
                if self.has(dev) {
                    return want("create_thin existing", r, ErrorKind::Exists);
                }
                ok("create_thin", r)?;
                let (t, time) = (self.current.transaction_id, self.current.time);
                let d = ModelDevice {
                    transaction_id: t,
                    creation_time: time,
                    snapshotted_time: time,
                    ..ModelDevice::default()
                };
                self.current.devices.insert(dev, d);
            }
            Op::CreateSnap { dev, origin } => {
                let r = self.meta().create_snap(DevId(dev), DevId(origin));
                if self.has(dev) {
                    return want("create_snap existing", r, ErrorKind::Exists);
                }
                if !self.has(origin) {
                    return want("create_snap of missing origin", r, ErrorKind::NotFound);
                }
                ok("create_snap", r)?;
                self.current.time += 1;
                let (t, time) = (self.current.transaction_id, self.current.time);
                let o = self
                    .current
                    .devices
                    .get_mut(&origin)
                    .ok_or("origin vanished")?;
                o.snapshotted_time = time;
                let mappings = o.mappings.clone();
                let d = ModelDevice {
                    transaction_id: t,
                    creation_time: time,
                    snapshotted_time: time,
                    mappings,
                };
                self.current.devices.insert(dev, d);
            }
            Op::Delete(dev) => {
                let r = self.meta().delete_thin(DevId(dev));
                if !self.has(dev) {
                    return want("delete missing", r, ErrorKind::NotFound);
                }
                ok("delete_thin", r)?;
                self.current.devices.remove(&dev);
            }
            _ => unreachable!("not a device op: {op:?}"),
        }
        Ok(())
    }

    fn apply_mapping_op(&mut self, op: &Op) -> std::result::Result<(), String> {
        match *op {
            Op::Provision { dev, vblock } => {
                if !self.has(dev) {
                    let r = self
                        .meta()
                        .insert_block(DevId(dev), ThinBlock(vblock), DataBlock(0));
                    return want("insert into missing device", r, ErrorKind::NotFound);
                }
                let r = self.meta().alloc_data_block();
                if kind_is(&r, ErrorKind::NoSpace) {
                    return self.check_no_space();
                }
                let b = ok("alloc_data_block", r)?.0;
                self.check_fresh_block(b)?;
                ok(
                    "insert_block",
                    self.meta()
                        .insert_block(DevId(dev), ThinBlock(vblock), DataBlock(b)),
                )?;
                self.map(dev, vblock, b);
            }
            Op::Share {
                dev,
                vblock,
                from_dev,
                from_vblock,
            } => {
                let from = self
                    .current
                    .devices
                    .get(&from_dev)
                    .and_then(|d| d.mappings.get(&from_vblock));
                let (Some(&(b, _)), true) = (from, self.has(dev)) else {
                    return Ok(());
                };
                let target = self
                    .current
                    .devices
                    .get(&dev)
                    .and_then(|d| d.mappings.get(&vblock));
                if target.is_some_and(|m| m.0 == b) {
                    // Re-inserting the block a mapping already has would keep the extra
                    // reference (an equal value is not dec'd).
                    return Ok(());
                }
                ok("inc_data_block", self.meta().inc_data_block(DataBlock(b)))?;
                ok(
                    "insert_block shared",
                    self.meta()
                        .insert_block(DevId(dev), ThinBlock(vblock), DataBlock(b)),
                )?;
                self.map(dev, vblock, b);
            }
            Op::Remove { dev, vblock } => {
                let r = self.meta().remove_block(DevId(dev), ThinBlock(vblock));
                let Some(d) = self.current.devices.get_mut(&dev) else {
                    return want("remove from missing device", r, ErrorKind::NotFound);
                };
                let was = d.mappings.remove(&vblock).is_some();
                let got = ok("remove_block", r)?;
                if got != was {
                    return Err(format!(
                        "remove_block({dev}, {vblock}) returned {got}, model {was}"
                    ));
                }
            }
            Op::RemoveRange { dev, begin, end } => {
                let r = self
                    .meta()
                    .remove_range(DevId(dev), ThinBlock(begin), ThinBlock(end));
                let Some(d) = self.current.devices.get_mut(&dev) else {
                    return want("remove_range on missing device", r, ErrorKind::NotFound);
                };
                let keys: Vec<u64> = d
                    .mappings
                    .range(begin..end.max(begin))
                    .map(|(k, _)| *k)
                    .collect();
                for k in &keys {
                    d.mappings.remove(k);
                }
                let got = ok("remove_range", r)?;
                if got != keys.len() as u64 {
                    return Err(format!(
                        "remove_range({dev}, {begin}, {end}) removed {got}, model {}",
                        keys.len()
                    ));
                }
            }
            _ => unreachable!("not a mapping op: {op:?}"),
        }
        Ok(())
    }

    fn apply_pool_op(&mut self, op: &Op) -> std::result::Result<(), String> {
        match *op {
            Op::SetTransactionId(new) => {
                let old = self.current.transaction_id;
                let r = self.meta().set_transaction_id(old.wrapping_add(1), new);
                want(
                    "set_transaction_id with a wrong old id",
                    r,
                    ErrorKind::InvalidArgument,
                )?;
                ok(
                    "set_transaction_id",
                    self.meta().set_transaction_id(old, new),
                )?;
                self.current.transaction_id = new;
            }
            Op::Commit => {
                ok("commit", self.meta().commit())?;
                self.committed = self.current.clone();
                self.held.1 = self.held.0.clone();
                self.allocated_in_txn.clear();
            }
            Op::Abort => {
                ok("abort", self.meta().abort())?;
                self.rollback();
            }
            Op::Reopen => {
                self.meta = None;
                let io = (self.factory)();
                let m = ok(
                    "reopen",
                    PoolMetadata::open(io, self.data_block_size, self.opts),
                )?;
                self.meta = Some(m);
                self.rollback();
            }
            Op::ReserveSnap => {
                let r = self.meta().reserve_metadata_snap();
                if self.held.0.is_some() {
                    return want("reserve while held", r, ErrorKind::Busy);
                }
                ok("reserve_metadata_snap", r)?;
                // Reserving commits first and snapshots that commit; the held root itself is
                // recorded in the superblock by the next commit.
                self.committed = self.current.clone();
                self.held.1 = self.held.0.take();
                self.allocated_in_txn.clear();
                self.held.0 = Some(self.committed.clone());
            }
            Op::ReleaseSnap => {
                let r = self.meta().release_metadata_snap();
                if self.held.0.is_none() {
                    return want("release while none held", r, ErrorKind::InvalidArgument);
                }
                ok("release_metadata_snap", r)?;
                self.held.0 = None;
            }
            Op::ResizeData(n) => {
                let r = self.meta().resize_data_dev(n);
                if n < self.current.nr_data_blocks {
                    return want("shrinking the data device", r, ErrorKind::InvalidArgument);
                }
                ok("resize_data_dev", r)?;
                self.current.nr_data_blocks = n;
            }
            _ => unreachable!("not a pool op: {op:?}"),
        }
        Ok(())
    }

    fn has(&self, dev: u64) -> bool {
        self.current.devices.contains_key(&dev)
    }

    fn rollback(&mut self) {
        self.current = self.committed.clone();
        self.held.0 = self.held.1.clone();
        self.allocated_in_txn.clear();
    }

    fn map(&mut self, dev: u64, vblock: u64, b: u64) {
        let time = self.current.time;
        if let Some(d) = self.current.devices.get_mut(&dev) {
            d.mappings.insert(vblock, (b, time));
        }
    }

    /// A newly allocated block must be free in every state anyone can still see, and not
    /// freed (or handed out) earlier in this transaction.
    fn check_fresh_block(&mut self, b: u64) -> std::result::Result<(), String> {
        if b >= self.current.nr_data_blocks {
            return Err(format!("allocated data block {b} past the end"));
        }
        let states = [
            Some(&self.current),
            Some(&self.committed),
            self.held.0.as_ref(),
            self.held.1.as_ref(),
        ];
        for s in states.into_iter().flatten() {
            if s.devices
                .values()
                .any(|d| d.mappings.values().any(|m| m.0 == b))
            {
                return Err(format!("allocated data block {b} is still mapped"));
            }
        }
        if !self.allocated_in_txn.insert(b) {
            return Err(format!(
                "data block {b} handed out twice in one transaction"
            ));
        }
        Ok(())
    }

    fn check_no_space(&mut self) -> std::result::Result<(), String> {
        let mut used = self.current.mapped_data_blocks();
        used.extend(self.committed.mapped_data_blocks());
        for h in [&self.held.0, &self.held.1].into_iter().flatten() {
            used.extend(h.mapped_data_blocks());
        }
        used.extend(self.allocated_in_txn.iter().copied());
        if (used.len() as u64) < self.current.nr_data_blocks {
            return Err(format!(
                "NoSpace with only {} of {} data blocks accounted for",
                used.len(),
                self.current.nr_data_blocks
            ));
        }
        Ok(())
    }

    /// Compares everything the metadata API reports with the model's current state.
    pub fn verify_live(&mut self, rng: &mut Rng) -> std::result::Result<(), String> {
        let want_devs: Vec<u64> = self.current.devices.keys().copied().collect();
        let devs: Vec<u64> = ok("devices", self.meta().devices())?
            .into_iter()
            .map(|d| d.0)
            .collect();
        if devs != want_devs {
            return Err(format!("devices {devs:?}, model {want_devs:?}"));
        }
        let (time, tid) = (self.current.time, self.current.transaction_id);
        let m = self.meta.as_ref().ok_or("metadata closed")?;
        if m.time() != time || m.transaction_id() != tid {
            return Err(format!(
                "time/transaction {}/{}, model {time}/{tid}",
                m.time(),
                m.transaction_id()
            ));
        }
        if m.held_root().is_some() != self.held.0.is_some() {
            return Err(format!(
                "held root {:?}, model {}",
                m.held_root(),
                self.held.0.is_some()
            ));
        }
        if m.data_nr_blocks() != self.current.nr_data_blocks {
            return Err(format!(
                "data blocks {}, model {}",
                m.data_nr_blocks(),
                self.current.nr_data_blocks
            ));
        }
        let devices: Vec<(u64, ModelDevice)> = self
            .current
            .devices
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (dev, d) in &devices {
            self.verify_device(*dev, d, rng)?;
        }
        let r = self.meta().device_details(DevId(1 << 30));
        match r {
            Ok(None) => Ok(()),
            other => Err(format!("details of a missing device: {other:?}")),
        }
    }

    fn verify_device(
        &mut self,
        dev: u64,
        d: &ModelDevice,
        rng: &mut Rng,
    ) -> std::result::Result<(), String> {
        let got = ok("device_details", self.meta().device_details(DevId(dev)))?;
        let want = DeviceDetails {
            mapped_blocks: d.mappings.len() as u64,
            transaction_id: d.transaction_id,
            creation_time: d.creation_time,
            snapshotted_time: d.snapshotted_time,
        };
        if got != Some(want) {
            return Err(format!("device {dev}: details {got:?}, model {want:?}"));
        }
        let mut from = 0u64;
        let mut seen = BTreeMap::new();
        while let Some((b, l)) = ok(
            "next_mapped",
            self.meta().next_mapped(DevId(dev), ThinBlock(from)),
        )? {
            if b.0 < from || seen.len() > d.mappings.len() {
                return Err(format!(
                    "device {dev}: next_mapped({from}) returned {}",
                    b.0
                ));
            }
            seen.insert(b.0, (l.data_block.0, l.time));
            let shared = d.snapshotted_time > l.time;
            if l.shared != shared {
                return Err(format!(
                    "device {dev} block {}: shared {} expected {shared}",
                    b.0, l.shared
                ));
            }
            from = b.0 + 1;
        }
        if seen != d.mappings {
            let diff: Vec<_> = seen
                .iter()
                .filter(|(k, v)| d.mappings.get(k) != Some(v))
                .take(5)
                .collect();
            let missing: Vec<_> = d
                .mappings
                .iter()
                .filter(|(k, _)| !seen.contains_key(k))
                .take(5)
                .collect();
            return Err(format!(
                "device {dev}: mappings differ: extra/wrong {diff:?}, missing {missing:?}"
            ));
        }
        for _ in 0..4 {
            let v = rng.below(d.mappings.keys().last().map_or(16, |k| k + 16));
            let got = ok(
                "find_block",
                self.meta().find_block(DevId(dev), ThinBlock(v)),
            )?;
            let got = got.map(|l| (l.data_block.0, l.time));
            if got != d.mappings.get(&v).copied() {
                return Err(format!(
                    "device {dev}: find_block({v}) = {got:?}, model {:?}",
                    d.mappings.get(&v)
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_io::MemBlockIo;

    fn block(v: u8) -> [u8; BLOCK_SIZE] {
        [v; BLOCK_SIZE]
    }

    #[test]
    fn recording_materialises_prefixes_and_crash_variants() {
        let io = RecordingBlockIo::new(4);
        io.write_block(1, &block(1)).unwrap();
        io.flush().unwrap();
        io.write_block(2, &block(2)).unwrap();
        io.write_block(3, &block(3)).unwrap();
        assert_eq!(io.nr_events(), 4);
        assert_eq!(io.nr_unsynced(4), 2);
        assert_eq!(io.nr_unsynced(2), 0);
        let at = |img: &[u8], b: usize| img[b * BLOCK_SIZE];
        let img = io.image_at(1);
        assert_eq!((at(&img, 1), at(&img, 2)), (1, 0));
        let none = io.crash_image(4, &CrashVariant::NonePersisted);
        assert_eq!((at(&none, 1), at(&none, 2), at(&none, 3)), (1, 0, 0));
        let sub = io.crash_image(4, &CrashVariant::Subset([1].into()));
        assert_eq!((at(&sub, 2), at(&sub, 3)), (0, 3));
        let torn = io.crash_image(
            4,
            &CrashVariant::Torn {
                index: 1,
                sectors: 3,
            },
        );
        assert_eq!(at(&torn, 2), 2);
        assert_eq!(torn[3 * BLOCK_SIZE + 3 * SECTOR_SIZE - 1], 3);
        assert_eq!(torn[3 * BLOCK_SIZE + 3 * SECTOR_SIZE], 0);
        assert_eq!(io.image(), io.image_at(4));
        let mut rng = Rng::new(1);
        assert_eq!(io.crash_variants(2, 3, &mut rng).len(), 1);
        assert_eq!(io.crash_variants(4, 3, &mut rng).len(), 6);
        assert!(io.write_block(4, &block(0)).is_err());
    }

    #[test]
    fn faulty_fails_the_nth_operation_and_flips_bytes() {
        let mem = MemBlockIo::new(4);
        let io = FaultyBlockIo::new(mem);
        io.set_plan(FaultPlan {
            fail_write: Some(2),
            ..FaultPlan::default()
        });
        io.write_block(0, &block(5)).unwrap();
        assert!(io.write_block(0, &block(6)).is_err());
        io.write_block(0, &block(7)).unwrap();
        io.set_plan(FaultPlan {
            flips: vec![(0, 10, 0xff)],
            fail_flush: Some(1),
            ..Default::default()
        });
        let mut buf = block(0);
        io.read_block(0, &mut buf).unwrap();
        assert_eq!((buf[9], buf[10]), (7, !7));
        assert!(io.flush().is_err());
        io.set_plan(FaultPlan {
            fail_read: Some(1),
            sticky: true,
            ..FaultPlan::default()
        });
        assert!(io.read_block(0, &mut buf).is_err());
        assert!(io.write_block(0, &buf).is_err());
        assert_eq!(io.counts(), (1, 1, 0, 2));
    }
}
