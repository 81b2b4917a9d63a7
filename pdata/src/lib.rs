//! `pdata`: persistent data, byte-compatible with Linux dm-thin pool metadata.
//!
//! Layers, bottom up (each only uses the ones below):
//!
//! ```text
//!  thin::PoolMetadata        superblock, device details, 2-level mapping tree, held root
//!  btree                     copy-on-write B+tree (dm-btree node format), value-type refcounts
//!  space_map                 data sm (index B-tree) and metadata sm (index block), in-core sm
//!  transaction_manager       shadowing, shadow set, commit ordering
//!  block_manager             bounded cache, locks, validators on read and write
//!  block_io                  BlockIo: whole 4 KiB blocks + flush (file / memory)
//! ```
//!
//! Format types (`codec`, `checksum`, `validator`, `*::format`, `thin::superblock`,
//! `thin::device_details`, `thin::block_time`, `btree::node`) are separate from the logic.
//! The on-disk format is documented in `../shared/spec/dm-thin-metadata.md`.

pub mod block_io;
pub mod block_manager;
pub mod btree;
pub mod checksum;
pub mod codec;
pub mod error;
pub mod space_map;
pub mod thin;
pub mod transaction_manager;
pub mod validator;

#[cfg(test)]
mod format_tests;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use block_io::{BlockIo, FileBlockIo, MemBlockIo, BLOCK_SIZE};
pub use error::{Error, ErrorKind, Result};
