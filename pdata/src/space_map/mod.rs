//! Space maps: reference counts of metadata and data blocks.

pub mod format;
