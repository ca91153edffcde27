//! The HTTP servers: each connection capped per peer and in all (the node's own clients
//! apart), bounded in time from accept to the answer's last byte; a server that cannot bind
//! or accept retries on its own.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, atomic::AtomicU32},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info, warn};

use super::Status;
use crate::{
    error_chain,
    maps::{self, KernelMaps},
};

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

/// Why a status request got no answer.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("the connection")]
    Io(#[from] std::io::Error),
    #[error("reading the counters")]
    Maps(#[from] maps::Error),
}

/// What an address serves.
#[derive(Clone)]
pub enum Endpoints {
    /// `/healthz`, `/livez` and `/readyz`.
    Health,
    /// `/metrics`, from these maps, and health too.
    Metrics(Arc<KernelMaps>),
    /// A Service's `healthCheckNodePort`: any path.
    ServiceCheck(Arc<ServiceCheck>),
}

/// A Service's health check, as its listeners answer it.
#[derive(Debug)]
pub struct ServiceCheck {
    pub namespace: String,
    pub name: String,
    /// This node's ready endpoints, updated at every sync.
    pub local_endpoints: AtomicU32,
}

/// Serves `endpoints` at `address` for as long as the agent runs. Never returns: an address
/// that cannot be bound, or an accept that fails (out of file descriptors), is logged and
/// tried again.
pub async fn serve(address: SocketAddr, endpoints: Endpoints, status: Arc<Status>) {
    let what = match endpoints {
        Endpoints::Health => "/healthz, /livez and /readyz",
        Endpoints::Metrics(_) => "/metrics, /healthz, /livez and /readyz",
        Endpoints::ServiceCheck(_) => "a health check",
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
    serve_on(listener, endpoints, status).await;
}

/// Serves `endpoints` on `listener`, each connection capped and bounded in time, until the
/// task is aborted.
pub async fn serve_on(listener: TcpListener, endpoints: Endpoints, status: Arc<Status>) {
    let address = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
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
            match tokio::time::timeout(REQUEST_DEADLINE, answer(stream, &status, &endpoints)).await
            {
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
    endpoints: &Endpoints,
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
    let target = line.split_whitespace().nth(1).unwrap_or("/");
    let path = target.split('?').next().unwrap_or(target);
    let (code, content_type, body) = status.answer(path, endpoints)?;
    let response = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
