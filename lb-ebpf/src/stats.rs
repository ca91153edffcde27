//! Per-CPU counters: plain increments, summed by the agent.

use lb_common::maps::{FrontendStats, SINGLE_ENTRY, Stats};

use crate::maps::{FRONTEND_STATS, STATS};

#[inline(always)]
pub fn count(field: impl FnOnce(&mut Stats) -> &mut u64) {
    if let Some(stats) = STATS.get_ptr_mut(SINGLE_ENTRY) {
        *field(unsafe { &mut *stats }) += 1;
    }
}

/// Counts a packet of `bytes` sent to a backend by the frontend `service_id`, and whether it
/// opened a flow.
#[inline(always)]
pub fn count_frontend(service_id: u32, bytes: u16, new_flow: bool) {
    if let Some(stats) = FRONTEND_STATS.get_ptr_mut(service_id) {
        let stats: &mut FrontendStats = unsafe { &mut *stats };
        stats.packets += 1;
        stats.bytes += u64::from(bytes);
        stats.new_flows += u64::from(new_flow);
    }
}
