//! The agent of the eBPF service load balancer. Data flows one way:
//! sources -> model (pure) -> plan (ids, diff) -> maps -> datapath; [`sync`] runs the
//! middle three, keeping the model and the plan between syncs.

pub mod agent;
pub mod datapath;
pub mod flow_gc;
pub mod maps;
pub mod model;
pub mod plan;
pub mod sockets;
pub mod sources;
pub mod status;
pub mod sync;
