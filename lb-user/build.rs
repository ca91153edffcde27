use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// Builds the eBPF objects into `OUT_DIR`, as the aya template does, and names that directory to
/// the crates that depend on this one (`DEP_LB_EBPF_OBJECTS`: the benchmarks take the empty
/// programs from there). `AYA_BUILD_SKIP=1` skips the build (for `cargo check` and clippy
/// without bpf-linker).
fn main() -> anyhow::Result<()> {
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR")?;
    println!("cargo::metadata=OBJECTS={out_dir}");
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|package| package.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("lb-ebpf package not found"))?;
    let root_dir = ebpf_package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf_package.manifest_path))?;
    let ebpf_package = aya_build::Package {
        name: ebpf_package.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf_package], Toolchain::default())
}
