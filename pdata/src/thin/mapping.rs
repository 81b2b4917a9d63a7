//! Value types of the two-level mapping tree (spec §7): the bottom level's `block_time`
//! values reference data blocks; the top level's values are subtree roots.

use crate::btree::{self, ValueRefs};
use crate::error::Result;
use crate::space_map::disk::DataSm;
use crate::thin::block_time::BlockTime;
use crate::thin::MAPPING_VALUE_SIZE;
use crate::transaction_manager::TransactionManager;

fn data_block(v: &[u8]) -> Result<u64> {
    Ok(BlockTime::from_u64(btree::value_u64(v)?).block)
}

/// Bottom-level values: inc/dec the data space map; equal iff the same data block.
#[derive(Debug)]
pub struct DataRefs<'a> {
    /// The data space map.
    pub data_sm: &'a mut DataSm,
}

impl ValueRefs for DataRefs<'_> {
    fn inc(&mut self, tm: &mut TransactionManager, v: &[u8]) -> Result<()> {
        self.data_sm.ll.inc(&mut tm.bm, data_block(v)?)
    }
    fn dec(&mut self, tm: &mut TransactionManager, v: &[u8]) -> Result<()> {
        self.data_sm.ll.dec(&mut tm.bm, data_block(v)?).map(|_| ())
    }
    fn equal(&self, a: &[u8], b: &[u8]) -> bool {
        matches!((data_block(a), data_block(b)), (Ok(x), Ok(y)) if x == y)
    }
}

/// Top-level values: inc = metadata inc of the subtree root; dec = delete the subtree.
#[derive(Debug)]
pub struct SubtreeRefs<'a> {
    /// The data space map (for the leaves of deleted subtrees).
    pub data_sm: &'a mut DataSm,
}

impl ValueRefs for SubtreeRefs<'_> {
    fn inc(&mut self, tm: &mut TransactionManager, v: &[u8]) -> Result<()> {
        tm.inc(btree::value_u64(v)?)
    }
    fn dec(&mut self, tm: &mut TransactionManager, v: &[u8]) -> Result<()> {
        let root = btree::value_u64(v)?;
        let mut refs = DataRefs {
            data_sm: &mut *self.data_sm,
        };
        btree::delete_tree(tm, root, MAPPING_VALUE_SIZE, &mut refs)
    }
}
