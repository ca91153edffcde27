//! Which backends each frontend balances over.

use std::{
    collections::{BTreeMap, btree_map::Entry},
    net::Ipv4Addr,
};

use super::{
    Backend, Cluster, EndpointSlice, Frontend, FrontendKind, Protocol, Service, ServicePort,
    Skipped, TargetPort,
};

/// The frontends of `cluster`, sorted by address, port and protocol, each with the ready
/// endpoints of its Service port.
pub fn frontends(cluster: &Cluster) -> (Vec<Frontend>, Vec<Skipped>) {
    let zones: BTreeMap<&str, &str> = cluster
        .nodes
        .iter()
        .filter_map(|n| Some((n.name.as_str(), n.zone.as_deref()?)))
        .collect();
    let mut services: Vec<&Service> = cluster.services.iter().collect();
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    let mut skipped = Vec::new();
    let mut by_key: BTreeMap<(Ipv4Addr, u16, Protocol), Frontend> = BTreeMap::new();
    for service in services {
        let slices: Vec<&EndpointSlice> = cluster
            .slices
            .iter()
            .filter(|s| s.namespace == service.namespace && s.service == service.name)
            .collect();
        for port in &service.ports {
            let backends = backends(service, port, &slices, &zones, &mut skipped);
            for &address in &service.cluster_ips {
                let frontend = Frontend {
                    service: format!("{}/{}", service.namespace, service.name),
                    port_name: port.name.clone(),
                    kind: FrontendKind::ClusterIP,
                    address,
                    port: port.port,
                    protocol: port.protocol,
                    algorithm: service.algorithm,
                    backends: backends.clone(),
                };
                match by_key.entry((address, port.port, port.protocol)) {
                    Entry::Vacant(slot) => {
                        slot.insert(frontend);
                    }
                    Entry::Occupied(taken) => skipped.push(Skipped::new(
                        format!("Service {}", frontend.service),
                        port.field(),
                        format!(
                            "{address}:{}/{} is already the frontend of Service {}",
                            port.port,
                            port.protocol,
                            taken.get().service
                        ),
                    )),
                }
            }
        }
    }
    (by_key.into_values().collect(), skipped)
}

/// The ready endpoints of `port`, deduplicated across slices and sorted.
fn backends(
    service: &Service,
    port: &ServicePort,
    slices: &[&EndpointSlice],
    zones: &BTreeMap<&str, &str>,
    skipped: &mut Vec<Skipped>,
) -> Vec<Backend> {
    let mut backends = Vec::new();
    for slice in slices {
        // The EndpointSlice controller names each slice port after its Service port and has
        // already resolved a named targetPort to each pod's number.
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        let number = match (slice_port.port, &port.target_port) {
            (Some(number), _) => number,
            (None, TargetPort::Number(number)) => *number,
            (None, TargetPort::Name(name)) => {
                skipped.push(Skipped::new(
                    format!("EndpointSlice {}/{}", slice.namespace, slice.name),
                    format!("ports[{}].port", slice_port.name),
                    format!(
                        "no port number, and Service {}/{} names its targetPort {name:?}",
                        service.namespace, service.name
                    ),
                ));
                continue;
            }
        };
        backends.extend(slice.endpoints.iter().filter(|e| e.ready).map(|e| Backend {
            address: e.address,
            port: number,
            node: e.node.clone(),
            zone: e.zone.clone().or_else(|| {
                let node = e.node.as_deref()?;
                zones.get(node).map(|z| z.to_string())
            }),
        }));
    }
    backends.sort();
    backends.dedup_by(|a, b| (a.address, a.port) == (b.address, b.port));
    backends
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Algorithm, Endpoint, EndpointPort, Node};

    fn service(ports: Vec<ServicePort>) -> Service {
        Service {
            namespace: "ns".into(),
            name: "svc".into(),
            cluster_ips: vec![Ipv4Addr::new(10, 96, 0, 1)],
            ports,
            algorithm: Algorithm::RoundRobin,
        }
    }

    fn port(name: &str, target_port: TargetPort) -> ServicePort {
        ServicePort {
            name: name.into(),
            port: 80,
            protocol: Protocol::Tcp,
            target_port,
        }
    }

    fn endpoint(last: u8, ready: bool) -> Endpoint {
        Endpoint {
            address: Ipv4Addr::new(10, 244, 0, last),
            ready,
            serving: ready,
            terminating: false,
            node: Some("n1".into()),
            zone: None,
        }
    }

    fn slice(name: &str, ports: Vec<EndpointPort>, endpoints: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice {
            namespace: "ns".into(),
            name: name.into(),
            service: "svc".into(),
            ports,
            endpoints,
        }
    }

    fn slice_port(name: &str, port: Option<u16>, protocol: Protocol) -> EndpointPort {
        EndpointPort {
            name: name.into(),
            port,
            protocol,
        }
    }

    /// `(address last octet, port)` of each backend of the only frontend.
    fn backends_of(cluster: &Cluster) -> (Vec<(u8, u16)>, usize) {
        let (frontends, skipped) = frontends(cluster);
        assert_eq!(frontends.len(), 1, "{frontends:?}");
        let backends = frontends[0]
            .backends
            .iter()
            .map(|b| (b.address.octets()[3], b.port))
            .collect();
        (backends, skipped.len())
    }

    #[test]
    fn backends_of_a_service_port() {
        let http = || port("http", TargetPort::Name("web".into()));
        // (what, cluster, expected backends as (last octet, port), how many skipped)
        type Case = (&'static str, Cluster, Vec<(u8, u16)>, usize);
        let cases: Vec<Case> = vec![
            (
                "ready endpoints, port from the slice",
                Cluster {
                    services: vec![service(vec![http()])],
                    slices: vec![slice(
                        "a",
                        vec![slice_port("http", Some(8080), Protocol::Tcp)],
                        vec![endpoint(2, true), endpoint(1, true), endpoint(3, false)],
                    )],
                    nodes: vec![],
                },
                vec![(1, 8080), (2, 8080)],
                0,
            ),
            (
                "a slice port of another name or protocol does not count",
                Cluster {
                    services: vec![service(vec![http()])],
                    slices: vec![slice(
                        "a",
                        vec![
                            slice_port("metrics", Some(9090), Protocol::Tcp),
                            slice_port("http", Some(8080), Protocol::Udp),
                        ],
                        vec![endpoint(1, true)],
                    )],
                    nodes: vec![],
                },
                vec![],
                0,
            ),
            (
                "the same endpoint in two slices is one backend",
                Cluster {
                    services: vec![service(vec![http()])],
                    slices: vec![
                        slice(
                            "a",
                            vec![slice_port("http", Some(8080), Protocol::Tcp)],
                            vec![endpoint(1, true)],
                        ),
                        slice(
                            "b",
                            vec![slice_port("http", Some(8080), Protocol::Tcp)],
                            vec![endpoint(1, true), endpoint(4, true)],
                        ),
                    ],
                    nodes: vec![],
                },
                vec![(1, 8080), (4, 8080)],
                0,
            ),
            (
                "a slice port without a number takes a numeric targetPort",
                Cluster {
                    services: vec![service(vec![port("http", TargetPort::Number(8443))])],
                    slices: vec![slice(
                        "a",
                        vec![slice_port("http", None, Protocol::Tcp)],
                        vec![endpoint(1, true)],
                    )],
                    nodes: vec![],
                },
                vec![(1, 8443)],
                0,
            ),
            (
                "without a number and with a named targetPort there is no port: skipped",
                Cluster {
                    services: vec![service(vec![http()])],
                    slices: vec![slice(
                        "a",
                        vec![slice_port("http", None, Protocol::Tcp)],
                        vec![endpoint(1, true)],
                    )],
                    nodes: vec![],
                },
                vec![],
                1,
            ),
            (
                "slices of another service or namespace do not count",
                Cluster {
                    services: vec![service(vec![http()])],
                    slices: vec![
                        EndpointSlice {
                            service: "other".into(),
                            ..slice(
                                "a",
                                vec![slice_port("http", Some(8080), Protocol::Tcp)],
                                vec![endpoint(1, true)],
                            )
                        },
                        EndpointSlice {
                            namespace: "elsewhere".into(),
                            ..slice(
                                "b",
                                vec![slice_port("http", Some(8080), Protocol::Tcp)],
                                vec![endpoint(2, true)],
                            )
                        },
                    ],
                    nodes: vec![],
                },
                vec![],
                0,
            ),
        ];
        for (description, cluster, expected, skipped) in cases {
            assert_eq!(backends_of(&cluster), (expected, skipped), "{description}");
        }
    }

    #[test]
    fn a_backend_without_a_zone_takes_its_nodes() {
        let cluster = Cluster {
            services: vec![service(vec![port("", TargetPort::Number(80))])],
            slices: vec![slice(
                "a",
                vec![slice_port("", Some(80), Protocol::Tcp)],
                vec![endpoint(1, true)],
            )],
            nodes: vec![Node {
                name: "n1".into(),
                zone: Some("z1".into()),
            }],
        };
        let (frontends, _) = frontends(&cluster);
        assert_eq!(frontends[0].backends[0].zone.as_deref(), Some("z1"));
    }

    #[test]
    fn one_frontend_per_cluster_ip_and_port() {
        let mut svc = service(vec![
            port("a", TargetPort::Number(80)),
            ServicePort {
                protocol: Protocol::Udp,
                ..port("b", TargetPort::Number(80))
            },
        ]);
        svc.cluster_ips.push(Ipv4Addr::new(10, 96, 0, 2));
        let cluster = Cluster {
            services: vec![svc],
            ..Default::default()
        };
        let (frontends, skipped) = frontends(&cluster);
        let keys: Vec<String> = frontends
            .iter()
            .map(|f| format!("{}:{}/{}", f.address, f.port, f.protocol))
            .collect();
        assert_eq!(
            keys,
            [
                "10.96.0.1:80/TCP",
                "10.96.0.1:80/UDP",
                "10.96.0.2:80/TCP",
                "10.96.0.2:80/UDP"
            ]
        );
        assert!(skipped.is_empty());
    }
}
