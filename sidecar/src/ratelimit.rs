//! Rate limits: token buckets (GCRA, `governor`) shared by the whole
//! process, so a limit is exact whatever the number of workers. Two users:
//! the gateway's routes ([`RateLimits`]) and every sidecar's inbound side
//! ([`InboundRateLimit`], the local service's `rate_limit` from its cluster).
//!
//! A limit counts per route or service (one bucket), per client IP, or per
//! caller: the verified JWT `sub` at the gateway, the mTLS peer's SPIFFE ID
//! on the inbound side (callers without one are counted by IP). A refused
//! request gets 429 with `Retry-After` (gRPC: `RESOURCE_EXHAUSTED`, never
//! `UNAVAILABLE`, which clients retry at once) and the connection stays open.
//! Keyed buckets of callers idle long enough to be full again are dropped
//! periodically ([`RateLimits::forget_idle`], [`InboundRateLimit::forget_idle`]),
//! so memory follows the callers active in the last period, not all callers
//! ever seen.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use meshwire_mesh::{LimitPer, Rate, RateLimit};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::exemplar::Exemplar;
use serde::Deserialize;

/// What a limit counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKey {
    /// All requests of the route together.
    Route,
    ClientIp,
    /// The verified JWT `sub` (by client IP when there is none).
    Subject,
}

/// The caller as a bucket key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    Ip(IpAddr),
    Subject(Arc<str>),
}

#[derive(Debug)]
enum Bucket {
    Direct(DefaultDirectRateLimiter),
    Keyed(DefaultKeyedRateLimiter<Caller>),
}

/// One configured limit.
#[derive(Debug)]
pub struct Limit {
    key: LimitKey,
    bucket: Bucket,
    /// `"20/s"` as written, for logs.
    pub spec: String,
}

impl Limit {
    /// `rate`: `20/s`, `600/m`, `1000/h` (the mesh's one rate syntax,
    /// [`meshwire_mesh::Rate`]); `burst`: requests allowed at once (default:
    /// the rate's count).
    pub fn new(key: LimitKey, rate: &str, burst: Option<u32>) -> Result<Self, String> {
        let r: Rate = rate
            .parse()
            .map_err(|e: meshwire_mesh::ModelError| e.reason)?;
        Self::of(key, r, burst)
    }

    /// A limit of `rate` (already parsed).
    pub fn of(key: LimitKey, rate: Rate, burst: Option<u32>) -> Result<Self, String> {
        let n = NonZeroU32::new(rate.count).ok_or("the rate must be at least 1")?;
        let burst = match burst {
            Some(b) => NonZeroU32::new(b).ok_or("burst must be at least 1")?,
            None => n,
        };
        let quota = Quota::with_period(rate.interval())
            .ok_or("the rate is too high")?
            .allow_burst(burst);
        let bucket = match key {
            LimitKey::Route => Bucket::Direct(DefaultDirectRateLimiter::direct(quota)),
            _ => Bucket::Keyed(DefaultKeyedRateLimiter::dashmap(quota)),
        };
        Ok(Self {
            key,
            bucket,
            spec: rate.to_string(),
        })
    }

    fn forget_idle(&self) {
        if let Bucket::Keyed(b) = &self.bucket {
            b.retain_recent();
            b.shrink_to_fit();
        }
    }

    /// `Err(wait)`: refused; a token is due after `wait`.
    fn check(&self, ip: IpAddr, subject: Option<&Arc<str>>) -> Result<(), Duration> {
        let clock = DefaultClock::default();
        let r = match &self.bucket {
            Bucket::Direct(b) => b.check(),
            Bucket::Keyed(b) => {
                let k = match (self.key, subject) {
                    (LimitKey::Subject, Some(s)) => Caller::Subject(s.clone()),
                    _ => Caller::Ip(ip),
                };
                b.check_key(&k)
            }
        };
        r.map_err(|not_until| not_until.wait_time_from(clock.now()))
    }
}

/// A route's limits, all of which must admit a request.
#[derive(Debug, Default)]
pub struct RateLimits(pub Vec<Limit>);

impl RateLimits {
    /// `Err(retry_after)` when any limit refuses.
    ///
    /// A request refused by a later limit has still taken a token from the
    /// earlier ones: it was a request all the same.
    pub fn check(&self, ip: IpAddr, subject: Option<&Arc<str>>) -> Result<(), Duration> {
        for l in &self.0 {
            l.check(ip, subject)?;
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Drops keyed buckets that are full again (callers idle for a while).
    pub fn forget_idle(&self) {
        for l in &self.0 {
            l.forget_idle();
        }
    }
}

// === the inbound side ===

/// Which bucket refused a call (the `per` label of `meshwire_rate_limited_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RefusedBy {
    Service = 0,
    Caller = 1,
    Ip = 2,
    /// A named caller's own bucket.
    Override = 3,
}

impl RefusedBy {
    const ALL: [RefusedBy; 4] = [
        RefusedBy::Service,
        RefusedBy::Caller,
        RefusedBy::Ip,
        RefusedBy::Override,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefusedBy::Service => "service",
            RefusedBy::Caller => "caller",
            RefusedBy::Ip => "ip",
            RefusedBy::Override => "override",
        }
    }
}

/// The buckets of one [`RateLimit`]: the default one (per service, caller
/// or IP) and one per named caller.
#[derive(Debug)]
struct InboundLimiter {
    /// What it was built from: an unchanged config keeps its buckets.
    config: RateLimit,
    default: Limit,
    by: RefusedBy,
    overrides: HashMap<Arc<str>, Limit>,
}

impl InboundLimiter {
    fn new(config: &RateLimit) -> Result<Self, String> {
        let (key, by) = match config.per {
            LimitPer::Service => (LimitKey::Route, RefusedBy::Service),
            LimitPer::Caller => (LimitKey::Subject, RefusedBy::Caller),
            LimitPer::Ip => (LimitKey::ClientIp, RefusedBy::Ip),
        };
        let mut overrides = HashMap::with_capacity(config.overrides.len());
        for o in &config.overrides {
            overrides.insert(
                Arc::from(o.caller.as_str()),
                Limit::of(LimitKey::Route, o.rate, o.burst)?,
            );
        }
        Ok(Self {
            default: Limit::of(key, config.rate, config.burst)?,
            by,
            overrides,
            config: config.clone(),
        })
    }

    fn check(&self, caller: Option<&Arc<str>>, ip: IpAddr) -> Result<(), (Duration, RefusedBy)> {
        if let Some(l) = caller.and_then(|c| self.overrides.get(&**c)) {
            return l.check(ip, None).map_err(|w| (w, RefusedBy::Override));
        }
        let by = match (self.by, caller) {
            // A caller without identity is counted by its IP.
            (RefusedBy::Caller, None) => RefusedBy::Ip,
            (by, _) => by,
        };
        self.default.check(ip, caller).map_err(|w| (w, by))
    }
}

/// The local service's inbound rate limit, swapped whole when its config
/// changes (the next call sees the new limit; no restart), with the count
/// of calls it refused. Lock-free: a call loads the limiter once.
#[derive(Debug, Default)]
pub struct InboundRateLimit {
    current: ArcSwapOption<InboundLimiter>,
    refused: [AtomicU64; RefusedBy::ALL.len()],
}

impl InboundRateLimit {
    /// Applies the local service's limit (`None`: none). An unchanged limit
    /// keeps its buckets; a changed one starts with full buckets.
    pub fn store(&self, config: Option<&RateLimit>) {
        let current = self.current.load();
        if current.as_ref().map(|l| &l.config) == config {
            return;
        }
        let next = match config.map(InboundLimiter::new).transpose() {
            Ok(next) => next,
            Err(error) => {
                // Unreachable for a validated cluster; keep the old limit.
                tracing::warn!(%error, "inbound rate limit not applied");
                return;
            }
        };
        tracing::info!(
            rate_limit = config.map(tracing::field::display),
            "inbound rate limit updated"
        );
        self.current.store(next.map(Arc::new));
    }

    /// `Err(retry_after)` when the caller is over its limit (counted).
    pub fn check(&self, caller: Option<&Arc<str>>, ip: IpAddr) -> Result<(), Duration> {
        let guard = self.current.load();
        let Some(l) = guard.as_ref() else {
            return Ok(());
        };
        l.check(caller, ip).map_err(|(wait, by)| {
            self.refused[by as usize].fetch_add(1, Ordering::Relaxed);
            wait
        })
    }

    /// Drops per-caller and per-IP buckets that are full again.
    pub fn forget_idle(&self) {
        if let Some(l) = self.current.load().as_ref() {
            l.default.forget_idle();
        }
    }

    /// Calls refused by `by`'s buckets so far.
    pub fn refused(&self, by: RefusedBy) -> u64 {
        self.refused[by as usize].load(Ordering::Relaxed)
    }
}

/// How often idle callers' buckets are dropped: a bucket full again holds
/// nothing a new one would not.
const FORGET_EVERY: Duration = Duration::from_secs(60);

/// Drops idle callers' buckets of `limit` every minute until `stop`.
pub async fn forget_idle_callers(
    limit: Arc<InboundRateLimit>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(FORGET_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => limit.forget_idle(),
        }
    }
}

/// `meshwire_rate_limited_total{direction="inbound",service,per}` on the
/// sidecar's `/metrics`.
#[derive(Debug)]
pub struct RateLimitCollector {
    pub service: Arc<str>,
    pub limit: Arc<InboundRateLimit>,
}

impl Collector for RateLimitCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut m = enc.encode_descriptor(
            "meshwire_rate_limited",
            "Calls refused by the local service's inbound rate limit, by the bucket that refused them",
            None,
            MetricType::Counter,
        )?;
        for by in RefusedBy::ALL {
            let l = [
                ("direction", "inbound"),
                ("service", &*self.service),
                ("per", by.as_str()),
            ];
            let n = self.limit.refused(by);
            m.encode_family(&l)?
                .encode_counter::<NoLabelSet, u64, f64>(&n, None::<&Exemplar<NoLabelSet, f64>>)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_take_the_mesh_rate_syntax() {
        assert_eq!(
            Limit::new(LimitKey::Route, "5/m", None).unwrap().spec,
            "5/m"
        );
        for bad in ["0/s", "20", "20/d"] {
            assert!(Limit::new(LimitKey::Route, bad, None).is_err(), "{bad}");
        }
    }

    fn inbound(per: LimitPer, overrides: &[&str]) -> InboundRateLimit {
        let mut c = RateLimit::new("1/h".parse().unwrap());
        c.per = per;
        c.burst = Some(2);
        c.overrides = overrides
            .iter()
            .map(|o| meshwire_mesh::ratelimit::parse_override(o).unwrap())
            .collect();
        let l = InboundRateLimit::default();
        l.store(Some(&c));
        l
    }

    #[test]
    fn inbound_buckets_per_caller_with_overrides() {
        let l = inbound(LimitPer::Caller, &["spiffe://t/sa/batch=3/h"]);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let (a, b): (Arc<str>, Arc<str>) = ("spiffe://t/sa/a".into(), "spiffe://t/sa/b".into());
        let batch: Arc<str> = "spiffe://t/sa/batch".into();
        for _ in 0..2 {
            assert!(l.check(Some(&a), ip).is_ok());
        }
        let wait = l.check(Some(&a), ip).unwrap_err();
        assert!(wait > Duration::from_secs(1700), "{wait:?}");
        assert!(l.check(Some(&b), ip).is_ok(), "b has its own bucket");
        for _ in 0..3 {
            assert!(
                l.check(Some(&batch), ip).is_ok(),
                "the override's burst is its rate"
            );
        }
        assert!(l.check(Some(&batch), ip).is_err());
        assert!(l.check(None, ip).is_ok(), "no identity: by IP");
        assert_eq!(
            (l.refused(RefusedBy::Caller), l.refused(RefusedBy::Override)),
            (1, 1)
        );
    }

    #[test]
    fn inbound_limit_swaps_only_when_changed() {
        let l = inbound(LimitPer::Service, &[]);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(l.check(None, ip).is_ok() && l.check(None, ip).is_ok());
        assert!(
            l.check(None, "192.0.2.9".parse().unwrap()).is_err(),
            "one bucket"
        );
        let same = l.current.load().as_ref().unwrap().config.clone();
        l.store(Some(&same));
        assert!(
            l.check(None, ip).is_err(),
            "an unchanged limit keeps its buckets"
        );
        let mut more = same;
        more.rate = "100/s".parse().unwrap();
        l.store(Some(&more));
        assert!(
            l.check(None, ip).is_ok(),
            "a new limit applies to the next call"
        );
        l.store(None);
        for _ in 0..1000 {
            assert!(l.check(None, ip).is_ok());
        }
    }

    #[test]
    fn a_route_limit_is_one_bucket_for_everyone() {
        let l = RateLimits(vec![Limit::new(LimitKey::Route, "1/h", Some(1)).unwrap()]);
        assert!(l.check("192.0.2.1".parse().unwrap(), None).is_ok());
        assert!(l.check("192.0.2.2".parse().unwrap(), None).is_err());
    }

    #[test]
    fn buckets_are_per_caller() {
        let l = RateLimits(vec![Limit::new(LimitKey::Subject, "1/h", Some(2)).unwrap()]);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let alice: Arc<str> = "alice".into();
        let bob: Arc<str> = "bob".into();
        assert!(l.check(ip, Some(&alice)).is_ok());
        assert!(l.check(ip, Some(&alice)).is_ok());
        let wait = l.check(ip, Some(&alice)).unwrap_err();
        assert!(wait > Duration::from_secs(1700), "{wait:?}");
        assert!(l.check(ip, Some(&bob)).is_ok(), "bob has his own bucket");
        assert!(l.check(ip, None).is_ok(), "anonymous: by IP");
    }
}
