//! The map definitions; names, keys and values come from `lb_common::maps`, whose constants the
//! names here must equal (the agent checks every one at load).
//!
//! The maps the agent writes allocate entries as they are written: sized for the largest
//! cluster, they would otherwise hold over 100 MiB of kernel memory on every node. The LRU maps
//! are always preallocated.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::maps::{
    Affinity, AffinityKey, Backend, Clock, Config, Connected, Epoch, Flow, FlowKey, Frontend,
    FrontendKey, FrontendStats, MAX_AFFINITIES, MAX_BACKENDS, MAX_CONNECTED, MAX_FLOWS,
    MAX_SERVICES, MAX_SLOTS, MAX_SOCKETS, MAX_VIPS, Reply, Slot, SlotKey, SocketFrontend,
    SocketKey, Stats, Vip,
};

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

#[btf_map(name = "lb_frontends_v1")]
pub static FRONTENDS: HashMap<FrontendKey, Frontend, { MAX_SERVICES as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map(name = "lb_slots_v1")]
pub static SLOTS: HashMap<SlotKey, Slot, { MAX_SLOTS as usize }, NO_PREALLOC> = HashMap::new();

#[btf_map(name = "lb_backends_v1")]
pub static BACKENDS: HashMap<u32, Backend, { MAX_BACKENDS as usize }, NO_PREALLOC> = HashMap::new();

#[btf_map(name = "lb_vips_v1")]
pub static VIPS: HashMap<u32, Vip, { MAX_VIPS as usize }, NO_PREALLOC> = HashMap::new();

#[btf_map(name = "lb_flows_v2")]
pub static FLOWS: LruHashMap<FlowKey, Flow, { MAX_FLOWS as usize }> = LruHashMap::new();

#[btf_map(name = "lb_replies_v1")]
pub static REPLIES: LruHashMap<FlowKey, Reply, { MAX_FLOWS as usize }> = LruHashMap::new();

#[btf_map(name = "lb_sockets_v1")]
pub static SOCKETS: LruHashMap<SocketKey, SocketFrontend, { MAX_SOCKETS as usize }> =
    LruHashMap::new();

#[btf_map(name = "lb_connected_v1")]
pub static CONNECTED: HashMap<u64, Connected, { MAX_CONNECTED as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map(name = "lb_affinity_v1")]
pub static AFFINITY: LruHashMap<AffinityKey, Affinity, { MAX_AFFINITIES as usize }> =
    LruHashMap::new();

#[btf_map(name = "lb_cursors_v1")]
pub static CURSORS: PerCpuArray<u32, { MAX_SERVICES as usize }> = PerCpuArray::new();

#[btf_map(name = "lb_fe_stats_v1")]
pub static FRONTEND_STATS: PerCpuArray<FrontendStats, { MAX_SERVICES as usize }> =
    PerCpuArray::new();

#[btf_map(name = "lb_stats_v1")]
pub static STATS: PerCpuArray<Stats, 1> = PerCpuArray::new();

#[btf_map(name = "lb_config_v1")]
pub static CONFIG: Array<Config, 1> = Array::new();

#[btf_map(name = "lb_clock_v1")]
pub static CLOCK: Array<Clock, 1> = Array::new();

#[btf_map(name = "lb_epoch_v1")]
pub static EPOCH: Array<Epoch, 1> = Array::new();
