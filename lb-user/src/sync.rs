//! One sync, from the sources' objects to the maps: model, plan, and every write (the config,
//! the plan's operations, the epoch). The objects, the model and the plan are kept between
//! syncs, and each stage hands the next only what changed, so that an edit to one Service
//! computes, plans and compares that Service's entries only: at 100,000 Services, the work of
//! one. The agent runs it; the control-plane benchmark times it; the pipeline tests run it over
//! maps in memory.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use lb_common::{
    addr::{ipv4_be, ipv6_be},
    maps::Config,
};
use tracing::error;

use crate::{
    error_chain,
    maps::MapWrites,
    model::{self, Change, HealthCheck, LostClaim, Memo, NodeConfig, Objects, Skipped, Store},
    plan::{self, FrontendKey, Ids, MapEntries, Op, Planner},
};

/// What an earlier agent left in the maps: where the pipeline starts from.
#[derive(Clone, Debug, Default)]
pub struct Adopted {
    pub entries: MapEntries,
    /// The highest backend id a tracked flow names, which a new backend must not take.
    pub highest_flow_backend_id: u32,
    pub config: Option<Config>,
}

pub struct Pipeline {
    store: Store,
    memo: Memo,
    planner: Planner,
    /// What the maps hold: what was read from them at start, then every write that took.
    programmed: MapEntries,
    /// The maps may differ from the plan beyond the keys the next update touches: at start,
    /// over an earlier agent's entries, and after a write failed.
    compare_all: bool,
    /// Backends were deleted and the datapath not yet told ([`MapWrites::bump_epoch`]); at
    /// start, an earlier agent may have deleted some without telling.
    epoch_due: bool,
    /// Timeouts and the SNAT port range; each sync fills in the SNAT addresses.
    base_config: Config,
    /// The config the datapath runs with, as last written or adopted.
    config: Option<Config>,
    /// The service id each labelled frontend had when its labels were last handed out.
    labelled: BTreeMap<FrontendKey, u32>,
}

/// What a sync did.
#[derive(Debug)]
pub struct Synced {
    /// The plan's operations.
    pub writes: usize,
    /// Writes that did not take (plan operations put off by a failed one, a config or epoch
    /// write), to be retried at the next sync.
    pub failed: usize,
    /// Backends may have gone, in this sync or, at start, while no agent ran: what still
    /// names one (a flow, a connected socket) must look again.
    pub backends_gone: bool,
    /// Whether what [`Pipeline::skipped`], [`Pipeline::lost_claims`],
    /// [`Pipeline::health_checks`] or [`Pipeline::node_addresses`] give changed: they are
    /// over every Service, worth reading again only then.
    pub reports_changed: bool,
    /// The `/metrics` labels that changed, by service id: of each frontend programmed, or
    /// `None` for one that no longer is.
    pub labels: BTreeMap<u32, Option<FrontendLabels>>,
    /// The SNAT addresses, when this sync wrote a new config.
    pub config_written: Option<SnatAddresses>,
}

/// What a frontend's counters are labelled with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendLabels {
    /// `address:port/PROTOCOL`.
    pub frontend: String,
    pub scope: &'static str,
    /// `namespace/name`.
    pub service: String,
    /// The scheduler, by IPVS's name.
    pub scheduler: &'static str,
}

impl Pipeline {
    /// Starts from what the maps hold, keeping its ids.
    pub fn new(node: &str, adopted: Adopted, base_config: Config) -> Self {
        Self {
            store: Store::default(),
            memo: Memo::default(),
            planner: Planner::new(
                node,
                Ids::adopt(&adopted.entries, adopted.highest_flow_backend_id),
            ),
            programmed: adopted.entries,
            compare_all: true,
            epoch_due: true,
            base_config,
            config: adopted.config,
            labelled: BTreeMap::new(),
        }
    }

    pub fn programmed(&self) -> &MapEntries {
        &self.programmed
    }

    /// What the model and the plan left out, and why.
    pub fn skipped(&self) -> Vec<Skipped> {
        let mut skipped = self.memo.skipped();
        skipped.extend(self.planner.unplanned());
        skipped
    }

    /// Frontends claimed by a Service that an older one holds.
    pub fn lost_claims(&self) -> Vec<LostClaim> {
        self.memo.lost_claims()
    }

    /// The health checks the node serves for cloud load balancers.
    pub fn health_checks(&self) -> Vec<HealthCheck> {
        self.memo.health_checks()
    }

    /// Where NodePorts, and so the health checks, listen.
    pub fn node_addresses(&self) -> &[IpAddr] {
        self.memo.node_addresses()
    }

    /// The Node objects the sources hold.
    pub fn nodes(&self) -> &[Arc<k8s_openapi::api::core::v1::Node>] {
        self.store.nodes()
    }

    /// Brings the maps to what `objects`, the whole of what the sources hold, define for
    /// `node`: [`Pipeline::sync_changes`] with the groups of objects that are not the same
    /// allocations as at the last sync for changes.
    pub fn sync(
        &mut self,
        objects: &Objects,
        node: &NodeConfig,
        maps: &mut impl MapWrites,
    ) -> Synced {
        self.store.replace(objects);
        self.sync_store(node, maps)
    }

    /// Brings the maps to what the objects define for `node` after `changes`. The SNAT
    /// address first (a new NodePort's first packets need it), then the plan's operations,
    /// then the epoch: after the deletions, a flow that looks again must find its backend
    /// gone. A failed operation stops the sync: the operations after it depend on it (a slot
    /// on its backend, a count on its slots), and what is programmed stays consistent; the
    /// next sync compares everything and writes the rest.
    pub fn sync_changes(
        &mut self,
        changes: impl IntoIterator<Item = Change>,
        node: &NodeConfig,
        maps: &mut impl MapWrites,
    ) -> Synced {
        for change in changes {
            self.store.apply(change);
        }
        self.sync_store(node, maps)
    }

    fn sync_store(&mut self, node: &NodeConfig, maps: &mut impl MapWrites) -> Synced {
        let changes = self.memo.update(&mut self.store, node);
        let touched = self.planner.update(changes);
        let compared_all = self.compare_all;
        let ops = if compared_all {
            plan::diff(&self.programmed, self.planner.desired())
        } else {
            plan::diff_touched(&self.programmed, self.planner.desired(), &touched)
        };
        let node_addresses = self.memo.node_addresses();
        let snat_addresses = SnatAddresses {
            v4: model::first_v4(node_addresses),
            v6: model::first_v6(node_addresses),
        };
        let (config_written, config_failed) = self.write_config(snat_addresses, maps);
        let put_off = self.apply(&ops, maps);
        self.compare_all = put_off > 0;
        let backends_gone = self.epoch_due;
        let mut epoch_failed = false;
        if self.epoch_due {
            match maps.bump_epoch() {
                Ok(()) => self.epoch_due = false,
                Err(e) => {
                    epoch_failed = true;
                    error!(error = %error_chain(&e), "flows keep removed backends until the next sync");
                }
            }
        }
        let labels = if compared_all {
            let all: Vec<FrontendKey> = self
                .labelled
                .keys()
                .chain(self.programmed.frontends.keys())
                .copied()
                .collect();
            self.labels(all)
        } else {
            self.labels(touched.frontends)
        };
        Synced {
            writes: ops.len(),
            failed: put_off + usize::from(config_failed) + usize::from(epoch_failed),
            backends_gone,
            reports_changed: self.memo.reports_changed() || self.planner.unplanned_changed(),
            labels,
            config_written: config_written.then_some(snat_addresses),
        }
    }

    /// The `/metrics` labels of the frontends at `keys` that changed: those programmed now,
    /// and `None` for the ids of those labelled before that are not.
    fn labels(
        &mut self,
        keys: impl IntoIterator<Item = FrontendKey>,
    ) -> BTreeMap<u32, Option<FrontendLabels>> {
        let keys: Vec<FrontendKey> = keys.into_iter().collect();
        // Every old id out before a new one comes in: an id may have passed between frontends.
        let mut changed: BTreeMap<u32, Option<FrontendLabels>> = keys
            .iter()
            .filter_map(|key| Some((self.labelled.remove(key)?, None)))
            .collect();
        for key in keys {
            let Some(programmed) = self.programmed.frontends.get(&key) else {
                continue;
            };
            let Some(frontend) = self.planner.planned(&key) else {
                continue;
            };
            let labels = FrontendLabels {
                frontend: model::endpoint_name(frontend.address, frontend.port, frontend.protocol),
                scope: match frontend.scope {
                    model::Scope::External => "external",
                    model::Scope::Internal => "internal",
                },
                service: frontend.service.clone(),
                scheduler: frontend.algorithm.ipvs_name(),
            };
            self.labelled.insert(key, programmed.service_id);
            changed.insert(programmed.service_id, Some(labels));
        }
        changed
    }

    /// Applies `ops` up to the first that fails; how many were put off.
    fn apply(&mut self, ops: &[Op], maps: &mut impl MapWrites) -> usize {
        for (done, op) in ops.iter().enumerate() {
            match maps.apply(op) {
                // Track what the maps really hold: the next sync starts from there.
                Ok(()) => {
                    self.programmed.apply(op);
                    self.epoch_due |= matches!(op, Op::DeleteBackend(..));
                }
                Err(e) => {
                    let put_off = ops.len() - done;
                    error!(?op, put_off, error = %error_chain(&e), "a map write failed; the next sync writes the rest");
                    return put_off;
                }
            }
        }
        0
    }

    /// Writes the config when it changes: the SNAT address follows the Node's. Whether it was
    /// written, and whether a write failed.
    fn write_config(
        &mut self,
        snat_addresses: SnatAddresses,
        maps: &mut impl MapWrites,
    ) -> (bool, bool) {
        let config = Config {
            snat_addr_be: snat_addresses.v4.map_or(0, ipv4_be),
            snat_addr6_be: snat_addresses.v6.map_or([0; 4], ipv6_be),
            ..self.base_config
        };
        if self.config == Some(config) {
            return (false, false);
        }
        match maps.write_config(&config) {
            Ok(()) => {
                self.config = Some(config);
                (true, false)
            }
            Err(e) => {
                error!(snat_addresses = ?snat_addresses, error = %error_chain(&e),
                    "the datapath's config keeps its old values until the next sync");
                (false, true)
            }
        }
    }
}

/// The node's addresses SNATed flows leave with, one per family: its first of each, as
/// kube-proxy's proxier of each family takes its node IP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnatAddresses {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}
