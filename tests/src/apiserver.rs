//! A test Kubernetes API server: it serves real Kubernetes JSON for Services, EndpointSlices
//! and Nodes (lists, and watches with bookmarks) and can drop its watches, answer 410 Gone as
//! after an etcd compaction, or go away. For the Kubernetes source's tests and the lab's.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    thread,
};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Notify,
};

pub const SERVICES: &str = "/api/v1/services";
pub const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
pub const NODES: &str = "/api/v1/nodes";

/// The resources the test server serves: path, kind, apiVersion.
const RESOURCES: [(&str, &str, &str); 3] = [
    (SERVICES, "Service", "v1"),
    (SLICES, "EndpointSlice", "discovery.k8s.io/v1"),
    (NODES, "Node", "v1"),
];

/// A test API server: the objects, and every change as a watch event with its version.
#[derive(Default)]
struct Server {
    state: Mutex<State>,
    /// Wakes the open watches: a change, or an order to drop them.
    wake: Notify,
    /// Ends the accept loop.
    stop: Notify,
}

#[derive(Default)]
struct State {
    version: u64,
    /// By resource path, then `namespace/name`.
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    /// (version, resource path, event type, object).
    events: Vec<(u64, &'static str, &'static str, Value)>,
    /// A watch from before this version is answered 410 Gone, as after an etcd compaction.
    compacted: u64,
    /// Bumped to drop every open watch mid-stream.
    drops: u64,
    lists: u64,
    watches: u64,
    gone: u64,
    /// Every connection is closed unanswered, as by an API server going away.
    down: bool,
}

/// `2026-01-01T00:00:00Z` plus `seconds` (under 31 days), in the API's format.
fn creation_timestamp(seconds: u64) -> String {
    let (day, hours) = (seconds / 86_400 + 1, seconds / 3600 % 24);
    let (minutes, seconds) = (seconds / 60 % 60, seconds % 60);
    format!("2026-01-{day:02}T{hours:02}:{minutes:02}:{seconds:02}Z")
}

fn key(object: &Value) -> String {
    let meta = &object["metadata"];
    format!(
        "{}/{}",
        meta["namespace"].as_str().unwrap_or(""),
        meta["name"].as_str().expect("a name")
    )
}

impl Server {
    fn apply(&self, path: &'static str, mut object: Value) {
        let mut state = self.state.lock().unwrap();
        state.version += 1;
        object["metadata"]["resourceVersion"] = json!(state.version.to_string());
        // As an API server stamps an object when it is created, and keeps the stamp: here a
        // second per version, so that what is created later is younger.
        let created = match state.objects.entry(path).or_default().get(&key(&object)) {
            Some(stored) => stored["metadata"]["creationTimestamp"].clone(),
            None => json!(creation_timestamp(state.version)),
        };
        object["metadata"]["creationTimestamp"] = created;
        let kind = if state
            .objects
            .entry(path)
            .or_default()
            .contains_key(&key(&object))
        {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let version = state.version;
        state
            .objects
            .get_mut(path)
            .unwrap()
            .insert(key(&object), object.clone());
        state.events.push((version, path, kind, object));
        drop(state);
        self.wake.notify_waiters();
    }

    fn delete(&self, path: &'static str, key: &str) {
        let mut state = self.state.lock().unwrap();
        state.version += 1;
        let mut object = state
            .objects
            .get_mut(path)
            .unwrap()
            .remove(key)
            .expect("present");
        object["metadata"]["resourceVersion"] = json!(state.version.to_string());
        let version = state.version;
        state.events.push((version, path, "DELETED", object));
        drop(state);
        self.wake.notify_waiters();
    }

    /// Drops every open watch; with `compact`, their next watch gets 410 Gone.
    fn drop_watches(&self, compact: bool) {
        let mut state = self.state.lock().unwrap();
        state.drops += 1;
        if compact {
            state.compacted = state.version + 1;
        }
        drop(state);
        self.wake.notify_waiters();
    }

    fn list(
        &self,
        path: &str,
        kind: &str,
        api_version: &str,
        wanted: &dyn Fn(&Value) -> bool,
    ) -> String {
        let mut state = self.state.lock().unwrap();
        state.lists += 1;
        let items: Vec<Value> = state
            .objects
            .get(path)
            .into_iter()
            .flat_map(BTreeMap::values)
            .filter(|o| wanted(o))
            .cloned()
            .collect();
        json!({
            "kind": format!("{kind}List"),
            "apiVersion": api_version,
            "metadata": {"resourceVersion": state.version.to_string()},
            "items": items,
        })
        .to_string()
    }

    async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { return };
                    tokio::spawn(Arc::clone(&self).answer(stream));
                }
                () = self.stop.notified() => return,
            }
        }
    }

    async fn answer(self: Arc<Self>, mut stream: TcpStream) {
        if self.state.lock().unwrap().down {
            return;
        }
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let params: BTreeMap<&str, String> = query
            .split('&')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| {
                let v = v
                    .replace("%3D", "=")
                    .replace("%21", "!")
                    .replace("%2F", "/");
                (k, v)
            })
            .collect();
        let Some(&(path, kind, api_version)) = RESOURCES.iter().find(|(p, ..)| *p == path) else {
            let _ = stream
                .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                .await;
            return;
        };
        // The agent watches its own Node only.
        let name = params
            .get("fieldSelector")
            .and_then(|s| s.strip_prefix("metadata.name="))
            .map(str::to_string);
        // Label selectors of the `!key` form only: the agent's one (no headless slices).
        let without: Vec<String> = params
            .get("labelSelector")
            .into_iter()
            .flat_map(|s| s.split(','))
            .filter_map(|term| term.strip_prefix('!'))
            .map(str::to_string)
            .collect();
        let wanted = |object: &Value| {
            name.as_deref()
                .is_none_or(|n| object["metadata"]["name"] == json!(n))
                && without
                    .iter()
                    .all(|key| object["metadata"]["labels"].get(key).is_none())
        };
        if params.get("watch").map(String::as_str) != Some("true") {
            let body = self.list(path, kind, api_version, &wanted);
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            return;
        }
        let header = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                      Transfer-Encoding: chunked\r\n\r\n";
        if stream.write_all(header.as_bytes()).await.is_err() {
            return;
        }
        let mut from: u64 = params
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let drops = {
            let mut state = self.state.lock().unwrap();
            state.watches += 1;
            state.drops
        };
        loop {
            let woken = self.wake.notified();
            let lines = {
                let mut state = self.state.lock().unwrap();
                if state.drops != drops {
                    // Mid-stream, with no final chunk: a dropped connection.
                    return;
                }
                if from < state.compacted {
                    state.gone += 1;
                    let status = json!({"type": "ERROR", "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "reason": "Expired", "code": 410,
                        "message": format!("too old resource version: {from} ({})", state.compacted),
                    }});
                    vec![status.to_string(), String::new()]
                } else {
                    let mut lines: Vec<String> = state
                        .events
                        .iter()
                        .filter(|(v, p, _, o)| *v > from && *p == path && wanted(o))
                        .map(|(_, _, kind, o)| json!({"type": kind, "object": o}).to_string())
                        .collect();
                    from = state.version;
                    lines.push(
                        json!({"type": "BOOKMARK", "object": {
                            "kind": kind, "apiVersion": api_version,
                            "metadata": {"resourceVersion": from.to_string()},
                        }})
                        .to_string(),
                    );
                    lines
                }
            };
            for line in &lines {
                // An empty line ends the stream (the final chunk), as after an ERROR event.
                let chunk = if line.is_empty() {
                    "0\r\n\r\n".to_string()
                } else {
                    format!("{:x}\r\n{line}\n\r\n", line.len() + 1)
                };
                if stream.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
                if line.is_empty() {
                    return;
                }
            }
            woken.await;
        }
    }
}

/// A test API server on its own thread.
pub struct ApiServer {
    server: Arc<Server>,
    pub address: SocketAddr,
}

/// What the server was asked: lists, watches, and watches answered 410 Gone.
#[derive(Clone, Copy, Debug)]
pub struct Requests {
    pub lists: u64,
    pub watches: u64,
    pub gone: u64,
}

impl ApiServer {
    /// Starts a server on 127.0.0.1 of the network namespace `/run/netns/<netns>`, or of this
    /// process's: a socket stays in the namespace it was made in.
    pub fn start(netns: Option<&str>) -> Result<Self> {
        let server = Arc::new(Server::default());
        let serving = Arc::clone(&server);
        let netns = netns.map(|name| format!("/run/netns/{name}"));
        let (started_tx, started) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let listening = (|| -> Result<(tokio::runtime::Runtime, std::net::TcpListener)> {
                if let Some(path) = &netns {
                    enter_netns(path)?;
                }
                let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
                listener.set_nonblocking(true)?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok((runtime, listener))
            })();
            match listening {
                Ok((runtime, listener)) => {
                    let _ = started_tx.send(listener.local_addr().map_err(anyhow::Error::from));
                    runtime.block_on(async move {
                        match TcpListener::from_std(listener) {
                            Ok(listener) => serving.serve(listener).await,
                            Err(e) => eprintln!("the test API server: {e}"),
                        }
                    });
                }
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                }
            }
        });
        let address = started.recv().context("the test API server's thread")??;
        Ok(Self { server, address })
    }

    /// Adds or replaces `object` (JSON, as the API serves it) under the resource `path`.
    pub fn apply(&self, path: &'static str, object: Value) {
        self.server.apply(path, object);
    }

    /// Deletes `namespace/name` (`/name` for a Node) under `path`.
    pub fn delete(&self, path: &'static str, key: &str) {
        self.server.delete(path, key);
    }

    /// Drops every open watch mid-stream; with `compact`, their next watch gets 410 Gone.
    pub fn drop_watches(&self, compact: bool) {
        self.server.drop_watches(compact);
    }

    /// From now on every connection is closed unanswered, and the open watches are dropped.
    pub fn go_down(&self) {
        self.server.state.lock().expect("state").down = true;
        self.server.drop_watches(false);
    }

    pub fn requests(&self) -> Requests {
        let state = self.server.state.lock().expect("state");
        Requests {
            lists: state.lists,
            watches: state.watches,
            gone: state.gone,
        }
    }

    /// Serves the Services, EndpointSlices and Nodes of the manifests in `dir`.
    pub fn apply_manifests(&self, dir: &Path) -> Result<()> {
        let mut files: Vec<_> = std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file)?;
            for document in serde_yaml::Deserializer::from_str(&text) {
                let object: Value = serde::Deserialize::deserialize(document)
                    .with_context(|| format!("{}", file.display()))?;
                let path = match object["kind"].as_str() {
                    Some("Service") => SERVICES,
                    Some("EndpointSlice") => SLICES,
                    Some("Node") => NODES,
                    _ => continue,
                };
                self.apply(path, object);
            }
        }
        Ok(())
    }

    /// Writes a kubeconfig for this server at `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters: [{{name: test, cluster: {{server: \"http://{}\"}}}}]\n\
             users: [{{name: test, user: {{}}}}]\n\
             contexts: [{{name: test, context: {{cluster: test, user: test}}}}]\n",
            self.address
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.go_down();
        self.server.stop.notify_one();
    }
}

/// Moves this thread into the network namespace pinned at `path`.
fn enter_netns(path: &str) -> Result<()> {
    let netns = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    // SAFETY: a valid namespace file descriptor; only this thread changes namespace.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&netns), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("setns {path}"));
    }
    Ok(())
}
