//! The backends' counted flows ([`BACKEND_LOADS`]), mapped into the agent's memory. The
//! datapath counts them with atomic adds; the agent corrects them the same way, through the
//! mapping, so that neither loses the other's (a map update from userspace writes a value
//! whole, over any add made meanwhile).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::atomic,
};

use aya::maps::Map;
use lb_common::maps::{BACKEND_LOADS, BackendLoad, MAX_BACKENDS, load_index};

use super::{Result, mapped::MappedArray};

/// [`BACKEND_LOADS`], mapped.
pub struct BackendLoads(MappedArray<BackendLoad>);

impl BackendLoads {
    /// Maps `map`, which must be [`BACKEND_LOADS`] as this build defines it.
    pub fn map(map: Map) -> Result<Self> {
        MappedArray::map(map, BACKEND_LOADS, MAX_BACKENDS).map(Self)
    }

    /// The two counters at `index` of the array.
    fn counters(&self, index: u32) -> Option<(&atomic::AtomicI64, &atomic::AtomicI64)> {
        let load = self.0.at(index)?.as_ptr();
        // SAFETY: `load` lies in the mapping, which lives as long as `self`; its i64 fields
        // are aligned (the kernel's pages, 16-byte values), and every writer, the datapath
        // included, changes them by atomic operations only.
        unsafe {
            Some((
                atomic::AtomicI64::from_ptr(&raw mut (*load).active),
                atomic::AtomicI64::from_ptr(&raw mut (*load).inactive),
            ))
        }
    }

    /// Backend `id`'s counted flows now.
    pub fn get(&self, id: u32) -> BackendLoad {
        self.at(load_index(id))
    }

    fn at(&self, index: u32) -> BackendLoad {
        self.counters(index)
            .map_or_else(BackendLoad::default, |(active, inactive)| BackendLoad {
                active: active.load(atomic::Ordering::Relaxed),
                inactive: inactive.load(atomic::Ordering::Relaxed),
            })
    }

    /// Adds `by` to backend `id`'s counts, as the datapath adds.
    pub fn add(&self, id: u32, by: BackendLoad) {
        self.add_at(load_index(id), by);
    }

    fn add_at(&self, index: u32, by: BackendLoad) {
        if let Some((active, inactive)) = self.counters(index) {
            active.fetch_add(by.active, atomic::Ordering::Relaxed);
            inactive.fetch_add(by.inactive, atomic::Ordering::Relaxed);
        }
    }

    /// Every count that is not both 0, by its [`load_index`].
    pub fn nonzero(&self) -> BTreeMap<u32, BackendLoad> {
        (0..MAX_BACKENDS)
            .map(|index| (index, self.at(index)))
            .filter(|(_, load)| *load != BackendLoad::default())
            .collect()
    }

    /// Sets the counts to `counted`, the flows a walk of the flow tables found, from
    /// `before`, the counts as they were when it began, both by [`load_index`]: what the
    /// datapath added since stays added. A flow made during the walk and found by it counts
    /// twice until the next correction; none is lost.
    pub fn correct(
        &self,
        before: &BTreeMap<u32, BackendLoad>,
        counted: &BTreeMap<u32, BackendLoad>,
    ) {
        let indices = before.keys().chain(counted.keys());
        for &index in indices.collect::<BTreeSet<_>>() {
            let was = before.get(&index).copied().unwrap_or_default();
            let is = counted.get(&index).copied().unwrap_or_default();
            if was != is {
                self.add_at(
                    index,
                    BackendLoad {
                        active: is.active - was.active,
                        inactive: is.inactive - was.inactive,
                    },
                );
            }
        }
    }
}
