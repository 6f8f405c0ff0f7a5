//! The end-to-end tests, one module per area, in one test binary so the
//! workspace links one test executable instead of one per file.
//!
//! Tests that run a binary (`meshwire-sidecar`, `meshwire-control-plane`,
//! `meshctl`, the examples) use the real one from the target directory, found
//! by [`meshwire_tests::bins`]. Run one area with e.g.
//! `cargo test -p meshwire-tests --test e2e mesh::`.

mod balancing;
mod behaviour;
mod ca_api;
mod compose;
mod control_plane_api;
mod demo;
mod envoy_interop;
mod etcd;
mod gateway;
mod grpc_proxyless;
mod hardening;
mod hashing;
mod health_report;
mod identity;
mod interop_grpcio;
mod mesh;
mod mtls;
mod passthrough;
mod process;
mod protocols;
mod ratelimit;
mod resilience;
mod resilience_config;
mod telemetry;
mod xds_sidecar;
mod zones;
