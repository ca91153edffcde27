//! The Services' health checks for cloud load balancers (`healthCheckNodePort`), as
//! kube-proxy's `pkg/proxy/healthcheck` serves them: a listener per Service and family on each
//! of the node's addresses of that family (all IPv4 ones while the node has no address of its
//! own, where IPv6's check then has none: `::` would take IPv4's too), opened and closed as
//! Services come, change and go. An address that cannot be listened on is tried again at the
//! next reconcile; the others serve meanwhile.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, atomic::Ordering},
};

use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{info, warn};

use super::{Endpoints, ServiceCheck, Status, serve_on};
use crate::model::{Family, HealthCheck};

pub struct ServiceChecks {
    status: Arc<Status>,
    wanted: Vec<HealthCheck>,
    addresses: Vec<IpAddr>,
    /// By namespace, name and family.
    running: BTreeMap<(String, String, Family), Running>,
    /// What is wanted differs from what listens: new wants, or a listener that could not
    /// open. Otherwise a poll's reconcile does nothing.
    due: bool,
}

struct Running {
    port: u16,
    check: Arc<ServiceCheck>,
    /// The listeners, by address.
    listening: BTreeMap<IpAddr, JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for task in self.listening.values() {
            task.abort();
        }
    }
}

impl ServiceChecks {
    pub fn new(status: Arc<Status>) -> Self {
        Self {
            status,
            wanted: Vec::new(),
            addresses: Vec::new(),
            running: BTreeMap::new(),
            due: false,
        }
    }

    /// Serves `wanted` on `addresses` from now on.
    pub fn set(&mut self, wanted: Vec<HealthCheck>, addresses: &[IpAddr]) {
        self.wanted = wanted;
        self.addresses = if addresses.is_empty() {
            vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)]
        } else {
            addresses.to_vec()
        };
        self.due = true;
        self.reconcile();
    }

    /// Opens what is wanted and not listening (a Service new, moved to another port, or an
    /// address that failed before) and closes what is no longer wanted. Must run within the
    /// agent's runtime: listeners are its tasks.
    pub fn reconcile(&mut self) {
        if !self.due {
            return;
        }
        self.due = false;
        let wanted = &self.wanted;
        self.running.retain(|(namespace, name, family), running| {
            let keep = wanted.iter().any(|w| {
                (&w.namespace, &w.name, w.family, w.port)
                    == (namespace, name, *family, running.port)
            });
            if !keep {
                info!(service = %format!("{namespace}/{name}"), port = running.port,
                    "closing a health check");
            }
            keep
        });
        for check in &self.wanted {
            let key = (check.namespace.clone(), check.name.clone(), check.family);
            let running = self.running.entry(key).or_insert_with(|| Running {
                port: check.port,
                check: Arc::new(ServiceCheck {
                    namespace: check.namespace.clone(),
                    name: check.name.clone(),
                    local_endpoints: 0.into(),
                }),
                listening: BTreeMap::new(),
            });
            running
                .check
                .local_endpoints
                .store(check.local_endpoints, Ordering::Relaxed);
            let addresses = self
                .addresses
                .iter()
                .filter(|&&address| Family::of(address) == check.family);
            running.listening.retain(|address, task| {
                let keep = self.addresses.contains(address);
                if !keep {
                    task.abort();
                }
                keep
            });
            for &address in addresses {
                if running.listening.contains_key(&address) {
                    continue;
                }
                let service = format!("{}/{}", check.namespace, check.name);
                match listen(address, check.port) {
                    Ok(listener) => {
                        info!(service, %address, port = check.port, "serving a health check");
                        let endpoints = Endpoints::ServiceCheck(Arc::clone(&running.check));
                        let task =
                            tokio::spawn(serve_on(listener, endpoints, Arc::clone(&self.status)));
                        running.listening.insert(address, task);
                    }
                    Err(e) => {
                        self.due = true;
                        warn!(service, %address, port = check.port, error = %e,
                            "cannot listen for a health check: tried again at the next poll");
                    }
                }
            }
        }
    }
}

fn listen(address: IpAddr, port: u16) -> std::io::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(SocketAddr::new(address, port))?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}
