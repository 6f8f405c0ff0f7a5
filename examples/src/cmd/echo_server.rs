//! `echo-server`: the example Echo service as a process (the app of the
//! compose stack's containers).
//!
//! It serves `grpc.health.v1` (SERVING); SIGUSR1 turns it NOT_SERVING and
//! SIGUSR2 back to SERVING, a live fault for the demo and the tests.
//!
//! With `--sidecar-admin`, a SIGTERM first drains the sidecar beside it
//! (`POST /drain`, then waits until it has finished), while this server
//! still answers the calls in flight: stopping the app container then fails
//! no call, the way a preStop hook works in a Kubernetes pod.

use std::net::SocketAddr;
use std::time::Duration;

use crate::echo::{self, EchoOptions};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "echo-server", about = "The example Echo gRPC service (h2c)")]
struct Args {
    /// Address to serve gRPC (h2c) on.
    #[arg(long, env = "ECHO_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Name reported in every reply (tells instances apart).
    #[arg(long, env = "ECHO_NAME", default_value = "echo")]
    name: String,
    /// Added to every unary call (makes an instance slow).
    #[arg(long, env = "ECHO_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    delay: Duration,
    /// The admin address of this app's sidecar, drained first on SIGTERM.
    #[arg(long, env = "ECHO_SIDECAR_ADMIN")]
    sidecar_admin: Option<String>,
    /// Longest wait for the sidecar's drain.
    #[arg(long, env = "ECHO_SIDECAR_DRAIN_WAIT", default_value = "15s", value_parser = humantime::parse_duration)]
    sidecar_drain_wait: Duration,
}

pub fn main() -> std::process::ExitCode {
    super::run("echo-server", serve(Args::parse()))
}

async fn serve(args: Args) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let server = echo::serve_with(
        listener,
        &args.name,
        EchoOptions {
            delay: args.delay,
            ..Default::default()
        },
    );
    tracing::info!(addr = %server.addr, name = %args.name, delay = ?args.delay, "echo server listening");

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM"); break }
            _ = int.recv() => { tracing::info!("SIGINT"); break }
            _ = usr1.recv() => {
                tracing::info!("SIGUSR1: health NOT_SERVING");
                server.set_serving(false).await;
            }
            _ = usr2.recv() => {
                tracing::info!("SIGUSR2: health SERVING");
                server.set_serving(true).await;
            }
        }
    }
    if let Some(admin) = &args.sidecar_admin {
        tracing::info!(%admin, "draining the sidecar first");
        match crate::probe::drain_sidecar(admin, args.sidecar_drain_wait).await {
            Ok(()) => tracing::info!("sidecar drained"),
            Err(e) => tracing::warn!(error = %e, "sidecar drain"),
        }
    }
    server.stop().await;
    tracing::info!("stopped");
    Ok(())
}
