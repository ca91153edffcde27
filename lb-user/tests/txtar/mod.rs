//! The golden cases, `tests/golden/*.txtar`: a header (the script), then sections
//! (`-- name --`) of Kubernetes objects (`*.yaml`, `*.json`) and of expectations.

use std::{
    fs,
    path::{Path, PathBuf},
};

pub struct Case {
    pub path: PathBuf,
    pub header: String,
    pub sections: Vec<(String, String)>,
}

// Each test crate that includes this module uses part of it.
#[allow(
    dead_code,
    reason = "the golden and the incremental tests use different parts"
)]
impl Case {
    pub fn read(path: &Path) -> Self {
        let text = fs::read_to_string(path).unwrap();
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
        Self {
            path: path.to_path_buf(),
            header,
            sections,
        }
    }

    /// The node the case is computed for, named in the script as `node NAME`; by default the
    /// lab's.
    pub fn node(&self) -> &str {
        self.header
            .lines()
            .find_map(|l| l.strip_prefix("node "))
            .unwrap_or("lab-node")
            .trim()
    }

    pub fn section(&self, name: &str) -> Option<&str> {
        self.sections
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, body)| body.as_str())
    }

    pub fn section_mut(&mut self, name: &str) -> Option<&mut String> {
        self.sections
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, body)| body)
    }

    /// The sections that hold objects.
    #[expect(
        clippy::case_sensitive_file_extension_comparisons,
        reason = "section names are the cases' own, in lower case"
    )]
    pub fn manifests(&self) -> impl Iterator<Item = &(String, String)> {
        self.sections
            .iter()
            .filter(|(name, _)| name.ends_with(".yaml") || name.ends_with(".json"))
    }
}

/// Every case, sorted by file name.
pub fn cases() -> Vec<Case> {
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
    paths.iter().map(|p| Case::read(p)).collect()
}
