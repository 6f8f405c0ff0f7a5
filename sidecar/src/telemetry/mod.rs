//! Observability of the sidecar: Prometheus metrics ([`metrics`]), call
//! tracing over OTLP ([`trace`]) and the log pipeline (text or JSON, with a
//! filter that `/logging` changes at run time).
//!
//! The data path sees one [`Telemetry`] per sidecar. Metrics are always on
//! and cost a few atomic adds per call (the counters live in each
//! `Endpoint`); tracing costs nothing when it is off and a header check or a
//! random number per call when a call is not sampled.

pub mod histogram;
pub mod metrics;
pub mod trace;

use std::sync::{Arc, Mutex};

use http::HeaderMap;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

pub use metrics::{Direction, SidecarMetrics};
pub use trace::{AttemptSpan, CallTrace, TraceConfig, TraceError, Tracer};

/// What the data path uses to count and trace calls.
#[derive(Debug, Default)]
pub struct Telemetry {
    pub metrics: Arc<SidecarMetrics>,
    /// `None`: tracing is off (no `--otlp-endpoint`).
    pub tracer: Option<Tracer>,
}

impl Telemetry {
    /// Starts the exporter when tracing is configured.
    pub fn start(trace: Option<&TraceConfig>) -> Result<Self, TraceError> {
        let metrics = Arc::new(SidecarMetrics::default());
        let tracer = trace
            .map(|cfg| Tracer::start(cfg, metrics.clone()))
            .transpose()?;
        Ok(Self { metrics, tracer })
    }

    /// The client span of an outbound call, if tracing is on and the call sampled.
    #[inline]
    pub fn client_span(
        &self,
        headers: &HeaderMap,
        service: &str,
        path: &str,
        grpc: bool,
    ) -> Option<Box<CallTrace>> {
        self.tracer.as_ref()?.client(headers, service, path, grpc)
    }

    /// The server span of an inbound call, if the caller's trace is sampled.
    #[inline]
    pub fn server_span(
        &self,
        headers: &HeaderMap,
        path: &str,
        grpc: bool,
    ) -> Option<Box<CallTrace>> {
        self.tracer.as_ref()?.server(headers, path, grpc)
    }
}

// === logs ===

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (fields, span context, level, target).
    Json,
}

#[derive(Debug, thiserror::Error)]
#[error("log filter {filter:?}: {reason}")]
pub struct LogFilterError {
    pub filter: String,
    pub reason: String,
}

/// The live log filter, changed by `POST /logging?level=...`.
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("current", &self.current())
            .finish_non_exhaustive()
    }
}

fn parse_filter(filter: &str) -> Result<EnvFilter, LogFilterError> {
    EnvFilter::try_new(filter).map_err(|e| LogFilterError {
        filter: filter.to_owned(),
        reason: e.to_string(),
    })
}

impl LogControl {
    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the filter (`info`, `meshwire_sidecar=debug,warn`, ...).
    pub fn set(&self, filter: &str) -> Result<(), LogFilterError> {
        let f = parse_filter(filter)?;
        self.handle.reload(f).map_err(|e| LogFilterError {
            filter: filter.to_owned(),
            reason: e.to_string(),
        })?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = filter.to_owned();
        tracing::info!(filter, "log filter changed");
        Ok(())
    }
}

/// Installs the process's log subscriber: to stderr, as text or JSON, behind
/// a filter that can be replaced at run time. Fails on a bad filter or if a
/// subscriber is already installed.
pub fn init_logging(filter: &str, format: LogFormat) -> Result<Arc<LogControl>, LogFilterError> {
    let (layer, handle) = reload::Layer::new(parse_filter(filter)?);
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(layer))
        .try_init()
        .map_err(|e| LogFilterError {
            filter: filter.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(Arc::new(LogControl {
        handle,
        current: Mutex::new(filter.to_owned()),
    }))
}
