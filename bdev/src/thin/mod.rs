//! The thin pool and thin bdevs, with dm-thin semantics (spec `dm-thin-metadata.md` §10-15).
//!
//! Threads and messages:
//! - Each pool has one **metadata worker** thread ([`pool::Worker`]) owning the synchronous
//!   `pdata::thin::PoolMetadata`. Its metadata block I/O is blocking I/O on the metadata bdev
//!   through reactor 0 ([`meta_io`]). It never runs on a reactor.
//! - Each thin bdev is owned by one reactor (round robin at creation). I/O submitted on other
//!   reactors is forwarded to the owner and completed back on the submitter ([`vbdev`]).
//!   The owner serves cached unshared mappings directly on the data bdev and asks the worker
//!   (message, answer by message) for lookups, mapping inserts, unmaps, flushes. It holds a
//!   batch of reserved data blocks, so a write to a block known to be unmapped (the cache of a
//!   device created in this session is complete until it overflows) or known shared goes to
//!   the data bdev first and only then messages the worker to insert the mapping; the write is
//!   acknowledged after the insert. Reserved blocks are "outstanding" in the worker and are
//!   excluded from every commit, so they never leak into the committed space map.
//! - Durability is decided by the worker: commits run every `commit_interval_ms` when dirty
//!   and on every flush (coalesced: all flushes queued when a round ends share one commit);
//!   each commit flushes the data bdev first (dm-thin `pre_commit`). A flush with nothing
//!   dirty only flushes the data bdev.
//!
//! Thin bdev names, sizes and UUIDs live in a checksummed label table in data block 0 of the
//! reserved thin device [`LABEL_DEV`], rewritten copy-on-write in the same transaction as each
//! control operation, so they change atomically with the metadata and the image stays
//! thin_check-clean. Opening a pool registers its thin bdevs by name.
//!
//! Partial-block unmaps are ignored (as dm-thin); partial write_zeroes zero the range of a
//! mapped block (unmapped blocks already read as zeroes); whole-block unmap/write_zeroes remove
//! the mapping (unmap passes freed blocks down to the data bdev when `discard_passdown`).
//!
//! Metadata failures (I/O error, checksum, metadata space) roll back to the last commit, set
//! NEEDS_CHECK and latch the pool read-only: reads and writes to mapped unshared blocks work,
//! writes needing a new block fail `EIO`, control operations fail `EROFS`.

pub mod meta_io;
pub mod pool;
pub mod rpc;
pub mod vbdev;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use pdata::thin::{CacheOpts, DevId, PoolMetadata};
use reactor::{ReactorId, RuntimeHandle};
use serde_json::{json, Value};

use crate::bdev::{Bdev, BdevCore, BdevCoreOpts, IoStatus, IoType, Uuid};
use crate::desc::BdevDesc;
use crate::error::{BdevError, ErrorKind, Result};
use crate::io::{Completer, ModuleChannel, ModuleIo};
use crate::registry::registry;
use meta_io::{MetaBlockIo, SyncIo};
use pool::{pdata_err, Label, Msg, PoolShared, Worker, MODE_RO};
pub use vbdev::ThinBdev;

/// Module name of thin bdevs and pools.
pub const MODULE_NAME: &str = "thin";

/// Reserved thin device id holding the label table (never handed to users).
pub const LABEL_DEV: u64 = pdata::thin::MAX_DEV_ID;

/// How long control operations wait for the worker.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(120);

/// Pool options (`bdev_thin_pool_create`).
#[derive(Debug, Clone)]
pub struct PoolOpts {
    /// Pool name (also registered as a no-I/O bdev so save_config recreates the pool).
    pub name: String,
    /// Data bdev name.
    pub data_bdev: String,
    /// Metadata bdev name.
    pub metadata_bdev: String,
    /// Data block size in bytes: 64 KiB..1 GiB, a multiple of 64 KiB.
    pub data_block_size: u64,
    /// Low water mark in data blocks.
    pub low_water_mark: u64,
    /// Zero the rest of a newly provisioned block on a partial write.
    pub zero_new_blocks: bool,
    /// Pass unmaps of freed blocks to the data bdev.
    pub discard_passdown: bool,
    /// Fail I/O needing space at once instead of waiting for growth.
    pub error_if_no_space: bool,
    /// Periodic commit interval.
    pub commit_interval_ms: u64,
    /// How long I/O waits for space before failing ENOSPC (dm-thin: 60 s).
    pub no_space_timeout: Duration,
}

impl PoolOpts {
    /// Defaults for everything but the names.
    pub fn new(name: &str, data_bdev: &str, metadata_bdev: &str) -> PoolOpts {
        PoolOpts {
            name: name.to_string(),
            data_bdev: data_bdev.to_string(),
            metadata_bdev: metadata_bdev.to_string(),
            data_block_size: 64 * 1024,
            low_water_mark: 0,
            zero_new_blocks: true,
            discard_passdown: true,
            error_if_no_space: false,
            commit_interval_ms: 1000,
            no_space_timeout: Duration::from_secs(60),
        }
    }
}

type Subscriber = Arc<dyn Fn(&str, &str) + Send + Sync>;

fn subscribers() -> &'static Mutex<Vec<Subscriber>> {
    static S: OnceLock<Mutex<Vec<Subscriber>>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(Vec::new()))
}

/// Subscribes to pool events: `f(type, pool name)` with type `thin_pool_low_water_mark`,
/// `thin_pool_out_of_data_space` or `thin_pool_read_only`. Called on the pool's worker thread.
pub fn subscribe(f: impl Fn(&str, &str) + Send + Sync + 'static) {
    subscribers()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Arc::new(f));
}

pub(crate) fn emit_event(kind: &str, pool: &str) {
    let subs = subscribers()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for s in subs {
        s(kind, pool);
    }
}

fn pools() -> &'static Mutex<BTreeMap<String, Arc<PoolShared>>> {
    static P: OnceLock<Mutex<BTreeMap<String, Arc<PoolShared>>>> = OnceLock::new();
    P.get_or_init(|| Mutex::new(BTreeMap::new()))
}

fn runtime_slot() -> &'static Mutex<Option<RuntimeHandle>> {
    static R: OnceLock<Mutex<Option<RuntimeHandle>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(None))
}

/// Gives the module the runtime for calls made off-reactor (config load on a plain thread).
pub fn set_runtime(h: RuntimeHandle) {
    *runtime_slot().lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
}

fn runtime() -> Result<RuntimeHandle> {
    if reactor::try_current().is_some() {
        return Ok(reactor::runtime_handle());
    }
    runtime_slot()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .ok_or_else(|| {
            BdevError::new(
                ErrorKind::NotFound,
                "thin: no reactor runtime (call from a reactor or bdev::thin::set_runtime)",
            )
        })
}

fn io_err(errno: i32, msg: impl Into<String>) -> BdevError {
    BdevError::new(ErrorKind::Io(errno), msg)
}

/// Looks up a pool by name.
pub fn lookup_pool(name: &str) -> Result<Arc<PoolShared>> {
    pools()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(name)
        .cloned()
        .ok_or_else(|| BdevError::new(ErrorKind::NotFound, format!("no thin pool named '{name}'")))
}

/// Finds a thin bdev by name over all pools.
pub fn lookup_thin(name: &str) -> Result<Arc<ThinBdev>> {
    let all: Vec<Arc<PoolShared>> = pools()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect();
    for p in all {
        if let Some(t) = p.lock_thins().get(name) {
            return Ok(t.clone());
        }
    }
    Err(BdevError::new(
        ErrorKind::NotFound,
        format!("no thin bdev named '{name}'"),
    ))
}

/// Runs `f` on the pool's worker and waits (never call on a reactor).
fn worker_call<T: Send + 'static>(
    pool: &PoolShared,
    f: impl FnOnce(&mut Worker) -> T + Send + 'static,
) -> Result<T> {
    let (tx, rx) = mpsc::sync_channel(1);
    pool.send_job(Box::new(move |w| {
        let _ = tx.send(f(w));
    }))
    .map_err(|e| io_err(e, format!("thin pool '{}' is closed", pool.name)))?;
    rx.recv_timeout(CONTROL_TIMEOUT).map_err(|_| {
        io_err(
            libc::ETIMEDOUT,
            format!("thin pool '{}' did not answer", pool.name),
        )
    })
}

/// Runs `f` on a fresh control thread and hands its result to `done` (so that callers on a
/// reactor never block).
pub(crate) fn spawn_control<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
    done: impl FnOnce(Result<T>) + Send + 'static,
) {
    let r = std::thread::Builder::new()
        .name("thin-control".into())
        .spawn(move || done(f()));
    if let Err(e) = r {
        eprintln!("thin: cannot spawn a control thread: {e}");
    }
}

fn validate_opts(o: &PoolOpts) -> Result<()> {
    let dbs = o.data_block_size;
    if !(65536..=1 << 30).contains(&dbs) || !dbs.is_multiple_of(65536) {
        return Err(BdevError::invalid(format!(
            "data_block_size {dbs}: must be 64 KiB..1 GiB and a multiple of 64 KiB"
        )));
    }
    if o.name.is_empty() {
        return Err(BdevError::invalid("pool name must not be empty"));
    }
    if o.data_bdev == o.metadata_bdev {
        return Err(BdevError::invalid(
            "data and metadata bdevs must be different",
        ));
    }
    Ok(())
}

fn open_claimed(name: &str) -> Result<Arc<BdevDesc>> {
    let mut d = BdevDesc::open(name, true, |_| {})?;
    d.claim(MODULE_NAME)?;
    Ok(Arc::new(d))
}

/// Creates (formats if the metadata bdev's first block is zero) or opens a pool, registers
/// its thin bdevs, and starts its worker. `done` runs on a control thread. Errors: `EINVAL`
/// (options, mismatching data block size, bad geometry), `ENODEV`, `EPERM` (claimed),
/// `EEXIST`, I/O errors.
pub fn create_pool(opts: PoolOpts, done: impl FnOnce(Result<String>) + Send + 'static) {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return done(Err(e)),
    };
    let r = std::thread::Builder::new()
        .name(format!("thin-meta:{}", opts.name))
        .spawn(move || match open_pool(opts, rt) {
            Ok((worker, rx)) => {
                let name = worker.shared.name.clone();
                done(Ok(name));
                worker.run(rx);
            }
            Err(e) => done(Err(e)),
        });
    if let Err(e) = r {
        eprintln!("thin: cannot spawn the metadata worker: {e}");
    }
}

/// Synchronous pool creation for callers that may block (tests, plain threads).
pub fn create_pool_blocking(opts: PoolOpts) -> Result<String> {
    let (tx, rx) = mpsc::sync_channel(1);
    create_pool(opts, move |r| {
        let _ = tx.send(r);
    });
    rx.recv_timeout(CONTROL_TIMEOUT)
        .map_err(|_| io_err(libc::ETIMEDOUT, "pool creation did not finish"))?
}

fn open_pool(opts: PoolOpts, rt: RuntimeHandle) -> Result<(Worker, mpsc::Receiver<Msg>)> {
    validate_opts(&opts)?;
    if pools()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains_key(&opts.name)
        || registry().lookup(&opts.name).is_some()
    {
        return Err(BdevError::new(
            ErrorKind::AlreadyExists,
            format!("a bdev or pool named '{}' already exists", opts.name),
        ));
    }
    let data_desc = open_claimed(&opts.data_bdev)?;
    let meta_desc = open_claimed(&opts.metadata_bdev)?;
    let mbs = u64::from(meta_desc.bdev().block_size());
    if 4096 % mbs != 0 {
        return Err(BdevError::invalid(format!(
            "metadata bdev block size {mbs} does not divide 4096"
        )));
    }
    let dbs = opts.data_block_size;
    let data_bs = u64::from(data_desc.bdev().block_size());
    if !dbs.is_multiple_of(data_bs) {
        return Err(BdevError::invalid(format!(
            "data block size {dbs} is not a multiple of the data bdev block size {data_bs}"
        )));
    }
    let nr_data = data_desc.bdev().num_blocks() * data_bs / dbs;
    if nr_data == 0 {
        return Err(BdevError::invalid(format!(
            "data bdev '{}' is smaller than one data block",
            opts.data_bdev
        )));
    }
    let io_reactor = ReactorId::new(0);
    let meta_io = SyncIo {
        rt: rt.clone(),
        reactor: io_reactor,
        desc: meta_desc.clone(),
    };
    let data_io = SyncIo {
        rt: rt.clone(),
        reactor: io_reactor,
        desc: data_desc.clone(),
    };
    let dbs_sectors = (dbs / 512) as u32;
    let mio = Box::new(MetaBlockIo::new(meta_io));
    let mut pmd = PoolMetadata::open_or_format(mio, dbs_sectors, nr_data, CacheOpts::default())
        .map_err(|e| match e.kind() {
            pdata::ErrorKind::DataBlockSizeMismatch => BdevError::invalid(format!(
                "pool metadata on '{}' has another data block size: {e}",
                opts.metadata_bdev
            )),
            _ => pdata_err(&e),
        })?;
    let needs_check = pmd.needs_check();
    let old = pmd.data_nr_blocks();
    if nr_data < old {
        return Err(BdevError::invalid(format!(
            "data bdev holds {nr_data} data blocks but the pool has {old}"
        )));
    }
    let mut labels = Worker::read_labels(&mut pmd, &data_io, dbs)?;
    let (tx, rx) = mpsc::channel();
    let uuid = labels
        .as_ref()
        .and_then(|l| Uuid::parse(&l.pool_uuid).ok())
        .unwrap_or_else(Uuid::new_v4);
    let shared = Arc::new(PoolShared {
        name: opts.name.clone(),
        uuid: Mutex::new(uuid),
        opts,
        rt,
        data_bdev: data_desc.bdev().clone(),
        meta_bdev: meta_desc.bdev().clone(),
        descs: Mutex::new(Some((data_desc, meta_desc))),
        tx: Mutex::new(Some(tx)),
        dbs_bytes: dbs,
        mode: AtomicU8::new(if needs_check { MODE_RO } else { pool::MODE_RW }),
        needs_check: AtomicBool::new(needs_check),
        epoch: AtomicU64::new(0),
        next_owner: AtomicUsize::new(0),
        thins: Mutex::new(BTreeMap::new()),
    });
    let table = labels.take().unwrap_or_default();
    let has_label_dev = pmd
        .device_details(DevId(LABEL_DEV))
        .map_err(|e| pdata_err(&e))?
        .is_some();
    let mut w = Worker::new(shared.clone(), pmd, data_io, table);
    if !needs_check {
        if nr_data > old {
            w.pmd.resize_data_dev(nr_data).map_err(|e| pdata_err(&e))?;
        }
        if !has_label_dev {
            w.pmd
                .create_thin(DevId(LABEL_DEV))
                .map_err(|e| pdata_err(&e))?;
            w.labels.pool_uuid = uuid.to_string();
            w.write_labels()?;
        }
        w.pmd.commit().map_err(|e| pdata_err(&e))?;
    }
    register_pool_bdev(&shared)?;
    let thins: Vec<(u64, Label)> = w
        .labels
        .thins
        .iter()
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    pools()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(shared.name.clone(), shared.clone());
    for (id, l) in thins {
        if let Err(e) = register_thin(&shared, id, &l, false) {
            eprintln!(
                "thin pool '{}': cannot register thin '{}': {e}",
                shared.name, l.name
            );
        }
    }
    Ok((w, rx))
}

/// The pool's registry entry: no I/O; writes the pool's create call for save_config.
struct PoolBdev {
    core: BdevCore,
    opts: PoolOpts,
}

impl Bdev for PoolBdev {
    fn core(&self) -> &BdevCore {
        &self.core
    }

    fn io_type_supported(&self, _io_type: IoType) -> bool {
        false
    }

    fn create_channel(&self, completer: Completer) -> Result<Box<dyn ModuleChannel>> {
        Ok(Box::new(NoIoChannel { completer }))
    }

    fn write_config_json(&self) -> Option<Value> {
        let o = &self.opts;
        Some(json!({
            "method": "bdev_thin_pool_create",
            "params": {
                "name": o.name,
                "data_bdev": o.data_bdev,
                "metadata_bdev": o.metadata_bdev,
                "data_block_size": o.data_block_size,
                "low_water_mark": o.low_water_mark,
                "zero_new_blocks": o.zero_new_blocks,
                "discard_passdown": o.discard_passdown,
                "error_if_no_space": o.error_if_no_space,
                "commit_interval_ms": o.commit_interval_ms,
            }
        }))
    }

    fn driver_specific(&self) -> Option<(&'static str, Value)> {
        Some(("thin_pool", json!({ "data_bdev": self.opts.data_bdev })))
    }
}

struct NoIoChannel {
    completer: Completer,
}

impl ModuleChannel for NoIoChannel {
    fn submit(&mut self, io: ModuleIo) {
        self.completer.complete(io, IoStatus::Failed(libc::ENOTSUP));
    }
}

fn register_pool_bdev(shared: &Arc<PoolShared>) -> Result<()> {
    let bytes = shared.data_bdev.num_blocks() * u64::from(shared.data_bdev.block_size());
    let core = BdevCore::new(BdevCoreOpts {
        name: shared.name.clone(),
        aliases: Vec::new(),
        uuid: None,
        product_name: "Thin pool",
        module_name: MODULE_NAME,
        block_size: 4096,
        num_blocks: (bytes / 4096).max(1),
        optimal_io_boundary: 0,
        write_cache: false,
    })?;
    registry().register(Arc::new(PoolBdev {
        core,
        opts: shared.opts.clone(),
    }))
}

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

/// `fresh`: the device was just created empty, so its shard may treat a lookup-cache miss as
/// "unmapped" until the cache overflows.
fn register_thin(
    shared: &Arc<PoolShared>,
    id: u64,
    l: &Label,
    fresh: bool,
) -> Result<Arc<ThinBdev>> {
    let bs = u64::from(l.block_size);
    let data_bs = u64::from(shared.data_bdev.block_size());
    if !(bs == 512 || bs == 4096) || !bs.is_multiple_of(data_bs) {
        return Err(BdevError::invalid(format!(
            "thin block size {bs} must be 512 or 4096 and a multiple of the data bdev's {data_bs}"
        )));
    }
    let nr = shared.rt.nr_reactors().max(1);
    let owner = ReactorId::new((shared.next_owner.fetch_add(1, Ordering::Relaxed) % nr) as u32);
    let bpd = shared.dbs_bytes / bs;
    let core = BdevCore::new(BdevCoreOpts {
        name: l.name.clone(),
        aliases: Vec::new(),
        uuid: Some(Uuid::parse(&l.uuid)?),
        product_name: "Thin volume",
        module_name: MODULE_NAME,
        block_size: l.block_size,
        num_blocks: l.num_blocks,
        optimal_io_boundary: bpd as u32,
        write_cache: true,
    })?;
    let t = Arc::new(vbdev::Target {
        pool: shared.clone(),
        dev: id,
        owner,
        key: NEXT_KEY.fetch_add(1, Ordering::Relaxed),
        bs,
        bpd,
        data_bs,
        fresh,
    });
    let b = Arc::new(ThinBdev::new(core, t));
    registry().register(b.clone())?;
    shared.lock_thins().insert(l.name.clone(), b.clone());
    Ok(b)
}

fn check_name_free(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(BdevError::invalid("bdev name must not be empty"));
    }
    if registry().lookup(name).is_some() {
        return Err(BdevError::new(
            ErrorKind::AlreadyExists,
            format!("bdev '{name}' already exists"),
        ));
    }
    Ok(())
}

/// Creates a thin bdev of `size_bytes` (a multiple of the block size) in `pool`; blocking.
pub fn create_thin_blocking(
    pool: &str,
    name: &str,
    size_bytes: u64,
    block_size: u32,
    thin_id: Option<u64>,
) -> Result<String> {
    let p = lookup_pool(pool)?;
    check_name_free(name)?;
    let bs = u64::from(block_size);
    if size_bytes == 0 || !size_bytes.is_multiple_of(bs) {
        return Err(BdevError::invalid(format!(
            "size {size_bytes} bytes is not a positive multiple of the {bs}-byte block size"
        )));
    }
    if thin_id.is_some_and(|i| i >= LABEL_DEV) {
        return Err(BdevError::invalid(format!(
            "thin_id must be below {LABEL_DEV} (reserved)"
        )));
    }
    let label = Label {
        name: name.to_string(),
        uuid: Uuid::new_v4().to_string(),
        num_blocks: size_bytes / bs,
        block_size,
    };
    let l2 = label.clone();
    let id = worker_call(&p, move |w| {
        w.control(|w| {
            let id = match thin_id {
                Some(i) => i,
                None => free_id(w)?,
            };
            w.pmd.create_thin(DevId(id)).map_err(|e| pdata_err(&e))?;
            w.labels.thins.insert(id, l2);
            Ok(id)
        })
    })??;
    register_thin(&p, id, &label, true)?;
    Ok(name.to_string())
}

fn free_id(w: &mut Worker) -> Result<u64> {
    let used = w.pmd.devices().map_err(|e| pdata_err(&e))?;
    let mut id = 1;
    for d in used {
        if d.0 == id {
            id += 1;
        } else if d.0 > id {
            break;
        }
    }
    if id >= LABEL_DEV {
        return Err(io_err(libc::ENOSPC, "no free thin device id"));
    }
    Ok(id)
}

/// Snapshots thin bdev `origin` as `snap` (quiescing the origin's writes); blocking.
pub fn snapshot_blocking(origin: &str, snap: &str) -> Result<String> {
    let o = lookup_thin(origin)?;
    check_name_free(snap)?;
    let p = o.t.pool.clone();
    let t = o.t.clone();
    let (qtx, qrx) = mpsc::sync_channel::<std::result::Result<(), i32>>(1);
    let t2 = t.clone();
    p.rt.send_msg(t.owner, move || {
        let q2 = qtx.clone();
        if let Err(e) = vbdev::quiesce(
            &t2,
            Box::new(move || {
                let _ = q2.send(Ok(()));
            }),
        ) {
            let _ = qtx.send(Err(e));
        }
    });
    match qrx.recv_timeout(CONTROL_TIMEOUT) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(io_err(e, format!("cannot quiesce '{origin}'"))),
        Err(_) => {
            return Err(io_err(
                libc::ETIMEDOUT,
                format!("quiescing '{origin}' timed out"),
            ))
        }
    }
    let label = Label {
        name: snap.to_string(),
        uuid: Uuid::new_v4().to_string(),
        num_blocks: o.num_blocks(),
        block_size: o.block_size(),
    };
    let l2 = label.clone();
    let origin_id = t.dev;
    let r = worker_call(&p, move |w| {
        w.control(|w| {
            let id = free_id(w)?;
            w.pmd
                .create_snap(DevId(id), DevId(origin_id))
                .map_err(|e| pdata_err(&e))?;
            w.labels.thins.insert(id, l2);
            Ok(id)
        })
    });
    let key = t.key;
    p.rt.send_msg(t.owner, move || vbdev::snapshot_taken(key));
    let id = r??;
    register_thin(&p, id, &label, false)?;
    Ok(snap.to_string())
}

/// Deletes thin bdev `name` (its blocks are freed when nobody else maps them); blocking.
pub fn delete_thin_blocking(name: &str) -> Result<()> {
    let b = lookup_thin(name)?;
    let p = b.t.pool.clone();
    let id = b.t.dev;
    p.lock_thins().remove(name);
    let _ = registry().unregister(name);
    let r = worker_call(&p, move |w| {
        w.control(|w| {
            w.pmd.delete_thin(DevId(id)).map_err(|e| pdata_err(&e))?;
            w.labels.thins.remove(&id);
            Ok(())
        })
    });
    let key = b.t.key;
    p.rt.send_msg(b.t.owner, move || vbdev::drop_shard(key));
    r?
}

/// Resizes thin bdev `name` to `size_bytes`; shrinking unmaps every data block wholly past
/// the new end. Errors: `EBUSY` when shrinking while open (as other bdevs). Blocking.
pub fn resize_thin_blocking(name: &str, size_bytes: u64) -> Result<()> {
    let b = lookup_thin(name)?;
    let p = b.t.pool.clone();
    let bs = b.t.bs;
    if size_bytes == 0 || !size_bytes.is_multiple_of(bs) {
        return Err(BdevError::invalid(format!(
            "size {size_bytes} bytes is not a positive multiple of the {bs}-byte block size"
        )));
    }
    let new = size_bytes / bs;
    let old = b.num_blocks();
    b.core().notify_resize(new)?;
    let id = b.t.dev;
    let first_gone = new.div_ceil(b.t.bpd);
    let key = b.t.key;
    if new < old {
        p.rt.send_msg(b.t.owner, move || {
            vbdev::invalidate_and_resume(key, first_gone, false)
        });
    }
    let r = worker_call(&p, move |w| {
        w.control(|w| {
            if new < old {
                w.remove(id, first_gone, u64::MAX, w.shared.opts.discard_passdown)
                    .map_err(|e| io_err(e, "unmapping past the new end"))?;
            }
            if let Some(l) = w.labels.thins.get_mut(&id) {
                l.num_blocks = new;
            }
            Ok(())
        })
    })?;
    if r.is_err() {
        let _ = b.core().notify_resize(old);
    }
    r
}

/// Grows the pool to its data bdev's current size; waiting writes proceed. Blocking.
pub fn grow_pool_blocking(name: &str) -> Result<u64> {
    let p = lookup_pool(name)?;
    worker_call(&p, |w| w.grow())?
}

/// Pool status JSON (see `bdev_thin_pool_get_pools`). Blocking.
pub fn pool_status_blocking(name: &str) -> Result<Value> {
    let p = lookup_pool(name)?;
    worker_call(&p, |w| w.status())
}

/// Parses a label block (the first bytes of the data block mapped at block 0 of
/// [`LABEL_DEV`]): `thin id → (name, num_blocks, block_size)`. For offline tools and tests.
/// Errors: bad magic, checksum mismatch, malformed table.
pub fn parse_label_block(
    block: &[u8],
) -> std::result::Result<BTreeMap<u64, (String, u64, u32)>, String> {
    let t = pool::decode_labels(block)?;
    Ok(t.thins
        .into_iter()
        .map(|(id, l)| (id, (l.name, l.num_blocks, l.block_size)))
        .collect())
}

/// Names of all pools.
pub fn pool_names() -> Vec<String> {
    pools()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .cloned()
        .collect()
}

/// Compare-and-swap of the transaction id (persisted by a commit). Blocking.
pub fn set_transaction_id_blocking(name: &str, old: u64, new: u64) -> Result<()> {
    let p = lookup_pool(name)?;
    worker_call(&p, move |w| {
        w.control_no_labels(|w| {
            w.pmd
                .set_transaction_id(old, new)
                .map_err(|e| pdata_err(&e))
        })
    })?
}

/// Takes the held metadata snapshot; returns its block. Blocking.
pub fn reserve_metadata_snap_blocking(name: &str) -> Result<u64> {
    let p = lookup_pool(name)?;
    worker_call(&p, |w| {
        w.control_no_labels(|w| {
            w.pmd
                .reserve_metadata_snap()
                .map(|b| b.0)
                .map_err(|e| pdata_err(&e))
        })
    })?
}

/// Releases the held metadata snapshot. Blocking.
pub fn release_metadata_snap_blocking(name: &str) -> Result<()> {
    let p = lookup_pool(name)?;
    worker_call(&p, |w| {
        w.control_no_labels(|w| w.pmd.release_metadata_snap().map_err(|e| pdata_err(&e)))
    })?
}

/// Commits and closes the pool (metadata stays on its bdev); its thin bdevs are unregistered.
/// Blocking.
pub fn delete_pool_blocking(name: &str) -> Result<()> {
    let p = lookup_pool(name)?;
    pools()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(name);
    let thins: Vec<Arc<ThinBdev>> = std::mem::take(&mut *p.lock_thins()).into_values().collect();
    for t in &thins {
        let _ = registry().unregister(t.name());
        let key = t.t.key;
        p.rt.send_msg(t.t.owner, move || vbdev::drop_shard(key));
    }
    let _ = registry().unregister(name);
    let (tx, rx) = mpsc::sync_channel(1);
    let sender = p.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
    let r = match sender {
        Some(s) => {
            let _ = s.send(Msg::Stop(Box::new(move |r| {
                let _ = tx.send(r);
            })));
            rx.recv_timeout(CONTROL_TIMEOUT)
                .unwrap_or(Err(libc::ETIMEDOUT))
        }
        None => Ok(()),
    };
    // Close the descriptors (releasing the claims) so the bdevs can be reopened at once.
    let descs = p.descs.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(descs);
    r.map_err(|e| {
        io_err(
            e,
            format!("closing thin pool '{name}': final commit failed"),
        )
    })
}
pub use rpc::{rpc_methods, ThinRpcDone};
