//! Configuration: command-line flags (each also an environment variable
//! `MESHWIRE_...`, since sidecars are injected into container specs) and the
//! static YAML file that lists the services this sidecar can call.
//!
//! Errors name the offending flag or the field's path in the file
//! (`services[1].endpoints[0].weight: ...`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use meshwire_mesh::cli::parse_duration;
use meshwire_mesh::{
    Cluster, Endpoint, HashLb, LbPolicy, Protocol, model::DEFAULT_ACTIVE_REQUEST_BIAS,
};
use serde::Deserialize;

use crate::SidecarConfig;
use crate::telemetry::{LogFormat, TraceConfig};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
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
    #[error("{0}")]
    Flag(String),
}

/// `meshwire-sidecar` flags.
#[derive(Debug, Clone, Parser)]
#[command(name = "meshwire-sidecar", version, about = "Meshwire sidecar proxy")]
pub struct Args {
    /// Where the local app sends its calls (h2c and HTTP/1.1).
    #[arg(long, env = "MESHWIRE_OUTBOUND", default_value = "127.0.0.1:15001")]
    pub outbound: SocketAddr,
    /// Where other sidecars connect.
    #[arg(long, env = "MESHWIRE_INBOUND", default_value = "0.0.0.0:15006")]
    pub inbound: SocketAddr,
    /// Admin HTTP server (/live, /ready, /metrics, /clusters, /config_dump, /logging, /drain).
    #[arg(long, env = "MESHWIRE_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// The local app's h2c address; without it the sidecar serves no inbound traffic.
    #[arg(long, env = "MESHWIRE_APP")]
    pub app: Option<SocketAddr>,
    /// YAML file listing the services this sidecar can call (no control plane).
    #[arg(long, env = "MESHWIRE_STATIC_CONFIG", conflicts_with = "control_plane")]
    pub static_config: Option<PathBuf>,
    /// Run as the edge gateway too: public TLS listeners and routes from this
    /// YAML file (see `gateway::config`); services come from
    /// `--static-config` or the control plane as usual.
    #[arg(long, env = "MESHWIRE_GATEWAY")]
    pub gateway: Option<PathBuf>,
    /// The control plane to take config from over xDS, e.g. `http://10.0.0.2:15010`; several
    /// replicas comma-separated (`https://cp-a:15012,https://cp-b:15012`): one is used, the
    /// next on failure, and certificates are renewed through any of them.
    #[arg(long, env = "MESHWIRE_CONTROL_PLANE", requires = "service")]
    pub control_plane: Option<String>,
    /// The service this sidecar belongs to (its xDS node cluster).
    #[arg(long, env = "MESHWIRE_SERVICE")]
    pub service: Option<String>,
    /// This sidecar's xDS node id (default: `<service>-<hostname>-<pid>`).
    #[arg(long, env = "MESHWIRE_NODE_ID")]
    pub node_id: Option<String>,
    /// Worker threads (the sidecar shares the machine with its app).
    #[arg(long, env = "MESHWIRE_WORKERS", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: u16,
    /// Longest wait for in-flight calls to finish on SIGTERM/SIGINT.
    #[arg(long, env = "MESHWIRE_DRAIN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// How the app's health is followed: `auto` (grpc for gRPC services, else
    /// tcp), `grpc` (grpc.health.v1 Watch), `tcp`, `http:/PATH`, `none`. While
    /// it fails, new calls are refused unprocessed and `/ready` answers 503.
    #[arg(long, env = "MESHWIRE_HEALTH", default_value = "auto")]
    pub health: crate::health::HealthCheck,
    /// The address this sidecar's endpoint is registered with (`meshctl
    /// endpoint add SERVICE ADDR`), named in its health reports to the
    /// control plane. Default: `--inbound` when its IP is specific, else the
    /// local IP toward the control plane with the inbound port.
    #[arg(long, env = "MESHWIRE_ADVERTISE")]
    pub advertise: Option<SocketAddr>,
    /// Between health checks (and HTTP/2 PINGs of the grpc watch).
    #[arg(long, env = "MESHWIRE_HEALTH_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub health_interval: Duration,
    /// Longest wait for a health check's answer.
    #[arg(long, env = "MESHWIRE_HEALTH_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub health_timeout: Duration,
    /// Circuit breaker: most calls in flight to one service; past it calls
    /// fail at once with UNAVAILABLE and `meshwire-error: overloaded` (0: no limit).
    #[arg(long, env = "MESHWIRE_MAX_REQUESTS_PER_SERVICE", default_value_t = crate::outbound::route::DEFAULT_MAX_REQUESTS as u32)]
    pub max_requests_per_service: u32,
    /// Most calls at the local app at once (0: no limit); a call waits at most
    /// --app-queue-timeout for a place, then is refused unprocessed (the
    /// caller's sidecar sends it to another endpoint).
    #[arg(long, env = "MESHWIRE_MAX_APP_CALLS", default_value_t = 0)]
    pub max_app_calls: u32,
    /// The zone this sidecar runs in (e.g. `eu-west-1a`): services with
    /// zone-aware routing (the default) prefer endpoints in the same zone
    /// while enough of them are healthy; sent to the control plane as the
    /// xDS node's locality. Unset: zones play no part in its calls.
    #[arg(long, env = "MESHWIRE_ZONE", value_parser = parse_zone)]
    pub zone: Option<String>,
    /// Endpoints added to a service, and ones back from an ejection, take a
    /// growing share of calls over this window, from 10 % to all (0s: off).
    #[arg(long, env = "MESHWIRE_SLOW_START", default_value = "0s", value_parser = parse_duration)]
    pub slow_start: Duration,
    /// Longest a call waits for a place at the app (see --max-app-calls).
    #[arg(long, env = "MESHWIRE_APP_QUEUE_TIMEOUT", default_value = "100ms", value_parser = parse_duration)]
    pub app_queue_timeout: Duration,
    /// Time allowed to connect to the local app.
    #[arg(long, env = "MESHWIRE_APP_CONNECT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub app_connect_timeout: Duration,
    /// HTTP/2 streams a client may open on one connection to this sidecar.
    #[arg(long, env = "MESHWIRE_MAX_CONCURRENT_STREAMS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,
    /// A connection to any listener that makes no request this long after its
    /// handshake is closed (silent and slow clients cannot hold descriptors).
    #[arg(long, env = "MESHWIRE_FIRST_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub first_request_timeout: Duration,
    /// A connection with no call in flight and none started this long gets a GOAWAY.
    #[arg(long, env = "MESHWIRE_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Most endpoints one service may have; a larger update is refused (NACK).
    #[arg(long, env = "MESHWIRE_MAX_ENDPOINTS", default_value_t = meshwire_mesh::model::MAX_ENDPOINTS as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_endpoints: u32,
    /// Once listening, write the bound addresses here as JSON (for port 0).
    #[arg(long, env = "MESHWIRE_ADDR_FILE")]
    pub addr_file: Option<PathBuf>,
    /// Log filter (`info`, `meshwire_sidecar=debug`, ...); `POST /logging?level=` changes it.
    #[arg(long, env = "MESHWIRE_LOG", default_value = "info")]
    pub log: String,

    /// Single-use token from `meshctl token create`: the first certificate
    /// comes from the control plane's CA (`--control-plane https://...`).
    #[arg(long, env = "MESHWIRE_JOIN_TOKEN", hide_env_values = true, conflicts_with_all = ["join_token_file", "cert"])]
    pub join_token: Option<String>,
    /// The join token, read from a file.
    #[arg(long, env = "MESHWIRE_JOIN_TOKEN_FILE", conflicts_with = "cert")]
    pub join_token_file: Option<PathBuf>,
    /// The mesh's trust bundle (PEM roots; `meshctl ca bundle` prints it).
    #[arg(long, env = "MESHWIRE_TRUST_BUNDLE", conflicts_with = "ca_fingerprint")]
    pub trust_bundle: Option<PathBuf>,
    /// Instead of a bundle file: the SHA-256 fingerprint of the CA's root.
    #[arg(long, env = "MESHWIRE_CA_FINGERPRINT")]
    pub ca_fingerprint: Option<String>,
    /// A fixed certificate chain (PEM) instead of one from the control plane.
    #[arg(long, env = "MESHWIRE_CERT", requires_all = ["key", "trust_bundle"])]
    pub cert: Option<PathBuf>,
    /// The private key of `--cert` (PEM).
    #[arg(long, env = "MESHWIRE_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Longest an outbound call made during start-up waits for the sidecar to be ready.
    #[arg(long, env = "MESHWIRE_STARTUP_WAIT", default_value = "10s", value_parser = parse_duration)]
    pub startup_wait: Duration,
    /// Log lines as human-readable text or one JSON object per line.
    #[arg(long, env = "MESHWIRE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// OTLP/gRPC collector for call spans, e.g. `http://jaeger:4317`; tracing is off without it.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Share of calls without a sampled caller that start a trace (0 to 1);
    /// a caller's `traceparent`/B3 sampled flag is always honoured.
    #[arg(long, env = "MESHWIRE_TRACE_SAMPLE_RATIO", default_value_t = 1.0, value_parser = parse_ratio)]
    pub trace_sample_ratio: f64,
    /// `service.name` of this sidecar's spans (default: `--service`, else `meshwire-sidecar`).
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub trace_service_name: Option<String>,
    /// Finished spans waiting for export; past it new spans are dropped (and counted).
    #[arg(long, env = "MESHWIRE_TRACE_QUEUE_SIZE", default_value_t = 2048,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub trace_queue_size: u32,
}

fn parse_zone(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 128 || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "{s:?}: a zone is 1 to 128 characters, no spaces or control characters"
        ));
    }
    Ok(s.to_owned())
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "{s:?} is not a number between 0 and 1 (e.g. 0.01 for 1 %)"
        )),
    }
}

impl Args {
    pub fn into_config(self) -> Result<SidecarConfig, ConfigError> {
        let file = match &self.static_config {
            Some(p) => StaticConfig::load(p)?,
            None => StaticConfig::default(),
        };
        let mut cfg = SidecarConfig::new(self.outbound, self.admin);
        cfg.inbound = self.app.map(|_| self.inbound);
        cfg.app = self.app;
        cfg.app_connect_timeout = self.app_connect_timeout;
        for (flag, d) in [
            ("--health-interval", self.health_interval),
            ("--health-timeout", self.health_timeout),
        ] {
            if d < Duration::from_millis(10) {
                return Err(ConfigError::Flag(format!(
                    "{flag} {d:?}: must be at least 10ms"
                )));
            }
        }
        cfg.max_requests_per_service = self.max_requests_per_service as usize;
        cfg.max_app_calls = self.max_app_calls as usize;
        cfg.app_queue_timeout = self.app_queue_timeout;
        cfg.slow_start = self.slow_start;
        cfg.zone = self.zone.clone();
        cfg.advertise = self.advertise;
        cfg.health = crate::health::HealthSettings {
            check: self.health.clone(),
            interval: self.health_interval,
            timeout: self.health_timeout,
        };
        cfg.drain_timeout = self.drain_timeout;
        cfg.server.max_concurrent_streams = self.max_concurrent_streams;
        cfg.server.first_request_timeout = self.first_request_timeout;
        cfg.server.idle_timeout = self.idle_timeout;
        cfg.max_endpoints = self.max_endpoints as usize;
        cfg.service_listeners = file.listeners();
        cfg.clusters = file.clusters();
        if let Some(p) = &self.gateway {
            let g = crate::gateway::GatewayConfig::load(p)
                .map_err(|e| ConfigError::Flag(format!("--gateway {e}")))?;
            cfg.gateway = Some(std::sync::Arc::new(g));
        }
        // An empty variable (as container specs leave them) means unset.
        if let Some(endpoint) = self.otlp_endpoint.clone().filter(|e| !e.is_empty()) {
            let uri: http::Uri = endpoint
                .parse()
                .map_err(|e| ConfigError::Flag(format!("--otlp-endpoint {endpoint:?}: {e}")))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
                return Err(ConfigError::Flag(format!(
                    "--otlp-endpoint {endpoint:?}: write it as http://HOST:PORT (OTLP/gRPC, e.g. port 4317)"
                )));
            }
            let name = self
                .trace_service_name
                .clone()
                .filter(|n| !n.is_empty())
                .or_else(|| self.service.clone())
                .unwrap_or_else(|| "meshwire-sidecar".to_owned());
            let mut trace = TraceConfig::new(endpoint, name);
            trace.sample_ratio = self.trace_sample_ratio;
            trace.queue_size = self.trace_queue_size as usize;
            cfg.trace = Some(trace);
        }
        if let Some(server) = self.control_plane.clone() {
            let mut schemes = std::collections::BTreeSet::new();
            let urls: Vec<&str> = server.split(',').map(str::trim).collect();
            for url in &urls {
                let uri: http::Uri = url
                    .parse()
                    .map_err(|e| ConfigError::Flag(format!("--control-plane {url:?}: {e}")))?;
                if uri.scheme().is_none() || uri.authority().is_none() {
                    return Err(ConfigError::Flag(format!(
                        "--control-plane {url:?}: write it as https://HOST:15012 (or http://HOST:15010 without mTLS)"
                    )));
                }
                schemes.insert(uri.scheme_str().unwrap_or_default().to_owned());
            }
            if schemes.len() > 1 {
                return Err(ConfigError::Flag(format!(
                    "--control-plane {server:?}: all https:// or all http://, not both"
                )));
            }
            let server = urls.join(",");
            let service = self.service.clone().unwrap_or_default();
            meshwire_mesh::model::validate_service_name(&service)
                .map_err(|e| ConfigError::Flag(format!("--service: {}", e.reason)))?;
            let node_id = self.node_id.clone().unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|_| "host".into());
                format!("{service}-{host}-{}", std::process::id())
            });
            cfg.control_plane = Some(crate::ControlPlaneConfig {
                server,
                service,
                node_id,
            });
        }
        cfg.startup_wait = self.startup_wait;
        cfg.service = self.service.clone();
        cfg.identity = self.identity(cfg.control_plane.as_ref())?;
        Ok(cfg)
    }

    fn identity(
        &self,
        cp: Option<&crate::ControlPlaneConfig>,
    ) -> Result<Option<crate::IdentitySource>, ConfigError> {
        use meshwire_tls::{Credentials, TrustBundle};
        let flag = |f: &str, e: &dyn std::fmt::Display| ConfigError::Flag(format!("{f}: {e}"));
        let read = |f: &str, p: &Path| {
            std::fs::read_to_string(p).map_err(|e| flag(f, &format!("{}: {e}", p.display())))
        };
        let bundle = self
            .trust_bundle
            .as_deref()
            .map(|p| {
                TrustBundle::from_pem(&read("--trust-bundle", p)?)
                    .map_err(|e| flag("--trust-bundle", &e))
            })
            .transpose()?;
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            let chain = meshwire_tls::certs_from_pem(&read("--cert", cert)?)
                .map_err(|e| flag("--cert", &e))?;
            if chain.is_empty() {
                return Err(flag("--cert", &"no certificate in the file"));
            }
            let key =
                meshwire_tls::key_from_pem(&read("--key", key)?).map_err(|e| flag("--key", &e))?;
            let bundle = bundle.ok_or_else(|| flag("--cert", &"needs --trust-bundle"))?;
            let tls = crate::identity::MeshTls::fixed(Credentials { chain, key }, bundle)
                .map_err(|e| flag("--cert", &e))?;
            return Ok(Some(crate::IdentitySource::Fixed(tls)));
        }
        let token = match (&self.join_token, &self.join_token_file) {
            (Some(t), _) => Some(t.trim().to_owned()),
            (None, Some(p)) => Some(read("--join-token-file", p)?.trim().to_owned()),
            (None, None) => None,
        };
        let https = cp.is_some_and(|c| c.server.starts_with("https://"));
        let Some(token) = token else {
            if https {
                return Err(ConfigError::Flag(
                    "--control-plane https://...: give --join-token (or --join-token-file) for the first certificate".into(),
                ));
            }
            return Ok(None);
        };
        if token.is_empty() {
            return Err(flag("--join-token", &"is empty"));
        }
        let Some(cp) = cp.filter(|_| https) else {
            return Err(ConfigError::Flag(
                "--join-token: needs --control-plane https://HOST:15012 (certificates are only issued over TLS)".into(),
            ));
        };
        let bootstrap = match (bundle, &self.ca_fingerprint) {
            (Some(b), _) => crate::identity::Bootstrap::Bundle(b),
            (None, Some(fp)) => {
                meshwire_tls::pinned_client_config(fp).map_err(|e| flag("--ca-fingerprint", &e))?;
                crate::identity::Bootstrap::Fingerprint(fp.clone())
            }
            (None, None) => {
                return Err(ConfigError::Flag(
                    "--join-token: give --trust-bundle FILE or --ca-fingerprint HEX to verify the control plane".into(),
                ));
            }
        };
        Ok(Some(crate::IdentitySource::ControlPlane(
            crate::identity::IdentityClientConfig {
                server: cp.server.clone(),
                join_token: token,
                bootstrap,
                connect_timeout: Duration::from_secs(2),
            },
        )))
    }
}

/// The static configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticConfig {
    #[serde(default)]
    pub services: Vec<ServiceFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    pub name: String,
    /// `grpc` (default), `http` or `tcp`.
    #[serde(default)]
    pub protocol: ProtocolFile,
    #[serde(default)]
    pub lb_policy: LbPolicyFile,
    /// Strength of load steering for unequal weights (0 = plain weighted round robin).
    pub active_request_bias: Option<f64>,
    /// Ring hash / Maglev: bounded loads (at least 1.0).
    pub hash_balance_factor: Option<f64>,
    /// Ring hash / Maglev: where hash keys come from, first present wins
    /// (`- header: x-user`, `- source_ip: true`, `- cookie: {name: s, ttl: 10m}`).
    #[serde(default)]
    pub hash_policy: Vec<HashSourceFile>,
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// `:authority` sent upstream instead of the caller's.
    pub authority: Option<String>,
    /// A local port for apps that cannot set an authority: calls arriving here go to this service.
    pub listen: Option<SocketAddr>,
    #[serde(default)]
    pub endpoints: Vec<EndpointFile>,
    /// For the sidecar's own service (`--service`): accept plaintext callers too.
    #[serde(default)]
    pub permissive: bool,
    /// For the sidecar's own service: who may call it.
    pub policy: Option<meshwire_mesh::policy::Policy>,
    /// Outlier detection (`consecutive_failures`, `base_ejection_time`,
    /// `max_ejection_time`, `max_ejection_percent`, `failure_codes`).
    #[serde(default)]
    pub outlier: meshwire_mesh::resilience::OutlierDetection,
    /// Retries (`retry_on`, `max_attempts`, `per_try_timeout`, `backoff_base`,
    /// `backoff_max`, `budget_percent`, `min_retries_per_second`).
    #[serde(default)]
    pub retry: meshwire_mesh::resilience::RetryPolicy,
    /// `max_requests`, `max_requests_per_endpoint`.
    #[serde(default)]
    pub circuit_breakers: meshwire_mesh::resilience::CircuitBreakers,
    /// Slow-start window (`0s`: off); unset: `--slow-start`.
    #[serde(default, with = "humantime_serde")]
    pub slow_start: Option<Duration>,
    /// For the sidecar's own service: calls admitted before they reach the
    /// app (`{rate: 20/s, burst: 40, per: service|caller|ip, overrides:
    /// [{caller: spiffe://..., rate: 1000/s}]}`).
    pub rate_limit: Option<meshwire_mesh::RateLimit>,
    /// Zone-aware routing (default on; applies when the sidecar has `--zone`).
    pub zone_aware: Option<bool>,
    /// Fraction of the local zone's weight that must be healthy for it to
    /// keep every call (default 0.7); below, calls spill over in proportion.
    pub zone_min_healthy: Option<f64>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProtocolFile {
    #[default]
    Grpc,
    Http,
    Tcp,
}

impl From<ProtocolFile> for Protocol {
    fn from(p: ProtocolFile) -> Self {
        match p {
            ProtocolFile::Grpc => Protocol::Grpc,
            ProtocolFile::Http => Protocol::Http,
            ProtocolFile::Tcp => Protocol::Tcp,
        }
    }
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicyFile {
    #[default]
    LeastRequest,
    RoundRobin,
    RingHash,
    Maglev,
}

/// One hash source: exactly one of the fields.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashSourceFile {
    pub header: Option<String>,
    #[serde(default)]
    pub source_ip: bool,
    pub cookie: Option<CookieFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CookieFile {
    pub name: String,
    /// Max-Age of the cookie the sidecar sets; none: a session cookie.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
}

impl HashSourceFile {
    fn source(&self) -> Option<meshwire_mesh::HashSource> {
        use meshwire_mesh::HashSource;
        match (&self.header, self.source_ip, &self.cookie) {
            (Some(h), false, None) => Some(HashSource::Header(h.clone())),
            (None, true, None) => Some(HashSource::SourceIp),
            (None, false, Some(c)) => Some(HashSource::Cookie {
                name: c.name.clone(),
                ttl: c.ttl,
            }),
            _ => None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointFile {
    pub address: SocketAddr,
    #[serde(default = "one")]
    pub weight: u32,
    pub zone: Option<String>,
    #[serde(default)]
    pub draining: bool,
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// The SPIFFE ID the endpoint must present on the mTLS hop.
    pub identity: Option<String>,
}

fn one() -> u32 {
    1
}

impl StaticConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|(field, reason)| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason,
        })
    }

    /// Parses and validates; the error is `(field path, reason)`.
    pub fn parse(text: &str) -> Result<Self, (String, String)> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let cfg: StaticConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let reason = match inner.location() {
                Some(l) => format!("{inner} (line {}, column {})", l.line(), l.column()),
                None => inner.to_string(),
            };
            (if path == "." { String::new() } else { path }, reason)
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        for (i, s) in self.services.iter().enumerate() {
            if let Some(j) = s.hash_policy.iter().position(|h| h.source().is_none()) {
                return Err((
                    format!("services[{i}].hash_policy[{j}]"),
                    "give exactly one of header, source_ip: true or cookie".into(),
                ));
            }
        }
        let clusters = self.clusters();
        let mut names = std::collections::HashMap::new();
        for (i, c) in clusters.iter().enumerate() {
            c.validate()
                .map_err(|e| e.within(&format!("services[{i}]")))
                .map_err(|e| (e.field, e.reason))?;
            if let Some(first) = names.insert(c.name.clone(), i) {
                return Err((
                    format!("services[{i}].name"),
                    format!("{:?} is already services[{first}]", c.name),
                ));
            }
        }
        let mut ports = std::collections::HashMap::new();
        for (i, s) in self.services.iter().enumerate() {
            if let Some(addr) = s.listen
                && addr.port() != 0
                && let Some(first) = ports.insert(addr, i)
            {
                return Err((
                    format!("services[{i}].listen"),
                    format!("{addr} is already the listen address of services[{first}]"),
                ));
            }
        }
        Ok(())
    }

    pub fn clusters(&self) -> Vec<Cluster> {
        self.services
            .iter()
            .map(|s| {
                let mut c = Cluster::new(s.name.clone());
                c.protocol = s.protocol.into();
                c.lb = match s.lb_policy {
                    LbPolicyFile::LeastRequest => LbPolicy::LeastRequest {
                        active_request_bias: s
                            .active_request_bias
                            .unwrap_or(DEFAULT_ACTIVE_REQUEST_BIAS),
                    },
                    LbPolicyFile::RoundRobin => LbPolicy::RoundRobin,
                    LbPolicyFile::RingHash => LbPolicy::RingHash(HashLb {
                        balance_factor: s.hash_balance_factor,
                    }),
                    LbPolicyFile::Maglev => LbPolicy::Maglev(HashLb {
                        balance_factor: s.hash_balance_factor,
                    }),
                };
                c.hash_policy = s
                    .hash_policy
                    .iter()
                    .filter_map(HashSourceFile::source)
                    .collect();
                if let Some(t) = s.connect_timeout {
                    c.connect_timeout = t;
                }
                c.request_timeout = s.request_timeout;
                c.authority = s.authority.clone();
                c.permissive = s.permissive;
                c.policy = s.policy.clone();
                c.rate_limit = s.rate_limit.clone();
                c.resilience = Box::new(meshwire_mesh::Resilience {
                    outlier: s.outlier,
                    retry: s.retry,
                    circuit_breakers: s.circuit_breakers,
                    slow_start: s.slow_start,
                });
                let d = meshwire_mesh::ZoneRouting::default();
                c.zones = meshwire_mesh::ZoneRouting {
                    enabled: s.zone_aware.unwrap_or(d.enabled),
                    min_healthy: s.zone_min_healthy.unwrap_or(d.min_healthy),
                };
                c.endpoints = s
                    .endpoints
                    .iter()
                    .map(|e| Endpoint {
                        address: e.address,
                        weight: e.weight,
                        zone: e.zone.clone(),
                        draining: e.draining,
                        identity: e.identity.clone(),
                        metadata: e.metadata.clone(),
                        health: None,
                    })
                    .collect();
                c
            })
            .collect()
    }

    pub fn listeners(&self) -> Vec<(SocketAddr, String)> {
        self.services
            .iter()
            .filter_map(|s| s.listen.map(|a| (a, s.name.clone())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
services:
  - name: greeter
    connect_timeout: 250ms
    request_timeout: 5s
    authority: greeter.internal:50051
    listen: 127.0.0.1:9001
    endpoints:
      - address: 10.0.0.1:15006
        weight: 3
        zone: a
      - address: 10.0.0.2:15006
  - name: billing
    lb_policy: round_robin
  - name: broker
    protocol: tcp
    listen: 127.0.0.2:1883
"#;

    #[test]
    fn parses_a_full_file() {
        let cfg = StaticConfig::parse(GOOD).unwrap();
        let cl = cfg.clusters();
        assert_eq!(cl.len(), 3);
        assert_eq!(cl[0].protocol, Protocol::Grpc, "the default");
        assert_eq!(cl[2].protocol, Protocol::Tcp);
        assert_eq!(cl[0].connect_timeout, Duration::from_millis(250));
        assert_eq!(cl[0].request_timeout, Some(Duration::from_secs(5)));
        assert_eq!(cl[0].endpoints[0].weight, 3);
        assert_eq!(cl[0].endpoints[1].weight, 1);
        assert_eq!(cl[1].lb, LbPolicy::RoundRobin);
        assert_eq!(
            cfg.listeners(),
            vec![
                ("127.0.0.1:9001".parse().unwrap(), "greeter".into()),
                ("127.0.0.2:1883".parse().unwrap(), "broker".into())
            ]
        );
    }

    fn err(text: &str) -> (String, String) {
        StaticConfig::parse(text).unwrap_err()
    }

    #[test]
    fn parses_a_rate_limit_and_refuses_a_bad_one() {
        let cfg = StaticConfig::parse(
            "services:\n  - name: a\n    rate_limit: {rate: 20/s, burst: 5, per: caller, overrides: [{caller: spiffe://t/ns/x/sa/batch, rate: 1000/m}]}\n",
        )
        .unwrap();
        let l = cfg.clusters()[0].rate_limit.clone().unwrap();
        assert_eq!(
            l.to_string(),
            "20/s per caller, burst 5, spiffe://t/ns/x/sa/batch=1000/m"
        );
        let (field, reason) =
            err("services:\n  - name: a\n    rate_limit: {rate: 20/s, burst: 0}\n");
        assert_eq!(field, "services[0].rate_limit.burst", "{reason}");
        let (field, reason) = err(
            "services:\n  - name: a\n    rate_limit: {rate: 20/s, overrides: [{caller: batch, rate: 1/s}]}\n",
        );
        assert_eq!(
            field, "services[0].rate_limit.overrides[0].caller",
            "{reason}"
        );
        let (_, reason) = err("services:\n  - name: a\n    rate_limit: {rate: 20/d}\n");
        assert!(reason.contains("not s, m or h"), "{reason}");
    }

    #[test]
    fn parses_resilience_settings() {
        let cfg = StaticConfig::parse(
            "services:\n  - name: a\n    retry: {max_attempts: 3, retry_on: [unavailable, internal], per_try_timeout: 200ms}\n    circuit_breakers: {max_requests: 500}\n    outlier: {consecutive_failures: 3, base_ejection_time: 2s, failure_codes: [unavailable]}\n    slow_start: 30s\n",
        )
        .unwrap();
        let r = &cfg.clusters()[0].resilience;
        assert_eq!(r.retry.max_attempts, Some(3));
        assert_eq!(
            r.retry.retry_on.unwrap().to_string(),
            "internal,unavailable"
        );
        assert_eq!(r.retry.per_try_timeout, Some(Duration::from_millis(200)));
        assert_eq!(r.circuit_breakers.max_requests, Some(500));
        assert_eq!(r.outlier.base_ejection_time, Some(Duration::from_secs(2)));
        assert_eq!(r.slow_start, Some(Duration::from_secs(30)));
        let (f, r) = err("services:\n  - name: a\n    retry: {max_attempts: 9}\n");
        assert_eq!(
            (f.as_str(), r.as_str()),
            ("services[0].retry.max_attempts", "must be 1..=5")
        );
        let (f, _) = err("services:\n  - name: a\n    retry: {attempts: 2}\n");
        assert!(f.starts_with("services[0].retry"), "{f}");
    }

    #[test]
    fn parses_hash_policies() {
        let cfg = StaticConfig::parse(
            r#"
services:
  - name: cart
    lb_policy: ring_hash
    hash_balance_factor: 1.25
    hash_policy:
      - header: x-user
      - cookie: {name: sticky, ttl: 10m}
      - source_ip: true
  - name: maps
    lb_policy: maglev
"#,
        )
        .unwrap();
        let cl = cfg.clusters();
        assert_eq!(
            cl[0].lb,
            LbPolicy::RingHash(HashLb {
                balance_factor: Some(1.25)
            })
        );
        assert_eq!(
            cl[0].hash_policy,
            vec![
                meshwire_mesh::HashSource::Header("x-user".into()),
                meshwire_mesh::HashSource::Cookie {
                    name: "sticky".into(),
                    ttl: Some(Duration::from_secs(600))
                },
                meshwire_mesh::HashSource::SourceIp,
            ]
        );
        assert_eq!(cl[1].lb, LbPolicy::Maglev(HashLb::default()));
        let (f, _) =
            err("services:\n  - name: a\n    lb_policy: maglev\n    hash_balance_factor: 0.5\n");
        assert_eq!(f, "services[0].lb.balance_factor");
        let (f, _) = err("services:\n  - name: a\n    hash_policy:\n      - header: X-User\n");
        assert_eq!(f, "services[0].hash_policy[0].header");
        let (f, r) = err(
            "services:\n  - name: a\n    hash_policy:\n      - header: a\n      - {header: b, source_ip: true}\n",
        );
        assert_eq!(f, "services[0].hash_policy[1]");
        assert!(r.contains("exactly one"), "{r}");
    }

    #[test]
    fn parses_zone_routing() {
        let cfg = StaticConfig::parse(
            "services:\n  - name: a\n    zone_min_healthy: 0.5\n  - name: b\n    zone_aware: false\n  - name: c\n",
        )
        .unwrap();
        let cl = cfg.clusters();
        assert_eq!(
            cl[0].zones,
            meshwire_mesh::ZoneRouting {
                enabled: true,
                min_healthy: 0.5
            }
        );
        assert!(!cl[1].zones.enabled);
        assert_eq!(cl[2].zones, meshwire_mesh::ZoneRouting::default());
        let (f, r) = err("services:\n  - name: a\n    zone_min_healthy: 1.5\n");
        assert_eq!(f, "services[0].zones.min_healthy");
        assert!(r.contains("at most 1"), "{r}");
    }

    #[test]
    fn errors_name_the_field() {
        let (f, r) = err(
            "services:\n  - name: a\n    endpoints:\n      - address: 10.0.0.1:1\n        weight: 0\n",
        );
        assert_eq!(f, "services[0].endpoints[0].weight");
        assert!(r.contains("between 1 and 10000"), "{r}");

        let (f, r) = err("services:\n  - name: a\n    endpoints:\n      - address: nope\n");
        assert_eq!(f, "services[0].endpoints[0].address");
        assert!(r.contains("line 4"), "{r}");

        let (f, r) = err("services:\n  - name: a\n    wieght: 3\n");
        assert_eq!(f, "services[0].wieght");
        assert!(r.contains("unknown field `wieght`"), "{r}");

        let (f, _) = err("services:\n  - name: a\n    connect_timeout: soon\n");
        assert_eq!(f, "services[0].connect_timeout");

        let (f, _) = err("services:\n  - name: a\n  - name: a\n");
        assert_eq!(f, "services[1].name");

        let (f, _) = err(
            "services:\n  - name: a\n    listen: 127.0.0.1:9\n  - name: b\n    listen: 127.0.0.1:9\n",
        );
        assert_eq!(f, "services[1].listen");

        let (f, _) = err("services:\n  - name: a\n    lb_policy: random\n");
        assert_eq!(f, "services[0].lb_policy");

        let (f, r) = err("services:\n  - name: a\n    protocol: udp\n");
        assert_eq!(f, "services[0].protocol");
        assert!(r.contains("grpc") && r.contains("tcp"), "{r}");
    }

    fn args(extra: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(["meshwire-sidecar"].iter().chain(extra))
    }

    #[test]
    fn tracing_and_log_flags() {
        let a = args(&[
            "--otlp-endpoint",
            "http://127.0.0.1:4317",
            "--trace-sample-ratio",
            "0.01",
            "--control-plane",
            "http://127.0.0.1:15010",
            "--service",
            "billing",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(a.log_format, LogFormat::Json);
        let t = a.into_config().unwrap().trace.expect("tracing on");
        assert_eq!(t.otlp_endpoint, "http://127.0.0.1:4317");
        assert_eq!(t.service_name, "billing", "defaults to --service");
        assert_eq!(t.sample_ratio, 0.01);

        let a = args(&[
            "--otlp-endpoint",
            "http://c:4317",
            "--trace-service-name",
            "edge",
        ])
        .unwrap();
        let t = a.into_config().unwrap().trace.unwrap();
        assert_eq!((t.service_name.as_str(), t.sample_ratio), ("edge", 1.0));

        let e = args(&["--trace-sample-ratio", "1.5"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("between 0 and 1"), "{e}");
        assert!(args(&["--log-format", "xml"]).is_err());
        let e = args(&["--otlp-endpoint", "collector:4317"])
            .unwrap()
            .into_config()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--otlp-endpoint") && e.contains("http://HOST:PORT"),
            "{e}"
        );
        let off = args(&["--otlp-endpoint", ""])
            .unwrap()
            .into_config()
            .unwrap();
        assert!(off.trace.is_none(), "an empty endpoint leaves tracing off");
    }
}
