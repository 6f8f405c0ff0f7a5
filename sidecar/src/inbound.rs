//! The inbound side: calls from other sidecars over HTTP/2, forwarded to the
//! local app over one reused h2c connection (more only when the app's
//! `max_concurrent_streams` is reached).
//!
//! ```text
//! peer sidecar ─▶ inbound listener ─▶ authz ─▶ rate limit ─▶ deadline ─▶ lease a stream to the app ─▶ send ─▶ response back
//! ```
//! Authorization (`authz`) and the service's rate limit
//! ([`crate::ratelimit::InboundRateLimit`]) run before the lease: a denied
//! or refused call never reaches the app. A refusal by the rate limit is an
//! answer (`RESOURCE_EXHAUSTED` / 429 + `Retry-After`), not a reset: the
//! caller's sidecar neither retries it elsewhere nor counts it against us.
//!
//! A call the app never saw (the app refuses connections, turned the
//! stream away, or its health check fails: [`crate::health`]) is refused with RST_STREAM(REFUSED_STREAM), which no app
//! response can look like: the calling sidecar (or any gRPC client, gRFC A6)
//! sends it to another endpoint.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;

use meshwire_mesh::Protocol;

use crate::app_http1::AppHttp;
use crate::authz::Authz;
use crate::body::{RequestBody, ResponseBody};
use crate::call::Call;
use crate::endpoint::Endpoint;
use crate::proxy::{self, CallShape, SendError};
use crate::respond::ProxyError;
use crate::server::ConnInfo;
use crate::telemetry::{AttemptSpan, Direction, Telemetry};

/// Tries per call: a connection to the app that closed before the request was
/// written is retried once on a fresh one.
const MAX_ATTEMPTS: usize = 2;

/// The caller's SPIFFE ID, verified on the mTLS hop, for the app (as
/// Linkerd's `l5d-client-id`); absent for a plaintext (permissive) caller.
pub const CLIENT_ID_HEADER: &str = "x-meshwire-client-id";

/// Headers an app could take for the mesh's word: removed from every
/// request, whoever sent them, before [`CLIENT_ID_HEADER`] is set.
const UNTRUSTED: [&str; 4] = [
    CLIENT_ID_HEADER,
    "x-forwarded-client-cert",
    "x-spiffe-id",
    crate::respond::ERROR_HEADER,
];

/// Most of a refused call's request body read (and dropped) so the stream
/// ends cleanly, and how long that may take.
const DRAIN_BYTES: usize = 64 * 1024;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads the rest of a refused call's request (usually one small DATA frame
/// already on its way) instead of dropping it: a dropped request body makes
/// h2 reset the stream, and past `max_local_error_reset_streams` such resets
/// it closes the whole connection, failing the caller's other calls. A body
/// over [`DRAIN_BYTES`] or [`DRAIN_TIME`] is dropped (reset) all the same.
fn drain_refused(body: Incoming) {
    use http_body::Body as _;
    use http_body_util::BodyExt as _;
    if body.is_end_stream() {
        return;
    }
    tokio::spawn(async move {
        let mut body = body;
        let mut read = 0usize;
        let _ = tokio::time::timeout(DRAIN_TIME, async {
            while read <= DRAIN_BYTES {
                match body.frame().await {
                    Some(Ok(f)) => read += f.data_ref().map_or(0, |d| d.len()),
                    _ => return,
                }
            }
        })
        .await;
    });
}

/// Strips what a caller may not say about itself and states who it is.
fn set_caller_identity(headers: &mut http::HeaderMap, identity: Option<&str>) {
    for h in UNTRUSTED {
        headers.remove(h);
    }
    if let Some(v) = identity.and_then(|id| http::HeaderValue::from_str(id).ok()) {
        headers.insert(CLIENT_ID_HEADER, v);
    }
}

#[derive(Debug)]
pub struct Inbound {
    /// The local app, tracked like any endpoint (outstanding, counters, pool).
    pub app: Arc<Endpoint>,
    /// Error counts and server spans.
    pub telemetry: Arc<Telemetry>,
    /// The local service's policy.
    pub authz: Arc<Authz>,
    /// The app over HTTP/1.1, for an `http` service whose app does not speak h2c.
    pub http1: Arc<crate::app_http1::Http1App>,
    /// Add `x-forwarded-for` / `forwarded` to HTTP (non-gRPC) requests.
    pub forwarded_headers: bool,
    /// The app's health: while it is unhealthy new calls are refused unprocessed.
    pub health: Arc<crate::health::AppHealth>,
    /// At most this many calls at the app at once, and how long one waits
    /// for a place before it is refused unprocessed ([`crate::limits`]).
    pub app_limit: Option<(Arc<tokio::sync::Semaphore>, std::time::Duration)>,
}

impl Inbound {
    async fn handle(
        &self,
        mut req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> Result<Response<ResponseBody>, h2::Error> {
        set_caller_identity(req.headers_mut(), conn.identity.as_deref());
        let call = Call::of(&req, Direction::Inbound);
        let result = if !self.health.is_healthy() {
            Err(ProxyError::AppUnhealthy)
        } else if self
            .authz
            .allows(conn.identity.as_deref(), req.uri().path(), conn.peer.ip())
        {
            if let Err(wait) = self
                .authz
                .rate_limit()
                .check(conn.identity.as_ref(), conn.peer.ip())
            {
                tracing::debug!(caller = conn.identity.as_deref(), peer = %conn.peer, ?wait, "call refused by the rate limit");
                drain_refused(req.into_body());
                Err(ProxyError::RateLimited(wait))
            } else if crate::tcp::is_tcp_connect(&req) {
                self.tcp(req, conn).await
            } else if crate::websocket::is_websocket_connect(&req) {
                if self.authz.protocol() == Protocol::Http {
                    crate::websocket::inbound(req, self.app.addr, self.app.pool.connect_timeout())
                        .await
                } else {
                    Err(ProxyError::BadRequest(
                        "a WebSocket to a service that is not protocol http",
                    ))
                }
            } else {
                self.forward(req, call, conn).await
            }
        } else {
            let caller = conn
                .identity
                .as_deref()
                .unwrap_or("a caller without identity");
            tracing::debug!(%caller, peer = %conn.peer, path = req.uri().path(), "call denied by policy");
            Err(ProxyError::PermissionDenied {
                caller: caller.to_owned(),
                path: req.uri().path().to_owned(),
            })
        };
        match result {
            Err(e) if e.not_processed() => {
                tracing::debug!(error = %e, "refusing a call the app never saw");
                self.telemetry.metrics.error(Direction::Inbound, e.kind());
                Err(h2::Error::from(h2::Reason::REFUSED_STREAM))
            }
            result => Ok(call.respond(result, &self.telemetry)),
        }
    }

    /// A TCP connection for a `tcp` service (see [`crate::tcp`]).
    async fn tcp(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        if self.authz.protocol() != Protocol::Tcp {
            return Err(ProxyError::BadRequest(
                "CONNECT to a service that is not protocol tcp",
            ));
        }
        crate::tcp::accept(
            req,
            self.app.addr,
            self.app.pool.connect_timeout(),
            self.telemetry.metrics.clone(),
            conn,
        )
        .await
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        call: Call,
        conn: &ConnInfo,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        if self.forwarded_headers && !call.grpc() {
            crate::http1::add_forwarded(req.headers_mut(), conn.peer.ip(), conn.identity.is_some());
        }
        let timeout = proxy::call_timeout(req.headers(), None)?;
        proxy::prepare_request(&mut req, &http::uri::Scheme::HTTP, None)?;
        let trace = self
            .telemetry
            .server_span(req.headers(), req.uri().path(), call.grpc());
        call.run(timeout, trace, req, |req, shape, span| {
            self.send_to_app(req, shape, span)
        })
        .await
    }

    async fn send_to_app(
        &self,
        req: Request<Incoming>,
        shape: CallShape,
        span: Option<AttemptSpan>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let mut req = req.map(RequestBody::Incoming);
        if let Some(s) = &span {
            s.endpoint(self.app.addr, 1);
        }
        let permit = match &self.app_limit {
            Some((sem, wait)) => {
                match tokio::time::timeout(*wait, sem.clone().acquire_owned()).await {
                    Ok(Ok(p)) => Some(p),
                    _ => return Err(ProxyError::AppOverloaded),
                }
            }
            None => None,
        };
        if self.authz.protocol() == Protocol::Http && self.http1.speaks().await != AppHttp::H2c {
            let mut guard = self.app.start_call();
            if let Some(p) = permit {
                guard.hold(crate::limits::Hold::Permit(p));
            }
            // The span ends with the response head (`call::Call::run`).
            return self.http1.send(req, guard, &mut None).await;
        }
        // Shared so a refused attempt's guard does not free the place (only
        // when --max-app-calls is set).
        let mut permit = permit.map(Arc::new);
        for attempt in 0..MAX_ATTEMPTS {
            let mut guard = self.app.start_call();
            if let Some(p) = permit.take() {
                guard.hold(crate::limits::Hold::Shared(p.clone()));
                permit = Some(p);
            }
            let lease = self
                .app
                .pool
                .acquire()
                .await
                .map_err(ProxyError::AppUnreachable)?;
            let replayable = attempt + 1 < MAX_ATTEMPTS;
            match proxy::send(lease, guard, req, shape, replayable, None, None).await {
                Ok(resp) => return Ok(resp),
                Err(SendError::Failed(e)) => return Err(e),
                // Retries are the caller's (it was given no retry policy).
                Err(SendError::NotSent(r) | SendError::Retry(r, _)) => req = *r,
            }
        }
        Err(ProxyError::AppUnreachable(
            crate::connect::ConnectError::Io {
                addr: self.app.addr,
                reason: "connection closed before the request could be sent".into(),
            },
        ))
    }
}

#[derive(Debug, Clone)]
pub struct InboundService {
    inner: Arc<Inbound>,
    conn: Arc<ConnInfo>,
}

impl InboundService {
    pub fn new(inner: Arc<Inbound>, conn: &ConnInfo) -> Self {
        Self {
            inner,
            conn: Arc::new(conn.clone()),
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for InboundService {
    type Response = Response<ResponseBody>;
    type Error = h2::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, h2::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let inner = self.inner.clone();
        let conn = self.conn.clone();
        Box::pin(async move { inner.handle(req, &conn).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_cannot_claim_an_identity() {
        let mut h = http::HeaderMap::new();
        for name in UNTRUSTED {
            h.insert(
                name,
                http::HeaderValue::from_static("spiffe://evil/ns/x/sa/y"),
            );
        }
        h.insert("x-keep", http::HeaderValue::from_static("1"));
        set_caller_identity(&mut h, Some("spiffe://test.local/ns/default/sa/caller"));
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(
            h[CLIENT_ID_HEADER],
            "spiffe://test.local/ns/default/sa/caller"
        );
        set_caller_identity(&mut h, None);
        assert_eq!(
            h.len(),
            1,
            "a plaintext caller has no identity header: {h:?}"
        );
    }
}
