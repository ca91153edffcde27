//! Kubernetes manifests from files or directories: multi-document YAML or JSON, `List`s too.
//! A document that does not parse is skipped with its file and position; the others load.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    hash::{Hash as _, Hasher as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use serde::Deserialize as _;
use serde_yaml::{Mapping, Value};

#[cfg(test)]
use crate::model::Object;
use crate::model::{Change, Objects, Skipped, TOPOLOGY_KEYS_ANNOTATION};

const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

#[derive(Clone, Debug)]
pub struct Manifests {
    paths: Vec<PathBuf>,
    /// What each file held when last read: a file whose stamp has not changed is not read
    /// again.
    files: BTreeMap<PathBuf, FileState>,
    /// The directories the last load walked.
    walked: Vec<PathBuf>,
    /// The last load found other directories or files than the load before it, or files
    /// changed ([`Manifests::watch_due`]).
    watch_due: bool,
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
    /// Each document of its last version, by the hash of its text, with its objects: a
    /// document read again unchanged is not parsed again, and its objects are the same
    /// allocations. Empty when the version was parsed whole ([`documents`]).
    documents: Vec<(u64, Objects)>,
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

    /// What the file programs: its last version without error, or else what its version
    /// with errors holds.
    fn programs(&self) -> &Objects {
        match &self.last_good {
            Some(good) if !self.errors.is_empty() => good,
            _ => &self.read,
        }
    }
}

fn stamp(meta: &fs::Metadata) -> Stamp {
    (meta.modified().ok(), meta.len(), meta.ino())
}

impl Manifests {
    pub fn new(paths: Vec<PathBuf>) -> Self {
        Self {
            paths,
            files: BTreeMap::new(),
            walked: Vec::new(),
            watch_due: false,
        }
    }

    /// The manifest files, directories expanded (recursively, sorted).
    pub fn files(&self) -> Vec<PathBuf> {
        walk(&self.paths)
            .files
            .into_iter()
            .map(|(f, _)| f)
            .collect()
    }

    /// The directories whose entries are the manifests, as the last load found them: each
    /// directory given and those below it, and the parent of each path given (which sees a
    /// file replaced by rename, or a directory made).
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
        directories.extend(self.walked.iter().cloned());
        directories
    }

    /// Whether the directories to watch may have changed at the last load: it walked other
    /// directories than the load before it, or found files added, changed or gone (a directory
    /// replaced by a copy of itself, whose inode is another even if its number is the same).
    pub fn watch_due(&self) -> bool {
        self.watch_due
    }

    /// Reads the files that changed since the last load; what that changed in the objects
    /// the files program, and what is wrong with them. A file with an error (a document that
    /// does not parse) is reported, and its last clean version stands in for it, if it had
    /// one: an edit in progress or a typo does not delete what the file programmed. A document
    /// a file read again holds unchanged (the same text, anywhere in the file) is not parsed
    /// again, and its objects are the allocations they were.
    pub fn load(&mut self) -> (Vec<Change>, Vec<Skipped>) {
        let mut changes = Vec::new();
        let mut skipped = Vec::new();
        for path in &self.paths {
            if !path.exists() {
                skipped.push(Skipped::new(path.display().to_string(), "", "no such file"));
            }
        }
        let walk = walk(&self.paths);
        self.watch_due = self.walked != walk.directories;
        self.walked = walk.directories;
        for (file, now) in &walk.files {
            let state = match self.files.get(file) {
                Some(state) if state.stamp == *now => state,
                _ => {
                    self.watch_due = true;
                    let previous = self.files.remove(file);
                    let before = previous
                        .as_ref()
                        .map(|p| p.programs().clone())
                        .unwrap_or_default();
                    let state = read(file, *now, previous);
                    changes.extend(differences(&before, state.programs()));
                    self.files.entry(file.clone()).or_insert(state)
                }
            };
            if !state.errors.is_empty() {
                if state.last_good.is_some() {
                    skipped.push(Skipped::new(
                        file.display().to_string(),
                        "",
                        "has errors: its last version without errors stays programmed",
                    ));
                }
                skipped.extend(state.errors.iter().cloned());
            }
        }
        // Paths are walked once each: any more known are gone.
        if self.files.len() > walk.files.len() {
            self.watch_due = true;
            let listed: HashSet<&PathBuf> = walk.files.iter().map(|(f, _)| f).collect();
            let gone: Vec<PathBuf> = self
                .files
                .keys()
                .filter(|file| !listed.contains(file))
                .cloned()
                .collect();
            for file in gone {
                if let Some(state) = self.files.remove(&file) {
                    changes.extend(state.programs().iter().map(Change::Removed));
                }
            }
        }
        (changes, skipped)
    }

    /// The objects of every file as [`Manifests::load`] leaves them, and what is wrong with
    /// them: the whole, for a one-off reading (`plan`, `dump`, tests).
    pub fn snapshot(&mut self) -> (Objects, Vec<Skipped>) {
        let (_, skipped) = self.load();
        let mut objects = Objects::default();
        for state in self.files.values() {
            objects.extend(state.programs().clone());
        }
        (objects, skipped)
    }
}

/// The allocations of `before` that `after` does not hold, removed; those of `after` that
/// `before` did not, added.
fn differences(before: &Objects, after: &Objects) -> Vec<Change> {
    let held = |objects: &Objects| -> HashSet<*const ()> {
        objects.iter().map(|o| o.allocation()).collect()
    };
    let (was, is) = (held(before), held(after));
    let removed = before
        .iter()
        .filter(|o| !is.contains(&o.allocation()))
        .map(Change::Removed);
    let added = after
        .iter()
        .filter(|o| !was.contains(&o.allocation()))
        .map(Change::Added);
    removed.chain(added).collect()
}

/// Reads and parses `file`, at `stamp`; `previous` is what its last version held.
fn read(file: &Path, stamp: Stamp, previous: Option<FileState>) -> FileState {
    let origin = file.display().to_string();
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    let mut documents = Vec::new();
    let (mut known, last_good) = match previous {
        Some(mut previous) => {
            let mut known: HashMap<u64, Vec<Objects>> = HashMap::new();
            for (hash, objects) in std::mem::take(&mut previous.documents) {
                known.entry(hash).or_default().push(objects);
            }
            (known, previous.good())
        }
        None => (HashMap::new(), None),
    };
    match fs::read_to_string(file) {
        Ok(text) => match parse_documents(&origin, &text, &mut known) {
            Some(parsed) => {
                for (_, document) in &parsed {
                    objects.extend(document.clone());
                }
                documents = parsed;
            }
            None => parse(&origin, &text, &mut objects, &mut errors),
        },
        Err(e) => errors.push(Skipped::new(&origin, "", e.to_string())),
    }
    let last_good = if errors.is_empty() { None } else { last_good };
    FileState {
        stamp,
        read: objects,
        errors,
        last_good,
        documents,
    }
}

/// Parses each document of `text` on its own, but those whose text hashes to one of `known`
/// (what the last version's documents held), which are taken from there. None when the text
/// cannot be split into documents, or a document has an error: the whole text is then parsed
/// as one stream, which names each error's document as YAML counts them.
fn parse_documents(
    origin: &str,
    text: &str,
    known: &mut HashMap<u64, Vec<Objects>>,
) -> Option<Vec<(u64, Objects)>> {
    let mut parsed = Vec::new();
    for document in documents(text)? {
        let mut hasher = std::hash::DefaultHasher::new();
        document.hash(&mut hasher);
        let hash = hasher.finish();
        let objects = match known.get_mut(&hash).and_then(Vec::pop) {
            Some(objects) => objects,
            None => {
                let mut objects = Objects::default();
                let mut errors = Vec::new();
                parse(origin, document, &mut objects, &mut errors);
                if !errors.is_empty() {
                    return None;
                }
                objects
            }
        };
        parsed.push((hash, objects));
    }
    Some(parsed)
}

/// Adds `part` of a stream to `documents` if it is a document: begun with `---`, or holding more
/// than comments and blank lines. False when it cannot be parsed on its own: content after `...`
/// without `---`, which YAML 1.1 (the whole-stream parser's) refuses.
fn take_part<'a>(
    documents: &mut Vec<&'a str>,
    part: &'a str,
    opened: bool,
    after_end: bool,
) -> bool {
    let content = part.lines().any(|line| {
        let line = line.trim();
        !line.is_empty() && !line.starts_with('#')
    });
    if opened || content {
        if !opened && after_end {
            return false;
        }
        documents.push(part);
    }
    true
}

/// The documents of a YAML stream, each its own text: split at the lines that begin with a
/// document marker (`---`, which starts one, and `...`, which ends one), which YAML reserves at
/// the start of a line wherever it is, even inside a scalar. None for a stream with directives
/// (a line beginning with `%`), which belong to the document after them. A part before the
/// first marker with nothing but comments and blank lines is none.
fn documents(text: &str) -> Option<Vec<&str>> {
    let marker = |line: &str, marker: &str| {
        line.strip_prefix(marker)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
    };
    let mut documents = Vec::new();
    let (mut start, mut offset) = (0, 0);
    // How the current part began: with `---` (a document even if empty), after `...` (where
    // YAML 1.1, as the whole-stream parser reads it, wants `---` before any content), or at the
    // start of the stream.
    let (mut opened, mut after_end) = (false, false);
    for line in text.split_inclusive('\n') {
        if line.starts_with('%') {
            return None;
        }
        let (starts, ends) = (marker(line, "---"), marker(line, "..."));
        if starts || ends {
            let end = if ends { offset + line.len() } else { offset };
            if !take_part(&mut documents, &text[start..end], opened, after_end) {
                return None;
            }
            (start, opened, after_end) = (end, starts, ends);
        }
        offset += line.len();
    }
    take_part(&mut documents, &text[start..], opened, after_end).then_some(documents)
}

/// What a walk of the paths given found.
#[derive(Default)]
struct Walk {
    /// Each with its stamp as walked.
    files: Vec<(PathBuf, Stamp)>,
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
        walk.files.push((path.to_path_buf(), stamp(&meta)));
        return;
    }
    walk.directories.push(path.to_path_buf());
    let Ok(entries) = fs::read_dir(path) else {
        return;
    };
    // Dot-entries are skipped: a ConfigMap volume keeps every file again under `..data` and a
    // timestamped directory.
    // The entry's own type, as the directory lists it: no stat for the entries skipped.
    let mut children: Vec<(PathBuf, fs::FileType)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            Some((e.path(), e.file_type().ok()?))
        })
        .filter(|(p, _)| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    children.sort_by(|(a, _), (b, _)| a.cmp(b));
    for (child, kind) in children {
        if kind.is_symlink() && child.is_dir() {
            continue;
        }
        let manifest = child
            .extension()
            .is_some_and(|e| EXTENSIONS.iter().any(|x| e == *x));
        if kind.is_dir() || manifest {
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
            Ok(value) => add(&place, value, objects, skipped),
            Err(e) => {
                skipped.push(Skipped::new(place, "", e.to_string()));
                // The rest of the stream cannot be read past a syntax error.
                return;
            }
        }
    }
}

fn add(place: &str, value: Value, objects: &mut Objects, skipped: &mut Vec<Skipped>) {
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
    let typed = |objects: &mut Objects| -> Result<(), serde_yaml::Error> {
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Service") => objects
                .services
                .push(Arc::new(serde_yaml::from_value(with_topology_keys(value))?)),
            ("v1", "Endpoints") => objects
                .endpoints
                .push(Arc::new(serde_yaml::from_value(value)?)),
            ("v1", "Node") => objects.nodes.push(Arc::new(serde_yaml::from_value(value)?)),
            ("discovery.k8s.io/v1", "EndpointSlice") => objects
                .endpoint_slices
                .push(Arc::new(serde_yaml::from_value(value)?)),
            (_, kind) if kind.ends_with("List") => {
                let items = match value {
                    Value::Mapping(mut list) => list.remove("items"),
                    _ => None,
                };
                if let Some(Value::Sequence(items)) = items {
                    for item in items {
                        add(place, item, objects, skipped);
                    }
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
        let mut manifests = Manifests::new(vec![root.to_path_buf()]);
        manifests.load();
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
    fn a_stream_splits_into_its_documents_at_the_markers_only() {
        let cases: [(&str, Option<&[&str]>); 9] = [
            ("a: 1\n", Some(&["a: 1\n"])),
            ("# comment\n\n---\na: 1\n", Some(&["---\na: 1\n"])),
            (
                "a: 1\n---\nb: 2\n---\n",
                Some(&["a: 1\n", "---\nb: 2\n", "---\n"]),
            ),
            (
                "--- {a: 1}\r\n--- [b]\n",
                Some(&["--- {a: 1}\r\n", "--- [b]\n"]),
            ),
            ("a: 1\n...\n# after\n", Some(&["a: 1\n...\n"])),
            (
                "a: |\n  text\n  --- not a marker\n----\n",
                Some(&["a: |\n  text\n  --- not a marker\n----\n"]),
            ),
            ("%YAML 1.2\n---\na: 1\n", None),
            ("a: 1\n...\nb: 2\n", None),
            ("", Some(&[])),
        ];
        for (text, expected) in cases {
            assert_eq!(documents(text).as_deref(), expected, "{text:?}");
        }
        // Why content after `...` is left to the whole stream: it refuses it.
        assert_eq!(parse_text("a: 1\n...\nb: 2\n").1.len(), 1);
    }

    #[test]
    fn documents_parsed_one_by_one_make_what_the_whole_stream_makes() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        let manifests = Manifests::new(vec![examples]);
        let files = manifests.files();
        assert!(!files.is_empty());
        for file in files {
            let text = fs::read_to_string(&file).unwrap();
            let (whole, skipped) = parse_text(&text);
            assert!(skipped.is_empty(), "{skipped:?}");
            let documents = parse_documents("test.yaml", &text, &mut HashMap::new())
                .unwrap_or_else(|| panic!("{} splits", file.display()));
            let mut split = Objects::default();
            for (_, objects) in documents {
                split.extend(objects);
            }
            let values = |objects: &Objects| format!("{objects:?}");
            assert_eq!(values(&split), values(&whole), "{}", file.display());
        }
    }

    #[test]
    fn a_directory_replaced_is_one_to_watch_again() {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("app");
        let make = || {
            fs::create_dir(&app).unwrap();
            fs::write(app.join("a.yaml"), "").unwrap();
        };
        make();
        let mut source = Manifests::new(vec![dir.path().to_path_buf()]);
        source.load();
        assert!(source.watch_due(), "the first walk");
        source.load();
        assert!(!source.watch_due(), "nothing moved");
        fs::remove_dir_all(&app).unwrap();
        make();
        let (changes, _) = source.load();
        assert!(changes.is_empty(), "the same (empty) manifest");
        assert!(
            source.watch_due(),
            "app is another directory, a.yaml another file"
        );
    }

    #[test]
    fn a_file_read_again_parses_only_its_changed_documents() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("svc.yaml");
        let service = |name: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}}}\n"
            )
        };
        let text = |b_ip: &str| {
            [
                service("a", "10.96.0.1"),
                service("b", b_ip),
                service("c", "10.96.0.3"),
            ]
            .join("---\n")
        };
        fs::write(&file, text("10.96.0.2")).unwrap();
        let mut source = Manifests::new(vec![file.clone()]);
        let (changes, skipped) = source.load();
        assert_eq!((changes.len(), skipped.len()), (3, 0));
        let (before, _) = source.snapshot();

        // Another length: the stamp changes even within the same second.
        fs::write(&file, text("10.96.0.22")).unwrap();
        let (changes, skipped) = source.load();
        assert!(skipped.is_empty(), "{skipped:?}");
        let names: Vec<(bool, &str)> = changes
            .iter()
            .map(|change| match change {
                Change::Added(Object::Service(s)) => (true, s.metadata.name.as_deref().unwrap()),
                Change::Removed(Object::Service(s)) => (false, s.metadata.name.as_deref().unwrap()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            [(false, "b"), (true, "b")],
            "b's old version out, its new one in"
        );
        let (after, _) = source.snapshot();
        assert!(Arc::ptr_eq(&before.services[0], &after.services[0]));
        assert!(!Arc::ptr_eq(&before.services[1], &after.services[1]));
        assert!(Arc::ptr_eq(&before.services[2], &after.services[2]));
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
        let (objects, skipped) = source.snapshot();
        assert_eq!((objects.services.len(), skipped.len()), (1, 0));

        fs::write(&file, format!("{good}---\nkind: [unclosed\n")).unwrap();
        let (objects, skipped) = source.snapshot();
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
        let (objects, _) = source.snapshot();
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
