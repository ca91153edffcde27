//! The control plane's cost: from manifests of N Services of 10 endpoints each to programmed
//! maps, through the agent's own pipeline (load, model, plan, map writes), and then one
//! endpoint removed from one Service, file after file, as a sync after an edit does it. Run
//! once per N, in its own process, so that the peak RSS is this run's.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use lb_bench::{
    Spread,
    cluster::{self, ENDPOINTS, Iptables, Nftables, Ruleset, Service},
};
use lb_common::maps::Config;
use lb_user::{
    datapath,
    maps::KernelMaps,
    model::NodeConfig,
    sources::manifests::Manifests,
    sync::{Adopted, Pipeline},
};
use serde::Serialize;

const NODE: &str = "bench-node";

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
    /// Edits per run, each removing one endpoint of the first Service of another file.
    #[arg(long, default_value_t = 5)]
    edits: usize,
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
    /// The same for one endpoint removed from one file: that file read again, that Service
    /// computed and planned again, its changed entries written; every edit of every run.
    one_endpoint_ms: Spread,
    /// The first edit of each run alone: right after programming everything, its first
    /// allocations pay for sorting the many chunks the large sync freed (glibc's malloc).
    first_edit_ms: Spread,
    /// Of `one_endpoint_ms`, the pipeline's part: the changes handed in, as the API source
    /// hands in a watch event's, to the last map write. The rest is the manifest source's walk
    /// and read.
    one_endpoint_pipeline_ms: Spread,
    /// The kernel memory of every map once everything is programmed (`memlock`), in MiB, and
    /// each map's.
    kernel_memory_mib: f64,
    kernel_memory_by_map_mib: BTreeMap<String, f64>,
    one_endpoint_writes: usize,
    peak_rss_mib: f64,
    /// `iptables-restore` of kube-proxy's iptables mode's ruleset for the same Services.
    iptables: Option<Baseline>,
    /// `nft -f` of kube-proxy's nftables mode's ruleset for the same Services.
    nftables: Option<Baseline>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let services: Vec<Service> = (0..args.services).map(cluster::synthetic).collect();
    ensure!(
        args.edits <= services.len().div_ceil(cluster::PER_FILE),
        "{} edits need as many files",
        args.edits
    );
    let mut runs = Vec::new();
    let mut kernel_memory = Vec::new();
    for run in 0..args.runs {
        let (datapath, mut maps) = datapath::scratch(&format!("cp-{run}"))?;
        // Every run starts from the manifests as written.
        let dir =
            std::env::temp_dir().join(format!("lb-bench-control-{}-{run}", std::process::id()));
        cluster::write_manifests(&dir, &services)?;
        fs::write(
            dir.join("node.yaml"),
            format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE}}}\n"),
        )?;
        let measured = measure(&args, &services, &dir, &mut maps).and_then(|run| {
            let memory = datapath.kernel_memory()?;
            Ok((run, memory))
        });
        datapath.remove()?;
        fs::remove_dir_all(&dir)?;
        let (run, memory) = measured?;
        runs.push(run);
        kernel_memory = memory;
    }
    // Before the baselines, whose rulesets are large strings of this process's own.
    let peak_rss_mib = peak_rss_kib()? / 1024.0;
    let (iptables, nftables) = if args.no_baselines {
        (None, None)
    } else {
        (
            Some(baseline(&args, &services, &Iptables)?),
            Some(baseline(&args, &services, &Nftables)?),
        )
    };
    let figures = Figures {
        services: args.services,
        map_entries: runs[0].writes,
        program_all_ms: Spread::of(runs.iter().map(|r| r.program_all_ms).collect()),
        one_endpoint_ms: Spread::of(
            runs.iter()
                .flat_map(|r| r.edits_ms.iter().map(|e| e.total))
                .collect(),
        ),
        first_edit_ms: Spread::of(runs.iter().map(|r| r.edits_ms[0].total).collect()),
        one_endpoint_pipeline_ms: Spread::of(
            runs.iter()
                .flat_map(|r| r.edits_ms.iter().map(|e| e.pipeline))
                .collect(),
        ),
        kernel_memory_mib: kernel_memory.iter().map(|(_, b)| mib(*b)).sum(),
        kernel_memory_by_map_mib: kernel_memory
            .iter()
            .map(|(name, bytes)| (name.to_string(), mib(*bytes)))
            .collect(),
        one_endpoint_writes: runs[0].one_endpoint_writes,
        peak_rss_mib,
        iptables,
        nftables,
    };
    println!(
        "control plane, {} services x {ENDPOINTS} endpoints ({} runs): {} map entries programmed \
         in {}, peak RSS {:.0} MiB, maps' kernel memory {:.1} MiB; one endpoint removed: {} \
         writes in {}, of which the pipeline {} ({} edits; the first of each run: {})",
        figures.services,
        args.runs,
        figures.map_entries,
        figures.program_all_ms,
        figures.peak_rss_mib,
        figures.kernel_memory_mib,
        figures.one_endpoint_writes,
        figures.one_endpoint_ms,
        figures.one_endpoint_pipeline_ms,
        args.runs * args.edits,
        figures.first_edit_ms
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

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// One run of the agent's pipeline.
struct Run {
    writes: usize,
    program_all_ms: f64,
    /// Each edit's sync, in order.
    edits_ms: Vec<Timed>,
    one_endpoint_writes: usize,
}

/// A sync's time, and its pipeline's part, in milliseconds.
struct Timed {
    total: f64,
    pipeline: f64,
}

fn measure(args: &Args, services: &[Service], dir: &Path, maps: &mut KernelMaps) -> Result<Run> {
    let mut source = Manifests::new(vec![dir.to_path_buf()]);
    let mut pipeline = Pipeline::new(NODE, Adopted::default(), Config::default());
    let node = NodeConfig::new(NODE);

    let (writes, all) = sync(&mut source, &node, &mut pipeline, maps)?;
    let program_all_ms = all.total;
    let programmed = pipeline.programmed().frontends.len();
    ensure!(
        programmed == args.services as usize,
        "{programmed} frontends programmed"
    );

    // One endpoint fewer in a file, as an edit would leave it.
    let mut edits_ms = Vec::new();
    let mut one_endpoint_writes = 0;
    for edit in 0..args.edits {
        let file = dir.join(cluster::manifest_name(edit));
        let text = fs::read_to_string(&file)?;
        let gone = Service::endpoint_line(services[edit * cluster::PER_FILE].endpoints[0]);
        ensure!(text.contains(&gone), "endpoint to remove not found");
        fs::write(&file, text.replacen(&gone, "", 1))?;
        let (writes, timed) = sync(&mut source, &node, &mut pipeline, maps)?;
        one_endpoint_writes = writes;
        edits_ms.push(timed);
    }

    Ok(Run {
        writes,
        program_all_ms,
        edits_ms,
        one_endpoint_writes,
    })
}

/// Loads `ruleset`'s whole ruleset into a fresh network namespace, then its one-endpoint
/// change, `args.runs` times; the time each load takes.
fn baseline<R: Ruleset>(args: &Args, services: &[Service], ruleset: &R) -> Result<Baseline> {
    let full = ruleset.full(services);
    let change = ruleset.one_endpoint_fewer(services);
    let (mut all, mut one) = (Vec::new(), Vec::new());
    for run in 0..args.baseline_runs {
        let netns = format!("lb-bench-cp-{}-{run}", std::process::id());
        run_status(Command::new("ip").args(["netns", "add", &netns]))?;
        let timed = (|| -> Result<(f64, f64)> {
            let ms = |took: std::time::Duration| took.as_secs_f64() * 1000.0;
            Ok((
                ms(cluster::load::<R>(&netns, &full)?),
                ms(cluster::load::<R>(&netns, &change)?),
            ))
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

fn run_status(command: &mut Command) -> Result<()> {
    let status = command.status()?;
    ensure!(status.success(), "{command:?}: {status}");
    Ok(())
}

/// The agent's sync: the files that changed read, the model and the plan brought up to date,
/// the difference written. How many writes, and how long it took.
fn sync(
    source: &mut Manifests,
    node: &NodeConfig,
    pipeline: &mut Pipeline,
    maps: &mut KernelMaps,
) -> Result<(usize, Timed)> {
    let ms = |since: Instant| since.elapsed().as_secs_f64() * 1000.0;
    let started = Instant::now();
    let (changes, skipped) = source.load();
    ensure!(skipped.is_empty(), "manifests: {:?}", skipped.first());
    let handed_in = Instant::now();
    let synced = pipeline.sync_changes(changes, node, maps);
    let timed = Timed {
        pipeline: ms(handed_in),
        total: ms(started),
    };
    if let Some(skipped) = pipeline.skipped().first() {
        bail!("{skipped}");
    }
    ensure!(synced.failed == 0, "{} map writes failed", synced.failed);
    Ok((synced.writes, timed))
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
