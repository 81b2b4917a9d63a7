//! Keep-alive: with a 1 s KATO the target tears down a silent controller, so a controller
//! that stays connected for several KATOs proves the host's Keep Alives. (Own binary: the
//! keep-alive default is process-wide.)

mod common;

use std::thread;
use std::time::Duration;

use bdev::IoStatus;
use common::*;
use serde_json::json;

#[test]
fn keep_alive_keeps_the_controller_connected() {
    runtime();
    rpc(
        "bdev_nvme_set_options",
        json!({"keep_alive_timeout_ms": 1000}),
    )
    .expect("set_options");
    let cfg = nvme::config_json();
    assert_eq!(cfg[0]["params"]["keep_alive_timeout_ms"], 1000);
    let nqn = "nqn.2026-01.io.test:ka";
    let port = export(nqn, "MallocKA", 64, 512);
    let names = attach("NvKA", port, nqn, json!({})).expect("attach");
    let b = bdev::registry().lookup(&names[0]).expect("bdev");
    assert_eq!((b.block_size(), b.num_blocks()), (512, 64));
    thread::sleep(Duration::from_millis(3500));
    assert!(
        stat("NvKA", "nr_keep_alive") >= 4,
        "keep alives: {}",
        stat("NvKA", "nr_keep_alive")
    );
    assert_eq!(
        stat("NvKA", "nr_connects"),
        1,
        "the controller never reconnected"
    );
    assert_eq!(stat("NvKA", "nr_connection_failures"), 0);
    let res = run_ops(
        0,
        "NvKAn1",
        vec![Op::Write(1, pattern(1, 1024)), Op::Read(1, 2)],
    );
    assert_eq!(res[0].0, IoStatus::Success);
    assert!(res[1].1.as_deref() == Some(&pattern(1, 1024)[..]));
    detach("NvKA").expect("detach");
}
