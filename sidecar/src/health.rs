//! Following the local app's health, so callers stop sending to an app that
//! is down, hung or says it cannot serve.
//!
//! ```text
//! app ◀─ grpc.health.v1 Watch (h2c, HTTP/2 PINGs) │ TCP connect │ HTTP GET PATH ─ health::run
//!                                                                                   │
//!                                    AppHealth (one atomic) ◀───────────────────────┘
//!   inbound: refuses new calls with RST_STREAM(REFUSED_STREAM) while unhealthy (not processed:
//!            the caller's sidecar sends them to another endpoint at once)
//!   admin:   /ready answers 503 "app unhealthy"; meshwire_app_healthy, meshwire_app_health_changes_total
//!   control plane (with an identity from it): each change reported (identity::report), pushed
//!            to every caller as EDS UNHEALTHY, so callers stop picking the endpoint instead of
//!            learning of it only from refusals (which still cover the moments in between)
//! ```
//!
//! `grpc` keeps one `Watch` stream open (no polling) on its own connection,
//! with HTTP/2 keepalive PINGs, so a hung app (SIGSTOP: the kernel still
//! accepts its TCP connections) is noticed within interval + timeout. An app
//! that answers `UNIMPLEMENTED` (or anything but UNAVAILABLE, a timeout or a
//! broken connection) does not serve the health service: it counts as healthy
//! while it keeps answering (a cheap `Check` every interval shows it is not
//! hung). `auto`, the default, is `grpc` for gRPC services and
//! `tcp` otherwise. Unhealthy apps are checked again every interval: no
//! growing backoff, so an app that is back takes calls within about one
//! interval.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use meshwire_mesh::Protocol;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::authz::Authz;

/// How the sidecar checks its app (`--health`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HealthCheck {
    /// `grpc` for a gRPC service, `tcp` for the others.
    #[default]
    Auto,
    /// `grpc.health.v1.Health/Watch` (overall server health, service `""`).
    Grpc,
    /// A TCP connect to the app's port.
    Tcp,
    /// `GET PATH` over HTTP/1.1: 2xx or 3xx is healthy.
    Http(String),
    /// No checks: always healthy.
    None,
}

#[derive(Debug, thiserror::Error)]
#[error("--health {0:?}: expected auto, grpc, tcp, http:/PATH or none")]
pub struct HealthCheckError(String);

impl FromStr for HealthCheck {
    type Err = HealthCheckError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(HealthCheck::Auto),
            "grpc" => Ok(HealthCheck::Grpc),
            "tcp" => Ok(HealthCheck::Tcp),
            "none" => Ok(HealthCheck::None),
            _ => match s.strip_prefix("http:") {
                Some(path)
                    if path.starts_with('/') && http::uri::PathAndQuery::from_str(path).is_ok() =>
                {
                    Ok(HealthCheck::Http(path.to_owned()))
                }
                _ => Err(HealthCheckError(s.to_owned())),
            },
        }
    }
}

/// How and how often the app is checked.
#[derive(Debug, Clone)]
pub struct HealthSettings {
    pub check: HealthCheck,
    /// Between checks (and between HTTP/2 PINGs of a `grpc` watch).
    pub interval: Duration,
    /// Longest wait for one check's answer (or a PING's).
    pub timeout: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            check: HealthCheck::Auto,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        }
    }
}

/// The app's health as last checked; read on every inbound call.
#[derive(Debug)]
pub struct AppHealth {
    healthy: AtomicBool,
    changes: AtomicU64,
    tx: watch::Sender<bool>,
}

impl AppHealth {
    /// Healthy until a check says otherwise, so a sidecar without checks (or
    /// before the first one) serves as it always did.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            healthy: AtomicBool::new(true),
            changes: AtomicU64::new(0),
            tx: watch::channel(true).0,
        })
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Times the health changed (either way).
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Follows every change.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    fn set(&self, healthy: bool, why: &str) {
        if self.healthy.swap(healthy, Ordering::Relaxed) != healthy {
            self.changes.fetch_add(1, Ordering::Relaxed);
            if healthy {
                tracing::info!(why, "app healthy");
            } else {
                tracing::warn!(why, "app unhealthy: refusing new calls until it recovers");
            }
            self.tx.send_replace(healthy);
        }
    }
}

/// Checks the app at `app` until `shutdown`. `authz` tells the local
/// service's protocol (for `auto`).
pub async fn run(
    settings: HealthSettings,
    app: SocketAddr,
    authz: Arc<Authz>,
    health: Arc<AppHealth>,
    shutdown: CancellationToken,
) {
    if settings.check == HealthCheck::None {
        return;
    }
    let checker = Checker {
        s: settings,
        app,
        health,
    };
    loop {
        let check = match &checker.s.check {
            HealthCheck::Auto if authz.protocol() == Protocol::Grpc => HealthCheck::Grpc,
            HealthCheck::Auto => HealthCheck::Tcp,
            c => c.clone(),
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = checker.round(&check) => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(checker.s.interval) => {}
        }
    }
}

struct Checker {
    s: HealthSettings,
    app: SocketAddr,
    health: Arc<AppHealth>,
}

impl Checker {
    /// One check, or for `grpc` one watch for as long as it lasts.
    async fn round(&self, check: &HealthCheck) {
        match check {
            HealthCheck::Grpc => self.watch_grpc().await,
            HealthCheck::Tcp => {
                let ok =
                    tokio::time::timeout(self.s.timeout, tokio::net::TcpStream::connect(self.app))
                        .await
                        .is_ok_and(|r| r.is_ok());
                self.health.set(ok, "tcp connect");
            }
            HealthCheck::Http(path) => {
                let ok = tokio::time::timeout(self.s.timeout, http_get(self.app, path))
                    .await
                    .is_ok_and(|ok| ok);
                self.health.set(ok, "http check");
            }
            HealthCheck::Auto | HealthCheck::None => {}
        }
    }

    async fn watch_grpc(&self) {
        let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{}", self.app))
        else {
            return;
        };
        let endpoint = endpoint
            .connect_timeout(self.s.timeout)
            .http2_keep_alive_interval(self.s.interval)
            .keep_alive_timeout(self.s.timeout)
            .keep_alive_while_idle(true);
        let channel = match tokio::time::timeout(self.s.timeout, endpoint.connect()).await {
            Ok(Ok(c)) => c,
            _ => return self.health.set(false, "cannot connect to the app"),
        };
        let mut client = HealthClient::new(channel);
        let request = || HealthCheckRequest {
            service: String::new(),
        };
        let mut stream = match tokio::time::timeout(self.s.timeout, client.watch(request())).await {
            Ok(Ok(r)) => r.into_inner(),
            // No health service (UNIMPLEMENTED, or an app that is not gRPC
            // at that path): healthy while it answers at all.
            Ok(Err(st)) if !gone(&st) => return self.liveness(client).await,
            Ok(Err(st)) => {
                tracing::debug!(code = ?st.code(), message = st.message(), "health watch refused");
                return self.health.set(false, "health watch refused");
            }
            Err(_) => return self.health.set(false, "no answer to the health watch"),
        };
        let mut answered = false;
        loop {
            match stream.message().await {
                Ok(Some(m)) => {
                    answered = true;
                    let serving = m.status() == ServingStatus::Serving;
                    self.health.set(serving, "health watch");
                }
                // Not a health answer (an app that is not gRPC there).
                Err(st) if !answered && !gone(&st) => return self.liveness(client).await,
                Ok(None) | Err(_) => {
                    return self
                        .health
                        .set(false, "health watch ended (app gone or hung)");
                }
            }
        }
    }

    /// For an app without the health service: healthy while a `Check` every
    /// interval gets any answer but UNAVAILABLE in time (a hung or gone app
    /// gets none).
    async fn liveness(&self, mut client: HealthClient<tonic::transport::Channel>) {
        self.health.set(true, "the app answers (no health service)");
        loop {
            tokio::time::sleep(self.s.interval).await;
            let req = HealthCheckRequest {
                service: String::new(),
            };
            let ok = match tokio::time::timeout(self.s.timeout, client.check(req)).await {
                Ok(Ok(resp)) => resp.into_inner().status() == ServingStatus::Serving,
                Ok(Err(st)) => !gone(&st),
                Err(_) => false,
            };
            self.health.set(ok, "health check call");
            if !ok {
                return;
            }
        }
    }
}

/// The health call failed because the app could not be reached or did not
/// answer (or said UNAVAILABLE), not because it lacks the health service.
fn gone(st: &tonic::Status) -> bool {
    matches!(
        st.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
    )
}

/// `GET path` over a fresh HTTP/1.1 connection: true for 2xx/3xx.
async fn http_get(app: SocketAddr, path: &str) -> bool {
    use http_body_util::Empty;
    let Ok(tcp) = tokio::net::TcpStream::connect(app).await else {
        return false;
    };
    let io = hyper_util::rt::TokioIo::new(tcp);
    let Ok((mut send, conn)) = hyper::client::conn::http1::handshake(io).await else {
        return false;
    };
    tokio::spawn(conn);
    let Ok(req) = http::Request::get(path)
        .header(http::header::HOST, app.to_string())
        .header(http::header::USER_AGENT, "meshwire-sidecar-health")
        .body(Empty::<bytes::Bytes>::new())
    else {
        return false;
    };
    send.send_request(req)
        .await
        .is_ok_and(|r| r.status().is_success() || r.status().is_redirection())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_and_bad_ones_name_the_choices() {
        assert_eq!("grpc".parse::<HealthCheck>().unwrap(), HealthCheck::Grpc);
        assert_eq!("tcp".parse::<HealthCheck>().unwrap(), HealthCheck::Tcp);
        assert_eq!("none".parse::<HealthCheck>().unwrap(), HealthCheck::None);
        assert_eq!(
            "http:/healthz".parse::<HealthCheck>().unwrap(),
            HealthCheck::Http("/healthz".into())
        );
        for bad in ["http:", "http:healthz", "udp", "", "http:/a b"] {
            let e = bad.parse::<HealthCheck>().unwrap_err().to_string();
            assert!(
                e.contains("auto, grpc, tcp, http:/PATH or none"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn changes_are_counted_once_each_way() {
        let h = AppHealth::new();
        let mut rx = h.subscribe();
        h.set(true, "t");
        assert_eq!(h.changes(), 0);
        h.set(false, "t");
        h.set(false, "t");
        assert!(!h.is_healthy());
        assert!(rx.has_changed().unwrap());
        assert!(!*rx.borrow_and_update());
        h.set(true, "t");
        assert_eq!(h.changes(), 2);
    }

    #[tokio::test]
    async fn tcp_check_follows_a_listener_that_goes_and_comes_back() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let c = Checker {
            s: HealthSettings::default(),
            app: addr,
            health: AppHealth::new(),
        };
        c.round(&HealthCheck::Tcp).await;
        assert!(c.health.is_healthy());
        drop(l);
        c.round(&HealthCheck::Tcp).await;
        assert!(!c.health.is_healthy());
        let _l = tokio::net::TcpListener::bind(addr).await.unwrap();
        c.round(&HealthCheck::Tcp).await;
        assert!(c.health.is_healthy());
    }
}
