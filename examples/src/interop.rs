//! `grpc.testing.TestService`, the service of gRPC's interop test suite,
//! behaving as the official interop server does
//! (`doc/interop-test-descriptions.md` in grpc/grpc), so that third-party gRPC
//! stacks (grpcio) can run the official client test cases through the mesh
//! against a tonic server.
//!
//! - `EmptyCall`: an empty reply.
//! - `UnaryCall` / `CacheableUnaryCall`: a zero-filled payload of
//!   `response_size` bytes, or the error in `response_status`.
//! - `StreamingOutputCall`: one zero-filled reply per `response_parameters`
//!   entry, each after its `interval_us`.
//! - `StreamingInputCall`: the total payload size of the requests.
//! - `FullDuplexCall`: replies to each request as it arrives (as
//!   `StreamingOutputCall` does); a request with `response_status` ends the
//!   call with that status.
//! - `HalfDuplexCall`: the same, but only once the client has half-closed.
//! - `UnimplementedCall`: `UNIMPLEMENTED`.
//!
//! Metadata, on every method: `x-grpc-test-echo-initial` comes back in the
//! response headers and `x-grpc-test-echo-trailing-bin` in the trailers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use http_body::Frame;
use meshwire_proto::grpc_testing::test_service_server::{TestService, TestServiceServer};
use meshwire_proto::grpc_testing::{
    EchoStatus, Empty, Payload, PayloadType, ResponseParameters, SimpleRequest, SimpleResponse,
    StreamingInputCallRequest, StreamingInputCallResponse, StreamingOutputCallRequest,
    StreamingOutputCallResponse,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::echo::MAX_MESSAGE;

/// Request header echoed back in the response headers.
pub const ECHO_INITIAL: &str = "x-grpc-test-echo-initial";
/// Request header echoed back in the response trailers.
pub const ECHO_TRAILING: &str = "x-grpc-test-echo-trailing-bin";

type OutputStream = Pin<Box<dyn Stream<Item = Result<StreamingOutputCallResponse, Status>> + Send>>;

/// The interop `TestService`.
#[derive(Debug, Clone, Default)]
pub(crate) struct InteropService;

fn zeros(size: i32) -> Result<Payload, Status> {
    let size = usize::try_from(size)
        .map_err(|_| Status::invalid_argument(format!("negative payload size {size}")))?;
    Ok(Payload {
        r#type: PayloadType::Compressable as i32,
        body: vec![0; size],
    })
}

/// The status a request asks for, if it asks for a non-OK one.
fn requested_status(status: Option<&EchoStatus>) -> Option<Status> {
    status
        .filter(|s| s.code != 0)
        .map(|s| Status::new(Code::from(s.code), s.message.clone()))
}

/// Sends the replies `params` ask for; `false` if the receiver is gone.
async fn send_replies(
    params: &[ResponseParameters],
    tx: &mpsc::Sender<Result<StreamingOutputCallResponse, Status>>,
) -> bool {
    for p in params {
        if p.interval_us > 0 {
            tokio::time::sleep(Duration::from_micros(p.interval_us.unsigned_abs().into())).await;
        }
        let reply = zeros(p.size).map(|payload| StreamingOutputCallResponse {
            payload: Some(payload),
        });
        let stop = reply.is_err();
        if tx.send(reply).await.is_err() || stop {
            return false;
        }
    }
    true
}

/// Answers each request of `input` as it arrives (full duplex), or all of
/// them once the client has half-closed (`half_duplex`).
fn duplex(
    mut input: Streaming<StreamingOutputCallRequest>,
    half_duplex: bool,
) -> Response<OutputStream> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut pending = Vec::new();
        while let Some(req) = input.next().await {
            match req {
                Ok(req) if half_duplex => pending.push(req),
                Ok(req) => {
                    if !answer(&req, &tx).await {
                        return;
                    }
                }
                // The client went away or broke the stream: nobody to answer.
                Err(_) => return,
            }
        }
        for req in &pending {
            if !answer(req, &tx).await {
                return;
            }
        }
    });
    Response::new(Box::pin(ReceiverStream::new(rx)))
}

/// Answers one duplex request; `false` if the call is over.
async fn answer(
    req: &StreamingOutputCallRequest,
    tx: &mpsc::Sender<Result<StreamingOutputCallResponse, Status>>,
) -> bool {
    if let Some(status) = requested_status(req.response_status.as_ref()) {
        let _ = tx.send(Err(status)).await;
        return false;
    }
    send_replies(&req.response_parameters, tx).await
}

#[tonic::async_trait]
impl TestService for InteropService {
    async fn empty_call(&self, _req: Request<Empty>) -> Result<Response<Empty>, Status> {
        Ok(Response::new(Empty {}))
    }

    async fn unary_call(
        &self,
        req: Request<SimpleRequest>,
    ) -> Result<Response<SimpleResponse>, Status> {
        let req = req.into_inner();
        if let Some(status) = requested_status(req.response_status.as_ref()) {
            return Err(status);
        }
        Ok(Response::new(SimpleResponse {
            payload: Some(zeros(req.response_size)?),
            ..Default::default()
        }))
    }

    async fn cacheable_unary_call(
        &self,
        req: Request<SimpleRequest>,
    ) -> Result<Response<SimpleResponse>, Status> {
        self.unary_call(req).await
    }

    type StreamingOutputCallStream = OutputStream;

    async fn streaming_output_call(
        &self,
        req: Request<StreamingOutputCallRequest>,
    ) -> Result<Response<OutputStream>, Status> {
        let req = req.into_inner();
        if let Some(status) = requested_status(req.response_status.as_ref()) {
            return Err(status);
        }
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            send_replies(&req.response_parameters, &tx).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn streaming_input_call(
        &self,
        req: Request<Streaming<StreamingInputCallRequest>>,
    ) -> Result<Response<StreamingInputCallResponse>, Status> {
        let mut input = req.into_inner();
        let mut total = 0usize;
        while let Some(m) = input.next().await {
            total += m?.payload.map_or(0, |p| p.body.len());
        }
        let aggregated_payload_size = i32::try_from(total)
            .map_err(|_| Status::out_of_range(format!("{total} bytes received")))?;
        Ok(Response::new(StreamingInputCallResponse {
            aggregated_payload_size,
        }))
    }

    type FullDuplexCallStream = OutputStream;

    async fn full_duplex_call(
        &self,
        req: Request<Streaming<StreamingOutputCallRequest>>,
    ) -> Result<Response<OutputStream>, Status> {
        Ok(duplex(req.into_inner(), false))
    }

    type HalfDuplexCallStream = OutputStream;

    async fn half_duplex_call(
        &self,
        req: Request<Streaming<StreamingOutputCallRequest>>,
    ) -> Result<Response<OutputStream>, Status> {
        Ok(duplex(req.into_inner(), true))
    }

    async fn unimplemented_call(&self, _req: Request<Empty>) -> Result<Response<Empty>, Status> {
        Err(Status::unimplemented(
            "UnimplementedCall is not implemented",
        ))
    }
}

/// Wraps a gRPC service so that the interop echo headers come back: tonic's
/// handlers can set response headers but not the trailers of a unary call, so
/// this is done at the HTTP level for every method.
#[derive(Debug, Clone)]
struct EchoMetadata<S> {
    inner: S,
}

impl<S: NamedService> NamedService for EchoMetadata<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for EchoMetadata<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<http::Response<Body>, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let initial = req.headers().get(ECHO_INITIAL).cloned();
        let trailing = req.headers().get(ECHO_TRAILING).cloned();
        let call = self.inner.call(req);
        Box::pin(async move {
            let mut resp = call.await?;
            if let Some(v) = initial {
                resp.headers_mut()
                    .insert(HeaderName::from_static(ECHO_INITIAL), v);
            }
            let Some(v) = trailing else {
                return Ok(resp);
            };
            if resp.headers().contains_key("grpc-status") {
                // Trailers-only response (an error before any message): the
                // headers are the trailers.
                resp.headers_mut()
                    .insert(HeaderName::from_static(ECHO_TRAILING), v);
                return Ok(resp);
            }
            Ok(resp.map(|inner| {
                Body::new(WithTrailers {
                    inner,
                    extra: Some((ECHO_TRAILING, v)),
                })
            }))
        })
    }
}

/// A response body whose trailers get one extra entry.
struct WithTrailers {
    inner: Body,
    extra: Option<(&'static str, HeaderValue)>,
}

impl http_body::Body for WithTrailers {
    type Data = tonic::codegen::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        Poll::Ready(Some(Ok(match frame.into_trailers() {
            Ok(mut trailers) => {
                if let Some((k, v)) = this.extra.take() {
                    trailers.insert(HeaderName::from_static(k), v);
                }
                Frame::trailers(trailers)
            }
            Err(frame) => frame,
        })))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A running interop server.
#[derive(Debug)]
pub struct InteropHandle {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl InteropHandle {
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

/// Serves `grpc.testing.TestService` (h2c) on `listener` until stopped.
pub fn serve(listener: TcpListener) -> InteropHandle {
    let addr = listener.local_addr().expect("bound listener");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = TestServiceServer::new(InteropService)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    // No Nagle: streamed replies go out at once, not after the peer's delayed ACK.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let task = tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(EchoMetadata { inner: server })
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "interop server ended");
        }
    });
    InteropHandle {
        addr,
        stop: Some(stop),
        task,
    }
}

/// Binds `addr` (use port 0 in tests) and serves.
pub async fn bind(addr: SocketAddr) -> std::io::Result<InteropHandle> {
    Ok(serve(TcpListener::bind(addr).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requested_status_ignores_ok() {
        assert!(requested_status(None).is_none());
        let ok = EchoStatus {
            code: 0,
            message: "fine".into(),
        };
        assert!(requested_status(Some(&ok)).is_none());
        let bad = EchoStatus {
            code: 2,
            message: "test status message".into(),
        };
        let s = requested_status(Some(&bad)).expect("status");
        assert_eq!(s.code(), Code::Unknown);
        assert_eq!(s.message(), "test status message");
    }

    #[test]
    fn zeros_rejects_negative_sizes() {
        assert_eq!(zeros(3).unwrap().body, vec![0, 0, 0]);
        assert_eq!(zeros(-1).unwrap_err().code(), Code::InvalidArgument);
    }
}
