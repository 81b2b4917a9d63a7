//! Malformed, truncated and out-of-order input on live connections: each bad connection
//! ends with a C2HTermReq (or an error status for per-command faults), the target never
//! panics, and a healthy connection opened before the abuse keeps doing I/O.

mod common;

use std::io::Read;
use std::net::Shutdown;
use std::time::Duration;

use common::*;
use proptest::prelude::*;

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:fuzz-host";
const NQN: &str = "nqn.2016-06.io.test:fuzz";
/// The bystander subsystem: abused connections never touch its bdev.
const GOOD_NQN: &str = "nqn.2016-06.io.test:fuzz-good";

fn setup() -> u16 {
    static PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *PORT.get_or_init(|| {
        let port = export(NQN, "MallocFuzz", 256, true);
        export(GOOD_NQN, "MallocFuzzGood", 256, true);
        // Both subsystems on one port: abuse and healthy traffic share the listener.
        rpc(
            "nvmf_subsystem_add_listener",
            serde_json::json!({"nqn": GOOD_NQN, "listen_address": {"trtype": "tcp",
                "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
        )
        .expect("listener");
        port
    })
}

/// An I/O queue (admin controller kept alive by the returned admin host).
fn io_queue(port: u16, dg: bool) -> (Host, Host) {
    io_queue_on(port, NQN, dg)
}

fn io_queue_on(port: u16, nqn: &str, dg: bool) -> (Host, Host) {
    let (a, cntlid) = Host::admin_init(port, nqn, HOST, 0, dg);
    let mut q = Host::connect(port, dg, dg);
    assert_eq!(q.fabrics_connect(1, 63, 0, cntlid, nqn, HOST, 0).status, 0);
    (a, q)
}

/// Write + read back on the bystander subsystem, at blocks only `seed` uses.
fn healthy_io(q: &mut Host, seed: u8) {
    let data: Vec<u8> = (0..8192).map(|i| (i as u8) ^ seed).collect();
    let lba = u64::from(seed) * 2;
    assert_eq!(q.cmd(rw(0x01, 1, lba, 2), &data, false, 0).0.status, 0);
    let (c, d) = q.cmd(rw(0x02, 1, lba, 2), &[], false, 8192);
    assert_eq!(c.status, 0);
    assert!(d == data);
}

/// Reads PDUs until EOF; returns the FES of a TermReq if one came.
fn drain(h: &mut Host) -> Option<u16> {
    h.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut fes = None;
    loop {
        let mut chb = [0u8; 8];
        if h.s.read_exact(&mut chb).is_err() {
            return fes;
        }
        let plen = u32::from_le_bytes(chb[4..8].try_into().unwrap()) as usize;
        assert!((8..=1 << 20).contains(&plen), "sane plen");
        assert!(
            [1, 3, 5, 7, 9].contains(&chb[0]),
            "controller PDU type {}",
            chb[0]
        );
        let mut rest = vec![0u8; plen - 8];
        if h.s.read_exact(&mut rest).is_err() {
            return fes;
        }
        if chb[0] == 3 {
            assert!((24..=152).contains(&plen), "TermReq plen {plen}");
            fes = Some(u16::from_le_bytes([rest[0], rest[1]]));
        }
    }
}

fn expect_term(h: &mut Host, want: u16) {
    h.s.shutdown(Shutdown::Write).ok();
    assert_eq!(drain(h), Some(want));
}

#[test]
fn protocol_violations_terminate_only_their_connection() {
    let port = setup();
    let (_a, mut good) = io_queue_on(port, GOOD_NQN, true);
    healthy_io(&mut good, 1);

    // Capsule before ICReq: sequence error.
    let mut h = Host::connect(port, false, false);
    h.s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let c = h.capsule(&sqe(0x06, 0), &[]);
    h.send(&c);
    expect_term(&mut h, 2);

    // ICReq with a wrong length.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut ic = [0u8; 128];
    ic[2] = 128;
    ic[4] = 100;
    std::io::Write::write_all(&mut s, &ic).unwrap();
    let mut h2 = Host {
        s,
        hdgst: false,
        ddgst: false,
        maxh2c: 0,
        next_cid: 1,
        h2c_chunk: usize::MAX,
    };
    expect_term(&mut h2, 1);

    // Wrong CapsuleCmd header length.
    let mut h = Host::connect(port, false, false);
    let mut c = h.capsule(&sqe(0x06, 0), &[]);
    c[2] = 70;
    h.send(&c);
    expect_term(&mut h, 1);

    // Bad header digest.
    let mut h = Host::connect(port, true, true);
    let mut c = h.capsule(&sqe(0x06, 0), &[]);
    c[72] ^= 0xFF;
    h.send(&c);
    expect_term(&mut h, 3);

    // Missing header digest flag when negotiated.
    let mut h = Host::connect(port, true, false);
    let mut c = h.capsule(&sqe(0x06, 0), &[]);
    c[1] = 0;
    h.send(&c);
    expect_term(&mut h, 1);

    // Declared length beyond the in-capsule limit.
    let mut h = Host::connect(port, false, false);
    let mut c = h.capsule(&sqe(0x01, 1), &[0u8; 16]);
    c[4..8].copy_from_slice(&(1u32 << 30).to_le_bytes());
    h.send(&c);
    expect_term(&mut h, 5);

    // Host-only PDU types the controller must not receive (R2T, C2HData).
    let mut h = Host::connect(port, false, false);
    let mut c = vec![9u8, 0, 24, 0, 24, 0, 0, 0];
    c.resize(24, 0);
    h.send(&c);
    expect_term(&mut h, 1);

    healthy_io(&mut good, 2);
}

#[test]
fn h2c_data_out_of_order_or_unsolicited_is_fatal() {
    let port = setup();
    let (_a, mut good) = io_queue_on(port, GOOD_NQN, false);
    for case in 0..4 {
        let (_a2, mut q) = io_queue(port, false);
        let mut s = rw(0x01, 1, 0, 4);
        s[2..4].copy_from_slice(&9u16.to_le_bytes());
        set_sgl(&mut s, 16384, false);
        let c = q.capsule(&s, &[]);
        q.send(&c);
        let r2t = q.recv_raw().expect("R2T");
        assert_eq!(r2t.ch.ty, 9);
        let ttag = u16::from_le_bytes(r2t.header[10..12].try_into().unwrap());
        let (pdu, fes) = match case {
            0 => (q.h2c(9, ttag.wrapping_add(7), 0, &[0; 4096], false), 1),
            1 => (q.h2c(9, ttag, 4096, &[0; 4096], false), 4),
            2 => (q.h2c(9, ttag, 0, &[0; 20000], true), 4),
            _ => (q.h2c(9, ttag, 0, &[0; 4096], true), 2),
        };
        q.send(&pdu);
        expect_term(&mut q, fes);
    }
    // An H2CData with no R2T at all.
    let (_a3, mut q) = io_queue(port, false);
    let pdu = q.h2c(1, 1, 0, &[0; 512], true);
    q.send(&pdu);
    expect_term(&mut q, 1);
    healthy_io(&mut good, 3);
}

#[test]
fn per_command_faults_get_error_status() {
    let port = setup();
    let (_a, mut q) = io_queue_on(port, GOOD_NQN, true);
    // Bad data digest on an in-capsule write: Data Transfer Error, queue stays up.
    let mut s = rw(0x01, 1, 0, 1);
    s[2..4].copy_from_slice(&5u16.to_le_bytes());
    set_sgl(&mut s, 4096, true);
    let mut c = q.capsule(&s, &[1u8; 4096]);
    let n = c.len();
    c[n - 1] ^= 1;
    q.send(&c);
    let r = q.recv_raw().unwrap();
    let cqe = nvmf::spec::Cqe::decode(r.header[8..24].try_into().unwrap());
    assert_eq!((cqe.cid, cqe.status), (5, 0x04));
    // Unsupported SGL descriptor type.
    let mut s = rw(0x02, 1, 0, 1);
    s[2..4].copy_from_slice(&6u16.to_le_bytes());
    set_sgl(&mut s, 4096, false);
    s[39] = 0x20;
    let c = q.capsule(&s, &[]);
    q.send(&c);
    let r = q.recv_raw().unwrap();
    assert_eq!(
        nvmf::spec::Cqe::decode(r.header[8..24].try_into().unwrap()).status,
        0x11 | DNR
    );
    // In-capsule SGL longer than the data sent.
    let mut s = rw(0x01, 1, 0, 1);
    s[2..4].copy_from_slice(&7u16.to_le_bytes());
    set_sgl(&mut s, 4096, true);
    let c = q.capsule(&s, &[0u8; 512]);
    q.send(&c);
    let r = q.recv_raw().unwrap();
    assert_eq!(
        nvmf::spec::Cqe::decode(r.header[8..24].try_into().unwrap()).status,
        0x16 | DNR
    );
    // Transfer longer than the maximum I/O size.
    let mut s = rw(0x02, 1, 0, 64);
    s[2..4].copy_from_slice(&8u16.to_le_bytes());
    set_sgl(&mut s, 1 << 20, false);
    let c = q.capsule(&s, &[]);
    q.send(&c);
    let r = q.recv_raw().unwrap();
    assert_eq!(
        nvmf::spec::Cqe::decode(r.header[8..24].try_into().unwrap()).status,
        0x0F | DNR
    );
    healthy_io(&mut q, 4);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Random corruption of a valid command stream: whatever happens, only well-formed
    /// controller PDUs come back, the connection ends when we stop, and the target stays
    /// healthy for others.
    #[test]
    fn mutated_streams(flips in prop::collection::vec((0usize..4000, any::<u8>()), 1..6),
                       cut in 0usize..5000, dg: bool) {
        let port = setup();
        let (_a, cntlid) = Host::admin_init(port, NQN, HOST, 0, false);
        let mut q = Host::connect(port, dg, dg);
        prop_assert_eq!(q.fabrics_connect(1, 63, 0, cntlid, NQN, HOST, 0).status, 0);
        let mut stream = Vec::new();
        let mut s = rw(0x01, 1, 0, 1);
        set_sgl(&mut s, 4096, true);
        stream.extend(q.capsule(&s, &[3u8; 4096]));
        let mut s = rw(0x02, 1, 0, 2);
        set_sgl(&mut s, 8192, false);
        stream.extend(q.capsule(&s, &[]));
        let mut s = rw(0x01, 1, 2, 2);
        s[2..4].copy_from_slice(&2u16.to_le_bytes());
        set_sgl(&mut s, 8192, false);
        stream.extend(q.capsule(&s, &[]));
        stream.extend(q.h2c(2, 1, 0, &[5u8; 8192], true));
        for (i, v) in flips {
            let n = stream.len();
            stream[i % n] ^= v;
        }
        stream.truncate(cut.max(1).min(stream.len()));
        q.send(&stream);
        q.s.shutdown(Shutdown::Write).ok();
        let _ = drain(&mut q);
        let (_a2, mut good) = io_queue_on(port, GOOD_NQN, false);
        healthy_io(&mut good, 5);
    }
}
