//! `RecordBdev`: passes I/O through to a base bdev and logs every completed write, unmap,
//! write_zeroes and flush in completion (acknowledgement) order. [`RecordBdev::materialize`]
//! rebuilds the device image after any prefix of the log, so crash tests can replay every
//! prefix: everything acknowledged before the last flush in a prefix must be readable.
//!
//! Test device: the log is behind a mutex taken on each completion.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::bdev::{Bdev, BdevCore, BdevCoreOpts, IoType};
use crate::desc::BdevDesc;
use crate::error::{BdevError, Result};
use crate::io::{BdevChannel, Completer, IoCallback, ModuleChannel, ModuleIo};
use crate::registry::registry;

use super::{base_callback, forward, open_and_claim, Inflight};

/// Module name.
pub const MODULE_NAME: &str = "record";

/// One logged operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEntry {
    /// A completed write of `data` at `offset_blocks`.
    Write {
        /// First block.
        offset_blocks: u64,
        /// The bytes written.
        data: Vec<u8>,
    },
    /// A completed unmap or write_zeroes (materialised as zeroes).
    Zero {
        /// First block.
        offset_blocks: u64,
        /// Number of blocks.
        num_blocks: u64,
    },
    /// A completed flush.
    Flush,
}

/// The recording bdev.
pub struct RecordBdev {
    core: BdevCore,
    base: Arc<dyn Bdev>,
    desc: BdevDesc,
    log: Arc<Mutex<Vec<LogEntry>>>,
    initial: Vec<u8>,
}

impl RecordBdev {
    fn log_lock(&self) -> MutexGuard<'_, Vec<LogEntry>> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the log so far.
    pub fn log(&self) -> Vec<LogEntry> {
        self.log_lock().clone()
    }

    /// Number of log entries.
    pub fn log_len(&self) -> usize {
        self.log_lock().len()
    }

    /// Indexes of the flush entries.
    pub fn flush_indices(&self) -> Vec<usize> {
        let log = self.log_lock();
        log.iter()
            .enumerate()
            .filter(|(_, e)| **e == LogEntry::Flush)
            .map(|(i, _)| i)
            .collect()
    }

    /// The device image after applying the first `prefix` log entries to the initial image
    /// (zeroes unless given at creation). `prefix` larger than the log applies all of it.
    pub fn materialize(&self, prefix: usize) -> Vec<u8> {
        let mut img = self.initial.clone();
        let bs = self.core.block_size() as usize;
        for e in self.log_lock().iter().take(prefix) {
            match e {
                LogEntry::Write {
                    offset_blocks,
                    data,
                } => {
                    let off = *offset_blocks as usize * bs;
                    if let Some(dst) = img.get_mut(off..off + data.len()) {
                        dst.copy_from_slice(data);
                    }
                }
                LogEntry::Zero {
                    offset_blocks,
                    num_blocks,
                } => {
                    let off = *offset_blocks as usize * bs;
                    let end = (off + *num_blocks as usize * bs).min(img.len());
                    if let Some(dst) = img.get_mut(off..end) {
                        dst.fill(0);
                    }
                }
                LogEntry::Flush => {}
            }
        }
        img
    }
}

impl Bdev for RecordBdev {
    fn core(&self) -> &BdevCore {
        &self.core
    }

    fn io_type_supported(&self, io_type: IoType) -> bool {
        self.base.io_type_supported(io_type)
    }

    fn create_channel(&self, completer: Completer) -> Result<Box<dyn ModuleChannel>> {
        let base = self.desc.get_io_channel()?;
        let inflight = Rc::new(RefCell::new(Inflight::new()));
        let log = self.log.clone();
        let done_completer = completer.clone();
        let cb = base_callback(inflight.clone(), move |io: ModuleIo, _flag, done| {
            if done.status.is_success() {
                let entry = match io.io_type() {
                    IoType::Write => Some(LogEntry::Write {
                        offset_blocks: io.offset_blocks(),
                        data: io.buf().to_vec(),
                    }),
                    IoType::Unmap | IoType::WriteZeroes => Some(LogEntry::Zero {
                        offset_blocks: io.offset_blocks(),
                        num_blocks: io.num_blocks(),
                    }),
                    IoType::Flush => Some(LogEntry::Flush),
                    IoType::Read | IoType::Reset => None,
                };
                if let Some(entry) = entry {
                    log.lock().unwrap_or_else(|e| e.into_inner()).push(entry);
                }
            }
            done_completer.complete(io, done.status);
        });
        Ok(Box::new(RecordChannel {
            base,
            inflight,
            completer,
            cb,
        }))
    }

    fn destruct(&self) {
        self.desc.release_claim();
    }
}

struct RecordChannel {
    base: BdevChannel,
    inflight: Rc<RefCell<Inflight>>,
    completer: Completer,
    cb: IoCallback,
}

impl ModuleChannel for RecordChannel {
    fn submit(&mut self, io: ModuleIo) {
        forward(
            &self.base,
            &self.inflight,
            &self.completer,
            &self.cb,
            io,
            None,
            0,
        );
    }

    fn poll(&mut self) -> usize {
        self.base.poll()
    }

    fn nr_inflight(&self) -> usize {
        self.inflight.borrow().len()
    }
}

impl Drop for RecordChannel {
    fn drop(&mut self) {
        super::drain_base(&self.base, &self.inflight);
    }
}

/// Creates and registers a recording bdev `name` over `base_name` (claimed). `initial` is
/// the base's current contents for [`RecordBdev::materialize`] (zeroes if `None`).
///
/// Errors: `ENODEV` no base, `EPERM` base claimed, `EEXIST` name taken, `EINVAL` bad image.
pub fn create(name: &str, base_name: &str, initial: Option<Vec<u8>>) -> Result<Arc<RecordBdev>> {
    let desc = open_and_claim(base_name, MODULE_NAME)?;
    let base = desc.bdev().clone();
    let size = (base.num_blocks() * u64::from(base.block_size())) as usize;
    let initial = initial.unwrap_or_else(|| vec![0; size]);
    if initial.len() != size {
        return Err(BdevError::invalid(format!(
            "record bdev '{name}': initial image is {} bytes, base is {size}",
            initial.len()
        )));
    }
    let core = BdevCore::new(BdevCoreOpts {
        name: name.to_string(),
        aliases: Vec::new(),
        uuid: None,
        product_name: "Record disk",
        module_name: MODULE_NAME,
        block_size: base.block_size(),
        num_blocks: base.num_blocks(),
        optimal_io_boundary: base.optimal_io_boundary(),
        write_cache: true,
    })?;
    let bdev = Arc::new(RecordBdev {
        core,
        base,
        desc,
        log: Arc::default(),
        initial,
    });
    registry().register(bdev.clone())?;
    Ok(bdev)
}
