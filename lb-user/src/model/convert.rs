//! Kubernetes objects -> the model, validating every field the datapath depends on. A bad field
//! skips the smallest thing it spoils (a port, an endpoint, or the object) with a [`Skipped`]
//! that names the object and the field.

use std::{collections::BTreeSet, net::Ipv4Addr};

use k8s_openapi::{
    api::{
        core::v1 as core,
        discovery::v1::{self as discovery},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use super::{
    ALGORITHM_ANNOTATION, Algorithm, Cluster, Endpoint, EndpointPort, EndpointSlice, Node,
    Protocol, Service, ServicePort, Skipped, TargetPort,
};

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const SKIP_MIRROR_LABEL: &str = "endpointslice.kubernetes.io/skip-mirror";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The Kubernetes objects a source has read, as the API serves them.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<core::Service>,
    pub endpoint_slices: Vec<discovery::EndpointSlice>,
    pub endpoints: Vec<core::Endpoints>,
    pub nodes: Vec<core::Node>,
}

/// Validates `objects` into a [`Cluster`]; what is left out is listed.
pub fn cluster(objects: &Objects) -> (Cluster, Vec<Skipped>) {
    let mut skipped = Vec::new();
    let services: Vec<Service> = objects
        .services
        .iter()
        .filter_map(|s| service(s, &mut skipped))
        .collect();
    let mut slices: Vec<EndpointSlice> = objects
        .endpoint_slices
        .iter()
        .filter_map(|s| endpoint_slice(s, &mut skipped))
        .collect();
    // As the mirroring controller does: only Services without a selector get slices from their
    // Endpoints; the others' Endpoints duplicate what their slices say.
    let selectorless: BTreeSet<(String, String)> = objects
        .services
        .iter()
        .filter(|s| s.spec.as_ref().is_some_and(|spec| spec.selector.is_none()))
        .map(|s| (namespace(&s.metadata), name(&s.metadata)))
        .collect();
    for endpoints in objects
        .endpoints
        .iter()
        .filter(|e| selectorless.contains(&(namespace(&e.metadata), name(&e.metadata))))
        .filter(|e| label(&e.metadata, SKIP_MIRROR_LABEL) != Some("true"))
    {
        slices.extend(mirrored_slices(endpoints, &mut skipped));
    }
    let nodes = objects.nodes.iter().map(node).collect();
    (
        Cluster {
            services,
            slices,
            nodes,
        },
        skipped,
    )
}

fn namespace(meta: &ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_else(|| "default".into())
}

fn name(meta: &ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

fn object(kind: &str, meta: &ObjectMeta) -> String {
    format!("{kind} {}/{}", namespace(meta), name(meta))
}

fn service(svc: &core::Service, skipped: &mut Vec<Skipped>) -> Option<Service> {
    let object = object("Service", &svc.metadata);
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let algorithm = match svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ALGORITHM_ANNOTATION))
        .map(String::as_str)
    {
        None | Some("round-robin") => Algorithm::RoundRobin,
        Some("source-hash") => Algorithm::SourceHash,
        Some(other) => {
            skipped.push(Skipped::new(
                object,
                format!("metadata.annotations[{ALGORITHM_ANNOTATION}]"),
                format!("unknown algorithm {other:?}: expected round-robin or source-hash"),
            ));
            return None;
        }
    };
    let mut cluster_ips = Vec::new();
    let listed: Vec<(String, &String)> = match &spec.cluster_ips {
        Some(ips) => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip))
            .collect(),
        None => spec
            .cluster_ip
            .iter()
            .map(|ip| ("spec.clusterIP".to_string(), ip))
            .collect(),
    };
    for (field, ip) in listed {
        if ip == "None" || ip.is_empty() {
            continue;
        }
        match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(v4)) => cluster_ips.push(v4),
            Ok(std::net::IpAddr::V6(_)) => skipped.push(Skipped::new(
                object.clone(),
                field,
                format!("{ip} is IPv6, which the datapath does not handle yet"),
            )),
            Err(_) => {
                skipped.push(Skipped::new(
                    object,
                    field,
                    format!("{ip:?} is not an IP address"),
                ));
                return None;
            }
        }
    }
    let ports = spec
        .ports
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, p)| service_port(p, &object, &format!("spec.ports[{i}]"), skipped))
        .collect();
    Some(Service {
        namespace: namespace(&svc.metadata),
        name: name(&svc.metadata),
        cluster_ips,
        ports,
        algorithm,
    })
}

fn service_port(
    port: &core::ServicePort,
    object: &str,
    field: &str,
    skipped: &mut Vec<Skipped>,
) -> Option<ServicePort> {
    let mut fail = |sub: &str, reason: String| {
        skipped.push(Skipped::new(object, format!("{field}.{sub}"), reason));
        None
    };
    let Some(number) = port_number(port.port) else {
        return fail("port", format!("{} is not a port (1-65535)", port.port));
    };
    let protocol = match protocol(port.protocol.as_deref()) {
        Ok(p) => p,
        Err(reason) => return fail("protocol", reason),
    };
    let target_port = match &port.target_port {
        None => TargetPort::Number(number),
        Some(IntOrString::Int(n)) => match port_number(*n) {
            Some(n) => TargetPort::Number(n),
            None => return fail("targetPort", format!("{n} is not a port (1-65535)")),
        },
        Some(IntOrString::String(name)) => TargetPort::Name(name.clone()),
    };
    Some(ServicePort {
        name: port.name.clone().unwrap_or_default(),
        port: number,
        protocol,
        target_port,
    })
}

fn port_number(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|&p| p != 0)
}

fn protocol(protocol: Option<&str>) -> Result<Protocol, String> {
    match protocol {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Err("SCTP is not supported by the datapath yet".into()),
        Some(other) => Err(format!("unknown protocol {other:?}")),
    }
}

fn endpoint_slice(
    slice: &discovery::EndpointSlice,
    skipped: &mut Vec<Skipped>,
) -> Option<EndpointSlice> {
    let object = object("EndpointSlice", &slice.metadata);
    if slice.address_type != "IPv4" {
        // IPv6 and FQDN slices exist beside the IPv4 one of every dual-stack Service.
        return None;
    }
    let Some(service) = label(&slice.metadata, SERVICE_NAME_LABEL) else {
        skipped.push(Skipped::new(
            object,
            format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
            "missing: the slice belongs to no Service",
        ));
        return None;
    };
    let mut ports = Vec::new();
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        let field = format!("ports[{i}]");
        let number = match port.port {
            None => None,
            Some(n) => match port_number(n) {
                Some(n) => Some(n),
                None => {
                    skipped.push(Skipped::new(
                        &object,
                        format!("{field}.port"),
                        format!("{n} is not a port (1-65535)"),
                    ));
                    continue;
                }
            },
        };
        match protocol(port.protocol.as_deref()) {
            Ok(protocol) => ports.push(EndpointPort {
                name: port.name.clone().unwrap_or_default(),
                port: number,
                protocol,
            }),
            Err(reason) => skipped.push(Skipped::new(&object, format!("{field}.protocol"), reason)),
        }
    }
    let mut endpoints = Vec::new();
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        // As kube-proxy does: an endpoint's first address is the one used.
        let Some(address) = endpoint.addresses.first() else {
            continue;
        };
        let Ok(address) = address.parse::<Ipv4Addr>() else {
            skipped.push(Skipped::new(
                &object,
                format!("endpoints[{i}].addresses[0]"),
                format!("{address:?} is not an IPv4 address"),
            ));
            continue;
        };
        let conditions = endpoint.conditions.clone().unwrap_or_default();
        // The API's defaults: an unknown readiness counts as ready, serving follows ready.
        let ready = conditions.ready.unwrap_or(true);
        endpoints.push(Endpoint {
            address,
            ready,
            serving: conditions.serving.unwrap_or(ready),
            terminating: conditions.terminating.unwrap_or(false),
            node: endpoint.node_name.clone(),
            zone: endpoint.zone.clone(),
        });
    }
    Some(EndpointSlice {
        namespace: namespace(&slice.metadata),
        name: name(&slice.metadata),
        service: service.to_string(),
        ports,
        endpoints,
    })
}

/// The slices the EndpointSlice mirroring controller makes of a selectorless Service's
/// `Endpoints`: one per subset (its addresses times its ports), not-ready addresses kept as not
/// ready.
fn mirrored_slices(endpoints: &core::Endpoints, skipped: &mut Vec<Skipped>) -> Vec<EndpointSlice> {
    let object = object("Endpoints", &endpoints.metadata);
    let mut slices = Vec::new();
    for (s, subset) in endpoints.subsets.iter().flatten().enumerate() {
        let mut ports = Vec::new();
        for (p, port) in subset.ports.iter().flatten().enumerate() {
            let field = format!("subsets[{s}].ports[{p}]");
            let Some(number) = port_number(port.port) else {
                skipped.push(Skipped::new(
                    &object,
                    format!("{field}.port"),
                    format!("{} is not a port (1-65535)", port.port),
                ));
                continue;
            };
            match protocol(port.protocol.as_deref()) {
                Ok(protocol) => ports.push(EndpointPort {
                    name: port.name.clone().unwrap_or_default(),
                    port: Some(number),
                    protocol,
                }),
                Err(reason) => {
                    skipped.push(Skipped::new(&object, format!("{field}.protocol"), reason));
                }
            }
        }
        let mut members = Vec::new();
        let lists = [
            ("addresses", &subset.addresses, true),
            ("notReadyAddresses", &subset.not_ready_addresses, false),
        ];
        for (list_name, list, ready) in lists {
            for (a, address) in list.iter().flatten().enumerate() {
                match address.ip.parse::<Ipv4Addr>() {
                    Ok(ip) => members.push(Endpoint {
                        address: ip,
                        ready,
                        serving: ready,
                        terminating: false,
                        node: address.node_name.clone(),
                        zone: None,
                    }),
                    Err(_) => skipped.push(Skipped::new(
                        &object,
                        format!("subsets[{s}].{list_name}[{a}].ip"),
                        format!("{:?} is not an IPv4 address", address.ip),
                    )),
                }
            }
        }
        slices.push(EndpointSlice {
            namespace: namespace(&endpoints.metadata),
            name: format!("{}-mirrored-{s}", name(&endpoints.metadata)),
            service: name(&endpoints.metadata),
            ports,
            endpoints: members,
        });
    }
    slices
}

fn node(node: &core::Node) -> Node {
    Node {
        name: name(&node.metadata),
        zone: label(&node.metadata, ZONE_LABEL).map(str::to_string),
    }
}
