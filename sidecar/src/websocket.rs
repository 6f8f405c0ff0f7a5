//! WebSocket (HTTP/1.1 `Upgrade`) for `http` services, carried between
//! sidecars as an RFC 8441 extended CONNECT stream (`:protocol websocket`)
//! on the mutual-TLS HTTP/2 connection.
//!
//! ```text
//! client ─GET Upgrade: websocket─▶ outbound: CONNECT :protocol websocket (the handshake
//!        headers ride along) ──HTTP/2 over mTLS──▶ peer inbound: authz, then
//!        GET Upgrade: websocket to the app over HTTP/1.1 ─▶ app answers 101
//!        ◀─ 200 (the app's Sec-WebSocket-Accept etc.) ◀─ outbound answers the client 101
//! then frames flow as bytes: client ⇄ outbound ⇄ h2 stream ⇄ inbound ⇄ app
//! ```
//! The handshake headers (`Sec-WebSocket-Key`, `-Version`, `-Protocol`,
//! `-Extensions`) pass through unchanged, so the app's `Sec-WebSocket-Accept`
//! matches the client's key and both ends negotiate with each other, not
//! with the sidecars. No idle timeout; a close by either end (a FIN) is
//! passed on as END_STREAM and back.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::body::ResponseBody;
use crate::outbound::route::ClusterState;
use crate::respond::ProxyError;

const MAX_ATTEMPTS: usize = 3;
const CHUNK: usize = 16 << 10;

/// Is this an HTTP/1.1 WebSocket upgrade request?
pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Is this an extended CONNECT for a WebSocket (from a peer sidecar)?
pub(crate) fn is_websocket_connect<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str() == "websocket")
}

/// The handshake headers that cross both hops (everything but hop-by-hop
/// ones and `Host`, which becomes the authority).
fn carried(h: &HeaderMap) -> HeaderMap {
    let mut out = h.clone();
    crate::proxy::strip_hop_by_hop(&mut out);
    out.remove(header::HOST);
    out
}

// === outbound ===

/// The client's upgrade: an extended CONNECT to an endpoint of `cluster`
/// (failing over until one answers 200), then 101 to the client and bytes.
pub(crate) async fn outbound(
    mut req: Request<Incoming>,
    cluster: &ClusterState,
    authority: &str,
) -> Result<Response<ResponseBody>, ProxyError> {
    let set = cluster.endpoints.load_full();
    if set.is_empty() {
        return Err(ProxyError::NoEndpoints(cluster.name.to_string()));
    }
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let authority = cluster
        .authority
        .as_ref()
        .map_or(authority, |a| a.as_str())
        .to_owned();
    let headers = carried(req.headers());
    let mut tried = [usize::MAX; MAX_ATTEMPTS];
    let mut last = None;
    for attempt in 0..MAX_ATTEMPTS {
        let Some(i) = set.pick(&tried[..attempt], None) else {
            break;
        };
        tried[attempt] = i;
        let endpoint = &set.entries()[i].endpoint;
        let mut guard = endpoint.start_call();
        let lease = match endpoint.pool.acquire().await {
            Ok(l) => l,
            Err(e) => {
                last = Some(ProxyError::Unreachable {
                    service: cluster.name.to_string(),
                    last: e,
                });
                continue;
            }
        };
        let mut sender = lease.sender();
        if poll_fn(|cx| sender.poll_ready(cx)).await.is_err() {
            lease.mark_closed();
            continue;
        }
        if !sender.is_extended_connect_protocol_enabled() {
            return Err(ProxyError::BadRequest(
                "the peer sidecar does not accept WebSocket (extended CONNECT)",
            ));
        }
        let mut up = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("https://{authority}{path}"))
            .body(())
            .map_err(|_| ProxyError::BadRequest("invalid request target"))?;
        *up.headers_mut() = headers.clone();
        up.extensions_mut()
            .insert(h2::ext::Protocol::from_static("websocket"));
        let (resp, tx) = match sender.send_request(up, false) {
            Ok(r) => r,
            Err(e) => {
                last = Some(ProxyError::from_h2(e));
                continue;
            }
        };
        let resp = match resp.await {
            Ok(r) => r,
            Err(e) => {
                last = Some(ProxyError::from_h2(e));
                continue;
            }
        };
        let (parts, rx) = resp.into_parts();
        if parts.status != StatusCode::OK {
            // The app (or the peer) said no: tell the client what it said.
            guard.sent(true);
            guard.finish(crate::grpc::code_of_http(parts.status));
            let mut r = Response::new(ResponseBody::full(format!(
                "meshwire: the WebSocket upgrade was refused with {}\n",
                parts.status
            )));
            *r.status_mut() = parts.status;
            *r.headers_mut() = carried(&parts.headers);
            return Ok(r);
        }
        guard.sent(true);
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let _lease = lease;
            let mut guard = guard;
            match on_upgrade.await {
                Ok(client) => {
                    let (up, down) = pump(TokioIo::new(client), tx, rx).await;
                    guard.request_bytes = up;
                    guard.response_bytes = down;
                    guard.finish(0);
                }
                Err(e) => tracing::debug!(error = %e, "websocket: client upgrade failed"),
            }
        });
        let mut r = Response::new(ResponseBody::empty());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        *h = carried(&parts.headers);
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return Ok(r);
    }
    Err(last.unwrap_or_else(|| ProxyError::NoEndpoints(cluster.name.to_string())))
}

/// Copies bytes between `io` and an HTTP/2 stream until both directions end.
async fn pump(
    io: impl AsyncRead + AsyncWrite + Send,
    mut tx: h2::SendStream<Bytes>,
    mut rx: h2::RecvStream,
) -> (u64, u64) {
    let (mut r, mut w) = tokio::io::split(io);
    let up = async {
        let mut sent = 0u64;
        loop {
            let mut buf = BytesMut::with_capacity(CHUNK);
            match r.read_buf(&mut buf).await {
                Ok(0) => {
                    let _ = tx.send_data(Bytes::new(), true);
                    return sent;
                }
                Ok(_) => {}
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

/// A peer's extended CONNECT: the upgrade is replayed to the app over
/// HTTP/1.1; on its 101 the peer gets 200 and the bytes flow.
pub(crate) async fn inbound(
    mut req: Request<Incoming>,
    app: SocketAddr,
    connect_timeout: Duration,
) -> Result<Response<ResponseBody>, ProxyError> {
    let unreachable = |reason: String| {
        ProxyError::AppUnreachable(crate::connect::ConnectError::Io { addr: app, reason })
    };
    let tcp = tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(app))
        .await
        .map_err(|_| unreachable(format!("connect timed out after {connect_timeout:?}")))?
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "websocket: app connection ended");
        }
    });
    let target = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let mut up = Request::builder()
        .method(Method::GET)
        .uri(target)
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|_| ProxyError::BadRequest("invalid request target"))?;
    let h = up.headers_mut();
    *h = carried(req.headers());
    if let Some(a) = req.uri().authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        h.insert(header::HOST, v);
    }
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let mut resp = send
        .send_request(up)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let mut r = Response::new(ResponseBody::empty());
        *r.status_mut() = resp.status();
        *r.headers_mut() = carried(resp.headers());
        return Ok(r);
    }
    let headers = carried(resp.headers());
    let app_upgrade = hyper::upgrade::on(&mut resp);
    let peer_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let (Ok(app_io), Ok(peer_io)) = (app_upgrade.await, peer_upgrade.await) else {
            tracing::debug!("websocket: an upgrade did not complete");
            return;
        };
        let (mut a, mut p) = (TokioIo::new(app_io), TokioIo::new(peer_io));
        if let Err(e) = tokio::io::copy_bidirectional(&mut p, &mut a).await {
            tracing::debug!(error = %e, "websocket ended with error");
        }
    });
    let mut r = Response::new(ResponseBody::empty());
    *r.headers_mut() = headers;
    Ok(r)
}
