//! What every proxied call shares, inbound and outbound: the deadline (one
//! timer for the whole call), the span's outcome when the call fails before
//! a response, and the error response.
//!
//! ```text
//! Call::of(&req) ─▶ side-specific checks (outbound: start gate, route; inbound: authz)
//!   ─▶ Call::run(timeout, span, attempts): attempts race the deadline's timer
//!        Ok(response)  ─▶ the timer and the span go into the ResponseBody
//!                         (ResponseBody::hold), which ends both with the call
//!        Err(e) / timer ─▶ the span ends with e's status
//!   ─▶ Call::respond: an error is counted by kind and becomes a response
//!      (respond::ProxyError::into_response)
//! ```

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use http::{Request, Response, Version};
use tokio::time::Instant;

use crate::body::ResponseBody;
use crate::grpc;
use crate::proxy::CallShape;
use crate::respond::ProxyError;
use crate::telemetry::{AttemptSpan, CallTrace, Direction, Telemetry};

/// One downstream call, as far as both sides treat it alike.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Call {
    grpc: bool,
    version: Version,
    direction: Direction,
}

impl Call {
    pub(crate) fn of<B>(req: &Request<B>, direction: Direction) -> Self {
        Self {
            grpc: grpc::is_grpc(req.headers()),
            version: req.version(),
            direction,
        }
    }

    pub(crate) fn grpc(&self) -> bool {
        self.grpc
    }

    /// Runs the call's attempts under its deadline (`timeout` from now), with
    /// one timer that, on success, keeps bounding the response body. A traced
    /// call names its span as the parent in `req`'s headers; `attempts` gets
    /// the request, the call's shape and, when traced, a handle to record each
    /// attempt's endpoint on the span.
    pub(crate) async fn run<B, F, Fut>(
        self,
        timeout: Option<Duration>,
        mut trace: Option<Box<CallTrace>>,
        mut req: Request<B>,
        attempts: F,
    ) -> Result<Response<ResponseBody>, ProxyError>
    where
        F: FnOnce(Request<B>, CallShape, Option<AttemptSpan>) -> Fut,
        Fut: Future<Output = Result<Response<ResponseBody>, ProxyError>>,
    {
        let deadline = timeout.map(|t| Instant::now() + t);
        let shape = CallShape {
            grpc: self.grpc,
            downstream: self.version,
            deadline,
        };
        let span = trace.as_deref().map(|t| {
            t.inject(req.headers_mut());
            t.attempts()
        });
        let mut timer = deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
        let result = {
            let mut attempt = pin!(attempts(req, shape, span));
            std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = attempt.as_mut().poll(cx) {
                    return Poll::Ready(r);
                }
                match (timer.as_mut(), timeout) {
                    (Some(t), Some(after)) => t
                        .as_mut()
                        .poll(cx)
                        .map(|()| Err(ProxyError::DeadlineExceeded(after))),
                    _ => Poll::Pending,
                }
            })
            .await
        };
        match result {
            Ok(mut resp) => {
                // An HTTP/1.1 app's body: the span ends with the response head.
                if let Some(mut t) = resp.body_mut().hold(timer, trace) {
                    t.finish(grpc::code_of_http(resp.status()));
                }
                Ok(resp)
            }
            Err(e) => {
                if let Some(t) = trace.as_mut() {
                    t.finish(e.code() as u8);
                }
                Err(e)
            }
        }
    }

    /// The response the caller gets: the upstream's, or the sidecar's own
    /// error response (counted by kind, in the caller's HTTP version).
    pub(crate) fn respond(
        self,
        result: Result<Response<ResponseBody>, ProxyError>,
        telemetry: &Telemetry,
    ) -> Response<ResponseBody> {
        match result {
            Ok(r) => r,
            Err(e) => {
                telemetry.metrics.error(self.direction, e.kind());
                let mut r = e.into_response(self.grpc);
                *r.version_mut() = self.version;
                r
            }
        }
    }
}
