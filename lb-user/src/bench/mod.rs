//! What the benchmark binaries share: a datapath of their own, figures over runs, and a
//! synthetic cluster.

pub mod cluster;
pub mod packet;

use std::fmt;

use anyhow::Result;
use serde::Serialize;

use crate::{
    datapath::{self, Datapath},
    maps::KernelMaps,
};

const BPFFS: &str = "/sys/fs/bpf";

/// The built-in datapath, loaded under a pin directory of this process's (`bench-<tag>-<pid>`),
/// attached nowhere; [`Datapath::remove`] takes it away, and a load that fails takes its pins.
pub fn datapath(tag: &str) -> Result<(Datapath, KernelMaps)> {
    let pin_dir = datapath::pin_dir(
        BPFFS.as_ref(),
        &format!("bench-{tag}-{}", std::process::id()),
    );
    Datapath::load(
        datapath::OBJECT,
        BPFFS.as_ref(),
        &pin_dir,
        "/proc/sys".as_ref(),
    )
    .inspect_err(|_| {
        if let Err(e) = datapath::remove_pins(&pin_dir) {
            eprintln!("{e:#}");
        }
    })
}

/// A figure over several runs.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        Self {
            median: samples[samples.len() / 2],
            min: samples[0],
            max: samples[samples.len() - 1],
        }
    }
}

/// In milliseconds.
impl fmt::Display for Spread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.0} ms [{:.0}-{:.0}]", self.median, self.min, self.max)
    }
}
