//! Prometheus metrics of the sidecar, served on the admin port's `/metrics`.
//!
//! Nothing here is looked up per call. Each [`Endpoint`] owns its
//! [`CallMetrics`] (plain atomics, created with the endpoint), so a call does a
//! few relaxed atomic adds when it ends and nothing else: no label hashing,
//! no string formatting, no lock. Labels are produced only when `/metrics` is
//! scraped, by walking the live route table ([`SidecarCollector`]); an
//! endpoint removed from the config leaves the output with it, so label
//! cardinality is bounded by the configuration (clusters × endpoints × 17
//! gRPC codes), never by requests.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use meshwire_xds::client::ClientStatus;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::endpoint::Endpoint;
use crate::outbound::route::Routes;

/// gRPC status code names, indexed by code (the `grpc_code` label).
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Upper bounds of the latency histogram's buckets, in microseconds
/// (100 µs to 10 s; a last bucket takes the rest).
const LATENCY_BOUNDS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// A lock-free histogram with fixed buckets (per-bucket counts; the encoder
/// makes them cumulative).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn encode(&self, enc: &mut MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut buckets = [(0.0, 0u64); LATENCY_BOUNDS_US.len() + 1];
        for (i, b) in buckets.iter_mut().enumerate() {
            let bound = LATENCY_BOUNDS_US
                .get(i)
                .map_or(f64::INFINITY, |&us| us as f64 / 1e6);
            *b = (bound, self.buckets[i].load(Ordering::Relaxed));
        }
        let count = buckets.iter().map(|b| b.1).sum();
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        enc.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

/// What the calls to one endpoint did; owned by the [`Endpoint`].
#[derive(Debug, Default)]
pub struct CallMetrics {
    /// Finished calls by gRPC status code (plain HTTP calls are mapped to a
    /// code as gRPC clients do).
    codes: [AtomicU64; 17],
    /// From the pick to the end of the response body.
    pub latency: LatencyHistogram,
    /// Request body bytes sent to the endpoint.
    pub request_bytes: AtomicU64,
    /// Response body bytes received from it.
    pub response_bytes: AtomicU64,
}

impl CallMetrics {
    /// Records one finished call.
    pub fn record(&self, code: u8, took: Duration, request_bytes: u64, response_bytes: u64) {
        let i = usize::from(code).min(16);
        self.codes[i].fetch_add(1, Ordering::Relaxed);
        self.latency.observe(took);
        if request_bytes > 0 {
            self.request_bytes
                .fetch_add(request_bytes, Ordering::Relaxed);
        }
        if response_bytes > 0 {
            self.response_bytes
                .fetch_add(response_bytes, Ordering::Relaxed);
        }
    }

    /// Finished calls with status `code`.
    pub fn calls_with(&self, code: u8) -> u64 {
        self.codes
            .get(usize::from(code))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// Sidecar-wide counters (not per endpoint).
#[derive(Debug, Default)]
pub struct SidecarMetrics {
    /// Errors the sidecar answered itself, by direction and kind.
    errors: [[AtomicU64; ERROR_KINDS.len()]; 2],
    /// Spans handed to the exporter queue.
    pub spans_queued: AtomicU64,
    /// Spans the collector accepted.
    pub spans_exported: AtomicU64,
    /// Spans dropped because the export queue was full (collector slow or down).
    pub spans_dropped_queue_full: AtomicU64,
    /// Spans dropped because their export failed or timed out.
    pub spans_dropped_export_failed: AtomicU64,
    /// Calls sampled for tracing, by direction.
    pub calls_sampled: [AtomicU64; 2],
    /// TCP connections of `tcp` services, by direction.
    pub tcp: crate::tcp::TcpMetrics,
}

/// The `kind` label of `meshwire_sidecar_errors_total` (see `respond::ProxyError::kind`).
pub const ERROR_KINDS: [&str; 9] = [
    "unknown-service",
    "no-authority",
    "no-endpoints",
    "unreachable",
    "app-unreachable",
    "upstream-reset",
    "upstream-failed",
    "deadline-exceeded",
    "bad-request",
];

/// Which side of the sidecar a call went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Direction {
    Outbound = 0,
    Inbound = 1,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

impl SidecarMetrics {
    pub fn error(&self, direction: Direction, kind: &str) {
        if let Some(i) = ERROR_KINDS.iter().position(|k| *k == kind) {
            self.errors[direction as usize][i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

// === the collector ===

/// Produces every sidecar metric at scrape time from the live state.
#[derive(Debug)]
pub struct SidecarCollector {
    pub routes: Arc<Routes>,
    pub app: Option<Arc<Endpoint>>,
    pub xds: Option<watch::Receiver<ClientStatus>>,
    pub sidecar: Arc<SidecarMetrics>,
}

/// One endpoint as a scrape sees it.
struct Row {
    direction: &'static str,
    cluster: Arc<str>,
    endpoint: String,
    ep: Arc<Endpoint>,
}

impl Row {
    fn labels(&self) -> [(&'static str, Cow<'_, str>); 3] {
        [
            ("direction", Cow::Borrowed(self.direction)),
            ("cluster", Cow::Borrowed(&*self.cluster)),
            ("endpoint", Cow::Borrowed(self.endpoint.as_str())),
        ]
    }
}

fn counter(enc: &mut MetricEncoder<'_>, v: u64) -> Result<(), std::fmt::Error> {
    enc.encode_counter::<NoLabelSet, u64, f64>(&v, None::<&Exemplar<NoLabelSet, f64>>)
}

/// One metric family: a descriptor, then one sample per label set.
fn family<'r, L, I>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    ty: MetricType,
    rows: I,
    mut value: impl FnMut(&mut MetricEncoder<'_>, &'r Row) -> Result<(), std::fmt::Error>,
    labels: impl Fn(&'r Row) -> L,
) -> Result<(), std::fmt::Error>
where
    L: prometheus_client::encoding::EncodeLabelSet,
    I: IntoIterator<Item = &'r Row>,
{
    let mut m = enc.encode_descriptor(name, help, None, ty)?;
    for r in rows {
        let l = labels(r);
        let mut f = m.encode_family(&l)?;
        value(&mut f, r)?;
    }
    Ok(())
}

impl SidecarCollector {
    fn rows(&self) -> Vec<Row> {
        let table = self.routes.load();
        let mut rows = Vec::new();
        for c in table.clusters() {
            for e in c.endpoints.load().entries() {
                rows.push(Row {
                    direction: Direction::Outbound.as_str(),
                    cluster: c.name.clone(),
                    endpoint: e.endpoint.addr.to_string(),
                    ep: e.endpoint.clone(),
                });
            }
        }
        rows.sort_by(|a, b| (&a.cluster, &a.endpoint).cmp(&(&b.cluster, &b.endpoint)));
        if let Some(app) = &self.app {
            rows.push(Row {
                direction: Direction::Inbound.as_str(),
                cluster: Arc::from("inbound"),
                endpoint: app.addr.to_string(),
                ep: app.clone(),
            });
        }
        rows
    }

    fn encode_endpoints(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let rows = self.rows();
        // Requests by code: only codes seen so far, so idle endpoints stay small.
        let mut m = enc.encode_descriptor(
            "meshwire_requests",
            "Calls finished, by endpoint and gRPC status code (plain HTTP mapped to a code)",
            None,
            MetricType::Counter,
        )?;
        for r in &rows {
            for (code, name) in GRPC_CODES.iter().enumerate() {
                let n = r.ep.metrics.calls_with(code as u8);
                if n == 0 {
                    continue;
                }
                let [a, b, c] = r.labels();
                let l = [a, b, c, ("grpc_code", Cow::Borrowed(*name))];
                let mut f = m.encode_family(&l)?;
                counter(&mut f, n)?;
            }
        }
        family(
            enc,
            "meshwire_request_duration_seconds",
            "Call latency from the endpoint pick to the end of the response",
            MetricType::Histogram,
            &rows,
            |f, r| r.ep.metrics.latency.encode(f),
            Row::labels,
        )?;
        family(
            enc,
            "meshwire_requests_in_flight",
            "Calls outstanding on the endpoint (including those waiting for a connection)",
            MetricType::Gauge,
            &rows,
            |f, r| f.encode_gauge(&(r.ep.outstanding() as u64)),
            Row::labels,
        )?;
        family(
            enc,
            "meshwire_lb_picks",
            "Times the balancer chose the endpoint (every attempt)",
            MetricType::Counter,
            &rows,
            |f, r| counter(f, r.ep.stats.requests.load(Ordering::Relaxed)),
            Row::labels,
        )?;
        family(
            enc,
            "meshwire_upstream_connections",
            "Open HTTP/2 connections to the endpoint",
            MetricType::Gauge,
            &rows,
            |f, r| f.encode_gauge(&(r.ep.pool.connection_count() as u64)),
            Row::labels,
        )?;
        family(
            enc,
            "meshwire_upstream_connects",
            "Connection attempts to the endpoint",
            MetricType::Counter,
            &rows,
            |f, r| counter(f, r.ep.pool.stats.connects.load(Ordering::Relaxed)),
            Row::labels,
        )?;
        family(
            enc,
            "meshwire_upstream_connect_errors",
            "Failed connection attempts to the endpoint",
            MetricType::Counter,
            &rows,
            |f, r| counter(f, r.ep.pool.stats.connect_errors.load(Ordering::Relaxed)),
            Row::labels,
        )?;
        family(
            enc,
            "meshwire_request_body_bytes",
            "Request body bytes sent to the endpoint",
            MetricType::Counter,
            &rows,
            |f, r| counter(f, r.ep.metrics.request_bytes.load(Ordering::Relaxed)),
            Row::labels,
        )?;
        family(
            enc,
            "meshwire_response_body_bytes",
            "Response body bytes received from the endpoint",
            MetricType::Counter,
            &rows,
            |f, r| counter(f, r.ep.metrics.response_bytes.load(Ordering::Relaxed)),
            Row::labels,
        )?;
        Ok(())
    }

    fn encode_sidecar(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = &self.sidecar;
        let mut m = enc.encode_descriptor(
            "meshwire_sidecar_errors",
            "Calls the sidecar answered with an error of its own, by kind",
            None,
            MetricType::Counter,
        )?;
        for d in [Direction::Outbound, Direction::Inbound] {
            for (i, kind) in ERROR_KINDS.iter().enumerate() {
                let n = s.errors[d as usize][i].load(Ordering::Relaxed);
                if n > 0 {
                    let l = [("direction", d.as_str()), ("kind", kind)];
                    counter(&mut m.encode_family(&l)?, n)?;
                }
            }
        }
        let t = &s.tcp;
        for (name, help, values, kind) in [
            (
                "meshwire_tcp_connections_opened",
                "TCP connections of tcp services carried, by direction",
                &t.opened,
                MetricType::Counter,
            ),
            (
                "meshwire_tcp_connections_failed",
                "TCP connections that could not be carried (no endpoint answered, refused)",
                &t.failed,
                MetricType::Counter,
            ),
            (
                "meshwire_tcp_sent_bytes",
                "Bytes from the connecting side towards the service, by direction",
                &t.bytes_up,
                MetricType::Counter,
            ),
            (
                "meshwire_tcp_received_bytes",
                "Bytes back to the connecting side, by direction",
                &t.bytes_down,
                MetricType::Counter,
            ),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, kind)?;
            for d in [Direction::Outbound, Direction::Inbound] {
                let l = [("direction", d.as_str())];
                counter(
                    &mut m.encode_family(&l)?,
                    values[d as usize].load(Ordering::Relaxed),
                )?;
            }
        }
        let mut m = enc.encode_descriptor(
            "meshwire_tcp_connections_active",
            "TCP connections of tcp services open now, by direction",
            None,
            MetricType::Gauge,
        )?;
        for d in [Direction::Outbound, Direction::Inbound] {
            let l = [("direction", d.as_str())];
            let v = t.active[d as usize].load(Ordering::Relaxed).max(0) as u64;
            m.encode_family(&l)?.encode_gauge(&v)?;
        }
        let mut m = enc.encode_descriptor(
            "meshwire_trace_calls_sampled",
            "Calls traced (a span was made), by direction",
            None,
            MetricType::Counter,
        )?;
        for d in [Direction::Outbound, Direction::Inbound] {
            let l = [("direction", d.as_str())];
            counter(
                &mut m.encode_family(&l)?,
                s.calls_sampled[d as usize].load(Ordering::Relaxed),
            )?;
        }
        let mut m = enc.encode_descriptor(
            "meshwire_trace_spans_exported",
            "Spans the OTLP collector accepted",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, s.spans_exported.load(Ordering::Relaxed))?;
        let mut m = enc.encode_descriptor(
            "meshwire_trace_spans_dropped",
            "Spans dropped instead of slowing calls: export queue full, or export failed",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in [
            ("queue_full", &s.spans_dropped_queue_full),
            ("export_failed", &s.spans_dropped_export_failed),
        ] {
            let l = [("reason", reason)];
            counter(&mut m.encode_family(&l)?, n.load(Ordering::Relaxed))?;
        }
        Ok(())
    }

    fn encode_xds(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(xds) = &self.xds else {
            return Ok(());
        };
        let s = xds.borrow().clone();
        let mut m = enc.encode_descriptor(
            "meshwire_xds_connected",
            "1 while the xDS stream to the control plane is up",
            None,
            MetricType::Gauge,
        )?;
        m.encode_gauge(&u64::from(s.connected))?;
        let mut m = enc.encode_descriptor(
            "meshwire_xds_acked_version",
            "The config version last applied and ACKed, by resource type (numeric versions only)",
            None,
            MetricType::Gauge,
        )?;
        for (ty, v) in [("cluster", &s.cds_version), ("endpoint", &s.eds_version)] {
            if let Some(v) = v.as_deref().and_then(|v| v.parse::<u64>().ok()) {
                let l = [("type", ty)];
                m.encode_family(&l)?.encode_gauge(&v)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "meshwire_xds_nacks",
            "Config updates refused (NACKed)",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, s.nacks)?;
        let mut m = enc.encode_descriptor(
            "meshwire_xds_streams",
            "xDS streams opened (reconnects included)",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, s.streams_opened)?;
        Ok(())
    }
}

impl Collector for SidecarCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.encode_endpoints(&mut enc)?;
        self.encode_sidecar(&mut enc)?;
        self.encode_xds(&mut enc)
    }
}

/// A registry holding `collector`, built once at start-up.
pub fn registry(collector: SidecarCollector) -> Registry {
    let mut reg = Registry::default();
    reg.register_collector(Box::new(collector));
    reg
}

/// The `/metrics` page: OpenMetrics text (Prometheus scrapes it as is).
pub fn render(reg: &Registry) -> String {
    let mut out = String::with_capacity(16 << 10);
    if prometheus_client::encoding::text::encode(&mut out, reg).is_err() {
        out.clear();
    }
    out
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_sum() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        assert_eq!(h.count(), 4);
        assert_eq!(h.buckets[0].load(Ordering::Relaxed), 2, "<= 100 µs");
        assert_eq!(h.buckets[5].load(Ordering::Relaxed), 1, "<= 5 ms");
        assert_eq!(h.buckets[16].load(Ordering::Relaxed), 1, "+Inf");
    }
}
