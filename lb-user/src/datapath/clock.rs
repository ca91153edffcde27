//! The datapath's clock ([`Clock`]): the kernel's tick measured at start, by running a probe
//! program that reads jiffies and `CLOCK_MONOTONIC` at one instant, twice, at least
//! [`MIN_TICKS`] apart.

use std::time::{Duration, Instant};

use aya::programs::{ProgramError, TestRun as _, TestRunOptions, Xdp};
use lb_common::maps::Clock;

use super::XDP_PASS;

/// Why the tick could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("running the clock probe")]
    Probe(#[source] ProgramError),
    #[error("the clock probe returned {0}")]
    Returned(u32),
    #[error("the tick measured from {first:?} to {last:?} is no kernel's")]
    NoKernelTick { first: Sample, last: Sample },
    #[error("jiffies went from {first} to {last} in {MAX_WAIT:?}")]
    TooFewTicks { first: u64, last: u64 },
}

/// The tick lengths of the kernel's `CONFIG_HZ` choices: 1000, 300, 250 and 100.
const TICKS_NS: [u64; 4] = [1_000_000, 3_333_333, 4_000_000, 10_000_000];
/// Ticks between the two samples: each is read to within a tick, so that the measured length
/// is within 10% of the true one.
const MIN_TICKS: u64 = 20;
/// 20 ticks of the slowest kernel (HZ=100) take 200 ms.
const MAX_WAIT: Duration = Duration::from_secs(2);

/// One reading: jiffies, and `CLOCK_MONOTONIC` in ns.
pub type Sample = (u64, u64);

/// The clock two readings give: the tick length closest to the one measured, and the offset
/// that makes the clock `CLOCK_MONOTONIC` at the second reading. None when no tick length is
/// within 10% of the one measured, or the readings are too close.
pub fn from_samples(first: Sample, last: Sample) -> Option<Clock> {
    let ticks = last.0.checked_sub(first.0).filter(|&t| t >= MIN_TICKS)?;
    let measured = last.1.checked_sub(first.1)? / ticks;
    let ns_per_jiffy = TICKS_NS.into_iter().min_by_key(|t| t.abs_diff(measured))?;
    (ns_per_jiffy.abs_diff(measured) * 10 <= ns_per_jiffy).then(|| Clock {
        ns_per_jiffy,
        offset_ns: last.0.wrapping_mul(ns_per_jiffy).wrapping_sub(last.1),
    })
}

/// Measures the clock with `probe`, the datapath's `lb_clock_probe`.
pub fn measure(probe: &Xdp) -> Result<Clock, Error> {
    let started = Instant::now();
    let first = sample(probe)?;
    loop {
        std::thread::sleep(Duration::from_millis(10));
        let last = sample(probe)?;
        if last.0.saturating_sub(first.0) >= MIN_TICKS {
            return from_samples(first, last).ok_or(Error::NoKernelTick { first, last });
        }
        if started.elapsed() > MAX_WAIT {
            return Err(Error::TooFewTicks {
                first: first.0,
                last: last.0,
            });
        }
    }
}

/// `CLOCK_MONOTONIC` in ns: what the datapath's clock follows.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; cannot fail, the clock exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

fn sample(probe: &Xdp) -> Result<Sample, Error> {
    let packet = [0u8; 64];
    let mut out = [0u8; 64];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(&packet);
    opts.data_out = Some(&mut out);
    let result = probe.test_run(opts).map_err(Error::Probe)?;
    if result.return_value != XDP_PASS {
        return Err(Error::Returned(result.return_value));
    }
    let word = |at: usize| u64::from_ne_bytes(out[at..at + 8].try_into().expect("8 bytes"));
    Ok((word(0), word(8)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_is_the_kernel_s_closest_to_the_one_measured() {
        let hz250 = from_samples((1000, 0), (1025, 100_000_000)).unwrap();
        assert_eq!(hz250.ns_per_jiffy, 4_000_000);
        // At the second reading the clock reads CLOCK_MONOTONIC.
        assert_eq!(
            1025u64
                .wrapping_mul(hz250.ns_per_jiffy)
                .wrapping_sub(hz250.offset_ns),
            100_000_000
        );
        // Readings a tick off each way still say HZ=1000.
        assert_eq!(
            from_samples((0, 0), (21, 20_000_000)).unwrap().ns_per_jiffy,
            1_000_000
        );
        assert_eq!(
            from_samples((0, 5_000_000), (100, 1_005_000_000))
                .unwrap()
                .ns_per_jiffy,
            10_000_000
        );
        assert_eq!(
            from_samples((0, 0), (30, 100_000_000))
                .unwrap()
                .ns_per_jiffy,
            3_333_333
        );
    }

    #[test]
    fn readings_no_kernel_would_give_are_refused() {
        assert_eq!(from_samples((0, 0), (5, 20_000_000)), None, "too close");
        assert_eq!(from_samples((0, 0), (20, 140_000_000)), None, "7 ms a tick");
        assert_eq!(from_samples((30, 0), (10, 0)), None, "backwards");
    }
}
