//! The edge gateway: the sidecar's role at the front door of the mesh, for
//! callers outside it (`meshwire-sidecar --gateway gateway.yaml`).
//!
//! It terminates their TLS, decides whether a request may enter, and then
//! hands it to the sidecar's ordinary outbound path, so it reaches the
//! service balanced per request over mutual TLS with **the gateway's own
//! SPIFFE identity** (services' policies can allow the gateway and no one
//! else).
//!
//! # One request
//! ```text
//! client ──[PROXY v2 header from a trusted L4 proxy: proxy_protocol]──
//!   TLS 1.2/1.3 (certificate by SNI: tls::CertStore, reloaded on change)──▶
//!   public listener (server::Transport::Public; ALPN h2 or http/1.1, gRPC over h2)
//!   Gateway::handle, in this order, each step answering on its own when it refuses:
//!   1. limits: header count and bytes (431), URI length (414)
//!   2. path::normalize: //, /./, /../, %2F, escape case → one spelling (400)
//!   3. Routes::find: host (exact > *.domain > any), longest path prefix (404)
//!   4. route limits again, Content-Length against max_body_bytes (413), method (405)
//!   5. client IP: the peer (or the PROXY header's source), or x-forwarded-for from
//!      trusted proxies (ip::TrustedProxies);
//!      route CIDR rules (403)
//!   6. gateway-owned headers removed (x-jwt-subject, claim headers), then the
//!      route's JWT (jwt::Provider::verify): required/optional, 401 + WWW-Authenticate
//!   7. rate limits (crate::ratelimit::RateLimits: route / client IP / subject), 429 + Retry-After
//!   8. upstream headers set: subject, claims, x-forwarded-for, forwarded, x-forwarded-proto; the
//!      normalised path replaces the request's
//!   ─▶ outbound::Outbound::handle(service = the route's): deadline, least-request pick,
//!      pooled HTTP/2 mTLS connection ──▶ the service's sidecar ──▶ the app
//!   response streams back; AccessBody writes the access-log line and counts the
//!   route's metrics when the response ends
//! ```
//! gRPC-Web requests (binary) become gRPC on the way in and the trailers a
//! final body frame on the way out (`grpc_web`).
//!
//! gRPC callers get the same refusals as trailers-only responses:
//! `UNAUTHENTICATED`, `PERMISSION_DENIED`, `RESOURCE_EXHAUSTED`,
//! `UNIMPLEMENTED` (no route), `INVALID_ARGUMENT` (malformed).

pub mod config;
pub mod grpc_web;
pub mod ip;
pub mod jwt;
pub mod log;
pub mod metrics;
pub mod path;
pub mod proxy_protocol;
use crate::ratelimit;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body::{Body, Frame};
use hyper::body::Incoming;

use crate::body::{BodyError, ResponseBody};
use crate::grpc::{self, Code};
use crate::outbound::Outbound;
pub use config::{GatewayConfig, GatewayConfigError};

// === config types (built by config.rs) ===

/// A public listener: its address and TLS.
#[derive(Debug)]
pub struct Listener {
    pub address: SocketAddr,
    pub store: Arc<tls::CertStore>,
    pub public: Arc<proxy_protocol::PublicTls>,
}

/// Request limits (the gateway's, or a route's).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_headers: usize,
    /// Names and values of all headers together.
    pub max_header_bytes: usize,
    pub max_uri_length: usize,
    pub max_body_bytes: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_headers: 100,
            max_header_bytes: 32 << 10,
            max_uri_length: 8 << 10,
            max_body_bytes: None,
        }
    }
}

#[derive(Debug)]
pub struct RouteJwt {
    pub provider: Arc<jwt::Provider>,
    pub required: bool,
}

/// Responses by status class and refusals by reason, per route.
#[derive(Debug, Default)]
pub struct RouteStats {
    /// 1xx..5xx.
    pub responses: [AtomicU64; 5],
    /// By [`REJECTIONS`].
    pub rejected: [AtomicU64; REJECTIONS.len()],
    pub bytes_sent: AtomicU64,
    /// Sum of durations in microseconds (with the count, a mean).
    pub duration_us: AtomicU64,
}

#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    pub service: Arc<str>,
    /// Lower-case; `*.example.com` for wildcards; empty: any host.
    pub hosts: Vec<String>,
    /// Normalised; matched on segment boundaries.
    pub prefix: String,
    /// Empty: any.
    pub methods: Vec<Method>,
    pub limits: Limits,
    pub jwt: Option<RouteJwt>,
    pub ip: ip::IpRules,
    pub rate_limits: ratelimit::RateLimits,
    pub stats: Arc<RouteStats>,
}

impl Route {
    /// How well this route's hosts match `host`: 3 exact, 2 wildcard, 1 any.
    fn host_score(&self, host: &str) -> u8 {
        if self.hosts.is_empty() {
            return 1;
        }
        let mut best = 0;
        for h in &self.hosts {
            if h == host {
                return 3;
            }
            if let Some(parent) = h.strip_prefix("*.")
                && let Some((_, rest)) = host.split_once('.')
                && rest == parent
            {
                best = 2;
            }
        }
        best
    }

    /// `/api` matches `/api` and `/api/x`, not `/apix`.
    fn prefix_matches(&self, path: &str) -> bool {
        let p = self.prefix.as_str();
        path.starts_with(p)
            && (p.ends_with('/') || path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
    }
}

/// Every route, with what applies to all of them.
#[derive(Debug)]
pub struct Routes {
    pub routes: Vec<Arc<Route>>,
    pub trusted: ip::TrustedProxies,
    pub escaped_slashes: path::EscapedSlashes,
    /// Headers the gateway sets, removed from every request first.
    pub owned_headers: Vec<HeaderName>,
    /// Checked before any route is known.
    pub limits: Limits,
}

impl Routes {
    /// The best route for `host` and the normalised `path`: the most
    /// specific host match, then the longest prefix; ties go to the first.
    pub fn find(&self, host: &str, path: &str) -> Option<&Arc<Route>> {
        let mut best: Option<(&Arc<Route>, (u8, usize))> = None;
        for r in &self.routes {
            let h = r.host_score(host);
            if h == 0 || !r.prefix_matches(path) {
                continue;
            }
            let score = (h, r.prefix.len());
            if best.is_none_or(|(_, s)| score > s) {
                best = Some((r, score));
            }
        }
        best.map(|(r, _)| r)
    }
}

// === errors ===

/// Labels of `RouteStats::rejected` and of the access log's `rejected`.
pub const REJECTIONS: [&str; 9] = [
    "no-route",
    "bad-request",
    "uri-too-long",
    "headers-too-large",
    "body-too-large",
    "method-not-allowed",
    "forbidden",
    "unauthenticated",
    "rate-limited",
];

/// Why the gateway answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("no route for this host and path")]
    NoRoute,
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("the URI is longer than {0} bytes")]
    UriTooLong(usize),
    #[error("request headers over the limit ({0})")]
    HeadersTooLarge(&'static str),
    #[error("the body is larger than {0} bytes")]
    BodyTooLarge(u64),
    #[error("method not allowed")]
    MethodNotAllowed(HeaderValue),
    #[error("forbidden for {0}")]
    Forbidden(IpAddr),
    #[error("unauthenticated: {0}")]
    Unauthenticated(jwt::TokenError),
    #[error("rate limit exceeded")]
    RateLimited(Duration),
}

impl GatewayError {
    fn index(&self) -> usize {
        match self {
            GatewayError::NoRoute => 0,
            GatewayError::BadRequest(_) => 1,
            GatewayError::UriTooLong(_) => 2,
            GatewayError::HeadersTooLarge(_) => 3,
            GatewayError::BodyTooLarge(_) => 4,
            GatewayError::MethodNotAllowed(_) => 5,
            GatewayError::Forbidden(_) => 6,
            GatewayError::Unauthenticated(_) => 7,
            GatewayError::RateLimited(_) => 8,
        }
    }

    pub fn kind(&self) -> &'static str {
        REJECTIONS[self.index()]
    }

    fn status(&self) -> StatusCode {
        match self {
            GatewayError::NoRoute => StatusCode::NOT_FOUND,
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            GatewayError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GatewayError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::Forbidden(_) => StatusCode::FORBIDDEN,
            GatewayError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            GatewayError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    fn code(&self) -> Code {
        match self {
            GatewayError::NoRoute | GatewayError::MethodNotAllowed(_) => Code::Unimplemented,
            GatewayError::BadRequest(_)
            | GatewayError::UriTooLong(_)
            | GatewayError::HeadersTooLarge(_) => Code::InvalidArgument,
            GatewayError::BodyTooLarge(_) | GatewayError::RateLimited(_) => Code::ResourceExhausted,
            GatewayError::Forbidden(_) => Code::PermissionDenied,
            GatewayError::Unauthenticated(_) => Code::Unauthenticated,
        }
    }

    /// The response: trailers-only for gRPC, the HTTP status otherwise.
    pub fn into_response(self, grpc_call: bool, version: Version) -> Response<ResponseBody> {
        let message = self.to_string();
        let mut r = if grpc_call {
            let mut r = Response::new(ResponseBody::empty());
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert(grpc::GRPC_STATUS, self.code().header_value());
            h.insert(grpc::GRPC_MESSAGE, grpc::encode_message(&message));
            r
        } else {
            let mut r = Response::new(ResponseBody::full(format!("{message}\n")));
            *r.status_mut() = self.status();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        };
        *r.version_mut() = version;
        let h = r.headers_mut();
        h.insert(
            crate::respond::ERROR_HEADER,
            HeaderValue::from_static(self.kind()),
        );
        match self {
            GatewayError::Unauthenticated(e) => {
                // RFC 6750 §3: no error code when no token was sent.
                let challenge = match e {
                    jwt::TokenError::Missing => "Bearer realm=\"meshwire\"".to_owned(),
                    e => format!(
                        "Bearer realm=\"meshwire\", error=\"invalid_token\", error_description=\"{e}\""
                    ),
                };
                if let Ok(v) = HeaderValue::from_str(&challenge) {
                    h.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            GatewayError::RateLimited(wait) => {
                // Whole seconds, rounded up, at least 1.
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            GatewayError::MethodNotAllowed(allow) => {
                h.insert(header::ALLOW, allow);
            }
            _ => {}
        }
        r
    }
}

// === the gateway ===

/// The gateway's request handler, shared by its listeners.
#[derive(Debug)]
pub struct Gateway {
    routes: Arc<Routes>,
    outbound: Arc<Outbound>,
    access_log: Option<Arc<log::AccessLog>>,
}

/// What was decided about a request before it goes upstream.
struct Admitted {
    route: Arc<Route>,
    subject: Option<Arc<str>>,
}

fn host_of(req: &Request<Incoming>) -> String {
    let a = req
        .uri()
        .authority()
        .map(|a| a.host())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(crate::proxy::host_of)
        })
        .unwrap_or("");
    a.trim_end_matches('.').to_ascii_lowercase()
}

fn check_limits(req: &Request<Incoming>, l: &Limits) -> Result<(), GatewayError> {
    let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri_len > l.max_uri_length {
        return Err(GatewayError::UriTooLong(l.max_uri_length));
    }
    let h = req.headers();
    if h.len() > l.max_headers {
        return Err(GatewayError::HeadersTooLarge("count"));
    }
    let bytes: usize = h.iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
    if bytes > l.max_header_bytes {
        return Err(GatewayError::HeadersTooLarge("size"));
    }
    Ok(())
}

impl Gateway {
    pub fn new(
        routes: Arc<Routes>,
        outbound: Arc<Outbound>,
        access_log: Option<Arc<log::AccessLog>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            routes,
            outbound,
            access_log,
        })
    }

    pub fn routes(&self) -> &Arc<Routes> {
        &self.routes
    }

    async fn handle(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        source: Option<SocketAddr>,
    ) -> Response<ResponseBody> {
        let start = Instant::now();
        let grpc_call = grpc::is_grpc(req.headers());
        let grpc_web = grpc_web::is_grpc_web(req.headers());
        let version = req.version();
        // Behind an L4 proxy (PROXY protocol) the stated source is the peer.
        let client = self
            .routes
            .trusted
            .client(source.unwrap_or(peer).ip(), req.headers());
        let mut entry = self.access_log.as_ref().map(|_| log::Entry {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            client: client.ip.to_string(),
            peer: peer.to_string(),
            method: req.method().to_string(),
            host: host_of(&req),
            path: req.uri().path().to_owned(),
            protocol: match version {
                _ if grpc_web => "grpc-web",
                Version::HTTP_2 if grpc_call => "grpc",
                Version::HTTP_2 => "h2",
                Version::HTTP_10 => "http/1.0",
                _ => "http/1.1",
            },
            trace_id: req
                .headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split('-').nth(1))
                .map(str::to_owned),
            ..Default::default()
        });
        let admitted = self.admit(&mut req, &client, entry.as_mut());
        let (route, resp) = match admitted {
            Err((route, e)) => {
                tracing::debug!(client = %client.ip, route = ?route.as_ref().map(|r| &r.name), error = %e, "gateway refused a request");
                if let Some(r) = &route {
                    r.stats.rejected[e.index()].fetch_add(1, Ordering::Relaxed);
                }
                if let Some(en) = entry.as_mut() {
                    en.rejected = Some(e.kind());
                }
                (route, e.into_response(grpc_call, version))
            }
            Ok(a) => {
                if let Some(en) = entry.as_mut() {
                    en.identity = a.subject.as_deref().map(str::to_owned);
                }
                let limit = req.extensions().get::<crate::body::BodyLimit>().cloned();
                if grpc_web {
                    grpc_web::request_to_grpc(req.headers_mut());
                }
                let resp = self
                    .outbound
                    .handle(req, Some(&a.route.service), Some(client.ip))
                    .await;
                match limit {
                    // The body grew past the limit while streaming: the
                    // upstream stream was reset, the caller gets 413.
                    Some(l) if l.exceeded.load(Ordering::Relaxed) => {
                        let e = GatewayError::BodyTooLarge(l.max);
                        a.route.stats.rejected[e.index()].fetch_add(1, Ordering::Relaxed);
                        if let Some(en) = entry.as_mut() {
                            en.rejected = Some(e.kind());
                        }
                        (Some(a.route), e.into_response(grpc_call, version))
                    }
                    _ => (Some(a.route), resp),
                }
            }
        };
        let (mut parts, body) = resp.into_parts();
        if grpc_web {
            grpc_web::response_to_web(&mut parts.headers);
        }
        if let Some(en) = entry.as_mut() {
            en.status = parts.status.as_u16();
            en.grpc_status = parts.headers.get(grpc::GRPC_STATUS).map(grpc::status_code);
        }
        let watched = AccessBody {
            inner: body,
            route: route.map(|r| r.stats.clone()),
            status: parts.status,
            bytes: 0,
            start,
            entry,
            log: self.access_log.clone(),
        };
        let mut body = ResponseBody::boxed(watched);
        if grpc_web {
            // Outside the access body, which so still sees the trailers' status.
            body = ResponseBody::boxed(grpc_web::WebBody(body));
        }
        Response::from_parts(parts, body)
    }

    /// Steps 1–8 of the module docs; the error carries the route when one matched.
    #[allow(clippy::result_large_err)]
    fn admit(
        &self,
        req: &mut Request<Incoming>,
        client: &ip::ClientAddr,
        mut entry: Option<&mut log::Entry>,
    ) -> Result<Admitted, (Option<Arc<Route>>, GatewayError)> {
        let rs = &self.routes;
        check_limits(req, &rs.limits).map_err(|e| (None, e))?;
        // `Some` only when the request's spelling was not canonical.
        let rewritten = match path::normalize(req.uri().path(), rs.escaped_slashes) {
            Ok(std::borrow::Cow::Borrowed(_)) => None,
            Ok(std::borrow::Cow::Owned(p)) => Some(p),
            Err(e) => return Err((None, GatewayError::BadRequest(e.to_string()))),
        };
        if let (Some(en), Some(p)) = (entry.as_deref_mut(), &rewritten) {
            en.path.clone_from(p);
        }
        let host = host_of(req);
        let route = rs
            .find(&host, rewritten.as_deref().unwrap_or(req.uri().path()))
            .cloned()
            .ok_or((None, GatewayError::NoRoute))?;
        if let Some(en) = entry {
            en.route = Some(route.name.to_string());
            en.service = Some(route.service.to_string());
        }
        let fail = |e| (Some(route.clone()), e);
        check_limits(req, &route.limits).map_err(fail)?;
        if let Some(max) = route.limits.max_body_bytes {
            let declared = req
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            match declared {
                Some(n) if n > max => return Err(fail(GatewayError::BodyTooLarge(max))),
                // hyper and h2 hold a body to its declared length.
                Some(_) => {}
                // Unknown length (chunked, or HTTP/2 without content-length):
                // counted as it streams (body::RequestPipe).
                None if !req.body().is_end_stream() => {
                    req.extensions_mut().insert(crate::body::BodyLimit {
                        max,
                        exceeded: Default::default(),
                    });
                }
                None => {}
            }
        }
        if !route.methods.is_empty() && !route.methods.contains(req.method()) {
            let allow: Vec<&str> = route.methods.iter().map(Method::as_str).collect();
            let allow =
                HeaderValue::from_str(&allow.join(", ")).unwrap_or(HeaderValue::from_static(""));
            return Err(fail(GatewayError::MethodNotAllowed(allow)));
        }
        if !route.ip.admits(client.ip) {
            return Err(fail(GatewayError::Forbidden(client.ip)));
        }
        for h in &rs.owned_headers {
            req.headers_mut().remove(h);
        }
        let mut subject = None;
        if let Some(j) = &route.jwt {
            match jwt::bearer(req.headers()) {
                None if j.required => {
                    return Err(fail(GatewayError::Unauthenticated(
                        jwt::TokenError::Missing,
                    )));
                }
                None => {}
                Some(token) => {
                    // A bad token is refused even where one is optional.
                    let v = j
                        .provider
                        .verify(token)
                        .map_err(|e| fail(GatewayError::Unauthenticated(e)))?;
                    j.provider.set_headers(&v, req.headers_mut());
                    if !j.provider.forward_token {
                        req.headers_mut().remove(header::AUTHORIZATION);
                    }
                    subject = v.subject;
                }
            }
        }
        route
            .rate_limits
            .check(client.ip, subject.as_ref())
            .map_err(|wait| fail(GatewayError::RateLimited(wait)))?;

        let h = req.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&client.forwarded_for) {
            h.insert("x-forwarded-for", v);
        }
        let fwd = client.forwarded(h.get(header::FORWARDED).and_then(|v| v.to_str().ok()));
        if let Ok(v) = HeaderValue::from_str(&fwd) {
            h.insert(header::FORWARDED, v);
        }
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        if let Some(path) = rewritten {
            let mut parts = req.uri().clone().into_parts();
            let pq = match req.uri().query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            parts.path_and_query = pq.parse().ok();
            if let Ok(u) = http::Uri::from_parts(parts) {
                *req.uri_mut() = u;
            }
        }
        Ok(Admitted { route, subject })
    }
}

/// The hyper service of one public connection.
#[derive(Debug, Clone)]
pub struct GatewayService {
    gateway: Arc<Gateway>,
    peer: SocketAddr,
    /// The client's address from a trusted proxy's PROXY header.
    source: Option<SocketAddr>,
}

impl GatewayService {
    pub fn new(gateway: Arc<Gateway>, peer: SocketAddr, source: Option<SocketAddr>) -> Self {
        Self {
            gateway,
            peer,
            source,
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for GatewayService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.gateway.handle(req, this.peer, this.source).await) })
    }
}

// === the response on its way out ===

/// Passes the response body through, counting bytes; when it is dropped
/// (ended, failed or abandoned) the route's metrics and the access log get
/// the request's outcome.
struct AccessBody {
    inner: ResponseBody,
    route: Option<Arc<RouteStats>>,
    status: StatusCode,
    bytes: u64,
    start: Instant,
    entry: Option<log::Entry>,
    log: Option<Arc<log::AccessLog>>,
}

impl Body for AccessBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                self.bytes += d.len() as u64;
            } else if let (Some(t), Some(en)) = (f.trailers_ref(), self.entry.as_mut()) {
                en.grpc_status = t.get(grpc::GRPC_STATUS).map(grpc::status_code);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for AccessBody {
    fn drop(&mut self) {
        let took = self.start.elapsed();
        if let Some(s) = &self.route {
            let class = usize::from(self.status.as_u16() / 100).clamp(1, 5) - 1;
            s.responses[class].fetch_add(1, Ordering::Relaxed);
            s.bytes_sent.fetch_add(self.bytes, Ordering::Relaxed);
            s.duration_us
                .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        }
        if let (Some(mut en), Some(log)) = (self.entry.take(), self.log.as_ref()) {
            en.bytes_sent = self.bytes;
            en.duration_ms = took.as_secs_f64() * 1000.0;
            log.write(&en);
        }
    }
}

// === start-up ===

/// Starts what runs beside the listeners: the file watcher (certificates,
/// JWKS) and the periodic clean-up of idle rate-limit buckets.
pub fn spawn_background(cfg: &GatewayConfig, stop: tokio_util::sync::CancellationToken) {
    tls::watch(
        cfg.listeners.iter().map(|l| l.store.clone()).collect(),
        cfg.reload_interval,
        stop.clone(),
    );
    for p in &cfg.providers {
        jwt::spawn_fetch(p.clone(), stop.clone());
    }
    let providers = cfg.providers.clone();
    let routes = cfg.routes.clone();
    let every = cfg.reload_interval;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        let mut n = 0u64;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            for p in &providers {
                let p = p.clone();
                let _ = tokio::task::spawn_blocking(move || p.reload_if_changed()).await;
            }
            // About once a minute (and at least every 12 ticks).
            n += 1;
            if n.is_multiple_of((60 / every.as_secs().max(1)).clamp(1, 12)) {
                for r in &routes.routes {
                    r.rate_limits.forget_idle();
                }
            }
        }
    });
}

/// Serves the gateway's public listeners (bound by the caller, so a bad
/// address fails start-up whole) with `outbound` behind them.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn start(
    cfg: &GatewayConfig,
    listeners: Vec<tokio::net::TcpListener>,
    outbound: Arc<Outbound>,
    settings: &crate::server::ServerSettings,
    shutdown: tokio_util::sync::CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> std::io::Result<Arc<Gateway>> {
    let access_log = match &cfg.access_log {
        Some(p) => Some(log::AccessLog::open(p.clone()).await?),
        None => None,
    };
    let gw = Gateway::new(cfg.routes.clone(), outbound, access_log);
    for (l, listener) in cfg.listeners.iter().zip(listeners) {
        let g = gw.clone();
        crate::server::spawn(
            "gateway",
            listener,
            crate::server::Protocols::Http1AndHttp2,
            settings,
            crate::server::Transport::Public(l.public.clone()),
            move |c: &crate::server::ConnInfo| GatewayService::new(g.clone(), c.peer, c.source),
            shutdown.clone(),
            tracker,
        );
    }
    spawn_background(cfg, shutdown);
    Ok(gw)
}
