//! Endpoint health as the endpoints' own sidecars report it
//! (`Identity.ReportHealth`, on the TLS port), kept in the store and pushed
//! to every caller in EDS `health_status`.
//!
//! ```text
//! sidecar: health::AppHealth changes ─▶ HealthReport{service, address, healthy}
//!   ──mTLS (its certificate)──▶ identity_api::IdentityApi::report_health
//!   ─▶ HealthReports::open: the endpoint must exist and its pushed identity must be
//!      the certificate's SPIFFE ID (else PERMISSION_DENIED / NOT_FOUND)
//!   ─▶ Session: decide against the stored mark, write only on a change
//!      (registry::Registry::set_health → store → every replica)
//!   ─▶ publish: EDS UNHEALTHY (draining stays DRAINING); if every endpoint of a
//!      service that is not draining is unhealthy, none is marked (panic, below)
//! ```
//!
//! # Who owns a mark, and when it goes
//! A mark is an endpoint's `health` (healthy or not, and when it was
//! written). The rules, so that nothing stays marked down without a live
//! reporter and a control-plane restart marks nothing down:
//!
//! - **Writes only on a change.** A report equal to the stored mark writes
//!   nothing; the stream adopts the mark. An unhealthy mark is rewritten (its
//!   time only: the pushed resources do not change, so no xDS push follows)
//!   once it is older than a third of the TTL, while its stream is open.
//! - **Cleared when the reporter goes.** When the sidecar's stream ends from
//!   its side (closed, reset, connection lost), the mark it wrote or adopted
//!   is cleared: the endpoint goes back to "no report", which is what it was
//!   before it reported. The control plane stopping does not clear marks;
//!   the sidecars report again to the next replica (or the restarted one),
//!   which adopts them.
//! - **Unhealthy marks expire.** A mark nobody refreshes (its replica died
//!   with the stream) is cleared by any replica's sweeper once it is older
//!   than the TTL (`--health-ttl`, default 60 s). Healthy marks do not expire:
//!   they route like no mark at all.
//! - **No reporter flaps with another.** A stream re-asserts its health only
//!   when the mark is gone (cleared by a stale stream's end, or expired), and
//!   refreshes only a mark that says what it says, so two streams for the
//!   same endpoint (the old one not yet noticed dead) never write in turn.
//! - **Panic.** If every endpoint of a service that is not draining is
//!   unhealthy, they are all published as if unreported ([`published`]),
//!   as Envoy's panic threshold would: a refused call fails over or is
//!   answered quickly, while no endpoint at all fails every call. The
//!   admin API still shows them unhealthy.
//!
//! Times are wall-clock milliseconds from the writing replica; replicas'
//! clocks should agree to well within the TTL.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{Stream, StreamExt};
use meshwire_mesh::{Cluster, Endpoint, ReportedHealth};
use meshwire_proto::identity::v1 as pb;
use meshwire_xds::Snapshot;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::registry::{Registry, RegistryError};

/// How long an unhealthy mark lasts without a refresh (`--health-ttl`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

/// Acks waiting for a slow reader; more and the stream ends.
const ACK_BACKLOG: usize = 16;

/// A sidecar repeats its report at least this often (see identity.proto);
/// a stream silent for [`SILENCE_LIMIT`] counts as gone, so a reporter that
/// vanished without closing its connection does not keep its mark.
pub const REPEAT_EVERY: Duration = Duration::from_secs(10);
pub const SILENCE_LIMIT: Duration = Duration::from_secs(30);

/// Longest wait for a stream's first report.
const FIRST_REPORT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error(
        "health reports need the sidecar's certificate: present it as the TLS client certificate"
    )]
    NoIdentity,
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(
        "endpoint {address} of service {service:?} is served by {expected}, not by {caller} (the identity of this connection's certificate): a sidecar reports only for its own endpoints"
    )]
    NotYours {
        service: String,
        address: SocketAddr,
        expected: String,
        caller: String,
    },
    #[error(
        "endpoint {address} is not registered in service {service:?}: register it with `meshctl endpoint add {service} {address}`, or start the sidecar with --advertise set to the address it is registered with"
    )]
    UnknownEndpoint {
        service: String,
        address: SocketAddr,
    },
    #[error("service {0:?} not found")]
    UnknownService(String),
    #[error("{0}")]
    Registry(RegistryError),
}

impl From<RegistryError> for HealthError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::ServiceNotFound(s) => HealthError::UnknownService(s),
            RegistryError::EndpointNotFound { service, address } => {
                HealthError::UnknownEndpoint { service, address }
            }
            e => HealthError::Registry(e),
        }
    }
}

impl HealthError {
    pub fn status(&self) -> Status {
        let code = match self {
            HealthError::NoIdentity => Code::Unauthenticated,
            HealthError::Invalid { .. } => Code::InvalidArgument,
            HealthError::NotYours { .. } => Code::PermissionDenied,
            HealthError::UnknownEndpoint { .. } | HealthError::UnknownService(_) => Code::NotFound,
            // The store is unreachable or shutting down: the sidecar retries.
            HealthError::Registry(_) => Code::Unavailable,
        };
        crate::api::status::bounded(code, self)
    }

    /// The `reason` label of a refused report.
    fn reason(&self) -> &'static str {
        match self {
            HealthError::NoIdentity => "no_identity",
            HealthError::Invalid { .. } => "invalid",
            HealthError::NotYours { .. } => "permission_denied",
            HealthError::UnknownEndpoint { .. } | HealthError::UnknownService(_) => "not_found",
            HealthError::Registry(_) => "store",
        }
    }
}

// === decisions ===

/// `t` rounded down to whole milliseconds (what the store keeps).
pub fn whole_ms(t: SystemTime) -> SystemTime {
    let ms = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

fn age(h: &ReportedHealth, now: SystemTime) -> Duration {
    now.duration_since(h.at).unwrap_or_default()
}

/// What a stream does about the stored mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The mark already says it: nothing to write; the stream holds it.
    Adopt(SystemTime),
    /// Write this mark.
    Write(ReportedHealth),
    /// Not ours to touch (another reporter said otherwise more recently).
    Leave,
}

/// A report of `healthy` just arrived on a stream: written unless the mark
/// says the same and (for an unhealthy one) is still fresh.
pub fn on_report(
    stored: Option<ReportedHealth>,
    healthy: bool,
    now: SystemTime,
    ttl: Duration,
) -> Decision {
    match stored {
        Some(h) if h.healthy == healthy && (healthy || age(&h, now) < ttl / 3) => {
            Decision::Adopt(h.at)
        }
        _ => Decision::Write(ReportedHealth {
            healthy,
            at: whole_ms(now),
        }),
    }
}

/// The stream's periodic look (and after every configuration change):
/// re-assert a mark that is gone, refresh an unhealthy one that says what
/// we say, leave one that says otherwise.
pub fn on_check(
    stored: Option<ReportedHealth>,
    healthy: bool,
    now: SystemTime,
    ttl: Duration,
) -> Decision {
    match stored {
        None => Decision::Write(ReportedHealth {
            healthy,
            at: whole_ms(now),
        }),
        Some(h) if h.healthy != healthy => Decision::Leave,
        Some(h) => on_report(Some(h), healthy, now, ttl),
    }
}

/// The reporter went away: clear the mark if it is still the one it held.
pub fn on_close(stored: Option<ReportedHealth>, held: Option<SystemTime>) -> bool {
    matches!((stored, held), (Some(h), Some(at)) if h.at == at)
}

/// An unhealthy mark nobody refreshed for `ttl`.
pub fn expired(stored: Option<ReportedHealth>, now: SystemTime, ttl: Duration) -> bool {
    stored.is_some_and(|h| !h.healthy && age(&h, now) >= ttl)
}

/// The identity callers check for `e` (as pushed): its own, or the
/// service's default.
pub fn pushed_identity(service: &str, e: &Endpoint, trust_domain: &str) -> String {
    e.identity
        .clone()
        .unwrap_or_else(|| format!("spiffe://{trust_domain}/ns/default/sa/{service}"))
}

/// The all-unhealthy rule, applied to what is published: a service whose
/// every endpoint that is not draining is unhealthy has its marks left out,
/// so callers use them all rather than none. Returns the services so
/// treated.
pub fn published(snap: &mut Snapshot) -> Vec<String> {
    let mut panicked = Vec::new();
    for (name, c) in snap.clusters.iter_mut() {
        if all_unhealthy(c) {
            for e in &mut c.endpoints {
                e.health = None;
            }
            panicked.push(name.clone());
        }
    }
    panicked
}

fn all_unhealthy(c: &Cluster) -> bool {
    let mut serving = c.endpoints.iter().filter(|e| !e.draining).peekable();
    serving.peek().is_some() && serving.all(Endpoint::is_unhealthy)
}

// === metrics ===

type ResultLabel = [(&'static str, &'static str); 1];

/// The health reports' metrics (registered by [`crate::telemetry::CpMetrics`]).
#[derive(Debug, Default)]
pub struct HealthMetrics {
    /// Reports accepted, by the health reported.
    reports: Family<ResultLabel, Counter>,
    /// Report streams refused or ended by an error, by reason.
    refused: Family<ResultLabel, Counter>,
    /// Marks written that changed an endpoint's health, by the new one.
    changes: Family<ResultLabel, Counter>,
    streams: Gauge,
    unhealthy: Gauge,
    /// Services published with every endpoint's mark left out.
    panicked: Gauge,
}

impl HealthMetrics {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        for h in ["healthy", "unhealthy"] {
            let _ = self.reports.get_or_create(&[("health", h)]);
        }
        for h in ["healthy", "unhealthy", "unknown"] {
            let _ = self.changes.get_or_create(&[("health", h)]);
        }
        r.register(
            "meshwire_cp_endpoint_health_reports",
            "Health reports accepted from sidecars, by the health reported",
            self.reports.clone(),
        );
        r.register(
            "meshwire_cp_endpoint_health_refused",
            "Health report streams refused, by reason (permission_denied, not_found, invalid, no_identity, store)",
            self.refused.clone(),
        );
        r.register(
            "meshwire_cp_endpoint_health_changes",
            "Endpoint health changes this replica wrote, by the new health (unknown: cleared or expired)",
            self.changes.clone(),
        );
        r.register(
            "meshwire_cp_endpoint_health_streams",
            "Open health report streams on this replica",
            self.streams.clone(),
        );
        r.register(
            "meshwire_cp_unhealthy_endpoints",
            "Endpoints whose sidecar reports them unhealthy",
            self.unhealthy.clone(),
        );
        r.register(
            "meshwire_cp_health_panic_services",
            "Services whose endpoints are all unhealthy, so published without their marks",
            self.panicked.clone(),
        );
    }

    /// After a publish: how many services the panic rule applied to.
    pub fn published(&self, panicked: usize) {
        self.panicked
            .set(i64::try_from(panicked).unwrap_or(i64::MAX));
    }

    /// At scrape time, from the registry (publishes do not show marks the
    /// panic rule left out).
    pub fn set_unhealthy(&self, n: usize) {
        self.unhealthy.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

fn label(h: Option<ReportedHealth>) -> &'static str {
    match h {
        None => "unknown",
        Some(h) if h.healthy => "healthy",
        Some(_) => "unhealthy",
    }
}

// === the service side ===

/// What `Identity.ReportHealth` needs: the registry and the rules above.
#[derive(Debug)]
pub struct HealthReports {
    registry: Arc<Registry>,
    trust_domain: String,
    ttl: Duration,
    metrics: Arc<crate::telemetry::CpMetrics>,
    shutdown: CancellationToken,
    streams: AtomicI64,
}

pub type AckStream = Pin<Box<dyn Stream<Item = Result<pb::HealthReportAck, Status>> + Send>>;

/// One endpoint a stream reports for, checked.
struct Target {
    service: String,
    address: SocketAddr,
    caller: String,
}

impl HealthReports {
    pub fn new(
        registry: Arc<Registry>,
        trust_domain: String,
        ttl: Duration,
        metrics: Arc<crate::telemetry::CpMetrics>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            registry,
            trust_domain,
            ttl,
            metrics,
            shutdown,
            streams: AtomicI64::new(0),
        })
    }

    fn refused(&self, e: HealthError) -> Status {
        self.metrics
            .health
            .refused
            .get_or_create(&[("reason", e.reason())])
            .inc();
        e.status()
    }

    /// The endpoint `r` names, if `caller` may speak for it.
    fn check(&self, caller: &str, r: &pb::HealthReport) -> Result<Target, HealthError> {
        crate::registry::check_service_name("service", &r.service).map_err(|e| {
            HealthError::Invalid {
                field: "service",
                reason: e.reason.clone(),
            }
        })?;
        let address: SocketAddr = r.address.parse().map_err(|_| HealthError::Invalid {
            field: "address",
            reason: format!("{:?} is not ip:port", r.address),
        })?;
        let t = Target {
            service: r.service.clone(),
            address,
            caller: caller.to_owned(),
        };
        self.owned(&t)?;
        Ok(t)
    }

    /// The endpoint now, if it still exists and is still the caller's.
    fn owned(&self, t: &Target) -> Result<Endpoint, HealthError> {
        let (_, e) = self.registry.endpoint(&t.service, t.address)?;
        let expected = pushed_identity(&t.service, &e, &self.trust_domain);
        if expected != t.caller {
            return Err(HealthError::NotYours {
                service: t.service.clone(),
                address: t.address,
                expected,
                caller: t.caller.clone(),
            });
        }
        Ok(e)
    }

    /// Writes `h` if the mark is still what `decide` saw (re-decided under
    /// the registry's writer lock), logging and counting a change.
    async fn write(
        &self,
        t: &Target,
        decide: impl Fn(Option<ReportedHealth>) -> Option<Option<ReportedHealth>>
        + Send
        + Sync
        + 'static,
        why: &'static str,
    ) -> Result<(u64, Option<ReportedHealth>), HealthError> {
        let (version, before, after) = self
            .registry
            .set_health(&t.service, t.address, decide)
            .await?;
        if before != after {
            self.note_change(&t.service, t.address, before, after, version, why);
        }
        Ok((version, after))
    }

    fn note_change(
        &self,
        service: &str,
        address: SocketAddr,
        before: Option<ReportedHealth>,
        after: Option<ReportedHealth>,
        version: u64,
        why: &'static str,
    ) {
        let (from, to) = (label(before), label(after));
        if from == to {
            // A refresh: same health, a newer time.
            tracing::debug!(%service, %address, health = to, version, "endpoint health refreshed");
            return;
        }
        self.metrics
            .health
            .changes
            .get_or_create(&[("health", to)])
            .inc();
        tracing::info!(%service, %address, health = to, previous = from, version, why, "endpoint health changed");
    }

    /// Opens a report stream: the first report is checked and applied
    /// before the call is answered (so a refusal is the call's status),
    /// then a task follows the stream until either side ends it.
    pub async fn open(
        self: &Arc<Self>,
        caller: Option<String>,
        remote: SocketAddr,
        mut reports: impl Stream<Item = Result<pb::HealthReport, Status>> + Send + Unpin + 'static,
    ) -> Result<AckStream, Status> {
        let Some(caller) = caller else {
            return Err(self.refused(HealthError::NoIdentity));
        };
        let first = match tokio::time::timeout(FIRST_REPORT, reports.next()).await {
            Ok(Some(Ok(r))) => r,
            Ok(Some(Err(s))) => return Err(s),
            Ok(None) | Err(_) => {
                return Err(Status::invalid_argument(
                    "the first report must come with the call",
                ));
            }
        };
        let target = self.check(&caller, &first).map_err(|e| {
            tracing::warn!(%remote, caller = %caller, service = %first.service, address = %first.address, error = %e, "health report refused");
            self.refused(e)
        })?;
        let mut session = Session {
            reports: self.clone(),
            target,
            healthy: first.healthy,
            held: None,
        };
        let ack = session
            .report(first.healthy)
            .await
            .map_err(|e| self.refused(e))?;
        tracing::info!(%remote, caller = %caller, service = %session.target.service, address = %session.target.address, healthy = first.healthy, "health reports from the endpoint's sidecar");
        let (tx, rx) = mpsc::channel(ACK_BACKLOG);
        let _ = tx.try_send(Ok(ack));
        self.streams.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .health
            .streams
            .set(self.streams.load(Ordering::Relaxed));
        tokio::spawn(session.run(reports, tx, first));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    /// Every replica clears unhealthy marks nobody refreshed for the TTL,
    /// until `shutdown`.
    pub async fn sweep(self: Arc<Self>) {
        let every = (self.ttl / 4).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = SystemTime::now();
            let snap = self.registry.snapshot();
            let stale: Vec<(String, SocketAddr)> = snap
                .clusters
                .iter()
                .flat_map(|(name, c)| c.endpoints.iter().map(move |e| (name, e)))
                .filter(|(_, e)| expired(e.health, now, self.ttl))
                .map(|(name, e)| (name.clone(), e.address))
                .collect();
            for (service, address) in stale {
                let ttl = self.ttl;
                let t = Target {
                    service,
                    address,
                    caller: String::new(),
                };
                let r = self
                    .write(
                        &t,
                        move |h| expired(h, SystemTime::now(), ttl).then_some(None),
                        "expired",
                    )
                    .await;
                if let Err(e) = r {
                    tracing::debug!(service = %t.service, address = %t.address, error = %e, "expiring a health mark");
                }
            }
        }
    }
}

/// One open report stream: the endpoint, the health its sidecar reports
/// now, and the mark it wrote or adopted.
struct Session {
    reports: Arc<HealthReports>,
    target: Target,
    healthy: bool,
    held: Option<SystemTime>,
}

impl Session {
    fn ack(version: u64, healthy: bool) -> pb::HealthReportAck {
        pb::HealthReportAck { version, healthy }
    }

    /// A report from the sidecar (a change, or the periodic repeat).
    async fn report(&mut self, healthy: bool) -> Result<pb::HealthReportAck, HealthError> {
        let changed = self.held.is_none() || self.healthy != healthy;
        self.healthy = healthy;
        self.apply(false).await?;
        if changed {
            self.reports
                .metrics
                .health
                .reports
                .get_or_create(&[("health", if healthy { "healthy" } else { "unhealthy" })])
                .inc();
        }
        Ok(Self::ack(self.reports.registry.version(), healthy))
    }

    /// Decides against the stored mark (read without the writer lock), and
    /// writes only if needed.
    async fn apply(&mut self, check: bool) -> Result<(), HealthError> {
        let current = self.reports.owned(&self.target)?;
        let (healthy, ttl) = (self.healthy, self.reports.ttl);
        let rule = if check { on_check } else { on_report };
        match rule(current.health, healthy, SystemTime::now(), ttl) {
            Decision::Leave => {}
            Decision::Adopt(at) => self.held = Some(at),
            Decision::Write(_) => {
                let (_, after) = self
                    .reports
                    .write(
                        &self.target,
                        move |h| match rule(h, healthy, SystemTime::now(), ttl) {
                            Decision::Write(w) => Some(Some(w)),
                            _ => None,
                        },
                        if check { "reasserted" } else { "reported" },
                    )
                    .await?;
                if after.is_some_and(|h| h.healthy == healthy) {
                    self.held = after.map(|h| h.at);
                }
            }
        }
        Ok(())
    }

    async fn run(
        mut self,
        mut reports: impl Stream<Item = Result<pb::HealthReport, Status>> + Send + Unpin,
        tx: mpsc::Sender<Result<pb::HealthReportAck, Status>>,
        first: pb::HealthReport,
    ) {
        let shutdown = self.reports.shutdown.clone();
        let mut versions = self.reports.registry.versions();
        let every = (self.reports.ttl / 6)
            .min(REPEAT_EVERY)
            .max(Duration::from_millis(50));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = tokio::time::Instant::now();
        let ended_by_sidecar = loop {
            let r = tokio::select! {
                biased;
                () = shutdown.cancelled() => break false,
                () = tx.closed() => break true,
                m = reports.next() => match m {
                    Some(Ok(r)) if r.service != first.service || r.address != first.address => {
                        Err(HealthError::Invalid {
                            field: "address",
                            reason: format!(
                                "this stream reports for {} of {:?}; open another stream for {} of {:?}",
                                first.address, first.service, r.address, r.service
                            ),
                        })
                    }
                    Some(Ok(r)) => {
                        heard = tokio::time::Instant::now();
                        match self.report(r.healthy).await {
                            Ok(ack) => {
                                if tx.try_send(Ok(ack)).is_err() {
                                    break true;
                                }
                                Ok(())
                            }
                            Err(e) => Err(e),
                        }
                    }
                    Some(Err(_)) | None => break true,
                },
                r = versions.changed() => match r {
                    Ok(()) => self.apply(true).await,
                    Err(_) => break false,
                },
                _ = tick.tick() => {
                    if heard.elapsed() > SILENCE_LIMIT {
                        tracing::warn!(service = %self.target.service, address = %self.target.address, silent = ?heard.elapsed(), "health reporter silent; taking it as gone");
                        break true;
                    }
                    self.apply(true).await
                }
            };
            if let Err(e) = r {
                tracing::warn!(service = %self.target.service, address = %self.target.address, error = %e, "health report stream ended");
                let _ = tx.try_send(Err(self.reports.refused(e)));
                break true;
            }
        };
        self.reports.streams.fetch_sub(1, Ordering::Relaxed);
        self.reports
            .metrics
            .health
            .streams
            .set(self.reports.streams.load(Ordering::Relaxed));
        if !ended_by_sidecar {
            return;
        }
        // The reporter is gone: its mark goes with it.
        let held = self.held;
        let r = self
            .reports
            .write(
                &self.target,
                move |h| on_close(h, held).then_some(None),
                "reporter gone",
            )
            .await;
        if let Err(e) = r {
            tracing::debug!(service = %self.target.service, address = %self.target.address, error = %e, "clearing a health mark");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, Store};

    const TTL: Duration = Duration::from_secs(60);

    fn t(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
    }

    fn mark(healthy: bool, at: u64) -> Option<ReportedHealth> {
        Some(ReportedHealth { healthy, at: t(at) })
    }

    #[test]
    fn reports_write_only_on_a_change_and_refresh_unhealthy_marks() {
        // Nothing stored: written.
        assert_eq!(
            on_report(None, false, t(0), TTL),
            Decision::Write(mark(false, 0).unwrap())
        );
        // The same health, fresh: adopted, nothing written.
        assert_eq!(
            on_report(mark(false, 0), false, t(19), TTL),
            Decision::Adopt(t(0))
        );
        // Unhealthy and a third of the TTL old: refreshed.
        assert_eq!(
            on_report(mark(false, 0), false, t(20), TTL),
            Decision::Write(mark(false, 20).unwrap())
        );
        // Healthy marks never need a refresh.
        assert_eq!(
            on_report(mark(true, 0), true, t(3600), TTL),
            Decision::Adopt(t(0))
        );
        // A change is written.
        assert_eq!(
            on_report(mark(true, 0), false, t(1), TTL),
            Decision::Write(mark(false, 1).unwrap())
        );
        // Milliseconds are kept, finer is dropped (the store's precision).
        let now = t(5) + Duration::from_micros(1_234_567);
        let Decision::Write(w) = on_report(None, true, now, TTL) else {
            panic!()
        };
        assert_eq!(w.at, t(6) + Duration::from_millis(234));
    }

    #[test]
    fn checks_reassert_a_lost_mark_but_never_fight_another_reporter() {
        // Cleared by a stale stream's end or expired: written again.
        assert_eq!(
            on_check(None, false, t(0), TTL),
            Decision::Write(mark(false, 0).unwrap())
        );
        // Someone else says otherwise: left alone (no flapping).
        assert_eq!(on_check(mark(true, 0), false, t(1), TTL), Decision::Leave);
        assert_eq!(on_check(mark(false, 0), true, t(1), TTL), Decision::Leave);
        // It says what we say: adopted, refreshed when due.
        assert_eq!(
            on_check(mark(false, 0), false, t(1), TTL),
            Decision::Adopt(t(0))
        );
        assert_eq!(
            on_check(mark(false, 0), false, t(25), TTL),
            Decision::Write(mark(false, 25).unwrap())
        );
    }

    #[test]
    fn a_closing_stream_clears_only_the_mark_it_holds_and_unhealthy_marks_expire() {
        assert!(on_close(mark(false, 0), Some(t(0))));
        assert!(on_close(mark(true, 0), Some(t(0))));
        // Rewritten by another stream since: not ours.
        assert!(!on_close(mark(false, 5), Some(t(0))));
        assert!(!on_close(mark(false, 5), None));
        assert!(!on_close(None, Some(t(0))));

        assert!(!expired(mark(false, 0), t(59), TTL));
        assert!(expired(mark(false, 0), t(60), TTL));
        // Healthy marks and no mark never expire.
        assert!(!expired(mark(true, 0), t(3600), TTL));
        assert!(!expired(None, t(3600), TTL));
    }

    fn ep(port: u16, draining: bool, health: Option<ReportedHealth>) -> Endpoint {
        let mut e = Endpoint::new(SocketAddr::from(([10, 0, 0, 1], port)));
        e.draining = draining;
        e.health = health;
        e
    }

    #[test]
    fn when_every_serving_endpoint_is_unhealthy_all_are_published_unmarked() {
        let mut some = Cluster::new("some");
        some.endpoints = vec![ep(1, false, mark(false, 0)), ep(2, false, mark(true, 0))];
        let mut all = Cluster::new("all");
        // Draining ones do not serve: they neither save nor prevent the panic.
        all.endpoints = vec![
            ep(1, false, mark(false, 0)),
            ep(2, false, mark(false, 0)),
            ep(3, true, None),
        ];
        let empty = Cluster::new("empty");
        let mut draining = Cluster::new("draining");
        draining.endpoints = vec![ep(1, true, mark(false, 0))];
        let mut snap = Snapshot::new(7, [some, all, empty, draining]);
        let panicked = published(&mut snap);
        assert_eq!(panicked, vec!["all".to_owned()]);
        assert!(
            snap.clusters["all"]
                .endpoints
                .iter()
                .all(|e| e.health.is_none())
        );
        assert!(
            snap.clusters["some"].endpoints[0].is_unhealthy(),
            "one healthy left"
        );
        assert!(snap.clusters["draining"].endpoints[0].is_unhealthy());
        assert_eq!(snap.clusters["all"].endpoints.len(), 3, "none dropped");
    }

    #[tokio::test]
    async fn marks_go_through_the_store_and_only_changes_commit() {
        let store = Arc::new(MemoryStore::default());
        let reg = Registry::load(store.clone()).await.unwrap();
        reg.create_service(Cluster::new("s")).await.unwrap();
        let a = SocketAddr::from(([10, 0, 0, 1], 1));
        reg.add_endpoint("s", Endpoint::new(a)).await.unwrap();
        let m = mark(false, 0);
        let (v, before, after) = reg.set_health("s", a, move |_| Some(m)).await.unwrap();
        assert_eq!((v, before, after), (3, None, m));
        // The same mark again: nothing committed.
        let (v, _, _) = reg.set_health("s", a, move |_| Some(m)).await.unwrap();
        assert_eq!(v, 3);
        let (v, _, _) = reg.set_health("s", a, |_| None).await.unwrap();
        assert_eq!(v, 3);
        let loaded = store.load().await.unwrap();
        assert_eq!(loaded.clusters[0].endpoints[0].health, m, "in the store");
        // Weight changes keep the mark.
        reg.update_endpoint(
            "s",
            a,
            crate::registry::EndpointPatch {
                weight: Some(3),
                draining: None,
            },
        )
        .await
        .unwrap();
        assert_eq!(reg.endpoint("s", a).unwrap().1.health, m);
        let e = reg
            .set_health("s", SocketAddr::from(([10, 0, 0, 9], 1)), |_| Some(None))
            .await
            .unwrap_err();
        assert!(matches!(e, RegistryError::EndpointNotFound { .. }), "{e}");
    }
}
