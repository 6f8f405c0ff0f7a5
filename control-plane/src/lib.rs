//! Meshwire's control plane: owns the mesh's configuration (services,
//! endpoints, weights), persists it, takes changes through a gRPC admin API
//! and pushes them to every sidecar over xDS v3 (ADS).
//!
//! # One change
//! ```text
//! meshctl / gRPC ──▶ api (token check, INVALID_ARGUMENT naming the field)
//!   ─▶ registry: validate against the current state ─▶ store commit (redb, fsync)
//!   ─▶ apply in memory, version += 1, answer the call, announce to Watch streams
//!   ─▶ publish: new Arc<Snapshot> on a watch channel, coalesced (≤ 1 per 20 ms)
//!   ─▶ xds_server: every ADS stream pushes what its node has not ACKed
//! ```
//!
//! # Ports
//! - plaintext (`--listen`, 15010): the admin API (bearer token); the
//!   Identity service only answers FAILED_PRECONDITION there, and so does xDS
//!   unless `--plaintext-xds` ([`ControlPlaneConfig::plaintext_xds`]).
//! - TLS 1.3 (`--tls-listen`, 15012, [`tls`]): Identity (certificate issuance,
//!   renewal, the trust bundle), xDS (to clients with a mesh certificate;
//!   UNAUTHENTICATED without one, unless `--plaintext-xds`) and the admin API
//!   (token, or a client certificate with the admin identity).
//! - admin HTTP (`--admin`, 15011, [`admin`], [`telemetry`]): `/live`,
//!   `/ready` and Prometheus `/metrics` (no token).
//!
//! # Identity
//! [`ca::Ca`] is the mesh's certificate authority (roots in
//! `<data-dir>/ca`, in etcd with `--etcd` (keys sealed, shared by the
//! replicas: [`ca::shared`]), or the user's CA): `meshctl token create` makes a
//! single-use join token bound to one SPIFFE ID; a sidecar trades it and a
//! CSR for a certificate ([`identity_api`], over TLS only), then renews over
//! mutual TLS with the identity of its certificate. Roots rotate through the
//! admin API (add, activate, remove) while the TLS port's own certificate
//! follows.
//!
//! Start it in-process with [`ControlPlane::start`] (tests bind
//! `127.0.0.1:0` and read the ports back), or run `meshwire-control-plane`;
//! `meshctl` is its command-line client.

pub mod admin;
pub mod api;
pub mod auth;
pub mod ca;
pub mod cli;
pub mod health;
pub mod identity_api;
pub mod meshctl;
pub mod net;
pub mod nodes;
pub mod publish;
pub mod registry;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod xds_server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshwire_xds::Snapshot;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;

use crate::api::AdminApi;
use crate::auth::TokenError;
use crate::ca::{Ca, CaConfig, CaError};
use crate::identity_api::IdentityApi;
use crate::nodes::NodeRegistry;
use crate::registry::Registry;
use crate::store::{EtcdConfig, EtcdStore, RedbStore, Store, StoreError};
use crate::telemetry::{CountApiCalls, CpMetrics, XdsObserver};

/// The database file's name inside the data directory.
pub const DB_FILE: &str = "meshwire.redb";

/// Everything a control plane needs to start.
#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// The one port for the admin API and xDS.
    pub listen: SocketAddr,
    /// The admin HTTP port (`/live`, `/ready`, `/metrics`); `None`: not served.
    pub admin: Option<SocketAddr>,
    /// Holds the database and the admin token; created if missing.
    pub data_dir: PathBuf,
    /// The admin token; `None` reads (or creates) `<data_dir>/admin.token`.
    pub admin_token: Option<String>,
    /// Changes within this window after a publish are folded into one.
    pub publish_window: Duration,
    /// Longest wait for open calls and streams on shutdown.
    pub shutdown_timeout: Duration,
    /// The TLS port (Identity, ADS, admin API); `None` serves no TLS, and so
    /// issues no certificates.
    pub tls_listen: Option<SocketAddr>,
    /// DNS names / IPs in the serving certificate (beside its SPIFFE ID).
    pub tls_names: Vec<String>,
    /// The mesh CA: trust domain, certificate lifetime, user-supplied CA.
    pub ca: CaConfig,
    /// Where the configuration lives: the embedded database in `data_dir`
    /// (default), or etcd, shared with other replicas.
    pub store: StoreConfig,
    /// How long an unrefreshed unhealthy mark lasts ([`health`]).
    pub health_ttl: Duration,
    /// Serve xDS to anonymous clients: on the plaintext port, and on the TLS
    /// port without a client certificate. Off by default: xDS holds every
    /// service's endpoints, identities and policies, and a stream registers a
    /// node under the id it claims. For local Envoy / proxyless experiments.
    pub plaintext_xds: bool,
    /// When every port closes a connection: no call within the first-request
    /// timeout, or idle ([`net::ConnLimits`]).
    pub conn_limits: net::ConnLimits,
    /// Connections held at once over all ports; at the budget a new one
    /// closes the oldest silent or idle one ([`net::Connections`]). `None`:
    /// from the descriptor limit at start.
    pub max_connections: Option<usize>,
}

/// Where the mesh configuration is kept.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum StoreConfig {
    /// `<data_dir>/meshwire.redb`: one control plane.
    #[default]
    Embedded,
    /// etcd: any number of interchangeable replicas.
    Etcd(EtcdConfig),
}

impl ControlPlaneConfig {
    pub const DEFAULT_LISTEN: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 15010);
    pub const DEFAULT_ADMIN: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15011);

    pub const DEFAULT_TLS_LISTEN: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 15012);

    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: Self::DEFAULT_LISTEN,
            admin: Some(Self::DEFAULT_ADMIN),
            data_dir: data_dir.into(),
            admin_token: None,
            publish_window: publish::DEFAULT_WINDOW,
            shutdown_timeout: Duration::from_secs(5),
            tls_listen: Some(Self::DEFAULT_TLS_LISTEN),
            tls_names: tls::default_names(),
            ca: CaConfig::default(),
            store: StoreConfig::Embedded,
            health_ttl: health::DEFAULT_TTL,
            plaintext_xds: false,
            conn_limits: net::ConnLimits::default(),
            max_connections: None,
        }
    }

    /// Loopback on ephemeral ports (plaintext and TLS), for tests.
    pub fn local(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            tls_names: vec!["localhost".into(), "127.0.0.1".into()],
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            // Tests' Envoy and grpcio peers connect without certificates.
            plaintext_xds: true,
            ..Self::new(data_dir)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin token: {0}")]
    Token(#[from] TokenError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("certificate authority: {0}")]
    Ca(#[from] CaError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("serving gRPC: {0}")]
pub struct ServeError(#[from] tonic::transport::Error);

/// Namespace for [`ControlPlane::start`].
#[derive(Debug)]
pub struct ControlPlane;

/// A running control plane. Dropping it does not stop it; call
/// [`ControlPlaneHandle::shutdown`] and [`ControlPlaneHandle::wait`].
#[derive(Debug)]
pub struct ControlPlaneHandle {
    /// Where the admin API and xDS are served (plaintext).
    pub local_addr: SocketAddr,
    /// Where Identity, xDS and the admin API are served over TLS.
    pub tls_addr: Option<SocketAddr>,
    /// The mesh CA.
    pub ca: Arc<Ca>,
    /// Where `/live`, `/ready` and `/metrics` are served.
    pub admin_addr: Option<SocketAddr>,
    pub metrics: Arc<CpMetrics>,
    /// The bearer token the admin API wants.
    pub admin_token: String,
    /// Every xDS client and what it ACKed.
    pub nodes: Arc<NodeRegistry>,
    pub data_dir: PathBuf,
    registry: Arc<Registry>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    shutdown: CancellationToken,
    shutdown_timeout: Duration,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    publisher: Option<JoinHandle<()>>,
    rotator: Option<JoinHandle<()>>,
    /// The CA's follower of etcd and the leader's housekeeping.
    background: Vec<JoinHandle<()>>,
    /// Stops the admin HTTP port, last of all.
    admin_stop: CancellationToken,
    admin: Option<JoinHandle<()>>,
}

impl ControlPlane {
    /// Opens the store, loads the configuration, publishes the first
    /// snapshot and serves the admin API and xDS on one port.
    pub async fn start(cfg: ControlPlaneConfig) -> Result<ControlPlaneHandle, StartError> {
        let dir = cfg.data_dir.clone();
        let dir_err = |source| StartError::DataDir {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(dir_err)?;
        if !std::fs::metadata(&dir).map_err(dir_err)?.is_dir() {
            return Err(dir_err(std::io::Error::other("not a directory")));
        }
        let admin_token = match cfg.admin_token.clone() {
            Some(t) => {
                auth::check_token("MESHWIRE_ADMIN_TOKEN", &t)?;
                t
            }
            None => auth::load_or_create(&dir)?,
        };
        let bind = |addr: SocketAddr| async move {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })?;
            let local = l
                .local_addr()
                .map_err(|source| StartError::Bind { addr, source })?;
            Ok::<_, StartError>((l, local))
        };
        // Before anything is bound: the budget counts what is open now.
        let conns = net::Connections::new(cfg.max_connections, cfg.conn_limits);
        // The admin port first: while etcd is awaited, probes get "not ready".
        let nodes = Arc::new(NodeRegistry::default());
        let metrics = Arc::new(CpMetrics::new(nodes.clone()));
        let shutdown = CancellationToken::new();
        let loaded = Arc::new(std::sync::OnceLock::new());
        let admin_stop = CancellationToken::new();
        let (admin_task, admin_addr) = match cfg.admin {
            None => (None, None),
            Some(addr) => {
                let (l, local) = bind(addr).await?;
                let state = admin::AdminState {
                    metrics: metrics.clone(),
                    registry: loaded.clone(),
                    stopping: shutdown.clone(),
                };
                (
                    Some(tokio::spawn(admin::serve(
                        l,
                        state,
                        conns.clone(),
                        admin_stop.clone(),
                    ))),
                    Some(local),
                )
            }
        };
        let opened = open_state(&cfg, &dir).await;
        let (registry, ca, tls_config) = match opened {
            Ok(x) => x,
            Err(e) => {
                admin_stop.cancel();
                return Err(e);
            }
        };
        let fail = |e: StartError| {
            registry.close();
            admin_stop.cancel();
            e
        };
        let (listener, local_addr) = bind(cfg.listen).await.map_err(fail)?;
        let tls_listener = match cfg.tls_listen {
            Some(addr) => Some(bind(addr).await.map_err(fail)?),
            None => None,
        };
        let tls_addr = tls_listener.as_ref().map(|(_, a)| *a);

        let td = ca.trust_domain().to_owned();
        let panicked = std::sync::Mutex::new(Vec::new());
        let build = {
            let (reg, m, td) = (registry.clone(), metrics.clone(), td.clone());
            move || {
                let mut s = with_default_identities(reg.snapshot(), &td);
                let now = health::published(&mut s);
                m.health.published(now.len());
                let mut was = panicked.lock().unwrap_or_else(|e| e.into_inner());
                if *was != now {
                    if !now.is_empty() {
                        tracing::warn!(services = ?now, "every endpoint of these services reports unhealthy: all are published as usable (panic)");
                    }
                    *was = now;
                }
                m.snapshot_published(s.version);
                s
            }
        };
        let first = build();
        let (snap_tx, snapshots) = watch::channel(Arc::new(first));
        let publisher = tokio::spawn(publish::run(
            registry.versions(),
            build,
            snap_tx,
            cfg.publish_window,
            shutdown.clone(),
        ));

        let admin = CountApiCalls::new(
            AdminApi::new(
                registry.clone(),
                nodes.clone(),
                snapshots.clone(),
                shutdown.clone(),
                ca.clone(),
            )
            .into_service(&admin_token),
            metrics.clone(),
        );
        let observer = Arc::new(XdsObserver {
            nodes: nodes.clone(),
            metrics: metrics.clone(),
        });
        // One ADS server for both ports: its stream ids stay unique.
        let ads = xds_server::ads_service(snapshots.clone(), observer);
        let health = health::HealthReports::new(
            registry.clone(),
            td.clone(),
            cfg.health_ttl,
            metrics.clone(),
            shutdown.clone(),
        );
        tokio::spawn(health.clone().sweep());
        let identity = IdentityApi::new(ca.clone(), shutdown.clone())
            .with_health(health)
            .into_service();
        let stop = shutdown.clone();
        let anonymous_xds = cfg.plaintext_xds;
        let plain = tonic::transport::Server::builder()
            .layer(net::TrackLayer {
                find: |e| {
                    e.get::<net::PlainConnectInfo>()
                        .map(|i| i.activity.clone())
                },
            })
            .add_service(admin.clone())
            .add_service(InterceptedService::new(
                ads.clone(),
                move |req: tonic::Request<()>| {
                    if anonymous_xds {
                        Ok(req)
                    } else {
                        Err(tonic::Status::failed_precondition(
                            "xDS is served over TLS with a mesh certificate (the TLS port, default 15012); start the control plane with --plaintext-xds to serve it here",
                        ))
                    }
                },
            ))
            .add_service(identity.clone())
            .serve_with_incoming_shutdown(
                net::incoming(listener, "plaintext", conns.clone()),
                async move {
                    stop.cancelled().await;
                },
            );
        let mut rotator = None;
        let secure = match (tls_listener, tls_config) {
            (Some((listener, _)), Some((config, renew_at))) => {
                rotator = Some(tokio::spawn(tls::rotate(
                    ca.clone(),
                    cfg.tls_names.clone(),
                    config.clone(),
                    renew_at,
                    shutdown.clone(),
                )));
                let stop = shutdown.clone();
                Some(
                    tonic::transport::Server::builder()
                        .layer(net::TrackLayer {
                            find: |e| {
                                e.get::<tls::TlsConnectInfo>()
                                    .map(|i| i.activity.clone())
                            },
                        })
                        .add_service(admin)
                        .add_service(InterceptedService::new(
                            ads,
                            move |mut req: tonic::Request<()>| {
                                let peer = req
                                    .extensions()
                                    .get::<tls::TlsConnectInfo>()
                                    .and_then(|i| i.peer_id.clone());
                                // A workload certificate binds the stream to
                                // its service (the node's cluster).
                                if let Some(svc) = peer.as_ref().and_then(|p| p.service()) {
                                    req.extensions_mut().insert(
                                        meshwire_xds::server::PeerService(svc.into()),
                                    );
                                }
                                if anonymous_xds || peer.is_some() {
                                    Ok(req)
                                } else {
                                    Err(tonic::Status::unauthenticated(
                                        "xDS needs a client certificate from the mesh CA (or --plaintext-xds on the control plane)",
                                    ))
                                }
                            },
                        ))
                        .add_service(identity)
                        .serve_with_incoming_shutdown(
                            tls::incoming(listener, config, conns.clone(), shutdown.clone()),
                            async move {
                                stop.cancelled().await;
                            },
                        ),
                )
            }
            _ => None,
        };
        let server = tokio::spawn(async move {
            let secure = async move {
                match secure {
                    Some(s) => s.await,
                    None => Ok(()),
                }
            };
            tokio::try_join!(plain, secure).map(|_| ())
        });
        // On etcd: rotations by other replicas, and the leader's sweeps.
        let background = vec![
            tokio::spawn(ca::shared::follow(ca.clone(), shutdown.clone())),
            tokio::spawn(ca::shared::housekeeping(
                ca.clone(),
                cfg.ca.token_sweep_interval,
                shutdown.clone(),
            )),
        ];
        let _ = loaded.set(registry.clone());
        registry.announce(local_addr);
        tracing::info!(
            listen = %local_addr,
            tls_listen = ?tls_addr,
            admin = ?admin_addr,
            data_dir = %dir.display(),
            store = %registry.store_description(),
            version = registry.version(),
            "control plane ready"
        );
        Ok(ControlPlaneHandle {
            local_addr,
            tls_addr,
            ca,
            admin_addr,
            metrics,
            admin_token,
            nodes,
            data_dir: dir,
            registry,
            snapshots,
            shutdown,
            shutdown_timeout: cfg.shutdown_timeout,
            server: Some(server),
            publisher: Some(publisher),
            rotator,
            background,
            admin_stop,
            admin: admin_task,
        })
    }
}

impl ControlPlaneHandle {
    /// The snapshots served over xDS (the latest one, then every publish).
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.clone()
    }

    /// The store's current version.
    pub fn version(&self) -> u64 {
        self.registry.version()
    }

    /// The path of the admin token file (whether or not the token came from it).
    pub fn token_file(&self) -> PathBuf {
        token_file(&self.data_dir)
    }

    /// Starts a graceful stop: no new connections, `Watch` streams end, the
    /// last change is published, open calls may finish.
    pub fn shutdown(&self) {
        if !self.shutdown.is_cancelled() {
            tracing::info!("control plane stopping");
            self.shutdown.cancel();
        }
    }

    /// Waits until the server has stopped (after [`Self::shutdown`], at most
    /// the shutdown timeout), then closes the store. Returns early with an
    /// error if the server fails on its own.
    pub async fn wait(&mut self) -> Result<(), ServeError> {
        let result = match self.server.as_mut() {
            None => Ok(()),
            Some(server) => {
                let timeout = self.shutdown_timeout;
                let shutdown = self.shutdown.clone();
                let r = tokio::select! {
                    r = &mut *server => r,
                    () = async {
                        shutdown.cancelled().await;
                        tokio::time::sleep(timeout).await;
                    } => {
                        tracing::warn!(?timeout, "calls still open after the shutdown timeout; closing them");
                        server.abort();
                        Ok(Ok(()))
                    }
                };
                self.server = None;
                match r {
                    Ok(r) => r.map_err(ServeError::from),
                    Err(e) if e.is_cancelled() => Ok(()),
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                }
            }
        };
        // Whatever ended the server, stop the rest with it.
        self.shutdown.cancel();
        if let Some(p) = self.publisher.take() {
            let _ = p.await;
        }
        if let Some(r) = self.rotator.take() {
            let _ = r.await;
        }
        for t in std::mem::take(&mut self.background) {
            let _ = t.await;
        }
        self.registry.close();
        self.admin_stop.cancel();
        if let Some(a) = self.admin.take() {
            let _ = a.await;
        }
        tracing::info!(version = self.registry.version(), "control plane stopped");
        result
    }

    /// [`Self::shutdown`], then [`Self::wait`].
    pub async fn stop(mut self) -> Result<(), ServeError> {
        self.shutdown();
        self.wait().await
    }
}

type Opened = (
    Arc<Registry>,
    Arc<Ca>,
    Option<(
        Arc<arc_swap::ArcSwap<rustls::ServerConfig>>,
        std::time::SystemTime,
    )>,
);

/// Opens the store, loads the configuration, opens the CA (from the data
/// directory, or from etcd) and makes the first serving certificate.
async fn open_state(cfg: &ControlPlaneConfig, dir: &Path) -> Result<Opened, StartError> {
    let (store, kv): (Arc<dyn Store>, _) = match &cfg.store {
        StoreConfig::Embedded => {
            let path = dir.join(DB_FILE);
            let s = tokio::task::spawn_blocking(move || RedbStore::open(&path))
                .await
                .map_err(|e| StoreError::Database(format!("opening the store: {e}")))??;
            (Arc::new(s), None)
        }
        StoreConfig::Etcd(etcd) => {
            let s = Arc::new(EtcdStore::new(etcd).await?);
            let kv = s.kv();
            (s, Some(kv))
        }
    };
    let registry = match load_registry(&store, &cfg.store).await {
        Ok(r) => r,
        Err(e) => {
            store.close();
            return Err(e.into());
        }
    };
    // After the store: its lock keeps a second control plane off this
    // data directory, and so off the CA's files.
    let ca_and_tls = async {
        let ca = match kv {
            None => {
                let (dir, ca_cfg) = (dir.to_owned(), cfg.ca.clone());
                tokio::task::spawn_blocking(move || Ca::open(&dir, &ca_cfg))
                    .await
                    .map_err(|e| CaError::Rcgen(format!("opening the CA: {e}")))??
            }
            Some(kv) => open_shared_ca(dir, &cfg.ca, kv).await?,
        };
        // Checked before anything is bound: a bad --tls-name fails the start.
        let tls_config = match cfg.tls_listen {
            Some(_) => {
                let (ca, names) = (ca.clone(), cfg.tls_names.clone());
                Some(
                    tokio::task::spawn_blocking(move || tls::initial_config(&ca, &names))
                        .await
                        .map_err(|e| CaError::Rcgen(format!("serving certificate: {e}")))??,
                )
            }
            None => None,
        };
        Ok::<_, CaError>((ca, tls_config))
    };
    match ca_and_tls.await {
        Ok((ca, tls)) => Ok((registry, ca, tls)),
        Err(e) => {
            registry.close();
            Err(e.into())
        }
    }
}

/// The CA on etcd; etcd gone again since the configuration was loaded is
/// waited for as at start.
async fn open_shared_ca(
    dir: &Path,
    cfg: &CaConfig,
    kv: crate::store::EtcdKv,
) -> Result<Arc<Ca>, CaError> {
    if cfg.user_ca.is_none() && cfg.etcd_seal_key.is_none() {
        return Err(CaError::FailedPrecondition(
            "--etcd keeps the CA's roots in etcd, their keys sealed: give every replica the same --etcd-encryption-key-file (or the CA as files with --ca-cert/--ca-key)".into(),
        ));
    }
    let mut failures = 0u32;
    loop {
        let shared = ca::shared::Shared::new(
            kv.clone(),
            cfg.etcd_seal_key.clone(),
            tokio::runtime::Handle::current(),
        );
        let (dir, cfg2) = (dir.to_owned(), cfg.clone());
        let r = tokio::task::spawn_blocking(move || Ca::open_shared(&dir, &cfg2, shared))
            .await
            .map_err(|e| CaError::Rcgen(format!("opening the CA: {e}")))?;
        match r {
            Err(CaError::Store(e @ StoreError::Unavailable { .. })) => {
                failures = failures.saturating_add(1);
                let wait = Duration::from_millis(200)
                    .saturating_mul(1 << failures.min(5))
                    .mul_f64(0.5 + fastrand::f64() * 0.5);
                tracing::warn!(error = %e, retry_in = ?wait, "etcd unreachable at start (opening the CA); retrying");
                tokio::time::sleep(wait).await;
            }
            r => return r,
        }
    }
}

/// Loads the configuration. etcd that cannot be reached yet (replicas and
/// etcd started together) is waited for, with jittered backoff and a log
/// line per attempt naming etcd; nothing is served until the state is
/// loaded, so no sidecar ever gets an empty configuration from us.
async fn load_registry(
    store: &Arc<dyn Store>,
    cfg: &StoreConfig,
) -> Result<Arc<Registry>, StoreError> {
    let mut failures = 0u32;
    loop {
        match Registry::load(store.clone()).await {
            Err(e @ StoreError::Unavailable { .. }) if matches!(cfg, StoreConfig::Etcd(_)) => {
                failures = failures.saturating_add(1);
                let exp = Duration::from_millis(200).saturating_mul(1 << failures.min(5));
                let wait = exp.mul_f64(0.5 + fastrand::f64() * 0.5);
                tracing::warn!(error = %e, retry_in = ?wait, attempt = failures, "etcd unreachable at start; not serving until the configuration is loaded");
                tokio::time::sleep(wait).await;
            }
            r => return r,
        }
    }
}

/// Endpoints registered without an identity are pushed with their service's
/// default one, `spiffe://<trust-domain>/ns/default/sa/<service>` (what a join
/// token for the service gives), so callers always check who answers.
fn with_default_identities(mut snap: Snapshot, trust_domain: &str) -> Snapshot {
    for (name, c) in snap.clusters.iter_mut() {
        for ep in c.endpoints.iter_mut().filter(|e| e.identity.is_none()) {
            ep.identity = Some(health::pushed_identity(name, ep, trust_domain));
        }
    }
    snap
}

/// `<data_dir>/admin.token`.
pub fn token_file(data_dir: &Path) -> PathBuf {
    data_dir.join(auth::TOKEN_FILE)
}

#[cfg(test)]
mod tests {
    use meshwire_proto::admin::v1 as pb;
    use meshwire_proto::admin::v1::mesh_admin_client::MeshAdminClient;
    use tonic::Code;

    use super::*;

    fn authed<T>(token: &str, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii"),
        );
        r
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_publishes_and_restarts_with_its_state() {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::start(ControlPlaneConfig::local(dir.path()))
            .await
            .unwrap();
        let token = cp.admin_token.clone();
        let mut snapshots = cp.snapshots();
        assert_eq!(snapshots.borrow().version, 0);
        let mut client = MeshAdminClient::connect(format!("http://{}", cp.local_addr))
            .await
            .unwrap();

        let denied = client
            .list_services(pb::ListServicesRequest {})
            .await
            .unwrap_err();
        assert_eq!(denied.code(), Code::Unauthenticated);

        let create = pb::CreateServiceRequest {
            service: Some(pb::Service {
                name: "greeter".into(),
                ..Default::default()
            }),
        };
        let r = client
            .create_service(authed(&token, create))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.version, 1);
        let add = pb::AddEndpointRequest {
            service: "greeter".into(),
            endpoint: Some(pb::Endpoint {
                address: "10.0.0.1:15006".into(),
                weight: Some(4),
                ..Default::default()
            }),
        };
        let r = client
            .add_endpoint(authed(&token, add))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.version, 2);

        // The new state reaches the xDS side.
        let snap = snapshots
            .wait_for(|s| s.version == 2)
            .await
            .unwrap()
            .clone();
        assert_eq!(snap.clusters["greeter"].endpoints[0].weight, 4);
        // Registered without an identity: pushed with the service's default.
        assert_eq!(
            snap.clusters["greeter"].endpoints[0].identity.as_deref(),
            Some("spiffe://meshwire.local/ns/default/sa/greeter")
        );
        cp.stop().await.unwrap();

        // Same directory: same token, same state, the first snapshot has it.
        let cp = ControlPlane::start(ControlPlaneConfig::local(dir.path()))
            .await
            .unwrap();
        assert_eq!(cp.admin_token, token);
        assert_eq!(cp.version(), 2);
        assert_eq!(*cp.snapshots().borrow().clone(), *snap);
        cp.stop().await.unwrap();
    }

    /// Over the real TLS port: a CSR that asks for service B (SAN URI, DNS
    /// name) with a token for A gets A, and only A.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_token_for_a_never_yields_b_whatever_the_csr_asks() {
        use meshwire_proto::identity::v1 as ipb;
        use meshwire_proto::identity::v1::identity_client::IdentityClient;
        use meshwire_tls::{SpiffeId, cert_info, certs_from_pem};

        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::start(ControlPlaneConfig::local(dir.path()))
            .await
            .unwrap();
        let mut admin = MeshAdminClient::connect(format!("http://{}", cp.local_addr))
            .await
            .unwrap();
        for name in ["svc-a", "svc-b"] {
            let create = pb::CreateServiceRequest {
                service: Some(pb::Service {
                    name: name.into(),
                    ..Default::default()
                }),
            };
            admin
                .create_service(authed(&cp.admin_token, create))
                .await
                .unwrap();
        }
        let token = admin
            .create_join_token(authed(
                &cp.admin_token,
                pb::CreateJoinTokenRequest {
                    service: "svc-a".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();

        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["svc-b".to_owned()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://meshwire.local/ns/default/sa/svc-b"
                .try_into()
                .unwrap(),
        ));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "svc-b");
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();

        let expect = SpiffeId::for_service(
            cp.ca.trust_domain(),
            ca::CONTROL_PLANE_NAMESPACE,
            ca::CONTROL_PLANE_SERVICE,
        )
        .unwrap();
        let connector = tls::connector(&cp.ca.bundle().bundle, None, Some(&expect)).unwrap();
        let channel =
            tonic::transport::Endpoint::from_shared(format!("https://{}", cp.tls_addr.unwrap()))
                .unwrap()
                .connect_with_connector(connector)
                .await
                .unwrap();
        let cert = IdentityClient::new(channel)
            .issue(ipb::IssueRequest {
                join_token: token.token,
                csr_pem: csr,
            })
            .await
            .unwrap()
            .into_inner();
        let leaf = &certs_from_pem(&cert.cert_chain_pem).unwrap()[0];
        let info = cert_info(leaf).unwrap();
        assert_eq!(
            info.spiffe_id.as_deref(),
            Some("spiffe://meshwire.local/ns/default/sa/svc-a")
        );
        assert_eq!(cert.spiffe_id, token.spiffe_id);
        // Nothing of B made it into the certificate.
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf).unwrap();
        let text = format!("{:?}", parsed.subject_alternative_name());
        assert!(!text.contains("svc-b"), "{text}");
        assert!(!parsed.subject().to_string().contains("svc-b"));
        cp.stop().await.unwrap();
    }
}
