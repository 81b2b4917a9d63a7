use proptest::prelude::*;

use super::*;

fn lim(hdgst: bool, ddgst: bool) -> RecvLimits {
    RecvLimits {
        ic_done: true,
        hdgst,
        ddgst,
        max_capsule_data: 8192,
        max_h2c_data: 131072,
    }
}

fn capsule(sqe: &[u8; 64], data: &[u8], hdgst: bool, ddgst: bool) -> Vec<u8> {
    let hd = if hdgst { 4 } else { 0 };
    let dd = if ddgst && !data.is_empty() { 4 } else { 0 };
    let mut flags = 0;
    if hdgst {
        flags |= FLAG_HDGST;
    }
    if dd > 0 {
        flags |= FLAG_DDGST;
    }
    let pdo = if data.is_empty() { 0 } else { 72 + hd };
    let plen = (72 + hd + data.len() + dd) as u32;
    let mut v = vec![ty::CAPSULE_CMD, flags, 72, pdo as u8];
    v.extend_from_slice(&plen.to_le_bytes());
    v.extend_from_slice(sqe);
    if hdgst {
        let d = digest(&v[..72]);
        v.extend_from_slice(&d.to_le_bytes());
    }
    v.extend_from_slice(data);
    if dd > 0 {
        v.extend_from_slice(&digest(data).to_le_bytes());
    }
    v
}

#[test]
fn digest_is_crc32c() {
    // CRC-32C check value.
    assert_eq!(digest(b"123456789"), 0xE306_9283);
}

#[test]
fn ic_req_only_first() {
    let mut ic = [0u8; 128];
    ic[2] = 128;
    ic[4] = 128;
    let mut l = lim(false, false);
    l.ic_done = false;
    assert!(matches!(decode(&ic, &l), Ok(HostPdu::IcReq { .. })));
    l.ic_done = true;
    assert_eq!(decode(&ic, &l), Err(Fatal::status(fes::SEQUENCE)));
    let c = capsule(&[0; 64], &[], false, false);
    l.ic_done = false;
    assert_eq!(decode(&c, &l), Err(Fatal::status(fes::SEQUENCE)));
}

#[test]
fn encoders_have_consistent_headers() {
    let mut out = Vec::new();
    push_capsule_resp(&mut out, &[1; 16], true);
    assert_eq!(out.len(), 28);
    assert_eq!(Ch::parse(&out).unwrap().plen, 28);
    assert_eq!(&out[24..28], &digest(&out[..24]).to_le_bytes());
    out.clear();
    let f = C2hFlags {
        last: true,
        success: false,
        hdgst: true,
        ddgst: true,
    };
    push_c2h_data(&mut out, 5, 0, &[7; 100], f);
    let ch = Ch::parse(&out).unwrap();
    assert_eq!((ch.hlen, ch.pdo, ch.plen as usize), (24, 28, out.len()));
    assert_eq!(&out[128..132], &digest(&[7; 100]).to_le_bytes());
    out.clear();
    push_term_req(&mut out, Fatal::field(2), &[9; 200]);
    assert_eq!(Ch::parse(&out).unwrap().plen, 24 + 128);
    let r = ic_resp(3, 131072);
    assert_eq!((r[0], r[2], r[11]), (1, 128, 3));
}

proptest! {
    #[test]
    fn capsule_round_trip(sqe in prop::array::uniform32(any::<u8>()), data in prop::collection::vec(any::<u8>(), 0..600), hd: bool, dd: bool) {
        let mut full = [0u8; 64];
        full[..32].copy_from_slice(&sqe);
        full[32..].copy_from_slice(&sqe);
        let pdu = capsule(&full, &data, hd, dd);
        match decode(&pdu, &lim(hd, dd)) {
            Ok(HostPdu::CapsuleCmd { sqe, data: d, ddgst_ok }) => {
                prop_assert_eq!(sqe.0, full);
                prop_assert_eq!(d, &data[..]);
                prop_assert!(ddgst_ok);
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn truncated_or_corrupt_pdus_are_errors_not_panics(
        data in prop::collection::vec(any::<u8>(), 1..300),
        cut in 0usize..400, flip in 0usize..400, bit in 0u8..8, hd: bool, dd: bool,
    ) {
        let pdu = capsule(&[0x40; 64], &data, hd, dd);
        let cut = cut.min(pdu.len());
        let _ = decode(&pdu[..cut], &lim(hd, dd));
        if cut < pdu.len() {
            prop_assert!(decode(&pdu[..cut], &lim(hd, dd)).is_err());
        }
        let mut bad = pdu.clone();
        let i = flip % bad.len();
        bad[i] ^= 1 << bit;
        match decode(&bad, &lim(hd, dd)) {
            Ok(HostPdu::CapsuleCmd { ddgst_ok, data: d, .. }) => {
                // Only a flip in SQE bytes without a header digest, or in the data
                // without a data digest, can go unnoticed.
                if hd && i < 76 { prop_assert!(false, "header flip at {} undetected", i); }
                if dd && i >= 76 && d != &data[..] { prop_assert!(!ddgst_ok); }
            }
            Ok(_) => {}
            Err(_) => {}
        }
    }

    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300), ic: bool, hd: bool, dd: bool) {
        let mut l = lim(hd, dd);
        l.ic_done = ic;
        if let Some(ch) = Ch::parse(&bytes) {
            if let Ok(plen) = check_header(&ch, &l) {
                if plen <= bytes.len() {
                    let _ = decode(&bytes[..plen], &l);
                }
            }
        }
        let _ = decode(&bytes, &l);
    }
}
