//! The single-node lab: its namespaces, pods and servers, and the agent it runs.

use std::{
    cell::RefCell,
    ffi::OsStr,
    fs,
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    BACKENDS, BPFFS, CLIENT_IP, Connection, NODE_IP, NODE_NAME, POLL, READYZ, SOFT_FILE_LIMIT,
    WAIT, binary, copy_manifests, dies_with_parent, ipv6_twin, output, remove_pins, run,
    start_server, stop_agent, tear_down, udp_query, wire_pod,
};

pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub ip: Ipv4Addr,
}

pub struct Lab {
    pub prefix: String,
    pub node: String,
    pub client: Pod,
    pub backends: Vec<Pod>,
    /// A copy of `deploy/examples` that the agent watches and tests may edit.
    pub manifests: tempfile::TempDir,
    /// A command the agent runs under, in the node (`setpriv` with a container's capability
    /// sets, say); empty: none.
    pub agent_wrapper: Vec<String>,
    servers: Vec<Child>,
    agent: RefCell<Option<Child>>,
    namespaces: Vec<String>,
    lb_user: PathBuf,
}

impl Lab {
    /// Builds the lab; `tag` makes its names unique (with the process id).
    pub fn up(tag: &str) -> Result<Self> {
        let prefix = format!("lb{}-{tag}", std::process::id());
        let manifests = copy_manifests("deploy/examples")?;
        let pod = |name: &str, ip| Pod {
            name: name.to_string(),
            namespace: format!("{prefix}-{name}"),
            ip,
        };
        let mut lab = Self {
            node: format!("{prefix}-node"),
            client: pod("client", CLIENT_IP),
            backends: BACKENDS.iter().map(|&(name, ip)| pod(name, ip)).collect(),
            prefix: prefix.clone(),
            manifests,
            agent_wrapper: Vec::new(),
            servers: Vec::new(),
            agent: RefCell::new(None),
            namespaces: Vec::new(),
            lb_user: binary("LB_USER_BIN")?,
        };
        // From here on, Drop cleans up whatever was made.
        lab.wire().context("building the lab's namespaces")?;
        lab.start_servers(&binary("LB_DEMOAPP_BIN")?)?;
        Ok(lab)
    }

    fn add_namespace(&mut self, name: &str) -> Result<()> {
        run(Command::new("ip").args(["netns", "add", name]))?;
        self.namespaces.push(name.to_string());
        run(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]))
    }

    fn wire(&mut self) -> Result<()> {
        let node = self.node.clone();
        self.add_namespace(&node)?;
        run(Command::new("ip").args([
            "netns",
            "exec",
            &node,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv6.conf.all.forwarding=1",
        ]))?;
        for address in [
            format!("{NODE_IP}/32"),
            format!("{}/128", ipv6_twin(NODE_IP)),
        ] {
            run(Command::new("ip").args(["-n", &node, "addr", "add", &address, "dev", "lo"]))?;
        }
        let pods: Vec<(String, String, Ipv4Addr)> = std::iter::once(&self.client)
            .chain(&self.backends)
            .map(|p| (p.name.clone(), p.namespace.clone(), p.ip))
            .collect();
        for (index, (name, namespace, ip)) in pods.into_iter().enumerate() {
            self.add_namespace(&namespace)?;
            wire_pod(&node, &name, &namespace, ip, index)?;
        }
        Ok(())
    }

    fn start_servers(&mut self, demoapp: &Path) -> Result<()> {
        for pod in &self.backends {
            start_server(demoapp, &pod.name, &pod.namespace, &mut self.servers)?;
        }
        Ok(())
    }

    /// Starts the agent in the node on the lab's manifests, with `extra` arguments, and waits
    /// until it has programmed the frontends and attached to every pod's interface.
    pub fn start_agent(&mut self, extra: &[&str]) -> Result<()> {
        let manifests = self.manifests.path().to_path_buf();
        let source = [OsStr::new("--manifests"), manifests.as_os_str()];
        self.start_agent_on(&source, extra)
    }

    /// Starts the agent in the node with `source` (`--manifests DIR`, `--kubernetes ...`), and
    /// waits until it is ready.
    pub fn start_agent_on(&mut self, source: &[&OsStr], extra: &[&str]) -> Result<()> {
        // One agent per instance: the old one stops before the new one starts, as in a
        // DaemonSet's rolling update.
        if let Some(previous) = self.agent.take() {
            stop_agent(previous);
        }
        let log = fs::File::create(self.agent_log())?;
        let child = self
            .agent_command(source, extra)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting lb-user")?;
        self.agent.replace(Some(child));
        self.wait_for("the agent to be ready", || {
            let readyz = self
                .in_node(&["curl", "-sf", "--max-time", "1", READYZ])
                .output()?;
            Ok(readyz.status.success())
        })
    }

    /// `lb-user run` in the node, for this lab's instance.
    pub fn agent_command(&self, source: &[&OsStr], extra: &[&str]) -> Command {
        // nsenter, not `ip netns exec`: that one also unshares the mount namespace and remounts
        // /sys, which would hide the agent's pins under /sys/fs/bpf from everyone else.
        let mut command = Command::new("nsenter");
        dies_with_parent(&mut command);
        // SAFETY: getrlimit and setrlimit are async-signal-safe, as pre_exec requires.
        unsafe {
            command.pre_exec(|| {
                // As systemd and many container runtimes start a service: a soft limit of
                // 1,024 open files under a higher hard one.
                let mut limit = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) == 0 {
                    limit.rlim_cur = limit.rlim_cur.min(SOFT_FILE_LIMIT);
                    libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit);
                }
                Ok(())
            });
        }
        command
            .arg(format!("--net=/run/netns/{}", self.node))
            .arg("--")
            .args(&self.agent_wrapper)
            .arg(&self.lb_user)
            .args(["run", "--node", NODE_NAME, "--interfaces", "v-*"])
            .args(["--instance", &self.prefix]);
        // Quick polls, so that tests do not wait; unless the test sets its own.
        if !extra.contains(&"--poll-interval-ms") {
            command.args(["--poll-interval-ms", "50"]);
        }
        command.args(source).args(extra);
        command
    }

    pub fn agent_log(&self) -> PathBuf {
        self.manifests.path().with_extension("agent.log")
    }

    /// The agent's process id, while it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.borrow().as_ref().map(Child::id)
    }

    /// How many syncs the agent has logged.
    pub fn syncs(&self) -> usize {
        self.log_text().matches(" synced ").count()
    }

    /// `lb-user dump` of this lab's agent: its map entries and counters.
    pub fn dump(&self) -> Result<String> {
        self.lb_user("dump")
    }

    /// `lb-user <command>` for this lab's agent instance; its output.
    pub fn lb_user(&self, command: &str) -> Result<String> {
        output(Command::new(&self.lb_user).args([
            command,
            "--instance",
            &self.prefix,
            "--bpffs",
            BPFFS,
        ]))
    }

    /// Where this lab's agent pins its maps.
    pub fn pin_dir(&self) -> PathBuf {
        Path::new(BPFFS).join("lb").join(&self.prefix)
    }

    /// Kills the agent as `kill -9` would: no chance to clean up.
    pub fn kill_agent(&self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }

    /// Waits until the dump satisfies `done`; returns it.
    pub fn wait_for_dump(&self, what: &str, done: impl Fn(&str) -> bool) -> Result<String> {
        let mut last = String::new();
        self.wait_for(what, || {
            last = self.dump().unwrap_or_default();
            Ok(done(&last))
        })
        .with_context(|| format!("last dump:\n{last}"))?;
        Ok(last)
    }

    /// Polls `done` until it holds, for at most 20 s.
    pub fn wait_for(&self, what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < WAIT {
            if done()? {
                return Ok(());
            }
            if let Some(agent) = self.agent.borrow_mut().as_mut()
                && let Ok(Some(status)) = agent.try_wait()
            {
                bail!("the agent exited ({status}); its log:\n{}", self.log_text());
            }
            thread::sleep(POLL);
        }
        bail!(
            "timed out waiting for {what}; agent log:\n{}",
            self.log_text()
        )
    }

    fn log_text(&self) -> String {
        fs::read_to_string(self.agent_log()).unwrap_or_default()
    }

    /// Runs `command` in the client pod, pinned to CPU 0 so that its packets meet one CPU's
    /// round-robin cursor.
    pub fn in_client(&self, command: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.client.namespace,
            "taskset",
            "-c",
            "0",
        ])
        .args(command);
        cmd
    }

    /// Starts a `demoapp` named `name` in the node itself, on the node's addresses: a backend
    /// with host networking.
    pub fn serve_on_node(&mut self, name: &str) -> Result<()> {
        start_server(
            &binary("LB_DEMOAPP_BIN")?,
            name,
            &self.node,
            &mut self.servers,
        )
    }

    /// Runs `command` in the node itself, pinned to CPU 0.
    pub fn in_node(&self, command: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.node, "taskset", "-c", "0"])
            .args(command);
        cmd
    }

    /// `curl` from the client; the body.
    pub fn curl(&self, url: &str) -> Result<String> {
        // `-g`: an IPv6 address's brackets are no glob.
        output(&mut self.in_client(&["curl", "-sS", "-g", "--max-time", "5", url]))
    }

    /// `curl` from a backend pod; the body.
    pub fn curl_from(&self, pod: &str, url: &str) -> Result<String> {
        let pod = self
            .backends
            .iter()
            .find(|p| p.name == pod)
            .with_context(|| format!("no pod {pod}"))?;
        output(Command::new("ip").args([
            "netns",
            "exec",
            &pod.namespace,
            "taskset",
            "-c",
            "0",
            "curl",
            "-sS",
            "--max-time",
            "5",
            url,
        ]))
    }

    /// One UDP datagram from the client with `socat` to `address` (`[IPv6]:port` or IPv4's),
    /// from `source_port` if given; the answer.
    pub fn udp(&self, address: &str, source_port: Option<u16>) -> Result<String> {
        let family = family_of(address);
        let target = match source_port {
            Some(port) => format!("UDP{family}:{address},sourceport={port},reuseaddr"),
            None => format!("UDP{family}:{address}"),
        };
        // `-t 1`: after sending, wait one second for the answer, not socat's default.
        udp_query(self.in_client(&["socat", "-t", "1", "-T", "1", "-", &target]))
    }

    /// A long-lived TCP connection from the client to `address` (`[IPv6]:port` or IPv4's),
    /// through `socat`.
    pub fn connect(&self, address: &str) -> Result<Connection> {
        let target = format!("TCP{}:{address}", family_of(address));
        let mut child = self
            .in_client(&["socat", "-", &target])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Connection {
            child,
            stdin,
            lines,
        })
    }

    /// Adds a manifest to the lab's, as `kubectl apply` would.
    pub fn add_manifest(&self, file: &str, text: &str) -> Result<()> {
        let tmp = self.manifests.path().join(format!(".{file}.tmp"));
        fs::write(&tmp, text)?;
        fs::rename(tmp, self.manifests.path().join(file))?;
        Ok(())
    }

    /// Rewrites a manifest of the lab (a file name in `deploy/examples`).
    pub fn edit_manifest(&self, file: &str, edit: impl FnOnce(String) -> String) -> Result<()> {
        let path = self.manifests.path().join(file);
        let text = fs::read_to_string(&path)?;
        let edited = edit(text.clone());
        ensure!(edited != text, "the edit of {file} changed nothing");
        // Write then rename, as kubectl and editors do, so the agent never reads half a file.
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, edited)?;
        fs::rename(tmp, path)?;
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(agent) = self.agent.take() {
            stop_agent(agent);
        }
        tear_down(&mut self.servers, &mut self.namespaces);
        remove_pins(&self.prefix);
        let _ = fs::remove_file(self.agent_log());
    }
}

/// socat's family of `address`: 6 for a bracketed IPv6 one, else 4.
fn family_of(address: &str) -> char {
    if address.starts_with('[') { '6' } else { '4' }
}
