//! The NVMe wire format, written once for both ends: NVMe and NVMe-oF structures and
//! constants ([`spec`]) and the NVMe/TCP PDU codec ([`pdu`]). The target (`nvmf`) and the
//! host ([`crate::host`]) both use it. Nothing here does I/O or keeps connection state.

pub mod pdu;
pub mod spec;
