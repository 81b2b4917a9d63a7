//! In-core space map: the reference model used by tests and checks (a `Vec<u32>` of counts
//! plus the committed copy, with the same "never reuse before commit" allocation rule).

use super::SpaceMap;
use crate::error::{err, ErrorKind, Result};

/// In-memory space map.
#[derive(Debug, Clone, Default)]
pub struct CoreSpaceMap {
    counts: Vec<u32>,
    committed: Vec<u32>,
    nr_allocated: u64,
    cursor: u64,
}

impl CoreSpaceMap {
    /// A map of `nr_blocks` free blocks.
    pub fn new(nr_blocks: u64) -> CoreSpaceMap {
        let counts = vec![0; nr_blocks as usize];
        CoreSpaceMap {
            committed: counts.clone(),
            counts,
            nr_allocated: 0,
            cursor: 0,
        }
    }

    fn slot(&mut self, b: u64) -> Result<&mut u32> {
        let n = self.counts.len();
        match self.counts.get_mut(b as usize) {
            Some(c) => Ok(c),
            None => err(ErrorKind::InvalidArgument, format!("block {b} beyond {n}")),
        }
    }
}

impl SpaceMap for CoreSpaceMap {
    fn nr_blocks(&self) -> u64 {
        self.counts.len() as u64
    }
    fn nr_free(&self) -> u64 {
        self.nr_blocks() - self.nr_allocated
    }
    fn count(&mut self, b: u64) -> Result<u32> {
        self.slot(b).map(|c| *c)
    }
    fn inc(&mut self, b: u64) -> Result<()> {
        let c = self.slot(b)?;
        *c += 1;
        if *c == 1 {
            self.nr_allocated += 1;
        }
        Ok(())
    }
    fn dec(&mut self, b: u64) -> Result<()> {
        let c = self.slot(b)?;
        if *c == 0 {
            return err(ErrorKind::Corrupt, format!("dec of free block {b}"));
        }
        *c -= 1;
        if *c == 0 {
            self.nr_allocated -= 1;
        }
        Ok(())
    }
    fn alloc(&mut self) -> Result<u64> {
        let n = self.counts.len();
        for k in 0..n {
            let b = (self.cursor as usize + k) % n;
            let free_now = self.counts.get(b) == Some(&0);
            let free_committed = self.committed.get(b).is_none_or(|c| *c == 0);
            if free_now && free_committed {
                self.inc(b as u64)?;
                self.cursor = b as u64 + 1;
                return Ok(b as u64);
            }
        }
        err(ErrorKind::NoSpace, "no free block")
    }
    fn extend(&mut self, extra: u64) -> Result<()> {
        self.counts.resize(self.counts.len() + extra as usize, 0);
        Ok(())
    }
    fn commit(&mut self) -> Result<()> {
        self.committed = self.counts.clone();
        Ok(())
    }
}
