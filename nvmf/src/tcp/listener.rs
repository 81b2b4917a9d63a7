//! Listening sockets. Each bound address has one acceptor poller on reactor 0; accepted
//! connections go round-robin to the reactors, where they become qpairs. Several
//! subsystems may share one address (reference counted).

use std::cell::Cell;
use std::io::ErrorKind as IoKind;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use reactor::{PollStatus, ReactorId};

use super::qpair::Qpair;
use crate::error::NvmfError;
use crate::subsystem::{ListenAddr, Target};

/// Most connections accepted per poll.
const MAX_ACCEPTS_PER_POLL: usize = 16;

/// A bound listen address.
#[derive(Debug)]
pub struct Listener {
    /// The address.
    pub addr: ListenAddr,
    /// The actual bound socket address (port resolved).
    pub bound: SocketAddr,
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
    let sock = TcpListener::bind((ip, port)).map_err(|e| {
        NvmfError::errno(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("listen on {ip}:{port}: {e}"),
        )
    })?;
    sock.set_nonblocking(true)
        .map_err(|e| NvmfError::errno(libc::EIO, format!("listen socket: {e}")))?;
    let bound = sock
        .local_addr()
        .map_err(|e| NvmfError::errno(libc::EIO, format!("listen socket: {e}")))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    rt.send_msg(ReactorId::new(0), move || start_acceptor(sock, stop2, opts));
    t.listeners.push(Listener {
        addr: addr.clone(),
        bound,
        stop,
        refs: 1,
    });
    Ok(())
}

/// Drops a reference on `addr`; the last one stops the acceptor.
pub fn release(t: &mut Target, addr: &ListenAddr) {
    let Some(i) = t.listeners.iter().position(|l| l.addr == *addr) else {
        return;
    };
    t.listeners[i].refs -= 1;
    if t.listeners[i].refs == 0 {
        let l = t.listeners.remove(i);
        l.stop.store(true, Ordering::SeqCst);
        if let Some(rt) = crate::runtime() {
            rt.send_msg(ReactorId::new(0), || {});
        }
    }
}

/// Stops every acceptor.
pub fn stop_all(t: &mut Target) {
    for l in t.listeners.drain(..) {
        l.stop.store(true, Ordering::SeqCst);
    }
    if let Some(rt) = crate::runtime() {
        rt.send_msg(ReactorId::new(0), || {});
    }
}

/// Runs on reactor 0: the acceptor poller for `sock`.
fn start_acceptor(sock: TcpListener, stop: Arc<AtomicBool>, opts: crate::subsystem::TransportOpts) {
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
                    reactor::send_msg(target, move || Qpair::spawn(s, o));
                }
                Err(e) if e.kind() == IoKind::WouldBlock => break,
                Err(_) => break,
            }
        }
        if !busy && reactor::is_interrupt_mode() && armed.get().is_none() {
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
