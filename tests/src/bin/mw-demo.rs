//! The demo binary, built inside the test package so tests can run it.

fn main() -> std::process::ExitCode {
    meshwire_examples::demo::main()
}
