//! The bdev module over the host (SPDK's `module/bdev/nvme`): one bdev `<name>n<nsid>` per
//! active namespace; every namespace of a controller shares the controller's I/O queue on
//! each reactor.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use bdev::{
    Bdev, BdevCore, BdevCoreOpts, BdevError, BdevModule, Completer, ErrorKind, IoType,
    ModuleChannel, ModuleIo, Uuid,
};
use reactor::IoChannel;
use serde_json::{json, Value};

use crate::host::ctrlr::{Ctrlr, NsInfo};
use crate::host::ioq::IoQueue;
use crate::host::HostError;

/// Module name.
pub const MODULE_NAME: &str = "nvme";
/// ONCS bit: Dataset Management.
const ONCS_DSM: u16 = 1 << 2;
/// ONCS bit: Write Zeroes.
const ONCS_WRITE_ZEROES: u16 = 1 << 3;

/// The module (registered with the bdev layer by [`crate::rpc_methods`]' first use).
#[derive(Debug)]
pub struct NvmeModule;

impl BdevModule for NvmeModule {
    fn name(&self) -> &'static str {
        MODULE_NAME
    }

    fn config_json(&self) -> Vec<Value> {
        Vec::new()
    }

    fn fini(&self) {
        crate::shutdown();
    }
}

/// A namespace of a remote controller.
pub struct NvmeBdev {
    core: BdevCore,
    ctrlr: Arc<Ctrlr>,
    ns: NsInfo,
    oncs: u16,
}

impl std::fmt::Debug for NvmeBdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NvmeBdev({})", self.core.name())
    }
}

impl Bdev for NvmeBdev {
    fn core(&self) -> &BdevCore {
        &self.core
    }

    fn io_type_supported(&self, io_type: IoType) -> bool {
        match io_type {
            IoType::Read | IoType::Write | IoType::Flush | IoType::Reset => true,
            IoType::Unmap => self.oncs & ONCS_DSM != 0,
            IoType::WriteZeroes => self.oncs & ONCS_WRITE_ZEROES != 0,
        }
    }

    fn create_channel(&self, completer: Completer) -> bdev::Result<Box<dyn ModuleChannel>> {
        if reactor::try_current().is_none() {
            return Err(BdevError::new(
                ErrorKind::InvalidArgument,
                format!("bdev '{}': NVMe channels need a reactor", self.core.name()),
            ));
        }
        let dev = self.ctrlr.io_device().ok_or_else(|| {
            BdevError::new(
                ErrorKind::Removed,
                format!("bdev '{}': controller gone", self.core.name()),
            )
        })?;
        Ok(Box::new(NvmeChannel {
            q: dev.channel(),
            nsid: self.ns.nsid,
            lba_shift: self.ns.lba_shift,
            completer,
            inflight: Rc::new(Cell::new(0)),
        }))
    }

    fn driver_specific(&self) -> Option<(&'static str, Value)> {
        let o = &self.ctrlr.opts;
        let (cntlid, model, serial) = {
            let i = self.ctrlr.info();
            (i.cntlid, i.model.clone(), i.serial.clone())
        };
        Some((
            "nvme",
            json!([{
                "trid": {"trtype": "TCP", "adrfam": o.adrfam, "traddr": o.addr.ip().to_string(),
                         "trsvcid": o.addr.port().to_string(), "subnqn": o.subnqn},
                "ctrlr_data": {"cntlid": cntlid, "model_number": model, "serial_number": serial,
                               "oncs": {"dsm": self.oncs & ONCS_DSM != 0,
                                        "write_zeroes": self.oncs & ONCS_WRITE_ZEROES != 0}},
                "ns_data": {"id": self.ns.nsid},
            }]),
        ))
    }
}

struct NvmeChannel {
    q: IoChannel<IoQueue>,
    nsid: u32,
    lba_shift: u32,
    completer: Completer,
    inflight: Rc<Cell<usize>>,
}

impl ModuleChannel for NvmeChannel {
    fn submit(&mut self, io: ModuleIo) {
        self.q.submit(
            io,
            self.nsid,
            self.lba_shift,
            &self.completer,
            &self.inflight,
        );
    }

    fn nr_inflight(&self) -> usize {
        self.inflight.get()
    }
}

/// Registers one bdev per namespace of `ctrlr`; returns their names. On error, the ones
/// registered are removed again.
pub fn register_namespaces(ctrlr: &Arc<Ctrlr>) -> Result<Vec<String>, HostError> {
    let (nss, oncs, vwc) = {
        let i = ctrlr.info();
        (i.namespaces.clone(), i.oncs, i.vwc)
    };
    let mut names: Vec<String> = Vec::new();
    for ns in nss {
        let name = format!("{}n{}", ctrlr.opts.name, ns.nsid);
        // The namespace's NGUID is the bdev UUID unless a bdev here already has it (the
        // exported bdev itself when the target runs in this process): then a random one.
        let uuid = (ns.nguid != [0; 16])
            .then_some(Uuid(ns.nguid))
            .filter(|u| bdev::registry().lookup(&u.to_string()).is_none());
        let core = BdevCore::new(BdevCoreOpts {
            name: name.clone(),
            aliases: Vec::new(),
            uuid,
            product_name: "NVMe disk",
            module_name: MODULE_NAME,
            block_size: 1 << ns.lba_shift,
            num_blocks: ns.nsze,
            optimal_io_boundary: 0,
            write_cache: vwc,
        });
        let r = core.and_then(|core| {
            bdev::registry().register(Arc::new(NvmeBdev {
                core,
                ctrlr: ctrlr.clone(),
                ns,
                oncs,
            }))
        });
        if let Err(e) = r {
            for n in &names {
                let _ = bdev::registry().unregister(n.as_str());
            }
            return Err(HostError::new(e.errno(), format!("bdev '{name}': {e}")));
        }
        names.push(name);
    }
    ctrlr.info().bdevs = names.clone();
    Ok(names)
}

/// Unregisters the bdevs of `ctrlr` (open descriptors get `Remove`).
pub fn unregister_namespaces(ctrlr: &Arc<Ctrlr>) {
    let names = std::mem::take(&mut ctrlr.info().bdevs);
    for n in names {
        let _ = bdev::registry().unregister(&n);
    }
}
