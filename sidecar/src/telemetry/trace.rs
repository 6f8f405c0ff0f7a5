//! Distributed tracing of calls: one client span per call in the outbound
//! sidecar, one server span in the inbound sidecar, exported over OTLP/gRPC.
//!
//! ```text
//! request headers ─▶ sampled? (traceparent flag, B3, else the ratio; inbound never starts a trace)
//!   no  ─▶ nothing: no span, no allocation, headers untouched
//!   yes ─▶ tracing span (own Dispatch) ─▶ tracing-opentelemetry ─▶ SDK span
//!          traceparent (and B3 if the caller used it) rewritten to name our span
//!          ... call ends: rpc.grpc.status_code, status ─▶ span closes
//!          ─▶ bounded queue (full: dropped, counted) ─▶ batches ─▶ OTLP exporter
//! ```
//!
//! Call spans go through a `tracing` dispatcher of their own (a registry with
//! only the OpenTelemetry layer): the log filter can never hide them, and log
//! output never pays for them. Unsampled calls never reach it.
//!
//! The exporter runs on a task of its own behind a bounded queue: a slow or
//! absent collector costs dropped spans (counted in
//! `meshwire_trace_spans_dropped_total`), never a slower call.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::Context;
use opentelemetry::trace::{
    SpanContext, SpanId, Status, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor};
use tokio::sync::mpsc;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;

use super::metrics::{Direction, GRPC_CODES, SidecarMetrics};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// The `tracing` target of call spans.
pub const TARGET: &str = "meshwire::call";

/// How calls are traced and where spans go.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    /// The OTLP/gRPC collector, e.g. `http://127.0.0.1:4317` (Jaeger takes OTLP there).
    pub otlp_endpoint: String,
    /// `service.name` of this sidecar's spans.
    pub service_name: String,
    /// Share of calls without a sampled parent that start a trace (0..=1).
    /// A caller's sampled flag is always honoured.
    pub sample_ratio: f64,
    /// Spans waiting for export; past it they are dropped.
    pub queue_size: usize,
    /// Most spans per export request.
    pub batch_size: usize,
    /// Longest wait to fill a batch.
    pub batch_interval: Duration,
    /// One export request's time limit (a slow collector costs spans, not calls).
    pub export_timeout: Duration,
}

impl TraceConfig {
    pub fn new(otlp_endpoint: impl Into<String>, service_name: impl Into<String>) -> Self {
        Self {
            otlp_endpoint: otlp_endpoint.into(),
            service_name: service_name.into(),
            sample_ratio: 1.0,
            queue_size: 2048,
            batch_size: 512,
            batch_interval: Duration::from_millis(500),
            export_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("--otlp-endpoint {endpoint:?}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("--trace-sample-ratio must be between 0 and 1, got {0}")]
    Ratio(f64),
}

/// The per-sidecar tracer: sampling, span creation and the exporter.
pub struct Tracer {
    dispatch: tracing::Dispatch,
    provider: SdkTracerProvider,
    /// Tells the export task to send what is queued and stop.
    stop: tokio_util::sync::CancellationToken,
    export: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    export_timeout: Duration,
    /// Sample a root call when a random u64 is below this (`u64::MAX`: always).
    threshold: u64,
    metrics: Arc<SidecarMetrics>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("threshold", &self.threshold)
            .finish_non_exhaustive()
    }
}

impl Tracer {
    /// Builds the exporter (connecting lazily: no collector is needed to
    /// start) and its export task. Must run inside a Tokio runtime.
    pub fn start(cfg: &TraceConfig, metrics: Arc<SidecarMetrics>) -> Result<Self, TraceError> {
        if !(0.0..=1.0).contains(&cfg.sample_ratio) {
            return Err(TraceError::Ratio(cfg.sample_ratio));
        }
        use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
        let resource = Resource::builder()
            .with_service_name(cfg.service_name.clone())
            .build();
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(cfg.otlp_endpoint.clone())
            .with_timeout(cfg.export_timeout)
            .with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled())
            .build()
            .map_err(|e| TraceError::Exporter {
                endpoint: cfg.otlp_endpoint.clone(),
                reason: e.to_string(),
            })?;
        exporter.set_resource(&resource);
        let (tx, rx) = mpsc::channel(cfg.queue_size.max(1));
        let stop = tokio_util::sync::CancellationToken::new();
        let export = tokio::spawn(export_loop(
            rx,
            exporter,
            metrics.clone(),
            cfg.clone(),
            stop.clone(),
        ));
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
            .with_span_processor(QueueProcessor {
                tx,
                metrics: metrics.clone(),
            })
            .build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("meshwire-sidecar"))
            .with_location(false)
            .with_threads(false)
            .with_level(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false);
        // Only call spans, at INFO: every dispatcher's interest and level
        // hint count for every callsite in the process, so an unfiltered
        // layer here would switch on each `trace!`/`debug!` of hyper, h2 and
        // tonic, and the process would pay for them on every frame (the
        // benchmark showed it: CPU per call doubled at 1 % sampling).
        let only_calls =
            tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::INFO);
        let dispatch = tracing::Dispatch::new(
            tracing_subscriber::registry().with(layer.with_filter(only_calls)),
        );
        let threshold = if cfg.sample_ratio >= 1.0 {
            u64::MAX
        } else {
            (cfg.sample_ratio * u64::MAX as f64) as u64
        };
        Ok(Self {
            dispatch,
            provider,
            stop,
            export: std::sync::Mutex::new(Some(export)),
            export_timeout: cfg.export_timeout,
            threshold,
            metrics,
        })
    }

    /// The sampling decision for a call. Cheap when the answer is no: a
    /// header lookup or three and, for a root call, one random number.
    fn decide(&self, headers: &HeaderMap, may_start: bool) -> Option<Parent> {
        if let Some(tp) = headers.get(TRACEPARENT) {
            let b = tp.as_bytes();
            // `00-<32 hex>-<16 hex>-<2 hex flags>`: only the flags are read here.
            if b.len() >= 55 && (hex(b[54]).unwrap_or(0) & 1) == 0 {
                return None;
            }
            if let Some(p) = parse_traceparent(b, headers.get(TRACESTATE)) {
                return Some(Parent::Remote(p));
            }
        } else if let Some(v) = headers.get(B3) {
            match parse_b3_single(v.as_bytes()) {
                B3Decision::Sampled(p) => return Some(Parent::Remote(p)),
                B3Decision::NotSampled => return None,
                B3Decision::Undecided => {}
            }
        } else if headers.contains_key(B3_TRACE_ID) {
            match parse_b3_multi(headers) {
                B3Decision::Sampled(p) => return Some(Parent::Remote(p)),
                B3Decision::NotSampled => return None,
                B3Decision::Undecided => {}
            }
        }
        (may_start && (self.threshold == u64::MAX || fastrand::u64(..) < self.threshold))
            .then_some(Parent::Root)
    }

    /// A client span for an outbound call, if it is sampled.
    pub fn client(
        &self,
        headers: &HeaderMap,
        service: &str,
        path: &str,
        grpc: bool,
    ) -> Option<Box<CallTrace>> {
        let parent = self.decide(headers, true)?;
        Some(self.start_call(parent, Direction::Outbound, service, path, grpc))
    }

    /// A server span for an inbound call, only when the caller's context is
    /// sampled (the outbound sidecar took the sampling decision).
    pub fn server(&self, headers: &HeaderMap, path: &str, grpc: bool) -> Option<Box<CallTrace>> {
        let parent = self.decide(headers, false)?;
        Some(self.start_call(parent, Direction::Inbound, "", path, grpc))
    }

    fn start_call(
        &self,
        parent: Parent,
        direction: Direction,
        service: &str,
        path: &str,
        grpc: bool,
    ) -> Box<CallTrace> {
        self.metrics.calls_sampled[direction as usize].fetch_add(1, Ordering::Relaxed);
        let kind = match direction {
            Direction::Outbound => "client",
            Direction::Inbound => "server",
        };
        let rpc = if grpc { split_rpc_path(path) } else { None };
        let name = match rpc {
            Some((svc, method)) => format!("{svc}/{method}"),
            None => path.to_owned(),
        };
        let span = tracing::dispatcher::with_default(&self.dispatch, || {
            tracing::info_span!(
                target: TARGET,
                "call",
                otel.name = %name,
                otel.kind = kind,
                meshwire.direction = direction.as_str(),
            )
        });
        if let Parent::Remote(sc) = parent {
            let _ = span.set_parent(Context::new().with_remote_span_context(sc));
        }
        match rpc {
            Some((svc, method)) => {
                span.set_attribute("rpc.system", "grpc");
                span.set_attribute("rpc.service", svc.to_owned());
                span.set_attribute("rpc.method", method.to_owned());
            }
            None => span.set_attribute("url.path", path.to_owned()),
        }
        if !service.is_empty() {
            span.set_attribute("server.address", service.to_owned());
        }
        // Starts the span: its ids are known from here on.
        let sc = span.context().span().span_context().clone();
        let traceparent =
            HeaderValue::try_from(format!("00-{}-{}-01", sc.trace_id(), sc.span_id())).ok();
        Box::new(CallTrace {
            span,
            trace_id: sc.trace_id(),
            span_id: sc.span_id(),
            traceparent,
            server: direction == Direction::Inbound,
            done: false,
        })
    }

    /// Exports what is queued (one last batch, bounded by the export
    /// timeout) and stops the exporter; spans of later calls are dropped.
    pub async fn shutdown(&self) {
        let _ = self.provider.shutdown();
        self.stop.cancel();
        let task = self.export.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut task) = task
            && tokio::time::timeout(self.export_timeout * 2, &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

/// Where a sampled call's span hangs.
#[derive(Debug)]
enum Parent {
    /// A new trace.
    Root,
    /// The caller's span, from its headers.
    Remote(SpanContext),
}

// === one call's span ===

/// The span of one sampled call; it ends when this is finished or dropped.
pub struct CallTrace {
    span: tracing::Span,
    trace_id: TraceId,
    span_id: SpanId,
    traceparent: Option<HeaderValue>,
    server: bool,
    done: bool,
}

impl std::fmt::Debug for CallTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallTrace")
            .field("trace_id", &self.trace_id)
            .field("span_id", &self.span_id)
            .finish_non_exhaustive()
    }
}

impl CallTrace {
    /// Names this span as the parent in the headers going upstream:
    /// `traceparent` always, the B3 headers too when the caller used them.
    pub fn inject(&self, headers: &mut HeaderMap) {
        if let Some(tp) = &self.traceparent {
            headers.insert(TRACEPARENT, tp.clone());
        }
        if headers.contains_key(B3)
            && let Ok(v) = HeaderValue::try_from(format!("{}-{}-1", self.trace_id, self.span_id))
        {
            headers.insert(B3, v);
        }
        if headers.contains_key(B3_TRACE_ID) {
            let hv = |s: String| HeaderValue::try_from(s).ok();
            if let (Some(t), Some(s)) =
                (hv(self.trace_id.to_string()), hv(self.span_id.to_string()))
            {
                headers.insert(B3_TRACE_ID, t);
                headers.insert(B3_SPAN_ID, s);
                headers.remove(B3_PARENT_SPAN_ID);
                headers.insert(B3_SAMPLED, HeaderValue::from_static("1"));
            }
        }
    }

    /// A handle that records each attempt's endpoint on this span; the
    /// attempts run while the call (not the attempt) owns the span.
    pub fn attempts(&self) -> AttemptSpan {
        AttemptSpan(self.span.clone())
    }

    /// Records the call's gRPC status and ends the span.
    pub fn finish(&mut self, code: u8) {
        if self.done {
            return;
        }
        self.done = true;
        let code = code.min(16);
        self.span
            .set_attribute("rpc.grpc.status_code", i64::from(code));
        // OTel RPC conventions: a client span is an error for any non-OK code;
        // a server span only for the codes that mean the server failed.
        let error = if self.server {
            matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
        } else {
            code != 0
        };
        if error {
            self.span
                .set_status(Status::error(GRPC_CODES[usize::from(code)]));
        }
        // The span closes when the last handle drops.
        self.span = tracing::Span::none();
    }

    pub fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    pub fn span_id(&self) -> SpanId {
        self.span_id
    }
}

/// Records the endpoint each attempt of a traced call went to.
#[derive(Debug, Clone)]
pub struct AttemptSpan(tracing::Span);

impl AttemptSpan {
    /// The endpoint chosen for this attempt (1-based).
    pub fn endpoint(&self, addr: SocketAddr, attempt: usize) {
        let span = &self.0;
        span.set_attribute("network.peer.address", addr.ip().to_string());
        span.set_attribute("network.peer.port", i64::from(addr.port()));
        span.set_attribute("meshwire.endpoint", addr.to_string());
        span.set_attribute("meshwire.attempt", attempt as i64);
        if attempt > 1 {
            span.set_attribute("http.request.resend_count", attempt as i64 - 1);
        }
    }

    /// Attempt `attempt` (1-based) at `addr` did not answer the call; `why`
    /// says how (`connect`, `refused`, `retried`, `full`). One span event
    /// each, so a trace shows every endpoint a call tried.
    pub fn attempt_failed(&self, addr: SocketAddr, attempt: usize, why: &'static str) {
        use opentelemetry::KeyValue;
        self.0.add_event(
            "meshwire.attempt_failed",
            vec![
                KeyValue::new("meshwire.endpoint", addr.to_string()),
                KeyValue::new("meshwire.attempt", attempt as i64),
                KeyValue::new("meshwire.reason", why),
            ],
        );
    }
}

impl Drop for CallTrace {
    fn drop(&mut self) {
        // Dropped before an outcome: the caller went away.
        self.finish(1);
    }
}

// === header parsing ===

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn hex_u128(s: &[u8]) -> Option<u128> {
    if s.is_empty() || s.len() > 32 {
        return None;
    }
    s.iter()
        .try_fold(0u128, |acc, &c| Some(acc << 4 | u128::from(hex(c)?)))
}

fn ids(trace: &[u8], span: &[u8]) -> Option<(TraceId, SpanId)> {
    let t = hex_u128(trace)?;
    let s = u64::try_from(hex_u128(span)?).ok()?;
    (t != 0 && s != 0).then(|| (TraceId::from(t), SpanId::from(s)))
}

fn remote(trace: TraceId, span: SpanId, state: TraceState) -> SpanContext {
    SpanContext::new(trace, span, TraceFlags::SAMPLED, true, state)
}

/// A sampled W3C `traceparent` (version 00 layout; later versions are read
/// the same way, as the spec asks).
fn parse_traceparent(b: &[u8], tracestate: Option<&HeaderValue>) -> Option<SpanContext> {
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' || &b[..2] == b"ff" {
        return None;
    }
    if b.len() > 55 && b[55] != b'-' {
        return None;
    }
    let (t, s) = ids(&b[3..35], &b[36..52])?;
    let flags = hex(b[53])? << 4 | hex(b[54])?;
    if flags & 1 == 0 {
        return None;
    }
    let state = tracestate
        .and_then(|v| v.to_str().ok())
        .and_then(|v| TraceState::from_str(v).ok())
        .unwrap_or_default();
    Some(remote(t, s, state))
}

#[derive(Debug)]
enum B3Decision {
    Sampled(SpanContext),
    NotSampled,
    Undecided,
}

/// `b3: {TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]`, or just `0`/`1`/`d`.
fn parse_b3_single(b: &[u8]) -> B3Decision {
    match b {
        b"0" => return B3Decision::NotSampled,
        b"1" | b"d" => return B3Decision::Undecided,
        _ => {}
    }
    let mut parts = b.split(|&c| c == b'-');
    let (Some(t), Some(s)) = (parts.next(), parts.next()) else {
        return B3Decision::Undecided;
    };
    match parts.next() {
        Some(b"0") => B3Decision::NotSampled,
        Some(b"1" | b"d") => match ids(t, s) {
            Some((t, s)) => B3Decision::Sampled(remote(t, s, TraceState::default())),
            None => B3Decision::Undecided,
        },
        _ => B3Decision::Undecided,
    }
}

fn parse_b3_multi(h: &HeaderMap) -> B3Decision {
    let get = |n: &HeaderName| h.get(n).map(HeaderValue::as_bytes);
    let sampled = match (get(&B3_SAMPLED), get(&B3_FLAGS)) {
        (_, Some(b"1")) | (Some(b"1" | b"true"), _) => true,
        (Some(b"0" | b"false"), _) => return B3Decision::NotSampled,
        _ => false,
    };
    match (sampled, get(&B3_TRACE_ID), get(&B3_SPAN_ID)) {
        (true, Some(t), Some(s)) => match ids(t, s) {
            Some((t, s)) => B3Decision::Sampled(remote(t, s, TraceState::default())),
            None => B3Decision::Undecided,
        },
        _ => B3Decision::Undecided,
    }
}

/// `/pkg.Service/Method` -> (`pkg.Service`, `Method`).
fn split_rpc_path(path: &str) -> Option<(&str, &str)> {
    let (svc, method) = path.strip_prefix('/')?.split_once('/')?;
    (!svc.is_empty() && !method.is_empty() && !method.contains('/')).then_some((svc, method))
}

// === export ===

/// Hands ended spans to the export task without ever waiting: when the
/// bounded queue is full the span is dropped and counted.
#[derive(Debug)]
struct QueueProcessor {
    tx: mpsc::Sender<SpanData>,
    metrics: Arc<SidecarMetrics>,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        match self.tx.try_send(span) {
            Ok(()) => self.metrics.spans_queued.fetch_add(1, Ordering::Relaxed),
            Err(_) => self
                .metrics
                .spans_dropped_queue_full
                .fetch_add(1, Ordering::Relaxed),
        };
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Batches queued spans (up to `batch_size`, or what came within
/// `batch_interval`) and exports them one request at a time, each bounded by
/// `export_timeout`. Failed batches are dropped and counted, not retried.
/// Once `stop` fires, what is queued goes out without waiting and the task ends.
async fn export_loop(
    mut rx: mpsc::Receiver<SpanData>,
    exporter: opentelemetry_otlp::SpanExporter,
    metrics: Arc<SidecarMetrics>,
    cfg: TraceConfig,
    stop: tokio_util::sync::CancellationToken,
) {
    let size = cfg.batch_size.max(1);
    let mut failing = false;
    loop {
        let mut batch = Vec::with_capacity(size);
        let stopping = tokio::select! {
            n = rx.recv_many(&mut batch, size) => {
                if n == 0 {
                    return;
                }
                false
            }
            () = stop.cancelled() => true,
        };
        if stopping || stop.is_cancelled() {
            while batch.len() < size && rx.try_recv().map(|s| batch.push(s)).is_ok() {}
            if batch.is_empty() {
                return;
            }
        } else {
            let until = tokio::time::Instant::now() + cfg.batch_interval;
            while batch.len() < size {
                let want = size - batch.len();
                tokio::select! {
                    r = tokio::time::timeout_at(until, rx.recv_many(&mut batch, want)) => match r {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    },
                    () = stop.cancelled() => break,
                }
            }
        }
        let n = batch.len() as u64;
        match tokio::time::timeout(cfg.export_timeout, exporter.export(batch)).await {
            Ok(Ok(())) => {
                metrics.spans_exported.fetch_add(n, Ordering::Relaxed);
                if failing {
                    tracing::info!(collector = %cfg.otlp_endpoint, "span export works again");
                    failing = false;
                }
            }
            result => {
                metrics
                    .spans_dropped_export_failed
                    .fetch_add(n, Ordering::Relaxed);
                let error = match result {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("timed out after {:?}", cfg.export_timeout),
                };
                if !failing {
                    tracing::warn!(collector = %cfg.otlp_endpoint, %error, spans = n, "span export failed; dropping spans until it works");
                    failing = true;
                } else {
                    tracing::debug!(collector = %cfg.otlp_endpoint, %error, spans = n, "span export failed");
                }
            }
        }
    }
}

/// Attributes for tests of the parsing code.
#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn traceparent_sampled_and_not() {
        let sc = parse_traceparent(TP.as_bytes(), None).unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
        assert!(sc.is_sampled() && sc.is_remote());
        let unsampled = TP.replace("-01", "-00");
        assert!(parse_traceparent(unsampled.as_bytes(), None).is_none());
        assert!(
            parse_traceparent(
                b"00-00000000000000000000000000000000-b7ad6b7169203331-01",
                None
            )
            .is_none()
        );
        assert!(parse_traceparent(b"garbage", None).is_none());
        let state = HeaderValue::from_static("congo=t61rcWkgMzE");
        let sc = parse_traceparent(TP.as_bytes(), Some(&state)).unwrap();
        assert_eq!(sc.trace_state().header(), "congo=t61rcWkgMzE");
    }

    #[test]
    fn b3_single_and_multi() {
        let single = b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90";
        match parse_b3_single(single) {
            B3Decision::Sampled(sc) => {
                assert_eq!(
                    sc.trace_id().to_string(),
                    "80f198ee56343ba864fe8b2a57d3eff7"
                );
                assert_eq!(sc.span_id().to_string(), "e457b5a2e4d86bd1");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse_b3_single(b"0"), B3Decision::NotSampled));
        assert!(matches!(
            parse_b3_single(b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0"),
            B3Decision::NotSampled
        ));
        // A 64-bit trace id is accepted (left-padded).
        assert!(matches!(
            parse_b3_single(b"64fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
            B3Decision::Sampled(_)
        ));

        let mut h = HeaderMap::new();
        h.insert(
            B3_TRACE_ID,
            HeaderValue::from_static("463ac35c9f6413ad48485a3953bb6124"),
        );
        h.insert(B3_SPAN_ID, HeaderValue::from_static("a2fb4a1d1a96d312"));
        assert!(matches!(parse_b3_multi(&h), B3Decision::Undecided));
        h.insert(B3_SAMPLED, HeaderValue::from_static("1"));
        assert!(matches!(parse_b3_multi(&h), B3Decision::Sampled(_)));
        h.insert(B3_SAMPLED, HeaderValue::from_static("0"));
        assert!(matches!(parse_b3_multi(&h), B3Decision::NotSampled));
    }

    #[test]
    fn rpc_paths() {
        assert_eq!(
            split_rpc_path("/meshwire.example.v1.Echo/Unary"),
            Some(("meshwire.example.v1.Echo", "Unary"))
        );
        assert_eq!(split_rpc_path("/"), None);
        assert_eq!(split_rpc_path("/a/b/c"), None);
    }

    #[tokio::test]
    async fn the_tracer_switches_on_no_other_callsite() {
        let _t = Tracer::start(
            &TraceConfig::new("http://127.0.0.1:1", "test"),
            Arc::default(),
        )
        .unwrap();
        // Every dispatcher's level hint raises the process-wide maximum: had
        // the tracer no filter, each `debug!`/`trace!` of every crate would
        // be evaluated per call.
        assert!(
            tracing::level_filters::LevelFilter::current() <= tracing::Level::INFO,
            "{}",
            tracing::level_filters::LevelFilter::current()
        );
    }

    #[tokio::test]
    async fn ratio_zero_never_starts_but_honours_a_sampled_parent() {
        let mut cfg = TraceConfig::new("http://127.0.0.1:1", "test");
        cfg.sample_ratio = 0.0;
        let t = Tracer::start(&cfg, Arc::default()).unwrap();
        let mut h = HeaderMap::new();
        assert!(t.client(&h, "echo", "/a.B/C", true).is_none());
        h.insert(TRACEPARENT, HeaderValue::from_static(TP));
        let call = t
            .client(&h, "echo", "/a.B/C", true)
            .expect("sampled parent");
        assert_eq!(
            call.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        let mut out = HeaderMap::new();
        call.inject(&mut out);
        let tp = out[TRACEPARENT].to_str().unwrap().to_owned();
        assert!(
            tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
            "{tp}"
        );
        assert!(
            !tp.contains("b7ad6b7169203331"),
            "our span, not the caller's: {tp}"
        );
        assert!(tp.ends_with("-01"));
        // Inbound never starts a trace on its own.
        assert!(t.server(&HeaderMap::new(), "/a.B/C", true).is_none());
    }
}
