//! End-to-end: `thind` driven by SPDK's own `spdk-rpc` (PyPI package `spdk`), unchanged.
//! Base bdevs, notifications, save_config/--json restart, signals, socket ownership, the
//! `--wait-for-rpc` state machine and bad input on the raw socket.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Raw, Thind};
use serde_json::{json, Value};

fn bdev_names(t: &Thind) -> Vec<String> {
    let v = t.rpc(&["bdev_get_bdevs"]);
    let mut names: Vec<String> = v
        .as_array()
        .expect("bdev list")
        .iter()
        .map(|b| b["name"].as_str().expect("name").to_owned())
        .collect();
    names.sort();
    names
}

fn num_blocks(t: &Thind, name: &str) -> u64 {
    let v = t.rpc(&["bdev_get_bdevs", "-b", name]);
    v[0]["num_blocks"].as_u64().expect("num_blocks")
}

#[test]
fn base_bdev_life_cycle_with_spdk_rpc() {
    if !common::require("spdk-rpc", "SPDK's JSON-RPC client, pip package spdk") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Thind::start(dir.path(), &[]);

    let v = t.rpc(&["spdk_get_version"]);
    assert!(
        v["version"]
            .as_str()
            .expect("version")
            .starts_with("thinbdev"),
        "{v}"
    );
    let methods = t.rpc(&["rpc_get_methods"]);
    for m in [
        "bdev_malloc_create",
        "bdev_null_resize",
        "bdev_uring_rescan",
        "bdev_get_iostat",
        "notify_get_notifications",
        "framework_get_reactors",
        "save_config",
    ] {
        assert!(
            methods.as_array().expect("list").contains(&json!(m)),
            "missing {m}"
        );
    }

    assert_eq!(
        t.rpc(&["bdev_malloc_create", "-b", "Malloc0", "16", "4096"]),
        json!("Malloc0")
    );
    assert_eq!(
        t.rpc(&["bdev_null_create", "Null0", "64", "512"]),
        json!("Null0")
    );
    let file = dir.path().join("data.img");
    std::fs::File::create(&file)
        .expect("create")
        .set_len(8 << 20)
        .expect("len");
    let fname = file.to_str().expect("utf8");
    assert_eq!(
        t.rpc(&["bdev_uring_create", fname, "Uring0", "4096"]),
        json!("Uring0")
    );
    assert_eq!(bdev_names(&t), ["Malloc0", "Null0", "Uring0"]);
    assert_eq!(num_blocks(&t, "Malloc0"), 16 * 256);
    assert_eq!(num_blocks(&t, "Uring0"), 2048);

    // The data-resize flow on the base bdev: the file grows, rescan picks it up.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .expect("open")
        .set_len(12 << 20)
        .expect("grow");
    t.rpc(&["bdev_uring_rescan", "Uring0"]);
    assert_eq!(num_blocks(&t, "Uring0"), 3072);
    t.rpc(&["bdev_null_resize", "Null0", "128"]);
    assert_eq!(num_blocks(&t, "Null0"), 128 * 2048);

    let err = t.rpc_fail(&["bdev_malloc_create", "-b", "Malloc0", "16", "4096"]);
    assert!(err.contains("-17") || err.contains("exists"), "{err}");
    let err = t.rpc_fail(&["bdev_malloc_delete", "NoSuch"]);
    assert!(err.contains("-19") || err.contains("NoSuch"), "{err}");

    t.rpc(&["bdev_malloc_delete", "Malloc0"]);
    assert_eq!(bdev_names(&t), ["Null0", "Uring0"]);

    let notes = t.rpc(&["notify_get_notifications", "-i", "0"]);
    let seen: Vec<(String, String)> = notes
        .as_array()
        .expect("notifications")
        .iter()
        .map(|n| {
            (
                n["type"].as_str().unwrap_or("").into(),
                n["ctx"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    for want in [
        ("bdev_register", "Malloc0"),
        ("bdev_register", "Uring0"),
        ("bdev_unregister", "Malloc0"),
    ] {
        assert!(
            seen.contains(&(want.0.into(), want.1.into())),
            "{want:?} not in {seen:?}"
        );
    }
    let types = t.rpc(&["notify_get_types"]);
    assert!(types
        .as_array()
        .expect("types")
        .contains(&json!("bdev_register")));

    let reactors = t.rpc(&["framework_get_reactors"]);
    assert_eq!(
        reactors["reactors"].as_array().map(Vec::len),
        Some(1),
        "{reactors}"
    );
    assert_eq!(reactors["reactors"][0]["in_interrupt"], json!(true));
    let iostat = t.rpc(&["bdev_get_iostat", "--names", "Uring0"]);
    assert_eq!(iostat["bdevs"][0]["name"], json!("Uring0"), "{iostat}");
}

#[test]
fn save_config_then_restart_from_json_after_sigterm_and_kill9() {
    if !common::require("spdk-rpc", "SPDK's JSON-RPC client, pip package spdk") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("data.img");
    std::fs::File::create(&file)
        .expect("create")
        .set_len(4 << 20)
        .expect("len");
    let mut t = Thind::start(dir.path(), &[]);
    t.rpc(&[
        "bdev_uring_create",
        file.to_str().expect("utf8"),
        "Uring0",
        "4096",
    ]);
    t.rpc(&["bdev_malloc_create", "-b", "Malloc1", "8", "512"]);
    t.rpc(&["bdev_null_create", "Null1", "16", "4096"]);
    let out = t.rpc_output(&["save_config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg_path = dir.path().join("config.json");
    std::fs::write(&cfg_path, &out.stdout).expect("write config");
    let cfg: Value = serde_json::from_slice(&out.stdout).expect("config JSON");
    let bdev_cfg = cfg["subsystems"]
        .as_array()
        .expect("subsystems")
        .iter()
        .find(|s| s["subsystem"] == "bdev")
        .expect("bdev subsystem")["config"]
        .clone();
    let methods: Vec<&str> = bdev_cfg
        .as_array()
        .expect("config")
        .iter()
        .filter_map(|e| e["method"].as_str())
        .collect();
    for m in [
        "bdev_uring_create",
        "bdev_malloc_create",
        "bdev_null_create",
    ] {
        assert!(methods.contains(&m), "{m} missing from {bdev_cfg}");
    }

    assert_eq!(t.terminate(), Some(0), "SIGTERM must exit 0");
    assert!(!t.sock.exists(), "socket removed on SIGTERM");

    let cfg_arg = cfg_path.to_str().expect("utf8");
    let mut t2 = Thind::start(dir.path(), &["--json", cfg_arg]);
    assert_eq!(bdev_names(&t2), ["Malloc1", "Null1", "Uring0"]);
    assert_eq!(num_blocks(&t2, "Malloc1"), 8 * 2048);
    t2.kill9();
    assert!(t2.sock.exists(), "a killed daemon leaves its socket behind");

    let t3 = Thind::start(dir.path(), &["--json", cfg_arg]);
    assert_eq!(
        bdev_names(&t3),
        ["Malloc1", "Null1", "Uring0"],
        "stale socket reclaimed"
    );
}

#[test]
fn second_daemon_on_same_socket_refuses_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _t = Thind::start(dir.path(), &[]);
    let out = Command::new(common::thind_bin())
        .args(["-m", "0x1", "--interrupt-mode", "-r"])
        .arg(dir.path().join("spdk.sock"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already serving RPC"), "{err}");

    let out = Command::new(common::thind_bin())
        .args(["-m", "zz"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("-m zz"));
    let bad_cfg = dir.path().join("bad.json");
    std::fs::write(&bad_cfg, "{\"subsystems\": 3}").expect("write");
    let out = Command::new(common::thind_bin())
        .args(["-r", "/tmp/thind-never.sock", "--json"])
        .arg(&bad_cfg)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("subsystems"));
}

#[test]
fn wait_for_rpc_gates_runtime_methods() {
    if !common::require("spdk-rpc", "SPDK's JSON-RPC client, pip package spdk") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Thind::start(dir.path(), &["--wait-for-rpc"]);
    let err = t.rpc_fail(&["bdev_malloc_create", "8", "512"]);
    assert!(err.contains("framework_start_init"), "{err}");
    t.rpc(&["framework_start_init"]);
    t.rpc(&["framework_wait_init"]);
    assert_eq!(
        t.rpc(&["bdev_malloc_create", "-b", "M", "8", "512"]),
        json!("M")
    );
}

#[test]
fn bad_input_gets_errors_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Thind::start(dir.path(), &[]);
    let sock: &Path = &t.sock;

    let mut c = Raw::connect(sock);
    let r = c.call("no_such_method", json!({}));
    assert_eq!(r["error"]["code"], json!(-32601), "{r}");
    let r = c.call(
        "bdev_malloc_create",
        json!({"num_blocks": "many", "block_size": 512}),
    );
    assert_eq!(r["error"]["code"], json!(-32602), "{r}");
    let r = c.call(
        "bdev_malloc_create",
        json!({"num_blocks": 8, "block_size": 512, "bogus": 1}),
    );
    assert_eq!(r["error"]["code"], json!(-32602), "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("bogus"),
        "{r}"
    );
    let r = c.call("bdev_malloc_create", json!({"block_size": 512}));
    assert_eq!(r["error"]["code"], json!(-32602), "{r}");
    let r = c.call("bdev_malloc_delete", json!({"name": "nope"}));
    assert_eq!(r["error"]["code"], json!(-19), "{r}");

    let mut bad = Raw::connect(sock);
    bad.send(b"{\"jsonrpc\":\"2.0\",,}");
    let r = bad.recv().expect("parse error");
    assert_eq!(r["error"]["code"], json!(-32700), "{r}");

    let big = "n".repeat(6 << 20);
    let r = c.call("bdev_malloc_delete", json!({ "name": big }));
    assert!(
        r["error"]["code"].as_i64().is_some(),
        "several-MiB request answered: {}",
        r["error"]
    );

    {
        let mut half = Raw::connect(sock);
        half.send(br#"{"jsonrpc":"2.0","method":"bdev_get_bd"#);
    }
    let threads: Vec<_> = (0..100)
        .map(|_| {
            let sock = sock.to_owned();
            std::thread::spawn(move || {
                let mut c = Raw::connect(&sock);
                let r = c.call("spdk_get_version", json!({}));
                assert!(r["result"]["version"].is_string(), "{r}");
            })
        })
        .collect();
    for th in threads {
        th.join().expect("client");
    }
    std::thread::sleep(Duration::from_millis(50));
    let r = Raw::connect(sock).call("bdev_get_bdevs", json!({}));
    assert!(r["result"].is_array(), "still serving: {r}");
}
