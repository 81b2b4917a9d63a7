//! Copy-on-write B+tree in the dm-btree on-disk format.

pub mod node;
