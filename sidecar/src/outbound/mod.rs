//! The outbound side: the local app's calls, in cleartext HTTP/2 (h2c) or
//! HTTP/1.1, routed by `:authority`/`Host` (or by the per-service port they
//! arrived on) to a cluster, balanced per call over its endpoints, and sent on
//! a multiplexed HTTP/2 connection to the chosen peer sidecar.
//!
//! ```text
//! request ─▶ route (authority → cluster) ─▶ deadline ─▶ pick endpoint
//!         ─▶ lease a stream (connect / fail over) ─▶ send ─▶ stream response back
//! ```

pub mod balance;
pub mod hash;
pub mod route;

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use http::uri::Scheme;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::sync::watch;

use crate::body::{RequestBody, ResponseBody};
use crate::call::Call;
use crate::proxy::{self, CallShape, SendError};
use crate::respond::ProxyError;
use crate::telemetry::metrics::{NotProcessed, RetryOutcome};
use crate::telemetry::{AttemptSpan, Direction, Telemetry};
use route::{ClusterState, Routes};

/// Fail-overs to other endpoints made when the call certainly never reached
/// an app (connect failures, a connection closed under us, GOAWAY,
/// REFUSED_STREAM from a peer sidecar whose app is down), whatever the
/// method (gRFC A6): with the first pick, at least [`MIN_TRIES`] tries.
const MIN_TRIES: usize = 3;

/// Most tries of one call: the retry policy's most attempts plus the
/// fail-overs; the size of the (stack) list of endpoints tried.
const MAX_TRIES: usize = meshwire_mesh::resilience::MAX_ATTEMPTS as usize + 2;

/// Backoff before a retry after an app failure: a random wait in the upper
/// half of base × 2^(retry − 1), at most `max` (the service's
/// `retry.backoff_base`/`backoff_max`, 25 ms and 250 ms by default), unless
/// the app asked for another wait with `grpc-retry-pushback-ms`.
fn retry_backoff(retry: usize, base: Duration, max: Duration) -> Duration {
    let base = base
        .saturating_mul(1 << (retry.saturating_sub(1)).min(16))
        .min(max);
    base / 2 + base.mul_f64(fastrand::f64() / 2.0)
}

/// The outbound handler shared by every outbound listener.
#[derive(Debug)]
pub struct Outbound {
    pub routes: Arc<Routes>,
    scheme: Scheme,
    telemetry: Arc<Telemetry>,
    gate: Option<Arc<StartGate>>,
}

/// Holds calls that arrive while the sidecar is starting (no certificate or
/// first config yet) instead of failing them: the app and its sidecar start
/// together, and the app's first calls must not lose that race.
#[derive(Debug)]
pub struct StartGate {
    open: AtomicBool,
    ready: watch::Receiver<bool>,
    /// Longest a call waits (its own deadline may be shorter).
    max_wait: Duration,
    /// Calls waiting now.
    waiting: AtomicUsize,
}

impl StartGate {
    pub fn new(ready: watch::Receiver<bool>, max_wait: Duration) -> Self {
        let open = *ready.borrow();
        Self {
            open: AtomicBool::new(open),
            ready,
            max_wait,
            waiting: AtomicUsize::new(0),
        }
    }

    /// Calls waiting for the sidecar to be ready.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Waits, if the sidecar is still starting, at most the call's own
    /// deadline (from `headers`) or `max_wait`.
    async fn pass(&self, headers: &http::HeaderMap) -> Result<(), ProxyError> {
        if self.open.load(Ordering::Relaxed) {
            return Ok(());
        }
        let wait =
            proxy::call_timeout(headers, None)?.map_or(self.max_wait, |d| d.min(self.max_wait));
        let mut rx = self.ready.clone();
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let r = tokio::time::timeout(wait, rx.wait_for(|r| *r)).await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        match r {
            Ok(Ok(_)) => {
                self.open.store(true, Ordering::Relaxed);
                Ok(())
            }
            _ => Err(ProxyError::NotReady),
        }
    }
}

impl Outbound {
    pub fn new(routes: Arc<Routes>) -> Self {
        Self {
            scheme: if routes.is_tls() {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            },
            routes,
            telemetry: Arc::default(),
            gate: None,
        }
    }

    /// Calls wait at `gate` until the sidecar is ready.
    pub fn with_gate(mut self, gate: Arc<StartGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Waits at the start-up gate, if the sidecar is still starting.
    pub(crate) async fn pass_gate(&self, headers: &http::HeaderMap) -> Result<(), ProxyError> {
        match &self.gate {
            Some(g) => g.pass(headers).await,
            None => Ok(()),
        }
    }

    pub(crate) fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// Counts errors and traces calls with `telemetry`.
    pub fn with_telemetry(mut self, telemetry: Arc<Telemetry>) -> Self {
        self.telemetry = telemetry;
        self
    }

    /// One call, start to end: route, balance, send; errors become responses.
    /// `fixed` names the service (per-service ports, the gateway's routes).
    pub(crate) async fn handle(
        &self,
        req: Request<Incoming>,
        fixed: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Response<ResponseBody> {
        let call = Call::of(&req, Direction::Outbound);
        let result = self.proxy(req, fixed, call, peer).await;
        call.respond(result, &self.telemetry)
    }

    async fn proxy(
        &self,
        mut req: Request<Incoming>,
        fixed: Option<&str>,
        call: Call,
        peer: Option<IpAddr>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        if let Some(gate) = &self.gate {
            gate.pass(req.headers()).await?;
        }
        let cluster = {
            let table = self.routes.load();
            let name = match fixed {
                Some(n) => n,
                None => {
                    proxy::host_of(proxy::request_authority(&req).ok_or(ProxyError::NoAuthority)?)
                }
            };
            table
                .get(name)
                .cloned()
                .ok_or_else(|| ProxyError::UnknownService(name.to_owned()))?
        };
        crate::http1::check_request(&req, cluster.protocol)?;
        if crate::websocket::is_upgrade(&req) {
            let authority = fixed.map_or_else(
                || {
                    proxy::request_authority(&req)
                        .map(proxy::host_of)
                        .unwrap_or(&cluster.name)
                        .to_owned()
                },
                str::to_owned,
            );
            return crate::websocket::outbound(req, &cluster, &authority).await;
        }
        let timeout = proxy::call_timeout(req.headers(), cluster.request_timeout)?;
        proxy::prepare_request(&mut req, &self.scheme, cluster.authority.as_ref())?;
        let trace =
            self.telemetry
                .client_span(req.headers(), &cluster.name, req.uri().path(), call.grpc());
        let key = hash::call_key(&cluster.hash_policy, req.headers(), peer, call.grpc());
        call.run(timeout, trace, req, |req, shape, span| {
            self.dispatch(&cluster, req, shape, key, span)
        })
        .await
    }

    async fn dispatch(
        &self,
        cluster: &ClusterState,
        mut req: Request<Incoming>,
        shape: CallShape,
        key: hash::CallKey,
        span: Option<AttemptSpan>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        // The gateway's size limit for a body of unknown length.
        let mut req = match req.extensions_mut().remove::<crate::body::BodyLimit>() {
            Some(limit) => req.map(|b| RequestBody::Limited(b, limit)),
            None => req.map(RequestBody::Incoming),
        };
        let set = cluster.endpoints.load_full();
        if set.is_empty() {
            return Err(ProxyError::NoEndpoints(cluster.name.to_string()));
        }
        // Read from the swapped-in cluster state: no allocation, no lock.
        let policy = cluster.retry;
        let tries = (policy.max_attempts + 1).clamp(MIN_TRIES, MAX_TRIES);
        let mut tried = [usize::MAX; MAX_TRIES];
        let mut last_error = None;
        let mut app_retries = 0;
        let mut endpoint_full = false;
        cluster.health.retry_budget.deposit();
        for attempt in 0..tries {
            let Some(i) = set.pick(&tried[..attempt], key.key) else {
                break;
            };
            tried[attempt] = i;
            let endpoint = &set.entries()[i].endpoint;
            // Exact per service; re-taken per attempt (a failed one frees it).
            let Some(slot) = cluster.in_flight.try_admit(cluster.max_requests) else {
                return Err(ProxyError::Overloaded(cluster.name.clone()));
            };
            // Then exact per endpoint: a full endpoint sends the call elsewhere.
            // Counted from here: waiting for a connection is outstanding work.
            let Some(mut guard) = endpoint.try_start_call(cluster.max_requests_per_endpoint) else {
                endpoint_full = true;
                if let Some(s) = &span {
                    s.attempt_failed(endpoint.addr, attempt + 1, "full");
                }
                continue;
            };
            guard.hold(crate::limits::Hold::Slot(slot));
            let lease = match endpoint.pool.acquire().await {
                Ok(l) => l,
                Err(e) => {
                    // Backing off is the pool's own verdict (the endpoint is
                    // already skipped while unavailable), not a new failure.
                    if !matches!(e, crate::connect::ConnectError::BackingOff { .. }) {
                        guard.not_processed();
                    }
                    tracing::debug!(service = %cluster.name, endpoint = %endpoint.addr, error = %e, attempt, "failing over");
                    self.telemetry
                        .metrics
                        .transparent_retry(NotProcessed::Connect);
                    if let Some(s) = &span {
                        s.attempt_failed(endpoint.addr, attempt + 1, "connect");
                    }
                    last_error = Some(e);
                    continue;
                }
            };
            // A refused call can go elsewhere only if an attempt and an endpoint are left.
            let replayable = attempt + 1 < tries && set.has_other(&tried[..=attempt]);
            let retry = (app_retries + 1 < policy.max_attempts).then_some(proxy::RetryPolicy {
                budget: &cluster.health.retry_budget,
                metrics: &self.telemetry.metrics,
                codes: policy.codes,
            });
            // The span names the attempt that answered; earlier ones are events
            // (an attribute set twice would be exported twice).
            let answered = |span: &Option<AttemptSpan>| {
                if let Some(s) = span {
                    s.endpoint(endpoint.addr, attempt + 1);
                }
            };
            match proxy::send(
                lease,
                guard,
                req,
                shape,
                replayable,
                retry,
                policy.per_try_timeout,
            )
            .await
            {
                Ok(mut resp) => {
                    answered(&span);
                    if let Some(c) = key.set_cookie {
                        resp.headers_mut().append(http::header::SET_COOKIE, c);
                    }
                    return Ok(resp);
                }
                Err(SendError::Failed(e)) => {
                    answered(&span);
                    return Err(e);
                }
                Err(SendError::Retry(r, pushback)) => {
                    app_retries += 1;
                    self.telemetry.metrics.retry(RetryOutcome::Retried);
                    if let Some(s) = &span {
                        s.attempt_failed(endpoint.addr, attempt + 1, "retried");
                    }
                    tracing::debug!(service = %cluster.name, endpoint = %endpoint.addr, attempt, "the app failed the call; retrying elsewhere");
                    req = *r;
                    req.headers_mut().insert(
                        "grpc-previous-rpc-attempts",
                        http::HeaderValue::from(attempt + 1),
                    );
                    // The call's own deadline (call::Call::run) bounds this wait.
                    tokio::time::sleep(pushback.unwrap_or_else(|| {
                        retry_backoff(app_retries, policy.backoff_base, policy.backoff_max)
                    }))
                    .await;
                }
                Err(SendError::NotSent(r)) => {
                    tracing::debug!(service = %cluster.name, endpoint = %endpoint.addr, attempt, "not processed upstream; failing over");
                    self.telemetry
                        .metrics
                        .transparent_retry(NotProcessed::Refused);
                    if let Some(s) = &span {
                        s.attempt_failed(endpoint.addr, attempt + 1, "refused");
                    }
                    req = *r;
                }
            }
        }
        Err(match last_error {
            Some(last) => ProxyError::Unreachable {
                service: cluster.name.to_string(),
                last,
            },
            None if endpoint_full => ProxyError::Overloaded(cluster.name.clone()),
            None => ProxyError::NoEndpoints(cluster.name.to_string()),
        })
    }
}

/// The hyper service of one outbound listener; `fixed` names the service for
/// per-service ports (apps that cannot set an authority).
#[derive(Debug, Clone)]
pub struct OutboundService {
    inner: Arc<Outbound>,
    fixed: Option<Arc<str>>,
    /// The caller's IP, for `source_ip` hashing.
    peer: Option<IpAddr>,
}

impl OutboundService {
    pub fn new(inner: Arc<Outbound>, fixed: Option<Arc<str>>) -> Self {
        Self {
            inner,
            fixed,
            peer: None,
        }
    }

    /// Calls on this connection come from `peer`.
    pub fn with_peer(mut self, peer: IpAddr) -> Self {
        self.peer = Some(peer.to_canonical());
        self
    }
}

impl hyper::service::Service<Request<Incoming>> for OutboundService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            Ok(this
                .inner
                .handle(req, this.fixed.as_deref(), this.peer)
                .await)
        })
    }
}
