//! `src/nvmf_methods.rs` (the thind glue for the `nvmf_*` methods) against the real RPC
//! registry: registration, SPDK error codes, the "nvmf" save_config section, and a config
//! replay (save → load into a fresh target state is what `--json` does).

#[path = "../src/nvmf_methods.rs"]
mod nvmf_methods;

use std::sync::Arc;

use rpc::config::Subsystems;
use rpc::{Registry, StateMask};
use serde_json::json;

#[test]
fn nvmf_methods_register_save_and_map_errors() {
    let mut opts = reactor::RuntimeOptions::new(reactor::CoreMask::parse("0x1").expect("mask"));
    opts.interrupt_mode = true;
    opts.pin_threads = false;
    let rt = reactor::Runtime::start(opts, || {}).expect("reactors");
    let registry = Arc::new(Registry::new(StateMask::RUNTIME));
    let subsystems = Subsystems::new();
    subsystems.register("bdev", &[], Vec::new);
    nvmf_methods::register_nvmf(&registry, &subsystems, rt.handle());
    let names = registry.method_names(false, false);
    for m in [
        "nvmf_create_transport",
        "nvmf_subsystem_add_listener",
        "nvmf_subsystem_get_qpairs",
    ] {
        assert!(names.iter().any(|n| n == m), "{m} registered");
    }
    bdev::malloc::create(bdev::malloc::MallocOpts {
        name: Some("RpcMalloc".into()),
        num_blocks: 64,
        block_size: 512,
        uuid: None,
        optimal_io_boundary: 0,
    })
    .expect("malloc");
    let call = |m: &str, p| registry.call_blocking(m, Some(p));
    // What spdk-rpc 26.9 sends for `nvmf_create_transport -t TCP`.
    call(
        "nvmf_create_transport",
        json!({"no_srq": false, "c2h_success": true, "trtype": "TCP",
        "zcopy": false, "dif_insert_or_strip": false, "no_wr_batching": false,
        "disable_mappable_bar0": false, "disable_adaptive_irq": false,
        "disable_shadow_doorbells": false, "disable_command_passthru": false}),
    )
    .expect("transport");
    let nqn = "nqn.2016-06.io.test:rpc";
    call("nvmf_create_subsystem", json!({"nqn": nqn, "serial_number": "SPDK001",
        "allow_any_host": true, "ana_reporting": false, "passthrough": false, "enable_nssr": false}))
    .expect("subsystem");
    call(
        "nvmf_subsystem_add_ns",
        json!({"nqn": nqn, "namespace": {"bdev_name": "RpcMalloc",
        "no_auto_visible": false}}),
    )
    .expect("ns");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    call(
        "nvmf_subsystem_add_listener",
        json!({"nqn": nqn, "secure_channel": false,
        "listen_address": {"trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    )
    .expect("listener");
    // The port answers an ICReq.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut ic = [0u8; 128];
    ic[2] = 128;
    ic[4] = 128;
    std::io::Write::write_all(&mut s, &ic).unwrap();
    let mut resp = [0u8; 128];
    std::io::Read::read_exact(&mut s, &mut resp).unwrap();
    assert_eq!(resp[0], 1, "ICResp");

    let e = call("nvmf_create_subsystem", json!({"nqn": nqn})).unwrap_err();
    assert_eq!(e.code, -libc::EEXIST);
    let e = call(
        "nvmf_subsystem_add_ns",
        json!({"nqn": nqn, "namespace": {}}),
    )
    .unwrap_err();
    assert_eq!(e.code, -32602, "{}", e.message);
    let saved = subsystems.save();
    let nv = saved["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["subsystem"] == "nvmf")
        .expect("nvmf section")["config"]
        .clone();
    let methods: Vec<_> = nv
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["method"].as_str().unwrap())
        .collect();
    assert_eq!(
        methods,
        [
            "nvmf_create_transport",
            "nvmf_create_subsystem",
            "nvmf_subsystem_add_ns",
            "nvmf_subsystem_add_listener"
        ]
    );
    // Replaying the saved calls after deleting everything recreates the same config.
    call("nvmf_delete_subsystem", json!({"nqn": nqn})).expect("delete");
    let _ = std::net::TcpStream::connect(("127.0.0.1", port));
    for c in nv.as_array().unwrap().iter().skip(1) {
        call(c["method"].as_str().unwrap(), c["params"].clone())
            .unwrap_or_else(|e| panic!("replay {}: {}", c["method"], e.message));
    }
    assert_eq!(nvmf::config_json(), *nv.as_array().unwrap());
    nvmf::shutdown();
    rt.handle().stop();
    rt.join().expect("join");
}
