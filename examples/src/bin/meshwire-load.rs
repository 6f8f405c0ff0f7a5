//! A load client for the echo service, through a sidecar. See `meshwire_examples::cmd::load`.
//!
//! Run with `meshwire-load --sidecar 127.0.0.1:15001 --service echo --duration 10s`.

fn main() -> std::process::ExitCode {
    meshwire_examples::cmd::load::main()
}
