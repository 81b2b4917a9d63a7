//! The shared in-flight tracking area (INFLIGHT_SHMFD): per queue, which descriptor heads the
//! backend has taken from the avail ring and not yet put on the used ring, so a reconnecting
//! backend (or a restarted one given the same area by QEMU) resubmits them instead of losing
//! them.
//!
//! Split-ring region layout (vhost-user spec), one per queue, `region_len` bytes apart:
//! | off | size | field |
//! | 0 | 8 | features |
//! | 8 | 2 | version (1; 0 = never initialised) |
//! | 10 | 2 | desc_num |
//! | 12 | 2 | last_batch_head |
//! | 14 | 2 | used_idx |
//! | 16 | 16 × desc_num | {u8 inflight, u8 pad[5], u16 next, u64 counter} |

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

const HDR_LEN: usize = 16;
const DESC_LEN: usize = 16;
/// Region version this backend writes.
pub const VERSION: u16 = 1;

/// Bytes of one queue's region for `queue_size` descriptors (64-byte aligned, as QEMU's
/// libvhost-user sizes it).
pub fn region_len(queue_size: u16) -> usize {
    (HDR_LEN + DESC_LEN * usize::from(queue_size)).div_ceil(64) * 64
}

/// A mapped in-flight area shared with the frontend.
#[derive(Debug)]
pub struct InflightArea {
    ptr: *mut u8,
    len: usize,
    /// The memfd (kept so GET_INFLIGHT_FD can hand out the same area).
    pub file: File,
    /// Queues covered.
    pub num_queues: u16,
    /// Descriptors per queue.
    pub queue_size: u16,
}

// SAFETY: the mapping is plain shared memory; each queue's region is written only by the one
// worker that runs that queue (and by the control path while no worker runs it), so moving or
// sharing the handle between threads creates no data race on the same bytes.
unsafe impl Send for InflightArea {}
// SAFETY: see `Send`; concurrent access is partitioned by queue.
unsafe impl Sync for InflightArea {}

impl Drop for InflightArea {
    fn drop(&mut self) {
        // SAFETY: ptr/len come from a successful mmap in `map` and are unmapped only here.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl InflightArea {
    /// Creates a zeroed memfd area for `num_queues` × `queue_size`.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<Arc<Self>, String> {
        let len = region_len(queue_size) * usize::from(num_queues);
        // SAFETY: memfd_create with a NUL-terminated name; the returned fd is owned by File.
        let fd = unsafe { libc::memfd_create(c"thind-vhost-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)
            .map_err(|e| format!("inflight area size {len}: {e}"))?;
        Self::map(file, 0, len, num_queues, queue_size)
    }

    /// Maps an area the frontend handed over (SET_INFLIGHT_FD), after checking its size.
    pub fn map(
        file: File,
        offset: u64,
        len: usize,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Arc<Self>, String> {
        if num_queues == 0 || queue_size == 0 || queue_size > 1024 {
            return Err(format!(
                "inflight area: {num_queues} queues of {queue_size}"
            ));
        }
        let need = region_len(queue_size) * usize::from(num_queues);
        if len < need {
            return Err(format!("inflight area of {len} bytes, need {need}"));
        }
        let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > file_len)
        {
            return Err(format!(
                "inflight area {offset}+{len} past its file ({file_len})"
            ));
        }
        let off = libc::off_t::try_from(offset).map_err(|_| "inflight offset".to_string())?;
        // SAFETY: mapping `len` bytes of a file we checked is at least offset+len long; the
        // result is checked against MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!(
                "inflight mmap: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Arc::new(InflightArea {
            ptr: ptr.cast(),
            len,
            file,
            num_queues,
            queue_size,
        }))
    }

    /// Bytes mapped.
    pub fn len_bytes(&self) -> usize {
        self.len
    }
}

/// One queue's region of an [`InflightArea`].
#[derive(Debug, Clone)]
pub struct InflightRegion {
    area: Arc<InflightArea>,
    base: usize,
}

impl InflightRegion {
    /// Queue `index`'s region, if the area covers it.
    pub fn new(area: &Arc<InflightArea>, index: u16) -> Option<Self> {
        (index < area.num_queues).then(|| InflightRegion {
            area: area.clone(),
            base: region_len(area.queue_size) * usize::from(index),
        })
    }

    /// Descriptors the region holds.
    pub fn capacity(&self) -> u16 {
        self.area.queue_size
    }

    fn ptr(&self, off: usize, size: usize) -> *mut u8 {
        let end = self.base + off + size;
        assert!(end <= self.base + region_len(self.area.queue_size) && end <= self.area.len);
        // SAFETY: bounds asserted above; the mapping is alive while `area` is.
        unsafe { self.area.ptr.add(self.base + off) }
    }

    fn get16(&self, off: usize) -> u16 {
        // SAFETY: in-bounds (see `ptr`); shared memory is read volatile (the frontend may
        // inspect it), unaligned-safe.
        unsafe { std::ptr::read_unaligned(self.ptr(off, 2).cast::<u16>()) }
    }

    fn set16(&self, off: usize, v: u16) {
        // SAFETY: in-bounds (see `ptr`); only this queue's worker writes this region.
        unsafe { std::ptr::write_unaligned(self.ptr(off, 2).cast::<u16>(), v) }
    }

    /// Region version (0 = uninitialised).
    pub fn version(&self) -> u16 {
        self.get16(8)
    }

    /// Resets the region for a ring of `desc_num` descriptors whose used index is `used_idx`.
    pub fn init(&self, desc_num: u16, used_idx: u16) {
        let len = region_len(self.area.queue_size);
        // SAFETY: the whole region is in bounds (checked by `ptr` for its length).
        unsafe { std::ptr::write_bytes(self.ptr(0, len), 0, len) };
        self.set16(8, VERSION);
        self.set16(10, desc_num);
        self.set16(14, used_idx);
    }

    /// `desc_num` field.
    pub fn desc_num(&self) -> u16 {
        self.get16(10)
    }

    /// Last batch head and used index recorded.
    pub fn batch(&self) -> (u16, u16) {
        (self.get16(12), self.get16(14))
    }

    /// Marks `head` in flight with ordering `counter`.
    pub fn set_inflight(&self, head: u16, counter: u64) {
        if head >= self.area.queue_size {
            return;
        }
        let off = HDR_LEN + DESC_LEN * usize::from(head);
        // SAFETY: in-bounds (see `ptr`); only this queue's worker writes this region.
        unsafe {
            std::ptr::write_unaligned(self.ptr(off + 8, 8).cast::<u64>(), counter);
            std::ptr::write_volatile(self.ptr(off, 1), 1);
        }
    }

    /// Before publishing `head` on the used ring: chain it into the last batch.
    pub fn begin_complete(&self, head: u16) {
        if head >= self.area.queue_size {
            return;
        }
        let off = HDR_LEN + DESC_LEN * usize::from(head);
        let last = self.get16(12);
        self.set16(off + 6, last);
        self.set16(12, head);
    }

    /// After publishing: clear `head` and record the used index.
    pub fn end_complete(&self, head: u16, used_idx: u16) {
        self.clear(head);
        self.set16(14, used_idx);
    }

    /// Clears `head`'s in-flight flag.
    pub fn clear(&self, head: u16) {
        if head >= self.area.queue_size {
            return;
        }
        let off = HDR_LEN + DESC_LEN * usize::from(head);
        // SAFETY: in-bounds (see `ptr`); only this queue's worker writes this region.
        unsafe { std::ptr::write_volatile(self.ptr(off, 1), 0) };
    }

    /// Heads still in flight with their counters, oldest first, for ring size `desc_num`.
    pub fn pending(&self, desc_num: u16) -> Vec<(u64, u16)> {
        let mut v = Vec::new();
        for head in 0..desc_num.min(self.area.queue_size) {
            let off = HDR_LEN + DESC_LEN * usize::from(head);
            // SAFETY: in-bounds (see `ptr`); read while no worker runs this queue.
            let (flag, counter) = unsafe {
                (
                    std::ptr::read_volatile(self.ptr(off, 1)),
                    std::ptr::read_unaligned(self.ptr(off + 8, 8).cast::<u64>()),
                )
            };
            if flag == 1 {
                v.push((counter, head));
            }
        }
        v.sort_unstable();
        v
    }

    /// Records the used index after recovery.
    pub fn set_used_idx(&self, used_idx: u16) {
        self.set16(14, used_idx);
    }
}
