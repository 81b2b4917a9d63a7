//! End-to-end: thin pools and thin bdevs through `thind`, driven by SPDK's `spdk-rpc` with the
//! `thin_rpc` plugin; data moved over NVMe/TCP (exported with SPDK's nvmf RPCs) by the small
//! host-side initiator of the nvmf tests. Covers the life cycle (pool, thin bdevs, snapshot,
//! resize, delete), the "data resize" flow (grow the file, rescan, pool grow), the low water
//! mark notification, restart from save_config after SIGTERM and after kill -9 (data flushed
//! before the kill is back), thin_check on the metadata, and bad input.

mod common;
#[path = "../nvmf/tests/common/mod.rs"]
mod nvmf_host;

use std::path::Path;
use std::process::Command;

use common::Thind;
use nvmf_host::{rw, sqe, Host};
use serde_json::{json, Value};

const NQN: &str = "nqn.2016-06.io.spdk:thin";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:thin-e2e-host";
/// 64 KiB data blocks of 4 KiB LBAs.
const LBAS_PER_BLOCK: u64 = 16;

fn thin(t: &Thind, args: &[&str]) -> Value {
    let mut v = vec!["--plugin", "thin_rpc"];
    v.extend_from_slice(args);
    t.rpc(&v)
}

fn thin_fail(t: &Thind, args: &[&str]) -> String {
    let mut v = vec!["--plugin", "thin_rpc"];
    v.extend_from_slice(args);
    t.rpc_fail(&v)
}

fn pool(t: &Thind) -> Value {
    let v = thin(t, &["bdev_thin_pool_get_pools", "-n", "pool0"]);
    v[0].clone()
}

fn thin_info(p: &Value, name: &str) -> Value {
    p["thins"]
        .as_array()
        .expect("thins")
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("thin {name} not in {p}"))
        .clone()
}

fn export(t: &Thind, bdev: &str, port: u16) {
    t.rpc(&["nvmf_create_transport", "-t", "TCP"]);
    t.rpc(&["nvmf_create_subsystem", NQN, "-a", "-s", "THIN0001"]);
    t.rpc(&["nvmf_subsystem_add_ns", NQN, bdev]);
    let port = port.to_string();
    t.rpc(&[
        "nvmf_subsystem_add_listener",
        NQN,
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-s",
        &port,
    ]);
}

/// An admin queue and one I/O queue to the exported namespace.
fn connect(port: u16) -> (Host, Host) {
    let (admin, cntlid) = Host::admin_init(port, NQN, HOSTNQN, 30_000, false);
    let mut io = Host::connect(port, false, false);
    let c = io.fabrics_connect(1, 31, 0, cntlid, NQN, HOSTNQN, 0);
    assert_eq!(c.status, 0, "I/O queue connect");
    (admin, io)
}

fn wait_port_free(port: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "port {port} still bound after 10 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn pattern(block: u64, seed: u8) -> Vec<u8> {
    (0..65536u32)
        .map(|i| (i as u8) ^ (block as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn write_block(io: &mut Host, block: u64, seed: u8) {
    let data = pattern(block, seed);
    let (c, _) = io.cmd(rw(0x01, 1, block * LBAS_PER_BLOCK, 16), &data, false, 0);
    assert_eq!(c.status, 0, "write of block {block}");
}

fn read_block(io: &mut Host, block: u64) -> Vec<u8> {
    let (c, data) = io.cmd(rw(0x02, 1, block * LBAS_PER_BLOCK, 16), &[], false, 65536);
    assert_eq!(c.status, 0, "read of block {block}");
    data
}

fn flush(io: &mut Host) {
    let (c, _) = io.cmd(sqe(0x00, 1), &[], false, 0);
    assert_eq!(c.status, 0, "flush");
}

fn thin_check(meta: &Path) {
    let out = Command::new("thin_check")
        .arg(meta)
        .output()
        .expect("thin_check");
    assert!(
        out.status.success(),
        "thin_check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_thin-meta"))
        .arg("check")
        .arg(meta)
        .output()
        .expect("thin-meta");
    assert!(
        out.status.success(),
        "thin-meta check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn notifications(t: &Thind) -> Vec<(String, String)> {
    t.rpc(&["notify_get_notifications"])
        .as_array()
        .expect("list")
        .iter()
        .map(|n| {
            (
                n["type"].as_str().unwrap_or("").into(),
                n["ctx"].as_str().unwrap_or("").into(),
            )
        })
        .collect()
}

#[test]
fn thin_life_cycle_restart_and_crash_through_spdk_rpc_and_nvme_tcp() {
    if !common::require("spdk-rpc", "SPDK's JSON-RPC client, pip package spdk")
        || !common::require("thin_check", "thin-provisioning-tools")
    {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data.img");
    let meta = dir.path().join("meta.img");
    std::fs::File::create(&data)
        .expect("data")
        .set_len(32 << 20)
        .expect("len");
    std::fs::File::create(&meta)
        .expect("meta")
        .set_len(4 << 20)
        .expect("len");
    let (data_s, meta_s) = (data.to_str().expect("utf8"), meta.to_str().expect("utf8"));

    let mut t = Thind::start(dir.path(), &[]);
    t.rpc(&["bdev_uring_create", data_s, "d0", "4096"]);
    t.rpc(&["bdev_uring_create", meta_s, "m0", "4096"]);
    let created = thin(
        &t,
        &[
            "bdev_thin_pool_create",
            "-n",
            "pool0",
            "-d",
            "d0",
            "-m",
            "m0",
            "-l",
            "500",
        ],
    );
    assert_eq!(created, json!("pool0"));
    let p = pool(&t);
    assert_eq!(p["total_data_blocks"], json!(512), "{p}");
    assert_eq!(p["mode"], json!("rw"));
    let used0 = p["used_data_blocks"].as_u64().expect("used");

    assert_eq!(
        thin(
            &t,
            &["bdev_thin_create", "-p", "pool0", "-n", "thin0", "-s", "16"]
        ),
        json!("thin0")
    );
    let bd = t.rpc(&["bdev_get_bdevs", "-b", "thin0"]);
    assert_eq!(bd[0]["num_blocks"], json!(4096), "{bd}");
    let uuid = bd[0]["uuid"].clone();

    let port = nvmf_host::free_port();
    export(&t, "thin0", port);
    {
        let (_admin, mut io) = connect(port);
        for b in 0..20 {
            write_block(&mut io, b, 1);
        }
        flush(&mut io);
        assert_eq!(read_block(&mut io, 7), pattern(7, 1));
        assert_eq!(
            read_block(&mut io, 100),
            vec![0u8; 65536],
            "unmapped reads zeroes"
        );
        let p = pool(&t);
        assert_eq!(p["used_data_blocks"].as_u64(), Some(used0 + 20), "{p}");
        assert_eq!(thin_info(&p, "thin0")["mapped_blocks"], json!(20));
        assert!(
            notifications(&t).contains(&("thin_pool_low_water_mark".into(), "pool0".into())),
            "low water mark crossed at {} free",
            512 - used0 - 20
        );

        assert_eq!(
            thin(&t, &["bdev_thin_snapshot", "thin0", "snap0"]),
            json!("snap0")
        );
        let p = pool(&t);
        assert_eq!(thin_info(&p, "snap0")["mapped_blocks"], json!(20));
        assert_eq!(
            p["used_data_blocks"].as_u64(),
            Some(used0 + 20),
            "a snapshot copies nothing"
        );
        write_block(&mut io, 0, 2);
        flush(&mut io);
        assert_eq!(read_block(&mut io, 0), pattern(0, 2));
        assert_eq!(
            pool(&t)["used_data_blocks"].as_u64(),
            Some(used0 + 21),
            "sharing broken"
        );
    }

    thin(&t, &["bdev_thin_resize", "thin0", "32"]);
    assert_eq!(
        t.rpc(&["bdev_get_bdevs", "-b", "thin0"])[0]["num_blocks"],
        json!(8192)
    );

    // The "data resize": grow the file, rescan the uring bdev, grow the pool.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .expect("open")
        .set_len(64 << 20)
        .expect("grow");
    t.rpc(&["bdev_uring_rescan", "d0"]);
    thin(&t, &["bdev_thin_pool_grow", "pool0"]);
    assert_eq!(pool(&t)["total_data_blocks"], json!(1024));

    thin(&t, &["bdev_thin_delete", "snap0"]);
    let p = pool(&t);
    assert_eq!(
        p["used_data_blocks"].as_u64(),
        Some(used0 + 20),
        "snapshot's own block freed: {p}"
    );
    assert!(p["thins"]
        .as_array()
        .expect("thins")
        .iter()
        .all(|x| x["name"] != "snap0"));

    thin(
        &t,
        &["bdev_thin_pool_set_transaction_id", "pool0", "0", "7"],
    );
    assert_eq!(pool(&t)["transaction_id"], json!(7));
    thin_fail(
        &t,
        &["bdev_thin_pool_set_transaction_id", "pool0", "0", "8"],
    );
    thin(&t, &["bdev_thin_pool_reserve_metadata_snap", "pool0"]);
    assert!(pool(&t)["held_root"].as_u64().is_some());
    thin(&t, &["bdev_thin_pool_release_metadata_snap", "pool0"]);
    assert_eq!(pool(&t)["held_root"], Value::Null);

    let out = t.rpc_output(&["save_config"]);
    assert!(out.status.success());
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, &out.stdout).expect("config");
    assert_eq!(t.terminate(), Some(0), "SIGTERM exits 0");
    thin_check(&meta);

    // Restart from the saved config: the pool is opened, not reformatted; thin0 comes back by
    // name with its UUID and size, and the export with it.
    let cfg_s = cfg.to_str().expect("utf8");
    let mut t2 = Thind::start(dir.path(), &["--json", cfg_s]);
    let bd = t2.rpc(&["bdev_get_bdevs", "-b", "thin0"]);
    assert_eq!(
        (bd[0]["uuid"].clone(), bd[0]["num_blocks"].clone()),
        (uuid, json!(8192))
    );
    assert_eq!(pool(&t2)["transaction_id"], json!(7));
    {
        let (_admin, mut io) = connect(port);
        assert_eq!(read_block(&mut io, 0), pattern(0, 2));
        for b in 1..20 {
            assert_eq!(
                read_block(&mut io, b),
                pattern(b, 1),
                "block {b} after restart"
            );
        }
        for b in 30..34 {
            write_block(&mut io, b, 3);
        }
        flush(&mut io);
    }
    t2.kill9();
    // A killed process's io_uring is torn down asynchronously by the kernel, and an accept or
    // poll still queued on it keeps the listening socket alive for a moment.
    wait_port_free(port);

    let t3 = Thind::start(dir.path(), &["--json", cfg_s]);
    {
        let (_admin, mut io) = connect(port);
        for b in 30..34 {
            assert_eq!(
                read_block(&mut io, b),
                pattern(b, 3),
                "flushed block {b} after kill -9"
            );
        }
    }
    drop(t3);
    thin_check(&meta);
}

#[test]
fn thin_bad_input_gets_clear_errors() {
    if !common::require("spdk-rpc", "SPDK's JSON-RPC client, pip package spdk") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Thind::start(dir.path(), &[]);
    t.rpc(&["bdev_malloc_create", "-b", "d0", "16", "4096"]);
    t.rpc(&["bdev_malloc_create", "-b", "m0", "4", "4096"]);
    t.rpc(&["bdev_malloc_create", "-b", "m1", "4", "4096"]);
    let e = thin_fail(
        &t,
        &[
            "bdev_thin_pool_create",
            "-n",
            "p",
            "-d",
            "d0",
            "-m",
            "m0",
            "-b",
            "100000",
        ],
    );
    assert!(e.contains("65536") || e.contains("64 KiB"), "{e}");
    thin(
        &t,
        &["bdev_thin_pool_create", "-n", "p", "-d", "d0", "-m", "m0"],
    );
    let e = thin_fail(
        &t,
        &["bdev_thin_pool_create", "-n", "q", "-d", "d0", "-m", "m1"],
    );
    assert!(e.contains("claimed"), "{e}");
    let e = thin_fail(
        &t,
        &["bdev_thin_pool_create", "-n", "p", "-d", "m1", "-m", "m1"],
    );
    assert!(
        e.contains("-17") || e.contains("exist") || e.contains("differ") || e.contains("same"),
        "{e}"
    );
    thin(&t, &["bdev_thin_create", "-p", "p", "-n", "t0", "-s", "4"]);
    let e = thin_fail(&t, &["bdev_thin_create", "-p", "p", "-n", "t0", "-s", "4"]);
    assert!(e.contains("-17") || e.contains("exists"), "{e}");
    let e = thin_fail(
        &t,
        &["bdev_thin_create", "-p", "nope", "-n", "t1", "-s", "4"],
    );
    assert!(e.contains("-19") || e.contains("nope"), "{e}");
    let e = thin_fail(&t, &["bdev_thin_snapshot", "nope", "s"]);
    assert!(e.contains("-19") || e.contains("nope"), "{e}");
    let e = thin_fail(&t, &["bdev_thin_delete", "nope"]);
    assert!(e.contains("-19") || e.contains("nope"), "{e}");
    let mut raw = common::Raw::connect(&t.sock);
    let r = raw.call(
        "bdev_thin_create",
        json!({"pool": "p", "name": "x", "size_in_mib": "big"}),
    );
    assert_eq!(r["error"]["code"], json!(-32602), "{r}");
    let r = raw.call(
        "bdev_thin_create",
        json!({"pool": "p", "name": "x", "size_in_mib": 1, "color": 1}),
    );
    assert_eq!(r["error"]["code"], json!(-32602), "{r}");
    let r = raw.call("bdev_thin_pool_get_pools", json!({}));
    assert_eq!(r["result"][0]["name"], json!("p"), "{r}");
}

/// A thin pool whose data device is another thind's namespace over NVMe/TCP (our initiator,
/// attached with SPDK's `bdev_nvme_attach_controller`): data written through the pool's own
/// NVMe/TCP export reads back after a restart from save_config, which attaches the remote
/// controller before it opens the pool.
#[test]
fn thin_pool_on_a_remote_namespace_through_spdk_rpc() {
    if !common::require("spdk-rpc", "SPDK's JSON-RPC client, pip package spdk")
        || !common::require("thin_check", "thin-provisioning-tools")
    {
        return;
    }
    const REMOTE_NQN: &str = "nqn.2016-06.io.spdk:remote-data";
    let remote_dir = tempfile::tempdir().expect("tempdir");
    let dir = tempfile::tempdir().expect("tempdir");

    // The remote side: a malloc bdev exported over NVMe/TCP.
    let remote = Thind::start(remote_dir.path(), &[]);
    remote.rpc(&["bdev_malloc_create", "-b", "Remote0", "32", "4096"]);
    remote.rpc(&["nvmf_create_transport", "-t", "TCP"]);
    remote.rpc(&["nvmf_create_subsystem", REMOTE_NQN, "-a", "-s", "REMOTE01"]);
    remote.rpc(&["nvmf_subsystem_add_ns", REMOTE_NQN, "Remote0"]);
    let remote_port = nvmf_host::free_port().to_string();
    remote.rpc(&[
        "nvmf_subsystem_add_listener",
        REMOTE_NQN,
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-s",
        &remote_port,
    ]);

    // The pool side.
    let meta = dir.path().join("meta.img");
    std::fs::File::create(&meta)
        .expect("meta")
        .set_len(4 << 20)
        .expect("len");
    let meta_s = meta.to_str().expect("utf8");
    let mut t = Thind::start(dir.path(), &[]);
    let attached = t.rpc(&[
        "bdev_nvme_attach_controller",
        "-b",
        "Nvme0",
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-f",
        "ipv4",
        "-s",
        &remote_port,
        "-n",
        REMOTE_NQN,
    ]);
    // spdk-rpc prints the returned list of bdev names one per line.
    assert_eq!(attached, json!("Nvme0n1"));
    let bd = t.rpc(&["bdev_get_bdevs", "-b", "Nvme0n1"]);
    assert_eq!(
        (bd[0]["num_blocks"].clone(), bd[0]["block_size"].clone()),
        (json!(8192), json!(4096)),
        "{bd}"
    );
    let ctrlrs = t.rpc(&["bdev_nvme_get_controllers", "-n", "Nvme0"]);
    assert_eq!(ctrlrs[0]["name"], json!("Nvme0"), "{ctrlrs}");
    t.rpc(&["bdev_uring_create", meta_s, "m0", "4096"]);
    thin(
        &t,
        &[
            "bdev_thin_pool_create",
            "-n",
            "pool0",
            "-d",
            "Nvme0n1",
            "-m",
            "m0",
        ],
    );
    thin(
        &t,
        &["bdev_thin_create", "-p", "pool0", "-n", "thin0", "-s", "16"],
    );
    let port = nvmf_host::free_port();
    export(&t, "thin0", port);
    {
        let (_admin, mut io) = connect(port);
        for b in 0..8 {
            write_block(&mut io, b, 5);
        }
        flush(&mut io);
        for b in 0..8 {
            assert_eq!(read_block(&mut io, b), pattern(b, 5), "block {b}");
        }
    }
    assert_eq!(thin_info(&pool(&t), "thin0")["mapped_blocks"], json!(8));

    // save_config attaches the controller before the pool; restart from it.
    let out = t.rpc_output(&["save_config"]);
    assert!(out.status.success());
    let cfg_text = String::from_utf8_lossy(&out.stdout).into_owned();
    let attach_at = cfg_text
        .find("bdev_nvme_attach_controller")
        .expect("attach saved");
    let pool_at = cfg_text.find("bdev_thin_pool_create").expect("pool saved");
    assert!(
        attach_at < pool_at,
        "controller saved after the pool:\n{cfg_text}"
    );
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, &out.stdout).expect("config");
    assert_eq!(t.terminate(), Some(0), "SIGTERM exits 0");
    thin_check(&meta);
    wait_port_free(port);

    let t2 = Thind::start(dir.path(), &["--json", cfg.to_str().expect("utf8")]);
    assert_eq!(thin_info(&pool(&t2), "thin0")["mapped_blocks"], json!(8));
    {
        let (_admin, mut io) = connect(port);
        for b in 0..8 {
            assert_eq!(
                read_block(&mut io, b),
                pattern(b, 5),
                "block {b} after restart"
            );
        }
        // Unmapped blocks read zeroes without touching the remote namespace.
        assert_eq!(read_block(&mut io, 9), vec![0u8; 65536]);
    }
    // Close the pool, then detach: the namespace bdev goes away with its controller.
    thin(&t2, &["bdev_thin_pool_delete", "pool0"]);
    t2.rpc(&["bdev_nvme_detach_controller", "Nvme0"]);
    let left = t2.rpc(&["bdev_get_bdevs"]);
    assert!(
        !left.to_string().contains("Nvme0n1"),
        "Nvme0n1 still registered: {left}"
    );
    drop(remote);
}
