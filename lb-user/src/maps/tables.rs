//! The slot tables ([`SLOT_TABLES`]), mapped into the agent's memory: a table is written in
//! place, only the positions whose backend changes, as Katran writes only the changed
//! positions of a ring; the datapath reads each position as one word, old or new.

use std::sync::atomic::{AtomicU32, Ordering};

use aya::maps::Map;
use lb_common::maps::{MAX_TABLE_POSITIONS, SLOT_TABLES, SlotBlock, TABLE_BLOCK};

use super::{Result, mapped::MappedArray};

/// [`SLOT_TABLES`], mapped: its blocks lie one after another, so its positions are one array.
pub struct SlotTables(MappedArray<SlotBlock>);

impl SlotTables {
    /// Maps `map`, which must be [`SLOT_TABLES`] as this build defines it.
    pub fn map(map: Map) -> Result<Self> {
        MappedArray::map(map, SLOT_TABLES, MAX_TABLE_POSITIONS / TABLE_BLOCK).map(Self)
    }

    /// The `count` positions from `offset`, if the map has them all.
    fn positions(&self, offset: u32, count: usize) -> Option<&[AtomicU32]> {
        let end = offset.checked_add(u32::try_from(count).ok()?)?;
        if count == 0 || end > self.0.len() * TABLE_BLOCK {
            return None;
        }
        let first = self.0.at(0)?.as_ptr().cast::<AtomicU32>();
        // SAFETY: the mapping holds `len` blocks of TABLE_BLOCK u32 each, without padding (64
        // bytes, a multiple of the kernel's 8-byte stride), so the `count` positions from
        // `offset` lie in it (checked above), as long as `self`; each is an aligned u32, which
        // this agent stores whole and the datapath only reads.
        Some(unsafe { std::slice::from_raw_parts(first.add(offset as usize), count) })
    }

    /// The backend ids of the table of `count` positions at `offset`.
    pub fn read(&self, offset: u32, count: usize) -> Option<Vec<u32>> {
        let positions = self.positions(offset, count)?;
        Some(
            positions
                .iter()
                .map(|p| p.load(Ordering::Relaxed))
                .collect(),
        )
    }

    /// Writes `table` at `offset`: how many positions changed, or nothing if the map does not
    /// have them all.
    pub fn write(&self, offset: u32, table: &[u32]) -> Option<usize> {
        Some(write_changed(self.positions(offset, table.len())?, table))
    }
}

/// Stores each backend id of `table` whose position differs; how many it stored.
fn write_changed(positions: &[AtomicU32], table: &[u32]) -> usize {
    positions
        .iter()
        .zip(table)
        .filter(|(position, id)| position.load(Ordering::Relaxed) != **id)
        .map(|(position, &id)| position.store(id, Ordering::Relaxed))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_positions_that_change_are_stored() {
        let positions: Vec<AtomicU32> = [1, 2, 3, 1, 2].into_iter().map(AtomicU32::new).collect();
        assert_eq!(write_changed(&positions, &[1, 2, 3, 1, 2]), 0);
        assert_eq!(write_changed(&positions, &[1, 4, 3, 4, 2]), 2);
        let now: Vec<u32> = positions
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .collect();
        assert_eq!(now, [1, 4, 3, 4, 2]);
    }
}
