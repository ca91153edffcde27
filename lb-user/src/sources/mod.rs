//! Sources of Kubernetes objects. Each fills [`crate::model::Objects`]; the model does not know
//! where they came from.

pub mod inotify;
pub mod kubernetes;
pub mod manifests;
