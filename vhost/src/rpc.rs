//! `vhost_*` JSON-RPC handlers with SPDK's names and parameters: `vhost_create_blk_controller`,
//! `vhost_get_controllers`, `vhost_delete_controller`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bdev::{BdevDesc, BdevEvent, IoType};
use reactor::{CoreMask, ReactorId, RuntimeHandle};
use serde::Deserialize;
use serde_json::{json, Value};
use vhost_user::vhost_user::Listener;

use crate::device::{self, Shared, MAX_QUEUES};
use crate::globals;

/// A JSON-RPC error: `code` is -32602 for bad parameters or `-errno`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostRpcError {
    /// JSON-RPC error code.
    pub code: i32,
    /// What was wrong.
    pub message: String,
}

impl VhostRpcError {
    fn params(msg: impl Into<String>) -> Self {
        VhostRpcError {
            code: -32602,
            message: msg.into(),
        }
    }
    fn errno(errno: i32, msg: impl Into<String>) -> Self {
        VhostRpcError {
            code: -errno,
            message: msg.into(),
        }
    }
}

/// Completion of an RPC; may be called from any thread.
pub type VhostRpcDone = Box<dyn FnOnce(Result<Value, VhostRpcError>) + Send>;

/// An RPC handler: params, completion. Runs on reactor 0 or a plain thread; never blocks.
pub type VhostRpcHandler = fn(Value, VhostRpcDone);

/// The methods to register, with SPDK's names.
pub fn rpc_methods() -> Vec<(&'static str, VhostRpcHandler)> {
    vec![
        (
            "vhost_create_blk_controller",
            create_blk_controller as VhostRpcHandler,
        ),
        ("vhost_get_controllers", get_controllers),
        ("vhost_delete_controller", delete_controller),
    ]
}

fn parse<T: for<'de> Deserialize<'de>>(p: Value) -> Result<T, VhostRpcError> {
    let p = if p.is_null() { json!({}) } else { p };
    serde_json::from_value(p).map_err(|e| VhostRpcError::params(format!("Invalid parameters: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateParams {
    ctrlr: String,
    dev_name: String,
    cpumask: Option<String>,
    #[serde(default)]
    readonly: bool,
    #[serde(default)]
    packed_ring: bool,
    transport: Option<String>,
}

fn runtime() -> Result<RuntimeHandle, VhostRpcError> {
    if reactor::try_current().is_some() {
        return Ok(reactor::runtime_handle());
    }
    globals()
        .runtime
        .clone()
        .ok_or_else(|| VhostRpcError::errno(libc::ENODEV, "vhost target not started"))
}

fn mask_reactors(
    rt: &RuntimeHandle,
    mask: Option<&str>,
) -> Result<(Vec<ReactorId>, String), VhostRpcError> {
    let all = rt.reactor_ids();
    let Some(m) = mask else {
        let s = CoreMask::parse(&format!("[{}]", rt.core_of(all[0])))
            .map(|m| m.to_string())
            .unwrap_or_default();
        return Ok((vec![all[0]], s));
    };
    let parsed = CoreMask::parse(m)
        .map_err(|e| VhostRpcError::errno(libc::EINVAL, format!("cpumask {m}: {e}")))?;
    let norm = parsed.to_string();
    let cores = parsed.cores();
    let ids: Vec<ReactorId> = all
        .into_iter()
        .filter(|id| cores.contains(&rt.core_of(*id)))
        .collect();
    if ids.is_empty() {
        return Err(VhostRpcError::errno(
            libc::EINVAL,
            format!("cpumask {m} has no core with a reactor"),
        ));
    }
    Ok((ids, norm))
}

fn create_blk_controller(p: Value, done: VhostRpcDone) {
    done(create(p));
}

/// Checks what `vhost_create_blk_controller` can check before touching anything.
fn validate(p: &CreateParams) -> Result<(), VhostRpcError> {
    if p.packed_ring {
        return Err(VhostRpcError::errno(
            libc::ENOTSUP,
            "packed ring is not supported",
        ));
    }
    if let Some(t) = p.transport.as_deref() {
        if t != "vhost_user_blk" {
            return Err(VhostRpcError::errno(
                libc::EINVAL,
                format!("unknown transport {t}"),
            ));
        }
    }
    if p.ctrlr.is_empty() || p.ctrlr.contains('/') || p.ctrlr.len() > 64 {
        return Err(VhostRpcError::errno(
            libc::EINVAL,
            format!("invalid controller name '{}'", p.ctrlr),
        ));
    }
    Ok(())
}

/// Refuses a path that is a live socket (another daemon's, or thind's own RPC socket) or not a
/// socket at all; a stale socket (nobody listening) is replaced.
fn check_socket_path(path: &std::path::Path) -> Result<(), VhostRpcError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(VhostRpcError::errno(
            libc::EEXIST,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(VhostRpcError::errno(
            libc::EADDRINUSE,
            format!("{} is in use by a running server", path.display()),
        ));
    }
    Ok(())
}

/// Opens the bdev; its resize and remove events go to the controller's home reactor.
fn open_bdev(
    p: &CreateParams,
    rt: &RuntimeHandle,
    id: u64,
    home: ReactorId,
    num_blocks: &Arc<AtomicU64>,
) -> Result<BdevDesc, VhostRpcError> {
    let (nb, rt2) = (num_blocks.clone(), rt.clone());
    let desc = BdevDesc::open(&p.dev_name, !p.readonly, move |ev| match ev {
        BdevEvent::Resize { num_blocks } => {
            nb.store(num_blocks, Ordering::Relaxed);
            rt2.send_msg(home, move || device::config_changed(id));
        }
        BdevEvent::Remove => rt2.send_msg(home, move || device::bdev_removed(id)),
    })
    .map_err(|e| {
        VhostRpcError::errno(e.errno(), format!("cannot open bdev {}: {e}", p.dev_name))
    })?;
    num_blocks.store(desc.bdev().num_blocks(), Ordering::Relaxed);
    Ok(desc)
}

fn create(p: Value) -> Result<Value, VhostRpcError> {
    let p: CreateParams = parse(p)?;
    validate(&p)?;
    let rt = runtime()?;
    let (reactors, cpumask) = mask_reactors(&rt, p.cpumask.as_deref())?;
    let socket = globals().socket_dir.join(&p.ctrlr);
    if globals().ctrlrs.contains_key(&p.ctrlr) {
        return Err(VhostRpcError::errno(
            libc::EEXIST,
            format!("vhost controller {} already exists", p.ctrlr),
        ));
    }
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let num_blocks = Arc::new(AtomicU64::new(0));
    let desc = open_bdev(&p, &rt, id, reactors[0], &num_blocks)?;
    let b = desc.bdev().clone();
    check_socket_path(&socket)?;
    let listener = Listener::new(&socket, true).map_err(|e| {
        VhostRpcError::errno(libc::EIO, format!("socket {}: {e}", socket.display()))
    })?;
    listener.set_nonblocking(true).map_err(|e| {
        VhostRpcError::errno(libc::EIO, format!("socket {}: {e}", socket.display()))
    })?;
    let shared = Arc::new(Shared {
        id,
        name: p.ctrlr.clone(),
        bdev_name: p.dev_name.clone(),
        readonly: p.readonly,
        block_size: b.block_size(),
        num_blocks,
        desc: std::sync::Mutex::new(Some(desc)),
        num_queues: MAX_QUEUES,
        io: (
            b.io_type_supported(IoType::Flush),
            b.io_type_supported(IoType::Unmap),
            b.io_type_supported(IoType::WriteZeroes),
        ),
        opt_io_blocks: b.optimal_io_boundary(),
        reactors,
        cpumask,
        socket,
        runtime: rt.clone(),
    });
    {
        let mut g = globals();
        if g.ctrlrs.contains_key(&p.ctrlr) {
            return Err(VhostRpcError::errno(
                libc::EEXIST,
                format!("vhost controller {} already exists", p.ctrlr),
            ));
        }
        g.ctrlrs.insert(p.ctrlr.clone(), shared.clone());
    }
    let s2 = shared.clone();
    rt.send_msg(shared.home(), move || device::home_start(s2, listener));
    crate::log(&format!(
        "controller {} on {} serves bdev {} at {}",
        shared.name,
        shared.cpumask,
        shared.bdev_name,
        shared.socket.display()
    ));
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetParams {
    name: Option<String>,
}

fn get_controllers(p: Value, done: VhostRpcDone) {
    let r = (|| {
        let p: GetParams = parse(p)?;
        let g = globals();
        if let Some(n) = &p.name {
            if !g.ctrlrs.contains_key(n) {
                return Err(VhostRpcError::errno(
                    libc::ENODEV,
                    format!("controller {n} does not exist"),
                ));
            }
        }
        let list: Vec<Value> = g
            .ctrlrs
            .values()
            .filter(|s| p.name.as_ref().is_none_or(|n| *n == s.name))
            .map(|s| {
                json!({
                    "ctrlr": s.name,
                    "cpumask": s.cpumask,
                    "delay_base_us": 0,
                    "iops_threshold": 60000,
                    "socket": s.socket.display().to_string(),
                    "sessions": [],
                    "backend_specific": {
                        "block": {
                            "readonly": s.readonly,
                            "bdev": s.bdev_name,
                            "transport": "vhost_user_blk",
                        }
                    }
                })
            })
            .collect();
        Ok(Value::Array(list))
    })();
    done(r);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteParams {
    ctrlr: String,
}

fn delete_controller(p: Value, done: VhostRpcDone) {
    let p: DeleteParams = match parse(p) {
        Ok(p) => p,
        Err(e) => return done(Err(e)),
    };
    let Some(shared) = globals().ctrlrs.get(&p.ctrlr).cloned() else {
        return done(Err(VhostRpcError::errno(
            libc::ENODEV,
            format!("controller {} does not exist", p.ctrlr),
        )));
    };
    let id = shared.id;
    let name = p.ctrlr.clone();
    shared.runtime.clone().send_msg(shared.home(), move || {
        if device::is_connected(id) {
            done(Err(VhostRpcError::errno(
                libc::EBUSY,
                format!("controller {name} has an active connection"),
            )));
            return;
        }
        let shared2 = shared.clone();
        device::close(
            id,
            Box::new(move || {
                globals().ctrlrs.remove(&name);
                shared2
                    .desc
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                done(Ok(json!(true)));
            }),
        );
    });
}
