//! One sync, from the sources' objects to the maps. The model and the plan are kept between
//! syncs, so that an edit to one Service computes, plans and compares that Service's entries
//! only: at 10,000 Services, the work of one. The agent runs it; the control-plane benchmark
//! times it.

use tracing::error;

use crate::{
    maps::KernelMaps,
    model::{Desired, Memo, NodeConfig, Objects, Skipped},
    plan::{self, Ids, MapEntries, Op, Planner},
};

pub struct Pipeline {
    memo: Memo,
    planner: Planner,
    /// What the maps hold: what was read from them at start, then every write that took.
    programmed: MapEntries,
    /// The maps may differ from the plan beyond the keys the next update touches: at start,
    /// over an earlier agent's entries, and after a write failed.
    compare_all: bool,
    /// Backends were deleted and the datapath not yet told ([`KernelMaps::bump_epoch`]); at
    /// start, an earlier agent may have deleted some without telling.
    epoch_due: bool,
}

/// A sync's plan, before its writes.
pub struct Planned {
    pub desired: Desired,
    /// The frontends the plan left out (the model's are in `desired`).
    unplanned: Vec<Skipped>,
    ops: Vec<Op>,
}

impl Planned {
    /// Everything left out, the model's and the plan's.
    pub fn skipped(&self) -> impl Iterator<Item = &Skipped> {
        self.desired.skipped.iter().chain(&self.unplanned)
    }
}

/// What a sync's writes did.
pub struct Written {
    pub writes: usize,
    /// Writes put off by a failed one, to be retried at the next sync.
    pub failed: usize,
    /// Backends may have gone, in this sync or, at start, while no agent ran: what still
    /// names one (a flow, a connected socket) must look again.
    pub backends_gone: bool,
}

impl Pipeline {
    /// Starts from what the maps hold, keeping its ids. `highest_flow_backend_id`: the highest
    /// backend id a tracked flow names, which a new backend must not take.
    pub fn new(node: &str, programmed: MapEntries, highest_flow_backend_id: u32) -> Self {
        Self {
            memo: Memo::default(),
            planner: Planner::new(node, Ids::adopt(&programmed, highest_flow_backend_id)),
            programmed,
            compare_all: true,
            epoch_due: true,
        }
    }

    pub fn programmed(&self) -> &MapEntries {
        &self.programmed
    }

    /// What `objects` define for `node`, and the writes that take the maps there.
    pub fn plan(&mut self, objects: &Objects, node: &NodeConfig) -> Planned {
        let desired = self.memo.update(objects, node);
        let (touched, unplanned) = self.planner.update(&desired.frontends);
        let ops = if self.compare_all {
            plan::diff(&self.programmed, self.planner.desired())
        } else {
            plan::diff_touched(&self.programmed, self.planner.desired(), &touched)
        };
        Planned {
            desired,
            unplanned,
            ops,
        }
    }

    /// Writes `planned` to the maps. A failed write stops the sync: the writes after it depend
    /// on it (a slot on its backend, a count on its slots), and what is programmed stays
    /// consistent; the next sync compares everything and writes the rest.
    pub fn write(&mut self, planned: &Planned, maps: &mut KernelMaps) -> Written {
        let ops = &planned.ops;
        let mut failed = 0;
        for (done, op) in ops.iter().enumerate() {
            match maps.apply(op) {
                // Track what the kernel really holds: the next sync starts from there.
                Ok(()) => {
                    self.programmed.apply(op);
                    self.epoch_due |= matches!(op, Op::DeleteBackend(_));
                }
                Err(e) => {
                    failed = ops.len() - done;
                    error!(?op, "map update failed, {failed} writes put off: {e}");
                    break;
                }
            }
        }
        self.compare_all = failed > 0;
        // After the deletions: a flow that looks again must find its backend gone.
        let backends_gone = self.epoch_due;
        if self.epoch_due {
            match maps.bump_epoch() {
                Ok(()) => self.epoch_due = false,
                Err(e) => error!("flows keep removed backends until the next sync: {e:#}"),
            }
        }
        Written {
            writes: ops.len(),
            failed,
            backends_gone,
        }
    }
}
