//! The datapath's clock: `CLOCK_MONOTONIC` to within a tick, from jiffies once the agent has
//! measured the tick ([`lb_common::maps::Clock`]), which costs less than a clock read.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};

use crate::maps;

#[inline(always)]
pub fn now_ns() -> u64 {
    match maps::clock() {
        // SAFETY: helper calls without arguments.
        Some(clock) if clock.ns_per_jiffy != 0 => unsafe { bpf_jiffies64() }
            .wrapping_mul(clock.ns_per_jiffy)
            .wrapping_sub(clock.offset_ns),
        // SAFETY: likewise.
        _ => unsafe { bpf_ktime_get_coarse_ns() },
    }
}

/// The clock's two sources at one instant, jiffies and `CLOCK_MONOTONIC` in ns, written over the
/// start of the packet: what the agent measures the tick with, under `BPF_PROG_TEST_RUN`.
#[inline(always)]
pub fn sample(data: usize, data_end: usize) -> bool {
    if data + 2 * size_of::<u64>() > data_end {
        return false;
    }
    let words = data as *mut u64;
    // SAFETY: the two words were checked to be in the packet; helper calls without arguments.
    unsafe {
        let jiffies = bpf_jiffies64();
        let ns = bpf_ktime_get_ns();
        words.write_unaligned(jiffies);
        words.add(1).write_unaligned(ns);
    }
    true
}
