//! Thin pool and thin bdevs on real reactors (interrupt mode): model-based random I/O with
//! snapshots, deletes, resizes across reactors; persistence of thin bdevs by name; flush
//! durability; out of space; metadata failures. After each test the metadata image passes
//! pdata's checker (and /usr/sbin/thin_check when installed).

mod common;
#[path = "support/thin_model.rs"]
mod thin_model;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bdev::thin;
use bdev::{BdevDesc, IoStatus, IoType};
use common::{ok, open, Req, Rt};
use pdata::testing::Rng;
use thin_model::{check_metadata, flush, malloc, pool_opts, run_model, write, BS, DBS};

#[test]
fn thin_model_random_io_across_reactors() {
    let rt = Rt::start(2, true);
    malloc("tm_data", 32 << 20, 512);
    malloc("tm_meta", 4 << 20, 4096);
    run_model(&rt, "tm_data", "tm_meta");
}

#[test]
fn thin_reopen_mismatching_block_size_is_refused() {
    let rt = Rt::start(1, true);
    thin::set_runtime(rt.h.clone());
    malloc("bs_data", 8 << 20, 4096);
    malloc("bs_meta", 1 << 20, 4096);
    thin::create_pool_blocking(pool_opts("bs_pool", "bs_data", "bs_meta")).unwrap();
    thin::delete_pool_blocking("bs_pool").unwrap();
    let mut o = pool_opts("bs_pool", "bs_data", "bs_meta");
    o.data_block_size = 128 * 1024;
    let e = thin::create_pool_blocking(o).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    assert!(e.to_string().contains("data block size"), "{e}");
    let mut o = pool_opts("bs_pool2", "bs_data", "bs_meta");
    o.data_block_size = 100 * 1024;
    assert_eq!(
        thin::create_pool_blocking(o).unwrap_err().errno(),
        libc::EINVAL
    );
    check_metadata(&rt, "bs_meta");
}

#[test]
fn thin_out_of_space_error_and_wait_for_grow() {
    let rt = Rt::start(2, true);
    thin::set_runtime(rt.h.clone());
    let events = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let ev = events.clone();
    thin::subscribe(move |k, p| ev.lock().unwrap().push((k.to_string(), p.to_string())));
    // error_if_no_space: 8 data blocks, one holds the label table.
    malloc("os_data", 8 * DBS, 4096);
    malloc("os_meta", 1 << 20, 4096);
    let mut o = pool_opts("os_pool", "os_data", "os_meta");
    o.error_if_no_space = true;
    o.low_water_mark = 3;
    thin::create_pool_blocking(o).unwrap();
    thin::create_thin_blocking("os_pool", "os_thin", 1 << 20, 4096, None).unwrap();
    let d = open("os_thin");
    let bpd = DBS / BS;
    for vb in 0..7 {
        assert_eq!(
            write(&rt, 1, &d, vb * bpd, vec![7; BS as usize]),
            IoStatus::Success
        );
    }
    assert_eq!(
        write(&rt, 0, &d, 7 * bpd, vec![7; BS as usize]),
        IoStatus::Failed(libc::ENOSPC)
    );
    // Mapped blocks stay writable.
    assert_eq!(
        write(&rt, 0, &d, 1, vec![9; BS as usize]),
        IoStatus::Success
    );
    let st = thin::pool_status_blocking("os_pool").unwrap();
    assert_eq!(st["mode"], "out_of_data_space");
    {
        let e = events.lock().unwrap();
        assert!(
            e.contains(&("thin_pool_low_water_mark".into(), "os_pool".into())),
            "{e:?}"
        );
        assert!(e.contains(&("thin_pool_out_of_data_space".into(), "os_pool".into())));
    }
    drop(d);
    thin::delete_pool_blocking("os_pool").unwrap();
    check_metadata(&rt, "os_meta");

    // queue_if_no_space: a write waits, then completes after the data bdev grows.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    std::fs::write(&path, vec![0u8; (4 * DBS) as usize]).unwrap();
    bdev::uring::create(bdev::uring::UringOpts {
        name: "ow_data".into(),
        filename: path.to_str().unwrap().into(),
        block_size: Some(4096),
        uuid: None,
    })
    .unwrap();
    malloc("ow_meta", 1 << 20, 4096);
    thin::create_pool_blocking(pool_opts("ow_pool", "ow_data", "ow_meta")).unwrap();
    thin::create_thin_blocking("ow_pool", "ow_thin", 1 << 20, 4096, None).unwrap();
    let d = open("ow_thin");
    for vb in 0..3 {
        assert_eq!(
            write(&rt, 0, &d, vb * bpd, vec![1; BS as usize]),
            IoStatus::Success
        );
    }
    let rx = rt.submit(1, &d, Req::Write(3 * bpd, vec![5; BS as usize]));
    assert!(
        rx.recv_timeout(Duration::from_millis(400)).is_err(),
        "write did not wait"
    );
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(8 * DBS).unwrap();
    let rescan = bdev::rpc_methods()
        .into_iter()
        .find(|(m, _)| *m == "bdev_uring_rescan")
        .unwrap()
        .1;
    rescan(serde_json::json!({"name": "ow_data"})).unwrap();
    assert_eq!(thin::grow_pool_blocking("ow_pool").unwrap(), 8);
    let (status, _, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(status, IoStatus::Success);
    let got = ok(rt.io(0, &d, Req::Read(3 * bpd, 1)));
    assert_eq!(got, vec![5; BS as usize]);
    assert_eq!(thin::pool_status_blocking("ow_pool").unwrap()["mode"], "rw");
    drop(d);
    thin::delete_pool_blocking("ow_pool").unwrap();
    check_metadata(&rt, "ow_meta");
}

#[test]
fn thin_metadata_io_error_goes_read_only() {
    let rt = Rt::start(2, true);
    thin::set_runtime(rt.h.clone());
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let ev = events.clone();
    thin::subscribe(move |k, p| {
        if p == "fe_pool" {
            ev.lock().unwrap().push(k.to_string())
        }
    });
    malloc("fe_data", 4 << 20, 4096);
    malloc("fe_meta_base", 1 << 20, 4096);
    let fault = bdev::testing::fault::create("fe_meta", "fe_meta_base").unwrap();
    thin::create_pool_blocking(pool_opts("fe_pool", "fe_data", "fe_meta")).unwrap();
    thin::create_thin_blocking("fe_pool", "fe_thin", 1 << 20, 4096, None).unwrap();
    let d = open("fe_thin");
    let committed = vec![0x5a; DBS as usize];
    assert_eq!(write(&rt, 0, &d, 0, committed.clone()), IoStatus::Success);
    flush(&rt, 1, &d);
    fault.config().set_error_ppm(IoType::Write, 1_000_000);
    assert_eq!(
        write(&rt, 1, &d, DBS / BS, vec![1; BS as usize]),
        IoStatus::Success
    );
    let r = rt.io(0, &d, Req::Flush(0, 0)).unwrap().0;
    assert_eq!(r, IoStatus::Failed(libc::EIO));
    let st = thin::pool_status_blocking("fe_pool").unwrap();
    assert_eq!(st["mode"], "ro");
    assert_eq!(st["needs_check"], true);
    assert!(events
        .lock()
        .unwrap()
        .contains(&"thin_pool_read_only".to_string()));
    // Committed data reads back; the rolled-back block reads as zeroes; allocation fails.
    assert_eq!(ok(rt.io(1, &d, Req::Read(0, DBS / BS))), committed);
    assert_eq!(
        ok(rt.io(1, &d, Req::Read(DBS / BS, 1))),
        vec![0; BS as usize]
    );
    assert_eq!(
        write(&rt, 0, &d, 2 * DBS / BS, vec![1; BS as usize]),
        IoStatus::Failed(libc::EIO)
    );
    fault.config().set_error_ppm(IoType::Write, 0);
    drop(d);
    thin::delete_pool_blocking("fe_pool").unwrap();
    check_metadata(&rt, "fe_meta_base");
}

/// Calls an async thin RPC and waits for its single completion.
fn rpc(method: &str, params: serde_json::Value) -> Result<serde_json::Value, bdev::BdevError> {
    let f = thin::rpc_methods()
        .into_iter()
        .find(|(m, _)| *m == method)
        .unwrap_or_else(|| panic!("no method {method}"))
        .1;
    let (tx, rx) = std::sync::mpsc::channel();
    f(
        params,
        Box::new(move |r| {
            tx.send(r).unwrap();
        }),
    );
    let r = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(
        rx.recv_timeout(Duration::from_millis(20)).is_err(),
        "done called twice"
    );
    r
}

#[test]
fn thin_rpc_methods_status_metadata_snap_resize_delete() {
    use serde_json::json;
    let rt = Rt::start(2, true);
    thin::set_runtime(rt.h.clone());
    malloc("rp_data", 16 << 20, 4096);
    malloc("rp_meta", 2 << 20, 4096);
    let e = rpc(
        "bdev_thin_pool_create",
        json!({"name": "rp_pool", "data_bdev": "rp_data",
        "metadata_bdev": "rp_meta", "bogus": 1}),
    )
    .unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    let name = rpc(
        "bdev_thin_pool_create",
        json!({"name": "rp_pool", "data_bdev": "rp_data", "metadata_bdev": "rp_meta",
               "data_block_size": 65536, "low_water_mark": 10, "zero_new_blocks": true,
               "discard_passdown": true, "error_if_no_space": false, "commit_interval_ms": 100}),
    )
    .unwrap();
    assert_eq!(name, json!("rp_pool"));
    let cfg = bdev::registry().config_json();
    assert!(cfg
        .iter()
        .any(|c| c["method"] == "bdev_thin_pool_create" && c["params"]["low_water_mark"] == 10));
    assert_eq!(
        rpc(
            "bdev_thin_create",
            json!({"pool": "rp_pool", "name": "rp_a", "size_in_mib": 2})
        )
        .unwrap(),
        json!("rp_a")
    );
    let e = rpc(
        "bdev_thin_create",
        json!({"pool": "rp_pool", "name": "rp_a", "size_in_mib": 2}),
    )
    .unwrap_err();
    assert_eq!(e.errno(), libc::EEXIST);
    let e = rpc(
        "bdev_thin_create",
        json!({"pool": "rp_pool", "name": "rp_x", "size_in_mib": 1, "thin_id": 16777215}),
    )
    .unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    let a = open("rp_a");
    assert_eq!(
        write(&rt, 1, &a, 0, vec![3; DBS as usize * 2]),
        IoStatus::Success
    );
    rpc(
        "bdev_thin_snapshot",
        json!({"thin_name": "rp_a", "snapshot_name": "rp_b"}),
    )
    .unwrap();
    let snap = rpc(
        "bdev_thin_pool_reserve_metadata_snap",
        json!({"name": "rp_pool"}),
    )
    .unwrap();
    let pools = rpc("bdev_thin_pool_get_pools", json!({"name": "rp_pool"})).unwrap();
    let p = &pools[0];
    assert_eq!(p["held_root"], snap);
    assert_eq!(p["mode"], "rw");
    assert_eq!(p["needs_check"], false);
    assert_eq!(p["data_block_size"], 65536);
    assert_eq!(p["total_data_blocks"], 256);
    // Two blocks of rp_a (shared with rp_b) plus the label block.
    assert_eq!(p["used_data_blocks"], 3);
    let thins = p["thins"].as_array().unwrap();
    assert_eq!(thins.len(), 2);
    assert!(thins
        .iter()
        .all(|t| t["mapped_blocks"] == 2 && t["num_blocks"] == 512));
    // Writes after the snapshot break sharing; the held metadata snapshot stays valid.
    assert_eq!(
        write(&rt, 0, &a, 0, vec![4; BS as usize]),
        IoStatus::Success
    );
    let b = open("rp_b");
    assert_eq!(ok(rt.io(0, &b, Req::Read(0, 1))), vec![3; BS as usize]);
    assert_eq!(ok(rt.io(1, &a, Req::Read(1, 1))), vec![3; BS as usize]);
    flush(&rt, 0, &a);
    check_metadata(&rt, "rp_meta");
    rpc(
        "bdev_thin_pool_release_metadata_snap",
        json!({"name": "rp_pool"}),
    )
    .unwrap();
    let e = rpc(
        "bdev_thin_pool_release_metadata_snap",
        json!({"name": "rp_pool"}),
    )
    .unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    let e = rpc(
        "bdev_thin_pool_set_transaction_id",
        json!({"name": "rp_pool", "old_id": 5, "new_id": 6}),
    )
    .unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    rpc(
        "bdev_thin_pool_set_transaction_id",
        json!({"name": "rp_pool", "old_id": 0, "new_id": 7}),
    )
    .unwrap();
    // Shrinking an open bdev is refused; closed, it unmaps past the new end.
    let e = rpc(
        "bdev_thin_resize",
        json!({"name": "rp_b", "size_in_mib": 1}),
    )
    .unwrap_err();
    assert_eq!(e.errno(), libc::EBUSY);
    drop(b);
    rpc(
        "bdev_thin_resize",
        json!({"name": "rp_a", "size_in_mib": 4}),
    )
    .unwrap();
    drop(a);
    rpc(
        "bdev_thin_resize",
        json!({"name": "rp_a", "size_in_mib": 1}),
    )
    .unwrap();
    rpc("bdev_thin_delete", json!({"name": "rp_b"})).unwrap();
    assert!(bdev::registry().lookup("rp_b").is_none());
    let p = &rpc("bdev_thin_pool_get_pools", json!({})).unwrap()[0];
    assert_eq!(p["transaction_id"], 7);
    assert_eq!(p["held_root"], serde_json::Value::Null);
    assert_eq!(p["thins"][0]["num_blocks"], 256);
    assert_eq!(p["thins"][0]["mapped_blocks"], 2);
    rpc("bdev_thin_pool_delete", json!({"name": "rp_pool"})).unwrap();
    check_metadata(&rt, "rp_meta");
    // Reopen: the thin bdev comes back with its new size and the transaction id.
    rpc(
        "bdev_thin_pool_create",
        json!({"name": "rp_pool", "data_bdev": "rp_data",
        "metadata_bdev": "rp_meta"}),
    )
    .unwrap();
    let t = bdev::registry().lookup("rp_a").unwrap();
    assert_eq!(t.num_blocks(), 256);
    let p = &rpc("bdev_thin_pool_get_pools", json!({"name": "rp_pool"})).unwrap()[0];
    assert_eq!(p["transaction_id"], 7);
    rpc("bdev_thin_delete", json!({"name": "rp_a"})).unwrap();
    let p = &rpc("bdev_thin_pool_get_pools", json!({"name": "rp_pool"})).unwrap()[0];
    assert_eq!(p["used_data_blocks"], 1);
    rpc("bdev_thin_pool_delete", json!({"name": "rp_pool"})).unwrap();
    check_metadata(&rt, "rp_meta");
}

#[test]
fn thin_flush_commits_once_and_clean_flush_writes_no_metadata() {
    let rt = Rt::start(2, true);
    thin::set_runtime(rt.h.clone());
    malloc("fl_data", 16 << 20, 4096);
    malloc("fl_meta_base", 1 << 20, 4096);
    let meta = bdev::testing::record::create("fl_meta", "fl_meta_base", None).unwrap();
    let mut o = pool_opts("fl_pool", "fl_data", "fl_meta");
    o.commit_interval_ms = 3_600_000;
    thin::create_pool_blocking(o).unwrap();
    thin::create_thin_blocking("fl_pool", "fl_thin", 1 << 20, 4096, None).unwrap();
    let d = open("fl_thin");
    assert_eq!(
        write(&rt, 1, &d, 0, vec![1; BS as usize]),
        IoStatus::Success
    );
    let before = meta.log_len();
    // Many concurrent flushes from both reactors: at most a couple of commits.
    let rxs: Vec<_> = (0..16)
        .map(|i| rt.submit(i % 2, &d, Req::Flush(0, 0)))
        .collect();
    for rx in rxs {
        let (st, _, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(st, IoStatus::Success);
    }
    let commits = meta
        .flush_indices()
        .iter()
        .filter(|&&i| i >= before)
        .count();
    assert!(
        (2..=4).contains(&commits),
        "{commits} metadata flushes for one dirty write"
    );
    let after = meta.log_len();
    flush(&rt, 0, &d);
    flush(&rt, 1, &d);
    assert_eq!(meta.log_len(), after, "a clean flush wrote metadata");
    drop(d);
    thin::delete_pool_blocking("fl_pool").unwrap();
    check_metadata(&rt, "fl_meta");
}

#[test]
fn thin_waiting_write_fails_enospc_after_timeout() {
    let rt = Rt::start(1, true);
    thin::set_runtime(rt.h.clone());
    malloc("nt_data", 2 * DBS, 4096);
    malloc("nt_meta", 1 << 20, 4096);
    let mut o = pool_opts("nt_pool", "nt_data", "nt_meta");
    o.no_space_timeout = Duration::from_millis(300);
    thin::create_pool_blocking(o).unwrap();
    thin::create_thin_blocking("nt_pool", "nt_thin", 1 << 20, 4096, None).unwrap();
    let d = open("nt_thin");
    assert_eq!(
        write(&rt, 0, &d, 0, vec![1; BS as usize]),
        IoStatus::Success
    );
    let t0 = std::time::Instant::now();
    assert_eq!(
        write(&rt, 0, &d, DBS / BS, vec![1; BS as usize]),
        IoStatus::Failed(libc::ENOSPC)
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "did not wait for space"
    );
    drop(d);
    thin::delete_pool_blocking("nt_pool").unwrap();
    check_metadata(&rt, "nt_meta");
}

#[test]
fn thin_snapshot_while_writes_run_and_512_byte_blocks() {
    let rt = Rt::start(2, true);
    thin::set_runtime(rt.h.clone());
    malloc("sw_data", 32 << 20, 512);
    malloc("sw_meta", 2 << 20, 4096);
    thin::create_pool_blocking(pool_opts("sw_pool", "sw_data", "sw_meta")).unwrap();
    thin::create_thin_blocking("sw_pool", "sw_o", 4 << 20, 512, None).unwrap();
    let o = open("sw_o");
    let bs = 512u64;
    let nr = 64u64; // 64 I/Os of 8 KiB spread over 4 MiB
    let stride = (4 << 20) / bs / nr;
    for i in 0..nr {
        assert_eq!(
            rt.io(
                (i % 2) as usize,
                &o,
                Req::Write(i * stride + 3, vec![0xaa; 8192])
            )
            .unwrap()
            .0,
            IoStatus::Success
        );
    }
    // Second generation in flight from both reactors while the snapshot is taken.
    let rxs: Vec<_> = (0..nr)
        .map(|i| {
            rt.submit(
                (i % 2) as usize,
                &o,
                Req::Write(i * stride + 3, vec![0xbb; 8192]),
            )
        })
        .collect();
    thin::snapshot_blocking("sw_o", "sw_s").unwrap();
    for rx in rxs {
        let (st, _, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(st, IoStatus::Success);
    }
    let s = open("sw_s");
    for i in 0..nr {
        let off = i * stride + 3;
        let got_o = ok(rt.io(0, &o, Req::Read(off, 16)));
        assert_eq!(got_o, vec![0xbb; 8192], "origin I/O {i}");
        let got_s = ok(rt.io(1, &s, Req::Read(off, 16)));
        let first = got_s[0];
        assert!(
            first == 0xaa || first == 0xbb,
            "snapshot I/O {i}: {first:#x}"
        );
        assert!(
            got_s.iter().all(|b| *b == first),
            "snapshot I/O {i} is torn"
        );
        // The sector before each write stays zero on both sides.
        assert_eq!(ok(rt.io(1, &s, Req::Read(off - 1, 1))), vec![0; 512]);
    }
    // Writes to the snapshot break sharing without touching the origin.
    assert_eq!(
        rt.io(1, &s, Req::Write(3, vec![0xcc; 512])).unwrap().0,
        IoStatus::Success
    );
    assert_eq!(ok(rt.io(0, &o, Req::Read(3, 1))), vec![0xbb; 512]);
    assert_eq!(ok(rt.io(0, &s, Req::Read(3, 1))), vec![0xcc; 512]);
    assert_eq!(
        ok(rt.io(0, &s, Req::Read(4, 1))),
        ok(rt.io(1, &s, Req::Read(4, 1)))
    );
    drop((o, s));
    thin::delete_pool_blocking("sw_pool").unwrap();
    check_metadata(&rt, "sw_meta");
}

#[test]
fn thin_metadata_space_exhaustion_goes_read_only() {
    let rt = Rt::start(1, true);
    thin::set_runtime(rt.h.clone());
    malloc("ms_data", 64 << 20, 4096);
    malloc("ms_meta", 20 * 4096, 4096);
    thin::create_pool_blocking(pool_opts("ms_pool", "ms_data", "ms_meta")).unwrap();
    thin::create_thin_blocking("ms_pool", "ms_thin", 64 << 20, 4096, None).unwrap();
    let d = open("ms_thin");
    let bpd = DBS / BS;
    let mut failed_at = None;
    let mut last_flushed = 0;
    for vb in 0..1000 {
        match write(&rt, 0, &d, vb * bpd, vec![vb as u8; BS as usize]) {
            IoStatus::Success => {}
            IoStatus::Failed(e) => {
                assert_eq!(e, libc::EIO, "block {vb}");
                failed_at = Some(vb);
                break;
            }
            other => panic!("{other:?}"),
        }
        if vb % 50 == 49 {
            if rt.io(0, &d, Req::Flush(0, 0)).unwrap().0 != IoStatus::Success {
                failed_at = Some(vb);
                break;
            }
            last_flushed = vb + 1;
        }
    }
    assert!(failed_at.is_some(), "20 metadata blocks held 1000 mappings");
    let st = thin::pool_status_blocking("ms_pool").unwrap();
    assert_eq!(st["mode"], "ro");
    assert_eq!(st["needs_check"], true);
    // Everything flushed before the failure is still readable.
    for vb in 0..last_flushed {
        assert_eq!(
            ok(rt.io(0, &d, Req::Read(vb * bpd, 1))),
            vec![vb as u8; BS as usize]
        );
    }
    drop(d);
    thin::delete_pool_blocking("ms_pool").unwrap();
    check_metadata(&rt, "ms_meta");
}

/// Cold caches: after a reopen, batches of concurrent writes, whole-block unmaps and reads
/// from both reactors (many misses in one lookup window at once, writes next to unmaps of
/// neighbouring blocks) match a model, including after a snapshot and a second reopen.
#[test]
fn thin_cold_cache_concurrent_io_matches_model() {
    let rt = Rt::start(2, true);
    thin::set_runtime(rt.h.clone());
    malloc("cc_data", 64 << 20, 4096);
    malloc("cc_meta", 4 << 20, 4096);
    thin::create_pool_blocking(pool_opts("cc_pool", "cc_data", "cc_meta")).unwrap();
    let size: u64 = 16 << 20; // 256 data blocks: one lookup window
    thin::create_thin_blocking("cc_pool", "cc_thin", size, 4096, None).unwrap();
    let seed = Rng::seed_from_env("THIN_SEED");
    let mut rng = Rng::new(seed);
    let bpd = DBS / BS;
    let nblocks = size / BS;
    let mut model = vec![0u8; size as usize];
    // Map about half of the data blocks.
    let d = open("cc_thin");
    for vb in 0..size / DBS {
        if rng.chance(1, 2) {
            let data: Vec<u8> = (0..BS).map(|_| rng.below(256) as u8).collect();
            let off = vb * bpd + rng.below(bpd);
            assert_eq!(write(&rt, 0, &d, off, data.clone()), IoStatus::Success);
            model[(off * BS) as usize..((off + 1) * BS) as usize].copy_from_slice(&data);
        }
    }
    drop(d);
    let mut names = vec!["cc_thin".to_string()];
    let mut models = vec![model];
    for round in 0..3 {
        // Reopen: every shard cache starts cold.
        thin::delete_pool_blocking("cc_pool").unwrap();
        thin::create_pool_blocking(pool_opts("cc_pool", "cc_data", "cc_meta")).unwrap();
        if round == 1 {
            thin::snapshot_blocking("cc_thin", "cc_snap").unwrap();
            names.push("cc_snap".into());
            models.push(models[0].clone());
        }
        let descs: Vec<Arc<BdevDesc>> = names.iter().map(|n| open(n)).collect();
        for batch in 0..12 {
            let i = rng.below(names.len() as u64) as usize;
            let (d, m) = (&descs[i], &mut models[i]);
            // Distinct 4 KiB blocks to write, distinct other data blocks to unmap.
            let mut used = std::collections::BTreeSet::new();
            let mut rxs = Vec::new();
            for _ in 0..48 {
                let off = rng.below(nblocks);
                if !used.insert(off / bpd) {
                    continue;
                }
                let r = rng.below(2) as usize;
                if rng.chance(1, 8) {
                    let vb = off / bpd;
                    rxs.push(rt.submit(r, d, Req::Unmap(vb * bpd, bpd)));
                    m[(vb * DBS) as usize..((vb + 1) * DBS) as usize].fill(0);
                } else {
                    let data: Vec<u8> = (0..BS).map(|_| rng.below(256) as u8).collect();
                    m[(off * BS) as usize..((off + 1) * BS) as usize].copy_from_slice(&data);
                    rxs.push(rt.submit(r, d, Req::Write(off, data)));
                }
            }
            for rx in rxs {
                let (st, _, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
                assert_eq!(
                    st,
                    IoStatus::Success,
                    "seed {seed} round {round} batch {batch}"
                );
            }
            let reads: Vec<_> = (0..32)
                .map(|_| {
                    let off = rng.below(nblocks);
                    (off, rt.submit(rng.below(2) as usize, d, Req::Read(off, 1)))
                })
                .collect();
            for (off, rx) in reads {
                let got = ok(rx.recv_timeout(Duration::from_secs(10)).unwrap());
                let want = &m[(off * BS) as usize..((off + 1) * BS) as usize];
                assert!(
                    got == want,
                    "seed {seed} round {round} batch {batch}: {} block {off} differs",
                    names[i]
                );
            }
        }
        for (i, d) in descs.iter().enumerate() {
            let got = ok(rt.io(1, d, Req::Read(0, nblocks)));
            assert!(
                got == models[i],
                "seed {seed} round {round}: {} differs",
                names[i]
            );
        }
    }
    thin::delete_pool_blocking("cc_pool").unwrap();
    check_metadata(&rt, "cc_meta");
}
