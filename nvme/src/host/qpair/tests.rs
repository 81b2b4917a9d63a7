//! The qpair against a scripted target on a loopback socket (driven off-reactor by polling
//! in a loop): MAXH2CDATA splitting of R2T data, C2HData in several PDUs, and R2T misuse.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use super::*;
use crate::proto::pdu::{self, C2hFlags, HostPdu, RecvLimits};
use crate::proto::spec::nvm;

fn opts(port: u16) -> QpairOpts {
    QpairOpts {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        qid: 1,
        nr_entries: 8,
        hdgst: false,
        ddgst: true,
        kato_ms: 0,
        cntlid: 1,
        subnqn: "nqn.test".into(),
        hostnqn: "nqn.host".into(),
        hostid: [1; 16],
        connect_timeout: Duration::from_secs(5),
        max_xfer: 1 << 20,
        stats: Arc::new(HostStats::default()),
    }
}

/// The target side: reads one whole host PDU.
fn read_pdu(s: &mut TcpStream, lim: &RecvLimits) -> Vec<u8> {
    let mut ch = [0u8; 8];
    s.read_exact(&mut ch).expect("ch");
    let plen = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]) as usize;
    let mut pdu = ch.to_vec();
    pdu.resize(plen, 0);
    s.read_exact(&mut pdu[8..]).expect("pdu");
    let _ = lim;
    pdu
}

/// Accepts, answers ICReq (MAXH2CDATA `maxh2c`, data digest) and Connect; returns the
/// stream and the limits for decoding later host PDUs.
fn handshake(l: &TcpListener, maxh2c: u32) -> (TcpStream, RecvLimits) {
    let (mut s, _) = l.accept().expect("accept");
    let mut lim = RecvLimits {
        ic_done: false,
        hdgst: false,
        ddgst: false,
        max_capsule_data: 8192,
        max_h2c_data: maxh2c,
    };
    let ic = read_pdu(&mut s, &lim);
    let Ok(HostPdu::IcReq { dgst, .. }) = pdu::decode(&ic, &lim) else {
        panic!("no ICReq")
    };
    s.write_all(&pdu::ic_resp(dgst, maxh2c)).expect("icresp");
    lim.ic_done = true;
    lim.ddgst = true;
    let c = read_pdu(&mut s, &lim);
    let Ok(HostPdu::CapsuleCmd {
        sqe,
        data,
        ddgst_ok,
    }) = pdu::decode(&c, &lim)
    else {
        panic!("no Connect")
    };
    assert!(ddgst_ok && data.len() == 1024 && sqe.opc() == fabrics::OPCODE);
    let mut out = Vec::new();
    let cqe = Cqe {
        cid: sqe.cid(),
        ..Cqe::default()
    };
    pdu::push_capsule_resp(&mut out, &cqe.encode(), false);
    s.write_all(&out).expect("connect resp");
    (s, lim)
}

/// Polls `q` until `done` says so (or 10 s pass); returns every event.
fn drive(q: &mut Qpair, mut done: impl FnMut(&[Event]) -> bool) -> Vec<Event> {
    let mut events = Vec::new();
    let t0 = Instant::now();
    while !done(&events) {
        q.poll(&mut events);
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "timed out; state {:?}",
            q.state()
        );
        thread::sleep(Duration::from_micros(200));
    }
    events
}

fn connected(ev: &[Event]) -> bool {
    ev.iter().any(|e| matches!(e, Event::Connected { .. }))
}

fn done_with(ev: &[Event]) -> Option<(&Result<Cqe, HostError>, &CmdBuf)> {
    ev.iter().find_map(|e| match e {
        Event::Done { result, buf, .. } => Some((result, buf)),
        _ => None,
    })
}

#[test]
fn r2t_data_is_split_at_maxh2cdata_and_c2h_data_reassembled() {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let data: Vec<u8> = (0..16384u32).map(|i| (i * 7 % 251) as u8).collect();
    let want = data.clone();
    let target = thread::spawn(move || {
        let (mut s, lim) = handshake(&l, 4096);
        // Write: R2T for everything, expect four 4 KiB H2CData PDUs.
        let c = read_pdu(&mut s, &lim);
        let Ok(HostPdu::CapsuleCmd { sqe, data, .. }) = pdu::decode(&c, &lim) else {
            panic!("no write")
        };
        assert!(data.is_empty(), "16 KiB must not go in-capsule");
        let mut out = Vec::new();
        pdu::push_r2t(&mut out, sqe.cid(), 9, 0, 16384, false);
        s.write_all(&out).expect("r2t");
        let mut got = Vec::new();
        for i in 0..4 {
            let p = read_pdu(&mut s, &lim);
            let Ok(HostPdu::H2CData {
                ttag,
                datao,
                last,
                data,
                ddgst_ok,
                ..
            }) = pdu::decode(&p, &lim)
            else {
                panic!("no H2CData")
            };
            assert_eq!(
                (ttag, datao as usize, last, data.len(), ddgst_ok),
                (9, i * 4096, i == 3, 4096, true)
            );
            got.extend_from_slice(data);
        }
        assert!(got == want);
        out.clear();
        pdu::push_capsule_resp(
            &mut out,
            &Cqe {
                cid: sqe.cid(),
                ..Cqe::default()
            }
            .encode(),
            false,
        );
        s.write_all(&out).expect("write resp");
        out.clear();
        // Read: data in three C2HData PDUs, then the response.
        let c = read_pdu(&mut s, &lim);
        let Ok(HostPdu::CapsuleCmd { sqe, .. }) = pdu::decode(&c, &lim) else {
            panic!("no read")
        };
        for (off, len, last) in [(0, 1000, false), (1000, 3000, false), (4000, 96, true)] {
            let f = C2hFlags {
                last,
                success: false,
                hdgst: false,
                ddgst: true,
            };
            pdu::push_c2h_data(
                &mut out,
                sqe.cid(),
                off,
                &want[off as usize..(off + len) as usize],
                f,
            );
        }
        pdu::push_capsule_resp(
            &mut out,
            &Cqe {
                cid: sqe.cid(),
                ..Cqe::default()
            }
            .encode(),
            false,
        );
        s.write_all(&out).expect("write");
        let mut sink = [0u8; 64];
        let _ = s.read(&mut sink);
    });
    let mut q = Qpair::connect(opts(port)).expect("connect");
    drive(&mut q, connected);
    let mut sqe = Sqe::new(nvm::WRITE, 1);
    sqe.set_cdw(12, 3);
    q.submit(sqe, Dir::Write, CmdBuf::Owned(data), 0, 1)
        .map_err(|e| e.0)
        .expect("submit");
    let ev = drive(&mut q, |e| done_with(e).is_some());
    assert!(matches!(done_with(&ev), Some((Ok(c), _)) if c.is_success()));
    q.submit(
        Sqe::new(nvm::READ, 1),
        Dir::Read,
        CmdBuf::Owned(vec![0; 4096]),
        0,
        2,
    )
    .map_err(|e| e.0)
    .expect("submit");
    let ev = drive(&mut q, |e| done_with(e).is_some());
    match done_with(&ev) {
        Some((Ok(c), CmdBuf::Owned(v))) => {
            assert!(c.is_success());
            assert!(
                v[..]
                    == (0..4096u32)
                        .map(|i| (i * 7 % 251) as u8)
                        .collect::<Vec<_>>()[..]
            );
        }
        _ => panic!("read failed"),
    }
    assert_eq!(
        q.opts
            .stats
            .nr_h2c_data
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
    assert_eq!(
        q.opts
            .stats
            .nr_c2h_data
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    drop(q);
    target.join().expect("target");
}

#[test]
fn r2t_for_a_read_or_beyond_the_data_is_a_protocol_error() {
    for case in 0..3 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let target = thread::spawn(move || {
            let (mut s, lim) = handshake(&l, 4096);
            let c = read_pdu(&mut s, &lim);
            let Ok(HostPdu::CapsuleCmd { sqe, .. }) = pdu::decode(&c, &lim) else {
                panic!("no command")
            };
            let mut out = Vec::new();
            match case {
                0 => pdu::push_r2t(&mut out, sqe.cid(), 1, 0, 4096, false), // R2T for a read
                1 => pdu::push_r2t(&mut out, sqe.cid(), 1, 0, 8192, false), // past the data
                _ => {
                    // C2HData past the read's length.
                    let f = C2hFlags {
                        last: true,
                        success: false,
                        hdgst: false,
                        ddgst: true,
                    };
                    pdu::push_c2h_data(&mut out, sqe.cid(), 4000, &[0; 200], f)
                }
            }
            s.write_all(&out).expect("write");
            let mut sink = [0u8; 4096];
            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        });
        let mut q = Qpair::connect(opts(port)).expect("connect");
        drive(&mut q, connected);
        let (dir, opc) = if case == 1 {
            (Dir::Write, nvm::WRITE)
        } else {
            (Dir::Read, nvm::READ)
        };
        q.submit(Sqe::new(opc, 1), dir, CmdBuf::Owned(vec![0; 4096]), 0, 5)
            .map_err(|e| e.0)
            .expect("submit");
        let ev = drive(&mut q, |e| e.iter().any(|e| matches!(e, Event::Failed(_))));
        assert!(
            matches!(done_with(&ev), Some((Err(e), _)) if e.errno() == libc::EIO),
            "case {case}: the command fails with EIO"
        );
        let failed = ev.iter().find_map(|e| match e {
            Event::Failed(e) => Some(e.clone()),
            _ => None,
        });
        let e = failed.expect("failed");
        assert_eq!(e.errno(), libc::EPROTO, "case {case}: {e}");
        assert_eq!(q.state(), QpairState::Failed);
        assert!(q
            .submit(Sqe::new(nvm::FLUSH, 1), Dir::None, CmdBuf::None, 0, 6)
            .is_err());
        drop(q);
        target.join().expect("target");
    }
}
