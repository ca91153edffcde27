//! The health checks a node serves for cloud load balancers (`healthCheckNodePort`), as
//! kube-proxy's `pkg/proxy/healthcheck` does: for each LoadBalancer Service with
//! `externalTrafficPolicy: Local`, how many of its endpoints are on this node and ready.

use std::{collections::BTreeSet, net::IpAddr};

use super::{Cluster, Family, HealthCheck, Service};

/// The health check of `service` on `node`, if it has one. Its endpoints of its primary family
/// (a dual-stack pod is in a slice of each) are counted per Service port (an endpoint listed
/// twice, in two slices, once) and summed, as kube-proxy's `LocalReadyEndpoints`.
pub fn health_check(service: &Service, cluster: &Cluster, node: &str) -> Option<HealthCheck> {
    let port = service.health_check_node_port?;
    let primary = service
        .cluster_ips
        .first()
        .map_or(Family::V4, |&ip| Family::of(ip));
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
                    && Family::of(endpoint.address) == primary
                {
                    counted.insert((endpoint.address, slice_port.port));
                }
            }
        }
        local_endpoints += u32::try_from(counted.len()).unwrap_or(u32::MAX);
    }
    Some(HealthCheck {
        namespace: service.namespace.clone(),
        name: service.name.clone(),
        port,
        local_endpoints,
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::{
        Algorithm, Endpoint, EndpointPort, EndpointSlice, Protocol, ServiceKind, ServicePort,
        TargetPort, TrafficPolicy,
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

    #[test]
    fn the_node_s_ready_endpoints_are_counted_per_port_once_each() {
        let service = Service {
            namespace: "ns".into(),
            name: "web".into(),
            created: None,
            kind: ServiceKind::LoadBalancer,
            cluster_ips: vec![],
            external_ips: vec![],
            load_balancer_ips: vec![],
            ports: vec![port("http", 80), port("https", 443)],
            algorithm: Algorithm::RoundRobin,
            internal_policy: TrafficPolicy::Cluster,
            external_policy: TrafficPolicy::Local,
            affinity_timeout: None,
            topology_keys: vec![],
            health_check_node_port: Some(32_000),
            source_ranges: crate::model::SourceRanges::default(),
        };
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
        let check = |node| health_check(&service, &cluster, node).map(|c| c.local_endpoints);
        // (node, endpoints): one ready endpoint, for each of the two ports.
        for (node, wanted) in [("n1", 2), ("n2", 2), ("n3", 0)] {
            assert_eq!(check(node), Some(wanted), "{node}");
        }
        let no_port = Service {
            health_check_node_port: None,
            ..service.clone()
        };
        assert_eq!(health_check(&no_port, &cluster, "n1"), None);
    }
}
