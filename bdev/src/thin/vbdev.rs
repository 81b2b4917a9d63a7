//! `ThinBdev` (the `Bdev` impl) and its shard: the per-device data-path state on the owning
//! reactor.
//!
//! Every thin bdev is owned by one reactor. Its channel on another reactor forwards each I/O to
//! the owner with `reactor::send_msg` and the owner sends the completion back, so the
//! completion runs on the submitting reactor. On the owner, [`DevState`] keeps a bounded
//! cache of lookups: reads and writes of cached, unshared mappings go straight to the data
//! bdev (no lock, no allocation, no message). Everything else asks the pool's metadata worker
//! with a message and continues when the answer comes back (continuations live in a slab on
//! the owner, so they need not be `Send`).
//!
//! Invariants (owner only): a block under provisioning, sharing break or unmap is "busy" and
//! later writes/unmaps to it wait; `nr_writes` counts writes and unmaps in flight, which a
//! quiesce (snapshot) drains.
//!
//! Cache misses: an I/O whose block is not in the cache waits for the mappings of its whole
//! [`LOOKUP_WINDOW`] (one worker request per window, shared by every I/O that misses in it
//! meanwhile); the window is then "known": a block of it absent from the cache is unmapped.
//! An answer is fresh for every block that is not busy when it arrives: the worker handles
//! messages in order and answers on one FIFO queue, so a change sent after the lookup is
//! still outstanding (its block busy) when the lookup's answer arrives. Busy blocks of an
//! answer are left "in doubt" (looked up again when next needed). Changes made outside the
//! shard (snapshot, shrink, rollback) bump `generation`, which drops answers sent before.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

use reactor::ReactorId;
use serde_json::{json, Value};

use super::pool::{Msg, PoolShared, Prep, Reply, Worker, LOOKUP_WINDOW, MODE_RO, MODE_RW};
use crate::bdev::{Bdev, BdevCore, IoStatus, IoType};
use crate::buf::IoBuf;
use crate::error::Result;
use crate::io::{BdevChannel, Completer, IoCallback, IoDone, ModuleChannel, ModuleIo, RawIo};

/// Most cached lookups per thin bdev (each ~40 bytes); the cache is dropped when full.
const MAX_CACHE_ENTRIES: usize = 1 << 16;

/// A multiplicative hasher for block-number keys (the data path hashes on every I/O; SipHash
/// costs more than the rest of the lookup).
#[derive(Default, Clone, Copy)]
pub(crate) struct BlockHasher(u64);

impl std::hash::Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type BlockMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<BlockHasher>>;
type BlockSet = HashSet<u64, std::hash::BuildHasherDefault<BlockHasher>>;

/// Data blocks a shard reserves per batch; refilled when half used.
const RESERVE_BATCH: usize = 16;

/// Per-device geometry and identity, shared by the bdev, its channels and its shard.
pub(crate) struct Target {
    pub pool: Arc<PoolShared>,
    /// Thin device id.
    pub dev: u64,
    /// Owning reactor.
    pub owner: ReactorId,
    /// Process-unique key of the shard state.
    pub key: u64,
    /// Thin bdev block size in bytes.
    pub bs: u64,
    /// Thin bdev blocks per data block.
    pub bpd: u64,
    /// Data bdev block size in bytes.
    pub data_bs: u64,
    /// Created empty in this session: the shard's cache starts complete.
    pub fresh: bool,
}

/// A thin bdev.
pub struct ThinBdev {
    core: BdevCore,
    pub(crate) t: Arc<Target>,
}

impl ThinBdev {
    pub(crate) fn new(core: BdevCore, t: Arc<Target>) -> ThinBdev {
        ThinBdev { core, t }
    }

    /// The thin device id in the pool.
    pub fn thin_id(&self) -> u64 {
        self.t.dev
    }

    /// The owning reactor.
    pub fn owner(&self) -> ReactorId {
        self.t.owner
    }

    /// The pool's name.
    pub fn pool_name(&self) -> &str {
        &self.t.pool.name
    }
}

impl Bdev for ThinBdev {
    fn core(&self) -> &BdevCore {
        &self.core
    }

    fn io_type_supported(&self, _io_type: IoType) -> bool {
        true
    }

    fn create_channel(&self, completer: Completer) -> Result<Box<dyn ModuleChannel>> {
        let here = reactor::try_current();
        if let Some(r) = here {
            if r != self.t.owner {
                COMPLETERS.with(|c| {
                    c.borrow_mut()
                        .insert((r.index() as u32, self.t.key), completer.clone())
                });
            }
        }
        Ok(Box::new(ThinChannel {
            t: self.t.clone(),
            completer,
            here,
            state: None,
        }))
    }

    fn driver_specific(&self) -> Option<(&'static str, Value)> {
        Some((
            "thin",
            json!({
                "pool": self.t.pool.name,
                "thin_id": self.t.dev,
                "owner_reactor": self.t.owner.index(),
            }),
        ))
    }
}

thread_local! {
    /// Completers of channels on non-owner reactors, by (reactor index, target key).
    static COMPLETERS: RefCell<HashMap<(u32, u64), Completer>> = RefCell::new(HashMap::new());
    /// Shard states on this thread by target key.
    static SHARDS: RefCell<HashMap<u64, Rc<DevState>>> = RefCell::new(HashMap::new());
}

/// A `ModuleIo` travelling to the owner reactor and back.
struct SendIo(ModuleIo);

// SAFETY: a ModuleIo is only touched by one thread at a time: it moves to the owner reactor
// inside a message and comes back the same way before it is completed on the submitting
// reactor; its buffer (if owned) is never dropped on the owner.
unsafe impl Send for SendIo {}

impl SendIo {
    fn into_inner(self) -> ModuleIo {
        self.0
    }
}

/// Where a finished I/O goes.
enum Done {
    Local(Completer),
    Remote { origin: ReactorId, key: u64 },
}

impl Done {
    fn finish(self, io: ModuleIo, status: IoStatus) {
        match self {
            Done::Local(c) => c.complete(io, status),
            Done::Remote { origin, key } => {
                let s = SendIo(io);
                reactor::send_msg(origin, move || {
                    let io = s.into_inner();
                    let c =
                        COMPLETERS.with(|c| c.borrow().get(&(origin.index() as u32, key)).cloned());
                    if let Some(c) = c {
                        c.complete(io, status);
                    }
                });
            }
        }
    }
}

struct ThinChannel {
    t: Arc<Target>,
    completer: Completer,
    here: Option<ReactorId>,
    /// The shard state, cached by the owner's channel (saves a map lookup per I/O).
    state: Option<Rc<DevState>>,
}

impl Drop for ThinChannel {
    fn drop(&mut self) {
        if let Some(r) = self.here {
            if r != self.t.owner {
                let _ =
                    COMPLETERS.try_with(|c| c.borrow_mut().remove(&(r.index() as u32, self.t.key)));
            }
        }
    }
}

impl ModuleChannel for ThinChannel {
    fn submit(&mut self, io: ModuleIo) {
        if let Some(st) = &self.state {
            return st.submit(io, Done::Local(self.completer.clone()));
        }
        let here = reactor::current();
        if here == self.t.owner {
            match DevState::get(&self.t) {
                Ok(st) => {
                    self.state = Some(st.clone());
                    st.submit(io, Done::Local(self.completer.clone()));
                }
                Err(e) => self.completer.complete(io, IoStatus::Failed(e)),
            }
            return;
        }
        let t = self.t.clone();
        let s = SendIo(io);
        reactor::send_msg(self.t.owner, move || {
            let io = s.into_inner();
            let done = Done::Remote {
                origin: here,
                key: t.key,
            };
            shard_submit(&t, io, done);
        });
    }
}

fn shard_submit(t: &Arc<Target>, io: ModuleIo, done: Done) {
    match DevState::get(t) {
        Ok(st) => st.submit(io, done),
        Err(e) => done.finish(io, IoStatus::Failed(e)),
    }
}

/// Runs `f` with the shard state of `key` on this reactor, if it exists.
fn with_shard(key: u64, f: impl FnOnce(&Rc<DevState>)) {
    if let Some(st) = SHARDS.with(|s| s.borrow().get(&key).cloned()) {
        f(&st);
    }
}

/// On the owner: quiesce the device (new writes wait, in-flight writes drain), then `then`.
pub(crate) fn quiesce(t: &Arc<Target>, then: Box<dyn FnOnce()>) -> std::result::Result<(), i32> {
    let st = DevState::get(t)?;
    st.quiesce(then);
    Ok(())
}

/// On the owner: drop cached lookups at or after `from` (all: 0) and end one quiesce if
/// `resume`.
pub(crate) fn invalidate_and_resume(key: u64, from: u64, resume: bool) {
    with_shard(key, |st| {
        st.invalidate_from(from);
        if resume {
            st.resume();
        }
    });
}

/// On the owner, after a snapshot of this device: mark its cached mappings shared and end
/// the quiesce.
pub(crate) fn snapshot_taken(key: u64) {
    with_shard(key, |st| {
        st.mark_all_shared();
        st.resume();
    });
}

/// On the owner: forget the shard state (device deleted or pool closed).
pub(crate) fn drop_shard(key: u64) {
    let st = SHARDS.with(|s| s.borrow_mut().remove(&key));
    drop(st);
}

/// A simple slab (index reuse, no per-insert allocation once warm).
struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Slab<T> {
    fn new() -> Slab<T> {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
        }
    }

    fn insert(&mut self, v: T) -> usize {
        if let Some(i) = self.free.pop() {
            self.items[i] = Some(v);
            i
        } else {
            self.items.push(Some(v));
            self.items.len() - 1
        }
    }

    fn remove(&mut self, i: usize) -> Option<T> {
        let v = self.items.get_mut(i)?.take();
        if v.is_some() {
            self.free.push(i);
        }
        v
    }
}

struct FastOp {
    io: ModuleIo,
    done: Done,
    write: bool,
    _zero: Option<IoBuf>,
}

type Cont = Box<dyn FnOnce(&Rc<DevState>, Box<dyn Any + Send>)>;

/// Continuation of a slow-path data-bdev I/O.
type DataCont = Box<dyn FnOnce(&Rc<DevState>, IoStatus)>;

struct Inner {
    epoch: u64,
    /// thin block → (data block, shared)
    cache: BlockMap<(u64, bool)>,
    /// Lookup windows whose every mapping is in `cache` (but for blocks in `doubt`).
    windows: BlockSet,
    /// Blocks of known windows (or of a complete cache) whose mapping is not known.
    doubt: BlockSet,
    /// Windows being looked up → the I/Os waiting for them.
    fetching: BlockMap<Vec<(ModuleIo, Done)>>,
    /// Bumped by mapping changes made outside this shard (snapshot, shrink, rollback);
    /// lookup answers sent under an older generation are not cached.
    generation: u64,
    busy: BlockMap<VecDeque<(ModuleIo, Done)>>,
    nr_writes: usize,
    quiescing: u32,
    quiesce_waiters: Vec<Box<dyn FnOnce()>>,
    held: VecDeque<(ModuleIo, Done)>,
    fast: Slab<FastOp>,
    conts: Slab<Cont>,
    /// The cache holds every mapping of the device: a miss means "unmapped".
    complete: bool,
    /// Data blocks reserved for this shard (outstanding in the worker).
    reserve: Vec<u64>,
    refilling: bool,
}

impl Inner {
    /// Forgets every cached mapping (and so every known window).
    fn forget_all(&mut self) {
        self.cache.clear();
        self.windows.clear();
        self.doubt.clear();
        self.complete = false;
    }

    /// `vb` is not in the cache: is it known to be unmapped?
    fn known_unmapped(&self, vb: u64) -> bool {
        (self.complete || self.windows.contains(&(vb / LOOKUP_WINDOW))) && !self.doubt.contains(&vb)
    }
}

/// A thin device's state on its owner reactor.
pub(crate) struct DevState {
    t: Arc<Target>,
    data: BdevChannel,
    tx: mpsc::Sender<Msg>,
    fast_cb: IoCallback,
    inner: RefCell<Inner>,
    dbs: u64,
}

/// A write being served off the fast path.
struct WReq {
    io: ModuleIo,
    done: Done,
    /// Zero source for a partial write_zeroes.
    zero: Option<IoBuf>,
}

impl WReq {
    fn src(&self) -> &[u8] {
        match &self.zero {
            Some(z) => z,
            None => self.io.buf(),
        }
    }

    fn region(&mut self) -> (*mut u8, usize) {
        match &mut self.zero {
            Some(z) => (z.as_mut_ptr(), z.len()),
            None => self.io.raw_buf(),
        }
    }
}

impl Drop for DevState {
    fn drop(&mut self) {
        let blocks = std::mem::take(&mut self.inner.get_mut().reserve);
        if !blocks.is_empty() {
            let _ = self.t.pool.send_job(Box::new(move |w| {
                for b in blocks {
                    w.release(b);
                }
            }));
        }
    }
}

impl DevState {
    fn get(t: &Arc<Target>) -> std::result::Result<Rc<DevState>, i32> {
        if let Some(st) = SHARDS.with(|s| s.borrow().get(&t.key).cloned()) {
            return Ok(st);
        }
        assert_eq!(reactor::current(), t.owner, "shard state off its owner");
        let desc = t.pool.data_desc().ok_or(libc::ENODEV)?;
        let data = desc.get_io_channel().map_err(|e| e.errno())?;
        let tx = t.pool.sender().ok_or(libc::ENODEV)?;
        let st = Rc::new_cyclic(|weak: &Weak<DevState>| {
            let w = weak.clone();
            let fast_cb: IoCallback = Rc::new(move |d: IoDone| {
                if let Some(st) = w.upgrade() {
                    st.fast_done(d);
                }
            });
            DevState {
                t: t.clone(),
                data,
                tx,
                fast_cb,
                inner: RefCell::new(Inner {
                    epoch: t.pool.epoch.load(Ordering::Acquire),
                    cache: BlockMap::default(),
                    windows: BlockSet::default(),
                    doubt: BlockSet::default(),
                    fetching: BlockMap::default(),
                    generation: 0,
                    busy: BlockMap::default(),
                    nr_writes: 0,
                    quiescing: 0,
                    quiesce_waiters: Vec::new(),
                    held: VecDeque::new(),
                    fast: Slab::new(),
                    conts: Slab::new(),
                    complete: t.fresh,
                    reserve: Vec::new(),
                    refilling: false,
                }),
                dbs: t.bpd * t.bs,
            }
        });
        SHARDS.with(|s| s.borrow_mut().insert(t.key, st.clone()));
        st.refill();
        Ok(st)
    }

    fn submit(self: &Rc<Self>, io: ModuleIo, done: Done) {
        {
            let e = self.t.pool.epoch.load(Ordering::Acquire);
            let mut inner = self.inner.borrow_mut();
            if inner.epoch != e {
                inner.epoch = e;
                inner.forget_all();
                inner.generation += 1;
                if self.t.pool.mode.load(Ordering::Acquire) == MODE_RO {
                    // The worker dropped every outstanding block when it went read-only.
                    inner.reserve.clear();
                }
            }
        }
        match io.io_type() {
            IoType::Read => self.read(io, done),
            IoType::Write => self.write(io, done),
            IoType::Unmap | IoType::WriteZeroes => self.discard(io, done),
            IoType::Flush => self.flush(io, done),
            IoType::Reset => done.finish(io, IoStatus::Success),
        }
    }

    /// (thin block, byte offset in it, byte length).
    fn geometry(&self, io: &ModuleIo) -> (u64, u64, u64) {
        let vb = io.offset_blocks() / self.t.bpd;
        let off = (io.offset_blocks() % self.t.bpd) * self.t.bs;
        let len = io.num_blocks() * self.t.bs;
        assert!(
            off + len <= self.dbs,
            "I/O crosses a data block (not split)"
        );
        (vb, off, len)
    }

    fn cached(&self, vb: u64) -> Option<(u64, bool)> {
        self.inner.borrow().cache.get(&vb).copied()
    }

    /// Caches the mapping the shard itself just established for `vb`.
    fn cache_put(&self, vb: u64, d: u64, shared: bool) {
        let mut inner = self.inner.borrow_mut();
        if inner.cache.len() >= MAX_CACHE_ENTRIES {
            inner.forget_all();
        }
        inner.cache.insert(vb, (d, shared));
        inner.doubt.remove(&vb);
    }

    /// Caches a window's lookup answer (`found`: its mapped blocks, sorted) if no change from
    /// outside the shard happened since `gen`; busy blocks stay in doubt (see the file doc).
    fn learn_window(&self, w: u64, gen: u64, found: &[(u64, u64, bool)]) {
        let mut inner = self.inner.borrow_mut();
        if inner.generation != gen {
            return;
        }
        if inner.cache.len() + found.len() > MAX_CACHE_ENTRIES
            || inner.windows.len() >= MAX_CACHE_ENTRIES
        {
            inner.forget_all();
        }
        let inner = &mut *inner;
        for &(b, d, shared) in found {
            debug_assert_eq!(b / LOOKUP_WINDOW, w);
            if inner.busy.contains_key(&b) {
                inner.doubt.insert(b);
            } else {
                inner.doubt.remove(&b);
                inner.cache.entry(b).or_insert((d, shared));
            }
        }
        if !inner.doubt.is_empty() {
            let busy = &inner.busy;
            inner
                .doubt
                .retain(|b| b / LOOKUP_WINDOW != w || busy.contains_key(b));
        }
        inner.windows.insert(w);
        assert!(
            inner.cache.len() <= MAX_CACHE_ENTRIES,
            "cache over its bound"
        );
    }

    /// After a snapshot of this device: every mapping is now shared.
    fn mark_all_shared(&self) {
        let mut inner = self.inner.borrow_mut();
        for v in inner.cache.values_mut() {
            v.1 = true;
        }
        inner.generation += 1;
    }

    /// Cached lookup: `Some(Some(m))` mapped, `Some(None)` known unmapped, `None` unknown.
    #[inline]
    fn known(&self, vb: u64) -> Option<Option<(u64, bool)>> {
        let inner = self.inner.borrow();
        match inner.cache.get(&vb) {
            Some(m) => Some(Some(*m)),
            None => inner.known_unmapped(vb).then_some(None),
        }
    }

    /// Asks the worker for a new batch when the reserve runs low.
    fn refill(self: &Rc<Self>) {
        {
            let mut inner = self.inner.borrow_mut();
            if inner.refilling || inner.reserve.len() >= RESERVE_BATCH / 2 {
                return;
            }
            if self.t.pool.mode.load(Ordering::Acquire) != MODE_RW {
                return;
            }
            inner.refilling = true;
        }
        self.call(
            |w, reply| reply(w.reserve(RESERVE_BATCH)),
            |st, r| {
                let mut inner = st.inner.borrow_mut();
                inner.refilling = false;
                if let Ok(v) = r {
                    inner.reserve.extend(v);
                }
            },
        );
    }

    fn take_reserved(self: &Rc<Self>) -> Option<u64> {
        if self.t.pool.mode.load(Ordering::Acquire) != MODE_RW {
            return None;
        }
        let b = self.inner.borrow_mut().reserve.pop();
        if b.is_some() {
            self.refill();
        }
        b
    }

    fn invalidate_from(&self, from: u64) {
        let mut inner = self.inner.borrow_mut();
        inner.cache.retain(|vb, _| *vb < from);
        inner.windows.retain(|w| (w + 1) * LOOKUP_WINDOW <= from);
        inner.generation += 1;
    }

    /// Sends `job` to the worker; `k` runs here with its reply.
    fn call<T: Send + 'static>(
        self: &Rc<Self>,
        job: impl FnOnce(&mut Worker, Reply<T>) + Send + 'static,
        k: impl FnOnce(&Rc<DevState>, std::result::Result<T, i32>) + 'static,
    ) {
        let cont: Cont = Box::new(move |st, any| {
            let r = any
                .downcast::<std::result::Result<T, i32>>()
                .map(|b| *b)
                .unwrap_or(Err(libc::EIO));
            k(st, r)
        });
        let token = self.inner.borrow_mut().conts.insert(cont);
        let (owner, key) = (self.t.owner, self.t.key);
        let rt = self.t.pool.rt.clone();
        let msg = Msg::Job(Box::new(move |w: &mut Worker| {
            let reply: Reply<T> = Box::new(move |r| {
                rt.send_msg(owner, move || {
                    with_shard(key, |st| {
                        let cont = st.inner.borrow_mut().conts.remove(token);
                        if let Some(cont) = cont {
                            cont(st, Box::new(r));
                        }
                    })
                })
            });
            job(w, reply)
        }));
        if self.tx.send(msg).is_err() {
            let cont = self.inner.borrow_mut().conts.remove(token);
            if let Some(cont) = cont {
                cont(self, Box::new(Err::<T, i32>(libc::ENODEV)));
            }
        }
    }

    // ---- reads ----

    fn read(self: &Rc<Self>, mut io: ModuleIo, done: Done) {
        let (vb, off, _) = self.geometry(&io);
        match self.known(vb) {
            Some(Some((d, _))) => return self.fast_rw(io, done, d, off, false, None),
            Some(None) => {
                io.buf_mut().fill(0);
                return done.finish(io, IoStatus::Success);
            }
            None => {}
        }
        self.fetch(vb, io, done);
    }

    /// Parks `io` (a cache miss on `vb`) until the mappings of `vb`'s lookup window arrive:
    /// one worker request per window, however many I/Os miss in it meanwhile.
    fn fetch(self: &Rc<Self>, vb: u64, io: ModuleIo, done: Done) {
        let w = vb / LOOKUP_WINDOW;
        let gen = {
            let mut inner = self.inner.borrow_mut();
            if let Some(q) = inner.fetching.get_mut(&w) {
                q.push((io, done));
                return;
            }
            inner.fetching.insert(w, vec![(io, done)]);
            inner.generation
        };
        let dev = self.t.dev;
        self.call(
            move |wk, reply| reply(wk.lookup_window(dev, w * LOOKUP_WINDOW)),
            move |st, r| st.fetched(w, gen, r),
        );
    }

    /// A window's answer: cache it, serve the waiting reads from it, resubmit the rest.
    fn fetched(
        self: &Rc<Self>,
        w: u64,
        gen: u64,
        r: std::result::Result<Vec<(u64, u64, bool)>, i32>,
    ) {
        let waiters = self.inner.borrow_mut().fetching.remove(&w);
        let waiters = waiters.unwrap_or_default();
        let found = match r {
            Ok(found) => found,
            Err(e) => {
                for (io, done) in waiters {
                    done.finish(io, IoStatus::Failed(e));
                }
                return;
            }
        };
        self.learn_window(w, gen, &found);
        for (mut io, done) in waiters {
            if io.io_type() != IoType::Read {
                self.submit(io, done);
                continue;
            }
            // A read is served from the answer itself (even one not cached).
            let (vb, off, _) = self.geometry(&io);
            match found.binary_search_by_key(&vb, |m| m.0) {
                Ok(i) => self.fast_rw(io, done, found[i].1, off, false, None),
                Err(_) => {
                    io.buf_mut().fill(0);
                    done.finish(io, IoStatus::Success)
                }
            }
        }
    }

    /// Reads or writes the I/O's region (or `zero`) at `off` in data block `d`.
    fn fast_rw(
        self: &Rc<Self>,
        mut io: ModuleIo,
        done: Done,
        d: u64,
        off: u64,
        write: bool,
        mut zero: Option<IoBuf>,
    ) {
        let (ptr, len) = match &mut zero {
            Some(z) => (z.as_mut_ptr(), z.len()),
            None => io.raw_buf(),
        };
        let raw = RawIo {
            io_type: if write { IoType::Write } else { IoType::Read },
            ptr,
            len,
            offset_blocks: (d * self.dbs + off) / self.t.data_bs,
            num_blocks: len as u64 / self.t.data_bs,
        };
        let tag = {
            let mut inner = self.inner.borrow_mut();
            if write {
                inner.nr_writes += 1;
            }
            inner.fast.insert(FastOp {
                io,
                done,
                write,
                _zero: zero,
            })
        };
        // SAFETY: the region belongs to the ModuleIo (or zero buffer) parked in the `fast`
        // slab until fast_done takes it back, after the data bdev completed.
        let r = unsafe { self.data.submit_raw(raw, tag as u64, &self.fast_cb) };
        if let Err(e) = r {
            let op = self.inner.borrow_mut().fast.remove(tag);
            if let Some(op) = op {
                self.end_fast(op, IoStatus::Failed(e.errno()));
            }
        }
    }

    fn fast_done(self: &Rc<Self>, d: IoDone) {
        let op = self.inner.borrow_mut().fast.remove(d.tag as usize);
        if let Some(op) = op {
            self.end_fast(op, d.status);
        }
    }

    fn end_fast(self: &Rc<Self>, op: FastOp, status: IoStatus) {
        if op.write {
            self.write_ended();
        }
        op.done.finish(op.io, status);
    }

    fn write_ended(self: &Rc<Self>) {
        let waiters = {
            let mut inner = self.inner.borrow_mut();
            assert!(inner.nr_writes > 0, "nr_writes underflow");
            inner.nr_writes -= 1;
            if inner.nr_writes > 0 || inner.quiesce_waiters.is_empty() {
                return;
            }
            std::mem::take(&mut inner.quiesce_waiters)
        };
        for w in waiters {
            w();
        }
    }

    // ---- writes ----

    /// Queues the I/O if the device is quiescing or the block is busy; true if queued.
    fn hold(&self, vb: u64, io: ModuleIo, done: Done) -> Option<(ModuleIo, Done)> {
        let mut inner = self.inner.borrow_mut();
        if inner.quiescing > 0 {
            inner.held.push_back((io, done));
            return None;
        }
        if !inner.busy.is_empty() {
            if let Some(q) = inner.busy.get_mut(&vb) {
                q.push_back((io, done));
                return None;
            }
        }
        Some((io, done))
    }

    /// The data block of `vb` if a write may go straight to it: not quiescing, block not
    /// busy, mapped and unshared (one look at the state; the common case of a write).
    #[inline]
    fn writable_in_place(&self, vb: u64) -> Option<u64> {
        let inner = self.inner.borrow();
        if inner.quiescing > 0 || (!inner.busy.is_empty() && inner.busy.contains_key(&vb)) {
            return None;
        }
        match inner.cache.get(&vb) {
            Some(&(d, false)) => Some(d),
            _ => None,
        }
    }

    fn write(self: &Rc<Self>, io: ModuleIo, done: Done) {
        let (vb, off, _) = self.geometry(&io);
        if let Some(d) = self.writable_in_place(vb) {
            return self.fast_rw(io, done, d, off, true, None);
        }
        let Some((io, done)) = self.hold(vb, io, done) else {
            return;
        };
        let known = self.known(vb);
        match known {
            Some(Some((d, false))) => return self.fast_rw(io, done, d, off, true, None),
            None => return self.fetch(vb, io, done),
            Some(_) => {}
        }
        let wr = WReq {
            io,
            done,
            zero: None,
        };
        if let Some(m) = known {
            // Known unmapped or shared: provision from the reserve, no worker round trip
            // before the data write.
            if let Some(new) = self.take_reserved() {
                {
                    let mut inner = self.inner.borrow_mut();
                    inner.busy.insert(vb, VecDeque::new());
                    inner.nr_writes += 1;
                }
                return self.provision(vb, off, wr, new, m.map(|(d, _)| d));
            }
        }
        self.slow_write(vb, off, wr, false);
    }

    fn slow_write(self: &Rc<Self>, vb: u64, off: u64, wr: WReq, only_mapped: bool) {
        {
            let mut inner = self.inner.borrow_mut();
            inner.busy.insert(vb, VecDeque::new());
            inner.nr_writes += 1;
        }
        let dev = self.t.dev;
        self.call(
            move |w, reply| w.prepare_write(dev, vb, only_mapped, reply),
            move |st, r| match r {
                Err(e) => st.end_write(vb, wr.io, wr.done, IoStatus::Failed(e)),
                Ok(Prep::Unmapped) => st.end_write(vb, wr.io, wr.done, IoStatus::Success),
                Ok(Prep::Mapped(d)) => {
                    st.cache_put(vb, d, false);
                    let mut wr = wr;
                    let (ptr, len) = wr.region();
                    st.data_op(IoType::Write, ptr, len, d, off, move |st, s| {
                        st.end_write(vb, wr.io, wr.done, s)
                    });
                }
                Ok(Prep::New { block, copy_from }) => st.provision(vb, off, wr, block, copy_from),
            },
        );
    }

    /// Writes into the freshly allocated `new` (zeroing or copying the rest), then maps it.
    fn provision(self: &Rc<Self>, vb: u64, off: u64, mut wr: WReq, new: u64, copy: Option<u64>) {
        let (_, len) = wr.region();
        let full = off == 0 && len as u64 == self.dbs;
        let zeroing = self.t.pool.opts.zero_new_blocks;
        if full || (copy.is_none() && !zeroing) {
            let (ptr, len) = wr.region();
            self.data_op(IoType::Write, ptr, len, new, off, move |st, s| {
                st.map_new(vb, wr, new, s)
            });
            return;
        }
        let mut bounce = IoBuf::alloc(self.dbs as usize);
        let overlay = move |bounce: &mut IoBuf, wr: &WReq| {
            let src = wr.src();
            bounce[off as usize..off as usize + src.len()].copy_from_slice(src);
        };
        match copy {
            None => {
                bounce.fill(0);
                overlay(&mut bounce, &wr);
                self.write_bounce(vb, wr, new, bounce);
            }
            Some(old) => {
                let ptr = bounce.as_mut_ptr();
                let n = bounce.len();
                self.data_op(IoType::Read, ptr, n, old, 0, move |st, s| {
                    if !s.is_success() {
                        st.give_back(new);
                        return st.end_write(vb, wr.io, wr.done, s);
                    }
                    overlay(&mut bounce, &wr);
                    st.write_bounce(vb, wr, new, bounce);
                });
            }
        }
    }

    fn write_bounce(self: &Rc<Self>, vb: u64, wr: WReq, new: u64, mut bounce: IoBuf) {
        let ptr = bounce.as_mut_ptr();
        let n = bounce.len();
        self.data_op(IoType::Write, ptr, n, new, 0, move |st, s| {
            drop(bounce);
            st.map_new(vb, wr, new, s)
        });
    }

    fn give_back(self: &Rc<Self>, new: u64) {
        let _ = self.t.pool.send_job(Box::new(move |w| w.release(new)));
    }

    fn map_new(self: &Rc<Self>, vb: u64, wr: WReq, new: u64, s: IoStatus) {
        if !s.is_success() {
            self.give_back(new);
            return self.end_write(vb, wr.io, wr.done, s);
        }
        let dev = self.t.dev;
        self.call(
            move |w, reply| reply(w.insert(dev, vb, new)),
            move |st, r| {
                let status = match r {
                    Ok(()) => {
                        st.cache_put(vb, new, false);
                        IoStatus::Success
                    }
                    Err(e) => IoStatus::Failed(e),
                };
                st.end_write(vb, wr.io, wr.done, status)
            },
        );
    }

    /// Ends a slow write/unmap: unbusy the block, resubmit its waiters, complete. After a
    /// failure the block's mapping is no longer known here (the change may or may not have
    /// reached the worker).
    fn end_write(self: &Rc<Self>, vb: u64, io: ModuleIo, done: Done, s: IoStatus) {
        let waiters = {
            let mut inner = self.inner.borrow_mut();
            if s.is_success() {
                inner.doubt.remove(&vb);
            } else {
                inner.cache.remove(&vb);
                inner.doubt.insert(vb);
            }
            inner.busy.remove(&vb)
        };
        done.finish(io, s);
        self.write_ended();
        for (io, done) in waiters.into_iter().flatten() {
            self.submit(io, done);
        }
    }

    /// A data-bdev I/O on `[ptr, ptr+len)` at `off` in data block `d`; `k` runs with the
    /// status. The caller moves the region's owner into `k`.
    fn data_op(
        self: &Rc<Self>,
        ty: IoType,
        ptr: *mut u8,
        len: usize,
        d: u64,
        off: u64,
        k: impl FnOnce(&Rc<DevState>, IoStatus) + 'static,
    ) {
        let slot: Rc<Cell<Option<DataCont>>> = Rc::new(Cell::new(Some(Box::new(k))));
        let weak = Rc::downgrade(self);
        let s2 = slot.clone();
        let cb: IoCallback = Rc::new(move |done: IoDone| {
            if let (Some(st), Some(k)) = (weak.upgrade(), s2.take()) {
                k(&st, done.status)
            }
        });
        let raw = RawIo {
            io_type: ty,
            ptr,
            len,
            offset_blocks: (d * self.dbs + off) / self.t.data_bs,
            num_blocks: len as u64 / self.t.data_bs,
        };
        // SAFETY: the region's owner (ModuleIo or IoBuf) is moved into `k`, which is kept in
        // `slot` until the completion callback runs (or dropped only with this callback).
        let r = unsafe { self.data.submit_raw(raw, 0, &cb) };
        if let Err(e) = r {
            if let Some(k) = slot.take() {
                k(self, IoStatus::Failed(e.errno()));
            }
        }
    }

    // ---- unmap / write_zeroes ----

    fn discard(self: &Rc<Self>, io: ModuleIo, done: Done) {
        let (vb, off, len) = self.geometry(&io);
        let whole = off == 0 && len == self.dbs;
        let zeroes = io.io_type() == IoType::WriteZeroes;
        if !whole && !zeroes {
            // dm-thin: a discard smaller than a data block completes without action.
            return done.finish(io, IoStatus::Success);
        }
        let Some((io, done)) = self.hold(vb, io, done) else {
            return;
        };
        if !whole {
            if let Some(None) = self.known(vb) {
                return done.finish(io, IoStatus::Success);
            }
            let zero = IoBuf::new(len as usize);
            if let Some((d, false)) = self.cached(vb) {
                return self.fast_rw(io, done, d, off, true, Some(zero));
            }
            let wr = WReq {
                io,
                done,
                zero: Some(zero),
            };
            return self.slow_write(vb, off, wr, true);
        }
        {
            let mut inner = self.inner.borrow_mut();
            inner.busy.insert(vb, VecDeque::new());
            inner.nr_writes += 1;
            inner.cache.remove(&vb);
        }
        let dev = self.t.dev;
        let passdown = self.t.pool.opts.discard_passdown && !zeroes;
        self.call(
            move |w, reply| reply(w.remove(dev, vb, vb + 1, passdown)),
            move |st, r| {
                let s = match r {
                    Ok(_) => IoStatus::Success,
                    Err(e) => IoStatus::Failed(e),
                };
                st.end_write(vb, io, done, s)
            },
        );
    }

    // ---- flush ----

    fn flush(self: &Rc<Self>, io: ModuleIo, done: Done) {
        self.call(
            move |w, reply| w.flush(reply),
            move |_, r| {
                let s = match r {
                    Ok(()) => IoStatus::Success,
                    Err(e) => IoStatus::Failed(e),
                };
                done.finish(io, s)
            },
        );
    }

    // ---- quiesce ----

    fn quiesce(self: &Rc<Self>, then: Box<dyn FnOnce()>) {
        let run_now = {
            let mut inner = self.inner.borrow_mut();
            inner.quiescing += 1;
            if inner.nr_writes == 0 {
                true
            } else {
                inner.quiesce_waiters.push(then);
                return;
            }
        };
        if run_now {
            then();
        }
    }

    fn resume(self: &Rc<Self>) {
        let held = {
            let mut inner = self.inner.borrow_mut();
            assert!(inner.quiescing > 0, "resume without quiesce");
            inner.quiescing -= 1;
            if inner.quiescing > 0 {
                return;
            }
            std::mem::take(&mut inner.held)
        };
        for (io, done) in held {
            self.submit(io, done);
        }
    }
}
