//! `meshwire-control-plane`: see the crate docs of `meshwire_control_plane`.
//!
//! Run with `meshwire-control-plane --data-dir ./meshwire-data` (listens on
//! `0.0.0.0:15010`; `meshctl --data-dir ./meshwire-data service list` talks to it).

fn main() -> std::process::ExitCode {
    meshwire_control_plane::cli::main()
}
