//! Golden tests in the style of Cilium's: each `tests/golden/*.txtar` holds Kubernetes objects
//! (sections named `*.yaml` or `*.json`), the map entries the agent writes for them (`maps`) and
//! what it skips (`skipped`), compared as text. `UPDATE_GOLDEN=1` rewrites the expectations.

mod txtar;

use std::fs;

use lb_user::{
    model::{self, Objects},
    plan,
    sources::manifests,
};
use txtar::Case;

fn render(case: &Case) -> String {
    let mut out = case.header.clone();
    for (name, body) in &case.sections {
        out.push_str(&format!("-- {name} --\n{body}"));
    }
    out
}

fn run_case(mut case: Case) -> Result<(), String> {
    let mut objects = Objects::default();
    let mut skipped = Vec::new();
    for (name, body) in case.manifests() {
        manifests::parse(name, body, &mut objects, &mut skipped);
    }
    let node = case.node().to_string();
    let node = node.as_str();
    let path = case.path.clone();
    let desired = model::compute(&objects, &model::NodeConfig::new(node));
    skipped.extend(desired.skipped);
    let (entries, more) = plan::entries(&desired.frontends, node);
    skipped.extend(more);
    let actual_maps = entries.dump();
    let actual_skipped: String = skipped.iter().map(|s| format!("{s}\n")).collect();

    let mut failures = Vec::new();
    for (section, actual) in [("maps", actual_maps), ("skipped", actual_skipped)] {
        match case.sections.iter_mut().find(|(name, _)| name == section) {
            Some((_, body)) if *body == actual => {}
            Some((_, body)) => {
                failures.push(format!(
                    "{}: section {section} differs\n--- expected\n{body}--- actual\n{actual}",
                    path.display()
                ));
                body.clone_from(&actual);
            }
            None => {
                failures.push(format!("{}: no section {section}", path.display()));
                case.sections.push((section.to_string(), actual));
            }
        }
    }
    if failures.is_empty() {
        return Ok(());
    }
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        fs::write(&path, render(&case)).unwrap();
        return Ok(());
    }
    Err(failures.join("\n"))
}

#[test]
fn golden() {
    let failures: Vec<String> = txtar::cases()
        .into_iter()
        .filter_map(|case| run_case(case).err())
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
