//! The Meshwire sidecar: a proxy that sits next to one application and
//! carries its gRPC (and HTTP) calls to other services' sidecars, choosing an
//! endpoint **per call** by weighted least outstanding requests.
//!
//! # One call
//! ```text
//! app ──h2c/HTTP1.1──▶ outbound listener (127.0.0.1:15001)
//!     ─▶ route by :authority / Host (or per-service port) ─▶ deadline (grpc-timeout)
//!     ─▶ weighted least-request pick (outbound::balance)
//!     ─▶ one multiplexed HTTP/2 connection per endpoint (pool), fail over if nothing was sent
//!     ──HTTP/2 over mTLS 1.3 (peer SPIFFE ID checked)──▶ peer sidecar's inbound listener (0.0.0.0:15006)
//!     ─▶ authz (the local service's policy) ─▶ one reused h2c connection ─▶ local app
//! ```
//! Bodies stream through unbuffered (HTTP/2 flow control end to end), trailers
//! and metadata pass unchanged, and every error the sidecar makes itself is a
//! trailers-only gRPC response made in [`respond`].
//!
//! With an identity ([`identity`]) the sidecar-to-sidecar hop is mutual TLS
//! 1.3: the outbound side checks the peer's SPIFFE ID against the one pushed
//! for the endpoint, the inbound side requires a client certificate from the
//! mesh CA and checks the local service's policy ([`authz`]) before the app
//! sees the call.
//!
//! # One config update
//! A new list of [`meshwire_mesh::Cluster`]s comes either from a static file
//! (`--static-config`) or from the control plane over xDS (`--control-plane`,
//! through [`meshwire_xds::client`], which ACKs an update once applied and
//! NACKs one that was rejected); in-process callers can use [`Sidecar::apply`].
//! Every source goes through [`apply::Applier::apply`]: the config is
//! validated whole, then the route table is swapped atomically (endpoints
//! that stay keep their connections and in-flight calls) and the local
//! service's inbound policy is handed to [`authz`].
//!
//! With a [`gateway`] config (`--gateway`) the sidecar is also the mesh's
//! edge gateway: public TLS listeners whose requests, once admitted (routes,
//! JWT, IP rules, rate limits, request limits), take the outbound path above
//! with the gateway's own identity.
//!
//! Start one in-process with [`Sidecar::start`] (tests bind `127.0.0.1:0` and
//! read the ports back), or run the `meshwire-sidecar` binary.

pub mod admin;
pub mod app_http1;
pub mod apply;
pub mod authz;
pub mod body;
mod call;
pub mod cli;
pub mod config;
pub mod connect;
pub mod endpoint;
pub mod gateway;
pub mod grpc;
pub mod health;
pub mod http1;
pub mod identity;
pub mod inbound;
pub mod limits;
pub mod outbound;
pub mod outlier;
pub mod pool;
pub mod proxy;
pub mod ratelimit;
pub mod respond;
pub mod server;
pub mod tcp;
pub mod telemetry;
pub mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshwire_mesh::{Cluster, ModelError};
use meshwire_xds::client::{self as xds_client, ClientStatus, ConfigSink};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{AdminService, AdminState, Phase};
use crate::apply::Applier;
use crate::authz::Authz;
use crate::connect::Connector;
use crate::endpoint::Endpoint;
use crate::identity::{IdentityClientConfig, MeshTls};
use crate::inbound::{Inbound, InboundService};
use crate::outbound::route::Routes;
use crate::outbound::{Outbound, OutboundService, StartGate};
use crate::pool::H2Settings;
use crate::server::{Protocols, ServerSettings, Transport};
use crate::telemetry::{LogControl, Telemetry, TraceConfig, TraceError};

/// Everything a sidecar needs to start.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    pub outbound: SocketAddr,
    /// `None`: no inbound listener (a client-only sidecar).
    pub inbound: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// The local app's h2c address, target of inbound calls.
    pub app: Option<SocketAddr>,
    pub app_connect_timeout: Duration,
    pub clusters: Vec<Cluster>,
    /// Extra outbound listeners bound to one service each.
    pub service_listeners: Vec<(SocketAddr, String)>,
    pub drain_timeout: Duration,
    pub server: ServerSettings,
    pub client: H2Settings,
    /// Take clusters from a control plane over xDS instead of `clusters`.
    pub control_plane: Option<ControlPlaneConfig>,
    /// Most endpoints one service may have (a larger update is refused).
    pub max_endpoints: usize,
    /// Trace calls and export spans over OTLP (`None`: tracing off).
    pub trace: Option<TraceConfig>,
    /// The process's log filter, for the admin `/logging` page.
    pub log_control: Option<Arc<LogControl>>,
    /// Where the mesh identity comes from; `None`: the mesh hop is plaintext
    /// HTTP/2 (development only).
    pub identity: Option<IdentitySource>,
    /// The service this sidecar belongs to: its cluster's policy and
    /// permissive flag govern the inbound side (with a control plane, its
    /// `service` is used when this is `None`).
    pub service: Option<String>,
    /// Longest an outbound call made during start-up waits for the sidecar
    /// to be ready (certificate and first config) before it fails.
    pub startup_wait: Duration,
    /// Add `x-forwarded-for` / `forwarded` to HTTP requests reaching the app.
    pub forwarded_headers: bool,
    /// How the app's health is followed ([`health`]).
    pub health: health::HealthSettings,
    /// The address this sidecar's endpoint is registered with, for its
    /// health reports to the control plane (`None`: the inbound listener's
    /// address, or with an unspecified IP, the local IP toward the control
    /// plane and the inbound port).
    pub advertise: Option<SocketAddr>,
    /// Circuit breaker: most calls in flight to one service (0: no limit).
    pub max_requests_per_service: usize,
    /// At most this many calls at the local app at once (0: no limit), each
    /// waiting at most `app_queue_timeout` for a place.
    pub max_app_calls: usize,
    pub app_queue_timeout: Duration,
    /// New and recovered endpoints ramp up over this window (zero: off).
    pub slow_start: Duration,
    /// The zone this sidecar runs in (`--zone`): zone-aware routing prefers
    /// endpoints there; also the xDS node's locality.
    pub zone: Option<String>,
    /// The edge-gateway role: public TLS listeners routing into the mesh.
    pub gateway: Option<Arc<gateway::GatewayConfig>>,
}

/// Where the sidecar's certificate comes from.
#[derive(Debug, Clone)]
pub enum IdentitySource {
    /// The control plane's CA, with a join token; renewed before expiry.
    ControlPlane(IdentityClientConfig),
    /// A fixed certificate, key and trust bundle (files; no rotation).
    Fixed(Arc<MeshTls>),
}

/// Where the sidecar gets its config over xDS.
#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// e.g. `http://127.0.0.1:15010`; several control-plane replicas
    /// comma-separated: the sidecar uses one and fails over to the next.
    pub server: String,
    /// The service this sidecar belongs to.
    pub service: String,
    pub node_id: String,
}

impl ControlPlaneConfig {
    /// The replicas' URLs, in order.
    pub fn servers(&self) -> Vec<String> {
        self.server
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

impl SidecarConfig {
    pub fn new(outbound: SocketAddr, admin: SocketAddr) -> Self {
        Self {
            outbound,
            inbound: None,
            admin,
            app: None,
            app_connect_timeout: Duration::from_secs(1),
            clusters: Vec::new(),
            service_listeners: Vec::new(),
            drain_timeout: Duration::from_secs(20),
            server: ServerSettings::default(),
            client: H2Settings::default(),
            control_plane: None,
            max_endpoints: outbound::route::DEFAULT_MAX_ENDPOINTS,
            trace: None,
            log_control: None,
            identity: None,
            service: None,
            startup_wait: Duration::from_secs(10),
            forwarded_headers: true,
            health: health::HealthSettings::default(),
            advertise: None,
            max_requests_per_service: outbound::route::DEFAULT_MAX_REQUESTS,
            max_app_calls: 0,
            app_queue_timeout: Duration::from_millis(100),
            slow_start: Duration::ZERO,
            zone: None,
            gateway: None,
        }
    }

    /// Everything on `127.0.0.1:0`, for tests.
    pub fn local() -> Self {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        Self::new(any, any)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Config(#[from] ModelError),
    #[error("services[].listen names unknown service {0:?}")]
    UnknownListenerService(String),
    #[error("a static config and a control plane cannot both be given")]
    StaticAndControlPlane,
    #[error("tracing: {0}")]
    Trace(#[from] TraceError),
    #[error("gateway route {route:?}: no service named {service:?} in the static config")]
    UnknownGatewayService { route: String, service: String },
    #[error("gateway access log: {0}")]
    AccessLog(std::io::Error),
}

/// A running sidecar. Dropping it does not stop it; call [`Sidecar::shutdown`].
#[derive(Debug)]
pub struct Sidecar {
    pub outbound_addr: SocketAddr,
    pub inbound_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    /// Per-service listeners as bound: `(service, address)`.
    pub service_addrs: Vec<(String, SocketAddr)>,
    /// The gateway's public listeners as bound (none unless a gateway).
    pub gateway_addrs: Vec<SocketAddr>,
    routes: Arc<Routes>,
    applier: Arc<Applier>,
    admin: Arc<AdminState>,
    tls: Option<Arc<MeshTls>>,
    gate: Arc<StartGate>,
    xds: Option<tokio::task::JoinHandle<()>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    drain_timeout: Duration,
    telemetry: Arc<Telemetry>,
    authz: Arc<Authz>,
}

async fn bind(what: impl Into<String>, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            what: what.into(),
            addr,
            source,
        })
}

impl Sidecar {
    /// Validates the config, binds every listener and starts serving.
    pub async fn start(cfg: SidecarConfig) -> Result<Self, StartError> {
        let client = Arc::new(cfg.client.clone());
        let tls = match &cfg.identity {
            None => None,
            Some(IdentitySource::ControlPlane(_)) => Some(MeshTls::new()),
            Some(IdentitySource::Fixed(t)) => Some(t.clone()),
        };
        let authz = Authz::new();
        let mesh_connector = tls.clone().map(Connector::mesh).unwrap_or_default();
        let routes = Arc::new(
            Routes::new(mesh_connector, client.clone())
                .with_max_endpoints(cfg.max_endpoints)
                .with_max_requests(cfg.max_requests_per_service)
                .with_slow_start(cfg.slow_start)
                .with_zone(cfg.zone.as_deref()),
        );
        let local_service = cfg
            .service
            .clone()
            .or_else(|| cfg.control_plane.as_ref().map(|cp| cp.service.clone()));
        let local = local_service.clone().map(|svc| (svc, authz.clone()));
        let applier = Arc::new(Applier::new(routes.clone(), local));
        // Failure-percentage ejection, off the call path; ends with the routes.
        let sweeping = Arc::downgrade(&routes);
        if cfg.control_plane.is_some() && !cfg.clusters.is_empty() {
            return Err(StartError::StaticAndControlPlane);
        }
        applier.apply(&cfg.clusters)?;
        for (_, svc) in &cfg.service_listeners {
            if routes.load().get(svc).is_none() {
                return Err(StartError::UnknownListenerService(svc.clone()));
            }
        }
        if let Some(g) = cfg.gateway.as_ref().filter(|_| cfg.control_plane.is_none()) {
            for r in &g.routes.routes {
                if routes.load().get(&r.service).is_none() {
                    return Err(StartError::UnknownGatewayService {
                        route: r.name.to_string(),
                        service: r.service.to_string(),
                    });
                }
            }
        }

        let app = cfg.app.map(|addr| {
            let spec = meshwire_mesh::Endpoint::new(addr);
            Endpoint::new(
                &spec,
                Connector::default(),
                cfg.app_connect_timeout,
                client.clone(),
                outlier::ClusterHealth::off(),
            )
        });
        let (xds_status_tx, xds_status) = tokio::sync::watch::channel(ClientStatus::default());
        let telemetry = Arc::new(Telemetry::start(cfg.trace.as_ref())?);
        let app_health = health::AppHealth::new();
        let mut admin = AdminState::new(
            routes.clone(),
            app.clone(),
            cfg.control_plane
                .as_ref()
                .map(|cp| (cp.server.clone(), xds_status.clone())),
        )
        .with_app_health(app.as_ref().map(|_| app_health.clone()))
        .with_telemetry(&telemetry, cfg.log_control.clone())
        .with_identity(tls.clone());
        if let Some(g) = &cfg.gateway {
            admin = admin.with_collector(Box::new(gateway::metrics::GatewayCollector::new(g)));
        }
        if let (Some(service), Some(_)) = (&local_service, &app) {
            admin = admin.with_collector(Box::new(ratelimit::RateLimitCollector {
                service: Arc::from(service.as_str()),
                limit: authz.rate_limit().clone(),
            }));
        }
        let admin = Arc::new(admin);

        // Bind everything before serving anything, so a bad address fails start-up whole.
        let outbound_l = bind("outbound", cfg.outbound).await?;
        let admin_l = bind("admin", cfg.admin).await?;
        let inbound_l = match (cfg.inbound, &app) {
            (Some(addr), Some(_)) => Some(bind("inbound", addr).await?),
            _ => None,
        };
        let mut service_ls = Vec::new();
        for (addr, svc) in &cfg.service_listeners {
            service_ls.push((svc.clone(), bind(format!("service {svc}"), *addr).await?));
        }
        let mut gateway_ls = Vec::new();
        for l in cfg.gateway.iter().flat_map(|g| &g.listeners) {
            gateway_ls.push(bind("gateway", l.address).await?);
        }
        let local = |l: &TcpListener| l.local_addr().expect("bound socket has an address");

        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        // Ready: a certificate (with an identity) and the first config (with a control plane).
        let ready_at_once =
            cfg.control_plane.is_none() && tls.as_ref().is_none_or(|t| t.is_ready());
        let (ready_tx, ready_rx) = tokio::sync::watch::channel(ready_at_once);
        let gate = Arc::new(StartGate::new(ready_rx, cfg.startup_wait));
        let outbound = Arc::new(
            Outbound::new(routes.clone())
                .with_telemetry(telemetry.clone())
                .with_gate(gate.clone()),
        );
        if let (Some(IdentitySource::ControlPlane(icfg)), Some(tls)) = (&cfg.identity, &tls) {
            // With an app, its health goes to the control plane too, for the
            // endpoint this sidecar's inbound listener is registered as.
            let reporter = match (&local_service, inbound_l.as_ref().map(local)) {
                (Some(service), Some(inbound)) => Some(identity::report::Reporter {
                    service: service.clone(),
                    advertise: match cfg.advertise {
                        Some(a) => identity::report::Advertise::Fixed(a),
                        None if !inbound.ip().is_unspecified() => {
                            identity::report::Advertise::Fixed(inbound)
                        }
                        None => identity::report::Advertise::TowardControlPlane {
                            port: inbound.port(),
                        },
                    },
                    health: app_health.clone(),
                }),
                _ => None,
            };
            tokio::spawn(identity::client::run(
                icfg.clone(),
                tls.clone(),
                local_service.clone(),
                reporter,
                shutdown.clone(),
            ));
        }
        let xds = cfg.control_plane.as_ref().map(|cp| {
            let tls = tls.clone();
            let client = xds_client::ClientConfig {
                servers: cp.servers(),
                node_id: cp.node_id.clone(),
                service: cp.service.clone(),
                zone: cfg.zone.clone(),
                user_agent: "meshwire-sidecar".into(),
                connect_timeout: Duration::from_secs(2),
                // The control plane is the one workload in meshwire-system/control-plane.
                tls: tls
                    .as_ref()
                    .filter(|_| cp.server.starts_with("https://"))
                    .map(|t| {
                        t.control_plane_connector(Some(
                            "/ns/meshwire-system/sa/control-plane".into(),
                        ))
                    }),
            };
            let sink: Arc<dyn ConfigSink> = applier.clone();
            tokio::spawn(async move {
                // xDS over mTLS needs our certificate first.
                if client.tls.is_some()
                    && let Some(t) = &tls
                {
                    t.ready().await;
                }
                xds_client::run(client, sink, xds_status_tx).await
            })
        });
        let sidecar = Sidecar {
            outbound_addr: local(&outbound_l),
            inbound_addr: inbound_l.as_ref().map(local),
            admin_addr: local(&admin_l),
            service_addrs: service_ls
                .iter()
                .map(|(s, l)| (s.clone(), local(l)))
                .collect(),
            gateway_addrs: gateway_ls.iter().map(local).collect(),
            routes,
            applier,
            authz: authz.clone(),
            admin: admin.clone(),
            tls: tls.clone(),
            gate,
            xds,
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
            drain_timeout: cfg.drain_timeout,
            telemetry: telemetry.clone(),
        };
        // `POST /drain` on the admin port: the same graceful drain as `shutdown`.
        {
            let admin = admin.clone();
            let shutdown = shutdown.clone();
            let xds = sidecar.xds.as_ref().map(|x| x.abort_handle());
            tokio::spawn(async move {
                tokio::select! {
                    () = admin.drain_requested().cancelled() => {}
                    () = shutdown.cancelled() => return,
                }
                if let Some(x) = xds {
                    x.abort();
                }
                admin.set_phase(Phase::Draining);
                shutdown.cancel();
            });
        }

        let ob = outbound.clone();
        server::spawn(
            "outbound",
            outbound_l,
            Protocols::Http1AndHttp2,
            &cfg.server,
            Transport::Plain,
            move |c: &server::ConnInfo| {
                OutboundService::new(ob.clone(), None).with_peer(c.peer.ip())
            },
            shutdown.clone(),
            &tracker,
        );
        if let Some(g) = &cfg.gateway {
            gateway::start(
                g,
                gateway_ls,
                outbound.clone(),
                &cfg.server,
                shutdown.clone(),
                &tracker,
            )
            .await
            .map_err(StartError::AccessLog)?;
        }
        for (svc, l) in service_ls {
            let ob = outbound.clone();
            let name: Arc<str> = Arc::from(svc.as_str());
            let is_tcp = sidecar
                .routes
                .load()
                .get(&svc)
                .is_some_and(|c| c.protocol == meshwire_mesh::Protocol::Tcp);
            if is_tcp {
                tcp::spawn_listener(l, name, ob, shutdown.clone(), &tracker);
                continue;
            }
            server::spawn(
                "service",
                l,
                Protocols::Http1AndHttp2,
                &cfg.server,
                Transport::Plain,
                move |c: &server::ConnInfo| {
                    OutboundService::new(ob.clone(), Some(name.clone())).with_peer(c.peer.ip())
                },
                shutdown.clone(),
                &tracker,
            );
        }
        if let (Some(l), Some(app)) = (inbound_l, app) {
            tokio::spawn(ratelimit::forget_idle_callers(
                authz.rate_limit().clone(),
                shutdown.clone(),
            ));
            tokio::spawn(health::run(
                cfg.health.clone(),
                app.addr,
                authz.clone(),
                app_health.clone(),
                shutdown.clone(),
            ));
            let inbound = Arc::new(Inbound {
                health: app_health.clone(),
                app_limit: (cfg.max_app_calls > 0).then(|| {
                    (
                        Arc::new(tokio::sync::Semaphore::new(cfg.max_app_calls)),
                        cfg.app_queue_timeout,
                    )
                }),
                http1: app_http1::Http1App::new(app.addr, cfg.app_connect_timeout),
                forwarded_headers: cfg.forwarded_headers,
                app,
                telemetry: telemetry.clone(),
                authz: authz.clone(),
            });
            let transport = match &tls {
                Some(tls) => Transport::Mesh {
                    tls: tls.clone(),
                    authz: authz.clone(),
                },
                None => Transport::Plain,
            };
            server::spawn(
                "inbound",
                l,
                Protocols::Http2,
                &cfg.server,
                transport,
                move |c: &server::ConnInfo| InboundService::new(inbound.clone(), c),
                shutdown.clone(),
                &tracker,
            );
        }
        // The admin server outlives the drain of the data listeners (it reports
        // "draining"), so it stops on its own token at the very end.
        let admin_stop = CancellationToken::new();
        let st = admin.clone();
        server::spawn(
            "admin",
            admin_l,
            Protocols::Http1,
            &cfg.server,
            Transport::Plain,
            move |_: &server::ConnInfo| AdminService::new(st.clone()),
            admin_stop.clone(),
            &TaskTracker::new(),
        );
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(meshwire_mesh::resilience::MIN_FAILURE_PERCENTAGE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(routes) = sweeping.upgrade() else {
                    return;
                };
                routes.sweep_outliers();
            }
        });
        let done = tracker.clone();
        tokio::spawn(async move {
            done.wait().await;
            admin_stop.cancel();
        });
        tracker.close();
        tracing::info!(
            outbound = %sidecar.outbound_addr,
            inbound = ?sidecar.inbound_addr,
            admin = %sidecar.admin_addr,
            services = cfg.clusters.len(),
            "sidecar listening"
        );
        // Ready once the certificate is in and the first complete config from
        // the control plane is applied.
        if ready_at_once {
            admin.set_phase(Phase::Ready);
            tracing::info!("sidecar ready");
        } else {
            let admin = admin.clone();
            let mut status = cfg.control_plane.as_ref().map(|_| xds_status);
            let tls = tls.clone();
            tokio::spawn(async move {
                if let Some(t) = &tls {
                    t.ready().await;
                }
                if let Some(st) = status.as_mut()
                    && st.wait_for(|s| s.warm).await.is_err()
                {
                    return;
                }
                if admin.phase() == Phase::Starting {
                    admin.set_phase(Phase::Ready);
                    ready_tx.send_replace(true);
                    tracing::info!("sidecar ready");
                }
            });
        }
        Ok(sidecar)
    }

    /// The admin state (readiness, what `/clusters` and `/config_dump` show).
    pub fn admin(&self) -> &Arc<AdminState> {
        &self.admin
    }

    /// Applies a new set of services (validated whole; on error nothing changes).
    pub fn apply(&self, clusters: &[Cluster]) -> Result<(), ModelError> {
        self.applier.apply(clusters)
    }

    pub fn routes(&self) -> &Arc<Routes> {
        &self.routes
    }

    /// Outbound calls waiting for the sidecar to finish starting.
    pub fn waiting_at_start(&self) -> usize {
        self.gate.waiting()
    }

    /// What the local service's cluster last said about the inbound side
    /// (policy, permissive flag, rate limit), as enforced now.
    pub fn inbound_policy(&self) -> Arc<authz::LocalPolicy> {
        self.authz.current()
    }

    /// Its mesh identity, if it has one.
    pub fn identity(&self) -> Option<&Arc<MeshTls>> {
        self.tls.as_ref()
    }

    /// Its metrics counters and tracer.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// Resolves once a drain has started (by [`Sidecar::shutdown`] or `POST /drain`).
    pub async fn stopping(&self) {
        self.shutdown.cancelled().await;
    }

    /// Starts a graceful drain: listeners stop accepting, connections get a
    /// GOAWAY, in-flight calls may finish.
    pub fn shutdown(&self) {
        if !self.shutdown.is_cancelled() {
            tracing::info!(drain_timeout = ?self.drain_timeout, "draining");
            if let Some(x) = &self.xds {
                x.abort();
            }
            self.admin.set_phase(Phase::Draining);
            self.shutdown.cancel();
        }
    }

    /// Waits for the drain to finish, then sends the spans still queued;
    /// `false` if the drain timeout cut the drain short.
    pub async fn wait(&self) -> bool {
        let drained = match tokio::time::timeout(self.drain_timeout, self.tracker.wait()).await {
            Ok(()) => {
                tracing::info!("drained");
                true
            }
            Err(_) => {
                tracing::warn!(drain_timeout = ?self.drain_timeout, "drain timed out; closing remaining connections");
                false
            }
        };
        if let Some(t) = &self.telemetry.tracer {
            t.shutdown().await;
        }
        drained
    }
}
