//! Device details value (`struct disk_device_details`, 24 bytes, spec §7.2):
//! `mapped_blocks u64 | transaction_id u64 | creation_time u32 | snapshotted_time u32`.
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use crate::codec::{Pack, Reader, Unpack, Writer};
use crate::error::Result;

/// Per-thin-device details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceDetails {
    /// Number of mappings in the device's tree.
    pub mapped_blocks: u64,
    /// Pool transaction id when the device was created.
    pub transaction_id: u64,
    /// Pool time at creation.
    pub creation_time: u32,
    /// Pool time of the most recent snapshot of (or as) this device.
    pub snapshotted_time: u32,
}

impl Pack for DeviceDetails {
    const DISK_SIZE: usize = 24;
    fn pack(&self, w: &mut Writer<'_>) -> Result<()> {
        w.u64(self.mapped_blocks)?;
        w.u64(self.transaction_id)?;
        w.u32(self.creation_time)?;
        w.u32(self.snapshotted_time)
    }
}

impl Unpack for DeviceDetails {
    const DISK_SIZE: usize = 24;
    fn unpack(r: &mut Reader<'_>) -> Result<Self> {
        Ok(DeviceDetails {
            mapped_blocks: r.u64()?,
            transaction_id: r.u64()?,
            creation_time: r.u32()?,
            snapshotted_time: r.u32()?,
        })
    }
}
