//! Chain walking, request decoding and the config space against guest memory we build.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const TABLE: u64 = 0x1000;

fn mem() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

fn desc(m: &GuestMemoryMmap<()>, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let mut b = Vec::new();
    b.extend_from_slice(&addr.to_le_bytes());
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&next.to_le_bytes());
    m.write_slice(&b, GuestAddress(table + u64::from(i) * 16))
        .unwrap();
}

fn limits() -> Limits {
    Limits {
        block_size: 4096,
        capacity_bytes: 1 << 20,
        readonly: false,
        flush: true,
        discard: true,
        write_zeroes: true,
    }
}

fn header(m: &GuestMemoryMmap<()>, at: u64, t: u32, sector: u64) {
    let mut b = Vec::new();
    b.extend_from_slice(&t.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&sector.to_le_bytes());
    m.write_slice(&b, GuestAddress(at)).unwrap();
}

#[test]
fn walks_direct_and_indirect_chains() {
    let m = mem();
    desc(&m, TABLE, 3, 0x8000, 16, 1, 7);
    desc(&m, TABLE, 7, 0x9000, 4096, 1 | 2, 2);
    desc(&m, TABLE, 2, 0xa000, 1, 2, 0);
    let c = walk_chain(&m, TABLE, 16, 3).unwrap();
    assert_eq!(
        c.readable,
        vec![Segment {
            gpa: 0x8000,
            len: 16
        }]
    );
    assert_eq!(c.writable.len(), 2);
    assert_eq!(total_len(&c.writable), 4097);

    // Head 5 points at an indirect table of three descriptors.
    let ind = 0x2000;
    desc(&m, TABLE, 5, ind, 48, 4, 0);
    desc(&m, ind, 0, 0x8000, 16, 1, 1);
    desc(&m, ind, 1, 0x9000, 512, 1, 2);
    desc(&m, ind, 2, 0xa000, 1, 2, 0);
    let c = walk_chain(&m, TABLE, 16, 5).unwrap();
    assert_eq!(total_len(&c.readable), 528);
    assert_eq!(
        c.writable,
        vec![Segment {
            gpa: 0xa000,
            len: 1
        }]
    );
}

#[test]
fn rejects_malformed_chains() {
    let m = mem();
    // Loop 0 -> 1 -> 0.
    desc(&m, TABLE, 0, 0x8000, 16, 1, 1);
    desc(&m, TABLE, 1, 0x8000, 16, 1, 0);
    assert_eq!(
        walk_chain(&m, TABLE, 16, 0).unwrap_err(),
        ChainError::TooLong
    );
    // Next index beyond the ring.
    desc(&m, TABLE, 1, 0x8000, 16, 1, 40);
    assert_eq!(
        walk_chain(&m, TABLE, 16, 0).unwrap_err(),
        ChainError::IndexOutOfRange(40)
    );
    assert_eq!(
        walk_chain(&m, TABLE, 16, 16).unwrap_err(),
        ChainError::IndexOutOfRange(16)
    );
    // Buffer crossing the end of memory.
    desc(&m, TABLE, 2, 0x10_0000 - 8, 16, 0, 0);
    assert!(matches!(
        walk_chain(&m, TABLE, 16, 2),
        Err(ChainError::BufferOutsideMemory { .. })
    ));
    // Table outside memory.
    assert!(matches!(
        walk_chain(&m, 0x20_0000, 16, 0),
        Err(ChainError::TableOutsideMemory(_))
    ));
    // Indirect with NEXT, nested indirect, bad length, readable after writable.
    desc(&m, TABLE, 3, 0x2000, 48, 4 | 1, 4);
    assert_eq!(
        walk_chain(&m, TABLE, 16, 3).unwrap_err(),
        ChainError::BadIndirect
    );
    desc(&m, TABLE, 3, 0x2000, 20, 4, 0);
    assert_eq!(
        walk_chain(&m, TABLE, 16, 3).unwrap_err(),
        ChainError::BadIndirect
    );
    desc(&m, TABLE, 3, 0x2000, 32, 4, 0);
    desc(&m, 0x2000, 0, 0x3000, 32, 4, 0);
    assert_eq!(
        walk_chain(&m, TABLE, 16, 3).unwrap_err(),
        ChainError::BadIndirect
    );
    desc(&m, TABLE, 4, 0x8000, 1, 2 | 1, 5);
    desc(&m, TABLE, 5, 0x8000, 16, 0, 0);
    assert_eq!(
        walk_chain(&m, TABLE, 16, 4).unwrap_err(),
        ChainError::BadOrder
    );
    // An indirect table with a loop inside it.
    desc(&m, TABLE, 6, 0x2000, 32, 4, 0);
    desc(&m, 0x2000, 0, 0x8000, 16, 1, 1);
    desc(&m, 0x2000, 1, 0x8000, 16, 1, 0);
    assert_eq!(
        walk_chain(&m, TABLE, 16, 6).unwrap_err(),
        ChainError::TooLong
    );
}

#[test]
fn decodes_requests_and_rejects_bad_ones() {
    let m = mem();
    let chain = |data: Option<(u32, bool)>| {
        let mut c = Chain::default();
        c.readable.push(Segment {
            gpa: 0x8000,
            len: 16,
        });
        match data {
            Some((len, true)) => c.writable.push(Segment { gpa: 0x9000, len }),
            Some((len, false)) => c.readable.push(Segment { gpa: 0x9000, len }),
            None => {}
        }
        c.writable.push(Segment {
            gpa: 0xa000,
            len: 1,
        });
        c
    };
    let l = limits();
    header(&m, 0x8000, virtio_blk::VIRTIO_BLK_T_IN, 16);
    assert_eq!(
        decode(&m, &chain(Some((8192, true))), &l),
        Ok(BlkOp::Read {
            offset: 8192,
            len: 8192
        })
    );
    header(
        &m,
        0x8000,
        virtio_blk::VIRTIO_BLK_T_OUT | virtio_blk::VIRTIO_BLK_T_BARRIER,
        8,
    );
    assert_eq!(
        decode(&m, &chain(Some((4096, false))), &l),
        Ok(BlkOp::Write {
            offset: 4096,
            len: 4096
        })
    );
    let ro = Limits {
        readonly: true,
        ..l
    };
    assert_eq!(
        decode(&m, &chain(Some((4096, false))), &ro),
        Err(Reject::IoErr)
    );
    // Past the end, misaligned sector, length not a block multiple, overflow.
    header(&m, 0x8000, virtio_blk::VIRTIO_BLK_T_IN, 2048);
    assert_eq!(
        decode(&m, &chain(Some((4096, true))), &l),
        Err(Reject::IoErr)
    );
    header(&m, 0x8000, virtio_blk::VIRTIO_BLK_T_IN, 1);
    assert_eq!(
        decode(&m, &chain(Some((4096, true))), &l),
        Err(Reject::IoErr)
    );
    header(&m, 0x8000, virtio_blk::VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        decode(&m, &chain(Some((512, true))), &l),
        Err(Reject::IoErr)
    );
    header(&m, 0x8000, virtio_blk::VIRTIO_BLK_T_IN, u64::MAX / 256);
    assert_eq!(
        decode(&m, &chain(Some((4096, true))), &l),
        Err(Reject::IoErr)
    );
    // Flush: sector must be 0.
    header(&m, 0x8000, virtio_blk::VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(decode(&m, &chain(None), &l), Ok(BlkOp::Flush));
    header(&m, 0x8000, virtio_blk::VIRTIO_BLK_T_FLUSH, 8);
    assert_eq!(decode(&m, &chain(None), &l), Err(Reject::IoErr));
    // Discard / write zeroes: one 16-byte segment, flags checked.
    let seg = |s: u64, n: u32, f: u32| {
        let mut b = Vec::new();
        b.extend_from_slice(&s.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&f.to_le_bytes());
        m.write_slice(&b, GuestAddress(0x9000)).unwrap();
    };
    header(&m, 0x8000, virtio_blk::VIRTIO_BLK_T_DISCARD, 0);
    seg(8, 16, 0);
    assert_eq!(
        decode(&m, &chain(Some((16, false))), &l),
        Ok(BlkOp::Discard {
            offset: 4096,
            len: 8192
        })
    );
    seg(8, 16, 1);
    assert_eq!(
        decode(&m, &chain(Some((16, false))), &l),
        Err(Reject::Unsupp)
    );
    seg(8, 16, 0);
    assert_eq!(
        decode(&m, &chain(Some((32, false))), &l),
        Err(Reject::IoErr),
        "2 segments"
    );
    seg(8, MAX_DWZ_SECTORS + 8, 0);
    assert_eq!(
        decode(&m, &chain(Some((16, false))), &l),
        Err(Reject::IoErr)
    );
    header(&m, 0x8000, virtio_blk::VIRTIO_BLK_T_WRITE_ZEROES, 0);
    seg(0, 8, 1);
    assert_eq!(
        decode(&m, &chain(Some((16, false))), &l),
        Ok(BlkOp::WriteZeroes {
            offset: 0,
            len: 4096
        })
    );
    let no_wz = Limits {
        write_zeroes: false,
        ..l
    };
    assert_eq!(
        decode(&m, &chain(Some((16, false))), &no_wz),
        Err(Reject::Unsupp)
    );
    header(&m, 0x8000, 2, 0);
    assert_eq!(
        decode(&m, &chain(None), &l),
        Err(Reject::Unsupp),
        "SCSI_CMD"
    );
    header(&m, 0x8000, virtio_blk::VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(decode(&m, &chain(Some((20, true))), &l), Ok(BlkOp::GetId));
}

#[test]
fn gather_and_scatter_cross_segments() {
    let m = mem();
    let segs = [
        Segment {
            gpa: 0x8000,
            len: 10,
        },
        Segment {
            gpa: 0x9000,
            len: 3,
        },
        Segment {
            gpa: 0xa000,
            len: 100,
        },
    ];
    let data: Vec<u8> = (0..100u8).collect();
    assert!(scatter(&m, &segs, 5, &data));
    let mut back = vec![0u8; 100];
    assert!(gather(&m, &segs, 5, &mut back));
    assert_eq!(back, data);
    let mut too_much = vec![0u8; 200];
    assert!(
        !gather(&m, &segs, 0, &mut too_much),
        "short chain is an error"
    );
}

#[test]
fn config_space_layout() {
    let c = config_space(&BlkGeometry {
        block_size: 4096,
        num_blocks: 1000,
        opt_io_blocks: 16,
        num_queues: 4,
    });
    assert_eq!(c.len(), 60);
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 8000);
    assert_eq!(u32::from_le_bytes(c[8..12].try_into().unwrap()), SIZE_MAX);
    assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), SEG_MAX);
    assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
    assert_eq!(u32::from_le_bytes(c[28..32].try_into().unwrap()), 16);
    assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
    assert_eq!(
        u32::from_le_bytes(c[44..48].try_into().unwrap()),
        8,
        "discard alignment"
    );
}
