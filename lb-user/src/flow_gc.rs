//! Flow GC: removes the flow and reply entries that have idled out, as Cilium's conntrack GC
//! does. The datapath already treats them as gone; left in place they would fill the LRU
//! tables, and a new flow that must evict an entry costs more than one that finds room (the
//! README's benchmarks). Runs on a thread of its own: a pass over full tables takes a while,
//! and must not hold up a sync.

use std::{io, path::Path, sync::Arc, thread, time::Duration};

use tracing::{debug, error};

use crate::{
    datapath::clock::monotonic_ns,
    error_chain,
    maps::{self, KernelMaps},
    status::Status,
};

/// The datapath's clock is `CLOCK_MONOTONIC` to within a tick: an entry goes only once it is
/// idle by this much more than its timeout, so that the datapath agrees it is gone.
const CLOCK_SLACK_NS: u64 = 1_000_000_000;

/// Why the GC could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening the flow tables")]
    Open(#[from] maps::Error),
    #[error("starting the flow GC thread")]
    Thread(#[source] io::Error),
}

/// Starts removing idle entries from the tables pinned under `pin_dir` every `interval`,
/// counting them and the passes that failed in `status`.
pub fn spawn(pin_dir: &Path, interval: Duration, status: Arc<Status>) -> Result<(), Error> {
    let mut maps = KernelMaps::open_pinned(pin_dir)?;
    thread::Builder::new()
        .name("flow-gc".into())
        .spawn(move || {
            loop {
                thread::sleep(interval);
                let now = monotonic_ns().saturating_sub(CLOCK_SLACK_NS);
                match maps.expire_flows(now) {
                    Ok((flows, replies)) => {
                        status.record_flow_gc(flows + replies, false);
                        if flows + replies > 0 {
                            debug!(flows, replies, "removed idle flow entries");
                        }
                    }
                    Err(e) => {
                        status.record_flow_gc(0, true);
                        error!(error = %error_chain(&e), "a flow GC pass failed; the next one tries again");
                    }
                }
            }
        })
        .map_err(Error::Thread)?;
    Ok(())
}
