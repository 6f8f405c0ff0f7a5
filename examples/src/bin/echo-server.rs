//! A standalone echo server (the app of the demo's containers). See `meshwire_examples::cmd::echo_server`.
//!
//! Run with `cargo run -p meshwire-examples --bin echo-server -- --listen 127.0.0.1:50051 --name a`.

fn main() -> std::process::ExitCode {
    meshwire_examples::cmd::echo_server::main()
}
