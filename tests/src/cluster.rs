//! A lab of several nodes: three node namespaces on one segment (a bridge in a `net`
//! namespace), each routing its own pod CIDR and running its own agent, and a client outside
//! the cluster on the same segment. The manifests are `tests/cluster/`.
//!
//! | node   | address  | zone   | pods (pod CIDR 10.244.N.0/24)      |
//! |--------|----------|--------|------------------------------------|
//! | node-a | 10.0.0.1 | zone-1 | client-a .2, a1 .11                 |
//! | node-b | 10.0.0.2 | zone-2 | client-b .2, b1 .11                 |
//! | node-c | 10.0.0.3 | zone-2 | c1 .11                              |
//!
//! The outside client is 10.0.0.100 and routes the external IP 203.0.113.10 to node-a and the
//! load-balancer IP 203.0.113.20 to node-b (and their IPv6 twins the same), as a router
//! announcing them would.
//!
//! Dual-stack: every address has its IPv6 twin ([`ipv6_twin`]: node-a is `fd00::10:0:0:1` on
//! the segment's `fd00::10:0:0:0/112`, a1 `fd00::10:244:1:11` in node-a's
//! `fd00::10:244:1:0/112`), the nodes forward IPv6 and route each other's pod prefixes of both
//! families. Addresses are used at once: the lab gives each once, no duplicate detection.

use std::{
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command},
    thread,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    BPFFS, POLL, READYZ, WAIT, binary, copy_manifests, dies_with_parent, ipv6_twin, output,
    remove_pins, run, start_server, stop_agent, tear_down, wire_pod,
};

pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);

struct NodeSpec {
    name: &'static str,
    address: Ipv4Addr,
    /// The third octet of its pod CIDR.
    subnet: u8,
    /// `(pod, serves)`: clients do not run a server.
    pods: &'static [(&'static str, u8, bool)],
}

const NODES: [NodeSpec; 3] = [
    NodeSpec {
        name: "node-a",
        address: Ipv4Addr::new(10, 0, 0, 1),
        subnet: 1,
        pods: &[("client-a", 2, false), ("a1", 11, true)],
    },
    NodeSpec {
        name: "node-b",
        address: Ipv4Addr::new(10, 0, 0, 2),
        subnet: 2,
        pods: &[("client-b", 2, false), ("b1", 11, true)],
    },
    NodeSpec {
        name: "node-c",
        address: Ipv4Addr::new(10, 0, 0, 3),
        subnet: 3,
        pods: &[("c1", 11, true)],
    },
];

/// The routes the outside client's router would announce: (address, node address).
const OUTSIDE_ROUTES: [(Ipv4Addr, Ipv4Addr); 2] = [
    (Ipv4Addr::new(203, 0, 113, 10), Ipv4Addr::new(10, 0, 0, 1)),
    (Ipv4Addr::new(203, 0, 113, 20), Ipv4Addr::new(10, 0, 0, 2)),
];

pub struct ClusterLab {
    pub prefix: String,
    pub manifests: tempfile::TempDir,
    namespaces: Vec<String>,
    servers: Vec<Child>,
    agents: Vec<(String, Child)>,
    lb_user: PathBuf,
}

impl ClusterLab {
    /// Builds the lab and starts an agent on every node, XDP in `xdp_mode`.
    pub fn up(tag: &str, xdp_mode: &str) -> Result<Self> {
        let prefix = format!("lb{}-{tag}", std::process::id());
        let manifests = copy_manifests("tests/cluster")?;
        let mut lab = Self {
            prefix,
            manifests,
            namespaces: Vec::new(),
            servers: Vec::new(),
            agents: Vec::new(),
            lb_user: binary("LB_USER_BIN")?,
        };
        lab.wire().context("building the cluster lab")?;
        let demoapp = binary("LB_DEMOAPP_BIN")?;
        for node in &NODES {
            for &(pod, _, serves) in node.pods {
                if serves {
                    start_server(&demoapp, pod, &lab.pod_namespace(pod), &mut lab.servers)?;
                }
            }
        }
        for node in &NODES {
            lab.start_agent(node, xdp_mode)?;
        }
        Ok(lab)
    }

    fn namespace(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn pod_namespace(&self, pod: &str) -> String {
        self.namespace(pod)
    }

    fn add_namespace(&mut self, name: &str) -> Result<String> {
        let namespace = self.namespace(name);
        run(Command::new("ip").args(["netns", "add", &namespace]))?;
        self.namespaces.push(namespace.clone());
        run(Command::new("ip").args(["-n", &namespace, "link", "set", "lo", "up"]))?;
        Ok(namespace)
    }

    fn wire(&mut self) -> Result<()> {
        let net = self.add_namespace("net")?;
        let ip = |ns: &str, args: &[&str]| run(Command::new("ip").args(["-n", ns]).args(args));
        ip(&net, &["link", "add", "br0", "type", "bridge"])?;
        ip(&net, &["link", "set", "br0", "up"])?;
        // One port on the segment per node and for the outside client.
        let mut hosts: Vec<(String, Ipv4Addr)> = NODES
            .iter()
            .map(|n| (n.name.to_string(), n.address))
            .collect();
        hosts.push(("outside".into(), OUTSIDE_IP));
        for (index, (host, address)) in hosts.iter().enumerate() {
            let namespace = self.add_namespace(host)?;
            let port = format!("p{index}");
            ip(
                &net,
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                    &namespace,
                ],
            )?;
            ip(&net, &["link", "set", &port, "master", "br0", "up"])?;
            // A veth takes the frames its peer's native XDP sends back (XDP_TX) only with NAPI
            // on, which GRO turns on; a NIC would transmit them itself. Frames leave the
            // segment with full checksums, as on a wire: a veth would hand the node's XDP a
            // checksum the kernel is yet to finish (CHECKSUM_PARTIAL), which no NIC does.
            run(Command::new("ip").args([
                "netns", "exec", &net, "ethtool", "-K", &port, "gro", "on", "tx", "off",
            ]))?;
            ip(
                &namespace,
                &["addr", "add", &format!("{address}/24"), "dev", "eth0"],
            )?;
            let address6 = format!("{}/112", ipv6_twin(*address));
            ip(
                &namespace,
                &["-6", "addr", "add", &address6, "dev", "eth0", "nodad"],
            )?;
            ip(&namespace, &["link", "set", "eth0", "up"])?;
            // Frames carry full checksums, as on a wire: the XDP program updates them.
            no_checksum_offload(&namespace)?;
        }
        let outside = self.namespace("outside");
        for (address, via) in OUTSIDE_ROUTES {
            let twins = (ipv6_twin(address).to_string(), ipv6_twin(via).to_string());
            for (address, via) in [(address.to_string(), via.to_string()), twins] {
                ip(&outside, &["route", "add", &address, "via", &via])?;
            }
        }
        for node in &NODES {
            let namespace = self.namespace(node.name);
            run(Command::new("ip")
                .args(["netns", "exec", &namespace, "sysctl", "-qw"])
                .args([
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                    "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.conf.eth0.send_redirects=0",
                    "net.ipv6.conf.all.forwarding=1",
                ]))?;
            for other in NODES.iter().filter(|o| o.subnet != node.subnet) {
                let cidr = format!("10.244.{}.0/24", other.subnet);
                ip(
                    &namespace,
                    &["route", "add", &cidr, "via", &other.address.to_string()],
                )?;
                let cidr6 = format!("{}/112", ipv6_twin(Ipv4Addr::new(10, 244, other.subnet, 0)));
                let via6 = ipv6_twin(other.address).to_string();
                ip(&namespace, &["-6", "route", "add", &cidr6, "via", &via6])?;
            }
            for (index, &(pod, last, _)) in node.pods.iter().enumerate() {
                let pod_namespace = self.add_namespace(pod)?;
                let address = Ipv4Addr::new(10, 244, node.subnet, last);
                wire_pod(&namespace, pod, &pod_namespace, address, index)?;
                no_checksum_offload(&pod_namespace)?;
            }
        }
        Ok(())
    }

    fn start_agent(&mut self, node: &NodeSpec, xdp_mode: &str) -> Result<()> {
        let instance = format!("{}-{}", self.prefix, node.name);
        let log = self.agent_log(node.name);
        let child = dies_with_parent(&mut Command::new("nsenter"))
            .arg(format!("--net=/run/netns/{}", self.namespace(node.name)))
            .arg("--")
            .arg(&self.lb_user)
            .args([
                "run",
                "--node",
                node.name,
                "--interfaces",
                "v-*",
                "--uplinks",
                "eth0",
            ])
            .args(["--xdp-mode", xdp_mode, "--instance", &instance])
            .args(["--poll-interval-ms", "50", "--manifests"])
            .arg(self.manifests.path())
            .stdout(fs::File::create(&log)?)
            .stderr(fs::OpenOptions::new().append(true).open(&log)?)
            .spawn()
            .context("starting lb-user")?;
        self.agents.push((node.name.to_string(), child));
        let start = Instant::now();
        while start.elapsed() < WAIT {
            let readyz = Command::new("ip")
                .args(["netns", "exec", &self.namespace(node.name)])
                .args(["curl", "-sf", "--max-time", "1", READYZ])
                .output()?;
            if readyz.status.success() {
                return Ok(());
            }
            let text = fs::read_to_string(&log).unwrap_or_default();
            if let Some((_, agent)) = self.agents.last_mut()
                && let Ok(Some(status)) = agent.try_wait()
            {
                bail!("the agent on {} exited ({status}):\n{text}", node.name);
            }
            thread::sleep(POLL);
        }
        bail!(
            "the agent on {} is not ready:\n{}",
            node.name,
            fs::read_to_string(&log)?
        )
    }

    fn agent_log(&self, node: &str) -> PathBuf {
        self.manifests.path().with_extension(format!("{node}.log"))
    }

    /// A command in the network namespace of pod or node `pod`, pinned to CPU 0.
    pub fn in_pod(&self, pod: &str, command: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.pod_namespace(pod),
            "taskset",
            "-c",
            "0",
        ])
        .args(command);
        cmd
    }

    /// A command on the client outside the cluster, pinned to CPU 0.
    pub fn outside(&self, command: &[&str]) -> Command {
        self.in_pod("outside", command)
    }

    /// `curl` with `cmd` prefixed (a pod or the outside client); the body.
    pub fn curl(&self, mut cmd: Command) -> Result<String> {
        output(&mut cmd)
    }

    /// `lb-user dump` of a node's agent.
    pub fn dump(&self, node: &str) -> Result<String> {
        let instance = format!("{}-{node}", self.prefix);
        output(Command::new(&self.lb_user).args([
            "dump",
            "--instance",
            &instance,
            "--bpffs",
            BPFFS,
        ]))
    }

    /// The agent logs, for failure messages.
    pub fn logs(&self) -> String {
        NODES
            .iter()
            .map(|n| {
                format!(
                    "--- {}\n{}",
                    n.name,
                    fs::read_to_string(self.agent_log(n.name)).unwrap_or_default()
                )
            })
            .collect()
    }
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        let agents: Vec<(String, Child)> = self.agents.drain(..).collect();
        for (node, agent) in agents {
            stop_agent(agent);
            let instance = format!("{}-{node}", self.prefix);
            remove_pins(&instance);
            let _ = fs::remove_file(self.agent_log(&node));
        }
        tear_down(&mut self.servers, &mut self.namespaces);
    }
}

/// Frames leave `namespace`'s eth0 with their checksums filled in, as a NIC would send them.
fn no_checksum_offload(namespace: &str) -> Result<()> {
    run(Command::new("ip").args([
        "netns", "exec", namespace, "ethtool", "-K", "eth0", "tx", "off",
    ]))
}
