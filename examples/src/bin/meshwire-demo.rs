//! The Meshwire demo: a live mesh on one machine, no other software needed.
//!
//! Run with `cargo run --release --bin meshwire-demo` (add `-- --duration 10s`
//! for a non-interactive run that prints a summary).
//!
//! It starts several instances of the example `echo` service, one of them
//! deliberately slower, each behind its own sidecar; a client sidecar that
//! knows them as service `echo` (static config, weighted least-request); and a
//! load client calling through it. Every second it shows, per endpoint, the
//! weight, calls per second, share of calls, p50/p99 latency and errors, so
//! you can watch the balancer steer around the slow instance.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use meshwire_examples::echo::{self, EchoOptions};
use meshwire_proto::example::v1::EchoRequest;
use meshwire_proto::example::v1::echo_client::EchoClient;
use meshwire_sidecar::{Sidecar, SidecarConfig};
use meshwire_xds::{Cluster, Endpoint};

#[derive(Debug, Parser)]
#[command(about = "A live Meshwire mesh on this machine")]
struct Args {
    /// Stop after this long and print a summary (default: run until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Instances of the echo service.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=16))]
    instances: u16,
    /// Service time of a normal instance, in ms.
    #[arg(long, default_value_t = 2)]
    delay_ms: u64,
    /// Service time of the slow instance (the first), in ms.
    #[arg(long, default_value_t = 20)]
    slow_delay_ms: u64,
    /// Calls in flight from the load client.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// The client sidecar's outbound and admin addresses (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:15001")]
    outbound: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
}

#[derive(Default)]
struct PerEndpoint {
    ok: u64,
    errors: u64,
    window: Option<Histogram<u64>>,
    total: Option<Histogram<u64>>,
    window_calls: u64,
}

type Stats = Arc<Mutex<BTreeMap<String, PerEndpoint>>>;

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();

    // Backends, each behind its own sidecar (in-process here; `meshwire-sidecar`
    // runs the same code as a separate process).
    let mut backends = Vec::new();
    let mut servers = Vec::new();
    let mut endpoints = Vec::new();
    for i in 0..args.instances {
        let slow = i == 0;
        let delay = Duration::from_millis(if slow {
            args.slow_delay_ms
        } else {
            args.delay_ms
        });
        let name = if slow {
            format!("echo-{i} (slow)")
        } else {
            format!("echo-{i}")
        };
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        backends.push(echo::serve_with(
            l,
            &name,
            EchoOptions {
                delay,
                ..Default::default()
            },
        ));
        let mut cfg = SidecarConfig::local();
        cfg.app = Some(backends.last().map(|b| b.addr).expect("just pushed"));
        cfg.inbound = Some(([127, 0, 0, 1], 0).into());
        let sc = Sidecar::start(cfg).await?;
        endpoints.push(Endpoint::new(sc.inbound_addr.expect("inbound bound")));
        servers.push(sc);
    }
    let mut cluster = Cluster::new("echo");
    cluster.endpoints = endpoints;
    let client = start_client(&args, cluster).await?;

    println!(
        "Meshwire demo: {} instances of `echo`, instance 0 is slow ({} ms vs {} ms).",
        args.instances, args.slow_delay_ms, args.delay_ms
    );
    println!(
        "  client sidecar: outbound {}  admin http://{}",
        client.outbound_addr, client.admin_addr
    );
    println!("  try:  curl -s http://{}/clusters", client.admin_addr);
    println!(
        "        grpcurl-style calls: any gRPC client to {} with :authority `echo`",
        client.outbound_addr
    );
    println!();

    let stats: Stats = Arc::default();
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", client.outbound_addr))?
            .origin("http://echo".parse()?)
            .connect()
            .await?;
    let stop = tokio_util_stop();
    let mut load = Vec::new();
    for _ in 0..args.concurrency {
        let mut c = EchoClient::new(channel.clone());
        let stats = stats.clone();
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let r = c.echo(EchoRequest::default()).await;
                let us = t.elapsed().as_micros() as u64;
                let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
                match r {
                    Ok(reply) => {
                        let e = s.entry(reply.into_inner().server).or_default();
                        e.ok += 1;
                        e.window_calls += 1;
                        let _ = e.window.get_or_insert_with(hist).record(us.max(1));
                        let _ = e.total.get_or_insert_with(hist).record(us.max(1));
                    }
                    Err(_) => s.entry("(errors)".into()).or_default().errors += 1,
                }
            }
        }));
    }

    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let tty = std::io::stdout().is_terminal();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let table = render(&stats, true);
                if tty {
                    print!("\x1b[2J\x1b[H");
                }
                println!("t={:>4.0}s   (Ctrl-C to stop)", started.elapsed().as_secs_f64());
                println!("{table}");
                if args.duration.is_some_and(|d| started.elapsed() >= d) {
                    break;
                }
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in load {
        let _ = t.await;
    }
    println!("summary over {:.1}s:", started.elapsed().as_secs_f64());
    println!("{}", render(&stats, false));

    client.shutdown();
    for s in &servers {
        s.shutdown();
    }
    client.wait().await;
    for s in &servers {
        s.wait().await;
    }
    for b in backends {
        b.stop().await;
    }
    Ok(())
}

fn tokio_util_stop() -> Arc<std::sync::atomic::AtomicBool> {
    Arc::new(std::sync::atomic::AtomicBool::new(false))
}

async fn start_client(args: &Args, cluster: Cluster) -> anyhow::Result<Sidecar> {
    let mut cfg = SidecarConfig::new(args.outbound, args.admin);
    cfg.clusters = vec![cluster.clone()];
    match Sidecar::start(cfg).await {
        Ok(s) => Ok(s),
        // The default ports are taken (another sidecar?): use free ones.
        Err(meshwire_sidecar::StartError::Bind { .. }) => {
            let mut cfg = SidecarConfig::local();
            cfg.clusters = vec![cluster];
            Ok(Sidecar::start(cfg).await?)
        }
        Err(e) => Err(e.into()),
    }
}

/// One line per endpoint: calls/s and latency over the last second (`window`)
/// or totals (`!window`), and each endpoint's share of calls.
fn render(stats: &Stats, window: bool) -> String {
    let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
    let total: u64 = s
        .values()
        .map(|e| if window { e.window_calls } else { e.ok })
        .sum::<u64>()
        .max(1);
    let mut out = format!(
        "{:<16} {:>9} {:>7} {:>9} {:>9} {:>7}\n",
        "endpoint", "calls/s", "share", "p50 ms", "p99 ms", "errors"
    );
    for (name, e) in s.iter_mut() {
        let calls = if window { e.window_calls } else { e.ok };
        let h = if window {
            e.window.as_ref()
        } else {
            e.total.as_ref()
        };
        let (p50, p99) = h.map_or((0.0, 0.0), |h| {
            (
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
            )
        });
        let rate = if window {
            calls.to_string()
        } else {
            "-".into()
        };
        out.push_str(&format!(
            "{:<16} {:>9} {:>6.1}% {:>9.2} {:>9.2} {:>7}\n",
            name,
            rate,
            100.0 * calls as f64 / total as f64,
            p50,
            p99,
            e.errors
        ));
        if window {
            e.window_calls = 0;
            e.window = None;
        }
    }
    out
}
