//! Validated domain types of the mesh: clusters (services) and endpoints.
//!
//! Every constructor path ends in [`Cluster::validate`], so code holding a
//! `Cluster` may assume its invariants (weights in range, no duplicate
//! endpoint, a well-formed name).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

/// Smallest and largest endpoint weight (Envoy's `load_balancing_weight` range
/// is wider; we keep weights small so the balancer's arithmetic stays exact).
pub(crate) const MIN_WEIGHT: u32 = 1;
pub(crate) const MAX_WEIGHT: u32 = 10_000;

/// Most endpoints one service may have: the control plane refuses more, and
/// a sidecar accepts at most this many by default (`--max-endpoints` may
/// lower it for one sidecar), so a committed service fits every sidecar
/// running the defaults.
pub const MAX_ENDPOINTS: usize = 10_000;

/// Default bias of the weighted least-request picker (see the sidecar's
/// `balance` module for what it does).
pub const DEFAULT_ACTIVE_REQUEST_BIAS: f64 = 2.0;

/// Longest `request_timeout` a service may have: a bound, not a typo's
/// 999999999h (omit it for none).
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Why a cluster or endpoint was rejected; `field` names the offending field
/// as a path (e.g. `endpoints[2].weight`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ModelError {
    pub field: String,
    pub reason: String,
}

impl ModelError {
    /// Both parts bounded ([`crate::grpc::MAX_MESSAGE`]): a reason that
    /// quotes a huge value cannot make a huge error.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        let bound = |s: String| match crate::grpc::truncate(&s, crate::grpc::MAX_MESSAGE) {
            std::borrow::Cow::Borrowed(_) => s,
            std::borrow::Cow::Owned(cut) => cut,
        };
        Self {
            field: bound(field.into()),
            reason: bound(reason.into()),
        }
    }

    /// Prefixes the field path, e.g. `weight` -> `endpoints[1].weight`.
    pub fn within(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() {
            parent.to_string()
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

/// How a cluster spreads calls over its endpoints.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LbPolicy {
    /// Weighted least outstanding requests (the default).
    LeastRequest { active_request_bias: f64 },
    /// Weighted round robin, no load awareness.
    RoundRobin,
    /// Consistent hashing on a ring of points per endpoint, keyed by the
    /// cluster's [`HashSource`]s; calls without a key use least request.
    RingHash(HashLb),
    /// Consistent hashing over a Maglev lookup table.
    Maglev(HashLb),
}

/// Settings shared by the consistent-hash policies.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HashLb {
    /// Bounded loads: no endpoint takes more than this × its share of the
    /// calls in flight (at least 1.0); `None` is plain consistent hashing.
    pub balance_factor: Option<f64>,
}

impl LbPolicy {
    /// The consistent-hash settings, for the hash policies.
    pub fn hash(&self) -> Option<&HashLb> {
        match self {
            Self::RingHash(h) | Self::Maglev(h) => Some(h),
            _ => None,
        }
    }

    /// The policy's name as flags and tables spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::LeastRequest { .. } => "least-request",
            Self::RoundRobin => "round-robin",
            Self::RingHash(_) => "ring-hash",
            Self::Maglev(_) => "maglev",
        }
    }
}

/// Where a call's hash key comes from; a cluster lists several, in order,
/// and the first one present wins.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashSource {
    /// A request header (gRPC metadata), by lowercase name.
    Header(String),
    /// The caller's IP address ("IP hash").
    SourceIp,
    /// An HTTP cookie; for HTTP (not gRPC) callers without it the sidecar
    /// makes one and sets it on the response, so the next call sticks.
    Cookie {
        name: String,
        #[serde(default, with = "opt_secs", skip_serializing_if = "Option::is_none")]
        ttl: Option<Duration>,
    },
}

/// Whole seconds for a cookie's `Max-Age`.
mod opt_secs {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(
        d: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let secs: Option<u64> = serde::Deserialize::deserialize(d)?;
        Ok(secs.map(Duration::from_secs))
    }
}

/// A token as RFC 9110 (header names) and RFC 6265 (cookie names) allow.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl HashSource {
    pub fn validate(&self) -> Result<(), ModelError> {
        match self {
            Self::Header(h) => {
                if !is_token(h) || h.bytes().any(|b| b.is_ascii_uppercase()) {
                    return Err(ModelError::new(
                        "header",
                        format!("{h:?} is not a lowercase header name"),
                    ));
                }
            }
            Self::SourceIp => {}
            Self::Cookie { name, ttl } => {
                if !is_token(name) {
                    return Err(ModelError::new(
                        "cookie.name",
                        format!("{name:?} is not a cookie name"),
                    ));
                }
                if ttl.is_some_and(|t| t.as_secs() == 0) {
                    return Err(ModelError::new(
                        "cookie.ttl",
                        "must be at least 1s (omit it for a session cookie)",
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Default for LbPolicy {
    fn default() -> Self {
        Self::LeastRequest {
            active_request_bias: DEFAULT_ACTIVE_REQUEST_BIAS,
        }
    }
}

/// What a service's apps speak, which decides how its calls are carried.
///
/// The hop between sidecars is HTTP/2 over mutual TLS for all three: `http`
/// requests ride it as HTTP/2 streams (whatever HTTP version the apps use),
/// `tcp` connections as CONNECT streams (RFC 9113 §8.5), one per connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// gRPC over HTTP/2: the app is reached over h2c.
    #[default]
    Grpc,
    /// HTTP/1.1 or HTTP/2 (REST): the app is reached over HTTP/1.1, or
    /// over h2c when it speaks it.
    Http,
    /// Opaque bytes, balanced per connection.
    Tcp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Grpc, Protocol::Http, Protocol::Tcp];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
        }
    }

    /// HTTP of some kind (routed per request rather than per connection).
    pub fn is_http(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Protocol {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, ModelError> {
        Protocol::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                ModelError::new(
                    "protocol",
                    format!("unknown protocol {s:?}; use grpc, http or tcp"),
                )
            })
    }
}

/// One service of the mesh as a caller sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// The service name callers put in `:authority` / `Host`.
    pub name: String,
    /// What the service's apps speak.
    pub protocol: Protocol,
    pub lb: LbPolicy,
    /// Time allowed to open a connection (TCP and, later, TLS) to an endpoint.
    pub connect_timeout: Duration,
    /// Upper bound on a whole call; `None` means only the caller's deadline.
    pub request_timeout: Option<Duration>,
    /// `:authority` sent upstream instead of the caller's.
    pub authority: Option<String>,
    pub endpoints: Vec<Endpoint>,
    /// Who may call this service; enforced by the service's own sidecars.
    pub policy: Option<crate::policy::Policy>,
    /// The service's sidecars also accept plaintext (no identity) callers.
    pub permissive: bool,
    /// Hash keys for [`LbPolicy::RingHash`] and [`LbPolicy::Maglev`] (ignored
    /// by the other policies), first present wins.
    pub hash_policy: Vec<HashSource>,
    /// Outlier detection, retries, circuit breakers and slow start; unset
    /// parts are defaults (see [`crate::resilience`]). Boxed: most services
    /// leave it unset, and it is larger than the rest of the cluster's settings.
    pub resilience: Box<crate::resilience::Resilience>,
    /// Calls admitted per service, caller or client IP by each of the
    /// service's own sidecars; `None`: no limit ([`crate::ratelimit`]).
    pub rate_limit: Option<crate::ratelimit::RateLimit>,
    /// Whether callers keep calls in their own zone, and how healthy it must be.
    pub zones: ZoneRouting,
}

/// Zone-aware routing of one service, as its callers apply it.
///
/// A caller that knows its zone sends every call to endpoints of its own
/// zone while at least `min_healthy` of that zone's endpoints (by weight)
/// are healthy. Below that it keeps `healthy fraction / min_healthy` of the
/// calls and spills the rest to the other zones, in proportion to their
/// healthy weight; with none healthy, all calls go elsewhere. This is
/// Envoy's priority spill-over with an overprovisioning factor of
/// `1 / min_healthy` (Envoy's default 1.4 is a `min_healthy` of ~0.71).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZoneRouting {
    pub enabled: bool,
    /// Fraction of the local zone's weight that must be healthy for it to
    /// take every call, in (0, 1].
    pub min_healthy: f64,
}

impl ZoneRouting {
    pub const DEFAULT_MIN_HEALTHY: f64 = 0.7;

    pub fn validate(&self) -> Result<(), ModelError> {
        if !(self.min_healthy > 0.0 && self.min_healthy <= 1.0) {
            return Err(ModelError::new(
                "zones.min_healthy",
                format!(
                    "must be greater than 0 and at most 1, got {}",
                    self.min_healthy
                ),
            ));
        }
        Ok(())
    }

    /// The share of calls the caller's own zone keeps when `healthy` of its
    /// `total` weight is healthy (`total` includes the unhealthy endpoints).
    pub fn local_share(&self, healthy: u64, total: u64) -> f64 {
        if !self.enabled || total == 0 {
            return 0.0;
        }
        let fraction = healthy.min(total) as f64 / total as f64;
        (fraction / self.min_healthy).min(1.0)
    }
}

impl Default for ZoneRouting {
    fn default() -> Self {
        Self {
            enabled: true,
            min_healthy: Self::DEFAULT_MIN_HEALTHY,
        }
    }
}

impl Cluster {
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            protocol: Protocol::default(),
            lb: LbPolicy::default(),
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            request_timeout: None,
            authority: None,
            endpoints: Vec::new(),
            policy: None,
            permissive: false,
            hash_policy: Vec::new(),
            resilience: Default::default(),
            rate_limit: None,
            zones: ZoneRouting::default(),
        }
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        validate_service_name(&self.name).map_err(|e| e.within("name"))?;
        if self.connect_timeout.is_zero() {
            return Err(ModelError::new(
                "connect_timeout",
                "must be greater than zero",
            ));
        }
        if self.connect_timeout > Duration::from_secs(300) {
            return Err(ModelError::new("connect_timeout", "must be at most 300s"));
        }
        if let Some(t) = self.request_timeout
            && t.is_zero()
        {
            return Err(ModelError::new(
                "request_timeout",
                "must be greater than zero (omit it for no timeout)",
            ));
        }
        if self
            .request_timeout
            .is_some_and(|t| t > MAX_REQUEST_TIMEOUT)
        {
            return Err(ModelError::new(
                "request_timeout",
                "must be at most 24h (omit it for no timeout)",
            ));
        }
        if let LbPolicy::LeastRequest {
            active_request_bias,
        } = self.lb
            && !(0.0..=10.0).contains(&active_request_bias)
        {
            return Err(ModelError::new(
                "lb.active_request_bias",
                format!("must be between 0 and 10, got {active_request_bias}"),
            ));
        }
        if let Some(f) = self.lb.hash().and_then(|h| h.balance_factor)
            && !(1.0..=100.0).contains(&f)
        {
            return Err(ModelError::new(
                "lb.balance_factor",
                format!("must be between 1 and 100, got {f}"),
            ));
        }
        for (i, h) in self.hash_policy.iter().enumerate() {
            h.validate()
                .map_err(|e| e.within(&format!("hash_policy[{i}]")))?;
        }
        if let Some(a) = &self.authority
            && a.parse::<http_authority::Authority>().is_err()
        {
            return Err(ModelError::new(
                "authority",
                format!("{a:?} is not a valid host[:port]"),
            ));
        }
        if let Some(p) = &self.policy {
            p.validate().map_err(|e| e.within("policy"))?;
        }
        self.resilience.validate()?;
        if let Some(l) = &self.rate_limit {
            l.validate().map_err(|e| e.within("rate_limit"))?;
        }
        self.zones.validate()?;
        if self.endpoints.len() > MAX_ENDPOINTS {
            return Err(ModelError::new(
                "endpoints",
                format!(
                    "{} endpoints; a service has at most {MAX_ENDPOINTS}",
                    self.endpoints.len()
                ),
            ));
        }
        let mut seen = BTreeMap::new();
        for (i, ep) in self.endpoints.iter().enumerate() {
            let path = format!("endpoints[{i}]");
            ep.validate().map_err(|e| e.within(&path))?;
            if let Some(first) = seen.insert(ep.address, i) {
                return Err(ModelError::new(
                    format!("{path}.address"),
                    format!("{} is already endpoints[{first}]", ep.address),
                ));
            }
        }
        Ok(())
    }
}

/// One instance of a service: where its sidecar's inbound listener is.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub weight: u32,
    pub zone: Option<String>,
    /// A draining endpoint gets no new calls; calls in flight finish.
    pub draining: bool,
    /// The identity (SPIFFE ID) the endpoint must present on the mTLS hop.
    pub identity: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// What the endpoint's own sidecar last reported about its app, as the
    /// control plane keeps it (`None`: no report). Pushed as EDS
    /// `health_status`; a sidecar gets unhealthy endpoints marked with a
    /// report (`healthy: false`, `at` the epoch) and sends them no calls:
    /// they only count in their zone's capacity ([`ZoneRouting`]).
    pub health: Option<ReportedHealth>,
}

/// One endpoint's health as its sidecar reported it to the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportedHealth {
    pub healthy: bool,
    /// When the report was written to the store (whole milliseconds, so it
    /// survives the store's round trip exactly).
    pub at: SystemTime,
}

impl Endpoint {
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            weight: 1,
            zone: None,
            draining: false,
            identity: None,
            metadata: BTreeMap::new(),
            health: None,
        }
    }

    /// Its sidecar reports its app unhealthy.
    pub fn is_unhealthy(&self) -> bool {
        self.health.is_some_and(|h| !h.healthy)
    }

    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        if !(MIN_WEIGHT..=MAX_WEIGHT).contains(&self.weight) {
            return Err(ModelError::new(
                "weight",
                format!(
                    "must be between {MIN_WEIGHT} and {MAX_WEIGHT}, got {}",
                    self.weight
                ),
            ));
        }
        if let Some(id) = &self.identity
            && meshwire_tls::SpiffeId::parse(id).is_err()
        {
            return Err(ModelError::new(
                "identity",
                format!("{id:?} is not a SPIFFE ID (spiffe://<trust-domain>/<path>)"),
            ));
        }
        if self.address.port() == 0 {
            return Err(ModelError::new("address", "port must not be 0"));
        }
        if self.address.ip().is_unspecified() {
            return Err(ModelError::new(
                "address",
                format!("{} is not a routable address", self.address.ip()),
            ));
        }
        Ok(())
    }
}

/// Service names are what callers put in `:authority`, so they are DNS-like:
/// lowercase letters, digits, `-` and `.`, starting with a letter or digit.
pub fn validate_service_name(name: &str) -> Result<(), ModelError> {
    if name.is_empty() {
        return Err(ModelError::new("", "must not be empty"));
    }
    if name.len() > 253 {
        return Err(ModelError::new("", "must be at most 253 characters"));
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    if let Some(c) = name.chars().find(|c| !ok_char(*c)) {
        return Err(ModelError::new(
            "",
            format!("{name:?} has {c:?}; use lowercase letters, digits, '-' and '.'"),
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(ModelError::new(
            "",
            format!("{name:?} must start with a letter or digit"),
        ));
    }
    Ok(())
}

/// Minimal `host[:port]` check, kept here so the model has no HTTP dependency.
mod http_authority {
    pub(super) struct Authority;

    impl std::str::FromStr for Authority {
        type Err = ();

        fn from_str(s: &str) -> Result<Self, ()> {
            let (host, port) = match s.rsplit_once(':') {
                Some((h, p)) if !h.contains(']') || h.ends_with(']') => (h, Some(p)),
                _ => (s, None),
            };
            if host.is_empty()
                || !host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._[]:".contains(c))
            {
                return Err(());
            }
            if let Some(p) = port {
                p.parse::<u16>().map_err(|_| ())?;
            }
            Ok(Authority)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16) -> Endpoint {
        Endpoint::new(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    #[test]
    fn valid_cluster_passes() {
        let mut c = Cluster::new("greeter");
        c.endpoints = vec![ep(1).with_weight(3), ep(2)];
        c.authority = Some("greeter.internal:50051".into());
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn errors_name_the_field() {
        let mut c = Cluster::new("greeter");
        c.endpoints = vec![ep(1), ep(2).with_weight(0)];
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "endpoints[1].weight");
        assert!(e.reason.contains("between 1 and 10000"), "{e}");

        c.endpoints = vec![ep(1), ep(1)];
        assert_eq!(c.validate().unwrap_err().field, "endpoints[1].address");

        let bad = Cluster::new("Greeter_1");
        let e = bad.validate().unwrap_err();
        assert_eq!(e.field, "name");
        assert!(e.reason.contains("'G'"), "{e}");

        let mut c = Cluster::new("x");
        c.authority = Some("bad host".into());
        assert_eq!(c.validate().unwrap_err().field, "authority");
        c.authority = None;
        c.endpoints = vec![Endpoint::new("0.0.0.0:80".parse().unwrap())];
        assert_eq!(c.validate().unwrap_err().field, "endpoints[0].address");

        // What the control plane checks per endpoint is what a sidecar checks.
        let mut e = ep(1);
        e.identity = Some("not-spiffe".into());
        assert_eq!(e.validate().unwrap_err().field, "identity");
        c.endpoints = vec![ep(2), e];
        assert_eq!(c.validate().unwrap_err().field, "endpoints[1].identity");
        c.endpoints = (1..=MAX_ENDPOINTS + 1)
            .map(|p| ep(u16::try_from(p).unwrap()))
            .collect();
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "endpoints");
        assert!(e.reason.contains("at most 10000"), "{e}");
    }

    #[test]
    fn protocols_parse_by_name() {
        for p in Protocol::ALL {
            assert_eq!(p.as_str().parse::<Protocol>(), Ok(p));
        }
        assert_eq!(Protocol::default(), Protocol::Grpc);
        let e = "udp".parse::<Protocol>().unwrap_err();
        assert_eq!(e.field, "protocol");
        assert!(e.reason.contains("grpc, http or tcp"), "{e}");
    }

    #[test]
    fn hash_settings_are_checked() {
        let mut c = Cluster::new("x");
        c.lb = LbPolicy::RingHash(HashLb {
            balance_factor: Some(1.25),
        });
        c.hash_policy = vec![
            HashSource::Header("x-user".into()),
            HashSource::SourceIp,
            HashSource::Cookie {
                name: "sticky".into(),
                ttl: Some(Duration::from_secs(60)),
            },
        ];
        assert_eq!(c.validate(), Ok(()));
        c.lb = LbPolicy::Maglev(HashLb {
            balance_factor: Some(0.5),
        });
        assert_eq!(c.validate().unwrap_err().field, "lb.balance_factor");
        c.lb = LbPolicy::Maglev(HashLb::default());
        c.hash_policy[0] = HashSource::Header("X-User".into());
        assert_eq!(c.validate().unwrap_err().field, "hash_policy[0].header");
        c.hash_policy[0] = HashSource::Cookie {
            name: "a b".into(),
            ttl: None,
        };
        assert_eq!(
            c.validate().unwrap_err().field,
            "hash_policy[0].cookie.name"
        );
        // Carried as JSON in xDS metadata: the shape is stable.
        let json = serde_json::to_string(&c.hash_policy[1..]).unwrap();
        assert_eq!(
            json,
            r#"["source_ip",{"cookie":{"name":"sticky","ttl":60}}]"#
        );
    }
}
