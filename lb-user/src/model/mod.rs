//! The model: plain structs for what the cluster says, and the pure computation of what this
//! node programs. No I/O here: sources fill [`Objects`], each Service's objects are validated
//! into a [`Cluster`] and turned into the [`Frontend`]s it claims, the claims are settled
//! between Services, the plan turns the frontends into map entries. [`Memo`] keeps each
//! Service's part between syncs.

mod convert;
mod frontends;
mod health;
mod memo;
mod store;
mod topology;

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr},
    ops::RangeInclusive,
    sync::Arc,
};

pub use convert::{HEADLESS_LABEL, Objects, node_eligible};
pub use frontends::{first_v4, first_v6};
pub use memo::{FrontendChange, Memo};
use serde::Serialize;
pub use store::{Change, Changed, Object, ServiceKey, Store};

/// The annotation that chooses a Service's scheduler, by IPVS's name ([`Algorithm::from_name`]);
/// without it, the node's default serves the Service (`--scheduler`).
pub const SCHEDULER_ANNOTATION: &str = "lb.ebpf.io/scheduler";
/// The annotation that gives a Service's scheduler IPVS's flags, comma-separated: `sh-port` and
/// `mh-port` hash the client's port with its address under `sh` and `mh`; a flag of a
/// scheduler the Service does not use is without effect, as in IPVS.
pub const SCHEDULER_FLAGS_ANNOTATION: &str = "lb.ebpf.io/scheduler-flags";
/// The annotation that chose it first (`round-robin`, `source-hash`): still read, after
/// [`SCHEDULER_ANNOTATION`].
pub const ALGORITHM_ANNOTATION: &str = "lb.ebpf.io/algorithm";
/// The annotation that carries `topologyKeys` (comma-separated) for clusters whose API dropped
/// `spec.topologyKeys`; the manifest source copies that field here.
pub const TOPOLOGY_KEYS_ANNOTATION: &str = "lb.ebpf.io/topology-keys";
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// Kubernetes' default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: RangeInclusive<u16> = 30000..=32767;
/// Cilium's default Maglev table size, which suits up to about 160 backends.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 16_381;

/// Services and their EndpointSlices, validated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cluster {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp`, in seconds since the Unix epoch: of two Services claiming
    /// one frontend, the older keeps it.
    pub created: Option<i64>,
    pub kind: ServiceKind,
    /// `spec.clusterIPs`: one per family, the first the primary (`spec.ipFamilies` order).
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` of the VIP kind.
    pub load_balancer_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// The scheduler its annotation chose; `None`: the node's default ([`NodeConfig::scheduler`]).
    pub algorithm: Option<Algorithm>,
    /// The schedulers that hash the client's port too ([`SCHEDULER_FLAGS_ANNOTATION`]):
    /// [`Algorithm::SourceHash`], [`Algorithm::Maglev`].
    pub hash_port: Vec<Algorithm>,
    pub internal_policy: TrafficPolicy,
    pub external_policy: TrafficPolicy,
    /// `sessionAffinity: ClientIP`, with its timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// The ordered `topologyKeys`; `*` may only be last.
    pub topology_keys: Vec<String>,
    /// `spec.healthCheckNodePort`, of a LoadBalancer Service with `externalTrafficPolicy:
    /// Local` only: where this node tells cloud load balancers whether it has endpoints.
    pub health_check_node_port: Option<u16>,
    /// `spec.loadBalancerSourceRanges`: the only sources its load-balancer IPs take, each
    /// family's.
    pub source_ranges: SourceRanges,
}

/// A Service's `spec.loadBalancerSourceRanges` as kube-proxy's proxier of each family reads
/// them: each family's own. `None`: every source of that family (no ranges, or the other
/// family's only); an empty list: none at all (no range of the family, and an entry that is
/// no CIDR: closed, not open).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceRanges {
    pub v4: Option<Vec<SourceRange>>,
    pub v6: Option<Vec<SourceRange>>,
}

impl SourceRanges {
    pub fn of(&self, family: Family) -> Option<&Vec<SourceRange>> {
        match family {
            Family::V4 => self.v4.as_ref(),
            Family::V6 => self.v6.as_ref(),
        }
    }
}

/// An IP family. kube-proxy runs one proxier per family over the same objects: a Service's
/// frontends of a family are its addresses of that family, over endpoints of that family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// `address:port/protocol`, an IPv6 address in brackets.
pub fn endpoint_name(address: IpAddr, port: u16, protocol: Protocol) -> String {
    format!("{}/{protocol}", std::net::SocketAddr::new(address, port))
}

/// A range of addresses of either family, its host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SourceRange {
    pub address: IpAddr,
    pub prefix_len: u8,
}

impl SourceRange {
    /// The range of the first `prefix_len` bits of `address` (at most all of them).
    pub fn new(address: impl Into<IpAddr>, prefix_len: u8) -> Self {
        match address.into() {
            IpAddr::V4(v4) => {
                let prefix_len = prefix_len.min(32);
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(prefix_len))
                    .unwrap_or(0);
                Self {
                    address: Ipv4Addr::from(u32::from(v4) & mask).into(),
                    prefix_len,
                }
            }
            IpAddr::V6(v6) => {
                let prefix_len = prefix_len.min(128);
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(prefix_len))
                    .unwrap_or(0);
                Self {
                    address: std::net::Ipv6Addr::from(u128::from(v6) & mask).into(),
                    prefix_len,
                }
            }
        }
    }

    /// Whether `ip` is in the range: of its family, its leading bits the range's.
    pub fn contains(&self, ip: IpAddr) -> bool {
        Self::new(ip, self.prefix_len) == *self
    }
}

impl fmt::Display for SourceRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

impl Serialize for SourceRange {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    ClusterIP,
    NodePort,
    LoadBalancer,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServicePort {
    /// May be empty when the Service has one port.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub target_port: TargetPort,
    pub node_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    #[default]
    RoundRobin,
    SourceHash,
    /// Maglev consistent hashing of the client's address (IPVS's `mh`).
    Maglev,
    /// The backend with the fewest active flows, then inactive ones (IPVS's `lc`).
    LeastConnection,
    /// The backend with the fewest active flows (IPVS's `sed`, every weight 1).
    ShortestExpectedDelay,
    /// A backend with no active flow, else as [`Self::ShortestExpectedDelay`] (IPVS's `nq`).
    NeverQueue,
}

/// One EndpointSlice, or the slice the mirroring controller would make of an Endpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    /// The Service it belongs to (label `kubernetes.io/service-name`).
    pub service: String,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

impl EndpointSlice {
    /// The slice's port for `port`: the EndpointSlice controller names each after its Service
    /// port (and has already resolved a named targetPort to the pods' number).
    pub fn port_for(&self, port: &ServicePort) -> Option<&EndpointPort> {
        self.ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct EndpointPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub address: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
    pub zone: Option<String>,
    /// `hints.forZones`; empty when the endpoint has none.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes`; empty when the endpoint has none.
    pub node_hints: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Node {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// InternalIP and ExternalIP addresses.
    pub addresses: Vec<IpAddr>,
}

/// The node the agent programs, as configured.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeConfig {
    pub name: String,
    /// Where NodePorts listen (`--node-ip`); empty: the Node's InternalIP and ExternalIP.
    pub addresses: Vec<IpAddr>,
    pub node_port_range: RangeInclusive<u16>,
    /// The scheduler of the Services whose annotation chooses none (`--scheduler`).
    pub scheduler: Algorithm,
    /// The positions of a Maglev table, a prime (`--maglev-table-size`): the same on every node.
    pub maglev_table_size: u32,
}

impl NodeConfig {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            addresses: Vec::new(),
            node_port_range: DEFAULT_NODE_PORT_RANGE,
            scheduler: Algorithm::default(),
            maglev_table_size: DEFAULT_MAGLEV_TABLE_SIZE,
        }
    }
}

/// What one frontend of this node balances over.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Frontend {
    /// `namespace/name`.
    pub service: String,
    /// The Service's [`Service::created`]: the claim's age.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<i64>,
    pub port_name: String,
    pub kind: FrontendKind,
    pub scope: Scope,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub algorithm: Algorithm,
    /// The Maglev table's size, for a frontend balanced by [`Algorithm::Maglev`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maglev_table_size: Option<u32>,
    /// Source hash or Maglev hashes the client's port with its address (`sh-port`, `mh-port`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub hash_port: bool,
    /// `sessionAffinity: ClientIP` timeout, in seconds.
    pub affinity_timeout: Option<u32>,
    /// What a new flow meets when there is no backend.
    pub when_empty: WhenEmpty,
    /// The rule that chose the backends.
    pub rule: String,
    /// Where new flows go.
    pub backends: Vec<Backend>,
    /// UDP only: the port's other serving endpoints (terminating, or outside the topology's
    /// choice). They take no new flow, but their flows stay: kube-proxy flushes only the UDP
    /// conntrack entries of endpoints that stopped serving. TCP flows stay on their backend
    /// whatever becomes of it, so a TCP frontend needs none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retained: Vec<Backend>,
    /// A load-balancer IP's `loadBalancerSourceRanges`, with its Service's load-balancer IPs
    /// when a range holds the node (kube-proxy's "allow from node"): the only sources it
    /// takes. `None`: every source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_ranges: Option<Vec<SourceRange>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum FrontendKind {
    ClusterIP,
    NodePort,
    ExternalIP,
    LoadBalancer,
}

/// Where the traffic comes from: a frontend can balance differently for each (an
/// `externalTrafficPolicy: Local` Service sends outside clients to local endpoints only, but
/// its own pods to all).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// From outside the node: the uplink.
    External,
    /// From the node's pods and the node itself.
    Internal,
}

/// As kube-proxy does: a Service with no endpoint at all rejects (ICMP port unreachable or
/// TCP reset); one whose endpoints are all elsewhere under a Local policy drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenEmpty {
    Reject,
    Drop,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Backend {
    pub address: IpAddr,
    pub port: u16,
    pub node: Option<String>,
    pub zone: Option<String>,
}

/// An object, or part of one, that was left out, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Skipped {
    /// `Kind namespace/name`, or where in a file for what could not be parsed at all.
    pub object: String,
    /// The field at fault, as a path (`spec.ports[1].port`); empty when it is the whole object.
    pub field: String,
    pub reason: String,
}

impl Skipped {
    pub fn new(
        object: impl Into<String>,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            object: object.into(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl ServicePort {
    /// How a [`Skipped`] names this port: by name, or by number for an unnamed one.
    pub fn field(&self) -> String {
        port_field(&self.name, self.port, self.protocol)
    }
}

/// `spec.ports[http]`, or `spec.ports[53/UDP]` for an unnamed port.
pub fn port_field(name: &str, port: u16, protocol: Protocol) -> String {
    if name.is_empty() {
        format!("spec.ports[{port}/{protocol}]")
    } else {
        format!("spec.ports[{name}]")
    }
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.object, self.reason)
        } else {
            write!(f, "{} {}: {}", self.object, self.field, self.reason)
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

impl Algorithm {
    /// IPVS's name of the scheduler, as `ipvsadm` shows it.
    pub fn ipvs_name(self) -> &'static str {
        match self {
            Self::RoundRobin => "rr",
            Self::SourceHash => "sh",
            Self::Maglev => "mh",
            Self::LeastConnection => "lc",
            Self::ShortestExpectedDelay => "sed",
            Self::NeverQueue => "nq",
        }
    }

    /// The scheduler `name` chooses: IPVS's names (`rr`, `sh`, `mh`, `lc`, `sed`, `nq`), and
    /// this project's ([`Display`](fmt::Display)'s). IPVS's `dh` is refused, with why.
    pub fn from_name(name: &str) -> Result<Self, String> {
        match name {
            "rr" | "round-robin" => Ok(Self::RoundRobin),
            "sh" | "source-hash" => Ok(Self::SourceHash),
            "mh" | "maglev" => Ok(Self::Maglev),
            "lc" | "least-connection" => Ok(Self::LeastConnection),
            "sed" | "shortest-expected-delay" => Ok(Self::ShortestExpectedDelay),
            "nq" | "never-queue" => Ok(Self::NeverQueue),
            "dh" => Err(
                "scheduler \"dh\" (destination hash) would send every client of a \
                         frontend to one backend: not offered"
                    .into(),
            ),
            other => Err(format!(
                "unknown scheduler {other:?}: expected rr, sh, mh, lc, sed or nq (IPVS's \
                 names; round-robin, source-hash, maglev, least-connection, \
                 shortest-expected-delay and never-queue as well)"
            )),
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::RoundRobin => "round-robin",
            Self::SourceHash => "source-hash",
            Self::Maglev => "maglev",
            Self::LeastConnection => "least-connection",
            Self::ShortestExpectedDelay => "shortest-expected-delay",
            Self::NeverQueue => "never-queue",
        })
    }
}

/// A frontend claimed by a Service that another, older Service holds: the newcomer's claim is
/// left out, so that no Service can take a live frontend from another by appearing.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct LostClaim {
    /// `address:port/PROTOCOL`.
    pub frontend: String,
    /// `namespace/name` of the Service whose claim lost.
    pub service: String,
    /// `namespace/name` of the Service that holds it.
    pub holder: String,
}

/// What this node should program.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// Sorted by address, port, protocol and scope.
    pub frontends: Vec<Arc<Frontend>>,
    /// Everything left out on the way, and why.
    pub skipped: Vec<Skipped>,
    /// The claims that lost to an older Service's (also in `skipped`), sorted.
    pub lost_claims: Vec<LostClaim>,
    /// The node's addresses: where NodePorts listen; the first IPv4 one is the SNAT address.
    pub node_addresses: Vec<IpAddr>,
    /// The health checks this node serves for cloud load balancers, sorted by Service.
    pub health_checks: Vec<HealthCheck>,
}

/// A Service's `healthCheckNodePort` on this node, as kube-proxy's `pkg/proxy/healthcheck`
/// serves it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Served on the node's addresses of this family, counting its endpoints of it.
    pub family: Family,
    pub port: u16,
    /// This node's ready endpoints, summed over the Service's ports, as kube-proxy counts
    /// them: terminating ones are not ready, so that the cloud drains the node.
    pub local_endpoints: u32,
}

/// What `objects` define for `node`.
pub fn compute(objects: &Objects, node: &NodeConfig) -> Desired {
    let mut store = Store::default();
    store.replace(objects);
    let mut memo = Memo::default();
    memo.update(&mut store, node);
    memo.desired()
}
