//! The lab: a node, a client pod and three backend pods, each its own network namespace, wired
//! the way a routed CNI wires them (a veth per pod, a /32 route per pod on the node, the pod's
//! default route through a link-local gateway), with the agent running in the node.
//!
//! `cargo xtask run` and the lab tests share it. Every name carries the lab's unique prefix,
//! every wait is bounded, and `Drop` tears everything down, also on panic.

use std::{
    cell::RefCell,
    env,
    ffi::OsStr,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

pub mod apiserver;
pub mod cluster;
pub mod packet;

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
const GATEWAY: &str = "169.254.1.1";
pub(crate) const BPFFS: &str = "/sys/fs/bpf";
pub(crate) const WAIT: Duration = Duration::from_secs(20);
pub(crate) const POLL: Duration = Duration::from_millis(50);
/// The agent's readiness, as seen from its node.
pub const READYZ: &str = "http://127.0.0.1:9402/readyz";
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
        ]))?;
        run(Command::new("ip").args([
            "-n",
            &node,
            "addr",
            "add",
            &format!("{NODE_IP}/32"),
            "dev",
            "lo",
        ]))?;
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
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                    limit.rlim_cur = limit.rlim_cur.min(SOFT_FILE_LIMIT);
                    libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
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
        output(&mut self.in_client(&["curl", "-sS", "--max-time", "5", url]))
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

    /// One UDP datagram from the client with `socat`, from `source_port` if given; the answer.
    pub fn udp(&self, address: &str, source_port: Option<u16>) -> Result<String> {
        let target = match source_port {
            Some(port) => format!("UDP4:{address},sourceport={port},reuseaddr"),
            None => format!("UDP4:{address}"),
        };
        // `-t 1`: after sending, wait one second for the answer, not socat's default.
        udp_query(self.in_client(&["socat", "-t", "1", "-T", "1", "-", &target]))
    }

    /// A long-lived TCP connection from the client, through `socat`.
    pub fn connect(&self, address: &str) -> Result<Connection> {
        let target = format!("TCP4:{address}");
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
    ])
}

/// Sends one datagram through `socat` (the command, ready to run); the answer.
pub fn udp_query(mut socat: Command) -> Result<String> {
    let mut child = socat
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().context("stdin")?.write_all(b"query\n")?;
    let out = wait_output(child, Duration::from_secs(10))?;
    ensure!(
        out.status.success(),
        "socat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
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

/// A TCP connection held open by `socat` in the client.
pub struct Connection {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<std::io::Result<String>>,
}

impl Connection {
    /// Sends a line and returns the answer.
    pub fn ask(&mut self, line: &str) -> Result<String> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        Ok(self
            .lines
            .recv_timeout(Duration::from_secs(5))
            .context("no answer within 5 s")??)
    }
}

impl Connection {
    /// Waits for the server to close the connection: socat sees the end of the stream and
    /// exits cleanly (a reset makes it fail).
    pub fn wait_closed(&mut self) -> Result<()> {
        match self.lines.recv_timeout(Duration::from_secs(5)) {
            Err(mpsc::RecvTimeoutError::Disconnected) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("still open after 5 s"),
            Ok(line) => bail!("more after the close: {line:?}"),
        }
        let status = wait_within(&mut self.child, Duration::from_secs(5))
            .context("socat still running after the close")?;
        ensure!(
            status.success(),
            "socat failed ({status}): not a clean close"
        );
        Ok(())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pod named in a demoapp answer (`pod=NAME ...`).
pub fn pod_of(answer: &str) -> Option<&str> {
    answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pod="))
}

/// The client address a demoapp answer reports (`client=IP:PORT`).
pub fn client_of(answer: &str) -> Option<&str> {
    answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix("client="))
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    output(cmd).map(drop)
}

/// Runs `cmd` to completion (10 s at most); its stdout, or an error with its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let out = wait_output(child, Duration::from_secs(10)).with_context(|| format!("{cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8(out.stdout)?)
}

pub(crate) fn wait_output(mut child: Child, limit: Duration) -> Result<Output> {
    // Each pipe on its own thread: a child filling one while we wait on the other would hang.
    let out_reader = drain(child.stdout.take());
    let err_reader = drain(child.stderr.take());
    let Some(status) = wait_within(&mut child, limit) else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("still running after {limit:?}: killed");
    };
    let stdout = out_reader.join().expect("stdout reader");
    let stderr = err_reader.join().expect("stderr reader");
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Makes `cmd`'s process die with the test process, even one killed without unwinding, so that
/// no agent or server outlives its lab.
pub(crate) fn dies_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
    }
}

/// Reads a child's pipe to its end on a thread of its own.
fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

pub(crate) fn wait_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(10));
    }
    None
}

fn read_line_within(stdout: ChildStdout, limit: Duration) -> Result<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(limit)
        .context("no line within the time limit")
}
