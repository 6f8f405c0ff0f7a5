//! The Meshwire demo (`meshwire-demo`): a live mesh on one machine, no other
//! software needed. This module is the binary's body, in the library so the
//! end-to-end tests run it as a process (`tests/tests/e2e/demo.rs`).
//!
//! Everything runs in this one process, so Ctrl-C (or SIGTERM) stops all of
//! it and leaves nothing behind:
//!
//! ```text
//! control plane (admin API + xDS on 127.0.0.1:15010; CA, identity and
//!   │ xDS over mTLS on 127.0.0.1:15012; data in a temp dir)
//!   │ certificate + xDS (mTLS)              ▲ meshctl (another terminal)
//!   ▼
//! load client ─▶ client sidecar ─┬─mTLS─▶ sidecar ─▶ echo-0 (slow)
//!                (service echo)  ├─mTLS─▶ sidecar ─▶ echo-1
//!                                └─mTLS─▶ sidecar ─▶ echo-2
//! ```
//!
//! The echo instances are registered as endpoints of service `echo` through
//! the admin API, exactly as `meshctl endpoint add` does. Every sidecar joins
//! the mesh as users' sidecars do: a single-use join token from the control
//! plane's CA and its trust bundle get it a certificate for
//! `spiffe://<trust domain>/ns/default/sa/<service>`, then it takes its config
//! over xDS on the TLS port, and every sidecar-to-sidecar hop is mutual TLS
//! (the client sidecar checks each endpoint's SPIFFE ID). Every second a table shows,
//! per endpoint, what the client sidecar's balancer runs (weight, draining)
//! and what the load client measured (calls/s, share, p50/p99, errors), and
//! how long the last `meshctl` change took to reach the client sidecar.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use meshwire_control_plane::auth::Bearer;
use meshwire_control_plane::{ControlPlane, ControlPlaneConfig, ControlPlaneHandle};
use meshwire_proto::admin::v1 as pb;
use meshwire_proto::admin::v1::mesh_admin_client::MeshAdminClient;
use meshwire_sidecar::identity::{Bootstrap, IdentityClientConfig};
use meshwire_sidecar::{IdentitySource, Sidecar, SidecarConfig};
use meshwire_xds::Snapshot;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::echo::{self, EchoHandle, EchoOptions};
use crate::load::{Load, LoadConfig, Report};

/// The service the demo's echo instances form.
pub const SERVICE: &str = "echo";

#[derive(Debug, Parser)]
#[command(
    name = "meshwire-demo",
    about = "A live Meshwire mesh on this machine: control plane, echo instances with sidecars, a load client"
)]
pub(crate) struct Args {
    /// Stop after this long and print a summary (default: run until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) duration: Option<Duration>,
    /// Instances of the echo service.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=16))]
    pub(crate) instances: u16,
    /// Service time of a normal instance, in ms.
    #[arg(long, default_value_t = 2)]
    pub(crate) delay_ms: u64,
    /// Service time of the slow instance (echo-0), in ms.
    #[arg(long, default_value_t = 20)]
    pub(crate) slow_delay_ms: u64,
    /// Calls in flight from the load client.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub(crate) concurrency: u16,
    /// The control plane's address (port taken: any free port).
    #[arg(long, default_value = "127.0.0.1:15010")]
    pub(crate) listen: SocketAddr,
    /// The control plane's TLS port: certificates and the sidecars' xDS
    /// (port taken: any free port).
    #[arg(long, default_value = "127.0.0.1:15012")]
    pub(crate) tls_listen: SocketAddr,
    /// The control plane's data directory (default: a temporary one, removed at exit).
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// The client sidecar's outbound address (port taken: any free port).
    #[arg(long, default_value = "127.0.0.1:15001")]
    pub(crate) outbound: SocketAddr,
    /// The client sidecar's admin address (port taken: any free port).
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub(crate) admin: SocketAddr,
    /// `text`: a table refreshed every second; `json`: one JSON object per
    /// line (start-up, every second, summary), for scripts and tests.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub(crate) format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum DemoError {
    #[error("control plane: {0}")]
    ControlPlane(#[from] meshwire_control_plane::StartError),
    #[error("sidecar: {0}")]
    Sidecar(#[from] meshwire_sidecar::StartError),
    #[error("admin API: {0}")]
    Admin(#[from] tonic::Status),
    #[error("connecting to the control plane: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("{0}")]
    Address(#[from] crate::load::AddressError),
    #[error("data directory: {0}")]
    DataDir(std::io::Error),
    #[error("echo server: {0}")]
    Echo(std::io::Error),
    #[error("signals: {0}")]
    Signals(std::io::Error),
    #[error(
        "the client sidecar did not get the {SERVICE} endpoints from the control plane within {0:?}"
    )]
    NotConfigured(Duration),
    #[error("join token for {service}: {source}")]
    Token {
        service: String,
        source: meshwire_control_plane::ca::CaError,
    },
    #[error("the sidecar of {0} got no certificate from the control plane within {1:?}")]
    NoIdentity(String, Duration),
}

/// Runs the demo; the exit code for the process.
pub fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshwire-demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshwire-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

// === the mesh ===

type Admin = MeshAdminClient<InterceptedService<Channel, Bearer>>;

/// One echo instance and its sidecar.
struct Instance {
    name: String,
    delay: Duration,
    /// Its sidecar's inbound listener: the endpoint address in the mesh.
    address: SocketAddr,
    /// `None` while killed (`kill NAME` on stdin).
    app: Option<EchoHandle>,
    /// Where the app listens (it comes back there on `heal NAME`).
    app_addr: SocketAddr,
    sidecar: Sidecar,
}

/// A fault typed on the demo's standard input, to break an instance live
/// and watch the mesh route around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Its app says NOT_SERVING on grpc.health.v1 (its sidecar stops taking calls).
    Fail(String),
    /// Its app stops at once: connections dropped, port closed.
    Kill(String),
    /// Serving again (restarted on its port if it was killed).
    Heal(String),
}

impl Fault {
    pub(crate) fn parse(line: &str) -> Result<Fault, String> {
        let mut words = line.split_whitespace();
        let (Some(verb), Some(name), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!(
                "{line:?}: type `fail NAME`, `kill NAME` or `heal NAME`"
            ));
        };
        let name = name.to_owned();
        match verb {
            "fail" => Ok(Fault::Fail(name)),
            "kill" => Ok(Fault::Kill(name)),
            "heal" => Ok(Fault::Heal(name)),
            _ => Err(format!(
                "{verb:?}: type `fail NAME`, `kill NAME` or `heal NAME`"
            )),
        }
    }

    fn name(&self) -> &str {
        match self {
            Fault::Fail(n) | Fault::Kill(n) | Fault::Heal(n) => n,
        }
    }

    fn verb(&self) -> &'static str {
        match self {
            Fault::Fail(_) => "fail",
            Fault::Kill(_) => "kill",
            Fault::Heal(_) => "heal",
        }
    }
}

/// Lines typed on stdin, as they come (bounded: typing is slow). Read on a
/// thread of its own, not the runtime's blocking pool: a read that never
/// returns must not hold up the runtime's shutdown on Ctrl-C.
fn read_faults() -> tokio::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let spawned = std::thread::Builder::new()
        .name("demo-stdin".into())
        .spawn(move || {
            for l in std::io::stdin().lock().lines().map_while(Result::ok) {
                if !l.trim().is_empty() && tx.blocking_send(l).is_err() {
                    break;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot read faults from stdin");
    }
    rx
}

struct Mesh {
    cp: ControlPlaneHandle,
    instances: Vec<Instance>,
    client: Sidecar,
    /// Held so a temporary data directory lives as long as the demo.
    _temp: Option<tempfile::TempDir>,
}

/// The service the client sidecar belongs to (its identity's `sa/...`).
const CLIENT_SERVICE: &str = "demo-client";

/// How long a join token stays usable: the sidecar uses it at once.
const TOKEN_TTL: Duration = Duration::from_secs(300);

/// Joins `cfg` to the mesh as a sidecar of `service`, the way a user's
/// sidecar joins (`--control-plane https://... --join-token ... --trust-bundle ...`):
/// a single-use token from the CA, the trust bundle, xDS on the TLS port.
fn join(
    cfg: &mut SidecarConfig,
    cp: &ControlPlaneHandle,
    service: &str,
    node: &str,
) -> Result<(), DemoError> {
    let tls_addr = cp
        .tls_addr
        .expect("the demo's control plane always serves TLS");
    let server = format!("https://{tls_addr}");
    let (join_token, _, _) =
        cp.ca
            .create_token("default", service, TOKEN_TTL)
            .map_err(|source| DemoError::Token {
                service: service.to_owned(),
                source,
            })?;
    cfg.control_plane = Some(meshwire_sidecar::ControlPlaneConfig {
        server: server.clone(),
        service: service.to_owned(),
        node_id: node.to_owned(),
    });
    cfg.identity = Some(IdentitySource::ControlPlane(IdentityClientConfig {
        server,
        join_token,
        bootstrap: Bootstrap::Bundle(cp.ca.bundle().bundle.clone()),
        connect_timeout: Duration::from_secs(2),
    }));
    Ok(())
}

/// The SPIFFE ID in the sidecar's certificate, once it has one.
fn spiffe_id(sidecar: &Sidecar) -> Option<String> {
    sidecar
        .identity()
        .and_then(|t| t.current())
        .and_then(|c| c.cert.spiffe_id.clone())
}

async fn start_control_plane(
    args: &Args,
) -> Result<(ControlPlaneHandle, Option<tempfile::TempDir>), DemoError> {
    let (dir, temp) = match &args.data_dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("meshwire-demo-")
                .tempdir()
                .map_err(DemoError::DataDir)?;
            (t.path().to_owned(), Some(t))
        }
    };
    let mut cfg = ControlPlaneConfig::new(&dir);
    cfg.listen = args.listen;
    cfg.tls_listen = Some(args.tls_listen);
    // The sidecars check the control plane's SPIFFE ID; these names are for
    // an https `meshctl --server` (which checks it too).
    cfg.tls_names = vec!["localhost".into(), args.tls_listen.ip().to_string()];
    // A port that is taken becomes any free port (each listener once).
    loop {
        let e = match ControlPlane::start(cfg.clone()).await {
            Ok(cp) => return Ok((cp, temp)),
            Err(e) => e,
        };
        let meshwire_control_plane::StartError::Bind { addr, .. } = &e else {
            return Err(e.into());
        };
        let addr = *addr;
        if addr == cfg.listen && addr.port() != 0 {
            cfg.listen.set_port(0);
        } else if let Some(tls) = cfg
            .tls_listen
            .as_mut()
            .filter(|t| **t == addr && addr.port() != 0)
        {
            tls.set_port(0);
        } else if let Some(admin) = cfg
            .admin
            .as_mut()
            .filter(|a| **a == addr && addr.port() != 0)
        {
            admin.set_port(0);
        } else {
            return Err(e.into());
        }
    }
}

/// Binds `addr`, or any free port on its IP if that one is taken.
async fn start_sidecar(mut cfg: SidecarConfig) -> Result<Sidecar, DemoError> {
    match Sidecar::start(cfg.clone()).await {
        Err(meshwire_sidecar::StartError::Bind { .. }) => {
            cfg.outbound.set_port(0);
            cfg.admin.set_port(0);
            Ok(Sidecar::start(cfg).await?)
        }
        r => Ok(r?),
    }
}

async fn start_mesh(args: &Args) -> Result<Mesh, DemoError> {
    let (cp, temp) = start_control_plane(args).await?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.local_addr))?
        .connect()
        .await?;
    let bearer =
        Bearer::new(Some(&cp.admin_token)).map_err(|e| tonic::Status::internal(e.to_string()))?;
    let mut admin: Admin = MeshAdminClient::with_interceptor(channel, bearer);

    // A data directory from an earlier run may hold endpoints of processes long gone.
    match admin
        .delete_service(pb::DeleteServiceRequest {
            name: SERVICE.into(),
        })
        .await
    {
        Err(s) if s.code() != tonic::Code::NotFound => return Err(s.into()),
        _ => {}
    }
    admin
        .create_service(pb::CreateServiceRequest {
            service: Some(pb::Service {
                name: SERVICE.into(),
                ..Default::default()
            }),
        })
        .await?;

    let mut instances = Vec::new();
    for i in 0..args.instances {
        let name = format!("echo-{i}");
        let delay = Duration::from_millis(if i == 0 {
            args.slow_delay_ms
        } else {
            args.delay_ms
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(DemoError::Echo)?;
        let app = echo::serve_with(
            l,
            &name,
            EchoOptions {
                delay,
                ..Default::default()
            },
        );
        let mut cfg = SidecarConfig::local();
        cfg.app = Some(app.addr);
        cfg.inbound = Some(([127, 0, 0, 1], 0).into());
        join(&mut cfg, &cp, SERVICE, &name)?;
        let sidecar = Sidecar::start(cfg).await?;
        let address = sidecar.inbound_addr.expect("inbound bound with an app");
        admin
            .add_endpoint(pb::AddEndpointRequest {
                service: SERVICE.into(),
                endpoint: Some(pb::Endpoint {
                    address: address.to_string(),
                    weight: Some(1),
                    metadata: [("instance".to_owned(), name.clone())].into(),
                    ..Default::default()
                }),
            })
            .await?;
        instances.push(Instance {
            name,
            delay,
            address,
            app_addr: app.addr,
            app: Some(app),
            sidecar,
        });
    }

    let mut cfg = SidecarConfig::new(args.outbound, args.admin);
    join(&mut cfg, &cp, CLIENT_SERVICE, CLIENT_SERVICE)?;
    let client = start_sidecar(cfg).await?;

    // Calls start once every sidecar has its certificate and the client
    // sidecar runs every endpoint (its xDS stream needs its certificate).
    let limit = Duration::from_secs(10);
    let deadline = Instant::now() + limit;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let sidecars = || {
        instances
            .iter()
            .map(|i| (i.name.as_str(), &i.sidecar))
            .chain([(CLIENT_SERVICE, &client)])
    };
    while let Some((name, _)) = sidecars().find(|(_, s)| spiffe_id(s).is_none()) {
        if Instant::now() > deadline {
            return Err(DemoError::NoIdentity(name.to_owned(), limit));
        }
        tick.tick().await;
    }
    while endpoint_view(&client).len() < instances.len() {
        if Instant::now() > deadline {
            return Err(DemoError::NotConfigured(limit));
        }
        tick.tick().await;
    }
    Ok(Mesh {
        cp,
        instances,
        client,
        _temp: temp,
    })
}

impl Mesh {
    /// Breaks or mends an instance; what happened, for the output.
    async fn apply(&mut self, fault: &Fault) -> Result<String, String> {
        let Some(i) = self.instances.iter_mut().find(|i| i.name == fault.name()) else {
            let names: Vec<&str> = self.instances.iter().map(|i| i.name.as_str()).collect();
            return Err(format!(
                "no instance {:?} (there are {})",
                fault.name(),
                names.join(", ")
            ));
        };
        match fault {
            Fault::Fail(_) => match &i.app {
                Some(app) => {
                    app.set_serving(false).await;
                    Ok(format!(
                        "{} says NOT_SERVING: its sidecar refuses new calls, callers go elsewhere",
                        i.name
                    ))
                }
                None => Err(format!("{} is killed; `heal {}` first", i.name, i.name)),
            },
            Fault::Kill(_) => match i.app.take() {
                Some(app) => {
                    app.abort();
                    Ok(format!(
                        "{} killed: its port is closed, its sidecar refuses new calls",
                        i.name
                    ))
                }
                None => Err(format!("{} is already killed", i.name)),
            },
            Fault::Heal(_) => match &i.app {
                Some(app) => {
                    app.set_serving(true).await;
                    Ok(format!("{} serving again", i.name))
                }
                None => {
                    let l = tokio::net::TcpListener::bind(i.app_addr)
                        .await
                        .map_err(|e| {
                            format!("{} cannot listen on {} again: {e}", i.name, i.app_addr)
                        })?;
                    i.app = Some(echo::serve_with(
                        l,
                        &i.name,
                        EchoOptions {
                            delay: i.delay,
                            ..Default::default()
                        },
                    ));
                    Ok(format!("{} restarted on {}", i.name, i.app_addr))
                }
            },
        }
    }

    async fn stop(self) {
        self.client.shutdown();
        for i in &self.instances {
            i.sidecar.shutdown();
        }
        self.client.wait().await;
        for i in &self.instances {
            i.sidecar.wait().await;
        }
        for i in self.instances {
            if let Some(app) = i.app {
                app.stop().await;
            }
        }
        if let Err(e) = self.cp.stop().await {
            tracing::warn!(error = %e, "control plane stopped with an error");
        }
    }

    /// Every sidecar with its name, the client's last.
    fn sidecars(&self) -> impl Iterator<Item = (&str, &Sidecar)> {
        self.instances
            .iter()
            .map(|i| (i.name.as_str(), &i.sidecar))
            .chain([(CLIENT_SERVICE, &self.client)])
    }

    fn name_of(&self, addr: SocketAddr) -> String {
        self.instances
            .iter()
            .find(|i| i.address == addr)
            .map_or_else(|| addr.to_string(), |i| i.name.clone())
    }
}

/// What the client sidecar's balancer runs for one endpoint.
#[derive(Debug, Clone, PartialEq)]
struct EndpointView {
    weight: u32,
    draining: bool,
    /// Calls the client sidecar counted as failed on this endpoint, ever.
    failures: u64,
    /// The SPIFFE ID the client sidecar requires this endpoint to present.
    identity: Option<String>,
}

fn endpoint_view(client: &Sidecar) -> BTreeMap<SocketAddr, EndpointView> {
    let table = client.routes().load();
    let Some(cluster) = table.get(SERVICE) else {
        return BTreeMap::new();
    };
    let set = cluster.endpoints.load();
    set.entries()
        .iter()
        .map(|e| {
            (
                e.endpoint.addr,
                EndpointView {
                    weight: e.weight,
                    draining: e.draining,
                    failures: e.endpoint.stats.failed(),
                    identity: e.endpoint.identity.clone(),
                },
            )
        })
        .collect()
}

// === config changes: how fast they reach the client sidecar ===

#[derive(Debug, Clone)]
struct Change {
    version: u64,
    what: String,
    /// From the commit's publish to the client sidecar running it.
    applied_in: Option<Duration>,
}

/// Weight and draining of the demo service's endpoints in a snapshot.
fn wanted(s: &Snapshot) -> BTreeMap<SocketAddr, (u32, bool)> {
    s.clusters
        .get(SERVICE)
        .map(|c| {
            c.endpoints
                .iter()
                .map(|e| (e.address, (e.weight, e.draining)))
                .collect()
        })
        .unwrap_or_default()
}

fn describe(
    names: &BTreeMap<SocketAddr, String>,
    before: &BTreeMap<SocketAddr, (u32, bool)>,
    after: &BTreeMap<SocketAddr, (u32, bool)>,
) -> String {
    let name = |a: &SocketAddr| names.get(a).cloned().unwrap_or_else(|| a.to_string());
    let mut parts = Vec::new();
    for (a, (w, d)) in after {
        match before.get(a) {
            None => parts.push(format!("{} added", name(a))),
            Some((w0, d0)) => {
                if w0 != w {
                    parts.push(format!("{} weight {w0} → {w}", name(a)));
                }
                if d0 != d {
                    parts.push(format!(
                        "{} {}",
                        name(a),
                        if *d { "draining" } else { "active again" }
                    ));
                }
            }
        }
    }
    for a in before.keys().filter(|a| !after.contains_key(a)) {
        parts.push(format!("{} removed", name(a)));
    }
    if parts.is_empty() {
        "other services".into()
    } else {
        parts.join(", ")
    }
}

/// Follows the control plane's snapshots; for each one that changes the
/// demo service, measures when the client sidecar runs it.
fn watch_changes(mesh: &Mesh, last: Arc<Mutex<Option<Change>>>) -> tokio::task::JoinHandle<()> {
    let mut snapshots = mesh.cp.snapshots();
    let names: BTreeMap<SocketAddr, String> = mesh
        .instances
        .iter()
        .map(|i| (i.address, i.name.clone()))
        .collect();
    let routes = mesh.client.routes().clone();
    tokio::spawn(async move {
        let mut before = wanted(&snapshots.borrow_and_update());
        while snapshots.changed().await.is_ok() {
            let published = Instant::now();
            let snap = snapshots.borrow_and_update().clone();
            let after = wanted(&snap);
            if after == before {
                continue;
            }
            let what = describe(&names, &before, &after);
            before = after.clone();
            // Poll the route table (an atomic load) until it matches; bounded.
            let mut applied_in = None;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            while published.elapsed() < Duration::from_secs(5) {
                tick.tick().await;
                let table = routes.load();
                let now: BTreeMap<SocketAddr, (u32, bool)> = table
                    .get(SERVICE)
                    .map(|c| {
                        c.endpoints
                            .load()
                            .entries()
                            .iter()
                            .map(|e| (e.endpoint.addr, (e.weight, e.draining)))
                            .collect()
                    })
                    .unwrap_or_default();
                if now == after {
                    applied_in = Some(published.elapsed());
                    break;
                }
            }
            *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Change {
                version: snap.version,
                what,
                applied_in,
            });
        }
    })
}

// === output ===

/// One row of the table.
#[derive(Debug)]
struct Row {
    name: String,
    address: SocketAddr,
    delay: Duration,
    view: Option<EndpointView>,
    /// Failures the client sidecar counted in this period.
    errors: u64,
}

fn rows(
    mesh: &Mesh,
    views: &BTreeMap<SocketAddr, EndpointView>,
    since: &BTreeMap<SocketAddr, u64>,
) -> Vec<Row> {
    let mut rows: Vec<Row> = mesh
        .instances
        .iter()
        .map(|i| {
            let view = views.get(&i.address).cloned();
            let errors = view.as_ref().map_or(0, |v| {
                v.failures - since.get(&i.address).copied().unwrap_or(0)
            });
            Row {
                name: i.name.clone(),
                address: i.address,
                delay: i.delay,
                view,
                errors,
            }
        })
        .collect();
    // Endpoints someone added with meshctl.
    for (a, v) in views {
        if !mesh.instances.iter().any(|i| i.address == *a) {
            rows.push(Row {
                name: mesh.name_of(*a),
                address: *a,
                delay: Duration::ZERO,
                view: Some(v.clone()),
                errors: v.failures - since.get(a).copied().unwrap_or(0),
            });
        }
    }
    rows
}

/// The SPIFFE IDs the client sidecar requires of the endpoints, deduplicated.
fn peer_identities(views: &BTreeMap<SocketAddr, EndpointView>) -> String {
    let ids: std::collections::BTreeSet<&str> = views
        .values()
        .map(|v| v.identity.as_deref().unwrap_or("(any mesh identity)"))
        .collect();
    ids.into_iter().collect::<Vec<_>>().join(", ")
}

fn state(v: Option<&EndpointView>) -> &'static str {
    match v {
        None => "removed",
        Some(v) if v.draining => "draining",
        Some(_) => "active",
    }
}

fn text_table(rows: &[Row], report: &Report, per_second: bool) -> String {
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    let mut out = format!(
        "{:<8} {:<21} {:>6} {:<8} {:>8} {:>9} {:>6} {:>8} {:>8} {:>6}\n",
        "endpoint",
        "address",
        "weight",
        "state",
        "delay",
        if per_second { "calls/s" } else { "calls" },
        "share",
        "p50 ms",
        "p99 ms",
        "errors"
    );
    for r in rows {
        let s = report.server(&r.name);
        let calls = s.map_or(0, |s| s.calls);
        let shown = if per_second {
            format!("{:.0}", calls as f64 / secs)
        } else {
            calls.to_string()
        };
        out.push_str(&format!(
            "{:<8} {:<21} {:>6} {:<8} {:>8} {:>9} {:>5.1}% {:>8.2} {:>8.2} {:>6}\n",
            r.name,
            r.address.to_string(),
            r.view.as_ref().map_or("-".into(), |v| v.weight.to_string()),
            state(r.view.as_ref()),
            format!("{}ms", r.delay.as_millis()),
            shown,
            100.0 * report.share(&r.name),
            s.map_or(0.0, |s| s.p50_ms),
            s.map_or(0.0, |s| s.p99_ms),
            r.errors,
        ));
    }
    let failed = report.error_count();
    if failed > 0 {
        out.push_str(&format!(
            "load client: {failed} calls failed {:?}\n",
            report.errors
        ));
    }
    out
}

fn json_rows(rows: &[Row], report: &Report) -> serde_json::Value {
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    rows.iter()
        .map(|r| {
            let s = report.server(&r.name);
            let calls = s.map_or(0, |s| s.calls);
            serde_json::json!({
                "name": r.name,
                "address": r.address.to_string(),
                "weight": r.view.as_ref().map(|v| v.weight),
                "state": state(r.view.as_ref()),
                "delay_ms": r.delay.as_millis() as u64,
                "calls": calls,
                "rate": calls as f64 / secs,
                "share": report.share(&r.name),
                "p50_ms": s.map_or(0.0, |s| s.p50_ms),
                "p99_ms": s.map_or(0.0, |s| s.p99_ms),
                "errors": r.errors,
                "identity": r.view.as_ref().and_then(|v| v.identity.clone()),
            })
        })
        .collect()
}

fn change_json(c: Option<&Change>) -> serde_json::Value {
    c.map_or(serde_json::Value::Null, |c| {
        serde_json::json!({
            "version": c.version,
            "what": c.what,
            "applied_ms": c.applied_in.map(|d| d.as_secs_f64() * 1000.0),
        })
    })
}

fn change_text(c: Option<&Change>) -> String {
    match c {
        None => "last change: none yet (try the meshctl commands above)".into(),
        Some(c) => match c.applied_in {
            Some(d) => format!(
                "last change: v{} {} — running in the client sidecar {:.1} ms after the commit",
                c.version,
                c.what,
                d.as_secs_f64() * 1000.0
            ),
            None => format!(
                "last change: v{} {} — not seen in the client sidecar within 5 s",
                c.version, c.what
            ),
        },
    }
}

/// How to run `meshctl` from here: the binary beside this one, else cargo.
fn meshctl_command() -> String {
    let exe = std::env::current_exe().ok();
    let dir = exe.as_deref().and_then(Path::parent);
    if let Some(m) = dir.map(|d| d.join("meshctl")).filter(|m| m.exists()) {
        return m.display().to_string();
    }
    let release = dir
        .and_then(Path::file_name)
        .is_some_and(|n| n == "release");
    if release {
        "cargo run -q --release --bin meshctl --".into()
    } else {
        "cargo run -q --bin meshctl --".into()
    }
}

fn intro(mesh: &Mesh, args: &Args) -> String {
    let ctl = format!(
        "{} --server http://{} --data-dir {}",
        meshctl_command(),
        mesh.cp.local_addr,
        shell_quote(&mesh.cp.data_dir.display().to_string())
    );
    let slow = &mesh.instances[0];
    let fast = &mesh.instances[mesh.instances.len() - 1];
    let mut s = format!(
        "Meshwire demo: control plane on {cp} (TLS {tls}); {n} instances of service `{SERVICE}` each behind its own sidecar \
         ({slow} is slow: {sd} ms vs {fd} ms);\n\
         a load client with {c} calls in flight through the client sidecar (outbound {out}, admin http://{adm}).\n\
         Every sidecar joined with a join token: its certificate comes from the control plane's CA \
         (trust domain {td}), its config over xDS on the TLS port,\n\
         and every sidecar-to-sidecar hop is mutual TLS 1.3 (the client sidecar checks each endpoint's SPIFFE ID).\n\
         The identities (each sidecar's /certs shows its certificate):\n",
        cp = mesh.cp.local_addr,
        tls = mesh
            .cp
            .tls_addr
            .map_or_else(|| "off".into(), |a| a.to_string()),
        td = mesh.cp.ca.trust_domain(),
        n = mesh.instances.len(),
        slow = slow.name,
        sd = args.slow_delay_ms,
        fd = args.delay_ms,
        c = args.concurrency,
        out = mesh.client.outbound_addr,
        adm = mesh.client.admin_addr,
    );
    for (name, sidecar) in mesh.sidecars() {
        s.push_str(&format!(
            "  {name:<12} {:<46} http://{}/certs\n",
            spiffe_id(sidecar).unwrap_or_else(|| "(no certificate)".into()),
            sidecar.admin_addr,
        ));
    }
    s.push_str("\nTry in another terminal (the table shows the effect within a second):\n");
    let lines = [
        (
            format!("endpoint weight {SERVICE} {} 5", fast.address),
            format!("{} gets about 5x the calls", fast.name),
        ),
        (
            format!("endpoint drain {SERVICE} {}", fast.address),
            format!("{} gets no new calls (--undo to bring it back)", fast.name),
        ),
        (
            format!("endpoint list {SERVICE}"),
            "the endpoints as the control plane has them".into(),
        ),
        (
            "status".into(),
            "connected sidecars and the version each ACKed".into(),
        ),
        (
            "ca show".into(),
            "the mesh CA: trust domain and root fingerprints".into(),
        ),
    ];
    for (cmd, why) in lines {
        s.push_str(&format!("  {ctl} {cmd}\n      # {why}\n"));
    }
    s.push_str(&format!(
        "\nBreak an instance live: type `fail {n}` (NOT_SERVING), `kill {n}` (the app stops) or \
         `heal {n}` here, then Enter;\nthe mesh routes around it and the load sees no failed call.\n",
        n = fast.name
    ));
    s.push_str(&format!(
        "  curl -s http://{}/clusters     # what the client sidecar's balancer sees\n",
        mesh.client.admin_addr
    ));
    s.push_str(&format!(
        "  curl -s http://{}/metrics      # the client sidecar's Prometheus metrics\n",
        mesh.client.admin_addr
    ));
    if let Some(a) = mesh.cp.admin_addr {
        s.push_str(&format!(
            "  curl -s http://{a}/metrics      # the control plane's (pushes, ACKs, API calls)\n"
        ));
    }
    s
}

fn shell_quote(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-:".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

// === the run ===

async fn run(args: Args) -> Result<(), DemoError> {
    use tokio::signal::unix::{SignalKind, signal};
    // Installed first: a Ctrl-C during start-up still stops everything cleanly.
    let mut int = signal(SignalKind::interrupt()).map_err(DemoError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(DemoError::Signals)?;

    let mut mesh = start_mesh(&args).await?;
    let mut faults = read_faults();
    let last_change = Arc::new(Mutex::new(None::<Change>));
    let watcher = watch_changes(&mesh, last_change.clone());
    let channel = crate::load::channel(&mesh.client.outbound_addr.to_string(), SERVICE)?;
    let load = Load::start(
        channel,
        &LoadConfig {
            concurrency: usize::from(args.concurrency),
            ..Default::default()
        },
    );

    let intro = intro(&mesh, &args);
    let tty = args.format == Format::Text && std::io::stdout().is_terminal();
    match args.format {
        Format::Text => println!("{intro}"),
        Format::Json => println!(
            "{}",
            serde_json::json!({
                "control_plane": format!("http://{}", mesh.cp.local_addr),
                "data_dir": mesh.cp.data_dir,
                "client_admin": mesh.client.admin_addr.to_string(),
                "client_outbound": mesh.client.outbound_addr.to_string(),
                "service": SERVICE,
                "control_plane_tls": mesh.cp.tls_addr.map(|a| format!("https://{a}")),
                "trust_domain": mesh.cp.ca.trust_domain(),
                "client_identity": spiffe_id(&mesh.client),
                "endpoints": mesh.instances.iter().map(|i| serde_json::json!({
                    "name": i.name,
                    "address": i.address.to_string(),
                    "delay_ms": i.delay.as_millis() as u64,
                    "admin": i.sidecar.admin_addr.to_string(),
                    "identity": spiffe_id(&i.sidecar),
                })).collect::<Vec<_>>(),
            })
        ),
    }

    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut failures_before: BTreeMap<SocketAddr, u64> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = int.recv() => break,
            _ = term.recv() => break,
            Some(line) = faults.recv() => {
                let fault = Fault::parse(&line);
                let result = match &fault {
                    Ok(f) => mesh.apply(f).await,
                    Err(e) => Err(e.clone()),
                };
                match args.format {
                    Format::Text => match &result {
                        Ok(what) => println!("fault: {what}"),
                        Err(e) => println!("fault not applied: {e}"),
                    },
                    Format::Json => println!(
                        "{}",
                        serde_json::json!({
                            "fault": fault.as_ref().map(Fault::verb).ok(),
                            "instance": fault.as_ref().map(Fault::name).ok(),
                            "ok": result.is_ok(),
                            "message": result.unwrap_or_else(|e| e),
                        })
                    ),
                }
                continue;
            }
        }
        let report = load.take_window();
        let views = endpoint_view(&mesh.client);
        let rows = rows(&mesh, &views, &failures_before);
        failures_before.extend(views.iter().map(|(a, v)| (*a, v.failures)));
        let change = last_change
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let t = started.elapsed().as_secs_f64();
        match args.format {
            Format::Text => {
                let mut out = String::new();
                if tty {
                    out.push_str("\x1b[2J\x1b[H");
                    out.push_str(&intro);
                    out.push('\n');
                }
                out.push_str(&format!(
                    "t={t:.0}s  config v{}  every hop mTLS: {CLIENT_SERVICE} → {}  (Ctrl-C stops everything)\n",
                    mesh.cp.version(),
                    peer_identities(&views),
                ));
                out.push_str(&text_table(&rows, &report, true));
                out.push_str(&change_text(change.as_ref()));
                println!("{out}\n");
            }
            Format::Json => println!(
                "{}",
                serde_json::json!({
                    "t": t,
                    "version": mesh.cp.version(),
                    "endpoints": json_rows(&rows, &report),
                    "load_errors": report.error_count(),
                    "last_change": change_json(change.as_ref()),
                })
            ),
        }
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
    }

    let total = load.stop().await;
    let views = endpoint_view(&mesh.client);
    let rows = rows(&mesh, &views, &BTreeMap::new());
    match args.format {
        Format::Text => println!(
            "summary over {:.1}s ({} calls, {} failed):\n{}",
            total.elapsed.as_secs_f64(),
            total.calls(),
            total.error_count(),
            text_table(&rows, &total, false)
        ),
        Format::Json => println!(
            "{}",
            serde_json::json!({
                "summary": {
                    "elapsed_s": total.elapsed.as_secs_f64(),
                    "calls": total.calls(),
                    "errors": total.error_count(),
                    "error_codes": total.errors,
                    "endpoints": json_rows(&rows, &total),
                }
            })
        ),
    }
    watcher.abort();
    mesh.stop().await;
    Ok(())
}
