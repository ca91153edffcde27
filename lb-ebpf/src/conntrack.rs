//! Flow tracking: the datapath's own conntrack. A flow lives while it sees packets within its
//! idle timeout ([`Config::is_live`]); FIN or RST moves it to the shorter closing timeout. The
//! agent removes idle entries; the LRU maps evict the oldest when full all the same.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use lb_common::maps::{Config, SINGLE_ENTRY, STATE_CLOSING};

use crate::maps::{CLOCK, CONFIG, EPOCH};

/// Refresh `last_seen_ns` at most this often: a write per packet would bounce the entry's cache
/// line between CPUs for nothing.
const REFRESH_NS: u64 = 1_000_000_000;

/// CLOCK_MONOTONIC, to within a tick: from jiffies once the agent has measured the tick
/// ([`lb_common::maps::Clock`]).
#[inline(always)]
pub fn now_ns() -> u64 {
    match CLOCK.get(SINGLE_ENTRY) {
        Some(clock) if clock.ns_per_jiffy != 0 => unsafe { bpf_jiffies64() }
            .wrapping_mul(clock.ns_per_jiffy)
            .wrapping_sub(clock.offset_ns),
        _ => unsafe { bpf_ktime_get_coarse_ns() },
    }
}

/// The clock's two sources at one instant, jiffies and CLOCK_MONOTONIC in ns, written over the
/// start of the packet: what the agent measures the tick with, under `BPF_PROG_TEST_RUN`.
#[inline(always)]
pub fn sample(data: usize, data_end: usize) -> bool {
    if data + 16 > data_end {
        return false;
    }
    let words = data as *mut u64;
    unsafe {
        let jiffies = bpf_jiffies64();
        let ns = bpf_ktime_get_ns();
        words.write_unaligned(jiffies);
        words.add(1).write_unaligned(ns);
    }
    true
}

#[inline(always)]
pub fn config() -> Option<&'static Config> {
    CONFIG.get(SINGLE_ENTRY)
}

/// The agent's count of backend removals ([`lb_common::maps::Epoch`]).
#[inline(always)]
pub fn backends_epoch() -> u32 {
    EPOCH
        .get(SINGLE_ENTRY)
        .map_or(0, |epoch| epoch.backends_removed)
}

/// Records a packet of a live entry; whether the entry was written.
#[inline(always)]
pub fn touch(last_seen_ns: &mut u64, state: &mut u8, closing: bool, now: u64) -> bool {
    if closing && *state != STATE_CLOSING {
        *state = STATE_CLOSING;
        *last_seen_ns = now;
        true
    } else if now.saturating_sub(*last_seen_ns) > REFRESH_NS {
        *last_seen_ns = now;
        true
    } else {
        false
    }
}
