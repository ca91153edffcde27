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

mod server;
mod service_checks;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use lb_common::maps::FrontendStats;
use tracing::warn;

pub use self::{
    server::{Endpoints, ServiceCheck, serve, serve_on},
    service_checks::ServiceChecks,
};
use crate::{
    error_chain,
    maps::{self, KernelMaps},
    model::LostClaim,
    sync::FrontendLabels,
};

/// Upper bounds of the sync duration histogram, in seconds.
const SYNC_BUCKETS: [f64; 8] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];
/// [`Status`]'s `short_since_ms` while the maps hold what the sources say.
const APPLIED: u64 = u64::MAX;

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
    /// When a sync last wrote everything, in ms since the Unix epoch; 0 before the first.
    applied_unix_ms: AtomicU64,
    /// Whether the cluster may send the node traffic: not while its Node is being deleted or
    /// marked for deletion by the cluster autoscaler (kube-proxy's `nodeEligible`).
    node_eligible: AtomicBool,
}

/// An answer: its status line, content type and body.
pub(crate) type Answer = (&'static str, &'static str, String);

const TEXT: &str = "text/plain; version=0.0.4";
const JSON: &str = "application/json";
const OK: &str = "200 OK";
const UNAVAILABLE: &str = "503 Service Unavailable";

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
            applied_unix_ms: AtomicU64::new(0),
            node_eligible: AtomicBool::new(true),
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

    /// The answer to `path`; `/metrics` only where `maps` are given. `/healthz` and `/livez`
    /// answer as kube-proxy's health server does (JSON, `lastUpdated` and `currentTime`;
    /// `nodeEligible` on `/healthz`), for cloud load balancers and cluster tooling: `/livez`
    /// fails once the sync loop stalls; `/healthz` also once map writes have kept failing, and
    /// while the node is not eligible. `/readyz` is the agent's own: the first sync programmed
    /// and the interfaces attached, and the loop healthy.
    fn answer(&self, path: &str, endpoints: &Endpoints) -> Result<Answer, maps::Error> {
        let now = Instant::now();
        let maps = match endpoints {
            Endpoints::ServiceCheck(check) => return Ok(self.service_check(check, now)),
            Endpoints::Health => None,
            Endpoints::Metrics(maps) => Some(maps.as_ref()),
        };
        Ok(match (path, maps) {
            ("/healthz", _) => {
                let eligible = self.node_eligible.load(Ordering::Relaxed);
                let healthy = self.stalled(now).is_none() && self.short(now).is_none() && eligible;
                self.health_json(healthy, Some(eligible))
            }
            ("/livez", _) => self.health_json(self.stalled(now).is_none(), None),
            ("/readyz", _) => match self.stalled(now).or_else(|| self.short(now)) {
                Some(why) => (UNAVAILABLE, TEXT, format!("{why}\n")),
                None if self.ready.load(Ordering::Relaxed) => (OK, TEXT, "ready\n".to_string()),
                None => (UNAVAILABLE, TEXT, "not synced yet\n".to_string()),
            },
            // Walking the flow table takes a while: not on a thread other tasks wait for.
            ("/metrics", Some(maps)) => {
                let text = tokio::task::block_in_place(|| self.metrics(maps))?;
                (OK, TEXT, text)
            }
            _ => ("404 Not Found", TEXT, "not found\n".to_string()),
        })
    }

    /// kube-proxy's health body: `lastUpdated` is now while healthy (its compatibility rule),
    /// else when a sync last wrote everything.
    fn health_json(&self, healthy: bool, node_eligible: Option<bool>) -> Answer {
        let now = unix_ms();
        let last_updated = if healthy {
            now
        } else {
            self.applied_unix_ms.load(Ordering::Relaxed)
        };
        let eligible = node_eligible.map_or(String::new(), |e| format!(",\"nodeEligible\":{e}"));
        let body = format!(
            "{{\"lastUpdated\":\"{}\",\"currentTime\":\"{}\"{eligible}}}",
            rfc3339(last_updated),
            rfc3339(now)
        );
        (if healthy { OK } else { UNAVAILABLE }, JSON, body)
    }

    /// A Service's health check, on any path, as kube-proxy answers it: 200 while this node
    /// has a ready endpoint of it and the agent is healthy (`serviceProxyHealthy`: the loop
    /// goes round and its writes take), 503 otherwise.
    fn service_check(&self, check: &ServiceCheck, now: Instant) -> Answer {
        let count = check.local_endpoints.load(Ordering::Relaxed);
        let healthy = self.stalled(now).is_none() && self.short(now).is_none();
        let body = format!(
            "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\
             \"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
            json_string(&check.namespace),
            json_string(&check.name)
        );
        let code = if count != 0 && healthy {
            OK
        } else {
            UNAVAILABLE
        };
        (code, JSON, body)
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.node_eligible.store(eligible, Ordering::Relaxed);
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
            self.applied_unix_ms.store(unix_ms(), Ordering::Relaxed);
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

    /// Takes a sync's changed labels: by service id, `None` for a frontend gone.
    pub fn update_frontends(&self, changed: BTreeMap<u32, Option<FrontendLabels>>) {
        let mut frontends = self.frontends.lock().expect("status lock");
        for (id, labels) in changed {
            match labels {
                Some(labels) => frontends.insert(id, labels),
                None => frontends.remove(&id),
            };
        }
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
        let _ = writeln!(
            out,
            "# HELP lb_frontend_info A programmed frontend, and its scheduler by IPVS's name.\n\
             # TYPE lb_frontend_info gauge"
        );
        for labels in frontends.values() {
            let _ = writeln!(
                out,
                "lb_frontend_info{{frontend=\"{}\",scope=\"{}\",service=\"{}\",scheduler=\"{}\"}} 1",
                labels.frontend, labels.scope, labels.service, labels.scheduler
            );
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
            ("dropped_source_range", s.dropped_source_range),
            ("dropped_fragment_unmatched", s.fragments_unmatched),
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
            (
                "lb_datapath_icmp_translated_total",
                "ICMP errors about tracked flows, translated as their packets (path-MTU discovery).",
                s.icmp_translated,
            ),
            (
                "lb_datapath_fragments_held_total",
                "Later fragments held until their datagram's first came, then sent on.",
                s.fragments_held,
            ),
            (
                "lb_datapath_rejects_limited_total",
                "Rejects not sent, over --reject-rate: the new flows dropped instead.",
                s.rejects_limited,
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

/// `text` as a JSON string.
fn json_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// The wall clock, in ms since the Unix epoch.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `unix_ms` as RFC 3339 UTC, to the millisecond; `0001-01-01T00:00:00Z` for 0 (never), as
/// Go prints its zero time.
fn rfc3339(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "0001-01-01T00:00:00Z".to_string();
    }
    let (days, ms) = (unix_ms / 86_400_000, unix_ms % 86_400_000);
    // Howard Hinnant's civil_from_days, over days since 1970-01-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let (hours, minutes, seconds) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60);
    format!(
        "{year:04}-{month:02}-{day:02}T{hours:02}:{minutes:02}:{seconds:02}.{:03}Z",
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_fails_once_the_sync_loop_stops_going_round() {
        let status = Status::new(Duration::from_mins(1));
        let answer = |path| status.answer(path, &Endpoints::Health).unwrap();
        assert_eq!(answer("/healthz").0, OK);
        assert_eq!(answer("/livez").0, OK);
        assert_eq!(answer("/readyz").0, UNAVAILABLE, "not synced yet");
        status.set_ready();
        assert_eq!(answer("/readyz").0, OK);
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
        // A stall shows in every probe; the loop going round again heals them.
        let stuck = Status::new(Duration::from_millis(50));
        stuck.set_ready();
        std::thread::sleep(Duration::from_millis(100));
        for path in ["/healthz", "/livez", "/readyz"] {
            let (code, _, body) = stuck.answer(path, &Endpoints::Health).unwrap();
            assert_eq!(code, UNAVAILABLE, "{path}: {body}");
        }
        assert!(
            stuck
                .answer("/readyz", &Endpoints::Health)
                .unwrap()
                .2
                .contains("sync loop")
        );
        stuck.record_loop();
        assert_eq!(stuck.answer("/healthz", &Endpoints::Health).unwrap().0, OK);
    }

    #[test]
    fn readiness_and_healthz_fail_once_map_writes_have_failed_for_too_long() {
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

        // Through the probes: not ready and, as kube-proxy's, not healthy for load balancers,
        // but alive (a restart would not empty a full map).
        let short = Status::new(Duration::from_millis(50));
        short.set_ready();
        short.record_sync(Duration::ZERO, 1);
        std::thread::sleep(Duration::from_millis(100));
        short.record_loop();
        assert_eq!(short.answer("/livez", &Endpoints::Health).unwrap().0, OK);
        assert_eq!(
            short.answer("/healthz", &Endpoints::Health).unwrap().0,
            UNAVAILABLE
        );
        let (code, _, body) = short.answer("/readyz", &Endpoints::Health).unwrap();
        assert_eq!((code, body.contains("map writes")), (UNAVAILABLE, true));
    }

    #[test]
    fn healthz_answers_kube_proxy_s_json_and_fails_for_a_node_not_eligible() {
        let status = Status::new(Duration::from_mins(1));
        let (code, content_type, body) = status.answer("/healthz", &Endpoints::Health).unwrap();
        assert_eq!((code, content_type), (OK, JSON));
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(json["nodeEligible"], true);
        assert_eq!(
            json["lastUpdated"], json["currentTime"],
            "now, while healthy"
        );
        let (_, _, livez) = status.answer("/livez", &Endpoints::Health).unwrap();
        let livez: serde_json::Value = serde_json::from_str(&livez).expect("JSON");
        assert!(livez.get("nodeEligible").is_none(), "{livez}");
        assert!(livez.get("currentTime").is_some(), "{livez}");

        // Marked for deletion: load balancers drain the node; the agent is still alive.
        status.set_node_eligible(false);
        let (code, _, body) = status.answer("/healthz", &Endpoints::Health).unwrap();
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(
            (code, json["nodeEligible"].clone()),
            (UNAVAILABLE, false.into())
        );
        assert_eq!(
            json["lastUpdated"], "0001-01-01T00:00:00Z",
            "never synced: Go's zero time"
        );
        assert_eq!(status.answer("/livez", &Endpoints::Health).unwrap().0, OK);
    }

    #[test]
    fn times_are_rfc_3339() {
        assert_eq!(rfc3339(0), "0001-01-01T00:00:00Z");
        assert_eq!(rfc3339(1), "1970-01-01T00:00:00.001Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_796_169_599_999), "2026-12-01T23:59:59.999Z");
    }
}
