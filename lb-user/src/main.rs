mod agent;

use std::{
    io::IsTerminal as _, net::IpAddr, ops::RangeInclusive, path::PathBuf, sync::Arc, time::Duration,
};

use anyhow::{Context as _, Result};
use aya::programs::XdpMode;
use clap::{Parser, Subcommand, ValueEnum};
use lb_common::maps::Config;
use lb_user::{datapath, maps::KernelMaps, model, sources::manifests::Manifests};
use serde::Serialize;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// An eBPF Kubernetes service load balancer: a kube-proxy replacement.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Program this node's datapath and keep it in step with the cluster or the manifests.
    Run(Box<RunArgs>),
    /// Print what the agent would program on a node (no root, no kernel).
    Plan(PlanArgs),
    /// Print the entries an agent instance has in its pinned maps, and its counters.
    Dump(InstanceArgs),
    /// Print the services an agent instance programmed, as `ipvsadm -Ln` does, from its
    /// pinned maps: what the kernel has, not what the manifests say.
    Inspect(InstanceArgs),
    /// Remove everything an agent instance installed on this node: its pinned links (which
    /// detaches its programs), programs and maps. Stop the agent first: one still running
    /// would not notice, and stay detached.
    Cleanup(CleanupArgs),
}

#[derive(clap::Args)]
struct CleanupArgs {
    #[command(flatten)]
    instance: InstanceArgs,
    /// Every instance under <bpffs>/lb, not only --instance.
    #[arg(long)]
    all: bool,
}

#[derive(clap::Args)]
struct InstanceArgs {
    /// Names this agent's pin directory, <bpffs>/lb/<instance>.
    #[arg(long, default_value = "default")]
    instance: String,
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["manifests", "kubernetes"])))]
struct RunArgs {
    /// Manifest files or directories (YAML or JSON), watched for changes.
    #[arg(long, num_args = 1..)]
    manifests: Vec<PathBuf>,
    /// Watch the Kubernetes API: with --kubeconfig, else as kubectl finds its config, else with
    /// the pod's service account.
    #[arg(long)]
    kubernetes: bool,
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// How long a burst of API events may gather before it is synced, in milliseconds.
    #[arg(long, default_value_t = 100)]
    batch_delay_ms: u64,
    #[command(flatten)]
    node: NodeArgs,
    /// Pod-facing interfaces (tc): names, or prefixes ending in `*`.
    #[arg(long, required = true, value_delimiter = ',')]
    interfaces: Vec<String>,
    /// Uplinks, where traffic from outside the node arrives (XDP): names or prefixes.
    #[arg(long, value_delimiter = ',')]
    uplinks: Vec<String>,
    /// How XDP attaches: native (in the driver), generic (in the stack), or auto.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    xdp_mode: XdpModeArg,
    /// The cgroup v2 directory whose processes (those of the node's network namespace) reach
    /// frontends through socket hooks; by default the cgroup v2 root.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Where the node's health is served, as kube-proxy's: /healthz and /livez (its JSON; for
    /// cloud load balancers and cluster tooling, and the kubelet's liveness probe), and
    /// /readyz (the first sync programmed and the interfaces attached).
    #[arg(
        long = "healthz-bind-address",
        alias = "health-address",
        default_value = "0.0.0.0:10256"
    )]
    health_address: std::net::SocketAddr,
    /// Where /metrics is served (health too). It names every Service and counts its traffic:
    /// loopback by default, as kube-proxy's.
    #[arg(long, default_value = "127.0.0.1:9403")]
    metrics_address: std::net::SocketAddr,
    /// /healthz and /readyz fail once the sync loop has not gone round for this long, in
    /// seconds; /readyz also once map writes have kept failing for as long.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    stall_timeout_secs: u64,
    /// Source ports for SNAT to the node's address: outside the node's ephemeral range.
    #[arg(long, default_value = "61000-65535", value_parser = parse_port_range)]
    snat_ports: RangeInclusive<u16>,
    /// Rejects (TCP resets, ICMP port unreachables to frontends without endpoints) the node
    /// may send per second, past which a new flow is dropped instead and counted; as the
    /// kernel's `icmp_msgs_per_sec`. 0: none.
    #[arg(long, default_value_t = 1000)]
    reject_rate: u32,
    /// Rejects the node may send at once after a quiet while, as `icmp_msgs_burst`.
    #[arg(long, default_value_t = 50)]
    reject_burst: u32,
    #[command(flatten)]
    instance: InstanceArgs,
    /// How often to look for changed manifests and new interfaces, in milliseconds; inotify
    /// wakes the agent at once when a manifest changes.
    #[arg(long, default_value_t = 200)]
    poll_interval_ms: u64,
    /// Where sysctls are written (`accept_local` on uplinks): the host's /proc/sys when the agent
    /// runs in a container.
    #[arg(long, default_value = "/proc/sys")]
    sysctl_dir: PathBuf,
    /// Load this eBPF object instead of the one built into the agent (a newer datapath build
    /// with the same map layouts, for instance).
    #[arg(long)]
    bpf_object: Option<PathBuf>,
    /// Idle timeout of an open TCP flow, in seconds.
    #[arg(long, default_value_t = 6 * 3600)]
    tcp_timeout_secs: u64,
    /// Idle timeout of a TCP flow after FIN or RST, in seconds.
    #[arg(long, default_value_t = 10)]
    tcp_closing_timeout_secs: u64,
    /// Idle timeout of a UDP flow, in seconds.
    #[arg(long, default_value_t = 60)]
    udp_timeout_secs: u64,
    /// How often idle flows are removed from the datapath's tables, in seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    flow_gc_interval_secs: u64,
}

#[derive(clap::Args)]
struct NodeArgs {
    /// This node's name, as in its Node object.
    #[arg(long = "node-name", visible_alias = "node", env = "NODE_NAME")]
    name: String,
    /// Addresses NodePorts listen on, of either family; by default the Node's InternalIP and
    /// ExternalIP. The first IPv4 one is the SNAT address.
    #[arg(long = "node-ip", value_delimiter = ',')]
    addresses: Vec<IpAddr>,
    /// The cluster's --service-node-port-range.
    #[arg(long, default_value = "30000-32767", value_parser = parse_port_range)]
    node_port_range: RangeInclusive<u16>,
    /// The scheduler of Services whose `lb.ebpf.io/scheduler` annotation chooses none, by
    /// IPVS's name (kube-proxy's `--ipvs-scheduler`): `rr` (round robin), `sh` (source hash),
    /// `mh` (Maglev), `lc` (least connection), `sed` (shortest expected delay) or `nq` (never
    /// queue).
    #[arg(long, default_value = "rr", value_parser = model::Algorithm::from_name)]
    scheduler: model::Algorithm,
    /// The positions of each Maglev table (`mh`), a prime, the same on every node: a client's
    /// new connections reach one backend through any of them. Each position is 4 bytes of
    /// `lb_slot_tables_v1` (16,777,216 positions): larger tables move fewer clients when a backend
    /// comes or goes, smaller ones leave room for more Maglev frontends.
    #[arg(long, default_value_t = model::DEFAULT_MAGLEV_TABLE_SIZE, value_parser = parse_table_size)]
    maglev_table_size: u32,
}

impl NodeArgs {
    fn config(&self) -> model::NodeConfig {
        model::NodeConfig {
            name: self.name.clone(),
            addresses: self.addresses.clone(),
            node_port_range: self.node_port_range.clone(),
            scheduler: self.scheduler,
            maglev_table_size: self.maglev_table_size,
        }
    }
}

fn parse_table_size(text: &str) -> Result<u32, String> {
    let size = text.parse().map_err(|e| format!("{text:?}: {e}"))?;
    if lb_user::plan::maglev::is_table_size(size) {
        Ok(size)
    } else {
        Err(format!(
            "{size} is no prime from 2 to {}",
            lb_user::plan::maglev::MAX_TABLE_SIZE
        ))
    }
}

/// The node's `rate` shared out over its CPUs, each of which keeps its own bucket; at least 1
/// each, unless `rate` is 0.
fn per_cpu(rate: u32) -> Result<u32> {
    let cpus = aya::util::nr_cpus()
        .map_err(|(_, e)| e)
        .context("counting the CPUs")?;
    let cpus = u32::try_from(cpus).unwrap_or(u32::MAX).max(1);
    Ok(if rate == 0 { 0 } else { (rate / cpus).max(1) })
}

fn parse_port_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let (low, high) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?} is not a range like 30000-32767"))?;
    let port = |p: &str| p.trim().parse::<u16>().map_err(|e| format!("{p:?}: {e}"));
    let (low, high) = (port(low)?, port(high)?);
    if low == 0 || low > high {
        return Err(format!("{text:?} is not a range of ports"));
    }
    Ok(low..=high)
}

#[derive(clap::Args)]
struct PlanArgs {
    #[arg(long, required = true, num_args = 1..)]
    manifests: Vec<PathBuf>,
    #[command(flatten)]
    node: NodeArgs,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Clone, Copy, ValueEnum)]
enum XdpModeArg {
    Auto,
    Native,
    Generic,
}

impl From<XdpModeArg> for XdpMode {
    fn from(mode: XdpModeArg) -> Self {
        match mode {
            XdpModeArg::Auto => Self::Default,
            XdpModeArg::Native => Self::Driver,
            XdpModeArg::Generic => Self::Skb,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Serialize)]
struct PlanOutput<'a> {
    node: &'a str,
    frontends: Vec<Arc<model::Frontend>>,
    skipped: Vec<model::Skipped>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match Cli::parse().command {
        Command::Run(args) => run(*args).await,
        Command::Plan(args) => {
            exit_quietly_on_closed_pipe();
            plan(&args)
        }
        Command::Dump(args) => {
            exit_quietly_on_closed_pipe();
            dump(&args)
        }
        Command::Inspect(args) => {
            exit_quietly_on_closed_pipe();
            inspect(&args)
        }
        Command::Cleanup(args) => cleanup(&args),
    }
}

/// `lb-user plan | head` ends like any Unix tool when `head` stops reading, not with a panic.
/// Only for the printing commands: the agent must not die of its log's pipe.
fn exit_quietly_on_closed_pipe() {
    // SAFETY: restoring the default disposition of a signal, before any thread is spawned that
    // writes to stdout.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

async fn run(args: RunArgs) -> Result<()> {
    check_capabilities()?;
    raise_file_limit();
    let secs = |s: u64| s.saturating_mul(1_000_000_000);
    agent::run(agent::Settings {
        node: args.node.config(),
        source: if args.kubernetes {
            agent::SourceSettings::Kubernetes {
                kubeconfig: args.kubeconfig,
                batch_delay: Duration::from_millis(args.batch_delay_ms),
            }
        } else {
            agent::SourceSettings::Manifests(args.manifests)
        },
        interfaces: args.interfaces,
        uplinks: args.uplinks,
        xdp_mode: args.xdp_mode.into(),
        cgroup: match args.cgroup {
            Some(path) => path,
            None => datapath::cgroup2_root()?,
        },
        pin_dir: datapath::pin_dir(&args.instance.bpffs, &args.instance.instance),
        bpffs: args.instance.bpffs,
        object: args.bpf_object,
        sysctl_dir: args.sysctl_dir,
        poll_interval: Duration::from_millis(args.poll_interval_ms),
        flow_gc_interval: Duration::from_secs(args.flow_gc_interval_secs),
        health_address: args.health_address,
        metrics_address: args.metrics_address,
        stall_after: Duration::from_secs(args.stall_timeout_secs),
        config: Config {
            tcp_open_timeout_ns: secs(args.tcp_timeout_secs),
            tcp_closing_timeout_ns: secs(args.tcp_closing_timeout_secs),
            udp_timeout_ns: secs(args.udp_timeout_secs),
            snat_addr_be: 0,
            snat_addr6_be: [0; 4],
            snat_port_min: *args.snat_ports.start(),
            snat_port_max: *args.snat_ports.end(),
            netns_cookie: datapath::netns_cookie()?,
            rejects_per_sec_per_cpu: per_cpu(args.reject_rate)?,
            reject_burst_per_cpu: per_cpu(args.reject_burst)?,
        },
    })
    .await
}

/// The capabilities the agent needs, with what for (`deploy/README.md` says why each), and
/// whether `CAP_SYS_ADMIN` stands in for it, as the kernel lets it for BPF and PERFMON.
const CAPABILITIES: [(u32, &str, &str, bool); 3] = [
    (
        39,
        "CAP_BPF",
        "creating the maps and loading BTF and the programs",
        true,
    ),
    (
        12,
        "CAP_NET_ADMIN",
        "loading and attaching the tc, XDP and socket programs, and resetting sockets",
        false,
    ),
    (
        38,
        "CAP_PERFMON",
        "the verifier's rules for a privileged loader",
        true,
    ),
];
const CAP_SYS_ADMIN: u32 = 21;

/// Fails, naming each, when the agent lacks a capability it needs: a container's security
/// context that drops one would otherwise fail later, as a bare `EPERM` from a syscall.
fn check_capabilities() -> Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("no CapEff in /proc/self/status")?;
    let has = |bit: u32| effective & (1 << bit) != 0;
    let missing: Vec<String> = CAPABILITIES
        .iter()
        .filter(|&&(bit, _, _, admin_will_do)| !(has(bit) || admin_will_do && has(CAP_SYS_ADMIN)))
        .map(|(_, name, why, _)| format!("{name} ({why})"))
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "the agent lacks {}: add them to the container's securityContext.capabilities",
        missing.join(", ")
    );
    Ok(())
}

/// Raises the soft limit on open files to the hard one: the agent holds a descriptor per map,
/// program, link and client, and the usual soft limit of 1,024 is the first thing a flood of
/// connections to its endpoints would exhaust.
fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "reading the open files limit");
        return;
    }
    if limit.rlim_cur >= limit.rlim_max {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: limit.rlim_max,
        ..limit
    };
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } == 0 {
        info!(
            from = limit.rlim_cur,
            to = raised.rlim_cur,
            "raised the open files limit"
        );
    } else {
        warn!(error = %std::io::Error::last_os_error(), "raising the open files limit");
    }
}

fn plan(args: &PlanArgs) -> Result<()> {
    let (objects, mut skipped) = Manifests::new(args.manifests.clone()).snapshot();
    let desired = model::compute(&objects, &args.node.config());
    skipped.extend(desired.skipped);
    // What the maps cannot hold (a full map, a backend of another family) is the plan's to say.
    let (_, unplanned) = lb_user::plan::entries(&desired.frontends, &args.node.name);
    skipped.extend(unplanned);
    let frontends = desired.frontends;
    match args.output {
        Output::Json => {
            let output = PlanOutput {
                node: &args.node.name,
                frontends,
                skipped,
            };
            println!("{}", serde_json::to_string_pretty(&output)?);
        }
        Output::Text => {
            println!("node {}", args.node.name);
            for fe in &frontends {
                println!(
                    "{:?} {} from {:?} {} ({} port {:?}): {}; when empty, {:?}",
                    fe.kind,
                    model::endpoint_name(fe.address, fe.port, fe.protocol),
                    fe.scope,
                    fe.algorithm,
                    fe.service,
                    fe.port_name,
                    fe.rule,
                    fe.when_empty
                );
                let backends = fe.backends.iter().map(|be| ("->", be));
                // Serving, so their UDP flows stay, but no new flow goes there.
                let retained = fe.retained.iter().map(|be| ("~>", be));
                for (arrow, be) in backends.chain(retained) {
                    println!(
                        "  {arrow} {} node={} zone={}",
                        std::net::SocketAddr::new(be.address, be.port),
                        be.node.as_deref().unwrap_or("-"),
                        be.zone.as_deref().unwrap_or("-")
                    );
                }
            }
            for s in &skipped {
                println!("skipped {s}");
            }
        }
    }
    Ok(())
}

fn open_instance(args: &InstanceArgs) -> Result<KernelMaps> {
    let pin_dir = datapath::pin_dir(&args.bpffs, &args.instance);
    KernelMaps::open_pinned(&pin_dir)
        .with_context(|| format!("no agent instance pinned at {}", pin_dir.display()))
}

fn inspect(args: &InstanceArgs) -> Result<()> {
    let maps = open_instance(args)?;
    print!("{}", maps.read()?.table(&maps.backend_loads()));
    Ok(())
}

fn cleanup(args: &CleanupArgs) -> Result<()> {
    let instances: Vec<String> = if args.all {
        match std::fs::read_dir(args.instance.bpffs.join("lb")) {
            Ok(entries) => entries
                .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).context("listing the instances"),
        }
    } else {
        vec![args.instance.instance.clone()]
    };
    for instance in instances {
        let pin_dir = datapath::pin_dir(&args.instance.bpffs, &instance);
        datapath::remove_pins(&pin_dir)?;
        println!("removed {}", pin_dir.display());
    }
    Ok(())
}

fn dump(args: &InstanceArgs) -> Result<()> {
    let maps = open_instance(args)?;
    print!("{}", maps.read()?.dump());
    let s = maps.stats()?;
    println!(
        "STATS: forwarded={} replied={} new_flows={} reselected={} dropped_no_backend={} \
         rejected_no_backend={} dropped_error={} snat_flows={} dropped_no_snat={} \
         dropped_unknown_port={} socket_rewrites={} rejects_limited={} dropped_source_range={} \
         icmp_translated={} fragments_unmatched={} fragments_held={}",
        s.forwarded,
        s.replied,
        s.new_flows,
        s.reselected,
        s.dropped_no_backend,
        s.rejected_no_backend,
        s.dropped_error,
        s.snat_flows,
        s.dropped_no_snat,
        s.dropped_unknown_port,
        s.socket_rewrites,
        s.rejects_limited,
        s.dropped_source_range,
        s.icmp_translated,
        s.fragments_unmatched,
        s.fragments_held
    );
    println!("EPOCH: backends_removed={}", maps.epoch()?.backends_removed);
    let (flows, replies) = maps.flow_entries()?;
    println!(
        "FLOWS: flows={flows} replies={replies} connected_sockets={}",
        maps.connected_sockets()?
    );
    Ok(())
}
