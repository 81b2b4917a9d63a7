//! Guest memory of one vhost-user session: the regions of SET_MEM_TABLE (or of ADD_MEM_REG /
//! REM_MEM_REG with CONFIGURE_MEM_SLOTS) mapped MAP_SHARED, and the translation of the
//! frontend's (QEMU's) virtual addresses to guest-physical ones.
//!
//! Invariant: every region is validated before it is mapped — non-empty, no address overflow,
//! inside its file (a mapping past the end of a memfd would SIGBUS on access) — and regions do
//! not overlap in guest-physical or frontend-virtual space. All later guest accesses go through
//! `vm-memory`, which bounds-checks every address against these regions. A table is immutable:
//! adding or removing a region builds a new one that shares the other regions' mappings, so a
//! ring still holding the old table keeps valid memory until it restarts on the new one.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vhost_user::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Most regions one SET_MEM_TABLE may carry (QEMU sends at most 8 without
/// CONFIGURE_MEM_SLOTS).
pub const MAX_REGIONS: usize = 8;

/// Most regions a table may hold when built with ADD_MEM_REG (GET_MAX_MEM_SLOTS). QEMU never
/// asks for more than its own limit of 512 and refuses a backend whose limit shrinks between
/// connections, so this is a constant.
pub const MAX_MEM_SLOTS: usize = 32;

/// One mapped region's addresses, for frontend-VA → GPA translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RegionAddrs {
    gpa: u64,
    size: u64,
    uva: u64,
}

/// A region and its mapping.
#[derive(Debug, Clone)]
struct Mapped {
    addrs: RegionAddrs,
    mmap: Arc<GuestRegionMmap<()>>,
}

/// The mapped guest memory of a session. Cheap to share: workers hold an `Arc`.
#[derive(Debug)]
pub struct GuestMem {
    /// Bounds-checked access by guest-physical address.
    pub mem: GuestMemoryMmap<()>,
    regions: Vec<Mapped>,
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
        let mut mapped: Vec<Mapped> = Vec::with_capacity(regions.len());
        for (i, (r, file)) in regions.iter().zip(files).enumerate() {
            let m = map_region(i, r, file, &mapped)?;
            mapped.push(m);
        }
        Self::build(mapped)
    }

    /// ADD_MEM_REG: a table with `r` (mapped from `file`) added to `prev`'s regions (or alone).
    /// Refused if it overlaps a region already there, lies outside its file, or the table is
    /// full.
    pub fn with_region(
        prev: Option<&GuestMem>,
        r: &VhostUserMemoryRegion,
        file: File,
    ) -> Result<Arc<Self>, String> {
        let mut regions = prev.map(|p| p.regions.clone()).unwrap_or_default();
        if regions.len() >= MAX_MEM_SLOTS {
            return Err(format!("all {MAX_MEM_SLOTS} memory slots in use"));
        }
        let m = map_region(regions.len(), r, file, &regions)?;
        regions.push(m);
        Self::build(regions)
    }

    /// REM_MEM_REG: the table without the region `r` names (same guest address, size and
    /// frontend address; its mmap offset is ignored, as the protocol says); `Ok(None)` if it
    /// was the last one. Refused if no region matches.
    pub fn without_region(&self, r: &VhostUserMemoryRegion) -> Result<Option<Arc<Self>>, String> {
        let want = RegionAddrs {
            gpa: r.guest_phys_addr,
            size: r.memory_size,
            uva: r.user_addr,
        };
        let Some(pos) = self.regions.iter().position(|m| m.addrs == want) else {
            return Err(format!(
                "no region at guest address {:#x} of {:#x} bytes (frontend address {:#x})",
                want.gpa, want.size, want.uva
            ));
        };
        let mut regions = self.regions.clone();
        regions.remove(pos);
        if regions.is_empty() {
            return Ok(None);
        }
        Self::build(regions).map(Some)
    }

    /// Regions in the table.
    pub fn nr_regions(&self) -> usize {
        self.regions.len()
    }

    fn build(mut regions: Vec<Mapped>) -> Result<Arc<Self>, String> {
        // vm-memory wants its regions in guest-address order.
        regions.sort_by_key(|m| m.addrs.gpa);
        let mem =
            GuestMemoryMmap::from_arc_regions(regions.iter().map(|m| m.mmap.clone()).collect())
                .map_err(|e| format!("memory table: {e}"))?;
        Ok(Arc::new(GuestMem { mem, regions }))
    }

    /// Translates a frontend virtual address range (SET_VRING_ADDR) to a guest-physical
    /// address; `None` if the range is not wholly inside one region.
    pub fn va_to_gpa(&self, va: u64, len: u64) -> Option<u64> {
        self.regions.iter().map(|m| &m.addrs).find_map(|r| {
            let off = va.checked_sub(r.uva)?;
            (off.checked_add(len)? <= r.size).then(|| r.gpa + off)
        })
    }
}

/// Validates region `i` against its file and the regions already in the table, then maps it.
fn map_region(
    i: usize,
    r: &VhostUserMemoryRegion,
    file: File,
    others: &[Mapped],
) -> Result<Mapped, String> {
    let a = validate_region(i, r, &file)?;
    for (j, o) in others.iter().map(|m| &m.addrs).enumerate() {
        if overlaps(a.gpa, a.size, o.gpa, o.size) || overlaps(a.uva, a.size, o.uva, o.size) {
            return Err(format!("region {i} overlaps region {j}"));
        }
    }
    let size = usize::try_from(r.memory_size).map_err(|_| format!("region {i}: size"))?;
    let mmap = MmapRegion::from_file(FileOffset::new(file, r.mmap_offset), size)
        .map_err(|e| format!("region {i}: mmap: {e}"))?;
    let region = GuestRegionMmap::new(mmap, GuestAddress(r.guest_phys_addr))
        .ok_or_else(|| format!("region {i}: guest address overflow"))?;
    Ok(Mapped {
        addrs: a,
        mmap: Arc::new(region),
    })
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
    // SAFETY: sysconf has no memory effects; it returns -1 only for unknown names.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    if mmap_offset % page != 0 {
        return Err(format!(
            "region {i}: mmap_offset {mmap_offset:#x} is not a multiple of the page size"
        ));
    }
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

#[cfg(test)]
mod tests;
