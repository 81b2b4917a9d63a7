//! Test bdevs that wrap any bdev: [`fault`] injects errors, latency, torn writes and a crash
//! at the N-th flush; [`record`] logs every write and flush in order and materialises the
//! device contents at any prefix of that log (for crash-consistency tests).

pub mod fault;
pub mod record;
