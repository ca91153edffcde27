//! The benchmarks: per packet (`lb-bench`), control plane (`lb-bench-control`) and end to end
//! on the lab (`lb-bench-e2e`), which `cargo xtask bench` runs. What they share: figures over
//! runs, and a synthetic cluster with the rulesets kube-proxy would load for it.

pub mod cluster;

use std::fmt;

use serde::Serialize;

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
        // A sync of one change takes well under a millisecond: what it takes shows.
        let digits = match self.max {
            max if max < 1.0 => 2,
            max if max < 10.0 => 1,
            _ => 0,
        };
        write!(
            f,
            "{:.digits$} ms [{:.digits$}-{:.digits$}]",
            self.median, self.min, self.max
        )
    }
}
