//! One upstream endpoint as the sidecar tracks it: its outstanding-call count
//! (what the balancer reads), its counters and its connection pool.
//!
//! An `Endpoint` outlives config updates that keep its address, so its
//! connections and in-flight calls survive a weight change or a push.
//!
//! A call's outcome is counted once, here ([`EndpointStats`]), when its
//! [`CallGuard`] drops; `/clusters` and `/metrics` both read these counters,
//! and the outlier detector ([`crate::outlier`]) gets the same outcome.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::connect::Connector;
use crate::outlier::{ClusterHealth, Outcome, Outlier};
use crate::pool::{H2Settings, Pool};
use crate::telemetry::histogram::LatencyHistogram;

/// gRPC status codes counted per endpoint (0..=16).
const CODES: usize = 17;

/// The `class` label of `meshwire_http_responses_total`, indexed by the
/// status's first digit minus one.
pub const HTTP_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// What the calls to one endpoint did.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Times the balancer chose this endpoint (every attempt, failed-over ones too).
    pub picks: AtomicU64,
    /// Calls that reached the endpoint, by final gRPC status code (plain HTTP
    /// calls mapped to a code as gRPC clients do).
    codes: [AtomicU64; CODES],
    /// From the pick to the end of the response body.
    pub latency: LatencyHistogram,
    /// Request body bytes sent to the endpoint.
    pub request_bytes: AtomicU64,
    /// Response body bytes received from it.
    pub response_bytes: AtomicU64,
    /// Plain HTTP calls (not gRPC) by the response's status class
    /// ([`HTTP_CLASSES`]); counted beside `codes`, which they leave as they are.
    http_classes: [AtomicU64; HTTP_CLASSES.len()],
}

impl EndpointStats {
    fn record(&self, code: u8, took: Duration, request_bytes: u64, response_bytes: u64) {
        let i = usize::from(code).min(CODES - 1);
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

    /// Finished plain HTTP calls whose response status was in class `i`
    /// (an index of [`HTTP_CLASSES`]).
    pub fn http_responses(&self, i: usize) -> u64 {
        self.http_classes
            .get(i)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Finished calls with `grpc-status: 0` (or a non-error HTTP status).
    pub fn succeeded(&self) -> u64 {
        self.calls_with(0)
    }

    /// Finished calls with any other status (error status, reset, sidecar error).
    pub fn failed(&self) -> u64 {
        self.codes[1..]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
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
    /// Ejection state, fed by every call's outcome.
    pub outlier: Outlier,
    /// What its cluster's endpoints share (settings, how many are ejected).
    pub health: Arc<ClusterHealth>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.outlier.leave(&self.health);
    }
}

impl Endpoint {
    pub fn new(
        spec: &meshwire_mesh::Endpoint,
        connector: Connector,
        connect_timeout: Duration,
        settings: Arc<H2Settings>,
        health: Arc<ClusterHealth>,
    ) -> Arc<Self> {
        Arc::new(Self {
            addr: spec.address,
            zone: spec.zone.clone(),
            identity: spec.identity.clone(),
            outstanding: AtomicUsize::new(0),
            pool: Pool::new(
                spec.address,
                connector,
                connect_timeout,
                settings,
                health.change_counter(),
            ),
            stats: EndpointStats::default(),
            outlier: Outlier::default(),
            health,
        })
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Counts a call against this endpoint until the guard drops.
    pub fn start_call(self: &Arc<Self>) -> CallGuard {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        self.guard()
    }

    /// [`Endpoint::start_call`] unless `max` calls are outstanding already
    /// (0: no limit). Exact: the count is taken in one compare-and-swap, so
    /// callers racing for the last place cannot both get it.
    pub fn try_start_call(self: &Arc<Self>, max: usize) -> Option<CallGuard> {
        if max == 0 {
            return Some(self.start_call());
        }
        self.outstanding
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(self.guard())
    }

    /// The guard for one outstanding unit already counted.
    fn guard(self: &Arc<Self>) -> CallGuard {
        self.stats.picks.fetch_add(1, Ordering::Relaxed);
        CallGuard {
            endpoint: self.clone(),
            start: std::time::Instant::now(),
            code: None,
            http_class: 0,
            sent: false,
            not_processed: false,
            refused: false,
            no_verdict: false,
            timed_out: false,
            hold: None,
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
    // For the endpoint's counters, recorded once when the guard drops.
    start: std::time::Instant,
    /// The call's gRPC status, once known.
    code: Option<u8>,
    /// A plain HTTP call's response status class: 1 for 1xx … 5 for 5xx, 0
    /// for none (gRPC, or no response).
    http_class: u8,
    /// The request reached the endpoint (a failed-over attempt is not a call).
    sent: bool,
    /// The attempt failed without reaching an app (connect failure, refused).
    not_processed: bool,
    /// The peer sidecar turned the stream away unprocessed (REFUSED_STREAM,
    /// GOAWAY): it is up, its app is not taking calls right now.
    refused: bool,
    /// The outcome says nothing about the endpoint (the call's own deadline).
    no_verdict: bool,
    /// The per-try timeout fired: a failure of this endpoint.
    timed_out: bool,
    /// A circuit breaker's place, freed with the call ([`crate::limits`]).
    hold: Option<crate::limits::Hold>,
    pub(crate) request_bytes: u64,
    pub(crate) response_bytes: u64,
}

impl CallGuard {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The request went out to the endpoint: from now on it counts as a call.
    pub(crate) fn sent(&mut self, sent: bool) {
        self.sent = sent;
    }

    /// The call ended with gRPC status `code` (0 is success).
    pub(crate) fn finish(&mut self, code: u8) {
        self.code = Some(code);
    }

    /// A plain HTTP call got a response with `status` from the endpoint:
    /// counted by status class when the call ends (gRPC calls never call this).
    pub(crate) fn http_status(&mut self, status: http::StatusCode) {
        self.http_class = (status.as_u16() / 100) as u8;
    }

    /// This attempt never reached an app (a failure of the endpoint's).
    pub(crate) fn not_processed(&mut self) {
        self.sent = false;
        self.not_processed = true;
    }

    /// Keeps `hold` until the call ends.
    pub(crate) fn hold(&mut self, hold: crate::limits::Hold) {
        self.hold = Some(hold);
    }

    /// The peer sidecar refused this attempt unprocessed.
    pub(crate) fn refused(&mut self) {
        self.sent = false;
        self.refused = true;
    }

    /// The caller's deadline ended the call: no verdict on the endpoint.
    /// The per-try timeout fired before the response started.
    pub(crate) fn timed_out(&mut self) {
        self.timed_out = true;
        self.code = Some(meshwire_mesh::grpc::Code::DeadlineExceeded as u8);
    }

    pub(crate) fn no_verdict(&mut self) {
        self.no_verdict = true;
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let ep = &self.endpoint;
        ep.outstanding.fetch_sub(1, Ordering::Relaxed);
        let outcome = match (self.sent, self.code) {
            _ if self.no_verdict => Outcome::None,
            _ if self.timed_out => Outcome::TimedOut,
            (true, Some(code)) => Outcome::Status(code),
            (false, _) if self.refused => Outcome::Refused,
            (false, _) if self.not_processed => Outcome::NotProcessed,
            _ => Outcome::None,
        };
        ep.outlier.observe(&ep.health, outcome);
        if self.sent {
            // No outcome: the caller went away (or the call's deadline dropped it).
            let code = self.code.unwrap_or(1);
            ep.stats.record(
                code,
                self.start.elapsed(),
                self.request_bytes,
                self.response_bytes,
            );
            if let Some(c) = usize::from(self.http_class)
                .checked_sub(1)
                .and_then(|i| ep.stats.http_classes.get(i))
            {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
