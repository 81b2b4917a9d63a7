//! Guest memory and the driver's side of split virtqueues.
//!
//! Guest memory is one memfd mapped `MAP_SHARED` here (vm-memory's `MmapRegion::from_file`)
//! and handed to the backend by SET_MEM_TABLE, so both processes see the same pages. Each
//! queue's descriptor table, avail ring, used ring, request headers, status bytes and data
//! buffers sit at fixed guest-physical addresses ([`QueueLayout`]). Guest-physical addresses
//! start at [`GPA_BASE`] so that a backend mixing up guest-physical addresses, the frontend's
//! virtual addresses (SET_VRING_ADDR) and offsets fails loudly rather than by luck.
//!
//! [`Vring`] is what a guest driver does with a split ring: put heads in the avail ring,
//! publish the avail index (release), decide whether to kick (used flags NO_NOTIFY, or
//! `avail_event` with EVENT_IDX), and reap used elements (acquire on the used index). Call
//! notifications are suppressed (avail flags NO_INTERRUPT, or a `used_event` kept half a ring
//! of indices ahead with EVENT_IDX): the driver busy-polls the used ring.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::indexing_slicing))]

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU16, Ordering};

use vhost_user::VhostUserMemoryRegionInfo;
use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    FileOffset, GuestAddress, GuestRegionMmap, MmapRegion, VolatileArrayRef, VolatileMemory,
    VolatileRef, VolatileSlice,
};

/// Guest-physical address of the first byte of guest memory.
pub const GPA_BASE: u64 = 0x1_0000_0000;
/// Bytes of a virtio-blk request header (`virtio_blk_outhdr`).
pub const HDR_BYTES: u64 = 16;
const PAGE: u64 = 4096;

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Where one queue's structures live, as offsets into guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    /// Descriptor table: `ring_size` × 16 bytes.
    pub desc: u64,
    /// Avail ring: flags, idx, ring[ring_size], used_event.
    pub avail: u64,
    /// Used ring: flags, idx, ring[ring_size] of (id, len), avail_event.
    pub used: u64,
    /// Request headers: `depth` × 16 bytes.
    pub hdr: u64,
    /// Status bytes: `depth` × 1.
    pub status: u64,
    /// Data buffers: `depth` × `io_size`, page aligned.
    pub data: u64,
}

/// The whole guest-memory map of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemLayout {
    /// One entry per queue.
    pub queues: Vec<QueueLayout>,
    /// Bytes of guest memory (page multiple).
    pub len_bytes: u64,
}

impl MemLayout {
    /// Lays out `nr_queues` queues of `ring_size` entries, `depth` requests of `io_size` bytes.
    pub fn new(nr_queues: u16, ring_size: u16, depth: u32, io_size: u64) -> MemLayout {
        let n = u64::from(ring_size);
        let mut off = 0;
        let mut queues = Vec::with_capacity(nr_queues.into());
        for _ in 0..nr_queues {
            let desc = off;
            let avail = align_up(desc + 16 * n, 64);
            let used = align_up(avail + 6 + 2 * n, PAGE);
            let hdr = align_up(used + 6 + 8 * n, 64);
            let status = hdr + HDR_BYTES * u64::from(depth);
            let data = align_up(status + u64::from(depth), PAGE);
            off = align_up(data + io_size * u64::from(depth), PAGE);
            queues.push(QueueLayout {
                desc,
                avail,
                used,
                hdr,
                status,
                data,
            });
        }
        MemLayout {
            queues,
            len_bytes: off,
        }
    }
}

/// Guest memory shared with the backend.
pub struct GuestMem {
    region: GuestRegionMmap,
}

impl GuestMem {
    /// Creates and maps a memfd of `len_bytes`.
    pub fn new(len_bytes: u64) -> Result<GuestMem, String> {
        // SAFETY: memfd_create with a NUL-terminated name and no flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vhost-blk-perf".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(len_bytes)
            .map_err(|e| format!("sizing guest memory to {len_bytes} bytes: {e}"))?;
        let len = usize::try_from(len_bytes).map_err(|e| e.to_string())?;
        let mapping = MmapRegion::from_file(FileOffset::new(file, 0), len)
            .map_err(|e| format!("mapping guest memory: {e}"))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(GPA_BASE))
            .ok_or("guest memory region overflows the address space")?;
        Ok(GuestMem { region })
    }

    /// The SET_MEM_TABLE entry: guest-physical base, our virtual address, the memfd.
    pub fn region_info(&self) -> Result<VhostUserMemoryRegionInfo, String> {
        VhostUserMemoryRegionInfo::from_guest_region(&self.region).map_err(|e| e.to_string())
    }

    /// Our virtual address of guest-memory offset `off` (what SET_VRING_ADDR takes).
    pub fn uva(&self, off: u64) -> u64 {
        self.region.as_ptr() as u64 + off
    }

    /// The guest-physical address of offset `off` (what descriptors hold).
    pub fn gpa(off: u64) -> u64 {
        GPA_BASE + off
    }

    /// `len` bytes at offset `off`.
    pub fn slice(&self, off: u64, len: u64) -> Result<VolatileSlice<'_>, String> {
        let (o, l) = (usize::try_from(off), usize::try_from(len));
        let (Ok(o), Ok(l)) = (o, l) else {
            return Err(format!("guest memory range {off}+{len} overflows"));
        };
        self.region
            .get_slice(o, l)
            .map_err(|e| format!("guest memory {off}+{len}: {e}"))
    }

    /// A u16 the backend reads or writes concurrently.
    pub fn atomic_u16(&self, off: u64) -> Result<&AtomicU16, String> {
        let o = usize::try_from(off).map_err(|e| e.to_string())?;
        self.region
            .get_atomic_ref::<AtomicU16>(o)
            .map_err(|e| format!("guest memory u16 at {off}: {e}"))
    }

    /// A plain value at offset `off`.
    pub fn value<T: vm_memory::ByteValued>(&self, off: u64) -> Result<VolatileRef<'_, T>, String> {
        let o = usize::try_from(off).map_err(|e| e.to_string())?;
        self.region
            .get_ref::<T>(o)
            .map_err(|e| format!("guest memory at {off}: {e}"))
    }

    /// `n` values starting at offset `off`.
    pub fn array<T: vm_memory::ByteValued>(
        &self,
        off: u64,
        n: usize,
    ) -> Result<VolatileArrayRef<'_, T>, String> {
        let o = usize::try_from(off).map_err(|e| e.to_string())?;
        self.region
            .get_array_ref::<T>(o, n)
            .map_err(|e| format!("guest memory array at {off}: {e}"))
    }
}

/// `vring_need_event`: whether moving an index from `old` to `new` crosses `event`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The driver's view of one split virtqueue.
pub struct Vring<'m> {
    size: u16,
    event_idx: bool,
    desc: VolatileArrayRef<'m, Descriptor>,
    avail_ring: VolatileArrayRef<'m, u16>,
    avail_idx: &'m AtomicU16,
    used_event: &'m AtomicU16,
    used_flags: &'m AtomicU16,
    used_idx: &'m AtomicU16,
    /// (id, len) pairs as 2 × u32.
    used_ring: VolatileArrayRef<'m, u32>,
    avail_event: &'m AtomicU16,
    /// Our next avail index (published or not).
    next_avail: u16,
    /// Avail index at the last kick decision.
    checked_avail: u16,
    /// Next used index to reap.
    last_used: u16,
}

impl<'m> Vring<'m> {
    /// Maps the ring at `q` (zeroed memory) and suppresses call notifications.
    pub fn new(
        mem: &'m GuestMem,
        q: &QueueLayout,
        size: u16,
        event_idx: bool,
    ) -> Result<Vring<'m>, String> {
        let n = u64::from(size);
        let ring = Vring {
            size,
            event_idx,
            desc: mem.array(q.desc, size.into())?,
            avail_ring: mem.array(q.avail + 4, size.into())?,
            avail_idx: mem.atomic_u16(q.avail + 2)?,
            used_event: mem.atomic_u16(q.avail + 4 + 2 * n)?,
            used_flags: mem.atomic_u16(q.used)?,
            used_idx: mem.atomic_u16(q.used + 2)?,
            used_ring: mem.array(q.used + 4, 2 * usize::from(size))?,
            avail_event: mem.atomic_u16(q.used + 4 + 8 * n)?,
            next_avail: 0,
            checked_avail: 0,
            last_used: 0,
        };
        let avail_flags = mem.atomic_u16(q.avail)?;
        if event_idx {
            avail_flags.store(0, Ordering::Relaxed);
            ring.push_used_event();
        } else {
            let no_interrupt = u16::try_from(VRING_AVAIL_F_NO_INTERRUPT).unwrap_or(1);
            avail_flags.store(no_interrupt.to_le(), Ordering::Release);
        }
        Ok(ring)
    }

    /// Ring entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Writes descriptor `i`: `len` bytes at guest-physical `gpa`, device-writable or not, and
    /// chained to `next` if given.
    pub fn set_desc(&self, i: u16, gpa: u64, len: u32, device_writes: bool, next: Option<u16>) {
        let mut flags = 0u32;
        if device_writes {
            flags |= VRING_DESC_F_WRITE;
        }
        if next.is_some() {
            flags |= VRING_DESC_F_NEXT;
        }
        let flags = u16::try_from(flags).unwrap_or(0);
        self.desc.store(
            usize::from(i),
            Descriptor::new(gpa, len, flags, next.unwrap_or(0)),
        );
    }

    /// Puts `head` in the avail ring (not yet visible to the device).
    pub fn push(&mut self, head: u16) {
        let slot = usize::from(self.next_avail % self.size);
        self.avail_ring.store(slot, head.to_le());
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Publishes pushed heads and says whether the device asked to be kicked for them.
    pub fn publish(&mut self) -> bool {
        if self.next_avail == self.checked_avail {
            return false;
        }
        self.avail_idx
            .store(self.next_avail.to_le(), Ordering::Release);
        // The device's suppression state must be read after the index is visible, or a device
        // that re-enabled kicks in between would miss this batch.
        fence(Ordering::SeqCst);
        let old = self.checked_avail;
        self.checked_avail = self.next_avail;
        if self.event_idx {
            let event = u16::from_le(self.avail_event.load(Ordering::Acquire));
            need_event(event, self.next_avail, old)
        } else {
            let no_notify = u16::try_from(VRING_USED_F_NO_NOTIFY).unwrap_or(1);
            u16::from_le(self.used_flags.load(Ordering::Acquire)) & no_notify == 0
        }
    }

    /// Used elements ready to reap.
    pub fn nr_used(&self) -> u16 {
        u16::from_le(self.used_idx.load(Ordering::Acquire)).wrapping_sub(self.last_used)
    }

    /// Reaps the next used element, `(id, len)`; call only while [`Vring::nr_used`] > 0.
    pub fn pop_used(&mut self) -> (u32, u32) {
        let slot = usize::from(self.last_used % self.size) * 2;
        let id = self.used_ring.load(slot);
        let len = self.used_ring.load(slot + 1);
        self.last_used = self.last_used.wrapping_add(1);
        (u32::from_le(id), u32::from_le(len))
    }

    /// With EVENT_IDX, keeps `used_event` half the index space ahead of what we reaped, so the
    /// device never finds a reason to signal. Call after each reaped batch.
    pub fn push_used_event(&self) {
        if self.event_idx {
            let event = self.last_used.wrapping_add(0x8000);
            self.used_event.store(event.to_le(), Ordering::Release);
        }
    }

    /// Our next avail index (what GET_VRING_BASE should report once the ring is idle).
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_disjoint_and_aligned() {
        let l = MemLayout::new(2, 512, 128, 4096);
        assert_eq!(l.queues.len(), 2);
        let mut end = 0;
        for q in &l.queues {
            assert!(q.desc >= end);
            assert_eq!(q.desc % 16, 0);
            assert!(q.avail >= q.desc + 16 * 512);
            assert!(q.used >= q.avail + 6 + 2 * 512);
            assert_eq!(q.used % 4096, 0);
            assert!(q.hdr >= q.used + 6 + 8 * 512);
            assert_eq!(q.status, q.hdr + 16 * 128);
            assert!(q.data >= q.status + 128);
            assert_eq!(q.data % 4096, 0);
            end = q.data + 128 * 4096;
        }
        assert!(l.len_bytes >= end);
        assert_eq!(l.len_bytes % 4096, 0);
    }

    #[test]
    fn need_event_matches_the_virtio_formula() {
        assert!(need_event(0, 1, 0));
        assert!(
            !need_event(5, 5, 0),
            "event 5 not crossed until idx passes it"
        );
        assert!(need_event(5, 6, 0));
        assert!(!need_event(10, 6, 5));
        assert!(need_event(65535, 2, 65534), "wraps");
        // An event half the index space ahead is never crossed by a batch.
        assert!(!need_event(100u16.wrapping_add(0x8000), 400, 100));
    }

    #[test]
    fn ring_publishes_and_reaps_in_shared_memory() {
        let l = MemLayout::new(1, 8, 2, 512);
        let mem = GuestMem::new(l.len_bytes).expect("memfd");
        let q = l.queues[0];
        let mut ring = Vring::new(&mem, &q, 8, false).expect("ring");
        assert_eq!(mem.atomic_u16(q.avail).unwrap().load(Ordering::Relaxed), 1);
        ring.set_desc(3, GuestMem::gpa(q.data), 512, true, Some(4));
        let d = mem.array::<u8>(q.desc + 48, 16).unwrap();
        let mut raw = [0u8; 16];
        d.copy_to(&mut raw);
        assert_eq!(
            u64::from_le_bytes(raw[..8].try_into().unwrap()),
            GPA_BASE + q.data
        );
        assert_eq!(u16::from_le_bytes(raw[12..14].try_into().unwrap()), 3);
        assert_eq!(u16::from_le_bytes(raw[14..16].try_into().unwrap()), 4);

        ring.push(3);
        assert!(ring.publish(), "no NO_NOTIFY: kick");
        assert!(!ring.publish(), "nothing new");
        assert_eq!(
            mem.atomic_u16(q.avail + 2).unwrap().load(Ordering::Relaxed),
            1
        );
        mem.atomic_u16(q.used).unwrap().store(1, Ordering::Relaxed);
        ring.push(0);
        assert!(!ring.publish(), "NO_NOTIFY: no kick");

        assert_eq!(ring.nr_used(), 0);
        let used = mem.array::<u32>(q.used + 4, 16).unwrap();
        used.store(0, 3);
        used.store(1, 513);
        mem.atomic_u16(q.used + 2)
            .unwrap()
            .store(1, Ordering::Release);
        assert_eq!(ring.nr_used(), 1);
        assert_eq!(ring.pop_used(), (3, 513));
        assert_eq!(ring.nr_used(), 0);
    }

    #[test]
    fn event_idx_ring_kicks_on_avail_event_and_keeps_used_event_ahead() {
        let l = MemLayout::new(1, 8, 2, 512);
        let mem = GuestMem::new(l.len_bytes).expect("memfd");
        let q = l.queues[0];
        let mut ring = Vring::new(&mem, &q, 8, true).expect("ring");
        let used_event = mem.atomic_u16(q.avail + 4 + 16).unwrap();
        assert_eq!(used_event.load(Ordering::Relaxed), 0x8000);
        let avail_event = mem.atomic_u16(q.used + 4 + 64).unwrap();
        ring.push(0);
        assert!(ring.publish(), "avail_event 0 is crossed by 0 -> 1");
        avail_event.store(5, Ordering::Relaxed);
        ring.push(3);
        assert!(!ring.publish(), "1 -> 2 does not cross 5");
    }
}
