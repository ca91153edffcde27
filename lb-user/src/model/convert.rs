//! Kubernetes objects -> the model, validating every field the datapath depends on. A bad field
//! skips the smallest thing it spoils (a port, an endpoint, or the object) with a [`Skipped`]
//! that names the object and the field.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use k8s_openapi::{
    api::{
        core::v1 as core,
        discovery::v1::{self as discovery},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use super::{
    ALGORITHM_ANNOTATION, Algorithm, Cluster, Endpoint, EndpointPort, EndpointSlice, Family, Node,
    Protocol, SCHEDULER_ANNOTATION, SCHEDULER_FLAGS_ANNOTATION, Service, ServiceKind, ServicePort,
    Skipped, SourceRange, SourceRanges, TOPOLOGY_KEYS_ANNOTATION, TargetPort, TrafficPolicy,
    store::Object,
};

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const SKIP_MIRROR_LABEL: &str = "endpointslice.kubernetes.io/skip-mirror";
const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// On the slices of headless Services, which kube-proxy's informers leave out.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Kubernetes' default and maximum `sessionAffinityConfig.clientIP.timeoutSeconds`.
const DEFAULT_AFFINITY_TIMEOUT: i32 = 10_800;
const MAX_AFFINITY_TIMEOUT: u32 = 86_400;
const MAX_TOPOLOGY_KEYS: usize = 16;

/// The Kubernetes objects a source has read, as the API serves them. Shared: a source hands out
/// the same allocation for an object that has not changed, which is how a whole snapshot tells
/// the store what did ([`super::Store::replace`]).
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Arc<core::Service>>,
    pub endpoint_slices: Vec<Arc<discovery::EndpointSlice>>,
    pub endpoints: Vec<Arc<core::Endpoints>>,
    pub nodes: Vec<Arc<core::Node>>,
}

impl Objects {
    /// Every object, kind by kind, in the order listed.
    pub fn iter(&self) -> impl Iterator<Item = Object> + '_ {
        let services = self.services.iter().cloned().map(Object::Service);
        let slices = self.endpoint_slices.iter().cloned().map(Object::Slice);
        let endpoints = self.endpoints.iter().cloned().map(Object::Endpoints);
        let nodes = self.nodes.iter().cloned().map(Object::Node);
        services.chain(slices).chain(endpoints).chain(nodes)
    }

    pub fn extend(&mut self, other: Objects) {
        self.services.extend(other.services);
        self.endpoint_slices.extend(other.endpoint_slices);
        self.endpoints.extend(other.endpoints);
        self.nodes.extend(other.nodes);
    }
}

/// The objects that make one Service's frontends: the Service (twice if it is listed twice),
/// its EndpointSlices, its Endpoints; in the store, each kind by namespace and name.
#[derive(Clone, Debug, Default)]
pub struct Group {
    pub services: Vec<Arc<core::Service>>,
    pub slices: Vec<Arc<discovery::EndpointSlice>>,
    pub endpoints: Vec<Arc<core::Endpoints>>,
}

impl Group {
    /// The same objects: the same allocations, in the same order.
    pub fn is_same(&self, other: &Group) -> bool {
        same(&self.services, &other.services)
            && same(&self.slices, &other.slices)
            && same(&self.endpoints, &other.endpoints)
    }
}

/// The same allocations, in the same order.
pub fn same<T>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| Arc::ptr_eq(a, b))
}

/// `objects` grouped by the Service they belong to (namespace, name). A slice without a
/// Service label is grouped under an empty name, to be reported.
pub fn groups(objects: &Objects) -> BTreeMap<(&str, &str), Group> {
    let mut groups: BTreeMap<(&str, &str), Group> = BTreeMap::new();
    for service in &objects.services {
        let group = groups.entry(object_key(&service.metadata)).or_default();
        group.services.push(Arc::clone(service));
    }
    for slice in &objects.endpoint_slices {
        let group = groups.entry(slice_key(slice)).or_default();
        group.slices.push(Arc::clone(slice));
    }
    for endpoints in &objects.endpoints {
        let group = groups.entry(object_key(&endpoints.metadata)).or_default();
        group.endpoints.push(Arc::clone(endpoints));
    }
    groups
}

/// The namespace and name of a Service, or of an object named after its Service (Endpoints).
pub fn object_key(meta: &ObjectMeta) -> (&str, &str) {
    (
        meta.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE),
        meta.name.as_deref().unwrap_or_default(),
    )
}

/// A slice belongs to the Service its label names.
pub fn slice_key(slice: &discovery::EndpointSlice) -> (&str, &str) {
    let (namespace, _) = object_key(&slice.metadata);
    (
        namespace,
        label(&slice.metadata, SERVICE_NAME_LABEL).unwrap_or_default(),
    )
}

/// Validates one group's objects into the model; what is left out is listed.
pub fn cluster(group: &Group, skipped: &mut Vec<Skipped>) -> Cluster {
    let services = group
        .services
        .iter()
        .filter_map(|s| service(s, skipped))
        .collect();
    let mut slices: Vec<EndpointSlice> = group
        .slices
        .iter()
        .filter_map(|s| endpoint_slice(s, skipped))
        .collect();
    // As the mirroring controller does: only Services without a selector get slices from their
    // Endpoints; the others' Endpoints duplicate what their slices say.
    let selectorless = group
        .services
        .iter()
        .any(|s| s.spec.as_ref().is_some_and(|spec| spec.selector.is_none()));
    if selectorless {
        for endpoints in group
            .endpoints
            .iter()
            .filter(|e| label(&e.metadata, SKIP_MIRROR_LABEL) != Some("true"))
        {
            slices.extend(mirrored_slices(endpoints, skipped));
        }
    }
    Cluster { services, slices }
}

/// The taint the cluster autoscaler puts on a Node it is about to delete.
const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Whether the cluster may send the Node `name` traffic, as kube-proxy's `/healthz` judges
/// (`nodeEligible`): not while it is being deleted or the cluster autoscaler has marked it for
/// deletion. A Node not seen yet is eligible, as in kube-proxy until its first Node event.
pub fn node_eligible(nodes: &[Arc<core::Node>], name: &str) -> bool {
    nodes
        .iter()
        .filter(|n| n.metadata.name.as_deref() == Some(name))
        .all(|n| {
            let marked = n
                .spec
                .iter()
                .flat_map(|spec| spec.taints.iter().flatten())
                .any(|t| t.key == TO_BE_DELETED_TAINT);
            n.metadata.deletion_timestamp.is_none() && !marked
        })
}

/// Validates the Nodes; what is wrong is listed.
pub fn nodes(nodes: &[Arc<core::Node>], skipped: &mut Vec<Skipped>) -> Vec<Node> {
    nodes.iter().map(|n| node(n, skipped)).collect()
}

const DEFAULT_NAMESPACE: &str = "default";

fn namespace(meta: &ObjectMeta) -> String {
    meta.namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.into())
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
    let mut fail = |field: &str, reason: String| {
        skipped.push(Skipped::new(&object, field, reason));
        None
    };
    if let Some(proxy) = label(&svc.metadata, SERVICE_PROXY_NAME_LABEL) {
        return fail(
            &format!("metadata.labels[{SERVICE_PROXY_NAME_LABEL}]"),
            format!("belongs to the service proxy {proxy:?}: left alone"),
        );
    }
    let kind = match spec.type_.as_deref() {
        None | Some("ClusterIP") => ServiceKind::ClusterIP,
        Some("NodePort") => ServiceKind::NodePort,
        Some("LoadBalancer") => ServiceKind::LoadBalancer,
        Some("ExternalName") => {
            return fail(
                "spec.type",
                "ExternalName: a DNS alias, nothing to program".into(),
            );
        }
        Some(other) => return fail("spec.type", format!("unknown type {other:?}")),
    };
    if spec.cluster_ip.as_deref() == Some("None") {
        return fail(
            "spec.clusterIP",
            "headless (None): nothing to program".into(),
        );
    }
    let annotation = |key: &str| {
        svc.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    };
    let internal_policy = match traffic_policy(spec.internal_traffic_policy.as_deref()) {
        Ok(p) => p,
        Err(reason) => return fail("spec.internalTrafficPolicy", reason),
    };
    let external_policy = match traffic_policy(spec.external_traffic_policy.as_deref()) {
        Ok(p) => p,
        Err(reason) => return fail("spec.externalTrafficPolicy", reason),
    };
    let affinity_timeout = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
            match u32::try_from(timeout) {
                Ok(t) if (1..=MAX_AFFINITY_TIMEOUT).contains(&t) => Some(t),
                _ => {
                    return fail(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{timeout} is not within 1-{MAX_AFFINITY_TIMEOUT}"),
                    );
                }
            }
        }
        Some(other) => return fail("spec.sessionAffinity", format!("unknown {other:?}")),
    };
    let topology_keys: Vec<String> = annotation(TOPOLOGY_KEYS_ANNOTATION)
        .map(|keys| keys.split(',').map(|k| k.trim().to_string()).collect())
        .unwrap_or_default();
    if let Err(reason) = check_topology_keys(&topology_keys, external_policy) {
        return fail("spec.topologyKeys", reason);
    }

    let health_check_node_port = match spec.health_check_node_port {
        Some(port)
            if kind == ServiceKind::LoadBalancer && external_policy == TrafficPolicy::Local =>
        {
            match port_number(port) {
                Some(port) => Some(port),
                None => {
                    return fail(
                        "spec.healthCheckNodePort",
                        format!("{port} is not a port (1-65535)"),
                    );
                }
            }
        }
        _ => None,
    };
    // An empty `clusterIPs` is none written: `clusterIP` says it, as before the field was.
    let cluster_ips = match spec.cluster_ips.as_ref().filter(|ips| !ips.is_empty()) {
        Some(ips) => one_per_family(
            ips,
            spec.ip_families.as_deref().unwrap_or_default(),
            &object,
            skipped,
        ),
        None => spec
            .cluster_ip
            .iter()
            .filter(|ip| !ip.is_empty())
            .filter_map(|ip| address(ip, "spec.clusterIP", &object, skipped))
            .collect(),
    };
    let given = spec.cluster_ips.as_ref().is_some_and(|ips| !ips.is_empty())
        || spec.cluster_ip.as_ref().is_some_and(|ip| !ip.is_empty());
    if given && cluster_ips.is_empty() {
        // kube-proxy's proxiers find no ClusterIP of their family: the Service is no one's.
        skipped.push(Skipped::new(
            &object,
            "spec.clusterIPs",
            "none of its addresses can be used: nothing to program",
        ));
        return None;
    }
    let external_ips = addresses(
        spec.external_ips.iter().flatten(),
        "spec.externalIPs",
        &object,
        skipped,
    );
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    // As kube-proxy does: only VIP-mode ingress IPs are the node's to serve; with ipMode
    // Proxy, traffic goes through the load balancer.
    let vip_ips: Vec<&String> = ingress
        .into_iter()
        .flatten()
        .filter(|i| i.ip_mode.as_deref().is_none_or(|m| m == "VIP"))
        .filter_map(|i| i.ip.as_ref())
        .collect();
    let load_balancer_ips = addresses(vip_ips, "status.loadBalancer.ingress", &object, skipped);
    let source_ranges = source_ranges(
        spec.load_balancer_source_ranges.iter().flatten(),
        &object,
        skipped,
    );
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
        created: svc
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second()),
        kind,
        cluster_ips,
        external_ips,
        load_balancer_ips,
        ports,
        algorithm: scheduler(&svc.metadata, &object, skipped),
        hash_port: hash_port(&svc.metadata, &object, skipped),
        internal_policy,
        external_policy,
        affinity_timeout,
        topology_keys,
        health_check_node_port,
        source_ranges,
    })
}

/// The scheduler the Service's annotations choose ([`SCHEDULER_ANNOTATION`], else
/// [`ALGORITHM_ANNOTATION`]). One that cannot be had is reported, and the node's default serves
/// the Service, as without an annotation (`None`).
fn scheduler(meta: &ObjectMeta, object: &str, skipped: &mut Vec<Skipped>) -> Option<Algorithm> {
    let annotations = meta.annotations.as_ref()?;
    let (key, name) = [SCHEDULER_ANNOTATION, ALGORITHM_ANNOTATION]
        .into_iter()
        .find_map(|key| Some((key, annotations.get(key)?)))?;
    Algorithm::from_name(name)
        .map_err(|reason| {
            let field = format!("metadata.annotations[{key}]");
            let reason = format!("{reason}; the node's default scheduler serves it");
            skipped.push(Skipped::new(object, field, reason));
        })
        .ok()
}

/// The schedulers whose hash the Service's [`SCHEDULER_FLAGS_ANNOTATION`] extends to the
/// client's port. A flag not offered is reported and left out; the others hold.
fn hash_port(meta: &ObjectMeta, object: &str, skipped: &mut Vec<Skipped>) -> Vec<Algorithm> {
    let Some(flags) = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(SCHEDULER_FLAGS_ANNOTATION))
    else {
        return Vec::new();
    };
    let mut hashed = Vec::new();
    for flag in flags.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        match flag {
            "sh-port" => hashed.push(Algorithm::SourceHash),
            "mh-port" => hashed.push(Algorithm::Maglev),
            other => {
                let reason = if other.ends_with("-fallback") {
                    format!(
                        "{other}: not offered, as no backend of a table is ever without weight \
                         (one that is not ready is not in it); left out"
                    )
                } else {
                    format!("{other}: no scheduler flag (sh-port, mh-port); left out")
                };
                let field = format!("metadata.annotations[{SCHEDULER_FLAGS_ANNOTATION}]");
                skipped.push(Skipped::new(object, field, reason));
            }
        }
    }
    hashed
}

/// `spec.loadBalancerSourceRanges`, each family's ranges. An entry that is no CIDR is reported
/// and allows nothing: a typo closes, never opens, so a family with only such entries (and
/// none of its own) allows no source at all.
fn source_ranges<'a>(
    list: impl IntoIterator<Item = &'a String>,
    object: &str,
    skipped: &mut Vec<Skipped>,
) -> SourceRanges {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    let mut invalid = false;
    for (i, entry) in list.into_iter().enumerate() {
        match cidr(entry) {
            Some(range) if range.address.is_ipv4() => v4.push(range),
            Some(range) => v6.push(range),
            None => {
                skipped.push(Skipped::new(
                    object,
                    format!("spec.loadBalancerSourceRanges[{i}]"),
                    format!("{entry:?} is not a CIDR: it allows no source"),
                ));
                invalid = true;
            }
        }
    }
    let family = |mut ranges: Vec<SourceRange>| {
        ranges.sort();
        ranges.dedup();
        (invalid || !ranges.is_empty()).then_some(ranges)
    };
    SourceRanges {
        v4: family(v4),
        v6: family(v6),
    }
}

/// A CIDR as kube-proxy reads one (`netutils.ParseCIDRSloppy`): an IPv4 octet may carry
/// leading zeros, read as decimal (`010.0.0.0/8` is 10.0.0.0/8).
fn cidr(entry: &str) -> Option<SourceRange> {
    let (address, len) = entry.trim().split_once('/')?;
    let len: u8 = len.parse().ok()?;
    if address.contains(':') {
        let address = address.parse::<std::net::Ipv6Addr>().ok()?;
        return (len <= 128).then(|| SourceRange::new(address, len));
    }
    let octets: Vec<u8> = address
        .split('.')
        .map(|octet| {
            let digits = !octet.is_empty() && octet.len() <= 3;
            digits
                .then(|| octet.bytes().all(|b| b.is_ascii_digit()))
                .filter(|&all| all)
                .and_then(|_| octet.parse::<u16>().ok())
                .and_then(|value| u8::try_from(value).ok())
        })
        .collect::<Option<_>>()?;
    let [a, b, c, d] = octets[..] else {
        return None;
    };
    (len <= 32).then(|| SourceRange::new(Ipv4Addr::new(a, b, c, d), len))
}

/// `spec.clusterIPs`: at most one address per family, each of the family `spec.ipFamilies`
/// names at its index (the API server keeps them so; a manifest may not). A second address of
/// a family, or one of another family than named, is reported and left out.
fn one_per_family(
    ips: &[String],
    families: &[String],
    object: &str,
    skipped: &mut Vec<Skipped>,
) -> Vec<IpAddr> {
    let mut kept: Vec<IpAddr> = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        // Indexed as written, an entry that is no address included.
        let Some(ip) = address(ip, &format!("spec.clusterIPs[{i}]"), object, skipped) else {
            continue;
        };
        let family = Family::of(ip);
        let named = families.get(i).map(String::as_str);
        let reason = if kept.iter().any(|k| Family::of(*k) == family) {
            Some(format!("{ip}: a second {family} address (one per family)"))
        } else if named.is_some_and(|n| n != family.to_string()) {
            Some(format!(
                "{ip} is {family}, where spec.ipFamilies[{i}] is {}",
                named.unwrap_or_default()
            ))
        } else {
            None
        };
        match reason {
            Some(reason) => skipped.push(Skipped::new(
                object,
                format!("spec.clusterIPs[{i}]"),
                reason,
            )),
            None => kept.push(ip),
        }
    }
    kept
}

/// The IP addresses of a list field; an entry that is none is reported and left out.
fn addresses<'a>(
    list: impl IntoIterator<Item = &'a String>,
    field: &str,
    object: &str,
    skipped: &mut Vec<Skipped>,
) -> Vec<IpAddr> {
    list.into_iter()
        .enumerate()
        .filter_map(|(i, ip)| address(ip, &format!("{field}[{i}]"), object, skipped))
        .collect()
}

/// An IP address field, of either family; anything else is reported.
fn address(ip: &str, field: &str, object: &str, skipped: &mut Vec<Skipped>) -> Option<IpAddr> {
    let parsed = ip.parse::<IpAddr>().ok();
    if parsed.is_none() {
        skipped.push(Skipped::new(
            object,
            field,
            format!("{ip:?} is not an IP address"),
        ));
    }
    parsed
}

fn traffic_policy(policy: Option<&str>) -> Result<TrafficPolicy, String> {
    match policy {
        None | Some("Cluster") => Ok(TrafficPolicy::Cluster),
        Some("Local") => Ok(TrafficPolicy::Local),
        Some(other) => Err(format!(
            "unknown policy {other:?}: expected Cluster or Local"
        )),
    }
}

/// The rules the API server applied to `topologyKeys` while it had them.
fn check_topology_keys(keys: &[String], external_policy: TrafficPolicy) -> Result<(), String> {
    if keys.is_empty() {
        return Ok(());
    }
    if external_policy == TrafficPolicy::Local {
        return Err("may not be combined with externalTrafficPolicy: Local".into());
    }
    if keys.len() > MAX_TOPOLOGY_KEYS {
        return Err(format!("{} keys: at most {MAX_TOPOLOGY_KEYS}", keys.len()));
    }
    for (i, key) in keys.iter().enumerate() {
        if key == "*" {
            if i + 1 != keys.len() {
                return Err("\"*\" must be the last key".into());
            }
        } else if !is_label_key(key) {
            return Err(format!("{key:?} is not a valid label key"));
        }
        if keys[..i].contains(key) {
            return Err(format!("{key:?} is listed twice"));
        }
    }
    Ok(())
}

/// A qualified name: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// alphanumerics, `-`, `_` and `.`, starting and ending with an alphanumeric.
fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let name_ok = (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let prefix_ok = prefix.is_none_or(|p| {
        (1..=253).contains(&p.len())
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part.len() <= 63
                    && part.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && part.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    name_ok && prefix_ok
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
    let node_port = match port.node_port {
        None | Some(0) => None,
        Some(n) => match port_number(n) {
            Some(n) => Some(n),
            None => return fail("nodePort", format!("{n} is not a port (1-65535)")),
        },
    };
    Some(ServicePort {
        name: port.name.clone().unwrap_or_default(),
        port: number,
        protocol,
        target_port,
        node_port,
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
    let family_of_slice = match slice.address_type.as_str() {
        "IPv4" => Family::V4,
        "IPv6" => Family::V6,
        // No proxy balances over names.
        _ => return None,
    };
    if label(&slice.metadata, HEADLESS_LABEL).is_some() {
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
        // As kube-proxy's endpointslicecache ("ignoring invalid endpoint port"): a port
        // without a number gives its Service port no endpoints from this slice.
        let Some(number) = port.port.and_then(port_number) else {
            let reason = match port.port {
                None => "no port number: this slice gives the port no endpoints".to_string(),
                Some(n) => format!("{n} is not a port (1-65535)"),
            };
            skipped.push(Skipped::new(&object, format!("{field}.port"), reason));
            continue;
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
        let Some(address) = address
            .parse::<IpAddr>()
            .ok()
            .filter(|ip| Family::of(*ip) == family_of_slice)
        else {
            skipped.push(Skipped::new(
                &object,
                format!("endpoints[{i}].addresses[0]"),
                format!("{address:?} is not an {family_of_slice} address"),
            ));
            continue;
        };
        let conditions = endpoint.conditions.clone().unwrap_or_default();
        // kube-proxy's reading: unknown readiness and serving count as true.
        endpoints.push(Endpoint {
            address,
            ready: conditions.ready.unwrap_or(true),
            serving: conditions.serving.unwrap_or(true),
            terminating: conditions.terminating.unwrap_or(false),
            node: endpoint.node_name.clone(),
            zone: endpoint.zone.clone(),
            zone_hints: endpoint
                .hints
                .iter()
                .flat_map(|h| h.for_zones.iter().flatten())
                .map(|z| z.name.clone())
                .collect(),
            node_hints: endpoint
                .hints
                .iter()
                .flat_map(|h| h.for_nodes.iter().flatten())
                .map(|n| n.name.clone())
                .collect(),
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
                    port: number,
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
                match address.ip.parse::<IpAddr>() {
                    Ok(ip) => members.push(Endpoint {
                        address: ip,
                        ready,
                        serving: ready,
                        terminating: false,
                        node: address.node_name.clone(),
                        zone: None,
                        zone_hints: Vec::new(),
                        node_hints: Vec::new(),
                    }),
                    Err(_) => skipped.push(Skipped::new(
                        &object,
                        format!("subsets[{s}].{list_name}[{a}].ip"),
                        format!("{:?} is not an IP address", address.ip),
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

fn node(node: &core::Node, skipped: &mut Vec<Skipped>) -> Node {
    let object = format!("Node {}", name(&node.metadata));
    let mut addresses = Vec::new();
    let listed = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten());
    for (i, address) in listed.enumerate() {
        if address.type_ != "InternalIP" && address.type_ != "ExternalIP" {
            continue;
        }
        match address.address.parse::<IpAddr>() {
            Ok(ip) => addresses.push(ip),
            Err(_) => skipped.push(Skipped::new(
                &object,
                format!("status.addresses[{i}].address"),
                format!("{:?} is not an IP address", address.address),
            )),
        }
    }
    Node {
        name: name(&node.metadata),
        labels: node.metadata.labels.clone().unwrap_or_default(),
        addresses,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(json: serde_json::Value) -> Arc<core::Node> {
        Arc::new(serde_json::from_value(json).expect("a Node"))
    }

    #[test]
    fn the_scheduler_annotations_choose_by_ipvs_s_names_and_fall_back_to_the_node_s() {
        // (annotations, scheduler, field reported): `None` is the node's default.
        type Case = (
            &'static [(&'static str, &'static str)],
            Option<Algorithm>,
            Option<&'static str>,
        );
        let cases: [Case; 14] = [
            (&[], None, None),
            (
                &[(SCHEDULER_ANNOTATION, "rr")],
                Some(Algorithm::RoundRobin),
                None,
            ),
            (
                &[(SCHEDULER_ANNOTATION, "sh")],
                Some(Algorithm::SourceHash),
                None,
            ),
            (
                &[(ALGORITHM_ANNOTATION, "source-hash")],
                Some(Algorithm::SourceHash),
                None,
            ),
            (
                &[(ALGORITHM_ANNOTATION, "sh")],
                Some(Algorithm::SourceHash),
                None,
            ),
            // The new annotation first.
            (
                &[
                    (SCHEDULER_ANNOTATION, "rr"),
                    (ALGORITHM_ANNOTATION, "source-hash"),
                ],
                Some(Algorithm::RoundRobin),
                None,
            ),
            (
                &[(SCHEDULER_ANNOTATION, "random")],
                None,
                Some("metadata.annotations[lb.ebpf.io/scheduler]"),
            ),
            (
                &[(SCHEDULER_ANNOTATION, "dh")],
                None,
                Some("metadata.annotations[lb.ebpf.io/scheduler]"),
            ),
            (
                &[(SCHEDULER_ANNOTATION, "mh")],
                Some(Algorithm::Maglev),
                None,
            ),
            (
                &[(ALGORITHM_ANNOTATION, "maglev")],
                Some(Algorithm::Maglev),
                None,
            ),
            (
                &[(ALGORITHM_ANNOTATION, "lc")],
                Some(Algorithm::LeastConnection),
                None,
            ),
            (
                &[(SCHEDULER_ANNOTATION, "sed")],
                Some(Algorithm::ShortestExpectedDelay),
                None,
            ),
            (
                &[(SCHEDULER_ANNOTATION, "nq")],
                Some(Algorithm::NeverQueue),
                None,
            ),
            (
                &[(ALGORITHM_ANNOTATION, "wlc")],
                None,
                Some("metadata.annotations[lb.ebpf.io/algorithm]"),
            ),
        ];
        for (annotations, wanted, reported) in cases {
            let meta = ObjectMeta {
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            };
            let mut skipped = Vec::new();
            let got = scheduler(&meta, "Service ns/svc", &mut skipped);
            assert_eq!(got, wanted, "{annotations:?}");
            let fields: Vec<&str> = skipped.iter().map(|s| s.field.as_str()).collect();
            assert_eq!(
                fields,
                Vec::from_iter(reported),
                "{annotations:?}: {skipped:?}"
            );
            assert!(
                skipped
                    .iter()
                    .all(|s| s.reason.ends_with("the node's default scheduler serves it")),
                "{skipped:?}"
            );
        }
    }

    #[test]
    fn scheduler_flags_put_the_port_in_the_hash_by_ipvs_s_names_and_report_the_others() {
        // (flags, schedulers hashing the port, flags reported)
        let cases: [(&str, &[Algorithm], usize); 6] = [
            ("", &[], 0),
            ("mh-port", &[Algorithm::Maglev], 0),
            ("sh-port", &[Algorithm::SourceHash], 0),
            (
                "mh-port, sh-port",
                &[Algorithm::Maglev, Algorithm::SourceHash],
                0,
            ),
            ("mh-fallback,mh-port", &[Algorithm::Maglev], 1),
            ("port", &[], 1),
        ];
        for (flags, wanted, reported) in cases {
            let meta = ObjectMeta {
                annotations: Some(
                    [(SCHEDULER_FLAGS_ANNOTATION.to_string(), flags.to_string())].into(),
                ),
                ..ObjectMeta::default()
            };
            let mut skipped = Vec::new();
            assert_eq!(
                hash_port(&meta, "Service ns/svc", &mut skipped),
                wanted,
                "{flags}"
            );
            assert_eq!(skipped.len(), reported, "{flags}: {skipped:?}");
            assert!(
                skipped.iter().all(|s| s.object == "Service ns/svc"
                    && s.field == "metadata.annotations[lb.ebpf.io/scheduler-flags]"),
                "{skipped:?}"
            );
        }
    }

    #[test]
    fn cluster_ips_are_one_per_family_as_ip_families_names_them() {
        // (clusterIPs, ipFamilies, kept, reported indexes)
        type Case = (
            &'static [&'static str],
            &'static [&'static str],
            &'static [&'static str],
            &'static [usize],
        );
        let cases: [Case; 6] = [
            (
                &["10.96.0.1", "fd00::1"],
                &["IPv4", "IPv6"],
                &["10.96.0.1", "fd00::1"],
                &[],
            ),
            (
                &["fd00::1", "10.96.0.1"],
                &["IPv6", "IPv4"],
                &["fd00::1", "10.96.0.1"],
                &[],
            ),
            (
                &["10.96.0.1", "fd00::1"],
                &[],
                &["10.96.0.1", "fd00::1"],
                &[],
            ),
            (&["10.96.0.1", "10.96.0.2"], &[], &["10.96.0.1"], &[1]),
            (&["10.96.0.1", "fd00::1"], &["IPv6", "IPv4"], &[], &[0, 1]),
            // An entry that is no address keeps its index for the ones after it.
            (&["bogus", "fd00::1"], &["IPv4", "IPv6"], &["fd00::1"], &[0]),
        ];
        for (ips, families, kept, reported) in cases {
            let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
            let families: Vec<String> = families.iter().map(ToString::to_string).collect();
            let mut skipped = Vec::new();
            let got = one_per_family(&ips, &families, "Service ns/svc", &mut skipped);
            let kept: Vec<IpAddr> = kept.iter().map(|ip| ip.parse().unwrap()).collect();
            assert_eq!(got, kept, "{ips:?} {families:?}");
            let fields: Vec<String> = reported
                .iter()
                .map(|i| format!("spec.clusterIPs[{i}]"))
                .collect();
            let seen: Vec<String> = skipped.iter().map(|s| s.field.clone()).collect();
            assert_eq!(seen, fields, "{ips:?} {families:?}: {skipped:?}");
        }
    }

    #[test]
    fn a_slice_s_endpoints_are_of_its_address_type_and_fqdn_slices_are_none_of_ours() {
        let slice = |address_type: &str, address: &str| {
            let json = serde_json::json!({
                "metadata": {"name": "s", "namespace": "ns",
                             "labels": {"kubernetes.io/service-name": "svc"}},
                "addressType": address_type,
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": [address]}],
            });
            let slice: discovery::EndpointSlice = serde_json::from_value(json).unwrap();
            let mut skipped = Vec::new();
            let converted = endpoint_slice(&slice, &mut skipped);
            (
                converted.map(|s| {
                    s.endpoints
                        .iter()
                        .map(|e| e.address.to_string())
                        .collect::<Vec<_>>()
                }),
                skipped.len(),
            )
        };
        // (addressType, address, endpoints, reported)
        let cases: [(&str, &str, Option<&[&str]>, usize); 5] = [
            ("IPv4", "10.244.0.1", Some(&["10.244.0.1"]), 0),
            ("IPv6", "fd00::1", Some(&["fd00::1"]), 0),
            // An address of the other family than the slice's: reported, left out.
            ("IPv4", "fd00::1", Some(&[]), 1),
            ("IPv6", "10.244.0.1", Some(&[]), 1),
            ("FQDN", "pod.example", None, 0),
        ];
        for (address_type, address, endpoints, reported) in cases {
            let wanted = endpoints.map(|e| e.iter().map(ToString::to_string).collect::<Vec<_>>());
            assert_eq!(
                slice(address_type, address),
                (wanted, reported),
                "{address_type} {address}"
            );
        }
    }

    #[test]
    fn source_ranges_keep_each_family_s_cidrs_and_close_both_on_invalid_ones() {
        let range = |a, b, c, d, len| SourceRange::new(Ipv4Addr::new(a, b, c, d), len);
        let v6_range = |address: &str, len| {
            SourceRange::new(address.parse::<std::net::Ipv6Addr>().unwrap(), len)
        };
        // (the field, the IPv4 ranges, the IPv6 ranges, how many entries are reported)
        type Ranges = Option<Vec<SourceRange>>;
        type Case = (&'static [&'static str], Ranges, Ranges, usize);
        let v6_doc = || Some(vec![v6_range("2001:db8::", 32)]);
        let cases: [Case; 11] = [
            (&[], None, None, 0),
            (&["2001:db8::1/32"], None, v6_doc(), 0),
            (
                &["2001:db8::/32", "10.0.0.0/8"],
                Some(vec![range(10, 0, 0, 0, 8)]),
                v6_doc(),
                0,
            ),
            // A typo closes both families.
            (&["2001:db8::/32", "bad"], Some(vec![]), v6_doc(), 1),
            (&["2001:db8::/129"], Some(vec![]), Some(vec![]), 1),
            (&["10.1.2.3/8"], Some(vec![range(10, 0, 0, 0, 8)]), None, 0),
            (
                &[" 10.0.0.0/8 ", "10.0.0.0/8", "192.0.2.7/32"],
                Some(vec![range(10, 0, 0, 0, 8), range(192, 0, 2, 7, 32)]),
                None,
                0,
            ),
            (&["0.0.0.0/0"], Some(vec![range(0, 0, 0, 0, 0)]), None, 0),
            // Leading zeros, as Go's sloppy parser reads them.
            (
                &["010.001.0.0/16"],
                Some(vec![range(10, 1, 0, 0, 16)]),
                None,
                0,
            ),
            (
                &["10.0.0.256/32", "10.0.0/8", "1.2.3.4/-1"],
                Some(vec![]),
                Some(vec![]),
                3,
            ),
            (
                &["10.0.0.0/33", "10.0.0.1", "web"],
                Some(vec![]),
                Some(vec![]),
                3,
            ),
        ];
        for (field, v4, v6, reported) in cases {
            let list: Vec<String> = field.iter().map(ToString::to_string).collect();
            let mut skipped = Vec::new();
            let ranges = source_ranges(&list, "Service ns/lb", &mut skipped);
            assert_eq!(ranges, SourceRanges { v4, v6 }, "{field:?}");
            assert_eq!(skipped.len(), reported, "{field:?}: {skipped:?}");
            assert!(
                skipped
                    .iter()
                    .all(|s| s.field.starts_with("spec.loadBalancerSourceRanges[")),
                "{skipped:?}"
            );
        }
    }

    #[test]
    fn a_node_being_deleted_or_marked_by_the_autoscaler_is_not_eligible() {
        let taint = |key: &str| {
            serde_json::json!({"metadata": {"name": "n1"},
                "spec": {"taints": [{"key": key, "effect": "NoSchedule"}]}})
        };
        // (what, the Nodes, eligible)
        let cases = [
            ("not seen yet", vec![], true),
            (
                "plain",
                vec![node(serde_json::json!({"metadata": {"name": "n1"}}))],
                true,
            ),
            (
                "being deleted",
                vec![node(serde_json::json!({"metadata": {"name": "n1",
                    "deletionTimestamp": "2026-12-01T00:00:00Z"}}))],
                false,
            ),
            (
                "marked by the autoscaler",
                vec![node(taint(TO_BE_DELETED_TAINT))],
                false,
            ),
            ("another taint", vec![node(taint("dedicated"))], true),
            (
                "another Node marked",
                vec![node(serde_json::json!({"metadata": {"name": "n2",
                    "deletionTimestamp": "2026-12-01T00:00:00Z"}}))],
                true,
            ),
        ];
        for (what, nodes, eligible) in cases {
            assert_eq!(node_eligible(&nodes, "n1"), eligible, "{what}");
        }
    }
}
