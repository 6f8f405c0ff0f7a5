//! `otlp-sink`, built inside the test package so tests (and their container images) can run it.

fn main() -> std::process::ExitCode {
    meshwire_examples::cmd::otlp_sink::main()
}
