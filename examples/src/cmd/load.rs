//! `meshwire-load`: calls the echo service through a sidecar and reports,
//! every second and at the end, the calls each backend instance answered
//! (count, share, p50/p99) and the failures by gRPC code.
//!
//! `meshwire-load --sidecar 127.0.0.1:15001 --service echo --duration 10s`
//! (the load client of `docker-compose.yml`, and of its end-to-end test).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::load::{self, Load, LoadConfig, Report};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "meshwire-load",
    about = "Load client for the example echo service, through a Meshwire sidecar"
)]
struct Args {
    /// The sidecar's outbound listener.
    #[arg(long, default_value = "127.0.0.1:15001")]
    sidecar: String,
    /// The service to call (sent as :authority).
    #[arg(long, default_value = "echo")]
    service: String,
    /// Calls in flight.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=1024))]
    concurrency: u16,
    /// At most this many calls per second in all (default: as fast as answered).
    #[arg(long)]
    rate: Option<f64>,
    /// Deadline of each call.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Stop after this long and print a summary (default: until SIGTERM/SIGINT).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Stop after this many calls in all and print a summary.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    calls: Option<u64>,
    /// Before calling, wait until the sidecar whose admin port this is reports ready.
    #[arg(long)]
    wait_ready: Option<String>,
    /// Every second, write the last second's report (JSON) here (a health check reads its age).
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// `text`: a line a second; `json`: one JSON object a second and the summary.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    format: String,
}

fn line(r: &Report) -> String {
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    let mut s = format!(
        "calls/s={:.0} errors={}",
        r.calls() as f64 / secs,
        r.error_count()
    );
    for srv in &r.servers {
        s.push_str(&format!(
            " | {} {:.0}/s {:.0}% p50={:.1}ms p99={:.1}ms",
            srv.name,
            srv.calls as f64 / secs,
            100.0 * r.share(&srv.name),
            srv.p50_ms,
            srv.p99_ms
        ));
    }
    if !r.errors.is_empty() {
        s.push_str(&format!(" | failed {:?}", r.errors));
    }
    s
}

fn write_status(path: &std::path::Path, v: &serde_json::Value) {
    let tmp = path.with_extension("tmp");
    if let Err(e) = std::fs::write(&tmp, v.to_string()).and_then(|()| std::fs::rename(&tmp, path)) {
        eprintln!("meshwire-load: --status-file {}: {e}", path.display());
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
pub async fn main() -> ExitCode {
    let args = Args::parse();
    let json = args.format == "json";
    let channel = match load::channel(&args.sidecar, &args.service) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshwire-load: {e}");
            return ExitCode::from(2);
        }
    };
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("meshwire-load: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    if let Some(admin) = &args.wait_ready {
        let waiting = async {
            loop {
                if let Some(p) = &args.status_file {
                    write_status(p, &serde_json::json!({"waiting_for": admin}));
                }
                match crate::probe::wait_ready(admin, Duration::from_secs(1)).await {
                    Ok(()) => return,
                    Err(e) => eprintln!("meshwire-load: waiting for the sidecar: {e}"),
                }
            }
        };
        tokio::select! {
            () = waiting => {}
            _ = term.recv() => return ExitCode::SUCCESS,
            _ = int.recv() => return ExitCode::SUCCESS,
        }
    }
    let load = Load::start(
        channel,
        &LoadConfig {
            concurrency: usize::from(args.concurrency),
            rate: args.rate,
            timeout: args.timeout,
            calls: args.calls,
        },
    );
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = load.finished() => break,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        let w = load.take_window();
        if json {
            println!("{}", w.to_json());
        } else {
            println!("t={:.0}s {}", started.elapsed().as_secs_f64(), line(&w));
        }
        if let Some(p) = &args.status_file {
            write_status(p, &w.to_json());
        }
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
    }
    let total = load.stop().await;
    if json {
        println!("{}", serde_json::json!({ "summary": total.to_json() }));
    } else {
        println!("summary: {}", line(&total));
    }
    ExitCode::SUCCESS
}
