//! `src/nvmf_methods.rs` (the thind glue for the `nvmf_*` methods) against the real RPC
//! registry: registration, SPDK error codes, the "nvmf" save_config section, and a config
//! replay (save → load into a fresh target state is what `--json` does). And `thind`
//! itself: killed with connected hosts, it restarts on the same port at once.

mod common;
#[path = "../nvmf/tests/common/mod.rs"]
mod host;
#[path = "../src/nvmf_methods.rs"]
mod nvmf_methods;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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

/// Binds 127.0.0.1:`port` without SO_REUSEADDR; the errno if refused.
fn plain_bind_errno(port: u16) -> Option<i32> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let SocketAddr::V4(a) = addr else {
        unreachable!()
    };
    // SAFETY: socket(2) takes no pointers; checked below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(raw >= 0, "socket");
    // SAFETY: a descriptor we just created and own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid socket and a live sockaddr_in of the given length.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    (rc < 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

/// Admin + one I/O queue, a write and its read back.
fn connect_and_write(port: u16, nqn: &str, seed: u8) -> (host::Host, host::Host) {
    const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:restart-host";
    // thind answers RPC while its --json config is still loading: wait for the listener.
    host::wait_for(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let (a, cntlid) = host::Host::admin_init(port, nqn, HOST, 10_000, false);
    let mut q = host::Host::connect(port, false, false);
    assert_eq!(q.fabrics_connect(1, 31, 0, cntlid, nqn, HOST, 0).status, 0);
    let data: Vec<u8> = (0..8192u32).map(|i| (i as u8) ^ seed).collect();
    assert_eq!(q.cmd(host::rw(0x01, 1, 4, 2), &data, false, 0).0.status, 0);
    assert_eq!(q.cmd(host::rw(0x02, 1, 4, 2), &[], false, 8192).1, data);
    (a, q)
}

#[test]
fn thind_killed_with_hosts_connected_restarts_on_the_same_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = host::free_port();
    let nqn = "nqn.2016-06.io.test:restart";
    let cfg = json!({"subsystems": [
        {"subsystem": "bdev", "config": [{"method": "bdev_malloc_create",
            "params": {"name": "Malloc0", "num_blocks": 256, "block_size": 4096}}]},
        {"subsystem": "nvmf", "config": [
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
            {"method": "nvmf_create_subsystem", "params": {"nqn": nqn, "allow_any_host": true}},
            {"method": "nvmf_subsystem_add_ns",
                "params": {"nqn": nqn, "namespace": {"bdev_name": "Malloc0"}}},
            {"method": "nvmf_subsystem_add_listener", "params": {"nqn": nqn, "listen_address":
                {"trtype": "tcp", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}}
        ]}
    ]});
    let cfg_path = dir.path().join("nvmf.json");
    std::fs::write(&cfg_path, cfg.to_string()).expect("write config");
    let cfg_arg = cfg_path.to_str().expect("utf8");

    let mut t = common::Thind::start(dir.path(), &["--json", cfg_arg]);
    let (mut a, mut q) = connect_and_write(port, nqn, 1);
    t.kill9();
    assert!(a.closed_by_target(), "admin connection closed by the crash");
    assert!(q.closed_by_target(), "I/O connection closed by the crash");
    drop((a, q));
    // The dead target's connections linger on the port (the target closed first):
    // a listener without SO_REUSEADDR could not bind it now.
    assert_eq!(plain_bind_errno(port), Some(libc::EADDRINUSE));
    // The restarted daemon loads the same config (its listener included) at once.
    let t2 = common::Thind::start(dir.path(), &["--json", cfg_arg]);
    let (mut a, _q) = connect_and_write(port, nqn, 2);
    a.keep_alive();
    drop(t2);
}
