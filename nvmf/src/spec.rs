//! NVMe and NVMe-oF constants and the two queue-entry formats (SQE, CQE): re-exported from
//! `nvme::proto::spec`, where the wire format shared with the host lives.

pub use nvme::proto::spec::*;
