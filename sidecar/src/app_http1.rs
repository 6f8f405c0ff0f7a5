//! The local app over HTTP/1.1, for `http` services (REST apps).
//!
//! Calls from other sidecars arrive as HTTP/2 streams; here each becomes an
//! HTTP/1.1 request on a pooled keep-alive connection to the app
//! (hyper-util's pooling client: a connection is reused only after its
//! response was read to the end and not after `Connection: close`; idle ones
//! are bounded and time out). At most [`Http1App::MAX_IN_FLIGHT`] requests
//! run at once, one connection each; past it a call waits for a slot (its
//! deadline still applies), so an app that stalls cannot make the sidecar
//! open connections without bound.
//!
//! Bodies stream both ways with backpressure (hyper polls a body only when
//! the other side can take more), `Content-Length` bodies keep their length
//! and unknown lengths go chunked, so uploads of any size use bounded memory.
//!
//! Whether the app speaks HTTP/1.1 or h2c is found out once ([`detect`]):
//! an h2c app keeps using the multiplexed HTTP/2 pool like a gRPC app.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri, Version, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::body::{BodyError, RequestBody, ResponseBody};
use crate::connect::ConnectError;
use crate::endpoint::CallGuard;
use crate::grpc::{self, Code};
use crate::respond::ProxyError;
use crate::telemetry::CallTrace;

/// What the app was found to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AppHttp {
    Unknown = 0,
    Http1 = 1,
    H2c = 2,
}

/// The local app's HTTP/1.1 side.
#[derive(Debug)]
pub struct Http1App {
    addr: SocketAddr,
    /// `http://<app>`: the pool key and connect target of every request.
    base: http::uri::Authority,
    client: Client<HttpConnector, AppRequestBody>,
    slots: Arc<Semaphore>,
    connect_timeout: Duration,
    speaks: AtomicU8,
}

impl Http1App {
    /// Requests in flight to the app at once (one connection each).
    pub const MAX_IN_FLIGHT: usize = 512;
    /// Idle keep-alive connections kept for reuse.
    pub const MAX_IDLE: usize = 64;
    const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

    pub fn new(addr: SocketAddr, connect_timeout: Duration) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Self::IDLE_TIMEOUT)
            .pool_max_idle_per_host(Self::MAX_IDLE)
            // The caller's authority goes in `Host`, not the app's address.
            .set_host(false)
            .build(connector);
        Arc::new(Self {
            addr,
            base: http::uri::Authority::try_from(addr.to_string()).expect("a socket address"),
            client,
            slots: Arc::new(Semaphore::new(Self::MAX_IN_FLIGHT)),
            connect_timeout,
            speaks: AtomicU8::new(AppHttp::Unknown as u8),
        })
    }

    /// What the app speaks, probing it the first time (and again after a
    /// probe could not reach it).
    pub async fn speaks(&self) -> AppHttp {
        match self.speaks.load(Ordering::Relaxed) {
            1 => return AppHttp::Http1,
            2 => return AppHttp::H2c,
            _ => {}
        }
        match detect(self.addr, self.connect_timeout).await {
            Ok(found) => {
                tracing::info!(app = %self.addr, speaks = ?found, "detected the app's HTTP version");
                self.speaks.store(found as u8, Ordering::Relaxed);
                found
            }
            // Unreachable: try HTTP/1.1 now, probe again next time.
            Err(_) => AppHttp::Http1,
        }
    }

    /// Sends one call to the app over HTTP/1.1. The request arrives in
    /// HTTP/2 form (from the inbound listener); `guard` and `trace` go with
    /// the response body.
    pub(crate) async fn send(
        &self,
        req: Request<RequestBody>,
        mut guard: CallGuard,
        trace: &mut Option<Box<CallTrace>>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (mut parts, body) = req.into_parts();
        if let Some(a) = parts.uri.authority()
            && !parts.headers.contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            parts.headers.insert(header::HOST, v);
        }
        let target = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(self.base.clone())
            .path_and_query(target)
            .build()
            .map_err(|_| ProxyError::BadRequest("invalid request target"))?;
        parts.version = Version::HTTP_11;
        guard.sent(true);
        let resp = match self
            .client
            .request(Request::from_parts(parts, AppRequestBody(body)))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                let reason = error_chain(&e);
                tracing::debug!(app = %self.addr, error = %reason, "HTTP/1.1 request to the app failed");
                if e.is_connect() {
                    // Maybe it came back speaking something else: look again.
                    self.speaks.store(AppHttp::Unknown as u8, Ordering::Relaxed);
                }
                guard.finish(Code::Unavailable as u8);
                return Err(ProxyError::AppUnreachable(ConnectError::Io {
                    addr: self.addr,
                    reason,
                }));
            }
        };
        let (mut parts, body) = resp.into_parts();
        crate::proxy::strip_hop_by_hop(&mut parts.headers);
        parts.version = Version::HTTP_2;
        let code = grpc::code_of_http(parts.status);
        guard.http_status(parts.status);
        let mut body = AppResponseBody {
            inner: body,
            call: Some((guard, permit)),
            code,
            trace: trace.take(),
        };
        // HEAD, 204, 304: nothing will poll an empty body; the call ends here.
        if body.inner.is_end_stream() {
            body.finish(code);
        }
        Ok(Response::from_parts(parts, ResponseBody::boxed(body)))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(e) = src {
        s.push_str(": ");
        s.push_str(&e.to_string());
        src = e.source();
    }
    s
}

/// The HTTP/2 client preface and an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
const FRAME_SETTINGS: u8 = 0x4;

/// Asks the app once: an HTTP/2 server answers the h2c preface with its
/// SETTINGS frame; anything else (an HTTP/1.1 error response, a close) is
/// an HTTP/1.1 server.
pub async fn detect(addr: SocketAddr, timeout: Duration) -> Result<AppHttp, ConnectError> {
    let probe = async {
        let mut tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| ConnectError::Io {
                addr,
                reason: e.to_string(),
            })?;
        if tcp.write_all(H2_PREFACE).await.is_err() {
            return Ok(AppHttp::Http1);
        }
        let mut head = [0u8; 9];
        Ok(match tcp.read_exact(&mut head).await {
            Ok(_) if head[3] == FRAME_SETTINGS && head[5..9] == [0, 0, 0, 0] => AppHttp::H2c,
            _ => AppHttp::Http1,
        })
    };
    tokio::time::timeout(timeout, probe)
        .await
        // A server that says nothing to the preface is not an HTTP/2 server.
        .unwrap_or(Ok(AppHttp::Http1))
}

/// A request body on its way to the app.
#[derive(Debug)]
pub(crate) struct AppRequestBody(RequestBody);

impl Body for AppRequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.get_mut().0.poll_next(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

/// The app's response body, holding the call's guard, its slot and its span
/// until the body ends.
#[derive(Debug)]
struct AppResponseBody {
    inner: Incoming,
    call: Option<(CallGuard, OwnedSemaphorePermit)>,
    /// The call's status if the body ends cleanly (from the HTTP status).
    code: u8,
    trace: Option<Box<CallTrace>>,
}

impl AppResponseBody {
    fn finish(&mut self, code: u8) {
        if let Some((mut g, _slot)) = self.call.take() {
            g.finish(code);
        }
        if let Some(mut t) = self.trace.take() {
            t.finish(code);
        }
    }
}

impl Body for AppResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref()
                    && let Some((g, _)) = this.call.as_mut()
                {
                    g.response_bytes += d.len() as u64;
                }
                // hyper stops polling once a Content-Length body is complete.
                if frame.is_trailers() || this.inner.is_end_stream() {
                    let code = this.code;
                    this.finish(code);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                // The head was fine and the body is not (a malformed chunk, a
                // short Content-Length): the app broke HTTP, it was reachable.
                // The caller's stream is reset (INTERNAL_ERROR): too late for
                // a status, but the call counts as INTERNAL, not UNAVAILABLE.
                tracing::warn!(error = %error_chain(&e), "the app sent a malformed response body");
                this.finish(Code::Internal as u8);
                Poll::Ready(Some(Err(BodyError::App(e))))
            }
            None => {
                let code = this.code;
                this.finish(code);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
