use proptest::prelude::*;

use super::*;

#[test]
fn stamp_then_check_passes() {
    let mut buf = vec![0u8; 4 * 512];
    stamp(&mut buf, 512, 100, 0xabc);
    check(&buf, 512, 100, 0xabc).unwrap();
    assert_eq!(u64::from_le_bytes(buf[512..520].try_into().unwrap()), 101);
}

#[test]
fn wrong_seed_is_a_stale_write() {
    let mut buf = vec![0u8; 2 * 4096];
    stamp(&mut buf, 4096, 7, 1);
    let m = check(&buf, 4096, 7, 2).unwrap_err();
    assert_eq!(m.lba, 7);
    assert_eq!(m.byte_in_block, 8);
    assert_eq!((m.found_lba, m.found_seed, m.expected_seed), (7, 1, 2));
    let text = m.to_string();
    assert!(
        text.contains("LBA 7") && text.contains("byte offset 28672"),
        "{text}"
    );
    assert!(text.contains("stale"), "{text}");
}

#[test]
fn a_flipped_byte_is_found_at_its_place() {
    let mut buf = vec![0u8; 8 * 512];
    stamp(&mut buf, 512, 0, 9);
    buf[3 * 512 + 100] ^= 0x40;
    let m = check(&buf, 512, 0, 9).unwrap_err();
    assert_eq!((m.lba, m.byte_in_block), (3, 100));
}

#[test]
fn misdirected_and_missing_data_are_named() {
    let mut buf = vec![0u8; 512];
    stamp(&mut buf, 512, 5, 9);
    let m = check(&buf, 512, 6, 9).unwrap_err();
    assert!(m.to_string().contains("another block"), "{m}");
    poison(&mut buf, 512, 6);
    let m = check(&buf, 512, 6, 9).unwrap_err();
    assert!(m.to_string().contains("no data"), "{m}");
}

#[test]
fn zero_filled_buffer_fails() {
    let buf = vec![0u8; 4096];
    assert!(check(&buf, 4096, 0, 0).is_err());
}

proptest! {
    #[test]
    fn any_single_corruption_is_detected(
        lba in 0u64..1 << 40,
        seed: u64,
        nr_blocks in 1usize..8,
        pos in 0usize..8 * 512,
        flip in 1u8..=255,
    ) {
        let mut buf = vec![0u8; nr_blocks * 512];
        stamp(&mut buf, 512, lba, seed);
        prop_assert!(check(&buf, 512, lba, seed).is_ok());
        let pos = pos % buf.len();
        buf[pos] ^= flip;
        let m = check(&buf, 512, lba, seed).unwrap_err();
        prop_assert_eq!(m.lba, lba + (pos / 512) as u64);
        prop_assert_eq!(m.byte_in_block, pos % 512);
    }
}
