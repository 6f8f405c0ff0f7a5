//! The `meshwire-control-plane` command line: flags (each also a `MESHWIRE_*`
//! environment variable) → [`ControlPlane::start`] → serve until
//! SIGTERM/SIGINT → graceful stop. Shared by the binary and test wrappers.
//!
//! Exit codes: 0 stopped cleanly, 1 could not start (or the server failed),
//! 2 bad flags.

#![allow(clippy::print_stderr)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::{ControlPlane, ControlPlaneConfig, ControlPlaneHandle, auth};

/// `meshwire-control-plane` flags.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "meshwire-control-plane",
    version,
    about = "Meshwire control plane: the admin API (meshctl) and xDS for sidecars, on one port",
    after_help = "The admin token is read from MESHWIRE_ADMIN_TOKEN if set, else from (or generated into) <data-dir>/admin.token."
)]
pub struct Args {
    /// The one port for the admin API and xDS.
    #[arg(long, env = "MESHWIRE_CP_LISTEN", default_value = "0.0.0.0:15010")]
    pub listen: SocketAddr,
    /// Admin HTTP port: `/live`, `/ready` and Prometheus `/metrics` (no token).
    #[arg(long, env = "MESHWIRE_CP_ADMIN", default_value = "127.0.0.1:15011")]
    pub admin: SocketAddr,
    /// Where the configuration database and the admin token live (created if missing).
    #[arg(long, env = "MESHWIRE_DATA_DIR", default_value = "./meshwire-data")]
    pub data_dir: PathBuf,
    /// Once listening, write `{"listen": "ip:port", "admin": "ip:port", "pid": N}` here (for port 0).
    #[arg(long, env = "MESHWIRE_ADDR_FILE")]
    pub addr_file: Option<PathBuf>,
    /// Log filter (`info`, `meshwire_control_plane=debug`, ...), to stderr.
    #[arg(long, env = "MESHWIRE_LOG", default_value = "info")]
    pub log: String,
    /// Longest wait for open calls and streams on SIGTERM/SIGINT.
    #[arg(long, env = "MESHWIRE_SHUTDOWN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 500ms, 5s, 1m)"))
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    let filter = match EnvFilter::try_new(&args.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("meshwire-control-plane: --log {:?}: {e}", args.log);
            return ExitCode::from(2);
        }
    };
    // An empty variable (as compose files leave them) means unset.
    let admin_token = std::env::var("MESHWIRE_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    if let Some(t) = &admin_token
        && let Err(e) = auth::check_token("MESHWIRE_ADMIN_TOKEN", t)
    {
        eprintln!("meshwire-control-plane: {e}");
        return ExitCode::from(2);
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let mut cfg = ControlPlaneConfig::new(&args.data_dir);
    cfg.listen = args.listen;
    cfg.admin = Some(args.admin);
    cfg.admin_token = admin_token;
    cfg.shutdown_timeout = args.shutdown_timeout;

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshwire-control-plane: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let mut cp = match ControlPlane::start(cfg).await {
            Ok(cp) => cp,
            Err(e) => {
                eprintln!("meshwire-control-plane: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(path) = &args.addr_file
            && let Err(e) = write_addr_file(path, &cp)
        {
            eprintln!(
                "meshwire-control-plane: --addr-file {}: {e}",
                path.display()
            );
            let _ = cp.stop().await;
            return ExitCode::FAILURE;
        }
        let failed = tokio::select! {
            () = wait_for_signal() => None,
            r = cp.wait() => Some(r),
        };
        let result = match failed {
            Some(r) => r,
            None => {
                cp.shutdown();
                cp.wait().await
            }
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("meshwire-control-plane: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stopping on Ctrl-C only");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}

/// Writes the bound address as JSON (a temp file, then rename, so readers
/// never see half of it).
fn write_addr_file(path: &Path, cp: &ControlPlaneHandle) -> std::io::Result<()> {
    let v = serde_json::json!({
        "listen": cp.local_addr.to_string(),
        "admin": cp.admin_addr.map(|a| a.to_string()),
        "pid": std::process::id(),
    });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, v.to_string())?;
    std::fs::rename(tmp, path)
}
