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

fn host_lim(hdgst: bool, ddgst: bool) -> HostRecvLimits {
    HostRecvLimits {
        ic_done: true,
        hdgst,
        ddgst,
        max_c2h_data: 1 << 20,
    }
}

#[test]
fn host_encoders_decode_on_the_target_side() {
    let ic = ic_req(3);
    let mut l = lim(false, false);
    l.ic_done = false;
    assert_eq!(
        decode(&ic, &l),
        Ok(HostPdu::IcReq {
            pfv: 0,
            hpda: 0,
            dgst: 3,
            maxr2t: 0
        })
    );
    let mut sqe = [0u8; 64];
    sqe[0] = 1;
    sqe[2] = 9;
    let mut out = Vec::new();
    push_capsule_cmd(&mut out, &sqe, &[5; 40], true, true);
    match decode(&out, &lim(true, true)) {
        Ok(HostPdu::CapsuleCmd {
            sqe: s,
            data,
            ddgst_ok,
        }) => {
            assert_eq!((s.0, data, ddgst_ok), (sqe, &[5u8; 40][..], true));
        }
        other => panic!("{other:?}"),
    }
    out.clear();
    let f = H2cFlags {
        last: true,
        hdgst: true,
        ddgst: true,
    };
    push_h2c_data(&mut out, 7, 3, 4096, &[1; 512], f);
    match decode(&out, &lim(true, true)) {
        Ok(HostPdu::H2CData {
            cccid,
            ttag,
            datao,
            last,
            data,
            ddgst_ok,
        }) => {
            assert_eq!(
                (cccid, ttag, datao, last, data.len(), ddgst_ok),
                (7, 3, 4096, true, 512, true)
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn target_encoders_decode_on_the_host_side() {
    let r = ic_resp(1, 65536);
    let mut l = host_lim(false, false);
    l.ic_done = false;
    assert_eq!(
        decode_ctrlr(&r, &l),
        Ok(CtrlrPdu::IcResp {
            pfv: 0,
            cpda: 0,
            dgst: 1,
            maxh2cdata: 65536
        })
    );
    assert_eq!(
        decode_ctrlr(&r, &host_lim(false, false)),
        Err(Fatal::status(fes::SEQUENCE))
    );
    for (hd, dd) in [(false, false), (true, false), (false, true), (true, true)] {
        let l = host_lim(hd, dd);
        let cqe = Cqe {
            dw0: 1,
            dw1: 2,
            sqhd: 3,
            sqid: 4,
            cid: 5,
            status: 0x4002,
        };
        let mut out = Vec::new();
        push_capsule_resp(&mut out, &cqe.encode(), hd);
        assert_eq!(decode_ctrlr(&out, &l), Ok(CtrlrPdu::CapsuleResp { cqe }));
        out.clear();
        push_r2t(&mut out, 5, 6, 0, 8192, hd);
        assert_eq!(
            decode_ctrlr(&out, &l),
            Ok(CtrlrPdu::R2T {
                cccid: 5,
                ttag: 6,
                r2to: 0,
                r2tl: 8192
            })
        );
        out.clear();
        let f = C2hFlags {
            last: true,
            success: false,
            hdgst: hd,
            ddgst: dd,
        };
        push_c2h_data(&mut out, 5, 512, &[9; 100], f);
        assert_eq!(
            decode_ctrlr(&out, &l),
            Ok(CtrlrPdu::C2HData {
                cccid: 5,
                datao: 512,
                last: true,
                success: false,
                data: &[9; 100],
                ddgst_ok: true
            })
        );
        if dd {
            let n = out.len();
            out[n - 10] ^= 1;
            assert!(matches!(
                decode_ctrlr(&out, &l),
                Ok(CtrlrPdu::C2HData {
                    ddgst_ok: false,
                    ..
                })
            ));
        }
        if hd {
            out[12] ^= 1;
            assert_eq!(decode_ctrlr(&out, &l), Err(Fatal::status(fes::HDGST)));
        }
    }
    let mut out = Vec::new();
    push_term_req(&mut out, Fatal::field(2), &[1; 30]);
    assert_eq!(
        decode_ctrlr(&out, &host_lim(true, true)),
        Ok(CtrlrPdu::TermReq { fes: 1, fei: 2 })
    );
}

#[test]
fn host_rejects_wrong_pdus() {
    let l = host_lim(false, false);
    // A host PDU type from the controller.
    let mut out = Vec::new();
    push_capsule_cmd(&mut out, &[0; 64], &[], false, false);
    assert_eq!(decode_ctrlr(&out, &l), Err(Fatal::field(0)));
    // SUCCESS without LAST_PDU.
    out.clear();
    push_c2h_data(
        &mut out,
        1,
        0,
        &[1; 8],
        C2hFlags {
            last: true,
            success: false,
            hdgst: false,
            ddgst: false,
        },
    );
    out[1] = FLAG_SUCCESS;
    assert_eq!(decode_ctrlr(&out, &l), Err(Fatal::field(1)));
    // More data than the host ever asked for.
    out.clear();
    push_c2h_data(
        &mut out,
        1,
        0,
        &[1; 64],
        C2hFlags {
            last: true,
            success: false,
            hdgst: false,
            ddgst: false,
        },
    );
    let small = HostRecvLimits {
        max_c2h_data: 32,
        ..l
    };
    assert_eq!(
        decode_ctrlr(&out, &small),
        Err(Fatal::status(fes::LIMIT_EXCEEDED))
    );
    // Missing header digest when negotiated.
    out.clear();
    push_r2t(&mut out, 1, 1, 0, 4096, false);
    assert_eq!(
        decode_ctrlr(&out, &host_lim(true, false)),
        Err(Fatal::field(1))
    );
}

proptest! {
    #[test]
    fn host_decoder_never_panics_on_garbage(
        bytes in prop::collection::vec(any::<u8>(), 0..400), ic: bool, hd: bool, dd: bool,
        max in 0u32..512,
    ) {
        let l = HostRecvLimits { ic_done: ic, hdgst: hd, ddgst: dd, max_c2h_data: max };
        if let Some(ch) = Ch::parse(&bytes) {
            if let Ok(plen) = check_ctrlr_header(&ch, &l) {
                prop_assert!(plen <= 152 || plen <= 24 + 8 + max as usize);
                if plen <= bytes.len() {
                    let _ = decode_ctrlr(&bytes[..plen], &l);
                }
            }
        }
        let _ = decode_ctrlr(&bytes, &l);
    }

    #[test]
    fn host_decoder_detects_corruption(
        data in prop::collection::vec(any::<u8>(), 1..300),
        flip in 0usize..400, bit in 0u8..8, cut in 0usize..400,
    ) {
        let l = host_lim(true, true);
        let mut pdu = Vec::new();
        push_c2h_data(&mut pdu, 3, 0, &data, C2hFlags { last: true, success: false, hdgst: true, ddgst: true });
        let cut = cut.min(pdu.len());
        if cut < pdu.len() {
            prop_assert!(decode_ctrlr(&pdu[..cut], &l).is_err());
        }
        let i = flip % pdu.len();
        pdu[i] ^= 1 << bit;
        match decode_ctrlr(&pdu, &l) {
            Ok(CtrlrPdu::C2HData { ddgst_ok, .. }) => prop_assert!(i >= 28 && !ddgst_ok, "flip at {} undetected", i),
            // TermReq carries no digest: a flipped type byte may turn into one.
            Ok(CtrlrPdu::TermReq { .. }) => prop_assert_eq!(i, 0),
            Ok(other) => prop_assert!(false, "{:?}", other),
            Err(_) => {}
        }
    }
}
