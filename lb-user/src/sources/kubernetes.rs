//! Services, EndpointSlices and this node's Node from the Kubernetes API: a kube-rs watcher per
//! kind, whose events become [`Change`]s of the same objects the manifest source reads, and
//! every burst of them one batch: an event costs the work of its object, whatever the size of
//! the cluster.
//!
//! The watchers relist on their own after a 410 Gone, and retry a failed list or a dropped
//! watch with backoff. A relist changes only what differs from the last complete list once it
//! completes (an object of the same `resourceVersion` stays the same allocation), and nothing
//! is published before every kind has been listed: the API being unreachable never empties the
//! datapath, the last programme stays in force.

use std::{
    collections::HashMap,
    fmt::Debug,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery},
    serde::de::DeserializeOwned,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event},
    },
};
use thiserror::Error;
use tokio::sync::{Notify, mpsc};
use tracing::{info, warn};

use crate::model::{Change, HEADLESS_LABEL, Object};

#[derive(Debug, Error)]
pub enum Error {
    #[error("reading the kubeconfig {path}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes credentials (in-cluster or kubeconfig)")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("a client for the Kubernetes API")]
    Client(#[from] kube::Error),
}

/// A client from `kubeconfig`, or else as kubectl finds one (`KUBECONFIG`, `~/.kube/config`),
/// or else from the pod's service account.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig_error = |source| Error::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(kubeconfig_error)?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// What the watchers share: whether each kind has been listed, and the changes not yet
/// published.
struct Progress {
    listed: Listed,
    pending: Mutex<Vec<Change>>,
    changed: Notify,
}

/// Whether each kind has been listed once.
#[derive(Default)]
struct Listed {
    services: AtomicBool,
    slices: AtomicBool,
    nodes: AtomicBool,
}

impl Progress {
    fn all_listed(&self) -> bool {
        let Listed {
            services,
            slices,
            nodes,
        } = &self.listed;
        [services, slices, nodes]
            .iter()
            .all(|l| l.load(Ordering::Acquire))
    }

    fn publish(&self, changes: impl IntoIterator<Item = Change>) {
        let mut pending = self.pending.lock().expect("pending changes lock");
        let before = pending.len();
        pending.extend(changes);
        if pending.len() > before {
            self.changed.notify_one();
        }
    }
}

/// Watches the cluster's Services and EndpointSlices (every slice, whoever manages it) and the
/// Node `node_name`. Each burst of changes is published as one batch, at most `batch_delay`
/// after its first event; `on_error` is called for every failed list or watch. The first batch
/// comes once every kind has been listed, and holds everything listed.
pub fn watch(
    client: &Client,
    node_name: &str,
    batch_delay: Duration,
    on_error: impl Fn() + Send + Sync + 'static,
) -> mpsc::UnboundedReceiver<Vec<Change>> {
    let progress = Arc::new(Progress {
        listed: Listed::default(),
        pending: Mutex::new(Vec::new()),
        changed: Notify::new(),
    });
    let on_error: Arc<dyn Fn() + Send + Sync> = Arc::new(on_error);
    let watching = Watching {
        progress: &progress,
        on_error: &on_error,
    };
    watching.start::<core::Service>(
        Api::all(client.clone()),
        watcher::Config::default(),
        Kind {
            listed: |l| &l.services,
            object: Object::Service,
            keep_deleted: false,
        },
    );
    // As kube-proxy's informer: the slices of headless Services are not ours to list.
    watching.start::<discovery::EndpointSlice>(
        Api::all(client.clone()),
        watcher::Config::default().labels(&format!("!{HEADLESS_LABEL}")),
        Kind {
            listed: |l| &l.slices,
            object: Object::Slice,
            keep_deleted: false,
        },
    );
    // While this node's Node is missing (deleted and registering again, a watch failing), its
    // last version stays: its addresses still serve NodePorts.
    watching.start::<core::Node>(
        Api::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        Kind {
            listed: |l| &l.nodes,
            object: Object::Node,
            keep_deleted: true,
        },
    );
    let (publish, batches) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        // The first batch goes out once all is listed, even with nothing in it.
        let mut first = true;
        loop {
            loop {
                let notified = progress.changed.notified();
                let pending = !progress.pending.lock().expect("pending lock").is_empty();
                if progress.all_listed() && (pending || first) {
                    break;
                }
                notified.await;
            }
            first = false;
            // The rest of the burst joins this batch.
            tokio::time::sleep(batch_delay).await;
            let batch = std::mem::take(&mut *progress.pending.lock().expect("pending lock"));
            if publish.send(batch).is_err() {
                return;
            }
        }
    });
    batches
}

/// What the watchers of every kind share.
struct Watching<'a> {
    progress: &'a Arc<Progress>,
    on_error: &'a Arc<dyn Fn() + Send + Sync>,
}

/// How one kind is watched.
struct Kind<K> {
    /// Its flag in [`Progress::listed`].
    listed: fn(&Listed) -> &AtomicBool,
    object: fn(Arc<K>) -> Object,
    /// A deletion, or a relist without the object, keeps its last version.
    keep_deleted: bool,
}

impl Watching<'_> {
    /// Starts a watcher of `api`, which publishes what changes in it.
    fn start<K>(&self, api: Api<K>, config: watcher::Config, kind: Kind<K>)
    where
        K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    {
        let events = watcher::watcher(api, config).default_backoff();
        let (progress, on_error) = (Arc::clone(self.progress), Arc::clone(self.on_error));
        tokio::spawn(async move {
            let mut known = Known::<K>::default();
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                let changes = match event {
                    Ok(Event::InitDone) => {
                        // The list's changes before the flag: a first batch, taken once every
                        // kind is listed, holds every list.
                        progress.publish(known.relisted(&kind));
                        if !(kind.listed)(&progress.listed).swap(true, Ordering::AcqRel) {
                            info!(kind = %K::kind(&()), "listed");
                        }
                        // Every kind's first list is published, empty or not.
                        progress.changed.notify_one();
                        Vec::new()
                    }
                    Ok(Event::Apply(object)) => known.applied(object, &kind),
                    Ok(Event::Delete(object)) => known.deleted(&object, &kind),
                    // A relist in progress: the last complete list stays until it ends.
                    Ok(Event::Init) => {
                        known.relist = Some(HashMap::new());
                        Vec::new()
                    }
                    Ok(Event::InitApply(object)) => {
                        known
                            .relist
                            .get_or_insert_default()
                            .insert(key(&object), object);
                        Vec::new()
                    }
                    Err(e) => {
                        warn!(kind = %K::kind(&()), error = %e, "a list or watch failed; retrying with backoff");
                        on_error();
                        Vec::new()
                    }
                };
                progress.publish(changes);
            }
        });
    }
}

/// A namespace and a name.
type Key = (Option<String>, String);

fn key<K: Resource<DynamicType = ()>>(object: &K) -> Key {
    (object.namespace(), object.name_any())
}

/// One kind's objects, as last published.
struct Known<K> {
    current: HashMap<Key, Arc<K>>,
    /// The relist in progress.
    relist: Option<HashMap<Key, K>>,
}

impl<K> Default for Known<K> {
    fn default() -> Self {
        Self {
            current: HashMap::new(),
            relist: None,
        }
    }
}

impl<K: Resource<DynamicType = ()>> Known<K> {
    fn applied(&mut self, object: K, kind: &Kind<K>) -> Vec<Change> {
        let object = Arc::new(object);
        let mut changes = Vec::new();
        if let Some(old) = self.current.insert(key(&*object), Arc::clone(&object)) {
            changes.push(Change::Removed((kind.object)(old)));
        }
        changes.push(Change::Added((kind.object)(object)));
        changes
    }

    fn deleted(&mut self, object: &K, kind: &Kind<K>) -> Vec<Change> {
        if kind.keep_deleted {
            warn!(kind = %K::kind(&()), name = %object.name_any(), "deleted from the API: keeping its last version");
            return Vec::new();
        }
        self.current
            .remove(&key(object))
            .map(|old| Change::Removed((kind.object)(old)))
            .into_iter()
            .collect()
    }

    /// The relist completed: what differs from the objects before it.
    fn relisted(&mut self, kind: &Kind<K>) -> Vec<Change> {
        let listed = self.relist.take().unwrap_or_default();
        let mut changes = Vec::new();
        let mut before = std::mem::take(&mut self.current);
        for (key, object) in listed {
            let version = object.resource_version();
            match before.remove(&key) {
                Some(old) if version.is_some() && old.resource_version() == version => {
                    self.current.insert(key, old);
                }
                old => {
                    changes.extend(old.map(|old| Change::Removed((kind.object)(old))));
                    let object = Arc::new(object);
                    self.current.insert(key, Arc::clone(&object));
                    changes.push(Change::Added((kind.object)(object)));
                }
            }
        }
        for (key, old) in before {
            if kind.keep_deleted {
                warn!(kind = %K::kind(&()), name = %key.1, "not in the API's list: keeping its last version");
                self.current.insert(key, old);
            } else {
                changes.push(Change::Removed((kind.object)(old)));
            }
        }
        changes
    }
}
