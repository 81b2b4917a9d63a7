//! The vhost-user-blk backend driven in-process by a test frontend: the rust-vmm `vhost`
//! crate's frontend side (or hand-built messages) over the controller's socket, guest memory in
//! a memfd we map too, and split rings we fill ourselves. Requests go to a malloc bdev.
mod support;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use support::*;
use vhost_user::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost_user::vhost_user::{Frontend, VhostUserFrontend};
use vhost_user::VhostBackend;

fn init() -> PathBuf {
    setup_runtime("0x1", true)
}

#[test]
fn blk_round_trips() {
    init();
    malloc("VhMalloc0", 2048, 4096);
    let path = controller("vrt.0", "VhMalloc0", false);
    let mut fe = Fe::connect(&path);

    let cfg = fe
        .fe
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0; 60])
        .unwrap()
        .1;
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        2048 * 8,
        "capacity"
    );
    assert_eq!(
        u32::from_le_bytes(cfg[20..24].try_into().unwrap()),
        4096,
        "blk_size"
    );

    let data = pattern(16384, 7);
    assert_eq!(fe.request(T_OUT, 64, &data, false).0, S_OK);
    let (st, back) = fe.read(64, 16384);
    assert_eq!(st, S_OK);
    assert_eq!(back, data);
    // A read of other sectors does not see the data.
    let (st, other) = fe.read(128, 4096);
    assert_eq!(st, S_OK);
    assert_ne!(&other[..], &data[..4096]);

    assert_eq!(fe.request(T_FLUSH, 0, &[], false).0, S_OK);
    assert_eq!(
        fe.request(T_FLUSH, 8, &[], false).0,
        S_IOERR,
        "flush needs sector 0"
    );

    let (st, used) = fe.request(T_GET_ID, 0, &[0u8; 20], true);
    assert_eq!(st, S_OK);
    assert_eq!(used, 21);
    assert_eq!(&fe.mem.slice(DATA, 20)[..9], b"VhMalloc0");
    assert!(fe.mem.slice(DATA, 20)[9..].iter().all(|b| *b == 0));

    assert_eq!(fe.dwz(T_WRITE_ZEROES, 64, 8, 0), S_OK);
    let (st, z) = fe.read(64, 8192);
    assert_eq!(st, S_OK);
    assert!(
        z[..4096].iter().all(|b| *b == 0),
        "write_zeroes zeroed the first block"
    );
    assert_eq!(&z[4096..], &data[4096..8192], "only 8 sectors zeroed");

    assert_eq!(fe.dwz(T_DISCARD, 72, 8, 0), S_OK);
    assert_eq!(
        fe.dwz(T_DISCARD, 72, 8, 1),
        S_UNSUPP,
        "discard with UNMAP flag"
    );
    assert_eq!(
        fe.dwz(T_DISCARD, 3, 8, 0),
        S_IOERR,
        "discard not block aligned"
    );

    // Out of range, misaligned, unknown type.
    assert_eq!(fe.read(2048 * 8, 4096).0, S_IOERR);
    assert_eq!(fe.read(2048 * 8 - 8, 8192).0, S_IOERR);
    assert_eq!(fe.read(1, 4096).0, S_IOERR);
    assert_eq!(fe.request(T_OUT, 0, &[1u8; 1000], false).0, S_IOERR);
    assert_eq!(fe.request(99, 0, &[], false).0, S_UNSUPP);

    // Ring still healthy.
    let (st, back) = fe.read(72, 4096);
    assert_eq!(st, S_OK);
    assert_eq!(back.len(), 4096);
    // SPDK refuses to delete a controller with a connected frontend.
    let e = call("vhost_delete_controller", json!({"ctrlr": "vrt.0"})).unwrap_err();
    assert_eq!(e.code, -libc::EBUSY);
    assert!(
        fe.fe.get_features().is_ok(),
        "session survives the refused delete"
    );
    drop(fe);
    delete_when_idle("vrt.0");
}

#[test]
fn readonly_controller_refuses_writes() {
    init();
    malloc("VhMallocRo", 256, 512);
    let path = controller("vro.0", "VhMallocRo", true);
    let mut fe = Fe::connect(&path);
    assert_ne!(fe.fe.get_features().unwrap() & (1 << 5), 0, "RO offered");
    assert_eq!(fe.request(T_OUT, 0, &[1u8; 512], false).0, S_IOERR);
    assert_eq!(fe.read(0, 512).0, S_OK);
    assert_eq!(fe.dwz(T_WRITE_ZEROES, 0, 1, 0), S_UNSUPP);
    drop(fe);
    delete_when_idle("vro.0");
}

#[test]
fn rpc_params_are_checked() {
    init();
    malloc("VhMallocRpc", 256, 512);
    setup();
    let e = call(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vrpc.0", "dev_name": "VhMallocRpc", "packed_ring": true}),
    )
    .unwrap_err();
    assert_eq!(e.code, -libc::ENOTSUP);
    let e = call(
        "vhost_create_blk_controller",
        json!({"ctrlr": "x", "bogus": 1}),
    )
    .unwrap_err();
    assert_eq!(e.code, -32602);
    let e = call(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vrpc.0", "dev_name": "NoSuchBdev"}),
    )
    .unwrap_err();
    assert_eq!(e.code, -libc::ENODEV);
    // A name that would replace a live socket or another file is refused.
    let live = std::os::unix::net::UnixListener::bind(setup().join("live.sock")).unwrap();
    let e = call(
        "vhost_create_blk_controller",
        json!({"ctrlr": "live.sock", "dev_name": "VhMallocRpc"}),
    )
    .unwrap_err();
    assert_eq!(e.code, -libc::EADDRINUSE);
    drop(live);
    std::fs::write(setup().join("plain"), b"x").unwrap();
    let e = call(
        "vhost_create_blk_controller",
        json!({"ctrlr": "plain", "dev_name": "VhMallocRpc"}),
    )
    .unwrap_err();
    assert_eq!(e.code, -libc::EEXIST);
    assert!(setup().join("plain").is_file(), "file left alone");
    controller("vrpc.0", "VhMallocRpc", false);
    let e = call(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vrpc.0", "dev_name": "VhMallocRpc"}),
    )
    .unwrap_err();
    assert_eq!(e.code, -libc::EEXIST);
    let list = call("vhost_get_controllers", json!({"name": "vrpc.0"})).unwrap();
    assert_eq!(list[0]["backend_specific"]["block"]["bdev"], "VhMallocRpc");
    assert!(vhost::config_json()
        .iter()
        .any(|c| c["params"]["ctrlr"] == "vrpc.0" && c["params"]["dev_name"] == "VhMallocRpc"));
    call("vhost_delete_controller", json!({"ctrlr": "vrpc.0"})).unwrap();
    let e = call("vhost_get_controllers", json!({"name": "vrpc.0"})).unwrap_err();
    assert_eq!(e.code, -libc::ENODEV);
    assert!(!setup().join("vrpc.0").exists(), "socket removed");
}

#[test]
fn bad_input_is_refused_without_harm() {
    init();
    malloc("VhMallocBad", 1024, 4096);
    malloc("VhMallocGood", 1024, 4096);
    let bad_path = controller("vbad.0", "VhMallocBad", false);
    let good_path = controller("vgood.0", "VhMallocGood", false);
    let mut good = Fe::connect(&good_path);
    let data = pattern(4096, 3);
    assert_eq!(good.request(T_OUT, 0, &data, false).0, S_OK);

    // 1. Memory table whose region lies past the end of its file: refused (REPLY_ACK nack).
    {
        let fe = Frontend::connect(&bad_path, 16).unwrap();
        fe.set_owner().unwrap();
        let f = fe.get_features().unwrap();
        fe.set_features(f).unwrap();
        let mut fe2 = fe.clone();
        let pf = fe2.get_protocol_features().unwrap();
        fe2.set_protocol_features(pf & VhostUserProtocolFeatures::REPLY_ACK)
            .unwrap();
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let mem = Mem::new();
        let mut r = mem.region();
        r.memory_size = (MEM_SIZE as u64) * 2;
        assert!(
            fe.set_mem_table(&[r]).is_err(),
            "region past end of file refused"
        );
        let mut r = mem.region();
        r.memory_size = 0;
        assert!(fe.set_mem_table(&[r]).is_err(), "empty region refused");
        let r1 = mem.region();
        let mut r2 = mem.region();
        r2.userspace_addr = UVA_BASE + (1 << 30);
        assert!(
            fe.set_mem_table(&[r1, r2]).is_err(),
            "overlapping GPAs refused"
        );
        assert!(
            fe.set_vring_num(0, 3).is_err(),
            "ring size not a power of two"
        );
        assert!(
            fe.set_vring_num(99, 16).is_err(),
            "queue index out of range"
        );
        assert!(fe.get_features().is_ok(), "refusals keep the session");
        fe.set_mem_table(&[mem.region()])
            .expect("a valid table after the bad ones");
    }

    // 2. Rings outside guest memory, descriptor loop, buffer outside memory, long chain.
    let mut fe = Fe::connect(&bad_path);
    fe.start_queue(1, 0x3f_0000, MEM_SIZE as u64 - 2, USED);
    // Queue 1's avail ring straddles the end of memory: it never starts, queue 0 still works.
    assert_eq!(fe.request(T_OUT, 8, &data, false).0, S_OK);
    // A descriptor loop: 0 -> 1 -> 0.
    fe.desc(0, HDR, 16, 1, 1);
    fe.desc(1, DATA, 512, 1, 0);
    fe.publish(0);
    assert!(
        fe.wait_used(Duration::from_millis(300)).is_none(),
        "looped chain not completed"
    );
    // The broken ring takes nothing more; the session and other controllers are fine.
    fe.desc(0, HDR, 16, 1, 1);
    fe.desc(1, STATUS, 1, 2, 0);
    fe.publish(0);
    assert!(
        fe.wait_used(Duration::from_millis(300)).is_none(),
        "broken ring stays stopped"
    );
    assert!(fe.fe.get_features().is_ok(), "session still answers");
    assert_eq!(good.read(0, 4096), (S_OK, data.clone()));
    drop(fe);

    // A fresh session resets the ring: a buffer outside guest memory breaks it again.
    let mut fe = Fe::connect(&bad_path);
    fe.desc(0, HDR, 16, 1, 1);
    fe.desc(1, MEM_SIZE as u64 - 8, 4096, 1 | 2, 2);
    fe.desc(2, STATUS, 1, 2, 0);
    fe.publish(0);
    assert!(fe.wait_used(Duration::from_millis(300)).is_none());
    drop(fe);

    // An indirect table claiming more entries than memory holds, and a chain of 16 next
    // pointers in a 16-entry ring that never ends (every descriptor has NEXT).
    let mut fe = Fe::connect(&bad_path);
    for i in 0..QSIZE {
        fe.desc(i, DATA, 16, 1, (i + 1) % QSIZE);
    }
    fe.publish(0);
    assert!(fe.wait_used(Duration::from_millis(300)).is_none());
    drop(fe);
    let mut fe = Fe::connect(&bad_path);
    fe.desc(0, MEM_SIZE as u64 - 64, 16 * 64, 4, 0);
    fe.publish(0);
    assert!(fe.wait_used(Duration::from_millis(300)).is_none());
    drop(fe);

    // 3. Truncated and garbage messages on a raw socket: the session is closed, nothing else.
    for junk in [
        &[1u8, 0, 0][..],
        &[0xffu8; 12][..],
        &[5u8, 0, 0, 0, 1, 0, 0, 0, 200, 0, 0, 0][..],
    ] {
        let s = UnixStream::connect(&bad_path).unwrap();
        (&s).write_all(junk).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(s);
    }
    // SET_MEM_TABLE claiming 9 regions with no fds.
    {
        let s = UnixStream::connect(&bad_path).unwrap();
        let mut p = vec![0u8; 8 + 32 * 9];
        p[0] = 9;
        raw_msg(&s, 5, 0, &p, &[]);
        std::thread::sleep(Duration::from_millis(50));
    }
    // GET_INFLIGHT_FD for an absurd queue count.
    {
        let s = UnixStream::connect(&bad_path).unwrap();
        let mut p = Vec::new();
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&5000u16.to_le_bytes());
        p.extend_from_slice(&128u16.to_le_bytes());
        p.extend_from_slice(&[0u8; 4]);
        raw_msg(&s, 31, 0, &p, &[]);
        std::thread::sleep(Duration::from_millis(50));
    }

    // The controller still serves a well-behaved frontend, and so does the other one.
    let mut fe = Fe::connect(&bad_path);
    assert_eq!(fe.read(8, 4096), (S_OK, data.clone()));
    assert_eq!(good.read(0, 4096), (S_OK, data));
    drop(fe);
    drop(good);
    delete_when_idle("vbad.0");
    delete_when_idle("vgood.0");
}

/// A request the backend took from the avail ring but never completed (it crashed, or the
/// session died) is resubmitted from the in-flight area on reconnect, and not lost.
#[test]
fn inflight_requests_survive_reconnect() {
    init();
    malloc("VhMallocInfl", 1024, 4096);
    let path = controller("vinfl.0", "VhMallocInfl", false);
    let extra = VhostUserProtocolFeatures::INFLIGHT_SHMFD;

    // Session 1: get the in-flight area, complete one request (initialises the region).
    let mut fe = Frontend::connect(&path, 16).unwrap();
    fe.set_owner().unwrap();
    let f = fe.get_features().unwrap();
    fe.set_features(f).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(pf & (extra | VhostUserProtocolFeatures::REPLY_ACK))
        .unwrap();
    let (area, area_file) = fe
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QSIZE))
        .expect("GET_INFLIGHT_FD");
    assert!(area.mmap_size >= 16 + 16 * u64::from(QSIZE));
    drop(fe);
    let mem = Mem::new();
    let mut fe = Fe::connect_with(&path, mem, Some((&area, &area_file)), 0, extra, false);
    assert_eq!(fe.request(T_OUT, 8, &[0u8; 4096], false).0, S_OK);
    // Stop the ring (GET_VRING_BASE waits until it is quiesced); the session stays open so
    // nothing runs the ring while we forge the crash state.
    assert_eq!(fe.fe.get_vring_base(0).unwrap(), 1);
    let Fe { fe: conn, mem, .. } = fe;

    // Simulate a crash after the backend popped head 4 (a write) but before it completed:
    // the chain and avail entry are in guest memory, the area marks head 4 in flight.
    let data = pattern(4096, 99);
    let hdr: Vec<u8> = [T_OUT.to_le_bytes(), 0u32.to_le_bytes()]
        .concat()
        .into_iter()
        .chain(200u64.to_le_bytes())
        .collect();
    mem.put(HDR + 0x40, &hdr);
    mem.put(DATA + 0x10000, &data);
    mem.put(STATUS + 1, &[0xff]);
    let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let b: Vec<u8> = [
            &addr.to_le_bytes()[..],
            &len.to_le_bytes(),
            &flags.to_le_bytes(),
            &next.to_le_bytes(),
        ]
        .concat();
        mem.put(DESC + i * 16, &b);
    };
    desc(4, HDR + 0x40, 16, 1, 5);
    desc(5, DATA + 0x10000, 4096, 1, 6);
    desc(6, STATUS + 1, 1, 2, 0);
    mem.put(AVAIL + 4 + 2, &4u16.to_le_bytes());
    mem.put(AVAIL + 2, &2u16.to_le_bytes());
    // SAFETY: mapping the in-flight memfd the backend gave us, checked against MAP_FAILED.
    let region = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            area.mmap_size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            area_file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(region, libc::MAP_FAILED);
    // SAFETY: the region holds 16 + 16 * QSIZE bytes (asserted above); no session runs now.
    let r = unsafe { std::slice::from_raw_parts_mut(region.cast::<u8>(), area.mmap_size as usize) };
    assert_eq!(
        u16::from_le_bytes([r[8], r[9]]),
        1,
        "region initialised (version 1)"
    );
    assert_eq!(u16::from_le_bytes([r[14], r[15]]), 1, "used_idx recorded");
    let d4 = 16 + 16 * 4;
    r[d4] = 1;
    r[d4 + 8..d4 + 16].copy_from_slice(&7u64.to_le_bytes());

    // Session 2, as QEMU reconnects after a backend crash: same area, base = used->idx.
    drop(conn);
    let mut fe = Fe::connect_with(&path, mem, Some((&area, &area_file)), 1, extra, false);
    fe.avail_idx = 2;
    let (id, len) = fe
        .wait_used(Duration::from_secs(10))
        .expect("resubmitted request done");
    assert_eq!((id, len), (4, 1));
    assert_eq!(fe.mem.slice(STATUS + 1, 1)[0], S_OK);
    assert_eq!(r[d4], 0, "no longer in flight");
    // The next request continues after it, and the data of the resubmitted write is there.
    let (st, back) = fe.read(200 * 512 / 512, 4096);
    assert_eq!(st, S_OK);
    assert_eq!(back, data);
    drop(fe);
    // SAFETY: unmapping what we mapped above.
    unsafe { libc::munmap(region, area.mmap_size as usize) };
    delete_when_idle("vinfl.0");
}

/// A resized bdev changes the capacity in GET_CONFIG and sends CONFIG_CHANGE_MSG on the
/// backend request channel.
#[test]
fn resize_notifies_the_frontend() {
    init();
    bdev::null::create(bdev::null::NullOpts {
        name: "VhNullResize".into(),
        num_blocks: 2048,
        block_size: 512,
        uuid: None,
    })
    .expect("null bdev");
    let path = controller("vresize.0", "VhNullResize", false);
    let mut fe = Fe::connect_with(
        &path,
        Mem::new(),
        None,
        0,
        VhostUserProtocolFeatures::BACKEND_REQ,
        false,
    );
    let (ours, theirs) = UnixStream::pair().unwrap();
    fe.fe.set_backend_request_fd(&theirs).unwrap();
    assert_eq!(fe.read(0, 512).0, S_OK);
    let (_, resize) = bdev::rpc_methods()
        .into_iter()
        .find(|(m, _)| *m == "bdev_null_resize")
        .unwrap();
    resize(json!({"name": "VhNullResize", "new_size": 4})).expect("resize");
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut hdr = [0u8; 12];
    std::io::Read::read_exact(&mut &ours, &mut hdr).expect("config change message");
    assert_eq!(
        u32::from_le_bytes(hdr[0..4].try_into().unwrap()),
        2,
        "CONFIG_CHANGE_MSG"
    );
    let cfg = fe
        .fe
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0; 8])
        .unwrap()
        .1;
    assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), 4 * 2048);
    // I/O beyond the old end now works.
    assert_eq!(fe.read(4000, 512).0, S_OK);
    drop(fe);
    delete_when_idle("vresize.0");
}

/// GET_VRING_BASE stops the ring only after its in-flight requests completed (their used
/// entries are published before the reply), and bdev errors reach the guest as IOERR.
#[test]
fn stop_waits_for_inflight_and_errors_reach_the_guest() {
    init();
    malloc("VhMallocSlowBase", 1024, 4096);
    let fault = bdev::testing::fault::create("VhSlow", "VhMallocSlowBase").expect("fault bdev");
    let path = controller("vslow.0", "VhSlow", false);
    let mut fe = Fe::connect(&path);

    fault.config().set_error_ppm(bdev::IoType::Write, 1_000_000);
    assert_eq!(fe.request(T_OUT, 0, &[7u8; 4096], false).0, S_IOERR);
    fault.config().set_error_ppm(bdev::IoType::Write, 0);
    assert_eq!(fe.request(T_OUT, 0, &[7u8; 4096], false).0, S_OK);

    // A write held back by the bdev for many polls, then GET_VRING_BASE.
    fault
        .config()
        .delay_polls
        .store(300_000, std::sync::atomic::Ordering::Relaxed);
    let data = pattern(4096, 5);
    fe.mem.put(HDR, &[T_OUT.to_le_bytes(), [0; 4]].concat());
    fe.mem.put(HDR + 8, &8u64.to_le_bytes());
    fe.mem.put(DATA, &data);
    fe.mem.put(STATUS, &[0xff]);
    fe.desc(0, HDR, 16, 1, 1);
    fe.desc(1, DATA, 4096, 1, 2);
    fe.desc(2, STATUS, 1, 2, 0);
    fe.publish(0);
    std::thread::sleep(Duration::from_millis(5));
    let before = fe.mem.u16_at(USED + 2);
    let base = fe.fe.get_vring_base(0).expect("GET_VRING_BASE");
    let after = fe.mem.u16_at(USED + 2);
    assert_eq!(base, 3, "next avail index after three requests");
    assert_eq!(after, 3, "in-flight write completed before the reply");
    assert_eq!(fe.mem.slice(STATUS, 1)[0], S_OK);
    if before == 3 {
        eprintln!("note: the delayed write finished before GET_VRING_BASE was sent");
    }
    fault
        .config()
        .delay_polls
        .store(0, std::sync::atomic::Ordering::Relaxed);
    drop(fe);
    delete_when_idle("vslow.0");
}

/// A ring marked broken (here by a descriptor loop) takes nothing more, but comes back when
/// the frontend sets it up again: after GET_VRING_BASE and a restart in the same session (a
/// guest device reset), and in a new session (QEMU reconnecting or restarted).
#[test]
fn broken_ring_recovers_on_reset_and_reconnect() {
    init();
    malloc("VhMallocBroken", 1024, 4096);
    let path = controller("vbroken.0", "VhMallocBroken", false);
    let data = pattern(4096, 21);
    let break_ring = |fe: &mut Fe| {
        fe.desc(0, HDR, 16, 1, 1);
        fe.desc(1, DATA, 512, 1, 0);
        fe.publish(0);
        assert!(fe.wait_used(Duration::from_millis(300)).is_none(), "loop");
        // A good request behind it is not taken either.
        fe.desc(0, HDR, 16, 1, 1);
        fe.desc(1, STATUS, 1, 2, 0);
        fe.publish(0);
        assert!(
            fe.wait_used(Duration::from_millis(300)).is_none(),
            "broken ring stays stopped"
        );
    };

    let mut fe = Fe::connect(&path);
    assert_eq!(fe.request(T_OUT, 0, &data, false).0, S_OK);
    break_ring(&mut fe);
    // Device reset: the ring is stopped (the loop's head was consumed, the good one not) and
    // set up again from fresh ring memory.
    assert_eq!(fe.fe.get_vring_base(0).unwrap(), 2);
    fe.mem.put(AVAIL, &[0u8; 6 + 2 * QSIZE as usize]);
    fe.mem.put(USED, &[0u8; 6 + 8 * QSIZE as usize]);
    fe.start_queue_at(0, DESC, AVAIL, USED, 0);
    (fe.avail_idx, fe.used_seen) = (0, 0);
    assert_eq!(
        fe.read(0, 4096),
        (S_OK, data.clone()),
        "same session, reset"
    );
    break_ring(&mut fe);
    drop(fe);

    // A new session starts with healthy rings.
    let mut fe = Fe::connect(&path);
    assert_eq!(fe.read(0, 4096), (S_OK, data), "new session");
    drop(fe);
    delete_when_idle("vbroken.0");
}

/// CONFIGURE_MEM_SLOTS: guest memory built and changed region by region with ADD_MEM_REG and
/// REM_MEM_REG while a ring runs; bad regions are refused and leave the session working.
#[test]
fn memory_slots_add_and_remove() {
    init();
    malloc("VhMallocSlots", 1024, 4096);
    let path = controller("vslots.0", "VhMallocSlots", false);
    let mut conn = handshake(&path, VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS, false);
    assert_eq!(conn.get_max_mem_slots().unwrap(), 32);
    // Region A: the usual 4 MiB at GPA 0 (rings, headers, buffers). Region B: 1 MiB of
    // another memfd, from file offset 1 MiB, at GPA 16 MiB.
    let mem = Mem::new();
    let other = Mem::new();
    const B_GPA: u64 = 0x100_0000;
    let b = vhost_user::VhostUserMemoryRegionInfo {
        guest_phys_addr: B_GPA,
        memory_size: 1 << 20,
        userspace_addr: UVA_BASE + B_GPA,
        mmap_offset: 1 << 20,
        mmap_handle: other.file.as_raw_fd(),
    };
    conn.add_mem_region(&mem.region()).expect("add A");
    conn.add_mem_region(&b).expect("add B");
    let kick = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let call = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let mut fe = Fe {
        fe: conn,
        mem,
        kick,
        _call: call,
        avail_idx: 0,
        used_seen: 0,
        off: 0,
        more_kicks: Vec::new(),
    };
    fe.start_queue_at(0, DESC, AVAIL, USED, 0);

    // A write whose data lies in region B, read back into region A.
    let data = pattern(4096, 77);
    other.put((1 << 20) + 0x1000, &data);
    fe.mem
        .put(HDR, &[T_OUT.to_le_bytes(), [0; 4], [0; 4], [0; 4]].concat());
    fe.mem.put(HDR + 8, &16u64.to_le_bytes());
    fe.mem.put(STATUS, &[0xff]);
    fe.desc(0, HDR, 16, 1, 1);
    fe.desc(1, B_GPA + 0x1000, 4096, 1, 2);
    fe.desc(2, STATUS, 1, 2, 0);
    fe.publish(0);
    fe.wait_used(Duration::from_secs(10)).expect("write done");
    assert_eq!(fe.mem.slice(STATUS, 1)[0], S_OK);
    assert_eq!(fe.read(16, 4096), (S_OK, data.clone()));

    // Region A (holding the rings) goes and comes back, as QEMU replaces a region in two
    // steps: a request published in between waits, it is not lost and the ring not broken.
    fe.fe.remove_mem_region(&fe.mem.region()).expect("remove A");
    fe.mem.put(HDR, &[T_IN.to_le_bytes(), [0; 4]].concat());
    fe.mem.put(HDR + 8, &16u64.to_le_bytes());
    fe.mem.put(STATUS, &[0xff]);
    fe.mem.put(DATA, &[0u8; 4096]);
    fe.desc(0, HDR, 16, 1, 1);
    fe.desc(1, DATA, 4096, 1 | 2, 2);
    fe.desc(2, STATUS, 1, 2, 0);
    fe.publish(0);
    assert!(
        fe.wait_used(Duration::from_millis(300)).is_none(),
        "no ring runs without its memory"
    );
    fe.fe.add_mem_region(&fe.mem.region()).expect("add A again");
    fe.wait_used(Duration::from_secs(10))
        .expect("the waiting request completes once memory is back");
    assert_eq!(fe.mem.slice(STATUS, 1)[0], S_OK);
    assert_eq!(fe.mem.slice(DATA, 4096), &data[..]);

    // Bad regions: each refused, the session and the ring carry on.
    let at = |gpa: u64, uva: u64, size: u64, off: u64| vhost_user::VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: uva,
        mmap_offset: off,
        mmap_handle: other.file.as_raw_fd(),
    };
    let fd_len = MEM_SIZE as u64;
    let bad = [
        (at(0x1000, UVA_BASE + (1 << 40), 4096, 0), "GPA overlaps A"),
        (
            at(1 << 40, UVA_BASE + 0x1000, 4096, 0),
            "frontend VA overlaps A",
        ),
        (at(B_GPA, UVA_BASE + (1 << 40), 4096, 0), "GPA equals B's"),
        (
            at(1 << 40, 1 << 41, 4096, fd_len),
            "offset at the end of the fd",
        ),
        (
            at(1 << 40, 1 << 41, 8192, fd_len - 4096),
            "region runs past the fd",
        ),
        (
            at(1 << 40, 1 << 41, 4096, u64::MAX - 4095),
            "offset + size overflows",
        ),
        (
            at(u64::MAX - 4095, 1 << 41, 8192, 0),
            "GPA + size overflows",
        ),
        (at(1 << 40, 1 << 41, 4096, 100), "unaligned offset"),
    ];
    for (r, why) in &bad {
        assert!(
            fe.fe.add_mem_region(r).is_err(),
            "ADD_MEM_REG refused: {why}"
        );
    }
    let missing = at(1 << 40, 1 << 41, 4096, 0);
    assert!(
        fe.fe.remove_mem_region(&missing).is_err(),
        "REM_MEM_REG of an unknown region refused"
    );
    let mut b_wrong_size = b;
    b_wrong_size.memory_size = 4096;
    assert!(
        fe.fe.remove_mem_region(&b_wrong_size).is_err(),
        "REM_MEM_REG must name the whole region"
    );
    // The table is bounded: 30 more one-page regions fit, the 33rd region does not.
    for k in 0..30u64 {
        let r = at((1 << 40) + k * 4096, (1 << 41) + k * 4096, 4096, k * 4096);
        fe.fe.add_mem_region(&r).expect("slot free");
    }
    let r = at((1 << 40) + 30 * 4096, (1 << 41) + 30 * 4096, 4096, 0);
    assert!(fe.fe.add_mem_region(&r).is_err(), "slots full");
    assert_eq!(fe.read(16, 4096), (S_OK, data.clone()), "still serving");

    // Region B removed: a request pointing into it no longer reaches any memory (the ring
    // breaks rather than touch it).
    fe.fe.remove_mem_region(&b).expect("remove B");
    fe.mem
        .put(HDR, &[T_OUT.to_le_bytes(), [0; 4], [0; 4], [0; 4]].concat());
    fe.mem.put(STATUS, &[0xff]);
    fe.desc(0, HDR, 16, 1, 1);
    fe.desc(1, B_GPA + 0x1000, 4096, 1, 2);
    fe.desc(2, STATUS, 1, 2, 0);
    fe.publish(0);
    assert!(fe.wait_used(Duration::from_millis(300)).is_none());
    assert_eq!(fe.mem.slice(STATUS, 1)[0], 0xff, "status untouched");
    assert!(fe.fe.get_features().is_ok(), "session still answers");
    drop(fe);
    delete_when_idle("vslots.0");
}

/// A thin bdev grown with `bdev_thin_resize` while a frontend is attached: the frontend gets
/// CONFIG_CHANGE_MSG, GET_CONFIG reports the new capacity, and the new blocks take I/O that
/// was refused before; the old data stays.
#[test]
fn thin_bdev_resize_notifies_the_frontend() {
    init();
    malloc("VhThinData", 4096, 4096);
    malloc("VhThinMeta", 1024, 4096);
    thin_call(
        "bdev_thin_pool_create",
        json!({"name": "vhpool", "data_bdev": "VhThinData", "metadata_bdev": "VhThinMeta"}),
    );
    thin_call(
        "bdev_thin_create",
        json!({"pool": "vhpool", "name": "VhThin0", "size_in_mib": 4}),
    );
    let path = controller("vthin.0", "VhThin0", false);
    let mut fe = Fe::connect_with(
        &path,
        Mem::new(),
        None,
        0,
        VhostUserProtocolFeatures::BACKEND_REQ,
        false,
    );
    let (ours, theirs) = UnixStream::pair().unwrap();
    fe.fe.set_backend_request_fd(&theirs).unwrap();
    let capacity = |fe: &mut Fe| {
        let cfg = fe
            .fe
            .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0; 8])
            .unwrap()
            .1;
        u64::from_le_bytes(cfg[0..8].try_into().unwrap())
    };
    assert_eq!(capacity(&mut fe), 8192, "4 MiB in sectors");
    let old = pattern(4096, 31);
    assert_eq!(fe.request(T_OUT, 8184, &old, false).0, S_OK, "last block");
    let new = pattern(4096, 32);
    assert_eq!(
        fe.request(T_OUT, 12000, &new, false).0,
        S_IOERR,
        "past the end"
    );

    thin_call(
        "bdev_thin_resize",
        json!({"name": "VhThin0", "size_in_mib": 8}),
    );
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut hdr = [0u8; 12];
    std::io::Read::read_exact(&mut &ours, &mut hdr).expect("config change message");
    assert_eq!(
        u32::from_le_bytes(hdr[0..4].try_into().unwrap()),
        2,
        "CONFIG_CHANGE_MSG"
    );
    assert_eq!(capacity(&mut fe), 16384, "8 MiB in sectors");
    assert_eq!(fe.request(T_OUT, 12000, &new, false).0, S_OK);
    assert_eq!(fe.read(12000, 4096), (S_OK, new));
    assert_eq!(fe.read(8184, 4096), (S_OK, old));
    drop(fe);
    delete_when_idle("vthin.0");
}

/// RESET_DEVICE (a guest resetting its virtio device) stops and forgets the rings but keeps
/// the memory table: QEMU sets the rings up again without resending memory it already added.
#[test]
fn reset_device_keeps_the_memory_table() {
    init();
    malloc("VhMallocReset", 1024, 4096);
    let path = controller("vreset.0", "VhMallocReset", false);
    let mut fe = Fe::connect_with(
        &path,
        Mem::new(),
        None,
        0,
        VhostUserProtocolFeatures::RESET_DEVICE,
        false,
    );
    let data = pattern(4096, 41);
    assert_eq!(fe.request(T_OUT, 24, &data, false).0, S_OK);
    assert_eq!(fe.fe.get_vring_base(0).unwrap(), 1);
    fe.fe.reset_device().expect("RESET_DEVICE");
    // A request published now is not taken: the ring is reset, not running.
    fe.mem.put(AVAIL, &[0u8; 6 + 2 * QSIZE as usize]);
    fe.mem.put(USED, &[0u8; 6 + 8 * QSIZE as usize]);
    (fe.avail_idx, fe.used_seen) = (0, 0);
    fe.desc(0, HDR, 16, 1, 1);
    fe.desc(1, STATUS, 1, 2, 0);
    fe.publish(0);
    assert!(fe.wait_used(Duration::from_millis(300)).is_none());
    (fe.avail_idx, fe.used_seen) = (0, 0);
    fe.mem.put(AVAIL, &[0u8; 6 + 2 * QSIZE as usize]);
    // The guest driver starts over: features, rings from index 0; no memory table sent.
    let f = fe.fe.get_features().unwrap();
    fe.fe.set_features(f & !(1 << 29)).unwrap();
    fe.start_queue_at(0, DESC, AVAIL, USED, 0);
    assert_eq!(fe.read(24, 4096), (S_OK, data));
    drop(fe);
    delete_when_idle("vreset.0");
}

/// The frontend disconnects while requests are in flight (their bdev I/O held back): the
/// backend completes them before it lets the session go, and a frontend reconnecting with the
/// same memory and in-flight area at base = used->idx (as QEMU resumes) gets every request,
/// including one published while disconnected, completed exactly once.
#[test]
fn frontend_disconnect_mid_flight_then_reconnect() {
    init();
    malloc("VhMallocDiscBase", 1024, 4096);
    let fault = bdev::testing::fault::create("VhDisc", "VhMallocDiscBase").expect("fault bdev");
    let path = controller("vdisc.0", "VhDisc", false);
    let (mut fe, area, area_file) = Fe::connect_new_inflight(&path, Mem::new(), 0);
    assert_eq!(fe.request(T_OUT, 0, &[1u8; 4096], false).0, S_OK);
    // SAFETY: mapping the in-flight memfd read-only (its size is in `area`); checked against
    // MAP_FAILED and unmapped at the end.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            area.mmap_size as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            area_file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    // SAFETY: `map` covers `mmap_size` bytes until the munmap below; we only read bytes.
    let shared = unsafe { std::slice::from_raw_parts(map.cast::<u8>(), area.mmap_size as usize) };
    let flag = |head: u16| shared[16 + 16 * usize::from(head)];

    // A write on chain head h: header, 4 KiB of pattern h at block h, status.
    let lay_out = |fe: &Fe, h: u16| {
        let hdr_gpa = HDR + 16 * u64::from(h);
        let buf = DATA + 0x1000 * u64::from(h);
        let hdr = [T_OUT.to_le_bytes(), [0; 4]].concat();
        fe.mem.put(hdr_gpa, &hdr);
        fe.mem.put(hdr_gpa + 8, &(u64::from(h) * 8).to_le_bytes());
        fe.mem.put(buf, &pattern(4096, h as u8));
        fe.mem.put(STATUS + u64::from(h), &[0xff]);
        fe.desc(h, hdr_gpa, 16, 1, h + 1);
        fe.desc(h + 1, buf, 4096, 1, h + 2);
        fe.desc(h + 2, STATUS + u64::from(h), 1, 2, 0);
    };
    fault.config().delay_polls.store(300_000, Ordering::Relaxed);
    let held = [0u16, 3, 6, 9];
    for h in held {
        lay_out(&fe, h);
        fe.publish(h);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !held.iter().all(|h| flag(*h) == 1) {
        assert!(std::time::Instant::now() < deadline, "requests taken");
        std::thread::sleep(Duration::from_millis(1));
    }
    if fe.mem.u16_at(USED + 2) != 1 {
        eprintln!("note: the held writes finished before the frontend disconnected");
    }
    let Fe { fe: conn, mem, .. } = fe;
    drop(conn);
    fault.config().delay_polls.store(0, Ordering::Relaxed);
    // The new session is answered only once the old one is gone, and that waits for the held
    // requests: they are on the used ring by the time the handshake returns.
    let mut conn = handshake(&path, VhostUserProtocolFeatures::INFLIGHT_SHMFD, false);
    conn.set_inflight_fd(&area, area_file.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    let fe = Fe::detached(mem);
    let base = fe.mem.u16_at(USED + 2);
    assert_eq!(
        base, 5,
        "the held requests completed before the session ended"
    );
    assert!(held.iter().all(|h| flag(*h) == 0), "none left in flight");
    // The driver adds a request (head 12 at avail index 5) while no ring runs.
    lay_out(&fe, 12);
    fe.mem.put(AVAIL + 4 + 2 * 5, &12u16.to_le_bytes());
    fe.mem.put(AVAIL + 2, &6u16.to_le_bytes());
    let mut fe = Fe::finish_connect(conn, fe.mem, base);
    fe.avail_idx = 6;
    let mut seen = Vec::new();
    for k in 1..5u64 {
        let e = fe.mem.slice(USED + 4 + 8 * k, 8);
        seen.push(u16::from_le_bytes([e[0], e[1]]));
    }
    seen.sort_unstable();
    assert_eq!(seen, held, "each held request completed once");
    let (id, _) = fe
        .wait_used(Duration::from_secs(10))
        .expect("the request published between the sessions completes");
    assert_eq!(id, 12);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(fe.mem.u16_at(USED + 2), 6, "nothing completed twice");
    for h in [0u16, 3, 6, 9, 12] {
        assert_eq!(fe.mem.slice(STATUS + u64::from(h), 1)[0], S_OK);
        assert_eq!(
            fe.read(u64::from(h) * 8, 4096),
            (S_OK, pattern(4096, h as u8))
        );
    }
    // SAFETY: unmapping what we mapped above; `shared` is not used after this.
    unsafe { libc::munmap(map, area.mmap_size as usize) };
    drop(fe);
    delete_when_idle("vdisc.0");
}

/// A guest resets its device several times while booting (RESET_DEVICE); a later resize must
/// still reach the frontend, so the reset keeps the negotiated protocol features and the
/// backend request channel.
#[test]
fn resize_after_reset_device_still_notifies() {
    init();
    bdev::null::create(bdev::null::NullOpts {
        name: "VhNullReset".into(),
        num_blocks: 2048,
        block_size: 512,
        uuid: None,
    })
    .expect("null bdev");
    let path = controller("vresreset.0", "VhNullReset", false);
    let mut fe = Fe::connect_with(
        &path,
        Mem::new(),
        None,
        0,
        VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::RESET_DEVICE,
        false,
    );
    let (ours, theirs) = UnixStream::pair().unwrap();
    fe.fe.set_backend_request_fd(&theirs).unwrap();
    fe.fe.get_vring_base(0).unwrap();
    fe.fe.reset_device().expect("RESET_DEVICE");
    fe.fe.reset_device().expect("RESET_DEVICE again");
    let (_, resize) = bdev::rpc_methods()
        .into_iter()
        .find(|(m, _)| *m == "bdev_null_resize")
        .unwrap();
    resize(json!({"name": "VhNullReset", "new_size": 2})).expect("resize");
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut hdr = [0u8; 12];
    std::io::Read::read_exact(&mut &ours, &mut hdr).expect("config change message");
    assert_eq!(u32::from_le_bytes(hdr[0..4].try_into().unwrap()), 2);
    drop(fe);
    delete_when_idle("vresreset.0");
}
