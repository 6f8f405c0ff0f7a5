//! Example services for Meshwire: used by the end-to-end tests, the
//! benchmarks and the demo.
//!
//! - [`echo`]: the `meshwire.example.v1.Echo` service (unary and all three
//!   streaming shapes, with delay/failure knobs and counters).
//! - [`interop`]: gRPC's interop `grpc.testing.TestService`, for running the
//!   official interop client test cases (e.g. grpcio's) through the mesh.
//! - [`otlp`]: an OTLP/gRPC trace collector (spans kept for tests, or only
//!   counted as the benchmark's sink).

pub mod echo;
pub mod interop;
pub mod otlp;
