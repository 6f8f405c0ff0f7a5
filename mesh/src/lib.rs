//! The mesh model every Meshwire part speaks.
//!
//! [`model`] holds the validated domain types: a [`Cluster`] (one service: how
//! to balance, time out and address it) with its [`Endpoint`]s, and the
//! [`policy`] that says who may call it and the [`ratelimit`] its sidecars
//! enforce on its inbound side. The control plane builds them from
//! its registry, `meshwire-xds` turns them into Envoy resources and back, and
//! the sidecar routes and authorizes calls by them; validation lives here,
//! once, so every path into a `Cluster` ends in the same checks.
//!
//! Beside the model: [`grpc::Code`], the typed gRPC status with the one table
//! of code names every metric and CLI prints, and [`cli`], the helpers the
//! binaries share (`parse_duration`, `wait_for_signal`), and [`conn`], the
//! per-connection call accounting behind every listener's first-request and
//! idle timeouts.

pub mod cli;
pub mod conn;
pub mod grpc;
pub mod model;
pub mod policy;
pub mod ratelimit;
pub mod resilience;

pub use model::{
    Cluster, Endpoint, HashLb, HashSource, LbPolicy, ModelError, Protocol, ReportedHealth,
    ZoneRouting,
};
pub use ratelimit::{LimitPer, Rate, RateLimit, RateOverride};
pub use resilience::{CodeSet, Resilience};
