//! The frontends of this node and what each balances over: ClusterIPs for traffic from inside,
//! NodePorts, external IPs and load-balancer IPs for traffic from outside and inside.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, btree_map::Entry},
    net::IpAddr,
};

use super::{
    Algorithm, Backend, Cluster, Endpoint, EndpointSlice, Family, Frontend, FrontendKind,
    LostClaim, Node, NodeConfig, Protocol, Scope, Service, ServiceKind, ServicePort, Skipped,
    SourceRange, TrafficPolicy, WhenEmpty, ZONE_LABEL, port_field,
    topology::{self, Candidate, Selection, Topology},
};

/// The node the frontends are for: its config, the addresses its NodePorts listen on, and the
/// topology of the cluster around it.
pub struct NodeView<'a> {
    pub node: &'a NodeConfig,
    pub node_ips: &'a [IpAddr],
    pub topology: Topology<'a>,
}

impl<'a> NodeView<'a> {
    pub fn new(node: &'a NodeConfig, node_ips: &'a [IpAddr], nodes: &'a [Node]) -> Self {
        Self {
            node,
            node_ips,
            topology: Topology::new(&node.name, nodes),
        }
    }
}

/// The frontends of `cluster`'s Services on this node, sorted by address, port, protocol and scope,
/// with the claims that lost ([`settle`]).
pub fn frontends(
    cluster: &Cluster,
    view: &NodeView<'_>,
) -> (Vec<Frontend>, Vec<LostClaim>, Vec<Skipped>) {
    let mut services: Vec<&Service> = cluster.services.iter().collect();
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    // Indexed once: a scan of every slice for every Service is quadratic in the cluster.
    let mut slices_of: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in &cluster.slices {
        slices_of
            .entry((&slice.namespace, &slice.service))
            .or_default()
            .push(slice);
    }

    let mut skipped = Vec::new();
    let mut claims = Vec::new();
    for service in services {
        let slices = slices_of
            .get(&(service.namespace.as_str(), service.name.as_str()))
            .map_or(&[][..], Vec::as_slice);
        claims.extend(service_frontends(service, slices, view, &mut skipped));
    }
    let (frontends, lost) = settle(claims, &mut skipped);
    (frontends, lost, skipped)
}

/// The frontends `claims` make: an address, port and protocol belongs to the oldest Service
/// that claims it, in every scope (by creation timestamp, a Service without one after those
/// with one, then by `namespace/name`), and the other Services' claims of it are reported, in
/// `skipped` and as lost claims; a Service's own second claim of one key is reported too. Age,
/// not name: a Service created later can take no frontend another serves, from inside or
/// from outside, on any node or after any restart. Sorted by address, port, protocol and
/// scope.
pub fn settle<F: Borrow<Frontend>>(
    claims: impl IntoIterator<Item = F>,
    skipped: &mut Vec<Skipped>,
) -> (Vec<F>, Vec<LostClaim>) {
    let mut claims: Vec<F> = claims.into_iter().collect();
    // Stable: a Service's own claims keep their order.
    claims.sort_by(|a, b| claim_order(a.borrow()).cmp(&claim_order(b.borrow())));
    // Indexes into `kept`.
    let mut holders: BTreeMap<(IpAddr, u16, Protocol), usize> = BTreeMap::new();
    let mut by_key: BTreeMap<(IpAddr, u16, Protocol, Scope), usize> = BTreeMap::new();
    let mut kept: Vec<Option<F>> = Vec::new();
    let mut lost = Vec::new();
    for claim in claims {
        let frontend = claim.borrow();
        let address = (frontend.address, frontend.port, frontend.protocol);
        let key = (address.0, address.1, address.2, frontend.scope);
        let holder = holders
            .get(&address)
            .filter(|&&i| kept_service(&kept, i) != frontend.service)
            .or_else(|| by_key.get(&key));
        if let Some(&i) = holder {
            let holder = kept[i].as_ref().expect("kept until the end").borrow();
            let (reason, claim) = lost_claim(frontend, holder);
            skipped.push(reason);
            lost.extend(claim);
            continue;
        }
        holders.entry(address).or_insert(kept.len());
        by_key.insert(key, kept.len());
        kept.push(Some(claim));
    }
    lost.sort();
    lost.dedup();
    let frontends = by_key
        .into_values()
        .map(|i| kept[i].take().expect("each kept once"))
        .collect();
    (frontends, lost)
}

fn kept_service<F: Borrow<Frontend>>(kept: &[Option<F>], i: usize) -> &str {
    &kept[i]
        .as_ref()
        .expect("kept until the end")
        .borrow()
        .service
}

/// Why `frontend`'s claim lost to `holder`'s, and the lost claim to count, unless the
/// Service lost to its own claim.
fn lost_claim(frontend: &Frontend, holder: &Frontend) -> (Skipped, Option<LostClaim>) {
    let address = super::endpoint_name(frontend.address, frontend.port, frontend.protocol);
    let object = format!("Service {}", frontend.service);
    let field = port_field(&frontend.port_name, frontend.port, frontend.protocol);
    if holder.service == frontend.service {
        let reason = format!("{address} is claimed twice by this Service: its first claim has it");
        return (Skipped::new(object, field, reason), None);
    }
    let reason = format!(
        "{address} is already a frontend of Service {}, {}: the oldest claim keeps a frontend",
        holder.service,
        older(holder.created, frontend.created)
    );
    let claim = LostClaim {
        frontend: address,
        service: frontend.service.clone(),
        holder: holder.service.clone(),
    };
    (Skipped::new(object, field, reason), Some(claim))
}

/// Claims are settled oldest first.
fn claim_order(frontend: &Frontend) -> (bool, Option<i64>, &str) {
    (
        frontend.created.is_none(),
        frontend.created,
        &frontend.service,
    )
}

/// Why the holder's claim is older than the newcomer's.
fn older(holder: Option<i64>, newcomer: Option<i64>) -> &'static str {
    match (holder, newcomer) {
        (Some(h), Some(n)) if h < n => "created earlier",
        (Some(_), None) => "which has a creation timestamp where this one has none",
        (None, None) => "first by namespace/name, neither having a creation timestamp",
        _ => "created in the same second and first by namespace/name",
    }
}

/// The frontends one Service claims, in the order they are claimed: for each of its families
/// (those of its ClusterIPs, its primary first; IPv4 for a Service without one), as
/// kube-proxy's proxier of that family makes them, of that family's addresses over that
/// family's endpoints. Its external and load-balancer IPs of a family it does not have are
/// reported and left out, as kube-proxy leaves them.
fn service_frontends(
    service: &Service,
    slices: &[&EndpointSlice],
    view: &NodeView<'_>,
    skipped: &mut Vec<Skipped>,
) -> Vec<Frontend> {
    // A Service whose ClusterIPs were all rejected is none of any proxier's: `convert` rejects
    // it whole. One without any, in a hand-written manifest, is IPv4's.
    let mut families: Vec<Family> = service
        .cluster_ips
        .iter()
        .map(|&ip| Family::of(ip))
        .collect();
    if families.is_empty() {
        families.push(Family::V4);
    }
    let object = format!("Service {}/{}", service.namespace, service.name);
    let lists = [
        ("spec.externalIPs", &service.external_ips),
        ("status.loadBalancer.ingress", &service.load_balancer_ips),
    ];
    for (field, list) in lists {
        for (i, &ip) in list.iter().enumerate() {
            let family = Family::of(ip);
            if !families.contains(&family) {
                skipped.push(Skipped::new(
                    &object,
                    format!("{field}[{i}]"),
                    format!("{ip} is {family}, a family the Service has no ClusterIP of"),
                ));
            }
        }
    }
    // Per port, not per family: each is reported once.
    let node_ports: Vec<Option<u16>> = service
        .ports
        .iter()
        .map(|port| node_port(service, port, view.node, skipped))
        .collect();
    let mut claims = Vec::new();
    for family in families {
        family_frontends(service, family, slices, view, &node_ports, &mut claims);
    }
    claims
}

/// The frontends of `service` that its proxier of `family` makes, into `claims`; `node_ports`
/// are its ports' NodePorts.
fn family_frontends(
    service: &Service,
    family: Family,
    slices: &[&EndpointSlice],
    view: &NodeView<'_>,
    node_ports: &[Option<u16>],
    claims: &mut Vec<Frontend>,
) {
    let topology = &view.topology;
    let of_family = |ip: &&IpAddr| Family::of(**ip) == family;
    let source_ranges = source_ranges(service, view.node_ips, family);
    let algorithm = service.algorithm.unwrap_or(view.node.scheduler);
    for (port, &node_port) in service.ports.iter().zip(node_ports) {
        let candidates = candidates(port, slices, family);
        let cluster_wide = topology::cluster_wide(&candidates, &service.topology_keys, topology);
        let local = topology::node_local(&candidates, topology);
        let local_when_empty = if topology::any_usable(&candidates) {
            WhenEmpty::Drop
        } else {
            WhenEmpty::Reject
        };
        let policy = |policy: TrafficPolicy, name: &str| match policy {
            TrafficPolicy::Cluster => (&cluster_wide, WhenEmpty::Reject, String::new()),
            TrafficPolicy::Local => (&local, local_when_empty, format!("{name} Local: ")),
        };
        let internal = policy(service.internal_policy, "internalTrafficPolicy");
        let external = policy(service.external_policy, "externalTrafficPolicy");
        // Traffic from inside the cluster to an external frontend may use every endpoint,
        // whatever the external policy ("short-circuit", as kube-proxy does).
        let short_circuit = (&cluster_wide, WhenEmpty::Reject, String::new());
        let serving = match port.protocol {
            Protocol::Udp => backends(&candidates, |e| e.serving, topology),
            Protocol::Tcp => Vec::new(),
        };

        let mut externals = Vec::new();
        if let Some(node_port) = node_port {
            externals.extend(
                view.node_ips
                    .iter()
                    .filter(of_family)
                    .map(|&ip| (FrontendKind::NodePort, ip, node_port)),
            );
        }
        externals.extend(
            service
                .external_ips
                .iter()
                .filter(of_family)
                .map(|&ip| (FrontendKind::ExternalIP, ip, port.port)),
        );
        externals.extend(
            service
                .load_balancer_ips
                .iter()
                .filter(of_family)
                .map(|&ip| (FrontendKind::LoadBalancer, ip, port.port)),
        );
        let mut claim = |kind, scope, address, number, choice: &(&Selection, WhenEmpty, String)| {
            let (selection, when_empty, prefix) = choice;
            let backends = backends(&selection.candidates, |_| true, topology);
            let retained = serving
                .iter()
                .filter(|b| backends.binary_search(b).is_err())
                .cloned()
                .collect();
            claims.push(Frontend {
                service: format!("{}/{}", service.namespace, service.name),
                created: service.created,
                port_name: port.name.clone(),
                kind,
                scope,
                address,
                port: number,
                protocol: port.protocol,
                algorithm,
                maglev_table_size: (algorithm == Algorithm::Maglev)
                    .then_some(view.node.maglev_table_size),
                hash_port: service.hash_port.contains(&algorithm),
                affinity_timeout: service.affinity_timeout,
                when_empty: *when_empty,
                rule: format!("{prefix}{}", selection.rule),
                backends,
                retained,
                source_ranges: if kind == FrontendKind::LoadBalancer {
                    source_ranges.clone()
                } else {
                    None
                },
            });
        };
        for &address in service.cluster_ips.iter().filter(of_family) {
            claim(
                FrontendKind::ClusterIP,
                Scope::Internal,
                address,
                port.port,
                &internal,
            );
        }
        for (kind, address, number) in externals {
            claim(kind, Scope::External, address, number, &external);
            claim(kind, Scope::Internal, address, number, &short_circuit);
        }
    }
}

/// The sources a Service's load-balancer IPs of `family` take, as kube-proxy's firewall of
/// that family allows them: its ranges of the family, and when one holds the node's address
/// of the family (its first, kube-proxy's node IP, which the node's own sockets are checked
/// as), its load-balancer IPs of the family too (a node that routes such an IP to itself
/// sends from it).
fn source_ranges(
    service: &Service,
    node_ips: &[IpAddr],
    family: Family,
) -> Option<Vec<SourceRange>> {
    let ranges = service.source_ranges.of(family)?;
    let mut allowed = ranges.clone();
    let node_ip = node_ips.iter().find(|ip| Family::of(**ip) == family);
    if let Some(&node_ip) = node_ip
        && ranges.iter().any(|range| range.contains(node_ip))
    {
        allowed.extend(
            service
                .load_balancer_ips
                .iter()
                .filter(|ip| Family::of(**ip) == family)
                // A whole address of either family: the length is cut to the family's.
                .map(|&ip| SourceRange::new(ip, 128)),
        );
    }
    allowed.sort();
    allowed.dedup();
    Some(allowed)
}

/// The node's first IPv4 address: kube-proxy's node IP, the SNAT address.
pub fn first_v4(addresses: &[IpAddr]) -> Option<std::net::Ipv4Addr> {
    addresses.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    })
}

/// The node's first IPv6 address: the IPv6 proxier's node IP, the IPv6 SNAT address.
pub fn first_v6(addresses: &[IpAddr]) -> Option<std::net::Ipv6Addr> {
    addresses.iter().find_map(|ip| match ip {
        IpAddr::V4(_) => None,
        IpAddr::V6(v6) => Some(*v6),
    })
}

/// The port's NodePort, if it has one this node can serve.
fn node_port(
    service: &Service,
    port: &ServicePort,
    node: &NodeConfig,
    skipped: &mut Vec<Skipped>,
) -> Option<u16> {
    if service.kind == ServiceKind::ClusterIP {
        return None;
    }
    let object = format!("Service {}/{}", service.namespace, service.name);
    let field = format!("{}.nodePort", port.field());
    match port.node_port {
        // A LoadBalancer may do without (allocateLoadBalancerNodePorts: false).
        None if service.kind == ServiceKind::LoadBalancer => None,
        None => {
            skipped.push(Skipped::new(object, field, "no nodePort allocated"));
            None
        }
        Some(n) if !node.node_port_range.contains(&n) => {
            skipped.push(Skipped::new(
                object,
                field,
                format!(
                    "{n} is outside the node port range {}-{}",
                    node.node_port_range.start(),
                    node.node_port_range.end()
                ),
            ));
            None
        }
        Some(n) => Some(n),
    }
}

/// The endpoints of `port` of `family` across the Service's slices, each once (a terminating
/// duplicate gives way, as in kube-proxy).
fn candidates<'a>(
    port: &ServicePort,
    slices: &[&'a EndpointSlice],
    family: Family,
) -> Vec<Candidate<'a>> {
    let mut by_address: BTreeMap<(IpAddr, u16), Candidate<'a>> = BTreeMap::new();
    for slice in slices {
        let Some(slice_port) = slice.port_for(port) else {
            continue;
        };
        let number = slice_port.port;
        let of_family = slice
            .endpoints
            .iter()
            .filter(|e| Family::of(e.address) == family);
        for endpoint in of_family {
            let candidate = Candidate {
                endpoint,
                port: number,
            };
            match by_address.entry((endpoint.address, number)) {
                Entry::Vacant(slot) => {
                    slot.insert(candidate);
                }
                Entry::Occupied(mut taken) if taken.get().endpoint.terminating => {
                    taken.insert(candidate);
                }
                Entry::Occupied(_) => {}
            }
        }
    }
    by_address.into_values().collect()
}

/// The `candidates` whose endpoint is `wanted`, as backends, sorted.
fn backends(
    candidates: &[Candidate<'_>],
    wanted: impl Fn(&Endpoint) -> bool,
    topology: &Topology<'_>,
) -> Vec<Backend> {
    let mut backends: Vec<Backend> = candidates
        .iter()
        .filter(|c| wanted(c.endpoint))
        .map(|c| Backend {
            address: c.endpoint.address,
            port: c.port,
            node: c.endpoint.node.clone(),
            zone: topology
                .endpoint_value(c.endpoint, ZONE_LABEL)
                .map(str::to_string),
        })
        .collect();
    backends.sort();
    backends
}

#[cfg(test)]
mod tests;
