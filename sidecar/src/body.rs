//! Bodies crossing the sidecar, in both directions.
//!
//! [`ResponseBody`] is what every listener returns. An upstream response is
//! passed frame by frame, never buffered: hyper only polls it when the
//! downstream stream has flow-control capacity, and upstream capacity is
//! released only as data is handed on, so a slow reader slows the writer end
//! to end. It also carries the call's [`CallGuard`] (the endpoint's outstanding
//! count ends when the body does), its span and its deadline timer, the same
//! one that bounded the wait for the response headers ([`crate::call`]).
//!
//! [`RequestPipe`] moves a downstream request body onto an upstream HTTP/2
//! stream, sending only as much as the upstream window allows.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::endpoint::CallGuard;
use crate::grpc::{self, Code};
use crate::pool::Lease;
use crate::telemetry::CallTrace;

/// Errors a response body can end with. The `source` is the upstream's
/// `h2::Error`, so hyper resets the downstream stream with the same reason
/// the upstream used (a `CANCEL` stays a `CANCEL`).
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("upstream body: {0}")]
    Upstream(#[source] h2::Error),
    #[error("deadline exceeded")]
    Deadline(#[source] h2::Error),
    #[error("app body: {0}")]
    App(#[source] hyper::Error),
}

/// What a call holds on to while its response streams.
#[derive(Debug)]
pub(crate) struct CallState {
    pub(crate) guard: Option<CallGuard>,
    pub(crate) lease: Option<Lease>,
    pub(crate) deadline: Option<Pin<Box<Sleep>>>,
    pub(crate) grpc: bool,
    /// The call's gRPC status when the body ends without trailers: OK for
    /// HTTP with a non-5xx status (other statuses mapped as gRPC clients
    /// do); gRPC calls need `grpc-status` in trailers instead.
    pub(crate) code_without_trailers: u8,
    /// The call's span, when it is traced.
    pub(crate) trace: Option<Box<CallTrace>>,
    /// The call's status once it ended.
    pub(crate) code: Option<u8>,
}

impl CallState {
    /// The call ended with gRPC status `code` (0: success).
    fn finish(&mut self, code: u8) {
        self.code = Some(code);
        if let Some(mut g) = self.guard.take() {
            g.finish(code);
        }
        if let Some(mut t) = self.trace.take() {
            t.finish(code);
        }
        self.lease = None;
        self.deadline = None;
    }
}

/// The body of every response a sidecar listener sends.
#[derive(Debug)]
pub struct ResponseBody(Kind);

#[derive(Debug)]
enum Kind {
    /// Nothing (trailers-only gRPC errors).
    Empty,
    /// A small body made by the sidecar (admin pages, HTTP errors).
    Full { data: Option<Bytes> },
    /// A response from an HTTP/1.1 app, passed through (see `app_http1`).
    Boxed(http_body_util::combinators::UnsyncBoxBody<Bytes, BodyError>),
    /// An upstream response passed through.
    Proxied {
        inner: h2::RecvStream,
        data_done: bool,
        state: CallState,
    },
}

impl ResponseBody {
    pub fn empty() -> Self {
        ResponseBody(Kind::Empty)
    }

    pub fn full(data: impl Into<Bytes>) -> Self {
        ResponseBody(Kind::Full {
            data: Some(data.into()),
        })
    }

    pub(crate) fn boxed(body: impl Body<Data = Bytes, Error = BodyError> + Send + 'static) -> Self {
        ResponseBody(Kind::Boxed(http_body_util::BodyExt::boxed_unsync(body)))
    }

    /// `headers_code`: the call's status if the response ends with its headers.
    pub(crate) fn proxied(inner: h2::RecvStream, mut state: CallState, headers_code: u8) -> Self {
        // An upstream response that already ends here (trailers-only) settles the call now.
        if inner.is_end_stream() {
            state.finish(headers_code);
        }
        ResponseBody(Kind::Proxied {
            inner,
            data_done: false,
            state,
        })
    }
}

impl ResponseBody {
    /// Hands the call's deadline timer and span to the response: the timer
    /// keeps running until the body ends, the span ends with the call. A
    /// call that already ended (trailers-only) ends its span now.
    /// Returns the span when this body cannot carry it (not an h2 upstream's).
    pub(crate) fn hold(
        &mut self,
        deadline: Option<Pin<Box<Sleep>>>,
        trace: Option<Box<CallTrace>>,
    ) -> Option<Box<CallTrace>> {
        let Kind::Proxied { state, .. } = &mut self.0 else {
            return trace;
        };
        match state.code {
            Some(code) => {
                if let Some(mut t) = trace {
                    t.finish(code);
                }
            }
            None => {
                state.deadline = deadline;
                state.trace = trace;
            }
        }
        None
    }
}

/// The status trailers carry (none counts as OK, as before).
fn trailers_code(t: &HeaderMap) -> u8 {
    t.get(grpc::GRPC_STATUS).map_or(0, grpc::status_code)
}

/// A reset with NO_ERROR after a complete response only stops the request
/// body early (RFC 9113 §8.1); anything else fails the call.
fn upstream_error(e: h2::Error, state: &mut CallState) -> Option<Result<Frame<Bytes>, BodyError>> {
    if e.reason() == Some(h2::Reason::NO_ERROR) {
        let code = state.code_without_trailers;
        state.finish(code);
        return None;
    }
    let code = match e.reason() {
        Some(r) if e.is_reset() => crate::respond::ProxyError::UpstreamReset(r).code(),
        _ => Code::Unavailable,
    };
    state.finish(code as u8);
    Some(Err(BodyError::Upstream(e)))
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().0 {
            Kind::Empty => Poll::Ready(None),
            Kind::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Kind::Boxed(b) => Pin::new(b).poll_frame(cx),
            Kind::Proxied {
                inner,
                data_done,
                state,
            } => {
                if let Some(sleep) = state.deadline.as_mut()
                    && sleep.as_mut().poll(cx).is_ready()
                {
                    let grpc = state.grpc;
                    if let Some(g) = state.guard.as_mut() {
                        g.no_verdict();
                    }
                    state.finish(Code::DeadlineExceeded as u8);
                    // The upstream stream is reset (CANCEL) when this body is dropped.
                    return Poll::Ready(Some(if grpc {
                        let mut t = HeaderMap::with_capacity(2);
                        t.insert(grpc::GRPC_STATUS, Code::DeadlineExceeded.header_value());
                        t.insert(
                            grpc::GRPC_MESSAGE,
                            http::HeaderValue::from_static("deadline exceeded in meshwire sidecar"),
                        );
                        Ok(Frame::trailers(t))
                    } else {
                        Err(BodyError::Deadline(h2::Error::from(h2::Reason::CANCEL)))
                    }));
                }
                if !*data_done {
                    match ready!(inner.poll_data(cx)) {
                        Some(Ok(data)) => {
                            // Handed on: let the upstream send that much more.
                            let _ = inner.flow_control().release_capacity(data.len());
                            if let Some(g) = state.guard.as_mut() {
                                g.response_bytes += data.len() as u64;
                            }
                            // A plain HTTP body that ends with this data ends the
                            // call now: an HTTP/1.1 writer whose Content-Length is
                            // met drops the body without polling it again (the call
                            // would count as CANCELLED).
                            if !state.grpc && inner.is_end_stream() {
                                let code = state.code_without_trailers;
                                state.finish(code);
                            }
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Some(Err(e)) => return Poll::Ready(upstream_error(e, state)),
                        None => *data_done = true,
                    }
                }
                match ready!(inner.poll_trailers(cx)) {
                    Ok(Some(t)) => {
                        state.finish(trailers_code(&t));
                        Poll::Ready(Some(Ok(Frame::trailers(t))))
                    }
                    Ok(None) => {
                        let code = state.code_without_trailers;
                        state.finish(code);
                        Poll::Ready(None)
                    }
                    Err(e) => Poll::Ready(upstream_error(e, state)),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Empty => true,
            Kind::Full { data } => data.is_none(),
            Kind::Boxed(b) => b.is_end_stream(),
            Kind::Proxied { inner, state, .. } => {
                state.deadline.is_none() && state.guard.is_none() && inner.is_end_stream()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Boxed(b) => b.size_hint(),
            Kind::Proxied { .. } => SizeHint::default(),
        }
    }
}

// === RequestPipe ===

/// Request bodies up to this size are kept (by reference, not copied) until
/// the response headers arrive, so a call the upstream never processed
/// (GOAWAY, REFUSED_STREAM) can be sent again elsewhere.
pub(crate) const REPLAY_LIMIT: usize = 64 << 10;

/// A request body on its way upstream: the caller's stream, or a replay of
/// what a first attempt read from it.
#[derive(Debug)]
pub(crate) enum RequestBody {
    Incoming(Incoming),
    Replay(Replay),
    /// The caller's stream with a size limit (the gateway's
    /// `max_body_bytes` for a body of unknown length), enforced by the pipe.
    Limited(Incoming, BodyLimit),
}

/// A request body's size limit; `exceeded` tells the caller (the gateway,
/// which then answers 413) that the pipe stopped the body and reset the
/// upstream stream.
#[derive(Debug, Clone)]
pub(crate) struct BodyLimit {
    pub(crate) max: u64,
    pub(crate) exceeded: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug, Default)]
pub(crate) struct Replay {
    data: std::collections::VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    size: usize,
}

impl RequestBody {
    pub(crate) fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Incoming(b) | RequestBody::Limited(b, _) => b.is_end_stream(),
            RequestBody::Replay(r) => r.data.is_empty() && r.trailers.is_none(),
        }
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Incoming(b) | RequestBody::Limited(b, _) => b.size_hint(),
            RequestBody::Replay(r) => {
                SizeHint::with_exact(r.data.iter().map(|d| d.len() as u64).sum())
            }
        }
    }

    pub(crate) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self {
            RequestBody::Incoming(b) | RequestBody::Limited(b, _) => Pin::new(b).poll_frame(cx),
            RequestBody::Replay(r) => Poll::Ready(match r.data.pop_front() {
                Some(d) => Some(Ok(Frame::data(d))),
                None => r.trailers.take().map(|t| Ok(Frame::trailers(t))),
            }),
        }
    }
}

/// Copies a request body onto an upstream HTTP/2 stream, never holding more
/// than the upstream's flow-control window allows, and keeps a replay of
/// small bodies.
#[derive(Debug)]
pub(crate) struct RequestPipe {
    body: RequestBody,
    tx: h2::SendStream<Bytes>,
    pending: Option<Bytes>,
    /// What has been read so far; `None` once past [`REPLAY_LIMIT`].
    record: Option<Replay>,
    /// The caller's body has been read to its end.
    read_all: bool,
    /// Body bytes sent upstream so far.
    pub(crate) sent: u64,
    /// The body's size limit, and what was read against it.
    limit: Option<(BodyLimit, u64)>,
    /// Where `sent` is counted when the pipe outlives the call's send (a
    /// streaming request body); unary bodies are counted by the caller.
    pub(crate) account: Option<std::sync::Arc<crate::endpoint::Endpoint>>,
}

impl Drop for RequestPipe {
    fn drop(&mut self) {
        if let Some(ep) = &self.account
            && self.sent > 0
        {
            ep.stats
                .request_bytes
                .fetch_add(self.sent, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl RequestPipe {
    pub(crate) fn new(body: RequestBody, tx: h2::SendStream<Bytes>) -> Self {
        let limit = match &body {
            RequestBody::Limited(_, l) => Some((l.clone(), 0)),
            _ => None,
        };
        Self {
            limit,
            body,
            tx,
            pending: None,
            record: Some(Replay::default()),
            read_all: false,
            sent: 0,
            account: None,
        }
    }

    /// The whole body again, for sending elsewhere: what was read so far plus
    /// the rest, if the caller sends it within `wait` (a unary call's end
    /// follows at once; a stream still open after that is not held up).
    /// `None` when it was too large to keep, failed, or did not end in time.
    pub(crate) async fn into_replay(mut self, wait: std::time::Duration) -> Option<RequestBody> {
        let deadline = tokio::time::Instant::now() + wait;
        while !self.read_all {
            self.record.as_ref()?;
            let next = std::future::poll_fn(|cx| self.body.poll_next(cx));
            match tokio::time::timeout_at(deadline, next).await.ok()? {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if self.over_limit(data.len()) {
                            return None;
                        }
                        self.remember(&data);
                        self.read_all = self.body.is_end_stream();
                    }
                    Err(frame) => {
                        if let (Ok(t), Some(r)) = (frame.into_trailers(), self.record.as_mut()) {
                            r.trailers = Some(t);
                        }
                        self.read_all = true;
                    }
                },
                None => self.read_all = true,
                Some(Err(_)) => return None,
            }
        }
        self.record.take().map(RequestBody::Replay)
    }

    /// Counts `n` more bytes against the limit; past it, marks the limit
    /// exceeded and resets the upstream stream.
    fn over_limit(&mut self, n: usize) -> bool {
        let Some((limit, read)) = self.limit.as_mut() else {
            return false;
        };
        *read += n as u64;
        if *read <= limit.max {
            return false;
        }
        limit
            .exceeded
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.tx.send_reset(h2::Reason::CANCEL);
        true
    }

    fn remember(&mut self, data: &Bytes) {
        if let Some(r) = &mut self.record {
            r.size += data.len();
            if r.size > REPLAY_LIMIT {
                self.record = None;
            } else {
                r.data.push_back(data.clone());
            }
        }
    }

    /// The downstream body failed (reset, connection lost): reset upstream too,
    /// with the same reason when there is one.
    fn reset_from(&mut self, e: &hyper::Error) {
        let reason = std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<h2::Error>())
            .and_then(h2::Error::reason)
            .unwrap_or(h2::Reason::CANCEL);
        self.tx.send_reset(reason);
    }
}

impl Future for RequestPipe {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            if let Some(data) = this.pending.as_mut() {
                if this.tx.capacity() == 0 {
                    this.tx.reserve_capacity(data.len());
                    match ready!(this.tx.poll_capacity(cx)) {
                        Some(Ok(_)) => continue,
                        // Stream reset or closed upstream: nothing more to send.
                        Some(Err(_)) | None => return Poll::Ready(()),
                    }
                }
                let n = this.tx.capacity().min(data.len());
                let chunk = data.split_to(n);
                this.sent += n as u64;
                let last = data.is_empty();
                if last {
                    this.pending = None;
                }
                let eos = last && this.body.is_end_stream();
                if eos {
                    this.read_all = true;
                }
                if this.tx.send_data(chunk, eos).is_err() || eos {
                    return Poll::Ready(());
                }
                continue;
            }
            match this.body.poll_next(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => {
                        if this.over_limit(data.len()) {
                            return Poll::Ready(());
                        }
                        this.remember(&data);
                        this.pending = Some(data);
                    }
                    Ok(_) => {}
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            if let Some(r) = &mut this.record {
                                r.trailers = Some(trailers.clone());
                            }
                            this.read_all = true;
                            let _ = this.tx.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                Poll::Ready(Some(Err(e))) => {
                    this.reset_from(&e);
                    return Poll::Ready(());
                }
                Poll::Ready(None) => {
                    this.read_all = true;
                    let _ = this.tx.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
                Poll::Pending => {
                    // Waiting on the caller; stop if the upstream gave up on the stream.
                    if this.tx.poll_reset(cx).is_ready() {
                        return Poll::Ready(());
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}
