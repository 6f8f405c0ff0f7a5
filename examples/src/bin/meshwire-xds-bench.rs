//! Config propagation benchmark: the time from an admin API call returning to
//! the change being applied in every connected xDS client, and the control
//! plane's memory, with many clients and many endpoints.
//!
//! Run with `cargo build --release -p meshwire-control-plane -p meshwire-examples &&
//! target/release/meshwire-xds-bench --clients 1,1000 --endpoints 10000`.
//!
//! The control plane runs as its own process (real store, real API, real xDS
//! server). The clients are simulated in this process, each with its own
//! connection and ADS stream, running the sidecar's real xDS client code with
//! a sink that accepts the config (no proxying).

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use meshwire_control_plane::auth::Bearer;
use meshwire_mesh::Cluster;
use meshwire_proto::admin::v1::mesh_admin_client::MeshAdminClient;
use meshwire_proto::admin::v1::{
    AddEndpointRequest, CreateServiceRequest, Endpoint, Service, SetEndpointWeightRequest,
};
use meshwire_xds::client::{self, ClientConfig, ClientStatus, ConfigSink};
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
struct Args {
    /// Numbers of connected clients to measure with, comma-separated.
    #[arg(long, default_value = "1,1000", value_delimiter = ',')]
    clients: Vec<usize>,
    /// Endpoints in the mesh, spread over `--services`.
    #[arg(long, default_value_t = 10_000)]
    endpoints: usize,
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// Weight changes measured per client count (one at a time).
    #[arg(long, default_value_t = 50)]
    changes: usize,
    /// Quiet time before each measured change, so each is an isolated change
    /// (bursts are coalesced into one push by design; see BENCHMARKS.md).
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    gap: Duration,
    /// The control-plane binary (default: next to this one).
    #[arg(long)]
    control_plane: Option<PathBuf>,
}

struct Accept;

impl ConfigSink for Accept {
    fn apply(&self, _: &[Cluster]) -> Result<(), client::ApplyError> {
        Ok(())
    }
}

type Admin = MeshAdminClient<InterceptedService<Channel, Bearer>>;

struct Cp {
    child: Child,
    dir: PathBuf,
}

impl Drop for Cp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Cp {
    fn rss_mb(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let kb = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1024.0
        };
        (kb("VmRSS:"), kb("VmHWM:"))
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = match &args.control_plane {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("exe dir")?
            .join("meshwire-control-plane"),
    };
    if !bin.exists() {
        bail!(
            "{} not found: cargo build --release -p meshwire-control-plane",
            bin.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("meshwire-xds-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let addr_file = dir.join("addr.json");
    let child = Command::new(&bin)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--tls-listen",
            "127.0.0.1:0",
            "--log",
            "warn",
        ])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--addr-file")
        .arg(&addr_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start the control plane")?;
    let cp = Cp {
        child,
        dir: dir.clone(),
    };
    let listen = wait_file(&addr_file).await?;
    let listen: serde_json::Value = serde_json::from_str(&listen)?;
    let listen = listen["listen"].as_str().context("listen")?.to_owned();
    let token = std::fs::read_to_string(dir.join("data/admin.token"))?;
    let server = format!("http://{listen}");
    let channel = tonic::transport::Endpoint::from_shared(server.clone())?
        .connect()
        .await?;
    let mut admin: Admin =
        MeshAdminClient::with_interceptor(channel, Bearer::new(Some(token.trim()))?);

    // Populate: services, then endpoints (each an API call, as an operator would).
    let t = Instant::now();
    let per = args.endpoints.div_ceil(args.services);
    for s in 0..args.services {
        admin
            .create_service(CreateServiceRequest {
                service: Some(Service {
                    name: format!("svc-{s}"),
                    ..Default::default()
                }),
            })
            .await?;
    }
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut a = admin.clone();
        let (services, endpoints) = (args.services, args.endpoints);
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < endpoints {
                let s = i % services;
                let addr = format!(
                    "10.{}.{}.{}:15006",
                    s / 200 + 1,
                    s % 200,
                    i / services % 250 + 1
                );
                a.add_endpoint(AddEndpointRequest {
                    service: format!("svc-{s}"),
                    endpoint: Some(Endpoint {
                        address: addr,
                        weight: Some(1),
                        ..Default::default()
                    }),
                })
                .await?;
                i += 8;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    println!(
        "# {} endpoints in {} services ({} per service) registered in {:.1}s",
        args.endpoints,
        args.services,
        per,
        t.elapsed().as_secs_f64()
    );
    let (rss, _) = cp.rss_mb();
    println!("# control plane RSS with no clients: {rss:.1} MB");

    println!(
        "\n{:>8} {:>10} {:>10} {:>10} {:>12} {:>12} {:>10} {:>10}",
        "clients", "p50 ms", "p99 ms", "max ms", "all p50 ms", "all p99 ms", "RSS MB", "peak MB"
    );
    let mut clients: Vec<(tokio::task::JoinHandle<()>, watch::Receiver<ClientStatus>)> = Vec::new();
    for &n in &args.clients {
        while clients.len() < n {
            let (tx, rx) = watch::channel(ClientStatus::default());
            let cfg = ClientConfig {
                servers: vec![server.clone()],
                node_id: format!("bench-{}", clients.len()),
                service: "bench".into(),
                zone: None,
                user_agent: "meshwire-xds-bench".into(),
                connect_timeout: Duration::from_secs(5),
                tls: None,
            };
            clients.push((tokio::spawn(client::run(cfg, Arc::new(Accept), tx)), rx));
        }
        let current = admin
            .list_services(meshwire_proto::admin::v1::ListServicesRequest {})
            .await?
            .into_inner()
            .version;
        wait_all(&clients[..n], current, Duration::from_secs(120)).await?;
        let (rss, peak) = cp.rss_mb();

        let mut each = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
        let mut all = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
        for k in 0..args.changes {
            tokio::time::sleep(args.gap).await;
            let s = k % args.services;
            let addr = format!("10.{}.{}.1:15006", s / 200 + 1, s % 200);
            let weights = [2, 3];
            let started = Instant::now();
            let v = admin
                .set_endpoint_weight(SetEndpointWeightRequest {
                    service: format!("svc-{s}"),
                    address: addr,
                    weight: weights[k % 2],
                })
                .await?
                .into_inner()
                .version;
            let returned = Instant::now();
            let mut waits = Vec::new();
            for (_, rx) in &clients[..n] {
                let mut rx = rx.clone();
                waits.push(tokio::spawn(async move {
                    let _ = rx.wait_for(|s| version(s) >= v).await;
                    Instant::now()
                }));
            }
            let mut last = returned;
            for w in waits {
                let at = w.await?;
                let _ = each.record(at.saturating_duration_since(returned).as_micros() as u64 + 1);
                last = last.max(at);
            }
            let _ = all.record(last.saturating_duration_since(returned).as_micros() as u64 + 1);
            let _ = started;
        }
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "{:>8} {:>10.2} {:>10.2} {:>10.2} {:>12.2} {:>12.2} {:>10.1} {:>10.1}",
            n,
            ms(&each, 0.5),
            ms(&each, 0.99),
            each.max() as f64 / 1000.0,
            ms(&all, 0.5),
            ms(&all, 0.99),
            rss,
            peak
        );
    }
    for (t, _) in clients {
        t.abort();
    }
    Ok(())
}

fn version(s: &ClientStatus) -> u64 {
    s.eds_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn wait_all(
    clients: &[(tokio::task::JoinHandle<()>, watch::Receiver<ClientStatus>)],
    v: u64,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    for (_, rx) in clients {
        let mut rx = rx.clone();
        tokio::time::timeout_at(deadline, rx.wait_for(|s| s.warm && version(s) >= v))
            .await
            .context("clients did not all sync in time")??;
    }
    Ok(())
}

async fn wait_file(p: &std::path::Path) -> anyhow::Result<String> {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for _ in 0..500 {
        tick.tick().await;
        if let Ok(s) = std::fs::read_to_string(p)
            && !s.is_empty()
        {
            return Ok(s);
        }
    }
    bail!("{} never appeared", p.display())
}
