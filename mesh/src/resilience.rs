//! Per-service resilience settings: outlier detection, retries, circuit
//! breakers and slow start, as a [`crate::Cluster`] carries them.
//!
//! Every setting is optional: unset means the default, which for the
//! circuit breaker's limit and the slow-start window is the sidecar's own
//! flag (`--max-requests-per-service`, `--slow-start`) and for the rest the
//! constants below (the values the sidecar used before these were per
//! service). The control plane sends only what is set, so a stock Envoy and
//! a Meshwire sidecar fed the same service resolve the same defaults.
//!
//! Field paths in errors are relative to the cluster (`retry.max_attempts`).

use std::time::Duration;

use crate::grpc::Code;
use crate::model::ModelError;

// === gRPC code sets ===

/// A set of gRPC status codes (bit `c` for code `c`), written as a list of
/// lowercase names (`unavailable`, `resource-exhausted`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CodeSet(u32);

impl CodeSet {
    pub const EMPTY: CodeSet = CodeSet(0);

    pub const fn of(codes: &[Code]) -> CodeSet {
        let mut bits = 0;
        let mut i = 0;
        while i < codes.len() {
            bits |= 1 << codes[i] as u32;
            i += 1;
        }
        CodeSet(bits)
    }

    pub const fn bits(self) -> u32 {
        self.0
    }

    pub const fn from_bits(bits: u32) -> CodeSet {
        CodeSet(bits & ((1 << 17) - 1))
    }

    /// One load and a shift: cheap enough for every call's end.
    pub const fn contains(self, code: u8) -> bool {
        code < 32 && self.0 & (1 << code) != 0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub const fn is_subset(self, of: CodeSet) -> bool {
        self.0 & !of.0 == 0
    }

    pub fn codes(self) -> impl Iterator<Item = Code> {
        Code::ALL
            .into_iter()
            .filter(move |c| self.contains(*c as u8))
    }

    /// `unavailable,internal` (lowercase, `-` for `_`; Envoy's `retry_on` spelling).
    pub fn names(self) -> Vec<String> {
        self.codes().map(code_name).collect()
    }

    /// Parses a comma-separated list of code names (`unavailable,internal`;
    /// case, `-` or `_` do not matter).
    pub fn parse(s: &str) -> Result<CodeSet, String> {
        let mut set = CodeSet::EMPTY;
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            set.0 |= 1 << parse_code(name)? as u32;
        }
        Ok(set)
    }
}

impl std::fmt::Display for CodeSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.names().join(","))
    }
}

/// `RESOURCE_EXHAUSTED` → `resource-exhausted`.
pub fn code_name(c: Code) -> String {
    c.name().to_ascii_lowercase().replace('_', "-")
}

fn parse_code(name: &str) -> Result<Code, String> {
    let norm = name.to_ascii_uppercase().replace('-', "_");
    Code::ALL
        .into_iter()
        .find(|c| c.name() == norm)
        .ok_or_else(|| {
            format!(
                "unknown gRPC code {}; use names like unavailable, internal, resource-exhausted",
                crate::grpc::shown(name)
            )
        })
}

impl serde::Serialize for CodeSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.names())
    }
}

impl<'de> serde::Deserialize<'de> for CodeSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names: Vec<String> = serde::Deserialize::deserialize(d)?;
        let mut set = CodeSet::EMPTY;
        for n in &names {
            set.0 |= 1 << parse_code(n).map_err(serde::de::Error::custom)? as u32;
        }
        Ok(set)
    }
}

// === defaults and bounds ===

/// `UNAVAILABLE`, `INTERNAL`, `UNKNOWN`, `DATA_LOSS`.
pub const DEFAULT_FAILURE_CODES: CodeSet = CodeSet::of(&[
    Code::Unavailable,
    Code::Internal,
    Code::Unknown,
    Code::DataLoss,
]);
/// Codes outlier detection may count: the server errors, the ones Envoy maps
/// to a 5xx (what its `consecutive_5xx` counts).
pub const OUTLIER_CODES: CodeSet = CodeSet::of(&[
    Code::Unknown,
    Code::DeadlineExceeded,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
]);
/// The ones Envoy's `consecutive_gateway_failure` counts (502/503/504).
pub const GATEWAY_CODES: CodeSet = CodeSet::of(&[Code::Unavailable, Code::DeadlineExceeded]);
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(1);
pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 50;
/// Failure-percentage ejection: an endpoint failing at least this percent of
/// its calls over an interval is ejected (Envoy's threshold; 0 turns it off).
pub const DEFAULT_FAILURE_PERCENTAGE: u32 = 85;
/// ... only in a service with at least this many endpoints that had
/// [`DEFAULT_FAILURE_PERCENTAGE_MIN_CALLS`] calls in the interval (a small
/// service has no "normal" to compare with; consecutive failures cover it).
pub const DEFAULT_FAILURE_PERCENTAGE_MIN_HOSTS: u32 = 5;
pub const DEFAULT_FAILURE_PERCENTAGE_MIN_CALLS: u32 = 50;
/// The interval failure percentages are measured over.
pub const DEFAULT_FAILURE_PERCENTAGE_INTERVAL: Duration = Duration::from_secs(10);

/// Only `UNAVAILABLE`: the one code that says "not done, try elsewhere".
pub const DEFAULT_RETRY_ON: CodeSet = CodeSet::of(&[Code::Unavailable]);
/// Codes a retry may be for: Envoy's gRPC `retry_on` conditions.
/// `RESOURCE_EXHAUSTED` only when named (retrying an overloaded service
/// adds to its load).
pub const RETRYABLE_CODES: CodeSet = CodeSet::of(&[
    Code::Cancelled,
    Code::DeadlineExceeded,
    Code::Internal,
    Code::ResourceExhausted,
    Code::Unavailable,
]);
pub const DEFAULT_MAX_ATTEMPTS: u32 = 2;
pub const MAX_ATTEMPTS: u32 = 5;
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(250);
pub const DEFAULT_BUDGET_PERCENT: u32 = 20;
pub const DEFAULT_MIN_RETRIES_PER_SECOND: u32 = 10;

/// Longest ejection, backoff or slow-start window accepted.
pub const MAX_WINDOW: Duration = Duration::from_secs(3600);

// === settings ===

/// All of a service's resilience settings.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resilience {
    #[serde(default, skip_serializing_if = "OutlierDetection::is_unset")]
    pub outlier: OutlierDetection,
    #[serde(default, skip_serializing_if = "RetryPolicy::is_unset")]
    pub retry: RetryPolicy,
    #[serde(default, skip_serializing_if = "CircuitBreakers::is_unset")]
    pub circuit_breakers: CircuitBreakers,
    /// New and recovered endpoints ramp up over this window (zero: off);
    /// unset: the sidecar's `--slow-start`.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub slow_start: Option<Duration>,
}

/// Outlier detection at the caller (see the sidecar's `outlier` module).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive failures that eject an endpoint (0: detection off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// First ejection; doubled for each further one in a row.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub base_ejection_time: Option<Duration>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_ejection_time: Option<Duration>,
    /// Most endpoints ejected at once, in percent of the service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
    /// gRPC codes counted as failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_codes: Option<CodeSet>,
    /// Failure-percentage ejection: the percent of an interval's calls that
    /// ejects an endpoint (0: this mode off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_percentage: Option<u32>,
    /// Endpoints with enough calls the service needs for that mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_percentage_min_hosts: Option<u32>,
    /// Calls in the interval an endpoint needs to be judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_percentage_min_calls: Option<u32>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub failure_percentage_interval: Option<Duration>,
}

/// Retries of calls the app failed (transparent fail-over of calls never
/// processed is always on and not counted here).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Codes retried, when the app ends the call before any reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<CodeSet>,
    /// Attempts in all, the first included (1: no retries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Each attempt's limit until the response starts; one that fires
    /// counts as a failure of the endpoint and is retried (within the call's
    /// deadline). Unset: none.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_try_timeout: Option<Duration>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub backoff_base: Option<Duration>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub backoff_max: Option<Duration>,
    /// Retries allowed, in percent of calls...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_percent: Option<u32>,
    /// ...plus this many every second whatever the traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retries_per_second: Option<u32>,
}

/// Exact limits on calls in flight from one caller.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakers {
    /// To the whole service; unset: the sidecar's `--max-requests-per-service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// To each endpoint; unset: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_endpoint: Option<u32>,
}

/// The shortest interval failure percentages are measured over.
pub const MIN_FAILURE_PERCENTAGE_INTERVAL: Duration = Duration::from_millis(100);

/// Most calls in flight a limit may name.
pub const MAX_LIMIT: u32 = 1_000_000;

impl OutlierDetection {
    pub fn is_unset(&self) -> bool {
        *self == Self::default()
    }
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
            .unwrap_or(DEFAULT_CONSECUTIVE_FAILURES)
    }
    pub fn base_ejection_time(&self) -> Duration {
        self.base_ejection_time.unwrap_or(DEFAULT_BASE_EJECTION)
    }
    /// At least the base (a base above the default max raises the max).
    pub fn max_ejection_time(&self) -> Duration {
        self.max_ejection_time
            .unwrap_or(DEFAULT_MAX_EJECTION)
            .max(self.base_ejection_time())
    }
    pub fn max_ejection_percent(&self) -> u32 {
        self.max_ejection_percent
            .unwrap_or(DEFAULT_MAX_EJECTION_PERCENT)
    }
    pub fn failure_codes(&self) -> CodeSet {
        self.failure_codes.unwrap_or(DEFAULT_FAILURE_CODES)
    }
    pub fn failure_percentage(&self) -> u32 {
        self.failure_percentage
            .unwrap_or(DEFAULT_FAILURE_PERCENTAGE)
    }
    pub fn failure_percentage_min_hosts(&self) -> u32 {
        self.failure_percentage_min_hosts
            .unwrap_or(DEFAULT_FAILURE_PERCENTAGE_MIN_HOSTS)
    }
    pub fn failure_percentage_min_calls(&self) -> u32 {
        self.failure_percentage_min_calls
            .unwrap_or(DEFAULT_FAILURE_PERCENTAGE_MIN_CALLS)
    }
    pub fn failure_percentage_interval(&self) -> Duration {
        self.failure_percentage_interval
            .unwrap_or(DEFAULT_FAILURE_PERCENTAGE_INTERVAL)
    }

    fn validate(&self) -> Result<(), ModelError> {
        if self.consecutive_failures.is_some_and(|n| n > 1000) {
            return Err(ModelError::new(
                "consecutive_failures",
                "must be 0..=1000 (0 turns detection off)",
            ));
        }
        window("base_ejection_time", self.base_ejection_time)?;
        window("max_ejection_time", self.max_ejection_time)?;
        if let (Some(b), Some(m)) = (self.base_ejection_time, self.max_ejection_time)
            && m < b
        {
            return Err(ModelError::new(
                "max_ejection_time",
                format!("must be at least base_ejection_time ({b:?})"),
            ));
        }
        if self.max_ejection_percent.is_some_and(|p| p > 100) {
            return Err(ModelError::new("max_ejection_percent", "must be 0..=100"));
        }
        if self.failure_percentage.is_some_and(|p| p > 100) {
            return Err(ModelError::new(
                "failure_percentage",
                "must be 0..=100 (0 turns failure-percentage ejection off)",
            ));
        }
        if self
            .failure_percentage_min_hosts
            .is_some_and(|n| n > 10_000)
        {
            return Err(ModelError::new(
                "failure_percentage_min_hosts",
                "must be 0..=10000",
            ));
        }
        if self
            .failure_percentage_min_calls
            .is_some_and(|n| n > MAX_LIMIT)
        {
            return Err(ModelError::new(
                "failure_percentage_min_calls",
                format!("must be 0..={MAX_LIMIT}"),
            ));
        }
        window(
            "failure_percentage_interval",
            self.failure_percentage_interval,
        )?;
        if self
            .failure_percentage_interval
            .is_some_and(|d| d < MIN_FAILURE_PERCENTAGE_INTERVAL)
        {
            return Err(ModelError::new(
                "failure_percentage_interval",
                "must be at least 100ms",
            ));
        }
        if let Some(c) = self.failure_codes {
            if c.is_empty() {
                return Err(ModelError::new(
                    "failure_codes",
                    "must name at least one code (set consecutive_failures 0 to turn detection off)",
                ));
            }
            if !c.is_subset(OUTLIER_CODES) {
                return Err(ModelError::new(
                    "failure_codes",
                    format!("may only name server errors ({OUTLIER_CODES})"),
                ));
            }
        }
        Ok(())
    }
}

impl RetryPolicy {
    pub fn is_unset(&self) -> bool {
        *self == Self::default()
    }
    pub fn retry_on(&self) -> CodeSet {
        self.retry_on.unwrap_or(DEFAULT_RETRY_ON)
    }
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS)
    }
    pub fn backoff_base(&self) -> Duration {
        self.backoff_base.unwrap_or(DEFAULT_BACKOFF_BASE)
    }
    pub fn backoff_max(&self) -> Duration {
        self.backoff_max
            .unwrap_or(DEFAULT_BACKOFF_MAX)
            .max(self.backoff_base())
    }
    pub fn budget_percent(&self) -> u32 {
        self.budget_percent.unwrap_or(DEFAULT_BUDGET_PERCENT)
    }
    pub fn min_retries_per_second(&self) -> u32 {
        self.min_retries_per_second
            .unwrap_or(DEFAULT_MIN_RETRIES_PER_SECOND)
    }

    fn validate(&self) -> Result<(), ModelError> {
        if let Some(c) = self.retry_on {
            if c.is_empty() {
                return Err(ModelError::new(
                    "retry_on",
                    "must name at least one code (set max_attempts 1 for no retries)",
                ));
            }
            if !c.is_subset(RETRYABLE_CODES) {
                return Err(ModelError::new(
                    "retry_on",
                    format!("may only name {RETRYABLE_CODES}"),
                ));
            }
        }
        if self
            .max_attempts
            .is_some_and(|n| !(1..=MAX_ATTEMPTS).contains(&n))
        {
            return Err(ModelError::new(
                "max_attempts",
                format!("must be 1..={MAX_ATTEMPTS}"),
            ));
        }
        window("per_try_timeout", self.per_try_timeout)?;
        window("backoff_base", self.backoff_base)?;
        window("backoff_max", self.backoff_max)?;
        if let (Some(b), Some(m)) = (self.backoff_base, self.backoff_max)
            && m < b
        {
            return Err(ModelError::new(
                "backoff_max",
                format!("must be at least backoff_base ({b:?})"),
            ));
        }
        if self.budget_percent.is_some_and(|p| p > 100) {
            return Err(ModelError::new("budget_percent", "must be 0..=100"));
        }
        if self.min_retries_per_second.is_some_and(|n| n > 10_000) {
            return Err(ModelError::new(
                "min_retries_per_second",
                "must be 0..=10000",
            ));
        }
        Ok(())
    }
}

impl CircuitBreakers {
    pub fn is_unset(&self) -> bool {
        *self == Self::default()
    }

    fn validate(&self) -> Result<(), ModelError> {
        for (field, v) in [
            ("max_requests", self.max_requests),
            ("max_requests_per_endpoint", self.max_requests_per_endpoint),
        ] {
            if v.is_some_and(|n| !(1..=MAX_LIMIT).contains(&n)) {
                return Err(ModelError::new(field, format!("must be 1..={MAX_LIMIT}")));
            }
        }
        Ok(())
    }
}

impl Resilience {
    pub fn is_unset(&self) -> bool {
        *self == Self::default()
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        self.outlier.validate().map_err(|e| e.within("outlier"))?;
        self.retry.validate().map_err(|e| e.within("retry"))?;
        self.circuit_breakers
            .validate()
            .map_err(|e| e.within("circuit_breakers"))?;
        if let Some(w) = self.slow_start
            && w > MAX_WINDOW
        {
            return Err(ModelError::new(
                "slow_start",
                "must be at most 1h (0s turns it off)",
            ));
        }
        Ok(())
    }
}

/// The paths an update may name: a whole part, or one field of it.
pub const PATHS: &[&str] = &[
    "outlier",
    "outlier.consecutive_failures",
    "outlier.base_ejection_time",
    "outlier.max_ejection_time",
    "outlier.max_ejection_percent",
    "outlier.failure_codes",
    "outlier.failure_percentage",
    "outlier.failure_percentage_min_hosts",
    "outlier.failure_percentage_min_calls",
    "outlier.failure_percentage_interval",
    "retry",
    "retry.retry_on",
    "retry.max_attempts",
    "retry.per_try_timeout",
    "retry.backoff_base",
    "retry.backoff_max",
    "retry.budget_percent",
    "retry.min_retries_per_second",
    "circuit_breakers",
    "circuit_breakers.max_requests",
    "circuit_breakers.max_requests_per_endpoint",
    "slow_start",
];

impl Resilience {
    /// Copies the setting at `path` (one of [`PATHS`]) from `from`; false if
    /// there is no such path. An unset value in `from` resets it.
    pub fn copy_field(&mut self, path: &str, from: &Resilience) -> bool {
        let (o, fo) = (&mut self.outlier, &from.outlier);
        let (r, fr) = (&mut self.retry, &from.retry);
        let (c, fc) = (&mut self.circuit_breakers, &from.circuit_breakers);
        match path {
            "outlier" => *o = *fo,
            "outlier.consecutive_failures" => o.consecutive_failures = fo.consecutive_failures,
            "outlier.base_ejection_time" => o.base_ejection_time = fo.base_ejection_time,
            "outlier.max_ejection_time" => o.max_ejection_time = fo.max_ejection_time,
            "outlier.max_ejection_percent" => o.max_ejection_percent = fo.max_ejection_percent,
            "outlier.failure_codes" => o.failure_codes = fo.failure_codes,
            "outlier.failure_percentage" => o.failure_percentage = fo.failure_percentage,
            "outlier.failure_percentage_min_hosts" => {
                o.failure_percentage_min_hosts = fo.failure_percentage_min_hosts;
            }
            "outlier.failure_percentage_min_calls" => {
                o.failure_percentage_min_calls = fo.failure_percentage_min_calls;
            }
            "outlier.failure_percentage_interval" => {
                o.failure_percentage_interval = fo.failure_percentage_interval;
            }
            "retry" => *r = *fr,
            "retry.retry_on" => r.retry_on = fr.retry_on,
            "retry.max_attempts" => r.max_attempts = fr.max_attempts,
            "retry.per_try_timeout" => r.per_try_timeout = fr.per_try_timeout,
            "retry.backoff_base" => r.backoff_base = fr.backoff_base,
            "retry.backoff_max" => r.backoff_max = fr.backoff_max,
            "retry.budget_percent" => r.budget_percent = fr.budget_percent,
            "retry.min_retries_per_second" => r.min_retries_per_second = fr.min_retries_per_second,
            "circuit_breakers" => *c = *fc,
            "circuit_breakers.max_requests" => c.max_requests = fc.max_requests,
            "circuit_breakers.max_requests_per_endpoint" => {
                c.max_requests_per_endpoint = fc.max_requests_per_endpoint;
            }
            "slow_start" => self.slow_start = from.slow_start,
            _ => return false,
        }
        true
    }
}

/// A positive duration of at most [`MAX_WINDOW`].
fn window(field: &str, d: Option<Duration>) -> Result<(), ModelError> {
    match d {
        Some(d) if d.is_zero() => Err(ModelError::new(field, "must be greater than zero")),
        Some(d) if d > MAX_WINDOW => Err(ModelError::new(field, "must be at most 1h")),
        _ => Ok(()),
    }
}

/// Durations as humantime strings (`250ms`), so files and stored records read well.
mod opt_duration {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(
        d: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = serde::Deserialize::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_sets_parse_print_and_round_trip() {
        let s = CodeSet::parse("unavailable, INTERNAL,resource_exhausted").unwrap();
        assert!(s.contains(Code::Unavailable as u8) && s.contains(Code::Internal as u8));
        assert_eq!(s.to_string(), "resource-exhausted,internal,unavailable");
        let e = CodeSet::parse("unavailable,nope").unwrap_err();
        assert!(e.contains("\"nope\""), "{e}");
        let json = serde_json::to_string(&DEFAULT_FAILURE_CODES).unwrap();
        assert_eq!(json, r#"["unknown","internal","unavailable","data-loss"]"#);
        assert_eq!(
            serde_json::from_str::<CodeSet>(&json).unwrap(),
            DEFAULT_FAILURE_CODES
        );
        assert!(!CodeSet::EMPTY.contains(40));
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let r = Resilience::default();
        assert_eq!(r.outlier.consecutive_failures(), 5);
        assert_eq!(r.outlier.base_ejection_time(), Duration::from_secs(1));
        assert_eq!(r.outlier.max_ejection_time(), Duration::from_secs(60));
        assert_eq!(r.outlier.max_ejection_percent(), 50);
        assert_eq!(
            (
                r.outlier.failure_percentage(),
                r.outlier.failure_percentage_min_hosts(),
                r.outlier.failure_percentage_min_calls(),
                r.outlier.failure_percentage_interval()
            ),
            (85, 5, 50, Duration::from_secs(10))
        );
        assert_eq!(r.retry.retry_on(), CodeSet::of(&[Code::Unavailable]));
        assert_eq!(r.retry.max_attempts(), 2);
        assert_eq!(r.retry.backoff_base(), Duration::from_millis(25));
        assert_eq!(r.retry.backoff_max(), Duration::from_millis(250));
        assert_eq!(
            (r.retry.budget_percent(), r.retry.min_retries_per_second()),
            (20, 10)
        );
        assert!(r.is_unset());
        assert_eq!(serde_json::to_string(&r).unwrap(), "{}");
    }

    #[test]
    fn errors_name_the_field() {
        let field = |r: Resilience| r.validate().unwrap_err().field;
        let mut r = Resilience::default();
        r.retry.max_attempts = Some(6);
        let e = r.validate().unwrap_err();
        assert_eq!(e.to_string(), "retry.max_attempts: must be 1..=5");
        r.retry.max_attempts = Some(0);
        assert_eq!(field(r.clone()), "retry.max_attempts");

        let mut r = Resilience::default();
        r.retry.retry_on = Some(CodeSet::of(&[Code::NotFound]));
        assert_eq!(field(r.clone()), "retry.retry_on");
        r.retry.retry_on = Some(CodeSet::of(&[Code::ResourceExhausted]));
        assert_eq!(r.validate(), Ok(()), "allowed when named");
        r.retry.per_try_timeout = Some(Duration::ZERO);
        assert_eq!(field(r.clone()), "retry.per_try_timeout");
        r.retry.per_try_timeout = None;
        r.retry.backoff_base = Some(Duration::from_secs(1));
        r.retry.backoff_max = Some(Duration::from_millis(10));
        assert_eq!(field(r.clone()), "retry.backoff_max");

        let mut r = Resilience::default();
        r.outlier.max_ejection_percent = Some(101);
        assert_eq!(field(r.clone()), "outlier.max_ejection_percent");
        r.outlier.max_ejection_percent = None;
        r.outlier.failure_percentage = Some(101);
        assert_eq!(field(r.clone()), "outlier.failure_percentage");
        r.outlier.failure_percentage = None;
        r.outlier.failure_percentage_interval = Some(Duration::from_millis(10));
        assert_eq!(field(r.clone()), "outlier.failure_percentage_interval");
        r.outlier.failure_percentage_interval = None;
        r.outlier.failure_codes = Some(CodeSet::of(&[Code::InvalidArgument]));
        assert_eq!(field(r.clone()), "outlier.failure_codes");
        r.outlier.failure_codes = None;
        r.outlier.base_ejection_time = Some(Duration::from_secs(10));
        r.outlier.max_ejection_time = Some(Duration::from_secs(5));
        assert_eq!(field(r.clone()), "outlier.max_ejection_time");

        let mut r = Resilience::default();
        r.circuit_breakers.max_requests = Some(0);
        assert_eq!(field(r.clone()), "circuit_breakers.max_requests");
        r.circuit_breakers.max_requests = Some(4);
        r.circuit_breakers.max_requests_per_endpoint = Some(MAX_LIMIT + 1);
        assert_eq!(
            field(r.clone()),
            "circuit_breakers.max_requests_per_endpoint"
        );
        r.circuit_breakers.max_requests_per_endpoint = None;
        r.slow_start = Some(Duration::from_secs(7200));
        assert_eq!(field(r.clone()), "slow_start");
        r.slow_start = Some(Duration::ZERO);
        assert_eq!(r.validate(), Ok(()), "0s: off");
    }

    #[test]
    fn every_path_copies_one_setting() {
        let mut from = Resilience::default();
        from.retry.max_attempts = Some(3);
        from.circuit_breakers.max_requests = Some(4);
        let mut to = Resilience::default();
        to.retry.per_try_timeout = Some(Duration::from_secs(1));
        assert!(to.copy_field("retry.max_attempts", &from));
        assert_eq!(to.retry.max_attempts, Some(3));
        assert_eq!(to.retry.per_try_timeout, Some(Duration::from_secs(1)));
        assert!(to.copy_field("retry", &Resilience::default()), "reset");
        assert!(to.retry.is_unset());
        assert!(!to.copy_field("retry.nope", &from));
        for p in PATHS {
            assert!(Resilience::default().copy_field(p, &from), "{p}");
        }
    }

    #[test]
    fn json_shape_is_stable() {
        let mut r = Resilience::default();
        r.retry.per_try_timeout = Some(Duration::from_millis(200));
        r.retry.retry_on = Some(CodeSet::parse("unavailable,internal").unwrap());
        r.circuit_breakers.max_requests = Some(500);
        r.slow_start = Some(Duration::from_secs(30));
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"retry":{"retry_on":["internal","unavailable"],"per_try_timeout":"200ms"},"circuit_breakers":{"max_requests":500},"slow_start":"30s"}"#
        );
        assert_eq!(serde_json::from_str::<Resilience>(&json).unwrap(), r);
    }
}
