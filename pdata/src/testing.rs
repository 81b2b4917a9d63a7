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
//! Both types are cheap to clone; clones share state, so a test keeps a handle while the
//! metadata under test owns another.

use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::block_io::{BlockIo, BLOCK_SIZE};

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
