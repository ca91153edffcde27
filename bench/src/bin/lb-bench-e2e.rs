//! End to end on the lab: new connections per second and connect-plus-request latency from the
//! client pod to the demo Service (a ClusterIP over three HTTP pods), with N Services
//! programmed, on four paths measured in the same run, each in a lab of its own:
//!
//! - `no NAT`: the client connects straight to the pods, in turn: the ceiling;
//! - `lb`: the agent, on the lab's manifests and N - 1 synthetic Services;
//! - `iptables`, `nftables`: no agent, but kube-proxy-shaped rulesets of the same N Services
//!   loaded in the node, with the demo Service in the middle of KUBE-SERVICES.
//!
//! The client is one thread in the client pod's network namespace, on CPU 0, making one
//! connection after another: connect, `GET /`, read the answer to its end (the server closes).
//! The ceiling's lab stays up through a scale, and each run of a path follows a run of the
//! ceiling: a ratio is the median of those pairs'.
//! Every answer must name a pod, and every pod must answer in each run, so that no path can be
//! timed without its connections going through.
//!
//! The ruleset paths also give the control plane's baselines at this size (`cargo xtask bench`
//! does not load them twice, a load takes minutes at 10,000 Services): the time to load the
//! whole ruleset into the fresh node, then the partial sync of one endpoint fewer.

use std::{
    collections::BTreeSet,
    fmt, fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::AsRawFd as _,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use lb_bench::{
    Spread,
    cluster::{self, Iptables, Nftables, Ruleset, SERVICE_PORT, Service, TARGET_PORT},
};
use lb_tests::{BACKENDS, Lab, pod_of};
use serde::Serialize;

/// The path straight to the pods.
const CEILING: &str = "no NAT";
/// The demo Service of `deploy/examples`.
const DEMO_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const REQUEST: &[u8] = b"GET / HTTP/1.0\r\nHost: demo\r\n\r\n";
const TIMEOUT: Duration = Duration::from_secs(2);
/// Connections before the measured runs: ARP, caches, the servers' first threads.
const WARM_UP: u32 = 200;

#[derive(Parser)]
struct Args {
    /// Services programmed (the demo Service among them), one scale after another.
    #[arg(long, value_delimiter = ',', default_value = "1,10000")]
    scales: Vec<u32>,
    /// Runs per path; each figure is the median over them.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Connections per run.
    #[arg(long, default_value_t = 2_000)]
    connections: u32,
    /// Where the raw figures go, as JSON.
    #[arg(long, default_value = "target/bench/end-to-end.json")]
    output: PathBuf,
}

/// A path measured against the ceiling.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Lb,
    Iptables,
    Nftables,
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Path::Lb => "lb",
            Path::Iptables => Iptables::NAME,
            Path::Nftables => Nftables::NAME,
        })
    }
}

#[derive(Serialize)]
struct Figure {
    path: String,
    services: u32,
    connections_per_run: u32,
    connections_per_second: Spread,
    p50_us: Spread,
    p99_us: Spread,
    /// Over the ceiling's run paired with each run.
    rate_of_ceiling: Spread,
    p50_of_ceiling: Spread,
    /// How long the path took to set up: the agent's start until ready, or the ruleset's load.
    setup_ms: f64,
    /// For a ruleset, the load of its partial sync once a Service has one endpoint fewer.
    one_endpoint_ms: Option<f64>,
}

impl Figure {
    #[expect(clippy::too_many_arguments, reason = "a figure's fields, spelled out")]
    fn of(
        path: &str,
        services: u32,
        connections_per_run: u32,
        runs: &[Run],
        rate_of_ceiling: Spread,
        p50_of_ceiling: Spread,
        setup_ms: f64,
        one_endpoint_ms: Option<f64>,
    ) -> Self {
        let over = |field: fn(&Run) -> f64| Spread::of(runs.iter().map(field).collect());
        Self {
            path: path.to_string(),
            services,
            connections_per_run,
            connections_per_second: over(|r| r.per_second),
            p50_us: over(|r| r.p50_us),
            p99_us: over(|r| r.p99_us),
            rate_of_ceiling,
            p50_of_ceiling,
            setup_ms,
            one_endpoint_ms,
        }
    }
}

/// One run's figures.
struct Run {
    per_second: f64,
    p50_us: f64,
    p99_us: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut figures: Vec<Figure> = Vec::new();
    for &services in &args.scales {
        ensure!(services >= 1, "a scale counts the demo Service");
        let fillers: Vec<Service> = (0..services - 1).map(cluster::synthetic).collect();
        let mut all = fillers.clone();
        // In the middle: KUBE-SERVICES is walked in order.
        all.insert(
            all.len() / 2,
            Service {
                namespace: "default".into(),
                name: "demo".into(),
                cluster_ip: DEMO_VIP,
                endpoints: BACKENDS.iter().map(|&(_, ip)| ip).collect(),
            },
        );
        // The ceiling's lab stays up for the whole scale: each run of a path is paired with a
        // run of the ceiling just before it, so that the ratios do not drift with the machine.
        let ceiling_lab = Lab::up("e2e-ceiling").context("building the ceiling's lab")?;
        let direct: Vec<SocketAddr> = BACKENDS
            .iter()
            .map(|&(_, ip)| SocketAddrV4::new(ip, TARGET_PORT).into())
            .collect();
        let through_vip = [SocketAddrV4::new(DEMO_VIP, SERVICE_PORT).into()];
        measure(&ceiling_lab, &direct, WARM_UP)?;
        let mut ceiling_runs = Vec::new();
        for path in [Path::Lb, Path::Iptables, Path::Nftables] {
            let mut lab = Lab::up(&format!("e2e{}", path as u8)).context("building the lab")?;
            let started = Instant::now();
            set_up(&mut lab, path, &fillers, &all).with_context(|| format!("setting up {path}"))?;
            let setup_ms = started.elapsed().as_secs_f64() * 1000.0;
            measure(&lab, &through_vip, WARM_UP)?;
            let (mut runs, mut rate_ratios, mut p50_ratios) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..args.runs {
                let ceiling = measure(&ceiling_lab, &direct, args.connections)?;
                let run = measure(&lab, &through_vip, args.connections)
                    .with_context(|| format!("{path}, {services} services"))?;
                rate_ratios.push(run.per_second / ceiling.per_second);
                p50_ratios.push(run.p50_us / ceiling.p50_us);
                runs.push(run);
                ceiling_runs.push(ceiling);
            }
            let ms = |took: Duration| took.as_secs_f64() * 1000.0;
            let one_endpoint_ms = match path {
                Path::Lb => None,
                Path::Iptables => Some(ms(cluster::load::<Iptables>(
                    &lab.node,
                    &Iptables.one_endpoint_fewer(&all),
                )?)),
                Path::Nftables => Some(ms(cluster::load::<Nftables>(
                    &lab.node,
                    &Nftables.one_endpoint_fewer(&all),
                )?)),
            };
            figures.push(Figure::of(
                &path.to_string(),
                services,
                args.connections,
                &runs,
                Spread::of(rate_ratios),
                Spread::of(p50_ratios),
                setup_ms,
                one_endpoint_ms,
            ));
        }
        let ones = vec![1.0; ceiling_runs.len()];
        figures.push(Figure::of(
            CEILING,
            services,
            args.connections,
            &ceiling_runs,
            Spread::of(ones.clone()),
            Spread::of(ones),
            0.0,
            None,
        ));
    }

    println!(
        "{:<9} {:>8} {:>24} {:>8} {:>22} {:>8} {:>22} {:>10} {:>12}",
        "path",
        "services",
        "conn/s",
        "x no NAT",
        "p50 us",
        "x no NAT",
        "p99 us",
        "setup ms",
        "one endp. ms"
    );
    for f in &figures {
        println!(
            "{:<9} {:>8} {:>24} {:>8.3} {:>22} {:>8.3} {:>22} {:>10.0} {:>12}",
            f.path,
            f.services,
            spread(f.connections_per_second, 0),
            f.rate_of_ceiling.median,
            spread(f.p50_us, 1),
            f.p50_of_ceiling.median,
            spread(f.p99_us, 1),
            f.setup_ms,
            f.one_endpoint_ms
                .map_or(String::new(), |ms| format!("{ms:.0}"))
        );
    }
    if let Some(dir) = args.output.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&args.output, serde_json::to_string_pretty(&figures)?)?;
    println!("raw figures: {}", args.output.display());
    Ok(())
}

/// Puts `path` in place in `lab`: the agent on the lab's manifests and `fillers`, or the
/// ruleset of `all` loaded in the node.
fn set_up(lab: &mut Lab, path: Path, fillers: &[Service], all: &[Service]) -> Result<()> {
    match path {
        Path::Lb => {
            cluster::write_manifests(lab.manifests.path(), fillers)?;
            lab.start_agent(&[])?;
        }
        Path::Iptables => {
            cluster::load::<Iptables>(&lab.node, &Iptables.full(all))?;
        }
        Path::Nftables => {
            cluster::load::<Nftables>(&lab.node, &Nftables.full(all))?;
        }
    }
    Ok(())
}

/// One run of `connections` connections from `lab`'s client to `targets` in turn.
fn measure(lab: &Lab, targets: &[SocketAddr], connections: u32) -> Result<Run> {
    let netns = lab.client.namespace.as_str();
    let handle = fs::File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("opening network namespace {netns}"))?;
    thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: plain syscalls on this thread only, with a valid descriptor and a
                // zeroed CPU set.
                unsafe {
                    ensure!(
                        libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) == 0,
                        "entering {netns}: {}",
                        std::io::Error::last_os_error()
                    );
                    let mut cpus: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(0, &mut cpus);
                    libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const cpus);
                }
                run(targets, connections)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
    })
}

/// `connections` connections, to `targets` in turn, from this thread.
fn run(targets: &[SocketAddr], connections: u32) -> Result<Run> {
    let mut latencies = Vec::with_capacity(connections as usize);
    let mut pods = BTreeSet::new();
    let started = Instant::now();
    for target in targets.iter().cycle().take(connections as usize) {
        let at = Instant::now();
        let answer = request(*target)?;
        latencies.push(at.elapsed());
        pods.insert(answer);
    }
    let elapsed = started.elapsed();
    ensure!(
        pods.len() == BACKENDS.len(),
        "answers came from {pods:?} only"
    );
    latencies.sort();
    let percentile = |p: f64| {
        let at = ((latencies.len() as f64 * p) as usize).min(latencies.len() - 1);
        latencies[at].as_secs_f64() * 1e6
    };
    Ok(Run {
        per_second: f64::from(connections) / elapsed.as_secs_f64(),
        p50_us: percentile(0.50),
        p99_us: percentile(0.99),
    })
}

/// One connection: connect, ask, read the answer to its end; the pod that answered.
fn request(target: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&target, TIMEOUT)
        .with_context(|| format!("connecting to {target}"))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(REQUEST)?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .with_context(|| format!("reading from {target}"))?;
    match pod_of(&answer) {
        Some(pod) if answer.starts_with("HTTP/1.1 200") => Ok(pod.to_string()),
        _ => bail!("{target} answered {answer:?}"),
    }
}

/// A spread with `digits` decimals.
fn spread(s: Spread, digits: usize) -> String {
    format!(
        "{:.digits$} [{:.digits$}-{:.digits$}]",
        s.median, s.min, s.max
    )
}
