use which::which;

/// The object depends on the `bpf-linker` binary, which cargo cannot track: rebuild when it
/// changes (as the aya template does).
fn main() {
    let bpf_linker =
        which("bpf-linker").expect("bpf-linker is not on PATH: run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
