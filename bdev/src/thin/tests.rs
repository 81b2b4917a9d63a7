//! Unit tests of the thin module's codecs.

use super::pool::{decode_labels, encode_labels, Label, LabelTable, LABEL_REGION};

#[test]
fn label_table_round_trip_and_damage() {
    let mut t = LabelTable {
        pool_uuid: "u".into(),
        ..LabelTable::default()
    };
    t.thins.insert(
        7,
        Label {
            name: "a".into(),
            uuid: "b".into(),
            num_blocks: 3,
            block_size: 4096,
        },
    );
    let enc = encode_labels(&t).unwrap();
    assert_eq!(decode_labels(&enc).unwrap(), t);
    for cut in [0, 7, 15, 17] {
        assert!(decode_labels(&enc[..cut]).is_err(), "truncated at {cut}");
    }
    let mut bad = enc.clone();
    bad[20] ^= 1;
    assert!(decode_labels(&bad).unwrap_err().contains("checksum"));
    let mut bad = enc.clone();
    bad[0] ^= 1;
    assert!(decode_labels(&bad).unwrap_err().contains("magic"));
    let mut bad = enc;
    bad[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(decode_labels(&bad).is_err());
    let big = LabelTable {
        pool_uuid: "x".repeat(LABEL_REGION),
        ..LabelTable::default()
    };
    assert!(encode_labels(&big).is_err());
}
