//! The data-plane benchmark: the same closed-loop unary load (a) directly to
//! one echo backend, (b) through one sidecar, (c) through a client sidecar and
//! a server sidecar (the mesh path) in plaintext HTTP/2 and (d) the same pair
//! over mutual TLS (certificates from a CA made at start), at several
//! concurrencies. Prints rps,
//! p50/p99/p99.9 latency, and the sidecars' peak RSS and CPU-seconds per 10k
//! calls (from /proc).
//!
//! Run with `cargo build --release -p meshwire-sidecar -p meshwire-examples &&
//! target/release/meshwire-bench`. By default the sidecars are pinned to the
//! last CPU and the load generator and backend to the others (like
//! `../shared/bench-peers`).
//!
//! `--tracing` measures the cost of call tracing instead: three sidecar pairs
//! under the same load in the same run, without tracing, tracing 1 % of calls
//! and tracing 100 %, exporting over OTLP/gRPC to an in-process collector
//! that accepts and counts spans (`meshwire_examples::otlp`).

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use meshwire_proto::example::v1::EchoRequest;
use meshwire_proto::example::v1::echo_client::EchoClient;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
struct Args {
    /// Concurrencies (calls in flight), comma-separated.
    #[arg(long, default_value = "1,16,64", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Measured time per run.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured time before each run.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Request payload bytes (echoed back).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// HTTP/2 connections the load generator opens.
    #[arg(long, default_value_t = 2)]
    channels: usize,
    /// Worker threads per sidecar.
    #[arg(long, default_value_t = 1)]
    workers: u16,
    /// Rounds; each prints its own table (interleaved setups cancel drift).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// The sidecar binary (default: `meshwire-sidecar` next to this one).
    #[arg(long)]
    sidecar: Option<PathBuf>,
    /// Do not pin (sidecars on the last CPU, the rest for load and backend).
    #[arg(long)]
    no_pin: bool,
    /// Extra flags for every sidecar.
    #[arg(long, allow_hyphen_values = true)]
    sidecar_args: Option<String>,
    /// Only write a throwaway CA's bundle and two workload certificates
    /// (`echo`, `client`: bundle.pem, NAME.crt, NAME.key) into DIR and exit
    /// (for the bench-peers launchers).
    #[arg(long, value_name = "DIR")]
    write_pki: Option<PathBuf>,
    /// Compare sidecar pairs without tracing, tracing 1 % and 100 % of calls.
    #[arg(long)]
    tracing: bool,
}

const PINNED_ENV: &str = "MESHWIRE_BENCH_PINNED";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.write_pki {
        return write_pki(dir);
    }
    // Set in the re-executed child: the CPU left for the sidecars (the child
    // itself only sees its own CPUs).
    if let Ok(cpu) = std::env::var(PINNED_ENV) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return rt.block_on(run(args, Some(cpu)));
    }
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin = !args.no_pin && ncpu >= 2;
    if pin {
        // Re-run ourselves on all CPUs but the last; the sidecars get the last.
        let me = std::env::current_exe()?;
        let status = Command::new("taskset")
            .arg("-c")
            .arg(format!("0-{}", ncpu - 2))
            .arg(me)
            .args(std::env::args_os().skip(1))
            .env(PINNED_ENV, (ncpu - 1).to_string())
            .status()
            .context("taskset (util-linux) is needed for pinning; or pass --no-pin")?;
        std::process::exit(status.code().unwrap_or(1));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args, None))
}

struct Sidecar {
    child: Child,
    addrs: serde_json::Value,
    _dir: PathBuf,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

impl Sidecar {
    fn addr(&self, key: &str) -> anyhow::Result<SocketAddr> {
        Ok(self.addrs[key].as_str().context("address")?.parse()?)
    }

    fn service_addr(&self, service: &str) -> anyhow::Result<SocketAddr> {
        Ok(self.addrs["services"][service]
            .as_str()
            .context("service address")?
            .parse()?)
    }

    /// utime + stime in seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may contain spaces).
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11).and_then(|u| u.parse().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
        ticks / clock_ticks()
    }

    /// Peak resident set size in MB.
    fn peak_rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn spawn_sidecar(
    bin: &Path,
    proxy_cpu: Option<&str>,
    workers: u16,
    extra: &[String],
    args: &[String],
    config: Option<&str>,
) -> anyhow::Result<Sidecar> {
    let dir = std::env::temp_dir().join(format!(
        "meshwire-bench-{}-{}",
        std::process::id(),
        fastrand_suffix()
    ));
    std::fs::create_dir_all(&dir)?;
    let addr_file = dir.join("addrs.json");
    let mut cmd = match proxy_cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpu]).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.args([
        "--outbound",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--log",
        "warn",
    ])
    .arg("--workers")
    .arg(workers.to_string())
    .arg("--addr-file")
    .arg(&addr_file)
    .args(args)
    .args(extra)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::inherit());
    if let Some(yaml) = config {
        let p = dir.join("mesh.yaml");
        std::fs::write(&p, yaml)?;
        cmd.arg("--static-config").arg(p);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    for _ in 0..1000 {
        if let Ok(text) = std::fs::read_to_string(&addr_file) {
            let addrs = serde_json::from_str(&text)?;
            return Ok(Sidecar {
                child,
                addrs,
                _dir: dir,
            });
        }
        if let Some(s) = child.try_wait()? {
            bail!("sidecar exited with {s}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    bail!("sidecar did not start");
}

fn spiffe(service: &str) -> String {
    format!("spiffe://bench.local/ns/default/sa/{service}")
}

/// A throwaway CA and two workload certificates, written to a temp dir.
fn write_pki(dir: &Path) -> anyhow::Result<()> {
    use meshwire_tls::{testing::TestCa, to_pem};
    std::fs::create_dir_all(dir)?;
    let ca = TestCa::new("meshwire-bench");
    std::fs::write(dir.join("bundle.pem"), ca.bundle().to_pem())?;
    for who in ["echo", "client"] {
        let creds = ca.leaf(&spiffe(who));
        let chain: String = creds
            .chain
            .iter()
            .map(|c| to_pem("CERTIFICATE", c))
            .collect();
        std::fs::write(dir.join(format!("{who}.crt")), chain)?;
        std::fs::write(
            dir.join(format!("{who}.key")),
            to_pem("PRIVATE KEY", creds.key.secret_der()),
        )?;
    }
    Ok(())
}

fn fastrand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

struct Setup {
    name: &'static str,
    target: SocketAddr,
    authority: &'static str,
    sidecars: Vec<Sidecar>,
    /// The span sink of a traced setup.
    sink: Option<meshwire_examples::otlp::Collector>,
}

/// client sidecar -> server sidecar -> `backend`, each sidecar with `trace` flags.
fn spawn_pair(
    bin: &Path,
    cpu: Option<&str>,
    args: &Args,
    extra: &[String],
    backend: SocketAddr,
    trace: &[String],
) -> anyhow::Result<Vec<Sidecar>> {
    let flags = |more: &[String]| -> Vec<String> { more.iter().chain(trace).cloned().collect() };
    let server = spawn_sidecar(
        bin,
        cpu,
        args.workers,
        extra,
        &flags(&[
            "--app".into(),
            backend.to_string(),
            "--inbound".into(),
            "127.0.0.1:0".into(),
        ]),
        None,
    )?;
    let client = spawn_sidecar(
        bin,
        cpu,
        args.workers,
        extra,
        &flags(&[]),
        Some(&format!(
            "services:\n  - name: echo\n    endpoints:\n      - address: {}\n",
            server.addr("inbound")?
        )),
    )?;
    Ok(vec![client, server])
}

/// The three setups of `--tracing`.
async fn tracing_setups(
    bin: &Path,
    cpu: Option<&str>,
    args: &Args,
    extra: &[String],
    backend: SocketAddr,
) -> anyhow::Result<Vec<Setup>> {
    let mut setups = Vec::new();
    for (name, ratio) in [
        ("pair, no trace", None),
        ("pair, trace 1%", Some("0.01")),
        ("pair, trace 100%", Some("1")),
    ] {
        let sink = match ratio {
            Some(_) => Some(meshwire_examples::otlp::Collector::start(false).await?),
            None => None,
        };
        let trace: Vec<String> = match (&sink, ratio) {
            (Some(s), Some(r)) => vec![
                "--otlp-endpoint".into(),
                s.endpoint(),
                "--trace-sample-ratio".into(),
                r.into(),
            ],
            _ => vec![],
        };
        let sidecars = spawn_pair(bin, cpu, args, extra, backend, &trace)?;
        setups.push(Setup {
            name,
            target: sidecars[0].addr("outbound")?,
            authority: "echo",
            sidecars,
            sink,
        });
    }
    Ok(setups)
}

async fn run(args: Args, proxy_cpu: Option<String>) -> anyhow::Result<()> {
    let bin = match &args.sidecar {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("exe dir")?
            .join("meshwire-sidecar"),
    };
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p meshwire-sidecar` or pass --sidecar",
            bin.display()
        );
    }
    let extra: Vec<String> = args
        .sidecar_args
        .as_deref()
        .map(|s| s.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let cpu = proxy_cpu.as_deref();
    let backend = meshwire_examples::echo::bind(([127, 0, 0, 1], 0).into(), "backend").await?;

    let setups = if args.tracing {
        tracing_setups(&bin, cpu, &args, &extra, backend.addr).await?
    } else {
        // (b) one sidecar: the load generator calls its outbound listener.
        let one = spawn_sidecar(
            &bin,
            cpu,
            args.workers,
            &extra,
            &[],
            Some(&format!(
                "services:\n  - name: echo\n    endpoints:\n      - address: {}\n",
                backend.addr
            )),
        )?;
        // (c) the mesh path: client sidecar -> server sidecar -> backend.
        let pair = spawn_pair(&bin, cpu, &args, &extra, backend.addr, &[])?;
        // (d) the same pair over mutual TLS, each with its own certificate.
        let pki = std::env::temp_dir().join(format!(
            "meshwire-bench-pki-{}-{}",
            std::process::id(),
            fastrand_suffix()
        ));
        write_pki(&pki)?;
        let tls_args = |who: &str| -> Vec<String> {
            vec![
                "--cert".into(),
                pki.join(format!("{who}.crt")).display().to_string(),
                "--key".into(),
                pki.join(format!("{who}.key")).display().to_string(),
                "--trust-bundle".into(),
                pki.join("bundle.pem").display().to_string(),
            ]
        };
        let mut server_args = vec![
            "--app".into(),
            backend.addr.to_string(),
            "--inbound".into(),
            "127.0.0.1:0".into(),
        ];
        server_args.extend(tls_args("echo"));
        let tls_server = spawn_sidecar(&bin, cpu, args.workers, &extra, &server_args, None)?;
        let tls_client = spawn_sidecar(
            &bin,
            cpu,
            args.workers,
            &extra,
            &tls_args("client"),
            Some(&format!(
                "services:\n  - name: echo\n    endpoints:\n      - address: {}\n        identity: {}\n",
                tls_server.addr("inbound")?,
                spiffe("echo")
            )),
        )?;
        let _ = Sidecar::service_addr;
        vec![
            Setup {
                name: "direct",
                target: backend.addr,
                authority: "echo",
                sidecars: vec![],
                sink: None,
            },
            Setup {
                name: "one sidecar",
                target: one.addr("outbound")?,
                authority: "echo",
                sidecars: vec![one],
                sink: None,
            },
            Setup {
                name: "sidecar pair",
                target: pair[0].addr("outbound")?,
                authority: "echo",
                sidecars: pair,
                sink: None,
            },
            Setup {
                name: "mtls pair",
                target: tls_client.addr("outbound")?,
                authority: "echo",
                sidecars: vec![tls_client, tls_server],
                sink: None,
            },
        ]
    };

    println!(
        "# meshwire-bench: payload {} B, {} channels, {:?} per run (+{:?} warmup), sidecar workers {}, pinned: {}",
        args.payload,
        args.channels,
        args.duration,
        args.warmup,
        args.workers,
        cpu.map_or("no".to_string(), |c| format!("sidecars on cpu {c}"))
    );
    for round in 1..=args.rounds {
        println!("\nround {round}");
        println!(
            "{:<16} {:>5} {:>9} {:>8} {:>8} {:>9} {:>10} {:>8} {:>6} {:>11}",
            "setup",
            "conc",
            "rps",
            "p50 µs",
            "p99 µs",
            "p99.9 µs",
            "cpu-s/10k",
            "RSS MB",
            "errors",
            "spans/call"
        );
        for &conc in &args.concurrency {
            for s in &setups {
                let channels = connect(s.target, s.authority, args.channels).await?;
                let cpu0: f64 = s.sidecars.iter().map(Sidecar::cpu_seconds).sum();
                let spans0 = s.sink.as_ref().map_or(0, |k| k.received());
                let r = load(&channels, conc, args.payload, args.warmup, args.duration).await;
                let cpu1: f64 = s.sidecars.iter().map(Sidecar::cpu_seconds).sum();
                // Spans of this run that reached the collector (the last
                // batch may still be in flight: a lower bound).
                let spans = match &s.sink {
                    Some(k) => format!(
                        "{:.3}",
                        (k.received() - spans0) as f64 / r.calls_total.max(1) as f64
                    ),
                    None => "-".into(),
                };
                let calls = r.calls_total.max(1) as f64;
                let (cpu, rss) = if s.sidecars.is_empty() {
                    ("-".to_string(), "-".to_string())
                } else {
                    (
                        format!("{:.3}", (cpu1 - cpu0) / calls * 10_000.0),
                        format!(
                            "{:.1}",
                            s.sidecars.iter().map(Sidecar::peak_rss_mb).sum::<f64>()
                        ),
                    )
                };
                println!(
                    "{:<16} {:>5} {:>9.0} {:>8} {:>8} {:>9} {:>10} {:>8} {:>6} {:>11}",
                    s.name,
                    conc,
                    r.rps,
                    r.hist.value_at_quantile(0.5),
                    r.hist.value_at_quantile(0.99),
                    r.hist.value_at_quantile(0.999),
                    cpu,
                    rss,
                    r.errors,
                    spans
                );
            }
        }
    }
    backend.stop().await;
    Ok(())
}

async fn connect(
    addr: SocketAddr,
    authority: &str,
    n: usize,
) -> anyhow::Result<Vec<EchoClient<Channel>>> {
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .origin(format!("http://{authority}").parse()?)
            .tcp_nodelay(true)
            .connect()
            .await?;
        out.push(EchoClient::new(ch));
    }
    Ok(out)
}

struct LoadResult {
    rps: f64,
    hist: Histogram<u64>,
    errors: u64,
    /// Calls including warmup (what the sidecar's CPU was spent on).
    calls_total: u64,
}

async fn load(
    clients: &[EchoClient<Channel>],
    conc: usize,
    payload: usize,
    warmup: Duration,
    duration: Duration,
) -> LoadResult {
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..conc {
        let mut c = clients[i % clients.len()].clone();
        let (measuring, stop) = (measuring.clone(), stop.clone());
        let body = vec![0x42u8; payload];
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let (mut errors, mut total) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = c
                    .echo(EchoRequest {
                        payload: body.clone(),
                        ..Default::default()
                    })
                    .await;
                total += 1;
                if measuring.load(Ordering::Relaxed) {
                    match r {
                        Ok(_) => {
                            let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                        }
                        Err(_) => errors += 1,
                    }
                }
            }
            (h, errors, total)
        }));
    }
    tokio::time::sleep(warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let (mut errors, mut calls_total) = (0, 0);
    for t in tasks {
        if let Ok((h, e, n)) = t.await {
            let _ = hist.add(&h);
            errors += e;
            calls_total += n;
        }
    }
    LoadResult {
        rps: hist.len() as f64 / elapsed.as_secs_f64(),
        hist,
        errors,
        calls_total,
    }
}
