//! Accept loops for the sidecar's listeners, with graceful shutdown: on
//! shutdown a listener stops accepting, every connection gets a GOAWAY (or
//! loses keep-alive, for HTTP/1.1) and in-flight calls are left to finish.
//!
//! A mesh listener ([`Transport::Mesh`]) accepts nothing before the sidecar
//! has a certificate, then wants TLS 1.3 with a client certificate chained to
//! the trust bundle; plaintext only while the local service is permissive.
//! The handshake runs in the connection's task, never in the accept loop.
//!
//! Every connection's requests are watched ([`ConnActivity`]): one that makes
//! no request within `first_request_timeout` of its handshake is closed, one
//! idle (no call in flight, none started) for `idle_timeout` gets a GOAWAY,
//! and one whose client cancels most of its calls before they are answered
//! ("slow reset": more than half of at least [`RESET_MIN_STREAMS`]) gets a
//! GOAWAY and [`ABUSE_DRAIN`] to finish.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use meshwire_mesh::conn::{CallGuard, ConnActivity, Ended};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::authz::Authz;
use crate::body::ResponseBody;
use crate::connect::MeshIo;
use crate::identity::MeshTls;

/// Longest a peer may take to finish the TLS handshake (or, in permissive
/// mode, to send its first byte).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection closed gracefully (GOAWAY, or HTTP/1.1 without
/// keep-alive) goes on reading, and discarding, what its client still sends
/// before the socket closes. Closing a socket with unread bytes makes the
/// kernel answer with a RST, which can destroy the GOAWAY still on its way:
/// the client's calls sent meanwhile would then fail as "connection reset"
/// instead of going to another endpoint (Go's http2 server waits 1 s too).
const LINGER: Duration = Duration::from_secs(1);
/// A TLS record of type handshake: how a ClientHello starts.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
pub use meshwire_mesh::conn::RESET_MIN_STREAMS;
/// How long a connection told to go away for cancelling most of its calls
/// may take to finish the rest.
pub const ABUSE_DRAIN: Duration = Duration::from_secs(5);

/// Who is on the other end of an accepted connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's SPIFFE ID, from its client certificate (mesh TLS only).
    pub identity: Option<Arc<str>>,
    /// The client's address as a trusted proxy stated it (PROXY protocol,
    /// gateway listeners only).
    pub source: Option<SocketAddr>,
}

/// How a listener's connections are secured.
#[derive(Debug, Clone)]
pub enum Transport {
    Plain,
    /// Mutual TLS with the sidecar's identity; plaintext accepted too while
    /// the local service is permissive.
    Mesh {
        tls: Arc<MeshTls>,
        authz: Arc<Authz>,
    },
    /// The gateway's public TLS (no client certificate; see `gateway::tls`),
    /// after a PROXY v2 header from trusted proxies.
    Public(Arc<crate::gateway::proxy_protocol::PublicTls>),
}

#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("no certificate yet")]
    NoIdentity,
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration),
    #[error("closed before sending anything")]
    Closed,
    #[error("the client certificate has no SPIFFE ID")]
    NoPeerIdentity,
    #[error("the client certificate's SPIFFE ID {0} is from another trust domain")]
    ForeignTrustDomain(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Transport {
    /// The peek (permissive mode) and the handshake share one time limit.
    async fn accept(&self, tcp: TcpStream) -> Result<Accepted, AcceptError> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.accept_inner(tcp))
            .await
            .map_err(|_| AcceptError::Timeout(HANDSHAKE_TIMEOUT))?
    }

    async fn accept_inner(&self, tcp: TcpStream) -> Result<Accepted, AcceptError> {
        let (tls, authz) = match self {
            Transport::Plain => return Ok((MeshIo::Plain(tcp), None, None)),
            Transport::Public(public) => {
                let (stream, source) = public.accept(tcp).await?;
                return Ok((MeshIo::Server(Box::new(stream)), None, source));
            }
            Transport::Mesh { tls, authz } => (tls, authz),
        };
        if authz.permissive() {
            let mut first = [0u8; 1];
            if tcp.peek(&mut first).await? == 0 {
                return Err(AcceptError::Closed);
            }
            if first[0] != TLS_HANDSHAKE_RECORD {
                return Ok((MeshIo::Plain(tcp), None, None));
            }
        }
        let state = tls.current().ok_or(AcceptError::NoIdentity)?;
        let stream = tokio_rustls::TlsAcceptor::from(state.server.clone())
            .accept(tcp)
            .await?;
        // The chain is the mesh CA's, but a policy can only name SPIFFE IDs:
        // a certificate without one, or from another trust domain, is no
        // mesh workload and must not reach authorization as "some caller".
        let peer = meshwire_tls::peer_id(stream.get_ref().1.peer_certificates())
            .ok_or(AcceptError::NoPeerIdentity)?;
        let domain =
            |id: &str| meshwire_tls::SpiffeId::parse(id).map(|i| i.trust_domain().to_owned());
        let ours = state.cert.spiffe_id.as_deref().map(domain);
        if !matches!((domain(&peer), ours), (Ok(p), Some(Ok(o))) if p == o) {
            return Err(AcceptError::ForeignTrustDomain(peer));
        }
        Ok((
            MeshIo::Server(Box::new(stream)),
            Some(Arc::from(peer)),
            None,
        ))
    }
}

/// An accepted connection: its stream, the peer's SPIFFE ID (mesh TLS), the
/// client address a trusted proxy stated (PROXY protocol).
type Accepted = (MeshIo, Option<Arc<str>>, Option<SocketAddr>);

/// HTTP/2 server settings of the data-plane listeners.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub max_concurrent_streams: u32,
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    pub max_header_list_size: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// A connection that makes no request this long after its handshake is closed.
    pub first_request_timeout: Duration,
    /// A connection with no call in flight and none started this long gets a GOAWAY.
    pub idle_timeout: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 1024,
            stream_window: 1 << 20,
            connection_window: 4 << 20,
            max_frame_size: 64 << 10,
            max_header_list_size: 64 << 10,
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            first_request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocols {
    /// HTTP/1.1 and h2c (prior knowledge), told apart by the connection preface.
    Http1AndHttp2,
    /// HTTP/2 only (the sidecar-to-sidecar hop).
    Http2,
    /// HTTP/1.1 only (the admin server).
    Http1,
}

pub(crate) trait MakeService: Send + Sync + 'static {
    type Service: hyper::service::Service<
            Request<Incoming>,
            Response = Response<ResponseBody>,
            Error: Into<Box<dyn std::error::Error + Send + Sync>>,
            Future: Send + 'static,
        > + Send
        + 'static;
    fn make(&self, conn: &ConnInfo) -> Self::Service;
}

impl<F, S> MakeService for F
where
    F: Fn(&ConnInfo) -> S + Send + Sync + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<ResponseBody>,
            Error: Into<Box<dyn std::error::Error + Send + Sync>>,
            Future: Send + 'static,
        > + Send
        + 'static,
{
    type Service = S;
    fn make(&self, conn: &ConnInfo) -> S {
        self(conn)
    }
}

fn builder(protocols: Protocols, s: &ServerSettings) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(s.max_concurrent_streams)
        .initial_stream_window_size(s.stream_window)
        .initial_connection_window_size(s.connection_window)
        .max_frame_size(s.max_frame_size)
        .max_header_list_size(s.max_header_list_size)
        // RFC 8441: WebSocket over HTTP/2 between sidecars.
        .enable_connect_protocol()
        .keep_alive_interval(s.keepalive_interval)
        .keep_alive_timeout(s.keepalive_timeout)
        // Rapid reset (streams reset before they are accepted) and streams
        // the server itself resets for protocol errors: GOAWAY past these.
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(256)
        .auto_date_header(false);
    match protocols {
        Protocols::Http1AndHttp2 => b,
        Protocols::Http2 => b.http2_only(),
        Protocols::Http1 => b.http1_only(),
    }
}

pin_project_lite::pin_project! {
    /// A served connection. hyper-util's upgradeable connection sniffs the
    /// version itself and ignores `http2_only`, so an HTTP/2-only listener
    /// serves the plain one: HTTP/1.1 there is a protocol error, not a request
    /// (extended CONNECT still works: HTTP/2 upgrades need no HTTP/1 machinery).
    #[project = ServedProj]
    enum Served<'a, I, S, E>
    where
        S: hyper::service::HttpService<Incoming>,
    {
        Upgradeable { #[pin] conn: auto::UpgradeableConnection<'a, I, S, E> },
        Plain { #[pin] conn: auto::Connection<'a, I, S, E> },
    }
}

impl<'a, I, S, E, R> Future for Served<'a, I, S, E>
where
    S: hyper::service::HttpService<Incoming>,
    auto::UpgradeableConnection<'a, I, S, E>: Future<Output = R>,
    auto::Connection<'a, I, S, E>: Future<Output = R>,
{
    type Output = R;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<R> {
        match self.project() {
            ServedProj::Upgradeable { conn } => conn.poll(cx),
            ServedProj::Plain { conn } => conn.poll(cx),
        }
    }
}

/// GOAWAY (HTTP/2) or no more keep-alive (HTTP/1.1) on a pinned [`Served`];
/// a macro because hyper-util's `graceful_shutdown` exists only under the
/// bounds of its serving impls.
macro_rules! graceful_shutdown {
    ($conn:expr) => {
        match $conn.as_mut().project() {
            ServedProj::Upgradeable { conn } => conn.graceful_shutdown(),
            ServedProj::Plain { conn } => conn.graceful_shutdown(),
        }
    };
}

/// Serves `listener` until `shutdown` fires, then drains its connections.
/// `tracker` tracks every connection: waiting on it waits for the drain.
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn(
    name: &'static str,
    listener: TcpListener,
    protocols: Protocols,
    settings: &ServerSettings,
    transport: Transport,
    make: impl MakeService,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    let builder = Arc::new(builder(protocols, settings));
    let http2_only = protocols == Protocols::Http2;
    let limits = (settings.first_request_timeout, settings.idle_timeout);
    let make = Arc::new(make);
    let conns = tracker.clone();
    tracker.spawn(async move {
        // No certificate, no service: connections wait in the backlog.
        if let Transport::Mesh { tls, .. } = &transport {
            tokio::select! {
                () = tls.ready() => {}
                () = shutdown.cancelled() => return,
            }
        }
        let mut accept_errors = 0u32;
        loop {
            let (tcp, peer) = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(c) => { accept_errors = 0; c }
                    Err(e) => {
                        // Out of file descriptors and the like: back off briefly
                        // instead of spinning.
                        accept_errors = (accept_errors + 1).min(10);
                        tracing::warn!(listener = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(5 * u64::from(accept_errors))).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (builder, make, transport, shutdown, lingers) = (
                builder.clone(),
                make.clone(),
                transport.clone(),
                shutdown.clone(),
                conns.clone(),
            );
            conns.spawn(async move {
                let (io, identity, source) = match transport.accept(tcp).await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!(listener = name, %peer, error = %e, "connection refused");
                        return;
                    }
                };
                let activity = Arc::new(ConnActivity::new());
                let svc = Tracked {
                    inner: make.make(&ConnInfo {
                        peer,
                        identity,
                        source,
                    }),
                    activity: activity.clone(),
                };
                let io = TokioIo::new(Lingering::new(io, lingers.clone()));
                let conn = if http2_only {
                    Served::Plain { conn: builder.serve_connection(io, svc) }
                } else {
                    Served::Upgradeable { conn: builder.serve_connection_with_upgrades(io, svc) }
                };
                tokio::pin!(conn);
                let r = tokio::select! {
                    r = conn.as_mut() => r,
                    () = shutdown.cancelled() => {
                        // GOAWAY (or no more keep-alive); in-flight calls finish.
                        graceful_shutdown!(conn);
                        conn.await
                    }
                    end = activity.watch(limits.0, limits.1) => {
                        tracing::debug!(listener = name, %peer, reason = end.as_str(), "closing connection");
                        match end {
                            // Nothing was asked: nothing to finish.
                            Ended::NoRequest => return,
                            Ended::Idle => {
                                graceful_shutdown!(conn);
                                conn.await
                            }
                            Ended::Abusive => {
                                tracing::warn!(listener = name, %peer, "client cancels most of its calls (slow reset); sending GOAWAY");
                                graceful_shutdown!(conn);
                                match tokio::time::timeout(ABUSE_DRAIN, conn).await {
                                    Ok(r) => r,
                                    Err(_) => return,
                                }
                            }
                        }
                    }
                };
                if let Err(e) = r {
                    tracing::debug!(listener = name, %peer, error = %e, "connection ended with error");
                }
            });
        }
        drop(listener);
        tracing::debug!(listener = name, "stopped accepting; draining");
    });
}

// === impl Lingering ===

/// A served connection's transport that, once the server has shut it down
/// gracefully, is handed to a task of the drain's tracker to [`LINGER`]
/// instead of being closed at once (see [`LINGER`]).
struct Lingering {
    io: Option<MeshIo>,
    shut_down: bool,
    tracker: TaskTracker,
}

impl Lingering {
    fn new(io: MeshIo, tracker: TaskTracker) -> Self {
        Self {
            io: Some(io),
            shut_down: false,
            tracker,
        }
    }

    fn io(&mut self) -> Pin<&mut MeshIo> {
        Pin::new(self.io.as_mut().expect("present until dropped"))
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        // A connection that failed or was cut off closes at once.
        if !self.shut_down {
            return;
        }
        let Some(mut io) = self.io.take() else { return };
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        self.tracker.spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut sink = [0u8; 512];
            // Until the client closes its side, errs, or LINGER ends.
            let _ = tokio::time::timeout(LINGER, async {
                while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        });
    }
}

impl tokio::io::AsyncRead for Lingering {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.get_mut().io().poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Lingering {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut().io().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut().io().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().io().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = this.io().poll_shutdown(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            this.shut_down = true;
        }
        r
    }
}

/// A connection's service, counting its calls in the connection's
/// [`ConnActivity`].
#[derive(Debug)]
struct Tracked<S> {
    inner: S,
    activity: Arc<ConnActivity>,
}

impl<S, B, RB> hyper::service::Service<Request<B>> for Tracked<S>
where
    S: hyper::service::Service<Request<B>, Response = Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, req: Request<B>) -> Self::Future {
        let guard = self.activity.start();
        TrackedFuture {
            inner: self.inner.call(req),
            guard,
        }
    }
}

pin_project_lite::pin_project! {
    /// The service's future; dropped unfinished, the client cancelled it.
    #[derive(Debug)]
    struct TrackedFuture<F> {
        #[pin]
        inner: F,
        guard: CallGuard,
    }
}

impl<F, RB, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        // A client that resets a call whose request is still streaming sees
        // it end as CANCELLED (the app's stream is reset in turn).
        this.guard.answered = out.as_ref().is_ok_and(|r| !cancelled(r));
        Poll::Ready(out)
    }
}

/// The sidecar's own answer to a cancelled call: `grpc-status: 1` or 499.
fn cancelled<B>(r: &Response<B>) -> bool {
    r.status().as_u16() == 499
        || (r.headers().contains_key(crate::respond::ERROR_HEADER)
            && r.headers()
                .get(crate::grpc::GRPC_STATUS)
                .is_some_and(|v| v == "1"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (client, server)
    }

    /// After a graceful close the server side reads what the client still
    /// sends (no RST that could destroy a GOAWAY in flight) until the client
    /// closes; the drain's tracker waits for it.
    #[tokio::test]
    async fn a_gracefully_closed_connection_lingers_until_the_client_closes() {
        let (mut client, server) = tcp_pair().await;
        let tracker = TaskTracker::new();
        let mut io = Lingering::new(MeshIo::Plain(server), tracker.clone());
        io.write_all(b"GOAWAY").await.unwrap();
        io.shutdown().await.unwrap();
        drop(io);
        tracker.close();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"GOAWAY");
        // Bytes sent after the server's FIN are read, not answered by a RST.
        client.write_all(&[0; 4096]).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(100), tracker.wait())
                .await
                .is_err(),
            "the server side stays open while the client's side is"
        );
        assert!(
            client.read(&mut [0; 16]).await.is_ok_and(|n| n == 0),
            "no reset"
        );
        drop(client);
        tokio::time::timeout(LINGER, tracker.wait())
            .await
            .expect("the linger ends when the client closes");
    }

    /// A connection dropped without a shutdown (failed, cut off) closes at once.
    #[tokio::test]
    async fn a_connection_dropped_without_shutdown_does_not_linger() {
        let (_client, server) = tcp_pair().await;
        let tracker = TaskTracker::new();
        drop(Lingering::new(MeshIo::Plain(server), tracker.clone()));
        tracker.close();
        assert!(tracker.is_empty());
        tracker.wait().await;
    }
}
