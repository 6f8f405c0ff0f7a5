//! The apps behind the sidecars: echo backends (`meshwire_examples::echo`)
//! and raw HTTP/2 servers that do what a tonic server never would.

use std::net::SocketAddr;

use bytes::Bytes;
use meshwire_examples::echo::{self, EchoHandle, EchoOptions};
use tokio::net::TcpListener;

use crate::{EchoReply, grpc_frame, localhost};

pub async fn echo(name: &str) -> EchoHandle {
    echo_with(name, EchoOptions::default()).await
}

pub async fn echo_with(name: &str, opts: EchoOptions) -> EchoHandle {
    let l = TcpListener::bind(localhost()).await.expect("bind echo");
    echo::serve_with(l, name, opts)
}

/// An address nothing listens on (bound, then closed).
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind(localhost()).await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// An h2c app whose behaviour is chosen by the request path:
/// - `/reset/before/<reason>`: RST_STREAM before any response headers,
/// - `/reset/after/<reason>`: response headers and one message, then (once the
///   client sends a request message, proving it got them) RST_STREAM,
/// - anything else: 200 with a JSON body describing the request as received
///   (`authority`, `path`, `query`, `headers`), for checking what the sidecar forwards.
///
/// `<reason>` is `cancel`, `internal` or `refused`.
pub async fn raw_h2_app() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind(localhost()).await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    tokio::spawn(async move {
                        let path = req.uri().path().to_string();
                        let reason = |s: &str| match s.rsplit('/').next() {
                            Some("cancel") => h2::Reason::CANCEL,
                            Some("refused") => h2::Reason::REFUSED_STREAM,
                            _ => h2::Reason::INTERNAL_ERROR,
                        };
                        if path.starts_with("/reset/before/") {
                            respond.send_reset(reason(&path));
                        } else if path.starts_with("/reset/after/") {
                            let resp = http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(())
                                .unwrap();
                            let mut body = respond.send_response(resp, false).unwrap();
                            let _ = body.send_data(grpc_frame(&EchoReply::default()), false);
                            // A local reset discards unsent frames: wait until the
                            // client has seen them (it answers with a message).
                            let mut req_body = req.into_body();
                            let _ = req_body.data().await;
                            body.send_reset(reason(&path));
                        } else {
                            let headers: serde_json::Map<String, serde_json::Value> = req
                                .headers()
                                .iter()
                                .map(|(k, v)| {
                                    (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into())
                                })
                                .collect();
                            let info = serde_json::json!({
                                "authority": req.uri().authority().map(|a| a.to_string()),
                                "path": path,
                                "query": req.uri().query(),
                                "version": format!("{:?}", req.version()),
                                "headers": headers,
                            });
                            let resp = http::Response::builder()
                                .header("content-type", "application/json")
                                .header("x-app", "raw")
                                .body(())
                                .unwrap();
                            // The caller may have reset the stream already.
                            if let Ok(mut body) = respond.send_response(resp, false) {
                                let _ = body.send_data(Bytes::from(info.to_string()), true);
                            }
                        }
                    });
                }
            });
        }
    });
    (addr, task)
}

/// An HTTP/2 server that refuses every stream (RST_STREAM REFUSED_STREAM:
/// "not processed, safe to retry"); returns its address and a stream counter.
pub async fn refusing_h2_app() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let l = TcpListener::bind(localhost()).await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
            });
        }
    });
    (addr, seen)
}

/// A tokio-tungstenite echo server: text and binary frames back, pings
/// answered, a close echoed with its code.
pub async fn websocket_echo() -> SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() || m.is_binary() {
                        if ws.send(m).await.is_err() {
                            return;
                        }
                    } else if m.is_close() {
                        // tungstenite has queued the echoed close; flush it.
                        let _ = ws.flush().await;
                    }
                }
            });
        }
    });
    addr
}
