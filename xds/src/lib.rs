//! Meshwire's mesh model and (from the control-plane issue on) the xDS v3
//! protocol shared by both sides.
//!
//! [`model`] holds the validated domain types every other part speaks:
//! a [`model::Cluster`] (one service: how to balance, time out and address it)
//! with its [`model::Endpoint`]s. The sidecar builds them from its static YAML
//! file today; the control plane and the sidecar's xDS client will translate
//! Envoy resources to and from them, so validation lives here, once.

pub mod client;
pub mod identity;
pub mod model;
pub mod policy;
pub mod resources;
pub mod server;
pub mod snapshot;

pub use model::{Cluster, Endpoint, LbPolicy, ModelError, Protocol};
pub use snapshot::Snapshot;
