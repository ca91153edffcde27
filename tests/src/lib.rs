//! The lab: a node, a client pod and three backend pods, each its own network namespace, wired
//! the way a routed CNI wires them (a veth per pod, a /32 route per pod on the node, the pod's
//! default route through a link-local gateway), with the agent running in the node.
//!
//! `cargo xtask run` and the lab tests share it. Every name carries the lab's unique prefix,
//! every wait is bounded, and `Drop` tears everything down, also on panic.

use std::{
    env,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};

pub mod apiserver;
mod clients;
pub mod cluster;
mod lab;
pub mod packet;
mod plumbing;
mod process;

pub use self::{
    clients::{
        COUNTER_LINES, Connection, UPLOAD, client_of, df_datagrams, pod_of, reversed_fragments,
        stat, udp_exchange, udp_query, upload,
    },
    lab::{Lab, Pod},
    process::output,
};
pub(crate) use self::{
    plumbing::{copy_manifests, remove_pins, start_server, stop_agent, tear_down, wire_pod},
    process::{dies_with_parent, read_line_within, run, wait_output, wait_within},
};

/// The node name in `deploy/examples`.
pub const NODE_NAME: &str = "lab-node";
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
/// The node's own address: the source of its connections to pods.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The backend pods of `deploy/examples`, by name and address.
pub const BACKENDS: [(&str, Ipv4Addr); 3] = [
    ("demo-1", Ipv4Addr::new(10, 244, 0, 11)),
    ("demo-2", Ipv4Addr::new(10, 244, 0, 12)),
    ("demo-3", Ipv4Addr::new(10, 244, 0, 13)),
];
/// The gateway every pod routes through; the node answers for it on each pod's veth.
pub(crate) const GATEWAY: &str = "169.254.1.1";
/// The same over IPv6: a link-local address, as Calico's.
pub(crate) const GATEWAY6: &str = "fe80::1";

/// The lab's IPv6 address of the host whose IPv4 address is `ip`, in the ULA prefix `fd00::/64`:
/// the four numbers of `ip`, as written, are its last four groups (10.244.0.11 is
/// `fd00::10:244:0:11`), so that one reads as the other.
pub const fn ipv6_twin(ip: Ipv4Addr) -> Ipv6Addr {
    // The number's decimal digits, as hexadecimal ones.
    const fn group(n: u8) -> u16 {
        let n = n as u16;
        (n / 100) << 8 | (n / 10 % 10) << 4 | (n % 10)
    }
    let [a, b, c, d] = ip.octets();
    Ipv6Addr::new(0xfd00, 0, 0, 0, group(a), group(b), group(c), group(d))
}
pub(crate) const BPFFS: &str = "/sys/fs/bpf";
pub(crate) const WAIT: Duration = Duration::from_secs(20);
pub(crate) const POLL: Duration = Duration::from_millis(50);
/// The agent's readiness, as seen from its node.
pub const READYZ: &str = "http://127.0.0.1:10256/readyz";
/// The soft limit on open files the lab starts its agents with.
pub const SOFT_FILE_LIMIT: u64 = 1024;

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// A built binary: from `$var`, set by `cargo xtask`.
pub fn binary(var: &str) -> Result<PathBuf> {
    let path = env::var_os(var)
        .map(PathBuf::from)
        .with_context(|| format!("{var} is not set: run the lab through `cargo xtask`"))?;
    ensure!(path.exists(), "{var}={} does not exist", path.display());
    Ok(path)
}
