//! What the labs are built with: pods wired as a routed CNI wires them, servers started, agents stopped, everything torn down.

use std::{
    fs,
    net::Ipv4Addr,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};

use crate::{
    BPFFS, GATEWAY, GATEWAY6, WAIT, dies_with_parent, ipv6_twin, read_line_within, run,
    wait_within, workspace_root,
};

/// Removes what the agent `instance` pinned, and `<bpffs>/lb` when it was the last there.
pub(crate) fn remove_pins(instance: &str) {
    let lb = Path::new(BPFFS).join("lb");
    let _ = fs::remove_dir_all(lb.join(instance));
    let _ = fs::remove_dir(lb);
}

/// A temporary copy of a manifest directory of the workspace, for an agent to watch and a
/// test to edit.
pub(crate) fn copy_manifests(dir: &str) -> Result<tempfile::TempDir> {
    let copy = tempfile::tempdir()?;
    for entry in fs::read_dir(workspace_root().join(dir))? {
        let path = entry?.path();
        let name = path.file_name().context("file name")?;
        fs::copy(&path, copy.path().join(name))?;
    }
    Ok(copy)
}

/// SIGTERM lets an agent stop cleanly (its datapath stays pinned); SIGKILL if it does not within
/// 5 s.
pub(crate) fn stop_agent(mut agent: Child) {
    // SAFETY: a signal to a child this function owns (not reaped yet, so its pid is its own).
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    if wait_within(&mut agent, Duration::from_secs(5)).is_none() {
        let _ = agent.kill();
        let _ = agent.wait();
    }
}

/// Kills the servers and deletes the namespaces (their links go with them).
pub(crate) fn tear_down(servers: &mut Vec<Child>, namespaces: &mut Vec<String>) {
    for mut server in servers.drain(..) {
        let _ = server.kill();
        let _ = server.wait();
    }
    for namespace in namespaces.drain(..).rev() {
        let _ = Command::new("ip")
            .args(["netns", "del", &namespace])
            .status();
    }
}

/// Wires pod `name` (namespace `namespace`, address `ip`, the `index`th of its node) to node
/// namespace `node` as a routed CNI does: a veth, a /32 route on the node, the pod's default
/// route through a link-local gateway. Neighbours are static: nothing depends on ARP.
pub(crate) fn wire_pod(
    node: &str,
    name: &str,
    namespace: &str,
    ip: Ipv4Addr,
    index: usize,
) -> Result<()> {
    let host_if = format!("v-{name}");
    let host_mac = format!("02:00:00:00:01:{index:02x}");
    let pod_mac = format!("02:00:00:00:02:{index:02x}");
    let ip = ip.to_string();
    let node_ip = |args: &[&str]| run(Command::new("ip").args(["-n", node]).args(args));
    let pod_ip = |args: &[&str]| run(Command::new("ip").args(["-n", namespace]).args(args));
    node_ip(&[
        "link", "add", &host_if, "address", &host_mac, "type", "veth", "peer", "name", "eth0",
        "netns", namespace, "address", &pod_mac,
    ])?;
    node_ip(&["link", "set", &host_if, "up"])?;
    node_ip(&["route", "add", &format!("{ip}/32"), "dev", &host_if])?;
    node_ip(&[
        "neigh",
        "add",
        &ip,
        "lladdr",
        &pod_mac,
        "dev",
        &host_if,
        "nud",
        "permanent",
    ])?;
    pod_ip(&["link", "set", "eth0", "up"])?;
    pod_ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
    pod_ip(&["route", "add", GATEWAY, "dev", "eth0"])?;
    pod_ip(&["route", "add", "default", "via", GATEWAY, "dev", "eth0"])?;
    pod_ip(&[
        "neigh",
        "add",
        GATEWAY,
        "lladdr",
        &host_mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    // IPv6 alike, its address in use at once (no duplicate detection to wait for: the lab
    // gives each address once) and its neighbours written, so that no solicitation is needed.
    let ip6 = ipv6_twin(ip.parse().expect("an IPv4 address")).to_string();
    node_ip(&["-6", "route", "add", &format!("{ip6}/128"), "dev", &host_if])?;
    node_ip(&[
        "-6",
        "neigh",
        "add",
        &ip6,
        "lladdr",
        &pod_mac,
        "dev",
        &host_if,
        "nud",
        "permanent",
    ])?;
    pod_ip(&[
        "-6",
        "addr",
        "add",
        &format!("{ip6}/128"),
        "dev",
        "eth0",
        "nodad",
    ])?;
    pod_ip(&[
        "-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0",
    ])?;
    pod_ip(&[
        "-6",
        "neigh",
        "add",
        GATEWAY6,
        "lladdr",
        &host_mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])
}

/// Starts `demoapp` in a pod and waits until it listens.
pub(crate) fn start_server(
    demoapp: &Path,
    name: &str,
    namespace: &str,
    servers: &mut Vec<Child>,
) -> Result<()> {
    let mut child = dies_with_parent(&mut Command::new("ip"))
        .args(["netns", "exec", namespace])
        .arg(demoapp)
        .arg(name)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting demoapp")?;
    let stdout = child.stdout.take().context("demoapp stdout")?;
    servers.push(child);
    let line = read_line_within(stdout, WAIT)?;
    ensure!(line.trim() == "ready", "demoapp {name} said {line:?}");
    Ok(())
}
