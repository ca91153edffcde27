//! The control plane's cost: from manifests of N Services of 10 endpoints each to programmed
//! maps, through the agent's own pipeline (load, model, plan, map writes), and then one
//! endpoint removed, as a sync after an edit does it. Run once per N, in its own process, so
//! that the peak RSS is this run's.

use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, ensure};
use clap::Parser;
use lb_user::{
    bench::{self, Spread},
    maps::KernelMaps,
    model::{self, NodeConfig},
    plan::{self, Ids, MapEntries},
    sources::manifests::Manifests,
};
use serde::Serialize;

const NODE: &str = "bench-node";
/// Services per manifest file.
const PER_FILE: u32 = 100;
const ENDPOINTS: u32 = 10;

#[derive(Parser)]
struct Args {
    /// Services to program.
    #[arg(long, default_value_t = 10_000)]
    services: u32,
    /// Where the raw figures go, as JSON.
    #[arg(long)]
    output: PathBuf,
    /// Runs of each measurement; figures are their median, min and max.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Runs of each baseline: at 10,000 Services one load takes about a minute.
    #[arg(long, default_value_t = 3)]
    baseline_runs: usize,
    /// Skip the iptables and nftables baselines.
    #[arg(long)]
    no_baselines: bool,
}

/// The same work done by kube-proxy's rulesets: load them all, then one endpoint fewer.
#[derive(Serialize)]
struct Baseline {
    program_all_ms: Spread,
    one_endpoint_ms: Spread,
}

#[derive(Serialize)]
struct Figures {
    services: u32,
    map_entries: usize,
    /// From reading the manifests to the last map write, into empty maps.
    program_all_ms: Spread,
    /// The same for one endpoint removed: every file re-read, one slot and backend less.
    one_endpoint_ms: Spread,
    one_endpoint_writes: usize,
    peak_rss_mib: f64,
    /// `iptables-restore` of kube-proxy's iptables mode's ruleset for the same Services.
    iptables: Option<Baseline>,
    /// `nft -f` of kube-proxy's nftables mode's ruleset for the same Services.
    nftables: Option<Baseline>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut runs = Vec::new();
    for run in 0..args.runs {
        let (datapath, mut maps) = bench::datapath(&format!("cp-{run}"))?;
        // Every run starts from the manifests as written.
        let dir = write_manifests(args.services, &format!("{run}"))?;
        let measured = measure(&args, dir.clone(), &mut maps);
        datapath.remove()?;
        fs::remove_dir_all(&dir)?;
        runs.push(measured?);
    }
    // Before the baselines, whose rulesets are large strings of this process's own.
    let peak_rss_mib = peak_rss_kib()? / 1024.0;
    let (iptables, nftables) = if args.no_baselines {
        (None, None)
    } else {
        (
            Some(baseline(&args, &Iptables)?),
            Some(baseline(&args, &Nftables)?),
        )
    };
    let figures = Figures {
        services: args.services,
        map_entries: runs[0].writes,
        program_all_ms: Spread::of(runs.iter().map(|r| r.program_all_ms).collect()),
        one_endpoint_ms: Spread::of(runs.iter().map(|r| r.one_endpoint_ms).collect()),
        one_endpoint_writes: runs[0].one_endpoint_writes,
        peak_rss_mib,
        iptables,
        nftables,
    };
    println!(
        "control plane, {} services x {ENDPOINTS} endpoints ({} runs): {} map entries programmed \
         in {}, peak RSS {:.0} MiB; one endpoint removed: {} writes in {}",
        figures.services,
        args.runs,
        figures.map_entries,
        figures.program_all_ms,
        figures.peak_rss_mib,
        figures.one_endpoint_writes,
        figures.one_endpoint_ms
    );
    for (name, baseline) in [
        ("iptables-restore", &figures.iptables),
        ("nft -f", &figures.nftables),
    ] {
        if let Some(b) = baseline {
            println!(
                "  {name:<16} programs all in {} (lb: {:.3}x of it); one endpoint in {} (lb: \
                 {:.3}x)",
                b.program_all_ms,
                figures.program_all_ms.median / b.program_all_ms.median,
                b.one_endpoint_ms,
                figures.one_endpoint_ms.median / b.one_endpoint_ms.median
            );
        }
    }
    if let Some(parent) = args.output.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&args.output, serde_json::to_string_pretty(&figures)?)?;
    Ok(())
}

/// Writes the manifests of `services` Services into a new directory.
fn write_manifests(services: u32, tag: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("lb-bench-control-{}-{tag}", std::process::id()));
    fs::create_dir_all(&dir)?;
    for file in 0..services.div_ceil(PER_FILE) {
        let first = file * PER_FILE;
        let last = (first + PER_FILE).min(services);
        let text: String = (first..last).map(manifest).collect();
        fs::write(dir.join(format!("services-{file:04}.yaml")), text)?;
    }
    Ok(dir)
}

/// One run of the agent's pipeline.
struct Run {
    writes: usize,
    program_all_ms: f64,
    one_endpoint_ms: f64,
    one_endpoint_writes: usize,
}

fn measure(args: &Args, dir: PathBuf, maps: &mut KernelMaps) -> Result<Run> {
    let mut source = Manifests::new(vec![dir.clone()]);
    let mut ids = Ids::default();
    let mut programmed = MapEntries::default();
    let node = NodeConfig::new(NODE);

    let started = Instant::now();
    let writes = sync(&mut source, &node, &mut ids, &mut programmed, maps)?;
    let program_all_ms = started.elapsed().as_secs_f64() * 1000.0;
    ensure!(
        programmed.frontends.len() == args.services as usize,
        "{} frontends programmed",
        programmed.frontends.len()
    );

    // One endpoint fewer in the first file, as an edit would leave it.
    let first = dir.join("services-0000.yaml");
    let text = fs::read_to_string(&first)?;
    let gone = format!("- addresses: [{}]\n", endpoint(0, 0));
    ensure!(text.contains(&gone), "endpoint to remove not found");
    fs::write(&first, text.replacen(&gone, "", 1))?;
    let started = Instant::now();
    let one_endpoint_writes = sync(&mut source, &node, &mut ids, &mut programmed, maps)?;
    let one_endpoint_ms = started.elapsed().as_secs_f64() * 1000.0;

    Ok(Run {
        writes,
        program_all_ms,
        one_endpoint_ms,
        one_endpoint_writes,
    })
}

/// A kube-proxy mode's ruleset: the whole of it for `services` Services of [`ENDPOINTS`]
/// endpoints each, as its first sync writes it, and its partial sync once service 0's first
/// endpoint is gone.
trait Ruleset {
    /// The command that loads a ruleset from standard input, and its arguments.
    const LOAD: (&'static str, &'static [&'static str]);
    fn full(&self, services: u32) -> String;
    fn one_endpoint_fewer(&self, services: u32) -> String;
}

/// kube-proxy's iptables mode: a KUBE-SERVICES rule per Service, a KUBE-SVC chain choosing an
/// endpoint with `statistic` rules, a KUBE-SEP chain per endpoint doing the DNAT. Its partial
/// sync rewrites KUBE-SERVICES whole, and the chains that changed.
struct Iptables;

impl Iptables {
    fn services_chain(services: u32) -> String {
        let mut out = String::from(":KUBE-SERVICES - [0:0]\n");
        for i in 0..services {
            let _ = writeln!(
                out,
                "-A KUBE-SERVICES -m comment --comment \"bench/svc-{i}:http cluster IP\" -m tcp -p tcp \
                 -d {}/32 --dport 80 -j KUBE-SVC-{i}",
                cluster_ip(i)
            );
        }
        out
    }

    fn service_chain(i: u32, endpoints: std::ops::Range<u32>) -> String {
        let mut out = format!(
            "-A KUBE-SVC-{i} -m comment --comment \"bench/svc-{i}:http cluster IP\" -m tcp -p tcp -d \
             {}/32 --dport 80 ! -s 10.128.0.0/9 -j KUBE-MARK-MASQ\n",
            cluster_ip(i)
        );
        let count = endpoints.len() as u32;
        for (n, e) in endpoints.enumerate() {
            let left = count - n as u32;
            let statistic = if left > 1 {
                format!(
                    "-m statistic --mode random --probability {:.10} ",
                    1.0 / f64::from(left)
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "-A KUBE-SVC-{i} -m comment --comment \"bench/svc-{i}:http -> {}:8080\" {statistic}-j \
                 KUBE-SEP-{i}-{e}",
                endpoint(i, e)
            );
        }
        out
    }

    fn endpoint_chain(i: u32, e: u32) -> String {
        let address = endpoint(i, e);
        format!(
            "-A KUBE-SEP-{i}-{e} -m comment --comment bench/svc-{i}:http -s {address}/32 -j \
             KUBE-MARK-MASQ\n-A KUBE-SEP-{i}-{e} -m comment --comment bench/svc-{i}:http -m tcp -p \
             tcp -j DNAT --to-destination {address}:8080\n"
        )
    }
}

impl Ruleset for Iptables {
    const LOAD: (&'static str, &'static [&'static str]) = ("iptables-restore", &["--noflush"]);

    fn full(&self, services: u32) -> String {
        let mut out = String::from("*nat\n:KUBE-MARK-MASQ - [0:0]\n");
        for i in 0..services {
            let _ = writeln!(out, ":KUBE-SVC-{i} - [0:0]");
            for e in 0..ENDPOINTS {
                let _ = writeln!(out, ":KUBE-SEP-{i}-{e} - [0:0]");
            }
        }
        out.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
        out.push_str(&Self::services_chain(services));
        for i in 0..services {
            out.push_str(&Self::service_chain(i, 0..ENDPOINTS));
            for e in 0..ENDPOINTS {
                out.push_str(&Self::endpoint_chain(i, e));
            }
        }
        out.push_str("COMMIT\n");
        out
    }

    fn one_endpoint_fewer(&self, services: u32) -> String {
        format!(
            "*nat\n:KUBE-SVC-0 - [0:0]\n:KUBE-SEP-0-0 - [0:0]\n{}{}-X KUBE-SEP-0-0\nCOMMIT\n",
            Self::services_chain(services),
            Self::service_chain(0, 1..ENDPOINTS)
        )
    }
}

/// kube-proxy's nftables mode: a verdict map from address, protocol and port to a service
/// chain, which picks an endpoint chain with `numgen random`. Its partial sync touches the
/// changed chains only.
struct Nftables;

impl Nftables {
    fn service_chain(i: u32, endpoints: std::ops::Range<u32>) -> String {
        let count = endpoints.len();
        let elements: Vec<String> = endpoints
            .enumerate()
            .map(|(n, e)| format!("{n} : goto endpoint-{i}-{e}"))
            .collect();
        format!(
            "add rule ip kube-proxy service-{i} ip daddr {} tcp dport 80 ip saddr != 10.128.0.0/9 \
             jump mark-for-masquerade\nadd rule ip kube-proxy service-{i} numgen random mod {count} \
             vmap {{ {} }}\n",
            cluster_ip(i),
            elements.join(", ")
        )
    }
}

impl Ruleset for Nftables {
    const LOAD: (&'static str, &'static [&'static str]) = ("nft", &["-f", "-"]);

    fn full(&self, services: u32) -> String {
        let mut out = String::from(
            "add table ip kube-proxy\n\
             add chain ip kube-proxy mark-for-masquerade\n\
             add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n\
             add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n\
             add chain ip kube-proxy services\n\
             add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n\
             add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority dstnat ; }\n\
             add rule ip kube-proxy nat-prerouting jump services\n\
             add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n\
             add rule ip kube-proxy nat-output jump services\n",
        );
        for i in 0..services {
            let _ = writeln!(out, "add chain ip kube-proxy service-{i}");
            for e in 0..ENDPOINTS {
                let address = endpoint(i, e);
                let _ = writeln!(
                    out,
                    "add chain ip kube-proxy endpoint-{i}-{e}\n\
                     add rule ip kube-proxy endpoint-{i}-{e} ip saddr {address} jump mark-for-masquerade\n\
                     add rule ip kube-proxy endpoint-{i}-{e} meta l4proto tcp dnat to {address}:8080"
                );
            }
            out.push_str(&Self::service_chain(i, 0..ENDPOINTS));
            let _ = writeln!(
                out,
                "add element ip kube-proxy service-ips {{ {} . tcp . 80 : goto service-{i} }}",
                cluster_ip(i)
            );
        }
        out
    }

    fn one_endpoint_fewer(&self, _services: u32) -> String {
        format!(
            "flush chain ip kube-proxy service-0\n{}delete chain ip kube-proxy endpoint-0-0\n",
            Self::service_chain(0, 1..ENDPOINTS)
        )
    }
}

/// Loads `ruleset`'s whole ruleset into a fresh network namespace, then its one-endpoint
/// change, `args.runs` times; the time each load takes.
fn baseline<R: Ruleset>(args: &Args, ruleset: &R) -> Result<Baseline> {
    let full = ruleset.full(args.services);
    let change = ruleset.one_endpoint_fewer(args.services);
    let (mut all, mut one) = (Vec::new(), Vec::new());
    for run in 0..args.baseline_runs {
        let netns = format!("lb-bench-cp-{}-{run}", std::process::id());
        run_status(Command::new("ip").args(["netns", "add", &netns]))?;
        let timed = (|| -> Result<(f64, f64)> {
            Ok((load::<R>(&netns, &full)?, load::<R>(&netns, &change)?))
        })();
        run_status(Command::new("ip").args(["netns", "del", &netns]))?;
        let (a, o) = timed?;
        all.push(a);
        one.push(o);
    }
    Ok(Baseline {
        program_all_ms: Spread::of(all),
        one_endpoint_ms: Spread::of(one),
    })
}

/// How long `R::LOAD` takes to load `text` in `netns`, in milliseconds.
fn load<R: Ruleset>(netns: &str, text: &str) -> Result<f64> {
    let (command, load_args) = R::LOAD;
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, command])
        .args(load_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {command}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    let output = child.wait_with_output()?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    ensure!(
        output.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(ms)
}

fn run_status(command: &mut Command) -> Result<()> {
    let status = command.status()?;
    ensure!(status.success(), "{command:?}: {status}");
    Ok(())
}

/// The agent's sync: every file read, the model and the plan computed, the difference written.
fn sync(
    source: &mut Manifests,
    node: &NodeConfig,
    ids: &mut Ids,
    programmed: &mut MapEntries,
    maps: &mut KernelMaps,
) -> Result<usize> {
    let (objects, skipped) = source.load();
    ensure!(skipped.is_empty(), "manifests: {:?}", skipped.first());
    let desired = model::compute(&objects, node);
    let (entries, more) = plan::entries(ids, &desired.frontends, NODE);
    ensure!(more.is_empty(), "plan: {:?}", more.first());
    let ops = plan::diff(programmed, &entries);
    for op in &ops {
        maps.apply(op).context("map write")?;
        programmed.apply(op);
    }
    Ok(ops.len())
}

fn manifest(i: u32) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec:\n  \
         clusterIP: {}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-1\n  \
         namespace: bench\n  labels: {{kubernetes.io/service-name: svc-{i}}}\naddressType: \
         IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n",
        cluster_ip(i)
    );
    for e in 0..ENDPOINTS {
        let _ = writeln!(out, "- addresses: [{}]", endpoint(i, e));
    }
    out.push_str("---\n");
    out
}

fn cluster_ip(service: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 96, 0, 0)) + service)
}

fn endpoint(service: u32, e: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(
        u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0)) + service * ENDPOINTS + e,
    )
}

/// This process's peak resident set, in KiB.
fn peak_rss_kib() -> Result<f64> {
    let status = fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse()?;
    Ok(kib)
}
