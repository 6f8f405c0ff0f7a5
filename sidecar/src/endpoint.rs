//! One upstream endpoint as the sidecar tracks it: its outstanding-call count
//! (what the balancer reads), its counters and its connection pool.
//!
//! An `Endpoint` outlives config updates that keep its address, so its
//! connections and in-flight calls survive a weight change or a push.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::connect::Connector;
use crate::pool::{H2Settings, Pool};
use crate::telemetry::metrics::CallMetrics;

#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Calls assigned to this endpoint.
    pub requests: AtomicU64,
    /// Calls that finished with `grpc-status: 0` (or a non-error HTTP status).
    pub success: AtomicU64,
    /// Calls that finished any other way (error status, reset, sidecar error).
    pub failure: AtomicU64,
}

#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub zone: Option<String>,
    pub identity: Option<String>,
    /// Calls in flight plus calls waiting for a connection.
    outstanding: AtomicUsize,
    pub pool: Arc<Pool>,
    pub stats: EndpointStats,
    /// Prometheus counters of finished calls (codes, latency, bytes).
    pub metrics: CallMetrics,
}

impl Endpoint {
    pub fn new(
        spec: &meshwire_mesh::Endpoint,
        connector: Connector,
        connect_timeout: Duration,
        settings: Arc<H2Settings>,
    ) -> Arc<Self> {
        Arc::new(Self {
            addr: spec.address,
            zone: spec.zone.clone(),
            identity: spec.identity.clone(),
            outstanding: AtomicUsize::new(0),
            pool: Pool::new(spec.address, connector, connect_timeout, settings),
            stats: EndpointStats::default(),
            metrics: CallMetrics::default(),
        })
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Counts a call against this endpoint until the guard drops.
    pub fn start_call(self: &Arc<Self>) -> CallGuard {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        CallGuard {
            endpoint: self.clone(),
            ok: false,
            start: std::time::Instant::now(),
            code: None,
            sent: false,
            request_bytes: 0,
            response_bytes: 0,
        }
    }
}

/// Holds one unit of an endpoint's outstanding count for the whole call,
/// including the wait for a connection and the response body.
#[derive(Debug)]
pub struct CallGuard {
    endpoint: Arc<Endpoint>,
    ok: bool,
    // For the endpoint's metrics, recorded once when the guard drops.
    start: std::time::Instant,
    /// The call's gRPC status, once known.
    code: Option<u8>,
    /// The request reached the endpoint (a failed-over attempt is not a call).
    sent: bool,
    pub(crate) request_bytes: u64,
    pub(crate) response_bytes: u64,
}

impl CallGuard {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// Marks the call successful; a guard dropped without this counts as a failure.
    pub fn succeeded(&mut self) {
        self.ok = true;
    }

    /// The request went out to the endpoint: from now on it counts as a call.
    pub(crate) fn sent(&mut self, sent: bool) {
        self.sent = sent;
    }

    /// The call ended with gRPC status `code` (0 is success).
    pub(crate) fn finish(&mut self, code: u8) {
        self.code = Some(code);
        if code == 0 {
            self.ok = true;
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let ep = &self.endpoint;
        ep.outstanding.fetch_sub(1, Ordering::Relaxed);
        let counter = if self.ok {
            &ep.stats.success
        } else {
            &ep.stats.failure
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if self.sent {
            // No outcome: the caller went away (or the call's deadline dropped it).
            let code = self.code.unwrap_or(1);
            ep.metrics.record(
                code,
                self.start.elapsed(),
                self.request_bytes,
                self.response_bytes,
            );
        }
    }
}
