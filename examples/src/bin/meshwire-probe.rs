//! A health check for containers (HTTP, TCP or file age). See `meshwire_examples::cmd::probe`.
//!
//! Run with `meshwire-probe http://127.0.0.1:15000/ready`.

fn main() -> std::process::ExitCode {
    meshwire_examples::cmd::probe::main()
}
