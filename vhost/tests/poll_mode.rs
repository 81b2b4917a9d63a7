//! The backend on two busy-polling reactors: queues spread over the controller's cpumask
//! (queue 1 runs on the second reactor), guest kicks suppressed while polling, EVENT_IDX
//! negotiated.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

#[test]
fn poll_mode_two_reactors_two_queues() {
    let dir = setup_runtime("0x3", false);
    malloc("VhMallocPoll", 1024, 4096);
    call(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vpoll.0", "dev_name": "VhMallocPoll", "cpumask": "0x3"}),
    )
    .expect("create");
    let list = call("vhost_get_controllers", json!({"name": "vpoll.0"})).unwrap();
    assert_eq!(list[0]["cpumask"], "0x3");
    let path = dir.join("vpoll.0");
    let mut fe = Fe::connect_with(
        &path,
        Mem::new(),
        None,
        0,
        vhost_user::vhost_user::message::VhostUserProtocolFeatures::empty(),
        true,
    );
    // Poll mode without EVENT_IDX would set used.flags = NO_NOTIFY; with EVENT_IDX the guest
    // is told nothing (avail_event stays behind), so it kicks rarely. Either way requests are
    // found without kicks: publish without kicking.
    let a = pattern(8192, 1);
    assert_eq!(fe.request(T_OUT, 0, &a, false).0, S_OK);
    fe.use_queue(1);
    let b = pattern(8192, 2);
    assert_eq!(fe.request(T_OUT, 16, &b, false).0, S_OK);
    assert_eq!(fe.read(0, 8192), (S_OK, a.clone()));
    let q1 = (fe.avail_idx, fe.used_seen);
    // Back to queue 0 (its ring indexes: one request so far).
    fe.off = 0;
    (fe.avail_idx, fe.used_seen) = (1, 1);
    assert_eq!(fe.read(16, 8192), (S_OK, b));
    // A request published with no kick at all is still picked up by the poller.
    fe.mem.put(HDR, &[0u8; 16]);
    fe.mem.put(STATUS, &[0xff]);
    fe.desc(0, HDR, 16, 1, 1);
    fe.desc(1, DATA, 4096, 1 | 2, 2);
    fe.desc(2, STATUS, 1, 2, 0);
    let slot = AVAIL + 4 + 2 * u64::from(fe.avail_idx % QSIZE);
    fe.mem.put(slot, &0u16.to_le_bytes());
    fe.avail_idx = fe.avail_idx.wrapping_add(1);
    fe.mem.put(AVAIL + 2, &fe.avail_idx.to_le_bytes());
    assert!(
        fe.wait_used(Duration::from_secs(5)).is_some(),
        "polled without a kick"
    );
    assert_eq!(fe.mem.slice(STATUS, 1)[0], S_OK);
    assert_eq!(fe.mem.slice(DATA, 4096), &a[..4096]);
    // Queue 1 is still served.
    fe.off = QUEUE_STRIDE;
    (fe.avail_idx, fe.used_seen) = q1;
    assert_eq!(fe.read(0, 4096), (S_OK, a[..4096].to_vec()));
    drop(fe);
    delete_when_idle("vpoll.0");
}
