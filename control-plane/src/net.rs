//! Accepting connections on the control plane's ports.
//!
//! Every port accepts through [`accept`]: an accept error (out of file
//! descriptors, `ENFILE`, `ENOBUFS`, ...) never makes a loop spin. The loop
//! waits, doubling from 5 ms up to 1 s while the errors last, and logs the
//! first error of a run and then at most one line every 10 s with the count,
//! so a descriptor shortage costs neither CPU nor gigabytes of log. The
//! connections that could not be taken wait in the kernel's backlog and are
//! accepted once descriptors are free again.
//!
//! Every accepted connection takes a place in [`Connections`], the
//! process's connection budget (below the descriptor limit, so merely held
//! connections never exhaust descriptors), and is served as a [`Conn`],
//! closed when it asks nothing within the first-request timeout, stays idle
//! for the idle timeout ([`ConnLimits`]), or is evicted for a newer
//! connection while the budget is full.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use meshwire_mesh::conn::{CallGuard, ConnActivity};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

/// First wait after an accept error.
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
/// Longest wait between two tries while errors last.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At most one log line per this long during a run of errors.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The accept state of one port: its name (for logs) and the current run of
/// errors.
#[derive(Debug)]
pub(crate) struct Acceptor {
    port: &'static str,
    backoff: Duration,
    errors: u64,
    logged_at: Option<Instant>,
}

impl Acceptor {
    pub(crate) fn new(port: &'static str) -> Self {
        Self {
            port,
            backoff: FIRST_BACKOFF,
            errors: 0,
            logged_at: None,
        }
    }

    /// The next connection; errors are waited out (see the module docs).
    /// Cancel-safe: dropping the future loses no connection.
    pub(crate) async fn accept(&mut self, listener: &TcpListener) -> (TcpStream, SocketAddr) {
        loop {
            match listener.accept().await {
                Ok(c) => {
                    if self.errors > 0 {
                        tracing::info!(
                            port = self.port,
                            errors = self.errors,
                            "accepting connections again"
                        );
                    }
                    self.errors = 0;
                    self.backoff = FIRST_BACKOFF;
                    self.logged_at = None;
                    return c;
                }
                Err(e) => {
                    self.errors += 1;
                    let now = Instant::now();
                    if self.logged_at.is_none_or(|t| now - t >= LOG_EVERY) {
                        tracing::warn!(
                            port = self.port,
                            error = %e,
                            errors = self.errors,
                            retry_in = ?self.backoff,
                            "accept failed; backing off"
                        );
                        self.logged_at = Some(now);
                    }
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// What handlers of the plaintext port find in the request extensions.
#[derive(Debug, Clone)]
pub struct PlainConnectInfo {
    pub remote_addr: SocketAddr,
    pub(crate) activity: Arc<ConnActivity>,
}

/// A plaintext connection as tonic serves it.
pub type PlainIo = Conn<TcpStream, PlainConnectInfo>;

/// The plaintext gRPC port's connections for tonic, through an [`Acceptor`]
/// (tonic's own loop over a listener stream retries errors at once), each
/// with its place in `conns`.
pub(crate) fn incoming(
    listener: TcpListener,
    port: &'static str,
    conns: Arc<Connections>,
) -> impl futures_util::Stream<Item = std::io::Result<PlainIo>> + Send + 'static {
    futures_util::stream::unfold(
        (listener, Acceptor::new(port)),
        move |(listener, mut acceptor)| {
            let conns = conns.clone();
            async move {
                loop {
                    let (tcp, remote_addr) = acceptor.accept(&listener).await;
                    let Some(slot) = conns.admit(port).await else {
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let info = PlainConnectInfo {
                        remote_addr,
                        activity: slot.activity.clone(),
                    };
                    let io = Conn::new(tcp, info, slot, port, remote_addr);
                    return Some((Ok(io), (listener, acceptor)));
                }
            }
        },
    )
}

// === connections: timeouts and the descriptor budget ===

/// A connection that makes no call this long after it was accepted (after
/// its TLS handshake, on the TLS port) is closed (`--first-request-timeout`).
pub const DEFAULT_FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no call in flight and none started this long is closed
/// (`--idle-timeout`). An open xDS or Watch stream is a call in flight.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Descriptors kept out of the connection budget: listeners, the store,
/// etcd clients, files the CA reads, connections being refused.
pub const RESERVED_DESCRIPTORS: usize = 32;
/// The budget is never smaller than this, whatever the limit.
const MIN_CONNECTIONS: usize = 16;
/// Connections told to close for newer ones but not closed yet (their
/// descriptors are still open): past this many, accepting waits until some
/// have closed. Part of [`RESERVED_DESCRIPTORS`].
const MAX_CLOSING: usize = 16;

/// When a served connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    pub first_request: Duration,
    pub idle: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            first_request: DEFAULT_FIRST_REQUEST_TIMEOUT,
            idle: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Every connection the control plane's ports hold (plaintext, TLS, admin
/// HTTP), within one budget kept below the descriptor limit, so accepting
/// never runs out of descriptors while connections are merely held. At the
/// budget a new connection closes the oldest connection that has asked
/// nothing yet (a TLS handshake in progress counts as that), else the one
/// idle (no call in flight) the longest; when every connection has a call in
/// flight the new one is closed. A client that connects and calls (`meshctl`,
/// a sidecar's Identity call) therefore gets through however many silent
/// connections others hold.
#[derive(Debug)]
pub struct Connections {
    max: usize,
    limits: ConnLimits,
    table: std::sync::Mutex<Table>,
    /// Told when an evicted connection has closed.
    closed: tokio::sync::Notify,
}

/// What [`Connections::try_admit`] decided.
#[derive(Debug)]
enum Admit {
    Yes(ConnSlot),
    /// Every connection has a call in flight.
    No,
    /// Too many evicted connections still closing.
    Wait,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    /// Open, evicted ones included until they are closed.
    open: usize,
    /// Evicted and not closed yet.
    closing: usize,
    /// By id: accept order.
    entries: std::collections::BTreeMap<u64, Entry>,
    /// When the last "budget full" line was logged.
    logged_at: Option<Instant>,
    evicted: u64,
}

#[derive(Debug)]
struct Entry {
    activity: Arc<ConnActivity>,
    evict: CancellationToken,
    evicted: bool,
}

impl Connections {
    /// A budget of `max` connections (`None`: from the descriptor limit, see
    /// [`Self::budget_from_limit`]).
    pub fn new(max: Option<usize>, limits: ConnLimits) -> Arc<Self> {
        let max = max.unwrap_or_else(Self::budget_from_limit).max(1);
        tracing::debug!(max_connections = max, ?limits, "connection budget");
        Arc::new(Self {
            max,
            limits,
            table: std::sync::Mutex::new(Table::default()),
            closed: tokio::sync::Notify::new(),
        })
    }

    /// The soft `RLIMIT_NOFILE` less the descriptors open now and
    /// [`RESERVED_DESCRIPTORS`] (at least 16); unbounded where `/proc`
    /// cannot tell.
    pub fn budget_from_limit() -> usize {
        let Some(limit) = nofile_soft_limit() else {
            return usize::MAX;
        };
        let open = std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count);
        limit
            .saturating_sub(open + RESERVED_DESCRIPTORS)
            .max(MIN_CONNECTIONS)
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn limits(&self) -> ConnLimits {
        self.limits
    }

    /// Room for one more connection on `port`, making it by closing another
    /// if the budget is full (see the type's docs); `None`: refuse this one.
    /// While too many connections told to close are still closing, waits
    /// (new connections wait in the kernel's backlog meanwhile).
    pub(crate) async fn admit(self: &Arc<Self>, port: &'static str) -> Option<ConnSlot> {
        loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            match self.try_admit(port) {
                Admit::Yes(slot) => return Some(slot),
                Admit::No => return None,
                Admit::Wait => closed.await,
            }
        }
    }

    fn try_admit(self: &Arc<Self>, port: &'static str) -> Admit {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if t.open >= self.max {
            if t.closing >= MAX_CLOSING {
                return Admit::Wait;
            }
            let victim = {
                let live = t.entries.iter().filter(|(_, e)| !e.evicted);
                // Accept order: the first silent one is the oldest.
                let silent = live
                    .clone()
                    .find(|(_, e)| e.activity.started() == 0)
                    .map(|(id, _)| *id);
                silent.or_else(|| {
                    live.filter(|(_, e)| e.activity.in_flight() == 0)
                        .min_by_key(|(_, e)| e.activity.last_active())
                        .map(|(id, _)| *id)
                })
            };
            let now = Instant::now();
            let log = t.logged_at.is_none_or(|at| now - at >= LOG_EVERY);
            let Some(id) = victim else {
                if log {
                    t.logged_at = Some(now);
                    tracing::warn!(
                        port,
                        max_connections = self.max,
                        "connection budget full and every connection busy; refusing new connections"
                    );
                }
                return Admit::No;
            };
            if let Some(e) = t.entries.get_mut(&id) {
                e.evicted = true;
                e.evict.cancel();
            }
            t.closing += 1;
            t.evicted += 1;
            if log {
                t.logged_at = Some(now);
                tracing::warn!(
                    port,
                    max_connections = self.max,
                    evicted = t.evicted,
                    "connection budget full; closing the oldest silent or idle connections for new ones"
                );
            }
        }
        let id = t.next_id;
        t.next_id += 1;
        t.open += 1;
        let activity = Arc::new(ConnActivity::new());
        let evict = CancellationToken::new();
        t.entries.insert(
            id,
            Entry {
                activity: activity.clone(),
                evict: evict.clone(),
                evicted: false,
            },
        );
        Admit::Yes(ConnSlot {
            conns: self.clone(),
            id,
            activity,
            evict,
        })
    }
}

/// The soft descriptor limit, from `/proc/self/limits`.
fn nofile_soft_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .strip_prefix("Max open files")?
        .split_whitespace()
        .next()?;
    soft.parse().ok()
}

/// One connection's place in [`Connections`]: its calls, and the signal
/// that it was closed for a newer one. Dropping it frees the place.
#[derive(Debug)]
pub(crate) struct ConnSlot {
    conns: Arc<Connections>,
    id: u64,
    pub(crate) activity: Arc<ConnActivity>,
    pub(crate) evict: CancellationToken,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut t = self.conns.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = t.entries.remove(&self.id) {
            t.open -= 1;
            if e.evicted {
                t.closing -= 1;
                drop(t);
                self.conns.closed.notify_waiters();
            }
        }
    }
}

/// A served connection: reads end (EOF, so the server closes it) once its
/// [`ConnActivity::watch`] says so, or when it was evicted for a newer one.
/// `info` is what handlers find in the request extensions.
pub struct Conn<IO, I> {
    io: IO,
    info: I,
    close: Pin<Box<dyn Future<Output = ()> + Send>>,
    closed: bool,
    _slot: ConnSlot,
}

impl<IO, I: std::fmt::Debug> std::fmt::Debug for Conn<IO, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("info", &self.info)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl<IO, I> Conn<IO, I> {
    /// Starts the connection's clocks (the first-request timeout runs from now).
    pub(crate) fn new(
        io: IO,
        info: I,
        slot: ConnSlot,
        port: &'static str,
        peer: SocketAddr,
    ) -> Self {
        let limits = slot.conns.limits;
        let (activity, evict) = (slot.activity.clone(), slot.evict.clone());
        let close = Box::pin(async move {
            tokio::select! {
                end = activity.watch(limits.first_request, limits.idle) => {
                    tracing::debug!(port, %peer, reason = end.as_str(), "closing connection");
                }
                () = evict.cancelled() => {
                    tracing::debug!(port, %peer, "connection closed for a newer one (connection budget full)");
                }
            }
        });
        Self {
            io,
            info,
            close,
            closed: false,
            _slot: slot,
        }
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.closed && self.close.as_mut().poll(cx).is_ready() {
            self.closed = true;
        }
        self.closed
    }
}

impl<IO, I> Connected for Conn<IO, I>
where
    I: Clone + Send + Sync + 'static,
{
    type ConnectInfo = I;

    fn connect_info(&self) -> I {
        self.info.clone()
    }
}

impl<IO: AsyncRead + Unpin, I: Unpin> AsyncRead for Conn<IO, I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.poll_close(cx) {
            // EOF: the server ends the connection.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin, I: Unpin> AsyncWrite for Conn<IO, I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.poll_close(cx) {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.poll_close(cx) {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

// === calls counted per connection ===

/// Counts every call (until its response body ends: a stream is in flight
/// while it is open) in the [`ConnActivity`] of its connection, which `find`
/// reads from the request extensions (the port's connect info).
#[derive(Debug, Clone, Copy)]
pub(crate) struct TrackLayer {
    pub(crate) find: fn(&http::Extensions) -> Option<Arc<ConnActivity>>,
}

impl<S> tower_layer::Layer<S> for TrackLayer {
    type Service = Track<S>;

    fn layer(&self, inner: S) -> Track<S> {
        Track {
            inner,
            find: self.find,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Track<S> {
    inner: S,
    find: fn(&http::Extensions) -> Option<Arc<ConnActivity>>,
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for Track<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Tracked<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let guard = (self.find)(req.extensions()).map(|a| {
            let mut g = a.start();
            g.answered = true;
            g
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|body| Tracked {
                body,
                _guard: guard,
            }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds its call's [`CallGuard`] until it ends.
    #[derive(Debug)]
    pub(crate) struct Tracked<B> {
        #[pin]
        body: B,
        _guard: Option<CallGuard>,
    }
}

impl<B: http_body::Body> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
