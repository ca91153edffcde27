//! Per-CPU counters: plain increments, summed by the agent.

use lb_common::maps::Stats;

use crate::maps;

#[inline(always)]
pub fn count(field: impl FnOnce(&mut Stats) -> &mut u64) {
    if let Some(stats) = maps::stats() {
        *field(stats) += 1;
    }
}

/// Counts a packet of `bytes` sent to a backend by the frontend `service_id`, and whether it
/// opened a flow.
#[inline(always)]
pub fn count_frontend(service_id: u32, bytes: u16, new_flow: bool) {
    if let Some(stats) = maps::frontend_stats(service_id) {
        stats.packets += 1;
        stats.bytes += u64::from(bytes);
        stats.new_flows += u64::from(new_flow);
    }
}
