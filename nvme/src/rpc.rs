//! `bdev_nvme_*` RPC handlers with SPDK's method and parameter names (STYLE rule 15).
//! Handlers are asynchronous: attach answers once the controller is connected, enabled and
//! its namespaces are bdevs (or once that failed).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bdev::{BdevError, ErrorKind, Uuid};
use reactor::ReactorId;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::host::ctrlr::{self, CtrlrOpts};

/// Completion of an asynchronous RPC handler.
pub type NvmeRpcDone = Box<dyn FnOnce(Result<Value, BdevError>) + Send>;
/// An asynchronous RPC handler.
pub type NvmeRpcHandler = fn(Value, NvmeRpcDone);

/// Defaults `bdev_nvme_set_options` changes for later attaches.
#[derive(Clone, Copy, Debug)]
struct Defaults {
    ctrlr_loss_timeout_sec: i64,
    reconnect_delay_sec: u64,
    fast_io_fail_timeout_sec: u64,
    keep_alive_timeout_ms: u32,
    io_queue_size: u32,
}

fn defaults() -> MutexGuard<'static, Defaults> {
    static D: OnceLock<Mutex<Defaults>> = OnceLock::new();
    D.get_or_init(|| {
        Mutex::new(Defaults {
            ctrlr_loss_timeout_sec: 0,
            reconnect_delay_sec: 0,
            fast_io_fail_timeout_sec: 0,
            keep_alive_timeout_ms: 10_000,
            io_queue_size: 256,
        })
    })
    .lock()
    .unwrap_or_else(|e| e.into_inner())
}

/// This process's host identity: NQN from a random UUID, made once.
fn host_identity() -> (String, [u8; 16]) {
    static ID: OnceLock<Uuid> = OnceLock::new();
    let u = *ID.get_or_init(Uuid::new_v4);
    (format!("nqn.2014-08.org.nvmexpress:uuid:{u}"), u.0)
}

fn parse<T: for<'de> Deserialize<'de>>(method: &str, params: Value) -> Result<T, BdevError> {
    bdev::rpc_util::parse_params(method, params)
}

fn invalid(msg: String) -> BdevError {
    BdevError::new(ErrorKind::InvalidArgument, msg)
}

fn unsupported(msg: String) -> BdevError {
    BdevError::new(ErrorKind::Unsupported, msg)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachParams {
    name: String,
    trtype: String,
    traddr: String,
    adrfam: Option<String>,
    trsvcid: Option<String>,
    #[allow(dead_code)]
    priority: Option<i64>,
    subnqn: Option<String>,
    hostnqn: Option<String>,
    hostaddr: Option<String>,
    hostsvcid: Option<String>,
    prchk_reftag: Option<bool>,
    prchk_guard: Option<bool>,
    hdgst: Option<bool>,
    ddgst: Option<bool>,
    fabrics_connect_timeout_us: Option<u64>,
    multipath: Option<String>,
    num_io_queues: Option<u32>,
    io_queue_size: Option<u32>,
    ctrlr_loss_timeout_sec: Option<i64>,
    reconnect_delay_sec: Option<u64>,
    fast_io_fail_timeout_sec: Option<u64>,
    psk: Option<String>,
    #[allow(dead_code)]
    max_bdevs: Option<u32>,
    dhchap_key: Option<String>,
    dhchap_ctrlr_key: Option<String>,
    /// SPDK's client always sends these two. Namespaces of a command set other than NVM are
    /// never made bdevs here, so `allow_unrecognized_csi` changes nothing; submission queue
    /// flow control (SQHD) is always honoured, so disabling it is accepted and ignored.
    #[allow(dead_code)]
    allow_unrecognized_csi: Option<bool>,
    #[allow(dead_code)]
    disable_sq_flow_control: Option<bool>,
    /// Multipath options (`-x multipath` only, which is refused).
    #[allow(dead_code)]
    policy: Option<String>,
    #[allow(dead_code)]
    selector: Option<String>,
    #[allow(dead_code)]
    min_io: Option<u32>,
}

fn attach_opts(p: AttachParams) -> Result<CtrlrOpts, BdevError> {
    if !p.trtype.eq_ignore_ascii_case("tcp") {
        return Err(unsupported(format!(
            "trtype '{}' is not supported (only TCP)",
            p.trtype
        )));
    }
    if p.psk.is_some() || p.dhchap_key.is_some() || p.dhchap_ctrlr_key.is_some() {
        return Err(unsupported(
            "TLS (psk) and DH-HMAC-CHAP are not supported".into(),
        ));
    }
    if p.hostaddr.is_some() || p.hostsvcid.is_some() {
        return Err(unsupported("hostaddr/hostsvcid are not supported".into()));
    }
    if p.prchk_reftag == Some(true) || p.prchk_guard == Some(true) {
        return Err(unsupported(
            "protection information checks are not supported".into(),
        ));
    }
    if let Some(m) = p.multipath.as_deref().filter(|m| *m != "disable") {
        return Err(unsupported(format!("multipath '{m}' is not supported")));
    }
    if p.name.is_empty() {
        return Err(invalid("name must not be empty".into()));
    }
    let ip: IpAddr = p
        .traddr
        .parse()
        .map_err(|_| invalid(format!("traddr '{}' is not an IP address", p.traddr)))?;
    let adrfam = p
        .adrfam
        .unwrap_or_else(|| if ip.is_ipv4() { "IPv4" } else { "IPv6" }.into());
    let fam_ok = match adrfam.to_ascii_lowercase().as_str() {
        "ipv4" => ip.is_ipv4(),
        "ipv6" => ip.is_ipv6(),
        _ => false,
    };
    if !fam_ok {
        return Err(invalid(format!(
            "adrfam '{adrfam}' does not match traddr '{ip}'"
        )));
    }
    let svc = p.trsvcid.unwrap_or_else(|| "4420".into());
    let port: u16 = svc
        .parse()
        .map_err(|_| invalid(format!("trsvcid '{svc}' is not a port number")))?;
    let d = *defaults();
    let loss = p.ctrlr_loss_timeout_sec.unwrap_or(d.ctrlr_loss_timeout_sec);
    let delay = p.reconnect_delay_sec.unwrap_or(d.reconnect_delay_sec);
    let fast = p
        .fast_io_fail_timeout_sec
        .unwrap_or(d.fast_io_fail_timeout_sec);
    check_timeouts(loss, delay, fast)?;
    let (default_nqn, hostid) = host_identity();
    let io_queue_size = p.io_queue_size.unwrap_or(d.io_queue_size);
    if !(2..=65536).contains(&io_queue_size) {
        return Err(invalid(format!(
            "io_queue_size {io_queue_size} not in 2..=65536"
        )));
    }
    Ok(CtrlrOpts {
        name: p.name,
        addr: SocketAddr::new(ip, port),
        adrfam,
        subnqn: p
            .subnqn
            .unwrap_or_else(|| crate::proto::spec::DISCOVERY_NQN.to_string()),
        hostnqn: p.hostnqn.unwrap_or(default_nqn),
        hostid,
        hdgst: p.hdgst.unwrap_or(false),
        ddgst: p.ddgst.unwrap_or(false),
        num_io_queues: p.num_io_queues.unwrap_or(0),
        io_queue_size,
        kato_ms: d.keep_alive_timeout_ms,
        ctrlr_loss_timeout_sec: loss,
        reconnect_delay_sec: delay,
        fast_io_fail_timeout_sec: fast,
        connect_timeout: Duration::from_micros(p.fabrics_connect_timeout_us.unwrap_or(10_000_000))
            .max(Duration::from_millis(10)),
    })
}

/// SPDK's rules for the three reconnect knobs.
fn check_timeouts(loss: i64, delay: u64, fast: u64) -> Result<(), BdevError> {
    if loss < -1 {
        return Err(invalid(format!("ctrlr_loss_timeout_sec {loss} < -1")));
    }
    if loss == 0 {
        if delay != 0 || fast != 0 {
            return Err(invalid(
                "reconnect_delay_sec and fast_io_fail_timeout_sec need ctrlr_loss_timeout_sec != 0"
                    .into(),
            ));
        }
        return Ok(());
    }
    if delay == 0 {
        return Err(invalid(
            "reconnect_delay_sec must be > 0 when ctrlr_loss_timeout_sec != 0".into(),
        ));
    }
    if loss > 0 && (delay > loss as u64 || fast > loss as u64) {
        return Err(invalid(format!(
            "reconnect_delay_sec {delay} and fast_io_fail_timeout_sec {fast} must not exceed ctrlr_loss_timeout_sec {loss}"
        )));
    }
    if fast > 0 && fast < delay {
        return Err(invalid(format!(
            "fast_io_fail_timeout_sec {fast} must not be less than reconnect_delay_sec {delay}"
        )));
    }
    Ok(())
}

/// `bdev_nvme_attach_controller`: answers with the bdev names.
pub fn bdev_nvme_attach_controller(params: Value, done: NvmeRpcDone) {
    let opts =
        match parse::<AttachParams>("bdev_nvme_attach_controller", params).and_then(attach_opts) {
            Ok(o) => o,
            Err(e) => return done(Err(e)),
        };
    let Some(rt) = crate::runtime() else {
        return done(Err(BdevError::new(
            ErrorKind::Unsupported,
            "bdev_nvme_attach_controller: no reactor runtime (set_runtime not called)",
        )));
    };
    if ctrlr::controllers().contains_key(&opts.name) {
        return done(Err(BdevError::new(
            ErrorKind::AlreadyExists,
            format!("NVMe controller '{}' already exists", opts.name),
        )));
    }
    let rt2 = rt.clone();
    rt.send_msg(ReactorId::new(0), move || {
        ctrlr::attach(
            opts,
            rt2,
            Box::new(move |r| done(r.map(|names| json!(names)).map_err(|e| e.to_bdev()))),
        );
    });
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct DetachParams {
    name: String,
    trtype: Option<String>,
    traddr: Option<String>,
    adrfam: Option<String>,
    trsvcid: Option<String>,
    subnqn: Option<String>,
    hostaddr: Option<String>,
    hostsvcid: Option<String>,
}

/// `bdev_nvme_detach_controller`: removes the controller and its bdevs.
pub fn bdev_nvme_detach_controller(params: Value, done: NvmeRpcDone) {
    let p: DetachParams = match parse("bdev_nvme_detach_controller", params) {
        Ok(p) => p,
        Err(e) => return done(Err(e)),
    };
    ctrlr::detach(
        &p.name,
        Box::new(move |r| done(r.map(|()| json!(true)).map_err(|e| e.to_bdev()))),
    );
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetParams {
    name: Option<String>,
}

/// `bdev_nvme_get_controllers`.
pub fn bdev_nvme_get_controllers(params: Value, done: NvmeRpcDone) {
    let p: GetParams = match parse("bdev_nvme_get_controllers", params) {
        Ok(p) => p,
        Err(e) => return done(Err(e)),
    };
    let all = ctrlr::controllers();
    let list: Vec<Value> = match &p.name {
        Some(n) => match all.get(n) {
            Some(c) => vec![c.json()],
            None => {
                drop(all);
                return done(Err(BdevError::new(
                    ErrorKind::NotFound,
                    format!("NVMe controller '{n}' does not exist"),
                )));
            }
        },
        None => all.values().map(|c| c.json()).collect(),
    };
    drop(all);
    done(Ok(Value::Array(list)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct SetOptions {
    ctrlr_loss_timeout_sec: Option<i64>,
    reconnect_delay_sec: Option<u64>,
    fast_io_fail_timeout_sec: Option<u64>,
    keep_alive_timeout_ms: Option<u32>,
    io_queue_requests: Option<u32>,
    // Accepted for compatibility with SPDK configs; no effect here.
    action_on_timeout: Option<Value>,
    timeout_us: Option<Value>,
    timeout_admin_us: Option<Value>,
    transport_retry_count: Option<Value>,
    retry_count: Option<Value>,
    arbitration_burst: Option<Value>,
    low_priority_weight: Option<Value>,
    medium_priority_weight: Option<Value>,
    high_priority_weight: Option<Value>,
    nvme_adminq_poll_period_us: Option<Value>,
    nvme_ioq_poll_period_us: Option<Value>,
    delay_cmd_submit: Option<Value>,
    bdev_retry_count: Option<Value>,
    transport_ack_timeout: Option<Value>,
    disable_auto_failback: Option<Value>,
    generate_uuids: Option<Value>,
    transport_tos: Option<Value>,
    nvme_error_stat: Option<Value>,
    rdma_srq_size: Option<Value>,
    io_path_stat: Option<Value>,
    allow_accel_sequence: Option<Value>,
    rdma_max_cq_size: Option<Value>,
    rdma_cm_event_timeout_ms: Option<Value>,
    dhchap_digests: Option<Value>,
    dhchap_dhgroups: Option<Value>,
}

/// `bdev_nvme_set_options`: defaults (reconnect knobs, keep-alive) for later attaches.
pub fn bdev_nvme_set_options(params: Value, done: NvmeRpcDone) {
    let p: SetOptions = match parse("bdev_nvme_set_options", params) {
        Ok(p) => p,
        Err(e) => return done(Err(e)),
    };
    let mut d = defaults();
    let loss = p.ctrlr_loss_timeout_sec.unwrap_or(d.ctrlr_loss_timeout_sec);
    let delay = p.reconnect_delay_sec.unwrap_or(d.reconnect_delay_sec);
    let fast = p
        .fast_io_fail_timeout_sec
        .unwrap_or(d.fast_io_fail_timeout_sec);
    if let Err(e) = check_timeouts(loss, delay, fast) {
        drop(d);
        return done(Err(e));
    }
    d.ctrlr_loss_timeout_sec = loss;
    d.reconnect_delay_sec = delay;
    d.fast_io_fail_timeout_sec = fast;
    if let Some(k) = p.keep_alive_timeout_ms {
        d.keep_alive_timeout_ms = k;
    }
    drop(d);
    done(Ok(json!(true)))
}

/// Every `bdev_nvme_*` method: `(name, handler)`.
pub fn rpc_methods() -> Vec<(&'static str, NvmeRpcHandler)> {
    crate::register_module();
    vec![
        (
            "bdev_nvme_attach_controller",
            bdev_nvme_attach_controller as NvmeRpcHandler,
        ),
        ("bdev_nvme_detach_controller", bdev_nvme_detach_controller),
        ("bdev_nvme_get_controllers", bdev_nvme_get_controllers),
        ("bdev_nvme_set_options", bdev_nvme_set_options),
    ]
}

/// save_config entries: the options, then one attach per controller.
pub fn config_json() -> Vec<Value> {
    let d = *defaults();
    let mut out = vec![json!({"method": "bdev_nvme_set_options", "params": {
        "ctrlr_loss_timeout_sec": d.ctrlr_loss_timeout_sec,
        "reconnect_delay_sec": d.reconnect_delay_sec,
        "fast_io_fail_timeout_sec": d.fast_io_fail_timeout_sec,
        "keep_alive_timeout_ms": d.keep_alive_timeout_ms,
    }})];
    out.extend(ctrlr::controllers().values().map(|c| c.config_json()));
    out
}

/// Detaches every controller (sockets closed, bdevs unregistered).
pub fn shutdown() {
    let names: Vec<String> = ctrlr::controllers().keys().cloned().collect();
    for n in names {
        ctrlr::detach(&n, Box::new(|_| {}));
    }
}
