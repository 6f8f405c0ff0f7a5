//! The admin HTTP server (default `127.0.0.1:15000`): liveness, readiness and
//! what the balancer sees.
//!
//! - `GET /live`: 200 while the process runs.
//! - `GET /ready`: 200 once the listeners are bound and a config is applied;
//!   503 before, and while draining.
//! - `GET /clusters`: JSON, every cluster and endpoint with weight,
//!   outstanding calls, connections and call totals; plus the local app.
//! - `GET /config_dump`: JSON, the configuration the sidecar runs: its source
//!   (static file or control plane), the xDS versions applied, the last
//!   rejected update, and every cluster with its endpoints.
//! - `GET /metrics`: Prometheus metrics (OpenMetrics text), see `telemetry::metrics`.
//! - `GET /logging`: the log filter; `POST /logging?level=FILTER` replaces it
//!   (e.g. `debug`, `meshwire_sidecar=debug,info`).
//! - `POST /drain`: starts a graceful drain, as SIGTERM does (listeners
//!   stop, in-flight calls finish, the process exits).
//! - `GET /certs`: JSON, the mesh identity: SPIFFE ID, serial, validity,
//!   renewals, and the trust bundle's root fingerprints.
//!
//! The state-changing `POST`s refuse what a web page could make a browser
//! send ([`cross_site`]): a `Host` that is not `localhost` or an IP address
//! (DNS rebinding), an `Origin` other than a loopback one, a
//! `Sec-Fetch-Site` of another site, and the content types a form can send
//! without a CORS preflight.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use meshwire_mesh::LbPolicy;
use meshwire_xds::client::ClientStatus;
use serde::Serialize;
use tokio::sync::watch;

use crate::body::ResponseBody;
use crate::endpoint::Endpoint;
use crate::outbound::route::Routes;
use crate::respond;
use crate::telemetry::metrics::{self as prom, SidecarCollector};
use crate::telemetry::{LogControl, Telemetry};

/// Lifecycle as reported by `/ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Starting = 0,
    Ready = 1,
    Draining = 2,
}

#[derive(Debug)]
pub struct AdminState {
    pub routes: Arc<Routes>,
    pub app: Option<Arc<Endpoint>>,
    /// The control plane's address and the xDS client's status, when one is used.
    pub xds: Option<(String, watch::Receiver<ClientStatus>)>,
    phase: AtomicU8,
    /// What `/metrics` shows (see [`AdminState::with_telemetry`]).
    metrics: Option<prometheus_client::registry::Registry>,
    /// The live log filter, when this process installed one (`/logging`).
    log: Option<Arc<LogControl>>,
    /// The local app's health, when there is an app.
    app_health: Option<Arc<crate::health::AppHealth>>,
    /// Cancelled by `POST /drain`.
    drain: tokio_util::sync::CancellationToken,
    /// The mesh identity, shown by `/certs`.
    identity: Option<Arc<crate::identity::MeshTls>>,
}

impl AdminState {
    pub fn new(
        routes: Arc<Routes>,
        app: Option<Arc<Endpoint>>,
        xds: Option<(String, watch::Receiver<ClientStatus>)>,
    ) -> Self {
        Self {
            routes,
            app,
            xds,
            phase: AtomicU8::new(Phase::Starting as u8),
            metrics: None,
            log: None,
            app_health: None,
            drain: tokio_util::sync::CancellationToken::new(),
            identity: None,
        }
    }

    /// `/ready` and `/metrics` follow the app's health too (call before
    /// [`AdminState::with_telemetry`]).
    pub fn with_app_health(mut self, health: Option<Arc<crate::health::AppHealth>>) -> Self {
        self.app_health = health;
        self
    }

    /// Serves `/certs` from `tls`.
    pub fn with_identity(mut self, tls: Option<Arc<crate::identity::MeshTls>>) -> Self {
        self.identity = tls;
        self
    }

    /// Serves `/metrics` from the live state and `telemetry`'s counters, and
    /// `/logging` with `log`.
    pub fn with_telemetry(mut self, telemetry: &Telemetry, log: Option<Arc<LogControl>>) -> Self {
        self.metrics = Some(prom::registry(SidecarCollector {
            outbound: self.routes.clone(),
            app: self.app.clone(),
            app_health: self.app_health.clone(),
            xds: self.xds.as_ref().map(|(_, rx)| rx.clone()),
            sidecar: telemetry.metrics.clone(),
        }));
        self.log = log;
        self
    }

    /// Adds `c`'s metrics to `/metrics` (after [`AdminState::with_telemetry`]).
    pub fn with_collector(mut self, c: Box<dyn prometheus_client::collector::Collector>) -> Self {
        if let Some(reg) = self.metrics.as_mut() {
            reg.register_collector(c);
        }
        self
    }

    /// Cancelled when `POST /drain` asks for a graceful drain.
    pub fn drain_requested(&self) -> &tokio_util::sync::CancellationToken {
        &self.drain
    }

    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Relaxed);
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            1 => Phase::Ready,
            2 => Phase::Draining,
            _ => Phase::Starting,
        }
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<ResponseBody> {
        if req.method() == Method::POST
            && let Some((status, why)) = cross_site(req.headers())
        {
            tracing::warn!(
                path = req.uri().path(),
                reason = why,
                "refused an admin POST"
            );
            return respond::text(status, format!("refused: {why}\n"));
        }
        match (req.method(), req.uri().path()) {
            (&Method::POST, "/logging") => return self.set_logging(req.uri().query()),
            (&Method::POST, "/drain") => {
                if !self.drain.is_cancelled() {
                    tracing::info!("drain requested on the admin port");
                    self.drain.cancel();
                }
                return respond::text(StatusCode::OK, "draining\n");
            }
            (_, "/drain") => return respond::text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"),
            (&Method::GET | &Method::HEAD, _) => {}
            (_, "/logging") => {
                return respond::text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
            }
            _ => return respond::text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"),
        }
        match req.uri().path() {
            "/live" => respond::text(StatusCode::OK, "live\n"),
            "/ready" => match self.phase() {
                Phase::Ready if self.app_health.as_ref().is_some_and(|h| !h.is_healthy()) => {
                    respond::text(StatusCode::SERVICE_UNAVAILABLE, "app unhealthy\n")
                }
                Phase::Ready => respond::text(StatusCode::OK, "ready\n"),
                Phase::Starting => respond::text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
                Phase::Draining => respond::text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
            },
            "/clusters" => json(&self.clusters()),
            "/config_dump" => json(&self.config_dump()),
            "/certs" => match &self.identity {
                Some(tls) => json(&tls.describe()),
                None => json(&serde_json::json!({ "ready": false, "mtls": false })),
            },
            "/metrics" => match &self.metrics {
                Some(reg) => {
                    let mut r = respond::text(StatusCode::OK, prom::render(reg));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        http::HeaderValue::from_static(prom::CONTENT_TYPE),
                    );
                    r
                }
                None => respond::text(StatusCode::NOT_FOUND, "no metrics here\n"),
            },
            "/logging" => match &self.log {
                Some(l) => respond::text(StatusCode::OK, format!("{}\n", l.current())),
                None => respond::text(
                    StatusCode::NOT_FOUND,
                    "logging is not controlled by this sidecar (in-process)\n",
                ),
            },
            "/" => respond::text(
                StatusCode::OK,
                "meshwire sidecar admin: /live /ready /clusters /config_dump /certs /metrics /logging (POST ?level=) /drain (POST)\n",
            ),
            other => respond::text(
                StatusCode::NOT_FOUND,
                format!(
                    "no admin page {other:?}; try /live /ready /clusters /config_dump /certs /metrics /logging /drain\n"
                ),
            ),
        }
    }

    /// `POST /logging?level=FILTER`.
    fn set_logging(&self, query: Option<&str>) -> Response<ResponseBody> {
        let Some(log) = &self.log else {
            return respond::text(
                StatusCode::NOT_FOUND,
                "logging is not controlled by this sidecar (in-process)\n",
            );
        };
        let level = query.into_iter().flat_map(|q| q.split('&')).find_map(|kv| {
            let v = kv.strip_prefix("level=")?;
            percent_encoding::percent_decode_str(v)
                .decode_utf8()
                .ok()
                .map(|v| v.into_owned())
        });
        let Some(level) = level.filter(|l| !l.is_empty()) else {
            return respond::text(
                StatusCode::BAD_REQUEST,
                "give the new filter as ?level=FILTER (e.g. debug, meshwire_sidecar=debug,info)\n",
            );
        };
        match log.set(&level) {
            Ok(()) => respond::text(StatusCode::OK, format!("{level}\n")),
            Err(e) => respond::text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        }
    }

    fn clusters(&self) -> ClustersView {
        let table = self.routes.load();
        let mut clusters: Vec<ClusterView> = table
            .clusters()
            .map(|c| {
                let set = c.endpoints.load();
                ClusterView {
                    name: c.name.to_string(),
                    lb_policy: lb_name(&c.lb),
                    zones: set.zone_report().map(|z| ZonesView {
                        zone: z.zone.to_string(),
                        min_healthy: c.zones.min_healthy,
                        healthy_weight: z.healthy_weight,
                        total_weight: z.total_weight,
                        local_share: z.local_share,
                        spill: z.spill.into_iter().collect(),
                    }),
                    endpoints: {
                        let shares = set.hash_shares();
                        set.entries()
                            .iter()
                            .enumerate()
                            .map(|(i, e)| EndpointView {
                                hash_share: shares.as_ref().map(|s| s[i]),
                                ..EndpointView::new(&e.endpoint, e.weight, e.draining)
                            })
                            .collect()
                    },
                }
            })
            .collect();
        clusters.sort_by(|a, b| a.name.cmp(&b.name));
        ClustersView {
            zone: self.routes.zone().map(str::to_owned),
            clusters,
            app: self.app.as_ref().map(|a| EndpointView::new(a, 1, false)),
            app_health: self.app_health.as_ref().map(|h| AppHealthView {
                healthy: h.is_healthy(),
                changes: h.changes(),
            }),
        }
    }
}

impl AdminState {
    fn config_dump(&self) -> serde_json::Value {
        let table = self.routes.load();
        let mut clusters: Vec<serde_json::Value> = table
            .clusters()
            .map(|c| {
                let set = c.endpoints.load();
                serde_json::json!({
                    "name": &*c.name,
                    "protocol": c.protocol.as_str(),
                    "lb_policy": lb_name(&c.lb),
                    "active_request_bias": match c.lb {
                        LbPolicy::LeastRequest { active_request_bias } => Some(active_request_bias),
                        _ => None,
                    },
                    "hash_balance_factor": c.lb.hash().and_then(|h| h.balance_factor),
                    "hash_policy": &c.hash_policy,
                    "zone_aware": c.zones.enabled,
                    "zone_min_healthy": c.zones.min_healthy,
                    "connect_timeout_ms": c.connect_timeout.as_millis() as u64,
                    "request_timeout_ms": c.request_timeout.map(|t| t.as_millis() as u64),
                    "authority": c.authority.as_ref().map(|a| a.as_str()),
                    "endpoints": set.entries().iter().map(|e| serde_json::json!({
                        "address": e.endpoint.addr.to_string(),
                        "weight": e.weight,
                        "draining": e.draining,
                        "zone": e.endpoint.zone,
                        "identity": e.endpoint.identity,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        clusters.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        let source = match &self.xds {
            None => serde_json::json!({ "type": "static" }),
            Some((server, status)) => {
                let s = status.borrow();
                serde_json::json!({
                    "type": "xds",
                    // The replica of the current (or last) stream, and all configured.
                    "control_plane": s.server.clone().unwrap_or_else(|| server.clone()),
                    "control_planes": server,
                    "applies": s.applies,
                    "connected": s.connected,
                    "warm": s.warm,
                    "versions": { "clusters": s.cds_version, "endpoints": s.eds_version },
                    "warming": s.warming,
                    "rejected": s.rejected,
                    "last_nack": s.last_nack.as_ref().map(|n| serde_json::json!({
                        "type_url": n.type_url, "version": n.version, "error": n.error,
                    })),
                    "streams_opened": s.streams_opened,
                    "last_error": s.last_error,
                })
            }
        };
        serde_json::json!({ "source": source, "zone": self.routes.zone(), "clusters": clusters })
    }
}

/// Why a state-changing request may come from a web page rather than the
/// operator's tools (curl, probes and the like send none of these), with the
/// status to refuse it with; `None` if it may not.
fn cross_site(h: &http::HeaderMap) -> Option<(StatusCode, &'static str)> {
    let forbidden = StatusCode::FORBIDDEN;
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
    if !host.is_some_and(is_local_host) {
        return Some((
            forbidden,
            "Host must be localhost or an IP address (DNS rebinding)",
        ));
    }
    if let Some(origin) = h.get(header::ORIGIN) {
        let local = origin
            .to_str()
            .ok()
            .and_then(|o| o.split_once("://"))
            .is_some_and(|(_, host)| is_loopback_host(host));
        if !local {
            return Some((forbidden, "cross-origin request"));
        }
    }
    if h.get("sec-fetch-site")
        .is_some_and(|v| v != "same-origin" && v != "none")
    {
        return Some((forbidden, "cross-site request"));
    }
    // What an HTML form (or a fetch without preflight) can send.
    let simple = h.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.to_str().unwrap_or("").trim().to_ascii_lowercase();
        let essence = v.split(';').next().unwrap_or("").trim();
        matches!(
            essence,
            "text/plain" | "application/x-www-form-urlencoded" | "multipart/form-data"
        )
    });
    if simple {
        return Some((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send no body, or a non-form content type such as application/json",
        ));
    }
    None
}

/// `host[:port]` names this machine by name or address: an IP literal (a
/// rebinding attack needs a name) or `localhost`.
fn is_local_host(authority: &str) -> bool {
    let host = host_part(authority);
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok()
}

/// `host[:port]` is a loopback address or `localhost`.
fn is_loopback_host(authority: &str) -> bool {
    let host = host_part(authority);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `[::1]:15000` -> `::1`, `127.0.0.1:15000` -> `127.0.0.1`, `localhost` -> `localhost`.
fn host_part(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(h, _)| h);
    }
    match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

fn json(v: &impl Serialize) -> Response<ResponseBody> {
    let body = serde_json::to_vec_pretty(v).unwrap_or_default();
    let mut r = respond::text(StatusCode::OK, body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

#[derive(Debug, Serialize)]
struct ClustersView {
    /// This sidecar's zone (`--zone`), if it has one.
    zone: Option<String>,
    clusters: Vec<ClusterView>,
    /// The local app behind the inbound listener.
    app: Option<EndpointView>,
    /// Whether the app passes its health check (new calls are refused while
    /// it does not), and how often that changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    app_health: Option<AppHealthView>,
}

#[derive(Debug, Serialize)]
struct AppHealthView {
    healthy: bool,
    changes: u64,
}

#[derive(Debug, Serialize)]
struct ClusterView {
    name: String,
    lb_policy: &'static str,
    /// How calls are split between this sidecar's zone and the others, when
    /// zone-aware routing applies to the service here.
    #[serde(skip_serializing_if = "Option::is_none")]
    zones: Option<ZonesView>,
    endpoints: Vec<EndpointView>,
}

/// Zone-aware routing of one service as it stands now.
#[derive(Debug, Serialize)]
struct ZonesView {
    /// The caller's (this sidecar's) zone.
    zone: String,
    min_healthy: f64,
    /// Healthy and total weight of the zone (endpoints the control plane
    /// reports unhealthy included in the total).
    healthy_weight: u64,
    total_weight: u64,
    /// Share of calls without a hash key kept in the zone (0..1).
    local_share: f64,
    /// Share of such calls each other zone gets (`""`: endpoints without a zone).
    spill: std::collections::BTreeMap<String, f64>,
}

fn lb_name(lb: &LbPolicy) -> &'static str {
    match lb {
        LbPolicy::LeastRequest { .. } => "least_request",
        LbPolicy::RoundRobin => "round_robin",
        LbPolicy::RingHash(_) => "ring_hash",
        LbPolicy::Maglev(_) => "maglev",
    }
}

#[derive(Debug, Serialize)]
struct EndpointView {
    address: String,
    /// Share of the hash key space (0..1), for consistent-hash clusters.
    #[serde(skip_serializing_if = "Option::is_none")]
    hash_share: Option<f64>,
    weight: u32,
    zone: Option<String>,
    draining: bool,
    /// False while connects fail and the endpoint backs off.
    available: bool,
    /// Calls in flight plus calls waiting for a connection.
    outstanding: usize,
    connections: usize,
    /// Times the balancer chose it (every attempt).
    requests: u64,
    success: u64,
    failure: u64,
    /// Plain HTTP calls by response status class ("2xx": n), classes seen only.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    http_responses: BTreeMap<&'static str, u64>,
    connect_attempts: u64,
    connect_errors: u64,
    /// Taken out by outlier detection (or its one probe is in flight).
    ejected: bool,
    /// Time left in the current ejection.
    ejection_remaining_ms: u64,
    /// Ejections so far.
    ejections: u64,
}

impl EndpointView {
    fn new(e: &Endpoint, weight: u32, draining: bool) -> Self {
        let r = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        Self {
            address: e.addr.to_string(),
            hash_share: None,
            weight,
            zone: e.zone.clone(),
            draining,
            available: e.pool.is_available(),
            outstanding: e.outstanding(),
            connections: e.pool.connection_count(),
            requests: r(&e.stats.picks),
            success: e.stats.succeeded(),
            failure: e.stats.failed(),
            http_responses: crate::endpoint::HTTP_CLASSES
                .iter()
                .enumerate()
                .map(|(i, c)| (*c, e.stats.http_responses(i)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            connect_attempts: r(&e.pool.stats.connects),
            connect_errors: r(&e.pool.stats.connect_errors),
            ejected: e.outlier.is_out(),
            ejection_remaining_ms: e.outlier.remaining().as_millis() as u64,
            ejections: r(&e.outlier.ejected_total),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AdminService {
    state: Arc<AdminState>,
}

impl AdminService {
    pub fn new(state: Arc<AdminState>) -> Self {
        Self { state }
    }
}

impl hyper::service::Service<Request<Incoming>> for AdminService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let resp = self.state.handle(&req);
        Box::pin(async move { Ok(resp) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    http::HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn browser_requests_are_refused() {
        for ok in [
            &[("host", "127.0.0.1:15000")][..],
            &[
                ("host", "localhost:15000"),
                ("content-type", "application/json"),
            ],
            &[("host", "[::1]:15000"), ("origin", "http://localhost:3000")],
            &[
                ("host", "10.0.0.7:15000"),
                ("sec-fetch-site", "same-origin"),
            ],
        ] {
            assert_eq!(cross_site(&headers(ok)), None, "{ok:?}");
        }
        for (bad, status) in [
            (&[][..], StatusCode::FORBIDDEN),
            (&[("host", "evil.example:15000")][..], StatusCode::FORBIDDEN),
            (
                &[("host", "127.0.0.1"), ("origin", "http://evil.example")],
                StatusCode::FORBIDDEN,
            ),
            (
                &[("host", "127.0.0.1"), ("origin", "null")],
                StatusCode::FORBIDDEN,
            ),
            (
                &[("host", "127.0.0.1"), ("sec-fetch-site", "cross-site")],
                StatusCode::FORBIDDEN,
            ),
            (
                &[
                    ("host", "127.0.0.1"),
                    ("content-type", "Text/Plain; charset=utf-8"),
                ],
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
            (
                &[
                    ("host", "127.0.0.1"),
                    ("content-type", "application/x-www-form-urlencoded"),
                ],
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
        ] {
            assert_eq!(
                cross_site(&headers(bad)).map(|r| r.0),
                Some(status),
                "{bad:?}"
            );
        }
    }
}
