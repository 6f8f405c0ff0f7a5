//! The xDS v3 protocol between the Meshwire control plane and its clients
//! (Meshwire sidecars, stock Envoy, proxyless gRPC).
//!
//! An update flows: the control plane publishes a [`Snapshot`] of
//! `meshwire_mesh` clusters; [`server::AdsServer`] encodes them once with
//! [`resources`] and pushes them on every ADS stream (State-of-the-World or
//! Delta) that subscribed; on the sidecar, [`client::run`] decodes and
//! validates what arrives, hands it to a [`client::ConfigSink`] and ACKs it,
//! or NACKs it with the reason and keeps the last good configuration.

pub mod client;
mod resilience;
pub mod resources;
pub mod server;
pub mod snapshot;

pub use snapshot::Snapshot;
