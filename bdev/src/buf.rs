//! `IoBuf`: an owned, aligned I/O buffer that moves by value into an I/O and comes back with
//! its completion (STYLE rule 13).
//!
//! Interim stand-in with exactly the API of `reactor::DmaBuf` (`new`, `alloc`, `from_slice`,
//! `len`, `capacity`, `set_len`, `as_ptr`, `as_mut_ptr`, `Deref<[u8]>`); it becomes
//! `pub use reactor::DmaBuf as IoBuf` once the reactor crate builds, so code written against
//! either keeps compiling. Memory is aligned to [`IO_BUF_ALIGN`] and never moves while the
//! buffer lives, so a kernel or base bdev may hold a pointer into it while I/O is in flight.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment and capacity granule of every `IoBuf`.
pub const IO_BUF_ALIGN: usize = 4096;

/// An owned, aligned byte buffer with a length and a fixed capacity.
pub struct IoBuf {
    ptr: NonNull<u8>,
    capacity: usize,
    len: usize,
}

// SAFETY: IoBuf uniquely owns its allocation (like Vec<u8>); no interior sharing.
unsafe impl Send for IoBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zeroed buffer of `len` bytes; capacity is `len` rounded up to [`IO_BUF_ALIGN`].
    /// Panics if the allocation fails (as `Vec` does).
    pub fn new(len: usize) -> IoBuf {
        let capacity = len.max(1).div_ceil(IO_BUF_ALIGN) * IO_BUF_ALIGN;
        let layout = Layout::from_size_align(capacity, IO_BUF_ALIGN).expect("IoBuf size overflow");
        // SAFETY: layout has non-zero size (capacity >= IO_BUF_ALIGN).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        IoBuf { ptr, capacity, len }
    }

    /// A buffer of `len` bytes (pooled per reactor once backed by `reactor::DmaBuf`;
    /// contents unspecified).
    pub fn alloc(len: usize) -> IoBuf {
        IoBuf::new(len)
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> IoBuf {
        let mut buf = IoBuf::alloc(data.len());
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

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sets the length. Panics if `len > capacity()` (programmer error).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity,
            "IoBuf::set_len {len} > capacity {}",
            self.capacity
        );
        self.len = len;
    }

    /// Start of the buffer.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Mutable start of the buffer.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of capacity >= len initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref; &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if let Ok(layout) = Layout::from_size_align(self.capacity, IO_BUF_ALIGN) {
            // SAFETY: ptr was allocated by alloc_zeroed with exactly this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
        }
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}
