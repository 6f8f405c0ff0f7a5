//! `meshwire-sidecar`: see the crate docs of `meshwire_sidecar`.
//!
//! Run with `meshwire-sidecar --static-config mesh.yaml --app 127.0.0.1:50051`.

fn main() -> std::process::ExitCode {
    meshwire_sidecar::cli::main()
}
