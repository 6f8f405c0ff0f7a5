//! The bodies of the example binaries (`echo-server`, `meshwire-load`,
//! `meshwire-probe`, `meshwire-otlp-sink`), in the library so the end-to-end tests can build and
//! run the same programs (`tests/src/bin/`), also inside containers.

#![allow(clippy::print_stdout, clippy::print_stderr)]

pub mod echo_server;
pub mod load;
pub mod otlp_sink;
pub mod probe;
