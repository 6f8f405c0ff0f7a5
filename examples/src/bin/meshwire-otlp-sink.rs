//! An OTLP/gRPC trace collector serving what it received as JSON (the compose
//! test's stand-in for Jaeger). See `meshwire_examples::cmd::otlp_sink`.
//!
//! Run with `cargo run -p meshwire-examples --bin meshwire-otlp-sink -- --otlp 127.0.0.1:4317 --http 127.0.0.1:16686`.

fn main() -> std::process::ExitCode {
    meshwire_examples::cmd::otlp_sink::main()
}
