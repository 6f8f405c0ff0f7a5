//! The control plane's Prometheus metrics, served on its admin port
//! (`/metrics`, see [`crate::admin`]).
//!
//! - xDS: connected sidecars, streams opened, responses pushed, push latency,
//!   ACKs and NACKs, all by resource type (`cluster`, `endpoint`, `listener`,
//!   `route`, `other`).
//! - Config: the committed version, snapshots published.
//! - Admin API: calls by method and result (gRPC code name), latency of the
//!   unary ones.
//! - Endpoint health ([`crate::health`]): reports by health, refused report
//!   streams by reason, changes written, open report streams, unhealthy
//!   endpoints, services in panic.
//!
//! Label values come from fixed sets only (resource types, the methods of
//! `admin.proto`, the 17 gRPC codes), never from requests, so cardinality is
//! bounded whatever clients send.
//!
//! Push latency is measured per response from the moment its content could
//! first be sent on that stream: the publish of the snapshot it carries, or
//! the stream's start for the first responses of a new stream.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use meshwire_mesh::grpc::Code;
use meshwire_xds::server::StreamObserver;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::nodes::NodeRegistry;

/// The admin API's gRPC path prefix.
const API_PREFIX: &str = "/meshwire.admin.v1.MeshAdmin/";

/// The `method` label for paths that name no method of the API.
const UNKNOWN_METHOD: &str = "unknown";

/// The admin API's methods, read from the service definition itself so the
/// label set follows the API as it grows.
fn api_methods() -> Vec<&'static str> {
    include_str!("../../proto/meshwire/admin/v1/admin.proto")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .filter_map(|l| l.split('(').next())
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .collect()
}

/// The `type` label of an xDS type URL.
fn resource_type(type_url: &str) -> &'static str {
    match type_url.rsplit('/').next().unwrap_or_default() {
        "envoy.config.cluster.v3.Cluster" => "cluster",
        "envoy.config.endpoint.v3.ClusterLoadAssignment" => "endpoint",
        "envoy.config.listener.v3.Listener" => "listener",
        "envoy.config.route.v3.RouteConfiguration" => "route",
        _ => "other",
    }
}

type TypeLabel = [(&'static str, &'static str); 1];
type ApiLabel = [(&'static str, &'static str); 2];
type MethodLabel = [(&'static str, &'static str); 1];

fn latency_histogram() -> Histogram {
    // 0.5 ms to ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Snapshots whose publish time is remembered for push latency (a stream
/// pushing an older one than these is very far behind anyway).
const PUBLISHED_KEPT: usize = 64;

/// Every control-plane metric.
#[derive(Debug)]
pub struct CpMetrics {
    registry: Registry,
    nodes: Arc<NodeRegistry>,
    connected: Gauge,
    version: Gauge,
    /// The version of the snapshot the xDS streams serve now.
    published_version: Gauge,
    published: Counter,
    streams: Counter,
    pushes: Family<TypeLabel, Counter>,
    push_latency: Family<TypeLabel, Histogram, fn() -> Histogram>,
    acks: Family<TypeLabel, Counter>,
    nacks: Family<TypeLabel, Counter>,
    api_calls: Family<ApiLabel, Counter>,
    api_latency: Family<MethodLabel, Histogram, fn() -> Histogram>,
    methods: Vec<&'static str>,
    /// When each recent snapshot version was published.
    published_at: Mutex<VecDeque<(u64, Instant)>>,
    /// When each open xDS stream started.
    stream_start: Mutex<HashMap<u64, Instant>>,
    /// Endpoint health reports ([`crate::health`]).
    pub health: crate::health::HealthMetrics,
}

impl CpMetrics {
    pub fn new(nodes: Arc<NodeRegistry>) -> Self {
        let mut registry = Registry::default();
        let connected = Gauge::default();
        let version = Gauge::default();
        let published_version = Gauge::default();
        let published = Counter::default();
        let streams = Counter::default();
        let pushes = Family::<TypeLabel, Counter>::default();
        let push_latency: Family<TypeLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let acks = Family::<TypeLabel, Counter>::default();
        let nacks = Family::<TypeLabel, Counter>::default();
        let api_calls = Family::<ApiLabel, Counter>::default();
        let api_latency: Family<MethodLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "meshwire_cp_connected_sidecars",
            "xDS clients (sidecars, Envoys, proxyless gRPC) with an open stream",
            connected.clone(),
        );
        registry.register(
            "meshwire_cp_config_version",
            "The committed configuration version",
            version.clone(),
        );
        registry.register(
            "meshwire_cp_published_version",
            "The configuration version the xDS streams serve (trails the committed one by at most the coalescing window)",
            published_version.clone(),
        );
        registry.register(
            "meshwire_cp_snapshots_published",
            "Snapshots published to the xDS streams (bursts of changes fold into one)",
            published.clone(),
        );
        registry.register(
            "meshwire_cp_xds_streams",
            "xDS streams opened",
            streams.clone(),
        );
        registry.register(
            "meshwire_cp_xds_pushes",
            "xDS responses sent, by resource type",
            pushes.clone(),
        );
        registry.register(
            "meshwire_cp_xds_push_latency_seconds",
            "From a snapshot's publish (or the stream's start) to its response being sent, by resource type",
            push_latency.clone(),
        );
        registry.register(
            "meshwire_cp_xds_acks",
            "xDS responses ACKed, by resource type",
            acks.clone(),
        );
        registry.register(
            "meshwire_cp_xds_nacks",
            "xDS responses refused (NACK), by resource type",
            nacks.clone(),
        );
        registry.register(
            "meshwire_cp_api_requests",
            "Admin API calls by method and result (gRPC status code name)",
            api_calls.clone(),
        );
        registry.register(
            "meshwire_cp_api_request_duration_seconds",
            "Admin API call latency by method (unary calls)",
            api_latency.clone(),
        );
        let health = crate::health::HealthMetrics::default();
        health.register(&mut registry);
        // Known types start at zero, so rates work from the first scrape.
        for ty in ["cluster", "endpoint", "listener", "route"] {
            let l = [("type", ty)];
            let _ = pushes.get_or_create(&l);
            let _ = push_latency.get_or_create(&l);
            let _ = acks.get_or_create(&l);
            let _ = nacks.get_or_create(&l);
        }
        Self {
            registry,
            nodes,
            connected,
            version,
            published_version,
            published,
            streams,
            pushes,
            push_latency,
            acks,
            nacks,
            api_calls,
            api_latency,
            methods: api_methods(),
            published_at: Mutex::new(VecDeque::with_capacity(PUBLISHED_KEPT)),
            stream_start: Mutex::new(HashMap::new()),
            health,
        }
    }

    /// The `/metrics` page (OpenMetrics text).
    pub fn render(&self, version: u64) -> String {
        self.connected
            .set(i64::try_from(self.nodes.connected_count()).unwrap_or(i64::MAX));
        self.version.set(i64::try_from(version).unwrap_or(i64::MAX));
        let mut out = String::with_capacity(8 << 10);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// A snapshot of `version` is about to be published.
    pub fn snapshot_published(&self, version: u64) {
        self.published.inc();
        self.published_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        let mut p = lock(&self.published_at);
        if p.len() == PUBLISHED_KEPT {
            p.pop_front();
        }
        p.push_back((version, Instant::now()));
    }

    fn published_at(&self, version: &str) -> Option<Instant> {
        let v: u64 = version.parse().ok()?;
        lock(&self.published_at)
            .iter()
            .rev()
            .find(|(pv, _)| *pv == v)
            .map(|(_, at)| *at)
    }

    /// The `method` label of an API path.
    fn api_method(&self, path: &str) -> &'static str {
        path.strip_prefix(API_PREFIX)
            .and_then(|m| self.methods.iter().find(|k| **k == m))
            .copied()
            .unwrap_or(UNKNOWN_METHOD)
    }

    fn api_call(&self, method: &'static str, code: Code, took: Option<std::time::Duration>) {
        self.api_calls
            .get_or_create(&[("method", method), ("code", code.name())])
            .inc();
        if let Some(d) = took {
            self.api_latency
                .get_or_create(&[("method", method)])
                .observe(d.as_secs_f64());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// === xDS streams ===

/// What the ADS server reports: kept in the [`NodeRegistry`] (for `meshctl
/// status`) and counted here.
#[derive(Debug)]
pub struct XdsObserver {
    pub nodes: Arc<NodeRegistry>,
    pub metrics: Arc<CpMetrics>,
}

impl StreamObserver for XdsObserver {
    fn connected(&self, stream: u64, node_id: &str, service: &str, user_agent: &str) {
        self.nodes.connected(stream, node_id, service, user_agent);
        self.metrics.streams.inc();
        lock(&self.metrics.stream_start).insert(stream, Instant::now());
    }

    fn pushed(&self, stream: u64, type_url: &str, version: &str) {
        self.nodes.pushed(stream);
        let ty = [("type", resource_type(type_url))];
        self.metrics.pushes.get_or_create(&ty).inc();
        let started = lock(&self.metrics.stream_start).get(&stream).copied();
        let published = self.metrics.published_at(version);
        if let Some(from) = started.into_iter().chain(published).max() {
            self.metrics
                .push_latency
                .get_or_create(&ty)
                .observe(from.elapsed().as_secs_f64());
        }
    }

    fn acked(&self, stream: u64, type_url: &str, version: &str) {
        self.nodes.acked(stream, type_url, version);
        self.metrics
            .acks
            .get_or_create(&[("type", resource_type(type_url))])
            .inc();
    }

    fn nacked(&self, stream: u64, type_url: &str, version: &str, error: &str) {
        self.nodes.nacked(stream, type_url, version, error);
        self.metrics
            .nacks
            .get_or_create(&[("type", resource_type(type_url))])
            .inc();
    }

    fn disconnected(&self, stream: u64) {
        self.nodes.disconnected(stream);
        lock(&self.metrics.stream_start).remove(&stream);
    }
}

// === admin API calls ===

/// Wraps the admin API's gRPC service to count every call by method and
/// result. The result is the `grpc-status` of a trailers-only response, else
/// that of the trailers; a call whose response is dropped before its end
/// counts as `CANCELLED`.
#[derive(Debug, Clone)]
pub struct CountApiCalls<S> {
    inner: S,
    metrics: Arc<CpMetrics>,
}

impl<S> CountApiCalls<S> {
    pub fn new(inner: S, metrics: Arc<CpMetrics>) -> Self {
        Self { inner, metrics }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for CountApiCalls<S> {
    const NAME: &'static str = S::NAME;
}

fn status_of(headers: &http::HeaderMap) -> Option<Code> {
    Some(Code::from_bytes(headers.get("grpc-status")?.as_bytes()))
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<tonic::body::Body>> for CountApiCalls<S>
where
    S: tower_service::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<B>,
            Error = Infallible,
        > + Send,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let method = self.metrics.api_method(req.uri().path());
        let call = Call {
            metrics: self.metrics.clone(),
            method,
            start: Instant::now(),
            // A stream's lifetime is no latency.
            unary: method != "Watch",
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            if let Some(code) = status_of(resp.headers()) {
                call.finish(code);
                return Ok(resp.map(tonic::body::Body::new));
            }
            Ok(resp.map(|inner| {
                tonic::body::Body::new(CountedBody {
                    inner,
                    call: Some(call),
                })
            }))
        })
    }
}

#[derive(Debug)]
struct Call {
    metrics: Arc<CpMetrics>,
    method: &'static str,
    start: Instant,
    unary: bool,
}

impl Call {
    fn finish(self, code: Code) {
        let took = self.unary.then(|| self.start.elapsed());
        self.metrics.api_call(self.method, code, took);
    }
}

pin_project_lite::pin_project! {
    /// A response body that reports the call's status when its trailers pass.
    struct CountedBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }

    impl<B> PinnedDrop for CountedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(c) = this.project().call.take() {
                c.finish(Code::Cancelled);
            }
        }
    }
}

impl<B: Body<Data = Bytes>> Body for CountedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let r = this.inner.poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(code) = f
                    .trailers_ref()
                    .map(|t| status_of(t).unwrap_or(Code::Unknown))
                    && let Some(c) = this.call.take()
                {
                    c.finish(code);
                }
            }
            // A body that ends without a status, or fails, is no success.
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                if let Some(c) = this.call.take() {
                    c.finish(Code::Unknown);
                }
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_fixed_sets() {
        let m = CpMetrics::new(Arc::default());
        for known in ["CreateService", "AddEndpoint", "Watch", "Status"] {
            assert_eq!(m.api_method(&format!("{API_PREFIX}{known}")), known);
        }
        for other in [
            "/meshwire.admin.v1.MeshAdmin/NoSuch",
            "/other.Service/CreateService",
            "/",
        ] {
            assert_eq!(m.api_method(other), UNKNOWN_METHOD, "{other}");
        }
        assert_eq!(
            resource_type("type.googleapis.com/envoy.config.cluster.v3.Cluster"),
            "cluster"
        );
        assert_eq!(
            resource_type("type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"),
            "endpoint"
        );
        assert_eq!(resource_type("type.googleapis.com/x.Y"), "other");
    }

    #[test]
    fn push_latency_starts_at_the_later_of_publish_and_stream_start() {
        let nodes = Arc::new(NodeRegistry::default());
        let metrics = Arc::new(CpMetrics::new(nodes.clone()));
        let obs = XdsObserver {
            nodes,
            metrics: metrics.clone(),
        };
        metrics.snapshot_published(7);
        obs.connected(1, "n1", "svc", "test");
        obs.pushed(
            1,
            "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "7",
        );
        obs.nacked(
            1,
            "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "7",
            "no",
        );
        let text = metrics.render(7);
        assert!(
            text.contains("meshwire_cp_xds_pushes_total{type=\"cluster\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("meshwire_cp_xds_push_latency_seconds_count{type=\"cluster\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("meshwire_cp_xds_nacks_total{type=\"cluster\"} 1"),
            "{text}"
        );
        assert!(text.contains("meshwire_cp_connected_sidecars 1"), "{text}");
        assert!(text.contains("meshwire_cp_config_version 7"), "{text}");
        obs.disconnected(1);
        assert!(
            metrics
                .render(7)
                .contains("meshwire_cp_connected_sidecars 0")
        );
    }
}
