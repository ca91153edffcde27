//! Maps in memory, for tests of the whole pipeline without a kernel: [`MemoryMaps`] holds what
//! was written; [`FailingMaps`] fails the writes it is told to, as a full map or a kernel
//! error would, and passes the others on.

use std::collections::BTreeSet;

use lb_common::maps::Config;

use super::{MapWrites, WriteError};
use crate::plan::{MapEntries, Op};

/// What the writes left, as the kernel's maps would hold it, and the writes in their order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryMaps {
    pub entries: MapEntries,
    pub config: Option<Config>,
    /// How many times backends were removed ([`MapWrites::bump_epoch`]).
    pub epoch: u32,
    pub log: Vec<Written>,
}

/// One write that took, as [`MemoryMaps::log`] records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    Op(Op),
    Config(Config),
    Epoch,
}

impl MapWrites for MemoryMaps {
    fn apply(&mut self, op: &Op) -> Result<(), WriteError> {
        self.entries.apply(op);
        self.log.push(Written::Op(op.clone()));
        Ok(())
    }

    fn write_config(&mut self, config: &Config) -> Result<(), WriteError> {
        self.config = Some(*config);
        self.log.push(Written::Config(*config));
        Ok(())
    }

    fn bump_epoch(&mut self) -> Result<(), WriteError> {
        self.epoch = self.epoch.wrapping_add(1);
        self.log.push(Written::Epoch);
        Ok(())
    }
}

/// [`MemoryMaps`] whose writes fail at the attempts it is told, counting every call (plan
/// operations, config and epoch alike).
#[derive(Debug, Default)]
pub struct FailingMaps {
    pub maps: MemoryMaps,
    fail_at: BTreeSet<usize>,
    attempts: usize,
}

/// What an injected failure says.
#[derive(Debug, thiserror::Error)]
#[error("injected failure, attempt {0}")]
pub struct Injected(pub usize);

impl FailingMaps {
    /// Fails the write `n` attempts from now (0: the next one), once.
    pub fn fail_in(&mut self, n: usize) {
        self.fail_at.insert(self.attempts + n);
    }

    /// How many writes were attempted.
    pub fn attempts(&self) -> usize {
        self.attempts
    }

    fn attempt(&mut self, map: &'static str) -> Result<(), WriteError> {
        let attempt = self.attempts;
        self.attempts += 1;
        if self.fail_at.contains(&attempt) {
            return Err(WriteError {
                map,
                cause: Box::new(Injected(attempt)),
            });
        }
        Ok(())
    }
}

impl MapWrites for FailingMaps {
    fn apply(&mut self, op: &Op) -> Result<(), WriteError> {
        self.attempt(op.map())?;
        self.maps.apply(op)
    }

    fn write_config(&mut self, config: &Config) -> Result<(), WriteError> {
        self.attempt(lb_common::maps::CONFIG)?;
        self.maps.write_config(config)
    }

    fn bump_epoch(&mut self) -> Result<(), WriteError> {
        self.attempt(lb_common::maps::EPOCH)?;
        self.maps.bump_epoch()
    }
}
