//! The target against a host-side test initiator over loopback TCP: connect admin and I/O
//! queues, identify, I/O round trips on a malloc bdev, error statuses, keep-alive expiry,
//! host access control, discovery, namespace-change AENs, the C2H SUCCESS optimisation.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:test-host";

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn iostat(name: &str) -> bdev::IoStatSnapshot {
    bdev::registry().lookup(name).expect("bdev").core().iostat()
}

fn io_roundtrip(digests: bool) {
    let nqn = format!("nqn.2016-06.io.test:io-{digests}");
    let bname = format!("MallocIo{digests}");
    let port = export(&nqn, &bname, 1024, true);
    let (mut a, cntlid) = Host::admin_init(port, &nqn, HOST, 10_000, digests);
    let (c, id) = a.identify(1, 0);
    assert_eq!(c.status, 0);
    assert_eq!(
        u16::from_le_bytes([id[78], id[79]]),
        cntlid,
        "CNTLID matches Connect"
    );
    assert_eq!(&id[4..9], b"SN123");
    assert!(id[768..].starts_with(nqn.as_bytes()));
    assert_ne!(u16::from_le_bytes([id[320], id[321]]), 0, "KAS");
    assert_eq!(
        u32::from_le_bytes(id[536..540].try_into().unwrap()) & 3,
        1,
        "SGLS"
    );
    let (c, list) = a.identify(2, 0);
    assert_eq!(c.status, 0);
    assert_eq!(u32::from_le_bytes(list[0..4].try_into().unwrap()), 1);
    assert_eq!(u32::from_le_bytes(list[4..8].try_into().unwrap()), 0);
    let (c, ns) = a.identify(0, 1);
    assert_eq!(c.status, 0);
    assert_eq!(
        u64::from_le_bytes(ns[0..8].try_into().unwrap()),
        1024,
        "NSZE"
    );
    assert_eq!(ns[130], 12, "LBADS 4 KiB");
    let (c, desc) = a.identify(3, 1);
    assert_eq!(c.status, 0);
    assert_eq!((desc[0], desc[1]), (2, 16), "NGUID descriptor");
    // Unknown namespace: zero page; bad CNS: Invalid Field.
    let (c, z) = a.identify(0, 7);
    assert_eq!(c.status, 0);
    assert!(z.iter().all(|&b| b == 0));
    assert_eq!(a.identify(0x42, 0).0.status, 0x02 | DNR);
    // Number of queues.
    let mut s = sqe(0x09, 0);
    set_u32(&mut s, 40, 0x07);
    set_u32(&mut s, 44, 3 | (3 << 16));
    let (c, _) = a.cmd(s, &[], false, 0);
    assert_eq!((c.status, c.dw0), (0, 3 | (3 << 16)));

    let mut q1 = Host::connect(port, digests, digests);
    assert_eq!(
        q1.fabrics_connect(1, 127, 0, cntlid, &nqn, HOST, 0).status,
        0
    );
    let mut q2 = Host::connect(port, digests, digests);
    assert_eq!(
        q2.fabrics_connect(2, 31, 0, cntlid, &nqn, HOST, 0).status,
        0
    );
    // Same qid twice: refused.
    let mut dup = Host::connect(port, digests, digests);
    assert_ne!(
        dup.fabrics_connect(2, 31, 0, cntlid, &nqn, HOST, 0).status,
        0
    );

    // In-capsule 4 KiB write, R2T 64 KiB write split into 16 KiB H2CData PDUs.
    let small = pattern(4096, 1);
    assert_eq!(q1.cmd(rw(0x01, 1, 3, 1), &small, true, 0).0.status, 0);
    let big = pattern(65536, 2);
    q2.h2c_chunk = 16384;
    assert_eq!(q2.cmd(rw(0x01, 1, 100, 16), &big, false, 0).0.status, 0);
    let (c, d) = q1.cmd(rw(0x02, 1, 3, 1), &[], false, 4096);
    assert_eq!(c.status, 0);
    assert_eq!(d, small);
    let (c, d) = q1.cmd(rw(0x02, 1, 100, 16), &[], false, 65536);
    assert_eq!(c.status, 0);
    assert!(d == big, "64 KiB read back");
    // Flush.
    let flushes = iostat(&bname).flush.ops;
    assert_eq!(q2.cmd(sqe(0x00, 1), &[], false, 0).0.status, 0);
    assert!(iostat(&bname).flush.ops > flushes);
    // Write zeroes over part of the big write.
    assert_eq!(q2.cmd(rw(0x08, 1, 104, 4), &[], false, 0).0.status, 0);
    let (_, d) = q1.cmd(rw(0x02, 1, 100, 16), &[], false, 65536);
    assert!(d[16384..32768].iter().all(|&b| b == 0), "zeroed");
    assert_eq!(&d[..16384], &big[..16384]);
    // Deallocate two ranges (4 KiB range buffer as Linux sends it).
    let unmaps = iostat(&bname).unmap.ops;
    let mut ranges = vec![0u8; 4096];
    ranges[4..8].copy_from_slice(&8u32.to_le_bytes());
    ranges[8..16].copy_from_slice(&200u64.to_le_bytes());
    ranges[20..24].copy_from_slice(&4u32.to_le_bytes());
    ranges[24..32].copy_from_slice(&300u64.to_le_bytes());
    let mut s = sqe(0x09, 1);
    set_u32(&mut s, 40, 1);
    set_u32(&mut s, 44, 0x4);
    assert_eq!(q1.cmd(s, &ranges, false, 0).0.status, 0);
    assert!(
        iostat(&bname).unmap.ops >= unmaps + 2,
        "unmap reached the bdev"
    );

    // Errors: out of range, bad namespace, wrong SGL length, unknown opcode, bad PSDT.
    assert_eq!(
        q1.cmd(rw(0x02, 1, 1020, 8), &[], false, 32768).0.status,
        0x80 | DNR
    );
    assert_eq!(
        q1.cmd(rw(0x02, 1, u64::MAX, 1), &[], false, 4096).0.status,
        0x80 | DNR
    );
    assert_eq!(
        q1.cmd(rw(0x01, 1, 1023, 2), &pattern(8192, 3), true, 0)
            .0
            .status,
        0x80 | DNR
    );
    assert_eq!(
        q1.cmd(rw(0x02, 9, 0, 1), &[], false, 4096).0.status,
        0x0B | DNR
    );
    assert_eq!(
        q1.cmd(rw(0x02, 1, 0, 2), &[], false, 4096).0.status,
        0x0F | DNR
    );
    assert_eq!(q1.cmd(sqe(0x55, 1), &[], false, 0).0.status, 0x01 | DNR);
    let mut s = rw(0x02, 1, 0, 1);
    s[1] = 0x00;
    assert_eq!(q1.cmd(s, &[], false, 4096).0.status, 0x02 | DNR);
    // Still healthy after the errors.
    assert_eq!(q1.cmd(rw(0x02, 1, 3, 1), &[], false, 4096).1, small);

    let ctrlrs = rpc("nvmf_subsystem_get_controllers", json!({"nqn": nqn})).unwrap();
    assert_eq!(ctrlrs[0]["num_io_qpairs"], 2);
    let qpairs = rpc("nvmf_subsystem_get_qpairs", json!({"nqn": nqn})).unwrap();
    assert_eq!(qpairs.as_array().unwrap().len(), 3);
    // Shutdown notification, then disconnect: controller gone.
    let c = a.prop_set(0x14, (6 << 16) | (4 << 20) | 1 | (1 << 14));
    assert_eq!(c.status, 0);
    assert_eq!((a.prop_get(0x1C, false) >> 2) & 3, 2, "SHST complete");
    drop((q1, q2, dup, a));
    wait_for(|| rpc("nvmf_subsystem_get_controllers", json!({"nqn": nqn})).unwrap() == json!([]));
    rpc("nvmf_delete_subsystem", json!({"nqn": nqn})).unwrap();
}

fn wait_for(mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "condition not reached in 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn io_roundtrip_without_digests() {
    io_roundtrip(false);
}

#[test]
fn io_roundtrip_with_header_and_data_digests() {
    io_roundtrip(true);
}

#[test]
fn keep_alive_expiry_tears_down_controller() {
    let nqn = "nqn.2016-06.io.test:kato";
    let port = export(nqn, "MallocKato", 64, true);
    let (mut a, cntlid) = Host::admin_init(port, nqn, HOST, 1000, false);
    let mut q = Host::connect(port, false, false);
    assert_eq!(q.fabrics_connect(1, 31, 0, cntlid, nqn, HOST, 0).status, 0);
    // Keep-alives keep it up past the timeout...
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(a.cmd(sqe(0x18, 0), &[], false, 0).0.status, 0);
    }
    assert_eq!(
        rpc("nvmf_subsystem_get_controllers", json!({"nqn": nqn}))
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // ...silence tears it down: both sockets closed, controller unlisted.
    let t = Instant::now();
    assert!(a.recv_raw().is_none(), "admin socket closed");
    assert!(q.recv_raw().is_none(), "I/O socket closed");
    assert!(t.elapsed() < Duration::from_secs(5));
    wait_for(|| rpc("nvmf_subsystem_get_controllers", json!({"nqn": nqn})).unwrap() == json!([]));
    rpc("nvmf_delete_subsystem", json!({"nqn": nqn})).unwrap();
}

#[test]
fn host_not_allowed_is_refused() {
    let nqn = "nqn.2016-06.io.test:acl";
    let port = export(nqn, "MallocAcl", 64, false);
    rpc("nvmf_subsystem_add_host", json!({"nqn": nqn, "host": HOST})).unwrap();
    let mut h = Host::connect(port, false, false);
    let c = h.fabrics_connect(
        0,
        31,
        0,
        0xFFFF,
        nqn,
        "nqn.2014-08.org.nvmexpress:uuid:intruder",
        0,
    );
    assert_eq!(c.status, 0x184 | DNR, "Connect Invalid Host");
    let (mut a, _) = Host::admin_init(port, nqn, HOST, 0, false);
    assert_eq!(a.identify(1, 0).0.status, 0);
    // Removing the host disconnects its controller.
    rpc(
        "nvmf_subsystem_remove_host",
        json!({"nqn": nqn, "host": HOST}),
    )
    .unwrap();
    assert!(a.recv_raw().is_none(), "disconnected");
    let mut h = Host::connect(port, false, false);
    assert_eq!(
        h.fabrics_connect(0, 31, 0, 0xFFFF, nqn, HOST, 0).status,
        0x184 | DNR
    );
    rpc(
        "nvmf_subsystem_allow_any_host",
        json!({"nqn": nqn, "allow_any_host": true}),
    )
    .unwrap();
    let mut h = Host::connect(port, false, false);
    assert_eq!(
        h.fabrics_connect(0, 31, 0, 0xFFFF, nqn, "nqn.x:other", 0)
            .status,
        0
    );
    rpc("nvmf_delete_subsystem", json!({"nqn": nqn})).unwrap();
}

#[test]
fn discovery_log_lists_subsystem_and_listener() {
    let nqn = "nqn.2016-06.io.test:disc";
    let port = export(nqn, "MallocDisc", 64, true);
    let (mut a, _) = Host::admin_init(port, "nqn.2014-08.org.nvmexpress.discovery", HOST, 0, false);
    let (c, id) = a.identify(1, 0);
    assert_eq!(c.status, 0);
    assert_eq!(id[111], 2, "CNTRLTYPE discovery");
    // Header (libnvme reads 20 bytes first).
    let mut s = sqe(0x02, 0);
    set_u32(&mut s, 40, 0x70 | (4 << 16));
    let (c, hdr) = a.cmd(s, &[], false, 20);
    assert_eq!(c.status, 0);
    let numrec = u64::from_le_bytes(hdr[8..16].try_into().unwrap()) as usize;
    assert!(numrec >= 1);
    let len = (numrec * 1024) as u32;
    let mut s = sqe(0x02, 0);
    set_u32(&mut s, 40, 0x70 | ((len / 4 - 1) << 16));
    set_u64(&mut s, 48, 1024);
    let (c, entries) = a.cmd(s, &[], false, len);
    assert_eq!(c.status, 0);
    let found = entries.chunks(1024).any(|e| {
        e[0] == 3
            && e[2] == 2
            && e[256..].starts_with(nqn.as_bytes())
            && e[32..].starts_with(port.to_string().as_bytes())
            && e[512..].starts_with(b"127.0.0.1")
    });
    assert!(found, "entry for {nqn} on port {port}");
    // Misaligned offset: Invalid Field.
    let mut s = sqe(0x02, 0);
    set_u32(&mut s, 40, 0x70 | (4 << 16));
    set_u64(&mut s, 48, 2);
    assert_eq!(a.cmd(s, &[], false, 20).0.status, 0x02 | DNR);
    rpc("nvmf_delete_subsystem", json!({"nqn": nqn})).unwrap();
}

#[test]
fn namespace_add_and_remove_raise_async_events() {
    let nqn = "nqn.2016-06.io.test:aen";
    let port = export(nqn, "MallocAen1", 64, true);
    let (mut a, cntlid) = Host::admin_init(port, nqn, HOST, 0, false);
    let mut s = sqe(0x09, 0);
    set_u32(&mut s, 40, 0x0B);
    set_u32(&mut s, 44, 1 << 8);
    assert_eq!(a.cmd(s, &[], false, 0).0.status, 0);
    // Park an AER (cid 31 like Linux).
    let mut aer = sqe(0x0C, 0);
    aer[2..4].copy_from_slice(&31u16.to_le_bytes());
    set_sgl(&mut aer, 0, false);
    let p = a.capsule(&aer, &[]);
    a.send(&p);
    bdev::malloc::create(bdev::malloc::MallocOpts {
        name: Some("MallocAen2".into()),
        num_blocks: 32,
        block_size: 4096,
        uuid: None,
        optimal_io_boundary: 0,
    })
    .unwrap();
    let nsid = rpc(
        "nvmf_subsystem_add_ns",
        json!({"nqn": nqn, "namespace": {"bdev_name": "MallocAen2"}}),
    )
    .unwrap();
    assert_eq!(nsid, 2);
    let r = a.recv_raw().expect("AEN");
    let cqe = nvmf::spec::Cqe::decode(r.header[8..24].try_into().unwrap());
    assert_eq!((cqe.cid, cqe.status, cqe.dw0), (31, 0, 0x0004_0002));
    let mut s = sqe(0x02, 0xFFFF_FFFF);
    set_u32(&mut s, 40, 0x04 | (1023 << 16));
    let (c, log) = a.cmd(s, &[], false, 4096);
    assert_eq!(c.status, 0);
    assert_eq!(u32::from_le_bytes(log[0..4].try_into().unwrap()), 2);
    let (_, list) = a.identify(2, 0);
    assert_eq!(u32::from_le_bytes(list[4..8].try_into().unwrap()), 2);
    // An I/O queue uses the new namespace (caching its channel), then goes idle.
    let mut q = Host::connect(port, false, false);
    assert_eq!(q.fabrics_connect(1, 31, 0, cntlid, nqn, HOST, 0).status, 0);
    let data = pattern(4096, 4);
    assert_eq!(q.cmd(rw(0x01, 2, 5, 1), &data, true, 0).0.status, 0);
    assert_eq!(q.cmd(rw(0x02, 2, 5, 1), &[], false, 4096).1, data);
    let descs = || {
        bdev::registry()
            .lookup("MallocAen2")
            .expect("bdev")
            .core()
            .nr_open_descs()
    };
    assert_eq!(descs(), 1);
    // Removal: another notice; the namespace is gone from the list.
    let p = a.capsule(&aer, &[]);
    a.send(&p);
    rpc("nvmf_subsystem_remove_ns", json!({"nqn": nqn, "nsid": 2})).unwrap();
    let r = a.recv_raw().expect("AEN");
    assert_eq!(
        nvmf::spec::Cqe::decode(r.header[8..24].try_into().unwrap()).dw0,
        0x0004_0002
    );
    let (_, list) = a.identify(2, 0);
    assert_eq!(u32::from_le_bytes(list[4..8].try_into().unwrap()), 0);
    // The idle I/O queue let go of the descriptor; I/O to the namespace now fails.
    wait_for(|| descs() == 0);
    let c = q.cmd(rw(0x02, 2, 5, 1), &[], false, 4096).0;
    assert_eq!(c.status, 0x0B | DNR);
    rpc("nvmf_delete_subsystem", json!({"nqn": nqn})).unwrap();
}

#[test]
fn sq_flow_control_disabled_uses_c2h_success() {
    let nqn = "nqn.2016-06.io.test:success";
    let port = export(nqn, "MallocSuccess", 64, true);
    let (_a, cntlid) = Host::admin_init(port, nqn, HOST, 0, false);
    let mut q = Host::connect(port, false, false);
    assert_eq!(
        q.fabrics_connect(1, 31, 0, cntlid, nqn, HOST, 0x4).status,
        0
    );
    let data = pattern(8192, 9);
    assert_eq!(q.cmd(rw(0x01, 1, 0, 2), &data, true, 0).0.status, 0);
    let mut s = rw(0x02, 1, 0, 2);
    s[2..4].copy_from_slice(&77u16.to_le_bytes());
    set_sgl(&mut s, 8192, false);
    let p = q.capsule(&s, &[]);
    q.send(&p);
    let r = q.recv_raw().expect("C2HData");
    assert_eq!(r.ch.ty, 7);
    assert_eq!(r.ch.flags & 0x0C, 0x0C, "LAST_PDU|SUCCESS");
    assert_eq!(r.data, data);
    // No CapsuleResp follows: the next PDU answers the next command.
    let (c, _) = q.cmd(sqe(0x00, 1), &[], false, 0);
    assert_eq!(c.status, 0);
    rpc("nvmf_delete_subsystem", json!({"nqn": nqn})).unwrap();
}

#[test]
fn rpc_params_and_config() {
    runtime();
    let e = rpc("nvmf_create_subsystem", json!({"nqn": "bad"})).unwrap_err();
    assert_eq!(e.code, -libc::EINVAL);
    let e = rpc(
        "nvmf_create_subsystem",
        json!({"nqn": "nqn.x:y", "bogus": 1}),
    )
    .unwrap_err();
    assert_eq!(e.code, -32602);
    let e = rpc("nvmf_create_transport", json!({"trtype": "TCP"})).unwrap_err();
    assert_eq!(e.code, -libc::EEXIST);
    let e = rpc(
        "nvmf_subsystem_add_ns",
        json!({"nqn": "nqn.none", "namespace": {"bdev_name": "x"}}),
    )
    .unwrap_err();
    assert_eq!(e.code, -libc::ENODEV);
    let nqn = "nqn.2016-06.io.test:cfg";
    let port = export(nqn, "MallocCfg", 16, false);
    rpc("nvmf_subsystem_add_host", json!({"nqn": nqn, "host": HOST})).unwrap();
    let e = rpc(
        "nvmf_subsystem_add_ns",
        json!({"nqn": nqn, "namespace": {"bdev_name": "nope"}}),
    )
    .unwrap_err();
    assert_eq!(e.code, -libc::ENODEV, "{}", e.message);
    let cfg = nvmf::config_json();
    assert_eq!(cfg[0]["method"], "nvmf_create_transport");
    let mine: Vec<_> = cfg
        .iter()
        .filter(|c| c["params"]["nqn"] == nqn)
        .map(|c| c["method"].as_str().unwrap())
        .collect();
    assert_eq!(
        mine,
        [
            "nvmf_create_subsystem",
            "nvmf_subsystem_add_host",
            "nvmf_subsystem_add_ns",
            "nvmf_subsystem_add_listener"
        ]
    );
    let l = cfg
        .iter()
        .find(|c| c["method"] == "nvmf_subsystem_add_listener" && c["params"]["nqn"] == nqn)
        .unwrap();
    assert_eq!(l["params"]["listen_address"]["trsvcid"], port.to_string());
    let subs = rpc("nvmf_get_subsystems", json!({"nqn": nqn})).unwrap();
    assert_eq!(subs[0]["namespaces"][0]["bdev_name"], "MallocCfg");
    assert_eq!(subs[0]["hosts"][0]["nqn"], HOST);
    // Listener removal releases the port.
    let addr = json!({"trtype": "tcp", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()});
    rpc(
        "nvmf_subsystem_remove_listener",
        json!({"nqn": nqn, "listen_address": addr}),
    )
    .unwrap();
    wait_for(|| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
    rpc("nvmf_delete_subsystem", json!({"nqn": nqn})).unwrap();
    assert!(rpc("nvmf_get_subsystems", json!({"nqn": nqn})).is_err());
}
