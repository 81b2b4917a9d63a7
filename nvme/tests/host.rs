//! The NVMe/TCP host against our own target (nvmf) on loopback, and against fake targets.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

use bdev::IoStatus;
use common::*;
use serde_json::json;

const BS: usize = 4096;

#[test]
fn attach_makes_bdev_of_the_namespace_size_and_detach_removes_it() {
    let port = export("nqn.2026-01.io.test:attach", "MallocA", 2048, 4096);
    let names = attach("NvA", port, "nqn.2026-01.io.test:attach", json!({})).expect("attach");
    assert_eq!(names, vec!["NvAn1".to_string()]);
    let b = bdev::registry().lookup("NvAn1").expect("bdev registered");
    assert_eq!((b.block_size(), b.num_blocks()), (4096, 2048));
    assert!(b.io_type_supported(bdev::IoType::Unmap));
    assert!(b.io_type_supported(bdev::IoType::WriteZeroes));
    let c = rpc("bdev_nvme_get_controllers", json!({"name": "NvA"})).expect("get");
    assert_eq!(c[0]["name"], "NvA");
    assert_eq!(c[0]["ctrlrs"][0]["state"], "enabled");
    assert_eq!(c[0]["ctrlrs"][0]["trid"]["trsvcid"], port.to_string());
    let cfg = nvme::config_json();
    assert!(cfg
        .iter()
        .any(|m| m["method"] == "bdev_nvme_attach_controller" && m["params"]["name"] == "NvA"));
    // Same name twice: EEXIST.
    let e = attach("NvA", port, "nqn.2026-01.io.test:attach", json!({})).unwrap_err();
    assert_eq!(e.0, libc::EEXIST, "{e:?}");
    detach("NvA").expect("detach");
    assert!(bdev::registry().lookup("NvAn1").is_none());
    let e = rpc("bdev_nvme_get_controllers", json!({"name": "NvA"})).unwrap_err();
    assert_eq!(e.0, libc::ENODEV);
    let e = detach("NvA").unwrap_err();
    assert_eq!(e.0, libc::ENODEV);
}

#[test]
fn bad_attach_params_are_refused() {
    for (p, errno) in [
        (
            json!({"name": "X", "trtype": "rdma", "traddr": "127.0.0.1"}),
            libc::ENOTSUP,
        ),
        (
            json!({"name": "X", "trtype": "tcp", "traddr": "not-an-ip"}),
            libc::EINVAL,
        ),
        (
            json!({"name": "X", "trtype": "tcp", "traddr": "127.0.0.1", "adrfam": "IPv6"}),
            libc::EINVAL,
        ),
        (
            json!({"name": "X", "trtype": "tcp", "traddr": "127.0.0.1", "bogus": 1}),
            libc::EINVAL,
        ),
        (
            json!({"name": "X", "trtype": "tcp", "traddr": "127.0.0.1",
                "ctrlr_loss_timeout_sec": 5, "reconnect_delay_sec": 0}),
            libc::EINVAL,
        ),
    ] {
        let e = rpc("bdev_nvme_attach_controller", p.clone()).unwrap_err();
        assert_eq!(e.0, errno, "{p}: {e:?}");
    }
}

#[test]
fn write_read_verify_random_blocks_on_two_reactors() {
    let nqn = "nqn.2026-01.io.test:verify";
    let port = export(nqn, "MallocV", 4096, 4096);
    attach("NvV", port, nqn, json!({"io_queue_size": 32})).expect("attach");
    let mut seed = 7u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..4 {
        // 64 distinct random blocks, half written from each reactor at once (more I/O than
        // the queue has slots), then read back from the other reactor.
        let mut lbas: Vec<u64> = Vec::new();
        while lbas.len() < 64 {
            let l = next() % 4096;
            if !lbas.contains(&l) {
                lbas.push(l);
            }
        }
        let (a, b) = lbas.split_at(32);
        let w = |lbas: &[u64]| -> Vec<Op> {
            lbas.iter()
                .map(|&l| Op::Write(l, pattern(l * 100 + round, BS)))
                .collect()
        };
        let r0 = run_ops_async(0, "NvVn1", w(a));
        let r1 = run_ops_async(1, "NvVn1", w(b));
        for r in [r0, r1] {
            let res = r.recv_timeout(Duration::from_secs(60)).expect("writes");
            assert!(res.iter().all(|(s, _)| *s == IoStatus::Success), "{res:?}");
        }
        for (reactor, lbas) in [(1, a), (0, b)] {
            let res = run_ops(
                reactor,
                "NvVn1",
                lbas.iter().map(|&l| Op::Read(l, 1)).collect(),
            );
            for (&l, (s, d)) in lbas.iter().zip(res) {
                assert_eq!(s, IoStatus::Success);
                assert!(
                    d.expect("data") == pattern(l * 100 + round, BS),
                    "lba {l} round {round}"
                );
            }
        }
    }
    detach("NvV").expect("detach");
}

/// 1 MiB writes and reads: split at MDTS (128 KiB) into 8 commands, each written through
/// R2T/H2CData (over the 8 KiB in-capsule limit); small writes go in-capsule.
fn large_io(name: &str, nqn: &str, extra: serde_json::Value) {
    let port = export(nqn, &format!("Malloc{name}"), 2048, 4096);
    attach(name, port, nqn, extra).expect("attach");
    let bdev = format!("{name}n1");
    let big = pattern(42, 1 << 20);
    let small = pattern(43, 8192);
    let res = run_ops(
        0,
        &bdev,
        vec![Op::Write(100, big.clone()), Op::Write(1000, small.clone())],
    );
    assert!(res.iter().all(|(s, _)| *s == IoStatus::Success), "{res:?}");
    let res = run_ops(
        1,
        &bdev,
        vec![Op::Read(100, 256), Op::Read(1000, 2), Op::Read(99, 1)],
    );
    assert_eq!(res[0].0, IoStatus::Success);
    assert!(
        res[0].1.as_deref() == Some(&big[..]),
        "1 MiB read back differs"
    );
    assert!(
        res[1].1.as_deref() == Some(&small[..]),
        "in-capsule write read back differs"
    );
    assert!(
        res[2].1.as_deref() == Some(&[0u8; BS][..]),
        "neighbour block touched"
    );
    let res = run_ops(0, &bdev, vec![Op::Flush]);
    assert_eq!(res[0].0, IoStatus::Success);
    detach(name).expect("detach");
}

#[test]
fn large_io_is_split_at_mdts_and_uses_r2t() {
    large_io("NvL", "nqn.2026-01.io.test:large", json!({}));
}

#[test]
fn header_and_data_digests() {
    large_io(
        "NvD",
        "nqn.2026-01.io.test:digest",
        json!({"hdgst": true, "ddgst": true}),
    );
}

#[test]
fn unmap_and_write_zeroes_read_back_zeroes() {
    let nqn = "nqn.2026-01.io.test:zero";
    let port = export(nqn, "MallocZ", 1024, 4096);
    attach("NvZ", port, nqn, json!({})).expect("attach");
    let data = pattern(5, 64 * BS);
    let res = run_ops(0, "NvZn1", vec![Op::Write(0, data.clone())]);
    assert_eq!(res[0].0, IoStatus::Success);
    let res = run_ops(0, "NvZn1", vec![Op::Unmap(4, 8), Op::WriteZeroes(40, 8)]);
    assert!(res.iter().all(|(s, _)| *s == IoStatus::Success), "{res:?}");
    let res = run_ops(1, "NvZn1", vec![Op::Read(0, 64)]);
    let got = res[0].1.clone().expect("data");
    for blk in 0..64usize {
        let want_zero = (4..12).contains(&blk) || (40..48).contains(&blk);
        let g = &got[blk * BS..(blk + 1) * BS];
        if want_zero {
            assert!(g.iter().all(|&b| b == 0), "block {blk} not zero");
        } else {
            assert!(g == &data[blk * BS..(blk + 1) * BS], "block {blk} changed");
        }
    }
    detach("NvZ").expect("detach");
}

#[test]
fn lost_connection_fails_inflight_io_then_reconnects() {
    let nqn = "nqn.2026-01.io.test:loss";
    let tport = export(nqn, "MallocLoss", 1024, 4096);
    let mut proxy = Proxy::start(0, tport);
    let port = proxy.port;
    attach(
        "NvLoss",
        port,
        nqn,
        json!({"ctrlr_loss_timeout_sec": -1, "reconnect_delay_sec": 1}),
    )
    .expect("attach");
    let res = run_ops(0, "NvLossn1", vec![Op::Write(3, pattern(9, BS))]);
    assert_eq!(res[0].0, IoStatus::Success);
    // Stall the connection so I/O is certainly in flight, then kill it.
    proxy
        .paused
        .store(true, std::sync::atomic::Ordering::Release);
    let inflight = run_ops_async(0, "NvLossn1", (0..8).map(|i| Op::Read(i, 1)).collect());
    thread::sleep(Duration::from_millis(100));
    proxy.kill();
    let res = inflight
        .recv_timeout(Duration::from_secs(10))
        .expect("in-flight I/O completed");
    assert!(
        res.iter().all(|(s, _)| *s == IoStatus::Failed(libc::EIO)),
        "in-flight I/O must fail with EIO: {res:?}"
    );
    let c = rpc("bdev_nvme_get_controllers", json!({"name": "NvLoss"})).expect("get");
    assert_ne!(c[0]["ctrlrs"][0]["state"], "enabled");
    // I/O submitted while disconnected waits (fast_io_fail_timeout_sec 0)...
    let held = run_ops_async(1, "NvLossn1", vec![Op::Read(3, 1)]);
    thread::sleep(Duration::from_millis(1500));
    assert!(
        held.try_recv().is_err(),
        "held I/O completed while disconnected"
    );
    // ...until the target is back on the same port and the controller reconnected.
    let t0 = Instant::now();
    let _proxy2 = Proxy::start(port, tport);
    let res = held
        .recv_timeout(Duration::from_secs(20))
        .expect("held I/O completed");
    assert_eq!(res[0].0, IoStatus::Success, "held I/O after reconnect");
    assert!(res[0].1.as_deref() == Some(&pattern(9, BS)[..]));
    assert!(t0.elapsed() < Duration::from_secs(15));
    let c = rpc("bdev_nvme_get_controllers", json!({"name": "NvLoss"})).expect("get");
    assert_eq!(c[0]["ctrlrs"][0]["state"], "enabled");
    let res = run_ops(
        0,
        "NvLossn1",
        vec![Op::Write(5, pattern(10, BS)), Op::Read(3, 1)],
    );
    assert!(res.iter().all(|(s, _)| *s == IoStatus::Success), "{res:?}");
    detach("NvLoss").expect("detach");
}

#[test]
fn held_io_fails_after_fast_io_fail_timeout() {
    let nqn = "nqn.2026-01.io.test:fastfail";
    let tport = export(nqn, "MallocFF", 256, 4096);
    let mut proxy = Proxy::start(0, tport);
    attach(
        "NvFF",
        proxy.port,
        nqn,
        json!({"ctrlr_loss_timeout_sec": 30, "reconnect_delay_sec": 1,
               "fast_io_fail_timeout_sec": 1}),
    )
    .expect("attach");
    let res = run_ops(0, "NvFFn1", vec![Op::Read(0, 1)]);
    assert_eq!(res[0].0, IoStatus::Success);
    proxy.kill();
    thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let res = run_ops(0, "NvFFn1", vec![Op::Read(0, 1)]);
    assert_eq!(res[0].0, IoStatus::Failed(libc::EIO));
    let waited = t0.elapsed();
    assert!(waited < Duration::from_secs(5), "held for {waited:?}");
    detach("NvFF").expect("detach");
}

#[test]
fn nothing_listening_is_a_clear_attach_error() {
    runtime();
    let port = free_port();
    let e = attach("NvNone", port, "nqn.x", json!({})).unwrap_err();
    assert_eq!(e.0, libc::ECONNREFUSED, "{e:?}");
    assert!(rpc("bdev_nvme_get_controllers", json!({"name": "NvNone"})).is_err());
}

/// A fake target: reads the ICReq, then answers with `reply`.
fn fake_target(reply: Vec<u8>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let mut ic = [0u8; 128];
            if s.read_exact(&mut ic).is_ok() {
                let _ = s.write_all(&reply);
            }
            // Keep the socket open a while: the host must hang up, not us.
            let mut sink = [0u8; 4096];
            s.set_read_timeout(Some(Duration::from_secs(5))).ok();
            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        }
    });
    port
}

#[test]
fn garbage_from_the_target_fails_the_attach_cleanly() {
    runtime();
    let good_ic = nvme::proto::pdu::ic_resp(0, 131072).to_vec();
    let mut bad_len = good_ic.clone();
    bad_len[4] = 200; // plen 200
    let mut bad_cpda = good_ic.clone();
    bad_cpda[10] = 3;
    let mut digest_mismatch = good_ic.clone();
    digest_mismatch[11] = 1;
    // A valid ICResp followed by a response for a command never sent.
    let mut unknown_cid = good_ic.clone();
    let cqe = nvme::proto::spec::Cqe {
        cid: 77,
        ..Default::default()
    };
    nvme::proto::pdu::push_capsule_resp(&mut unknown_cid, &cqe.encode(), false);
    // A valid ICResp followed by a PDU type a controller never sends.
    let mut host_pdu = good_ic.clone();
    nvme::proto::pdu::push_capsule_cmd(&mut host_pdu, &[0; 64], &[], false, false);
    for (i, reply) in [
        vec![0xFF; 300],
        bad_len,
        bad_cpda,
        digest_mismatch,
        unknown_cid,
        host_pdu,
    ]
    .into_iter()
    .enumerate()
    {
        let port = fake_target(reply);
        let name = format!("NvBad{i}");
        let e = attach(
            &name,
            port,
            "nqn.fake",
            json!({"fabrics_connect_timeout_us": 3_000_000}),
        )
        .unwrap_err();
        assert_eq!(e.0, libc::EPROTO, "case {i}: {e:?}");
        assert!(e.1.contains("protocol error"), "case {i}: {}", e.1);
        assert!(rpc("bdev_nvme_get_controllers", json!({"name": name})).is_err());
    }
    // Silence: the connect timeout ends it.
    let port = fake_target(Vec::new());
    let e = attach(
        "NvSilent",
        port,
        "nqn.fake",
        json!({"fabrics_connect_timeout_us": 300_000}),
    )
    .unwrap_err();
    assert_eq!(e.0, libc::ETIMEDOUT, "{e:?}");
}

#[test]
fn wrong_subsystem_is_refused_by_connect() {
    let port = export("nqn.2026-01.io.test:right", "MallocR", 64, 4096);
    let e = attach("NvWrong", port, "nqn.2026-01.io.test:wrong", json!({})).unwrap_err();
    assert!(e.1.contains("Fabrics Connect"), "{e:?}");
}

#[test]
fn garbage_mid_io_disconnects_fails_the_io_and_recovers() {
    let nqn = "nqn.2026-01.io.test:garbage";
    let tport = export(nqn, "MallocG", 256, 4096);
    let proxy = Proxy::start(0, tport);
    attach(
        "NvG",
        proxy.port,
        nqn,
        json!({"ctrlr_loss_timeout_sec": -1, "reconnect_delay_sec": 1}),
    )
    .expect("attach");
    let data = pattern(77, BS);
    let res = run_ops(0, "NvGn1", vec![Op::Write(9, data.clone())]);
    assert_eq!(res[0].0, IoStatus::Success);
    // The read's C2HData arrives as garbage: the queue is dropped, the read fails.
    proxy
        .corrupt
        .store(true, std::sync::atomic::Ordering::Release);
    let res = run_ops(0, "NvGn1", vec![Op::Read(9, 1)]);
    assert_eq!(res[0].0, IoStatus::Failed(libc::EIO));
    assert!(stat("NvG", "nr_protocol_errors") >= 1);
    // The controller resets and reconnects; I/O works again, with the right data.
    let res = run_ops(1, "NvGn1", vec![Op::Read(9, 1)]);
    assert_eq!(res[0].0, IoStatus::Success);
    assert!(res[0].1.as_deref() == Some(&data[..]));
    assert!(stat("NvG", "nr_connects") >= 2);
    detach("NvG").expect("detach");
}

#[test]
fn target_silent_after_connect_times_the_attach_out() {
    runtime();
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    thread::spawn(move || {
        let Ok((mut s, _)) = l.accept() else { return };
        let mut ic = [0u8; 128];
        s.read_exact(&mut ic).expect("icreq");
        s.write_all(&nvme::proto::pdu::ic_resp(0, 131072))
            .expect("icresp");
        // Connect: 72-byte capsule header + 1024 bytes of in-capsule data.
        let mut connect = vec![0u8; 72 + 1024];
        s.read_exact(&mut connect).expect("connect");
        let cid = u16::from_le_bytes([connect[10], connect[11]]);
        let cqe = nvme::proto::spec::Cqe {
            cid,
            dw0: 1,
            ..Default::default()
        };
        let mut out = Vec::new();
        nvme::proto::pdu::push_capsule_resp(&mut out, &cqe.encode(), false);
        s.write_all(&out).expect("connect resp");
        // Then nothing: Property Get CAP never gets an answer.
        let mut sink = [0u8; 4096];
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    });
    let t0 = Instant::now();
    let e = attach(
        "NvMute",
        port,
        "nqn.fake",
        json!({"fabrics_connect_timeout_us": 300_000}),
    )
    .unwrap_err();
    assert_eq!(e.0, libc::ETIMEDOUT, "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
}

/// Random reads, writes (1..=300 blocks: some split at MDTS), unmaps and write zeroes on
/// 512-byte blocks from both reactors, each on its own half of the namespace, checked
/// against an in-memory model; then a write zeroes over more than 65536 blocks (two
/// commands: NLB is 16 bits).
#[test]
fn random_ops_match_a_model() {
    let nqn = "nqn.2026-01.io.test:model";
    const NB: u64 = 80_000;
    const B: usize = 512;
    let port = export(nqn, "MallocM", NB, B as u32);
    attach("NvM", port, nqn, json!({"io_queue_size": 16})).expect("attach");
    let half = NB / 2;
    let mut model = vec![0u8; NB as usize * B];
    let mut seed = 99u64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for round in 0..6u64 {
        let mut pending = Vec::new();
        for r in 0..2u32 {
            // Eight disjoint slots of 2048 blocks in this reactor's half.
            let mut ops = Vec::new();
            let mut expect = Vec::new();
            for slot in 0..8u64 {
                let base = u64::from(r) * half + (rnd(2) * 8 + slot) * 2048;
                let len = 1 + rnd(300);
                let lba = base + rnd(2048 - len);
                let (o, s) = (lba as usize * B, len as usize * B);
                match rnd(4) {
                    0 => {
                        let d = pattern(round * 1000 + slot + u64::from(r) * 100, s);
                        model[o..o + s].copy_from_slice(&d);
                        ops.push(Op::Write(lba, d));
                        expect.push(None);
                    }
                    1 => {
                        ops.push(Op::Read(lba, len));
                        expect.push(Some(model[o..o + s].to_vec()));
                    }
                    2 => {
                        model[o..o + s].fill(0);
                        ops.push(Op::Unmap(lba, len));
                        expect.push(None);
                    }
                    _ => {
                        model[o..o + s].fill(0);
                        ops.push(Op::WriteZeroes(lba, len));
                        expect.push(None);
                    }
                }
            }
            pending.push((run_ops_async(r, "NvMn1", ops), expect));
        }
        for (rx, expect) in pending {
            let res = rx.recv_timeout(Duration::from_secs(60)).expect("batch");
            for (i, ((s, d), e)) in res.into_iter().zip(expect).enumerate() {
                assert_eq!(s, IoStatus::Success, "round {round} op {i}");
                if let Some(e) = e {
                    assert!(
                        d.as_deref() == Some(&e[..]),
                        "round {round} op {i}: data differs"
                    );
                }
            }
        }
    }
    // Whole namespace against the model, in 256-block reads from both reactors.
    let reads: Vec<Op> = (0..NB / 256).map(|i| Op::Read(i * 256, 256)).collect();
    let res = run_ops(1, "NvMn1", reads);
    for (i, (s, d)) in res.into_iter().enumerate() {
        assert_eq!(s, IoStatus::Success);
        let o = i * 256 * B;
        assert!(
            d.as_deref() == Some(&model[o..o + 256 * B]),
            "chunk {i} differs"
        );
    }
    let c0 = stat("NvM", "nr_commands");
    model[75_000 * B..75_001 * B].fill(0xAB);
    let res = run_ops(
        0,
        "NvMn1",
        vec![Op::Write(75_000, vec![0xAB; B]), Op::WriteZeroes(0, 70_000)],
    );
    assert!(res.iter().all(|(s, _)| *s == IoStatus::Success));
    let cmds = stat("NvM", "nr_commands") - c0;
    assert!(
        (3..=4).contains(&cmds),
        "{cmds} commands (1 write + 2 write zeroes [+ keep alive])"
    );
    let res = run_ops(
        1,
        "NvMn1",
        vec![
            Op::Read(60_000, 256),
            Op::Read(70_000, 1),
            Op::Read(75_000, 1),
        ],
    );
    assert!(res[0]
        .1
        .as_deref()
        .is_some_and(|d| d.iter().all(|&b| b == 0)));
    for (i, lba) in [(1, 70_000usize), (2, 75_000)] {
        let o = lba * B;
        assert!(
            res[i].1.as_deref() == Some(&model[o..o + B]),
            "block {lba} differs"
        );
    }
    detach("NvM").expect("detach");
}
