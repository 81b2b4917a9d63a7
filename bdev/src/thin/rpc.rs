//! `bdev_thin_*` RPC handlers. Each is asynchronous: it validates its parameters, runs the
//! operation on a control thread (never blocking the calling reactor) and calls `done` exactly
//! once with the JSON result or an error (`-errno` + message for the RPC layer).

use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    create_pool, create_thin_blocking, delete_pool_blocking, delete_thin_blocking,
    grow_pool_blocking, pool_names, pool_status_blocking, release_metadata_snap_blocking,
    reserve_metadata_snap_blocking, resize_thin_blocking, set_transaction_id_blocking,
    snapshot_blocking, spawn_control, PoolOpts,
};
use crate::error::{BdevError, ErrorKind, Result};

/// Completion of an asynchronous thin RPC.
pub type ThinRpcDone = Box<dyn FnOnce(Result<Value, BdevError>) + Send>;

/// An asynchronous thin RPC handler.
pub type ThinRpcHandler = fn(Value, ThinRpcDone);

fn parse<T: for<'de> Deserialize<'de>>(params: Value) -> Result<T> {
    serde_json::from_value(params)
        .map_err(|e| BdevError::new(ErrorKind::InvalidParams, format!("invalid parameters: {e}")))
}

fn mib_to_bytes(mib: u64) -> Result<u64> {
    mib.checked_mul(1 << 20)
        .filter(|b| *b > 0)
        .ok_or_else(|| BdevError::invalid(format!("size_in_mib {mib} out of range")))
}

/// `bdev_thin_pool_create` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolCreateParams {
    name: String,
    data_bdev: String,
    metadata_bdev: String,
    data_block_size: Option<u64>,
    low_water_mark: Option<u64>,
    zero_new_blocks: Option<bool>,
    discard_passdown: Option<bool>,
    error_if_no_space: Option<bool>,
    commit_interval_ms: Option<u64>,
}

/// `{name}` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameParams {
    name: String,
}

/// `bdev_thin_pool_get_pools` parameters.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GetPoolsParams {
    name: Option<String>,
}

/// `bdev_thin_pool_set_transaction_id` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetTidParams {
    name: String,
    old_id: u64,
    new_id: u64,
}

/// `bdev_thin_create` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThinCreateParams {
    pool: String,
    name: String,
    size_in_mib: u64,
    thin_id: Option<u64>,
}

/// `bdev_thin_snapshot` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotParams {
    thin_name: String,
    snapshot_name: String,
}

/// `bdev_thin_resize` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeParams {
    name: String,
    size_in_mib: u64,
}

fn run<P: for<'de> Deserialize<'de> + Send + 'static>(
    params: Value,
    done: ThinRpcDone,
    f: impl FnOnce(P) -> Result<Value> + Send + 'static,
) {
    match parse::<P>(params) {
        Ok(p) => spawn_control(move || f(p), done),
        Err(e) => done(Err(e)),
    }
}

/// `bdev_thin_pool_create` → pool name.
pub fn bdev_thin_pool_create(params: Value, done: ThinRpcDone) {
    let p: PoolCreateParams = match parse(params) {
        Ok(p) => p,
        Err(e) => return done(Err(e)),
    };
    let mut o = PoolOpts::new(&p.name, &p.data_bdev, &p.metadata_bdev);
    if let Some(v) = p.data_block_size {
        o.data_block_size = v;
    }
    if let Some(v) = p.low_water_mark {
        o.low_water_mark = v;
    }
    if let Some(v) = p.zero_new_blocks {
        o.zero_new_blocks = v;
    }
    if let Some(v) = p.discard_passdown {
        o.discard_passdown = v;
    }
    if let Some(v) = p.error_if_no_space {
        o.error_if_no_space = v;
    }
    if let Some(v) = p.commit_interval_ms {
        o.commit_interval_ms = v;
    }
    create_pool(o, move |r| done(r.map(Value::String)));
}

/// `bdev_thin_pool_delete` → true.
pub fn bdev_thin_pool_delete(params: Value, done: ThinRpcDone) {
    run(params, done, |p: NameParams| {
        delete_pool_blocking(&p.name).map(|_| json!(true))
    });
}

/// `bdev_thin_pool_get_pools` → array of pool status objects.
pub fn bdev_thin_pool_get_pools(params: Value, done: ThinRpcDone) {
    let params = if params.is_null() { json!({}) } else { params };
    run(params, done, |p: GetPoolsParams| {
        let names = match p.name {
            Some(n) => vec![n],
            None => pool_names(),
        };
        let mut out = Vec::new();
        for n in names {
            out.push(pool_status_blocking(&n)?);
        }
        Ok(Value::Array(out))
    });
}

/// `bdev_thin_pool_grow` → true.
pub fn bdev_thin_pool_grow(params: Value, done: ThinRpcDone) {
    run(params, done, |p: NameParams| {
        grow_pool_blocking(&p.name).map(|_| json!(true))
    });
}

/// `bdev_thin_pool_set_transaction_id` → true.
pub fn bdev_thin_pool_set_transaction_id(params: Value, done: ThinRpcDone) {
    run(params, done, |p: SetTidParams| {
        set_transaction_id_blocking(&p.name, p.old_id, p.new_id).map(|_| json!(true))
    });
}

/// `bdev_thin_pool_reserve_metadata_snap` → held root block.
pub fn bdev_thin_pool_reserve_metadata_snap(params: Value, done: ThinRpcDone) {
    run(params, done, |p: NameParams| {
        reserve_metadata_snap_blocking(&p.name).map(|b| json!(b))
    });
}

/// `bdev_thin_pool_release_metadata_snap` → true.
pub fn bdev_thin_pool_release_metadata_snap(params: Value, done: ThinRpcDone) {
    run(params, done, |p: NameParams| {
        release_metadata_snap_blocking(&p.name).map(|_| json!(true))
    });
}

/// `bdev_thin_create` → bdev name (block size 4096).
pub fn bdev_thin_create(params: Value, done: ThinRpcDone) {
    run(params, done, |p: ThinCreateParams| {
        let bytes = mib_to_bytes(p.size_in_mib)?;
        create_thin_blocking(&p.pool, &p.name, bytes, 4096, p.thin_id).map(Value::String)
    });
}

/// `bdev_thin_snapshot` → bdev name.
pub fn bdev_thin_snapshot(params: Value, done: ThinRpcDone) {
    run(params, done, |p: SnapshotParams| {
        snapshot_blocking(&p.thin_name, &p.snapshot_name).map(Value::String)
    });
}

/// `bdev_thin_resize` → true.
pub fn bdev_thin_resize(params: Value, done: ThinRpcDone) {
    run(params, done, |p: ResizeParams| {
        let bytes = mib_to_bytes(p.size_in_mib)?;
        resize_thin_blocking(&p.name, bytes).map(|_| json!(true))
    });
}

/// `bdev_thin_delete` → true.
pub fn bdev_thin_delete(params: Value, done: ThinRpcDone) {
    run(params, done, |p: NameParams| {
        delete_thin_blocking(&p.name).map(|_| json!(true))
    });
}

/// Every thin RPC method, for registration by thind.
pub fn rpc_methods() -> Vec<(&'static str, ThinRpcHandler)> {
    vec![
        ("bdev_thin_pool_create", bdev_thin_pool_create),
        ("bdev_thin_pool_delete", bdev_thin_pool_delete),
        ("bdev_thin_pool_get_pools", bdev_thin_pool_get_pools),
        ("bdev_thin_pool_grow", bdev_thin_pool_grow),
        (
            "bdev_thin_pool_set_transaction_id",
            bdev_thin_pool_set_transaction_id,
        ),
        (
            "bdev_thin_pool_reserve_metadata_snap",
            bdev_thin_pool_reserve_metadata_snap,
        ),
        (
            "bdev_thin_pool_release_metadata_snap",
            bdev_thin_pool_release_metadata_snap,
        ),
        ("bdev_thin_create", bdev_thin_create),
        ("bdev_thin_snapshot", bdev_thin_snapshot),
        ("bdev_thin_resize", bdev_thin_resize),
        ("bdev_thin_delete", bdev_thin_delete),
    ]
}
