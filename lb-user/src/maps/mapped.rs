//! Memory-mappable array maps (`BPF_F_MMAPABLE`) mapped into the agent's memory: read and
//! written in place, as the datapath reads them, without a syscall per entry.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
};

use aya::maps::{Map, MapData};
use lb_common::maps::BPF_F_MMAPABLE;

use super::{Error, Result, reading};

/// An array map of `len` values of `T`, mapped.
pub struct MappedArray<T> {
    /// The map, held open with its mapping.
    _map: MapData,
    values: NonNull<T>,
    len: u32,
}

// SAFETY: the mapping is the kernel's memory, shared with every CPU the datapath runs on; the
// users of this type reach it through atomics only, from any thread, through `&self`.
unsafe impl<T> Send for MappedArray<T> {}
// SAFETY: as for `Send`.
unsafe impl<T> Sync for MappedArray<T> {}

impl<T> MappedArray<T> {
    /// Maps `map`, named `name`, which must be a memory-mappable array of `len` values of `T`.
    pub fn map(map: Map, name: &'static str, len: u32) -> Result<Self> {
        let Map::Array(map) = map else {
            return Err(Error::Layout(name));
        };
        let info = map.info().map_err(reading(name))?;
        // The kernel lays values out 8 bytes apart at least: `T`s of other sizes would not be
        // where `at` finds them.
        if !size_of::<T>().is_multiple_of(8)
            || info.max_entries() != len
            || info.value_size() as usize != size_of::<T>()
            || info.map_flags() & BPF_F_MMAPABLE == 0
        {
            return Err(Error::Layout(name));
        }
        // SAFETY: a shared mapping of a memory-mappable array map's values, which the kernel
        // lays out from offset 0, each value at its index (its size a multiple of 8, checked
        // above, as the kernel rounds values); the result is checked.
        let mapped = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize * size_of::<T>(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(Error::Mmap(name, io::Error::last_os_error()));
        }
        let values = NonNull::new(mapped.cast())
            .ok_or_else(|| Error::Mmap(name, io::Error::other("mmap returned null")))?;
        Ok(Self {
            _map: map,
            values,
            len,
        })
    }

    /// Where value `index` lies in the mapping, if the map has it: valid, and aligned for `T`,
    /// as long as `self`.
    pub fn at(&self, index: u32) -> Option<NonNull<T>> {
        // SAFETY: `index` is within the mapping of `len` values.
        (index < self.len).then(|| unsafe { self.values.add(index as usize) })
    }

    /// How many values it holds.
    pub fn len(&self) -> u32 {
        self.len
    }
}

impl<T> Drop for MappedArray<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of `len` values, unmapped once; nothing borrows it
        // past `self`.
        unsafe {
            libc::munmap(
                self.values.as_ptr().cast(),
                self.len as usize * size_of::<T>(),
            );
        }
    }
}
