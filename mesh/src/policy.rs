//! Authorization policies: which callers may call a service, and which of
//! its methods, evaluated by the service's own sidecar for every inbound call.
//!
//! A rule matches a call when each of its lists is empty or has a match:
//! `sources` (the caller's SPIFFE ID, exact or `prefix*`), `methods`
//! (`pkg.Service/Method` or `pkg.Service/*`) and `cidrs` (the caller's IP).
//! Any matching deny rule denies; otherwise any matching allow rule allows;
//! otherwise the policy's default decides. A caller without an identity
//! (plaintext, permissive mode) matches every deny rule's `sources` and no
//! allow rule's: it cannot slip past a deny by not presenting a certificate.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::model::ModelError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub default_action: Action,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Rule {
    pub action: Option<Action>,
    /// SPIFFE IDs; a trailing `*` makes a prefix.
    #[serde(default)]
    pub sources: Vec<String>,
    /// `pkg.Service/Method` or `pkg.Service/*`.
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub cidrs: Vec<String>,
}

/// What a decision is about.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// The caller's SPIFFE ID (`None` for a plaintext caller in permissive mode).
    pub source: Option<&'a str>,
    /// The request path, `/pkg.Service/Method`.
    pub path: &'a str,
    pub ip: IpAddr,
}

impl Policy {
    pub fn validate(&self) -> Result<(), ModelError> {
        for (i, r) in self.rules.iter().enumerate() {
            let at = |f: &str| format!("rules[{i}].{f}");
            if r.action.is_none() {
                return Err(ModelError::new(at("action"), "must be allow or deny"));
            }
            for (j, s) in r.sources.iter().enumerate() {
                let id = s.strip_suffix('*').unwrap_or(s);
                if !id.starts_with("spiffe://") {
                    return Err(ModelError::new(
                        at(&format!("sources[{j}]")),
                        format!("{s:?} must be a SPIFFE ID (spiffe://...), optionally ending in *"),
                    ));
                }
            }
            for (j, m) in r.methods.iter().enumerate() {
                if parse_method(m).is_none() {
                    return Err(ModelError::new(
                        at(&format!("methods[{j}]")),
                        format!("{m:?} must be pkg.Service/Method or pkg.Service/*"),
                    ));
                }
            }
            for (j, c) in r.cidrs.iter().enumerate() {
                if c.parse::<IpNet>().is_err() && c.parse::<IpAddr>().is_err() {
                    return Err(ModelError::new(
                        at(&format!("cidrs[{j}]")),
                        format!("{c:?} is not a CIDR (e.g. 10.0.0.0/8)"),
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn evaluate(&self, call: Call<'_>) -> Action {
        let matching = |want: Action| {
            self.rules
                .iter()
                .any(|r| r.action == Some(want) && r.matches(call))
        };
        if matching(Action::Deny) {
            Action::Deny
        } else if matching(Action::Allow) {
            Action::Allow
        } else {
            self.default_action
        }
    }
}

/// `pkg.Service/Method` → (service, Some(method)); `pkg.Service/*` → (service, None).
fn parse_method(m: &str) -> Option<(&str, Option<&str>)> {
    let m = m.strip_prefix('/').unwrap_or(m);
    let (svc, method) = m.split_once('/')?;
    let ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._".contains(c))
    };
    if !ok(svc) {
        return None;
    }
    match method {
        "*" => Some((svc, None)),
        m if ok(m) => Some((svc, Some(m))),
        _ => None,
    }
}

impl Rule {
    fn matches(&self, call: Call<'_>) -> bool {
        let source_ok = self.sources.is_empty()
            || match call.source {
                Some(src) => self.sources.iter().any(|s| match s.strip_suffix('*') {
                    Some(prefix) => src.starts_with(prefix),
                    None => src == s,
                }),
                // A plaintext caller (permissive mode) cannot prove it is not
                // a denied source, so a deny naming sources holds for it
                // (fail closed); it never matches an allow naming sources.
                None => self.action == Some(Action::Deny),
            };
        let method_ok = self.methods.is_empty() || {
            let path = call.path.strip_prefix('/').unwrap_or(call.path);
            let (svc, method) = path.split_once('/').unwrap_or((path, ""));
            self.methods.iter().any(|m| match parse_method(m) {
                Some((s, None)) => s == svc,
                Some((s, Some(mm))) => s == svc && mm == method,
                None => false,
            })
        };
        let cidr_ok = self.cidrs.is_empty()
            || self.cidrs.iter().any(|c| match c.parse::<IpNet>() {
                Ok(net) => net.contains(&call.ip),
                Err(_) => c.parse::<IpAddr>().is_ok_and(|ip| ip == call.ip),
            });
        source_ok && method_ok && cidr_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call<'a>(source: Option<&'a str>, path: &'a str, ip: &str) -> Call<'a> {
        Call {
            source,
            path,
            ip: ip.parse().unwrap(),
        }
    }

    const WEB: &str = "spiffe://mesh/ns/prod/sa/web";
    const BATCH: &str = "spiffe://mesh/ns/batch/sa/job";

    #[test]
    fn a_caller_without_identity_cannot_bypass_a_deny_on_sources() {
        let p = Policy {
            default_action: Action::Allow,
            rules: vec![Rule {
                action: Some(Action::Deny),
                sources: vec![BATCH.into()],
                ..Default::default()
            }],
        };
        assert_eq!(
            p.evaluate(call(Some(WEB), "/pkg.Echo/Echo", "10.0.0.1")),
            Action::Allow
        );
        assert_eq!(
            p.evaluate(call(Some(BATCH), "/pkg.Echo/Echo", "10.0.0.1")),
            Action::Deny
        );
        assert_eq!(
            p.evaluate(call(None, "/pkg.Echo/Echo", "10.0.0.1")),
            Action::Deny
        );
        let allow_web = Policy {
            default_action: Action::Deny,
            rules: vec![Rule {
                action: Some(Action::Allow),
                sources: vec![WEB.into()],
                ..Default::default()
            }],
        };
        assert_eq!(
            allow_web.evaluate(call(None, "/pkg.Echo/Echo", "10.0.0.1")),
            Action::Deny
        );
    }

    #[test]
    fn deny_wins_then_allow_then_default() {
        let p = Policy {
            default_action: Action::Deny,
            rules: vec![
                Rule {
                    action: Some(Action::Allow),
                    sources: vec!["spiffe://mesh/ns/prod/*".into()],
                    ..Default::default()
                },
                Rule {
                    action: Some(Action::Deny),
                    methods: vec!["pkg.Admin/*".into()],
                    ..Default::default()
                },
                Rule {
                    action: Some(Action::Allow),
                    methods: vec!["pkg.Public/Get".into()],
                    cidrs: vec!["10.0.0.0/8".into()],
                    ..Default::default()
                },
            ],
        };
        assert_eq!(p.validate(), Ok(()));
        assert_eq!(
            p.evaluate(call(Some(WEB), "/pkg.Echo/Echo", "192.168.1.1")),
            Action::Allow
        );
        assert_eq!(
            p.evaluate(call(Some(WEB), "/pkg.Admin/Drop", "192.168.1.1")),
            Action::Deny
        );
        assert_eq!(
            p.evaluate(call(Some(BATCH), "/pkg.Echo/Echo", "10.1.2.3")),
            Action::Deny
        );
        assert_eq!(
            p.evaluate(call(Some(BATCH), "/pkg.Public/Get", "10.1.2.3")),
            Action::Allow
        );
        assert_eq!(
            p.evaluate(call(Some(BATCH), "/pkg.Public/Get", "11.1.2.3")),
            Action::Deny
        );
        assert_eq!(
            p.evaluate(call(None, "/pkg.Public/Get", "10.0.0.1")),
            Action::Allow,
            "no identity needed"
        );
        assert_eq!(
            p.evaluate(call(None, "/pkg.Echo/Echo", "192.168.1.1")),
            Action::Deny
        );
    }

    #[test]
    fn invalid_rules_name_the_field() {
        let bad = |r: Rule| {
            Policy {
                default_action: Action::Allow,
                rules: vec![Rule::default(), r],
            }
            .validate()
            .unwrap_err()
            .field
        };
        let allow = Some(Action::Allow);
        assert_eq!(
            bad(Rule {
                action: allow,
                cidrs: vec!["10.0.0.0/33".into()],
                ..Default::default()
            }),
            "rules[0].action"
        );
        let p = |r: Rule| {
            Policy {
                default_action: Action::Allow,
                rules: vec![r],
            }
            .validate()
            .unwrap_err()
            .field
        };
        assert_eq!(
            p(Rule {
                action: allow,
                cidrs: vec!["10.0.0.0/33".into()],
                ..Default::default()
            }),
            "rules[0].cidrs[0]"
        );
        assert_eq!(
            p(Rule {
                action: allow,
                methods: vec!["Echo".into()],
                ..Default::default()
            }),
            "rules[0].methods[0]"
        );
        assert_eq!(
            p(Rule {
                action: allow,
                sources: vec!["web".into()],
                ..Default::default()
            }),
            "rules[0].sources[0]"
        );
    }
}
