//! `cargo xtask`: what a build script should not do. Installs the toolchain pieces the eBPF
//! build needs, builds, runs the lab and the tests.

mod setup;

use std::{
    env,
    ffi::OsString,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    sync::mpsc,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use lb_tests::{Lab, workspace_root};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build, the lab and the tests need (idempotent).
    Setup,
    /// Build the agent with its eBPF object, and the lab's server.
    Build,
    /// Run the lab on deploy/examples and show the client reaching a ClusterIP; with agent
    /// arguments after `--`, run the agent on this node instead.
    Run {
        /// Exit after the demonstration instead of keeping the lab up until Ctrl-C.
        #[arg(long)]
        once: bool,
        #[arg(last = true)]
        agent_args: Vec<String>,
    },
    /// Check formatting and run clippy on every crate, the eBPF one included.
    Lint,
    /// Build in release mode and run the benchmarks (datapath, control plane, end to end);
    /// raw figures under target/bench/.
    Bench {
        /// Passed to lb-bench (`--scales 1,1000`, `--runs 3`, ...).
        #[arg(last = true)]
        bench_args: Vec<String>,
    },
    /// Run every test: unit, golden and kernel-level lab tests.
    Test {
        /// Passed to `cargo test` (a filter, `--nocapture`, ...).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
}

fn main() -> Result<ExitCode> {
    match Cli::parse().command {
        Task::Setup => setup::all().map(|()| ExitCode::SUCCESS),
        Task::Build => build(Profile::Debug).map(|_| ExitCode::SUCCESS),
        Task::Run { once, agent_args } => run(once, &agent_args),
        Task::Lint => lint().map(|()| ExitCode::SUCCESS),
        Task::Bench { bench_args } => bench(&bench_args),
        Task::Test { cargo_args } => test(&cargo_args),
    }
}

/// The built binaries.
struct Binaries {
    lb_user: PathBuf,
    demoapp: PathBuf,
    /// The eBPF object built into `lb_user`, for the tests that load it as an upgrade.
    ebpf_object: PathBuf,
}

impl Binaries {
    fn export(&self, cmd: &mut Command) {
        cmd.env("LB_USER_BIN", &self.lb_user)
            .env("LB_DEMOAPP_BIN", &self.demoapp)
            .env("LB_EBPF_OBJECT", &self.ebpf_object);
    }
}

/// The newest eBPF object lb-user's build script wrote under `dir` (one per build-script hash).
fn built_object(dir: &Path) -> Result<PathBuf> {
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in fs::read_dir(dir.join("build"))? {
        let object = entry?.path().join("out/lb");
        let Ok(modified) = fs::metadata(&object).and_then(|m| m.modified()) else {
            continue;
        };
        if newest.as_ref().is_none_or(|(time, _)| modified > *time) {
            newest = Some((modified, object));
        }
    }
    newest
        .map(|(_, object)| object)
        .with_context(|| format!("no eBPF object under {}/build", dir.display()))
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root()).env("PATH", setup::path());
    cmd
}

fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Profile {
    Debug,
    Release,
}

/// Builds every binary of the agent and the lab in `profile`, the benchmarks too.
fn build(profile: Profile) -> Result<Binaries> {
    setup::all()?;
    let mut cargo = cargo();
    cargo.args(["build", "--package", "lb-user", "--package", "lb-tests"]);
    cargo.args(["--package", "lb-bench", "--bins"]);
    if profile == Profile::Release {
        cargo.arg("--release");
    }
    if !cargo.status()?.success() {
        bail!("cargo build failed");
    }
    let dir = target_dir().join(match profile {
        Profile::Debug => "debug",
        Profile::Release => "release",
    });
    Ok(Binaries {
        lb_user: dir.join("lb-user"),
        demoapp: dir.join("demoapp"),
        ebpf_object: built_object(&dir)?,
    })
}

fn run(once: bool, agent_args: &[String]) -> Result<ExitCode> {
    let binaries = build(Profile::Debug)?;
    if !agent_args.is_empty() {
        let status = Command::new(&binaries.lb_user)
            .arg("run")
            .args(agent_args)
            .status()?;
        return Ok(ExitCode::from(
            u8::try_from(status.code().unwrap_or(1)).unwrap_or(1),
        ));
    }
    // SAFETY: single-threaded here; the lab reads these from the environment.
    unsafe {
        env::set_var("LB_USER_BIN", &binaries.lb_user);
        env::set_var("LB_DEMOAPP_BIN", &binaries.demoapp);
    }
    let (stop_tx, stop) = mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = stop_tx.send(());
    })?;

    println!("building the lab: a node, a client pod and three demo pods (network namespaces)");
    let mut lab = Lab::up("demo")?;
    println!(
        "starting the agent in {} on {}",
        lab.node,
        lab.manifests.path().display()
    );
    lab.start_agent(&[])?;
    // The demo Service is dual-stack: a ClusterIP of each family, one slice of each.
    for (family, url) in [
        ("IPv4", "http://10.96.0.10/"),
        ("IPv6", "http://[fd00::10:96:0:10]/"),
    ] {
        println!(
            "\nthe client ({}) curls the {family} ClusterIP of default/demo six times:",
            lab.client.ip
        );
        for i in 1..=6 {
            let answer = lab.curl(url)?;
            print!("  {i}. curl {url} -> {answer}");
        }
    }
    println!(
        "\nthe maps the agent programmed (lb-user dump --instance {}):",
        lab.prefix
    );
    print!("{}", lab.dump()?);
    if once {
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "\nthe lab stays up until Ctrl-C; try:\n  ip netns exec {} curl http://10.96.0.10/\n  \
         {} inspect --instance {}\n  \
         bpftool map dump pinned /sys/fs/bpf/lb/{}/lb_frontends_v2",
        lab.client.namespace,
        binaries.lb_user.display(),
        lab.prefix,
        lab.prefix
    );
    stop.recv().context("waiting for Ctrl-C")?;
    println!("tearing the lab down");
    Ok(ExitCode::SUCCESS)
}

/// The benchmarks, in release mode: per packet (`lb-bench`), control plane
/// (`lb-bench-control`), end to end on the lab (`lb-bench-e2e`).
fn bench(bench_args: &[String]) -> Result<ExitCode> {
    let binaries = build(Profile::Release)?;
    let release = target_dir().join("release");
    let bench = target_dir().join("bench");
    let mut runs = vec![
        Command::new(release.join("lb-bench"))
            .arg("--output")
            .arg(bench.join("datapath.json"))
            .args(bench_args)
            .status()?,
    ];
    // One process per size, so that each peak RSS is its own. At 10,000 Services one
    // iptables or nftables load takes minutes: the end-to-end benchmark's loads of the same
    // rulesets are the baselines there.
    let sizes: [(u32, &[&str]); 3] = [
        (1_000, &["--baseline-runs", "3"]),
        (10_000, &["--no-baselines"]),
        (100_000, &["--no-baselines"]),
    ];
    for (services, baselines) in sizes {
        runs.push(
            Command::new(release.join("lb-bench-control"))
                .args(["--services", &services.to_string()])
                .args(baselines)
                .arg("--output")
                .arg(bench.join(format!("control-plane-{services}.json")))
                .status()?,
        );
    }
    let mut end_to_end = Command::new(release.join("lb-bench-e2e"));
    binaries.export(&mut end_to_end);
    runs.push(
        end_to_end
            .arg("--output")
            .arg(bench.join("end-to-end.json"))
            .status()?,
    );
    Ok(if runs.iter().all(std::process::ExitStatus::success) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `cargo` of the nightly toolchain: rustfmt's import options and the eBPF target need it.
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"])
        .current_dir(workspace_root())
        .env("PATH", setup::path());
    cmd
}

fn lint() -> Result<()> {
    setup::all()?;
    let checks = [
        (
            "rustfmt",
            nightly_cargo().args(["fmt", "--all", "--check"]).status()?,
        ),
        (
            "clippy",
            cargo()
                .args(["clippy", "--all-targets"])
                .args(["--", "-D", "warnings"])
                .status()?,
        ),
        (
            "clippy (eBPF)",
            nightly_cargo()
                .args(["clippy", "--package", "lb-ebpf", "--release"])
                .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
                .args(["--", "-D", "warnings"])
                .status()?,
        ),
    ];
    let failed: Vec<&str> = checks
        .iter()
        .filter(|(_, status)| !status.success())
        .map(|(name, _)| *name)
        .collect();
    if !failed.is_empty() {
        bail!("{} failed", failed.join(", "));
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and ends with the totals over every suite: cargo's own
/// last line speaks only of the last suite.
fn test(cargo_args: &[String]) -> Result<ExitCode> {
    let binaries = build(Profile::Debug)?;
    sweep_dead_labs()?;
    let mut cmd = cargo();
    cmd.arg("test").args(cargo_args).stdout(Stdio::piped());
    binaries.export(&mut cmd);
    let mut child = cmd.spawn()?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(child.stdout.take().context("stdout")?).lines() {
        let line = line?;
        println!("{line}");
        if let Some((p, f)) = suite_totals(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait()?;
    println!("all suites: {passed} passed, {failed} failed");
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `(passed, failed)` of a libtest summary line: `test result: ok. 7 passed; 0 failed; ...`.
fn suite_totals(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| -> Option<u64> {
        rest.split(';')
            .find_map(|part| {
                part.trim()
                    .trim_start_matches(|c: char| !c.is_ascii_digit())
                    .strip_suffix(word)
            })
            .and_then(|n| n.trim().parse().ok())
    };
    Some((count("passed")?, count("failed")?))
}

/// Removes the namespaces and pins of labs whose test process is gone (killed before its
/// `Drop` ran). Lab names start with `lb<pid>-`: those of a live process are left alone.
fn sweep_dead_labs() -> Result<()> {
    let dead = |name: &str| {
        let pid = name
            .strip_prefix("lb")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        pid.is_some_and(|pid| !PathBuf::from(format!("/proc/{pid}")).exists())
    };
    let namespaces = Command::new("ip").args(["netns", "list"]).output()?;
    for line in String::from_utf8_lossy(&namespaces.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if dead(name) {
            eprintln!("removing the namespace {name} of a test run that is gone");
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
    if let Ok(pins) = fs::read_dir("/sys/fs/bpf/lb") {
        for pin in pins.flatten() {
            if dead(&pin.file_name().to_string_lossy()) {
                eprintln!(
                    "removing the pins {} of a test run that is gone",
                    pin.path().display()
                );
                let _ = fs::remove_dir_all(pin.path());
            }
        }
    }
    Ok(())
}

/// `PATH` with the project's tools first.
fn prepend_path(dir: PathBuf) -> OsString {
    let mut paths = vec![dir];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    env::join_paths(paths).expect("PATH entries contain no ':'")
}
