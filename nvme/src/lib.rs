//! NVMe protocol and the NVMe/TCP host (initiator) with its bdev module.
//!
//! - [`proto`]: the wire format (NVMe queue entries, constants, NVMe/TCP PDUs), shared with
//!   the target crate `nvmf`.

pub mod proto;
