//! Map names, keys and values.
//!
//! Lookups follow Katran's chain of small integer ids: a frontend (address, port, protocol) names a
//! service id; `(service id, slot)` names a backend id (a Maglev or least-connection frontend's
//! slot is a position of its table in [`SLOT_TABLES`]); the backend id names an address. Id 0 is never used, so a
//! zeroed value reads as "none".
//!
//! Names carry a layout version (`_v1`): a change to a key or value layout bumps it, so a new
//! agent never reads an old pinned map with the wrong layout.
//!
//! Each family has its own maps, as Cilium's `lb4_*` and `lb6_*`: an IPv4 key stays as small as
//! it was (a flow key of 16 bytes, not Katran's 40 for both), so that IPv4, most of the traffic
//! of most clusters, pays nothing in hashing or memory for IPv6. The types that hold an address
//! are generic over it, [`u32`] for IPv4 (the default) and [`Ipv6Be`]: one definition of each,
//! and the datapath's code is one too, over both. What holds no address (a frontend, a slot,
//! the counters, the config) is shared, and so are the ids: a service id or a backend id is
//! never of both families.

/// Frontends: [`FrontendKey`] -> [`Frontend`]. Written by the agent.
pub const FRONTENDS: &str = "lb_frontends_v2";
/// IPv6 frontends: [`FrontendKey<Ipv6Be>`] -> [`Frontend`]. Written by the agent.
pub const FRONTENDS6: &str = "lb_frontends6_v2";
/// Backend slots of each service: [`SlotKey`] -> [`Slot`]. Written by the agent.
pub const SLOTS: &str = "lb_slots_v1";
/// The slot tables of the Maglev and least-connection family frontends, one after another
/// (array, memory-mapped by the agent; a slot is an array read, not a hash lookup): the
/// backend id at each position, [`TABLE_BLOCK`] positions an entry ([`SlotBlock`]). A frontend's table is
/// the [`Frontend::backend_count`] positions from [`Frontend::table_offset`], as Katran's
/// `ch_rings` holds each VIP's ring in one array. Written by the agent through the mapping,
/// only the positions that change.
pub const SLOT_TABLES: &str = "lb_slot_tables_v1";
/// Backends by id: `u32` -> [`Backend`]. Written by the agent: the backends of every slot, and
/// the serving endpoints of UDP frontends that take no new flow but keep their flows.
pub const BACKENDS: &str = "lb_backends_v1";
/// IPv6 backends by id: `u32` -> [`Backend<Ipv6Be>`]. Written by the agent, as [`BACKENDS`].
pub const BACKENDS6: &str = "lb_backends6_v1";
/// Forward flows (LRU): [`FlowKey`] of the client's packet -> [`Flow`]. Written by the datapath.
pub const FLOWS: &str = "lb_flows_v2";
/// IPv6 forward flows (LRU): [`FlowKey<Ipv6Be>`] -> [`Flow<Ipv6Be>`], as [`FLOWS`].
pub const FLOWS6: &str = "lb_flows6_v1";
/// Reply flows (LRU): [`FlowKey`] of the backend's reply -> [`Reply`]. Written by the datapath.
pub const REPLIES: &str = "lb_replies_v1";
/// IPv6 reply flows (LRU): [`FlowKey<Ipv6Be>`] -> [`Reply<Ipv6Be>`], as [`REPLIES`].
pub const REPLIES6: &str = "lb_replies6_v1";
/// Frontend addresses: `u32` address -> [`Vip`]. Written by the agent. A packet to a ClusterIP
/// on a port no frontend serves is dropped (kube-proxy's nftables mode rejects it); a later
/// fragment to any of them that comes before its first waits for it.
pub const VIPS: &str = "lb_vips_v2";
/// IPv6 frontend addresses: [`Ipv6Be`] -> [`Vip`]. Written by the agent, as [`VIPS`].
pub const VIPS6: &str = "lb_vips6_v1";
/// The frontends the node's own unconnected UDP sockets sent to (LRU): [`SocketKey`] ->
/// [`SocketFrontend`]. Written by the datapath at `sendmsg()`; read at `recvmsg()`.
pub const SOCKETS: &str = "lb_sockets_v1";
/// IPv6 sockets' frontends (LRU): [`SocketKey<Ipv6Be>`] -> [`SocketFrontend<Ipv6Be>`], as
/// [`SOCKETS`]. An IPv6 socket that sends to an IPv4-mapped address (`::ffff:10.96.0.53`) is
/// IPv4's: its entry is in [`SOCKETS`].
pub const SOCKETS6: &str = "lb_sockets6_v1";
/// What each of the node's connected sockets dialled: socket cookie (`u64`) -> [`Connected`].
/// Written by the datapath at `connect()`, removed when the socket is released, so that no
/// other socket's churn evicts a long-lived one's; read at `getpeername()` and `recvmsg()`, and
/// by the agent, which resets a connected UDP socket whose backend is gone.
pub const CONNECTED: &str = "lb_connected_v1";
/// What each of the node's connected IPv6 sockets dialled: socket cookie (`u64`) ->
/// [`Connected<Ipv6Be>`], as [`CONNECTED`]; one that dialled an IPv4-mapped address is IPv4's.
pub const CONNECTED6: &str = "lb_connected6_v1";
/// Session affinity (LRU): [`AffinityKey`] -> [`Affinity`]. Written by the datapath.
pub const AFFINITY: &str = "lb_affinity_v1";
/// IPv6 session affinity (LRU): [`AffinityKey<Ipv6Be>`] -> [`Affinity`], as [`AFFINITY`].
pub const AFFINITY6: &str = "lb_affinity6_v1";
/// Load-balancer source ranges (LPM trie): [`SourceRangeKey`] under a prefix length ->
/// [`SourceRange`]. Written by the agent, for the frontends with
/// [`FRONTEND_SOURCE_RANGES`] whose Service has `loadBalancerSourceRanges`.
pub const SOURCE_RANGES: &str = "lb_source_ranges_v1";
/// IPv6 load-balancer source ranges (LPM trie): [`SourceRangeKey<Ipv6Be>`] -> [`SourceRange`],
/// as [`SOURCE_RANGES`].
pub const SOURCE_RANGES6: &str = "lb_source_ranges6_v1";
/// The ports of fragmented datagrams (LRU): [`FragmentKey`] -> [`FragmentPorts`]. Written by
/// the datapath from a datagram's first fragment, read for its later ones, which carry none.
pub const FRAGMENTS: &str = "lb_fragments_v2";
/// The ports of fragmented IPv6 datagrams (LRU): [`FragmentKey<Ipv6Be>`] -> [`FragmentPorts`],
/// as [`FRAGMENTS`].
pub const FRAGMENTS6: &str = "lb_fragments6_v1";
/// Later fragments that came before their first (LRU): [`HeldKey`] -> [`HeldFragment`].
/// Written by the tc ingress program, which sends them on once the first fragment comes.
pub const HELD_FRAGMENTS: &str = "lb_held_fragments_v2";
/// Later IPv6 fragments that came before their first (LRU): [`HeldKey<Ipv6Be>`] ->
/// [`HeldFragment`], as [`HELD_FRAGMENTS`].
pub const HELD_FRAGMENTS6: &str = "lb_held_fragments6_v1";
/// Each CPU's room for one fragment's bytes while it is being held, one entry:
/// [`HeldFragment`]. The datapath's own.
pub const FRAGMENT_SCRATCH: &str = "lb_fragment_scratch_v1";
/// Per-CPU round-robin cursor of each service, indexed by service id: `u32`.
pub const CURSORS: &str = "lb_cursors_v1";
/// Per-CPU counters of each frontend, indexed by its service id: [`FrontendStats`].
pub const FRONTEND_STATS: &str = "lb_fe_stats_v1";
/// Per-CPU counters, one entry: [`Stats`].
pub const STATS: &str = "lb_stats_v6";
/// Datapath settings, one entry: [`Config`]. Written by the agent.
pub const CONFIG: &str = "lb_config_v3";
/// Per-CPU token buckets of the rejects (TCP resets, ICMP port unreachables), one entry:
/// [`RejectTokens`]. Written by the datapath.
pub const REJECT_TOKENS: &str = "lb_reject_tokens_v1";
/// The datapath's clock, one entry: [`Clock`]. Written by the agent, at start.
pub const CLOCK: &str = "lb_clock_v1";
/// When backends were last removed, one entry: [`Epoch`]. Written by the agent.
pub const EPOCH: &str = "lb_epoch_v1";
/// The flows of each backend that least-connection frontends count (array, memory-mapped by
/// the agent): [`load_index`] of the backend id -> [`BackendLoad`]. Counted by the datapath
/// with atomic adds, a flow up when it starts and across when it closes; corrected by the
/// agent's flow GC, also with atomic adds, for the flows that idled out or that the LRU
/// evicted. Per backend (a pod's address and port), over every frontend that counts flows to
/// it: the pod's own load.
pub const BACKEND_LOADS: &str = "lb_backend_loads_v1";

/// Every map, in the order the agent pins them.
pub const ALL: [&str; 33] = [
    FRONTENDS,
    FRONTENDS6,
    SLOTS,
    SLOT_TABLES,
    BACKENDS,
    BACKENDS6,
    VIPS,
    VIPS6,
    FLOWS,
    FLOWS6,
    REPLIES,
    REPLIES6,
    SOCKETS,
    SOCKETS6,
    CONNECTED,
    CONNECTED6,
    AFFINITY,
    AFFINITY6,
    CURSORS,
    FRONTEND_STATS,
    STATS,
    CONFIG,
    CLOCK,
    EPOCH,
    BACKEND_LOADS,
    REJECT_TOKENS,
    SOURCE_RANGES,
    SOURCE_RANGES6,
    FRAGMENTS,
    FRAGMENTS6,
    HELD_FRAGMENTS,
    HELD_FRAGMENTS6,
    FRAGMENT_SCRATCH,
];

/// The map flag (`BPF_F_MMAPABLE`) that lets the agent map [`BACKEND_LOADS`] and [`SLOT_TABLES`]
/// into its memory.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Capacity of [`FRONTENDS`] and of [`FRONTENDS6`]; service ids (of both families) are below
/// it, as they index [`CURSORS`].
pub const MAX_SERVICES: u32 = 131_072;
/// Capacity of [`SLOTS`].
pub const MAX_SLOTS: u32 = 1_048_576;
/// Capacity of [`SLOT_TABLES`], in positions (64 MiB): 1,024 tables of Cilium's default 16,381
/// positions, or 16,432 of 1,021 (enough for some 10 backends each).
pub const MAX_TABLE_POSITIONS: u32 = 16_777_216;
/// The positions of one [`SLOT_TABLES`] entry: the kernel lays an array's values out 8 bytes
/// apart at least, so one position an entry would take twice its 4 bytes.
pub const TABLE_BLOCK: u32 = 16;
/// Capacity of [`BACKENDS`] and of [`BACKENDS6`], and of [`BACKEND_LOADS`], which backend ids
/// index ([`load_index`]). A power of two.
pub const MAX_BACKENDS: u32 = 1_048_576;
const _: () = assert!(MAX_BACKENDS.is_power_of_two());

/// Where backend `id`'s counts lie in [`BACKEND_LOADS`]: its low bits. Ids are never reused
/// (a tracked flow names its backend by id), so over a cluster's life they pass the array's
/// size; a backend then shares its counts only with ids a multiple of 1,048,576 away whose
/// flows are still counted (a backend still serving, or one removed whose flows live on), and
/// both look busier than they are: no count is lost, no lookup fails.
#[must_use]
pub const fn load_index(id: u32) -> u32 {
    id % MAX_BACKENDS
}

/// Capacity of [`VIPS`] and of [`VIPS6`].
pub const MAX_VIPS: u32 = 131_072;
/// Capacity of [`FLOWS`], [`REPLIES`] and their IPv6 twins.
pub const MAX_FLOWS: u32 = 262_144;
/// Capacity of [`SOCKETS`] and of [`SOCKETS6`].
pub const MAX_SOCKETS: u32 = 65_536;
/// Capacity of [`CONNECTED`] and of [`CONNECTED6`]: the node's own connections to frontends,
/// open at once.
pub const MAX_CONNECTED: u32 = 262_144;
/// Capacity of [`AFFINITY`] and of [`AFFINITY6`].
pub const MAX_AFFINITIES: u32 = 65_536;
/// Capacity of [`FRAGMENTS`] and of [`FRAGMENTS6`]: datagrams in fragments at once.
pub const MAX_FRAGMENTS: u32 = 16_384;
/// Capacity of [`HELD_FRAGMENTS`] and of [`HELD_FRAGMENTS6`].
pub const MAX_HELD_FRAGMENTS: u32 = 1024;
/// How many later fragments of one datagram may wait for its first.
pub const HELD_PER_DATAGRAM: u8 = 8;
/// The largest fragment held, from its IP header on: a 1,500-byte link's.
pub const HELD_FRAGMENT_BYTES: usize = 1500;
/// Capacity of [`SOURCE_RANGES`] and of [`SOURCE_RANGES6`].
pub const MAX_SOURCE_RANGES: u32 = 65_536;
/// The bits of a [`SOURCE_RANGES`] entry's prefix that match its [`SourceRangeKey::service_id`]
/// (all of them); the range's own bits follow.
pub const SOURCE_RANGE_ID_BITS: u32 = 32;

/// An IPv6 address as the datapath holds it: its 16 bytes as they lie in the packet (network
/// order), in four words, as an IPv4 address is one ([`crate::addr`] converts).
pub type Ipv6Be = [u32; 4];

/// IANA protocol numbers, as in the IPv4 header and IPv6's next header.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// How a service picks the backend of a new flow ([`Frontend::algorithm`]).
pub const ALGORITHM_ROUND_ROBIN: u8 = 0;
pub const ALGORITHM_SOURCE_HASH: u8 = 1;
/// Maglev consistent hashing: the frontend's slots are the positions of its Maglev table in
/// [`SLOT_TABLES`] (as many as [`Frontend::backend_count`] says), which a hash of the source picks
/// from as for source hash.
pub const ALGORITHM_MAGLEV: u8 = 2;

/// IPVS's least-connection schedulers: the frontend's slots hold its backends, as for round
/// robin, and a new flow goes to the one whose [`BackendLoad`] is least by the scheduler's rule
/// ([`least_loaded`]). Least connection (`lc`): active flows, then inactive ones.
pub const ALGORITHM_LEAST_CONNECTION: u8 = 3;
/// Shortest expected delay (`sed`): active flows alone (IPVS's `(active + 1) / weight`, weight 1).
pub const ALGORITHM_SHORTEST_EXPECTED_DELAY: u8 = 4;
/// Never queue (`nq`): a backend with no active flow, else as shortest expected delay.
pub const ALGORITHM_NEVER_QUEUE: u8 = 5;

/// Whether frontends of `algorithm` count their backends' flows in [`BACKEND_LOADS`].
#[expect(
    clippy::inline_always,
    reason = "the datapath's hot path: no call in eBPF"
)]
#[inline(always)]
pub fn counts_flows(algorithm: u8) -> bool {
    matches!(
        algorithm,
        ALGORITHM_LEAST_CONNECTION | ALGORITHM_SHORTEST_EXPECTED_DELAY | ALGORITHM_NEVER_QUEUE
    )
}

/// How many of a least-connection frontend's backends a new flow compares: all of them up to
/// this many; beyond, this many consecutive slots from a point that turns with each new flow
/// (each CPU's round-robin cursor), so that every backend is compared in turn. A bounded loop
/// the verifier walks once per candidate, and a slot lookup each.
pub const LEAST_LOADED_SCAN: u32 = 16;

/// [`FrontendKey::scope`]: where the traffic comes from. The uplink's program looks frontends
/// up as external, the pod-facing one as internal: a Service with `externalTrafficPolicy: Local`
/// balances the two over different backends.
pub const SCOPE_EXTERNAL: u8 = 0;
pub const SCOPE_INTERNAL: u8 = 1;

/// [`Frontend::flags`]: with no backend, answer new flows with a TCP reset or an ICMP port
/// unreachable (kube-proxy's REJECT) instead of dropping them.
pub const FRONTEND_REJECT_WHEN_EMPTY: u8 = 1;
/// [`Frontend::flags`]: a load-balancer IP whose Service has `loadBalancerSourceRanges`: the
/// source of a new flow is looked up in [`SOURCE_RANGES`] under its `service_id`, and one the
/// ranges leave out is dropped. As kube-proxy's firewall (`ct state new` only), a flow that
/// began before the ranges narrowed goes on.
pub const FRONTEND_SOURCE_RANGES: u8 = 2;
/// [`Frontend::flags`]: source hash and Maglev hash the client's port with its address (IPVS's
/// `sh-port` and `mh-port`): with the frontend's own address, port and protocol, the 5-tuple.
pub const FRONTEND_HASH_PORT: u8 = 4;

/// [`Backend::flags`]: the backend runs on this node. A flow from outside the node to a backend
/// elsewhere is SNATed to the node's address, so that its replies come back through it.
pub const BACKEND_LOCAL: u8 = 1;

/// [`Flow::flags`]: the flow is counted in its backend's [`BackendLoad`] (it was made by a
/// least-connection frontend).
pub const FLOW_COUNTED: u8 = 1;

/// [`Flow::state`] and [`Reply::state`]: how long an idle entry lives ([`Config`]).
pub const STATE_OPEN: u8 = 0;
pub const STATE_CLOSING: u8 = 1;

/// A service frontend: where clients send.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey<A = u32> {
    pub addr_be: A,
    pub port_be: u16,
    pub protocol: u8,
    /// `SCOPE_*`.
    pub scope: u8,
}

/// What a frontend balances over.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frontend {
    /// Key of this frontend's slots in [`SLOTS`], from 1.
    pub service_id: u32,
    /// Slots `1..=backend_count` are in use; 0 means drop new flows.
    pub backend_count: u16,
    /// `ALGORITHM_*`.
    pub algorithm: u8,
    /// `FRONTEND_*` bits.
    pub flags: u8,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 without affinity.
    pub affinity_timeout_s: u32,
    /// The key of the affinity its Service port's frontends share (ClusterIP, NodePorts,
    /// external and load-balancer IPs), as kube-proxy keys affinity per Service port: the
    /// lowest `service_id` among them. 0: this frontend's own `service_id`.
    pub affinity_id: u32,
    /// A Maglev or least-connection family frontend's first slot in [`SLOT_TABLES`]; 0 for
    /// the others, whose slots are in [`SLOTS`].
    pub table_offset: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub service_id: u32,
    /// From 1.
    pub slot: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    pub backend_id: u32,
}

/// [`TABLE_BLOCK`] positions of the slot tables ([`SLOT_TABLES`]): position `p` is
/// `backend_ids[p % TABLE_BLOCK]` of entry `p / TABLE_BLOCK`. 0: none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotBlock {
    pub backend_ids: [u32; TABLE_BLOCK as usize],
}

/// Where a backend listens. Shared by every service slot that names it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend<A = u32> {
    pub addr_be: A,
    pub port_be: u16,
    pub protocol: u8,
    /// `BACKEND_*` bits.
    pub flags: u8,
}

/// A packet's 5-tuple as it arrived, before any rewrite.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey<A = u32> {
    pub src_addr_be: A,
    pub dst_addr_be: A,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// A client's flow to a frontend: the backend it was given, and the source it is rewritten to
/// when it is SNATed (a remote backend from outside the node, or a backend calling itself).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow<A = u32> {
    /// The datapath's time ([`Clock`]) of the last packet, refreshed at most once a second.
    pub last_seen_ns: u64,
    /// A UDP flow whose backend id is no longer in [`BACKENDS`] (its endpoint stopped serving)
    /// ends: its next datagram is a new flow's. A TCP flow stays on the address below until it
    /// closes or idles out, as kube-proxy's conntrack keeps established connections; only a
    /// SYN on it looks the id up.
    pub backend_id: u32,
    pub backend_addr_be: A,
    /// The source address and port the flow's packets leave with: the client's own unless
    /// SNATed.
    pub src_addr_be: A,
    pub backend_port_be: u16,
    pub src_port_be: u16,
    /// `STATE_*`.
    pub state: u8,
    /// `FLOW_*` bits. Padding before: 0 is what every flow of an older agent had.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// The frontend the flow came in by, whose counters its packets count in.
    pub service_id: u32,
    /// The [`Epoch`] at which the backend was last seen in [`BACKENDS`]: while the epoch has
    /// not moved, no backend was removed, and the flow's packets need not look.
    pub backends_epoch: u32,
    pub _pad_end: u32,
}

/// A backend's reply flow: its source is rewritten back to the frontend and its destination
/// to the client (a change only for SNATed flows).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reply<A = u32> {
    pub last_seen_ns: u64,
    pub frontend_addr_be: A,
    pub client_addr_be: A,
    pub frontend_port_be: u16,
    pub client_port_be: u16,
    /// `STATE_*`.
    pub state: u8,
    pub _pad: [u8; 3],
}

/// What every fragment of one datagram shares.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey<A = u32> {
    pub src_addr_be: A,
    pub dst_addr_be: A,
    /// The identification: IPv4's 16 bits (widened, as they lie in the packet) or the 32 of an
    /// IPv6 fragment header.
    pub id_be: u32,
    /// The datagram's: IPv4's protocol, or the fragment header's next header.
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// The ports a datagram's first fragment carries, for its later ones.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentPorts {
    /// The datapath's time ([`Clock`]) of the first fragment: past [`FRAGMENT_TIMEOUT_NS`]
    /// the entry is another datagram's, the IP id having come round.
    pub seen_ns: u64,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub _pad: u32,
}

/// How long a datagram's fragments belong together: the kernel's `net.ipv4.ipfrag_time`, and
/// half its `net.ipv6.ip6frag_time` (60 s), which the senders' reassembly rarely needs.
pub const FRAGMENT_TIMEOUT_NS: u64 = 30_000_000_000;

/// A later fragment waiting for its datagram's first: the datagram, and which of its waiting
/// fragments (from 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HeldKey<A = u32> {
    pub src_addr_be: A,
    pub dst_addr_be: A,
    /// As [`FragmentKey::id_be`].
    pub id_be: u32,
    pub protocol: u8,
    pub slot: u8,
    pub _pad: [u8; 2],
}

/// A fragment's bytes, from its IP header on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldFragment {
    /// When it came; past [`FRAGMENT_TIMEOUT_NS`] it is forgotten, not sent on.
    pub held_ns: u64,
    pub len: u32,
    pub bytes: [u8; HELD_FRAGMENT_BYTES],
}

/// What a [`SOURCE_RANGES`] entry matches: a frontend's service id (all
/// [`SOURCE_RANGE_ID_BITS`] of it, so its byte order does not matter), then the leading bits of a
/// source address. Each frontend with ranges has one entry per range, and a catch-all (the id
/// alone) that refuses what no range allows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey<A = u32> {
    pub service_id: u32,
    pub addr_be: A,
}

/// Whether the sources a [`SOURCE_RANGES`] entry matches may reach the frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceRange {
    /// 1: one of the frontend's ranges; 0: its catch-all.
    pub allowed: u32,
}

/// An address frontends listen on: a ClusterIP, a load-balancer or external IP, or an address
/// of the node's NodePorts. Counts are over ports, protocols and scopes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vip {
    /// How many frontends the address has: for `bpftool` readers.
    pub frontends: u32,
    /// How many of them are ClusterIP frontends. If any, the address is a ClusterIP, whose other
    /// ports drop; an external or load-balancer IP may be a node's own address, whose other
    /// ports (ssh, the kubelet) are no service's to drop.
    pub cluster_ip_frontends: u32,
}

impl Vip {
    pub fn is_cluster_ip(&self) -> bool {
        self.cluster_ip_frontends > 0
    }
}

/// A backend one of the node's own sockets sent a datagram to. Packed to the address's
/// alignment: IPv6's key would otherwise end in 4 bytes of padding, which a key built on the
/// stack leaves unset and a lookup then hashes.
#[repr(C, packed(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SocketKey<A = u32> {
    /// `bpf_get_socket_cookie`.
    pub cookie: u64,
    pub backend_addr_be: A,
    pub backend_port_be: u16,
    pub _pad: u16,
}

/// The frontend that datagram was for: what the socket's replies come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketFrontend<A = u32> {
    pub addr_be: A,
    pub port_be: u16,
    pub _pad: u16,
}

/// The frontend a connected socket dialled, and the backend it was given instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Connected<A = u32> {
    pub frontend_addr_be: A,
    pub backend_addr_be: A,
    pub frontend_port_be: u16,
    pub backend_port_be: u16,
}

/// A client of a service with session affinity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey<A = u32> {
    pub client_addr_be: A,
    /// The frontend's [`Frontend::affinity_id`] (its `service_id` when that is 0): one key per
    /// Service port, shared by all its frontends.
    pub affinity_id: u32,
}

/// The backend a client sticks to, until `affinity_timeout_s` after its last new flow, and
/// while the service's slot still holds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Affinity {
    pub last_seen_ns: u64,
    pub backend_id: u32,
    pub slot: u32,
}

/// Idle timeouts of flow entries, by protocol and state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub tcp_open_timeout_ns: u64,
    pub tcp_closing_timeout_ns: u64,
    pub udp_timeout_ns: u64,
    /// The node's IPv6 address that SNATed IPv6 flows leave with; all zeros: no SNAT, such
    /// flows are dropped.
    pub snat_addr6_be: Ipv6Be,
    /// The node's address that SNATed flows leave with; 0: no SNAT, such flows are dropped.
    /// Also the source the node's own sockets stand for before a load-balancer IP's source
    /// ranges, their source not being chosen at `connect()`.
    pub snat_addr_be: u32,
    /// SNAT source ports, host order, outside the node's ephemeral range.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// The node's network namespace: the socket-level program balances only sockets of the
    /// node itself (pods are balanced by tc).
    pub netns_cookie: u64,
    /// Rejects each CPU may send per second, so that a frontend without endpoints amplifies
    /// nothing (the node's rate, shared out over its CPUs); 0: none at all.
    pub rejects_per_sec_per_cpu: u32,
    /// How many each CPU may send at once, after a quiet while.
    pub reject_burst_per_cpu: u32,
}

/// One CPU's rejects left to send, refilled at [`Config::rejects_per_sec_per_cpu`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RejectTokens {
    /// In thousandths of a reject: refills of less than one are kept.
    pub milli_tokens: u64,
    pub refilled_ns: u64,
}

impl Config {
    /// How long an entry of `protocol` in `state` lives idle.
    #[expect(
        clippy::inline_always,
        reason = "the datapath's hot path: no call in eBPF"
    )]
    #[inline(always)]
    pub fn timeout_ns(&self, protocol: u8, state: u8) -> u64 {
        if protocol != PROTO_TCP {
            self.udp_timeout_ns
        } else if state == STATE_CLOSING {
            self.tcp_closing_timeout_ns
        } else {
            self.tcp_open_timeout_ns
        }
    }

    /// Whether an entry last seen at `last_seen_ns` is still alive at `now`: the datapath's
    /// test, and the agent's before it removes an idle one.
    #[expect(
        clippy::inline_always,
        reason = "the datapath's hot path: no call in eBPF"
    )]
    #[inline(always)]
    pub fn is_live(&self, protocol: u8, state: u8, last_seen_ns: u64, now: u64) -> bool {
        now.saturating_sub(last_seen_ns) <= self.timeout_ns(protocol, state)
    }
}

/// How the datapath reads the time: `jiffies * ns_per_jiffy - offset_ns` is `CLOCK_MONOTONIC` to
/// within a tick, the resolution of `bpf_ktime_get_coarse_ns` too, for the cost of a load (the
/// verifier inlines `bpf_jiffies64`) where the latter is a helper call on every packet. While
/// `ns_per_jiffy` is 0 (the agent has not measured the tick yet), the datapath calls the helper.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clock {
    pub ns_per_jiffy: u64,
    pub offset_ns: u64,
}

/// Bumped by the agent after every sync that deleted backends (and once at start, for
/// deletions an earlier agent may not have announced). It saves each UDP datagram (and TCP
/// SYN) of a flow a lookup of its backend: a flow looks again only when the epoch differs
/// from its own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Epoch {
    pub backends_removed: u32,
}

/// A backend's counted flows ([`BACKEND_LOADS`]), as IPVS counts a real server's connections.
/// Signed: a correction and a close may cross, and a count read below 0 is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendLoad {
    /// Open flows: TCP connections until their FIN or RST, UDP flows while they live.
    pub active: i64,
    /// TCP connections that saw a FIN or RST, until they idle out.
    pub inactive: i64,
}

impl BackendLoad {
    /// How IPVS ranks the backend, every weight 1, a count below 0 read as 0: the least goes
    /// first. `lc`'s overhead is `active * 256 + inactive`. `sed`'s is `active + 1`, and
    /// `nq`'s too but 0 for an idle backend, which it takes first: with equal weights both rank
    /// backends by their active flows alone, as this does (`active * 256`). `inactive_mask` is
    /// the algorithm's ([`inactive_mask`]), decided once for a scan: the rank is arithmetic
    /// alone, since eBPF has no conditional move, and a branch per backend, one arm of which
    /// makes a known constant, would split the verifier's paths through the scan's loop
    /// ([`least_loaded`]) beyond what it can prune.
    #[expect(
        clippy::inline_always,
        reason = "the datapath's hot path: no call in eBPF"
    )]
    #[inline(always)]
    pub fn weighed(&self, inactive_mask: u64) -> u64 {
        (not_below_zero(self.active) << 8)
            .wrapping_add(not_below_zero(self.inactive) & inactive_mask)
    }
}

/// What [`BackendLoad::weighed`] keeps of the inactive flows under `algorithm`: all of them
/// for `lc`, none for the others. A mask, not a choice, lest the compiler make it a branch
/// inside the scan's loop.
#[expect(
    clippy::inline_always,
    reason = "the datapath's hot path: no call in eBPF"
)]
#[inline(always)]
#[must_use]
pub fn inactive_mask(algorithm: u8) -> u64 {
    zero_mask(u64::from(algorithm ^ ALGORITHM_LEAST_CONNECTION))
}

/// `count` as unsigned, 0 if below 0, by a mask rather than a branch.
#[expect(
    clippy::inline_always,
    reason = "the datapath's hot path: no call in eBPF"
)]
#[inline(always)]
fn not_below_zero(count: i64) -> u64 {
    (count as u64) & !opaque((count >> 63) as u64)
}

/// All ones if `value` is 0, else 0: the top bit of `(value - 1) & !value`, spread (only 0
/// sets it: for any other value, either `value - 1` clears it or `!value` does).
#[expect(
    clippy::inline_always,
    reason = "the datapath's hot path: no call in eBPF"
)]
#[inline(always)]
#[must_use]
pub fn zero_mask(value: u64) -> u64 {
    (opaque(value.wrapping_sub(1) & !value) as i64 >> 63) as u64
}

/// `value`, hidden from the compiler. Left to see them, LLVM turns the masks here and in
/// [`slot_at`] back into the comparisons they stand for, and eBPF has no conditional move: each
/// would be a branch in the scan's loop, one arm of which makes a known constant, that the
/// verifier then tracks exactly (or, hoisted, a value that costs the loop a register).
#[expect(
    clippy::inline_always,
    reason = "the datapath's hot path: no call in eBPF"
)]
#[inline(always)]
fn opaque(value: u64) -> u64 {
    #[cfg(target_arch = "bpf")]
    {
        let mut value = value;
        // SAFETY: one move of the register to itself; it reads and writes nothing else. Not an
        // empty sequence: that would leave two line entries on one instruction in the BTF,
        // which the kernel refuses.
        unsafe {
            core::arch::asm!(
                "{0} = {0}",
                inout(reg) value,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        value
    }
    #[cfg(not(target_arch = "bpf"))]
    value
}

/// The slot a new flow of a least-connection frontend goes to, of its `count` (at least one):
/// of the [`LEAST_LOADED_SCAN`] slots from `start` on (`start` below `count`), the one whose
/// backend ranks least ([`BackendLoad::weighed`]), the first of equals.
/// `overhead` gives a slot's, [`NO_BACKEND_OVERHEAD`] for a slot that holds no backend (it
/// loses to every backend), or nothing if the slot cannot be read, which ends the scan.
/// Returns the slot, from 1, or 0 if none had a backend or the scan ended.
///
/// The best so far is one word, the overhead above the slot's place in the scan: in eBPF the
/// loop's state then fits the registers, and its frame, on the deepest of the programs'
/// stacks, stays small. A turn of the loop has no branch but the lookups' (which, failing,
/// end it) and the minimum: every other one would split the verifier's paths through the
/// loop, which it could not prune. Inlined into the datapath's one caller.
#[inline]
pub fn least_loaded(count: u32, start: u32, mut overhead: impl FnMut(u32) -> Option<u64>) -> u32 {
    let mut best = u64::MAX;
    for position in 0..count.min(LEAST_LOADED_SCAN) {
        // No count comes near where the shift would lose bits but a missing slot's top ones.
        let Some(overhead) = overhead(slot_at(start, position, count)) else {
            // None found, by the end below: a `return` here costs the frame a slot.
            best = u64::MAX;
            break;
        };
        best = best.min(overhead << ORDER_BITS | u64::from(position));
    }
    let position = (best & (u64::from(LEAST_LOADED_SCAN) - 1)) as u32;
    // Whether a slot had a backend (the best lost the top bit, which no overhead reaches), by
    // arithmetic: a branch on the best, decided where the best is still the start's, would make
    // the verifier track it exactly through the loop, and leave it paths it cannot prune.
    let found = ((best >> 63) as u32) ^ 1;
    slot_at(start, position, count) & 0u32.wrapping_sub(found)
}

/// The bits of a scan's best that hold a slot's place in the scan ([`least_loaded`]).
const ORDER_BITS: u32 = LEAST_LOADED_SCAN.trailing_zeros();

/// The overhead of a slot without a backend, in a scan ([`least_loaded`]): shifted above the
/// slot's place, it has the top bit, which no backend's reaches.
pub const NO_BACKEND_OVERHEAD: u64 = u64::MAX >> ORDER_BITS;

/// Slot `position` of a scan from `start` over `count` slots, from 1, where the last is
/// followed by the first (`start` below `count`, `position` not past it): by arithmetic, neither
/// a division (a 64-bit one costs tens of cycles, in the new flow's loop) nor a branch (a
/// branch, or a slot carried from one turn to the next, leaves the verifier paths it cannot
/// prune, and takes it past its limit). Slot counts fit a u16, so the difference's top bit is
/// free to say which side of `count` the slot falls.
#[expect(
    clippy::inline_always,
    reason = "the datapath's hot path: no call in eBPF"
)]
#[inline(always)]
fn slot_at(start: u32, position: u32, count: u32) -> u32 {
    let slot = start + position + 1;
    let past_the_last = (count.wrapping_sub(slot) as i32 >> 31) as u32;
    slot - (count & opaque(u64::from(past_the_last)) as u32)
}

/// A frontend's counters, per CPU: the agent sums them for `/metrics`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrontendStats {
    /// Packets sent to a backend.
    pub packets: u64,
    /// Their IP lengths.
    pub bytes: u64,
    pub new_flows: u64,
}

/// Datapath counters, per CPU: the agent sums them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets to a frontend, rewritten to a backend.
    pub forwarded: u64,
    /// Replies rewritten back to their frontend.
    pub replied: u64,
    /// Flows given a backend.
    pub new_flows: u64,
    /// Flows whose backend stopped serving and that were given another: UDP flows, and TCP
    /// SYNs on a tuple still tracked.
    pub reselected: u64,
    /// New flows dropped because their frontend has no backend.
    pub dropped_no_backend: u64,
    /// New flows rejected (TCP reset, ICMP unreachable) because their frontend has no backend.
    pub rejected_no_backend: u64,
    /// Packets dropped because a map or a rewrite failed.
    pub dropped_error: u64,
    /// New flows SNATed to the node's address.
    pub snat_flows: u64,
    /// New flows dropped for want of a free SNAT port or a SNAT address.
    pub dropped_no_snat: u64,
    /// Packets to a service address on a port it does not serve.
    pub dropped_unknown_port: u64,
    /// Destinations of the node's own sockets rewritten to a backend (`connect()`,
    /// `sendmsg()`).
    pub socket_rewrites: u64,
    /// Rejects not sent, over the rate limit: the new flow is dropped instead.
    pub rejects_limited: u64,
    /// Packets to a load-balancer IP from a source its Service's `loadBalancerSourceRanges`
    /// leave out.
    pub dropped_source_range: u64,
    /// ICMP errors about a tracked flow, their quote and addresses rewritten as its packets.
    pub icmp_translated: u64,
    /// Later fragments dropped because their datagram's first was not seen (or its flow is
    /// gone): for a ClusterIP, or a flow whose backend stopped serving.
    pub fragments_unmatched: u64,
    /// Later fragments held until their datagram's first came ([`HELD_FRAGMENTS`]).
    pub fragments_held: u64,
}

/// Index of the only entry of [`CONFIG`], [`CLOCK`], [`EPOCH`] and [`STATS`].
pub const SINGLE_ENTRY: u32 = 0;

const _: () = {
    assert!(size_of::<FrontendKey>() == 8);
    assert!(size_of::<FrontendKey<Ipv6Be>>() == 20);
    assert!(size_of::<Frontend>() == 20);
    assert!(size_of::<SlotKey>() == 8);
    assert!(size_of::<Slot>() == 4);
    assert!(size_of::<Backend>() == 8);
    assert!(size_of::<Backend<Ipv6Be>>() == 20);
    assert!(size_of::<FlowKey>() == 16);
    assert!(size_of::<FlowKey<Ipv6Be>>() == 40);
    assert!(size_of::<Flow>() == 40);
    assert!(size_of::<Flow<Ipv6Be>>() == 64);
    assert!(size_of::<Reply>() == 24);
    assert!(size_of::<Reply<Ipv6Be>>() == 48);
    assert!(size_of::<Config>() == 64);
    assert!(size_of::<RejectTokens>() == 16);
    assert!(size_of::<Clock>() == 16);
    assert!(size_of::<Epoch>() == 4);
    assert!(size_of::<Stats>() == 128);
    assert!(size_of::<HeldKey>() == 16);
    assert!(size_of::<HeldKey<Ipv6Be>>() == 40);
    assert!(size_of::<HeldFragment>() == 12 + HELD_FRAGMENT_BYTES);
    assert!(size_of::<FragmentKey>() == 16);
    assert!(size_of::<FragmentKey<Ipv6Be>>() == 40);
    assert!(size_of::<FragmentPorts>() == 16);
    assert!(size_of::<SourceRangeKey>() == 8);
    assert!(size_of::<SourceRangeKey<Ipv6Be>>() == 20);
    assert!(size_of::<SourceRange>() == 4);
    assert!(size_of::<Vip>() == 8);
    assert!(size_of::<FrontendStats>() == 24);
    assert!(size_of::<BackendLoad>() == 16);
    assert!(size_of::<SocketKey>() == 16);
    assert!(size_of::<SocketKey<Ipv6Be>>() == 28);
    assert!(size_of::<SocketFrontend>() == 8);
    assert!(size_of::<SocketFrontend<Ipv6Be>>() == 20);
    assert!(size_of::<Connected>() == 12);
    assert!(size_of::<Connected<Ipv6Be>>() == 36);
    assert!(size_of::<AffinityKey>() == 8);
    assert!(size_of::<AffinityKey<Ipv6Be>>() == 20);
    assert!(size_of::<Affinity>() == 16);
};

#[cfg(feature = "user")]
mod pod {
    use super::{
        Affinity, AffinityKey, Backend, BackendLoad, Clock, Config, Connected, Epoch, Flow,
        FlowKey, FragmentKey, FragmentPorts, Frontend, FrontendKey, FrontendStats, HeldFragment,
        HeldKey, Ipv6Be, RejectTokens, Reply, Slot, SlotKey, SocketFrontend, SocketKey,
        SourceRange, SourceRangeKey, Stats, Vip,
    };

    macro_rules! pod {
        ($($type:ty),*) => {$(
            // SAFETY: `#[repr(C)]`, integer fields only, padding explicit (the size asserts
            // above): every bit pattern is a valid value and none is uninitialised.
            unsafe impl aya::Pod for $type {}
        )*};
    }

    pod!(
        FrontendKey,
        FrontendKey<Ipv6Be>,
        Backend<Ipv6Be>,
        SourceRangeKey<Ipv6Be>,
        FlowKey<Ipv6Be>,
        Flow<Ipv6Be>,
        Reply<Ipv6Be>,
        AffinityKey<Ipv6Be>,
        SocketKey<Ipv6Be>,
        SocketFrontend<Ipv6Be>,
        Connected<Ipv6Be>,
        FragmentKey<Ipv6Be>,
        HeldKey<Ipv6Be>,
        Clock,
        Epoch,
        Frontend,
        SlotKey,
        Slot,
        Backend,
        FlowKey,
        Flow,
        Reply,
        Config,
        AffinityKey,
        Vip,
        FrontendStats,
        SocketKey,
        SocketFrontend,
        Connected,
        Affinity,
        BackendLoad,
        Stats,
        RejectTokens,
        SourceRangeKey,
        SourceRange,
        FragmentKey,
        FragmentPorts,
        HeldKey,
        HeldFragment
    );
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;

    fn load(active: i64, inactive: i64) -> BackendLoad {
        BackendLoad { active, inactive }
    }

    #[test]
    fn least_loaded_follows_ipvs_s_rules() {
        let lc = ALGORITHM_LEAST_CONNECTION;
        let sed = ALGORITHM_SHORTEST_EXPECTED_DELAY;
        let nq = ALGORITHM_NEVER_QUEUE;
        // (why, algorithm, each slot's load in order, start, the slot chosen)
        let cases: &[(&str, u8, &[BackendLoad], u32, u32)] = &[
            (
                "lc: fewest active",
                lc,
                &[load(3, 0), load(1, 0), load(2, 0)],
                0,
                2,
            ),
            (
                "lc: one active outweighs 255 inactive",
                lc,
                &[load(1, 0), load(0, 255)],
                0,
                2,
            ),
            (
                "lc: then fewest inactive",
                lc,
                &[load(1, 9), load(1, 2), load(1, 5)],
                0,
                2,
            ),
            (
                "lc: the first of equals from start",
                lc,
                &[load(1, 0), load(1, 0), load(1, 0)],
                1,
                2,
            ),
            (
                "lc: the scan wraps round",
                lc,
                &[load(0, 0), load(1, 0), load(1, 0)],
                2,
                1,
            ),
            (
                "sed: inactive flows do not count",
                sed,
                &[load(1, 0), load(0, 900)],
                0,
                2,
            ),
            (
                "sed: fewest active",
                sed,
                &[load(4, 0), load(2, 0), load(3, 0)],
                0,
                2,
            ),
            (
                "nq: the first idle one, not the least",
                nq,
                &[load(5, 0), load(0, 7), load(0, 0)],
                0,
                2,
            ),
            (
                "nq: none idle: as sed",
                nq,
                &[load(5, 0), load(2, 0), load(3, 0)],
                0,
                2,
            ),
            (
                "below 0 reads as 0",
                lc,
                &[load(1, 0), load(-4, 0), load(0, 0)],
                0,
                2,
            ),
        ];
        for &(why, algorithm, loads, start, chosen) in cases {
            let count = u32::try_from(loads.len()).unwrap();
            let got = least_loaded(count, start, |slot| {
                Some(loads[slot as usize - 1].weighed(inactive_mask(algorithm)))
            });
            assert_eq!(got, chosen, "{why}");
        }
    }

    #[test]
    fn every_backend_id_has_a_load_index_in_the_array() {
        for (id, index) in [
            (1, 1),
            (MAX_BACKENDS - 1, MAX_BACKENDS - 1),
            (MAX_BACKENDS, 0),
            (MAX_BACKENDS + 5, 5),
            (u32::MAX, MAX_BACKENDS - 1),
        ] {
            assert_eq!(load_index(id), index, "{id}");
        }
    }

    #[test]
    fn the_scan_s_masks_stand_for_their_comparisons() {
        assert_eq!(zero_mask(0), u64::MAX);
        for value in [1, 2, 255, u64::from(u32::MAX), 1 << 62] {
            assert_eq!(zero_mask(value), 0, "{value}");
        }
        assert_eq!(inactive_mask(ALGORITHM_LEAST_CONNECTION), u64::MAX);
        for algorithm in [
            ALGORITHM_SHORTEST_EXPECTED_DELAY,
            ALGORITHM_NEVER_QUEUE,
            ALGORITHM_ROUND_ROBIN,
            ALGORITHM_MAGLEV,
        ] {
            assert_eq!(inactive_mask(algorithm), 0, "{algorithm}");
        }
        for (count, read) in [
            (i64::MIN, 0),
            (-1, 0),
            (0, 0),
            (7, 7),
            (i64::MAX, i64::MAX as u64),
        ] {
            assert_eq!(not_below_zero(count), read, "{count}");
        }
    }

    #[test]
    fn least_loaded_skips_missing_slots_and_scans_a_bounded_window() {
        let missing_first = |slot| {
            Some(if slot == 1 {
                NO_BACKEND_OVERHEAD
            } else {
                u64::from(slot)
            })
        };
        assert_eq!(least_loaded(3, 0, missing_first), 2);
        assert_eq!(least_loaded(3, 0, |_| Some(NO_BACKEND_OVERHEAD)), 0);
        assert_eq!(least_loaded(3, 0, |_| None), 0);
        // 100 backends, the least loaded (slot 100) outside the window from slot 1: the
        // window's best is taken; from a start whose window holds it, it is.
        let mut seen = Vec::new();
        let got = least_loaded(100, 0, |slot| {
            seen.push(slot);
            Some(if slot == 100 { 0 } else { 1 + u64::from(slot) })
        });
        assert_eq!(got, 1);
        assert_eq!(seen, (1..=LEAST_LOADED_SCAN).collect::<Vec<_>>());
        let got = least_loaded(100, 90, |slot| Some(if slot == 100 { 0 } else { 5 }));
        assert_eq!(got, 100);
    }

    /// New flows arrive one per tick; a flow holds its backend for a tick count that depends
    /// on the backend (one slow backend among fast ones). Returns each backend's share of the
    /// flows, and the most flows any fast backend held at once, against the fewest.
    fn simulate(
        backends: u32,
        slow_ticks: u32,
        fast_ticks: u32,
        flows: u32,
    ) -> (Vec<u32>, i64, i64) {
        let mut loads = vec![BackendLoad::default(); backends as usize];
        let mut ends: Vec<(u32, usize)> = Vec::new();
        let mut shares = vec![0; backends as usize];
        let (mut most, mut fewest) = (0, i64::MAX);
        for tick in 0..flows {
            ends.retain(|&(end, backend)| {
                if end <= tick {
                    loads[backend].active -= 1;
                }
                end > tick
            });
            let slot = least_loaded(backends, tick % backends, |slot| {
                Some(loads[slot as usize - 1].weighed(inactive_mask(ALGORITHM_LEAST_CONNECTION)))
            });
            let backend = slot as usize - 1;
            loads[backend].active += 1;
            shares[backend] += 1;
            let ticks = if backend == 0 { slow_ticks } else { fast_ticks };
            ends.push((tick + ticks, backend));
            if tick > flows / 2 {
                let fast = loads[1..].iter().map(|l| l.active);
                most = most.max(fast.clone().max().unwrap());
                fewest = fewest.min(fast.min().unwrap());
            }
        }
        (shares, most, fewest)
    }

    /// What the window costs: with 64 backends (4 windows' worth) the slow one still gets
    /// little, and the fast ones' loads stay within a flow or two of each other, as with a
    /// full scan of 16.
    #[test]
    fn a_bounded_window_balances_nearly_as_a_full_scan() {
        for backends in [LEAST_LOADED_SCAN, 4 * LEAST_LOADED_SCAN] {
            let flows = 200 * backends;
            let (shares, most, fewest) = simulate(backends, 40 * backends, backends, flows);
            let fair = flows / backends;
            assert!(
                shares[0] * 4 < fair,
                "{backends} backends: the slow one got {} of a fair {fair}",
                shares[0]
            );
            assert!(
                most - fewest <= 2,
                "{backends} backends: fast loads {fewest}..{most}"
            );
        }
    }

    #[test]
    fn an_entry_lives_for_its_protocol_and_state_s_timeout() {
        let config = Config {
            tcp_open_timeout_ns: 100,
            tcp_closing_timeout_ns: 10,
            udp_timeout_ns: 50,
            ..Config::default()
        };
        // (protocol, state, last seen, now, live)
        let cases = [
            (PROTO_TCP, STATE_OPEN, 1000, 1100, true),
            (PROTO_TCP, STATE_OPEN, 1000, 1101, false),
            (PROTO_TCP, STATE_CLOSING, 1000, 1010, true),
            (PROTO_TCP, STATE_CLOSING, 1000, 1011, false),
            (PROTO_UDP, STATE_OPEN, 1000, 1050, true),
            (PROTO_UDP, STATE_CLOSING, 1000, 1051, false),
            // Seen after `now` (another CPU's clock read): alive.
            (PROTO_TCP, STATE_OPEN, 1000, 900, true),
        ];
        for (protocol, state, last_seen, now, live) in cases {
            assert_eq!(
                config.is_live(protocol, state, last_seen, now),
                live,
                "protocol {protocol} state {state} seen {last_seen} now {now}"
            );
        }
    }
}
