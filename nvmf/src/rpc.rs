//! `nvmf_*` JSON-RPC handlers with SPDK's names and parameters, the config writer for
//! `save_config`, and shutdown.
//!
//! Handlers never block: they change control-path state under short mutexes, bind
//! sockets (non-blocking) and hand acceptors to reactor 0 by message.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::ctrlr::format_uuid;
use crate::error::{ErrorKind, NvmfError};
use crate::spec::DISCOVERY_NQN;
use crate::subsystem::{self, target, ListenAddr, SubsysState, TransportOpts};
use crate::tcp::listener;

/// A JSON-RPC error: code (-32602 bad params, else -errno) and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvmfRpcError {
    /// JSON-RPC error code.
    pub code: i32,
    /// Message.
    pub message: String,
}

impl From<NvmfError> for NvmfRpcError {
    fn from(e: NvmfError) -> Self {
        let code = if e.kind() == ErrorKind::InvalidParams {
            -32602
        } else {
            -e.to_errno()
        };
        NvmfRpcError {
            code,
            message: e.message().to_owned(),
        }
    }
}

/// A handler: params in, answer through the callback (exactly once).
pub type NvmfRpcHandler = fn(Value, Box<dyn FnOnce(Result<Value, NvmfRpcError>) + Send>);

type Sync = fn(Value) -> Result<Value, NvmfError>;

macro_rules! handlers {
    ($($name:literal => $f:ident),* $(,)?) => {
        /// Every `nvmf_*` method: `(name, handler)`.
        pub fn rpc_methods() -> Vec<(&'static str, NvmfRpcHandler)> {
            vec![$(($name, {
                fn h(p: Value, done: Box<dyn FnOnce(Result<Value, NvmfRpcError>) + Send>) {
                    let f: Sync = $f;
                    done(f(p).map_err(NvmfRpcError::from));
                }
                h as NvmfRpcHandler
            })),*]
        }
    };
}

handlers! {
    "nvmf_create_transport" => create_transport,
    "nvmf_get_transports" => get_transports,
    "nvmf_create_subsystem" => create_subsystem,
    "nvmf_delete_subsystem" => delete_subsystem,
    "nvmf_get_subsystems" => get_subsystems,
    "nvmf_subsystem_add_listener" => add_listener,
    "nvmf_subsystem_remove_listener" => remove_listener,
    "nvmf_subsystem_add_ns" => add_ns,
    "nvmf_subsystem_remove_ns" => remove_ns,
    "nvmf_subsystem_add_host" => add_host,
    "nvmf_subsystem_remove_host" => remove_host,
    "nvmf_subsystem_allow_any_host" => allow_any_host,
    "nvmf_subsystem_get_controllers" => get_controllers,
    "nvmf_subsystem_get_qpairs" => get_qpairs,
}

fn parse<T: for<'de> Deserialize<'de>>(p: Value) -> Result<T, NvmfError> {
    let p = if p.is_null() { json!({}) } else { p };
    serde_json::from_value(p)
        .map_err(|e| NvmfError::invalid_params(format!("Invalid parameters: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct CreateTransport {
    trtype: String,
    tgt_name: Option<String>,
    max_queue_depth: Option<u32>,
    max_qpairs_per_ctrlr: Option<u32>,
    max_io_qpairs_per_ctrlr: Option<u32>,
    in_capsule_data_size: Option<u32>,
    max_io_size: Option<u32>,
    io_unit_size: Option<u32>,
    max_aq_depth: Option<u32>,
    num_shared_buffers: Option<u32>,
    buf_cache_size: Option<u32>,
    iobuf_small_cache_size: Option<u32>,
    iobuf_large_cache_size: Option<u32>,
    zcopy: Option<bool>,
    num_cqe: Option<u32>,
    max_srq_depth: Option<u32>,
    no_srq: Option<bool>,
    c2h_success: Option<bool>,
    dif_insert_or_strip: Option<bool>,
    sock_priority: Option<u32>,
    acceptor_backlog: Option<u32>,
    abort_timeout_sec: Option<u32>,
    no_wr_batching: Option<bool>,
    control_msg_num: Option<u32>,
    disable_mappable_bar0: Option<bool>,
    disable_adaptive_irq: Option<bool>,
    disable_shadow_doorbells: Option<bool>,
    acceptor_poll_rate: Option<u32>,
    ack_timeout: Option<u32>,
    data_wr_pool_size: Option<u32>,
    disable_command_passthru: Option<bool>,
    kas: Option<u32>,
    min_kato: Option<u32>,
    masked_oncs: Option<Vec<String>>,
    masked_fuses: Option<Vec<String>>,
}

fn create_transport(p: Value) -> Result<Value, NvmfError> {
    let p: CreateTransport = parse(p)?;
    if !p.trtype.eq_ignore_ascii_case("tcp") {
        return Err(NvmfError::invalid(format!(
            "transport type '{}' unavailable (only TCP)",
            p.trtype
        )));
    }
    let d = TransportOpts::default();
    let opts = TransportOpts {
        max_queue_depth: p.max_queue_depth.unwrap_or(d.max_queue_depth),
        max_qpairs_per_ctrlr: p
            .max_io_qpairs_per_ctrlr
            .map(|n| n + 1)
            .or(p.max_qpairs_per_ctrlr)
            .unwrap_or(d.max_qpairs_per_ctrlr),
        in_capsule_data_size: p.in_capsule_data_size.unwrap_or(d.in_capsule_data_size),
        max_io_size: p.max_io_size.unwrap_or(d.max_io_size),
        io_unit_size: p.io_unit_size.unwrap_or(d.io_unit_size),
        max_aq_depth: p.max_aq_depth.unwrap_or(d.max_aq_depth),
        c2h_success: p.c2h_success.unwrap_or(d.c2h_success),
        abort_timeout_sec: p.abort_timeout_sec.unwrap_or(d.abort_timeout_sec),
        acceptor_backlog: p.acceptor_backlog.unwrap_or(d.acceptor_backlog),
    };
    if !(2..=1024).contains(&opts.max_queue_depth)
        || !(2..=1024).contains(&opts.max_aq_depth)
        || !(2..=1024).contains(&opts.max_qpairs_per_ctrlr)
    {
        return Err(NvmfError::invalid(
            "max_queue_depth, max_aq_depth and max_qpairs_per_ctrlr must be 2..1024",
        ));
    }
    if opts.in_capsule_data_size & 15 != 0 || opts.in_capsule_data_size > 131072 {
        return Err(NvmfError::invalid(
            "in_capsule_data_size must be a multiple of 16 and at most 131072",
        ));
    }
    if !(1..=65535).contains(&opts.acceptor_backlog) {
        return Err(NvmfError::invalid("acceptor_backlog must be 1..65535"));
    }
    if !(4096..=4 * 1024 * 1024).contains(&opts.max_io_size) || !opts.max_io_size.is_power_of_two()
    {
        return Err(NvmfError::invalid(
            "max_io_size must be a power of two from 4096 to 4 MiB",
        ));
    }
    let mut t = target();
    if t.transport.is_some() {
        return Err(NvmfError::exists("transport TCP already exists"));
    }
    crate::tcp::reset_shutdown();
    t.transport = Some(opts);
    Ok(json!(true))
}

fn transport_json(o: &TransportOpts) -> Value {
    json!({
        "trtype": "TCP",
        "max_queue_depth": o.max_queue_depth,
        "max_io_qpairs_per_ctrlr": o.max_qpairs_per_ctrlr - 1,
        "in_capsule_data_size": o.in_capsule_data_size,
        "max_io_size": o.max_io_size,
        "io_unit_size": o.io_unit_size,
        "max_aq_depth": o.max_aq_depth,
        "c2h_success": o.c2h_success,
        "abort_timeout_sec": o.abort_timeout_sec,
        "acceptor_backlog": o.acceptor_backlog,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct GetTransports {
    trtype: Option<String>,
    tgt_name: Option<String>,
}

fn get_transports(p: Value) -> Result<Value, NvmfError> {
    let p: GetTransports = parse(p)?;
    let t = target();
    let list: Vec<Value> = t
        .transport
        .iter()
        .filter(|_| {
            p.trtype
                .as_ref()
                .is_none_or(|x| x.eq_ignore_ascii_case("tcp"))
        })
        .map(transport_json)
        .collect();
    if let (Some(tr), true) = (&p.trtype, list.is_empty()) {
        return Err(NvmfError::not_found(format!("transport {tr} not found")));
    }
    Ok(Value::Array(list))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct CreateSubsystem {
    nqn: String,
    serial_number: Option<String>,
    model_number: Option<String>,
    tgt_name: Option<String>,
    allow_any_host: Option<bool>,
    max_namespaces: Option<u32>,
    ana_reporting: Option<bool>,
    min_cntlid: Option<u16>,
    max_cntlid: Option<u16>,
    max_discard_size_kib: Option<u64>,
    max_write_zeroes_size_kib: Option<u64>,
    passthrough: Option<bool>,
    enable_nssr: Option<bool>,
    wzsl: Option<u32>,
}

fn create_subsystem(p: Value) -> Result<Value, NvmfError> {
    let p: CreateSubsystem = parse(p)?;
    let serial = p
        .serial_number
        .unwrap_or_else(|| "00000000000000000000".into());
    if serial.len() > 20 || !serial.is_ascii() {
        return Err(NvmfError::invalid(format!(
            "serial_number '{serial}' longer than 20 ASCII chars"
        )));
    }
    let model = p
        .model_number
        .unwrap_or_else(|| "thinbdev Controller".into());
    if model.len() > 40 || !model.is_ascii() {
        return Err(NvmfError::invalid(format!(
            "model_number '{model}' longer than 40 ASCII chars"
        )));
    }
    let max_namespaces = match p.max_namespaces {
        None | Some(0) => 32,
        Some(n) => n.min(1024),
    };
    subsystem::create_subsystem(
        &p.nqn,
        SubsysState {
            serial,
            model,
            allow_any_host: p.allow_any_host.unwrap_or(false),
            max_namespaces,
            ..Default::default()
        },
    )?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct NqnOnly {
    nqn: String,
    tgt_name: Option<String>,
}

fn delete_subsystem(p: Value) -> Result<Value, NvmfError> {
    let p: NqnOnly = parse(p)?;
    subsystem::delete_subsystem(&p.nqn)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct GetSubsystems {
    nqn: Option<String>,
    tgt_name: Option<String>,
}

fn addr_json(a: &ListenAddr) -> Value {
    json!({"trtype": "TCP", "adrfam": a.adrfam, "traddr": a.traddr, "trsvcid": a.trsvcid})
}

fn get_subsystems(p: Value) -> Result<Value, NvmfError> {
    let p: GetSubsystems = parse(p)?;
    let (disc, subs) = {
        let t = target();
        (
            t.discovery.clone(),
            t.subsystems.values().cloned().collect::<Vec<_>>(),
        )
    };
    let mut out = Vec::new();
    for s in std::iter::once(disc).chain(subs) {
        if p.nqn.as_ref().is_some_and(|n| *n != s.nqn) {
            continue;
        }
        let st = s.lock();
        let mut v = json!({
            "nqn": s.nqn,
            "subtype": if s.is_discovery { "Discovery" } else { "NVMe" },
            "listen_addresses": st.listeners.iter().map(addr_json).collect::<Vec<_>>(),
            "allow_any_host": st.allow_any_host,
            "hosts": st.hosts.iter().map(|h| json!({"nqn": h})).collect::<Vec<_>>(),
        });
        if !s.is_discovery {
            v["serial_number"] = json!(st.serial);
            v["model_number"] = json!(st.model);
            v["max_namespaces"] = json!(st.max_namespaces);
            v["min_cntlid"] = json!(1);
            v["max_cntlid"] = json!(0xFFEF);
            v["namespaces"] = st
                .namespaces
                .values()
                .map(|ns| {
                    json!({
                        "nsid": ns.nsid,
                        "bdev_name": ns.bdev_name,
                        "name": ns.bdev_name,
                        "nguid": ns.nguid.iter().map(|b| format!("{b:02X}")).collect::<String>(),
                        "uuid": format_uuid(&ns.uuid),
                    })
                })
                .collect();
        }
        out.push(v);
    }
    if let (Some(n), true) = (&p.nqn, out.is_empty()) {
        return Err(NvmfError::not_found(format!("subsystem {n} not found")));
    }
    Ok(Value::Array(out))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenAddress {
    trtype: String,
    adrfam: Option<String>,
    traddr: String,
    trsvcid: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Listener {
    nqn: String,
    listen_address: ListenAddress,
    tgt_name: Option<String>,
    secure_channel: Option<bool>,
    ana_state: Option<String>,
    anagrpid: Option<u32>,
    sock_impl: Option<String>,
    numa_id: Option<i32>,
}

fn listen_addr(a: ListenAddress) -> Result<ListenAddr, NvmfError> {
    if !a.trtype.eq_ignore_ascii_case("tcp") {
        return Err(NvmfError::invalid(format!(
            "trtype '{}' not supported (only TCP)",
            a.trtype
        )));
    }
    let adrfam = a.adrfam.unwrap_or_else(|| "IPv4".into());
    if !adrfam.eq_ignore_ascii_case("ipv4") && !adrfam.eq_ignore_ascii_case("ipv6") {
        return Err(NvmfError::invalid(format!(
            "adrfam '{adrfam}' not supported"
        )));
    }
    let trsvcid = a.trsvcid.unwrap_or_else(|| "4420".into());
    if trsvcid.parse::<u16>().is_err() {
        return Err(NvmfError::invalid(format!("invalid trsvcid '{trsvcid}'")));
    }
    if a.traddr.parse::<std::net::IpAddr>().is_err() {
        return Err(NvmfError::invalid(format!("invalid traddr '{}'", a.traddr)));
    }
    Ok(ListenAddr {
        adrfam: if adrfam.eq_ignore_ascii_case("ipv6") {
            "IPv6".into()
        } else {
            "IPv4".into()
        },
        traddr: a.traddr,
        trsvcid,
    })
}

fn add_listener(p: Value) -> Result<Value, NvmfError> {
    let p: Listener = parse(p)?;
    if p.secure_channel == Some(true) {
        return Err(NvmfError::invalid("secure_channel (TLS) is not supported"));
    }
    let addr = listen_addr(p.listen_address)?;
    let nqn = if p.nqn == "discovery" {
        DISCOVERY_NQN.to_owned()
    } else {
        p.nqn
    };
    let s = subsystem::find_subsystem(&nqn)
        .ok_or_else(|| NvmfError::not_found(format!("subsystem {nqn} not found")))?;
    let mut t = target();
    if s.lock().listeners.contains(&addr) {
        return Err(NvmfError::exists(format!(
            "listener {}:{} already on {nqn}",
            addr.traddr, addr.trsvcid
        )));
    }
    listener::acquire(&mut t, &addr)?;
    s.lock().listeners.push(addr);
    t.discovery_changed();
    Ok(json!(true))
}

fn remove_listener(p: Value) -> Result<Value, NvmfError> {
    let p: Listener = parse(p)?;
    let addr = listen_addr(p.listen_address)?;
    let nqn = if p.nqn == "discovery" {
        DISCOVERY_NQN.to_owned()
    } else {
        p.nqn
    };
    let s = subsystem::find_subsystem(&nqn)
        .ok_or_else(|| NvmfError::not_found(format!("subsystem {nqn} not found")))?;
    let mut t = target();
    let mut st = s.lock();
    let Some(i) = st.listeners.iter().position(|a| *a == addr) else {
        return Err(NvmfError::not_found(format!(
            "listener {}:{} not found on {nqn}",
            addr.traddr, addr.trsvcid
        )));
    };
    st.listeners.remove(i);
    drop(st);
    // As SPDK: what came in through that address for this subsystem goes away with it.
    subsystem::disconnect_listener(&s, &addr);
    listener::release(&mut t, &addr);
    t.discovery_changed();
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct NsParams {
    bdev_name: String,
    nsid: Option<u32>,
    nguid: Option<String>,
    eui64: Option<String>,
    uuid: Option<String>,
    anagrpid: Option<u32>,
    ptpl_file: Option<String>,
    no_auto_visible: Option<bool>,
    hide_metadata: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct AddNs {
    nqn: String,
    namespace: NsParams,
    tgt_name: Option<String>,
}

fn parse_hex16(s: &str) -> Result<[u8; 16], NvmfError> {
    let h: String = s.chars().filter(|c| *c != '-').collect();
    if h.len() != 32 || !h.is_ascii() {
        return Err(NvmfError::invalid(format!("'{s}' is not 16 hex bytes")));
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&h[i * 2..i * 2 + 2], 16)
            .map_err(|_| NvmfError::invalid(format!("'{s}' is not 16 hex bytes")))?;
    }
    Ok(out)
}

fn add_ns(p: Value) -> Result<Value, NvmfError> {
    let p: AddNs = parse(p)?;
    let uuid = p.namespace.uuid.as_deref().map(parse_hex16).transpose()?;
    let nguid = p.namespace.nguid.as_deref().map(parse_hex16).transpose()?;
    let nsid = subsystem::add_ns(
        &p.nqn,
        &p.namespace.bdev_name,
        p.namespace.nsid,
        uuid,
        nguid,
    )?;
    Ok(json!(nsid))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct RemoveNs {
    nqn: String,
    nsid: u32,
    tgt_name: Option<String>,
}

fn remove_ns(p: Value) -> Result<Value, NvmfError> {
    let p: RemoveNs = parse(p)?;
    subsystem::remove_ns(&p.nqn, p.nsid)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Host {
    nqn: String,
    host: String,
    tgt_name: Option<String>,
    psk: Option<String>,
    dhchap_key: Option<String>,
    dhchap_ctrlr_key: Option<String>,
    timeout_ms: Option<u64>,
}

fn nvm_subsystem(nqn: &str) -> Result<std::sync::Arc<subsystem::Subsystem>, NvmfError> {
    subsystem::find_subsystem(nqn)
        .filter(|s| !s.is_discovery)
        .ok_or_else(|| NvmfError::not_found(format!("subsystem {nqn} not found")))
}

fn add_host(p: Value) -> Result<Value, NvmfError> {
    let p: Host = parse(p)?;
    if p.psk.is_some() || p.dhchap_key.is_some() || p.dhchap_ctrlr_key.is_some() {
        return Err(NvmfError::invalid(
            "TLS PSK and DH-HMAC-CHAP are not supported",
        ));
    }
    let s = nvm_subsystem(&p.nqn)?;
    {
        let mut st = s.lock();
        if st.hosts.contains(&p.host) {
            return Err(NvmfError::exists(format!(
                "host {} already allowed on {}",
                p.host, p.nqn
            )));
        }
        st.hosts.push(p.host);
    }
    target().discovery_changed();
    Ok(json!(true))
}

fn remove_host(p: Value) -> Result<Value, NvmfError> {
    let p: Host = parse(p)?;
    let s = nvm_subsystem(&p.nqn)?;
    let allow_any = {
        let mut st = s.lock();
        let Some(i) = st.hosts.iter().position(|h| *h == p.host) else {
            return Err(NvmfError::not_found(format!(
                "host {} not found on {}",
                p.host, p.nqn
            )));
        };
        st.hosts.remove(i);
        st.allow_any_host
    };
    if !allow_any {
        subsystem::disconnect_host(&s, &p.host);
    }
    target().discovery_changed();
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct AllowAny {
    nqn: String,
    allow_any_host: bool,
    tgt_name: Option<String>,
}

fn allow_any_host(p: Value) -> Result<Value, NvmfError> {
    let p: AllowAny = parse(p)?;
    let s = nvm_subsystem(&p.nqn)?;
    s.lock().allow_any_host = p.allow_any_host;
    target().discovery_changed();
    Ok(json!(true))
}

fn get_controllers(p: Value) -> Result<Value, NvmfError> {
    let p: NqnOnly = parse(p)?;
    let s = subsystem::find_subsystem(&p.nqn)
        .ok_or_else(|| NvmfError::not_found(format!("subsystem {} not found", p.nqn)))?;
    let ctrlrs = s.lock().ctrlrs.clone();
    Ok(Value::Array(ctrlrs.iter().map(|c| c.to_json()).collect()))
}

fn sock_json(a: &std::net::SocketAddr) -> Value {
    json!({
        "trtype": "TCP",
        "adrfam": if a.is_ipv4() { "IPv4" } else { "IPv6" },
        "traddr": a.ip().to_string(),
        "trsvcid": a.port().to_string(),
    })
}

fn get_qpairs(p: Value) -> Result<Value, NvmfError> {
    let p: NqnOnly = parse(p)?;
    let s = subsystem::find_subsystem(&p.nqn)
        .ok_or_else(|| NvmfError::not_found(format!("subsystem {} not found", p.nqn)))?;
    let ctrlrs = s.lock().ctrlrs.clone();
    let mut out = Vec::new();
    for c in ctrlrs {
        let st = c.lock();
        for (qid, q) in st
            .admin
            .iter()
            .map(|a| (0u16, a))
            .chain(st.io_qpairs.iter().map(|(k, v)| (*k, v)))
        {
            out.push(json!({
                "cntlid": c.cntlid,
                "qid": qid,
                "state": "active",
                "thread": format!("nvmf_tgt_poll_group_{}", q.reactor.index()),
                "listen_address": sock_json(&q.local),
                "peer_address": sock_json(&q.peer),
            }));
        }
    }
    Ok(Value::Array(out))
}

/// The calls that recreate the transport, subsystems, hosts, namespaces and listeners
/// (for `save_config`, subsystem "nvmf").
pub fn config_json() -> Vec<Value> {
    let t = target();
    let mut out = Vec::new();
    let Some(o) = &t.transport else {
        return out;
    };
    out.push(json!({"method": "nvmf_create_transport", "params": transport_json(o)}));
    for s in t.subsystems.values() {
        let st = s.lock();
        out.push(json!({"method": "nvmf_create_subsystem", "params": {
            "nqn": s.nqn, "serial_number": st.serial, "model_number": st.model,
            "allow_any_host": st.allow_any_host, "max_namespaces": st.max_namespaces,
        }}));
        for h in &st.hosts {
            out.push(
                json!({"method": "nvmf_subsystem_add_host", "params": {"nqn": s.nqn, "host": h}}),
            );
        }
        for ns in st.namespaces.values() {
            let mut nsp = json!({"bdev_name": ns.bdev_name, "nsid": ns.nsid});
            if ns.explicit_ids {
                nsp["uuid"] = json!(format_uuid(&ns.uuid));
                nsp["nguid"] = json!(ns
                    .nguid
                    .iter()
                    .map(|b| format!("{b:02X}"))
                    .collect::<String>());
            }
            out.push(json!({"method": "nvmf_subsystem_add_ns", "params": {"nqn": s.nqn, "namespace": nsp}}));
        }
        for a in &st.listeners {
            out.push(json!({"method": "nvmf_subsystem_add_listener", "params": {
                "nqn": s.nqn, "listen_address": addr_json(a)}}));
        }
    }
    for a in &t.discovery.lock().listeners {
        out.push(json!({"method": "nvmf_subsystem_add_listener", "params": {
            "nqn": DISCOVERY_NQN, "listen_address": addr_json(a)}}));
    }
    out
}

/// Stops every listener and disconnects every qpair (SIGTERM). The configuration stays
/// (save_config still reports it); a later `nvmf_create_transport` is refused as before.
pub fn shutdown() {
    let mut t = target();
    listener::stop_all(&mut t);
    drop(t);
    crate::tcp::shutdown_qpairs();
}
