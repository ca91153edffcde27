//! The control plane's cost: from manifests of N Services of 10 endpoints each to programmed
//! maps, through the agent's own pipeline (load, model, plan, map writes), and then one
//! endpoint removed, as a sync after an edit does it. Run once per N, in its own process, so
//! that the peak RSS is this run's.

use std::{fmt::Write as _, fs, path::PathBuf, time::Instant};

use anyhow::{Context as _, Result, ensure};
use clap::Parser;
use lb_user::{
    datapath::{self, Datapath},
    maps::KernelMaps,
    model::{self, NodeConfig},
    plan::{self, Ids, MapEntries},
    sources::manifests::Manifests,
};
use serde::Serialize;

const BPFFS: &str = "/sys/fs/bpf";
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
}

#[derive(Serialize)]
struct Figures {
    services: u32,
    map_entries: usize,
    /// From reading the manifests to the last map write, into empty maps.
    program_all_ms: f64,
    /// The same for one endpoint removed: every file re-read, one slot and backend less.
    one_endpoint_ms: f64,
    one_endpoint_writes: usize,
    peak_rss_mib: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("lb-bench-control-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    for file in 0..args.services.div_ceil(PER_FILE) {
        let first = file * PER_FILE;
        let last = (first + PER_FILE).min(args.services);
        let text: String = (first..last).map(manifest).collect();
        fs::write(dir.join(format!("services-{file:04}.yaml")), text)?;
    }
    let pin_dir = datapath::pin_dir(BPFFS.as_ref(), &format!("bench-cp-{}", std::process::id()));
    let (datapath, mut maps) = Datapath::load(
        datapath::OBJECT,
        BPFFS.as_ref(),
        &pin_dir,
        "/proc/sys".as_ref(),
    )?;
    let figures = measure(&args, dir.clone(), &mut maps);
    datapath.remove()?;
    fs::remove_dir_all(&dir)?;
    let figures = figures?;
    println!(
        "control plane, {} services x {ENDPOINTS} endpoints: {} map entries programmed in {:.0} \
         ms, peak RSS {:.0} MiB; one endpoint removed: {} writes in {:.0} ms",
        figures.services,
        figures.map_entries,
        figures.program_all_ms,
        figures.peak_rss_mib,
        figures.one_endpoint_writes,
        figures.one_endpoint_ms
    );
    if let Some(parent) = args.output.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&args.output, serde_json::to_string_pretty(&figures)?)?;
    Ok(())
}

fn measure(args: &Args, dir: PathBuf, maps: &mut KernelMaps) -> Result<Figures> {
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

    Ok(Figures {
        services: args.services,
        map_entries: writes,
        program_all_ms,
        one_endpoint_ms,
        one_endpoint_writes,
        peak_rss_mib: peak_rss_kib()? / 1024.0,
    })
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
        std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 96, 0, 0)) + i)
    );
    for e in 0..ENDPOINTS {
        let _ = writeln!(out, "- addresses: [{}]", endpoint(i, e));
    }
    out.push_str("---\n");
    out
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
