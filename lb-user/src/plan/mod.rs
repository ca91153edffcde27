//! The plan: the model's frontends as map entries, with ids that stay stable across syncs, and
//! the ordered operations that move the maps from what they hold to what they should.

mod diff;
mod ids;
pub mod maglev;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
};

pub use diff::{Op, Touched, diff, diff_touched};
pub use ids::Ids;
use lb_common::maps::{
    ALGORITHM_LEAST_CONNECTION, ALGORITHM_MAGLEV, ALGORITHM_NEVER_QUEUE, ALGORITHM_ROUND_ROBIN,
    ALGORITHM_SHORTEST_EXPECTED_DELAY, ALGORITHM_SOURCE_HASH, BACKEND_LOCAL, BackendLoad,
    FRONTEND_HASH_PORT, FRONTEND_REJECT_WHEN_EMPTY, FRONTEND_SOURCE_RANGES, Frontend, MAX_SLOTS,
    MAX_SOURCE_RANGES, MAX_TABLE_POSITIONS, PROTO_TCP, PROTO_UDP, SCOPE_EXTERNAL, SCOPE_INTERNAL,
    SLOT_TABLES, Slot, SlotKey, SourceRange, Vip, counts_flows, load_index,
};

use crate::model::{self, Algorithm, Family, FrontendKind, Protocol, Scope, Skipped, WhenEmpty};

/// The entries of the agent-written maps, both families' together: the values as the
/// datapath reads them, addresses as `std::net` ones ([`crate::maps`] writes each family's into
/// its own maps).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapEntries {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    pub slots: BTreeMap<SlotKey, Slot>,
    /// The tables of the frontends whose slots are one ([`has_table`]) in `lb_slot_tables`,
    /// by first position: each position's backend id.
    pub tables: BTreeMap<u32, Arc<[u32]>>,
    pub backends: BTreeMap<u32, Backend>,
    /// Every frontend address.
    pub vips: BTreeMap<IpAddr, Vip>,
    pub source_ranges: BTreeMap<RangeKey, SourceRange>,
}

/// A frontend's key: `lb_frontends` or `lb_frontends6`, by its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub address: IpAddr,
    pub port: u16,
    /// `PROTO_*`.
    pub protocol: u8,
    /// `SCOPE_*`.
    pub scope: u8,
}

/// A backend: `lb_backends` or `lb_backends6`, by its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub address: IpAddr,
    pub port: u16,
    /// `PROTO_*`.
    pub protocol: u8,
    /// `BACKEND_*` bits.
    pub flags: u8,
}

/// An entry of `lb_source_ranges` (or `lb_source_ranges6`, by its address): one range of a
/// frontend's (the first `prefix_len` bits of `address`), or with no bits its catch-all. In
/// the kernel's key the service id's bits come first. Ordered so that a frontend's catch-all
/// comes before its ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RangeKey {
    pub service_id: u32,
    pub prefix_len: u8,
    pub address: IpAddr,
}

/// The source range entries of frontend `service_id` at `address` with `ranges`.
fn range_entries(
    service_id: u32,
    address: IpAddr,
    ranges: &[model::SourceRange],
) -> impl Iterator<Item = (RangeKey, SourceRange)> + '_ {
    let unspecified = match address {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    };
    let catch_all = RangeKey {
        service_id,
        prefix_len: 0,
        address: unspecified,
    };
    std::iter::once((catch_all, SourceRange { allowed: 0 })).chain(ranges.iter().map(
        move |range| {
            let key = RangeKey {
                service_id,
                prefix_len: range.prefix_len,
                address: range.address,
            };
            (key, SourceRange { allowed: 1 })
        },
    ))
}

/// The map entries for `frontends` on node `node`, with fresh ids.
pub fn entries(frontends: &[Arc<model::Frontend>], node: &str) -> (MapEntries, Vec<Skipped>) {
    let mut planner = Planner::new(node, Ids::default());
    planner.update_all(frontends);
    let skipped = planner.unplanned();
    (planner.desired, skipped)
}

/// The plan kept between syncs: the map entries of every frontend, planned again only for the
/// frontends the model changed, and the keys that may differ from what the maps hold.
#[derive(Debug)]
pub struct Planner {
    node: String,
    ids: Ids,
    /// What each frontend's entries were planned from, and why it has none if it has none.
    planned: BTreeMap<FrontendKey, (Arc<model::Frontend>, Option<Skipped>)>,
    /// The frontends that could not be planned: tried again at every update.
    unplanned: BTreeSet<FrontendKey>,
    /// The last update changed what [`Planner::unplanned`] gives.
    unplanned_changed: bool,
    /// The entries of every planned frontend: what the maps should hold.
    desired: MapEntries,
    /// The frontends of each Service port with ClientIP affinity, which share it.
    affinity_groups: BTreeMap<AffinityGroup, BTreeSet<FrontendKey>>,
}

/// A Service port: `namespace/name`, port name, protocol.
type AffinityGroup = (String, String, Protocol);

fn affinity_group(frontend: &model::Frontend) -> Option<AffinityGroup> {
    frontend.affinity_timeout?;
    Some((
        frontend.service.clone(),
        frontend.port_name.clone(),
        frontend.protocol,
    ))
}

impl Planner {
    pub fn new(node: &str, ids: Ids) -> Self {
        Self {
            node: node.to_string(),
            ids,
            planned: BTreeMap::new(),
            unplanned: BTreeSet::new(),
            unplanned_changed: false,
            desired: MapEntries::default(),
            affinity_groups: BTreeMap::new(),
        }
    }

    /// What the maps should hold.
    pub fn desired(&self) -> &MapEntries {
        &self.desired
    }

    /// The model's frontend whose entries are planned at `key`.
    pub fn planned(&self, key: &FrontendKey) -> Option<&model::Frontend> {
        match self.planned.get(key)? {
            (frontend, None) => Some(frontend),
            (_, Some(_)) => None,
        }
    }

    /// Whether the last update changed what [`Planner::unplanned`] gives.
    pub fn unplanned_changed(&self) -> bool {
        self.unplanned_changed
    }

    /// Why the frontends without entries have none.
    pub fn unplanned(&self) -> Vec<Skipped> {
        self.unplanned
            .iter()
            .filter_map(|key| self.planned.get(key)?.1.clone())
            .collect()
    }

    /// Plans `frontends` as the model's whole output: the others are withdrawn.
    pub fn update_all(&mut self, frontends: &[Arc<model::Frontend>]) -> Touched {
        let wanted: BTreeSet<FrontendKey> = frontends.iter().map(|f| key_of(f)).collect();
        let gone = self
            .planned
            .iter()
            .filter(|(key, _)| !wanted.contains(key))
            .map(|(_, (frontend, _))| model::FrontendChange::new(frontend, None));
        let put = frontends
            .iter()
            .map(|f| model::FrontendChange::new(f, Some(f)));
        let changes: Vec<model::FrontendChange> = gone.chain(put).collect();
        self.update(changes)
    }

    /// Plans the frontends the model changed: a frontend that is the same allocation as the
    /// one planned keeps its entries, and those that could not be planned are tried again.
    /// Returns the keys whose entries may have changed.
    pub fn update(&mut self, changes: impl IntoIterator<Item = model::FrontendChange>) -> Touched {
        let mut wanted: BTreeMap<FrontendKey, Option<Arc<model::Frontend>>> = self
            .unplanned
            .iter()
            .filter_map(|key| Some((*key, Some(Arc::clone(&self.planned.get(key)?.0)))))
            .collect();
        for change in changes {
            let key = frontend_key(change.address, change.port, change.protocol, change.scope);
            wanted.insert(key, change.frontend);
        }
        let mut touched = Touched::default();
        // Out first, in, then the backends nothing names any more: a backend that stays keeps
        // its id.
        wanted.retain(|key, frontend| match (self.planned.get(key), frontend) {
            (Some((before, None)), Some(now)) => !Arc::ptr_eq(before, now),
            (None, None) => false,
            _ => true,
        });
        let looked: BTreeSet<FrontendKey> = wanted.keys().copied().collect();
        let reason = |planner: &Self, key| planner.planned.get(key).and_then(|(_, u)| u.clone());
        let reasons_before: Vec<Option<Skipped>> = looked.iter().map(|k| reason(self, k)).collect();
        let mut regroup = BTreeSet::new();
        for key in &looked {
            if let Some(group) = self.planned.get(key).and_then(|(f, _)| affinity_group(f)) {
                if let Some(keys) = self.affinity_groups.get_mut(&group) {
                    keys.remove(key);
                }
                regroup.insert(group);
            }
            self.withdraw(*key, &mut touched);
        }
        for (key, frontend) in wanted {
            let Some(frontend) = frontend else { continue };
            let unplanned = self.place(key, &frontend, &mut touched);
            if unplanned.is_none()
                && let Some(group) = affinity_group(&frontend)
            {
                self.affinity_groups
                    .entry(group.clone())
                    .or_default()
                    .insert(key);
                regroup.insert(group);
            }
            if unplanned.is_some() {
                self.unplanned.insert(key);
            }
            self.planned.insert(key, (frontend, unplanned));
        }
        for group in regroup {
            self.share_affinity(&group, &mut touched);
        }
        self.unplanned_changed = looked
            .iter()
            .zip(reasons_before)
            .any(|(key, before)| reason(self, key) != before);
        let frontends = &self.desired.frontends;
        let table_kept = |key: &FrontendKey, offset| {
            frontends
                .get(key)
                .is_some_and(|f| has_table(f) && f.table_offset == offset)
        };
        for id in self
            .ids
            .end_sync(&looked, |key| self.planned.contains_key(key), table_kept)
        {
            self.desired.backends.remove(&id);
            touched.backends.insert(id);
        }
        touched
    }

    /// Gives the frontends of `group` one affinity key: the lowest of their service ids, which
    /// stay as long as the frontends do (across agent restarts too).
    fn share_affinity(&mut self, group: &AffinityGroup, touched: &mut Touched) {
        let Some(keys) = self.affinity_groups.get(group) else {
            return;
        };
        if keys.is_empty() {
            self.affinity_groups.remove(group);
            return;
        }
        let shared = keys
            .iter()
            .filter_map(|key| self.desired.frontends.get(key))
            .map(|f| f.service_id)
            .min()
            .unwrap_or(0);
        for key in keys {
            if let Some(frontend) = self.desired.frontends.get_mut(key)
                && frontend.affinity_id != shared
            {
                frontend.affinity_id = shared;
                touched.frontends.insert(*key);
            }
        }
    }

    /// Takes frontend `key`'s entries out of the plan.
    fn withdraw(&mut self, key: FrontendKey, touched: &mut Touched) {
        let Some((before, _)) = self.planned.remove(&key) else {
            return;
        };
        self.unplanned.remove(&key);
        let Some(frontend) = self.desired.frontends.remove(&key) else {
            return;
        };
        touched.frontends.insert(key);
        if has_table(&frontend) {
            self.desired.tables.remove(&frontend.table_offset);
            touched.tables.insert(frontend.table_offset);
        } else {
            for slot in 1..=u32::from(frontend.backend_count) {
                let slot_key = SlotKey {
                    service_id: frontend.service_id,
                    slot,
                };
                self.desired.slots.remove(&slot_key);
                touched.slots.insert(slot_key);
            }
        }
        // Each once, as `place` named them: a Maglev table names a backend in many slots.
        for named in before.backends.iter().chain(&before.retained) {
            self.ids
                .unname_backend(backend(named, before.protocol, &self.node));
        }
        let ranges = before.source_ranges.as_deref().unwrap_or_default();
        for (range, _) in range_entries(frontend.service_id, key.address, ranges) {
            self.desired.source_ranges.remove(&range);
            touched.source_ranges.insert(range);
        }
        if let Some(vip) = self.desired.vips.get_mut(&key.address) {
            vip.frontends -= 1;
            if before.kind == FrontendKind::ClusterIP {
                vip.cluster_ip_frontends -= 1;
            }
            if vip.frontends == 0 {
                self.desired.vips.remove(&key.address);
            }
            touched.vips.insert(key.address);
        }
    }

    /// Puts frontend `key`'s entries into the plan; why it cannot, if it cannot.
    fn place(
        &mut self,
        key: FrontendKey,
        frontend: &model::Frontend,
        touched: &mut Touched,
    ) -> Option<Skipped> {
        let skip = |reason: String| {
            Some(Skipped::new(
                format!("Service {}", frontend.service),
                model::port_field(&frontend.port_name, frontend.port, frontend.protocol),
                reason,
            ))
        };
        // The model never mixes families; if it did, the datapath would be handed an address
        // it cannot write into the packet.
        if let Some(other) = frontend
            .backends
            .iter()
            .chain(&frontend.retained)
            .find(|b| Family::of(b.address) != Family::of(frontend.address))
        {
            return skip(format!(
                "{}: its backend {} is of another family",
                model::endpoint_name(frontend.address, frontend.port, frontend.protocol),
                other.address
            ));
        }
        // Maglev's slots are its table: of its size, once there is a backend to fill it.
        let table_size = match (frontend.algorithm, frontend.maglev_table_size) {
            (Algorithm::Maglev, _) if frontend.backends.is_empty() => None,
            (Algorithm::Maglev, Some(size)) => Some(size),
            (Algorithm::Maglev, None) => {
                let name = model::endpoint_name(frontend.address, frontend.port, frontend.protocol);
                return skip(format!("{name}: Maglev without a table size"));
            }
            _ => None,
        };
        let slots = table_size.map_or(frontend.backends.len(), |size| size as usize);
        let Ok(backend_count) = u16::try_from(slots) else {
            return skip(format!(
                "{slots} slots ({} backends): at most {} fit a frontend",
                frontend.backends.len(),
                u16::MAX
            ));
        };
        let name = model::endpoint_name(frontend.address, frontend.port, frontend.protocol);
        // Closed rather than open, and the other frontends' writes go on. Each family has its
        // own map of ranges: only the frontend's counts.
        if let Some(ranges) = &frontend.source_ranges {
            let family = Family::of(key.address);
            let taken = self
                .desired
                .source_ranges
                .keys()
                .filter(|range| Family::of(range.address) == family)
                .count();
            if taken + ranges.len() + 1 > MAX_SOURCE_RANGES as usize {
                return skip(format!(
                    "{name}: its {} source ranges do not fit the source range map \
                     ({MAX_SOURCE_RANGES} entries): not programmed",
                    ranges.len()
                ));
            }
        }
        // Closed, and the others go on: a full map would stop every write after the first
        // that does not fit. Room for as many again is kept, as a sync puts a new frontend's
        // slots before it deletes those of one that went.
        // Maglev's and the least-connection family's slots are a table in `lb_slot_tables`: an
        // array read a slot, where the slot map's is a hash lookup, which a scan of the
        // backends' loads makes for each backend.
        let in_table =
            slots != 0 && (table_size.is_some() || counts_flows(algorithm(frontend.algorithm)));
        let taken = self.desired.slots.len();
        if !in_table && taken + 2 * slots > MAX_SLOTS as usize {
            return skip(format!(
                "{name}: its {slots} slots do not fit the slot map ({MAX_SLOTS} entries, {taken} \
                 taken): not programmed"
            ));
        }
        let Some(service_id) = self.ids.service(key) else {
            return skip(format!("{name}: the frontend map is full"));
        };
        let table_offset = if in_table {
            // `slots` fits a u16.
            let size = slots as u32;
            let Some(offset) = self.ids.table(key, size) else {
                return skip(format!(
                    "{name}: its table of {size} slots does not fit {SLOT_TABLES} \
                     ({MAX_TABLE_POSITIONS} positions, the tables of this sync's frontends and \
                     of those it removes taken): not programmed; a smaller \
                     --maglev-table-size leaves room for more Maglev frontends"
                ));
            };
            offset
        } else {
            0
        };
        let named: Vec<(SocketAddr, u32)> = frontend
            .backends
            .iter()
            .map(|backend| {
                let id = self.name_backend(backend, frontend.protocol, touched);
                (SocketAddr::new(backend.address, backend.port), id)
            })
            .collect();
        if in_table {
            let table = match table_size {
                Some(size) => maglev::table(&named, size),
                None => named.iter().map(|&(_, id)| id).collect(),
            };
            self.desired.tables.insert(table_offset, table.into());
            touched.tables.insert(table_offset);
        } else {
            for (slot, &(_, backend_id)) in (1..).zip(&named) {
                let slot_key = SlotKey { service_id, slot };
                self.desired.slots.insert(slot_key, Slot { backend_id });
                touched.slots.insert(slot_key);
            }
        }
        // In no slot: there for the flows they have, which look them up by id.
        for retained in &frontend.retained {
            self.name_backend(retained, frontend.protocol, touched);
        }
        let vip = self.desired.vips.entry(key.address).or_default();
        vip.frontends += 1;
        if frontend.kind == FrontendKind::ClusterIP {
            vip.cluster_ip_frontends += 1;
        }
        touched.vips.insert(key.address);
        let mut flags = match frontend.when_empty {
            WhenEmpty::Reject => FRONTEND_REJECT_WHEN_EMPTY,
            WhenEmpty::Drop => 0,
        };
        if frontend.hash_port {
            flags |= FRONTEND_HASH_PORT;
        }
        if let Some(ranges) = &frontend.source_ranges {
            flags |= FRONTEND_SOURCE_RANGES;
            for (range, value) in range_entries(service_id, key.address, ranges) {
                self.desired.source_ranges.insert(range, value);
                touched.source_ranges.insert(range);
            }
        }
        self.desired.frontends.insert(
            key,
            Frontend {
                service_id,
                backend_count,
                algorithm: algorithm(frontend.algorithm),
                flags,
                affinity_timeout_s: frontend.affinity_timeout.unwrap_or(0),
                affinity_id: 0,
                table_offset,
            },
        );
        touched.frontends.insert(key);
        None
    }

    /// Names `backend` once more, and plans its entry; its id.
    fn name_backend(
        &mut self,
        backend: &model::Backend,
        protocol: Protocol,
        touched: &mut Touched,
    ) -> u32 {
        let backend = self::backend(backend, protocol, &self.node);
        let backend_id = self.ids.name_backend(backend);
        self.desired.backends.insert(backend_id, backend);
        touched.backends.insert(backend_id);
        backend_id
    }
}

/// Whether `frontend`'s slots are a table in `lb_slot_tables` ([`Frontend::table_offset`]):
/// a Maglev or least-connection family frontend's, once it has backends.
pub fn has_table(frontend: &Frontend) -> bool {
    frontend.backend_count != 0
        && (frontend.algorithm == ALGORITHM_MAGLEV || counts_flows(frontend.algorithm))
}

fn key_of(frontend: &model::Frontend) -> FrontendKey {
    frontend_key(
        frontend.address,
        frontend.port,
        frontend.protocol,
        frontend.scope,
    )
}

/// The map key of a frontend.
pub fn frontend_key(address: IpAddr, port: u16, protocol: Protocol, scope: Scope) -> FrontendKey {
    FrontendKey {
        address,
        port,
        protocol: protocol_number(protocol),
        scope: match scope {
            Scope::External => SCOPE_EXTERNAL,
            Scope::Internal => SCOPE_INTERNAL,
        },
    }
}

fn backend(backend: &model::Backend, protocol: Protocol, node: &str) -> Backend {
    Backend {
        address: backend.address,
        port: backend.port,
        protocol: protocol_number(protocol),
        flags: if backend.node.as_deref() == Some(node) {
            BACKEND_LOCAL
        } else {
            0
        },
    }
}

fn protocol_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
    }
}

/// The scheduler of a frontend's `ALGORITHM_*`, if it is one.
fn scheduler(algorithm: u8) -> Option<Algorithm> {
    [
        Algorithm::RoundRobin,
        Algorithm::SourceHash,
        Algorithm::Maglev,
        Algorithm::LeastConnection,
        Algorithm::ShortestExpectedDelay,
        Algorithm::NeverQueue,
    ]
    .into_iter()
    .find(|&a| self::algorithm(a) == algorithm)
}

fn algorithm(algorithm: Algorithm) -> u8 {
    match algorithm {
        Algorithm::RoundRobin => ALGORITHM_ROUND_ROBIN,
        Algorithm::SourceHash => ALGORITHM_SOURCE_HASH,
        Algorithm::Maglev => ALGORITHM_MAGLEV,
        Algorithm::LeastConnection => ALGORITHM_LEAST_CONNECTION,
        Algorithm::ShortestExpectedDelay => ALGORITHM_SHORTEST_EXPECTED_DELAY,
        Algorithm::NeverQueue => ALGORITHM_NEVER_QUEUE,
    }
}

impl MapEntries {
    /// One sorted line per entry, in the style of Cilium's golden tests, for tests and `dump`.
    pub fn dump(&self) -> String {
        let mut lines = Vec::new();
        for (key, fe) in &self.frontends {
            let scope = if key.scope == SCOPE_EXTERNAL {
                "external"
            } else {
                "internal"
            };
            let when_empty = if fe.flags & FRONTEND_REJECT_WHEN_EMPTY != 0 {
                "reject"
            } else {
                "drop"
            };
            let affinity = match fe.affinity_timeout_s {
                0 => String::new(),
                seconds => format!(" AFFINITY={seconds}s KEY={}", fe.affinity_id),
            };
            let table = if has_table(fe) {
                format!(" TABLE={}", fe.table_offset)
            } else {
                String::new()
            };
            let sources = if fe.flags & FRONTEND_SOURCE_RANGES != 0 {
                " SOURCES=checked"
            } else {
                ""
            };
            let hash = if fe.flags & FRONTEND_HASH_PORT != 0 {
                " HASH=address+port"
            } else {
                ""
            };
            lines.push(format!(
                "FE: ADDR={} SCOPE={scope} ID={} COUNT={} ALG={}{table} EMPTY={when_empty}{affinity}{sources}{hash}",
                endpoint(key.address, key.port, key.protocol),
                fe.service_id,
                fe.backend_count,
                algorithm_name(fe.algorithm),
            ));
        }
        for (key, slot) in &self.slots {
            lines.push(format!(
                "SLOT: ID={} SLOT={} BE={}",
                key.service_id, key.slot, slot.backend_id
            ));
        }
        // Thousands of positions: how many each backend holds.
        for (offset, table) in &self.tables {
            let mut shares: BTreeMap<u32, u32> = BTreeMap::new();
            for &id in table.iter() {
                *shares.entry(id).or_default() += 1;
            }
            let shares: Vec<String> = shares.iter().map(|(id, n)| format!("{id}x{n}")).collect();
            lines.push(format!(
                "TABLE: AT={offset} POSITIONS={} BE={}",
                table.len(),
                shares.join(",")
            ));
        }
        for (address, vip) in &self.vips {
            lines.push(format!(
                "VIP: ADDR={address} FRONTENDS={} CLUSTER_IP={}",
                vip.frontends, vip.cluster_ip_frontends
            ));
        }
        for (key, range) in &self.source_ranges {
            lines.push(format!(
                "RANGE: ID={} SRC={}/{} {}",
                key.service_id,
                key.address,
                key.prefix_len,
                if range.allowed != 0 {
                    "ALLOW"
                } else {
                    "REFUSE"
                }
            ));
        }
        for (id, be) in &self.backends {
            let local = if be.flags & BACKEND_LOCAL != 0 {
                " LOCAL"
            } else {
                ""
            };
            lines.push(format!(
                "BE: ID={id} ADDR={}{local}",
                endpoint(be.address, be.port, be.protocol)
            ));
        }
        lines.sort();
        lines.iter().fold(String::new(), |mut out, line| {
            let _ = writeln!(out, "{line}");
            out
        })
    }
}

impl MapEntries {
    /// The services as `ipvsadm -Ln` shows them: each frontend with its scheduler by IPVS's
    /// name, then the backends of its slots in order (a Maglev frontend's each once, with its
    /// share of the table; a least-connection one's with their counted flows in `loads`, by
    /// [`load_index`]).
    pub fn table(&self, loads: &BTreeMap<u32, BackendLoad>) -> String {
        let mut out = String::from(
            "Prot LocalAddress:Port        Scope    Scheduler    Flags\n  \
             -> RemoteAddress:Port                ActiveConn InActConn\n",
        );
        for (key, fe) in &self.frontends {
            let protocol = match key.protocol {
                PROTO_TCP => "TCP",
                PROTO_UDP => "UDP",
                _ => "?",
            };
            let address = SocketAddr::new(key.address, key.port).to_string();
            let scope = if key.scope == SCOPE_EXTERNAL {
                "external"
            } else {
                "internal"
            };
            let mut flags = Vec::new();
            if fe.flags & FRONTEND_REJECT_WHEN_EMPTY != 0 {
                flags.push("reject-when-empty".to_string());
            }
            if fe.affinity_timeout_s != 0 {
                flags.push(format!("persistent {}", fe.affinity_timeout_s));
            }
            if fe.flags & FRONTEND_HASH_PORT != 0 {
                // ipvsadm's names of the flag.
                let flag = if fe.algorithm == ALGORITHM_MAGLEV {
                    "mh-port"
                } else {
                    "sh-port"
                };
                flags.push(flag.to_string());
            }
            let scheduler = scheduler(fe.algorithm).map_or_else(
                || format!("unknown-{}", fe.algorithm),
                |s| s.ipvs_name().into(),
            );
            let _ = writeln!(
                out,
                "{protocol:<4} {address:<24} {scope:<8} {scheduler:<12} {}",
                flags.join(",")
            );
            // The backend id of each slot, 0 for one missing.
            let ids: Vec<u32> = if has_table(fe) {
                self.tables
                    .get(&fe.table_offset)
                    .map(|t| t.to_vec())
                    .unwrap_or_default()
            } else {
                (1..=u32::from(fe.backend_count))
                    .map(|slot| {
                        let key = SlotKey {
                            service_id: fe.service_id,
                            slot,
                        };
                        self.slots.get(&key).map_or(0, |s| s.backend_id)
                    })
                    .collect()
            };
            if fe.algorithm == ALGORITHM_MAGLEV {
                // A table of thousands of positions: each backend once, with its share.
                let mut shares: BTreeMap<String, u32> = BTreeMap::new();
                for &id in &ids {
                    *shares.entry(self.backend_line(id)).or_default() += 1;
                }
                for (line, positions) in shares {
                    let _ = writeln!(
                        out,
                        "  -> {line} ({positions} of {} positions)",
                        fe.backend_count
                    );
                }
            } else if counts_flows(fe.algorithm) {
                for id in ids {
                    let load = loads.get(&load_index(id)).copied().unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "  -> {:<34} {:>10} {:>9}",
                        self.backend_line(id),
                        load.active.max(0),
                        load.inactive.max(0)
                    );
                }
            } else {
                for id in ids {
                    let _ = writeln!(out, "  -> {}", self.backend_line(id));
                }
            }
        }
        out
    }

    /// Backend `id`, as [`MapEntries::table`] lists it.
    fn backend_line(&self, id: u32) -> String {
        match self.backends.get(&id) {
            None if id == 0 => "(slot missing)".to_string(),
            None => format!("(backend {id} missing)"),
            Some(be) => {
                let local = if be.flags & BACKEND_LOCAL != 0 {
                    " local"
                } else {
                    ""
                };
                format!("{}{local}", SocketAddr::new(be.address, be.port))
            }
        }
    }
}

fn endpoint(address: IpAddr, port: u16, protocol: u8) -> String {
    let protocol = match protocol {
        PROTO_TCP => "TCP".to_string(),
        PROTO_UDP => "UDP".to_string(),
        other => format!("proto-{other}"),
    };
    format!("{}/{protocol}", SocketAddr::new(address, port))
}

fn algorithm_name(algorithm: u8) -> String {
    scheduler(algorithm).map_or_else(|| format!("unknown-{algorithm}"), |s| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frontend(algorithm: Algorithm, backends: &[(Ipv4Addr, u16)]) -> model::Frontend {
        model::Frontend {
            service: "default/demo".into(),
            created: None,
            port_name: "http".into(),
            kind: FrontendKind::ClusterIP,
            scope: Scope::Internal,
            address: Ipv4Addr::new(10, 96, 0, 10).into(),
            port: 80,
            protocol: Protocol::Tcp,
            algorithm,
            maglev_table_size: (algorithm == Algorithm::Maglev).then_some(7),
            hash_port: false,
            affinity_timeout: None,
            when_empty: WhenEmpty::Reject,
            rule: "ready endpoints".into(),
            backends: backends
                .iter()
                .map(|&(address, port)| model::Backend {
                    address: address.into(),
                    port,
                    node: Some("node-a".into()),
                    zone: None,
                })
                .collect(),
            retained: Vec::new(),
            source_ranges: None,
        }
    }

    /// A load-balancer IP at `address` taking `ranges`.
    fn ranged(address: Ipv4Addr, ranges: Vec<model::SourceRange>) -> Arc<model::Frontend> {
        Arc::new(model::Frontend {
            kind: FrontendKind::LoadBalancer,
            address: address.into(),
            source_ranges: Some(ranges),
            ..frontend(
                Algorithm::RoundRobin,
                &[(Ipv4Addr::new(10, 244, 0, 11), 8080)],
            )
        })
    }

    #[test]
    fn source_ranges_are_a_catch_all_and_a_range_each_and_the_whole_space_allows() {
        let (catch_all, whole) = (model::SourceRange::new(Ipv4Addr::UNSPECIFIED, 0), 0);
        // (ranges, the entries: prefix length, allowed)
        let cases = [
            (vec![], vec![(0, 0)]),
            (
                vec![model::SourceRange::new(Ipv4Addr::new(10, 0, 0, 0), 8)],
                vec![(0, 0), (8, 1)],
            ),
            // 0.0.0.0/0 is the catch-all's own key: it allows.
            (vec![catch_all], vec![(whole, 1)]),
        ];
        for (ranges, wanted) in cases {
            let (entries, skipped) = entries(
                &[ranged(Ipv4Addr::new(192, 0, 2, 1), ranges.clone())],
                "node-a",
            );
            assert!(skipped.is_empty(), "{skipped:?}");
            let seen: Vec<(u8, u32)> = entries
                .source_ranges
                .iter()
                .map(|(key, range)| (key.prefix_len, range.allowed))
                .collect();
            assert_eq!(seen, wanted, "{ranges:?}");
            let flags = entries.frontends.values().next().map(|f| f.flags);
            assert_eq!(
                flags.map(|f| f & FRONTEND_SOURCE_RANGES),
                Some(FRONTEND_SOURCE_RANGES)
            );
        }
    }

    #[test]
    fn source_ranges_past_the_map_s_room_leave_their_frontend_out_closed() {
        let many: Vec<model::SourceRange> = (0..MAX_SOURCE_RANGES)
            .map(|i| model::SourceRange::new(Ipv4Addr::from(i << 8), 24))
            .collect();
        let fits = ranged(Ipv4Addr::new(192, 0, 2, 1), many[..10].to_vec());
        let too_many = ranged(Ipv4Addr::new(192, 0, 2, 2), many);
        let (entries, skipped) = entries(&[fits, too_many], "node-a");
        assert_eq!(entries.frontends.len(), 1, "only the one that fits");
        assert_eq!(entries.source_ranges.len(), 11);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].reason.contains("do not fit"), "{skipped:?}");
    }

    #[test]
    fn entries_hold_what_the_datapath_reads() {
        let backends = [
            (Ipv4Addr::new(10, 244, 0, 11), 8080),
            (Ipv4Addr::new(10, 244, 0, 12), 8080),
        ];
        let (entries, skipped) = entries(
            &[Arc::new(frontend(Algorithm::SourceHash, &backends))],
            "node-a",
        );
        assert!(skipped.is_empty());
        let (key, value) = entries.frontends.iter().next().unwrap();
        assert_eq!(
            *key,
            FrontendKey {
                address: Ipv4Addr::new(10, 96, 0, 10).into(),
                port: 80,
                protocol: PROTO_TCP,
                scope: SCOPE_INTERNAL
            }
        );
        assert_eq!(
            *value,
            Frontend {
                service_id: 1,
                backend_count: 2,
                algorithm: ALGORITHM_SOURCE_HASH,
                flags: FRONTEND_REJECT_WHEN_EMPTY,
                affinity_timeout_s: 0,
                affinity_id: 0,
                table_offset: 0,
            }
        );
        assert_eq!(
            entries.backends[&1],
            Backend {
                address: Ipv4Addr::new(10, 244, 0, 11).into(),
                port: 8080,
                protocol: PROTO_TCP,
                flags: BACKEND_LOCAL
            }
        );
        let slots: Vec<(u32, u32, u32)> = entries
            .slots
            .iter()
            .map(|(k, v)| (k.service_id, k.slot, v.backend_id))
            .collect();
        assert_eq!(slots, [(1, 1, 1), (1, 2, 2)]);
    }

    #[test]
    fn a_maglev_frontend_s_slots_are_its_table_which_it_keeps_when_its_backends_change() {
        let three = [
            (Ipv4Addr::new(10, 244, 0, 11), 8080),
            (Ipv4Addr::new(10, 244, 0, 12), 8080),
            (Ipv4Addr::new(10, 244, 0, 13), 8080),
        ];
        let mut planner = Planner::new("node-a", Ids::default());
        let mut plan = |backends: &[(Ipv4Addr, u16)]| {
            planner.update_all(&[Arc::new(frontend(Algorithm::Maglev, backends))]);
            let skipped = planner.unplanned();
            assert!(skipped.is_empty(), "{skipped:?}");
            planner.desired().clone()
        };
        let before = plan(&three);
        let frontend = before.frontends.values().next().unwrap();
        // The test frontends' table has 7 positions.
        assert_eq!(
            (frontend.algorithm, frontend.backend_count),
            (ALGORITHM_MAGLEV, 7)
        );
        let named: Vec<(SocketAddr, u32)> = (1..)
            .zip(three)
            .map(|(id, (ip, port))| (SocketAddr::from((ip, port)), id))
            .collect();
        assert!(before.slots.is_empty(), "{:?}", before.slots);
        let table = &before.tables[&frontend.table_offset];
        assert_eq!(**table, *maglev::table(&named, 7));
        // .12 goes: the table is written again where it is (the map's writer stores only the
        // positions that differ), and the frontend, which still names it, is not; then .12.
        let after = plan(&[three[0], three[2]]);
        let two: Vec<(SocketAddr, u32)> = vec![named[0], named[2]];
        assert_eq!(
            diff(&before, &after),
            [
                Op::PutTable(frontend.table_offset, maglev::table(&two, 7).into()),
                Op::DeleteBackend(2, Family::V4)
            ]
        );
    }

    #[test]
    fn a_maglev_frontend_withdrawn_leaves_the_backends_it_shares_named() {
        let backends = [
            (Ipv4Addr::new(10, 244, 0, 11), 8080),
            (Ipv4Addr::new(10, 244, 0, 12), 8080),
        ];
        let round_robin = Arc::new(model::Frontend {
            port: 81,
            ..frontend(Algorithm::RoundRobin, &backends)
        });
        let maglev = Arc::new(frontend(Algorithm::Maglev, &backends));
        let mut planner = Planner::new("node-a", Ids::default());
        planner.update_all(&[Arc::clone(&round_robin), maglev]);
        // The Maglev one goes; both backends are still the other's.
        planner.update_all(&[round_robin]);
        let desired = planner.desired();
        assert_eq!(desired.slots.len(), 2);
        for slot in desired.slots.values() {
            assert!(
                desired.backends.contains_key(&slot.backend_id),
                "{slot:?} names a backend gone: {:?}",
                desired.backends
            );
        }
    }

    #[test]
    fn maglev_tables_past_the_maglev_map_s_room_are_reported_and_the_rest_programmed() {
        let backends = [(Ipv4Addr::new(10, 244, 0, 11), 8080)];
        let frontends: Vec<Arc<model::Frontend>> = (1..=260)
            .map(|port| {
                Arc::new(model::Frontend {
                    port,
                    maglev_table_size: Some(maglev::MAX_TABLE_SIZE),
                    ..frontend(Algorithm::Maglev, &backends)
                })
            })
            .collect();
        let (entries, skipped) = entries(&frontends, "node-a");
        // 256 tables of 65,521 positions fit the map's 16,777,216.
        assert_eq!(entries.frontends.len(), 256);
        assert_eq!(skipped.len(), 4);
        assert!(
            skipped[0].reason.contains("does not fit lb_slot_tables_v1"),
            "{skipped:?}"
        );
        let mut offsets: Vec<u32> = entries.tables.keys().copied().collect();
        offsets.dedup();
        assert_eq!(offsets.len(), 256, "each its own table");
    }

    #[test]
    fn the_table_lists_each_frontend_and_its_backends_in_slot_order() {
        let backends = [
            (Ipv4Addr::new(10, 244, 0, 12), 8080),
            (Ipv4Addr::new(10, 244, 0, 11), 8080),
        ];
        let (entries, _) = entries(
            &[Arc::new(frontend(Algorithm::RoundRobin, &backends))],
            "node-a",
        );
        assert_eq!(
            entries.table(&BTreeMap::new()),
            "Prot LocalAddress:Port        Scope    Scheduler    Flags\n  \
             -> RemoteAddress:Port                ActiveConn InActConn\n\
             TCP  10.96.0.10:80            internal rr           reject-when-empty\n  \
             -> 10.244.0.12:8080 local\n  -> 10.244.0.11:8080 local\n"
        );
    }

    #[test]
    fn a_retained_backend_keeps_its_id_into_a_slot_and_goes_when_nothing_names_it() {
        let (a, b) = (
            (Ipv4Addr::new(10, 244, 0, 11), 5353),
            (Ipv4Addr::new(10, 244, 0, 12), 5353),
        );
        let udp = |backends: &[(Ipv4Addr, u16)], retained: &[(Ipv4Addr, u16)]| {
            let mut fe = frontend(Algorithm::RoundRobin, backends);
            fe.protocol = Protocol::Udp;
            fe.retained = frontend(Algorithm::RoundRobin, retained).backends;
            vec![Arc::new(fe)]
        };
        let mut planner = Planner::new("node-a", Ids::default());
        let mut dump = |frontends: &[Arc<model::Frontend>]| {
            planner.update_all(frontends);
            let entries = planner.desired().dump();
            entries
                .lines()
                .filter(|l| !l.starts_with("FE:") && !l.starts_with("VIP:"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        // B terminating but serving: its entry stays for its flows, in no slot.
        assert_eq!(
            dump(&udp(&[a], &[b])),
            "BE: ID=1 ADDR=10.244.0.11:5353/UDP LOCAL\nBE: ID=2 ADDR=10.244.0.12:5353/UDP LOCAL\n\
             SLOT: ID=1 SLOT=1 BE=1"
        );
        // Ready again: the same id, now in a slot.
        assert_eq!(
            dump(&udp(&[a, b], &[])),
            "BE: ID=1 ADDR=10.244.0.11:5353/UDP LOCAL\nBE: ID=2 ADDR=10.244.0.12:5353/UDP LOCAL\n\
             SLOT: ID=1 SLOT=1 BE=1\nSLOT: ID=1 SLOT=2 BE=2"
        );
        // Back to retained, then gone: nothing names it, and its entry goes.
        dump(&udp(&[a], &[b]));
        assert_eq!(
            dump(&udp(&[a], &[])),
            "BE: ID=1 ADDR=10.244.0.11:5353/UDP LOCAL\nSLOT: ID=1 SLOT=1 BE=1"
        );
    }

    #[test]
    fn every_frontend_address_is_a_vip_and_only_cluster_ips_count_as_such() {
        let node_ip = Ipv4Addr::new(10, 0, 0, 1);
        let cluster_ip = Arc::new(frontend(Algorithm::RoundRobin, &[]));
        let node_port = |scope| {
            Arc::new(model::Frontend {
                kind: FrontendKind::NodePort,
                address: node_ip.into(),
                port: 30080,
                scope,
                ..frontend(Algorithm::RoundRobin, &[])
            })
        };
        let (internal, external) = (node_port(Scope::Internal), node_port(Scope::External));
        let mut planner = Planner::new("node-a", Ids::default());
        let mut vips = |frontends: &[Arc<model::Frontend>]| {
            planner.update_all(frontends);
            let dump = planner.desired().dump();
            dump.lines()
                .filter(|l| l.starts_with("VIP:"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            vips(&[cluster_ip.clone(), internal.clone(), external]),
            "VIP: ADDR=10.0.0.1 FRONTENDS=2 CLUSTER_IP=0\n\
             VIP: ADDR=10.96.0.10 FRONTENDS=1 CLUSTER_IP=1"
        );
        // One NodePort frontend gone: the address stays for the other.
        assert_eq!(
            vips(&[cluster_ip, internal]),
            "VIP: ADDR=10.0.0.1 FRONTENDS=1 CLUSTER_IP=0\n\
             VIP: ADDR=10.96.0.10 FRONTENDS=1 CLUSTER_IP=1"
        );
        assert_eq!(vips(&[]), "");
    }

    #[test]
    fn a_frontend_without_backends_is_programmed_with_count_zero() {
        let (entries, _) = entries(&[Arc::new(frontend(Algorithm::RoundRobin, &[]))], "node-a");
        assert_eq!(
            entries.dump(),
            "FE: ADDR=10.96.0.10:80/TCP SCOPE=internal ID=1 COUNT=0 ALG=round-robin \
             EMPTY=reject\nVIP: ADDR=10.96.0.10 FRONTENDS=1 CLUSTER_IP=1\n"
        );
    }
}
