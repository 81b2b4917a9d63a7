//! Listening sockets. Each bound address has one acceptor poller on reactor 0; accepted
//! connections go round-robin to the reactors, where they become qpairs. Several
//! subsystems may share one address (reference counted); when the last one lets go, the
//! socket is unbound and every connection that came in through it is closed.
//!
//! Sockets are bound with `SO_REUSEADDR`, so a target restarted right after a crash can
//! listen again at once although the dead one's connections linger in `TIME_WAIT` /
//! `FIN_WAIT2` on the port (set explicitly here rather than relying on what the standard
//! library happens to do in `TcpListener::bind`).

use std::cell::Cell;
use std::io::{self, ErrorKind as IoKind};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reactor::{PollStatus, ReactorId};

use super::qpair::Qpair;
use crate::error::NvmfError;
use crate::subsystem::{ListenAddr, Target};

/// Most connections accepted per poll.
const MAX_ACCEPTS_PER_POLL: usize = 16;
/// Off the reactors (config loading at start-up), how long a bind refused with
/// `EADDRINUSE` is retried: a killed predecessor's listening socket outlives it for a few
/// milliseconds while the kernel tears down its io_uring (whose armed poll holds it).
const STARTUP_BIND_RETRY: Duration = Duration::from_secs(2);

/// A bound listen address.
#[derive(Debug)]
pub struct Listener {
    /// The address.
    pub addr: ListenAddr,
    /// The actual bound socket address (port resolved).
    pub bound: SocketAddr,
    /// The socket (shared with the acceptor).
    sock: Arc<TcpListener>,
    /// Set to stop the acceptor.
    stop: Arc<AtomicBool>,
    /// Subsystems (and the discovery subsystem) using it.
    refs: usize,
}

/// Takes a reference on `addr`, binding it if new.
pub fn acquire(t: &mut Target, addr: &ListenAddr) -> Result<(), NvmfError> {
    if let Some(l) = t.listeners.iter_mut().find(|l| l.addr == *addr) {
        l.refs += 1;
        return Ok(());
    }
    let opts = t
        .transport
        .clone()
        .ok_or_else(|| NvmfError::invalid("transport TCP not created (nvmf_create_transport)"))?;
    let ip: std::net::IpAddr = addr
        .traddr
        .parse()
        .map_err(|_| NvmfError::invalid(format!("invalid traddr '{}'", addr.traddr)))?;
    let port: u16 = addr
        .trsvcid
        .parse()
        .map_err(|_| NvmfError::invalid(format!("invalid trsvcid '{}'", addr.trsvcid)))?;
    let rt = crate::runtime()
        .ok_or_else(|| NvmfError::invalid("reactors not running (nvmf::set_runtime)"))?;
    let sock = bind_retrying(SocketAddr::new(ip, port), opts.acceptor_backlog).map_err(|e| {
        NvmfError::errno(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("listen on {ip}:{port}: {e}"),
        )
    })?;
    let bound = sock
        .local_addr()
        .map_err(|e| NvmfError::errno(libc::EIO, format!("listen socket: {e}")))?;
    let sock = Arc::new(sock);
    let stop = Arc::new(AtomicBool::new(false));
    let (sock2, stop2, addr2) = (sock.clone(), stop.clone(), addr.clone());
    rt.send_msg(ReactorId::new(0), move || {
        start_acceptor(sock2, stop2, opts, addr2)
    });
    t.listeners.push(Listener {
        addr: addr.clone(),
        bound,
        sock,
        stop,
        refs: 1,
    });
    Ok(())
}

/// Drops a reference on `addr`; the last one stops the acceptor and closes every
/// connection that came in through it.
pub fn release(t: &mut Target, addr: &ListenAddr) {
    let Some(i) = t.listeners.iter().position(|l| l.addr == *addr) else {
        return;
    };
    t.listeners[i].refs -= 1;
    if t.listeners[i].refs == 0 {
        let l = t.listeners.remove(i);
        l.unlisten();
        if let Some(rt) = crate::runtime() {
            rt.send_msg(ReactorId::new(0), || {});
        }
        super::close_listener_qpairs(addr);
    }
}

impl Listener {
    /// Stops listening now, so that the port may be bound again as soon as this returns
    /// (the acceptor, told by the flag, drops the socket on its next poll): `shutdown` takes
    /// a listening socket out of the LISTEN state, and a socket that is not listening does
    /// not keep a new `SO_REUSEADDR` socket from binding the port.
    fn unlisten(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // SAFETY: shutdown(2) on a socket this listener keeps open (`self.sock`); no
        // pointers. Failure (already shut down) changes nothing.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// [`bind_listener`]; off the reactors (where waiting is allowed) a port still held by a
/// listening socket is retried for up to [`STARTUP_BIND_RETRY`].
fn bind_retrying(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let deadline = Instant::now() + STARTUP_BIND_RETRY;
    loop {
        match bind_listener(addr, backlog) {
            Err(e)
                if e.raw_os_error() == Some(libc::EADDRINUSE)
                    && reactor::try_current().is_none()
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// A non-blocking listening socket on `addr` with `SO_REUSEADDR` set before `bind`.
pub fn bind_listener(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let domain = match addr.ip() {
        IpAddr::V4(_) => libc::AF_INET,
        IpAddr::V6(_) => libc::AF_INET6,
    };
    let ty = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socket(2) takes no pointers; the result is checked below.
    let raw = unsafe { libc::socket(domain, ty, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor we just created and own; OwnedFd closes it on every
    // path below.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let one: libc::c_int = 1;
    // SAFETY: a valid socket, a pointer to a live c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let rc = match addr {
        SocketAddr::V4(a) => {
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: a valid socket; `sa` is a live sockaddr_in of the length given.
            unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
        }
        SocketAddr::V6(a) => {
            let sa = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: a valid socket; `sa` is a live sockaddr_in6 of the length given.
            unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sa as *const libc::sockaddr_in6).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        }
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let backlog = libc::c_int::try_from(backlog).unwrap_or(libc::c_int::MAX);
    // SAFETY: listen(2) on a valid, bound socket; no pointers.
    if unsafe { libc::listen(fd.as_raw_fd(), backlog) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpListener::from(fd))
}

/// Stops every acceptor.
pub fn stop_all(t: &mut Target) {
    for l in t.listeners.drain(..) {
        l.unlisten();
    }
    if let Some(rt) = crate::runtime() {
        rt.send_msg(ReactorId::new(0), || {});
    }
}

/// Runs on reactor 0: the acceptor poller for `sock`, bound for `addr`.
fn start_acceptor(
    sock: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    opts: crate::subsystem::TransportOpts,
    addr: ListenAddr,
) {
    let next = Cell::new(0usize);
    let armed: Rc<Cell<Option<reactor::OpId>>> = Rc::new(Cell::new(None));
    let handle: Rc<Cell<Option<reactor::PollerHandle>>> = Rc::new(Cell::new(None));
    let h2 = handle.clone();
    let mut sock = Some(sock);
    let p = reactor::register_poller("nvmf_acceptor", move || {
        if stop.load(Ordering::Relaxed) {
            if let Some(id) = armed.take() {
                // The armed poll holds a reference on the socket: cancel it so the port
                // is released.
                reactor::ring().abandon(id);
            }
            sock = None;
            if let Some(h) = h2.take() {
                h.unregister();
            }
            return PollStatus::Idle;
        }
        let Some(l) = sock.as_ref() else {
            return PollStatus::Idle;
        };
        // A readiness poll is armed on the listening socket while nothing waits to be
        // accepted; until it completes, accept(2) is not called. (A failing accept4 is not
        // cheap: the kernel allocates and frees a socket inode each time. Called every tick
        // of a polling reactor it took a third of the target's CPU under load.)
        if armed.get().is_some() {
            return PollStatus::Idle;
        }
        let mut busy = false;
        for _ in 0..MAX_ACCEPTS_PER_POLL {
            match l.accept() {
                Ok((s, _peer)) => {
                    busy = true;
                    if s.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let _ = s.set_nodelay(true);
                    let n = reactor::nr_reactors();
                    let target = ReactorId::new((next.get() % n) as u32);
                    next.set(next.get() + 1);
                    let o = opts.clone();
                    let a = addr.clone();
                    reactor::send_msg(target, move || Qpair::spawn(s, o, a));
                }
                Err(e) if e.kind() == IoKind::WouldBlock => break,
                Err(_) => break,
            }
        }
        if !busy {
            let op = reactor::Op::PollAdd {
                fd: reactor::Fd::Raw(l.as_raw_fd()),
                events: libc::POLLIN as u32,
            };
            let a = armed.clone();
            let cb = reactor::OnComplete::closure(move |_| a.set(None));
            if let Ok(id) = reactor::ring().submit(op, cb) {
                armed.set(Some(id));
            }
        }
        PollStatus::from_busy(busy)
    });
    handle.set(Some(p));
}

#[cfg(test)]
mod tests;
