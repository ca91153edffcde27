//! The agent's loop: when the manifests change, recompute and write the difference to the maps.

use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use lb_common::maps::Config;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    datapath::Datapath,
    maps::KernelMaps,
    model,
    plan::{self, Ids, MapEntries},
    sources::manifests::Manifests,
};

pub struct Settings {
    pub node: model::NodeConfig,
    pub manifests: Vec<PathBuf>,
    pub interfaces: Vec<String>,
    pub bpffs: PathBuf,
    pub pin_dir: PathBuf,
    pub poll_interval: Duration,
    pub timeouts: Config,
}

/// Runs until SIGINT or SIGTERM, then detaches and removes its pins.
pub async fn run(settings: Settings) -> Result<()> {
    let (mut datapath, mut maps) = Datapath::load(&settings.bpffs, &settings.pin_dir)?;
    maps.write_config(&settings.timeouts)?;
    let source = Manifests::new(settings.manifests.clone());
    let mut syncer = Syncer::default();
    let mut fingerprint = None;
    let mut ready = false;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    info!(node = %settings.node.name, pins = %settings.pin_dir.display(), "agent started");
    loop {
        let now = source.fingerprint();
        if fingerprint.as_ref() != Some(&now) {
            syncer.sync(&source, &settings.node, &mut maps);
            fingerprint = Some(now);
        }
        // After the first sync, so that no packet meets half-written maps.
        match datapath.attach_interfaces(&settings.interfaces) {
            Ok(()) if !ready => {
                ready = true;
                info!("ready: maps programmed and interfaces attached");
            }
            Ok(()) => {}
            Err(e) => error!("{e:#}"),
        }
        tokio::select! {
            () = tokio::time::sleep(settings.poll_interval) => {}
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
    }
    info!("stopping: detaching and removing pinned maps");
    datapath.remove()
}

/// What has been written to the maps, so that each sync writes only the difference.
#[derive(Default)]
struct Syncer {
    ids: Ids,
    programmed: MapEntries,
    generation: u64,
}

impl Syncer {
    fn sync(&mut self, source: &Manifests, node: &model::NodeConfig, maps: &mut KernelMaps) {
        let (objects, mut skipped) = source.load();
        let (frontends, more) = model::compute(&objects, node);
        skipped.extend(more);
        let (desired, more) = plan::entries(&mut self.ids, &frontends);
        skipped.extend(more);
        for s in &skipped {
            warn!("skipped {s}");
        }
        let ops = plan::diff(&self.programmed, &desired);
        let mut failed = 0;
        for op in &ops {
            match maps.apply(op) {
                // Track what the kernel really holds, so the next sync retries what failed.
                Ok(()) => self.programmed.apply(op),
                Err(e) => {
                    failed += 1;
                    error!(?op, "map update failed: {e}");
                }
            }
        }
        self.generation += 1;
        info!(
            generation = self.generation,
            frontends = desired.frontends.len(),
            backends = desired.backends.len(),
            writes = ops.len(),
            failed,
            skipped = skipped.len(),
            "synced"
        );
    }
}
