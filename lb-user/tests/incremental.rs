//! The pipeline the agent runs ([`Pipeline`]: the model and the plan kept between syncs, the
//! writes), over maps in memory: it must program what a fresh computation would, whatever the
//! edits, touch only what an edit changed, and recover from any write that fails. Each golden
//! case's files are added one at a time, edited and removed again, handed to the pipeline as
//! snapshots and, as real files, through the manifest source's changes; after every step the
//! maps are compared with the entries computed from nothing.

mod txtar;

use std::{fs, net::Ipv4Addr, sync::Arc};

use lb_common::{addr::ipv4_be, maps::Config};
use lb_user::{
    maps::memory::{FailingMaps, MemoryMaps, Written},
    model::{self, Memo, NodeConfig, Objects, Skipped, Store},
    plan::{self, MapEntries, Op},
    sources::manifests::{self, Manifests},
    sync::{Adopted, Pipeline, Synced},
};

/// A source that keeps each file's objects while the file is unchanged, as the manifest
/// source does.
struct Files(Vec<(String, Objects)>);

impl Files {
    fn put(&mut self, name: &str, text: &str) {
        let mut objects = Objects::default();
        manifests::parse(name, text, &mut objects, &mut Vec::new());
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some((_, old)) => *old = objects,
            None => self.0.push((name.to_string(), objects)),
        }
    }

    fn remove(&mut self, name: &str) {
        self.0.retain(|(n, _)| n != name);
    }

    fn objects(&self) -> Objects {
        let mut all = Objects::default();
        for (_, objects) in &self.0 {
            all.extend(objects.clone());
        }
        all
    }
}

/// The agent's pipeline, and the maps it writes.
struct Agent {
    node: NodeConfig,
    pipeline: Pipeline,
    maps: MemoryMaps,
    /// The pipeline's reports after the last sync.
    reports: Option<String>,
}

impl Agent {
    fn new(node: &str) -> Self {
        Self {
            node: NodeConfig::new(node),
            pipeline: Pipeline::new(node, Adopted::default(), Config::default()),
            maps: MemoryMaps::default(),
            reports: None,
        }
    }

    /// Syncs; how many plan operations it wrote.
    fn sync(&mut self, objects: &Objects, step: &str) -> usize {
        let synced = self.pipeline.sync(objects, &self.node, &mut self.maps);
        self.check(&synced, objects, step)
    }

    /// Syncs what changed in `source`'s files, as the agent does; how many plan operations
    /// it wrote.
    fn sync_files(&mut self, source: &mut Manifests, step: &str) -> usize {
        let (changes, _) = source.load();
        let synced = self
            .pipeline
            .sync_changes(changes, &self.node, &mut self.maps);
        let (objects, _) = source.snapshot();
        self.check(&synced, &objects, step)
    }

    /// What a sync of `objects` left must be what a fresh computation makes of them.
    fn check(&mut self, synced: &Synced, objects: &Objects, step: &str) -> usize {
        assert_eq!(synced.failed, 0, "{step}: failed writes");
        assert_eq!(
            &self.maps.entries,
            self.pipeline.programmed(),
            "{step}: the pipeline's record of the maps"
        );
        let (entries, skipped) = fresh(objects, &self.node);
        assert_eq!(
            self.maps.entries.table(&std::collections::BTreeMap::new()),
            entries.table(&std::collections::BTreeMap::new()),
            "{step}: the frontends and their backends differ from a fresh computation"
        );
        assert_eq!(self.maps.entries.vips, entries.vips, "{step}: vips");
        let mut incremental = self.pipeline.skipped();
        incremental.sort();
        assert_eq!(incremental, skipped, "{step}: skipped");
        // The agent reads the reports again only when the sync says they changed.
        let reports = format!(
            "{incremental:?} {:?} {:?} {:?}",
            self.pipeline.lost_claims(),
            self.pipeline.health_checks(),
            self.pipeline.node_addresses()
        );
        if !synced.reports_changed {
            assert_eq!(
                self.reports.as_ref(),
                Some(&reports),
                "{step}: the reports changed, and the sync did not say so"
            );
        }
        self.reports = Some(reports);
        synced.writes
    }
}

fn fresh(objects: &Objects, node: &NodeConfig) -> (MapEntries, Vec<Skipped>) {
    let desired = model::compute(objects, node);
    let (entries, more) = plan::entries(&desired.frontends, &node.name);
    let mut skipped: Vec<Skipped> = desired.skipped.into_iter().chain(more).collect();
    skipped.sort();
    (entries, skipped)
}

/// Where a walk of the golden cases keeps the files, and how the agent learns of them.
trait Sources {
    fn put(&mut self, name: &str, text: &str);
    fn remove(&mut self, name: &str);
    /// Syncs the agent; how many plan operations it wrote.
    fn sync(&mut self, agent: &mut Agent, step: &str) -> usize;
}

/// Handed to the pipeline whole, at every sync.
impl Sources for Files {
    fn put(&mut self, name: &str, text: &str) {
        Files::put(self, name, text);
    }

    fn remove(&mut self, name: &str) {
        Files::remove(self, name);
    }

    fn sync(&mut self, agent: &mut Agent, step: &str) -> usize {
        agent.sync(&self.objects(), step)
    }
}

/// Real files, whose changes the manifest source hands in, as in the agent.
struct OnDisk {
    dir: tempfile::TempDir,
    source: Manifests,
}

impl OnDisk {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let source = Manifests::new(vec![dir.path().to_path_buf()]);
        Self { dir, source }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir
            .path()
            .join(format!("{}.yaml", name.replace('/', "_")))
    }
}

impl Sources for OnDisk {
    /// By a rename, as kubectl and editors write: a new inode, so that the source sees the
    /// change however soon after the last one it comes.
    fn put(&mut self, name: &str, text: &str) {
        let hidden = self.dir.path().join(".next.tmp");
        fs::write(&hidden, text).unwrap();
        fs::rename(&hidden, self.path(name)).unwrap();
    }

    fn remove(&mut self, name: &str) {
        match fs::remove_file(self.path(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("{e}"),
            _ => {}
        }
    }

    fn sync(&mut self, agent: &mut Agent, step: &str) -> usize {
        agent.sync_files(&mut self.source, step)
    }
}

/// Every golden case's files added one at a time, read again, edited, moved and removed
/// through `sources`; after every step the maps must hold what a fresh computation gives.
fn walk_every_golden_case<S: Sources>(sources: impl Fn() -> S) {
    for case in txtar::cases() {
        let sections: Vec<&(String, String)> = case.manifests().collect();
        let mut agent = Agent::new(case.node());
        let case = case.path.display();
        let mut files = sources();
        for (name, text) in sections.iter().copied() {
            files.put(name, text);
            files.sync(&mut agent, &format!("{case}: {name} added"));
        }
        // The same text read again: new objects, the same entries, nothing written.
        for (name, text) in sections.iter().copied() {
            files.put(name, text);
            let writes = files.sync(&mut agent, &format!("{case}: {name} read again"));
            assert_eq!(writes, 0, "{case}: {name} read again wrote");
        }
        // Every file without its last endpoint address, then back.
        for (name, text) in sections.iter().copied() {
            if let Some(cut) = text.rfind("- addresses:") {
                let end = text[cut..].find('\n').map_or(text.len(), |n| cut + n + 1);
                files.put(name, &format!("{}{}", &text[..cut], &text[end..]));
                files.sync(&mut agent, &format!("{case}: {name} one address fewer"));
                files.put(name, text);
                files.sync(&mut agent, &format!("{case}: {name} restored"));
            }
        }
        // All of one file's documents moved to the next file.
        if let [(a, a_text), (b, b_text), ..] = sections.as_slice() {
            files.put(b, &format!("{a_text}\n---\n{b_text}"));
            files.remove(a);
            files.sync(&mut agent, &format!("{case}: {a} moved into {b}"));
        }
        for (name, _) in sections.iter().copied() {
            files.remove(name);
            files.sync(&mut agent, &format!("{case}: {name} removed"));
        }
        assert_eq!(
            agent.maps.entries,
            MapEntries::default(),
            "{case}: all removed"
        );
    }
}

#[test]
fn every_step_of_every_golden_case_programs_what_a_fresh_computation_would() {
    walk_every_golden_case(|| Files(Vec::new()));
}

#[test]
fn every_step_of_every_golden_case_through_the_files_programs_what_a_fresh_computation_would() {
    walk_every_golden_case(OnDisk::new);
}

/// 100 Services of 10 endpoints; Service `i`'s text, with `endpoints` of them.
fn service(i: u32, endpoints: u32) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec:\n  clusterIP: \
         10.96.1.{i}\n  ports: [{{port: 80, targetPort: 8080}}]\n---\napiVersion: \
         discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s{i}-1\n  labels: \
         {{kubernetes.io/service-name: s{i}}}\naddressType: IPv4\nports: [{{port: \
         8080}}]\nendpoints:\n"
    );
    for e in 0..endpoints {
        text.push_str(&format!("- addresses: [10.244.{i}.{e}]\n"));
    }
    text
}

#[test]
fn an_edit_to_one_service_touches_its_entries_only() {
    let mut agent = Agent::new("lab-node");
    let mut files = Files(Vec::new());
    for i in 0..100 {
        files.put(&format!("s{i}.yaml"), &service(i, 10));
    }
    let writes = agent.sync(&files.objects(), "all written");
    assert_eq!(
        writes,
        100 * (1 + 10 + 10) + 100,
        "frontends, slots, backends, vips"
    );
    let ids_before = agent.maps.entries.clone();

    files.put("s42.yaml", &service(42, 9));
    let writes = agent.sync(&files.objects(), "one endpoint fewer");
    // The frontend's count, and its tenth slot and backend gone: slots keep their order.
    assert_eq!(writes, 3);
    for (key, frontend) in &ids_before.frontends {
        assert_eq!(
            agent.maps.entries.frontends[key].service_id, frontend.service_id,
            "service ids are stable"
        );
    }
    let kept = ids_before
        .backends
        .iter()
        .filter(|(id, backend)| agent.maps.entries.backends.get(id) == Some(backend))
        .count();
    assert_eq!(kept, 999, "every other backend keeps its id");

    // An endpoint that two Services share is one backend, while either names it.
    let shared = service(7, 10).replace("10.244.7.3", "10.244.8.3");
    files.put("s7.yaml", &shared);
    agent.sync(&files.objects(), "a backend shared");
    files.remove("s8.yaml");
    agent.sync(&files.objects(), "the other Service gone");
    files.remove("s7.yaml");
    agent.sync(&files.objects(), "both gone");
}

#[test]
fn a_frontend_claimed_twice_goes_to_the_second_when_the_first_goes() {
    let mut agent = Agent::new("lab-node");
    let mut files = Files(Vec::new());
    files.put("a.yaml", &service(1, 2));
    files.put("b.yaml", &service(2, 3).replace("10.96.1.2", "10.96.1.1"));
    agent.sync(&files.objects(), "both claim 10.96.1.1:80");
    let frontend = |agent: &Agent| agent.maps.entries.frontends.values().next().copied();
    assert_eq!(frontend(&agent).map(|f| f.backend_count), Some(2));
    files.remove("a.yaml");
    agent.sync(&files.objects(), "the first claim gone");
    assert_eq!(frontend(&agent).map(|f| f.backend_count), Some(3));
}

#[test]
fn unchanged_objects_are_not_computed_again() {
    let node = NodeConfig::new("lab-node");
    let mut files = Files(Vec::new());
    files.put("a.yaml", &service(1, 2));
    files.put("b.yaml", &service(2, 2));
    let mut memo = Memo::default();
    let mut store = Store::default();
    let mut update = |objects: &Objects, node: &NodeConfig| {
        store.replace(objects);
        let changed = memo.update(&mut store, node);
        (memo.desired(), changed)
    };
    let (first, changed) = update(&files.objects(), &node);
    assert_eq!(changed.len(), 2, "both frontends new");
    files.put("b.yaml", &service(2, 1));
    let (second, changed) = update(&files.objects(), &node);
    assert!(Arc::ptr_eq(&first.frontends[0], &second.frontends[0]));
    assert!(!Arc::ptr_eq(&first.frontends[1], &second.frontends[1]));
    assert_eq!(changed.len(), 1, "only b's frontend is handed to the plan");
    // Another node config: everything computed again, but what comes out the same is the
    // same allocation, and no frontend is handed to the plan.
    let (third, changed) = update(&files.objects(), &NodeConfig::new("other"));
    assert!(Arc::ptr_eq(&second.frontends[0], &third.frontends[0]));
    assert!(changed.is_empty(), "{changed:?}");
}

/// The datapath's reading of the maps: every slot a frontend counts is there, and names a
/// backend that is there.
fn consistent(entries: &MapEntries) -> Result<(), String> {
    for (key, frontend) in &entries.frontends {
        for slot in 1..=u32::from(frontend.backend_count) {
            let slot_key = lb_common::maps::SlotKey {
                service_id: frontend.service_id,
                slot,
            };
            let Some(found) = entries.slots.get(&slot_key) else {
                return Err(format!("{key:?}: slot {slot} missing"));
            };
            if !entries.backends.contains_key(&found.backend_id) {
                return Err(format!("{key:?}: slot {slot} names a missing backend"));
            }
        }
    }
    Ok(())
}

#[test]
fn a_write_that_fails_leaves_consistent_maps_and_the_next_sync_writes_the_rest() {
    for case in txtar::cases() {
        let sections: Vec<&(String, String)> = case.manifests().collect();
        let node = NodeConfig::new(case.node());
        // The node's address changes too: the config is written in the same sync.
        let moved_to = Ipv4Addr::new(192, 0, 2, 77);
        let moved = NodeConfig {
            addresses: vec![moved_to.into()],
            ..node.clone()
        };
        let case = case.path.display();
        // From every file to every file with one address fewer and the first one gone: adds,
        // updates and deletions in one sync.
        let mut before = Files(Vec::new());
        let mut after = Files(Vec::new());
        for (i, (name, text)) in sections.iter().copied().enumerate() {
            before.put(name, text);
            let cut = text.rfind("- addresses:").map_or(text.clone(), |cut| {
                let end = text[cut..].find('\n').map_or(text.len(), |n| cut + n + 1);
                format!("{}{}", &text[..cut], &text[end..])
            });
            if i > 0 {
                after.put(name, &cut);
            }
        }
        let (before, after) = (before.objects(), after.objects());
        let (wanted, _) = fresh(&after, &moved);
        let attempts = |fail: Option<usize>| {
            let mut pipeline = Pipeline::new(&node.name, Adopted::default(), Config::default());
            let mut maps = FailingMaps::default();
            assert_eq!(pipeline.sync(&before, &node, &mut maps).failed, 0);
            let start = maps.attempts();
            let logged = maps.maps.log.len();
            let (epoch, backends) = (maps.maps.epoch, maps.maps.entries.backends.clone());
            if let Some(k) = fail {
                maps.fail_in(k);
                let synced = pipeline.sync(&after, &moved, &mut maps);
                assert!(
                    synced.failed > 0,
                    "{case}: attempt {k} failed, none reported"
                );
                assert_eq!(
                    &maps.maps.entries,
                    pipeline.programmed(),
                    "{case}: attempt {k}"
                );
                if let Err(e) = consistent(&maps.maps.entries) {
                    panic!("{case}: attempt {k} failed and left {e}");
                }
            }
            let synced = pipeline.sync(&after, &moved, &mut maps);
            assert_eq!(synced.failed, 0, "{case}: {fail:?}, the retry");
            assert_eq!(
                maps.maps.config.map(|c| c.snat_addr_be),
                Some(ipv4_be(moved_to)),
                "{case}: {fail:?}, the config"
            );
            // The datapath is told of deletions after them: an epoch after the last one.
            let since = &maps.maps.log[logged..];
            if let Some(last_delete) = since
                .iter()
                .rposition(|w| matches!(w, Written::Op(Op::DeleteBackend(..))))
            {
                assert!(
                    since[last_delete..].contains(&Written::Epoch),
                    "{case}: {fail:?}, no epoch after the last deletion"
                );
            }
            assert_eq!(
                maps.maps.entries.table(&std::collections::BTreeMap::new()),
                wanted.table(&std::collections::BTreeMap::new()),
                "{case}: {fail:?}, the retry"
            );
            assert_eq!(
                maps.maps.entries.vips, wanted.vips,
                "{case}: {fail:?}, vips"
            );
            // Backends deleted: the datapath is told, after the deletions.
            let removed = backends
                .keys()
                .any(|id| !maps.maps.entries.backends.contains_key(id));
            assert_eq!(
                maps.maps.epoch > epoch,
                removed,
                "{case}: {fail:?}, the epoch"
            );
            maps.attempts() - start
        };
        let clean = attempts(None);
        for k in 0..clean {
            attempts(Some(k));
        }
    }
}
