//! The frontend tables: what each Service, port and policy claims on a node, case by case.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use super::*;
use crate::model::{
    Algorithm, Endpoint, EndpointPort, HOSTNAME_LABEL, Node, REGION_LABEL, SourceRange,
    SourceRanges, TargetPort,
};

const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1));

fn service() -> Service {
    Service {
        namespace: "ns".into(),
        name: "svc".into(),
        created: None,
        kind: ServiceKind::ClusterIP,
        cluster_ips: vec![VIP],
        external_ips: vec![],
        load_balancer_ips: vec![],
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Tcp,
            target_port: TargetPort::Number(8080),
            node_port: None,
        }],
        algorithm: None,
        hash_port: vec![],
        internal_policy: TrafficPolicy::Cluster,
        external_policy: TrafficPolicy::Cluster,
        affinity_timeout: None,
        topology_keys: vec![],
        health_check_node_port: None,
        source_ranges: SourceRanges::default(),
    }
}

/// The last number of an IPv4 address; an IPv6 one here is a model gone wrong.
fn last_octet(address: IpAddr) -> u8 {
    match address {
        IpAddr::V4(v4) => v4.octets()[3],
        IpAddr::V6(v6) => panic!("{v6}: an IPv6 backend where IPv4 ones were wanted"),
    }
}

/// A ready endpoint 10.244.0.<last> on `node`.
fn ep(last: u8, node: &str) -> Endpoint {
    Endpoint {
        address: Ipv4Addr::new(10, 244, 0, last).into(),
        ready: true,
        serving: true,
        terminating: false,
        node: Some(node.into()),
        zone: None,
        zone_hints: vec![],
        node_hints: vec![],
    }
}

fn terminating(endpoint: Endpoint, serving: bool) -> Endpoint {
    Endpoint {
        ready: false,
        serving,
        terminating: true,
        ..endpoint
    }
}

fn zone_hint(endpoint: Endpoint, zone: &str) -> Endpoint {
    Endpoint {
        zone_hints: vec![zone.into()],
        ..endpoint
    }
}

fn node_hint(endpoint: Endpoint, node: &str) -> Endpoint {
    Endpoint {
        node_hints: vec![node.into()],
        ..endpoint
    }
}

fn node(name: &str, zone: Option<&str>, last: u8) -> Node {
    let mut labels = BTreeMap::from([
        (HOSTNAME_LABEL.to_string(), name.to_string()),
        (REGION_LABEL.to_string(), "r1".to_string()),
    ]);
    if let Some(zone) = zone {
        labels.insert(ZONE_LABEL.into(), zone.into());
    }
    Node {
        name: name.into(),
        labels,
        addresses: vec![Ipv4Addr::new(192, 0, 2, last).into()],
    }
}

/// The Service, with one slice of `endpoints`.
fn cluster(service: Service, endpoints: Vec<Endpoint>) -> Cluster {
    Cluster {
        services: vec![service],
        slices: vec![EndpointSlice {
            namespace: "ns".into(),
            name: "svc-1".into(),
            service: "svc".into(),
            ports: vec![EndpointPort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
            endpoints,
        }],
    }
}

/// n1 and n2 in zone a, n3 in zone b, n4 without a zone.
fn nodes() -> Vec<Node> {
    vec![
        node("n1", Some("a"), 1),
        node("n2", Some("a"), 2),
        node("n3", Some("b"), 3),
        node("n4", None, 4),
    ]
}

/// `frontends` with the node's addresses as the agent finds them.
fn run(cluster: &Cluster, node: &NodeConfig) -> (Vec<Frontend>, Vec<Skipped>) {
    let nodes = nodes();
    let node_ips = if node.addresses.is_empty() {
        let own = nodes.iter().find(|n| n.name == node.name);
        own.map(|n| n.addresses.clone()).unwrap_or_default()
    } else {
        node.addresses.clone()
    };
    let (frontends, _, skipped) = frontends(cluster, &NodeView::new(node, &node_ips, &nodes));
    (frontends, skipped)
}

/// The frontend `kind` from `scope` on `node`: its backends' last octets, its rule, and
/// what it does when empty.
fn frontend_of(
    cluster: &Cluster,
    node: &str,
    kind: FrontendKind,
    scope: Scope,
) -> (Vec<u8>, String, WhenEmpty) {
    let (frontends, skipped) = run(cluster, &NodeConfig::new(node));
    assert!(skipped.is_empty(), "{skipped:?}");
    let fe = frontends
        .iter()
        .find(|f| f.kind == kind && f.scope == scope)
        .unwrap_or_else(|| panic!("no {kind:?} from {scope:?} in {frontends:?}"));
    let octets = fe.backends.iter().map(|b| last_octet(b.address)).collect();
    (octets, fe.rule.clone(), fe.when_empty)
}

#[test]
fn cluster_wide_selection() {
    use WhenEmpty::Reject;
    let keys = |keys: &[&str]| Service {
        topology_keys: keys.iter().map(ToString::to_string).collect(),
        ..service()
    };
    // (what, service, endpoints, node, backends, rule, when empty)
    type Case = (
        &'static str,
        Service,
        Vec<Endpoint>,
        &'static str,
        Vec<u8>,
        &'static str,
        WhenEmpty,
    );
    let cases: Vec<Case> = vec![
        (
            "ready endpoints only",
            service(),
            vec![
                ep(1, "n1"),
                Endpoint {
                    ready: false,
                    serving: false,
                    ..ep(2, "n2")
                },
            ],
            "n1",
            vec![1],
            "ready endpoints",
            Reject,
        ),
        (
            "zone hints: this zone's endpoints",
            service(),
            vec![zone_hint(ep(1, "n1"), "a"), zone_hint(ep(3, "n3"), "b")],
            "n2",
            vec![1],
            "ready endpoints hinted for zone a",
            Reject,
        ),
        (
            "zone hints, none for this zone: all",
            service(),
            vec![zone_hint(ep(1, "n1"), "a"), zone_hint(ep(2, "n2"), "a")],
            "n3",
            vec![1, 2],
            "ready endpoints",
            Reject,
        ),
        (
            "a ready endpoint without a hint disables hints",
            service(),
            vec![zone_hint(ep(1, "n1"), "a"), ep(3, "n3")],
            "n1",
            vec![1, 3],
            "ready endpoints",
            Reject,
        ),
        (
            "an unready endpoint without a hint does not",
            service(),
            vec![
                zone_hint(ep(1, "n1"), "a"),
                zone_hint(ep(3, "n3"), "b"),
                terminating(ep(4, "n3"), false),
            ],
            "n1",
            vec![1],
            "ready endpoints hinted for zone a",
            Reject,
        ),
        (
            "a node without a zone label ignores zone hints",
            service(),
            vec![zone_hint(ep(1, "n1"), "a"), zone_hint(ep(3, "n3"), "b")],
            "n4",
            vec![1, 3],
            "ready endpoints",
            Reject,
        ),
        (
            "node hints come before zone hints",
            service(),
            vec![
                node_hint(zone_hint(ep(1, "n1"), "a"), "n1"),
                node_hint(zone_hint(ep(2, "n2"), "a"), "n2"),
            ],
            "n2",
            vec![2],
            "ready endpoints hinted for node n2",
            Reject,
        ),
        (
            "node hints, none for this node: zone hints",
            service(),
            vec![
                node_hint(zone_hint(ep(1, "n1"), "a"), "n1"),
                node_hint(zone_hint(ep(3, "n3"), "b"), "n3"),
            ],
            "n2",
            vec![1],
            "ready endpoints hinted for zone a",
            Reject,
        ),
        (
            "no ready endpoint: serving terminating ones, topology ignored",
            service(),
            vec![
                terminating(zone_hint(ep(3, "n3"), "b"), true),
                terminating(ep(4, "n3"), false),
            ],
            "n1",
            vec![3],
            "no ready endpoint: serving terminating endpoints, topology ignored",
            Reject,
        ),
        (
            "ready endpoints win over serving terminating ones",
            service(),
            vec![ep(1, "n1"), terminating(ep(2, "n2"), true)],
            "n3",
            vec![1],
            "ready endpoints",
            Reject,
        ),
        (
            "nothing serving: no backend, reject",
            service(),
            vec![terminating(ep(1, "n1"), false)],
            "n1",
            vec![],
            "no endpoints",
            Reject,
        ),
        (
            "topologyKeys: the local endpoint",
            keys(&[HOSTNAME_LABEL, ZONE_LABEL, "*"]),
            vec![ep(1, "n1"), ep(2, "n2"), ep(3, "n3")],
            "n2",
            vec![2],
            "topologyKeys kubernetes.io/hostname=n2: ready endpoints",
            Reject,
        ),
        (
            "topologyKeys: none local, the zone's",
            keys(&[HOSTNAME_LABEL, ZONE_LABEL, "*"]),
            vec![ep(1, "n1"), ep(3, "n3")],
            "n2",
            vec![1],
            "topologyKeys topology.kubernetes.io/zone=a: ready endpoints",
            Reject,
        ),
        (
            "topologyKeys: none local or in the zone, all through *",
            keys(&[HOSTNAME_LABEL, ZONE_LABEL, "*"]),
            vec![ep(3, "n3")],
            "n2",
            vec![3],
            "topologyKeys \"*\": every ready endpoint",
            Reject,
        ),
        (
            "topologyKeys: a key this node lacks is passed over",
            keys(&[ZONE_LABEL, REGION_LABEL]),
            vec![ep(3, "n3")],
            "n4",
            vec![3],
            "topologyKeys topology.kubernetes.io/region=r1: ready endpoints",
            Reject,
        ),
        (
            "topologyKeys: no key matches, reject",
            keys(&[HOSTNAME_LABEL]),
            vec![ep(1, "n1")],
            "n2",
            vec![],
            "no ready endpoint matches a topologyKey",
            Reject,
        ),
        (
            "topologyKeys come before hints",
            keys(&[HOSTNAME_LABEL, "*"]),
            vec![zone_hint(ep(1, "n1"), "a"), zone_hint(ep(3, "n3"), "b")],
            "n3",
            vec![3],
            "topologyKeys kubernetes.io/hostname=n3: ready endpoints",
            Reject,
        ),
    ];
    for (what, service, endpoints, node, backends, rule, when_empty) in cases {
        let cluster = cluster(service, endpoints);
        assert_eq!(
            frontend_of(&cluster, node, FrontendKind::ClusterIP, Scope::Internal),
            (backends, rule.to_string(), when_empty),
            "{what}"
        );
    }
}

#[test]
fn traffic_policies() {
    use FrontendKind::{ClusterIP, NodePort};
    use Scope::{External, Internal};
    use WhenEmpty::{Drop, Reject};
    let node_port = |internal, external| {
        let mut s = service();
        s.kind = ServiceKind::NodePort;
        s.ports[0].node_port = Some(30080);
        s.internal_policy = internal;
        s.external_policy = external;
        s
    };
    let local = TrafficPolicy::Local;
    let cluster_policy = TrafficPolicy::Cluster;
    // (what, service, endpoints, node, frontend, scope, backends, rule, when empty)
    type Case = (
        &'static str,
        Service,
        Vec<Endpoint>,
        &'static str,
        FrontendKind,
        Scope,
        Vec<u8>,
        &'static str,
        WhenEmpty,
    );
    let cases: Vec<Case> = vec![
        (
            "internalTrafficPolicy Local: this node's endpoints",
            node_port(local, cluster_policy),
            vec![ep(1, "n1"), ep(2, "n2")],
            "n1",
            ClusterIP,
            Internal,
            vec![1],
            "internalTrafficPolicy Local: ready endpoints on this node",
            Drop,
        ),
        (
            "internalTrafficPolicy Local, none here: drop",
            node_port(local, cluster_policy),
            vec![ep(2, "n2")],
            "n1",
            ClusterIP,
            Internal,
            vec![],
            "internalTrafficPolicy Local: no endpoint on this node",
            Drop,
        ),
        (
            "internalTrafficPolicy Local, no endpoint anywhere: reject",
            node_port(local, cluster_policy),
            vec![],
            "n1",
            ClusterIP,
            Internal,
            vec![],
            "internalTrafficPolicy Local: no endpoint on this node",
            Reject,
        ),
        (
            "internalTrafficPolicy Local, only a terminating one here",
            node_port(local, cluster_policy),
            vec![terminating(ep(1, "n1"), true), ep(2, "n2")],
            "n1",
            ClusterIP,
            Internal,
            vec![1],
            "internalTrafficPolicy Local: no ready endpoint on this node: its serving \
             terminating endpoints",
            Drop,
        ),
        (
            "externalTrafficPolicy Local: outside clients to this node's endpoints",
            node_port(cluster_policy, local),
            vec![ep(1, "n1"), ep(2, "n2")],
            "n2",
            NodePort,
            External,
            vec![2],
            "externalTrafficPolicy Local: ready endpoints on this node",
            Drop,
        ),
        (
            "externalTrafficPolicy Local: the cluster's own traffic to all",
            node_port(cluster_policy, local),
            vec![ep(1, "n1"), ep(2, "n2")],
            "n2",
            NodePort,
            Internal,
            vec![1, 2],
            "ready endpoints",
            Reject,
        ),
        (
            "externalTrafficPolicy Local, none here: drop outside clients",
            node_port(cluster_policy, local),
            vec![ep(1, "n1")],
            "n3",
            NodePort,
            External,
            vec![],
            "externalTrafficPolicy Local: no endpoint on this node",
            Drop,
        ),
        (
            "externalTrafficPolicy Cluster: outside clients to all",
            node_port(cluster_policy, cluster_policy),
            vec![ep(1, "n1"), ep(2, "n2")],
            "n3",
            NodePort,
            External,
            vec![1, 2],
            "ready endpoints",
            Reject,
        ),
        (
            "the ClusterIP of an externalTrafficPolicy Local service uses all",
            node_port(cluster_policy, local),
            vec![ep(1, "n1"), ep(2, "n2")],
            "n2",
            ClusterIP,
            Internal,
            vec![1, 2],
            "ready endpoints",
            Reject,
        ),
    ];
    for (what, service, endpoints, node, kind, scope, backends, rule, when_empty) in cases {
        let cluster = cluster(service, endpoints);
        assert_eq!(
            frontend_of(&cluster, node, kind, scope),
            (backends, rule.to_string(), when_empty),
            "{what}"
        );
    }
}

#[test]
fn every_frontend_kind_and_address() {
    let mut svc = service();
    svc.kind = ServiceKind::LoadBalancer;
    svc.ports[0].node_port = Some(30080);
    svc.external_ips = vec![Ipv4Addr::new(198, 51, 100, 7).into()];
    svc.load_balancer_ips = vec![Ipv4Addr::new(203, 0, 113, 9).into()];
    svc.affinity_timeout = Some(60);
    let cluster = cluster(svc, vec![ep(1, "n1")]);
    let mut config = NodeConfig::new("n1");
    let (frontends, skipped) = run(&cluster, &config);
    assert!(skipped.is_empty());
    let listed: Vec<String> = frontends
        .iter()
        .map(|f| format!("{:?} {}:{} {:?}", f.kind, f.address, f.port, f.scope))
        .collect();
    assert_eq!(
        listed,
        [
            "ClusterIP 10.96.0.1:80 Internal",
            "NodePort 192.0.2.1:30080 External",
            "NodePort 192.0.2.1:30080 Internal",
            "ExternalIP 198.51.100.7:80 External",
            "ExternalIP 198.51.100.7:80 Internal",
            "LoadBalancer 203.0.113.9:80 External",
            "LoadBalancer 203.0.113.9:80 Internal",
        ]
    );
    assert!(frontends.iter().all(|f| f.affinity_timeout == Some(60)));

    // --node-ip replaces the Node's addresses; a nodePort out of range is reported.
    config.addresses = vec![
        Ipv4Addr::new(172, 31, 0, 1).into(),
        Ipv4Addr::new(172, 31, 0, 2).into(),
    ];
    config.node_port_range = 31000..=31999;
    let (frontends, skipped) = run(&cluster, &config);
    assert!(!frontends.iter().any(|f| f.kind == FrontendKind::NodePort));
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].field, "spec.ports[http].nodePort");
    config.node_port_range = 30000..=32767;
    let (frontends, _) = run(&cluster, &config);
    let node_ports: Vec<IpAddr> = frontends
        .iter()
        .filter(|f| f.kind == FrontendKind::NodePort && f.scope == Scope::External)
        .map(|f| f.address)
        .collect();
    assert_eq!(node_ports, config.addresses);
}

/// A ready endpoint `address` on `node`.
fn ep_at(address: &str, node: &str) -> Endpoint {
    Endpoint {
        address: address.parse().expect("an address"),
        ..ep(0, node)
    }
}

fn ip(address: &str) -> IpAddr {
    address.parse().expect("an address")
}

#[test]
fn each_family_s_frontends_take_that_family_s_addresses_and_endpoints_only() {
    let dual_stack = |cluster_ips: &[&str]| {
        let mut svc = service();
        svc.kind = ServiceKind::NodePort;
        svc.ports[0].node_port = Some(30080);
        svc.cluster_ips = cluster_ips.iter().map(|a| ip(a)).collect();
        svc.external_ips = vec![ip("198.51.100.7"), ip("2001:db8::7")];
        // Both families' endpoints in one slice, as the Endpoints mirror may make them.
        cluster(svc, vec![ep_at("10.244.0.1", "n1"), ep_at("fd00::1", "n1")])
    };
    let mut config = NodeConfig::new("n1");
    config.addresses = vec![ip("192.0.2.1"), ip("2001:db8::1")];
    let listed = |frontends: &[Frontend]| -> Vec<String> {
        frontends
            .iter()
            .filter(|f| f.scope == Scope::External || f.kind == FrontendKind::ClusterIP)
            .map(|f| {
                let backends: Vec<String> =
                    f.backends.iter().map(|b| b.address.to_string()).collect();
                format!("{:?} {} -> {}", f.kind, f.address, backends.join(","))
            })
            .collect()
    };
    // (clusterIPs, frontends, reported fields)
    let cases: [(&[&str], &[&str], &[&str]); 3] = [
        (
            &["10.96.0.1", "fd00::96:1"],
            &[
                "ClusterIP 10.96.0.1 -> 10.244.0.1",
                "NodePort 192.0.2.1 -> 10.244.0.1",
                "ExternalIP 198.51.100.7 -> 10.244.0.1",
                "ClusterIP fd00::96:1 -> fd00::1",
                "NodePort 2001:db8::1 -> fd00::1",
                "ExternalIP 2001:db8::7 -> fd00::1",
            ],
            &[],
        ),
        // Single-stack IPv4: the IPv6 external IP is the other proxier's, which has no
        // ClusterIP of this Service: reported, left out.
        (
            &["10.96.0.1"],
            &[
                "ClusterIP 10.96.0.1 -> 10.244.0.1",
                "NodePort 192.0.2.1 -> 10.244.0.1",
                "ExternalIP 198.51.100.7 -> 10.244.0.1",
            ],
            &["spec.externalIPs[1]"],
        ),
        (
            &["fd00::96:1"],
            &[
                "ClusterIP fd00::96:1 -> fd00::1",
                "NodePort 2001:db8::1 -> fd00::1",
                "ExternalIP 2001:db8::7 -> fd00::1",
            ],
            &["spec.externalIPs[0]"],
        ),
    ];
    for (cluster_ips, wanted, reported) in cases {
        let (frontends, skipped) = run(&dual_stack(cluster_ips), &config);
        let mut seen = listed(&frontends);
        let mut wanted: Vec<String> = wanted.iter().map(ToString::to_string).collect();
        seen.sort();
        wanted.sort();
        assert_eq!(seen, wanted, "{cluster_ips:?}");
        let fields: Vec<&str> = skipped.iter().map(|s| s.field.as_str()).collect();
        assert_eq!(fields, reported, "{cluster_ips:?}: {skipped:?}");
    }
}

#[test]
fn source_ranges_are_the_load_balancer_ip_s_with_its_own_ips_when_a_range_holds_the_node() {
    let range = |a, b, c, d, len| SourceRange::new(Ipv4Addr::new(a, b, c, d), len);
    let lb_ip = range(203, 0, 113, 9, 32);
    // (what, the Service's ranges, what its load-balancer IP takes); n1 is 192.0.2.1.
    let cases = [
        ("no ranges: every source", None, None),
        (
            "a range without the node",
            Some(vec![range(198, 51, 100, 0, 24)]),
            Some(vec![range(198, 51, 100, 0, 24)]),
        ),
        (
            "a range with the node: the load-balancer IP too",
            Some(vec![range(192, 0, 2, 0, 24)]),
            Some(vec![range(192, 0, 2, 0, 24), lb_ip]),
        ),
        ("only invalid ranges: no source", Some(vec![]), Some(vec![])),
    ];
    for (what, ranges, wanted) in cases {
        let mut svc = service();
        svc.kind = ServiceKind::LoadBalancer;
        svc.ports[0].node_port = Some(30080);
        svc.external_ips = vec![Ipv4Addr::new(198, 51, 100, 7).into()];
        svc.load_balancer_ips = vec![lb_ip.address];
        svc.source_ranges = SourceRanges {
            v4: ranges,
            v6: None,
        };
        let (frontends, _) = run(&cluster(svc, vec![ep(1, "n1")]), &NodeConfig::new("n1"));
        for frontend in &frontends {
            let expected = match frontend.kind {
                FrontendKind::LoadBalancer => wanted.clone(),
                _ => None,
            };
            assert_eq!(
                frontend.source_ranges, expected,
                "{what}: {:?} {:?}",
                frontend.kind, frontend.scope
            );
        }
    }
}

#[test]
fn a_load_balancer_without_ingress_still_has_its_node_port() {
    let mut svc = service();
    svc.kind = ServiceKind::LoadBalancer;
    svc.ports[0].node_port = Some(30080);
    let cluster = cluster(svc, vec![ep(1, "n1")]);
    let (frontends, _) = run(&cluster, &NodeConfig::new("n1"));
    assert!(frontends.iter().any(|f| f.kind == FrontendKind::NodePort));
    assert!(
        !frontends
            .iter()
            .any(|f| f.kind == FrontendKind::LoadBalancer)
    );
}

#[test]
fn a_terminating_duplicate_gives_way() {
    let cluster = Cluster {
        slices: vec![
            EndpointSlice {
                name: "svc-2".into(),
                endpoints: vec![terminating(ep(1, "n1"), true)],
                ..cluster(service(), vec![]).slices[0].clone()
            },
            cluster(service(), vec![ep(1, "n1")]).slices[0].clone(),
        ],
        ..cluster(service(), vec![])
    };
    let (backends, rule, _) = frontend_of(&cluster, "n1", FrontendKind::ClusterIP, Scope::Internal);
    assert_eq!((backends, rule.as_str()), (vec![1], "ready endpoints"));
}

#[test]
fn of_two_services_claiming_a_frontend_the_older_keeps_it() {
    let claimant = |name: &str, created: Option<i64>, vip: u8| Service {
        name: name.into(),
        created,
        cluster_ips: vec![Ipv4Addr::new(10, 96, 0, vip).into()],
        external_ips: vec![Ipv4Addr::new(192, 0, 2, 100).into()],
        ..service()
    };
    // (first Service, second Service, who keeps the external IP, the reason's end)
    let cases = [
        (
            ("aaa", Some(200)),
            ("victim", Some(100)),
            "ns/victim",
            "created earlier",
        ),
        (
            ("victim", Some(100)),
            ("aaa", Some(200)),
            "ns/victim",
            "created earlier",
        ),
        (
            ("aaa", None),
            ("victim", Some(100)),
            "ns/victim",
            "where this one has none",
        ),
        (
            ("aaa", Some(100)),
            ("victim", Some(100)),
            "ns/aaa",
            "in the same second",
        ),
        (("aaa", None), ("victim", None), "ns/aaa", "neither having"),
    ];
    for ((first, first_created), (second, second_created), holder, reason) in cases {
        let cluster = Cluster {
            services: vec![
                claimant(first, first_created, 1),
                claimant(second, second_created, 2),
            ],
            slices: vec![],
        };
        let nodes = nodes();
        let node = NodeConfig::new("n1");
        let (frontends, lost, skipped) = frontends(&cluster, &NodeView::new(&node, &[], &nodes));
        let external = frontends
            .iter()
            .find(|f| f.kind == FrontendKind::ExternalIP && f.scope == Scope::External)
            .unwrap();
        let case = format!("{first} {first_created:?}, {second} {second_created:?}");
        assert_eq!(external.service, holder, "{case}");
        let loser = if holder == "ns/victim" {
            "ns/aaa"
        } else {
            "ns/victim"
        };
        // From outside and from inside: one lost claim of the address.
        assert_eq!(
            lost,
            [LostClaim {
                frontend: "192.0.2.100:80/TCP".into(),
                service: loser.into(),
                holder: holder.into(),
            }],
            "{case}"
        );
        assert_eq!(skipped.len(), 2, "{case}: {skipped:?}");
        assert!(skipped[0].reason.contains(reason), "{case}: {}", skipped[0]);
        assert_eq!(skipped[0].object, format!("Service {loser}"), "{case}");
    }
}

#[test]
fn a_service_s_cluster_ip_is_its_own_from_outside_too() {
    let victim = Service {
        name: "victim".into(),
        created: Some(100),
        ..service()
    };
    // Younger, it lists the victim's ClusterIP as an external IP: the external scope,
    // which no ClusterIP claims, would be its alone if claims were settled by scope.
    let squatter = Service {
        name: "aaa".into(),
        created: Some(200),
        cluster_ips: vec![Ipv4Addr::new(10, 96, 0, 99).into()],
        external_ips: vec![VIP],
        ..service()
    };
    let cluster = Cluster {
        services: vec![victim, squatter],
        slices: vec![],
    };
    let nodes = nodes();
    let node = NodeConfig::new("n1");
    let (frontends, lost, skipped) = frontends(&cluster, &NodeView::new(&node, &[], &nodes));
    let on_vip: Vec<(&str, Scope)> = frontends
        .iter()
        .filter(|f| f.address == VIP)
        .map(|f| (f.service.as_str(), f.scope))
        .collect();
    assert_eq!(on_vip, [("ns/victim", Scope::Internal)], "{skipped:?}");
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(
        skipped.len(),
        2,
        "both scopes of the squatter's claim: {skipped:?}"
    );
}

#[test]
fn a_udp_frontend_retains_its_serving_endpoints_outside_the_selection() {
    let endpoints = vec![
        ep(1, "n1"),
        terminating(ep(2, "n1"), true),
        terminating(ep(3, "n1"), false),
        Endpoint {
            ready: false,
            serving: false,
            ..ep(4, "n1")
        },
    ];
    let retained = |protocol| {
        let mut cluster = cluster(service(), endpoints.clone());
        cluster.services[0].ports[0].protocol = protocol;
        cluster.slices[0].ports[0].protocol = protocol;
        let (frontends, skipped) = run(&cluster, &NodeConfig::new("n1"));
        assert!(skipped.is_empty(), "{skipped:?}");
        let fe = &frontends[0];
        let octets = |b: &[Backend]| b.iter().map(|b| last_octet(b.address)).collect();
        (octets(&fe.backends), octets(&fe.retained))
    };
    // (backends, retained): the terminating endpoint still serving keeps its UDP flows,
    // the two that stopped serving keep none.
    assert_eq!(retained(Protocol::Udp), (vec![1], vec![2]));
    // TCP flows stay on their backend whatever it becomes: nothing to retain.
    assert_eq!(retained(Protocol::Tcp), (vec![1], Vec::<u8>::new()));
}

#[test]
fn a_service_without_a_scheduler_of_its_own_takes_the_node_s() {
    let mut config = NodeConfig::new("n1");
    config.scheduler = Algorithm::SourceHash;
    // (the Service's own, what its frontends get)
    let table = [
        (None, Algorithm::SourceHash),
        (Some(Algorithm::RoundRobin), Algorithm::RoundRobin),
        (Some(Algorithm::SourceHash), Algorithm::SourceHash),
    ];
    for (own, wanted) in table {
        let service = Service {
            algorithm: own,
            ..service()
        };
        let (frontends, skipped) = run(&cluster(service, vec![ep(1, "n1")]), &config);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert!(!frontends.is_empty());
        for frontend in &frontends {
            assert_eq!(frontend.algorithm, wanted, "{own:?}: {frontend:?}");
        }
    }
}
