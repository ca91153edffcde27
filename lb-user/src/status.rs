//! The agent's HTTP endpoint: `/healthz` (the loop runs), `/readyz` (the first sync is
//! programmed and the interfaces attached) and `/metrics` (Prometheus text: the datapath's
//! counters, per frontend and by result, its tracked flows, the agent's syncs and API errors). Plain HTTP/1.1, one request
//! per connection: probes and scrapers need no more.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use lb_common::maps::FrontendStats;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::{info, warn};

use crate::maps::KernelMaps;

/// Upper bounds of the sync duration histogram, in seconds.
const SYNC_BUCKETS: [f64; 8] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];
const MAX_REQUEST: usize = 8192;

/// A per-frontend metric: its name, its help, and the counter it shows.
type Counter = (&'static str, &'static str, fn(&FrontendStats) -> u64);

/// What a frontend's counters are labelled with.
#[derive(Clone, Debug)]
pub struct FrontendLabels {
    /// `address:port/PROTOCOL`.
    pub frontend: String,
    pub scope: &'static str,
    /// `namespace/name`.
    pub service: String,
}

/// The agent's side of the metrics, written by the sync loop.
#[derive(Default)]
pub struct Status {
    ready: AtomicBool,
    syncs: Mutex<Syncs>,
    /// By service id, as programmed.
    frontends: Mutex<BTreeMap<u32, FrontendLabels>>,
    /// Failed requests to the Kubernetes API: lists and watches.
    api_errors: AtomicU64,
    /// Flow and reply entries the flow GC removed.
    flow_gc_removed: AtomicU64,
    /// Flow GC passes that failed.
    flow_gc_failures: AtomicU64,
}

#[derive(Default)]
struct Syncs {
    count: u64,
    failed_writes: u64,
    seconds_sum: f64,
    /// Syncs at or under each of [`SYNC_BUCKETS`].
    buckets: [u64; SYNC_BUCKETS.len()],
}

impl Status {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn record_sync(&self, took: Duration, failed_writes: usize) {
        let seconds = took.as_secs_f64();
        let mut syncs = self.syncs.lock().expect("status lock");
        syncs.count += 1;
        syncs.failed_writes += failed_writes as u64;
        syncs.seconds_sum += seconds;
        for (bucket, le) in syncs.buckets.iter_mut().zip(SYNC_BUCKETS) {
            if seconds <= le {
                *bucket += 1;
            }
        }
    }

    pub fn record_api_error(&self) {
        self.api_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_flow_gc(&self, removed: usize, failed: bool) {
        self.flow_gc_removed
            .fetch_add(removed as u64, Ordering::Relaxed);
        self.flow_gc_failures
            .fetch_add(u64::from(failed), Ordering::Relaxed);
    }

    pub fn set_frontends(&self, frontends: BTreeMap<u32, FrontendLabels>) {
        *self.frontends.lock().expect("status lock") = frontends;
    }

    /// The Prometheus text of the agent's and the datapath's counters.
    fn metrics(&self, maps: &KernelMaps) -> Result<String> {
        let mut out = String::new();
        let frontends = self.frontends.lock().expect("status lock").clone();
        let counters: [Counter; 3] = [
            (
                "lb_frontend_packets_total",
                "Packets sent to a backend.",
                |s| s.packets,
            ),
            (
                "lb_frontend_bytes_total",
                "IP bytes sent to a backend.",
                |s| s.bytes,
            ),
            (
                "lb_frontend_new_flows_total",
                "Flows given a backend.",
                |s| s.new_flows,
            ),
        ];
        let stats: Vec<(&FrontendLabels, FrontendStats)> = frontends
            .iter()
            .map(|(id, labels)| Ok((labels, maps.frontend_stats(*id)?)))
            .collect::<Result<_>>()?;
        for (name, help, field) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, s) in &stats {
                let _ = writeln!(
                    out,
                    "{name}{{frontend=\"{}\",scope=\"{}\",service=\"{}\"}} {}",
                    labels.frontend,
                    labels.scope,
                    labels.service,
                    field(s)
                );
            }
        }
        let s = maps.stats()?;
        let _ = writeln!(
            out,
            "# HELP lb_datapath_packets_total Packets by what the datapath did with them.\n\
             # TYPE lb_datapath_packets_total counter"
        );
        for (result, value) in [
            ("forwarded", s.forwarded),
            ("replied", s.replied),
            ("dropped_no_backend", s.dropped_no_backend),
            ("rejected_no_backend", s.rejected_no_backend),
            ("dropped_unknown_port", s.dropped_unknown_port),
            ("dropped_no_snat", s.dropped_no_snat),
            ("dropped_error", s.dropped_error),
        ] {
            let _ = writeln!(
                out,
                "lb_datapath_packets_total{{result=\"{result}\"}} {value}"
            );
        }
        for (name, help, value) in [
            (
                "lb_datapath_new_flows_total",
                "Flows given a backend.",
                s.new_flows,
            ),
            (
                "lb_datapath_reselected_total",
                "UDP flows moved off a backend that stopped serving.",
                s.reselected,
            ),
            (
                "lb_datapath_snat_flows_total",
                "Flows SNATed to the node.",
                s.snat_flows,
            ),
            (
                "lb_socket_rewrites_total",
                "Node sockets sent to a backend.",
                s.socket_rewrites,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        match maps.flows() {
            Ok((flows, _)) => {
                let _ = writeln!(
                    out,
                    "# HELP lb_conntrack_entries Flows the datapath tracks.\n\
                     # TYPE lb_conntrack_entries gauge\nlb_conntrack_entries {flows}"
                );
            }
            // The other metrics are still worth a scrape.
            Err(e) => warn!("counting flows: {e:#}"),
        }
        let _ = writeln!(
            out,
            "# HELP lb_api_errors_total Failed lists and watches of the Kubernetes API, 410 Gone \
             included.\n# TYPE lb_api_errors_total counter\nlb_api_errors_total {}",
            self.api_errors.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP lb_flow_gc_removed_total Idle flow and reply entries removed.\n\
             # TYPE lb_flow_gc_removed_total counter\nlb_flow_gc_removed_total {}\n\
             # HELP lb_flow_gc_failures_total Flow GC passes that failed.\n\
             # TYPE lb_flow_gc_failures_total counter\nlb_flow_gc_failures_total {}",
            self.flow_gc_removed.load(Ordering::Relaxed),
            self.flow_gc_failures.load(Ordering::Relaxed)
        );
        let syncs = self.syncs.lock().expect("status lock");
        let _ = writeln!(
            out,
            "# HELP lb_syncs_total Syncs of the maps with the sources.\n# TYPE lb_syncs_total \
             counter\nlb_syncs_total {}\n# HELP lb_sync_failed_writes_total Map writes put off \
             by a failure.\n# TYPE lb_sync_failed_writes_total counter\n\
             lb_sync_failed_writes_total {}\n# HELP lb_sync_duration_seconds How long a sync \
             took.\n# TYPE lb_sync_duration_seconds histogram",
            syncs.count, syncs.failed_writes
        );
        for (le, count) in SYNC_BUCKETS.iter().zip(syncs.buckets) {
            let _ = writeln!(
                out,
                "lb_sync_duration_seconds_bucket{{le=\"{le}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "lb_sync_duration_seconds_bucket{{le=\"+Inf\"}} {}\nlb_sync_duration_seconds_sum \
             {}\nlb_sync_duration_seconds_count {}",
            syncs.count, syncs.seconds_sum, syncs.count
        );
        Ok(out)
    }
}

/// Serves the endpoint at `address` until the process ends; the datapath's counters are read
/// from the maps pinned at `pin_dir`.
pub async fn serve(address: SocketAddr, status: Arc<Status>, pin_dir: PathBuf) -> Result<()> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("listening on {address}"))?;
    let maps = Arc::new(KernelMaps::open_pinned(&pin_dir)?);
    info!(%address, "serving /healthz, /readyz and /metrics");
    loop {
        let (stream, _) = listener.accept().await?;
        let (status, maps) = (Arc::clone(&status), Arc::clone(&maps));
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &status, &maps).await {
                warn!("status request: {e:#}");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, status: &Status, maps: &KernelMaps) -> Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let (code, body) = match path {
        "/healthz" => ("200 OK", "ok\n".to_string()),
        "/readyz" if status.ready.load(Ordering::Relaxed) => ("200 OK", "ready\n".to_string()),
        "/readyz" => ("503 Service Unavailable", "not synced yet\n".to_string()),
        // Walking the flow table takes a while: not on a thread other tasks wait for.
        "/metrics" => (
            "200 OK",
            tokio::task::block_in_place(|| status.metrics(maps))?,
        ),
        _ => ("404 Not Found", "not found\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    Ok(())
}
