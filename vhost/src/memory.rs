//! Guest memory of one vhost-user session: the regions of SET_MEM_TABLE mapped MAP_SHARED, and
//! the translation of the frontend's (QEMU's) virtual addresses to guest-physical ones.
//!
//! Invariant: every region is validated before it is mapped — non-empty, no address overflow,
//! inside its file (a mapping past the end of a memfd would SIGBUS on access) — and regions do
//! not overlap in guest-physical or frontend-virtual space. All later guest accesses go through
//! `vm-memory`, which bounds-checks every address against these regions.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vhost_user::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Most regions one table may carry (QEMU sends at most 8 without CONFIGURE_MEM_SLOTS).
pub const MAX_REGIONS: usize = 8;

/// One mapped region's addresses, for frontend-VA → GPA translation.
#[derive(Debug, Clone, Copy)]
struct RegionAddrs {
    gpa: u64,
    size: u64,
    uva: u64,
}

/// The mapped guest memory of a session. Cheap to share: workers hold an `Arc`.
#[derive(Debug)]
pub struct GuestMem {
    /// Bounds-checked access by guest-physical address.
    pub mem: GuestMemoryMmap<()>,
    regions: Vec<RegionAddrs>,
}

impl GuestMem {
    /// Validates and maps a SET_MEM_TABLE. Errors say which region is bad and why.
    pub fn map(regions: &[VhostUserMemoryRegion], files: Vec<File>) -> Result<Arc<Self>, String> {
        if regions.is_empty() || regions.len() > MAX_REGIONS {
            return Err(format!(
                "{} memory regions (1..={MAX_REGIONS})",
                regions.len()
            ));
        }
        if regions.len() != files.len() {
            return Err(format!("{} regions but {} fds", regions.len(), files.len()));
        }
        let mut addrs: Vec<RegionAddrs> = Vec::with_capacity(regions.len());
        let mut mapped = Vec::with_capacity(regions.len());
        for (i, (r, file)) in regions.iter().zip(files).enumerate() {
            let a = validate_region(i, r, &file)?;
            for (j, o) in addrs.iter().enumerate() {
                if overlaps(a.gpa, a.size, o.gpa, o.size) || overlaps(a.uva, a.size, o.uva, o.size)
                {
                    return Err(format!("region {i} overlaps region {j}"));
                }
            }
            let size = usize::try_from(r.memory_size).map_err(|_| format!("region {i}: size"))?;
            let mmap = MmapRegion::from_file(FileOffset::new(file, r.mmap_offset), size)
                .map_err(|e| format!("region {i}: mmap: {e}"))?;
            let region = GuestRegionMmap::new(mmap, GuestAddress(r.guest_phys_addr))
                .ok_or_else(|| format!("region {i}: guest address overflow"))?;
            mapped.push(region);
            addrs.push(a);
        }
        let mem =
            GuestMemoryMmap::from_regions(mapped).map_err(|e| format!("memory table: {e}"))?;
        Ok(Arc::new(GuestMem {
            mem,
            regions: addrs,
        }))
    }

    /// Translates a frontend virtual address range (SET_VRING_ADDR) to a guest-physical
    /// address; `None` if the range is not wholly inside one region.
    pub fn va_to_gpa(&self, va: u64, len: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = va.checked_sub(r.uva)?;
            (off.checked_add(len)? <= r.size).then(|| r.gpa + off)
        })
    }
}

fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

fn validate_region(
    i: usize,
    r: &VhostUserMemoryRegion,
    file: &File,
) -> Result<RegionAddrs, String> {
    if r.memory_size == 0 {
        return Err(format!("region {i}: size 0"));
    }
    if r.guest_phys_addr.checked_add(r.memory_size).is_none()
        || r.user_addr.checked_add(r.memory_size).is_none()
    {
        return Err(format!("region {i}: address + size overflows"));
    }
    let (mmap_offset, memory_size) = (r.mmap_offset, r.memory_size);
    let end = r
        .mmap_offset
        .checked_add(r.memory_size)
        .ok_or_else(|| format!("region {i}: mmap_offset + size overflows"))?;
    // SAFETY: fstat writes into the zeroed stat buffer we own; the fd is valid (owned File).
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(file.as_raw_fd(), &mut st) != 0 {
            return Err(format!(
                "region {i}: fstat: {}",
                std::io::Error::last_os_error()
            ));
        }
        st
    };
    let file_size = u64::try_from(st.st_size).unwrap_or(0);
    if (st.st_mode & libc::S_IFMT) == libc::S_IFREG && end > file_size {
        return Err(format!(
            "region {i}: offset {} + size {} is past the end of its file ({file_size} bytes)",
            mmap_offset, memory_size
        ));
    }
    Ok(RegionAddrs {
        gpa: r.guest_phys_addr,
        size: r.memory_size,
        uva: r.user_addr,
    })
}
