//! Poll groups on busy-polling reactors (thind's default mode): one `nvmf_poll_group`
//! poller per reactor drives all of its qpairs (no poller per connection); qpairs that go
//! idle stop being read every tick and wait for readiness, and are served again as soon
//! as the host sends something; closed qpairs leave their group. One test in its own
//! binary: it owns the (polling-mode) runtime.

mod common;

use std::time::Duration;

use common::*;
use reactor::{CoreMask, ReactorId, Runtime, RuntimeOptions};
use serde_json::json;

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:group-host";

/// Per reactor: (number of `nvmf_poll_group` pollers, number of other nvmf pollers,
/// qpairs in the group).
fn groups(rt: &reactor::RuntimeHandle) -> Vec<(usize, usize, usize)> {
    (0..rt.nr_reactors())
        .map(|i| {
            rt.call(ReactorId::new(i as u32), || {
                let p = reactor::poller::pollers();
                let group = p.iter().filter(|p| p.name == "nvmf_poll_group").count();
                let qpair = p
                    .iter()
                    .filter(|p| p.name.starts_with("nvmf_qpair"))
                    .count();
                (group, qpair, nvmf::tcp::group::nr_local_qpairs())
            })
            .expect("reactor call")
        })
        .collect()
}

#[test]
fn one_poller_per_reactor_serves_busy_and_dormant_qpairs() {
    let mut opts = RuntimeOptions::new(CoreMask::parse("0x3").expect("mask"));
    opts.interrupt_mode = false;
    opts.pin_threads = false;
    let rt = Runtime::start(opts, || {}).expect("reactors");
    let h = rt.handle();
    nvmf::set_runtime(h.clone());
    rpc("nvmf_create_transport", json!({"trtype": "TCP"})).unwrap();
    bdev::malloc::create(bdev::malloc::MallocOpts {
        name: Some("MallocGroup".into()),
        num_blocks: 64,
        block_size: 4096,
        uuid: None,
        optimal_io_boundary: 0,
    })
    .unwrap();
    let nqn = "nqn.2016-06.io.test:group";
    rpc(
        "nvmf_create_subsystem",
        json!({"nqn": nqn, "allow_any_host": true}),
    )
    .unwrap();
    rpc(
        "nvmf_subsystem_add_ns",
        json!({"nqn": nqn, "namespace": {"bdev_name": "MallocGroup"}}),
    )
    .unwrap();
    let port = free_port();
    listener(nqn, port, true).unwrap();

    let (mut a, cntlid) = Host::admin_init(port, nqn, HOST, 0, false);
    let mut q = Host::connect(port, false, false);
    assert_eq!(q.fabrics_connect(1, 31, 0, cntlid, nqn, HOST, 0).status, 0);
    let idle: Vec<Host> = (0..6).map(|_| Host::connect(port, false, false)).collect();
    // 8 connections over 2 reactors: one group poller each, no per-qpair pollers.
    let g = groups(&h);
    assert_eq!(g.iter().map(|g| g.2).sum::<usize>(), 8, "{g:?}");
    assert!(
        g.iter().all(|&(group, qp, _)| group == 1 && qp == 0),
        "{g:?}"
    );

    for round in 0..3u8 {
        let data: Vec<u8> = (0..4096u32).map(|i| (i as u8) ^ round).collect();
        assert_eq!(q.cmd(rw(0x01, 1, 3, 1), &data, true, 0).0.status, 0);
        assert_eq!(q.cmd(rw(0x02, 1, 3, 1), &[], false, 4096).1, data);
        // Long enough for every qpair to go dormant (thousands of idle polls); the next
        // command must wake it through its readiness poll.
        std::thread::sleep(Duration::from_millis(200));
        a.keep_alive();
    }
    // Closed connections leave their groups.
    drop(idle);
    wait_for(|| groups(&h).iter().map(|g| g.2).sum::<usize>() == 2);
    drop((a, q));
    wait_for(|| groups(&h).iter().map(|g| g.2).sum::<usize>() == 0);
    assert!(groups(&h).iter().all(|&(group, _, _)| group == 1));
    rpc("nvmf_delete_subsystem", json!({"nqn": nqn})).unwrap();
    nvmf::shutdown();
    h.stop();
    rt.join().expect("join");
}
