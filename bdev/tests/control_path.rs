//! Control path: registry uniqueness, claims, hot-remove and resize events, iostat, RPC
//! handlers and their JSON, save_config round trip.

mod common;

use std::sync::{Arc, Mutex};

use bdev::{malloc, null, registry, testing, Bdev, BdevDesc, BdevEvent, ErrorKind, Uuid};
use common::{ok, pattern, Req, Rt};
use serde_json::{json, Value};

fn rpc(method: &str, params: Value) -> Result<Value, bdev::BdevError> {
    let f = bdev::rpc_methods()
        .into_iter()
        .find(|(m, _)| *m == method)
        .unwrap()
        .1;
    f(params)
}

fn new_null(name: &str, uuid: Option<Uuid>) -> bdev::Result<Arc<null::NullBdev>> {
    null::create(null::NullOpts {
        name: name.into(),
        num_blocks: 1024,
        block_size: 512,
        uuid,
    })
}

#[test]
fn registry_names_aliases_and_uuids_are_unique() {
    let a = new_null("cp_reg_a", None).unwrap();
    let e = new_null("cp_reg_a", None).err().unwrap();
    assert_eq!(e.errno(), libc::EEXIST);
    assert!(e.to_string().contains("cp_reg_a"), "{e}");
    let e = new_null("cp_reg_b", Some(a.uuid())).err().unwrap();
    assert_eq!(e.errno(), libc::EEXIST, "duplicate UUID: {e}");
    assert!(
        registry().lookup("cp_reg_b").is_none(),
        "failed create leaves nothing behind"
    );

    registry().add_alias("cp_reg_a", "cp_reg_alias").unwrap();
    assert_eq!(
        registry()
            .add_alias("cp_reg_a", "cp_reg_alias")
            .unwrap_err()
            .errno(),
        libc::EEXIST
    );
    assert_eq!(
        registry()
            .add_alias("cp_reg_missing", "x")
            .unwrap_err()
            .errno(),
        libc::ENODEV
    );
    let b = new_null("cp_reg_b", None).unwrap();
    assert_eq!(
        registry()
            .add_alias("cp_reg_b", "cp_reg_a")
            .unwrap_err()
            .errno(),
        libc::EEXIST
    );
    let e = new_null("cp_reg_alias", None).err().unwrap();
    assert_eq!(
        e.errno(),
        libc::EEXIST,
        "a name may not collide with an alias"
    );

    let by_alias = registry().lookup("cp_reg_alias").unwrap();
    assert_eq!(by_alias.name(), "cp_reg_a");
    let by_uuid = registry().lookup(&a.uuid().to_string()).unwrap();
    assert_eq!(by_uuid.name(), "cp_reg_a");
    assert_eq!(a.aliases(), vec!["cp_reg_alias".to_string()]);
    let info = registry().get_bdevs_json(Some("cp_reg_alias")).unwrap();
    assert_eq!(info[0]["aliases"], json!(["cp_reg_alias"]));

    registry().remove_alias("cp_reg_alias").unwrap();
    assert!(registry().lookup("cp_reg_alias").is_none());
    assert_eq!(
        registry().remove_alias("cp_reg_b").unwrap_err().errno(),
        libc::EINVAL
    );
    null::delete("cp_reg_a").unwrap();
    null::delete(b.name()).unwrap();
    // Names are free again at once.
    new_null("cp_reg_a", Some(a.uuid())).unwrap();
    null::delete("cp_reg_a").unwrap();
    assert_eq!(null::delete("cp_reg_a").unwrap_err().errno(), libc::ENODEV);
}

#[test]
fn uuid_parse_and_format() {
    let u = Uuid::parse("F0E1D2C3-B4A5-4968-8776-a5b4c3d2e1f0").unwrap();
    assert_eq!(u.to_string(), "f0e1d2c3-b4a5-4968-8776-a5b4c3d2e1f0");
    for bad in [
        "",
        "f0e1d2c3b4a5-4968-8776-a5b4c3d2e1f0x",
        "g0e1d2c3-b4a5-4968-8776-a5b4c3d2e1f0",
    ] {
        assert_eq!(Uuid::parse(bad).unwrap_err().errno(), libc::EINVAL, "{bad}");
    }
    let v4 = Uuid::new_v4();
    assert_eq!(v4.0[6] >> 4, 4);
    assert_ne!(v4, Uuid::new_v4());
}

#[test]
fn claims_are_exclusive() {
    malloc::create(malloc::MallocOpts {
        name: Some("cp_claim_base".into()),
        num_blocks: 64,
        block_size: 512,
        ..Default::default()
    })
    .unwrap();
    let reader = BdevDesc::open("cp_claim_base", false, |_| {}).unwrap();
    let fault = testing::fault::create("cp_claim_fault", "cp_claim_base").unwrap();
    let base_info = &registry().get_bdevs_json(Some("cp_claim_base")).unwrap()[0];
    assert_eq!(base_info["claimed"], true);
    assert_eq!(base_info["claimed_by"], "fault");
    let mut d = BdevDesc::open("cp_claim_base", false, |_| {}).unwrap();
    let e = d.claim("other").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Claimed);
    assert_eq!(e.errno(), libc::EPERM);
    assert_eq!(
        e.to_string(),
        "bdev 'cp_claim_base' already claimed by module 'fault'"
    );
    let e = BdevDesc::open("cp_claim_base", true, |_| {}).unwrap_err();
    assert_eq!(e.errno(), libc::EPERM, "write open of a claimed bdev: {e}");
    let e = testing::record::create("cp_claim_rec", "cp_claim_base", None)
        .err()
        .unwrap();
    assert_eq!(e.errno(), libc::EPERM);
    assert!(registry().lookup("cp_claim_rec").is_none());
    // Deleting the virtual bdev releases its claim.
    drop(fault);
    registry().unregister("cp_claim_fault").unwrap();
    assert_eq!(
        registry()
            .lookup("cp_claim_base")
            .unwrap()
            .core()
            .claimed_by(),
        None
    );
    d.claim("other").unwrap();
    // A writer blocks a claim by someone else.
    drop(d);
    let _w = BdevDesc::open("cp_claim_base", true, |_| {}).unwrap();
    let mut d2 = BdevDesc::open("cp_claim_base", false, |_| {}).unwrap();
    assert_eq!(d2.claim("x").unwrap_err().errno(), libc::EPERM);
    drop(reader);
    malloc::delete("cp_claim_base").unwrap();
}

#[test]
fn delete_with_open_descriptors_sends_remove_and_destructs_on_last_close() {
    malloc::create(malloc::MallocOpts {
        name: Some("cp_hotremove".into()),
        num_blocks: 64,
        block_size: 512,
        ..Default::default()
    })
    .unwrap();
    let rt = Rt::start(2, true);
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut descs = Vec::new();
    for r in 0..2 {
        let ev = events.clone();
        descs.push(rt.call(r, move || {
            Arc::new(
                BdevDesc::open("cp_hotremove", true, move |e| {
                    ev.lock().unwrap().push((e, reactor::current().index()));
                })
                .unwrap(),
            )
        }));
    }
    ok(rt.io(1, &descs[1], Req::Write(0, pattern(512, 1))));
    let weak = Arc::downgrade(descs[0].bdev());
    malloc::delete("cp_hotremove").unwrap();
    assert!(registry().lookup("cp_hotremove").is_none());
    rt.call(0, || ());
    rt.call(1, || ());
    let mut got = events.lock().unwrap().clone();
    got.sort_by_key(|e| e.1);
    assert_eq!(got, vec![(BdevEvent::Remove, 0), (BdevEvent::Remove, 1)]);
    // Open descriptors keep working until closed (as in SPDK); new opens fail.
    assert_eq!(ok(rt.io(1, &descs[1], Req::Read(0, 1))), pattern(512, 1));
    assert_eq!(
        BdevDesc::open_bdev(weak.upgrade().unwrap(), false, Arc::new(|_| {}))
            .unwrap_err()
            .errno(),
        libc::ENODEV
    );
    drop(descs);
    drop(rt);
    assert!(
        weak.upgrade().is_none(),
        "bdev memory released after the last close"
    );
    // The name is reusable.
    malloc::create(malloc::MallocOpts {
        name: Some("cp_hotremove".into()),
        num_blocks: 8,
        block_size: 512,
        ..Default::default()
    })
    .unwrap();
    malloc::delete("cp_hotremove").unwrap();
}

#[test]
fn null_resize_sends_event_and_refuses_shrink_while_open() {
    rpc(
        "bdev_null_create",
        json!({"name": "cp_resize", "num_blocks": 2048, "block_size": 512}),
    )
    .unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let d = BdevDesc::open("cp_resize", false, move |e| ev.lock().unwrap().push(e)).unwrap();
    rpc(
        "bdev_null_resize",
        json!({"name": "cp_resize", "new_size": 2}),
    )
    .unwrap();
    assert_eq!(d.bdev().num_blocks(), 4096);
    assert_eq!(
        *events.lock().unwrap(),
        vec![BdevEvent::Resize { num_blocks: 4096 }]
    );
    let e = rpc(
        "bdev_null_resize",
        json!({"name": "cp_resize", "new_size": 1}),
    )
    .unwrap_err();
    assert_eq!(e.errno(), libc::EBUSY, "{e}");
    assert_eq!(d.bdev().num_blocks(), 4096);
    let e = rpc(
        "bdev_null_resize",
        json!({"name": "cp_resize", "new_size": 0}),
    )
    .unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    drop(d);
    rpc(
        "bdev_null_resize",
        json!({"name": "cp_resize", "new_size": 1}),
    )
    .unwrap();
    assert_eq!(registry().lookup("cp_resize").unwrap().num_blocks(), 2048);
    let e = rpc("bdev_null_resize", json!({"name": "nope", "new_size": 1})).unwrap_err();
    assert_eq!(e.errno(), libc::ENODEV);
    rpc("bdev_null_delete", json!({"name": "cp_resize"})).unwrap();
}

#[test]
fn iostat_sums_channels_of_two_reactors() {
    malloc::create(malloc::MallocOpts {
        name: Some("cp_iostat".into()),
        num_blocks: 256,
        block_size: 512,
        ..Default::default()
    })
    .unwrap();
    let rt = Rt::start(2, false);
    let d = common::open("cp_iostat");
    // Keep one channel per reactor alive for the whole test so stats stay per channel.
    for r in 0..2 {
        let dd = d.clone();
        rt.call(r, move || std::mem::forget(dd.get_io_channel().unwrap()));
    }
    for r in 0..2 {
        for i in 0..3 {
            ok(rt.io(r, &d, Req::Write(i * 4, pattern(4 * 512, i as u8))));
        }
        ok(rt.io(r, &d, Req::Read(0, 2)));
        ok(rt.io(r, &d, Req::Unmap(8, 8)));
        ok(rt.io(r, &d, Req::WriteZeroes(8, 1)));
        ok(rt.io(r, &d, Req::Flush(0, 0)));
    }
    let s = d.bdev().core().iostat();
    assert_eq!((s.write.ops, s.write.bytes), (6, 6 * 2048));
    assert_eq!((s.read.ops, s.read.bytes), (2, 2 * 1024));
    assert_eq!((s.unmap.ops, s.unmap.bytes), (2, 2 * 4096));
    assert_eq!((s.write_zeroes.ops, s.flush.ops), (2, 2));
    assert!(s.read.latency_ticks >= s.read.max_latency_ticks);
    assert!(s.read.max_latency_ticks >= s.read.min_latency_ticks && s.read.min_latency_ticks > 0);
    let j = registry().iostat_json(&["cp_iostat".to_owned()]).unwrap();
    let b = &j["bdevs"][0];
    assert_eq!(b["name"], "cp_iostat");
    assert_eq!(b["num_read_ops"], 2);
    assert_eq!(b["bytes_read"], 2048);
    assert_eq!(
        b["num_write_ops"], 8,
        "write_zeroes count as writes, as in SPDK"
    );
    assert_eq!(b["bytes_written"], 6 * 2048 + 2 * 512);
    assert_eq!(b["num_unmap_ops"], 2);
    assert_eq!(b["bytes_unmapped"], 8192);
    assert!(b["write_latency_ticks"].as_u64().unwrap() > 0);
    assert!(b["unmap_latency_ticks"].as_u64().unwrap() > 0);
    assert!(j["tick_rate"].as_u64().unwrap() > 1_000_000);
    let via_rpc = rpc("bdev_get_iostat", json!({"name": "cp_iostat"})).unwrap();
    assert_eq!(via_rpc["bdevs"][0]["num_read_ops"], 2);
    drop(d);
    drop(rt);
    malloc::delete("cp_iostat").unwrap();
}

#[test]
fn rpc_params_use_spdk_names_and_reject_unknown_fields() {
    let e = rpc(
        "bdev_null_create",
        json!({"name": "cp_rpc", "num_blocks": 8, "block_size": 512,
        "bogus": 1}),
    )
    .unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    assert!(e.to_string().contains("bogus"), "{e}");
    let e = rpc(
        "bdev_null_create",
        json!({"name": "cp_rpc", "num_blocks": 8, "block_size": 512,
        "md_size": 8}),
    )
    .unwrap_err();
    assert!(e.to_string().contains("md_size"), "{e}");
    let e = rpc(
        "bdev_null_create",
        json!({"name": "cp_rpc", "num_blocks": 8, "block_size": 500}),
    )
    .unwrap_err();
    assert!(e.to_string().contains("block size 500"), "{e}");
    let e = rpc(
        "bdev_malloc_create",
        json!({"num_blocks": 0, "block_size": 512}),
    )
    .unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    let e = rpc("bdev_malloc_create", json!({"block_size": 512})).unwrap_err();
    assert!(e.to_string().contains("num_blocks"), "{e}");
    let e = rpc(
        "bdev_malloc_create",
        json!({"num_blocks": 8, "block_size": 512, "uuid": "x"}),
    )
    .unwrap_err();
    assert!(e.to_string().contains("invalid UUID"), "{e}");
    assert_eq!(
        rpc("bdev_malloc_delete", json!({"name": "none"}))
            .unwrap_err()
            .errno(),
        libc::ENODEV
    );
    assert_eq!(
        rpc("bdev_uring_delete", json!({})).unwrap_err().errno(),
        libc::EINVAL
    );
    assert_eq!(
        rpc("bdev_get_bdevs", json!({"name": "none"}))
            .unwrap_err()
            .errno(),
        libc::ENODEV
    );

    let name = rpc(
        "bdev_malloc_create",
        json!({"num_blocks": 32, "block_size": 4096,
        "uuid": "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9", "optimal_io_boundary": 4}),
    )
    .unwrap();
    let name = name.as_str().unwrap().to_string();
    assert!(name.starts_with("Malloc"), "{name}");
    let info = &rpc("bdev_get_bdevs", json!({"name": name})).unwrap()[0];
    assert_eq!(info["product_name"], "Malloc disk");
    assert_eq!(info["block_size"], 4096);
    assert_eq!(info["num_blocks"], 32);
    assert_eq!(info["uuid"], "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9");
    assert_eq!(info["claimed"], false);
    assert_eq!(info["supported_io_types"]["unmap"], true);
    assert_eq!(info["optimal_io_boundary"], 4);
    assert!(info["driver_specific"].is_object());

    // save_config: the recorded call recreates an identical bdev.
    let cfg = registry()
        .lookup(&name)
        .unwrap()
        .write_config_json()
        .unwrap();
    assert_eq!(cfg["method"], "bdev_malloc_create");
    assert!(registry().config_json().contains(&cfg));
    rpc("bdev_malloc_delete", json!({"name": name})).unwrap();
    rpc(cfg["method"].as_str().unwrap(), cfg["params"].clone()).unwrap();
    let again = &rpc("bdev_get_bdevs", json!({"name": name})).unwrap()[0];
    assert_eq!(again, info);
    rpc("bdev_malloc_delete", json!({"name": name})).unwrap();

    rpc(
        "bdev_null_create",
        json!({"name": "cp_rpc_null", "num_blocks": 8, "block_size": 512}),
    )
    .unwrap();
    let info = &rpc("bdev_get_bdevs", json!({"name": "cp_rpc_null"})).unwrap()[0];
    assert_eq!(info["product_name"], "Null disk");
    assert_eq!(info["supported_io_types"]["read"], true);
    assert_eq!(info["supported_io_types"]["unmap"], false);
    let cfg = registry()
        .lookup("cp_rpc_null")
        .unwrap()
        .write_config_json()
        .unwrap();
    assert_eq!(cfg["params"]["num_blocks"], 8);
    assert_eq!(cfg["params"]["uuid"], info["uuid"]);
    rpc("bdev_null_delete", json!({"name": "cp_rpc_null"})).unwrap();
}
