//! The health checks a node serves for cloud load balancers (`healthCheckNodePort`), as
//! kube-proxy's `pkg/proxy/healthcheck` does: for each LoadBalancer Service with
//! `externalTrafficPolicy: Local`, how many of its endpoints are on this node and ready; one
//! check per family of the Service, as kube-proxy's proxier of each family serves its own on
//! the node's addresses of that family.

use std::{collections::BTreeSet, net::IpAddr};

use super::{Cluster, Family, HealthCheck, Service};

/// The health checks of `service` on `node`, one per family of its ClusterIPs (IPv4 when it
/// has none), if it has a health check port at all.
pub fn health_checks(service: &Service, cluster: &Cluster, node: &str) -> Vec<HealthCheck> {
    let Some(port) = service.health_check_node_port else {
        return Vec::new();
    };
    let mut families: Vec<Family> = service
        .cluster_ips
        .iter()
        .map(|&ip| Family::of(ip))
        .collect();
    families.dedup();
    if families.is_empty() {
        families.push(Family::V4);
    }
    families
        .into_iter()
        .map(|family| HealthCheck {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
            family,
            port,
            local_endpoints: local_endpoints(service, cluster, node, family),
        })
        .collect()
}

/// The ready endpoints of `family` on `node` (a dual-stack pod is in a slice of each family),
/// counted per Service port (an endpoint listed twice, in two slices, once) and summed, as
/// kube-proxy's `LocalReadyEndpoints`.
fn local_endpoints(service: &Service, cluster: &Cluster, node: &str, family: Family) -> u32 {
    let mut local_endpoints = 0;
    for service_port in &service.ports {
        let mut counted: BTreeSet<(IpAddr, u16)> = BTreeSet::new();
        for slice in cluster.slices.iter().filter(|s| s.service == service.name) {
            let Some(slice_port) = slice.port_for(service_port) else {
                continue;
            };
            for endpoint in &slice.endpoints {
                if endpoint.ready
                    && endpoint.node.as_deref() == Some(node)
                    && Family::of(endpoint.address) == family
                {
                    counted.insert((endpoint.address, slice_port.port));
                }
            }
        }
        local_endpoints += u32::try_from(counted.len()).unwrap_or(u32::MAX);
    }
    local_endpoints
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::model::{
        Endpoint, EndpointPort, EndpointSlice, Protocol, ServiceKind, ServicePort, TargetPort,
        TrafficPolicy,
    };

    fn port(name: &str, number: u16) -> ServicePort {
        ServicePort {
            name: name.into(),
            port: number,
            protocol: Protocol::Tcp,
            target_port: TargetPort::Number(number),
            node_port: None,
        }
    }

    fn endpoint(last: u8, node: &str, ready: bool) -> Endpoint {
        Endpoint {
            address: Ipv4Addr::new(10, 244, 0, last).into(),
            ready,
            serving: true,
            terminating: !ready,
            node: Some(node.into()),
            zone: None,
            zone_hints: vec![],
            node_hints: vec![],
        }
    }

    fn slice(name: &str, endpoints: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice {
            namespace: "ns".into(),
            name: name.into(),
            service: "web".into(),
            ports: ["http", "https"]
                .map(|p| EndpointPort {
                    name: p.into(),
                    port: 8080,
                    protocol: Protocol::Tcp,
                })
                .to_vec(),
            endpoints,
        }
    }

    /// A LoadBalancer Service with `externalTrafficPolicy: Local`, two ports, no ClusterIP.
    fn web() -> Service {
        Service {
            namespace: "ns".into(),
            name: "web".into(),
            created: None,
            kind: ServiceKind::LoadBalancer,
            cluster_ips: vec![],
            external_ips: vec![],
            load_balancer_ips: vec![],
            ports: vec![port("http", 80), port("https", 443)],
            algorithm: None,
            hash_port: vec![],
            internal_policy: TrafficPolicy::Cluster,
            external_policy: TrafficPolicy::Local,
            affinity_timeout: None,
            topology_keys: vec![],
            health_check_node_port: Some(32_000),
            source_ranges: crate::model::SourceRanges::default(),
        }
    }

    #[test]
    fn a_dual_stack_service_has_a_check_per_family_each_counting_its_own_endpoints() {
        let service = Service {
            cluster_ips: vec![
                "fd00::10:96:0:10".parse().unwrap(),
                "10.96.0.10".parse().unwrap(),
            ],
            ..web()
        };
        let v6 = |last, ready| Endpoint {
            address: Ipv6Addr::new(0xfd00, 0, 0, 0, 0x10, 0x244, 0, last).into(),
            ..endpoint(1, "n1", ready)
        };
        let cluster = Cluster {
            services: vec![service.clone()],
            slices: vec![
                slice("web-v4", vec![endpoint(1, "n1", true)]),
                slice("web-v6", vec![v6(1, true), v6(2, true), v6(3, false)]),
            ],
        };
        let checks: Vec<_> = health_checks(&service, &cluster, "n1")
            .iter()
            .map(|c| (c.family, c.port, c.local_endpoints))
            .collect();
        // The primary family first, each counting its ready endpoints over both ports.
        assert_eq!(checks, [(Family::V6, 32_000, 4), (Family::V4, 32_000, 2)]);
    }

    #[test]
    fn the_node_s_ready_endpoints_are_counted_per_port_once_each() {
        let service = web();
        let cluster = Cluster {
            services: vec![service.clone()],
            slices: vec![
                slice(
                    "web-1",
                    vec![
                        endpoint(1, "n1", true),
                        // Terminating: not ready, not counted, so that the cloud drains it.
                        endpoint(2, "n1", false),
                        endpoint(3, "n2", true),
                    ],
                ),
                // The same endpoint in a second slice: once.
                slice("web-2", vec![endpoint(1, "n1", true)]),
            ],
        };
        let check = |node| {
            health_checks(&service, &cluster, node)
                .iter()
                .map(|c| (c.family, c.local_endpoints))
                .collect::<Vec<_>>()
        };
        // (node, endpoints): one ready endpoint, for each of the two ports.
        for (node, wanted) in [("n1", 2), ("n2", 2), ("n3", 0)] {
            assert_eq!(check(node), [(Family::V4, wanted)], "{node}");
        }
        let no_port = Service {
            health_check_node_port: None,
            ..service.clone()
        };
        assert_eq!(health_checks(&no_port, &cluster, "n1"), []);
    }
}
