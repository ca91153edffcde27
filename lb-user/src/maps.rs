//! The kernel side of the agent-written maps: apply plan operations, read entries back.

use std::path::Path;

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
};
use lb_common::maps::{
    BACKENDS, Backend, CONFIG, Config, FRONTEND_STATS, FRONTENDS, Frontend, FrontendKey,
    FrontendStats, SINGLE_ENTRY, SLOTS, STATS, Slot, SlotKey, Stats, VIPS, Vip,
};

use crate::plan::{MapEntries, Op};

pub struct KernelMaps {
    frontends: HashMap<MapData, FrontendKey, Frontend>,
    slots: HashMap<MapData, SlotKey, Slot>,
    backends: HashMap<MapData, u32, Backend>,
    vips: HashMap<MapData, u32, Vip>,
    config: Array<MapData, Config>,
    stats: PerCpuArray<MapData, Stats>,
    frontend_stats: PerCpuArray<MapData, FrontendStats>,
}

impl KernelMaps {
    /// Takes the maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("the eBPF object has no map {name}"))
        };
        Self::from_maps(
            take(FRONTENDS)?,
            take(SLOTS)?,
            take(BACKENDS)?,
            take(VIPS)?,
            take(CONFIG)?,
            take(STATS)?,
            take(FRONTEND_STATS)?,
        )
    }

    /// Opens the maps an agent pinned under `pin_dir`.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        let open = |name: &str| -> Result<Map> {
            let path = pin_dir.join(name);
            let data =
                MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
            Map::from_map_data(data).with_context(|| format!("reading {}", path.display()))
        };
        Self::from_maps(
            open(FRONTENDS)?,
            open(SLOTS)?,
            open(BACKENDS)?,
            open(VIPS)?,
            open(CONFIG)?,
            open(STATS)?,
            open(FRONTEND_STATS)?,
        )
    }

    fn from_maps(
        frontends: Map,
        slots: Map,
        backends: Map,
        vips: Map,
        config: Map,
        stats: Map,
        frontend_stats: Map,
    ) -> Result<Self> {
        Ok(Self {
            frontends: HashMap::try_from(frontends).context(FRONTENDS)?,
            slots: HashMap::try_from(slots).context(SLOTS)?,
            backends: HashMap::try_from(backends).context(BACKENDS)?,
            vips: HashMap::try_from(vips).context(VIPS)?,
            config: Array::try_from(config).context(CONFIG)?,
            stats: PerCpuArray::try_from(stats).context(STATS)?,
            frontend_stats: PerCpuArray::try_from(frontend_stats).context(FRONTEND_STATS)?,
        })
    }

    pub fn apply(&mut self, op: &Op) -> Result<(), aya::maps::MapError> {
        match op {
            Op::PutBackend(id, backend) => self.backends.insert(id, backend, 0),
            Op::PutSlot(key, slot) => self.slots.insert(key, slot, 0),
            Op::PutFrontend(key, frontend) => self.frontends.insert(key, frontend, 0),
            Op::PutVip(addr, vip) => self.vips.insert(addr, vip, 0),
            Op::DeleteVip(addr) => self.vips.remove(addr),
            Op::DeleteFrontend(key) => self.frontends.remove(key),
            Op::DeleteSlot(key) => self.slots.remove(key),
            Op::DeleteBackend(id) => self.backends.remove(id),
        }
    }

    /// What the kernel holds now.
    pub fn read(&self) -> Result<MapEntries> {
        Ok(MapEntries {
            frontends: self.frontends.iter().collect::<Result<_, _>>()?,
            slots: self.slots.iter().collect::<Result<_, _>>()?,
            backends: self.backends.iter().collect::<Result<_, _>>()?,
            vips: self.vips.iter().collect::<Result<_, _>>()?,
        })
    }

    pub fn write_config(&mut self, config: &Config) -> Result<()> {
        self.config
            .set(SINGLE_ENTRY, config, 0)
            .with_context(|| format!("writing {CONFIG}"))
    }

    /// The counters of the frontend `service_id`, summed over CPUs.
    pub fn frontend_stats(&self, service_id: u32) -> Result<FrontendStats> {
        let per_cpu = self.frontend_stats.get(&service_id, 0)?;
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
        let per_cpu = self.stats.get(&SINGLE_ENTRY, 0)?;
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
        }))
    }
}
