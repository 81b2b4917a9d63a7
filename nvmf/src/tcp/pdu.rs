//! NVMe/TCP PDU codec: re-exported from `nvme::proto::pdu`, where the wire format shared
//! with the host lives (its tests are there too).

pub use nvme::proto::pdu::*;
