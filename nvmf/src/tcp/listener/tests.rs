//! `bind_listener`: SO_REUSEADDR is set, and it is what lets a port whose previous owner's
//! connections still linger (TIME_WAIT, as after a crash) be bound again at once.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::bind_listener;

fn reuseaddr(fd: &impl AsRawFd) -> libc::c_int {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket; `v` and `len` are live and `len` is `v`'s size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt");
    v
}

/// Binds an IPv4 TCP socket without SO_REUSEADDR (what a naive listener does).
fn plain_bind(addr: SocketAddr) -> std::io::Result<OwnedFd> {
    let SocketAddr::V4(a) = addr else {
        unreachable!("IPv4 only")
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
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

#[test]
fn listener_rebinds_over_lingering_connections() {
    let l = bind_listener("127.0.0.1:0".parse().unwrap(), 16).expect("bind");
    assert_eq!(reuseaddr(&l), 1, "SO_REUSEADDR set");
    let addr = l.local_addr().unwrap();
    let mut client = TcpStream::connect(addr).expect("connect");
    let t = Instant::now();
    let server = loop {
        match l.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(t.elapsed() < Duration::from_secs(5), "accept");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    // The server side closes first (as a crashed target's kernel does), then the client:
    // the server's end of the connection sits in TIME_WAIT on the port.
    drop(server);
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(client.read(&mut [0u8; 16]).unwrap(), 0, "EOF");
    drop(client);
    drop(l);
    let err = plain_bind(addr).expect_err("the port is still held without SO_REUSEADDR");
    assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
    let again = bind_listener(addr, 16).expect("rebind with SO_REUSEADDR");
    assert_eq!(again.local_addr().unwrap(), addr);
}

#[test]
fn listener_reports_bind_errors() {
    let l = bind_listener("127.0.0.1:0".parse().unwrap(), 16).expect("bind");
    let addr = l.local_addr().unwrap();
    // A second listener on a port that is listening is refused even with SO_REUSEADDR.
    let e = bind_listener(addr, 16).expect_err("in use");
    assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE));
    // IPv6 loopback works too (where the host has it).
    if let Ok(l6) = bind_listener("[::1]:0".parse().unwrap(), 16) {
        assert_eq!(reuseaddr(&l6), 1);
        assert!(TcpStream::connect(l6.local_addr().unwrap()).is_ok());
    }
}

#[test]
fn unlisten_frees_the_port_at_once() {
    let sock = bind_listener("127.0.0.1:0".parse().unwrap(), 16).expect("bind");
    let bound = sock.local_addr().unwrap();
    let l = super::Listener {
        addr: crate::subsystem::ListenAddr {
            adrfam: "IPv4".into(),
            traddr: "127.0.0.1".into(),
            trsvcid: bound.port().to_string(),
        },
        bound,
        sock: std::sync::Arc::new(sock),
        stop: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
        refs: 0,
    };
    assert!(bind_listener(bound, 16).is_err(), "still listening");
    l.unlisten();
    assert!(
        l.stop.load(std::sync::atomic::Ordering::SeqCst),
        "acceptor told"
    );
    // The socket is still open (the acceptor drops it later), yet the port is free.
    let again = bind_listener(bound, 16).expect("rebind right after unlisten");
    assert!(TcpStream::connect(bound).is_ok());
    assert!(l.sock.accept().is_err(), "the old socket accepts nothing");
    drop(again);
}

#[test]
fn startup_bind_waits_for_a_dying_listener() {
    let held = bind_listener("127.0.0.1:0".parse().unwrap(), 16).expect("bind");
    let addr = held.local_addr().unwrap();
    // The previous owner's socket goes away 100 ms later (as a killed daemon's does).
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        drop(held);
    });
    let start = Instant::now();
    let l = super::bind_retrying(addr, 16).expect("bound once the old socket is gone");
    assert!(start.elapsed() >= Duration::from_millis(50));
    t.join().unwrap();
    // A port that stays taken is still refused, after the bounded wait.
    let start = Instant::now();
    let e = super::bind_retrying(addr, 16).expect_err("still listening");
    assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE));
    assert!(start.elapsed() >= super::STARTUP_BIND_RETRY);
    drop(l);
}
