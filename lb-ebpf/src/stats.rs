//! Per-CPU counters: plain increments, summed by the agent.

use lb_common::maps::{SINGLE_ENTRY, Stats};

use crate::maps::STATS;

#[inline(always)]
pub fn count(field: impl FnOnce(&mut Stats) -> &mut u64) {
    if let Some(stats) = STATS.get_ptr_mut(SINGLE_ENTRY) {
        *field(unsafe { &mut *stats }) += 1;
    }
}
