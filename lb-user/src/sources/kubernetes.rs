//! Services, EndpointSlices and this node's Node from the Kubernetes API: kube-rs reflectors
//! keep a copy of each, and every burst of changes becomes one snapshot of the same objects the
//! manifest source reads.
//!
//! The watchers relist on their own after a 410 Gone, and retry a failed list or a dropped
//! watch with backoff. A reflector's copy is replaced only once a relist completes, and
//! nothing is published before every kind has been listed: the API being unreachable never
//! empties the datapath, the last programme stays in force.

use std::{
    fmt::Debug,
    path::Path,
    sync::{
        Arc,
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
        reflector::{self, Store},
        watcher::{self, Event},
    },
};
use thiserror::Error;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::model::{HEADLESS_LABEL, Objects};

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

/// What the watchers share: whether each kind has been listed, and whether anything changed
/// since the last snapshot.
struct Progress {
    listed: Listed,
    dirty: AtomicBool,
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
}

/// Watches the cluster's Services and EndpointSlices (every slice, whoever manages it) and the
/// Node `node_name`. Each burst of changes is published as one snapshot, at most `batch_delay`
/// after its first event; `on_error` is called for every failed list or watch. The receiver
/// holds `None` until every kind has been listed once.
pub fn watch(
    client: &Client,
    node_name: &str,
    batch_delay: Duration,
    on_error: impl Fn() + Send + Sync + 'static,
) -> watch::Receiver<Option<Objects>> {
    let progress = Arc::new(Progress {
        listed: Listed::default(),
        dirty: AtomicBool::new(false),
        changed: Notify::new(),
    });
    let on_error: Arc<dyn Fn() + Send + Sync> = Arc::new(on_error);
    let node_config = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let services = reflect::<core::Service>(
        Api::all(client.clone()),
        watcher::Config::default(),
        |l| &l.services,
        &progress,
        &on_error,
    );
    // As kube-proxy's informer: the slices of headless Services are not ours to list.
    let slices = reflect::<discovery::EndpointSlice>(
        Api::all(client.clone()),
        watcher::Config::default().labels(&format!("!{HEADLESS_LABEL}")),
        |l| &l.slices,
        &progress,
        &on_error,
    );
    let nodes = reflect::<core::Node>(
        Api::all(client.clone()),
        node_config,
        |l| &l.nodes,
        &progress,
        &on_error,
    );
    let (publish, snapshots) = watch::channel(None);
    let node_name = node_name.to_owned();
    tokio::spawn(async move {
        // This node's Node as last seen: while it is missing (deleted and registering again, a
        // watch failing), its addresses still serve NodePorts.
        let mut last_node: Option<Arc<core::Node>> = None;
        loop {
            loop {
                let notified = progress.changed.notified();
                if progress.all_listed() && progress.dirty.load(Ordering::Acquire) {
                    break;
                }
                notified.await;
            }
            // The rest of the burst joins this snapshot.
            tokio::time::sleep(batch_delay).await;
            progress.dirty.store(false, Ordering::Release);
            let mut objects = snapshot(&services, &slices, &nodes);
            match (objects.nodes.first(), &last_node) {
                (Some(node), _) => last_node = Some(node.clone()),
                (None, Some(node)) => {
                    warn!(
                        node = node_name,
                        "the Node is gone from the API: keeping its last version"
                    );
                    objects.nodes.push(node.clone());
                }
                (None, None) => {}
            }
            if publish.send(Some(objects)).is_err() {
                return;
            }
        }
    });
    snapshots
}

/// Starts a reflector of `api`, whose kind's flag in `progress` is `listed`; its store.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    listed: fn(&Listed) -> &AtomicBool,
    progress: &Arc<Progress>,
    on_error: &Arc<dyn Fn() + Send + Sync>,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let events = watcher::watcher(api, config)
        .default_backoff()
        .reflect(writer);
    let (progress, on_error) = (Arc::clone(progress), Arc::clone(on_error));
    tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            let changed = match event {
                Ok(Event::InitDone) => {
                    if !listed(&progress.listed).swap(true, Ordering::AcqRel) {
                        info!(kind = %K::kind(&()), "listed");
                    }
                    true
                }
                Ok(Event::Apply(_) | Event::Delete(_)) => true,
                // A relist in progress: the store keeps the last complete list until it ends.
                Ok(Event::Init | Event::InitApply(_)) => false,
                Err(e) => {
                    warn!(kind = %K::kind(&()), error = %e, "a list or watch failed; retrying with backoff");
                    on_error();
                    false
                }
            };
            if changed {
                progress.dirty.store(true, Ordering::Release);
                progress.changed.notify_one();
            }
        }
    });
    store
}

/// The objects in the stores, in a stable order (namespace, then name).
fn snapshot(
    services: &Store<core::Service>,
    slices: &Store<discovery::EndpointSlice>,
    nodes: &Store<core::Node>,
) -> Objects {
    fn sorted<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> Vec<Arc<K>> {
        let mut objects = store.state();
        objects.sort_by_key(|o| (o.namespace(), o.name_any()));
        objects
    }
    Objects {
        services: sorted(services),
        endpoint_slices: sorted(slices),
        endpoints: Vec::new(),
        nodes: sorted(nodes),
    }
}
