//! Target-wide control-path state: transport options, subsystems with their namespaces,
//! hosts and listeners, and the controllers connected to them.
//!
//! Everything here is control path, guarded by mutexes taken only by RPC handlers,
//! Connect, and namespace-change notices; the data path reads a namespace snapshot cached
//! per qpair and revalidated through [`Subsystem::ns_gen`]. Lock order: [`TARGET`], then a
//! subsystem's `state`, then a controller's `state`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use bdev::{BdevDesc, BdevEvent};

use crate::ctrlr::Ctrlr;
use crate::error::NvmfError;
use crate::spec::DISCOVERY_NQN;
use crate::tcp::listener::Listener;

/// TCP transport options (SPDK `nvmf_create_transport` names and defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportOpts {
    /// I/O queue entries (MQES + 1).
    pub max_queue_depth: u32,
    /// Queue pairs per controller (admin included, as SPDK counts).
    pub max_qpairs_per_ctrlr: u32,
    /// In-capsule data on I/O queues, bytes.
    pub in_capsule_data_size: u32,
    /// Largest command transfer, bytes (MDTS, MAXH2CDATA).
    pub max_io_size: u32,
    /// I/O unit size (reported only).
    pub io_unit_size: u32,
    /// Admin queue entries.
    pub max_aq_depth: u32,
    /// Use the C2HData SUCCESS flag when the host disabled SQ flow control.
    pub c2h_success: bool,
    /// Abort timeout (reported only).
    pub abort_timeout_sec: u32,
    /// Listen backlog of the listening sockets.
    pub acceptor_backlog: u32,
}

impl Default for TransportOpts {
    fn default() -> Self {
        TransportOpts {
            max_queue_depth: 128,
            max_qpairs_per_ctrlr: 128,
            in_capsule_data_size: 4096,
            max_io_size: 131072,
            io_unit_size: 131072,
            max_aq_depth: 128,
            c2h_success: true,
            abort_timeout_sec: 1,
            acceptor_backlog: 128,
        }
    }
}

/// Admin and fabrics commands may always carry this much in-capsule data.
pub const ADMIN_IN_CAPSULE: u32 = 8192;

/// A listen address as SPDK's RPCs spell it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenAddr {
    /// Address family ("IPv4").
    pub adrfam: String,
    /// IP address.
    pub traddr: String,
    /// Port.
    pub trsvcid: String,
}

/// One exported namespace: an open descriptor on its bdev.
pub struct Namespace {
    /// Namespace id (1-based).
    pub nsid: u32,
    /// Bdev name as given.
    pub bdev_name: String,
    /// Open (read-write) descriptor.
    pub desc: BdevDesc,
    /// Namespace UUID.
    pub uuid: [u8; 16],
    /// Namespace globally unique identifier.
    pub nguid: [u8; 16],
    /// Whether a UUID was given explicitly (for save_config).
    pub explicit_ids: bool,
}

impl std::fmt::Debug for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Namespace({} -> {})", self.nsid, self.bdev_name)
    }
}

impl Namespace {
    /// Size in blocks (live: follows bdev resizes).
    pub fn num_blocks(&self) -> u64 {
        self.desc.bdev().num_blocks()
    }
    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.desc.bdev().block_size()
    }
}

/// Mutable subsystem state.
#[derive(Debug, Default)]
pub struct SubsysState {
    /// Serial number (SN, 20 ASCII).
    pub serial: String,
    /// Model number (MN, 40 ASCII).
    pub model: String,
    /// Any host may connect.
    pub allow_any_host: bool,
    /// Allowed host NQNs.
    pub hosts: Vec<String>,
    /// Listen addresses.
    pub listeners: Vec<ListenAddr>,
    /// Namespaces by nsid.
    pub namespaces: BTreeMap<u32, Arc<Namespace>>,
    /// Most namespaces (also the NN reported).
    pub max_namespaces: u32,
    /// Connected controllers.
    pub ctrlrs: Vec<Arc<Ctrlr>>,
    /// Next controller id to try.
    pub next_cntlid: u16,
}

/// An NVM subsystem or the discovery subsystem.
#[derive(Debug)]
pub struct Subsystem {
    /// NQN.
    pub nqn: String,
    /// True for the well-known discovery subsystem.
    pub is_discovery: bool,
    /// Bumped on every namespace change; qpairs revalidate their caches when it moves.
    pub ns_gen: AtomicU64,
    /// Deleted: refuse new connections.
    pub deleted: AtomicBool,
    /// Everything else.
    pub state: Mutex<SubsysState>,
}

impl Subsystem {
    fn new(nqn: &str, is_discovery: bool) -> Arc<Subsystem> {
        Arc::new(Subsystem {
            nqn: nqn.to_owned(),
            is_discovery,
            ns_gen: AtomicU64::new(1),
            deleted: AtomicBool::new(false),
            state: Mutex::new(SubsysState {
                next_cntlid: 1,
                max_namespaces: 32,
                allow_any_host: is_discovery,
                ..Default::default()
            }),
        })
    }

    /// Locks the state (poisoning ignored: the state stays consistent per operation).
    pub fn lock(&self) -> MutexGuard<'_, SubsysState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `hostnqn` may connect.
    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        let st = self.lock();
        st.allow_any_host || st.hosts.iter().any(|h| h == hostnqn)
    }

    /// Whether a connection that came in through `addr` may connect to this subsystem:
    /// it must listen there (the discovery subsystem answers on every listener).
    pub fn listener_allowed(&self, addr: &ListenAddr) -> bool {
        self.is_discovery || self.lock().listeners.contains(addr)
    }

    /// Namespace `nsid`.
    pub fn namespace(&self, nsid: u32) -> Option<Arc<Namespace>> {
        self.lock().namespaces.get(&nsid).cloned()
    }

    /// Tells every controller that namespace `nsid` changed.
    pub fn notify_ns_changed(&self, nsid: u32) {
        self.ns_gen.fetch_add(1, Ordering::SeqCst);
        let ctrlrs = self.lock().ctrlrs.clone();
        for c in ctrlrs {
            c.ns_changed(nsid);
        }
    }
}

/// The whole target.
#[derive(Debug)]
pub struct Target {
    /// The TCP transport, once created.
    pub transport: Option<TransportOpts>,
    /// NVM subsystems by NQN.
    pub subsystems: BTreeMap<String, Arc<Subsystem>>,
    /// The discovery subsystem.
    pub discovery: Arc<Subsystem>,
    /// Bound sockets, shared by the subsystems listening on them.
    pub listeners: Vec<Listener>,
    /// Discovery log generation counter: change it only with [`Target::discovery_changed`].
    pub genctr: u64,
}

impl Target {
    /// The discovery log changed (subsystems, listeners or hosts): bump GENCTR and send a
    /// Discovery Log Change notice to every discovery controller that asked for one.
    pub fn discovery_changed(&mut self) {
        self.genctr += 1;
        let ctrlrs = self.discovery.lock().ctrlrs.clone();
        for c in ctrlrs {
            c.discovery_log_changed();
        }
    }
}

/// The target singleton.
pub static TARGET: LazyLock<Mutex<Target>> = LazyLock::new(|| {
    Mutex::new(Target {
        transport: None,
        subsystems: BTreeMap::new(),
        discovery: Subsystem::new(DISCOVERY_NQN, true),
        listeners: Vec::new(),
        genctr: 0,
    })
});

/// Locks the target.
pub fn target() -> MutexGuard<'static, Target> {
    TARGET.lock().unwrap_or_else(|e| e.into_inner())
}

/// The subsystem `nqn` (discovery included).
pub fn find_subsystem(nqn: &str) -> Option<Arc<Subsystem>> {
    let t = target();
    if nqn == DISCOVERY_NQN {
        return Some(t.discovery.clone());
    }
    t.subsystems.get(nqn).cloned()
}

/// The transport options (defaults if no transport was created yet).
pub fn transport_opts() -> Option<TransportOpts> {
    target().transport.clone()
}

/// Creates an NVM subsystem.
pub fn create_subsystem(nqn: &str, st: SubsysState) -> Result<(), NvmfError> {
    if nqn == DISCOVERY_NQN {
        return Err(NvmfError::invalid("cannot create the discovery subsystem"));
    }
    if !nqn.starts_with("nqn.") || nqn.len() > 223 || !nqn.is_ascii() {
        return Err(NvmfError::invalid(format!(
            "invalid NQN '{nqn}': must start with 'nqn.' and be at most 223 ASCII bytes"
        )));
    }
    let mut t = target();
    if t.subsystems.contains_key(nqn) {
        return Err(NvmfError::exists(format!("subsystem {nqn} already exists")));
    }
    let s = Subsystem::new(nqn, false);
    {
        let mut g = s.lock();
        g.serial = st.serial;
        g.model = st.model;
        g.allow_any_host = st.allow_any_host;
        g.max_namespaces = st.max_namespaces;
    }
    t.subsystems.insert(nqn.to_owned(), s);
    t.discovery_changed();
    Ok(())
}

/// Adds bdev `bdev_name` as a namespace; returns its nsid.
pub fn add_ns(
    nqn: &str,
    bdev_name: &str,
    nsid: Option<u32>,
    uuid: Option<[u8; 16]>,
    nguid: Option<[u8; 16]>,
) -> Result<u32, NvmfError> {
    let s = find_subsystem(nqn)
        .filter(|s| !s.is_discovery)
        .ok_or_else(|| NvmfError::not_found(format!("subsystem {nqn} not found")))?;
    let nqn_owned = nqn.to_owned();
    let nsid_slot = Arc::new(AtomicU64::new(0));
    let slot = nsid_slot.clone();
    let desc = BdevDesc::open(bdev_name, true, move |ev| {
        let id = slot.load(Ordering::SeqCst) as u32;
        ns_event(&nqn_owned, id, ev);
    })
    .map_err(|e| NvmfError::errno(e.errno(), format!("bdev {bdev_name}: {e}")))?;
    let bdev = desc.bdev().clone();
    let id = {
        let mut st = s.lock();
        let id = match nsid {
            Some(0) | None => (1..=st.max_namespaces.max(1))
                .find(|n| !st.namespaces.contains_key(n))
                .ok_or_else(|| NvmfError::no_space(format!("subsystem {nqn} is full")))?,
            Some(n) if n > st.max_namespaces => {
                return Err(NvmfError::invalid(format!(
                    "nsid {n} exceeds max_namespaces {}",
                    st.max_namespaces
                )))
            }
            Some(n) if st.namespaces.contains_key(&n) => {
                return Err(NvmfError::exists(format!("nsid {n} is already in use")))
            }
            Some(n) => n,
        };
        if st.namespaces.values().any(|ns| ns.bdev_name == bdev_name) {
            return Err(NvmfError::exists(format!(
                "bdev {bdev_name} is already a namespace of {nqn}"
            )));
        }
        let buuid = bdev.uuid().0;
        st.namespaces.insert(
            id,
            Arc::new(Namespace {
                nsid: id,
                bdev_name: bdev_name.to_owned(),
                desc,
                uuid: uuid.unwrap_or(buuid),
                nguid: nguid.unwrap_or(uuid.unwrap_or(buuid)),
                explicit_ids: uuid.is_some() || nguid.is_some(),
            }),
        );
        id
    };
    nsid_slot.store(u64::from(id), Ordering::SeqCst);
    s.notify_ns_changed(id);
    Ok(id)
}

/// Bdev events on a namespace's descriptor: resize → notice; remove → drop the namespace
/// (off the event thread: removal closes the descriptor).
fn ns_event(nqn: &str, nsid: u32, ev: BdevEvent) {
    match ev {
        BdevEvent::Resize { .. } => {
            if let Some(s) = find_subsystem(nqn) {
                s.notify_ns_changed(nsid);
            }
        }
        BdevEvent::Remove => {
            let nqn = nqn.to_owned();
            std::thread::spawn(move || {
                let _ = remove_ns(&nqn, nsid);
            });
        }
    }
}

/// Removes namespace `nsid`.
pub fn remove_ns(nqn: &str, nsid: u32) -> Result<(), NvmfError> {
    let s = find_subsystem(nqn)
        .filter(|s| !s.is_discovery)
        .ok_or_else(|| NvmfError::not_found(format!("subsystem {nqn} not found")))?;
    let removed = s.lock().namespaces.remove(&nsid);
    if removed.is_none() {
        return Err(NvmfError::not_found(format!(
            "nsid {nsid} not found in {nqn}"
        )));
    }
    s.notify_ns_changed(nsid);
    Ok(())
}

/// Deletes subsystem `nqn`, disconnecting its controllers.
pub fn delete_subsystem(nqn: &str) -> Result<(), NvmfError> {
    let s = {
        let mut t = target();
        let s = t
            .subsystems
            .remove(nqn)
            .ok_or_else(|| NvmfError::not_found(format!("subsystem {nqn} not found")))?;
        let addrs = s.lock().listeners.clone();
        for a in &addrs {
            crate::tcp::listener::release(&mut t, a);
        }
        t.discovery_changed();
        s
    };
    s.deleted.store(true, Ordering::SeqCst);
    let ctrlrs = std::mem::take(&mut s.lock().ctrlrs);
    for c in ctrlrs {
        c.fail("subsystem deleted");
    }
    s.lock().namespaces.clear();
    s.ns_gen.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// Disconnects what came into `s` through listener `addr` (removed from `s`): controllers
/// whose admin queue did are torn down, other controllers lose the I/O queues that did.
pub fn disconnect_listener(s: &Subsystem, addr: &ListenAddr) {
    let ctrlrs = s.lock().ctrlrs.clone();
    for c in ctrlrs {
        c.disconnect_listener(addr);
    }
}

/// Disconnects every controller of `hostnqn` on `s` (host removed from the allowed list).
pub fn disconnect_host(s: &Subsystem, hostnqn: &str) {
    let ctrlrs: Vec<_> = s
        .lock()
        .ctrlrs
        .iter()
        .filter(|c| c.hostnqn == hostnqn)
        .cloned()
        .collect();
    for c in ctrlrs {
        c.fail("host removed");
    }
}
