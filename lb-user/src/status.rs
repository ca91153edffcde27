//! The agent's HTTP endpoints, as kube-proxy splits them: health (`/healthz`: the sync loop
//! goes round; `/readyz`: the first sync is programmed, the interfaces attached, the loop goes
//! round and its writes take), for the kubelet and load balancers, on every address by
//! default; and metrics
//! (`/metrics`, Prometheus text: the datapath's counters, per frontend and by result, its
//! tracked flows, the agent's syncs and API errors), which name every Service, on loopback by
//! default. Plain HTTP/1.1, one request per connection: probes and scrapers need no more.
//!
//! Nothing a client does reaches the agent's sync loop: connections are capped per peer and in
//! all (the node's own clients apart), each has a deadline for the whole request, and a
//! server that cannot bind or accept retries on its own.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use lb_common::maps::FrontendStats;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info, warn};

use crate::{
    error_chain,
    maps::{self, KernelMaps},
    model::LostClaim,
    sync::FrontendLabels,
};

/// Upper bounds of the sync duration histogram, in seconds.
const SYNC_BUCKETS: [f64; 8] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];
const MAX_REQUEST: usize = 8192;
/// How long a connection may take, from accept to the last byte of the answer.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once from other hosts and pods, in all and from one address: past
/// them a connection is closed at once, so that no client can hold the agent's file
/// descriptors. The node's own clients (the kubelet's probes, a scraper on the node) have
/// their own cap, which no pod can fill.
const MAX_REMOTE_CONNECTIONS: usize = 256;
const MAX_CONNECTIONS_PER_REMOTE_PEER: usize = 8;
const MAX_CONNECTIONS_PER_LOCAL_PEER: usize = 64;
/// How long a server that cannot bind or accept waits before it tries again.
const RETRY: Duration = Duration::from_secs(1);
/// [`Status`]'s `short_since_ms` while the maps hold what the sources say.
const APPLIED: u64 = u64::MAX;

/// Why a status request got no answer.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("the connection")]
    Io(#[from] std::io::Error),
    #[error("reading the counters")]
    Maps(#[from] maps::Error),
}

/// A per-frontend metric: its name, its help, and the counter it shows.
type Counter = (&'static str, &'static str, fn(&FrontendStats) -> u64);

/// The agent's side of the metrics, written by the sync loop.
pub struct Status {
    ready: AtomicBool,
    started: Instant,
    /// When the sync loop last went round, in ms since `started`.
    loop_beat_ms: AtomicU64,
    /// Since when, in ms since `started`, every sync has left writes failed (the maps short of
    /// the sources); [`APPLIED`] while the last sync wrote everything.
    short_since_ms: AtomicU64,
    /// Health fails once the loop has not gone round, or the maps have been short, this long.
    stall_after: Duration,
    syncs: Mutex<Syncs>,
    /// By service id, as programmed.
    frontends: Mutex<BTreeMap<u32, FrontendLabels>>,
    /// Frontends claimed by a Service that an older one holds, as of the last sync.
    lost_claims: Mutex<Vec<LostClaim>>,
    /// Failed requests to the Kubernetes API: lists and watches.
    api_errors: AtomicU64,
    /// Flow and reply entries the flow GC removed.
    flow_gc_removed: AtomicU64,
    /// Flow GC passes that failed.
    flow_gc_failures: AtomicU64,
    /// The node's connected UDP sockets reset because their backend was gone.
    sockets_reset: AtomicU64,
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
    pub fn new(stall_after: Duration) -> Self {
        Self {
            ready: AtomicBool::new(false),
            started: Instant::now(),
            loop_beat_ms: AtomicU64::new(0),
            short_since_ms: AtomicU64::new(APPLIED),
            stall_after,
            syncs: Mutex::default(),
            frontends: Mutex::default(),
            lost_claims: Mutex::default(),
            api_errors: AtomicU64::new(0),
            flow_gc_removed: AtomicU64::new(0),
            flow_gc_failures: AtomicU64::new(0),
            sockets_reset: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// The sync loop went round: what it had to apply is applied, or retried.
    pub fn record_loop(&self) {
        self.loop_beat_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Why the agent is not alive at `now`, if it is not: its loop has not gone round for
    /// longer than `stall_after` (a source that hangs applies nothing).
    fn stalled(&self, now: Instant) -> Option<String> {
        let stuck = self.since(self.loop_beat_ms.load(Ordering::Relaxed), now);
        (stuck > self.stall_after)
            .then(|| format!("the sync loop has not gone round for {} s", stuck.as_secs()))
    }

    /// Why the agent is not ready at `now` though alive, if it is not: its map writes have
    /// failed for longer than `stall_after`, as kube-proxy's health fails when its rules are
    /// not synced in time. Readiness only: a restart would not empty a full map.
    fn short(&self, now: Instant) -> Option<String> {
        let short = self.short_since_ms.load(Ordering::Relaxed);
        let failing = self.since(short, now);
        (short != APPLIED && failing > self.stall_after).then(|| {
            format!(
                "map writes have failed for {} s: the datapath is short of the sources",
                failing.as_secs()
            )
        })
    }

    fn since(&self, ms: u64, now: Instant) -> Duration {
        now.saturating_duration_since(self.started + Duration::from_millis(ms))
    }

    /// The answer to `path`; `/metrics` only where `maps` are given.
    fn answer(
        &self,
        path: &str,
        maps: Option<&KernelMaps>,
    ) -> Result<(&'static str, String), maps::Error> {
        let now = Instant::now();
        let unhealthy = match path {
            "/healthz" => self.stalled(now),
            "/readyz" => self.stalled(now).or_else(|| self.short(now)),
            _ => None,
        };
        Ok(match (path, unhealthy, maps) {
            (_, Some(why), _) => ("503 Service Unavailable", format!("{why}\n")),
            ("/healthz", None, _) => ("200 OK", "ok\n".to_string()),
            ("/readyz", None, _) if self.ready.load(Ordering::Relaxed) => {
                ("200 OK", "ready\n".to_string())
            }
            ("/readyz", None, _) => ("503 Service Unavailable", "not synced yet\n".to_string()),
            // Walking the flow table takes a while: not on a thread other tasks wait for.
            ("/metrics", _, Some(maps)) => (
                "200 OK",
                tokio::task::block_in_place(|| self.metrics(maps))?,
            ),
            _ => ("404 Not Found", "not found\n".to_string()),
        })
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn record_sync(&self, took: Duration, failed_writes: usize) {
        let seconds = took.as_secs_f64();
        let mut syncs = self.syncs.lock().expect("status lock");
        syncs.count += 1;
        syncs.failed_writes += failed_writes as u64;
        if failed_writes == 0 {
            self.short_since_ms.store(APPLIED, Ordering::Relaxed);
        } else {
            // The first sync that fell short: later ones keep its time.
            let _ = self.short_since_ms.compare_exchange(
                APPLIED,
                self.now_ms(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
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

    pub fn record_sockets_reset(&self, reset: usize) {
        self.sockets_reset
            .fetch_add(reset as u64, Ordering::Relaxed);
    }

    pub fn set_frontends(&self, frontends: BTreeMap<u32, FrontendLabels>) {
        *self.frontends.lock().expect("status lock") = frontends;
    }

    pub fn set_lost_claims(&self, lost: Vec<LostClaim>) {
        *self.lost_claims.lock().expect("status lock") = lost;
    }

    /// The Prometheus text of the agent's and the datapath's counters.
    fn metrics(&self, maps: &KernelMaps) -> Result<String, maps::Error> {
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
            .collect::<Result<_, maps::Error>>()?;
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
                "Flows moved off a backend that stopped serving: UDP flows, TCP SYNs on a tracked tuple.",
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
            Err(e) => {
                warn!(error = %error_chain(&e), "the flows could not be counted for /metrics");
            }
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
        let _ = writeln!(
            out,
            "# HELP lb_sockets_reset_total The node's connected UDP sockets reset because their \
             backend was gone.\n# TYPE lb_sockets_reset_total counter\n\
             lb_sockets_reset_total {}",
            self.sockets_reset.load(Ordering::Relaxed)
        );
        let lost = self.lost_claims.lock().expect("status lock").clone();
        let _ = writeln!(
            out,
            "# HELP lb_frontend_claims_lost Frontends a Service claims that an older Service \
             holds: the newcomer gets none of them.\n# TYPE lb_frontend_claims_lost gauge\n\
             lb_frontend_claims_lost {}\n# HELP lb_frontend_claim_lost One lost claim: the \
             frontend, the Service that claims it, the one that holds it.\n\
             # TYPE lb_frontend_claim_lost gauge",
            lost.len()
        );
        for claim in &lost {
            let _ = writeln!(
                out,
                "lb_frontend_claim_lost{{frontend=\"{}\",service=\"{}\",holder=\"{}\"}} 1",
                claim.frontend, claim.service, claim.holder
            );
        }
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

/// What an address serves.
#[derive(Clone)]
pub enum Endpoints {
    /// `/healthz` and `/readyz`.
    Health,
    /// `/metrics`, from these maps, and health too.
    Metrics(Arc<KernelMaps>),
}

/// Serves `endpoints` at `address` for as long as the agent runs. Never returns: an address
/// that cannot be bound, or an accept that fails (out of file descriptors), is logged and
/// tried again.
pub async fn serve(address: SocketAddr, endpoints: Endpoints, status: Arc<Status>) {
    let what = match endpoints {
        Endpoints::Health => "/healthz and /readyz",
        Endpoints::Metrics(_) => "/metrics, /healthz and /readyz",
    };
    let listener = loop {
        match TcpListener::bind(address).await {
            Ok(listener) => break listener,
            Err(e) => {
                warn!(%address, error = %e, "cannot listen for {what}: trying again");
                tokio::time::sleep(RETRY).await;
            }
        }
    };
    info!(%address, "serving {what}");
    let peers = Arc::new(Peers::default());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(%address, error = %e, "status endpoint: accept failed, trying again");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        // From the node itself: loopback, or an address of its own (its local address).
        let local =
            peer.ip().is_loopback() || stream.local_addr().is_ok_and(|own| own.ip() == peer.ip());
        // Over the caps, dropped: closed at once.
        let Some(guard) = Peers::admit(&peers, peer.ip(), local) else {
            continue;
        };
        let (status, endpoints) = (Arc::clone(&status), endpoints.clone());
        tokio::spawn(async move {
            let maps = match &endpoints {
                Endpoints::Health => None,
                Endpoints::Metrics(maps) => Some(maps.as_ref()),
            };
            match tokio::time::timeout(REQUEST_DEADLINE, answer(stream, &status, maps)).await {
                Ok(Ok(())) => {}
                // Per request, and a client's doing: not worth more than a debug line.
                Ok(Err(e)) => debug!(%peer, error = %error_chain(&e), "a status request failed"),
                Err(_) => debug!(%peer, "status request: over its {REQUEST_DEADLINE:?} deadline"),
            }
            drop(guard);
        });
    }
}

/// The connections being served.
#[derive(Default)]
struct Peers(Mutex<PeerCounts>);

#[derive(Default)]
struct PeerCounts {
    by_peer: HashMap<IpAddr, usize>,
    /// Of those, from other hosts and pods.
    remote: usize,
}

/// One connection admitted by [`Peers::admit`], until dropped.
struct Admitted {
    peers: Arc<Peers>,
    peer: IpAddr,
    local: bool,
}

impl Peers {
    /// Admits a connection from `peer` (`local`: the node itself), unless that would pass a
    /// cap.
    fn admit(peers: &Arc<Self>, peer: IpAddr, local: bool) -> Option<Admitted> {
        let mut counts = peers.0.lock().expect("status lock");
        let from_peer = counts.by_peer.get(&peer).copied().unwrap_or(0);
        let full = if local {
            from_peer >= MAX_CONNECTIONS_PER_LOCAL_PEER
        } else {
            from_peer >= MAX_CONNECTIONS_PER_REMOTE_PEER || counts.remote >= MAX_REMOTE_CONNECTIONS
        };
        if full {
            return None;
        }
        *counts.by_peer.entry(peer).or_default() += 1;
        counts.remote += usize::from(!local);
        Some(Admitted {
            peers: Arc::clone(peers),
            peer,
            local,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut counts = self.peers.0.lock().expect("status lock");
        counts.remote -= usize::from(!self.local);
        if let Some(count) = counts.by_peer.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                counts.by_peer.remove(&self.peer);
            }
        }
    }
}

async fn answer(
    mut stream: TcpStream,
    status: &Status,
    maps: Option<&KernelMaps>,
) -> Result<(), RequestError> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let (code, body) = status.answer(path, maps)?;
    let response = format!(
        "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_fails_once_the_sync_loop_stops_going_round() {
        let status = Status::new(Duration::from_mins(1));
        let answer = |path| status.answer(path, None).unwrap();
        assert_eq!(answer("/healthz").0, "200 OK");
        assert_eq!(
            answer("/readyz").0,
            "503 Service Unavailable",
            "not synced yet"
        );
        status.set_ready();
        assert_eq!(answer("/readyz").0, "200 OK");
        assert_eq!(
            answer("/metrics").0,
            "404 Not Found",
            "not on the health address"
        );

        let beat = status.started;
        // (seconds since the loop last went round, unhealthy)
        for (after, unhealthy) in [
            (0, false),
            (59, false),
            (60, false),
            (61, true),
            (3600, true),
        ] {
            assert_eq!(
                status.stalled(beat + Duration::from_secs(after)).is_some(),
                unhealthy,
                "{after} s"
            );
        }
        // A stall shows in both probes; the loop going round again heals them.
        let stuck = Status::new(Duration::from_millis(50));
        stuck.set_ready();
        std::thread::sleep(Duration::from_millis(100));
        for path in ["/healthz", "/readyz"] {
            let (code, body) = stuck.answer(path, None).unwrap();
            assert_eq!(code, "503 Service Unavailable", "{path}: {body}");
            assert!(body.contains("sync loop"), "{body}");
        }
        stuck.record_loop();
        assert_eq!(stuck.answer("/healthz", None).unwrap().0, "200 OK");
    }

    #[test]
    fn readiness_fails_once_map_writes_have_failed_for_too_long() {
        let status = Status::new(Duration::from_mins(1));
        status.set_ready();
        status.record_sync(Duration::ZERO, 3);
        let failed_at = status.started + Duration::from_millis(status.now_ms());
        status.record_sync(Duration::ZERO, 2);
        let at = |s| failed_at + Duration::from_secs(s);
        assert_eq!(status.short(at(30)), None, "short for a while: retried");
        // Measured from the first sync that fell short.
        let why = status.short(at(61)).expect("short for too long");
        assert!(why.contains("map writes have failed"), "{why}");
        status.record_sync(Duration::ZERO, 0);
        assert_eq!(status.short(at(61)), None, "written at last");

        // Through the probes: not ready, but alive (a restart would not empty a full map).
        let short = Status::new(Duration::from_millis(50));
        short.set_ready();
        short.record_sync(Duration::ZERO, 1);
        std::thread::sleep(Duration::from_millis(100));
        short.record_loop();
        assert_eq!(short.answer("/healthz", None).unwrap().0, "200 OK");
        let (code, body) = short.answer("/readyz", None).unwrap();
        assert_eq!(
            (code, body.contains("map writes")),
            ("503 Service Unavailable", true)
        );
    }

    #[test]
    fn connections_are_capped_per_peer_and_in_all_and_the_node_keeps_its_own() {
        let peers = Arc::new(Peers::default());
        let admit = |last: u32, local| {
            let peer = IpAddr::from((0x0af4_0000_u32 + last).to_be_bytes());
            Peers::admit(&peers, peer, local)
        };
        let held: Vec<Admitted> = (0..MAX_CONNECTIONS_PER_REMOTE_PEER)
            .map(|_| admit(2, false).expect("under the cap"))
            .collect();
        assert!(admit(2, false).is_none(), "one pod past its cap");
        assert!(admit(3, false).is_some(), "another pod is still served");
        drop(held);
        assert!(
            admit(2, false).is_some(),
            "closed connections free their places"
        );
        assert!(
            peers.0.lock().unwrap().by_peer.is_empty(),
            "nothing is left of connections gone, or refused"
        );

        // Pods fill the remote total: one refused pod more, and the node is still served.
        let many: Vec<Admitted> = (0..MAX_REMOTE_CONNECTIONS as u32)
            .map(|i| admit(100 + i / 8, false).expect("under the total cap"))
            .collect();
        assert!(admit(9999, false).is_none(), "past the total cap");
        let node: Vec<Admitted> = (0..MAX_CONNECTIONS_PER_LOCAL_PEER)
            .map(|_| admit(1, true).expect("the node's own connections"))
            .collect();
        assert!(admit(1, true).is_none(), "the node too has a cap");
        drop((many, node));
        let counts = peers.0.lock().unwrap();
        assert_eq!((counts.by_peer.len(), counts.remote), (0, 0));
    }
}
