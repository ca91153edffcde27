//! The agent-written maps: where a sync's writes go ([`MapWrites`]), the kernel's maps
//! ([`KernelMaps`]: plan operations applied, entries read back, flows expired) and, for tests,
//! maps in memory ([`memory`]).

mod layout;
mod loads;
mod mapped;
pub mod memory;
mod tables;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
};
use lb_common::maps::{
    BACKEND_LOADS, BACKENDS, BACKENDS6, Backend, BackendLoad, CLOCK, CONFIG, CONNECTED, CONNECTED6,
    Clock, Config, Connected, EPOCH, Epoch, FLOW_COUNTED, FLOWS, FLOWS6, FRONTEND_STATS, FRONTENDS,
    FRONTENDS6, Flow, FlowKey, Frontend, FrontendKey, FrontendStats, Ipv6Be, MAX_CONNECTED,
    MAX_FLOWS, REPLIES, REPLIES6, Reply, SINGLE_ENTRY, SLOT_TABLES, SLOTS, SOURCE_RANGES,
    SOURCE_RANGES6, STATE_CLOSING, STATS, Slot, SlotKey, SourceRange, SourceRangeKey, Stats, VIPS,
    VIPS6, Vip, load_index,
};
pub use loads::BackendLoads;
use tables::SlotTables;

use self::layout::{Address, ByFamily};
use crate::{
    model::Family,
    plan::{self, MapEntries, Op},
};

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
    #[error("{0} is not the memory-mappable array of this build's capacity and value size")]
    Layout(&'static str),
    #[error("mapping {0} into memory")]
    Mmap(&'static str, #[source] std::io::Error),
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
    frontends6: HashMap<MapData, FrontendKey<Ipv6Be>, Frontend>,
    slots: HashMap<MapData, SlotKey, Slot>,
    backends: HashMap<MapData, u32, Backend>,
    backends6: HashMap<MapData, u32, Backend<Ipv6Be>>,
    vips: HashMap<MapData, u32, Vip>,
    vips6: HashMap<MapData, Ipv6Be, Vip>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, SourceRange>,
    source_ranges6: LpmTrie<MapData, SourceRangeKey<Ipv6Be>, SourceRange>,
    flows: HashMap<MapData, FlowKey, Flow>,
    flows6: HashMap<MapData, FlowKey<Ipv6Be>, Flow<Ipv6Be>>,
    replies: HashMap<MapData, FlowKey, Reply>,
    replies6: HashMap<MapData, FlowKey<Ipv6Be>, Reply<Ipv6Be>>,
    connected: HashMap<MapData, u64, Connected>,
    connected6: HashMap<MapData, u64, Connected<Ipv6Be>>,
    config: Array<MapData, Config>,
    clock: Array<MapData, Clock>,
    epoch: Array<MapData, Epoch>,
    stats: PerCpuArray<MapData, Stats>,
    frontend_stats: PerCpuArray<MapData, FrontendStats>,
    loads: BackendLoads,
    maglev: SlotTables,
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
            frontends6: typed(FRONTENDS6, map(FRONTENDS6)?)?,
            slots: typed(SLOTS, map(SLOTS)?)?,
            backends: typed(BACKENDS, map(BACKENDS)?)?,
            backends6: typed(BACKENDS6, map(BACKENDS6)?)?,
            vips: typed(VIPS, map(VIPS)?)?,
            vips6: typed(VIPS6, map(VIPS6)?)?,
            source_ranges: typed(SOURCE_RANGES, map(SOURCE_RANGES)?)?,
            source_ranges6: typed(SOURCE_RANGES6, map(SOURCE_RANGES6)?)?,
            flows: typed(FLOWS, map(FLOWS)?)?,
            flows6: typed(FLOWS6, map(FLOWS6)?)?,
            replies: typed(REPLIES, map(REPLIES)?)?,
            replies6: typed(REPLIES6, map(REPLIES6)?)?,
            connected: typed(CONNECTED, map(CONNECTED)?)?,
            connected6: typed(CONNECTED6, map(CONNECTED6)?)?,
            config: typed(CONFIG, map(CONFIG)?)?,
            clock: typed(CLOCK, map(CLOCK)?)?,
            epoch: typed(EPOCH, map(EPOCH)?)?,
            stats: typed(STATS, map(STATS)?)?,
            frontend_stats: typed(FRONTEND_STATS, map(FRONTEND_STATS)?)?,
            loads: BackendLoads::map(map(BACKEND_LOADS)?)?,
            maglev: SlotTables::map(map(SLOT_TABLES)?)?,
        })
    }

    /// What the kernel holds now, both families'.
    pub fn read(&self) -> Result<MapEntries> {
        let mut entries = MapEntries {
            slots: self
                .slots
                .iter()
                .collect::<Result<_, _>>()
                .map_err(reading(SLOTS))?,
            ..MapEntries::default()
        };
        let MapEntries {
            frontends,
            backends,
            vips,
            source_ranges,
            ..
        } = &mut entries;
        read_into(&self.frontends, FRONTENDS, |key, frontend| {
            frontends.insert(layout::plan_frontend_key(&key), frontend);
        })?;
        read_into(&self.frontends6, FRONTENDS6, |key, frontend| {
            frontends.insert(layout::plan_frontend_key(&key), frontend);
        })?;
        read_into(&self.backends, BACKENDS, |id, backend| {
            backends.insert(id, layout::plan_backend(&backend));
        })?;
        read_into(&self.backends6, BACKENDS6, |id, backend| {
            backends.insert(id, layout::plan_backend(&backend));
        })?;
        read_into(&self.vips, VIPS, |address, vip| {
            vips.insert(address.ip(), vip);
        })?;
        read_into(&self.vips6, VIPS6, |address, vip| {
            vips.insert(address.ip(), vip);
        })?;
        read_into(&self.source_ranges, SOURCE_RANGES, |key, range| {
            source_ranges.insert(layout::plan_range_key(key.prefix_len(), &key.data()), range);
        })?;
        read_into(&self.source_ranges6, SOURCE_RANGES6, |key, range| {
            source_ranges.insert(layout::plan_range_key(key.prefix_len(), &key.data()), range);
        })?;
        for frontend in entries.frontends.values() {
            if plan::has_table(frontend) {
                let count = usize::from(frontend.backend_count);
                let table = self
                    .maglev
                    .read(frontend.table_offset, count)
                    .ok_or(Error::Layout(SLOT_TABLES))?;
                entries.tables.insert(frontend.table_offset, table.into());
            }
        }
        Ok(entries)
    }

    /// The backend the node's connected socket `cookie` was given, if it dialled a frontend
    /// (an IPv6 socket that dialled an IPv4-mapped one is IPv4's).
    pub fn dialled_backend(&self, cookie: u64) -> Option<SocketAddr> {
        let backend =
            |address: IpAddr, port_be: u16| SocketAddr::new(address, u16::from_be(port_be));
        if let Ok(connected) = self.connected.get(&cookie, 0) {
            return Some(backend(
                connected.backend_addr_be.ip(),
                connected.backend_port_be,
            ));
        }
        let connected = self.connected6.get(&cookie, 0).ok()?;
        Some(backend(
            connected.backend_addr_be.ip(),
            connected.backend_port_be,
        ))
    }

    /// How many of the node's connected sockets that dialled a frontend are open.
    pub fn connected_sockets(&self) -> Result<usize> {
        fn count<V: aya::Pod>(map: &HashMap<MapData, u64, V>, name: &'static str) -> Result<usize> {
            map.keys()
                .take(MAX_CONNECTED as usize)
                .try_fold(0, |n, key| key.map(|_| n + 1))
                .map_err(reading(name))
        }
        Ok(count(&self.connected, CONNECTED)? + count(&self.connected6, CONNECTED6)?)
    }

    /// The config the datapath runs with now.
    pub fn config(&self) -> Result<Config> {
        self.config.get(&SINGLE_ENTRY, 0).map_err(reading(CONFIG))
    }

    /// How many flows the datapath tracks, and the highest backend id they name: one walk of
    /// each family's, for the agent's start.
    pub fn flows(&self) -> Result<(usize, u32)> {
        let (v4, highest_v4) = tracked(&self.flows, FLOWS)?;
        let (v6, highest_v6) = tracked(&self.flows6, FLOWS6)?;
        Ok((v4 + v6, highest_v4.max(highest_v6)))
    }

    /// How many flow and reply entries the datapath holds, idle ones included.
    pub fn flow_entries(&self) -> Result<(usize, usize)> {
        Ok((
            count(&self.flows, FLOWS)? + count(&self.flows6, FLOWS6)?,
            count(&self.replies, REPLIES)? + count(&self.replies6, REPLIES6)?,
        ))
    }

    /// Removes the flow and reply entries idle at `now_ns` (the datapath's clock, `CLOCK_MONOTONIC`):
    /// the LRU tables would keep them until full, and an insert that must evict costs more than
    /// one that finds room. How many of each went; a failure on one table still lets the others
    /// be done.
    pub fn expire_flows(&mut self, now_ns: u64) -> Result<(usize, usize)> {
        let config = self.config()?;
        let live =
            |protocol, state, last_seen_ns| config.is_live(protocol, state, last_seen_ns, now_ns);
        // The flows that stay are counted, for the backends' loads: those that idled out
        // here, or that the LRU evicted, the datapath never saw end.
        let loads_before = self.loads.nonzero();
        let mut counted = BTreeMap::new();
        let mut count = |flags: u8, state: u8, backend_id: u32| {
            if flags & FLOW_COUNTED != 0 {
                let load: &mut BackendLoad = counted.entry(load_index(backend_id)).or_default();
                if state == STATE_CLOSING {
                    load.inactive += 1;
                } else {
                    load.active += 1;
                }
            }
        };
        let flows = expire(
            &mut self.flows,
            FLOWS,
            |k, f| live(k.protocol, f.state, f.last_seen_ns),
            |f| count(f.flags, f.state, f.backend_id),
        );
        let flows6 = expire(
            &mut self.flows6,
            FLOWS6,
            |k, f| live(k.protocol, f.state, f.last_seen_ns),
            |f| count(f.flags, f.state, f.backend_id),
        );
        // Only over whole walks: a failed one counted too few.
        if flows.is_ok() && flows6.is_ok() {
            self.loads.correct(&loads_before, &counted);
        }
        let replies = expire(
            &mut self.replies,
            REPLIES,
            |k, r| live(k.protocol, r.state, r.last_seen_ns),
            |_| {},
        );
        let replies6 = expire(
            &mut self.replies6,
            REPLIES6,
            |k, r| live(k.protocol, r.state, r.last_seen_ns),
            |_| {},
        );
        Ok((flows? + flows6?, replies? + replies6?))
    }

    /// The flows counted for each backend that has any, by its [`load_index`]: the loads
    /// least-connection frontends balance by.
    pub fn backend_loads(&self) -> BTreeMap<u32, BackendLoad> {
        self.loads.nonzero()
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
        use ByFamily::{V4, V6};
        match op {
            Op::PutBackend(id, backend) => match layout::backend(backend) {
                V4(backend) => self.backends.insert(id, backend, 0),
                V6(backend) => self.backends6.insert(id, backend, 0),
            },
            Op::PutSlot(key, slot) => self.slots.insert(key, slot, 0),
            Op::PutTable(offset, table) => {
                return match self.maglev.write(*offset, table) {
                    Some(_) => Ok(()),
                    None => Err(WriteError {
                        map: SLOT_TABLES,
                        cause: format!(
                            "positions {offset} to {} are past the map's end",
                            u64::from(*offset) + table.len() as u64
                        )
                        .into(),
                    }),
                };
            }
            // No frontend reads it; the table written there next replaces each position.
            Op::DeleteTable(_) => return Ok(()),
            Op::PutFrontend(key, frontend) => match layout::frontend_key(key) {
                V4(key) => self.frontends.insert(key, frontend, 0),
                V6(key) => self.frontends6.insert(key, frontend, 0),
            },
            Op::PutVip(address, vip) => match layout::address(*address) {
                V4(address) => self.vips.insert(address, vip, 0),
                V6(address) => self.vips6.insert(address, vip, 0),
            },
            Op::PutSourceRange(key, range) => match layout::range_key(key) {
                (bits, V4(data)) => self.source_ranges.insert(&Key::new(bits, data), range, 0),
                (bits, V6(data)) => self.source_ranges6.insert(&Key::new(bits, data), range, 0),
            },
            Op::DeleteSourceRange(key) => match layout::range_key(key) {
                (bits, V4(data)) => self.source_ranges.remove(&Key::new(bits, data)),
                (bits, V6(data)) => self.source_ranges6.remove(&Key::new(bits, data)),
            },
            Op::DeleteVip(address) => match layout::address(*address) {
                V4(address) => self.vips.remove(&address),
                V6(address) => self.vips6.remove(&address),
            },
            Op::DeleteFrontend(key) => match layout::frontend_key(key) {
                V4(key) => self.frontends.remove(&key),
                V6(key) => self.frontends6.remove(&key),
            },
            Op::DeleteSlot(key) => self.slots.remove(key),
            Op::DeleteBackend(id, Family::V4) => self.backends.remove(id),
            Op::DeleteBackend(id, Family::V6) => self.backends6.remove(id),
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

/// Every entry of one of the agent-written maps, each into the plan's entries by `put`.
fn read_into<K, V>(
    map: impl IntoIterator<Item = Result<(K, V), MapError>>,
    name: &'static str,
    mut put: impl FnMut(K, V),
) -> Result<()> {
    for entry in map {
        let (key, value) = entry.map_err(reading(name))?;
        put(key, value);
    }
    Ok(())
}

/// The entries of a flow table, at most its capacity: entries come and go while it is walked,
/// and the kernel restarts a walk whose key was just deleted.
fn walk<K: aya::Pod, V: aya::Pod>(
    table: &HashMap<MapData, K, V>,
) -> impl Iterator<Item = Result<(K, V), MapError>> + '_ {
    table.iter().take(MAX_FLOWS as usize)
}

/// How many entries a flow table holds.
fn count<K: aya::Pod, V: aya::Pod>(
    table: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<usize> {
    walk(table)
        .try_fold(0, |n, entry| entry.map(|_| n + 1))
        .map_err(reading(name))
}

/// How many flows a family's table holds, and the highest backend id they name.
fn tracked<K: aya::Pod, A>(
    table: &HashMap<MapData, K, Flow<A>>,
    name: &'static str,
) -> Result<(usize, u32)>
where
    Flow<A>: aya::Pod,
{
    walk(table)
        .try_fold((0, 0), |(count, highest), entry| {
            entry.map(|(_, flow)| (count + 1, highest.max(flow.backend_id)))
        })
        .map_err(reading(name))
}

/// Removes the entries of `table` (named `name`) that are not `live`. The idle keys are
/// gathered first (a walk that deletes as it goes restarts from the table's start), and each is
/// read again just before its removal: one a packet has revived since stays, but for a packet
/// in the microseconds between that read and the removal (there is no compare-and-delete;
/// Cilium's GC has the same window). The datapath treats such an entry as new anyway. Each
/// entry the walk finds live is handed to `stays`.
fn expire<K: aya::Pod, V: aya::Pod>(
    table: &mut HashMap<MapData, K, V>,
    name: &'static str,
    live: impl Fn(&K, &V) -> bool,
    mut stays: impl FnMut(&V),
) -> Result<usize> {
    let failed = |source| Error::Expire { map: name, source };
    let mut idle = Vec::new();
    for entry in walk(table) {
        let (key, value) = entry.map_err(failed)?;
        if live(&key, &value) {
            stays(&value);
        } else {
            idle.push(key);
        }
    }
    let mut removed = 0;
    for key in idle {
        let still_idle = match table.get(&key, 0) {
            Ok(value) => !live(&key, &value),
            Err(MapError::KeyNotFound) => false,
            Err(e) => return Err(failed(e)),
        };
        if still_idle {
            match table.remove(&key) {
                Ok(()) => removed += 1,
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(failed(e)),
            }
        }
    }
    Ok(removed)
}
