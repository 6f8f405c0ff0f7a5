//! The example `Echo` service: unary, server-, client- and bidi-streaming, with
//! knobs for delay, failure status and reply size, and counters that tests
//! read (calls, cancellations, stream messages sent).
//!
//! Metadata: every request header starting with `x-echo-` comes back in the
//! response headers and again in the trailers (so `-bin` and text metadata in
//! both directions can be checked end to end).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use meshwire_proto::example::v1::echo_server::{Echo, EchoServer};
use meshwire_proto::example::v1::{EchoReply, EchoRequest, StreamRequest};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

/// Largest message the example server and client accept (the mesh must carry ≥ 16 MiB).
pub const MAX_MESSAGE: usize = 64 << 20;

/// Counters a test can read while the server runs.
#[derive(Debug, Default)]
pub struct EchoStats {
    /// Calls started, of any kind.
    pub calls: AtomicU64,
    /// Calls whose handler was dropped before it answered (cancelled, deadline).
    pub cancelled: AtomicU64,
    /// Messages written to server-streaming/bidi responses.
    pub stream_sent: AtomicU64,
    /// The last `grpc-timeout` seen, in microseconds (0: none).
    pub last_timeout_us: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct EchoService {
    name: Arc<str>,
    port: u16,
    /// Added to every unary call: makes one instance slower than others.
    delay: Duration,
    /// Client streaming reads one message per permit (a slow reader).
    read_gate: Option<Arc<Semaphore>>,
    stats: Arc<EchoStats>,
}

impl EchoService {
    pub fn new(name: &str, port: u16) -> Self {
        Self {
            name: Arc::from(name),
            port,
            delay: Duration::ZERO,
            read_gate: None,
            stats: Arc::default(),
        }
    }

    pub(crate) fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Client streaming takes a permit from `gate` before reading each
    /// message, so whoever adds permits decides how fast the app reads.
    pub(crate) fn with_read_gate(mut self, gate: Arc<Semaphore>) -> Self {
        self.read_gate = Some(gate);
        self
    }

    pub fn stats(&self) -> Arc<EchoStats> {
        self.stats.clone()
    }

    fn reply(&self, payload: Vec<u8>, seq: u32) -> EchoReply {
        EchoReply {
            payload,
            server: self.name.to_string(),
            server_port: u32::from(self.port),
            seq,
            received_bytes: 0,
        }
    }

    fn begin(&self, md: &MetadataMap) -> CancelGuard {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let us = md
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map_or(0, |d| d.as_micros() as u64);
        self.stats.last_timeout_us.store(us, Ordering::Relaxed);
        CancelGuard {
            stats: self.stats.clone(),
            done: false,
        }
    }
}

fn parse_grpc_timeout(s: &str) -> Option<Duration> {
    let (n, unit) = s.split_at(s.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Counts a call as cancelled if its handler is dropped before finishing.
struct CancelGuard {
    stats: Arc<EchoStats>,
    done: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.done {
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `x-echo-*` request metadata, copied into a response's headers or trailers.
fn echo_metadata(from: &MetadataMap, to: &mut MetadataMap) {
    for kv in from.iter() {
        match kv {
            tonic::metadata::KeyAndValueRef::Ascii(k, v) if k.as_str().starts_with("x-echo-") => {
                to.insert(k.clone(), v.clone());
            }
            tonic::metadata::KeyAndValueRef::Binary(k, v) if k.as_str().starts_with("x-echo-") => {
                to.insert_bin(k.clone(), v.clone());
            }
            _ => {}
        }
    }
}

fn failure(code: i32, message: &str, md: &MetadataMap) -> Status {
    let mut trailers = MetadataMap::new();
    echo_metadata(md, &mut trailers);
    Status::with_metadata(tonic::Code::from(code), message.to_string(), trailers)
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let mut guard = self.begin(req.metadata());
        let md = req.metadata().clone();
        let r = req.into_inner();
        let delay = self.delay + Duration::from_millis(u64::from(r.delay_ms));
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        guard.done = true;
        if r.fail_code != 0 {
            return Err(failure(r.fail_code, &r.fail_message, &md));
        }
        let payload = if r.response_size > 0 {
            vec![0x5a; r.response_size as usize]
        } else {
            r.payload
        };
        let mut resp = Response::new(self.reply(payload, 0));
        echo_metadata(&md, resp.metadata_mut());
        Ok(resp)
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        req: Request<StreamRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        let guard = self.begin(req.metadata());
        let r = req.into_inner();
        // Capacity 1: the producer only runs ahead of the transport by one message,
        // so `stream_sent` shows how far flow control let it get.
        let (tx, rx) = mpsc::channel(1);
        let this = self.clone();
        tokio::spawn(async move {
            let mut guard = guard;
            for seq in 0..r.count {
                if r.interval_ms > 0 && seq > 0 {
                    tokio::time::sleep(Duration::from_millis(u64::from(r.interval_ms))).await;
                }
                let msg = this.reply(vec![0xa5; r.size as usize], seq);
                if tx.send(Ok(msg)).await.is_err() {
                    return; // receiver gone: the call was cancelled
                }
                this.stats.stream_sent.fetch_add(1, Ordering::Relaxed);
            }
            guard.done = true;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn client_stream(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let mut guard = self.begin(req.metadata());
        let md = req.metadata().clone();
        let mut stream = req.into_inner();
        let mut total = 0u64;
        let mut count = 0u32;
        loop {
            if let Some(gate) = &self.read_gate {
                gate.acquire()
                    .await
                    .map_err(|_| Status::unavailable("read gate closed"))?
                    .forget();
            }
            let Some(m) = stream.next().await else { break };
            total += m?.payload.len() as u64;
            count += 1;
        }
        guard.done = true;
        let mut reply = self.reply(Vec::new(), count);
        reply.received_bytes = total;
        let mut resp = Response::new(reply);
        echo_metadata(&md, resp.metadata_mut());
        Ok(resp)
    }

    type BidiStreamStream = ReplyStream;

    async fn bidi_stream(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let guard = self.begin(req.metadata());
        let md = req.metadata().clone();
        let mut input = req.into_inner();
        let (tx, rx) = mpsc::channel(1);
        let this = self.clone();
        let request_md = md.clone();
        tokio::spawn(async move {
            let md = request_md;
            let mut guard = guard;
            let mut seq = 0;
            while let Some(m) = input.next().await {
                let out = match m {
                    Ok(m) if m.fail_code != 0 => Err(failure(m.fail_code, &m.fail_message, &md)),
                    Ok(m) => Ok(this.reply(m.payload, seq)),
                    Err(s) => Err(s),
                };
                let stop = out.is_err();
                if tx.send(out).await.is_err() {
                    return;
                }
                if stop {
                    break;
                }
                this.stats.stream_sent.fetch_add(1, Ordering::Relaxed);
                seq += 1;
            }
            guard.done = true;
        });
        let mut resp = Response::new(Box::pin(ReceiverStream::new(rx)) as ReplyStream);
        echo_metadata(&md, resp.metadata_mut());
        Ok(resp)
    }
}

/// A running echo server.
#[derive(Debug)]
pub struct EchoHandle {
    pub addr: SocketAddr,
    pub stats: Arc<EchoStats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl EchoHandle {
    /// Stops accepting and waits for in-flight calls (tonic's graceful shutdown).
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Kills the server at once: connections are dropped mid-call.
    pub fn abort(self) {
        self.task.abort();
    }
}

/// How an echo server instance behaves.
#[derive(Debug, Clone, Default)]
pub struct EchoOptions {
    /// Extra latency of every unary call.
    pub delay: Duration,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS to advertise (`None`: tonic's default).
    pub max_concurrent_streams: Option<u32>,
    /// Client streaming reads one message per permit (`None`: as fast as it can).
    pub read_gate: Option<Arc<Semaphore>>,
}

/// Serves the echo service on `listener` until stopped.
pub fn serve(listener: TcpListener, name: &str) -> EchoHandle {
    serve_with(listener, name, EchoOptions::default())
}

/// Serves the echo service with `opts` on `listener` until stopped.
pub fn serve_with(listener: TcpListener, name: &str, opts: EchoOptions) -> EchoHandle {
    let addr = listener.local_addr().expect("bound listener");
    let mut svc = EchoService::new(name, addr.port()).with_delay(opts.delay);
    if let Some(gate) = opts.read_gate {
        svc = svc.with_read_gate(gate);
    }
    let stats = svc.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = EchoServer::new(svc)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let task = tokio::spawn(async move {
        let incoming = TcpListenerStream::new(listener);
        let r = tonic::transport::Server::builder()
            .max_concurrent_streams(opts.max_concurrent_streams)
            .add_service(server)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "echo server ended");
        }
    });
    EchoHandle {
        addr,
        stats,
        stop: Some(stop),
        task,
    }
}

/// Binds `addr` (use port 0 in tests) and serves.
pub async fn bind(addr: SocketAddr, name: &str) -> std::io::Result<EchoHandle> {
    Ok(serve(TcpListener::bind(addr).await?, name))
}
