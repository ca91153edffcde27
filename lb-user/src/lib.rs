//! The agent of the eBPF service load balancer. Data flows one way:
//! sources -> model (pure) -> plan (ids, diff) -> maps -> datapath; [`sync`] runs the
//! middle three, keeping the model and the plan between syncs.

pub mod datapath;
pub mod flow_gc;
pub mod maps;
pub mod model;
pub mod plan;
pub mod sockets;
pub mod sources;
pub mod status;
pub mod sync;

/// An error and its causes, `: `-separated, as a log field: what `{:#}` prints of an anyhow
/// error, for the library's own error types.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut chain = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        chain.push_str(": ");
        chain.push_str(&e.to_string());
        cause = e.source();
    }
    chain
}
