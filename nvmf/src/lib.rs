//! nvmf: NVMe-oF/TCP target (issue: NVMe-oF/TCP target). Not yet implemented.
