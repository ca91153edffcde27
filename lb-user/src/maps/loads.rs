//! The backends' counted flows ([`BACKEND_LOADS`]), mapped into the agent's memory. The
//! datapath counts them with atomic adds; the agent corrects them the same way, through the
//! mapping, so that neither loses the other's (a map update from userspace writes a value
//! whole, over any add made meanwhile).

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic,
};

use aya::maps::{Map, MapData};
use lb_common::maps::{BACKEND_LOADS, BPF_F_MMAPABLE, BackendLoad, MAX_BACKENDS};

use super::{Error, Result, reading};

/// [`BACKEND_LOADS`], mapped.
pub struct BackendLoads {
    /// The map, held open with its mapping.
    _map: MapData,
    loads: NonNull<BackendLoad>,
    bytes: usize,
}

// SAFETY: the mapping is the kernel's memory, shared with every CPU the datapath runs on;
// this type reaches it by atomic operations only, from any thread, through `&self`.
unsafe impl Send for BackendLoads {}
// SAFETY: as for `Send`.
unsafe impl Sync for BackendLoads {}

impl BackendLoads {
    /// Maps `map`, which must be [`BACKEND_LOADS`] as this build defines it.
    pub fn map(map: Map) -> Result<Self> {
        let Map::Array(map) = map else {
            return Err(Error::Layout(BACKEND_LOADS));
        };
        let info = map.info().map_err(reading(BACKEND_LOADS))?;
        if info.max_entries() != MAX_BACKENDS
            || info.value_size() as usize != size_of::<BackendLoad>()
            || info.map_flags() & BPF_F_MMAPABLE == 0
        {
            return Err(Error::Layout(BACKEND_LOADS));
        }
        let bytes = MAX_BACKENDS as usize * size_of::<BackendLoad>();
        // SAFETY: a shared mapping of a memory-mappable array map's values, which the kernel
        // lays out from offset 0, each `BackendLoad` at its index; the result is checked.
        let mapped = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(Error::Mmap(BACKEND_LOADS, io::Error::last_os_error()));
        }
        let loads = NonNull::new(mapped.cast())
            .ok_or_else(|| Error::Mmap(BACKEND_LOADS, io::Error::other("mmap returned null")))?;
        Ok(Self {
            _map: map,
            loads,
            bytes,
        })
    }

    /// The two counters of backend `id`.
    fn counters(&self, id: u32) -> Option<(&atomic::AtomicI64, &atomic::AtomicI64)> {
        if id >= MAX_BACKENDS {
            return None;
        }
        // SAFETY: `id` is within the mapping, which lives as long as `self`; its i64 fields
        // are aligned (the kernel's pages, 16-byte values), and every writer, the datapath
        // included, changes them by atomic operations only.
        unsafe {
            let load = self.loads.as_ptr().add(id as usize);
            Some((
                atomic::AtomicI64::from_ptr(&raw mut (*load).active),
                atomic::AtomicI64::from_ptr(&raw mut (*load).inactive),
            ))
        }
    }

    /// Backend `id`'s counted flows now.
    pub fn get(&self, id: u32) -> BackendLoad {
        self.counters(id)
            .map_or_else(BackendLoad::default, |(active, inactive)| BackendLoad {
                active: active.load(atomic::Ordering::Relaxed),
                inactive: inactive.load(atomic::Ordering::Relaxed),
            })
    }

    /// Adds `by` to backend `id`'s counts, as the datapath adds.
    pub fn add(&self, id: u32, by: BackendLoad) {
        if let Some((active, inactive)) = self.counters(id) {
            active.fetch_add(by.active, atomic::Ordering::Relaxed);
            inactive.fetch_add(by.inactive, atomic::Ordering::Relaxed);
        }
    }

    /// Every backend whose counts are not both 0.
    pub fn nonzero(&self) -> BTreeMap<u32, BackendLoad> {
        (1..MAX_BACKENDS)
            .map(|id| (id, self.get(id)))
            .filter(|(_, load)| *load != BackendLoad::default())
            .collect()
    }

    /// Sets the counts to `counted`, the flows a walk of the flow tables found, from
    /// `before`, the counts as they were when it began: what the datapath added since stays
    /// added. A flow made during the walk and found by it counts twice until the next
    /// correction; none is lost.
    pub fn correct(
        &self,
        before: &BTreeMap<u32, BackendLoad>,
        counted: &BTreeMap<u32, BackendLoad>,
    ) {
        let ids = before.keys().chain(counted.keys());
        for &id in ids.collect::<BTreeSet<_>>() {
            let was = before.get(&id).copied().unwrap_or_default();
            let is = counted.get(&id).copied().unwrap_or_default();
            if was != is {
                self.add(
                    id,
                    BackendLoad {
                        active: is.active - was.active,
                        inactive: is.inactive - was.inactive,
                    },
                );
            }
        }
    }
}

impl Drop for BackendLoads {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of `bytes`, unmapped once; nothing borrows it past
        // `self`.
        unsafe {
            libc::munmap(self.loads.as_ptr().cast(), self.bytes);
        }
    }
}
