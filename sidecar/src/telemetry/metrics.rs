//! Prometheus metrics of the sidecar, served on the admin port's `/metrics`.
//!
//! Nothing here is looked up per call. Each [`Endpoint`] owns its counters
//! (`EndpointStats`: plain atomics, created with the endpoint), so a call does
//! a few relaxed atomic adds when it ends and nothing else: no label hashing,
//! no string formatting, no lock. Labels are produced only when `/metrics` is
//! scraped ([`SidecarCollector`]), from the endpoints an [`EndpointSource`]
//! lists (the sidecar hands it its live route table); an endpoint removed
//! from the config leaves the output with it, so label cardinality is bounded
//! by the configuration (clusters × endpoints × 17 gRPC codes, and 5 HTTP
//! status classes for plain HTTP calls), never by requests.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use meshwire_xds::client::ClientStatus;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::endpoint::Endpoint;

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
    /// Outbound attempts that never reached an app and went to another
    /// endpoint, by [`NotProcessed`] reason.
    transparent_retries: [AtomicU64; 2],
    /// Retries of calls an app failed, by [`RetryOutcome`].
    retries: [AtomicU64; 2],
    /// TCP connections of `tcp` services, by direction.
    pub tcp: crate::tcp::TcpMetrics,
}

/// What became of a call an app failed with a retryable status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    /// Sent again to another endpoint.
    Retried = 0,
    /// Not retried: the service's retry budget was spent.
    BudgetExhausted = 1,
}

/// Why an attempt certainly never reached an application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NotProcessed {
    /// No connection to the endpoint (connect, TLS or identity failure, backing off).
    Connect = 0,
    /// The peer turned the stream away: REFUSED_STREAM (its app is down or
    /// refused it), or a GOAWAY / closed connection before the call was taken.
    Refused = 1,
}

impl NotProcessed {
    fn as_str(self) -> &'static str {
        match self {
            NotProcessed::Connect => "connect",
            NotProcessed::Refused => "refused",
        }
    }
}

/// The `kind` label of `meshwire_sidecar_errors_total` (see `respond::ProxyError::kind`).
pub const ERROR_KINDS: [&str; 12] = [
    "unknown-service",
    "no-authority",
    "no-endpoints",
    "unreachable",
    "app-unreachable",
    "upstream-reset",
    "upstream-failed",
    "deadline-exceeded",
    "bad-request",
    "app-unhealthy",
    "overloaded",
    "rate-limited",
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
    /// An outbound attempt that never reached an app goes to another endpoint.
    pub fn retry(&self, outcome: RetryOutcome) {
        self.retries[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn transparent_retry(&self, why: NotProcessed) {
        self.transparent_retries[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn error(&self, direction: Direction, kind: &str) {
        if let Some(i) = ERROR_KINDS.iter().position(|k| *k == kind) {
            self.errors[direction as usize][i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

// === the collector ===

/// Where a scrape finds the outbound endpoints to report.
pub trait EndpointSource: Send + Sync + std::fmt::Debug {
    /// Calls `f` with every endpoint and the name of its cluster.
    fn for_each_endpoint(&self, f: &mut dyn FnMut(&Arc<str>, &Arc<Endpoint>));
}

/// Produces every sidecar metric at scrape time from the live state.
#[derive(Debug)]
pub struct SidecarCollector {
    pub outbound: Arc<dyn EndpointSource>,
    pub app: Option<Arc<Endpoint>>,
    pub app_health: Option<Arc<crate::health::AppHealth>>,
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
        let mut rows = Vec::new();
        self.outbound.for_each_endpoint(&mut |cluster, ep| {
            rows.push(Row {
                direction: Direction::Outbound.as_str(),
                cluster: cluster.clone(),
                endpoint: ep.addr.to_string(),
                ep: ep.clone(),
            });
        });
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
                let n = r.ep.stats.calls_with(code as u8);
                if n == 0 {
                    continue;
                }
                let [a, b, c] = r.labels();
                let l = [a, b, c, ("grpc_code", Cow::Borrowed(*name))];
                let mut f = m.encode_family(&l)?;
                counter(&mut f, n)?;
            }
        }
        // Plain HTTP calls by status class, beside (not instead of) the codes.
        let mut m = enc.encode_descriptor(
            "meshwire_http_responses",
            "Plain HTTP calls finished, by endpoint and response status class",
            None,
            MetricType::Counter,
        )?;
        for r in &rows {
            for (i, class) in crate::endpoint::HTTP_CLASSES.iter().enumerate() {
                let n = r.ep.stats.http_responses(i);
                if n == 0 {
                    continue;
                }
                let [a, b, c] = r.labels();
                let l = [a, b, c, ("class", Cow::Borrowed(*class))];
                counter(&mut m.encode_family(&l)?, n)?;
            }
        }
        family(
            enc,
            "meshwire_request_duration_seconds",
            "Call latency from the endpoint pick to the end of the response",
            MetricType::Histogram,
            &rows,
            |f, r| r.ep.stats.latency.encode(f),
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
            |f, r| counter(f, r.ep.stats.picks.load(Ordering::Relaxed)),
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
            "meshwire_outlier_ejections",
            "Times outlier detection ejected the endpoint (consecutive failures)",
            MetricType::Counter,
            &rows,
            |f, r| counter(f, r.ep.outlier.ejected_total.load(Ordering::Relaxed)),
            Row::labels,
        )?;
        family(
            enc,
            "meshwire_outlier_ejected",
            "1 while the endpoint is ejected (or its probe is in flight)",
            MetricType::Gauge,
            &rows,
            |f, r| f.encode_gauge(&u64::from(r.ep.outlier.is_out())),
            Row::labels,
        )?;
        family(
            enc,
            "meshwire_request_body_bytes",
            "Request body bytes sent to the endpoint",
            MetricType::Counter,
            &rows,
            |f, r| counter(f, r.ep.stats.request_bytes.load(Ordering::Relaxed)),
            Row::labels,
        )?;
        family(
            enc,
            "meshwire_response_body_bytes",
            "Response body bytes received from the endpoint",
            MetricType::Counter,
            &rows,
            |f, r| counter(f, r.ep.stats.response_bytes.load(Ordering::Relaxed)),
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
            "meshwire_transparent_retries",
            "Outbound attempts that never reached an app (the call goes on to another endpoint if one is left), by reason",
            None,
            MetricType::Counter,
        )?;
        for why in [NotProcessed::Connect, NotProcessed::Refused] {
            let l = [("reason", why.as_str())];
            counter(
                &mut m.encode_family(&l)?,
                s.transparent_retries[why as usize].load(Ordering::Relaxed),
            )?;
        }
        let mut m = enc.encode_descriptor(
            "meshwire_retries",
            "Calls an app failed with UNAVAILABLE before any reply: retried on another endpoint, or not because the retry budget was spent",
            None,
            MetricType::Counter,
        )?;
        for (outcome, i) in [("retried", 0), ("budget_exhausted", 1)] {
            let l = [("outcome", outcome)];
            counter(
                &mut m.encode_family(&l)?,
                s.retries[i].load(Ordering::Relaxed),
            )?;
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

    fn encode_app_health(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(h) = &self.app_health else {
            return Ok(());
        };
        let mut m = enc.encode_descriptor(
            "meshwire_app_healthy",
            "1 while the local app passes its health check (new calls are refused otherwise)",
            None,
            MetricType::Gauge,
        )?;
        m.encode_gauge(&u64::from(h.is_healthy()))?;
        let mut m = enc.encode_descriptor(
            "meshwire_app_health_changes",
            "Times the local app's health changed, either way",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, h.changes())
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
        self.encode_app_health(&mut enc)?;
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
