//! The Kubernetes source against a test API server that serves real Kubernetes JSON: lists,
//! watches with bookmarks, a dropped connection, a 410 Gone, an outage. Whatever the API does,
//! the model must end up the one the manifest source builds from the same objects, and an
//! unreachable API must change nothing.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use lb_user::{
    model::{self, NodeConfig, Objects},
    sources::{kubernetes, manifests::Manifests},
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{Notify, watch},
};

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const NODES: &str = "/api/v1/nodes";
const NODE: &str = "lab-node";
const WAIT: Duration = Duration::from_secs(20);

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
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(Arc::clone(&self).answer(stream));
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
            .map(|(k, v)| (k, v.replace("%3D", "=")))
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
        let wanted = |object: &Value| {
            name.as_deref()
                .is_none_or(|n| object["metadata"]["name"] == json!(n))
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

fn node() -> NodeConfig {
    NodeConfig {
        name: NODE.to_string(),
        addresses: Vec::new(),
        node_port_range: 30000..=32767,
    }
}

fn frontends(objects: &Objects) -> Vec<model::Frontend> {
    model::compute(objects, &node()).frontends
}

/// Waits for a snapshot whose model is `expected`'s.
async fn converges(
    snapshots: &mut watch::Receiver<Option<Objects>>,
    expected: &Objects,
    what: &str,
) {
    let want = frontends(expected);
    let mut last = Vec::new();
    let reached = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(objects) = snapshots.borrow_and_update().as_ref() {
                last = frontends(objects);
                if last == want {
                    return;
                }
            }
            snapshots.changed().await.expect("the source stopped");
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "{what}: the model did not converge\nwant {want:#?}\nlast {last:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_source_builds_the_model_the_manifests_do() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let (mut expected, skipped) = Manifests::new(vec![examples]).load();
    assert!(skipped.is_empty(), "{skipped:?}");
    assert!(
        !frontends(&expected).is_empty(),
        "the examples program something"
    );

    let server = Arc::new(Server::default());
    for service in &expected.services {
        server.apply(SERVICES, serde_json::to_value(service).unwrap());
    }
    for slice in &expected.endpoint_slices {
        server.apply(SLICES, serde_json::to_value(slice).unwrap());
    }
    for node in &expected.nodes {
        server.apply(NODES, serde_json::to_value(node).unwrap());
    }
    // Another node's object: the agent must not take it for its own.
    server.apply(
        NODES,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "other"}}),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(Arc::clone(&server).serve(listener));

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters: [{{name: test, cluster: {{server: \"http://{address}\"}}}}]\n\
             users: [{{name: test, user: {{}}}}]\n\
             contexts: [{{name: test, context: {{cluster: test, user: test}}}}]\n"
        ),
    )
    .unwrap();
    let client = kubernetes::client(Some(&kubeconfig))
        .await
        .expect("a client");
    let errors = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&errors);
    let mut snapshots = kubernetes::watch(&client, NODE, Duration::from_millis(20), move || {
        counted.fetch_add(1, Ordering::Relaxed);
    });

    converges(&mut snapshots, &expected, "the first list").await;
    let first = snapshots.borrow().clone().unwrap();
    assert_eq!(first.nodes.len(), 1, "only the agent's own Node");

    // Watch events: an endpoint leaves a slice, a Service goes.
    let slice = &mut expected.endpoint_slices[0];
    slice.endpoints.pop().expect("an endpoint to remove");
    server.apply(SLICES, serde_json::to_value(&*slice).unwrap());
    let gone = expected.services.pop().expect("a Service to delete");
    let gone_key = format!(
        "{}/{}",
        gone.metadata.namespace.as_deref().unwrap_or(""),
        gone.metadata.name.as_deref().unwrap()
    );
    server.delete(SERVICES, &gone_key);
    converges(&mut snapshots, &expected, "watch events").await;

    // A dropped connection, and a change while the watches reconnect.
    let watches_before = server.state.lock().unwrap().watches;
    server.drop_watches(false);
    expected.services.push(gone.clone());
    server.apply(SERVICES, serde_json::to_value(&gone).unwrap());
    converges(&mut snapshots, &expected, "after a dropped watch").await;
    let watches = server.state.lock().unwrap().watches;
    assert!(
        watches >= watches_before + 3,
        "every kind watches again ({watches_before} watches before, {watches} after)"
    );

    // 410 Gone: the watches must relist, and the relist bring the change made meanwhile.
    let lists_before = server.state.lock().unwrap().lists;
    let errors_before = errors.load(Ordering::Relaxed);
    server.drop_watches(true);
    let slice = &mut expected.endpoint_slices[1];
    slice.endpoints.truncate(1);
    server.apply(SLICES, serde_json::to_value(&*slice).unwrap());
    converges(&mut snapshots, &expected, "after 410 Gone").await;
    // The other kinds relist too, each in its own time.
    let relisted = tokio::time::timeout(WAIT, async {
        while server.state.lock().unwrap().lists < lists_before + 3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let (lists, gone) = {
        let state = server.state.lock().unwrap();
        (state.lists, state.gone)
    };
    assert!(
        relisted.is_ok(),
        "every kind relists after 410 Gone ({lists_before} lists before, {lists} after)"
    );
    assert!(gone >= 3, "the server answered 410 Gone to every kind");
    assert!(
        errors.load(Ordering::Relaxed) >= errors_before + 3,
        "410 Gone counts as an API error"
    );

    // The API goes away: errors, and no snapshot, so the programme stays as it is.
    snapshots.borrow_and_update();
    let errors_before = errors.load(Ordering::Relaxed);
    server.state.lock().unwrap().down = true;
    server.drop_watches(false);
    let failing = tokio::time::timeout(WAIT, async {
        while errors.load(Ordering::Relaxed) < errors_before + 3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(failing.is_ok(), "every kind fails to reach the API");
    assert!(
        !snapshots.has_changed().unwrap(),
        "an unreachable API publishes nothing"
    );
}
