//! `ThinPool`: the pool's shared control-path state and its metadata worker.
//!
//! The worker is one plain thread per pool that owns the `PoolMetadata` (which is synchronous
//! and single-threaded). Shards (the reactors owning thin bdevs) and the control path talk to
//! it only with [`Msg`]s; it answers by messaging the shard's reactor. Its metadata I/O is
//! blocking I/O on the metadata bdev through a reactor ([`super::meta_io`]).
//!
//! Durability is decided here: [`Worker::commit`] flushes the data bdev (dm-thin's
//! `pre_commit`), then commits the metadata. Flush requests queued while the worker was busy
//! share one commit. Blocks allocated to shards but not yet mapped ("outstanding") and freed
//! blocks whose discard is still going down to the data bdev ("discarding") are held: dropped
//! from the space map for the duration of each commit and taken again right after, so the
//! committed space map never leaks them and nobody allocates them meanwhile; blocks freed in
//! the open transaction are never handed out before it commits (pdata guarantees this for
//! `alloc_data_block`). A discarded block is thus reusable only after both the commit that
//! freed it and its passdown completed; the worker never waits for the passdown.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pdata::thin::{DataBlock, DevId, PoolMetadata, ThinBlock};
use reactor::RuntimeHandle;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::meta_io::{SyncIo, SyncOp};
use super::{emit_event, PoolOpts, LABEL_DEV};
use crate::bdev::{Bdev, Uuid};
use crate::desc::BdevDesc;
use crate::error::{BdevError, ErrorKind};

/// Thin blocks a cache-miss lookup returns at once (one B-tree leaf holds up to 252).
pub const LOOKUP_WINDOW: u64 = 256;

/// Pool modes (status `mode`).
pub const MODE_RW: u8 = 0;
/// Read-only after a metadata failure.
pub const MODE_RO: u8 = 1;
/// No free data blocks.
pub const MODE_OUT_OF_DATA_SPACE: u8 = 2;

/// Free data blocks below which shards get no batches (allocation on demand only).
const RESERVE_FLOOR: u64 = 64;

/// Most messages the worker handles before looking at commits and timeouts (rule 10).
const MAX_MSGS_PER_ROUND: usize = 1024;

/// A job run on the worker with the worker itself.
pub(crate) type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// Messages to the worker.
pub(crate) enum Msg {
    /// Run a closure on the worker.
    Job(Job),
    /// Commit and stop; the reply gets the commit result.
    Stop(Box<dyn FnOnce(Result<(), i32>) + Send>),
}

/// A deferred reply to a shard (or control-path waiter).
pub(crate) type Reply<T> = Box<dyn FnOnce(Result<T, i32>) + Send>;

/// Shared, `Send + Sync` pool state (control path).
pub struct PoolShared {
    pub(crate) name: String,
    pub(crate) uuid: Mutex<Uuid>,
    pub(crate) opts: PoolOpts,
    pub(crate) rt: RuntimeHandle,
    /// (data, metadata) descriptors, claimed; taken (closed) when the pool is deleted.
    pub(crate) descs: Mutex<Option<(Arc<BdevDesc>, Arc<BdevDesc>)>>,
    pub(crate) data_bdev: Arc<dyn Bdev>,
    pub(crate) meta_bdev: Arc<dyn Bdev>,
    pub(crate) tx: Mutex<Option<mpsc::Sender<Msg>>>,
    /// Data block size in bytes.
    pub(crate) dbs_bytes: u64,
    pub(crate) mode: AtomicU8,
    pub(crate) needs_check: AtomicBool,
    /// Bumped whenever shard caches must be dropped (rollback to the last commit).
    pub(crate) epoch: AtomicU64,
    pub(crate) next_owner: AtomicUsize,
    pub(crate) thins: Mutex<BTreeMap<String, Arc<super::vbdev::ThinBdev>>>,
}

impl PoolShared {
    pub(crate) fn lock_thins(
        &self,
    ) -> MutexGuard<'_, BTreeMap<String, Arc<super::vbdev::ThinBdev>>> {
        self.thins.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The data bdev's descriptor (`None` after the pool was closed).
    pub(crate) fn data_desc(&self) -> Option<Arc<BdevDesc>> {
        let d = self.descs.lock().unwrap_or_else(|e| e.into_inner());
        d.as_ref().map(|(data, _)| data.clone())
    }

    /// A sender to the worker (`None` after the pool was closed).
    pub(crate) fn sender(&self) -> Option<mpsc::Sender<Msg>> {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs `job` on the worker. Errors: `ENODEV` when the pool is closed.
    pub(crate) fn send_job(&self, job: Job) -> Result<(), i32> {
        match self.sender() {
            Some(tx) => tx.send(Msg::Job(job)).map_err(|_| libc::ENODEV),
            None => Err(libc::ENODEV),
        }
    }

    /// Mode name as in the status.
    pub fn mode_name(&self) -> &'static str {
        match self.mode.load(Ordering::Acquire) {
            MODE_RO => "ro",
            MODE_OUT_OF_DATA_SPACE => "out_of_data_space",
            _ => "rw",
        }
    }
}

/// One thin bdev's persistent label (not part of dm-thin's metadata).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Label {
    pub name: String,
    pub uuid: String,
    pub num_blocks: u64,
    pub block_size: u32,
}

/// The label table stored in the mapped block 0 of [`LABEL_DEV`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct LabelTable {
    pub pool_uuid: String,
    pub thins: BTreeMap<u64, Label>,
}

/// Label block layout: magic (8) | crc32c of body (4, LE) | body length (4, LE) | JSON body.
const LABEL_MAGIC: &[u8; 8] = b"THNLBL01";
const LABEL_HEADER: usize = 16;
/// Salt of the label checksum (distinct from every dm-thin block salt).
const LABEL_CSUM_SALT: u32 = 0x7468_6c62;
/// Bytes of the label data block that are written and read.
pub(crate) const LABEL_REGION: usize = 64 * 1024;

pub(crate) fn encode_labels(t: &LabelTable) -> Result<Vec<u8>, BdevError> {
    let body = serde_json::to_vec(t)
        .map_err(|e| BdevError::invalid(format!("label table encoding: {e}")))?;
    if LABEL_HEADER + body.len() > LABEL_REGION {
        return Err(BdevError::new(
            ErrorKind::Io(libc::ENOSPC),
            format!(
                "label table of {} bytes exceeds the {LABEL_REGION}-byte label block",
                body.len()
            ),
        ));
    }
    let mut out = vec![0u8; LABEL_REGION];
    out[..8].copy_from_slice(LABEL_MAGIC);
    let csum = pdata::checksum::dm_checksum(&body, LABEL_CSUM_SALT);
    out[8..12].copy_from_slice(&csum.to_le_bytes());
    out[12..16].copy_from_slice(&(body.len() as u32).to_le_bytes());
    out[LABEL_HEADER..LABEL_HEADER + body.len()].copy_from_slice(&body);
    Ok(out)
}

pub(crate) fn decode_labels(block: &[u8]) -> Result<LabelTable, String> {
    let field = |r: std::ops::Range<usize>| -> Result<[u8; 4], String> {
        block
            .get(r)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .ok_or_else(|| "label block truncated".to_string())
    };
    if block.get(..8) != Some(LABEL_MAGIC.as_slice()) {
        return Err("label block: bad magic".into());
    }
    let csum = u32::from_le_bytes(field(8..12)?);
    let len = u32::from_le_bytes(field(12..16)?) as usize;
    let body = block
        .get(LABEL_HEADER..LABEL_HEADER.saturating_add(len))
        .ok_or("label block: body length beyond block")?;
    if pdata::checksum::dm_checksum(body, LABEL_CSUM_SALT) != csum {
        return Err("label block: checksum mismatch".into());
    }
    serde_json::from_slice(body).map_err(|e| format!("label block: {e}"))
}

/// The metadata worker's state (lives on the worker thread).
pub(crate) struct Worker {
    pub shared: Arc<PoolShared>,
    pub pmd: PoolMetadata,
    pub data_io: SyncIo,
    pub labels: LabelTable,
    /// Metadata changed since the last commit.
    dirty: bool,
    /// Data blocks handed to shards and not yet mapped or released.
    outstanding: HashSet<u64>,
    /// Freed data blocks whose passdown discard is in flight (held like `outstanding`).
    discarding: HashSet<u64>,
    /// Allocations waiting for space (deadline, reply).
    space_waiters: VecDeque<(Instant, Reply<u64>)>,
    /// Flushes waiting for the next commit.
    flush_waiters: Vec<Reply<()>>,
    last_commit: Instant,
    lwm_fired: bool,
}

/// Outcome of [`Worker::prepare_write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prep {
    /// Mapped and exclusively owned: write in place.
    Mapped(u64),
    /// Not mapped and the caller asked only for mapped blocks.
    Unmapped,
    /// A fresh block was allocated; copy `copy_from` first if set (breaking sharing).
    New { block: u64, copy_from: Option<u64> },
}

fn is_metadata_failure(e: &pdata::Error) -> bool {
    use pdata::ErrorKind as K;
    !matches!(
        e.kind(),
        K::Exists | K::NotFound | K::InvalidArgument | K::Busy | K::Limit
    )
}

/// Converts a pdata error of a control operation to a `BdevError`.
pub(crate) fn pdata_err(e: &pdata::Error) -> BdevError {
    use pdata::ErrorKind as K;
    let kind = match e.kind() {
        K::Exists => ErrorKind::AlreadyExists,
        K::NotFound => ErrorKind::NotFound,
        K::InvalidArgument | K::DataBlockSizeMismatch | K::Incompatible | K::BadMagic => {
            ErrorKind::InvalidArgument
        }
        K::Busy => ErrorKind::Busy,
        other => ErrorKind::Io(other.errno()),
    };
    BdevError::new(kind, format!("thin pool metadata: {e}"))
}

impl Worker {
    pub fn new(
        shared: Arc<PoolShared>,
        pmd: PoolMetadata,
        data_io: SyncIo,
        labels: LabelTable,
    ) -> Worker {
        Worker {
            shared,
            pmd,
            data_io,
            labels,
            dirty: false,
            outstanding: HashSet::new(),
            discarding: HashSet::new(),
            space_waiters: VecDeque::new(),
            flush_waiters: Vec::new(),
            last_commit: Instant::now(),
            lwm_fired: false,
        }
    }

    fn mode(&self) -> u8 {
        self.shared.mode.load(Ordering::Acquire)
    }

    fn set_mode(&self, m: u8) {
        let old = self.shared.mode.swap(m, Ordering::AcqRel);
        if old == m {
            return;
        }
        match m {
            MODE_RO => emit_event("thin_pool_read_only", &self.shared.name),
            MODE_OUT_OF_DATA_SPACE => emit_event("thin_pool_out_of_data_space", &self.shared.name),
            _ => {}
        }
    }

    pub fn is_read_only(&self) -> bool {
        self.mode() == MODE_RO
    }

    /// Latches the pool read-only after a metadata failure (dm-thin `metadata_operation_failed`):
    /// roll back to the last commit, set NEEDS_CHECK, drop shard caches, fail waiters.
    pub fn fail(&mut self, what: &str, e: &pdata::Error) {
        eprintln!(
            "thin pool '{}': metadata failure in {what}: {e}; switching to read-only",
            self.shared.name
        );
        if self.mode() == MODE_RO {
            return;
        }
        let _ = self.pmd.abort();
        let _ = self.pmd.set_needs_check();
        self.outstanding.clear();
        self.discarding.clear();
        self.dirty = false;
        self.shared.needs_check.store(true, Ordering::Release);
        self.shared.epoch.fetch_add(1, Ordering::AcqRel);
        self.set_mode(MODE_RO);
        for (_, r) in self.space_waiters.drain(..) {
            r(Err(libc::EIO));
        }
    }

    /// Looks up a mapping: `Some((data block, shared))`. Shared is dm-thin's time heuristic
    /// (spec §11). The data refcount cannot confirm it: snapshots share B-tree leaves, so a
    /// block reachable from several devices through one shared leaf still has count 1.
    pub fn lookup(&mut self, dev: u64, block: u64) -> Result<Option<(u64, bool)>, i32> {
        match self.pmd.find_block(DevId(dev), ThinBlock(block)) {
            Ok(None) => Ok(None),
            Ok(Some(l)) => Ok(Some((l.data_block.0, l.shared))),
            Err(e) => {
                if is_metadata_failure(&e) {
                    self.fail("lookup", &e);
                }
                Err(libc::EIO)
            }
        }
    }

    /// The mapped blocks of `dev` in the aligned window of [`LOOKUP_WINDOW`] thin blocks that
    /// holds `block`: `(thin block, data block, shared)`. A shard whose cache misses asks for the
    /// whole window, so a cold cache (after a reopen) warms with one round trip per window
    /// instead of one per block.
    pub fn lookup_window(&mut self, dev: u64, block: u64) -> Result<Vec<(u64, u64, bool)>, i32> {
        let begin = block - block % LOOKUP_WINDOW;
        let end = begin.saturating_add(LOOKUP_WINDOW);
        let mut found = Vec::new();
        let mut failure = None;
        for m in self
            .pmd
            .mappings(DevId(dev), ThinBlock(begin), ThinBlock(end))
        {
            match m {
                Ok((b, l)) => found.push((b.0, l.data_block.0, l.shared)),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failure {
            if is_metadata_failure(&e) {
                self.fail("lookup", &e);
            }
            return Err(libc::EIO);
        }
        debug_assert!(found.iter().all(|&(b, _, _)| (begin..end).contains(&b)));
        Ok(found)
    }

    fn data_count(&mut self, b: u64) -> Result<u32, i32> {
        match self.pmd.data_block_count(DataBlock(b)) {
            Ok(c) => Ok(c),
            Err(e) => {
                self.fail("data refcount", &e);
                Err(libc::EIO)
            }
        }
    }

    /// For a write to `(dev, block)`: in place, or a new block (maybe after a copy).
    pub fn prepare_write(&mut self, dev: u64, block: u64, only_mapped: bool, reply: Reply<Prep>) {
        let found = match self.lookup(dev, block) {
            Ok(f) => f,
            Err(e) => return reply(Err(e)),
        };
        match found {
            Some((d, false)) => reply(Ok(Prep::Mapped(d))),
            None if only_mapped => reply(Ok(Prep::Unmapped)),
            other => {
                let copy_from = other.map(|(d, _)| d);
                self.alloc(Box::new(move |r| {
                    reply(r.map(|block| Prep::New { block, copy_from }))
                }));
            }
        }
    }

    /// Reserves up to `n` data blocks for a shard's batch (marked outstanding; no waiting).
    /// Keeps the last blocks for on-demand allocation when the pool is nearly full.
    pub fn reserve(&mut self, n: usize) -> Result<Vec<u64>, i32> {
        if self.mode() != MODE_RW {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(n);
        while out.len() < n && self.pmd.data_nr_free() > RESERVE_FLOOR {
            match self.try_alloc()? {
                Some(b) => out.push(b),
                None => break,
            }
        }
        Ok(out)
    }

    /// Allocates a data block for a shard (marked outstanding). Waits for space unless the pool
    /// errors when full.
    pub fn alloc(&mut self, reply: Reply<u64>) {
        if self.is_read_only() {
            return reply(Err(libc::EIO));
        }
        match self.try_alloc() {
            Ok(Some(b)) => reply(Ok(b)),
            Ok(None) => {
                self.set_mode(MODE_OUT_OF_DATA_SPACE);
                if self.shared.opts.error_if_no_space {
                    reply(Err(libc::ENOSPC));
                } else {
                    let deadline = Instant::now() + self.shared.opts.no_space_timeout;
                    self.space_waiters.push_back((deadline, reply));
                }
            }
            Err(e) => reply(Err(e)),
        }
    }

    /// One allocation attempt; on a full space map, commit (releasing blocks freed in this
    /// transaction) and retry once. `Ok(None)` = no space.
    fn try_alloc(&mut self) -> Result<Option<u64>, i32> {
        for attempt in 0..2 {
            match self.pmd.alloc_data_block() {
                Ok(b) => {
                    // Not dirty: an outstanding block is never committed (see commit).
                    let fresh = self.outstanding.insert(b.0);
                    assert!(fresh, "data block {} handed out twice", b.0);
                    self.check_low_water();
                    return Ok(Some(b.0));
                }
                Err(e) if e.kind() == pdata::ErrorKind::NoSpace => {
                    if attempt == 0 && self.dirty {
                        self.commit_metadata()?;
                    }
                }
                Err(e) => {
                    self.fail("alloc", &e);
                    return Err(libc::EIO);
                }
            }
        }
        Ok(None)
    }

    fn check_low_water(&mut self) {
        let free = self.pmd.data_nr_free();
        if !self.lwm_fired && free <= self.shared.opts.low_water_mark {
            self.lwm_fired = true;
            emit_event("thin_pool_low_water_mark", &self.shared.name);
        }
    }

    /// Maps `(dev, block) -> data` (an outstanding block).
    pub fn insert(&mut self, dev: u64, block: u64, data: u64) -> Result<(), i32> {
        if !self.outstanding.remove(&data) {
            // Allocated before a rollback: the block is no longer ours.
            return Err(libc::EIO);
        }
        if self.is_read_only() {
            return Err(libc::EIO);
        }
        match self
            .pmd
            .insert_block(DevId(dev), ThinBlock(block), DataBlock(data))
        {
            Ok(()) => {
                self.dirty = true;
                Ok(())
            }
            Err(e) if e.kind() == pdata::ErrorKind::NotFound => {
                // The device was deleted meanwhile: give the block back.
                self.release_block(data);
                Err(libc::ENODEV)
            }
            Err(e) => {
                self.fail("insert", &e);
                Err(libc::EIO)
            }
        }
    }

    /// Returns an outstanding block that will not be mapped.
    pub fn release(&mut self, data: u64) {
        if self.outstanding.remove(&data) {
            self.release_block(data);
        }
    }

    fn release_block(&mut self, data: u64) {
        if let Err(e) = self.pmd.dec_data_block(DataBlock(data)) {
            self.fail("release", &e);
        }
        self.dirty = true;
    }

    /// Unmaps `[begin, end)` of `dev`; with passdown, starts a discard of each data block whose
    /// count drops to zero and holds the block until the discard completes (see the file doc).
    pub fn remove(&mut self, dev: u64, begin: u64, end: u64, passdown: bool) -> Result<u64, i32> {
        if self.is_read_only() {
            return Ok(0);
        }
        let mut mapped = Vec::new();
        if passdown {
            for m in self
                .pmd
                .mappings(DevId(dev), ThinBlock(begin), ThinBlock(end))
            {
                match m {
                    Ok((_, l)) => mapped.push(l.data_block.0),
                    Err(e) => {
                        self.fail("unmap lookup", &e);
                        return Err(libc::EIO);
                    }
                }
            }
        }
        let n = match self
            .pmd
            .remove_range(DevId(dev), ThinBlock(begin), ThinBlock(end))
        {
            Ok(n) => n,
            Err(e) if e.kind() == pdata::ErrorKind::NotFound => return Err(libc::ENODEV),
            Err(e) => {
                self.fail("unmap", &e);
                return Err(libc::EIO);
            }
        };
        if n > 0 {
            self.dirty = true;
        }
        for d in mapped {
            if self.data_count(d)? == 0 {
                self.passdown(d)?;
            }
        }
        Ok(n)
    }

    /// Holds free block `d` and discards it on the data bdev; [`Worker::passdown_done`] runs
    /// on the worker when the discard completes.
    fn passdown(&mut self, d: u64) -> Result<(), i32> {
        if self.discarding.contains(&d) || self.outstanding.contains(&d) {
            return Ok(());
        }
        if let Err(e) = self.pmd.inc_data_block(DataBlock(d)) {
            self.fail("passdown (hold)", &e);
            return Err(libc::EIO);
        }
        self.discarding.insert(d);
        let off = d * self.shared.dbs_bytes;
        let len = self.shared.dbs_bytes as usize;
        let shared = Arc::downgrade(&self.shared);
        // A failed discard loses nothing: the block is unmapped either way.
        self.data_io.start(
            SyncOp::Unmap,
            off,
            len,
            None,
            Box::new(move |_| {
                if let Some(s) = shared.upgrade() {
                    let _ = s.send_job(Box::new(move |w| w.passdown_done(d)));
                }
            }),
        );
        Ok(())
    }

    /// The discard of held block `d` completed: free it (in the open transaction, so it is
    /// reusable once that commits, or at once if the commit that freed it is done).
    fn passdown_done(&mut self, d: u64) {
        if !self.discarding.remove(&d) {
            // Dropped by a switch to read-only (the abort restored the committed counts).
            return;
        }
        if let Err(e) = self.pmd.dec_data_block(DataBlock(d)) {
            self.fail("passdown (release)", &e);
            return;
        }
        self.dirty = true;
        if !self.space_waiters.is_empty() {
            self.retry_space_waiters();
        }
    }

    /// Queues a flush: answered after the next commit (this round).
    pub fn flush(&mut self, reply: Reply<()>) {
        self.flush_waiters.push(reply);
    }

    fn flush_data(&self) -> Result<(), i32> {
        match self.data_io.run(SyncOp::Flush, 0, 0, None) {
            Ok(_) => Ok(()),
            Err(e) if e == libc::ENOTSUP => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// dm-thin's commit: flush the data bdev, then commit the metadata (outstanding blocks
    /// excluded). A clean transaction costs no metadata write.
    pub fn commit(&mut self) -> Result<(), i32> {
        if !self.dirty || self.is_read_only() {
            self.last_commit = Instant::now();
            return self.flush_data();
        }
        self.commit_metadata()
    }

    fn commit_metadata(&mut self) -> Result<(), i32> {
        self.last_commit = Instant::now();
        if !self.dirty || self.is_read_only() {
            return Ok(());
        }
        self.flush_data()?;
        let held = self.held_blocks();
        for &b in &held {
            if let Err(e) = self.pmd.dec_data_block(DataBlock(b)) {
                self.fail("commit (drop outstanding)", &e);
                return Err(libc::EIO);
            }
        }
        if let Err(e) = self.pmd.commit() {
            self.fail("commit", &e);
            return Err(libc::EIO);
        }
        for &b in &held {
            if let Err(e) = self.pmd.inc_data_block(DataBlock(b)) {
                self.fail("commit (retake outstanding)", &e);
                return Err(libc::EIO);
            }
        }
        // The retaken outstanding blocks are not a change to commit: every commit drops them.
        self.dirty = false;
        if self.mode() == MODE_OUT_OF_DATA_SPACE && self.pmd.data_nr_free() > 0 {
            self.set_mode(MODE_RW);
            self.retry_space_waiters();
        }
        Ok(())
    }

    /// Blocks allocated in the space map that no mapping holds: outstanding and discarding.
    fn held_blocks(&self) -> Vec<u64> {
        let held: Vec<u64> = self
            .outstanding
            .iter()
            .chain(self.discarding.iter())
            .copied()
            .collect();
        debug_assert!(self.outstanding.is_disjoint(&self.discarding));
        held
    }

    /// Rolls back to the last commit after a failed control operation, keeping the shards'
    /// outstanding blocks and the discarding blocks allocated.
    fn rollback(&mut self) {
        let held = self.held_blocks();
        if let Err(e) = self.pmd.abort() {
            self.fail("rollback", &e);
            return;
        }
        for b in held {
            if let Err(e) = self.pmd.inc_data_block(DataBlock(b)) {
                self.fail("rollback (retake outstanding)", &e);
                return;
            }
        }
        self.dirty = false;
        self.shared.epoch.fetch_add(1, Ordering::AcqRel);
    }

    fn retry_space_waiters(&mut self) {
        let waiters: Vec<_> = self.space_waiters.drain(..).collect();
        for (deadline, reply) in waiters {
            match self.try_alloc() {
                Ok(Some(b)) => reply(Ok(b)),
                Ok(None) => self.space_waiters.push_back((deadline, reply)),
                Err(e) => reply(Err(e)),
            }
        }
        if !self.space_waiters.is_empty() {
            self.set_mode(MODE_OUT_OF_DATA_SPACE);
        }
    }

    /// Runs a control operation as one transaction: commit what is pending, apply `f`
    /// (metadata changes plus label-table changes), write the labels, commit. On error the
    /// transaction is rolled back and the labels restored.
    pub fn control<T>(
        &mut self,
        f: impl FnOnce(&mut Worker) -> Result<T, BdevError>,
    ) -> Result<T, BdevError> {
        self.control_with(true, f)
    }

    /// [`Worker::control`] for operations that leave the label table alone.
    pub fn control_no_labels<T>(
        &mut self,
        f: impl FnOnce(&mut Worker) -> Result<T, BdevError>,
    ) -> Result<T, BdevError> {
        self.control_with(false, f)
    }

    fn control_with<T>(
        &mut self,
        labels: bool,
        f: impl FnOnce(&mut Worker) -> Result<T, BdevError>,
    ) -> Result<T, BdevError> {
        if self.is_read_only() {
            return Err(BdevError::new(
                ErrorKind::Io(libc::EROFS),
                format!("thin pool '{}' is read-only", self.shared.name),
            ));
        }
        self.commit()
            .map_err(|e| BdevError::new(ErrorKind::Io(e), "thin pool: commit failed"))?;
        let saved = self.labels.clone();
        let r = f(self).and_then(|v| {
            self.dirty = true;
            if labels {
                self.write_labels()?;
            }
            self.commit()
                .map_err(|e| BdevError::new(ErrorKind::Io(e), "thin pool: commit failed"))?;
            Ok(v)
        });
        if r.is_err() {
            self.labels = saved;
            if !self.is_read_only() {
                self.rollback();
            }
        }
        r
    }

    /// Writes the label table into a fresh data block and maps it at block 0 of
    /// [`LABEL_DEV`] (copy-on-write: the old block is freed by the insert and cannot be reused
    /// before the commit, so a crash keeps the old table with the old metadata).
    pub fn write_labels(&mut self) -> Result<(), BdevError> {
        let bytes = encode_labels(&self.labels)?;
        let b = self.pmd.alloc_data_block().map_err(|e| pdata_err(&e))?;
        self.dirty = true;
        let len = bytes.len().min(self.shared.dbs_bytes as usize);
        let off = b.0 * self.shared.dbs_bytes;
        if let Err(e) = self.data_io.run(SyncOp::Write, off, len, Some(bytes)) {
            let _ = self.pmd.dec_data_block(b);
            return Err(BdevError::new(ErrorKind::Io(e), "writing the label table"));
        }
        match self.pmd.insert_block(DevId(LABEL_DEV), ThinBlock(0), b) {
            Ok(()) => Ok(()),
            Err(e) => {
                if is_metadata_failure(&e) {
                    self.fail("label insert", &e);
                }
                Err(pdata_err(&e))
            }
        }
    }

    /// Reads the label table of an opened pool (`None` if it has no label device).
    pub fn read_labels(
        pmd: &mut PoolMetadata,
        data_io: &SyncIo,
        dbs_bytes: u64,
    ) -> Result<Option<LabelTable>, BdevError> {
        if pmd
            .device_details(DevId(LABEL_DEV))
            .map_err(|e| pdata_err(&e))?
            .is_none()
        {
            return Ok(None);
        }
        let Some(l) = pmd
            .find_block(DevId(LABEL_DEV), ThinBlock(0))
            .map_err(|e| pdata_err(&e))?
        else {
            return Ok(Some(LabelTable::default()));
        };
        let len = LABEL_REGION.min(dbs_bytes as usize);
        let block = data_io
            .run(SyncOp::Read, l.data_block.0 * dbs_bytes, len, None)
            .map_err(|e| BdevError::new(ErrorKind::Io(e), "reading the label table"))?;
        decode_labels(&block)
            .map(Some)
            .map_err(|m| BdevError::new(ErrorKind::Io(libc::EUCLEAN), m))
    }

    /// Grows the data space map to the data bdev's current size.
    pub fn grow(&mut self) -> Result<u64, BdevError> {
        let bdev = self.shared.data_bdev.clone();
        let bytes = bdev.num_blocks() * u64::from(bdev.block_size());
        let new = bytes / self.shared.dbs_bytes;
        let old = self.pmd.data_nr_blocks();
        if self.shared.needs_check.load(Ordering::Acquire) {
            return Err(BdevError::new(
                ErrorKind::Io(libc::EROFS),
                format!("thin pool '{}' needs check: cannot grow", self.shared.name),
            ));
        }
        if new < old {
            return Err(BdevError::invalid(format!(
                "data bdev shrank from {old} to {new} data blocks"
            )));
        }
        if new > old {
            self.control_no_labels(|w| w.pmd.resize_data_dev(new).map_err(|e| pdata_err(&e)))?;
            self.lwm_fired = false;
            if self.pmd.data_nr_free() > 0 {
                if self.mode() == MODE_OUT_OF_DATA_SPACE {
                    self.set_mode(MODE_RW);
                }
                self.retry_space_waiters();
            }
        }
        Ok(new)
    }

    /// Status JSON (bdev_thin_pool_get_pools entry).
    pub fn status(&mut self) -> Value {
        let s = &self.shared;
        let total_meta = self.pmd.metadata_nr_blocks();
        let used_meta = total_meta - self.pmd.metadata_nr_free().min(total_meta);
        let total_data = self.pmd.data_nr_blocks();
        // Blocks reserved by shards but not mapped yet, and freed blocks whose discard is in
        // flight, are not used (never committed).
        let free_data =
            self.pmd.data_nr_free() + (self.outstanding.len() + self.discarding.len()) as u64;
        let used_data = total_data - free_data.min(total_data);
        let mut thins = Vec::new();
        let labels: Vec<(u64, Label)> = self
            .labels
            .thins
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (id, l) in labels {
            let mapped = match self.pmd.device_details(DevId(id)) {
                Ok(Some(d)) => d.mapped_blocks,
                _ => 0,
            };
            thins.push(json!({
                "name": l.name, "uuid": l.uuid, "thin_id": id,
                "num_blocks": l.num_blocks, "block_size": l.block_size,
                "mapped_blocks": mapped,
            }));
        }
        json!({
            "name": s.name,
            "uuid": s.uuid.lock().unwrap_or_else(|e| e.into_inner()).to_string(),
            "data_bdev": s.data_bdev.name(),
            "metadata_bdev": s.meta_bdev.name(),
            "data_block_size": s.dbs_bytes,
            "transaction_id": self.pmd.transaction_id(),
            "used_data_blocks": used_data,
            "total_data_blocks": total_data,
            "used_metadata_blocks": used_meta,
            "total_metadata_blocks": total_meta,
            "low_water_mark": s.opts.low_water_mark,
            "held_root": self.pmd.held_root().map(|b| b.0),
            "mode": s.mode_name(),
            "needs_check": self.pmd.needs_check() || s.needs_check.load(Ordering::Acquire),
            "thins": thins,
        })
    }

    /// The worker loop: messages, then (bounded rounds) flush commits, periodic commits and
    /// space-wait timeouts.
    pub fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let interval = Duration::from_millis(self.shared.opts.commit_interval_ms.max(1));
        loop {
            let now = Instant::now();
            let mut wait = if self.dirty {
                (self.last_commit + interval).saturating_duration_since(now)
            } else {
                interval
            };
            if let Some((d, _)) = self.space_waiters.front() {
                wait = wait.min(d.saturating_duration_since(now));
            }
            let first = match rx.recv_timeout(wait.max(Duration::from_millis(1))) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = self.commit();
                    return;
                }
            };
            let mut next = first;
            let mut n = 0;
            while let Some(m) = next.take() {
                match m {
                    Msg::Job(j) => j(&mut self),
                    Msg::Stop(reply) => {
                        let r = self.commit();
                        self.finish_flushes(r);
                        for (_, w) in self.space_waiters.drain(..) {
                            w(Err(libc::ENODEV));
                        }
                        // Close the metadata before answering, so the caller may reopen it.
                        drop(self);
                        reply(r);
                        return;
                    }
                }
                n += 1;
                if n < MAX_MSGS_PER_ROUND {
                    next = rx.try_recv().ok();
                }
            }
            if !self.flush_waiters.is_empty() {
                let r = self.commit();
                self.finish_flushes(r);
            } else if self.dirty && self.last_commit.elapsed() >= interval {
                let _ = self.commit();
            }
            self.expire_space_waiters();
        }
    }

    fn finish_flushes(&mut self, r: Result<(), i32>) {
        for w in self.flush_waiters.drain(..) {
            w(r);
        }
    }

    fn expire_space_waiters(&mut self) {
        let now = Instant::now();
        while self.space_waiters.front().is_some_and(|(d, _)| *d <= now) {
            if let Some((_, r)) = self.space_waiters.pop_front() {
                r(Err(libc::ENOSPC));
            }
        }
    }
}
