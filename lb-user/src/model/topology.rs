//! Which endpoints of a Service port a frontend may use, as kube-proxy decides it
//! (`CategorizeEndpoints`, and the `topologyKeys` filter of Kubernetes 1.17-1.21):
//!
//! - cluster-wide traffic uses the ready endpoints, narrowed by `topologyKeys` when the Service
//!   has them (the first key whose value this node shares with some endpoint; `*` matches all;
//!   none matching leaves nothing), otherwise by topology hints (node hints, then zone hints,
//!   each only when every ready endpoint carries one and one names this node or zone); with no
//!   ready endpoint at all, the serving terminating ones, topology ignored;
//! - traffic under a Local policy uses this node's ready endpoints, else its serving
//!   terminating ones; topology does not apply.

use std::collections::BTreeMap;

use super::{Endpoint, HOSTNAME_LABEL, Node, ZONE_LABEL};

/// An endpoint of a Service port, its port number resolved.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    pub endpoint: &'a Endpoint,
    pub port: u16,
}

/// The endpoints a frontend uses, and the rule that chose them.
#[derive(Clone, Debug)]
pub struct Selection<'a> {
    pub candidates: Vec<Candidate<'a>>,
    pub rule: String,
}

impl<'a> Selection<'a> {
    fn new(candidates: Vec<Candidate<'a>>, rule: impl Into<String>) -> Self {
        Self {
            candidates,
            rule: rule.into(),
        }
    }
}

/// This node and the labels of every node, as topology needs them.
pub struct Topology<'a> {
    node: &'a str,
    nodes: BTreeMap<&'a str, &'a Node>,
}

impl<'a> Topology<'a> {
    pub fn new(node: &'a str, nodes: &'a [Node]) -> Self {
        Self {
            node,
            nodes: nodes.iter().map(|n| (n.name.as_str(), n)).collect(),
        }
    }

    fn labels(&self, node: &str) -> Option<&'a BTreeMap<String, String>> {
        self.nodes.get(node).map(|n| &n.labels)
    }

    /// This node's value for a topology key.
    fn node_value(&self, key: &str) -> Option<&str> {
        let label = self.labels(self.node).and_then(|l| l.get(key));
        match (key, label) {
            (_, Some(value)) => Some(value),
            (HOSTNAME_LABEL, None) => Some(self.node),
            _ => None,
        }
    }

    /// An endpoint's value for a topology key: the slice's `nodeName` and `zone` first, then
    /// the labels of the endpoint's Node.
    pub fn endpoint_value<'e>(&'e self, endpoint: &'e Endpoint, key: &str) -> Option<&'e str> {
        let from_slice = match key {
            HOSTNAME_LABEL => endpoint.node.as_deref(),
            ZONE_LABEL => endpoint.zone.as_deref(),
            _ => None,
        };
        from_slice.or_else(|| {
            let labels = self.labels(endpoint.node.as_deref()?)?;
            labels.get(key).map(String::as_str)
        })
    }

    fn zone(&self) -> Option<&str> {
        self.node_value(ZONE_LABEL)
    }

    fn is_local(&self, endpoint: &Endpoint) -> bool {
        endpoint.node.as_deref() == Some(self.node)
    }
}

fn serving_terminating(endpoint: &Endpoint) -> bool {
    endpoint.serving && endpoint.terminating
}

/// Whether any endpoint can take traffic anywhere: when none can, frontends reject.
pub fn any_usable(candidates: &[Candidate<'_>]) -> bool {
    candidates
        .iter()
        .any(|c| c.endpoint.ready || serving_terminating(c.endpoint))
}

/// The endpoints for traffic that may go anywhere in the cluster.
pub fn cluster_wide<'a>(
    candidates: &[Candidate<'a>],
    topology_keys: &[String],
    topology: &Topology<'_>,
) -> Selection<'a> {
    let ready = keep(candidates, |e| e.ready);
    if !ready.is_empty() {
        return if topology_keys.is_empty() {
            by_hints(ready, topology)
        } else {
            by_topology_keys(ready, topology_keys, topology)
        };
    }
    terminating_fallback(
        candidates,
        "no ready endpoint: serving terminating endpoints, topology ignored",
        "no endpoints",
    )
}

fn keep<'a>(
    candidates: &[Candidate<'a>],
    wanted: impl Fn(&Endpoint) -> bool,
) -> Vec<Candidate<'a>> {
    candidates
        .iter()
        .copied()
        .filter(|c| wanted(c.endpoint))
        .collect()
}

/// When nothing is ready: the serving terminating endpoints, under rule `found`, or none,
/// under rule `none`.
fn terminating_fallback<'a>(
    candidates: &[Candidate<'a>],
    found: &str,
    none: &str,
) -> Selection<'a> {
    let terminating = keep(candidates, serving_terminating);
    let rule = if terminating.is_empty() { none } else { found };
    Selection::new(terminating, rule)
}

fn by_hints<'a>(ready: Vec<Candidate<'a>>, topology: &Topology<'_>) -> Selection<'a> {
    let node = topology.node;
    if ready.iter().all(|c| !c.endpoint.node_hints.is_empty())
        && ready
            .iter()
            .any(|c| c.endpoint.node_hints.iter().any(|h| h == node))
    {
        let hinted = ready
            .into_iter()
            .filter(|c| c.endpoint.node_hints.iter().any(|h| h == node))
            .collect();
        return Selection::new(hinted, format!("ready endpoints hinted for node {node}"));
    }
    if let Some(zone) = topology.zone()
        && ready.iter().all(|c| !c.endpoint.zone_hints.is_empty())
        && ready
            .iter()
            .any(|c| c.endpoint.zone_hints.iter().any(|h| h == zone))
    {
        let hinted = ready
            .into_iter()
            .filter(|c| c.endpoint.zone_hints.iter().any(|h| h == zone))
            .collect();
        return Selection::new(hinted, format!("ready endpoints hinted for zone {zone}"));
    }
    Selection::new(ready, "ready endpoints")
}

fn by_topology_keys<'a>(
    ready: Vec<Candidate<'a>>,
    keys: &[String],
    topology: &Topology<'_>,
) -> Selection<'a> {
    for key in keys {
        if key == "*" {
            return Selection::new(ready, "topologyKeys \"*\": every ready endpoint");
        }
        let Some(value) = topology.node_value(key) else {
            continue;
        };
        let matching = keep(&ready, |e| topology.endpoint_value(e, key) == Some(value));
        if !matching.is_empty() {
            return Selection::new(
                matching,
                format!("topologyKeys {key}={value}: ready endpoints"),
            );
        }
    }
    Selection::new(Vec::new(), "no ready endpoint matches a topologyKey")
}

/// The endpoints on this node, for traffic under a Local policy.
pub fn node_local<'a>(candidates: &[Candidate<'a>], topology: &Topology<'_>) -> Selection<'a> {
    let local = keep(candidates, |e| topology.is_local(e));
    let ready = keep(&local, |e| e.ready);
    if !ready.is_empty() {
        return Selection::new(ready, "ready endpoints on this node");
    }
    terminating_fallback(
        &local,
        "no ready endpoint on this node: its serving terminating endpoints",
        "no endpoint on this node",
    )
}
