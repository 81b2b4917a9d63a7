//! Bounded block cache with lock tracking and validators (spec §9.2).
//!
//! * Every block read from the device is checked by its [`Validator`]; every block written
//!   to the device is stamped by `prepare_for_write` (block number + checksum) first.
//! * A read lock is a [`ReadRef`] (a reference-counted, immutable view of the cached block).
//!   A write is a closure run on the cached buffer; it fails with `Corrupt` ("locked") if a
//!   read lock on that block is still held, so a block is never changed under a reader.
//! * The cache holds at most `capacity` unlocked blocks (LRU); dirty victims are written back
//!   (they are always shadows, never blocks reachable from the committed superblock, because
//!   the superblock itself is only dirtied inside `commit` right before a flush).
//! * [`BlockManager::try_read_lock`] never does I/O (`WouldBlock` on a miss).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Deref;
use std::sync::Arc;

use crate::block_io::{BlockIo, BLOCK_SIZE};
use crate::error::{err, Error, ErrorKind, Result};
use crate::validator::Validator;

/// One metadata block.
pub type Block = [u8; BLOCK_SIZE];

/// A read lock: an immutable view of a cached block.
#[derive(Debug, Clone)]
pub struct ReadRef {
    data: Arc<Block>,
    loc: u64,
}

impl ReadRef {
    /// Location of the block.
    pub fn loc(&self) -> u64 {
        self.loc
    }
}

impl Deref for ReadRef {
    type Target = Block;
    fn deref(&self) -> &Block {
        &self.data
    }
}

struct Entry {
    data: Arc<Block>,
    dirty: bool,
    validator: &'static dyn Validator,
    /// Clock bit: set on every access, cleared by the eviction hand.
    referenced: bool,
}

/// Hasher for block numbers (multiplicative; block numbers are not adversarial).
#[derive(Default)]
struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ (v >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type BlockMap<V> = HashMap<u64, V, BuildHasherDefault<BlockHasher>>;

/// Cache statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Blocks read from the device.
    pub nr_reads: u64,
    /// Blocks written to the device.
    pub nr_writes: u64,
    /// Lookups served from the cache.
    pub nr_hits: u64,
}

/// The block manager.
pub struct BlockManager {
    io: Box<dyn BlockIo>,
    cache: BlockMap<Entry>,
    /// Clock ring of cached locations (may hold stale locations of dropped blocks).
    ring: Vec<u64>,
    hand: usize,
    capacity: usize,
    stats: CacheStats,
}

impl std::fmt::Debug for BlockManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockManager")
            .field("cached", &self.cache.len())
            .field("capacity", &self.capacity)
            .field("stats", &self.stats)
            .finish()
    }
}

/// Smallest cache: enough for the deepest spine plus the siblings a rebalance touches.
pub const MIN_CACHE_BLOCKS: usize = 64;

impl BlockManager {
    /// A block manager over `io` caching up to `capacity` blocks (at least
    /// [`MIN_CACHE_BLOCKS`]).
    pub fn new(io: Box<dyn BlockIo>, capacity: usize) -> BlockManager {
        BlockManager {
            io,
            cache: BlockMap::default(),
            ring: Vec::new(),
            hand: 0,
            capacity: capacity.max(MIN_CACHE_BLOCKS),
            stats: CacheStats::default(),
        }
    }

    /// Device size in blocks.
    pub fn nr_blocks(&self) -> u64 {
        self.io.nr_blocks()
    }

    /// Statistics so far.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Blocks currently cached.
    pub fn nr_cached(&self) -> usize {
        self.cache.len()
    }

    /// Whether `loc` is cached.
    pub fn is_cached(&self, loc: u64) -> bool {
        self.cache.contains_key(&loc)
    }

    fn check_type(e: &Entry, loc: u64, v: &'static dyn Validator) -> Result<()> {
        if e.validator.name() != v.name() {
            return err(
                ErrorKind::Corrupt,
                format!(
                    "block {loc} used as {} and as {}",
                    e.validator.name(),
                    v.name()
                ),
            );
        }
        Ok(())
    }

    /// Read raw bytes of `loc` without validation and without caching (format detection).
    pub fn read_raw(&mut self, loc: u64) -> Result<Box<Block>> {
        let mut buf = Box::new([0u8; BLOCK_SIZE]);
        self.io
            .read_block(loc, &mut buf)
            .map_err(|e| Error::io(format!("reading metadata block {loc}"), e))?;
        self.stats.nr_reads += 1;
        Ok(buf)
    }

    /// Read-lock `loc`, reading and validating it on a miss.
    pub fn read_lock(&mut self, loc: u64, v: &'static dyn Validator) -> Result<ReadRef> {
        match self.try_read_lock(loc, v) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            r => return r,
        }
        let buf = self.read_raw(loc)?;
        v.check(&buf, loc)?;
        let data: Arc<Block> = Arc::from(buf);
        self.insert(loc, data.clone(), false, v)?;
        Ok(ReadRef { data, loc })
    }

    /// Read-lock `loc` only if cached; `WouldBlock` otherwise. Never does I/O.
    pub fn try_read_lock(&mut self, loc: u64, v: &'static dyn Validator) -> Result<ReadRef> {
        let Some(e) = self.cache.get_mut(&loc) else {
            return err(
                ErrorKind::WouldBlock,
                format!("metadata block {loc} not cached"),
            );
        };
        Self::check_type(e, loc, v)?;
        e.referenced = true;
        let data = e.data.clone();
        self.stats.nr_hits += 1;
        Ok(ReadRef { data, loc })
    }

    fn insert(
        &mut self,
        loc: u64,
        data: Arc<Block>,
        dirty: bool,
        v: &'static dyn Validator,
    ) -> Result<()> {
        assert!(!self.cache.contains_key(&loc), "block {loc} inserted twice");
        let e = Entry {
            data,
            dirty,
            validator: v,
            referenced: true,
        };
        self.cache.insert(loc, e);
        self.ring.push(loc);
        self.evict(loc)?;
        debug_assert!(self.ring.len() >= self.cache.len());
        Ok(())
    }

    /// Evict unlocked, not recently referenced blocks (clock) while over capacity. Locked
    /// blocks and `protect` (the block being inserted) are skipped; after two full sweeps
    /// without a victim the cache stays over its bound (only possible while more than
    /// `capacity` blocks are read-locked).
    fn evict(&mut self, protect: u64) -> Result<()> {
        let mut budget = 2 * self.ring.len() + 2;
        while self.cache.len() > self.capacity && budget > 0 && !self.ring.is_empty() {
            budget -= 1;
            if self.hand >= self.ring.len() {
                self.hand = 0;
            }
            let loc = self.ring[self.hand];
            let Some(e) = self.cache.get_mut(&loc) else {
                self.ring.swap_remove(self.hand);
                continue;
            };
            if e.referenced || loc == protect || Arc::strong_count(&e.data) > 1 {
                e.referenced = false;
                self.hand += 1;
                continue;
            }
            if e.dirty {
                let mut e = self.cache.remove(&loc).expect("entry just seen");
                let r = self.write_out(loc, &mut e);
                self.cache.insert(loc, e);
                r?;
            }
            self.cache.remove(&loc);
            self.ring.swap_remove(self.hand);
        }
        // Keep stale ring slots bounded.
        if self.ring.len() > 2 * self.cache.len() + 64 {
            let cache = &self.cache;
            self.ring.retain(|l| cache.contains_key(l));
            self.hand = 0;
        }
        Ok(())
    }

    fn write_out(&mut self, loc: u64, e: &mut Entry) -> Result<()> {
        let buf = Arc::make_mut(&mut e.data);
        e.validator.prepare_for_write(buf, loc);
        self.io
            .write_block(loc, buf)
            .map_err(|x| Error::io(format!("writing metadata block {loc}"), x))?;
        self.stats.nr_writes += 1;
        e.dirty = false;
        Ok(())
    }

    fn lock_for_write(&mut self, loc: u64, v: &'static dyn Validator) -> Result<&mut Entry> {
        match self.cache.get_mut(&loc) {
            Some(e) => {
                Self::check_type(e, loc, v)?;
                if Arc::strong_count(&e.data) > 1 {
                    return err(
                        ErrorKind::Corrupt,
                        format!("write lock of block {loc} while it is read-locked"),
                    );
                }
                e.dirty = true;
                e.referenced = true;
                Ok(e)
            }
            None => err(
                ErrorKind::Corrupt,
                format!("block {loc} vanished from cache"),
            ),
        }
    }

    /// Write-lock `loc` (reading it if needed) and run `f` on its bytes; marks it dirty.
    pub fn write<R>(
        &mut self,
        loc: u64,
        v: &'static dyn Validator,
        f: impl FnOnce(&mut Block) -> R,
    ) -> Result<R> {
        if !self.cache.contains_key(&loc) {
            drop(self.read_lock(loc, v)?);
        }
        let e = self.lock_for_write(loc, v)?;
        let r = match Arc::get_mut(&mut e.data) {
            Some(buf) => f(buf),
            None => return err(ErrorKind::Corrupt, format!("block {loc} is read-locked")),
        };
        Ok(r)
    }

    /// Write-lock `loc` as a zeroed block without reading it, run `f`; marks it dirty.
    /// Errors if the block is currently read-locked.
    pub fn write_zero<R>(
        &mut self,
        loc: u64,
        v: &'static dyn Validator,
        f: impl FnOnce(&mut Block) -> R,
    ) -> Result<R> {
        self.replace(loc, v, Arc::new([0u8; BLOCK_SIZE]), f)
    }

    /// Write-lock `loc` as a copy of `src` without reading it, run `f`; marks it dirty.
    pub fn write_copy<R>(
        &mut self,
        loc: u64,
        v: &'static dyn Validator,
        src: &Block,
        f: impl FnOnce(&mut Block) -> R,
    ) -> Result<R> {
        self.replace(loc, v, Arc::new(*src), f)
    }

    fn replace<R>(
        &mut self,
        loc: u64,
        v: &'static dyn Validator,
        mut data: Arc<Block>,
        f: impl FnOnce(&mut Block) -> R,
    ) -> Result<R> {
        if let Some(e) = self.cache.get(&loc) {
            if Arc::strong_count(&e.data) > 1 {
                return err(
                    ErrorKind::Corrupt,
                    format!("block {loc} reused while read-locked"),
                );
            }
            self.cache.remove(&loc);
        }
        let r = match Arc::get_mut(&mut data) {
            Some(buf) => f(buf),
            None => return err(ErrorKind::Corrupt, "fresh buffer shared"),
        };
        self.insert(loc, data, true, v)?;
        Ok(r)
    }

    /// Drop a cached block (dirty or not) without writing it: used when a block is freed.
    pub fn forget(&mut self, loc: u64) {
        if let Some(e) = self.cache.get(&loc) {
            if Arc::strong_count(&e.data) == 1 {
                self.cache.remove(&loc);
            }
        }
    }

    /// Write every dirty block (ascending location), then flush the device.
    pub fn flush(&mut self) -> Result<()> {
        let mut dirty: Vec<u64> = self
            .cache
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(l, _)| *l)
            .collect();
        dirty.sort_unstable();
        for loc in dirty {
            if let Some(mut e) = self.cache.remove(&loc) {
                let r = self.write_out(loc, &mut e);
                self.cache.insert(loc, e);
                r?;
            }
        }
        self.io
            .flush()
            .map_err(|e| Error::io("flushing metadata device", e))?;
        debug_assert!(self.cache.values().all(|e| !e.dirty));
        Ok(())
    }

    /// Number of dirty cached blocks.
    pub fn nr_dirty(&self) -> usize {
        self.cache.values().filter(|e| e.dirty).count()
    }

    /// Discard the whole cache, including dirty blocks (abort).
    pub fn invalidate_all(&mut self) {
        self.cache.clear();
        self.ring.clear();
        self.hand = 0;
    }

    /// Write `buf` straight to the device at `loc` after stamping it (superblock updates that
    /// must not wait for a full flush, e.g. NEEDS_CHECK), then flush. Drops any cached copy.
    pub fn write_direct(
        &mut self,
        loc: u64,
        v: &'static dyn Validator,
        buf: &mut Block,
    ) -> Result<()> {
        v.prepare_for_write(buf, loc);
        self.forget(loc);
        self.io
            .write_block(loc, buf)
            .map_err(|e| Error::io(format!("writing metadata block {loc}"), e))?;
        self.stats.nr_writes += 1;
        self.io
            .flush()
            .map_err(|e| Error::io("flushing metadata device", e))
    }
}

#[cfg(test)]
mod tests;
