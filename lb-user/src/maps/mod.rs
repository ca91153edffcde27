//! The agent-written maps: where a sync's writes go ([`MapWrites`]), the kernel's maps
//! ([`KernelMaps`]: plan operations applied, entries read back, flows expired) and, for tests,
//! maps in memory ([`memory`]).

pub mod memory;

use std::path::{Path, PathBuf};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
};
use lb_common::maps::{
    BACKENDS, Backend, CLOCK, CONFIG, CONNECTED, Clock, Config, Connected, EPOCH, Epoch, FLOWS,
    FRONTEND_STATS, FRONTENDS, Flow, FlowKey, Frontend, FrontendKey, FrontendStats, MAX_CONNECTED,
    MAX_FLOWS, REPLIES, Reply, SINGLE_ENTRY, SLOTS, SOURCE_RANGE_ID_BITS, SOURCE_RANGES, STATS,
    Slot, SlotKey, SourceRange, SourceRangeKey, Stats, VIPS, Vip,
};

use crate::plan::{MapEntries, Op, RangeKey};

/// A kernel map that could not be found, opened or read; named by its pin name.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the eBPF object has no map {0}")]
    Missing(&'static str),
    #[error("opening {}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("{map} is not of the type this build expects")]
    Type {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("expiring the idle entries of {map}")]
    Expire {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("reading {map}")]
    Read {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("writing {map}")]
    Write {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// What names `map` in a failed read.
fn reading(map: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Read { map, source }
}

/// A map write that did not take.
#[derive(Debug, thiserror::Error)]
#[error("writing {map}")]
pub struct WriteError {
    /// The map's name, as pinned.
    pub map: &'static str,
    #[source]
    pub cause: Box<dyn std::error::Error + Send + Sync>,
}

/// Where a sync's writes go: the kernel's maps, or memory ([`memory::MemoryMaps`], and
/// [`memory::FailingMaps`] which fails the writes it is told to).
pub trait MapWrites {
    /// Applies one operation of a plan.
    fn apply(&mut self, op: &Op) -> Result<(), WriteError>;
    /// Writes the datapath's config.
    fn write_config(&mut self, config: &Config) -> Result<(), WriteError>;
    /// Tells the datapath that backends were removed: its flows look theirs up again.
    fn bump_epoch(&mut self) -> Result<(), WriteError>;
}

fn kernel_error(map: &'static str) -> impl FnOnce(MapError) -> WriteError {
    move |e| WriteError {
        map,
        cause: Box::new(e),
    }
}

pub struct KernelMaps {
    frontends: HashMap<MapData, FrontendKey, Frontend>,
    slots: HashMap<MapData, SlotKey, Slot>,
    backends: HashMap<MapData, u32, Backend>,
    vips: HashMap<MapData, u32, Vip>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, SourceRange>,
    flows: HashMap<MapData, FlowKey, Flow>,
    replies: HashMap<MapData, FlowKey, Reply>,
    connected: HashMap<MapData, u64, Connected>,
    config: Array<MapData, Config>,
    clock: Array<MapData, Clock>,
    epoch: Array<MapData, Epoch>,
    stats: PerCpuArray<MapData, Stats>,
    frontend_stats: PerCpuArray<MapData, FrontendStats>,
}

impl KernelMaps {
    /// Takes the maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Self::from_maps(|name| ebpf.take_map(name).ok_or(Error::Missing(name)))
    }

    /// Opens the maps an agent pinned under `pin_dir`.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Self::from_maps(|name| {
            let path = pin_dir.join(name);
            let open = |source| Error::Open {
                path: path.clone(),
                source,
            };
            Map::from_map_data(MapData::from_pin(&path).map_err(open)?).map_err(open)
        })
    }

    fn from_maps(mut map: impl FnMut(&'static str) -> Result<Map>) -> Result<Self> {
        fn typed<T: TryFrom<Map, Error = MapError>>(map: &'static str, found: Map) -> Result<T> {
            T::try_from(found).map_err(|source| Error::Type { map, source })
        }
        Ok(Self {
            frontends: typed(FRONTENDS, map(FRONTENDS)?)?,
            slots: typed(SLOTS, map(SLOTS)?)?,
            backends: typed(BACKENDS, map(BACKENDS)?)?,
            vips: typed(VIPS, map(VIPS)?)?,
            source_ranges: typed(SOURCE_RANGES, map(SOURCE_RANGES)?)?,
            flows: typed(FLOWS, map(FLOWS)?)?,
            replies: typed(REPLIES, map(REPLIES)?)?,
            connected: typed(CONNECTED, map(CONNECTED)?)?,
            config: typed(CONFIG, map(CONFIG)?)?,
            clock: typed(CLOCK, map(CLOCK)?)?,
            epoch: typed(EPOCH, map(EPOCH)?)?,
            stats: typed(STATS, map(STATS)?)?,
            frontend_stats: typed(FRONTEND_STATS, map(FRONTEND_STATS)?)?,
        })
    }

    /// What the kernel holds now.
    pub fn read(&self) -> Result<MapEntries> {
        Ok(MapEntries {
            frontends: entries(&self.frontends, FRONTENDS)?,
            slots: entries(&self.slots, SLOTS)?,
            backends: entries(&self.backends, BACKENDS)?,
            vips: entries(&self.vips, VIPS)?,
            source_ranges: self
                .source_ranges
                .iter()
                .map(|entry| entry.map(|(key, range)| (range_key(&key), range)))
                .collect::<Result<_, _>>()
                .map_err(reading(SOURCE_RANGES))?,
        })
    }

    /// What the node's connected socket `cookie` dialled, if it dialled a frontend.
    pub fn connected(&self, cookie: u64) -> Option<Connected> {
        self.connected.get(&cookie, 0).ok()
    }

    /// How many of the node's connected sockets that dialled a frontend are open.
    pub fn connected_sockets(&self) -> Result<usize> {
        self.connected
            .keys()
            .take(MAX_CONNECTED as usize)
            .try_fold(0, |n, key| key.map(|_| n + 1))
            .map_err(reading(CONNECTED))
    }

    /// The config the datapath runs with now.
    pub fn config(&self) -> Result<Config> {
        self.config.get(&SINGLE_ENTRY, 0).map_err(reading(CONFIG))
    }

    /// How many flows the datapath tracks, and the highest backend id they name: one walk, for
    /// the agent's start.
    pub fn flows(&self) -> Result<(usize, u32)> {
        walk(&self.flows)
            .try_fold((0, 0), |(count, highest), entry| {
                entry.map(|(_, flow)| (count + 1, highest.max(flow.backend_id)))
            })
            .map_err(reading(FLOWS))
    }

    /// How many flow and reply entries the datapath holds, idle ones included.
    pub fn flow_entries(&self) -> Result<(usize, usize)> {
        let flows = walk(&self.flows).try_fold(0, |n, entry| entry.map(|_| n + 1));
        let replies = walk(&self.replies).try_fold(0, |n, entry| entry.map(|_| n + 1));
        Ok((
            flows.map_err(reading(FLOWS))?,
            replies.map_err(reading(REPLIES))?,
        ))
    }

    /// Removes the flow and reply entries idle at `now_ns` (the datapath's clock, `CLOCK_MONOTONIC`):
    /// the LRU tables would keep them until full, and an insert that must evict costs more than
    /// one that finds room. How many of each went; a failure on one table still lets the other
    /// be done.
    pub fn expire_flows(&mut self, now_ns: u64) -> Result<(usize, usize)> {
        let config = self.config()?;
        let flows = expire(&mut self.flows, |key, flow| {
            config.is_live(key.protocol, flow.state, flow.last_seen_ns, now_ns)
        })
        .map_err(|source| Error::Expire { map: FLOWS, source });
        let replies = expire(&mut self.replies, |key, reply| {
            config.is_live(key.protocol, reply.state, reply.last_seen_ns, now_ns)
        })
        .map_err(|source| Error::Expire {
            map: REPLIES,
            source,
        });
        Ok((flows?, replies?))
    }

    pub fn write_clock(&mut self, clock: &Clock) -> Result<()> {
        self.clock
            .set(SINGLE_ENTRY, clock, 0)
            .map_err(|source| Error::Write { map: CLOCK, source })
    }

    /// The datapath's epoch now: how many times backends were removed.
    pub fn epoch(&self) -> Result<Epoch> {
        self.epoch.get(&SINGLE_ENTRY, 0).map_err(reading(EPOCH))
    }

    /// The counters of the frontend `service_id`, summed over CPUs.
    pub fn frontend_stats(&self, service_id: u32) -> Result<FrontendStats> {
        let per_cpu = self
            .frontend_stats
            .get(&service_id, 0)
            .map_err(reading(FRONTEND_STATS))?;
        Ok(per_cpu
            .iter()
            .fold(FrontendStats::default(), |sum, s| FrontendStats {
                packets: sum.packets + s.packets,
                bytes: sum.bytes + s.bytes,
                new_flows: sum.new_flows + s.new_flows,
            }))
    }

    /// The datapath's counters, summed over CPUs.
    pub fn stats(&self) -> Result<Stats> {
        let per_cpu = self.stats.get(&SINGLE_ENTRY, 0).map_err(reading(STATS))?;
        Ok(per_cpu.iter().fold(Stats::default(), |sum, s| Stats {
            forwarded: sum.forwarded + s.forwarded,
            replied: sum.replied + s.replied,
            new_flows: sum.new_flows + s.new_flows,
            reselected: sum.reselected + s.reselected,
            dropped_no_backend: sum.dropped_no_backend + s.dropped_no_backend,
            rejected_no_backend: sum.rejected_no_backend + s.rejected_no_backend,
            snat_flows: sum.snat_flows + s.snat_flows,
            dropped_no_snat: sum.dropped_no_snat + s.dropped_no_snat,
            dropped_unknown_port: sum.dropped_unknown_port + s.dropped_unknown_port,
            socket_rewrites: sum.socket_rewrites + s.socket_rewrites,
            dropped_error: sum.dropped_error + s.dropped_error,
            rejects_limited: sum.rejects_limited + s.rejects_limited,
            dropped_source_range: sum.dropped_source_range + s.dropped_source_range,
            icmp_translated: sum.icmp_translated + s.icmp_translated,
            fragments_unmatched: sum.fragments_unmatched + s.fragments_unmatched,
            fragments_held: sum.fragments_held + s.fragments_held,
        }))
    }
}

impl MapWrites for KernelMaps {
    fn apply(&mut self, op: &Op) -> Result<(), WriteError> {
        match op {
            Op::PutBackend(id, backend) => self.backends.insert(id, backend, 0),
            Op::PutSlot(key, slot) => self.slots.insert(key, slot, 0),
            Op::PutFrontend(key, frontend) => self.frontends.insert(key, frontend, 0),
            Op::PutVip(addr, vip) => self.vips.insert(addr, vip, 0),
            Op::PutSourceRange(key, range) => self.source_ranges.insert(&trie_key(key), range, 0),
            Op::DeleteSourceRange(key) => self.source_ranges.remove(&trie_key(key)),
            Op::DeleteVip(addr) => self.vips.remove(addr),
            Op::DeleteFrontend(key) => self.frontends.remove(key),
            Op::DeleteSlot(key) => self.slots.remove(key),
            Op::DeleteBackend(id) => self.backends.remove(id),
        }
        .map_err(kernel_error(op.map()))
    }

    fn write_config(&mut self, config: &Config) -> Result<(), WriteError> {
        self.config
            .set(SINGLE_ENTRY, config, 0)
            .map_err(kernel_error(CONFIG))
    }

    fn bump_epoch(&mut self) -> Result<(), WriteError> {
        let epoch = self
            .epoch
            .get(&SINGLE_ENTRY, 0)
            .map_err(kernel_error(EPOCH))?;
        let bumped = Epoch {
            backends_removed: epoch.backends_removed.wrapping_add(1),
        };
        self.epoch
            .set(SINGLE_ENTRY, bumped, 0)
            .map_err(kernel_error(EPOCH))
    }
}

/// The kernel's key of a source range: the service id's bits, then the range's.
fn trie_key(key: &RangeKey) -> Key<SourceRangeKey> {
    let data = SourceRangeKey {
        service_id: key.service_id,
        addr_be: key.addr_be,
    };
    Key::new(SOURCE_RANGE_ID_BITS + u32::from(key.prefix_len), data)
}

fn range_key(key: &Key<SourceRangeKey>) -> RangeKey {
    let data = key.data();
    RangeKey {
        service_id: data.service_id,
        prefix_len: u8::try_from(key.prefix_len().saturating_sub(SOURCE_RANGE_ID_BITS))
            .unwrap_or(u8::MAX),
        addr_be: data.addr_be,
    }
}

/// Every entry of one of the agent-written maps.
fn entries<K: aya::Pod + Ord, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<std::collections::BTreeMap<K, V>> {
    map.iter().collect::<Result<_, _>>().map_err(reading(name))
}

/// The entries of a flow table, at most its capacity: entries come and go while it is walked,
/// and the kernel restarts a walk whose key was just deleted.
fn walk<V: aya::Pod>(
    table: &HashMap<MapData, FlowKey, V>,
) -> impl Iterator<Item = Result<(FlowKey, V), MapError>> + '_ {
    table.iter().take(MAX_FLOWS as usize)
}

/// Removes the entries of `table` that are not `live`. The idle keys are gathered first (a walk
/// that deletes as it goes restarts from the table's start), and each is read again just before
/// its removal: one a packet has revived since stays, but for a packet in the microseconds
/// between that read and the removal (there is no compare-and-delete; Cilium's GC has the same
/// window). The datapath treats such an entry as new anyway.
fn expire<V: aya::Pod>(
    table: &mut HashMap<MapData, FlowKey, V>,
    live: impl Fn(&FlowKey, &V) -> bool,
) -> Result<usize, MapError> {
    let mut idle = Vec::new();
    for entry in walk(table) {
        let (key, value) = entry?;
        if !live(&key, &value) {
            idle.push(key);
        }
    }
    let mut removed = 0;
    for key in idle {
        let still_idle = match table.get(&key, 0) {
            Ok(value) => !live(&key, &value),
            Err(MapError::KeyNotFound) => false,
            Err(e) => return Err(e),
        };
        if still_idle {
            match table.remove(&key) {
                Ok(()) => removed += 1,
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}
