//! A service's resilience settings in Envoy's own xDS fields, so a stock
//! Envoy fed by our control plane and a Meshwire sidecar act alike:
//!
//! | model | xDS |
//! |---|---|
//! | `outlier` | CDS `outlier_detection`: `consecutive_5xx` (or `consecutive_gateway_failure` when only `unavailable`/`deadline-exceeded` count), `base_ejection_time`, `max_ejection_time`, `max_ejection_time_jitter`, `max_ejection_percent`, `failure_percentage_threshold` / `_minimum_hosts` / `_request_volume` with `enforcing_failure_percentage` 100 and `interval` (the failure-percentage interval while that mode is on, else the base ejection time); the exact code set in `meshwire` metadata |
//! | `circuit_breakers.max_requests` | CDS `circuit_breakers.thresholds[0].max_requests` |
//! | retry budget | CDS `circuit_breakers.thresholds[0].retry_budget` (`budget_percent`, `min_retry_concurrency` = our floor per second) |
//! | `slow_start` | `slow_start_config` of the least-request / round-robin policy (metadata for the hash policies) |
//! | `retry` | the route's `retry_policy` (`retry_on` gRPC codes, `num_retries`, `per_try_timeout`, `retry_back_off`, `previous_hosts`); Meshwire sidecars take no routes, so the cluster's metadata carries the same policy |
//! | `circuit_breakers.max_requests_per_endpoint` | metadata only (Envoy's `per_host_thresholds` limit connections, not requests) |
//!
//! Settings whose default is the model's are always encoded resolved (Envoy's
//! own defaults differ: no outlier detection, 3 retries of nothing) and
//! decoded back with "equal to the default" read as unset; the circuit
//! breaker's limit and the slow-start window default to each sidecar's flag,
//! so they are sent only when set.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::{Thresholds, thresholds};
use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers as XCircuitBreakers, Cluster as XCluster, OutlierDetection as XOutlier,
};
use envoy_types::pb::envoy::config::core::v3::{RoutingPriority, RuntimeDouble};
use envoy_types::pb::envoy::config::route::v3::RetryPolicy as XRetryPolicy;
use envoy_types::pb::envoy::config::route::v3::retry_policy::{
    RetryBackOff, RetryHostPredicate, retry_host_predicate,
};
use envoy_types::pb::envoy::extensions::load_balancing_policies::common::v3::SlowStartConfig;
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{Duration as PDuration, UInt32Value};
use meshwire_mesh::resilience::{self as r, CodeSet, OutlierDetection, Resilience, RetryPolicy};

const PREVIOUS_HOSTS: &str =
    "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";
/// The share of calls a slow-starting endpoint gets at first (the sidecar's ramp).
const SLOW_START_MIN_PERCENT: f64 = 10.0;

fn pd(d: Duration) -> PDuration {
    PDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn from_pd(d: &PDuration) -> Option<Duration> {
    (d.seconds >= 0 && d.nanos >= 0).then(|| Duration::new(d.seconds as u64, d.nanos as u32))
}

fn u32v(v: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value: v })
}

/// `Some(v)` unless `v` is the default (read as unset).
fn unless_default<T: PartialEq>(v: T, default: T) -> Option<T> {
    (v != default).then_some(v)
}

// === outlier detection ===

pub(crate) fn encode_outlier(o: &OutlierDetection) -> XOutlier {
    let n = o.consecutive_failures();
    let codes = o.failure_codes();
    let gateway_only = codes.is_subset(r::GATEWAY_CODES);
    let (enforce_5xx, enforce_gateway) = match (n, gateway_only) {
        (0, _) => (0, 0),
        (_, true) => (0, 100),
        (_, false) => (100, 0),
    };
    let base = o.base_ejection_time();
    let percent = o.failure_percentage();
    XOutlier {
        consecutive_5xx: u32v(n),
        enforcing_consecutive_5xx: u32v(enforce_5xx),
        consecutive_gateway_failure: u32v(n),
        enforcing_consecutive_gateway_failure: u32v(enforce_gateway),
        // No success-rate ejection: failure percentage is the absolute test.
        enforcing_success_rate: u32v(0),
        enforcing_failure_percentage: u32v(if percent > 0 { 100 } else { 0 }),
        failure_percentage_threshold: u32v(percent),
        failure_percentage_minimum_hosts: u32v(o.failure_percentage_min_hosts()),
        failure_percentage_request_volume: u32v(o.failure_percentage_min_calls()),
        // Envoy measures failure percentages and un-ejects on one sweep:
        // with that mode on its interval, else as often as the shortest ejection.
        interval: Some(pd(if percent > 0 {
            o.failure_percentage_interval()
        } else {
            base
        })),
        base_ejection_time: Some(pd(base)),
        max_ejection_time: Some(pd(o.max_ejection_time())),
        max_ejection_time_jitter: Some(pd(base / 10)),
        max_ejection_percent: u32v(o.max_ejection_percent()),
        ..Default::default()
    }
}

/// `codes`: the exact set from our metadata, when there.
pub(crate) fn decode_outlier(
    x: &XOutlier,
    codes: Option<CodeSet>,
) -> Result<OutlierDetection, String> {
    let enforced = |e: &Option<UInt32Value>| e.as_ref().is_none_or(|v| v.value > 0);
    let five = enforced(&x.enforcing_consecutive_5xx) && x.consecutive_5xx.is_some();
    let gateway = x
        .enforcing_consecutive_gateway_failure
        .as_ref()
        .is_some_and(|v| v.value > 0);
    let n = match (five, gateway) {
        (true, _) => x.consecutive_5xx.as_ref().map_or(5, |v| v.value),
        (false, true) => x
            .consecutive_gateway_failure
            .as_ref()
            .map_or(5, |v| v.value),
        (false, false) => 0,
    };
    let dur = |d: &Option<PDuration>, field: &str| -> Result<Option<Duration>, String> {
        d.as_ref()
            .map(|d| from_pd(d).ok_or_else(|| format!("{field} is negative")))
            .transpose()
    };
    let codes = codes.or((!five && gateway).then_some(r::GATEWAY_CODES));
    // Envoy's default enforcement is 0: only an explicit one turns it on.
    let enforced_percent = x
        .enforcing_failure_percentage
        .as_ref()
        .is_some_and(|v| v.value > 0);
    Ok(OutlierDetection {
        consecutive_failures: unless_default(n, r::DEFAULT_CONSECUTIVE_FAILURES),
        base_ejection_time: dur(&x.base_ejection_time, "base_ejection_time")?
            .and_then(|d| unless_default(d, r::DEFAULT_BASE_EJECTION)),
        max_ejection_time: dur(&x.max_ejection_time, "max_ejection_time")?
            .and_then(|d| unless_default(d, r::DEFAULT_MAX_EJECTION)),
        max_ejection_percent: x
            .max_ejection_percent
            .as_ref()
            .and_then(|v| unless_default(v.value, r::DEFAULT_MAX_EJECTION_PERCENT)),
        failure_codes: codes.and_then(|c| unless_default(c, r::DEFAULT_FAILURE_CODES)),
        failure_percentage: Some(if enforced_percent {
            x.failure_percentage_threshold
                .as_ref()
                .map_or(85, |v| v.value)
        } else {
            0
        })
        .and_then(|p| unless_default(p, r::DEFAULT_FAILURE_PERCENTAGE)),
        failure_percentage_min_hosts: x
            .failure_percentage_minimum_hosts
            .as_ref()
            .and_then(|v| unless_default(v.value, r::DEFAULT_FAILURE_PERCENTAGE_MIN_HOSTS)),
        failure_percentage_min_calls: x
            .failure_percentage_request_volume
            .as_ref()
            .and_then(|v| unless_default(v.value, r::DEFAULT_FAILURE_PERCENTAGE_MIN_CALLS)),
        failure_percentage_interval: if enforced_percent {
            dur(&x.interval, "interval")?
                .and_then(|d| unless_default(d, r::DEFAULT_FAILURE_PERCENTAGE_INTERVAL))
        } else {
            None
        },
    })
}

// === circuit breakers and the retry budget ===

pub(crate) fn encode_circuit_breakers(res: &Resilience) -> XCircuitBreakers {
    XCircuitBreakers {
        thresholds: vec![Thresholds {
            priority: RoutingPriority::Default as i32,
            max_requests: res.circuit_breakers.max_requests.and_then(u32v),
            retry_budget: Some(thresholds::RetryBudget {
                budget_percent: Some(Percent {
                    value: f64::from(res.retry.budget_percent()),
                }),
                min_retry_concurrency: u32v(res.retry.min_retries_per_second()),
                budget_interval: None,
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The limit and the budget's two numbers (percent, floor).
pub(crate) fn decode_circuit_breakers(
    x: &XCircuitBreakers,
) -> (Option<u32>, Option<u32>, Option<u32>) {
    let Some(t) = x
        .thresholds
        .iter()
        .find(|t| t.priority == RoutingPriority::Default as i32)
    else {
        return (None, None, None);
    };
    let budget = t.retry_budget.as_ref();
    (
        t.max_requests.as_ref().map(|v| v.value),
        budget
            .and_then(|b| b.budget_percent.as_ref())
            .map(|p| p.value.clamp(0.0, 100.0).round() as u32)
            .and_then(|p| unless_default(p, r::DEFAULT_BUDGET_PERCENT)),
        budget
            .and_then(|b| b.min_retry_concurrency.as_ref())
            .and_then(|v| unless_default(v.value, r::DEFAULT_MIN_RETRIES_PER_SECOND)),
    )
}

// === slow start ===

pub(crate) fn slow_start_config(window: Option<Duration>) -> Option<SlowStartConfig> {
    window.map(|w| SlowStartConfig {
        slow_start_window: Some(pd(w)),
        // Linear, as the sidecar ramps.
        aggression: Some(RuntimeDouble {
            default_value: 1.0,
            runtime_key: "meshwire.slow_start_aggression".into(),
        }),
        min_weight_percent: Some(Percent {
            value: SLOW_START_MIN_PERCENT,
        }),
    })
}

pub(crate) fn decode_slow_start(c: Option<&SlowStartConfig>) -> Option<Duration> {
    c?.slow_start_window.as_ref().and_then(from_pd)
}

/// The legacy field's shape of the same config.
pub(crate) fn legacy_slow_start(
    window: Option<Duration>,
) -> Option<envoy_types::pb::envoy::config::cluster::v3::cluster::SlowStartConfig> {
    slow_start_config(window).map(|c| {
        envoy_types::pb::envoy::config::cluster::v3::cluster::SlowStartConfig {
            slow_start_window: c.slow_start_window,
            aggression: c.aggression,
            min_weight_percent: c.min_weight_percent,
        }
    })
}

// === the route's retry policy ===

/// Always sent: Envoy's default (no retry policy) would not retry at all.
pub(crate) fn encode_retry(p: &RetryPolicy) -> XRetryPolicy {
    XRetryPolicy {
        retry_on: p.retry_on().names().join(","),
        num_retries: u32v(p.max_attempts().saturating_sub(1)),
        per_try_timeout: p.per_try_timeout.map(pd),
        retry_back_off: Some(RetryBackOff {
            base_interval: Some(pd(p.backoff_base())),
            max_interval: Some(pd(p.backoff_max())),
        }),
        // Each retry on another endpoint, as the sidecar does.
        retry_host_predicate: vec![RetryHostPredicate {
            name: "envoy.retry_host_predicates.previous_hosts".into(),
            config_type: Some(retry_host_predicate::ConfigType::TypedConfig(
                crate::resources::to_any(PREVIOUS_HOSTS, &PreviousHostsPredicate {}),
            )),
        }],
        host_selection_retry_max_attempts: 3,
        ..Default::default()
    }
}

pub(crate) fn decode_retry(x: &XRetryPolicy) -> Result<RetryPolicy, String> {
    let mut on = CodeSet::EMPTY;
    for cond in x
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        // Conditions that are not gRPC codes (connect-failure, ...) are
        // Envoy's own; the sidecar fails over unprocessed calls anyway.
        if let Ok(c) = CodeSet::parse(cond) {
            on = CodeSet::from_bits(on.bits() | c.bits());
        }
    }
    let dur = |d: Option<&PDuration>, field: &str| -> Result<Option<Duration>, String> {
        d.map(|d| from_pd(d).ok_or_else(|| format!("{field} is negative")))
            .transpose()
    };
    let back = x.retry_back_off.as_ref();
    let attempts = x
        .num_retries
        .as_ref()
        .map_or(1, |n| n.value)
        .saturating_add(1);
    Ok(RetryPolicy {
        retry_on: (!on.is_empty())
            .then_some(on)
            .and_then(|c| unless_default(c, r::DEFAULT_RETRY_ON)),
        max_attempts: unless_default(attempts.min(r::MAX_ATTEMPTS + 1), r::DEFAULT_MAX_ATTEMPTS),
        per_try_timeout: dur(x.per_try_timeout.as_ref(), "per_try_timeout")?,
        backoff_base: dur(back.and_then(|b| b.base_interval.as_ref()), "base_interval")?
            .and_then(|d| unless_default(d, r::DEFAULT_BACKOFF_BASE)),
        backoff_max: dur(back.and_then(|b| b.max_interval.as_ref()), "max_interval")?
            .and_then(|d| unless_default(d, r::DEFAULT_BACKOFF_MAX)),
        budget_percent: None,
        min_retries_per_second: None,
    })
}

/// What a Meshwire sidecar reads from one cluster (it takes no routes):
/// everything but the retry policy from Envoy's cluster fields, which the
/// caller fills from the metadata's copy of the route's policy.
pub(crate) fn decode(
    x: &XCluster,
    outlier_codes: Option<CodeSet>,
    slow_start: Option<Duration>,
) -> Result<Resilience, (&'static str, String)> {
    let mut res = Resilience::default();
    if let Some(o) = &x.outlier_detection {
        res.outlier = decode_outlier(o, outlier_codes).map_err(|e| ("outlier_detection", e))?;
    }
    if let Some(cb) = &x.circuit_breakers {
        let (max, percent, floor) = decode_circuit_breakers(cb);
        res.circuit_breakers.max_requests = max;
        res.retry.budget_percent = percent;
        res.retry.min_retries_per_second = floor;
    }
    res.slow_start = slow_start;
    Ok(res)
}
