//! Discovery Log Change notices: a discovery controller with an Asynchronous Event Request
//! outstanding hears about subsystem, listener and host changes once it enabled the notice
//! (feature 0Bh bit 31); a raised notice stays masked until the log is read with RAE 0.
//! One test in its own binary: nothing else changes the discovery log meanwhile.

mod common;

use common::*;
use serde_json::json;

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:disc-host";
const DISCOVERY: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// AER completion DW0 of a Discovery Log Page Change notice: notice, F0h, log page 70h.
const DISC_CHANGE: u32 = 0x0070_F002;

/// The next PDU is the parked AER's completion carrying a discovery-change notice.
fn expect_notice(a: &mut Host) {
    let c = a.recv_cqe();
    assert_eq!((c.cid, c.status, c.dw0), (31, 0, DISC_CHANGE), "notice");
}

#[test]
fn discovery_log_change_notices() {
    let nqn = "nqn.2016-06.io.test:disc-a";
    let port = export(nqn, "MallocDiscA", 16, true);
    // The discovery service on its own port (as 8009 would be).
    let pd = free_port();
    listener(DISCOVERY, pd, true).unwrap();
    let (mut a, _) = Host::admin_init(pd, DISCOVERY, HOST, 0, false);
    let (g0, entries) = a.discovery_log();
    assert_eq!(disc_entries_for(&entries, nqn, port), 1);

    // Notice not enabled: a change completes nothing (the Keep Alive answer comes next).
    a.park_aer(31);
    let b = "nqn.2016-06.io.test:disc-b";
    rpc(
        "nvmf_create_subsystem",
        json!({"nqn": b, "allow_any_host": true}),
    )
    .unwrap();
    a.keep_alive();

    // Enabled: the next change completes the parked AER.
    assert_eq!(a.set_features(0x0B, 1 << 31).status, 0);
    let pb = free_port();
    listener(b, pb, true).unwrap();
    expect_notice(&mut a);
    // Raised and not yet read: masked, a further change raises nothing.
    a.park_aer(31);
    rpc(
        "nvmf_subsystem_allow_any_host",
        json!({"nqn": b, "allow_any_host": false}),
    )
    .unwrap();
    a.keep_alive();
    // Reading the log (RAE 0 at the end) shows the change and unmasks the notice; the
    // host is no longer allowed on b, so b is not listed for it.
    let (g1, entries) = a.discovery_log();
    assert!(g1 > g0, "GENCTR moved");
    assert_eq!(disc_entries_for(&entries, b, pb), 0);
    rpc("nvmf_subsystem_add_host", json!({"nqn": b, "host": HOST})).unwrap();
    expect_notice(&mut a);
    let (_, entries) = a.discovery_log();
    assert_eq!(
        disc_entries_for(&entries, b, pb),
        1,
        "b listed once allowed"
    );

    // Listener removal and subsystem deletion notify too.
    a.park_aer(31);
    listener(b, pb, false).unwrap();
    expect_notice(&mut a);
    let (_, entries) = a.discovery_log();
    assert_eq!(disc_entries_for(&entries, b, pb), 0, "listener gone");
    a.park_aer(31);
    rpc("nvmf_delete_subsystem", json!({"nqn": nqn})).unwrap();
    expect_notice(&mut a);
    let (g2, entries) = a.discovery_log();
    assert!(g2 > g1);
    assert_eq!(disc_entries_for(&entries, nqn, port), 0, "subsystem gone");
    rpc("nvmf_delete_subsystem", json!({"nqn": b})).unwrap();
    // Removing the discovery listener disconnects the controller that came through it.
    listener(DISCOVERY, pd, false).unwrap();
    assert!(a.closed_by_target());
    wait_for(|| {
        rpc("nvmf_subsystem_get_controllers", json!({"nqn": DISCOVERY})).unwrap() == json!([])
    });
}
