//! The discovery log page (LID 70h): a 1024-byte header and one 1024-byte entry per
//! (subsystem, listener) that the requesting host may access.

use std::net::SocketAddr;

use crate::spec::put_str;
use crate::subsystem::target;

/// Builds the full log image for `hostnqn`; `local` is the address the request came in
/// on (reported instead of a wildcard listener address).
pub fn log_page(hostnqn: &str, local: SocketAddr) -> Vec<u8> {
    let t = target();
    let aq_depth = t
        .transport
        .as_ref()
        .map_or(32, |o| o.max_aq_depth)
        .min(0xFFFF) as u16;
    let mut entries: Vec<[u8; 1024]> = Vec::new();
    for s in t.subsystems.values() {
        if !s.host_allowed(hostnqn) {
            continue;
        }
        let st = s.lock();
        for a in &st.listeners {
            let mut e = [0u8; 1024];
            e[0] = 3; // TCP
            e[1] = if a.adrfam.eq_ignore_ascii_case("ipv6") {
                2
            } else {
                1
            };
            e[2] = 2; // NVMe subsystem
            e[3] = 0x02 | 0x04; // secure channel not required; SQ flow control disable OK
            let portid = t
                .listeners
                .iter()
                .position(|l| l.addr == *a)
                .map_or(0, |i| i as u16 + 1);
            e[4..6].copy_from_slice(&portid.to_le_bytes());
            e[6..8].copy_from_slice(&0xFFFFu16.to_le_bytes());
            e[8..10].copy_from_slice(&aq_depth.to_le_bytes());
            put_str(&mut e[32..64], &a.trsvcid, b' ');
            put_str(&mut e[256..512], &s.nqn, 0);
            let traddr = if a.traddr == "0.0.0.0" || a.traddr == "::" {
                local.ip().to_string()
            } else {
                a.traddr.clone()
            };
            put_str(&mut e[512..768], &traddr, b' ');
            entries.push(e);
        }
    }
    let mut p = vec![0u8; 1024 + entries.len() * 1024];
    p[0..8].copy_from_slice(&t.genctr.to_le_bytes());
    p[8..16].copy_from_slice(&(entries.len() as u64).to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        p[1024 + i * 1024..2048 + i * 1024].copy_from_slice(e);
    }
    p
}
