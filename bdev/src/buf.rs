//! `IoBuf`: the owned, aligned I/O buffer that moves by value into an I/O and comes back with
//! its completion (STYLE rule 13). It is the reactor's [`reactor::DmaBuf`]: 4096-aligned,
//! recycled through the current reactor's pool (`IoBuf::alloc`), plain memory off-reactor.
//! Its memory never moves while it lives, so the kernel or a base bdev may hold a pointer
//! into it while the I/O that owns it is in flight.

pub use reactor::DmaBuf as IoBuf;

/// Alignment and capacity granule of every [`IoBuf`].
pub const IO_BUF_ALIGN: usize = reactor::DMA_ALIGN;
