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
/// namespace `node` as a routed CNI does: a veth, a host route of each family on the node (the
/// IPv6 one to the address's [`ipv6_twin`]), the pod's default routes through link-local
/// gateways. Neighbours are static: nothing depends on ARP or neighbour discovery.
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
    let (ip, ip6) = (ip.to_string(), ipv6_twin(ip).to_string());
    let node_ip = |args: &[&str]| run(Command::new("ip").args(["-n", node]).args(args));
    let pod_ip = |args: &[&str]| run(Command::new("ip").args(["-n", namespace]).args(args));
    node_ip(&[
        "link", "add", &host_if, "address", &host_mac, "type", "veth", "peer", "name", "eth0",
        "netns", namespace, "address", &pod_mac,
    ])?;
    node_ip(&["link", "set", &host_if, "up"])?;
    pod_ip(&["link", "set", "eth0", "up"])?;
    // Both families alike; an IPv6 address in use at once (no duplicate detection to wait
    // for: the lab gives each address once). Neighbours are written: no solicitation needed.
    let families: [(&str, &str, u8, &str, &[&str]); 2] = [
        ("-4", &ip, 32, GATEWAY, &[]),
        ("-6", &ip6, 128, GATEWAY6, &["nodad"]),
    ];
    for (family, address, prefix, gateway, options) in families {
        let host = format!("{address}/{prefix}");
        node_ip(&[family, "route", "add", &host, "dev", &host_if])?;
        node_ip(&neighbour(family, address, &pod_mac, &host_if))?;
        let mut add = vec![family, "addr", "add", &host, "dev", "eth0"];
        add.extend_from_slice(options);
        pod_ip(&add)?;
        pod_ip(&[family, "route", "add", gateway, "dev", "eth0"])?;
        pod_ip(&[
            family, "route", "add", "default", "via", gateway, "dev", "eth0",
        ])?;
        pod_ip(&neighbour(family, gateway, &host_mac, "eth0"))?;
    }
    Ok(())
}

/// `ip <family> neigh add <at> lladdr <mac> dev <dev> nud permanent`'s arguments.
fn neighbour<'a>(family: &'a str, at: &'a str, mac: &'a str, dev: &'a str) -> [&'a str; 10] {
    [
        family,
        "neigh",
        "add",
        at,
        "lladdr",
        mac,
        "dev",
        dev,
        "nud",
        "permanent",
    ]
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
