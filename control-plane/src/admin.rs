//! The control plane's admin HTTP port (default `127.0.0.1:15011`), for
//! probes and Prometheus:
//!
//! - `GET /live`: 200 while the process runs.
//! - `GET /ready`: 200 while the admin API and xDS are served; 503 while the
//!   configuration is not loaded yet (etcd unreachable at start) and once a
//!   shutdown has started.
//! - `GET /metrics`: Prometheus metrics (OpenMetrics text), see [`crate::telemetry`].
//!
//! Plain HTTP/1.1 on a port of its own, so scraping and probing need no
//! token and no gRPC, and a busy API port never hides the metrics.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::net::{Acceptor, Conn, Connections};
use crate::registry::Registry;
use crate::telemetry::CpMetrics;

/// The OpenMetrics content type of `/metrics`.
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the admin pages read.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub metrics: Arc<CpMetrics>,
    /// Set once the configuration is loaded (the port is served before, so
    /// probes see a replica waiting for etcd as not ready).
    pub registry: Arc<std::sync::OnceLock<Arc<Registry>>>,
    /// Cancelled when the control plane starts stopping.
    pub stopping: CancellationToken,
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<String> {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

impl AdminState {
    fn handle(&self, req: &Request<Incoming>) -> Response<String> {
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        }
        match req.uri().path() {
            "/live" => text(StatusCode::OK, "live\n"),
            "/ready" if self.stopping.is_cancelled() => {
                text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n")
            }
            "/ready" if self.registry.get().is_none() => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: waiting for etcd (the configuration is not loaded yet)\n",
            ),
            "/ready" => text(StatusCode::OK, "ready\n"),
            "/metrics" => {
                let version = self.registry.get().map_or(0, |r| r.version());
                if let Some(reg) = self.registry.get() {
                    self.metrics.health.set_unhealthy(reg.unhealthy_count());
                }
                let mut r = text(StatusCode::OK, self.metrics.render(version));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static(METRICS_CONTENT_TYPE),
                );
                r
            }
            "/" => text(
                StatusCode::OK,
                "meshwire control plane admin: /live /ready /metrics\n",
            ),
            other => text(
                StatusCode::NOT_FOUND,
                format!("no admin page {other:?}; try /live /ready /metrics\n"),
            ),
        }
    }
}

/// Serves the admin pages on `listener` until `stop` is cancelled; every
/// connection has its place in `conns` (the first-request and idle timeouts,
/// the connection budget).
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    conns: Arc<Connections>,
    stop: CancellationToken,
) {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let mut acceptor = Acceptor::new("admin");
    loop {
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => break,
            c = acceptor.accept(&listener) => c,
        };
        let Some(slot) = conns.admit("admin").await else {
            continue;
        };
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let activity = slot.activity.clone();
            let tcp = Conn::new(tcp, (), slot, "admin", peer);
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let mut call = activity.start();
                let resp = state.handle(&req);
                call.answered = true;
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    tracing::debug!(admin = ?addr, "admin server stopped");
}
