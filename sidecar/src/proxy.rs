//! Forwarding one call over a leased HTTP/2 stream, shared by the outbound
//! (app → peer sidecar) and inbound (peer sidecar → app) sides.
//!
//! Headers are rewritten in place (no copies on the HTTP/2 path), bodies are
//! passed through unbuffered. The call's deadline and span are the caller's
//! ([`crate::call::Call::run`]); they follow the call into the response body.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderMap, Request, Response, Uri, Version, header};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::{CallState, RequestBody, RequestPipe, ResponseBody};
use crate::endpoint::CallGuard;
use crate::grpc;
use crate::pool::Lease;
use crate::respond::ProxyError;

/// The deadline of a call: the caller's `grpc-timeout`, capped by the service's
/// request timeout. A malformed `grpc-timeout` is refused (INTERNAL, as gRPC
/// servers answer it), never forwarded or ignored.
pub(crate) fn call_timeout(
    headers: &HeaderMap,
    cap: Option<Duration>,
) -> Result<Option<Duration>, ProxyError> {
    let asked = match headers.get(grpc::GRPC_TIMEOUT) {
        None => None,
        Some(v) => Some(grpc::parse_timeout(v).ok_or(ProxyError::BadTimeout)?),
    };
    Ok(match (asked, cap) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    })
}

/// The authority a request names (`:authority`, or `Host` for HTTP/1.1).
pub(crate) fn request_authority(req: &Request<Incoming>) -> Option<&str> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty())
}

/// `greeter:50051` -> `greeter`.
pub(crate) fn host_of(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// The trailer fields a gRPC response can end with.
const GRPC_TRAILERS: &str = "grpc-status, grpc-message, grpc-status-details-bin";

/// Connection-specific headers (RFC 9110 §7.6.1) that must not cross a proxy.
const HOP_BY_HOP: [header::HeaderName; 5] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::HeaderName::from_static("keep-alive"),
];

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named by `Connection` are hop-by-hop too.
    let named: Vec<header::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| header::HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for h in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(h);
    }
    headers.remove("proxy-connection");
    if headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
}

/// Turns a downstream request into the upstream HTTP/2 request, in place.
/// HTTP/2 requests cannot carry connection-specific headers (the h2 codec
/// rejects them), so only HTTP/1.x requests need stripping and a new URI.
pub(crate) fn prepare_request(
    req: &mut Request<Incoming>,
    scheme: &Scheme,
    authority: Option<&Authority>,
) -> Result<(), ProxyError> {
    if req.version() == Version::HTTP_2 && authority.is_none() {
        return Ok(());
    }
    let authority = match authority {
        Some(a) => a.clone(),
        None => {
            let a = request_authority(req).ok_or(ProxyError::NoAuthority)?;
            Authority::try_from(a).map_err(|_| ProxyError::BadRequest("invalid Host header"))?
        }
    };
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(scheme.clone());
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    *req.uri_mut() =
        Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("invalid request target"))?;
    if req.version() != Version::HTTP_2 {
        strip_hop_by_hop(req.headers_mut());
        req.headers_mut().remove(header::HOST);
        *req.version_mut() = Version::HTTP_2;
    }
    Ok(())
}

/// Forwards the time left, so the next hop and the app see the true deadline.
fn set_timeout_header(headers: &mut HeaderMap, deadline: Option<Instant>) {
    if let Some(d) = deadline {
        let left = d.saturating_duration_since(Instant::now());
        headers.insert(grpc::GRPC_TIMEOUT, grpc::encode_timeout(left));
    }
}

/// Why a send did not produce a response.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The upstream never processed the request (the connection refused it
    /// before it was written, a GOAWAY excluded it, or REFUSED_STREAM): it is
    /// handed back, body included, and may go elsewhere.
    NotSent(Box<Request<RequestBody>>),
    /// The app answered a code of the service's `retry_on` (UNAVAILABLE by
    /// default) before any response data (trailers-only), or the per-try
    /// timeout fired before the response started, and the retry budget
    /// allowed one more try: the request is handed back for another
    /// endpoint, after the server's pushback if it gave one.
    Retry(Box<Request<RequestBody>>, Option<Duration>),
    Failed(ProxyError),
}

/// What a send may do when the app fails the call (outbound only).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy<'a> {
    pub(crate) budget: &'a crate::outlier::RetryBudget,
    pub(crate) metrics: &'a crate::telemetry::metrics::SidecarMetrics,
    /// The gRPC codes retried (the service's `retry.retry_on`).
    pub(crate) codes: meshwire_mesh::CodeSet,
}

/// `grpc-retry-pushback-ms`: `Some(None)` says "do not retry" (negative or
/// not a number, gRFC A6).
fn pushback(headers: &HeaderMap) -> Option<Option<Duration>> {
    let v = headers.get("grpc-retry-pushback-ms")?.to_str().ok()?;
    Some(v.parse::<u64>().ok().map(Duration::from_millis))
}

/// How long a call refused unprocessed waits for the rest of its body before
/// it can be sent elsewhere.
const REPLAY_WAIT: Duration = Duration::from_millis(50);

/// Failures that guarantee the upstream did not process the request (RFC 9113
/// §8.7): streams above a GOAWAY's last stream id, and REFUSED_STREAM.
fn never_processed(e: &h2::Error) -> bool {
    e.is_remote()
        && (e.is_go_away() || (e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM)))
}

/// How the upstream response is framed back to the caller.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallShape {
    pub(crate) grpc: bool,
    pub(crate) downstream: Version,
    pub(crate) deadline: Option<Instant>,
}

/// Sends the request on the leased stream and wraps the response so the
/// guard and the lease live as long as the response body.
///
/// The request body is piped inside this future while the response headers
/// are awaited; only a body still streaming when they arrive (client or bidi
/// streaming) gets a task of its own. A unary call costs no extra task.
///
/// `replayable`: another attempt could take the call if this upstream turns
/// it away unprocessed (GOAWAY, REFUSED_STREAM), so the request head is kept
/// for it (one `HeaderMap` clone); otherwise nothing is kept and such a
/// refusal fails the call.
pub(crate) async fn send(
    lease: Lease,
    mut guard: CallGuard,
    req: Request<RequestBody>,
    shape: CallShape,
    replayable: bool,
    retry: Option<RetryPolicy<'_>>,
    per_try_timeout: Option<Duration>,
) -> Result<Response<ResponseBody>, SendError> {
    let (mut parts, body) = req.into_parts();
    set_timeout_header(&mut parts.headers, shape.deadline);
    let mut sender = lease.sender();
    // A closed or GOAWAY'd connection refuses here, before anything is sent.
    if std::future::poll_fn(|cx| sender.poll_ready(cx))
        .await
        .is_err()
    {
        lease.mark_closed();
        guard.not_processed();
        return Err(SendError::NotSent(Box::new(Request::from_parts(
            parts, body,
        ))));
    }
    // Kept in case the upstream turns the stream away unprocessed.
    let again = replayable.then(|| {
        let mut again = Request::new(());
        *again.method_mut() = parts.method.clone();
        *again.uri_mut() = parts.uri.clone();
        *again.version_mut() = parts.version;
        *again.headers_mut() = parts.headers.clone();
        again
    });
    let eos = body.is_end_stream();
    guard.sent(true);
    let (mut response, tx) = match sender.send_request(Request::from_parts(parts, ()), eos) {
        Ok(r) => r,
        Err(e) => {
            // Nothing went out: a GOAWAY or the connection's end raced with
            // `poll_ready` above. The untouched body can go elsewhere.
            lease.mark_closed();
            return Err(match again {
                Some(again) => {
                    guard.not_processed();
                    tracing::debug!(error = %e, "the connection closed before the call was sent; it can go elsewhere");
                    let (head, ()) = again.into_parts();
                    SendError::NotSent(Box::new(Request::from_parts(head, body)))
                }
                None => failed(&mut guard, ProxyError::from_h2(e)),
            });
        }
    };
    let mut pipe = (!eos).then(|| RequestPipe::new(body, tx));
    let mut piping = pipe.is_some();
    let wait = std::future::poll_fn(|cx| {
        if piping
            && let Some(p) = pipe.as_mut()
            && Pin::new(p).poll(cx).is_ready()
        {
            piping = false;
        }
        Pin::new(&mut response).poll(cx)
    });
    let resp = match per_try_timeout {
        None => wait.await,
        Some(limit) => match tokio::time::timeout(limit, wait).await {
            Ok(r) => r,
            Err(_) => {
                // Dropping the response future resets the stream (CANCEL).
                drop(response);
                guard.timed_out();
                tracing::debug!(
                    ?limit,
                    "per-try timeout; the endpoint counts it as a failure"
                );
                if let Some(policy) = retry
                    && again.is_some()
                {
                    if policy.budget.withdraw() {
                        let replay = match pipe.take() {
                            None => Some(RequestBody::Replay(Default::default())),
                            Some(p) => p.into_replay(REPLAY_WAIT).await,
                        };
                        if let (Some(body), Some(again)) = (replay, again) {
                            let (head, ()) = again.into_parts();
                            return Err(SendError::Retry(
                                Box::new(Request::from_parts(head, body)),
                                None,
                            ));
                        }
                    } else {
                        policy
                            .metrics
                            .retry(crate::telemetry::metrics::RetryOutcome::BudgetExhausted);
                    }
                }
                return Err(SendError::Failed(ProxyError::PerTryTimeout(limit)));
            }
        },
    };
    let resp = match resp {
        Ok(r) => {
            // Retried only if nothing of the answer has reached the caller:
            // the app ended the call in its response headers.
            let code = r.headers().get(grpc::GRPC_STATUS).map(grpc::status_code);
            if let Some(policy) = retry
                && shape.grpc
                && again.is_some()
                && r.body().is_end_stream()
                && let Some(code) = code
                && policy.codes.contains(code)
                && pushback(r.headers()) != Some(None)
                // A peer's rate limit answered: deliberate, even when
                // `retry_on` names resource-exhausted.
                && !crate::respond::is_rate_limited(r.headers())
            {
                if policy.budget.withdraw() {
                    let wait = pushback(r.headers()).flatten();
                    let replay = match pipe.take() {
                        None => Some(RequestBody::Replay(Default::default())),
                        Some(p) => p.into_replay(REPLAY_WAIT).await,
                    };
                    if let (Some(body), Some(again)) = (replay, again) {
                        guard.finish(code);
                        tracing::debug!(
                            grpc_status = code,
                            "the app failed the call before replying; retrying on another endpoint"
                        );
                        let (head, ()) = again.into_parts();
                        return Err(SendError::Retry(
                            Box::new(Request::from_parts(head, body)),
                            wait,
                        ));
                    }
                } else {
                    policy
                        .metrics
                        .retry(crate::telemetry::metrics::RetryOutcome::BudgetExhausted);
                }
            }
            if let Some(mut p) = pipe {
                if piping {
                    // Still streaming: it counts its bytes itself when done.
                    p.account = Some(guard.endpoint().clone());
                    tokio::spawn(p);
                } else {
                    guard.request_bytes += p.sent;
                }
            }
            r
        }
        Err(e) if never_processed(&e) && again.is_some() => {
            guard.refused();
            let replay = match pipe {
                None => Some(RequestBody::Replay(Default::default())),
                Some(p) => p.into_replay(REPLAY_WAIT).await,
            };
            return Err(match (replay, again) {
                (Some(body), Some(again)) => {
                    tracing::debug!(error = %e, "upstream did not process the call; it can go elsewhere");
                    let (head, ()) = again.into_parts();
                    SendError::NotSent(Box::new(Request::from_parts(head, body)))
                }
                _ => {
                    guard.sent(true);
                    failed(&mut guard, ProxyError::from_h2(e))
                }
            });
        }
        Err(e) => return Err(failed(&mut guard, ProxyError::from_h2(e))),
    };
    let (mut parts, recv) = resp.into_parts();
    let http_code = grpc::code_of_http(parts.status);
    if !shape.grpc {
        guard.http_status(parts.status);
    }
    // The call's status if the response ends with its headers (trailers-only).
    let headers_code = if shape.grpc {
        parts
            .headers
            .get(grpc::GRPC_STATUS)
            .map_or(grpc::Code::Unknown as u8, grpc::status_code)
    } else {
        http_code
    };
    if shape.downstream != Version::HTTP_2 {
        parts.version = shape.downstream;
        strip_hop_by_hop(&mut parts.headers);
        // HTTP/1.1 sends only the trailer fields the head declared (hyper
        // enforces it): a gRPC status must be declared or it is lost.
        if shape.grpc && !recv.is_end_stream() && !parts.headers.contains_key(header::TRAILER) {
            parts.headers.insert(
                header::TRAILER,
                http::HeaderValue::from_static(GRPC_TRAILERS),
            );
        }
    }
    let state = CallState {
        guard: Some(guard),
        lease: Some(lease),
        // Both come from the caller, `call::Call::run`, once this returns.
        deadline: None,
        trace: None,
        code: None,
        grpc: shape.grpc,
        code_without_trailers: if shape.grpc {
            grpc::Code::Unknown as u8
        } else {
            http_code
        },
    };
    Ok(Response::from_parts(
        parts,
        ResponseBody::proxied(recv, state, headers_code),
    ))
}

/// The call failed at the endpoint: count it with the error's status.
fn failed(guard: &mut CallGuard, e: ProxyError) -> SendError {
    guard.finish(e.code() as u8);
    SendError::Failed(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn host_strips_port_only() {
        assert_eq!(host_of("greeter:50051"), "greeter");
        assert_eq!(host_of("greeter"), "greeter");
        assert_eq!(host_of("greeter.ns.svc:80"), "greeter.ns.svc");
        assert_eq!(host_of("weird:name"), "weird:name");
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
        let mut t = HeaderMap::new();
        t.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut t);
        assert_eq!(t[header::TE], "trailers", "gRPC needs te: trailers");
    }

    #[test]
    fn timeout_is_capped_by_the_service() {
        let t = |h: &HeaderMap, cap| call_timeout(h, cap).unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(t(&h, None), None);
        assert_eq!(
            t(&h, Some(Duration::from_secs(2))),
            Some(Duration::from_secs(2))
        );
        h.insert(grpc::GRPC_TIMEOUT, HeaderValue::from_static("500m"));
        assert_eq!(t(&h, None), Some(Duration::from_millis(500)));
        assert_eq!(
            t(&h, Some(Duration::from_millis(100))),
            Some(Duration::from_millis(100))
        );
    }

    #[test]
    fn malformed_timeouts_are_refused() {
        for bad in [
            "abc",
            "-1S",
            "99999999999H",
            "123456789m",
            "1",
            "S",
            "",
            "1s",
        ] {
            let mut h = HeaderMap::new();
            h.insert(grpc::GRPC_TIMEOUT, HeaderValue::from_static(bad));
            let e = call_timeout(&h, Some(Duration::from_secs(1))).unwrap_err();
            assert_eq!(e.code(), grpc::Code::Internal, "{bad:?}");
        }
    }
}
