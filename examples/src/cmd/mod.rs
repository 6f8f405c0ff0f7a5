//! The bodies of the example binaries (`echo-server`, `meshwire-load`,
//! `meshwire-probe`, `meshwire-otlp-sink`), in the library so the end-to-end tests can build and
//! run the same programs (`tests/src/bin/`), also inside containers.

#![allow(clippy::print_stdout, clippy::print_stderr)]

pub mod echo_server;
pub mod load;
pub mod otlp_sink;
pub mod probe;

use std::future::Future;
use std::process::ExitCode;

/// A small server binary's `main`: logs to stderr (`RUST_LOG`, default
/// `info`), runs `serve` on a single-threaded runtime, and turns its error
/// into one line on stderr and a failing exit code.
pub(crate) fn run<F>(name: &str, serve: F) -> ExitCode
where
    F: Future<Output = std::io::Result<()>>,
{
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .and_then(|rt| rt.block_on(serve));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}
