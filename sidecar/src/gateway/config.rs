//! The gateway's file (`meshwire-sidecar --gateway gateway.yaml`): public
//! listeners with their certificates, JWT providers, trusted proxies,
//! request limits and routes. Parsed and validated whole at start-up;
//! every error names the field (`routes[2].jwt.provider: ...`).
//!
//! ```yaml
//! listeners:
//!   - address: 0.0.0.0:8443
//!     certificates:
//!       - {cert: api.pem, key: api.key}            # names from the certificate
//!       - {cert: b.pem, key: b.key, server_names: [b.example.com]}
//! jwt_providers:
//!   - name: main
//!     issuer: https://issuer.example.com
//!     audiences: [api]
//!     jwks_file: jwks.json
//!     claim_headers: {email: x-jwt-email}
//! trusted_proxies: {cidrs: [10.0.0.0/8], hops: 1}
//! routes:
//!   - name: api
//!     hosts: [api.example.com]
//!     path_prefix: /v1
//!     service: web
//!     methods: [GET, POST]
//!     jwt: {provider: main, required: true}
//!     ip: {allow: [0.0.0.0/0], deny: [192.0.2.0/24]}
//!     rate_limits: [{key: subject, rate: 20/s, burst: 20}]
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use ipnet::IpNet;
use serde::Deserialize;

use super::ip::{IpRules, TrustedProxies};
use super::jwt::{KeySource, Provider};
use super::path::EscapedSlashes;
use super::tls::{CertSource, CertStore};
use super::{Limits, Listener, Route, RouteJwt, Routes};
use crate::ratelimit::{Limit, LimitKey, RateLimits};

#[derive(Debug, thiserror::Error)]
pub enum GatewayConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {field}: {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
}

// === the file ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    pub listeners: Vec<ListenerFile>,
    #[serde(default)]
    pub jwt_providers: Vec<JwtProviderFile>,
    #[serde(default)]
    pub trusted_proxies: Option<TrustedProxiesFile>,
    /// Defaults for every route (each may lower or raise them).
    #[serde(default)]
    pub limits: LimitsFile,
    #[serde(default)]
    pub escaped_slashes: EscapedSlashes,
    /// How often certificate and JWKS files are checked for changes.
    #[serde(default = "reload_default", with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Append one JSON line per request to this file.
    pub access_log: Option<PathBuf>,
    pub routes: Vec<RouteFile>,
}

fn reload_default() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    pub address: SocketAddr,
    pub certificates: Vec<CertificateFile>,
    /// `["1.2", "1.3"]` (default both).
    #[serde(default)]
    pub tls_versions: Vec<String>,
    /// Peers in `trusted_proxies.cidrs` send a PROXY protocol v2 header first.
    #[serde(default)]
    pub proxy_protocol: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFile {
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default)]
    pub server_names: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtProviderFile {
    pub name: String,
    pub issuer: Option<String>,
    #[serde(default)]
    pub audiences: Vec<String>,
    /// The keys: a JWKS file (reloaded on change) or an `http://` URL on
    /// loopback (fetched every `jwks_refresh`); exactly one.
    pub jwks_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    #[serde(default = "refresh_default", with = "humantime_serde")]
    pub jwks_refresh: Duration,
    #[serde(default = "skew_default", with = "humantime_serde")]
    pub clock_skew: Duration,
    #[serde(default = "subject_header_default")]
    pub subject_header: String,
    /// claim → upstream header.
    #[serde(default)]
    pub claim_headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub forward_token: bool,
}

fn refresh_default() -> Duration {
    Duration::from_secs(300)
}

/// A JWKS URL must be plain HTTP to a loopback address.
fn jwks_url(field: &str, s: &str) -> Result<http::Uri, Invalid> {
    let uri: http::Uri = s.parse().map_err(|e| bad(field, format!("{s:?}: {e}")))?;
    let loopback = match uri.host() {
        Some("localhost") => true,
        Some(h) => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    };
    if uri.scheme_str() != Some("http") || !loopback {
        return Err(bad(
            field,
            format!("{s:?}: write it as http://127.0.0.1:PORT/PATH (loopback only)"),
        ));
    }
    Ok(uri)
}

fn skew_default() -> Duration {
    Duration::from_secs(30)
}

fn subject_header_default() -> String {
    "x-jwt-subject".into()
}

/// At most this much clock skew is accepted (a larger one is a lifetime extension).
const MAX_SKEW: Duration = Duration::from_secs(300);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedProxiesFile {
    pub cidrs: Vec<String>,
    #[serde(default = "one")]
    pub hops: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub max_headers: Option<usize>,
    pub max_header_bytes: Option<usize>,
    pub max_uri_length: Option<usize>,
    pub max_body_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub name: String,
    /// Exact (`api.example.com`) or `*.example.com`; empty: any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default = "slash")]
    pub path_prefix: String,
    pub service: String,
    /// Empty: any method.
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub limits: LimitsFile,
    pub jwt: Option<RouteJwtFile>,
    #[serde(default)]
    pub ip: IpRulesFile,
    #[serde(default)]
    pub rate_limits: Vec<RateLimitFile>,
}

fn slash() -> String {
    "/".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteJwtFile {
    pub provider: String,
    #[serde(default = "yes")]
    pub required: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpRulesFile {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    pub key: LimitKey,
    /// `20/s`, `600/m`, `1000/h`.
    pub rate: String,
    pub burst: Option<u32>,
}

// === loading and checking ===

/// The validated gateway, ready to serve.
#[derive(Debug)]
pub struct GatewayConfig {
    pub listeners: Vec<Listener>,
    pub routes: Arc<Routes>,
    pub providers: Vec<Arc<Provider>>,
    pub reload_interval: Duration,
    pub access_log: Option<PathBuf>,
}

type Invalid = (String, String);

fn bad(field: impl Into<String>, reason: impl std::fmt::Display) -> Invalid {
    (field.into(), reason.to_string())
}

fn cidrs(field: &str, list: &[String]) -> Result<Vec<IpNet>, Invalid> {
    list.iter()
        .enumerate()
        .map(|(i, c)| {
            c.parse::<IpNet>()
                .or_else(|_| c.parse::<std::net::IpAddr>().map(IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| bad(format!("{field}[{i}]"), format!("{c:?} is not a CIDR")))
        })
        .collect()
}

fn header_name(field: &str, s: &str) -> Result<HeaderName, Invalid> {
    let h = HeaderName::from_bytes(s.as_bytes())
        .map_err(|_| bad(field, format!("{s:?} is not a header name")))?;
    const RESERVED: [&str; 6] = [
        "host",
        "authorization",
        "content-length",
        "content-type",
        "te",
        "x-forwarded-for",
    ];
    if RESERVED.contains(&h.as_str()) || h.as_str().starts_with("grpc-") {
        return Err(bad(
            field,
            format!("{s:?} is a header the gateway must not own"),
        ));
    }
    Ok(h)
}

fn limits(field: &str, f: &LimitsFile, base: &Limits) -> Result<Limits, Invalid> {
    let l = Limits {
        max_headers: f.max_headers.unwrap_or(base.max_headers),
        max_header_bytes: f.max_header_bytes.unwrap_or(base.max_header_bytes),
        max_uri_length: f.max_uri_length.unwrap_or(base.max_uri_length),
        max_body_bytes: f.max_body_bytes.or(base.max_body_bytes),
    };
    if l.max_headers == 0 || l.max_header_bytes == 0 || l.max_uri_length == 0 {
        return Err(bad(field, "limits must be at least 1"));
    }
    Ok(l)
}

fn host_pattern(field: &str, h: &str) -> Result<String, Invalid> {
    let h = h.to_ascii_lowercase();
    let name = h.strip_prefix("*.").unwrap_or(&h);
    let ok = !name.is_empty()
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !ok {
        return Err(bad(field, format!("{h:?} is not a host name or *.domain")));
    }
    Ok(h)
}

impl GatewayFile {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let reason = match inner.location() {
                Some(l) => format!("{inner} (line {}, column {})", l.line(), l.column()),
                None => inner.to_string(),
            };
            (if path == "." { String::new() } else { path }, reason)
        })
    }

    /// Checks everything and loads the certificate and JWKS files; relative
    /// paths are relative to `base` (the file's directory).
    pub fn compile(self, base: &Path) -> Result<GatewayConfig, Invalid> {
        let at = |p: &Path| {
            if p.is_relative() {
                base.join(p)
            } else {
                p.to_owned()
            }
        };
        if self.listeners.is_empty() {
            return Err(bad("listeners", "give at least one listener"));
        }
        let trusted = match &self.trusted_proxies {
            None => TrustedProxies::default(),
            Some(t) => {
                if t.hops == 0 {
                    return Err(bad("trusted_proxies.hops", "must be at least 1"));
                }
                TrustedProxies {
                    cidrs: cidrs("trusted_proxies.cidrs", &t.cidrs)?,
                    hops: t.hops,
                }
            }
        };
        let mut listeners = Vec::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let f = format!("listeners[{i}]");
            if l.certificates.is_empty() {
                return Err(bad(
                    format!("{f}.certificates"),
                    "give at least one certificate",
                ));
            }
            let sources = l
                .certificates
                .iter()
                .map(|c| CertSource {
                    cert: at(&c.cert),
                    key: at(&c.key),
                    server_names: c.server_names.clone(),
                })
                .collect();
            let store = CertStore::load(sources)
                .map_err(|(j, field, e)| bad(format!("{f}.certificates[{j}].{field}"), e))?;
            let mut versions = Vec::new();
            for (j, v) in l.tls_versions.iter().enumerate() {
                versions.push(match v.as_str() {
                    "1.2" => &rustls::version::TLS12,
                    "1.3" => &rustls::version::TLS13,
                    _ => {
                        return Err(bad(
                            format!("{f}.tls_versions[{j}]"),
                            format!("{v:?}: write \"1.2\" or \"1.3\""),
                        ));
                    }
                });
            }
            if versions.is_empty() {
                versions = vec![&rustls::version::TLS13, &rustls::version::TLS12];
            }
            let tls = store
                .server_config(&versions)
                .map_err(|e| bad(format!("{f}.tls_versions"), e))?;
            if l.proxy_protocol && trusted.cidrs.is_empty() {
                return Err(bad(
                    format!("{f}.proxy_protocol"),
                    "needs trusted_proxies.cidrs (who may send the header)",
                ));
            }
            listeners.push(Listener {
                address: l.address,
                store,
                public: Arc::new(super::proxy_protocol::PublicTls {
                    tls,
                    proxies: if l.proxy_protocol {
                        trusted.cidrs.clone()
                    } else {
                        Vec::new()
                    },
                }),
            });
        }

        let mut providers: HashMap<&str, Arc<Provider>> = HashMap::new();
        let mut provider_list = Vec::new();
        for (i, p) in self.jwt_providers.iter().enumerate() {
            let f = format!("jwt_providers[{i}]");
            if p.name.is_empty() {
                return Err(bad(format!("{f}.name"), "must not be empty"));
            }
            if p.clock_skew > MAX_SKEW {
                return Err(bad(
                    format!("{f}.clock_skew"),
                    format!("at most {}s", MAX_SKEW.as_secs()),
                ));
            }
            let subject = header_name(&format!("{f}.subject_header"), &p.subject_header)?;
            let claims = p
                .claim_headers
                .iter()
                .map(|(c, h)| {
                    Ok((
                        c.clone(),
                        header_name(&format!("{f}.claim_headers.{c}"), h)?,
                    ))
                })
                .collect::<Result<Vec<_>, Invalid>>()?;
            let source = match (&p.jwks_file, &p.jwks_url) {
                (Some(file), None) => KeySource::File(at(file)),
                (None, Some(url)) => {
                    if p.jwks_refresh < Duration::from_secs(1) {
                        return Err(bad(format!("{f}.jwks_refresh"), "at least 1s"));
                    }
                    KeySource::Url {
                        url: jwks_url(&format!("{f}.jwks_url"), url)?,
                        refresh: p.jwks_refresh,
                    }
                }
                _ => {
                    return Err(bad(
                        format!("{f}.jwks_file"),
                        "give exactly one of jwks_file and jwks_url",
                    ));
                }
            };
            let provider = Provider::new(
                p.name.clone(),
                p.issuer.clone(),
                p.audiences.clone(),
                p.clock_skew,
                source,
                subject,
                claims,
                p.forward_token,
            )
            .map_err(|e| bad(format!("{f}.jwks_file"), e))?;
            let provider = Arc::new(provider);
            if providers.insert(&p.name, provider.clone()).is_some() {
                return Err(bad(
                    format!("{f}.name"),
                    format!("{:?} is given twice", p.name),
                ));
            }
            provider_list.push(provider);
        }

        let base_limits = limits("limits", &self.limits, &Limits::default())?;

        let mut routes = Vec::new();
        let mut names = HashMap::new();
        for (i, r) in self.routes.iter().enumerate() {
            let f = format!("routes[{i}]");
            if let Some(first) = names.insert(r.name.as_str(), i) {
                return Err(bad(
                    format!("{f}.name"),
                    format!("{:?} is already routes[{first}]", r.name),
                ));
            }
            meshwire_mesh::model::validate_service_name(&r.service)
                .map_err(|e| bad(format!("{f}.service"), e.reason))?;
            let hosts = r
                .hosts
                .iter()
                .enumerate()
                .map(|(j, h)| host_pattern(&format!("{f}.hosts[{j}]"), h))
                .collect::<Result<Vec<_>, _>>()?;
            // The prefix is matched against normalised paths, so it is normalised too.
            let prefix = super::path::normalize(&r.path_prefix, EscapedSlashes::Reject)
                .map_err(|e| bad(format!("{f}.path_prefix"), e))?
                .into_owned();
            let methods = r
                .methods
                .iter()
                .enumerate()
                .map(|(j, m)| {
                    Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| {
                        bad(
                            format!("{f}.methods[{j}]"),
                            format!("{m:?} is not a method"),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let jwt = match &r.jwt {
                None => None,
                Some(j) => Some(RouteJwt {
                    provider: providers.get(j.provider.as_str()).cloned().ok_or_else(|| {
                        bad(
                            format!("{f}.jwt.provider"),
                            format!("no jwt_providers entry is named {:?}", j.provider),
                        )
                    })?,
                    required: j.required,
                }),
            };
            let ip = IpRules {
                allow: cidrs(&format!("{f}.ip.allow"), &r.ip.allow)?,
                deny: cidrs(&format!("{f}.ip.deny"), &r.ip.deny)?,
            };
            let mut rl = Vec::new();
            for (j, l) in r.rate_limits.iter().enumerate() {
                if l.key == LimitKey::Subject && jwt.is_none() {
                    return Err(bad(
                        format!("{f}.rate_limits[{j}].key"),
                        "subject needs the route's jwt",
                    ));
                }
                rl.push(
                    Limit::new(l.key, &l.rate, l.burst)
                        .map_err(|e| bad(format!("{f}.rate_limits[{j}]"), e))?,
                );
            }
            routes.push(Arc::new(Route {
                name: Arc::from(r.name.as_str()),
                service: Arc::from(r.service.as_str()),
                hosts,
                prefix,
                methods,
                limits: limits(&format!("{f}.limits"), &r.limits, &base_limits)?,
                jwt,
                ip,
                rate_limits: RateLimits(rl),
                stats: Default::default(),
            }));
        }
        if routes.is_empty() {
            return Err(bad("routes", "give at least one route"));
        }
        // Every header any provider sets is removed from every request.
        let mut owned: Vec<HeaderName> = provider_list
            .iter()
            .flat_map(|p| p.owned_headers().cloned().collect::<Vec<_>>())
            .collect();
        owned.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        owned.dedup();
        Ok(GatewayConfig {
            listeners,
            routes: Arc::new(Routes {
                routes,
                trusted,
                escaped_slashes: self.escaped_slashes,
                owned_headers: owned,
                limits: base_limits,
            }),
            providers: provider_list,
            reload_interval: self.reload_interval,
            access_log: self.access_log.map(|p| at(&p)),
        })
    }
}

impl GatewayConfig {
    /// Reads, parses and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, GatewayConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| GatewayConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |(field, reason): Invalid| GatewayConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason,
        };
        let base = path.parent().unwrap_or(Path::new("."));
        GatewayFile::parse(&text)
            .map_err(invalid)?
            .compile(base)
            .map_err(invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with a certificate pair (`c.pem`, `c.key`) and a JWKS.
    fn dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let ca = meshwire_tls::testing::TestCa::new("t");
        let creds = ca.leaf("spiffe://t/ns/default/sa/gw");
        std::fs::write(
            d.path().join("c.pem"),
            meshwire_tls::to_pem("CERTIFICATE", &creds.chain[0]),
        )
        .unwrap();
        std::fs::write(
            d.path().join("c.key"),
            meshwire_tls::to_pem("PRIVATE KEY", creds.key.secret_der()),
        )
        .unwrap();
        std::fs::write(
            d.path().join("jwks.json"),
            r#"{"keys":[{"kty":"oct","alg":"HS256","kid":"h","k":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}]}"#,
        )
        .unwrap();
        d
    }

    const BASE: &str = "listeners:\n  - address: 127.0.0.1:0\n    certificates: [{cert: c.pem, key: c.key, server_names: [api.test]}]\njwt_providers:\n  - {name: main, jwks_file: jwks.json}\n";

    fn check(d: &tempfile::TempDir, routes: &str) -> Result<GatewayConfig, (String, String)> {
        GatewayFile::parse(&format!("{BASE}{routes}"))?.compile(d.path())
    }

    #[test]
    fn a_good_file_compiles() {
        let d = dir();
        let g = check(
            &d,
            "routes:\n  - {name: a, hosts: [API.test], path_prefix: /v1/./x/, service: web, methods: [get], jwt: {provider: main}, ip: {allow: [10.0.0.0/8, 192.0.2.1]}, rate_limits: [{key: subject, rate: 5/s}]}\n  - {name: b, service: web}\n",
        )
        .unwrap();
        let r = &g.routes.routes[0];
        assert_eq!(r.hosts, ["api.test"]);
        assert_eq!(r.prefix, "/v1/x/", "prefixes are normalised like paths");
        assert_eq!(r.methods, [Method::GET]);
        assert!(r.jwt.as_ref().unwrap().required, "required by default");
        assert_eq!(
            g.routes.owned_headers,
            [HeaderName::from_static("x-jwt-subject")]
        );
        assert_eq!(
            g.routes.find("api.test", "/v1/x/y").unwrap().name.as_ref(),
            "a"
        );
        assert_eq!(
            g.routes.find("api.test", "/v1/xy").unwrap().name.as_ref(),
            "b"
        );
        assert_eq!(
            g.routes.find("other", "/v1/x/y").unwrap().name.as_ref(),
            "b"
        );
    }

    #[test]
    fn errors_name_the_field() {
        let d = dir();
        let field = |routes: &str| check(&d, routes).unwrap_err().0;
        assert_eq!(
            field("routes:\n  - {name: a, service: web, jwt: {provider: nope}}\n"),
            "routes[0].jwt.provider"
        );
        assert_eq!(
            field("routes:\n  - {name: a, service: web, ip: {deny: [10.0.0.0/33]}}\n"),
            "routes[0].ip.deny[0]"
        );
        assert_eq!(
            field(
                "routes:\n  - {name: a, service: web, rate_limits: [{key: client_ip, rate: 5/d}]}\n"
            ),
            "routes[0].rate_limits[0]"
        );
        assert_eq!(
            field(
                "routes:\n  - {name: a, service: web, rate_limits: [{key: subject, rate: 5/s}]}\n"
            ),
            "routes[0].rate_limits[0].key"
        );
        assert_eq!(
            field("routes:\n  - {name: a, service: web}\n  - {name: a, service: web}\n"),
            "routes[1].name"
        );
        assert_eq!(
            field("routes:\n  - {name: a, service: web, hosts: [\"a b\"]}\n"),
            "routes[0].hosts[0]"
        );
        assert_eq!(
            field("routes:\n  - {name: a, service: web, path_prefix: \"/a%2Fb\"}\n"),
            "routes[0].path_prefix"
        );
        assert_eq!(
            field("routes:\n  - {name: a, service: web, wieght: 1}\n"),
            "routes[0].wieght"
        );
        assert_eq!(field("routes: []\n"), "routes");
        let provider = |p: &str| {
            GatewayFile::parse(&format!(
                "listeners:\n  - address: 127.0.0.1:0\n    certificates: [{{cert: c.pem, key: c.key, server_names: [a.test]}}]\njwt_providers:\n  - {p}\nroutes:\n  - {{name: a, service: web}}\n"
            ))
            .unwrap()
            .compile(d.path())
            .map(|_| ())
            .unwrap_err()
        };
        let e = provider("{name: m, jwks_url: \"https://issuer.example.com/jwks\"}");
        assert_eq!(e.0, "jwt_providers[0].jwks_url");
        assert!(e.1.contains("loopback"), "{e:?}");
        let e = provider("{name: m, jwks_file: jwks.json, jwks_url: \"http://127.0.0.1:1/j\"}");
        assert_eq!(e.0, "jwt_providers[0].jwks_file");
        let e = GatewayFile::parse(
            "listeners:\n  - address: 127.0.0.1:0\n    proxy_protocol: true\n    certificates: [{cert: c.pem, key: c.key, server_names: [a.test]}]\nroutes:\n  - {name: a, service: web}\n",
        )
        .unwrap()
        .compile(d.path())
        .unwrap_err();
        assert_eq!(e.0, "listeners[0].proxy_protocol");
        let e = provider("{name: m, jwks_file: jwks.json, clock_skew: 1h}");
        assert_eq!(e.0, "jwt_providers[0].clock_skew");
        let e = GatewayFile::parse(
            "listeners:\n  - address: 127.0.0.1:0\n    certificates: [{cert: missing.pem, key: c.key}]\nroutes:\n  - {name: a, service: web}\n",
        )
        .unwrap()
        .compile(d.path())
        .unwrap_err();
        assert_eq!(e.0, "listeners[0].certificates[0].cert");
        assert!(e.1.contains("missing.pem"), "{e:?}");
        let e = GatewayFile::parse(
            "listeners:\n  - address: 127.0.0.1:0\n    certificates: [{cert: c.pem, key: c.key}]\nroutes:\n  - {name: a, service: web}\n",
        )
        .unwrap()
        .compile(d.path())
        .unwrap_err();
        assert_eq!(
            e.0, "listeners[0].certificates[0].server_names",
            "a SPIFFE-only certificate names no host"
        );
    }
}
