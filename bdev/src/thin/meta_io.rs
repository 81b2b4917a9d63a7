//! Blocking I/O on a bdev for the pool's metadata worker thread: each request is a message to
//! one reactor ("the I/O reactor"), which submits it on its channel; the worker waits for the
//! completion on a rendezvous channel. Never call these from a reactor (it would deadlock).
//!
//! [`MetaBlockIo`] is `pdata`'s [`BlockIo`] over the metadata bdev (4 KiB blocks);
//! [`SyncIo`] also serves the worker's few data-bdev operations (pre-commit flush, the label
//! table block) and, without waiting ([`SyncIo::start`]), discard passdown.

use std::cell::Cell;
use std::io;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use pdata::{BlockIo, BLOCK_SIZE};
use reactor::{ReactorId, RuntimeHandle};

use crate::bdev::IoStatus;
use crate::buf::IoBuf;
use crate::desc::BdevDesc;
use crate::io::{IoCallback, IoDone};

/// How long the worker waits for one I/O before declaring it failed (a stopped runtime never
/// answers).
const SYNC_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// One blocking operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SyncOp {
    Read,
    Write,
    Flush,
    Unmap,
}

/// Blocking access to one bdev through a reactor.
#[derive(Clone)]
pub(crate) struct SyncIo {
    pub rt: RuntimeHandle,
    pub reactor: ReactorId,
    pub desc: Arc<BdevDesc>,
}

impl SyncIo {
    /// Block size of the bdev in bytes.
    pub fn block_size(&self) -> u64 {
        u64::from(self.desc.bdev().block_size())
    }

    /// Runs `op` on `[offset_bytes, offset_bytes + len_bytes)`; `data` is the write payload.
    /// Returns the bytes read (empty for other ops). Errors are positive errnos.
    pub fn run(
        &self,
        op: SyncOp,
        offset_bytes: u64,
        len_bytes: usize,
        data: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, i32> {
        let bs = self.block_size();
        assert!(offset_bytes.is_multiple_of(bs), "unaligned sync I/O offset");
        assert!(
            (len_bytes as u64).is_multiple_of(bs),
            "unaligned sync I/O length"
        );
        let (tx, rx) = mpsc::sync_channel::<Result<Vec<u8>, i32>>(1);
        self.start(
            op,
            offset_bytes,
            len_bytes,
            data,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        match rx.recv_timeout(SYNC_IO_TIMEOUT) {
            Ok(r) => r,
            Err(_) => Err(libc::EIO),
        }
    }

    /// Starts `op` like [`SyncIo::run`] without waiting: `done` gets the outcome on the I/O
    /// reactor (or is dropped unrun if the runtime stops first).
    pub fn start(
        &self,
        op: SyncOp,
        offset_bytes: u64,
        len_bytes: usize,
        data: Option<Vec<u8>>,
        done: SyncDone,
    ) {
        let bs = self.block_size();
        assert!(offset_bytes.is_multiple_of(bs), "unaligned I/O offset");
        assert!(
            (len_bytes as u64).is_multiple_of(bs),
            "unaligned I/O length"
        );
        let desc = self.desc.clone();
        self.rt.send_msg(self.reactor, move || {
            submit_on_reactor(&desc, op, offset_bytes / bs, len_bytes, data, done)
        });
    }
}

/// Receives the outcome of a [`SyncIo::start`]: the bytes read, or a positive errno.
pub(crate) type SyncDone = Box<dyn FnOnce(Result<Vec<u8>, i32>) + Send>;

/// On the I/O reactor: submit and hand the outcome to `done` from the completion.
fn submit_on_reactor(
    desc: &BdevDesc,
    op: SyncOp,
    offset_blocks: u64,
    len_bytes: usize,
    data: Option<Vec<u8>>,
    done: SyncDone,
) {
    let ch = match desc.get_io_channel() {
        Ok(ch) => ch,
        Err(e) => return done(Err(e.errno())),
    };
    let bs = u64::from(desc.bdev().block_size());
    let nr = len_bytes as u64 / bs;
    let keep = ch.clone();
    let slot = Rc::new(Cell::new(Some(done)));
    let slot_cb = slot.clone();
    let cb: IoCallback = Rc::new(move |d: IoDone| {
        let _channel_alive_until_done = &keep;
        let r = match d.status {
            IoStatus::Success => Ok(d.buf.as_ref().map(|b| b.to_vec()).unwrap_or_default()),
            other => Err(other.errno()),
        };
        if let Some(done) = slot_cb.take() {
            done(r);
        }
    });
    let r = match op {
        SyncOp::Read => ch.read(IoBuf::alloc(len_bytes), offset_blocks, nr, 0, &cb),
        SyncOp::Write => {
            let payload = data.unwrap_or_else(|| vec![0; len_bytes]);
            ch.write(IoBuf::from_slice(&payload), offset_blocks, nr, 0, &cb)
        }
        SyncOp::Flush => ch.flush(0, 0, 0, &cb),
        SyncOp::Unmap => ch.unmap(offset_blocks, nr, 0, &cb),
    };
    if let Err(e) = r {
        if let Some(done) = slot.take() {
            done(Err(e.errno()));
        }
    }
}

/// Metadata block writes in flight at once (a commit streams its shadowed blocks).
const MAX_WRITES_IN_FLIGHT: usize = 64;

/// `pdata`'s block interface over the metadata bdev (whose block size divides 4096).
///
/// Writes are pipelined: `write_block` starts the write and returns (up to
/// [`MAX_WRITES_IN_FLIGHT`] in flight); `flush` first waits for every write in flight, so
/// "durable after flush" holds, and reports a failed write; `read_block` also waits for them
/// first, so it never reads a block whose write is still in flight. A commit thus costs about
/// one round trip per [`MAX_WRITES_IN_FLIGHT`] blocks instead of one per block.
pub(crate) struct MetaBlockIo {
    io: SyncIo,
    nr_blocks: u64,
    done_tx: mpsc::Sender<Result<(), i32>>,
    done_rx: mpsc::Receiver<Result<(), i32>>,
    nr_inflight: Cell<usize>,
    /// First failure of a write not reported yet (reported by the next flush or write).
    failed: Cell<Option<i32>>,
}

impl MetaBlockIo {
    pub fn new(io: SyncIo) -> MetaBlockIo {
        let bytes = io.desc.bdev().num_blocks() * io.block_size();
        let (done_tx, done_rx) = mpsc::channel();
        MetaBlockIo {
            io,
            nr_blocks: bytes / BLOCK_SIZE as u64,
            done_tx,
            done_rx,
            nr_inflight: Cell::new(0),
            failed: Cell::new(None),
        }
    }

    fn check_loc(&self, loc: u64) -> io::Result<()> {
        if loc >= self.nr_blocks {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("metadata block {loc} beyond {}", self.nr_blocks),
            ));
        }
        Ok(())
    }

    /// Waits for one write in flight; a failure is latched in `failed`.
    fn wait_one(&self) {
        let n = self.nr_inflight.get();
        assert!(n > 0, "no metadata write in flight");
        let r = match self.done_rx.recv_timeout(SYNC_IO_TIMEOUT) {
            Ok(r) => {
                self.nr_inflight.set(n - 1);
                r
            }
            Err(_) => {
                // A stopped runtime never answers: give up on every write in flight.
                self.nr_inflight.set(0);
                Err(libc::EIO)
            }
        };
        if let Err(e) = r {
            if self.failed.get().is_none() {
                self.failed.set(Some(e));
            }
        }
    }

    /// Waits for every write in flight.
    fn drain(&self) {
        while self.nr_inflight.get() > 0 {
            self.wait_one();
        }
        debug_assert_eq!(self.nr_inflight.get(), 0);
    }

    /// Reports (once) a failed write.
    fn take_failure(&self) -> io::Result<()> {
        match self.failed.take() {
            Some(e) => Err(errno_to_io(e)),
            None => Ok(()),
        }
    }
}

fn errno_to_io(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl BlockIo for MetaBlockIo {
    fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    fn read_block(&self, loc: u64, buf: &mut [u8; BLOCK_SIZE]) -> io::Result<()> {
        self.check_loc(loc)?;
        self.drain();
        let off = loc * BLOCK_SIZE as u64;
        let data = self
            .io
            .run(SyncOp::Read, off, BLOCK_SIZE, None)
            .map_err(errno_to_io)?;
        if data.len() != BLOCK_SIZE {
            return Err(io::Error::other("short metadata read"));
        }
        buf.copy_from_slice(&data);
        Ok(())
    }

    fn write_block(&self, loc: u64, buf: &[u8; BLOCK_SIZE]) -> io::Result<()> {
        self.check_loc(loc)?;
        self.take_failure()?;
        if self.nr_inflight.get() >= MAX_WRITES_IN_FLIGHT {
            self.wait_one();
        }
        let off = loc * BLOCK_SIZE as u64;
        let tx = self.done_tx.clone();
        self.nr_inflight.set(self.nr_inflight.get() + 1);
        self.io.start(
            SyncOp::Write,
            off,
            BLOCK_SIZE,
            Some(buf.to_vec()),
            Box::new(move |r| {
                let _ = tx.send(r.map(|_| ()));
            }),
        );
        assert!(self.nr_inflight.get() <= MAX_WRITES_IN_FLIGHT);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.drain();
        self.take_failure()?;
        self.io
            .run(SyncOp::Flush, 0, 0, None)
            .map(|_| ())
            .map_err(errno_to_io)
    }
}

impl Drop for MetaBlockIo {
    fn drop(&mut self) {
        // Writes still in flight hold their own buffers; wait so that a reopened pool reads
        // what they wrote.
        self.drain();
    }
}
