//! Golden tests in the style of Cilium's: each `tests/golden/*.txtar` holds Kubernetes objects
//! (sections named `*.yaml` or `*.json`), the map entries the agent writes for them (`maps`) and
//! what it skips (`skipped`), compared as text. `UPDATE_GOLDEN=1` rewrites the expectations.

use std::{fs, path::Path};

use lb_user::{
    model::{self, Objects},
    plan::{self, Ids},
    sources::manifests,
};

struct Case {
    header: String,
    sections: Vec<(String, String)>,
}

fn parse_txtar(text: &str) -> Case {
    let mut header = String::new();
    let mut sections: Vec<(String, String)> = Vec::new();
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_end();
        if let Some(name) = trimmed
            .strip_prefix("-- ")
            .and_then(|rest| rest.strip_suffix(" --"))
        {
            sections.push((name.to_string(), String::new()));
        } else if let Some((_, body)) = sections.last_mut() {
            body.push_str(line);
        } else {
            header.push_str(line);
        }
    }
    Case { header, sections }
}

fn render(case: &Case) -> String {
    let mut out = case.header.clone();
    for (name, body) in &case.sections {
        out.push_str(&format!("-- {name} --\n{body}"));
    }
    out
}

fn run_case(path: &Path) -> Result<(), String> {
    let text = fs::read_to_string(path).unwrap();
    let mut case = parse_txtar(&text);
    let mut objects = Objects::default();
    let mut skipped = Vec::new();
    for (name, body) in &case.sections {
        if name.ends_with(".yaml") || name.ends_with(".json") {
            manifests::parse(name, body, &mut objects, &mut skipped);
        }
    }
    // The node is named in the header as `# node: NAME`; by default the lab's.
    let node = case
        .header
        .lines()
        .find_map(|l| l.strip_prefix("# node: "))
        .unwrap_or("lab-node");
    let node = node.trim();
    let desired = model::compute(&objects, &model::NodeConfig::new(node));
    skipped.extend(desired.skipped);
    let (entries, more) = plan::entries(&mut Ids::default(), &desired.frontends, node);
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
        fs::write(path, render(&case)).unwrap();
        return Ok(());
    }
    Err(failures.join("\n"))
}

#[test]
fn golden() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden");
    let mut paths: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txtar"))
        .collect();
    paths.sort();
    assert!(
        paths.len() >= 4,
        "golden cases missing in {}",
        dir.display()
    );
    let failures: Vec<String> = paths.iter().filter_map(|p| run_case(p).err()).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
