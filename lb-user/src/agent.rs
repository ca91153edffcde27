//! The agent's loop, at the binary's edge: when the sources change, recompute and write the
//! difference to the maps; log and report what fails, and go on.

use std::{
    fs,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::programs::XdpMode;
use lb_common::maps::Config;
use lb_user::{
    datapath::{self, Datapath},
    error_chain, flow_gc,
    maps::KernelMaps,
    model::{self, Change, Skipped},
    sockets,
    sources::{inotify::Notifier, kubernetes, manifests::Manifests},
    status::{self, Endpoints, ServiceChecks, Status},
    sync::{Adopted, Pipeline},
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

/// How long after a reset pass that fell short the next one is tried.
const SOCKETS_RETRY: Duration = Duration::from_secs(30);

/// Where the agent learns Services, EndpointSlices and Nodes.
pub enum SourceSettings {
    /// Manifest files or directories, polled for changes.
    Manifests(Vec<PathBuf>),
    /// The Kubernetes API, watched; each burst of changes is synced at most `batch_delay`
    /// after its first event.
    Kubernetes {
        kubeconfig: Option<PathBuf>,
        batch_delay: Duration,
    },
}

pub struct Settings {
    pub node: model::NodeConfig,
    pub source: SourceSettings,
    /// Where the tc program goes: names, or prefixes ending in `*`.
    pub interfaces: Vec<String>,
    /// Where the XDP program goes, likewise.
    pub uplinks: Vec<String>,
    pub xdp_mode: XdpMode,
    /// Where the socket hooks go.
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub pin_dir: PathBuf,
    /// An eBPF object to load instead of the one built in.
    pub object: Option<PathBuf>,
    /// Where sysctls are written: `/proc/sys`, or the host's from a container.
    pub sysctl_dir: PathBuf,
    pub poll_interval: Duration,
    /// How often idle flows are removed.
    pub flow_gc_interval: Duration,
    /// Timeouts and the SNAT port range; the agent fills in the SNAT address.
    pub config: Config,
    /// Where `/healthz` and `/readyz` are served.
    pub health_address: SocketAddr,
    /// Where `/metrics` is served (and health too).
    pub metrics_address: SocketAddr,
    /// Health fails once the sync loop has not gone round for this long; readiness also once
    /// its writes have kept failing for as long.
    pub stall_after: Duration,
}

/// Runs until SIGINT or SIGTERM. What it programmed stays pinned and keeps forwarding; the next
/// agent adopts it.
pub async fn run(settings: Settings) -> Result<()> {
    let object = match &settings.object {
        Some(path) => fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        None => datapath::OBJECT.to_vec(),
    };
    let (mut datapath, maps) = Datapath::load(
        &object,
        &settings.bpffs,
        &settings.pin_dir,
        &settings.sysctl_dir,
    )?;
    // What an earlier agent programmed is where this one starts from: an unchanged programme
    // is not rewritten.
    let (flows, highest_flow_backend_id) = maps.flows()?;
    let adopted = Adopted {
        entries: maps.read()?,
        highest_flow_backend_id,
        config: Some(maps.config()?),
    };
    info!(
        frontends = adopted.entries.frontends.len(),
        backends = adopted.entries.backends.len(),
        flows,
        "adopted the maps pinned before"
    );
    let status = Arc::new(Status::new(settings.stall_after));
    // Optional: without it, the LRU tables still evict when full.
    if let Err(e) = flow_gc::spawn(
        &settings.pin_dir,
        settings.flow_gc_interval,
        Arc::clone(&status),
    ) {
        error!(error = %error_chain(&e), "no flow GC: the LRU tables evict idle entries only when full");
    }
    // The servers live on their own: no client of theirs, and no failure of theirs, reaches
    // this loop.
    tokio::spawn(status::serve(
        settings.health_address,
        Endpoints::Health,
        Arc::clone(&status),
    ));
    tokio::spawn(status::serve(
        settings.metrics_address,
        Endpoints::Metrics(Arc::new(KernelMaps::open_pinned(&settings.pin_dir)?)),
        Arc::clone(&status),
    ));
    let mut source = match &settings.source {
        SourceSettings::Manifests(paths) => Source::Manifests {
            manifests: Manifests::new(paths.clone()),
            reported: None,
            notifier: Notifier::new()
                .inspect_err(|e| warn!(error = %e, "no inotify, manifests are polled only"))
                .ok(),
        },
        SourceSettings::Kubernetes {
            kubeconfig,
            batch_delay,
        } => {
            let client = kubernetes::client(kubeconfig.as_deref()).await?;
            let errors = Arc::clone(&status);
            Source::Kubernetes {
                batches: kubernetes::watch(&client, &settings.node.name, *batch_delay, move || {
                    errors.record_api_error();
                }),
                received: None,
            }
        }
    };
    let mut syncer = Syncer {
        pipeline: Pipeline::new(&settings.node.name, adopted, settings.config),
        maps,
        generation: 0,
        failed: false,
        sockets_due: false,
        sockets_retry_at: None,
        service_checks: ServiceChecks::new(Arc::clone(&status)),
        status: Arc::clone(&status),
        source_skipped: Vec::new(),
        pipeline_skipped: Vec::new(),
        skipped: Vec::new(),
    };
    let mut ready = false;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    info!(node = %settings.node.name, pins = %settings.pin_dir.display(), "agent started");
    loop {
        match source.poll() {
            Some((changes, skipped)) => syncer.sync(changes, skipped, &settings.node),
            // Writes that failed are retried at every poll, changes or not.
            None if syncer.failed => {
                let skipped = syncer.source_skipped.clone();
                syncer.sync(Vec::new(), skipped, &settings.node);
            }
            None => {}
        }
        // Until something is listed (the API unreachable at start), what is pinned stays in
        // force, untouched.
        if syncer.generation > 0 {
            syncer.reset_stale_sockets();
            // Listeners that could not open are tried again.
            syncer.service_checks.reconcile();
            // After the first sync, so that no packet meets half-written maps.
            match attach(&mut datapath, &settings) {
                Ok(()) if !ready => {
                    // Every wanted link is in place: those pinned before and left over are for
                    // interfaces no longer wanted. Not before: a link whose adoption failed
                    // still forwards.
                    if let Err(e) = datapath.release_unclaimed() {
                        error!(error = %error_chain(&e), "links pinned before and no longer wanted stay attached");
                    }
                    ready = true;
                    status.set_ready();
                    info!("ready: maps programmed and interfaces attached");
                }
                Ok(()) => {}
                Err(e) => error!(error = %error_chain(&e), "attaching: retried at the next poll"),
            }
        }
        status.record_loop();
        tokio::select! {
            () = tokio::time::sleep(settings.poll_interval) => {}
            () = source.changed() => {}
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
    }
    info!(
        pins = %settings.pin_dir.display(),
        "stopping: the datapath stays pinned and keeps forwarding; `lb-user cleanup` removes it"
    );
    Ok(())
}

/// Attaches the socket hooks and the programs on every wanted interface not attached yet.
fn attach(datapath: &mut Datapath, settings: &Settings) -> Result<(), datapath::Error> {
    let sockets = datapath.attach_sockets(&settings.cgroup);
    let pods = datapath.attach_interfaces(&settings.interfaces);
    let uplinks = datapath.attach_uplinks(&settings.uplinks, settings.xdp_mode);
    sockets.and(pods).and(uplinks)
}

/// Where the objects come from, and how the agent learns that they changed.
enum Source {
    /// Polled: each poll reads the files that changed; inotify wakes the poll as soon as
    /// one may have. `reported`: what was wrong with them at the last sync.
    Manifests {
        manifests: Manifests,
        reported: Option<Vec<Skipped>>,
        notifier: Option<Notifier>,
    },
    /// Pushed: a batch of changes per burst, once everything has been listed. `received`:
    /// what [`Source::changed`] took and [`Source::poll`] has not yet.
    Kubernetes {
        batches: mpsc::UnboundedReceiver<Vec<Change>>,
        received: Option<Vec<Change>>,
    },
}

impl Source {
    /// What changed since the last call, if anything may have, and what is wrong with the
    /// objects.
    fn poll(&mut self) -> Option<(Vec<Change>, Vec<Skipped>)> {
        match self {
            Self::Manifests {
                manifests,
                reported,
                notifier,
            } => {
                let (changes, skipped) = manifests.load();
                // A directory made or replaced is watched even if nothing in it changed what
                // the files program.
                if (reported.is_none() || manifests.watch_due())
                    && let Some(watching) = notifier
                    && let Err(e) = watching.watch(&manifests.directories())
                {
                    warn!(error = %e, "inotify stopped, manifests are polled only");
                    *notifier = None;
                }
                if changes.is_empty() && reported.as_ref() == Some(&skipped) {
                    return None;
                }
                *reported = Some(skipped.clone());
                Some((changes, skipped))
            }
            Self::Kubernetes { batches, received } => {
                let mut changes = received.take();
                while let Ok(batch) = batches.try_recv() {
                    changes.get_or_insert_default().extend(batch);
                }
                changes.map(|changes| (changes, Vec::new()))
            }
        }
    }

    /// Returns when there is a batch to take, or when a manifest may have changed; never for
    /// manifests without inotify.
    async fn changed(&mut self) {
        match self {
            Self::Kubernetes { batches, received } => {
                if let Some(batch) = batches.recv().await {
                    received.get_or_insert_default().extend(batch);
                    return;
                }
            }
            Self::Manifests {
                notifier: Some(watching),
                ..
            } => match watching.changed().await {
                Ok(()) => return,
                Err(e) => warn!(error = %e, "inotify failed, manifests are polled only"),
            },
            Self::Manifests { notifier: None, .. } => {}
        }
        std::future::pending::<()>().await;
    }
}

/// The agent's side of the syncs: the status, the log, the node's sockets.
struct Syncer {
    maps: KernelMaps,
    pipeline: Pipeline,
    generation: u64,
    /// The last sync left the maps short of the plan.
    failed: bool,
    /// Backends went since the node's connected UDP sockets were last checked.
    sockets_due: bool,
    /// After a pass that fell short, when to try again.
    sockets_retry_at: Option<Instant>,
    status: Arc<Status>,
    /// The Services' health checks for cloud load balancers.
    service_checks: ServiceChecks,
    /// What the source reported wrong at the last sync, and what the pipeline left out.
    source_skipped: Vec<Skipped>,
    pipeline_skipped: Vec<Skipped>,
    /// Both, sorted, as last logged.
    skipped: Vec<Skipped>,
}

impl Syncer {
    fn sync(
        &mut self,
        changes: Vec<Change>,
        source_skipped: Vec<Skipped>,
        node: &model::NodeConfig,
    ) {
        let started = Instant::now();
        let synced = self.pipeline.sync_changes(changes, node, &mut self.maps);
        self.status
            .set_node_eligible(model::node_eligible(self.pipeline.nodes(), &node.name));
        // Over every Service: read again only when they changed.
        if synced.reports_changed {
            self.service_checks.set(
                self.pipeline.health_checks(),
                self.pipeline.node_addresses(),
            );
            self.status.set_lost_claims(self.pipeline.lost_claims());
            self.pipeline_skipped = self.pipeline.skipped();
        }
        if let Some(snat) = synced.config_written {
            info!(snat_address = ?snat.v4, snat_address6 = ?snat.v6, "datapath config written");
        }
        if synced.backends_gone {
            // New work: not held back by an earlier pass's wait.
            self.sockets_due = true;
            self.sockets_retry_at = None;
        }
        if synced.reports_changed || source_skipped != self.source_skipped {
            let mut skipped = source_skipped.clone();
            skipped.extend(self.pipeline_skipped.iter().cloned());
            skipped.sort();
            // Each when it first shows: the whole list at every sync would flood the log.
            for s in skipped
                .iter()
                .filter(|s| self.skipped.binary_search(s).is_err())
            {
                warn!(object = %s.object, field = %s.field, reason = %s.reason, "skipped");
            }
            self.skipped = skipped;
            self.source_skipped = source_skipped;
        }
        self.failed = synced.failed > 0;
        self.status.record_sync(started.elapsed(), synced.failed);
        self.status.update_frontends(synced.labels);
        self.generation += 1;
        let programmed = self.pipeline.programmed();
        info!(
            generation = self.generation,
            frontends = programmed.frontends.len(),
            backends = programmed.backends.len(),
            writes = synced.writes,
            failed = synced.failed,
            skipped = self.skipped.len(),
            "synced"
        );
    }

    /// Resets the node's connected UDP sockets whose backend is gone ([`sockets`]), if a sync
    /// removed backends since the last pass that went through.
    fn reset_stale_sockets(&mut self) {
        if !self.sockets_due || self.sockets_retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        // A pass that falls short (a kernel without sock_diag's destroy, say) is tried again
        // later, not at every poll.
        self.sockets_retry_at = Some(Instant::now() + SOCKETS_RETRY);
        let done = match sockets::reset_stale(&self.maps, self.pipeline.programmed()) {
            Ok(done) => done,
            Err(e) => {
                warn!(
                    retry_in_secs = SOCKETS_RETRY.as_secs(),
                    error = %error_chain(&e),
                    "connected UDP sockets keep their gone backends"
                );
                return;
            }
        };
        if done.reset > 0 {
            self.status.record_sockets_reset(done.reset);
            info!(
                reset = done.reset,
                "reset the node's connected UDP sockets whose backend is gone"
            );
        }
        for (socket, e) in &done.failed {
            warn!(local = %socket.local, peer = %socket.peer, error = %e,
                retry_in_secs = SOCKETS_RETRY.as_secs(),
                "a connected UDP socket keeps its gone backend");
        }
        self.sockets_due = !done.failed.is_empty();
        if !self.sockets_due {
            self.sockets_retry_at = None;
        }
    }
}
