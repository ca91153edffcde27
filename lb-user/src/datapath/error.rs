//! What can go wrong loading, pinning and attaching the datapath, each naming the program, the
//! path or the interface it was about.

use std::{io, path::PathBuf};

use aya::{
    EbpfError,
    pin::PinError,
    programs::{ProgramError, links::LinkError},
};

use crate::maps;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file, a directory or a pin: what was done to which path.
    #[error("{action} {}", .path.display())]
    Path {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A system call about an interface, a socket or a link.
    #[error("{action}")]
    Os {
        action: String,
        #[source]
        source: io::Error,
    },
    /// A program of the object: loading, pinning or attaching it.
    #[error("{action}")]
    Program {
        action: String,
        #[source]
        source: ProgramError,
    },
    #[error("{action}")]
    Link {
        action: String,
        #[source]
        source: LinkError,
    },
    #[error("pinning at {}", .path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: PinError,
    },
    #[error("reading the pinned map {}", .path.display())]
    PinnedMap {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the eBPF object has no {kind} {name}: lb-common and lb-ebpf disagree")]
    Missing { kind: &'static str, name: String },
    #[error("parsing the eBPF object")]
    Parse(#[source] aya_obj::ParseError),
    #[error("loading the eBPF object")]
    Load(#[source] EbpfError),
    #[error(transparent)]
    Maps(#[from] maps::Error),
    #[error("another agent runs this instance ({}): stop it first", .0.display())]
    Locked(PathBuf),
    #[error("{interface}: the name is longer than an interface name can be")]
    NameTooLong { interface: String },
    #[error("{interface} is not an Ethernet device (type {family}): the datapath cannot parse it")]
    NotEthernet { interface: String, family: u16 },
    #[error("no cgroup v2 at {0}: give --cgroup")]
    NoCgroup2(String),
    /// Interfaces that could not be attached, each with why; the others were.
    #[error("{}", .0.join("; "))]
    Interfaces(Vec<String>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Names `path` and what was done to it in an I/O error.
pub fn at(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
    let path = path.into();
    move |source| Error::Path {
        action,
        path,
        source,
    }
}

/// Names the system call in an I/O error.
pub fn os(action: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let action = action.into();
    move |source| Error::Os { action, source }
}

/// Names what was done to a program in its error.
pub fn program(action: impl Into<String>) -> impl FnOnce(ProgramError) -> Error {
    let action = action.into();
    move |source| Error::Program { action, source }
}

/// Names what was done to a link in its error.
pub fn link(action: impl Into<String>) -> impl FnOnce(LinkError) -> Error {
    let action = action.into();
    move |source| Error::Link { action, source }
}

/// Names the pin in a pinning error.
pub fn pin(path: impl Into<PathBuf>) -> impl FnOnce(PinError) -> Error {
    let path = path.into();
    move |source| Error::Pin { path, source }
}
