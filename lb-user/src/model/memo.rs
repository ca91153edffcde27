//! The model kept between syncs. A Service's frontends are computed again only when one of its
//! objects changed (the Service, its EndpointSlices, its Endpoints), or when the Nodes or the
//! node's config did: with 10,000 Services, an edit to one costs the work of one. Sources hand
//! out the same allocation for an object that did not change, so a change is found by address,
//! without comparing contents.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use k8s_openapi::api::core::v1 as core;

use super::{
    Desired, Frontend, HealthCheck, Node, NodeConfig, Objects, Skipped,
    convert::{self, Group, same},
    frontends::{NodeView, frontends, settle},
    health,
};

#[derive(Default)]
pub struct Memo {
    /// What every Service below was computed for.
    node_state: Option<NodeState>,
    /// By namespace and name.
    services: BTreeMap<(String, String), ServicePart>,
}

struct NodeState {
    node: NodeConfig,
    /// The Node objects the rest was computed from.
    objects: Vec<Arc<core::Node>>,
    nodes: Vec<Node>,
    /// Where NodePorts listen; the first IPv4 one is the SNAT address.
    node_addresses: Vec<IpAddr>,
    skipped: Vec<Skipped>,
}

/// One Service's part of the model.
struct ServicePart {
    group: Group,
    /// Every frontend it claims, before other Services' claims are settled.
    frontends: Vec<Arc<Frontend>>,
    skipped: Vec<Skipped>,
    health_checks: Vec<HealthCheck>,
}

impl Memo {
    /// What `objects` define for `node`: [`super::compute`], from what the last update left.
    /// A frontend that did not change is the same allocation as in the last update.
    pub fn update(&mut self, objects: &Objects, node: &NodeConfig) -> Desired {
        let node_state = match self.node_state.take() {
            Some(c) if c.node == *node && same(&c.objects, &objects.nodes) => c,
            _ => {
                self.services.clear();
                NodeState::new(objects, node)
            }
        };
        let view = NodeView::new(
            &node_state.node,
            &node_state.node_addresses,
            &node_state.nodes,
        );
        let mut before = std::mem::take(&mut self.services).into_iter().peekable();
        self.services = convert::groups(objects)
            .into_iter()
            .map(|(key, group)| {
                let is_before =
                    |(k, _): &((String, String), ServicePart)| (k.0.as_str(), k.1.as_str()) < key;
                while before.next_if(is_before).is_some() {}
                let kept = before.next_if(|(k, computed)| {
                    (k.0.as_str(), k.1.as_str()) == key && computed.group.is_same(&group)
                });
                kept.unwrap_or_else(|| {
                    let computed = ServicePart::new(group, &view);
                    ((key.0.to_string(), key.1.to_string()), computed)
                })
            })
            .collect();
        drop(before);

        let mut skipped = node_state.skipped.clone();
        for computed in self.services.values() {
            skipped.extend_from_slice(&computed.skipped);
        }
        let claims = self
            .services
            .values()
            .flat_map(|c| c.frontends.iter().cloned());
        let (frontends, lost_claims) = settle(claims, &mut skipped);
        skipped.sort();
        let node_addresses = node_state.node_addresses.clone();
        self.node_state = Some(node_state);
        let mut health_checks: Vec<HealthCheck> = self
            .services
            .values()
            .flat_map(|c| c.health_checks.iter().cloned())
            .collect();
        health_checks.sort();
        Desired {
            frontends,
            skipped,
            lost_claims,
            node_addresses,
            health_checks,
        }
    }
}

impl NodeState {
    fn new(objects: &Objects, node: &NodeConfig) -> Self {
        let mut skipped = Vec::new();
        let nodes = convert::nodes(&objects.nodes, &mut skipped);
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
            objects: objects.nodes.clone(),
            nodes,
            node_addresses,
            skipped,
        }
    }
}

impl ServicePart {
    fn new(group: Group, view: &NodeView<'_>) -> Self {
        let mut skipped = Vec::new();
        let cluster = convert::cluster(&group, &mut skipped);
        // Claims within one Service are settled here, between Services in `update`.
        let (frontends, _, more) = frontends(&cluster, view);
        skipped.extend(more);
        let health_checks = cluster
            .services
            .iter()
            .flat_map(|service| health::health_checks(service, &cluster, &view.node.name))
            .collect();
        Self {
            group,
            frontends: frontends.into_iter().map(Arc::new).collect(),
            skipped,
            health_checks,
        }
    }
}
