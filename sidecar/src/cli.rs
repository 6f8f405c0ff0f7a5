//! The `meshwire-sidecar` command line: flags → config → runtime → run until
//! SIGTERM/SIGINT → graceful drain. Shared by the binary and by test wrappers.

#![allow(clippy::print_stderr)]

use std::process::ExitCode;

use clap::Parser;
use meshwire_mesh::cli::wait_for_signal;

use crate::config::Args;
use crate::{Sidecar, telemetry};

/// Exit codes: 0 drained cleanly, 1 could not start, 2 bad flags or config,
/// 3 the drain timeout cut in-flight calls short.
pub fn main() -> ExitCode {
    let args = Args::parse();
    // The filter stays replaceable at run time (`POST /logging?level=`).
    let log = match telemetry::init_logging(&args.log, args.log_format) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("meshwire-sidecar: --log: {e}");
            return ExitCode::from(2);
        }
    };
    let workers = usize::from(args.workers);
    let addr_file = args.addr_file.clone();
    let mut cfg = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshwire-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    cfg.log_control = Some(log);
    // One worker: a current-thread runtime avoids work-stealing overhead.
    let rt = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshwire-sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let sidecar = match Sidecar::start(cfg).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("meshwire-sidecar: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(path) = addr_file
            && let Err(e) = write_addr_file(&path, &sidecar)
        {
            eprintln!("meshwire-sidecar: --addr-file {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        // `POST /drain` on the admin port drains like SIGTERM, and the process
        // then exits like after SIGTERM (a container's sidecar stops with it).
        tokio::select! {
            () = wait_for_signal() => {}
            () = sidecar.stopping() => tracing::info!("drain requested on the admin port"),
        }
        sidecar.shutdown();
        if sidecar.wait().await {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(3)
        }
    })
}

/// Writes the bound addresses as JSON (atomically: a temp file, then rename),
/// so scripts and tests that bind port 0 can read the real ports.
fn write_addr_file(path: &std::path::Path, s: &Sidecar) -> std::io::Result<()> {
    let services: serde_json::Map<String, serde_json::Value> = s
        .service_addrs
        .iter()
        .map(|(n, a)| (n.clone(), a.to_string().into()))
        .collect();
    let v = serde_json::json!({
        "outbound": s.outbound_addr.to_string(),
        "inbound": s.inbound_addr.map(|a| a.to_string()),
        "admin": s.admin_addr.to_string(),
        "services": services,
        "gateway": s.gateway_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "pid": std::process::id(),
    });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, v.to_string())?;
    std::fs::rename(tmp, path)
}
