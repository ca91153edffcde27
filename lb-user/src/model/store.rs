//! The objects the sources have read, grouped by the Service they belong to, and which groups
//! changed since the model last looked: what lets a sync compute, settle and plan only those.
//! A source that knows what changed (a file read again, a watch event) hands in
//! [`Change`]s, at the cost of the change; a snapshot can be handed in whole
//! ([`Store::replace`]), at the cost of comparing every object's allocation.

use std::{
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::{
    Metadata,
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Serialize;

use super::convert::{self, Group, Objects, same};

/// A Service's namespace and name: the key of its group.
pub type ServiceKey = (String, String);

/// One Kubernetes object, as a source read it.
#[derive(Clone, Debug)]
pub enum Object {
    Service(Arc<core::Service>),
    Slice(Arc<discovery::EndpointSlice>),
    Endpoints(Arc<core::Endpoints>),
    Node(Arc<core::Node>),
}

impl Object {
    /// Where the object is held: the same for the same allocation only.
    pub fn allocation(&self) -> *const () {
        match self {
            Self::Service(s) => Arc::as_ptr(s).cast(),
            Self::Slice(s) => Arc::as_ptr(s).cast(),
            Self::Endpoints(e) => Arc::as_ptr(e).cast(),
            Self::Node(n) => Arc::as_ptr(n).cast(),
        }
    }
}

/// What a source saw change. An object edited is its old version removed and its new one
/// added; a removal names the allocation it removes.
#[derive(Clone, Debug)]
pub enum Change {
    Added(Object),
    Removed(Object),
}

#[derive(Debug, Default)]
pub struct Store {
    groups: BTreeMap<ServiceKey, Group>,
    nodes: Vec<Arc<core::Node>>,
    /// The groups added, edited or emptied since [`Store::take_changes`].
    changed: BTreeSet<ServiceKey>,
    nodes_changed: bool,
}

/// What changed since the model last looked.
#[derive(Debug, Default)]
pub struct Changed {
    pub services: BTreeSet<ServiceKey>,
    pub nodes: bool,
}

impl Store {
    pub fn apply(&mut self, change: Change) {
        let (added, object) = match change {
            Change::Added(object) => (true, object),
            Change::Removed(object) => (false, object),
        };
        match object {
            Object::Node(node) if added => {
                self.nodes.push(node);
                self.nodes_changed = true;
            }
            Object::Node(node) => self.nodes_changed |= remove(&mut self.nodes, &node),
            Object::Service(service) => {
                let key = owned(convert::object_key(&service.metadata));
                self.edit(key, added, |g| &mut g.services, service);
            }
            Object::Slice(slice) => {
                let key = owned(convert::slice_key(&slice));
                self.edit(key, added, |g| &mut g.slices, slice);
            }
            Object::Endpoints(endpoints) => {
                let key = owned(convert::object_key(&endpoints.metadata));
                self.edit(key, added, |g| &mut g.endpoints, endpoints);
            }
        }
    }

    /// Adds `object` to, or removes it from, its list of the group `key`; a group left empty
    /// goes.
    fn edit<T: Metadata<Ty = ObjectMeta> + Serialize>(
        &mut self,
        key: ServiceKey,
        added: bool,
        list: fn(&mut Group) -> &mut Vec<Arc<T>>,
        object: Arc<T>,
    ) {
        let group = self.groups.entry(key.clone()).or_default();
        let changed = if added {
            insert(list(group), object);
            true
        } else {
            remove(list(group), &object)
        };
        if group.services.is_empty() && group.slices.is_empty() && group.endpoints.is_empty() {
            self.groups.remove(&key);
        }
        if changed {
            self.changed.insert(key);
        }
    }

    /// Takes `objects` for the whole of what the sources hold: the groups whose objects are
    /// not the same allocations, in the same order, are the ones that changed.
    pub fn replace(&mut self, objects: &Objects) {
        let mut before = std::mem::take(&mut self.groups);
        for ((namespace, name), mut group) in convert::groups(objects) {
            group.services.sort_by(in_order);
            group.slices.sort_by(in_order);
            group.endpoints.sort_by(in_order);
            let key = (namespace.to_string(), name.to_string());
            if before.remove(&key).is_none_or(|b| !b.is_same(&group)) {
                self.changed.insert(key.clone());
            }
            self.groups.insert(key, group);
        }
        self.changed.extend(before.into_keys());
        if !same(&self.nodes, &objects.nodes) {
            self.nodes.clone_from(&objects.nodes);
            self.nodes_changed = true;
        }
    }

    pub fn group(&self, key: &ServiceKey) -> Option<&Group> {
        self.groups.get(key)
    }

    pub fn groups(&self) -> impl Iterator<Item = (&ServiceKey, &Group)> {
        self.groups.iter()
    }

    pub fn nodes(&self) -> &[Arc<core::Node>] {
        &self.nodes
    }

    /// Every object held, group by group: the whole, for a one-off reading.
    pub fn objects(&self) -> Objects {
        let mut objects = Objects {
            nodes: self.nodes.clone(),
            ..Objects::default()
        };
        for group in self.groups.values() {
            objects.services.extend(group.services.iter().cloned());
            objects.endpoint_slices.extend(group.slices.iter().cloned());
            objects.endpoints.extend(group.endpoints.iter().cloned());
        }
        objects
    }

    /// What changed since the last call.
    pub fn take_changes(&mut self) -> Changed {
        Changed {
            services: std::mem::take(&mut self.changed),
            nodes: std::mem::take(&mut self.nodes_changed),
        }
    }
}

fn owned((namespace, name): (&str, &str)) -> ServiceKey {
    (namespace.to_string(), name.to_string())
}

/// The order of a group's objects of one kind, whatever order they came in, so that what is
/// computed from them does not depend on the edits before (the first of two slices listing one
/// endpoint gives its conditions, the first of two copies of a Service in two manifests is the
/// one served): by namespace and name, then, for two copies of one object, by their JSON.
fn in_order<T: Metadata<Ty = ObjectMeta> + Serialize>(a: &Arc<T>, b: &Arc<T>) -> Ordering {
    fn name<T: Metadata<Ty = ObjectMeta>>(object: &T) -> (Option<&str>, Option<&str>) {
        let meta = object.metadata();
        (meta.namespace.as_deref(), meta.name.as_deref())
    }
    name(&**a).cmp(&name(&**b)).then_with(|| {
        serde_json::to_vec(&**a)
            .ok()
            .cmp(&serde_json::to_vec(&**b).ok())
    })
}

/// Puts `object` in its place in `list`.
fn insert<T: Metadata<Ty = ObjectMeta> + Serialize>(list: &mut Vec<Arc<T>>, object: Arc<T>) {
    let at = list.partition_point(|o| in_order(o, &object) != Ordering::Greater);
    list.insert(at, object);
}

/// Removes `object`'s allocation from `list`, once; whether it was there.
fn remove<T>(list: &mut Vec<Arc<T>>, object: &Arc<T>) -> bool {
    match list.iter().position(|o| Arc::ptr_eq(o, object)) {
        Some(at) => {
            list.remove(at);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::manifests;

    fn parsed(text: &str) -> Objects {
        let mut objects = Objects::default();
        let mut skipped = Vec::new();
        manifests::parse("test", text, &mut objects, &mut skipped);
        assert!(skipped.is_empty(), "{skipped:?}");
        objects
    }

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n";
    const SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: \
         {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nendpoints: []\n";

    fn key() -> ServiceKey {
        ("shop".into(), "web".into())
    }

    #[test]
    fn a_change_marks_its_group_and_only_it() {
        let objects = parsed(&format!("{SERVICE}---\n{SLICE}"));
        let mut store = Store::default();
        for object in objects.iter() {
            store.apply(Change::Added(object));
        }
        let changed = store.take_changes();
        assert_eq!(changed.services, BTreeSet::from([key()]));
        assert!(!changed.nodes);
        assert!(store.take_changes().services.is_empty(), "taken once");

        // The slice edited: its old allocation out, the new one in.
        let edited = parsed(SLICE).endpoint_slices.remove(0);
        store.apply(Change::Removed(Object::Slice(Arc::clone(
            &objects.endpoint_slices[0],
        ))));
        store.apply(Change::Added(Object::Slice(Arc::clone(&edited))));
        assert_eq!(store.take_changes().services, BTreeSet::from([key()]));
        let group = store.group(&key()).expect("the group");
        assert!(Arc::ptr_eq(&group.slices[0], &edited));
        assert_eq!(group.services.len(), 1);

        // An allocation the store does not hold changes nothing.
        store.apply(Change::Removed(Object::Slice(Arc::clone(
            &objects.endpoint_slices[0],
        ))));
        assert!(store.take_changes().services.is_empty());

        // Everything gone: so is the group, and it changed.
        store.apply(Change::Removed(Object::Slice(edited)));
        store.apply(Change::Removed(Object::Service(Arc::clone(
            &objects.services[0],
        ))));
        assert_eq!(store.take_changes().services, BTreeSet::from([key()]));
        assert!(store.group(&key()).is_none());
    }

    #[test]
    fn a_group_holds_its_objects_in_one_order_whatever_order_they_came_in() {
        let slice = |name: &str, ready: bool| {
            SLICE.replace("web-1", name).replace(
                "endpoints: []",
                &format!("endpoints: [{{addresses: [10.1.0.5], conditions: {{ready: {ready}}}}}]"),
            )
        };
        let objects = parsed(&format!(
            "{}---\n{}",
            slice("web-b", false),
            slice("web-a", true)
        ));
        let names = |store: &Store| -> Vec<String> {
            store
                .group(&key())
                .unwrap()
                .slices
                .iter()
                .map(|s| s.metadata.name.clone().unwrap())
                .collect()
        };
        let mut listed = Store::default();
        listed.replace(&objects);
        let mut added = Store::default();
        for object in objects.iter().collect::<Vec<_>>().into_iter().rev() {
            added.apply(Change::Added(object));
        }
        assert_eq!(names(&listed), ["web-a", "web-b"]);
        assert_eq!(names(&added), ["web-a", "web-b"]);
        // web-a edited: it goes back to its place, not behind web-b.
        let edited = parsed(&slice("web-a", true)).endpoint_slices.remove(0);
        added.apply(Change::Removed(Object::Slice(Arc::clone(
            &objects.endpoint_slices[1],
        ))));
        added.apply(Change::Added(Object::Slice(edited)));
        assert_eq!(names(&added), ["web-a", "web-b"]);
    }

    #[test]
    fn a_snapshot_changes_the_groups_whose_allocations_differ() {
        let mut objects = parsed(&format!(
            "{SERVICE}---\n{SLICE}---\n{}",
            SERVICE.replace("web", "db")
        ));
        let mut store = Store::default();
        store.replace(&objects);
        assert_eq!(store.take_changes().services.len(), 2);
        store.replace(&objects);
        assert!(store.take_changes().services.is_empty(), "the same objects");

        objects.endpoint_slices = parsed(SLICE).endpoint_slices;
        objects
            .services
            .retain(|s| s.metadata.name.as_deref() == Some("web"));
        store.replace(&objects);
        let changed = store.take_changes().services;
        assert_eq!(
            changed,
            BTreeSet::from([key(), ("shop".into(), "db".into())]),
            "web's slice is another allocation, db is gone"
        );
        assert!(store.group(&("shop".into(), "db".into())).is_none());
    }
}
