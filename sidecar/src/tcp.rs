//! TCP services (`protocol: tcp`): opaque byte streams, balanced per
//! connection and carried between sidecars over the same mutual-TLS HTTP/2
//! connections as calls, one CONNECT stream (RFC 9113 §8.5) per TCP
//! connection.
//!
//! ```text
//! app ─TCP─▶ per-service port (services[].listen / --tcp-listen NAME=ADDR)
//!     ─▶ least connections pick (weights) ─▶ CONNECT <service> on a pooled h2 connection
//!     ──HTTP/2 over mTLS (peer SPIFFE ID checked)──▶ peer inbound: authz (identity, CIDR)
//!     ─▶ TCP connect to the app ─▶ 200 ─▶ bytes both ways, half-close kept
//! ```
//! Nothing is read from the app's connection before the peer answered the
//! CONNECT with 200 (it has connected to its app by then), so a failed
//! connect fails over to another endpoint before a byte was sent, and a
//! server-first protocol (a banner before the client speaks) works with no
//! detection delay. There is no idle timeout: a quiet connection stays open
//! as long as both ends keep it (HTTP/2 PINGs keep the mesh connection alive).
//! An end's FIN becomes END_STREAM and back, so half-close is preserved.
//!
//! Several sidecars on one host can each offer the same service: a listener
//! binds a loopback address of its own (`127.0.0.2:1883`, `127.0.0.3:1883`,
//! all of `127.0.0.0/8` is local on Linux), so the port stays the
//! well-known one.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::ResponseBody;
use crate::endpoint::Endpoint;
use crate::outbound::Outbound;
use crate::pool::Lease;
use crate::respond::ProxyError;
use crate::server::ConnInfo;

/// Attempts per connection: the first pick and up to two fail-overs.
const MAX_ATTEMPTS: usize = 3;
/// Read buffer per direction, allocated only while data is waiting.
const CHUNK: usize = 16 << 10;

/// Counters of TCP connections, by side (0 outbound, 1 inbound).
#[derive(Debug, Default)]
pub struct TcpMetrics {
    pub opened: [AtomicU64; 2],
    pub active: [AtomicI64; 2],
    /// Bytes from the connecting side towards the app it reaches.
    pub bytes_up: [AtomicU64; 2],
    /// Bytes back to the connecting side.
    pub bytes_down: [AtomicU64; 2],
    /// Connections that could not be carried (no endpoint answered, denied).
    pub failed: [AtomicU64; 2],
}

/// One open connection in the counters; closes it on drop.
struct Open<'a> {
    m: &'a TcpMetrics,
    side: usize,
}

impl<'a> Open<'a> {
    fn new(m: &'a TcpMetrics, side: usize) -> Self {
        m.opened[side].fetch_add(1, Ordering::Relaxed);
        m.active[side].fetch_add(1, Ordering::Relaxed);
        Self { m, side }
    }

    fn bytes(&self, up: u64, down: u64) {
        self.m.bytes_up[self.side].fetch_add(up, Ordering::Relaxed);
        self.m.bytes_down[self.side].fetch_add(down, Ordering::Relaxed);
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.m.active[self.side].fetch_sub(1, Ordering::Relaxed);
    }
}

// === outbound ===

/// Accepts the app's TCP connections for `service` on `listener` until
/// `shutdown`; open connections keep going through the drain (the sidecar's
/// drain timeout is their grace period).
pub(crate) fn spawn_listener(
    listener: TcpListener,
    service: Arc<str>,
    outbound: Arc<Outbound>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    let conns = tracker.clone();
    tracker.spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(%service, error = %e, "tcp accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (outbound, service) = (outbound.clone(), service.clone());
            conns.spawn(async move {
                if let Err(e) = carry(&outbound, &service, tcp).await {
                    outbound.telemetry().metrics.tcp.failed[0].fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%service, %peer, error = %e, "tcp connection not carried");
                }
            });
        }
        tracing::debug!(%service, "tcp listener stopped accepting");
    });
}

/// One app connection to `service`: pick, CONNECT (failing over until one
/// peer answers 200), then copy.
async fn carry(outbound: &Outbound, service: &str, tcp: TcpStream) -> Result<(), ProxyError> {
    outbound.pass_gate(&http::HeaderMap::new()).await?;
    let cluster = outbound
        .routes
        .load()
        .get(service)
        .cloned()
        .ok_or_else(|| ProxyError::UnknownService(service.to_owned()))?;
    if cluster.protocol != meshwire_mesh::Protocol::Tcp {
        return Err(ProxyError::BadRequest(
            "this port is a tcp port but the service is not protocol tcp",
        ));
    }
    let set = cluster.endpoints.load_full();
    if set.is_empty() {
        return Err(ProxyError::NoEndpoints(service.to_owned()));
    }
    let metrics = &outbound.telemetry().metrics.tcp;
    // Of the hash sources only the caller's IP exists for raw TCP.
    let key = crate::outbound::hash::call_key(
        &cluster.hash_policy,
        &http::HeaderMap::new(),
        tcp.peer_addr().ok().map(|a| a.ip().to_canonical()),
        true,
    )
    .key;
    let mut tried = [usize::MAX; MAX_ATTEMPTS];
    let mut last = None;
    for attempt in 0..MAX_ATTEMPTS {
        let Some(i) = set.pick(&tried[..attempt], key) else {
            break;
        };
        tried[attempt] = i;
        let endpoint = &set.entries()[i].endpoint;
        // Least connections: an open connection is one outstanding call.
        let mut guard = endpoint.start_call();
        match connect(endpoint, service).await {
            Ok((_lease, tx, rx)) => {
                guard.sent(true);
                let open = Open::new(metrics, 0);
                let (up, down) = pump(tcp, tx, rx).await;
                open.bytes(up, down);
                guard.request_bytes = up;
                guard.response_bytes = down;
                guard.finish(0);
                return Ok(());
            }
            Err(e) => {
                tracing::debug!(%service, endpoint = %endpoint.addr, attempt, error = %e, "tcp: failing over");
                last = Some(e);
            }
        }
    }
    Err(match last {
        Some(e) => e,
        None => ProxyError::NoEndpoints(service.to_owned()),
    })
}

/// A CONNECT stream to `endpoint` that its sidecar accepted (it has
/// connected to its app).
async fn connect(
    endpoint: &Arc<Endpoint>,
    service: &str,
) -> Result<(Lease, h2::SendStream<Bytes>, h2::RecvStream), ProxyError> {
    let lease = endpoint
        .pool
        .acquire()
        .await
        .map_err(|last| ProxyError::Unreachable {
            service: service.to_owned(),
            last,
        })?;
    let mut sender = lease.sender();
    if poll_fn(|cx| sender.poll_ready(cx)).await.is_err() {
        lease.mark_closed();
        return Err(ProxyError::Upstream(h2::Error::from(
            h2::Reason::REFUSED_STREAM,
        )));
    }
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(service)
        .body(())
        .map_err(|_| ProxyError::BadRequest("invalid service name"))?;
    let (resp, tx) = sender
        .send_request(req, false)
        .map_err(ProxyError::from_h2)?;
    let resp = resp.await.map_err(ProxyError::from_h2)?;
    if resp.status() != StatusCode::OK {
        let kind = resp
            .headers()
            .get(crate::respond::ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        return Err(if resp.status() == StatusCode::FORBIDDEN {
            ProxyError::PermissionDenied {
                caller: "this sidecar".into(),
                path: format!("tcp service {service}"),
            }
        } else {
            ProxyError::Unreachable {
                service: service.to_owned(),
                last: crate::connect::ConnectError::Io {
                    addr: endpoint.addr,
                    reason: format!("peer answered CONNECT with {} {kind}", resp.status()),
                },
            }
        });
    }
    // The lease (a stream slot) is held for the connection's life.
    Ok((lease, tx, resp.into_body()))
}

/// Copies bytes between `tcp` and an HTTP/2 stream until both directions
/// ended; returns `(bytes up, bytes down)`. A FIN from the app becomes
/// END_STREAM and END_STREAM becomes a FIN, so each direction closes on its
/// own.
async fn pump(tcp: TcpStream, mut tx: h2::SendStream<Bytes>, mut rx: h2::RecvStream) -> (u64, u64) {
    let (r, mut w) = tcp.into_split();
    let up = async {
        let mut sent = 0u64;
        loop {
            if r.readable().await.is_err() {
                tx.send_reset(h2::Reason::CANCEL);
                return sent;
            }
            let mut buf = BytesMut::with_capacity(CHUNK);
            match r.try_read_buf(&mut buf) {
                Ok(0) => {
                    let _ = tx.send_data(Bytes::new(), true);
                    return sent;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => {
                    tx.send_reset(h2::Reason::CANCEL);
                    return sent;
                }
            }
            let mut data = buf.freeze();
            while !data.is_empty() {
                tx.reserve_capacity(data.len());
                match poll_fn(|cx| tx.poll_capacity(cx)).await {
                    Some(Ok(0)) => continue,
                    Some(Ok(n)) => {
                        let chunk = data.split_to(n.min(data.len()));
                        sent += chunk.len() as u64;
                        if tx.send_data(chunk, false).is_err() {
                            return sent;
                        }
                    }
                    // Reset or gone: the other direction ends too.
                    Some(Err(_)) | None => return sent,
                }
            }
        }
    };
    let down = async {
        let mut got = 0u64;
        while let Some(d) = rx.data().await {
            let Ok(d) = d else { break };
            let _ = rx.flow_control().release_capacity(d.len());
            got += d.len() as u64;
            if w.write_all(&d).await.is_err() {
                return got;
            }
        }
        let _ = w.shutdown().await;
        got
    };
    tokio::join!(up, down)
}

// === inbound ===

/// A CONNECT from a peer sidecar to this sidecar's `tcp` service: connect to
/// the app, answer 200, then copy bytes until both directions ended. The
/// caller has already checked the policy.
pub(crate) async fn accept(
    mut req: Request<Incoming>,
    app: SocketAddr,
    connect_timeout: Duration,
    metrics: Arc<crate::telemetry::metrics::SidecarMetrics>,
    conn: &ConnInfo,
) -> Result<Response<ResponseBody>, ProxyError> {
    let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(app))
        .await
        .map_err(|_| {
            ProxyError::AppUnreachable(crate::connect::ConnectError::Timeout {
                addr: app,
                timeout: connect_timeout,
            })
        })?
        .map_err(|e| {
            ProxyError::AppUnreachable(crate::connect::ConnectError::Io {
                addr: app,
                reason: e.to_string(),
            })
        })?;
    let _ = tcp.set_nodelay(true);
    let upgrade = hyper::upgrade::on(&mut req);
    let peer = conn.peer;
    tokio::spawn(async move {
        let stream = match upgrade.await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "tcp: CONNECT stream not established");
                return;
            }
        };
        let open = Open::new(&metrics.tcp, 1);
        let mut stream = TokioIo::new(stream);
        let mut tcp = tcp;
        match tokio::io::copy_bidirectional(&mut stream, &mut tcp).await {
            Ok((up, down)) => open.bytes(up, down),
            Err(e) => tracing::debug!(%peer, error = %e, "tcp connection ended with error"),
        }
    });
    Ok(Response::new(ResponseBody::empty()))
}

/// Is this request a plain CONNECT (a TCP connection), not an extended one?
pub(crate) fn is_tcp_connect<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT && req.extensions().get::<hyper::ext::Protocol>().is_none()
}
