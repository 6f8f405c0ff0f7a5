//! Example services for Meshwire: used by the end-to-end tests, the
//! benchmarks, the demo and the container images.
//!
//! - [`echo`]: the `meshwire.example.v1.Echo` service (unary and all three
//!   streaming shapes, with delay/failure knobs and counters).
//! - [`interop`]: gRPC's interop `grpc.testing.TestService`, for running the
//!   official interop client test cases (e.g. grpcio's) through the mesh.
//! - [`load`]: a load client for the echo service (the demo's, `meshwire-load`).
//! - [`probe`]: HTTP/TCP checks (`meshwire-probe`, the containers' health checks).
//! - [`demo`]: the body of `meshwire-demo`; [`cmd`]: of the other binaries.
//! - [`otlp`]: an OTLP/gRPC trace collector (spans kept for tests, or only
//!   counted as the benchmark's sink).

pub mod cmd;
pub mod demo;
pub mod echo;
pub mod interop;
pub mod load;
pub mod otlp;
pub mod probe;
