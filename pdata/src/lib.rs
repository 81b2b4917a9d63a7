//! `pdata`: persistent data, byte-compatible with Linux dm-thin pool metadata
//! (`../shared/spec/dm-thin-metadata.md`; acceptance oracle thin-provisioning-tools 0.9.0).
//!
//! Layers, bottom up (each uses only the ones below it):
//!
//! ```text
//!  thin::PoolMetadata     superblock, device details, 2-level mapping tree, held root,
//!                         commit order (§13), time semantics (§11), read-only latch
//!  btree                  copy-on-write B+tree (dm-btree nodes), value-type refcounts,
//!                         top-down split / rebalance keeping every non-root ≥ max/3
//!  space_map              SpaceMap trait; data sm (index B-tree) and metadata sm (index block)
//!                         over one low-level overlay design (space_map::ll); in-core model
//!  transaction_manager    shadow set, new_block, shadow with inc-children, metadata sm commit
//!  block_manager          bounded clock cache, read locks, validators on read and write-out
//!  block_io               BlockIo: whole 4 KiB blocks + flush (FileBlockIo, MemBlockIo)
//! ```
//!
//! Format types (`codec`, `checksum`, `validator`, `btree::node`, `space_map::format`,
//! `thin::superblock`, `thin::device_details`, `thin::block_time`) are separate from the logic
//! and decode untrusted bytes without panicking.
//!
//! Threading: everything here is single-owner (`&mut self`); `PoolMetadata` is `Send` so it
//! can live on a metadata worker. The data path uses `try_find_block`, which never does I/O.
//!
//! Limits: B-tree depth [`btree::MAX_DEPTH`]; cache at least
//! [`block_manager::MIN_CACHE_BLOCKS`]; metadata device 4,161,600 blocks; data blocks 2^40;
//! thin ids 2^24; pool time 2^24 − 1 snapshots. Memory: the block cache, plus per open
//! transaction one overlay entry per changed block count and the details of touched devices.

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
