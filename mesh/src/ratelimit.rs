//! A service's inbound rate limit: token buckets its own sidecars enforce
//! before a call reaches the app (the gateway's route limits are written the
//! same way, `20/s`).
//!
//! One limit counts calls to the whole service, per caller SPIFFE ID, or per
//! client IP; named callers may have their own, usually higher, rate (as
//! Linkerd's `HTTPLocalRateLimitPolicy` overrides). [`RateLimit::validate`]
//! is the one check: the control plane's API and the sidecar (static file or
//! xDS) both call it through [`crate::Cluster::validate`].

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// Most calls a rate may allow per period, and most a burst may allow at once.
pub const MAX_RATE: u32 = 1_000_000;
pub const MAX_BURST: u32 = 1_000_000;
/// Most named callers with a rate of their own.
pub const MAX_OVERRIDES: usize = 256;
/// Longest caller SPIFFE ID an override may name.
const MAX_CALLER: usize = 2048;

/// The period a rate counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    Second,
    Minute,
    Hour,
}

impl Period {
    pub fn duration(self) -> Duration {
        Duration::from_secs(match self {
            Period::Second => 1,
            Period::Minute => 60,
            Period::Hour => 3600,
        })
    }

    fn unit(self) -> &'static str {
        match self {
            Period::Second => "s",
            Period::Minute => "m",
            Period::Hour => "h",
        }
    }
}

/// `count` calls per `period`: `20/s`, `600/m`, `1000/h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u32,
    pub period: Period,
}

impl Rate {
    pub fn per_second(count: u32) -> Self {
        Self {
            count,
            period: Period::Second,
        }
    }

    /// The time between two tokens (the period divided by the count).
    pub fn interval(self) -> Duration {
        self.period.duration() / self.count.max(1)
    }

    /// `count` at least 1 and at most [`MAX_RATE`].
    pub fn validate(self) -> Result<(), ModelError> {
        if !(1..=MAX_RATE).contains(&self.count) {
            return Err(ModelError::new(
                "",
                format!("{self}: the count must be 1..={MAX_RATE}"),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.period.unit())
    }
}

impl FromStr for Rate {
    type Err = ModelError;

    /// `N/s`, `N/m` or `N/h`, N in 1..=[`MAX_RATE`]; the error's field is
    /// empty (the caller names it).
    fn from_str(s: &str) -> Result<Self, ModelError> {
        let shown = crate::grpc::shown(s);
        let bad = |why: String| ModelError::new("", why);
        let (n, unit) = s
            .split_once('/')
            .ok_or_else(|| bad(format!("{shown}: write a rate as N/s, N/m or N/h")))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| bad(format!("{shown}: {:?} is not a whole number", n.trim())))?;
        let period = match unit.trim() {
            "s" => Period::Second,
            "m" => Period::Minute,
            "h" => Period::Hour,
            u => return Err(bad(format!("{shown}: unit {u:?} is not s, m or h"))),
        };
        let r = Rate { count, period };
        r.validate()?;
        Ok(r)
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e: ModelError| serde::de::Error::custom(e.reason))
    }
}

/// What one bucket counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitPer {
    /// All calls to the service (on one sidecar) share one bucket.
    #[default]
    Service,
    /// A bucket per caller SPIFFE ID (from the mTLS peer certificate);
    /// plaintext callers (permissive mode) are counted by IP.
    Caller,
    /// A bucket per client IP address.
    Ip,
}

impl LimitPer {
    pub const ALL: [LimitPer; 3] = [LimitPer::Service, LimitPer::Caller, LimitPer::Ip];

    pub fn as_str(self) -> &'static str {
        match self {
            LimitPer::Service => "service",
            LimitPer::Caller => "caller",
            LimitPer::Ip => "ip",
        }
    }
}

impl fmt::Display for LimitPer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LimitPer {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, ModelError> {
        LimitPer::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                ModelError::new(
                    "per",
                    format!("{}: use service, caller or ip", crate::grpc::shown(s)),
                )
            })
    }
}

/// A named caller's own bucket (instead of the limit's default one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateOverride {
    /// The caller's exact SPIFFE ID.
    pub caller: String,
    pub rate: Rate,
    /// Calls allowed at once; `None`: the rate's count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// A service's inbound rate limit, enforced by each of its sidecars
/// (exact per sidecar: N sidecars admit up to N × the rate in all).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    pub rate: Rate,
    /// Calls allowed at once; `None`: the rate's count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    #[serde(default)]
    pub per: LimitPer,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<RateOverride>,
}

fn validate_burst(burst: Option<u32>) -> Result<(), ModelError> {
    match burst {
        Some(b) if !(1..=MAX_BURST).contains(&b) => Err(ModelError::new(
            "burst",
            format!("must be 1..={MAX_BURST} (omit it for the rate's count), got {b}"),
        )),
        _ => Ok(()),
    }
}

impl RateLimit {
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            burst: None,
            per: LimitPer::Service,
            overrides: Vec::new(),
        }
    }

    /// The burst in effect: as given, or the rate's count.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.rate.count)
    }

    /// Field paths relative to the limit (`overrides[2].caller`).
    pub fn validate(&self) -> Result<(), ModelError> {
        self.rate.validate().map_err(|e| e.within("rate"))?;
        validate_burst(self.burst)?;
        if self.overrides.len() > MAX_OVERRIDES {
            return Err(ModelError::new(
                "overrides",
                format!(
                    "at most {MAX_OVERRIDES} named callers, got {}",
                    self.overrides.len()
                ),
            ));
        }
        for (i, o) in self.overrides.iter().enumerate() {
            let at = |f: &str| format!("overrides[{i}].{f}");
            let id = &o.caller;
            if !id.starts_with("spiffe://")
                || id.len() <= "spiffe://".len()
                || id.len() > MAX_CALLER
                || id.chars().any(|c| c.is_whitespace() || c.is_control())
                || id.ends_with('*')
            {
                return Err(ModelError::new(
                    at("caller"),
                    format!(
                        "{} must be one caller's exact SPIFFE ID (spiffe://...)",
                        crate::grpc::shown(id)
                    ),
                ));
            }
            if let Some(j) = self.overrides[..i].iter().position(|p| p.caller == *id) {
                return Err(ModelError::new(
                    at("caller"),
                    format!("{id} is already overrides[{j}]"),
                ));
            }
            o.rate.validate().map_err(|e| e.within(&at("rate")))?;
            validate_burst(o.burst).map_err(|e| e.within(&format!("overrides[{i}]")))?;
        }
        Ok(())
    }
}

impl fmt::Display for RateLimit {
    /// `20/s per caller, burst 40, 2 overrides`, for tables and logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} per {}", self.rate, self.per)?;
        if let Some(b) = self.burst {
            write!(f, ", burst {b}")?;
        }
        for o in &self.overrides {
            write!(f, ", {}={}", o.caller, o.rate)?;
            if let Some(b) = o.burst {
                write!(f, " burst {b}")?;
            }
        }
        Ok(())
    }
}

/// `spiffe://td/ns/a/sa/b=1000/s`, as meshctl's `--rate-limit-override`
/// takes it (the ID itself may hold `=`: the last one splits).
pub fn parse_override(s: &str) -> Result<RateOverride, ModelError> {
    let (caller, rate) = s.rsplit_once('=').ok_or_else(|| {
        ModelError::new(
            "",
            format!(
                "{}: write an override as spiffe://.../sa/NAME=N/s",
                crate::grpc::shown(s)
            ),
        )
    })?;
    Ok(RateOverride {
        caller: caller.to_owned(),
        rate: rate.parse().map_err(|e: ModelError| e.within("rate"))?,
        burst: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_print() {
        let r: Rate = "20/s".parse().unwrap();
        assert_eq!(r, Rate::per_second(20));
        assert_eq!(r.interval(), Duration::from_millis(50));
        assert_eq!(r.to_string(), "20/s");
        assert_eq!("5/m".parse::<Rate>().unwrap().period, Period::Minute);
        assert_eq!("1000/h".parse::<Rate>().unwrap().to_string(), "1000/h");
        for bad in ["0/s", "20", "20/d", "-1/s", "x/s", "1000001/s", ""] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn limits_are_checked_with_field_paths() {
        let mut l = RateLimit::new(Rate::per_second(20));
        l.per = LimitPer::Caller;
        assert!(l.validate().is_ok());
        l.burst = Some(0);
        assert_eq!(l.validate().unwrap_err().field, "burst");
        l.burst = Some(40);
        l.overrides
            .push(parse_override("spiffe://t/ns/a/sa/x=1000/s").unwrap());
        assert!(l.validate().is_ok());
        l.overrides
            .push(parse_override("spiffe://t/ns/a/sa/x=5/s").unwrap());
        assert_eq!(l.validate().unwrap_err().field, "overrides[1].caller");
        l.overrides[1].caller = "web".into();
        assert_eq!(l.validate().unwrap_err().field, "overrides[1].caller");
        l.overrides[1].caller = "spiffe://t/ns/a/sa/y".into();
        l.overrides[1].rate.count = 0;
        assert_eq!(l.validate().unwrap_err().field, "overrides[1].rate");
        assert!(parse_override("spiffe://t/ns/a/sa/x").is_err());
        assert_eq!(
            parse_override("spiffe://t/x=1/d").unwrap_err().field,
            "rate"
        );
    }

    #[test]
    fn limits_round_trip_as_json() {
        let mut l = RateLimit::new("100/m".parse().unwrap());
        l.per = LimitPer::Ip;
        l.burst = Some(7);
        l.overrides.push(RateOverride {
            caller: "spiffe://t/ns/a/sa/x".into(),
            rate: Rate::per_second(3),
            burst: Some(1),
        });
        let json = serde_json::to_string(&l).unwrap();
        assert!(json.contains("\"100/m\""), "{json}");
        assert_eq!(serde_json::from_str::<RateLimit>(&json).unwrap(), l);
        assert!(serde_json::from_str::<RateLimit>(r#"{"rate":"0/s"}"#).is_err());
        assert_eq!(
            serde_json::from_str::<RateLimit>(r#"{"rate":"1/s"}"#).unwrap(),
            RateLimit::new(Rate::per_second(1))
        );
    }
}
