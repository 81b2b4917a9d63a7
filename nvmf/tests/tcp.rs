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
    assert!(u64::from_le_bytes(hdr[8..16].try_into().unwrap()) >= 1);
    // Other tests of this binary change the log concurrently: read it as libnvme does
    // (retrying while GENCTR moves).
    let (_, entries) = a.discovery_log();
    assert_eq!(disc_entries_for(&entries, nqn, port), 1, "entry for {nqn}");
    let e = entries
        .iter()
        .find(|e| disc_entries_for(std::slice::from_ref(e), nqn, port) == 1)
        .unwrap();
    assert!(e[512..].starts_with(b"127.0.0.1"), "TRADDR");
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

/// Number of controllers of `nqn` and the listen ports of its qpairs.
fn ctrlrs_and_qpair_ports(nqn: &str) -> (usize, Vec<String>) {
    let c = rpc("nvmf_subsystem_get_controllers", json!({"nqn": nqn})).unwrap();
    let q = rpc("nvmf_subsystem_get_qpairs", json!({"nqn": nqn})).unwrap();
    let mut ports: Vec<String> = q
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["listen_address"]["trsvcid"].as_str().unwrap().to_owned())
        .collect();
    ports.sort();
    (c.as_array().unwrap().len(), ports)
}

#[test]
fn listener_removal_disconnects_what_came_through_it() {
    let nqn = "nqn.2016-06.io.test:rmlisten";
    let other = "nqn.2016-06.io.test:rmlisten-other";
    let p1 = export(nqn, "MallocRmListen", 64, true);
    let p2 = free_port();
    listener(nqn, p2, true).unwrap();
    // A second subsystem shares p1, so p1 stays bound after the first lets go of it.
    let po = export(other, "MallocRmListenOther", 64, true);
    listener(other, p1, true).unwrap();
    // A: admin + I/O through p1. B: admin + I/O queue 1 through p2, I/O queue 2 through p1.
    let (mut a_adm, a_id) = Host::admin_init(p1, nqn, HOST, 0, false);
    let mut a_io = Host::connect(p1, false, false);
    assert_eq!(a_io.fabrics_connect(1, 31, 0, a_id, nqn, HOST, 0).status, 0);
    let (mut b_adm, b_id) = Host::admin_init(p2, nqn, HOST, 0, false);
    let mut b_io1 = Host::connect(p2, false, false);
    assert_eq!(
        b_io1.fabrics_connect(1, 31, 0, b_id, nqn, HOST, 0).status,
        0
    );
    let mut b_io2 = Host::connect(p1, false, false);
    assert_eq!(
        b_io2.fabrics_connect(2, 31, 0, b_id, nqn, HOST, 0).status,
        0
    );
    // C: the other subsystem through p1; D: connected to p1, no Connect yet.
    let (mut c_adm, _) = Host::admin_init(p1, other, HOST, 0, false);
    let mut d = Host::connect(p1, false, false);
    let (p1s, p2s) = (p1.to_string(), p2.to_string());
    let mut before = vec![p1s.clone(), p1s.clone(), p1s, p2s.clone(), p2s.clone()];
    before.sort();
    assert_eq!(ctrlrs_and_qpair_ports(nqn), (2, before));

    listener(nqn, p1, false).unwrap();
    assert!(a_adm.closed_by_target(), "A's admin queue closed");
    assert!(a_io.closed_by_target(), "A's I/O queue closed");
    assert!(b_io2.closed_by_target(), "B's queue through p1 closed");
    wait_for(|| ctrlrs_and_qpair_ports(nqn) == (1, vec![p2s.clone(), p2s.clone()]));
    let ctrlrs = rpc("nvmf_subsystem_get_controllers", json!({"nqn": nqn})).unwrap();
    assert_eq!(ctrlrs[0]["cntlid"], b_id);
    assert_eq!(ctrlrs[0]["num_io_qpairs"], 1);
    // B keeps working through p2; C and the unconnected D are untouched.
    let data = pattern(4096, 11);
    assert_eq!(b_io1.cmd(rw(0x01, 1, 7, 1), &data, true, 0).0.status, 0);
    assert_eq!(b_io1.cmd(rw(0x02, 1, 7, 1), &[], false, 4096).1, data);
    b_adm.keep_alive();
    c_adm.keep_alive();
    // The subsystem no longer answers on p1; the other one still does.
    let c = d.fabrics_connect(0, 31, 0, 0xFFFF, nqn, HOST, 0);
    assert_eq!(c.status, 0x184 | DNR, "Connect through a removed listener");
    let mut e = Host::connect(p1, false, false);
    assert_eq!(
        e.fabrics_connect(0, 31, 0, 0xFFFF, other, HOST, 0).status,
        0
    );

    // The last subsystem on p1 lets go: the port is unbound and everything on it closes.
    listener(other, p1, false).unwrap();
    assert!(c_adm.closed_by_target(), "C closed");
    assert!(d.closed_by_target(), "unconnected D closed");
    assert!(e.closed_by_target(), "E closed");
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", p1)).is_ok(),
        "port free once the RPC returned"
    );

    // Deleting the subsystem disconnects B: its sockets close, no qpair is left.
    rpc("nvmf_delete_subsystem", json!({"nqn": nqn})).unwrap();
    assert!(b_adm.closed_by_target(), "B's admin queue closed");
    assert!(b_io1.closed_by_target(), "B's I/O queue closed");
    assert!(rpc("nvmf_subsystem_get_qpairs", json!({"nqn": nqn})).is_err());
    rpc("nvmf_delete_subsystem", json!({"nqn": other})).unwrap();
    let _ = po;
}

#[test]
fn abort_stops_commands_not_yet_submitted() {
    let nqn = "nqn.2016-06.io.test:abort";
    let bname = "MallocAbort";
    let port = export(nqn, bname, 64, true);
    let (mut a, cntlid) = Host::admin_init(port, nqn, HOST, 0, false);
    let mut q = Host::connect(port, false, false);
    assert_eq!(q.fabrics_connect(1, 31, 0, cntlid, nqn, HOST, 0).status, 0);
    let old = pattern(8192, 21);
    assert_eq!(q.cmd(rw(0x01, 1, 10, 2), &old, true, 0).0.status, 0);
    let writes = iostat(bname).write.ops;

    // A write waiting for its data (R2T sent) is aborted: Abort DW0 bit 0 = 0.
    let mut w = rw(0x01, 1, 10, 2);
    w[2..4].copy_from_slice(&200u16.to_le_bytes());
    set_sgl(&mut w, 8192, false);
    let p = q.capsule(&w, &[]);
    q.send(&p);
    let r2t = q.recv_raw().expect("R2T");
    assert_eq!(r2t.ch.ty, 9);
    let ttag = u16::from_le_bytes(r2t.header[10..12].try_into().unwrap());
    let c = a.abort(1, 200);
    assert_eq!((c.status, c.dw0 & 1), (0, 0), "aborted");
    // The data the host was already sending is taken; the write completes with Command
    // Abort Requested and never reaches the bdev.
    let new = pattern(8192, 22);
    let p = q.h2c(200, ttag, 0, &new, true);
    q.send(&p);
    let cqe = q.recv_cqe();
    assert_eq!((cqe.cid, cqe.status), (200, 0x07));
    assert_eq!(iostat(bname).write.ops, writes, "no bdev write");
    assert_eq!(q.cmd(rw(0x02, 1, 10, 2), &[], false, 8192).1, old);

    // Unknown command, unknown queue, a command already completed: not aborted (bit 0 = 1).
    assert_eq!(a.abort(1, 999).dw0 & 1, 1);
    assert_eq!(a.abort(7, 1).dw0 & 1, 1);
    assert_eq!(a.abort(1, 200).dw0 & 1, 1);

    // A parked AER: it completes with Command Abort Requested, the Abort with bit 0 = 0.
    a.park_aer(31);
    let mut ab = sqe(0x08, 0);
    ab[2..4].copy_from_slice(&300u16.to_le_bytes());
    set_u32(&mut ab, 40, 31 << 16);
    set_sgl(&mut ab, 0, false);
    let p = a.capsule(&ab, &[]);
    a.send(&p);
    let mut got = [a.recv_cqe(), a.recv_cqe()];
    got.sort_by_key(|c| c.cid);
    assert_eq!((got[0].cid, got[0].status), (31, 0x07), "AER aborted");
    assert_eq!((got[1].cid, got[1].status, got[1].dw0 & 1), (300, 0, 0));
    // The queues are healthy afterwards.
    a.keep_alive();
    assert_eq!(q.cmd(rw(0x01, 1, 10, 2), &new, false, 0).0.status, 0);
    assert_eq!(q.cmd(rw(0x02, 1, 10, 2), &[], false, 8192).1, new);
    rpc("nvmf_delete_subsystem", json!({"nqn": nqn})).unwrap();
}
