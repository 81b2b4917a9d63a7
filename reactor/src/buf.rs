//! Aligned, owned I/O buffers ([`DmaBuf`]) and the per-reactor pool that recycles them.
//!
//! A `DmaBuf` is moved by value into an I/O operation and handed back with its result
//! (STYLE rule 13), so its memory is never shared with the kernel and the caller at once.
//! Buffers are [`DMA_ALIGN`]-aligned and their capacity is a multiple of `DMA_ALIGN`, so they
//! work with `O_DIRECT`.
//!
//! Pool: each reactor keeps free buffers in power-of-two size classes from 4 KiB to
//! [`POOL_MAX_BYTES`], at most [`POOL_MAX_PER_CLASS`] per class. [`DmaBuf::alloc`] takes from
//! the current reactor's pool; dropping a buffer on a reactor returns it to that reactor's
//! pool (any reactor: buffers may migrate). Off-reactor, buffers are plain allocations.
//! Memory is always initialized (fresh buffers are zeroed), so reading a recycled buffer is
//! safe but yields stale bytes.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use crate::reactor;

/// Alignment and capacity granule of every [`DmaBuf`].
pub const DMA_ALIGN: usize = 4096;
/// Largest buffer capacity the pool keeps.
pub const POOL_MAX_BYTES: usize = 1 << 20;
/// Free buffers kept per size class per reactor.
pub const POOL_MAX_PER_CLASS: usize = 256;

const NR_CLASSES: usize = (POOL_MAX_BYTES / DMA_ALIGN).trailing_zeros() as usize + 1;

/// An owned, `DMA_ALIGN`-aligned byte buffer with a length and a fixed capacity.
pub struct DmaBuf {
    ptr: NonNull<u8>,
    capacity: usize,
    len: usize,
}

// SAFETY: DmaBuf uniquely owns its heap allocation (like Vec<u8>); moving it between threads
// moves that ownership.
unsafe impl Send for DmaBuf {}
// SAFETY: shared references only give `&[u8]` access, which is safe to share like `&Vec<u8>`.
unsafe impl Sync for DmaBuf {}

fn capacity_for(len: usize) -> usize {
    let cap = len.max(1).div_ceil(DMA_ALIGN) * DMA_ALIGN;
    if cap <= POOL_MAX_BYTES {
        cap.next_power_of_two()
    } else {
        cap
    }
}

fn class_of(capacity: usize) -> Option<usize> {
    if capacity.is_power_of_two() && (DMA_ALIGN..=POOL_MAX_BYTES).contains(&capacity) {
        Some((capacity / DMA_ALIGN).trailing_zeros() as usize)
    } else {
        None
    }
}

impl DmaBuf {
    /// A fresh zeroed buffer of `len` bytes (never pooled memory). Capacity is `len` rounded up
    /// to a multiple of [`DMA_ALIGN`] (to a power of two up to [`POOL_MAX_BYTES`]).
    ///
    /// Panics if the allocation fails or `len` overflows a `Layout` (as `Vec` does).
    pub fn new(len: usize) -> DmaBuf {
        let capacity = capacity_for(len);
        let layout = Layout::from_size_align(capacity, DMA_ALIGN).expect("DmaBuf size overflow");
        // SAFETY: layout has non-zero size (capacity >= DMA_ALIGN).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        DmaBuf { ptr, capacity, len }
    }

    /// A buffer of `len` bytes from the current reactor's pool, or fresh if the pool has none
    /// of that class (or off-reactor). Contents are unspecified (stale or zero).
    pub fn alloc(len: usize) -> DmaBuf {
        let capacity = capacity_for(len);
        if let Some(class) = class_of(capacity) {
            let recycled = reactor::try_with_core(|core| core.pool.borrow_mut().take(class));
            if let Some(Some(mut buf)) = recycled {
                buf.len = len;
                return buf;
            }
        }
        DmaBuf::new(len)
    }

    /// A fresh buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> DmaBuf {
        let mut buf = DmaBuf::alloc(data.len());
        buf.copy_from_slice(data);
        buf
    }

    /// Length in bytes: what a read fills and a write sends.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the length is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Capacity in bytes (a multiple of [`DMA_ALIGN`]).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sets the length. Panics if `len > capacity()` (programmer error).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity,
            "DmaBuf::set_len {len} > capacity {}",
            self.capacity
        );
        self.len = len;
    }

    /// Start of the buffer (aligned to [`DMA_ALIGN`]).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Mutable start of the buffer.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn layout(&self) -> Layout {
        // Cannot fail: the same layout was valid at allocation.
        Layout::from_size_align(self.capacity, DMA_ALIGN).expect("DmaBuf layout")
    }
}

impl Deref for DmaBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for capacity >= len initialized bytes, uniquely owned.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for DmaBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBuf")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        if let Some(class) = class_of(self.capacity) {
            let (ptr, capacity) = (self.ptr, self.capacity);
            // The pool's copy is built only inside the closure and only if the pool keeps it,
            // so no second owner of the allocation exists on any other path (off-reactor the
            // closure is never called).
            let kept = reactor::try_with_core(|core| {
                core.pool.borrow_mut().try_keep(class, || DmaBuf {
                    ptr,
                    capacity,
                    len: 0,
                })
            });
            if kept == Some(true) {
                return;
            }
        }
        // SAFETY: ptr was allocated with this layout and is not referenced elsewhere (the
        // pool did not keep a copy).
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout()) }
    }
}

/// Per-reactor free lists by size class.
pub(crate) struct BufPool {
    classes: [Vec<DmaBuf>; NR_CLASSES],
    /// Set at reactor shutdown: the pool keeps nothing more.
    closed: bool,
}

impl BufPool {
    pub(crate) fn new() -> Self {
        BufPool {
            classes: std::array::from_fn(|_| Vec::new()),
            closed: false,
        }
    }

    fn take(&mut self, class: usize) -> Option<DmaBuf> {
        self.classes[class].pop()
    }

    /// Keeps the buffer `make` builds if the class has room (returns true); else does not
    /// call `make`.
    fn try_keep(&mut self, class: usize, make: impl FnOnce() -> DmaBuf) -> bool {
        let list = &mut self.classes[class];
        if self.closed || list.len() >= POOL_MAX_PER_CLASS {
            return false;
        }
        list.push(make());
        true
    }

    pub(crate) fn nr_free(&self) -> usize {
        self.classes.iter().map(Vec::len).sum()
    }

    /// Closes the pool and returns every pooled buffer for the caller to drop (reactor
    /// shutdown; drop them after releasing the pool's borrow).
    pub(crate) fn close(&mut self) -> Vec<DmaBuf> {
        self.closed = true;
        self.classes.iter_mut().flat_map(std::mem::take).collect()
    }
}

/// Number of free buffers in the current reactor's pool. Panics off-reactor.
pub fn pool_nr_free() -> usize {
    reactor::with_core(|core| core.pool.borrow().nr_free())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_reactor_buffers_are_plain_allocations() {
        assert!(reactor::try_current().is_none());
        let mut a = DmaBuf::alloc(100);
        assert_eq!(a.len(), 100);
        assert_eq!(a.capacity(), DMA_ALIGN);
        assert_eq!(a.as_ptr() as usize % DMA_ALIGN, 0);
        a.fill(9);
        a.set_len(DMA_ALIGN);
        assert!(a[100..].iter().all(|&b| b == 0), "fresh memory is zeroed");
        drop(a);
        let big = DmaBuf::new(3 << 20);
        assert_eq!(big.capacity(), 3 << 20);
        drop(big);
        let copy = DmaBuf::from_slice(b"hello");
        assert_eq!(&copy[..], b"hello");
        assert!(format!("{copy:?}").contains("len: 5"));
    }

    #[test]
    fn capacity_classes() {
        assert_eq!(capacity_for(0), DMA_ALIGN);
        assert_eq!(capacity_for(4097), 8192);
        assert_eq!(capacity_for(12288), 16384);
        assert_eq!(capacity_for(POOL_MAX_BYTES + 1), POOL_MAX_BYTES + DMA_ALIGN);
        assert_eq!(class_of(DMA_ALIGN), Some(0));
        assert_eq!(class_of(POOL_MAX_BYTES), Some(NR_CLASSES - 1));
        assert_eq!(class_of(3 * DMA_ALIGN), None);
    }

    #[test]
    #[should_panic(expected = "set_len")]
    fn set_len_past_capacity_panics() {
        DmaBuf::new(10).set_len(DMA_ALIGN + 1);
    }
}
