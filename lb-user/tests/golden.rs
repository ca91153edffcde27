//! Golden scripts in the style of Cilium's `pkg/loadbalancer` tests: each `tests/golden/*.txtar`
//! is a script (its header) over sections of Kubernetes objects (`*.yaml`, `*.json`) and of
//! expectations. The script's steps change the objects as the API would and sync the agent's
//! own pipeline over maps in memory, so that behaviour over several syncs (a scale-down, a
//! terminating fallback, a Service deleted) is tested without a kernel:
//!
//! - `# ...`: a comment;
//! - `node NAME`: the node the agent runs on (before the first step; the lab's by default);
//! - `add SECTION...`: the objects of the sections, created or replacing those of the same
//!   kind, namespace and name (an update);
//! - `delete SECTION...`: the objects of the same kind, namespace and name as the sections';
//! - `maps SECTION`: a sync, then the maps' dump must be the section;
//! - `maps-empty`: a sync, then the maps must be empty;
//! - `skipped SECTION`: what the last sync and the adds before it left out must be the
//!   section.
//!
//! `UPDATE_GOLDEN=1` rewrites the expectations.

mod txtar;

use std::{fs, sync::Arc};

use k8s_openapi::Metadata;
use lb_common::maps::Config;
use lb_user::{
    maps::memory::MemoryMaps,
    model::{NodeConfig, Objects, Skipped},
    plan::MapEntries,
    sources::manifests,
    sync::{Adopted, Pipeline},
};
use txtar::Case;

/// The objects as the API server holds them: one per kind, namespace and name.
#[derive(Default)]
struct Store(Objects);

impl Store {
    fn add(&mut self, new: Objects) {
        upsert(&mut self.0.services, new.services);
        upsert(&mut self.0.endpoint_slices, new.endpoint_slices);
        upsert(&mut self.0.endpoints, new.endpoints);
        upsert(&mut self.0.nodes, new.nodes);
    }

    fn delete(&mut self, gone: &Objects) {
        remove(&mut self.0.services, &gone.services);
        remove(&mut self.0.endpoint_slices, &gone.endpoint_slices);
        remove(&mut self.0.endpoints, &gone.endpoints);
        remove(&mut self.0.nodes, &gone.nodes);
    }
}

fn key<T: Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>>(
    object: &T,
) -> (Option<String>, Option<String>) {
    let meta = object.metadata();
    (meta.namespace.clone(), meta.name.clone())
}

fn upsert<T>(list: &mut Vec<Arc<T>>, new: Vec<Arc<T>>)
where
    T: Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
{
    for object in new {
        match list
            .iter_mut()
            .find(|o| key(o.as_ref()) == key(object.as_ref()))
        {
            Some(old) => *old = object,
            None => list.push(object),
        }
    }
}

fn remove<T>(list: &mut Vec<Arc<T>>, gone: &[Arc<T>])
where
    T: Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
{
    list.retain(|o| !gone.iter().any(|g| key(g.as_ref()) == key(o.as_ref())));
}

fn render(case: &Case) -> String {
    let mut out = case.header.clone();
    for (name, body) in &case.sections {
        out.push_str(&format!("-- {name} --\n{body}"));
    }
    out
}

/// What a script's run found wrong.
#[derive(Default)]
struct Failures {
    /// Expectations that differ, each set right in the case for `UPDATE_GOLDEN`.
    expected: Vec<String>,
    /// What no rewrite sets right: maps left where none should be, a section no step names, a
    /// script that checks nothing.
    script: Vec<String>,
}

/// Runs the script of `case`.
fn run_script(case: &mut Case) -> Failures {
    let where_ = case.path.display().to_string();
    let node = NodeConfig::new(case.node());
    let mut pipeline = Pipeline::new(&node.name, Adopted::default(), Config::default());
    let mut maps = MemoryMaps::default();
    let mut store = Store::default();
    let mut parsed_skipped: Vec<Skipped> = Vec::new();
    let mut last_skipped = String::new();
    let mut failures = Failures::default();
    let mut named: Vec<String> = Vec::new();
    let mut checks = 0;
    let script: Vec<String> = case.header.lines().map(str::to_string).collect();
    for (number, line) in script.iter().enumerate() {
        let step = format!("{where_}:{}: {line}", number + 1);
        let mut words = line.split_whitespace();
        let Some(command) = words.next().filter(|w| !w.starts_with('#')) else {
            continue;
        };
        let args: Vec<&str> = words.collect();
        named.extend(args.iter().map(ToString::to_string));
        let objects = |skipped: &mut Vec<Skipped>| {
            let mut objects = Objects::default();
            for name in &args {
                let body = case
                    .section(name)
                    .unwrap_or_else(|| panic!("{step}: no section {name}"));
                manifests::parse(name, body, &mut objects, skipped);
            }
            objects
        };
        let mut sync = |store: &Store, parsed_skipped: &mut Vec<Skipped>| {
            let synced = pipeline.sync(&store.0, &node, &mut maps);
            assert_eq!(synced.failed, 0, "{step}: writes failed in memory");
            last_skipped = parsed_skipped
                .drain(..)
                .chain(pipeline.skipped())
                .map(|s| format!("{s}\n"))
                .collect();
        };
        match command {
            "node" => {}
            "add" => store.add(objects(&mut parsed_skipped)),
            "delete" => store.delete(&objects(&mut Vec::new())),
            "maps" | "skipped" => {
                checks += 1;
                let [section] = args[..] else {
                    panic!("{step}: one section expected");
                };
                let actual = if command == "maps" {
                    sync(&store, &mut parsed_skipped);
                    maps.entries.dump()
                } else {
                    last_skipped.clone()
                };
                match case.section_mut(section) {
                    Some(body) if *body == actual => {}
                    Some(body) => {
                        failures.expected.push(format!(
                            "{step}: differs\n--- expected\n{body}--- actual\n{actual}"
                        ));
                        body.clone_from(&actual);
                    }
                    None => {
                        failures
                            .expected
                            .push(format!("{step}: no section {section}"));
                        case.sections.push((section.to_string(), actual));
                    }
                }
            }
            "maps-empty" => {
                checks += 1;
                sync(&store, &mut parsed_skipped);
                if maps.entries != MapEntries::default() {
                    failures
                        .script
                        .push(format!("{step}: left\n{}", maps.entries.dump()));
                }
            }
            other => panic!("{step}: no command {other}"),
        }
    }
    if checks == 0 {
        failures
            .script
            .push(format!("{where_}: the script checks nothing"));
    }
    for (name, _) in &case.sections {
        if !named.contains(name) {
            failures
                .script
                .push(format!("{where_}: no step names the section {name}"));
        }
    }
    failures
}

#[test]
fn golden() {
    let mut failures = Vec::new();
    for mut case in txtar::cases() {
        let failed = run_script(&mut case);
        failures.extend(failed.script);
        if failed.expected.is_empty() {
            continue;
        }
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            fs::write(&case.path, render(&case)).unwrap();
        } else {
            failures.extend(failed.expected);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
