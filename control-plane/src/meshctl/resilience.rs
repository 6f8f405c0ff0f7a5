//! `meshctl service create|update` flags for a service's resilience settings,
//! named after what they do; each also takes `default` (back to the default,
//! on update) and maps to one update-mask path.

use std::time::Duration;

use clap::Args;
use meshwire_mesh::CodeSet;
use meshwire_proto::admin::v1 as pb;

/// A flag's value: a setting, or `default`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Setting<T> {
    Set(T),
    Default,
}

fn or_default<T>(s: &str, parse: impl Fn(&str) -> Result<T, String>) -> Result<Setting<T>, String> {
    if s == "default" {
        Ok(Setting::Default)
    } else {
        parse(s).map(Setting::Set)
    }
}

fn count(s: &str) -> Result<Setting<u32>, String> {
    or_default(s, |s| {
        s.parse::<u32>()
            .map_err(|_| format!("{s:?} is not a whole number (or `default`)"))
    })
}

fn percent(s: &str) -> Result<Setting<u32>, String> {
    or_default(s, |s| {
        s.strip_suffix('%')
            .unwrap_or(s)
            .parse::<u32>()
            .map_err(|_| format!("{s:?} is not a percentage like 50% (or `default`)"))
    })
}

fn duration(s: &str) -> Result<Setting<Duration>, String> {
    or_default(s, meshwire_mesh::cli::parse_duration)
}

fn codes(s: &str) -> Result<Setting<CodeSet>, String> {
    or_default(s, CodeSet::parse)
}

#[derive(Debug, Default, Args)]
pub(super) struct ResilienceOpts {
    /// Circuit breaker: most calls in flight from one caller to the service; excess fails at once (UNAVAILABLE, overloaded).
    #[arg(long, value_name = "N", value_parser = count)]
    pub(super) max_requests: Option<Setting<u32>>,
    /// Circuit breaker: most calls in flight from one caller to each endpoint (default: none).
    #[arg(long, value_name = "N", value_parser = count)]
    pub(super) max_requests_per_endpoint: Option<Setting<u32>>,
    /// Attempts per call the app failed, the first included, each on another endpoint (1..5, default 2).
    #[arg(long, value_name = "N", value_parser = count)]
    pub(super) retry_attempts: Option<Setting<u32>>,
    /// gRPC codes retried: unavailable (default), internal, resource-exhausted, cancelled, deadline-exceeded.
    #[arg(long, value_name = "CODES", value_parser = codes)]
    pub(super) retry_on: Option<Setting<CodeSet>>,
    /// Each attempt's time limit until the response starts; a timed-out attempt is retried elsewhere.
    #[arg(long, value_name = "D", value_parser = duration)]
    pub(super) per_try_timeout: Option<Setting<Duration>>,
    /// First backoff between attempts (default 25ms), doubling up to --retry-backoff-max (250ms).
    #[arg(long, value_name = "D", value_parser = duration)]
    pub(super) retry_backoff: Option<Setting<Duration>>,
    #[arg(long, value_name = "D", value_parser = duration)]
    pub(super) retry_backoff_max: Option<Setting<Duration>>,
    /// Retry budget: retries at most this share of calls (default 20%)...
    #[arg(long, value_name = "PCT", value_parser = percent)]
    pub(super) retry_budget: Option<Setting<u32>>,
    /// ...plus this many a second whatever the traffic (default 10).
    #[arg(long, value_name = "N", value_parser = count)]
    pub(super) retry_budget_min: Option<Setting<u32>>,
    /// Outlier detection: eject an endpoint after N consecutive failures (default 5; 0 turns it off).
    #[arg(long, value_name = "N", value_parser = count)]
    pub(super) eject_after: Option<Setting<u32>>,
    /// gRPC codes that count as failures (default unavailable,internal,unknown,data-loss).
    #[arg(long, value_name = "CODES", value_parser = codes)]
    pub(super) eject_on: Option<Setting<CodeSet>>,
    /// First ejection time (default 1s), doubling per ejection in a row up to --max-ejection-time (60s).
    #[arg(long, value_name = "D", value_parser = duration)]
    pub(super) ejection_time: Option<Setting<Duration>>,
    #[arg(long, value_name = "D", value_parser = duration)]
    pub(super) max_ejection_time: Option<Setting<Duration>>,
    /// Most endpoints ejected at once (default 50%).
    #[arg(long, value_name = "PCT", value_parser = percent)]
    pub(super) max_ejection: Option<Setting<u32>>,
    /// Also eject an endpoint failing this share of its calls in an interval (default 85%; 0 turns it off)...
    #[arg(long, value_name = "PCT", value_parser = percent)]
    pub(super) eject_failing: Option<Setting<u32>>,
    /// ...judged once this many endpoints (default 5)...
    #[arg(long, value_name = "N", value_parser = count)]
    pub(super) eject_failing_min_endpoints: Option<Setting<u32>>,
    /// ...had this many calls each (default 50)...
    #[arg(long, value_name = "N", value_parser = count)]
    pub(super) eject_failing_min_calls: Option<Setting<u32>>,
    /// ...in this interval (default 10s).
    #[arg(long, value_name = "D", value_parser = duration)]
    pub(super) eject_failing_interval: Option<Setting<Duration>>,
    /// New and recovered endpoints ramp up over this window (0s: off; default: the sidecar's --slow-start).
    #[arg(long, value_name = "D", value_parser = duration)]
    pub(super) slow_start: Option<Setting<Duration>>,
}

impl ResilienceOpts {
    /// Fills `s` and names the paths set (or reset).
    pub(super) fn fill(&self, s: &mut pb::Service, paths: &mut Vec<String>) {
        let pdur = |d: Duration| prost_types::Duration::try_from(d).ok();
        if let Some(f) = self.slow_start {
            if let Setting::Set(v) = f {
                s.slow_start = pdur(v);
            }
            paths.push("slow_start".to_owned());
        }
        let mut touch = |path: &str| paths.push(path.to_owned());
        let o = s.outlier.get_or_insert_with(Default::default);
        let r = s.retry.get_or_insert_with(Default::default);
        let c = s.circuit_breakers.get_or_insert_with(Default::default);
        macro_rules! put {
            ($flag:expr, $path:literal, |$v:ident| $set:expr) => {
                if let Some(f) = $flag {
                    if let Setting::Set($v) = f {
                        $set;
                    }
                    touch($path);
                }
            };
        }
        put!(self.max_requests, "circuit_breakers.max_requests", |v| c
            .max_requests =
            Some(v));
        put!(
            self.max_requests_per_endpoint,
            "circuit_breakers.max_requests_per_endpoint",
            |v| c.max_requests_per_endpoint = Some(v)
        );
        put!(self.retry_attempts, "retry.max_attempts", |v| r
            .max_attempts =
            Some(v));
        put!(self.retry_on, "retry.retry_on", |v| r.retry_on = v.names());
        put!(self.per_try_timeout, "retry.per_try_timeout", |v| r
            .per_try_timeout =
            pdur(v));
        put!(self.retry_backoff, "retry.backoff_base", |v| r
            .backoff_base =
            pdur(v));
        put!(self.retry_backoff_max, "retry.backoff_max", |v| r
            .backoff_max =
            pdur(v));
        put!(self.retry_budget, "retry.budget_percent", |v| r
            .budget_percent =
            Some(v));
        put!(self.retry_budget_min, "retry.min_retries_per_second", |v| {
            r.min_retries_per_second = Some(v)
        });
        put!(self.eject_after, "outlier.consecutive_failures", |v| o
            .consecutive_failures =
            Some(v));
        put!(self.eject_on, "outlier.failure_codes", |v| o
            .failure_codes =
            v.names());
        put!(self.ejection_time, "outlier.base_ejection_time", |v| o
            .base_ejection_time =
            pdur(v));
        put!(self.max_ejection_time, "outlier.max_ejection_time", |v| o
            .max_ejection_time =
            pdur(v));
        put!(self.max_ejection, "outlier.max_ejection_percent", |v| o
            .max_ejection_percent =
            Some(v));
        put!(self.eject_failing, "outlier.failure_percentage", |v| o
            .failure_percentage =
            Some(v));
        put!(
            self.eject_failing_min_endpoints,
            "outlier.failure_percentage_min_hosts",
            |v| o.failure_percentage_min_hosts = Some(v)
        );
        put!(
            self.eject_failing_min_calls,
            "outlier.failure_percentage_min_calls",
            |v| o.failure_percentage_min_calls = Some(v)
        );
        put!(
            self.eject_failing_interval,
            "outlier.failure_percentage_interval",
            |v| o.failure_percentage_interval = pdur(v)
        );
        // Only the parts named: an empty message reads the same, but clutters.
        if s.outlier.as_ref().is_some_and(|o| *o == Default::default()) {
            s.outlier = None;
        }
        if s.retry.as_ref().is_some_and(|r| *r == Default::default()) {
            s.retry = None;
        }
        if s.circuit_breakers.is_some_and(|c| c == Default::default()) {
            s.circuit_breakers = None;
        }
    }
}

/// `5 failures, 1s..1m, max 50%, on unavailable,...` lines for `service get`.
pub(super) fn summary(s: &pb::Service) -> [(&'static str, String); 4] {
    let d = |d: Option<&prost_types::Duration>| {
        d.and_then(|d| Duration::try_from(*d).ok())
            .map(|d| humantime::format_duration(d).to_string())
    };
    let o = s.outlier.clone().unwrap_or_default();
    let r = s.retry.clone().unwrap_or_default();
    let c = s.circuit_breakers.unwrap_or_default();
    let list = |l: &[String], default: &str| {
        if l.is_empty() {
            default.to_owned()
        } else {
            l.join(",")
        }
    };
    let outlier = if o.consecutive_failures == Some(0) {
        "off".to_owned()
    } else {
        format!(
            "eject after {} failures ({}), {}..{}, at most {}%",
            o.consecutive_failures.unwrap_or(5),
            list(&o.failure_codes, "unavailable,internal,unknown,data-loss"),
            d(o.base_ejection_time.as_ref()).unwrap_or_else(|| "1s".into()),
            d(o.max_ejection_time.as_ref()).unwrap_or_else(|| "1m".into()),
            o.max_ejection_percent.unwrap_or(50),
        ) + &match o.failure_percentage.unwrap_or(85) {
            0 => String::new(),
            p => format!(
                "; or failing {p}% of {}+ calls in {} (with {}+ such endpoints)",
                o.failure_percentage_min_calls.unwrap_or(50),
                d(o.failure_percentage_interval.as_ref()).unwrap_or_else(|| "10s".into()),
                o.failure_percentage_min_hosts.unwrap_or(5),
            ),
        }
    };
    let retry = format!(
        "{} attempts on {}, per try {}, backoff {}..{}, budget {}% + {}/s",
        r.max_attempts.unwrap_or(2),
        list(&r.retry_on, "unavailable"),
        d(r.per_try_timeout.as_ref()).unwrap_or_else(|| "-".into()),
        d(r.backoff_base.as_ref()).unwrap_or_else(|| "25ms".into()),
        d(r.backoff_max.as_ref()).unwrap_or_else(|| "250ms".into()),
        r.budget_percent.unwrap_or(20),
        r.min_retries_per_second.unwrap_or(10),
    );
    let limits = format!(
        "{} per service{}",
        c.max_requests
            .map_or_else(|| "sidecar default".to_owned(), |n| n.to_string()),
        c.max_requests_per_endpoint
            .map_or_else(String::new, |n| format!(", {n} per endpoint")),
    );
    let slow = d(s.slow_start.as_ref()).unwrap_or_else(|| "sidecar default".into());
    [
        ("outlier:", outlier),
        ("retry:", retry),
        ("max requests:", limits),
        ("slow start:", slow),
    ]
}

/// The settings as set (unset ones are absent: defaults).
pub(super) fn json(s: &pb::Service) -> serde_json::Value {
    use serde_json::json;
    let d = |d: Option<&prost_types::Duration>| {
        d.and_then(|d| Duration::try_from(*d).ok())
            .map(|d| humantime::format_duration(d).to_string())
    };
    let o = s.outlier.clone().unwrap_or_default();
    let r = s.retry.clone().unwrap_or_default();
    let c = s.circuit_breakers.unwrap_or_default();
    json!({
        "outlier": {
            "consecutive_failures": o.consecutive_failures,
            "base_ejection_time": d(o.base_ejection_time.as_ref()),
            "max_ejection_time": d(o.max_ejection_time.as_ref()),
            "max_ejection_percent": o.max_ejection_percent,
            "failure_codes": (!o.failure_codes.is_empty()).then_some(&o.failure_codes),
            "failure_percentage": o.failure_percentage,
            "failure_percentage_min_hosts": o.failure_percentage_min_hosts,
            "failure_percentage_min_calls": o.failure_percentage_min_calls,
            "failure_percentage_interval": d(o.failure_percentage_interval.as_ref()),
        },
        "retry": {
            "retry_on": (!r.retry_on.is_empty()).then_some(&r.retry_on),
            "max_attempts": r.max_attempts,
            "per_try_timeout": d(r.per_try_timeout.as_ref()),
            "backoff_base": d(r.backoff_base.as_ref()),
            "backoff_max": d(r.backoff_max.as_ref()),
            "budget_percent": r.budget_percent,
            "min_retries_per_second": r.min_retries_per_second,
        },
        "circuit_breakers": {
            "max_requests": c.max_requests,
            "max_requests_per_endpoint": c.max_requests_per_endpoint,
        },
        "slow_start": d(s.slow_start.as_ref()),
    })
}
