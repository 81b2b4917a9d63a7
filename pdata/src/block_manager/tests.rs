//! Block manager tests: validation on read, stamping on write, lock conflicts, bounded cache
//! with dirty write-back on eviction, non-blocking reads, flush ordering, abort.

use super::*;
use crate::block_io::MemBlockIo;
use crate::validator::{BITMAP_VALIDATOR, INDEX_VALIDATOR};

fn bm(nr: u64, cap: usize) -> (MemBlockIo, BlockManager) {
    let io = MemBlockIo::new(nr);
    (io.clone(), BlockManager::new(Box::new(io), cap))
}

#[test]
fn written_blocks_are_stamped_and_validated_on_reread() {
    let (io, mut m) = bm(16, 64);
    m.write_zero(3, &BITMAP_VALIDATOR, |b| b[100] = 7).unwrap();
    assert_eq!(m.nr_dirty(), 1);
    m.flush().unwrap();
    assert_eq!(m.nr_dirty(), 0);
    assert_eq!(io.nr_flushes(), 1);
    let mut raw = [0u8; BLOCK_SIZE];
    io.read_block(3, &mut raw).unwrap();
    BITMAP_VALIDATOR.check(&raw, 3).unwrap();
    m.invalidate_all();
    let r = m.read_lock(3, &BITMAP_VALIDATOR).unwrap();
    assert_eq!(r[100], 7);
    assert_eq!(r.loc(), 3);
}

#[test]
fn corrupt_and_misplaced_blocks_are_typed_errors_naming_the_block() {
    let (io, mut m) = bm(16, 64);
    m.write_zero(5, &BITMAP_VALIDATOR, |_| ()).unwrap();
    m.flush().unwrap();
    m.invalidate_all();
    let mut raw = [0u8; BLOCK_SIZE];
    io.read_block(5, &mut raw).unwrap();
    io.write_block(6, &raw).unwrap();
    let e = m.read_lock(6, &BITMAP_VALIDATOR).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BlockNr);
    assert!(e.context().contains("block 6"), "{e}");
    raw[2000] ^= 0x10;
    io.write_block(5, &raw).unwrap();
    let e = m.read_lock(5, &BITMAP_VALIDATOR).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Checksum);
    assert!(e.context().contains("block 5"), "{e}");
    // An all-zero block fails validation rather than being taken as valid.
    assert!(m.read_lock(9, &BITMAP_VALIDATOR).is_err());
    // Reading beyond the device is an I/O error.
    assert_eq!(
        m.read_lock(99, &BITMAP_VALIDATOR).unwrap_err().kind(),
        ErrorKind::Io
    );
}

#[test]
fn lock_conflicts_are_errors() {
    let (_io, mut m) = bm(16, 64);
    m.write_zero(2, &BITMAP_VALIDATOR, |_| ()).unwrap();
    let r = m.read_lock(2, &BITMAP_VALIDATOR).unwrap();
    assert_eq!(
        m.write(2, &BITMAP_VALIDATOR, |_| ()).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    assert!(m.write_zero(2, &BITMAP_VALIDATOR, |_| ()).is_err());
    // Same block under two block types.
    assert_eq!(
        m.read_lock(2, &INDEX_VALIDATOR).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    drop(r);
    m.write(2, &BITMAP_VALIDATOR, |b| b[50] = 1).unwrap();
    assert_eq!(m.read_lock(2, &BITMAP_VALIDATOR).unwrap()[50], 1);
}

#[test]
fn cache_is_bounded_and_evicted_dirty_blocks_are_written_back() {
    let (io, mut m) = bm(400, MIN_CACHE_BLOCKS);
    for b in 0..300u64 {
        m.write_zero(b, &BITMAP_VALIDATOR, |buf| buf[20] = b as u8)
            .unwrap();
        assert!(m.nr_cached() <= MIN_CACHE_BLOCKS);
    }
    assert!(io.nr_writes() >= 300 - MIN_CACHE_BLOCKS as u64);
    // Held read locks are never evicted (the cache may exceed its bound only by them).
    let held: Vec<ReadRef> = (0..10)
        .map(|b| m.read_lock(b, &BITMAP_VALIDATOR).unwrap())
        .collect();
    for b in 100..300u64 {
        let r = m.read_lock(b, &BITMAP_VALIDATOR).unwrap();
        assert_eq!(r[20], b as u8);
    }
    for r in &held {
        assert!(m.is_cached(r.loc()));
    }
    drop(held);
    m.flush().unwrap();
    m.invalidate_all();
    for b in 0..300u64 {
        assert_eq!(m.read_lock(b, &BITMAP_VALIDATOR).unwrap()[20], b as u8);
    }
}

#[test]
fn try_read_lock_never_does_io() {
    let (_io, mut m) = bm(16, 64);
    m.write_zero(4, &BITMAP_VALIDATOR, |_| ()).unwrap();
    m.flush().unwrap();
    assert!(m.try_read_lock(4, &BITMAP_VALIDATOR).is_ok());
    m.invalidate_all();
    let reads = m.stats().nr_reads;
    let e = m.try_read_lock(4, &BITMAP_VALIDATOR).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldBlock);
    assert_eq!(m.stats().nr_reads, reads);
}

#[test]
fn invalidate_drops_unflushed_writes() {
    let (io, mut m) = bm(16, 64);
    m.write_zero(1, &BITMAP_VALIDATOR, |b| b[30] = 9).unwrap();
    m.invalidate_all();
    assert_eq!(io.nr_writes(), 0);
    assert!(
        m.read_lock(1, &BITMAP_VALIDATOR).is_err(),
        "never written: zero block"
    );
}
