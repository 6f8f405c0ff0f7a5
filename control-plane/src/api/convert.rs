//! Requests → model values (checked, errors naming the field by its path in
//! the request) and model values → responses.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use meshwire_mesh::policy::{Action, Policy, Rule};
use meshwire_mesh::ratelimit::MAX_OVERRIDES;
use meshwire_mesh::resilience::{CircuitBreakers, OutlierDetection, RetryPolicy};
use meshwire_mesh::{
    Cluster, CodeSet, Endpoint, HashSource, LbPolicy, LimitPer, ModelError, Protocol, Rate,
    RateLimit, RateOverride, Resilience,
};
use meshwire_proto::admin::v1 as pb;
use tonic::Status;

use super::status::{api_field, invalid, required};
use crate::ca::Ca;
use crate::nodes::NodeStatus;
use crate::registry::{Event, LbKind, ServiceInfo, ServicePatch, check_service_name};
use crate::store::Change;

/// Limits on free-form endpoint fields, so one call cannot bloat every snapshot.
const MAX_LABEL: usize = 253;
const MAX_METADATA_ENTRIES: usize = 64;
const MAX_METADATA_VALUE: usize = 4096;
const MAX_IDENTITY: usize = 2048;

/// The fields `UpdateService` can change.
const UPDATABLE: &str = "lb_policy, active_request_bias, connect_timeout, request_timeout, authority, permissive, policy, protocol, hash_policy, hash_balance_factor, outlier, retry, circuit_breakers, slow_start, rate_limit, zone_aware, zone_min_healthy (or one field of those, e.g. retry.max_attempts)";

/// Bounds on a policy, so one call cannot bloat every snapshot.
const MAX_RULES: usize = 256;
const MAX_RULE_ENTRIES: usize = 256;

// === requests → model ===

pub(super) fn service_name(field: &str, name: &str) -> Result<(), Status> {
    check_service_name(field, name).map_err(invalid)
}

pub(super) fn address(field: &str, s: &str) -> Result<SocketAddr, Status> {
    s.parse::<SocketAddr>().map_err(|_| {
        invalid(ModelError::new(
            field,
            format!(
                "{} is not an ip:port address (e.g. 10.0.0.7:15006 or [fd00::7]:15006)",
                meshwire_mesh::grpc::shown(s)
            ),
        ))
    })
}

fn lb_kind(value: i32) -> Result<Option<LbKind>, ModelError> {
    match pb::LbPolicy::try_from(value) {
        Ok(pb::LbPolicy::Unspecified) => Ok(None),
        Ok(pb::LbPolicy::LeastRequest) => Ok(Some(LbKind::LeastRequest)),
        Ok(pb::LbPolicy::RoundRobin) => Ok(Some(LbKind::RoundRobin)),
        Ok(pb::LbPolicy::RingHash) => Ok(Some(LbKind::RingHash)),
        Ok(pb::LbPolicy::Maglev) => Ok(Some(LbKind::Maglev)),
        Err(_) => Err(ModelError::new(
            "lb_policy",
            format!(
                "unknown value {value}; use LB_POLICY_LEAST_REQUEST, LB_POLICY_ROUND_ROBIN, LB_POLICY_RING_HASH or LB_POLICY_MAGLEV"
            ),
        )),
    }
}

fn hash_policy(sources: &[pb::HashSource]) -> Result<Vec<HashSource>, ModelError> {
    use pb::hash_source::Source;
    sources
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let at = |e: ModelError| e.within(&format!("hash_policy[{i}]"));
            let h = match &s.source {
                Some(Source::Header(h)) => HashSource::Header(h.clone()),
                Some(Source::SourceIp(true)) => HashSource::SourceIp,
                Some(Source::Cookie(c)) => HashSource::Cookie {
                    name: c.name.clone(),
                    ttl: duration("ttl", c.ttl.as_ref()).map_err(|e| at(e.within("cookie")))?,
                },
                Some(Source::SourceIp(false)) | None => {
                    return Err(at(ModelError::new(
                        "",
                        "set one of header, source_ip (true) or cookie",
                    )));
                }
            };
            h.validate().map_err(at)?;
            Ok(h)
        })
        .collect()
}

fn hash_policy_pb(sources: &[HashSource]) -> Vec<pb::HashSource> {
    use pb::hash_source::Source;
    sources
        .iter()
        .map(|s| pb::HashSource {
            source: Some(match s {
                HashSource::Header(h) => Source::Header(h.clone()),
                HashSource::SourceIp => Source::SourceIp(true),
                HashSource::Cookie { name, ttl } => Source::Cookie(pb::HashCookie {
                    name: name.clone(),
                    ttl: ttl.and_then(|t| prost_types::Duration::try_from(t).ok()),
                }),
            }),
        })
        .collect()
}

pub(super) fn duration(
    field: &str,
    d: Option<&prost_types::Duration>,
) -> Result<Option<Duration>, ModelError> {
    d.map(|d| {
        Duration::try_from(*d)
            .map_err(|_| ModelError::new(field, format!("{d} is not a non-negative duration")))
    })
    .transpose()
}

fn action(field: &str, value: i32, default: Option<Action>) -> Result<Action, ModelError> {
    match pb::Action::try_from(value) {
        Ok(pb::Action::Allow) => Ok(Action::Allow),
        Ok(pb::Action::Deny) => Ok(Action::Deny),
        Ok(pb::Action::Unspecified) => default
            .ok_or_else(|| ModelError::new(field, "is required: ACTION_ALLOW or ACTION_DENY")),
        Err(_) => Err(ModelError::new(
            field,
            format!("unknown value {value}; use ACTION_ALLOW or ACTION_DENY"),
        )),
    }
}

/// A policy from a request; field paths relative to the policy
/// (`rules[0].cidrs[1]`).
fn policy(p: &pb::Policy) -> Result<Policy, ModelError> {
    let default_action = action("default_action", p.default_action, Some(Action::Allow))?;
    if p.rules.len() > MAX_RULES {
        return Err(ModelError::new(
            "rules",
            format!("at most {MAX_RULES} rules, got {}", p.rules.len()),
        ));
    }
    let mut rules = Vec::with_capacity(p.rules.len());
    for (i, r) in p.rules.iter().enumerate() {
        let at = |f: &str| format!("rules[{i}].{f}");
        for (name, list) in [
            ("sources", &r.sources),
            ("methods", &r.methods),
            ("cidrs", &r.cidrs),
        ] {
            if list.len() > MAX_RULE_ENTRIES {
                return Err(ModelError::new(
                    at(name),
                    format!("at most {MAX_RULE_ENTRIES} entries, got {}", list.len()),
                ));
            }
            for (j, v) in list.iter().enumerate() {
                text(&at(&format!("{name}[{j}]")), v, MAX_IDENTITY)?;
            }
        }
        rules.push(Rule {
            action: Some(action(&at("action"), r.action, None)?),
            sources: r.sources.clone(),
            methods: r.methods.clone(),
            cidrs: r.cidrs.clone(),
        });
    }
    let p = Policy {
        default_action,
        rules,
    };
    p.validate()?;
    Ok(p)
}

fn authority(a: Option<&String>) -> Result<Option<String>, ModelError> {
    match a {
        Some(a) if a.is_empty() => Err(ModelError::new(
            "authority",
            "must not be empty (leave it unset for none)",
        )),
        a => Ok(a.cloned()),
    }
}

fn protocol(p: i32) -> Result<Protocol, ModelError> {
    match pb::Protocol::try_from(p) {
        Ok(pb::Protocol::Unspecified | pb::Protocol::Grpc) => Ok(Protocol::Grpc),
        Ok(pb::Protocol::Http) => Ok(Protocol::Http),
        Ok(pb::Protocol::Tcp) => Ok(Protocol::Tcp),
        Err(_) => Err(ModelError::new(
            "protocol",
            format!("unknown value {p} (PROTOCOL_GRPC, PROTOCOL_HTTP or PROTOCOL_TCP)"),
        )),
    }
}

/// A rate limit from a request (field paths from `rate_limit`); checked
/// whole by [`meshwire_mesh::RateLimit::validate`], the check sidecars run.
fn rate_limit(l: &pb::RateLimit) -> Result<RateLimit, ModelError> {
    let at = |e: ModelError| e.within("rate_limit");
    let per = match pb::RateLimitPer::try_from(l.per) {
        Ok(pb::RateLimitPer::Unspecified | pb::RateLimitPer::Service) => LimitPer::Service,
        Ok(pb::RateLimitPer::Caller) => LimitPer::Caller,
        Ok(pb::RateLimitPer::Ip) => LimitPer::Ip,
        Err(_) => {
            return Err(at(ModelError::new(
                "per",
                format!(
                    "unknown value {}; use RATE_LIMIT_PER_SERVICE, RATE_LIMIT_PER_CALLER or RATE_LIMIT_PER_IP",
                    l.per
                ),
            )));
        }
    };
    let rate = |field: &str, s: &str| -> Result<Rate, ModelError> {
        s.parse().map_err(|e: ModelError| at(e.within(field)))
    };
    let mut overrides = Vec::with_capacity(l.overrides.len().min(MAX_OVERRIDES + 1));
    for (i, o) in l.overrides.iter().take(MAX_OVERRIDES + 1).enumerate() {
        overrides.push(RateOverride {
            caller: o.caller.clone(),
            rate: rate(&format!("overrides[{i}].rate"), &o.rate)?,
            burst: o.burst,
        });
    }
    let limit = RateLimit {
        rate: rate("rate", &l.rate)?,
        burst: l.burst,
        per,
        overrides,
    };
    limit.validate().map_err(at)?;
    Ok(limit)
}

pub(crate) fn rate_limit_pb(l: &RateLimit) -> pb::RateLimit {
    pb::RateLimit {
        rate: l.rate.to_string(),
        burst: l.burst,
        per: match l.per {
            LimitPer::Service => pb::RateLimitPer::Service,
            LimitPer::Caller => pb::RateLimitPer::Caller,
            LimitPer::Ip => pb::RateLimitPer::Ip,
        }
        .into(),
        overrides: l
            .overrides
            .iter()
            .map(|o| pb::RateLimitOverride {
                caller: o.caller.clone(),
                rate: o.rate.to_string(),
                burst: o.burst,
            })
            .collect(),
    }
}

fn protocol_pb(p: Protocol) -> i32 {
    match p {
        Protocol::Grpc => pb::Protocol::Grpc,
        Protocol::Http => pb::Protocol::Http,
        Protocol::Tcp => pb::Protocol::Tcp,
    }
    .into()
}

/// A list of code names; empty: unset (the default set).
fn codes(field: &str, names: &[String]) -> Result<Option<CodeSet>, ModelError> {
    if names.is_empty() {
        return Ok(None);
    }
    let mut set = CodeSet::EMPTY;
    for (i, n) in names.iter().enumerate() {
        let one = CodeSet::parse(n).map_err(|e| ModelError::new(format!("{field}[{i}]"), e))?;
        if one.is_empty() {
            return Err(ModelError::new(
                format!("{field}[{i}]"),
                "must not be empty",
            ));
        }
        set = CodeSet::from_bits(set.bits() | one.bits());
    }
    Ok(Some(set))
}

/// The resilience settings of a request (field paths relative to the service).
fn resilience(s: &pb::Service) -> Result<Resilience, ModelError> {
    let mut r = Resilience::default();
    if let Some(o) = &s.outlier {
        let at = |e: ModelError| e.within("outlier");
        r.outlier = OutlierDetection {
            consecutive_failures: o.consecutive_failures,
            base_ejection_time: duration("base_ejection_time", o.base_ejection_time.as_ref())
                .map_err(at)?,
            max_ejection_time: duration("max_ejection_time", o.max_ejection_time.as_ref())
                .map_err(at)?,
            max_ejection_percent: o.max_ejection_percent,
            failure_codes: codes("failure_codes", &o.failure_codes).map_err(at)?,
            failure_percentage: o.failure_percentage,
            failure_percentage_min_hosts: o.failure_percentage_min_hosts,
            failure_percentage_min_calls: o.failure_percentage_min_calls,
            failure_percentage_interval: duration(
                "failure_percentage_interval",
                o.failure_percentage_interval.as_ref(),
            )
            .map_err(at)?,
        };
    }
    if let Some(p) = &s.retry {
        let at = |e: ModelError| e.within("retry");
        r.retry = RetryPolicy {
            retry_on: codes("retry_on", &p.retry_on).map_err(at)?,
            max_attempts: p.max_attempts,
            per_try_timeout: duration("per_try_timeout", p.per_try_timeout.as_ref()).map_err(at)?,
            backoff_base: duration("backoff_base", p.backoff_base.as_ref()).map_err(at)?,
            backoff_max: duration("backoff_max", p.backoff_max.as_ref()).map_err(at)?,
            budget_percent: p.budget_percent,
            min_retries_per_second: p.min_retries_per_second,
        };
    }
    if let Some(c) = &s.circuit_breakers {
        r.circuit_breakers = CircuitBreakers {
            max_requests: c.max_requests,
            max_requests_per_endpoint: c.max_requests_per_endpoint,
        };
    }
    r.slow_start = duration("slow_start", s.slow_start.as_ref())?;
    r.validate()?;
    Ok(r)
}

/// A new service from a request (validated whole by the registry).
pub(super) fn new_service(s: &pb::Service) -> Result<Cluster, ModelError> {
    let mut c = Cluster::new(&s.name);
    let patch = ServicePatch {
        lb_policy: Some(lb_kind(s.lb_policy)?.unwrap_or(LbKind::LeastRequest)),
        active_request_bias: Some(s.active_request_bias),
        connect_timeout: duration("connect_timeout", s.connect_timeout.as_ref())?,
        request_timeout: Some(duration("request_timeout", s.request_timeout.as_ref())?),
        authority: Some(authority(s.authority.as_ref())?),
        permissive: Some(s.permissive),
        protocol: Some(protocol(s.protocol)?),
        policy: Some(
            s.policy
                .as_ref()
                .map(policy)
                .transpose()
                .map_err(|e| e.within("policy"))?,
        ),
        hash_policy: Some(hash_policy(&s.hash_policy)?),
        hash_balance_factor: Some(s.hash_balance_factor),
        resilience: Some((
            resilience(s)?,
            meshwire_mesh::resilience::PATHS
                .iter()
                .map(|p| (*p).to_owned())
                .collect(),
        )),
        rate_limit: Some(s.rate_limit.as_ref().map(rate_limit).transpose()?),
        zone_aware: Some(s.zone_aware.unwrap_or(true)),
        zone_min_healthy: Some(s.zone_min_healthy),
    };
    patch.apply(&mut c)?;
    c.validate().map_err(api_field)?;
    Ok(c)
}

/// The fields named in `paths`, from `s`; a named field left unset goes back
/// to its default. Errors are paths in the request.
pub(super) fn service_patch(s: &pb::Service, paths: &[String]) -> Result<ServicePatch, ModelError> {
    if paths.is_empty() {
        return Err(ModelError::new(
            "update_mask",
            format!("must name at least one field ({UPDATABLE})"),
        ));
    }
    let mut patch = ServicePatch::default();
    for (i, p) in paths.iter().enumerate() {
        let in_service = |e: ModelError| e.within("service");
        let path = p.strip_prefix("service.").unwrap_or(p);
        if meshwire_mesh::resilience::PATHS.contains(&path) {
            let (_, named) = match &mut patch.resilience {
                Some(r) => r,
                None => patch
                    .resilience
                    .insert((resilience(s).map_err(in_service)?, Vec::new())),
            };
            named.push(path.to_owned());
            continue;
        }
        match path {
            "lb_policy" => {
                patch.lb_policy = Some(
                    lb_kind(s.lb_policy)
                        .map_err(in_service)?
                        .unwrap_or(LbKind::LeastRequest),
                );
            }
            "active_request_bias" => patch.active_request_bias = Some(s.active_request_bias),
            "connect_timeout" => {
                patch.connect_timeout = Some(
                    duration("connect_timeout", s.connect_timeout.as_ref())
                        .map_err(in_service)?
                        .unwrap_or(Cluster::DEFAULT_CONNECT_TIMEOUT),
                );
            }
            "request_timeout" => {
                patch.request_timeout = Some(
                    duration("request_timeout", s.request_timeout.as_ref()).map_err(in_service)?,
                );
            }
            "authority" => {
                patch.authority = Some(authority(s.authority.as_ref()).map_err(in_service)?);
            }
            "permissive" => patch.permissive = Some(s.permissive),
            "protocol" => patch.protocol = Some(protocol(s.protocol).map_err(in_service)?),
            "hash_policy" => {
                patch.hash_policy = Some(hash_policy(&s.hash_policy).map_err(in_service)?);
            }
            "hash_balance_factor" => patch.hash_balance_factor = Some(s.hash_balance_factor),
            "zone_aware" => patch.zone_aware = Some(s.zone_aware.unwrap_or(true)),
            "zone_min_healthy" => patch.zone_min_healthy = Some(s.zone_min_healthy),
            "policy" => {
                patch.policy = Some(
                    s.policy
                        .as_ref()
                        .map(policy)
                        .transpose()
                        .map_err(|e| e.within("service.policy"))?,
                );
            }
            "rate_limit" => {
                patch.rate_limit = Some(
                    s.rate_limit
                        .as_ref()
                        .map(rate_limit)
                        .transpose()
                        .map_err(in_service)?,
                );
            }
            "name" => {
                return Err(ModelError::new(
                    format!("update_mask.paths[{i}]"),
                    "a service cannot be renamed (create the new one, then delete this one)",
                ));
            }
            other => {
                return Err(ModelError::new(
                    format!("update_mask.paths[{i}]"),
                    format!("unknown field {other:?}; use {UPDATABLE}"),
                ));
            }
        }
    }
    Ok(patch)
}

/// Free text that ends up in snapshots: bounded, no control characters.
fn text(field: &str, s: &str, max: usize) -> Result<(), ModelError> {
    if s.len() > max {
        return Err(ModelError::new(
            field,
            format!("must be at most {max} bytes"),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(ModelError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// A new endpoint from a request (field paths relative to the endpoint).
pub(super) fn new_endpoint(e: &pb::Endpoint) -> Result<Endpoint, Status> {
    let addr = address("endpoint.address", &e.address)?;
    let check = || -> Result<Endpoint, ModelError> {
        let mut ep = Endpoint::new(addr).with_weight(e.weight.unwrap_or(1));
        ep.draining = e.draining;
        if !e.zone.is_empty() {
            text("zone", &e.zone, MAX_LABEL)?;
            ep.zone = Some(e.zone.clone());
        }
        if let Some(id) = &e.identity {
            if id.is_empty() {
                return Err(ModelError::new(
                    "identity",
                    "must not be empty (leave it unset for none)",
                ));
            }
            if id.chars().any(char::is_whitespace) {
                return Err(ModelError::new("identity", "must not contain whitespace"));
            }
            text("identity", id, MAX_IDENTITY)?;
            ep.identity = Some(id.clone());
        }
        if e.metadata.len() > MAX_METADATA_ENTRIES {
            return Err(ModelError::new(
                "metadata",
                format!(
                    "at most {MAX_METADATA_ENTRIES} entries, got {}",
                    e.metadata.len()
                ),
            ));
        }
        let metadata: BTreeMap<String, String> = e
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in &metadata {
            let field = format!("metadata[{k:?}]");
            if k.is_empty() {
                return Err(ModelError::new("metadata", "keys must not be empty"));
            }
            text(&field, k, MAX_LABEL)?;
            text(&field, v, MAX_METADATA_VALUE)?;
        }
        ep.metadata = metadata;
        ep.validate()?;
        Ok(ep)
    };
    check().map_err(|m| invalid(m.within("endpoint")))
}

// === model → responses ===

pub(super) fn service_pb(info: &ServiceInfo) -> pb::Service {
    let c = &info.settings;
    let (lb_policy, active_request_bias) = match c.lb {
        LbPolicy::LeastRequest {
            active_request_bias,
        } => (pb::LbPolicy::LeastRequest, Some(active_request_bias)),
        LbPolicy::RoundRobin => (pb::LbPolicy::RoundRobin, None),
        LbPolicy::RingHash(_) => (pb::LbPolicy::RingHash, None),
        LbPolicy::Maglev(_) => (pb::LbPolicy::Maglev, None),
    };
    let dur = |d: Duration| prost_types::Duration::try_from(d).ok();
    pb::Service {
        name: c.name.clone(),
        lb_policy: lb_policy.into(),
        active_request_bias,
        connect_timeout: dur(c.connect_timeout),
        request_timeout: c.request_timeout.and_then(dur),
        authority: c.authority.clone(),
        endpoint_count: u32::try_from(info.endpoints).unwrap_or(u32::MAX),
        permissive: c.permissive,
        policy: c.policy.as_ref().map(policy_pb),
        protocol: protocol_pb(c.protocol),
        hash_policy: hash_policy_pb(&c.hash_policy),
        hash_balance_factor: c.lb.hash().and_then(|h| h.balance_factor),
        outlier: resilience_pb_outlier(&c.resilience.outlier),
        retry: resilience_pb_retry(&c.resilience.retry),
        circuit_breakers: (!c.resilience.circuit_breakers.is_unset()).then_some(
            pb::CircuitBreakers {
                max_requests: c.resilience.circuit_breakers.max_requests,
                max_requests_per_endpoint: c.resilience.circuit_breakers.max_requests_per_endpoint,
            },
        ),
        slow_start: c.resilience.slow_start.and_then(dur),
        rate_limit: c.rate_limit.as_ref().map(rate_limit_pb),
        zone_aware: Some(c.zones.enabled),
        zone_min_healthy: Some(c.zones.min_healthy),
    }
}

/// Only what is set: unset fields read as the defaults.
fn resilience_pb_outlier(o: &OutlierDetection) -> Option<pb::OutlierDetection> {
    let dur = |d: Option<Duration>| d.and_then(|d| prost_types::Duration::try_from(d).ok());
    (!o.is_unset()).then(|| pb::OutlierDetection {
        consecutive_failures: o.consecutive_failures,
        base_ejection_time: dur(o.base_ejection_time),
        max_ejection_time: dur(o.max_ejection_time),
        max_ejection_percent: o.max_ejection_percent,
        failure_codes: o.failure_codes.map(CodeSet::names).unwrap_or_default(),
        failure_percentage: o.failure_percentage,
        failure_percentage_min_hosts: o.failure_percentage_min_hosts,
        failure_percentage_min_calls: o.failure_percentage_min_calls,
        failure_percentage_interval: dur(o.failure_percentage_interval),
    })
}

fn resilience_pb_retry(r: &RetryPolicy) -> Option<pb::RetryPolicy> {
    let dur = |d: Option<Duration>| d.and_then(|d| prost_types::Duration::try_from(d).ok());
    (!r.is_unset()).then(|| pb::RetryPolicy {
        retry_on: r.retry_on.map(CodeSet::names).unwrap_or_default(),
        max_attempts: r.max_attempts,
        per_try_timeout: dur(r.per_try_timeout),
        backoff_base: dur(r.backoff_base),
        backoff_max: dur(r.backoff_max),
        budget_percent: r.budget_percent,
        min_retries_per_second: r.min_retries_per_second,
    })
}

fn action_pb(a: Action) -> i32 {
    match a {
        Action::Allow => pb::Action::Allow,
        Action::Deny => pb::Action::Deny,
    }
    .into()
}

pub(crate) fn policy_pb(p: &Policy) -> pb::Policy {
    pb::Policy {
        default_action: action_pb(p.default_action),
        rules: p
            .rules
            .iter()
            .map(|r| pb::Rule {
                action: r.action.map_or(0, action_pb),
                sources: r.sources.clone(),
                methods: r.methods.clone(),
                cidrs: r.cidrs.clone(),
            })
            .collect(),
    }
}

pub(super) fn endpoint_pb(service: &str, e: &Endpoint) -> pb::Endpoint {
    pb::Endpoint {
        service: service.to_owned(),
        address: e.address.to_string(),
        weight: Some(e.weight),
        zone: e.zone.clone().unwrap_or_default(),
        metadata: e
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        identity: e.identity.clone(),
        draining: e.draining,
        health: match e.health {
            None => pb::EndpointHealth::Unknown,
            Some(h) if h.healthy => pb::EndpointHealth::Healthy,
            Some(_) => pb::EndpointHealth::Unhealthy,
        }
        .into(),
        health_reported_at: e.health.map(|h| prost_types::Timestamp::from(h.at)),
    }
}

pub(super) fn event_pb(e: &Event) -> pb::WatchEvent {
    use pb::ChangeKind as K;
    let mut ev = pb::WatchEvent {
        version: e.version,
        service: e.change.service().to_owned(),
        ..Default::default()
    };
    // A change carries the settings alone: no endpoint count.
    let info = |c: &Cluster| ServiceInfo {
        settings: c.clone(),
        endpoints: 0,
    };
    let kind = match &e.change {
        Change::ServiceCreated(c) => {
            ev.service_state = Some(service_pb(&info(c)));
            K::ServiceCreated
        }
        Change::ServiceUpdated(c) => {
            ev.service_state = Some(service_pb(&info(c)));
            K::ServiceUpdated
        }
        Change::ServiceDeleted { .. } => K::ServiceDeleted,
        Change::EndpointAdded { service, endpoint } => {
            ev.address = endpoint.address.to_string();
            ev.endpoint_state = Some(endpoint_pb(service, endpoint));
            K::EndpointAdded
        }
        Change::EndpointUpdated { service, endpoint } => {
            ev.address = endpoint.address.to_string();
            ev.endpoint_state = Some(endpoint_pb(service, endpoint));
            K::EndpointUpdated
        }
        Change::EndpointRemoved { address, .. } => {
            ev.address = address.to_string();
            K::EndpointRemoved
        }
    };
    ev.kind = kind.into();
    ev
}

pub(super) fn node_pb(n: &NodeStatus) -> pb::Node {
    pb::Node {
        node_id: n.node_id.clone(),
        service: n.service.clone(),
        user_agent: n.user_agent.clone(),
        connected: n.connected,
        connected_since: Some(n.connected_since.into()),
        acked: n
            .acked
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        last_nack: n.last_nack.as_ref().map(|x| pb::Nack {
            type_url: x.type_url.clone(),
            version: x.version.clone(),
            error: x.error.clone(),
            at: Some(x.at.into()),
        }),
        pushes: n.pushes,
    }
}

/// The CA as the API shows it.
pub fn ca_status(ca: &Ca) -> pb::CaStatus {
    let b = ca.bundle();
    // The bundle's order: the signing root first.
    let mut roots = ca.roots();
    roots.sort_by_key(|(info, signing, _)| {
        (
            !*signing,
            b.fingerprints.iter().position(|f| *f == info.fingerprint),
        )
    });
    pb::CaStatus {
        trust_domain: ca.trust_domain().to_owned(),
        roots: roots
            .into_iter()
            .map(|(info, signing, generated)| pb::Root {
                fingerprint: info.fingerprint,
                subject: info.subject,
                not_after: Some(info.not_after.into()),
                signing,
                generated,
            })
            .collect(),
        trust_bundle_pem: b.bundle.to_pem(),
        cert_lifetime: prost_types::Duration::try_from(ca.cert_lifetime()).ok(),
    }
}

/// A root fingerprint (or prefix) from a request.
pub(super) fn fingerprint_arg(fp: &str) -> Result<(), Status> {
    if fp.is_empty() {
        return Err(required("fingerprint"));
    }
    if fp.len() > 64 || !fp.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(invalid(ModelError::new(
            "fingerprint",
            format!("{fp:?} is not a hex SHA-256 fingerprint (or a prefix of one)"),
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> pb::Service {
        pb::Service {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn new_services_get_defaults_and_precise_errors() {
        let c = new_service(&svc("greeter")).unwrap();
        assert_eq!(c, Cluster::new("greeter"));

        let mut s = svc("greeter");
        s.lb_policy = pb::LbPolicy::RoundRobin.into();
        s.active_request_bias = Some(1.0);
        assert_eq!(new_service(&s).unwrap_err().field, "active_request_bias");
        s.lb_policy = 7;
        assert_eq!(new_service(&s).unwrap_err().field, "lb_policy");
        let mut s = svc("greeter");
        s.active_request_bias = Some(11.0);
        assert_eq!(new_service(&s).unwrap_err().field, "active_request_bias");
        let mut s = svc("greeter");
        s.connect_timeout = Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        });
        assert_eq!(new_service(&s).unwrap_err().field, "connect_timeout");
        let mut s = svc("greeter");
        s.authority = Some(String::new());
        assert_eq!(new_service(&s).unwrap_err().field, "authority");
    }

    #[test]
    fn zone_settings_convert_both_ways_and_bad_thresholds_name_the_field() {
        let mut s = svc("greeter");
        s.zone_aware = Some(false);
        s.zone_min_healthy = Some(0.5);
        let c = new_service(&s).unwrap();
        assert_eq!(
            c.zones,
            meshwire_mesh::ZoneRouting {
                enabled: false,
                min_healthy: 0.5
            }
        );
        let info = ServiceInfo {
            settings: c.clone(),
            endpoints: 0,
        };
        let back = service_pb(&info);
        assert_eq!(
            (back.zone_aware, back.zone_min_healthy),
            (Some(false), Some(0.5))
        );
        s.zone_min_healthy = Some(0.0);
        assert_eq!(new_service(&s).unwrap_err().field, "zone_min_healthy");
        // An update naming the threshold with no value resets it.
        let p = service_patch(&svc("greeter"), &["zone_min_healthy".into()]).unwrap();
        let mut c = c;
        p.apply(&mut c).unwrap();
        assert_eq!(
            c.zones.min_healthy,
            meshwire_mesh::ZoneRouting::DEFAULT_MIN_HEALTHY
        );
        assert!(!c.zones.enabled, "not named: kept");
    }

    #[test]
    fn update_masks_are_checked() {
        let s = svc("greeter");
        let e = service_patch(&s, &[]).unwrap_err();
        assert_eq!(e.field, "update_mask");
        let e = service_patch(&s, &["connect_timeout".into(), "colour".into()]).unwrap_err();
        assert_eq!(e.field, "update_mask.paths[1]");
        assert!(e.reason.contains("\"colour\""), "{e}");
        let p = service_patch(&s, &["service.request_timeout".into(), "authority".into()]).unwrap();
        assert_eq!(p.request_timeout, Some(None));
        assert_eq!(p.authority, Some(None));
        assert_eq!(p.connect_timeout, None);
    }

    #[test]
    fn endpoints_are_checked_field_by_field() {
        let ep = |f: &dyn Fn(&mut pb::Endpoint)| {
            let mut e = pb::Endpoint {
                address: "10.0.0.1:80".into(),
                ..Default::default()
            };
            f(&mut e);
            new_endpoint(&e).map_err(|s| (s.code(), s.message().to_owned()))
        };
        assert_eq!(ep(&|_| {}).unwrap().weight, 1);
        let field = |r: Result<Endpoint, (tonic::Code, String)>| {
            let (code, msg) = r.unwrap_err();
            assert_eq!(code, tonic::Code::InvalidArgument);
            msg.split(':').next().unwrap().to_owned()
        };
        assert_eq!(field(ep(&|e| e.weight = Some(0))), "endpoint.weight");
        assert_eq!(
            field(ep(&|e| e.address = "nope".into())),
            "endpoint.address"
        );
        assert_eq!(
            field(ep(&|e| e.address = "0.0.0.0:80".into())),
            "endpoint.address"
        );
        assert_eq!(
            field(ep(&|e| e.identity = Some(String::new()))),
            "endpoint.identity"
        );
        assert_eq!(field(ep(&|e| e.zone = "a\nb".into())), "endpoint.zone");
        let m = field(ep(&|e| {
            e.metadata.insert("k".into(), "\u{7}".into());
        }));
        assert_eq!(m, "endpoint.metadata[\"k\"]");
    }

    fn rule(action: pb::Action) -> pb::Rule {
        pb::Rule {
            action: action.into(),
            ..Default::default()
        }
    }

    #[test]
    fn policies_map_both_ways_and_name_the_bad_field() {
        let mut s = svc("greeter");
        s.permissive = true;
        let mut r = rule(pb::Action::Allow);
        r.sources = vec!["spiffe://meshwire.local/ns/default/sa/*".into()];
        r.methods = vec!["pkg.Echo/*".into()];
        r.cidrs = vec!["10.0.0.0/8".into(), "127.0.0.1".into()];
        s.policy = Some(pb::Policy {
            default_action: pb::Action::Deny.into(),
            rules: vec![r.clone(), rule(pb::Action::Deny)],
        });
        let c = new_service(&s).unwrap();
        assert!(c.permissive);
        let p = c.policy.clone().unwrap();
        assert_eq!(p.default_action, Action::Deny);
        assert_eq!(p.rules[0].cidrs, r.cidrs);
        assert_eq!(p.rules[1].action, Some(Action::Deny));
        // And back: what the API shows is what was sent.
        let info = ServiceInfo {
            settings: c,
            endpoints: 0,
        };
        let back = service_pb(&info);
        assert!(back.permissive);
        assert_eq!(back.policy, s.policy);

        // Unspecified default means allow; an unspecified rule action is an error.
        let mut s = svc("greeter");
        s.policy = Some(pb::Policy::default());
        assert_eq!(
            new_service(&s).unwrap().policy.unwrap().default_action,
            Action::Allow
        );
        let bad = |f: &dyn Fn(&mut pb::Rule)| {
            let mut r = rule(pb::Action::Allow);
            f(&mut r);
            let mut s = svc("greeter");
            s.policy = Some(pb::Policy {
                default_action: 0,
                rules: vec![rule(pb::Action::Deny), r],
            });
            let e = new_service(&s).unwrap_err().within("service");
            (e.field, e.reason)
        };
        let (field, reason) = bad(&|r| r.cidrs = vec!["10.0.0.0/8".into(), "10.0.0.0/33".into()]);
        assert_eq!(field, "service.policy.rules[1].cidrs[1]");
        assert!(reason.contains("10.0.0.0/33"), "{reason}");
        assert_eq!(bad(&|r| r.action = 0).0, "service.policy.rules[1].action");
        assert_eq!(bad(&|r| r.action = 9).0, "service.policy.rules[1].action");
        assert_eq!(
            bad(&|r| r.sources = vec!["web".into()]).0,
            "service.policy.rules[1].sources[0]"
        );
        assert_eq!(
            bad(&|r| r.methods = vec!["Echo".into()]).0,
            "service.policy.rules[1].methods[0]"
        );
        let mut s = svc("greeter");
        s.policy = Some(pb::Policy {
            default_action: 7,
            rules: vec![],
        });
        assert_eq!(new_service(&s).unwrap_err().field, "policy.default_action");
    }

    #[test]
    fn permissive_and_policy_are_updatable() {
        let mut s = svc("greeter");
        let p = service_patch(&s, &["permissive".into(), "policy".into()]).unwrap();
        assert_eq!(p.permissive, Some(false));
        assert_eq!(
            p.policy,
            Some(None),
            "an unset policy in the mask clears it"
        );
        s.permissive = true;
        s.policy = Some(pb::Policy {
            default_action: 0,
            rules: vec![pb::Rule {
                action: pb::Action::Allow.into(),
                cidrs: vec!["nope".into()],
                ..Default::default()
            }],
        });
        let e = service_patch(&s, &["policy".into()]).unwrap_err();
        assert_eq!(e.field, "service.policy.rules[0].cidrs[0]");
        let p = service_patch(&s, &["permissive".into()]).unwrap();
        assert_eq!((p.permissive, p.policy), (Some(true), None));
    }

    #[test]
    fn rate_limits_convert_and_bad_ones_name_their_field() {
        let mut s = svc("greeter");
        s.rate_limit = Some(pb::RateLimit {
            rate: "20/s".into(),
            burst: Some(5),
            per: pb::RateLimitPer::Caller.into(),
            overrides: vec![pb::RateLimitOverride {
                caller: "spiffe://t/ns/a/sa/batch".into(),
                rate: "1000/m".into(),
                burst: None,
            }],
        });
        let c = new_service(&s).unwrap();
        let l = c.rate_limit.as_ref().unwrap();
        assert_eq!(
            (l.rate.count, l.burst, l.per),
            (20, Some(5), LimitPer::Caller)
        );
        assert_eq!(rate_limit_pb(l), s.rate_limit.clone().unwrap());
        type Spoil = fn(&mut pb::RateLimit);
        let cases: [(Spoil, &str); 5] = [
            (|l| l.rate = "20/d".into(), "rate_limit.rate"),
            (|l| l.rate = "0/s".into(), "rate_limit.rate"),
            (|l| l.burst = Some(0), "rate_limit.burst"),
            (|l| l.per = 9, "rate_limit.per"),
            (
                |l| l.overrides[0].caller = "batch".into(),
                "rate_limit.overrides[0].caller",
            ),
        ];
        for (spoil, field) in cases {
            let mut bad = s.clone();
            spoil(bad.rate_limit.as_mut().unwrap());
            assert_eq!(new_service(&bad).unwrap_err().field, field);
            let e = service_patch(&bad, &["rate_limit".into()]).unwrap_err();
            assert_eq!(e.field, format!("service.{field}"));
        }
        s.rate_limit = None;
        let p = service_patch(&s, &["rate_limit".into()]).unwrap();
        assert_eq!(
            p.rate_limit,
            Some(None),
            "an unset limit in the mask clears it"
        );
    }
}
