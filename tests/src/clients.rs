//! Clients of the sidecars and of their admin ports: tonic channels, plain
//! HTTP/1.1, raw HTTP/2 and TCP (for what tonic would hide), and a load
//! loop that counts answers per backend.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use meshwire_examples::echo::MAX_MESSAGE;
use meshwire_proto::example::v1::echo_client::EchoClient;
use tokio::net::TcpStream;
use tonic::transport::Channel;

use crate::EchoRequest;

/// A tonic channel to `addr` that names `authority` (`:authority` header).
pub async fn channel(addr: SocketAddr, authority: &str) -> Channel {
    let origin: http::Uri = format!("http://{authority}").parse().expect("authority");
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .origin(origin)
        .connect()
        .await
        .expect("connect to sidecar")
}

pub async fn echo_client(addr: SocketAddr, authority: &str) -> EchoClient<Channel> {
    EchoClient::new(channel(addr, authority).await)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// A plain HTTP/1.1 GET; returns status, headers and body.
pub async fn http1_get(
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> anyhow::Result<(StatusCode, HeaderMap, Bytes)> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(http::header::HOST, host)
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// GETs an admin page and parses it as JSON.
pub async fn admin_json(admin: SocketAddr, path: &str) -> serde_json::Value {
    let (status, _, body) = http1_get(admin, "admin", path).await.expect("admin GET");
    assert_eq!(
        status,
        StatusCode::OK,
        "{path}: {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).expect("admin JSON")
}

/// One endpoint of one cluster from `/clusters`.
pub async fn endpoint_stats(
    admin: SocketAddr,
    service: &str,
    addr: SocketAddr,
) -> serde_json::Value {
    let v = admin_json(admin, "/clusters").await;
    v["clusters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == service))
        .and_then(|c| c["endpoints"].as_array())
        .and_then(|eps| eps.iter().find(|e| e["address"] == addr.to_string()))
        .cloned()
        .unwrap_or_else(|| panic!("no endpoint {addr} in {service}: {v}"))
}

/// A gRPC length-prefixed message frame.
pub fn grpc_frame(msg: &impl prost::Message) -> Bytes {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.into()
}

/// A raw HTTP/2 client connection (no deadline or retry logic of its own).
pub async fn h2_client(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.ready().await.expect("h2 ready")
}

/// A unary gRPC request for raw clients.
pub fn grpc_request(authority: &str, path: &str) -> http::Request<()> {
    http::Request::post(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request")
}

/// Sends raw bytes over TCP and returns everything read until the peer closes
/// or `limit` passes (for malformed-request tests).
pub async fn raw_tcp_exchange(addr: SocketAddr, bytes: &[u8], limit: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if out.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Calls answered per backend, and the failures (code and message).
pub type LoadOutcome = (std::collections::HashMap<String, u64>, Vec<String>);

/// Calls in a loop until stopped; counts successes and failures by backend.
#[derive(Debug)]
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<LoadOutcome>>,
}

impl Load {
    pub fn start(client: &EchoClient<Channel>, conc: usize) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..conc)
            .map(|_| {
                let mut c = client.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut ok = std::collections::HashMap::new();
                    let mut failed = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        match c.echo(EchoRequest::default()).await {
                            Ok(r) => *ok.entry(r.into_inner().server).or_insert(0) += 1,
                            Err(e) => failed.push(format!("{:?}: {}", e.code(), e.message())),
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        Load { stop, tasks }
    }

    /// Stops and returns (calls per backend, failures).
    pub async fn finish(self) -> LoadOutcome {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut ok = std::collections::HashMap::new();
        let mut failed = Vec::new();
        for t in self.tasks {
            let (o, f) = t.await.unwrap();
            for (k, v) in o {
                *ok.entry(k).or_insert(0) += v;
            }
            failed.extend(f);
        }
        (ok, failed)
    }
}
