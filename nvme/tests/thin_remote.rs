//! The thin pool's model test (bdev/tests/support/thin_model.rs) with the pool's data device
//! on a remote namespace: our NVMe/TCP target, in this process, exports a malloc bdev over
//! loopback; our initiator attaches it as `Remote0n1`, and the pool keeps its data there
//! (metadata on a local malloc bdev). Every read of the random workload, across both
//! reactors' queue pairs, must equal the model, before and after the pool is reopened, and the
//! metadata must pass pdata's checker and thin_check.

#[path = "../../bdev/tests/common/mod.rs"]
mod common;
#[path = "../../bdev/tests/support/thin_model.rs"]
mod thin_model;

use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

const NQN: &str = "nqn.2016-06.io.thinbdev:remote-data";

fn nvmf_rpc(method: &str, params: Value) -> Value {
    let (_, h) = nvmf::rpc_methods()
        .into_iter()
        .find(|(m, _)| *m == method)
        .expect("nvmf method");
    let (tx, rx) = mpsc::channel();
    h(params, Box::new(move |r| tx.send(r).expect("answer")));
    rx.recv_timeout(Duration::from_secs(10))
        .expect("nvmf rpc answered")
        .unwrap_or_else(|e| panic!("{method}: {} ({})", e.message, e.code))
}

fn nvme_rpc(method: &str, params: Value) -> Value {
    let (_, h) = nvme::rpc_methods()
        .into_iter()
        .find(|(m, _)| *m == method)
        .expect("nvme method");
    let (tx, rx) = mpsc::channel();
    h(params, Box::new(move |r| tx.send(r).expect("answer")));
    rx.recv_timeout(Duration::from_secs(30))
        .expect("nvme rpc answered")
        .unwrap_or_else(|e| panic!("{method}: {e}"))
}

#[test]
fn thin_model_with_data_on_a_remote_namespace() {
    let rt = common::Rt::start(2, true);
    nvmf::set_runtime(rt.h.clone());
    nvme::set_runtime(rt.h.clone());
    thin_model::malloc("RemoteBacking0", 32 << 20, 4096);
    nvmf_rpc("nvmf_create_transport", json!({"trtype": "TCP"}));
    nvmf_rpc(
        "nvmf_create_subsystem",
        json!({"nqn": NQN, "allow_any_host": true, "serial_number": "REMOTE0001"}),
    );
    nvmf_rpc(
        "nvmf_subsystem_add_ns",
        json!({"nqn": NQN, "namespace": {"bdev_name": "RemoteBacking0"}}),
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    nvmf_rpc(
        "nvmf_subsystem_add_listener",
        json!({"nqn": NQN, "listen_address": {"trtype": "tcp", "adrfam": "IPv4",
               "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    );
    let names = nvme_rpc(
        "bdev_nvme_attach_controller",
        json!({"name": "Remote0", "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
               "trsvcid": port.to_string(), "subnqn": NQN}),
    );
    assert_eq!(names, json!(["Remote0n1"]));
    thin_model::malloc("RemoteMeta0", 4 << 20, 4096);

    thin_model::run_model(&rt, "Remote0n1", "RemoteMeta0");

    // The data reached the remote side: the backing bdev served writes.
    let backing = bdev::registry()
        .lookup("RemoteBacking0")
        .expect("backing bdev");
    assert!(
        backing.core().iostat().write.ops > 0,
        "no write reached the target"
    );
    assert_eq!(
        nvme_rpc("bdev_nvme_detach_controller", json!({"name": "Remote0"})),
        json!(true)
    );
}
