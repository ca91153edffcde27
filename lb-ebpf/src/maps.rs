//! The map definitions and their accessors. Names, keys and values come from
//! `lb_common::maps`: each name is written once here, in the attribute the loader reads, and
//! checked against lb-common's at compile time (the agent checks them again at load).
//!
//! The maps the agent writes allocate entries as they are written: sized for the largest
//! cluster, they would otherwise hold over 100 MiB of kernel memory on every node. The LRU maps
//! are always preallocated.
//!
//! Reads go through the accessors below, the only `unsafe` map access. What makes them sound
//! is the same for all: the kernel keeps a map value it hands out alive until the program
//! returns (RCU), whatever another CPU or the agent does meanwhile, and nothing keeps one
//! across runs, so `'static` here means "until the program returns". The agent writes values
//! whole, so a read sees one version; a program holds at most one reference to an entry.

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr::read_volatile,
};

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    macros::btf_map,
};
use lb_common::maps::{
    self as common, Affinity, AffinityKey, Backend, BackendLoad, Clock, Config, Connected, Epoch,
    Flow, FlowKey, FragmentKey, FragmentPorts, Frontend, FrontendKey, FrontendStats, HeldFragment,
    HeldKey, Ipv6Be, MAX_AFFINITIES, MAX_BACKENDS, MAX_CONNECTED, MAX_FLOWS, MAX_FRAGMENTS,
    MAX_HELD_FRAGMENTS, MAX_SERVICES, MAX_SLOTS, MAX_SOCKETS, MAX_SOURCE_RANGES,
    MAX_TABLE_POSITIONS, MAX_VIPS, RejectTokens, Reply, SINGLE_ENTRY, SOURCE_RANGE_ID_BITS, Slot,
    SlotBlock, SlotKey, SocketFrontend, SocketKey, SourceRange, SourceRangeKey, Stats, TABLE_BLOCK,
    Vip, load_index,
};

use crate::family::Family;

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;
const MMAPABLE: usize = common::BPF_F_MMAPABLE as usize;

/// Whether two names are the same, at compile time.
const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// A map named `$name` (a literal, as the attribute needs), which must be lb-common's
/// `$common`: the build fails otherwise.
macro_rules! map {
    ($name:tt = $common:ident, $static:ident: $type:ty) => {
        const _: () = assert!(
            same($name, common::$common),
            concat!($name, " is not lb_common::maps::", stringify!($common))
        );
        #[btf_map(name = $name)]
        pub static $static: $type = <$type>::new();
    };
}

/// Each family's maps, of one type each: [`Family`] names a family's.
pub type FrontendMap<A> = HashMap<FrontendKey<A>, Frontend, { MAX_SERVICES as usize }, NO_PREALLOC>;
pub type BackendMap<A> = HashMap<u32, Backend<A>, { MAX_BACKENDS as usize }, NO_PREALLOC>;
pub type VipMap<A> = HashMap<A, Vip, { MAX_VIPS as usize }, NO_PREALLOC>;
pub type SourceRangeMap<A> =
    LpmTrie<SourceRangeKey<A>, SourceRange, { MAX_SOURCE_RANGES as usize }>;
pub type FlowMap<A> = LruHashMap<FlowKey<A>, Flow<A>, { MAX_FLOWS as usize }>;
pub type ReplyMap<A> = LruHashMap<FlowKey<A>, Reply<A>, { MAX_FLOWS as usize }>;
pub type AffinityMap<A> = LruHashMap<AffinityKey<A>, Affinity, { MAX_AFFINITIES as usize }>;
pub type SocketMap<A> = LruHashMap<SocketKey<A>, SocketFrontend<A>, { MAX_SOCKETS as usize }>;
pub type ConnectedMap<A> = HashMap<u64, Connected<A>, { MAX_CONNECTED as usize }, NO_PREALLOC>;
pub type FragmentMap<A> = LruHashMap<FragmentKey<A>, FragmentPorts, { MAX_FRAGMENTS as usize }>;
pub type HeldMap<A> = LruHashMap<HeldKey<A>, HeldFragment, { MAX_HELD_FRAGMENTS as usize }>;

map!("lb_frontends_v2" = FRONTENDS, FRONTENDS: FrontendMap<u32>);
map!("lb_frontends6_v2" = FRONTENDS6, FRONTENDS6: FrontendMap<Ipv6Be>);
map!("lb_slots_v1" = SLOTS, SLOTS: HashMap<SlotKey, Slot, { MAX_SLOTS as usize }, NO_PREALLOC>);
map!("lb_slot_tables_v1" = SLOT_TABLES, SLOT_TABLES: Array<SlotBlock, { (MAX_TABLE_POSITIONS / TABLE_BLOCK) as usize }, MMAPABLE>);
map!("lb_backends_v1" = BACKENDS, BACKENDS: BackendMap<u32>);
map!("lb_backends6_v1" = BACKENDS6, BACKENDS6: BackendMap<Ipv6Be>);
map!("lb_vips_v2" = VIPS, VIPS: VipMap<u32>);
map!("lb_vips6_v1" = VIPS6, VIPS6: VipMap<Ipv6Be>);
map!("lb_flows_v2" = FLOWS, FLOWS: FlowMap<u32>);
map!("lb_flows6_v1" = FLOWS6, FLOWS6: FlowMap<Ipv6Be>);
map!("lb_replies_v1" = REPLIES, REPLIES: ReplyMap<u32>);
map!("lb_replies6_v1" = REPLIES6, REPLIES6: ReplyMap<Ipv6Be>);
map!("lb_sockets_v1" = SOCKETS, SOCKETS: SocketMap<u32>);
map!("lb_sockets6_v1" = SOCKETS6, SOCKETS6: SocketMap<Ipv6Be>);
map!("lb_connected_v1" = CONNECTED, CONNECTED: ConnectedMap<u32>);
map!("lb_connected6_v1" = CONNECTED6, CONNECTED6: ConnectedMap<Ipv6Be>);
map!("lb_affinity_v1" = AFFINITY, AFFINITY: AffinityMap<u32>);
map!("lb_affinity6_v1" = AFFINITY6, AFFINITY6: AffinityMap<Ipv6Be>);
map!("lb_cursors_v1" = CURSORS, CURSORS: PerCpuArray<u32, { MAX_SERVICES as usize }>);
map!("lb_fe_stats_v1" = FRONTEND_STATS, FRONTEND_STATS: PerCpuArray<FrontendStats, { MAX_SERVICES as usize }>);
map!("lb_source_ranges_v1" = SOURCE_RANGES, SOURCE_RANGES: SourceRangeMap<u32>);
map!("lb_source_ranges6_v1" = SOURCE_RANGES6, SOURCE_RANGES6: SourceRangeMap<Ipv6Be>);
map!("lb_fragments_v2" = FRAGMENTS, FRAGMENTS: FragmentMap<u32>);
map!("lb_fragments6_v1" = FRAGMENTS6, FRAGMENTS6: FragmentMap<Ipv6Be>);
map!("lb_held_fragments_v2" = HELD_FRAGMENTS, HELD_FRAGMENTS: HeldMap<u32>);
map!("lb_held_fragments6_v1" = HELD_FRAGMENTS6, HELD_FRAGMENTS6: HeldMap<Ipv6Be>);
map!("lb_fragment_scratch_v1" = FRAGMENT_SCRATCH, FRAGMENT_SCRATCH: PerCpuArray<HeldFragment, 1>);
map!("lb_stats_v6" = STATS, STATS: PerCpuArray<Stats, 1>);
map!("lb_config_v3" = CONFIG, CONFIG: Array<Config, 1>);
map!("lb_reject_tokens_v1" = REJECT_TOKENS, REJECT_TOKENS: PerCpuArray<RejectTokens, 1>);
map!("lb_clock_v1" = CLOCK, CLOCK: Array<Clock, 1>);
map!("lb_epoch_v1" = EPOCH, EPOCH: Array<Epoch, 1>);
map!("lb_backend_loads_v1" = BACKEND_LOADS, BACKEND_LOADS: Array<BackendLoad, { MAX_BACKENDS as usize }, MMAPABLE>);

/// The frontend of a service address, port, protocol and scope.
#[inline(always)]
pub fn frontend<A: Family>(key: FrontendKey<A>) -> Option<&'static Frontend> {
    // SAFETY: a map value, alive until the program returns (module doc).
    unsafe { A::frontends().get(key) }
}

/// The backend id in a frontend's slot.
#[inline(always)]
pub fn slot(service_id: u32, slot: u32) -> Option<u32> {
    // SAFETY: as above; copied out.
    unsafe { SLOTS.get(SlotKey { service_id, slot }) }.map(|s| s.backend_id)
}

/// The backend id at `position` of [`SLOT_TABLES`], if one is there.
#[inline(always)]
pub fn table_position(position: u32) -> Option<u32> {
    table_entry(position).filter(|&id| id != 0)
}

/// What `position` of [`SLOT_TABLES`] holds, 0 where no backend is; nothing past the array.
#[inline(always)]
pub fn table_entry(position: u32) -> Option<u32> {
    let block = SLOT_TABLES.get_ptr(position / TABLE_BLOCK)?;
    let lane = (position % TABLE_BLOCK) as usize;
    // SAFETY: an array value, alive as long as the map and aligned, `lane` within it; the agent
    // writes each id as one aligned word through its mapping, so a whole-word read sees one
    // version.
    Some(unsafe { read_volatile(&raw const (*block).backend_ids[lane]) })
}

#[inline(always)]
pub fn backend<A: Family>(id: u32) -> Option<&'static Backend<A>> {
    // SAFETY: as above.
    unsafe { A::backends().get(id) }
}

/// The frontend address `addr_be` (network order), if frontends listen on it.
#[inline(always)]
pub fn vip<A: Family>(addr_be: A) -> Option<&'static Vip> {
    // SAFETY: as above.
    unsafe { A::vips().get(addr_be) }
}

/// Whether a source may reach the frontend `service_id`, a load-balancer IP with source ranges:
/// one of them holds it. The frontend's catch-all refuses the others, and no entry at all
/// (none written yet) refuses too.
#[inline(always)]
pub fn source_allowed<A: Family>(service_id: u32, src_addr_be: A) -> bool {
    let key = Key::new(
        SOURCE_RANGE_ID_BITS + A::BITS,
        SourceRangeKey {
            service_id,
            addr_be: src_addr_be,
        },
    );
    A::source_ranges()
        .get(&key)
        .is_some_and(|range| range.allowed != 0)
}

#[inline(always)]
pub fn flow<A: Family>(key: FlowKey<A>) -> Option<&'static Flow<A>> {
    // SAFETY: as above.
    unsafe { A::flows().get(key) }
}

/// The ports of a fragmented datagram, from its first fragment.
#[inline(always)]
pub fn fragment_ports<A: Family>(key: FragmentKey<A>) -> Option<&'static FragmentPorts> {
    // SAFETY: as above.
    unsafe { A::fragments().get(key) }
}

/// A later fragment held for its datagram's first.
#[inline(always)]
pub fn held_fragment<A: Family>(key: HeldKey<A>) -> Option<&'static HeldFragment> {
    // SAFETY: as above.
    unsafe { A::held_fragments().get(key) }
}

/// This CPU's room for one fragment's bytes.
#[inline(always)]
pub fn fragment_scratch() -> Option<&'static mut HeldFragment> {
    // SAFETY: this CPU's own entry of a per-CPU array, used from start to end of one step of
    // one program ([`crate::fragments`]); tc programs do not nest on a CPU.
    FRAGMENT_SCRATCH
        .get_ptr_mut(SINGLE_ENTRY)
        .map(|scratch| unsafe { &mut *scratch })
}

/// A flow, to refresh in place: racing writers of one flow (two CPUs) write the same fields
/// with values that are each valid.
#[inline(always)]
pub fn flow_mut<A: Family>(key: FlowKey<A>) -> Option<&'static mut Flow<A>> {
    // SAFETY: as above; a non-null pointer to a value of the map's type.
    A::flows()
        .get_ptr_mut(key)
        .map(|flow| unsafe { &mut *flow })
}

/// A reply entry, to refresh in place, as [`flow_mut`].
#[inline(always)]
pub fn reply_mut<A: Family>(key: FlowKey<A>) -> Option<&'static mut Reply<A>> {
    // SAFETY: as for `flow_mut`.
    A::replies()
        .get_ptr_mut(key)
        .map(|reply| unsafe { &mut *reply })
}

#[inline(always)]
pub fn reply<A: Family>(key: FlowKey<A>) -> Option<&'static Reply<A>> {
    // SAFETY: as above.
    unsafe { A::replies().get(key) }
}

#[inline(always)]
pub fn affinity<A: Family>(key: AffinityKey<A>) -> Option<&'static Affinity> {
    // SAFETY: as above.
    unsafe { A::affinities().get(key) }
}

/// What the node's connected socket `cookie` dialled.
#[inline(always)]
pub fn connected<A: Family>(cookie: u64) -> Option<&'static Connected<A>> {
    // SAFETY: as above.
    unsafe { A::connected().get(cookie) }
}

/// The frontend an unconnected socket sent to, by the backend it went to.
#[inline(always)]
pub fn socket_frontend<A: Family>(key: SocketKey<A>) -> Option<&'static SocketFrontend<A>> {
    // SAFETY: as above.
    unsafe { A::sockets().get(key) }
}

/// The counted flows of backend `id`, as they stand.
#[inline(always)]
pub fn backend_load(id: u32) -> Option<BackendLoad> {
    let load = BACKEND_LOADS.get_ptr(load_index(id))?;
    // SAFETY: an array value, alive as long as the map and aligned for its fields; read
    // whole-word, as every writer writes them (atomic adds), so each is one version.
    unsafe {
        Some(BackendLoad {
            active: read_volatile(&raw const (*load).active),
            inactive: read_volatile(&raw const (*load).inactive),
        })
    }
}

/// Adds to backend `id`'s counted flows by atomic adds, as every writer does (other CPUs, the
/// agent's corrections through its mapping): none is lost, and no CPU waits on a lock.
#[inline(always)]
pub fn add_load(id: u32, active: i64, inactive: i64) {
    let Some(load) = BACKEND_LOADS.get_ptr_mut(load_index(id)) else {
        return;
    };
    // SAFETY: as above; an atomic add on an aligned i64 of the map's value.
    unsafe {
        if active != 0 {
            atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(&raw mut (*load).active, active);
        }
        if inactive != 0 {
            atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(
                &raw mut (*load).inactive,
                inactive,
            );
        }
    }
}

/// Turns this CPU's round-robin cursor of `service_id`; where it stood.
#[inline(always)]
pub fn next_cursor(service_id: u32) -> Option<u32> {
    let cursor = CURSORS.get_ptr_mut(service_id)?;
    // SAFETY: this CPU's own slot of a per-CPU array, which lives as long as the map; a
    // program that interrupts this one on the same CPU at worst repeats a turn.
    unsafe {
        let current = *cursor;
        *cursor = current.wrapping_add(1);
        Some(current)
    }
}

/// This CPU's reject bucket.
#[inline(always)]
pub fn reject_tokens() -> Option<&'static mut RejectTokens> {
    // SAFETY: as for `next_cursor`: at worst a reject more or less.
    REJECT_TOKENS
        .get_ptr_mut(SINGLE_ENTRY)
        .map(|tokens| unsafe { &mut *tokens })
}

/// This CPU's counters.
#[inline(always)]
pub fn stats() -> Option<&'static mut Stats> {
    // SAFETY: as for `next_cursor`: a counter at worst misses an increment.
    STATS
        .get_ptr_mut(SINGLE_ENTRY)
        .map(|stats| unsafe { &mut *stats })
}

/// This CPU's counters of the frontend `service_id`.
#[inline(always)]
pub fn frontend_stats(service_id: u32) -> Option<&'static mut FrontendStats> {
    // SAFETY: as for `stats`.
    FRONTEND_STATS
        .get_ptr_mut(service_id)
        .map(|stats| unsafe { &mut *stats })
}

#[inline(always)]
pub fn config() -> Option<&'static Config> {
    CONFIG.get(SINGLE_ENTRY)
}

#[inline(always)]
pub fn clock() -> Option<&'static Clock> {
    CLOCK.get(SINGLE_ENTRY)
}

/// The agent's count of backend removals ([`Epoch`]).
#[inline(always)]
pub fn backends_epoch() -> u32 {
    EPOCH
        .get(SINGLE_ENTRY)
        .map_or(0, |epoch| epoch.backends_removed)
}
