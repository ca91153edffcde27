//! The datapath as data, as Katran's test fixtures are: the real eBPF object loaded into this
//! kernel (attached nowhere), its maps programmed through the agent's own plan, and for each
//! row a crafted packet run through a program with `BPF_PROG_TEST_RUN`, the verdict it must
//! return, the packet it must leave (byte for byte, checksums included) and the counter it must
//! move by one, or none. Rows run in order over one datapath: a flow's later packets follow
//! its first. A tc row whose packet goes on runs as a NIC's `CHECKSUM_COMPLETE` skb, whose
//! sum the kernel checks after the run. Root only: run through `cargo xtask test`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _},
    sync::Arc,
};

use aya::{
    maps::{HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuValues},
    programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult},
};
use lb_common::{
    addr::{ipv4_be, ipv6_be},
    maps::{
        BACKEND_LOADS, BACKENDS, Backend, BackendLoad, CURSORS, Config, FLOWS, FRAGMENTS,
        FRONTENDS, Flow, FlowKey, FragmentKey, FragmentPorts, Frontend, FrontendKey,
        HELD_FRAGMENT_BYTES, HELD_FRAGMENTS, HELD_PER_DATAGRAM, HeldFragment, HeldKey, PROTO_TCP,
        PROTO_UDP, REJECT_TOKENS, REPLIES, RejectTokens, Reply, SCOPE_EXTERNAL, SCOPE_INTERNAL,
        SOURCE_RANGES, SourceRange, SourceRangeKey, Stats, VIPS, Vip,
    },
};
use lb_tests::{
    // Each IPv4 address's IPv6 twin, the lab's: 10.96.0.10 is `fd00::10:96:0:10`.
    ipv6_twin as v6,
    packet::{
        ICMP_FRAGMENTATION_NEEDED, ICMP_PORT_UNREACHABLE, ICMP_TIME_EXCEEDED, ICMP_UNREACHABLE,
        ICMPV6_DEST_UNREACHABLE, ICMPV6_PACKET_TOO_BIG, ICMPV6_PORT_UNREACHABLE,
        ICMPV6_TIME_EXCEEDED, IPV6_DEST_OPTIONS, IPV6_HOP_BY_HOP, TCP_ACK, TCP_RST, TCP_SYN, UDP,
        addr, addr6, checksum, checksum6_valid, checksums_valid, datagram, datagram6,
        fill_ip_checksum, fragments, fragments6, icmp_error, icmp6_error, packet, packet6,
        packet6_through, port,
    },
};
use lb_user::{
    datapath::{self, Datapath, TC_ACT_OK, XDP_PASS},
    maps::{BackendLoads, MapWrites as _},
    model::{self, Algorithm, FrontendKind, Protocol, Scope, WhenEmpty},
    plan::{self, MapEntries},
};

const TC_ACT_SHOT: u32 = 2;
const XDP_DROP: u32 = 1;
const XDP_TX: u32 = 3;
const TC_ACT_REDIRECT: u32 = 7;
const NODE: &str = "packets-node";
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
/// A ClusterIP whose Service has no endpoint: new flows are rejected.
const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const LOAD_BALANCER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const WEB: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
const DNS: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 12);
const NOWHERE: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
/// A load-balancer IP whose backend runs on another node: flows from outside are SNATed.
const REMOTE_LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 5, 11);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// The node's address, that SNATed flows leave with, and its one SNAT port: a range of one
/// makes the port a row can name.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// Three Services over the same two backends: round robin, round robin with ClientIP
/// affinity, source hash.
const PAIR_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const STICKY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 31);
const HASHED_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 32);
/// A fourth, balanced by Maglev over a small table.
const MAGLEV_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 33);
const MAGLEV_TABLE_SIZE: u32 = 17;
/// Three more, by the backends' counted flows: least connection, shortest expected delay, and
/// never queue (below).
const LEAST_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 34);
const SED_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 35);
/// A never-queue Service's load-balancer IP, balanced from outside (by XDP), whose slots list
/// [`PAIR`] the other way round: its table may follow the sed frontend's, and then a sed scan
/// that failed to wrap would read a busy backend there, not the idle one it wants.
const NEVER_QUEUE_LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 36);
/// The sticky Service's load-balancer IP, whose slots list [`PAIR`] the other way round.
const STICKY_LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 31);
const PAIR: [(Ipv4Addr, u16); 2] = [
    (Ipv4Addr::new(10, 244, 0, 21), 8080),
    (Ipv4Addr::new(10, 244, 0, 22), 8080),
];
/// A ClusterIP whose Service drops when it has no endpoint (internalTrafficPolicy Local,
/// none on this node).
const LOCAL_ONLY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
/// Source hash gives it the other backend of [`PAIR`] than [`CLIENT`]'s.
const ANOTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 7);
const SNAT_PORT: u16 = 61_000;
/// A NodePort on [`NODE_IP`] whose backend, [`REMOTE`]'s port 8443, runs on another node.
const NODE_PORT: u16 = 30_080;
/// Routers on the way, which send ICMP errors: toward the pods, and outside the node.
const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
/// A load-balancer IP whose Service takes only [`OUTSIDE`]'s range.
const RANGED_LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 40);
const OUTSIDE_RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 51, 100, 0), 24);

/// Which program a row's packet goes through.
#[derive(Clone, Copy, Debug)]
enum Hook {
    /// Pod-facing ingress: balancing of traffic from the cluster.
    TcIngress,
    /// Egress: reverse NAT of replies.
    TcEgress,
    /// Uplink: balancing of traffic from outside.
    Xdp,
    /// Uplink ingress, after XDP: the IP fragments XDP passes.
    TcUplink,
    /// `lo`, egress: the node's own ICMP errors about SNATed flows.
    TcLoopback,
}

/// The packet a row's program must leave.
enum Out {
    /// Byte for byte.
    Packet(Vec<u8>),
    /// The input, untouched.
    Unchanged,
    /// Checked by a function: answers built in place (a reset) whose every byte is not the
    /// row's to fix.
    Check(fn(&[u8]) -> Result<(), String>),
}

/// Every counter of [`Stats`], by name: a field added to it must be named here.
fn counters(stats: &Stats) -> [(&'static str, u64); 16] {
    let Stats {
        forwarded,
        replied,
        new_flows,
        reselected,
        dropped_no_backend,
        rejected_no_backend,
        dropped_error,
        snat_flows,
        dropped_no_snat,
        dropped_unknown_port,
        socket_rewrites,
        rejects_limited,
        dropped_source_range,
        icmp_translated,
        fragments_unmatched,
        fragments_held,
    } = *stats;
    [
        ("forwarded", forwarded),
        ("replied", replied),
        ("new_flows", new_flows),
        ("reselected", reselected),
        ("dropped_no_backend", dropped_no_backend),
        ("rejected_no_backend", rejected_no_backend),
        ("dropped_error", dropped_error),
        ("snat_flows", snat_flows),
        ("dropped_no_snat", dropped_no_snat),
        ("dropped_unknown_port", dropped_unknown_port),
        ("socket_rewrites", socket_rewrites),
        ("rejects_limited", rejects_limited),
        ("dropped_source_range", dropped_source_range),
        ("icmp_translated", icmp_translated),
        ("fragments_unmatched", fragments_unmatched),
        ("fragments_held", fragments_held),
    ]
}

struct Row {
    what: &'static str,
    hook: Hook,
    input: Vec<u8>,
    verdict: u32,
    out: Out,
    /// The counters that move by one (and `forwarded` with `new_flows`, for a new flow's first
    /// packet); none of the others moves.
    counts: &'static [&'static str],
    /// What is done to the datapath's tables before the packet: what the GC or the LRU would.
    before: Option<fn(&mut Tables)>,
}

/// The flow tables, opened from their pins: the rows' `before` changes them as time would.
struct Tables {
    flows: HashMap<MapData, FlowKey, Flow>,
    replies: HashMap<MapData, FlowKey, Reply>,
    reject_tokens: PerCpuArray<MapData, RejectTokens>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, SourceRange>,
    fragments: HashMap<MapData, FragmentKey, FragmentPorts>,
    held: HashMap<MapData, HeldKey, HeldFragment>,
    frontends: HashMap<MapData, FrontendKey, Frontend>,
    vips: HashMap<MapData, u32, Vip>,
    backends: HashMap<MapData, u32, Backend>,
    loads: BackendLoads,
    cursors: PerCpuArray<MapData, u32>,
}

impl Tables {
    fn open(pins: &std::path::Path) -> Self {
        let open = |name: &str| {
            let data = MapData::from_pin(pins.join(name)).expect("a pinned map");
            Map::from_map_data(data).expect("a map")
        };
        Self {
            flows: open(FLOWS).try_into().expect("the flow table"),
            replies: open(REPLIES).try_into().expect("the reply table"),
            reject_tokens: open(REJECT_TOKENS).try_into().expect("the reject buckets"),
            source_ranges: open(SOURCE_RANGES).try_into().expect("the source ranges"),
            fragments: open(FRAGMENTS).try_into().expect("the fragments"),
            held: open(HELD_FRAGMENTS).try_into().expect("the held fragments"),
            frontends: open(FRONTENDS).try_into().expect("the frontends"),
            vips: open(VIPS).try_into().expect("the frontend addresses"),
            backends: open(BACKENDS).try_into().expect("the backends"),
            loads: BackendLoads::map(open(BACKEND_LOADS)).expect("the backends' loads, mapped"),
            cursors: open(CURSORS).try_into().expect("the cursors"),
        }
    }

    /// The id of the backend at `address:port`.
    fn backend_id(&self, (address, port): (Ipv4Addr, u16)) -> u32 {
        self.backends
            .iter()
            .map(|entry| entry.expect("a backend"))
            .find(|(_, b)| (b.addr_be, b.port_be) == (ipv4_be(address), port.to_be()))
            .map(|(id, _)| id)
            .expect("the backend, programmed")
    }

    /// `backend`'s counted flows, `(active, inactive)`.
    fn load(&self, backend: (Ipv4Addr, u16)) -> (i64, i64) {
        let load = self.loads.get(self.backend_id(backend));
        (load.active, load.inactive)
    }

    /// Sets `backend`'s counted flows to `(active, inactive)`, as flows made and closed would.
    fn set_load(&self, backend: (Ipv4Addr, u16), (active, inactive): (i64, i64)) {
        let (was_active, was_inactive) = self.load(backend);
        self.loads.add(
            self.backend_id(backend),
            BackendLoad {
                active: active - was_active,
                inactive: inactive - was_inactive,
            },
        );
    }

    /// Every CPU's round-robin cursor of the Service of internal TCP frontend `address:port`,
    /// at `at`: the slot a least-connection scan starts from, whatever rows ran before.
    fn set_cursor(&mut self, (address, port): (Ipv4Addr, u16), at: u32) {
        let key = tcp_frontend_key(address, port, SCOPE_INTERNAL);
        let service_id = self
            .frontends
            .get(&key, 0)
            .expect("the frontend")
            .service_id;
        self.cursors
            .set(service_id, on_every_cpu(at), 0)
            .expect("the cursors, written");
    }

    /// Every CPU's reject bucket, as `tokens` and the time it was last refilled.
    fn set_reject_tokens(&mut self, tokens: RejectTokens) {
        self.reject_tokens
            .set(0, on_every_cpu(tokens), 0)
            .expect("the reject buckets, written");
    }
}

/// `value` for each CPU of a per-CPU map.
fn on_every_cpu<T: aya::Pod + Clone>(value: T) -> PerCpuValues<T> {
    let cpus = aya::util::nr_cpus().expect("the CPUs");
    PerCpuValues::try_from(vec![value; cpus]).expect("per-CPU values")
}

/// The key of TCP frontend `address:port` in `scope`.
fn tcp_frontend_key(address: Ipv4Addr, port: u16, scope: u8) -> FrontendKey {
    FrontendKey {
        addr_be: ipv4_be(address),
        port_be: port.to_be(),
        protocol: PROTO_TCP,
        scope,
    }
}

fn tcp_key(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> FlowKey {
    FlowKey {
        src_addr_be: ipv4_be(src.0),
        dst_addr_be: ipv4_be(dst.0),
        src_port_be: src.1.to_be(),
        dst_port_be: dst.1.to_be(),
        protocol: PROTO_TCP,
        _pad: [0; 3],
    }
}

/// As the agent narrows a Service's source ranges: every range that allows is removed, the
/// catch-alls stay.
fn ranges_narrowed(tables: &mut Tables) {
    let allowing: Vec<_> = tables
        .source_ranges
        .iter()
        .map(|entry| entry.expect("a source range"))
        .filter(|(_, range)| range.allowed != 0)
        .map(|(key, _)| key)
        .collect();
    assert!(!allowing.is_empty(), "no range to narrow");
    for key in allowing {
        tables.source_ranges.remove(&key).expect("a range, removed");
    }
}

/// As if [`big_query`]'s first fragment came at boot, long before its IP id came round.
fn first_fragment_long_ago(tables: &mut Tables) {
    let key = FragmentKey {
        src_addr_be: ipv4_be(CLIENT),
        dst_addr_be: ipv4_be(CLUSTER_FRAGMENTS.0),
        // As the datapath reads IPv4's 16 bits, widened.
        id_be: u32::from(BIG_QUERY_ID.to_be()),
        protocol: PROTO_UDP,
        _pad: [0; 3],
    };
    let mut ports = tables
        .fragments
        .get(&key, 0)
        .expect("the big query's ports");
    ports.seen_ns = 0;
    tables
        .fragments
        .insert(key, ports, 0)
        .expect("the ports, aged");
}

/// Every room of [`STALE_ID`]'s datagram taken by fragments held at boot, another datagram's.
fn held_long_ago(tables: &mut Tables) {
    for slot in 0..HELD_PER_DATAGRAM {
        let key = HeldKey {
            src_addr_be: ipv4_be(CLIENT),
            dst_addr_be: ipv4_be(CLUSTER_FRAGMENTS.0),
            id_be: u32::from(STALE_ID.to_be()),
            protocol: PROTO_UDP,
            slot,
            _pad: [0; 2],
        };
        let fragment = HeldFragment {
            held_ns: 0,
            len: 20,
            bytes: [0; HELD_FRAGMENT_BYTES],
        };
        tables
            .held
            .insert(key, fragment, 0)
            .expect("a stale fragment");
    }
}

/// Every bucket empty, refilled in the future: no reject until the clock passes it.
fn rejects_spent(tables: &mut Tables) {
    tables.set_reject_tokens(RejectTokens {
        milli_tokens: 0,
        refilled_ns: u64::MAX,
    });
}

/// Every bucket empty, last refilled at boot: a long quiet while refills it to its burst.
fn rejects_rested(tables: &mut Tables) {
    tables.set_reject_tokens(RejectTokens {
        milli_tokens: 0,
        refilled_ns: 0,
    });
}

/// As the LRU table evicts a reply entry while its flow lives on, and the flow was last seen
/// two seconds ago: its next packet refreshes it, and must make the reply entry again.
fn reply_evicted(tables: &mut Tables) {
    tables
        .replies
        .remove(&tcp_key((WEB, 8080), (CLIENT, 40000)))
        .expect("the reply entry of the first flow");
    let key = tcp_key((CLIENT, 40000), (CLUSTER_IP, 80));
    let mut flow = tables.flows.get(&key, 0).expect("the first flow");
    flow.last_seen_ns -= 2_000_000_000;
    tables
        .flows
        .insert(key, flow, 0)
        .expect("the first flow, aged");
}

/// [`PAIR`]'s first backend holds two open flows, its second none.
fn pair_first_busy(tables: &mut Tables) {
    tables.set_load(PAIR[0], (2, 0));
    tables.set_load(PAIR[1], (0, 0));
}

/// [`PAIR`]'s second backend holds an open flow, its first none, and the sed frontend's scan
/// starts from the second.
fn pair_second_busy_scan_from_second(tables: &mut Tables) {
    tables.set_load(PAIR[0], (0, 0));
    tables.set_load(PAIR[1], (1, 0));
    tables.set_cursor((SED_IP, 80), 1);
}

/// [`PAIR`]'s first backend idle but for 300 closing flows, its second with one open flow:
/// never queue takes the first, least connection would take the second.
fn pair_first_idle_but_closing(tables: &mut Tables) {
    tables.set_load(PAIR[0], (0, 300));
    tables.set_load(PAIR[1], (1, 0));
}

/// The least-connection rows' flows counted, then loads on which lc and sed differ: the first
/// backend one active flow, the second 300 closing ones.
fn pair_loads_differ(tables: &mut Tables) {
    assert_eq!(
        (tables.load(PAIR[0]), tables.load(PAIR[1])),
        ((2, 0), (1, 1)),
        "two new flows to the second backend counted, one of them closed"
    );
    tables.set_load(PAIR[0], (1, 0));
    tables.set_load(PAIR[1], (0, 300));
}

/// [`pair_loads_differ`]'s loads again, after the row before it counted its flow.
fn pair_loads_differ_again(tables: &mut Tables) {
    assert_eq!(tables.load(PAIR[0]), (2, 0), "lc's new flow counted");
    tables.set_load(PAIR[0], (1, 0));
    tables.set_load(PAIR[1], (0, 300));
}

/// A frontend of `service` at `address:port` over `backends`, as the model makes them.
fn frontend<A: Into<IpAddr> + Copy>(
    service: &str,
    address: A,
    port: u16,
    protocol: Protocol,
    scope: Scope,
    backends: &[(A, u16)],
) -> Arc<model::Frontend> {
    Arc::new(model::Frontend {
        service: format!("default/{service}"),
        created: None,
        port_name: String::new(),
        kind: match scope {
            Scope::Internal => FrontendKind::ClusterIP,
            Scope::External => FrontendKind::LoadBalancer,
        },
        scope,
        address: address.into(),
        port,
        protocol,
        algorithm: Algorithm::RoundRobin,
        maglev_table_size: None,
        hash_port: false,
        affinity_timeout: None,
        when_empty: WhenEmpty::Reject,
        rule: "ready endpoints".into(),
        backends: backends
            .iter()
            .map(|&(address, port)| model::Backend {
                address: address.into(),
                port,
                node: Some(NODE.into()),
                zone: None,
            })
            .collect(),
        retained: Vec::new(),
        source_ranges: None,
    })
}

/// `frontend` as a load-balancer IP (in its scope) whose Service takes only `ranges`.
fn ranged<A: Into<IpAddr> + Copy>(
    frontend: Arc<model::Frontend>,
    ranges: &[(A, u8)],
) -> Arc<model::Frontend> {
    let mut frontend = Arc::unwrap_or_clone(frontend);
    frontend.kind = FrontendKind::LoadBalancer;
    frontend.source_ranges = Some(
        ranges
            .iter()
            .map(|&(address, len)| model::SourceRange::new(address, len))
            .collect(),
    );
    Arc::new(frontend)
}

/// `frontend` with its backends on another node.
fn remote(frontend: Arc<model::Frontend>) -> Arc<model::Frontend> {
    let mut frontend = Arc::unwrap_or_clone(frontend);
    for backend in &mut frontend.backends {
        backend.node = Some("another-node".into());
    }
    Arc::new(frontend)
}

/// `frontend` with `sessionAffinity: ClientIP`.
fn sticky(frontend: Arc<model::Frontend>) -> Arc<model::Frontend> {
    let mut frontend = Arc::unwrap_or_clone(frontend);
    frontend.affinity_timeout = Some(10_800);
    Arc::new(frontend)
}

/// `frontend` balanced by Maglev, over a table of [`MAGLEV_TABLE_SIZE`] positions.
fn maglev(frontend: Arc<model::Frontend>) -> Arc<model::Frontend> {
    let mut frontend = Arc::unwrap_or_clone(frontend);
    frontend.algorithm = Algorithm::Maglev;
    frontend.maglev_table_size = Some(MAGLEV_TABLE_SIZE);
    Arc::new(frontend)
}

/// `frontend` with the client's port in its hash (`mh-port`, `sh-port`).
fn port_hashed(frontend: Arc<model::Frontend>) -> Arc<model::Frontend> {
    let mut frontend = Arc::unwrap_or_clone(frontend);
    frontend.hash_port = true;
    Arc::new(frontend)
}

/// `frontend` balanced by `scheduler`.
fn scheduled(scheduler: Algorithm, frontend: Arc<model::Frontend>) -> Arc<model::Frontend> {
    let mut frontend = Arc::unwrap_or_clone(frontend);
    frontend.algorithm = scheduler;
    Arc::new(frontend)
}

/// `frontend` balanced by source hash.
fn hashed(frontend: Arc<model::Frontend>) -> Arc<model::Frontend> {
    let mut frontend = Arc::unwrap_or_clone(frontend);
    frontend.algorithm = Algorithm::SourceHash;
    Arc::new(frontend)
}

/// `frontend` dropping, not rejecting, when it has no endpoint.
fn dropping(frontend: Arc<model::Frontend>) -> Arc<model::Frontend> {
    let mut frontend = Arc::unwrap_or_clone(frontend);
    frontend.when_empty = WhenEmpty::Drop;
    Arc::new(frontend)
}

/// The backend of [`PAIR`] that source hash gives `client`: murmur3's 32-bit finaliser
/// (fmix32) of the address as it lies in the packet, modulo the backends, the hash
/// `lb-ebpf/src/hash.rs` names; written here from murmur3's definition, so that a change to the
/// datapath's hash shows.
fn hashed_backend(client: Ipv4Addr) -> Ipv4Addr {
    PAIR[(fmix32(client.into(), 0) % 2) as usize].0
}

/// The backend of [`PAIR`] that Maglev gives `client`: the position [`fmix32`] picks in the
/// Maglev table of [`PAIR`] (`lb_user::plan::maglev`, tested on its own) of
/// [`MAGLEV_TABLE_SIZE`] positions.
fn maglev_backend(client: Ipv4Addr) -> Ipv4Addr {
    maglev_port_backend(client, 0)
}

/// The backend of [`PAIR`] that Maglev with `mh-port` gives `client` from source port `port`:
/// as [`maglev_backend`], the port in the hash.
fn maglev_port_backend(client: Ipv4Addr, port: u16) -> Ipv4Addr {
    maglev_pick(
        PAIR.map(|(ip, port)| (SocketAddr::from((ip, port)), ip)),
        client.into(),
        port,
    )
}

/// The same over IPv6, from [`PAIR`]'s twins.
fn maglev_backend6(client: Ipv6Addr) -> Ipv6Addr {
    maglev_pick(
        PAIR.map(|(ip, port)| (SocketAddr::from((v6(ip), port)), v6(ip))),
        client.into(),
        0,
    )
}

fn maglev_pick<A: Copy>(named: [(SocketAddr, A); 2], client: IpAddr, port: u16) -> A {
    let table = plan::maglev::table(&named, MAGLEV_TABLE_SIZE);
    table[(fmix32(client, port) % MAGLEV_TABLE_SIZE) as usize]
}

/// murmur3's 32-bit finaliser of the address as it lies in the packet, an IPv6 one's four
/// words folded into one by exclusive or, and that by exclusive or with `port`'s two bytes as
/// they lie in the packet (0: without the port).
fn fmix32(client: IpAddr, port: u16) -> u32 {
    let word = |bytes: &[u8]| u32::from_ne_bytes(bytes.try_into().expect("4 bytes"));
    let address = match client {
        IpAddr::V4(ip) => word(&ip.octets()),
        IpAddr::V6(ip) => ip.octets().chunks(4).map(word).fold(0, |a, w| a ^ w),
    };
    let mut h = address ^ u32::from(u16::from_ne_bytes(port.to_be_bytes()));
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// `p` with 4 bytes of IPv4 options (no-operations), its lengths and IPv4 checksum to match;
/// the TCP or UDP checksum covers no IPv4 option.
fn ip_options(p: Vec<u8>) -> Vec<u8> {
    with(p, |p| {
        p.splice(34..34, [1u8; 4]);
        p[14] = 0x46;
        let total = u16::from_be_bytes([p[16], p[17]]) + 4;
        p[16..18].copy_from_slice(&total.to_be_bytes());
        p[24..26].fill(0);
        let sum = checksum(&p[14..38], 0);
        p[24..26].copy_from_slice(&sum.to_be_bytes());
    })
}

fn programme() -> Vec<Arc<model::Frontend>> {
    vec![
        frontend(
            "web",
            v6(CLUSTER_IP),
            80,
            Protocol::Tcp,
            Scope::Internal,
            &[(v6(WEB), 8080)],
        ),
        frontend(
            "dns",
            v6(DNS_IP),
            53,
            Protocol::Udp,
            Scope::Internal,
            &[(v6(DNS), 5353)],
        ),
        frontend(
            "empty",
            v6(EMPTY_IP),
            80,
            Protocol::Tcp,
            Scope::Internal,
            &[],
        ),
        frontend(
            "empty",
            v6(EMPTY_IP),
            53,
            Protocol::Udp,
            Scope::Internal,
            &[],
        ),
        frontend(
            "empty",
            v6(EMPTY_IP),
            80,
            Protocol::Tcp,
            Scope::External,
            &[],
        ),
        ranged(
            frontend(
                "ranged",
                v6(RANGED_LB_IP),
                80,
                Protocol::Tcp,
                Scope::External,
                &[(v6(WEB), 8080)],
            ),
            &[(v6(OUTSIDE), 128)],
        ),
        remote(frontend(
            "far-node-port",
            v6(NODE_IP),
            NODE_PORT,
            Protocol::Tcp,
            Scope::External,
            &[(v6(REMOTE), 8443)],
        )),
        maglev(frontend(
            "maglev",
            v6(MAGLEV_IP),
            80,
            Protocol::Tcp,
            Scope::Internal,
            &PAIR.map(|(ip, port)| (v6(ip), port)),
        )),
        frontend(
            "web",
            CLUSTER_IP,
            80,
            Protocol::Tcp,
            Scope::Internal,
            &[(WEB, 8080)],
        ),
        frontend(
            "dns",
            DNS_IP,
            53,
            Protocol::Udp,
            Scope::Internal,
            &[(DNS, 5353)],
        ),
        frontend("empty", EMPTY_IP, 80, Protocol::Tcp, Scope::Internal, &[]),
        frontend("empty", EMPTY_IP, 53, Protocol::Udp, Scope::Internal, &[]),
        frontend(
            "web",
            LOAD_BALANCER_IP,
            80,
            Protocol::Tcp,
            Scope::External,
            &[(WEB, 8080)],
        ),
        frontend("pair", PAIR_IP, 80, Protocol::Tcp, Scope::Internal, &PAIR),
        sticky(frontend(
            "sticky",
            STICKY_IP,
            80,
            Protocol::Tcp,
            Scope::Internal,
            &PAIR,
        )),
        sticky(frontend(
            "sticky",
            STICKY_LB_IP,
            80,
            Protocol::Tcp,
            Scope::External,
            &[PAIR[1], PAIR[0]],
        )),
        hashed(frontend(
            "hashed",
            HASHED_IP,
            80,
            Protocol::Tcp,
            Scope::Internal,
            &PAIR,
        )),
        maglev(frontend(
            "maglev",
            MAGLEV_IP,
            80,
            Protocol::Tcp,
            Scope::Internal,
            &PAIR,
        )),
        port_hashed(maglev(frontend(
            "maglev",
            MAGLEV_IP,
            81,
            Protocol::Tcp,
            Scope::Internal,
            &PAIR,
        ))),
        scheduled(
            Algorithm::LeastConnection,
            frontend("least", LEAST_IP, 80, Protocol::Tcp, Scope::Internal, &PAIR),
        ),
        scheduled(
            Algorithm::ShortestExpectedDelay,
            frontend("sed", SED_IP, 80, Protocol::Tcp, Scope::Internal, &PAIR),
        ),
        scheduled(
            Algorithm::NeverQueue,
            frontend(
                "nq",
                NEVER_QUEUE_LB_IP,
                80,
                Protocol::Tcp,
                Scope::External,
                &[PAIR[1], PAIR[0]],
            ),
        ),
        dropping(frontend(
            "local-only",
            LOCAL_ONLY_IP,
            80,
            Protocol::Tcp,
            Scope::Internal,
            &[],
        )),
        remote(frontend(
            "far",
            REMOTE_LB_IP,
            80,
            Protocol::Tcp,
            Scope::External,
            &[(REMOTE, 8080)],
        )),
        remote(frontend(
            "far-node-port",
            NODE_IP,
            NODE_PORT,
            Protocol::Tcp,
            Scope::External,
            &[(REMOTE, 8443)],
        )),
        ranged_web(Scope::External),
        ranged_web(Scope::Internal),
        ranged(
            frontend(
                "ranged-empty",
                RANGED_LB_IP,
                81,
                Protocol::Tcp,
                Scope::External,
                &[],
            ),
            &[OUTSIDE_RANGE],
        ),
    ]
}

/// [`RANGED_LB_IP`]'s port 80 in `scope`, over [`WEB`].
fn ranged_web(scope: Scope) -> Arc<model::Frontend> {
    let web = frontend(
        "ranged",
        RANGED_LB_IP,
        80,
        Protocol::Tcp,
        scope,
        &[(WEB, 8080)],
    );
    ranged(web, &[OUTSIDE_RANGE])
}

/// The IPv6 twin of [`reset_to_client`]: from the empty Service's IPv6 address to the client's
/// port 40003.
fn reset6_to_client(p: &[u8]) -> Result<(), String> {
    let seen = (
        p[20],
        addr6(p, 22),
        port(p, 54),
        addr6(p, 38),
        port(p, 56),
        p[67],
    );
    let wanted = (6, v6(EMPTY_IP), 80, v6(CLIENT), 40003, TCP_RST | TCP_ACK);
    if seen != wanted {
        return Err(format!("{seen:?}, not {wanted:?}"));
    }
    let seq = u32::from_be_bytes([p[58], p[59], p[60], p[61]]);
    let ack = u32::from_be_bytes([p[62], p[63], p[64], p[65]]);
    if (seq, ack) != (0, 2) {
        return Err(format!(
            "sequence {seq} acknowledging {ack}, not 0 acknowledging the SYN's 1 + 1"
        ));
    }
    if p.len() != 74 || !checksum6_valid(p) {
        return Err(format!(
            "{} bytes, or the TCP checksum does not verify",
            p.len()
        ));
    }
    Ok(())
}

/// The ICMPv6 twin of [`unreachable_to_client`]: destination unreachable, port unreachable,
/// quoting the datagram's IPv6 header and its first 8 bytes, its checksum over IPv6's
/// pseudo-header.
fn unreachable6_to_client(p: &[u8]) -> Result<(), String> {
    let seen = (p[20], addr6(p, 22), addr6(p, 38), p[54], p[55]);
    let wanted = (58, v6(EMPTY_IP), v6(CLIENT), 1, 4);
    if seen != wanted {
        return Err(format!(
            "(next header, from, to, type, code) {seen:?}, not {wanted:?}"
        ));
    }
    let quoted = &p[62..];
    if quoted.len() != 48 || addr6(quoted, 24) != v6(EMPTY_IP) || port(quoted, 42) != 53 {
        return Err(format!("quotes {quoted:02x?}"));
    }
    if !checksum6_valid(p) {
        return Err("the ICMPv6 checksum does not verify".into());
    }
    Ok(())
}

/// A reset from the ClusterIP of the empty Service to the client's port 40003, as the
/// kernel's own (RST with ACK, acknowledging the SYN), checksums valid.
fn reset_to_client(p: &[u8]) -> Result<(), String> {
    let seen = (addr(p, 26), port(p, 34), addr(p, 30), port(p, 36), p[47]);
    let wanted = (EMPTY_IP, 80, CLIENT, 40003, TCP_RST | TCP_ACK);
    if seen != wanted {
        return Err(format!("{seen:?}, not {wanted:?}"));
    }
    let seq = u32::from_be_bytes([p[38], p[39], p[40], p[41]]);
    let ack = u32::from_be_bytes([p[42], p[43], p[44], p[45]]);
    if (seq, ack) != (0, 2) {
        return Err(format!(
            "sequence {seq} acknowledging {ack}, not 0 acknowledging the SYN's 1 + 1"
        ));
    }
    if !checksums_valid(p) {
        return Err("checksums do not verify".into());
    }
    Ok(())
}

/// An ICMP port unreachable from the empty Service's ClusterIP to the client, quoting the
/// datagram's IPv4 header and its first 8 bytes, IPv4 checksum valid.
fn unreachable_to_client(p: &[u8]) -> Result<(), String> {
    let seen = (p[23], addr(p, 26), addr(p, 30), p[34], p[35]);
    let wanted = (1, EMPTY_IP, CLIENT, 3, 3);
    if seen != wanted {
        return Err(format!(
            "(protocol, from, to, type, code) {seen:?}, not {wanted:?}"
        ));
    }
    let quoted = &p[42..];
    if quoted.len() < 28 || addr(quoted, 16) != EMPTY_IP || port(quoted, 22) != 53 {
        return Err(format!("quotes {quoted:02x?}"));
    }
    if checksum(&p[14..34], 0) != 0 || checksum(&p[34..], 0) != 0 {
        return Err("the IPv4 or the ICMP checksum does not verify".into());
    }
    Ok(())
}

/// `p` with an IPv4 total length of 0, as BIG TCP sends a datagram over 64 KiB, and its IPv4
/// checksum to match.
fn big_tcp(p: Vec<u8>) -> Vec<u8> {
    with(p, |p| {
        p[16..18].fill(0);
        fill_ip_checksum(p);
    })
}

/// `p` with an IPv4 total length 100 bytes past its frame, and its IPv4 checksum to match: as
/// tc sees a GSO skb's linear part, or a truncated frame.
fn past_the_frame(p: Vec<u8>) -> Vec<u8> {
    with(p, |p| {
        let total = u16::from_be_bytes([p[16], p[17]]) + 100;
        p[16..18].copy_from_slice(&total.to_be_bytes());
        fill_ip_checksum(p);
    })
}

fn with(p: Vec<u8>, change: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut p = p;
    change(&mut p);
    p
}

/// The IPv6 rows: the same core as IPv4's, through each family's headers and maps.
fn ipv6_rows() -> Vec<Row> {
    let (client, cluster_ip, web) = (v6(CLIENT), v6(CLUSTER_IP), v6(WEB));
    let (node, remote, outside) = (v6(NODE_IP), v6(REMOTE), v6(OUTSIDE));
    let (gateway, router) = (v6(POD_GATEWAY), v6(ROUTER));
    // A port unreachable from `from`, quoting the client's datagram past two extension
    // headers to `from:port`.
    let dns_unreachable = |from, port| {
        let quoted = packet6_through(
            &[IPV6_HOP_BY_HOP, IPV6_DEST_OPTIONS],
            UDP,
            client,
            from,
            42000,
            port,
        );
        icmp6_error(
            ICMPV6_DEST_UNREACHABLE,
            ICMPV6_PORT_UNREACHABLE,
            from,
            client,
            0,
            &quoted,
        )
    };
    vec![
        Row {
            what: "IPv6: a SYN to a ClusterIP goes to its backend, only the TCP checksum updated",
            hook: Hook::TcIngress,
            input: packet6(TCP_SYN, client, cluster_ip, 41000, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet6(TCP_SYN, client, web, 41000, 8080)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "IPv6: the connection's next segment follows its flow",
            hook: Hook::TcIngress,
            input: packet6(TCP_ACK, client, cluster_ip, 41000, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet6(TCP_ACK, client, web, 41000, 8080)),
            counts: &["forwarded"],
            before: None,
        },
        Row {
            what: "IPv6: the backend's answer leaves from the ClusterIP",
            hook: Hook::TcEgress,
            input: packet6(TCP_SYN | TCP_ACK, web, client, 8080, 41000),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet6(TCP_SYN | TCP_ACK, cluster_ip, client, 80, 41000)),
            counts: &["replied"],
            before: None,
        },
        Row {
            what: "IPv6: the node's \"packet too big\" about the flow, leaving for the client: \
                   the quote is what the client sent, to the ClusterIP",
            hook: Hook::TcEgress,
            input: packet_too_big(gateway, client, (client, 41000), (web, 8080)),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet_too_big(
                gateway,
                client,
                (client, 41000),
                (cluster_ip, 80),
            )),
            counts: &["icmp_translated"],
            before: None,
        },
        Row {
            what: "IPv6: that error before routing, its destination unchanged: left to egress",
            hook: Hook::TcIngress,
            input: packet_too_big(gateway, client, (client, 41000), (web, 8080)),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "IPv6: time exceeded about a reply, to the ClusterIP: to the backend, quoting \
                   what it sent",
            hook: Hook::TcIngress,
            input: icmp6_error(
                ICMPV6_TIME_EXCEEDED,
                0,
                gateway,
                cluster_ip,
                0,
                &packet6(TCP_ACK, cluster_ip, client, 80, 41000),
            ),
            verdict: TC_ACT_OK,
            out: Out::Packet(icmp6_error(
                ICMPV6_TIME_EXCEEDED,
                0,
                gateway,
                web,
                0,
                &packet6(TCP_ACK, web, client, 8080, 41000),
            )),
            counts: &["icmp_translated"],
            before: None,
        },
        Row {
            what: "IPv6: a datagram past hop-by-hop and destination options headers goes to its \
                   backend",
            hook: Hook::TcIngress,
            input: packet6_through(
                &[IPV6_HOP_BY_HOP, IPV6_DEST_OPTIONS],
                UDP,
                client,
                v6(DNS_IP),
                42000,
                53,
            ),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet6_through(
                &[IPV6_HOP_BY_HOP, IPV6_DEST_OPTIONS],
                UDP,
                client,
                v6(DNS),
                42000,
                5353,
            )),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "IPv6: the UDP backend's own port unreachable about that datagram, its quote \
                   past the extension headers: from the ClusterIP, quoting it, the outer \
                   source in ICMPv6's pseudo-header",
            hook: Hook::TcEgress,
            input: dns_unreachable(v6(DNS), 5353),
            verdict: TC_ACT_OK,
            out: Out::Packet(dns_unreachable(v6(DNS_IP), 53)),
            counts: &["icmp_translated"],
            before: None,
        },
        Row {
            what: "IPv6: a port the ClusterIP does not serve drops",
            hook: Hook::TcIngress,
            input: packet6(TCP_SYN, client, cluster_ip, 41001, 81),
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            counts: &["dropped_unknown_port"],
            before: None,
        },
        Row {
            what: "IPv6: ICMPv6 (neighbour discovery, router advertisements) is no flow's: \
                   untouched, even to a ClusterIP",
            hook: Hook::TcIngress,
            input: with(packet6(UDP, client, cluster_ip, 42001, 53), |p| p[20] = 58),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "IPv6: a Service without endpoints: a reset, sent back",
            hook: Hook::TcIngress,
            input: packet6(TCP_SYN, client, v6(EMPTY_IP), 40003, 80),
            verdict: TC_ACT_REDIRECT,
            out: Out::Check(reset6_to_client),
            counts: &["rejected_no_backend"],
            before: Some(rejects_rested),
        },
        Row {
            what: "IPv6: a UDP datagram to a Service without endpoints: ICMPv6 port \
                   unreachable, sent back",
            hook: Hook::TcIngress,
            input: packet6(UDP, client, v6(EMPTY_IP), 40003, 53),
            verdict: TC_ACT_REDIRECT,
            out: Out::Check(unreachable6_to_client),
            counts: &["rejected_no_backend"],
            before: Some(rejects_rested),
        },
        Row {
            what: "IPv6: from outside, a reset sent back from XDP",
            hook: Hook::Xdp,
            input: packet6(TCP_SYN, client, v6(EMPTY_IP), 40003, 80),
            verdict: XDP_TX,
            out: Out::Check(reset6_to_client),
            counts: &["rejected_no_backend"],
            before: Some(rejects_rested),
        },
        Row {
            what: "IPv6: a reset past an extension header is not written: dropped",
            hook: Hook::TcIngress,
            input: packet6_through(
                &[IPV6_DEST_OPTIONS],
                TCP_SYN,
                client,
                v6(EMPTY_IP),
                40004,
                80,
            ),
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            counts: &["rejected_no_backend"],
            before: Some(rejects_rested),
        },
        Row {
            what: "IPv6: a load-balancer IP takes a source its IPv6 ranges hold",
            hook: Hook::Xdp,
            input: packet6(TCP_SYN, outside, v6(RANGED_LB_IP), 44000, 80),
            verdict: XDP_PASS,
            out: Out::Packet(packet6(TCP_SYN, outside, web, 44000, 8080)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "IPv6: and drops one they leave out",
            hook: Hook::Xdp,
            input: packet6(TCP_SYN, v6(ANOTHER_CLIENT), v6(RANGED_LB_IP), 44001, 80),
            verdict: XDP_DROP,
            out: Out::Unchanged,
            counts: &["dropped_source_range"],
            before: None,
        },
        Row {
            what: "IPv6: from outside to a NodePort whose backend is elsewhere: SNATed to the \
                   node's IPv6 address",
            hook: Hook::Xdp,
            input: packet6(TCP_SYN, outside, node, 43000, NODE_PORT),
            verdict: XDP_PASS,
            out: Out::Packet(packet6(TCP_SYN, node, remote, SNAT_PORT, 8443)),
            counts: &["new_flows", "snat_flows"],
            before: None,
        },
        Row {
            what: "IPv6: the backend's answer to the SNAT port goes back to the client from the \
                   NodePort",
            hook: Hook::Xdp,
            input: packet6(TCP_SYN | TCP_ACK, remote, node, 8443, SNAT_PORT),
            verdict: XDP_PASS,
            out: Out::Packet(packet6(TCP_SYN | TCP_ACK, node, outside, NODE_PORT, 43000)),
            counts: &["replied"],
            before: None,
        },
        Row {
            what: "IPv6: \"packet too big\" about the SNATed flow, to the node: to the client, \
                   quoting its own packet, the ICMPv6 checksum over both addresses",
            hook: Hook::Xdp,
            input: packet_too_big(router, node, (node, SNAT_PORT), (remote, 8443)),
            verdict: XDP_PASS,
            out: Out::Packet(packet_too_big(
                router,
                outside,
                (outside, 43000),
                (node, NODE_PORT),
            )),
            counts: &["icmp_translated"],
            before: None,
        },
        Row {
            what: "IPv6: the node's own \"packet too big\" about it, addressed to itself, on lo: \
                   to the client, out of the interface its route takes",
            hook: Hook::TcLoopback,
            input: packet_too_big(node, node, (node, SNAT_PORT), (remote, 8443)),
            verdict: TC_ACT_REDIRECT,
            out: Out::Packet(packet_too_big(
                node,
                outside,
                (outside, 43000),
                (node, NODE_PORT),
            )),
            counts: &["icmp_translated"],
            before: None,
        },
        Row {
            what: "IPv6: an error about no tracked flow: untouched",
            hook: Hook::Xdp,
            input: packet_too_big(router, node, (node, 45000), (remote, 8443)),
            verdict: XDP_PASS,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "IPv6: Maglev: the backend at the client's position in the IPv6 frontend's \
                   table",
            hook: Hook::TcIngress,
            input: packet6(TCP_SYN, client, v6(MAGLEV_IP), 41100, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet6(
                TCP_SYN,
                client,
                maglev_backend6(client),
                41100,
                8080,
            )),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "IPv6: Maglev, another client: its own position's",
            hook: Hook::TcIngress,
            input: packet6(TCP_SYN, v6(ANOTHER_CLIENT), v6(MAGLEV_IP), 41101, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet6(
                TCP_SYN,
                v6(ANOTHER_CLIENT),
                maglev_backend6(v6(ANOTHER_CLIENT)),
                41101,
                8080,
            )),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "IPv6: a fragmented datagram's first fragment, to a ClusterIP: DNAT, its UDP \
                   checksum (the whole datagram's) updated",
            hook: Hook::TcIngress,
            input: big_query6((v6(DNS_IP), 53), BIG_QUERY_ID6, 0),
            verdict: TC_ACT_OK,
            out: Out::Packet(big_query6((v6(DNS), 5353), BIG_QUERY_ID6, 0)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "IPv6: its later fragments follow it, addresses rewritten (and the skb's \
                   complete sum with them)",
            hook: Hook::TcIngress,
            input: big_query6((v6(DNS_IP), 53), BIG_QUERY_ID6, 1),
            verdict: TC_ACT_OK,
            out: Out::Packet(big_query6((v6(DNS), 5353), BIG_QUERY_ID6, 1)),
            counts: &["forwarded"],
            before: None,
        },
        Row {
            what: "IPv6: the last one too",
            hook: Hook::TcIngress,
            input: big_query6((v6(DNS_IP), 53), BIG_QUERY_ID6, 2),
            verdict: TC_ACT_OK,
            out: Out::Packet(big_query6((v6(DNS), 5353), BIG_QUERY_ID6, 2)),
            counts: &["forwarded"],
            before: None,
        },
        Row {
            what: "IPv6: a later fragment before its first, to a ClusterIP: held for it",
            hook: Hook::TcIngress,
            input: big_query6((v6(DNS_IP), 53), BIG_QUERY_ID6 + 1, 1),
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            counts: &["fragments_held"],
            before: None,
        },
        Row {
            what: "IPv6: a later fragment of a datagram never seen, to another address: untouched",
            hook: Hook::TcIngress,
            input: big_query6((v6(NOWHERE), 53), BIG_QUERY_ID6, 1),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "IPv6: the backend's fragmented answer, leaving: its first fragment from the \
                   ClusterIP",
            hook: Hook::TcEgress,
            input: big_answer6(v6(DNS), 5353, 0),
            verdict: TC_ACT_OK,
            out: Out::Packet(big_answer6(v6(DNS_IP), 53, 0)),
            counts: &["replied"],
            before: None,
        },
        Row {
            what: "IPv6: and its later fragment",
            hook: Hook::TcEgress,
            input: big_answer6(v6(DNS), 5353, 1),
            verdict: TC_ACT_OK,
            out: Out::Packet(big_answer6(v6(DNS_IP), 53, 1)),
            counts: &["replied"],
            before: None,
        },
        Row {
            what: "IPv6: a first fragment from outside: XDP passes it on to tc, which can hold \
                   the later ones",
            hook: Hook::Xdp,
            input: segment_fragment6(outside, (v6(RANGED_LB_IP), 80), 0),
            verdict: XDP_PASS,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "IPv6: there, it is DNATed",
            hook: Hook::TcUplink,
            input: segment_fragment6(outside, (v6(RANGED_LB_IP), 80), 0),
            verdict: TC_ACT_OK,
            out: Out::Packet(segment_fragment6(outside, (web, 8080), 0)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "IPv6: and its later fragment, which XDP passes too",
            hook: Hook::TcUplink,
            input: segment_fragment6(outside, (v6(RANGED_LB_IP), 80), 1),
            verdict: TC_ACT_OK,
            out: Out::Packet(segment_fragment6(outside, (web, 8080), 1)),
            counts: &["forwarded"],
            before: None,
        },
        Row {
            what: "IPv6: a packet that is no fragment, on the uplink's tc ingress: untouched",
            hook: Hook::TcUplink,
            input: packet6(TCP_SYN, outside, v6(RANGED_LB_IP), 44020, 80),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "IPv6: nor one past an extension header, which XDP balanced",
            hook: Hook::TcUplink,
            input: packet6_through(
                &[IPV6_HOP_BY_HOP],
                TCP_SYN,
                outside,
                v6(RANGED_LB_IP),
                44021,
                80,
            ),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "IPv6: an atomic fragment (offset 0, no more) is a whole datagram: XDP \
                   balances it",
            hook: Hook::Xdp,
            input: atomic_fragment6(outside, (v6(RANGED_LB_IP), 80)),
            verdict: XDP_PASS,
            out: Out::Packet(atomic_fragment6(outside, (web, 8080))),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "IPv6: and the uplink's tc ingress leaves it",
            hook: Hook::TcUplink,
            input: atomic_fragment6(outside, (v6(RANGED_LB_IP), 80)),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "IPv6: a first fragment to a Service without endpoints: dropped, as any packet \
                   with an extension header a reject would have to quote",
            hook: Hook::TcIngress,
            input: big_query6((v6(EMPTY_IP), 53), BIG_QUERY_ID6, 0),
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            counts: &["rejected_no_backend"],
            before: None,
        },
        Row {
            what: "IPv6: the node's \"packet too big\" about the fragmented query, leaving for \
                   the client: the quoted first fragment is what the client sent",
            hook: Hook::TcEgress,
            input: too_big_fragment6(gateway, (v6(DNS), 5353)),
            verdict: TC_ACT_OK,
            out: Out::Packet(too_big_fragment6(gateway, (v6(DNS_IP), 53))),
            counts: &["icmp_translated"],
            before: None,
        },
    ]
}

/// A 2,000-byte TCP segment from `client`'s port 44030 to `to` behind a fragment header that
/// splits nothing.
fn atomic_fragment6(client: Ipv6Addr, to: (Ipv6Addr, u16)) -> Vec<u8> {
    let whole = datagram6(TCP_ACK, client, to.0, 44030, to.1, 2000);
    fragments6(&whole, 0x7002_0001, 2048).swap_remove(0)
}

/// "Packet too big" (MTU 1280) from `router` to the client, quoting [`big_query6`]'s first
/// fragment to `to` as far as 1,280 bytes hold it.
fn too_big_fragment6(router: Ipv6Addr, to: (Ipv6Addr, u16)) -> Vec<u8> {
    let mut quoted = big_query6(to, BIG_QUERY_ID6, 0);
    quoted.truncate(14 + 1280 - 48);
    icmp6_error(ICMPV6_PACKET_TOO_BIG, 0, router, v6(CLIENT), 1280, &quoted)
}

/// Fragment `n` of a 3,000-byte UDP query from the client's port 45000 to `to`, under
/// identification `id`, in fragments of 1,448 bytes, as a 1,500-byte link splits it past the
/// IPv6 and fragment headers.
fn big_query6(to: (Ipv6Addr, u16), id: u32, n: usize) -> Vec<u8> {
    let whole = datagram6(UDP, v6(CLIENT), to.0, 45000, to.1, 3000);
    fragments6(&whole, id, 1448).swap_remove(n)
}

const BIG_QUERY_ID6: u32 = 0x4242_0001;

/// Fragment `n` of a 2,000-byte UDP answer to [`big_query6`], from `from`.
fn big_answer6(from: Ipv6Addr, port: u16, n: usize) -> Vec<u8> {
    let whole = datagram6(UDP, from, v6(CLIENT), port, 45000, 2000);
    fragments6(&whole, 0x5151_0001, 1448).swap_remove(n)
}

/// Fragment `n` of a 2,000-byte TCP segment from `client`'s port 44010 to `to`.
fn segment_fragment6(client: Ipv6Addr, to: (Ipv6Addr, u16), n: usize) -> Vec<u8> {
    let whole = datagram6(TCP_ACK, client, to.0, 44010, to.1, 2000);
    fragments6(&whole, 0x7001_0001, 1448).swap_remove(n)
}

fn rows() -> Vec<Row> {
    let syn = packet(TCP_SYN, CLIENT, CLUSTER_IP, 40000, 80);
    vec![
        Row {
            what: "a TCP SYN to a ClusterIP: DNAT to its backend",
            hook: Hook::TcIngress,
            input: syn.clone(),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_SYN, CLIENT, WEB, 40000, 8080)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "the flow's next packet: the same backend, no new flow",
            hook: Hook::TcIngress,
            input: packet(TCP_ACK, CLIENT, CLUSTER_IP, 40000, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_ACK, CLIENT, WEB, 40000, 8080)),
            counts: &["forwarded"],
            before: None,
        },
        Row {
            what: "the backend's answer, leaving: its source back to the ClusterIP",
            hook: Hook::TcEgress,
            input: packet(TCP_SYN | TCP_ACK, WEB, CLIENT, 8080, 40000),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_SYN | TCP_ACK, CLUSTER_IP, CLIENT, 80, 40000)),
            counts: &["replied"],
            before: None,
        },
        Row {
            what: "a UDP datagram to a ClusterIP: DNAT to its backend",
            hook: Hook::TcIngress,
            input: packet(UDP, CLIENT, DNS_IP, 40001, 53),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(UDP, CLIENT, DNS, 40001, 5353)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "a TCP SYN to a load-balancer IP, from outside: DNAT to the local backend",
            hook: Hook::Xdp,
            input: packet(TCP_SYN, CLIENT, LOAD_BALANCER_IP, 40002, 80),
            verdict: XDP_PASS,
            out: Out::Packet(packet(TCP_SYN, CLIENT, WEB, 40002, 8080)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "from outside to a backend on another node: DNAT, and SNAT to the node",
            hook: Hook::Xdp,
            input: packet(TCP_SYN, OUTSIDE, REMOTE_LB_IP, 40010, 80),
            verdict: XDP_PASS,
            out: Out::Packet(packet(TCP_SYN, NODE_IP, REMOTE, SNAT_PORT, 8080)),
            counts: &["new_flows", "snat_flows"],
            before: None,
        },
        Row {
            what: "that backend's answer, arriving: back to the client, from the load-balancer IP",
            hook: Hook::Xdp,
            input: packet(TCP_SYN | TCP_ACK, REMOTE, NODE_IP, 8080, SNAT_PORT),
            verdict: XDP_PASS,
            out: Out::Packet(packet(TCP_SYN | TCP_ACK, REMOTE_LB_IP, OUTSIDE, 80, 40010)),
            counts: &["replied"],
            before: None,
        },
        Row {
            what: "to no frontend: untouched",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, NOWHERE, 40000, 80),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "a ClusterIP on a port it does not serve: dropped",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, CLUSTER_IP, 40000, 81),
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            counts: &["dropped_unknown_port"],
            before: None,
        },
        Row {
            what: "a load-balancer IP on a port it does not serve: untouched (it may be the \
                   node's own address, whose other ports are no service's)",
            hook: Hook::Xdp,
            input: packet(TCP_SYN, OUTSIDE, LOAD_BALANCER_IP, 40000, 22),
            verdict: XDP_PASS,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "a Service without endpoints: a reset, sent back",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, EMPTY_IP, 40003, 80),
            verdict: TC_ACT_REDIRECT,
            out: Out::Check(reset_to_client),
            counts: &["rejected_no_backend"],
            before: None,
        },
        // The kernel's test run refuses a tc program an IPv4 frame shorter than its header;
        // XDP sees such frames, through the same parser.
        Row {
            what: "an Ethernet header alone: untouched",
            hook: Hook::Xdp,
            input: syn[..14].to_vec(),
            verdict: XDP_PASS,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "an IPv4 header cut short: untouched",
            hook: Hook::Xdp,
            input: syn[..30].to_vec(),
            verdict: XDP_PASS,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "a TCP header cut short: untouched",
            hook: Hook::TcIngress,
            input: syn[..44].to_vec(),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "an IPv4 header length below 5 words: untouched",
            hook: Hook::TcIngress,
            input: with(syn.clone(), |p| p[14] = 0x44),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "a later fragment before its first, to a ClusterIP: held for it",
            hook: Hook::TcIngress,
            input: with(syn.clone(), |p| p[21] = 0x10),
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            counts: &["fragments_held"],
            before: None,
        },
        Row {
            what: "a later fragment from outside: XDP passes it on to tc, which can hold it",
            hook: Hook::Xdp,
            input: with(syn.clone(), |p| p[21] = 0x10),
            verdict: XDP_PASS,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "there, before its first, to a load-balancer IP: held for it",
            hook: Hook::TcUplink,
            input: with(packet(TCP_ACK, OUTSIDE, LOAD_BALANCER_IP, 40000, 80), |p| {
                p[21] = 0x10;
            }),
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            counts: &["fragments_held"],
            before: None,
        },
        Row {
            what: "a packet that is no fragment, on the uplink's tc ingress: untouched, XDP saw \
                   to it",
            hook: Hook::TcUplink,
            input: packet(TCP_SYN, OUTSIDE, LOAD_BALANCER_IP, 40000, 80),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "a later fragment of a datagram never seen, to another address: untouched",
            hook: Hook::TcIngress,
            input: with(packet(UDP, CLIENT, NOWHERE, 40000, 53), |p| p[21] = 0x10),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "a TCP data offset past the datagram: untouched",
            hook: Hook::TcIngress,
            input: with(syn.clone(), |p| p[46] = 0xf0),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "a TCP data offset below 5 words: untouched",
            hook: Hook::TcIngress,
            input: with(syn.clone(), |p| p[46] = 0x40),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "an IPv4 total length shorter than its headers: untouched",
            hook: Hook::TcIngress,
            input: with(syn.clone(), |p| {
                p[16..18].copy_from_slice(&30u16.to_be_bytes());
            }),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "a UDP length past the datagram: untouched",
            hook: Hook::TcIngress,
            input: with(packet(UDP, CLIENT, DNS_IP, 40001, 53), |p| {
                p[38..40].copy_from_slice(&64u16.to_be_bytes());
            }),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "ICMP to a ClusterIP: untouched (no port to balance)",
            hook: Hook::TcIngress,
            input: with(packet(UDP, CLIENT, CLUSTER_IP, 0, 0), |p| p[23] = 1),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "a backend calling its own Service: DNAT to itself, SNAT to the ClusterIP",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, WEB, CLUSTER_IP, 41000, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_SYN, CLUSTER_IP, WEB, 41000, 8080)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "a UDP datagram to a Service without endpoints: ICMP port unreachable, sent back",
            hook: Hook::TcIngress,
            input: packet(UDP, CLIENT, EMPTY_IP, 40004, 53),
            verdict: TC_ACT_REDIRECT,
            out: Out::Check(unreachable_to_client),
            counts: &["rejected_no_backend"],
            before: None,
        },
        Row {
            what: "an IPv4 total length shorter than the IPv4 header: untouched",
            hook: Hook::TcIngress,
            input: with(syn.clone(), |p| {
                p[16..18].copy_from_slice(&16u16.to_be_bytes());
            }),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "a UDP length below its header: untouched",
            hook: Hook::TcIngress,
            input: with(packet(UDP, CLIENT, DNS_IP, 40001, 53), |p| {
                p[38..40].copy_from_slice(&7u16.to_be_bytes());
            }),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "a frame padded past its datagram (Ethernet's 60 bytes): DNAT, padding kept",
            hook: Hook::TcIngress,
            input: with(packet(TCP_SYN, CLIENT, CLUSTER_IP, 40005, 80), |p| {
                p.extend([0; 6]);
            }),
            verdict: TC_ACT_OK,
            out: Out::Packet(with(packet(TCP_SYN, CLIENT, WEB, 40005, 8080), |p| {
                p.extend([0; 6]);
            })),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "a TCP datagram whose total length is 0 (BIG TCP): DNAT",
            hook: Hook::TcIngress,
            input: big_tcp(packet(TCP_SYN, CLIENT, CLUSTER_IP, 40006, 80)),
            verdict: TC_ACT_OK,
            out: Out::Packet(big_tcp(packet(TCP_SYN, CLIENT, WEB, 40006, 8080))),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "a UDP datagram whose total length is 0: untouched",
            hook: Hook::TcIngress,
            input: big_tcp(packet(UDP, CLIENT, DNS_IP, 40007, 53)),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "a VLAN-tagged frame: untouched",
            hook: Hook::TcIngress,
            input: with(syn, |p| p[12..14].copy_from_slice(&0x8100u16.to_be_bytes())),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "round robin, a first connection: the first backend",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, PAIR_IP, 41000, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_SYN, CLIENT, PAIR[0].0, 41000, 8080)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "round robin, a second connection: the second backend",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, PAIR_IP, 41001, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_SYN, CLIENT, PAIR[1].0, 41001, 8080)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "round robin, a third connection: the first backend again",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, PAIR_IP, 41002, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_SYN, CLIENT, PAIR[0].0, 41002, 8080)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "ClientIP affinity, a first connection: round robin's first backend",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, STICKY_IP, 42000, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_SYN, CLIENT, PAIR[0].0, 42000, 8080)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "ClientIP affinity, the client's second connection: the same backend",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, STICKY_IP, 42001, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_SYN, CLIENT, PAIR[0].0, 42001, 8080)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "ClientIP affinity, another client: round robin's next backend",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, ANOTHER_CLIENT, STICKY_IP, 42002, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_SYN, ANOTHER_CLIENT, PAIR[1].0, 42002, 8080)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "source hash: the client's backend",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, HASHED_IP, 43000, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_SYN, CLIENT, hashed_backend(CLIENT), 43000, 8080)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "source hash, the client's second connection: the same backend",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, HASHED_IP, 43001, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_SYN, CLIENT, hashed_backend(CLIENT), 43001, 8080)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "source hash, another client: its own backend",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, ANOTHER_CLIENT, HASHED_IP, 43002, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(
                TCP_SYN,
                ANOTHER_CLIENT,
                hashed_backend(ANOTHER_CLIENT),
                43002,
                8080,
            )),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "Maglev: the backend at the client's position in the frontend's table",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, MAGLEV_IP, 43100, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_SYN, CLIENT, maglev_backend(CLIENT), 43100, 8080)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "Maglev, another client: its own position's",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, ANOTHER_CLIENT, MAGLEV_IP, 43101, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(
                TCP_SYN,
                ANOTHER_CLIENT,
                maglev_backend(ANOTHER_CLIENT),
                43101,
                8080,
            )),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "Maglev with mh-port: the client's port in the hash (43300)",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, MAGLEV_IP, 43300, 81),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(
                TCP_SYN,
                CLIENT,
                maglev_port_backend(CLIENT, 43300),
                43300,
                8080,
            )),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "Maglev with mh-port: the client's port in the hash (43301)",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, MAGLEV_IP, 43301, 81),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(
                TCP_SYN,
                CLIENT,
                maglev_port_backend(CLIENT, 43301),
                43301,
                8080,
            )),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "Maglev with mh-port: the client's port in the hash (43302)",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, MAGLEV_IP, 43302, 81),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(
                TCP_SYN,
                CLIENT,
                maglev_port_backend(CLIENT, 43302),
                43302,
                8080,
            )),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "Maglev with mh-port: the client's port in the hash (43303)",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, MAGLEV_IP, 43303, 81),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(
                TCP_SYN,
                CLIENT,
                maglev_port_backend(CLIENT, 43303),
                43303,
                8080,
            )),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "least connection: the backend with fewer open flows",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, LEAST_IP, 43200, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_SYN, CLIENT, PAIR[1].0, 43200, 8080)),
            counts: &["new_flows"],
            before: Some(pair_first_busy),
        },
        Row {
            what: "least connection: the same again, the first flow counted on it",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, LEAST_IP, 43201, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_SYN, CLIENT, PAIR[1].0, 43201, 8080)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "least connection: a reset closes the first flow: active no more, inactive",
            hook: Hook::TcIngress,
            input: packet(TCP_RST, CLIENT, LEAST_IP, 43200, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_RST, CLIENT, PAIR[1].0, 43200, 8080)),
            counts: &["forwarded"],
            before: None,
        },
        Row {
            what: "least connection: one open flow weighs more than 255 closing ones",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, LEAST_IP, 43202, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_SYN, CLIENT, PAIR[0].0, 43202, 8080)),
            counts: &["new_flows"],
            before: Some(pair_loads_differ),
        },
        Row {
            what: "shortest expected delay: closing flows do not count, open ones do",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, SED_IP, 43203, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_SYN, CLIENT, PAIR[1].0, 43203, 8080)),
            counts: &["new_flows"],
            before: Some(pair_loads_differ_again),
        },
        Row {
            what: "shortest expected delay: a scan from the second slot wraps to the first, the \
                   least loaded",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, SED_IP, 43204, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_SYN, CLIENT, PAIR[0].0, 43204, 8080)),
            counts: &["new_flows"],
            before: Some(pair_second_busy_scan_from_second),
        },
        Row {
            what: "never queue, from outside (XDP): the idle backend, though it holds closing \
                   flows that least connection would count",
            hook: Hook::Xdp,
            input: packet(TCP_SYN, CLIENT, NEVER_QUEUE_LB_IP, 43205, 80),
            verdict: XDP_PASS,
            out: Out::Packet(packet(TCP_SYN, CLIENT, PAIR[0].0, 43205, 8080)),
            counts: &["new_flows"],
            before: Some(pair_first_idle_but_closing),
        },
        Row {
            what: "a flow whose reply entry was evicted: DNAT, and the reply entry made again",
            hook: Hook::TcIngress,
            input: packet(TCP_ACK, CLIENT, CLUSTER_IP, 40000, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_ACK, CLIENT, WEB, 40000, 8080)),
            counts: &["forwarded"],
            before: Some(reply_evicted),
        },
        Row {
            what: "its backend's answer, leaving: reverse NAT from the entry made again",
            hook: Hook::TcEgress,
            input: packet(TCP_ACK, WEB, CLIENT, 8080, 40000),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_ACK, CLUSTER_IP, CLIENT, 80, 40000)),
            counts: &["replied"],
            before: None,
        },
        Row {
            what: "a TCP SYN with IPv4 options to a ClusterIP: DNAT, options kept",
            hook: Hook::TcIngress,
            input: ip_options(packet(TCP_SYN, CLIENT, CLUSTER_IP, 40020, 80)),
            verdict: TC_ACT_OK,
            out: Out::Packet(ip_options(packet(TCP_SYN, CLIENT, WEB, 40020, 8080))),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "a UDP datagram with IPv4 options to a ClusterIP: DNAT, options kept",
            hook: Hook::TcIngress,
            input: ip_options(packet(UDP, CLIENT, DNS_IP, 40021, 53)),
            verdict: TC_ACT_OK,
            out: Out::Packet(ip_options(packet(UDP, CLIENT, DNS, 40021, 5353))),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "a TCP SYN with IPv4 options from outside: DNAT, options kept",
            hook: Hook::Xdp,
            input: ip_options(packet(TCP_SYN, CLIENT, LOAD_BALANCER_IP, 40033, 80)),
            verdict: XDP_PASS,
            out: Out::Packet(ip_options(packet(TCP_SYN, CLIENT, WEB, 40033, 8080))),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "a TCP SYN with IPv4 options to a Service without endpoints: dropped, as a reset \
                   would have to quote the options",
            hook: Hook::TcIngress,
            input: ip_options(packet(TCP_SYN, CLIENT, EMPTY_IP, 40022, 80)),
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            counts: &["rejected_no_backend"],
            before: None,
        },
        Row {
            what: "a reset to a Service without endpoints: dropped, never answered",
            hook: Hook::TcIngress,
            input: packet(TCP_RST, CLIENT, EMPTY_IP, 40023, 80),
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            counts: &["rejected_no_backend"],
            before: None,
        },
        Row {
            what: "a Service that drops without endpoints (internalTrafficPolicy Local): dropped",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, LOCAL_ONLY_IP, 40024, 80),
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            counts: &["dropped_no_backend"],
            before: None,
        },
        Row {
            what: "another client from outside to the remote backend, the one SNAT port taken: dropped",
            hook: Hook::Xdp,
            input: packet(TCP_SYN, ANOTHER_CLIENT, REMOTE_LB_IP, 40025, 80),
            verdict: XDP_DROP,
            out: Out::Unchanged,
            counts: &["dropped_no_snat"],
            before: None,
        },
        Row {
            what: "from outside, an IPv4 total length past the frame: untouched",
            hook: Hook::Xdp,
            input: past_the_frame(packet(TCP_SYN, CLIENT, LOAD_BALANCER_IP, 40030, 80)),
            verdict: XDP_PASS,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "from outside, a TCP total length of 0 (BIG TCP after GRO, generic XDP): DNAT",
            hook: Hook::Xdp,
            input: big_tcp(packet(TCP_SYN, CLIENT, LOAD_BALANCER_IP, 40031, 80)),
            verdict: XDP_PASS,
            out: Out::Packet(big_tcp(packet(TCP_SYN, CLIENT, WEB, 40031, 8080))),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "a total length past what tc sees (a GSO skb's linear part): DNAT",
            hook: Hook::TcIngress,
            input: past_the_frame(packet(TCP_ACK, CLIENT, CLUSTER_IP, 40032, 80)),
            verdict: TC_ACT_OK,
            out: Out::Packet(past_the_frame(packet(TCP_ACK, CLIENT, WEB, 40032, 8080))),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "a reject over the rate limit: dropped, counted, no answer",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, EMPTY_IP, 40040, 80),
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            counts: &["rejected_no_backend", "rejects_limited"],
            before: Some(rejects_spent),
        },
        Row {
            what: "after a quiet while, rejects are answered again",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, EMPTY_IP, 40003, 80),
            verdict: TC_ACT_REDIRECT,
            out: Out::Check(reset_to_client),
            counts: &["rejected_no_backend"],
            before: Some(rejects_rested),
        },
        Row {
            what: "ClientIP affinity across a Service port's frontends: from outside, the backend \
                   the client has through the ClusterIP, in whichever slot it is here",
            hook: Hook::Xdp,
            input: packet(TCP_SYN, CLIENT, STICKY_LB_IP, 42010, 80),
            verdict: XDP_PASS,
            out: Out::Packet(packet(TCP_SYN, CLIENT, PAIR[0].0, 42010, 8080)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "to a load-balancer IP with source ranges, from inside them: DNAT",
            hook: Hook::Xdp,
            input: packet(TCP_SYN, OUTSIDE, RANGED_LB_IP, 43000, 80),
            verdict: XDP_PASS,
            out: Out::Packet(packet(TCP_SYN, OUTSIDE, WEB, 43000, 8080)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "from outside the ranges: dropped",
            hook: Hook::Xdp,
            input: packet(TCP_SYN, CLIENT, RANGED_LB_IP, 43001, 80),
            verdict: XDP_DROP,
            out: Out::Unchanged,
            counts: &["dropped_source_range"],
            before: None,
        },
        Row {
            what: "from a pod outside the ranges: dropped",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, RANGED_LB_IP, 43002, 80),
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            counts: &["dropped_source_range"],
            before: None,
        },
        Row {
            what: "from its own backend (the hairpin path), outside the ranges: dropped",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, WEB, RANGED_LB_IP, 43005, 80),
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            counts: &["dropped_source_range"],
            before: None,
        },
        Row {
            what: "from outside the ranges to a port without endpoints: dropped, no reject",
            hook: Hook::Xdp,
            input: packet(TCP_SYN, CLIENT, RANGED_LB_IP, 43003, 81),
            verdict: XDP_DROP,
            out: Out::Unchanged,
            counts: &["dropped_source_range"],
            before: None,
        },
        Row {
            what: "the ranges narrowed: the established flow goes on, as kube-proxy checks new \
                   flows only",
            hook: Hook::Xdp,
            input: packet(TCP_ACK, OUTSIDE, RANGED_LB_IP, 43000, 80),
            verdict: XDP_PASS,
            out: Out::Packet(packet(TCP_ACK, OUTSIDE, WEB, 43000, 8080)),
            counts: &["forwarded"],
            before: Some(ranges_narrowed),
        },
        Row {
            what: "but a new flow from that source is dropped",
            hook: Hook::Xdp,
            input: packet(TCP_SYN, OUTSIDE, RANGED_LB_IP, 43004, 80),
            verdict: XDP_DROP,
            out: Out::Unchanged,
            counts: &["dropped_source_range"],
            before: None,
        },
        Row {
            what: "a flow the ICMP errors below are about",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, CLUSTER_IP, 44000, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_SYN, CLIENT, WEB, 44000, 8080)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "the node's \"fragmentation needed\" about it, leaving for the client: the quote \
                   is what the client sent, to the ClusterIP",
            hook: Hook::TcEgress,
            input: fragmentation_needed(POD_GATEWAY, CLIENT, (CLIENT, 44000), (WEB, 8080)),
            verdict: TC_ACT_OK,
            out: Out::Packet(fragmentation_needed(
                POD_GATEWAY,
                CLIENT,
                (CLIENT, 44000),
                (CLUSTER_IP, 80),
            )),
            counts: &["icmp_translated"],
            before: None,
        },
        Row {
            what: "that error before routing, its destination unchanged: left to egress",
            hook: Hook::TcIngress,
            input: fragmentation_needed(POD_GATEWAY, CLIENT, (CLIENT, 44000), (WEB, 8080)),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "a UDP backend's own port unreachable: from the ClusterIP, quoting it",
            hook: Hook::TcEgress,
            input: port_unreachable(DNS, CLIENT, &packet(UDP, CLIENT, DNS, 40001, 5353)),
            verdict: TC_ACT_OK,
            out: Out::Packet(port_unreachable(
                DNS_IP,
                CLIENT,
                &packet(UDP, CLIENT, DNS_IP, 40001, 53),
            )),
            counts: &["icmp_translated"],
            before: None,
        },
        Row {
            what: "\"fragmentation needed\" about a SNATed flow, to the node: to the client, \
                   quoting its own packet",
            hook: Hook::Xdp,
            input: fragmentation_needed(ROUTER, NODE_IP, (NODE_IP, SNAT_PORT), (REMOTE, 8080)),
            verdict: XDP_PASS,
            out: Out::Packet(fragmentation_needed(
                ROUTER,
                OUTSIDE,
                (OUTSIDE, 40010),
                (REMOTE_LB_IP, 80),
            )),
            counts: &["icmp_translated"],
            before: None,
        },
        Row {
            what: "the node's own \"fragmentation needed\" about a SNATed flow, addressed to \
                   itself, on lo: to the client, out of the interface its route takes",
            hook: Hook::TcLoopback,
            input: fragmentation_needed(NODE_IP, NODE_IP, (NODE_IP, SNAT_PORT), (REMOTE, 8080)),
            verdict: TC_ACT_REDIRECT,
            out: Out::Packet(fragmentation_needed(
                NODE_IP,
                OUTSIDE,
                (OUTSIDE, 40010),
                (REMOTE_LB_IP, 80),
            )),
            counts: &["icmp_translated"],
            before: None,
        },
        Row {
            what: "a TCP SYN to a NodePort, from outside, its backend on another node: DNAT and \
                   SNAT",
            hook: Hook::Xdp,
            input: packet(TCP_SYN, OUTSIDE, NODE_IP, 40020, NODE_PORT),
            verdict: XDP_PASS,
            out: Out::Packet(packet(TCP_SYN, NODE_IP, REMOTE, SNAT_PORT, 8443)),
            counts: &["new_flows", "snat_flows"],
            before: None,
        },
        Row {
            what: "the node's own \"fragmentation needed\" about its backend's reply, from the \
                   NodePort (the node's address), on lo: to the backend, quoting what it sent",
            hook: Hook::TcLoopback,
            input: fragmentation_needed(NODE_IP, NODE_IP, (NODE_IP, NODE_PORT), (OUTSIDE, 40020)),
            verdict: TC_ACT_REDIRECT,
            out: Out::Packet(fragmentation_needed(
                NODE_IP,
                REMOTE,
                (REMOTE, 8443),
                (NODE_IP, SNAT_PORT),
            )),
            counts: &["icmp_translated"],
            before: None,
        },
        Row {
            what: "an error on lo about no tracked flow: on over lo, untouched",
            hook: Hook::TcLoopback,
            input: fragmentation_needed(NODE_IP, NODE_IP, (NODE_IP, 45000), (REMOTE, 8080)),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "a packet on lo that is no ICMP error: untouched",
            hook: Hook::TcLoopback,
            input: packet(TCP_SYN, NODE_IP, NODE_IP, 45000, 22),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "time exceeded about a reply, to the ClusterIP: to the backend, quoting what \
                   it sent",
            hook: Hook::TcIngress,
            input: time_exceeded(
                POD_GATEWAY,
                CLUSTER_IP,
                &packet(TCP_ACK, CLUSTER_IP, CLIENT, 80, 44000),
            ),
            verdict: TC_ACT_OK,
            out: Out::Packet(time_exceeded(
                POD_GATEWAY,
                WEB,
                &packet(TCP_ACK, WEB, CLIENT, 8080, 44000),
            )),
            counts: &["icmp_translated"],
            before: None,
        },
        Row {
            what: "a fragmented datagram's first fragment, to a ClusterIP: DNAT",
            hook: Hook::TcIngress,
            input: big_query(CLUSTER_FRAGMENTS, 0),
            verdict: TC_ACT_OK,
            out: Out::Packet(big_query(BACKEND_FRAGMENTS, 0)),
            counts: &["new_flows"],
            before: None,
        },
        Row {
            what: "its later fragments follow it, addresses rewritten",
            hook: Hook::TcIngress,
            input: big_query(CLUSTER_FRAGMENTS, 1),
            verdict: TC_ACT_OK,
            out: Out::Packet(big_query(BACKEND_FRAGMENTS, 1)),
            counts: &["forwarded"],
            before: None,
        },
        Row {
            what: "the last one too",
            hook: Hook::TcIngress,
            input: big_query(CLUSTER_FRAGMENTS, 2),
            verdict: TC_ACT_OK,
            out: Out::Packet(big_query(BACKEND_FRAGMENTS, 2)),
            counts: &["forwarded"],
            before: None,
        },
        Row {
            what: "a later fragment under that IP id 30 s on: another datagram's, held for its \
                   own first",
            hook: Hook::TcIngress,
            input: big_query(CLUSTER_FRAGMENTS, 1),
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            counts: &["fragments_held"],
            before: Some(first_fragment_long_ago),
        },
        Row {
            what: "a later fragment whose datagram's room holds fragments over 30 s old: held in \
                   their place",
            hook: Hook::TcIngress,
            input: query_fragment(CLUSTER_FRAGMENTS, STALE_ID, 1),
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            counts: &["fragments_held"],
            before: Some(held_long_ago),
        },
        Row {
            what: "the backend's fragmented answer, leaving: its first fragment from the ClusterIP",
            hook: Hook::TcEgress,
            input: big_answer(DNS, 5353, 0),
            verdict: TC_ACT_OK,
            out: Out::Packet(big_answer(DNS_IP, 53, 0)),
            counts: &["replied"],
            before: None,
        },
        Row {
            what: "and its later fragments",
            hook: Hook::TcEgress,
            input: big_answer(DNS, 5353, 1),
            verdict: TC_ACT_OK,
            out: Out::Packet(big_answer(DNS_IP, 53, 1)),
            counts: &["replied"],
            before: None,
        },
        Row {
            what: "an error quoting 8 bytes only, in a frame padded past it: the quote's ports \
                   translated, the padding (where a TCP checksum would be) untouched",
            hook: Hook::TcEgress,
            input: padded(short_quote(
                POD_GATEWAY,
                CLIENT,
                (CLIENT, 44000),
                (WEB, 8080),
            )),
            verdict: TC_ACT_OK,
            out: Out::Packet(padded(short_quote(
                POD_GATEWAY,
                CLIENT,
                (CLIENT, 44000),
                (CLUSTER_IP, 80),
            ))),
            counts: &["icmp_translated"],
            before: None,
        },
        Row {
            what: "a fragmented segment from outside the ranges: XDP passes its first fragment",
            hook: Hook::Xdp,
            input: segment_fragment(CLIENT, 43010, (RANGED_LB_IP, 80), 0),
            verdict: XDP_PASS,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "which tc drops",
            hook: Hook::TcUplink,
            input: segment_fragment(CLIENT, 43010, (RANGED_LB_IP, 80), 0),
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            counts: &["dropped_source_range"],
            before: None,
        },
        Row {
            what: "and its later one, placed nowhere, is held, never to be sent on: no backend \
                   behind the ranges sees it",
            hook: Hook::TcUplink,
            input: segment_fragment(CLIENT, 43010, (RANGED_LB_IP, 80), 1),
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            counts: &["fragments_held"],
            before: None,
        },
        Row {
            what: "a fragmented segment of a SNATed flow from outside: its first fragment DNATed \
                   and SNATed",
            hook: Hook::TcUplink,
            input: segment_fragment(OUTSIDE, 40010, (REMOTE_LB_IP, 80), 0),
            verdict: TC_ACT_OK,
            out: Out::Packet(segment_fragment(NODE_IP, SNAT_PORT, (REMOTE, 8080), 0)),
            counts: &["forwarded"],
            before: None,
        },
        Row {
            what: "its later fragment: both addresses rewritten",
            hook: Hook::TcUplink,
            input: segment_fragment(OUTSIDE, 40010, (REMOTE_LB_IP, 80), 1),
            verdict: TC_ACT_OK,
            out: Out::Packet(segment_fragment(NODE_IP, SNAT_PORT, (REMOTE, 8080), 1)),
            counts: &["forwarded"],
            before: None,
        },
        Row {
            what: "the remote backend's fragmented answer, later fragment first: held",
            hook: Hook::TcUplink,
            input: segment_fragment(REMOTE, 8080, (NODE_IP, SNAT_PORT), 1),
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            counts: &["fragments_held"],
            before: None,
        },
        Row {
            what: "its first fragment: back to the client, from the load-balancer IP, cloned \
                   ahead of the held one, which is written over the skb and cloned after it",
            hook: Hook::TcUplink,
            input: segment_fragment(REMOTE, 8080, (NODE_IP, SNAT_PORT), 0),
            verdict: TC_ACT_SHOT,
            out: Out::Packet(segment_fragment(REMOTE, 8080, (NODE_IP, SNAT_PORT), 1)),
            counts: &["replied"],
            before: None,
        },
        Row {
            what: "the held fragment, come round again: back to the client as its first",
            hook: Hook::TcUplink,
            input: segment_fragment(REMOTE, 8080, (NODE_IP, SNAT_PORT), 1),
            verdict: TC_ACT_OK,
            out: Out::Packet(segment_fragment(REMOTE_LB_IP, 80, (OUTSIDE, 40010), 1)),
            counts: &["replied"],
            before: None,
        },
        Row {
            what: "a fragmented segment to the node, no service's, its later fragment first: held",
            hook: Hook::TcUplink,
            input: segment_fragment(OUTSIDE, 40011, (NODE_IP, 22), 1),
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            counts: &["fragments_held"],
            before: None,
        },
        Row {
            what: "its first fragment, untouched, sends the held one on behind it: the first \
                   cloned ahead, the held one written over the skb and cloned, the skb dropped",
            hook: Hook::TcUplink,
            input: segment_fragment(OUTSIDE, 40011, (NODE_IP, 22), 0),
            verdict: TC_ACT_SHOT,
            out: Out::Packet(segment_fragment(OUTSIDE, 40011, (NODE_IP, 22), 1)),
            counts: &[],
            before: None,
        },
        Row {
            what: "the held fragment, come round again: it finds where its first went, untouched",
            hook: Hook::TcUplink,
            input: segment_fragment(OUTSIDE, 40011, (NODE_IP, 22), 1),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        Row {
            what: "a later fragment too long to hold, before its first, to the node: passed \
                   untouched (the kernel may reassemble it), counted",
            hook: Hook::TcUplink,
            input: oversized_later_fragment(OUTSIDE, (NODE_IP, 5353)),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &["fragments_unmatched"],
            before: None,
        },
        Row {
            what: "the same to a ClusterIP, whose datagrams are all a service's: dropped, counted",
            hook: Hook::TcIngress,
            input: oversized_later_fragment(CLIENT, (DNS_IP, 53)),
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            counts: &["fragments_unmatched"],
            before: None,
        },
        Row {
            what: "an ICMP error about no tracked flow: untouched",
            hook: Hook::TcEgress,
            input: fragmentation_needed(POD_GATEWAY, CLIENT, (CLIENT, 44001), (NOWHERE, 80)),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
            before: None,
        },
        // Last of the IPv4 rows: the far Service goes.
        Row {
            what: "a fragmented segment of a flow whose Service is gone, and its address with \
                   it: the first fragment follows the flow",
            hook: Hook::TcUplink,
            input: orphan_segment_fragment(OUTSIDE, 40010, (REMOTE_LB_IP, 80), 0),
            verdict: TC_ACT_OK,
            out: Out::Packet(orphan_segment_fragment(
                NODE_IP,
                SNAT_PORT,
                (REMOTE, 8080),
                0,
            )),
            counts: &["forwarded"],
            before: Some(far_service_gone),
        },
        Row {
            what: "and its later fragment, placed by the ports the first left all the same",
            hook: Hook::TcUplink,
            input: orphan_segment_fragment(OUTSIDE, 40010, (REMOTE_LB_IP, 80), 1),
            verdict: TC_ACT_OK,
            out: Out::Packet(orphan_segment_fragment(
                NODE_IP,
                SNAT_PORT,
                (REMOTE, 8080),
                1,
            )),
            counts: &["forwarded"],
            before: None,
        },
    ]
}

/// Where [`big_query`] goes: the ClusterIP, and the backend its flow gets.
const CLUSTER_FRAGMENTS: (Ipv4Addr, u16) = (DNS_IP, 53);
const BACKEND_FRAGMENTS: (Ipv4Addr, u16) = (DNS, 5353);

/// Fragment `n` of a 3,000-byte UDP query from the client's port 45000 to `to`, in fragments
/// of 1,480 bytes, as a 1,500-byte link splits it.
fn big_query(to: (Ipv4Addr, u16), n: usize) -> Vec<u8> {
    query_fragment(to, BIG_QUERY_ID, n)
}

/// Fragment `n` of [`big_query`]'s datagram to `to`, under IP id `id`.
fn query_fragment(to: (Ipv4Addr, u16), id: u16, n: usize) -> Vec<u8> {
    let whole = datagram(UDP, CLIENT, to.0, 45000, to.1, 3000);
    fragments(&whole, id, 1480).swap_remove(n)
}

const BIG_QUERY_ID: u16 = 0x4242;
/// The IP id of a datagram whose room [`held_long_ago`] fills.
const STALE_ID: u16 = 0x6001;

/// The later of the two fragments of a 3,000-byte UDP datagram from `from`'s port 45001 to
/// `to`, cut after 1,504 bytes: 1,516 bytes from its IPv4 header on, too long to hold.
fn oversized_later_fragment(from: Ipv4Addr, to: (Ipv4Addr, u16)) -> Vec<u8> {
    let whole = datagram(UDP, from, to.0, 45001, to.1, 2992);
    fragments(&whole, 0x7003, 1504).swap_remove(1)
}

/// [`segment_fragment`] under another IP id, of a datagram after the far Service went.
fn orphan_segment_fragment(client: Ipv4Addr, port: u16, to: (Ipv4Addr, u16), n: usize) -> Vec<u8> {
    let whole = datagram(TCP_ACK, client, to.0, port, to.1, 2000);
    fragments(&whole, 0x7005, 1480).swap_remove(n)
}

/// As the agent does when the far Service is deleted: its frontends and its address go, its
/// flows stay.
fn far_service_gone(tables: &mut Tables) {
    // The far Service has one frontend, from outside.
    let key = tcp_frontend_key(REMOTE_LB_IP, 80, SCOPE_EXTERNAL);
    tables.frontends.remove(&key).expect("the far frontend");
    tables
        .vips
        .remove(&ipv4_be(REMOTE_LB_IP))
        .expect("the far address");
}

/// Fragment `n` of a TCP segment of 2,000 bytes from `client:port` to `to`, in fragments of
/// 1,480 bytes.
fn segment_fragment(client: Ipv4Addr, port: u16, to: (Ipv4Addr, u16), n: usize) -> Vec<u8> {
    let whole = datagram(TCP_ACK, client, to.0, port, to.1, 2000);
    fragments(&whole, 0x7001, 1480).swap_remove(n)
}

/// Fragment `n` of a 2,000-byte UDP answer to [`big_query`], from `from`.
fn big_answer(from: Ipv4Addr, port: u16, n: usize) -> Vec<u8> {
    let whole = datagram(UDP, from, CLIENT, port, 45000, 2000);
    fragments(&whole, 0x5151, 1480).swap_remove(n)
}

/// "Fragmentation needed" (next hop MTU 1280) from `router` to `to`, quoting a TCP segment
/// from `src` to `dst`.
fn fragmentation_needed(
    router: Ipv4Addr,
    to: Ipv4Addr,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
) -> Vec<u8> {
    let quoted = packet(TCP_ACK, src.0, dst.0, src.1, dst.1);
    icmp_error(
        ICMP_UNREACHABLE,
        ICMP_FRAGMENTATION_NEEDED,
        router,
        to,
        1280,
        &quoted,
    )
}

/// "Packet too big" (MTU 1280) from `router` to `to`, quoting a TCP segment from `src` to
/// `dst`.
fn packet_too_big(
    router: Ipv6Addr,
    to: Ipv6Addr,
    src: (Ipv6Addr, u16),
    dst: (Ipv6Addr, u16),
) -> Vec<u8> {
    let quoted = packet6(TCP_ACK, src.0, dst.0, src.1, dst.1);
    icmp6_error(ICMPV6_PACKET_TOO_BIG, 0, router, to, 1280, &quoted)
}

/// A port unreachable from `from` to `to`, quoting `quoted`.
fn port_unreachable(from: Ipv4Addr, to: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    icmp_error(ICMP_UNREACHABLE, ICMP_PORT_UNREACHABLE, from, to, 0, quoted)
}

/// A time exceeded (in transit) from `from` to `to`, quoting `quoted`.
fn time_exceeded(from: Ipv4Addr, to: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    icmp_error(ICMP_TIME_EXCEEDED, 0, from, to, 0, quoted)
}

/// [`fragmentation_needed`] quoting the IPv4 header and 8 bytes only, as RFC 792 asks.
fn short_quote(
    router: Ipv4Addr,
    to: Ipv4Addr,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
) -> Vec<u8> {
    let mut quoted = packet(TCP_ACK, src.0, dst.0, src.1, dst.1);
    quoted.truncate(14 + 20 + 8);
    icmp_error(
        ICMP_UNREACHABLE,
        ICMP_FRAGMENTATION_NEEDED,
        router,
        to,
        1280,
        &quoted,
    )
}

/// `p` with 16 bytes after its datagram, as a short frame padded by a link.
fn padded(mut p: Vec<u8>) -> Vec<u8> {
    p.extend([0xee; 16]);
    p
}

/// Pins this thread to the CPU it runs on.
/// Runs `program` on `input` through aya: its verdict and how much of `output` it wrote.
fn run<P>(program: &P, input: &[u8], output: &mut [u8]) -> Result<(u32, u32), String>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(input);
    opts.data_out = Some(output);
    program
        .test_run(opts)
        .map(|result| (result.return_value, result.data_size_out))
        .map_err(|e| format!("{e:?}"))
}

/// `BPF_PROG_TEST_RUN`'s attributes (`union bpf_attr`'s `test`), as far as they are used.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// The kernel gives the skb a `CHECKSUM_COMPLETE` sum of the packet, and after the run checks
/// that the sum still is the packet's (Linux 6.11; aya's options cannot set the flag): a tc
/// rewrite must keep the sum of a NIC's skbs right, not only the packet's checksums.
const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;
const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// Runs the tc `program` on `input` as a `CHECKSUM_COMPLETE` skb; its verdict and how much of
/// `output` it wrote, or why the run failed (`EBADMSG`: the skb's sum no longer matches).
fn run_checksum_complete(
    program: &SchedClassifier,
    input: &[u8],
    output: &mut [u8],
) -> Result<(u32, u32), String> {
    let fd = program.fd().map_err(|e| format!("{e:?}"))?;
    let mut attr = TestRunAttr {
        prog_fd: fd.as_fd().as_raw_fd() as u32,
        data_size_in: input.len() as u32,
        data_size_out: output.len() as u32,
        data_in: input.as_ptr() as u64,
        data_out: output.as_mut_ptr() as u64,
        repeat: 1,
        flags: BPF_F_TEST_SKB_CHECKSUM_COMPLETE,
        ..TestRunAttr::default()
    };
    // SAFETY: `attr` is `bpf_attr`'s `test` member, its pointers to `input` and `output` with
    // their lengths, both alive across the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &raw mut attr,
            size_of::<TestRunAttr>(),
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok((attr.retval, attr.data_size_out))
}

fn pin_to_one_cpu() {
    // SAFETY: a zeroed cpu_set_t is empty; the calls read and write only it.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set),
            0,
            "sched_setaffinity"
        );
    }
}

/// Moves this thread into a network namespace of its own, which the kernel removes with it:
/// forwarding on, the node's address on a veth and a default route through a router on it,
/// so that the route lookups of the rows that redirect (`lo`'s) find what a node's would.
fn routed_network_of_its_own() {
    // SAFETY: no pointer; affects this thread only, which the rows run on.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
    let node = format!("{NODE_IP}/24");
    let router = ROUTER.to_string();
    let node6 = format!("{}/112", v6(NODE_IP));
    let router6 = v6(ROUTER).to_string();
    let commands: [&[&str]; 9] = [
        &["ip", "link", "set", "lo", "up"],
        &["sysctl", "-qw", "net.ipv4.ip_forward=1"],
        &[
            "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1",
        ],
        &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
        &["ip", "addr", "add", &node, "dev", "up0"],
        &["ip", "addr", "add", &node6, "dev", "up0", "nodad"],
        &["ip", "link", "set", "up0", "up"],
        &["ip", "route", "add", "default", "via", &router],
        &["ip", "-6", "route", "add", "default", "via", &router6],
    ];
    for command in commands {
        // Children take the namespace of the thread that forks them.
        let status = std::process::Command::new(command[0])
            .args(&command[1..])
            .status()
            .unwrap_or_else(|e| panic!("{command:?}: {e}"));
        assert!(status.success(), "{command:?}: {status}");
    }
}

/// The datapath of this test, removed when it ends, passed or not.
struct Loaded(Option<Datapath>);

impl Drop for Loaded {
    fn drop(&mut self) {
        if let Some(datapath) = self.0.take()
            && let Err(e) = datapath.remove()
        {
            eprintln!("removing the test's datapath: {}", lb_user::error_chain(&e));
        }
    }
}

#[test]
fn each_packet_gets_its_verdict_its_bytes_and_its_counter() {
    let (datapath, mut maps) = datapath::scratch("packets").expect("the datapath, loaded (root)");
    let loaded = Loaded(Some(datapath));
    let datapath = loaded.0.as_ref().expect("loaded");
    maps.write_config(&Config {
        tcp_open_timeout_ns: 3_600_000_000_000,
        tcp_closing_timeout_ns: 10_000_000_000,
        udp_timeout_ns: 60_000_000_000,
        snat_addr_be: ipv4_be(NODE_IP),
        snat_addr6_be: ipv6_be(v6(NODE_IP)),
        snat_port_min: SNAT_PORT,
        snat_port_max: SNAT_PORT,
        netns_cookie: 0,
        rejects_per_sec_per_cpu: 1,
        reject_burst_per_cpu: 2,
    })
    .unwrap();
    let (entries, skipped) = plan::entries(&programme(), NODE);
    assert!(skipped.is_empty(), "{skipped:?}");
    for op in plan::diff(&MapEntries::default(), &entries) {
        maps.apply(&op).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    }
    let programs = datapath.packet_programs().unwrap();
    let mut tables = Tables::open(datapath.pins());
    // Round robin turns a cursor per CPU: every run on one CPU.
    pin_to_one_cpu();
    routed_network_of_its_own();
    assert_ne!(hashed_backend(CLIENT), hashed_backend(ANOTHER_CLIENT));
    // The Maglev rows tell a table from source hash over the backends.
    assert!(
        [CLIENT, ANOTHER_CLIENT]
            .iter()
            .any(|&c| maglev_backend(c) != hashed_backend(c)),
        "pick another MAGLEV_TABLE_SIZE"
    );
    let mut failures = Vec::new();
    for row in rows().into_iter().chain(ipv6_rows()) {
        if let Some(before) = row.before {
            before(&mut tables);
        }
        let before = maps.stats().unwrap();
        let mut output = vec![0u8; row.input.len() + 128];
        let tc = match row.hook {
            Hook::TcIngress => Some(programs.tc_ingress),
            Hook::TcEgress => Some(programs.tc_egress),
            Hook::TcUplink => Some(programs.tc_uplink),
            Hook::TcLoopback => Some(programs.tc_loopback),
            Hook::Xdp => None,
        };
        let ran = match tc {
            // What tc passes on must leave a NIC's CHECKSUM_COMPLETE sum right. An answer
            // or a replay that grows the skb turns its sum off (CHECKSUM_NONE), which the
            // kernel's check does not heed: those run as plain skbs.
            Some(program) if row.verdict == TC_ACT_OK => {
                run_checksum_complete(program, &row.input, &mut output)
            }
            Some(program) => run(program, &row.input, &mut output),
            None => run(programs.xdp, &row.input, &mut output),
        };
        let (return_value, size_out) = match ran {
            Ok(ran) => ran,
            Err(e) => {
                failures.push(format!("{:?}: {}: test run: {e}", row.hook, row.what));
                continue;
            }
        };
        output.truncate(size_out as usize);
        let after = maps.stats().unwrap();
        let mut wrong = Vec::new();
        if return_value != row.verdict {
            wrong.push(format!("verdict {return_value}, not {}", row.verdict));
        }
        match &row.out {
            Out::Packet(expected) if output != *expected => {
                wrong.push(format!("left {output:02x?}\n  wanted {expected:02x?}"));
            }
            Out::Unchanged if output != row.input => {
                wrong.push(format!("changed the packet to {output:02x?}"));
            }
            Out::Check(check) => wrong.extend(check(&output).err()),
            _ => {}
        }
        for ((name, then), (_, now)) in counters(&before).into_iter().zip(counters(&after)) {
            // Forwarding counts every packet sent to a backend, a new flow's first too.
            let wanted = u64::from(
                row.counts.contains(&name)
                    || (name == "forwarded" && row.counts.contains(&"new_flows")),
            );
            if now - then != wanted {
                wrong.push(format!("{name} moved by {}, not {wanted}", now - then));
            }
        }
        for name in row.counts {
            assert!(
                counters(&after).iter().any(|(n, _)| n == name),
                "{}: no counter {name}",
                row.what
            );
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "{:?}: {}:\n  {}",
                row.hook,
                row.what,
                wrong.join("\n  ")
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
