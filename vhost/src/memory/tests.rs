//! Memory tables built whole (SET_MEM_TABLE) and region by region (ADD/REM_MEM_REG): address
//! translation, sharing of mappings, and every refusal.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::{Bytes, GuestAddress};

use super::*;

const MIB: u64 = 1 << 20;

fn file(len: u64) -> File {
    let f = tempfile::tempfile().expect("temp file");
    f.set_len(len).expect("size");
    f
}

fn region(gpa: u64, size: u64, uva: u64, off: u64) -> VhostUserMemoryRegion {
    VhostUserMemoryRegion::new(gpa, size, uva, off)
}

#[test]
fn regions_added_one_by_one_translate_and_read() {
    let a = file(2 * MIB);
    let b = file(2 * MIB);
    a.write_all_at(b"in-a", 0x100).unwrap();
    b.write_all_at(b"in-b", MIB + 0x200).unwrap();
    let m1 = GuestMem::with_region(None, &region(0, MIB, 0x7000_0000, 0), a).unwrap();
    // B maps the second MiB of its file at GPA 16 MiB.
    let m2 = GuestMem::with_region(Some(&m1), &region(16 * MIB, MIB, 0x9000_0000, MIB), b).unwrap();
    assert_eq!((m1.nr_regions(), m2.nr_regions()), (1, 2));
    let mut buf = [0u8; 4];
    m2.mem.read_slice(&mut buf, GuestAddress(0x100)).unwrap();
    assert_eq!(&buf, b"in-a");
    m2.mem
        .read_slice(&mut buf, GuestAddress(16 * MIB + 0x200))
        .unwrap();
    assert_eq!(&buf, b"in-b");
    assert_eq!(m2.va_to_gpa(0x9000_0000 + 0x10, 16), Some(16 * MIB + 0x10));
    assert_eq!(
        m2.va_to_gpa(0x7000_0000 + MIB - 8, 16),
        None,
        "straddles A's end"
    );
    // The older table is untouched (a ring may still hold it).
    assert!(m1.mem.read_slice(&mut buf, GuestAddress(16 * MIB)).is_err());
    assert_eq!(m1.va_to_gpa(0x9000_0000, 1), None);

    // Removing needs the exact region; the table then reads as before B came.
    let wrong = region(16 * MIB, 4096, 0x9000_0000, MIB);
    assert!(m2.without_region(&wrong).is_err());
    let m3 = m2
        .without_region(&region(16 * MIB, MIB, 0x9000_0000, 0))
        .unwrap()
        .expect("A is left");
    assert_eq!(m3.nr_regions(), 1);
    assert!(m3.mem.read_slice(&mut buf, GuestAddress(16 * MIB)).is_err());
    m3.mem.read_slice(&mut buf, GuestAddress(0x100)).unwrap();
    assert_eq!(&buf, b"in-a", "A's mapping shared, still valid");
    let gone = m3.without_region(&region(0, MIB, 0x7000_0000, 0)).unwrap();
    assert!(gone.is_none(), "no regions left");
}

#[test]
fn bad_regions_are_refused() {
    let base = GuestMem::with_region(None, &region(0, MIB, 0x7000_0000, 0), file(MIB)).unwrap();
    let cases = [
        (region(0x1000, 4096, 0x8000_0000, 0), "overlaps region 0"),
        (region(8 * MIB, 4096, 0x7000_1000, 0), "overlaps region 0"),
        (region(8 * MIB, 0, 0x8000_0000, 0), "size 0"),
        (region(8 * MIB, 4096, 0x8000_0000, MIB), "past the end"),
        (region(8 * MIB, 2 * MIB, 0x8000_0000, 0), "past the end"),
        (region(8 * MIB, 4096, 0x8000_0000, 100), "page size"),
        (region(u64::MAX - 4095, 8192, 0x8000_0000, 0), "overflows"),
        (region(8 * MIB, 8192, u64::MAX - 4095, 0), "overflows"),
        (
            region(8 * MIB, 4096, 0x8000_0000, u64::MAX - 4095),
            "overflows",
        ),
    ];
    for (r, why) in cases {
        let e = GuestMem::with_region(Some(&base), &r, file(MIB)).unwrap_err();
        assert!(e.contains(why), "{e:?} should say {why:?}");
    }
    // A whole table: the same checks, at most MAX_REGIONS, one fd per region.
    let e = GuestMem::map(&[], Vec::new()).unwrap_err();
    assert!(e.contains("0 memory regions"), "{e}");
    let r = region(0, MIB, 0x7000_0000, 0);
    let e = GuestMem::map(&[r, r], vec![file(MIB), file(MIB)]).unwrap_err();
    assert!(e.contains("overlaps"), "{e}");
    let e = GuestMem::map(&[r], Vec::new()).unwrap_err();
    assert!(e.contains("1 regions but 0 fds"), "{e}");
    let many: Vec<_> = (0..=MAX_REGIONS as u64)
        .map(|i| region(i * MIB, 4096, 0x7000_0000 + i * MIB, 0))
        .collect();
    let files = many.iter().map(|_| file(MIB)).collect();
    assert!(
        GuestMem::map(&many, files).is_err(),
        "more than MAX_REGIONS"
    );
}

#[test]
fn slots_are_bounded() {
    let f = file(MIB);
    let mut mem: Option<Arc<GuestMem>> = None;
    for i in 0..MAX_MEM_SLOTS as u64 {
        let r = region(i * 4096, 4096, 0x7000_0000 + i * 4096, i * 4096);
        mem = Some(GuestMem::with_region(mem.as_deref(), &r, f.try_clone().unwrap()).unwrap());
    }
    let full = mem.expect("table");
    assert_eq!(full.nr_regions(), MAX_MEM_SLOTS);
    let r = region(MIB, 4096, 0x8000_0000, 0);
    let e = GuestMem::with_region(Some(&full), &r, f).unwrap_err();
    assert!(e.contains("slots"), "{e}");
}
