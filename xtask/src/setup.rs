//! Installs what the build, the lab and the tests need, skipping what is there: Debian
//! packages, the nightly toolchain's `rust-src`, and `bpf-linker` (into `.tools/`, built against
//! the nightly toolchain's own LLVM).

use std::{
    ffi::OsString,
    fs,
    os::unix::fs::symlink,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use lb_tests::workspace_root;

use crate::prepend_path;

/// Debian packages used by the lab, the tests and the benchmarks (the kube-proxy-shaped
/// baselines load with iptables-restore and nft).
const PACKAGES: [&str; 9] = [
    "iproute2",
    "curl",
    "socat",
    "bpftool",
    "util-linux",
    "ethtool",
    "python3",
    "iptables",
    "nftables",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The LLVM major version of the nightly toolchain, which bpf-linker must link against.
const LLVM_FEATURE: &str = "llvm-22";

pub fn all() -> Result<()> {
    packages()?;
    rust_src()?;
    bpf_linker()
}

fn tools_dir() -> PathBuf {
    workspace_root().join(".tools")
}

/// `PATH` with `.tools/bin` first.
pub fn path() -> OsString {
    prepend_path(tools_dir().join("bin"))
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .into_iter()
        .filter(|package| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", package])
                .output()
                .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn rust_src() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("rustup")?;
    if !installed.status.success() {
        bail!(
            "no nightly toolchain ({}): the eBPF build needs one",
            String::from_utf8_lossy(&installed.stderr).trim()
        );
    }
    if String::from_utf8_lossy(&installed.stdout).contains("rust-src") {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker() -> Result<()> {
    let tools = tools_dir();
    let linker = tools.join("bin/bpf-linker");
    if Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION))
    {
        return Ok(());
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("rustup run nightly rustc")?;
    let nightly_lib = PathBuf::from(String::from_utf8(sysroot.stdout)?.trim()).join("lib");
    let llvm = fs::read_dir(&nightly_lib)?
        .filter_map(|e| Some(e.ok()?.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", nightly_lib.display()))?;
    // bpf-linker's build finds LLVM as <prefix>/lib/libLLVM.so.
    let prefix = tools.join("llvm");
    fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = fs::remove_file(&link);
    symlink(&llvm, &link)?;
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {}",
        llvm.display()
    );
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args([
            "--no-default-features",
            "--features",
            LLVM_FEATURE,
            "--root",
        ])
        .arg(&tools)
        .env("LLVM_PREFIX", &prefix)
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", nightly_lib.display()),
        ))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("{cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
