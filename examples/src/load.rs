//! A load client for the echo service: a fixed number of calls in flight
//! (optionally capped at a rate), counting answers per backend instance (the
//! `server` field of each reply) with latency histograms, and failures per
//! gRPC code. Used by the demo and by `meshwire-load`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use meshwire_mesh::grpc::Code;
use meshwire_proto::example::v1::EchoRequest;
use meshwire_proto::example::v1::echo_client::EchoClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// How hard to call.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Calls in flight.
    pub concurrency: usize,
    /// At most this many calls per second in all (`None`: as fast as answers come).
    pub rate: Option<f64>,
    /// Deadline of each call (sent as `grpc-timeout`).
    pub timeout: Duration,
    /// Stop after this many calls in all (`None`: until stopped); a fixed
    /// count makes instruction-count measurements comparable.
    pub calls: Option<u64>,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            rate: None,
            timeout: Duration::from_secs(5),
            calls: None,
        }
    }
}

/// Calls answered by one backend instance.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerReport {
    pub name: String,
    pub calls: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// What the load client saw over a period (one window, or the whole run).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub elapsed: Duration,
    /// Sorted by name.
    pub servers: Vec<ServerReport>,
    /// Failed calls, per gRPC code name.
    pub errors: BTreeMap<String, u64>,
    /// The last failure's code and message, to tell what failed.
    pub last_error: Option<String>,
}

impl Report {
    pub fn calls(&self) -> u64 {
        self.servers.iter().map(|s| s.calls).sum()
    }

    pub(crate) fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn server(&self, name: &str) -> Option<&ServerReport> {
        self.servers.iter().find(|s| s.name == name)
    }

    /// The fraction of answered calls `name` answered (0 if none were).
    pub fn share(&self, name: &str) -> f64 {
        let total = self.calls();
        match self.server(name) {
            Some(s) if total > 0 => s.calls as f64 / total as f64,
            _ => 0.0,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        serde_json::json!({
            "elapsed_s": self.elapsed.as_secs_f64(),
            "calls": self.calls(),
            "errors": self.error_count(),
            "error_codes": self.errors,
            "servers": self.servers.iter().map(|s| serde_json::json!({
                "name": s.name,
                "calls": s.calls,
                "rate": s.calls as f64 / secs,
                "share": self.share(&s.name),
                "p50_ms": s.p50_ms,
                "p99_ms": s.p99_ms,
            })).collect::<Vec<_>>(),
        })
    }
}

#[derive(Debug)]
struct Counts {
    calls: u64,
    latency_us: Histogram<u64>,
}

impl Counts {
    fn new() -> Self {
        Self {
            calls: 0,
            // 1 µs .. 1 min, 3 significant digits.
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
        }
    }
}

#[derive(Debug)]
struct Period {
    started: Instant,
    servers: BTreeMap<String, Counts>,
    errors: BTreeMap<String, u64>,
    last_error: Option<String>,
}

impl Period {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            servers: BTreeMap::new(),
            errors: BTreeMap::new(),
            last_error: None,
        }
    }

    fn record(&mut self, result: &Result<String, tonic::Status>, us: u64) {
        match result {
            Ok(server) => {
                let c = match self.servers.get_mut(server.as_str()) {
                    Some(c) => c,
                    None => self
                        .servers
                        .entry(server.clone())
                        .or_insert_with(Counts::new),
                };
                c.calls += 1;
                let _ = c.latency_us.record(us.max(1));
            }
            Err(status) => {
                let code = Code::from_i32(status.code() as i32);
                *self.errors.entry(code.name().to_owned()).or_insert(0) += 1;
                self.last_error = Some(format!("{}: {}", code.name(), status.message()));
            }
        }
    }

    fn report(&self) -> Report {
        Report {
            elapsed: self.started.elapsed(),
            servers: self
                .servers
                .iter()
                .map(|(name, c)| ServerReport {
                    name: name.clone(),
                    calls: c.calls,
                    p50_ms: c.latency_us.value_at_quantile(0.5) as f64 / 1000.0,
                    p99_ms: c.latency_us.value_at_quantile(0.99) as f64 / 1000.0,
                })
                .collect(),
            errors: self.errors.clone(),
            last_error: self.last_error.clone(),
        }
    }
}

#[derive(Debug)]
struct Stats {
    window: Period,
    total: Period,
}

/// A running load; stop it with [`Load::stop`].
#[derive(Debug)]
pub struct Load {
    stats: Arc<Mutex<Stats>>,
    stop: CancellationToken,
    /// Cancelled when every caller has stopped (`calls` reached).
    finished: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Starts `cfg.concurrency` callers of `Echo/Echo` on `channel`.
    pub fn start(channel: Channel, cfg: &LoadConfig) -> Load {
        let stats = Arc::new(Mutex::new(Stats {
            window: Period::new(),
            total: Period::new(),
        }));
        let stop = CancellationToken::new();
        let finished = CancellationToken::new();
        let conc = cfg.concurrency.max(1);
        let started = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(conc));
        // Each caller gets an equal part of the rate.
        let every = cfg
            .rate
            .filter(|r| *r > 0.0)
            .map(|r| Duration::from_secs_f64(conc as f64 / r));
        let tasks = (0..conc)
            .map(|_| {
                let mut client = EchoClient::new(channel.clone());
                let stats = stats.clone();
                let stop = stop.clone();
                let timeout = cfg.timeout;
                let (limit, started, running, finished) = (
                    cfg.calls,
                    started.clone(),
                    running.clone(),
                    finished.clone(),
                );
                tokio::spawn(async move {
                    let mut pace = every.map(|d| {
                        let mut i = tokio::time::interval(d);
                        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        i
                    });
                    while !stop.is_cancelled() {
                        if limit.is_some_and(|n| {
                            started.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= n
                        }) {
                            break;
                        }
                        if let Some(p) = pace.as_mut() {
                            tokio::select! {
                                _ = p.tick() => {}
                                () = stop.cancelled() => break,
                            }
                        }
                        let mut req = tonic::Request::new(EchoRequest::default());
                        req.set_timeout(timeout);
                        let t = Instant::now();
                        let result = client.echo(req).await.map(|r| r.into_inner().server);
                        let us = t.elapsed().as_micros() as u64;
                        let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
                        s.window.record(&result, us);
                        s.total.record(&result, us);
                    }
                    if running.fetch_sub(1, std::sync::atomic::Ordering::Relaxed) == 1 {
                        finished.cancel();
                    }
                })
            })
            .collect();
        Load {
            stats,
            stop,
            finished,
            tasks,
        }
    }

    /// Resolves once every caller has stopped by itself (`calls` reached).
    pub async fn finished(&self) {
        self.finished.cancelled().await;
    }

    /// What happened since the last call (or the start), and starts a new window.
    pub(crate) fn take_window(&self) -> Report {
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let w = std::mem::replace(&mut s.window, Period::new());
        w.report()
    }

    /// Everything so far.
    pub fn total(&self) -> Report {
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .total
            .report()
    }

    /// Stops calling, lets the calls in flight finish, returns the totals.
    pub async fn stop(mut self) -> Report {
        self.stop.cancel();
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        self.total()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{what} {value:?}: {reason}")]
pub struct AddressError {
    pub what: &'static str,
    pub value: String,
    pub reason: String,
}

/// A (lazily connecting) channel to a sidecar's outbound listener
/// `outbound` (`HOST:PORT`) that names `service` in `:authority`.
pub fn channel(outbound: &str, service: &str) -> Result<Channel, AddressError> {
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{outbound}")).map_err(|e| {
            AddressError {
                what: "sidecar address",
                value: outbound.to_owned(),
                reason: e.to_string(),
            }
        })?;
    let origin: http::Uri =
        format!("http://{service}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| AddressError {
                what: "service",
                value: service.to_owned(),
                reason: e.to_string(),
            })?;
    Ok(endpoint.origin(origin).connect_lazy())
}
