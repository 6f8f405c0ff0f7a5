//! `meshctl`: the command-line client of the control plane's admin API; see
//! `meshwire_control_plane::meshctl`.
//!
//! Run with `meshctl --data-dir ./meshwire-data service list`.

fn main() -> std::process::ExitCode {
    meshwire_control_plane::meshctl::main()
}
