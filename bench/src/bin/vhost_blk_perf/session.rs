//! The vhost-user side of a run, through the rust-vmm `vhost` crate's `Frontend`: connect,
//! negotiate features the way QEMU's vhost-user-blk does, read the device config, hand over
//! guest memory, start the queues, and stop them at the end (GET_VRING_BASE).
//!
//! Every message waits at most [`REPLY_TIMEOUT`] for the backend, so a backend that accepts
//! and then hangs gives an error instead of a stuck benchmark.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::indexing_slicing))]

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vhost_user::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost_user::vhost_user::{Frontend, VhostUserFrontend};
use vhost_user::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::ring::{GuestMem, MemLayout};

/// Longest wait for any reply of the backend.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of `virtio_blk_config` read: capacity, size_max, seg_max, geometry, blk_size.
const CONFIG_BYTES: u32 = 24;

/// What the backend told us about the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Device {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Logical block size (512 unless BLK_SIZE says otherwise).
    pub blk_size: u32,
    /// The device offered VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// Virtio features acknowledged.
    pub acked_features: u64,
}

/// A connected, negotiated frontend with its notification eventfds.
pub struct Session {
    fe: Frontend,
    kicks: Vec<EventFd>,
    // The call and error eventfds are handed to the backend and never read: the driver polls.
    _calls: Vec<EventFd>,
    /// The device.
    pub device: Device,
}

fn bit(n: u32) -> u64 {
    1u64 << n
}

/// Connects to `socket` and negotiates `nr_queues` queues, EVENT_IDX if `event_idx`.
pub fn connect(socket: &Path, nr_queues: u16, event_idx: bool) -> Result<Session, String> {
    let stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    let mut fe = Frontend::from_stream(stream, nr_queues.into());
    let offered = fe
        .get_features()
        .map_err(|e| format!("GET_FEATURES: {e}"))?;
    if offered & bit(VIRTIO_F_VERSION_1) == 0 {
        return Err("backend does not offer VIRTIO_F_VERSION_1".into());
    }
    let proto_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if offered & proto_bit == 0 {
        return Err("backend does not offer vhost-user protocol features (no GET_CONFIG)".into());
    }
    if event_idx && offered & bit(VIRTIO_RING_F_EVENT_IDX) == 0 {
        return Err("--event-idx: backend does not offer VIRTIO_RING_F_EVENT_IDX".into());
    }
    let pf = negotiate_protocol(&mut fe, nr_queues)?;
    fe.set_owner().map_err(|e| format!("SET_OWNER: {e}"))?;
    let mut want = bit(VIRTIO_F_VERSION_1) | proto_bit;
    for f in [VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_RO] {
        want |= offered & bit(f);
    }
    if nr_queues > 1 {
        want |= offered & bit(VIRTIO_BLK_F_MQ);
    }
    if event_idx {
        want |= bit(VIRTIO_RING_F_EVENT_IDX);
    }
    let device = read_config(&mut fe, want)?;
    fe.set_features(want)
        .map_err(|e| format!("SET_FEATURES: {e}"))?;
    if pf.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        // From here on every message is acknowledged, so a refused memory table or ring
        // address is reported by the message that caused it.
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    Ok(Session {
        fe,
        kicks: Vec::new(),
        _calls: Vec::new(),
        device,
    })
}

fn negotiate_protocol(
    fe: &mut Frontend,
    nr_queues: u16,
) -> Result<VhostUserProtocolFeatures, String> {
    let offered = fe
        .get_protocol_features()
        .map_err(|e| format!("GET_PROTOCOL_FEATURES: {e}"))?;
    if !offered.contains(VhostUserProtocolFeatures::CONFIG) {
        return Err("backend lacks the CONFIG protocol feature (device capacity unknown)".into());
    }
    let pf = offered
        & (VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK);
    fe.set_protocol_features(pf)
        .map_err(|e| format!("SET_PROTOCOL_FEATURES: {e}"))?;
    if nr_queues > 1 {
        if !pf.contains(VhostUserProtocolFeatures::MQ) {
            return Err(format!(
                "--queues {nr_queues}: backend lacks the MQ protocol feature"
            ));
        }
        let max = fe
            .get_queue_num()
            .map_err(|e| format!("GET_QUEUE_NUM: {e}"))?;
        if u64::from(nr_queues) > max {
            return Err(format!("--queues {nr_queues}: backend supports {max}"));
        }
    } else if pf.contains(VhostUserProtocolFeatures::MQ) {
        fe.get_queue_num()
            .map_err(|e| format!("GET_QUEUE_NUM: {e}"))?;
    }
    Ok(pf)
}

fn read_config(fe: &mut Frontend, acked: u64) -> Result<Device, String> {
    let (_, cfg) = fe
        .get_config(0, CONFIG_BYTES, VhostUserConfigFlags::empty(), &[0; 24])
        .map_err(|e| format!("GET_CONFIG: {e}"))?;
    let field = |at: usize, n: usize| -> Result<u64, String> {
        let b = cfg.get(at..at + n).ok_or("GET_CONFIG: short reply")?;
        Ok(b.iter().rev().fold(0u64, |v, x| (v << 8) | u64::from(*x)))
    };
    let capacity_sectors = field(0, 8)?;
    let blk_size = if acked & bit(VIRTIO_BLK_F_BLK_SIZE) != 0 {
        u32::try_from(field(20, 4)?).map_err(|e| e.to_string())?
    } else {
        512
    };
    if blk_size < 512 || !blk_size.is_power_of_two() {
        return Err(format!("GET_CONFIG: implausible blk_size {blk_size}"));
    }
    Ok(Device {
        capacity_sectors,
        blk_size,
        read_only: acked & bit(VIRTIO_BLK_F_RO) != 0,
        acked_features: acked,
    })
}

impl Session {
    /// SET_MEM_TABLE with the one guest-memory region.
    pub fn set_mem_table(&mut self, mem: &GuestMem) -> Result<(), String> {
        let region = mem.region_info()?;
        self.fe
            .set_mem_table(&[region])
            .map(drop)
            .map_err(|e| format!("SET_MEM_TABLE: {e}"))
    }

    /// Starts queue `q`: size, ring addresses (our virtual addresses), base 0, call and kick
    /// eventfds, enable.
    pub fn start_queue(
        &mut self,
        mem: &GuestMem,
        layout: &MemLayout,
        q: usize,
        size: u16,
    ) -> Result<(), String> {
        let l = layout.queues.get(q).ok_or("queue outside the layout")?;
        let ctx = |what: &str, e: vhost_user::Error| format!("queue {q}: {what}: {e}");
        self.fe
            .set_vring_num(q, size)
            .map_err(|e| ctx("SET_VRING_NUM", e))?;
        let cfg = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: mem.uva(l.desc),
            used_ring_addr: mem.uva(l.used),
            avail_ring_addr: mem.uva(l.avail),
            log_addr: None,
        };
        self.fe
            .set_vring_addr(q, &cfg)
            .map_err(|e| ctx("SET_VRING_ADDR", e))?;
        self.fe
            .set_vring_base(q, 0)
            .map_err(|e| ctx("SET_VRING_BASE", e))?;
        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"));
        let (call, kick) = (eventfd()?, eventfd()?);
        self.fe
            .set_vring_call(q, &call)
            .map_err(|e| ctx("SET_VRING_CALL", e))?;
        self.fe
            .set_vring_kick(q, &kick)
            .map_err(|e| ctx("SET_VRING_KICK", e))?;
        self.fe
            .set_vring_enable(q, true)
            .map_err(|e| ctx("SET_VRING_ENABLE", e))?;
        self._calls.push(call);
        self.kicks.push(kick);
        Ok(())
    }

    /// Notifies the device that queue `q` has new requests.
    pub fn kick(&self, q: usize) -> Result<(), String> {
        let k = self.kicks.get(q).ok_or("kick on a queue never started")?;
        match k.write(1) {
            Ok(()) => Ok(()),
            // A full counter means kicks are already pending: the device will look anyway.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(format!("queue {q}: kick: {e}")),
        }
    }

    /// Stops queue `q` (GET_VRING_BASE) and returns the backend's next avail index.
    pub fn stop_queue(&mut self, q: usize) -> Result<u32, String> {
        self.fe
            .get_vring_base(q)
            .map_err(|e| format!("queue {q}: GET_VRING_BASE: {e}"))
    }
}
