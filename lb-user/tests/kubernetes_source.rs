//! The Kubernetes source against a test API server that serves real Kubernetes JSON: lists,
//! watches with bookmarks, a dropped connection, a 410 Gone, an outage. Whatever the API does,
//! the model must end up the one the manifest source builds from the same objects, and an
//! unreachable API must change nothing.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use lb_tests::apiserver::{ApiServer, NODES, SERVICES, SLICES};
use lb_user::{
    model::{self, Change, NodeConfig, Objects, Store},
    sources::{kubernetes, manifests::Manifests},
};
use serde_json::json;
use tokio::sync::mpsc;

const NODE: &str = "lab-node";
const WAIT: Duration = Duration::from_secs(20);

fn node() -> NodeConfig {
    NodeConfig::new(NODE)
}

/// The model of `objects`, but for the claims' ages: an API server stamps each object with its
/// creation, the example manifests carry no stamp.
fn frontends(objects: &Objects) -> Vec<model::Frontend> {
    model::compute(objects, &node())
        .frontends
        .iter()
        .map(|f| model::Frontend {
            created: None,
            ..f.as_ref().clone()
        })
        .collect()
}

/// Polls `done` until it holds, for at most [`WAIT`].
async fn until(what: &str, done: impl Fn() -> bool) {
    let reached = tokio::time::timeout(WAIT, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(reached.is_ok(), "timed out waiting for {what}");
}

/// What the source's batches have built, as the agent's pipeline keeps it.
struct Received {
    batches: mpsc::UnboundedReceiver<Vec<Change>>,
    store: Store,
    /// Batches received so far.
    count: usize,
}

impl Received {
    fn apply(&mut self, batch: Vec<Change>) {
        for change in batch {
            self.store.apply(change);
        }
        self.count += 1;
    }

    /// Takes the batches published for `window`.
    async fn take_for(&mut self, window: Duration) {
        let _ = tokio::time::timeout(window, async {
            while let Some(batch) = self.batches.recv().await {
                self.apply(batch);
            }
        })
        .await;
    }

    fn objects(&self) -> Objects {
        self.store.objects()
    }
}

/// Waits for batches that make `expected`'s model.
async fn converges(received: &mut Received, expected: &Objects, what: &str) {
    let want = frontends(expected);
    let mut last = Vec::new();
    let reached = tokio::time::timeout(WAIT, async {
        loop {
            if received.count > 0 {
                last = frontends(&received.objects());
                if last == want {
                    return;
                }
            }
            let batch = received.batches.recv().await.expect("the source stopped");
            received.apply(batch);
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
    let (mut expected, skipped) = Manifests::new(vec![examples]).snapshot();
    assert!(skipped.is_empty(), "{skipped:?}");
    assert!(
        !frontends(&expected).is_empty(),
        "the examples program something"
    );

    let server = ApiServer::start(None).expect("a test API server");
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
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let client = kubernetes::client(Some(&kubeconfig))
        .await
        .expect("a client");
    let errors = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&errors);
    let batches = kubernetes::watch(&client, NODE, Duration::from_millis(20), move || {
        counted.fetch_add(1, Ordering::Relaxed);
    });
    let mut received = Received {
        batches,
        store: Store::default(),
        count: 0,
    };

    converges(&mut received, &expected, "the first list").await;
    assert_eq!(received.count, 1, "the first list is one batch");
    assert_eq!(received.store.nodes().len(), 1, "only the agent's own Node");

    // Watch events: an endpoint leaves a slice, a Service goes.
    let slice = Arc::make_mut(&mut expected.endpoint_slices[0]);
    slice.endpoints.pop().expect("an endpoint to remove");
    server.apply(SLICES, serde_json::to_value(&*slice).unwrap());
    let gone = expected.services.pop().expect("a Service to delete");
    let gone_key = format!(
        "{}/{}",
        gone.metadata.namespace.as_deref().unwrap_or(""),
        gone.metadata.name.as_deref().unwrap()
    );
    server.delete(SERVICES, &gone_key);
    converges(&mut received, &expected, "watch events").await;

    // A headless Service's slice: not listed at all, as kube-proxy's informers leave it out.
    let mut headless = serde_json::to_value(&*expected.endpoint_slices[0]).unwrap();
    headless["metadata"]["name"] = json!("demo-headless");
    headless["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
    server.apply(SLICES, headless);
    received.take_for(Duration::from_millis(300)).await;
    assert!(
        received
            .objects()
            .endpoint_slices
            .iter()
            .all(|s| s.metadata.name.as_deref() != Some("demo-headless")),
        "a headless Service's slice reached the agent"
    );
    converges(&mut received, &expected, "a headless slice added").await;

    // The Node deleted, as while it registers again: its last version stays in force. No
    // batch tells that the deletion was seen: a second of them would hold the Node's removal.
    server.delete(NODES, &format!("/{NODE}"));
    received.take_for(Duration::from_secs(1)).await;
    assert_eq!(
        received.store.nodes().len(),
        1,
        "the last version of the agent's own Node"
    );
    converges(&mut received, &expected, "the Node deleted").await;
    server.apply(NODES, serde_json::to_value(&expected.nodes[0]).unwrap());

    // A dropped connection, and a change while the watches reconnect.
    until("every kind to watch", || server.requests().watches >= 3).await;
    let watches_before = server.requests().watches;
    server.drop_watches(false);
    expected.services.push(gone.clone());
    server.apply(SERVICES, serde_json::to_value(&gone).unwrap());
    converges(&mut received, &expected, "after a dropped watch").await;
    until("every kind to watch again", || {
        server.requests().watches >= watches_before + 3
    })
    .await;

    // 410 Gone: the watches must relist, and the relist bring the change made meanwhile.
    let lists_before = server.requests().lists;
    let errors_before = errors.load(Ordering::Relaxed);
    let before_relist = received.objects();
    server.drop_watches(true);
    let slice = Arc::make_mut(&mut expected.endpoint_slices[1]);
    slice.endpoints.truncate(1);
    server.apply(SLICES, serde_json::to_value(&*slice).unwrap());
    converges(&mut received, &expected, "after 410 Gone").await;
    // The other kinds relist too, each in its own time.
    until("every kind to relist after 410 Gone", || {
        server.requests().lists >= lists_before + 3
    })
    .await;
    assert!(
        server.requests().gone >= 3,
        "the server answered 410 Gone to every kind"
    );
    assert!(
        errors.load(Ordering::Relaxed) >= errors_before + 3,
        "410 Gone counts as an API error"
    );

    // The API goes away: errors, and no batch, so the programme stays as it is. (First, the
    // relists' last batch goes out.)
    received.take_for(Duration::from_millis(300)).await;
    // What the relists found as it was is the same allocation: its Service not computed again.
    let after_relist = received.objects();
    assert_eq!(before_relist.services.len(), after_relist.services.len());
    for (before, after) in before_relist.services.iter().zip(&after_relist.services) {
        assert!(
            Arc::ptr_eq(before, after),
            "{:?} is a new allocation after the relist",
            after.metadata.name
        );
    }
    let errors_before = errors.load(Ordering::Relaxed);
    server.go_down();
    until("every kind to fail to reach the API", || {
        errors.load(Ordering::Relaxed) >= errors_before + 3
    })
    .await;
    assert!(
        received.batches.try_recv().is_err(),
        "an unreachable API publishes nothing"
    );
}
