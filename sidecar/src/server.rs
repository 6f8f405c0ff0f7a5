//! Accept loops for the sidecar's listeners, with graceful shutdown: on
//! shutdown a listener stops accepting, every connection gets a GOAWAY (or
//! loses keep-alive, for HTTP/1.1) and in-flight calls are left to finish.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::ResponseBody;
use crate::connect::MeshIo;

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

pub(crate) trait MakeService: Send + 'static {
    type Service: hyper::service::Service<
            Request<Incoming>,
            Response = Response<ResponseBody>,
            Error = Infallible,
            Future: Send + 'static,
        > + Send
        + 'static;
    fn make(&self, peer: SocketAddr) -> Self::Service;
}

impl<F, S> MakeService for F
where
    F: Fn(SocketAddr) -> S + Send + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<ResponseBody>,
            Error = Infallible,
            Future: Send + 'static,
        > + Send
        + 'static,
{
    type Service = S;
    fn make(&self, peer: SocketAddr) -> S {
        self(peer)
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
        .keep_alive_interval(s.keepalive_interval)
        .keep_alive_timeout(s.keepalive_timeout)
        .auto_date_header(false);
    match protocols {
        Protocols::Http1AndHttp2 => b,
        Protocols::Http2 => b.http2_only(),
        Protocols::Http1 => b.http1_only(),
    }
}

/// Serves `listener` until `shutdown` fires, then drains its connections.
/// The returned task ends when the last connection has closed.
pub(crate) fn spawn(
    name: &'static str,
    listener: TcpListener,
    protocols: Protocols,
    settings: &ServerSettings,
    make: impl MakeService,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    let builder = builder(protocols, settings);
    let conns = tracker.clone();
    tracker.spawn(async move {
        let graceful = GracefulShutdown::new();
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
            let io = TokioIo::new(MeshIo::Plain(tcp));
            let conn = builder
                .serve_connection_with_upgrades(io, make.make(peer))
                .into_owned();
            let conn = graceful.watch(conn);
            conns.spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(listener = name, %peer, error = %e, "connection ended with error");
                }
            });
        }
        drop(listener);
        tracing::debug!(listener = name, connections = graceful.count(), "draining");
        graceful.shutdown().await;
        tracing::debug!(listener = name, "drained");
    });
}
