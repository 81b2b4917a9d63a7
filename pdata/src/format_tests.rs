//! Round-trip property tests and garbage/truncated-input tests for every on-disk codec.

use proptest::prelude::*;

use crate::block_io::BLOCK_SIZE;
use crate::btree::node::{max_entries_for, Node, NodeHeader, BTREE_VALIDATOR};
use crate::codec::{pack_into, unpack_from, Pack, Unpack};
use crate::error::ErrorKind;
use crate::space_map::format::*;
use crate::thin::block_time::BlockTime;
use crate::thin::device_details::DeviceDetails;
use crate::thin::superblock::{Superblock, SUPERBLOCK_MAGIC, SUPERBLOCK_VALIDATOR};
use crate::validator::{Validator, BITMAP_VALIDATOR, INDEX_VALIDATOR};

fn round_trip<T: Pack + Unpack + PartialEq + std::fmt::Debug>(v: &T) {
    let mut buf = vec![0u8; <T as Pack>::DISK_SIZE];
    pack_into(v, &mut buf).unwrap();
    assert_eq!(&unpack_from::<T>(&buf).unwrap(), v);
    for short in 0..<T as Pack>::DISK_SIZE {
        assert_eq!(
            unpack_from::<T>(&buf[..short]).unwrap_err().kind(),
            ErrorKind::Truncated
        );
        let mut small = vec![0u8; short];
        assert!(pack_into(v, &mut small).is_err());
    }
}

fn arb_sm_root() -> impl Strategy<Value = SmRoot> {
    (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c, d)| SmRoot {
        nr_blocks: a,
        nr_allocated: b,
        bitmap_root: c,
        ref_count_root: d,
    })
}

proptest! {
    #[test]
    fn index_entry_round_trip(b in any::<u64>(), f in any::<u32>(), n in any::<u32>()) {
        round_trip(&IndexEntry { blocknr: b, nr_free: f, none_free_before: n });
    }

    #[test]
    fn sm_root_round_trip(r in arb_sm_root()) {
        round_trip(&r);
    }

    #[test]
    fn device_details_round_trip(a in any::<u64>(), b in any::<u64>(), c in any::<u32>(), d in any::<u32>()) {
        round_trip(&DeviceDetails { mapped_blocks: a, transaction_id: b, creation_time: c, snapshotted_time: d });
    }

    #[test]
    fn block_time_round_trip(block in 0u64..(1 << 40), time in 0u32..(1 << 24)) {
        round_trip(&BlockTime { block, time });
        let v = BlockTime { block, time }.to_u64().unwrap();
        prop_assert_eq!(v >> 24, block);
    }

    #[test]
    fn superblock_round_trip(
        flags in any::<u32>(), time in any::<u32>(), tid in any::<u64>(), held in any::<u64>(),
        d in arb_sm_root(), m in arb_sm_root(), mr in any::<u64>(), dr in any::<u64>(),
        dbs in any::<u32>(), mnb in any::<u64>(), uuid in any::<[u8; 16]>()
    ) {
        let sb = Superblock {
            flags, blocknr: 0, uuid, magic: SUPERBLOCK_MAGIC, version: 2, time, trans_id: tid,
            held_root: held, data_sm_root: d, metadata_sm_root: m, data_mapping_root: mr,
            device_details_root: dr, data_block_size: dbs, metadata_block_size: 8,
            metadata_nr_blocks: mnb, compat_flags: 0, compat_ro_flags: 0, incompat_flags: 0,
        };
        round_trip(&sb);
        let mut block = [0u8; BLOCK_SIZE];
        sb.pack_block(&mut block).unwrap();
        SUPERBLOCK_VALIDATOR.prepare_for_write(&mut block, 0);
        SUPERBLOCK_VALIDATOR.check(&block, 0).unwrap();
        prop_assert_eq!(Superblock::unpack_block(&block).unwrap(), sb);
    }

    #[test]
    fn bitmap_set_get_model(ops in proptest::collection::vec((0u64..ENTRIES_PER_BITMAP, 0u32..4), 1..200)) {
        let mut b = [0u8; BLOCK_SIZE];
        let mut model = std::collections::BTreeMap::new();
        for (e, v) in ops {
            bitmap_set(&mut b, e, v).unwrap();
            model.insert(e, v);
        }
        for (e, v) in &model {
            prop_assert_eq!(bitmap_get(&b, *e).unwrap(), *v);
        }
        let used = model.values().filter(|v| **v != 0).count() as u64;
        prop_assert_eq!(bitmap_nr_used(&b, ENTRIES_PER_BITMAP).unwrap(), used);
        let first_free = (0..ENTRIES_PER_BITMAP).find(|e| model.get(e).copied().unwrap_or(0) == 0);
        prop_assert_eq!(bitmap_find_free(&b, 0, ENTRIES_PER_BITMAP).unwrap(), first_free);
    }

    #[test]
    fn node_round_trip(vs in prop_oneof![Just(4usize), Just(8), Just(16), Just(24)],
                       leaf in any::<bool>(), seed in any::<u64>(), n in 0usize..126) {
        let vs = if leaf { vs } else { 8 };
        let mut node = Node::new(leaf, vs);
        let mut k = seed % 1000;
        for i in 0..n.min(max_entries_for(vs)) {
            k += 1 + (seed >> (i % 60)) % 7;
            let v: Vec<u8> = (0..vs).map(|j| (i + j) as u8).collect();
            node.insert_at(i, k, &v);
        }
        let mut buf = [0u8; BLOCK_SIZE];
        node.pack(&mut buf, 77).unwrap();
        BTREE_VALIDATOR.prepare_for_write(&mut buf, 77);
        BTREE_VALIDATOR.check(&buf, 77).unwrap();
        prop_assert_eq!(Node::unpack(&buf).unwrap(), node);
    }

    #[test]
    fn garbage_blocks_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..BLOCK_SIZE)) {
        let mut b = [0u8; BLOCK_SIZE];
        b[..bytes.len()].copy_from_slice(&bytes);
        // Validators reject (almost surely) and never panic, even with a valid checksum.
        for v in [&BTREE_VALIDATOR as &dyn Validator, &SUPERBLOCK_VALIDATOR, &BITMAP_VALIDATOR, &INDEX_VALIDATOR] {
            let _ = v.check(&b, 3);
            let mut c = b;
            v.prepare_for_write(&mut c, 3);
            let _ = v.check(&c, 3);
        }
        let _ = Node::unpack(&b);
        let _ = NodeHeader::unpack(&bytes);
        let _ = unpack_from::<Superblock>(&bytes);
        let _ = unpack_index_block(&b);
    }
}

fn node_block(f: impl FnOnce(&mut Node)) -> [u8; BLOCK_SIZE] {
    let mut node = Node::new(true, 8);
    for i in 0..10u64 {
        node.insert_at(i as usize, i * 2, &i.to_le_bytes());
    }
    f(&mut node);
    let mut buf = [0u8; BLOCK_SIZE];
    node.pack(&mut buf, 5).unwrap();
    buf
}

fn check_after(buf: &mut [u8; BLOCK_SIZE], off: usize, v: u32) -> ErrorKind {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
    BTREE_VALIDATOR.prepare_for_write(buf, 5);
    BTREE_VALIDATOR.check(buf, 5).unwrap_err().kind()
}

#[test]
fn node_validation_rejects_each_broken_invariant() {
    let good = node_block(|_| {});
    let mut b = good;
    assert_eq!(check_after(&mut b, 4, 3), ErrorKind::Corrupt); // both internal and leaf
    let mut b = good;
    assert_eq!(check_after(&mut b, 4, 0), ErrorKind::Corrupt); // unknown type
    let mut b = good;
    assert_eq!(check_after(&mut b, 20, 250), ErrorKind::Corrupt); // max not /3
    let mut b = good;
    assert_eq!(check_after(&mut b, 20, 255), ErrorKind::Corrupt); // too large
    let mut b = good;
    assert_eq!(check_after(&mut b, 16, 253), ErrorKind::Corrupt); // nr > max
    let mut b = good;
    assert_eq!(check_after(&mut b, 32 + 8 * 3, 1), ErrorKind::Corrupt); // keys out of order
    let mut b = good;
    b[4] = 1; // internal with value size 16
    assert_eq!(check_after(&mut b, 24, 16), ErrorKind::Corrupt);
    let mut b = good;
    BTREE_VALIDATOR.prepare_for_write(&mut b, 5);
    assert_eq!(
        BTREE_VALIDATOR.check(&b, 6).unwrap_err().kind(),
        ErrorKind::BlockNr
    );
    b[100] ^= 0xff;
    assert_eq!(
        BTREE_VALIDATOR.check(&b, 5).unwrap_err().kind(),
        ErrorKind::Checksum
    );
}

#[test]
fn superblock_validator_rejects_bad_magic() {
    let sb = Superblock {
        magic: 1,
        ..Default::default()
    };
    let mut b = [0u8; BLOCK_SIZE];
    sb.pack_block(&mut b).unwrap();
    SUPERBLOCK_VALIDATOR.prepare_for_write(&mut b, 0);
    assert_eq!(
        SUPERBLOCK_VALIDATOR.check(&b, 0).unwrap_err().kind(),
        ErrorKind::BadMagic
    );
}

#[test]
fn bitmap_bit_order_matches_spec_bytes() {
    let mut b = [0u8; BLOCK_SIZE];
    for e in 0..4 {
        bitmap_set(&mut b, e, 1).unwrap();
    }
    assert_eq!(b[BITMAP_HEADER_SIZE], 0xAA);
    bitmap_set(&mut b, 10, 2).unwrap();
    bitmap_set(&mut b, 11, 2).unwrap();
    assert_eq!(b[BITMAP_HEADER_SIZE + 2], 0x50);
    let mut c = [0u8; BLOCK_SIZE];
    bitmap_set(&mut c, 8, 3).unwrap();
    assert_eq!(c[BITMAP_HEADER_SIZE + 2], 0x03);
    assert!(bitmap_set(&mut c, ENTRIES_PER_BITMAP, 1).is_err());
    assert!(bitmap_get(&c, ENTRIES_PER_BITMAP).is_err());
    assert!(bitmap_set(&mut c, 0, 4).is_err());
}

#[test]
fn block_time_matches_spec_example_and_rejects_wide_blocks() {
    let bt = BlockTime::from_u64(u64::from_le_bytes([1, 0, 0, 0xeb, 3, 0, 0, 0]));
    assert_eq!(
        bt,
        BlockTime {
            block: 1003,
            time: 1
        }
    );
    assert!(BlockTime {
        block: 1 << 40,
        time: 0
    }
    .to_u64()
    .is_err());
    assert_eq!(
        BlockTime {
            block: 1,
            time: 0x1ff_ffff
        }
        .to_u64()
        .unwrap(),
        (1 << 24) | 0xff_ffff
    );
}

#[test]
fn index_block_round_trip() {
    let entries: Vec<IndexEntry> = (0..255u64)
        .map(|i| IndexEntry {
            blocknr: i + 3,
            nr_free: i as u32,
            none_free_before: 7,
        })
        .collect();
    let mut b = [0u8; BLOCK_SIZE];
    pack_index_block(&entries, &mut b).unwrap();
    assert_eq!(unpack_index_block(&b).unwrap(), entries);
    let too_many = vec![IndexEntry::default(); 256];
    assert_eq!(
        pack_index_block(&too_many, &mut b).unwrap_err().kind(),
        ErrorKind::Limit
    );
}

#[test]
fn node_ref_out_of_range_indexes_are_errors() {
    let node = Node::new(true, 8);
    let mut buf = [0u8; BLOCK_SIZE];
    node.pack(&mut buf, 1).unwrap();
    let r = crate::btree::node::NodeRef::new(&buf).unwrap();
    for i in [0, 1, usize::MAX / 8 + 1, usize::MAX] {
        assert_eq!(r.key(i).unwrap_err().kind(), ErrorKind::Corrupt);
        assert_eq!(r.value(i).unwrap_err().kind(), ErrorKind::Corrupt);
    }
    assert_eq!(r.lower_bound(5).unwrap(), None);
}
