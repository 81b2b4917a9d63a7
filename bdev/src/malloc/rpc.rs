//! JSON-RPC handlers of the malloc bdev: `bdev_malloc_create`, `bdev_malloc_delete`, with
//! SPDK's parameter names.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::bdev::Uuid;
use crate::error::{BdevError, Result};
use crate::rpc_util::parse_params;

/// `bdev_malloc_create` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MallocCreateParams {
    /// Bdev name (default `MallocN`).
    pub name: Option<String>,
    /// Size in blocks.
    pub num_blocks: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Optional UUID.
    pub uuid: Option<String>,
    /// Split boundary in blocks.
    pub optimal_io_boundary: Option<u32>,
    /// Metadata size: only 0 is supported.
    pub md_size: Option<u32>,
    /// Metadata interleave: only false is supported.
    pub md_interleave: Option<bool>,
    /// DIF type: only 0 is supported.
    pub dif_type: Option<u32>,
    /// DIF position: accepted, meaningless without DIF.
    pub dif_is_head_of_md: Option<bool>,
    /// Physical block size: accepted if it is a multiple of `block_size`.
    pub physical_block_size: Option<u32>,
    /// NUMA node: accepted and ignored (one allocation for all reactors).
    pub numa_id: Option<i32>,
}

/// `bdev_malloc_create`: returns the bdev name.
pub fn bdev_malloc_create(params: Value) -> Result<Value> {
    let p: MallocCreateParams = parse_params("bdev_malloc_create", params)?;
    if p.md_size.unwrap_or(0) != 0 || p.md_interleave.unwrap_or(false) {
        return Err(BdevError::invalid(
            "bdev_malloc_create: metadata (md_size) is not supported",
        ));
    }
    if p.dif_type.unwrap_or(0) != 0 {
        return Err(BdevError::invalid(
            "bdev_malloc_create: DIF (dif_type) is not supported",
        ));
    }
    if let Some(pbs) = p.physical_block_size {
        if p.block_size == 0 || pbs % p.block_size != 0 {
            return Err(BdevError::invalid(format!(
                "bdev_malloc_create: physical_block_size {pbs} is not a multiple of block_size {}",
                p.block_size
            )));
        }
    }
    let uuid = p.uuid.as_deref().map(Uuid::parse).transpose()?;
    let bdev = super::create(super::MallocOpts {
        name: p.name,
        num_blocks: p.num_blocks,
        block_size: p.block_size,
        uuid,
        optimal_io_boundary: p.optimal_io_boundary.unwrap_or(0),
    })?;
    Ok(json!(crate::Bdev::name(bdev.as_ref())))
}

/// `bdev_malloc_delete` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MallocDeleteParams {
    /// Bdev name.
    pub name: String,
}

/// `bdev_malloc_delete`: returns `true`.
pub fn bdev_malloc_delete(params: Value) -> Result<Value> {
    let p: MallocDeleteParams = parse_params("bdev_malloc_delete", params)?;
    super::delete(&p.name)?;
    Ok(json!(true))
}
