//! A small OTLP/gRPC trace collector: a real tonic server for
//! `opentelemetry.proto.collector.trace.v1.TraceService`, the service Jaeger
//! and the OpenTelemetry Collector take on port 4317.
//!
//! The end-to-end tests use it to see the spans sidecars export (no Jaeger
//! can run here); the benchmark uses it as a sink that only counts; and
//! `meshwire-otlp-sink` serves it in a container, standing in for Jaeger in
//! the compose test (keeping only the latest spans: it runs under load).
//!
//! ```no_run
//! # async fn f() {
//! let c = meshwire_examples::otlp::Collector::start(true).await.unwrap();
//! // sidecar: --otlp-endpoint {c.endpoint()}
//! let spans = c.wait_for(std::time::Duration::from_secs(5), |s| s.len() >= 2).await;
//! # }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

pub use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

/// One received span, with the `service.name` of the resource it came with.
#[derive(Debug, Clone)]
pub struct Span {
    pub service: String,
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    pub kind: SpanKind,
    pub attributes: Vec<KeyValue>,
    /// The span's events, in order: (name, attributes).
    pub events: Vec<(String, Vec<KeyValue>)>,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    pub status_message: String,
}

impl Span {
    /// The events named `name`, as JSON attribute objects.
    pub fn events_named(&self, name: &str) -> Vec<serde_json::Value> {
        self.events
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, a)| attributes_json(a))
            .collect()
    }

    fn attr(&self, key: &str) -> Option<&any_value::Value> {
        self.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.as_ref())
    }

    /// A string attribute.
    pub fn str_attr(&self, key: &str) -> Option<&str> {
        match self.attr(key)? {
            any_value::Value::StringValue(s) => Some(s),
            _ => None,
        }
    }

    /// An integer attribute.
    pub fn int_attr(&self, key: &str) -> Option<i64> {
        match self.attr(key)? {
            any_value::Value::IntValue(i) => Some(*i),
            _ => None,
        }
    }
}

impl Span {
    /// As JSON: `{trace_id, span_id, parent_span_id, name, service_name,
    /// kind, attributes: {key: value}, status_code, status_message}`, `kind`
    /// in lowercase (`client`, `server`, ...).
    pub fn to_json(&self) -> serde_json::Value {
        let kind = match self.kind {
            SpanKind::Unspecified => "unspecified",
            SpanKind::Internal => "internal",
            SpanKind::Server => "server",
            SpanKind::Client => "client",
            SpanKind::Producer => "producer",
            SpanKind::Consumer => "consumer",
        };
        serde_json::json!({
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "name": self.name,
            "service_name": self.service,
            "kind": kind,
            "attributes": attributes_json(&self.attributes),
            "events": self.events.iter().map(|(name, attrs)| serde_json::json!({
                "name": name,
                "attributes": attributes_json(attrs),
            })).collect::<Vec<_>>(),
            "status_code": self.status_code,
            "status_message": self.status_message,
        })
    }
}

fn attributes_json(kvs: &[KeyValue]) -> serde_json::Value {
    serde_json::Value::Object(
        kvs.iter()
            .map(|kv| (kv.key.clone(), value_json(kv.value.as_ref())))
            .collect(),
    )
}

fn value_json(v: Option<&AnyValue>) -> serde_json::Value {
    use serde_json::Value as J;
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => J::from(s.as_str()),
        Some(any_value::Value::BoolValue(b)) => J::from(*b),
        Some(any_value::Value::IntValue(i)) => J::from(*i),
        // NaN and the infinities have no JSON number: null.
        Some(any_value::Value::DoubleValue(d)) => J::from(*d),
        Some(any_value::Value::ArrayValue(a)) => {
            J::Array(a.values.iter().map(|v| value_json(Some(v))).collect())
        }
        Some(any_value::Value::KvlistValue(l)) => attributes_json(&l.values),
        Some(any_value::Value::BytesValue(b)) => J::from(hex(b)),
        // Unset, or a profiling-only string-table reference.
        _ => J::Null,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn string_value(v: Option<&AnyValue>) -> Option<&str> {
    match v?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s),
        _ => None,
    }
}

#[derive(Debug)]
struct State {
    /// Most spans kept, the oldest dropped first; 0: only count them.
    keep: usize,
    spans: watch::Sender<Vec<Span>>,
    received: AtomicU64,
    requests: AtomicU64,
}

#[derive(Debug, Clone)]
struct Service(Arc<State>);

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let req = req.into_inner();
        self.0.requests.fetch_add(1, Ordering::Relaxed);
        let mut got = Vec::new();
        let mut n = 0;
        for rs in req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| string_value(kv.value.as_ref()))
                .unwrap_or_default()
                .to_owned();
            for ss in rs.scope_spans {
                n += ss.spans.len() as u64;
                if self.0.keep == 0 {
                    continue;
                }
                for s in ss.spans {
                    let status = s.status.unwrap_or_default();
                    got.push(Span {
                        service: service.clone(),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        name: s.name,
                        kind: SpanKind::try_from(s.kind).unwrap_or(SpanKind::Unspecified),
                        attributes: s.attributes,
                        events: s
                            .events
                            .into_iter()
                            .map(|e| (e.name, e.attributes))
                            .collect(),
                        status_code: status.code,
                        status_message: status.message,
                    });
                }
            }
        }
        self.0.received.fetch_add(n, Ordering::Relaxed);
        if !got.is_empty() {
            let keep = self.0.keep;
            self.0.spans.send_modify(|v| {
                v.extend(got);
                if v.len() > keep {
                    v.drain(..v.len() - keep);
                }
            });
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A running collector; stops when dropped.
#[derive(Debug)]
pub struct Collector {
    pub addr: SocketAddr,
    state: Arc<State>,
    spans: watch::Receiver<Vec<Span>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Collector {
    /// Serves on `127.0.0.1:0`; `keep`: keep every span (else only count).
    pub async fn start(keep: bool) -> std::io::Result<Collector> {
        Self::serve(TcpListener::bind(("127.0.0.1", 0)).await?, keep)
    }

    /// Serves on `listener`.
    pub fn serve(listener: TcpListener, keep: bool) -> std::io::Result<Collector> {
        Self::serve_keeping(listener, if keep { usize::MAX } else { 0 })
    }

    /// Serves on `listener`, keeping the latest `max_spans` spans (0: only
    /// count them).
    pub(crate) fn serve_keeping(
        listener: TcpListener,
        max_spans: usize,
    ) -> std::io::Result<Collector> {
        let addr = listener.local_addr()?;
        let (tx, spans) = watch::channel(Vec::new());
        let state = Arc::new(State {
            keep: max_spans,
            spans: tx,
            received: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let svc = TraceServiceServer::new(Service(state.clone()));
        let task = tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, "OTLP collector stopped");
            }
        });
        Ok(Collector {
            addr,
            state,
            spans,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// What to give `--otlp-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Spans received so far (kept or not).
    pub fn received(&self) -> u64 {
        self.state.received.load(Ordering::Relaxed)
    }

    /// Export requests received so far.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// The spans kept so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.borrow().clone()
    }

    /// The latest `limit` kept spans that `filter` selects, oldest first
    /// (only those are cloned).
    pub fn latest(&self, limit: usize, filter: impl Fn(&Span) -> bool) -> Vec<Span> {
        let spans = self.spans.borrow();
        let mut out: Vec<Span> = spans
            .iter()
            .rev()
            .filter(|s| filter(s))
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// Waits until the spans kept satisfy `cond` and returns them; panics
    /// after `limit` with what arrived.
    pub async fn wait_for(&self, limit: Duration, cond: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let mut rx = self.spans.clone();
        match tokio::time::timeout(limit, rx.wait_for(|s| cond(s))).await {
            Ok(Ok(s)) => s.clone(),
            _ => panic!(
                "the collector did not get the expected spans within {limit:?}; it has:\n{:#?}",
                self.spans()
            ),
        }
    }

    /// Stops serving (the port is closed once this returns).
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        // Open exporter connections get a GOAWAY; one that lingers is cut.
        if let Some(mut t) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(2), &mut t)
                .await
                .is_err()
        {
            t.abort();
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span as OtlpSpan};

    fn export(service: &str, ids: std::ops::Range<u8>) -> ExportTraceServiceRequest {
        let spans = ids
            .map(|i| OtlpSpan {
                trace_id: vec![i; 16],
                span_id: vec![i; 8],
                name: format!("s{i}"),
                kind: SpanKind::Client as i32,
                attributes: vec![KeyValue {
                    key: "n".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::IntValue(i64::from(i))),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect();
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![KeyValue {
                        key: "service.name".into(),
                        value: Some(AnyValue {
                            value: Some(any_value::Value::StringValue(service.into())),
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[tokio::test]
    async fn keeps_the_latest_spans_and_counts_all() {
        let l = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let c = Collector::serve_keeping(l, 3).unwrap();
        let mut client = TraceServiceClient::connect(c.endpoint()).await.unwrap();
        client.export(export("a", 1..3)).await.unwrap();
        client.export(export("b", 3..6)).await.unwrap();
        assert_eq!((c.received(), c.requests()), (5, 2));
        let names: Vec<String> = c.spans().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["s3", "s4", "s5"], "the oldest went first");
        let last = c.latest(2, |s| s.service == "b");
        assert_eq!(last.len(), 2);
        assert_eq!((last[0].name.as_str(), last[1].name.as_str()), ("s4", "s5"));
        let j = last[1].to_json();
        assert_eq!(j["trace_id"], "05".repeat(16));
        assert_eq!(j["span_id"], "05".repeat(8));
        assert_eq!(j["parent_span_id"], "");
        assert_eq!(
            (&j["service_name"], &j["kind"]),
            (&"b".into(), &"client".into())
        );
        assert_eq!(j["attributes"]["n"], 5);
        c.stop().await;
    }
}
