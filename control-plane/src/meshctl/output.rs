//! What `meshctl` prints: aligned tables (no trailing spaces) or JSON, one
//! object per result (per line for `watch`).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, SystemTime};

use meshwire_proto::admin::v1 as pb;
use serde_json::{Value, json};

fn dur(d: Option<&prost_types::Duration>) -> Option<String> {
    d.and_then(|d| Duration::try_from(*d).ok())
        .map(|d| humantime::format_duration(d).to_string())
}

fn lb_name(v: i32) -> &'static str {
    match pb::LbPolicy::try_from(v) {
        Ok(pb::LbPolicy::RoundRobin) => "round-robin",
        Ok(pb::LbPolicy::LeastRequest | pb::LbPolicy::Unspecified) => "least-request",
        Ok(pb::LbPolicy::RingHash) => "ring-hash",
        Ok(pb::LbPolicy::Maglev) => "maglev",
        Err(_) => "unknown",
    }
}

/// `header:x-user, cookie:sticky (ttl 10m), source-ip`, or `-`.
pub(super) fn hash_summary(s: &pb::Service) -> String {
    use pb::hash_source::Source;
    let mut parts: Vec<String> = s
        .hash_policy
        .iter()
        .filter_map(|h| {
            Some(match h.source.as_ref()? {
                Source::Header(n) => format!("header:{n}"),
                Source::SourceIp(_) => "source-ip".to_owned(),
                Source::Cookie(c) => match dur(c.ttl.as_ref()) {
                    Some(t) => format!("cookie:{} (ttl {t})", c.name),
                    None => format!("cookie:{}", c.name),
                },
            })
        })
        .collect();
    if let Some(f) = s.hash_balance_factor {
        parts.push(format!("balance factor {f}"));
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(", ")
    }
}

/// `on (min healthy 0.7)` or `off`.
pub(super) fn zones_summary(s: &pb::Service) -> String {
    match (s.zone_aware.unwrap_or(true), s.zone_min_healthy) {
        (false, _) => "off".to_owned(),
        (true, Some(f)) => format!("on (min healthy {f})"),
        (true, None) => "on".to_owned(),
    }
}

pub(super) fn service_json(s: &pb::Service) -> Value {
    let mut v = service_json_base(s);
    if let Value::Object(m) = &mut v
        && let Value::Object(r) = super::resilience::json(s)
    {
        m.extend(r);
    }
    v
}

fn service_json_base(s: &pb::Service) -> Value {
    json!({
        "name": s.name,
        "protocol": protocol_name(s.protocol),
        "lb_policy": lb_name(s.lb_policy).replace('-', "_"),
        "active_request_bias": s.active_request_bias,
        "connect_timeout": dur(s.connect_timeout.as_ref()),
        "request_timeout": dur(s.request_timeout.as_ref()),
        "authority": s.authority,
        "endpoints": s.endpoint_count,
        "permissive": s.permissive,
        "policy": s.policy.as_ref().map(policy_json),
        "hash_policy": hash_summary(s),
        "hash_balance_factor": s.hash_balance_factor,
        "rate_limit": s.rate_limit.as_ref().map(|l| json!({
            "rate": l.rate,
            "burst": l.burst,
            "per": rate_limit_per(l.per),
            "overrides": l.overrides.iter().map(|o| json!({
                "caller": o.caller,
                "rate": o.rate,
                "burst": o.burst,
            })).collect::<Vec<_>>(),
        })),
        "zone_aware": s.zone_aware.unwrap_or(true),
        "zone_min_healthy": s.zone_min_healthy,
    })
}

fn rate_limit_per(v: i32) -> &'static str {
    match pb::RateLimitPer::try_from(v) {
        Ok(pb::RateLimitPer::Caller) => "caller",
        Ok(pb::RateLimitPer::Ip) => "ip",
        Ok(pb::RateLimitPer::Service | pb::RateLimitPer::Unspecified) | Err(_) => "service",
    }
}

/// `20/s per caller, burst 40, +2 overrides` (`-`: no limit).
fn rate_limit_summary(l: Option<&pb::RateLimit>) -> String {
    let Some(l) = l else {
        return "-".to_owned();
    };
    let mut s = format!("{} per {}", l.rate, rate_limit_per(l.per));
    if let Some(b) = l.burst {
        s.push_str(&format!(", burst {b}"));
    }
    if !l.overrides.is_empty() {
        let n = l.overrides.len();
        s.push_str(&format!(
            ", +{n} {}",
            if n == 1 { "override" } else { "overrides" }
        ));
    }
    s
}

fn protocol_name(v: i32) -> &'static str {
    match pb::Protocol::try_from(v) {
        Ok(pb::Protocol::Http) => "http",
        Ok(pb::Protocol::Tcp) => "tcp",
        Ok(pb::Protocol::Grpc | pb::Protocol::Unspecified) | Err(_) => "grpc",
    }
}

fn action_name(v: i32) -> &'static str {
    match pb::Action::try_from(v) {
        Ok(pb::Action::Allow) => "allow",
        Ok(pb::Action::Deny) => "deny",
        Ok(pb::Action::Unspecified) | Err(_) => "unspecified",
    }
}

pub(super) fn policy_json(p: &pb::Policy) -> Value {
    json!({
        "default_action": match pb::Action::try_from(p.default_action) {
            Ok(pb::Action::Deny) => "deny",
            _ => "allow",
        },
        "rules": p.rules.iter().map(|r| json!({
            "action": action_name(r.action),
            "sources": r.sources,
            "methods": r.methods,
            "cidrs": r.cidrs,
        })).collect::<Vec<_>>(),
    })
}

/// `default-deny, 2 rules`, or `-` for none.
fn policy_summary(p: Option<&pb::Policy>) -> String {
    match p {
        None => "-".to_owned(),
        Some(p) => format!(
            "default-{},{}rule{}",
            if p.default_action == i32::from(pb::Action::Deny) {
                "deny"
            } else {
                "allow"
            },
            p.rules.len(),
            if p.rules.len() == 1 { "" } else { "s" }
        ),
    }
}

/// A policy in a few lines (`service policy get`).
pub(super) fn policy_text(p: Option<&pb::Policy>) -> String {
    let Some(p) = p else {
        return "no policy: every mesh identity may call\n".into();
    };
    let default = match pb::Action::try_from(p.default_action) {
        Ok(pb::Action::Deny) => "deny",
        _ => "allow",
    };
    let mut out = format!("default: {default}\n");
    out.push_str(&policy_rules(p));
    out
}

/// The rules as a table (nothing without rules).
fn policy_rules(p: &pb::Policy) -> String {
    let mut out = String::new();
    if !p.rules.is_empty() {
        let any = |v: &[String]| {
            if v.is_empty() {
                "*".to_owned()
            } else {
                v.join(",")
            }
        };
        let rows: Vec<Vec<String>> = p
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                vec![
                    i.to_string(),
                    action_name(r.action).to_owned(),
                    any(&r.sources),
                    any(&r.methods),
                    any(&r.cidrs),
                ]
            })
            .collect();
        out.push_str(&table(
            &["RULE", "ACTION", "SOURCES", "METHODS", "CIDRS"],
            &rows,
        ));
    }
    out
}

pub(super) fn short_fp(fp: &str) -> &str {
    &fp[..fp.len().min(16)]
}

pub(super) fn rfc3339(t: Option<SystemTime>) -> Option<String> {
    t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

pub(super) fn ca_json(c: &pb::CaStatus) -> Value {
    json!({
        "trust_domain": c.trust_domain,
        "cert_lifetime": dur(c.cert_lifetime.as_ref()),
        "roots": c.roots.iter().map(|r| json!({
            "fingerprint": r.fingerprint,
            "subject": r.subject,
            "not_after": rfc3339(timestamp(r.not_after.as_ref())),
            "signing": r.signing,
            "generated": r.generated,
        })).collect::<Vec<_>>(),
    })
}

fn sorted(m: &std::collections::HashMap<String, String>) -> BTreeMap<&str, &str> {
    m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

pub(super) fn endpoint_json(e: &pb::Endpoint) -> Value {
    json!({
        "service": e.service,
        "address": e.address,
        "weight": e.weight,
        "zone": (!e.zone.is_empty()).then_some(&e.zone),
        "draining": e.draining,
        "identity": e.identity,
        "metadata": sorted(&e.metadata),
        "health": health_name(e.health),
        "health_reported_at_unix": timestamp(e.health_reported_at.as_ref())
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_secs()),
    })
}

/// `healthy`, `unhealthy` or `unknown` (no report).
fn health_name(v: i32) -> &'static str {
    match pb::EndpointHealth::try_from(v) {
        Ok(pb::EndpointHealth::Healthy) => "healthy",
        Ok(pb::EndpointHealth::Unhealthy) => "unhealthy",
        _ => "unknown",
    }
}

/// The HEALTH column: the health and how long ago it was reported.
fn health_cell(e: &pb::Endpoint) -> String {
    match timestamp(e.health_reported_at.as_ref()) {
        Some(t) if e.health != pb::EndpointHealth::Unknown as i32 => {
            format!("{} ({})", health_name(e.health), ago(Some(t)))
        }
        _ => "-".into(),
    }
}

fn kind_name(v: i32) -> &'static str {
    use pb::ChangeKind as K;
    match K::try_from(v) {
        Ok(K::Current) => "current",
        Ok(K::ServiceCreated) => "service-created",
        Ok(K::ServiceUpdated) => "service-updated",
        Ok(K::ServiceDeleted) => "service-deleted",
        Ok(K::EndpointAdded) => "endpoint-added",
        Ok(K::EndpointRemoved) => "endpoint-removed",
        Ok(K::EndpointUpdated) => "endpoint-updated",
        Ok(K::Unspecified) | Err(_) => "unknown",
    }
}

fn or_dash(s: Option<impl ToString>) -> String {
    s.map(|s| s.to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".into())
}

pub(super) fn timestamp(t: Option<&prost_types::Timestamp>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(*t).ok())
}

/// "12s ago", to the second.
fn ago(t: Option<SystemTime>) -> String {
    t.and_then(|t| SystemTime::now().duration_since(t).ok())
        .map(|d| {
            format!(
                "{} ago",
                humantime::format_duration(Duration::from_secs(d.as_secs()))
            )
        })
        .unwrap_or_else(|| "-".into())
}

/// The last part of a type URL (`...v3.ClusterLoadAssignment`).
fn short_type(url: &str) -> &str {
    url.rsplit(['.', '/']).next().unwrap_or(url)
}

/// Left-aligned columns two spaces apart, no trailing spaces.
pub(super) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(c);
            s.extend(std::iter::repeat_n(' ', w - c.chars().count()));
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(&mut headers.iter().copied());
    for r in rows {
        out.push_str(&line(&mut r.iter().map(String::as_str)));
    }
    out
}

pub(super) struct Printer {
    pub(super) json: bool,
}

impl Printer {
    /// Writes to stdout; `false` once stdout is gone (e.g. `| head`).
    pub(super) fn print(&self, s: &str) -> bool {
        let mut out = std::io::stdout().lock();
        out.write_all(s.as_bytes())
            .and_then(|()| out.flush())
            .is_ok()
    }

    pub(super) fn print_json(&self, v: &Value) -> bool {
        self.print(&format!("{v}\n"))
    }

    pub(super) fn done(&self, v: Value, what: &str, version: u64) {
        if self.json {
            self.print_json(&v);
        } else {
            self.print(&format!("{what} (version {version})\n"));
        }
    }

    pub(super) fn services(&self, version: u64, services: &[pb::Service]) {
        if self.json {
            self.print_json(&json!({
                "version": version,
                "services": services.iter().map(service_json).collect::<Vec<_>>(),
            }));
            return;
        }
        let rows: Vec<Vec<String>> = services
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    protocol_name(s.protocol).to_owned(),
                    lb_name(s.lb_policy).to_owned(),
                    or_dash(s.active_request_bias),
                    or_dash(dur(s.connect_timeout.as_ref())),
                    or_dash(dur(s.request_timeout.as_ref())),
                    or_dash(s.authority.as_ref()),
                    s.endpoint_count.to_string(),
                    if s.permissive { "yes" } else { "no" }.to_owned(),
                    policy_summary(s.policy.as_ref()),
                    rate_limit_summary(s.rate_limit.as_ref()),
                    zones_summary(s),
                ]
            })
            .collect();
        self.print(&table(
            &[
                "NAME",
                "PROTOCOL",
                "LB",
                "BIAS",
                "CONNECT",
                "REQUEST",
                "AUTHORITY",
                "ENDPOINTS",
                "PERMISSIVE",
                "POLICY",
                "RATE LIMIT",
                "ZONES",
            ],
            &rows,
        ));
    }

    pub(super) fn endpoints(&self, version: u64, eps: &[pb::Endpoint]) {
        if self.json {
            self.print_json(&json!({
                "version": version,
                "endpoints": eps.iter().map(endpoint_json).collect::<Vec<_>>(),
            }));
            return;
        }
        self.print(&endpoint_table(eps));
    }

    pub(super) fn service(&self, r: &pb::GetServiceResponse) {
        let s = r.service.clone().unwrap_or_default();
        if self.json {
            let mut v = service_json(&s);
            v["version"] = json!(r.version);
            v["endpoints"] = json!(r.endpoints.iter().map(endpoint_json).collect::<Vec<_>>());
            self.print_json(&v);
            return;
        }
        let lb = match s.active_request_bias {
            Some(b) => format!("{} (bias {b})", lb_name(s.lb_policy)),
            None => lb_name(s.lb_policy).to_owned(),
        };
        let fields = [
            ("name:", s.name.clone()),
            ("protocol:", protocol_name(s.protocol).to_owned()),
            ("lb:", lb),
            ("hash:", hash_summary(&s)),
            ("zones:", zones_summary(&s)),
            ("connect timeout:", or_dash(dur(s.connect_timeout.as_ref()))),
            ("request timeout:", or_dash(dur(s.request_timeout.as_ref()))),
            ("authority:", or_dash(s.authority.as_ref())),
            (
                "permissive:",
                if s.permissive { "yes" } else { "no" }.to_owned(),
            ),
            ("policy:", policy_summary(s.policy.as_ref())),
            ("rate limit:", rate_limit_summary(s.rate_limit.as_ref())),
        ];
        let mut out = String::new();
        for (k, v) in fields
            .into_iter()
            .chain(super::resilience::summary(&s))
            .chain([("version:", r.version.to_string())])
        {
            out.push_str(&format!("{k:<17}{v}\n"));
        }
        if let Some(p) = s.policy.as_ref().filter(|p| !p.rules.is_empty()) {
            out.push('\n');
            out.push_str(&policy_rules(p));
        }
        if let Some(l) = s.rate_limit.as_ref().filter(|l| !l.overrides.is_empty()) {
            out.push('\n');
            let rows: Vec<Vec<String>> = l
                .overrides
                .iter()
                .map(|o| vec![o.caller.clone(), o.rate.clone(), or_dash(o.burst)])
                .collect();
            out.push_str(&table(&["CALLER", "RATE", "BURST"], &rows));
        }
        out.push('\n');
        if r.endpoints.is_empty() {
            out.push_str("no endpoints\n");
        } else {
            out.push_str(&endpoint_table(&r.endpoints));
        }
        self.print(&out);
    }

    pub(super) fn ca(&self, c: &pb::CaStatus) {
        if self.json {
            self.print_json(&ca_json(c));
            return;
        }
        let mut out = format!(
            "trust domain {}, workload certificates live {}\n\n",
            c.trust_domain,
            or_dash(dur(c.cert_lifetime.as_ref()))
        );
        let rows: Vec<Vec<String>> = c
            .roots
            .iter()
            .map(|r| {
                vec![
                    r.fingerprint.clone(),
                    r.subject.clone(),
                    or_dash(rfc3339(timestamp(r.not_after.as_ref()))),
                    if r.signing { "yes" } else { "no" }.to_owned(),
                    if r.generated { "generated" } else { "user" }.to_owned(),
                ]
            })
            .collect();
        out.push_str(&table(
            &["FINGERPRINT", "SUBJECT", "NOT AFTER", "SIGNING", "SOURCE"],
            &rows,
        ));
        self.print(&out);
    }

    pub(super) fn cp_status(&self, s: &pb::ControlPlaneStatusResponse) {
        if self.json {
            let replicas: Vec<Value> = s
                .replicas
                .iter()
                .map(|r| {
                    json!({
                        "id": r.id,
                        "address": r.address,
                        "revision": r.revision,
                        "version": r.version,
                        "leader": r.id == s.leader,
                        "answered": r.id == s.replica_id,
                    })
                })
                .collect();
            self.print_json(&json!({
                "store": s.store,
                "replica": s.replica_id,
                "leader": s.leader,
                "replicas": replicas,
            }));
            return;
        }
        let mut out = format!("store {}\n", s.store);
        if s.replica_id.is_empty() {
            out.push_str("one control plane (embedded store): no replicas, no leader election\n");
            self.print(&out);
            return;
        }
        out.push_str(&format!(
            "leader {}\n\n",
            if s.leader.is_empty() {
                "none elected"
            } else {
                &s.leader
            }
        ));
        let rows: Vec<Vec<String>> = s
            .replicas
            .iter()
            .map(|r| {
                let mut id = r.id.clone();
                if r.id == s.replica_id {
                    id.push_str(" (answered)");
                }
                vec![
                    id,
                    r.address.clone(),
                    r.revision.to_string(),
                    r.version.to_string(),
                    if r.id == s.leader { "yes" } else { "no" }.to_owned(),
                ]
            })
            .collect();
        out.push_str(&table(
            &["REPLICA", "ADDRESS", "REVISION", "VERSION", "LEADER"],
            &rows,
        ));
        self.print(&out);
    }

    pub(super) fn status(&self, s: &pb::StatusResponse) {
        if self.json {
            let nodes: Vec<Value> = s
                .nodes
                .iter()
                .map(|n| {
                    let secs = |t: Option<&prost_types::Timestamp>| {
                        timestamp(t).and_then(|t| {
                            t.duration_since(SystemTime::UNIX_EPOCH)
                                .ok()
                                .map(|d| d.as_secs())
                        })
                    };
                    json!({
                        "node_id": n.node_id,
                        "service": n.service,
                        "user_agent": n.user_agent,
                        "connected": n.connected,
                        "connected_since_unix": secs(n.connected_since.as_ref()),
                        "acked": sorted(&n.acked),
                        "pushes": n.pushes,
                        "last_nack": n.last_nack.as_ref().map(|x| json!({
                            "type_url": x.type_url,
                            "version": x.version,
                            "error": x.error,
                            "at_unix": secs(x.at.as_ref()),
                        })),
                    })
                })
                .collect();
            self.print_json(&json!({
                "version": s.version,
                "published_version": s.published_version,
                "nodes": nodes,
                "unhealthy_endpoints": s.unhealthy_endpoints.iter().map(endpoint_json).collect::<Vec<_>>(),
            }));
            return;
        }
        let mut out = format!(
            "version {} (published to xDS: {})\n\n",
            s.version, s.published_version
        );
        if s.nodes.is_empty() {
            out.push_str("no xDS clients\n");
        } else {
            let rows: Vec<Vec<String>> = s
                .nodes
                .iter()
                .map(|n| {
                    let acked = sorted(&n.acked)
                        .iter()
                        .map(|(t, v)| format!("{}={v}", short_type(t)))
                        .collect::<Vec<_>>()
                        .join(",");
                    let nack = n.last_nack.as_ref().map(|x| {
                        format!(
                            "{} v{} {}: {}",
                            short_type(&x.type_url),
                            x.version,
                            ago(timestamp(x.at.as_ref())),
                            x.error
                        )
                    });
                    vec![
                        n.node_id.clone(),
                        or_dash(Some(&n.service)),
                        or_dash(Some(&n.user_agent)),
                        if n.connected { "yes" } else { "no" }.to_owned(),
                        ago(timestamp(n.connected_since.as_ref())),
                        or_dash(Some(acked)),
                        n.pushes.to_string(),
                        or_dash(nack),
                    ]
                })
                .collect();
            out.push_str(&table(
                &[
                    "NODE",
                    "SERVICE",
                    "AGENT",
                    "CONNECTED",
                    "SINCE",
                    "ACKED",
                    "PUSHES",
                    "LAST NACK",
                ],
                &rows,
            ));
        }
        out.push('\n');
        if s.unhealthy_endpoints.is_empty() {
            out.push_str("no endpoint reported unhealthy\n");
        } else {
            let rows: Vec<Vec<String>> = s
                .unhealthy_endpoints
                .iter()
                .map(|e| vec![e.service.clone(), e.address.clone(), health_cell(e)])
                .collect();
            out.push_str(&table(&["SERVICE", "ENDPOINT", "HEALTH"], &rows));
        }
        self.print(&out);
    }

    pub(super) fn watch_header(&self) {
        if !self.json {
            self.print(&format!(
                "{:<10}  {:<17}  {:<24}  ADDRESS / DETAIL\n",
                "VERSION", "CHANGE", "SERVICE"
            ));
        }
    }

    /// One event; `false` once stdout is gone.
    pub(super) fn event(&self, ev: &pb::WatchEvent) -> bool {
        if self.json {
            return self.print_json(&json!({
                "version": ev.version,
                "kind": kind_name(ev.kind).replace('-', "_"),
                "service": (!ev.service.is_empty()).then_some(&ev.service),
                "address": (!ev.address.is_empty()).then_some(&ev.address),
                "service_state": ev.service_state.as_ref().map(service_json),
                "endpoint_state": ev.endpoint_state.as_ref().map(endpoint_json),
            }));
        }
        let detail = match &ev.endpoint_state {
            Some(e) => format!(
                "{} weight {}{}",
                e.address,
                e.weight.unwrap_or(1),
                if e.draining { " draining" } else { "" }
            ),
            None => ev.address.clone(),
        };
        self.print(&format!(
            "{:<10}  {:<17}  {:<24}  {}\n",
            ev.version,
            kind_name(ev.kind),
            or_dash(Some(&ev.service)),
            or_dash(Some(detail))
        ))
    }
}

fn endpoint_table(eps: &[pb::Endpoint]) -> String {
    let rows: Vec<Vec<String>> = eps
        .iter()
        .map(|e| {
            let meta = sorted(&e.metadata)
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            vec![
                e.address.clone(),
                e.weight.unwrap_or(1).to_string(),
                or_dash(Some(&e.zone)),
                if e.draining { "draining" } else { "active" }.to_owned(),
                health_cell(e),
                or_dash(e.identity.as_ref()),
                or_dash(Some(meta)),
            ]
        })
        .collect();
    table(
        &[
            "ADDRESS", "WEIGHT", "ZONE", "STATE", "HEALTH", "IDENTITY", "METADATA",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn tables_align_without_trailing_spaces() {
        let t = table(
            &["NAME", "LB", "ENDPOINTS"],
            &[
                vec!["greeter".into(), "least-request".into(), "3".into()],
                vec!["a".into(), "round-robin".into(), "10".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME     LB             ENDPOINTS\n\
             greeter  least-request  3\n\
             a        round-robin    10\n"
        );
    }

    #[test]
    pub(super) fn short_type_names() {
        assert_eq!(
            short_type("type.googleapis.com/envoy.config.cluster.v3.Cluster"),
            "Cluster"
        );
    }
}
