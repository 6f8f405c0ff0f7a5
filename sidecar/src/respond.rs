//! Every error the sidecar itself produces becomes a response here, in one
//! place: gRPC callers get a trailers-only response (HTTP 200, `grpc-status`,
//! `grpc-message`), HTTP callers the matching HTTP status and a text body.
//! Such responses carry `meshwire-error: <kind>` so they can be told apart
//! from the application's own errors.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::ResponseBody;
use crate::connect::ConnectError;
use crate::grpc::{self, Code};

pub(crate) const ERROR_HEADER: &str = "meshwire-error";
/// The [`ERROR_HEADER`] of a call a rate limit refused.
pub(crate) const RATE_LIMITED: &str = "rate-limited";

/// A sidecar's rate-limit refusal: a deliberate answer, which a calling
/// sidecar neither retries nor counts against the endpoint.
pub(crate) fn is_rate_limited(headers: &http::HeaderMap) -> bool {
    headers
        .get(ERROR_HEADER)
        .is_some_and(|v| v.as_bytes() == RATE_LIMITED.as_bytes())
}

/// What went wrong with a call, from the sidecar's point of view.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("meshwire: no service named {0:?} is known to this sidecar")]
    UnknownService(String),
    #[error("meshwire: the request names no service (no :authority or Host)")]
    NoAuthority,
    #[error("meshwire: service {0:?} has no endpoints")]
    NoEndpoints(String),
    #[error("meshwire: service {service:?}: no endpoint could be reached: {last}")]
    Unreachable { service: String, last: ConnectError },
    #[error("meshwire: local application unreachable: {0}")]
    AppUnreachable(ConnectError),
    #[error("meshwire: upstream reset the stream ({0})")]
    UpstreamReset(h2::Reason),
    #[error("meshwire: upstream failed: {0}")]
    Upstream(h2::Error),
    #[error("meshwire: deadline of {0:?} exceeded")]
    DeadlineExceeded(Duration),
    #[error("meshwire: bad request: {0}")]
    BadRequest(&'static str),
    #[error("meshwire: malformed grpc-timeout (1 to 8 digits and a unit H M S m u n)")]
    BadTimeout,
    #[error("meshwire: {caller} may not call {path}")]
    PermissionDenied { caller: String, path: String },
    #[error("meshwire: the sidecar is still starting (no certificate or config yet)")]
    NotReady,
    #[error("meshwire: the local application is unhealthy")]
    AppUnhealthy,
    #[error(
        "meshwire: service {0:?} is overloaded here (circuit breaker: too many calls in flight)"
    )]
    Overloaded(Arc<str>),
    #[error("meshwire: the local application is overloaded (too many calls waiting)")]
    AppOverloaded,
    #[error("meshwire: no answer within the per-try timeout of {0:?} (no retry left)")]
    PerTryTimeout(Duration),
    /// Refused by the local service's inbound rate limit; a token is due
    /// after the duration. A deliberate answer: never retried elsewhere.
    #[error("meshwire: rate limit exceeded, retry after {0:?}")]
    RateLimited(Duration),
}

impl ProxyError {
    /// The upstream's error, classified: a stream reset keeps its reason; a
    /// GOAWAY or a broken connection is a plain failure (`UNAVAILABLE`).
    pub(crate) fn from_h2(e: h2::Error) -> Self {
        match e.reason() {
            Some(r) if e.is_reset() => ProxyError::UpstreamReset(r),
            _ => ProxyError::Upstream(e),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            ProxyError::UnknownService(_)
            | ProxyError::NoEndpoints(_)
            | ProxyError::Unreachable { .. }
            | ProxyError::AppUnreachable(_)
            | ProxyError::Upstream(_)
            | ProxyError::NotReady
            | ProxyError::AppUnhealthy
            | ProxyError::Overloaded(_)
            | ProxyError::AppOverloaded
            | ProxyError::PerTryTimeout(_) => Code::Unavailable,
            ProxyError::PermissionDenied { .. } => Code::PermissionDenied,
            ProxyError::RateLimited(_) => Code::ResourceExhausted,
            ProxyError::NoAuthority | ProxyError::BadRequest(_) => Code::InvalidArgument,
            ProxyError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            // What gRPC servers answer (grpc-go: "malformed grpc-timeout").
            ProxyError::BadTimeout => Code::Internal,
            ProxyError::UpstreamReset(r) => match *r {
                h2::Reason::CANCEL => Code::Cancelled,
                // The peer never processed it: safe for the caller to retry.
                h2::Reason::REFUSED_STREAM => Code::Unavailable,
                h2::Reason::ENHANCE_YOUR_CALM => Code::ResourceExhausted,
                h2::Reason::INADEQUATE_SECURITY => Code::PermissionDenied,
                _ => Code::Unavailable,
            },
        }
    }

    /// The call certainly did not reach the application, so the caller may
    /// send it to another endpoint whatever the method (gRFC A6).
    pub(crate) fn not_processed(&self) -> bool {
        matches!(
            self,
            ProxyError::AppUnreachable(_)
                | ProxyError::NotReady
                | ProxyError::AppUnhealthy
                | ProxyError::AppOverloaded
        )
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            ProxyError::UnknownService(_) => "unknown-service",
            ProxyError::NoAuthority => "no-authority",
            ProxyError::NoEndpoints(_) => "no-endpoints",
            ProxyError::Unreachable { .. } => "unreachable",
            ProxyError::AppUnreachable(_) => "app-unreachable",
            ProxyError::UpstreamReset(_) => "upstream-reset",
            ProxyError::Upstream(_) => "upstream-failed",
            ProxyError::DeadlineExceeded(_) => "deadline-exceeded",
            ProxyError::BadRequest(_) | ProxyError::BadTimeout => "bad-request",
            ProxyError::PermissionDenied { .. } => "permission-denied",
            ProxyError::NotReady => "not-ready",
            ProxyError::AppUnhealthy => "app-unhealthy",
            ProxyError::Overloaded(_) | ProxyError::AppOverloaded => "overloaded",
            ProxyError::PerTryTimeout(_) => "per-try-timeout",
            ProxyError::RateLimited(_) => RATE_LIMITED,
        }
    }

    /// The response a caller gets for this error.
    pub fn into_response(self, grpc_call: bool) -> Response<ResponseBody> {
        let code = self.code();
        // Bounded: the service name and path come from the caller.
        let message = self.to_string();
        let message = meshwire_mesh::grpc::truncate(&message, meshwire_mesh::grpc::MAX_MESSAGE);
        tracing::debug!(error = %message, grpc_status = code as u8, "sidecar error response");
        let kind = HeaderValue::from_static(self.kind());
        if grpc_call {
            let mut r = Response::new(ResponseBody::empty());
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert(grpc::GRPC_STATUS, code.header_value());
            h.insert(grpc::GRPC_MESSAGE, grpc::encode_message(&message));
            h.insert(ERROR_HEADER, kind);
            r.headers_mut().extend(self.retry_after());
            r
        } else {
            let mut r = Response::new(ResponseBody::full(format!("{message}\n")));
            *r.status_mut() = match self {
                // The caller's mistake, whatever gRPC calls it.
                ProxyError::BadTimeout => StatusCode::BAD_REQUEST,
                _ => code.http_status(),
            };
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            h.insert(ERROR_HEADER, kind);
            r.headers_mut().extend(self.retry_after());
            r
        }
    }

    /// `Retry-After` (whole seconds, rounded up, at least 1) for a refusal
    /// by a rate limit.
    fn retry_after(&self) -> Option<(header::HeaderName, HeaderValue)> {
        let ProxyError::RateLimited(wait) = self else {
            return None;
        };
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        Some((header::RETRY_AFTER, HeaderValue::from(secs.max(1))))
    }
}

/// A plain response with a status and text (used by the admin server).
pub(crate) fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    #[test]
    fn grpc_errors_are_trailers_only() {
        let r = ProxyError::UnknownService("greeter".into()).into_response(true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert!(
            r.headers()["grpc-message"]
                .to_str()
                .unwrap()
                .contains("\"greeter\"")
        );
        assert_eq!(r.headers()[ERROR_HEADER], "unknown-service");
        assert!(
            r.body().is_end_stream(),
            "trailers-only: headers carry END_STREAM"
        );
    }

    #[test]
    fn http_errors_use_matching_status() {
        let cases = [
            (
                ProxyError::UnknownService("x".into()),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                ProxyError::DeadlineExceeded(Duration::from_millis(5)),
                StatusCode::GATEWAY_TIMEOUT,
            ),
            (
                ProxyError::UpstreamReset(h2::Reason::CANCEL),
                StatusCode::from_u16(499).unwrap(),
            ),
            (
                ProxyError::UpstreamReset(h2::Reason::INTERNAL_ERROR),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (ProxyError::NoAuthority, StatusCode::BAD_REQUEST),
        ];
        for (e, status) in cases {
            let r = e.into_response(false);
            assert_eq!(r.status(), status);
            assert!(r.headers().get("grpc-status").is_none());
        }
    }

    #[test]
    fn rate_limited_calls_are_resource_exhausted_or_429_with_retry_after() {
        let wait = Duration::from_millis(1500);
        let r = ProxyError::RateLimited(wait).into_response(true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "8");
        assert!(r.body().is_end_stream(), "trailers-only");
        assert!(is_rate_limited(r.headers()));
        let r = ProxyError::RateLimited(wait).into_response(false);
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert!(is_rate_limited(r.headers()));
        let r = ProxyError::RateLimited(Duration::from_millis(3)).into_response(false);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        assert!(!ProxyError::RateLimited(wait).not_processed());
    }

    #[test]
    fn reset_reasons_map_to_codes() {
        assert_eq!(
            ProxyError::UpstreamReset(h2::Reason::CANCEL).code(),
            Code::Cancelled
        );
        assert_eq!(
            ProxyError::UpstreamReset(h2::Reason::REFUSED_STREAM).code(),
            Code::Unavailable
        );
        assert_eq!(
            ProxyError::DeadlineExceeded(Duration::ZERO).code(),
            Code::DeadlineExceeded
        );
    }
}
