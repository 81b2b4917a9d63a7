//! NVM I/O commands mapped to bdev I/O on the qpair's reactor: Read, Write (FUA via a
//! following flush), Flush, Write Zeroes, Dataset Management deallocate (unmap).
//! Every field is checked before submission; bad input gets an NVMe status.

use bdev::{IoBuf, IoDone, IoStatus, IoType};

use crate::spec::{nvm, sc, DNR};
use crate::tcp::qpair::{Outcome, Qpair};

/// Most DSM ranges (NR is 8 bits, 0's based).
const MAX_DSM_RANGES: usize = 256;

impl Qpair {
    /// Executes an I/O command.
    pub(crate) fn exec_io(&mut self, slot: usize) -> Outcome {
        let sqe = self.reqs[slot].sqe;
        let enabled = self.ctrlr.as_ref().is_some_and(|c| c.lock().csts & 1 == 1);
        if !enabled {
            return Outcome::status(sc::CMD_SEQ_ERROR | DNR);
        }
        let Some((ns, ch)) = self.ns_lookup(sqe.nsid()) else {
            return Outcome::status(sc::INVALID_NS | DNR);
        };
        let bs = u64::from(ns.block_size());
        let nsze = ns.num_blocks();
        let slba = sqe.cdw10_11();
        let nlb = u64::from(sqe.cdw(12) & 0xFFFF) + 1;
        let in_range = slba.checked_add(nlb).is_some_and(|end| end <= nsze);
        let Some(cb) = self.cb.clone() else {
            return Outcome::status(sc::INTERNAL);
        };
        let tag = slot as u64;
        let r = &mut self.reqs[slot];
        r.ch = Some(ch.clone());
        r.ns = Some(ns.clone());
        let res = match sqe.opc() {
            nvm::READ | nvm::WRITE => {
                if u64::from(r.xfer_len) != nlb * bs {
                    return Outcome::status(sc::SGL_LEN_INVALID | DNR);
                }
                if !in_range {
                    return Outcome::status(sc::LBA_RANGE | DNR);
                }
                if sqe.opc() == nvm::READ {
                    ch.read(IoBuf::alloc((nlb * bs) as usize), slba, nlb, tag, &cb)
                } else {
                    r.fua = sqe.cdw(12) & (1 << 30) != 0
                        && ns.desc.bdev().io_type_supported(IoType::Flush);
                    let Some(buf) = r.data.take() else {
                        return Outcome::status(sc::INTERNAL);
                    };
                    ch.write(buf, slba, nlb, tag, &cb)
                }
            }
            nvm::FLUSH => {
                if !ns.desc.bdev().io_type_supported(IoType::Flush) {
                    return Outcome::status(sc::SUCCESS);
                }
                ch.flush(0, nsze, tag, &cb)
            }
            nvm::WRITE_ZEROES => {
                if !in_range {
                    return Outcome::status(sc::LBA_RANGE | DNR);
                }
                if !ns.desc.bdev().io_type_supported(IoType::WriteZeroes) {
                    return Outcome::status(sc::INVALID_OPCODE | DNR);
                }
                ch.write_zeroes(slba, nlb, tag, &cb)
            }
            nvm::DSM => return self.dsm(slot),
            _ => return Outcome::status(sc::INVALID_OPCODE | DNR),
        };
        match res {
            Ok(()) => {
                self.bdev_submitted(slot);
                Outcome::Pending
            }
            Err(e) => Outcome::status(errno_status(e.errno())),
        }
    }

    /// Dataset Management: deallocate each range (others are hints: success).
    fn dsm(&mut self, slot: usize) -> Outcome {
        let r = &self.reqs[slot];
        let sqe = r.sqe;
        let nr = (sqe.cdw(10) & 0xFF) as usize + 1;
        if (r.xfer_len as usize) < nr * 16 {
            return Outcome::status(sc::SGL_LEN_INVALID | DNR);
        }
        if sqe.cdw(11) & 0x4 == 0 {
            return Outcome::status(sc::SUCCESS);
        }
        let (Some(ns), Some(ch), Some(data), Some(cb)) =
            (r.ns.clone(), r.ch.clone(), r.data.as_ref(), self.cb.clone())
        else {
            return Outcome::status(sc::INTERNAL);
        };
        let nsze = ns.num_blocks();
        let mut ranges = Vec::with_capacity(nr.min(MAX_DSM_RANGES));
        for i in 0..nr.min(MAX_DSM_RANGES) {
            let d = &data[i * 16..i * 16 + 16];
            let nlb = u64::from(u32::from_le_bytes([d[4], d[5], d[6], d[7]]));
            let mut s = [0u8; 8];
            s.copy_from_slice(&d[8..16]);
            let slba = u64::from_le_bytes(s);
            if slba.checked_add(nlb).is_none_or(|end| end > nsze) {
                return Outcome::status(sc::LBA_RANGE | DNR);
            }
            if nlb > 0 {
                ranges.push((slba, nlb));
            }
        }
        if ranges.is_empty() || !ns.desc.bdev().io_type_supported(IoType::Unmap) {
            return Outcome::status(sc::SUCCESS);
        }
        let mut submitted = false;
        for (slba, nlb) in ranges {
            match ch.unmap(slba, nlb, slot as u64, &cb) {
                Ok(()) => {
                    self.bdev_submitted(slot);
                    submitted = true;
                }
                Err(e) => {
                    if let Some(r) = self.reqs.get_mut(slot) {
                        r.status = errno_status(e.errno());
                    }
                    break;
                }
            }
        }
        if !submitted {
            let status = self.reqs.get(slot).map_or(sc::INTERNAL, |r| r.status);
            return Outcome::status(status);
        }
        Outcome::Pending
    }

    /// A bdev operation of command `slot` finished.
    pub(crate) fn io_done(&mut self, slot: usize, done: IoDone) {
        let Some(r) = self.reqs.get_mut(slot) else {
            return;
        };
        r.nr_pending = r.nr_pending.saturating_sub(1);
        let status = match done.status {
            IoStatus::Success => sc::SUCCESS,
            IoStatus::Failed(errno) => errno_status(errno),
            IoStatus::Aborted => sc::ABORT_REQ,
        };
        if r.status == sc::SUCCESS {
            r.status = status;
        }
        if r.nr_pending > 0 {
            return;
        }
        if r.fua && r.status == sc::SUCCESS && done.io_type == IoType::Write {
            r.fua = false;
            if let (Some(ch), Some(cb)) = (r.ch.clone(), self.cb.clone()) {
                let nsze = r.ns.as_ref().map_or(0, |n| n.num_blocks());
                if ch.flush(0, nsze, slot as u64, &cb).is_ok() {
                    self.bdev_submitted(slot);
                    return;
                }
            }
        }
        let status = r.status;
        let data = if done.io_type == IoType::Read {
            done.buf
        } else {
            None
        };
        self.complete(slot, status, 0, 0, data.as_deref());
    }
}

/// Bdev errno → NVMe status.
fn errno_status(errno: i32) -> u16 {
    match errno {
        libc::ENOSPC => sc::CAP_EXCEEDED | DNR,
        libc::EINVAL | libc::ERANGE => sc::LBA_RANGE | DNR,
        libc::ENOTSUP => sc::INVALID_OPCODE | DNR,
        // Transient (queue full, bdev being reset): no DNR so the host retries.
        libc::ENOMEM | libc::EAGAIN | libc::EBUSY => sc::INTERNAL,
        _ => sc::INTERNAL | DNR,
    }
}
