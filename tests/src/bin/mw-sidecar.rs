//! The sidecar binary, built inside the test package so tests can run it.

fn main() -> std::process::ExitCode {
    meshwire_sidecar::cli::main()
}
