//! Rate limits per route: token buckets (GCRA, `governor`) shared by the
//! whole process, so a limit is exact whatever the number of workers.
//!
//! A limit counts per route (one bucket), per client IP, or per JWT subject
//! (callers without a verified subject are counted by IP). A refused
//! request gets 429 with `Retry-After` (gRPC: `RESOURCE_EXHAUSTED`, never
//! `UNAVAILABLE`, which clients retry at once) and the connection stays open.
//! Keyed buckets of callers idle long enough to be full again are dropped
//! periodically ([`RateLimits::forget_idle`]), so memory follows the callers
//! active in the last period, not all callers ever seen.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
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

/// `20/s`, `600/m`, `1000/h` → (count, period).
pub fn parse_rate(s: &str) -> Result<(NonZeroU32, Duration), String> {
    let (n, unit) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: write it as N/s, N/m or N/h"))?;
    let n: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: {n:?} is not a whole number"))?;
    let n = NonZeroU32::new(n).ok_or_else(|| format!("{s:?}: the rate must be at least 1"))?;
    let period = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        u => return Err(format!("{s:?}: unit {u:?} is not s, m or h")),
    };
    Ok((n, period))
}

impl Limit {
    /// `burst`: requests allowed at once (default: the rate's count).
    pub fn new(key: LimitKey, rate: &str, burst: Option<u32>) -> Result<Self, String> {
        let (n, period) = parse_rate(rate)?;
        let burst = match burst {
            Some(b) => NonZeroU32::new(b).ok_or("burst must be at least 1")?,
            None => n,
        };
        let quota = Quota::with_period(period / n.get())
            .ok_or("the rate is too high")?
            .allow_burst(burst);
        let bucket = match key {
            LimitKey::Route => Bucket::Direct(DefaultDirectRateLimiter::direct(quota)),
            _ => Bucket::Keyed(DefaultKeyedRateLimiter::dashmap(quota)),
        };
        Ok(Self {
            key,
            bucket,
            spec: rate.to_owned(),
        })
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
            if let Bucket::Keyed(b) = &l.bucket {
                b.retain_recent();
                b.shrink_to_fit();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(
            parse_rate("20/s").unwrap(),
            (NonZeroU32::new(20).unwrap(), Duration::from_secs(1))
        );
        assert_eq!(parse_rate("5/m").unwrap().1, Duration::from_secs(60));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("20").is_err());
        assert!(parse_rate("20/d").is_err());
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
