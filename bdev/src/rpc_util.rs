//! Shared glue for the modules' `rpc.rs` files: parameter parsing with precise errors and
//! the method table `thind` registers.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{BdevError, Result};

/// A JSON-RPC handler: params in (absent = `null`), result or error with `errno()` out.
pub type RpcHandler = fn(Value) -> Result<Value>;

/// Parses `params` into `T`, mapping serde's message into an `EINVAL` error.
pub fn parse_params<T: DeserializeOwned>(method: &str, params: Value) -> Result<T> {
    let params = if params.is_null() {
        Value::Object(Default::default())
    } else {
        params
    };
    serde_json::from_value(params).map_err(|e| {
        BdevError::new(
            crate::error::ErrorKind::InvalidParams,
            format!("{method}: invalid parameters: {e}"),
        )
    })
}

/// Every bdev RPC method: `(SPDK method name, handler)`.
pub fn rpc_methods() -> Vec<(&'static str, RpcHandler)> {
    vec![
        (
            "bdev_null_create",
            crate::null::rpc::bdev_null_create as RpcHandler,
        ),
        ("bdev_null_delete", crate::null::rpc::bdev_null_delete),
        ("bdev_null_resize", crate::null::rpc::bdev_null_resize),
        ("bdev_malloc_create", crate::malloc::rpc::bdev_malloc_create),
        ("bdev_malloc_delete", crate::malloc::rpc::bdev_malloc_delete),
        ("bdev_uring_create", crate::uring::rpc::bdev_uring_create),
        ("bdev_uring_delete", crate::uring::rpc::bdev_uring_delete),
        ("bdev_uring_rescan", crate::uring::rpc::bdev_uring_rescan),
        ("bdev_get_bdevs", bdev_get_bdevs),
        ("bdev_get_iostat", bdev_get_iostat),
    ]
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GetBdevsParams {
    name: Option<String>,
    #[allow(dead_code)]
    timeout: Option<u64>,
}

/// `bdev_get_bdevs` (name optional).
pub fn bdev_get_bdevs(params: Value) -> Result<Value> {
    let p: GetBdevsParams = parse_params("bdev_get_bdevs", params)?;
    crate::registry().get_bdevs_json(p.name.as_deref())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GetIostatParams {
    name: Option<String>,
    names: Option<Vec<String>>,
    #[allow(dead_code)]
    per_channel: Option<bool>,
    reset_mode: Option<String>,
}

/// `bdev_get_iostat`: all bdevs, or `name`, or the list `names` (SPDK 26's client sends
/// `names`). `per_channel` is accepted and the sum over channels is reported; resetting the
/// counters (`reset_mode` other than `none`) is refused.
pub fn bdev_get_iostat(params: Value) -> Result<Value> {
    let p: GetIostatParams = parse_params("bdev_get_iostat", params)?;
    if let Some(mode) = p.reset_mode.as_deref().filter(|m| *m != "none") {
        return Err(BdevError::new(
            crate::error::ErrorKind::Unsupported,
            format!("bdev_get_iostat: reset_mode '{mode}' is not supported"),
        ));
    }
    let mut names: Vec<String> = p.names.unwrap_or_default();
    names.extend(p.name);
    crate::registry().iostat_json(&names)
}
