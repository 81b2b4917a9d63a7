//! JSON-RPC handlers of the uring bdev: `bdev_uring_create`, `bdev_uring_delete`,
//! `bdev_uring_rescan`, with SPDK's parameter names.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::bdev::Uuid;
use crate::error::Result;
use crate::rpc_util::parse_params;

/// `bdev_uring_create` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UringCreateParams {
    /// Bdev name.
    pub name: String,
    /// Path of the file or block device.
    pub filename: String,
    /// Block size in bytes (detected if absent).
    pub block_size: Option<u32>,
    /// Optional UUID.
    pub uuid: Option<String>,
}

/// `bdev_uring_create`: returns the bdev name.
pub fn bdev_uring_create(params: Value) -> Result<Value> {
    let p: UringCreateParams = parse_params("bdev_uring_create", params)?;
    let uuid = p.uuid.as_deref().map(Uuid::parse).transpose()?;
    let bdev = super::create(super::UringOpts {
        name: p.name,
        filename: p.filename,
        block_size: p.block_size.filter(|&b| b != 0),
        uuid,
    })?;
    Ok(json!(crate::Bdev::name(bdev.as_ref())))
}

/// `bdev_uring_delete` / `bdev_uring_rescan` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UringNameParams {
    /// Bdev name.
    pub name: String,
}

/// `bdev_uring_delete`: returns `true`.
pub fn bdev_uring_delete(params: Value) -> Result<Value> {
    let p: UringNameParams = parse_params("bdev_uring_delete", params)?;
    super::delete(&p.name)?;
    Ok(json!(true))
}

/// `bdev_uring_rescan`: returns `true`.
pub fn bdev_uring_rescan(params: Value) -> Result<Value> {
    let p: UringNameParams = parse_params("bdev_uring_rescan", params)?;
    super::rescan(&p.name)?;
    Ok(json!(true))
}
