//! The model kept between syncs, brought up to date by what changed: a Service's frontends are
//! computed again only when one of its objects changed ([`Store`] says which), or when what
//! the Nodes and the node's config make of this node did; claims are settled again only at the
//! addresses whose claims changed; and the frontends that come out different are all the plan
//! is handed. With 100,000 Services, an edit to one costs the work of one.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use super::{
    Desired, Frontend, HealthCheck, LostClaim, Node, NodeConfig, Protocol, Scope, Skipped,
    convert::{self, Group},
    frontends::{NodeView, frontends, settle},
    health,
    store::{ServiceKey, Store},
};

/// What claims settle over: one address, port and protocol, in every scope.
type Address = (IpAddr, u16, Protocol);

/// A frontend the model changed, by its address, port, protocol and scope: what it is now;
/// `None`: gone.
#[derive(Clone, Debug)]
pub struct FrontendChange {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
    pub frontend: Option<Arc<Frontend>>,
}

impl FrontendChange {
    /// The change at `frontend`'s address, port, protocol and scope to `now`.
    pub fn new(frontend: &Frontend, now: Option<&Arc<Frontend>>) -> Self {
        Self {
            address: frontend.address,
            port: frontend.port,
            protocol: frontend.protocol,
            scope: frontend.scope,
            frontend: now.cloned(),
        }
    }
}

#[derive(Default)]
pub struct Memo {
    /// What every Service below was computed for.
    node_state: Option<NodeState>,
    /// By namespace and name.
    services: BTreeMap<ServiceKey, ServicePart>,
    /// The Services whose part reports something or serves a health check.
    reporting: BTreeSet<ServiceKey>,
    /// Every Service's claims, by what they claim: claims of one address are settled with each
    /// other only.
    claims: BTreeMap<Address, Vec<Arc<Frontend>>>,
    /// The claims that won, by address, sorted by scope.
    settled: BTreeMap<Address, Vec<Arc<Frontend>>>,
    /// What settling left out, at the addresses where it did.
    contested: BTreeMap<Address, (Vec<Skipped>, Vec<LostClaim>)>,
    /// The last update changed what [`Memo::skipped`], [`Memo::lost_claims`],
    /// [`Memo::health_checks`] or [`Memo::node_addresses`] give.
    reports_changed: bool,
}

#[derive(PartialEq)]
struct NodeState {
    node: NodeConfig,
    nodes: Vec<Node>,
    /// Where NodePorts listen; the first IPv4 one is the SNAT address.
    node_addresses: Vec<IpAddr>,
    skipped: Vec<Skipped>,
}

/// One Service's part of the model.
struct ServicePart {
    /// Every frontend it claims, before other Services' claims are settled.
    frontends: Vec<Arc<Frontend>>,
    skipped: Vec<Skipped>,
    health_checks: Vec<HealthCheck>,
}

impl Memo {
    /// Brings the model up to what `store` holds for `node`, from what the last update left;
    /// the frontends that changed. A frontend that did not change is the same allocation as
    /// before, even when its Service was computed again.
    pub fn update(&mut self, store: &mut Store, node: &NodeConfig) -> Vec<FrontendChange> {
        let changed = store.take_changes();
        let mut services = changed.services;
        self.reports_changed = false;
        let node_state = match self.node_state.take() {
            Some(state) if state.node == *node && !changed.nodes => state,
            before => {
                let state = NodeState::new(store.nodes(), node);
                // A Node's status or heartbeat that changes nothing the model reads changes
                // no frontend.
                if before.as_ref() != Some(&state) {
                    services.extend(self.services.keys().cloned());
                    services.extend(store.groups().map(|(key, _)| key.clone()));
                    self.reports_changed = true;
                }
                state
            }
        };
        let view = NodeView::new(
            &node_state.node,
            &node_state.node_addresses,
            &node_state.nodes,
        );
        let mut unsettled = BTreeSet::new();
        for key in services {
            let before = self.services.remove(&key);
            let after = store
                .group(&key)
                .map(|group| ServicePart::new(group, &view, before.as_ref()));
            if !convert::same(claims(before.as_ref()), claims(after.as_ref())) {
                for claim in claims(before.as_ref()) {
                    let address = address(claim);
                    if let Some(list) = self.claims.get_mut(&address) {
                        list.retain(|c| !Arc::ptr_eq(c, claim));
                    }
                    unsettled.insert(address);
                }
                for claim in claims(after.as_ref()) {
                    let address = address(claim);
                    self.claims
                        .entry(address)
                        .or_default()
                        .push(Arc::clone(claim));
                    unsettled.insert(address);
                }
            }
            self.reports_changed |= reports(before.as_ref()) != reports(after.as_ref());
            self.reporting.remove(&key);
            if let Some(part) = after {
                if !part.skipped.is_empty() || !part.health_checks.is_empty() {
                    self.reporting.insert(key.clone());
                }
                self.services.insert(key, part);
            }
        }
        self.node_state = Some(node_state);

        let mut frontend_changes = Vec::new();
        for address in unsettled {
            let claims = self.claims.remove(&address).unwrap_or_default();
            let mut skipped = Vec::new();
            let (winners, lost) = settle(claims.iter().cloned(), &mut skipped);
            if !claims.is_empty() {
                self.claims.insert(address, claims);
            }
            let now = (!skipped.is_empty()).then_some((skipped, lost));
            let was = match &now {
                Some(left_out) => self.contested.insert(address, left_out.clone()),
                None => self.contested.remove(&address),
            };
            self.reports_changed |= was != now;
            let before = if winners.is_empty() {
                self.settled.remove(&address)
            } else {
                self.settled.insert(address, winners.clone())
            }
            .unwrap_or_default();
            for gone in before
                .iter()
                .filter(|b| winners.iter().all(|w| w.scope != b.scope))
            {
                frontend_changes.push(FrontendChange::new(gone, None));
            }
            for won in winners
                .iter()
                .filter(|w| before.iter().all(|b| !Arc::ptr_eq(b, w)))
            {
                frontend_changes.push(FrontendChange::new(won, Some(won)));
            }
        }
        frontend_changes
    }

    /// Whether the last update changed what [`Memo::skipped`], [`Memo::lost_claims`],
    /// [`Memo::health_checks`] or [`Memo::node_addresses`] give: they are over every Service,
    /// worth reading again only then.
    pub fn reports_changed(&self) -> bool {
        self.reports_changed
    }

    /// Every frontend, sorted by address, port, protocol and scope.
    pub fn frontends(&self) -> impl Iterator<Item = &Arc<Frontend>> {
        self.settled.values().flatten()
    }

    /// Everything left out on the way, and why, sorted.
    pub fn skipped(&self) -> Vec<Skipped> {
        let node = self.node_state.iter().flat_map(|s| &s.skipped);
        let parts = self
            .reporting
            .iter()
            .filter_map(|key| self.services.get(key))
            .flat_map(|part| &part.skipped);
        let settling = self.contested.values().flat_map(|(skipped, _)| skipped);
        let mut skipped: Vec<Skipped> = node.chain(parts).chain(settling).cloned().collect();
        skipped.sort();
        skipped
    }

    /// The claims that lost to an older Service's, sorted.
    pub fn lost_claims(&self) -> Vec<LostClaim> {
        let mut lost: Vec<LostClaim> = self
            .contested
            .values()
            .flat_map(|(_, lost)| lost.iter().cloned())
            .collect();
        lost.sort();
        lost.dedup();
        lost
    }

    /// The health checks this node serves, sorted by Service.
    pub fn health_checks(&self) -> Vec<HealthCheck> {
        let mut checks: Vec<HealthCheck> = self
            .reporting
            .iter()
            .filter_map(|key| self.services.get(key))
            .flat_map(|part| part.health_checks.iter().cloned())
            .collect();
        checks.sort();
        checks
    }

    /// The node's addresses: where NodePorts listen.
    pub fn node_addresses(&self) -> &[IpAddr] {
        self.node_state
            .as_ref()
            .map_or(&[], |s| s.node_addresses.as_slice())
    }

    /// The whole of the model, as [`super::compute`] gives it.
    pub fn desired(&self) -> Desired {
        Desired {
            frontends: self.frontends().cloned().collect(),
            skipped: self.skipped(),
            lost_claims: self.lost_claims(),
            node_addresses: self.node_addresses().to_vec(),
            health_checks: self.health_checks(),
        }
    }
}

/// What a part reports: what it left out, and its health checks.
fn reports(part: Option<&ServicePart>) -> (&[Skipped], &[HealthCheck]) {
    part.map_or((&[], &[]), |p| {
        (p.skipped.as_slice(), p.health_checks.as_slice())
    })
}

/// A part's claims.
fn claims(part: Option<&ServicePart>) -> &[Arc<Frontend>] {
    part.as_ref().map_or(&[], |p| p.frontends.as_slice())
}

fn address(frontend: &Frontend) -> Address {
    (frontend.address, frontend.port, frontend.protocol)
}

impl NodeState {
    fn new(node_objects: &[Arc<k8s_openapi::api::core::v1::Node>], node: &NodeConfig) -> Self {
        let mut skipped = Vec::new();
        let nodes = convert::nodes(node_objects, &mut skipped);
        let own = nodes.iter().find(|n| n.name == node.name);
        if own.is_none() {
            skipped.push(Skipped::new(
                format!("Node {}", node.name),
                "",
                "not found: its labels, zone and addresses are unknown (no NodePorts without \
                 --node-ip, no SNAT, no topology of its own)",
            ));
        }
        // `--node-ip`, or else the Node's InternalIP and ExternalIP addresses.
        let node_addresses = if node.addresses.is_empty() {
            own.map(|n| n.addresses.clone()).unwrap_or_default()
        } else {
            node.addresses.clone()
        };
        if !node_addresses.is_empty() && super::first_v4(&node_addresses).is_none() {
            skipped.push(Skipped::new(
                format!("Node {}", node.name),
                "status.addresses",
                "no IPv4 address (nor in --node-ip): no SNAT, no IPv4 NodePorts",
            ));
        }
        Self {
            node: node.clone(),
            nodes,
            node_addresses,
            skipped,
        }
    }
}

impl ServicePart {
    /// `group`'s part; a frontend equal to one of `before`'s is that allocation.
    fn new(group: &Group, view: &NodeView<'_>, before: Option<&ServicePart>) -> Self {
        let mut skipped = Vec::new();
        let cluster = convert::cluster(group, &mut skipped);
        // Claims within one Service are settled here, between Services in `update`.
        let (frontends, _, more) = frontends(&cluster, view);
        skipped.extend(more);
        let health_checks = cluster
            .services
            .iter()
            .flat_map(|service| health::health_checks(service, &cluster, &view.node.name))
            .collect();
        let earlier = before.map_or(&[][..], |b| b.frontends.as_slice());
        let frontends = frontends
            .into_iter()
            .enumerate()
            .map(|(at, frontend)| {
                earlier
                    .get(at)
                    .filter(|e| ***e == frontend)
                    .or_else(|| earlier.iter().find(|e| ***e == frontend))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(frontend))
            })
            .collect();
        Self {
            frontends,
            skipped,
            health_checks,
        }
    }
}
