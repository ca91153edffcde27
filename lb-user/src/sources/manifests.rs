//! Kubernetes manifests from files or directories: multi-document YAML or JSON, `List`s too.
//! A document that does not parse is skipped with its file and position; the others load.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use serde::Deserialize as _;
use serde_yaml::{Mapping, Value};

use crate::model::{Objects, Skipped, TOPOLOGY_KEYS_ANNOTATION};

const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// What identifies a version of the manifests: a change to any file changes it.
pub type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64, u64)>;

#[derive(Clone, Debug)]
pub struct Manifests {
    paths: Vec<PathBuf>,
    /// What each file held when last read: a file whose stamp has not changed is not read
    /// again.
    files: BTreeMap<PathBuf, FileState>,
}

/// What identifies a version of a file. The inode too: a file replaced by rename (kubectl,
/// editors, ConfigMap volumes) may keep its size and modification time.
type Stamp = (Option<SystemTime>, u64, u64);

#[derive(Clone, Debug)]
struct FileState {
    stamp: Stamp,
    /// The objects of its last version.
    read: Objects,
    /// What was wrong with its last version.
    errors: Vec<Skipped>,
    /// While `errors` is not empty, the objects of its last version without error: a file
    /// broken by an edit keeps programming these until it reads clean again. While the file
    /// is clean, `read` is that version, and this is empty.
    last_good: Option<Objects>,
}

impl FileState {
    /// The objects of the last version that read without error, if any.
    fn good(self) -> Option<Objects> {
        if self.errors.is_empty() {
            Some(self.read)
        } else {
            self.last_good
        }
    }
}

fn stamp(file: &Path) -> Stamp {
    let meta = fs::metadata(file).ok();
    let modified = meta.as_ref().and_then(|m| m.modified().ok());
    let len = meta.as_ref().map_or(0, fs::Metadata::len);
    let inode = meta.map_or(0, |m| m.ino());
    (modified, len, inode)
}

impl Manifests {
    pub fn new(paths: Vec<PathBuf>) -> Self {
        Self {
            paths,
            files: BTreeMap::new(),
        }
    }

    /// The manifest files, directories expanded (recursively, sorted).
    pub fn files(&self) -> Vec<PathBuf> {
        walk(&self.paths).files
    }

    /// The directories whose entries are the manifests: each directory given and those below
    /// it, and the parent of each path given (which sees a file replaced by rename, or a
    /// directory made).
    pub fn directories(&self) -> Vec<PathBuf> {
        let mut directories = Vec::new();
        for path in &self.paths {
            if let Some(parent) = path.parent() {
                let parent = if parent.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    parent
                };
                directories.push(parent.to_path_buf());
            }
        }
        directories.extend(walk(&self.paths).directories);
        directories
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.files()
            .into_iter()
            .map(|file| {
                let (modified, len, inode) = stamp(&file);
                (file, modified, len, inode)
            })
            .collect()
    }

    /// Reads the files that changed since the last load and returns the objects of all. A
    /// file with an error (a document that does not parse) is reported, and its last clean
    /// version stands in for it, if it had one: an edit in progress or a typo does not delete
    /// what the file programmed.
    pub fn load(&mut self) -> (Objects, Vec<Skipped>) {
        let mut objects = Objects::default();
        let mut skipped = Vec::new();
        for path in &self.paths {
            if !path.exists() {
                skipped.push(Skipped::new(path.display().to_string(), "", "no such file"));
            }
        }
        let files = self.files();
        self.files.retain(|file, _| files.contains(file));
        for file in files {
            let now = stamp(&file);
            let state = match self.files.remove(&file) {
                Some(state) if state.stamp == now => state,
                previous => read(&file, now, previous.and_then(FileState::good)),
            };
            if state.errors.is_empty() {
                objects.extend(state.read.clone());
            } else {
                match &state.last_good {
                    Some(good) => {
                        skipped.push(Skipped::new(
                            file.display().to_string(),
                            "",
                            "has errors: its last version without errors stays programmed",
                        ));
                        objects.extend(good.clone());
                    }
                    None => objects.extend(state.read.clone()),
                }
                skipped.extend(state.errors.iter().cloned());
            }
            self.files.insert(file, state);
        }
        (objects, skipped)
    }
}

/// Reads and parses `file`, at `stamp`; `last_good` is its last version without error.
fn read(file: &Path, stamp: Stamp, last_good: Option<Objects>) -> FileState {
    let origin = file.display().to_string();
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    match fs::read_to_string(file) {
        Ok(text) => parse(&origin, &text, &mut objects, &mut errors),
        Err(e) => errors.push(Skipped::new(&origin, "", e.to_string())),
    }
    let last_good = if errors.is_empty() { None } else { last_good };
    FileState {
        stamp,
        read: objects,
        errors,
        last_good,
    }
}

/// What a walk of the paths given found.
#[derive(Default)]
struct Walk {
    files: Vec<PathBuf>,
    directories: Vec<PathBuf>,
}

/// Walks `paths`: a file given is a manifest, a directory given holds them, in its own files
/// and in its directories, recursively, sorted. Below a path given, a symlink is followed to a
/// file (a ConfigMap volume's files are symlinks) but never to a directory, and no directory is
/// entered twice (a bind mount of a parent below it): the walk is bounded by the directories
/// on disk, whatever links and mounts a manifest directory holds. A file reached twice (by a
/// link, or given twice) is read once, by its first path.
fn walk(paths: &[PathBuf]) -> Walk {
    let mut walk = Walk::default();
    let mut seen = HashSet::new();
    for path in paths {
        visit(path, &mut walk, &mut seen);
    }
    walk
}

/// `seen`: the device and inode of every file and directory walked.
fn visit(path: &Path, walk: &mut Walk, seen: &mut HashSet<(u64, u64)>) {
    let Ok(meta) = fs::metadata(path) else {
        return;
    };
    if !(meta.is_file() || meta.is_dir()) || !seen.insert((meta.dev(), meta.ino())) {
        return;
    }
    if meta.is_file() {
        walk.files.push(path.to_path_buf());
        return;
    }
    walk.directories.push(path.to_path_buf());
    let Ok(entries) = fs::read_dir(path) else {
        return;
    };
    // Dot-entries are skipped: a ConfigMap volume keeps every file again under `..data` and a
    // timestamped directory.
    let mut children: Vec<PathBuf> = entries
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    children.sort();
    for child in children {
        let Ok(link) = child.symlink_metadata() else {
            continue;
        };
        if link.file_type().is_symlink() && child.is_dir() {
            continue;
        }
        let manifest = child
            .extension()
            .is_some_and(|e| EXTENSIONS.iter().any(|x| e == *x));
        if link.is_dir() || manifest {
            visit(&child, walk, seen);
        }
    }
}

/// Parses every document of `text` (from `origin`) into `objects`.
pub fn parse(origin: &str, text: &str, objects: &mut Objects, skipped: &mut Vec<Skipped>) {
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let place = format!("{origin} (document {})", index + 1);
        match Value::deserialize(document) {
            Ok(Value::Null) => {}
            Ok(value) => add(&place, &value, objects, skipped),
            Err(e) => {
                skipped.push(Skipped::new(place, "", e.to_string()));
                // The rest of the stream cannot be read past a syntax error.
                return;
            }
        }
    }
}

fn add(place: &str, value: &Value, objects: &mut Objects, skipped: &mut Vec<Skipped>) {
    let text = |key: &str| value.get(key).and_then(Value::as_str).unwrap_or_default();
    let kind = text("kind").to_string();
    let api_version = text("apiVersion").to_string();
    let meta = |key: &str| {
        value
            .get("metadata")
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let object = format!(
        "{kind} {}/{} in {place}",
        meta("namespace").unwrap_or_else(|| "default".into()),
        meta("name").unwrap_or_default()
    );
    let mut typed = |objects: &mut Objects| -> Result<(), serde_yaml::Error> {
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Service") => {
                objects
                    .services
                    .push(Arc::new(serde_yaml::from_value(with_topology_keys(
                        value.clone(),
                    ))?));
            }
            ("v1", "Endpoints") => objects
                .endpoints
                .push(Arc::new(serde_yaml::from_value(value.clone())?)),
            ("v1", "Node") => objects
                .nodes
                .push(Arc::new(serde_yaml::from_value(value.clone())?)),
            ("discovery.k8s.io/v1", "EndpointSlice") => objects
                .endpoint_slices
                .push(Arc::new(serde_yaml::from_value(value.clone())?)),
            (_, kind) if kind.ends_with("List") => {
                for item in value
                    .get("items")
                    .and_then(Value::as_sequence)
                    .into_iter()
                    .flatten()
                {
                    add(place, item, objects, skipped);
                }
            }
            // Deployments, ConfigMaps and the like share manifest directories: not ours.
            _ => {}
        }
        Ok(())
    };
    if let Err(e) = typed(objects) {
        skipped.push(Skipped::new(object, "", e.to_string()));
    }
}

/// Moves a Service's `spec.topologyKeys`, which today's API types no longer have, into the
/// annotation the model reads, unless the annotation is set.
fn with_topology_keys(mut service: Value) -> Value {
    let keys: Option<Vec<String>> = service
        .get("spec")
        .and_then(|s| s.get("topologyKeys"))
        .and_then(Value::as_sequence)
        .map(|keys| {
            keys.iter()
                .map(|k| k.as_str().unwrap_or_default().to_string())
                .collect()
        });
    let (Some(keys), Some(metadata)) = (keys, service.get_mut("metadata")) else {
        return service;
    };
    let Some(metadata) = metadata.as_mapping_mut() else {
        return service;
    };
    let annotations = metadata
        .entry("annotations".into())
        .or_insert_with(|| Value::Mapping(Mapping::default()));
    if let Some(annotations) = annotations.as_mapping_mut() {
        annotations
            .entry(TOPOLOGY_KEYS_ANNOTATION.into())
            .or_insert_with(|| Value::String(keys.join(",")));
    }
    service
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(text: &str) -> (Objects, Vec<Skipped>) {
        let mut objects = Objects::default();
        let mut skipped = Vec::new();
        parse("test.yaml", text, &mut objects, &mut skipped);
        (objects, skipped)
    }

    #[test]
    fn the_walk_follows_file_links_only_and_enters_each_directory_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("sub")).unwrap();
        fs::write(root.join("a.yaml"), "").unwrap();
        fs::write(root.join("sub/b.yml"), "").unwrap();
        fs::write(root.join("notes.txt"), "").unwrap();
        // Directory links named like manifests: followed, each would walk the tree again,
        // and two of them double the walk at every level.
        std::os::unix::fs::symlink(".", root.join("loop.yaml")).unwrap();
        std::os::unix::fs::symlink("..", root.join("sub/up.json")).unwrap();
        std::os::unix::fs::symlink("sub", root.join("sub-link")).unwrap();
        // A file link, as a ConfigMap volume has them: followed, and its file read once.
        std::os::unix::fs::symlink("sub/b.yml", root.join("c.yaml")).unwrap();
        std::os::unix::fs::symlink("notes.txt", root.join("d.yaml")).unwrap();
        let manifests = Manifests::new(vec![root.to_path_buf()]);
        let names: Vec<String> = manifests
            .files()
            .iter()
            .map(|f| f.strip_prefix(root).unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["a.yaml", "c.yaml", "d.yaml"]);
        let directories = manifests.directories();
        assert_eq!(
            directories.len(),
            3,
            "the parent, the root, sub: {directories:?}"
        );
    }

    #[test]
    fn reads_yaml_documents_json_and_lists() {
        let (objects, skipped) = parse_text(
            r#"
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}
---
apiVersion: v1
kind: List
items:
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: a-1}
  addressType: IPv4
  endpoints: []
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: ignored}
"#,
        );
        assert_eq!(skipped, vec![]);
        assert_eq!(objects.services.len(), 1);
        assert_eq!(objects.nodes.len(), 1);
        assert_eq!(objects.endpoint_slices.len(), 1);
    }

    #[test]
    fn a_file_broken_by_an_edit_keeps_its_last_clean_version() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("svc.yaml");
        let good =
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1}\n";
        fs::write(&file, good).unwrap();
        let mut source = Manifests::new(vec![dir.path().to_path_buf()]);
        let (objects, skipped) = source.load();
        assert_eq!((objects.services.len(), skipped.len()), (1, 0));

        fs::write(&file, format!("{good}---\nkind: [unclosed\n")).unwrap();
        let (objects, skipped) = source.load();
        assert_eq!(
            objects.services.len(),
            1,
            "the last clean version stands in"
        );
        assert_eq!(
            skipped.len(),
            2,
            "the error, and that the old version stays: {skipped:?}"
        );

        fs::remove_file(&file).unwrap();
        let (objects, _) = source.load();
        assert!(
            objects.services.is_empty(),
            "a removed file removes its objects"
        );
    }

    #[test]
    fn topology_keys_reach_the_annotation() {
        let (objects, _) = parse_text(
            r#"
apiVersion: v1
kind: Service
metadata: {name: dns}
spec:
  clusterIP: 10.96.0.10
  topologyKeys: ["kubernetes.io/hostname", "*"]
"#,
        );
        let annotations = objects.services[0].metadata.annotations.clone().unwrap();
        assert_eq!(
            annotations[TOPOLOGY_KEYS_ANNOTATION],
            "kubernetes.io/hostname,*"
        );
    }

    #[test]
    fn a_malformed_document_is_named_and_the_others_load() {
        let (objects, skipped) = parse_text(
            r#"
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: shop}
spec: {ports: [{port: "eighty"}]}
---
apiVersion: v1
kind: Service
metadata: {name: good}
spec: {clusterIP: 10.96.0.2}
"#,
        );
        assert_eq!(objects.services.len(), 1);
        assert_eq!(skipped.len(), 1);
        assert!(
            skipped[0]
                .object
                .starts_with("Service shop/bad in test.yaml (document 1)"),
            "{skipped:?}"
        );
    }
}
