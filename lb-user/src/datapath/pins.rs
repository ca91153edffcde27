//! The instance's pins: which of an earlier agent's maps and links can be adopted, the kernel
//! memory the maps hold, and their removal.

use std::{
    fs, io,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::Path,
};

use aya::maps::{MapData, MapInfo};
use lb_common::maps;
use tracing::{info, warn};

use super::{
    error::{Error, Result, at},
    links,
};

/// The kernel memory each map pinned under `pin_dir` holds, in bytes: its `memlock`, as
/// `bpftool map show` prints it, which counts a hash map's entries as they are written.
pub fn kernel_memory(pin_dir: &Path) -> Result<Vec<(&'static str, u64)>> {
    maps::ALL
        .iter()
        .map(|&name| {
            let path = pin_dir.join(name);
            let map = MapData::from_pin(&path).map_err(|source| Error::PinnedMap {
                path: path.clone(),
                source,
            })?;
            let fdinfo = format!("/proc/self/fdinfo/{}", map.fd().as_fd().as_raw_fd());
            let text = fs::read_to_string(&fdinfo).map_err(at("reading", &fdinfo))?;
            let memlock = text
                .lines()
                .find_map(|line| line.strip_prefix("memlock:"))
                .and_then(|value| value.trim().parse().ok())
                .unwrap_or(0);
            Ok((name, memlock))
        })
        .collect()
}

/// The link pinned at `path`, if it is still attached to `target` (a link whose interface was
/// deleted is attached to nothing).
pub(super) fn adoptable(path: &Path, target: u64) -> Result<Option<OwnedFd>> {
    let link = match links::open_pinned(path) {
        Ok(link) => link,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(at("opening", path)(e)),
    };
    let info = links::info(link.as_fd()).map_err(at("reading", path))?;
    Ok((info.target == target).then_some(link))
}

/// Removes the pinned maps whose type, key, value, capacity or flags differ from `object`'s,
/// and those `object` no longer has (a layout bumped to a new `_vN` name), saying why: the
/// loader would otherwise reuse a map the new programs misread.
pub(super) fn drop_incompatible_maps(object: &[u8], pin_dir: &Path) -> Result<()> {
    let parsed = aya_obj::Object::parse(object).map_err(Error::Parse)?;
    for entry in fs::read_dir(pin_dir).map_err(at("reading", pin_dir))? {
        let entry = entry.map_err(at("reading", pin_dir))?;
        if entry
            .file_type()
            .map_err(at("reading", entry.path()))?
            .is_dir()
        {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let Some(wanted) = parsed
            .maps
            .get(&name)
            .filter(|_| maps::ALL.contains(&name.as_str()))
        else {
            warn!(
                map = name,
                "removing a pinned map this build does not have: its state is not carried over"
            );
            remove_if_present(&path)?;
            continue;
        };
        let pinned = MapInfo::from_pin(&path).map_err(|source| Error::PinnedMap {
            path: path.clone(),
            source,
        })?;
        let layout = |map_type, key, value, entries, flags| {
            format!(
                "type {map_type}, key {key} B, value {value} B, {entries} entries, flags {flags:#x}"
            )
        };
        let old = layout(
            pinned.map_type().map_or(u32::MAX, |t| t as u32),
            pinned.key_size(),
            pinned.value_size(),
            pinned.max_entries(),
            pinned.map_flags(),
        );
        let new = layout(
            wanted.map_type(),
            wanted.key_size(),
            wanted.value_size(),
            wanted.max_entries(),
            wanted.map_flags(),
        );
        if old == new {
            info!(map = name, "adopting the pinned map");
        } else {
            warn!(
                map = name,
                pinned = old,
                this_build = new,
                "the pinned map's layout differs from this build's: starting it empty, its state is lost"
            );
            remove_if_present(&path)?;
        }
    }
    Ok(())
}

pub(super) fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(at("removing", path)(e)),
        _ => Ok(()),
    }
}

/// Removes everything an instance pinned: its links (which detaches its programs), programs
/// and maps.
pub fn remove_pins(pin_dir: &Path) -> Result<()> {
    match fs::remove_dir_all(pin_dir) {
        Ok(()) => {
            // The last instance out leaves no empty <bpffs>/lb behind; with others, this fails.
            if let Some(parent) = pin_dir.parent() {
                let _ = fs::remove_dir(parent);
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(at("removing", pin_dir)(e)),
    }
}
