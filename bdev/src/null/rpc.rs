//! JSON-RPC handlers of the null bdev: `bdev_null_create`, `bdev_null_delete`,
//! `bdev_null_resize`, with SPDK's parameter names.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::bdev::Uuid;
use crate::error::{BdevError, Result};
use crate::rpc_util::parse_params;

/// `bdev_null_create` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NullCreateParams {
    /// Bdev name.
    pub name: String,
    /// Size in blocks.
    pub num_blocks: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Optional UUID.
    pub uuid: Option<String>,
    /// Metadata size: only 0 is supported.
    pub md_size: Option<u32>,
    /// Metadata interleave: only false is supported.
    pub md_interleave: Option<bool>,
    /// DIF type: only 0 is supported.
    pub dif_type: Option<u32>,
    /// DIF position: accepted, meaningless without DIF.
    pub dif_is_head_of_md: Option<bool>,
}

/// `bdev_null_create`: returns the bdev name.
pub fn bdev_null_create(params: Value) -> Result<Value> {
    let p: NullCreateParams = parse_params("bdev_null_create", params)?;
    if p.md_size.unwrap_or(0) != 0 || p.md_interleave.unwrap_or(false) {
        return Err(BdevError::invalid(
            "bdev_null_create: metadata (md_size) is not supported",
        ));
    }
    if p.dif_type.unwrap_or(0) != 0 {
        return Err(BdevError::invalid(
            "bdev_null_create: DIF (dif_type) is not supported",
        ));
    }
    let uuid = p.uuid.as_deref().map(Uuid::parse).transpose()?;
    let bdev = super::create(super::NullOpts {
        name: p.name,
        num_blocks: p.num_blocks,
        block_size: p.block_size,
        uuid,
    })?;
    Ok(json!(crate::Bdev::name(bdev.as_ref())))
}

/// `bdev_null_delete` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NullDeleteParams {
    /// Bdev name.
    pub name: String,
}

/// `bdev_null_delete`: returns `true`.
pub fn bdev_null_delete(params: Value) -> Result<Value> {
    let p: NullDeleteParams = parse_params("bdev_null_delete", params)?;
    super::delete(&p.name)?;
    Ok(json!(true))
}

/// `bdev_null_resize` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NullResizeParams {
    /// Bdev name.
    pub name: String,
    /// New size in MiB.
    pub new_size: u64,
}

/// `bdev_null_resize`: returns `true`.
pub fn bdev_null_resize(params: Value) -> Result<Value> {
    let p: NullResizeParams = parse_params("bdev_null_resize", params)?;
    super::resize(&p.name, p.new_size)?;
    Ok(json!(true))
}
