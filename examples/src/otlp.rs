//! A small OTLP/gRPC trace collector: a real tonic server for
//! `opentelemetry.proto.collector.trace.v1.TraceService`, the service Jaeger
//! and the OpenTelemetry Collector take on port 4317.
//!
//! The end-to-end tests use it to see the spans sidecars export (no Jaeger
//! can run here); the benchmark uses it as a sink that only counts.
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
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    pub status_message: String,
}

impl Span {
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
    /// Keep the spans (tests) or only count them (benchmark).
    keep: bool,
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
                if !self.0.keep {
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
                        status_code: status.code,
                        status_message: status.message,
                    });
                }
            }
        }
        self.0.received.fetch_add(n, Ordering::Relaxed);
        if !got.is_empty() {
            self.0.spans.send_modify(|v| v.extend(got));
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
        let addr = listener.local_addr()?;
        let (tx, spans) = watch::channel(Vec::new());
        let state = Arc::new(State {
            keep,
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
