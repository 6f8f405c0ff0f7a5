//! The outbound route table: service name → cluster, swapped atomically on
//! every config change.
//!
//! Each update diffs endpoints by address: an endpoint that stays
//! keeps its [`Endpoint`] (connections, outstanding count, counters), so a
//! weight change or an unrelated push drops nothing in flight. Removed
//! endpoints leave the table; their connections close once the calls still
//! using them finish.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Authority;
use meshwire_mesh::{Cluster, HashSource, LbPolicy, ModelError, Protocol, Resilience, ZoneRouting};

use super::balance::{EndpointSet, Entry};
use crate::connect::Connector;
use crate::endpoint::Endpoint;
use crate::outlier::{ClusterHealth, OutlierSettings};
use crate::pool::H2Settings;
use crate::telemetry::metrics::EndpointSource;

/// One service as the outbound side runs it.
#[derive(Debug)]
pub struct ClusterState {
    pub name: Arc<str>,
    pub protocol: Protocol,
    pub lb: LbPolicy,
    /// Where calls' hash keys come from (consistent-hash policies only).
    pub hash_policy: Vec<HashSource>,
    /// Zone-aware routing as the service sets it (applies only when this
    /// sidecar knows its zone).
    pub zones: ZoneRouting,
    pub request_timeout: Option<Duration>,
    pub connect_timeout: Duration,
    /// Parsed once: the `:authority` to send upstream, if rewritten.
    pub authority: Option<Authority>,
    pub endpoints: ArcSwap<EndpointSet>,
    /// Outlier detection state shared by its endpoints; kept across updates.
    pub health: Arc<ClusterHealth>,
    /// Calls in flight to it (the circuit breaker's count); kept across updates.
    pub in_flight: Arc<crate::limits::InFlight>,
    /// The service's resilience settings as given (for the diff).
    resilience: Resilience,
    /// The same, resolved against this sidecar's defaults: what calls read.
    pub retry: RetrySettings,
    /// Circuit breaker: most calls in flight to the service (0: none).
    pub max_requests: usize,
    /// Most calls in flight to one endpoint (0: none).
    pub max_requests_per_endpoint: usize,
}

/// A service's retry policy, resolved: plain numbers read on every call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetrySettings {
    pub codes: meshwire_mesh::CodeSet,
    /// Attempts in all after an app failure, the first included (1..=5).
    pub max_attempts: usize,
    pub per_try_timeout: Option<Duration>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl RetrySettings {
    fn of(r: &meshwire_mesh::resilience::RetryPolicy) -> Self {
        Self {
            codes: r.retry_on(),
            max_attempts: r.max_attempts() as usize,
            per_try_timeout: r.per_try_timeout,
            backoff_base: r.backoff_base(),
            backoff_max: r.backoff_max(),
        }
    }
}

/// The detector's settings from a service's outlier detection.
fn outlier_settings(o: &meshwire_mesh::resilience::OutlierDetection) -> OutlierSettings {
    OutlierSettings {
        consecutive_failures: o.consecutive_failures(),
        base_ejection: o.base_ejection_time(),
        max_ejection: o.max_ejection_time(),
        max_ejection_percent: o.max_ejection_percent(),
        failure_codes: o.failure_codes().bits(),
        failure_percentage: o.failure_percentage(),
        failure_percentage_min_hosts: o.failure_percentage_min_hosts(),
        failure_percentage_min_calls: o.failure_percentage_min_calls(),
        failure_percentage_interval: o.failure_percentage_interval(),
    }
}

impl ClusterState {
    fn same_settings(&self, c: &Cluster) -> bool {
        self.resilience == *c.resilience
            && self.lb == c.lb
            && self.protocol == c.protocol
            && self.hash_policy == hash_policy(c)
            && self.zones == c.zones
            && self.request_timeout == c.request_timeout
            && self.connect_timeout == c.connect_timeout
            && self.authority.as_ref().map(Authority::as_str) == c.authority.as_deref()
    }
}

#[derive(Debug, Default)]
pub struct RouteTable {
    clusters: HashMap<Arc<str>, Arc<ClusterState>>,
}

impl RouteTable {
    pub fn get(&self, service: &str) -> Option<&Arc<ClusterState>> {
        self.clusters.get(service).or_else(|| {
            // Hosts are case-insensitive; names are stored lowercase.
            if service.bytes().any(|b| b.is_ascii_uppercase()) {
                self.clusters.get(service.to_ascii_lowercase().as_str())
            } else {
                None
            }
        })
    }

    pub fn clusters(&self) -> impl Iterator<Item = &Arc<ClusterState>> {
        self.clusters.values()
    }
}

/// The live route table and what is needed to build endpoints for it.
#[derive(Debug)]
pub struct Routes {
    table: ArcSwap<RouteTable>,
    connector: Connector,
    settings: Arc<H2Settings>,
    /// Most endpoints one service may have here: bounds this sidecar's memory
    /// whatever a control plane sends.
    max_endpoints: usize,
    /// Circuit breaker: most calls in flight to one service (0: none).
    max_requests: usize,
    /// Slow-start window for new and recovered endpoints (zero: off).
    slow_start: Duration,
    /// This sidecar's zone: calls prefer endpoints there ([`ZoneRouting`]).
    zone: Option<Arc<str>>,
}

/// Default for [`Routes::with_max_requests`] (Envoy's default `max_requests`).
pub const DEFAULT_MAX_REQUESTS: usize = 1024;

/// Default for [`Routes::with_max_endpoints`].
/// The model's limit, which the control plane enforces too.
pub const DEFAULT_MAX_ENDPOINTS: usize = meshwire_mesh::model::MAX_ENDPOINTS;

impl Routes {
    pub fn new(connector: Connector, settings: Arc<H2Settings>) -> Self {
        Self {
            table: ArcSwap::from_pointee(RouteTable::default()),
            connector,
            settings,
            max_endpoints: DEFAULT_MAX_ENDPOINTS,
            max_requests: DEFAULT_MAX_REQUESTS,
            slow_start: Duration::ZERO,
            zone: None,
        }
    }

    /// Runs failure-percentage ejection on every service whose interval has
    /// passed ([`crate::outlier::sweep`]); how many endpoints it ejected.
    pub fn sweep_outliers(&self) -> usize {
        self.table
            .load()
            .clusters()
            .map(|c| {
                let set = c.endpoints.load();
                crate::outlier::sweep(&c.health, set.entries().iter().map(|e| &e.endpoint.outlier))
            })
            .sum()
    }

    /// This sidecar runs in `zone`: services with zone-aware routing prefer
    /// endpoints there.
    pub fn with_zone(mut self, zone: Option<&str>) -> Self {
        self.zone = zone.map(Arc::from);
        self
    }

    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }

    /// The mesh hop is mutual TLS.
    pub fn is_tls(&self) -> bool {
        self.connector.is_tls()
    }

    /// Endpoints added to a service (and ones back from an ejection) ramp up
    /// over `window` (zero: off).
    pub fn with_slow_start(mut self, window: Duration) -> Self {
        self.slow_start = window;
        self
    }

    /// Most calls in flight to one service (0: no limit).
    pub fn with_max_requests(mut self, max: usize) -> Self {
        self.max_requests = max;
        self
    }

    pub fn max_requests(&self) -> usize {
        self.max_requests
    }

    pub fn with_max_endpoints(mut self, max: usize) -> Self {
        self.max_endpoints = max;
        self
    }

    pub fn load(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.table.load()
    }

    /// What one cluster must pass to be applied here: the model's checks and
    /// this sidecar's endpoint limit.
    pub fn check(&self, c: &Cluster) -> Result<(), ModelError> {
        c.validate()?;
        if c.endpoints.len() > self.max_endpoints {
            return Err(ModelError::new(
                "endpoints",
                format!(
                    "service {:?} has {} endpoints; this sidecar allows at most {} (--max-endpoints)",
                    c.name,
                    c.endpoints.len(),
                    self.max_endpoints
                ),
            ));
        }
        Ok(())
    }

    /// Replaces the whole set of clusters. Validates everything first, so an
    /// invalid config changes nothing. Called by [`crate::apply::Applier`].
    pub fn update(&self, clusters: &[Cluster]) -> Result<(), ModelError> {
        let mut seen = HashMap::new();
        for (i, c) in clusters.iter().enumerate() {
            self.check(c)
                .map_err(|e| e.within(&format!("services[{i}]")))?;
            if let Some(first) = seen.insert(c.name.as_str(), i) {
                return Err(ModelError::new(
                    format!("services[{i}].name"),
                    format!("{:?} is already services[{first}]", c.name),
                ));
            }
        }
        let old = self.table.load_full();
        let mut next = RouteTable::default();
        for c in clusters {
            let prev = old.clusters.get(c.name.as_str());
            let keep: HashMap<SocketAddr, Arc<Endpoint>> = prev
                .map(|p| {
                    p.endpoints
                        .load()
                        .entries()
                        .iter()
                        .map(|e| (e.endpoint.addr, e.endpoint.clone()))
                        .collect()
                })
                .unwrap_or_default();
            let health = prev.map_or_else(
                || ClusterHealth::new(OutlierSettings::default()),
                |p| p.health.clone(),
            );
            // In place: endpoints keep their detector state across a change.
            let res = &c.resilience;
            let serving = c.endpoints.iter().filter(|e| !e.is_unhealthy()).count();
            health.update(outlier_settings(&res.outlier), serving);
            health.set_slow_start(res.slow_start.unwrap_or(self.slow_start));
            health.retry_budget.configure(
                res.retry.budget_percent(),
                res.retry.min_retries_per_second(),
            );
            let set = Arc::new(self.build_set(c, &keep, &health, prev.is_none()));
            let state = match prev {
                // Same settings: swap the endpoints in place, so calls that
                // already hold this cluster see the change too.
                Some(p) if p.same_settings(c) => {
                    p.endpoints.store(set);
                    p.clone()
                }
                _ => Arc::new(ClusterState {
                    name: Arc::from(c.name.as_str()),
                    protocol: c.protocol,
                    lb: c.lb,
                    hash_policy: hash_policy(c),
                    zones: c.zones,
                    request_timeout: c.request_timeout,
                    connect_timeout: c.connect_timeout,
                    // Validated by `Cluster::validate`.
                    authority: c
                        .authority
                        .as_deref()
                        .and_then(|a| Authority::try_from(a).ok()),
                    endpoints: ArcSwap::new(set),
                    health,
                    in_flight: prev.map_or_else(Default::default, |p| p.in_flight.clone()),
                    resilience: (*c.resilience).clone(),
                    retry: RetrySettings::of(&c.resilience.retry),
                    max_requests: c
                        .resilience
                        .circuit_breakers
                        .max_requests
                        .map_or(self.max_requests, |n| n as usize),
                    max_requests_per_endpoint: c
                        .resilience
                        .circuit_breakers
                        .max_requests_per_endpoint
                        .map_or(0, |n| n as usize),
                }),
            };
            next.clusters.insert(state.name.clone(), state);
        }
        self.table.store(Arc::new(next));
        Ok(())
    }

    fn build_set(
        &self,
        c: &Cluster,
        keep: &HashMap<SocketAddr, Arc<Endpoint>>,
        health: &Arc<ClusterHealth>,
        first: bool,
    ) -> EndpointSet {
        // Endpoints the control plane reports unhealthy get no calls; in the
        // caller's zone they still count as (missing) capacity.
        let unhealthy_local: u64 = c
            .endpoints
            .iter()
            .filter(|e| e.is_unhealthy() && e.zone.as_deref() == self.zone.as_deref())
            .map(|e| u64::from(e.weight))
            .sum();
        let entries = c
            .endpoints
            .iter()
            .filter(|spec| !spec.is_unhealthy())
            .map(|spec| {
                let endpoint = match keep.get(&spec.address) {
                    // A new expected identity (or zone) needs a new endpoint.
                    Some(ep) if ep.identity == spec.identity && ep.zone == spec.zone => {
                        ep.pool.set_connect_timeout(c.connect_timeout);
                        ep.clone()
                    }
                    _ => {
                        let ep = Endpoint::new(
                            spec,
                            self.connector.expecting(spec.identity.as_deref()),
                            c.connect_timeout,
                            self.settings.clone(),
                            health.clone(),
                        );
                        if first {
                            ep.outlier.mark_warm();
                        }
                        ep
                    }
                };
                Entry {
                    endpoint,
                    weight: spec.weight,
                    draining: spec.draining,
                }
            })
            .collect();
        let set = EndpointSet::new(entries, c.lb, health.clone());
        match &self.zone {
            Some(zone) => set.with_zones(zone, c.zones, unhealthy_local),
            None => set,
        }
    }
}

/// The hash sources that apply: none unless the policy hashes.
fn hash_policy(c: &Cluster) -> Vec<HashSource> {
    if c.lb.hash().is_some() {
        c.hash_policy.clone()
    } else {
        Vec::new()
    }
}

impl EndpointSource for Routes {
    fn for_each_endpoint(&self, f: &mut dyn FnMut(&Arc<str>, &Arc<Endpoint>)) {
        for c in self.load().clusters() {
            for e in c.endpoints.load().entries() {
                f(&c.name, &e.endpoint);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwire_mesh::Endpoint as Spec;

    fn cluster(name: &str, eps: &[(u16, u32)]) -> Cluster {
        let mut c = Cluster::new(name);
        c.endpoints = eps
            .iter()
            .map(|&(p, w)| Spec::new(([127, 0, 0, 1], p).into()).with_weight(w))
            .collect();
        c
    }

    fn routes() -> Routes {
        Routes::new(Connector::default(), Arc::new(H2Settings::default()))
    }

    #[test]
    fn unchanged_endpoints_are_kept_across_updates() {
        let r = routes();
        r.update(&[cluster("a", &[(1, 1), (2, 1)])]).unwrap();
        let before = r.load().get("a").unwrap().clone();
        let ep1 = before.endpoints.load().entries()[0].endpoint.clone();
        let _call = ep1.start_call();

        r.update(&[cluster("a", &[(1, 5), (3, 1)])]).unwrap();
        let after = r.load().get("a").unwrap().clone();
        assert!(
            Arc::ptr_eq(&before, &after),
            "same settings: same cluster state"
        );
        let set = after.endpoints.load();
        assert!(Arc::ptr_eq(&set.entries()[0].endpoint, &ep1));
        assert_eq!(set.entries()[0].weight, 5);
        assert_eq!(
            set.entries()[0].endpoint.outstanding(),
            1,
            "in-flight call kept"
        );
        assert_eq!(set.entries()[1].endpoint.addr.port(), 3);
    }

    #[test]
    fn invalid_config_changes_nothing() {
        let r = routes();
        r.update(&[cluster("a", &[(1, 1)])]).unwrap();
        let err = r
            .update(&[cluster("a", &[(1, 1)]), cluster("b", &[(2, 0)])])
            .unwrap_err();
        assert_eq!(err.field, "services[1].endpoints[0].weight");
        assert!(r.load().get("b").is_none());
        let err = r
            .update(&[cluster("a", &[]), cluster("a", &[])])
            .unwrap_err();
        assert_eq!(err.field, "services[1].name");
        assert_eq!(
            r.load().get("a").unwrap().endpoints.load().entries().len(),
            1
        );
    }

    #[test]
    fn endpoint_limit_rejects_the_whole_update() {
        let r = Routes::new(Connector::default(), Arc::new(H2Settings::default()))
            .with_max_endpoints(2);
        r.update(&[cluster("a", &[(1, 1), (2, 1)])]).unwrap();
        let err = r
            .update(&[cluster("a", &[(1, 1), (2, 1), (3, 1)])])
            .unwrap_err();
        assert_eq!(err.field, "services[0].endpoints");
        assert!(err.reason.contains("at most 2"), "{err}");
        assert_eq!(
            r.load().get("a").unwrap().endpoints.load().entries().len(),
            2
        );
    }

    #[test]
    fn resilience_changes_swap_the_state_but_keep_the_endpoints() {
        let r = routes().with_max_requests(1024);
        r.update(&[cluster("a", &[(1, 1), (2, 1)])]).unwrap();
        let before = r.load().get("a").unwrap().clone();
        assert_eq!(before.max_requests, 1024, "the flag when unset");
        assert_eq!(before.retry.max_attempts, 2);
        let ep1 = before.endpoints.load().entries()[0].endpoint.clone();
        let _call = ep1.start_call();

        let mut c = cluster("a", &[(1, 1), (2, 1)]);
        c.resilience.circuit_breakers.max_requests = Some(4);
        c.resilience.retry.max_attempts = Some(3);
        c.resilience.retry.retry_on = Some(meshwire_mesh::CodeSet::parse("internal").unwrap());
        c.resilience.outlier.consecutive_failures = Some(0);
        r.update(&[c]).unwrap();
        let after = r.load().get("a").unwrap().clone();
        assert!(!Arc::ptr_eq(&before, &after), "new settings: a new state");
        assert_eq!(after.max_requests, 4);
        assert_eq!(after.retry.max_attempts, 3);
        assert!(after.retry.codes.contains(13) && !after.retry.codes.contains(14));
        assert!(
            Arc::ptr_eq(&before.health, &after.health),
            "detector state kept"
        );
        assert!(
            Arc::ptr_eq(&before.in_flight, &after.in_flight),
            "count kept"
        );
        let set = after.endpoints.load();
        assert!(
            Arc::ptr_eq(&set.entries()[0].endpoint, &ep1),
            "endpoint kept"
        );
        assert_eq!(ep1.outstanding(), 1, "in-flight call kept");

        // Back to the defaults: the sidecar's flag again.
        r.update(&[cluster("a", &[(1, 1), (2, 1)])]).unwrap();
        assert_eq!(r.load().get("a").unwrap().max_requests, 1024);
    }

    #[test]
    fn unhealthy_endpoints_get_no_calls_but_count_in_their_zone() {
        let r = routes().with_zone(Some("a"));
        let mut c = cluster("z", &[(1, 1), (2, 1), (3, 1), (4, 1)]);
        for (e, zone) in c.endpoints.iter_mut().zip(["a", "a", "a", "b"]) {
            e.zone = Some(zone.into());
        }
        c.endpoints[0].health = Some(meshwire_mesh::ReportedHealth {
            healthy: false,
            at: std::time::SystemTime::UNIX_EPOCH,
        });
        r.update(std::slice::from_ref(&c)).unwrap();
        let state = r.load().get("z").unwrap().clone();
        let set = state.endpoints.load();
        let ports: Vec<u16> = set
            .entries()
            .iter()
            .map(|e| e.endpoint.addr.port())
            .collect();
        assert_eq!(
            ports,
            [2, 3, 4],
            "the unhealthy endpoint is not in the picks"
        );
        let z = set.zone_report().expect("zones apply");
        assert_eq!((z.healthy_weight, z.total_weight), (2, 3));
        assert!((z.local_share - (2.0 / 3.0) / 0.7).abs() < 1e-6, "{z:?}");
        // A sidecar without a zone: today's behaviour.
        let plain = routes();
        plain.update(&[c]).unwrap();
        assert!(
            plain
                .load()
                .get("z")
                .unwrap()
                .endpoints
                .load()
                .zone_report()
                .is_none()
        );
    }

    #[test]
    fn lookup_ignores_case() {
        let r = routes();
        r.update(&[cluster("greeter", &[])]).unwrap();
        assert!(r.load().get("Greeter").is_some());
        assert!(r.load().get("other").is_none());
    }
}
