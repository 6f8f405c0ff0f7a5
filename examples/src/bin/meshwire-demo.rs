//! The Meshwire demo: a live mesh on one machine, no other software needed.
//!
//! Run with `cargo run --release --bin meshwire-demo` (add `-- --duration 10s`
//! for a non-interactive run that prints a summary). See `meshwire_examples::demo`.

fn main() -> std::process::ExitCode {
    meshwire_examples::demo::main()
}
