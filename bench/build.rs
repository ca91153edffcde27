//! The benchmarks' floor, the empty programs, is built with the datapath by lb-user's build
//! script; it names its output directory to the crates that depend on it (`links`).
fn main() -> anyhow::Result<()> {
    let dir = std::env::var("DEP_LB_EBPF_OBJECTS")
        .map_err(|_| anyhow::anyhow!("lb-user's build script names no DEP_LB_EBPF_OBJECTS"))?;
    println!("cargo::rustc-env=LB_EBPF_OBJECTS={dir}");
    Ok(())
}
